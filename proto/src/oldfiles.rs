//! Replacing a file, and removing big files, off the caller's path: the
//! agent's mirror files, the daemon's pulled outputs.
//!
//! Two kernel costs showed up in a traced 1 MiB edit of a 1 GiB file
//! (scenario 3 of `bench/`, ext4):
//!
//! - `rename(2)` over an existing file makes ext4 start writing the new
//!   file back before it returns (`auto_da_alloc`, a guard for programs
//!   that skip `fsync`): 0.2–0.4 s for 1 GiB. [`replace`] swaps the two
//!   names with `renameat2(RENAME_EXCHANGE)` instead, which is just as
//!   atomic for readers of the path and leaves writeback to the kernel's
//!   usual schedule; the old version then sits at the temporary name.
//! - Unlinking the last link of a big file frees its blocks and drops its
//!   cached pages in the caller: ~0.2 s for 1 GiB. [`remove`] renames such a
//!   file to a fresh hidden name in a directory the caller cleans at start
//!   (so a crash leaks nothing) and unlinks it on a background thread.

use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, OnceLock, mpsc};

/// Files at least this big are unlinked in the background.
pub const BACKGROUND_BYTES: u64 = 16 << 20;

/// Puts `src` at `dst` atomically. Returns true when a file that was at
/// `dst` now sits at `src` (the caller removes it); false when `dst` was
/// free, or the file system cannot swap names and `src` replaced it.
pub fn replace(src: &Path, dst: &Path, dst_is_file: bool) -> io::Result<bool> {
    if dst_is_file && rename2(src, dst, Rename2::Exchange)? {
        return Ok(true);
    }
    std::fs::rename(src, dst)?;
    Ok(false)
}

/// Puts `src` at `dst` when nothing is there (`renameat2(RENAME_NOREPLACE)`,
/// atomic: no look first). False when `dst` exists, or where this file
/// system or libc cannot say so without looking: the caller then looks and
/// uses [`replace`].
pub fn place_new(src: &Path, dst: &Path) -> io::Result<bool> {
    rename2(src, dst, Rename2::NoReplace)
}

#[derive(Clone, Copy)]
enum Rename2 {
    /// Swap the two names; declined when `dst` is gone.
    Exchange,
    /// Take `dst` only if free; declined when something is there.
    NoReplace,
}

/// `renameat2` as `how` says: true when it renamed; false when it declined,
/// or where this libc or file system lacks it.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn rename2(src: &Path, dst: &Path, how: Rename2) -> io::Result<bool> {
    use nix::errno::Errno;
    use nix::fcntl::{AT_FDCWD, RenameFlags, renameat2};
    let (flags, declined) = match how {
        Rename2::Exchange => (RenameFlags::RENAME_EXCHANGE, Errno::ENOENT),
        Rename2::NoReplace => (RenameFlags::RENAME_NOREPLACE, Errno::EEXIST),
    };
    match renameat2(AT_FDCWD, src, AT_FDCWD, dst, flags) {
        Ok(()) => Ok(true),
        Err(e) if e == declined => Ok(false),
        Err(Errno::EINVAL | Errno::ENOSYS | Errno::EOPNOTSUPP) => Ok(false),
        Err(e) => Err(e.into()),
    }
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn rename2(_src: &Path, _dst: &Path, _how: Rename2) -> io::Result<bool> {
    Ok(false)
}

/// Removes the file at `path`, `size` bytes: at once when small, else
/// renamed into `tmp_dir` now (as `.bridge-gone-PID-N`; see [`empty_dir`])
/// and unlinked on the background thread. The name `path` is free when
/// this returns.
pub fn remove(path: &Path, size: u64, tmp_dir: &Path) -> io::Result<()> {
    static SEQ: AtomicU64 = AtomicU64::new(0);
    if size >= BACKGROUND_BYTES {
        let n = SEQ.fetch_add(1, Ordering::Relaxed);
        let gone = tmp_dir.join(format!(".bridge-gone-{}-{n}", std::process::id()));
        if std::fs::rename(path, &gone).is_ok() {
            if let Err(mpsc::SendError(p)) = sender().lock().expect("reaper").send(gone) {
                std::fs::remove_file(p)?;
            }
            return Ok(());
        }
    }
    std::fs::remove_file(path)
}

/// Creates `dir` if needed and removes the files in it: what [`remove`]
/// left there for a process that stopped before unlinking it.
pub fn empty_dir(dir: &Path) -> io::Result<()> {
    std::fs::create_dir_all(dir)?;
    for e in std::fs::read_dir(dir)?.flatten() {
        let _ = std::fs::remove_file(e.path());
    }
    Ok(())
}

/// The background thread's queue, started on first use.
fn sender() -> &'static Mutex<mpsc::Sender<PathBuf>> {
    static TX: OnceLock<Mutex<mpsc::Sender<PathBuf>>> = OnceLock::new();
    TX.get_or_init(|| {
        let (tx, rx) = mpsc::channel::<PathBuf>();
        let spawned = std::thread::Builder::new()
            .name("reap".into())
            .spawn(move || {
                for p in rx {
                    if let Err(e) = std::fs::remove_file(&p) {
                        tracing::debug!(path = %p.display(), error = %e, "cannot remove");
                    }
                }
            });
        if let Err(e) = spawned {
            // The receiver is dropped with the closure: every send fails
            // and its caller removes the file itself.
            tracing::warn!(error = %e, "no background removal thread");
        }
        Mutex::new(tx)
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs;
    use std::time::{Duration, Instant};

    #[test]
    fn replace_swaps_an_existing_file_and_renames_onto_a_free_name() {
        let d = tempfile::tempdir().unwrap();
        let (a, b) = (d.path().join("a"), d.path().join("b"));
        fs::write(&a, "new").unwrap();
        fs::write(&b, "old").unwrap();
        let swapped = replace(&a, &b, true).unwrap();
        assert_eq!(fs::read_to_string(&b).unwrap(), "new");
        if swapped {
            assert_eq!(fs::read_to_string(&a).unwrap(), "old");
        } else {
            assert!(!a.exists());
        }
        // Nothing at the destination: a plain rename, even when told a
        // file was there (it may have gone in between).
        let c = d.path().join("c");
        assert!(!replace(&b, &c, true).unwrap());
        assert_eq!(fs::read_to_string(&c).unwrap(), "new");
        assert!(!b.exists());
        assert!(replace(&d.path().join("missing"), &c, true).is_err());
    }

    #[test]
    fn place_new_takes_a_free_name_and_leaves_a_taken_one_alone() {
        let d = tempfile::tempdir().unwrap();
        let (src, dst) = (d.path().join("tmp"), d.path().join("dst"));
        fs::write(&src, b"new").unwrap();
        assert!(place_new(&src, &dst).unwrap());
        assert_eq!(fs::read(&dst).unwrap(), b"new");
        assert!(!src.exists());
        // A file there: nothing moves.
        fs::write(&src, b"newer").unwrap();
        assert!(!place_new(&src, &dst).unwrap());
        assert_eq!(fs::read(&dst).unwrap(), b"new");
        assert_eq!(fs::read(&src).unwrap(), b"newer");
        // A directory or a symlink there: nothing moves either.
        let sub = d.path().join("sub");
        fs::create_dir(&sub).unwrap();
        assert!(!place_new(&src, &sub).unwrap());
        assert!(sub.is_dir());
        let link = d.path().join("link");
        std::os::unix::fs::symlink(&dst, &link).unwrap();
        assert!(!place_new(&src, &link).unwrap());
        assert!(
            fs::symlink_metadata(&link)
                .unwrap()
                .file_type()
                .is_symlink()
        );
        assert_eq!(fs::read(&src).unwrap(), b"newer");
    }

    #[test]
    fn remove_frees_the_name_at_once_and_the_file_soon() {
        let d = tempfile::tempdir().unwrap();
        let tmp = d.path().join("tmp");
        fs::create_dir(&tmp).unwrap();
        let (small, big) = (d.path().join("small"), d.path().join("big"));
        fs::write(&small, "x").unwrap();
        fs::File::create(&big)
            .unwrap()
            .set_len(BACKGROUND_BYTES)
            .unwrap();
        remove(&small, 1, &tmp).unwrap();
        remove(&big, BACKGROUND_BYTES, &tmp).unwrap();
        assert!(!small.exists() && !big.exists());
        let t0 = Instant::now();
        while fs::read_dir(&tmp).unwrap().next().is_some() {
            assert!(t0.elapsed() < Duration::from_secs(10), "never removed");
            std::thread::sleep(Duration::from_millis(5));
        }
        assert!(remove(&d.path().join("missing"), 1, &tmp).is_err());
        assert!(remove(&d.path().join("missing"), BACKGROUND_BYTES, &tmp).is_err());
    }
}

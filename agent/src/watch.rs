//! Watching a mirror between verifications.
//!
//! A full refresh ([`crate::mirror::Mirror::refresh`]) walks the whole mirror:
//! seconds at 200,000 files, and a daemon asks for the mirror's root on every
//! connection and barrier. Between refreshes one non-recursive inotify watch
//! per synced directory records the paths that anything (the agent's own
//! rounds included) touched. A verification then only looks at those paths
//! ([`crate::mirror::Mirror::verify`]): when each matches what the agent
//! recorded, the tree in memory is still the mirror's.
//!
//! The watch vouches for nothing it cannot see, and every such case falls
//! back to a full refresh: the kernel's queue overflowed, more than
//! [`PENDING_MAX`] paths piled up, or a watch could not be added (the
//! `fs.inotify.max_user_watches` limit, or no inotify at all). A directory
//! watched only after the walk that found it is looked at again, entry by
//! entry, at the next verification. Writes through another name of a mirror
//! file (a job's hard-linked snapshot) raise no event here: the caller does
//! not trust the watch while jobs run.

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::Duration;

use notify::{Event, EventKind, RecursiveMode, Watcher as _};

/// Past this many touched paths a full refresh is cheaper than looking at
/// each one (and the set stays small in memory).
pub const PENDING_MAX: usize = 65_536;

/// How long [`MirrorWatch::flush`] waits for its own event.
const FLUSH_WAIT: Duration = Duration::from_secs(1);

#[derive(Default)]
struct Pending {
    paths: HashSet<PathBuf>,
    /// Events were lost: nothing can be vouched for until a full refresh.
    overflow: bool,
    /// Events seen for the flush marker.
    marks: u64,
}

impl Pending {
    fn add(&mut self, paths: impl IntoIterator<Item = PathBuf>) {
        if self.overflow {
            return;
        }
        self.paths.extend(paths);
        if self.paths.len() > PENDING_MAX {
            self.paths = HashSet::new();
            self.overflow = true;
        }
    }
}

type Shared = Arc<(Mutex<Pending>, Condvar)>;

pub struct MirrorWatch {
    inner: Option<notify::RecommendedWatcher>,
    pending: Shared,
    /// The mirror's `.git`: never synced, and an entry of the watched root,
    /// so touching it makes an event that marks a point in the queue.
    marker: PathBuf,
    watched: HashSet<PathBuf>,
    /// The watch cannot vouch for the mirror (no inotify, or out of
    /// watches; logged once).
    broken: bool,
}

impl MirrorWatch {
    /// A watch for the mirror at `root` (nothing is watched yet).
    pub fn new(root: &Path) -> MirrorWatch {
        let pending: Shared = Default::default();
        let sink = pending.clone();
        let marker = root.join(".git");
        let mark = marker.clone();
        let handler = move |res: notify::Result<Event>| {
            let (lock, seen) = &*sink;
            let mut p = lock.lock().unwrap_or_else(|e| e.into_inner());
            match res {
                Ok(ev) if ev.need_rescan() => p.overflow = true,
                // Opens and reads change nothing.
                Ok(ev) if matches!(ev.kind, EventKind::Access(_)) => {}
                Ok(ev) if ev.paths.len() == 1 && ev.paths[0] == mark => {
                    p.marks += 1;
                    seen.notify_all();
                }
                Ok(ev) => p.add(ev.paths),
                Err(_) => p.overflow = true,
            }
        };
        let inner = match notify::recommended_watcher(handler) {
            Ok(w) => Some(w),
            Err(e) => {
                tracing::warn!(error = %e, "cannot start inotify: every verification of this mirror walks it whole");
                None
            }
        };
        let broken = inner.is_none();
        MirrorWatch {
            inner,
            pending,
            marker,
            watched: HashSet::new(),
            broken,
        }
    }

    fn lock(&self) -> MutexGuard<'_, Pending> {
        self.pending.0.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Waits until every event queued before this call has been seen: the
    /// kernel queues an event when a change happens, the watcher's thread
    /// reads it a moment later. False when that cannot be made sure of
    /// (no `.git` in the mirror, or no event in [`FLUSH_WAIT`]).
    pub fn flush(&self) -> bool {
        if self.inner.is_none() || !self.marker.is_dir() {
            return false;
        }
        let before = self.lock().marks;
        let now = nix::sys::time::TimeSpec::UTIME_NOW;
        if nix::sys::stat::utimensat(
            nix::fcntl::AT_FDCWD,
            &self.marker,
            &now,
            &now,
            nix::sys::stat::UtimensatFlags::NoFollowSymlink,
        )
        .is_err()
        {
            return false;
        }
        let (_, seen) = &*self.pending;
        let (p, timeout) = seen
            .wait_timeout_while(self.lock(), FLUSH_WAIT, |p| p.marks == before)
            .unwrap_or_else(|e| e.into_inner());
        drop(p);
        !timeout.timed_out()
    }

    /// True while the watch has seen everything since it was set up.
    pub fn usable(&self) -> bool {
        !self.broken
    }

    /// Takes the paths touched since the last call; `None` when events were
    /// lost (the caller must walk everything).
    pub fn take(&self) -> Option<HashSet<PathBuf>> {
        let mut p = self.lock();
        let overflow = std::mem::take(&mut p.overflow);
        let paths = std::mem::take(&mut p.paths);
        (!overflow).then_some(paths)
    }

    /// Adds `paths` to the touched set, as if events had named them.
    pub fn touch(&self, paths: impl IntoIterator<Item = PathBuf>) {
        self.lock().add(paths);
    }

    /// Watches `dir` (again: after a removal and a new directory of the same
    /// name, the old watch is gone). False when it is not watched.
    pub fn watch(&mut self, dir: &Path) -> bool {
        let Some(w) = self.inner.as_mut() else {
            return false;
        };
        if self.broken {
            return false;
        }
        match w.watch(dir, RecursiveMode::NonRecursive) {
            Ok(()) => {
                self.watched.insert(dir.to_path_buf());
                true
            }
            Err(e) if is_limit(&e) => {
                tracing::warn!(
                    "inotify watch limit reached after {} directories (fs.inotify.max_user_watches): \
                     every verification of this mirror walks it whole",
                    self.watched.len()
                );
                self.broken = true;
                false
            }
            // Gone since it was found, or not readable: a verification that
            // meets it walks the mirror.
            Err(e) => {
                tracing::debug!(path = %dir.display(), error = %e, "cannot watch");
                self.watched.remove(dir);
                false
            }
        }
    }

    /// Makes the watched set exactly `dirs` (absolute). Returns the
    /// directories that were not watched before: their walk happened before
    /// their watch (or they could not be watched), so what changed in them
    /// is unknown.
    pub fn watch_exactly(&mut self, dirs: HashSet<PathBuf>) -> Vec<PathBuf> {
        let gone: Vec<PathBuf> = self.watched.difference(&dirs).cloned().collect();
        for d in gone {
            self.watched.remove(&d);
            if let Some(w) = self.inner.as_mut() {
                let _ = w.unwatch(&d);
            }
        }
        let mut new = Vec::new();
        for d in dirs {
            if self.watched.contains(&d) {
                continue;
            }
            if self.broken {
                break;
            }
            self.watch(&d);
            new.push(d);
        }
        new
    }

    /// Number of directories watched.
    pub fn watches(&self) -> usize {
        self.watched.len()
    }
}

fn is_limit(e: &notify::Error) -> bool {
    match &e.kind {
        notify::ErrorKind::MaxFilesWatch => true,
        notify::ErrorKind::Io(io) => io.raw_os_error() == Some(28), // ENOSPC
        _ => false,
    }
}

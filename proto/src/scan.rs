//! Which paths are synced, and the directory walk both sides use.
//!
//! The synced set is the tree minus git's ignore rules with git's semantics —
//! nested `.gitignore`, `.git/info/exclude`, `core.excludesFile` (daemon side),
//! negations — plus `.bridgeignore` files in the same syntax, minus `.git/`,
//! `.bridge/` and editor temporaries. The `ignore` crate implements the rules;
//! ignored directories are pruned before they are read, so a 200k-file `.venv`
//! costs neither a stat nor a watch.
//!
//! The agent walks its mirror with the same rules. It has no `core.excludesFile`;
//! the daemon sends those lines and the agent writes them into the mirror's
//! `.git/info/exclude` (see [`install_excludes`]), which also makes the mirror
//! a "git repository" for the `ignore` crate exactly like the local tree.

use std::collections::HashMap;
use std::ffi::OsString;
use std::fs::Metadata;
use std::io;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use nix::fcntl::{AtFlags, OFlag};
use nix::sys::stat::{FileStat, fstatat};

use crate::path::{MAX_PATH_BYTES, RelPath};

/// Name of bridge's own ignore files.
pub const BRIDGEIGNORE: &str = ".bridgeignore";

/// Directories that are never synced, at any depth.
const NEVER_DIRS: &[&str] = &[".git", ".bridge"];

/// True for names that are never synced: bridge's and git's own directories and
/// editor temporaries (vim `4913`, `*~`, `.*.swp`/`.swo`/`.swx`; emacs `.#*`;
/// JetBrains `*___jb_tmp___`, `*___jb_old___`).
pub fn is_always_excluded(name: &str) -> bool {
    NEVER_DIRS.contains(&name)
        || name == "4913"
        || name.ends_with('~')
        || (name.starts_with('.')
            && (name.ends_with(".swp") || name.ends_with(".swo") || name.ends_with(".swx")))
        || name.starts_with(".#")
        || name.ends_with("___jb_tmp___")
        || name.ends_with("___jb_old___")
}

/// True when a change to a file with this name changes which paths are synced.
pub fn is_ignore_file(name: &str) -> bool {
    name == ".gitignore" || name == BRIDGEIGNORE
}

/// Which side is walking: only the daemon reads the user's `core.excludesFile`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    Daemon,
    Agent,
}

/// Kind of a walked path, from `lstat`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FileKind {
    File,
    Dir,
    Symlink,
    /// Sockets, fifos, devices: never synced.
    Other,
}

/// The `lstat` fields bridge compares to decide whether a file changed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Stat {
    pub kind: FileKind,
    pub size: u64,
    pub mtime_ns: i64,
    pub ctime_ns: i64,
    pub ino: u64,
    pub exec: bool,
}

impl Stat {
    pub fn from_metadata(m: &Metadata) -> Stat {
        let ft = m.file_type();
        let kind = if ft.is_symlink() {
            FileKind::Symlink
        } else if ft.is_dir() {
            FileKind::Dir
        } else if ft.is_file() {
            FileKind::File
        } else {
            FileKind::Other
        };
        Stat {
            kind,
            size: m.len(),
            mtime_ns: m.mtime() * 1_000_000_000 + m.mtime_nsec(),
            ctime_ns: m.ctime() * 1_000_000_000 + m.ctime_nsec(),
            ino: m.ino(),
            exec: m.permissions().mode() & 0o100 != 0,
        }
    }

    /// The same fields from a raw `stat`.
    pub fn from_raw(st: &FileStat) -> Stat {
        let kind = match st.st_mode & nix::libc::S_IFMT {
            nix::libc::S_IFLNK => FileKind::Symlink,
            nix::libc::S_IFDIR => FileKind::Dir,
            nix::libc::S_IFREG => FileKind::File,
            _ => FileKind::Other,
        };
        Stat {
            kind,
            size: st.st_size as u64,
            mtime_ns: st.st_mtime * 1_000_000_000 + st.st_mtime_nsec,
            ctime_ns: st.st_ctime * 1_000_000_000 + st.st_ctime_nsec,
            ino: st.st_ino,
            exec: st.st_mode & 0o100 != 0,
        }
    }

    pub fn lstat(p: &Path) -> io::Result<Stat> {
        std::fs::symlink_metadata(p).map(|m| Stat::from_metadata(&m))
    }
}

/// One path the walk found (never the walk's root itself).
#[derive(Debug, Clone)]
pub struct Found {
    pub path: RelPath,
    pub stat: Stat,
}

/// A path the walk could not use, with the reason.
#[derive(Debug, Clone)]
pub struct Unreadable {
    pub path: String,
    pub reason: String,
}

/// One directory's synced entries as a walk found them, names in byte order.
#[derive(Debug, Clone)]
pub struct Listing {
    /// The directory, relative to the root ("" for the root itself).
    pub dir: String,
    /// Each entry's name (a valid path component) and `lstat`.
    pub entries: Vec<(String, Stat)>,
}

impl Listing {
    /// The path of the entry named `name`.
    pub fn path(&self, name: &str) -> RelPath {
        Listing::path_in(&self.dir, name)
    }

    /// The path of the entry `name` of a listed directory `dir`.
    pub fn path_in(dir: &str, name: &str) -> RelPath {
        if dir.is_empty() {
            RelPath::trusted(name)
        } else {
            let mut p = String::with_capacity(dir.len() + 1 + name.len());
            p.push_str(dir);
            p.push('/');
            p.push_str(name);
            RelPath::trusted(&p)
        }
    }
}

/// Walks `root/start` (the whole tree when `start` is `None`), down to
/// `max_depth` levels below `start`, returning every synced path in path
/// order. Ignore files in `start`'s parents inside the tree apply as they
/// would in a full walk.
pub fn walk(
    root: &Path,
    start: Option<&RelPath>,
    max_depth: Option<usize>,
    side: Side,
) -> (Vec<Found>, Vec<Unreadable>) {
    let (listings, bad) = walk_listings(root, start, max_depth, side);
    let total = listings.iter().map(|l| l.entries.len()).sum();
    let mut found = Vec::with_capacity(total);
    for l in &listings {
        found.extend(l.entries.iter().map(|(name, stat)| Found {
            path: l.path(name),
            stat: *stat,
        }));
    }
    found.sort_unstable_by(|a, b| a.path.cmp(&b.path));
    (found, bad)
}

/// [`walk`], by directory (in no particular order): what a caller that
/// builds a tree of per-directory lists needs, without a path per entry.
pub fn walk_listings(
    root: &Path,
    start: Option<&RelPath>,
    max_depth: Option<usize>,
    side: Side,
) -> (Vec<Listing>, Vec<Unreadable>) {
    let base = start
        .map(|s| s.to_fs(root))
        .unwrap_or_else(|| root.to_path_buf());
    let mut b = ignore::WalkBuilder::new(&base);
    b.hidden(false)
        .parents(true)
        .ignore(false)
        .git_ignore(true)
        .git_exclude(true)
        .git_global(side == Side::Daemon)
        .require_git(true)
        .follow_links(false)
        .max_depth(max_depth)
        .add_custom_ignore_filename(BRIDGEIGNORE)
        .threads(WALK_THREADS)
        .filter_entry(|e| {
            e.file_name()
                .to_str()
                .is_none_or(|n| !is_always_excluded(n))
        });
    // First the names, by directory: the walker knows each entry's type from
    // the directory listing, so it needs no stat to apply the ignore rules.
    let names: Mutex<HashMap<PathBuf, Vec<OsString>>> = Mutex::new(HashMap::new());
    let bad = Mutex::new(Vec::new());
    let visit = |res: Result<ignore::DirEntry, ignore::Error>| {
        match res {
            Ok(e) if e.depth() == 0 => {}
            Ok(e) => {
                let p = e.path();
                if let (Some(dir), Some(name)) = (p.parent(), p.file_name()) {
                    let mut names = names.lock().expect("walk poisoned");
                    match names.get_mut(dir) {
                        Some(l) => l.push(name.to_owned()),
                        None => _ = names.insert(dir.to_path_buf(), vec![name.to_owned()]),
                    }
                }
            }
            Err(err) => {
                // A vanished path is a race with the user, not a problem.
                if !is_not_found(&err) {
                    bad.lock().expect("walk poisoned").push(Unreadable {
                        path: String::new(),
                        reason: err.to_string(),
                    });
                }
            }
        }
        ignore::WalkState::Continue
    };
    let threads = if max_depth.is_some() {
        // One directory level (the watcher's common case): no threads.
        for res in b.build() {
            visit(res);
        }
        1
    } else {
        b.build_parallel().run(|| Box::new(&visit));
        WALK_THREADS
    };
    // Then one stat per entry, relative to its directory: a full path
    // would make the kernel look up every component again (those lookups
    // were a fifth of a 200,000-file walk's CPU time here).
    let dirs: Vec<(PathBuf, Vec<OsString>)> = names
        .into_inner()
        .expect("walk poisoned")
        .into_iter()
        .collect();
    let total: usize = dirs.iter().map(|(_, n)| n.len()).sum();
    let mut listings = Vec::with_capacity(dirs.len());
    let mut bad = bad.into_inner().expect("walk poisoned");
    let per_thread = total.div_ceil(threads).max(1);
    let mut parts: Vec<&[(PathBuf, Vec<OsString>)]> = Vec::new();
    let (mut from, mut acc) = (0, 0);
    for (i, (_, n)) in dirs.iter().enumerate() {
        acc += n.len();
        if acc >= per_thread {
            parts.push(&dirs[from..=i]);
            (from, acc) = (i + 1, 0);
        }
    }
    if from < dirs.len() || parts.is_empty() {
        parts.push(&dirs[from..]);
    }
    std::thread::scope(|s| {
        let mut handles = Vec::new();
        for part in &parts[1..] {
            handles.push(s.spawn(|| stat_all(root, part)));
        }
        let (l, u) = stat_all(root, parts[0]);
        listings.extend(l);
        bad.extend(u);
        for h in handles {
            let (l, u) = h.join().expect("stat thread panicked");
            listings.extend(l);
            bad.extend(u);
        }
    });
    (listings, bad)
}

/// Threads of a whole-tree walk.
const WALK_THREADS: usize = 2;

/// `lstat`s every name in its directory.
fn stat_all(root: &Path, dirs: &[(PathBuf, Vec<OsString>)]) -> (Vec<Listing>, Vec<Unreadable>) {
    let mut listings = Vec::with_capacity(dirs.len());
    let mut bad = Vec::new();
    let mut unreadable = |p: &Path, e: &dyn std::fmt::Display| {
        bad.push(Unreadable {
            path: p.display().to_string(),
            reason: e.to_string(),
        })
    };
    for (dir, names) in dirs {
        let fd = match nix::fcntl::open(
            dir.as_path(),
            OFlag::O_PATH | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC,
            nix::sys::stat::Mode::empty(),
        ) {
            Ok(fd) => fd,
            Err(nix::errno::Errno::ENOENT | nix::errno::Errno::ENOTDIR) => continue,
            Err(e) => {
                unreadable(dir, &e);
                continue;
            }
        };
        let rel = match RelPath::from_fs(root, dir) {
            Ok(d) => d.to_string(),
            Err(_) if dir == root => String::new(),
            Err(e) => {
                unreadable(dir, &e);
                continue;
            }
        };
        // The room a name has: the path's length limit, less "dir/".
        let room = MAX_PATH_BYTES.saturating_sub(if rel.is_empty() { 0 } else { rel.len() + 1 });
        let mut entries = Vec::with_capacity(names.len());
        for name in names {
            let st = match fstatat(&fd, Path::new(name), AtFlags::AT_SYMLINK_NOFOLLOW) {
                Ok(st) => Stat::from_raw(&st),
                Err(nix::errno::Errno::ENOENT) => continue,
                Err(e) => {
                    unreadable(&dir.join(name), &e);
                    continue;
                }
            };
            if st.kind == FileKind::Other {
                continue;
            }
            // A listed name has no '/' or NUL and is not "." or "..": only
            // its encoding and the length are left to check.
            match name.to_str() {
                Some(n) if n.len() <= room => entries.push((n.to_owned(), st)),
                _ => {
                    // RelPath says why.
                    if let Err(e) = RelPath::from_fs(root, &dir.join(name)) {
                        unreadable(&dir.join(name), &e);
                    }
                }
            }
        }
        entries.sort_unstable_by(|a, b| a.0.cmp(&b.0));
        listings.push(Listing { dir: rel, entries });
    }
    (listings, bad)
}

fn is_not_found(e: &ignore::Error) -> bool {
    match e {
        ignore::Error::Io(io) => io.kind() == io::ErrorKind::NotFound,
        ignore::Error::WithPath { err, .. } | ignore::Error::WithDepth { err, .. } => {
            is_not_found(err)
        }
        ignore::Error::WithLineNumber { err, .. } => is_not_found(err),
        _ => false,
    }
}

/// Writes the daemon's extra ignore lines as `root/.git/info/exclude`, where the
/// walk reads them with the precedence git gives that file.
pub fn install_excludes(root: &Path, lines: &[String]) -> io::Result<()> {
    let info = root.join(".git").join("info");
    std::fs::create_dir_all(&info)?;
    let mut text = lines.join("\n");
    text.push('\n');
    let path = info.join("exclude");
    if std::fs::read_to_string(&path).ok().as_deref() != Some(text.as_str()) {
        std::fs::write(&path, text)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs;

    #[test]
    fn editor_temporaries() {
        for n in [
            "4913",
            "a.py~",
            ".a.py.swp",
            ".#a.py",
            "a.py___jb_tmp___",
            "a___jb_old___",
            ".git",
            ".bridge",
        ] {
            assert!(is_always_excluded(n), "{n}");
        }
        for n in ["a.py", "swp", "a.swp", ".gitignore", "4914", "#a#"] {
            assert!(!is_always_excluded(n), "{n}");
        }
    }

    #[test]
    fn git_semantics() {
        let d = tempfile::tempdir().unwrap();
        let r = d.path();
        fs::create_dir_all(r.join(".git/info")).unwrap();
        fs::write(r.join(".git/info/exclude"), "*.local\n").unwrap();
        fs::write(r.join(".gitignore"), "*.log\n!keep.log\nbuild/\n").unwrap();
        fs::create_dir_all(r.join("sub/build")).unwrap();
        fs::create_dir_all(r.join("build")).unwrap();
        fs::write(r.join("sub/.gitignore"), "secret\n").unwrap();
        fs::write(r.join(".bridgeignore"), "data/\n").unwrap();
        fs::create_dir_all(r.join("data")).unwrap();
        for f in [
            "a.log",
            "keep.log",
            "x.local",
            "sub/secret",
            "sub/ok",
            "build/o",
            "sub/build/o",
            "data/big",
            "main.py",
            "4913",
            ".#main.py",
        ] {
            fs::write(r.join(f), "x").unwrap();
        }
        let (found, bad) = walk(r, None, None, Side::Agent);
        assert!(bad.is_empty(), "{bad:?}");
        let names: Vec<_> = found.iter().map(|f| f.path.as_str()).collect();
        assert_eq!(
            names,
            [
                ".bridgeignore",
                ".gitignore",
                "keep.log",
                "main.py",
                "sub",
                "sub/.gitignore",
                "sub/ok"
            ]
        );
        // A walk of a subdirectory applies its parents' rules.
        let sub = RelPath::new("sub").unwrap();
        let (found, _) = walk(r, Some(&sub), Some(1), Side::Agent);
        let names: Vec<_> = found.iter().map(|f| f.path.as_str()).collect();
        assert_eq!(names, ["sub/.gitignore", "sub/ok"]);
    }
}

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

use std::fs::Metadata;
use std::io;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;
use std::sync::Mutex;

use crate::path::RelPath;

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

/// Walks `root/start` (the whole tree when `start` is `None`), down to
/// `max_depth` levels below `start`, returning every synced path. Ignore files
/// in `start`'s parents inside the tree apply as they would in a full walk.
pub fn walk(
    root: &Path,
    start: Option<&RelPath>,
    max_depth: Option<usize>,
    side: Side,
) -> (Vec<Found>, Vec<Unreadable>) {
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
        .threads(2)
        .filter_entry(|e| {
            e.file_name()
                .to_str()
                .is_none_or(|n| !is_always_excluded(n))
        });
    let found = Mutex::new(Vec::new());
    let bad = Mutex::new(Vec::new());
    let visit = |res: Result<ignore::DirEntry, ignore::Error>| {
        match res {
            Ok(e) if e.depth() == 0 => {}
            Ok(e) => match (RelPath::from_fs(root, e.path()), e.metadata()) {
                (Ok(path), Ok(m)) => {
                    let stat = Stat::from_metadata(&m);
                    if stat.kind != FileKind::Other {
                        found
                            .lock()
                            .expect("walk poisoned")
                            .push(Found { path, stat });
                    }
                }
                (Err(err), _) => bad.lock().expect("walk poisoned").push(Unreadable {
                    path: e.path().display().to_string(),
                    reason: err.to_string(),
                }),
                (_, Err(err)) => bad.lock().expect("walk poisoned").push(Unreadable {
                    path: e.path().display().to_string(),
                    reason: err.to_string(),
                }),
            },
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
    if max_depth.is_some() {
        // One directory level (the watcher's common case): no threads.
        for res in b.build() {
            visit(res);
        }
    } else {
        b.build_parallel().run(|| Box::new(&visit));
    }
    let mut found = found.into_inner().expect("walk poisoned");
    found.sort_unstable_by(|a, b| a.path.cmp(&b.path));
    (found, bad.into_inner().expect("walk poisoned"))
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

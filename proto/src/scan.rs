//! Which paths are synced, and the directory walk both sides use.
//!
//! The synced set is the tree minus git's ignore rules with git's semantics —
//! nested `.gitignore`, `.git/info/exclude`, `core.excludesFile` (daemon side),
//! negations — plus `.bridgeignore` files in the same syntax, minus `.git/`,
//! `.bridge/` and editor temporaries. [`Rules`] applies them as the `ignore`
//! crate does (with its matchers); ignored directories are pruned before they
//! are read, so a 200k-file `.venv` costs neither a stat nor a watch.
//!
//! The agent walks its mirror with the same rules. It has no `core.excludesFile`;
//! the daemon sends those lines and the agent writes them into the mirror's
//! `.git/info/exclude` (see [`install_excludes`]), which also makes the mirror
//! a "git repository" for the rules exactly like the local tree.

use std::collections::HashMap;
use std::ffi::{CStr, OsStr};
use std::fs::Metadata;
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Condvar, Mutex};

use ignore::Match;
use ignore::gitignore::{Gitignore, GitignoreBuilder};
use nix::dir::{Dir, Type};
use nix::errno::Errno;
use nix::fcntl::{AtFlags, OFlag};
use nix::sys::stat::{FileStat, fstatat};

use crate::path::{MAX_PATH_BYTES, PathError, RelPath};

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
    walk_cached(root, start, max_depth, side, &mut RuleCache::default())
}

/// The ignore rules that apply above a walk's start: the user's global
/// excludes file (git's configuration, read for every walk on the daemon's
/// side) and each start directory's ancestors' ignore files, kept between
/// walks. A partial rescan (one directory after an edit) read them all again
/// each time: two thirds of its time, 1.3 ms of an edit's latency (strace,
/// issue 25). Whoever keeps one clears it when an ignore file may have
/// changed (the daemon: on any whole-subtree rescan, which an ignore file's
/// change causes).
#[derive(Default)]
pub struct RuleCache {
    global: Option<Gitignore>,
    above: HashMap<PathBuf, Arc<Rules>>,
}

impl RuleCache {
    /// Forgets every rule read: the next walk reads them again.
    pub fn clear(&mut self) {
        self.global = None;
        self.above.clear();
    }
}

/// [`walk`], reusing (and filling) `cache`'s rules from above the start.
pub fn walk_cached(
    root: &Path,
    start: Option<&RelPath>,
    max_depth: Option<usize>,
    side: Side,
    cache: &mut RuleCache,
) -> (Vec<Found>, Vec<Unreadable>) {
    let (listings, bad) = walk_listings_cached(root, start, max_depth, side, cache);
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
///
/// Each directory is read once (`getdents`), its ignore files compiled if
/// it has any, and each entry that is not ignored `lstat`ed relative to the
/// directory; directories are shared out to [`WALK_THREADS`] threads. The
/// rules are git's as the `ignore` crate applies them ([`Rules`]), which
/// this walk replaced: its walker made a path, a directory entry and an
/// ignore-matcher level per entry, two thirds of a 200,000-file walk.
pub fn walk_listings(
    root: &Path,
    start: Option<&RelPath>,
    max_depth: Option<usize>,
    side: Side,
) -> (Vec<Listing>, Vec<Unreadable>) {
    walk_listings_cached(root, start, max_depth, side, &mut RuleCache::default())
}

fn walk_listings_cached(
    root: &Path,
    start: Option<&RelPath>,
    max_depth: Option<usize>,
    side: Side,
    cache: &mut RuleCache,
) -> (Vec<Listing>, Vec<Unreadable>) {
    let mut bad = Vec::new();
    let base = start
        .map(|s| s.to_fs(root))
        .unwrap_or_else(|| root.to_path_buf());
    // Every rule's directory and every path matched against it in one form.
    let Ok(base) = base.canonicalize() else {
        return (Vec::new(), bad);
    };
    let global = if side == Side::Daemon {
        match &cache.global {
            Some(g) => g.clone(),
            None => {
                let root = root.canonicalize().unwrap_or_else(|_| root.to_path_buf());
                let (g, err) = GitignoreBuilder::new(&root).build_global();
                note_rule_error(&mut bad, &root, err);
                cache.global.insert(g).clone()
            }
        }
    } else {
        Gitignore::empty()
    };
    let above = match cache.above.get(&base) {
        Some(r) => r.clone(),
        None => {
            let r = Rules::above(&base, &mut bad);
            cache.above.insert(base.clone(), r.clone());
            r
        }
    };
    let walk = Walk {
        global,
        max_depth,
        state: Mutex::new(Queue {
            jobs: vec![Job {
                rel: start.map(|s| s.to_string()).unwrap_or_default(),
                rules: above,
                depth: 0,
                abs: base,
            }],
            active: 0,
        }),
        more: Condvar::new(),
        out: Mutex::new((Vec::new(), bad)),
    };
    let threads = if max_depth.is_some() { 1 } else { WALK_THREADS };
    std::thread::scope(|s| {
        for _ in 1..threads {
            s.spawn(|| walk.work());
        }
        walk.work();
    });
    walk.out.into_inner().expect("walk poisoned")
}

/// Threads of a whole-tree walk.
const WALK_THREADS: usize = 2;

/// One directory to read.
struct Job {
    abs: PathBuf,
    /// Relative to the root ("" for the root).
    rel: String,
    /// The rules of its parent.
    rules: Arc<Rules>,
    /// Levels below the walk's start (0: the start).
    depth: usize,
}

struct Queue {
    jobs: Vec<Job>,
    /// Jobs taken and not finished (they may add more).
    active: usize,
}

struct Walk {
    global: Gitignore,
    max_depth: Option<usize>,
    state: Mutex<Queue>,
    more: Condvar,
    out: Mutex<(Vec<Listing>, Vec<Unreadable>)>,
}

impl Walk {
    fn work(&self) {
        while let Some(job) = self.next() {
            let mut bad = Vec::new();
            let (listing, subdirs) = self.read(job, &mut bad);
            if listing.is_some() || !bad.is_empty() {
                let mut out = self.out.lock().expect("walk poisoned");
                out.0.extend(listing);
                out.1.append(&mut bad);
            }
            let mut q = self.state.lock().expect("walk poisoned");
            q.jobs.extend(subdirs);
            q.active -= 1;
            if !q.jobs.is_empty() || q.active == 0 {
                self.more.notify_all();
            }
        }
    }

    /// The next directory, waiting while others may still add some; None
    /// once all are read.
    fn next(&self) -> Option<Job> {
        let mut q = self.state.lock().expect("walk poisoned");
        loop {
            if let Some(j) = q.jobs.pop() {
                q.active += 1;
                return Some(j);
            }
            if q.active == 0 {
                return None;
            }
            q = self.more.wait(q).expect("walk poisoned");
        }
    }

    /// Reads one directory: its listing (None if it is gone or holds
    /// nothing synced) and the subdirectories to read next.
    fn read(&self, job: Job, bad: &mut Vec<Unreadable>) -> (Option<Listing>, Vec<Job>) {
        let mut dir = match Dir::open(
            job.abs.as_path(),
            OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC,
            nix::sys::stat::Mode::empty(),
        ) {
            Ok(d) => d,
            Err(Errno::ENOENT | Errno::ENOTDIR) => return (None, Vec::new()),
            Err(e) => {
                unreadable(bad, &job.abs, &e);
                return (None, Vec::new());
            }
        };
        // The names, NUL-terminated in one buffer, with their types.
        let mut names: Vec<u8> = Vec::with_capacity(4096);
        let mut found: Vec<(usize, usize, Option<Type>)> = Vec::new();
        for e in dir.iter() {
            let e = match e {
                Ok(e) => e,
                Err(err) => {
                    unreadable(bad, &job.abs, &err);
                    break;
                }
            };
            let name = e.file_name().to_bytes();
            if name == b"." || name == b".." {
                continue;
            }
            if std::str::from_utf8(name).is_ok_and(is_always_excluded) {
                // `.git` still marks a repository.
                if name == b".git" {
                    found.push((usize::MAX, 0, None));
                }
                continue;
            }
            found.push((names.len(), name.len(), e.file_type()));
            names.extend_from_slice(name);
            names.push(0);
        }
        let has_git = found.iter().any(|f| f.0 == usize::MAX);
        found.retain(|f| f.0 != usize::MAX);
        let name_of =
            |&(at, len, _): &(usize, usize, Option<Type>)| -> &[u8] { &names[at..at + len] };
        let rules = Rules::child(
            &job.rules,
            &job.abs,
            has_git,
            |n| found.iter().any(|f| name_of(f) == n.as_bytes()),
            bad,
        );
        let matching = rules.any_rule || (rules.any_git && !self.global.is_empty());
        let descend = self.max_depth.is_none_or(|m| job.depth + 1 < m);
        let room = MAX_PATH_BYTES.saturating_sub(if job.rel.is_empty() {
            0
        } else {
            job.rel.len() + 1
        });
        let mut path = job.abs.clone();
        let mut entries = Vec::with_capacity(found.len());
        let mut subdirs = Vec::new();
        for f in &found {
            let bytes = name_of(f);
            let name = OsStr::from_bytes(bytes);
            let c_name =
                CStr::from_bytes_with_nul(&names[f.0..=f.0 + f.1]).expect("one NUL, at the end");
            // The listing's type spares an `lstat` of what the rules leave out.
            let mut st = None;
            let is_dir = match f.2 {
                Some(t) => t == Type::Directory,
                None => match lstat_at(&dir, c_name, &job.abs, bad) {
                    Some(s) => {
                        st = Some(s);
                        s.kind == FileKind::Dir
                    }
                    None => continue,
                },
            };
            if matching {
                path.push(name);
                let ignored = rules.ignored(&self.global, &path, is_dir);
                path.pop();
                if ignored {
                    continue;
                }
            }
            let Some(st) = st.or_else(|| lstat_at(&dir, c_name, &job.abs, bad)) else {
                continue;
            };
            if st.kind == FileKind::Other {
                continue;
            }
            // A listed name has no '/' or NUL and is not "." or "..": only
            // its encoding and the length are left to check.
            let name = match std::str::from_utf8(bytes) {
                Ok(n) if n.len() <= room => n,
                other => {
                    let p = job.abs.join(name);
                    let e = match other {
                        Err(_) => PathError::NotUtf8(p.to_string_lossy().into_owned()),
                        Ok(n) => PathError::TooLong(format!("{}/{n}", job.rel)),
                    };
                    unreadable(bad, &p, &e);
                    continue;
                }
            };
            if st.kind == FileKind::Dir && descend {
                subdirs.push(Job {
                    abs: job.abs.join(name),
                    rel: if job.rel.is_empty() {
                        name.to_owned()
                    } else {
                        format!("{}/{name}", job.rel)
                    },
                    rules: rules.clone(),
                    depth: job.depth + 1,
                });
            }
            entries.push((name.to_owned(), st));
        }
        if entries.is_empty() {
            return (None, subdirs);
        }
        entries.sort_unstable_by(|a, b| a.0.cmp(&b.0));
        let listing = Listing {
            dir: job.rel,
            entries,
        };
        (Some(listing), subdirs)
    }
}

/// `lstat` of the entry `name` of the open directory `dir` (at `abs`):
/// `None` when it is gone, or unreadable (noted in `bad`).
fn lstat_at(dir: &Dir, name: &CStr, abs: &Path, bad: &mut Vec<Unreadable>) -> Option<Stat> {
    match fstatat(dir, name, AtFlags::AT_SYMLINK_NOFOLLOW) {
        Ok(s) => Some(Stat::from_raw(&s)),
        Err(Errno::ENOENT) => None,
        Err(e) => {
            unreadable(bad, &abs.join(OsStr::from_bytes(name.to_bytes())), &e);
            None
        }
    }
}

fn unreadable(bad: &mut Vec<Unreadable>, p: &Path, e: &dyn std::fmt::Display) {
    bad.push(Unreadable {
        path: p.display().to_string(),
        reason: e.to_string(),
    });
}

/// An ignore file that could not be used whole (a bad glob, say); one that
/// cannot be read counts as absent, as for git.
fn note_rule_error(bad: &mut Vec<Unreadable>, file: &Path, err: Option<ignore::Error>) {
    if let Some(e) = err.filter(|e| !e.is_io()) {
        unreadable(bad, file, &e);
    }
}

/// The ignore rules in force in one directory: its own ignore files and
/// those of every directory above it, up to `/` (as git, and the `ignore`
/// crate bridge used before, read them). A directory with no ignore file
/// and no repository of its own shares its parent's rules.
///
/// Precedence, from the `ignore` crate: `.bridgeignore` files first (the
/// innermost that has a match decides), then `.gitignore`, then a
/// repository's `info/exclude`, then the user's `core.excludesFile`
/// (daemon); git's files count only inside a repository (a `.git` or `.jj`
/// in the directory or above), and only up to the innermost repository's
/// root.
struct Rules {
    parent: Option<Arc<Rules>>,
    /// `.bridgeignore`.
    custom: Gitignore,
    /// `.gitignore`.
    git: Gitignore,
    /// `info/exclude` of a repository rooted here.
    exclude: Gitignore,
    /// A repository is rooted here.
    has_git: bool,
    /// Some level holds a rule.
    any_rule: bool,
    /// Some level holds a repository.
    any_git: bool,
}

impl Rules {
    /// The rules of the directories above `dir` (canonical).
    fn above(dir: &Path, bad: &mut Vec<Unreadable>) -> Arc<Rules> {
        let mut rules = Arc::new(Rules {
            parent: None,
            custom: Gitignore::empty(),
            git: Gitignore::empty(),
            exclude: Gitignore::empty(),
            has_git: false,
            any_rule: false,
            any_git: false,
        });
        let mut parents: Vec<&Path> = dir.ancestors().skip(1).collect();
        parents.reverse();
        for p in parents {
            let has_git = p.join(".git").exists();
            rules = Rules::child(&rules, p, has_git, |n| p.join(n).exists(), bad);
        }
        rules
    }

    /// The rules of `dir`, whose parent has `parent`; `has_git`: it lists a
    /// `.git`; `has_file(name)`: it lists an entry of that name.
    fn child(
        parent: &Arc<Rules>,
        dir: &Path,
        has_git: bool,
        has_file: impl Fn(&str) -> bool,
        bad: &mut Vec<Unreadable>,
    ) -> Arc<Rules> {
        let has_git = (has_git && dir.join(".git").metadata().is_ok())
            || (has_file(".jj") && dir.join(".jj").exists());
        let custom = has_file(BRIDGEIGNORE);
        let git = has_file(".gitignore");
        if !has_git && !custom && !git {
            return parent.clone();
        }
        let mut matcher = |root: &Path, file: Option<PathBuf>| match file {
            None => Gitignore::empty(),
            Some(f) => {
                let mut b = GitignoreBuilder::new(root);
                let err = b.add(&f);
                note_rule_error(bad, &f, err);
                match b.build() {
                    Ok(g) => g,
                    Err(e) => {
                        unreadable(bad, &f, &e);
                        Gitignore::empty()
                    }
                }
            }
        };
        let custom = matcher(dir, custom.then(|| dir.join(BRIDGEIGNORE)));
        let git = matcher(dir, git.then(|| dir.join(".gitignore")));
        let exclude = matcher(
            dir,
            has_git
                .then(|| git_common_dir(dir))
                .flatten()
                .map(|d| d.join("info/exclude"))
                .filter(|f| f.exists()),
        );
        let any_rule =
            parent.any_rule || !custom.is_empty() || !git.is_empty() || !exclude.is_empty();
        Arc::new(Rules {
            parent: Some(parent.clone()),
            custom,
            git,
            exclude,
            has_git,
            any_rule,
            any_git: parent.any_git || has_git,
        })
    }

    /// True when the rules leave `path` (absolute) out.
    fn ignored(&self, global: &Gitignore, path: &Path, is_dir: bool) -> bool {
        let (mut custom, mut git, mut exclude) = (Match::None, Match::None, Match::None);
        let mut saw_git = false;
        let mut level = Some(self);
        while let Some(l) = level {
            if custom.is_none() {
                custom = l.custom.matched(path, is_dir);
            }
            if self.any_git && !saw_git {
                if git.is_none() {
                    git = l.git.matched(path, is_dir);
                }
                if exclude.is_none() {
                    exclude = l.exclude.matched(path, is_dir);
                }
            }
            saw_git |= l.has_git;
            level = l.parent.as_deref();
        }
        let global = if self.any_git {
            global.matched(path, is_dir)
        } else {
            Match::None
        };
        custom.or(git).or(exclude).or(global).is_ignore()
    }
}

/// The directory holding a repository's `info/exclude`: `.git`, or for a
/// worktree (a `.git` file), its common directory.
fn git_common_dir(dir: &Path) -> Option<PathBuf> {
    let dot_git = dir.join(".git");
    if dot_git.is_dir() {
        return Some(dot_git);
    }
    let text = std::fs::read_to_string(&dot_git).ok()?;
    let git_dir = dir.join(text.lines().next()?.strip_prefix("gitdir: ")?);
    let common = std::fs::read_to_string(git_dir.join("commondir")).ok()?;
    Some(git_dir.join(common.lines().next()?))
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

    // The walk bridge used before its own: the `ignore` crate's walker,
    // then a stat per name. The test below holds the two to the same
    // result.
    use std::collections::HashMap;
    use std::ffi::OsString;

    /// [`walk`], by directory (in no particular order): what a caller that
    /// builds a tree of per-directory lists needs, without a path per entry.
    fn crate_walk_listings(
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
                    if !crate_is_not_found(&err) {
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
                handles.push(s.spawn(|| crate_stat_all(root, part)));
            }
            let (l, u) = crate_stat_all(root, parts[0]);
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

    /// `lstat`s every name in its directory.
    fn crate_stat_all(
        root: &Path,
        dirs: &[(PathBuf, Vec<OsString>)],
    ) -> (Vec<Listing>, Vec<Unreadable>) {
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
                OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC,
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
            let room =
                MAX_PATH_BYTES.saturating_sub(if rel.is_empty() { 0 } else { rel.len() + 1 });
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

    fn crate_is_not_found(e: &ignore::Error) -> bool {
        match e {
            ignore::Error::Io(io) => io.kind() == io::ErrorKind::NotFound,
            ignore::Error::WithPath { err, .. } | ignore::Error::WithDepth { err, .. } => {
                crate_is_not_found(err)
            }
            ignore::Error::WithLineNumber { err, .. } => crate_is_not_found(err),
            _ => false,
        }
    }

    /// Each directory with its entries' names, kinds and sizes.
    type Seen = Vec<(String, Vec<(String, FileKind, u64)>)>;

    fn sorted(mut l: Vec<Listing>) -> Seen {
        l.sort_by(|a, b| a.dir.cmp(&b.dir));
        l.into_iter()
            .map(|l| {
                (
                    l.dir,
                    l.entries
                        .into_iter()
                        .map(|(n, s)| (n, s.kind, s.size))
                        .collect(),
                )
            })
            .collect()
    }

    #[test]
    fn the_walk_applies_the_rules_as_the_ignore_crate_does() {
        let d = tempfile::tempdir().unwrap();
        let top = d.path();
        // Rules outside the repository: a .bridgeignore above it counts,
        // a .gitignore above it does not (the repository's root stops git's).
        fs::write(top.join(BRIDGEIGNORE), "*.above\n").unwrap();
        fs::write(top.join(".gitignore"), "*.py\n").unwrap();
        let r = &top.join("repo");
        let files = [
            (".git/info/exclude", "*.local\n/anchored.txt\n"),
            (
                ".gitignore",
                "*.log\n!keep.log\nbuild/\n/top-only\n**/deep/*.bin\nsub/*.x\n!keep.me\n*.tmp\n",
            ),
            (BRIDGEIGNORE, "data/\nkeep.me\n!wanted.log\n"),
            ("a.log", "x"),
            ("keep.log", "x"),
            ("wanted.log", "x"),
            ("keep.me", "x"),
            ("x.local", "x"),
            ("anchored.txt", "x"),
            ("sub/anchored.txt", "x"),
            ("top-only", "x"),
            ("sub/top-only", "x"),
            ("build/o", "x"),
            ("sub/build/o", "x"),
            ("lib/build", "a file named build"),
            ("a/b/deep/w.bin", "x"),
            ("a/b/deep/w.txt", "x"),
            ("sub/f.x", "x"),
            ("sub/inner/f.x", "x"),
            ("sub/.gitignore", "secret\n!*.tmp\n"),
            ("sub/secret", "x"),
            ("sub/t.tmp", "x"),
            ("t.tmp", "x"),
            ("data/big", "x"),
            ("main.py", "x"),
            ("x.above", "x"),
            ("nested/.git/info/exclude", "*.nested\n"),
            ("nested/.gitignore", "*.n\n"),
            (
                "nested/a.log",
                "the parent's *.log stops at this repository",
            ),
            ("nested/b.n", "x"),
            ("nested/c.nested", "x"),
            ("nested/x.above", "x"),
            ("nested/bad/.gitignore", "[unclosed\nok-glob\n"),
            ("nested/bad/ok-glob", "x"),
            ("4913", "x"),
            ("sub/.#f", "x"),
            ("ünï cødé", "x"),
        ];
        for (f, body) in files {
            let p = r.join(f);
            fs::create_dir_all(p.parent().unwrap()).unwrap();
            fs::write(p, body).unwrap();
        }
        fs::create_dir_all(r.join("empty")).unwrap();
        std::os::unix::fs::symlink("main.py", r.join("link")).unwrap();
        let sub = RelPath::new("sub").unwrap();
        let cases: [(Option<&RelPath>, Option<usize>, Side); 5] = [
            (None, None, Side::Agent),
            (None, None, Side::Daemon),
            (None, Some(1), Side::Agent),
            (Some(&sub), Some(1), Side::Agent),
            (Some(&sub), None, Side::Agent),
        ];
        for (start, depth, side) in cases {
            let (new, new_bad) = walk_listings(r, start, depth, side);
            let (old, old_bad) = crate_walk_listings(r, start, depth, side);
            assert_eq!(sorted(new), sorted(old), "{start:?} {depth:?} {side:?}");
            // The same errors (the bad glob), with the file they are in.
            assert_eq!(new_bad.len(), old_bad.len(), "{new_bad:?} {old_bad:?}");
        }
        let (all, _) = walk(r, None, None, Side::Agent);
        let all: Vec<_> = all.iter().map(|f| f.path.as_str()).collect();
        for p in [
            "wanted.log",
            "keep.log",
            "sub/t.tmp",
            "nested/a.log",
            "lib/build",
            "a/b/deep/w.txt",
        ] {
            assert!(all.contains(&p), "{p} missing from {all:?}");
        }
        for p in [
            "keep.me",
            "anchored.txt",
            "sub/top-only",
            "sub/inner/f.x",
            "nested/b.n",
            "nested/x.above",
        ] {
            assert_eq!(all.contains(&p), p.starts_with("sub/"), "{p} in {all:?}");
        }

        // Without a repository git's files are not rules; ours are.
        fs::remove_dir_all(r.join(".git")).unwrap();
        fs::remove_dir_all(r.join("nested")).unwrap();
        let (new, _) = walk_listings(r, None, None, Side::Agent);
        let (old, _) = crate_walk_listings(r, None, None, Side::Agent);
        let new = sorted(new);
        assert_eq!(new, sorted(old));
        let top_names: Vec<&str> = new[0].1.iter().map(|e| e.0.as_str()).collect();
        assert!(
            top_names.contains(&"a.log") && !top_names.contains(&"keep.me"),
            "{top_names:?}"
        );
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

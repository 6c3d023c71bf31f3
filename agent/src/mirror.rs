//! One mirror: a directory under `mirrors/` kept identical to a daemon's tree.
//!
//! The mirror's [`Tree`] is the agent's own view, derived from disk: a refresh
//! walks the mirror with the same ignore rules as the daemon and rehashes only
//! files whose `lstat` changed since the stat cache saw them. The stat cache
//! lives in the tree, beside each entry ([`Tree::hashed`]), as in the daemon:
//! one packed entry per file, a chunk list only for files of two chunks or
//! more. Paths the agent writes itself are recorded as written, without a
//! rehash.
//! Between refreshes an inotify watch ([`MirrorWatch`]) lets a verification
//! look only at the paths something touched ([`Mirror::verify`]).

use std::collections::{BTreeSet, HashMap, HashSet};
use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bridge_proto::index::{Cached, HashOutcome, Index, Saver, encode_tree, hash_file_after};
use bridge_proto::path::RelPath;
use bridge_proto::scan::{self, FileKind, Side, Stat};
use bridge_proto::tree::{Node, Tree};

use crate::store::Store;
use crate::watch::MirrorWatch;

/// How long the agent may keep index updates only in memory. A crash loses at
/// most this much of the cache (the cost is a rehash, never a wrong answer);
/// encoding happens inside a round, so it should not happen often.
const INDEX_SAVE_INTERVAL: Duration = Duration::from_secs(30);

pub struct Mirror {
    pub name: String,
    /// The mirror directory.
    pub root: PathBuf,
    saver: Saver,
    /// What is synced in the mirror right now, with the stat cache (and
    /// chunk lists) of its files.
    pub tree: Tree,
    /// Stat cache changes not yet on disk.
    index_dirty: bool,
    last_save: Instant,
    /// Files hashed by refreshes since start (observability, tests).
    pub files_hashed: u64,
    /// Full refreshes (walks of the whole mirror) since start.
    pub refreshes: u64,
    /// Directories the daemon removed that still hold ignored paths: kept on
    /// disk, left out of the synced view while nothing synced is inside.
    retained: BTreeSet<RelPath>,
    retained_path: PathBuf,
    /// Stats of mirror files whose ctime a job snapshot's link or unlink
    /// moved, from threads without the state lock; applied before the next
    /// refresh compares stats (see [`Mirror::relinked`]).
    pub relinks: RelinkQueue,
    /// Paths touched since the last refresh.
    watch: MirrorWatch,
}

/// See [`Mirror::relinks`].
pub type RelinkQueue = Arc<std::sync::Mutex<Vec<(RelPath, Stat)>>>;

/// True when `queued` (a file's stat after a snapshot's link or unlink) is
/// `st`, and differs from the cached `c` only in what a link moves.
fn explains(c: &Cached, queued: &Stat, st: &Stat) -> bool {
    !c.racy
        && queued == st
        && c.ino == st.ino
        && c.size == st.size
        && c.mtime_ns == st.mtime_ns
        && c.exec == st.exec
}

/// Past this many queued relinks per file of the mirror, a verification
/// applies them even when it has nothing to look at.
const RELINKS_PER_FILE: usize = 4;

/// Mirror names are one path component of safe characters.
pub fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 128
        && name != "."
        && name != ".."
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b))
}

/// The tree root of `dir` as a mirror holding the same files would have it
/// (hex): a mirror is a repository root, so no ignore file above `dir`
/// applies. Computed on a copy made of hard links (beside `dir`, on its
/// file system), with its `.git`, removed after.
pub fn tree_root(dir: &Path) -> io::Result<String> {
    let dir = dir.canonicalize()?;
    let parent = dir.parent().unwrap_or(Path::new("/"));
    let scratch = parent.join(format!(".bridge-tree-root-{}", std::process::id()));
    let root = (|| {
        let tree = scratch.join("mirrors/tree");
        link_copy(&dir, &tree)?;
        fs::create_dir_all(tree.join(".git"))?;
        let mut store = Store::open(&scratch.join("store"), 0)?;
        let m = Mirror::open(&scratch, "tree", &mut store)?;
        Ok(bridge_proto::tree::hex(&m.tree.root()))
    })();
    let _ = fs::remove_dir_all(&scratch);
    root
}

/// Copies the tree `from` to `to` (new) with hard links for files, links
/// as links.
fn link_copy(from: &Path, to: &Path) -> io::Result<()> {
    fs::create_dir_all(to)?;
    for e in fs::read_dir(from)? {
        let e = e?;
        let (src, dst) = (e.path(), to.join(e.file_name()));
        let t = e.file_type()?;
        if t.is_dir() {
            link_copy(&src, &dst)?;
        } else if t.is_symlink() {
            std::os::unix::fs::symlink(fs::read_link(&src)?, &dst)?;
        } else {
            fs::hard_link(&src, &dst)?;
        }
    }
    Ok(())
}

impl Mirror {
    pub fn open(agent_root: &Path, name: &str, store: &mut Store) -> io::Result<Mirror> {
        let root = agent_root.join("mirrors").join(name);
        fs::create_dir_all(&root)?;
        let state = agent_root.join("state");
        fs::create_dir_all(&state)?;
        let index_path = state.join(format!("{name}.index"));
        let retained_path = state.join(format!("{name}.retained"));
        let retained = fs::read_to_string(&retained_path)
            .unwrap_or_default()
            .lines()
            .filter_map(|l| RelPath::new(l).ok())
            .collect();
        let prior = Index::load_tree(&index_path);
        let mut m = Mirror {
            name: name.to_string(),
            watch: MirrorWatch::new(&root),
            root,
            saver: Saver::new(index_path),
            // Files only, from the saved stat cache: the first refresh
            // makes the tree.
            tree: prior,
            index_dirty: false,
            last_save: Instant::now(),
            files_hashed: 0,
            refreshes: 0,
            retained,
            retained_path,
            relinks: Default::default(),
        };
        m.refresh(store)?;
        Ok(m)
    }

    /// Installs the daemon's extra ignore lines; a change rescans.
    pub fn set_excludes(&mut self, lines: &[String], store: &mut Store) -> io::Result<()> {
        let path = self.root.join(".git/info/exclude");
        let before = fs::read_to_string(&path).ok();
        scan::install_excludes(&self.root, lines)?;
        if fs::read_to_string(&path).ok() != before {
            self.refresh(store)?;
        }
        Ok(())
    }

    /// Makes the tree the mirror's as it is on disk now. With `trust_watch`
    /// (no job can write mirror files through its snapshot's hard links)
    /// and a watch that saw everything since the last refresh, only the paths
    /// it reported are looked at; otherwise, or when one of them is not what
    /// the agent recorded, the whole mirror is walked ([`Mirror::refresh`]).
    pub fn verify(&mut self, store: &mut Store, trust_watch: bool) -> io::Result<()> {
        if trust_watch && self.watch.usable() {
            let t0 = Instant::now();
            if let Some(looked) = self.catch_up() {
                tracing::debug!(
                    ms = t0.elapsed().as_secs_f64() * 1e3,
                    looked,
                    "mirror verified by its watch"
                );
                return Ok(());
            }
        }
        self.refresh(store)
    }

    /// Looks at every path the watch reported (and, for a directory, at each
    /// entry in it and in the tree). Returns how many paths it looked at when
    /// all are as recorded; `None` when one is not, or events were lost.
    fn catch_up(&mut self) -> Option<usize> {
        if !self.watch.flush() {
            return None;
        }
        let mut work: Vec<PathBuf> = self.watch.take()?.into_iter().collect();
        // The ctimes a job snapshot's links and unlinks moved matter only to
        // the stats looked at: with none (a `bridge run` after another), they
        // wait for a quiet moment (`apply_relinks`) instead of delaying the
        // submit this verification is for.
        let queued = self.relinks.lock().unwrap_or_else(|e| e.into_inner()).len();
        if !work.is_empty() || queued > RELINKS_PER_FILE * self.tree.len() {
            self.apply_relinks();
        }
        let mut seen = HashSet::new();
        while let Some(p) = work.pop() {
            if !seen.insert(p.clone()) {
                continue;
            }
            if !self.as_recorded(&p, &mut work) {
                tracing::debug!(path = %p.display(), "mirror changed outside the agent's rounds");
                return None;
            }
        }
        Some(seen.len())
    }

    /// True when `abs` on disk is what the tree and stat cache say; for a
    /// directory, (re)watches it and queues its entries on disk and in the
    /// tree (a directory watched late may have changed unseen).
    fn as_recorded(&mut self, abs: &Path, work: &mut Vec<PathBuf>) -> bool {
        let rel = if abs == self.root {
            None
        } else {
            match RelPath::from_fs(&self.root, abs) {
                Ok(r) if r.as_str().split('/').any(scan::is_always_excluded) => return true,
                // New rules change which paths are synced: only a walk
                // applies them.
                Ok(r) if scan::is_ignore_file(r.name()) => return false,
                Ok(r) => Some(r),
                Err(_) => return false,
            }
        };
        let node = match &rel {
            Some(r) => self.tree.get(r),
            None => Some(Node::Dir),
        };
        let st = match Stat::lstat(abs) {
            Ok(st) => st,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return node.is_none(),
            Err(_) => return false,
        };
        match (st.kind, node) {
            (FileKind::File, Some(Node::File { .. })) => rel
                .and_then(|r| self.tree.hashed(&r))
                .is_some_and(|c| c.matches(&st)),
            (FileKind::Symlink, Some(Node::Symlink { target })) => {
                fs::read_link(abs).is_ok_and(|t| t.to_string_lossy() == target)
            }
            (FileKind::Dir, Some(Node::Dir)) => {
                if !self.watch.watch(abs) {
                    return false;
                }
                let Ok(entries) = fs::read_dir(abs) else {
                    return false;
                };
                for e in entries {
                    match e {
                        Ok(e) => work.push(e.path()),
                        Err(_) => return false,
                    }
                }
                work.extend(
                    self.tree
                        .children(rel.as_ref())
                        .into_iter()
                        .map(|(p, _)| p.to_fs(&self.root)),
                );
                true
            }
            // Sockets and fifos are never synced.
            (FileKind::Other, None) => true,
            _ => false,
        }
    }

    /// Rebuilds the tree from disk, rehashing only changed files (the
    /// previous tree's stat cache vouches for the others).
    pub fn refresh(&mut self, store: &mut Store) -> io::Result<()> {
        let t0 = Instant::now();
        let hashed_before = self.files_hashed;
        self.refreshes += 1;
        // What the walk sees covers everything touched until now.
        let _ = self.watch.take();
        self.apply_relinks();
        let mut late = HashMap::new();
        let (found, unreadable) = scan::walk(&self.root, None, None, Side::Agent);
        for u in unreadable {
            tracing::warn!(path = %u.path, reason = %u.reason, "unreadable path in mirror");
        }
        let prior = std::mem::take(&mut self.tree);
        store.clear_wholes();
        let mut tree = Tree::new();
        let mut reused = 0u64;
        for f in found {
            match f.stat.kind {
                FileKind::Dir => {
                    tree.insert(f.path, Node::Dir);
                }
                FileKind::Symlink => {
                    if let Ok(t) = fs::read_link(f.path.to_fs(&self.root)) {
                        let target = t.to_string_lossy().into_owned();
                        tree.insert(f.path, Node::Symlink { target });
                    }
                }
                FileKind::File => {
                    let cached = match prior.hashed(&f.path).map(|h| h.to_cached()) {
                        Some(c) if c.matches(&f.stat) => {
                            reused += 1;
                            Some(c)
                        }
                        Some(mut c) if self.relinked_meanwhile(&mut late, &f.path, &c, &f.stat) => {
                            reused += 1;
                            c.ctime_ns = f.stat.ctime_ns;
                            self.index_dirty = true;
                            Some(c)
                        }
                        other => {
                            tracing::trace!(
                                path = %f.path,
                                why = match &other {
                                    None => "new",
                                    Some(c) if c.racy => "racy",
                                    Some(c) if c.ctime_ns != f.stat.ctime_ns => "ctime",
                                    Some(_) => "changed",
                                },
                                "rehash"
                            );
                            let p = f.path.to_fs(&self.root);
                            let before = prior.hashed(&f.path).map(|h| h.chunks());
                            match hash_file_after(
                                &p,
                                3,
                                before.as_deref().unwrap_or(&[]),
                                |_, _| {},
                            ) {
                                Ok(HashOutcome::Hashed(st, d, started)) => {
                                    self.files_hashed += 1;
                                    self.index_dirty = true;
                                    Some(Cached::hashed_since(&st, d, started))
                                }
                                Ok(HashOutcome::Vanished) => None,
                                Err(e) => {
                                    tracing::warn!(path = %p.display(), error = %e, "cannot hash mirror file");
                                    None
                                }
                            }
                        }
                    };
                    if let Some(c) = cached {
                        store.index_mirror_file(&f.path.to_fs(&self.root), &c.chunks);
                        tree.insert_hashed(f.path, c);
                    }
                }
                FileKind::Other => {}
            }
        }
        // Files of the cache that are gone, or were never hashed.
        if reused != prior.files() {
            self.index_dirty = true;
        }
        drop(prior);
        // Retained directories stay out of the view while nothing synced is
        // inside (deepest first, so nested retained directories go first).
        let before = self.retained.len();
        for d in self.retained.clone().iter().rev() {
            match tree.get(d) {
                Some(Node::Dir) if tree.descendants(Some(d)).next().is_none() => {
                    tree.remove_subtree(d);
                }
                _ => {
                    self.retained.remove(d);
                }
            }
        }
        if self.retained.len() != before {
            self.save_retained();
        }
        tree.shrink_to_fit();
        self.tree = tree;
        self.watch_tree();
        // Links made after the walk passed their file.
        for (p, st) in late {
            self.relink(&p, &st);
        }
        self.apply_relinks();
        self.maybe_save(false);
        tracing::debug!(
            ms = t0.elapsed().as_secs_f64() * 1e3,
            rehashed = self.files_hashed - hashed_before,
            "mirror refreshed"
        );
        Ok(())
    }

    /// Watches every directory of the tree, and no other. A directory
    /// watched only now was walked before its watch existed: the next
    /// verification looks at it again.
    fn watch_tree(&mut self) {
        let dirs: HashSet<PathBuf> = std::iter::once(self.root.clone())
            .chain(self.tree.dirs().map(|d| d.to_fs(&self.root)))
            .collect();
        let late = self.watch.watch_exactly(dirs);
        self.watch.touch(late);
    }

    /// Directories watched for [`Mirror::verify`].
    pub fn watches(&self) -> usize {
        self.watch.watches()
    }

    /// True when `abs` is a mirror file whose stat is the one the agent
    /// recorded (not racy): its chunks are where the store says, as far as
    /// the stat cache can tell, which is what `Root` relies on too.
    pub fn file_unchanged(&self, abs: &Path) -> bool {
        let Ok(rel) = RelPath::from_fs(&self.root, abs) else {
            return false;
        };
        Stat::lstat(abs).is_ok_and(|st| {
            st.kind == FileKind::File
                && self.tree.hashed(&rel).is_some_and(|c| {
                    c.matches(&st) || self.relink_queued(&rel, &c.to_cached_without_chunks(), &st)
                })
        })
    }

    /// Records a file the agent has just renamed into place.
    pub fn record_file(&mut self, path: RelPath, cached: Cached) {
        self.tree.insert_hashed(path, cached);
        self.index_dirty = true;
    }

    /// A job snapshot hard-linked `path`, which moved its ctime: keeps the
    /// stat cache valid when the content is what the cache says (`st` is the
    /// file's stat after the link). Returns the updated entry.
    pub fn relinked(&mut self, path: &RelPath, st: &Stat) -> Option<Cached> {
        if !self.relink(path, st) {
            return None;
        }
        Some(self.tree.hashed(path)?.to_cached())
    }

    /// [`Mirror::relinked`] without making the entry: an update in place of
    /// one cached ctime (a snapshot's links and unlinks queue one per file).
    fn relink(&mut self, path: &RelPath, st: &Stat) -> bool {
        match self.tree.relink(path, st) {
            None => false,
            Some(moved) => {
                self.index_dirty |= moved;
                true
            }
        }
    }

    /// During a refresh: `stat` differs from the cached `c` only in a ctime
    /// that a job snapshot's link or unlink, queued since the refresh began,
    /// explains.
    fn relinked_meanwhile(
        &self,
        late: &mut HashMap<RelPath, Stat>,
        path: &RelPath,
        c: &Cached,
        stat: &Stat,
    ) -> bool {
        late.extend(
            self.relinks
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .drain(..),
        );
        late.remove(path).is_some_and(|st| explains(c, &st, stat))
    }

    /// True when a queued relink of `rel` explains why `st` differs from
    /// the cached `c` (only in its ctime). Looked up only when a stat does
    /// not match, before the queue is applied (see [`Mirror::catch_up`]).
    fn relink_queued(&self, rel: &RelPath, c: &Cached, st: &Stat) -> bool {
        self.relinks
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .rev()
            .find(|(p, _)| p == rel)
            .is_some_and(|(_, queued)| explains(c, queued, st))
    }

    /// Applies the queued [`Mirror::relinks`] (before a full refresh or a
    /// save of the stat cache compares or writes ctimes, when a
    /// verification looks at stats, and when the agent is quiet).
    pub fn apply_relinks(&mut self) {
        let queued = std::mem::take(&mut *self.relinks.lock().unwrap_or_else(|e| e.into_inner()));
        for (p, st) in queued {
            self.relink(&p, &st);
        }
    }

    /// Applies at most `n` of the queued relinks, the oldest first; true
    /// when some are left (a caller holding the agent's state lets others
    /// in between batches).
    pub fn apply_some_relinks(&mut self, n: usize) -> bool {
        let (batch, left) = {
            let mut q = self.relinks.lock().unwrap_or_else(|e| e.into_inner());
            let take = n.min(q.len());
            let batch: Vec<_> = q.drain(..take).collect();
            (batch, !q.is_empty())
        };
        for (p, st) in batch {
            self.relink(&p, &st);
        }
        left
    }

    /// Stops trusting the stat cache for `paths` (a job wrote into a file it
    /// shared with the mirror): the next refresh rehashes them.
    pub fn distrust(&mut self, paths: &[RelPath]) {
        for p in paths {
            if self.tree.unsee(p) {
                self.index_dirty = true;
            }
        }
    }

    /// Keeps directory `d` on disk but out of the synced view (see `retained`).
    pub fn retain_dir(&mut self, d: RelPath) {
        if self.retained.insert(d) {
            self.save_retained();
        }
    }

    /// `d` is synced again.
    pub fn unretain_dir(&mut self, d: &RelPath) {
        if self.retained.remove(d) {
            self.save_retained();
        }
    }

    fn save_retained(&self) {
        let text: String = self.retained.iter().map(|p| format!("{p}\n")).collect();
        if let Err(e) = bridge_proto::index::write_atomic(&self.retained_path, text.as_bytes()) {
            tracing::warn!(error = %e, "cannot save retained directories");
        }
    }

    /// Forgets `path` and everything below it.
    pub fn forget(&mut self, path: &RelPath) {
        if self
            .tree
            .remove_subtree(path)
            .iter()
            .any(|(_, n)| matches!(n, Node::File { .. }))
        {
            self.index_dirty = true;
        }
    }

    /// Records the whole files of the tree in `store` again when more than
    /// twice as many are recorded (old contents of files edited since the
    /// last refresh), so the set stays the size of the tree.
    pub fn compact_wholes(&self, store: &mut Store) {
        if store.wholes() <= 2 * self.tree.files() as usize + 4096 {
            return;
        }
        store.clear_wholes();
        for (p, h) in self.tree.hashed_files() {
            if h.is_one_chunk() {
                store.index_mirror_file(&p.to_fs(&self.root), &h.chunks());
            }
        }
    }

    /// Saves the stat cache if it changed and `force` or enough time passed.
    /// Unforced saves write on a background thread (a round is waiting).
    pub fn maybe_save(&mut self, force: bool) {
        if force || self.last_save.elapsed() >= INDEX_SAVE_INTERVAL {
            self.apply_relinks();
        }
        if self.index_dirty && (force || self.last_save.elapsed() >= INDEX_SAVE_INTERVAL) {
            self.saver.save_encoded(encode_tree(&self.tree), !force);
            self.index_dirty = false;
            self.last_save = Instant::now();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bridge_proto::index::{Cached, HashOutcome, hash_file};

    fn open(d: &Path) -> (Mirror, Store) {
        let mut store = Store::open(&d.join("store"), 1 << 20).unwrap();
        let m = d.join("mirrors/m");
        fs::create_dir_all(m.join("pkg/sub")).unwrap();
        fs::write(m.join("top.py"), "top").unwrap();
        fs::write(m.join("pkg/a.py"), "a").unwrap();
        fs::write(m.join("pkg/sub/b.py"), "b").unwrap();
        // As `Hello` leaves it: a `.git` holding the daemon's excludes.
        scan::install_excludes(&m, &[]).unwrap();
        let mut mirror = Mirror::open(d, "m", &mut store).unwrap();
        // As if written long enough ago for their stats to be trusted.
        let files: Vec<RelPath> = mirror.tree.hashed_files().map(|(p, _)| p).collect();
        for p in &files {
            mirror.tree.settle(p);
        }
        (mirror, store)
    }

    fn path(s: &str) -> RelPath {
        RelPath::new(s).unwrap()
    }

    /// What the agent does after a round wrote `p`.
    fn record(m: &mut Mirror, p: &str) {
        let Ok(HashOutcome::Hashed(st, d, started)) =
            hash_file(&path(p).to_fs(&m.root), 3, |_, _| {})
        else {
            panic!("cannot hash {p}");
        };
        let mut c = Cached::hashed_since(&st, d, started);
        c.racy = false;
        m.record_file(path(p), c);
    }

    #[test]
    fn the_watch_vouches_for_the_agents_own_writes_and_not_for_others() {
        let d = tempfile::tempdir().unwrap();
        let (mut m, mut store) = open(d.path());
        assert_eq!(m.refreshes, 1);
        assert!(m.watches() >= 3, "the root, pkg and pkg/sub");

        // Directories watched after their walk are looked at once, entry
        // by entry, without a walk; then there is nothing to look at.
        m.verify(&mut store, true).unwrap();
        m.verify(&mut store, true).unwrap();
        assert_eq!(m.refreshes, 1);
        let root = m.tree.root();

        // A round's write, in a new directory too: recorded, explained.
        fs::create_dir(m.root.join("pkg/new")).unwrap();
        m.tree.insert(path("pkg/new"), Node::Dir);
        fs::write(m.root.join("pkg/new/c.py"), "c").unwrap();
        record(&mut m, "pkg/new/c.py");
        m.verify(&mut store, true).unwrap();
        assert_eq!(m.refreshes, 1, "nothing but the agent's writes");
        assert_ne!(m.tree.root(), root);

        // The new directory got its watch: a change in it by someone else
        // is seen.
        fs::write(m.root.join("pkg/new/c.py"), "changed by hand").unwrap();
        m.verify(&mut store, true).unwrap();
        assert_eq!(m.refreshes, 2);
        let c = m.tree.get(&path("pkg/new/c.py"));
        assert!(matches!(c, Some(Node::File { size: 15, .. })), "{c:?}");

        // Each kind of change by someone else makes a full refresh.
        type Change = fn(&Path);
        let changes: [(&str, Change); 4] = [
            ("an edit", |r| {
                fs::write(r.join("pkg/sub/b.py"), "bb").unwrap()
            }),
            ("a removal", |r| fs::remove_file(r.join("top.py")).unwrap()),
            ("a new file", |r| {
                fs::write(r.join("pkg/sub/n.py"), "n").unwrap()
            }),
            ("an exec bit", |r| {
                use std::os::unix::fs::PermissionsExt;
                fs::set_permissions(r.join("pkg/a.py"), fs::Permissions::from_mode(0o755)).unwrap()
            }),
        ];
        for (what, change) in changes {
            let before = m.refreshes;
            change(&m.root);
            m.verify(&mut store, true).unwrap();
            assert_eq!(m.refreshes, before + 1, "{what}");
            m.verify(&mut store, true).unwrap();
            assert_eq!(m.refreshes, before + 1, "{what}: then trusted again");
        }
        assert!(m.tree.get(&path("top.py")).is_none());
        assert!(m.tree.get(&path("pkg/sub/n.py")).is_some());

        // An ignore file the agent writes itself changes which paths are
        // synced: the walk applies it.
        fs::write(m.root.join("pkg/.gitignore"), "a.py\n").unwrap();
        record(&mut m, "pkg/.gitignore");
        let before = m.refreshes;
        m.verify(&mut store, true).unwrap();
        assert_eq!(m.refreshes, before + 1);
        assert!(m.tree.get(&path("pkg/a.py")).is_none(), "now ignored");
        fs::remove_file(m.root.join("pkg/.gitignore")).unwrap();
        m.forget(&path("pkg/.gitignore"));
        m.verify(&mut store, true).unwrap();
        assert!(m.tree.get(&path("pkg/a.py")).is_some());
        assert!(matches!(
            m.tree.get(&path("pkg/a.py")),
            Some(Node::File { exec: true, .. })
        ));

        // While a job runs (its snapshot shares inodes), the watch is not
        // trusted.
        let before = m.refreshes;
        m.verify(&mut store, false).unwrap();
        assert_eq!(m.refreshes, before + 1);
    }

    #[test]
    fn relinks_wait_while_nothing_is_looked_at_and_never_cost_a_rehash() {
        let d = tempfile::tempdir().unwrap();
        let (mut m, mut store) = open(d.path());
        m.verify(&mut store, true).unwrap();
        let ctime = |m: &Mirror, p: &str| m.tree.hashed(&path(p)).unwrap().seen.ctime_ns;
        let before = ctime(&m, "pkg/a.py");
        // A job snapshot's link, made outside the lock, moves the ctime.
        std::thread::sleep(std::time::Duration::from_millis(10));
        let abs = m.root.join("pkg/a.py");
        fs::hard_link(&abs, d.path().join("snap-a.py")).unwrap();
        let st = Stat::lstat(&abs).unwrap();
        assert_ne!(st.ctime_ns, before);
        m.relinks.lock().unwrap().push((path("pkg/a.py"), st));

        // Nothing to look at: the submit's verification leaves it queued,
        // and the file still counts as unchanged (its chunks can be read).
        m.verify(&mut store, true).unwrap();
        assert_eq!(m.refreshes, 1);
        assert_eq!(m.relinks.lock().unwrap().len(), 1);
        assert_eq!(ctime(&m, "pkg/a.py"), before);
        assert!(m.file_unchanged(&abs));
        assert!(!m.file_unchanged(&m.root.join("pkg/missing.py")));

        // A round's write in the same directory makes the next verification
        // look at its entries: the queue is applied first, no rehash.
        fs::write(m.root.join("pkg/c.py"), "c").unwrap();
        record(&mut m, "pkg/c.py");
        m.verify(&mut store, true).unwrap();
        assert_eq!(m.refreshes, 1, "verified by the watch");
        assert!(m.relinks.lock().unwrap().is_empty());
        assert_eq!(ctime(&m, "pkg/a.py"), st.ctime_ns);

        // Queued again and applied in batches when the agent is quiet.
        fs::remove_file(d.path().join("snap-a.py")).unwrap();
        let st = Stat::lstat(&abs).unwrap();
        m.relinks.lock().unwrap().push((path("pkg/a.py"), st));
        m.relinks
            .lock()
            .unwrap()
            .push((path("top.py"), Stat::lstat(&m.root.join("top.py")).unwrap()));
        assert!(m.apply_some_relinks(1));
        assert!(!m.apply_some_relinks(1));
        assert_eq!(ctime(&m, "pkg/a.py"), st.ctime_ns);
        let hashed = m.files_hashed;
        m.refresh(&mut store).unwrap();
        assert_eq!(
            m.files_hashed, hashed,
            "no ctime left stale: nothing rehashed"
        );
    }

    #[test]
    fn a_directory_made_and_filled_by_someone_else_is_seen() {
        let d = tempfile::tempdir().unwrap();
        let (mut m, mut store) = open(d.path());
        m.verify(&mut store, true).unwrap();
        fs::create_dir_all(m.root.join("pkg/made/deeper")).unwrap();
        fs::write(m.root.join("pkg/made/deeper/x.py"), "x").unwrap();
        m.verify(&mut store, true).unwrap();
        assert_eq!(m.refreshes, 2);
        assert!(m.tree.get(&path("pkg/made/deeper/x.py")).is_some());
        // And what it then holds is watched.
        fs::write(m.root.join("pkg/made/deeper/x.py"), "xx").unwrap();
        m.verify(&mut store, true).unwrap();
        assert_eq!(m.refreshes, 3);
        assert!(matches!(
            m.tree.get(&path("pkg/made/deeper/x.py")),
            Some(Node::File { size: 2, .. })
        ));
    }

    #[test]
    fn without_a_git_directory_there_is_no_flush_and_every_verification_walks() {
        let d = tempfile::tempdir().unwrap();
        let (mut m, mut store) = open(d.path());
        fs::remove_dir_all(m.root.join(".git")).unwrap();
        m.verify(&mut store, true).unwrap();
        m.verify(&mut store, true).unwrap();
        assert_eq!(m.refreshes, 3);
    }
}

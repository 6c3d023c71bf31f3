//! The local side: the synced tree as the daemon sees it on disk.
//!
//! [`Local`] owns the repository's [`Tree`], which holds the stat cache that
//! makes rescans cheap next to each file's entry (saved as the [`Index`]
//! file), and the list of paths that exist but cannot be synced (escaping
//! symlinks, unreadable files) with the reason. Rescans are scoped: one file,
//! one directory level, or a subtree; each rehashes only files whose `lstat`
//! changed.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use bridge_proto::chunking::{ChunkRef, Digest, Hash};
use bridge_proto::index::{
    Cached, HashOutcome, Index, Saver, encode_tree, hash_file_after, now_ns, racy_window,
};
use bridge_proto::path::{RelPath, resolve_link_target};
use bridge_proto::rechunk::RECHUNK_MIN_BYTES;
use bridge_proto::scan::{self, FileKind, Found, Side, Stat};
use bridge_proto::splice;
use bridge_proto::tree::{Node, Seen, Tree};

/// How often a file that keeps changing while it is read is retried in one
/// pass before it is left for the next pass.
const HASH_ATTEMPTS: usize = 5;

/// A scoped piece of the tree to look at again.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub enum Dirty {
    /// One path the tree already holds (content or mode change).
    File(RelPath),
    /// One directory level (`None`: the top level): creations, deletions, renames.
    Dir(Option<RelPath>),
    /// A whole subtree (`None`: everything), e.g. after an ignore file changed.
    Tree(Option<RelPath>),
}

/// What a rescan changed, for the watcher.
#[derive(Debug, Default)]
pub struct Changes {
    /// Synced paths whose entry changed, appeared or disappeared (the only
    /// places where the local tree can now differ from the agent's).
    pub touched: Vec<RelPath>,
    /// Directories that appeared (to watch).
    pub new_dirs: Vec<RelPath>,
    /// Directories that disappeared (to unwatch).
    pub gone_dirs: Vec<RelPath>,
    /// Files that kept changing while read; to retry later.
    pub busy: Vec<RelPath>,
    /// An ignore file (`.gitignore`, `.bridgeignore`) changed: what is synced
    /// changed too, on both sides.
    pub rules_changed: bool,
}

impl Changes {
    fn touched(&mut self, p: &RelPath) {
        self.touched.push(p.clone());
        if scan::is_ignore_file(p.name()) {
            self.rules_changed = true;
        }
    }
}

pub struct Local {
    pub root: PathBuf,
    saver: Saver,
    pub tree: Tree,
    /// The stat cache saved by the last run, until the first full scan has
    /// taken what still matches into the tree.
    prior: Option<Tree>,
    /// `prior` while a thread reads it (meanwhile the first scan walks).
    prior_loading: Option<std::thread::JoinHandle<Tree>>,
    /// The directories of `prior`, sent as soon as it is read.
    prior_dirs: Option<std::sync::mpsc::Receiver<Vec<RelPath>>>,
    /// Files of `prior` the first scan found unchanged.
    prior_taken: u64,
    /// Paths present but not synced, with why.
    pub skipped: BTreeMap<String, String>,
    /// Files hashed so recently after a write that the stat cache cannot vouch
    /// for them yet; rehashed once the racy window has passed.
    pub racy: BTreeSet<RelPath>,
    /// Files read and hashed since start.
    pub files_hashed: u64,
    /// Job output paths: left out of the tree (they flow agent → local).
    pub outputs: Vec<RelPath>,
    /// The chunk lists of large files' versions before their last change, until
    /// a round has sent the new one: the agent most likely holds the old one,
    /// so the new one goes as a splice of it (`bridge_proto::splice`).
    pub previous: HashMap<RelPath, Previous>,
    previous_refs: usize,
    index_dirty: bool,
    /// Ignore rules from above a rescanned directory, kept between rescans.
    rules: scan::RuleCache,
}

/// A file version the agent may still hold.
#[derive(Debug)]
pub struct Previous {
    pub hash: Hash,
    pub chunks: Box<[ChunkRef]>,
}

/// At most this many chunk refs (~36 bytes each) are kept in
/// [`Local::previous`]: 64 GiB of files' worth, 9 MiB.
const PREVIOUS_MAX_REFS: usize = 1 << 18;

impl Local {
    pub fn new(root: PathBuf, index_path: PathBuf) -> Local {
        let path = index_path.clone();
        let (dirs_tx, dirs_rx) = std::sync::mpsc::sync_channel(1);
        let loading = std::thread::spawn(move || {
            let t0 = std::time::Instant::now();
            let prior = Index::load_tree(&path);
            tracing::debug!(ms = t0.elapsed().as_secs_f64() * 1e3, "index loaded");
            let _ = dirs_tx.send(prior.dirs_above_entries());
            prior
        });
        Local {
            prior: None,
            prior_loading: Some(loading),
            prior_dirs: Some(dirs_rx),
            prior_taken: 0,
            root,
            saver: Saver::new(index_path),
            tree: Tree::new(),
            skipped: BTreeMap::new(),
            racy: BTreeSet::new(),
            files_hashed: 0,
            outputs: Vec::new(),
            previous: HashMap::new(),
            previous_refs: 0,
            index_dirty: false,
            rules: scan::RuleCache::default(),
        }
    }

    /// The directories the saved stat cache knows, once it is read (to
    /// watch while the first scan runs); only the first call has them.
    pub fn take_prior_dirs(&mut self) -> Option<std::sync::mpsc::Receiver<Vec<RelPath>>> {
        self.prior_dirs.take()
    }

    /// Waits for the saved stat cache, if it is still being read.
    fn join_prior(&mut self) {
        if let Some(h) = self.prior_loading.take() {
            self.prior = Some(h.join().unwrap_or_default());
        }
    }

    /// Saves the stat cache if it changed; `background` leaves the write and
    /// its fsync to a thread.
    pub fn save_index(&mut self, background: bool) {
        if self.index_dirty {
            self.saver.save_encoded(encode_tree(&self.tree), background);
            self.index_dirty = false;
        }
    }

    /// Applies a batch of dirty scopes.
    pub fn apply(&mut self, dirty: BTreeSet<Dirty>) -> Changes {
        let mut ch = Changes::default();
        // A subtree rescan covers everything below it.
        let trees: Vec<Option<RelPath>> = dirty
            .iter()
            .filter_map(|d| match d {
                Dirty::Tree(t) => Some(t.clone()),
                _ => None,
            })
            .collect();
        let covered = |p: Option<&RelPath>| {
            trees.iter().any(|t| match (t, p) {
                (None, _) => true,
                (Some(t), Some(p)) => p.starts_with(t),
                (Some(_), None) => false,
            })
        };
        for d in dirty.iter() {
            match d {
                Dirty::Tree(t) => self.rescan(t.as_ref(), true, &mut ch),
                Dirty::Dir(dir) if !covered(dir.as_ref()) => {
                    self.rescan(dir.as_ref(), false, &mut ch)
                }
                Dirty::File(p) if !covered(Some(p)) => self.recheck(p, &mut ch),
                _ => {}
            }
        }
        if covered(None) {
            if let Some(prior) = self.prior.take() {
                // A file it lists that the scan did not take is gone or
                // changed: the saved index is out of date.
                self.index_dirty |= self.prior_taken != prior.files();
            }
            self.tree.shrink_to_fit();
        }
        ch
    }

    /// Rehashes racy files whose window has passed; true if any changed.
    pub fn settle_racy(&mut self) -> Changes {
        let mut ch = Changes::default();
        let now = now_ns();
        let due: Vec<RelPath> = self
            .racy
            .iter()
            .filter(|p| {
                self.tree.hashed(p).is_none_or(|c| {
                    let (m, c) = (c.seen.mtime_ns, c.seen.ctime_ns);
                    now - m.max(c) >= racy_window(m, c)
                })
            })
            .cloned()
            .collect();
        for p in due {
            self.racy.remove(&p);
            self.recheck(&p, &mut ch);
        }
        ch
    }

    /// One known path: rehash if its stat changed; anything structural falls
    /// back to a rescan of its directory.
    fn recheck(&mut self, p: &RelPath, ch: &mut Changes) {
        self.join_prior();
        let known = matches!(self.tree.get(p), Some(Node::File { .. }));
        let st = Stat::lstat(&p.to_fs(&self.root));
        match st {
            Ok(st) if known && st.kind == FileKind::File => {
                self.update_file(p.clone(), st, ch);
            }
            _ => self.rescan(p.parent().as_ref(), false, ch),
        }
    }

    /// Rescans one directory level (or the subtree with `recursive`).
    fn rescan(&mut self, dir: Option<&RelPath>, recursive: bool, ch: &mut Changes) {
        let first = self.prior_loading.is_some() || self.prior.is_some();
        if dir.is_none() && recursive && first && self.tree.is_empty() {
            return self.first_scan(ch);
        }
        if let Some(d) = dir {
            // Only directories the tree holds are walked: a directory that is
            // gone or newly ignored is handled by its parent.
            let is_dir = Stat::lstat(&d.to_fs(&self.root)).is_ok_and(|s| s.kind == FileKind::Dir);
            if !is_dir || !self.tree.is_dir(d) {
                return self.rescan(d.parent().as_ref(), false, ch);
            }
        }
        if recursive {
            // An ignore file may have changed (its change rescans the
            // subtree): the rules above are read again.
            self.rules.clear();
        }
        let (mut found, bad) = scan::walk_cached(
            &self.root,
            dir,
            if recursive { None } else { Some(1) },
            Side::Daemon,
            &mut self.rules,
        );
        self.join_prior();
        if !self.outputs.is_empty() {
            found.retain(|f| !self.outputs.iter().any(|o| f.path.starts_with(o)));
        }
        let prefix = dir.map(|d| format!("{d}/"));
        self.skipped.retain(|k, _| match &prefix {
            None => !recursive && k.contains('/'),
            Some(pf) => !k.starts_with(pf.as_str()) || (!recursive && k[pf.len()..].contains('/')),
        });
        self.note_unreadable(bad);
        // Entries in scope that the walk did not find are gone (none are in
        // scope at the start: the tree is empty until the first scan).
        let in_scope: Vec<RelPath> = if recursive {
            self.tree.descendants(dir).map(|(k, _)| k.clone()).collect()
        } else {
            self.tree
                .children(dir)
                .into_iter()
                .map(|(k, _)| k.clone())
                .collect()
        };
        if !in_scope.is_empty() {
            let seen: HashSet<&RelPath> = found.iter().map(|f| &f.path).collect();
            for k in in_scope {
                if !seen.contains(&k) && self.tree.get(&k).is_some() {
                    self.remove(&k, ch);
                }
            }
        }
        // Found entries: update; new directories found by a one-level scan
        // are walked whole.
        let mut to_hash = Vec::new();
        let mut new_subdirs = Vec::new();
        for f in found {
            match f.stat.kind {
                FileKind::Dir => {
                    if !self.tree.is_dir(&f.path) {
                        self.remove(&f.path, ch);
                        self.tree.insert(f.path.clone(), Node::Dir);
                        ch.touched(&f.path);
                        ch.new_dirs.push(f.path.clone());
                        if !recursive {
                            new_subdirs.push(f.path);
                        }
                    }
                }
                FileKind::Symlink => self.update_symlink(&f.path, ch),
                FileKind::File => {
                    if let Some(Node::Dir) = self.tree.get(&f.path) {
                        self.remove(&f.path, ch);
                    }
                    if self
                        .tree
                        .hashed(&f.path)
                        .is_some_and(|c| c.matches(&f.stat))
                    {
                        continue;
                    }
                    // A version the last run saw that changed since stays
                    // in `prior` for `record` (the agent likely has it). One
                    // that matches is left there too (removing entries one
                    // by one from the front of each list would move the
                    // rest every time), and counted.
                    let prior = self.prior.as_ref().and_then(|t| {
                        let c = t.hashed(&f.path).filter(|c| c.matches(&f.stat))?;
                        Some(c.to_cached())
                    });
                    self.prior_taken += prior.is_some() as u64;
                    match prior {
                        Some(c) => {
                            ch.touched(&f.path);
                            self.tree.insert_hashed(f.path, c);
                        }
                        None => to_hash.push(f),
                    }
                }
                FileKind::Other => {}
            }
        }
        self.hash_many(to_hash, ch);
        for d in new_subdirs {
            self.rescan(Some(&d), true, ch);
        }
    }

    /// Lists what a walk could not use, by path relative to the root.
    fn note_unreadable(&mut self, bad: Vec<scan::Unreadable>) {
        for b in bad {
            let p = b
                .path
                .strip_prefix(&format!("{}/", self.root.display()))
                .unwrap_or(&b.path)
                .to_string();
            self.skipped.insert(p, b.reason);
        }
    }

    /// The first full scan of a run, into an empty tree: each directory's listing
    /// is merged with the saved index's list for it, so that a file whose
    /// stat matches is taken as it was (no per-file lookup or insert); the
    /// rest is hashed. Its touched paths are every path (the engine has no
    /// use for them: its first diff is a full one) and are not listed.
    fn first_scan(&mut self, ch: &mut Changes) {
        let (listings, bad) = scan::walk_listings(&self.root, None, None, Side::Daemon);
        self.join_prior();
        self.skipped.clear();
        self.note_unreadable(bad);
        let prior = self.prior.take();
        let outputs = std::mem::take(&mut self.outputs);
        let mut to_hash = Vec::new();
        let mut links = Vec::new();
        for mut l in listings {
            if !outputs.is_empty() {
                if outputs.iter().any(|o| is_at_or_below(&l.dir, o.as_str())) {
                    continue;
                }
                l.entries.retain(|(name, _)| {
                    !outputs
                        .iter()
                        .any(|o| o.name() == name && parent_str(o) == l.dir)
                });
            }
            ch.rules_changed |= l.entries.iter().any(|(n, _)| scan::is_ignore_file(n));
            let dir = l.dir.clone();
            for (name, stat) in self.tree.add_listing(l, prior.as_ref()) {
                let path = scan::Listing::path_in(&dir, &name);
                match stat.kind {
                    FileKind::File => to_hash.push(Found { path, stat }),
                    FileKind::Symlink => links.push(path),
                    FileKind::Dir | FileKind::Other => {}
                }
            }
        }
        if let Some(p) = &prior {
            self.tree.adopt_chunk_lists(p);
            self.prior_taken = self.tree.files();
        }
        self.prior = prior;
        self.outputs = outputs;
        for p in links {
            self.update_symlink(&p, ch);
        }
        self.hash_many(to_hash, ch);
    }

    fn update_symlink(&mut self, p: &RelPath, ch: &mut Changes) {
        let target = match std::fs::read_link(p.to_fs(&self.root)) {
            Ok(t) => t,
            Err(_) => return self.remove(p, ch),
        };
        let Some(t) = target.to_str() else {
            self.skipped
                .insert(p.to_string(), "symlink target is not UTF-8".into());
            return self.remove(p, ch);
        };
        if resolve_link_target(p, t).is_none() {
            let why = if t.starts_with('/') {
                format!("absolute symlink (-> {t}) not synced")
            } else {
                format!("symlink leaves the repository (-> {t}) not synced")
            };
            self.skipped.insert(p.to_string(), why);
            return self.remove(p, ch);
        }
        self.skipped.remove(p.as_str());
        let node = Node::Symlink {
            target: t.to_string(),
        };
        if self.tree.get(p).as_ref() != Some(&node) {
            if self.tree.is_dir(p) {
                self.remove(p, ch);
            }
            if matches!(self.tree.insert(p.clone(), node), Some(Node::File { .. })) {
                self.index_dirty = true;
            }
            ch.touched(p);
        }
    }

    fn remove(&mut self, p: &RelPath, ch: &mut Changes) {
        for (k, n) in self.tree.remove_subtree(p) {
            ch.touched(&k);
            match n {
                Node::Dir => ch.gone_dirs.push(k),
                Node::File { .. } => {
                    self.racy.remove(&k);
                    self.forget_previous(&k);
                    self.index_dirty = true;
                }
                Node::Symlink { .. } => {}
            }
        }
    }

    fn update_file(&mut self, p: RelPath, st: Stat, ch: &mut Changes) {
        if self.tree.hashed(&p).is_some_and(|c| c.matches(&st)) {
            return;
        }
        self.hash_many(vec![Found { path: p, stat: st }], ch);
    }

    /// Hashes files (in parallel when there are many) and records them.
    fn hash_many(&mut self, files: Vec<Found>, ch: &mut Changes) {
        if files.is_empty() {
            return;
        }
        let root = self.root.clone();
        // A big file's chunks as last hashed: its unchanged ones are checked,
        // not cut again.
        let files = files
            .into_iter()
            .map(|f| {
                let prior = (f.stat.size >= RECHUNK_MIN_BYTES)
                    .then(|| {
                        let old = self.tree.hashed(&f.path);
                        old.or_else(|| self.prior.as_ref()?.hashed(&f.path))
                            .map(|h| h.chunks().into_owned())
                    })
                    .flatten()
                    .unwrap_or_default();
                (f, prior)
            })
            .collect();
        let results = parallel_hash(&root, files);
        for (path, res) in results {
            match res {
                Ok(HashOutcome::Hashed(st, d, started)) => {
                    self.files_hashed += 1;
                    self.record(path, st, d, started, ch);
                }
                Ok(HashOutcome::Vanished) => self.remove(&path, ch),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => ch.busy.push(path),
                Err(e) => {
                    self.skipped
                        .insert(path.to_string(), format!("cannot read: {e}"));
                    self.remove(&path, ch);
                }
            }
        }
    }

    fn record(&mut self, path: RelPath, st: Stat, d: Digest, started: i64, ch: &mut Changes) {
        let c = Cached::hashed_since(&st, d, started);
        if c.racy {
            self.racy.insert(path.clone());
        } else {
            self.racy.remove(&path);
        }
        let node = Node::File {
            hash: c.hash,
            size: c.size,
            exec: c.exec,
        };
        self.skipped.remove(path.as_str());
        let old = self.tree.hashed(&path);
        if let Some(old) = old.or_else(|| self.prior.as_ref()?.hashed(&path))
            && old.hash != c.hash
            && !self.previous.contains_key(&path)
        {
            // The first version seen is the one the agent has, if any.
            let chunks = old.chunks();
            if chunks.len() >= splice::MIN_CHUNKS
                && self.previous_refs + chunks.len() <= PREVIOUS_MAX_REFS
            {
                self.previous_refs += chunks.len();
                self.previous.insert(
                    path.clone(),
                    Previous {
                        hash: old.hash,
                        chunks: chunks.into_owned().into_boxed_slice(),
                    },
                );
            }
        }
        if self.tree.insert_hashed(path.clone(), c).as_ref() != Some(&node) {
            ch.touched(&path);
        }
        self.index_dirty = true;
    }

    /// Forgets `p`'s previous version (the agent now has the current one).
    pub fn forget_previous(&mut self, p: &RelPath) {
        if let Some(old) = self.previous.remove(p) {
            self.previous_refs -= old.chunks.len();
        }
    }

    /// Chunk list of a synced file, as last hashed.
    pub fn chunks(&self, p: &RelPath) -> Option<Arc<[ChunkRef]>> {
        self.tree.hashed(p).map(|c| c.chunks().into())
    }

    /// The stat `p` was hashed under, unless it is racy (then only its
    /// content can tell whether it changed).
    pub fn trusted_seen(&self, p: &RelPath) -> Option<Seen> {
        self.tree.hashed(p).map(|c| c.seen).filter(|s| !s.racy)
    }
}

/// True when the directory `dir` ("" for the top) is `o` or below it.
fn is_at_or_below(dir: &str, o: &str) -> bool {
    dir.strip_prefix(o)
        .is_some_and(|rest| rest.is_empty() || rest.starts_with('/'))
}

/// The parent of `p` as a string ("" for the top level).
fn parent_str(p: &RelPath) -> &str {
    p.as_str().rfind('/').map_or("", |i| &p.as_str()[..i])
}

/// Hashes `files` on up to as many threads as there are cores.
fn parallel_hash(
    root: &Path,
    files: Vec<(Found, Vec<ChunkRef>)>,
) -> Vec<(RelPath, io::Result<HashOutcome>)> {
    // (Cores are counted only for a batch worth threads: counting reads
    // three cgroup files.)
    let threads = || {
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1)
            .min(8)
    };
    let threads = if files.len() < 8 { 1 } else { threads() };
    if threads == 1 {
        return files
            .into_iter()
            .map(|(f, prior)| {
                let r = hash_file_after(&f.path.to_fs(root), HASH_ATTEMPTS, &prior, |_, _| {});
                (f.path, r)
            })
            .collect();
    }
    let next = std::sync::atomic::AtomicUsize::new(0);
    let out = std::sync::Mutex::new(Vec::with_capacity(files.len()));
    std::thread::scope(|s| {
        for _ in 0..threads {
            s.spawn(|| {
                loop {
                    let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    let Some((f, prior)) = files.get(i) else {
                        break;
                    };
                    let r = hash_file_after(&f.path.to_fs(root), HASH_ATTEMPTS, prior, |_, _| {});
                    out.lock()
                        .expect("hash results poisoned")
                        .push((f.path.clone(), r));
                }
            });
        }
    });
    out.into_inner().expect("hash results poisoned")
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs;

    fn setup() -> (tempfile::TempDir, Local) {
        let d = tempfile::tempdir().unwrap();
        fs::create_dir_all(d.path().join(".git")).unwrap();
        fs::create_dir_all(d.path().join(".bridge")).unwrap();
        let l = Local::new(d.path().to_path_buf(), d.path().join(".bridge/index"));
        (d, l)
    }

    fn full(l: &mut Local) -> Changes {
        l.apply([Dirty::Tree(None)].into())
    }

    #[test]
    fn a_big_file_edited_in_the_middle_gets_the_chunks_of_a_full_cut() {
        use bridge_proto::chunking::{chunk_bytes, pseudo_random};
        let (d, mut l) = setup();
        let f = d.path().join("big.bin");
        let mut data = pseudo_random(6 << 20, 5);
        fs::write(&f, &data).unwrap();
        full(&mut l);
        let p = RelPath::new("big.bin").unwrap();
        let before = l.chunks(&p).unwrap();
        assert!(before.len() > 20);
        // In place, then an insertion: the previous list lines up again at
        // the same offsets, then shifted.
        let mid = data.len() / 2;
        data[mid..mid + 4096].copy_from_slice(&pseudo_random(4096, 6));
        fs::write(&f, &data).unwrap();
        l.apply([Dirty::File(p.clone())].into());
        assert_eq!(*l.chunks(&p).unwrap(), chunk_bytes(&data).chunks[..]);
        data.splice(1000..1000, pseudo_random(777, 7));
        fs::write(&f, &data).unwrap();
        l.apply([Dirty::File(p.clone())].into());
        let after = l.chunks(&p).unwrap();
        assert_eq!(*after, chunk_bytes(&data).chunks[..]);
        assert_eq!(l.tree.hashed(&p).unwrap().hash, chunk_bytes(&data).hash);
    }

    #[test]
    fn scan_hash_and_rescan_only_changed() {
        let (d, mut l) = setup();
        fs::create_dir_all(d.path().join("src")).unwrap();
        for i in 0..20 {
            fs::write(d.path().join(format!("src/f{i}")), format!("file {i}")).unwrap();
        }
        full(&mut l);
        assert_eq!(l.tree.files(), 20);
        assert_eq!(l.files_hashed, 20);
        // Make the entries non-racy as if time had passed.
        let files: Vec<RelPath> = l.tree.hashed_files().map(|(p, _)| p).collect();
        for p in &files {
            l.tree.settle(p);
        }
        l.racy.clear();
        let ch = full(&mut l);
        assert!(ch.touched.is_empty());
        assert_eq!(l.files_hashed, 20, "unchanged files are not rehashed");
        fs::write(d.path().join("src/f3"), "changed!").unwrap();
        let ch = l.apply([Dirty::File(RelPath::new("src/f3").unwrap())].into());
        assert_eq!(ch.touched.len(), 1);
        assert_eq!(l.files_hashed, 21);
    }

    #[test]
    fn a_restart_reuses_the_saved_stat_cache_and_remembers_changed_versions() {
        let (d, mut l) = setup();
        let big = bridge_proto::chunking::pseudo_random(8 << 20, 11);
        fs::write(d.path().join("big.bin"), &big).unwrap();
        fs::write(d.path().join("small.txt"), "small").unwrap();
        full(&mut l);
        let before = l
            .tree
            .hashed(&RelPath::new("big.bin").unwrap())
            .unwrap()
            .hash;
        // As if the racy window had passed before the daemon stopped.
        let files: Vec<RelPath> = l.tree.hashed_files().map(|(p, _)| p).collect();
        for p in &files {
            l.tree.settle(p);
        }
        l.index_dirty = true;
        l.save_index(false);
        let root = l.tree.root();

        // The next run: nothing changed, nothing is read again.
        let mut l = Local::new(d.path().to_path_buf(), d.path().join(".bridge/index"));
        full(&mut l);
        assert_eq!(l.files_hashed, 0);
        assert_eq!(l.tree.root(), root);
        assert!(
            l.prior.is_none(),
            "the loaded cache is dropped after the scan"
        );
        assert!(!l.index_dirty, "an unchanged restart rewrites no index");

        // And after a change while it was down, the version the agent most
        // likely holds is kept for a splice.
        let mut edited = big.clone();
        edited[4 << 20] ^= 1;
        fs::write(d.path().join("big.bin"), &edited).unwrap();
        let mut l = Local::new(d.path().to_path_buf(), d.path().join(".bridge/index"));
        full(&mut l);
        assert_eq!(l.files_hashed, 1);
        let prev = &l.previous[&RelPath::new("big.bin").unwrap()];
        assert_eq!(prev.hash, before);
        l.tree.settle(&RelPath::new("big.bin").unwrap());
        l.save_index(false);

        // A file removed while it was down leaves the saved index.
        let gone = files.iter().find(|p| p.as_str() != "big.bin").unwrap();
        fs::remove_file(gone.to_fs(d.path())).unwrap();
        let mut l = Local::new(d.path().to_path_buf(), d.path().join(".bridge/index"));
        full(&mut l);
        assert_eq!(l.files_hashed, 0);
        assert!(l.tree.get(gone).is_none());
        assert!(l.index_dirty, "the saved index still lists {gone}");
    }

    #[test]
    fn a_first_scan_leaves_out_job_outputs_and_reads_links() {
        let (d, mut l) = setup();
        fs::create_dir_all(d.path().join("runs/r1/deep")).unwrap();
        fs::write(d.path().join("runs/r1/deep/ckpt"), "w").unwrap();
        fs::write(d.path().join("runs/keep"), "k").unwrap();
        fs::write(d.path().join("metrics.json"), "m").unwrap();
        fs::write(d.path().join("train.py"), "t").unwrap();
        std::os::unix::fs::symlink("train.py", d.path().join("link")).unwrap();
        l.outputs = vec![
            RelPath::new("runs/r1").unwrap(),
            RelPath::new("metrics.json").unwrap(),
        ];
        full(&mut l);
        let paths: Vec<String> = l.tree.iter().map(|(p, _)| p.to_string()).collect();
        assert_eq!(paths, ["link", "runs", "runs/keep", "train.py"]);
        assert_eq!(
            l.tree.get(&RelPath::new("link").unwrap()),
            Some(Node::Symlink {
                target: "train.py".into()
            })
        );
        // The general rescan finds the same tree.
        let ch = full(&mut l);
        assert!(ch.touched.is_empty(), "{:?}", ch.touched);
    }

    #[test]
    fn symlinks_inside_kept_escaping_skipped() {
        let (d, mut l) = setup();
        fs::write(d.path().join("a"), "a").unwrap();
        std::os::unix::fs::symlink("a", d.path().join("in")).unwrap();
        std::os::unix::fs::symlink("/etc/passwd", d.path().join("abs")).unwrap();
        std::os::unix::fs::symlink("../outside", d.path().join("esc")).unwrap();
        full(&mut l);
        assert!(matches!(
            l.tree.get(&RelPath::new("in").unwrap()),
            Some(Node::Symlink { .. })
        ));
        assert!(l.tree.get(&RelPath::new("abs").unwrap()).is_none());
        assert!(l.skipped["abs"].contains("absolute"));
        assert!(l.skipped["esc"].contains("leaves"));
    }

    #[test]
    fn new_directory_found_by_level_scan_is_walked() {
        let (d, mut l) = setup();
        full(&mut l);
        fs::create_dir_all(d.path().join("x/y/z")).unwrap();
        fs::write(d.path().join("x/y/z/f"), "f").unwrap();
        let ch = l.apply([Dirty::Dir(None)].into());
        assert!(l.tree.get(&RelPath::new("x/y/z/f").unwrap()).is_some());
        assert_eq!(ch.new_dirs.len(), 3);
        fs::remove_dir_all(d.path().join("x")).unwrap();
        let ch = l.apply([Dirty::Dir(Some(RelPath::new("x/y").unwrap()))].into());
        assert!(l.tree.is_empty());
        assert_eq!(ch.gone_dirs.len(), 3);
    }
}

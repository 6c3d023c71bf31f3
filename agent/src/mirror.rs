//! One mirror: a directory under `mirrors/` kept identical to a daemon's tree.
//!
//! The mirror's [`Tree`] is the agent's own view, derived from disk: a refresh
//! walks the mirror with the same ignore rules as the daemon and rehashes only
//! files whose `lstat` changed since the stat cache ([`Index`]) saw them. Paths
//! the agent writes itself are recorded as written, without a rehash.

use std::collections::{BTreeSet, HashMap};
use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bridge_proto::index::{Cached, HashOutcome, Index, Saver, hash_file};
use bridge_proto::path::RelPath;
use bridge_proto::scan::{self, FileKind, Side, Stat};
use bridge_proto::tree::{Node, Tree};

use crate::store::Store;

/// How long the agent may keep index updates only in memory. A crash loses at
/// most this much of the cache (the cost is a rehash, never a wrong answer);
/// encoding happens inside a round, so it should not happen often.
const INDEX_SAVE_INTERVAL: Duration = Duration::from_secs(30);

pub struct Mirror {
    pub name: String,
    /// The mirror directory.
    pub root: PathBuf,
    saver: Saver,
    /// Stat cache of the mirror's regular files (also their chunk lists).
    pub index: Index,
    /// What is synced in the mirror right now.
    pub tree: Tree,
    /// Index changes not yet on disk.
    index_dirty: bool,
    last_save: Instant,
    /// Files hashed by refreshes since start (observability, tests).
    pub files_hashed: u64,
    /// Directories the daemon removed that still hold ignored paths: kept on
    /// disk, left out of the synced view while nothing synced is inside.
    retained: BTreeSet<RelPath>,
    retained_path: PathBuf,
    /// Stats of mirror files whose ctime a job snapshot's link or unlink
    /// moved, from threads without the state lock; applied before the next
    /// refresh compares stats (see [`Mirror::relinked`]).
    pub relinks: RelinkQueue,
}

/// See [`Mirror::relinks`].
pub type RelinkQueue = Arc<std::sync::Mutex<Vec<(RelPath, Stat)>>>;

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
        let mut m = Mirror {
            name: name.to_string(),
            root,
            index: Index::load(&index_path),
            saver: Saver::new(index_path),
            tree: Tree::new(),
            index_dirty: false,
            last_save: Instant::now(),
            files_hashed: 0,
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

    /// Rebuilds the tree from disk, rehashing only changed files.
    pub fn refresh(&mut self, store: &mut Store) -> io::Result<()> {
        let t0 = Instant::now();
        let hashed_before = self.files_hashed;
        self.apply_relinks();
        let mut late = HashMap::new();
        let (found, unreadable) = scan::walk(&self.root, None, None, Side::Agent);
        for u in unreadable {
            tracing::warn!(path = %u.path, reason = %u.reason, "unreadable path in mirror");
        }
        let mut tree = Tree::new();
        let mut index = Index::default();
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
                    let cached = match self.index.entries.remove(&f.path) {
                        Some(c) if c.matches(&f.stat) => Some(c),
                        Some(mut c) if self.relinked_meanwhile(&mut late, &f.path, &c, &f.stat) => {
                            c.ctime_ns = f.stat.ctime_ns;
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
                            match hash_file(&p, 3, |_, _| {}) {
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
                        let file: Arc<Path> = f.path.to_fs(&self.root).into();
                        store.index_file(&file, &c.chunks);
                        tree.insert(
                            f.path.clone(),
                            Node::File {
                                hash: c.hash,
                                size: c.size,
                                exec: c.exec,
                            },
                        );
                        index.entries.insert(f.path, c);
                    }
                }
                FileKind::Other => {}
            }
        }
        if !self.index.entries.is_empty() {
            self.index_dirty = true;
        }
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
        self.index = index;
        self.tree = tree;
        // Links made after the walk passed their file.
        for (p, st) in late {
            self.relinked(&p, &st);
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

    /// Records a file the agent has just renamed into place.
    pub fn record_file(&mut self, path: RelPath, cached: Cached) {
        self.tree.insert(
            path.clone(),
            Node::File {
                hash: cached.hash,
                size: cached.size,
                exec: cached.exec,
            },
        );
        self.index.entries.insert(path, cached);
        self.index_dirty = true;
    }

    /// A job snapshot hard-linked `path`, which moved its ctime: keeps the
    /// stat cache valid when the content is what the cache says (`st` is the
    /// file's stat after the link). Returns the updated entry.
    pub fn relinked(&mut self, path: &RelPath, st: &Stat) -> Option<Cached> {
        let c = self.index.entries.get_mut(path)?;
        if c.ino != st.ino || c.size != st.size || c.mtime_ns != st.mtime_ns {
            return None;
        }
        if c.ctime_ns != st.ctime_ns {
            c.ctime_ns = st.ctime_ns;
            self.index_dirty = true;
        }
        Some(c.clone())
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
        late.remove(path).is_some_and(|st| {
            !c.racy
                && st == *stat
                && c.ino == st.ino
                && c.size == st.size
                && c.mtime_ns == st.mtime_ns
                && c.exec == st.exec
        })
    }

    /// Applies the queued [`Mirror::relinks`].
    fn apply_relinks(&mut self) {
        let queued = std::mem::take(&mut *self.relinks.lock().unwrap_or_else(|e| e.into_inner()));
        for (p, st) in queued {
            self.relinked(&p, &st);
        }
    }

    /// Stops trusting the stat cache for `paths` (a job wrote into a file it
    /// shared with the mirror): the next refresh rehashes them.
    pub fn distrust(&mut self, paths: &[RelPath]) {
        for p in paths {
            if self.index.entries.remove(p).is_some() {
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
        for (p, n) in self.tree.remove_subtree(path) {
            if matches!(n, Node::File { .. }) {
                self.index.entries.remove(&p);
                self.index_dirty = true;
            }
        }
    }

    /// Saves the stat cache if it changed and `force` or enough time passed.
    /// Unforced saves write on a background thread (a round is waiting).
    pub fn maybe_save(&mut self, force: bool) {
        if self.index_dirty && (force || self.last_save.elapsed() >= INDEX_SAVE_INTERVAL) {
            self.saver.save(&self.index, !force);
            self.index_dirty = false;
            self.last_save = Instant::now();
        }
    }
}

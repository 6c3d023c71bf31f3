//! Synced entries and the tree root.
//!
//! The root is a Merkle hash over directories: a file hashes its kind, exec bit
//! and content hash; a symlink its target; a directory the sorted list of its
//! children's names and hashes. Both sides compute it over their own view, so
//! "in sync" means equal roots, not that the daemon believes so.
//!
//! [`Tree`] keeps each directory's entries, by name, in a list of its own
//! that clones share until one side changes it; it iterates in path order
//! with every directory's descendants right after it ([`path_cmp`]), and
//! caches directory hashes: a change invalidates only its ancestors, so the
//! root after a one-file edit in a 100k-file tree costs a few directory
//! hashes, not a full pass.
//!
//! Memory is the point of the layout (the daemon holds a tree entry per file
//! of the repository, twice: its own and its belief about the agent's): an
//! entry is a name stored inline, the node and the stat cache (104 bytes);
//! only a file of two chunks or more has its chunk list, on the side; and the
//! belief shares every directory the agent has in the state the daemon has.

use std::borrow::Cow;
use std::cmp::Ordering;
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering as AtomicOrdering};
use std::sync::{Arc, Mutex};

use compact_str::CompactString;

use crate::chunking::{ChunkRef, Hash, hash_from_bytes};
use crate::index::Cached;
use crate::path::RelPath;
use crate::scan::{FileKind, Listing, Stat};
use crate::v1;

/// What a synced path is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Node {
    File { hash: Hash, size: u64, exec: bool },
    Dir,
    Symlink { target: String },
}

/// The hash a file contributes to its directory: BLAKE3 of "f", the exec
/// bit and the content hash (one call: the input is one block).
fn file_leaf_hash(exec: bool, hash: &Hash) -> Hash {
    let mut b = [0u8; 34];
    b[0] = b'f';
    b[1] = exec as u8;
    b[2..].copy_from_slice(hash.as_bytes());
    blake3::hash(&b)
}

impl Node {
    /// The hash a leaf contributes to its directory (directories: see [`Tree`]).
    fn leaf_hash(&self) -> Hash {
        let mut h = blake3::Hasher::new();
        match self {
            Node::File { hash, exec, .. } => return file_leaf_hash(*exec, hash),
            Node::Symlink { target } => {
                h.update(b"l");
                h.update(target.as_bytes());
            }
            Node::Dir => unreachable!("directories hash their children"),
        }
        h.finalize()
    }

    pub fn is_dir(&self) -> bool {
        matches!(self, Node::Dir)
    }

    pub fn to_wire(&self, path: &RelPath) -> v1::Entry {
        let mut e = v1::Entry {
            path: path.to_string(),
            ..Default::default()
        };
        match self {
            Node::File { hash, size, exec } => {
                e.kind = v1::Kind::File as i32;
                e.hash = hash.as_bytes().to_vec().into();
                e.size = *size;
                e.executable = *exec;
            }
            Node::Dir => e.kind = v1::Kind::Dir as i32,
            Node::Symlink { target } => {
                e.kind = v1::Kind::Symlink as i32;
                e.target = target.clone();
            }
        }
        e
    }

    pub fn from_wire(e: &v1::Entry) -> Result<(RelPath, Node), String> {
        let path = RelPath::new(e.path.clone()).map_err(|err| err.to_string())?;
        let node = match v1::Kind::try_from(e.kind) {
            Ok(v1::Kind::File) => Node::File {
                hash: hash_from_bytes(&e.hash).ok_or("file entry without a 32-byte hash")?,
                size: e.size,
                exec: e.executable,
            },
            Ok(v1::Kind::Dir) => Node::Dir,
            Ok(v1::Kind::Symlink) => Node::Symlink {
                target: e.target.clone(),
            },
            _ => return Err(format!("entry {path} has unknown kind {}", e.kind)),
        };
        Ok((path, node))
    }
}

/// What vouched for a file's hash when it was hashed: the stat cache lives
/// in the tree, next to the entry it describes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Seen {
    pub mtime_ns: i64,
    pub ctime_ns: i64,
    pub ino: u64,
    /// Hashed too soon after its last write to trust the stat fields.
    pub racy: bool,
}

/// One entry, packed (96 bytes: the daemon holds one per file): the node's
/// fields and the stat cache side by side. A symlink's target is kept in
/// [`Tree::links`].
#[derive(Debug, Clone)]
struct Entry {
    name: CompactString,
    /// A file's content hash.
    hash: Hash,
    size: u64,
    mtime_ns: i64,
    ctime_ns: i64,
    ino: u64,
    kind: Kind,
    /// [`EXEC`], [`SEEN`], [`RACY`].
    flags: u8,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    File,
    Dir,
    Symlink,
}

const EXEC: u8 = 1;
/// The stat fields are set: this side hashed the file.
const SEEN: u8 = 2;
const RACY: u8 = 4;

impl Entry {
    fn new(name: &str, n: &Node, seen: Option<Seen>) -> Entry {
        let (kind, hash, size, exec) = match n {
            Node::File { hash, size, exec } => (Kind::File, *hash, *size, *exec),
            Node::Dir => (Kind::Dir, Hash::from_bytes([0; 32]), 0, false),
            Node::Symlink { .. } => (Kind::Symlink, Hash::from_bytes([0; 32]), 0, false),
        };
        let s = seen.unwrap_or(Seen {
            mtime_ns: 0,
            ctime_ns: 0,
            ino: 0,
            racy: false,
        });
        Entry {
            name: name.into(),
            hash,
            size,
            mtime_ns: s.mtime_ns,
            ctime_ns: s.ctime_ns,
            ino: s.ino,
            kind,
            flags: if exec { EXEC } else { 0 }
                | if seen.is_some() { SEEN } else { 0 }
                | if s.racy { RACY } else { 0 },
        }
    }

    fn is_dir(&self) -> bool {
        self.kind == Kind::Dir
    }

    /// True when `st` shows this hashed file unchanged ([`Cached::matches`]).
    fn matches(&self, st: &Stat) -> bool {
        self.kind == Kind::File
            && self.flags & (SEEN | RACY) == SEEN
            && self.size == st.size
            && self.mtime_ns == st.mtime_ns
            && self.ctime_ns == st.ctime_ns
            && self.ino == st.ino
            && (self.flags & EXEC != 0) == st.exec
    }

    /// The node, with `target` for a symlink.
    fn node(&self, target: impl FnOnce() -> String) -> Node {
        match self.kind {
            Kind::File => Node::File {
                hash: self.hash,
                size: self.size,
                exec: self.flags & EXEC != 0,
            },
            Kind::Dir => Node::Dir,
            Kind::Symlink => Node::Symlink { target: target() },
        }
    }

    fn seen(&self) -> Option<Seen> {
        (self.kind == Kind::File && self.flags & SEEN != 0).then_some(Seen {
            mtime_ns: self.mtime_ns,
            ctime_ns: self.ctime_ns,
            ino: self.ino,
            racy: self.flags & RACY != 0,
        })
    }
}

/// A file as its side hashed it: the entry and the stat cache.
#[derive(Debug, Clone, Copy)]
pub struct Hashed<'a> {
    pub hash: Hash,
    pub size: u64,
    pub exec: bool,
    pub seen: Seen,
    many: &'a [ChunkRef],
}

impl<'a> Hashed<'a> {
    /// The file's chunk list.
    pub fn chunks(&self) -> Cow<'a, [ChunkRef]> {
        if !self.many.is_empty() || self.size == 0 {
            Cow::Borrowed(self.many)
        } else {
            Cow::Owned(vec![ChunkRef {
                id: self.hash,
                len: self.size as u32,
            }])
        }
    }

    /// A file of exactly one chunk: the chunk's id is the file's hash.
    pub fn is_one_chunk(&self) -> bool {
        self.many.is_empty() && self.size > 0
    }

    /// True when `st` shows the file unchanged since it was hashed.
    pub fn matches(&self, st: &Stat) -> bool {
        self.to_cached_without_chunks().matches(st)
    }

    /// The stat cache entry, with its chunk list.
    pub fn to_cached(&self) -> Cached {
        Cached {
            chunks: self.chunks().into_owned().into_boxed_slice(),
            ..self.to_cached_without_chunks()
        }
    }

    /// [`Hashed::to_cached`] with an empty list (saves an allocation when
    /// the list is read from [`Hashed::chunks`] anyway).
    pub fn to_cached_without_chunks(&self) -> Cached {
        Cached {
            size: self.size,
            mtime_ns: self.seen.mtime_ns,
            ctime_ns: self.seen.ctime_ns,
            ino: self.seen.ino,
            exec: self.exec,
            racy: self.seen.racy,
            hash: self.hash,
            chunks: Box::default(),
        }
    }
}

/// The order [`Tree`] iterates in: component by component, so that a
/// directory's descendants follow it directly (`a`, `a/x`, `a.b`; plain
/// byte order puts `a.b` between them).
pub fn path_cmp(a: &RelPath, b: &RelPath) -> Ordering {
    let key = |c: u8| if c == b'/' { 0 } else { c };
    a.as_str().bytes().map(key).cmp(b.as_str().bytes().map(key))
}

/// A hashed file's node and stat cache, and whether it is one chunk (its
/// chunk list then needs no room of its own).
fn hashed_parts(c: &Cached) -> (bool, Node, Seen) {
    let one_chunk = match &*c.chunks {
        [] => c.size == 0,
        [only] => only.id == c.hash && u64::from(only.len) == c.size,
        _ => false,
    };
    let node = Node::File {
        hash: c.hash,
        size: c.size,
        exec: c.exec,
    };
    let seen = Seen {
        mtime_ns: c.mtime_ns,
        ctime_ns: c.ctime_ns,
        ino: c.ino,
        racy: c.racy,
    };
    (one_chunk, node, seen)
}

fn split(p: &str) -> (&str, &str) {
    match p.rfind('/') {
        Some(i) => (&p[..i], &p[i + 1..]),
        None => ("", p),
    }
}

fn join(dir: &str, name: &str) -> String {
    if dir.is_empty() {
        name.to_owned()
    } else {
        format!("{dir}/{name}")
    }
}

fn by_name(name: &str) -> impl Fn(&Entry) -> Ordering + '_ {
    move |e| e.name.as_str().cmp(name)
}

/// A set of synced entries with a cached Merkle root.
#[derive(Default)]
pub struct Tree {
    /// Each directory's entries by name ("" is the top level). Clones share
    /// the lists; a change copies the one it touches if it is shared.
    dirs: HashMap<Box<str>, Arc<Vec<Entry>>>,
    /// Hashes of directories (key "" is the root) still valid since the last
    /// change below them.
    dir_cache: Mutex<HashMap<Box<str>, Hash>>,
    /// The chunk lists of hashed files of two chunks or more. A file of one
    /// chunk is that chunk (its id is the file's hash); an empty one has none.
    many: HashMap<RelPath, Arc<[ChunkRef]>>,
    /// Symlink targets.
    links: HashMap<RelPath, String>,
    len: usize,
    files: u64,
    bytes: u64,
    /// See [`Tree::stamp`].
    stamp: u64,
}

/// Stamps of trees: every change of any tree takes the next one.
static STAMPS: AtomicU64 = AtomicU64::new(1);

impl Tree {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Number of regular files.
    pub fn files(&self) -> u64 {
        self.files
    }

    /// Total size of regular files.
    pub fn bytes(&self) -> u64 {
        self.bytes
    }

    fn find(&self, p: &RelPath) -> Option<&Entry> {
        let (dir, name) = split(p.as_str());
        let list = self.dirs.get(dir)?;
        list.binary_search_by(by_name(name)).ok().map(|i| &list[i])
    }

    /// The entry at `p` (a copy: entries are stored packed).
    pub fn get(&self, p: &RelPath) -> Option<Node> {
        self.find(p).map(|e| self.node_at(p.as_str(), e))
    }

    fn node_at(&self, p: &str, e: &Entry) -> Node {
        e.node(|| self.links.get(p).cloned().unwrap_or_default())
    }

    /// True when the tree holds an entry at `p`.
    pub fn contains(&self, p: &RelPath) -> bool {
        self.find(p).is_some()
    }

    /// True when `p` is a directory.
    pub fn is_dir(&self, p: &RelPath) -> bool {
        self.find(p).is_some_and(Entry::is_dir)
    }

    /// Gives back the room the lists grew into (after a full scan: a list
    /// of 100 entries grown one by one would take 12 KiB instead of 10).
    pub fn shrink_to_fit(&mut self) {
        for l in self.dirs.values_mut() {
            if let Some(l) = Arc::get_mut(l) {
                l.shrink_to_fit();
            }
        }
    }

    /// Equal for two trees (or one tree at two times) only when neither
    /// changed since they were one: every change takes a stamp no tree had.
    /// A ctime taken by [`Tree::relink`] is no change here.
    pub fn stamp(&self) -> u64 {
        self.stamp
    }

    fn changed(&mut self) {
        self.stamp = STAMPS.fetch_add(1, AtomicOrdering::Relaxed);
    }

    /// The file at `p` with its stat cache, if this side hashed it.
    pub fn hashed(&self, p: &RelPath) -> Option<Hashed<'_>> {
        self.hashed_entry(p, self.find(p)?)
    }

    /// Every hashed file, in path order.
    pub fn hashed_files(&self) -> impl Iterator<Item = (RelPath, Hashed<'_>)> {
        self.walk(None)
            .filter_map(|(p, e)| Some((p.clone(), self.hashed_entry(&p, e)?)))
    }

    fn hashed_entry(&self, p: &RelPath, e: &Entry) -> Option<Hashed<'_>> {
        Some(Hashed {
            seen: e.seen()?,
            hash: e.hash,
            size: e.size,
            exec: e.flags & EXEC != 0,
            many: self.many.get(p).map(|l| &l[..]).unwrap_or_default(),
        })
    }

    /// Trusts the stat fields of the file at `p` from now on (its racy
    /// window has passed and a rehash found it unchanged).
    pub fn settle(&mut self, p: &RelPath) {
        let (dir, name) = split(p.as_str());
        let Some(slot) = self.dirs.get_mut(dir) else {
            return;
        };
        if let Ok(i) = slot.binary_search_by(by_name(name)) {
            Arc::make_mut(slot)[i].flags &= !RACY;
            self.changed();
        }
    }

    /// The hashed file at `p` gained or lost a hard link elsewhere, which
    /// moved its ctime and nothing else: takes `st`'s ctime into its stat
    /// cache, in place. `None` when `st` is not that file as hashed (another
    /// inode, size or mtime, or not hashed); else whether the ctime changed.
    pub fn relink(&mut self, p: &RelPath, st: &Stat) -> Option<bool> {
        let (dir, name) = split(p.as_str());
        let slot = self.dirs.get_mut(dir)?;
        let i = slot.binary_search_by(by_name(name)).ok()?;
        let e = &slot[i];
        if e.kind != Kind::File
            || e.flags & SEEN == 0
            || e.ino != st.ino
            || e.size != st.size
            || e.mtime_ns != st.mtime_ns
        {
            return None;
        }
        if e.ctime_ns == st.ctime_ns {
            return Some(false);
        }
        Arc::make_mut(slot)[i].ctime_ns = st.ctime_ns;
        Some(true)
    }

    /// Stops trusting the stat fields of the file at `p`: [`Tree::hashed`]
    /// no longer has it, so its next check rehashes it. True when it had
    /// them.
    pub fn unsee(&mut self, p: &RelPath) -> bool {
        let (dir, name) = split(p.as_str());
        let Some(slot) = self.dirs.get_mut(dir) else {
            return false;
        };
        let Ok(i) = slot.binary_search_by(by_name(name)) else {
            return false;
        };
        if slot[i].flags & SEEN == 0 {
            return false;
        }
        Arc::make_mut(slot)[i].flags &= !(SEEN | RACY);
        self.many.remove(p);
        self.changed();
        true
    }

    fn invalidate(&mut self, p: &RelPath) {
        self.invalidate_str(p.as_str());
    }

    fn invalidate_str(&mut self, p: &str) {
        let cache = self.dir_cache.get_mut().expect("dir cache poisoned");
        if cache.is_empty() {
            return;
        }
        cache.remove("");
        cache.remove(p);
        for (i, _) in p.match_indices('/') {
            cache.remove(&p[..i]);
        }
    }

    fn account(&mut self, e: &Entry, sign: i64) {
        if e.kind == Kind::File {
            self.files = self.files.wrapping_add_signed(sign);
            self.bytes = self.bytes.wrapping_add_signed(sign * e.size as i64);
        }
    }

    /// Inserts or replaces one entry; returns the previous one.
    pub fn insert(&mut self, p: RelPath, n: Node) -> Option<Node> {
        self.set(&p, n, None, false)
    }

    /// Inserts or replaces the file at `p` as just hashed, with its stat
    /// cache; returns the previous entry.
    pub fn insert_hashed(&mut self, p: RelPath, c: Cached) -> Option<Node> {
        let (one_chunk, node, seen) = hashed_parts(&c);
        if !one_chunk {
            self.many.insert(p.clone(), c.chunks.into());
        }
        self.set(&p, node, Some(seen), !one_chunk)
    }

    /// [`Tree::insert_hashed`] for building a tree from a saved stat cache:
    /// a file of one chunk that sorts after the last entry of its directory
    /// (as a cache saved in path order has them) is appended, without the
    /// lookups an insert makes.
    pub fn push_hashed(&mut self, p: &str, c: Cached) {
        let (dir, name) = split(p);
        let (one_chunk, node, seen) = hashed_parts(&c);
        if one_chunk
            && let Some(list) = self.dirs.get_mut(dir).and_then(Arc::get_mut)
            && list.last().is_some_and(|e| e.name.as_str() < name)
        {
            if list.len() == list.capacity() {
                list.reserve_exact((list.len() / 2).max(4));
            }
            list.push(Entry::new(name, &node, Some(seen)));
            self.changed();
            self.files += 1;
            self.bytes += c.size;
            self.len += 1;
            self.invalidate_str(p);
            return;
        }
        self.insert_hashed(RelPath::trusted(p), c);
    }

    /// Puts `n` at `p`; `listed`: [`Tree::many`] holds its chunk list.
    fn set(&mut self, p: &RelPath, n: Node, seen: Option<Seen>, listed: bool) -> Option<Node> {
        self.changed();
        let old = self.get(p);
        if old.as_ref() != Some(&n) {
            self.invalidate(p);
        }
        if !listed && !self.many.is_empty() {
            self.many.remove(p);
        }
        match &n {
            Node::Symlink { target } => {
                self.links.insert(p.clone(), target.clone());
            }
            _ if matches!(old, Some(Node::Symlink { .. })) => {
                self.links.remove(p);
            }
            _ => {}
        }
        let e = Entry::new(p.name(), &n, seen);
        self.account(&e, 1);
        let (dir, _) = split(p.as_str());
        let list = match self.dirs.get_mut(dir) {
            Some(l) => Arc::make_mut(l),
            None => Arc::make_mut(self.dirs.entry(dir.into()).or_default()),
        };
        match list.binary_search_by(by_name(&e.name)) {
            Ok(i) => {
                let was = std::mem::replace(&mut list[i], e);
                self.account(&was, -1);
            }
            Err(i) => {
                // Grow by half, not double: the lists are most of the
                // daemon's memory (a full scan ends with `shrink_to_fit`).
                // By less, a list built entry by entry is copied too often.
                if list.len() == list.capacity() {
                    list.reserve_exact((list.len() / 2).max(4));
                }
                list.insert(i, e);
                self.len += 1;
            }
        }
        if !n.is_dir() {
            // Only a directory has anything below it.
            let mut gone = Vec::new();
            self.take_below(p.as_str(), &mut gone);
        }
        old
    }

    /// Forgets a removed entry's side data; returns its node.
    fn removed(&mut self, p: &RelPath, e: &Entry) -> Node {
        self.len -= 1;
        self.account(e, -1);
        if !self.many.is_empty() {
            self.many.remove(p);
        }
        let mut target = None;
        if e.kind == Kind::Symlink {
            target = self.links.remove(p);
        }
        e.node(|| target.unwrap_or_default())
    }

    /// Adds a directory's listing from a full scan to a tree being built,
    /// which holds nothing in that directory yet (the directory's own entry
    /// comes with its parent's listing). Its subdirectories become entries,
    /// and so does each file whose stat matches `prior`'s cache for it (with
    /// `prior`'s hash; [`Tree::adopt_chunk_lists`] brings the chunk lists).
    /// What is left, files to hash and symlinks to read, is returned.
    ///
    /// A restart's scan: one merge of two sorted lists per directory
    /// instead of a lookup and an insert per file.
    pub fn add_listing(&mut self, l: Listing, prior: Option<&Tree>) -> Vec<(String, Stat)> {
        self.changed();
        let old: &[Entry] = prior
            .and_then(|t| t.dirs.get(l.dir.as_str()))
            .map_or(&[], |l| l.as_slice());
        let mut list = Vec::with_capacity(l.entries.len());
        let mut rest = Vec::new();
        let mut j = 0;
        for (name, st) in l.entries {
            let e = match st.kind {
                FileKind::Dir => Entry::new(&name, &Node::Dir, None),
                FileKind::File => {
                    while j < old.len() && old[j].name.as_str() < name.as_str() {
                        j += 1;
                    }
                    match old.get(j).filter(|e| e.name == name && e.matches(&st)) {
                        Some(e) => e.clone(),
                        None => {
                            rest.push((name, st));
                            continue;
                        }
                    }
                }
                FileKind::Symlink | FileKind::Other => {
                    rest.push((name, st));
                    continue;
                }
            };
            self.account(&e, 1);
            list.push(e);
        }
        if !list.is_empty() {
            debug_assert!(
                !self.dirs.contains_key(l.dir.as_str()),
                "{} listed twice",
                l.dir
            );
            self.len += list.len();
            self.invalidate_str(&l.dir);
            self.dirs.insert(l.dir.into(), Arc::new(list));
        }
        rest
    }

    /// Takes `prior`'s chunk list of each file [`Tree::add_listing`] took
    /// from it (still the same content).
    pub fn adopt_chunk_lists(&mut self, prior: &Tree) {
        self.changed();
        for (p, l) in &prior.many {
            let same = match (self.find(p), prior.find(p)) {
                (Some(a), Some(b)) => a.seen().is_some() && a.hash == b.hash && a.size == b.size,
                _ => false,
            };
            if same && !self.many.contains_key(p) {
                self.many.insert(p.clone(), l.clone());
            }
        }
    }

    /// Removes `p` and everything below it; returns what was removed, in path order.
    pub fn remove_subtree(&mut self, p: &RelPath) -> Vec<(RelPath, Node)> {
        self.changed();
        let mut out = Vec::new();
        let (dir, name) = split(p.as_str());
        if let Some(slot) = self.dirs.get_mut(dir)
            && let Ok(i) = slot.binary_search_by(by_name(name))
        {
            let list = Arc::make_mut(slot);
            let e = list.remove(i);
            if list.is_empty() {
                self.dirs.remove(dir);
            }
            let n = self.removed(p, &e);
            out.push((p.clone(), n));
        }
        self.take_below(p.as_str(), &mut out);
        if !out.is_empty() {
            self.invalidate(p);
        }
        out
    }

    /// Removes everything below the directory `d`, in path order.
    fn take_below(&mut self, d: &str, out: &mut Vec<(RelPath, Node)>) {
        let Some(list) = self.dirs.remove(d) else {
            return;
        };
        for e in Arc::unwrap_or_clone(list) {
            let path = RelPath::trusted(&join(d, &e.name));
            let n = self.removed(&path, &e);
            out.push((path.clone(), n));
            self.take_below(path.as_str(), out);
        }
    }

    /// `p` (if present) and every path below it, in order.
    pub fn subtree_keys(&self, p: &RelPath) -> Vec<RelPath> {
        let mut keys = Vec::new();
        if self.find(p).is_some() {
            keys.push(p.clone());
        }
        keys.extend(self.walk(Some(p)).map(|(k, _)| k));
        keys
    }

    fn walk(&self, dir: Option<&RelPath>) -> Walk<'_> {
        let d = dir.map(RelPath::as_str).unwrap_or("");
        Walk {
            dirs: &self.dirs,
            stack: self
                .dirs
                .get(d)
                .map(|l| vec![(d.to_owned(), l.iter())])
                .unwrap_or_default(),
        }
    }

    /// Every entry strictly below `dir` (`None`: the whole tree), in path
    /// order ([`path_cmp`]).
    pub fn descendants(&self, dir: Option<&RelPath>) -> impl Iterator<Item = (RelPath, Node)> {
        self.walk(dir).map(|(p, e)| {
            let n = self.node_at(p.as_str(), e);
            (p, n)
        })
    }

    /// Every entry, in path order ([`path_cmp`]).
    pub fn iter(&self) -> impl Iterator<Item = (RelPath, Node)> {
        self.descendants(None)
    }

    /// Every directory below the top level, in no particular order (no
    /// other entry is looked at: cheaper than filtering [`Tree::iter`]).
    pub fn dirs(&self) -> impl Iterator<Item = RelPath> + '_ {
        self.dirs.iter().flat_map(|(d, l)| {
            l.iter()
                .filter(|e| e.is_dir())
                .map(move |e| RelPath::trusted(&join(d, &e.name)))
        })
    }

    /// Every directory below the top level that holds an entry or is above
    /// one that does, in no particular order: what a tree of files alone
    /// (a saved stat cache) knows of the directories.
    pub fn dirs_above_entries(&self) -> Vec<RelPath> {
        let mut out: std::collections::HashSet<&str> = std::collections::HashSet::new();
        for d in self.dirs.keys() {
            let mut d: &str = d;
            while !d.is_empty() && out.insert(d) {
                d = split(d).0;
            }
        }
        out.into_iter().map(RelPath::trusted).collect()
    }

    /// Direct children of `dir` (`None`: the top level), in name order.
    pub fn children(&self, dir: Option<&RelPath>) -> Vec<(RelPath, Node)> {
        let d = dir.map(RelPath::as_str).unwrap_or("");
        self.dirs
            .get(d)
            .map(|l| {
                l.iter()
                    .map(|e| {
                        let p = join(d, &e.name);
                        let n = self.node_at(&p, e);
                        (RelPath::trusted(&p), n)
                    })
                    .collect()
            })
            .unwrap_or_default()
    }

    /// The Merkle root of the whole tree.
    pub fn root(&self) -> Hash {
        self.dir_hash("")
    }

    fn dir_hash(&self, dir: &str) -> Hash {
        if let Some(h) = self.dir_cache.lock().expect("dir cache poisoned").get(dir) {
            return *h;
        }
        // The whole input in one buffer, hashed in one call (the same hash
        // as feeding it piece by piece, at a fraction of the calls).
        let list = self.dirs.get(dir).map(|l| l.as_slice()).unwrap_or_default();
        let mut b = Vec::with_capacity(1 + list.len() * 64);
        b.push(b'd');
        for e in list {
            let child = match e.kind {
                Kind::Dir => self.dir_hash(&join(dir, &e.name)),
                Kind::File => file_leaf_hash(e.flags & EXEC != 0, &e.hash),
                Kind::Symlink => self.node_at(&join(dir, &e.name), e).leaf_hash(),
            };
            let name = e.name.as_bytes();
            b.extend_from_slice(&(name.len() as u32).to_le_bytes());
            b.extend_from_slice(name);
            b.extend_from_slice(child.as_bytes());
        }
        let out = blake3::hash(&b);
        self.dir_cache
            .lock()
            .expect("dir cache poisoned")
            .insert(dir.into(), out);
        out
    }
}

/// Depth-first walk in path order: a directory's subtree right after it.
struct Walk<'a> {
    dirs: &'a HashMap<Box<str>, Arc<Vec<Entry>>>,
    stack: Vec<(String, std::slice::Iter<'a, Entry>)>,
}

impl<'a> Iterator for Walk<'a> {
    type Item = (RelPath, &'a Entry);

    fn next(&mut self) -> Option<Self::Item> {
        loop {
            let (dir, entries) = self.stack.last_mut()?;
            let Some(e) = entries.next() else {
                self.stack.pop();
                continue;
            };
            let path = join(dir, &e.name);
            let out = RelPath::trusted(&path);
            if e.is_dir()
                && let Some(l) = self.dirs.get(path.as_str())
            {
                self.stack.push((path, l.iter()));
            }
            return Some((out, e));
        }
    }
}

impl Clone for Tree {
    fn clone(&self) -> Self {
        Tree {
            dirs: self.dirs.clone(),
            dir_cache: Mutex::new(self.dir_cache.lock().expect("dir cache poisoned").clone()),
            many: self.many.clone(),
            links: self.links.clone(),
            len: self.len,
            files: self.files,
            bytes: self.bytes,
            stamp: self.stamp,
        }
    }
}

impl FromIterator<(RelPath, Node)> for Tree {
    fn from_iter<I: IntoIterator<Item = (RelPath, Node)>>(iter: I) -> Self {
        let mut t = Tree::new();
        for (p, n) in iter {
            t.insert(p, n);
        }
        t
    }
}

/// Hex form of a root for people and JSON.
pub fn hex(h: &Hash) -> String {
    h.to_hex().to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(s: &str) -> RelPath {
        RelPath::new(s).unwrap()
    }

    fn file(b: &[u8], exec: bool) -> Node {
        Node::File {
            hash: blake3::hash(b),
            size: b.len() as u64,
            exec,
        }
    }

    fn sample() -> Tree {
        [
            (p("a"), Node::Dir),
            (p("a/x"), file(b"x", false)),
            (p("a/y.txt"), file(b"y", false)),
            (p("a.b"), file(b"ab", false)),
            (p("b"), Node::Dir),
            (p("b/c"), Node::Dir),
            (p("b/c/d"), file(b"d", true)),
            (
                p("l"),
                Node::Symlink {
                    target: "a/x".into(),
                },
            ),
        ]
        .into_iter()
        .collect()
    }

    fn stat(kind: FileKind, size: u64, mtime_ns: i64) -> Stat {
        Stat {
            kind,
            size,
            mtime_ns,
            ctime_ns: mtime_ns,
            ino: 9,
            exec: false,
        }
    }

    fn cached(b: &[u8], st: &Stat, chunks: Vec<ChunkRef>) -> Cached {
        Cached {
            size: st.size,
            mtime_ns: st.mtime_ns,
            ctime_ns: st.ctime_ns,
            ino: st.ino,
            exec: st.exec,
            racy: false,
            hash: blake3::hash(b),
            chunks: chunks.into_boxed_slice(),
        }
    }

    /// The chunk list of a 3-byte file of two chunks ("bi", "g").
    fn two_chunks() -> Vec<ChunkRef> {
        vec![
            ChunkRef {
                id: blake3::hash(b"bi"),
                len: 2,
            },
            ChunkRef {
                id: blake3::hash(b"g"),
                len: 1,
            },
        ]
    }

    #[test]
    fn an_unseen_file_keeps_its_entry_and_loses_its_stat_cache_and_chunk_list() {
        let st = stat(FileKind::File, 3, 10);
        let two = two_chunks();
        let mut t = sample();
        t.insert_hashed(p("a/big"), cached(b"big", &st, two.clone()));
        let root = t.root();
        assert_eq!(t.hashed(&p("a/big")).unwrap().chunks().to_vec(), two);
        assert!(t.unsee(&p("a/big")));
        assert!(t.hashed(&p("a/big")).is_none());
        assert!(t.many.is_empty(), "its chunk list is dropped");
        assert_eq!(t.get(&p("a/big")), Some(file(b"big", false)));
        assert_eq!(t.root(), root, "the synced view is unchanged");
        assert!(!t.unsee(&p("a/big")), "once");
        assert!(!t.unsee(&p("a/x")), "never hashed here");
        assert!(!t.unsee(&p("nowhere/z")));
    }

    #[test]
    fn a_listing_takes_unchanged_files_from_the_prior_tree_and_returns_the_rest() {
        let one = |b: &[u8]| {
            vec![ChunkRef {
                id: blake3::hash(b),
                len: b.len() as u32,
            }]
        };
        let two = two_chunks();
        let f = |size| stat(FileKind::File, size, 10);
        let mut prior = Tree::new();
        prior.insert_hashed(p("a/big"), cached(b"big", &f(3), two.clone()));
        prior.insert_hashed(p("a/x"), cached(b"x", &f(1), one(b"x")));
        prior.insert_hashed(p("a/y"), cached(b"y", &f(1), one(b"y")));
        let mut racy = cached(b"r", &f(1), one(b"r"));
        racy.racy = true;
        prior.insert_hashed(p("a/racy"), racy);

        let mut t = Tree::new();
        let listing = |dir: &str, entries: Vec<(&str, Stat)>| Listing {
            dir: dir.into(),
            entries: entries
                .into_iter()
                .map(|(n, s)| (n.to_owned(), s))
                .collect(),
        };
        let link = stat(FileKind::Symlink, 3, 10);
        let top = listing("", vec![("a", stat(FileKind::Dir, 0, 1)), ("l", link)]);
        let rest = t.add_listing(top, Some(&prior));
        assert_eq!(rest, [("l".to_owned(), link)]);
        let a = listing(
            "a",
            vec![
                ("big", f(3)),
                ("new", f(5)),
                ("racy", f(1)),
                ("x", f(1)),
                ("y", stat(FileKind::File, 1, 11)),
            ],
        );
        let rest: Vec<String> = t
            .add_listing(a, Some(&prior))
            .into_iter()
            .map(|(n, _)| n)
            .collect();
        assert_eq!(rest, ["new", "racy", "y"], "new, never trusted, changed");
        t.adopt_chunk_lists(&prior);
        assert_eq!(t.hashed(&p("a/big")).unwrap().chunks(), two);
        assert_eq!((t.len(), t.files(), t.bytes()), (3, 2, 4));

        // The same tree as inserting each entry makes.
        let mut u = Tree::new();
        u.insert(p("a"), Node::Dir);
        for f in ["a/big", "a/x"] {
            u.insert_hashed(p(f), prior.hashed(&p(f)).unwrap().to_cached());
        }
        assert_eq!(t.root(), u.root());
        assert_eq!(t.iter().collect::<Vec<_>>(), u.iter().collect::<Vec<_>>());
        assert_eq!(t.dirs_above_entries(), [p("a")]);
    }

    #[test]
    fn children_skip_grandchildren() {
        let t = sample();
        let top: Vec<_> = t
            .children(None)
            .iter()
            .map(|(k, _)| k.as_str().to_owned())
            .collect();
        assert_eq!(top, ["a", "a.b", "b", "l"]);
        let b: Vec<_> = t
            .children(Some(&p("b")))
            .iter()
            .map(|(k, _)| k.as_str().to_owned())
            .collect();
        assert_eq!(b, ["b/c"]);
    }

    #[test]
    fn root_tracks_every_attribute() {
        let base = sample().root();
        assert_eq!(base, sample().root(), "deterministic");

        let mut t = sample();
        t.root();
        t.insert(p("b/c/d"), file(b"d", false));
        assert_ne!(t.root(), base, "exec bit");

        let mut t = sample();
        t.root();
        t.insert(p("a/x"), file(b"X", false));
        assert_ne!(t.root(), base, "content");

        let mut t = sample();
        t.insert(p("empty"), Node::Dir);
        assert_ne!(t.root(), base, "empty directory");

        let mut t = sample();
        t.insert(
            p("l"),
            Node::Symlink {
                target: "a/y.txt".into(),
            },
        );
        assert_ne!(t.root(), base, "link target");

        let mut t = sample();
        t.remove_subtree(&p("a"));
        t.insert(p("z"), Node::Dir);
        t.insert(p("z/x"), file(b"x", false));
        t.insert(p("z/y.txt"), file(b"y", false));
        assert_ne!(t.root(), base, "directory rename");
    }

    #[test]
    fn cached_root_equals_fresh_root() {
        let mut t = sample();
        t.root();
        t.insert(p("b/c/e"), file(b"e", false));
        t.remove_subtree(&p("a"));
        let cached = t.root();
        let fresh: Tree = t.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
        assert_eq!(cached, fresh.root());
        assert_eq!(t.files(), 3);
    }

    #[test]
    fn iteration_puts_a_directory_subtree_right_after_it() {
        let t = sample();
        let all: Vec<RelPath> = t.iter().map(|(k, _)| k).collect();
        let names: Vec<&str> = all.iter().map(RelPath::as_str).collect();
        assert_eq!(
            names,
            ["a", "a/x", "a/y.txt", "a.b", "b", "b/c", "b/c/d", "l"]
        );
        assert!(
            all.windows(2)
                .all(|w| path_cmp(&w[0], &w[1]) == Ordering::Less)
        );
        let below_b: Vec<String> = t
            .descendants(Some(&p("b")))
            .map(|(k, _)| k.to_string())
            .collect();
        assert_eq!(below_b, ["b/c", "b/c/d"]);
        let keys: Vec<String> = t
            .subtree_keys(&p("a"))
            .iter()
            .map(|k| k.to_string())
            .collect();
        assert_eq!(keys, ["a", "a/x", "a/y.txt"]);
        let mut dirs: Vec<String> = t.dirs().map(|d| d.to_string()).collect();
        dirs.sort();
        let expected: Vec<String> = all
            .iter()
            .filter(|k| t.is_dir(k))
            .map(|k| k.to_string())
            .collect();
        assert_eq!(dirs, expected);
    }

    #[test]
    fn removal_and_replacement_keep_the_counts() {
        let mut t = sample();
        let gone: Vec<String> = t
            .remove_subtree(&p("b"))
            .iter()
            .map(|(k, _)| k.to_string())
            .collect();
        assert_eq!(gone, ["b", "b/c", "b/c/d"]);
        assert_eq!((t.len(), t.files()), (5, 3));
        // A file replacing a directory takes what was below it.
        t.insert(p("a"), file(b"now a file", false));
        assert_eq!((t.len(), t.files()), (3, 2));
        assert!(t.get(&p("a/x")).is_none());
        let fresh: Tree = t.iter().map(|(k, v)| (k, v.clone())).collect();
        assert_eq!(fresh.root(), t.root());
        // A symlink's target goes with it.
        let link = t.remove_subtree(&p("l"));
        assert!(matches!(&link[..], [(_, Node::Symlink { target })] if target == "a/x"));
        assert!(t.links.is_empty());
    }

    #[test]
    fn a_clone_shares_the_lists_until_one_side_changes_one() {
        let mut t: Tree = (0..50)
            .flat_map(|d| {
                let dir = (p(&format!("d{d}")), Node::Dir);
                let files = (0..20).map(move |f| (p(&format!("d{d}/f{f}")), file(b"x", false)));
                std::iter::once(dir).chain(files)
            })
            .collect();
        let belief = t.clone();
        let shared = |a: &Tree, b: &Tree| {
            a.dirs
                .iter()
                .filter(|(k, l)| b.dirs.get(*k).is_some_and(|m| Arc::ptr_eq(l, m)))
                .count()
        };
        assert_eq!(shared(&t, &belief), 51);
        t.insert(p("d7/f3"), file(b"edited", false));
        assert_eq!(shared(&t, &belief), 50, "only d7 was copied");
        assert_eq!(belief.get(&p("d7/f3")), Some(file(b"x", false)));
        assert_ne!(t.root(), belief.root());
    }

    #[test]
    fn a_hashed_file_keeps_its_stat_and_a_list_only_when_it_has_several_chunks() {
        use crate::chunking::{chunk_bytes, pseudo_random};
        let st = |size| Stat {
            kind: crate::scan::FileKind::File,
            size,
            mtime_ns: 1_500_000_000,
            ctime_ns: 1_500_000_000,
            ino: 7,
            exec: false,
        };
        let mut t = Tree::new();
        for (name, data) in [
            ("empty", Vec::new()),
            ("small", b"small file".to_vec()),
            ("big", pseudo_random(1 << 20, 5)),
        ] {
            let d = chunk_bytes(&data);
            let c = Cached::hashed_since(&st(d.size), d.clone(), 10_000_000_000);
            t.insert_hashed(p(name), c);
            let h = t.hashed(&p(name)).unwrap();
            assert_eq!(&*h.chunks(), &d.chunks[..], "{name}");
            assert_eq!(h.hash, d.hash);
            assert!(h.matches(&st(d.size)));
            assert!(!h.matches(&Stat {
                ino: 8,
                ..st(d.size)
            }));
            assert_eq!(h.many.is_empty(), d.chunks.len() < 2, "{name}");
            assert_eq!(t.many.len(), usize::from(name == "big"));
        }
        assert_eq!(t.hashed_files().count(), 3);
        t.insert(p("small"), Node::Dir);
        assert!(
            t.hashed(&p("small")).is_none(),
            "the stat cache goes with the file"
        );
        t.remove_subtree(&p("big"));
        assert!(t.many.is_empty(), "the list goes with the file");
        assert!(
            std::mem::size_of::<Entry>() <= 96,
            "{}",
            std::mem::size_of::<Entry>()
        );
    }

    #[test]
    fn a_list_built_entry_by_entry_gives_its_room_back_and_keeps_what_is_shared() {
        let mut t = Tree::new();
        t.insert(p("d"), Node::Dir);
        for i in 0..100 {
            t.insert(p(&format!("d/f{i:03}")), file(b"x", false));
        }
        let room = |t: &Tree| t.dirs["d"].capacity();
        assert!(room(&t) > 100, "grown by half: {}", room(&t));
        let root = t.root();
        let shared = t.clone();
        t.shrink_to_fit();
        assert!(room(&t) > 100, "a list the clone shares is left alone");
        drop(shared);
        t.shrink_to_fit();
        assert_eq!(room(&t), 100);
        assert_eq!(t.root(), root);
        assert_eq!(t.len(), 101);
    }

    #[test]
    fn every_change_takes_a_new_stamp_and_a_relinked_ctime_none() {
        let mut t = sample();
        let st = |ino, ctime_ns| Stat {
            kind: FileKind::File,
            size: 1,
            mtime_ns: 5,
            ctime_ns,
            ino,
            exec: false,
        };
        let c = Cached {
            size: 1,
            mtime_ns: 5,
            ctime_ns: 6,
            ino: 7,
            exec: false,
            racy: false,
            hash: blake3::hash(b"x"),
            chunks: Box::default(),
        };
        t.insert_hashed(p("a/x"), c);
        let stamps = |t: &Tree, seen: &mut Vec<u64>| {
            assert!(!seen.contains(&t.stamp()), "stamp {} reused", t.stamp());
            seen.push(t.stamp());
        };
        let mut seen = vec![];
        stamps(&t, &mut seen);
        let copy = t.clone();
        assert_eq!(copy.stamp(), t.stamp(), "a clone is the same tree");
        assert_eq!(t.relink(&p("a/x"), &st(7, 9)), Some(true));
        assert_eq!(t.relink(&p("a/x"), &st(7, 9)), Some(false));
        assert_eq!(t.relink(&p("a/x"), &st(8, 9)), None, "another inode");
        assert_eq!(t.hashed(&p("a/x")).unwrap().seen.ctime_ns, 9);
        t.shrink_to_fit();
        assert_eq!(
            t.stamp(),
            copy.stamp(),
            "a ctime and spare room are no change"
        );
        assert_eq!(
            copy.hashed(&p("a/x")).unwrap().seen.ctime_ns,
            6,
            "the clone keeps its own"
        );
        t.insert(p("new"), file(b"n", false));
        stamps(&t, &mut seen);
        t.settle(&p("a/x"));
        stamps(&t, &mut seen);
        t.unsee(&p("a/x"));
        stamps(&t, &mut seen);
        t.remove_subtree(&p("b"));
        stamps(&t, &mut seen);
        let mut other = copy.clone();
        other.insert(p("new"), file(b"n", false));
        stamps(&other, &mut seen);
    }

    #[test]
    fn order_of_insertion_does_not_matter() {
        let a = sample();
        let mut v: Vec<_> = a.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
        v.reverse();
        let b: Tree = v.into_iter().collect();
        assert_eq!(a.root(), b.root());
    }
}

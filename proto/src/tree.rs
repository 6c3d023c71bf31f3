//! Synced entries and the tree root.
//!
//! The root is a Merkle hash over directories: a file hashes its kind, exec bit
//! and content hash; a symlink its target; a directory the sorted list of its
//! children's names and hashes. Both sides compute it over their own view, so
//! "in sync" means equal roots, not that the daemon believes so.
//!
//! [`Tree`] keeps entries in path order (all descendants of a directory are
//! contiguous) and caches directory hashes; a change invalidates only its
//! ancestors, so the root after a one-file edit in a 100k-file tree costs a few
//! directory hashes, not a full pass.

use std::collections::{BTreeMap, HashMap};
use std::ops::Bound;
use std::sync::Mutex;

use crate::chunking::{Hash, hash_from_bytes};
use crate::path::RelPath;
use crate::v1;

/// What a synced path is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Node {
    File { hash: Hash, size: u64, exec: bool },
    Dir,
    Symlink { target: String },
}

impl Node {
    /// The hash a leaf contributes to its directory (directories: see [`Tree`]).
    fn leaf_hash(&self) -> Hash {
        let mut h = blake3::Hasher::new();
        match self {
            Node::File { hash, exec, .. } => {
                h.update(b"f");
                h.update(&[*exec as u8]);
                h.update(hash.as_bytes());
            }
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

/// A set of synced entries with a cached Merkle root.
#[derive(Default)]
pub struct Tree {
    entries: BTreeMap<RelPath, Node>,
    /// Hashes of directories (key "" is the root) still valid since the last
    /// change below them.
    dir_cache: Mutex<HashMap<String, Hash>>,
    files: u64,
    bytes: u64,
}

impl Tree {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Number of regular files.
    pub fn files(&self) -> u64 {
        self.files
    }

    /// Total size of regular files.
    pub fn bytes(&self) -> u64 {
        self.bytes
    }

    pub fn get(&self, p: &RelPath) -> Option<&Node> {
        self.entries.get(p)
    }

    pub fn iter(&self) -> impl Iterator<Item = (&RelPath, &Node)> {
        self.entries.iter()
    }

    fn invalidate(&mut self, p: &RelPath) {
        let cache = self.dir_cache.get_mut().expect("dir cache poisoned");
        if cache.is_empty() {
            return;
        }
        cache.remove("");
        cache.remove(p.as_str());
        for a in p.ancestors() {
            cache.remove(a.as_str());
        }
    }

    fn account(&mut self, n: &Node, sign: i64) {
        if let Node::File { size, .. } = n {
            self.files = self.files.wrapping_add_signed(sign);
            self.bytes = self.bytes.wrapping_add_signed(sign * *size as i64);
        }
    }

    /// Inserts or replaces one entry; returns the previous one.
    pub fn insert(&mut self, p: RelPath, n: Node) -> Option<Node> {
        self.invalidate(&p);
        self.account(&n, 1);
        let old = self.entries.insert(p, n);
        if let Some(o) = &old {
            self.account(&o.clone(), -1);
        }
        old
    }

    /// Removes `p` and everything below it; returns what was removed, in path order.
    pub fn remove_subtree(&mut self, p: &RelPath) -> Vec<(RelPath, Node)> {
        let keys: Vec<RelPath> = self.subtree_keys(p);
        if keys.is_empty() {
            return Vec::new();
        }
        self.invalidate(p);
        let mut out = Vec::with_capacity(keys.len());
        for k in keys {
            if let Some(n) = self.entries.remove(&k) {
                self.account(&n, -1);
                out.push((k, n));
            }
        }
        out
    }

    /// `p` (if present) and every path below it, in order.
    pub fn subtree_keys(&self, p: &RelPath) -> Vec<RelPath> {
        let mut keys = Vec::new();
        if self.entries.contains_key(p) {
            keys.push(p.clone());
        }
        keys.extend(self.descendants(Some(p)).map(|(k, _)| k.clone()));
        keys
    }

    /// Every entry strictly below `dir` (`None`: the whole tree).
    pub fn descendants<'a>(
        &'a self,
        dir: Option<&RelPath>,
    ) -> Box<dyn Iterator<Item = (&'a RelPath, &'a Node)> + 'a> {
        match dir {
            None => Box::new(self.entries.iter()),
            Some(d) => {
                let lo = format!("{}/", d.as_str());
                let hi = format!("{}0", d.as_str()); // '0' is the byte after '/'
                Box::new(
                    self.entries.range::<str, _>((
                        Bound::Included(lo.as_str()),
                        Bound::Excluded(hi.as_str()),
                    )),
                )
            }
        }
    }

    /// Direct children of `dir` (`None`: the top level), in name order.
    pub fn children<'a>(&'a self, dir: Option<&RelPath>) -> Vec<(&'a RelPath, &'a Node)> {
        let prefix_len = dir.map(|d| d.as_str().len() + 1).unwrap_or(0);
        let hi = match dir {
            Some(d) => format!("{}0", d.as_str()), // '0' is the byte after '/'
            None => String::from("\u{10FFFF}"),
        };
        let mut lo = match dir {
            Some(d) => Bound::Included(format!("{}/", d.as_str())),
            None => Bound::Unbounded,
        };
        let mut out = Vec::new();
        // Descendants of a child are not contiguous with the child itself
        // ("a", "a.b", "a/x": '.' sorts before '/'), so grandchildren are
        // skipped by seeking past their subtree when one is met.
        'seek: loop {
            let range = self.entries.range::<str, _>((
                lo.as_ref().map(String::as_str),
                Bound::Excluded(hi.as_str()),
            ));
            for (k, v) in range {
                if let Some(i) = k.as_str()[prefix_len..].find('/') {
                    let child = &k.as_str()[..prefix_len + i];
                    lo = Bound::Included(format!("{child}0"));
                    continue 'seek;
                }
                out.push((k, v));
            }
            break;
        }
        out
    }

    /// The Merkle root of the whole tree.
    pub fn root(&self) -> Hash {
        self.dir_hash(None)
    }

    fn dir_hash(&self, dir: Option<&RelPath>) -> Hash {
        let key = dir.map(|d| d.as_str()).unwrap_or("");
        if let Some(h) = self.dir_cache.lock().expect("dir cache poisoned").get(key) {
            return *h;
        }
        let mut h = blake3::Hasher::new();
        h.update(b"d");
        for (k, v) in self.children(dir) {
            let child = match v {
                Node::Dir => self.dir_hash(Some(k)),
                leaf => leaf.leaf_hash(),
            };
            let name = k.name().as_bytes();
            h.update(&(name.len() as u32).to_le_bytes());
            h.update(name);
            h.update(child.as_bytes());
        }
        let out = h.finalize();
        self.dir_cache
            .lock()
            .expect("dir cache poisoned")
            .insert(key.to_string(), out);
        out
    }
}

impl Clone for Tree {
    fn clone(&self) -> Self {
        Tree {
            entries: self.entries.clone(),
            dir_cache: Mutex::new(self.dir_cache.lock().expect("dir cache poisoned").clone()),
            files: self.files,
            bytes: self.bytes,
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
    fn order_of_insertion_does_not_matter() {
        let a = sample();
        let mut v: Vec<_> = a.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
        v.reverse();
        let b: Tree = v.into_iter().collect();
        assert_eq!(a.root(), b.root());
    }
}

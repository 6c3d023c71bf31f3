//! Planning: the ops that turn the agent's tree into the local tree, and their
//! effect on the daemon's belief about the agent's tree.

use std::collections::BTreeSet;
use std::sync::Arc;

use bridge_proto::chunking::{ChunkRef, Hash};
use bridge_proto::path::RelPath;
use bridge_proto::tree::{Node, Seen, Tree, path_cmp};
use bridge_proto::{splice, v1};

use crate::local::Local;

/// One planned change to the mirror.
#[derive(Debug, Clone)]
pub(super) enum PlannedOp {
    Remove(RelPath),
    Mkdir(RelPath),
    Symlink(RelPath, String),
    Put {
        path: RelPath,
        node: Node,
        chunks: Arc<[ChunkRef]>,
        /// The agent's version (content hash) and the steps that turn its
        /// chunk list into `chunks`, when that is much smaller than `chunks`.
        splice: Option<(Hash, Vec<v1::Splice>)>,
        /// The stat `chunks` was hashed under, when the index trusts it (not
        /// racy): bodies read while the file still has it are the hashed
        /// bytes, so sending checks it instead of rehashing them.
        seen: Option<Seen>,
    },
}

impl PlannedOp {
    pub(super) fn path(&self) -> &RelPath {
        match self {
            PlannedOp::Remove(p) | PlannedOp::Mkdir(p) | PlannedOp::Symlink(p, _) => p,
            PlannedOp::Put { path, .. } => path,
        }
    }

    pub(super) fn to_wire(&self) -> v1::Op {
        use v1::op::Op as W;
        let op = match self {
            PlannedOp::Remove(p) => W::Remove(v1::Remove {
                path: p.to_string(),
            }),
            PlannedOp::Mkdir(p) => W::Mkdir(v1::Mkdir {
                path: p.to_string(),
            }),
            PlannedOp::Symlink(p, t) => W::Symlink(v1::Symlink {
                path: p.to_string(),
                target: t.clone(),
            }),
            PlannedOp::Put {
                path,
                node,
                chunks,
                splice,
                ..
            } => {
                let (base, steps, chunks) = match splice {
                    Some((base, steps)) => (base.as_bytes().to_vec(), steps.clone(), Vec::new()),
                    None => (
                        Vec::new(),
                        Vec::new(),
                        chunks.iter().map(v1::ChunkRef::from).collect(),
                    ),
                };
                W::Put(v1::Put {
                    path: path.to_string(),
                    executable: matches!(node, Node::File { exec: true, .. }),
                    chunks,
                    base: base.into(),
                    splice: steps,
                })
            }
        };
        v1::Op { op: Some(op) }
    }

    /// Applies this op to the daemon's belief about the agent's tree.
    pub(super) fn apply_to(&self, t: &mut Tree) {
        match self {
            PlannedOp::Remove(p) => {
                t.remove_subtree(p);
            }
            PlannedOp::Mkdir(p) => {
                if !t.is_dir(p) {
                    t.remove_subtree(p);
                }
                add_parents(t, p);
                t.insert(p.clone(), Node::Dir);
            }
            PlannedOp::Symlink(p, target) => {
                t.remove_subtree(p);
                add_parents(t, p);
                t.insert(
                    p.clone(),
                    Node::Symlink {
                        target: target.clone(),
                    },
                );
            }
            PlannedOp::Put { path, node, .. } => {
                t.remove_subtree(path);
                add_parents(t, path);
                t.insert(path.clone(), node.clone());
            }
        }
    }
}

fn add_parents(t: &mut Tree, p: &RelPath) {
    for a in p.ancestors() {
        if !t.is_dir(&a) {
            t.remove_subtree(&a);
            t.insert(a, Node::Dir);
        }
    }
}

/// The op that makes the agent's entry at `p` (`remote`) equal to the local
/// `n` (`None` when the file's chunk list is unknown: it vanished after the
/// scan). A large file the agent holds the previous version of is spliced.
fn create(local: &Local, p: &RelPath, n: &Node, remote: Option<&Node>) -> Option<PlannedOp> {
    Some(match n {
        Node::Dir => PlannedOp::Mkdir(p.clone()),
        Node::Symlink { target } => PlannedOp::Symlink(p.clone(), target.clone()),
        Node::File { .. } => {
            let chunks = local.chunks(p)?;
            let splice = match (remote, local.previous.get(p)) {
                (Some(Node::File { hash, .. }), Some(prev)) if prev.hash == *hash => {
                    splice::encode(&prev.chunks, &chunks).map(|steps| (*hash, steps))
                }
                _ => None,
            };
            PlannedOp::Put {
                path: p.clone(),
                node: n.clone(),
                chunks,
                splice,
                seen: local.trusted_seen(p),
            }
        }
    })
}

/// Collects ops: removals first (a removed directory covers everything below
/// it, so removals must arrive in path order), then creations in path order,
/// so parents come before children.
#[derive(Default)]
struct Ops {
    removes: Vec<PlannedOp>,
    creates: Vec<PlannedOp>,
    last_removed: Option<RelPath>,
}

impl Ops {
    fn remove(&mut self, p: &RelPath) {
        if !self.last_removed.as_ref().is_some_and(|l| p.starts_with(l)) {
            self.removes.push(PlannedOp::Remove(p.clone()));
            self.last_removed = Some(p.clone());
        }
    }

    fn into_vec(mut self) -> Vec<PlannedOp> {
        self.removes.append(&mut self.creates);
        self.removes
    }
}

/// The ops that turn `remote` into `local`, comparing every entry.
pub(super) fn diff(local: &Local, remote: &Tree) -> Vec<PlannedOp> {
    let mut ops = Ops::default();
    let mut li = local.tree.iter().peekable();
    let mut ri = remote.iter().peekable();
    loop {
        match (li.peek(), ri.peek()) {
            (None, None) => break,
            (Some((lp, ln)), Some((rp, rn))) if lp == rp => {
                if ln != rn {
                    ops.creates.extend(create(local, lp, ln, Some(rn)));
                }
                li.next();
                ri.next();
            }
            (Some((lp, ln)), Some((rp, _))) if path_cmp(lp, rp).is_lt() => {
                ops.creates.extend(create(local, lp, ln, None));
                li.next();
            }
            (Some((lp, ln)), None) => {
                ops.creates.extend(create(local, lp, ln, None));
                li.next();
            }
            (_, Some((rp, _))) => {
                ops.remove(rp);
                ri.next();
            }
        }
    }
    ops.into_vec()
}

/// The same ops as [`diff`], looking only at `touched` paths: valid when the
/// two trees agreed everywhere else (the engine falls back to [`diff`] after
/// any doubt, and the root check catches the rest). An edit in a 100k-file
/// tree costs a few lookups instead of a 100k-entry walk.
pub(super) fn diff_paths(
    local: &Local,
    remote: &Tree,
    touched: &BTreeSet<RelPath>,
) -> Vec<PlannedOp> {
    let mut ops = Ops::default();
    for p in touched {
        match (local.tree.get(p), remote.get(p)) {
            (Some(l), Some(r)) if l == r => {}
            (Some(l), r) => ops.creates.extend(create(local, p, &l, r.as_ref())),
            (None, Some(_)) => ops.remove(p),
            (None, None) => {}
        }
    }
    ops.into_vec()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::local::Dirty;
    use bridge_proto::chunking::chunk_bytes;

    fn p(s: &str) -> RelPath {
        RelPath::new(s).unwrap()
    }

    #[test]
    fn diff_orders_removals_then_parents_first() {
        let d = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(d.path().join(".git")).unwrap();
        std::fs::create_dir_all(d.path().join("new/sub")).unwrap();
        std::fs::write(d.path().join("new/sub/f"), "f").unwrap();
        std::fs::write(d.path().join("same"), "s").unwrap();
        let mut local = Local::new(d.path().to_path_buf(), d.path().join("index"));
        local.apply([Dirty::Tree(None)].into());
        let same = local.tree.get(&p("same")).unwrap().clone();
        let remote: Tree = [
            (p("old"), Node::Dir),
            (
                p("old/a"),
                Node::File {
                    hash: chunk_bytes(b"a").hash,
                    size: 1,
                    exec: false,
                },
            ),
            (p("same"), same),
        ]
        .into_iter()
        .collect();
        let ops = diff(&local, &remote);
        let names: Vec<String> = ops
            .iter()
            .map(|o| match o {
                PlannedOp::Remove(p) => format!("rm {p}"),
                PlannedOp::Mkdir(p) => format!("mkdir {p}"),
                PlannedOp::Symlink(p, _) => format!("ln {p}"),
                PlannedOp::Put { path, .. } => format!("put {path}"),
            })
            .collect();
        assert_eq!(
            names,
            ["rm old", "mkdir new", "mkdir new/sub", "put new/sub/f"]
        );
        let mut r = remote.clone();
        for o in &ops {
            o.apply_to(&mut r);
        }
        assert_eq!(r.root(), local.tree.root());

        // Looking only at the paths that differ gives the same ops.
        let touched: BTreeSet<RelPath> = ["old", "old/a", "new", "new/sub", "new/sub/f", "same"]
            .into_iter()
            .map(p)
            .collect();
        let names2: Vec<String> = diff_paths(&local, &remote, &touched)
            .iter()
            .map(|o| format!("{o:?}").split('(').next().unwrap().to_string())
            .collect();
        let names1: Vec<String> = ops
            .iter()
            .map(|o| format!("{o:?}").split('(').next().unwrap().to_string())
            .collect();
        assert_eq!(names1, names2);
    }
}

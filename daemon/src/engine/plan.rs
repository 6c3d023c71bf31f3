//! Planning: the ops that turn the agent's tree into the local tree, and their
//! effect on the daemon's belief about the agent's tree.

use std::sync::Arc;

use bridge_proto::chunking::ChunkRef;
use bridge_proto::path::RelPath;
use bridge_proto::tree::{Node, Tree};
use bridge_proto::v1;

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
            PlannedOp::Put { path, node, chunks } => W::Put(v1::Put {
                path: path.to_string(),
                executable: matches!(node, Node::File { exec: true, .. }),
                chunks: chunks
                    .iter()
                    .map(|c| v1::ChunkRef {
                        id: c.id.as_bytes().to_vec().into(),
                        len: c.len,
                    })
                    .collect(),
            }),
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
                if !matches!(t.get(p), Some(Node::Dir)) {
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
        if !matches!(t.get(&a), Some(Node::Dir)) {
            t.remove_subtree(&a);
            t.insert(a, Node::Dir);
        }
    }
}

/// The ops that turn `remote` into `local`: removals first (a removed
/// directory covers everything below it), then creations in path order, so
/// parents come before children.
pub(super) fn diff(local: &Local, remote: &Tree) -> Vec<PlannedOp> {
    let mut removes = Vec::new();
    let mut creates = Vec::new();
    let mut li = local.tree.iter().peekable();
    let mut ri = remote.iter().peekable();
    let mut last_removed: Option<RelPath> = None;
    let create = |p: &RelPath, n: &Node| -> Option<PlannedOp> {
        Some(match n {
            Node::Dir => PlannedOp::Mkdir(p.clone()),
            Node::Symlink { target } => PlannedOp::Symlink(p.clone(), target.clone()),
            Node::File { .. } => PlannedOp::Put {
                path: p.clone(),
                node: n.clone(),
                chunks: local.chunks(p)?.chunks.clone().into(),
            },
        })
    };
    loop {
        match (li.peek(), ri.peek()) {
            (None, None) => break,
            (Some((lp, ln)), Some((rp, rn))) if lp == rp => {
                if ln != rn {
                    creates.extend(create(lp, ln));
                }
                li.next();
                ri.next();
            }
            (Some((lp, ln)), Some((rp, _))) if lp < rp => {
                creates.extend(create(lp, ln));
                li.next();
            }
            (Some((lp, ln)), None) => {
                creates.extend(create(lp, ln));
                li.next();
            }
            (_, Some((rp, _))) => {
                if !last_removed.as_ref().is_some_and(|l| rp.starts_with(l)) {
                    removes.push(PlannedOp::Remove((*rp).clone()));
                    last_removed = Some((*rp).clone());
                }
                ri.next();
            }
        }
    }
    removes.extend(creates);
    removes
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
    }
}

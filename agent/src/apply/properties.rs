//! Properties of applying sync rounds, checked on random inputs (proptest;
//! the fuzz targets check the same on many more):
//! - hostile plans (`..`, absolute paths, empty and `.` components, NULs,
//!   symlinks pointing out of the mirror, then writes through them) never
//!   create, change or remove anything outside the mirror, and never panic;
//! - random valid edit sequences leave the mirror's incrementally kept tree
//!   hash equal to a fresh scan of a tree the same edits were made to
//!   directly (what the daemon computes on its side).

use std::collections::BTreeMap;
use std::fs;
use std::path::Path;

use bridge_proto::chunking::{ChunkRef, chunk_bytes};
use bridge_proto::v1;
use proptest::prelude::*;

use super::Round;
use crate::mirror::Mirror;
use crate::store::Store;

/// One edit, with paths as the peer sends them.
#[derive(Debug, Clone)]
enum Edit {
    Put(String, Vec<u8>, bool),
    Mkdir(String),
    Symlink(String, String),
    Remove(String),
}

fn op(e: &Edit) -> v1::Op {
    use v1::op::Op;
    v1::Op {
        op: Some(match e {
            Edit::Put(path, data, exec) => Op::Put(v1::Put {
                path: path.clone(),
                executable: *exec,
                chunks: chunks(data).iter().map(v1::ChunkRef::from).collect(),
                ..Default::default()
            }),
            Edit::Mkdir(path) => Op::Mkdir(v1::Mkdir { path: path.clone() }),
            Edit::Symlink(path, target) => Op::Symlink(v1::Symlink {
                path: path.clone(),
                target: target.clone(),
            }),
            Edit::Remove(path) => Op::Remove(v1::Remove { path: path.clone() }),
        }),
    }
}

fn chunks(data: &[u8]) -> Vec<ChunkRef> {
    chunk_bytes(data).chunks
}

/// Applies `edits` as one round, sending every chunk body asked for.
/// Returns the round's root, or why it was refused.
fn apply(
    tmp: &Path,
    mirror: &mut Mirror,
    store: &mut Store,
    edits: &[Edit],
) -> Result<Vec<u8>, String> {
    let mut round = Round::new(tmp, mirror, store);
    let plan = v1::Plan {
        ops: edits.iter().map(op).collect(),
        eager: false,
    };
    let need = round.on_plan(plan).map_err(|e| e.to_string())?;
    for (e, n) in edits.iter().zip(&need.ops) {
        let Edit::Put(_, data, _) = e else { continue };
        let refs = chunks(data);
        let mut at = 0usize;
        let mut starts = Vec::new();
        for c in &refs {
            starts.push(at);
            at += c.len as usize;
        }
        for &i in &n.chunks {
            let c = refs[i as usize];
            let start = starts[i as usize];
            round
                .on_chunk(v1::ChunkData {
                    id: c.id.as_bytes().to_vec().into(),
                    compression: v1::Compression::None as i32,
                    data: data[start..start + c.len as usize].to_vec().into(),
                })
                .map_err(|e| e.to_string())?;
        }
    }
    let done = round.on_commit(1).map_err(|e| e.to_string())?;
    if !done.failures.is_empty() {
        return Err(format!("failures: {:?}", done.failures));
    }
    Ok(done.root.to_vec())
}

fn under_a_non_directory(root: &Path, path: &str) -> bool {
    let parts: Vec<&str> = path.split('/').collect();
    (1..parts.len())
        .any(|i| fs::symlink_metadata(root.join(parts[..i].join("/"))).is_ok_and(|m| !m.is_dir()))
}

/// What the daemon sends before `e` when the tree under `root` has
/// something else in the way: a file (or link) where a directory must be,
/// a directory where a file or link must be.
fn clear_the_way(root: &Path, e: &Edit) -> Vec<Edit> {
    let path = match e {
        Edit::Put(p, ..) | Edit::Mkdir(p) | Edit::Symlink(p, _) => p,
        Edit::Remove(_) => return Vec::new(),
    };
    let mut ops = Vec::new();
    let parts: Vec<&str> = path.split('/').collect();
    for i in 1..parts.len() {
        let ancestor = parts[..i].join("/");
        match fs::symlink_metadata(root.join(&ancestor)) {
            Ok(m) if !m.is_dir() => {
                ops.push(Edit::Remove(ancestor));
                break;
            }
            Ok(_) => {}
            Err(_) => break,
        }
    }
    if ops.is_empty()
        && let Ok(m) = fs::symlink_metadata(root.join(path))
    {
        let is_dir = m.is_dir();
        let want_dir = matches!(e, Edit::Mkdir(_));
        if is_dir != want_dir {
            ops.push(Edit::Remove(path.clone()));
        }
    }
    ops
}

/// Everything under `dir`, symlinks not followed: path → what it is.
fn listing(dir: &Path) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in fs::read_dir(&d).unwrap().flatten() {
            let p = e.path();
            let m = fs::symlink_metadata(&p).unwrap();
            let what = if m.file_type().is_symlink() {
                format!("link {}", fs::read_link(&p).unwrap().display())
            } else if m.is_dir() {
                stack.push(p.clone());
                "dir".into()
            } else {
                format!("file {:?}", fs::read(&p).unwrap())
            };
            out.insert(p.strip_prefix(dir).unwrap().display().to_string(), what);
        }
    }
    out
}

/// A path a hostile peer might send.
fn hostile_path() -> impl Strategy<Value = String> {
    let part = prop::sample::select(vec![
        "a", "b", "out", "..", ".", "", "x\0y", "a/..", "...", "link",
    ]);
    (any::<bool>(), prop::collection::vec(part, 1..5)).prop_map(|(abs, parts)| {
        let p = parts.join("/");
        if abs { format!("/{p}") } else { p }
    })
}

fn hostile_edit(outside: String) -> impl Strategy<Value = Edit> {
    let target = prop::sample::select(vec![
        "../../outside".to_string(),
        "../outside".to_string(),
        outside,
        "a".to_string(),
        "..".to_string(),
    ]);
    prop_oneof![
        (
            hostile_path(),
            prop::collection::vec(any::<u8>(), 0..64),
            any::<bool>()
        )
            .prop_map(|(p, d, x)| Edit::Put(p, d, x)),
        hostile_path().prop_map(Edit::Mkdir),
        (hostile_path(), target).prop_map(|(p, t)| Edit::Symlink(p, t)),
        hostile_path().prop_map(Edit::Remove),
    ]
}

/// A valid path in a small namespace, so edits collide often (a file where
/// a directory was, a directory under a removed one, …).
fn valid_path() -> impl Strategy<Value = String> {
    prop::collection::vec(prop::sample::select(vec!["a", "b", "c"]), 1..4).prop_map(|p| p.join("/"))
}

fn valid_edit() -> impl Strategy<Value = Edit> {
    prop_oneof![
        4 => (valid_path(), prop::collection::vec(any::<u8>(), 0..3000), any::<bool>())
            .prop_map(|(p, d, x)| Edit::Put(p, d, x)),
        1 => valid_path().prop_map(Edit::Mkdir),
        1 => (valid_path(), prop::sample::select(vec!["a", "c/d", "b"]))
            .prop_map(|(p, t)| Edit::Symlink(p, t.to_string())),
        2 => valid_path().prop_map(Edit::Remove),
    ]
}

/// The same edit made directly to the files under `root`, as an editor or
/// `git checkout` would: what the daemon's side scans.
fn edit_directly(root: &Path, e: &Edit) {
    use std::os::unix::fs::PermissionsExt;
    let remove = |p: &Path| {
        if let Ok(m) = fs::symlink_metadata(p) {
            if m.is_dir() {
                fs::remove_dir_all(p).unwrap();
            } else {
                fs::remove_file(p).unwrap();
            }
        }
    };
    // Parents become directories, replacing what was there.
    let make_parents = |rel: &str| {
        let mut at = root.to_path_buf();
        let parts: Vec<&str> = rel.split('/').collect();
        for part in &parts[..parts.len() - 1] {
            at.push(part);
            if !fs::symlink_metadata(&at).is_ok_and(|m| m.is_dir()) {
                remove(&at);
                fs::create_dir(&at).unwrap();
            }
        }
    };
    match e {
        Edit::Put(p, data, exec) => {
            make_parents(p);
            let path = root.join(p);
            remove(&path);
            fs::write(&path, data).unwrap();
            let mode = if *exec { 0o755 } else { 0o644 };
            fs::set_permissions(&path, fs::Permissions::from_mode(mode)).unwrap();
        }
        Edit::Mkdir(p) => {
            make_parents(p);
            let path = root.join(p);
            if !fs::symlink_metadata(&path).is_ok_and(|m| m.is_dir()) {
                remove(&path);
                fs::create_dir(&path).unwrap();
            }
        }
        Edit::Symlink(p, t) => {
            make_parents(p);
            let path = root.join(p);
            remove(&path);
            std::os::unix::fs::symlink(t, &path).unwrap();
        }
        Edit::Remove(p) => remove(&root.join(p)),
    }
}

proptest! {
    // 64 cases in the test suite; PROPTEST_CASES=N for a longer search.
    #![proptest_config(ProptestConfig::with_cases(
        std::env::var("PROPTEST_CASES").ok().and_then(|v| v.parse().ok()).unwrap_or(64)
    ))]

    #[test]
    fn hostile_plans_never_touch_anything_outside_the_mirror(
        rounds in prop::collection::vec(prop::collection::vec(hostile_edit(String::new()), 1..6), 1..6)
    ) {
        let d = tempfile::tempdir().unwrap();
        let outside = d.path().join("outside");
        fs::create_dir(&outside).unwrap();
        fs::write(outside.join("precious"), b"keep me").unwrap();
        let abs = outside.display().to_string();
        let mut store = Store::open(&d.path().join("store"), 1 << 20).unwrap();
        let mut mirror = Mirror::open(d.path(), "m", &mut store).unwrap();
        // A link out of the mirror is there already: writes through it must
        // be refused.
        std::os::unix::fs::symlink(&outside, d.path().join("mirrors/m/link")).unwrap();
        let tmp = d.path().join("tmp");
        fs::create_dir_all(&tmp).unwrap();
        let before = listing(&outside);
        for mut edits in rounds {
            for e in &mut edits {
                if let Edit::Symlink(_, t) = e && t.is_empty() {
                    *t = abs.clone();
                }
            }
            let _ = apply(&tmp, &mut mirror, &mut store, &edits);
            prop_assert_eq!(&listing(&outside), &before, "after {:?}", edits);
            let top: Vec<String> = fs::read_dir(d.path()).unwrap().flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned()).collect();
            for t in &top {
                prop_assert!(["outside", "store", "mirrors", "state", "tmp"].contains(&t.as_str()), "{t} appeared");
            }
        }
    }

    #[test]
    fn random_edits_keep_the_tree_hash_equal_to_a_fresh_scan(
        rounds in prop::collection::vec(prop::collection::vec(valid_edit(), 1..8), 1..6)
    ) {
        let d = tempfile::tempdir().unwrap();
        let mut store = Store::open(&d.path().join("store"), 1 << 20).unwrap();
        let mut mirror = Mirror::open(d.path(), "m", &mut store).unwrap();
        let model = d.path().join("model");
        fs::create_dir(&model).unwrap();
        let tmp = d.path().join("tmp");
        fs::create_dir_all(&tmp).unwrap();
        for raw in rounds {
            // As the daemon plans them, made to the model as they go.
            let mut edits = Vec::new();
            for e in raw {
                // Nothing is removed through a file or a link: the daemon's
                // tree has no such path.
                if let Edit::Remove(p) = &e
                    && under_a_non_directory(&model, p)
                {
                    continue;
                }
                for op in clear_the_way(&model, &e).into_iter().chain([e]) {
                    edit_directly(&model, &op);
                    edits.push(op);
                }
            }
            let root = apply(&tmp, &mut mirror, &mut store, &edits);
            let root = match root {
                Ok(r) => r,
                Err(e) => return Err(TestCaseError::fail(format!("valid edits refused: {e}: {edits:?}"))),
            };
            prop_assert_eq!(listing(&d.path().join("mirrors/m")), listing(&model), "after {:?}", edits);
            // What the other side computes: a fresh scan of the same tree.
            let other = tempfile::tempdir().unwrap();
            let copy = other.path().join("mirrors/x");
            fs::create_dir_all(other.path().join("mirrors")).unwrap();
            std::process::Command::new("cp").arg("-a").arg(&model).arg(&copy).status().unwrap();
            let mut store2 = Store::open(&other.path().join("store"), 1 << 20).unwrap();
            let scanned = Mirror::open(other.path(), "x", &mut store2).unwrap();
            prop_assert_eq!(root, scanned.tree.root().as_bytes().to_vec(), "after {:?}", edits);
        }
    }
}

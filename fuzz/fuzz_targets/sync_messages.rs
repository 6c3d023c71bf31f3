//! The agent's sync round fed raw protobuf: a `Plan`, `ChunkData` messages
//! and a commit, each decoded from bytes as the gRPC service decodes them,
//! into a mirror that holds a file with many chunks (a base for splices).
//! Nothing panics, nothing outside the mirror changes, and once the round
//! ends (committed, refused or dropped) no temporary file is left.
#![no_main]

use std::fs;
use std::os::unix::fs::symlink;
use std::path::Path;
use std::sync::OnceLock;

use arbitrary::Arbitrary;
use bridge_agent::apply::Round;
use bridge_agent::mirror::Mirror;
use bridge_agent::store::Store;
use bridge_fuzz::{fresh, listing};
use bridge_proto::chunking::Digest;
use bridge_proto::index::{Cached, HashOutcome, encode_tree, hash_file};
use bridge_proto::path::RelPath;
use bridge_proto::scan::Stat;
use bridge_proto::tree::Tree;
use bridge_proto::v1;
use libfuzzer_sys::fuzz_target;
use prost::Message;

#[derive(Arbitrary, Debug)]
struct Input {
    plan: Vec<u8>,
    chunks: Vec<Vec<u8>>,
    skip: bool,
    commit: bool,
}

/// The mirror's files: `big`, a few chunks (16–256 KiB each) a splice can
/// name, and `dir/small`, with their digests. Made once per process.
fn base() -> &'static [(&'static str, Vec<u8>, Digest); 2] {
    static BASE: OnceLock<[(&str, Vec<u8>, Digest); 2]> = OnceLock::new();
    BASE.get_or_init(|| {
        let d = fresh("sync_messages-base");
        let digest = |name: &str, bytes: &[u8]| {
            let p = d.join(name);
            fs::write(&p, bytes).unwrap();
            match hash_file(&p, 3, |_, _| {}).unwrap() {
                HashOutcome::Hashed(_, digest, _) => digest,
                HashOutcome::Vanished => unreachable!("{name} was just written"),
            }
        };
        let big = bridge_proto::chunking::pseudo_random(200_000, 7);
        let small = b"small".to_vec();
        [
            ("big", big.clone(), digest("big", &big)),
            ("dir/small", small.clone(), digest("small", &small)),
        ]
    })
}

/// Writes the stat cache the agent keeps for the mirror (`state/m.index`),
/// vouching for the files just written as if hashed long after their last
/// write: `Mirror::open` then trusts them instead of hashing `big` again,
/// which under coverage tracing was two thirds of each run. The tree and
/// the store's chunk locations it builds are those a hash would give.
fn seed_index(agent_root: &Path, m: &Path, files: &[(&str, Vec<u8>, Digest)]) {
    let mut tree = Tree::new();
    for (rel, _, digest) in files {
        let st = Stat::lstat(&m.join(rel)).unwrap();
        let mut c = Cached::new(&st, digest.clone());
        c.racy = false;
        tree.insert_hashed(RelPath::new(rel.to_string()).unwrap(), c);
    }
    let state = agent_root.join("state");
    fs::create_dir_all(&state).unwrap();
    fs::write(state.join("m.index"), encode_tree(&tree)).unwrap();
}

fuzz_target!(|input: Input| {
    let Ok(plan) = v1::Plan::decode(&input.plan[..]) else {
        return;
    };
    let d = fresh("sync_messages");
    let outside = d.join("outside");
    fs::create_dir(&outside).unwrap();
    fs::write(outside.join("precious"), b"keep me").unwrap();
    let mut store = Store::open(&d.join("store"), 1 << 20).unwrap();
    let m = d.join("mirrors/m");
    fs::create_dir_all(m.join("dir")).unwrap();
    let files = base();
    for (rel, bytes, _) in files {
        fs::write(m.join(rel), bytes).unwrap();
    }
    symlink(&outside, m.join("link")).unwrap();
    seed_index(&d, &m, files);
    let mut mirror = Mirror::open(&d, "m", &mut store).unwrap();
    let tmp = d.join("tmp");
    fs::create_dir_all(&tmp).unwrap();
    let before = listing(&outside);
    let mut round = Round::new(&tmp, &mut mirror, &mut store);
    let mut refused = round.on_plan(plan).is_err();
    for c in &input.chunks {
        if refused {
            break;
        }
        let Ok(c) = v1::ChunkData::decode(&c[..]) else {
            continue;
        };
        refused = round.on_chunk(c).is_err();
    }
    if !refused && input.skip {
        refused = round.on_skip().is_err();
    }
    if !refused && input.commit {
        let _ = round.on_commit(1);
    } else {
        drop(round);
    }
    assert_eq!(
        listing(&tmp).len(),
        0,
        "temporary files left: {:?}",
        listing(&tmp)
    );
    assert_eq!(listing(&outside), before);
    for e in fs::read_dir(&d).unwrap().flatten() {
        let name = e.file_name();
        let name = name.to_string_lossy();
        assert!(
            ["outside", "store", "mirrors", "state", "tmp"].contains(&name.as_ref()),
            "{name} appeared"
        );
    }
});

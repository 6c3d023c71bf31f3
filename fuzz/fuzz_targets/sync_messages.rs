//! The agent's sync round fed raw protobuf: a `Plan`, `ChunkData` messages
//! and a commit, each decoded from bytes as the gRPC service decodes them,
//! into a mirror that holds a file with many chunks (a base for splices).
//! Nothing panics, nothing outside the mirror changes, and once the round
//! ends (committed, refused or dropped) no temporary file is left.
#![no_main]

use std::fs;
use std::os::unix::fs::symlink;

use arbitrary::Arbitrary;
use bridge_agent::apply::Round;
use bridge_agent::mirror::Mirror;
use bridge_agent::store::Store;
use bridge_fuzz::{fresh, listing};
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
    // A few chunks (16–256 KiB each): a base a splice can name. Made once
    // per process (generating it per input was a sixth of the time).
    static BIG: std::sync::OnceLock<Vec<u8>> = std::sync::OnceLock::new();
    fs::write(
        m.join("big"),
        BIG.get_or_init(|| bridge_proto::chunking::pseudo_random(200_000, 7)),
    )
    .unwrap();
    fs::write(m.join("dir/small"), b"small").unwrap();
    symlink(&outside, m.join("link")).unwrap();
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

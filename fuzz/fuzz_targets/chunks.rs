//! The chunk decoders: chunk refs, splices and tree entries as they come off
//! the wire. Never a panic; a splice applied gives exactly its inserts and
//! copies; a splice the encoder makes applies back to the list it encodes.
#![no_main]

use arbitrary::Arbitrary;
use bridge_proto::chunking::{ChunkRef, chunk_id, hash_from_bytes};
use bridge_proto::splice;
use bridge_proto::tree::Node;
use bridge_proto::v1;
use libfuzzer_sys::fuzz_target;
use prost::Message;

#[derive(Arbitrary, Debug)]
struct Step {
    skip: u32,
    insert: Vec<(Vec<u8>, u32)>,
    copy: u32,
}

#[derive(Arbitrary, Debug)]
struct Input {
    /// The base and a new list, as small numbers naming chunks.
    base: Vec<u8>,
    new: Vec<u8>,
    steps: Vec<Step>,
    entry: Vec<u8>,
}

fn refs(ids: &[u8]) -> Vec<ChunkRef> {
    ids.iter()
        .map(|&i| ChunkRef {
            id: chunk_id(&[i]),
            len: 1 + i as u32,
        })
        .collect()
}

fuzz_target!(|input: Input| {
    let base = refs(&input.base);
    let steps: Vec<v1::Splice> = input
        .steps
        .iter()
        .map(|s| v1::Splice {
            skip: s.skip,
            insert: s
                .insert
                .iter()
                .map(|(id, len)| v1::ChunkRef {
                    id: id.clone().into(),
                    len: *len,
                })
                .collect(),
            copy: s.copy,
        })
        .collect();
    if let Ok(out) = splice::apply(&base, &steps) {
        let inserted: usize = steps.iter().map(|s| s.insert.len()).sum();
        let copied: usize = steps.iter().map(|s| s.copy as usize).sum();
        assert_eq!(out.len(), inserted + copied);
        for s in &steps {
            for r in &s.insert {
                assert!(hash_from_bytes(&r.id).is_some() && r.len > 0);
            }
        }
    }
    let new = refs(&input.new);
    if let Some(enc) = splice::encode(&base, &new) {
        assert_eq!(splice::apply(&base, &enc).expect("own splice"), new);
    }
    if let Ok(e) = v1::Entry::decode(&input.entry[..])
        && let Ok((path, node)) = Node::from_wire(&e)
    {
        bridge_proto::path::RelPath::check(path.as_str()).expect("a checked path");
        let back = node.to_wire(&path);
        assert_eq!(Node::from_wire(&back).expect("round trip"), (path, node));
    }
});

//! The stat cache's decoder (`state/*.index`, read at every start): any
//! bytes decode to an index or an error, never a panic or an allocation
//! the bytes do not pay for; what decodes encodes back to the same entries,
//! and loads into a tree as well.
#![no_main]

use bridge_proto::index::{Index, decode_tree};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(index) = Index::decode(data) else {
        assert!(decode_tree(data).is_err());
        return;
    };
    let again = Index::decode(&index.encode()).expect("an encoded index decodes");
    assert_eq!(again.entries, index.entries);
    let tree = decode_tree(data).expect("decodes as a tree too");
    assert!(tree.files() as usize <= index.entries.len().max(1) * 2);
});

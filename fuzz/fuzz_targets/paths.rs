//! Path validation: whatever a peer sends as a path, an accepted one names
//! something under the root lexically, and so do its ancestors; a link
//! target resolves inside the tree or not at all; the cluster protocol's
//! own check never accepts what the sync protocol refuses.
#![no_main]

use std::path::{Component, Path};

use bridge_agent::cluster::wire::safe_relative;
use bridge_proto::path::{RelPath, resolve_link_target};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|input: (&str, &str)| {
    let (path, target) = input;
    let root = Path::new("/mirror/root");
    match RelPath::new(path) {
        Ok(p) => {
            assert!(safe_relative(path), "{path:?}: accepted, but not safe");
            let fs = p.to_fs(root);
            let rest = fs.strip_prefix(root).expect("under the root");
            assert!(
                rest.components().all(|c| matches!(c, Component::Normal(_))),
                "{path:?} → {fs:?}"
            );
            assert_eq!(RelPath::from_fs(root, &fs).expect("round trip"), p);
            for a in p.ancestors() {
                RelPath::check(a.as_str()).expect("an ancestor is valid");
                assert!(p.starts_with(&a) && a.depth() < p.depth());
            }
            if let Some(parts) = resolve_link_target(&p, target) {
                assert!(!target.starts_with('/'));
                for c in &parts {
                    assert!(
                        !c.is_empty() && c != "." && c != ".." && !c.contains('/'),
                        "{target:?} from {path:?} resolved to {parts:?}"
                    );
                }
            }
        }
        Err(_) => {
            // Refused paths are refused for a reason the cluster check
            // shares, or for a length the sync protocol caps.
            if safe_relative(path) {
                assert!(path.len() > bridge_proto::path::MAX_PATH_BYTES);
            }
        }
    }
});

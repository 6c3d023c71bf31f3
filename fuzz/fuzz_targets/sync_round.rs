//! The agent's apply of sync rounds, against a temporary root: whatever the
//! plans say (hostile paths, links out of the mirror and writes through
//! them, chunk bodies that do not match), nothing outside the mirror is
//! created, changed or removed, no link is followed, and nothing panics.
#![no_main]

use std::fs;
use std::os::unix::fs::symlink;
use std::path::Path;

use arbitrary::Arbitrary;
use bridge_agent::apply::Round;
use bridge_agent::mirror::Mirror;
use bridge_agent::store::Store;
use bridge_fuzz::{fresh, listing};
use bridge_proto::chunking::{ChunkRef, chunk_bytes};
use bridge_proto::v1;
use libfuzzer_sys::fuzz_target;

#[derive(Arbitrary, Debug)]
enum Part {
    A,
    B,
    Out,
    Link,
    In,
    Dot,
    DotDot,
    Empty,
    Nul,
    Other(String),
}

#[derive(Arbitrary, Debug)]
struct PathIn {
    absolute: bool,
    parts: Vec<Part>,
}

impl PathIn {
    fn text(&self) -> String {
        let parts: Vec<&str> = self
            .parts
            .iter()
            .map(|p| match p {
                Part::A => "a",
                Part::B => "b",
                Part::Out => "out",
                Part::Link => "link",
                Part::In => "in",
                Part::Dot => ".",
                Part::DotDot => "..",
                Part::Empty => "",
                Part::Nul => "x\0y",
                Part::Other(s) => s,
            })
            .collect();
        let p = parts.join("/");
        if self.absolute { format!("/{p}") } else { p }
    }
}

#[derive(Arbitrary, Debug)]
enum Target {
    Outside,
    UpUp,
    Up,
    Inside,
    Other(String),
}

#[derive(Arbitrary, Debug)]
enum Edit {
    Put(PathIn, Vec<u8>, bool),
    Mkdir(PathIn),
    Symlink(PathIn, Target),
    Remove(PathIn),
}

#[derive(Arbitrary, Debug)]
struct Input {
    rounds: Vec<Vec<Edit>>,
    /// Send one body that does not match its chunk's id.
    corrupt_one: bool,
}

fn op(e: &Edit, outside: &str) -> v1::Op {
    use v1::op::Op;
    v1::Op {
        op: Some(match e {
            Edit::Put(p, data, exec) => Op::Put(v1::Put {
                path: p.text(),
                executable: *exec,
                chunks: refs(data).iter().map(v1::ChunkRef::from).collect(),
                ..Default::default()
            }),
            Edit::Mkdir(p) => Op::Mkdir(v1::Mkdir { path: p.text() }),
            Edit::Symlink(p, t) => Op::Symlink(v1::Symlink {
                path: p.text(),
                target: match t {
                    Target::Outside => outside.to_string(),
                    Target::UpUp => "../../outside".into(),
                    Target::Up => "..".into(),
                    Target::Inside => "real".into(),
                    Target::Other(s) => s.clone(),
                },
            }),
            Edit::Remove(p) => Op::Remove(v1::Remove { path: p.text() }),
        }),
    }
}

fn refs(data: &[u8]) -> Vec<ChunkRef> {
    chunk_bytes(data).chunks
}

fn round(
    tmp: &Path,
    mirror: &mut Mirror,
    store: &mut Store,
    edits: &[Edit],
    outside: &str,
    corrupt: &mut bool,
) {
    let mut round = Round::new(tmp, mirror, store);
    let plan = v1::Plan {
        ops: edits.iter().map(|e| op(e, outside)).collect(),
        eager: false,
    };
    let Ok(need) = round.on_plan(plan) else {
        return;
    };
    for (e, n) in edits.iter().zip(&need.ops) {
        let Edit::Put(_, data, _) = e else { continue };
        let refs = refs(data);
        let mut starts = Vec::with_capacity(refs.len());
        let mut at = 0usize;
        for c in &refs {
            starts.push(at);
            at += c.len as usize;
        }
        for &i in &n.chunks {
            let Some(c) = refs.get(i as usize) else {
                continue;
            };
            let start = starts[i as usize];
            let mut body = data[start..start + c.len as usize].to_vec();
            if std::mem::take(corrupt) {
                body.push(0);
            }
            let chunk = v1::ChunkData {
                id: c.id.as_bytes().to_vec().into(),
                compression: v1::Compression::None as i32,
                data: body.into(),
            };
            if round.on_chunk(chunk).is_err() {
                return;
            }
        }
    }
    let _ = round.on_commit(1);
}

fn mentions_real(edits: &[Edit]) -> bool {
    edits.iter().any(|e| {
        let (Edit::Put(p, ..) | Edit::Mkdir(p) | Edit::Symlink(p, _) | Edit::Remove(p)) = e;
        p.text().contains("real")
    })
}

fuzz_target!(|input: Input| {
    let d = fresh("sync_round");
    let outside = d.join("outside");
    fs::create_dir(&outside).unwrap();
    fs::write(outside.join("precious"), b"keep me").unwrap();
    let mut store = Store::open(&d.join("store"), 1 << 20).unwrap();
    let mut mirror = Mirror::open(&d, "m", &mut store).unwrap();
    let m = d.join("mirrors/m");
    // Links already in the mirror: one out of it, one to a directory in it.
    // Writes through either must be refused.
    symlink(&outside, m.join("link")).unwrap();
    fs::create_dir(m.join("real")).unwrap();
    fs::write(m.join("real/kept"), b"kept").unwrap();
    symlink("real", m.join("in")).unwrap();
    let tmp = d.join("tmp");
    fs::create_dir_all(&tmp).unwrap();
    let before = listing(&outside);
    let real_before = listing(&m.join("real"));
    let abs = outside.display().to_string();
    let mut corrupt = input.corrupt_one;
    let mut real_touched = false;
    for edits in input.rounds.iter().take(8) {
        let edits = &edits[..edits.len().min(16)];
        real_touched |= mentions_real(edits);
        round(&tmp, &mut mirror, &mut store, edits, &abs, &mut corrupt);
        assert_eq!(listing(&outside), before, "outside changed by {edits:?}");
        for e in fs::read_dir(&d).unwrap().flatten() {
            let name = e.file_name();
            let name = name.to_string_lossy();
            assert!(
                ["outside", "store", "mirrors", "state", "tmp"].contains(&name.as_ref()),
                "{name} appeared after {edits:?}"
            );
        }
        if !real_touched && fs::symlink_metadata(m.join("real")).is_ok_and(|m| m.is_dir()) {
            assert_eq!(
                listing(&m.join("real")),
                real_before,
                "written through the link `in` by {edits:?}"
            );
        }
    }
});

//! The job log's readers, on any bytes: never a panic; offsets only move
//! forward and stay inside the file; reading a log in small steps from
//! `next_offset` to `next_offset` yields exactly what one large read does
//! (what a follower resuming after a drop relies on); the tail is bounded.
#![no_main]

use std::fs;

use arbitrary::Arbitrary;
use bridge_agent::joblog::{TAIL_MAX_BYTES, read_chunks, tail_start};
use libfuzzer_sys::fuzz_target;

#[derive(Arbitrary, Debug)]
struct Input {
    log: Vec<u8>,
    step: u16,
    lines: u8,
}

/// Follows the log from 0 in reads of `max` bytes: the data of each
/// stream in order, or `None` where a read fails (a corrupt record).
fn follow(path: &std::path::Path, len: u64, max: usize) -> Option<Vec<(u8, Vec<u8>)>> {
    let mut out: Vec<(u8, Vec<u8>)> = Vec::new();
    let mut at = 0u64;
    loop {
        let chunks = read_chunks(path, at, max).ok()?;
        let Some(last) = chunks.last() else {
            return Some(out);
        };
        for c in &chunks {
            assert!(
                c.next_offset > at && c.next_offset <= len,
                "{at} → {}",
                c.next_offset
            );
            match out.last_mut() {
                Some((s, d)) if *s == c.stream => d.extend_from_slice(&c.data),
                _ => out.push((c.stream, c.data.clone())),
            }
        }
        at = last.next_offset;
    }
}

fuzz_target!(|input: Input| {
    let d = bridge_fuzz::fresh("job_log");
    let path = d.join("log");
    fs::write(&path, &input.log).unwrap();
    let len = input.log.len() as u64;
    let whole = follow(&path, len, usize::MAX / 2);
    let steps = follow(&path, len, input.step as usize);
    if let (Some(a), Some(b)) = (&whole, &steps) {
        assert_eq!(a, b);
    }
    if let Ok(tail) = tail_start(&path, input.lines as usize) {
        let bytes: usize = tail.iter().map(|c| c.data.len()).sum();
        assert!(bytes <= TAIL_MAX_BYTES);
        for c in &tail {
            assert!(c.next_offset <= len);
        }
    }
    // Any offset, boundary or not: an error or records, never a panic.
    let _ = read_chunks(&path, input.step as u64, 100);
});

//! A chunk list sent as edits of another one.
//!
//! A 1 MiB change in the middle of a 1 GiB file leaves ~16,000 of its ~16,000
//! chunks as they were, but a whole `Put` lists them all (~40 bytes each,
//! 640 KiB). When the agent holds the previous version, the daemon sends a
//! splice of that version's list instead: a few steps of "skip, insert, copy".
//! See `Put` and `Splice` in `agent.proto`.

use std::collections::HashMap;

use crate::chunking::{ChunkRef, Hash, MAX_CHUNK, hash_from_bytes};
use crate::v1;

/// Files with fewer chunks are always sent whole: the saving is too small to
/// be worth a failure and a resend when the agent lacks the base.
pub const MIN_CHUNKS: usize = 32;

/// Bytes one chunk ref takes in a message (id, length, framing), roughly.
const REF_WIRE_BYTES: usize = 40;

/// The steps that turn `base` into `new`, or `None` when sending `new` whole
/// is not at least twice as large.
///
/// Greedy: runs equal to the base at the current position are copied; a chunk
/// found further on in the base skips there; anything else is inserted. That is
/// exact for any input and minimal for the common edits (a region rewritten,
/// inserted or deleted).
pub fn encode(base: &[ChunkRef], new: &[ChunkRef]) -> Option<Vec<v1::Splice>> {
    if new.len() < MIN_CHUNKS {
        return None;
    }
    let mut first: HashMap<Hash, usize> = HashMap::with_capacity(base.len());
    for (i, c) in base.iter().enumerate() {
        first.entry(c.id).or_insert(i);
    }
    let mut steps: Vec<v1::Splice> = Vec::new();
    let mut b = 0;
    for c in new {
        if base.get(b) == Some(c) {
            match steps.last_mut() {
                Some(s) => s.copy += 1,
                None => steps.push(v1::Splice {
                    copy: 1,
                    ..Default::default()
                }),
            }
            b += 1;
            continue;
        }
        match first.get(&c.id) {
            Some(&q) if q > b && base[q] == *c => {
                // Skip ahead to it: a new step unless this one is still empty.
                match steps.last_mut() {
                    Some(s) if s.insert.is_empty() && s.copy == 0 => s.skip += (q - b) as u32,
                    _ => steps.push(v1::Splice {
                        skip: (q - b) as u32,
                        ..Default::default()
                    }),
                }
                steps.last_mut().expect("pushed").copy += 1;
                b = q + 1;
            }
            _ => {
                let r = v1::ChunkRef::from(c);
                match steps.last_mut() {
                    Some(s) if s.copy == 0 => s.insert.push(r),
                    _ => steps.push(v1::Splice {
                        insert: vec![r],
                        ..Default::default()
                    }),
                }
            }
        }
    }
    let spliced: usize = steps
        .iter()
        .map(|s| s.insert.len() * REF_WIRE_BYTES + 12)
        .sum();
    (spliced * 2 <= new.len() * REF_WIRE_BYTES).then_some(steps)
}

/// Applies `steps` to `base`. An error names what is wrong (a step past the
/// end of the base, a malformed chunk ref); the agent refuses such a `Put`.
pub fn apply(base: &[ChunkRef], steps: &[v1::Splice]) -> Result<Vec<ChunkRef>, String> {
    let mut out = Vec::with_capacity(base.len());
    let mut b = 0usize;
    for s in steps {
        b = b
            .checked_add(s.skip as usize)
            .filter(|&b| b <= base.len())
            .ok_or("a splice skips past the end of its base")?;
        for r in &s.insert {
            out.push(
                hash_from_bytes(&r.id)
                    .filter(|_| r.len > 0 && r.len <= MAX_CHUNK)
                    .map(|id| ChunkRef { id, len: r.len })
                    .ok_or("bad chunk reference in a splice")?,
            );
        }
        let end = b
            .checked_add(s.copy as usize)
            .filter(|&e| e <= base.len())
            .ok_or("a splice copies past the end of its base")?;
        out.extend_from_slice(&base[b..end]);
        b = end;
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::chunking::chunk_id;

    fn refs(ids: &[u32]) -> Vec<ChunkRef> {
        ids.iter()
            .map(|i| ChunkRef {
                id: chunk_id(&i.to_le_bytes()),
                len: 1000 + i,
            })
            .collect()
    }

    fn round_trip(base: &[u32], new: &[u32]) -> Option<usize> {
        let (base, new) = (refs(base), refs(new));
        let steps = encode(&base, &new)?;
        assert_eq!(apply(&base, &steps).unwrap(), new);
        Some(steps.iter().map(|s| s.insert.len()).sum())
    }

    #[test]
    fn a_rewritten_region_sends_only_its_chunks() {
        let base: Vec<u32> = (0..1000).collect();
        let mut new = base.clone();
        new.splice(400..420, 5000..5017);
        assert_eq!(round_trip(&base, &new), Some(17));
    }

    #[test]
    fn insertions_deletions_and_moves_round_trip() {
        let base: Vec<u32> = (0..200).collect();
        // Inserted at the front, deleted from the middle, appended at the end.
        let new: Vec<u32> = (900..903)
            .chain(0..50)
            .chain(80..200)
            .chain(950..952)
            .collect();
        assert_eq!(round_trip(&base, &new), Some(5));
        // Truncated, and the base's tail dropped.
        assert_eq!(round_trip(&base, &(0..100).collect::<Vec<_>>()), Some(0));
        // A chunk moved backwards is inserted (a reference, no body: the
        // agent has it), repeated chunks copy or insert.
        let new: Vec<u32> = (0..100).chain([10, 10, 11]).chain(100..200).collect();
        assert!(round_trip(&base, &new).is_some());
    }

    #[test]
    fn unrelated_or_small_lists_are_sent_whole() {
        let base: Vec<u32> = (0..100).collect();
        assert_eq!(round_trip(&base, &(1000..1100).collect::<Vec<_>>()), None);
        assert_eq!(round_trip(&base, &(0..10).collect::<Vec<_>>()), None);
    }

    #[test]
    fn steps_past_the_base_are_errors() {
        let base = refs(&[1, 2, 3]);
        let skip = [v1::Splice {
            skip: 4,
            ..Default::default()
        }];
        assert!(apply(&base, &skip).unwrap_err().contains("skips past"));
        let copy = [v1::Splice {
            skip: 1,
            copy: 3,
            ..Default::default()
        }];
        assert!(apply(&base, &copy).unwrap_err().contains("copies past"));
        let bad = [v1::Splice {
            insert: vec![v1::ChunkRef {
                id: vec![1, 2, 3].into(),
                len: 1,
            }],
            ..Default::default()
        }];
        assert!(apply(&base, &bad).unwrap_err().contains("bad chunk"));
    }
}

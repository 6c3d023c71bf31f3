//! Chunking a file again after an edit, reading every byte but cutting only
//! where it changed.
//!
//! FastCDC (2020) decides where a chunk ends from the bytes between the
//! chunk's start and one byte past its end, and from how far the file goes
//! on (at most [`MAX_CHUNK`]). So a chunk of the previous version that
//! starts at a cut point of the new one, whose bytes (and the byte after
//! it) are unchanged and which is as far from the end (or both at least
//! `MAX_CHUNK` away), is cut the same: its id is checked with BLAKE3 (about
//! 4 GiB/s on a core) instead of running the gear hash over it (about 1
//! GiB/s, the slower half of [`chunk_reader_send`]). Where the content
//! changed, chunks are cut as usual until a cut lands on a boundary of the
//! previous version again: at the same offset (an edit in place), or
//! shifted by the change of size (one insertion or deletion).
//!
//! The result is always what [`chunk_reader_send`] gives for the new bytes
//! (a property test checks it against random edits): the previous list only
//! says which ids to try. When most of the file turns out to be new, the
//! rest is handed to [`chunk_reader_send`], which cuts and hashes on two
//! threads.

use std::borrow::Cow;
use std::collections::VecDeque;
use std::io::{self, Cursor, Read};
use std::sync::mpsc::{Receiver, SyncSender, sync_channel};

use crate::chunking::{
    AVG_CHUNK, ChunkRef, Digest, Hash, MAX_CHUNK, MIN_CHUNK, chunk_id, chunk_reader_send,
    content_hash,
};

/// Files below this size are cut whole: one read, no pipeline to save.
pub const RECHUNK_MIN_BYTES: u64 = 4 << 20;

/// How much the reading thread reads at a time.
const READ_BLOCK: usize = 4 << 20;

/// Blocks read ahead of the checking.
const READ_AHEAD: usize = 4;

/// After this many bytes, if fewer than [`KEEP_TRYING_PERCENT`] of them came
/// from the previous version, the rest is chunked as new.
const JUDGE_AFTER: u64 = 64 << 20;
const KEEP_TRYING_PERCENT: u64 = 25;

type Block = io::Result<Vec<u8>>;

/// Reads `r` in [`READ_BLOCK`]s (each full but the last) into `tx`, reusing
/// the blocks `spent` gives back: the copy out of the page cache overlaps
/// the hashing.
fn read_blocks(mut r: impl Read, tx: SyncSender<Block>, spent: Receiver<Vec<u8>>) {
    loop {
        let mut b = spent.try_recv().unwrap_or_default();
        b.resize(READ_BLOCK, 0);
        let mut n = 0;
        while n < READ_BLOCK {
            match r.read(&mut b[n..]) {
                Ok(0) => break,
                Ok(k) => n += k,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => {
                    let _ = tx.send(Err(e));
                    return;
                }
            }
        }
        b.truncate(n);
        // A closed channel: the checking side is done.
        if tx.send(Ok(b)).is_err() || n < READ_BLOCK {
            return;
        }
    }
}

/// The file's bytes from `base` on, as blocks of the reading thread.
struct Window {
    rx: Receiver<Block>,
    spent: SyncSender<Vec<u8>>,
    blocks: VecDeque<Vec<u8>>,
    base: u64,
    eof: bool,
}

impl Window {
    fn end(&self) -> u64 {
        self.base + self.blocks.iter().map(|b| b.len() as u64).sum::<u64>()
    }

    /// Makes `[from, to)` readable (less at the end of the input); gives
    /// back the blocks wholly before `from`.
    fn cover(&mut self, from: u64, to: u64) -> io::Result<()> {
        while let Some(b) = self.blocks.front()
            && self.base + b.len() as u64 <= from
        {
            let b = self.blocks.pop_front().expect("a front block");
            self.base += b.len() as u64;
            let _ = self.spent.try_send(b);
        }
        while !self.eof && self.end() < to {
            match self.rx.recv() {
                Ok(Ok(b)) => {
                    self.eof = b.len() < READ_BLOCK;
                    self.blocks.push_back(b);
                }
                Ok(Err(e)) => return Err(e),
                Err(_) => self.eof = true,
            }
        }
        Ok(())
    }

    /// The bytes `[from, to)`, cut short at the end of the input: borrowed
    /// when they lie in one block (every block but the last is full).
    fn get(&self, from: u64, to: u64) -> Cow<'_, [u8]> {
        let to = to.min(self.end());
        if from >= to {
            return Cow::Borrowed(&[]);
        }
        let (i, at) = (
            ((from - self.base) / READ_BLOCK as u64) as usize,
            ((from - self.base) % READ_BLOCK as u64) as usize,
        );
        let len = (to - from) as usize;
        if at + len <= self.blocks[i].len() {
            return Cow::Borrowed(&self.blocks[i][at..at + len]);
        }
        let mut v = Vec::with_capacity(len);
        v.extend_from_slice(&self.blocks[i][at..]);
        for b in self.blocks.iter().skip(i + 1) {
            let want = len - v.len();
            v.extend_from_slice(&b[..want.min(b.len())]);
            if v.len() == len {
                break;
            }
        }
        Cow::Owned(v)
    }

    /// What is left from `from` on, as one reader.
    fn rest(mut self, from: u64) -> impl Read + Send {
        let ahead = self.get(from, u64::MAX).into_owned();
        let blocks = std::mem::take(&mut self.blocks);
        drop(blocks);
        Cursor::new(ahead).chain(BlockReader {
            rx: self.rx,
            cur: Cursor::new(Vec::new()),
            eof: self.eof,
        })
    }
}

/// The reading thread's blocks as a reader.
struct BlockReader {
    rx: Receiver<Block>,
    cur: Cursor<Vec<u8>>,
    eof: bool,
}

impl Read for BlockReader {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        loop {
            let n = self.cur.read(buf)?;
            if n > 0 || self.eof || buf.is_empty() {
                return Ok(n);
            }
            match self.rx.recv() {
                Ok(Ok(b)) => {
                    self.eof = b.len() < READ_BLOCK;
                    self.cur = Cursor::new(b);
                }
                Ok(Err(e)) => return Err(e),
                Err(_) => self.eof = true,
            }
        }
    }
}

/// Chunks the `size` bytes `r` yields, as [`chunk_reader_send`] would,
/// trying the chunks of `prior` (the list of the content they replace)
/// before cutting. `each` sees every chunk with its bytes, in order.
pub fn rechunk_reader<R: Read + Send>(
    r: R,
    size: u64,
    prior: &[ChunkRef],
    mut each: impl FnMut(ChunkRef, &[u8]),
) -> io::Result<Digest> {
    let mut starts = Vec::with_capacity(prior.len() + 1);
    let mut at = 0u64;
    for c in prior {
        starts.push(at);
        at += c.len as u64;
    }
    let prior_size = at;
    // Offsets in the new version minus those in the previous one where the
    // two can line up again.
    let mut shifts = vec![0i64];
    if size != prior_size {
        shifts.push(size as i64 - prior_size as i64);
    }
    let max = MAX_CHUNK as u64;
    let (tx, rx) = sync_channel(READ_AHEAD);
    let (spent_tx, spent_rx) = sync_channel(READ_AHEAD + 2);
    std::thread::scope(|s| {
        s.spawn(move || read_blocks(r, tx, spent_rx));
        let mut w = Window {
            rx,
            spent: spent_tx,
            blocks: VecDeque::new(),
            base: 0,
            eof: false,
        };
        let mut size = size;
        let mut chunks: Vec<ChunkRef> = Vec::new();
        let mut pos = 0u64;
        let mut reused = 0u64;
        // The last check of a previous chunk: (index, offset, its id matched).
        let mut checked: Option<(usize, u64, bool)> = None;
        // The BLAKE3 of the bytes a failed check read: (offset, length, hash).
        let mut last_hash: Option<(u64, u64, Hash)> = None;
        while pos < size {
            if pos >= JUDGE_AFTER && reused * 100 < pos * KEEP_TRYING_PERCENT {
                break;
            }
            // Two previous chunks and a byte at most are looked at from here.
            w.cover(pos, pos + 2 * max + 1)?;
            if w.eof && w.end() < size {
                // Shorter than its stat said: the caller sees the size differ.
                size = w.end();
                shifts.retain(|&s| s == 0);
                if size != prior_size {
                    shifts.push(size as i64 - prior_size as i64);
                }
            }
            let mut check = |j: usize, at: u64, w: &Window| -> bool {
                if let Some((cj, cat, ok)) = checked
                    && cj == j
                    && cat == at
                {
                    return ok;
                }
                let len = prior[j].len as u64;
                let bytes = w.get(at, at + len);
                let ok = bytes.len() as u64 == len && {
                    let h = chunk_id(&bytes);
                    last_hash = Some((at, len, h));
                    h == prior[j].id
                };
                checked = Some((j, at, ok));
                ok
            };
            let mut hit = None;
            for &shift in &shifts {
                let Some(old) = pos.checked_add_signed(-shift) else {
                    continue;
                };
                let Ok(j) = starts.binary_search(&old) else {
                    continue;
                };
                let len = prior[j].len as u64;
                // The cut also depends on how much follows, up to MAX_CHUNK.
                // (The next chunk's check below implies this wherever it
                // matters, by every case worked through; it is kept as the
                // rule says.)
                let (new_left, old_left) = (size - pos, prior_size - old);
                if new_left.min(max) != old_left.min(max) || len > new_left {
                    continue;
                }
                if !check(j, pos, &w) {
                    continue;
                }
                // A cut by content (shorter than MAX_CHUNK, not at the end)
                // also read the byte after the chunk: the next previous
                // chunk, still in place, vouches for it.
                let end = pos + len;
                if end < size && len < max && (j + 1 >= prior.len() || !check(j + 1, end, &w)) {
                    continue;
                }
                hit = Some(prior[j]);
                break;
            }
            let c = match hit {
                Some(c) => {
                    reused += c.len as u64;
                    c
                }
                None => {
                    let bytes = w.get(pos, pos + (size - pos).min(max));
                    let len = fastcdc::v2020::FastCDC::new(&bytes, MIN_CHUNK, AVG_CHUNK, MAX_CHUNK)
                        .next()
                        .map_or(bytes.len(), |c| c.length) as u64;
                    let id = match last_hash {
                        Some((a, l, h)) if a == pos && l == len => h,
                        _ => chunk_id(&bytes[..len as usize]),
                    };
                    ChunkRef {
                        id,
                        len: len as u32,
                    }
                }
            };
            each(c, &w.get(pos, pos + c.len as u64));
            chunks.push(c);
            pos += c.len as u64;
        }
        if pos < size {
            // Mostly new: cut the rest on two threads, from this cut point
            // (a chunker starting at a boundary cuts what follows as it
            // would have).
            let d = chunk_reader_send(w.rest(pos), size - pos, &mut each)?;
            pos += d.size;
            chunks.extend(d.chunks);
        }
        Ok(Digest {
            hash: content_hash(&chunks),
            chunks,
            size: pos,
        })
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::chunking::{chunk_bytes, pseudo_random};
    use proptest::prelude::*;

    fn rechunk(new: &[u8], old: &[u8]) -> Digest {
        let prior = chunk_bytes(old).chunks;
        let mut seen = Vec::new();
        let d = rechunk_reader(new, new.len() as u64, &prior, |c, body| {
            assert_eq!(chunk_id(body), c.id);
            assert_eq!(body.len(), c.len as usize);
            seen.extend_from_slice(body);
        })
        .unwrap();
        assert_eq!(seen, new, "each saw every byte once, in order");
        d
    }

    /// Random bytes with a run of zeros (the gear hash finds no cut in it,
    /// so chunks end at MAX_CHUNK there) and a repeated stretch.
    fn base(len: usize, seed: u64) -> Vec<u8> {
        let mut v = pseudo_random(len, seed);
        let z = len / 3;
        v[z..z + (len / 5)].fill(0);
        let copy = v[..len / 10].to_vec();
        let at = len - len / 10;
        v[at..].copy_from_slice(&copy);
        v
    }

    /// Where an edit starts: a fraction of the length, or (`snap`) a few
    /// bytes from the chunk boundary of the original nearest to it, where
    /// the cut decisions that read one byte past a chunk are made.
    #[derive(Debug, Clone)]
    struct At {
        f: f64,
        snap: Option<i8>,
    }

    impl At {
        fn of(&self, v: &[u8], bounds: &[usize]) -> usize {
            let guess = (v.len() as f64 * self.f) as usize;
            let Some(d) = self.snap else { return guess };
            let near = bounds
                .iter()
                .min_by_key(|&&b| b.abs_diff(guess))
                .copied()
                .unwrap_or(guess);
            near.saturating_add_signed(d as isize).min(v.len())
        }
    }

    #[derive(Debug, Clone)]
    enum Edit {
        Overwrite(At, usize, u64),
        Insert(At, usize, u64),
        Delete(At, usize),
        Append(usize, u64),
        Truncate(At),
    }

    fn apply(v: &mut Vec<u8>, e: &Edit, bounds: &[usize]) {
        match e {
            Edit::Overwrite(at, n, seed) => {
                let a = at.of(v, bounds);
                let n = (*n).min(v.len() - a);
                v[a..a + n].copy_from_slice(&pseudo_random(n, *seed));
            }
            Edit::Insert(at, n, seed) => {
                let a = at.of(v, bounds);
                v.splice(a..a, pseudo_random(*n, *seed));
            }
            Edit::Delete(at, n) => {
                let a = at.of(v, bounds);
                let n = (*n).min(v.len() - a);
                v.drain(a..a + n);
            }
            Edit::Append(n, seed) => v.extend(pseudo_random(*n, *seed)),
            Edit::Truncate(at) => {
                let a = at.of(v, bounds);
                v.truncate(a);
            }
        }
    }

    fn edit() -> impl Strategy<Value = Edit> {
        let at = (0.0..1.0f64, prop::option::of(-2i8..=2)).prop_map(|(f, snap)| At { f, snap });
        let n = prop_oneof![1usize..4, 1usize..300_000];
        prop_oneof![
            (at.clone(), n.clone(), any::<u64>()).prop_map(|(a, n, s)| Edit::Overwrite(a, n, s)),
            (at.clone(), n.clone(), any::<u64>()).prop_map(|(a, n, s)| Edit::Insert(a, n, s)),
            (at.clone(), n.clone()).prop_map(|(a, n)| Edit::Delete(a, n)),
            (n, any::<u64>()).prop_map(|(n, s)| Edit::Append(n, s)),
            at.prop_map(Edit::Truncate),
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]
        #[test]
        fn the_same_chunks_as_cutting_everything(
            len in 0usize..3_000_000,
            seed in any::<u64>(),
            edits in prop::collection::vec(edit(), 0..4),
        ) {
            let old = base(len, seed);
            let bounds: Vec<usize> = chunk_bytes(&old)
                .chunks
                .iter()
                .scan(0, |at, c| {
                    *at += c.len as usize;
                    Some(*at)
                })
                .collect();
            let mut new = old.clone();
            for e in &edits {
                apply(&mut new, e, &bounds);
            }
            prop_assert_eq!(rechunk(&new, &old), chunk_bytes(&new));
        }
    }

    #[test]
    fn growing_or_shrinking_near_the_end() {
        // Close to the end a cut also depends on how much follows (under
        // AVG_CHUNK the stricter mask ends earlier): tails of a few small
        // files with bytes added or removed after them.
        for seed in 0..200u64 {
            let len = 40_000 + (seed as usize * 7_919) % 300_000;
            let old = pseudo_random(len, seed);
            for new in [
                [
                    &old[..],
                    &pseudo_random(20_000 + seed as usize * 997, seed + 1),
                ]
                .concat(),
                old[..len - (seed as usize * 131) % 30_000].to_vec(),
            ] {
                assert_eq!(rechunk(&new, &old), chunk_bytes(&new), "seed {seed}");
            }
        }
    }

    #[test]
    fn an_edit_in_the_middle_reuses_the_rest() {
        let old = base(8 << 20, 1);
        let mut new = old.clone();
        let mid = new.len() / 2;
        new[mid..mid + 1000].copy_from_slice(&pseudo_random(1000, 2));
        let d = rechunk(&new, &old);
        assert_eq!(d, chunk_bytes(&new));
        let before: std::collections::HashSet<_> =
            chunk_bytes(&old).chunks.iter().map(|c| c.id).collect();
        assert!(d.chunks.iter().filter(|c| !before.contains(&c.id)).count() <= 3);
    }

    #[test]
    fn a_new_content_is_handed_to_the_two_thread_chunker() {
        let old = pseudo_random((JUDGE_AFTER + (8 << 20)) as usize, 1);
        let new = pseudo_random(old.len(), 2);
        assert_eq!(rechunk(&new, &old), chunk_bytes(&new));
        // An empty previous version, a shorter input than announced.
        assert_eq!(rechunk(&new[..5 << 20], &[]), chunk_bytes(&new[..5 << 20]));
        let prior = chunk_bytes(&old).chunks;
        let short = rechunk_reader(&new[..1 << 20], 3 << 20, &prior, |_, _| {}).unwrap();
        assert_eq!(short, chunk_bytes(&new[..1 << 20]));
    }

    #[test]
    fn a_read_error_is_returned() {
        struct Failing;
        impl Read for Failing {
            fn read(&mut self, _: &mut [u8]) -> io::Result<usize> {
                Err(io::Error::other("disk gone"))
            }
        }
        let prior = chunk_bytes(&pseudo_random(1 << 20, 1)).chunks;
        let e = rechunk_reader(Failing, 1 << 20, &prior, |_, _| {}).unwrap_err();
        assert_eq!(e.to_string(), "disk gone");
    }
}

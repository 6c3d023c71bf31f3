//! The persistent stat cache.
//!
//! For every regular file it remembers the `lstat` fields bridge compares
//! (size, mtime and ctime in nanoseconds, inode, exec bit) next to the content
//! hash and chunk list computed from them. A rescan rehashes a file only when
//! one of those fields changed — or when the entry is *racy*: its mtime or
//! ctime was within [`racy_window`] (100 ms with sub-second timestamps, 2 s
//! without) of the moment its hashing began, so an in-place edit keeping size
//! in the same timestamp tick would be invisible to `lstat` (git's "racy
//! clean" problem). Racy entries are rehashed on their next check.
//!
//! The file format is a versioned little-endian record list; an unreadable or
//! foreign-version index is discarded (the cost is one rehash, never a wrong
//! answer).

use std::collections::HashMap;
use std::fs::File;
use std::io::{self, Read, Write};
use std::path::Path;
use std::time::{SystemTime, UNIX_EPOCH};

use crate::chunking::{ChunkRef, Digest, Hash};
use crate::path::RelPath;
use crate::scan::Stat;
use crate::tree::Tree;

const MAGIC: &[u8; 8] = b"BRIDGIX2";
/// Bytes of one chunk ref in an entry: its id and its length.
const CHUNK_REF_BYTES: usize = 32 + 4;

/// An mtime this close to the start of the hashing cannot be trusted to
/// change on the next write, on a file system with whole-second (or coarser)
/// timestamps.
pub const RACY_WINDOW_NS: i64 = 2_000_000_000;
/// The same with sub-second timestamps (ext4, xfs, btrfs: they tick at most a
/// jiffy, 10 ms, apart): a 1 GiB file hashed within 2 s of its last write was
/// hashed twice for every edit.
pub const FINE_RACY_WINDOW_NS: i64 = 100_000_000;

/// The racy window for a file with these timestamps: the fine one when either
/// has sub-second digits (a whole second by chance only costs a rehash).
pub fn racy_window(mtime_ns: i64, ctime_ns: i64) -> i64 {
    if mtime_ns % 1_000_000_000 != 0 || ctime_ns % 1_000_000_000 != 0 {
        FINE_RACY_WINDOW_NS
    } else {
        RACY_WINDOW_NS
    }
}

/// What the index knows about one file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cached {
    pub size: u64,
    pub mtime_ns: i64,
    pub ctime_ns: i64,
    pub ino: u64,
    pub exec: bool,
    /// Hashed too soon after its last write to trust the stat fields.
    pub racy: bool,
    pub hash: Hash,
    pub chunks: Box<[ChunkRef]>,
}

impl Cached {
    /// Builds an entry for a file hashed now from content `d` read between
    /// two identical `lstat`s `st`.
    pub fn new(st: &Stat, d: Digest) -> Cached {
        Cached::hashed_since(st, d, now_ns())
    }

    /// [`Cached::new`] for a hash that began at `started_ns`: racy when the
    /// file changed less than its racy window before that (a write after it
    /// began lands in a later timestamp tick, so `lstat` shows it).
    pub fn hashed_since(st: &Stat, d: Digest, started_ns: i64) -> Cached {
        let window = racy_window(st.mtime_ns, st.ctime_ns);
        Cached {
            size: st.size,
            mtime_ns: st.mtime_ns,
            ctime_ns: st.ctime_ns,
            ino: st.ino,
            exec: st.exec,
            racy: started_ns - st.mtime_ns < window || started_ns - st.ctime_ns < window,
            hash: d.hash,
            chunks: d.chunks.into_boxed_slice(),
        }
    }

    /// True when `st` shows the file unchanged since it was hashed.
    pub fn matches(&self, st: &Stat) -> bool {
        !self.racy
            && self.size == st.size
            && self.mtime_ns == st.mtime_ns
            && self.ctime_ns == st.ctime_ns
            && self.ino == st.ino
            && self.exec == st.exec
    }
}

/// Nanoseconds since the epoch.
pub fn now_ns() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos() as i64)
        .unwrap_or(0)
}

/// Path → cached file state.
#[derive(Debug, Default, Clone)]
pub struct Index {
    pub entries: HashMap<RelPath, Cached>,
}

impl Index {
    /// Loads `path`; a missing, corrupt or old-format file yields an empty index.
    pub fn load(path: &Path) -> Index {
        let mut entries = HashMap::new();
        match read_file(path, |p, c| _ = entries.insert(RelPath::trusted(p), c)) {
            Ok(()) => Index { entries },
            Err(()) => Index::default(),
        }
    }

    /// [`Index::load`]'s entries, each handed to `each` as read, in the
    /// file's order (a tree's: directory by directory); false if the file
    /// is corrupt (logged), after the entries before the damage.
    pub fn visit(path: &Path, mut each: impl FnMut(RelPath, Cached)) -> bool {
        read_file(path, |p, c| each(RelPath::trusted(p), c)).is_ok()
    }

    /// [`Index::load`] into the stat cache of a [`Tree`] (compact: no
    /// allocation per entry but a chunk list of two chunks or more).
    pub fn load_tree(path: &Path) -> Tree {
        let mut t = Tree::new();
        match read_file(path, |p, c| t.push_hashed(p, c)) {
            Ok(()) => t,
            Err(()) => Tree::new(),
        }
    }
}

impl Index {
    /// Decodes [`Index::encode`]'s form; an error says what is wrong with
    /// the bytes (what [`Index::load`] logs before it starts empty).
    pub fn decode(bytes: &[u8]) -> io::Result<Index> {
        let mut entries = HashMap::new();
        read_entries(bytes, |p, c| _ = entries.insert(RelPath::trusted(p), c))?;
        Ok(Index { entries })
    }
}

/// Decodes [`encode_tree`]'s form (or [`Index::encode`]'s) into a [`Tree`],
/// as [`Index::load_tree`] does from a file.
pub fn decode_tree(bytes: &[u8]) -> io::Result<Tree> {
    let mut t = Tree::new();
    read_entries(bytes, |p, c| t.push_hashed(p, c))?;
    Ok(t)
}

/// Reads an index file, passing each entry (its path checked) to `each`; a
/// missing file reads as empty, a corrupt one is an error (logged).
fn read_file(path: &Path, each: impl FnMut(&str, Cached)) -> Result<(), ()> {
    // Read whole: a slice reads each field with a copy, no call.
    match std::fs::read(path).and_then(|b| read_entries(&b[..], each)) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => {
            tracing::warn!(path = %path.display(), error = %e, "discarding unreadable index");
            Err(())
        }
    }
}

fn read_entries(mut r: &[u8], mut each: impl FnMut(&str, Cached)) -> io::Result<()> {
    let r = &mut r;
    let mut magic = [0u8; 8];
    r.read_exact(&mut magic)?;
    if &magic != MAGIC {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            "not a bridge index",
        ));
    }
    let n = read_u64(r)?;
    for _ in 0..n {
        let plen = read_u32(r)? as usize;
        if r.len() < plen {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
        let cur: &[u8] = r;
        let (p, rest) = cur.split_at(plen);
        *r = rest;
        let p =
            std::str::from_utf8(p).map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
        RelPath::check(p).map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
        let size = read_u64(r)?;
        let mtime_ns = read_u64(r)? as i64;
        let ctime_ns = read_u64(r)? as i64;
        let ino = read_u64(r)?;
        let mut flags = [0u8; 1];
        r.read_exact(&mut flags)?;
        let hash = read_hash(r)?;
        let nchunks = read_u32(r)? as usize;
        // At most what the bytes left can hold: a corrupt count allocates nothing.
        let mut chunks = Vec::with_capacity(nchunks.min(r.len() / CHUNK_REF_BYTES));
        for _ in 0..nchunks {
            let id = read_hash(r)?;
            chunks.push(ChunkRef {
                id,
                len: read_u32(r)?,
            });
        }
        each(
            p,
            Cached {
                size,
                mtime_ns,
                ctime_ns,
                ino,
                exec: flags[0] & 1 != 0,
                racy: flags[0] & 2 != 0,
                hash,
                chunks: chunks.into_boxed_slice(),
            },
        );
    }
    Ok(())
}

impl Index {
    /// Writes the index atomically (temp file, fsync, rename).
    pub fn save(&self, path: &Path) -> io::Result<()> {
        write_atomic(path, &self.encode())
    }

    /// The on-disk form. Encoding is quick (memory only); callers on a hot
    /// path encode under their lock and leave [`write_atomic`], with its
    /// fsync, to a background thread.
    pub fn encode(&self) -> Vec<u8> {
        let mut w = header(self.entries.len());
        for (p, c) in &self.entries {
            encode_entry(&mut w, p, c, &c.chunks);
        }
        w
    }
}

/// The on-disk form of the stat cache a tree holds (see [`Tree::hashed`]).
pub fn encode_tree(t: &Tree) -> Vec<u8> {
    let mut w = header(0);
    let mut n = 0u64;
    for (p, h) in t.hashed_files() {
        encode_entry(&mut w, &p, &h.to_cached_without_chunks(), &h.chunks());
        n += 1;
    }
    w[MAGIC.len()..MAGIC.len() + 8].copy_from_slice(&n.to_le_bytes());
    w
}

fn header(n: usize) -> Vec<u8> {
    let mut w = Vec::with_capacity(16 + n * 128);
    w.extend_from_slice(MAGIC);
    w.extend_from_slice(&(n as u64).to_le_bytes());
    w
}

/// One entry; `chunks` stands for `c.chunks`.
fn encode_entry(w: &mut Vec<u8>, p: &RelPath, c: &Cached, chunks: &[ChunkRef]) {
    w.extend_from_slice(&(p.as_str().len() as u32).to_le_bytes());
    w.extend_from_slice(p.as_str().as_bytes());
    for v in [c.size, c.mtime_ns as u64, c.ctime_ns as u64, c.ino] {
        w.extend_from_slice(&v.to_le_bytes());
    }
    w.push(c.exec as u8 | (c.racy as u8) << 1);
    w.extend_from_slice(c.hash.as_bytes());
    w.extend_from_slice(&(chunks.len() as u32).to_le_bytes());
    for ch in chunks {
        w.extend_from_slice(ch.id.as_bytes());
        w.extend_from_slice(&ch.len.to_le_bytes());
    }
}

/// Writes `bytes` to `path` atomically: a temporary file, fsync, rename.
///
/// The temporary file's name is this writer's own (pid and a counter), so
/// two processes or threads writing the same file at once each rename a
/// whole file of theirs: the last rename wins, neither fails. (With one
/// shared `.tmp` name, two `bridge up`s at once truncated each other's
/// temporary and the second rename found it gone.) It is created with
/// `O_EXCL`, never through a link, and removed when the write fails.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> io::Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    use std::sync::atomic::{AtomicU64, Ordering};
    static SEQ: AtomicU64 = AtomicU64::new(0);
    let n = SEQ.fetch_add(1, Ordering::Relaxed);
    let mut name = path.file_name().unwrap_or_default().to_os_string();
    name.push(format!(".{}.{n}.tmp", std::process::id()));
    let tmp = path.with_file_name(name);
    let written = (|| {
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .custom_flags(nix::libc::O_NOFOLLOW)
            .open(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)
    })();
    if written.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    written
}

/// Saves an index to its file, optionally on a background thread so the
/// fsync never stalls a sync round. Saves are numbered; a slow older save
/// never overwrites a newer one.
#[derive(Debug)]
pub struct Saver {
    path: std::path::PathBuf,
    /// Number of the newest save on disk; also serialises the writers.
    written: std::sync::Arc<std::sync::Mutex<u64>>,
    next: u64,
}

impl Saver {
    pub fn new(path: std::path::PathBuf) -> Saver {
        Saver {
            path,
            written: Default::default(),
            next: 0,
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Encodes `index` now; writes it now or, with `background`, on a thread.
    pub fn save(&mut self, index: &Index, background: bool) {
        self.save_encoded(index.encode(), background)
    }

    /// [`Saver::save`] for an index already encoded.
    pub fn save_encoded(&mut self, bytes: Vec<u8>, background: bool) {
        self.next += 1;
        let (seq, path, written) = (self.next, self.path.clone(), self.written.clone());
        let write = move || {
            let mut last = written.lock().unwrap_or_else(|e| e.into_inner());
            if *last > seq {
                return;
            }
            match write_atomic(&path, &bytes) {
                Ok(()) => *last = seq,
                Err(e) => {
                    tracing::warn!(path = %path.display(), error = %e, "cannot save the index")
                }
            }
        };
        if background {
            std::thread::spawn(write);
        } else {
            write();
        }
    }
}

fn read_u32(r: &mut impl Read) -> io::Result<u32> {
    let mut b = [0u8; 4];
    r.read_exact(&mut b)?;
    Ok(u32::from_le_bytes(b))
}

fn read_u64(r: &mut impl Read) -> io::Result<u64> {
    let mut b = [0u8; 8];
    r.read_exact(&mut b)?;
    Ok(u64::from_le_bytes(b))
}

fn read_hash(r: &mut impl Read) -> io::Result<Hash> {
    let mut b = [0u8; 32];
    r.read_exact(&mut b)?;
    Ok(Hash::from_bytes(b))
}

/// Result of hashing a file that may be written to while it is read.
pub enum HashOutcome {
    /// The stat, the content, and when the hashing began (ns since the epoch).
    Hashed(Stat, Digest, i64),
    /// The path is gone or is no longer a regular file.
    Vanished,
}

/// Files at least this big are hashed only once their racy window has
/// passed (see [`wait_out_racy_window`]).
pub const WAIT_RACY_BYTES: u64 = 64 << 20;

/// Waits, if `path` is a file of [`WAIT_RACY_BYTES`] or more written less
/// than [`FINE_RACY_WINDOW_NS`] ago, until that window has passed: hashed
/// sooner it would be racy and hashed again in whole ([`Cached::matches`]
/// never trusts a racy entry). A 1 GiB file edited and synced at once was
/// read twice (1.4 s each here) for a wait of under 0.1 s. Coarser
/// timestamps (a 2 s window) are not waited for.
fn wait_out_racy_window(path: &Path) {
    let Ok(st) = Stat::lstat(path) else { return };
    if st.kind != crate::scan::FileKind::File || st.size < WAIT_RACY_BYTES {
        return;
    }
    let window = racy_window(st.mtime_ns, st.ctime_ns);
    let left = st.mtime_ns.max(st.ctime_ns) + window - now_ns();
    if window == FINE_RACY_WINDOW_NS && (1..=window).contains(&left) {
        std::thread::sleep(std::time::Duration::from_nanos(left as u64 + 1_000_000));
    }
}

/// Reads and chunks `path`, making sure the content is not torn: `lstat`
/// before and after must agree, else it retries (a writer is active). After
/// `attempts` torn reads it returns `Err(WouldBlock)` so the caller can come
/// back later instead of shipping half a file.
pub fn hash_file(
    path: &Path,
    attempts: usize,
    each: impl FnMut(ChunkRef, &[u8]),
) -> io::Result<HashOutcome> {
    hash_file_after(path, attempts, &[], each)
}

/// [`hash_file`] for a file whose previous version had the chunks `prior`:
/// a big file's unchanged chunks are checked by their ids instead of cut
/// again ([`crate::rechunk`]). The result is the same.
pub fn hash_file_after(
    path: &Path,
    attempts: usize,
    prior: &[ChunkRef],
    mut each: impl FnMut(ChunkRef, &[u8]),
) -> io::Result<HashOutcome> {
    wait_out_racy_window(path);
    for _ in 0..attempts {
        let started = now_ns();
        let before = match Stat::lstat(path) {
            Ok(s) if s.kind == crate::scan::FileKind::File => s,
            Ok(_) => return Ok(HashOutcome::Vanished),
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(HashOutcome::Vanished),
            Err(e) => return Err(e),
        };
        let f = match File::open(path) {
            Ok(f) => f,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(HashOutcome::Vanished),
            Err(e) => return Err(e),
        };
        let d = if prior.len() >= 2 && before.size >= crate::rechunk::RECHUNK_MIN_BYTES {
            crate::rechunk::rechunk_reader(f, before.size, prior, &mut each)?
        } else {
            crate::chunking::chunk_reader_send(f, before.size, &mut each)?
        };
        let after = match Stat::lstat(path) {
            Ok(s) => s,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(HashOutcome::Vanished),
            Err(e) => return Err(e),
        };
        if before == after && d.size == after.size {
            return Ok(HashOutcome::Hashed(after, d, started));
        }
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    Err(io::Error::new(
        io::ErrorKind::WouldBlock,
        format!("{} kept changing while it was read", path.display()),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::chunking::chunk_bytes;
    use crate::tree::Node;
    use std::fs;

    fn stat_of(p: &Path) -> Stat {
        Stat::lstat(p).unwrap()
    }

    #[test]
    fn roundtrip_and_change_detection() {
        let d = tempfile::tempdir().unwrap();
        let f = d.path().join("f");
        fs::write(&f, b"hello").unwrap();
        let st = stat_of(&f);
        let mut c = Cached::new(&st, chunk_bytes(b"hello"));
        c.racy = false;
        let mut ix = Index::default();
        ix.entries.insert(RelPath::new("f").unwrap(), c.clone());
        let ip = d.path().join("index");
        ix.save(&ip).unwrap();
        let back = Index::load(&ip);
        assert_eq!(back.entries[&RelPath::new("f").unwrap()], c);

        assert!(c.matches(&st));
        // Same size, same second: mtime nanoseconds or ctime still differ.
        fs::write(&f, b"jello").unwrap();
        let st2 = stat_of(&f);
        assert!(!c.matches(&st2) || st2.mtime_ns == st.mtime_ns);
        let mut moved = st;
        moved.ino += 1;
        assert!(!c.matches(&moved), "inode change");
        let mut chmod = st;
        chmod.exec = !chmod.exec;
        // chmod is a change too: it cannot be told apart from an in-place
        // edit that restored mtime (both move only ctime), so it rehashes.
        assert!(!c.matches(&chmod), "exec bit");
    }

    fn cached(content: &[u8], mtime_ns: i64, max_chunk: Option<usize>) -> Cached {
        let mut d = chunk_bytes(content);
        if let Some(n) = max_chunk {
            // Split by hand: a list of two chunks or more.
            d.chunks = content
                .chunks(n)
                .map(|c| ChunkRef {
                    id: blake3::hash(c),
                    len: c.len() as u32,
                })
                .collect();
        }
        Cached {
            size: content.len() as u64,
            mtime_ns,
            ctime_ns: mtime_ns,
            ino: mtime_ns as u64,
            exec: false,
            racy: false,
            hash: d.hash,
            chunks: d.chunks.into_boxed_slice(),
        }
    }

    #[test]
    fn a_cache_saved_in_any_order_loads_into_the_same_tree() {
        let d = tempfile::tempdir().unwrap();
        let mut ix = Index::default();
        for i in 0..60 {
            let p = format!("d{}/e{}/f{i}", i % 3, i % 2);
            let body = format!("file {i}");
            let split = (i % 10 == 0).then_some(3);
            ix.entries
                .insert(RelPath::new(p).unwrap(), cached(body.as_bytes(), i, split));
        }
        ix.entries
            .insert(RelPath::new("top").unwrap(), cached(b"top", 1, None));
        // A tree of files alone, as a saved cache loads (no directory entries).
        let mut want = Tree::new();
        for (p, c) in &ix.entries {
            want.insert_hashed(p.clone(), c.clone());
        }
        let mut full = Tree::new();
        for d in ["d0", "d1", "d2"] {
            full.insert(RelPath::new(d).unwrap(), Node::Dir);
            for e in ["e0", "e1"] {
                full.insert(RelPath::new(format!("{d}/{e}")).unwrap(), Node::Dir);
            }
        }
        for (p, c) in &ix.entries {
            full.insert_hashed(p.clone(), c.clone());
        }
        // A hash map's order, then the path order a tree saves in.
        let unordered = d.path().join("unordered");
        ix.save(&unordered).unwrap();
        let ordered = d.path().join("ordered");
        write_atomic(&ordered, &encode_tree(&full)).unwrap();
        for path in [unordered, ordered] {
            let got = Index::load_tree(&path);
            assert_eq!(
                (got.len(), got.files(), got.bytes()),
                (want.len(), want.files(), want.bytes())
            );
            for (p, c) in &ix.entries {
                let h = got
                    .hashed(p)
                    .unwrap_or_else(|| panic!("{p} in {}", path.display()));
                assert_eq!(&h.to_cached(), c, "{p} in {}", path.display());
            }
            assert_eq!(got.dirs_above_entries().len(), 9, "d0..d2 and d0/e0..d2/e1");
        }
    }

    #[test]
    fn a_big_file_is_hashed_once_its_racy_window_has_passed() {
        let d = tempfile::tempdir().unwrap();
        let f = d.path().join("big");
        fs::write(&f, vec![7u8; WAIT_RACY_BYTES as usize]).unwrap();
        let Ok(HashOutcome::Hashed(st, dg, started)) = hash_file(&f, 3, |_, _| {}) else {
            panic!("cannot hash");
        };
        // Sub-second timestamps: hashed after the window, so trusted.
        if racy_window(st.mtime_ns, st.ctime_ns) == FINE_RACY_WINDOW_NS {
            assert!(!Cached::hashed_since(&st, dg, started).racy);
        }
    }

    #[test]
    fn racy_entries_are_never_trusted() {
        let d = tempfile::tempdir().unwrap();
        let f = d.path().join("f");
        fs::write(&f, b"hello").unwrap();
        let st = stat_of(&f);
        // Hashed right after the write: racy, so identical stat fields do not
        // prove the content unchanged (an in-place edit in the same tick).
        let c = Cached::new(&st, chunk_bytes(b"hello"));
        assert!(c.racy);
        assert!(!c.matches(&st));
    }

    #[test]
    fn the_racy_window_follows_the_timestamps_and_the_hash_start() {
        let d = chunk_bytes(b"hello");
        let ms = 1_000_000;
        let mut st = Stat {
            kind: crate::scan::FileKind::File,
            size: 5,
            mtime_ns: 1_700_000_000_123_456_789,
            ctime_ns: 1_700_000_000_123_456_789,
            ino: 7,
            exec: false,
        };
        // Sub-second timestamps: trusted once the hash began 100 ms after
        // the last change, however long it took.
        assert!(!Cached::hashed_since(&st, d.clone(), st.mtime_ns + 150 * ms).racy);
        assert!(Cached::hashed_since(&st, d.clone(), st.mtime_ns + 50 * ms).racy);
        // A ctime change counts the same.
        st.ctime_ns += 100 * ms;
        assert!(Cached::hashed_since(&st, d.clone(), st.mtime_ns + 150 * ms).racy);
        // Whole-second timestamps (FAT, some network file systems): 2 s.
        st.mtime_ns = 1_700_000_000_000_000_000;
        st.ctime_ns = st.mtime_ns;
        assert!(Cached::hashed_since(&st, d.clone(), st.mtime_ns + 1500 * ms).racy);
        assert!(!Cached::hashed_since(&st, d, st.mtime_ns + 2100 * ms).racy);
    }

    #[test]
    fn garbage_index_is_discarded() {
        let d = tempfile::tempdir().unwrap();
        let ip = d.path().join("index");
        fs::write(&ip, b"BRIDGIX1\xff\xff\xff").unwrap();
        assert!(Index::load(&ip).entries.is_empty());
        assert!(Index::load(&d.path().join("missing")).entries.is_empty());
    }

    /// Found by the `index` fuzz target: an entry claiming 2^32 - 1 chunks
    /// made the decoder reserve room for a million (36 MB) before finding
    /// that the bytes end. The reservation is now bounded by the bytes left.
    #[test]
    fn a_corrupt_chunk_count_is_an_error_and_reserves_nothing_it_cannot_fill() {
        let mut b = MAGIC.to_vec();
        b.extend_from_slice(&1u64.to_le_bytes());
        b.extend_from_slice(&1u32.to_le_bytes());
        b.push(b'a');
        b.extend_from_slice(&[0u8; 8 * 4 + 1 + 32]);
        b.extend_from_slice(&u32::MAX.to_le_bytes());
        let e = Index::decode(&b).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::UnexpectedEof);
        assert!(decode_tree(&b).is_err());
        // A valid one decodes to what was encoded.
        let d = tempfile::tempdir().unwrap();
        fs::write(d.path().join("y"), b"abc").unwrap();
        let st = stat_of(&d.path().join("y"));
        let mut i = Index::default();
        let p = RelPath::new("x/y").unwrap();
        i.entries.insert(p, Cached::new(&st, chunk_bytes(b"abc")));
        assert_eq!(Index::decode(&i.encode()).unwrap().entries, i.entries);
    }

    /// Two writers of one file at once each rename a whole file of their
    /// own (found by the fault suite: two `bridge up`s at once).
    #[test]
    fn concurrent_atomic_writes_of_one_file_never_fail_or_mix() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("provider.toml");
        std::thread::scope(|s| {
            for b in [b'a', b'b'] {
                let p = &p;
                s.spawn(move || {
                    for _ in 0..200 {
                        write_atomic(p, &[b; 4096]).unwrap();
                    }
                });
            }
        });
        let got = fs::read(&p).unwrap();
        assert!(got == [b'a'; 4096] || got == [b'b'; 4096]);
        assert_eq!(
            fs::read_dir(d.path()).unwrap().count(),
            1,
            "temporaries left"
        );
    }

    #[test]
    fn hash_file_reads_whole_content() {
        let d = tempfile::tempdir().unwrap();
        let f = d.path().join("f");
        fs::write(&f, vec![7u8; 100_000]).unwrap();
        let mut seen = 0u64;
        match hash_file(&f, 3, |c, b| {
            assert_eq!(c.len as usize, b.len());
            seen += b.len() as u64;
        })
        .unwrap()
        {
            HashOutcome::Hashed(st, dg, _) => {
                assert_eq!(st.size, 100_000);
                assert_eq!(dg, chunk_bytes(&vec![7u8; 100_000]));
            }
            HashOutcome::Vanished => panic!("vanished"),
        }
        assert_eq!(seen, 100_000);
        assert!(matches!(
            hash_file(&d.path().join("nope"), 3, |_, _| {}).unwrap(),
            HashOutcome::Vanished
        ));
    }
}

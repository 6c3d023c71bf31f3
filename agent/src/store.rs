//! Where the agent finds chunks it already has.
//!
//! The agent keeps no second copy of mirror content: a chunk's location is a
//! byte range of a file it wrote (a mirror file) or of a *retired* file — an old
//! version hardlinked into `store/retired/` when a mirror file was replaced or
//! deleted. Retiring costs a link, not a copy, and makes a branch switch back to
//! known content (or a rename) cost no transfer. Retired files are bounded by
//! `cache_bytes`, oldest evicted first; an evicted big file is unlinked in the
//! background from `store/gone/` (emptied at open, see [`bridge_proto::oldfiles`]).
//!
//! Locations are hints: every chunk read is checked against its BLAKE3 id, so a
//! file changed behind the agent's back can never put wrong bytes in a mirror.
//!
//! A mirror file of one chunk (most files: up to the chunker's average size)
//! gets no location: its chunk is the whole file, and the mirror's tree knows
//! which file has that content hash. The store keeps only the first 8 bytes
//! of the id ([`Store::has`]); a round that wants the chunk finds the file in
//! the tree (`apply::Wholes`). A location and a path per file were most of
//! the agent's memory at 200,000 files.

use std::collections::{HashMap, HashSet, VecDeque};
use std::fs::{self, File};
use std::io::{self, Read, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use bridge_proto::chunking::{ChunkRef, Hash, chunk_id};

/// A byte range of a file holding a chunk.
#[derive(Debug, Clone)]
pub struct Loc {
    pub file: Arc<Path>,
    pub offset: u64,
    pub len: u32,
}

/// One retired file version.
#[derive(Debug)]
struct Retired {
    hash: Hash,
    path: Arc<Path>,
    size: u64,
}

/// Chunk locations plus the bounded set of retired file versions.
#[derive(Debug)]
pub struct Store {
    retired_dir: PathBuf,
    gone_dir: PathBuf,
    locs: HashMap<Hash, Loc>,
    /// The ids (first 8 bytes) of the chunks that are a whole mirror file.
    /// Entries may be stale (the file changed or went since): a read checks,
    /// and [`Store::forget`] drops them. A full refresh of the mirror rebuilds
    /// the set ([`Store::clear_wholes`]).
    wholes: HashSet<u64>,
    /// Oldest first; evicted from the front past `cache_bytes`.
    retired: VecDeque<Retired>,
    retired_bytes: u64,
    cache_bytes: u64,
}

impl Store {
    /// Opens `dir` (created if missing), reloading the retired files' chunk lists.
    pub fn open(dir: &Path, cache_bytes: u64) -> io::Result<Store> {
        let retired_dir = dir.join("retired");
        fs::create_dir_all(&retired_dir)?;
        let gone_dir = dir.join("gone");
        bridge_proto::oldfiles::empty_dir(&gone_dir)?;
        let mut s = Store {
            retired_dir,
            gone_dir,
            locs: HashMap::new(),
            wholes: HashSet::new(),
            retired: VecDeque::new(),
            retired_bytes: 0,
            cache_bytes,
        };
        let mut found = Vec::new();
        for e in fs::read_dir(&s.retired_dir)? {
            let e = e?;
            let name = e.file_name().to_string_lossy().into_owned();
            let Some(hex) = name.strip_suffix(".chunks") else {
                continue;
            };
            let blob = s.retired_dir.join(hex);
            match (
                read_chunk_list(&e.path()),
                fs::metadata(&blob),
                parse_hex(hex),
            ) {
                (Ok(chunks), Ok(m), Some(hash)) => {
                    let age = e.metadata().and_then(|m| m.modified()).ok();
                    found.push((age, hash, blob, m.len(), chunks));
                }
                _ => {
                    let _ = fs::remove_file(e.path());
                    let _ = fs::remove_file(&blob);
                }
            }
        }
        found.sort_by_key(|f| f.0);
        for (_, hash, blob, size, chunks) in found {
            let path: Arc<Path> = blob.into();
            s.index_file(&path, &chunks);
            s.retired_bytes += size;
            s.retired.push_back(Retired { hash, path, size });
        }
        s.evict();
        Ok(s)
    }

    /// Whether the agent holds chunk `id`: at a location, or as a whole
    /// mirror file (as far as the first 8 bytes of its id tell).
    pub fn has(&self, id: &Hash) -> bool {
        self.locs.contains_key(id) || self.wholes.contains(&short(id))
    }

    /// Whether `id` is held only as a whole mirror file (no location).
    pub fn is_whole(&self, id: &Hash) -> bool {
        !self.locs.contains_key(id) && self.wholes.contains(&short(id))
    }

    /// Records the mirror file `file` holding `chunks`: a file of one chunk
    /// by its id only, any other by its chunks' locations.
    pub fn index_mirror_file(&mut self, file: &Path, chunks: &[ChunkRef]) {
        match chunks {
            [] => {}
            [one] => _ = self.wholes.insert(short(&one.id)),
            _ => self.index_file(&file.into(), chunks),
        }
    }

    /// Forgets every whole mirror file (a full refresh records them again).
    pub fn clear_wholes(&mut self) {
        self.wholes = HashSet::new();
    }

    /// How many whole mirror files are recorded (stale ones included).
    pub fn wholes(&self) -> usize {
        self.wholes.len()
    }

    pub fn loc(&self, id: &Hash) -> Option<&Loc> {
        self.locs.get(id)
    }

    /// Records that `file` holds `chunks` back to back.
    pub fn index_file(&mut self, file: &Arc<Path>, chunks: &[ChunkRef]) {
        let mut offset = 0u64;
        for c in chunks {
            self.locs.insert(
                c.id,
                Loc {
                    file: file.clone(),
                    offset,
                    len: c.len,
                },
            );
            offset += c.len as u64;
        }
    }

    /// Forgets a location that failed verification.
    pub fn forget(&mut self, id: &Hash) {
        self.locs.remove(id);
        self.wholes.remove(&short(id));
    }

    /// Keeps the content of `file` (about to be replaced or deleted) as a
    /// retired version, repointing its chunks at it.
    pub fn retire(&mut self, file: &Path, hash: Hash, chunks: &[ChunkRef]) -> io::Result<()> {
        let size: u64 = chunks.iter().map(|c| c.len as u64).sum();
        if size == 0 || size > self.cache_bytes {
            self.drop_file_locs(file, chunks);
            return Ok(());
        }
        let blob = self.retired_dir.join(hash.to_hex().as_str());
        let path: Arc<Path> = blob.clone().into();
        if self.retired.iter().any(|r| r.hash == hash) {
            // Already kept; just make sure the chunks point somewhere alive.
            self.index_file(&path, chunks);
            return Ok(());
        }
        match fs::hard_link(file, &blob) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
            Err(e) => {
                self.drop_file_locs(file, chunks);
                return Err(e);
            }
        }
        write_chunk_list(
            &self.retired_dir.join(format!("{}.chunks", hash.to_hex())),
            chunks,
        )?;
        self.index_file(&path, chunks);
        self.retired_bytes += size;
        self.retired.push_back(Retired { hash, path, size });
        self.evict();
        Ok(())
    }

    fn drop_file_locs(&mut self, file: &Path, chunks: &[ChunkRef]) {
        for c in chunks {
            if self.locs.get(&c.id).is_some_and(|l| &*l.file == file) {
                self.locs.remove(&c.id);
            }
        }
    }

    fn evict(&mut self) {
        while self.retired_bytes > self.cache_bytes {
            let Some(r) = self.retired.pop_front() else {
                break;
            };
            self.retired_bytes -= r.size;
            self.locs
                .retain(|_, l| !Arc::ptr_eq(&l.file, &r.path) && l.file != r.path);
            let _ = bridge_proto::oldfiles::remove(&r.path, r.size, &self.gone_dir);
            let _ = fs::remove_file(self.retired_dir.join(format!("{}.chunks", r.hash.to_hex())));
        }
    }

    /// Reads and verifies chunk `id`. `None` when it is unknown or its location
    /// no longer holds it (the location is then forgotten).
    /// The bytes at the chunk's recorded location, not checked against its
    /// id: the caller verifies them (see [`Store::read`]) and calls
    /// [`Store::forget`] on a mismatch.
    pub fn read_unverified(&mut self, id: &Hash, files: &mut FileCache) -> Option<Vec<u8>> {
        let loc = self.locs.get(id)?.clone();
        let mut buf = vec![0u8; loc.len as usize];
        match files
            .get(&loc.file)
            .and_then(|f| f.read_exact_at(&mut buf, loc.offset))
        {
            Ok(()) => Some(buf),
            Err(_) => {
                self.locs.remove(id);
                None
            }
        }
    }

    pub fn read(&mut self, id: &Hash, files: &mut FileCache) -> Option<Vec<u8>> {
        let loc = self.locs.get(id)?.clone();
        let mut buf = vec![0u8; loc.len as usize];
        let ok = files
            .get(&loc.file)
            .and_then(|f| f.read_exact_at(&mut buf, loc.offset))
            .is_ok()
            && chunk_id(&buf) == *id;
        if ok {
            Some(buf)
        } else {
            self.locs.remove(id);
            None
        }
    }

    /// Total size of retired versions kept.
    pub fn retired_bytes(&self) -> u64 {
        self.retired_bytes
    }
}

/// Open files reused across the chunk reads of one sync round.
#[derive(Default)]
pub struct FileCache {
    files: HashMap<Arc<Path>, File>,
}

impl FileCache {
    pub(crate) fn get(&mut self, p: &Arc<Path>) -> io::Result<&File> {
        if !self.files.contains_key(p) {
            if self.files.len() >= 64 {
                self.files.clear();
            }
            let f = File::open(p)?;
            self.files.insert(p.clone(), f);
        }
        Ok(&self.files[p])
    }

    /// Closes everything (before files are replaced under their names).
    pub fn clear(&mut self) {
        self.files.clear();
    }
}

/// The first 8 bytes of a chunk id: what [`Store::wholes`] keeps.
fn short(id: &Hash) -> u64 {
    let b = id.as_bytes();
    u64::from_le_bytes([b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7]])
}

fn parse_hex(s: &str) -> Option<Hash> {
    Hash::from_hex(s).ok()
}

fn write_chunk_list(path: &Path, chunks: &[ChunkRef]) -> io::Result<()> {
    let mut buf = Vec::with_capacity(chunks.len() * 36);
    for c in chunks {
        buf.extend_from_slice(c.id.as_bytes());
        buf.extend_from_slice(&c.len.to_le_bytes());
    }
    File::create(path)?.write_all(&buf)
}

fn read_chunk_list(path: &Path) -> io::Result<Vec<ChunkRef>> {
    let mut buf = Vec::new();
    File::open(path)?.read_to_end(&mut buf)?;
    if buf.len() % 36 != 0 {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            "truncated chunk list",
        ));
    }
    Ok(buf
        .chunks_exact(36)
        .map(|r| ChunkRef {
            id: Hash::from_bytes(r[..32].try_into().expect("32 bytes")),
            len: u32::from_le_bytes(r[32..].try_into().expect("4 bytes")),
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;
    use bridge_proto::chunking::chunk_bytes;

    #[test]
    fn retire_keeps_content_and_evicts_oldest() {
        let d = tempfile::tempdir().unwrap();
        let mut s = Store::open(&d.path().join("store"), 150).unwrap();
        let mut files = FileCache::default();
        let mk = |name: &str, byte: u8| {
            let p = d.path().join(name);
            let data = vec![byte; 100];
            fs::write(&p, &data).unwrap();
            (p, chunk_bytes(&data))
        };
        let (a, da) = mk("a", 1);
        s.retire(&a, da.hash, &da.chunks).unwrap();
        fs::remove_file(&a).unwrap();
        assert_eq!(
            s.read(&da.chunks[0].id, &mut files).unwrap(),
            vec![1u8; 100]
        );

        let (b, db) = mk("b", 2);
        s.retire(&b, db.hash, &db.chunks).unwrap();
        assert!(!s.has(&da.chunks[0].id), "oldest evicted past the bound");
        assert!(s.has(&db.chunks[0].id));
        assert_eq!(s.retired_bytes(), 100);

        // Reopening finds the retired version again.
        drop(s);
        let mut s = Store::open(&d.path().join("store"), 150).unwrap();
        assert_eq!(
            s.read(&db.chunks[0].id, &mut files).unwrap(),
            vec![2u8; 100]
        );
    }

    #[test]
    fn a_changed_location_is_not_trusted() {
        let d = tempfile::tempdir().unwrap();
        let mut s = Store::open(&d.path().join("store"), 1 << 20).unwrap();
        let p = d.path().join("f");
        fs::write(&p, b"hello").unwrap();
        let dg = chunk_bytes(b"hello");
        let path: Arc<Path> = p.clone().into();
        s.index_file(&path, &dg.chunks);
        fs::write(&p, b"jello").unwrap();
        assert!(
            s.read(&dg.chunks[0].id, &mut FileCache::default())
                .is_none()
        );
        assert!(!s.has(&dg.chunks[0].id));
    }
}

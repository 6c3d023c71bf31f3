//! A job's declared outputs, as the daemon pulls them.
//!
//! The daemon polls [`Outputs::manifest`] while the job runs and once after it
//! ends. Files are chunked with the sync's FastCDC rules, so the daemon fetches
//! only chunks it lacks (an appended metrics file costs its new tail). A stat
//! cache keeps unchanged files from being rehashed on every poll. While the
//! job runs, a file modified in the last [`SETTLE`] is left out: it is probably
//! still being written, and the next poll takes it once it has settled (the
//! final manifest takes everything).
//!
//! With `defer`, a file missing from the stat cache is listed unhashed and the
//! daemon reads it with [`read_whole`], which chunks and hashes it while
//! sending it: a new checkpoint is read once, and its transfer starts at once
//! instead of after a full hashing pass.

use std::cell::Cell;
use std::collections::{HashMap, HashSet};
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read};
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::time::Duration;

use bridge_proto::chunking::{ChunkRef, Hash, chunk_reader};
use bridge_proto::index::{Cached, HashOutcome, hash_file_after, now_ns};
use bridge_proto::scan::{FileKind, Stat};
use bridge_proto::v1;

/// How long a file must go unmodified before a running job's manifest lists it.
pub const SETTLE: Duration = Duration::from_millis(250);

/// The stat cache of one job's outputs.
#[derive(Default)]
pub struct Outputs {
    cache: HashMap<String, Cached>,
    /// Files the last manifest listed unhashed: the only paths
    /// [`read_whole`] is asked for.
    deferred: HashSet<String>,
}

impl Outputs {
    /// Walks `declared` (relative to `cwd`; a trailing '/' marks a directory)
    /// and lists what is there. `complete`: the job has ended, list everything.
    /// `defer`: list files not in the stat cache unhashed.
    pub fn manifest(
        &mut self,
        cwd: &Path,
        declared: &[String],
        complete: bool,
        defer: bool,
    ) -> Vec<v1::OutputEntry> {
        self.deferred.clear();
        let found = walk_declared(cwd, declared);
        let settled_before = now_ns() - SETTLE.as_nanos() as i64;
        let mut out = Vec::with_capacity(found.len());
        for (rel, st) in found {
            let p = cwd.join(&rel);
            match st.kind {
                FileKind::Dir => out.push(v1::OutputEntry {
                    path: rel,
                    kind: v1::Kind::Dir as i32,
                    ..Default::default()
                }),
                FileKind::Symlink => {
                    if let Ok(t) = fs::read_link(&p) {
                        out.push(v1::OutputEntry {
                            path: rel,
                            kind: v1::Kind::Symlink as i32,
                            target: t.to_string_lossy().into_owned(),
                            ..Default::default()
                        });
                    }
                }
                FileKind::File => {
                    if !complete && st.mtime_ns > settled_before {
                        continue;
                    }
                    let c = match self.cache.get(&rel) {
                        Some(c) if c.matches(&st) => c.clone(),
                        _ if defer => {
                            out.push(v1::OutputEntry {
                                path: rel.clone(),
                                kind: v1::Kind::File as i32,
                                executable: st.exec,
                                size: st.size,
                                unhashed: true,
                                ..Default::default()
                            });
                            self.deferred.insert(rel);
                            continue;
                        }
                        // A file hashed before (a log or a table that
                        // grew, a checkpoint written again): its unchanged
                        // chunks are checked, not cut again.
                        prev => match hash_file_after(
                            &p,
                            3,
                            prev.map_or(&[][..], |c| &c.chunks[..]),
                            |_, _| {},
                        ) {
                            Ok(HashOutcome::Hashed(st, d, t)) => Cached::hashed_since(&st, d, t),
                            _ => continue,
                        },
                    };
                    out.push(v1::OutputEntry {
                        path: rel.clone(),
                        kind: v1::Kind::File as i32,
                        executable: c.exec,
                        size: c.size,
                        hash: c.hash.as_bytes().to_vec().into(),
                        target: String::new(),
                        chunk_ids: c
                            .chunks
                            .iter()
                            .map(|r| r.id.as_bytes().to_vec().into())
                            .collect(),
                        chunk_lens: c.chunks.iter().map(|r| r.len).collect(),
                        unhashed: false,
                    });
                    self.cache.insert(rel, c);
                }
                FileKind::Other => {}
            }
        }
        out
    }

    /// Whether the last manifest listed `rel` unhashed.
    pub fn deferred(&self, rel: &str) -> bool {
        self.deferred.contains(rel)
    }

    /// Records what [`read_whole`] hashed, so later manifests list it.
    pub fn remember(&mut self, rel: &str, c: Cached) {
        self.deferred.remove(rel);
        self.cache.insert(rel.to_string(), c);
    }

    /// The bytes of chunks `indexes` of the version of `rel` whose content hash
    /// is `hash`, each verified; an error when the file has changed since.
    pub fn read_chunks(
        &self,
        cwd: &Path,
        rel: &str,
        hash: &[u8],
        indexes: &[u32],
    ) -> io::Result<Vec<(u32, Vec<u8>)>> {
        let changed = || io::Error::other(format!("{rel} changed since the manifest; pull again"));
        let c = self.cache.get(rel).ok_or_else(changed)?;
        if c.hash.as_bytes() != hash {
            return Err(changed());
        }
        let f = File::open(cwd.join(rel))?;
        let mut offsets = Vec::with_capacity(c.chunks.len());
        let mut off = 0u64;
        for r in c.chunks.iter() {
            offsets.push(off);
            off += r.len as u64;
        }
        let mut out = Vec::with_capacity(indexes.len());
        for &i in indexes {
            let ChunkRef { id, len } = *c.chunks.get(i as usize).ok_or_else(changed)?;
            let mut buf = vec![0u8; len as usize];
            f.read_exact_at(&mut buf, offsets[i as usize])
                .map_err(|_| changed())?;
            if blake3::hash(&buf) != id {
                return Err(changed());
            }
            out.push((i, buf));
        }
        Ok(out)
    }
}

/// Reads `rel` (relative to `cwd`) once for a whole-file pull: chunks and
/// hashes it as it goes and hands `send` every chunk in order (its bytes
/// unless `have` holds its id), then the `last` message. `send` returning
/// false (the daemon went away) stops the read: `Ok(None)`. An error when the
/// file is not a regular file or changed while it was read; the stat-checked
/// result otherwise, for the stat cache.
pub fn read_whole(
    cwd: &Path,
    rel: &str,
    have: &HashSet<Hash>,
    mut send: impl FnMut(v1::ChunkBody) -> bool,
) -> io::Result<Option<Cached>> {
    let changed = || io::Error::other(format!("{rel} changed while it was read; pull again"));
    let p = cwd.join(rel);
    let before = Stat::lstat(&p)?;
    if before.kind != FileKind::File {
        return Err(changed());
    }
    // O_NOFOLLOW: a file swapped for a symlink since the lstat is refused.
    let f = OpenOptions::new()
        .read(true)
        .custom_flags(nix::libc::O_NOFOLLOW)
        .open(&p)?;
    let stopped = Cell::new(false);
    let reader = Stoppable {
        inner: f,
        stopped: &stopped,
    };
    let mut index = 0u32;
    let d = chunk_reader(reader, before.size, |c, body| {
        let data = if have.contains(&c.id) {
            Default::default()
        } else {
            bytes_of(body)
        };
        let msg = v1::ChunkBody {
            index,
            data,
            id: c.id.as_bytes().to_vec().into(),
            len: c.len,
            ..Default::default()
        };
        index += 1;
        if !send(msg) {
            stopped.set(true);
        }
    });
    if stopped.get() {
        return Ok(None);
    }
    let d = d?;
    let after = Stat::lstat(&p)?;
    if before != after || d.size != after.size {
        return Err(changed());
    }
    let last = v1::ChunkBody {
        last: true,
        hash: d.hash.as_bytes().to_vec().into(),
        size: d.size,
        executable: after.exec,
        ..Default::default()
    };
    if !send(last) {
        return Ok(None);
    }
    Ok(Some(Cached::new(&after, d)))
}

fn bytes_of(body: &[u8]) -> prost::bytes::Bytes {
    prost::bytes::Bytes::copy_from_slice(body)
}

/// A reader that fails once `stopped` is set, so chunking ends early.
struct Stoppable<'a, R> {
    inner: R,
    stopped: &'a Cell<bool>,
}

impl<R: Read> Read for Stoppable<'_, R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if self.stopped.get() {
            return Err(io::Error::other("the reader went away"));
        }
        self.inner.read(buf)
    }
}

/// Appends `rel` (relative to `cwd`) and, for a directory, everything below it.
/// Paths that do not exist (yet) are skipped; symlinks are not followed.
/// Everything under the `declared` outputs (relative to `cwd`), sorted.
pub fn walk_declared(cwd: &Path, declared: &[String]) -> Vec<(String, Stat)> {
    let mut found = Vec::new();
    for d in declared {
        walk(cwd, d.trim_end_matches('/'), &mut found);
    }
    found.sort_by(|a, b| a.0.cmp(&b.0));
    found.dedup_by(|a, b| a.0 == b.0);
    found
}

fn walk(cwd: &Path, rel: &str, out: &mut Vec<(String, Stat)>) {
    let Ok(st) = Stat::lstat(&cwd.join(rel)) else {
        return;
    };
    out.push((rel.to_string(), st));
    if st.kind != FileKind::Dir {
        return;
    }
    let mut stack: Vec<PathBuf> = vec![PathBuf::from(rel)];
    while let Some(dir) = stack.pop() {
        let Ok(rd) = fs::read_dir(cwd.join(&dir)) else {
            continue;
        };
        for e in rd.flatten() {
            let child = dir.join(e.file_name());
            let Some(s) = child.to_str() else { continue };
            let Ok(st) = Stat::lstat(&cwd.join(&child)) else {
                continue;
            };
            out.push((s.to_string(), st));
            if st.kind == FileKind::Dir {
                stack.push(child);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bridge_proto::chunking::chunk_bytes;

    /// Bytes FastCDC cuts into several chunks.
    fn data(n: usize) -> Vec<u8> {
        bridge_proto::chunking::pseudo_random(n, 1)
    }

    fn whole(
        cwd: &Path,
        rel: &str,
        have: &HashSet<Hash>,
    ) -> io::Result<(Vec<v1::ChunkBody>, Option<Cached>)> {
        let mut got = Vec::new();
        let c = read_whole(cwd, rel, have, |b| {
            got.push(b);
            true
        })?;
        Ok((got, c))
    }

    #[test]
    fn deferred_files_are_listed_unhashed_until_read_whole() {
        let d = tempfile::tempdir().unwrap();
        fs::create_dir(d.path().join("out")).unwrap();
        let body = data(600 * 1024);
        fs::write(d.path().join("out/ckpt.bin"), &body).unwrap();
        // Past the racy window, so the stat cache trusts what is hashed.
        std::thread::sleep(Duration::from_nanos(
            bridge_proto::index::RACY_WINDOW_NS as u64 + 50_000_000,
        ));
        let declared = vec!["out/".to_string()];
        let mut o = Outputs::default();

        let m = o.manifest(d.path(), &declared, true, true);
        let e = m.iter().find(|e| e.path == "out/ckpt.bin").unwrap();
        assert!(e.unhashed && e.hash.is_empty() && e.chunk_ids.is_empty());
        assert_eq!(e.size, body.len() as u64);
        assert!(o.deferred("out/ckpt.bin"));

        let (msgs, c) = whole(d.path(), "out/ckpt.bin", &HashSet::new()).unwrap();
        let want = chunk_bytes(&body);
        let (last, chunks) = msgs.split_last().unwrap();
        assert!(last.last && last.data.is_empty());
        assert_eq!(&last.hash[..], want.hash.as_bytes());
        assert_eq!(last.size, body.len() as u64);
        assert_eq!(chunks.len(), want.chunks.len());
        let mut joined = Vec::new();
        for (i, (m, w)) in chunks.iter().zip(&want.chunks).enumerate() {
            assert_eq!(m.index as usize, i);
            assert_eq!(&m.id[..], w.id.as_bytes());
            assert_eq!(m.len, w.len);
            joined.extend_from_slice(&m.data);
        }
        assert_eq!(joined, body);

        // Remembered: the next manifest lists it hashed, and its chunks can
        // be read by index.
        o.remember("out/ckpt.bin", c.unwrap());
        let m = o.manifest(d.path(), &declared, true, true);
        let e = m.iter().find(|e| e.path == "out/ckpt.bin").unwrap();
        assert!(!e.unhashed);
        assert_eq!(&e.hash[..], want.hash.as_bytes());
        assert!(!o.deferred("out/ckpt.bin"));
        let r = o
            .read_chunks(d.path(), "out/ckpt.bin", &e.hash, &[1])
            .unwrap();
        assert_eq!(r[0].1.len(), want.chunks[1].len as usize);

        // Without `defer` the manifest hashes, as before.
        let mut fresh = Outputs::default();
        let m = fresh.manifest(d.path(), &declared, true, false);
        let e = m.iter().find(|e| e.path == "out/ckpt.bin").unwrap();
        assert!(!e.unhashed && &e.hash[..] == want.hash.as_bytes());
    }

    #[test]
    fn read_whole_leaves_out_bodies_the_reader_has() {
        let d = tempfile::tempdir().unwrap();
        let body = data(600 * 1024);
        fs::write(d.path().join("f"), &body).unwrap();
        let want = chunk_bytes(&body);
        assert!(want.chunks.len() > 2, "test data must span several chunks");
        let have: HashSet<Hash> = [want.chunks[0].id, want.chunks[2].id].into();
        let (msgs, _) = whole(d.path(), "f", &have).unwrap();
        for (m, w) in msgs.iter().zip(&want.chunks) {
            assert_eq!(m.data.is_empty(), have.contains(&w.id));
        }
    }

    #[test]
    fn read_whole_stops_when_the_reader_goes_away_and_refuses_symlinks() {
        let d = tempfile::tempdir().unwrap();
        fs::write(d.path().join("f"), data(8 * 1024 * 1024)).unwrap();
        let mut n = 0;
        let r = read_whole(d.path(), "f", &HashSet::new(), |_| {
            n += 1;
            n < 3
        })
        .unwrap();
        assert!(r.is_none());
        assert_eq!(n, 3, "no chunk is read after the reader went away");

        std::os::unix::fs::symlink("f", d.path().join("l")).unwrap();
        assert!(read_whole(d.path(), "l", &HashSet::new(), |_| true).is_err());
    }
}

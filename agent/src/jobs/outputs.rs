//! A job's declared outputs, as the daemon pulls them.
//!
//! The daemon polls [`Outputs::manifest`] while the job runs and once after it
//! ends. Files are chunked with the sync's FastCDC rules, so the daemon fetches
//! only chunks it lacks (an appended metrics file costs its new tail). A stat
//! cache keeps unchanged files from being rehashed on every poll. While the
//! job runs, a file modified in the last [`SETTLE`] is left out: it is probably
//! still being written, and the next poll takes it once it has settled (the
//! final manifest takes everything).

use std::collections::HashMap;
use std::fs::{self, File};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use bridge_proto::chunking::ChunkRef;
use bridge_proto::index::{Cached, HashOutcome, hash_file, now_ns};
use bridge_proto::scan::{FileKind, Stat};
use bridge_proto::v1;

/// How long a file must go unmodified before a running job's manifest lists it.
pub const SETTLE: Duration = Duration::from_millis(250);

/// The stat cache of one job's outputs.
#[derive(Default)]
pub struct Outputs {
    cache: HashMap<String, Cached>,
}

impl Outputs {
    /// Walks `declared` (relative to `cwd`; a trailing '/' marks a directory)
    /// and lists what is there. `complete`: the job has ended, list everything.
    pub fn manifest(
        &mut self,
        cwd: &Path,
        declared: &[String],
        complete: bool,
    ) -> Vec<v1::OutputEntry> {
        let mut found = Vec::new();
        for d in declared {
            let rel = d.trim_end_matches('/');
            walk(cwd, rel, &mut found);
        }
        found.sort_by(|a, b| a.0.cmp(&b.0));
        found.dedup_by(|a, b| a.0 == b.0);
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
                        _ => match hash_file(&p, 3, |_, _| {}) {
                            Ok(HashOutcome::Hashed(st, d)) => Cached::new(&st, d),
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
                    });
                    self.cache.insert(rel, c);
                }
                FileKind::Other => {}
            }
        }
        out
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

/// Appends `rel` (relative to `cwd`) and, for a directory, everything below it.
/// Paths that do not exist (yet) are skipped; symlinks are not followed.
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

//! Applying one sync round to a mirror.
//!
//! A round is a stream of plans, chunk bodies and a commit (see `agent.proto`).
//! Ops run strictly in order. For each `Put` the agent answers which chunks it
//! lacks; every other chunk comes from the [`Store`] (verified) or from earlier
//! in the same file. Bodies arrive in the order the agent asked for them, so the
//! round needs no per-file round trip and holds at most one chunk in memory.
//!
//! Every file is written to `tmp/` and renamed into place: never modified in
//! place, never visible half-written. A path that is invalid, a symlink on the
//! way to a path, or a chunk whose bytes do not match its id ends the round with
//! [`RoundError::Refused`] (gRPC `InvalidArgument`) and writes nothing for that
//! op. Problems worth retrying (I/O errors, a cached chunk that changed) become
//! per-path failures in `Done` and the round goes on.

use std::collections::{HashMap, HashSet, VecDeque};
use std::fs::{self, File, Permissions};
use std::io::{self, Write};
use std::os::unix::fs::{FileExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use bridge_proto::chunking::{ChunkRef, Hash, chunk_id, content_hash, hash_from_bytes};
use bridge_proto::index::Cached;
use bridge_proto::oldfiles;
use bridge_proto::path::{RelPath, resolve_link_target};
use bridge_proto::scan::{FileKind, Stat};
use bridge_proto::tree::{Node, Tree};
use bridge_proto::{human_bytes, splice, v1};

use crate::mirror::Mirror;
use crate::store::{FileCache, Store};

/// Locally available chunks copied per batch in [`Round::fill_active`]
/// (~4 MiB at the average chunk size).
const COPY_BATCH: usize = 64;

/// Chunks back to back in an unchanged mirror file that are copied by the
/// kernel, unread, when at least this many follow each other (~512 KiB).
const MIN_TRUSTED_RUN: usize = 8;

/// Why a round ended early.
#[derive(Debug, thiserror::Error)]
pub enum RoundError {
    /// The peer asked for something the agent never does.
    #[error("{0}")]
    Refused(String),
    /// The messages arrived in an order the protocol does not allow.
    #[error("protocol violation: {0}")]
    Protocol(String),
}

/// Why one op did not apply.
enum OpError {
    Refused(String),
    Failed(String),
    /// The file system is full (or the user's quota spent): the op fails
    /// until space is freed, and the daemon says so instead of retrying.
    NoSpace(String),
}

impl From<io::Error> for OpError {
    fn from(e: io::Error) -> Self {
        match e.raw_os_error() {
            Some(nix::libc::ENOSPC | nix::libc::EDQUOT) => OpError::NoSpace(e.to_string()),
            _ => OpError::Failed(e.to_string()),
        }
    }
}

enum Op {
    Put {
        path: RelPath,
        exec: bool,
        chunks: Vec<ChunkRef>,
    },
    Mkdir(RelPath),
    Symlink(RelPath, String),
    Remove(RelPath),
    /// A spliced `Put` whose base this mirror does not hold at that path.
    NoBase(RelPath),
}

/// The `Put` being written.
struct Active {
    path: RelPath,
    exec: bool,
    chunks: Vec<ChunkRef>,
    /// Indexes of `chunks` still to come from the peer, in order.
    need: VecDeque<u32>,
    cursor: usize,
    tmp: PathBuf,
    /// `None` once the op failed (remaining bodies are still consumed).
    file: Option<File>,
    failed: Option<OpError>,
    /// Chunks already in `tmp`, for repeats within the file.
    written: HashMap<Hash, u64>,
    offset: u64,
}

/// Where this round finds the chunks the store holds as whole mirror files
/// ([`Store::is_whole`]): the files of one chunk it wrote itself, then, in one
/// walk of the tree, the mirror's files with the ids its plans named.
#[derive(Default)]
struct Wholes {
    /// Chunks an op of this round gets from a file an earlier op writes.
    again: HashSet<Hash>,
    /// Files of one chunk this round wrote whose chunk is in `again`.
    written: HashMap<Hash, Arc<Path>>,
    /// Ids the plans named that only a whole mirror file holds.
    wanted: HashSet<Hash>,
    /// What the walk found; `None` until it ran (again after more ids
    /// were wanted).
    found: Option<HashMap<Hash, Arc<Path>>>,
}

impl Wholes {
    fn locate(&mut self, id: &Hash, mirror: &Mirror) -> Option<Arc<Path>> {
        if let Some(f) = self.written.get(id) {
            return Some(f.clone());
        }
        if !self.wanted.contains(id) {
            return None;
        }
        let found = self.found.get_or_insert_with(|| {
            let t0 = std::time::Instant::now();
            let found: HashMap<Hash, Arc<Path>> = mirror
                .tree
                .hashed_files()
                .filter(|(_, h)| h.is_one_chunk() && self.wanted.contains(&h.hash))
                .map(|(p, h)| (h.hash, p.to_fs(&mirror.root).into()))
                .collect();
            tracing::debug!(
                wanted = self.wanted.len(),
                found = found.len(),
                ms = t0.elapsed().as_secs_f64() * 1e3,
                "whole mirror files looked up"
            );
            found
        });
        found.get(id).cloned()
    }

    /// One more id to look for; a walk already made is made again.
    fn want(&mut self, id: Hash) {
        if self.wanted.insert(id) {
            self.found = None;
        }
    }
}

pub struct Round<'a> {
    tmp_dir: &'a Path,
    mirror: &'a mut Mirror,
    store: &'a mut Store,
    files: FileCache,
    queue: VecDeque<(Op, VecDeque<u32>)>,
    /// Requested from the peer and not received yet.
    pending: HashSet<Hash>,
    active: Option<Active>,
    failures: Vec<v1::Failure>,
    tmp_seq: u64,
    /// Directories this round already checked are real directories (saves
    /// an `lstat` per ancestor per file); cleared by anything that removes.
    dirs_ok: HashSet<RelPath>,
    /// `copy_file_range` failed once this round: chunks are read instead.
    no_kernel_copy: bool,
    /// One decompression context for the round's chunks.
    zstd: Option<zstd::bulk::Decompressor<'static>>,
    wholes: Wholes,
}

impl<'a> Round<'a> {
    pub fn new(tmp_dir: &'a Path, mirror: &'a mut Mirror, store: &'a mut Store) -> Self {
        Round {
            tmp_dir,
            mirror,
            store,
            files: FileCache::default(),
            queue: VecDeque::new(),
            pending: HashSet::new(),
            active: None,
            failures: Vec::new(),
            tmp_seq: 0,
            dirs_ok: HashSet::new(),
            no_kernel_copy: false,
            wholes: Wholes::default(),
            zstd: None,
        }
    }

    /// Validates and queues a plan; returns which chunk bodies to send.
    pub fn on_plan(&mut self, plan: v1::Plan) -> Result<v1::Need, RoundError> {
        let ops = plan
            .ops
            .into_iter()
            .map(|op| validate(op, &self.mirror.tree))
            .collect::<Result<Vec<_>, _>>()?;
        let mut need = v1::Need::default();
        for op in ops {
            let mut wanted = VecDeque::new();
            if let Op::Put { chunks, .. } = &op {
                let mut seen = HashSet::new();
                for (i, c) in chunks.iter().enumerate() {
                    if !seen.insert(c.id) {
                        continue;
                    }
                    if self.pending.contains(&c.id) {
                        self.wholes.again.insert(c.id);
                        continue;
                    }
                    if !self.store.has(&c.id) {
                        self.pending.insert(c.id);
                        wanted.push_back(i as u32);
                    } else if self.store.is_whole(&c.id) {
                        self.wholes.want(c.id);
                    }
                }
            }
            need.ops.push(v1::OpNeed {
                chunks: wanted.iter().copied().collect(),
            });
            self.queue.push_back((op, wanted));
        }
        self.advance()?;
        Ok(need)
    }

    /// Takes the next chunk body for the active `Put`.
    pub fn on_chunk(&mut self, c: v1::ChunkData) -> Result<(), RoundError> {
        let Some(a) = self.active.as_mut() else {
            return Err(RoundError::Protocol(
                "chunk data with no file waiting for it".into(),
            ));
        };
        let expect = a.chunks[a.cursor];
        if a.need.front() != Some(&(a.cursor as u32)) || c.id.as_ref() != expect.id.as_bytes() {
            return Err(RoundError::Protocol(format!(
                "chunk data out of order for {}",
                a.path
            )));
        }
        let data = match v1::Compression::try_from(c.compression) {
            Ok(v1::Compression::None) => c.data,
            Ok(v1::Compression::Zstd) => {
                let z = match self.zstd.as_mut() {
                    Some(z) => z,
                    None => self.zstd.insert(
                        zstd::bulk::Decompressor::new()
                            .map_err(|e| RoundError::Refused(format!("cannot start zstd: {e}")))?,
                    ),
                };
                z.decompress(&c.data, expect.len as usize)
                    .map_err(|e| {
                        RoundError::Refused(format!(
                            "chunk for {} does not decompress: {e}",
                            a.path
                        ))
                    })?
                    .into()
            }
            Err(_) => return Err(RoundError::Protocol("unknown compression".into())),
        };
        if data.len() != expect.len as usize || chunk_id(&data) != expect.id {
            let path = a.path.clone();
            self.discard_active();
            return Err(RoundError::Refused(format!(
                "chunk {} for {path} does not match its id: nothing written",
                expect.id.to_hex()
            )));
        }
        a.need.pop_front();
        self.pending.remove(&expect.id);
        if let Some(f) = a.file.as_mut() {
            if let Err(e) = f.write_all(&data) {
                a.failed = Some(e.into());
                a.file = None;
            } else {
                a.written.entry(expect.id).or_insert(a.offset);
                a.offset += data.len() as u64;
            }
        }
        a.cursor += 1;
        self.advance()
    }

    /// Drops the active `Put`: the daemon cannot supply its content.
    pub fn on_skip(&mut self) -> Result<(), RoundError> {
        if self.active.is_none() {
            return Err(RoundError::Protocol("skip with no file in progress".into()));
        }
        self.discard_active();
        self.advance()
    }

    /// Ends the round.
    pub fn on_commit(mut self, generation: u64) -> Result<v1::Done, RoundError> {
        if self.active.is_some() || !self.queue.is_empty() {
            return Err(RoundError::Protocol(
                "commit before all chunk data arrived".into(),
            ));
        }
        self.mirror.maybe_save(false);
        self.mirror.compact_wholes(self.store);
        // Its buffers are freed now ([`crate::memory`]).
        crate::memory::touched();
        Ok(v1::Done {
            generation,
            root: self.mirror.tree.root().as_bytes().to_vec().into(),
            failures: std::mem::take(&mut self.failures),
            files: self.mirror.tree.files(),
            bytes: self.mirror.tree.bytes(),
        })
    }

    fn discard_active(&mut self) {
        if let Some(a) = self.active.take() {
            for i in a.need {
                self.pending.remove(&a.chunks[i as usize].id);
            }
            // A link that drops mid-file must not cost the whole file again:
            // the chunks already written are kept as a retired (partial)
            // version, so the next round's Need skips them.
            if a.failed.is_none() && a.file.is_some() && a.cursor > 0 {
                let done = &a.chunks[..a.cursor];
                let mut h = blake3::Hasher::new();
                h.update(b"bridge-partial");
                for c in done {
                    h.update(c.id.as_bytes());
                }
                if let Err(e) = self.store.retire(&a.tmp, h.finalize(), done) {
                    tracing::debug!(error = %e, "cannot keep a partial file's chunks");
                }
            }
            let _ = fs::remove_file(&a.tmp);
        }
    }

    /// Runs queued ops until one waits for chunk data.
    fn advance(&mut self) -> Result<(), RoundError> {
        loop {
            if self.active.is_some() {
                if !self.fill_active() {
                    return Ok(());
                }
                let a = self.active.take().expect("active");
                self.finish_put(a)?;
                continue;
            }
            let Some((op, need)) = self.queue.pop_front() else {
                return Ok(());
            };
            let path = op_path(&op).clone();
            let res = match op {
                Op::Put { path, exec, chunks } => {
                    self.tmp_seq += 1;
                    let tmp = self
                        .tmp_dir
                        .join(format!("{}-{}", std::process::id(), self.tmp_seq));
                    // Read back too: a chunk repeated within the file is
                    // copied from its first occurrence.
                    let created = fs::OpenOptions::new()
                        .read(true)
                        .write(true)
                        .create_new(true)
                        .open(&tmp);
                    let (file, failed) = match created {
                        Ok(f) => (Some(f), None),
                        Err(e) => {
                            let m = format!("cannot create temporary file: {e}");
                            let failed = match OpError::from(e) {
                                OpError::NoSpace(_) => OpError::NoSpace(m),
                                _ => OpError::Failed(m),
                            };
                            (None, Some(failed))
                        }
                    };
                    self.active = Some(Active {
                        path,
                        exec,
                        chunks,
                        need,
                        cursor: 0,
                        tmp,
                        file,
                        failed,
                        written: HashMap::new(),
                        offset: 0,
                    });
                    Ok(())
                }
                Op::Mkdir(p) => self.mkdir(&p),
                Op::Symlink(p, t) => self.symlink(&p, &t),
                Op::Remove(p) => self.remove(&p),
                Op::NoBase(p) => Err(OpError::Failed(format!(
                    "the version of {p} this change was made against is not in the mirror"
                ))),
            };
            self.op_result(&path, 0, res)?;
        }
    }

    /// Records how the op on `path` (a file of `bytes`, else 0) went.
    fn op_result(
        &mut self,
        path: &RelPath,
        bytes: u64,
        res: Result<(), OpError>,
    ) -> Result<(), RoundError> {
        match res {
            Ok(()) => Ok(()),
            Err(OpError::Refused(m)) => Err(RoundError::Refused(m)),
            Err(OpError::Failed(m)) => {
                tracing::warn!(%path, error = %m, "op failed");
                self.failures.push(v1::Failure {
                    path: path.to_string(),
                    message: m,
                    no_space_bytes: 0,
                });
                Ok(())
            }
            Err(OpError::NoSpace(m)) => {
                // A directory or a link needs a block at least.
                let needs = bytes.max(4096);
                let message = format!(
                    "{m}: {path} needs {}, {} free in {}",
                    human_bytes(needs),
                    free_bytes(&self.mirror.root).map_or("?".into(), human_bytes),
                    self.mirror.root.display()
                );
                tracing::warn!(%path, error = %message, "op failed: no space");
                self.failures.push(v1::Failure {
                    path: path.to_string(),
                    message,
                    no_space_bytes: needs,
                });
                Ok(())
            }
        }
    }

    /// Copies locally available chunks into the active file. False while it
    /// waits for a body from the peer.
    ///
    /// A run of chunks back to back in a mirror file the stat cache vouches
    /// for ([`Mirror::file_unchanged`], checked again after the copy) is
    /// copied by the kernel (`copy_file_range`), unread: a 1 MiB edit of a
    /// 1 GiB file copies two such runs. Other chunks go in batches of up to
    /// [`COPY_BATCH`]: read in order, their ids checked on two threads
    /// (BLAKE3 took 30% of a big file's rebuild), then written in order. A
    /// chunk that no longer matches its id fails the op, and the store
    /// forgets its location.
    fn fill_active(&mut self) -> bool {
        let a = self.active.as_mut().expect("active");
        while a.cursor < a.chunks.len() {
            let next_needed = a.need.front().map(|&n| n as usize);
            if next_needed == Some(a.cursor) {
                return false;
            }
            let limit = next_needed.unwrap_or(a.chunks.len());
            if !self.no_kernel_copy
                && let Some(f) = a.file.as_mut()
                && let Some(run) = trusted_run(&a.chunks[a.cursor..limit], self.store, self.mirror)
            {
                match copy_run(&run, f, &mut self.files) {
                    Ok(()) if self.mirror.file_unchanged(&run.file) => {
                        for c in &a.chunks[a.cursor..a.cursor + run.count] {
                            a.written.entry(c.id).or_insert(a.offset);
                            a.offset += c.len as u64;
                        }
                        a.cursor += run.count;
                        continue;
                    }
                    // Changed while it was copied: the op fails, and is
                    // sent again.
                    Ok(()) => {
                        a.failed = Some(OpError::Failed(format!(
                            "{} changed while it was read",
                            run.file.display()
                        )));
                        a.file = None;
                        return true;
                    }
                    // No kernel copy here (another file system, an old
                    // kernel): the chunks are read and checked below.
                    Err(e) => {
                        tracing::debug!(error = %e, "copy_file_range unavailable");
                        self.no_kernel_copy = true;
                        if let Err(e) = f.set_len(a.offset).and_then(|()| {
                            std::io::Seek::seek(f, std::io::SeekFrom::Start(a.offset)).map(|_| ())
                        }) {
                            a.failed = Some(e.into());
                            a.file = None;
                            return true;
                        }
                    }
                }
            }
            let end = limit.min(a.cursor + COPY_BATCH);
            let batch = a.chunks[a.cursor..end].to_vec();
            a.cursor = end;
            let Some(f) = a.file.as_mut() else { continue };
            // Chunks already written to this file are read back as written;
            // the store's are checked.
            let mut bodies: Vec<(Option<Vec<u8>>, bool)> = batch
                .iter()
                .map(|c| match a.written.get(&c.id) {
                    Some(&off) => {
                        let mut b = vec![0u8; c.len as usize];
                        (f.read_exact_at(&mut b, off).ok().map(|_| b), false)
                    }
                    None => {
                        let body =
                            self.store
                                .read_unverified(&c.id, &mut self.files)
                                .or_else(|| {
                                    let f = self.wholes.locate(&c.id, self.mirror)?;
                                    let mut b = vec![0u8; c.len as usize];
                                    self.files.get(&f).ok()?.read_exact_at(&mut b, 0).ok()?;
                                    Some(b)
                                });
                        (body, true)
                    }
                })
                .collect();
            let check = |part: &mut [(Option<Vec<u8>>, bool)], refs: &[ChunkRef]| {
                for ((body, verify), c) in part.iter_mut().zip(refs) {
                    if *verify && body.as_deref().is_some_and(|b| chunk_id(b) != c.id) {
                        *body = None;
                    }
                }
            };
            let mid = bodies.len() / 2;
            let (left, right) = bodies.split_at_mut(mid);
            let (left_refs, right_refs) = batch.split_at(mid);
            if mid >= 4 {
                std::thread::scope(|s| {
                    s.spawn(|| check(left, left_refs));
                    check(right, right_refs);
                });
            } else {
                check(left, left_refs);
                check(right, right_refs);
            }
            for ((body, verify), c) in bodies.into_iter().zip(&batch) {
                let res = match body {
                    Some(b) => f.write_all(&b).map_err(OpError::from),
                    None => {
                        if verify {
                            self.store.forget(&c.id);
                        }
                        Err(OpError::Failed(format!(
                            "chunk {} is no longer available on the agent",
                            c.id.to_hex()
                        )))
                    }
                };
                if let Err(m) = res {
                    a.failed = Some(m);
                    a.file = None;
                    break;
                }
                a.written.entry(c.id).or_insert(a.offset);
                a.offset += c.len as u64;
            }
        }
        true
    }

    fn finish_put(&mut self, a: Active) -> Result<(), RoundError> {
        let path = a.path.clone();
        let bytes = a.chunks.iter().map(|c| u64::from(c.len)).sum();
        let res = self.install_file(a);
        self.op_result(&path, bytes, res)
    }

    fn install_file(&mut self, a: Active) -> Result<(), OpError> {
        let tmp = a.tmp.clone();
        let res = (|| {
            if let Some(e) = a.failed {
                return Err(e);
            }
            let f = a.file.expect("file present when not failed");
            f.set_permissions(Permissions::from_mode(if a.exec { 0o755 } else { 0o644 }))?;
            let dst = self.prepare_parents(&a.path)?;
            // A path the mirror holds nothing at (a cold sync: every path)
            // takes the name unless something is there after all (a file
            // a job wrote, a directory): no lookup first. Else whatever is
            // there is retired or cleared, then replaced.
            let placed = !self.mirror.tree.contains(&a.path) && oldfiles::place_new(&tmp, &dst)?;
            if !placed {
                let old = self.clear_for(&a.path, &dst, FileKind::File)?;
                self.files.clear();
                self.put_in_place(&tmp, &dst, old)?;
            }
            crate::kernel::invalidate_bytecode(&self.mirror.root, &a.path);
            // The inode now at `dst` (its ctime moved with the rename), by
            // its descriptor: no lookup of the path.
            let st = Stat::from_metadata(&f.metadata()?);
            drop(f);
            if let [one] = a.chunks[..]
                && self.wholes.again.contains(&one.id)
            {
                self.wholes.written.insert(one.id, dst.clone().into());
            }
            self.store.index_mirror_file(&dst, &a.chunks);
            let mut cached = Cached::new(
                &st,
                bridge_proto::chunking::Digest {
                    hash: content_hash(&a.chunks),
                    size: st.size,
                    chunks: a.chunks,
                },
            );
            // The agent wrote these bytes itself; a later in-place change by
            // someone else still changes ctime.
            cached.racy = false;
            self.mirror.record_file(a.path, cached);
            Ok(())
        })();
        if res.is_err() {
            let _ = fs::remove_file(&tmp);
        }
        res
    }

    /// Makes sure every ancestor of `p` is a real directory inside the mirror
    /// (creating missing ones) and returns `p`'s location.
    fn prepare_parents(&mut self, p: &RelPath) -> Result<PathBuf, OpError> {
        for a in p.ancestors() {
            if self.dirs_ok.contains(&a) {
                continue;
            }
            let fsp = a.to_fs(&self.mirror.root);
            match Stat::lstat(&fsp) {
                Ok(s) if s.kind == FileKind::Dir => {
                    if !self.mirror.tree.is_dir(&a) {
                        // A retained directory in use again.
                        self.mirror.unretain_dir(&a);
                        self.mirror.tree.insert(a.clone(), Node::Dir);
                    }
                    self.dirs_ok.insert(a.clone());
                }
                Ok(s) if s.kind == FileKind::Symlink => {
                    return Err(OpError::Refused(format!(
                        "refusing to write {p}: {a} is a symlink (writes through symlinks are not allowed)"
                    )));
                }
                Ok(_) => return Err(OpError::Failed(format!("{a} is not a directory"))),
                Err(e) if e.kind() == io::ErrorKind::NotFound => {
                    fs::create_dir(&fsp)?;
                    self.mirror.tree.insert(a.clone(), Node::Dir);
                    self.dirs_ok.insert(a.clone());
                }
                Err(e) => return Err(e.into()),
            }
        }
        Ok(p.to_fs(&self.mirror.root))
    }

    /// Gets whatever is at `dst` out of the way of a new `kind` entry: retires a
    /// file, removes a directory tree unless a directory is wanted. Returns
    /// the size of a file left at `dst` for the new entry to replace.
    fn clear_for(
        &mut self,
        p: &RelPath,
        dst: &Path,
        kind: FileKind,
    ) -> Result<Option<u64>, OpError> {
        match Stat::lstat(dst) {
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e.into()),
            Ok(s) => match s.kind {
                FileKind::Dir if kind == FileKind::Dir => Ok(None),
                FileKind::Dir => self.remove_tree(p, dst).map(|()| None),
                FileKind::File => {
                    self.retire(p, dst);
                    if kind == FileKind::Dir {
                        fs::remove_file(dst)?;
                        self.mirror.forget(p);
                        return Ok(None);
                    }
                    Ok(Some(s.size))
                }
                _ => {
                    self.dirs_ok.remove(p);
                    if kind == FileKind::Dir {
                        fs::remove_file(dst)?;
                        self.mirror.forget(p);
                    }
                    Ok(None)
                }
            },
        }
    }

    /// Moves the new entry at `tmp` to `dst`, where a file of `old` bytes may
    /// be. That file is swapped out rather than renamed over
    /// ([`oldfiles::replace`]: no forced writeback of the new one), then
    /// removed, in the background when big (it is usually retired: a second
    /// link, cheap to drop).
    fn put_in_place(&mut self, tmp: &Path, dst: &Path, old: Option<u64>) -> io::Result<()> {
        if oldfiles::replace(tmp, dst, old.is_some())?
            && let Err(e) = oldfiles::remove(tmp, old.unwrap_or(0), self.tmp_dir)
        {
            tracing::debug!(path = %dst.display(), error = %e, "cannot remove the old version");
        }
        Ok(())
    }

    fn retire(&mut self, p: &RelPath, dst: &Path) {
        // Retiring may evict an older version this round read chunks from:
        // closing the last descriptor of an unlinked 1 GiB file frees it in
        // the closing thread (0.18 s, traced), so close them first and let
        // the eviction's background unlink do it.
        self.files.clear();
        if let Some(c) = self.mirror.tree.hashed(p)
            && let Err(e) = self.store.retire(dst, c.hash, &c.chunks())
        {
            tracing::debug!(%p, error = %e, "cannot retire old version");
        }
    }

    fn remove_tree(&mut self, p: &RelPath, dst: &Path) -> Result<(), OpError> {
        let files: Vec<RelPath> = self
            .mirror
            .tree
            .descendants(Some(p))
            .filter(|(_, n)| matches!(n, Node::File { .. }))
            .map(|(k, _)| k)
            .collect();
        for f in files {
            let fp = f.to_fs(&self.mirror.root);
            self.retire(&f, &fp);
        }
        self.files.clear();
        self.dirs_ok.clear();
        fs::remove_dir_all(dst)?;
        self.mirror.forget(p);
        Ok(())
    }

    fn mkdir(&mut self, p: &RelPath) -> Result<(), OpError> {
        let dst = self.prepare_parents(p)?;
        self.clear_for(p, &dst, FileKind::Dir)?;
        match fs::create_dir(&dst) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
            Err(e) => return Err(e.into()),
        }
        self.mirror.unretain_dir(p);
        self.mirror.tree.insert(p.clone(), Node::Dir);
        Ok(())
    }

    fn symlink(&mut self, p: &RelPath, target: &str) -> Result<(), OpError> {
        let dst = self.prepare_parents(p)?;
        let old = self.clear_for(p, &dst, FileKind::Symlink)?;
        self.tmp_seq += 1;
        let tmp = self
            .tmp_dir
            .join(format!("{}-{}", std::process::id(), self.tmp_seq));
        std::os::unix::fs::symlink(target, &tmp)?;
        if let Err(e) = self.put_in_place(&tmp, &dst, old) {
            let _ = fs::remove_file(&tmp);
            return Err(e.into());
        }
        self.mirror.tree.insert(
            p.clone(),
            Node::Symlink {
                target: target.to_string(),
            },
        );
        Ok(())
    }

    fn remove(&mut self, p: &RelPath) -> Result<(), OpError> {
        self.dirs_ok.clear();
        for a in p.ancestors() {
            match Stat::lstat(&a.to_fs(&self.mirror.root)) {
                Ok(s) if s.kind == FileKind::Dir => {}
                Ok(s) if s.kind == FileKind::Symlink => {
                    return Err(OpError::Refused(format!(
                        "refusing to remove {p}: {a} is a symlink"
                    )));
                }
                // The parent is gone or a file: nothing of `p` can exist.
                _ => {
                    self.mirror.forget(p);
                    return Ok(());
                }
            }
        }
        let dst = p.to_fs(&self.mirror.root);
        match Stat::lstat(&dst) {
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(e.into()),
            Ok(s) if s.kind == FileKind::Dir => self.remove_synced(p)?,
            Ok(s) => {
                if s.kind == FileKind::File {
                    self.retire(p, &dst);
                }
                self.files.clear();
                oldfiles::remove(&dst, s.size, self.tmp_dir)?;
            }
        }
        self.mirror.forget(p);
        Ok(())
    }

    /// Removes the synced entries at and below directory `p`, deepest first,
    /// and leaves paths the ignore rules protect (a checkpoint written on the
    /// agent) where they are. A directory kept only for them is *retained*: out
    /// of the mirror's synced view until the daemon creates it again.
    fn remove_synced(&mut self, p: &RelPath) -> Result<(), OpError> {
        let mut entries: Vec<(RelPath, Node)> = self
            .mirror
            .tree
            .descendants(Some(p))
            .map(|(k, n)| (k, n.clone()))
            .collect();
        entries.insert(0, (p.clone(), Node::Dir));
        self.files.clear();
        self.dirs_ok.clear();
        // Reverse path order puts every entry before its parent.
        for (k, n) in entries.into_iter().rev() {
            let fp = k.to_fs(&self.mirror.root);
            let res = match n {
                Node::File { .. } => {
                    self.retire(&k, &fp);
                    fs::remove_file(&fp)
                }
                Node::Symlink { .. } => fs::remove_file(&fp),
                Node::Dir => match fs::remove_dir(&fp) {
                    Err(e) if e.raw_os_error() == Some(nix::libc::ENOTEMPTY) => {
                        self.mirror.retain_dir(k.clone());
                        Ok(())
                    }
                    other => other,
                },
            };
            match res {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => return Err(e.into()),
            }
        }
        self.mirror.forget(p);
        Ok(())
    }
}

impl Drop for Round<'_> {
    fn drop(&mut self) {
        self.discard_active();
    }
}

/// Chunks that lie back to back in one mirror file.
struct Run {
    file: Arc<Path>,
    offset: u64,
    bytes: u64,
    count: usize,
}

/// The chunks at the front of `chunks` that the store places back to back
/// in one mirror file unchanged since the agent recorded it, if there are
/// at least [`MIN_TRUSTED_RUN`] of them.
fn trusted_run(chunks: &[ChunkRef], store: &Store, mirror: &Mirror) -> Option<Run> {
    let first = chunks.first()?;
    let loc = store.loc(&first.id).filter(|l| l.len == first.len)?;
    // One `lstat` before looking further: an untrusted file's chunks go in
    // batches, and each batch would otherwise scan the rest of the run.
    if !mirror.file_unchanged(&loc.file) {
        return None;
    }
    let mut run = Run {
        file: loc.file.clone(),
        offset: loc.offset,
        bytes: u64::from(first.len),
        count: 1,
    };
    for c in &chunks[1..] {
        match store.loc(&c.id) {
            Some(l)
                if l.file == run.file && l.offset == run.offset + run.bytes && l.len == c.len =>
            {
                run.bytes += u64::from(c.len);
                run.count += 1;
            }
            _ => break,
        }
    }
    (run.count >= MIN_TRUSTED_RUN).then_some(run)
}

/// Appends `run` to `out` with `copy_file_range` (at `out`'s position).
fn copy_run(run: &Run, out: &mut File, files: &mut FileCache) -> io::Result<()> {
    let src = files.get(&run.file)?;
    let mut off = i64::try_from(run.offset).map_err(io::Error::other)?;
    let mut left = run.bytes;
    while left > 0 {
        let want = usize::try_from(left.min(1 << 30)).unwrap_or(1 << 30);
        let n = nix::fcntl::copy_file_range(src, Some(&mut off), &*out, None, want)
            .map_err(io::Error::from)?;
        if n == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                format!("{} is shorter than recorded", run.file.display()),
            ));
        }
        left -= n as u64;
    }
    Ok(())
}

fn op_path(op: &Op) -> &RelPath {
    match op {
        Op::Put { path, .. }
        | Op::Mkdir(path)
        | Op::Symlink(path, _)
        | Op::Remove(path)
        | Op::NoBase(path) => path,
    }
}

fn rel(p: String) -> Result<RelPath, RoundError> {
    RelPath::new(p).map_err(|e| RoundError::Refused(format!("refused path: {e}")))
}

/// Checks everything about an op that does not depend on the disk, and
/// expands a spliced `Put` against the chunk list `tree` holds for its path.
fn validate(op: v1::Op, tree: &Tree) -> Result<Op, RoundError> {
    use v1::op::Op as W;
    match op.op {
        Some(W::Put(p)) if !p.base.is_empty() => {
            let path = rel(p.path)?;
            let base = hash_from_bytes(&p.base)
                .filter(|_| p.chunks.is_empty())
                .ok_or_else(|| RoundError::Refused(format!("bad splice base for {path}")))?;
            // The content hash covers the chunk list, so an entry with that
            // hash holds exactly the base's list, whatever its stat says.
            let Some(held) = tree.hashed(&path).filter(|c| c.hash == base) else {
                return Ok(Op::NoBase(path));
            };
            let chunks = splice::apply(&held.chunks(), &p.splice)
                .map_err(|e| RoundError::Refused(format!("{e} ({path})")))?;
            Ok(Op::Put {
                path,
                exec: p.executable,
                chunks,
            })
        }
        Some(W::Put(p)) => {
            let path = rel(p.path)?;
            let chunks = p
                .chunks
                .iter()
                .map(|c| {
                    hash_from_bytes(&c.id)
                        .filter(|_| c.len > 0 && c.len <= bridge_proto::chunking::MAX_CHUNK)
                        .map(|id| ChunkRef { id, len: c.len })
                        .ok_or_else(|| {
                            RoundError::Refused(format!("bad chunk reference for {path}"))
                        })
                })
                .collect::<Result<Vec<_>, _>>()?;
            Ok(Op::Put {
                path,
                exec: p.executable,
                chunks,
            })
        }
        Some(W::Mkdir(m)) => Ok(Op::Mkdir(rel(m.path)?)),
        Some(W::Symlink(s)) => {
            let path = rel(s.path)?;
            if resolve_link_target(&path, &s.target).is_none() {
                return Err(RoundError::Refused(format!(
                    "refused symlink {path} -> {}: the target is absolute or leaves the mirror",
                    s.target
                )));
            }
            Ok(Op::Symlink(path, s.target))
        }
        Some(W::Remove(r)) => Ok(Op::Remove(rel(r.path)?)),
        None => Err(RoundError::Protocol("empty op".into())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bridge_proto::chunking::pseudo_random;

    fn put(path: &str, chunks: &[ChunkRef]) -> v1::Plan {
        v1::Plan {
            ops: vec![v1::Op {
                op: Some(v1::op::Op::Put(v1::Put {
                    path: path.into(),
                    chunks: chunks.iter().map(v1::ChunkRef::from).collect(),
                    ..Default::default()
                })),
            }],
            eager: false,
        }
    }

    /// A path the mirror's tree does not hold is claimed without a look
    /// first; where something is there after all (a file a job wrote, a
    /// directory) the put still replaces it whole, and the cache records
    /// the inode that ends up at the path.
    #[test]
    fn a_put_over_an_untracked_file_or_directory_replaces_it() {
        let d = tempfile::tempdir().unwrap();
        let mut store = Store::open(&d.path().join("store"), 1 << 20).unwrap();
        let m = d.path().join("mirrors/m");
        fs::create_dir_all(&m).unwrap();
        let mut mirror = Mirror::open(d.path(), "m", &mut store).unwrap();
        let tmp = d.path().join("tmp");
        fs::create_dir_all(&tmp).unwrap();
        // Appear after the mirror's scan: not in its tree.
        fs::write(m.join("taken.txt"), b"written by a job").unwrap();
        fs::create_dir_all(m.join("was_dir/inner")).unwrap();
        fs::write(m.join("was_dir/inner/f"), b"x").unwrap();
        for (i, name) in ["fresh.txt", "taken.txt", "was_dir"]
            .into_iter()
            .enumerate()
        {
            let body = format!("body of {name}").into_bytes();
            let c = ChunkRef {
                id: chunk_id(&body),
                len: body.len() as u32,
            };
            let mut round = Round::new(&tmp, &mut mirror, &mut store);
            let need = round.on_plan(put(name, &[c])).unwrap();
            assert_eq!(need.ops[0].chunks, [0]);
            round
                .on_chunk(v1::ChunkData {
                    id: c.id.as_bytes().to_vec().into(),
                    compression: 0,
                    data: body.clone().into(),
                })
                .unwrap();
            let done = round.on_commit(i as u64 + 1).unwrap();
            assert!(done.failures.is_empty(), "{name}: {:?}", done.failures);
            let p = m.join(name);
            assert_eq!(fs::read(&p).unwrap(), body, "{name}");
            let rel = RelPath::new(name).unwrap();
            assert!(mirror.file_unchanged(&p), "{name}: the cache has its stat");
            assert_eq!(mirror.tree.hashed(&rel).unwrap().hash, content_hash(&[c]));
        }
        assert_eq!(fs::read_dir(&tmp).unwrap().count(), 0, "no temporary left");
    }

    /// A file built from chunks the agent holds is checked chunk by chunk:
    /// a location whose bytes changed behind the store's back fails the op
    /// (the daemon retries it with the bodies) and writes nothing.
    #[test]
    fn local_chunks_are_verified_before_they_are_copied() {
        let d = tempfile::tempdir().unwrap();
        let mut store = Store::open(&d.path().join("store"), 1 << 20).unwrap();
        let m = d.path().join("mirrors/m");
        fs::create_dir_all(&m).unwrap();
        let data = pseudo_random(2 << 20, 9);
        fs::write(m.join("old.bin"), &data).unwrap();
        let mut mirror = Mirror::open(d.path(), "m", &mut store).unwrap();
        let chunks = mirror
            .tree
            .hashed(&RelPath::new("old.bin").unwrap())
            .unwrap()
            .chunks()
            .to_vec();
        assert!(chunks.len() >= 16, "several batches' worth of chunks");
        let tmp = d.path().join("tmp");
        fs::create_dir_all(&tmp).unwrap();

        let mut round = Round::new(&tmp, &mut mirror, &mut store);
        let need = round.on_plan(put("copy.bin", &chunks)).unwrap();
        assert!(
            need.ops.iter().all(|o| o.chunks.is_empty()),
            "every chunk is local"
        );
        let done = round.on_commit(1).unwrap();
        assert!(done.failures.is_empty(), "{:?}", done.failures);
        assert_eq!(fs::read(m.join("copy.bin")).unwrap(), data);

        // The store now reads these chunks from the newest file holding
        // them. The same length, other bytes, in its middle:
        let mut bad = data.clone();
        bad[1 << 20..(1 << 20) + 10].copy_from_slice(b"0123456789");
        fs::write(m.join("copy.bin"), &bad).unwrap();
        let mut round = Round::new(&tmp, &mut mirror, &mut store);
        round.on_plan(put("again.bin", &chunks)).unwrap();
        let done = round.on_commit(2).unwrap();
        assert_eq!(done.failures.len(), 1);
        assert!(
            done.failures[0].message.contains("no longer available"),
            "{:?}",
            done.failures
        );
        assert!(!m.join("again.bin").exists(), "nothing half-written");
        assert_eq!(fs::read_dir(&tmp).unwrap().count(), 0, "no temporary left");
        let changed = chunks.iter().filter(|c| !store.has(&c.id)).count();
        assert_eq!(changed, 1, "the store forgot the changed chunk only");
    }

    /// A small file is one chunk, which the store holds as the whole mirror
    /// file, with no location: a copy of it (a rename, a duplicate) needs no
    /// body, also of a file written earlier in the same round. A whole file
    /// changed behind the agent's back fails the op once, writes nothing,
    /// and its chunk is asked for the next time.
    #[test]
    fn a_copy_of_a_whole_file_is_made_from_the_mirror_without_a_body() {
        let d = tempfile::tempdir().unwrap();
        // No retired versions: only the mirror files hold chunks.
        let mut store = Store::open(&d.path().join("store"), 0).unwrap();
        let m = d.path().join("mirrors/m");
        fs::create_dir_all(&m).unwrap();
        fs::write(m.join("a.py"), b"print('a')\n").unwrap();
        let mut mirror = Mirror::open(d.path(), "m", &mut store).unwrap();
        let a = mirror.tree.hashed(&RelPath::new("a.py").unwrap()).unwrap();
        let a = a.chunks().to_vec();
        assert_eq!(a.len(), 1);
        assert!(store.has(&a[0].id) && store.loc(&a[0].id).is_none());
        let tmp = d.path().join("tmp");
        fs::create_dir_all(&tmp).unwrap();

        let body = b"fresh = True\n".to_vec();
        let c = ChunkRef {
            id: chunk_id(&body),
            len: body.len() as u32,
        };
        let mut round = Round::new(&tmp, &mut mirror, &mut store);
        let need = round.on_plan(put("b.py", &a)).unwrap();
        assert!(need.ops[0].chunks.is_empty(), "a.py holds it");
        let mut two = put("c.py", &[c]);
        two.ops.extend(put("d.py", &[c]).ops);
        let need = round.on_plan(two).unwrap();
        assert_eq!(need.ops[0].chunks, [0]);
        assert!(
            need.ops[1].chunks.is_empty(),
            "c.py, once written, holds it"
        );
        round
            .on_chunk(v1::ChunkData {
                id: c.id.as_bytes().to_vec().into(),
                compression: v1::Compression::None as i32,
                data: body.clone().into(),
            })
            .unwrap();
        let done = round.on_commit(1).unwrap();
        assert!(done.failures.is_empty(), "{:?}", done.failures);
        assert_eq!(fs::read(m.join("b.py")).unwrap(), b"print('a')\n");
        assert_eq!(fs::read(m.join("c.py")).unwrap(), body);
        assert_eq!(fs::read(m.join("d.py")).unwrap(), body);

        // Both a.py and b.py changed by hand: the lookup finds neither.
        fs::write(m.join("a.py"), b"print('A')\n").unwrap();
        fs::write(m.join("b.py"), b"print('B')\n").unwrap();
        let mut round = Round::new(&tmp, &mut mirror, &mut store);
        let need = round.on_plan(put("e.py", &a)).unwrap();
        assert!(need.ops[0].chunks.is_empty(), "the store cannot know yet");
        let done = round.on_commit(2).unwrap();
        assert_eq!(done.failures.len(), 1);
        assert!(done.failures[0].message.contains("no longer available"));
        assert!(!m.join("e.py").exists(), "nothing half-written");
        assert_eq!(fs::read_dir(&tmp).unwrap().count(), 0, "no temporary left");
        assert!(!store.has(&a[0].id), "forgotten");
        let mut round = Round::new(&tmp, &mut mirror, &mut store);
        assert_eq!(round.on_plan(put("e.py", &a)).unwrap().ops[0].chunks, [0]);
    }

    /// A file replaced by a new version is swapped out rather than renamed
    /// over, then removed: the path holds the new bytes at once, and an old
    /// version too big to retire leaves `tmp/` from the background thread.
    #[test]
    fn a_replaced_file_is_swapped_out_and_removed() {
        let d = tempfile::tempdir().unwrap();
        let mut store = Store::open(&d.path().join("store"), 1 << 20).unwrap();
        let m = d.path().join("mirrors/m");
        fs::create_dir_all(&m).unwrap();
        let big = pseudo_random(oldfiles::BACKGROUND_BYTES as usize + 1, 5);
        let small = pseudo_random(256 << 10, 6);
        fs::write(m.join("big.bin"), &big).unwrap();
        fs::write(m.join("small.bin"), &small).unwrap();
        let mut mirror = Mirror::open(d.path(), "m", &mut store).unwrap();
        let chunks = mirror
            .tree
            .hashed(&RelPath::new("small.bin").unwrap())
            .unwrap()
            .chunks()
            .to_vec();
        let tmp = d.path().join("tmp");
        fs::create_dir_all(&tmp).unwrap();

        let mut round = Round::new(&tmp, &mut mirror, &mut store);
        let need = round.on_plan(put("big.bin", &chunks)).unwrap();
        assert!(need.ops.iter().all(|o| o.chunks.is_empty()));
        let done = round.on_commit(1).unwrap();
        assert!(done.failures.is_empty(), "{:?}", done.failures);
        assert_eq!(fs::read(m.join("big.bin")).unwrap(), small);
        let t0 = std::time::Instant::now();
        while fs::read_dir(&tmp).unwrap().next().is_some() {
            assert!(t0.elapsed().as_secs() < 10, "the old version stays in tmp/");
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        let names: Vec<_> = fs::read_dir(&m)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names.len(), 2, "{names:?}");
    }

    #[test]
    fn runs_in_an_unchanged_mirror_file_are_copied_unread_and_a_changed_file_is_read() {
        let d = tempfile::tempdir().unwrap();
        let mut store = Store::open(&d.path().join("store"), 1 << 20).unwrap();
        let m = d.path().join("mirrors/m");
        fs::create_dir_all(&m).unwrap();
        let data = pseudo_random(2 << 20, 4);
        fs::write(m.join("old.bin"), &data).unwrap();
        // Past the racy window: the stat cache trusts the file.
        std::thread::sleep(std::time::Duration::from_millis(300));
        let mut mirror = Mirror::open(d.path(), "m", &mut store).unwrap();
        let old = m.join("old.bin");
        let chunks = mirror
            .tree
            .hashed(&RelPath::new("old.bin").unwrap())
            .unwrap()
            .chunks()
            .to_vec();
        let run = trusted_run(&chunks, &store, &mirror).expect("one run: the whole file");
        assert_eq!(
            (run.count, run.bytes, run.offset),
            (chunks.len(), data.len() as u64, 0)
        );
        assert_eq!(&*run.file, old.as_path());
        // From the middle on, still back to back.
        let run = trusted_run(&chunks[10..], &store, &mirror).unwrap();
        assert_eq!(run.count, chunks.len() - 10);

        let tmp = d.path().join("tmp");
        fs::create_dir_all(&tmp).unwrap();
        let mut round = Round::new(&tmp, &mut mirror, &mut store);
        round.on_plan(put("copy.bin", &chunks)).unwrap();
        let done = round.on_commit(1).unwrap();
        assert!(done.failures.is_empty(), "{:?}", done.failures);
        assert_eq!(fs::read(m.join("copy.bin")).unwrap(), data);

        // The same bytes written again: the stat no longer vouches.
        fs::write(&old, &data).unwrap();
        assert!(!mirror.file_unchanged(&old));
        // (The round pointed the store at the copy; back at the old file.)
        store.index_file(&old.clone().into(), &chunks);
        assert!(trusted_run(&chunks, &store, &mirror).is_none());
    }
}

#[cfg(test)]
mod properties;

/// Bytes free to this user on the file system holding `dir`.
fn free_bytes(dir: &Path) -> Option<u64> {
    let st = nix::sys::statvfs::statvfs(dir).ok()?;
    Some(st.blocks_available() as u64 * st.fragment_size() as u64)
}

//! Bringing one job's outputs home: the agent lists each output file's
//! chunks, the puller asks only for chunks the local file at that path lacks,
//! writes a temporary file beside the destination and renames it into place.
//! A pull only adds and replaces files: outputs of several jobs (an MLflow
//! `mlruns/`) merge into one local directory. Symlinked parents and paths
//! outside the declared outputs are refused. A file the user changed since
//! the job was submitted (not by a pull: see [`super::ledger`]) is kept,
//! and the job's version lands beside it (`model.job-7.pt`), said in the
//! job's result and by `bridge pull`.

use std::collections::HashMap;
use std::fs::{self, File};
use std::io::Write;
use std::os::unix::fs::{FileExt, PermissionsExt};
use std::path::{Path, PathBuf};

use bridge_proto::chunking::{ChunkRef, hash_from_bytes};
use bridge_proto::index::{Cached, HashOutcome, hash_file};
use bridge_proto::oldfiles;
use bridge_proto::path::RelPath;
use bridge_proto::scan::{FileKind, Stat};
use bridge_proto::v1::{self, JobInfo};
use tonic::Status;

use super::ledger::Ledger;
use super::{Pulled, destination};
use crate::engine::AgentLink;

/// Chunks asked for in one request (bounds the memory of a pull).
const CHUNK_WINDOW: usize = 64;

/// One job's pull state: what is already local, by path.
pub(super) struct Puller {
    /// Where the outputs land.
    base: PathBuf,
    /// The declared output paths (relative to the job's workdir).
    declared: Vec<String>,
    /// A sweep trial's `<sweep>/<trial>`, put below each declared directory
    /// ([`super::trial_subdir`]).
    trial: Option<String>,
    /// Content hash already in place per path.
    done: HashMap<String, Vec<u8>>,
    /// Stat and chunks of files this puller wrote (so reusing their chunks
    /// needs no rehash while nobody touched them).
    written: HashMap<String, Cached>,
    /// Where replaced big versions wait for their unlink (`.bridge/gone/`).
    gone: PathBuf,
    /// The repository: no output lands outside it, or in its `.git/` or
    /// `.bridge/` (the agent's word on where outputs go is not trusted).
    repo: PathBuf,
    /// The job's workdir on the agent's machine: MLflow file stores that
    /// come home name it, and are made to name `base` instead
    /// ([`crate::mlflow::relocate_meta`]).
    agent_base: String,
    /// What pulls wrote, shared by every job's puller.
    ledger: std::sync::Arc<Ledger>,
    /// The job, for the names of the versions put beside local edits.
    job: String,
    /// When the job was submitted (ns): a local file changed after that,
    /// not by a pull, is the user's.
    since_ns: i64,
}

impl Puller {
    pub(super) fn new(repo: &Path, info: &JobInfo, ledger: std::sync::Arc<Ledger>) -> Puller {
        let spec = info.spec.clone().unwrap_or_default();
        let dest = destination(&spec, &info.id);
        // The laptop's own clock when it submitted the job; else (a job it
        // did not submit: a sweep's trial) the agent's.
        let since = ledger
            .submitted_at(&info.id)
            .unwrap_or((info.submitted_ms as i64).saturating_mul(1_000_000));
        Puller {
            repo: repo.to_path_buf(),
            base: if dest.is_empty() {
                repo.to_path_buf()
            } else {
                repo.join(dest)
            },
            declared: spec
                .outputs
                .iter()
                .map(|o| o.trim_matches('/').to_string())
                .collect(),
            trial: super::trial_subdir(&spec),
            done: HashMap::new(),
            written: HashMap::new(),
            gone: crate::repo::Layout::new(repo).gone,
            ledger,
            job: info.id.clone(),
            since_ns: since,
            agent_base: if info.tree_path.is_empty() {
                String::new()
            } else {
                let w = spec.workdir.trim_matches('/').trim_start_matches('.');
                let t = info.tree_path.trim_end_matches('/');
                if w.is_empty() {
                    t.to_string()
                } else {
                    format!("{t}/{w}")
                }
            },
        }
    }

    /// After a file came home: an MLflow `meta.yaml` names this machine's
    /// paths instead of the agent's.
    fn fixup(&self, dest: &Path) {
        match crate::mlflow::relocate_meta(dest, &self.agent_base, &self.base) {
            Ok(true) => tracing::debug!(path = %dest.display(), "MLflow meta.yaml relocated"),
            Ok(false) => {}
            Err(e) => {
                tracing::warn!(path = %dest.display(), error = %e, "cannot relocate an MLflow meta.yaml")
            }
        }
    }

    /// The declared output `path` is, or is inside.
    fn declared_of(&self, path: &str) -> Option<&String> {
        self.declared.iter().find(|d| {
            path == d.as_str()
                || path
                    .strip_prefix(d.as_str())
                    .is_some_and(|r| r.starts_with('/'))
        })
    }

    /// Where the output at `path` (relative to the job's workdir) lands.
    fn dest(&self, path: &str) -> PathBuf {
        if let Some(t) = &self.trial
            && let Some(d) = self.declared_of(path)
        {
            let rest = path[d.len()..].trim_start_matches('/');
            let mut p = self.base.join(d).join(t);
            if !rest.is_empty() {
                p.push(rest);
            }
            return p;
        }
        self.base.join(path)
    }

    fn allowed(&self, path: &str) -> bool {
        RelPath::new(path).is_ok() && self.declared_of(path).is_some()
    }

    /// Brings the local tree up to `manifest`.
    pub(super) async fn apply(
        &mut self,
        link: &AgentLink,
        manifest: &v1::OutputManifest,
    ) -> Result<Pulled, Status> {
        let job = manifest
            .job
            .as_ref()
            .map(|j| j.id.clone())
            .unwrap_or_default();
        let mut got = Pulled::default();
        for e in &manifest.entries {
            if !self.allowed(&e.path) {
                tracing::warn!(path = %e.path, "agent listed an output outside the declared paths; ignored");
                continue;
            }
            let dest = self.dest(&e.path);
            if let Err(why) = inside_repo(&self.repo, &dest) {
                tracing::warn!(path = %dest.display(), why, "output not written");
                continue;
            }
            if let Err(why) = no_symlink_between(&self.repo, &dest) {
                tracing::warn!(path = %dest.display(), why, "output not written");
                continue;
            }
            match e.kind() {
                v1::Kind::Dir => {
                    fs::create_dir_all(&dest).map_err(|err| io_status(&dest, err))?;
                }
                v1::Kind::Symlink if self.changed_by_user(&dest) => {
                    let rel = self.rel(&dest);
                    tracing::warn!(path = %rel, "a local edit kept: the job's symlink was not made");
                    got.conflicts
                        .push(format!("{rel} (the job's symlink was not made)"));
                }
                v1::Kind::Symlink => {
                    // A link home may not point out of the repository
                    // (nor be absolute): later writes would follow it.
                    let stays = dest
                        .strip_prefix(&self.repo)
                        .ok()
                        .and_then(|r| RelPath::new(r.to_string_lossy().into_owned()).ok())
                        .and_then(|r| bridge_proto::path::resolve_link_target(&r, &e.target));
                    if stays.is_none() {
                        tracing::warn!(path = %e.path, target = %e.target, "an output symlink pointing out of the repository; ignored");
                        continue;
                    }
                    if fs::read_link(&dest).is_ok_and(|t| t == Path::new(&e.target)) {
                        continue;
                    }
                    if let Some(parent) = dest.parent() {
                        fs::create_dir_all(parent).map_err(|err| io_status(parent, err))?;
                    }
                    if Stat::lstat(&dest).is_ok_and(|s| s.kind != FileKind::Dir) {
                        let _ = fs::remove_file(&dest);
                    }
                    std::os::unix::fs::symlink(&e.target, &dest)
                        .map_err(|err| io_status(&dest, err))?;
                }
                v1::Kind::File if e.unhashed => {
                    let dest = self.landing(e, dest, &mut got).await;
                    let bytes = self.pull_whole(link, &job, e, &dest).await?;
                    self.fixup(&dest);
                    self.note_pulled(&dest);
                    got.files += 1;
                    got.bytes += bytes;
                }
                v1::Kind::File => {
                    if self.done.get(&e.path).is_some_and(|h| h[..] == e.hash[..]) {
                        continue;
                    }
                    let dest = self.landing(e, dest, &mut got).await;
                    let bytes = self.pull_file(link, &job, e, &dest).await?;
                    self.fixup(&dest);
                    self.note_pulled(&dest);
                    self.done.insert(e.path.clone(), e.hash.to_vec());
                    got.files += 1;
                    got.bytes += bytes;
                }
                v1::Kind::Unspecified => {}
            }
        }
        if got.files > 0 {
            self.ledger.save();
        }
        Ok(got)
    }

    /// `dest` relative to the repository, as the ledger keys it.
    fn rel(&self, dest: &Path) -> String {
        dest.strip_prefix(&self.repo)
            .unwrap_or(dest)
            .to_string_lossy()
            .into_owned()
    }

    /// Whether the file at `dest` was changed since the job was submitted,
    /// and not by a pull (its change time: see [`Ledger::is_pulled`]).
    fn changed_by_user(&self, dest: &Path) -> bool {
        Stat::lstat(dest).is_ok_and(|st| {
            st.kind == FileKind::File
                && st.ctime_ns > self.since_ns
                && !self.ledger.is_pulled(&self.rel(dest), &st)
        })
    }

    /// Where the output `e` lands: `dest`, or beside it when the user
    /// changed the file there since the job was submitted and it differs
    /// from the job's (`a/model.job-7.pt`), which `got` then reports.
    async fn landing(&self, e: &v1::OutputEntry, dest: PathBuf, got: &mut Pulled) -> PathBuf {
        if !self.changed_by_user(&dest) {
            return dest;
        }
        if !e.unhashed
            && let Some(c) = self.local_chunks(&e.path, &dest).await
            && c.hash.as_bytes()[..] == e.hash[..]
        {
            return dest;
        }
        let copy = beside(&dest, &self.job);
        let (rel, copy_rel) = (self.rel(&dest), self.rel(&copy));
        tracing::warn!(path = %rel, copy = %copy_rel, "changed locally since the job was submitted: kept; the job's version goes beside it");
        got.conflicts.push(format!("{rel} → {copy_rel}"));
        copy
    }

    /// Records in the ledger that a pull installed the file at `dest`.
    fn note_pulled(&self, dest: &Path) {
        if let Ok(st) = Stat::lstat(dest) {
            self.ledger.wrote(&self.rel(dest), &st);
        }
    }

    /// Writes one output file: chunks the local file already has are copied
    /// from it, the rest are fetched in windows. Returns bytes received.
    async fn pull_file(
        &mut self,
        link: &AgentLink,
        job: &str,
        e: &v1::OutputEntry,
        dest: &Path,
    ) -> Result<u64, Status> {
        let chunks: Vec<ChunkRef> = e
            .chunk_ids
            .iter()
            .zip(&e.chunk_lens)
            .map(|(id, &len)| {
                hash_from_bytes(id)
                    .map(|id| ChunkRef { id, len })
                    .ok_or_else(|| Status::internal("malformed chunk id in output manifest"))
            })
            .collect::<Result<_, _>>()?;
        // Chunks the current local file holds, by id → offset.
        let local = self.local_chunks(&e.path, dest).await;
        if local
            .as_ref()
            .is_some_and(|c| c.hash.as_bytes()[..] == e.hash[..])
        {
            return Ok(0);
        }
        let mut have: HashMap<blake3::Hash, (u64, u32)> = HashMap::new();
        if let Some(c) = &local {
            let mut off = 0u64;
            for r in c.chunks.iter() {
                have.entry(r.id).or_insert((off, r.len));
                off += r.len as u64;
            }
        }
        let tmp = tmp_beside(dest)?;
        let mut out = create_tmp(&tmp).map_err(|err| io_status(&tmp, err))?;
        let old = local.as_ref().and_then(|_| File::open(dest).ok());
        let mut received = 0u64;
        let result: Result<(), Status> = async {
            for (w, window) in chunks.chunks(CHUNK_WINDOW).enumerate() {
                let first = w * CHUNK_WINDOW;
                let mut bodies: HashMap<u32, Vec<u8>> = HashMap::new();
                // Reuse local chunks, verified (the file may have changed).
                for (k, c) in window.iter().enumerate() {
                    if let (Some(&(off, len)), Some(f)) = (have.get(&c.id), old.as_ref()) {
                        let mut b = vec![0u8; len as usize];
                        if f.read_exact_at(&mut b, off).is_ok() && blake3::hash(&b) == c.id {
                            bodies.insert((first + k) as u32, b);
                        }
                    }
                }
                let need: Vec<u32> = (first..first + window.len())
                    .map(|i| i as u32)
                    .filter(|i| !bodies.contains_key(i))
                    .collect();
                if !need.is_empty() {
                    let mut s = link
                        .jobs()
                        .read_chunks(v1::ReadChunksRequest {
                            id: job.to_string(),
                            path: e.path.clone(),
                            hash: e.hash.clone(),
                            indexes: need,
                            ..Default::default()
                        })
                        .await?
                        .into_inner();
                    while let Some(b) = s.message().await? {
                        let c = chunks
                            .get(b.index as usize)
                            .ok_or_else(|| Status::internal("chunk index out of range"))?;
                        if blake3::hash(&b.data) != c.id {
                            return Err(Status::data_loss("an output chunk did not match its id"));
                        }
                        received += b.data.len() as u64;
                        bodies.insert(b.index, b.data.to_vec());
                    }
                }
                for k in 0..window.len() {
                    let b = bodies
                        .remove(&((first + k) as u32))
                        .ok_or_else(|| Status::aborted("the agent did not send every chunk"))?;
                    out.write_all(&b).map_err(|err| io_status(&tmp, err))?;
                }
            }
            let mode = if e.executable { 0o755 } else { 0o644 };
            out.set_permissions(fs::Permissions::from_mode(mode))
                .map_err(|err| io_status(&tmp, err))?;
            // No fsync (rsync does none either; it cost ~0.5 s per 256 MiB
            // here): the rename still makes the file appear whole to every
            // reader, and after a crash `bridge pull` rehashes whatever is
            // on disk and fetches what is missing.
            Ok(())
        }
        .await;
        // The old version is closed before it is swapped out, so that its
        // last close does not free it here.
        drop(old);
        let result = result.and_then(|()| install_pulled(&tmp, dest, &self.gone));
        if result.is_err() {
            let _ = fs::remove_file(&tmp);
        }
        result?;
        if let Ok(st) = Stat::lstat(dest) {
            let d = bridge_proto::chunking::Digest {
                chunks,
                hash: hash_from_bytes(&e.hash).unwrap_or(blake3::hash(b"")),
                size: e.size,
            };
            self.written.insert(e.path.clone(), Cached::new(&st, d));
        }
        Ok(received)
    }

    /// Pulls a file the agent has not hashed yet: one `ReadChunks{whole}`
    /// call, which streams every chunk id in order (bodies only for chunks
    /// the local file lacks) while the agent reads and hashes the file.
    /// Bodies are verified and written on the blocking pool, one batch
    /// while the next arrives. Returns bytes received.
    async fn pull_whole(
        &mut self,
        link: &AgentLink,
        job: &str,
        e: &v1::OutputEntry,
        dest: &Path,
    ) -> Result<u64, Status> {
        let local = self.local_chunks(&e.path, dest).await;
        let have = local.as_ref().map(chunk_offsets).unwrap_or_default();
        let tmp = tmp_beside(dest)?;
        let writer = TmpWriter {
            file: create_tmp(&tmp).map_err(|err| io_status(&tmp, err))?,
            old: local.as_ref().and_then(|_| File::open(dest).ok()),
            path: tmp.clone(),
            have: have.clone(),
        };
        let mut received = 0u64;
        let mut chunks: Vec<ChunkRef> = Vec::new();
        let result: Result<v1::ChunkBody, Status> = async {
            let mut s = link
                .jobs()
                .read_chunks(v1::ReadChunksRequest {
                    id: job.to_string(),
                    path: e.path.clone(),
                    whole: true,
                    have: have
                        .keys()
                        .map(|id| id.as_bytes().to_vec().into())
                        .collect(),
                    ..Default::default()
                })
                .await?
                .into_inner();
            let mut writing = tokio::task::spawn_blocking(move || Ok(writer));
            let mut batch = Vec::new();
            let mut batch_bytes = 0usize;
            let last = loop {
                let Some(m) = s.message().await? else {
                    return Err(Status::aborted("the agent ended the read before the file"));
                };
                if m.last {
                    break m;
                }
                let c = ChunkRef {
                    id: hash_from_bytes(&m.id)
                        .ok_or_else(|| Status::internal("malformed chunk id in a whole read"))?,
                    len: m.len,
                };
                if m.index as usize != chunks.len() {
                    return Err(Status::internal("chunks of a whole read out of order"));
                }
                chunks.push(c);
                batch_bytes += c.len as usize;
                if m.data.is_empty() {
                    if !have.contains_key(&c.id) {
                        return Err(Status::internal("the agent left out a chunk we lack"));
                    }
                    batch.push(Piece::Local(c));
                } else {
                    received += m.data.len() as u64;
                    batch.push(Piece::Body(c, m.data));
                }
                if batch_bytes >= WRITE_BATCH {
                    writing = write_next(writing, std::mem::take(&mut batch)).await?;
                    batch_bytes = 0;
                }
            };
            let w = write_next(writing, batch)
                .await?
                .await
                .map_err(|err| Status::internal(err.to_string()))??;
            if bridge_proto::chunking::content_hash(&chunks).as_bytes()[..] != last.hash[..]
                || chunks.iter().map(|c| c.len as u64).sum::<u64>() != last.size
            {
                return Err(Status::data_loss(
                    "a whole output read did not match its content hash",
                ));
            }
            let mode = if last.executable { 0o755 } else { 0o644 };
            w.file
                .set_permissions(fs::Permissions::from_mode(mode))
                .map_err(|err| io_status(&tmp, err))?;
            // No fsync: see `pull_file`. Closed before the swap (see there).
            drop(w);
            install_pulled(&tmp, dest, &self.gone)?;
            Ok(last)
        }
        .await;
        let last = match result {
            Ok(l) => l,
            Err(s) => {
                let _ = fs::remove_file(&tmp);
                return Err(s);
            }
        };
        if let (Ok(st), Some(hash)) = (Stat::lstat(dest), hash_from_bytes(&last.hash)) {
            let d = bridge_proto::chunking::Digest {
                chunks,
                hash,
                size: last.size,
            };
            self.written.insert(e.path.clone(), Cached::new(&st, d));
        }
        self.done.insert(e.path.clone(), last.hash.to_vec());
        Ok(received)
    }

    /// The chunk list of the local file at `dest`, from what this puller
    /// wrote when its stat still matches, else by hashing it.
    async fn local_chunks(&self, rel: &str, dest: &Path) -> Option<Cached> {
        let st = Stat::lstat(dest).ok()?;
        if st.kind != FileKind::File {
            return None;
        }
        if let Some(c) = self.written.get(rel)
            && c.matches(&st)
        {
            return Some(c.clone());
        }
        let p = dest.to_path_buf();
        tokio::task::spawn_blocking(move || match hash_file(&p, 3, |_, _| {}) {
            Ok(HashOutcome::Hashed(st, d, t)) => Some(Cached::hashed_since(&st, d, t)),
            _ => None,
        })
        .await
        .ok()
        .flatten()
    }
}

/// The name of job `job`'s version of `dest` when the user's stays:
/// `model.pt` → `model.job-7.pt`, `notes` → `notes.job-7`.
fn beside(dest: &Path, job: &str) -> PathBuf {
    let name = dest.file_name().unwrap_or_default().to_string_lossy();
    let tag = format!("job-{}", job.replace('/', "-"));
    let new = match name.rfind('.') {
        Some(i) if i > 0 => format!("{}.{tag}{}", &name[..i], &name[i..]),
        _ => format!("{name}.{tag}"),
    };
    dest.with_file_name(new)
}

/// Bytes of a whole read handed to the writer at once.
const WRITE_BATCH: usize = 8 * 1024 * 1024;

/// Where each chunk of a local file starts, by id (the first occurrence).
fn chunk_offsets(c: &Cached) -> HashMap<blake3::Hash, (u64, u32)> {
    let mut have = HashMap::new();
    let mut off = 0u64;
    for r in c.chunks.iter() {
        have.entry(r.id).or_insert((off, r.len));
        off += r.len as u64;
    }
    have
}

/// One chunk of a whole read, in file order.
enum Piece {
    /// Sent by the agent; not verified yet.
    Body(ChunkRef, prost::bytes::Bytes),
    /// Copied from the local file's previous version.
    Local(ChunkRef),
}

/// The temporary file of a whole read; used on the blocking pool.
struct TmpWriter {
    file: File,
    /// For error messages.
    path: PathBuf,
    /// The previous local version at the destination, if any.
    old: Option<File>,
    /// Its chunks, by id → (offset, length).
    have: HashMap<blake3::Hash, (u64, u32)>,
}

impl TmpWriter {
    /// Verifies and appends `batch`.
    fn write(&mut self, batch: Vec<Piece>) -> Result<(), Status> {
        for p in batch {
            match p {
                Piece::Body(c, data) => {
                    if data.len() != c.len as usize || blake3::hash(&data) != c.id {
                        return Err(Status::data_loss("an output chunk did not match its id"));
                    }
                    self.file
                        .write_all(&data)
                        .map_err(|err| io_status(&self.path, err))?;
                }
                Piece::Local(c) => {
                    let mut b = vec![0u8; c.len as usize];
                    let read = match (self.have.get(&c.id), self.old.as_ref()) {
                        (Some(&(off, _)), Some(f)) => f.read_exact_at(&mut b, off).is_ok(),
                        _ => false,
                    };
                    if !read || blake3::hash(&b) != c.id {
                        // The local file changed since it was hashed.
                        return Err(Status::aborted("the local output changed while pulled"));
                    }
                    self.file
                        .write_all(&b)
                        .map_err(|err| io_status(&self.path, err))?;
                }
            }
        }
        Ok(())
    }
}

type Writing = tokio::task::JoinHandle<Result<TmpWriter, Status>>;

/// Waits for the writer's previous batch, then starts writing `batch`.
async fn write_next(writing: Writing, batch: Vec<Piece>) -> Result<Writing, Status> {
    let mut w = writing
        .await
        .map_err(|err| Status::internal(err.to_string()))??;
    Ok(tokio::task::spawn_blocking(move || {
        w.write(batch)?;
        Ok(w)
    }))
}

/// The temporary file an output is written to before its rename: beside
/// `dest`, whose directory is created. A directory at `dest` is refused.
fn tmp_beside(dest: &Path) -> Result<PathBuf, Status> {
    let parent = dest.parent().unwrap_or(Path::new("."));
    fs::create_dir_all(parent).map_err(|err| io_status(parent, err))?;
    if Stat::lstat(dest).is_ok_and(|s| s.kind == FileKind::Dir) {
        return Err(Status::failed_precondition(format!(
            "cannot write output {}: a directory is in the way",
            dest.display()
        )));
    }
    let name = dest.file_name().and_then(|n| n.to_str()).unwrap_or("out");
    Ok(parent.join(format!(".{name}.bridge-pull")))
}

/// Creates the temporary file a pull writes, new: whatever is at its path
/// (a stale one, or a symlink a job sent home to redirect the write) is
/// removed first, and the file is opened with `O_EXCL | O_NOFOLLOW`, so the
/// write never goes through a link.
fn create_tmp(tmp: &Path) -> std::io::Result<File> {
    use std::os::unix::fs::OpenOptionsExt;
    if Stat::lstat(tmp).is_ok_and(|s| s.kind != FileKind::Dir) {
        fs::remove_file(tmp)?;
    }
    fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .custom_flags(nix::libc::O_NOFOLLOW)
        .mode(0o644)
        .open(tmp)
}

/// Whether `dest` is inside the repository and outside its `.git/` and
/// `.bridge/` (where a file would be a hook or bridge's own state).
fn inside_repo(repo: &Path, dest: &Path) -> Result<(), &'static str> {
    let Ok(rest) = dest.strip_prefix(repo) else {
        return Err("outside the repository");
    };
    let mut comps = rest.components();
    if !rest
        .components()
        .all(|c| matches!(c, std::path::Component::Normal(_)))
    {
        return Err("outside the repository");
    }
    match comps.next() {
        None => Err("the repository itself"),
        Some(c) if c.as_os_str() == ".git" || c.as_os_str() == ".bridge" => {
            Err("inside .git/ or .bridge/")
        }
        Some(_) => Ok(()),
    }
}

/// Puts a pulled output (`tmp`, beside it) at `dest`. An older version there
/// is swapped out rather than renamed over, and unlinked, in the background
/// from `gone` when big: a rename over a 1 GiB file cost 0.2–0.4 s on ext4
/// (it starts the new file's writeback) and freeing the old one 0.18 s
/// ([`bridge_proto::oldfiles`]).
fn install_pulled(tmp: &Path, dest: &Path, gone: &Path) -> Result<(), Status> {
    let old = Stat::lstat(dest)
        .ok()
        .filter(|s| s.kind == FileKind::File)
        .map(|s| s.size);
    if oldfiles::replace(tmp, dest, old.is_some()).map_err(|err| io_status(dest, err))? {
        // Without the directory (or across file systems) it is removed here.
        let _ = fs::create_dir_all(gone);
        if let Err(e) = oldfiles::remove(tmp, old.unwrap_or(0), gone) {
            tracing::debug!(path = %dest.display(), error = %e, "cannot remove the old version");
        }
    }
    Ok(())
}

fn io_status(p: &Path, e: std::io::Error) -> Status {
    Status::internal(format!("{}: {e}", p.display()))
}

/// Refuses a destination with a symlink between `base` and it: an output
/// must never be written through a link out of the tree.
fn no_symlink_between(base: &Path, dest: &Path) -> Result<(), &'static str> {
    let Ok(rest) = dest.strip_prefix(base) else {
        return Err("outside the destination");
    };
    let mut cur = base.to_path_buf();
    let comps: Vec<_> = rest.components().collect();
    for c in comps.iter().take(comps.len().saturating_sub(1)) {
        cur.push(c);
        if Stat::lstat(&cur).is_ok_and(|s| s.kind == FileKind::Symlink) {
            return Err("a parent directory is a symlink");
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn no_ledger() -> std::sync::Arc<Ledger> {
        std::sync::Arc::new(Ledger::open(Path::new("/nonexistent/pulled.json")))
    }

    #[test]
    fn the_jobs_version_goes_beside_a_kept_file() {
        let b = |p: &str| beside(Path::new(p), "7").display().to_string();
        assert_eq!(b("out/model.pt"), "out/model.job-7.pt");
        assert_eq!(b("out/notes"), "out/notes.job-7");
        assert_eq!(b("out/.env"), "out/.env.job-7");
        assert_eq!(b("out/a.tar.gz"), "out/a.tar.job-7.gz");
    }
    use bridge_proto::chunking::chunk_bytes;
    use tonic::Code;

    /// Where the agent says outputs go is checked here: never out of the
    /// repository, never into its `.git/` or `.bridge/`.
    #[test]
    fn outputs_land_inside_the_repository_only() {
        let repo = Path::new("/home/me/proj");
        assert!(inside_repo(repo, &repo.join("outputs/m.pt")).is_ok());
        for bad in [
            "../x",
            "outputs/../../x",
            ".git/hooks/pre-commit",
            ".bridge/token",
            "",
        ] {
            assert!(inside_repo(repo, &repo.join(bad)).is_err(), "{bad:?}");
        }
        assert!(inside_repo(repo, Path::new("/etc/passwd")).is_err());
    }

    /// The pull's temporary file is made anew: a link planted at its name
    /// is replaced, and what it pointed at is untouched.
    #[test]
    fn the_temporary_file_never_goes_through_a_link() {
        let d = tempfile::tempdir().unwrap();
        let victim = d.path().join("victim");
        fs::write(&victim, "precious").unwrap();
        let tmp = d.path().join(".out.bridge-pull");
        std::os::unix::fs::symlink(&victim, &tmp).unwrap();
        let mut f = create_tmp(&tmp).unwrap();
        f.write_all(b"new").unwrap();
        assert_eq!(fs::read_to_string(&victim).unwrap(), "precious");
        assert!(!fs::symlink_metadata(&tmp).unwrap().file_type().is_symlink());
        assert_eq!(fs::read_to_string(&tmp).unwrap(), "new");
    }

    fn data(n: usize, seed: u64) -> Vec<u8> {
        bridge_proto::chunking::pseudo_random(n, seed)
    }

    /// A pulled output replaces the older version whole, and nothing of
    /// either is left beside it or in `gone/` once the background removal ran.
    #[test]
    fn a_pulled_output_replaces_the_old_version_and_leaves_nothing_beside_it() {
        let d = tempfile::tempdir().unwrap();
        let dest = d.path().join("out/ckpt.bin");
        let gone = d.path().join(".bridge/gone");
        let tmp = tmp_beside(&dest).unwrap();
        fs::write(&tmp, b"first").unwrap();
        install_pulled(&tmp, &dest, &gone).unwrap();
        assert_eq!(fs::read(&dest).unwrap(), b"first");
        let big = oldfiles::BACKGROUND_BYTES as usize;
        for (k, n) in [(1, big), (2, 10), (3, big + 1)] {
            let tmp = tmp_beside(&dest).unwrap();
            let new = data(n, k);
            fs::write(&tmp, &new).unwrap();
            install_pulled(&tmp, &dest, &gone).unwrap();
            assert_eq!(fs::read(&dest).unwrap(), new);
        }
        let t0 = std::time::Instant::now();
        loop {
            let names: Vec<_> = fs::read_dir(dest.parent().unwrap())
                .unwrap()
                .map(|e| e.unwrap().file_name())
                .collect();
            if names == ["ckpt.bin"] && fs::read_dir(&gone).unwrap().next().is_none() {
                break;
            }
            assert!(t0.elapsed().as_secs() < 10, "left beside it: {names:?}");
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
    }

    #[test]
    fn a_trials_output_paths_map_below_sweep_and_trial() {
        let info = JobInfo {
            id: "9".into(),
            spec: Some(v1::JobSpec {
                outputs: vec!["outputs/".into(), "logs/".into()],
                trial: Some(v1::TrialRef {
                    sweep: "s2".into(),
                    index: 4,
                    attempt: 1,
                }),
                ..Default::default()
            }),
            ..Default::default()
        };
        let repo = Path::new("/repo");
        let p = Puller::new(repo, &info, no_ledger());
        assert_eq!(p.dest("outputs/m.pt"), Path::new("/repo/outputs/s2/4/m.pt"));
        assert_eq!(p.dest("outputs/a/b"), Path::new("/repo/outputs/s2/4/a/b"));
        assert_eq!(p.dest("outputs"), Path::new("/repo/outputs/s2/4"));
        assert_eq!(p.dest("logs/x"), Path::new("/repo/logs/s2/4/x"));
        // A name that only starts like a declared one is not under it.
        assert!(!p.allowed("outputsX/m.pt"));
        let plain = JobInfo {
            spec: Some(v1::JobSpec {
                trial: None,
                ..info.spec.clone().unwrap()
            }),
            ..info
        };
        assert_eq!(
            Puller::new(repo, &plain, no_ledger()).dest("outputs/m.pt"),
            Path::new("/repo/outputs/m.pt")
        );
    }

    /// A writer for `tmp` over the previous version `old` (if any).
    fn writer(tmp: &Path, old: Option<&Path>) -> TmpWriter {
        let have = old
            .map(|p| {
                let b = fs::read(p).unwrap();
                let d = chunk_bytes(&b);
                chunk_offsets(&Cached::new(&Stat::lstat(p).unwrap(), d))
            })
            .unwrap_or_default();
        TmpWriter {
            file: File::create(tmp).unwrap(),
            path: tmp.to_path_buf(),
            old: old.map(|p| File::open(p).unwrap()),
            have,
        }
    }

    #[test]
    fn whole_read_pieces_are_verified_and_local_chunks_copied() {
        let d = tempfile::tempdir().unwrap();
        let (old, tmp) = (d.path().join("old"), d.path().join("tmp"));
        let v1 = data(700 * 1024, 7);
        fs::write(&old, &v1).unwrap();
        // The new version: the old one with a new tail.
        let mut v2 = v1.clone();
        v2.extend(data(300 * 1024, 9));
        let new = chunk_bytes(&v2);
        let mut w = writer(&tmp, Some(&old));
        let mut off = 0usize;
        let mut local = 0;
        let pieces: Vec<Piece> = new
            .chunks
            .iter()
            .map(|c| {
                let body = &v2[off..off + c.len as usize];
                off += c.len as usize;
                if w.have.contains_key(&c.id) {
                    local += 1;
                    Piece::Local(*c)
                } else {
                    Piece::Body(*c, prost::bytes::Bytes::copy_from_slice(body))
                }
            })
            .collect();
        assert!(local > 0, "the unchanged prefix is copied locally");
        w.write(pieces).unwrap();
        drop(w);
        assert_eq!(fs::read(&tmp).unwrap(), v2);
    }

    #[test]
    fn whole_read_refuses_a_body_that_does_not_match_its_id() {
        let d = tempfile::tempdir().unwrap();
        let tmp = d.path().join("tmp");
        let b = data(1000, 3);
        let c = chunk_bytes(&b).chunks[0];
        let mut bad = b.clone();
        bad[10] ^= 1;
        let mut w = writer(&tmp, None);
        let e = w.write(vec![Piece::Body(c, bad.into())]).unwrap_err();
        assert_eq!(e.code(), Code::DataLoss);
        // A local chunk that is not there any more: pull again.
        let e = w.write(vec![Piece::Local(c)]).unwrap_err();
        assert_eq!(e.code(), Code::Aborted);
    }
}

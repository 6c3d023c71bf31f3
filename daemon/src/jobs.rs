//! The daemon's side of jobs: it relays the CLI's job calls to the agent over
//! the engine's current connection (waiting out reconnects), submits through
//! the engine's barrier, and pulls every job's outputs back into the local
//! tree while the job runs and once more when it has ended.
//!
//! Outputs flow with the sync's chunk rules in the other direction: the agent
//! lists each output file's chunks, the daemon asks only for chunks the local
//! file at that path lacks, writes a temporary file beside the destination and
//! renames it into place. A pull only adds and replaces files: outputs of
//! several jobs (an MLflow `mlruns/`) merge into one local directory.

use std::collections::{HashMap, HashSet};
use std::fs::{self, File};
use std::io::Write;
use std::os::unix::fs::{FileExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bridge_proto::chunking::{ChunkRef, hash_from_bytes};
use bridge_proto::index::{Cached, HashOutcome, hash_file};
use bridge_proto::jobs::is_terminal;
use bridge_proto::oldfiles;
use bridge_proto::path::RelPath;
use bridge_proto::scan::{FileKind, Stat};
use bridge_proto::v1::{self, JobInfo};
use tokio::sync::{mpsc, oneshot, watch};
use tonic::{Code, Status};

use crate::engine::{AgentLink, Command, Shared};

/// How often a running job's outputs are looked at.
const PULL_INTERVAL: Duration = Duration::from_millis(200);
/// How often the daemon looks for jobs whose outputs are not all back.
const SCAN_INTERVAL: Duration = Duration::from_secs(1);
/// How long a call waits for the engine to (re)connect.
const LINK_WAIT: Duration = Duration::from_secs(30);
/// At most one connection check (a rescan and round) per this interval.
const POKE_INTERVAL: Duration = Duration::from_secs(2);
/// Chunks asked for in one request (bounds the memory of a pull).
const CHUNK_WINDOW: usize = 64;

pub struct Relay {
    shared: Arc<Shared>,
    repo: PathBuf,
    mirror: String,
    cmds: mpsc::Sender<Command>,
    /// Jobs whose outputs a puller task is bringing back now.
    pulling: Mutex<HashSet<String>>,
    /// Jobs that wrote into files shared with the mirror, whose repair the
    /// engine has been asked for.
    repaired: Mutex<HashSet<String>>,
    /// When the engine was last asked to check the connection.
    last_poke: Mutex<Option<std::time::Instant>>,
}

/// What one pull brought back.
#[derive(Debug, Default, Clone, Copy)]
pub struct Pulled {
    pub files: u64,
    pub bytes: u64,
}

/// Where a job's outputs land locally, relative to the repository.
pub fn destination(spec: &v1::JobSpec, job: &str) -> String {
    let local = spec.outputs_local.trim_matches('/');
    if local.is_empty() {
        spec.workdir
            .trim_matches('/')
            .trim_start_matches('.')
            .to_string()
    } else {
        local.replace("{job}", job)
    }
}

/// The repository-relative paths a job's outputs may land in: never synced up.
pub fn excluded_paths(spec: &v1::JobSpec) -> Result<Vec<RelPath>, Status> {
    let bad = |e: bridge_proto::path::PathError, p: &str| {
        Status::invalid_argument(format!("output path {p:?}: {e}"))
    };
    let local = spec.outputs_local.trim_matches('/');
    if !local.is_empty() {
        let prefix = local
            .split("{job}")
            .next()
            .unwrap_or("")
            .trim_end_matches('/');
        if prefix.is_empty() {
            return Err(Status::invalid_argument(
                "outputs.local must start with a directory, e.g. \"runs/{job}/\"",
            ));
        }
        return Ok(vec![RelPath::new(prefix).map_err(|e| bad(e, prefix))?]);
    }
    let workdir = spec.workdir.trim_matches('/').trim_start_matches('.');
    spec.outputs
        .iter()
        .map(|o| {
            let o = o.trim_matches('/');
            let p = if workdir.is_empty() {
                o.to_string()
            } else {
                format!("{workdir}/{o}")
            };
            RelPath::new(&p).map_err(|e| bad(e, &p))
        })
        .collect()
}

impl Relay {
    pub fn new(
        shared: Arc<Shared>,
        repo: PathBuf,
        mirror: String,
        cmds: mpsc::Sender<Command>,
    ) -> Relay {
        Relay {
            shared,
            repo,
            mirror,
            cmds,
            pulling: Mutex::new(HashSet::new()),
            repaired: Mutex::new(HashSet::new()),
            last_poke: Mutex::new(None),
        }
    }

    /// The engine's current connection, if it ever connected (it may be
    /// broken: calls on it fail, and tonic reconnects it).
    pub fn current_link(&self) -> Option<AgentLink> {
        self.shared.agent.borrow().clone()
    }

    /// The engine's current connection, waiting up to [`LINK_WAIT`] for one.
    pub async fn link(&self) -> Result<AgentLink, Status> {
        let mut rx = self.shared.agent.subscribe();
        let wait = rx.wait_for(|l| l.is_some());
        match tokio::time::timeout(LINK_WAIT, wait).await {
            Ok(Ok(l)) => Ok(l.clone().expect("waited for Some")),
            _ => {
                let why = self
                    .shared
                    .status
                    .lock()
                    .ok()
                    .and_then(|s| s.last_error.clone())
                    .unwrap_or_else(|| "still connecting".into());
                Err(Status::unavailable(format!(
                    "the agent is not reachable: {why}"
                )))
            }
        }
    }

    /// Flushes the sync, submits against the verified generation, and starts
    /// pulling the job's outputs.
    pub async fn submit(
        self: &Arc<Self>,
        spec: v1::JobSpec,
        env_later: Option<crate::engine::EnvLater>,
    ) -> Result<JobInfo, Status> {
        let outputs = excluded_paths(&spec)?;
        let (reply, rx) = oneshot::channel();
        self.cmds
            .send(Command::Submit {
                spec: Box::new(spec),
                outputs,
                env_later,
                reply,
            })
            .await
            .map_err(|_| Status::unavailable("the daemon is shutting down"))?;
        let info = rx
            .await
            .map_err(|_| Status::unavailable("the daemon stopped before submitting"))??;
        self.ensure_puller(&info);
        Ok(info)
    }

    /// The connection failed: have the engine find out now (a round on a
    /// dead connection reconnects, restarting the agent if it is gone)
    /// rather than at the next edit.
    ///
    /// A poke costs a rescan, so it is sent only while the engine believes it
    /// is connected (otherwise it is already reconnecting) and at most once
    /// per [`POKE_INTERVAL`].
    pub(crate) fn poke(&self) {
        let connected = self
            .shared
            .status
            .lock()
            .is_ok_and(|s| s.connection == crate::status::Connection::Connected);
        let mut last = self.last_poke.lock().expect("last_poke");
        if !connected || last.is_some_and(|t| t.elapsed() < POKE_INTERVAL) {
            return;
        }
        *last = Some(std::time::Instant::now());
        let (reply, _) = oneshot::channel();
        let _ = self.cmds.try_send(Command::Sync {
            verify: false,
            issued: None,
            reply,
        });
    }

    /// Retries `f` over reconnects for calls that are safe to repeat.
    async fn call<T, F, Fut>(&self, f: F) -> Result<T, Status>
    where
        F: Fn(AgentLink) -> Fut,
        Fut: std::future::Future<Output = Result<T, Status>>,
    {
        let mut tries = 0;
        loop {
            let link = self.link().await?;
            match f(link).await {
                Err(s) if retryable(&s) && tries < 40 => {
                    tries += 1;
                    self.poke();
                    tokio::time::sleep(Duration::from_millis(250)).await;
                }
                other => return other,
            }
        }
    }

    pub async fn get(&self, id: &str) -> Result<JobInfo, Status> {
        let id = id.to_string();
        self.call(|l| {
            let id = id.clone();
            async move { Ok(l.jobs().get(v1::JobRef { id }).await?.into_inner()) }
        })
        .await
    }

    pub async fn list(&self, all: bool) -> Result<Vec<JobInfo>, Status> {
        let mirror = self.mirror.clone();
        self.call(|l| {
            let mirror = mirror.clone();
            async move {
                Ok(l.jobs()
                    .list(v1::ListRequest { mirror, all })
                    .await?
                    .into_inner()
                    .jobs)
            }
        })
        .await
    }

    pub async fn cancel(&self, id: &str) -> Result<JobInfo, Status> {
        let link = self.link().await?;
        Ok(link
            .jobs()
            .cancel(v1::JobRef { id: id.to_string() })
            .await?
            .into_inner())
    }

    /// Waits up to `within` for the engine to be connected to the agent.
    pub async fn connected(&self, within: Duration) -> Result<(), Status> {
        let until = std::time::Instant::now() + within;
        loop {
            let (ok, why) = match self.shared.status.lock() {
                Ok(s) => (
                    s.connection == crate::status::Connection::Connected,
                    s.last_error.clone(),
                ),
                Err(_) => (false, None),
            };
            if ok {
                return Ok(());
            }
            if std::time::Instant::now() >= until {
                return Err(Status::unavailable(format!(
                    "the agent is not reachable: {}",
                    why.unwrap_or_else(|| "still connecting".into())
                )));
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// SIGINT to the job's process group (a kernel's interrupt).
    pub async fn interrupt(&self, id: &str) -> Result<JobInfo, Status> {
        let link = self.link().await?;
        Ok(link
            .jobs()
            .interrupt(v1::JobRef { id: id.to_string() })
            .await?
            .into_inner())
    }

    pub async fn gpus(&self) -> Result<v1::GpuList, Status> {
        let link = self.link().await?;
        Ok(link.jobs().gpus(v1::GpusRequest {}).await?.into_inner())
    }

    /// Streams the job's log into `tx` from `req.offset`, resuming over
    /// agent reconnects from the last offset sent.
    pub async fn logs(&self, req: v1::LogsRequest, tx: mpsc::Sender<Result<v1::LogChunk, Status>>) {
        let mut req = req;
        let mut failures = 0;
        loop {
            let link = match self.link().await {
                Ok(l) => l,
                Err(e) => {
                    let _ = tx.send(Err(e)).await;
                    return;
                }
            };
            // Compressed on a network link to the agent, inflated here (the
            // CLI is local); a local socket is faster than zstd.
            req.accept_zstd = !link.fast;
            // Stream until the end, or until the error that broke the call.
            let err = match link.jobs().logs(req.clone()).await {
                Ok(s) => {
                    let mut stream = s.into_inner();
                    loop {
                        match stream.message().await {
                            Ok(Some(c)) => {
                                failures = 0;
                                req.offset = c.next_offset;
                                req.tail_lines = 0;
                                let c = inflate(c);
                                let failed = c.is_err();
                                if tx.send(c).await.is_err() || failed {
                                    return;
                                }
                            }
                            Ok(None) => return,
                            Err(s) => break s,
                        }
                    }
                }
                Err(s) => s,
            };
            if !retryable(&err) || failures >= 40 {
                let _ = tx.send(Err(err)).await;
                return;
            }
            failures += 1;
            self.poke();
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }

    /// Active jobs of every repository on the agent.
    pub async fn list_all_mirrors(&self) -> Result<Vec<JobInfo>, Status> {
        self.call(|l| async move {
            Ok(l.jobs()
                .list(v1::ListRequest {
                    mirror: String::new(),
                    all: false,
                })
                .await?
                .into_inner()
                .jobs)
        })
        .await
    }

    /// Cancels this repository's (or, with `all_mirrors`, every) active job
    /// and waits (bounded) for them to end: `bridge down` leaves nothing
    /// running on an agent it stops.
    pub async fn cancel_all(&self, all_mirrors: bool) {
        let Some(link) = self.shared.agent.borrow().clone() else {
            return;
        };
        let mirror = if all_mirrors {
            String::new()
        } else {
            self.mirror.clone()
        };
        let Ok(list) = link
            .jobs()
            .list(v1::ListRequest { mirror, all: false })
            .await
        else {
            return;
        };
        let active = list.into_inner().jobs;
        for j in &active {
            let _ = link.jobs().cancel(v1::JobRef { id: j.id.clone() }).await;
        }
        let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
        for j in &active {
            while tokio::time::Instant::now() < deadline {
                match link.jobs().get(v1::JobRef { id: j.id.clone() }).await {
                    Ok(r) if !is_terminal(r.get_ref().state()) => {
                        tokio::time::sleep(Duration::from_millis(50)).await
                    }
                    _ => break,
                }
            }
        }
        if !active.is_empty() {
            tracing::info!(
                jobs = active.len(),
                "cancelled the running jobs before stopping the agent"
            );
        }
    }

    /// Cancels this repository's live jobs (`bridge down` on an agent that
    /// keeps running): a dev server serves the laptop that started it.
    pub async fn cancel_live(&self) {
        let Some(link) = self.current_link() else {
            return;
        };
        let mut jobs = link.jobs();
        let list = jobs.list(v1::ListRequest {
            mirror: self.mirror.clone(),
            all: false,
        });
        let Ok(Ok(list)) = tokio::time::timeout(Duration::from_secs(5), list).await else {
            return;
        };
        for j in list.into_inner().jobs {
            if j.spec.as_ref().is_some_and(|s| s.live) {
                let _ = link.jobs().cancel(v1::JobRef { id: j.id.clone() }).await;
                tracing::info!(job = %j.id, "live job cancelled by down");
            }
        }
    }

    /// Returns once the job has ended and its outputs are back.
    pub async fn wait(self: &Arc<Self>, id: &str) -> Result<JobInfo, Status> {
        loop {
            let info = self.get(id).await?;
            let no_outputs = info.spec.as_ref().is_none_or(|s| s.outputs.is_empty());
            if is_terminal(info.state()) && (no_outputs || info.outputs_pulled) {
                return Ok(info);
            }
            if is_terminal(info.state()) {
                self.ensure_puller(&info);
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Fetches the job's outputs again, whatever was pulled before.
    pub async fn pull(&self, id: &str) -> Result<(Pulled, String), Status> {
        let info = self.get(id).await?;
        let spec = info.spec.clone().unwrap_or_default();
        if spec.outputs.is_empty() {
            return Err(Status::failed_precondition(format!(
                "job {id} declares no outputs ([outputs] paths in its job file)"
            )));
        }
        let link = self.link().await?;
        let mut puller = Puller::new(&self.repo, &info);
        let manifest = link
            .jobs()
            .outputs(outputs_request(id, Duration::ZERO))
            .await?
            .into_inner();
        let got = puller.apply(&link, &manifest).await?;
        Ok((got, destination(&spec, &info.id)))
    }

    fn ensure_puller(self: &Arc<Self>, info: &JobInfo) {
        if info.spec.as_ref().is_none_or(|s| s.outputs.is_empty()) || info.outputs_pulled {
            return;
        }
        if !self
            .pulling
            .lock()
            .expect("pulling")
            .insert(info.id.clone())
        {
            return;
        }
        let me = self.clone();
        let info = info.clone();
        tokio::spawn(async move {
            let id = info.id.clone();
            me.pull_until_done(info).await;
            me.pulling.lock().expect("pulling").remove(&id);
        });
    }

    /// Pulls while the job runs, then once more from the final manifest, and
    /// tells the agent the outputs are back.
    async fn pull_until_done(&self, info: JobInfo) {
        let mut puller = Puller::new(&self.repo, &info);
        let job = v1::JobRef {
            id: info.id.clone(),
        };
        loop {
            let step = async {
                let link = self.link().await?;
                let t0 = std::time::Instant::now();
                let manifest = link
                    .jobs()
                    .outputs(outputs_request(&job.id, PULL_INTERVAL))
                    .await?
                    .into_inner();
                let listed = t0.elapsed();
                let got = puller.apply(&link, &manifest).await?;
                if got.files > 0 {
                    tracing::debug!(job = %job.id, files = got.files, bytes = got.bytes,
                        complete = manifest.complete, manifest_ms = listed.as_millis() as u64,
                        pull_ms = (t0.elapsed() - listed).as_millis() as u64, "outputs pulled");
                }
                if manifest.complete {
                    link.jobs().mark_pulled(job.clone()).await?;
                }
                Ok::<(bool, Duration), Status>((manifest.complete, t0.elapsed()))
            };
            match step.await {
                Ok((true, _)) => break,
                // The agent long-polls; one that answered early (an older
                // one, or partial outputs) is asked again a tick later.
                Ok((false, took)) => {
                    tokio::time::sleep(PULL_INTERVAL.saturating_sub(took)).await;
                    continue;
                }
                Err(s) if s.code() == Code::Aborted => {
                    // A file changed between the manifest and its read (a
                    // job still writing it): the next manifest has it.
                    tracing::debug!(job = %job.id, error = %s.message(), "output changed while pulled; again");
                }
                Err(s) if s.code() == Code::NotFound => {
                    tracing::warn!(job = %job.id, error = %s.message(), "cannot pull outputs");
                    return;
                }
                Err(s) => {
                    if retryable(&s) {
                        self.poke();
                    }
                    tracing::warn!(job = %job.id, error = %s.message(), "output pull failed; retrying");
                    tokio::time::sleep(SCAN_INTERVAL).await;
                    continue;
                }
            }
            tokio::time::sleep(PULL_INTERVAL).await;
        }
        // A job may have written into files it shared with the mirror: have
        // the engine check the mirror's root (and repair it).
        let (reply, _) = oneshot::channel();
        let _ = self
            .cmds
            .send(Command::Sync {
                verify: true,
                issued: None,
                reply,
            })
            .await;
    }

    /// Background task: finds jobs of this repository whose outputs are not
    /// all back (submitted before a daemon restart, or by another client) and
    /// pulls them.
    pub async fn pull_outputs(
        self: Arc<Self>,
        mut stop: watch::Receiver<Option<crate::control::Stop>>,
    ) {
        loop {
            if self.shared.agent.borrow().is_some()
                && let Ok(jobs) = self.list(true).await
            {
                for j in jobs {
                    self.ensure_puller(&j);
                    if !j.modified_in_place.is_empty()
                        && self.repaired.lock().expect("repaired").insert(j.id.clone())
                    {
                        // The mirror's root now shows the damage: a verified
                        // sync sends the right content again.
                        tracing::warn!(job = %j.id, files = ?j.modified_in_place, "job wrote into mirror files in place; repairing");
                        let (reply, _) = oneshot::channel();
                        let _ = self
                            .cmds
                            .send(Command::Sync {
                                verify: true,
                                issued: None,
                                reply,
                            })
                            .await;
                    }
                }
            }
            tokio::select! {
                _ = stop.wait_for(|s| s.is_some()) => return,
                _ = tokio::time::sleep(SCAN_INTERVAL) => {}
            }
        }
    }
}

/// An `Outputs` call: long-polling up to `wait`, unhashed files streamed.
fn outputs_request(id: &str, wait: Duration) -> v1::OutputsRequest {
    v1::OutputsRequest {
        id: id.to_string(),
        wait_ms: wait.as_millis() as u32,
        defer_hashing: true,
    }
}

pub(crate) fn retryable(s: &Status) -> bool {
    matches!(
        s.code(),
        Code::Unavailable | Code::Unknown | Code::Cancelled
    )
}

/// A log chunk as the CLI takes it: raw data. The agent compresses only for
/// a reader that sent `accept_zstd`, and says how long the data was.
fn inflate(c: v1::LogChunk) -> Result<v1::LogChunk, Status> {
    if !c.zstd {
        return Ok(c);
    }
    let data = zstd::bulk::decompress(&c.data, c.raw_len as usize)
        .ok()
        .filter(|d| d.len() == c.raw_len as usize)
        .ok_or_else(|| {
            Status::data_loss(format!(
                "a compressed log chunk ending at offset {} does not inflate to {} bytes",
                c.next_offset, c.raw_len
            ))
        })?;
    Ok(v1::LogChunk {
        data: data.into(),
        zstd: false,
        raw_len: 0,
        ..c
    })
}

/// One job's pull state: what is already local, by path.
struct Puller {
    /// Where the outputs land.
    base: PathBuf,
    /// The declared output paths (relative to the job's workdir).
    declared: Vec<String>,
    /// Content hash already in place per path.
    done: HashMap<String, Vec<u8>>,
    /// Stat and chunks of files this puller wrote (so reusing their chunks
    /// needs no rehash while nobody touched them).
    written: HashMap<String, Cached>,
    /// Where replaced big versions wait for their unlink (`.bridge/gone/`).
    gone: PathBuf,
    /// The job's workdir on the agent's machine: MLflow file stores that
    /// come home name it, and are made to name `base` instead
    /// ([`crate::mlflow::relocate_meta`]).
    agent_base: String,
}

impl Puller {
    fn new(repo: &Path, info: &JobInfo) -> Puller {
        let spec = info.spec.clone().unwrap_or_default();
        let dest = destination(&spec, &info.id);
        Puller {
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
            done: HashMap::new(),
            written: HashMap::new(),
            gone: crate::repo::Layout::new(repo).gone,
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

    fn allowed(&self, path: &str) -> bool {
        RelPath::new(path).is_ok()
            && self.declared.iter().any(|d| {
                path == d
                    || path
                        .strip_prefix(d.as_str())
                        .is_some_and(|r| r.starts_with('/'))
            })
    }

    /// Brings the local tree up to `manifest`.
    async fn apply(
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
            let dest = self.base.join(&e.path);
            if let Err(why) = no_symlink_between(&self.base, &dest) {
                tracing::warn!(path = %dest.display(), why, "output not written");
                continue;
            }
            match e.kind() {
                v1::Kind::Dir => {
                    fs::create_dir_all(&dest).map_err(|err| io_status(&dest, err))?;
                }
                v1::Kind::Symlink => {
                    if e.target.starts_with('/') {
                        tracing::warn!(path = %e.path, "absolute symlink target in outputs; ignored");
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
                    let bytes = self.pull_whole(link, &job, e, &dest).await?;
                    self.fixup(&dest);
                    got.files += 1;
                    got.bytes += bytes;
                }
                v1::Kind::File => {
                    if self.done.get(&e.path).is_some_and(|h| h[..] == e.hash[..]) {
                        continue;
                    }
                    let bytes = self.pull_file(link, &job, e, &dest).await?;
                    self.fixup(&dest);
                    self.done.insert(e.path.clone(), e.hash.to_vec());
                    got.files += 1;
                    got.bytes += bytes;
                }
                v1::Kind::Unspecified => {}
            }
        }
        Ok(got)
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
        let mut out = File::create(&tmp).map_err(|err| io_status(&tmp, err))?;
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
            file: File::create(&tmp).map_err(|err| io_status(&tmp, err))?,
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
    use bridge_proto::chunking::chunk_bytes;

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

    fn chunk(data: &[u8], zstd: bool, raw_len: u32) -> v1::LogChunk {
        v1::LogChunk {
            stream: 1,
            timestamp_ns: 5,
            data: data.to_vec().into(),
            next_offset: 42,
            zstd,
            raw_len,
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

    #[test]
    fn outputs_requests_long_poll_and_defer_hashing() {
        let r = outputs_request("7", PULL_INTERVAL);
        assert_eq!(r.id, "7");
        assert_eq!(r.wait_ms, PULL_INTERVAL.as_millis() as u32);
        assert!(r.defer_hashing);
    }

    #[test]
    fn compressed_log_chunks_are_inflated_and_raw_ones_pass() {
        let text = b"epoch 1 loss 0.25\n".repeat(500);
        let z = zstd::bulk::compress(&text, 1).unwrap();
        let c = inflate(chunk(&z, true, text.len() as u32)).unwrap();
        assert_eq!(c.data.as_ref(), &text[..]);
        assert!(!c.zstd);
        assert_eq!((c.stream, c.timestamp_ns, c.next_offset), (1, 5, 42));

        let raw = inflate(chunk(b"as is\n", false, 0)).unwrap();
        assert_eq!(raw.data.as_ref(), b"as is\n");
    }

    #[test]
    fn a_chunk_that_does_not_inflate_to_its_length_is_an_error() {
        let text = b"x\n".repeat(100);
        let z = zstd::bulk::compress(&text, 1).unwrap();
        for c in [
            chunk(&z, true, text.len() as u32 + 1),
            chunk(&z, true, 10),
            chunk(b"not zstd", true, 8),
        ] {
            assert_eq!(inflate(c).unwrap_err().code(), Code::DataLoss);
        }
    }
}

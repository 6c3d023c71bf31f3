//! The daemon's side of jobs: it relays the CLI's job calls to the agent over
//! the engine's current connection (waiting out reconnects), submits through
//! the engine's barrier, and pulls every job's outputs back into the local
//! tree while the job runs and once more when it has ended.
//!
//! Outputs flow with the sync's chunk rules in the other direction
//! ([`puller`]).
//!
//! # Layout
//! - [`puller`]: one job's outputs brought home, chunk by chunk.
//! - [`ledger`]: what pulls wrote, so a user's later edit is never
//!   overwritten.

mod ledger;
mod puller;

use std::collections::HashSet;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bridge_proto::jobs::is_terminal;
use bridge_proto::path::RelPath;
use bridge_proto::v1::{self, JobInfo};
use tokio::sync::{mpsc, oneshot, watch};
use tonic::{Code, Status};

use crate::engine::{AgentLink, Command, Shared, Submission, Submitted};
use puller::Puller;

/// How often a running job's outputs are looked at.
const PULL_INTERVAL: Duration = Duration::from_millis(200);
/// How often the daemon looks for jobs whose outputs are not all back.
const SCAN_INTERVAL: Duration = Duration::from_secs(1);
/// How long a call waits for the engine to (re)connect.
const LINK_WAIT: Duration = Duration::from_secs(30);
/// At most one connection check (a rescan and round) per this interval.
const POKE_INTERVAL: Duration = Duration::from_secs(2);

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
    /// Jobs whose outputs can no longer be pulled (the agent deleted their
    /// tree): waiting for them would never end.
    unpullable: Mutex<HashSet<String>>,
    /// What pulls wrote (`.bridge/pulled.json`).
    ledger: Arc<ledger::Ledger>,
    /// Per job: local edits kept, the job's version beside them
    /// (`outputs/m.pt → outputs/m.job-7.pt`), for its result.
    kept: Mutex<std::collections::HashMap<String, std::collections::BTreeSet<String>>>,
}

/// What one pull brought back.
#[derive(Debug, Default, Clone)]
pub struct Pulled {
    pub files: u64,
    pub bytes: u64,
    /// Local edits kept, each with where the job's version went instead.
    pub conflicts: Vec<String>,
}

/// Where a job's outputs land locally, relative to the repository: the
/// workdir, or `outputs.local` with its placeholders filled in (`{job}`, and
/// for a sweep's trial `{sweep}` and `{trial}`).
pub fn destination(spec: &v1::JobSpec, job: &str) -> String {
    let local = spec.outputs_local.trim_matches('/');
    if local.is_empty() {
        spec.workdir
            .trim_matches('/')
            .trim_start_matches('.')
            .to_string()
    } else {
        let (sweep, trial) = spec
            .trial
            .as_ref()
            .map(|t| (t.sweep.clone(), t.index.to_string()))
            .unwrap_or_default();
        local
            .replace("{job}", job)
            .replace("{sweep}", &sweep)
            .replace("{trial}", &trial)
    }
}

/// Where a sweep trial's output directory `D/` lands below its
/// destination: `D/<sweep>/<trial>/`, so trials never overwrite each other
/// (an `outputs.local` template places them itself). `None` for other jobs.
pub fn trial_subdir(spec: &v1::JobSpec) -> Option<String> {
    let t = spec.trial.as_ref()?;
    spec.outputs_local
        .trim_matches('/')
        .is_empty()
        .then(|| format!("{}/{}", t.sweep, t.index))
}

/// The local paths (repository-relative) a job's declared outputs land at.
pub fn local_outputs(spec: &v1::JobSpec, job: &str) -> Vec<String> {
    let dest = destination(spec, job);
    let sub = trial_subdir(spec);
    spec.outputs
        .iter()
        .map(|o| {
            let o = match &sub {
                Some(s) => format!("{}/{s}/", o.trim_end_matches('/')),
                None => o.clone(),
            };
            if dest.is_empty() {
                o
            } else {
                format!("{dest}/{o}")
            }
        })
        .collect()
}

/// The repository-relative paths a job's outputs may land in: never synced up.
pub fn excluded_paths(spec: &v1::JobSpec) -> Result<Vec<RelPath>, Status> {
    let bad = |e: bridge_proto::path::PathError, p: &str| {
        Status::invalid_argument(format!("output path {p:?}: {e}"))
    };
    let local = spec.outputs_local.trim_matches('/');
    if !local.is_empty() {
        let prefix = local.split('{').next().unwrap_or("").trim_end_matches('/');
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
        let ledger = Arc::new(ledger::Ledger::open(
            &crate::repo::Layout::new(&repo).pulled,
        ));
        Relay {
            ledger,
            kept: Mutex::new(Default::default()),
            shared,
            repo,
            mirror,
            cmds,
            pulling: Mutex::new(HashSet::new()),
            repaired: Mutex::new(HashSet::new()),
            last_poke: Mutex::new(None),
            unpullable: Mutex::new(HashSet::new()),
        }
    }

    /// The mirror (repository) this relay serves.
    pub fn mirror(&self) -> &str {
        &self.mirror
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
        let has_outputs = !spec.outputs.is_empty();
        // Before the barrier: an edit made while it waits is not in the job.
        let at = bridge_proto::index::now_ns();
        let submitted = self
            .barrier(Submission::Job(Box::new(spec)), outputs, env_later)
            .await?;
        let Submitted::Job(info) = submitted else {
            return Err(Status::internal("the barrier answered a sweep for a job"));
        };
        if has_outputs {
            self.ledger.submitted(&info.id, at);
        }
        self.ensure_puller(&info);
        Ok(info)
    }

    /// Has the engine flush the sync, verify the mirror and submit `what`
    /// against that generation, with `outputs` kept out of the sync first.
    pub(crate) async fn barrier(
        &self,
        what: Submission,
        outputs: Vec<RelPath>,
        env_later: Option<crate::engine::EnvLater>,
    ) -> Result<Submitted, Status> {
        let (reply, rx) = oneshot::channel();
        self.cmds
            .send(Command::Submit {
                what,
                outputs,
                env_later,
                reply,
            })
            .await
            .map_err(|_| Status::unavailable("the daemon is shutting down"))?;
        rx.await
            .map_err(|_| Status::unavailable("the daemon stopped before submitting"))?
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
    pub(crate) async fn call<T, F, Fut>(&self, f: F) -> Result<T, Status>
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
        self.list_jobs(all, false).await
    }

    /// This repository's jobs; with `unsettled`, finished ones only while
    /// the daemon has work for them (see `ListRequest.unsettled`).
    async fn list_jobs(&self, all: bool, unsettled: bool) -> Result<Vec<JobInfo>, Status> {
        let mirror = self.mirror.clone();
        self.call(|l| {
            let mirror = mirror.clone();
            async move {
                Ok(l.jobs()
                    .list(v1::ListRequest {
                        mirror,
                        all,
                        unsettled,
                    })
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
                    unsettled: false,
                })
                .await?
                .into_inner()
                .jobs)
        })
        .await
    }

    /// Cancels this repository's (or, with `all_mirrors`, every) sweep and
    /// active job and waits (bounded) for them to end: `bridge down` leaves
    /// nothing running on an agent it stops.
    pub async fn cancel_all(&self, all_mirrors: bool) {
        let Some(link) = self.current_link() else {
            return;
        };
        let mirror = (!all_mirrors).then_some(self.mirror.as_str());
        crate::down::cancel_all(&link, mirror).await;
    }

    /// Cancels this repository's live jobs (`bridge down` on an agent that
    /// keeps running): a dev server serves the laptop that started it.
    pub async fn cancel_live(&self) {
        if let Some(link) = self.current_link() {
            crate::down::cancel_live(&link, &self.mirror).await;
        }
    }

    /// Whether job `info` has ended with its outputs back (or none to
    /// bring, or none that can still be brought).
    pub(crate) fn home(&self, info: &JobInfo) -> bool {
        let no_outputs = info.spec.as_ref().is_none_or(|s| s.outputs.is_empty());
        is_terminal(info.state())
            && (no_outputs
                || info.outputs_pulled
                || self
                    .unpullable
                    .lock()
                    .expect("unpullable")
                    .contains(&info.id))
    }

    /// Returns once the job has ended and its outputs are back.
    pub async fn wait(self: &Arc<Self>, id: &str) -> Result<JobInfo, Status> {
        // `bridge run` asks once the log ended, when the job has ended or
        // is about to: look again soon, then less often.
        let mut pause = Duration::from_millis(5);
        loop {
            let mut info = self.get(id).await?;
            if self.home(&info) {
                if let Some(k) = self.kept.lock().expect("kept").get(id) {
                    info.outputs_kept_local = k.iter().cloned().collect();
                }
                return Ok(info);
            }
            if is_terminal(info.state()) {
                self.ensure_puller(&info);
            }
            tokio::time::sleep(pause).await;
            pause = (pause * 2).min(Duration::from_millis(50));
        }
    }

    /// Remembers the local edits a pull of job `id` kept.
    fn keep(&self, id: &str, got: &Pulled) {
        if !got.conflicts.is_empty() {
            let mut kept = self.kept.lock().expect("kept");
            kept.entry(id.to_string())
                .or_default()
                .extend(got.conflicts.iter().cloned());
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
        let mut puller = Puller::new(&self.repo, &info, self.ledger.clone());
        let manifest = link
            .jobs()
            .outputs(outputs_request(id, Duration::ZERO))
            .await?
            .into_inner();
        let got = puller.apply(&link, &manifest).await?;
        self.keep(id, &got);
        Ok((got, destination(&spec, &info.id)))
    }

    pub(crate) fn ensure_puller(self: &Arc<Self>, info: &JobInfo) {
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
        let mut puller = Puller::new(&self.repo, &info, self.ledger.clone());
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
                self.keep(&job.id, &got);
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
                    self.unpullable
                        .lock()
                        .expect("unpullable")
                        .insert(job.id.clone());
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
                && let Ok(jobs) = self.list_jobs(true, true).await
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

#[cfg(test)]
mod tests {
    use super::*;

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
    fn a_trials_outputs_land_apart_from_the_other_trials() {
        let trial = |local: &str| v1::JobSpec {
            workdir: "exp".into(),
            outputs: vec!["outputs/".into(), "ckpt/".into()],
            outputs_local: local.into(),
            trial: Some(v1::TrialRef {
                sweep: "s3".into(),
                index: 7,
                attempt: 2,
            }),
            ..Default::default()
        };
        assert_eq!(trial_subdir(&trial("")).as_deref(), Some("s3/7"));
        assert_eq!(
            local_outputs(&trial(""), "41"),
            ["exp/outputs/s3/7/", "exp/ckpt/s3/7/"]
        );
        // A template places them itself.
        let t = trial("runs/{sweep}/{trial}/");
        assert_eq!(trial_subdir(&t), None);
        assert_eq!(destination(&t, "41"), "runs/s3/7");
        assert_eq!(
            excluded_paths(&t).unwrap(),
            [RelPath::new("runs").unwrap()],
            "the fixed part before the first placeholder"
        );
        // A plain job is as before.
        let job = v1::JobSpec {
            trial: None,
            ..trial("")
        };
        assert_eq!(local_outputs(&job, "41"), ["exp/outputs/", "exp/ckpt/"]);
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

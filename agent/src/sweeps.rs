//! Sweeps on the agent: many trials of one job against one generation of a
//! mirror, each trial an ordinary job (`bridge.v1.Sweeps`).
//!
//! - **One generation.** A submit takes one snapshot of the mirror at the
//!   generation the daemon verified (`sweeps/<n>/base/`, under the state
//!   lock, like a job's); every attempt of every trial gets its own tree of
//!   hard links to it when it starts ([`crate::jobs::Jobs::submit_from`]),
//!   so a trial that starts hours later sees the code of the submit, and
//!   trials never see each other's writes. The snapshot goes when the sweep
//!   ends; a resume takes a new one.
//! - **Trials are jobs.** Each attempt is a job of this agent with
//!   `JobSpec.trial` set: its own process group, log with offsets, outputs
//!   pulled by the daemon, GPUs from the agent's FIFO queue. The sweep only
//!   decides which trial starts when: in index order, at most `max_parallel`
//!   queued or running at once, a failed attempt again while it has retries,
//!   nothing new after a cancel or a fail-fast failure.
//! - **The scheduler** ([`Sweeps::poll`]) runs in the job poller's thread,
//!   right after the jobs' poll, so a trial that ends is followed by the
//!   next one within one tick (the poller is woken when a shim exits).
//! - **Records** (`sweeps/<n>/record.pb`, [`v1::SweepRecord`]) are replaced
//!   atomically whenever a trial starts or ends: an agent that restarts
//!   follows the trials' jobs from where they are.
//!
//! # Layout
//! - [`placement`]: where a trial runs — the seam, and this agent's jobs.
//! - [`mlflow`]: the sweep's parent run and the trials' child runs.
//! - [`service`]: the `bridge.v1.Sweeps` gRPC service.

pub mod mlflow;
pub mod placement;
pub mod service;

use std::collections::{BTreeMap, HashMap};
use std::fs;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bridge_proto::jobs::{is_terminal, state_name};
use bridge_proto::sweep::{self, param_env, sweep_id, sweep_number};
use bridge_proto::v1::{self, JobState, SweepInfo, SweepRecord, TrialInfo};
use prost::Message;
use tokio::sync::oneshot;
use tonic::Status;

use crate::jobs::{Jobs, now_ms, snapshot};
use crate::service::State;
use placement::Placement;

/// At most this many trials in one sweep.
pub const MAX_TRIALS: usize = 1_000_000;
/// How long launches wait for the sweep's snapshot files another trial
/// wrote in place to be restored before the waiting trials fail.
const REPAIR_WAIT: Duration = Duration::from_secs(120);
/// After the tracking server failed a call, trials start without child runs
/// for this long before it is tried again.
const MLFLOW_RETRY: Duration = Duration::from_secs(60);
/// A running sweep's record is written at most this often (a big sweep's
/// record is big); what happened since is found again in its jobs after a
/// restart ([`Sweeps::open`]).
const SAVE_EVERY: Duration = Duration::from_millis(100);

/// A file of the sweep's snapshot to restore, and what it should hold.
type Restore = (bridge_proto::path::RelPath, bridge_proto::index::Cached);
type Reply<T> = oneshot::Receiver<Result<T, String>>;

pub struct Sweeps {
    /// `<root>/sweeps`: one directory per sweep.
    dir: PathBuf,
    jobs: Arc<Jobs>,
    /// Where trials run.
    placement: Box<dyn Placement>,
    /// Runs the MLflow calls; `None`: no runs are made (unit tests).
    runtime: Option<tokio::runtime::Handle>,
    /// This machine's name, for the runs' tags.
    hostname: String,
    inner: Mutex<Inner>,
}

#[derive(Default)]
struct Inner {
    sweeps: BTreeMap<u64, Sweep>,
    next: u64,
}

/// One sweep: its record and what is not worth persisting.
struct Sweep {
    rec: SweepRecord,
    /// Per trial (by index).
    runs: Vec<TrialRun>,
    parent: Parent,
    /// Snapshot files a trial wrote in place, being restored; no trial
    /// starts meanwhile.
    repair: Option<(Vec<Restore>, Instant)>,
    /// The record changed since it was last written, and when that was.
    dirty: bool,
    saved_at: Instant,
}

/// A trial's work in progress besides its job.
#[derive(Default)]
struct TrialRun {
    /// Its next attempt's MLflow child run, being made.
    child: Option<Reply<String>>,
    /// Ready to start: with this child run, or none.
    ready: Option<Option<String>>,
    /// The reported metric, being read from the ended attempt's run.
    report: Option<Reply<Option<f64>>>,
    /// Its job was asked to stop (a cancelled sweep).
    cancel_sent: bool,
}

/// The sweep's MLflow parent run.
enum Parent {
    /// Not known yet (made before the first trial that needs it).
    Unknown,
    Making(Reply<(String, String)>),
    /// In the record (`mlflow_run_id`).
    Ready,
    /// No runs: not wanted, no server, or the server failed at this time.
    Off(Option<Instant>),
}

fn info(rec: &SweepRecord) -> &SweepInfo {
    rec.info.as_ref().expect("sweep record has info")
}

fn info_mut(rec: &mut SweepRecord) -> &mut SweepInfo {
    rec.info.get_or_insert_with(Default::default)
}

fn final_state(s: JobState) -> bool {
    is_terminal(s)
}

fn not_found(id: &str) -> Status {
    Status::not_found(format!(
        "no sweep {id} on this agent (`bridge sweep status` lists them)"
    ))
}

fn parse(id: &str) -> Result<u64, Status> {
    sweep_number(id)
        .ok_or_else(|| Status::invalid_argument(format!("{id:?} is not a sweep id (like s3)")))
}

impl Sweeps {
    /// Opens the sweeps under `root/sweeps` and follows those that had not
    /// ended.
    pub fn open(
        root: &Path,
        jobs: Arc<Jobs>,
        placement: Box<dyn Placement>,
        runtime: Option<tokio::runtime::Handle>,
    ) -> std::io::Result<Sweeps> {
        let dir = root.join("sweeps");
        fs::create_dir_all(&dir)?;
        let mut inner = Inner {
            next: 1,
            ..Default::default()
        };
        for e in fs::read_dir(&dir)?.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            let Ok(n) = name.parse::<u64>() else { continue };
            inner.next = inner.next.max(n + 1);
            let rec = match fs::read(e.path().join("record.pb"))
                .ok()
                .and_then(|b| SweepRecord::decode(b.as_slice()).ok())
            {
                Some(r) if r.info.is_some() => r,
                _ => {
                    tracing::warn!(dir = %e.path().display(), "sweep without a readable record; ignored");
                    continue;
                }
            };
            let trials = info(&rec).trials.len();
            let parent = if info(&rec).mlflow_run_id.is_empty() {
                Parent::Unknown
            } else {
                Parent::Ready
            };
            inner.sweeps.insert(
                n,
                Sweep {
                    rec,
                    runs: (0..trials).map(|_| TrialRun::default()).collect(),
                    parent,
                    repair: None,
                    dirty: false,
                    saved_at: Instant::now(),
                },
            );
        }
        for (&n, sw) in inner.sweeps.iter_mut() {
            if !is_terminal(info(&sw.rec).state()) {
                adopt_attempts(n, sw, placement.as_ref());
            }
        }
        Ok(Sweeps {
            dir,
            jobs,
            placement,
            runtime,
            hostname: nix::unistd::gethostname()
                .map(|h| h.to_string_lossy().into_owned())
                .unwrap_or_default(),
            inner: Mutex::new(inner),
        })
    }

    fn lock(&self) -> Result<std::sync::MutexGuard<'_, Inner>, Status> {
        self.inner
            .lock()
            .map_err(|_| Status::internal("sweep table poisoned"))
    }

    fn sweep_dir(&self, n: u64) -> PathBuf {
        self.dir.join(n.to_string())
    }

    /// The sweep's snapshot: `tree/` and `snapshot.index`.
    fn base(&self, n: u64) -> PathBuf {
        self.sweep_dir(n).join("base")
    }

    /// Replaces the sweep's record (fsynced once it has ended: a queued or
    /// running sweep is followed from its jobs after a crash anyway).
    fn save(&self, n: u64, rec: &SweepRecord) {
        let path = self.sweep_dir(n).join("record.pb");
        let done = is_terminal(info(rec).state());
        if let Err(e) = crate::envcache::write_atomic(&path, &rec.encode_to_vec(), done) {
            tracing::error!(sweep = n, error = %e, "cannot persist the sweep record");
        }
    }

    /// Checks a sweep, snapshots the mirror at its generation and queues
    /// its trials.
    pub fn submit(
        &self,
        state: &Mutex<State>,
        req: v1::SweepSubmitRequest,
    ) -> Result<SweepInfo, Status> {
        let mut spec = req
            .spec
            .ok_or_else(|| Status::invalid_argument("submit without a sweep spec"))?;
        let mut job = spec
            .job
            .take()
            .ok_or_else(|| Status::invalid_argument("a sweep without its job"))?;
        check_template(&job, &spec.trials)?;
        job.trial = None;
        self.placement.check(&job)?;
        let n = {
            let mut inner = self.lock()?;
            let n = inner.next;
            inner.next += 1;
            n
        };
        let dir = self.sweep_dir(n);
        let taken = fs::create_dir_all(&dir)
            .map_err(|e| Status::internal(format!("cannot create {}: {e}", dir.display())))
            .and_then(|()| {
                self.jobs.snapshot_generation(
                    state,
                    &req.mirror,
                    &req.generation,
                    &job,
                    &self.base(n),
                )
            });
        if let Err(e) = taken {
            let _ = fs::remove_dir_all(&dir);
            return Err(e);
        }
        let max_parallel = if spec.max_parallel > 0 {
            spec.max_parallel
        } else {
            self.placement.capacity(&job, spec.cpus_per_trial.max(1))
        };
        let trials: Vec<TrialInfo> = std::mem::take(&mut spec.trials)
            .into_iter()
            .enumerate()
            .map(|(i, t)| TrialInfo {
                index: i as u32,
                params: t.params,
                state: JobState::Queued as i32,
                ..Default::default()
            })
            .collect();
        let count = trials.len();
        let name = if job.name.is_empty() {
            format!("sweep-{n}")
        } else {
            job.name.clone()
        };
        spec.job = Some(job);
        let info = SweepInfo {
            id: sweep_id(n),
            name,
            state: JobState::Queued as i32,
            mirror: req.mirror,
            generation: req.generation,
            spec: Some(spec),
            trials,
            submitted_ms: now_ms(),
            max_parallel,
            ..Default::default()
        };
        let rec = SweepRecord {
            info: Some(info.clone()),
            cancel_requested: false,
        };
        self.save(n, &rec);
        tracing::info!(sweep = n, trials = count, max_parallel, "sweep submitted");
        self.lock()?.sweeps.insert(
            n,
            Sweep {
                rec,
                runs: (0..count).map(|_| TrialRun::default()).collect(),
                parent: Parent::Unknown,
                repair: None,
                dirty: false,
                saved_at: Instant::now(),
            },
        );
        self.jobs.wake();
        Ok(info)
    }

    pub fn get(&self, id: &str) -> Result<SweepInfo, Status> {
        let n = parse(id)?;
        let inner = self.lock()?;
        let sw = inner.sweeps.get(&n).ok_or_else(|| not_found(id))?;
        Ok(info(&sw.rec).clone())
    }

    pub fn list(&self, mirror: &str, all: bool) -> Result<Vec<SweepInfo>, Status> {
        let inner = self.lock()?;
        Ok(inner
            .sweeps
            .values()
            .map(|s| info(&s.rec))
            .filter(|i| mirror.is_empty() || i.mirror == mirror)
            .filter(|i| all || !is_terminal(i.state()))
            .cloned()
            .collect())
    }

    /// No trial of the sweep starts any more; its running trials are
    /// cancelled at the next tick.
    pub fn cancel(&self, id: &str) -> Result<SweepInfo, Status> {
        let n = parse(id)?;
        {
            let mut inner = self.lock()?;
            let sw = inner.sweeps.get_mut(&n).ok_or_else(|| not_found(id))?;
            let st = info(&sw.rec).state();
            if is_terminal(st) {
                return Err(Status::failed_precondition(format!(
                    "sweep {id} has already ended ({}); nothing to cancel",
                    state_name(st)
                )));
            }
            sw.rec.cancel_requested = true;
            let i = info_mut(&mut sw.rec);
            if i.reason.is_empty() {
                i.reason = "cancelled".into();
            }
            let rec = sw.rec.clone();
            self.save(n, &rec);
        }
        self.jobs.wake();
        self.get(id)
    }

    /// Runs an ended sweep's failed, lost and cancelled trials again against
    /// `generation`, with `job` as the trial template when given.
    pub fn resume(
        &self,
        state: &Mutex<State>,
        req: v1::SweepResumeRequest,
    ) -> Result<SweepInfo, Status> {
        let n = parse(&req.id)?;
        let job = {
            let inner = self.lock()?;
            let sw = inner.sweeps.get(&n).ok_or_else(|| not_found(&req.id))?;
            let i = info(&sw.rec);
            if !is_terminal(i.state()) {
                return Err(Status::failed_precondition(format!(
                    "sweep {} is still {}: wait for it, or `bridge sweep cancel {}` first",
                    req.id,
                    state_name(i.state()),
                    req.id
                )));
            }
            if !i.trials.iter().any(|t| rerun(t.state())) {
                return Err(Status::failed_precondition(format!(
                    "every trial of sweep {} succeeded; nothing to resume",
                    req.id
                )));
            }
            if i.mirror != req.mirror {
                return Err(Status::failed_precondition(format!(
                    "sweep {} belongs to another repository",
                    req.id
                )));
            }
            let mut job = match req.job {
                Some(j) => j,
                None => i
                    .spec
                    .as_ref()
                    .and_then(|s| s.job.clone())
                    .unwrap_or_default(),
            };
            job.trial = None;
            let trials: Vec<v1::TrialParams> = i
                .trials
                .iter()
                .map(|t| v1::TrialParams {
                    params: t.params.clone(),
                })
                .collect();
            check_template(&job, &trials)?;
            job
        };
        let base = self.base(n);
        if base.exists() {
            // A base the end did not get to remove (a restart in between).
            let _ = fs::remove_dir_all(&base);
        }
        self.jobs
            .snapshot_generation(state, &req.mirror, &req.generation, &job, &base)?;
        let mut inner = self.lock()?;
        let sw = inner.sweeps.get_mut(&n).ok_or_else(|| not_found(&req.id))?;
        sw.rec.cancel_requested = false;
        let i = info_mut(&mut sw.rec);
        if let Some(s) = i.spec.as_mut() {
            s.job = Some(job);
        }
        i.generation = req.generation;
        i.state = JobState::Queued as i32;
        i.finished_ms = 0;
        i.reason.clear();
        i.resumes += 1;
        for t in i.trials.iter_mut().filter(|t| rerun(t.state())) {
            t.state = JobState::Queued as i32;
            t.exit_code = None;
            t.reason.clear();
            t.metric = None;
            t.mlflow_run_id.clear();
            t.started_ms = 0;
            t.finished_ms = 0;
            t.gpus.clear();
            t.attempts = 0;
        }
        sw.runs = (0..i.trials.len()).map(|_| TrialRun::default()).collect();
        if matches!(sw.parent, Parent::Off(_)) {
            sw.parent = Parent::Unknown;
        }
        let out = i.clone();
        let rec = sw.rec.clone();
        self.save(n, &rec);
        drop(inner);
        tracing::info!(sweep = n, "sweep resumed");
        // The parent run is running again.
        if !out.mlflow_run_id.is_empty() {
            self.mlflow_spawn(&out, {
                let run = out.mlflow_run_id.clone();
                move |t| async move { t.set_status(&run, "RUNNING", None).await }
            });
        }
        self.jobs.wake();
        Ok(out)
    }

    /// Sweeps not ended: they hold the machine against the idle autostop
    /// between two trials too.
    pub fn active(&self) -> u32 {
        let Ok(inner) = self.inner.lock() else {
            return 1;
        };
        inner
            .sweeps
            .values()
            .filter(|s| !is_terminal(info(&s.rec).state()))
            .count() as u32
    }

    /// One tick of the scheduler: follows every active sweep's attempts,
    /// repairs snapshots `damaged` shared, cancels, retries, starts what
    /// may start, and ends sweeps whose trials are all final.
    pub fn poll(&self, state: &Mutex<State>, damaged: &[(String, Vec<snapshot::Damage>)]) {
        let active: Vec<u64> = match self.inner.lock() {
            Ok(inner) => inner
                .sweeps
                .iter()
                .filter(|(_, s)| !is_terminal(info(&s.rec).state()))
                .map(|(&n, _)| n)
                .collect(),
            Err(_) => return,
        };
        if active.is_empty() {
            return;
        }
        self.repair_bases(state, &active, damaged);
        for n in active {
            let Ok(mut inner) = self.inner.lock() else {
                return;
            };
            let Some(sw) = inner.sweeps.get_mut(&n) else {
                continue;
            };
            sw.dirty |= self.step(n, sw);
            let ended = is_terminal(info(&sw.rec).state());
            if sw.dirty && (ended || sw.saved_at.elapsed() >= SAVE_EVERY) {
                let rec = sw.rec.clone();
                self.save(n, &rec);
                sw.dirty = false;
                sw.saved_at = Instant::now();
            }
        }
    }

    /// Restores files of the active sweeps' snapshots that a trial wrote in
    /// place (they share the inode), from the chunk store.
    fn repair_bases(
        &self,
        state: &Mutex<State>,
        active: &[u64],
        damaged: &[(String, Vec<snapshot::Damage>)],
    ) {
        let mut work: Vec<(u64, Vec<Restore>)> = Vec::new();
        {
            let Ok(mut inner) = self.inner.lock() else {
                return;
            };
            for n in active {
                let base = self.base(*n);
                let Some(sw) = inner.sweeps.get_mut(n) else {
                    continue;
                };
                let mirror = info(&sw.rec).mirror.clone();
                for (m, changed) in damaged {
                    if *m != mirror {
                        continue;
                    }
                    let hit = snapshot::affected(
                        &base.join("tree"),
                        &base.join("snapshot.index"),
                        changed,
                    );
                    if !hit.is_empty() {
                        tracing::warn!(
                            sweep = n,
                            files = hit.len(),
                            "a trial wrote into the sweep's snapshot in place; restoring it"
                        );
                        sw.repair
                            .get_or_insert_with(|| (Vec::new(), Instant::now()))
                            .0
                            .extend(hit);
                    }
                }
                if let Some((files, _)) = &sw.repair {
                    work.push((*n, files.clone()));
                }
            }
        }
        if work.is_empty() {
            return;
        }
        let mut left: Vec<(u64, Vec<Restore>)> = Vec::new();
        if let Ok(mut st) = state.lock() {
            for (n, files) in work {
                let tree = self.base(n).join("tree");
                let rest = files
                    .into_iter()
                    .filter(|(p, c)| !matches!(snapshot::restore(&mut st, &tree, p, c), Ok(true)))
                    .collect();
                left.push((n, rest));
            }
        }
        let Ok(mut inner) = self.inner.lock() else {
            return;
        };
        for (n, rest) in left {
            let Some(sw) = inner.sweeps.get_mut(&n) else {
                continue;
            };
            let since = sw.repair.as_ref().map_or_else(Instant::now, |r| r.1);
            if rest.is_empty() {
                tracing::info!(sweep = n, "sweep snapshot restored");
                sw.repair = None;
            } else if since.elapsed() > REPAIR_WAIT {
                let names: Vec<String> = rest.iter().map(|(p, _)| p.to_string()).collect();
                sw.repair = None;
                let reason = format!(
                    "a trial wrote in place into {}, which the sweep's snapshot shared, and the original could not be restored; resume the sweep",
                    names.join(", ")
                );
                let i = info_mut(&mut sw.rec);
                for t in i.trials.iter_mut() {
                    if t.current_job.is_empty() && !final_state(t.state()) {
                        t.state = JobState::Failed as i32;
                        t.reason = reason.clone();
                        t.finished_ms = now_ms();
                    }
                }
                let rec = sw.rec.clone();
                self.save(n, &rec);
            } else {
                sw.repair = Some((rest, since));
            }
        }
    }

    /// Advances one sweep; true when its record changed in a way worth
    /// saving (a trial started or ended, the sweep ended).
    fn step(&self, n: u64, sw: &mut Sweep) -> bool {
        let mut save = false;
        let cancel = sw.rec.cancel_requested;
        let spec = info(&sw.rec).spec.clone().unwrap_or_default();
        let template = spec.job.clone().unwrap_or_default();
        let tracking = if spec.no_mlflow_runs {
            Ok(None)
        } else {
            mlflow::Tracking::from_env(&template.env)
        };
        // 1. Follow the attempts that run.
        let mut fail_fast: Option<String> = None;
        for idx in 0..info(&sw.rec).trials.len() {
            let t = &info(&sw.rec).trials[idx];
            if t.current_job.is_empty() {
                continue;
            }
            let job_id = t.current_job.clone();
            let job = match self.placement.job(&job_id) {
                Some(j) if is_terminal(j.state()) => j,
                Some(j) => {
                    // Still queued or running: the trial shows its state.
                    let t = &mut info_mut(&mut sw.rec).trials[idx];
                    t.state = j.state;
                    t.started_ms = j.started_ms;
                    t.gpus = j.gpus;
                    continue;
                }
                None => {
                    let t = &mut info_mut(&mut sw.rec).trials[idx];
                    t.current_job.clear();
                    t.state = JobState::Lost as i32;
                    t.reason = format!("its job {job_id} is gone from the agent");
                    t.finished_ms = now_ms();
                    save = true;
                    continue;
                }
            };
            save = true;
            let retries = spec.retries;
            let run = std::mem::take(&mut info_mut(&mut sw.rec).trials[idx].mlflow_run_id);
            let t = &mut info_mut(&mut sw.rec).trials[idx];
            t.current_job.clear();
            t.exit_code = job.exit_code;
            t.started_ms = job.started_ms;
            t.finished_ms = job.finished_ms;
            t.gpus = job.gpus.clone();
            let failed = matches!(job.state(), JobState::Failed | JobState::Lost);
            if failed && !cancel && t.attempts <= retries {
                t.state = JobState::Queued as i32;
                t.reason = format!(
                    "attempt {} {}{}; retrying",
                    t.attempts,
                    state_name(job.state()),
                    if job.reason.is_empty() {
                        String::new()
                    } else {
                        format!(": {}", job.reason)
                    }
                );
                tracing::info!(sweep = n, trial = idx, "trial failed; retrying");
                sw.runs[idx] = TrialRun::default();
                if !run.is_empty() {
                    self.end_run(&tracking, run, job.state(), None);
                }
                continue;
            }
            t.state = job.state;
            t.reason = job.reason.clone();
            t.metric = (!spec.report.is_empty())
                .then(|| job.metrics.get(&spec.report).copied())
                .flatten();
            t.mlflow_run_id = run.clone();
            if failed && spec.fail_fast && !cancel && fail_fast.is_none() {
                fail_fast = Some(format!(
                    "trial {idx} {}{}; fail_fast cancelled the rest",
                    state_name(job.state()),
                    job.exit_code
                        .filter(|&c| c != 0)
                        .map(|c| format!(" (exit {c})"))
                        .unwrap_or_default()
                ));
            }
            if !run.is_empty() {
                let want =
                    (!spec.report.is_empty() && t.metric.is_none()).then(|| spec.report.clone());
                let rx = self.end_run(&tracking, run, job.state(), want);
                sw.runs[idx].report = rx;
            }
        }
        if let Some(reason) = fail_fast {
            sw.rec.cancel_requested = true;
            info_mut(&mut sw.rec).reason = reason;
            save = true;
        }
        let cancel = sw.rec.cancel_requested;
        // 2. A cancelled sweep: nothing new starts, running trials stop.
        if cancel {
            for idx in 0..info(&sw.rec).trials.len() {
                let t = &mut info_mut(&mut sw.rec).trials[idx];
                if final_state(t.state()) {
                    continue;
                }
                if t.current_job.is_empty() {
                    t.state = JobState::Cancelled as i32;
                    t.reason = "cancelled before it started".into();
                    t.finished_ms = now_ms();
                    sw.runs[idx].child = None;
                    sw.runs[idx].ready = None;
                    save = true;
                } else if !sw.runs[idx].cancel_sent {
                    sw.runs[idx].cancel_sent = true;
                    self.placement.cancel(&t.current_job);
                }
            }
        }
        // 3. Metrics read from MLflow runs.
        for idx in 0..sw.runs.len() {
            if let Some(rx) = sw.runs[idx].report.as_mut() {
                match rx.try_recv() {
                    Ok(r) => {
                        sw.runs[idx].report = None;
                        if let Ok(Some(v)) = r {
                            info_mut(&mut sw.rec).trials[idx].metric = Some(v);
                        }
                        save = true;
                    }
                    Err(oneshot::error::TryRecvError::Empty) => {}
                    Err(oneshot::error::TryRecvError::Closed) => sw.runs[idx].report = None,
                }
            }
        }
        // 4. Start what may start.
        if !cancel && sw.repair.is_none() {
            save |= self.launch_ready(n, sw, &template, &tracking);
        }
        // 5. The end.
        let i = info(&sw.rec);
        let started = i.trials.iter().any(|t| !t.jobs.is_empty());
        let all_final = i.trials.iter().all(|t| final_state(t.state()));
        let reporting = sw.runs.iter().any(|r| r.report.is_some());
        if all_final && !reporting {
            let end = if i.trials.iter().all(|t| t.state() == JobState::Succeeded) {
                JobState::Succeeded
            } else if cancel
                && !i
                    .trials
                    .iter()
                    .any(|t| matches!(t.state(), JobState::Failed | JobState::Lost))
            {
                JobState::Cancelled
            } else {
                JobState::Failed
            };
            self.finish(n, sw, end);
            return true;
        }
        let now_state = if started {
            JobState::Running
        } else {
            JobState::Queued
        };
        if info(&sw.rec).state() != now_state {
            info_mut(&mut sw.rec).state = now_state as i32;
            save = true;
        }
        save
    }

    /// Starts pending trials in index order while fewer than `max_parallel`
    /// are queued or running, making their MLflow child runs first when the
    /// trials log to a tracking server. True when one started.
    fn launch_ready(
        &self,
        n: u64,
        sw: &mut Sweep,
        template: &v1::JobSpec,
        tracking: &Result<Option<mlflow::Tracking>, String>,
    ) -> bool {
        let mut started = false;
        let max = info(&sw.rec).max_parallel.max(1) as usize;
        // Child runs made since the last tick are ready to start with.
        for idx in 0..sw.runs.len() {
            let run = &mut sw.runs[idx];
            let Some(rx) = run.child.as_mut() else {
                continue;
            };
            match rx.try_recv() {
                Ok(r) => {
                    run.child = None;
                    run.ready = Some(match r {
                        Ok(id) => Some(id),
                        Err(e) => {
                            tracing::warn!(sweep = n, trial = idx, error = %e, "no MLflow child run");
                            sw.parent = Parent::Off(Some(Instant::now()));
                            info_mut(&mut sw.rec).mlflow_note = e;
                            None
                        }
                    });
                }
                Err(oneshot::error::TryRecvError::Empty) => {}
                Err(oneshot::error::TryRecvError::Closed) => {
                    run.child = None;
                    run.ready = Some(None);
                }
            }
        }
        let mut outstanding = info(&sw.rec)
            .trials
            .iter()
            .filter(|t| !t.current_job.is_empty())
            .count()
            + sw.runs.iter().filter(|r| r.child.is_some()).count();
        // Runs wanted: a server, and a parent run made (or being made).
        let want_runs = match tracking {
            Ok(Some(t)) => self.ensure_parent(sw, t),
            Err(note) => {
                let i = info_mut(&mut sw.rec);
                if i.mlflow_note.is_empty() {
                    i.mlflow_note = note.clone();
                }
                None
            }
            Ok(None) => None,
        };
        if matches!(sw.parent, Parent::Making(_)) {
            return false;
        }
        for idx in 0..info(&sw.rec).trials.len() {
            if outstanding >= max {
                break;
            }
            let t = &info(&sw.rec).trials[idx];
            if final_state(t.state()) || !t.current_job.is_empty() || sw.runs[idx].child.is_some() {
                continue;
            }
            let run = &mut sw.runs[idx];
            if run.ready.is_none() {
                match (&want_runs, tracking) {
                    (Some((exp, parent)), Ok(Some(tr))) if matches!(sw.parent, Parent::Ready) => {
                        run.child = Some(self.make_child(
                            tr.clone(),
                            exp.clone(),
                            parent.clone(),
                            info(&sw.rec),
                            idx,
                            template,
                        ));
                        outstanding += 1;
                        continue;
                    }
                    _ => run.ready = Some(None),
                }
            }
            let child = run.ready.take().flatten();
            match self.launch(n, sw, idx, template, child.clone()) {
                Ok(job) => {
                    outstanding += 1;
                    started = true;
                    if let (Some(run), Ok(Some(tr))) = (child, tracking) {
                        let host = self.hostname.clone();
                        self.mlflow_spawn_with(tr.clone(), move |t| async move {
                            let tags = [
                                ("bridge.job_id".to_string(), job.id.clone()),
                                ("bridge.agent_host".to_string(), host),
                            ];
                            t.log(&run, &[], &tags).await
                        });
                    }
                }
                Err(e) => {
                    let t = &mut info_mut(&mut sw.rec).trials[idx];
                    t.state = JobState::Failed as i32;
                    t.reason = format!("bridge could not start the trial: {}", e.message());
                    t.finished_ms = now_ms();
                    started = true;
                }
            }
        }
        started
    }

    /// Starts trial `idx`'s next attempt.
    fn launch(
        &self,
        n: u64,
        sw: &mut Sweep,
        idx: usize,
        template: &v1::JobSpec,
        child: Option<String>,
    ) -> Result<v1::JobInfo, Status> {
        let i = info(&sw.rec);
        let t = &i.trials[idx];
        let attempt = t.jobs.len() as u32 + 1;
        let mut spec = trial_spec(template, &i.id, &i.name, t, attempt);
        if let Some(run) = &child {
            spec.env.insert("MLFLOW_RUN_ID".into(), run.clone());
        }
        let (mirror, generation) = (i.mirror.clone(), i.generation.clone());
        let job = self
            .placement
            .launch(&mirror, &generation, &self.base(n), spec)?;
        tracing::info!(sweep = n, trial = idx, job = %job.id, attempt, "trial started");
        let t = &mut info_mut(&mut sw.rec).trials[idx];
        t.current_job = job.id.clone();
        t.jobs.push(job.id.clone());
        t.attempts += 1;
        t.state = job.state;
        t.gpus = job.gpus.clone();
        t.generation = generation;
        t.mlflow_run_id = child.unwrap_or_default();
        t.started_ms = job.started_ms;
        t.finished_ms = 0;
        t.exit_code = None;
        sw.runs[idx].cancel_sent = false;
        Ok(job)
    }

    /// The sweep's experiment and parent run, once made; starts making them
    /// the first time. `None` while they are being made, or when runs are
    /// off (then the note says why).
    fn ensure_parent(&self, sw: &mut Sweep, t: &mlflow::Tracking) -> Option<(String, String)> {
        if let Parent::Making(rx) = &mut sw.parent {
            match rx.try_recv() {
                Ok(Ok((exp, run))) => {
                    let i = info_mut(&mut sw.rec);
                    i.mlflow_experiment_id = exp;
                    i.mlflow_run_id = run;
                    i.mlflow_note.clear();
                    sw.parent = Parent::Ready;
                }
                Ok(Err(e)) => {
                    tracing::warn!(sweep = %info(&sw.rec).id, error = %e, "no MLflow parent run");
                    info_mut(&mut sw.rec).mlflow_note = e;
                    sw.parent = Parent::Off(Some(Instant::now()));
                }
                Err(oneshot::error::TryRecvError::Empty) => return None,
                Err(oneshot::error::TryRecvError::Closed) => {
                    sw.parent = Parent::Off(Some(Instant::now()));
                }
            }
        }
        match &sw.parent {
            Parent::Ready => {
                let i = info(&sw.rec);
                Some((i.mlflow_experiment_id.clone(), i.mlflow_run_id.clone()))
            }
            Parent::Off(Some(at)) if at.elapsed() >= MLFLOW_RETRY => {
                sw.parent = if info(&sw.rec).mlflow_run_id.is_empty() {
                    Parent::Unknown
                } else {
                    Parent::Ready
                };
                self.ensure_parent(sw, t)
            }
            Parent::Off(_) | Parent::Making(_) => None,
            Parent::Unknown => {
                let Some(rt) = &self.runtime else {
                    sw.parent = Parent::Off(None);
                    return None;
                };
                let (tx, rx) = oneshot::channel();
                let i = info(&sw.rec);
                let (name, id) = (i.name.clone(), i.id.clone());
                let spec = i.spec.clone().unwrap_or_default();
                let env = spec.job.clone().unwrap_or_default().env;
                let mut tags = mlflow::context_tags(&env);
                tags.extend([
                    ("mlflow.runName".to_string(), format!("{name} ({id})")),
                    ("bridge.sweep".to_string(), id.clone()),
                    ("bridge.sweep_method".to_string(), spec.method.clone()),
                    ("bridge.agent_host".to_string(), self.hostname.clone()),
                ]);
                let t = t.clone();
                let start = i.submitted_ms;
                let jobs = self.jobs.clone();
                rt.spawn(async move {
                    let made = async {
                        let exp = t.experiment().await?;
                        let run = t
                            .create_run(&exp, &format!("{name} ({id})"), &tags, start)
                            .await?;
                        Ok::<_, String>((exp, run))
                    }
                    .await;
                    let _ = tx.send(made);
                    jobs.wake();
                });
                sw.parent = Parent::Making(rx);
                None
            }
        }
    }

    /// Starts making trial `idx`'s child run for its next attempt.
    fn make_child(
        &self,
        t: mlflow::Tracking,
        exp: String,
        parent: String,
        i: &SweepInfo,
        idx: usize,
        template: &v1::JobSpec,
    ) -> Reply<String> {
        let (tx, rx) = oneshot::channel();
        let trial = &i.trials[idx];
        let attempt = trial.jobs.len() + 1;
        let name = if attempt > 1 {
            format!("{}-{idx} (attempt {attempt})", i.name)
        } else {
            format!("{}-{idx}", i.name)
        };
        let mut tags = mlflow::context_tags(&template.env);
        tags.extend([
            ("mlflow.parentRunId".to_string(), parent),
            ("mlflow.runName".to_string(), name.clone()),
            ("bridge.sweep".to_string(), i.id.clone()),
            ("bridge.trial".to_string(), idx.to_string()),
            ("bridge.attempt".to_string(), attempt.to_string()),
            ("bridge.generation".to_string(), i.generation.clone()),
        ]);
        let params: Vec<(String, String)> = trial
            .params
            .iter()
            .map(|p| (p.name.clone(), p.value.clone()))
            .collect();
        let jobs = self.jobs.clone();
        match &self.runtime {
            Some(rt) => {
                rt.spawn(async move {
                    let made = async {
                        let run = t.create_run(&exp, &name, &tags, now_ms()).await?;
                        if !params.is_empty() {
                            t.log(&run, &params, &[]).await?;
                        }
                        Ok::<_, String>(run)
                    }
                    .await;
                    let _ = tx.send(made);
                    jobs.wake();
                });
            }
            None => {
                let _ = tx.send(Err("no runtime for MLflow calls".into()));
            }
        }
        rx
    }

    /// Ends an attempt's child run with its job's outcome, and reads the
    /// reported metric from it when `report` is given.
    fn end_run(
        &self,
        tracking: &Result<Option<mlflow::Tracking>, String>,
        run: String,
        state: JobState,
        report: Option<String>,
    ) -> Option<Reply<Option<f64>>> {
        let (Ok(Some(t)), Some(rt)) = (tracking, &self.runtime) else {
            return None;
        };
        let (tx, rx) = oneshot::channel();
        let t = t.clone();
        let jobs = self.jobs.clone();
        rt.spawn(async move {
            let done = async {
                t.set_status(&run, mlflow::status_of(state), Some(now_ms()))
                    .await?;
                match report {
                    Some(k) => t.metric(&run, &k).await,
                    None => Ok(None),
                }
            }
            .await;
            if let Err(e) = &done {
                tracing::warn!(run, error = %e, "cannot end an MLflow child run");
            }
            let _ = tx.send(done);
            jobs.wake();
        });
        Some(rx)
    }

    /// Runs `f` against the trials' tracking server in the background.
    fn mlflow_spawn<F, Fut>(&self, i: &SweepInfo, f: F)
    where
        F: FnOnce(mlflow::Tracking) -> Fut + Send + 'static,
        Fut: std::future::Future<Output = Result<(), String>> + Send + 'static,
    {
        let env = i
            .spec
            .as_ref()
            .and_then(|s| s.job.as_ref())
            .map(|j| j.env.clone())
            .unwrap_or_default();
        if let Ok(Some(t)) = mlflow::Tracking::from_env(&env) {
            self.mlflow_spawn_with(t, f);
        }
    }

    fn mlflow_spawn_with<F, Fut>(&self, t: mlflow::Tracking, f: F)
    where
        F: FnOnce(mlflow::Tracking) -> Fut + Send + 'static,
        Fut: std::future::Future<Output = Result<(), String>> + Send + 'static,
    {
        if let Some(rt) = &self.runtime {
            rt.spawn(async move {
                if let Err(e) = f(t).await {
                    tracing::warn!(error = %e, "MLflow call failed");
                }
            });
        }
    }

    /// The sweep has ended as `end`: its snapshot goes (in the background),
    /// its parent run ends.
    fn finish(&self, n: u64, sw: &mut Sweep, end: JobState) {
        let i = info_mut(&mut sw.rec);
        i.state = end as i32;
        i.finished_ms = now_ms();
        if end == JobState::Succeeded {
            i.reason.clear();
        } else if i.reason.is_empty() || (i.reason == "cancelled" && end == JobState::Failed) {
            let failed = i
                .trials
                .iter()
                .filter(|t| matches!(t.state(), JobState::Failed | JobState::Lost))
                .count();
            if failed > 0 {
                i.reason = format!(
                    "{failed} of {} trial{} failed",
                    i.trials.len(),
                    if i.trials.len() == 1 { "" } else { "s" }
                );
            }
        }
        tracing::info!(sweep = n, state = ?end, "sweep ended");
        let base = self.base(n);
        let aside = self.sweep_dir(n).join(format!("base.gone-{}", now_ms()));
        if fs::rename(&base, &aside).is_ok() {
            let relinks = self.jobs.relinks_of(&i.mirror);
            let mirror_root = self.jobs.mirror_root(&i.mirror);
            let spawned = crate::background::spawn("sweep-base-delete", move || {
                let tree = aside.join("tree");
                let done = match &relinks {
                    Some(q) => snapshot::delete_relinking(
                        &tree,
                        &aside.join("snapshot.index"),
                        &mirror_root,
                        q,
                    ),
                    None => fs::remove_dir_all(&tree),
                };
                if let Err(e) = done.and_then(|()| fs::remove_dir_all(&aside)) {
                    tracing::warn!(dir = %aside.display(), error = %e, "cannot delete a sweep's snapshot");
                }
            });
            if let Err(e) = spawned {
                tracing::warn!(error = %e, "cannot start a thread to delete a sweep's snapshot");
            }
        }
        let run = i.mlflow_run_id.clone();
        if !run.is_empty() {
            let status = mlflow::status_of(end);
            let snapshot = i.clone();
            self.mlflow_spawn(&snapshot, move |t| async move {
                t.set_status(&run, status, Some(now_ms())).await
            });
        }
        let rec = sw.rec.clone();
        self.save(n, &rec);
    }
}

impl crate::idle::Activity for Sweeps {
    fn jobs_active(&self) -> u32 {
        self.jobs.active() + self.active()
    }
}

/// Attempts of sweep `n` its record does not list (started after its last
/// save, before the agent stopped): each joins its trial, and the newest
/// becomes the trial's current attempt unless the trial is final.
fn adopt_attempts(n: u64, sw: &mut Sweep, placement: &dyn Placement) {
    let id = sweep_id(n);
    let mut adopted = 0;
    for j in placement.attempts(&id) {
        let Some(t) = j.spec.as_ref().and_then(|s| s.trial.as_ref()) else {
            continue;
        };
        let Some(trial) = info_mut(&mut sw.rec).trials.get_mut(t.index as usize) else {
            continue;
        };
        if trial.jobs.contains(&j.id) {
            continue;
        }
        trial.jobs.push(j.id.clone());
        trial.attempts += 1;
        if !final_state(trial.state()) {
            trial.current_job = j.id.clone();
        }
        adopted += 1;
    }
    if adopted > 0 {
        tracing::info!(
            sweep = n,
            attempts = adopted,
            "attempts the sweep's record missed, adopted"
        );
        sw.dirty = true;
    }
}

/// Whether a resume runs this trial again.
fn rerun(s: JobState) -> bool {
    matches!(s, JobState::Failed | JobState::Lost | JobState::Cancelled)
}

/// The checks of a trial template the agent makes itself: what trials can
/// be (snapshots, no debugger, no kernel), parameter names, and that every
/// placeholder of the command has a value in every trial.
fn check_template(job: &v1::JobSpec, trials: &[v1::TrialParams]) -> Result<(), Status> {
    if trials.is_empty() {
        return Err(Status::invalid_argument("a sweep needs at least one trial"));
    }
    if trials.len() > MAX_TRIALS {
        return Err(Status::invalid_argument(format!(
            "a sweep has at most {MAX_TRIALS} trials, not {}",
            trials.len()
        )));
    }
    if job.live || job.kernel.is_some() {
        return Err(Status::invalid_argument(
            "a sweep's trials run in snapshots: drop mode = \"live\"",
        ));
    }
    if job
        .debug
        .is_some_and(|d| d.kind() != v1::debug_spec::Kind::None)
    {
        return Err(Status::invalid_argument(
            "a sweep's trials cannot run under a debugger: debug one trial with `bridge run` of its parameters",
        ));
    }
    if job.outputs_local.trim_matches('/').is_empty()
        && let Some(f) = job.outputs.iter().find(|o| !o.ends_with('/'))
    {
        return Err(Status::invalid_argument(format!(
            "output {f:?} is a file: a sweep's trials bring each output directory D/ home as D/<sweep>/<trial>/; list directories, or set outputs.local with {{trial}}"
        )));
    }
    let names = sweep::placeholders(&job.run);
    for (i, t) in trials.iter().enumerate() {
        for p in &t.params {
            if !sweep::valid_param_name(&p.name) {
                return Err(Status::invalid_argument(format!(
                    "trial {i}: {:?} is not a parameter name (letters, digits, '_'; not trial or sweep)",
                    p.name
                )));
            }
        }
        for ph in &names {
            if !sweep::BUILTIN.contains(&ph.name.as_str())
                && !t.params.iter().any(|p| p.name == ph.name)
            {
                return Err(Status::invalid_argument(format!(
                    "trial {i} has no value for {{{}}} in the command",
                    ph.name
                )));
            }
        }
    }
    Ok(())
}

/// The job spec of one attempt of trial `t`: the template with its command
/// expanded and its parameters in the environment.
fn trial_spec(
    template: &v1::JobSpec,
    sweep: &str,
    name: &str,
    t: &TrialInfo,
    attempt: u32,
) -> v1::JobSpec {
    let index = t.index.to_string();
    let values: HashMap<&str, &str> = t
        .params
        .iter()
        .map(|p| (p.name.as_str(), p.value.as_str()))
        .chain([("trial", index.as_str()), ("sweep", sweep)])
        .collect();
    let mut spec = template.clone();
    spec.run = sweep::expand(&template.run, |n| values.get(n).copied());
    spec.name = format!("{name}/{}", t.index);
    for p in &t.params {
        spec.env.insert(param_env(&p.name), p.value.clone());
    }
    spec.trial = Some(v1::TrialRef {
        sweep: sweep.to_string(),
        index: t.index,
        attempt,
    });
    spec
}

#[cfg(test)]
mod tests;

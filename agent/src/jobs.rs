//! Jobs on the agent: submission against a generation, the GPU-aware FIFO
//! queue, supervision through shims, cancellation and recovery after a
//! restart.
//!
//! Every job lives in `jobs/<id>/`: `record.pb` (the [`store`]), `tree/` (its
//! [`snapshot`] of the mirror), and the files its shim (`bridge-agent shim`)
//! keeps: `spec.json` (what to run), `log`, `state.json`, `exit.json`. The
//! shim, not the agent, is the job's parent, so a job keeps running, logging
//! and recording its exit while the agent restarts; the agent only watches
//! those files ([`Jobs::poll`], every [`POLL`]).
//!
//! # Layout
//! - [`store`]: persistent job records.
//! - [`snapshot`]: a job's hard-linked copy of a generation.
//! - [`spare`]: snapshots under the state lock, and the spare snapshot
//!   prepared ahead of the next submit.
//! - [`runner`]: starting a job — its environment, `spec.json`, the shim.
//! - [`outputs`]: output manifests and chunk reads for the daemon's pulls.
//! - [`service`]: the `bridge.v1.Jobs` gRPC service.

mod container;
pub mod outputs;
mod runner;
pub mod service;
pub mod snapshot;
mod spare;
pub mod store;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bridge_proto::jobs::{is_terminal, state_name};
use bridge_proto::path::RelPath;
use bridge_proto::v1::{self, JobInfo, JobRecord, JobState};
use nix::sys::signal::{Signal, killpg};
use nix::unistd::Pid;
use tonic::Status;

use crate::gpu::{GpuInfo, GpuInventory};
use crate::joblog::LogWriter;
use crate::mirror::RelinkQueue;
use crate::service::State;
use crate::shim::{Phase, ShimExit, ShimState};
use spare::{SPARE_PREFIX, SpareSlot};

/// How often the agent looks at its running jobs' files.
pub const POLL: Duration = Duration::from_millis(20);
/// SIGTERM → SIGKILL grace on cancel (and for leftovers when a job ends).
pub const GRACE: Duration = Duration::from_secs(10);
/// The same for kernels: a front end's shutdown or a `bridge kernel` that
/// was killed must not leave a remote kernel behind for long.
pub const KERNEL_GRACE: Duration = Duration::from_secs(2);
/// How long a kernel no daemon holds (`Jobs.Hold`) is kept by default.
pub const ORPHAN_GRACE: Duration = Duration::from_secs(10 * 60);
/// How long a queued job waits for its damaged snapshot files to be restored.
pub const RESTORE_WAIT: Duration = Duration::from_secs(120);
/// Finished jobs whose trees (and so outputs) are kept for `bridge pull`.
pub const KEEP_TREES: usize = 20;
/// How long an older finished job's tree is kept while its outputs have not
/// been pulled.
pub const UNPULLED_KEEP: Duration = Duration::from_secs(7 * 24 * 3600);

pub struct Jobs {
    store: store::Store,
    /// Where environments and setup markers are cached.
    cache_dir: PathBuf,
    /// This binary, run as `shim` for each job.
    shim_exe: PathBuf,
    /// GPUs found at start (the job-visible inventory).
    gpus: Vec<GpuInfo>,
    /// Why none were found, when discovery failed.
    gpu_note: String,
    inventory: Box<dyn GpuInventory + Send + Sync>,
    inner: Mutex<Inner>,
    /// The agent's mirrors (`<root>/mirrors`).
    mirrors_dir: PathBuf,
    /// Spare snapshots by mirror name (see [`snapshot::Spare`]).
    spares: Arc<Mutex<HashMap<String, SpareSlot>>>,
    /// Mirrors jobs were submitted against, with their relink queues.
    submitted_to: Mutex<HashMap<String, RelinkQueue>>,
    spare_seq: AtomicU64,
    /// This machine's name, for the tags of jobs' MLflow runs.
    hostname: String,
    /// Rouses the poller at once when a shim exits.
    wake: Arc<Wake>,
}

/// The last lines of a job's `shim.log` (what the shim, or the container
/// engine that ran it, printed), joined; `None` when it is empty.
fn shim_log_tail(dir: &Path) -> Option<String> {
    let text = fs::read_to_string(dir.join("shim.log")).ok()?;
    let lines: Vec<&str> = text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect();
    let tail = lines[lines.len().saturating_sub(3)..].join(" | ");
    (!tail.is_empty()).then_some(tail)
}

/// Wakes the job poller before its next tick (a shim exited: a sweep's next
/// trial should not wait for the tick), else it sleeps [`POLL`].
#[derive(Default)]
pub struct Wake {
    due: Mutex<bool>,
    cv: std::sync::Condvar,
}

impl Wake {
    pub fn wake(&self) {
        if let Ok(mut d) = self.due.lock() {
            *d = true;
            self.cv.notify_all();
        }
    }

    /// Waits up to `d`, or less when woken meanwhile (or before).
    pub fn wait(&self, d: Duration) {
        let Ok(mut due) = self.due.lock() else {
            std::thread::sleep(d);
            return;
        };
        if !*due {
            due = match self.cv.wait_timeout(due, d) {
                Ok((g, _)) => g,
                Err(e) => e.into_inner().0,
            };
        }
        *due = false;
    }
}

/// A file of a queued snapshot to restore, and the content it should have.
type Restore = (RelPath, bridge_proto::index::Cached);

#[derive(Default)]
struct Inner {
    records: BTreeMap<u64, JobRecord>,
    next_id: u64,
    /// Job holding each GPU, by position in `Jobs::gpus`.
    holder: Vec<Option<u64>>,
    /// SIGKILL deadlines of jobs being cancelled.
    kill_at: HashMap<u64, Instant>,
    outputs: HashMap<u64, outputs::Outputs>,
    /// Queued jobs held back until their snapshot's copies of files another
    /// job wrote in place are restored (what they should contain, since when).
    repairs: HashMap<u64, (Vec<Restore>, Instant)>,
    /// Finished jobs whose trees were deleted (or never found): not looked
    /// at again by [`Jobs::prune_trees`].
    trees_gone: HashSet<u64>,
    /// Kernels: how many `Hold` calls hold each, and since when none does.
    holds: HashMap<u64, (u32, Instant)>,
}

/// A kernel job (`bridge kernel`).
fn is_kernel(r: &JobRecord) -> bool {
    r.info
        .as_ref()
        .and_then(|i| i.spec.as_ref())
        .is_some_and(|s| s.kernel.is_some())
}

/// SIGTERM → SIGKILL grace of a job.
fn grace_of(r: &JobRecord) -> Duration {
    if is_kernel(r) { KERNEL_GRACE } else { GRACE }
}

/// Keeps a kernel held while alive (see [`Jobs::hold`]).
pub struct HoldGuard {
    jobs: Arc<Jobs>,
    id: u64,
}

impl Drop for HoldGuard {
    fn drop(&mut self) {
        if let Ok(mut inner) = self.jobs.inner.lock()
            && let Some(h) = inner.holds.get_mut(&self.id)
        {
            h.0 = h.0.saturating_sub(1);
            if h.0 == 0 {
                h.1 = Instant::now();
                tracing::info!(
                    job = self.id,
                    "kernel no longer held; kept for its grace period"
                );
            }
        }
    }
}

pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

fn state_of(r: &JobRecord) -> JobState {
    r.info
        .as_ref()
        .map(|i| i.state())
        .unwrap_or(JobState::Unspecified)
}

/// A live job (`mode = "live"`): it runs in the mirror, not a snapshot.
fn is_live(r: &JobRecord) -> bool {
    r.info
        .as_ref()
        .and_then(|i| i.spec.as_ref())
        .is_some_and(|s| s.live)
}

fn parse_id(id: &str) -> Result<u64, Status> {
    id.trim()
        .parse::<u64>()
        .map_err(|_| Status::invalid_argument(format!("{id:?} is not a job id (a number)")))
}

fn not_found(id: u64) -> Status {
    Status::not_found(format!(
        "no job {id} on this agent (`bridge ps --all` lists them)"
    ))
}

/// Clock ticks since boot when `pid` started, or `None` if it is gone (or a
/// zombie, which has finished).
fn start_ticks(pid: u32) -> Option<u64> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = &stat[stat.rfind(')')? + 2..];
    let mut fields = rest.split_whitespace();
    if fields.next()? == "Z" {
        return None;
    }
    // Field 22 overall; `rest` starts at field 3.
    fields.nth(18)?.parse().ok()
}

fn read_json<T: serde::de::DeserializeOwned>(p: &Path) -> Option<T> {
    serde_json::from_slice(&fs::read(p).ok()?).ok()
}

/// What a `placement = "cluster"` job cannot have: its pod is not this
/// agent, so nothing that lives here (the mirror, this agent's ports, a
/// debugger, a kernel) reaches it.
fn check_cluster(spec: &v1::JobSpec) -> Result<(), Status> {
    if let Some(why) = crate::cluster::unavailable() {
        return Err(Status::failed_precondition(why));
    }
    let refuse = |what: &str| {
        Err(Status::invalid_argument(format!(
            "placement = \"cluster\" runs the job in a pod of its own, so it cannot {what}"
        )))
    };
    if spec.live {
        return refuse("run live in the agent's mirror (mode = \"live\")");
    }
    if spec.kernel.is_some() {
        return refuse("be a notebook kernel");
    }
    if spec
        .debug
        .is_some_and(|d| d.kind() != v1::debug_spec::Kind::None)
    {
        return refuse("run under a debugger: debug it with placement = \"agent\"");
    }
    if !spec.forwards.is_empty() {
        return refuse("have [[forward]]s (they reach the agent's pod)");
    }
    Ok(())
}

fn rel(s: &str, what: &str) -> Result<Option<RelPath>, Status> {
    let s = s.trim_matches('/');
    if s.is_empty() || s == "." {
        return Ok(None);
    }
    RelPath::new(s)
        .map(Some)
        .map_err(|e| Status::invalid_argument(format!("{what} {s:?}: {e}")))
}

impl Jobs {
    /// Opens the job store under `root` and picks up where a previous agent
    /// left off: jobs whose shim is still alive stay running (their GPUs stay
    /// held); the next poll settles the rest.
    pub fn open(root: &Path, inventory: Box<dyn GpuInventory + Send + Sync>) -> io::Result<Jobs> {
        let store = store::Store::open(&root.join("jobs"))?;
        let cache_dir = root.join("cache");
        fs::create_dir_all(&cache_dir)?;
        let (gpus, gpu_note) = match inventory.discover() {
            Ok(g) if g.is_empty() => (g, "no GPUs found".to_string()),
            Ok(g) => (g, String::new()),
            Err(e) => (Vec::new(), e.to_string()),
        };
        let records = store.load_all()?;
        let mut inner = Inner {
            next_id: records.keys().next_back().map_or(1, |k| k + 1),
            holder: vec![None; gpus.len()],
            ..Default::default()
        };
        for (&id, r) in &records {
            if !is_terminal(state_of(r)) && is_kernel(r) {
                inner.holds.insert(id, (0, Instant::now()));
            }
            if matches!(state_of(r), JobState::Setup | JobState::Running) {
                for g in &r.info.as_ref().expect("info").gpus {
                    if let Some(pos) = gpus.iter().position(|x| x.index == *g) {
                        inner.holder[pos] = Some(id);
                    }
                }
            }
        }
        inner.records = records;
        // Spares of an earlier agent: their mirror may have changed since.
        let old_spares: Vec<PathBuf> = fs::read_dir(root.join("jobs"))?
            .flatten()
            .filter(|e| e.file_name().to_string_lossy().starts_with(SPARE_PREFIX))
            .map(|e| e.path())
            .collect();
        store::delete_in_background(old_spares);
        Ok(Jobs {
            store,
            cache_dir,
            shim_exe: std::env::current_exe()?,
            gpus,
            gpu_note,
            inventory,
            inner: Mutex::new(inner),
            mirrors_dir: root.join("mirrors"),
            spares: Default::default(),
            submitted_to: Default::default(),
            spare_seq: AtomicU64::new(0),
            hostname: nix::unistd::gethostname()
                .map(|h| h.to_string_lossy().into_owned())
                .unwrap_or_default(),
            wake: Arc::default(),
        })
    }

    fn lock(&self) -> Result<std::sync::MutexGuard<'_, Inner>, Status> {
        self.inner
            .lock()
            .map_err(|_| Status::internal("job table poisoned"))
    }

    /// Has the poller look at the jobs now rather than at its next tick.
    pub fn wake(&self) {
        self.wake.wake();
    }

    pub fn job_dir(&self, id: u64) -> PathBuf {
        self.store.job_dir(id)
    }

    fn save(&self, id: u64, r: &JobRecord) {
        if let Err(e) = self.store.save(id, r) {
            tracing::error!(job = id, error = %e, "cannot persist job record");
        }
    }

    /// Refuses a job asking for more GPUs than this agent has, saying how
    /// many it has.
    pub fn check_gpus(&self, gpus: u32) -> Result<(), Status> {
        if gpus as usize <= self.gpus.len() {
            return Ok(());
        }
        let have = match self.gpus.first() {
            None => format!(
                "this agent has no GPUs ({})",
                if self.gpu_note.is_empty() {
                    "none found"
                } else {
                    &self.gpu_note
                }
            ),
            Some(g) => format!("this agent has {} ({})", self.gpus.len(), g.name),
        };
        Err(Status::failed_precondition(format!(
            "the job asks for {gpus} GPU(s) but {have}; lower resources.gpus"
        )))
    }

    /// The relink queue of `mirror` once jobs were submitted against it
    /// (see [`crate::mirror::Mirror::relinks`]).
    pub(crate) fn relinks_of(&self, mirror: &str) -> Option<RelinkQueue> {
        self.submitted_to
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(mirror)
            .cloned()
    }

    /// Where `mirror` lives.
    pub(crate) fn mirror_root(&self, mirror: &str) -> PathBuf {
        self.mirrors_dir.join(mirror)
    }

    /// How many GPUs jobs can be given.
    pub fn gpu_count(&self) -> usize {
        self.gpus.len()
    }

    /// The checks of a job spec that need no mirror: a command, GPUs that
    /// exist, relative paths. Returns the workdir.
    pub fn check_spec(&self, spec: &v1::JobSpec) -> Result<Option<RelPath>, Status> {
        if spec.run.trim().is_empty() {
            return Err(Status::invalid_argument("the job's `run` command is empty"));
        }
        match spec.placement.as_str() {
            "" => {
                self.check_gpus(spec.gpus)?;
                if !spec.image.is_empty() {
                    container::plan(&spec.image)?;
                }
            }
            crate::cluster::CLUSTER => check_cluster(spec)?,
            other => {
                return Err(Status::invalid_argument(format!(
                    "placement {other:?}: use \"\" (this agent) or \"cluster\""
                )));
            }
        }
        let workdir = rel(&spec.workdir, "workdir")?;
        if let Some(p) = &spec.python {
            rel(&p.file, "python file")?;
        }
        for i in &spec.setup_inputs {
            rel(i, "setup input")?;
        }
        if spec.live && !spec.outputs.is_empty() {
            return Err(Status::invalid_argument(
                "a live job runs in the mirror and has no outputs: drop its [outputs] (or run it in a snapshot)",
            ));
        }
        for o in &spec.outputs {
            if rel(o, "output path")?.is_none() {
                return Err(Status::invalid_argument(
                    "an output path must name something inside the workdir, not the workdir itself",
                ));
            }
        }
        Ok(workdir)
    }

    /// Locks the agent state and checks that `mirror` is open, at
    /// `generation`, and holds what `spec` needs (its workdir, its Python
    /// environment file).
    pub(crate) fn at_generation<'a>(
        state: &'a Mutex<State>,
        mirror: &str,
        generation: &str,
        spec: &v1::JobSpec,
        workdir: Option<&RelPath>,
    ) -> Result<std::sync::MutexGuard<'a, State>, Status> {
        let mut st = state
            .lock()
            .map_err(|_| Status::internal("agent state poisoned"))?;
        let m = st.mirrors.get_mut(mirror).ok_or_else(|| {
            Status::failed_precondition(format!("mirror {mirror:?} is not open: call Hello first"))
        })?;
        let root = bridge_proto::tree::hex(&m.tree.root());
        if root != generation {
            return Err(Status::failed_precondition(format!(
                "the mirror is at generation {root}, not {generation}: sync again and resubmit"
            )));
        }
        if let Some(w) = workdir
            && !m.tree.is_dir(w)
        {
            return Err(Status::invalid_argument(format!(
                "workdir {w:?} is not a directory in the synced tree"
            )));
        }
        if let Some(p) = &spec.python
            && let Some(f) = rel(&p.file, "python file")?
            && !matches!(m.tree.get(&f), Some(bridge_proto::tree::Node::File { .. }))
        {
            return Err(Status::invalid_argument(format!(
                "python environment file {f:?} is not in the synced tree (is it ignored?)"
            )));
        }
        Ok(st)
    }

    /// Takes a snapshot of `mirror` at `generation` into `dir` (`tree/` and
    /// `snapshot.index`) for something other than one job: a sweep's trials
    /// are made from it ([`Jobs::submit_from`]).
    pub(crate) fn snapshot_generation(
        &self,
        state: &Mutex<State>,
        mirror: &str,
        generation: &str,
        spec: &v1::JobSpec,
        dir: &Path,
    ) -> Result<PathBuf, Status> {
        let workdir = self.check_spec(spec)?;
        let st = Self::at_generation(state, mirror, generation, spec, workdir.as_ref())?;
        self.snapshot(0, dir, mirror, st)
    }

    fn next_id(&self) -> Result<u64, Status> {
        let mut inner = self.lock()?;
        let id = inner.next_id;
        inner.next_id += 1;
        Ok(id)
    }

    /// Queues a job against `generation` of a mirror, snapshotting it under
    /// the state lock (so no sync round can slip in between).
    pub fn submit(&self, state: &Mutex<State>, req: v1::SubmitRequest) -> Result<JobInfo, Status> {
        let mut spec = req
            .spec
            .ok_or_else(|| Status::invalid_argument("submit without a job spec"))?;
        // A kernel's key goes into its connection file only.
        let kernel_key = match spec.kernel.as_mut() {
            Some(k) => {
                if k.signature_scheme.is_empty() {
                    k.signature_scheme = "hmac-sha256".into();
                }
                if !crate::kernel::valid_scheme(&k.signature_scheme) {
                    return Err(Status::invalid_argument(format!(
                        "{:?} is not a Jupyter signature scheme (hmac-sha256, …)",
                        k.signature_scheme
                    )));
                }
                spec.live = true;
                if spec.run.trim().is_empty() {
                    spec.run = "python -m ipykernel_launcher".into();
                }
                Some(std::mem::take(&mut k.key))
            }
            None => None,
        };
        // A sweep's trials are submitted by the agent itself.
        spec.trial = None;
        let workdir = self.check_spec(&spec)?;
        let st = Self::at_generation(state, &req.mirror, &req.generation, &spec, workdir.as_ref())?;
        let id = self.next_id()?;
        let dir = self.job_dir(id);
        let tree_path = if spec.live {
            // A live job runs in the mirror itself: no snapshot, no spare.
            fs::create_dir_all(&dir)
                .map_err(|e| Status::internal(format!("cannot create {}: {e}", dir.display())))?;
            drop(st);
            if let (Some(key), Some(k)) = (&kernel_key, &spec.kernel) {
                crate::kernel::write_connection_file(&dir, key, &k.signature_scheme).map_err(
                    |e| Status::internal(format!("cannot write the kernel's connection file: {e}")),
                )?;
            }
            self.mirrors_dir.join(&req.mirror)
        } else {
            self.snapshot(id, &dir, &req.mirror, st)?
        };
        self.enqueue(
            id,
            spec,
            req.mirror,
            req.generation,
            tree_path,
            kernel_key.is_some(),
        )
    }

    /// Queues a trial of a sweep: a job whose tree is made of links to the
    /// sweep's snapshot `base` (a directory holding `tree/` and
    /// `snapshot.index`, taken at `generation`) rather than to the mirror,
    /// which may have moved on since.
    pub fn submit_from(
        &self,
        mirror: &str,
        generation: &str,
        base: &Path,
        spec: v1::JobSpec,
    ) -> Result<JobInfo, Status> {
        self.check_spec(&spec)?;
        let id = self.next_id()?;
        let dir = self.job_dir(id);
        let relinks = self.relinks_of(mirror);
        let taken = fs::create_dir_all(&dir).and_then(|()| {
            snapshot::take_from(
                &base.join("tree"),
                &base.join("snapshot.index"),
                &dir.join("tree"),
                &dir.join("snapshot.index"),
                &self.mirrors_dir.join(mirror),
                relinks.as_ref(),
            )
        });
        let taken = taken.map_err(|e| {
            let _ = fs::remove_dir_all(&dir);
            Status::internal(format!(
                "cannot make job {id}'s tree from the sweep's snapshot: {e}"
            ))
        })?;
        tracing::debug!(job = id, files = taken.files, "trial tree made");
        self.enqueue(
            id,
            spec,
            mirror.to_string(),
            generation.to_string(),
            dir.join("tree"),
            false,
        )
    }

    /// Records a new job whose tree is ready and starts it when it can.
    fn enqueue(
        &self,
        id: u64,
        spec: v1::JobSpec,
        mirror: String,
        generation: String,
        tree_path: PathBuf,
        kernel: bool,
    ) -> Result<JobInfo, Status> {
        let info = JobInfo {
            id: id.to_string(),
            name: if spec.name.is_empty() {
                format!("job-{id}")
            } else {
                spec.name.clone()
            },
            state: JobState::Queued as i32,
            mirror,
            generation,
            submitted_ms: now_ms(),
            spec: Some(spec),
            tree_path: tree_path.display().to_string(),
            ..Default::default()
        };
        let rec = JobRecord {
            info: Some(info.clone()),
            ..Default::default()
        };
        let t = std::time::Instant::now();
        self.save(id, &rec);
        tracing::debug!(ms = t.elapsed().as_secs_f64() * 1e3, "job record saved");
        {
            let mut inner = self.lock()?;
            if kernel {
                inner.holds.insert(id, (0, Instant::now()));
            }
            inner.records.insert(id, rec);
        }
        self.schedule();
        self.get(&info.id)
    }

    /// Holds kernel `id` until the guard is dropped (`Jobs.Hold`).
    pub fn hold(self: &Arc<Self>, id: &str) -> Result<HoldGuard, Status> {
        let n = parse_id(id)?;
        let mut inner = self.lock()?;
        let rec = inner.records.get(&n).ok_or_else(|| not_found(n))?;
        if !is_kernel(rec) {
            return Err(Status::invalid_argument(format!("job {n} is not a kernel")));
        }
        let h = inner.holds.entry(n).or_insert((0, Instant::now()));
        h.0 += 1;
        Ok(HoldGuard {
            jobs: self.clone(),
            id: n,
        })
    }

    /// The ports kernel `id` has bound on 127.0.0.1, once it has.
    pub fn kernel_ports(&self, id: u64) -> Option<Vec<u32>> {
        crate::kernel::bound_ports(&self.job_dir(id))
    }

    /// Cancels kernels no daemon has held for their grace period.
    fn reap_orphans(&self, inner: &mut Inner) -> Vec<u64> {
        let now = Instant::now();
        let mut due = Vec::new();
        for (&id, &(count, since)) in &inner.holds {
            let Some(rec) = inner.records.get(&id) else {
                continue;
            };
            let grace = rec
                .info
                .as_ref()
                .and_then(|i| i.spec.as_ref())
                .and_then(|s| s.kernel.as_ref())
                .map(|k| k.orphan_grace_s)
                .filter(|&s| s > 0)
                .map_or(ORPHAN_GRACE, |s| Duration::from_secs(u64::from(s)));
            if count == 0 && now.duration_since(since) >= grace && !is_terminal(state_of(rec)) {
                due.push(id);
            }
        }
        inner.holds.retain(|id, _| {
            inner
                .records
                .get(id)
                .is_some_and(|r| !is_terminal(state_of(r)))
        });
        due
    }

    /// SIGINT to a running job's process group.
    pub fn interrupt(&self, id: &str) -> Result<JobInfo, Status> {
        let n = parse_id(id)?;
        {
            let inner = self.lock()?;
            let rec = inner.records.get(&n).ok_or_else(|| not_found(n))?;
            if state_of(rec) != JobState::Running {
                return Err(Status::failed_precondition(format!(
                    "job {n} is {}, not running; nothing to interrupt",
                    state_name(state_of(rec))
                )));
            }
            let child = read_json::<ShimState>(&self.job_dir(n).join("state.json"))
                .and_then(|s| s.child_pid)
                .ok_or_else(|| {
                    Status::unavailable(format!("job {n}'s process is not started yet"))
                })?;
            killpg(Pid::from_raw(child as i32), Signal::SIGINT)
                .map_err(|e| Status::internal(format!("cannot signal job {n}: {e}")))?;
        }
        self.get(id)
    }

    /// Starts every queued job that can run: CPU-only jobs at once, GPU jobs
    /// in submission order while enough GPUs are free (the first GPU job that
    /// does not fit holds back the ones behind it, so none starves).
    pub fn schedule(&self) {
        let Ok(mut inner) = self.inner.lock() else {
            return;
        };
        let queued: Vec<u64> = inner
            .records
            .iter()
            .filter(|(_, r)| state_of(r) == JobState::Queued)
            .map(|(&id, _)| id)
            .collect();
        let mut gpu_blocked = false;
        for id in queued {
            if inner.repairs.contains_key(&id) {
                continue;
            }
            // A cluster job's GPUs are its pod's, counted by Kubernetes.
            let want = inner.records[&id]
                .info
                .as_ref()
                .and_then(|i| i.spec.as_ref())
                .filter(|s| s.placement != crate::cluster::CLUSTER)
                .map_or(0, |s| s.gpus) as usize;
            let mut gpus = Vec::new();
            if want > 0 {
                if gpu_blocked {
                    continue;
                }
                let free: Vec<usize> = (0..inner.holder.len())
                    .filter(|&i| inner.holder[i].is_none())
                    .collect();
                if free.len() < want {
                    gpu_blocked = true;
                    continue;
                }
                for &pos in &free[..want] {
                    inner.holder[pos] = Some(id);
                    gpus.push(self.gpus[pos].index);
                }
            }
            if let Err(e) = self.start(&mut inner, id, gpus) {
                tracing::error!(job = id, error = %e, "cannot start job");
                self.finish(
                    &mut inner,
                    id,
                    JobState::Failed,
                    None,
                    format!("bridge could not start the job: {e}"),
                );
            }
        }
    }

    /// Marks a job ended and frees its GPUs.
    fn finish(
        &self,
        inner: &mut Inner,
        id: u64,
        state: JobState,
        code: Option<i32>,
        reason: String,
    ) {
        for h in inner.holder.iter_mut() {
            if *h == Some(id) {
                *h = None;
            }
        }
        inner.kill_at.remove(&id);
        let Some(rec) = inner.records.get_mut(&id) else {
            return;
        };
        let info = rec.info.as_mut().expect("info");
        info.set_state(state);
        info.exit_code = code;
        info.reason = reason;
        info.finished_ms = now_ms();
        let rec = rec.clone();
        self.save(id, &rec);
        tracing::info!(job = id, state = ?state, code, "job ended");
    }

    /// Looks at every active job's shim files: phase changes, exits, shims
    /// that vanished, cancel deadlines. Then starts what can start.
    /// Returns the mirror files jobs that ended wrote in place (by mirror),
    /// for the other snapshots that share them (a sweep's).
    pub fn poll(&self, state: &Mutex<State>) -> Vec<(String, Vec<snapshot::Damage>)> {
        let mut ended_any = false;
        // Mirror repairs wait until the job table is unlocked: the lock order
        // is the agent state first, then the job table.
        let mut damaged: Vec<(String, Vec<snapshot::Damage>)> = Vec::new();
        let orphans;
        {
            let Ok(mut inner) = self.inner.lock() else {
                return Vec::new();
            };
            let active: Vec<u64> = inner
                .records
                .iter()
                .filter(|(_, r)| matches!(state_of(r), JobState::Setup | JobState::Running))
                .map(|(&id, _)| id)
                .collect();
            for id in active {
                let dir = self.job_dir(id);
                if let Some(exit) = read_json::<ShimExit>(&dir.join("exit.json")) {
                    let rec = inner.records.get_mut(&id).expect("active");
                    let cancelled = rec.cancel_requested;
                    let code = exit.code.or(exit.signal.map(|s| 128 + s));
                    let end = if cancelled {
                        JobState::Cancelled
                    } else if exit.phase == Phase::Running && code == Some(0) {
                        JobState::Succeeded
                    } else {
                        JobState::Failed
                    };
                    let changed = if is_live(rec) {
                        Vec::new()
                    } else {
                        snapshot::modified_in_place(&dir.join("tree"), &dir.join("snapshot.index"))
                    };
                    if !changed.is_empty() {
                        let info = rec.info.as_mut().expect("info");
                        let names: Vec<String> =
                            changed.iter().map(|d| d.path.to_string()).collect();
                        let line = format!(
                            "bridge: this job wrote into {} in place; the agent's mirror and queued \
                             jobs shared {} and are being repaired\n",
                            names.join(", "),
                            if names.len() == 1 { "it" } else { "them" }
                        );
                        if let Ok(w) = LogWriter::open(&dir.join("log")) {
                            let _ = w.write(3, line.as_bytes());
                        }
                        info.modified_in_place = names;
                        // Queued snapshots that share a damaged inode wait
                        // for their copy to be restored.
                        let queued: Vec<u64> = inner
                            .records
                            .iter()
                            .filter(|(_, r)| state_of(r) == JobState::Queued)
                            .map(|(&q, _)| q)
                            .collect();
                        for q in queued {
                            let qd = self.job_dir(q);
                            let hit = snapshot::affected(
                                &qd.join("tree"),
                                &qd.join("snapshot.index"),
                                &changed,
                            );
                            if !hit.is_empty() {
                                tracing::warn!(
                                    job = q,
                                    damaged_by = id,
                                    files = hit.len(),
                                    "queued snapshot shares files written in place"
                                );
                                inner
                                    .repairs
                                    .entry(q)
                                    .or_insert_with(|| (Vec::new(), Instant::now()))
                                    .0
                                    .extend(hit);
                            }
                        }
                        let mirror = inner.records[&id]
                            .info
                            .as_ref()
                            .map(|i| i.mirror.clone())
                            .unwrap_or_default();
                        damaged.push((mirror, changed));
                    }
                    if let Some(m) =
                        read_json::<HashMap<String, f64>>(&dir.join(crate::shim::METRICS_FILE))
                        && let Some(info) = inner.records.get_mut(&id).and_then(|r| r.info.as_mut())
                    {
                        info.metrics = m;
                    }
                    self.finish(&mut inner, id, end, code, exit.reason.clone());
                    ended_any = true;
                    continue;
                }
                let rec = inner.records.get_mut(&id).expect("active");
                if let Some(s) = read_json::<ShimState>(&dir.join("state.json")) {
                    let info = rec.info.as_mut().expect("info");
                    if (s.phase == Phase::Running && info.state() == JobState::Setup)
                        || s.restarts != info.restarts
                    {
                        if s.phase == Phase::Running {
                            info.set_state(JobState::Running);
                        }
                        info.restarts = s.restarts;
                        let rec = rec.clone();
                        self.save(id, &rec);
                    }
                    if let Some(deadline) = inner.kill_at.get(&id)
                        && Instant::now() >= *deadline
                        && let Some(child) = s.child_pid
                    {
                        let _ = killpg(Pid::from_raw(child as i32), Signal::SIGKILL);
                    }
                }
                let rec = &inner.records[&id];
                if start_ticks(rec.shim_pid) != Some(rec.shim_start_ticks) || rec.shim_pid == 0 {
                    // Look once more: the shim may have written exit.json and
                    // exited since the first look.
                    if dir.join("exit.json").exists() {
                        continue;
                    }
                    // A container that never ran (an image that cannot be
                    // pulled, an engine refusing) said why in shim.log.
                    let image = rec
                        .info
                        .as_ref()
                        .and_then(|i| i.spec.as_ref())
                        .map(|s| s.image.clone())
                        .unwrap_or_default();
                    let (state, reason) = match (image.is_empty(), shim_log_tail(&dir)) {
                        (false, Some(tail)) => (
                            JobState::Failed,
                            format!("the container of image {image:?} did not run: {tail}"),
                        ),
                        _ => (
                            JobState::Lost,
                            "the job's supervisor process vanished (killed, or the machine restarted)"
                                .to_string(),
                        ),
                    };
                    if !image.is_empty()
                        && let Ok(Some(engine)) = container::plan(&image)
                    {
                        container::remove(&engine, &dir);
                    }
                    if state == JobState::Failed
                        && let Ok(w) = LogWriter::open(&dir.join("log"))
                    {
                        let _ = w.write(3, format!("bridge: {reason}\n").as_bytes());
                    }
                    self.finish(&mut inner, id, state, None, reason);
                    ended_any = true;
                }
            }
            if ended_any {
                self.prune_trees(&mut inner);
            }
            orphans = self.reap_orphans(&mut inner);
        }
        for id in orphans {
            tracing::info!(
                job = id,
                "no daemon came back for the kernel within its grace period: cancelling it"
            );
            let _ = self.cancel(&id.to_string());
        }
        for (mirror, changed) in &damaged {
            let paths: Vec<RelPath> = changed.iter().map(|d| d.path.clone()).collect();
            repair_mirror(state, mirror, &paths);
        }
        let restored = self.restore_snapshots(state);
        if ended_any || restored {
            self.schedule();
        }
        self.build_spares(state);
        damaged
    }

    /// Rewrites queued snapshots' copies of files another job wrote in
    /// place, from the chunk store; a job whose copy cannot be restored in
    /// [`RESTORE_WAIT`] fails with the reason. True when a job was released.
    fn restore_snapshots(&self, state: &Mutex<State>) -> bool {
        let pending: Vec<(u64, Vec<Restore>, Instant)> = match self.inner.lock() {
            Ok(inner) if !inner.repairs.is_empty() => inner
                .repairs
                .iter()
                .map(|(&id, (files, since))| (id, files.clone(), *since))
                .collect(),
            _ => return false,
        };
        let mut outcome = Vec::new();
        if let Ok(mut st) = state.lock() {
            for (id, files, since) in pending {
                let tree = self.job_dir(id).join("tree");
                let left: Vec<_> = files
                    .into_iter()
                    .filter(|(p, c)| !matches!(snapshot::restore(&mut st, &tree, p, c), Ok(true)))
                    .collect();
                outcome.push((id, left, since));
            }
        }
        let Ok(mut inner) = self.inner.lock() else {
            return false;
        };
        let mut released = false;
        for (id, left, since) in outcome {
            if left.is_empty() {
                inner.repairs.remove(&id);
                tracing::info!(job = id, "queued snapshot restored");
                released = true;
            } else if since.elapsed() > RESTORE_WAIT {
                inner.repairs.remove(&id);
                let names: Vec<String> = left.iter().map(|(p, _)| p.to_string()).collect();
                self.finish(
                    &mut inner,
                    id,
                    JobState::Failed,
                    None,
                    format!(
                        "another job wrote in place into {} which this job's snapshot shared, and \
                         the original content could not be restored; resubmit",
                        names.join(", ")
                    ),
                );
                released = true;
            } else if let Some(r) = inner.repairs.get_mut(&id) {
                r.0 = left;
            }
        }
        released
    }

    /// Keeps the trees of the newest [`KEEP_TREES`] finished jobs (and of
    /// older ones whose outputs are not home yet, for [`UNPULLED_KEEP`]). An old
    /// tree is renamed aside here and deleted on a thread of its own: deleting
    /// a snapshot of a 20,000-file repository took seconds on a slow disk,
    /// and this runs under the job table's lock, which `bridge run` waits on.
    fn prune_trees(&self, inner: &mut Inner) {
        let finished: Vec<u64> = inner
            .records
            .iter()
            .filter(|(_, r)| is_terminal(state_of(r)))
            .map(|(&id, _)| id)
            .collect();
        if finished.len() <= KEEP_TREES {
            return;
        }
        let queues = self.submitted_to.lock().unwrap_or_else(|e| e.into_inner());
        let mut doomed = Vec::new();
        let now = now_ms();
        for id in &finished[..finished.len() - KEEP_TREES] {
            if inner.trees_gone.contains(id) {
                continue;
            }
            // Outputs not home yet (a sweep's trials end faster than a
            // laptop that is away pulls them) keep their tree a while.
            let waiting = inner.records[id].info.as_ref().is_some_and(|i| {
                !i.outputs_pulled
                    && i.spec.as_ref().is_some_and(|s| !s.outputs.is_empty())
                    && now.saturating_sub(i.finished_ms) < UNPULLED_KEEP.as_millis() as u64
            });
            if waiting {
                continue;
            }
            inner.trees_gone.insert(*id);
            let tree = self.job_dir(*id).join("tree");
            let aside = self.job_dir(*id).join(store::DELETING);
            if tree.exists() && fs::rename(&tree, &aside).is_ok() {
                let mirror = inner.records[id]
                    .info
                    .as_ref()
                    .map(|i| i.mirror.clone())
                    .unwrap_or_default();
                // The unlinks move the ctime of the mirror inodes the tree
                // shared: say so to the mirror as they happen.
                doomed.push((
                    aside,
                    self.job_dir(*id).join("snapshot.index"),
                    self.mirrors_dir.join(&mirror),
                    queues.get(&mirror).cloned(),
                ));
            }
            inner.outputs.remove(id);
        }
        if doomed.is_empty() {
            return;
        }
        let spawned = crate::background::spawn("tree-delete", move || {
            for (tree, manifest, root, relinks) in doomed {
                let done = match &relinks {
                    Some(q) => snapshot::delete_relinking(&tree, &manifest, &root, q),
                    None => fs::remove_dir_all(&tree),
                };
                if let Err(e) = done {
                    tracing::warn!(dir = %tree.display(), error = %e, "cannot delete an old job tree");
                }
            }
        });
        if let Err(e) = spawned {
            tracing::warn!(error = %e, "cannot start a thread to delete old job trees");
        }
    }

    pub fn get(&self, id: &str) -> Result<JobInfo, Status> {
        let id = parse_id(id)?;
        let inner = self.lock()?;
        let rec = inner.records.get(&id).ok_or_else(|| not_found(id))?;
        let mut info = rec.info.clone().unwrap_or_default();
        info.log_bytes = fs::metadata(self.job_dir(id).join("log")).map_or(0, |m| m.len());
        Ok(info)
    }

    /// Jobs of `mirror` (every mirror when empty), oldest first: active
    /// ones, and with `all` finished ones too — with `unsettled` only those
    /// whose outputs are not pulled or that wrote in place.
    pub fn list(&self, mirror: &str, all: bool, unsettled: bool) -> Result<Vec<JobInfo>, Status> {
        let inner = self.lock()?;
        let wanted = |i: &JobInfo| {
            if !is_terminal(i.state()) {
                return true;
            }
            if !all {
                return false;
            }
            !unsettled
                || !i.modified_in_place.is_empty()
                || (!i.outputs_pulled && i.spec.as_ref().is_some_and(|s| !s.outputs.is_empty()))
        };
        Ok(inner
            .records
            .values()
            .filter_map(|r| r.info.as_ref())
            .filter(|i| mirror.is_empty() || i.mirror == mirror)
            .filter(|i| wanted(i))
            .cloned()
            .collect())
    }

    /// Cancels a job: a queued one never starts; a running one gets SIGTERM
    /// (its whole process group) and SIGKILL after [`GRACE`].
    pub fn cancel(&self, id: &str) -> Result<JobInfo, Status> {
        let n = parse_id(id)?;
        {
            let mut inner = self.lock()?;
            let rec = inner.records.get_mut(&n).ok_or_else(|| not_found(n))?;
            let st = state_of(rec);
            if is_terminal(st) {
                return Err(Status::failed_precondition(format!(
                    "job {n} has already ended ({}); nothing to cancel",
                    state_name(st)
                )));
            }
            rec.cancel_requested = true;
            let rec = rec.clone();
            self.save(n, &rec);
            if st == JobState::Queued {
                self.finish(
                    &mut inner,
                    n,
                    JobState::Cancelled,
                    None,
                    "cancelled before it started".into(),
                );
            } else {
                let dir = self.job_dir(n);
                let _ = fs::write(dir.join("cancel"), b"");
                if let Some(s) = read_json::<ShimState>(&dir.join("state.json"))
                    && let Some(child) = s.child_pid
                {
                    let _ = killpg(Pid::from_raw(child as i32), Signal::SIGTERM);
                }
                let grace = grace_of(&rec);
                inner.kill_at.insert(n, Instant::now() + grace);
            }
        }
        self.schedule();
        self.get(id)
    }

    pub fn mark_pulled(&self, id: &str) -> Result<JobInfo, Status> {
        let n = parse_id(id)?;
        {
            let mut inner = self.lock()?;
            let rec = inner.records.get_mut(&n).ok_or_else(|| not_found(n))?;
            if let Some(i) = rec.info.as_mut() {
                i.outputs_pulled = true;
            }
            let rec = rec.clone();
            self.save(n, &rec);
        }
        self.get(id)
    }

    /// The job's output manifest (see [`outputs`]); `defer`: files not
    /// hashed yet are listed unhashed, for [`Jobs::read_whole`].
    pub fn outputs(&self, id: &str, defer: bool) -> Result<v1::OutputManifest, Status> {
        let n = parse_id(id)?;
        let (info, cwd, declared) = self.output_scope(n)?;
        let complete = is_terminal(info.state());
        let mut cache = self.lock()?.outputs.remove(&n).unwrap_or_default();
        let t0 = std::time::Instant::now();
        let entries = cache.manifest(&cwd, &declared, complete, defer);
        tracing::debug!(
            job = n,
            complete,
            entries = entries.len(),
            ms = t0.elapsed().as_millis() as u64,
            "output manifest"
        );
        self.lock()?.outputs.insert(n, cache);
        Ok(v1::OutputManifest {
            entries,
            complete,
            job: Some(info),
        })
    }

    pub fn read_chunks(&self, req: &v1::ReadChunksRequest) -> Result<Vec<(u32, Vec<u8>)>, Status> {
        let n = parse_id(&req.id)?;
        let (_, cwd, _) = self.output_scope(n)?;
        let inner = self.lock()?;
        let cache = inner
            .outputs
            .get(&n)
            .ok_or_else(|| Status::aborted("ask for the output manifest first"))?;
        cache
            .read_chunks(&cwd, &req.path, &req.hash, &req.indexes)
            .map_err(|e| Status::aborted(e.to_string()))
    }

    /// Streams an output file the last manifest listed unhashed, read once
    /// (see [`outputs::read_whole`]), and caches its chunk list. `send`
    /// returns false when the reader went away.
    pub fn read_whole(
        &self,
        req: &v1::ReadChunksRequest,
        send: impl FnMut(v1::ChunkBody) -> bool,
    ) -> Result<(), Status> {
        let n = parse_id(&req.id)?;
        let (_, cwd, _) = self.output_scope(n)?;
        let listed = self
            .lock()?
            .outputs
            .get(&n)
            .is_some_and(|o| o.deferred(&req.path));
        if !listed {
            return Err(Status::aborted(format!(
                "{} was not listed unhashed; ask for the output manifest again",
                req.path
            )));
        }
        let have: HashSet<blake3::Hash> = req
            .have
            .iter()
            .filter_map(|b| bridge_proto::chunking::hash_from_bytes(b))
            .collect();
        let t0 = std::time::Instant::now();
        let read = outputs::read_whole(&cwd, &req.path, &have, send)
            .map_err(|e| Status::aborted(format!("{}: {e}", req.path)))?;
        if let Some(c) = read {
            tracing::debug!(job = n, path = %req.path, bytes = c.size, ms = t0.elapsed().as_millis() as u64, "output file read whole");
            if let Some(o) = self.lock()?.outputs.get_mut(&n) {
                o.remember(&req.path, c);
            }
        }
        Ok(())
    }

    fn output_scope(&self, n: u64) -> Result<(JobInfo, PathBuf, Vec<String>), Status> {
        let info = self.get(&n.to_string())?;
        let spec = info.spec.clone().unwrap_or_default();
        let tree = self.job_dir(n).join("tree");
        if !tree.exists() {
            return Err(Status::not_found(format!(
                "the outputs of job {n} are no longer on the agent (it keeps the trees of the \
                 {KEEP_TREES} most recent finished jobs)"
            )));
        }
        let w = spec.workdir.trim_matches('/');
        let cwd = if w.is_empty() || w == "." {
            tree
        } else {
            tree.join(w)
        };
        Ok((info, cwd, spec.outputs))
    }

    pub fn log_path(&self, id: u64) -> PathBuf {
        self.job_dir(id).join("log")
    }

    /// Jobs queued, in setup or running: what holds the machine against the
    /// idle autostop. One pass over the table, no disk access. Live jobs are
    /// left out: a live service neither holds the machine awake on its own
    /// (it serves the laptop, whose attached daemon does) nor holds a
    /// snapshot whose hard links could change mirror files unseen.
    pub fn active(&self) -> u32 {
        let Ok(inner) = self.inner.lock() else {
            // A poisoned table: count the machine as busy rather than stop it.
            return 1;
        };
        inner
            .records
            .values()
            .filter(|r| {
                matches!(
                    state_of(r),
                    JobState::Queued | JobState::Setup | JobState::Running
                ) && !is_live(r)
            })
            .count() as u32
    }

    /// Whether job `id` has ended (its log is complete).
    pub fn ended(&self, id: u64) -> Result<bool, Status> {
        let inner = self.lock()?;
        let rec = inner.records.get(&id).ok_or_else(|| not_found(id))?;
        Ok(is_terminal(state_of(rec)))
    }

    pub fn parse_id(id: &str) -> Result<u64, Status> {
        parse_id(id)
    }

    /// The GPUs with live memory and utilisation, and who holds each.
    pub fn gpus(&self) -> v1::GpuList {
        let live = self.inventory.discover().unwrap_or_default();
        let inner = self.inner.lock().ok();
        let gpus = self
            .gpus
            .iter()
            .enumerate()
            .map(|(pos, g)| {
                let l = live.iter().find(|x| x.index == g.index).unwrap_or(g);
                v1::Gpu {
                    index: g.index,
                    name: g.name.clone(),
                    memory_total_mib: l.memory_total_mib,
                    memory_used_mib: l.memory_used_mib,
                    utilization_pct: l.utilization_pct,
                    job: inner
                        .as_ref()
                        .and_then(|i| i.holder.get(pos).copied().flatten())
                        .map(|j| j.to_string())
                        .unwrap_or_default(),
                }
            })
            .collect();
        v1::GpuList {
            gpus,
            note: self.gpu_note.clone(),
        }
    }
}

impl crate::idle::Activity for Jobs {
    fn jobs_active(&self) -> u32 {
        self.active()
    }
}

/// A job wrote into files it shared with `mirror`: rehash them, so the
/// mirror's root shows the damage and the daemon's next verification sends
/// the content again.
fn repair_mirror(state: &Mutex<State>, mirror: &str, paths: &[RelPath]) {
    let Ok(mut st) = state.lock() else { return };
    let State { store, mirrors } = &mut *st;
    if let Some(m) = mirrors.get_mut(mirror) {
        m.distrust(paths);
        if let Err(e) = m.refresh(store) {
            tracing::warn!(error = %e, "cannot refresh the mirror after an in-place write");
        }
    }
}

/// Runs [`Jobs::poll`], then `after` with the damage it reported (the
/// sweeps' turn), every [`POLL`] or sooner when woken, until `stop` is set.
pub fn spawn_poller(
    jobs: Arc<Jobs>,
    state: Arc<Mutex<State>>,
    stop: Arc<AtomicBool>,
    after: impl Fn(&Mutex<State>, &[(String, Vec<snapshot::Damage>)]) + Send + 'static,
) -> std::thread::JoinHandle<()> {
    std::thread::Builder::new()
        .name("job-poller".into())
        .spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                let damaged = jobs.poll(&state);
                after(&state, &damaged);
                jobs.wake.wait(POLL);
            }
        })
        .expect("spawn job poller")
}

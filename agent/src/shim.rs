//! The job shim: `bridge-agent shim JOB_DIR`, one small supervisor process per
//! job (like containerd-shim or conmon).
//!
//! The agent writes `spec.json` ([`ShimSpec`]) into the job directory and
//! spawns the shim in a process group of its own. From then on the job does
//! not depend on the agent: the shim builds or reuses the Python env, runs the
//! setup, runs the command, appends all output to `log` ([`crate::joblog`])
//! and records the end in `exit.json` ([`ShimExit`]). Everything is a plain
//! file in the job directory, so an agent that restarts picks the job up where
//! it is.
//!
//! Files the shim writes:
//! - `state.json` ([`ShimState`], atomic): the current step's process (leader
//!   of its own process group, which the agent signals to cancel).
//! - `log`: framed records, appended as output arrives.
//! - `metrics.json` ([`METRICS_FILE`]), when the command printed
//!   `BRIDGE_METRIC` lines ([`metrics`]).
//! - `exit.json` ([`ShimExit`], atomic), last, after the log is synced: its
//!   presence means the job is over and the log complete.
//!
//! Cancellation: the agent creates `cancel` and then signals the step's group.
//! The shim looks for `cancel` before and after each step; a SIGTERM or SIGINT
//! to the shim itself is turned into the same cancellation.
//!
//! No process outlives its step: the shim is a child subreaper, so daemonized
//! grandchildren are reparented to it, and after each step it stops all its
//! descendants ([`reap`]).

pub mod metrics;
mod reap;
mod step;

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicI32, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use nix::sys::signal::{SigSet, Signal, killpg};
use nix::unistd::Pid;
use serde::{Deserialize, Serialize};

use crate::envcache::{EnvCache, EnvError, Outcome, write_atomic};
use crate::joblog::LogWriter;
use step::Steps;

/// Written by the agent before it spawns the shim.
pub const SPEC_FILE: &str = "spec.json";
pub const STATE_FILE: &str = "state.json";
pub const EXIT_FILE: &str = "exit.json";
pub const LOG_FILE: &str = "log";
/// The last value of each `BRIDGE_METRIC` the command printed ([`metrics`]),
/// written before `exit.json` when there is any.
pub const METRICS_FILE: &str = "metrics.json";
/// Created (empty) by the agent to cancel the job.
pub const CANCEL_FILE: &str = "cancel";
/// The log is written back to disk in the background every this many bytes,
/// so the sync before `exit.json` has little left to do.
const SYNC_BEHIND: u64 = 4 * 1024 * 1024;
/// Kept aside in the job directory while the job runs, freed for its last
/// words (see [`run`]).
const RESERVE_FILE: &str = ".reserve";
const RESERVE_BYTES: usize = 256 * 1024;

/// What to run, written by the agent as `spec.json`.
#[derive(Serialize, Deserialize, Debug, Clone)]
pub struct ShimSpec {
    pub job_id: String,
    /// The job's snapshot of the repository (absolute).
    pub tree: PathBuf,
    /// `tree` + the workdir (absolute).
    pub cwd: PathBuf,
    /// Run with `/bin/sh -c`.
    pub command: String,
    /// Set on top of the shim's inherited environment (BRIDGE_JOB_ID,
    /// CUDA_VISIBLE_DEVICES, the user's `[env]`, …), for every step.
    pub env: BTreeMap<String, String>,
    pub python: Option<PythonSpec>,
    pub setup: Option<SetupSpec>,
    /// Absolute; Python envs and setup markers live under it.
    pub cache_dir: PathBuf,
    /// SIGTERM → SIGKILL grace for processes a step leaves behind.
    pub grace_ms: u64,
    /// A live job: the command runs in the mirror and is started again,
    /// with backoff, whenever it exits non-zero ([`LIVE_BACKOFF`]).
    #[serde(default)]
    pub live: bool,
    /// Start the job's Python under debugpy on 127.0.0.1:port
    /// ([`crate::debugger`]).
    #[serde(default)]
    pub debugpy_port: Option<u16>,
    /// A Jupyter kernel with this connection file ([`crate::kernel`]): the
    /// command is ipykernel's, and it is never restarted.
    #[serde(default)]
    pub kernel: Option<PathBuf>,
    /// `placement = "cluster"`: the main step is `bridge-agent cluster-run`,
    /// which runs the job (its environment, setup and command) in a
    /// Kubernetes Job's pod ([`crate::cluster`]).
    #[serde(default)]
    pub cluster: Option<crate::cluster::ClusterSpec>,
}

/// A live command that failed is started again after 1 s, then twice as
/// long after each failure in a row, at most this long; a run that lasted
/// [`LIVE_HEALTHY`] starts the count again.
pub const LIVE_BACKOFF: Duration = Duration::from_secs(30);
pub const LIVE_HEALTHY: Duration = Duration::from_secs(60);

/// Which Python env the job runs in.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct PythonSpec {
    pub kind: PythonKind,
    /// The requirements.txt / pyproject.toml / environment.yml (absolute,
    /// inside the tree).
    pub file: PathBuf,
}

#[derive(Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum PythonKind {
    Requirements,
    Pyproject,
    Conda,
}

/// A command run once per distinct set of inputs (cached by content).
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct SetupSpec {
    pub command: String,
    /// Absolute, inside the tree; a directory stands for every file under it.
    pub inputs: Vec<PathBuf>,
}

#[derive(Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Phase {
    /// Python env build and setup command.
    Setup,
    /// The job's command.
    Running,
}

/// `state.json`: rewritten each time a step starts.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct ShimState {
    pub shim_pid: u32,
    pub phase: Phase,
    /// The current step's process, leader of its own process group.
    pub child_pid: Option<u32>,
    /// Unix ms when the main command started; 0 before.
    pub started_ms: u64,
    /// Live jobs: restarts after a failure so far.
    #[serde(default)]
    pub restarts: u32,
}

/// `exit.json`: how the job ended. Written last.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct ShimExit {
    /// The phase the job ended in.
    pub phase: Phase,
    /// The failed or finished step's exit code, 128 + signal when killed;
    /// `None` when no process decided the outcome (a missing setup input, an
    /// unreadable spec, a cancellation before any step).
    pub code: Option<i32>,
    pub signal: Option<i32>,
    /// Empty on success; otherwise in words ("setup failed (exit 3)",
    /// "command not found (exit 127)", "killed by signal 15", "cancelled").
    pub reason: String,
    pub finished_ms: u64,
}

impl ShimExit {
    fn new(phase: Phase, outcome: Option<Outcome>, reason: impl Into<String>) -> ShimExit {
        ShimExit {
            phase,
            code: outcome.map(Outcome::code),
            signal: outcome.and_then(Outcome::signal),
            reason: reason.into(),
            finished_ms: now_ms(),
        }
    }
}

/// Runs the job in `job_dir` to its end and returns the shim's exit code: the
/// job's code (128 + signal when killed), 1 when the job failed before a
/// process decided, 2 when not even `exit.json` could be written.
///
/// Call it from a process with no other threads (the binary calls it before
/// starting any runtime): it blocks SIGTERM/SIGINT for every thread it starts.
pub fn run(job_dir: &Path) -> i32 {
    let current_pgid = Arc::new(AtomicI32::new(0));
    watch_signals(job_dir, current_pgid.clone());
    if let Err(e) = nix::sys::prctl::set_child_subreaper(true) {
        // Without it daemonized grandchildren escape to init; the job still
        // runs, its direct descendants are still cleaned up.
        tracing::warn!("cannot become a child subreaper: {e}");
    }
    // Room for the job's last words (a note in its log, `exit.json`) kept
    // aside while it runs: a job that fills the disk still ends with its
    // reason recorded instead of vanishing.
    let reserve = job_dir.join(RESERVE_FILE);
    let _ = fs::write(&reserve, vec![0u8; RESERVE_BYTES]);
    let log = LogWriter::open(&job_dir.join(LOG_FILE)).and_then(|w| w.sync_behind(SYNC_BEHIND));
    let exit = match log {
        Ok(log) => {
            let log = Arc::new(log);
            let metrics = Arc::new(std::sync::Mutex::new(metrics::MetricScan::default()));
            let mut exit = run_job(job_dir, log.clone(), current_pgid, metrics.clone());
            let _ = fs::remove_file(&reserve);
            note_lost_output(&log, &mut exit);
            if let Err(e) = log.finish() {
                tracing::warn!("cannot sync the job log: {e}");
            }
            let values = metrics
                .lock()
                .map(|m| m.values().clone())
                .unwrap_or_default();
            if !values.is_empty() {
                let json = serde_json::to_vec_pretty(&values).expect("metrics serialize");
                if let Err(e) = write_atomic(&job_dir.join(METRICS_FILE), &json, false) {
                    tracing::warn!("cannot write {METRICS_FILE}: {e}");
                }
            }
            exit
        }
        Err(e) => ShimExit::new(Phase::Setup, None, format!("cannot open the job log: {e}")),
    };
    let _ = fs::remove_file(&reserve);
    let json = serde_json::to_vec_pretty(&exit).expect("exit serializes");
    if let Err(e) = write_atomic(&job_dir.join(EXIT_FILE), &json, true) {
        tracing::error!(job_dir = %job_dir.display(), "cannot write {EXIT_FILE}: {e}");
        return 2;
    }
    exit.code
        .unwrap_or(if exit.reason.is_empty() { 0 } else { 1 })
}

/// Says in the log, and in a failed job's reason, that some of the job's
/// output is not in its log (the disk filled up), and how much.
fn note_lost_output(log: &LogWriter, exit: &mut ShimExit) {
    let lost = log.lost();
    if lost.bytes == 0 {
        return;
    }
    let what = format!(
        "{} of the job's output could not be written to its log ({})",
        bridge_proto::human_bytes(lost.bytes),
        lost.error.as_deref().unwrap_or("write failed")
    );
    let line = if lost.disk_full {
        format!("bridge: the agent's disk is full: {what}; free space there\n")
    } else {
        format!("bridge: {what}\n")
    };
    let _ = log.write(crate::joblog::SYSTEM, line.as_bytes());
    if !exit.reason.is_empty() && lost.disk_full {
        exit.reason = format!("{}; the agent's disk is full", exit.reason);
    }
}

/// Turns SIGTERM/SIGINT to the shim into a cancellation (the `cancel` file,
/// then SIGTERM to the running step's group) instead of dying and orphaning
/// the job. The signals are blocked here, before any other thread exists, so
/// every thread inherits the mask and only the watcher receives them; child
/// processes start with an empty mask (`step::unblock_signals`).
fn watch_signals(job_dir: &Path, current_pgid: Arc<AtomicI32>) {
    let mut set = SigSet::empty();
    set.add(Signal::SIGTERM);
    set.add(Signal::SIGINT);
    if let Err(e) = set.thread_block() {
        tracing::warn!("cannot block signals: {e}");
        return;
    }
    let job_dir = job_dir.to_path_buf();
    std::thread::spawn(move || {
        while let Ok(sig) = set.wait() {
            tracing::info!("{sig} received: cancelling the job");
            let _ = fs::write(job_dir.join(CANCEL_FILE), b"");
            let pgid = current_pgid.load(Ordering::SeqCst);
            if pgid > 0 {
                let _ = killpg(Pid::from_raw(pgid), Signal::SIGTERM);
            }
        }
    });
}

fn run_job(
    job_dir: &Path,
    log: Arc<LogWriter>,
    current_pgid: Arc<AtomicI32>,
    metrics: Arc<std::sync::Mutex<metrics::MetricScan>>,
) -> ShimExit {
    let mut steps = Steps {
        job_dir: job_dir.to_path_buf(),
        log,
        state: ShimState {
            shim_pid: std::process::id(),
            phase: Phase::Setup,
            child_pid: None,
            started_ms: 0,
            restarts: 0,
        },
        phase: Phase::Setup,
        grace: Duration::from_secs(10),
        current_pgid,
        metrics,
    };
    steps.write_state();
    let spec: ShimSpec = match fs::read(job_dir.join(SPEC_FILE))
        .map_err(|e| e.to_string())
        .and_then(|b| serde_json::from_slice(&b).map_err(|e| e.to_string()))
    {
        Ok(s) => s,
        Err(e) => {
            let reason = format!("cannot read {SPEC_FILE}: {e}");
            steps.system(&reason);
            return ShimExit::new(Phase::Setup, None, reason);
        }
    };
    steps.grace = Duration::from_millis(spec.grace_ms);
    let cancelled = |phase, outcome| ShimExit::new(phase, outcome, "cancelled");
    if steps.cancelled() {
        return cancelled(Phase::Setup, None);
    }

    let mut env: crate::envcache::Env = std::env::vars_os().collect();
    env.extend(spec.env.iter().map(|(k, v)| (k.into(), v.into())));
    let cache = EnvCache::new(&spec.cache_dir);
    // Failures of the env build and the setup: the step's outcome decides the
    // code, a cancellation wins over the failure it caused.
    let setup_failed = |steps: &Steps, e: EnvError| {
        if steps.cancelled() || matches!(e, EnvError::Cancelled) {
            cancelled(Phase::Setup, e.outcome())
        } else {
            ShimExit::new(Phase::Setup, e.outcome(), e.to_string())
        }
    };
    if spec.cluster.is_some() {
        return run_cluster(&mut steps, job_dir, &spec, &env);
    }
    let mut python = None;
    if let Some(p) = &spec.python {
        match cache.ensure_python(p, &env, &spec.cwd, &mut steps) {
            Ok(pe) => {
                pe.activate(&mut env);
                python = Some(pe);
            }
            Err(e) => return setup_failed(&steps, e),
        }
    }
    if let Some(s) = &spec.setup
        && let Err(e) =
            cache.ensure_setup(s, &spec.tree, &spec.cwd, &env, python.as_ref(), &mut steps)
    {
        return setup_failed(&steps, e);
    }
    if let Some(port) = spec.debugpy_port
        && let Err(e) =
            crate::debugger::prepare(&spec.cache_dir, &mut env, &spec.cwd, port, &mut steps)
    {
        if !matches!(e, EnvError::ToolFailed { .. }) {
            steps.system(&e.to_string());
        }
        return setup_failed(&steps, e);
    }
    let mut command = spec.command.clone();
    if let Some(cf) = &spec.kernel {
        // A front end's pid on the laptop means nothing here (ipykernel
        // would watch it as its parent).
        env.remove(std::ffi::OsStr::new("JPY_PARENT_PID"));
        match crate::debugger::ensure_tool(
            &spec.cache_dir,
            &env,
            &spec.cwd,
            crate::kernel::IPYKERNEL,
            &mut steps,
        ) {
            Ok(found) => {
                crate::debugger::prepend_pythonpath(&mut env, found.path.into_iter().collect());
                command = crate::kernel::command(&found.python, cf);
            }
            Err(e) => {
                if !matches!(e, EnvError::ToolFailed { .. }) {
                    steps.system(&e.to_string());
                }
                return setup_failed(&steps, e);
            }
        }
    }
    if steps.cancelled() {
        return cancelled(Phase::Setup, None);
    }

    steps.phase = Phase::Running;
    if !spec.cwd.is_dir() {
        let reason = format!("working directory {} does not exist", spec.cwd.display());
        steps.system(&reason);
        return ShimExit::new(Phase::Running, None, reason);
    }
    let mut backoff = Duration::from_secs(1);
    loop {
        let mut cmd = Command::new("/bin/sh");
        cmd.arg("-c")
            .arg(&command)
            .current_dir(&spec.cwd)
            .env_clear()
            .envs(&env);
        let began = std::time::Instant::now();
        let outcome = match steps.run_step(cmd, true) {
            Ok(o) => o,
            Err(e) => {
                let reason = format!("cannot start the command: {e}");
                steps.system(&reason);
                return ShimExit::new(Phase::Running, None, reason);
            }
        };
        if steps.cancelled() {
            return cancelled(Phase::Running, Some(outcome));
        }
        if !spec.live || spec.kernel.is_some() || outcome.success() {
            return ShimExit::new(Phase::Running, Some(outcome), describe(outcome));
        }
        // A live service that failed: start it again, waiting longer after
        // each failure in a row (a broken save should not spin the CPU).
        if began.elapsed() >= LIVE_HEALTHY {
            backoff = Duration::from_secs(1);
        }
        steps.state.restarts += 1;
        steps.write_state();
        let how = match outcome {
            Outcome::Exited(c) => format!("exited with code {c}"),
            Outcome::Signaled(s) => format!("was killed by signal {s}"),
        };
        steps.system(&format!(
            "the live command {how}; starting it again in {} s (restart {})",
            backoff.as_secs(),
            steps.state.restarts
        ));
        let until = std::time::Instant::now() + backoff;
        while std::time::Instant::now() < until {
            if steps.cancelled() {
                return cancelled(Phase::Running, Some(outcome));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        backoff = (backoff * 2).min(LIVE_BACKOFF);
    }
}

/// A `placement = "cluster"` job: its pod builds the environment and runs
/// the setup; here the main step is `cluster-run`, which writes the pod's
/// log into this one and exits with the command's code.
fn run_cluster(
    steps: &mut Steps,
    job_dir: &Path,
    spec: &ShimSpec,
    env: &crate::envcache::Env,
) -> ShimExit {
    steps.phase = Phase::Running;
    let exe = match std::env::current_exe() {
        Ok(e) => e,
        Err(e) => {
            let reason = format!("cannot find the agent's executable: {e}");
            steps.system(&reason);
            return ShimExit::new(Phase::Running, None, reason);
        }
    };
    let mut cmd = Command::new(exe);
    cmd.arg("cluster-run")
        .arg(job_dir)
        .current_dir(&spec.cwd)
        .env_clear()
        .envs(env);
    match steps.run_step(cmd, true) {
        Ok(outcome) if steps.cancelled() => {
            ShimExit::new(Phase::Running, Some(outcome), "cancelled")
        }
        Ok(outcome) => ShimExit::new(Phase::Running, Some(outcome), describe(outcome)),
        Err(e) => {
            let reason = format!("cannot start the job's Kubernetes Job: {e}");
            steps.system(&reason);
            ShimExit::new(Phase::Running, None, reason)
        }
    }
}

/// The reason for the main command's outcome, as a shell user would say it.
fn describe(outcome: Outcome) -> String {
    match outcome {
        Outcome::Exited(0) => String::new(),
        Outcome::Exited(127) => "command not found (exit 127)".into(),
        Outcome::Exited(126) => "command not executable (exit 126)".into(),
        Outcome::Exited(c) => format!("command failed (exit {c})"),
        Outcome::Signaled(s) => format!("killed by signal {s}"),
    }
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

#[cfg(test)]
mod tests;

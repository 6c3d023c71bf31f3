//! Running one step of a job (an env build command, the setup, the main
//! command): its own process group, its output drained into the job log as it
//! arrives, `state.json` naming it so the agent can signal it, and nothing of
//! it left running afterwards.

use std::io::{self, Read};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicI32, Ordering};
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::fcntl::{FcntlArg, fcntl};
use nix::sys::signal::{Signal, killpg};
use nix::sys::wait::{WaitStatus, waitpid};
use nix::unistd::Pid;

use super::metrics::MetricScan;
use super::{CANCEL_FILE, Phase, STATE_FILE, ShimState, now_ms, reap};
use crate::envcache::{Outcome, StepRunner, write_atomic};
use crate::joblog::{LogWriter, STDERR, STDOUT, SYSTEM};

/// How long the shim waits for a step's pipes to close once every process of
/// the step is gone. Only a process the shim could not kill (or one outside
/// its tree that was handed the pipe) keeps them open; the log is sealed
/// before exit.json, so such a straggler cannot write after it.
const PIPE_DRAIN: Duration = Duration::from_secs(2);
/// Capacity asked for each step's stdout and stderr pipe (Linux's default
/// `pipe-max-size`).
const PIPE_BYTES: i32 = 1024 * 1024;
/// A pump's read size: a quarter of the pipe, so the job writes on while
/// the pump writes the log.
const PUMP_BYTES: usize = 256 * 1024;
/// How long a pump gathers output that follows its last write.
const GATHER: Duration = Duration::from_millis(1);

/// Runs a job's steps one at a time.
pub struct Steps {
    pub job_dir: PathBuf,
    pub log: Arc<LogWriter>,
    /// What `state.json` says now.
    pub state: ShimState,
    /// The phase the next step belongs to.
    pub phase: Phase,
    /// SIGTERM → SIGKILL grace for leftovers.
    pub grace: Duration,
    /// The running step's process group (0: none), for the signal thread,
    /// which turns a SIGTERM to the shim into a cancellation.
    pub current_pgid: Arc<AtomicI32>,
    /// `BRIDGE_METRIC` lines of the main command's output.
    pub metrics: Arc<std::sync::Mutex<MetricScan>>,
}

impl Steps {
    pub fn write_state(&self) {
        let path = self.job_dir.join(STATE_FILE);
        let json = serde_json::to_vec_pretty(&self.state).expect("state serializes");
        if let Err(e) = write_atomic(&path, &json, false) {
            // The agent then cannot see the step to cancel it; the job still
            // runs and its exit is still recorded.
            tracing::warn!(path = %path.display(), "cannot write state: {e}");
        }
    }

    /// Writes a system line into the job log.
    pub fn system(&self, line: &str) {
        if let Err(e) = self
            .log
            .write(SYSTEM, format!("bridge: {line}\n").as_bytes())
        {
            tracing::warn!("cannot write job log: {e}");
        }
    }

    /// Runs `cmd` to completion and cleans up after it. `main` marks the job's
    /// own command (its start time goes into the state).
    pub fn run_step(&mut self, mut cmd: Command, main: bool) -> io::Result<Outcome> {
        cmd.stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .process_group(0);
        unblock_signals(&mut cmd);
        let mut child = cmd.spawn()?;
        let pid = child.id();
        self.current_pgid.store(pid as i32, Ordering::SeqCst);
        // Pumps first: the first output line should not wait for the state.
        let (done_tx, done_rx) = mpsc::channel();
        let mut pumps = Vec::new();
        let metrics = main.then(|| self.metrics.clone());
        if let Some(out) = child.stdout.take() {
            widen(&out);
            pumps.push(pump(
                out,
                STDOUT,
                self.log.clone(),
                metrics.clone(),
                done_tx.clone(),
            ));
        }
        if let Some(err) = child.stderr.take() {
            widen(&err);
            pumps.push(pump(
                err,
                STDERR,
                self.log.clone(),
                metrics,
                done_tx.clone(),
            ));
        }
        drop(done_tx);
        self.state.phase = self.phase;
        self.state.child_pid = Some(pid);
        if main {
            self.state.started_ms = now_ms();
        }
        self.write_state();
        // The agent may have created `cancel` after our last check and
        // signalled the previous step's group: make sure this one stops too.
        if self.cancelled() {
            let _ = killpg(Pid::from_raw(pid as i32), Signal::SIGTERM);
        }
        let status = wait_for(pid as i32);
        // Leftovers may hold the pipes; they go first, then the pumps end.
        let left = reap::kill_leftovers(self.grace);
        self.current_pgid.store(0, Ordering::SeqCst);
        if left > 0 {
            self.system(&format!(
                "stopped {left} process{} left running by the step",
                if left == 1 { "" } else { "es" }
            ));
        }
        let deadline = std::time::Instant::now() + PIPE_DRAIN;
        for _ in 0..pumps.len() {
            let wait = deadline.saturating_duration_since(std::time::Instant::now());
            if done_rx.recv_timeout(wait).is_err() {
                tracing::warn!("a step's output pipe is still open; not waiting for it");
                break;
            }
        }
        for p in pumps {
            if p.is_finished() {
                let _ = p.join();
            }
        }
        status
    }

    pub fn cancelled(&self) -> bool {
        cancel_requested(&self.job_dir)
    }
}

/// Waits for the step's main process, reaping every other child that exits
/// meanwhile: orphans reparented to the shim (it is a subreaper) would
/// otherwise stay zombies until the step ends, which for a training run can
/// be days.
fn wait_for(pid: i32) -> io::Result<Outcome> {
    loop {
        match waitpid(Pid::from_raw(-1), None) {
            Ok(WaitStatus::Exited(p, code)) if p.as_raw() == pid => {
                return Ok(Outcome::Exited(code));
            }
            Ok(WaitStatus::Signaled(p, sig, _)) if p.as_raw() == pid => {
                return Ok(Outcome::Signaled(sig as i32));
            }
            Ok(_) | Err(Errno::EINTR) => {}
            Err(e) => return Err(e.into()),
        }
    }
}

pub fn cancel_requested(job_dir: &Path) -> bool {
    job_dir.join(CANCEL_FILE).exists()
}

/// Grows a step's output pipe to [`PIPE_BYTES`] (best effort: an unprivileged
/// user over `pipe-user-pages-soft` keeps the default 64 KiB), so a job that
/// prints in bursts does not stall whenever the pump thread waits for a CPU.
fn widen(pipe: &impl std::os::fd::AsFd) {
    let _ = fcntl(pipe, FcntlArg::F_SETPIPE_SZ(PIPE_BYTES));
}

/// Copies one pipe into the log as it arrives: the first line of a job's
/// output should reach a follower in milliseconds. Output that follows
/// within [`GATHER`] of the last write waits out the rest of it and goes in
/// one write with whatever came meanwhile (up to [`PUMP_BYTES`]): a job
/// printing as fast as it can (Python: a pipe write per 8 KiB) costs a log
/// write and a follower's wake-up per millisecond, not per pipe write. The
/// main command's output is also scanned for `BRIDGE_METRIC` lines.
fn pump(
    mut pipe: impl Read + Send + 'static,
    stream: u8,
    log: Arc<LogWriter>,
    metrics: Option<Arc<std::sync::Mutex<MetricScan>>>,
    done: mpsc::Sender<()>,
) -> thread::JoinHandle<()> {
    thread::spawn(move || {
        let mut buf = vec![0u8; PUMP_BYTES];
        let mut failed = false;
        // When the last write was, unless the read before it filled the
        // buffer (the job is waiting on a full pipe: read on at once).
        let mut last: Option<Instant> = None;
        loop {
            if let Some(wait) = last.and_then(|t| GATHER.checked_sub(t.elapsed())) {
                thread::sleep(wait);
            }
            match pipe.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => {
                    last = (n < buf.len()).then(Instant::now);
                    if let Some(m) = &metrics
                        && let Ok(mut m) = m.lock()
                    {
                        m.feed(usize::from(stream == STDERR), &buf[..n]);
                    }
                    // Keep draining on a write error so the job never blocks
                    // on a full pipe; say so once.
                    if let Err(e) = log.write(stream, &buf[..n])
                        && !failed
                    {
                        failed = true;
                        tracing::warn!("cannot write job log: {e}");
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => break,
            }
        }
        let _ = done.send(());
    })
}

impl StepRunner for Steps {
    fn run(&mut self, cmd: Command) -> io::Result<Outcome> {
        self.run_step(cmd, false)
    }

    fn note(&mut self, line: &str) {
        self.system(line);
    }

    fn cancelled(&self) -> bool {
        Steps::cancelled(self)
    }
}

/// The shim blocks SIGTERM and SIGINT in all its threads (its signal
/// thread waits for them), and a child inherits the spawning thread's mask
/// across exec: without this, a job's command would start with both
/// blocked, so a cancel's SIGTERM would wait for the SIGKILL and a
/// kernel's interrupt would never arrive.
#[allow(unsafe_code)]
fn unblock_signals(cmd: &mut Command) {
    // SAFETY: the closure runs between fork and exec and only calls
    // pthread_sigmask, which is async-signal-safe; it allocates nothing.
    unsafe {
        cmd.pre_exec(|| {
            nix::sys::signal::SigSet::empty()
                .thread_set_mask()
                .map_err(std::io::Error::from)
        });
    }
}

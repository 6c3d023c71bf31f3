//! Idle autostop: the agent stops its machine by itself once nothing has held
//! it for the idle timeout, so a cloud machine does not keep running (and
//! billing) after the laptop that used it went away.
//!
//! The machine is *held* while a job is queued, in setup or running, or while
//! a daemon is attached: it keeps an `Attach` stream open and pings every
//! [`PING_INTERVAL`]. A daemon whose last ping is [`PING_STALE`] old no longer
//! counts even if its stream still looks open: a laptop that sleeps leaves a
//! half-open TCP connection behind that can look alive for hours. A closed
//! stream counts at once (its [`Attached`] guard is dropped).
//!
//! The idle clock starts when the agent starts and restarts whenever something
//! holds the machine. [`run`] looks every [`TICK`]; once the machine has been
//! idle for the timeout it runs the idle command with `sh -c` and restarts the
//! clock, so if the machine did not go down the command runs again after
//! another full timeout.
//!
//! Time comes from a [`Clock`] and the job count from an [`Activity`], so the
//! policy is tested without sleeping.

use std::collections::HashMap;
use std::process::Stdio;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use bridge_proto::v1;
use tokio::sync::watch;

/// How often an attached daemon pings (the daemon's side of the contract).
pub const PING_INTERVAL: Duration = Duration::from_secs(5);
/// A daemon whose last ping is this old is no longer attached: four missed
/// pings, so a slow link is not mistaken for a sleeping laptop.
pub const PING_STALE: Duration = Duration::from_secs(20);
/// How often the policy looks at the machine: the idle clock's resolution
/// for jobs (a detaching daemon restarts it exactly).
pub const TICK: Duration = Duration::from_secs(1);
/// What `--idle-command` runs unless told otherwise. `-n`: never wait for a
/// password; a machine without passwordless sudo logs the failure instead.
pub const DEFAULT_COMMAND: &str = "sudo -n shutdown -h now";

/// Where "now" comes from: the real monotonic clock, or one a test moves.
pub trait Clock: Send + Sync {
    fn now(&self) -> Instant;
}

/// The real clock.
pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> Instant {
        Instant::now()
    }
}

/// How many jobs hold the machine (queued, in setup or running).
pub trait Activity: Send + Sync {
    fn jobs_active(&self) -> u32;
}

/// What to do once idle (`--idle-timeout`, `--idle-command`).
#[derive(Debug, Clone)]
pub struct Policy {
    pub timeout: Duration,
    /// Run with `sh -c` in the agent's working directory.
    pub command: String,
}

/// Presence bookkeeping and the idle clock, shared by the `Attach` handler
/// and the policy loop. Exists without a policy too: `Attach` then reports
/// the counts with `idle_timeout_s` = 0.
pub struct Idle {
    policy: Option<Policy>,
    clock: Arc<dyn Clock>,
    activity: Arc<dyn Activity>,
    inner: Mutex<Inner>,
}

struct Inner {
    /// Attached daemons by guard id, with the time of their last ping (the
    /// stream's opening counts as one).
    attached: HashMap<u64, Instant>,
    next_id: u64,
    /// Last time anything held the machine: the idle clock's start.
    idle_since: Instant,
}

impl Inner {
    fn fresh(&self, last_ping: Instant, now: Instant) -> bool {
        now.saturating_duration_since(last_ping) < PING_STALE
    }

    fn daemons(&self, now: Instant) -> u32 {
        self.attached
            .values()
            .filter(|&&t| self.fresh(t, now))
            .count() as u32
    }
}

/// One attached daemon. Dropping it (its stream ended) detaches it.
pub struct Attached {
    idle: Arc<Idle>,
    id: u64,
}

impl Attached {
    /// The daemon is still there.
    pub fn ping(&self) {
        let now = self.idle.clock.now();
        self.idle.lock().attached.insert(self.id, now);
    }
}

impl Drop for Attached {
    fn drop(&mut self) {
        let now = self.idle.clock.now();
        let mut inner = self.idle.lock();
        // It held the machine until now (unless it had gone stale already):
        // the idle clock starts now, not at the policy's last look.
        if let Some(last) = inner.attached.remove(&self.id)
            && inner.fresh(last, now)
        {
            inner.idle_since = inner.idle_since.max(now);
        }
    }
}

impl Idle {
    /// The idle clock starts now.
    pub fn new(policy: Option<Policy>, clock: Arc<dyn Clock>, activity: Arc<dyn Activity>) -> Idle {
        let now = clock.now();
        Idle {
            policy: policy.filter(|p| !p.timeout.is_zero()),
            clock,
            activity,
            inner: Mutex::new(Inner {
                attached: HashMap::new(),
                next_id: 0,
                idle_since: now,
            }),
        }
    }

    /// Jobs queued, in setup or running.
    pub fn jobs_active(&self) -> u32 {
        self.activity.jobs_active()
    }

    pub fn policy(&self) -> Option<&Policy> {
        self.policy.as_ref()
    }

    /// The bookkeeping stays consistent at every step, so a panic elsewhere
    /// while the lock was held leaves nothing to distrust.
    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// A daemon opened its `Attach` stream.
    pub fn attach(self: &Arc<Self>) -> Attached {
        let now = self.clock.now();
        let mut inner = self.lock();
        let id = inner.next_id;
        inner.next_id += 1;
        inner.attached.insert(id, now);
        Attached {
            idle: self.clone(),
            id,
        }
    }

    /// Looks at the machine now: (jobs, daemons, idle for, now). While
    /// anything holds it, the idle clock restarts.
    fn observe(&self) -> (u32, u32, Duration, Instant, MutexGuard<'_, Inner>) {
        // Outside our lock: the job table has its own.
        let jobs = self.activity.jobs_active();
        let now = self.clock.now();
        let mut inner = self.lock();
        let daemons = inner.daemons(now);
        if jobs > 0 || daemons > 0 {
            inner.idle_since = now;
        } else {
            // A daemon that went stale held the machine until its last ping
            // was PING_STALE old, not until the policy noticed.
            let held_until = inner
                .attached
                .values()
                .map(|&t| (t + PING_STALE).min(now))
                .max();
            if let Some(t) = held_until {
                inner.idle_since = inner.idle_since.max(t);
            }
        }
        let idle_for = now.saturating_duration_since(inner.idle_since);
        (jobs, daemons, idle_for, now, inner)
    }

    /// What `Attach` answers.
    pub fn status(&self) -> v1::IdleStatus {
        let (jobs_active, daemons, idle_for, _, inner) = self.observe();
        drop(inner);
        let (idle_timeout_s, idle_command, shutdown_in_s) = match &self.policy {
            None => (0, String::new(), 0),
            Some(p) => (
                p.timeout.as_secs(),
                p.command.clone(),
                // Rounded up: "0 s left" only when it is due.
                p.timeout
                    .saturating_sub(idle_for)
                    .as_millis()
                    .div_ceil(1000) as u64,
            ),
        };
        v1::IdleStatus {
            idle_timeout_s,
            idle_command,
            shutdown_in_s,
            jobs_active,
            daemons,
        }
    }

    /// One look of the policy: the command to run when the machine has been
    /// idle for the timeout (the idle clock restarts then), else `None`.
    pub fn tick(&self) -> Option<String> {
        let policy = self.policy.as_ref()?;
        let (_, _, idle_for, now, mut inner) = self.observe();
        if idle_for < policy.timeout {
            return None;
        }
        inner.idle_since = now;
        Some(policy.command.clone())
    }
}

/// The policy loop: looks every [`TICK`] and runs the idle command when due,
/// until `stop` is set (or its sender dropped). Returns at once without a
/// policy.
pub async fn run(idle: Arc<Idle>, mut stop: watch::Receiver<bool>) {
    let Some(policy) = idle.policy().cloned() else {
        return;
    };
    tracing::info!(
        timeout_s = policy.timeout.as_secs(),
        command = %policy.command,
        "idle autostop on"
    );
    let mut ticks = tokio::time::interval(TICK);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut running: Option<tokio::task::JoinHandle<()>> = None;
    loop {
        tokio::select! {
            _ = ticks.tick() => {}
            _ = stop.wait_for(|s| *s) => return,
        }
        let Some(command) = idle.tick() else {
            continue;
        };
        if running.as_ref().is_some_and(|h| !h.is_finished()) {
            tracing::warn!(command = %command, "idle again, but the last idle command is still running");
            continue;
        }
        tracing::warn!(
            idle_s = policy.timeout.as_secs(),
            command = %command,
            "no job and no daemon attached for the idle timeout: running the idle command"
        );
        running = Some(tokio::spawn(run_command(command)));
    }
}

async fn run_command(command: String) {
    let out = tokio::process::Command::new("sh")
        .arg("-c")
        .arg(&command)
        .stdin(Stdio::null())
        .output()
        .await;
    match out {
        Ok(o) if o.status.success() => tracing::info!(command = %command, "idle command done"),
        Ok(o) => tracing::error!(
            command = %command,
            status = %o.status,
            stderr = %String::from_utf8_lossy(&o.stderr).trim(),
            "the idle command failed: the machine keeps running"
        ),
        Err(e) => tracing::error!(
            command = %command,
            error = %e,
            "cannot run the idle command: the machine keeps running"
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU32, Ordering};

    /// A clock the test moves by hand.
    struct ManualClock(Mutex<Instant>);

    impl ManualClock {
        fn advance(&self, d: Duration) {
            *self.0.lock().unwrap() += d;
        }
    }

    impl Clock for ManualClock {
        fn now(&self) -> Instant {
            *self.0.lock().unwrap()
        }
    }

    struct Jobs(AtomicU32);

    impl Activity for Jobs {
        fn jobs_active(&self) -> u32 {
            self.0.load(Ordering::Relaxed)
        }
    }

    const TIMEOUT: Duration = Duration::from_secs(60);
    const SEC: Duration = Duration::from_secs(1);

    struct Fixture {
        clock: Arc<ManualClock>,
        jobs: Arc<Jobs>,
        idle: Arc<Idle>,
    }

    impl Fixture {
        fn new(policy: Option<Policy>) -> Fixture {
            let clock = Arc::new(ManualClock(Mutex::new(Instant::now())));
            let jobs = Arc::new(Jobs(AtomicU32::new(0)));
            let idle = Arc::new(Idle::new(policy, clock.clone(), jobs.clone()));
            Fixture { clock, jobs, idle }
        }

        fn with_timeout() -> Fixture {
            Fixture::new(Some(Policy {
                timeout: TIMEOUT,
                command: "true".into(),
            }))
        }

        /// Moves time on by `d` one policy tick at a time; the number of
        /// times the command ran.
        fn run_for(&self, d: Duration) -> usize {
            let mut fired = 0;
            let mut left = d;
            while !left.is_zero() {
                let step = left.min(TICK);
                self.clock.advance(step);
                left -= step;
                fired += usize::from(self.idle.tick().is_some());
            }
            fired
        }
    }

    #[test]
    fn fires_after_the_timeout_from_agent_start_then_again_after_another() {
        let f = Fixture::with_timeout();
        assert_eq!(f.run_for(TIMEOUT - SEC), 0);
        assert_eq!(f.idle.status().shutdown_in_s, 1);
        assert_eq!(f.run_for(SEC), 1);
        assert_eq!(f.idle.status().shutdown_in_s, 60);
        assert_eq!(f.run_for(TIMEOUT - SEC), 0);
        assert_eq!(f.run_for(SEC), 1);
    }

    #[test]
    fn a_pinging_daemon_holds_the_machine_and_its_detach_starts_the_clock() {
        let f = Fixture::with_timeout();
        f.run_for(30 * SEC);
        let a = f.idle.attach();
        for _ in 0..100 {
            assert_eq!(f.run_for(PING_INTERVAL), 0);
            a.ping();
            let st = f.idle.status();
            assert_eq!((st.daemons, st.shutdown_in_s), (1, 60));
        }
        // Half a tick after the policy's last look: the clock starts at the
        // detach itself.
        f.clock.advance(TICK / 2);
        drop(a);
        assert_eq!(f.idle.status().daemons, 0);
        assert_eq!(f.run_for(TIMEOUT - SEC), 0);
        assert_eq!(f.idle.status().shutdown_in_s, 1);
        assert_eq!(f.run_for(SEC), 1);
    }

    #[test]
    fn a_daemon_that_stops_pinging_is_detached_after_the_staleness_window() {
        let f = Fixture::with_timeout();
        let a = f.idle.attach();
        assert_eq!(f.run_for(PING_STALE - SEC), 0);
        assert_eq!(f.idle.status().daemons, 1);
        f.run_for(SEC);
        // Its stream is still open (the guard lives), yet it no longer
        // counts, and the clock started when it went stale.
        assert_eq!(f.idle.status().daemons, 0);
        assert_eq!(f.run_for(TIMEOUT - SEC), 0);
        assert_eq!(f.run_for(SEC), 1);
        // Dropping a stale guard later does not restart the clock.
        f.run_for(10 * SEC);
        drop(a);
        assert_eq!(f.idle.status().shutdown_in_s, 50);
        // A stale daemon that pings again holds the machine again.
        let b = f.idle.attach();
        f.run_for(PING_STALE + SEC);
        b.ping();
        assert_eq!(f.idle.status().daemons, 1);
        for _ in 0..50 {
            assert_eq!(f.run_for(PING_INTERVAL), 0);
            b.ping();
        }
    }

    #[test]
    fn jobs_hold_the_machine_and_the_clock_starts_when_the_last_one_ends() {
        let f = Fixture::with_timeout();
        f.jobs.0.store(2, Ordering::Relaxed);
        assert_eq!(f.run_for(3 * TIMEOUT), 0);
        let st = f.idle.status();
        assert_eq!((st.jobs_active, st.daemons, st.shutdown_in_s), (2, 0, 60));
        f.jobs.0.store(1, Ordering::Relaxed);
        assert_eq!(f.run_for(TIMEOUT), 0);
        f.jobs.0.store(0, Ordering::Relaxed);
        assert_eq!(f.run_for(TIMEOUT - SEC), 0);
        assert_eq!(f.run_for(SEC), 1);
    }

    #[test]
    fn two_daemons_hold_it_until_both_are_gone() {
        let f = Fixture::with_timeout();
        let a = f.idle.attach();
        let b = f.idle.attach();
        assert_eq!(f.idle.status().daemons, 2);
        drop(a);
        for _ in 0..30 {
            assert_eq!(f.run_for(PING_INTERVAL), 0);
            b.ping();
        }
        assert_eq!(f.idle.status().daemons, 1);
        drop(b);
        assert_eq!(f.run_for(TIMEOUT), 1);
    }

    #[test]
    fn without_a_policy_nothing_fires_and_the_counts_are_still_reported() {
        for policy in [
            None,
            Some(Policy {
                timeout: Duration::ZERO,
                command: "true".into(),
            }),
        ] {
            let f = Fixture::new(policy);
            f.jobs.0.store(1, Ordering::Relaxed);
            let a = f.idle.attach();
            let st = f.idle.status();
            assert_eq!(
                (
                    st.idle_timeout_s,
                    st.shutdown_in_s,
                    st.jobs_active,
                    st.daemons
                ),
                (0, 0, 1, 1)
            );
            assert!(st.idle_command.is_empty());
            f.jobs.0.store(0, Ordering::Relaxed);
            drop(a);
            assert_eq!(f.run_for(10 * TIMEOUT), 0);
        }
    }
}

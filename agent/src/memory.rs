//! Giving freed memory back to the system.
//!
//! glibc keeps what the agent frees in its arenas. After a busy spell (a
//! cold sync's rounds, a restart's refresh with two trees and a walk's
//! listing alive at once, a manifest of the whole tree) that was twice the
//! live heap: 178 MiB resident for a tree of 200,000 files. So each spell
//! of requests ends, once the agent has been quiet for a tick, with the
//! caller's compaction (the mirrors' trees give back the room their lists
//! grew into: a cold sync builds each list entry by entry, up to half over
//! its length) and `malloc_trim`: an idle agent holds its live data, not
//! its past peaks.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// Requests and rounds so far.
static ACTIVITY: AtomicU64 = AtomicU64::new(0);

/// How long the agent must be quiet before it trims.
pub const QUIET: Duration = Duration::from_secs(1);

/// Notes a request or a round.
pub fn touched() {
    ACTIVITY.fetch_add(1, Ordering::Relaxed);
}

/// Returns the free pages of every malloc arena to the system.
#[allow(unsafe_code)]
pub fn release_free_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim takes no pointer; it walks glibc's own arenas,
    // under their locks.
    unsafe {
        nix::libc::malloc_trim(0);
    }
}

/// Runs `compact`, then trims, once after each spell of activity, when a
/// tick of [`QUIET`] passed with none. Idle, it costs a wake-up per tick
/// and nothing else.
pub async fn trim_when_quiet(
    compact: impl Fn() + Clone + Send + 'static,
    mut stopping: tokio::sync::watch::Receiver<bool>,
) {
    let mut seen = ACTIVITY.load(Ordering::Relaxed);
    let mut trimmed = seen;
    loop {
        tokio::select! {
            _ = tokio::time::sleep(QUIET) => {}
            _ = stopping.changed() => return,
        }
        let now = ACTIVITY.load(Ordering::Relaxed);
        if now == seen && now != trimmed {
            let t0 = std::time::Instant::now();
            let compact = compact.clone();
            let _ = tokio::task::spawn_blocking(move || {
                compact();
                release_free_memory();
            })
            .await;
            tracing::debug!(
                ms = t0.elapsed().as_secs_f64() * 1e3,
                "freed memory returned"
            );
            trimmed = now;
        }
        seen = now;
    }
}

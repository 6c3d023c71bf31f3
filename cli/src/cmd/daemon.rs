//! `bridge daemon`: the daemon in the foreground.

use std::path::Path;

use anyhow::{Context, bail};
use bridge_daemon::Config;
use bridge_daemon::provider::ProviderSpec;

use crate::client;

#[derive(clap::Args)]
pub struct Args {}

/// The exit code of a daemon that found another one running (or starting)
/// for its repository: `bridge up` waits for that one instead.
pub const ANOTHER_DAEMON: u8 = 3;

pub async fn run(cwd: &Path, _: Args) -> anyhow::Result<u8> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("BRIDGE_LOG")
                .unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        // `.bridge/daemon.log` on a full disk must not panic the daemon.
        .log_internal_errors(false)
        .init();
    // Freed pages go back to the system within seconds even while the
    // daemon sits idle (without it, only on later allocations).
    if let Err(e) = tikv_jemalloc_ctl::background_thread::write(true) {
        tracing::debug!(error = %e, "no allocator background thread");
    }
    if tracing::enabled!(tracing::Level::DEBUG) {
        tokio::spawn(log_heap());
    }
    let layout = client::repo(cwd)?;
    layout
        .create()
        .with_context(|| format!("cannot create {}", layout.state.display()))?;
    // One daemon per repository, for as long as it lives: a lock the kernel
    // drops with the process, however it ends. Two daemons started at once
    // both found no control socket, and the second removed the first's
    // (which then ran on, unreachable).
    let lock = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&layout.daemon_lock)
        .with_context(|| format!("cannot open {}", layout.daemon_lock.display()))?;
    let _lock = match nix::fcntl::Flock::lock(lock, nix::fcntl::FlockArg::LockExclusiveNonblock) {
        Ok(held) => held,
        Err((_, nix::errno::Errno::EWOULDBLOCK)) => {
            eprintln!(
                "bridge: a daemon is already running for {}",
                layout.repo.display()
            );
            return Ok(ANOTHER_DAEMON);
        }
        Err((_, e)) => bail!("cannot lock {}: {e}", layout.daemon_lock.display()),
    };
    if client::daemon(&layout).await.is_some() {
        bail!("a daemon is already running for {}", layout.repo.display());
    }
    layout
        .empty_gone()
        .with_context(|| format!("cannot empty {}", layout.gone.display()))?;
    let _ = std::fs::remove_file(&layout.control);
    let listener = tokio::net::UnixListener::bind(&layout.control)
        .with_context(|| format!("cannot listen on {}", layout.control.display()))?;
    // Its owner's alone, whatever the umask (`.bridge/` is 0700 as well).
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&layout.control, std::fs::Permissions::from_mode(0o600))
            .with_context(|| format!("cannot restrict {}", layout.control.display()))?;
    }
    std::fs::write(&layout.daemon_pid, std::process::id().to_string())?;
    let spec = ProviderSpec::load(&layout.provider)?.unwrap_or(ProviderSpec::Local);
    let config = Config {
        repo: layout.repo.clone(),
        provider: spec
            .open(client::agent_bin())
            .map_err(|e| anyhow::anyhow!(e))?,
    };
    bridge_daemon::run(config, listener, async {
        use tokio::signal::unix::{SignalKind, signal};
        let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler");
        let mut int = signal(SignalKind::interrupt()).expect("SIGINT handler");
        tokio::select! {
            _ = term.recv() => {}
            _ = int.recv() => {}
        }
    })
    .await?;
    Ok(0)
}

/// Logs the allocator's figures every 10 s (debug): what the daemon's data
/// takes next to what the process holds.
async fn log_heap() {
    use tikv_jemalloc_ctl::{epoch, stats};
    let mib = |b: usize| format!("{:.1} MiB", b as f64 / (1 << 20) as f64);
    loop {
        tokio::time::sleep(std::time::Duration::from_secs(10)).await;
        if epoch::advance().is_err() {
            return;
        }
        if let (Ok(a), Ok(r), Ok(m)) = (
            stats::allocated::read(),
            stats::resident::read(),
            stats::metadata::read(),
        ) {
            tracing::debug!(
                allocated = mib(a),
                resident = mib(r),
                metadata = mib(m),
                "heap"
            );
        }
    }
}

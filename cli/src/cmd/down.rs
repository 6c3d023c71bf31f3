//! `bridge down`

use std::path::Path;
use std::time::Duration;

use bridge_daemon::provider::Provider;
use bridge_daemon::provider::local::LocalProvider;

use crate::client;

#[derive(clap::Args)]
pub struct Args {
    /// Also stop a remote (SSH) agent, which otherwise keeps running with its
    /// jobs for the next `bridge up`. Refused while jobs run, unless --force.
    #[arg(long)]
    remote: bool,
    /// With --remote: cancel running jobs (of every repository on that agent).
    #[arg(long, requires = "remote")]
    force: bool,
    /// Stop the agent and remove everything it keeps (mirrors, jobs, cached
    /// environments): `~/.bridge` on a remote, `.bridge/agent/` locally.
    #[arg(long)]
    purge: bool,
}

pub async fn run(cwd: &Path, args: Args) -> anyhow::Result<()> {
    let layout = client::repo(cwd)?;
    match client::daemon(&layout).await {
        Some(mut c) => {
            c.shutdown(bridge_proto::v1::ShutdownRequest {
                remote: args.remote,
                force: args.force,
                purge: args.purge,
            })
            .await
            .map_err(|s| anyhow::anyhow!("{}", s.message()))?;
            wait_gone(&layout).await;
            println!("bridge is down for {}", layout.repo.display());
        }
        None => {
            // No daemon, but a local agent may be left from a crash.
            LocalProvider::in_state_dir(&layout.state, client::agent_bin())
                .teardown()
                .await?;
            let _ = std::fs::remove_file(&layout.control);
            println!("bridge was not running for {}", layout.repo.display());
        }
    }
    Ok(())
}

/// Waits (up to 30 s: running jobs get their grace period) until the daemon
/// is gone: it removes its socket last,
/// after stopping the agent and saving its index.
pub async fn wait_gone(layout: &bridge_daemon::repo::Layout) {
    for _ in 0..1200 {
        if !layout.control.exists() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

//! `bridge down`

use std::path::Path;
use std::time::Duration;

use anyhow::anyhow;
use bridge_daemon::down;
use bridge_daemon::provider::ProviderSpec;
use tonic::Code;

use crate::client;

#[derive(clap::Args)]
pub struct Args {
    /// Also stop a remote (SSH) agent, which otherwise keeps running with its
    /// jobs for the next `bridge up`. Refused while jobs run, unless --force.
    #[arg(long)]
    remote: bool,
    /// Cancel running jobs (SSH with --remote: of every repository on that
    /// agent; AWS: before terminating the instance).
    #[arg(long)]
    force: bool,
    /// Stop the agent and remove everything it keeps (mirrors, jobs, cached
    /// environments): `~/.bridge` on a remote, `.bridge/agent/` locally,
    /// the pod's volume claim on Kubernetes.
    #[arg(long)]
    purge: bool,
    /// AWS: terminate every bridge instance of yours in the region (orphans
    /// included), after confirmation.
    #[cfg(feature = "aws")]
    #[arg(long)]
    all: bool,
    /// AWS, with --all: the region (default: this repository's, else AWS_REGION).
    #[cfg(feature = "aws")]
    #[arg(long, requires = "all", value_name = "REGION")]
    region: Option<String>,
    /// AWS, with --all: the profile.
    #[cfg(feature = "aws")]
    #[arg(long, requires = "all", value_name = "NAME")]
    profile: Option<String>,
    /// AWS, with --all: terminate without asking.
    #[cfg(feature = "aws")]
    #[arg(long, short = 'y')]
    yes: bool,
}

pub async fn run(cwd: &Path, args: Args) -> anyhow::Result<()> {
    #[cfg(feature = "aws")]
    if args.all {
        return down_all(cwd, &args).await;
    }
    let layout = client::repo(cwd)?;
    crate::cmd::up::UpFailed::clear(&layout);
    let spec = ProviderSpec::load(&layout.provider)?;
    let mut machine = spec
        .as_ref()
        .and_then(|s| s.machine(&layout, client::agent_bin()));
    let cloud = machine.is_some();
    match client::daemon(&layout).await {
        Some(c) if cloud => stop_before_terminate(&layout, c, args.force).await?,
        Some(mut c) => {
            c.shutdown(bridge_proto::v1::ShutdownRequest {
                remote: args.remote,
                force: args.force,
                purge: args.purge,
            })
            .await
            .map_err(|s| anyhow!("{}", s.message()))?;
            wait_gone(&layout).await;
            println!("bridge is down for {}", layout.repo.display());
        }
        None => down_without_daemon(&layout, spec, &args, cloud).await?,
    }
    if let Some(m) = machine.as_mut() {
        m.down(&crate::out::Terminal, args.purge).await?;
    }
    Ok(())
}

/// `bridge down` with no daemon (it crashed, or was killed): the agent may
/// still run this repository's jobs, so the command reaches it itself and
/// does what the daemon would have done (see `bridge_daemon::down`).
async fn down_without_daemon(
    layout: &bridge_daemon::repo::Layout,
    spec: Option<ProviderSpec>,
    args: &Args,
    cloud: bool,
) -> anyhow::Result<()> {
    let want = down::Down {
        remote: args.remote,
        force: args.force,
        purge: args.purge && !cloud,
        machine_goes: cloud,
    };
    let config = spec
        .unwrap_or(ProviderSpec::Local)
        .open(client::agent_bin())
        .ok()
        .map(|provider| bridge_daemon::Config {
            repo: layout.repo.clone(),
            provider,
        });
    let done = match &config {
        Some(config) => down::offline(config, want).await.map_err(|e| {
            let e = e.replace("add --force", "run `bridge down --force`");
            if cloud {
                anyhow!("{e}; nothing was stopped")
            } else {
                anyhow!("{e}")
            }
        })?,
        // A machine that is not up has no agent to reach.
        None => down::Done::default(),
    };
    let _ = std::fs::remove_file(&layout.control);
    if done.cancelled > 0 {
        println!(
            "bridge: cancelled {} job(s) the stopped daemon had left running",
            done.cancelled
        );
    }
    if !cloud {
        println!("bridge was not running for {}", layout.repo.display());
    }
    Ok(())
}

/// Stops the daemon of an instance about to be terminated: refused while
/// jobs run there (unless `force`, which cancels them first). An agent that
/// cannot be reached does not hold the termination up.
async fn stop_before_terminate(
    layout: &bridge_daemon::repo::Layout,
    mut c: bridge_proto::v1::control_client::ControlClient<tonic::transport::Channel>,
    force: bool,
) -> anyhow::Result<()> {
    let req = bridge_proto::v1::ShutdownRequest {
        remote: true,
        force,
        purge: false,
    };
    let asked = tokio::time::timeout(Duration::from_secs(15), c.shutdown(req)).await;
    match asked {
        Ok(Ok(_)) => {}
        Ok(Err(s)) if s.code() == Code::FailedPrecondition => {
            return Err(anyhow!(
                "{}; the instance was not terminated",
                s.message()
                    .replace("add --force", "run `bridge down --force`")
            ));
        }
        _ => {
            eprintln!(
                "bridge: the agent does not answer; stopping the daemon and terminating anyway"
            );
            c.shutdown(bridge_proto::v1::ShutdownRequest::default())
                .await
                .map_err(|s| anyhow!("{}", s.message()))?;
        }
    }
    wait_gone(layout).await;
    println!("bridge is down for {}", layout.repo.display());
    Ok(())
}

#[cfg(feature = "aws")]
async fn down_all(cwd: &Path, args: &Args) -> anyhow::Result<()> {
    // The repository is optional here: --all works from anywhere.
    let layout = client::repo(cwd).ok();
    let mut spec = match &layout {
        Some(l) => ProviderSpec::load(&l.provider)?,
        None => None,
    };
    use bridge_daemon::provider::aws::lifecycle;
    let acct = lifecycle::account_for(args.region.clone(), args.profile.clone(), spec.as_ref());
    let ids = lifecycle::down_all(&crate::out::Terminal, acct, args.yes).await?;
    // This repository's instance may have been one of them.
    let Some(layout) = layout else {
        return Ok(());
    };
    if let Some(ProviderSpec::Aws { instance, .. }) = spec.as_mut()
        && instance.as_ref().is_some_and(|i| ids.contains(&i.id))
    {
        *instance = None;
        if let Some(mut c) = client::daemon(&layout).await {
            let _ = c
                .shutdown(bridge_proto::v1::ShutdownRequest::default())
                .await;
            wait_gone(&layout).await;
        }
        if let Some(s) = &spec {
            s.save(&layout.provider)?;
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
        if !daemon_alive(layout) {
            // Killed: it never removed its socket.
            let _ = std::fs::remove_file(&layout.control);
            return;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

/// Whether the process in `.bridge/daemon.pid` still runs (a zombie does
/// not count); true when the file cannot be read (a daemon still starting).
pub fn daemon_alive(layout: &bridge_daemon::repo::Layout) -> bool {
    let Some(pid) = std::fs::read_to_string(&layout.daemon_pid)
        .ok()
        .and_then(|s| s.trim().parse::<i32>().ok())
    else {
        return true;
    };
    std::fs::read_to_string(format!("/proc/{pid}/stat")).map_or_else(
        // No /proc (macOS): ask the kernel.
        |_| nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), None).is_ok(),
        |s| {
            s.rsplit(')')
                .next()
                .is_some_and(|r| !r.trim_start().starts_with('Z'))
        },
    )
}

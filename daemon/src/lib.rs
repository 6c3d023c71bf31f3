//! The bridge daemon: one per repository. It watches the tree, keeps the
//! index, mirrors the tree to the agent and answers the CLI.
//!
//! # Layout
//! - [`repo`]: finding the repository, its `.bridge/` layout, mirror name,
//!   extra ignore lines and the agent token.
//! - [`local`]: the local tree, stat cache and skipped paths; scoped rescans.
//! - [`watcher`]: inotify watches on synced directories, debounce constants,
//!   the polling fallback.
//! - [`engine`]: the sync loop — debounce, rescan, diff, rounds, verification,
//!   reconnects.
//! - [`provider`]: the [`provider::Provider`] trait and its implementations
//!   (local process).
//! - [`jobs`]: the job relay — submit, logs, cancel, GPUs — and the output
//!   puller that brings job outputs back into the local tree.
//! - [`sweeps`]: the sweep relay — submit and resume through the barrier,
//!   status, cancel, and the wait for every trial's outputs.
//! - [`forwards`]: port forwards both ways over the agent connection, and
//!   the ones a job asks for (its `[[forward]]`s, MLflow, its debugger).
//! - [`kernel`]: `bridge kernel`'s relay — the front end's five ZMQ
//!   channels to a kernel job on the agent over durable connections, with
//!   the sync barrier before each `execute_request`.
//! - [`mlflow`]: the laptop's MLflow server for remote jobs — the tracking
//!   URI through a reverse forward, run tags, pulled `mlruns/` relocated.
//! - [`attach`]: presence for the agent's idle autostop — one pinged
//!   `Attach` stream on the current link, its answers in the status.
//! - [`control`]: the control server the CLI talks to.
//! - [`down`]: what `bridge down` does to the agent's jobs, with or without
//!   a daemon.
//! - [`status`]: the `bridge status --json` schema.
//!
//! [`run`] takes a bound control listener and a shutdown future, so tests and
//! `bridge daemon` start it the same way.

pub mod attach;
pub mod control;
pub mod down;
pub mod engine;
pub mod forwards;
pub mod jobs;
pub mod kernel;
pub mod local;
pub mod mlflow;
pub mod provider;
pub mod repo;
pub mod status;
pub mod sweeps;
pub mod watcher;

use std::future::Future;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use bridge_proto::v1::control_server::ControlServer;
use tokio::net::UnixListener;
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::UnixListenerStream;

use crate::engine::{Engine, Progress, RepoInfo, Shared};
use crate::provider::Provider;
use crate::provider::local::LocalProvider;
use crate::repo::Layout;

/// Which provider the daemon uses.
#[derive(Debug, Clone)]
pub enum ProviderConfig {
    /// An agent process on this machine.
    Local { agent_bin: PathBuf },
    /// An agent on a machine reached over SSH.
    #[cfg(feature = "ssh")]
    Ssh(provider::ssh::SshConfig),
    /// An agent in a Kubernetes pod, through the API server's port-forward.
    #[cfg(feature = "k8s")]
    K8s(provider::k8s::K8sConfig),
}

#[derive(Debug, Clone)]
pub struct Config {
    pub repo: PathBuf,
    pub provider: ProviderConfig,
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("no agent token at {0}: start bridge with `bridge up`")]
    NoToken(PathBuf),
    #[error("control server failed: {0}")]
    Serve(#[from] tonic::transport::Error),
}

/// The provider `config` names, for the repository laid out as `layout`.
pub fn provider_for(config: &ProviderConfig, layout: &Layout) -> Arc<dyn Provider> {
    match config {
        ProviderConfig::Local { agent_bin } => Arc::new(LocalProvider::in_state_dir(
            &layout.state,
            agent_bin.clone(),
        )),
        #[cfg(feature = "ssh")]
        ProviderConfig::Ssh(c) => Arc::new(provider::ssh::SshProvider::new(c.clone())),
        #[cfg(feature = "k8s")]
        ProviderConfig::K8s(c) => Arc::new(provider::k8s::K8sProvider::new(c.clone())),
    }
}

/// Runs the daemon until `shutdown` resolves or a client asks it to stop
/// (`bridge down`: see [`control::Stop`] for what else stops).
pub async fn run(
    config: Config,
    control: UnixListener,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), Error> {
    let layout = Layout::new(&config.repo);
    let token = std::fs::read_to_string(&layout.token)
        .ok()
        .map(|t| t.trim().to_string())
        .filter(|t| !t.is_empty())
        .ok_or_else(|| Error::NoToken(layout.token.clone()))?;
    let provider = provider_for(&config.provider, &layout);
    let status = status::Status::new(
        config.repo.display().to_string(),
        provider.name().to_string(),
        provider.address(),
    );
    let shared = Arc::new(Shared {
        status: Mutex::new(status),
        progress: watch::channel(Progress::default()).0,
        agent: watch::channel(None).0,
    });
    let info = RepoInfo {
        root: config.repo.clone(),
        outputs_file: layout.outputs.clone(),
        mirror: repo::mirror_name(&config.repo),
        token,
        exclude_lines: repo::exclude_lines(&config.repo),
    };
    let engine = Engine::new(info, provider.clone(), shared.clone(), layout.index.clone());
    let (cmd_tx, cmd_rx) = mpsc::channel(16);
    let (stop_tx, mut stop_rx) = watch::channel::<Option<control::Stop>>(None);
    let (engine_stop_tx, engine_stop_rx) = watch::channel(false);

    let relay = Arc::new(jobs::Relay::new(
        shared.clone(),
        config.repo.clone(),
        repo::mirror_name(&config.repo),
        cmd_tx.clone(),
    ));
    let pulls = tokio::spawn(relay.clone().pull_outputs(stop_tx.subscribe()));
    let forwards = Arc::new(forwards::Forwards::new(
        relay.clone(),
        provider.clone(),
        repo::mirror_name(&config.repo),
        layout.forwards.clone(),
    ));
    // A previous daemon's forwards (this one may have been restarted while
    // a job used them), once the engine has a link.
    let restoring = tokio::spawn({
        let forwards = forwards.clone();
        async move { forwards.restore().await }
    });
    let attach = tokio::spawn(attach::run(
        shared.clone(),
        repo::mirror_name(&config.repo),
        stop_tx.subscribe(),
    ));
    let svc = control::ControlService {
        shared: shared.clone(),
        cmds: cmd_tx,
        stop: stop_tx.clone(),
        relay: relay.clone(),
        provider: provider.clone(),
        forwards: forwards.clone(),
        repo: config.repo.clone(),
        git_context: Default::default(),
    };
    let mut server_stop = stop_tx.subscribe();
    let server = tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(ControlServer::new(svc))
            .serve_with_incoming_shutdown(UnixListenerStream::new(control), async move {
                let _ = server_stop.wait_for(|s| s.is_some()).await;
            }),
    );
    let engine = tokio::spawn(engine.run(cmd_rx, engine_stop_rx));

    tokio::select! {
        _ = shutdown => { let _ = stop_tx.send(Some(control::Stop::default())); }
        _ = stop_rx.wait_for(|s| s.is_some()) => {}
    }
    let stop = stop_rx.borrow().clone().unwrap_or_default();
    restoring.abort();
    if stop.cancel_jobs {
        relay.cancel_all(stop.all_mirrors).await;
    } else if stop.down {
        // An agent that keeps running (shared, remote) keeps batch jobs,
        // but not this repository's dev servers.
        relay.cancel_live().await;
    }
    if stop.down {
        forwards.remove_all().await;
    }
    // Detached before the engine goes: the agent's idle clock starts now.
    let _ = attach.await;
    let _ = engine_stop_tx.send(true);
    let _ = engine.await;
    pulls.abort();
    // Without `stop_agent` (a signal, or `down` of a shared remote agent)
    // the agent keeps running; the connection closes with the daemon.
    if stop.stop_agent
        && let Err(e) = provider.stop_agent().await
    {
        tracing::warn!(error = %e, "cannot stop the agent");
    }
    if stop.purge
        && let Err(e) = provider.purge().await
    {
        tracing::warn!(error = %e, "cannot remove the agent's files");
    }
    // Let the Shutdown reply reach the client before the server goes.
    server.await.ok().transpose()?;
    let _ = std::fs::remove_file(&layout.control);
    let _ = std::fs::remove_file(&layout.daemon_pid);
    tracing::info!("daemon stopped");
    Ok(())
}

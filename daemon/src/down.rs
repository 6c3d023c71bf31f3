//! What `bridge down` does to the agent's jobs, from a link to the agent:
//! the daemon's own shutdown uses it ([`crate::control::Stop`]), and so does
//! `bridge down` when no daemon runs ([`offline`]), so a crashed daemon
//! never leaves the repository's jobs running on an agent that `down`
//! stops.

use std::time::Duration;

use bridge_proto::jobs::is_terminal;
use bridge_proto::v1;
use tonic::Status;

use crate::engine::{AgentLink, Auth};
use crate::provider::Provider;
use crate::repo::Layout;
use crate::{Config, repo};

/// How long the jobs cancelled by `down` get to end (their grace periods).
const CANCEL_WAIT: Duration = Duration::from_secs(15);
/// How long a list of jobs or sweeps may take before `down` goes on without.
const LIST_WAIT: Duration = Duration::from_secs(5);
/// How long `down` with no daemon tries to reach the agent (a machine that
/// is going anyway should not keep it waiting).
const REACH_WAIT: Duration = Duration::from_secs(15);

/// The mirror a listing is for: `mirror`, or every mirror with `None`.
fn mirror_of(mirror: Option<&str>) -> String {
    mirror.unwrap_or_default().to_string()
}

/// Cancels the active sweeps of `mirror` (`None`: of every mirror), so they
/// start no trials as their jobs end.
pub async fn cancel_sweeps(link: &AgentLink, mirror: Option<&str>) {
    let mut client = link.sweeps();
    let list = client.list(v1::SweepListRequest {
        mirror: mirror_of(mirror),
        all: false,
    });
    let Ok(Ok(list)) = tokio::time::timeout(LIST_WAIT, list).await else {
        return;
    };
    for s in list.into_inner().sweeps {
        let _ = link
            .sweeps()
            .cancel(v1::SweepRef { id: s.id.clone() })
            .await;
        tracing::info!(sweep = %s.id, "sweep cancelled by down");
    }
}

/// The active jobs of `mirror` (`None`: of every mirror).
pub async fn active_jobs(
    link: &AgentLink,
    mirror: Option<&str>,
) -> Result<Vec<v1::JobInfo>, Status> {
    let mut client = link.jobs();
    let list = client.list(v1::ListRequest {
        mirror: mirror_of(mirror),
        all: false,
        unsettled: false,
    });
    match tokio::time::timeout(LIST_WAIT, list).await {
        Ok(r) => Ok(r?.into_inner().jobs),
        Err(_) => Err(Status::deadline_exceeded("the agent did not list its jobs")),
    }
}

/// Cancels the sweeps and active jobs of `mirror` (`None`: of every
/// mirror) and waits, bounded, for the jobs to end. Returns how many jobs
/// were cancelled.
pub async fn cancel_all(link: &AgentLink, mirror: Option<&str>) -> usize {
    cancel_sweeps(link, mirror).await;
    let Ok(active) = active_jobs(link, mirror).await else {
        return 0;
    };
    for j in &active {
        let _ = link.jobs().cancel(v1::JobRef { id: j.id.clone() }).await;
    }
    let deadline = tokio::time::Instant::now() + CANCEL_WAIT;
    for j in &active {
        while tokio::time::Instant::now() < deadline {
            match link.jobs().get(v1::JobRef { id: j.id.clone() }).await {
                Ok(r) if !is_terminal(r.get_ref().state()) => {
                    tokio::time::sleep(Duration::from_millis(50)).await
                }
                _ => break,
            }
        }
    }
    if !active.is_empty() {
        tracing::info!(
            jobs = active.len(),
            "cancelled the running jobs before stopping the agent"
        );
    }
    active.len()
}

/// Cancels `mirror`'s live jobs (`bridge down` on an agent that keeps
/// running): a dev server serves the laptop that started it. Returns how
/// many.
pub async fn cancel_live(link: &AgentLink, mirror: &str) -> usize {
    let Ok(jobs) = active_jobs(link, Some(mirror)).await else {
        return 0;
    };
    let mut n = 0;
    for j in jobs {
        if j.spec.as_ref().is_some_and(|s| s.live) {
            let _ = link.jobs().cancel(v1::JobRef { id: j.id.clone() }).await;
            tracing::info!(job = %j.id, "live job cancelled by down");
            n += 1;
        }
    }
    n
}

/// The message that refuses to stop an agent whose jobs still run.
pub fn still_running(jobs: &[v1::JobInfo]) -> String {
    let ids: Vec<String> = jobs
        .iter()
        .map(|j| format!("{} ({})", j.id, j.name))
        .collect();
    format!(
        "{} job(s) still running on the agent: {}; wait for them, cancel them, or add --force to cancel them",
        jobs.len(),
        ids.join(", ")
    )
}

/// What `bridge down` asked for.
#[derive(Debug, Clone, Copy, Default)]
pub struct Down {
    /// Stop a remote agent too (`--remote`).
    pub remote: bool,
    /// Cancel jobs that would otherwise refuse the stop (`--force`).
    pub force: bool,
    /// Remove the agent's files (`--purge`).
    pub purge: bool,
    /// The machine goes away after this (an instance terminated, a pod
    /// deleted): its jobs would die with it, so they refuse it like a stop.
    pub machine_goes: bool,
}

/// What [`offline`] did.
#[derive(Debug, Default)]
pub struct Done {
    /// Jobs cancelled (this repository's, or every one with `--force`).
    pub cancelled: usize,
    /// The agent was reached (else there was nothing to cancel).
    pub reached: bool,
}

/// `bridge down` with no daemon: reaches the agent itself and does what the
/// daemon's shutdown would — cancel this repository's jobs on an agent that
/// stops with it (the local one), refuse to stop or lose a shared or
/// disappearing agent's running jobs without `force` — then stops the agent
/// when asked. It reaches only an agent that may have work to stop: the
/// local one when it runs or a job may (never started just to be stopped),
/// a remote one only to stop it or its machine (one that keeps running
/// keeps its jobs). An agent that cannot be reached has nothing to cancel;
/// the local one is then stopped as before.
pub async fn offline(config: &Config, want: Down) -> Result<Done, String> {
    let layout = Layout::new(&config.repo);
    let provider = crate::provider_for(&config.provider, &layout);
    let local = provider.down_stops_agent();
    let stop_agent = local || want.remote || want.purge;
    let reach = match &config.provider {
        crate::ProviderConfig::Local { agent_bin } => {
            crate::provider::local::LocalProvider::in_state_dir(&layout.state, agent_bin.clone())
                .may_have_work()
        }
        #[allow(unreachable_patterns)]
        _ => stop_agent || want.machine_goes,
    };
    let mut done = Done::default();
    let link = if reach {
        link_to(provider.as_ref(), &layout).await
    } else {
        Err("no agent with work to stop".to_string())
    };
    match link {
        Ok(link) => {
            done.reached = true;
            let mirror = repo::mirror_name(&config.repo);
            if local {
                done.cancelled = cancel_all(&link, Some(&mirror)).await;
            } else {
                let running = active_jobs(&link, None)
                    .await
                    .map_err(|s| s.message().to_string())?;
                if !running.is_empty() && !want.force {
                    return Err(still_running(&running));
                }
                done.cancelled = cancel_all(&link, None).await;
            }
        }
        Err(e) => tracing::info!(error = %e, "no agent to reach: nothing to cancel"),
    }
    if stop_agent {
        provider.stop_agent().await.map_err(|e| e.to_string())?;
    } else {
        let _ = provider.teardown().await;
    }
    if want.purge {
        provider.purge().await.map_err(|e| e.to_string())?;
    }
    Ok(done)
}

/// A link to the agent `provider` reaches, started if it is not running
/// (the local agent, or a remote one whose token is learnt that way).
async fn link_to(provider: &dyn Provider, layout: &Layout) -> Result<AgentLink, String> {
    let reach = async {
        provider.ensure_agent().await.map_err(|e| e.to_string())?;
        provider.connect().await.map_err(|e| e.to_string())
    };
    let channel = tokio::time::timeout(REACH_WAIT, reach)
        .await
        .map_err(|_| "the agent did not answer within 15 s".to_string())??;
    let token = match provider.agent_token() {
        Some(t) => t,
        None => std::fs::read_to_string(&layout.token)
            .map_err(|e| format!("cannot read {}: {e}", layout.token.display()))?
            .trim()
            .to_string(),
    };
    let auth = Auth::bearer(&token).ok_or("the token is not valid ASCII")?;
    Ok(AgentLink {
        channel,
        auth,
        fast: provider.link_is_fast(),
    })
}

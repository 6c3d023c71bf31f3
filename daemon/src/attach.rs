//! Presence for the agent's idle autostop. While the daemon is connected it
//! holds one `Attach` stream open on the engine's current link and pings every
//! [`PING_INTERVAL`], so the agent counts it as attached and never stops the
//! machine under it; the agent's answers become the status's `autostop`.
//!
//! The stream follows the link: it is reopened on the new link after every
//! reconnect, and [`RETRY`] after it breaks on the same one (doubling while it
//! keeps failing, so a dead link is not hammered). It closes at shutdown, so
//! the agent's idle clock starts as soon as the daemon stops.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use bridge_proto::v1;
use bridge_proto::v1::agent_client::AgentClient;
use tokio::sync::mpsc::{self, error::TrySendError};
use tokio::sync::watch;
use tokio::time::{Instant, interval_at, sleep};
use tokio_stream::wrappers::ReceiverStream;
use tonic::Status;

use crate::control::Stop;
use crate::engine::{AgentLink, Shared};
use crate::status::Autostop;

/// How often the daemon pings. The agent forgets a daemon whose last ping is
/// 20 s old (four missed pings), which is what a sleeping laptop looks like.
pub const PING_INTERVAL: Duration = Duration::from_secs(5);
/// First wait before reopening a broken stream on the same link.
const RETRY: Duration = Duration::from_secs(1);
/// Longest wait between reopening attempts while they keep failing.
const RETRY_MAX: Duration = Duration::from_secs(10);
/// No answer to our pings for this long: the stream is dead even if the
/// connection still looks open.
const SILENCE: Duration = Duration::from_secs(20);

/// Keeps the daemon attached to whichever agent the engine is connected to,
/// until `stop` is set.
pub async fn run(shared: Arc<Shared>, mirror: String, mut stop: watch::Receiver<Option<Stop>>) {
    let mut links = shared.agent.subscribe();
    let mut retry = RETRY;
    loop {
        let link = tokio::select! {
            l = links.wait_for(Option::is_some) => match l {
                Ok(l) => (*l).clone().expect("waited for a link"),
                // The engine is gone: so is the daemon.
                Err(_) => return,
            },
            _ = stop.wait_for(Option::is_some) => return,
        };
        let ended = tokio::select! {
            e = hold(&shared, link, &mirror) => Some(e),
            // A reconnect: attach on the new link at once.
            _ = links.changed() => None,
            _ = stop.wait_for(Option::is_some) => {
                set(&shared, None);
                return;
            }
        };
        set(&shared, None);
        let Some(ended) = ended else {
            retry = RETRY;
            continue;
        };
        if ended.answered {
            retry = RETRY;
        }
        if ended.why.code() == tonic::Code::Unimplemented {
            // An agent from before autostop: nothing to hold, nothing to
            // show. Try again on the next link.
            tracing::info!("the agent has no idle autostop (older bridge-agent)");
            tokio::select! {
                _ = links.changed() => {}
                _ = stop.wait_for(Option::is_some) => return,
            }
            continue;
        }
        tracing::debug!(error = %ended.why.message(), "attach stream ended; reopening");
        tokio::select! {
            _ = sleep(retry) => {}
            _ = links.changed() => {}
            _ = stop.wait_for(Option::is_some) => return,
        }
        retry = (retry * 2).min(RETRY_MAX);
    }
}

/// Why an attach stream ended, and whether the agent answered on it at all.
struct Ended {
    why: Status,
    answered: bool,
}

/// Holds one `Attach` stream on `link`, pinging, until it breaks.
async fn hold(shared: &Shared, link: AgentLink, mirror: &str) -> Ended {
    let mut answered = false;
    let Err(why) = attached(shared, link, mirror, &mut answered).await;
    Ended { why, answered }
}

async fn attached(
    shared: &Shared,
    link: AgentLink,
    mirror: &str,
    answered: &mut bool,
) -> Result<Infallible, Status> {
    let mut client = AgentClient::with_interceptor(link.channel, link.auth);
    let ping = v1::AttachPing {
        mirror: mirror.to_string(),
    };
    // Room for one ping: a ping that cannot leave (a stalled link) is not
    // queued behind; the silence check below decides.
    let (tx, rx) = mpsc::channel(1);
    // The first ping names the mirror in the agent's log.
    let _ = tx.try_send(ping.clone());
    let mut answers = client.attach(ReceiverStream::new(rx)).await?.into_inner();
    let mut pings = interval_at(Instant::now() + PING_INTERVAL, PING_INTERVAL);
    let mut heard = Instant::now();
    loop {
        tokio::select! {
            a = answers.message() => match a? {
                Some(st) => {
                    heard = Instant::now();
                    *answered = true;
                    set(shared, Some(&st));
                }
                None => return Err(Status::unavailable("the agent ended the attach stream")),
            },
            _ = pings.tick() => {
                if heard.elapsed() > SILENCE {
                    return Err(Status::deadline_exceeded(format!(
                        "no answer from the agent for {} s",
                        SILENCE.as_secs()
                    )));
                }
                if let Err(TrySendError::Closed(_)) = tx.try_send(ping.clone()) {
                    return Err(Status::unavailable("the attach stream closed"));
                }
            }
        }
    }
}

/// Records what the agent said (`None`: nothing heard on the current link).
fn set(shared: &Shared, st: Option<&v1::IdleStatus>) {
    let autostop = st.filter(|s| s.idle_timeout_s > 0).map(|s| Autostop {
        timeout_s: s.idle_timeout_s,
        shutdown_in_s: s.shutdown_in_s,
        jobs_active: s.jobs_active,
        daemons: s.daemons,
        command: s.idle_command.clone(),
    });
    if let Ok(mut status) = shared.status.lock() {
        status.autostop = autostop;
    }
}

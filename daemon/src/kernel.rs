//! `bridge kernel`'s relay: a Jupyter kernel on the agent, reached by the
//! front end on the laptop's loopback as if it were local.
//!
//! One `Control.Kernel` call is one kernel. The daemon binds the five ports
//! of the front end's connection file (shell, iopub, stdin, control,
//! heartbeat), submits the kernel job through the job barrier (it runs in
//! the live mirror, see `JobSpec.kernel`), holds it on the agent
//! (`Jobs.Hold`) and carries every connection the front end makes to the
//! kernel's port on the agent as a durable connection
//! ([`bridge_proto::durable`]): the ZMTP bytes are relayed unmodified, the
//! HMAC key stays end to end, and a link cut stalls the channels instead of
//! breaking them.
//!
//! The shell channel has one more duty: before an `execute_request` reaches
//! the kernel, every save made before it was sent is on the agent
//! ([`zmtp::Scanner`] finds it; the engine's [`Command::Barrier`] waits).
//!
//! The call ending (the `bridge kernel` process exited or was killed) cancels
//! the kernel; the kernel ending (a front end's shutdown or restart) ends
//! the call.

mod zmtp;

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bridge_proto::durable::{self, Attachment, BoxFuture, ConnectError, Gate};
use bridge_proto::jobs::is_terminal;
use bridge_proto::v1::{self, DurableFrame, JobInfo, JobState, KernelDown, KernelUp};
use tokio::net::TcpListener;
use tokio::sync::{mpsc, oneshot, watch};
use tokio::task::JoinSet;
use tokio_stream::Stream;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Code, Status};

use crate::engine::Command;
use crate::forwards::Forwards;
use crate::jobs::Relay;

/// The channels of a connection file, in the order of `KernelUp.ports`.
pub const CHANNELS: [&str; 5] = ["shell", "iopub", "stdin", "control", "hb"];
const SHELL: usize = 0;

/// How long a connection may stay cut before the daemon gives up on it (the
/// agent's grace for an orphaned kernel, which is the longer wait).
const CONN_GRACE: Duration = Duration::from_secs(15 * 60);

/// How long a kernel's start waits for the agent connection.
const CONNECT_WAIT: Duration = Duration::from_secs(20);

/// How long the daemon keeps trying to cancel a kernel whose `bridge kernel`
/// went away while the agent was unreachable (the agent reaps it after its
/// own grace period anyway).
const CANCEL_RETRY_FOR: Duration = Duration::from_secs(10 * 60);

pub type DownStream = Pin<Box<dyn Stream<Item = Result<KernelDown, Status>> + Send>>;

/// Starts a kernel for the `Control.Kernel` call `up`.
pub fn serve(
    relay: Arc<Relay>,
    cmds: mpsc::Sender<Command>,
    forwards: Arc<Forwards>,
    up: tonic::Streaming<KernelUp>,
) -> DownStream {
    let (tx, rx) = mpsc::channel(16);
    tokio::spawn(async move {
        if let Err(e) = session(relay, cmds, forwards, up, tx.clone()).await {
            let _ = tx.send(Err(e)).await;
        }
    });
    Box::pin(ReceiverStream::new(rx))
}

type Down = mpsc::Sender<Result<KernelDown, Status>>;

async fn say(down: &Down, state: &str, job: Option<&JobInfo>, message: impl Into<String>) {
    let _ = down
        .send(Ok(KernelDown {
            state: state.into(),
            job: job.cloned(),
            message: message.into(),
        }))
        .await;
}

/// The front end's address: loopback only.
fn front_end_ip(ip: &str) -> Result<IpAddr, Status> {
    let ip = match ip {
        "" | "localhost" => IpAddr::V4(Ipv4Addr::LOCALHOST),
        s => s.parse().map_err(|_| {
            Status::invalid_argument(format!("the connection file's ip {s:?} is not an address"))
        })?,
    };
    if !ip.is_loopback() {
        return Err(Status::invalid_argument(format!(
            "the connection file asks for {ip}: bridge kernels listen on loopback only \
             (set the front end's ip to 127.0.0.1)"
        )));
    }
    Ok(ip)
}

fn bind(ip: IpAddr, ports: &[u32]) -> Result<Vec<TcpListener>, Status> {
    if ports.len() != CHANNELS.len() {
        return Err(Status::invalid_argument(format!(
            "a connection file has {} ports, not {}",
            CHANNELS.len(),
            ports.len()
        )));
    }
    let mut out = Vec::new();
    for (name, &p) in CHANNELS.iter().zip(ports) {
        let port = bridge_proto::tunnel::valid_port(p).ok_or_else(|| {
            Status::invalid_argument(format!("the connection file's {name}_port is {p}"))
        })?;
        let std = std::net::TcpListener::bind(SocketAddr::new(ip, port)).map_err(|e| {
            Status::failed_precondition(format!(
                "cannot listen on {ip}:{port} (the {name} channel): {e}"
            ))
        })?;
        std.set_nonblocking(true)
            .map_err(|e| Status::internal(e.to_string()))?;
        out.push(TcpListener::from_std(std).map_err(|e| Status::internal(e.to_string()))?);
    }
    Ok(out)
}

async fn session(
    relay: Arc<Relay>,
    cmds: mpsc::Sender<Command>,
    forwards: Arc<Forwards>,
    mut up: tonic::Streaming<KernelUp>,
    down: Down,
) -> Result<(), Status> {
    let first = up
        .message()
        .await?
        .ok_or_else(|| Status::invalid_argument("a kernel call without its first message"))?;
    let mut spec = first
        .spec
        .ok_or_else(|| Status::invalid_argument("a kernel call without a job spec"))?;
    if spec.kernel.is_none() {
        return Err(Status::invalid_argument("the job spec is not a kernel's"));
    }
    spec.live = true;
    let ip = front_end_ip(&first.ip)?;
    // The ports first: one that is taken fails at once, before the agent
    // starts anything.
    let listeners = bind(ip, &first.ports)?;
    // Never a hang: an agent out of reach is an error the front end shows.
    relay.connected(CONNECT_WAIT).await?;
    // The job file's forwards and MLflow, as for `bridge run`.
    let prepared = forwards.prepare_job(&mut spec).await?;
    for n in &prepared.notes {
        say(&down, "starting", None, format!("warning: {n}")).await;
    }
    let job = match relay.submit(spec, None).await {
        Ok(j) => j,
        Err(e) => {
            forwards.abandon(prepared).await;
            return Err(e);
        }
    };
    for f in forwards.adopt(&prepared, &job.id) {
        say(
            &down,
            "starting",
            None,
            format!(
                "forward {}: laptop port {} ↔ agent port {}",
                f.spec.map(|s| s.name).unwrap_or_default(),
                f.local_port,
                f.remote_port
            ),
        )
        .await;
    }
    tracing::info!(job = %job.id, "kernel submitted");
    say(
        &down,
        "starting",
        Some(&job),
        format!(
            "kernel job {} submitted; starting ipykernel on the agent",
            job.id
        ),
    )
    .await;

    let (ports_tx, ports_rx) = watch::channel::<Option<Vec<u16>>>(None);
    let (ended_tx, mut ended_rx) = oneshot::channel::<JobInfo>();
    let mut tasks = JoinSet::new();
    tasks.spawn(hold(
        relay.clone(),
        job.id.clone(),
        ports_tx,
        ended_tx,
        down.clone(),
    ));
    let nonce = nonce();
    for (chan, listener) in listeners.into_iter().enumerate() {
        tasks.spawn(accept(
            relay.clone(),
            cmds.clone(),
            job.id.clone(),
            chan,
            listener,
            ports_rx.clone(),
            nonce.clone(),
        ));
    }

    let ended = loop {
        tokio::select! {
            m = up.message() => match m {
                Ok(Some(m)) if m.interrupt => {
                    match relay.interrupt(&job.id).await {
                        Ok(_) => tracing::info!(job = %job.id, "kernel interrupted"),
                        Err(e) => say(&down, "running", None, format!("cannot interrupt the kernel: {}", e.message())).await,
                    }
                }
                Ok(Some(_)) => {}
                // `bridge kernel` is gone (exited, killed): so is its kernel.
                _ => break None,
            },
            e = &mut ended_rx => break e.ok(),
        }
    };
    // The listeners are closed before the front end hears of the end: a
    // restart binds the same ports again at once.
    tasks.abort_all();
    while tasks.join_next().await.is_some() {}
    match ended {
        Some(info) => {
            let why = if info.reason.is_empty() {
                String::new()
            } else {
                format!("the kernel ended: {}", info.reason)
            };
            say(&down, "ended", Some(&info), why).await;
        }
        None => {
            tracing::info!(job = %job.id, "bridge kernel went away: cancelling its kernel");
            tokio::spawn(cancel(relay, job.id.clone()));
        }
    }
    Ok(())
}

/// Cancels the kernel, retrying while the agent is unreachable.
async fn cancel(relay: Arc<Relay>, id: String) {
    let until = Instant::now() + CANCEL_RETRY_FOR;
    loop {
        match relay.cancel(&id).await {
            Ok(_) => return,
            Err(s) if matches!(s.code(), Code::FailedPrecondition | Code::NotFound) => return,
            Err(s) if Instant::now() >= until => {
                tracing::warn!(job = %id, error = %s.message(), "cannot cancel the kernel; the agent reaps it after its grace period");
                return;
            }
            Err(_) => tokio::time::sleep(Duration::from_secs(1)).await,
        }
    }
}

/// Holds the kernel on the agent across reconnects, and reports its ports
/// and its end.
async fn hold(
    relay: Arc<Relay>,
    id: String,
    ports: watch::Sender<Option<Vec<u16>>>,
    ended: oneshot::Sender<JobInfo>,
    down: Down,
) {
    let mut ready = false;
    let mut cut = false;
    loop {
        let link = match relay.link().await {
            Ok(l) => l,
            Err(_) => continue,
        };
        match link.jobs().hold(v1::JobRef { id: id.clone() }).await {
            Ok(r) => {
                if cut {
                    cut = false;
                    say(&down, "running", None, "reconnected to the kernel").await;
                }
                let mut events = r.into_inner();
                while let Ok(Some(ev)) = events.message().await {
                    let Some(job) = ev.job else { continue };
                    if !ev.ports.is_empty() {
                        let p: Vec<u16> = ev
                            .ports
                            .iter()
                            .filter_map(|&p| u16::try_from(p).ok())
                            .collect();
                        if p.len() == CHANNELS.len() && ports.borrow().as_ref() != Some(&p) {
                            ports.send_replace(Some(p));
                        }
                        if !ready {
                            ready = true;
                            say(&down, "ready", Some(&job), "").await;
                        }
                    }
                    if is_terminal(job.state()) {
                        let _ = ended.send(job);
                        return;
                    }
                }
            }
            Err(s) if s.code() == Code::NotFound => {
                let _ = ended.send(JobInfo {
                    id: id.clone(),
                    state: JobState::Lost as i32,
                    reason: "the agent no longer knows the kernel".into(),
                    ..Default::default()
                });
                return;
            }
            Err(_) => {}
        }
        if !cut {
            cut = true;
            say(
                &down,
                "reconnecting",
                None,
                "lost the agent connection; the kernel keeps running, reconnecting",
            )
            .await;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// A per-daemon-run prefix for connection ids, so that a restarted daemon
/// never resumes another's connection.
fn nonce() -> String {
    let mut b = [0u8; 8];
    let _ = getrandom::fill(&mut b);
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// Carries every connection the front end makes to one channel's port.
async fn accept(
    relay: Arc<Relay>,
    cmds: mpsc::Sender<Command>,
    job: String,
    chan: usize,
    listener: TcpListener,
    mut ports: watch::Receiver<Option<Vec<u16>>>,
    nonce: String,
) {
    let mut conns = JoinSet::new();
    let seq = AtomicU64::new(0);
    loop {
        let (sock, _) = match listener.accept().await {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(error = %e, channel = CHANNELS[chan], "accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        // Until the kernel has bound its ports the front end's connection
        // waits here (ZMQ connects as soon as the kernel process starts).
        let port = match ports.wait_for(|p| p.is_some()).await {
            Ok(p) => p.as_ref().expect("waited for Some")[chan],
            Err(_) => return,
        };
        let n = seq.fetch_add(1, Ordering::Relaxed);
        let id = format!("{nonce}.{job}.{}.{n}", CHANNELS[chan]);
        let gate: Option<Box<dyn Gate>> = (chan == SHELL).then(|| {
            Box::new(ShellGate {
                scanner: zmtp::Scanner::default(),
                cmds: cmds.clone(),
            }) as Box<dyn Gate>
        });
        let connect = connector(relay.clone(), id.clone(), port, job.clone());
        let (_keep, attach) = mpsc::channel(1);
        conns.spawn(async move {
            let _keep = _keep;
            let end = durable::run(
                sock,
                attach,
                durable::Options {
                    grace: CONN_GRACE,
                    gate,
                    connect: Some(connect),
                },
            )
            .await;
            tracing::debug!(id, ?end, "kernel connection ended");
        });
        // Reap finished ones as we go.
        while conns.try_join_next().is_some() {}
    }
}

fn connector(relay: Arc<Relay>, id: String, port: u16, job: String) -> durable::Connect {
    Box::new(move |received| {
        let relay = relay.clone();
        let hello = DurableFrame {
            id: id.clone(),
            port: u32::from(port),
            job: job.clone(),
            resume_from: received,
            ..Default::default()
        };
        Box::pin(async move {
            let link = relay
                .link()
                .await
                .map_err(|s| ConnectError::Retry(s.message().into()))?;
            let (tx, rx) = mpsc::channel(durable::QUEUE);
            tx.send(hello)
                .await
                .map_err(|_| ConnectError::Retry("closed".into()))?;
            let mut inbound = match link.tunnels().resume(ReceiverStream::new(rx)).await {
                Ok(r) => r.into_inner(),
                Err(s) if s.code() == Code::NotFound => {
                    return Err(ConnectError::Gone(s.message().into()));
                }
                Err(s) => return Err(ConnectError::Retry(s.message().into())),
            };
            let first = match inbound.message().await {
                Ok(Some(f)) => f,
                Ok(None) => return Err(ConnectError::Retry("the call ended".into())),
                Err(s) if s.code() == Code::NotFound => {
                    return Err(ConnectError::Gone(s.message().into()));
                }
                Err(s) => return Err(ConnectError::Retry(s.message().into())),
            };
            if first.reset {
                return Err(ConnectError::Gone(
                    "the agent dropped the connection".into(),
                ));
            }
            Ok(Attachment {
                inbound,
                out: tx,
                peer_received: first.resume_from,
                send_hello: false,
            })
        }) as BoxFuture<_>
    })
}

/// The shell channel's gate: an `execute_request` waits for the barrier.
struct ShellGate {
    scanner: zmtp::Scanner,
    cmds: mpsc::Sender<Command>,
}

impl Gate for ShellGate {
    fn scan(&mut self, data: &[u8]) -> Option<usize> {
        self.scanner.scan(data)
    }

    fn barrier(&mut self) -> BoxFuture<()> {
        let cmds = self.cmds.clone();
        Box::pin(async move {
            let t = Instant::now();
            let (reply, rx) = oneshot::channel();
            if cmds.send(Command::Barrier { reply }).await.is_err() {
                return;
            }
            match rx.await {
                Ok(Ok(_)) => {
                    tracing::debug!(ms = t.elapsed().as_secs_f64() * 1e3, "kernel barrier")
                }
                // The cell runs anyway: the user sees the error in the
                // daemon's status, and a stale cell beats a stuck one.
                Ok(Err(e)) => tracing::warn!(error = %e, "kernel barrier failed"),
                Err(_) => {}
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_loopback_addresses_are_served() {
        assert!(front_end_ip("127.0.0.1").is_ok());
        assert!(front_end_ip("").is_ok());
        assert!(front_end_ip("::1").is_ok());
        let e = front_end_ip("0.0.0.0").unwrap_err();
        assert!(e.message().contains("loopback only"), "{}", e.message());
        assert!(front_end_ip("10.1.2.3").is_err());
        assert!(front_end_ip("example").is_err());
    }

    #[test]
    fn a_taken_port_is_named() {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let taken = u32::from(l.local_addr().unwrap().port());
        let free: Vec<u32> = (0..4)
            .map(|_| {
                let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
                u32::from(l.local_addr().unwrap().port())
            })
            .collect();
        let ports = [taken, free[0], free[1], free[2], free[3]];
        let e = bind(IpAddr::V4(Ipv4Addr::LOCALHOST), &ports).unwrap_err();
        assert!(e.message().contains("shell channel"), "{}", e.message());
        assert!(bind(IpAddr::V4(Ipv4Addr::LOCALHOST), &ports[..3]).is_err());
    }
}

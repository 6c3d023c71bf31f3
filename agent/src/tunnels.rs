//! The agent's end of port forwards (`bridge.v1.Tunnels`): it dials ports on
//! its own loopback for the daemon's local forwards, and keeps listeners on
//! its loopback for reverse forwards, whose connections the daemon carries
//! to the laptop.
//!
//! A listener belongs to a *key* the daemon chose, not to a call: when the
//! `Listen` stream breaks (a link cut, a daemon restart) the listener keeps
//! its port and keeps accepting, connections wait up to [`PENDING_WAIT`] for
//! a daemon to come back for them, and a `Listen` with the same key within
//! [`LISTEN_GRACE`] attaches again and is told about them. A job that logs
//! to the laptop's MLflow through one so never sees its port change, and a
//! request made during a short cut is served once the link heals.
//!
//! Only loopback is ever bound or dialed.

use std::collections::HashMap;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bridge_proto::durable;
use bridge_proto::tunnel::{self, QUEUE};
use bridge_proto::v1::tunnels_server::Tunnels;
use bridge_proto::v1::{self, ListenEvent, TunnelFrame};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, watch};
use tokio_stream::Stream;
use tokio_stream::wrappers::{ReceiverStream, UnboundedReceiverStream};
use tonic::{Request, Response, Status, Streaming};

/// How long a connection accepted while no daemon is attached waits for one
/// before it is closed.
pub const PENDING_WAIT: Duration = Duration::from_secs(10);
/// How long a listener with no daemon attached stays up.
pub const LISTEN_GRACE: Duration = Duration::from_secs(10 * 60);
/// Bounds against a runaway daemon: listeners, and connections waiting.
const MAX_LISTENERS: usize = 256;
const MAX_PENDING: usize = 1024;
/// How long dialing a loopback port may take.
const DIAL_TIMEOUT: Duration = Duration::from_secs(5);

type BoxStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send + 'static>>;

/// Listeners and the connections waiting for a daemon, shared by the calls.
#[derive(Default)]
pub struct Registry {
    inner: Mutex<Inner>,
    next_id: AtomicU64,
}

#[derive(Default)]
struct Inner {
    listeners: HashMap<String, Listener>,
    /// Durable connections (`Resume`) by id.
    durable: HashMap<String, Durable>,
    /// Accepted connections not yet taken by an `Accept`, by id.
    pending: HashMap<u64, Pending>,
}

struct Listener {
    port: u16,
    /// Which daemon's mirror asked for it (for the log).
    mirror: String,
    /// The attached `Listen` call: its event channel and a number telling
    /// attachments apart (a stale call's end must not detach a newer one).
    attached: Option<(u64, mpsc::UnboundedSender<Result<ListenEvent, Status>>)>,
    /// Since when no daemon is attached.
    detached_at: Option<Instant>,
    /// The accept loop; aborted (closing the socket) when the listener goes.
    accepting: tokio::task::JoinHandle<()>,
}

/// One durable connection's task: new calls reach it on `attach`.
struct Durable {
    attach: mpsc::Sender<durable::Attachment>,
    /// The job whose end closes it.
    job: u64,
    task: tokio::task::AbortHandle,
}

/// How long a durable connection with no call attached is kept (an
/// orphaned kernel's grace: `bridge kernel` may come back within it).
pub const DURABLE_GRACE: Duration = Duration::from_secs(10 * 60);
/// Bounds the durable connections (a front end opens a handful per kernel).
const MAX_DURABLE: usize = 1024;

struct Pending {
    key: String,
    stream: TcpStream,
    at: Instant,
}

impl Registry {
    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Closes what waited too long: connections no daemon took, listeners
    /// no daemon came back for.
    fn expire(&self, now: Instant) {
        let mut inner = self.lock();
        inner
            .pending
            .retain(|_, p| now.duration_since(p.at) < PENDING_WAIT);
        let gone: Vec<String> = inner
            .listeners
            .iter()
            .filter(|(_, l)| {
                l.detached_at
                    .is_some_and(|t| now.duration_since(t) >= LISTEN_GRACE)
            })
            .map(|(k, _)| k.clone())
            .collect();
        for k in gone {
            if let Some(l) = inner.listeners.remove(&k) {
                tracing::info!(key = %k, port = l.port, mirror = %l.mirror, "reverse forward listener expired");
                l.accepting.abort();
            }
            inner.pending.retain(|_, p| p.key != k);
        }
    }

    /// Closes the durable connections of jobs that have ended.
    fn close_ended(&self, ended: &(dyn Fn(u64) -> bool + Send + Sync)) {
        let mut inner = self.lock();
        inner.durable.retain(|id, d| {
            let keep = !d.task.is_finished() && !ended(d.job);
            if !keep {
                tracing::debug!(id, "durable connection closed");
                d.task.abort();
            }
            keep
        });
    }

    /// A connection `key`'s listener accepted: kept until a daemon takes it,
    /// and announced to the attached one.
    fn accepted(&self, key: &str, stream: TcpStream) {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed) + 1;
        let mut inner = self.lock();
        if inner.pending.len() >= MAX_PENDING {
            tracing::warn!(
                key,
                "too many reverse-forward connections waiting; closing one"
            );
            return;
        }
        inner.pending.insert(
            id,
            Pending {
                key: key.to_string(),
                stream,
                at: Instant::now(),
            },
        );
        if let Some(l) = inner.listeners.get(key)
            && let Some((_, tx)) = &l.attached
        {
            let _ = tx.send(Ok(ListenEvent {
                accept_id: id,
                ..Default::default()
            }));
        }
    }

    /// The agent stops: every listener and waiting connection goes, which
    /// also ends the `Listen` calls.
    fn close_all(&self) {
        let mut inner = self.lock();
        inner.pending.clear();
        for (_, d) in inner.durable.drain() {
            d.task.abort();
        }
        for (_, l) in inner.listeners.drain() {
            l.accepting.abort();
        }
    }

    /// Removes a listener and the connections waiting on it.
    fn remove(&self, key: &str) -> bool {
        let mut inner = self.lock();
        inner.pending.retain(|_, p| p.key != key);
        match inner.listeners.remove(key) {
            Some(l) => {
                l.accepting.abort();
                true
            }
            None => false,
        }
    }
}

pub struct TunnelsService {
    pub registry: Arc<Registry>,
    /// The agent is shutting down: open tunnels end.
    pub stopping: watch::Receiver<bool>,
}

/// Which jobs have ended, for durable connections that belong to one.
pub type Ended = Arc<dyn Fn(u64) -> bool + Send + Sync>;

impl TunnelsService {
    pub fn new(stopping: watch::Receiver<bool>, ended: Option<Ended>) -> TunnelsService {
        let registry = Arc::new(Registry::default());
        let weak = Arc::downgrade(&registry);
        let mut stop = stopping.clone();
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    _ = stop.wait_for(|s| *s) => {
                        if let Some(r) = weak.upgrade() {
                            r.close_all();
                        }
                        return;
                    }
                    _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                }
                match weak.upgrade() {
                    Some(r) => {
                        r.expire(Instant::now());
                        if let Some(ended) = &ended {
                            r.close_ended(ended.as_ref());
                        }
                    }
                    None => return,
                }
            }
        });
        TunnelsService { registry, stopping }
    }

    /// Splices `tcp` with the call's streams on a task of its own; the
    /// response stream it returns ends with the connection.
    fn carry(
        &self,
        tcp: TcpStream,
        first: TunnelFrame,
        inbound: Streaming<TunnelFrame>,
        what: String,
    ) -> BoxStream<TunnelFrame> {
        let (tx, rx) = mpsc::channel(QUEUE);
        let mut stopping = self.stopping.clone();
        tokio::spawn(async move {
            tokio::select! {
                r = tunnel::splice(tcp, first, inbound, tx) => match r {
                    Ok(c) => tracing::debug!(%what, sent = c.sent, received = c.received, "tunnel closed"),
                    Err(e) => tracing::debug!(%what, error = %e, "tunnel ended"),
                },
                _ = stopping.wait_for(|s| *s) => {}
            }
        });
        Box::pin(tokio_stream::StreamExt::map(ReceiverStream::new(rx), Ok))
    }
}

/// The first frame of a tunnel call.
async fn first_frame(inbound: &mut Streaming<TunnelFrame>) -> Result<TunnelFrame, Status> {
    inbound
        .message()
        .await?
        .ok_or_else(|| Status::invalid_argument("a tunnel call must start with a frame"))
}

/// Dials `port` on the loopback: 127.0.0.1, then ::1 (a server bound to
/// "localhost" may have only the IPv6 one).
async fn dial(port: u16) -> Result<TcpStream, Status> {
    let mut last = None;
    for ip in [Ipv4Addr::LOCALHOST.into(), Ipv6Addr::LOCALHOST.into()] {
        let addr = SocketAddr::new(ip, port);
        match tokio::time::timeout(DIAL_TIMEOUT, TcpStream::connect(addr)).await {
            // Connecting to a free port of the ephemeral range can pick that
            // very port as the source and meet itself (TCP's simultaneous
            // open): a "connection" to nothing, which also takes the port
            // from the server about to listen there (a waiting debugger's
            // retries made this likely).
            Ok(Ok(s)) if s.local_addr().ok() == s.peer_addr().ok() => {
                last = Some("nothing listens (the connection met itself)".into());
            }
            Ok(Ok(s)) => return Ok(s),
            Ok(Err(e)) => last = Some(e.to_string()),
            Err(_) => last = Some("timed out".into()),
        }
    }
    Err(Status::failed_precondition(format!(
        "nothing listens on 127.0.0.1:{port} on the agent ({})",
        last.unwrap_or_default()
    )))
}

/// A free loopback port *below* the kernel's ephemeral range
/// (`ip_local_port_range`). The port is only used seconds later (debugpy
/// listens there once its job has started), and within the ephemeral range
/// anything binding port 0 or connecting out can take it meanwhile: on a
/// busy machine the debugger then attached to someone else's socket. Below
/// the range only an explicit bind can. `None`: none found, or no range.
fn free_port_below_ephemeral() -> Option<u16> {
    let range = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range").ok()?;
    let low: u16 = range.split_whitespace().next()?.parse().ok()?;
    let (from, to) = (low / 2, low);
    if to <= from || from < 1024 {
        return None;
    }
    let span = u32::from(to - from);
    let mut seed = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos())
        ^ std::process::id().rotate_left(16);
    for _ in 0..64 {
        // xorshift: any spread will do, the bind decides.
        seed ^= seed << 13;
        seed ^= seed >> 17;
        seed ^= seed << 5;
        let port = from + (seed % span) as u16;
        if std::net::TcpListener::bind(SocketAddr::from((Ipv4Addr::LOCALHOST, port))).is_ok() {
            return Some(port);
        }
    }
    None
}

fn valid_key(k: &str) -> bool {
    !k.is_empty()
        && k.len() <= 128
        && k.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._:-".contains(&b))
}

/// Binds 127.0.0.1:`port` (0: any), or any free port when it is taken and
/// not `exact`.
async fn bind(port: u16, exact: bool) -> Result<TcpListener, Status> {
    let any = SocketAddr::from((Ipv4Addr::LOCALHOST, 0));
    match TcpListener::bind(SocketAddr::from((Ipv4Addr::LOCALHOST, port))).await {
        Ok(l) => Ok(l),
        Err(e) if e.kind() == std::io::ErrorKind::AddrInUse && !exact => TcpListener::bind(any)
            .await
            .map_err(|e| Status::internal(format!("cannot bind a port on 127.0.0.1: {e}"))),
        Err(e) if e.kind() == std::io::ErrorKind::AddrInUse => Err(Status::already_exists(
            format!("port {port} is already in use on the agent"),
        )),
        Err(e) => Err(Status::internal(format!(
            "cannot bind 127.0.0.1:{port} on the agent: {e}"
        ))),
    }
}

#[tonic::async_trait]
impl Tunnels for TunnelsService {
    type DialStream = BoxStream<TunnelFrame>;

    async fn dial(
        &self,
        req: Request<Streaming<TunnelFrame>>,
    ) -> Result<Response<Self::DialStream>, Status> {
        let mut inbound = req.into_inner();
        let mut first = first_frame(&mut inbound).await?;
        let port = tunnel::valid_port(first.port).ok_or_else(|| {
            Status::invalid_argument(format!("{} is not a port (1-65535)", first.port))
        })?;
        if self
            .registry
            .lock()
            .listeners
            .values()
            .any(|l| l.port == port)
        {
            // Dialing a reverse forward's own listener would carry the
            // connection back to the laptop, and maybe round again.
            return Err(Status::failed_precondition(format!(
                "agent port {port} is a reverse forward's listener; forwarding to it would loop"
            )));
        }
        let tcp = dial(port).await?;
        first.port = 0;
        Ok(Response::new(self.carry(
            tcp,
            first,
            inbound,
            format!("dial 127.0.0.1:{port}"),
        )))
    }

    type ListenStream = BoxStream<ListenEvent>;

    async fn listen(
        &self,
        req: Request<v1::ListenRequest>,
    ) -> Result<Response<Self::ListenStream>, Status> {
        let req = req.into_inner();
        if !valid_key(&req.key) {
            return Err(Status::invalid_argument(format!(
                "invalid listener key {:?}: use letters, digits, '.', '_', ':' and '-' (at most 128)",
                req.key
            )));
        }
        let port = u16::try_from(req.port)
            .map_err(|_| Status::invalid_argument(format!("{} is not a port", req.port)))?;
        let (tx, rx) = mpsc::unbounded_channel();
        let seq = self.registry.next_id.fetch_add(1, Ordering::Relaxed) + 1;
        // Attach to the listener of this key, or bind a new one.
        let attached = {
            let mut inner = self.registry.lock();
            let Inner {
                listeners, pending, ..
            } = &mut *inner;
            let full = listeners.len() >= MAX_LISTENERS;
            match listeners.get_mut(&req.key) {
                Some(l) => {
                    let _ = tx.send(Ok(ListenEvent {
                        bound_port: l.port as u32,
                        ..Default::default()
                    }));
                    for (id, _) in pending.iter().filter(|(_, p)| p.key == req.key) {
                        let _ = tx.send(Ok(ListenEvent {
                            accept_id: *id,
                            ..Default::default()
                        }));
                    }
                    l.attached = Some((seq, tx.clone()));
                    l.detached_at = None;
                    true
                }
                None if full => {
                    return Err(Status::resource_exhausted(format!(
                        "the agent already holds {MAX_LISTENERS} reverse forwards"
                    )));
                }
                None => false,
            }
        };
        if !attached {
            let listener = bind(port, req.exact).await?;
            let bound = listener
                .local_addr()
                .map_err(|e| Status::internal(e.to_string()))?
                .port();
            let registry = Arc::downgrade(&self.registry);
            let key = req.key.clone();
            let accepting = tokio::spawn(async move {
                loop {
                    match listener.accept().await {
                        Ok((s, _)) => match registry.upgrade() {
                            Some(r) => r.accepted(&key, s),
                            None => return,
                        },
                        Err(e) => {
                            tracing::warn!(key = %key, error = %e, "reverse forward accept failed");
                            tokio::time::sleep(Duration::from_millis(100)).await;
                        }
                    }
                }
            });
            let mut inner = self.registry.lock();
            if let Some(old) = inner.listeners.remove(&req.key) {
                // Two calls for a new key raced: the later one wins.
                old.accepting.abort();
            }
            let _ = tx.send(Ok(ListenEvent {
                bound_port: bound as u32,
                ..Default::default()
            }));
            inner.listeners.insert(
                req.key.clone(),
                Listener {
                    port: bound,
                    mirror: req.mirror.clone(),
                    attached: Some((seq, tx.clone())),
                    detached_at: None,
                    accepting,
                },
            );
            tracing::info!(key = %req.key, port = bound, asked = port, mirror = %req.mirror, "reverse forward listening");
        }
        // When the call ends, the listener waits for the next one.
        let registry = Arc::downgrade(&self.registry);
        let key = req.key.clone();
        let mut stopping = self.stopping.clone();
        let ended = tx.clone();
        tokio::spawn(async move {
            tokio::select! {
                _ = ended.closed() => {}
                _ = stopping.wait_for(|s| *s) => {}
            }
            drop(ended);
            if let Some(r) = registry.upgrade()
                && let Some(l) = r.lock().listeners.get_mut(&key)
                && l.attached.as_ref().is_some_and(|(s, _)| *s == seq)
            {
                l.attached = None;
                l.detached_at = Some(Instant::now());
            }
        });
        // The stream ends when every sender is gone: the agent's stop drops
        // the listeners (the graceful shutdown waits for open calls).
        Ok(Response::new(Box::pin(UnboundedReceiverStream::new(rx))))
    }

    type AcceptStream = BoxStream<TunnelFrame>;

    async fn accept(
        &self,
        req: Request<Streaming<TunnelFrame>>,
    ) -> Result<Response<Self::AcceptStream>, Status> {
        let mut inbound = req.into_inner();
        let mut first = first_frame(&mut inbound).await?;
        let id = first.accept_id;
        let pending = self.registry.lock().pending.remove(&id).ok_or_else(|| {
            Status::not_found(format!("no connection {id} is waiting (closed or taken)"))
        })?;
        first.accept_id = 0;
        Ok(Response::new(self.carry(
            pending.stream,
            first,
            inbound,
            format!("reverse {}", pending.key),
        )))
    }

    async fn unlisten(
        &self,
        req: Request<v1::UnlistenRequest>,
    ) -> Result<Response<v1::UnlistenReply>, Status> {
        let key = req.into_inner().key;
        if self.registry.remove(&key) {
            tracing::info!(key = %key, "reverse forward removed");
        }
        Ok(Response::new(v1::UnlistenReply {}))
    }

    type ResumeStream = BoxStream<v1::DurableFrame>;

    async fn resume(
        &self,
        req: Request<Streaming<v1::DurableFrame>>,
    ) -> Result<Response<Self::ResumeStream>, Status> {
        let mut inbound = req.into_inner();
        let first = inbound
            .message()
            .await?
            .ok_or_else(|| Status::invalid_argument("a resume call must start with a frame"))?;
        if !valid_key(&first.id) {
            return Err(Status::invalid_argument(format!(
                "{:?} is not a connection id ([A-Za-z0-9._:-]+, at most 128 bytes)",
                first.id
            )));
        }
        let (tx, rx) = mpsc::channel(durable::QUEUE);
        let attachment = durable::Attachment {
            inbound,
            out: tx,
            peer_received: first.resume_from,
            send_hello: true,
        };
        let existing = self
            .registry
            .lock()
            .durable
            .get(&first.id)
            .filter(|d| !d.task.is_finished())
            .map(|d| d.attach.clone());
        match existing {
            Some(attach) => {
                if attach.send(attachment).await.is_err() {
                    return Err(Status::not_found(format!(
                        "connection {} is gone",
                        first.id
                    )));
                }
                tracing::debug!(id = %first.id, "durable connection resumed");
            }
            None if first.resume_from > 0 => {
                return Err(Status::not_found(format!(
                    "connection {} is gone (the agent restarted, or it ended)",
                    first.id
                )));
            }
            None => {
                let port = tunnel::valid_port(first.port).ok_or_else(|| {
                    Status::invalid_argument(format!("{} is not a port (1-65535)", first.port))
                })?;
                let job = first.job.parse::<u64>().map_err(|_| {
                    Status::invalid_argument(format!("{:?} is not a job id", first.job))
                })?;
                if self.registry.lock().durable.len() >= MAX_DURABLE {
                    return Err(Status::resource_exhausted("too many durable connections"));
                }
                let tcp = dial(port).await?;
                let (attach_tx, attach_rx) = mpsc::channel(1);
                let _ = attach_tx.try_send(attachment);
                let id = first.id.clone();
                let mut stopping = self.stopping.clone();
                let task = tokio::spawn(async move {
                    let opts = durable::Options {
                        grace: DURABLE_GRACE,
                        gate: None,
                        connect: None,
                    };
                    tokio::select! {
                        end = durable::run(tcp, attach_rx, opts) => {
                            tracing::debug!(%id, ?end, "durable connection ended");
                        }
                        _ = stopping.wait_for(|s| *s) => {}
                    }
                });
                let old = self.registry.lock().durable.insert(
                    first.id.clone(),
                    Durable {
                        attach: attach_tx,
                        job,
                        task: task.abort_handle(),
                    },
                );
                if let Some(old) = old {
                    old.task.abort();
                }
                tracing::debug!(id = %first.id, port, "durable connection opened");
            }
        }
        Ok(Response::new(Box::pin(tokio_stream::StreamExt::map(
            ReceiverStream::new(rx),
            Ok,
        ))))
    }

    async fn free_port(
        &self,
        _: Request<v1::FreePortRequest>,
    ) -> Result<Response<v1::FreePortReply>, Status> {
        if let Some(port) = free_port_below_ephemeral() {
            return Ok(Response::new(v1::FreePortReply {
                port: u32::from(port),
            }));
        }
        let l = TcpListener::bind(SocketAddr::from((Ipv4Addr::LOCALHOST, 0)))
            .await
            .map_err(|e| Status::internal(format!("cannot find a free port: {e}")))?;
        let port = l
            .local_addr()
            .map_err(|e| Status::internal(e.to_string()))?
            .port();
        Ok(Response::new(v1::FreePortReply { port: port as u32 }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn free_ports_come_from_below_the_ephemeral_range() {
        let range = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range").unwrap();
        let low: u16 = range.split_whitespace().next().unwrap().parse().unwrap();
        let p = free_port_below_ephemeral().expect("a free port");
        assert!(p < low && p >= low / 2, "{p} outside {}..{low}", low / 2);
        std::net::TcpListener::bind(("127.0.0.1", p)).expect("still free");
    }

    #[test]
    fn keys() {
        assert!(valid_key("bridge-1a2b:fwd.3"));
        assert!(!valid_key(""));
        assert!(!valid_key("a/b"));
        assert!(!valid_key(&"k".repeat(129)));
    }

    #[tokio::test]
    async fn taken_ports_give_way_unless_exact() {
        let held = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = held.local_addr().unwrap().port();
        let other = bind(port, false).await.unwrap();
        assert_ne!(other.local_addr().unwrap().port(), port);
        assert!(other.local_addr().unwrap().ip().is_loopback());
        let e = bind(port, true).await.unwrap_err();
        assert_eq!(e.code(), tonic::Code::AlreadyExists);
    }

    #[tokio::test]
    async fn dialing_nothing_is_a_clear_refusal() {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = l.local_addr().unwrap().port();
        drop(l);
        let e = dial(port).await.unwrap_err();
        assert_eq!(e.code(), tonic::Code::FailedPrecondition);
        assert!(
            e.message().contains(&format!("127.0.0.1:{port}")),
            "{}",
            e.message()
        );
    }

    #[tokio::test]
    async fn waiting_connections_and_idle_listeners_expire() {
        let r = Registry::default();
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let client = TcpStream::connect(addr).await.unwrap();
        let (server, _) = l.accept().await.unwrap();
        r.accepted("k", server);
        assert_eq!(r.lock().pending.len(), 1);
        r.expire(Instant::now());
        assert_eq!(r.lock().pending.len(), 1);
        r.expire(Instant::now() + PENDING_WAIT);
        assert!(r.lock().pending.is_empty());
        // The waiting client sees its connection closed, not a hang.
        let mut buf = [0u8; 1];
        let n = tokio::time::timeout(Duration::from_secs(5), async {
            use tokio::io::AsyncReadExt;
            let mut c = client;
            c.read(&mut buf).await
        })
        .await
        .expect("closed, not hanging");
        assert!(matches!(n, Ok(0) | Err(_)));
        drop(l);
    }
}

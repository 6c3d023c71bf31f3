//! The `bridge.v1.Agent` gRPC service.
//!
//! Blocking file work runs on tokio's blocking pool; the async side only moves
//! messages. One lock guards the store and the mirrors: a sync round holds it
//! from `Begin` to `Commit`, so rounds on one agent are serialised. `Attach`
//! (presence for the idle autostop) touches none of that: see [`crate::idle`].

use std::collections::{HashMap, VecDeque};
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::{Arc, Mutex};

use bridge_proto::PROTOCOL_VERSION;
use bridge_proto::v1::agent_server::Agent;
use bridge_proto::v1::{self, sync_up};
use prost::Message;
use tokio::sync::{mpsc, watch};
use tokio_stream::Stream;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};

use crate::apply::{Round, RoundError};
use crate::idle::Idle;
use crate::mirror::{Mirror, valid_name};
use crate::store::Store;

/// Everything the agent keeps between calls.
pub struct State {
    pub store: Store,
    pub mirrors: HashMap<String, Mirror>,
}

#[derive(Clone)]
pub struct AgentService {
    pub root: PathBuf,
    pub tmp: PathBuf,
    pub state: Arc<Mutex<State>>,
    /// Attached daemons and the idle clock.
    pub idle: Arc<Idle>,
    /// Set when the agent starts shutting down: streams that would stay open
    /// for as long as the daemon lives (`Attach`) end, so the graceful
    /// shutdown does not wait for them.
    pub stopping: watch::Receiver<bool>,
}

type BoxStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send + 'static>>;

fn internal(e: impl std::fmt::Display) -> Status {
    Status::internal(e.to_string())
}

impl AgentService {
    /// No job holds a snapshot it could write mirror files through (its hard
    /// links share their inodes, and such writes raise no event on the
    /// mirror's watch): a verification may trust the watch.
    fn no_job_runs(&self) -> bool {
        self.idle.jobs_active() == 0
    }

    async fn blocking<T: Send + 'static>(
        &self,
        f: impl FnOnce(&mut State) -> Result<T, Status> + Send + 'static,
    ) -> Result<T, Status> {
        let state = self.state.clone();
        crate::memory::touched();
        tokio::task::spawn_blocking(move || {
            crate::memory::touched();
            let mut st = state
                .lock()
                .map_err(|_| Status::internal("agent state poisoned"))?;
            f(&mut st)
        })
        .await
        .map_err(internal)?
    }
}

fn mirror_of<'a>(st: &'a mut State, name: &str) -> Result<(&'a mut Mirror, &'a mut Store), Status> {
    let State { store, mirrors } = st;
    let m = mirrors.get_mut(name).ok_or_else(|| {
        Status::failed_precondition(format!("mirror {name:?} is not open: call Hello first"))
    })?;
    Ok((m, store))
}

#[tonic::async_trait]
impl Agent for AgentService {
    async fn hello(
        &self,
        req: Request<v1::HelloRequest>,
    ) -> Result<Response<v1::HelloReply>, Status> {
        let req = req.into_inner();
        if req.protocol_version != PROTOCOL_VERSION {
            return Err(Status::failed_precondition(format!(
                "protocol version mismatch: the daemon (bridge {}) speaks bridge protocol v{}, \
                 this agent (bridge-agent {}) speaks v{}; install matching versions",
                req.client_version,
                req.protocol_version,
                env!("CARGO_PKG_VERSION"),
                PROTOCOL_VERSION
            )));
        }
        if !valid_name(&req.mirror) {
            return Err(Status::invalid_argument(format!(
                "invalid mirror name {:?}: use letters, digits, '.', '_' and '-'",
                req.mirror
            )));
        }
        let root = self.root.clone();
        let mirror_path = self
            .blocking(move |st| {
                let State { store, mirrors } = st;
                if !mirrors.contains_key(&req.mirror) {
                    let m = Mirror::open(&root, &req.mirror, store).map_err(internal)?;
                    mirrors.insert(req.mirror.clone(), m);
                }
                let m = mirrors.get_mut(&req.mirror).expect("just inserted");
                m.set_excludes(&req.exclude_lines, store)
                    .map_err(internal)?;
                Ok(m.root.display().to_string())
            })
            .await?;
        Ok(Response::new(v1::HelloReply {
            protocol_version: PROTOCOL_VERSION,
            agent_version: env!("CARGO_PKG_VERSION").to_string(),
            mirror_path,
            hostname: nix::unistd::gethostname()
                .map(|h| h.to_string_lossy().into_owned())
                .unwrap_or_default(),
        }))
    }

    type ManifestStream = BoxStream<v1::ManifestBatch>;

    async fn manifest(
        &self,
        req: Request<v1::ManifestRequest>,
    ) -> Result<Response<Self::ManifestStream>, Status> {
        let name = req.into_inner().mirror;
        let trust_watch = self.no_job_runs();
        let batches = self
            .blocking(move |st| {
                let (m, store) = mirror_of(st, &name)?;
                m.verify(store, trust_watch).map_err(internal)?;
                let mut out = Vec::new();
                let mut batch = v1::ManifestBatch::default();
                for (p, n) in m.tree.iter() {
                    batch.entries.push(n.to_wire(&p));
                    if batch.entries.len() == 2000 {
                        out.push(Ok(std::mem::take(&mut batch)));
                    }
                }
                out.push(Ok(batch));
                Ok(out)
            })
            .await?;
        Ok(Response::new(Box::pin(tokio_stream::iter(batches))))
    }

    async fn root(&self, req: Request<v1::RootRequest>) -> Result<Response<v1::RootReply>, Status> {
        let name = req.into_inner().mirror;
        let trust_watch = self.no_job_runs();
        self.blocking(move |st| {
            let (m, store) = mirror_of(st, &name)?;
            m.verify(store, trust_watch).map_err(internal)?;
            Ok(Response::new(v1::RootReply {
                root: m.tree.root().as_bytes().to_vec().into(),
                files: m.tree.files(),
                bytes: m.tree.bytes(),
            }))
        })
        .await
    }

    type SyncStream = BoxStream<v1::SyncDown>;

    async fn sync(
        &self,
        req: Request<Streaming<v1::SyncUp>>,
    ) -> Result<Response<Self::SyncStream>, Status> {
        let mut inbound = req.into_inner();
        let (tx_in, rx_in) = mpsc::channel::<Vec<v1::SyncUp>>(IN_BATCHES);
        let (tx_out, rx_out) = mpsc::channel::<Result<v1::SyncDown, Status>>(32);
        tokio::spawn(async move {
            while let Ok(Some(m)) = inbound.message().await {
                // What has already arrived goes over in the same hand-over:
                // one wakeup of the applying thread (and of this task) per
                // batch, not per chunk body.
                let mut bytes = m.encoded_len();
                let mut batch = vec![m];
                let mut more = true;
                while more && batch.len() < IN_BATCH_MSGS && bytes < IN_BATCH_BYTES {
                    match ready_now(inbound.message()) {
                        Some(Ok(Some(m))) => {
                            bytes += m.encoded_len();
                            batch.push(m);
                        }
                        // Waiting for the link: send what there is.
                        None => break,
                        // The end of the stream or an error: as below.
                        Some(Ok(None) | Err(_)) => more = false,
                    }
                }
                if tx_in.send(batch).await.is_err() || !more {
                    break;
                }
            }
        });
        let state = self.state.clone();
        let tmp = self.tmp.clone();
        tokio::task::spawn_blocking(move || {
            if let Err(s) = run_round(&state, &tmp, rx_in, &tx_out) {
                let _ = tx_out.blocking_send(Err(s));
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx_out))))
    }

    type AttachStream = BoxStream<v1::IdleStatus>;

    async fn attach(
        &self,
        req: Request<Streaming<v1::AttachPing>>,
    ) -> Result<Response<Self::AttachStream>, Status> {
        let mut pings = req.into_inner();
        // Attached from the opening on; detached when this task ends.
        let attached = self.idle.attach();
        let idle = self.idle.clone();
        let mut stopping = self.stopping.clone();
        let (tx, rx) = mpsc::channel::<Result<v1::IdleStatus, Status>>(4);
        tokio::spawn(async move {
            let mut mirror = String::new();
            if tx.send(Ok(idle.status())).await.is_err() {
                return;
            }
            loop {
                tokio::select! {
                    ping = pings.message() => match ping {
                        Ok(Some(p)) => {
                            attached.ping();
                            if mirror.is_empty() && !p.mirror.is_empty() {
                                mirror = p.mirror;
                                tracing::info!(mirror = %mirror, "daemon attached");
                            }
                            if tx.send(Ok(idle.status())).await.is_err() {
                                break;
                            }
                        }
                        // The daemon closed the stream or the connection went.
                        Ok(None) | Err(_) => break,
                    },
                    // The daemon dropped its side of the call.
                    _ = tx.closed() => break,
                    // Ends the stream; the daemon attaches to the next agent.
                    _ = stopped(&mut stopping) => break,
                }
            }
            drop(attached);
            tracing::info!(mirror = %mirror, "daemon detached");
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }
}

/// Resolves once the agent is shutting down (holding no borrow of the flag).
async fn stopped(stopping: &mut watch::Receiver<bool>) {
    let _ = stopping.wait_for(|s| *s).await.map(|_| ());
}

fn round_status(e: RoundError) -> Status {
    tracing::warn!(error = %e, "sync round refused");
    Status::invalid_argument(e.to_string())
}

fn run_round(
    state: &Mutex<State>,
    tmp: &std::path::Path,
    rx: mpsc::Receiver<Vec<v1::SyncUp>>,
    tx: &mpsc::Sender<Result<v1::SyncDown, Status>>,
) -> Result<(), Status> {
    let mut rx = Unbatch {
        rx,
        batch: Vec::new().into_iter(),
    };
    let Some(first) = rx.blocking_recv() else {
        return Ok(());
    };
    let Some(sync_up::Msg::Begin(begin)) = first.msg else {
        return Err(Status::invalid_argument("a sync round starts with Begin"));
    };
    let mut st = state
        .lock()
        .map_err(|_| Status::internal("agent state poisoned"))?;
    let (mirror, store) = mirror_of(&mut st, &begin.mirror)?;
    let mut round = Round::new(tmp, mirror, store);
    // After an eager plan: the bodies still to come, and which the round needs.
    let mut eager: Option<Eager> = None;
    while let Some(m) = rx.blocking_recv() {
        let reply = match m.msg {
            Some(sync_up::Msg::Plan(p)) => {
                if eager.is_some() {
                    return Err(Status::invalid_argument(
                        "protocol violation: a plan after an eager plan",
                    ));
                }
                if p.eager {
                    let counts = Eager::counts(&p)?;
                    let need = round.on_plan(p).map_err(round_status)?;
                    eager = Some(Eager::new(&counts, &need));
                    None
                } else {
                    Some(v1::sync_down::Msg::Need(
                        round.on_plan(p).map_err(round_status)?,
                    ))
                }
            }
            Some(sync_up::Msg::Chunk(c)) => {
                let wanted = match eager.as_mut() {
                    Some(e) => e.next()?,
                    None => true,
                };
                if wanted {
                    round.on_chunk(c).map_err(round_status)?;
                }
                None
            }
            Some(sync_up::Msg::Skip(_)) => {
                let waiting = match eager.as_mut() {
                    Some(e) => e.skip()?,
                    None => true,
                };
                if waiting {
                    round.on_skip().map_err(round_status)?;
                }
                None
            }
            Some(sync_up::Msg::Commit(c)) => {
                if eager.as_ref().is_some_and(|e| !e.ops.is_empty()) {
                    return Err(Status::invalid_argument(
                        "protocol violation: commit before the eager plan's chunk bodies",
                    ));
                }
                let done = round.on_commit(c.generation).map_err(round_status)?;
                let _ = tx.blocking_send(Ok(v1::SyncDown {
                    msg: Some(v1::sync_down::Msg::Done(done)),
                }));
                return Ok(());
            }
            Some(sync_up::Msg::Begin(_)) | None => {
                return Err(Status::invalid_argument(
                    "unexpected message in a sync round",
                ));
            }
        };
        if let Some(msg) = reply
            && tx
                .blocking_send(Ok(v1::SyncDown { msg: Some(msg) }))
                .is_err()
        {
            return Ok(());
        }
    }
    // The daemon went away mid-round: every op applied so far is complete;
    // the one in progress is dropped with the round.
    Ok(())
}

/// Messages of a sync round handed to the applying thread at once, at most
/// (the messages that were already there when the first arrived).
const IN_BATCH_MSGS: usize = 256;
/// Bytes of messages in one hand-over, at most (plus the last message's).
const IN_BATCH_BYTES: usize = 1 << 20;
/// Hand-overs waiting for the applying thread, at most.
const IN_BATCHES: usize = 4;

/// The output of `f` if it is ready without waiting (`f` is dropped
/// otherwise: it must be cancel-safe, as `Streaming::message` is).
fn ready_now<F: std::future::Future>(f: F) -> Option<F::Output> {
    let f = std::pin::pin!(f);
    let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
    match f.poll(&mut cx) {
        std::task::Poll::Ready(v) => Some(v),
        std::task::Poll::Pending => None,
    }
}

/// The round's messages one by one, out of the batches they came in.
struct Unbatch {
    rx: mpsc::Receiver<Vec<v1::SyncUp>>,
    batch: std::vec::IntoIter<v1::SyncUp>,
}

impl Unbatch {
    fn blocking_recv(&mut self) -> Option<v1::SyncUp> {
        loop {
            if let Some(m) = self.batch.next() {
                return Some(m);
            }
            self.batch = self.rx.blocking_recv()?.into_iter();
        }
    }
}

/// The chunk bodies an eager plan announced (see `Plan.eager`): for each of
/// its `Put`s with chunks, in order, whether the round needs each chunk still
/// to come. The others are dropped as they arrive.
#[derive(Debug)]
struct Eager {
    ops: VecDeque<VecDeque<bool>>,
}

impl Eager {
    /// Each op's chunk count; refuses a splice, whose list the daemon would
    /// have to send as the agent resolves it.
    fn counts(plan: &v1::Plan) -> Result<Vec<usize>, Status> {
        plan.ops
            .iter()
            .map(|op| match &op.op {
                Some(v1::op::Op::Put(p)) if !p.base.is_empty() || !p.splice.is_empty() => Err(
                    Status::invalid_argument("protocol violation: a splice in an eager plan"),
                ),
                Some(v1::op::Op::Put(p)) => Ok(p.chunks.len()),
                _ => Ok(0),
            })
            .collect()
    }

    fn new(counts: &[usize], need: &v1::Need) -> Eager {
        let ops = counts
            .iter()
            .zip(&need.ops)
            .filter(|(n, _)| **n > 0)
            .map(|(&n, need)| {
                let mut wanted = vec![false; n];
                for &i in &need.chunks {
                    if let Some(w) = wanted.get_mut(i as usize) {
                        *w = true;
                    }
                }
                wanted.into()
            })
            .collect();
        Eager { ops }
    }

    /// Whether the round needs the body that just arrived.
    fn next(&mut self) -> Result<bool, Status> {
        while let Some(op) = self.ops.front_mut() {
            if let Some(wanted) = op.pop_front() {
                if op.is_empty() {
                    self.ops.pop_front();
                }
                return Ok(wanted);
            }
            self.ops.pop_front();
        }
        Err(Status::invalid_argument(
            "protocol violation: more chunk bodies than the eager plan holds",
        ))
    }

    /// The daemon gave up on the current `Put`: whether the round is still
    /// waiting for one of its bodies (else it already wrote the file).
    fn skip(&mut self) -> Result<bool, Status> {
        match self.ops.pop_front() {
            Some(rest) => Ok(rest.contains(&true)),
            None => Err(Status::invalid_argument(
                "protocol violation: skip with no file in progress",
            )),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_eager_stream_is_matched_to_its_puts_in_order() {
        // Put of 3 chunks needing 0 and 2, a mkdir, Put of 1 held chunk,
        // Put of 2 chunks needing 1.
        let need = |c: &[u32]| v1::OpNeed { chunks: c.to_vec() };
        let mut e = Eager::new(
            &[3, 0, 1, 2],
            &v1::Need {
                ops: vec![need(&[0, 2]), need(&[]), need(&[]), need(&[1])],
            },
        );
        let got: Vec<bool> = (0..6).map(|_| e.next().unwrap()).collect();
        assert_eq!(got, [true, false, true, false, false, true]);
        assert!(e.ops.is_empty());
        assert!(e.next().is_err(), "a body too many");

        // A skip drops the rest of the current Put only, and says whether
        // the round still waits on it.
        let mut e = Eager::new(
            &[2, 2, 1],
            &v1::Need {
                ops: vec![need(&[1]), need(&[0]), need(&[0])],
            },
        );
        assert!(!e.next().unwrap());
        assert!(e.skip().unwrap(), "chunk 1 of the first Put was awaited");
        assert!(e.next().unwrap());
        assert!(!e.skip().unwrap(), "the second Put is already whole");
        assert!(e.next().unwrap());
        assert!(e.skip().is_err(), "nothing left to skip");
    }

    #[test]
    fn an_eager_plan_with_a_splice_is_refused() {
        let put = |base: &[u8]| v1::Op {
            op: Some(v1::op::Op::Put(v1::Put {
                path: "a".into(),
                base: base.to_vec().into(),
                ..Default::default()
            })),
        };
        let plan = |ops| v1::Plan { ops, eager: true };
        assert_eq!(Eager::counts(&plan(vec![put(b"")])).unwrap(), [0]);
        let e = Eager::counts(&plan(vec![put(b""), put(&[7; 32])])).unwrap_err();
        assert!(e.message().contains("splice"), "{e:?}");
    }
}

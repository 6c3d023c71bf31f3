//! The sync engine: one task that owns the local tree, the connection and the
//! daemon's belief about the agent's tree, and turns changes into rounds.
//!
//! Loop: collect watcher events into dirty scopes (debounced), rescan those
//! scopes, diff the local tree against the agent's, run one round for the
//! difference, check the root the agent reports. The agent's view is fetched
//! from the agent itself on every (re)connect and whenever a root disagrees, so
//! the engine never trusts its own belief for long.
//!
//! # Layout
//! - [`plan`]: the ops that turn the agent's tree into the local one.
//! - [`round`]: one round on the wire — plans in batches, chunk bodies, the
//!   commit; the next plan is on the wire while the agent answers the last.

use std::collections::{BTreeSet, HashSet};
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use bridge_proto::chunking::Hash;
use bridge_proto::path::RelPath;
use bridge_proto::tree::{Node, Tree, hex};
use bridge_proto::v1;
use bridge_proto::v1::agent_client::AgentClient;
use bridge_proto::v1::jobs_client::JobsClient;
use bridge_proto::v1::sweeps_client::SweepsClient;
use bridge_proto::v1::tunnels_client::TunnelsClient;
use bridge_proto::{AUTH_HEADER, MAX_MESSAGE_BYTES, PROTOCOL_VERSION};
use tokio::sync::{mpsc, oneshot, watch};
use tonic::Status as GrpcStatus;
use tonic::metadata::MetadataValue;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;

use crate::local::{Changes, Dirty, Local};
use crate::provider::Provider;
use crate::status::{Connection, Skipped, Status};
use crate::watcher::{self, Mode, WatchMsg, Watcher};

mod compress;
mod plan;
mod round;

use plan::{PlannedOp, diff, diff_paths};
use round::Counters;

/// How often a file that was busy (being written) is looked at again.
const BUSY_RETRY: Duration = Duration::from_millis(300);
/// How often racy files are re-checked.
const RACY_TICK: Duration = Duration::from_secs(1);
/// How often the stat cache is saved while running (also at shutdown). Encoding
/// a 100k-file index takes tens of milliseconds on the engine's thread; a crash
/// loses at most this much of the cache, which costs a rehash, never a wrong
/// answer.
const INDEX_SAVE_INTERVAL: Duration = Duration::from_secs(30);
/// Failed attempts at the very first connection before `sync --wait`
/// waiters (`bridge up`) are told (the daemon keeps retrying).
const FIRST_CONNECT_ATTEMPTS: u32 = 3;
/// Rounds in a row that may end with disagreeing roots before giving up.
const MAX_REPAIRS: usize = 4;

/// Why a round or a connection attempt failed.
#[derive(Debug, thiserror::Error)]
pub enum SyncError {
    #[error("{0}")]
    Provider(#[from] crate::provider::ProviderError),
    #[error("agent refused: {}", .0.message())]
    Refused(GrpcStatus),
    #[error("agent connection failed: {}", .0.message())]
    Rpc(GrpcStatus),
    #[error("{0}")]
    Protocol(String),
    #[error("the mirror did not converge: {0}")]
    Diverged(String),
    /// The agent's disk is full: retried (with the backoff) until space is
    /// freed there, and told to whoever waits for the sync meanwhile.
    #[error("the agent's disk is full: {0}")]
    NoSpace(String),
}

impl SyncError {
    /// Worth retrying after a reconnect?
    pub fn retryable(&self) -> bool {
        match self {
            SyncError::Provider(p) => p.retryable,
            SyncError::Refused(_) => false,
            SyncError::Rpc(s) => !matches!(
                s.code(),
                tonic::Code::Unauthenticated
                    | tonic::Code::FailedPrecondition
                    | tonic::Code::InvalidArgument
            ),
            SyncError::Protocol(_) | SyncError::Diverged(_) | SyncError::NoSpace(_) => true,
        }
    }
}

fn rpc(s: GrpcStatus) -> SyncError {
    if s.code() == tonic::Code::InvalidArgument {
        SyncError::Refused(s)
    } else {
        SyncError::Rpc(s)
    }
}

/// Commands from the control server.
pub enum Command {
    /// Rescan everything and sync; with `verify`, answer once the agent's
    /// verified root equals the local root.
    Sync {
        verify: bool,
        /// When the asking command started (this machine's clock): a full
        /// rescan that began after it has already seen every change made
        /// before it, so none is needed (a fresh daemon's first scan).
        issued: Option<SystemTime>,
        reply: oneshot::Sender<Result<Synced, String>>,
    },
    /// The job barrier: stop syncing `outputs` (repository-relative), rescan
    /// and sync everything, verify, then submit `what` against the verified
    /// root before any other round can run.
    Submit {
        what: Submission,
        outputs: Vec<RelPath>,
        env_later: Option<EnvLater>,
        reply: oneshot::Sender<Result<Submitted, GrpcStatus>>,
    },
    /// The kernel's barrier: answer once every change saved before now is
    /// on the agent. No rescan, no verification: the watcher's marker
    /// ([`watcher::touch_marker`]) proves its events are in, and the round
    /// that follows them proves them applied. Without inotify, a rescan.
    Barrier {
        reply: oneshot::Sender<Result<Synced, String>>,
    },
}

/// What the job barrier submits against the generation it verified.
pub enum Submission {
    Job(Box<v1::JobSpec>),
    /// A sweep: every trial sees this one generation.
    Sweep(Box<v1::SweepSpec>),
    /// An ended sweep's failed, lost and cancelled trials again, with `job` as
    /// their template.
    Resume {
        id: String,
        job: Box<v1::JobSpec>,
    },
}

/// The agent's answer to a [`Submission`].
#[derive(Debug)]
pub enum Submitted {
    Job(v1::JobInfo),
    Sweep(v1::SweepInfo),
}

impl Submission {
    /// The job spec whose environment gets the [`EnvLater`] variables.
    fn job_spec(&mut self) -> &mut v1::JobSpec {
        match self {
            Submission::Job(spec) => spec,
            Submission::Sweep(s) => s.job.get_or_insert_with(Default::default),
            Submission::Resume { job, .. } => job,
        }
    }
}

/// The barrier's markers: one in flight at a time (the kernel merges an
/// event identical to the last one queued, so two touches in a row could
/// make one event).
#[derive(Default)]
struct Markers {
    /// Markers touched and seen.
    sent: u64,
    seen: u64,
    in_flight_since: Option<Instant>,
    /// A barrier came while one was in flight: it needs the next one.
    want: bool,
    /// Every event before marker `rescanned` has been rescanned, and before
    /// `synced` also synced.
    rescanned: u64,
    synced: u64,
    /// A marker never arrived: barriers rescan instead.
    broken: bool,
}

/// How long a marker may take before barriers fall back to a rescan.
const MARKER_WAIT: Duration = Duration::from_secs(1);

impl Markers {
    /// The marker a new barrier waits for, touching one if none is in flight.
    fn request(&mut self, root: &std::path::Path) -> u64 {
        if self.in_flight_since.is_some() {
            self.want = true;
            return self.sent + 1;
        }
        self.touch(root);
        self.sent
    }

    fn touch(&mut self, root: &std::path::Path) {
        if let Err(e) = watcher::touch_marker(root) {
            tracing::warn!(error = %e, "cannot touch the barrier's marker; rescanning instead");
            self.broken = true;
        }
        self.sent += 1;
        self.in_flight_since = Some(Instant::now());
    }

    fn arrived(&mut self, root: &std::path::Path) {
        if self.in_flight_since.take().is_none() {
            return;
        }
        self.seen = self.sent;
        if std::mem::take(&mut self.want) {
            self.touch(root);
        }
    }

    fn overdue(&self) -> bool {
        self.in_flight_since
            .is_some_and(|t| t.elapsed() >= MARKER_WAIT)
    }
}

type BarrierReply = oneshot::Sender<Result<Synced, String>>;

/// Someone waiting for the next complete sync.
enum Waiter {
    Sync {
        verify: bool,
        /// A full rescan since the command started covers it (see
        /// `Command::Sync`): a fresh verification of the agent's root
        /// answers it without another.
        covered: bool,
        reply: oneshot::Sender<Result<Synced, String>>,
    },
    Submit(
        Submission,
        Option<EnvLater>,
        oneshot::Sender<Result<Submitted, GrpcStatus>>,
    ),
}

impl Waiter {
    /// Needs a verification of its own (not covered by a fresh one).
    fn needs_verify(&self, fresh: bool) -> bool {
        match self {
            Waiter::Sync {
                verify, covered, ..
            } => *verify && !(*covered && fresh),
            Waiter::Submit(..) => true,
        }
    }

    fn fail(self, msg: String) {
        match self {
            Waiter::Sync { reply, .. } => {
                let _ = reply.send(Err(msg));
            }
            Waiter::Submit(_, _, w) => {
                let _ = w.send(Err(GrpcStatus::unavailable(msg)));
            }
        }
    }
}

/// Proof of an exact mirror.
#[derive(Debug, Clone)]
pub struct Synced {
    pub generation: u64,
    pub root: String,
}

/// Progress of the current work, for `bridge up` and `bridge sync --wait`.
#[derive(Debug, Clone, Default)]
pub struct Progress {
    pub phase: String,
    pub files_done: u64,
    pub files_total: u64,
    pub bytes_done: u64,
    pub bytes_total: u64,
    pub error: String,
}

/// State shared with the control server.
pub struct Shared {
    pub status: Mutex<Status>,
    pub progress: watch::Sender<Progress>,
    /// The current connection to the agent (replaced on every reconnect), for
    /// the job relays.
    pub agent: watch::Sender<Option<AgentLink>>,
}

/// A connected channel to the agent and the token interceptor it needs.
#[derive(Clone)]
pub struct AgentLink {
    pub channel: Channel,
    pub auth: Auth,
    /// The link is as fast as a local socket: compressing costs more than
    /// it saves (`Provider::link_is_fast`).
    pub fast: bool,
}

impl AgentLink {
    pub fn jobs(&self) -> JobsClient<InterceptedService<Channel, Auth>> {
        JobsClient::with_interceptor(self.channel.clone(), self.auth.clone())
            .max_decoding_message_size(MAX_MESSAGE_BYTES)
            .max_encoding_message_size(MAX_MESSAGE_BYTES)
    }

    pub fn sweeps(&self) -> SweepsClient<InterceptedService<Channel, Auth>> {
        SweepsClient::with_interceptor(self.channel.clone(), self.auth.clone())
            .max_decoding_message_size(MAX_MESSAGE_BYTES)
            .max_encoding_message_size(MAX_MESSAGE_BYTES)
    }

    pub fn tunnels(&self) -> TunnelsClient<InterceptedService<Channel, Auth>> {
        TunnelsClient::with_interceptor(self.channel.clone(), self.auth.clone())
    }
}

/// Environment variables a job gets that are computed while the barrier
/// runs (the git state for MLflow's tags), merged into its spec just before
/// the submit.
pub type EnvLater = tokio::task::JoinHandle<Vec<(String, String)>>;

/// How long the submit waits for [`EnvLater`] after the barrier.
const ENV_LATER_WAIT: Duration = Duration::from_secs(2);

impl Shared {
    fn set_phase(&self, phase: &str) {
        self.progress.send_modify(|p| {
            p.phase = phase.to_string();
            p.error.clear();
        });
    }
}

/// What the engine needs to know about the repository.
pub struct RepoInfo {
    pub root: PathBuf,
    /// `.bridge/outputs`: output paths of submitted jobs, never synced up.
    pub outputs_file: PathBuf,
    pub mirror: String,
    pub token: String,
    pub exclude_lines: Vec<String>,
}

type Client = AgentClient<InterceptedService<Channel, Auth>>;

/// Adds the agent token to every call.
#[derive(Clone)]
pub struct Auth(MetadataValue<tonic::metadata::Ascii>);

impl Auth {
    /// The `authorization: Bearer TOKEN` header; `None` for a token that
    /// is not ASCII.
    pub fn bearer(token: &str) -> Option<Auth> {
        MetadataValue::try_from(format!("Bearer {token}"))
            .ok()
            .map(Auth)
    }
}

impl tonic::service::Interceptor for Auth {
    fn call(&mut self, mut req: tonic::Request<()>) -> Result<tonic::Request<()>, GrpcStatus> {
        req.metadata_mut().insert(AUTH_HEADER, self.0.clone());
        Ok(req)
    }
}

struct Conn {
    client: Client,
}

pub struct Engine {
    repo: RepoInfo,
    provider: Arc<dyn Provider>,
    shared: Arc<Shared>,
    local: Option<Local>,
    /// The daemon's belief about the agent's tree (refetched on doubt).
    remote: Tree,
    conn: Option<Conn>,
    watcher: Watcher,
    watch_rx: mpsc::UnboundedReceiver<WatchMsg>,
    generation: u64,
    counters: Arc<Counters>,
    /// The agent's last reported root.
    remote_root: Option<bridge_proto::chunking::Hash>,
    /// Local paths changed since the last round: outside them the local tree
    /// and the belief about the agent's agree (unless `full_diff`).
    touched: BTreeSet<RelPath>,
    /// The belief was just refetched (or is in doubt): compare every entry.
    full_diff: bool,
    /// Ignore files changed since the last round: they go first, then the
    /// agent's view is refetched, so paths that just became ignored are left
    /// alone on the agent instead of deleted.
    rules_changed: bool,
    /// When the last full rescan began.
    full_scan_began: Option<SystemTime>,
    /// The agent's last verified root and when it was verified.
    verified: Option<(bridge_proto::chunking::Hash, Instant)>,
    /// A verification asked for when a barrier arrived, while the local
    /// rescan runs (see [`Engine::verify`]), with the generation then.
    early_verify: Option<(u64, tokio::task::JoinHandle<Result<Hash, SyncError>>)>,
    /// Whether rounds compress chunk bodies (`None`: a local link, never).
    compression: Option<Arc<Mutex<compress::Adaptive>>>,
    /// The next round syncs a burst that began after quiet (a save, see
    /// `watcher::QUIET`): it may go eager (`round::EAGER_BYTES`). The rounds
    /// that follow within it (the rest of a `git checkout`) wait for the
    /// agent's Need, which skips what it already holds.
    eager: bool,
}

/// How recent a verification must be to answer a covered `sync --wait`.
const VERIFY_FRESH: Duration = Duration::from_secs(5);

impl Engine {
    pub fn new(
        repo: RepoInfo,
        provider: Arc<dyn Provider>,
        shared: Arc<Shared>,
        index_path: PathBuf,
    ) -> Engine {
        let (tx, watch_rx) = mpsc::unbounded_channel();
        let watcher = Watcher::new(&repo.root, tx);
        let mut local = Local::new(repo.root.clone(), index_path);
        let compression =
            (!provider.link_is_fast()).then(|| Arc::new(Mutex::new(compress::Adaptive::new())));
        local.outputs = std::fs::read_to_string(&repo.outputs_file)
            .unwrap_or_default()
            .lines()
            .filter_map(|l| RelPath::new(l).ok())
            .collect();
        Engine {
            repo,
            provider,
            shared,
            local: Some(local),
            remote: Tree::new(),
            conn: None,
            watcher,
            watch_rx,
            generation: 0,
            counters: Arc::new(Counters::default()),
            remote_root: None,
            touched: BTreeSet::new(),
            full_diff: true,
            rules_changed: false,
            eager: false,
            full_scan_began: None,
            verified: None,
            early_verify: None,
            compression,
        }
    }

    fn local(&self) -> &Local {
        self.local
            .as_ref()
            .expect("local tree is home between blocking calls")
    }

    /// Runs `f` on the local tree on the blocking pool.
    async fn with_local<T: Send + 'static>(
        &mut self,
        f: impl FnOnce(&mut Local) -> T + Send + 'static,
    ) -> T {
        let mut local = self.local.take().expect("local tree is home");
        let (local, out) = tokio::task::spawn_blocking(move || {
            let out = f(&mut local);
            (local, out)
        })
        .await
        .expect("local tree task panicked");
        self.local = Some(local);
        out
    }

    /// Rescans `dirty`, updating watches.
    async fn rescan(&mut self, dirty: BTreeSet<Dirty>) -> Vec<RelPath> {
        let full = dirty.contains(&Dirty::Tree(None));
        if full {
            self.full_scan_began = Some(SystemTime::now());
        }
        let ch = self.with_local(move |l| l.apply(dirty)).await;
        self.watch_rescanned(full, ch).await
    }

    /// The daemon's start: the first full scan, and meanwhile the first
    /// connection and the agent's verification of its mirror, so the two
    /// walks (on two machines, normally) overlap. Returns the paths still
    /// being written and the outcome of the connection.
    async fn start(&mut self) -> (Vec<RelPath>, Result<(), SyncError>) {
        self.shared.set_phase("scanning");
        self.full_scan_began = Some(SystemTime::now());
        let t0 = Instant::now();
        let mut local = self.local.take().expect("local tree is home");
        // The directories the saved index knows are watched while the scan
        // runs (most before the walk lists them), on a thread of their own:
        // each watch is a round trip to the watcher's thread.
        let prior_dirs = local.take_prior_dirs();
        let stand_in = self.watcher.stand_in();
        let mut watcher = std::mem::replace(&mut self.watcher, stand_in);
        let early_watch = tokio::task::spawn_blocking(move || {
            watcher.add([None]);
            if let Some(dirs) = prior_dirs.and_then(|rx| rx.recv().ok()) {
                watcher.add(dirs.iter().map(Some));
            }
            watcher
        });
        let scan = tokio::task::spawn_blocking(move || {
            let ch = local.apply([Dirty::Tree(None)].into());
            tracing::debug!(ms = t0.elapsed().as_secs_f64() * 1e3, "start: local scan");
            (local, ch)
        });
        let verifying = match self.link().await {
            Ok(()) => {
                tracing::debug!(ms = t0.elapsed().as_secs_f64() * 1e3, "start: linked");
                let client = self.client();
                let mirror = self.repo.mirror.clone();
                Ok(tokio::spawn(async move {
                    let root = verified_root(client?, mirror).await;
                    tracing::debug!(ms = t0.elapsed().as_secs_f64() * 1e3, "start: agent's root");
                    root
                }))
            }
            Err(e) => Err(e),
        };
        let (local, ch) = scan.await.expect("local tree task panicked");
        // Nothing is known of the agent's tree yet, so the first diff is a
        // full one (or none, when the roots agree): the paths this scan
        // touched (all of them, after a restart) need not be kept.
        debug_assert!(self.full_diff);
        self.rules_changed |= ch.rules_changed;
        // The tree's Merkle root is hashed on a thread while every directory
        // the early watches missed gets its watch here, and those of
        // directories gone (or ignored) since the index was saved are dropped.
        let dirs: HashSet<RelPath> = local.tree.dirs().collect();
        let rooting = tokio::task::spawn_blocking(move || {
            local.tree.root();
            local
        });
        self.watcher = early_watch.await.expect("watch task panicked");
        self.watcher.retain(|d| d.is_none_or(|d| dirs.contains(d)));
        self.watcher
            .add(std::iter::once(None).chain(dirs.iter().map(Some)));
        self.local = Some(rooting.await.expect("local tree task panicked"));
        let busy = ch.busy;
        tracing::debug!(ms = t0.elapsed().as_secs_f64() * 1e3, "start: watching");
        let connected = match verifying {
            Ok(task) => match task.await {
                Ok(Ok(root)) => self.learn_remote_from(root).await,
                Ok(Err(e)) => Err(e),
                Err(e) => Err(SyncError::Protocol(e.to_string())),
            },
            Err(e) => Err(e),
        };
        if connected.is_err() {
            // The engine loop reports it and retries, as for any connect.
            self.conn = None;
        }
        (busy, connected)
    }

    /// After a rescan: records what it touched and watches new directories.
    async fn watch_rescanned(&mut self, full: bool, mut ch: Changes) -> Vec<RelPath> {
        let mut busy = Vec::new();
        // A directory is watched only after it was walked: whatever was
        // created in it in between has no event. Look at every new directory
        // once more after its watch is in place (bounded: new directories
        // found then are handled the same way).
        for _ in 0..16 {
            self.rules_changed |= ch.rules_changed;
            self.touched.extend(ch.touched.drain(..));
            busy.append(&mut ch.busy);
            self.watcher.remove(ch.gone_dirs.iter());
            if full {
                let dirs: Vec<RelPath> = self.local().tree.dirs().collect();
                self.watcher
                    .add(std::iter::once(None).chain(dirs.iter().map(Some)));
                break;
            }
            if ch.new_dirs.is_empty() {
                break;
            }
            self.watcher.add(ch.new_dirs.iter().map(Some));
            let again: BTreeSet<Dirty> =
                ch.new_dirs.drain(..).map(|d| Dirty::Dir(Some(d))).collect();
            ch = self.with_local(move |l| l.apply(again)).await;
        }
        busy
    }

    fn update_status(&self, f: impl FnOnce(&mut Status)) {
        let mut st = self.shared.status.lock().expect("status poisoned");
        f(&mut st);
    }

    fn refresh_status(&self, pending: usize) {
        let l = self.local();
        let local_root = l.tree.root();
        let in_sync = self.conn.is_some() && self.remote_root == Some(local_root) && pending == 0;
        let skipped = l
            .skipped
            .iter()
            .map(|(p, r)| Skipped {
                path: p.clone(),
                reason: r.clone(),
            })
            .collect();
        let (files, bytes, hashed) = (l.tree.files(), l.tree.bytes(), l.files_hashed);
        let mode = self.watcher.mode.clone();
        let watches = self.watcher.watches();
        let generation = self.generation;
        let remote_root = self.remote_root.map(|r| hex(&r)).unwrap_or_default();
        let (sent, chunks) = (
            self.counters.bytes.load(Ordering::Relaxed),
            self.counters.chunks.load(Ordering::Relaxed),
        );
        self.update_status(|st| {
            st.local_root = hex(&local_root);
            st.remote_root = remote_root;
            st.in_sync = in_sync;
            st.pending_changes = pending;
            st.files = files;
            st.bytes = bytes;
            st.files_hashed = hashed;
            st.watcher = mode;
            st.watches = watches;
            st.skipped = skipped;
            st.generation = generation;
            st.bytes_sent = sent;
            st.chunks_sent = chunks;
        });
    }

    /// Starts the agent if needed, connects and says hello.
    async fn link(&mut self) -> Result<(), SyncError> {
        self.shared.set_phase("connecting");
        let t = Instant::now();
        // A long start (an agent upload) says what it is doing.
        {
            let ensure = self.provider.ensure_agent();
            tokio::pin!(ensure);
            let mut activity = self.provider.activity();
            loop {
                let changed = async {
                    match activity.as_mut() {
                        Some(rx) => rx.changed().await.is_ok(),
                        None => std::future::pending().await,
                    }
                };
                tokio::select! {
                    r = &mut ensure => {
                        r?;
                        break;
                    }
                    alive = changed => {
                        let Some(rx) = activity.as_ref().filter(|_| alive) else {
                            activity = None;
                            continue;
                        };
                        let now = rx.borrow().clone();
                        self.shared.set_phase(now.as_deref().unwrap_or("connecting"));
                    }
                }
            }
        }
        tracing::debug!(ms = t.elapsed().as_secs_f64() * 1e3, "link: agent ensured");
        let channel = self.provider.connect().await?;
        tracing::debug!(ms = t.elapsed().as_secs_f64() * 1e3, "link: channel");
        let token = self
            .provider
            .agent_token()
            .unwrap_or_else(|| self.repo.token.clone());
        let auth = Auth::bearer(&token)
            .ok_or_else(|| SyncError::Protocol("the token is not valid ASCII".into()))?;
        let link = AgentLink {
            channel: channel.clone(),
            auth: auth.clone(),
            fast: self.provider.link_is_fast(),
        };
        let mut client = AgentClient::with_interceptor(channel, auth)
            .max_decoding_message_size(MAX_MESSAGE_BYTES)
            .max_encoding_message_size(MAX_MESSAGE_BYTES);
        let hello = client
            .hello(v1::HelloRequest {
                protocol_version: PROTOCOL_VERSION,
                client_version: env!("CARGO_PKG_VERSION").to_string(),
                mirror: self.repo.mirror.clone(),
                exclude_lines: self.repo.exclude_lines.clone(),
            })
            .await
            .map_err(rpc)?
            .into_inner();
        if hello.protocol_version != PROTOCOL_VERSION {
            return Err(SyncError::Rpc(GrpcStatus::failed_precondition(format!(
                "protocol version mismatch: this daemon speaks v{PROTOCOL_VERSION}, the agent (bridge-agent {}) speaks v{}",
                hello.agent_version, hello.protocol_version
            ))));
        }
        self.update_status(|st| {
            st.agent_version = hello.agent_version.clone();
            st.agent_host = hello.hostname.clone();
            st.mirror_path = hello.mirror_path.clone();
            st.connection = Connection::Connected;
            st.last_error = None;
        });
        tracing::debug!(ms = t.elapsed().as_secs_f64() * 1e3, "link: hello");
        self.conn = Some(Conn { client });
        self.early_verify = None;
        self.shared.agent.send_replace(Some(link));
        Ok(())
    }

    /// Connects and learns the agent's tree.
    async fn connect(&mut self) -> Result<(), SyncError> {
        self.link().await?;
        self.learn_remote().await
    }

    /// After (re)connecting: when the agent's verified root is the local
    /// root, its tree is the local tree (the Merkle root names every entry),
    /// so the manifest, one entry per file, need not cross the link; a
    /// daemon restart over an unchanged repository sends a few bytes.
    async fn learn_remote(&mut self) -> Result<(), SyncError> {
        let t = Instant::now();
        let root = verified_root(self.client()?, self.repo.mirror.clone()).await?;
        tracing::debug!(ms = t.elapsed().as_secs_f64() * 1e3, "learn: verified root");
        let learned = self.learn_remote_from(root).await;
        tracing::debug!(ms = t.elapsed().as_secs_f64() * 1e3, "learn: remote tree");
        learned
    }

    /// [`Self::learn_remote`] with the agent's verified root in hand.
    async fn learn_remote_from(&mut self, root: Hash) -> Result<(), SyncError> {
        if self.note_verified(root) {
            self.remote = self.local().tree.clone();
            self.full_diff = false;
            // The belief is exact: nothing is left to compare (after a
            // restart this held every path of the repository), and the
            // agent holds the ignore files the local tree was scanned
            // with (a restart's scan counts every one as changed, which
            // would cost a manifest).
            self.touched.clear();
            self.rules_changed = false;
            return Ok(());
        }
        self.fetch_manifest().await
    }

    /// Records the agent's verified root; true when it is the local root.
    fn note_verified(&mut self, root: Hash) -> bool {
        self.remote_root = Some(root);
        self.verified = Some((root, Instant::now()));
        root == self.local().tree.root()
    }

    /// The connected client (a cheap clone sharing the channel).
    fn client(&self) -> Result<Client, SyncError> {
        self.conn
            .as_ref()
            .map(|c| c.client.clone())
            .ok_or_else(|| SyncError::Protocol("not connected".into()))
    }

    /// Replaces the belief about the agent's tree with the agent's own view.
    async fn fetch_manifest(&mut self) -> Result<(), SyncError> {
        let mut client = self.client()?;
        let mut stream = client
            .manifest(v1::ManifestRequest {
                mirror: self.repo.mirror.clone(),
            })
            .await
            .map_err(rpc)?
            .into_inner();
        let mut t = Tree::new();
        while let Some(batch) = stream.message().await.map_err(rpc)? {
            for e in &batch.entries {
                let (p, n) = Node::from_wire(e).map_err(SyncError::Protocol)?;
                t.insert(p, n);
            }
        }
        self.remote_root = Some(t.root());
        self.remote = t;
        self.full_diff = true;
        self.touched.clear();
        Ok(())
    }

    /// Runs rounds until the agent reports the local root (or gives up).
    /// Returns paths to look at again (changed while they were read).
    async fn converge(&mut self) -> Result<Vec<RelPath>, SyncError> {
        let mut retry = Vec::new();
        if self.rules_changed {
            let rules: Vec<PlannedOp> = diff(self.local(), &self.remote)
                .into_iter()
                .filter(|o| {
                    bridge_proto::scan::is_ignore_file(o.path().name())
                        && !matches!(o, PlannedOp::Remove(_))
                })
                .collect();
            if !rules.is_empty() {
                let (_, skipped) = self.round(rules).await?;
                retry.extend(skipped);
            }
            self.fetch_manifest().await?;
            self.rules_changed = false;
        }
        for _ in 0..MAX_REPAIRS {
            let t = Instant::now();
            let ops = if self.full_diff {
                diff(self.local(), &self.remote)
            } else {
                diff_paths(self.local(), &self.remote, &self.touched)
            };
            tracing::debug!(
                ms = t.elapsed().as_secs_f64() * 1e3,
                ops = ops.len(),
                full = self.full_diff,
                "diff"
            );
            self.full_diff = false;
            self.touched.clear();
            if ops.is_empty() {
                if self.remote_root == Some(self.local().tree.root()) {
                    return Ok(retry);
                }
                // Our belief matches, the agent's word does not: ask it.
                self.fetch_manifest().await?;
                continue;
            }
            let (agent_root, skipped) = self.round(ops).await?;
            retry.extend(skipped);
            if agent_root != self.remote.root() {
                tracing::warn!("agent root differs from the expected one; refetching its manifest");
                self.fetch_manifest().await?;
            }
        }
        if self.remote_root == Some(self.local().tree.root()) || !retry.is_empty() {
            return Ok(retry);
        }
        Err(SyncError::Diverged(format!(
            "after {MAX_REPAIRS} rounds the agent's root still differs; see the agent log"
        )))
    }

    /// Asks the agent for its verified root and compares.
    ///
    /// A barrier's verification starts when the barrier arrives, so the
    /// agent re-stats its mirror while the daemon rescans the local tree
    /// (each ~0.15 s at 20,000 files). Its answer stands when no round
    /// changed the agent since and it equals the local root; otherwise the
    /// agent is asked again.
    async fn verify(&mut self) -> Result<bool, SyncError> {
        self.shared.set_phase("verifying");
        if let Some((generation, early)) = self.early_verify.take()
            && generation == self.generation
            && let Ok(Ok(root)) = early.await
            && root == self.local().tree.root()
        {
            return Ok(self.note_verified(root));
        }
        let root = verified_root(self.client()?, self.repo.mirror.clone()).await?;
        Ok(self.note_verified(root))
    }

    /// Starts a barrier's verification now (see [`Engine::verify`]).
    fn verify_early(&mut self) {
        if self.early_verify.is_some() {
            return;
        }
        if let Ok(client) = self.client() {
            let mirror = self.repo.mirror.clone();
            self.early_verify =
                Some((self.generation, tokio::spawn(verified_root(client, mirror))));
        }
    }

    /// The engine loop; returns when `shutdown` fires.
    pub async fn run(
        mut self,
        mut cmds: mpsc::Receiver<Command>,
        mut shutdown: watch::Receiver<bool>,
    ) {
        let (mut busy, connected) = self.start().await;
        let mut first_connect = Some(connected);
        self.refresh_status(0);

        let mut pending: BTreeSet<Dirty> = BTreeSet::new();
        let mut first_event: Option<Instant> = None;
        let mut last_event = Instant::now();
        // The quiet time that ends the current burst: none or short while its
        // events left whole files (see `watcher::QUIET`, `SETTLE_WINDOW`).
        let mut window = watcher::DEBOUNCE_WINDOW;
        // When the last burst was taken for a rescan, and whether the
        // current one began after quiet (a save, not a checkout's rest).
        let mut last_taken = Instant::now();
        let mut quiet_burst = false;
        let mut waiters: Vec<Waiter> = Vec::new();
        let mut barriers: Vec<(u64, BarrierReply)> = Vec::new();
        // Submissions waiting for their barrier's marker.
        let mut submits: Vec<(u64, Waiter)> = Vec::new();
        let mut markers = Markers::default();
        let mut need_round = true;
        let mut backoff = Duration::from_millis(100);
        let mut next_retry_connect = Instant::now();
        let mut next_poll = Instant::now() + watcher::POLL_INTERVAL;
        let mut next_racy = Instant::now() + RACY_TICK;
        let mut busy_at = (!busy.is_empty()).then(|| Instant::now() + BUSY_RETRY);
        let mut last_index_save = Instant::now();
        let mut ever_connected = false;
        let mut first_failures = 0u32;

        loop {
            // Connect when needed (not while a burst is being collected).
            if self.conn.is_none() && Instant::now() >= next_retry_connect {
                let connected = match first_connect.take() {
                    Some(c) => c,
                    None => self.connect().await,
                };
                match connected {
                    // The backoff resets only after a successful round: a
                    // connection that works but cannot converge must not
                    // turn into a hot loop.
                    Ok(()) => {
                        need_round = true;
                        ever_connected = true;
                    }
                    Err(e) => {
                        let retry = e.retryable();
                        let msg = e.to_string();
                        tracing::warn!(error = %msg, "cannot connect to the agent");
                        self.conn = None;
                        self.update_status(|st| {
                            st.connection = if retry {
                                Connection::Reconnecting
                            } else {
                                Connection::Disconnected
                            };
                            st.last_error = Some(msg.clone());
                        });
                        if retry {
                            // Shown while retrying; a fatal error reaches
                            // the waiters instead.
                            self.shared.progress.send_modify(|p| p.error = msg.clone());
                        }
                        // Before the first connection ever succeeded, a link
                        // that keeps failing is most likely a mistake (wrong
                        // host or port, nothing listening): tell the waiters
                        // (`bridge up`) rather than retry in silence.
                        first_failures += 1;
                        let give_up = !ever_connected && first_failures >= FIRST_CONNECT_ATTEMPTS;
                        if !retry || give_up {
                            for w in waiters.drain(..) {
                                w.fail(msg.clone());
                            }
                        }
                        next_retry_connect = Instant::now() + backoff;
                        backoff = (backoff * 2).min(Duration::from_secs(10));
                    }
                }
                self.refresh_status(pending.len());
            }

            let now = Instant::now();
            let mut deadline = next_racy.min(last_index_save + INDEX_SAVE_INTERVAL);
            if let Some(f) = first_event {
                deadline = deadline.min((last_event + window).min(f + watcher::DEBOUNCE_CAP));
            }
            if matches!(self.watcher.mode, Mode::Polling(_)) {
                deadline = deadline.min(next_poll);
            }
            if let Some(b) = busy_at {
                deadline = deadline.min(b);
            }
            if let Some(t) = markers.in_flight_since {
                deadline = deadline.min(t + MARKER_WAIT);
            }
            if self.conn.is_none() {
                deadline = deadline.min(next_retry_connect);
            } else if need_round {
                deadline = now;
            }

            // Biased: the events already queued are taken before a deadline
            // that has passed, so a burst synced at once holds all of them.
            tokio::select! {
                biased;
                _ = shutdown.changed() => break,
                Some(m) = self.watch_rx.recv() => {
                    match m {
                        WatchMsg::Dirty(d, settled) => {
                            pending.insert(d);
                            if first_event.is_none() {
                                quiet_burst = last_taken.elapsed() >= watcher::QUIET;
                            }
                            window = if !settled {
                                watcher::DEBOUNCE_WINDOW
                            } else if quiet_burst {
                                Duration::ZERO
                            } else {
                                watcher::SETTLE_WINDOW
                            };
                        }
                        WatchMsg::Overflow => {
                            pending.insert(Dirty::Tree(None));
                            window = watcher::DEBOUNCE_WINDOW;
                        }
                        WatchMsg::Marker => {
                            markers.arrived(&self.repo.root);
                            if pending.is_empty() {
                                markers.rescanned = markers.seen;
                                if self.conn.is_some() && !need_round && busy.is_empty() {
                                    markers.synced = markers.seen;
                                    self.answer_barriers(&mut barriers, markers.synced);
                                    // Answered after a round (a no-op now).
                                    need_round |=
                                        release_submits(&mut submits, markers.synced, &mut waiters);
                                }
                            } else {
                                // The saves before it are in: sync them now
                                // rather than after the debounce window.
                                last_event = Instant::now() - watcher::DEBOUNCE_WINDOW;
                            }
                            continue;
                        }
                    }
                    last_event = Instant::now();
                    first_event.get_or_insert(last_event);
                    self.update_status(|st| st.pending_changes = pending.len());
                    continue;
                }
                Some(c) = cmds.recv() => {
                    match c {
                        Command::Sync { verify, issued, reply } => {
                            let covered = issued
                                .zip(self.full_scan_began)
                                .is_some_and(|(i, s)| i <= s);
                            if verify && !covered {
                                self.verify_early();
                            }
                            waiters.push(Waiter::Sync { verify, covered, reply });
                            if covered {
                                // Answered after the next round (at once
                                // when connected and nothing is pending).
                                need_round = true;
                                continue;
                            }
                        }
                        Command::Submit { what, outputs, env_later, reply } => {
                            self.verify_early();
                            let new_outputs = self.set_outputs(outputs).await;
                            let w = Waiter::Submit(what, env_later, reply);
                            // Like a barrier: every save before the marker is
                            // synced, then the agent's root is verified. A full
                            // rescan (25 ms at 5,000 files) only when the
                            // marker cannot tell or the outputs changed.
                            if !new_outputs && !markers.broken && self.watcher.mode == Mode::Inotify {
                                let need = markers.request(&self.repo.root);
                                submits.push((need, w));
                                continue;
                            }
                            waiters.push(w);
                        }
                        Command::Barrier { reply } => {
                            if !markers.broken && self.watcher.mode == Mode::Inotify {
                                let need = markers.request(&self.repo.root);
                                barriers.push((need, reply));
                                continue;
                            }
                            waiters.push(Waiter::Sync { verify: false, covered: false, reply });
                        }
                    }
                    pending.insert(Dirty::Tree(None));
                    first_event.get_or_insert(Instant::now());
                    last_event = Instant::now() - watcher::DEBOUNCE_WINDOW;
                    continue;
                }
                _ = tokio::time::sleep_until(deadline.into()) => {}
            }

            let now = Instant::now();
            if markers.overdue() {
                tracing::warn!("the barrier's marker did not arrive; barriers rescan from now on");
                markers.broken = true;
                markers.in_flight_since = None;
                for (_, reply) in barriers.drain(..) {
                    waiters.push(Waiter::Sync {
                        verify: false,
                        covered: false,
                        reply,
                    });
                }
                waiters.extend(submits.drain(..).map(|(_, w)| w));
                pending.insert(Dirty::Tree(None));
                first_event.get_or_insert(now);
                last_event = now - watcher::DEBOUNCE_WINDOW;
            }
            if matches!(self.watcher.mode, Mode::Polling(_)) && now >= next_poll {
                pending.insert(Dirty::Tree(None));
                first_event.get_or_insert(now);
                next_poll = now + watcher::POLL_INTERVAL;
            }
            if busy_at.is_some_and(|b| now >= b) {
                for p in busy.drain(..) {
                    pending.insert(Dirty::File(p));
                }
                first_event.get_or_insert(now);
                busy_at = None;
            }
            if now >= next_racy {
                next_racy = now + RACY_TICK;
                if !self.local().racy.is_empty() {
                    let ch = self.with_local(|l| l.settle_racy()).await;
                    need_round |= !ch.touched.is_empty();
                    self.touched.extend(ch.touched);
                }
            }
            // Save between bursts only; the write and its fsync go to a thread.
            if now >= last_index_save + INDEX_SAVE_INTERVAL && first_event.is_none() {
                last_index_save = now;
                if let Some(l) = self.local.as_mut() {
                    l.save_index(true);
                }
            }
            let burst_over = first_event
                .is_some_and(|f| now >= last_event + window || now >= f + watcher::DEBOUNCE_CAP);
            // Edit-to-mirror latency is measured from the first event of a
            // burst that this iteration syncs.
            let started = if burst_over { first_event } else { None };
            if burst_over {
                last_taken = now;
                self.eager = std::mem::take(&mut quiet_burst);
                window = watcher::DEBOUNCE_WINDOW;
                let dirty = std::mem::take(&mut pending);
                markers.rescanned = markers.seen;
                first_event = None;
                if !waiters.is_empty() {
                    self.shared.set_phase("scanning");
                }
                let t = Instant::now();
                let b = self.rescan(dirty).await;
                tracing::debug!(ms = t.elapsed().as_secs_f64() * 1e3, "rescan");
                if !b.is_empty() {
                    busy.extend(b);
                    busy_at = Some(Instant::now() + BUSY_RETRY);
                }
                need_round = true;
            }
            // Waiters are answered after the round that follows their
            // rescan (or a later one, while files are still being written).
            if self.conn.is_none() || !need_round {
                self.refresh_status(pending.len());
                continue;
            }

            // Sync.
            need_round = false;
            let t = Instant::now();
            let rescanned = markers.rescanned;
            let res = self.converge().await;
            self.eager = false;
            tracing::debug!(ms = t.elapsed().as_secs_f64() * 1e3, "converge");
            match res {
                Ok(skipped) => {
                    backoff = Duration::from_millis(100);
                    if !skipped.is_empty() {
                        busy.extend(skipped);
                        busy_at = Some(Instant::now() + BUSY_RETRY);
                    }
                    if let Some(t0) = started {
                        let ms = t0.elapsed().as_secs_f64() * 1000.0;
                        self.update_status(|st| st.last_latency_ms = Some(ms));
                    }
                    if busy.is_empty() {
                        markers.synced = rescanned;
                        self.answer_barriers(&mut barriers, markers.synced);
                        release_submits(&mut submits, markers.synced, &mut waiters);
                    }
                    if !waiters.is_empty() && pending.is_empty() && busy.is_empty() {
                        self.answer_waiters(&mut waiters).await;
                    }
                    self.shared.set_phase("watching");
                }
                Err(e) => {
                    let msg = e.to_string();
                    tracing::warn!(error = %msg, "sync round failed");
                    self.update_status(|st| {
                        st.last_error = Some(msg.clone());
                        st.connection = if e.retryable() {
                            Connection::Reconnecting
                        } else {
                            Connection::Disconnected
                        };
                    });
                    if e.retryable() {
                        self.shared.progress.send_modify(|p| p.error = msg.clone());
                    }
                    self.conn = None;
                    // A full disk is retried, but not in silence: a
                    // `sync --wait` or a `run` fails now with the reason.
                    if !e.retryable() || matches!(e, SyncError::NoSpace(_)) {
                        for w in waiters.drain(..) {
                            w.fail(msg.clone());
                        }
                        for (_, b) in barriers.drain(..) {
                            let _ = b.send(Err(msg.clone()));
                        }
                        for (_, w) in submits.drain(..) {
                            w.fail(msg.clone());
                        }
                    }
                    next_retry_connect = Instant::now() + backoff;
                    backoff = (backoff * 2).min(Duration::from_secs(10));
                }
            }
            self.refresh_status(pending.len());
        }
        if let Some(l) = self.local.as_mut() {
            l.save_index(false);
        }
        for w in waiters.drain(..) {
            w.fail("the daemon is shutting down".into());
        }
        for (_, b) in barriers.drain(..) {
            let _ = b.send(Err("the daemon is shutting down".into()));
        }
        for (_, w) in submits.drain(..) {
            w.fail("the daemon is shutting down".into());
        }
    }

    /// Answers the barriers whose marker's events are synced.
    fn answer_barriers(&self, barriers: &mut Vec<(u64, BarrierReply)>, synced: u64) {
        if barriers.is_empty() {
            return;
        }
        let done = Synced {
            generation: self.generation,
            root: hex(&self.local().tree.root()),
        };
        for (need, reply) in std::mem::take(barriers) {
            if need <= synced {
                let _ = reply.send(Ok(done.clone()));
            } else {
                barriers.push((need, reply));
            }
        }
    }

    /// Proves the mirror exact for `sync --wait` (the agent's verified root
    /// equals the local root), repairing once from the agent's own view if a
    /// mirror file was changed behind bridge's back.
    async fn verified(&mut self) -> Result<(), SyncError> {
        if self.verify().await? {
            return Ok(());
        }
        self.fetch_manifest().await?;
        self.converge().await?;
        if self.verify().await? {
            Ok(())
        } else {
            Err(SyncError::Diverged(
                "the agent's verified root still differs after a repair".into(),
            ))
        }
    }

    /// Answers `sync` waiters. A retryable failure (the connection dropped)
    /// keeps them waiting for the reconnect; anything else answers them.
    async fn answer_waiters(&mut self, waiters: &mut Vec<Waiter>) {
        let root = self.local().tree.root();
        let fresh = self
            .verified
            .is_some_and(|(r, at)| r == root && at.elapsed() < VERIFY_FRESH);
        let result = if waiters.iter().any(|w| w.needs_verify(fresh)) {
            self.verified().await
        } else {
            Ok(())
        };
        // An early verification is for this barrier only.
        if let Some((_, h)) = self.early_verify.take() {
            h.abort();
        }
        let result = match result {
            Err(e) if e.retryable() && !matches!(e, SyncError::Diverged(_)) => {
                tracing::warn!(error = %e, "verification interrupted; retrying after a reconnect");
                self.conn = None;
                return;
            }
            other => other.map_err(|e| e.to_string()),
        };
        let synced = Synced {
            generation: self.generation,
            root: hex(&self.local().tree.root()),
        };
        for w in waiters.drain(..) {
            match w {
                Waiter::Sync { reply: w, .. } => {
                    let _ = w.send(result.clone().map(|_| synced.clone()));
                }
                Waiter::Submit(mut what, env_later, w) => {
                    let out = match &result {
                        Err(e) => Err(GrpcStatus::unavailable(e.clone())),
                        // Still inside the engine loop: no round can run
                        // between the verification and the snapshot.
                        Ok(()) => {
                            if let Some(later) = env_later {
                                match tokio::time::timeout(ENV_LATER_WAIT, later).await {
                                    Ok(Ok(vars)) => what.job_spec().env.extend(vars),
                                    _ => tracing::warn!(
                                        "job environment extras not ready; submitting without them"
                                    ),
                                }
                            }
                            self.submit(what, &synced.root).await
                        }
                    };
                    let _ = w.send(out);
                }
            }
        }
    }

    async fn submit(
        &mut self,
        what: Submission,
        generation: &str,
    ) -> Result<Submitted, GrpcStatus> {
        let link = self
            .shared
            .agent
            .borrow()
            .clone()
            .ok_or_else(|| GrpcStatus::unavailable("not connected to the agent"))?;
        let mirror = self.repo.mirror.clone();
        let generation = generation.to_string();
        match what {
            Submission::Job(spec) => {
                let j = link
                    .jobs()
                    .submit(v1::SubmitRequest {
                        mirror,
                        generation: generation.clone(),
                        spec: Some(*spec),
                    })
                    .await?
                    .into_inner();
                tracing::info!(job = %j.id, generation, "job submitted");
                self.update_status(|st| st.jobs_submitted += 1);
                Ok(Submitted::Job(j))
            }
            Submission::Sweep(spec) => {
                let s = link
                    .sweeps()
                    .submit(v1::SweepSubmitRequest {
                        mirror,
                        generation: generation.clone(),
                        spec: Some(*spec),
                    })
                    .await?
                    .into_inner();
                tracing::info!(sweep = %s.id, trials = s.trials.len(), generation, "sweep submitted");
                Ok(Submitted::Sweep(s))
            }
            Submission::Resume { id, job } => {
                let s = link
                    .sweeps()
                    .resume(v1::SweepResumeRequest {
                        id,
                        mirror,
                        generation: generation.clone(),
                        job: Some(*job),
                    })
                    .await?
                    .into_inner();
                tracing::info!(sweep = %s.id, generation, "sweep resumed");
                Ok(Submitted::Sweep(s))
            }
        }
    }

    /// Output paths are never synced up (they come back from jobs): adds
    /// `outputs` to the set, persisted in `.bridge/outputs`. True when that
    /// changed it: the caller then rescans everything, so paths already
    /// synced under them are removed from the mirror.
    async fn set_outputs(&mut self, outputs: Vec<RelPath>) -> bool {
        let changed = self
            .with_local(move |l| {
                let before = l.outputs.len();
                for o in outputs {
                    if !l.outputs.contains(&o) {
                        l.outputs.push(o);
                    }
                }
                l.outputs.sort();
                (l.outputs.len() != before).then(|| l.outputs.clone())
            })
            .await;
        if let Some(all) = changed {
            let text: String = all.iter().map(|p| format!("{p}\n")).collect();
            if let Err(e) =
                bridge_proto::index::write_atomic(&self.repo.outputs_file, text.as_bytes())
            {
                tracing::warn!(error = %e, "cannot save the output paths");
            }
            self.full_diff = true;
            return true;
        }
        false
    }
}

/// Moves the submissions whose barrier marker is synced to the waiters
/// (answered after the next round); true when any moved.
fn release_submits(
    submits: &mut Vec<(u64, Waiter)>,
    synced: u64,
    waiters: &mut Vec<Waiter>,
) -> bool {
    let before = waiters.len();
    for (need, w) in std::mem::take(submits) {
        if need <= synced {
            waiters.push(w);
        } else {
            submits.push((need, w));
        }
    }
    waiters.len() > before
}

/// The agent's verified root of `mirror` (it re-stats the mirror first).
async fn verified_root(mut client: Client, mirror: String) -> Result<Hash, SyncError> {
    let r = client
        .root(v1::RootRequest { mirror })
        .await
        .map_err(rpc)?
        .into_inner();
    bridge_proto::chunking::hash_from_bytes(&r.root)
        .ok_or_else(|| SyncError::Protocol("Root without a root".into()))
}

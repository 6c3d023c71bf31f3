//! Port forwards between the laptop's loopback and the agent's, carried on
//! the agent connection (`bridge.v1.Tunnels`): no second connection, no
//! `ssh -L`, the same for every provider.
//!
//! - **Local** (`bridge forward 8888:9999`): the daemon listens on
//!   127.0.0.1:8888; each connection is one `Dial` call, which the agent
//!   connects to its 127.0.0.1:9999.
//! - **Reverse** (`bridge forward --reverse 5000`): the agent listens on its
//!   127.0.0.1 (the port asked for, or a free one), and the daemon keeps one
//!   `Listen` call open per forward; each connection the agent accepts is
//!   carried by an `Accept` call to the laptop's 127.0.0.1:5000.
//!
//! Forwards live in the daemon, so they outlive the command that made them,
//! and are saved in `.bridge/forwards.json` so a restarted daemon sets them
//! up again (a reverse one on the agent port it had: the agent keeps the
//! listener for a while). A job's forwards (`[[forward]]`, its MLflow server,
//! its debugger) are set up before it is submitted ([`Forwards::prepare_job`])
//! and removed once it has ended.
//!
//! Healing: the listeners on both ends stay up while the link is down. A
//! connection made then waits a few seconds for the link ([`OPEN_WAIT`]) and
//! is closed if it does not come back, so nothing hangs; the reverse loop
//! asks again every [`RELISTEN`] and the agent keeps its waiting connections
//! for it, so the first connection after a heal works.

use std::net::{Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bridge_proto::jobs::is_terminal;
use bridge_proto::tunnel::{self, QUEUE};
use bridge_proto::v1::{self, ForwardInfo, ForwardSpec, TunnelFrame, forward_spec::Direction};
use serde::{Deserialize, Serialize};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, oneshot};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Code, Status};

use crate::jobs::{Relay, retryable};
use crate::mlflow;
use crate::provider::{DialError, Provider};

/// How long a new connection waits for a working link before it is closed.
pub const OPEN_WAIT: Duration = Duration::from_secs(5);
/// How long a connection of a `wait_for_listener` forward waits for the
/// agent's port to accept.
const LISTENER_WAIT: Duration = Duration::from_secs(120);
/// How often a broken reverse forward asks the agent again.
const RELISTEN: Duration = Duration::from_millis(250);
/// How long adding a reverse forward waits for the agent's port.
const BIND_WAIT: Duration = Duration::from_secs(30);
/// How often a job's forwards look whether it has ended.
const JOB_POLL: Duration = Duration::from_millis(500);
/// Connections one forward carries at once; more are closed at once (a
/// runaway client must not exhaust the daemon's descriptors).
const MAX_OPEN: u32 = 1024;
/// Set to 1 in the daemon's environment: local forwards never use the
/// provider's own dial ([`Provider::dial`]), only the `Tunnels` stream.
pub const TUNNEL_ONLY_VAR: &str = "BRIDGE_TUNNEL_ONLY";
/// The name of a job's forward to the laptop's MLflow server.
pub const MLFLOW_FORWARD: &str = "MLflow";
/// debugpy's customary port, used on the laptop when it is free.
pub const DEBUGPY_PORT: u16 = 5678;

/// What a forward shows while it runs, shared with its tasks.
#[derive(Default)]
struct Live {
    remote_port: AtomicU32,
    state: Mutex<String>,
    connections: AtomicU64,
    open: AtomicU32,
}

impl Live {
    fn set_state(&self, s: impl Into<String>) {
        *self.state.lock().unwrap_or_else(|p| p.into_inner()) = s.into();
    }
}

/// One open connection, counted while it lives.
struct Open(Arc<Live>);

impl Open {
    fn new(live: &Arc<Live>) -> Open {
        live.connections.fetch_add(1, Ordering::Relaxed);
        live.open.fetch_add(1, Ordering::Relaxed);
        Open(live.clone())
    }
}

impl Drop for Open {
    fn drop(&mut self) {
        self.0.open.fetch_sub(1, Ordering::Relaxed);
    }
}

struct Forward {
    id: String,
    spec: ForwardSpec,
    /// The job it belongs to; "" for `bridge forward`'s.
    job: String,
    /// Reverse forwards: the agent listener's key.
    key: String,
    /// The laptop's port (bound for local forwards).
    local_port: u16,
    live: Arc<Live>,
    /// The accept loop (local) or the listen loop (reverse).
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Forward {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Forward {
    fn reverse(&self) -> bool {
        self.spec.direction() == Direction::Reverse
    }

    fn info(&self) -> ForwardInfo {
        ForwardInfo {
            id: self.id.clone(),
            spec: Some(self.spec.clone()),
            local_port: self.local_port as u32,
            remote_port: self.live.remote_port.load(Ordering::Relaxed),
            job: self.job.clone(),
            state: self
                .live
                .state
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .clone(),
            connections: self.live.connections.load(Ordering::Relaxed),
            open: self.live.open.load(Ordering::Relaxed),
        }
    }

    fn saved(&self) -> Saved {
        Saved {
            reverse: self.reverse(),
            local_port: self.local_port,
            // Until the agent answers (a restored reverse forward), the port
            // it had.
            remote_port: match self.live.remote_port.load(Ordering::Relaxed) {
                0 => self.spec.remote_port,
                p => p,
            } as u16,
            name: self.spec.name.clone(),
            env: self.spec.env.clone(),
            job: self.job.clone(),
            key: self.key.clone(),
            wait_for_listener: self.spec.wait_for_listener,
        }
    }
}

/// A forward as `.bridge/forwards.json` keeps it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
struct Saved {
    reverse: bool,
    local_port: u16,
    /// The agent port it had (reverse: bound; local: dialed).
    remote_port: u16,
    #[serde(default)]
    name: String,
    #[serde(default)]
    env: String,
    #[serde(default)]
    job: String,
    #[serde(default)]
    key: String,
    #[serde(default)]
    wait_for_listener: bool,
}

/// A job's forwards while it is being submitted.
pub struct Prepared {
    ids: Vec<String>,
    /// For the user, before the job runs (MLflow's artifact location, …).
    pub notes: Vec<String>,
}

pub struct Forwards {
    relay: Arc<Relay>,
    /// What carries local forwards' connections: the provider's own dial
    /// when it has one, else the `Tunnels` gRPC stream.
    carrier: Arc<Carrier>,
    mirror: String,
    /// `.bridge/forwards.json`.
    file: PathBuf,
    /// The agent runs on this machine: its paths are ours (MLflow's notes).
    agent_is_local: bool,
    table: Mutex<Table>,
}

#[derive(Default)]
struct Table {
    next: u64,
    list: Vec<Forward>,
}

/// The job id forwards carry while their job is being submitted.
const SUBMITTING: &str = "(submitting)";

impl Forwards {
    pub fn new(
        relay: Arc<Relay>,
        provider: Arc<dyn Provider>,
        mirror: String,
        file: PathBuf,
    ) -> Forwards {
        let agent_is_local = provider.name() == "local";
        Forwards {
            carrier: Arc::new(Carrier {
                relay: relay.clone(),
                provider,
                // A diagnostic (the benchmark and tests use it): carry every
                // connection through the agent's tunnel, as providers
                // without a dial of their own do.
                native_refused: std::sync::atomic::AtomicBool::new(
                    std::env::var_os(TUNNEL_ONLY_VAR).is_some_and(|v| v == "1"),
                ),
            }),
            relay,
            mirror,
            file,
            agent_is_local,
            table: Mutex::new(Table::default()),
        }
    }

    fn table(&self) -> std::sync::MutexGuard<'_, Table> {
        self.table.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn list(&self) -> Vec<ForwardInfo> {
        self.table().list.iter().map(Forward::info).collect()
    }

    /// Writes `.bridge/forwards.json` (best effort: a lost file only means a
    /// restarted daemon does not set them up again).
    fn save(&self) {
        let saved: Vec<Saved> = self
            .table()
            .list
            .iter()
            .filter(|f| f.job != SUBMITTING)
            .map(Forward::saved)
            .collect();
        let json = serde_json::to_vec_pretty(&saved).unwrap_or_default();
        if let Err(e) = bridge_proto::index::write_atomic(&self.file, &json) {
            tracing::warn!(error = %e, "cannot save the forwards");
        }
    }

    /// Sets up the forwards a previous daemon saved; those of jobs that have
    /// ended meanwhile go when their job is looked at.
    pub async fn restore(self: &Arc<Self>) {
        let Ok(bytes) = std::fs::read(&self.file) else {
            return;
        };
        let saved: Vec<Saved> = match serde_json::from_slice(&bytes) {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(error = %e, file = %self.file.display(), "unreadable forwards file; ignored");
                return;
            }
        };
        for s in saved {
            let spec = ForwardSpec {
                direction: if s.reverse {
                    Direction::Reverse as i32
                } else {
                    Direction::Local as i32
                },
                local_port: s.local_port as u32,
                // A reverse forward asks for the port it had, which the
                // agent still holds for it (the same key re-attaches).
                remote_port: s.remote_port as u32,
                name: s.name.clone(),
                env: s.env.clone(),
                wait_for_listener: s.wait_for_listener,
            };
            let key = (!s.key.is_empty()).then_some(s.key.clone());
            match self.add_inner(spec, &s.job, key, false).await {
                Ok(f) => {
                    tracing::info!(local = f.local_port, remote = f.remote_port, job = %s.job, "forward restored");
                    if !s.job.is_empty() {
                        self.watch_job(s.job.clone());
                    }
                }
                Err(e) => {
                    tracing::warn!(local = s.local_port, error = %e.message(), "cannot restore a forward")
                }
            }
        }
        self.save();
    }

    /// Adds a forward made by `bridge forward`.
    pub async fn add(self: &Arc<Self>, spec: ForwardSpec) -> Result<ForwardInfo, Status> {
        let f = self.add_inner(spec, "", None, true).await?;
        self.save();
        Ok(f)
    }

    /// Sets up a forward; `key` re-attaches to a reverse listener the agent
    /// still holds; `wait` waits for the agent's port of a reverse forward.
    async fn add_inner(
        self: &Arc<Self>,
        spec: ForwardSpec,
        job: &str,
        key: Option<String>,
        wait: bool,
    ) -> Result<ForwardInfo, Status> {
        let local = u16::try_from(spec.local_port)
            .map_err(|_| Status::invalid_argument(format!("{} is not a port", spec.local_port)))?;
        let remote = u16::try_from(spec.remote_port)
            .map_err(|_| Status::invalid_argument(format!("{} is not a port", spec.remote_port)))?;
        let live = Arc::new(Live::default());
        let id = {
            let mut t = self.table();
            t.next += 1;
            t.next.to_string()
        };
        let forward = match spec.direction() {
            Direction::Local => {
                if remote == 0 {
                    return Err(Status::invalid_argument(
                        "a forward needs the agent's port, e.g. `bridge forward 6006`",
                    ));
                }
                if local != 0 {
                    self.refuse_loop(local, remote)?;
                }
                if let Some(r) = self.table().list.iter().find(|f| {
                    f.reverse() && f.live.remote_port.load(Ordering::Relaxed) == remote as u32
                }) {
                    return Err(Status::invalid_argument(format!(
                        "agent port {remote} is the agent's end of the reverse forward to laptop port {}: forwarding to it would loop",
                        r.local_port
                    )));
                }
                let listener = self.bind_local(local, remote)?;
                let bound = listener
                    .local_addr()
                    .map_err(|e| Status::internal(e.to_string()))?
                    .port();
                self.refuse_loop(bound, remote)?;
                live.remote_port.store(remote as u32, Ordering::Relaxed);
                live.set_state("listening");
                let task = tokio::spawn(accept_local(
                    self.carrier.clone(),
                    listener,
                    Target {
                        port: remote,
                        wait_for_listener: spec.wait_for_listener,
                    },
                    live.clone(),
                ));
                Forward {
                    id,
                    spec,
                    job: job.to_string(),
                    key: String::new(),
                    local_port: bound,
                    live,
                    task,
                }
            }
            Direction::Reverse => {
                if local == 0 {
                    return Err(Status::invalid_argument(
                        "a reverse forward needs the laptop's port, e.g. `bridge forward --reverse 5000`",
                    ));
                }
                if self
                    .table()
                    .list
                    .iter()
                    .any(|f| !f.reverse() && f.local_port == local)
                {
                    return Err(Status::invalid_argument(format!(
                        "laptop port {local} is a bridge forward to the agent: a reverse forward to it would loop"
                    )));
                }
                let key = key.unwrap_or_else(|| format!("{}:{}", self.mirror, random_hex()));
                // With the local provider the agent's loopback is this one:
                // an agent listener on the target port itself would carry
                // its connections to itself.
                let remote = if self.agent_is_local && remote == local {
                    0
                } else {
                    remote
                };
                let (bound_tx, bound_rx) = oneshot::channel();
                live.set_state("waiting for the agent");
                let task = tokio::spawn(listen_loop(
                    self.relay.clone(),
                    ListenArgs {
                        key: key.clone(),
                        mirror: self.mirror.clone(),
                        asked: remote,
                        local,
                    },
                    live.clone(),
                    bound_tx,
                ));
                let f = Forward {
                    id,
                    spec,
                    job: job.to_string(),
                    key,
                    local_port: local,
                    live,
                    task,
                };
                if wait {
                    let got = tokio::time::timeout(BIND_WAIT, bound_rx).await;
                    match got {
                        Ok(Ok(Ok(_))) => {}
                        Ok(Ok(Err(e))) => return Err(e),
                        Ok(Err(_)) => return Err(Status::internal("the forward stopped")),
                        Err(_) => {
                            return Err(Status::unavailable(format!(
                                "the agent did not open the reverse forward within {} s (is it reachable? see `bridge status`)",
                                BIND_WAIT.as_secs()
                            )));
                        }
                    }
                }
                f
            }
        };
        let info = forward.info();
        tracing::info!(id = %info.id, local = info.local_port, remote = info.remote_port,
            reverse = forward.reverse(), job, "forward added");
        self.table().list.push(forward);
        Ok(info)
    }

    /// Binds the laptop's 127.0.0.1:`port` for a local forward, or says in
    /// one line why not and what to do.
    fn bind_local(&self, port: u16, remote: u16) -> Result<TcpListener, Status> {
        if port != 0
            && let Some(f) = self
                .table()
                .list
                .iter()
                .find(|f| !f.reverse() && f.local_port == port)
        {
            let owner = if f.job.is_empty() {
                format!("stop it with `bridge forward --stop {port}`")
            } else {
                format!("it belongs to job {}", f.job)
            };
            return Err(Status::already_exists(format!(
                "laptop port {port} is already forwarded by bridge (to agent port {}); {owner}, or pick another local port, e.g. `bridge forward 0:{remote}` for any free one",
                f.live.remote_port.load(Ordering::Relaxed)
            )));
        }
        let std = std::net::TcpListener::bind(SocketAddr::from((Ipv4Addr::LOCALHOST, port)))
            .map_err(|e| {
                if e.kind() == std::io::ErrorKind::AddrInUse {
                    Status::already_exists(format!(
                        "local port {port} is already in use on this machine; pick another local port, e.g. `bridge forward {}:{remote}`, or `0:{remote}` for any free one",
                        suggest_port(port)
                    ))
                } else {
                    Status::internal(format!("cannot listen on 127.0.0.1:{port}: {e}"))
                }
            })?;
        std.set_nonblocking(true)
            .map_err(|e| Status::internal(e.to_string()))?;
        TcpListener::from_std(std).map_err(|e| Status::internal(e.to_string()))
    }

    /// With the local provider the agent shares this machine's loopback: a
    /// forward whose agent port is one of the daemon's own listeners would
    /// connect to itself, over and over.
    fn refuse_loop(&self, bound: u16, remote: u16) -> Result<(), Status> {
        if !self.agent_is_local {
            return Ok(());
        }
        let ours = remote == bound
            || self
                .table()
                .list
                .iter()
                .any(|f| !f.reverse() && f.local_port == remote);
        if ours {
            return Err(Status::invalid_argument(format!(
                "the agent runs on this machine (local provider), so its port {remote} is this machine's port {remote}: \
                 it is reachable here already. To give it another local port: `bridge forward {}:{remote}`",
                suggest_port(remote)
            )));
        }
        Ok(())
    }

    /// Removes the forwards on laptop port `port` (reverse ones to it, with
    /// `reverse`). Returns what was removed.
    pub async fn remove_port(&self, port: u16, reverse: bool) -> Vec<ForwardInfo> {
        let gone = self.take(|f| f.local_port == port && f.reverse() == reverse);
        self.finish_removal(gone).await
    }

    /// Removes a job's forwards.
    pub async fn remove_job(&self, job: &str) -> Vec<ForwardInfo> {
        let gone = self.take(|f| f.job == job);
        self.finish_removal(gone).await
    }

    fn take(&self, pred: impl Fn(&Forward) -> bool) -> Vec<Forward> {
        let mut t = self.table();
        let (gone, kept): (Vec<Forward>, Vec<Forward>) = t.list.drain(..).partition(pred);
        t.list = kept;
        gone
    }

    /// Stops removed forwards: their listeners close (local ones here,
    /// reverse ones on the agent, best effort: an unreachable agent drops
    /// the listener after its grace period).
    async fn finish_removal(&self, gone: Vec<Forward>) -> Vec<ForwardInfo> {
        if gone.is_empty() {
            return Vec::new();
        }
        let infos: Vec<ForwardInfo> = gone.iter().map(Forward::info).collect();
        let keys: Vec<String> = gone
            .iter()
            .filter(|f| f.reverse())
            .map(|f| f.key.clone())
            .collect();
        // Wait until each task has ended, so a local listener is closed
        // when the caller hears the forward is gone (an abort alone only
        // schedules the task's end).
        for mut f in gone {
            f.task.abort();
            let _ = (&mut f.task).await;
        }
        self.save();
        if !keys.is_empty()
            && let Some(link) = self.relay.current_link()
        {
            // At most 2 s in all: an unreachable agent drops them itself.
            let unlisten = async {
                for key in keys {
                    let _ = link.tunnels().unlisten(v1::UnlistenRequest { key }).await;
                }
            };
            let _ = tokio::time::timeout(Duration::from_secs(2), unlisten).await;
        }
        infos
    }

    /// Removes every forward (the daemon stops; a reverse forward's agent
    /// listener goes too, so nothing is left listening for nobody).
    /// (`bridge down`: the saved list is emptied too; a daemon stopped by a
    /// signal keeps it, and the next one sets them up again.)
    pub async fn remove_all(&self) {
        let gone = self.take(|_| true);
        self.finish_removal(gone).await;
    }

    /// Removes the forwards of job (or sweep) `job` once it has ended.
    fn watch_job(self: &Arc<Self>, job: String) {
        let me = Arc::downgrade(self);
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(JOB_POLL).await;
                let Some(me) = me.upgrade() else { return };
                if !me.table().list.iter().any(|f| f.job == job) {
                    return;
                }
                // The owner is a job, or a sweep its trials share.
                let ended = if bridge_proto::sweep::sweep_number(&job).is_some() {
                    match me.relay.get_sweep(&job).await {
                        Ok(s) => is_terminal(s.state()),
                        Err(s) => s.code() == Code::NotFound,
                    }
                } else {
                    match me.relay.get(&job).await {
                        Ok(j) => is_terminal(j.state()),
                        Err(s) => s.code() == Code::NotFound,
                    }
                };
                if ended {
                    let gone = me.remove_job(&job).await;
                    tracing::info!(job = %job, forwards = gone.len(), "job ended; its forwards removed");
                    return;
                }
            }
        });
    }

    /// Sets up a job's forwards before it is submitted: its `[[forward]]`s,
    /// a reverse forward to the laptop's MLflow server, its debugger's; and
    /// the environment that tells the job about them. On error nothing is
    /// left behind.
    pub async fn prepare_job(self: &Arc<Self>, spec: &mut v1::JobSpec) -> Result<Prepared, Status> {
        let mut p = Prepared {
            ids: Vec::new(),
            notes: Vec::new(),
        };
        match self.prepare_inner(spec, &mut p).await {
            Ok(()) => Ok(p),
            Err(e) => {
                self.abandon(p).await;
                Err(e)
            }
        }
    }

    async fn prepare_inner(
        self: &Arc<Self>,
        spec: &mut v1::JobSpec,
        p: &mut Prepared,
    ) -> Result<(), Status> {
        for f in spec.forwards.clone() {
            let env = f.env.clone();
            let info = self.add_for_job(p, f).await?;
            if !env.is_empty() {
                spec.env.insert(env, info.remote_port.to_string());
            }
        }
        // MLflow: the spec's URI ([mlflow] or the user's shell), else the
        // job's own [env].
        let uri = if spec.mlflow_tracking_uri.is_empty() {
            spec.env
                .get(mlflow::TRACKING_VAR)
                .cloned()
                .unwrap_or_default()
        } else {
            spec.mlflow_tracking_uri.clone()
        };
        if let Some(server) = mlflow::LocalServer::parse(&uri) {
            let notes = if self.agent_is_local {
                Vec::new()
            } else {
                mlflow::artifact_notes(&server, &spec.env).await
            };
            p.notes.extend(notes);
            let info = self
                .add_for_job(
                    p,
                    ForwardSpec {
                        direction: Direction::Reverse as i32,
                        local_port: server.port as u32,
                        remote_port: server.port as u32,
                        name: MLFLOW_FORWARD.into(),
                        ..Default::default()
                    },
                )
                .await?;
            spec.env.insert(
                mlflow::TRACKING_VAR.into(),
                server.via(info.remote_port as u16),
            );
        } else if uri.starts_with("http://") || uri.starts_with("https://") {
            // A server the agent may reach on its own.
            spec.env.insert(mlflow::TRACKING_VAR.into(), uri);
        }
        if let Some(debug) = spec.debug.as_mut() {
            use v1::debug_spec::Kind;
            match debug.kind() {
                Kind::None => {}
                Kind::Debugpy => {
                    let link = self.relay.link().await?;
                    let port = link
                        .tunnels()
                        .free_port(v1::FreePortRequest {})
                        .await
                        .map_err(|s| unsupported(s, "the debugger's port"))?
                        .into_inner()
                        .port;
                    let local = match debug.local_port {
                        0 if port_free(DEBUGPY_PORT) => DEBUGPY_PORT as u32,
                        p => p,
                    };
                    let info = self
                        .add_for_job(
                            p,
                            ForwardSpec {
                                direction: Direction::Local as i32,
                                local_port: local,
                                remote_port: port,
                                name: "debugpy".into(),
                                env: String::new(),
                                wait_for_listener: true,
                            },
                        )
                        .await?;
                    debug.port = port;
                    debug.local_port = info.local_port;
                    spec.env
                        .insert("BRIDGE_DEBUG_PORT".into(), port.to_string());
                }
                Kind::Pycharm => {
                    if debug.local_port == 0 {
                        return Err(Status::invalid_argument(
                            "--debug=pycharm needs the port PyCharm's debug server listens on, e.g. --debug=pycharm:12345",
                        ));
                    }
                    let info = self
                        .add_for_job(
                            p,
                            ForwardSpec {
                                direction: Direction::Reverse as i32,
                                local_port: debug.local_port,
                                remote_port: debug.local_port,
                                name: "PyCharm debug server".into(),
                                ..Default::default()
                            },
                        )
                        .await?;
                    debug.port = info.remote_port;
                    spec.env
                        .insert("BRIDGE_DEBUG_PORT".into(), info.remote_port.to_string());
                }
            }
        }
        Ok(())
    }

    /// Adds one of a job's forwards while it is being submitted.
    async fn add_for_job(
        self: &Arc<Self>,
        p: &mut Prepared,
        spec: ForwardSpec,
    ) -> Result<ForwardInfo, Status> {
        let info = self.add_inner(spec, SUBMITTING, None, true).await?;
        p.ids.push(info.id.clone());
        Ok(info)
    }

    /// The job was submitted: its forwards are its own now, and go when it
    /// ends. Returns them.
    pub fn adopt(self: &Arc<Self>, p: &Prepared, job: &str) -> Vec<ForwardInfo> {
        let infos: Vec<ForwardInfo> = {
            let mut t = self.table();
            t.list
                .iter_mut()
                .filter(|f| p.ids.contains(&f.id))
                .map(|f| {
                    f.job = job.to_string();
                    f.info()
                })
                .collect()
        };
        if !infos.is_empty() {
            self.save();
            self.watch_job(job.to_string());
        }
        infos
    }

    /// The job was not submitted: its forwards go.
    pub async fn abandon(&self, p: Prepared) {
        let gone = self.take(|f| p.ids.contains(&f.id));
        self.finish_removal(gone).await;
    }
}

/// The status line of a call the agent did not take, with what to do when
/// the agent predates tunnels.
fn unsupported(s: Status, what: &str) -> Status {
    if s.code() == Code::Unimplemented {
        Status::failed_precondition(format!(
            "the agent does not support port forwards ({what}); it is older than this bridge: `bridge down --remote` then `bridge up` replaces it"
        ))
    } else {
        s
    }
}

fn random_hex() -> String {
    let mut b = [0u8; 8];
    let _ = getrandom::fill(&mut b);
    hex::encode(b)
}

/// Whether 127.0.0.1:`port` can be bound now.
fn port_free(port: u16) -> bool {
    std::net::TcpListener::bind(SocketAddr::from((Ipv4Addr::LOCALHOST, port))).is_ok()
}

/// A nearby port that is free now, to suggest instead of a taken one.
fn suggest_port(taken: u16) -> u16 {
    let base = if taken < 55536 {
        taken + 10000
    } else {
        taken.saturating_sub(10000).max(1024)
    };
    (base..base.saturating_add(100))
        .find(|&p| port_free(p))
        .unwrap_or(base)
}

/// Where a local forward's connections go on the agent.
#[derive(Clone, Copy)]
struct Target {
    port: u16,
    /// Wait for the port to accept rather than close the connection.
    wait_for_listener: bool,
}

/// What carries a local forward's connections (shared by its accept loop).
struct Carrier {
    relay: Arc<Relay>,
    provider: Arc<dyn Provider>,
    /// The provider's own dial was refused by its transport (an SSH server
    /// without TCP forwarding): the gRPC tunnel carries everything.
    native_refused: std::sync::atomic::AtomicBool,
}

/// A local forward's accept loop: each connection is carried on a task.
async fn accept_local(
    carrier: Arc<Carrier>,
    listener: TcpListener,
    remote: Target,
    live: Arc<Live>,
) {
    loop {
        match listener.accept().await {
            Ok((tcp, _)) => {
                if live.open.load(Ordering::Relaxed) >= MAX_OPEN {
                    tracing::warn!(
                        remote = remote.port,
                        "{MAX_OPEN} connections open on one forward; closing a new one"
                    );
                    continue;
                }
                let carrier = carrier.clone();
                let live = live.clone();
                tokio::spawn(async move {
                    let open = Open::new(&live);
                    let _ = tcp.set_nodelay(true);
                    if let Some(tcp) = carrier.carry_natively(tcp, remote, &live).await {
                        carry_local(&carrier.relay, tcp, remote, &live).await;
                    }
                    drop(open);
                });
            }
            Err(e) => {
                tracing::warn!(error = %e, "forward accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

impl Carrier {
    /// Carries `tcp` over the provider's own dial when it has one (see
    /// [`Provider::dial`]); gives the connection back when the tunnel must
    /// carry it instead.
    async fn carry_natively(
        &self,
        mut tcp: TcpStream,
        target: Target,
        live: &Live,
    ) -> Option<TcpStream> {
        if self.native_refused.load(Ordering::Relaxed) {
            return Some(tcp);
        }
        let Some(mut dial) = self.provider.dial(target.port) else {
            return Some(tcp);
        };
        let deadline = tokio::time::Instant::now() + OPEN_WAIT;
        let listener_deadline = tokio::time::Instant::now() + LISTENER_WAIT;
        loop {
            match tokio::time::timeout_at(deadline.max(listener_deadline), dial).await {
                Ok(Ok(mut stream)) => {
                    live.set_state("listening");
                    if let Err(e) = tokio::io::copy_bidirectional(&mut tcp, &mut stream).await {
                        tracing::debug!(remote = target.port, error = %e, "forwarded connection ended");
                    }
                    return None;
                }
                Ok(Err(DialError::NothingListens { .. }))
                    if target.wait_for_listener
                        && tokio::time::Instant::now() < listener_deadline =>
                {
                    tokio::time::sleep(Duration::from_millis(200)).await;
                    match self.provider.dial(target.port) {
                        Some(d) => dial = d,
                        None => return Some(tcp),
                    }
                }
                Ok(Err(DialError::NothingListens { port, why })) => {
                    tracing::debug!(port, why, "forwarded connection refused");
                    return None;
                }
                Ok(Err(DialError::Unsupported(why))) => {
                    tracing::info!(why, "port forwards go through the agent's tunnel instead");
                    self.native_refused.store(true, Ordering::Relaxed);
                    return Some(tcp);
                }
                Ok(Err(DialError::Link(why))) if tokio::time::Instant::now() < deadline => {
                    live.set_state(format!("waiting for the agent: {why}"));
                    self.relay.poke();
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    match self.provider.dial(target.port) {
                        Some(d) => dial = d,
                        None => return Some(tcp),
                    }
                }
                Ok(Err(DialError::Link(why))) => {
                    tracing::debug!(why, "no link for a forwarded connection; closing it");
                    return None;
                }
                Err(_) => return None,
            }
        }
    }
}

/// Opens a `Dial` call for one laptop connection (waiting up to
/// [`OPEN_WAIT`] for a link that works) and carries the connection on it.
/// Dropping `tcp` is the answer to anything that fails: the client sees its
/// connection closed.
async fn carry_local(relay: &Relay, tcp: TcpStream, target: Target, live: &Live) {
    let remote = target.port;
    let deadline = tokio::time::Instant::now() + OPEN_WAIT;
    let listener_deadline = tokio::time::Instant::now() + LISTENER_WAIT;
    let (tx, inbound) = loop {
        let (tx, rx) = mpsc::channel(QUEUE);
        let _ = tx
            .send(TunnelFrame {
                port: remote as u32,
                ..Default::default()
            })
            .await;
        // Each attempt gets OPEN_WAIT for the link and the call: a
        // `wait_for_listener` connection keeps asking past the first one's
        // (a debugger attached while debugpy installs waits for it).
        let attempt_by = tokio::time::Instant::now() + OPEN_WAIT;
        let attempt = match tokio::time::timeout_at(attempt_by, relay.link()).await {
            Ok(Ok(link)) => {
                tokio::time::timeout_at(attempt_by, link.tunnels().dial(ReceiverStream::new(rx)))
                    .await
            }
            Ok(Err(s)) => Ok(Err(s)),
            Err(_) => {
                tracing::debug!(remote, "no link for a forwarded connection; closing it");
                return;
            }
        };
        match attempt {
            Ok(Ok(r)) => {
                live.set_state("listening");
                break (tx, r.into_inner());
            }
            Ok(Err(s)) if retryable(&s) && tokio::time::Instant::now() < deadline => {
                live.set_state(format!("waiting for the agent: {}", s.message()));
                relay.poke();
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Ok(Err(s))
                if target.wait_for_listener
                    && s.code() == Code::FailedPrecondition
                    && tokio::time::Instant::now() < listener_deadline =>
            {
                // Nothing listens yet (debugpy still starting): ask again.
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            Ok(Err(s)) => {
                // Nothing listens on the agent's port (or the link stayed
                // down): the forward stays up, this connection closes.
                tracing::debug!(remote, error = %s.message(), "forwarded connection refused");
                if !retryable(&s) {
                    live.set_state("listening");
                }
                return;
            }
            Err(_) => return,
        }
    };
    if let Err(e) = tunnel::splice(tcp, TunnelFrame::default(), inbound, tx).await {
        tracing::debug!(remote, error = %e, "forwarded connection ended");
    }
}

struct ListenArgs {
    key: String,
    mirror: String,
    /// The agent port asked for first (0: any).
    asked: u16,
    /// The laptop port connections go to.
    local: u16,
}

/// A reverse forward: keeps a `Listen` call open on the current link, asks
/// again when it breaks, and carries each connection the agent announces.
/// The first bound port (or a refusal) goes to `bound`.
async fn listen_loop(
    relay: Arc<Relay>,
    args: ListenArgs,
    live: Arc<Live>,
    bound: oneshot::Sender<Result<u16, Status>>,
) {
    let mut bound = Some(bound);
    let mut asked = args.asked;
    loop {
        let link = match relay.link().await {
            Ok(l) => l,
            Err(s) => {
                live.set_state(format!("waiting for the agent: {}", s.message()));
                tokio::time::sleep(RELISTEN).await;
                continue;
            }
        };
        let call = link
            .tunnels()
            .listen(v1::ListenRequest {
                key: args.key.clone(),
                port: asked as u32,
                exact: false,
                mirror: args.mirror.clone(),
            })
            .await;
        let mut events = match call {
            Ok(r) => r.into_inner(),
            Err(s) if retryable(&s) => {
                live.set_state(format!("waiting for the agent: {}", s.message()));
                relay.poke();
                tokio::time::sleep(RELISTEN).await;
                continue;
            }
            Err(s) => {
                let s = unsupported(s, "a reverse forward");
                live.set_state(format!("failed: {}", s.message()));
                if let Some(b) = bound.take() {
                    let _ = b.send(Err(s));
                }
                // Asked again later: the agent may be replaced meanwhile.
                tokio::time::sleep(Duration::from_secs(5)).await;
                continue;
            }
        };
        loop {
            match events.message().await {
                Ok(Some(ev)) if ev.bound_port != 0 => {
                    let port = ev.bound_port as u16;
                    live.remote_port.store(port as u32, Ordering::Relaxed);
                    live.set_state("listening");
                    // After a listener expired, ask for the same port again.
                    asked = port;
                    if let Some(b) = bound.take() {
                        let _ = b.send(Ok(port));
                    }
                }
                Ok(Some(ev)) => {
                    if live.open.load(Ordering::Relaxed) >= MAX_OPEN {
                        tracing::warn!(key = %args.key, "{MAX_OPEN} connections open on one reverse forward; leaving a new one to the agent's timeout");
                        continue;
                    }
                    let link = link.clone();
                    let live = live.clone();
                    let local = args.local;
                    tokio::spawn(async move {
                        let open = Open::new(&live);
                        carry_reverse(link, ev.accept_id, local).await;
                        drop(open);
                    });
                }
                Ok(None) => break,
                Err(s) => {
                    tracing::debug!(key = %args.key, error = %s.message(), "reverse forward's listen call broke");
                    break;
                }
            }
        }
        live.set_state("waiting for the agent");
        relay.poke();
        tokio::time::sleep(RELISTEN).await;
    }
}

/// Carries one connection the agent accepted to the laptop's `local` port.
/// When nothing listens here, the call is opened and dropped at once, so
/// the agent closes its side: the job sees the connection closed.
async fn carry_reverse(link: crate::engine::AgentLink, accept_id: u64, local: u16) {
    let tcp = TcpStream::connect(SocketAddr::from((Ipv4Addr::LOCALHOST, local))).await;
    let (tx, rx) = mpsc::channel(QUEUE);
    let _ = tx
        .send(TunnelFrame {
            accept_id,
            ..Default::default()
        })
        .await;
    let call = link.tunnels().accept(ReceiverStream::new(rx)).await;
    let tcp = match tcp {
        Ok(t) => t,
        Err(e) => {
            tracing::debug!(local, error = %e, "nothing listens on the laptop's port; closing the agent's connection");
            return;
        }
    };
    match call {
        Ok(r) => {
            if let Err(e) = tunnel::splice(tcp, TunnelFrame::default(), r.into_inner(), tx).await {
                tracing::debug!(local, error = %e, "reverse-forwarded connection ended");
            }
        }
        Err(s) => {
            tracing::debug!(local, error = %s.message(), "cannot take a reverse-forwarded connection")
        }
    }
}

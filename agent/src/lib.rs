//! `bridge-agent`: the process that keeps mirrors on a remote machine.
//!
//! # Layout
//! - [`service`]: the `bridge.v1.Agent` gRPC service (handshake, manifest, root,
//!   sync rounds) and the token check in front of it.
//! - [`apply`]: one sync round — plans, chunk bodies, atomic writes, refusals.
//! - [`mirror`]: a mirror directory and the agent's own, disk-derived view of it.
//! - [`store`]: where already-present chunks live (mirror files and retired
//!   versions), bounded.
//! - [`jobs`]: jobs — submission against a generation, snapshots, the GPU-aware
//!   queue, supervision, outputs — and the `bridge.v1.Jobs` service.
//! - [`sweeps`]: sweeps — many trials of one job against one generation,
//!   each an ordinary job, placed behind a seam — and the `bridge.v1.Sweeps`
//!   service.
//! - [`shim`]: `bridge-agent shim JOB_DIR`, the per-job supervisor process that
//!   runs the steps, writes the log and records the exit, independent of the agent.
//! - [`joblog`]: the job log's record format, its writer and its readers.
//! - [`envcache`]: cached Python environments and setup commands.
//! - [`debugger`]: debugpy for `bridge run --debug` (a `sitecustomize` hook,
//!   debugpy installed once per Python when the env lacks it).
//! - [`gpu`]: GPU discovery (`nvidia-smi`) behind the `GpuInventory` trait.
//! - [`tunnels`]: the `bridge.v1.Tunnels` service — dials loopback ports for
//!   the daemon's port forwards and keeps loopback listeners for reverse ones.
//! - [`background`]: threads for work done for later (spares, deleting old
//!   trees), at the lowest priority.
//! - [`idle`]: idle autostop — which daemons are attached (the `Attach`
//!   stream's pings), the idle clock, and the command run when it expires.
//!
//! Directory layout under `--root`:
//! `mirrors/<name>/` (the mirrors), `state/` (their stat caches),
//! `store/retired/` (old versions kept for dedup; `store/gone/` holds evicted
//! ones until a background thread unlinks them, see
//! [`bridge_proto::oldfiles`]), `tmp/` (files being written;
//! emptied at start), `jobs/<id>/` (one per job), `sweeps/<n>/` (one per
//! sweep: its record and the snapshot its trials are made from), `cache/` (Python
//! environments and setup markers), `agent.lock` (one agent per root).

pub mod apply;
pub mod background;
pub mod cluster;
pub mod debugger;
pub mod envcache;
pub mod gpu;
pub mod idle;
pub mod joblog;
pub mod jobs;
pub mod kernel;
pub mod memory;
pub mod mirror;
pub mod service;
pub mod shim;
pub mod store;
pub mod sweeps;
pub mod tunnels;
pub mod watch;

/// Relinks applied per hold of the state lock when the agent is quiet
/// (about 2 ms).
const RELINK_BATCH: usize = 4096;

use std::fs;
use std::future::Future;
use std::io;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use bridge_proto::v1::agent_server::AgentServer;
use bridge_proto::v1::jobs_server::JobsServer;
use bridge_proto::v1::sweeps_server::SweepsServer;
use bridge_proto::v1::tunnels_server::TunnelsServer;
use bridge_proto::{AUTH_HEADER, MAX_MESSAGE_BYTES};
use tokio::net::{TcpListener, UnixListener};
use tokio_stream::StreamExt;
use tokio_stream::wrappers::{TcpListenerStream, UnixListenerStream};
use tonic::{Request, Status};

use crate::service::{AgentService, State};

/// Default bound on retired file versions kept for dedup.
pub const DEFAULT_CACHE_BYTES: u64 = 2 * 1024 * 1024 * 1024;

/// What the agent serves and how.
#[derive(Debug, Clone)]
pub struct Config {
    /// Directory holding mirrors, store and state.
    pub root: PathBuf,
    /// Shared secret every call must present.
    pub token: String,
    /// Bound on the retired-version cache.
    pub cache_bytes: u64,
    /// Idle autostop (`--idle-timeout`, `--idle-command`); `None`: never.
    pub idle: Option<idle::Policy>,
}

/// A bound listener the agent serves on.
pub enum Listener {
    Unix(UnixListener),
    Tcp(TcpListener),
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot prepare agent root {path}: {source}")]
    Root { path: PathBuf, source: io::Error },
    #[error("another bridge-agent is already serving {0}")]
    Locked(PathBuf),
    #[error("cannot open the job store under {path}: {source}")]
    Jobs { path: PathBuf, source: io::Error },
    #[error("gRPC server failed: {0}")]
    Serve(#[from] tonic::transport::Error),
}

/// Serves until `shutdown` resolves, then saves every mirror's stat cache.
pub async fn run(
    config: Config,
    listener: Listener,
    shutdown: impl Future<Output = ()>,
) -> Result<(), Error> {
    let root_err = |source| Error::Root {
        path: config.root.clone(),
        source,
    };
    for d in ["mirrors", "state", "store", "tmp"] {
        fs::create_dir_all(config.root.join(d)).map_err(root_err)?;
    }
    let lock_file = fs::File::create(config.root.join("agent.lock")).map_err(root_err)?;
    let _lock = nix::fcntl::Flock::lock(lock_file, nix::fcntl::FlockArg::LockExclusiveNonblock)
        .map_err(|_| Error::Locked(config.root.clone()))?;
    let tmp = config.root.join("tmp");
    bridge_proto::oldfiles::empty_dir(&tmp).map_err(root_err)?;
    let store =
        store::Store::open(&config.root.join("store"), config.cache_bytes).map_err(root_err)?;
    let state = Arc::new(Mutex::new(State {
        store,
        mirrors: Default::default(),
    }));
    let jobs = Arc::new(
        jobs::Jobs::open(&config.root, Box::new(gpu::NvidiaSmi::default())).map_err(|source| {
            Error::Jobs {
                path: config.root.clone(),
                source,
            }
        })?,
    );
    let sweeps = Arc::new(
        sweeps::Sweeps::open(
            &config.root,
            jobs.clone(),
            Box::new(sweeps::placement::LocalJobs { jobs: jobs.clone() }),
            tokio::runtime::Handle::try_current().ok(),
        )
        .map_err(|source| Error::Jobs {
            path: config.root.clone(),
            source,
        })?,
    );
    let stop_poller = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let scheduler = sweeps.clone();
    let poller = jobs::spawn_poller(
        jobs.clone(),
        state.clone(),
        stop_poller.clone(),
        move |state, damaged| scheduler.poll(state, damaged),
    );
    let idle = Arc::new(idle::Idle::new(
        config.idle.clone(),
        Arc::new(idle::SystemClock),
        sweeps.clone(),
    ));
    // Set when shutdown begins: the idle policy stops, and open `Attach`
    // streams end (the graceful shutdown would otherwise wait for them).
    let (stopping, stopping_rx) = tokio::sync::watch::channel(false);
    let idle_policy = tokio::spawn(idle::run(idle.clone(), stopping_rx.clone()));
    let trees = state.clone();
    // When quiet: the ctimes job snapshots moved go into the stat caches
    // (in batches of a few milliseconds, so that a request arriving
    // meanwhile waits for one batch at most), then the trees give back the
    // room their lists grew into.
    let compact = move || {
        loop {
            let Ok(mut st) = trees.lock() else { return };
            let mut left = false;
            for m in st.mirrors.values_mut() {
                left |= m.apply_some_relinks(RELINK_BATCH);
            }
            if !left {
                for m in st.mirrors.values_mut() {
                    m.tree.shrink_to_fit();
                }
                return;
            }
            drop(st);
            // The lock is not fair: give a waiting request its turn.
            std::thread::sleep(std::time::Duration::from_micros(200));
        }
    };
    tokio::spawn(memory::trim_when_quiet(compact, stopping_rx.clone()));
    let shutdown = async {
        shutdown.await;
        let _ = stopping.send(true);
    };
    let svc = AgentService {
        root: config.root.clone(),
        tmp,
        state: state.clone(),
        idle,
        stopping: stopping_rx.clone(),
    };
    let ended_jobs = jobs.clone();
    let tunnels_svc = tunnels::TunnelsService::new(
        stopping_rx.clone(),
        Some(Arc::new(move |id| ended_jobs.ended(id).unwrap_or(true))),
    );
    let jobs_svc = jobs::service::JobsService {
        jobs: jobs.clone(),
        state: state.clone(),
    };
    let sweeps_svc = sweeps::service::SweepsService {
        sweeps: sweeps.clone(),
        state: state.clone(),
    };
    let expected = format!("Bearer {}", config.token);
    let auth = move |req: Request<()>| -> Result<Request<()>, Status> {
        let ok = req
            .metadata()
            .get(AUTH_HEADER)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| constant_time_eq(v.as_bytes(), expected.as_bytes()));
        if ok {
            Ok(req)
        } else {
            Err(Status::unauthenticated(
                "missing or wrong agent token: the daemon must present the token `bridge up` generated",
            ))
        }
    };
    let server = tonic::service::interceptor::InterceptedService::new(
        AgentServer::new(svc)
            .max_decoding_message_size(MAX_MESSAGE_BYTES)
            .max_encoding_message_size(MAX_MESSAGE_BYTES),
        auth.clone(),
    );
    let jobs_server = tonic::service::interceptor::InterceptedService::new(
        JobsServer::new(jobs_svc)
            .max_decoding_message_size(MAX_MESSAGE_BYTES)
            .max_encoding_message_size(MAX_MESSAGE_BYTES),
        auth.clone(),
    );
    let sweeps_server = tonic::service::interceptor::InterceptedService::new(
        SweepsServer::new(sweeps_svc)
            .max_decoding_message_size(MAX_MESSAGE_BYTES)
            .max_encoding_message_size(MAX_MESSAGE_BYTES),
        auth.clone(),
    );
    let tunnels_server =
        tonic::service::interceptor::InterceptedService::new(TunnelsServer::new(tunnels_svc), auth);
    let router = tonic::transport::Server::builder()
        .tcp_nodelay(true)
        .add_service(server)
        .add_service(jobs_server)
        .add_service(sweeps_server)
        .add_service(tunnels_server);
    tracing::info!(root = %config.root.display(), "agent serving");
    match listener {
        Listener::Unix(l) => {
            router
                .serve_with_incoming_shutdown(UnixListenerStream::new(l), shutdown)
                .await?
        }
        Listener::Tcp(l) => {
            // Nagle off: gRPC's small frames (a log line, an ack) must not
            // wait for the peer's delayed ACK (40 ms each, seen through the
            // Kubernetes port-forward).
            let incoming = TcpListenerStream::new(l).map(|s| {
                s.inspect(|s| {
                    if let Err(e) = s.set_nodelay(true) {
                        tracing::debug!(error = %e, "TCP_NODELAY");
                    }
                })
            });
            router
                .serve_with_incoming_shutdown(incoming, shutdown)
                .await?
        }
    }
    if let Ok(mut st) = state.lock() {
        for m in st.mirrors.values_mut() {
            m.maybe_save(true);
        }
    }
    let _ = stopping.send(true);
    let _ = idle_policy.await;
    // Jobs keep running under their shims; a restarted agent picks them up.
    stop_poller.store(true, std::sync::atomic::Ordering::Relaxed);
    let _ = poller.join();
    tracing::info!("agent stopped");
    Ok(())
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

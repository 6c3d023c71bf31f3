//! The control server (`bridge.v1.Control` on `.bridge/daemon.sock`) and the
//! client helper the CLI uses to reach it.

use std::path::Path;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use bridge_proto::v1::control_server::Control;
use bridge_proto::v1::{self};
use hyper_util::rt::TokioIo;
use tokio::net::UnixStream;
use tokio::sync::{mpsc, oneshot, watch};
use tokio_stream::Stream;
use tonic::transport::{Channel, Endpoint, Uri};
use tonic::{Request, Response, Status};

use crate::engine::{Command, Shared};
use crate::forwards::Forwards;
use crate::jobs::Relay;
use crate::provider::Provider;
use crate::status::GpuStatus;

pub struct ControlService {
    pub shared: Arc<Shared>,
    pub cmds: mpsc::Sender<Command>,
    /// Fired by `Shutdown` (or the daemon's own shutdown signal).
    pub stop: watch::Sender<Option<Stop>>,
    /// Job calls go to the agent through it.
    pub relay: Arc<Relay>,
    pub provider: Arc<dyn Provider>,
    /// Port forwards, the jobs' included.
    pub forwards: Arc<Forwards>,
    /// The repository (git state for MLflow's tags).
    pub repo: std::path::PathBuf,
    /// The last git state read for MLflow's tags.
    pub git_context: Arc<crate::mlflow::ContextCache>,
}

/// What a stop takes down besides the daemon. The default (a signal to the
/// daemon) leaves the agent and its jobs running.
#[derive(Debug, Clone, Default)]
pub struct Stop {
    /// Cancel running jobs first (this repository's, or all with
    /// `all_mirrors`), waiting out their grace period.
    pub cancel_jobs: bool,
    pub all_mirrors: bool,
    /// Stop the agent process itself.
    pub stop_agent: bool,
    /// Then remove the agent's files.
    pub purge: bool,
    /// `bridge down`: cancel this repository's live jobs (dev servers in the
    /// mirror) and remove the forwards, also on an agent that keeps running.
    pub down: bool,
}

/// How long `status` waits for the agent's GPU list.
const GPU_STATUS_WAIT: Duration = Duration::from_millis(1500);

type ProgressStream = Pin<Box<dyn Stream<Item = Result<v1::SyncProgress, Status>> + Send>>;

#[tonic::async_trait]
impl Control for ControlService {
    async fn status(
        &self,
        _: Request<v1::StatusRequest>,
    ) -> Result<Response<v1::StatusReply>, Status> {
        let mut st = self
            .shared
            .status
            .lock()
            .map_err(|_| Status::internal("status poisoned"))?
            .clone();
        if self.shared.agent.borrow().is_some()
            && let Ok(Ok(g)) = tokio::time::timeout(GPU_STATUS_WAIT, self.relay.gpus()).await
        {
            st.gpu_note = g.note;
            st.gpus = g
                .gpus
                .into_iter()
                .map(|g| GpuStatus {
                    index: g.index,
                    name: g.name,
                    memory_total_mib: g.memory_total_mib,
                    memory_used_mib: g.memory_used_mib,
                    utilization_pct: g.utilization_pct,
                    job: (!g.job.is_empty()).then_some(g.job),
                })
                .collect();
        }
        st.forwards = self
            .forwards
            .list()
            .iter()
            .map(crate::status::ForwardStatus::from)
            .collect();
        let json = serde_json::to_string(&st).map_err(|e| Status::internal(e.to_string()))?;
        Ok(Response::new(v1::StatusReply { json }))
    }

    type SyncStream = ProgressStream;

    async fn sync(
        &self,
        req: Request<v1::SyncRequest>,
    ) -> Result<Response<Self::SyncStream>, Status> {
        let req = req.into_inner();
        let wait = req.wait;
        let issued = (req.issued_unix_ms > 0)
            .then(|| std::time::UNIX_EPOCH + std::time::Duration::from_millis(req.issued_unix_ms));
        let (reply, done) = oneshot::channel();
        self.cmds
            .send(Command::Sync {
                verify: wait,
                issued,
                reply,
            })
            .await
            .map_err(|_| Status::unavailable("the daemon is shutting down"))?;
        if !wait {
            let msg = v1::SyncProgress {
                phase: "requested".into(),
                ..Default::default()
            };
            return Ok(Response::new(Box::pin(tokio_stream::iter([Ok(msg)]))));
        }
        let mut progress = self.shared.progress.subscribe();
        let (tx, rx) = mpsc::channel(16);
        tokio::spawn(async move {
            let mut done = done;
            loop {
                let p = progress.borrow_and_update().clone();
                let msg = v1::SyncProgress {
                    files_done: p.files_done,
                    files_total: p.files_total,
                    bytes_done: p.bytes_done,
                    bytes_total: p.bytes_total,
                    phase: p.phase,
                    error: p.error,
                    ..Default::default()
                };
                if tx.send(Ok(msg)).await.is_err() {
                    return;
                }
                tokio::select! {
                    r = &mut done => {
                        let out = match r {
                            Ok(Ok(s)) => Ok(v1::SyncProgress {
                                generation: s.generation,
                                in_sync: true,
                                root: s.root,
                                phase: "in sync".into(),
                                ..Default::default()
                            }),
                            Ok(Err(e)) => Err(Status::unavailable(e)),
                            Err(_) => Err(Status::unavailable("the daemon stopped")),
                        };
                        let _ = tx.send(out).await;
                        return;
                    }
                    c = progress.changed() => if c.is_err() { return },
                }
                // At most ~20 progress messages a second.
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        });
        Ok(Response::new(Box::pin(
            tokio_stream::wrappers::ReceiverStream::new(rx),
        )))
    }

    async fn shutdown(
        &self,
        req: Request<v1::ShutdownRequest>,
    ) -> Result<Response<v1::ShutdownReply>, Status> {
        let req = req.into_inner();
        let local = self.provider.down_stops_agent();
        let stop_agent = local || req.remote || req.purge;
        let mut stop = Stop {
            cancel_jobs: local,
            all_mirrors: false,
            stop_agent,
            purge: req.purge,
            down: true,
        };
        if stop_agent && !local {
            // A shared agent: its jobs may belong to other repositories too.
            let running = self.relay.list_all_mirrors().await?;
            if !running.is_empty() && !req.force {
                return Err(Status::failed_precondition(crate::down::still_running(
                    &running,
                )));
            }
            stop.cancel_jobs = !running.is_empty();
            stop.all_mirrors = true;
        }
        let _ = self.stop.send(Some(stop));
        Ok(Response::new(v1::ShutdownReply {}))
    }

    async fn submit(
        &self,
        req: Request<v1::ControlSubmitRequest>,
    ) -> Result<Response<v1::ControlSubmitReply>, Status> {
        let spec = req
            .into_inner()
            .spec
            .ok_or_else(|| Status::invalid_argument("submit without a job spec"))?;
        let relay = self.relay.clone();
        let (job, forwards, notes) = self
            .with_forwards(
                spec,
                |spec, tags| async move { relay.submit(spec, Some(tags)).await },
                |j: &v1::JobInfo| j.id.clone(),
            )
            .await?;
        Ok(Response::new(v1::ControlSubmitReply {
            job: Some(job),
            forwards,
            notes,
        }))
    }

    async fn forward(
        &self,
        req: Request<v1::ForwardRequest>,
    ) -> Result<Response<v1::ForwardInfo>, Status> {
        let spec = req
            .into_inner()
            .spec
            .ok_or_else(|| Status::invalid_argument("forward without a spec"))?;
        self.forwards.add(spec).await.map(Response::new)
    }

    async fn unforward(
        &self,
        req: Request<v1::UnforwardRequest>,
    ) -> Result<Response<v1::ForwardList>, Status> {
        let req = req.into_inner();
        let port = u16::try_from(req.port)
            .map_err(|_| Status::invalid_argument(format!("{} is not a port", req.port)))?;
        let forwards = self.forwards.remove_port(port, req.reverse).await;
        if forwards.is_empty() {
            let what = if req.reverse {
                "reverse forward to"
            } else {
                "forward on"
            };
            return Err(Status::not_found(format!(
                "no {what} laptop port {port}; `bridge forward --list` shows them"
            )));
        }
        Ok(Response::new(v1::ForwardList { forwards }))
    }

    async fn forwards(
        &self,
        _: Request<v1::ForwardsRequest>,
    ) -> Result<Response<v1::ForwardList>, Status> {
        Ok(Response::new(v1::ForwardList {
            forwards: self.forwards.list(),
        }))
    }

    async fn list(&self, req: Request<v1::ListRequest>) -> Result<Response<v1::JobList>, Status> {
        let jobs = self.relay.list(req.into_inner().all).await?;
        Ok(Response::new(v1::JobList { jobs }))
    }

    type LogsStream = Pin<Box<dyn Stream<Item = Result<v1::LogChunk, Status>> + Send>>;

    async fn logs(
        &self,
        req: Request<v1::LogsRequest>,
    ) -> Result<Response<Self::LogsStream>, Status> {
        let req = req.into_inner();
        // NOT_FOUND for an unknown job before the stream starts.
        self.relay.get(&req.id).await?;
        let (tx, rx) = mpsc::channel(16);
        let relay = self.relay.clone();
        tokio::spawn(async move { relay.logs(req, tx).await });
        Ok(Response::new(Box::pin(
            tokio_stream::wrappers::ReceiverStream::new(rx),
        )))
    }

    async fn cancel(&self, req: Request<v1::JobRef>) -> Result<Response<v1::JobInfo>, Status> {
        self.relay
            .cancel(&req.into_inner().id)
            .await
            .map(Response::new)
    }

    async fn wait(&self, req: Request<v1::JobRef>) -> Result<Response<v1::JobInfo>, Status> {
        let id = req.into_inner().id;
        let job = self.relay.wait(&id).await?;
        // Ended: its forwards go now, not at the next look (`bridge run`
        // returns with them closed).
        self.forwards.remove_job(&id).await;
        Ok(Response::new(job))
    }

    async fn pull(&self, req: Request<v1::JobRef>) -> Result<Response<v1::PullReply>, Status> {
        let (got, dest) = self.relay.pull(&req.into_inner().id).await?;
        Ok(Response::new(v1::PullReply {
            files: got.files,
            bytes_received: got.bytes,
            destinations: vec![if dest.is_empty() { ".".into() } else { dest }],
            kept_local: got.conflicts,
        }))
    }

    type KernelStream = crate::kernel::DownStream;

    async fn kernel(
        &self,
        req: Request<tonic::Streaming<v1::KernelUp>>,
    ) -> Result<Response<Self::KernelStream>, Status> {
        Ok(Response::new(crate::kernel::serve(
            self.relay.clone(),
            self.cmds.clone(),
            self.forwards.clone(),
            req.into_inner(),
        )))
    }

    async fn gpus(&self, _: Request<v1::GpusRequest>) -> Result<Response<v1::GpuList>, Status> {
        self.relay.gpus().await.map(Response::new)
    }

    async fn submit_sweep(
        &self,
        req: Request<v1::ControlSweepRequest>,
    ) -> Result<Response<v1::ControlSweepReply>, Status> {
        let mut spec = req
            .into_inner()
            .spec
            .ok_or_else(|| Status::invalid_argument("submit without a sweep spec"))?;
        let mut job = spec
            .job
            .take()
            .ok_or_else(|| Status::invalid_argument("a sweep without its job"))?;
        sweep_forwards_allowed(&job)?;
        keep_tracking_uri(&mut job);
        let relay = self.relay.clone();
        let (sweep, forwards, notes) = self
            .with_forwards(
                job,
                |job, tags| async move {
                    spec.job = Some(job);
                    relay.submit_sweep(spec, Some(tags)).await
                },
                |s: &v1::SweepInfo| s.id.clone(),
            )
            .await?;
        Ok(Response::new(v1::ControlSweepReply {
            sweep: Some(sweep),
            forwards,
            notes,
        }))
    }

    async fn sweeps(
        &self,
        req: Request<v1::SweepListRequest>,
    ) -> Result<Response<v1::SweepList>, Status> {
        let sweeps = self.relay.list_sweeps(req.into_inner().all).await?;
        Ok(Response::new(v1::SweepList { sweeps }))
    }

    async fn get_sweep(
        &self,
        req: Request<v1::SweepRef>,
    ) -> Result<Response<v1::SweepInfo>, Status> {
        self.relay
            .get_sweep(&req.into_inner().id)
            .await
            .map(Response::new)
    }

    async fn cancel_sweep(
        &self,
        req: Request<v1::SweepRef>,
    ) -> Result<Response<v1::SweepInfo>, Status> {
        self.relay
            .cancel_sweep(&req.into_inner().id)
            .await
            .map(Response::new)
    }

    async fn resume_sweep(
        &self,
        req: Request<v1::SweepRef>,
    ) -> Result<Response<v1::ControlSweepReply>, Status> {
        let id = req.into_inner().id;
        let before = self.relay.get_sweep(&id).await?;
        if !bridge_proto::jobs::is_terminal(before.state()) {
            return Err(Status::failed_precondition(format!(
                "sweep {id} is still {}: wait for it, or `bridge sweep cancel {id}` first",
                bridge_proto::jobs::state_name(before.state())
            )));
        }
        let job = before
            .spec
            .and_then(|s| s.job)
            .ok_or_else(|| Status::internal(format!("sweep {id} has no job template")))?;
        // Its forwards went when it ended: the same ones again.
        let relay = self.relay.clone();
        let (sweep, forwards, notes) = self
            .with_forwards(
                job,
                |job, tags| async move { relay.resume_sweep(&id, job, Some(tags)).await },
                |s: &v1::SweepInfo| s.id.clone(),
            )
            .await?;
        Ok(Response::new(v1::ControlSweepReply {
            sweep: Some(sweep),
            forwards,
            notes,
        }))
    }

    async fn wait_sweep(
        &self,
        req: Request<v1::SweepRef>,
    ) -> Result<Response<v1::SweepInfo>, Status> {
        let id = req.into_inner().id;
        let sweep = self.relay.wait_sweep(&id).await?;
        self.forwards.remove_job(&id).await;
        Ok(Response::new(sweep))
    }
}

impl ControlService {
    /// Sets up `job`'s forwards (its `[[forward]]`s, MLflow's, its
    /// debugger's) and `submit`s it with MLflow's run tags, read while the
    /// barrier runs. The forwards then belong to what was submitted (`owner`
    /// names it: a job, or a sweep its trials share), or go when the submit
    /// fails. Returns the answer, the forwards as set up and the notes.
    async fn with_forwards<T, F, Fut>(
        &self,
        mut job: v1::JobSpec,
        submit: F,
        owner: impl Fn(&T) -> String,
    ) -> Result<(T, Vec<v1::ForwardInfo>, Vec<String>), Status>
    where
        F: FnOnce(v1::JobSpec, crate::engine::EnvLater) -> Fut,
        Fut: std::future::Future<Output = Result<T, Status>>,
    {
        let tags = self.run_tags(&job);
        let prepared = match self.forwards.prepare_job(&mut job).await {
            Ok(p) => p,
            Err(e) => {
                tags.abort();
                return Err(e);
            }
        };
        match submit(job, tags).await {
            Ok(t) => {
                let forwards = self.forwards.adopt(&prepared, &owner(&t));
                Ok((t, forwards, prepared.notes.clone()))
            }
            Err(e) => {
                self.forwards.abandon(prepared).await;
                Err(e)
            }
        }
    }

    /// MLflow's run tags (the git state), read while the barrier runs.
    fn run_tags(&self, spec: &v1::JobSpec) -> crate::engine::EnvLater {
        let given = spec.env.get(crate::mlflow::RUN_CONTEXT_VAR).cloned();
        let repo = self.repo.clone();
        let cache = self.git_context.clone();
        let root = self
            .shared
            .status
            .lock()
            .map(|s| s.local_root.clone())
            .unwrap_or_default();
        tokio::spawn(async move {
            crate::mlflow::run_context_cached(&cache, &repo, given, &root)
                .await
                .map(|v| (crate::mlflow::RUN_CONTEXT_VAR.to_string(), v))
                .into_iter()
                .collect()
        })
    }
}

/// A sweep's forwards are shared by every trial: a local forward (one
/// laptop port for many trials) and a debugger have no single trial to go
/// to.
fn sweep_forwards_allowed(job: &v1::JobSpec) -> Result<(), Status> {
    if let Some(f) = job
        .forwards
        .iter()
        .find(|f| f.direction() == v1::forward_spec::Direction::Local)
    {
        return Err(Status::invalid_argument(format!(
            "a sweep's trials cannot share the local forward of port {}: forward one trial's port with `bridge forward` instead",
            f.remote_port
        )));
    }
    if job
        .debug
        .is_some_and(|d| d.kind() != v1::debug_spec::Kind::None)
    {
        return Err(Status::invalid_argument(
            "a sweep's trials cannot run under a debugger: debug one trial with `bridge run` of its parameters",
        ));
    }
    Ok(())
}

/// Keeps a tracking URI given in the job's environment in the spec's own
/// field, which the forward is made from: the environment gets the agent's
/// end, and a resume must forward to the laptop's server again.
fn keep_tracking_uri(job: &mut v1::JobSpec) {
    if job.mlflow_tracking_uri.is_empty()
        && let Some(uri) = job.env.get(crate::mlflow::TRACKING_VAR)
        && crate::mlflow::LocalServer::parse(uri).is_some()
    {
        job.mlflow_tracking_uri = uri.clone();
    }
}

/// A gRPC channel to a Unix socket.
pub async fn unix_channel(
    path: &Path,
    timeout: Duration,
) -> Result<Channel, tonic::transport::Error> {
    let path = path.to_path_buf();
    let connector = tower::service_fn(move |_: Uri| {
        let path = path.clone();
        async move { UnixStream::connect(path).await.map(TokioIo::new) }
    });
    Endpoint::from_static("http://daemon.local")
        .connect_timeout(timeout)
        .connect_with_connector(connector)
        .await
}

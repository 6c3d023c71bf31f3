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

pub struct ControlService {
    pub shared: Arc<Shared>,
    pub cmds: mpsc::Sender<Command>,
    /// Fired by `Shutdown`; the bool says whether to stop the agent too.
    pub stop: watch::Sender<Option<bool>>,
}

type ProgressStream = Pin<Box<dyn Stream<Item = Result<v1::SyncProgress, Status>> + Send>>;

#[tonic::async_trait]
impl Control for ControlService {
    async fn status(
        &self,
        _: Request<v1::StatusRequest>,
    ) -> Result<Response<v1::StatusReply>, Status> {
        let st = self
            .shared
            .status
            .lock()
            .map_err(|_| Status::internal("status poisoned"))?
            .clone();
        let json = serde_json::to_string(&st).map_err(|e| Status::internal(e.to_string()))?;
        Ok(Response::new(v1::StatusReply { json }))
    }

    type SyncStream = ProgressStream;

    async fn sync(
        &self,
        req: Request<v1::SyncRequest>,
    ) -> Result<Response<Self::SyncStream>, Status> {
        let wait = req.into_inner().wait;
        let (reply, done) = oneshot::channel();
        self.cmds
            .send(Command::Sync {
                verify: wait,
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
        _: Request<v1::ShutdownRequest>,
    ) -> Result<Response<v1::ShutdownReply>, Status> {
        let _ = self.stop.send(Some(true));
        Ok(Response::new(v1::ShutdownReply {}))
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

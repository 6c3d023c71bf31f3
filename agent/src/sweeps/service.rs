//! The `bridge.v1.Sweeps` gRPC service: a thin layer over [`Sweeps`], with
//! snapshots on tokio's blocking pool.

use std::sync::{Arc, Mutex};

use bridge_proto::v1::sweeps_server::Sweeps as SweepsRpc;
use bridge_proto::v1::{self, SweepInfo};
use tonic::{Request, Response, Status};

use super::Sweeps;
use crate::jobs::service::blocking;
use crate::service::State;

#[derive(Clone)]
pub struct SweepsService {
    pub sweeps: Arc<Sweeps>,
    pub state: Arc<Mutex<State>>,
}

#[tonic::async_trait]
impl SweepsRpc for SweepsService {
    async fn submit(
        &self,
        req: Request<v1::SweepSubmitRequest>,
    ) -> Result<Response<SweepInfo>, Status> {
        let (sweeps, state) = (self.sweeps.clone(), self.state.clone());
        let req = req.into_inner();
        blocking(move || sweeps.submit(&state, req))
            .await
            .map(Response::new)
    }

    async fn list(
        &self,
        req: Request<v1::SweepListRequest>,
    ) -> Result<Response<v1::SweepList>, Status> {
        let req = req.into_inner();
        let sweeps = self.sweeps.list(&req.mirror, req.all)?;
        Ok(Response::new(v1::SweepList { sweeps }))
    }

    async fn get(&self, req: Request<v1::SweepRef>) -> Result<Response<SweepInfo>, Status> {
        self.sweeps.get(&req.into_inner().id).map(Response::new)
    }

    async fn cancel(&self, req: Request<v1::SweepRef>) -> Result<Response<SweepInfo>, Status> {
        let sweeps = self.sweeps.clone();
        let id = req.into_inner().id;
        blocking(move || sweeps.cancel(&id))
            .await
            .map(Response::new)
    }

    async fn resume(
        &self,
        req: Request<v1::SweepResumeRequest>,
    ) -> Result<Response<SweepInfo>, Status> {
        let (sweeps, state) = (self.sweeps.clone(), self.state.clone());
        let req = req.into_inner();
        blocking(move || sweeps.resume(&state, req))
            .await
            .map(Response::new)
    }
}

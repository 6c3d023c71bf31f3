//! The daemon's side of sweeps: the CLI's sweep calls relayed to the agent
//! (which schedules the trials), submits and resumes through the engine's
//! barrier (one generation for every trial), and the wait that returns once
//! every trial has ended and its outputs are home.
//!
//! A trial is an ordinary job to the rest of the daemon: its outputs are
//! pulled by the job puller (under `D/<sweep>/<trial>/` for each declared
//! directory `D/`, see [`crate::jobs::trial_subdir`]), its log is relayed
//! like any job's.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use bridge_proto::jobs::is_terminal;
use bridge_proto::v1::{self, SweepInfo};
use tonic::{Code, Status};

use crate::engine::{EnvLater, Submission, Submitted};
use crate::jobs::{Relay, excluded_paths};

/// How often a wait looks at a small sweep; a big one (a bigger answer) a
/// millisecond less often per 100 trials.
const WAIT_POLL: Duration = Duration::from_millis(20);

/// The status of a call the agent does not know, with what to do.
fn unsupported(s: Status) -> Status {
    if s.code() == Code::Unimplemented {
        Status::failed_precondition(
            "the agent does not run sweeps; it is older than this bridge: `bridge down --remote` then `bridge up` replaces it",
        )
    } else {
        s
    }
}

impl Relay {
    /// Flushes the sync and submits the sweep against the verified
    /// generation.
    pub async fn submit_sweep(
        &self,
        spec: v1::SweepSpec,
        env_later: Option<EnvLater>,
    ) -> Result<SweepInfo, Status> {
        let job = spec
            .job
            .as_ref()
            .ok_or_else(|| Status::invalid_argument("a sweep without its job"))?;
        let outputs = excluded_paths(job)?;
        match self
            .barrier(Submission::Sweep(Box::new(spec)), outputs, env_later)
            .await
            .map_err(unsupported)?
        {
            Submitted::Sweep(s) => Ok(s),
            Submitted::Job(_) => Err(Status::internal("the barrier answered a job for a sweep")),
        }
    }

    /// Runs an ended sweep's failed, lost and cancelled trials again against the
    /// tree as it is now, with `job` (its template, forwards set up again).
    pub async fn resume_sweep(
        &self,
        id: &str,
        job: v1::JobSpec,
        env_later: Option<EnvLater>,
    ) -> Result<SweepInfo, Status> {
        let outputs = excluded_paths(&job)?;
        let what = Submission::Resume {
            id: id.to_string(),
            job: Box::new(job),
        };
        match self
            .barrier(what, outputs, env_later)
            .await
            .map_err(unsupported)?
        {
            Submitted::Sweep(s) => Ok(s),
            Submitted::Job(_) => Err(Status::internal("the barrier answered a job for a sweep")),
        }
    }

    pub async fn get_sweep(&self, id: &str) -> Result<SweepInfo, Status> {
        let id = id.to_string();
        self.call(|l| {
            let id = id.clone();
            async move { Ok(l.sweeps().get(v1::SweepRef { id }).await?.into_inner()) }
        })
        .await
        .map_err(unsupported)
    }

    /// This repository's sweeps (`all`: ended ones too), oldest first.
    pub async fn list_sweeps(&self, all: bool) -> Result<Vec<SweepInfo>, Status> {
        let mirror = self.mirror().to_string();
        self.call(|l| {
            let mirror = mirror.clone();
            async move {
                Ok(l.sweeps()
                    .list(v1::SweepListRequest { mirror, all })
                    .await?
                    .into_inner()
                    .sweeps)
            }
        })
        .await
        .map_err(unsupported)
    }

    pub async fn cancel_sweep(&self, id: &str) -> Result<SweepInfo, Status> {
        let link = self.link().await?;
        Ok(link
            .sweeps()
            .cancel(v1::SweepRef { id: id.to_string() })
            .await
            .map_err(unsupported)?
            .into_inner())
    }

    /// Returns once every trial of the sweep has ended and the outputs of
    /// every attempt are back.
    pub async fn wait_sweep(self: &Arc<Self>, id: &str) -> Result<SweepInfo, Status> {
        let mut home: HashSet<String> = HashSet::new();
        loop {
            let s = self.get_sweep(id).await?;
            if is_terminal(s.state()) {
                let outputs = s
                    .spec
                    .as_ref()
                    .and_then(|x| x.job.as_ref())
                    .is_some_and(|j| !j.outputs.is_empty());
                let mut all = true;
                if outputs {
                    for job in s.trials.iter().flat_map(|t| t.jobs.iter()) {
                        if home.contains(job) {
                            continue;
                        }
                        let info = self.get(job).await?;
                        if self.home(&info) {
                            home.insert(job.clone());
                        } else {
                            self.ensure_puller(&info);
                            all = false;
                        }
                    }
                }
                if all {
                    return Ok(s);
                }
            }
            let pause = WAIT_POLL + Duration::from_millis(s.trials.len() as u64 / 100);
            tokio::time::sleep(pause.min(Duration::from_secs(1))).await;
        }
    }
}

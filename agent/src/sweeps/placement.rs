//! Where a sweep's trials run: the seam a provider can take over.
//!
//! The sweep scheduler ([`super::Sweeps`]) decides *which* trial starts and
//! *when* (its order, `max_parallel`, retries, fail-fast, cancellation); a
//! [`Placement`] decides *where* and reports back through the job it
//! started. Today trials are jobs on this agent ([`LocalJobs`]), given GPUs
//! by the agent's FIFO queue like any job; with `placement = "cluster"` each
//! trial's job runs as a Kubernetes Job whose pod fetches the snapshot from
//! this agent ([`crate::cluster`]), and still shows as a job of this agent,
//! with its log and outputs.

use std::path::Path;
use std::sync::Arc;

use bridge_proto::v1::{JobInfo, JobSpec};
use tonic::Status;

use crate::jobs::Jobs;

/// Starts, follows and stops trials.
pub trait Placement: Send + Sync {
    /// Refuses at submit a trial (`job`, the template) that can never run
    /// (more GPUs than exist, a placement this agent cannot do), saying why.
    fn check(&self, job: &JobSpec) -> Result<(), Status>;

    /// How many trials of `job`'s size fit at once when nothing else runs
    /// (the default `max_parallel`).
    fn capacity(&self, job: &JobSpec, cpus_per_trial: u32) -> u32;

    /// Starts one attempt of a trial: `spec` (its command expanded, its
    /// `trial` set) on a tree made from the sweep's snapshot `base` of
    /// `mirror` at `generation`. Returns the job it runs as.
    fn launch(
        &self,
        mirror: &str,
        generation: &str,
        base: &Path,
        spec: JobSpec,
    ) -> Result<JobInfo, Status>;

    /// The job of an attempt as it is now; `None` when it is unknown.
    fn job(&self, id: &str) -> Option<JobInfo>;

    /// Stops an attempt (its whole process tree); it ends as cancelled.
    fn cancel(&self, id: &str);

    /// Every attempt placed for sweep `sweep` (its jobs with `JobSpec.trial`
    /// naming it), oldest first: what a restarted agent follows, also the
    /// attempts started after the sweep's record was last saved.
    fn attempts(&self, sweep: &str) -> Vec<JobInfo>;
}

/// The default `max_parallel` of a sweep on the cluster.
pub const CLUSTER_PARALLEL: u32 = 256;

/// Trials as jobs of this agent: its GPUs, handed out by its queue; or,
/// with `placement = "cluster"`, jobs of this agent that each run as a
/// Kubernetes Job ([`crate::cluster`]).
pub struct LocalJobs {
    pub jobs: Arc<Jobs>,
}

impl Placement for LocalJobs {
    fn check(&self, job: &JobSpec) -> Result<(), Status> {
        if job.placement == crate::cluster::CLUSTER {
            return match crate::cluster::unavailable() {
                Some(why) => Err(Status::failed_precondition(why)),
                None => Ok(()),
            };
        }
        self.jobs.check_gpus(job.gpus).map_err(|s| {
            Status::failed_precondition(
                s.message()
                    .replace("the job asks for", "each trial asks for")
                    .replace("lower resources.gpus", "lower sweep.gpus_per_trial"),
            )
        })
    }

    fn capacity(&self, job: &JobSpec, cpus_per_trial: u32) -> u32 {
        if job.placement == crate::cluster::CLUSTER {
            // Kubernetes queues what does not fit yet (its pods wait,
            // Pending, for GPUs); `max_parallel` bounds it when asked to.
            return CLUSTER_PARALLEL;
        }
        if let Some(n) = (self.jobs.gpu_count() as u32).checked_div(job.gpus) {
            return n.max(1);
        }
        let cpus = std::thread::available_parallelism().map_or(1, |n| n.get()) as u32;
        (cpus / cpus_per_trial.max(1)).max(1)
    }

    fn launch(
        &self,
        mirror: &str,
        generation: &str,
        base: &Path,
        spec: JobSpec,
    ) -> Result<JobInfo, Status> {
        self.jobs.submit_from(mirror, generation, base, spec)
    }

    fn job(&self, id: &str) -> Option<JobInfo> {
        self.jobs.get(id).ok()
    }

    fn cancel(&self, id: &str) {
        if let Err(e) = self.jobs.cancel(id) {
            tracing::debug!(job = id, error = %e.message(), "cancel of a trial's job");
        }
    }

    fn attempts(&self, sweep: &str) -> Vec<JobInfo> {
        self.jobs
            .list("", true, false)
            .unwrap_or_default()
            .into_iter()
            .filter(|j| {
                j.spec
                    .as_ref()
                    .and_then(|s| s.trial.as_ref())
                    .is_some_and(|t| t.sweep == sweep)
            })
            .collect()
    }
}

//! `placement = "cluster"`: a job (or each sweep trial) as a Kubernetes Job
//! of its own, for an agent that runs in a Kubernetes pod (the head).
//!
//! The job is still one of this agent's: queued, snapshotted, logged,
//! cancelled and followed like any other, with its outputs in its snapshot.
//! Only its main step differs: instead of the command, the shim runs
//! `bridge-agent cluster-run JOB_DIR` ([`run`]), which
//! 1. creates the Kubernetes Job (`backoffLimit` = its retries; the pod asks
//!    for `nvidia.com/gpu`, which Kubernetes counts, not this agent's queue;
//!    owned by the head pod, so deleting the head deletes it too);
//! 2. copies this agent's binary and a fresh key into each of its pods over
//!    `exec`, as the daemon does for the head pod (no image carries bridge);
//! 3. serves the pod's `bridge-agent worker` ([`worker`]) on the pod
//!    network: the job's tree from the snapshot here (the laptop uploaded
//!    the code once, to the head), then the worker's log records into this
//!    job's log and its outputs into the snapshot, where the daemon finds
//!    them as for any job;
//! 4. says what Kubernetes says while the pod waits (`Insufficient
//!    nvidia.com/gpu`, a pull failure), and exits with the command's code;
//!    cancelled (SIGTERM from the shim), it deletes the Job.
//!
//! The head reaches the API server with its pod's service account, which
//! `bridge up --provider k8s` gives the rights to create Jobs and exec into
//! their pods in its namespace (see the daemon's k8s provider).

#[cfg(feature = "k8s")]
mod head;
pub mod wire;
pub mod worker;

use serde::{Deserialize, Serialize};

/// The value of `JobSpec.placement` that asks for a Kubernetes Job.
pub const CLUSTER: &str = "cluster";

/// What `cluster-run` needs beyond the shim's spec.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct ClusterSpec {
    /// `nvidia.com/gpu` for the Job's pod.
    pub gpus: u32,
    /// The pod's image: the job's `image`, else the head pod's.
    pub image: String,
    /// Declared outputs, relative to the workdir.
    pub outputs: Vec<String>,
    /// The Kubernetes Job's `backoffLimit`.
    pub retries: u32,
    /// The job's name, for the Job's annotation.
    pub name: String,
}

/// Why this agent cannot place jobs on the cluster; `None` when it can.
pub fn unavailable() -> Option<String> {
    if !cfg!(feature = "k8s") {
        return Some(
            "placement = \"cluster\": this agent was built without Kubernetes support".into(),
        );
    }
    let in_pod = std::env::var_os("KUBERNETES_SERVICE_HOST").is_some()
        && std::env::var_os("BRIDGE_POD_NAME").is_some();
    if !in_pod {
        return Some(
            "placement = \"cluster\" runs the job as a Kubernetes Job, and this agent is not in a Kubernetes pod: use `bridge up --provider k8s`, or drop placement".into(),
        );
    }
    if !std::path::Path::new(TOKEN_FILE).exists() {
        return Some(format!(
            "placement = \"cluster\": the agent's pod has no service account token ({TOKEN_FILE}); `bridge up --provider k8s` could not give it one (see `bridge status`)"
        ));
    }
    None
}

/// The service account token Kubernetes mounts into the head pod.
pub const TOKEN_FILE: &str = "/var/run/secrets/kubernetes.io/serviceaccount/token";

/// `bridge-agent cluster-run JOB_DIR`: runs the job's Kubernetes Job to its
/// end; returns the command's exit code.
pub fn run(job_dir: &std::path::Path) -> i32 {
    #[cfg(feature = "k8s")]
    {
        head::run(job_dir)
    }
    #[cfg(not(feature = "k8s"))]
    {
        let _ = job_dir;
        eprintln!("bridge: this agent was built without Kubernetes support");
        2
    }
}

//! `bridge cancel JOB`: SIGTERM to the job's whole process group, SIGKILL
//! after a grace period; returns once the job has ended. A sweep id (s3)
//! cancels the sweep (`bridge sweep cancel`).

use std::path::Path;
use std::time::Duration;

use anyhow::anyhow;
use bridge_proto::v1::JobRef;

use crate::{client, jobs};

#[derive(clap::Args)]
pub struct Args {
    /// The job id, or a sweep id (s3).
    job: String,
}

pub async fn run(cwd: &Path, args: Args) -> anyhow::Result<u8> {
    if bridge_proto::sweep::sweep_number(&args.job).is_some() {
        let sweep = crate::cmd::sweep::Args::cancel(args.job);
        return crate::cmd::sweep::run(cwd, sweep).await;
    }
    let layout = client::repo(cwd)?;
    let mut c = client::require_daemon(&layout).await?;
    let info = c
        .cancel(JobRef {
            id: args.job.clone(),
        })
        .await
        .map_err(|s| anyhow!("{}", s.message()))?
        .into_inner();
    if info.state() != bridge_proto::v1::JobState::Cancelled {
        crate::note!("bridge: job {} is stopping (SIGTERM sent)", info.id);
    }
    let done = tokio::time::timeout(
        Duration::from_secs(30),
        c.wait(JobRef {
            id: args.job.clone(),
        }),
    )
    .await;
    match done {
        Ok(Ok(j)) => crate::note!("{}", jobs::summary(&j.into_inner())),
        Ok(Err(s)) => return Err(anyhow!("{}", s.message())),
        Err(_) => crate::note!(
            "bridge: job {} has not ended yet; `bridge ps` shows its state",
            args.job
        ),
    }
    Ok(0)
}

//! `bridge logs JOB|SWEEP/TRIAL [-f] [--tail N]`: replay a job's log (or a
//! sweep trial's, its latest attempt), and follow it.

use std::path::Path;

use crate::{client, jobs, sweeps};

#[derive(clap::Args)]
pub struct Args {
    /// The job id (`bridge ps --all` lists them), or SWEEP/TRIAL (s3/2).
    job: String,
    /// Keep following until the job ends.
    #[arg(short, long)]
    follow: bool,
    /// Start at the last N lines.
    #[arg(long, value_name = "N")]
    tail: Option<u32>,
}

pub async fn run(cwd: &Path, args: Args) -> anyhow::Result<u8> {
    let layout = client::repo(cwd)?;
    let mut c = client::require_daemon(&layout).await?;
    let job = match bridge_proto::sweep::trial_ref(&args.job) {
        Some((sweep, trial)) => sweeps::trial_job(&mut c, &sweep, trial).await?,
        None if args.job.contains('/') => anyhow::bail!(
            "{:?} is not SWEEP/TRIAL: a sweep id and a trial number, like s3/2 (`bridge sweep status` lists them)",
            args.job
        ),
        None => args.job.clone(),
    };
    jobs::follow_log(
        cwd,
        &layout,
        &mut c,
        &job,
        0,
        args.follow,
        args.tail.unwrap_or(0),
    )
    .await?;
    Ok(0)
}

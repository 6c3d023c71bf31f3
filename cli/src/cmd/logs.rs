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
    #[arg(long, value_name = "N", conflicts_with = "offset")]
    tail: Option<u32>,
    /// Start at a log offset: a `next_offset` from an earlier `--json` line
    /// (nothing before it is repeated, nothing after it is missed).
    #[arg(long, value_name = "N")]
    offset: Option<u64>,
    /// One JSON object per line on stdout (stdout, stderr and bridge's own
    /// lines alike): {"schema_version", "job", "stream", "time_ns", "text",
    /// "next_offset"}; see docs/json.md.
    #[arg(long)]
    json: bool,
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
        args.offset.unwrap_or(0),
        args.follow,
        args.tail.unwrap_or(0),
        args.json,
    )
    .await?;
    Ok(0)
}

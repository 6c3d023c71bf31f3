//! `bridge logs JOB [-f] [--tail N]`: replay a job's log, and follow it.

use std::path::Path;

use crate::{client, jobs};

#[derive(clap::Args)]
pub struct Args {
    /// The job id (`bridge ps --all` lists them).
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
    jobs::follow_log(
        cwd,
        &layout,
        &mut c,
        &args.job,
        0,
        args.follow,
        args.tail.unwrap_or(0),
    )
    .await?;
    Ok(0)
}

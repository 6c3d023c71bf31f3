//! `bridge pull JOB`: fetch a job's outputs again.

use std::path::Path;

use anyhow::anyhow;
use bridge_proto::v1::JobRef;

use crate::client::{self, human_bytes};

#[derive(clap::Args)]
pub struct Args {
    /// The job id.
    job: String,
}

pub async fn run(cwd: &Path, args: Args) -> anyhow::Result<u8> {
    let layout = client::repo(cwd)?;
    let mut c = client::require_daemon(&layout).await?;
    let r = c
        .pull(JobRef { id: args.job })
        .await
        .map_err(|s| anyhow!("{}", s.message()))?
        .into_inner();
    println!(
        "pulled {} file(s), {} received, into {}",
        r.files,
        human_bytes(r.bytes_received),
        r.destinations.join(", ")
    );
    for k in &r.kept_local {
        eprintln!("bridge: kept your local edit: {k} (changed here since the job was submitted)");
    }
    Ok(0)
}

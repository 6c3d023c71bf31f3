//! `bridge sync [--wait]`

use std::path::Path;

use crate::client;

#[derive(clap::Args)]
pub struct Args {
    /// Wait until the agent's verified tree root equals the local one.
    #[arg(long)]
    wait: bool,
}

pub async fn run(cwd: &Path, args: Args) -> anyhow::Result<()> {
    let layout = client::repo(cwd)?;
    let mut c = client::require_daemon(&layout).await?;
    let mut stream = c
        .sync(bridge_proto::v1::SyncRequest {
            wait: args.wait,
            issued_unix_ms: crate::started_unix_ms(),
        })
        .await?
        .into_inner();
    if !args.wait {
        stream.message().await?;
        println!("sync requested");
        return Ok(());
    }
    let done = crate::cmd::up::follow(&mut stream, false).await?;
    println!(
        "in sync: generation {}, root {}",
        done.generation, done.root
    );
    Ok(())
}

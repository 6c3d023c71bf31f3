//! `bridge status [--json]`

use std::path::Path;

use bridge_daemon::status::{Connection, Status};
use bridge_daemon::watcher::Mode;

use crate::client::{self, human_bytes};

#[derive(clap::Args)]
pub struct Args {
    /// Print the status as JSON (stable field names; see docs/architecture.md).
    #[arg(long)]
    json: bool,
}

pub async fn run(cwd: &Path, args: Args) -> anyhow::Result<()> {
    let layout = client::repo(cwd)?;
    let mut c = client::require_daemon(&layout).await?;
    let json = c
        .status(bridge_proto::v1::StatusRequest {})
        .await?
        .into_inner()
        .json;
    if args.json {
        println!("{json}");
        return Ok(());
    }
    let st: Status = serde_json::from_str(&json)?;
    let conn = match st.connection {
        Connection::Connecting => "connecting",
        Connection::Connected => "connected",
        Connection::Reconnecting => "reconnecting",
        Connection::Disconnected => "disconnected",
    };
    println!("repository   {}", st.repo);
    println!(
        "provider     {} (agent {} at {}{})",
        st.provider,
        if st.agent_version.is_empty() {
            "?"
        } else {
            &st.agent_version
        },
        st.agent_address,
        if st.agent_host.is_empty() {
            String::new()
        } else {
            format!(", host {}", st.agent_host)
        }
    );
    println!("mirror       {}", st.mirror_path);
    println!("connection   {conn}");
    if let Some(e) = &st.last_error {
        println!("last error   {e}");
    }
    println!(
        "sync         {} — generation {}, root {}",
        if st.in_sync { "in sync" } else { "NOT in sync" },
        st.generation,
        short(&st.local_root)
    );
    if !st.in_sync {
        println!("agent root   {}", short(&st.remote_root));
    }
    println!("pending      {} change(s)", st.pending_changes);
    if let Some(ms) = st.last_latency_ms {
        println!("latency      {ms:.1} ms (last edit to mirror)");
    }
    println!("tree         {} files, {}", st.files, human_bytes(st.bytes));
    match &st.watcher {
        Mode::Inotify => println!("watcher      inotify, {} directories watched", st.watches),
        Mode::Polling(why) => println!("watcher      polling: {why}"),
    }
    println!(
        "sent         {} in {} chunks; {} files hashed",
        human_bytes(st.bytes_sent),
        st.chunks_sent,
        st.files_hashed
    );
    if st.gpus.is_empty() {
        let why = if st.gpu_note.is_empty() {
            "none"
        } else {
            &st.gpu_note
        };
        println!("gpus         {why}");
    } else {
        println!("gpus         {}", st.gpus.len());
        for g in &st.gpus {
            println!(
                "  [{}] {}  {}/{} MiB  {}%  {}",
                g.index,
                g.name,
                g.memory_used_mib,
                g.memory_total_mib,
                g.utilization_pct,
                g.job
                    .as_deref()
                    .map_or("free".to_string(), |j| format!("job {j}"))
            );
        }
    }
    if !st.skipped.is_empty() {
        println!("skipped      {} path(s) not synced:", st.skipped.len());
        for s in &st.skipped {
            println!("  {}: {}", s.path, s.reason);
        }
    }
    Ok(())
}

fn short(root: &str) -> &str {
    root.get(..16).unwrap_or(root)
}

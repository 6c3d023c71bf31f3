//! `bridge status [--json]`

use std::path::Path;

use bridge_daemon::status::{Autostop, Connection, Status};
use bridge_daemon::watcher::Mode;

use crate::client::{self, human_bytes};

#[derive(clap::Args)]
pub struct Args {
    /// Print the status as JSON (stable field names, `schema_version`; docs/json.md).
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
    let spec = bridge_daemon::provider::ProviderSpec::load(&layout.provider)
        .ok()
        .flatten();
    let machine = spec
        .as_ref()
        .and_then(|s| s.machine(&layout, client::agent_bin()));
    let cloud = match &machine {
        Some(m) => Some(match m.status().await {
            Ok(v) => v,
            Err(e) => serde_json::json!({ "error": format!("{e:#}") }),
        }),
        None => None,
    };
    if args.json {
        let mut all: serde_json::Value = serde_json::from_str(&json)?;
        all["schema_version"] = 1.into();
        if let (Some(v), Some(s)) = (cloud, &spec) {
            // Under the provider's name: `aws`.
            all[s.name()] = v;
        }
        println!("{all}");
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
    if let (Some(v), Some(m)) = (&cloud, &machine) {
        println!("{:<12} {}", m.noun(), m.status_line(v));
    }
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
    if let Some(a) = &st.autostop {
        println!("autostop     {}", autostop(a));
    }
    if !st.forwards.is_empty() {
        println!("forwards     {}", st.forwards.len());
        for f in &st.forwards {
            println!("  {}", crate::cmd::forward::line(f));
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

/// One line on the agent's idle autostop.
fn autostop(a: &Autostop) -> String {
    let mut holders = Vec::new();
    if a.daemons > 0 {
        holders.push("this daemon".to_string());
    }
    if a.daemons > 1 {
        holders.push(plural(a.daemons - 1, "other daemon"));
    }
    if a.jobs_active > 0 {
        holders.push(plural(a.jobs_active, "job"));
    }
    let after = format!(
        "after {} idle runs `{}`",
        human_secs(a.timeout_s),
        a.command
    );
    match holders.split_last() {
        None => format!("in {} ({after})", human_secs(a.shutdown_in_s)),
        Some((last, [])) => format!("{after}; held by {last}{CLOCK}"),
        Some((last, rest)) => format!("{after}; held by {} and {last}{CLOCK}", rest.join(", ")),
    }
}

const CLOCK: &str =
    " (the timer starts when no job is queued or running and no daemon is connected)";

fn plural(n: u32, what: &str) -> String {
    format!("{n} {what}{}", if n == 1 { "" } else { "s" })
}

/// `30m`, `1h 5m`, `12m 30s`, `0s`.
fn human_secs(s: u64) -> String {
    let (h, m, s) = (s / 3600, s / 60 % 60, s % 60);
    let parts: Vec<String> = [(h, "h"), (m, "m"), (s, "s")]
        .into_iter()
        .filter(|(n, _)| *n > 0)
        .map(|(n, u)| format!("{n}{u}"))
        .collect();
    if parts.is_empty() {
        "0s".into()
    } else {
        parts.join(" ")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn a(daemons: u32, jobs_active: u32, shutdown_in_s: u64) -> Autostop {
        Autostop {
            timeout_s: 1800,
            shutdown_in_s,
            jobs_active,
            daemons,
            command: "sudo -n shutdown -h now".into(),
        }
    }

    #[test]
    fn autostop_line() {
        assert_eq!(
            autostop(&a(1, 1, 1800)),
            "after 30m idle runs `sudo -n shutdown -h now`; held by this daemon and 1 job \
             (the timer starts when no job is queued or running and no daemon is connected)"
        );
        assert!(
            autostop(&a(3, 2, 1800)).contains("held by this daemon, 2 other daemons and 2 jobs (")
        );
        assert!(autostop(&a(1, 0, 1800)).contains("held by this daemon ("));
        assert_eq!(
            autostop(&a(0, 0, 750)),
            "in 12m 30s (after 30m idle runs `sudo -n shutdown -h now`)"
        );
        assert_eq!(human_secs(0), "0s");
        assert_eq!(human_secs(3900), "1h 5m");
        assert_eq!(human_secs(45), "45s");
    }
}

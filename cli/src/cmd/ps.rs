//! `bridge ps [--all] [--json]`: the agent's jobs for this repository.

use std::path::Path;

use anyhow::anyhow;
use bridge_proto::v1::{JobInfo, ListRequest};

use crate::{client, jobs};

#[derive(clap::Args)]
pub struct Args {
    /// Include finished jobs.
    #[arg(short, long)]
    all: bool,
    /// JSON: {"schema_version": 1, "jobs": [...]}, one object per job (docs/json.md).
    #[arg(long)]
    json: bool,
}

/// Version of the `bridge ps --json` schema.
pub const SCHEMA_VERSION: u32 = 1;

fn duration(j: &JobInfo) -> Option<f64> {
    if j.started_ms == 0 {
        return None;
    }
    let end = if j.finished_ms > 0 {
        j.finished_ms
    } else {
        jobs::now_ms()
    };
    Some(end.saturating_sub(j.started_ms) as f64 / 1000.0)
}

pub async fn run(cwd: &Path, args: Args) -> anyhow::Result<u8> {
    let layout = client::repo(cwd)?;
    let mut c = client::require_daemon(&layout).await?;
    let list = c
        .list(ListRequest {
            mirror: String::new(),
            all: args.all,
            unsettled: false,
        })
        .await
        .map_err(|s| anyhow!("{}", s.message()))?
        .into_inner()
        .jobs;
    // Live GPU use of the jobs holding GPUs (one nvidia-smi on the agent).
    let live = if list.iter().any(|j| !j.gpus.is_empty()) {
        crate::cmd::gpus::fetch(&mut c).await.ok()
    } else {
        None
    };
    let usage = |j: &JobInfo| {
        live.as_ref()
            .filter(|_| j.state() == bridge_proto::v1::JobState::Running)
            .and_then(|l| crate::cmd::gpus::usage(l, &j.gpus))
    };
    if args.json {
        let v: Vec<serde_json::Value> = list
            .iter()
            .map(|j| {
                let u = usage(j);
                serde_json::json!({
                    "id": j.id,
                    "name": j.name,
                    "state": jobs::state_name(j.state()),
                    "gpus": j.gpus,
                    "gpu_utilization_pct": u.map(|u| u.0),
                    "gpu_memory_used_mib": u.map(|u| u.1),
                    "submitted_ms": j.submitted_ms,
                    "started_ms": (j.started_ms > 0).then_some(j.started_ms),
                    "finished_ms": (j.finished_ms > 0).then_some(j.finished_ms),
                    "duration_s": duration(j),
                    "exit_code": j.exit_code,
                    "reason": j.reason,
                    "generation": j.generation,
                    "outputs_pulled": j.outputs_pulled,
                    "live": j.spec.as_ref().is_some_and(|s| s.live),
                    "restarts": j.restarts,
                    "trial": j.spec.as_ref().and_then(|s| s.trial.as_ref()).map(|t| serde_json::json!({
                        "sweep": t.sweep, "index": t.index, "attempt": t.attempt,
                    })),
                    "metrics": j.metrics,
                })
            })
            .collect();
        let v = serde_json::json!({ "schema_version": SCHEMA_VERSION, "jobs": v });
        println!("{}", serde_json::to_string_pretty(&v)?);
        return Ok(0);
    }
    if list.is_empty() {
        eprintln!(
            "no {}jobs{}",
            if args.all { "" } else { "active " },
            if args.all {
                ""
            } else {
                " (`bridge ps --all` includes finished ones)"
            }
        );
        return Ok(0);
    }
    println!(
        "{:<6} {:<20} {:<10} {:<8} {:>5} {:>10} {:<10} {:>9} {:>5}",
        "ID", "NAME", "STATE", "GPUS", "GPU%", "GPU MEM", "STARTED", "DURATION", "EXIT"
    );
    // A live job's state says so (it runs in the mirror, restarts on failure).
    let state = |j: &JobInfo| {
        let s = jobs::state_name(j.state()).to_string();
        match j.spec.as_ref().is_some_and(|s| s.live) {
            true if j.restarts > 0 => format!("{s} (live, {}x restarted)", j.restarts),
            true => format!("{s} (live)"),
            false => s,
        }
    };
    for j in &list {
        let gpus = if j.gpus.is_empty() {
            "-".to_string()
        } else {
            j.gpus
                .iter()
                .map(|g| g.to_string())
                .collect::<Vec<_>>()
                .join(",")
        };
        let (util, mem) = match usage(j) {
            Some((u, m)) => (format!("{u}%"), format!("{m} MiB")),
            None => ("-".into(), "-".into()),
        };
        println!(
            "{:<6} {:<20} {:<10} {:<8} {:>5} {:>10} {:<10} {:>9} {:>5}",
            j.id,
            j.name.chars().take(20).collect::<String>(),
            state(j),
            gpus,
            util,
            mem,
            jobs::clock(j.started_ms),
            duration(j).map_or("-".into(), |d| format!("{d:.1}s")),
            j.exit_code.map_or("-".into(), |c| c.to_string()),
        );
    }
    Ok(0)
}

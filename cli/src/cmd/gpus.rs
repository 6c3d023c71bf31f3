//! `bridge gpus [--json] [--watch]`: the agent's GPUs (model, memory used and
//! total, utilisation) and which job holds each, from `nvidia-smi` on the agent.

use std::io::{IsTerminal, Write};
use std::path::Path;
use std::time::Duration;

use anyhow::anyhow;
use bridge_proto::v1::control_client::ControlClient;
use bridge_proto::v1::{Gpu, GpuList, GpusRequest};
use tonic::transport::Channel;

use crate::client;

/// Version of the `bridge gpus --json` schema.
pub const SCHEMA_VERSION: u32 = 1;

#[derive(clap::Args)]
pub struct Args {
    /// JSON: {"schema_version": 1, "gpus": [...], "note": ...} (docs/json.md).
    #[arg(long, conflicts_with = "watch")]
    json: bool,
    /// Refresh until Ctrl-C (in place on a terminal).
    #[arg(long, short)]
    watch: bool,
    /// With --watch: seconds between refreshes.
    #[arg(
        long,
        value_name = "SECONDS",
        default_value_t = 1.0,
        requires = "watch"
    )]
    interval: f64,
}

pub async fn fetch(c: &mut ControlClient<Channel>) -> anyhow::Result<GpuList> {
    Ok(c.gpus(GpusRequest {})
        .await
        .map_err(|s| anyhow!("{}", s.message()))?
        .into_inner())
}

pub async fn run(cwd: &Path, args: Args) -> anyhow::Result<u8> {
    let layout = client::repo(cwd)?;
    let mut c = client::require_daemon(&layout).await?;
    if args.json {
        let list = fetch(&mut c).await?;
        println!("{}", serde_json::to_string_pretty(&json(&list))?);
        return Ok(0);
    }
    if !(args.interval.is_finite() && args.interval >= 0.1) {
        anyhow::bail!("--interval takes seconds, at least 0.1");
    }
    let tty = std::io::stdout().is_terminal();
    loop {
        let list = fetch(&mut c).await?;
        let text = table(&list, &client::place(&layout));
        let mut out = std::io::stdout().lock();
        if args.watch && tty {
            // Home and clear: the table is redrawn in place.
            write!(out, "\x1b[H\x1b[2J")?;
        }
        write!(out, "{text}")?;
        out.flush()?;
        if !args.watch {
            return Ok(0);
        }
        if !tty {
            writeln!(out)?;
        }
        drop(out);
        tokio::time::sleep(Duration::from_secs_f64(args.interval)).await;
    }
}

/// One GPU as `--json` shows it.
fn gpu_json(g: &Gpu) -> serde_json::Value {
    serde_json::json!({
        "index": g.index,
        "name": g.name,
        "memory_used_mib": g.memory_used_mib,
        "memory_total_mib": g.memory_total_mib,
        "utilization_pct": g.utilization_pct,
        "job": (!g.job.is_empty()).then_some(&g.job),
    })
}

pub fn json(list: &GpuList) -> serde_json::Value {
    serde_json::json!({
        "schema_version": SCHEMA_VERSION,
        "gpus": list.gpus.iter().map(gpu_json).collect::<Vec<_>>(),
        "note": (!list.note.is_empty()).then_some(&list.note),
    })
}

/// The table `bridge gpus` prints.
fn table(list: &GpuList, place: &str) -> String {
    if list.gpus.is_empty() {
        let why = if list.note.is_empty() {
            "nvidia-smi reports none"
        } else {
            &list.note
        };
        return format!("no GPUs on the {place} ({why})\n");
    }
    let mut s = format!(
        "{:<4} {:<28} {:>19} {:>5}  {}\n",
        "GPU", "NAME", "MEMORY", "UTIL", "JOB"
    );
    for g in &list.gpus {
        s.push_str(&format!(
            "{:<4} {:<28} {:>19} {:>4}%  {}\n",
            g.index,
            g.name.chars().take(28).collect::<String>(),
            format!("{} / {} MiB", g.memory_used_mib, g.memory_total_mib),
            g.utilization_pct,
            if g.job.is_empty() { "-" } else { &g.job },
        ));
    }
    s
}

/// What the GPUs a job holds are doing: mean utilisation and memory used in
/// all, `None` when it holds none (or none is reported).
pub fn usage(list: &GpuList, held: &[u32]) -> Option<(u32, u64)> {
    let gs: Vec<&Gpu> = list
        .gpus
        .iter()
        .filter(|g| held.contains(&g.index))
        .collect();
    if gs.is_empty() {
        return None;
    }
    let util = gs.iter().map(|g| g.utilization_pct).sum::<u32>() / gs.len() as u32;
    let mem = gs.iter().map(|g| g.memory_used_mib).sum();
    Some((util, mem))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn gpu(index: u32, util: u32, mem: u64, job: &str) -> Gpu {
        Gpu {
            index,
            name: "Fake GPU".into(),
            memory_total_mib: 16384,
            memory_used_mib: mem,
            utilization_pct: util,
            job: job.into(),
        }
    }

    #[test]
    fn a_jobs_usage_is_over_the_gpus_it_holds() {
        let list = GpuList {
            gpus: vec![
                gpu(0, 90, 1000, "3"),
                gpu(1, 30, 500, "3"),
                gpu(2, 0, 0, ""),
            ],
            note: String::new(),
        };
        assert_eq!(usage(&list, &[0, 1]), Some((60, 1500)));
        assert_eq!(usage(&list, &[]), None);
        assert_eq!(usage(&list, &[7]), None);
    }

    #[test]
    fn the_table_names_each_gpus_holder() {
        let list = GpuList {
            gpus: vec![gpu(0, 90, 1000, "3"), gpu(1, 0, 0, "")],
            note: String::new(),
        };
        let t = table(&list, "local agent");
        let lines: Vec<&str> = t.lines().collect();
        assert!(
            lines[1].starts_with("0 ") && lines[1].ends_with(" 3"),
            "{t}"
        );
        assert!(
            lines[1].contains("1000 / 16384 MiB") && lines[1].contains("90%"),
            "{t}"
        );
        assert!(lines[2].ends_with(" -"), "{t}");
        let none = table(
            &GpuList {
                gpus: vec![],
                note: "nvidia-smi is not on PATH".into(),
            },
            "ssh gpubox",
        );
        assert_eq!(
            none,
            "no GPUs on the ssh gpubox (nvidia-smi is not on PATH)\n"
        );
    }
}

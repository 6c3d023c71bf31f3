//! `bridge sweep status [SWEEP] [--json] [--watch]`, `bridge sweep cancel
//! SWEEP`, `bridge sweep resume SWEEP [--detach]`: the sweeps `bridge run`
//! submitted for this repository.

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::anyhow;
use bridge_proto::jobs::{is_terminal, state_name};
use bridge_proto::v1::{JobState, SweepListRequest, SweepRef};

use crate::{client, sweeps};

#[derive(clap::Args)]
pub struct Args {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(clap::Subcommand)]
enum Cmd {
    /// This repository's sweeps, or one sweep's trials.
    Status {
        /// A sweep id (s3); none: every sweep of this repository.
        sweep: Option<String>,
        /// One JSON object (schema in the README).
        #[arg(long)]
        json: bool,
        /// Follow the sweep to its end, as `bridge run` does.
        #[arg(long, short, requires = "sweep", conflicts_with = "json")]
        watch: bool,
    },
    /// Stop a sweep: no trial starts any more, running trials are cancelled.
    Cancel { sweep: String },
    /// Run an ended sweep's failed, lost and cancelled trials again, against the
    /// tree as saved now; succeeded trials are kept.
    Resume {
        sweep: String,
        /// Return at once, printing the sweep id.
        #[arg(long, short = 'd')]
        detach: bool,
    },
}

impl Args {
    /// `bridge sweep cancel SWEEP` (what `bridge cancel s3` does).
    pub fn cancel(sweep: String) -> Args {
        Args {
            cmd: Cmd::Cancel { sweep },
        }
    }
}

pub async fn run(cwd: &Path, args: Args) -> anyhow::Result<u8> {
    let layout = client::repo(cwd)?;
    let mut c = client::require_daemon(&layout).await?;
    match args.cmd {
        Cmd::Status {
            sweep: None, json, ..
        } => {
            let list = c
                .sweeps(SweepListRequest {
                    mirror: String::new(),
                    all: true,
                })
                .await
                .map_err(|s| anyhow!("{}", s.message()))?
                .into_inner()
                .sweeps;
            if json {
                let v: Vec<serde_json::Value> = list.iter().map(sweeps::json).collect();
                let out = serde_json::json!({
                    "schema_version": sweeps::SCHEMA_VERSION,
                    "sweeps": v,
                });
                println!("{}", serde_json::to_string_pretty(&out)?);
                return Ok(0);
            }
            if list.is_empty() {
                eprintln!(
                    "no sweeps yet (a job file with [sweep] makes one: see the README's Sweeps)"
                );
                return Ok(0);
            }
            println!(
                "{:<6} {:<20} {:<10} {:>8} {:>7} {:>8} {:<10}",
                "ID", "NAME", "STATE", "DONE", "FAILED", "RUNNING", "SUBMITTED"
            );
            for s in &list {
                let n =
                    |f: &dyn Fn(JobState) -> bool| s.trials.iter().filter(|t| f(t.state())).count();
                println!(
                    "{:<6} {:<20} {:<10} {:>8} {:>7} {:>8} {:<10}",
                    s.id,
                    s.name,
                    state_name(s.state()),
                    format!("{}/{}", n(&is_terminal), s.trials.len()),
                    n(&|st| matches!(st, JobState::Failed | JobState::Lost)),
                    n(&|st| matches!(st, JobState::Setup | JobState::Running)),
                    crate::jobs::clock(s.submitted_ms)
                );
            }
            Ok(0)
        }
        Cmd::Status {
            sweep: Some(id),
            json,
            watch,
        } => {
            if watch {
                return sweeps::follow_to_end(cwd, &layout, &mut c, &id).await;
            }
            let s = c
                .get_sweep(SweepRef { id: id.clone() })
                .await
                .map_err(|s| anyhow!("{}", s.message()))?
                .into_inner();
            if json {
                println!("{}", serde_json::to_string_pretty(&sweeps::json(&s))?);
                return Ok(0);
            }
            eprintln!(
                "sweep {} ({}): {}, {} trials, at most {} at a time, generation {}{}",
                s.id,
                s.name,
                state_name(s.state()),
                s.trials.len(),
                s.max_parallel,
                s.generation.get(..12).unwrap_or(&s.generation),
                if s.reason.is_empty() {
                    String::new()
                } else {
                    format!("; {}", s.reason)
                }
            );
            if !s.mlflow_run_id.is_empty() {
                eprintln!(
                    "MLflow parent run {} (experiment {})",
                    s.mlflow_run_id, s.mlflow_experiment_id
                );
            } else if !s.mlflow_note.is_empty() {
                eprintln!("MLflow: {}", s.mlflow_note);
            }
            print!("{}", sweeps::table(&s));
            Ok(0)
        }
        Cmd::Cancel { sweep } => {
            let s = c
                .cancel_sweep(SweepRef { id: sweep.clone() })
                .await
                .map_err(|s| anyhow!("{}", s.message()))?
                .into_inner();
            crate::note!(
                "bridge: sweep {} ({}) is stopping: no trial starts any more, running ones get SIGTERM",
                s.id,
                s.name
            );
            let until = Instant::now() + Duration::from_secs(60);
            loop {
                let s = c
                    .get_sweep(SweepRef { id: sweep.clone() })
                    .await
                    .map_err(|s| anyhow!("{}", s.message()))?
                    .into_inner();
                if is_terminal(s.state()) {
                    crate::note!("{}", sweeps::closing(&s));
                    return Ok(0);
                }
                if Instant::now() >= until {
                    crate::note!(
                        "bridge: sweep {sweep} has not ended yet; `bridge sweep status {sweep}` shows its trials"
                    );
                    return Ok(0);
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
        Cmd::Resume { sweep, detach } => {
            let reply = c
                .resume_sweep(SweepRef { id: sweep.clone() })
                .await
                .map_err(|s| anyhow!("{}", s.message()))?
                .into_inner();
            let s = reply.sweep.unwrap_or_default();
            let again = s
                .trials
                .iter()
                .filter(|t| t.state() == JobState::Queued)
                .count();
            sweeps::announce(&layout, &s, &format!("{again} to run again"), "resumed");
            for n in &reply.notes {
                eprintln!("bridge: warning: {n}");
            }
            if detach {
                println!("{}", s.id);
                return Ok(0);
            }
            sweeps::follow_to_end(cwd, &layout, &mut c, &s.id).await
        }
    }
}

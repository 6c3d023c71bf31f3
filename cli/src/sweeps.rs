//! What the sweep commands share: submitting a sweep, following it (one live
//! line per running trial on a terminal, a line per event otherwise), the
//! summary table, the JSON schema of `bridge sweep status --json`, and the
//! exit code.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{anyhow, bail};
use bridge_daemon::repo::Layout;
use bridge_proto::jobs::{is_terminal, state_name};
use bridge_proto::v1::control_client::ControlClient;
use bridge_proto::v1::{JobState, LogsRequest, SweepInfo, SweepRef, TrialInfo};
use indicatif::{MultiProgress, ProgressBar, ProgressStyle};
use tonic::Code;
use tonic::transport::Channel;

use crate::jobs;
use crate::spec::sweep::{CONFIRM_ABOVE, SweepDef};

/// How often a follower looks at a small sweep; a big one (a bigger answer)
/// a millisecond less often per 100 trials, at most once a second.
const FOLLOW_POLL: Duration = Duration::from_millis(50);

fn follow_poll(trials: usize) -> Duration {
    (FOLLOW_POLL + Duration::from_millis(trials as u64 / 100)).min(Duration::from_secs(1))
}
/// Version of the `--json` schema of a sweep.
pub const SCHEMA_VERSION: u32 = 1;

fn gone(s: &tonic::Status) -> bool {
    matches!(
        s.code(),
        Code::Unavailable | Code::Unknown | Code::Cancelled
    )
}

/// Submits the job file's sweep and, unless `detach`, follows it to its
/// end. A sweep of more than [`CONFIRM_ABOVE`] trials needs `yes`.
pub async fn submit_and_follow(
    cwd: &Path,
    layout: &Layout,
    mut spec: bridge_proto::v1::JobSpec,
    def: SweepDef,
    detach: bool,
    yes: bool,
) -> anyhow::Result<u8> {
    let count = def.count().unwrap_or(u64::MAX);
    if count > CONFIRM_ABOVE && !yes {
        bail!(
            "the sweep makes {count} trials, more than {CONFIRM_ABOVE}: add --yes to submit it anyway"
        );
    }
    jobs::tracking_from_shell(&mut spec);
    let made = def.describe();
    let mut c = jobs::daemon_or_up(cwd, layout).await?;
    let reply = c
        .submit_sweep(bridge_proto::v1::ControlSweepRequest {
            spec: Some(def.to_spec(spec)),
        })
        .await
        .map_err(|s| anyhow!("{}", s.message()))?
        .into_inner();
    let s = reply.sweep.unwrap_or_default();
    announce(layout, &s, &made, "submitted");
    for n in &reply.notes {
        eprintln!("bridge: warning: {n}");
    }
    for f in &reply.forwards {
        crate::note!(
            "bridge: {}",
            jobs::forward_line(f).replace("the job logs", "the trials log")
        );
    }
    if detach {
        println!("{}", s.id);
        crate::note!(
            "bridge: follow it with `bridge sweep status {} --watch`",
            s.id
        );
        return Ok(0);
    }
    follow_to_end(cwd, layout, &mut c, &s.id).await
}

/// The first line about a sweep: what it is and where it runs.
pub fn announce(layout: &Layout, s: &SweepInfo, made: &str, what: &str) {
    let gpus = s
        .spec
        .as_ref()
        .and_then(|x| x.job.as_ref())
        .map_or(0, |j| j.gpus);
    let per = if gpus > 0 {
        format!(", {gpus} GPU{} each", if gpus == 1 { "" } else { "s" })
    } else {
        String::new()
    };
    let n = s.trials.len();
    crate::note!(
        "bridge: sweep {} ({}) on {}: {n} trial{} ({made}) {what} at generation {}; at most {} at a time{per}",
        s.id,
        s.name,
        crate::client::place(layout),
        if n == 1 { "" } else { "s" },
        s.generation.get(..12).unwrap_or(&s.generation),
        s.max_parallel,
    );
}

/// Follows a sweep until it has ended and its outputs are home, then
/// prints the summary; Ctrl-C detaches.
pub async fn follow_to_end(
    cwd: &Path,
    layout: &Layout,
    c: &mut ControlClient<Channel>,
    id: &str,
) -> anyhow::Result<u8> {
    let run = async {
        follow(cwd, layout, c, id).await?;
        let s = loop {
            match c.wait_sweep(SweepRef { id: id.to_string() }).await {
                Ok(r) => break r.into_inner(),
                Err(s) if gone(&s) => *c = jobs::reconnect(cwd, layout).await?,
                Err(s) => bail!("{}", s.message()),
            }
        };
        Ok::<_, anyhow::Error>(s)
    };
    tokio::select! {
        r = run => {
            let s = r?;
            print!("{}", table(&s));
            crate::note!("{}", closing(&s));
            Ok(exit_code(&s))
        }
        _ = tokio::signal::ctrl_c() => {
            crate::note!(
                "\nbridge: detached; sweep {id} keeps running. Follow it with `bridge sweep status {id} --watch`, stop it with `bridge sweep cancel {id}`"
            );
            Ok(130)
        }
    }
}

/// What a follower has said about a trial.
#[derive(Clone, PartialEq)]
struct Seen {
    state: JobState,
    job: String,
}

/// Shows the sweep's trials as they start and end until it has ended: a
/// live line per running trial (its state, time, GPUs and last log line) on
/// a terminal, otherwise one line per start and end.
async fn follow(
    cwd: &Path,
    layout: &Layout,
    c: &mut ControlClient<Channel>,
    id: &str,
) -> anyhow::Result<()> {
    let live = crate::out::progress();
    let mp = MultiProgress::new();
    let style = ProgressStyle::with_template("{spinner} {msg}")
        .unwrap_or_else(|_| ProgressStyle::default_spinner());
    let mut bars: HashMap<u32, ProgressBar> = HashMap::new();
    let mut seen: HashMap<u32, Seen> = HashMap::new();
    // Last log line per running job, filled by one follower task each.
    let last: Arc<Mutex<HashMap<String, String>>> = Arc::default();
    let mut tails: HashMap<String, tokio::task::JoinHandle<()>> = HashMap::new();
    let mut mlflow_said = false;
    // What had happened before this follower started is not news.
    let mut first = true;
    let say = |mp: &MultiProgress, line: String| {
        if live {
            let _ = mp.println(line);
        } else {
            crate::note!("{line}");
        }
    };
    loop {
        let s = match c.get_sweep(SweepRef { id: id.to_string() }).await {
            Ok(r) => r.into_inner(),
            Err(st) if gone(&st) => {
                *c = jobs::reconnect(cwd, layout).await?;
                continue;
            }
            Err(st) => bail!("{}", st.message()),
        };
        if !mlflow_said {
            if !s.mlflow_run_id.is_empty() {
                mlflow_said = true;
                say(
                    &mp,
                    format!(
                        "bridge: MLflow: parent run {} in experiment {}; each trial is a child run with its parameters",
                        s.mlflow_run_id, s.mlflow_experiment_id
                    ),
                );
            } else if !s.mlflow_note.is_empty() {
                mlflow_said = true;
                say(&mp, format!("bridge: warning: {}", s.mlflow_note));
            }
        }
        let report = s
            .spec
            .as_ref()
            .map(|x| x.report.clone())
            .unwrap_or_default();
        for t in &s.trials {
            let now = Seen {
                state: t.state(),
                job: t.current_job.clone(),
            };
            let before = seen.insert(t.index, now.clone());
            if before.as_ref() == Some(&now) || (first && is_terminal(now.state)) {
                continue;
            }
            let running = |x: &Seen| matches!(x.state, JobState::Setup | JobState::Running);
            let started = running(&now)
                && before
                    .as_ref()
                    .is_none_or(|b| !running(b) || b.job != now.job);
            if started {
                if !live {
                    say(
                        &mp,
                        format!(
                            "bridge: trial {} ({}) started{}",
                            t.index,
                            params(t),
                            gpus(t)
                        ),
                    );
                }
                if live && !now.job.is_empty() && !tails.contains_key(&now.job) {
                    tails.insert(
                        now.job.clone(),
                        tail(c.clone(), now.job.clone(), last.clone()),
                    );
                }
            }
            // An attempt ended: the trial is final, or waits for a retry.
            let attempt_ended = before
                .as_ref()
                .is_some_and(|b| !b.job.is_empty() && b.job != now.job);
            if is_terminal(now.state) || attempt_ended {
                if let Some(b) = bars.remove(&t.index) {
                    b.finish_and_clear();
                    mp.remove(&b);
                }
                if is_terminal(now.state) {
                    say(&mp, format!("bridge: trial {}", ended(t, &report)));
                } else if !t.reason.is_empty() {
                    say(
                        &mp,
                        format!("bridge: trial {} ({}): {}", t.index, params(t), t.reason),
                    );
                }
            }
        }
        if live {
            let last = last.lock().map(|l| l.clone()).unwrap_or_default();
            for t in &s.trials {
                let running = matches!(t.state(), JobState::Setup | JobState::Running);
                if !running {
                    continue;
                }
                let bar = bars.entry(t.index).or_insert_with(|| {
                    let b = mp.add(ProgressBar::new_spinner());
                    b.set_style(style.clone());
                    b.enable_steady_tick(Duration::from_millis(120));
                    b
                });
                let secs = if t.started_ms > 0 {
                    format!(
                        " {:.0}s",
                        jobs::now_ms().saturating_sub(t.started_ms) as f64 / 1000.0
                    )
                } else {
                    String::new()
                };
                let line = last.get(&t.current_job).cloned().unwrap_or_default();
                bar.set_message(format!(
                    "trial {} ({}) {}{secs}{}{}",
                    t.index,
                    params(t),
                    state_name(t.state()),
                    gpus(t),
                    if line.is_empty() {
                        String::new()
                    } else {
                        format!(" │ {}", clip(&line, 60))
                    }
                ));
            }
            let running: Vec<&String> = s
                .trials
                .iter()
                .filter(|t| !t.current_job.is_empty())
                .map(|t| &t.current_job)
                .collect();
            tails.retain(|job, h| {
                let keep = running.contains(&job);
                if !keep {
                    h.abort();
                }
                keep
            });
        }
        first = false;
        if is_terminal(s.state()) {
            for (_, b) in bars.drain() {
                b.finish_and_clear();
            }
            for (_, h) in tails.drain() {
                h.abort();
            }
            return Ok(());
        }
        tokio::time::sleep(follow_poll(s.trials.len())).await;
    }
}

/// Follows job `job`'s log, keeping its last complete line in `last`.
fn tail(
    mut c: ControlClient<Channel>,
    job: String,
    last: Arc<Mutex<HashMap<String, String>>>,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let req = LogsRequest {
            id: job.clone(),
            offset: 0,
            follow: true,
            tail_lines: 1,
            accept_zstd: false,
        };
        let Ok(stream) = c.logs(req).await else {
            return;
        };
        let mut stream = stream.into_inner();
        let mut partial = String::new();
        while let Ok(Some(chunk)) = stream.message().await {
            partial.push_str(&String::from_utf8_lossy(&chunk.data));
            if let Some(end) = partial.rfind('\n') {
                let line = partial[..end]
                    .rsplit('\n')
                    .map(str::trim)
                    .find(|l| !l.is_empty())
                    .map(str::to_string);
                partial.drain(..=end);
                if let (Some(line), Ok(mut l)) = (line, last.lock()) {
                    l.insert(job.clone(), line);
                }
            }
            if partial.len() > 4096 {
                partial.clear();
            }
        }
    })
}

fn clip(s: &str, n: usize) -> String {
    if s.chars().count() <= n {
        s.to_string()
    } else {
        format!("{}…", s.chars().take(n).collect::<String>())
    }
}

/// A trial's parameters, `lr=0.1 depth=4`.
fn params(t: &TrialInfo) -> String {
    if t.params.is_empty() {
        return "no parameters".into();
    }
    t.params
        .iter()
        .map(|p| format!("{}={}", p.name, p.value))
        .collect::<Vec<_>>()
        .join(" ")
}

fn gpus(t: &TrialInfo) -> String {
    match t.gpus.as_slice() {
        [] => String::new(),
        [g] => format!(", GPU {g}"),
        g => format!(
            ", GPUs {}",
            g.iter().map(u32::to_string).collect::<Vec<_>>().join(",")
        ),
    }
}

fn duration(t: &TrialInfo) -> Option<f64> {
    (t.started_ms > 0).then(|| {
        let end = if t.finished_ms > 0 {
            t.finished_ms
        } else {
            jobs::now_ms()
        };
        end.saturating_sub(t.started_ms) as f64 / 1000.0
    })
}

/// "3 (lr=0.1) succeeded in 2.1 s, val_acc 0.93" / "… failed (exit 3): …".
fn ended(t: &TrialInfo, report: &str) -> String {
    let mut s = format!("{} ({}) {}", t.index, params(t), state_name(t.state()));
    if let Some(d) = duration(t) {
        s.push_str(&format!(" in {d:.1} s"));
    }
    if let Some(c) = t.exit_code.filter(|&c| c != 0) {
        s.push_str(&format!(", exit code {c}"));
    }
    if let Some(m) = t.metric {
        s.push_str(&format!(", {report} {m}"));
    }
    if !t.reason.is_empty() && t.state() != JobState::Succeeded {
        s.push_str(&format!(": {}", t.reason));
    }
    s
}

/// The summary table: a row per trial with its parameters, state, exit
/// code, duration and the reported metric.
pub fn table(s: &SweepInfo) -> String {
    let report = s
        .spec
        .as_ref()
        .map(|x| x.report.clone())
        .unwrap_or_default();
    let mut names: Vec<String> = Vec::new();
    for t in &s.trials {
        for p in &t.params {
            if !names.contains(&p.name) {
                names.push(p.name.clone());
            }
        }
    }
    let mut head: Vec<String> = vec!["TRIAL".into()];
    head.extend(names.iter().map(|n| n.to_uppercase()));
    head.extend(["STATE", "EXIT", "DURATION", "JOB"].map(String::from));
    if !report.is_empty() {
        head.push(report.to_uppercase());
    }
    let mut rows = vec![head];
    for t in &s.trials {
        let mut row = vec![t.index.to_string()];
        for n in &names {
            row.push(
                t.params
                    .iter()
                    .find(|p| &p.name == n)
                    .map_or("-".into(), |p| p.value.clone()),
            );
        }
        row.push(state_name(t.state()).into());
        row.push(t.exit_code.map_or("-".into(), |c| c.to_string()));
        row.push(duration(t).map_or("-".into(), |d| format!("{d:.1}s")));
        row.push(t.jobs.last().cloned().unwrap_or_else(|| "-".into()));
        if !report.is_empty() {
            row.push(t.metric.map_or("-".into(), |m| m.to_string()));
        }
        rows.push(row);
    }
    let widths: Vec<usize> = (0..rows[0].len())
        .map(|i| rows.iter().map(|r| r[i].chars().count()).max().unwrap_or(0))
        .collect();
    let mut out = String::new();
    for r in &rows {
        let line: Vec<String> = r
            .iter()
            .zip(&widths)
            .map(|(c, w)| format!("{c:<w$}"))
            .collect();
        out.push_str(line.join("  ").trim_end());
        out.push('\n');
    }
    out
}

/// The line after the table: how the sweep ended and what to do next.
pub fn closing(s: &SweepInfo) -> String {
    let n = s.trials.len();
    let count = |st: JobState| s.trials.iter().filter(|t| t.state() == st).count();
    let ok = count(JobState::Succeeded);
    // A resumed sweep's submit time is not its last round's.
    let secs = if s.finished_ms > s.submitted_ms && s.resumes == 0 {
        format!(
            " in {:.1} s",
            (s.finished_ms - s.submitted_ms) as f64 / 1000.0
        )
    } else {
        String::new()
    };
    let mut line = format!(
        "bridge: sweep {} ({}) {}: {ok} of {n} trials succeeded{secs}",
        s.id,
        s.name,
        state_name(s.state())
    );
    let bad: Vec<&TrialInfo> = s
        .trials
        .iter()
        .filter(|t| matches!(t.state(), JobState::Failed | JobState::Lost))
        .collect();
    if !s.reason.is_empty() && s.state() != JobState::Succeeded {
        line.push_str(&format!(" ({})", s.reason));
    }
    if let Some(job) = s.spec.as_ref().and_then(|x| x.job.as_ref())
        && !job.outputs.is_empty()
    {
        let mut trial_job = job.clone();
        trial_job.trial = Some(bridge_proto::v1::TrialRef {
            sweep: s.id.clone(),
            index: 0,
            attempt: 1,
        });
        // Where trial 0's land, with its index written as <trial>.
        let (zero, any) = (format!("{}/0", s.id), format!("{}/<trial>", s.id));
        let places: Vec<String> = bridge_daemon::jobs::local_outputs(&trial_job, "<job>")
            .into_iter()
            .map(|p| p.replacen(&zero, &any, 1))
            .collect();
        line.push_str(&format!("; outputs in {}", places.join(", ")));
    }
    if let Some(first) = bad.first() {
        line.push_str(&format!(
            "\nbridge: `bridge logs {}/{}` shows a failed trial's log; `bridge sweep resume {}` runs the failed, lost and cancelled trials again",
            s.id, first.index, s.id
        ));
    } else if s.state() == JobState::Cancelled {
        line.push_str(&format!(
            "\nbridge: `bridge sweep resume {}` runs the cancelled trials",
            s.id
        ));
    }
    line
}

/// `bridge run`'s exit code for an ended sweep: 0 when every trial
/// succeeded, 130 when it was cancelled, 1 when a trial failed.
pub fn exit_code(s: &SweepInfo) -> u8 {
    match s.state() {
        JobState::Succeeded => 0,
        JobState::Cancelled => 130,
        _ => 1,
    }
}

/// A sweep as `bridge sweep status --json` shows it (schema in the
/// README: "Sweeps").
pub fn json(s: &SweepInfo) -> serde_json::Value {
    let spec = s.spec.clone().unwrap_or_default();
    let mut counts: BTreeMap<&str, usize> = BTreeMap::new();
    for t in &s.trials {
        *counts.entry(state_name(t.state())).or_default() += 1;
    }
    let trials: Vec<serde_json::Value> = s
        .trials
        .iter()
        .map(|t| {
            let params: serde_json::Map<String, serde_json::Value> = t
                .params
                .iter()
                .map(|p| (p.name.clone(), p.value.clone().into()))
                .collect();
            serde_json::json!({
                "index": t.index,
                "params": params,
                "state": state_name(t.state()),
                "job": t.jobs.last(),
                "jobs": t.jobs,
                "attempts": t.attempts,
                "exit_code": t.exit_code,
                "started_ms": (t.started_ms > 0).then_some(t.started_ms),
                "finished_ms": (t.finished_ms > 0).then_some(t.finished_ms),
                "duration_s": duration(t),
                "gpus": t.gpus,
                "metric": t.metric,
                "reason": t.reason,
                "generation": t.generation,
                "mlflow_run_id": (!t.mlflow_run_id.is_empty()).then_some(&t.mlflow_run_id),
            })
        })
        .collect();
    serde_json::json!({
        "schema_version": SCHEMA_VERSION,
        "id": s.id,
        "name": s.name,
        "state": state_name(s.state()),
        "method": spec.method,
        "seed": (spec.method == "random").then_some(spec.seed),
        "generation": s.generation,
        "submitted_ms": s.submitted_ms,
        "finished_ms": (s.finished_ms > 0).then_some(s.finished_ms),
        "max_parallel": s.max_parallel,
        "gpus_per_trial": spec.job.as_ref().map_or(0, |j| j.gpus),
        "retries": spec.retries,
        "fail_fast": spec.fail_fast,
        "report": (!spec.report.is_empty()).then_some(&spec.report),
        "reason": s.reason,
        "resumes": s.resumes,
        "counts": counts,
        "mlflow": {
            "run_id": (!s.mlflow_run_id.is_empty()).then_some(&s.mlflow_run_id),
            "experiment_id": (!s.mlflow_experiment_id.is_empty()).then_some(&s.mlflow_experiment_id),
            "note": (!s.mlflow_note.is_empty()).then_some(&s.mlflow_note),
        },
        "trials": trials,
    })
}

/// The job of trial `trial` of sweep `sweep` (its latest attempt).
pub async fn trial_job(
    c: &mut ControlClient<Channel>,
    sweep: &str,
    trial: u32,
) -> anyhow::Result<String> {
    let s = c
        .get_sweep(SweepRef {
            id: sweep.to_string(),
        })
        .await
        .map_err(|st| anyhow!("{}", st.message()))?
        .into_inner();
    let t = s.trials.get(trial as usize).ok_or_else(|| {
        anyhow!(
            "sweep {sweep} has {} trials (0 to {}); there is no trial {trial}",
            s.trials.len(),
            s.trials.len().saturating_sub(1)
        )
    })?;
    t.jobs.last().cloned().ok_or_else(|| {
        anyhow!(
            "trial {trial} of sweep {sweep} has not started yet ({}); `bridge sweep status {sweep}` shows the sweep",
            state_name(t.state())
        )
    })
}

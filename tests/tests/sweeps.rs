//! Sweeps end to end: real agents, shims and Python trials on fake GPUs; a
//! grid with a failing trial and its resume after the fix, a seeded random
//! search, Optuna workers sharing a journal, cancellation, the laptop's
//! MLflow server with a parent run and a child per trial, and bad input.

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::process::Output;
use std::time::{Duration, Instant};

use bridge_tests::mlflow::MlflowServer;
use bridge_tests::{Repo, Value, eventually, path_with_fake_gpus, wheelhouse};

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// `bridge up` with `gpus` fake GPUs on the agent (and `env`).
fn up(r: &Repo, gpus: &str, env: &[(&str, &str)]) {
    let path = path_with_fake_gpus();
    let mut all = vec![("PATH", path.as_str()), ("BRIDGE_FAKE_GPUS", gpus)];
    all.extend_from_slice(env);
    r.ok_env(&["up"], &all);
}

fn status(r: &Repo, id: &str) -> Value {
    serde_json::from_str(&r.ok(&["sweep", "status", id, "--json"])).expect("sweep JSON")
}

/// A trial's parameter as the JSON shows it.
fn param(t: &Value, name: &str) -> String {
    t["params"][name].as_str().unwrap_or_default().to_string()
}

const TRAIN: &str = r#"import os, sys, time
lr, depth = sys.argv[1], sys.argv[2]
t = os.environ["BRIDGE_TRIAL"]
def note(what):
    with open(os.environ["SWEEP_LOG"], "a") as f:
        f.write(" ".join([what, t, str(time.time_ns()), os.environ["CUDA_VISIBLE_DEVICES"],
            os.environ["BRIDGE_PARAM_LR"], os.environ["BRIDGE_PARAM_DEPTH"],
            os.environ["BRIDGE_SWEEP"], os.environ["BRIDGE_JOB_ID"]]) + "\n")
note("start")
print(f"trial {t}: lr={lr} depth={depth}", flush=True)
time.sleep(1.0)
out = os.environ["BRIDGE_OUTPUT_DIR"]
os.makedirs(out, exist_ok=True)
with open(os.path.join(out, "result.txt"), "w") as f:
    f.write(f"lr={lr} depth={depth}\n")
note("end")
if open("model.cfg").read().strip() == "buggy" and lr == "0.01" and depth == "8":
    print("loss is nan", file=sys.stderr)
    sys.exit(3)
print(f"BRIDGE_METRIC val_acc={int(depth) / 100 + float(lr)}")
"#;

/// One line of the trials' own log: what, trial, time, GPU, lr, depth,
/// sweep, job.
struct Note {
    what: String,
    trial: u32,
    ns: u128,
    gpu: String,
    lr: String,
    depth: String,
    sweep: String,
}

fn notes(path: &std::path::Path) -> Vec<Note> {
    fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .map(|l| {
            let f: Vec<&str> = l.split(' ').collect();
            Note {
                what: f[0].into(),
                trial: f[1].parse().unwrap(),
                ns: f[2].parse().unwrap(),
                gpu: f[3].into(),
                lr: f[4].into(),
                depth: f[5].into(),
                sweep: f[6].into(),
            }
        })
        .collect()
}

/// A 3×2 grid on 4 fake GPUs, two at a time: the trials' own timestamps
/// never show more than two running, overlapping ones hold distinct GPUs,
/// one trial fails and the sweep with it, the other five succeed with their
/// outputs home apart; after the fix `bridge sweep resume` reruns only that
/// one, against the new code, and the sweep succeeds.
#[test]
fn a_grid_runs_two_at_a_time_and_resume_reruns_only_the_failed_trial() {
    let r = Repo::new();
    let log = r.scratch("trials.log");
    r.write("train.py", TRAIN);
    r.write("model.cfg", "buggy\n");
    r.write(
        "grid.toml",
        format!(
            "name = \"grid\"\nrun = \"python3 train.py {{lr}} {{depth}}\"\n\
             [env]\nSWEEP_LOG = \"{}\"\n[resources]\ngpus = 1\n[outputs]\npaths = [\"outputs/\"]\n\
             [sweep]\nmax_parallel = 2\nreport = \"val_acc\"\n\
             [sweep.params]\nlr = [0.1, 0.01]\ndepth = [4, 8, 16]\n",
            log.display()
        ),
    );
    up(&r, "4", &[]);
    let o = r.bridge(&["run", "grid.toml"]);
    let (out, err) = (stdout(&o), stderr(&o));
    assert_eq!(
        o.status.code(),
        Some(1),
        "a failed trial fails the run\n{out}\n{err}"
    );
    assert!(
        err.contains("sweep s1 (grid) on local agent: 6 trials (a grid over lr × depth)"),
        "{err}"
    );
    assert!(err.contains("at most 2 at a time, 1 GPU each"), "{err}");
    assert!(
        err.contains("trial 4 (lr=0.01 depth=8) failed") && err.contains("exit code 3"),
        "{err}"
    );
    assert!(err.contains("5 of 6 trials succeeded"), "{err}");
    assert!(err.contains("`bridge logs s1/4`"), "{err}");
    // The summary table: a row per trial with its metric.
    let rows: Vec<&str> = out.lines().collect();
    assert!(
        rows[0].starts_with("TRIAL  LR    DEPTH  STATE") && rows[0].ends_with("VAL_ACC"),
        "{out}"
    );
    assert_eq!(rows.len(), 7, "{out}");
    assert!(
        rows[1].starts_with("0      0.1   4      succeeded  0"),
        "{out}"
    );
    assert!(rows[1].ends_with("0.14"), "{out}");
    assert!(rows[5].contains("failed     3"), "{out}");

    // Never more than two at once, each with its own GPU while together.
    let n = notes(&log);
    assert_eq!(n.iter().filter(|x| x.what == "start").count(), 6);
    let mut events: Vec<(u128, i32, &Note)> = n
        .iter()
        .map(|x| (x.ns, if x.what == "start" { 1 } else { -1 }, x))
        .collect();
    events.sort_by_key(|e| (e.0, e.1));
    let (mut now, mut most) = (0, 0);
    let mut running: BTreeMap<u32, String> = BTreeMap::new();
    for (_, d, x) in &events {
        now += d;
        most = most.max(now);
        if *d == 1 {
            assert!(
                !running.values().any(|g| *g == x.gpu),
                "trial {} got GPU {} while another held it: {running:?}",
                x.trial,
                x.gpu
            );
            running.insert(x.trial, x.gpu.clone());
        } else {
            running.remove(&x.trial);
        }
    }
    assert_eq!(most, 2, "at most max_parallel = 2 at once, and that many");
    let s = status(&r, "s1");
    assert_eq!(s["state"], "failed");
    assert_eq!(s["schema_version"], 1);
    assert_eq!(s["counts"]["succeeded"], 5);
    let trials = s["trials"].as_array().unwrap();
    for (i, t) in trials.iter().enumerate() {
        // Every trial saw the sweep, its own parameters and placeholders.
        let mine: Vec<&Note> = n.iter().filter(|x| x.trial == i as u32).collect();
        assert_eq!(mine[0].lr, param(t, "lr"));
        assert_eq!(mine[0].depth, param(t, "depth"));
        assert_eq!(mine[0].sweep, "s1");
        // Its output directory came home under outputs/s1/<trial>/.
        let got = fs::read_to_string(r.path(&format!("outputs/s1/{i}/result.txt"))).unwrap();
        assert_eq!(
            got,
            format!("lr={} depth={}\n", param(t, "lr"), param(t, "depth"))
        );
    }
    assert_eq!(trials[4]["state"], "failed");
    assert_eq!(trials[4]["exit_code"], 3);
    assert_eq!(trials[0]["metric"], 0.14);
    let first_generation = trials[0]["generation"].as_str().unwrap().to_string();
    // The failed trial's log, by sweep and trial.
    let o = r.bridge(&["logs", "s1/4"]);
    assert!(
        stdout(&o).contains("trial 4: lr=0.01 depth=8"),
        "{}",
        stdout(&o)
    );
    assert!(stderr(&o).contains("loss is nan"), "{}", stderr(&o));
    // Each trial is an ordinary job.
    let ps = r.ps_json(true);
    let names: BTreeSet<String> = ps
        .iter()
        .map(|j| j["name"].as_str().unwrap().to_string())
        .collect();
    assert!(names.contains("grid/4"), "{names:?}");

    // The fix, then the resume: only trial 4 runs again, on the new code.
    r.write("model.cfg", "fixed\n");
    let o = r.bridge(&["sweep", "resume", "s1"]);
    assert_eq!(o.status.code(), Some(0), "{}\n{}", stdout(&o), stderr(&o));
    assert!(
        stderr(&o).contains("6 of 6 trials succeeded"),
        "{}",
        stderr(&o)
    );
    let n = notes(&log);
    let starts: Vec<u32> = n
        .iter()
        .filter(|x| x.what == "start")
        .map(|x| x.trial)
        .collect();
    assert_eq!(starts.len(), 7, "{starts:?}");
    assert_eq!(starts[6], 4, "only the failed trial ran again");
    let s = status(&r, "s1");
    assert_eq!(s["state"], "succeeded");
    assert_eq!(s["resumes"], 1);
    let trials = s["trials"].as_array().unwrap();
    assert_eq!(trials[4]["jobs"].as_array().unwrap().len(), 2);
    assert_ne!(trials[4]["generation"], first_generation.as_str());
    assert_eq!(trials[0]["generation"], first_generation.as_str());
    // Nothing left to resume.
    let e = r.fails(&["sweep", "resume", "s1"]);
    assert!(e.contains("every trial of sweep s1 succeeded"), "{e}");
}

/// `method = "random"` with a seed draws the same parameters every time.
#[test]
fn a_random_search_with_a_seed_draws_the_same_parameters_twice() {
    let r = Repo::new();
    r.write(
        "random.toml",
        "run = \"echo {lr} {layers} {opt}\"\n[sweep]\nmethod = \"random\"\ntrials = 8\nseed = 1234\n\
         [sweep.params]\nlr = { loguniform = [1e-5, 1e-1] }\nlayers = { int = [1, 6] }\n\
         opt = [\"adam\", \"sgd\", \"lamb\"]\n",
    );
    r.up();
    let params = |id: &str| -> Vec<Value> {
        let s = status(&r, id);
        assert_eq!(s["seed"], 1234, "{s}");
        s["trials"]
            .as_array()
            .unwrap()
            .iter()
            .map(|t| t["params"].clone())
            .collect()
    };
    let o = r.bridge(&["run", "random.toml"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let o = r.bridge(&["run", "random.toml"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let (a, b) = (params("s1"), params("s2"));
    assert_eq!(a, b);
    assert_eq!(a.len(), 8);
    let distinct: BTreeSet<String> = a.iter().map(|p| p["lr"].to_string()).collect();
    assert_eq!(distinct.len(), 8, "draws, not one value: {a:?}");
    for p in &a {
        let lr: f64 = p["lr"].as_str().unwrap().parse().unwrap();
        assert!((1e-5..=1e-1).contains(&lr), "{p}");
        let layers: i64 = p["layers"].as_str().unwrap().parse().unwrap();
        assert!((1..=6).contains(&layers), "{p}");
    }
    // The trials ran the drawn values.
    let o = r.ok(&["logs", "s2/3"]);
    let t = &b[3];
    assert_eq!(
        o.trim(),
        format!(
            "{} {} {}",
            t["lr"].as_str().unwrap(),
            t["layers"].as_str().unwrap(),
            t["opt"].as_str().unwrap()
        )
    );
}

const TUNE: &str = r#"import os, sys, optuna
from optuna.storages import JournalStorage
from optuna.storages.journal import JournalFileBackend
optuna.logging.set_verbosity(optuna.logging.WARNING)
storage = JournalStorage(JournalFileBackend(sys.argv[1]))
study = optuna.create_study(study_name="tune", storage=storage, load_if_exists=True)
def objective(trial):
    x = trial.suggest_float("x", -10, 10)
    return (x - 2) ** 2
study.optimize(objective, n_trials=4)
print("worker", os.environ["BRIDGE_TRIAL"], "gpu", os.environ["CUDA_VISIBLE_DEVICES"], flush=True)
"#;

const COUNT: &str = r#"import sys, optuna
from optuna.storages import JournalStorage
from optuna.storages.journal import JournalFileBackend
s = optuna.load_study(study_name="tune", storage=JournalStorage(JournalFileBackend(sys.argv[1])))
print("trials", len([t for t in s.trials if t.state.name == "COMPLETE"]))
"#;

/// `workers = 3`: three copies of an Optuna worker, each with its own
/// BRIDGE_TRIAL and GPU, share one study through a journal file on the
/// agent; the study ends with the sum of their trials.
#[test]
fn optuna_workers_share_one_study_each_on_its_own_gpu() {
    let wheels = wheelhouse().expect("no wheelhouse: run tests/wheels first (tests/run does)");
    let r = Repo::new();
    let journal = r.scratch("optuna.journal");
    r.write("tune.py", TUNE);
    r.write("count.py", COUNT);
    r.write("requirements.txt", "optuna==5.0.0\n");
    r.write(
        "tune.toml",
        format!(
            "run = \"python tune.py {}\"\n[python]\nrequirements = \"requirements.txt\"\n\
             [resources]\ngpus = 1\n[sweep]\nworkers = 3\n",
            journal.display()
        ),
    );
    r.write(
        "count.toml",
        format!(
            "run = \"python count.py {}\"\n[python]\nrequirements = \"requirements.txt\"\n",
            journal.display()
        ),
    );
    let wheels = wheels.display().to_string();
    up(
        &r,
        "4",
        &[("PIP_NO_INDEX", "1"), ("PIP_FIND_LINKS", wheels.as_str())],
    );
    let o = r.bridge(&["run", "tune.toml"]);
    assert!(o.status.success(), "{}\n{}", stdout(&o), stderr(&o));
    assert!(stderr(&o).contains("3 trials (workers)"), "{}", stderr(&o));
    let mut seen = BTreeSet::new();
    let mut gpus = BTreeSet::new();
    for i in 0..3 {
        let log = r.ok(&["logs", &format!("s1/{i}")]);
        let line = log
            .lines()
            .find(|l| l.starts_with("worker "))
            .unwrap_or_else(|| panic!("{log}"));
        let f: Vec<&str> = line.split(' ').collect();
        seen.insert(f[1].to_string());
        gpus.insert(f[3].to_string());
    }
    assert_eq!(seen.len(), 3, "each its own BRIDGE_TRIAL: {seen:?}");
    assert_eq!(gpus.len(), 3, "each its own GPU: {gpus:?}");
    let o = r.ok(&["run", "count.toml"]);
    assert_eq!(o.trim(), "trials 12", "3 workers × 4 trials in one study");
}

/// Cancelling a running sweep stops every trial's process tree and starts
/// no trial afterwards; `bridge run` following it ends with 130.
#[test]
fn cancelling_a_sweep_kills_its_trials_and_starts_no_more() {
    let r = Repo::new();
    let (log, pids) = (r.scratch("starts.log"), r.scratch("pids"));
    r.write(
        "long.toml",
        format!(
            "run = \"echo start $BRIDGE_TRIAL >> {log}; sleep 600 & echo $! >> {pids}; echo $$ >> {pids}; wait\"\n\
             [sweep]\nworkers = 5\nmax_parallel = 2\n",
            log = log.display(),
            pids = pids.display()
        ),
    );
    r.up();
    let mut run = r.spawn(&["run", "long.toml"], &[], "run.out");
    assert!(
        eventually(Duration::from_secs(30), || fs::read_to_string(&pids)
            .is_ok_and(|p| p.lines().count() == 4)),
        "two trials never started"
    );
    let o = r.ok(&["sweep", "cancel", "s1"]);
    let _ = o;
    let all: Vec<i32> = fs::read_to_string(&pids)
        .unwrap()
        .lines()
        .map(|l| l.trim().parse().unwrap())
        .collect();
    let alive = |pid: i32| {
        fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|s| {
            s.rsplit(')')
                .next()
                .is_some_and(|r| !r.trim_start().starts_with('Z'))
        })
    };
    assert!(
        eventually(Duration::from_secs(15), || all.iter().all(|p| !alive(*p))),
        "trial processes survive the cancel: {:?}",
        all.iter().filter(|p| alive(**p)).collect::<Vec<_>>()
    );
    let s = status(&r, "s1");
    assert_eq!(s["state"], "cancelled", "{s}");
    let t = s["trials"].as_array().unwrap();
    assert_eq!(t[0]["state"], "cancelled");
    assert_eq!(t[4]["reason"], "cancelled before it started");
    // Nothing starts afterwards.
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(fs::read_to_string(&log).unwrap().lines().count(), 2);
    let t0 = Instant::now();
    let code = loop {
        if let Some(st) = run.try_wait().unwrap() {
            break st.code();
        }
        assert!(
            t0.elapsed() < Duration::from_secs(30),
            "bridge run never ended"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    assert_eq!(code, Some(130));
    let e = r.fails(&["sweep", "cancel", "s1"]);
    assert!(e.contains("has already ended (cancelled)"), "{e}");
}

const TRACK: &str = r#"import os, sys
import mlflow
lr, depth = float(sys.argv[1]), int(sys.argv[2])
with mlflow.start_run() as run:
    mlflow.log_metric("val_acc", depth / 100 + lr)
    print("RUN", run.info.run_id, flush=True)
"#;

/// With the laptop's MLflow server: the sweep has a parent run and every
/// trial a child run with its parameters, in the experiment the trials log
/// to; the summary's metric comes from the runs.
#[test]
fn a_sweep_opens_a_parent_mlflow_run_with_a_child_per_trial() {
    let wheels = wheelhouse().expect("no wheelhouse: run tests/wheels first (tests/run does)");
    let server = MlflowServer::start();
    let r = Repo::new();
    r.write("track.py", TRACK);
    r.write("requirements.txt", "mlflow-skinny==3.17.2\n");
    r.write(
        "mlflow.toml",
        "name = \"tracked\"\nrun = \"python track.py {lr} {depth}\"\n[python]\nrequirements = \"requirements.txt\"\n\
         [env]\nMLFLOW_EXPERIMENT_NAME = \"sweeps\"\n\
         [sweep]\nreport = \"val_acc\"\nmax_parallel = 3\n[sweep.params]\nlr = [0.1, 0.01]\ndepth = [4, 8, 16]\n",
    );
    let wheels = wheels.display().to_string();
    r.ok_env(
        &["up"],
        &[("PIP_NO_INDEX", "1"), ("PIP_FIND_LINKS", wheels.as_str())],
    );
    let uri = server.uri();
    let o = r.bridge_env(
        &["run", "mlflow.toml"],
        &[("MLFLOW_TRACKING_URI", uri.as_str())],
    );
    let (out, err) = (stdout(&o), stderr(&o));
    assert!(
        o.status.success(),
        "{out}\n{err}\nserver log:\n{}",
        server.log()
    );
    assert!(err.contains("MLflow: parent run"), "{err}");
    let s = status(&r, "s1");
    let parent = s["mlflow"]["run_id"]
        .as_str()
        .unwrap_or_else(|| panic!("{s}"))
        .to_string();
    for t in s["trials"].as_array().unwrap() {
        assert!(t["metric"].is_f64(), "the metric from the run: {t}");
    }
    let got: Value = serde_json::from_str(&server.python(&format!(
        r#"import json
from mlflow.tracking import MlflowClient
c = MlflowClient()
parent = c.get_run("{parent}")
exp = parent.info.experiment_id
kids = c.search_runs([exp], filter_string="tags.mlflow.parentRunId = '{parent}'")
print(json.dumps({{"exp": c.get_experiment(exp).name, "parent_status": parent.info.status,
    "kids": [{{"params": k.data.params, "status": k.info.status, "metrics": k.data.metrics,
               "trial": k.data.tags.get("bridge.trial"), "job": k.data.tags.get("bridge.job_id")}}
              for k in kids]}}))
"#
    )))
    .unwrap();
    assert_eq!(got["exp"], "sweeps", "{got}");
    assert_eq!(got["parent_status"], "FINISHED", "{got}");
    let kids = got["kids"].as_array().unwrap();
    assert_eq!(kids.len(), 6, "{got}");
    let mut pairs = BTreeSet::new();
    for k in kids {
        assert_eq!(k["status"], "FINISHED", "{k}");
        assert!(k["job"].is_string(), "{k}");
        let p = &k["params"];
        pairs.insert((
            p["lr"].as_str().unwrap().to_string(),
            p["depth"].as_str().unwrap().to_string(),
        ));
        assert!(
            k["metrics"]["val_acc"].is_f64(),
            "the trial logged into its child run: {k}"
        );
    }
    assert_eq!(pairs.len(), 6, "each trial's parameters: {pairs:?}");
}

/// Bad input: each refused with its place and what to do, nothing
/// submitted.
#[test]
fn bad_sweeps_are_refused_with_the_line_and_nothing_runs() {
    let r = Repo::new();
    r.write(
        "typo.toml",
        "run = \"python t.py --lr {lrr}\"\n[sweep.params]\nlr = [0.1]\n",
    );
    let e = r.fails(&["run", "typo.toml"]);
    assert!(
        e.contains("typo.toml:1:25: `run` has the placeholder {lrr}"),
        "{e}"
    );
    assert!(e.contains("did you mean {lr}?"), "{e}");
    r.write("empty.toml", "run = \"t {lr}\"\n[sweep.params]\nlr = []\n");
    let e = r.fails(&["run", "empty.toml"]);
    assert!(
        e.contains("empty.toml:3:6: `sweep.params.lr` is an empty list"),
        "{e}"
    );
    r.write(
        "twice.toml",
        "run = \"t {lr}\"\n[sweep.params]\nlr = [1]\nLR = [2]\n",
    );
    let e = r.fails(&["run", "twice.toml"]);
    assert!(
        e.contains("twice.toml:4:1: `sweep.params.LR` names the parameter \"lr\" a second time"),
        "{e}"
    );
    // None of that started bridge.
    assert!(!r.path(".bridge/daemon.sock").exists());

    up(&r, "2", &[]);
    // More GPUs per trial than the agent has: at submit, with the count.
    r.write(
        "big.toml",
        "run = \"true\"\n[sweep]\ngpus_per_trial = 3\n[sweep.params]\na = [1, 2]\n",
    );
    let e = r.fails(&["run", "big.toml"]);
    assert!(
        e.contains("each trial asks for 3 GPU(s) but this agent has 2"),
        "{e}"
    );
    // More than 10,000 trials asks for --yes.
    let many: Vec<String> = (0..101).map(|i| i.to_string()).collect();
    r.write(
        "many.toml",
        format!(
            "run = \"true\"\n[sweep]\nmax_parallel = 1\n[sweep.params]\na = [{}]\nb = [{}]\n",
            many.join(","),
            many[..100].join(",")
        ),
    );
    let e = r.fails(&["run", "many.toml"]);
    assert!(
        e.contains("the sweep makes 10100 trials, more than 10000: add --yes"),
        "{e}"
    );
    let none: Value = serde_json::from_str(&r.ok(&["sweep", "status", "--json"])).unwrap();
    assert_eq!(
        none["sweeps"],
        serde_json::json!([]),
        "nothing was submitted"
    );
    // With --yes it is (and is cancelled here).
    let id = r.ok(&["run", "many.toml", "--yes", "--detach"]);
    assert_eq!(id.trim(), "s1");
    r.ok(&["cancel", "s1"]);
    let s = status(&r, "s1");
    assert_eq!(s["state"], "cancelled");
    assert_eq!(s["trials"].as_array().unwrap().len(), 10100);
    // Unknown sweeps and trials.
    let e = r.fails(&["logs", "s1/20000"]);
    assert!(e.contains("sweep s1 has 10100 trials (0 to 10099)"), "{e}");
    let e = r.fails(&["sweep", "status", "s9"]);
    assert!(e.contains("no sweep s9"), "{e}");
    let e = r.fails(&["logs", "s1/last"]);
    assert!(e.contains("\"s1/last\" is not SWEEP/TRIAL"), "{e}");
}

//! The laptop's MLflow for remote jobs: a real `mlflow server` on this
//! machine's loopback, a job on the SSH provider (agent root elsewhere)
//! logging to it with no change to its code, MLflow's own client reading
//! the run back; the notes given before a job when the server cannot take
//! its artifacts.

use std::fs;
use std::path::Path;
use std::process::Command;

use bridge_tests::mlflow::MlflowServer;
use bridge_tests::sshd::{SshRepo, Sshd, free_port, require_sshd};
use bridge_tests::{Value, wheelhouse};

const TRACK: &str = r#"import os, tempfile
import mlflow

mlflow.set_experiment("bridge-remote")
with mlflow.start_run() as run:
    mlflow.log_param("lr", "0.01")
    mlflow.log_metric("val_acc", 0.93)
    d = tempfile.mkdtemp()
    path = os.path.join(d, "artifact.txt")
    with open(path, "w") as f:
        f.write("artifact of " + run.info.run_id + "\n")
    mlflow.log_artifact(path)
    print("RUN", run.info.run_id, flush=True)
print("tracking", os.environ["MLFLOW_TRACKING_URI"], flush=True)
"#;

fn git(dir: &Path, args: &[&str]) -> String {
    let o = Command::new("git")
        .args(["-c", "user.name=t", "-c", "user.email=t@example.com"])
        .args(args)
        .current_dir(dir)
        .output()
        .unwrap();
    assert!(
        o.status.success(),
        "git {args:?}: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8_lossy(&o.stdout).trim().to_string()
}

/// Every path under `dir`.
fn walk(dir: &Path, out: &mut Vec<std::path::PathBuf>) {
    for e in fs::read_dir(dir).into_iter().flatten().flatten() {
        let p = e.path();
        out.push(p.clone());
        if e.file_type().is_ok_and(|t| t.is_dir()) {
            walk(&p, out);
        }
    }
}

#[test]
fn a_remote_job_logs_to_the_laptops_mlflow_server() {
    require_sshd();
    let wheels = wheelhouse().expect("no wheelhouse: run tests/wheels first (tests/run does)");
    let server = MlflowServer::start();
    let sshd = Sshd::start_with(&format!(
        "SetEnv PIP_NO_INDEX=1 PIP_FIND_LINKS={}\n",
        wheels.display()
    ));
    let s = SshRepo::new(&sshd, true);
    let r = &s.repo;
    r.write("track.py", TRACK);
    r.write("requirements.txt", "mlflow-skinny==3.17.2\n");
    r.write(
        "track.toml",
        "run = \"python track.py\"\n[python]\nrequirements = \"requirements.txt\"\n",
    );
    git(&r.root, &["add", "-A"]);
    git(&r.root, &["commit", "-qm", "first"]);
    let commit = git(&r.root, &["rev-parse", "HEAD"]);
    s.up(sshd.port());
    // The user's shell names the laptop's server; the job's code does not.
    let uri = server.uri();
    let o = r.bridge_env(
        &["run", "track.toml"],
        &[("MLFLOW_TRACKING_URI", uri.as_str())],
    );
    let out = String::from_utf8_lossy(&o.stdout).into_owned();
    let err = String::from_utf8_lossy(&o.stderr).into_owned();
    assert!(
        o.status.success(),
        "{out}\n{err}\nserver log:\n{}",
        server.log()
    );
    assert!(
        err.contains(&format!(
            "MLflow: the job logs to http://127.0.0.1:{} on this machine",
            server.port
        )),
        "{err}"
    );
    assert!(!err.contains("warning"), "{err}");
    let run_id = out
        .lines()
        .find_map(|l| l.strip_prefix("RUN "))
        .unwrap_or_else(|| panic!("{out}"))
        .trim()
        .to_string();
    // The job saw the agent's end of the forward, not the laptop's port.
    let tracking = out
        .lines()
        .find_map(|l| l.strip_prefix("tracking "))
        .unwrap();
    assert!(tracking.starts_with("http://127.0.0.1:"), "{tracking}");

    let got: Value = serde_json::from_str(&server.python(&format!(
        r#"import json
from mlflow.tracking import MlflowClient
c = MlflowClient()
run = c.get_run("{run_id}")
print(json.dumps({{"params": run.data.params, "metrics": run.data.metrics, "tags": run.data.tags,
    "artifacts": [a.path for a in c.list_artifacts("{run_id}")],
    "uri": run.info.artifact_uri}}))
"#
    )))
    .unwrap();
    assert_eq!(got["params"]["lr"], "0.01", "{got}");
    assert_eq!(got["metrics"]["val_acc"], 0.93, "{got}");
    assert_eq!(
        got["artifacts"],
        serde_json::json!(["artifact.txt"]),
        "{got}"
    );
    assert!(
        got["uri"]
            .as_str()
            .unwrap()
            .starts_with("mlflow-artifacts:"),
        "{got}"
    );
    let tags = &got["tags"];
    let jobs = r.ps_json(true);
    assert_eq!(tags["bridge.job_id"], jobs[0]["id"], "{tags}");
    assert_eq!(
        tags["bridge.agent_host"],
        nix::unistd::gethostname()
            .unwrap()
            .to_string_lossy()
            .as_ref(),
        "{tags}"
    );
    assert_eq!(tags["mlflow.source.git.commit"], commit.as_str(), "{tags}");
    assert_eq!(tags["bridge.git_dirty"], "false", "{tags}");

    // The artifact's bytes are in the laptop server's destination...
    let mut here = Vec::new();
    walk(&server.artifacts(), &mut here);
    let art = here
        .iter()
        .find(|p| p.file_name().is_some_and(|n| n == "artifact.txt"))
        .unwrap_or_else(|| {
            panic!(
                "no artifact.txt under {}: {here:?}",
                server.artifacts().display()
            )
        });
    assert_eq!(
        fs::read_to_string(art).unwrap(),
        format!("artifact of {run_id}\n")
    );
    // ...and nothing of the run is under the agent's root.
    let mut there = Vec::new();
    walk(&s.remote, &mut there);
    let leaked: Vec<_> = there
        .iter()
        .filter(|p| {
            let p = p.display().to_string();
            p.contains(&run_id) || p.ends_with("/mlruns") || p.ends_with("/mlartifacts")
        })
        .collect();
    assert!(
        leaked.is_empty(),
        "the run left files on the agent: {leaked:?}"
    );
    // The job's forward went with it.
    assert!(r.forwards_json().is_empty());

    // An experiment whose artifacts live on a path of this machine: said
    // before the job starts, with the fix.
    server.python(
        r#"from mlflow.tracking import MlflowClient
MlflowClient().create_experiment("laptop-files", artifact_location="file:///tmp/laptop-only")
"#,
    );
    r.write(
        "files.toml",
        "run = \"true\"\n[env]\nMLFLOW_EXPERIMENT_NAME = \"laptop-files\"\n",
    );
    let o = r.bridge_env(
        &["run", "files.toml"],
        &[("MLFLOW_TRACKING_URI", uri.as_str())],
    );
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{err}");
    assert!(
        err.contains("bridge: warning: MLflow experiment \"laptop-files\" stores artifacts at file:///tmp/laptop-only"),
        "{err}"
    );
    assert!(err.contains("--artifacts-destination"), "{err}");

    // [mlflow] in the job file names a server that is not running.
    let dead = free_port();
    r.write(
        "dead.toml",
        format!("run = \"true\"\n[mlflow]\ntracking_uri = \"http://127.0.0.1:{dead}\"\n"),
    );
    let o = r.bridge(&["run", "dead.toml"]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{err}");
    assert!(
        err.contains(&format!(
            "warning: the MLflow server at http://127.0.0.1:{dead} does not answer"
        )),
        "{err}"
    );
}

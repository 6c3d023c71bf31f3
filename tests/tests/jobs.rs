//! Jobs end to end: real agents, shims and jobs (shell and Python).

use std::fs;
use std::path::Path;
use std::process::Output;
use std::time::{Duration, Instant};

use bridge_tests::{Repo, Value, alive, eventually, path_with_fake_gpus, wait_pids, wheelhouse};

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// `bridge run FILE --detach`: the job id.
fn submit(r: &Repo, file: &str) -> String {
    r.ok(&["run", file, "--detach"]).trim().to_string()
}

fn jobs(r: &Repo) -> Vec<Value> {
    r.ps_json(true)
}

fn job(r: &Repo, id: &str) -> Value {
    jobs(r)
        .into_iter()
        .find(|j| j["id"] == id)
        .unwrap_or_else(|| panic!("no job {id}"))
}

fn wait_state(r: &Repo, id: &str, state: &str) {
    let ok = eventually(Duration::from_secs(30), || job(r, id)["state"] == state);
    assert!(ok, "job {id} never became {state}: {}", job(r, id));
}

fn up_with_gpus(r: &Repo, n: &str) {
    r.ok_env(
        &["up"],
        &[("PATH", &path_with_fake_gpus()), ("BRIDGE_FAKE_GPUS", n)],
    );
}

#[test]
fn exit_codes_propagate_and_a_missing_command_is_127() {
    let r = Repo::new();
    r.write("a.txt", "x");
    r.up();
    let o = r.bridge(&["exec", "--", "sh", "-c", "echo out; echo err >&2; exit 3"]);
    assert_eq!(o.status.code(), Some(3), "{}", stderr(&o));
    assert_eq!(stdout(&o), "out\n");
    assert!(stderr(&o).contains("err\n"), "{}", stderr(&o));
    assert!(stderr(&o).contains("exit code 3"), "{}", stderr(&o));

    let o = r.bridge(&["exec", "--", "no-such-command-here"]);
    assert_eq!(o.status.code(), Some(127));
    assert!(stderr(&o).contains("not found"), "{}", stderr(&o));

    r.write("ok.toml", "run = \"cat a.txt\"\n");
    let o = r.bridge(&["run", "ok.toml"]);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    assert_eq!(stdout(&o), "x");
    // The job's environment.
    let o = r.ok(&[
        "exec",
        "--",
        "sh",
        "-c",
        "echo $BRIDGE_JOB_ID $BRIDGE_JOB_NAME ${#BRIDGE_GENERATION}",
    ]);
    let f: Vec<&str> = o.split_whitespace().collect();
    assert_eq!(f.len(), 3, "{o}");
    assert_eq!(f[1], "sh");
    assert_eq!(f[2], "64", "BRIDGE_GENERATION is the hex tree root");
}

#[test]
fn bridge_run_starts_the_local_provider_when_nothing_runs() {
    let r = Repo::new();
    r.write("hello.py", "print('hello from the agent')\n");
    r.write("job.toml", "name = \"hi\"\nrun = \"python3 hello.py\"\n");
    let o = r.bridge(&["run", "job.toml"]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(stdout(&o), "hello from the agent\n");
    assert!(r.status()["in_sync"].as_bool().unwrap());
}

/// The agent prepares the next job's snapshot while it is idle (a spare);
/// the job after an edit, a deletion, a removed directory, a new directory
/// and a file turned into a directory sees exactly the submitted tree.
#[test]
fn a_snapshot_prepared_ahead_is_exactly_the_submitted_tree() {
    let r = Repo::new();
    for (p, text) in [
        ("keep.txt", "keep\n"),
        ("edit.txt", "v1\n"),
        ("gone.txt", "gone\n"),
        ("dir/a.txt", "a\n"),
        ("dir/sub/b.txt", "b\n"),
        ("becomes/dir", "file\n"),
    ] {
        r.write(p, text);
    }
    r.write(
        "list.toml",
        "run = \"find . | LC_ALL=C sort; cat edit.txt\"\n",
    );
    let agent_log = || fs::read_to_string(r.path(".bridge/agent.log")).unwrap_or_default();
    let spare_ready = || {
        fs::read_dir(r.path(".bridge/agent/jobs")).is_ok_and(|d| {
            d.flatten()
                .any(|e| e.file_name().to_string_lossy().starts_with(".spare-"))
        })
    };
    r.ok(&["run", "list.toml"]);
    assert!(
        eventually(Duration::from_secs(20), spare_ready),
        "no spare snapshot was prepared after the job"
    );

    r.write("edit.txt", "v2\n");
    r.remove("gone.txt");
    r.remove("dir/sub/b.txt");
    fs::remove_dir(r.path("dir/sub")).unwrap();
    r.write("new/c.txt", "c\n");
    r.remove("becomes/dir");
    r.write("becomes/dir/inside.txt", "inside\n");
    let listed = r.ok(&["run", "list.toml"]);
    assert_eq!(
        listed,
        ".\n./becomes\n./becomes/dir\n./becomes/dir/inside.txt\n./dir\n./dir/a.txt\n\
         ./edit.txt\n./keep.txt\n./list.toml\n./new\n./new/c.txt\nv2\n"
    );
    let log = agent_log();
    let second = log
        .lines()
        .filter(|l| l.contains("job snapshot taken"))
        .nth(1)
        .unwrap_or_else(|| panic!("no second snapshot in the agent's log:\n{log}"));
    assert!(second.contains("from_spare"), "{second}");
    r.assert_mirror_exact();
}

const COUNT: &str = r#"import sys, time
for i in range(1, 200001):
    sys.stdout.write(f"{i}\n")
    if i % 20000 == 0:
        sys.stdout.flush()
        time.sleep(0.25)
"#;

fn numbers() -> String {
    (1..=200_000).map(|i| format!("{i}\n")).collect()
}

#[test]
fn two_hundred_thousand_lines_in_order_across_a_daemon_restart() {
    let r = Repo::new();
    r.write("count.py", COUNT);
    r.write("lines.toml", "run = \"python3 count.py\"\n");
    r.up();
    let mut run = r.spawn(&["run", "lines.toml"], &[], "run.out");
    let out = r.scratch("run.out");
    assert!(
        eventually(Duration::from_secs(20), || fs::metadata(&out)
            .is_ok_and(|m| m.len() > 0)),
        "no output"
    );
    // Kill the daemon mid-stream; `bridge run` reconnects (restarting it)
    // and resumes from its offset.
    let pid: i32 = fs::read_to_string(r.path(".bridge/daemon.pid"))
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    let t = Instant::now();
    let status = loop {
        if let Some(s) = run.try_wait().unwrap() {
            break s;
        }
        assert!(
            t.elapsed() < Duration::from_secs(90),
            "bridge run never ended"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    let err = fs::read_to_string(r.scratch("run.err")).unwrap();
    assert!(status.success(), "{status}: {err}");
    let got = fs::read_to_string(&out).unwrap();
    assert!(
        got == numbers(),
        "lines lost or repeated: {} bytes, expected {}; {err}",
        got.len(),
        numbers().len()
    );
    // The finished job's log replays the same, and the tail works.
    let id = job_id_from(&err);
    assert!(r.ok(&["logs", &id]) == numbers());
    assert_eq!(
        r.ok(&["logs", &id, "--tail", "3"]),
        "199998\n199999\n200000\n"
    );
}

fn job_id_from(stderr: &str) -> String {
    stderr
        .split("job ")
        .nth(1)
        .and_then(|s| s.split_whitespace().next())
        .unwrap_or_else(|| panic!("no job id in {stderr}"))
        .to_string()
}

#[test]
fn a_queued_job_runs_the_code_it_was_submitted_with() {
    let r = Repo::new();
    let release = r.scratch("release");
    r.write("code.txt", "v1\n");
    r.write(
        "hold.toml",
        format!(
            "run = \"while [ ! -e {} ]; do sleep 0.05; done\"\n[resources]\ngpus = 1\n",
            release.display()
        ),
    );
    r.write(
        "show.toml",
        "run = \"cat code.txt\"\n[resources]\ngpus = 1\n",
    );
    up_with_gpus(&r, "1");
    let hold = submit(&r, "hold.toml");
    let show = submit(&r, "show.toml");
    wait_state(&r, &hold, "running");
    assert_eq!(job(&r, &show)["state"], "queued");
    // Edit and sync while the second job waits for the GPU.
    r.write("code.txt", "v2\n");
    r.sync_wait();
    fs::write(&release, "").unwrap();
    assert_eq!(r.ok(&["logs", "-f", &show]), "v1\n");
    wait_state(&r, &show, "succeeded");
    // A job submitted now sees the new code; the CPU-only job runs at once.
    assert_eq!(r.ok(&["exec", "--", "cat", "code.txt"]), "v2\n");
}

#[test]
fn gpus_are_exclusive_and_jobs_queue_in_order() {
    let r = Repo::new();
    let log = r.scratch("gpu.log");
    r.write(
        "gpu.sh",
        format!(
            "echo \"$BRIDGE_JOB_ID start $(date +%s.%N) $CUDA_VISIBLE_DEVICES\" >> {l}\nsleep 1\necho \"$BRIDGE_JOB_ID end $(date +%s.%N)\" >> {l}\n",
            l = log.display()
        ),
    );
    r.write("gpu.toml", "run = \"sh gpu.sh\"\n[resources]\ngpus = 1\n");
    up_with_gpus(&r, "2");
    let st = r.status();
    let gpus = st["gpus"].as_array().unwrap();
    assert_eq!(gpus.len(), 2, "{st}");
    assert_eq!(gpus[0]["name"], "Fake GPU");
    let ids: Vec<String> = (0..3).map(|_| submit(&r, "gpu.toml")).collect();
    for id in &ids {
        wait_state(&r, id, "succeeded");
    }
    let text = fs::read_to_string(&log).unwrap();
    let field = |id: &str, what: &str| -> Vec<String> {
        text.lines()
            .find(|l| l.starts_with(&format!("{id} {what} ")))
            .unwrap_or_else(|| panic!("no {what} for {id} in {text}"))
            .split_whitespace()
            .skip(2)
            .map(str::to_string)
            .collect()
    };
    let t = |id: &str, what: &str| field(id, what)[0].parse::<f64>().unwrap();
    let dev = |id: &str| field(id, "start")[1].clone();
    assert_ne!(dev(&ids[0]), dev(&ids[1]), "two jobs shared a GPU: {text}");
    let first_end = t(&ids[0], "end").min(t(&ids[1], "end"));
    assert!(
        t(&ids[2], "start") >= first_end,
        "the third job did not wait: {text}"
    );
    let freed = if t(&ids[0], "end") <= t(&ids[1], "end") {
        dev(&ids[0])
    } else {
        dev(&ids[1])
    };
    assert_eq!(dev(&ids[2]), freed, "{text}");
    // More GPUs than the agent has: an error at submit time, nothing queued.
    let before = jobs(&r).len();
    let e = r.fails(&["exec", "--gpus", "3", "--", "true"]);
    assert!(
        e.contains("asks for 3 GPU(s)") && e.contains("has 2"),
        "{e}"
    );
    assert_eq!(jobs(&r).len(), before);
}

#[test]
fn cancel_kills_the_whole_job_including_daemonized_grandchildren() {
    let r = Repo::new();
    let pids = r.scratch("pids");
    r.write(
        "spawn.sh",
        format!(
            "sleep 1000 &\necho $! >> {p}\nsetsid sleep 1000 &\necho $! >> {p}\nwait\n",
            p = pids.display()
        ),
    );
    r.write("spawn.toml", "run = \"sh spawn.sh\"\n");
    r.up();
    let id = submit(&r, "spawn.toml");
    let pids = wait_pids(&pids, 2);
    assert!(pids.iter().all(|&p| alive(p)));
    r.ok(&["cancel", &id]);
    assert_eq!(job(&r, &id)["state"], "cancelled");
    assert!(
        eventually(Duration::from_secs(15), || pids.iter().all(|&p| !alive(p))),
        "a child outlived its cancelled job"
    );
    let e = r.fails(&["cancel", &id]);
    assert!(e.contains("already ended"), "{e}");
}

#[test]
fn outputs_arrive_while_the_job_runs_and_completely_at_the_end() {
    let r = Repo::new();
    let release = r.scratch("release");
    r.write(
        "job.sh",
        format!(
            "mkdir -p outputs/sub\necho first > outputs/first.txt\n\
             while [ ! -e {} ]; do sleep 0.05; done\n\
             head -c 3000000 /dev/urandom > outputs/sub/big.bin\necho done > outputs/last.txt\n",
            release.display()
        ),
    );
    r.write(
        "out.toml",
        "run = \"sh job.sh\"\n[outputs]\npaths = [\"outputs/\"]\n",
    );
    r.up();
    let mut run = r.spawn(&["run", "out.toml"], &[], "run.out");
    let first = r.path("outputs/first.txt");
    assert!(
        eventually(Duration::from_secs(20), || fs::read_to_string(&first)
            .is_ok_and(|s| s == "first\n")),
        "outputs/first.txt did not arrive while the job ran"
    );
    assert!(run.try_wait().unwrap().is_none(), "the job ended too early");
    fs::write(&release, "").unwrap();
    let t = Instant::now();
    let status = loop {
        if let Some(s) = run.try_wait().unwrap() {
            break s;
        }
        assert!(t.elapsed() < Duration::from_secs(60));
        std::thread::sleep(Duration::from_millis(20));
    };
    let err = fs::read_to_string(r.scratch("run.err")).unwrap();
    assert!(status.success(), "{err}");
    // Everything is back when `bridge run` returns.
    assert_eq!(
        fs::read_to_string(r.path("outputs/last.txt")).unwrap(),
        "done\n"
    );
    let id = job_id_from(&err);
    let remote = r.path(&format!(".bridge/agent/jobs/{id}/tree/outputs/sub/big.bin"));
    assert_eq!(
        fs::read(r.path("outputs/sub/big.bin")).unwrap(),
        fs::read(remote).unwrap()
    );
    // Outputs are never uploaded again.
    r.sync_wait();
    assert!(
        !r.mirror().join("outputs").exists(),
        "outputs were synced up"
    );
    // `bridge pull` fetches them again.
    fs::remove_file(&first).unwrap();
    let o = r.ok(&["pull", &id]);
    assert!(o.contains("pulled"), "{o}");
    assert_eq!(fs::read_to_string(&first).unwrap(), "first\n");
}

/// A hostile job cannot write outside the repository through what comes
/// home: a symlink planted where the pull writes its temporary file, or one
/// pointing out of the repository, is refused, and the real output still
/// arrives whole.
#[test]
fn outputs_never_write_through_links_out_of_the_repository() {
    let r = Repo::new();
    let victim = r.scratch("victim.txt");
    fs::write(&victim, "precious\n").unwrap();
    r.write(
        "job.sh",
        "mkdir -p outputs/sub\n\
         ln -s ../../victim.txt outputs/.model.bin.bridge-pull\n\
         ln -s ../../../victim.txt outputs/sub/.deep.bin.bridge-pull\n\
         ln -s ../../victim.txt outputs/escape\n\
         ln -s model.bin outputs/inside\n\
         echo hacked > outputs/model.bin\necho deep > outputs/sub/deep.bin\n",
    );
    r.write(
        "out.toml",
        "run = \"sh job.sh\"\n[outputs]\npaths = [\"outputs/\"]\n",
    );
    r.up();
    let o = r.bridge(&["run", "out.toml"]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(fs::read_to_string(&victim).unwrap(), "precious\n");
    let model = r.path("outputs/model.bin");
    assert!(
        !fs::symlink_metadata(&model)
            .unwrap()
            .file_type()
            .is_symlink()
    );
    assert_eq!(fs::read_to_string(&model).unwrap(), "hacked\n");
    assert_eq!(
        fs::read_to_string(r.path("outputs/sub/deep.bin")).unwrap(),
        "deep\n"
    );
    assert!(
        fs::symlink_metadata(r.path("outputs/escape")).is_err(),
        "a link out of the repository came home"
    );
    assert_eq!(
        fs::read_link(r.path("outputs/inside")).unwrap(),
        std::path::Path::new("model.bin"),
        "a link inside the repository comes home"
    );
}

#[test]
fn setup_runs_once_per_hash_and_a_failed_setup_is_not_cached() {
    let r = Repo::new();
    let counter = r.scratch("counter");
    r.write("deps.txt", "a\n");
    let spec = |setup: &str| {
        format!(
            "run = \"echo ran\"\nsetup = \"{setup}\"\nsetup_inputs = [\"deps.txt\"]\n[env]\nCOUNTER = \"{}\"\n",
            counter.display()
        )
    };
    r.write("s.toml", spec("echo setup >> $COUNTER; echo setting up"));
    r.up();
    let o = r.bridge(&["run", "s.toml"]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(stdout(&o), "setting up\nran\n");
    let o = r.bridge(&["run", "s.toml"]);
    assert!(o.status.success());
    assert_eq!(stdout(&o), "ran\n", "setup ran again on a cache hit");
    assert!(stderr(&o).contains("cached"), "{}", stderr(&o));
    assert_eq!(fs::read_to_string(&counter).unwrap().lines().count(), 1);
    // A changed input runs it again.
    r.write("deps.txt", "b\n");
    r.ok(&["run", "s.toml"]);
    assert_eq!(fs::read_to_string(&counter).unwrap().lines().count(), 2);
    // A failing setup fails the job with its output and exit code, uncached.
    r.write("f.toml", spec("echo broken; echo x >> $COUNTER; exit 4"));
    for n in [3, 4] {
        let o = r.bridge(&["run", "f.toml"]);
        assert_eq!(o.status.code(), Some(4), "{}", stderr(&o));
        assert!(stdout(&o).contains("broken"));
        assert!(!stdout(&o).contains("ran"));
        assert_eq!(fs::read_to_string(&counter).unwrap().lines().count(), n);
    }
    let last = jobs(&r).pop().unwrap();
    assert_eq!(last["state"], "failed");
    assert!(last["reason"].as_str().unwrap().contains("setup"), "{last}");
}

#[test]
fn jobs_survive_an_agent_restart_and_a_vanished_one_is_lost() {
    let r = Repo::new();
    let release = r.scratch("release");
    r.write(
        "wait.toml",
        format!(
            "run = \"while [ ! -e {} ]; do sleep 0.05; done; echo finished\"\n",
            release.display()
        ),
    );
    r.up();
    let id = submit(&r, "wait.toml");
    wait_state(&r, &id, "running");
    let doomed = submit(&r, "wait.toml");
    wait_state(&r, &doomed, "running");
    // Kill the agent: the daemon starts a new one, which finds the job
    // still running under its shim.
    let agent = r.agent_pid().unwrap();
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(agent),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    r.sync_wait();
    assert!(r.agent_pid().is_some_and(|p| p != agent && alive(p)));
    assert_eq!(job(&r, &id)["state"], "running");
    // The second job's shim vanishes: lost.
    let shim = shim_pid(&r, &doomed);
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(shim),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    wait_state(&r, &doomed, "lost");
    fs::write(&release, "").unwrap();
    wait_state(&r, &id, "succeeded");
    assert_eq!(r.ok(&["logs", &id]), "finished\n");
}

/// The pid of job `id`'s shim (`bridge-agent shim …/jobs/<id>`).
fn shim_pid(r: &Repo, id: &str) -> i32 {
    let dir = r.path(&format!(".bridge/agent/jobs/{id}"));
    for e in fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        let cmd = fs::read(e.path().join("cmdline")).unwrap_or_default();
        let args: Vec<&[u8]> = cmd.split(|b| *b == 0).collect();
        if args.len() >= 3
            && args[1] == b"shim"
            && Path::new(std::str::from_utf8(args[2]).unwrap_or("")) == dir
        {
            return pid;
        }
    }
    panic!("no shim for job {id}");
}

#[test]
fn bad_job_input_is_a_clear_error_and_changes_nothing() {
    let r = Repo::new();
    r.write("a.txt", "x");
    r.up();
    let e = r.fails(&["run", "missing.toml"]);
    assert!(
        e.contains("missing.toml") && e.contains("no such file"),
        "{e}"
    );
    r.write("bad.toml", "run = \"true\"\nname = \n");
    let e = r.fails(&["run", "bad.toml"]);
    assert!(e.contains("bad.toml:2:"), "{e}");
    r.write("typo.toml", "runn = \"true\"\n");
    let e = r.fails(&["run", "typo.toml"]);
    assert!(e.contains("did you mean `run`"), "{e}");
    let e = r.fails(&["logs", "999"]);
    assert!(e.contains("no job 999"), "{e}");
    let e = r.fails(&["exec", "--gpus", "1", "--", "true"]);
    assert!(e.contains("GPU"), "{e}");
    assert!(jobs(&r).is_empty(), "a bad submit left a job behind");
    let id = r.ok(&["exec", "--detach", "--", "true"]).trim().to_string();
    wait_state(&r, &id, "succeeded");
    let e = r.fails(&["cancel", &id]);
    assert!(e.contains("already ended"), "{e}");
    assert_eq!(job(&r, &id)["state"], "succeeded");
}

#[test]
fn the_quickstart_example_runs_end_to_end() {
    let wheels = wheelhouse().expect("no wheelhouse: run tests/wheels first (tests/run does)");
    let r = Repo::new();
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/quickstart");
    for f in ["train.py", "train.toml", "requirements.txt"] {
        r.write(
            &format!("examples/quickstart/{f}"),
            fs::read(src.join(f)).unwrap(),
        );
    }
    let wheels = wheels.display().to_string();
    let env = [("PIP_NO_INDEX", "1"), ("PIP_FIND_LINKS", wheels.as_str())];
    r.ok_env(&["up"], &env);
    for n in 1..=2 {
        let o = r.bridge(&["run", "examples/quickstart/train.toml"]);
        assert!(
            o.status.success(),
            "run {n}: {}\n{}",
            stderr(&o),
            stdout(&o)
        );
        assert!(stdout(&o).contains("epoch 10/10"), "{}", stdout(&o));
        let q = r.path("examples/quickstart");
        assert!(q.join("outputs/metrics.json").is_file());
        assert!(q.join("outputs/model.pkl").is_file());
        let runs = fs::read_dir(q.join("mlruns/0"))
            .unwrap()
            .flatten()
            .filter(|e| e.path().join("meta.yaml").is_file())
            .count();
        assert_eq!(runs, n, "MLflow runs of {n} jobs in the local mlruns/0");
    }
    // The runs came home from the agent: a local MLflow shows their
    // artifacts (each meta.yaml names this tree, not the agent's), and
    // bridge's tags.
    bridge_tests::mlflow::require_mlflow();
    let mlruns = r.path("examples/quickstart/mlruns").canonicalize().unwrap();
    let got: Value = serde_json::from_str(&bridge_tests::mlflow::run_python(
        r#"import json, sys
from mlflow.tracking import MlflowClient
c = MlflowClient(tracking_uri=sys.argv[1])
runs = c.search_runs(["0"])
print(json.dumps([{"artifacts": [a.path for a in c.list_artifacts(run.info.run_id)],
    "uri": run.info.artifact_uri, "job": run.data.tags.get("bridge.job_id")} for run in runs]))
"#,
        // MLflow 3.17 reads a file store only when asked to.
        &[("MLFLOW_ALLOW_FILE_STORE", "true")],
        None,
        &[&format!("file://{}", mlruns.display())],
    ))
    .unwrap();
    let runs = got.as_array().unwrap();
    assert_eq!(runs.len(), 2, "{got}");
    for run in runs {
        assert_eq!(run["artifacts"], serde_json::json!(["model.pkl"]), "{got}");
        assert!(
            run["uri"]
                .as_str()
                .unwrap()
                .starts_with(&format!("file://{}/0/", mlruns.display())),
            "{got}"
        );
        assert!(run["job"].is_string(), "{got}");
    }
}

#[test]
fn a_job_writing_in_place_corrupts_neither_the_mirror_nor_a_queued_job() {
    let r = Repo::new();
    let release = r.scratch("release");
    r.write("data.txt", "original\n");
    r.write(
        "append.toml",
        format!(
            "run = \"while [ ! -e {} ]; do sleep 0.05; done; echo extra >> data.txt; cat data.txt\"\n[resources]\ngpus = 1\n",
            release.display()
        ),
    );
    r.write(
        "show.toml",
        "run = \"cat data.txt\"\n[resources]\ngpus = 1\n",
    );
    up_with_gpus(&r, "1");
    let writer = submit(&r, "append.toml");
    wait_state(&r, &writer, "running");
    let reader = submit(&r, "show.toml");
    // A follower started before the end sees the note too: the log ends
    // with the job's record, not with its exit file.
    let mut follower = r.spawn(&["logs", "-f", &writer], &[], "follow.out");
    fs::write(&release, "").unwrap();
    wait_state(&r, &writer, "succeeded");
    // The writer saw its own write...
    let log = r.bridge(&["logs", &writer]);
    assert_eq!(stdout(&log), "original\nextra\n");
    assert!(stderr(&log).contains("in place"), "{}", stderr(&log));
    assert!(follower.wait().unwrap().success());
    let followed = fs::read_to_string(r.scratch("follow.err")).unwrap();
    assert!(followed.contains("in place"), "{followed}");
    // ...the queued job sees the tree it was submitted with...
    assert_eq!(r.ok(&["logs", "-f", &reader]), "original\n");
    // ...and the mirror is repaired.
    assert!(
        eventually(Duration::from_secs(20), || {
            fs::read_to_string(r.mirror().join("data.txt")).is_ok_and(|s| s == "original\n")
        }),
        "the mirror kept the job's in-place write"
    );
    r.sync_wait();
    r.assert_mirror_exact();
}

#[test]
fn ctrl_c_detaches_and_overrides_apply() {
    let r = Repo::new();
    let release = r.scratch("release");
    r.write(
        "msg.toml",
        format!(
            "run = \"echo $MSG; while [ ! -e {} ]; do sleep 0.05; done; echo bye\"\n[env]\nMSG = \"from the file\"\n",
            release.display()
        ),
    );
    r.up();
    let mut run = r.spawn(
        &["run", "msg.toml", "--set", "env.MSG=overridden"],
        &[],
        "run.out",
    );
    let out = r.scratch("run.out");
    assert!(eventually(Duration::from_secs(20), || {
        fs::read_to_string(&out).is_ok_and(|s| s == "overridden\n")
    }));
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(run.id() as i32),
        nix::sys::signal::Signal::SIGINT,
    )
    .unwrap();
    let status = run.wait().unwrap();
    let err = fs::read_to_string(r.scratch("run.err")).unwrap();
    assert_eq!(status.code(), Some(130), "{err}");
    assert!(
        err.contains("detached") && err.contains("bridge logs -f"),
        "{err}"
    );
    let id = job_id_from(&err);
    assert_eq!(
        job(&r, &id)["state"],
        "running",
        "Ctrl-C must not stop the job"
    );
    fs::write(&release, "").unwrap();
    assert_eq!(r.ok(&["logs", "-f", &id]), "overridden\nbye\n");
    let e = r.fails(&["run", "msg.toml", "--set", "env=1"]);
    assert!(e.contains("--set env=1"), "{e}");
}

/// Outputs never overwrite a file the user changed locally after the job
/// was submitted: it is kept, the job's version lands beside it, and the
/// result says so. Files the user left alone, and files an earlier pull of
/// the same job wrote, are replaced as before.
#[test]
fn a_local_edit_made_while_the_job_ran_is_kept_and_the_jobs_version_goes_beside_it() {
    let r = Repo::new();
    r.write("outputs/untouched.txt", "before\n");
    r.write("outputs/edited.txt", "before\n");
    let (started, release) = (r.scratch("started"), r.scratch("release"));
    r.write(
        "job.sh",
        format!(
            "mkdir -p outputs\necho one > outputs/twice.txt\ntouch {}\n\
             while [ ! -e {} ]; do sleep 0.05; done\n\
             for f in untouched edited fresh; do echo job > outputs/$f.txt; done\n\
             echo two > outputs/twice.txt\n",
            started.display(),
            release.display()
        ),
    );
    r.write(
        "out.toml",
        "run = \"sh job.sh\"\n[outputs]\npaths = [\"outputs/\"]\n",
    );
    r.up();
    let mut run = r.spawn(&["run", "out.toml"], &[], "run.out");
    assert!(eventually(Duration::from_secs(20), || started.exists()));
    // The first version of twice.txt comes home while the job runs.
    assert!(eventually(Duration::from_secs(20), || {
        fs::read_to_string(r.path("outputs/twice.txt")).is_ok_and(|s| s == "one\n")
    }));
    r.write("outputs/edited.txt", "mine\n");
    fs::write(&release, "").unwrap();
    let status = run.wait().unwrap();
    let err = fs::read_to_string(r.scratch("run.err")).unwrap();
    assert!(status.success(), "{err}");
    let id = job_id_from(&err);
    let read = |p: &str| fs::read_to_string(r.path(p)).unwrap();
    assert_eq!(
        read("outputs/edited.txt"),
        "mine\n",
        "the local edit was overwritten"
    );
    assert_eq!(read(&format!("outputs/edited.job-{id}.txt")), "job\n");
    assert_eq!(read("outputs/untouched.txt"), "job\n");
    assert_eq!(read("outputs/fresh.txt"), "job\n");
    assert_eq!(
        read("outputs/twice.txt"),
        "two\n",
        "an earlier pull's file was kept"
    );
    assert!(
        err.contains(&format!(
            "kept 1 file(s) you changed here since the job was submitted, the job's versions are beside them: outputs/edited.txt → outputs/edited.job-{id}.txt"
        )),
        "{err}"
    );
    // Pulling again keeps it too, and says so.
    let o = r.bridge(&["pull", &id]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(
        stderr(&o).contains("kept your local edit: outputs/edited.txt"),
        "{}",
        stderr(&o)
    );
    assert_eq!(read("outputs/edited.txt"), "mine\n");
}

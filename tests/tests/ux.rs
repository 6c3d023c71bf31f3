use std::collections::BTreeSet;
use std::process::Command;

use bridge_tests::sshd::{SshRepo, Sshd, require_sshd};
use bridge_tests::*;
use serde_json::Value;

fn stderr(o: &std::process::Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn keys(v: &Value) -> BTreeSet<String> {
    v.as_object()
        .unwrap_or_else(|| panic!("not an object: {v}"))
        .keys()
        .cloned()
        .collect()
}

fn set(names: &[&str]) -> BTreeSet<String> {
    names.iter().map(|s| s.to_string()).collect()
}

/// The completion scripts load in a real bash and complete bridge's
/// commands; zsh and fish scripts are generated; the man pages are roff,
/// one per command.
#[test]
fn completions_load_in_bash_and_man_pages_cover_every_command() {
    let r = Repo::new();
    let script = r.scratch("bridge.bash");
    std::fs::write(&script, r.ok(&["completions", "bash"])).unwrap();
    let probe = format!(
        "source {}; complete -p bridge; COMP_WORDS=(bridge s); COMP_CWORD=1; COMP_LINE='bridge s'; COMP_POINT=8; \
         _bridge bridge s bridge 2>/dev/null; printf '%s\\n' \"${{COMPREPLY[@]}}\"",
        script.display()
    );
    let o = Command::new("bash")
        .args(["--norc", "--noprofile", "-c", &probe])
        .output()
        .expect("bash");
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(out.contains("-F _bridge bridge"), "{out}{}", stderr(&o));
    let offered: BTreeSet<&str> = out.lines().skip(1).map(str::trim).collect();
    assert!(
        offered.contains("status") && offered.contains("sync") && offered.contains("sweep"),
        "bridge s<TAB> offers {offered:?}"
    );
    for shell in ["zsh", "fish"] {
        let s = r.ok(&["completions", shell]);
        assert!(s.contains("doctor") && s.contains("gpus"), "{shell}: {s}");
    }
    assert!(
        r.bridge(&["completions", "tcsh"]).status.code() == Some(2),
        "an unknown shell is a usage error"
    );

    let page = r.ok(&["man"]);
    assert!(
        page.starts_with(".ie") || page.contains(".TH bridge"),
        "{page}"
    );
    let dir = r.scratch("man");
    r.ok(&["man", "--out", dir.to_str().unwrap()]);
    let pages: BTreeSet<String> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    for p in [
        "bridge.1",
        "bridge-run.1",
        "bridge-doctor.1",
        "bridge-sweep-status.1",
    ] {
        assert!(pages.contains(p), "{p} missing from {pages:?}");
    }
    if Command::new("man").arg("--version").output().is_ok() {
        let o = Command::new("man")
            .arg("-l")
            .arg(dir.join("bridge-run.1"))
            .env("MANPAGER", "cat")
            .env("MANWIDTH", "100")
            .output()
            .unwrap();
        assert!(String::from_utf8_lossy(&o.stdout).contains("--detach"));
    }
}

/// Every read command's JSON parses, has `schema_version` and the documented
/// fields (docs/json.md); `logs --json` gives one object per line with
/// offsets that resume without loss or repetition.
#[test]
fn json_outputs_have_their_documented_fields() {
    let r = Repo::new();
    r.write(
        "job.sh",
        // Pauses, so that the lines are records of their own (offsets
        // between them), except "three", finished by the next record.
        "echo one\nsleep 0.2\necho two >&2\nsleep 0.2\nprintf 'three'\nsleep 0.3\necho ' and more'\nsleep 0.2\necho four\n",
    );
    let env = [
        ("PATH", path_with_fake_gpus()),
        ("BRIDGE_FAKE_GPUS", "2".into()),
        ("BRIDGE_FAKE_GPU_UTIL", "87,5".into()),
        ("BRIDGE_FAKE_GPU_MEM_USED", "10240,0".into()),
    ];
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    r.ok_env(&["up"], &env);

    let st = r.status();
    for k in [
        "repo",
        "provider",
        "agent_version",
        "mirror_path",
        "connection",
        "generation",
        "local_root",
        "remote_root",
        "in_sync",
        "files",
        "bytes",
        "watcher",
        "gpus",
        "forwards",
        "daemon_pid",
    ] {
        assert!(st.get(k).is_some(), "status --json lacks {k}: {st}");
    }

    // A job holding GPU 0: ps and gpus show its live use.
    let id = r
        .ok_env(
            &["exec", "--gpus", "1", "--detach", "--", "sleep", "30"],
            &env,
        )
        .trim()
        .to_string();
    assert!(eventually(std::time::Duration::from_secs(20), || {
        r.ps_json(false)
            .iter()
            .any(|j| j["id"] == id.as_str() && j["state"] == "running")
    }));
    let ps = r.ps_json(false);
    let j = ps.iter().find(|j| j["id"] == id.as_str()).unwrap();
    assert_eq!(
        keys(j),
        set(&[
            "id",
            "name",
            "state",
            "gpus",
            "gpu_utilization_pct",
            "gpu_memory_used_mib",
            "submitted_ms",
            "started_ms",
            "finished_ms",
            "duration_s",
            "exit_code",
            "reason",
            "generation",
            "outputs_pulled",
            "live",
            "restarts",
            "trial",
            "metrics",
        ])
    );
    assert_eq!(j["gpus"], serde_json::json!([0]), "{j}");
    assert_eq!(j["gpu_utilization_pct"], 87, "{j}");
    assert_eq!(j["gpu_memory_used_mib"], 10240, "{j}");
    let table = r.ok(&["ps"]);
    assert!(
        table.contains("GPU%") && table.contains("87%") && table.contains("10240 MiB"),
        "{table}"
    );

    let g: Value = serde_json::from_str(&r.ok(&["gpus", "--json"])).unwrap();
    assert_eq!(keys(&g), set(&["schema_version", "gpus", "note"]));
    assert_eq!(g["schema_version"], 1);
    let gpus = g["gpus"].as_array().unwrap();
    assert_eq!(gpus.len(), 2, "{g}");
    assert_eq!(
        keys(&gpus[0]),
        set(&[
            "index",
            "name",
            "memory_used_mib",
            "memory_total_mib",
            "utilization_pct",
            "job"
        ])
    );
    assert_eq!(gpus[0]["job"], id.as_str(), "{g}");
    assert_eq!(gpus[1]["job"], Value::Null, "{g}");
    let table = r.ok(&["gpus"]);
    let line0 = table.lines().nth(1).unwrap_or_default();
    assert!(
        line0.contains("Fake GPU") && line0.contains("10240 / 16384 MiB") && line0.ends_with(&id),
        "{table}"
    );
    r.ok(&["cancel", &id]);

    // logs --json: every line once, in order, with its stream; a line
    // written in two pieces is one object.
    let out = r.ok(&["exec", "--", "sh", "job.sh"]);
    assert!(out.contains("four"));
    let jobs = r.ps_json(true);
    let last = jobs
        .iter()
        .map(|j| j["id"].as_str().unwrap().parse::<u64>().unwrap())
        .max()
        .unwrap();
    let last = last.to_string();
    let text = r.ok(&["logs", &last, "--json"]);
    let lines: Vec<Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    for l in &lines {
        assert_eq!(
            keys(l),
            set(&[
                "schema_version",
                "job",
                "stream",
                "time_ns",
                "text",
                "next_offset"
            ]),
            "{l}"
        );
        assert_eq!(l["job"], last.as_str());
    }
    let stream = |ls: &[Value], name: &str| -> Vec<String> {
        ls.iter()
            .filter(|l| l["stream"] == name)
            .map(|l| l["text"].as_str().unwrap().to_string())
            .collect()
    };
    assert_eq!(
        stream(&lines, "stdout"),
        ["one", "three and more", "four"],
        "{text}"
    );
    assert_eq!(stream(&lines, "stderr"), ["two"], "{text}");
    // Resuming from any given offset repeats nothing and misses nothing
    // (how records are batched into chunks may differ between reads, so
    // compare the lines, not their offsets).
    let line = |l: &Value| (l["stream"].clone(), l["text"].clone(), l["time_ns"].clone());
    let mut resumed = 0;
    for (i, l) in lines.iter().enumerate() {
        let Some(at) = l["next_offset"].as_u64() else {
            continue;
        };
        let rest = r.ok(&["logs", &last, "--json", "--offset", &at.to_string()]);
        let rest: Vec<_> = rest
            .lines()
            .map(|l| line(&serde_json::from_str(l).unwrap()))
            .collect();
        let want: Vec<_> = lines[i + 1..].iter().map(line).collect();
        assert_eq!(rest, want, "resumed at {at}");
        resumed += 1;
    }
    assert!(resumed >= 2, "offsets to resume from: {text}");

    let fw = r.forwards_json();
    assert!(fw.is_empty());
    let sw: Value = serde_json::from_str(&r.ok(&["sweep", "status", "--json"])).unwrap();
    assert_eq!(sw["schema_version"], 1);
    let k: Value = serde_json::from_str(&r.ok(&["kernel", "list", "--json"])).unwrap();
    assert_eq!(keys(&k), set(&["schema_version", "kernels"]));
}

/// `-q` silences bridge's notes and keeps the job's output and errors.
#[test]
fn quiet_keeps_only_the_jobs_output() {
    let r = Repo::new();
    let o = r.bridge(&["-q", "exec", "--", "sh", "-c", "echo out; echo err >&2"]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(String::from_utf8_lossy(&o.stdout), "out\n");
    let e = stderr(&o);
    assert!(!e.contains("bridge: "), "notes with -q: {e}");
    assert!(e.contains("err"), "{e}");
    // Without -q the first line names where the job runs.
    let o = r.bridge(&["exec", "--", "true"]);
    let e = stderr(&o);
    assert!(e.contains(") on local agent, no GPU: submitted"), "{e}");
    let o = r.bridge(&["-q", "-v", "ps"]);
    assert_eq!(
        o.status.code(),
        Some(2),
        "-q and -v together are a usage error"
    );
}

/// A committed bridge.toml gives the defaults (gpus, job file); unknown keys
/// and bad values are errors with line and column, and nothing starts.
#[test]
fn the_project_config_gives_defaults_and_rejects_unknown_keys() {
    let r = Repo::new();
    r.write(
        "jobs/hello.toml",
        "run = \"echo hello from the project job\"\n",
    );
    r.write("bridge.toml", "job = \"jobs/hello.toml\"\ngpus = 3\n");
    let env = [
        ("PATH", path_with_fake_gpus()),
        ("BRIDGE_FAKE_GPUS", "2".into()),
    ];
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    // gpus = 3 is checked like --gpu 3.
    let o = r.bridge_env(&["up"], &env);
    assert!(!o.status.success());
    assert!(
        stderr(&o).contains("--gpu 3: the agent has 2 GPU(s)"),
        "{}",
        stderr(&o)
    );
    assert!(
        r.bridge(&["status"]).status.code() != Some(0),
        "up left bridge running"
    );
    // A flag beats the project config.
    r.ok_env(&["up", "--gpu", "2"], &env);
    let out = r.ok_env(&["run"], &env);
    assert!(out.contains("hello from the project job"), "{out}");
    r.ok(&["down"]);

    r.write(
        "bridge.toml",
        "job = \"jobs/hello.toml\"\nhots = \"gpubox\"\n",
    );
    let e = r.fails(&["run"]);
    assert!(
        e.contains("bridge.toml:2:1") && e.contains("unknown field `hots`"),
        "{e}"
    );
    assert!(e.contains("^^^^"), "{e}");
    r.write("bridge.toml", "provider = \"k9s\"\n");
    let e = r.fails(&["up"]);
    assert!(
        e.contains("bridge.toml:1:12") && e.contains("local, ssh, aws"),
        "{e}"
    );
    assert!(
        !r.root.join(".bridge/daemon.sock").exists()
            || r.bridge(&["status"]).status.code() != Some(0)
    );
    std::fs::remove_file(r.path("bridge.toml")).unwrap();
    r.write(
        "pyproject.toml",
        "[project]\nname = \"x\"\n[tool.bridge]\njob = \"jobs/hello.toml\"\n",
    );
    let out = r.ok(&["run"]);
    assert!(out.contains("hello from the project job"), "{out}");
    r.ok(&["down"]);
}

/// After a failed `up` for a remote host, a job command does not run on the
/// laptop instead: it says the last `up` failed and what to do. A plain
/// `bridge up` tries the same host again; `--provider local` is the way to
/// the laptop. Doctor names the failing check with its fix.
#[test]
fn a_failed_remote_up_is_never_replaced_by_the_local_agent() {
    require_sshd();
    let sshd = Sshd::start();
    // The host key is not known: `up` fails.
    let s = SshRepo::new(&sshd, false);
    let o = s.up_with(sshd.port(), &[], &[]);
    assert!(!o.status.success());
    let env = s.env();
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    let o = s
        .repo
        .bridge_env(&["exec", "--", "echo", "on the laptop"], &env);
    assert!(
        !o.status.success(),
        "the job ran: {}",
        String::from_utf8_lossy(&o.stdout)
    );
    let e = stderr(&o);
    assert!(
        e.contains("the last `bridge up` for ssh root@127.0.0.1")
            && e.contains("failed")
            && e.contains("--provider local"),
        "{e}"
    );
    assert!(!String::from_utf8_lossy(&o.stdout).contains("on the laptop"));
    assert!(
        !s.repo.bridge_env(&["status"], &env).status.success(),
        "bridge was started on the laptop"
    );

    // Doctor: the provider check fails with the host-key fix; exit 1.
    let o = s.repo.bridge_env(&["doctor"], &env);
    assert_eq!(
        o.status.code(),
        Some(1),
        "{}",
        String::from_utf8_lossy(&o.stdout)
    );
    let out = String::from_utf8_lossy(&o.stdout);
    let line = out
        .lines()
        .find(|l| l.contains("provider") && l.starts_with("FAIL"))
        .unwrap_or_else(|| panic!("{out}"));
    assert!(line.contains("accept-new-host-key"), "{line}");
    assert!(out.lines().any(|l| l.starts_with("warn  lastup")), "{out}");

    // A plain `up` tries the same host again (and fails the same way).
    let o = s.repo.bridge_env(&["up"], &env);
    assert!(!o.status.success());
    assert!(
        stderr(&o).contains("authenticity of host"),
        "{}",
        stderr(&o)
    );
    // Accepting the key: up, then jobs run there, said on their first line.
    let o = s.up_with(sshd.port(), &["--accept-new-host-key"], &[]);
    assert!(o.status.success(), "{}", stderr(&o));
    let o = s.repo.bridge_env(&["exec", "--", "echo", "remote"], &env);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(
        stderr(&o).contains(&format!("on ssh root@127.0.0.1:{}, no GPU", sshd.port())),
        "{}",
        stderr(&o)
    );
    let o = s.repo.bridge_env(&["doctor"], &env);
    let out = String::from_utf8_lossy(&o.stdout);
    assert_eq!(o.status.code(), Some(0), "{out}");
    assert!(
        out.lines()
            .any(|l| l.starts_with("ok    provider") && l.contains("logged in over SSH")),
        "{out}"
    );
    assert!(out.lines().any(|l| l.starts_with("ok    clock")), "{out}");
}

/// Each doctor check that can be broken here, broken once: no repository, a
/// bad project config, no agent binary, too few GPUs, no Python, a full
/// disk, too few inotify watches.
#[test]
fn doctor_names_each_broken_check_with_its_fix() {
    fn doctor(r: &Repo, cwd: Option<&std::path::Path>, env: &[(&str, &str)]) -> (i32, Value) {
        let mut c = Command::new(bridge_bin());
        if let Some(d) = cwd {
            c.current_dir(d);
        } else {
            c.arg("-C").arg(&r.root);
        }
        let o = c
            .args(["doctor", "--json"])
            .envs(env.iter().copied())
            .output()
            .unwrap();
        let v: Value = serde_json::from_slice(&o.stdout).unwrap_or_else(|e| {
            panic!("{e}: {}{}", String::from_utf8_lossy(&o.stdout), stderr(&o))
        });
        assert_eq!(v["schema_version"], 1);
        (o.status.code().unwrap(), v)
    }
    fn check<'a>(v: &'a Value, name: &str) -> &'a Value {
        v["checks"]
            .as_array()
            .unwrap()
            .iter()
            .find(|c| c["name"] == name)
            .unwrap_or_else(|| panic!("no {name} check: {v}"))
    }
    let r = Repo::new();
    let fake = path_with_fake_gpus();
    let env = [("PATH", fake.as_str())];

    // All well: exit 0, every check there.
    let (code, v) = doctor(&r, None, &env);
    assert_eq!(code, 0, "{v}");
    assert_eq!(v["ok"], true);
    for name in [
        "repo",
        "config",
        "agent",
        "provider",
        "python",
        "gpus",
        "disk",
        "clock",
        "localdisk",
        "watches",
    ] {
        let c = check(&v, name);
        assert_eq!(c["level"], "ok", "{c}");
        assert_eq!(keys(c), set(&["name", "level", "detail", "fix"]));
    }
    assert!(
        check(&v, "gpus")["detail"]
            .as_str()
            .unwrap()
            .contains("2 × Fake GPU"),
        "{v}"
    );

    // Not in a repository.
    let outside = r.scratch("outside");
    std::fs::create_dir_all(&outside).unwrap();
    let (code, v) = doctor(&r, Some(&outside), &env);
    assert_eq!(code, 1);
    assert_eq!(check(&v, "repo")["level"], "fail");
    assert!(
        check(&v, "repo")["fix"]
            .as_str()
            .unwrap()
            .contains("git init")
    );

    // A bad project config.
    r.write("bridge.toml", "gpu = 1\n");
    let (code, v) = doctor(&r, None, &env);
    assert_eq!(code, 1);
    let c = check(&v, "config");
    assert_eq!(c["level"], "fail");
    assert!(
        c["detail"].as_str().unwrap().contains("bridge.toml:1:1"),
        "{c}"
    );

    // More GPUs asked for than there are.
    r.write("bridge.toml", "gpus = 4\n");
    let (code, v) = doctor(&r, None, &env);
    assert_eq!(code, 1);
    assert_eq!(check(&v, "gpus")["level"], "fail", "{v}");
    std::fs::remove_file(r.path("bridge.toml")).unwrap();

    // No agent binary.
    let (code, v) = doctor(
        &r,
        None,
        &[
            ("PATH", fake.as_str()),
            ("BRIDGE_AGENT_BIN", "/nonexistent/bridge-agent"),
        ],
    );
    assert_eq!(code, 1);
    assert_eq!(check(&v, "agent")["level"], "fail");
    assert!(
        check(&v, "agent")["fix"]
            .as_str()
            .unwrap()
            .contains("BRIDGE_AGENT_BIN")
    );

    // No python3 on the agent's machine (here: not on PATH): a warning.
    let bare = r.scratch("bare-bin");
    std::fs::create_dir_all(&bare).unwrap();
    for tool in ["sh", "df", "dirname"] {
        let p = String::from_utf8(
            Command::new("sh")
                .args(["-c", &format!("command -v {tool}")])
                .output()
                .unwrap()
                .stdout,
        )
        .unwrap();
        std::os::unix::fs::symlink(p.trim(), bare.join(tool)).unwrap();
    }
    let (code, v) = doctor(&r, None, &[("PATH", bare.to_str().unwrap())]);
    assert_eq!(code, 0, "a missing python warns, it does not block: {v}");
    assert_eq!(check(&v, "python")["level"], "warn");
    assert!(
        check(&v, "python")["fix"]
            .as_str()
            .unwrap()
            .contains("python3-venv")
    );
    assert_eq!(check(&v, "gpus")["level"], "warn", "no nvidia-smi: {v}");

    // Too few inotify watches (a user namespace's own limit).
    for i in 0..12 {
        r.write(&format!("d{i}/f"), "x");
    }
    let script = format!(
        "echo 5 > /proc/sys/user/max_inotify_watches && PATH={fake} exec {} -C {} doctor --json",
        bridge_bin().display(),
        r.root.display()
    );
    let o = Command::new("unshare")
        .args(["-Ur", "sh", "-c", &script])
        .output()
        .unwrap();
    let v: Value =
        serde_json::from_slice(&o.stdout).unwrap_or_else(|e| panic!("{e}: {}", stderr(&o)));
    let c = check(&v, "watches");
    assert_eq!(c["level"], "warn", "{v}");
    assert!(
        c["fix"].as_str().unwrap().contains("max_user_watches"),
        "{c}"
    );

    // A full disk: the repository on a 2 MiB tmpfs holding 1.5 MiB.
    let script = format!(
        "set -e; d={dir}; mkdir -p $d; mount -t tmpfs -o size=2m tmpfs $d; cd $d; git init -q; \
         head -c 1572864 /dev/urandom > big; set +e; PATH={fake} {bin} doctor --json; echo rc=$?",
        dir = r.scratch("tiny").display(),
        bin = bridge_bin().display()
    );
    let o = Command::new("unshare")
        .args(["-m", "sh", "-c", &script])
        .output()
        .unwrap();
    let out = String::from_utf8_lossy(&o.stdout);
    if o.status.success() || out.contains("rc=") {
        let json = out.rsplit_once("rc=").map(|(j, _)| j).unwrap_or(&out);
        let v: Value =
            serde_json::from_str(json).unwrap_or_else(|e| panic!("{e}: {out}{}", stderr(&o)));
        let c = check(&v, "disk");
        assert_eq!(c["level"], "fail", "{v}");
        assert!(c["detail"].as_str().unwrap().contains("needed"), "{c}");
        assert!(out.contains("rc=1"), "{out}");
    } else {
        panic!(
            "could not mount a tmpfs (tests run as root): {}",
            stderr(&o)
        );
    }
}

/// Doctor reads the agent machine's clock over SSH and warns when it is off:
/// the remote here is this machine, so its sessions get a `date` that runs
/// an hour ahead (sshd's `SetEnv PATH`), standing in for a skewed clock.
#[test]
fn doctor_warns_of_a_skewed_agent_clock() {
    require_sshd();
    let fake = tempfile::tempdir().unwrap();
    let date = fake.path().join("date");
    std::fs::write(
        &date,
        "#!/bin/sh\nnow=$(/bin/date +%s)\necho $((now + 3600))\n",
    )
    .unwrap();
    std::fs::set_permissions(&date, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let sshd = Sshd::start_with(&format!(
        "SetEnv PATH={}:/usr/local/bin:/usr/bin:/bin",
        fake.path().display()
    ));
    let s = SshRepo::new(&sshd, true);
    s.repo.write(
        "bridge.toml",
        format!(
            "provider = \"ssh\"\nhost = \"root@127.0.0.1:{}\"\nremote_dir = \"{}\"\n",
            sshd.port(),
            s.remote.display()
        ),
    );
    let env = s.env();
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    let o = s.repo.bridge_env(&["doctor", "--json"], &env);
    let v: Value = serde_json::from_slice(&o.stdout)
        .unwrap_or_else(|e| panic!("{e}: {}{}", String::from_utf8_lossy(&o.stdout), stderr(&o)));
    let check = |name: &str| {
        v["checks"]
            .as_array()
            .unwrap()
            .iter()
            .find(|c| c["name"] == name)
            .cloned()
            .unwrap_or_else(|| panic!("no {name}: {v}"))
    };
    assert_eq!(check("provider")["level"], "ok", "{v}");
    let clock = check("clock");
    assert_eq!(clock["level"], "warn", "{v}");
    let detail = clock["detail"].as_str().unwrap();
    assert!(
        detail.contains("+3600 s") || detail.contains("+3599 s") || detail.contains("+3601 s"),
        "{clock}"
    );
    assert!(clock["fix"].as_str().unwrap().contains("NTP"), "{clock}");
    // A warning does not block.
    assert_eq!(o.status.code(), Some(0), "{v}");
}

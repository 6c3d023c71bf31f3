use bridge_tests::*;

#[test]
fn commands_outside_a_repository_say_so() {
    let d = tempfile::tempdir().unwrap();
    for cmd in [&["up"][..], &["status"], &["sync", "--wait"], &["down"]] {
        let out = std::process::Command::new(bridge_bin())
            .arg("-C")
            .arg(d.path())
            .args(cmd)
            .output()
            .unwrap();
        assert!(
            !out.status.success(),
            "{cmd:?} succeeded outside a repository"
        );
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            err.contains("not inside a git repository"),
            "{cmd:?}: {err}"
        );
    }
    assert!(
        !d.path().join(".bridge").exists(),
        "state written outside a repository"
    );
}

#[test]
fn up_twice_and_commands_before_up() {
    let r = Repo::new();
    r.write("a", "a");
    let err = r.fails(&["status"]);
    assert!(
        err.contains("bridge is not running") && err.contains("bridge up"),
        "{err}"
    );
    let err = r.fails(&["sync", "--wait"]);
    assert!(err.contains("bridge up"), "{err}");
    r.up();
    let pid = r.status()["daemon_pid"].clone();
    let err = r.fails(&["up"]);
    assert!(err.contains("already up"), "{err}");
    assert_eq!(
        r.status()["daemon_pid"],
        pid,
        "the running daemon was disturbed"
    );
    let agent = r.agent_pid().expect("the agent's pid file");
    let daemon = pid.as_u64().unwrap();
    let out = r.ok(&["down"]);
    assert!(out.contains("bridge is down"), "{out}");
    assert!(!r.path(".bridge/daemon.sock").exists());
    for p in [agent as u64, daemon] {
        let gone = eventually(std::time::Duration::from_secs(5), || {
            // Gone, or a zombie not yet reaped by its parent.
            std::fs::read_to_string(format!("/proc/{p}/stat")).map_or(true, |s| s.contains(") Z "))
        });
        assert!(gone, "process {p} still runs after bridge down");
    }
    let out = r.ok(&["down"]);
    assert!(out.contains("not running"), "{out}");
}

#[test]
fn status_reports_the_contract_fields() {
    let r = Repo::new();
    r.write("a.py", "a");
    r.up();
    let st = r.status();
    for k in [
        "provider",
        "agent_address",
        "mirror_path",
        "generation",
        "local_root",
        "remote_root",
        "in_sync",
        "pending_changes",
        "last_latency_ms",
        "files",
        "bytes",
        "watcher",
        "skipped",
        "connection",
    ] {
        assert!(st.get(k).is_some(), "status lacks {k}: {st}");
    }
    assert!(std::path::Path::new(st["mirror_path"].as_str().unwrap()).is_dir());
    let human = r.ok(&["status"]);
    assert!(
        human.contains("in sync") && human.contains("inotify"),
        "{human}"
    );
    let token = r.path(".bridge/token");
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(
        std::fs::metadata(token).unwrap().permissions().mode() & 0o777,
        0o600
    );
}

#[test]
fn agent_rejects_bad_arguments() {
    let d = tempfile::tempdir().unwrap();
    let token = d.path().join("token");
    std::fs::write(&token, "secret").unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&token, std::fs::Permissions::from_mode(0o644)).unwrap();
    let run = |listen: &str| {
        std::process::Command::new(agent_bin())
            .args(["serve", "--root"])
            .arg(d.path().join("root"))
            .args(["--listen", listen, "--token-file"])
            .arg(&token)
            .output()
            .unwrap()
    };
    let out = run("unix:/tmp/never.sock");
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("chmod 600"),
        "{out:?}"
    );
    std::fs::set_permissions(&token, std::fs::Permissions::from_mode(0o600)).unwrap();
    let out = run("bogus");
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("unix:PATH or tcp:HOST:PORT"),
        "{out:?}"
    );
}

#[test]
fn up_without_an_agent_binary_fails_clearly_and_leaves_nothing_running() {
    let r = Repo::new();
    r.write("a.py", "a");
    let out = r.bridge_env(
        &["up"],
        &[("BRIDGE_AGENT_BIN", "/nonexistent/bridge-agent")],
    );
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("cannot find the agent binary at /nonexistent/bridge-agent")
            && err.contains("BRIDGE_AGENT_BIN"),
        "{err}"
    );
    assert!(
        !err.contains("retrying"),
        "a fatal error was shown as retried: {err}"
    );
    assert!(
        !r.path(".bridge/daemon.sock").exists(),
        "the daemon was left running"
    );
    let err = r.fails(&["status"]);
    assert!(err.contains("not running"), "{err}");
    // Once the binary is there, up works.
    r.up();
    r.assert_mirror_exact();
}

/// The token and `.bridge/` are their owner's alone: opened to others, they
/// are refused with the command that fixes them, and nothing starts.
#[test]
fn a_token_or_state_directory_open_to_others_is_refused() {
    use std::os::unix::fs::PermissionsExt;
    let r = Repo::new();
    r.up();
    r.ok(&["down"]);
    let mode = |p: &str, m: u32| {
        std::fs::set_permissions(r.path(p), std::fs::Permissions::from_mode(m)).unwrap()
    };
    mode(".bridge/token", 0o644);
    let o = r.bridge(&["up"]);
    assert!(!o.status.success());
    let e = String::from_utf8_lossy(&o.stderr).into_owned();
    assert!(e.contains("mode 644") && e.contains("chmod 600"), "{e}");
    assert!(!r.path(".bridge/daemon.sock").exists());
    mode(".bridge/token", 0o600);
    mode(".bridge", 0o755);
    let o = r.bridge(&["up"]);
    assert!(!o.status.success());
    let e = String::from_utf8_lossy(&o.stderr).into_owned();
    assert!(e.contains("chmod 700"), "{e}");
    mode(".bridge", 0o700);
    r.up();
}

/// The agent token never shows: not in any process's arguments or
/// environment (daemon, agent, shim, the job's own), not in what a job can
/// print of its environment, not in `bridge status --json`, not in the logs
/// (at debug level).
#[test]
fn the_token_never_appears_in_arguments_environments_logs_or_status() {
    let r = Repo::new();
    r.write("a.txt", "a");
    r.write("job.toml", "run = \"env; sleep 2\"\n");
    r.ok_env(&["up"], &[("BRIDGE_LOG", "debug")]);
    let token = std::fs::read_to_string(r.path(".bridge/token"))
        .unwrap()
        .trim()
        .to_string();
    assert!(token.len() >= 32, "{token}");
    let mut run = r.spawn(&["run", "job.toml"], &[], "run.out");
    // While the job runs, every process on the machine.
    std::thread::sleep(std::time::Duration::from_millis(1000));
    let mut looked = 0;
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        if e.file_name().to_string_lossy().parse::<u32>().is_err() {
            continue;
        }
        for f in ["cmdline", "environ"] {
            if let Ok(b) = std::fs::read(e.path().join(f)) {
                looked += 1;
                assert!(
                    !String::from_utf8_lossy(&b).contains(&token),
                    "the token is in /proc/{}/{f}",
                    e.file_name().to_string_lossy()
                );
            }
        }
    }
    assert!(looked > 10);
    assert!(run.wait().unwrap().success());
    let printed = std::fs::read_to_string(r.scratch("run.out")).unwrap();
    assert!(printed.contains("BRIDGE_JOB_ID="), "{printed}");
    assert!(
        !printed.contains(&token),
        "the job's environment holds the token"
    );
    assert!(!r.ok(&["status", "--json"]).contains(&token));
    assert!(!r.daemon_log().contains(&token), "daemon.log");
    assert!(!r.agent_log().contains(&token), "agent.log");
}

//! `bridge kernel`: a real ipykernel on the agent, started and driven by
//! jupyter_client's KernelManager through the kernelspec `bridge kernel
//! install` wrote (tests/python/kernel_client.py), exactly as a front end
//! does: on the local provider and over SSH (real OpenSSH on loopback,
//! through a proxy the test cuts).

use std::fs;
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use bridge_tests::proxy::Proxy;
use bridge_tests::sshd::{SshRepo, Sshd, free_port, require_sshd};
use bridge_tests::{Repo, Value, jupyter, wheelhouse};

fn text(o: &Output) -> String {
    format!(
        "{}\n{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// The agent installs ipykernel from the wheelhouse, with no network.
fn pip_env() -> Vec<(&'static str, String)> {
    let wheels = wheelhouse().expect("no wheelhouse: run tests/wheels first (tests/run does)");
    vec![
        ("PIP_NO_INDEX", "1".into()),
        ("PIP_FIND_LINKS", wheels.display().to_string()),
    ]
}

/// A package the notebook imports and the test edits.
fn write_package(r: &Repo) {
    r.write("pkg/__init__.py", "");
    r.write("pkg/mod.py", "def value():\n    return 0\n");
}

/// `bridge kernel install` into a prefix of the test's own; returns the
/// Jupyter path front ends search and the kernel's name.
fn install(r: &Repo, name: &str, extra: &[&str]) -> PathBuf {
    let prefix = r.scratch("jupyter-prefix");
    let mut args = vec![
        "kernel",
        "install",
        "--name",
        name,
        "--prefix",
        prefix.to_str().unwrap(),
    ];
    args.extend_from_slice(extra);
    let out = r.ok(&args);
    let dir = PathBuf::from(out.trim());
    assert_eq!(dir, prefix.join("share/jupyter/kernels").join(name));
    let spec: Value = serde_json::from_slice(&fs::read(dir.join("kernel.json")).unwrap()).unwrap();
    assert_eq!(spec["interrupt_mode"], "signal");
    assert_eq!(spec["metadata"]["debugger"], true);
    assert!(
        spec["argv"][2].as_str().unwrap().contains(
            &bridge_tests::bridge_bin()
                .canonicalize()
                .unwrap()
                .display()
                .to_string()
        ),
        "{spec}"
    );
    prefix.join("share/jupyter")
}

/// The driver, with the kernelspec's directory on JUPYTER_PATH and
/// Jupyter's own files in the test's scratch space.
fn driver(r: &Repo, jupyter_path: &Path, args: &[&str]) -> Command {
    let mut c = Command::new(jupyter::python());
    c.arg(jupyter::driver())
        .args(args)
        .current_dir(&r.root)
        .env("JUPYTER_PATH", jupyter_path)
        .env("JUPYTER_DATA_DIR", r.scratch("jupyter-data"))
        .env("JUPYTER_RUNTIME_DIR", r.scratch("jupyter-runtime"))
        .env("JUPYTER_PLATFORM_DIRS", "1")
        .env("BRIDGE_LOG", "info");
    c
}

fn last_json(o: &Output) -> Value {
    let out = String::from_utf8_lossy(&o.stdout);
    let line = out
        .lines()
        .rev()
        .find(|l| l.starts_with('{'))
        .unwrap_or_else(|| panic!("no report from the driver:\n{}", text(o)));
    serde_json::from_str(line).unwrap()
}

/// Every check of the issue on one kernel's life: values, cwd, stdin, the
/// debugger, autoreload after saves, interrupt, restart, kill -9.
fn check_session(r: &Repo, mirror: &Path, jp: &Path, name: &str) {
    let o = driver(r, jp, &["session", name, r.root.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(
        o.status.success(),
        "driver failed:\n{}\ndaemon log:\n{}",
        text(&o),
        r.daemon_log()
    );
    let rep = last_json(&o);
    assert_eq!(rep["one_plus_one"], "2", "{rep}");
    assert_eq!(
        Path::new(rep["cwd"].as_str().unwrap()),
        mirror,
        "the kernel runs in the mirror: {rep}"
    );
    assert_eq!(rep["input_prompt"], "who? ", "{rep}");
    assert_eq!(rep["input_value"], "'bridge'", "{rep}");
    assert_eq!(rep["debug_initialize"], true, "{rep}");
    assert_eq!(
        rep["autoreload_wrong"],
        serde_json::json!([]),
        "every save was seen by the next cell: {rep}"
    );
    assert_eq!(rep["interrupt_error"], "KeyboardInterrupt", "{rep}");
    assert!(rep["interrupt_s"].as_f64().unwrap() < 2.0, "{rep}");
    assert_eq!(rep["after_interrupt"], "42", "state kept: {rep}");
    assert_ne!(rep["restart_new_pid"], rep["pid"], "{rep}");
    assert!(
        rep["restart_old_gone_s"].is_number(),
        "the old kernel is gone after a restart: {rep}"
    );
    assert!(
        rep["kill9_remote_gone_s"].as_f64().is_some_and(|s| s < 5.0),
        "kill -9 of bridge kernel: the remote kernel is gone within 5 s: {rep}"
    );
    // No kernel left behind.
    let ps = r.ps_json(false);
    let left: Vec<&Value> = ps.iter().filter(|j| j["name"] == "kernel").collect();
    assert!(left.is_empty(), "{ps:?}");
}

#[test]
fn a_notebook_kernel_on_the_local_provider() {
    let r = Repo::new();
    write_package(&r);
    let env = pip_env();
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    r.ok_env(&["up"], &env);
    let jp = install(&r, "bridge-test-local", &[]);
    let listed: Value = serde_json::from_str(&String::from_utf8_lossy(
        &Command::new(bridge_tests::bridge_bin())
            .args(["kernel", "list", "--json"])
            .env("JUPYTER_PATH", &jp)
            .output()
            .unwrap()
            .stdout,
    ))
    .unwrap();
    let k = &listed["kernels"]
        .as_array()
        .unwrap()
        .iter()
        .find(|k| k["name"] == "bridge-test-local")
        .cloned()
        .unwrap_or_else(|| panic!("{listed}"));
    assert_eq!(listed["schema_version"], 1);
    assert_eq!(k["ok"], true, "{k}");
    check_session(&r, &r.mirror(), &jp, "bridge-test-local");

    // jupyter_kernel_test's conformance suite, with the kernel's language info.
    let o = driver(&r, &jp, &["kerneltest", "bridge-test-local"])
        .output()
        .unwrap();
    assert!(o.status.success(), "KernelTests failed:\n{}", text(&o));
    let rep = last_json(&o);
    assert!(rep["ran"].as_u64().unwrap() >= 10, "{rep}");
}

#[test]
fn a_notebook_kernel_over_ssh_survives_link_cuts() {
    require_sshd();
    let wheels = wheelhouse().expect("no wheelhouse: run tests/wheels first (tests/run does)");
    let sshd = Sshd::start_with(&format!(
        "SetEnv PIP_NO_INDEX=1 PIP_FIND_LINKS={}\n",
        wheels.display()
    ));
    let proxy = Proxy::start(sshd.port());
    let s = SshRepo::new(&sshd, true);
    sshd.trust_port(&s.ssh_dir, proxy.port());
    let r = &s.repo;
    write_package(r);
    let o = s.up_with(proxy.port(), &[], &[]);
    assert!(o.status.success(), "{}", text(&o));
    let jp = install(r, "bridge-test-ssh", &["--gpus", "0"]);
    let mirror = r.mirror();
    assert!(mirror.starts_with(&s.remote), "{}", mirror.display());
    check_session(r, &mirror, &jp, "bridge-test-ssh");

    // Link cuts of 10 s, while idle and while a cell runs (it ends during
    // the cut): same kernel, state kept, the result arrives.
    let mut child = driver(r, &jp, &["cut", "bridge-test-ssh"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(fs::File::create(r.scratch("cut.err")).unwrap())
        .spawn()
        .unwrap();
    let mut stdin = child.stdin.take().unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let mut report = None;
    while let Some(Ok(line)) = lines.next() {
        if let Some(what) = line.strip_prefix("CUT ") {
            if what == "idle" {
                let ps = r.ps_json(false);
                assert!(
                    ps.iter()
                        .any(|j| j["name"] == "kernel" && j["state"] == "running"),
                    "the kernel shows in bridge ps: {ps:?}"
                );
            }
            proxy.set_down(true);
            proxy.cut();
            std::thread::sleep(Duration::from_secs(10));
            proxy.set_down(false);
            writeln!(stdin, "healed").unwrap();
            stdin.flush().unwrap();
        } else if line.starts_with('{') {
            report = Some(serde_json::from_str::<Value>(&line).unwrap());
        }
    }
    let st = child.wait().unwrap();
    let err = fs::read_to_string(r.scratch("cut.err")).unwrap_or_default();
    assert!(st.success(), "{err}\ndaemon log:\n{}", r.daemon_log());
    let rep = report.unwrap_or_else(|| panic!("no report:\n{err}"));
    assert_eq!(rep["idle_value"], "42", "{rep}");
    assert_eq!(rep["idle_pid"], rep["pid"], "{rep}");
    assert_eq!(rep["running_value"], "42", "{rep}");
    assert_eq!(rep["running_status"], "ok", "{rep}");
    assert!(
        rep["running_stdout"].as_str().unwrap().contains("done"),
        "{rep}"
    );
    assert_eq!(rep["running_pid"], rep["pid"], "{rep}");
    assert!(rep["shutdown_gone_s"].is_number(), "{rep}");
}

/// A connection file for a kernel started by hand, with free ports.
fn connection_file(r: &Repo, transport: &str) -> PathBuf {
    let f = r.scratch(&format!("conn-{transport}.json"));
    let c = serde_json::json!({
        "transport": transport, "ip": "127.0.0.1", "key": "k", "signature_scheme": "hmac-sha256",
        "shell_port": free_port(), "iopub_port": free_port(), "stdin_port": free_port(),
        "control_port": free_port(), "hb_port": free_port(),
    });
    fs::write(&f, c.to_string()).unwrap();
    f
}

#[test]
fn kernel_bad_input_is_a_clear_error_and_never_a_hang() {
    let r = Repo::new();
    // Neither a subcommand nor a connection file.
    let e = r.fails(&["kernel"]);
    assert!(e.contains("--connection-file"), "{e}");
    // ipc transport is not relayed.
    let f = connection_file(&r, "ipc");
    let e = r.fails(&["kernel", "--connection-file", f.to_str().unwrap()]);
    assert!(e.contains("relay tcp"), "{e}");
    // A job file that does not parse fails at install.
    r.write("bad.toml", "run = [\n");
    let e = r.fails(&[
        "kernel",
        "install",
        "--env",
        "bad.toml",
        "--prefix",
        "/nonexistent",
    ]);
    assert!(e.contains("bad.toml"), "{e}");
    let e = r.fails(&[
        "kernel",
        "uninstall",
        "no-such-kernel",
        "--prefix",
        r.scratch("p").to_str().unwrap(),
    ]);
    assert!(e.contains("no bridge kernel named"), "{e}");

    // A kernelspec whose bridge moved says what fixes it.
    let bin = r.scratch("bin");
    fs::create_dir_all(&bin).unwrap();
    let copy = bin.join("bridge");
    fs::copy(bridge_tests::bridge_bin(), &copy).unwrap();
    let prefix = r.scratch("moved-prefix");
    let o = Command::new(&copy)
        .args([
            "-C",
            r.root.to_str().unwrap(),
            "kernel",
            "install",
            "--name",
            "moved",
            "--prefix",
        ])
        .arg(&prefix)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", text(&o));
    fs::remove_file(&copy).unwrap();
    let spec: Value = serde_json::from_slice(
        &fs::read(prefix.join("share/jupyter/kernels/moved/kernel.json")).unwrap(),
    )
    .unwrap();
    let argv: Vec<String> = spec["argv"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| {
            a.as_str()
                .unwrap()
                .replace("{connection_file}", "/tmp/x.json")
        })
        .collect();
    let o = Command::new(&argv[0]).args(&argv[1..]).output().unwrap();
    assert_eq!(o.status.code(), Some(127), "{}", text(&o));
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("run `bridge kernel install` again"),
        "{}",
        text(&o)
    );
    let listed = String::from_utf8_lossy(
        &Command::new(bridge_tests::bridge_bin())
            .args(["kernel", "list"])
            .env("JUPYTER_PATH", prefix.join("share/jupyter"))
            .output()
            .unwrap()
            .stdout,
    )
    .into_owned();
    assert!(listed.contains("broken"), "{listed}");

    // No ipykernel for the agent's Python and none installable: one line
    // saying what to install, and the kernel process exits non-zero.
    let has_ipykernel = Command::new("python3")
        .args(["-c", "import ipykernel"])
        .status()
        .is_ok_and(|s| s.success());
    if has_ipykernel {
        eprintln!("python3 has ipykernel here: skipping the missing-ipykernel check");
        return;
    }
    let empty = r.scratch("no-wheels");
    fs::create_dir_all(&empty).unwrap();
    r.ok_env(
        &["up"],
        &[
            ("PIP_NO_INDEX", "1"),
            ("PIP_FIND_LINKS", empty.to_str().unwrap()),
        ],
    );
    let f = connection_file(&r, "tcp");
    let t = Instant::now();
    let o = r.bridge(&["kernel", "--connection-file", f.to_str().unwrap()]);
    assert!(t.elapsed() < Duration::from_secs(120));
    assert!(!o.status.success(), "{}", text(&o));
    let e = String::from_utf8_lossy(&o.stderr);
    assert!(
        e.contains("installing ipykernel failed") && e.contains("add ipykernel"),
        "{e}"
    );
    r.ok(&["down"]);
}

/// Processes whose command line contains `needle`.
fn pids_with(needle: &str) -> Vec<i32> {
    fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
        .filter(|pid| {
            fs::read(format!("/proc/{pid}/cmdline"))
                .is_ok_and(|c| String::from_utf8_lossy(&c).contains(needle))
        })
        .collect()
}

fn alive(pid: i32) -> bool {
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), None).is_ok()
        && !fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|s| s.contains(") Z "))
}

/// The daemon dies without a word (kill -9): nobody holds the kernel any
/// more, the agent keeps it for its orphan grace, then stops it.
#[test]
fn an_orphaned_kernel_is_reaped_after_its_grace() {
    let r = Repo::new();
    r.write("a.txt", "a\n");
    let env = pip_env();
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    r.ok_env(&["up"], &env);
    let f = connection_file(&r, "tcp");
    let mut child = r.spawn(
        &[
            "kernel",
            "--connection-file",
            f.to_str().unwrap(),
            "--orphan-grace",
            "3",
        ],
        &[],
        "orphan.out",
    );
    let err = r.scratch("orphan.err");
    assert!(
        bridge_tests::eventually(Duration::from_secs(180), || fs::read_to_string(&err)
            .is_ok_and(|e| e.contains("ready"))),
        "{}\n{}",
        fs::read_to_string(&err).unwrap_or_default(),
        r.daemon_log()
    );
    let jobs = r.path(".bridge/agent/jobs");
    let kernels = pids_with(&format!("{}/", jobs.display()));
    let kernel = *kernels
        .iter()
        .find(|&&p| {
            fs::read(format!("/proc/{p}/cmdline"))
                .is_ok_and(|c| String::from_utf8_lossy(&c).contains("ipykernel_launcher"))
        })
        .unwrap_or_else(|| panic!("no remote kernel process among {kernels:?}"));
    let daemon = r.status()["daemon_pid"].as_i64().unwrap() as i32;
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(daemon),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    let st = child.wait().unwrap();
    assert!(!st.success(), "bridge kernel fails when its daemon is gone");
    let killed = Instant::now();
    std::thread::sleep(Duration::from_secs(1));
    assert!(alive(kernel), "kept while within its grace");
    assert!(
        bridge_tests::eventually(Duration::from_secs(15), || !alive(kernel)),
        "an orphaned kernel is stopped after its grace:\n{}",
        r.agent_log()
    );
    assert!(killed.elapsed() >= Duration::from_secs(3));
    assert!(
        r.agent_log().contains("no daemon came back for the kernel"),
        "{}",
        r.agent_log()
    );
    let _ = r.bridge(&["down"]);
}

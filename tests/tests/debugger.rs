//! `bridge run --debug` and `bridge exec --debug`: the job's Python under a
//! real debugpy (installed on the agent from the wheelhouse), attached to by
//! a client that speaks the Debug Adapter Protocol the way VS Code does,
//! with breakpoints set on the *local* path of a file.

use std::fs;
use std::path::Path;
use std::process::{Child, Command};
use std::time::{Duration, Instant};

use bridge_tests::sshd::{SshRepo, Sshd, free_port, require_sshd};
use bridge_tests::{Repo, Value, wheelhouse};

const PROG: &str =
    "def compute(n):\n    x = n * 6\n    return x\n\n\nprint(\"result\", compute(7), flush=True)\n";

/// The launch configuration `--debug` printed on stderr (the JSON block
/// after "VS Code: …"), waiting for it while the command runs.
fn launch_config(child: &mut Child, err: &Path) -> Value {
    let t = Instant::now();
    loop {
        let text = fs::read_to_string(err).unwrap_or_default();
        if let Some(i) = text.find("\n{") {
            let rest = &text[i + 1..];
            if let Some(end) = rest.find("\n}") {
                return serde_json::from_str(&rest[..end + 2]).expect("launch.json block");
            }
        }
        if let Some(st) = child.try_wait().unwrap() {
            panic!("bridge ended ({st}) without a launch configuration:\n{text}");
        }
        assert!(
            t.elapsed() < Duration::from_secs(120),
            "no launch configuration:\n{text}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Attaches the DAP client with `config`, stops at `file`:`line`, reads
/// `expr`, continues.
fn attach(r: &Repo, config: &Value, file: &Path, line: u32, expr: &str) -> Value {
    let cfg = r.scratch("launch.json");
    fs::write(&cfg, config.to_string()).unwrap();
    let client = Path::new(env!("CARGO_MANIFEST_DIR")).join("python/dap_client.py");
    let o = Command::new("python3")
        .arg(client)
        .arg(&cfg)
        .arg(file)
        .arg(line.to_string())
        .arg(expr)
        .output()
        .unwrap();
    assert!(
        o.status.success(),
        "DAP client failed:\n{}\n{}\ndaemon log:\n{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr),
        r.daemon_log()
    );
    serde_json::from_slice(&o.stdout).unwrap()
}

fn check_session(r: &Repo, config: &Value, debug_port: u16) {
    assert_eq!(config["type"], "debugpy");
    assert_eq!(config["request"], "attach");
    assert_eq!(config["connect"]["port"], debug_port);
    assert_eq!(
        config["pathMappings"][0]["localRoot"],
        r.root.canonicalize().unwrap().display().to_string()
    );
    let remote = config["pathMappings"][0]["remoteRoot"].as_str().unwrap();
    assert!(remote.ends_with("/tree"), "{remote}");
    let local_file = r.root.canonicalize().unwrap().join("pkg/prog.py");
    let got = attach(r, config, &local_file, 3, "x");
    assert_eq!(got["breakpoints"][0]["verified"], true, "{got}");
    assert_eq!(got["stopped_reason"], "breakpoint", "{got}");
    // The stack names the local file: the mapping goes both ways.
    assert_eq!(
        got["frame"]["path"],
        local_file.display().to_string(),
        "{got}"
    );
    assert_eq!(got["frame"]["line"], 3, "{got}");
    assert_eq!(got["value"], "42", "{got}");
}

#[test]
fn run_debug_stops_at_a_breakpoint_set_on_the_local_file() {
    let wheels = wheelhouse().expect("no wheelhouse: run tests/wheels first (tests/run does)");
    let wheels = wheels.display().to_string();
    let r = Repo::new();
    r.write("pkg/prog.py", PROG);
    r.write("debug.toml", "run = \"python3 pkg/prog.py\"\n");
    let env = [("PIP_NO_INDEX", "1"), ("PIP_FIND_LINKS", wheels.as_str())];
    r.ok_env(&["up"], &env);
    let port = free_port();
    let mut child = r.spawn(
        &[
            "run",
            "--debug",
            "--debug-port",
            &port.to_string(),
            "debug.toml",
        ],
        &[],
        "run.out",
    );
    let config = launch_config(&mut child, &r.scratch("run.err"));
    check_session(&r, &config, port);
    let st = child.wait().unwrap();
    let out = fs::read_to_string(r.scratch("run.out")).unwrap();
    let err = fs::read_to_string(r.scratch("run.err")).unwrap();
    assert!(st.success(), "{err}");
    assert_eq!(out, "result 42\n", "{err}");
    assert!(err.contains("installing debugpy"), "{err}");
    assert!(err.contains("waiting for the debugger to attach"), "{err}");
    // The debugger's forward went with the job.
    assert!(r.forwards_json().is_empty());

    // A bad --debug is a usage error.
    let o = r.bridge(&["run", "--debug=gdb", "debug.toml"]);
    assert_eq!(o.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&o.stderr).contains("unknown debugger"));
}

#[test]
fn exec_debug_over_ssh() {
    require_sshd();
    let wheels = wheelhouse().expect("no wheelhouse: run tests/wheels first (tests/run does)");
    let sshd = Sshd::start_with(&format!(
        "SetEnv PIP_NO_INDEX=1 PIP_FIND_LINKS={}\n",
        wheels.display()
    ));
    let s = SshRepo::new(&sshd, true);
    let r = &s.repo;
    r.write("pkg/prog.py", PROG);
    s.up(sshd.port());
    let port = free_port();
    let mut child = r.spawn(
        &[
            "exec",
            "--debug",
            "--debug-port",
            &port.to_string(),
            "--",
            "python3",
            "pkg/prog.py",
        ],
        &[],
        "exec.out",
    );
    let config = launch_config(&mut child, &r.scratch("exec.err"));
    assert!(
        config["pathMappings"][0]["remoteRoot"]
            .as_str()
            .unwrap()
            .starts_with(&s.remote.display().to_string()),
        "{config}"
    );
    check_session(r, &config, port);
    assert!(child.wait().unwrap().success());
    assert_eq!(
        fs::read_to_string(r.scratch("exec.out")).unwrap(),
        "result 42\n"
    );
}

/// `--debug=pycharm:PORT`: PyCharm's debug server listens on the laptop; the
/// job reaches it at `BRIDGE_DEBUG_PORT` on the agent. A plain TCP server
/// stands in for PyCharm (its protocol is pydevd's; bridge only carries it).
#[test]
fn pycharm_debug_server_is_reachable_from_the_job() {
    use std::io::{Read, Write};
    let r = Repo::new();
    r.write("a.txt", "a\n");
    r.up();
    let server = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = server.local_addr().unwrap().port();
    let got = std::thread::spawn(move || {
        let (mut c, _) = server.accept().unwrap();
        let mut hello = [0u8; 5];
        c.read_exact(&mut hello).unwrap();
        c.write_all(b"pong\n").unwrap();
        hello
    });
    let script = "import os, socket\n\
                  s = socket.create_connection(('127.0.0.1', int(os.environ['BRIDGE_DEBUG_PORT'])))\n\
                  s.sendall(b'hello')\n\
                  print('server says', s.makefile().readline().strip())\n";
    r.write("pc.py", script);
    let o = r.bridge(&[
        "exec",
        &format!("--debug=pycharm:{port}"),
        "--",
        "python3",
        "pc.py",
    ]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{err}");
    assert_eq!(
        String::from_utf8_lossy(&o.stdout),
        "server says pong\n",
        "{err}"
    );
    assert_eq!(&got.join().unwrap(), b"hello");
    assert!(err.contains("PyCharm's debug server"), "{err}");
    assert!(err.contains("BRIDGE_DEBUG_PORT"), "{err}");
    // A port is required.
    let o = r.bridge(&["exec", "--debug=pycharm", "--", "true"]);
    assert_eq!(o.status.code(), Some(2));
}

/// A debugger that attaches long before debugpy listens (a slow start: an
/// environment build, a big import) waits for it instead of being reset.
#[test]
fn an_early_debugger_waits_for_a_slow_debuggee() {
    let wheels = wheelhouse().expect("no wheelhouse: run tests/wheels first (tests/run does)");
    let wheels = wheels.display().to_string();
    let r = Repo::new();
    r.write("pkg/prog.py", PROG);
    r.write("slow.toml", "run = \"sleep 8; python3 pkg/prog.py\"\n");
    let env = [("PIP_NO_INDEX", "1"), ("PIP_FIND_LINKS", wheels.as_str())];
    r.ok_env(&["up"], &env);
    let port = free_port();
    let mut child = r.spawn(
        &[
            "run",
            "--debug",
            "--debug-port",
            &port.to_string(),
            "slow.toml",
        ],
        &[],
        "slow.out",
    );
    let config = launch_config(&mut child, &r.scratch("slow.err"));
    check_session(&r, &config, port);
    assert!(child.wait().unwrap().success());
}

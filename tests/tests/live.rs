//! Live mode (`mode = "live"`): a real auto-reloading server (uvicorn
//! `--reload`, installed from the wheelhouse) runs in the live mirror, is
//! reached through its forward, and serves every local save (within seconds).

use std::fs;
use std::net::{Ipv4Addr, TcpStream};
use std::time::{Duration, Instant};

use bridge_tests::net::{http_get, http_get_eventually};
use bridge_tests::sshd::{SshRepo, Sshd, free_port, require_sshd};
use bridge_tests::{Repo, Value, eventually, wheelhouse};

const APP: &str = r#"from message import MESSAGE


async def app(scope, receive, send):
    if scope["type"] != "http":
        return
    await send({"type": "http.response.start", "status": 200,
                "headers": [(b"content-type", b"text/plain")]})
    await send({"type": "http.response.body", "body": MESSAGE.encode()})
"#;

fn jobs(r: &Repo) -> Vec<Value> {
    r.ps_json(true)
}

#[test]
fn a_live_server_reloads_on_a_local_save() {
    let wheels = wheelhouse().expect("no wheelhouse: run tests/wheels first (tests/run does)");
    let wheels = wheels.display().to_string();
    let r = Repo::new();
    let port = free_port();
    let local = free_port();
    r.write("web/app.py", APP);
    r.write("web/message.py", "MESSAGE = \"version 1\"\n");
    r.write("web/requirements.txt", "uvicorn==0.55.0\n");
    r.write(
        "web/serve.toml",
        format!(
            "name = \"web\"\nworkdir = \"web\"\nmode = \"live\"\n\
             run = \"python -m uvicorn app:app --reload --host 127.0.0.1 --port {port}\"\n\
             [python]\nrequirements = \"requirements.txt\"\n\
             [[forward]]\nname = \"API\"\nremote = {port}\nlocal = {local}\n"
        ),
    );
    let env = [("PIP_NO_INDEX", "1"), ("PIP_FIND_LINKS", wheels.as_str())];
    r.ok_env(&["up"], &env);
    let id = r
        .ok(&["run", "--detach", "web/serve.toml"])
        .trim()
        .to_string();
    let (body, _) = http_get_eventually(local, "/", Duration::from_secs(120))
        .unwrap_or_else(|e| panic!("{e}\n{}", r.ok(&["logs", &id])));
    assert_eq!(body, b"version 1");
    let ps = r.ok(&["ps"]);
    assert!(ps.contains("running (live)"), "{ps}");
    let j = &jobs(&r)[0];
    assert_eq!(j["live"], true, "{j}");

    // Save locally: the server reloads and answers with the new code.
    for n in 2..=4 {
        let want = format!("version {n}");
        let saved = Instant::now();
        r.write("web/message.py", format!("MESSAGE = {want:?}\n"));
        let seen = loop {
            if http_get(local, "/", Duration::from_secs(5)).is_ok_and(|b| b == want.as_bytes()) {
                break saved.elapsed();
            }
            assert!(
                saved.elapsed() < Duration::from_secs(30),
                "never served {want}:\n{}",
                r.ok(&["logs", &id])
            );
            std::thread::sleep(Duration::from_millis(20));
        };
        // A liveness check, not a speed target (those are benchmarks):
        // uvicorn's reloader polls, stops the old server and starts a new
        // interpreter, which on a loaded 2-core CI machine took 4.7 s once.
        assert!(
            seen <= Duration::from_secs(15),
            "{want} served {seen:?} after the save"
        );
    }
    // Python's bytecode caches stay out of the mirror (they would be
    // strays there, deleted by the next sync).
    assert!(!r.mirror().join("web/__pycache__").exists());
    r.assert_mirror_exact();

    // Cancel stops it, and its forward closes.
    r.ok(&["cancel", &id]);
    assert!(
        eventually(Duration::from_secs(15), || jobs(&r)[0]["state"]
            == "cancelled"),
        "{:?}",
        jobs(&r)
    );
    assert!(
        eventually(Duration::from_secs(5), || TcpStream::connect((
            Ipv4Addr::LOCALHOST,
            local
        ))
        .is_err()),
        "the live job's forward outlived it"
    );
    assert!(
        eventually(Duration::from_secs(5), || TcpStream::connect((
            Ipv4Addr::LOCALHOST,
            port
        ))
        .is_err()),
        "the server outlived its job"
    );
}

/// Over SSH, whose agent outlives `bridge down` with its batch jobs: a live
/// job does not.
#[test]
fn a_failing_live_command_restarts_with_backoff_and_down_stops_it() {
    require_sshd();
    let sshd = Sshd::start();
    let s = SshRepo::new(&sshd, true);
    let r = &s.repo;
    let count = r.scratch("count");
    // Fails twice, then stays up.
    r.write(
        "flaky.sh",
        format!(
            "n=$(cat {c} 2>/dev/null || echo 0); n=$((n+1)); echo $n > {c}; echo start $n\n\
             [ $n -ge 3 ] || exit 3\nexec sleep 600\n",
            c = count.display()
        ),
    );
    r.write("flaky.toml", "mode = \"live\"\nrun = \"sh flaky.sh\"\n");
    r.write("batch.toml", "run = \"sleep 600\"\n");
    s.up(sshd.port());
    let id = r.ok(&["run", "--detach", "flaky.toml"]).trim().to_string();
    assert!(
        eventually(Duration::from_secs(20), || fs::read_to_string(&count)
            .is_ok_and(|c| c.trim() == "3")),
        "not restarted: {}",
        r.ok(&["logs", &id])
    );
    assert!(eventually(
        Duration::from_secs(5),
        || jobs(r)[0]["restarts"] == 2
    ));
    let ps = r.ok(&["ps"]);
    assert!(ps.contains("running (live, 2x restarted)"), "{ps}");
    let log = r.bridge(&["logs", &id]);
    let err = String::from_utf8_lossy(&log.stderr);
    assert!(
        err.contains("the live command exited with code 3; starting it again in 1 s (restart 1)"),
        "{err}"
    );
    assert!(err.contains("in 2 s (restart 2)"), "{err}");
    // A snapshot job would have refused outputs; a live one says why.
    r.write(
        "bad.toml",
        "mode = \"live\"\nrun = \"true\"\n[outputs]\npaths = [\"out/\"]\n",
    );
    let e = r.fails(&["run", "bad.toml"]);
    assert!(e.contains("mode = \"live\""), "{e}");
    let batch = r.ok(&["run", "--detach", "batch.toml"]).trim().to_string();
    r.ok(&["down"]);
    let jobs_dir = s.remote.join("agent/jobs");
    assert!(
        eventually(Duration::from_secs(15), || jobs_dir
            .join(&id)
            .join("exit.json")
            .exists()),
        "the live job outlived `bridge down`"
    );
    assert!(
        !jobs_dir.join(&batch).join("exit.json").exists(),
        "`bridge down` stopped a batch job on an agent that keeps running"
    );
    s.up(sshd.port());
    r.ok(&["cancel", &batch]);
}

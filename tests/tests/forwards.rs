//! Port forwards (`bridge forward`, a job's `[[forward]]`s) through real
//! daemons and agents, on the local provider and over a real sshd (through
//! a proxy the tests cut), with real HTTP servers at both ends.

use std::fs;
use std::io::Read;
use std::net::{Ipv4Addr, TcpListener, TcpStream};
use std::process::Output;
use std::time::{Duration, Instant};

use bridge_tests::net::{HttpServer, http_get, http_get_eventually, is_loopback, listening};
use bridge_tests::proxy::Proxy;
use bridge_tests::sshd::{SshRepo, Sshd, free_port, require_sshd};
use bridge_tests::{Repo, Value, eventually, random_bytes};

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// `bridge forward --list --json`.
fn forwards(r: &Repo) -> Vec<Value> {
    r.forwards_json()
}

/// A directory of files to serve: a 1 MiB random file and a small one.
fn site(r: &Repo, name: &str) -> (std::path::PathBuf, Vec<u8>) {
    let dir = r.scratch(name);
    fs::create_dir_all(&dir).unwrap();
    let big = random_bytes(1 << 20, 7);
    fs::write(dir.join("big.bin"), &big).unwrap();
    fs::write(dir.join("hello.txt"), format!("hello from {name}\n")).unwrap();
    (dir, big)
}

/// Every socket `pid` listens on is a loopback one.
fn assert_loopback_only(pid: i32, who: &str) -> usize {
    let l = listening(pid);
    let open: Vec<_> = l.iter().filter(|a| !is_loopback(a)).collect();
    assert!(
        open.is_empty(),
        "{who} (pid {pid}) listens beyond loopback: {open:?} (all: {l:?})"
    );
    l.len()
}

#[test]
fn forwards_carry_http_both_ways_and_bad_input_is_clear() {
    let r = Repo::new();
    r.write("a.txt", "a\n");
    r.up();
    // "Agent side" and "laptop side" are one machine with the local
    // provider; the servers stand for both.
    let (agent_site, big) = site(&r, "agent-site");
    let agent_http = HttpServer::start(&agent_site);
    let local = free_port();
    let spec = format!("{local}:{}", agent_http.port);
    let o = r.ok(&["forward", &spec]);
    drop(o);
    assert_eq!(
        http_get(local, "/big.bin", Duration::from_secs(10)).unwrap(),
        big
    );

    // 100 connections at once through one forward, all byte-exact.
    let clients: Vec<_> = (0..100)
        .map(|i| {
            std::thread::spawn(move || {
                let path = if i % 2 == 0 { "/big.bin" } else { "/hello.txt" };
                (i, http_get(local, path, Duration::from_secs(60)))
            })
        })
        .collect();
    for c in clients {
        let (i, got) = c.join().unwrap();
        let got = got.unwrap_or_else(|e| panic!("client {i}: {e}"));
        if i % 2 == 0 {
            assert!(got == big, "client {i}: {} bytes, not the file", got.len());
        } else {
            assert_eq!(got, b"hello from agent-site\n", "client {i}");
        }
    }

    // Reverse: the agent's side reaches a server here.
    let (laptop_site, _) = site(&r, "laptop-site");
    let laptop_http = HttpServer::start(&laptop_site);
    let rev = r.bridge(&["forward", "--reverse", &laptop_http.port.to_string()]);
    assert!(rev.status.success(), "{}", stderr(&rev));
    let list = forwards(&r);
    assert_eq!(list.len(), 2, "{list:?}");
    let reverse = list.iter().find(|f| f["direction"] == "reverse").unwrap();
    assert_eq!(reverse["local_port"], laptop_http.port);
    assert_eq!(reverse["state"], "listening");
    let agent_port = reverse["remote_port"].as_u64().unwrap() as u16;
    // With the local provider the agent shares this loopback: it must not
    // take the target's own port (that would loop).
    assert_ne!(agent_port, laptop_http.port);
    assert_eq!(
        http_get(agent_port, "/hello.txt", Duration::from_secs(10)).unwrap(),
        b"hello from laptop-site\n"
    );
    // `bridge status` lists them too.
    let st = r.status();
    assert_eq!(st["forwards"].as_array().unwrap().len(), 2, "{st}");
    let local_fwd = list.iter().find(|f| f["direction"] == "local").unwrap();
    assert_eq!(local_fwd["local_port"], local);
    assert!(
        local_fwd["connections"].as_u64().unwrap() >= 101,
        "{local_fwd}"
    );
    let text = r.ok(&["status"]);
    assert!(
        text.contains(&format!(
            "http://127.0.0.1:{local} → agent 127.0.0.1:{}",
            agent_http.port
        )),
        "{text}"
    );

    // Only loopback listens, on both processes.
    assert!(assert_loopback_only(r.daemon_pid(), "the daemon") >= 1);
    assert!(assert_loopback_only(r.agent_pid().unwrap(), "the agent") >= 1);

    // Nothing listens on the agent's port: the client's connection closes
    // (no hang) and the forward stays up.
    let dead = free_port();
    let dead_local = free_port();
    r.ok(&["forward", &format!("{dead_local}:{dead}")]);
    let t = Instant::now();
    let e = http_get(dead_local, "/", Duration::from_secs(20)).unwrap_err();
    assert!(
        t.elapsed() < Duration::from_secs(3),
        "took {:?}: {e}",
        t.elapsed()
    );
    assert!(forwards(&r).iter().any(|f| f["local_port"] == dead_local));
    assert!(http_get(local, "/hello.txt", Duration::from_secs(10)).is_ok());

    // A laptop port in use: one line naming it and what to do; nothing added.
    let busy = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).unwrap();
    let busy_port = busy.local_addr().unwrap().port();
    let e = r.fails(&["forward", &format!("{busy_port}:{}", agent_http.port)]);
    assert!(
        e.contains(&format!("local port {busy_port} is already in use")),
        "{e}"
    );
    assert!(e.contains("pick another local port"), "{e}");
    assert_eq!(e.trim().lines().count(), 1, "{e}");
    // The same laptop port twice.
    let e = r.fails(&["forward", &spec]);
    assert!(e.contains("already forwarded by bridge"), "{e}");
    // The agent's own port with the local provider would loop.
    let e = r.fails(&["forward", &agent_http.port.to_string()]);
    assert!(e.contains("local provider"), "{e}");
    assert_eq!(forwards(&r).len(), 3);

    // Usage errors (clap's exit code 2), with what is wrong.
    for bad in ["tb", "70000", "1:2:3", ""] {
        let o = r.bridge(&["forward", bad]);
        assert_eq!(o.status.code(), Some(2), "{bad:?}: {}", stderr(&o));
        assert!(
            stderr(&o).to_lowercase().contains("port"),
            "{bad:?}: {}",
            stderr(&o)
        );
    }

    // --stop closes the listener; the other forwards stay.
    let o = r.ok(&["forward", "--stop", &local.to_string()]);
    drop(o);
    assert!(TcpStream::connect((Ipv4Addr::LOCALHOST, local)).is_err());
    let e = r.fails(&["forward", "--stop", &local.to_string()]);
    assert!(e.contains("no forward on laptop port"), "{e}");
    r.ok(&[
        "forward",
        "--reverse",
        "--stop",
        &laptop_http.port.to_string(),
    ]);
    assert!(
        eventually(Duration::from_secs(5), || TcpStream::connect((
            Ipv4Addr::LOCALHOST,
            agent_port
        ))
        .is_err()),
        "the agent still listens on {agent_port} after --stop"
    );
    assert_eq!(forwards(&r).len(), 1);

    // `bridge down` removes the rest.
    r.ok(&["down"]);
    assert!(TcpStream::connect((Ipv4Addr::LOCALHOST, dead_local)).is_err());
}

#[test]
fn forwards_outlive_a_daemon_restart() {
    let r = Repo::new();
    r.write("a.txt", "a\n");
    r.up();
    let (laptop_site, _) = site(&r, "laptop-site");
    let laptop_http = HttpServer::start(&laptop_site);
    r.ok(&["forward", "--reverse", &laptop_http.port.to_string()]);
    let before = forwards(&r)[0]["remote_port"].as_u64().unwrap() as u16;
    // The daemon dies (not `down`): the next one sets the forward up again,
    // on the agent port it had, which a running job may be using.
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(r.daemon_pid()),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    r.up();
    let (body, _) = http_get_eventually(before, "/hello.txt", Duration::from_secs(10)).unwrap();
    assert_eq!(body, b"hello from laptop-site\n");
    assert_eq!(forwards(&r)[0]["remote_port"], before);
}

/// A job's `[[forward]]`s: up before it starts, printed as URLs, gone when
/// it ends; a reverse one tells the job its agent port.
#[test]
fn a_jobs_forwards_live_as_long_as_the_job() {
    let r = Repo::new();
    let (laptop_site, _) = site(&r, "laptop-site");
    let laptop_http = HttpServer::start(&laptop_site);
    let job_port = free_port();
    let local = free_port();
    let stop = r.scratch("stop");
    // The job serves its tree until told to stop, after fetching a file from
    // the laptop through its reverse forward.
    r.write("served.txt", "served by the job\n");
    r.write(
        "serve.py",
        format!(
            r#"import http.server, os, threading, time, urllib.request
port = int(os.environ["LAPTOP_PORT"])
print("laptop says:", urllib.request.urlopen(f"http://127.0.0.1:{{port}}/hello.txt").read().decode().strip(), flush=True)
srv = http.server.ThreadingHTTPServer(("127.0.0.1", {job_port}), http.server.SimpleHTTPRequestHandler)
threading.Thread(target=srv.serve_forever, daemon=True).start()
print("serving", flush=True)
while not os.path.exists({stop:?}):
    time.sleep(0.05)
"#,
            stop = stop.display().to_string()
        ),
    );
    r.write(
        "serve.toml",
        format!(
            "run = \"python3 serve.py\"\n\
             [[forward]]\nname = \"Job server\"\nremote = {job_port}\nlocal = {local}\n\
             [[forward]]\nport = {lp}\nreverse = true\nenv = \"LAPTOP_PORT\"\n",
            lp = laptop_http.port
        ),
    );
    r.up();
    let child = r.spawn(&["run", "serve.toml"], &[], "run.out");
    let (body, _) = http_get_eventually(local, "/served.txt", Duration::from_secs(30))
        .unwrap_or_else(|e| {
            panic!(
                "{e}\n{}",
                fs::read_to_string(r.scratch("run.err")).unwrap_or_default()
            )
        });
    assert_eq!(body, b"served by the job\n");
    let list = forwards(&r);
    assert_eq!(list.len(), 2, "{list:?}");
    assert!(list.iter().all(|f| f["job"].is_string()), "{list:?}");
    fs::write(&stop, "").unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success());
    let err = fs::read_to_string(r.scratch("run.err")).unwrap();
    assert!(
        err.contains(&format!(
            "bridge: Job server: http://127.0.0.1:{local} (agent port {job_port})"
        )),
        "{err}"
    );
    assert!(
        err.contains(&format!("→ 127.0.0.1:{} here", laptop_http.port)),
        "{err}"
    );
    let log = fs::read_to_string(r.scratch("run.out")).unwrap();
    assert!(log.contains("laptop says: hello from laptop-site"), "{log}");
    // Gone with the job.
    assert!(
        eventually(Duration::from_secs(5), || forwards(&r).is_empty()),
        "{:?}",
        forwards(&r)
    );
    assert!(TcpStream::connect((Ipv4Addr::LOCALHOST, local)).is_err());

    // A job whose forward cannot be set up is not submitted.
    let busy = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).unwrap();
    r.write(
        "busy.toml",
        format!(
            "run = \"true\"\n[[forward]]\nremote = {job_port}\nlocal = {}\n",
            busy.local_addr().unwrap().port()
        ),
    );
    let e = r.fails(&["run", "busy.toml"]);
    assert!(e.contains("already in use"), "{e}");
    let ps = r.ps_json(true);
    assert_eq!(ps.len(), 1, "{ps:?}");
    assert!(forwards(&r).is_empty());
}

/// Over SSH (through a proxy): the same forwards, only loopback on the
/// agent, and healing after a 10 s cut of the link. Local forwards ride an
/// SSH `direct-tcpip` channel of the provider's connection...
#[test]
fn forwards_over_ssh_heal_after_a_cut() {
    forwards_over_ssh(false);
}

/// ...or, as for providers without one, the agent's gRPC tunnel.
#[test]
fn forwards_over_ssh_through_the_agents_tunnel_heal_after_a_cut() {
    forwards_over_ssh(true);
}

fn forwards_over_ssh(tunnel_only: bool) {
    require_sshd();
    let sshd = Sshd::start();
    let proxy = Proxy::start(sshd.port());
    let s = SshRepo::new(&sshd, true);
    sshd.trust_port(&s.ssh_dir, proxy.port());
    let r = &s.repo;
    r.write("a.txt", "a\n");
    let env: &[(&str, &str)] = if tunnel_only {
        &[("BRIDGE_TUNNEL_ONLY", "1")]
    } else {
        &[]
    };
    let o = s.up_with(proxy.port(), &[], env);
    assert!(o.status.success(), "{}", stderr(&o));
    let (agent_site, big) = site(r, "agent-site");
    let agent_http = HttpServer::start(&agent_site);
    let (laptop_site, _) = site(r, "laptop-site");
    let laptop_http = HttpServer::start(&laptop_site);
    let local = free_port();
    r.ok(&["forward", &format!("{local}:{}", agent_http.port)]);
    // Over SSH the agent may take the same port number (another machine in
    // real life); here it is taken by the laptop's server, so it picks one.
    r.ok(&["forward", "--reverse", &laptop_http.port.to_string()]);
    let agent_port = forwards(r)
        .iter()
        .find(|f| f["direction"] == "reverse")
        .unwrap()["remote_port"]
        .as_u64()
        .unwrap() as u16;
    assert_eq!(
        http_get(local, "/big.bin", Duration::from_secs(20)).unwrap(),
        big
    );
    assert_eq!(
        http_get(agent_port, "/hello.txt", Duration::from_secs(10)).unwrap(),
        b"hello from laptop-site\n"
    );
    assert_loopback_only(r.daemon_pid(), "the daemon");
    // The agent serves on a Unix socket: its one TCP listener is the reverse
    // forward's.
    assert_eq!(
        assert_loopback_only(s.agent_pid().unwrap(), "the remote agent"),
        1
    );

    // A connection open across the cut, to a server on the agent's side
    // that never stops sending.
    let trickle = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).unwrap();
    let trickle_port = trickle.local_addr().unwrap().port();
    std::thread::spawn(move || {
        for c in trickle.incoming().flatten() {
            std::thread::spawn(move || {
                let mut c = c;
                while std::io::Write::write_all(&mut c, &[b'x'; 1024]).is_ok() {
                    std::thread::sleep(Duration::from_millis(50));
                }
            });
        }
    });
    let trickle_local = free_port();
    r.ok(&["forward", &format!("{trickle_local}:{trickle_port}")]);
    let mut open = TcpStream::connect((Ipv4Addr::LOCALHOST, trickle_local)).unwrap();
    let mut first = [0u8; 1024];
    open.read_exact(&mut first).unwrap();

    proxy.set_down(true);
    proxy.cut();
    let cut_at = Instant::now();
    // The open connection is closed, not left hanging.
    open.set_read_timeout(Some(Duration::from_secs(25)))
        .unwrap();
    let mut sink = Vec::new();
    let r1 = open.read_to_end(&mut sink);
    assert!(
        r1.as_ref().is_ok()
            || r1
                .as_ref()
                .is_err_and(|e| e.kind() != std::io::ErrorKind::WouldBlock),
        "the connection hung across the cut: {r1:?}"
    );
    assert!(
        cut_at.elapsed() < Duration::from_secs(20),
        "closed after {:?}",
        cut_at.elapsed()
    );
    // A new connection during the cut is closed too, within a few seconds.
    let t = Instant::now();
    assert!(http_get(local, "/hello.txt", Duration::from_secs(30)).is_err());
    assert!(
        t.elapsed() < Duration::from_secs(10),
        "took {:?}",
        t.elapsed()
    );
    // The listeners stay up meanwhile.
    assert!(TcpStream::connect((Ipv4Addr::LOCALHOST, local)).is_ok());
    while cut_at.elapsed() < Duration::from_secs(10) {
        std::thread::sleep(Duration::from_millis(100));
    }
    proxy.set_down(false);
    let healed = Instant::now();
    let (body, at) = http_get_eventually(local, "/hello.txt", Duration::from_secs(10))
        .unwrap_or_else(|e| panic!("no answer after the heal: {e}\n{}", r.daemon_log()));
    assert_eq!(body, b"hello from agent-site\n");
    assert!(
        at - healed <= Duration::from_secs(2),
        "first answer {:?} after the heal",
        at - healed
    );
    let (body, at) =
        http_get_eventually(agent_port, "/hello.txt", Duration::from_secs(10)).unwrap();
    assert_eq!(body, b"hello from laptop-site\n");
    assert!(
        at - healed <= Duration::from_secs(3),
        "reverse: {:?} after the heal",
        at - healed
    );
    assert!(
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(r.daemon_pid()), None).is_ok(),
        "the daemon died"
    );
    assert_eq!(forwards(r).len(), 3);
}

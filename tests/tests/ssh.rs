//! The SSH provider against a real OpenSSH server on 127.0.0.1 (the harness
//! starts a private `sshd` with generated keys), optionally through a TCP
//! proxy the tests cut.

use std::fs;
use std::path::Path;
use std::process::Output;
use std::time::{Duration, Instant};

use bridge_tests::proxy::Proxy;
use bridge_tests::sshd::{SshRepo, Sshd, require_sshd};
use bridge_tests::{alive, eventually, random_bytes};

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

#[test]
fn the_whole_flow_over_ssh_and_the_agent_is_reused() {
    require_sshd();
    let sshd = Sshd::start();
    let s = SshRepo::new(&sshd, true);
    let r = &s.repo;
    r.write("train.py", "print('trained over ssh')\nimport os\nos.makedirs('outputs', exist_ok=True)\nopen('outputs/result.txt','w').write('42\\n')\n");
    r.write(
        "train.toml",
        "run = \"python3 train.py\"\n[outputs]\npaths = [\"outputs/\"]\n",
    );
    r.write("data/big.bin", random_bytes(3_000_000, 7));
    let notes: String = (0..60_000)
        .map(|i| format!("step {i}: loss ok\n"))
        .collect();
    r.write("notes.txt", &notes);
    let o = s.up_with(sshd.port(), &[], &[]);
    assert!(o.status.success(), "{}", stderr(&o));
    // The upload is part of the progress (plain lines: not a terminal).
    assert!(
        stderr(&o).contains("uploading the agent ("),
        "no upload progress: {}",
        stderr(&o)
    );
    let st = r.status();
    // Text is compressed on a link that is not local; random bytes are not.
    let sent = st["bytes_sent"].as_u64().unwrap();
    assert!(
        sent < 3_000_000 + notes.len() as u64 / 3,
        "{sent} bytes sent for 3 MB of random bytes and {} of text",
        notes.len()
    );
    assert_eq!(st["provider"], "ssh");
    assert_eq!(st["connection"], "connected");
    assert!(
        st["mirror_path"]
            .as_str()
            .unwrap()
            .starts_with(s.remote.to_str().unwrap())
    );
    r.assert_mirror_exact();
    // Live edits.
    r.write("train.py", "print('edited over ssh')\n");
    r.wait_mirror("the edit", |m| {
        fs::read_to_string(m.join("train.py")).is_ok_and(|t| t.contains("edited"))
    });
    r.write("train.py", "print('trained over ssh')\nimport os\nos.makedirs('outputs', exist_ok=True)\nopen('outputs/result.txt','w').write('42\\n')\n");
    // A job: logs and outputs come back.
    let o = r.bridge(&["run", "train.toml"]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(String::from_utf8_lossy(&o.stdout), "trained over ssh\n");
    assert_eq!(
        fs::read_to_string(r.path("outputs/result.txt")).unwrap(),
        "42\n"
    );
    let id = r.ok(&["ps", "--all", "--json"]);
    assert!(id.contains("succeeded"), "{id}");
    // `down` leaves the remote agent running; the next `up` reuses it.
    let agent = s.agent_pid().expect("remote agent pid");
    r.ok(&["down"]);
    assert!(alive(agent), "plain `down` stopped the remote agent");
    s.up(sshd.port());
    assert_eq!(s.agent_pid(), Some(agent), "the agent was not reused");
    assert!(
        r.ok(&["logs", "1"]).contains("trained over ssh"),
        "the job's log survived"
    );
    // `down --remote` stops it.
    r.ok(&["down", "--remote"]);
    assert!(eventually(Duration::from_secs(10), || !alive(agent)));
}

#[test]
fn a_different_agent_binary_is_uploaded_and_replaces_the_running_one() {
    require_sshd();
    let sshd = Sshd::start();
    let s = SshRepo::new(&sshd, true);
    s.repo.write("a.txt", "a");
    s.up(sshd.port());
    let first = s.agent_pid().unwrap();
    let bins = |dir: &Path| -> Vec<String> {
        fs::read_dir(dir.join("bin"))
            .map(|d| {
                d.flatten()
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .collect()
            })
            .unwrap_or_default()
    };
    assert_eq!(bins(&s.remote).len(), 1, "{:?}", bins(&s.remote));
    s.repo.ok(&["down"]);
    // The same program with other bytes (ELF ignores trailing data): a new version.
    let other = s.repo.scratch("bridge-agent");
    let mut bytes = fs::read(bridge_tests::agent_bin()).unwrap();
    bytes.extend_from_slice(b"another build");
    fs::write(&other, bytes).unwrap();
    fs::set_permissions(&other, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let o = s.up_with(
        sshd.port(),
        &[],
        &[("BRIDGE_AGENT_BIN", other.to_str().unwrap())],
    );
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(bins(&s.remote).len(), 2, "{:?}", bins(&s.remote));
    let second = s.agent_pid().unwrap();
    assert_ne!(first, second);
    assert!(!alive(first), "the old agent still runs");
    s.repo.assert_mirror_exact();
}

#[test]
fn host_keys_are_checked() {
    require_sshd();
    let mut sshd = Sshd::start();
    let s = SshRepo::new(&sshd, false);
    s.repo.write("a.txt", "a");
    // Unknown host: refused with its fingerprint, nothing installed.
    let o = s.up_with(sshd.port(), &[], &[]);
    assert!(!o.status.success());
    let e = stderr(&o);
    assert!(
        e.contains("SHA256:") && e.contains("--accept-new-host-key"),
        "{e}"
    );
    assert!(
        !s.remote.exists(),
        "something was installed for an unknown host"
    );
    assert!(!s.repo.path(".bridge/daemon.sock").exists());
    // Accepted once: recorded in bridge's own file (never ~/.ssh/known_hosts).
    let o = s.up_with(sshd.port(), &["--accept-new-host-key"], &[]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(
        fs::read_to_string(&s.known_hosts)
            .unwrap()
            .contains("ssh-ed25519")
    );
    assert!(!s.ssh_dir.join("known_hosts").exists());
    s.repo.ok(&["down"]);
    // A changed key is always refused, loudly, even with the flag.
    sshd.rotate_host_key();
    for extra in [&[][..], &["--accept-new-host-key"][..]] {
        let o = s.up_with(sshd.port(), extra, &[]);
        assert!(!o.status.success());
        let e = stderr(&o);
        assert!(e.contains("changed"), "{e}");
    }
}

#[test]
fn bad_ssh_input_is_a_clear_error() {
    require_sshd();
    let sshd = Sshd::start();
    let s = SshRepo::new(&sshd, true);
    s.repo.write("a.txt", "a");
    let run = |args: &[&str], env: &[(&str, &str)]| -> String {
        let mut e = s.env();
        e.extend(env.iter().map(|(k, v)| (k.to_string(), v.to_string())));
        let e: Vec<(&str, &str)> = e.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        let t = Instant::now();
        let o = s.repo.bridge_env(args, &e);
        eprintln!("{args:?}: {}", String::from_utf8_lossy(&o.stderr).trim());
        assert!(!o.status.success(), "{args:?} succeeded");
        assert!(
            t.elapsed() < Duration::from_secs(60),
            "{args:?} took {:?}",
            t.elapsed()
        );
        assert!(
            !s.repo.path(".bridge/daemon.sock").exists(),
            "{args:?} left a daemon"
        );
        stderr(&o)
    };
    let remote = s.remote.display().to_string();
    // Unknown host name, resolved in a network namespace of its own with no
    // network, so the lookup never leaves this machine.
    let o = std::process::Command::new("unshare")
        .arg("-n")
        .arg(bridge_tests::bridge_bin())
        .arg("-C")
        .arg(&s.repo.root)
        .args([
            "up",
            "--host",
            "no-such-host.invalid",
            "--remote-dir",
            &remote,
        ])
        .envs(s.env())
        .output()
        .expect("unshare");
    assert!(!o.status.success());
    let e = stderr(&o);
    assert!(e.contains("no-such-host.invalid"), "{e}");
    assert!(!s.repo.path(".bridge/daemon.sock").exists());
    // Nothing listening.
    let closed = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let e = run(
        &[
            "up",
            "--host",
            &format!("root@127.0.0.1:{closed}"),
            "--remote-dir",
            &remote,
        ],
        &[],
    );
    assert!(e.to_lowercase().contains("refused"), "{e}");
    // A key the server does not accept.
    let wrong = s.repo.scratch("wrong-ssh");
    fs::create_dir_all(&wrong).unwrap();
    fs::copy(s.ssh_dir.join("known_hosts"), wrong.join("known_hosts")).unwrap();
    let ok = std::process::Command::new("ssh-keygen")
        .args(["-q", "-t", "ed25519", "-N", "", "-f"])
        .arg(wrong.join("id_ed25519"))
        .status()
        .unwrap()
        .success();
    assert!(ok);
    let port = format!("root@127.0.0.1:{}", sshd.port());
    let e = run(
        &["up", "--host", &port, "--remote-dir", &remote],
        &[("BRIDGE_SSH_DIR", wrong.to_str().unwrap())],
    );
    assert!(e.to_lowercase().contains("key"), "{e}");
    // A remote directory that cannot be written.
    let e = run(
        &[
            "up",
            "--host",
            &port,
            "--remote-dir",
            "/proc/bridge-cannot-write",
        ],
        &[],
    );
    assert!(e.contains("/proc/bridge-cannot-write"), "{e}");
    // Nothing was installed by any of them.
    assert!(!s.remote.exists());
    // More GPUs than the agent has.
    let o = s.up_with(sshd.port(), &["--gpu", "1"], &[]);
    assert!(!o.status.success());
    assert!(stderr(&o).contains("--gpu 1"), "{}", stderr(&o));
    assert!(!s.repo.path(".bridge/daemon.sock").exists());
}

const NUMBERED: &str = r#"import sys, time
for i in range(1, 3001):
    print(i, flush=True)
    time.sleep(0.002)
"#;

/// A repository whose SSH provider reaches `sshd` through a proxy the test
/// cuts (the host key known under the proxy's port).
fn through_a_proxy(sshd: &Sshd) -> (SshRepo, Proxy) {
    let proxy = Proxy::start(sshd.port());
    let s = SshRepo::new(sshd, false);
    fs::write(
        s.ssh_dir.join("known_hosts"),
        format!(
            "[127.0.0.1]:{} {}\n",
            proxy.port(),
            sshd.host_key_pub().trim()
        ),
    )
    .unwrap();
    (s, proxy)
}

#[test]
fn the_session_heals_after_twenty_link_cuts() {
    require_sshd();
    let sshd = Sshd::start();
    let (s, proxy) = through_a_proxy(&sshd);
    let r = &s.repo;
    let mut payload = 0u64;
    for i in 0..40 {
        let b = random_bytes(200_000 + i * 10_000, i as u64);
        payload += b.len() as u64;
        r.write(&format!("data/f{i:02}.bin"), b);
    }
    r.write("count.py", NUMBERED);
    r.write("count.toml", "run = \"python3 count.py\"\n");
    let mut cuts = 0;
    // 1. Cuts during the initial sync.
    let up_args = s.up_args(proxy.port());
    let up_args: Vec<&str> = up_args.iter().map(String::as_str).collect();
    let env = s.env();
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    let agent_size = fs::metadata(bridge_tests::agent_bin()).unwrap().len();
    let mut up = r.spawn(&up_args, &env, "up.out");
    let t = Instant::now();
    while up.try_wait().unwrap().is_none() {
        assert!(
            t.elapsed() < Duration::from_secs(120),
            "up never finished: {}\ndaemon log:\n{}",
            fs::read_to_string(r.scratch("up.err")).unwrap_or_default(),
            r.daemon_log()
        );
        // After the agent's upload (a first `up` that keeps failing before
        // it ever connected gives up), during the initial sync.
        if cuts < 6 && proxy.bytes().0 > agent_size + (cuts as u64 + 1) * 1_000_000 {
            proxy.cut();
            cuts += 1;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    assert!(
        up.wait().unwrap().success(),
        "{}",
        fs::read_to_string(r.scratch("up.err")).unwrap()
    );
    r.sync_wait();
    r.assert_mirror_exact();
    // 2. Cuts during a stream of edits.
    for i in 0..30 {
        r.write(&format!("src/edit{}.txt", i % 7), format!("edit {i}\n"));
        if i % 5 == 2 {
            proxy.cut();
            cuts += 1;
        }
        std::thread::sleep(Duration::from_millis(30));
    }
    // 3. Cuts while a job prints numbered lines.
    let mut run = r.spawn(&["run", "count.toml"], &[], "run.out");
    let out = r.scratch("run.out");
    while cuts < 20 {
        std::thread::sleep(Duration::from_millis(300));
        if run.try_wait().unwrap().is_some() {
            break;
        }
        if fs::metadata(&out).is_ok_and(|m| m.len() > 0) {
            proxy.cut();
            cuts += 1;
        }
    }
    let t = Instant::now();
    let status = loop {
        if let Some(st) = run.try_wait().unwrap() {
            break st;
        }
        assert!(
            t.elapsed() < Duration::from_secs(120),
            "bridge run never ended"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    let err = fs::read_to_string(r.scratch("run.err")).unwrap();
    assert!(status.success(), "{err}");
    assert!(cuts >= 14, "only {cuts} cuts happened");
    let expected: String = (1..=3000).map(|i| format!("{i}\n")).collect();
    assert!(
        fs::read_to_string(&out).unwrap() == expected,
        "lines lost or repeated; {err}"
    );
    let jobs = r.ok(&["ps", "--all", "--json"]);
    assert!(
        jobs.contains("succeeded"),
        "the job was interrupted: {jobs}"
    );
    // The mirror is exact, and little was sent twice.
    r.sync_wait();
    r.assert_mirror_exact();
    // What crossed the link (the proxy's count) beyond the agent's upload and
    // the payload: SSH and gRPC framing, plans, edits, logs, and what was in
    // flight at each cut and had to be sent again.
    let st = r.status();
    let sent = st["bytes_sent"].as_u64().unwrap();
    let crossed = proxy.bytes().0;
    let extra = crossed.saturating_sub(agent_size + payload);
    eprintln!(
        "cuts {cuts}, payload {payload} B, agent {agent_size} B, crossed {crossed} B, extra {extra} B, daemon sent {sent} B"
    );
    assert!(
        extra <= payload / 20 + cuts as u64 * 1024 * 1024,
        "{extra} bytes beyond the payload over {cuts} cuts (payload {payload}, crossed {crossed})"
    );
}

/// Fault suite: 20 link cuts while a job prints a million lines and writes
/// outputs as it goes. Not a line is lost or repeated, the job is not
/// interrupted, and every output comes home byte-exact.
#[test]
fn twenty_cuts_during_a_million_lines_and_outputs_lose_nothing() {
    require_sshd();
    let sshd = Sshd::start();
    let (s, proxy) = through_a_proxy(&sshd);
    let r = &s.repo;
    r.write(
        "million.py",
        r#"import os, sys, time
os.makedirs("outputs", exist_ok=True)
out = sys.stdout
for block in range(1000):
    out.write("".join(f"{i}\n" for i in range(block * 1000 + 1, block * 1000 + 1001)))
    out.flush()
    if block % 100 == 99:
        n = block // 100
        with open(f"outputs/part{n}.bin", "wb") as f:
            f.write(bytes((n * 7 + k) % 251 for k in range(300_000)))
    time.sleep(0.008)
"#,
    );
    r.write(
        "million.toml",
        "run = \"python3 million.py\"\n[outputs]\npaths = [\"outputs/\"]\n",
    );
    let up_args = s.up_args(proxy.port());
    let up_args: Vec<&str> = up_args.iter().map(String::as_str).collect();
    let env = s.env();
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    r.ok_env(&up_args, &env);
    let mut run = r.spawn(&["run", "million.toml"], &[], "run.out");
    let out = r.scratch("run.out");
    let mut cuts = 0;
    let t = Instant::now();
    let status = loop {
        if let Some(st) = run.try_wait().unwrap() {
            break st;
        }
        assert!(
            t.elapsed() < Duration::from_secs(300),
            "bridge run never ended"
        );
        std::thread::sleep(Duration::from_millis(250));
        if cuts < 20 && fs::metadata(&out).is_ok_and(|m| m.len() > 0) {
            proxy.cut();
            cuts += 1;
        }
    };
    let err = fs::read_to_string(r.scratch("run.err")).unwrap();
    assert!(status.success(), "{err}");
    assert!(cuts >= 15, "only {cuts} cuts happened during the job");
    let got = fs::read(&out).unwrap();
    let want: String = (1..=1_000_000).map(|i| format!("{i}\n")).collect();
    assert!(
        got == want.as_bytes(),
        "lines lost or repeated: {} bytes, expected {}; {err}",
        got.len(),
        want.len()
    );
    let jobs = r.ps_json(true);
    let job = &jobs[0];
    assert_eq!(job["state"], "succeeded", "{job}");
    for n in 0..10usize {
        let name = format!("outputs/part{n}.bin");
        let want: Vec<u8> = (0..300_000).map(|k| ((n * 7 + k) % 251) as u8).collect();
        assert!(
            fs::read(r.path(&name)).ok() == Some(want),
            "{name} did not come home byte-exact"
        );
    }
    eprintln!("{cuts} cuts during a million lines in {:?}", t.elapsed());
}

/// Fault suite: the agent's clock hours ahead of the laptop's, then hours
/// behind (libfaketime in every session of the agent's sshd, by its
/// `SetEnv`; file times stay the kernel's). Sync, a rewrite of the same size
/// in the same second, jobs, their logs and outputs work as with one clock,
/// and a local edit made while a job ran is still told from a file nobody
/// touched (the laptop keeps its own submission time).
#[test]
fn an_agent_clock_hours_ahead_or_behind_changes_nothing() {
    require_sshd();
    let lib = "/usr/lib/x86_64-linux-gnu/faketime/libfaketime.so.1";
    assert!(
        Path::new(lib).exists(),
        "{lib} is missing (tests/run installs libfaketime)"
    );
    for (skew, secs) in [("+5h", 5 * 3600i64), ("-5h", -5 * 3600)] {
        let sshd = Sshd::start_with(&format!("SetEnv LD_PRELOAD={lib} FAKETIME={skew}\n"));
        let s = SshRepo::new(&sshd, true);
        let r = &s.repo;
        for i in 0..50 {
            r.write(&format!("src/f{i}.py"), format!("x = {i}\n"));
        }
        r.write("outputs/untouched.txt", "before\n");
        r.write("outputs/edited.txt", "before\n");
        s.up(sshd.port());
        r.sync_wait();
        r.assert_mirror_exact();
        // The agent's clock really is off.
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs() as i64;
        let theirs: i64 = r.ok(&["exec", "--", "date", "+%s"]).trim().parse().unwrap();
        assert!(
            (theirs - now - secs).abs() < 120,
            "{skew}: the agent's clock says {theirs}, ours {now}"
        );
        // Rewrites of the same size within one second.
        for body in ["aaaa\n", "bbbb\n", "cccc\n"] {
            r.write("racy.txt", body);
            r.sync_wait();
            assert_eq!(
                fs::read_to_string(r.mirror().join("racy.txt")).unwrap(),
                body
            );
        }
        r.assert_mirror_exact();

        let (started, release) = (r.scratch("started"), r.scratch("release"));
        r.write(
            "job.sh",
            format!(
                "mkdir -p outputs\ntouch {}\nwhile [ ! -e {} ]; do sleep 0.05; done\n\
                 for f in untouched edited; do echo job > outputs/$f.txt; done\nseq 1 20000\n",
                started.display(),
                release.display()
            ),
        );
        r.write(
            "job.toml",
            "run = \"sh job.sh\"\n[outputs]\npaths = [\"outputs/\"]\n",
        );
        let mut run = r.spawn(&["run", "job.toml"], &[], "run.out");
        assert!(eventually(Duration::from_secs(30), || started.exists()));
        r.write("outputs/edited.txt", "mine\n");
        fs::write(&release, "").unwrap();
        let status = run.wait().unwrap();
        let err = fs::read_to_string(r.scratch("run.err")).unwrap();
        assert!(status.success(), "{skew}: {err}");
        let want: String = (1..=20000).map(|i| format!("{i}\n")).collect();
        assert_eq!(
            fs::read_to_string(r.scratch("run.out")).unwrap(),
            want,
            "{skew}"
        );
        let read = |p: &str| fs::read_to_string(r.path(p)).unwrap();
        assert_eq!(read("outputs/untouched.txt"), "job\n", "{skew}: {err}");
        assert_eq!(
            read("outputs/edited.txt"),
            "mine\n",
            "{skew}: the edit was lost"
        );
        assert!(
            err.contains("kept 1 file(s) you changed here"),
            "{skew}: {err}"
        );
        r.ok(&["down", "--remote", "--force"]);
    }
}

/// `~/.ssh/config`'s ProxyJump and ProxyCommand: a target sshd in a network
/// namespace that only the jump host's namespace can reach. bridge gets there
/// through the bastion (russh's `direct-tcpip` channel, host keys of both
/// checked), and through OpenSSH's `ssh -W` as a ProxyCommand; sync and jobs
/// work as on any host.
#[test]
fn proxy_jump_and_proxy_command_reach_a_host_only_the_bastion_can() {
    require_sshd();
    let net = bridge_tests::sshd::JumpNet::create();
    let jump = Sshd::start_in(&net.jump_ns, &net.jump_ip);
    let target = Sshd::start_in(&net.target_ns, &net.target_ip);
    target.authorize(&jump);
    // Not reachable from here: only through the bastion.
    let direct = std::net::TcpStream::connect_timeout(
        &format!("{}:2222", net.target_ip).parse().unwrap(),
        Duration::from_secs(2),
    );
    assert!(direct.is_err(), "the target is reachable directly");

    for (name, how) in [
        ("jump", "ProxyJump bastion".to_string()),
        ("command", String::new()),
    ] {
        let r = bridge_tests::Repo::new();
        let ssh = r.scratch("ssh");
        std::fs::create_dir(&ssh).unwrap();
        let key = ssh.join("id_ed25519");
        std::fs::copy(jump.client_key(), &key).unwrap();
        std::fs::set_permissions(&key, std::os::unix::fs::PermissionsExt::from_mode(0o600))
            .unwrap();
        let known = ssh.join("known_hosts");
        std::fs::write(
            &known,
            format!(
                "{}\n{}\n",
                jump.known_hosts_line(),
                target.known_hosts_line()
            ),
        )
        .unwrap();
        let how = if how.is_empty() {
            // OpenSSH's client as the ProxyCommand, with its own view of
            // the same config, key and known hosts.
            format!(
                "ProxyCommand ssh -F {cfg} -i {key} -o UserKnownHostsFile={known} -o StrictHostKeyChecking=yes -o BatchMode=yes -W %h:%p bastion",
                cfg = ssh.join("config").display(),
                key = key.display(),
                known = known.display(),
            )
        } else {
            how
        };
        std::fs::write(
            ssh.join("config"),
            format!(
                "Host gpu\n  HostName {t}\n  Port 2222\n  User root\n  {how}\n\
                 Host bastion\n  HostName {j}\n  Port 2222\n  User root\n",
                t = net.target_ip,
                j = net.jump_ip,
            ),
        )
        .unwrap();
        let env = [
            ("BRIDGE_SSH_DIR", ssh.display().to_string()),
            (
                "BRIDGE_KNOWN_HOSTS",
                r.scratch("bridge_known_hosts").display().to_string(),
            ),
            ("SSH_AUTH_SOCK", String::new()),
        ];
        let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
        r.write("data/hello.txt", format!("hello through {name}"));
        let remote = r.scratch("remote");
        let o = r.bridge_env(
            &[
                "up",
                "--host",
                "gpu",
                "--remote-dir",
                remote.to_str().unwrap(),
            ],
            &env,
        );
        assert!(
            o.status.success(),
            "{name}: bridge up failed: {}\n{}\njump sshd:\n{}\ntarget sshd:\n{}",
            stderr(&o),
            r.daemon_log(),
            jump.log(),
            target.log()
        );
        // The job runs on the target: its namespace has the target's address.
        let out = r.ok_env(
            &[
                "exec",
                "--",
                "sh",
                "-c",
                "cat data/hello.txt; echo; ip -4 -o addr",
            ],
            &env,
        );
        assert!(out.contains(&format!("hello through {name}")), "{out}");
        assert!(
            out.contains(&net.target_ip),
            "{name}: not on the target: {out}"
        );
        let st = r.status();
        assert!(
            st["agent_address"]
                .as_str()
                .unwrap_or_default()
                .contains("via"),
            "{st}"
        );
        // An edit arrives as on any host.
        r.write("data/hello.txt", "edited");
        r.sync_wait();
        let out = r.ok_env(&["exec", "--", "cat", "data/hello.txt"], &env);
        assert_eq!(out, "edited");
        let o = r.bridge_env(&["down", "--remote", "--force"], &env);
        assert!(o.status.success(), "{}", stderr(&o));
    }
}

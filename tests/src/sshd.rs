//! A private OpenSSH server on 127.0.0.1 for the SSH provider's tests.
//!
//! Each [`Sshd`] owns a temporary directory with its own host key, a client
//! key pair authorized to log in (as the user running the tests: root in CI),
//! and an `sshd_config`; the server runs in the foreground as a child and is
//! killed, with its sessions, on drop. [`Sshd::ssh_dir`] hands out
//! directories that stand in for the client's `~/.ssh`.
//!
//! The tests need `/usr/sbin/sshd`, `ssh` and `ssh-keygen`; `tests/run`
//! installs them, and [`require_sshd`] fails a test (never skips it) when
//! they are missing.

use std::fs;
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

const SSHD: &str = "/usr/sbin/sshd";

/// How long a starting sshd gets to accept connections.
const START_TIMEOUT: Duration = Duration::from_secs(10);

/// Whether the OpenSSH server and key generator are installed.
pub fn ssh_available() -> bool {
    Path::new(SSHD).is_file() && in_path("ssh-keygen")
}

/// Panics unless the OpenSSH server is installed: CI installs it, so a test
/// that needs it fails rather than skips.
pub fn require_sshd() {
    assert!(
        ssh_available(),
        "{SSHD} or ssh-keygen is missing: install openssh-server (tests/run does it)"
    );
}

fn in_path(program: &str) -> bool {
    std::env::var_os("PATH")
        .is_some_and(|p| std::env::split_paths(&p).any(|d| d.join(program).is_file()))
}

/// A running `sshd` on 127.0.0.1 with its keys and configuration.
pub struct Sshd {
    /// Keys, config, pid file and log; removed on drop.
    dir: tempfile::TempDir,
    /// The listening port, kept across [`Sshd::rotate_host_key`].
    port: u16,
    /// The foreground server; `None` only while restarting.
    child: Option<Child>,
    /// Names the directories [`Sshd::ssh_dir`] creates (`ssh-1`, `ssh-2`, …).
    ssh_dirs: AtomicUsize,
    /// Which host key is current (`host_key`, then `host_key_1`, …).
    host_key_generation: u32,
    /// Extra `sshd_config` lines ([`Sshd::start_with`]).
    extra_config: String,
    /// The address it listens on (127.0.0.1 unless [`Sshd::start_in`]).
    listen: String,
    /// The network namespace it runs in, if not this one.
    netns: Option<String>,
}

impl Sshd {
    /// Generates the keys and config and starts sshd on a free port.
    pub fn start() -> Sshd {
        Sshd::start_with("")
    }

    /// [`Sshd::start`] with extra `sshd_config` lines (say `SetEnv`, which
    /// sets the environment of every session, so of a remote agent too).
    pub fn start_with(extra_config: &str) -> Sshd {
        let mut sshd = Sshd::start_with_keys();
        sshd.extra_config = extra_config.to_string();
        // The free port can be taken by someone else between our probe and
        // sshd's bind: try a few.
        for attempt in 0.. {
            sshd.port = free_port();
            match sshd.launch() {
                Ok(()) => return sshd,
                Err(e) if attempt < 4 && e.contains("Address already in use") => continue,
                Err(e) => panic!("{e}"),
            }
        }
        unreachable!()
    }

    /// An sshd inside the network namespace `netns` (`ip netns`), listening
    /// on `address` port 2222 there: reachable only by what can route to it.
    pub fn start_in(netns: &str, address: &str) -> Sshd {
        let mut sshd = Sshd::start_with_keys();
        sshd.listen = address.to_string();
        sshd.netns = Some(netns.to_string());
        sshd.port = 2222;
        if let Err(e) = sshd.launch() {
            panic!("{e}");
        }
        sshd
    }

    /// Keys and directory, nothing started.
    fn start_with_keys() -> Sshd {
        require_sshd();
        fs::create_dir_all("/run/sshd").expect("mkdir /run/sshd");
        let dir = tempfile::Builder::new()
            .prefix("bridge-sshd-")
            .tempdir()
            .expect("tempdir");
        keygen(&dir.path().join("host_key"));
        keygen(&dir.path().join("client_key"));
        fs::copy(
            dir.path().join("client_key.pub"),
            dir.path().join("authorized_keys"),
        )
        .expect("write authorized_keys");
        Sshd {
            dir,
            port: 0,
            child: None,
            ssh_dirs: AtomicUsize::new(0),
            host_key_generation: 0,
            extra_config: String::new(),
            listen: "127.0.0.1".into(),
            netns: None,
        }
    }

    /// Lets the client key of `other` log in here too.
    pub fn authorize(&self, other: &Sshd) {
        let key = fs::read_to_string(other.dir().join("client_key.pub")).expect("read key");
        let mut f = fs::OpenOptions::new()
            .append(true)
            .open(self.dir().join("authorized_keys"))
            .expect("open authorized_keys");
        std::io::Write::write_all(&mut f, key.as_bytes()).expect("append key");
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// The temporary directory holding keys, config and log.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// The current host public key, `ssh-ed25519 AAAA…` (no comment).
    pub fn host_key_pub(&self) -> String {
        let mut p = self.host_key_path().into_os_string();
        p.push(".pub");
        let line = fs::read_to_string(&p).expect("read host key");
        line.split_whitespace()
            .take(2)
            .collect::<Vec<_>>()
            .join(" ")
    }

    /// The `known_hosts` line that accepts the current host key.
    pub fn known_hosts_line(&self) -> String {
        format!("[{}]:{} {}", self.listen, self.port, self.host_key_pub())
    }

    /// The authorized client's private key.
    pub fn client_key(&self) -> PathBuf {
        self.dir().join("client_key")
    }

    /// What sshd has logged so far (`LogLevel VERBOSE`).
    pub fn log(&self) -> String {
        fs::read_to_string(self.dir().join("sshd.log")).unwrap_or_default()
    }

    /// A fresh directory to use as the client's `~/.ssh`: `id_ed25519` (+
    /// `.pub`) is the authorized client key and, when `accept_host`,
    /// `known_hosts` accepts the current host key.
    pub fn ssh_dir(&self, accept_host: bool) -> PathBuf {
        let n = self.ssh_dirs.fetch_add(1, Ordering::Relaxed) + 1;
        let d = self.dir().join(format!("ssh-{n}"));
        fs::create_dir(&d).expect("mkdir ssh dir");
        fs::set_permissions(&d, fs::Permissions::from_mode(0o700)).unwrap();
        let key = d.join("id_ed25519");
        fs::copy(self.client_key(), &key).expect("copy client key");
        fs::set_permissions(&key, fs::Permissions::from_mode(0o600)).unwrap();
        fs::copy(self.dir().join("client_key.pub"), d.join("id_ed25519.pub"))
            .expect("copy client public key");
        if accept_host {
            fs::write(
                d.join("known_hosts"),
                format!("{}\n", self.known_hosts_line()),
            )
            .expect("write known_hosts");
        }
        d
    }

    /// Adds to `ssh_dir`'s `known_hosts` the current host key under another
    /// port of 127.0.0.1: a [`crate::proxy::Proxy`] in front of this server.
    pub fn trust_port(&self, ssh_dir: &Path, port: u16) {
        use std::io::Write;
        let mut f = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(ssh_dir.join("known_hosts"))
            .expect("open known_hosts");
        writeln!(f, "[127.0.0.1]:{port} {}", self.host_key_pub()).expect("write known_hosts");
    }

    /// Replaces the host key with a new one and restarts sshd on the same
    /// port, as a reinstalled server would: live sessions are killed and
    /// clients that knew the old key see "REMOTE HOST IDENTIFICATION HAS
    /// CHANGED".
    pub fn rotate_host_key(&mut self) {
        self.stop();
        self.host_key_generation += 1;
        keygen(&self.host_key_path());
        // The port was ours a moment ago; sshd sets SO_REUSEADDR, but a
        // stranger may still grab it: retry briefly before giving up.
        let t = Instant::now();
        loop {
            match self.launch() {
                Ok(()) => return,
                Err(e)
                    if e.contains("Address already in use")
                        && t.elapsed() < Duration::from_secs(5) =>
                {
                    std::thread::sleep(Duration::from_millis(100));
                }
                Err(e) => panic!("{e}"),
            }
        }
    }

    fn host_key_path(&self) -> PathBuf {
        match self.host_key_generation {
            0 => self.dir().join("host_key"),
            n => self.dir().join(format!("host_key_{n}")),
        }
    }

    fn write_config(&self) -> PathBuf {
        let d = self.dir();
        let config = format!(
            "ListenAddress {listen}\n\
             Port {port}\n\
             HostKey {host_key}\n\
             AuthorizedKeysFile {authorized_keys}\n\
             PidFile {pid}\n\
             StrictModes no\n\
             UsePAM no\n\
             PasswordAuthentication no\n\
             KbdInteractiveAuthentication no\n\
             PermitRootLogin yes\n\
             AllowStreamLocalForwarding yes\n\
             AllowTcpForwarding yes\n\
             ClientAliveInterval 0\n\
             LogLevel VERBOSE\n\
             PermitUserEnvironment no\n\
             Subsystem sftp internal-sftp\n\
             {extra}\n",
            listen = self.listen,
            port = self.port,
            host_key = self.host_key_path().display(),
            authorized_keys = d.join("authorized_keys").display(),
            pid = d.join("sshd.pid").display(),
            extra = self.extra_config,
        );
        let path = d.join("sshd_config");
        fs::write(&path, config).expect("write sshd_config");
        path
    }

    /// Writes the config, starts sshd and waits until it accepts TCP; on
    /// failure returns its log.
    fn launch(&mut self) -> Result<(), String> {
        let config = self.write_config();
        let log = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir().join("sshd.log"))
            .expect("open sshd.log");
        let mut cmd = match &self.netns {
            Some(ns) => {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", ns, SSHD]);
                c
            }
            None => Command::new(SSHD),
        };
        let child = cmd
            .arg("-D")
            .arg("-e")
            .arg("-f")
            .arg(&config)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .map_err(|e| format!("cannot run {SSHD}: {e}"))?;
        self.child = Some(child);
        let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, self.port));
        let t = Instant::now();
        loop {
            let child = self.child.as_mut().expect("child");
            if let Some(status) = child.try_wait().expect("wait sshd") {
                self.child = None;
                return Err(format!(
                    "sshd exited ({status}) on port {}:\n{}",
                    self.port,
                    self.log()
                ));
            }
            // In another namespace it cannot be connected to from here:
            // its log says when it listens.
            let ready = if self.netns.is_some() {
                self.log().contains(&format!(
                    "Server listening on {} port {}",
                    self.listen, self.port
                ))
            } else {
                TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok()
            };
            if ready {
                return Ok(());
            }
            if t.elapsed() > START_TIMEOUT {
                self.stop();
                return Err(format!(
                    "sshd did not accept connections on port {} within {START_TIMEOUT:?}:\n{}",
                    self.port,
                    self.log()
                ));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Kills the listener and every process it forked. The per-connection
    /// servers start their own sessions, so a process-group kill would miss
    /// them; they are killed leaves first, each level reaped by its living
    /// parent before the next, so none is left a zombie under an init that
    /// does not reap (as in containers).
    fn stop(&mut self) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        for level in descendants(child.id()).iter().rev() {
            for &pid in level {
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(pid),
                    nix::sys::signal::Signal::SIGKILL,
                );
            }
            let t = Instant::now();
            while level
                .iter()
                .any(|pid| Path::new(&format!("/proc/{pid}")).exists())
                && t.elapsed() < Duration::from_millis(500)
            {
                std::thread::sleep(Duration::from_millis(5));
            }
        }
        let _ = child.kill();
        let _ = child.wait();
    }
}

impl Drop for Sshd {
    fn drop(&mut self) {
        self.stop();
    }
}

/// `ssh-keygen -q -t ed25519 -N '' -f PATH` (replacing PATH if it exists).
fn keygen(path: &Path) {
    let _ = fs::remove_file(path);
    let mut pub_path = path.as_os_str().to_owned();
    pub_path.push(".pub");
    let _ = fs::remove_file(&pub_path);
    let out = Command::new("ssh-keygen")
        .args(["-q", "-t", "ed25519", "-N", "", "-C", "bridge-test", "-f"])
        .arg(path)
        .stdin(Stdio::null())
        .output()
        .expect("run ssh-keygen (install openssh-client: tests/run does it)");
    assert!(
        out.status.success(),
        "ssh-keygen failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A port that was free a moment ago on 127.0.0.1.
pub fn free_port() -> u16 {
    TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
        .and_then(|l| l.local_addr())
        .expect("bind 127.0.0.1:0")
        .port()
}

/// The live descendants of `root` from `/proc`, by depth: its children,
/// their children, …
fn descendants(root: u32) -> Vec<Vec<i32>> {
    let mut parent_of = Vec::new();
    for e in fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<i32>().ok()) else {
            continue;
        };
        let Ok(stat) = fs::read_to_string(e.path().join("stat")) else {
            continue;
        };
        // "pid (comm) state ppid …"; comm may hold spaces and parentheses.
        let ppid = stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().nth(1))
            .and_then(|s| s.parse::<i32>().ok());
        if let Some(ppid) = ppid {
            parent_of.push((pid, ppid));
        }
    }
    let mut levels: Vec<Vec<i32>> = Vec::new();
    let mut frontier = vec![root as i32];
    while !frontier.is_empty() {
        let next: Vec<i32> = parent_of
            .iter()
            .filter(|(_, ppid)| frontier.contains(ppid))
            .map(|&(pid, _)| pid)
            .collect();
        if !next.is_empty() {
            levels.push(next.clone());
        }
        frontier = next;
    }
    levels
}

/// A repository whose agent is reached over SSH (a private [`Sshd`]), with the client's `~/.ssh`,
/// bridge's known-hosts file and the remote directory in its scratch space.
pub struct SshRepo {
    pub repo: crate::Repo,
    /// Stands in for the client's `~/.ssh`.
    pub ssh_dir: PathBuf,
    /// bridge's own known-hosts file.
    pub known_hosts: PathBuf,
    /// The agent's directory on the "remote" (`--remote-dir`).
    pub remote: PathBuf,
}

impl SshRepo {
    pub fn new(sshd: &Sshd, accept_host: bool) -> SshRepo {
        let repo = crate::Repo::new();
        let ssh_dir = sshd.ssh_dir(accept_host);
        let known_hosts = repo.scratch("bridge_known_hosts");
        let remote = repo.scratch("remote");
        SshRepo {
            repo,
            ssh_dir,
            known_hosts,
            remote,
        }
    }

    pub fn env(&self) -> Vec<(String, String)> {
        vec![
            ("BRIDGE_SSH_DIR".into(), self.ssh_dir.display().to_string()),
            (
                "BRIDGE_KNOWN_HOSTS".into(),
                self.known_hosts.display().to_string(),
            ),
            ("SSH_AUTH_SOCK".into(), String::new()),
        ]
    }

    pub fn up_args(&self, port: u16) -> Vec<String> {
        vec![
            "up".into(),
            "--host".into(),
            format!("root@127.0.0.1:{port}"),
            "--remote-dir".into(),
            self.remote.display().to_string(),
        ]
    }

    /// `bridge up` over SSH with extra arguments and environment.
    pub fn up_with(&self, port: u16, extra: &[&str], env: &[(&str, &str)]) -> Output {
        let mut args = self.up_args(port);
        args.extend(extra.iter().map(|s| s.to_string()));
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let mut e = self.env();
        e.extend(env.iter().map(|(k, v)| (k.to_string(), v.to_string())));
        let e: Vec<(&str, &str)> = e.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        self.repo.bridge_env(&args, &e)
    }

    pub fn up(&self, port: u16) {
        let o = self.up_with(port, &[], &[]);
        assert!(
            o.status.success(),
            "bridge up over ssh failed: {}\n{}\ndaemon log:\n{}",
            String::from_utf8_lossy(&o.stderr),
            String::from_utf8_lossy(&o.stdout),
            self.repo.daemon_log()
        );
    }

    pub fn agent_pid(&self) -> Option<i32> {
        fs::read_to_string(self.remote.join("run/agent.pid"))
            .ok()?
            .trim()
            .parse()
            .ok()
    }
}

impl Drop for SshRepo {
    fn drop(&mut self) {
        let _ = self
            .repo
            .bridge(&["down", "--remote", "--force", "--purge"]);
        if let Some(pid) = self.agent_pid() {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
    }
}

/// Two network namespaces for the ProxyJump tests: this namespace reaches the
/// jump host's at `jump_ip`; only that one reaches the target's at
/// `target_ip` (here an `unreachable` route covers it, so nothing is sent
/// along a default route). Removed on drop.
pub struct JumpNet {
    pub jump_ns: String,
    pub target_ns: String,
    pub jump_ip: String,
    pub target_ip: String,
    /// This namespace's end of the veth pair to the jump namespace.
    veth: String,
}

impl JumpNet {
    pub fn create() -> JumpNet {
        let id = std::process::id();
        let net = JumpNet {
            jump_ns: format!("bridge-j-{id}"),
            target_ns: format!("bridge-t-{id}"),
            jump_ip: "10.231.1.2".into(),
            target_ip: "10.231.2.2".into(),
            veth: format!("bjr{}", id % 100_000),
        };
        let (j, t, v) = (&net.jump_ns, &net.target_ns, &net.veth);
        let jv = format!("bjj{}", id % 100_000);
        let jt = format!("bjt{}", id % 100_000);
        let tj = format!("btj{}", id % 100_000);
        let steps: Vec<Vec<&str>> = vec![
            vec!["netns", "add", j],
            vec!["netns", "add", t],
            vec!["link", "add", v, "type", "veth", "peer", "name", &jv],
            vec!["link", "set", &jv, "netns", j],
            vec!["addr", "add", "10.231.1.1/30", "dev", v],
            vec!["link", "set", v, "up"],
            vec!["-n", j, "addr", "add", "10.231.1.2/30", "dev", &jv],
            vec!["-n", j, "link", "set", &jv, "up"],
            vec!["-n", j, "link", "set", "lo", "up"],
            vec![
                "-n", j, "link", "add", &jt, "type", "veth", "peer", "name", &tj,
            ],
            vec!["-n", j, "link", "set", &tj, "netns", t],
            vec!["-n", j, "addr", "add", "10.231.2.1/30", "dev", &jt],
            vec!["-n", j, "link", "set", &jt, "up"],
            vec!["-n", t, "addr", "add", "10.231.2.2/30", "dev", &tj],
            vec!["-n", t, "link", "set", &tj, "up"],
            vec!["-n", t, "link", "set", "lo", "up"],
            // From here the target's subnet is unreachable (refused at
            // once, locally), not sent along a default route.
            vec!["route", "add", "unreachable", "10.231.2.0/30"],
        ];
        for step in steps {
            let o = Command::new("ip").args(&step).output().expect("run ip");
            assert!(
                o.status.success(),
                "ip {}: {}",
                step.join(" "),
                String::from_utf8_lossy(&o.stderr)
            );
        }
        net
    }
}

impl Drop for JumpNet {
    fn drop(&mut self) {
        // Deleting a namespace deletes the interfaces in it, and a veth's
        // peer with it.
        let _ = Command::new("ip")
            .args(["route", "del", "unreachable", "10.231.2.0/30"])
            .output();
        let _ = Command::new("ip")
            .args(["link", "del", &self.veth])
            .output();
        for ns in [&self.jump_ns, &self.target_ns] {
            let _ = Command::new("ip").args(["netns", "del", ns]).output();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::process::Output;

    fn ssh_echo(sshd: &Sshd, ssh_dir: &Path) -> Output {
        ssh(sshd.port(), ssh_dir, "echo ok")
            .output()
            .expect("run ssh (install openssh-client: tests/run does it)")
    }

    fn ssh(port: u16, ssh_dir: &Path, command: &str) -> Command {
        let mut c = Command::new("ssh");
        c.args(["-F", "none", "-p", &port.to_string(), "-i"])
            .arg(ssh_dir.join("id_ed25519"))
            .arg("-o")
            .arg(format!(
                "UserKnownHostsFile={}",
                ssh_dir.join("known_hosts").display()
            ))
            .args([
                "-o",
                "StrictHostKeyChecking=yes",
                "-o",
                "BatchMode=yes",
                "-o",
                "IdentitiesOnly=yes",
                "-o",
                "ConnectTimeout=10",
                "root@127.0.0.1",
                command,
            ])
            .stdin(Stdio::null());
        c
    }

    #[test]
    fn ssh_logs_in_and_notices_a_new_host_key() {
        let mut sshd = Sshd::start();
        let ssh_dir = sshd.ssh_dir(true);
        let out = ssh_echo(&sshd, &ssh_dir);
        assert!(
            out.status.success() && String::from_utf8_lossy(&out.stdout).trim() == "ok",
            "ssh failed ({}):\nstdout: {}\nstderr: {}\nsshd log:\n{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr),
            sshd.log()
        );

        let old_key = sshd.host_key_pub();
        let port = sshd.port();
        sshd.rotate_host_key();
        assert_eq!(sshd.port(), port);
        assert_ne!(sshd.host_key_pub(), old_key);
        let out = ssh_echo(&sshd, &ssh_dir);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            !out.status.success() && stderr.contains("REMOTE HOST IDENTIFICATION HAS CHANGED"),
            "ssh with the old host key should fail ({}):\nstderr: {stderr}\nsshd log:\n{}",
            out.status,
            sshd.log()
        );

        // A fresh client directory knows the new key.
        let out = ssh_echo(&sshd, &sshd.ssh_dir(true));
        assert!(
            out.status.success(),
            "ssh after rotation failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    #[test]
    fn unknown_host_is_refused_in_batch_mode() {
        let sshd = Sshd::start();
        let out = ssh_echo(&sshd, &sshd.ssh_dir(false));
        assert!(!out.status.success());
        assert!(
            String::from_utf8_lossy(&out.stderr).contains("Host key verification failed"),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    #[test]
    fn drop_stops_the_server() {
        let sshd = Sshd::start();
        let port = sshd.port();
        drop(sshd);
        assert!(TcpStream::connect((Ipv4Addr::LOCALHOST, port)).is_err());
    }

    #[test]
    fn a_session_through_a_proxy_dies_when_it_is_cut() {
        use crate::proxy::Proxy;
        let sshd = Sshd::start();
        let proxy = Proxy::start(sshd.port());
        let ssh_dir = sshd.ssh_dir(false);
        sshd.trust_port(&ssh_dir, proxy.port());
        let out = ssh(proxy.port(), &ssh_dir, "echo ok").output().unwrap();
        assert!(
            out.status.success(),
            "ssh through the proxy failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        // `read` ends with the session's stdin, so nothing outlives the test.
        let mut long = ssh(proxy.port(), &ssh_dir, "echo up; read x")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let mut line = String::new();
        std::io::BufRead::read_line(
            &mut std::io::BufReader::new(long.stdout.take().unwrap()),
            &mut line,
        )
        .unwrap();
        assert_eq!(line, "up\n");
        assert_eq!(proxy.cut(), 1);
        let ended = crate::eventually(Duration::from_secs(5), || {
            long.try_wait().unwrap().is_some()
        });
        let _ = long.kill();
        let _ = long.wait();
        assert!(ended, "ssh survived the cut");
    }
}

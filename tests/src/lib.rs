//! Test harness: temporary git repositories with a real `bridge` daemon and
//! `bridge-agent` process, helpers to edit them, and a readable tree diff.
//!
//! The binaries come from the workspace's target directory (`tests/run`
//! builds them before the tests). Every [`Repo`] runs `bridge down` and kills
//! what it started when dropped, so a failing test leaves nothing running.

use std::collections::BTreeMap;
use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

pub use serde_json::Value;

/// The Jupyter front end of the kernel tests: its venv and driver script.
pub mod jupyter;
/// A real one-node Kubernetes cluster (tests/k8s/cluster.sh).
pub mod k8s;
/// A real `mlflow server` on 127.0.0.1, standing for the laptop's.
pub mod mlflow;
/// A private EC2 API emulator (moto) and a fault-injecting proxy.
pub mod moto;
/// An HTTP server and client on 127.0.0.1, and listening sockets from /proc.
pub mod net;
/// A TCP proxy the tests can cut, take down and slow down.
pub mod proxy;
/// A private OpenSSH server on 127.0.0.1 for the SSH provider's tests.
pub mod sshd;

/// Directory holding the built `bridge` and `bridge-agent`.
pub fn bin_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("test executable path");
    // target/<profile>/deps/integration-… → target/<profile>/
    let dir = exe
        .parent()
        .and_then(Path::parent)
        .expect("target dir")
        .to_path_buf();
    for b in ["bridge", "bridge-agent"] {
        assert!(
            dir.join(b).exists(),
            "{} is missing: build the binaries first (`cargo build --workspace --bins`; tests/run does)",
            dir.join(b).display()
        );
    }
    dir
}

pub fn bridge_bin() -> PathBuf {
    bin_dir().join("bridge")
}

pub fn agent_bin() -> PathBuf {
    bin_dir().join("bridge-agent")
}

/// `tests/fixtures/`: the fake `nvidia-smi` lives there.
pub fn fixtures_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures")
}

/// `PATH` with the fake `nvidia-smi` first (it reports `BRIDGE_FAKE_GPUS` GPUs).
pub fn path_with_fake_gpus() -> String {
    format!(
        "{}:{}",
        fixtures_dir().display(),
        std::env::var("PATH").unwrap_or_default()
    )
}

/// The wheels `tests/wheels` downloaded (Python environments are built from
/// them with no network), or `None` when the script has not run.
pub fn wheelhouse() -> Option<PathBuf> {
    let dir = std::env::var_os("BRIDGE_WHEELHOUSE")
        .map(PathBuf::from)
        .or_else(|| {
            std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache/bridge/wheels"))
        })?;
    dir.is_dir().then_some(dir)
}

/// What one entry of a tree is, for comparisons.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Entry {
    File { hash: String, exec: bool },
    Dir,
    Link(String),
}

/// A temporary git repository, optionally with bridge up on it.
pub struct Repo {
    _dir: tempfile::TempDir,
    pub root: PathBuf,
}

impl Default for Repo {
    fn default() -> Self {
        Self::new()
    }
}

impl Repo {
    pub fn new() -> Repo {
        let dir = tempfile::Builder::new()
            .prefix("bridge-test-")
            .tempdir()
            .expect("tempdir");
        let root = dir.path().join("repo");
        fs::create_dir(&root).unwrap();
        let ok = Command::new("git")
            .args(["init", "-q"])
            .current_dir(&root)
            .status()
            .expect("git is installed")
            .success();
        assert!(ok, "git init failed");
        Repo { _dir: dir, root }
    }

    pub fn path(&self, rel: &str) -> PathBuf {
        self.root.join(rel)
    }

    /// Writes a file, creating parent directories.
    pub fn write(&self, rel: &str, content: impl AsRef<[u8]>) {
        let p = self.path(rel);
        if let Some(d) = p.parent() {
            fs::create_dir_all(d).unwrap();
        }
        fs::write(p, content).unwrap();
    }

    pub fn mkdir(&self, rel: &str) {
        fs::create_dir_all(self.path(rel)).unwrap();
    }

    pub fn remove(&self, rel: &str) {
        let p = self.path(rel);
        if p.symlink_metadata().is_ok_and(|m| m.is_dir()) {
            fs::remove_dir_all(p).unwrap();
        } else {
            fs::remove_file(p).unwrap();
        }
    }

    pub fn rename(&self, from: &str, to: &str) {
        fs::rename(self.path(from), self.path(to)).unwrap();
    }

    pub fn symlink(&self, target: &str, rel: &str) {
        std::os::unix::fs::symlink(target, self.path(rel)).unwrap();
    }

    pub fn chmod(&self, rel: &str, mode: u32) {
        fs::set_permissions(self.path(rel), fs::Permissions::from_mode(mode)).unwrap();
    }

    /// Runs `bridge ARGS` in the repository.
    pub fn bridge(&self, args: &[&str]) -> Output {
        self.bridge_env(args, &[])
    }

    /// Runs `bridge ARGS` with extra environment variables.
    pub fn bridge_env(&self, args: &[&str], env: &[(&str, &str)]) -> Output {
        Command::new(bridge_bin())
            .arg("-C")
            .arg(&self.root)
            .args(args)
            .env("BRIDGE_LOG", "info")
            .envs(env.iter().copied())
            .output()
            .expect("run bridge")
    }

    /// Starts `bridge ARGS` in the background, stdout and stderr to files
    /// (`out` and `out.err` under the repository's temporary directory).
    pub fn spawn(&self, args: &[&str], env: &[(&str, &str)], out: &str) -> std::process::Child {
        let o = self.scratch(out);
        Command::new(bridge_bin())
            .arg("-C")
            .arg(&self.root)
            .args(args)
            .envs(env.iter().copied())
            .stdin(std::process::Stdio::null())
            .stdout(fs::File::create(&o).unwrap())
            .stderr(fs::File::create(o.with_extension("err")).unwrap())
            .spawn()
            .expect("run bridge")
    }

    /// A path in the test's temporary directory, outside the repository (so
    /// jobs can reach it by absolute path and it is never synced).
    pub fn scratch(&self, name: &str) -> PathBuf {
        self.root.parent().expect("tempdir").join(name)
    }

    /// Runs `bridge ARGS` with `env`, asserts success; returns stdout.
    pub fn ok_env(&self, args: &[&str], env: &[(&str, &str)]) -> String {
        let out = self.bridge_env(args, env);
        assert!(
            out.status.success(),
            "bridge {args:?} failed ({}):\nstdout: {}\nstderr: {}\ndaemon log:\n{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr),
            self.daemon_log()
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Runs `bridge ARGS` and asserts success; returns stdout.
    pub fn ok(&self, args: &[&str]) -> String {
        self.ok_env(args, &[])
    }

    /// Runs `bridge ARGS`, asserts failure, returns stderr.
    pub fn fails(&self, args: &[&str]) -> String {
        let out = self.bridge(args);
        assert!(
            !out.status.success(),
            "bridge {args:?} should have failed:\nstdout: {}",
            String::from_utf8_lossy(&out.stdout)
        );
        String::from_utf8_lossy(&out.stderr).into_owned()
    }

    pub fn up(&self) -> String {
        self.ok(&["up"])
    }

    /// `bridge sync --wait`; returns (generation, root).
    pub fn sync_wait(&self) -> (u64, String) {
        let out = self.ok(&["sync", "--wait"]);
        let line = out
            .lines()
            .find(|l| l.starts_with("in sync:"))
            .unwrap_or_else(|| panic!("no result in {out:?}"));
        let generation = line
            .split("generation ")
            .nth(1)
            .and_then(|s| s.split(',').next())
            .and_then(|s| s.parse().ok())
            .expect("generation");
        let root = line.rsplit("root ").next().unwrap().trim().to_string();
        (generation, root)
    }

    pub fn status(&self) -> Value {
        let v: Value = serde_json::from_str(&self.ok(&["status", "--json"])).expect("status JSON");
        assert_eq!(v["schema_version"], 1, "{v}");
        v
    }

    /// `bridge ps --json` (with `--all` when `all`): the jobs, after checking
    /// the schema's envelope.
    pub fn ps_json(&self, all: bool) -> Vec<Value> {
        let args: &[&str] = if all {
            &["ps", "--all", "--json"]
        } else {
            &["ps", "--json"]
        };
        let v: Value = serde_json::from_str(&self.ok(args)).expect("ps JSON");
        assert_eq!(v["schema_version"], 1, "{v}");
        v["jobs"].as_array().expect("ps JSON: jobs").clone()
    }

    /// `bridge forward --list --json`: the forwards, after checking the
    /// schema's envelope.
    pub fn forwards_json(&self) -> Vec<Value> {
        let v: Value =
            serde_json::from_str(&self.ok(&["forward", "--list", "--json"])).expect("forward JSON");
        assert_eq!(v["schema_version"], 1, "{v}");
        v["forwards"]
            .as_array()
            .expect("forward JSON: forwards")
            .clone()
    }

    /// The mirror's directory (local provider: on this machine).
    pub fn mirror(&self) -> PathBuf {
        PathBuf::from(
            self.status()["mirror_path"]
                .as_str()
                .expect("mirror_path")
                .to_string(),
        )
    }

    pub fn daemon_log(&self) -> String {
        fs::read_to_string(self.path(".bridge/daemon.log")).unwrap_or_default()
    }

    pub fn agent_log(&self) -> String {
        fs::read_to_string(self.path(".bridge/agent.log")).unwrap_or_default()
    }

    /// The running daemon's pid (from `.bridge/daemon.pid`).
    pub fn daemon_pid(&self) -> i32 {
        fs::read_to_string(self.path(".bridge/daemon.pid"))
            .expect("a daemon runs")
            .trim()
            .parse()
            .expect("a pid")
    }

    pub fn agent_pid(&self) -> Option<i32> {
        fs::read_to_string(self.path(".bridge/agent.pid"))
            .ok()?
            .trim()
            .parse()
            .ok()
    }

    /// The mirror's content, minus what the local rules ignore.
    pub fn mirror_tree(&self) -> BTreeMap<String, Entry> {
        read_tree_ignoring(&self.mirror(), &self.root)
    }

    /// The synced view of the local tree (what the mirror must equal).
    pub fn local_tree(&self) -> BTreeMap<String, Entry> {
        read_tree(&self.root)
    }

    /// Asserts the mirror equals the local tree, printing a diff if not.
    pub fn assert_mirror_exact(&self) {
        assert_trees_eq(&self.local_tree(), &self.mirror_tree());
    }

    /// Waits (without asking for a sync) until `pred` holds for the mirror.
    pub fn wait_mirror(&self, what: &str, pred: impl Fn(&Path) -> bool) {
        let mirror = self.mirror();
        let t = Instant::now();
        while t.elapsed() < Duration::from_secs(10) {
            if pred(&mirror) {
                return;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        panic!(
            "mirror never showed {what} within 10 s\nlocal vs mirror:\n{}\ndaemon log:\n{}",
            tree_diff(&self.local_tree(), &read_tree_ignoring(&mirror, &self.root)),
            self.daemon_log()
        );
    }

    /// Waits until the mirror equals the local tree, by watching alone.
    pub fn wait_exact(&self) {
        let mirror = self.mirror();
        let t = Instant::now();
        loop {
            let (l, m) = (self.local_tree(), read_tree_ignoring(&mirror, &self.root));
            if l == m {
                return;
            }
            if t.elapsed() > Duration::from_secs(10) {
                panic!(
                    "mirror not exact after 10 s:\n{}\ndaemon log:\n{}",
                    tree_diff(&l, &m),
                    self.daemon_log()
                );
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

impl Drop for Repo {
    fn drop(&mut self) {
        if self.path(".bridge").exists() {
            // A remote (SSH) agent outlives a plain `down`: stop and remove it.
            let ssh = fs::read_to_string(self.path(".bridge/provider.toml"))
                .is_ok_and(|t| t.contains("\"ssh\""));
            if ssh {
                let _ = self.bridge(&["down", "--remote", "--force", "--purge"]);
            } else {
                let _ = self.bridge(&["down"]);
            }
        }
        // Whatever survived (a test that killed the daemon): kill it.
        for f in [".bridge/daemon.pid", ".bridge/agent.pid"] {
            if let Some(pid) = fs::read_to_string(self.path(f))
                .ok()
                .and_then(|s| s.trim().parse::<i32>().ok())
            {
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(pid),
                    nix::sys::signal::Signal::SIGKILL,
                );
            }
        }
    }
}

/// Reads a tree the way bridge syncs it: `git ls-files`-like rules come from
/// git itself (`git check-ignore`), so the harness does not share bridge's
/// implementation of them.
pub fn read_tree(root: &Path) -> BTreeMap<String, Entry> {
    read_tree_ignoring(root, root)
}

/// Reads the tree at `root`, leaving out what git, run in `rules`, ignores
/// (for a mirror: the local repository's rules).
pub fn read_tree_ignoring(root: &Path, rules: &Path) -> BTreeMap<String, Entry> {
    let mut out = BTreeMap::new();
    walk(root, root, &mut out);
    let paths: Vec<String> = out.keys().cloned().collect();
    let ignored = git_ignored(rules, &paths);
    out.retain(|k, _| {
        !ignored
            .iter()
            .any(|i| k == i || k.starts_with(&format!("{i}/")))
    });
    out
}

fn walk(root: &Path, dir: &Path, out: &mut BTreeMap<String, Entry>) {
    let Ok(rd) = fs::read_dir(dir) else { return };
    for e in rd.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        if name == ".git" || name == ".bridge" {
            continue;
        }
        let p = e.path();
        let rel = p.strip_prefix(root).unwrap().to_string_lossy().into_owned();
        let Ok(m) = p.symlink_metadata() else {
            continue;
        };
        if m.file_type().is_symlink() {
            let t = fs::read_link(&p).unwrap().to_string_lossy().into_owned();
            out.insert(rel, Entry::Link(t));
        } else if m.is_dir() {
            out.insert(rel, Entry::Dir);
            walk(root, &p, out);
        } else if m.is_file() {
            let data = fs::read(&p).unwrap_or_default();
            out.insert(
                rel,
                Entry::File {
                    hash: blake3::hash(&data).to_hex()[..16].to_string(),
                    exec: m.permissions().mode() & 0o100 != 0,
                },
            );
        }
    }
}

/// Paths git ignores, asked of git itself (the mirror gets the repo's exclude
/// file through bridge; for the local side git reads its own).
fn git_ignored(root: &Path, paths: &[String]) -> Vec<String> {
    if paths.is_empty() || !root.join(".git").exists() {
        return Vec::new();
    }
    let mut ignored = check_ignore(root, &[], paths);
    // .bridgeignore uses gitignore syntax; git does not read it, so ask git
    // with it as the excludes file (the harness only uses a top-level one).
    let bi = root.join(".bridgeignore");
    if bi.exists() {
        let cfg = format!("core.excludesFile={}", bi.display());
        ignored.extend(check_ignore(root, &["-c", &cfg], paths));
    }
    ignored
}

/// `git [pre_args] check-ignore --no-index --stdin -z` over `paths`.
fn check_ignore(root: &Path, pre_args: &[&str], paths: &[String]) -> Vec<String> {
    use std::io::Write;
    let mut child = Command::new("git")
        .args(pre_args)
        .args(["check-ignore", "--no-index", "--stdin", "-z"])
        .current_dir(root)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("git check-ignore");
    {
        let mut stdin = child.stdin.take().unwrap();
        for p in paths {
            stdin.write_all(p.as_bytes()).unwrap();
            stdin.write_all(b"\0").unwrap();
        }
    }
    let out = child.wait_with_output().unwrap();
    out.stdout
        .split(|b| *b == 0)
        .filter(|s| !s.is_empty())
        .map(|s| String::from_utf8_lossy(s).into_owned())
        .collect()
}

/// A readable diff of two trees ("-" only in the first, "+" only in the second).
pub fn tree_diff(a: &BTreeMap<String, Entry>, b: &BTreeMap<String, Entry>) -> String {
    let mut s = String::new();
    for (k, v) in a {
        match b.get(k) {
            None => s.push_str(&format!("- {k} {v:?}\n")),
            Some(w) if w != v => s.push_str(&format!("~ {k}: {v:?} != {w:?}\n")),
            _ => {}
        }
    }
    for (k, v) in b {
        if !a.contains_key(k) {
            s.push_str(&format!("+ {k} {v:?}\n"));
        }
    }
    s
}

pub fn assert_trees_eq(local: &BTreeMap<String, Entry>, mirror: &BTreeMap<String, Entry>) {
    if local != mirror {
        panic!(
            "mirror differs from the local tree (- local only, + mirror only):\n{}",
            tree_diff(local, mirror)
        );
    }
}

/// Deterministic pseudo-random bytes.
pub fn random_bytes(n: usize, seed: u64) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut v = Vec::with_capacity(n);
    while v.len() < n {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        v.extend_from_slice(&x.to_le_bytes());
    }
    v.truncate(n);
    v
}

/// Polls `f` until it returns true or `timeout` passes.
/// Whether process `pid` runs (a zombie has ended; only a reaper is missing).
pub fn alive(pid: i32) -> bool {
    fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|s| {
        s.rsplit(')')
            .next()
            .is_some_and(|r| !r.trim_start().starts_with('Z'))
    })
}

/// The pids a job wrote to `file`, one per line, once there are `n`.
pub fn wait_pids(file: &Path, n: usize) -> Vec<i32> {
    assert!(
        eventually(Duration::from_secs(20), || {
            fs::read_to_string(file).is_ok_and(|s| s.lines().count() == n)
        }),
        "the job never wrote its {n} pids to {}",
        file.display()
    );
    fs::read_to_string(file)
        .unwrap()
        .lines()
        .map(|l| l.parse().expect("a pid"))
        .collect()
}

pub fn eventually(timeout: Duration, mut f: impl FnMut() -> bool) -> bool {
    let t = Instant::now();
    while t.elapsed() < timeout {
        if f() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    false
}

/// A gRPC channel to an agent listening on the Unix socket `path`, retried
/// for up to `timeout` (the socket file appears at bind(), a moment before
/// listen()); `None` when it never answers.
pub async fn unix_channel(path: &Path, timeout: Duration) -> Option<tonic::transport::Channel> {
    let path = path.to_path_buf();
    let connector = tower::service_fn(move |_: tonic::transport::Uri| {
        let path = path.clone();
        async move {
            tokio::net::UnixStream::connect(path)
                .await
                .map(hyper_util::rt::TokioIo::new)
        }
    });
    let start = Instant::now();
    loop {
        if let Ok(c) = tonic::transport::Endpoint::from_static("http://agent")
            .connect_with_connector(connector.clone())
            .await
        {
            return Some(c);
        }
        if start.elapsed() > timeout {
            return None;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

//! A real one-node Kubernetes cluster for the k8s provider's tests
//! (`tests/k8s/cluster.sh`: etcd, API server, scheduler, controller-manager,
//! containerd and a kubelet, built from Debian's sources and packages), one
//! per test process, started by the first test that asks and stopped when
//! the process exits (the script stops everything when its stdin closes).
//!
//! `tests/run` builds the binaries and images first (`tests/k8s/images.sh`,
//! cached outside the clone); a test fails, never skips, when the cluster
//! cannot start. Tests hold [`Cluster::lock`]: they share the node's 4 GPUs,
//! and one restarts the API server.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Output, Stdio};
use std::sync::{Mutex, MutexGuard, OnceLock};
use std::time::{Duration, Instant};

use serde_json::Value;

/// The running cluster.
pub struct Cluster {
    dir: PathBuf,
    kubeconfig: PathBuf,
    _child: Mutex<(Child, ChildStdin)>,
    lock: Mutex<()>,
}

static CLUSTER: OnceLock<Cluster> = OnceLock::new();

impl Cluster {
    /// The process's cluster, started on first use (about 30 s).
    pub fn shared() -> &'static Cluster {
        CLUSTER.get_or_init(Cluster::start)
    }

    fn start() -> Cluster {
        let dir = std::env::temp_dir().join(format!("bridge-k8s-{}", std::process::id()));
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("k8s/cluster.sh");
        let mut child = Command::new(&script)
            .arg(&dir)
            .env("BRIDGE_K8S_REMOVE", "1")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("run tests/k8s/cluster.sh");
        let stdin = child.stdin.take().expect("stdin");
        let out = BufReader::new(child.stdout.take().expect("stdout"));
        let mut kubeconfig = None;
        for line in out.lines() {
            let line = line.expect("cluster.sh output");
            if let Some(k) = line.strip_prefix("KUBECONFIG=") {
                kubeconfig = Some(PathBuf::from(k));
            }
            if line == "ready" {
                break;
            }
        }
        let kubeconfig = kubeconfig.unwrap_or_else(|| {
            let status = child.wait().ok();
            panic!(
                "tests/k8s/cluster.sh did not start the cluster ({status:?}); its logs are in {}",
                dir.display()
            )
        });
        Cluster {
            dir,
            kubeconfig,
            _child: Mutex::new((child, stdin)),
            lock: Mutex::new(()),
        }
    }

    /// One test at a time on the cluster.
    pub fn lock(&self) -> MutexGuard<'_, ()> {
        self.lock.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The admin's kubeconfig (system:masters).
    pub fn kubeconfig(&self) -> &Path {
        &self.kubeconfig
    }

    /// A kubeconfig of `alice`, a user with no rights at all.
    pub fn alice(&self) -> PathBuf {
        self.dir.join("alice.kubeconfig")
    }

    /// `kubectl ARGS` as the admin.
    pub fn kubectl(&self, args: &[&str]) -> Output {
        Command::new("kubectl")
            .arg("--kubeconfig")
            .arg(&self.kubeconfig)
            .args(args)
            .output()
            .expect("run kubectl")
    }

    /// `kubectl apply -f -` of `manifest` (JSON or YAML), asserting success.
    pub fn apply(&self, manifest: &str) {
        use std::io::Write;
        let mut child = Command::new("kubectl")
            .arg("--kubeconfig")
            .arg(&self.kubeconfig)
            .args(["apply", "-f", "-"])
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("run kubectl");
        child
            .stdin
            .take()
            .expect("stdin")
            .write_all(manifest.as_bytes())
            .expect("write the manifest");
        let o = child.wait_with_output().expect("kubectl apply");
        assert!(
            o.status.success(),
            "kubectl apply: {}",
            String::from_utf8_lossy(&o.stderr)
        );
    }

    /// `kubectl get ... -o json`, `None` when it does not exist.
    pub fn get(&self, what: &[&str]) -> Option<Value> {
        let mut args = vec!["get"];
        args.extend_from_slice(what);
        args.extend_from_slice(&["-o", "json"]);
        let o = self.kubectl(&args);
        if !o.status.success() {
            let err = String::from_utf8_lossy(&o.stderr);
            assert!(err.contains("NotFound"), "kubectl {args:?}: {err}");
            return None;
        }
        Some(serde_json::from_slice(&o.stdout).expect("kubectl JSON"))
    }

    /// The repositories' pods bridge made (label `bridge/managed`) in
    /// `namespace`; not the pods of `placement = "cluster"` jobs.
    pub fn bridge_pods(&self, namespace: &str) -> Vec<Value> {
        self.get(&[
            "pods",
            "-n",
            namespace,
            "-l",
            "bridge/managed=true,!bridge/job",
        ])
        .and_then(|v| v["items"].as_array().cloned())
        .unwrap_or_default()
    }

    /// Where `path` inside the pod's `bridge` emptyDir lies on this machine
    /// (the node): the tests read the mirror there.
    pub fn pod_path(&self, namespace: &str, pod: &str, path_in_pod: &str) -> PathBuf {
        let p = self
            .get(&["pod", "-n", namespace, pod])
            .unwrap_or_else(|| panic!("pod {namespace}/{pod} is gone"));
        let uid = p["metadata"]["uid"].as_str().expect("uid");
        let rel = path_in_pod
            .strip_prefix("/bridge/")
            .unwrap_or_else(|| panic!("{path_in_pod} is not under /bridge"));
        self.dir
            .join("kubelet/pods")
            .join(uid)
            .join("volumes/kubernetes.io~empty-dir/bridge")
            .join(rel)
    }

    /// Kills the API server (the script starts it again) and waits until it
    /// answers: every port-forward through it breaks.
    pub fn restart_apiserver(&self) {
        let pid = std::fs::read_to_string(self.dir.join("apiserver.pid")).expect("apiserver.pid");
        let pid: i32 = pid.trim().parse().expect("pid");
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid),
            nix::sys::signal::Signal::SIGKILL,
        );
        let started = Instant::now();
        while started.elapsed() < Duration::from_secs(60) {
            std::thread::sleep(Duration::from_millis(200));
            let now = std::fs::read_to_string(self.dir.join("apiserver.pid")).unwrap_or_default();
            if now.trim() != pid.to_string()
                && self
                    .kubectl(&["get", "--raw", "/readyz", "--request-timeout=2s"])
                    .status
                    .success()
            {
                return;
            }
        }
        panic!("the API server did not come back within 60 s");
    }
}

/// A temporary repository whose `bridge` commands see the cluster's
/// kubeconfig (`KUBECONFIG`), brought down (pod deleted) when dropped.
pub struct K8sRepo {
    pub repo: crate::Repo,
    kubeconfig: PathBuf,
}

impl K8sRepo {
    pub fn new(cluster: &Cluster) -> K8sRepo {
        K8sRepo {
            repo: crate::Repo::new(),
            kubeconfig: cluster.kubeconfig().to_path_buf(),
        }
    }

    /// As another kubeconfig's user (alice's, for refusals).
    pub fn with_kubeconfig(mut self, kubeconfig: PathBuf) -> K8sRepo {
        self.kubeconfig = kubeconfig;
        self
    }

    /// `bridge ARGS` with the kubeconfig.
    pub fn bridge(&self, args: &[&str]) -> Output {
        let k = self.kubeconfig.to_string_lossy().into_owned();
        self.repo.bridge_env(args, &[("KUBECONFIG", &k)])
    }

    /// `bridge ARGS`, asserting success; stdout.
    pub fn ok(&self, args: &[&str]) -> String {
        let k = self.kubeconfig.to_string_lossy().into_owned();
        self.repo.ok_env(args, &[("KUBECONFIG", &k)])
    }

    /// `bridge ARGS`, asserting failure; stderr.
    pub fn fails(&self, args: &[&str]) -> String {
        let o = self.bridge(args);
        assert!(
            !o.status.success(),
            "bridge {args:?} should have failed:\nstdout: {}\nstderr: {}",
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        );
        String::from_utf8_lossy(&o.stderr).into_owned()
    }

    /// `bridge up --provider k8s` on the test image (never pulled) with
    /// `extra` flags.
    pub fn up(&self, extra: &[&str]) -> Output {
        let mut args = vec![
            "up",
            "--provider",
            "k8s",
            "--image",
            "bridge-test/python:3.11",
            "--pull",
            "Never",
        ];
        args.extend_from_slice(extra);
        self.bridge(&args)
    }

    /// `bridge status --json`.
    pub fn status(&self) -> Value {
        serde_json::from_str(&self.ok(&["status", "--json"])).expect("status JSON")
    }
}

impl Drop for K8sRepo {
    fn drop(&mut self) {
        if self.repo.path(".bridge/provider.toml").exists() {
            let _ = self.bridge(&["down", "--force"]);
        }
    }
}

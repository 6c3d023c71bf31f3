//! A real `mlflow server` on 127.0.0.1 (MLflow 3.17.2, the newest that
//! installs here) with a sqlite backend store and its own artifacts
//! destination in a temporary directory, standing for the tracking server on
//! a user's laptop. `tests/run` installs MLflow into a virtual environment of
//! its own ([`venv`]) once.

use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// How long a starting server gets (its first start creates the database).
const START_TIMEOUT: Duration = Duration::from_secs(90);

/// The virtual environment with `mlflow==3.17.2` (`BRIDGE_MLFLOW_VENV`, as
/// `tests/run` exports it, or its default).
pub fn venv() -> PathBuf {
    std::env::var_os("BRIDGE_MLFLOW_VENV")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(std::env::var("HOME").unwrap_or_default())
                .join(".cache/bridge/mlflow-3.17.2-venv")
        })
}

/// Its Python.
pub fn python() -> PathBuf {
    venv().join("bin/python3")
}

/// Fails the test (never skips it) when MLflow is not installed.
pub fn require_mlflow() {
    assert!(
        venv().join("bin/mlflow").is_file(),
        "MLflow is not installed in {}: run tests/run (it installs mlflow==3.17.2 there)",
        venv().display()
    );
}

pub struct MlflowServer {
    child: Child,
    pub port: u16,
    /// Backend store, artifacts and the server's log.
    dir: tempfile::TempDir,
}

impl MlflowServer {
    pub fn start() -> MlflowServer {
        require_mlflow();
        let dir = tempfile::Builder::new()
            .prefix("bridge-mlflow-")
            .tempdir()
            .expect("tempdir");
        let port = crate::sshd::free_port();
        let log = std::fs::File::create(dir.path().join("server.log")).unwrap();
        let child = Command::new(venv().join("bin/mlflow"))
            .args(["server", "--host", "127.0.0.1", "--port"])
            .arg(port.to_string())
            .arg("--backend-store-uri")
            .arg(format!(
                "sqlite:///{}",
                dir.path().join("mlflow.db").display()
            ))
            .arg("--artifacts-destination")
            .arg(dir.path().join("artifacts"))
            .args(["--workers", "1"])
            .current_dir(dir.path())
            // Its own group: the server's workers go with it.
            .process_group(0)
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("start mlflow server");
        let s = MlflowServer { child, port, dir };
        let t = Instant::now();
        loop {
            let up = Command::new(python())
                .args([
                    "-c",
                    "import sys, urllib.request; urllib.request.urlopen(sys.argv[1], timeout=2)",
                ])
                .arg(format!("{}/health", s.uri()))
                .stderr(Stdio::null())
                .status()
                .is_ok_and(|st| st.success());
            if up {
                return s;
            }
            assert!(
                t.elapsed() < START_TIMEOUT,
                "mlflow server did not start within {START_TIMEOUT:?}:\n{}",
                s.log()
            );
            std::thread::sleep(Duration::from_millis(300));
        }
    }

    pub fn uri(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// Where the server keeps artifacts (`--artifacts-destination`).
    pub fn artifacts(&self) -> PathBuf {
        self.dir.path().join("artifacts")
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("server.log")).unwrap_or_default()
    }

    /// Runs `code` in MLflow's Python with `MLFLOW_TRACKING_URI` set to this
    /// server; returns stdout, asserting success.
    pub fn python(&self, code: &str) -> String {
        run_python(code, &[("MLFLOW_TRACKING_URI", &self.uri())], None, &[])
    }
}

/// Runs `code` in MLflow's Python with `env`, in `cwd`, with `args` as
/// `sys.argv[1:]`; returns stdout, asserting success.
pub fn run_python(code: &str, env: &[(&str, &str)], cwd: Option<&Path>, args: &[&str]) -> String {
    let mut c = Command::new(python());
    c.args(["-c", code]).args(args).envs(env.iter().copied());
    if let Some(d) = cwd {
        c.current_dir(d);
    }
    let o = c.output().expect("run MLflow's python");
    assert!(
        o.status.success(),
        "python failed:\n{code}\nstdout: {}\nstderr: {}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8_lossy(&o.stdout).into_owned()
}

impl Drop for MlflowServer {
    fn drop(&mut self) {
        let _ = nix::sys::signal::killpg(
            nix::unistd::Pid::from_raw(self.child.id() as i32),
            nix::sys::signal::Signal::SIGKILL,
        );
        let _ = self.child.wait();
    }
}

//! The local provider: an agent process on this machine, over a Unix socket.
//!
//! Its files live in the repository's `.bridge/`: `agent/` (the agent's root,
//! holding the mirror), `agent.sock`, `agent.pid`, `agent.log`. The agent runs
//! in its own process group, so a Ctrl-C in the terminal that ran `bridge up`
//! does not reach it; `bridge down` stops it.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use hyper_util::rt::TokioIo;
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use tokio::net::UnixStream;
use tonic::transport::{Channel, Endpoint, Uri};

use super::{BoxFuture, Provider, ProviderError};

pub struct LocalProvider {
    /// The `bridge-agent` executable.
    pub agent_bin: PathBuf,
    /// The agent's `--root`.
    pub root: PathBuf,
    pub socket: PathBuf,
    pub token_file: PathBuf,
    pub pid_file: PathBuf,
    pub log_file: PathBuf,
}

impl LocalProvider {
    /// The standard layout under a repository's `.bridge/`.
    pub fn in_state_dir(state: &Path, agent_bin: PathBuf) -> LocalProvider {
        LocalProvider {
            agent_bin,
            root: state.join("agent"),
            socket: state.join("agent.sock"),
            token_file: state.join("token"),
            pid_file: state.join("agent.pid"),
            log_file: state.join("agent.log"),
        }
    }

    /// Whether the agent may still have work to stop: it runs, or a job's
    /// directory has no exit record yet (its shim may run without it).
    pub fn may_have_work(&self) -> bool {
        self.pid().is_some()
            || std::fs::read_dir(self.root.join("jobs")).is_ok_and(|d| {
                d.flatten().any(|e| {
                    let dir = e.path();
                    dir.join("spec.json").exists() && !dir.join("exit.json").exists()
                })
            })
    }

    /// The agent's pid, if the pid file names a live `bridge-agent` (a stale
    /// file may name a recycled pid: never signal that).
    fn pid(&self) -> Option<Pid> {
        let pid: i32 = std::fs::read_to_string(&self.pid_file)
            .ok()?
            .trim()
            .parse()
            .ok()?;
        let is_agent = argv0(pid)?.ends_with(b"bridge-agent");
        is_agent.then_some(Pid::from_raw(pid))
    }

    async fn start(&self) -> Result<(), ProviderError> {
        if !self.agent_bin.exists() {
            return Err(ProviderError::fatal(format!(
                "cannot find the agent binary at {} (build it with `cargo build`, or set BRIDGE_AGENT_BIN)",
                self.agent_bin.display()
            )));
        }
        let log = std::fs::File::create(&self.log_file).map_err(|e| {
            ProviderError::fatal(format!("cannot create {}: {e}", self.log_file.display()))
        })?;
        let mut cmd = std::process::Command::new(&self.agent_bin);
        cmd.arg("serve")
            .arg("--root")
            .arg(&self.root)
            .arg("--listen")
            .arg(format!("unix:{}", self.socket.display()))
            .arg("--token-file")
            .arg(&self.token_file)
            .stdin(Stdio::null())
            .stdout(
                log.try_clone()
                    .map_err(|e| ProviderError::fatal(e.to_string()))?,
            )
            .stderr(log);
        std::os::unix::process::CommandExt::process_group(&mut cmd, 0);
        let mut child = cmd.spawn().map_err(|e| {
            ProviderError::fatal(format!("cannot start {}: {e}", self.agent_bin.display()))
        })?;
        let pid = child.id();
        std::fs::write(&self.pid_file, pid.to_string()).map_err(|e| {
            ProviderError::fatal(format!("cannot write {}: {e}", self.pid_file.display()))
        })?;
        // Reap the child whenever it exits, so it never lingers as a zombie.
        std::thread::spawn(move || {
            let _ = child.wait();
        });
        for _ in 0..200 {
            if UnixStream::connect(&self.socket).await.is_ok() {
                return Ok(());
            }
            if kill(Pid::from_raw(pid as i32), None).is_err() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        let log = std::fs::read_to_string(&self.log_file).unwrap_or_default();
        Err(ProviderError::retryable(format!(
            "the local agent did not start: {}",
            log.lines().last().unwrap_or("no output")
        )))
    }
}

impl Provider for LocalProvider {
    fn name(&self) -> &'static str {
        "local"
    }

    fn address(&self) -> String {
        format!("unix:{}", self.socket.display())
    }

    fn ensure_agent(&self) -> BoxFuture<'_, Result<(), ProviderError>> {
        Box::pin(async move {
            if UnixStream::connect(&self.socket).await.is_ok() {
                return Ok(());
            }
            self.start().await
        })
    }

    fn connect(&self) -> BoxFuture<'_, Result<Channel, ProviderError>> {
        let socket = self.socket.clone();
        Box::pin(async move {
            let connector = tower::service_fn(move |_: Uri| {
                let socket = socket.clone();
                async move { UnixStream::connect(socket).await.map(TokioIo::new) }
            });
            Endpoint::from_static("http://agent.local")
                .connect_timeout(Duration::from_secs(5))
                .connect_with_connector(connector)
                .await
                .map_err(|e| ProviderError::retryable(format!("cannot reach the local agent: {e}")))
        })
    }

    fn purge(&self) -> BoxFuture<'_, Result<(), ProviderError>> {
        Box::pin(async move {
            match std::fs::remove_dir_all(&self.root) {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(ProviderError::fatal(
                    format!("cannot remove {}: {e}", self.root.display()),
                )),
                _ => Ok(()),
            }
        })
    }

    fn teardown(&self) -> BoxFuture<'_, Result<(), ProviderError>> {
        Box::pin(async move {
            if let Some(pid) = self.pid()
                && kill(pid, Signal::SIGTERM).is_ok()
            {
                for _ in 0..200 {
                    if kill(pid, None).is_err() {
                        break;
                    }
                    tokio::time::sleep(Duration::from_millis(25)).await;
                }
                if kill(pid, None).is_ok() {
                    let _ = kill(pid, Signal::SIGKILL);
                }
            }
            let _ = std::fs::remove_file(&self.pid_file);
            let _ = std::fs::remove_file(&self.socket);
            Ok(())
        })
    }

    fn link_is_fast(&self) -> bool {
        true
    }
}

/// The program a live process runs (its argv[0]), `None` when there is no
/// such process.
#[cfg(target_os = "linux")]
fn argv0(pid: i32) -> Option<Vec<u8>> {
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
    cmdline.split(|b| *b == 0).next().map(<[u8]>::to_vec)
}

/// The program a live process runs, from `ps` (no `/proc` on macOS or the
/// BSDs), `None` when there is no such process.
#[cfg(not(target_os = "linux"))]
fn argv0(pid: i32) -> Option<Vec<u8>> {
    let out = std::process::Command::new("ps")
        .args(["-o", "comm=", "-p", &pid.to_string()])
        .output()
        .ok()
        .filter(|o| o.status.success())?;
    let comm = out.stdout.trim_ascii().to_vec();
    (!comm.is_empty()).then_some(comm)
}

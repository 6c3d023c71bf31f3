//! What every command needs: the repository and a connection to its daemon.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::anyhow;
use bridge_daemon::repo::{Layout, find_repo};
use bridge_proto::v1::control_client::ControlClient;
use tonic::transport::Channel;

/// The repository containing `cwd`, or a clear error.
pub fn repo(cwd: &Path) -> anyhow::Result<Layout> {
    let root = find_repo(cwd).ok_or_else(|| {
        anyhow!(
            "{} is not inside a git repository; bridge mirrors the repository you run it in \
             (cd into one, or run `git init`)",
            cwd.display()
        )
    })?;
    Ok(Layout::new(&root))
}

/// A client for the repository's daemon, if one answers.
pub async fn daemon(layout: &Layout) -> Option<ControlClient<Channel>> {
    if !layout.control.exists() {
        return None;
    }
    let ch = bridge_daemon::control::unix_channel(&layout.control, Duration::from_secs(2))
        .await
        .ok()?;
    let mut c = ControlClient::new(ch);
    c.status(bridge_proto::v1::StatusRequest {}).await.ok()?;
    Some(c)
}

/// Like [`daemon`], but an error telling the user to run `bridge up`.
pub async fn require_daemon(layout: &Layout) -> anyhow::Result<ControlClient<Channel>> {
    daemon(layout).await.ok_or_else(|| {
        anyhow!(
            "bridge is not running for {}; start it with `bridge up`",
            layout.repo.display()
        )
    })
}

/// Where this repository's jobs run, for the first line of `bridge run` and
/// `bridge exec`: `local agent`, `ssh root@gpubox`, `aws i-0abc (g5.xlarge, …)`.
pub fn place(layout: &Layout) -> String {
    bridge_daemon::provider::ProviderSpec::load(&layout.provider)
        .ok()
        .flatten()
        .unwrap_or(bridge_daemon::provider::ProviderSpec::Local)
        .describe()
}

/// The GPUs a job holds, for people: `1 GPU (0)`, `2 GPUs (0, 1)`, `no GPU`.
pub fn gpus_held(gpus: &[u32]) -> String {
    match gpus {
        [] => "no GPU".into(),
        [g] => format!("1 GPU ({g})"),
        gs => format!(
            "{} GPUs ({})",
            gs.len(),
            gs.iter().map(u32::to_string).collect::<Vec<_>>().join(", ")
        ),
    }
}

/// The `bridge-agent` binary: `$BRIDGE_AGENT_BIN`, else next to this executable,
/// else on `PATH`.
pub fn agent_bin() -> PathBuf {
    if let Some(p) = std::env::var_os("BRIDGE_AGENT_BIN") {
        return PathBuf::from(p);
    }
    if let Some(dir) = std::env::current_exe()
        .ok()
        .and_then(|e| e.parent().map(Path::to_path_buf))
    {
        let p = dir.join("bridge-agent");
        if p.exists() {
            return p;
        }
    }
    std::env::var_os("PATH")
        .and_then(|paths| {
            std::env::split_paths(&paths)
                .map(|d| d.join("bridge-agent"))
                .find(|p| p.exists())
        })
        .unwrap_or_else(|| PathBuf::from("bridge-agent"))
}

/// Formats a byte count for people.
pub use bridge_proto::human_bytes;

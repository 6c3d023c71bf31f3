//! The daemon's status: the schema of `bridge status --json`.

use serde::{Deserialize, Serialize};

use crate::watcher::Mode;

/// Connection to the agent.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "snake_case")]
pub enum Connection {
    #[default]
    Connecting,
    Connected,
    Reconnecting,
    Disconnected,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Skipped {
    pub path: String,
    pub reason: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Status {
    pub repo: String,
    pub provider: String,
    pub agent_address: String,
    pub agent_version: String,
    pub agent_host: String,
    /// The mirror's absolute path on the agent's machine.
    pub mirror_path: String,
    pub connection: Connection,
    /// Why the last connection attempt or round failed, if it did.
    pub last_error: Option<String>,
    /// Sync rounds that changed the mirror.
    pub generation: u64,
    /// Root of the local tree (hex).
    pub local_root: String,
    /// Root the agent reported last (hex).
    pub remote_root: String,
    pub in_sync: bool,
    /// Changes noticed and not yet in the mirror (dirty scopes queued).
    pub pending_changes: usize,
    /// Time from the first event of the last synced burst to the agent's ack.
    pub last_latency_ms: Option<f64>,
    pub files: u64,
    pub bytes: u64,
    pub watcher: Mode,
    pub watches: usize,
    pub skipped: Vec<Skipped>,
    /// Files read and hashed since the daemon started.
    pub files_hashed: u64,
    /// Protocol bytes sent to the agent since start (plans and chunk bodies).
    pub bytes_sent: u64,
    /// Chunk bodies sent since start.
    pub chunks_sent: u64,
    pub daemon_pid: u32,
    /// Jobs this daemon has submitted since it started.
    pub jobs_submitted: u64,
    /// The agent's GPUs (filled in when status is asked for).
    pub gpus: Vec<GpuStatus>,
    /// Why the agent found no GPUs, when discovery failed.
    pub gpu_note: String,
    /// The agent's idle autostop, as it last answered this daemon's ping;
    /// `None` when the agent has none or nothing was heard on this link.
    pub autostop: Option<Autostop>,
    /// Port forwards (filled in when status is asked for).
    #[serde(default)]
    pub forwards: Vec<ForwardStatus>,
}

/// One port forward, as `bridge status --json` and `bridge forward --list
/// --json` show it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct ForwardStatus {
    pub id: String,
    /// "local" (laptop → agent) or "reverse" (agent → laptop).
    pub direction: String,
    /// The laptop's port: listening (local) or connected to (reverse).
    pub local_port: u16,
    /// The agent's port: connected to (local) or listening (reverse; 0
    /// until the agent has answered).
    pub remote_port: u16,
    /// A label ("TensorBoard"), if any.
    pub name: Option<String>,
    /// The job it belongs to; none for `bridge forward`'s own.
    pub job: Option<String>,
    /// "listening", "waiting for the agent: …", "failed: …".
    pub state: String,
    /// Connections carried so far, and open now.
    pub connections: u64,
    pub open: u32,
}

impl From<&bridge_proto::v1::ForwardInfo> for ForwardStatus {
    fn from(f: &bridge_proto::v1::ForwardInfo) -> ForwardStatus {
        let spec = f.spec.clone().unwrap_or_default();
        ForwardStatus {
            id: f.id.clone(),
            direction: match spec.direction() {
                bridge_proto::v1::forward_spec::Direction::Local => "local",
                bridge_proto::v1::forward_spec::Direction::Reverse => "reverse",
            }
            .into(),
            local_port: f.local_port as u16,
            remote_port: f.remote_port as u16,
            name: (!spec.name.is_empty()).then_some(spec.name),
            job: (!f.job.is_empty()).then(|| f.job.clone()),
            state: f.state.clone(),
            connections: f.connections,
            open: f.open,
        }
    }
}

/// The agent stops its machine (runs `command`) after `timeout_s` with no
/// job queued or running and no daemon attached.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Autostop {
    pub timeout_s: u64,
    /// Seconds until it runs if nothing changes; equals `timeout_s` while
    /// held (this daemon, attached, holds it).
    pub shutdown_in_s: u64,
    /// Jobs queued, in setup or running on the agent (all mirrors).
    pub jobs_active: u32,
    /// Daemons attached to the agent, this one included.
    pub daemons: u32,
    pub command: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct GpuStatus {
    pub index: u32,
    pub name: String,
    pub memory_total_mib: u64,
    pub memory_used_mib: u64,
    pub utilization_pct: u32,
    /// The job holding it, if any.
    pub job: Option<String>,
}

impl Status {
    pub fn new(repo: String, provider: String, agent_address: String) -> Status {
        Status {
            repo,
            provider,
            agent_address,
            agent_version: String::new(),
            agent_host: String::new(),
            mirror_path: String::new(),
            connection: Connection::Connecting,
            last_error: None,
            generation: 0,
            local_root: String::new(),
            remote_root: String::new(),
            in_sync: false,
            pending_changes: 0,
            last_latency_ms: None,
            files: 0,
            bytes: 0,
            watcher: Mode::Inotify,
            watches: 0,
            skipped: Vec::new(),
            files_hashed: 0,
            bytes_sent: 0,
            chunks_sent: 0,
            daemon_pid: std::process::id(),
            jobs_submitted: 0,
            gpus: Vec::new(),
            gpu_note: String::new(),
            autostop: None,
            forwards: Vec::new(),
        }
    }
}

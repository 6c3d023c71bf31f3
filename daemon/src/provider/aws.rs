//! The AWS EC2 provider: `bridge up --provider aws` launches a GPU instance,
//! then the SSH provider takes over (agent install, tunnel, sync).
//!
//! The lifecycle ([`lifecycle::AwsMachine`], a [`super::machine::Machine`])
//! runs in the `bridge` command (`up`, `down`, `status`), never in the
//! daemon: the daemon only sees an SSH host, a key and a per-instance
//! known-hosts file ([`ssh_config`]), and, when `bridge up` found the
//! laptop's public address itself, the security group rule to keep pointed
//! at it ([`FollowAddress`]): a laptop that moves to another network is let
//! in again. The instance shuts itself
//! down when idle (the agent's `--idle-timeout`), with the instance's
//! shutdown behaviour set to terminate or stop, so a forgotten laptop does
//! not keep a GPU billed.
//!
//! # Layout
//! - [`catalog`]: the GPU instance types, their GPUs and prices.
//! - [`ec2`]: the SDK client (credential chain, region, endpoint) and error
//!   messages.
//! - [`access`]: the bridge key pair and the SSH security group.
//! - [`instance`]: image lookup, launch, waits, status, terminate, cleanup.
//! - [`lifecycle`]: what `bridge up`, `down` and `status` do with them.

pub mod access;
pub mod catalog;
pub mod ec2;
pub mod instance;
pub mod lifecycle;

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

pub use super::machine::{human_duration, owner, parse_duration};
use super::ssh::SshConfig;

/// Tag keys on everything bridge creates.
pub const TAG_MANAGED: &str = "bridge:managed";
pub const TAG_REPO: &str = "bridge:repo";
pub const TAG_OWNER: &str = "bridge:owner";

/// What the agent runs when idle: the instance's shutdown behaviour turns a
/// shutdown into terminate or stop.
pub const DEFAULT_IDLE_COMMAND: &str = "sudo -n shutdown -h now";

/// The default `--idle-timeout`.
pub const DEFAULT_IDLE_TIMEOUT: Duration = Duration::from_secs(30 * 60);

/// Test hook: `[user@]host:port` to reach instead of the instance's public
/// address (the EC2 emulator's addresses are made up).
pub const SSH_ENDPOINT_ENV: &str = "BRIDGE_AWS_SSH_ENDPOINT";

/// How often an unreachable instance makes the daemon look at the laptop's
/// public address again, at most.
const FOLLOW_EVERY: Duration = Duration::from_secs(15);

/// The SSH rule of the bridge security group, kept pointed at this
/// machine's public address by the daemon when `bridge up` looked that
/// address up itself (no `--ssh-cidr`). When the instance stops answering
/// (the laptop moved to another network, so the group drops its packets),
/// [`FollowAddress::check`] looks the address up again and, when it
/// changed, moves the rule there (the old one is revoked); the next
/// reconnect gets in.
#[derive(Debug, Clone)]
pub struct FollowAddress {
    account: ec2::Account,
    owner: String,
    last: std::sync::Arc<std::sync::Mutex<Option<std::time::Instant>>>,
}

impl FollowAddress {
    pub fn new(account: ec2::Account) -> FollowAddress {
        FollowAddress {
            account,
            owner: owner(),
            last: Default::default(),
        }
    }

    /// The instance could not be reached: at most every [`FOLLOW_EVERY`],
    /// makes the group's SSH rule allow the current public address.
    pub async fn check(&self) {
        {
            let mut last = self.last.lock().unwrap_or_else(|e| e.into_inner());
            if last.is_some_and(|t| t.elapsed() < FOLLOW_EVERY) {
                return;
            }
            *last = Some(std::time::Instant::now());
        }
        let cidr = match access::public_cidr().await {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!(error = %e, "the instance is unreachable; cannot check this machine's address");
                return;
            }
        };
        let ec2 = match ec2::connect(&self.account).await {
            Ok(e) => e,
            Err(e) => {
                tracing::warn!(error = %e, "cannot update the bridge security group");
                return;
            }
        };
        match access::follow_address(&ec2, &cidr, &self.owner).await {
            Ok(true) => tracing::info!(
                %cidr,
                "this machine's public address changed: the bridge security group now allows SSH from it"
            ),
            Ok(false) => tracing::debug!(%cidr, "the security group already allows this machine"),
            Err(e) => tracing::warn!(error = %e, "cannot update the bridge security group"),
        }
    }
}

/// What `--on-idle` does to the instance.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum OnIdle {
    #[default]
    Terminate,
    Stop,
}

impl OnIdle {
    pub fn as_str(self) -> &'static str {
        match self {
            OnIdle::Terminate => "terminate",
            OnIdle::Stop => "stop",
        }
    }
}

/// How to launch an instance: the flags of the `bridge up` that chose AWS,
/// kept so that a later `bridge up` launches the same again.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Launch {
    pub instance_type: String,
    /// `--ami`; else the newest Deep Learning AMI.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ami: Option<String>,
    #[serde(default)]
    pub spot: bool,
    /// Root volume size.
    pub disk_gb: u32,
    #[serde(default)]
    pub on_idle: OnIdle,
    pub idle_timeout_s: u64,
    /// Run by the agent when idle.
    pub idle_command: String,
    /// `--ssh-cidr`; else this machine's public address.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ssh_cidr: Option<String>,
    /// `--remote-dir`: where the agent keeps its files on the instance
    /// (default `~/.bridge`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub remote_dir: Option<String>,
}

/// The launched instance.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Instance {
    pub id: String,
    /// `user@host:port` the SSH provider connects to.
    pub ssh: String,
    /// The security group it was launched in (deleted with the last instance).
    pub security_group: String,
}

/// bridge's files for AWS: `$XDG_CONFIG_HOME/bridge/aws` (`~/.config/…`).
pub fn config_dir() -> PathBuf {
    let home = std::env::var_os("HOME")
        .filter(|h| !h.is_empty())
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/"));
    std::env::var_os("XDG_CONFIG_HOME")
        .map(PathBuf::from)
        .filter(|p| p.is_absolute())
        .unwrap_or_else(|| home.join(".config"))
        .join("bridge")
        .join("aws")
}

/// The private key of the bridge key pair (0600).
pub fn key_path(dir: &Path) -> PathBuf {
    dir.join("id_ed25519")
}

/// The known-hosts file of one instance: its host key is recorded on first
/// contact and checked afterwards; a recycled address of another instance
/// never matches a stale entry.
pub fn known_hosts_path(dir: &Path, instance_id: &str) -> PathBuf {
    dir.join("known_hosts").join(instance_id)
}

/// The SSH provider's configuration for a launched instance.
pub fn ssh_config(
    account: ec2::Account,
    launch: &Launch,
    instance: &Instance,
    agent_bin: PathBuf,
) -> SshConfig {
    let dir = config_dir();
    let mut c = SshConfig::new(instance.ssh.clone(), agent_bin);
    c.identity = Some(key_path(&dir));
    c.accept_new_host_key = true;
    c.bridge_known_hosts = known_hosts_path(&dir, &instance.id);
    c.user_known_hosts = false;
    c.remote_dir = launch.remote_dir.clone();
    c.agent_args = vec![
        "--idle-timeout".into(),
        launch.idle_timeout_s.to_string(),
        "--idle-command".into(),
        launch.idle_command.clone(),
    ];
    if launch.ssh_cidr.is_none() {
        c.follow_address = Some(FollowAddress::new(account));
    }
    c
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ssh_config_pins_the_instance() {
        let launch = Launch {
            instance_type: "g5.xlarge".into(),
            ami: None,
            spot: false,
            disk_gb: 100,
            on_idle: OnIdle::Terminate,
            idle_timeout_s: 1800,
            idle_command: DEFAULT_IDLE_COMMAND.into(),
            ssh_cidr: None,
            remote_dir: None,
        };
        let inst = Instance {
            id: "i-0abc".into(),
            ssh: "ubuntu@1.2.3.4:22".into(),
            security_group: "sg-1".into(),
        };
        let c = ssh_config(ec2::Account::default(), &launch, &inst, "/bin/agent".into());
        assert!(c.accept_new_host_key && !c.user_known_hosts);
        assert!(c.bridge_known_hosts.ends_with("known_hosts/i-0abc"));
        assert_eq!(c.agent_args[1], "1800");
        assert_eq!(c.agent_args[3], DEFAULT_IDLE_COMMAND);
    }
}

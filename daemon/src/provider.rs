//! Providers: where the agent runs and how bytes reach it.
//!
//! A provider (1) makes sure an agent runs somewhere, (2) hands the daemon a
//! bidirectional byte stream to it, on which gRPC runs, and (3) tears it down.
//! Transport, auth and reconnection are written once, above this trait.
//!
//! - [`local`]: an agent process on this machine, over a Unix socket (the default).
//! - [`ssh`]: a shared agent on a remote machine, over one multiplexed SSH connection.
//! - [`aws`]: an EC2 instance bridge launches, then reaches like [`ssh`].
//! - [`k8s`]: a pod bridge creates on a Kubernetes cluster, reached through
//!   the API server's port-forward.
//!
//! A [`ProviderSpec`] (the choice `bridge up` saved) opens its provider for
//! the daemon ([`ProviderSpec::open`]); one that owns a machine also has a
//! lifecycle the command line drives ([`ProviderSpec::machine`],
//! [`machine::Machine`]).

#[cfg(feature = "aws")]
pub mod aws;
#[cfg(feature = "k8s")]
pub mod k8s;
pub mod local;
pub mod machine;
#[cfg(feature = "ssh")]
pub mod ssh;

use std::future::Future;
use std::io;
use std::path::{Path, PathBuf};
use std::pin::Pin;

use serde::{Deserialize, Serialize};

use tonic::transport::Channel;

/// Where the agent runs, as `bridge up` chose it: saved in
/// `.bridge/provider.toml`, so the daemon (also one a job command restarts)
/// and later `bridge up`s use the same agent.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "provider", rename_all = "lowercase", deny_unknown_fields)]
pub enum ProviderSpec {
    /// An agent process on this machine (the default).
    Local,
    /// An agent on a machine reached over SSH.
    Ssh {
        /// `[user@]host[:port]` or a `Host` alias of `~/.ssh/config`.
        host: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        identity: Option<PathBuf>,
        /// Record an unknown host key (in bridge's own known-hosts file).
        #[serde(default)]
        accept_new_host_key: bool,
        /// Where the agent keeps its files on the remote (default `~/.bridge`).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        remote_dir: Option<String>,
    },
    /// An EC2 instance bridge launched (and terminates), reached over SSH.
    #[cfg(feature = "aws")]
    Aws {
        region: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        profile: Option<String>,
        /// How to launch it (again, after `bridge down`).
        launch: aws::Launch,
        /// The running (or stopped) instance; none after `bridge down`.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        instance: Option<aws::Instance>,
    },
    /// A pod bridge created (and deletes) on a Kubernetes cluster.
    #[cfg(feature = "k8s")]
    K8s {
        /// How to make it (again, after `bridge down`).
        launch: k8s::Launch,
        /// The pod's name while it exists.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        pod: Option<String>,
    },
}

impl ProviderSpec {
    /// The saved choice; `None` when there is none.
    pub fn load(path: &Path) -> io::Result<Option<ProviderSpec>> {
        match std::fs::read_to_string(path) {
            Ok(text) => toml::from_str(&text)
                .map(Some)
                .map_err(|e| io::Error::other(format!("{}: {e}", path.display()))),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e),
        }
    }

    pub fn save(&self, path: &Path) -> io::Result<()> {
        let text = toml::to_string(self).map_err(io::Error::other)?;
        bridge_proto::index::write_atomic(path, text.as_bytes())
    }

    pub fn name(&self) -> &'static str {
        match self {
            ProviderSpec::Local => "local",
            ProviderSpec::Ssh { .. } => "ssh",
            #[cfg(feature = "aws")]
            ProviderSpec::Aws { .. } => "aws",
            #[cfg(feature = "k8s")]
            ProviderSpec::K8s { .. } => "k8s",
        }
    }

    /// Where jobs run, for people: `local agent`, `ssh root@gpubox`,
    /// `aws i-0abc (g5.xlarge, us-east-1)`.
    pub fn describe(&self) -> String {
        match self {
            ProviderSpec::Local => "local agent".into(),
            ProviderSpec::Ssh { host, .. } => format!("ssh {host}"),
            #[cfg(feature = "aws")]
            ProviderSpec::Aws {
                region,
                launch,
                instance,
                ..
            } => match instance {
                Some(i) => format!("aws {} ({}, {region})", i.id, launch.instance_type),
                None => format!("aws {} in {region}", launch.instance_type),
            },
            #[cfg(feature = "k8s")]
            ProviderSpec::K8s { launch, pod } => {
                let ns = if launch.namespace.is_empty() {
                    "default"
                } else {
                    &launch.namespace
                };
                match pod {
                    Some(p) => format!("k8s pod {ns}/{p}"),
                    None => format!("k8s, a new pod in {ns}"),
                }
            }
        }
    }
}

impl ProviderSpec {
    /// The daemon's provider for this choice. `agent_bin`: the agent binary
    /// to start or upload. `BRIDGE_SSH_DIR` stands in for `~/.ssh` (config,
    /// known_hosts, default keys) and `BRIDGE_KNOWN_HOSTS` for bridge's own
    /// known-hosts file (tests, and users who keep them apart).
    pub fn open(self, agent_bin: PathBuf) -> Result<crate::ProviderConfig, String> {
        Ok(match self {
            ProviderSpec::Local => crate::ProviderConfig::Local { agent_bin },
            #[cfg(feature = "aws")]
            ProviderSpec::Aws {
                region,
                profile,
                launch,
                instance,
            } => {
                let Some(instance) = instance.filter(|i| !i.ssh.is_empty()) else {
                    return Err("no AWS instance is up for this repository: run `bridge up`".into());
                };
                let account = aws::ec2::Account {
                    profile,
                    region: Some(region),
                };
                let mut c = aws::ssh_config(account, &launch, &instance, agent_bin);
                if let Some(d) = std::env::var_os("BRIDGE_SSH_DIR") {
                    c.ssh_dir = d.into();
                }
                crate::ProviderConfig::Ssh(c)
            }
            #[cfg(feature = "k8s")]
            ProviderSpec::K8s { launch, pod } => {
                let Some(pod) = pod else {
                    return Err("no pod is up for this repository: run `bridge up`".into());
                };
                crate::ProviderConfig::K8s(k8s::K8sConfig {
                    context: launch.context,
                    namespace: launch.namespace,
                    pod,
                })
            }
            #[cfg(not(feature = "ssh"))]
            ProviderSpec::Ssh { .. } => {
                return Err(
                    "this bridge was built without the SSH provider (cargo feature `ssh`)".into(),
                );
            }
            #[cfg(feature = "ssh")]
            ProviderSpec::Ssh {
                host,
                identity,
                accept_new_host_key,
                remote_dir,
            } => {
                let mut c = ssh::SshConfig::new(host, agent_bin);
                c.identity = identity;
                c.accept_new_host_key = accept_new_host_key;
                c.remote_dir = remote_dir;
                if let Some(d) = std::env::var_os("BRIDGE_SSH_DIR") {
                    c.ssh_dir = d.into();
                }
                if let Some(f) = std::env::var_os("BRIDGE_KNOWN_HOSTS") {
                    c.bridge_known_hosts = f.into();
                }
                crate::ProviderConfig::Ssh(c)
            }
        })
    }

    /// The machine this provider owns for the repository (AWS: its
    /// instance, Kubernetes: its pod); `None` for providers that reach a
    /// machine someone else runs (local, SSH). `agent_bin`: the agent binary
    /// to copy there, where the machine's provider does that itself.
    pub fn machine(
        &self,
        layout: &crate::repo::Layout,
        agent_bin: PathBuf,
    ) -> Option<Box<dyn machine::Machine>> {
        match self {
            #[cfg(feature = "aws")]
            ProviderSpec::Aws { .. } => aws::lifecycle::AwsMachine::new(self, layout)
                .map(|m| Box::new(m) as Box<dyn machine::Machine>),
            #[cfg(feature = "k8s")]
            ProviderSpec::K8s { .. } => k8s::lifecycle::K8sMachine::new(self, layout, agent_bin)
                .map(|m| Box::new(m) as Box<dyn machine::Machine>),
            _ => {
                let _ = (layout, agent_bin);
                None
            }
        }
    }
}

pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// A byte stream to a port on the agent's machine.
pub trait PortStream: tokio::io::AsyncRead + tokio::io::AsyncWrite + Send + Unpin {}
impl<T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Send + Unpin> PortStream for T {}

/// Why [`Provider::dial`] gave no stream.
#[derive(Debug, thiserror::Error)]
pub enum DialError {
    /// The connection reached the agent's machine; nothing listens there.
    #[error("nothing listens on 127.0.0.1:{port} on the agent ({why})")]
    NothingListens { port: u16, why: String },
    /// The provider's transport will not carry it (an SSH server that
    /// forbids TCP forwarding): use the gRPC tunnel instead, from now on.
    #[error("{0}")]
    Unsupported(String),
    /// The link is down; worth retrying.
    #[error("{0}")]
    Link(String),
}

/// A gRPC channel over the streams `open` makes (an SSH channel, a
/// port-forward): the first is opened now, so that its failure is reported
/// precisely, as the error; tonic's reconnects open new ones. The inner
/// result is tonic's connect on that first stream.
pub async fn channel_over<S, F, Fut>(
    uri: &'static str,
    timeout: std::time::Duration,
    open: F,
) -> Result<Result<Channel, tonic::transport::Error>, ProviderError>
where
    F: Fn() -> Fut + Clone + Send + Sync + 'static,
    Fut: Future<Output = Result<S, ProviderError>> + Send + 'static,
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Send + Unpin + 'static,
{
    let first = open().await?;
    let first = std::sync::Arc::new(std::sync::Mutex::new(Some(first)));
    let connector = tower::service_fn(move |_: tonic::transport::Uri| {
        let open = open.clone();
        let first = first.clone();
        async move {
            let ready = first.lock().unwrap_or_else(|p| p.into_inner()).take();
            let stream = match ready {
                Some(s) => s,
                None => open().await?,
            };
            Ok::<_, ProviderError>(hyper_util::rt::TokioIo::new(stream))
        }
    });
    Ok(tonic::transport::Endpoint::from_static(uri)
        .connect_timeout(timeout)
        .connect_with_connector(connector)
        .await)
}

/// A provider failure; `retryable` tells the connection manager whether to try
/// again with backoff or to stop and report.
#[derive(Debug, thiserror::Error)]
#[error("{message}")]
pub struct ProviderError {
    pub message: String,
    pub retryable: bool,
}

impl ProviderError {
    pub fn retryable(message: impl Into<String>) -> Self {
        ProviderError {
            message: message.into(),
            retryable: true,
        }
    }

    pub fn fatal(message: impl Into<String>) -> Self {
        ProviderError {
            message: message.into(),
            retryable: false,
        }
    }
}

pub trait Provider: Send + Sync {
    /// Short name for status ("local", "ssh", …).
    fn name(&self) -> &'static str;

    /// Where the agent is, for people.
    fn address(&self) -> String;

    /// Starts the agent unless one is already serving.
    fn ensure_agent(&self) -> BoxFuture<'_, Result<(), ProviderError>>;

    /// A gRPC channel over a fresh byte stream to the agent.
    fn connect(&self) -> BoxFuture<'_, Result<Channel, ProviderError>>;

    /// What a long [`Provider::ensure_agent`] is doing ("uploading the agent
    /// (31.2 MiB)"; `None` between such steps), for `bridge up`'s progress.
    /// `None`: this provider has nothing to say.
    fn activity(&self) -> Option<tokio::sync::watch::Receiver<Option<String>>> {
        None
    }

    /// Stops the agent this provider started.
    fn teardown(&self) -> BoxFuture<'_, Result<(), ProviderError>>;

    /// True when the link is faster than compression (then chunks go raw).
    fn link_is_fast(&self) -> bool;

    /// The token the daemon must present to this provider's agent, known
    /// after `ensure_agent`: a remote agent shared by every repository of its
    /// user keeps its own. `None`: the repository's `.bridge/token`.
    fn agent_token(&self) -> Option<String> {
        None
    }

    /// `bridge down --remote`: stop the agent itself, wherever it runs (the
    /// local provider's `teardown` already does).
    fn stop_agent(&self) -> BoxFuture<'_, Result<(), ProviderError>> {
        self.teardown()
    }

    /// `bridge down --purge`: remove everything the agent keeps (mirrors,
    /// jobs, caches). Called after `stop_agent`.
    fn purge(&self) -> BoxFuture<'_, Result<(), ProviderError>> {
        Box::pin(async { Ok(()) })
    }

    /// Dials 127.0.0.1:`port` on the agent's machine over the provider's own
    /// transport, for a local port forward, when it has one cheaper than the
    /// `Tunnels` gRPC stream through the agent: SSH opens a `direct-tcpip`
    /// channel on the connection it already has (the data then skips the
    /// agent and HTTP/2: ~1.5x the throughput). `None` (the default): the
    /// tunnel carries it. Only ever a loopback address.
    fn dial(&self, _port: u16) -> Option<BoxFuture<'_, Result<Box<dyn PortStream>, DialError>>> {
        None
    }

    /// Whether `bridge down` stops the agent (and cancels this repository's
    /// jobs): true for an agent private to the repository, false for a shared
    /// remote one, which keeps running (with its jobs) until `--remote`.
    fn down_stops_agent(&self) -> bool {
        true
    }
}

//! The SSH provider: `bridge-agent` on a remote machine, reached over one
//! multiplexed SSH connection.
//!
//! One SSH session per provider carries everything: `exec` channels for
//! installing and starting the agent, and one `direct-streamlocal` channel
//! (OpenSSH's Unix-socket forwarding) per HTTP/2 connection to the agent's
//! socket. Nothing listens on a TCP port on either side.
//!
//! The agent is shared by every repository of the remote user: it lives in
//! `~/.bridge` there (see [`remote`] for the layout), survives the SSH
//! session (`setsid nohup`), is reused while it runs the binary we would
//! upload, and is upgraded in place otherwise. Its token lives on the remote
//! too, so the daemon learns it from [`SshProvider::agent_token`] after
//! `ensure_agent`. `bridge down` ([`Provider::teardown`]) only closes the
//! connection; [`SshProvider::stop_remote_agent`] and
//! [`SshProvider::purge_remote`] are the explicit ways to stop it.
//!
//! # Layout
//! - [`target`]: `[user@]host[:port]` and `~/.ssh/config`.
//! - [`hostkey`]: known-hosts checking, the russh client handler.
//! - [`auth`]: public-key login (identity, agent, config, defaults).
//! - [`remote`]: the remote layout and the shell scripts run there.
//! - [`elf`]: is the agent binary for x86-64, and static?

pub mod auth;
pub mod elf;
pub mod hostkey;
pub mod remote;
pub mod target;

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex as StdMutex};
use std::time::Duration;

use russh::client::{self, Handle, Msg};
use russh::{ChannelMsg, ChannelOpenFailure, ChannelStream, Disconnect, Preferred};
use tokio::net::TcpStream;
use tokio::sync::{Mutex, OnceCell};
use tonic::transport::Channel;

use super::{BoxFuture, Provider, ProviderError};
use auth::{AuthError, Credentials};
use hostkey::{Client, HostKeyPolicy};
use target::{Target, Via};

/// AES-GCM first: russh runs it on ring (AES-NI, several GB/s a core), where
/// its ChaCha20-Poly1305 (russh's default first choice) is a portable
/// implementation that limits bulk transfers on the 2-core machines we
/// measure on. The rest is russh's default order.
const CIPHERS: &[russh::cipher::Name] = &[
    russh::cipher::AES_256_GCM,
    russh::cipher::AES_128_GCM,
    russh::cipher::CHACHA20_POLY1305,
    russh::cipher::AES_256_CTR,
    russh::cipher::AES_192_CTR,
    russh::cipher::AES_128_CTR,
];

/// The only remote platform the agent is built for.
const SUPPORTED_PLATFORM: &str = "Linux x86_64";

/// How to build an agent that runs on any x86-64 Linux.
const STATIC_BUILD: &str = "RUSTFLAGS=\"-C target-feature=+crt-static\" cargo build --release -p bridge-agent --target x86_64-unknown-linux-gnu";

/// Where the agent's files live on the remote unless configured.
pub const DEFAULT_REMOTE_DIR: &str = "~/.bridge";

/// Bound on the login exchange (an agent may wait for a hardware key touch).
const AUTH_TIMEOUT: Duration = Duration::from_secs(60);

/// Everything the SSH provider needs; [`SshConfig::new`] fills the defaults.
#[derive(Debug, Clone)]
pub struct SshConfig {
    /// `[user@]host[:port]`, `ssh://…`, or a `Host` alias of the ssh config.
    pub host: String,
    /// `--identity`: tried first; an unusable one is an error.
    pub identity: Option<PathBuf>,
    /// `--accept-new-host-key`: trust (and record) a host seen for the first time.
    pub accept_new_host_key: bool,
    /// Where the agent's files live on the remote (`None`: `~/.bridge`);
    /// `~` is the remote home, a relative path is relative to it.
    pub remote_dir: Option<String>,
    /// The local `bridge-agent` binary to upload.
    pub agent_bin: PathBuf,
    /// `config`, `known_hosts` and the default keys (`$HOME/.ssh`).
    /// `/etc/ssh/ssh_known_hosts` is read too.
    pub ssh_dir: PathBuf,
    /// bridge's own known-hosts file, the only one it writes
    /// (`$XDG_CONFIG_HOME/bridge/known_hosts`, by default `~/.config/…`).
    pub bridge_known_hosts: PathBuf,
    /// Bound on the TCP connect and on the SSH handshake, each.
    pub connect_timeout: Duration,
    /// Read the user's and the system's known-hosts files. Off for machines
    /// whose address is recycled (cloud instances): then only
    /// `bridge_known_hosts` counts.
    pub user_known_hosts: bool,
    /// Extra `bridge-agent serve` arguments (the idle autostop of a cloud
    /// instance). An agent started with other ones is restarted.
    pub agent_args: Vec<String>,
    /// An AWS instance's security group rule to keep pointed at this
    /// machine's address, looked at when the host cannot be reached.
    #[cfg(feature = "aws")]
    pub follow_address: Option<super::aws::FollowAddress>,
}

impl SshConfig {
    /// The defaults for `host`, from `$HOME` and `$USER`.
    pub fn new(host: impl Into<String>, agent_bin: impl Into<PathBuf>) -> SshConfig {
        let home = local_home();
        let config_home = std::env::var_os("XDG_CONFIG_HOME")
            .map(PathBuf::from)
            .filter(|p| p.is_absolute())
            .unwrap_or_else(|| home.join(".config"));
        SshConfig {
            host: host.into(),
            identity: None,
            accept_new_host_key: false,
            remote_dir: None,
            agent_bin: agent_bin.into(),
            ssh_dir: home.join(".ssh"),
            bridge_known_hosts: config_home.join("bridge").join("known_hosts"),
            connect_timeout: Duration::from_secs(10),
            user_known_hosts: true,
            agent_args: Vec::new(),
            #[cfg(feature = "aws")]
            follow_address: None,
        }
    }
}

/// `$HOME`: `~` in `IdentityFile`.
fn local_home() -> PathBuf {
    std::env::var_os("HOME")
        .filter(|h| !h.is_empty())
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/"))
}

/// `$USER`, else the passwd entry: the remote user when neither the host
/// nor the ssh config names one.
fn local_user() -> String {
    std::env::var("USER")
        .ok()
        .filter(|u| !u.is_empty())
        .or_else(|| {
            nix::unistd::User::from_uid(nix::unistd::getuid())
                .ok()
                .flatten()
                .map(|u| u.name)
        })
        .unwrap_or_else(|| "root".to_string())
}

/// ` via bastion` (ProxyJump hops), ` via ProxyCommand`, or nothing.
fn via_text(t: &Target) -> String {
    match &t.via {
        Some(Via::Jump(hops)) => {
            let names: Vec<&str> = hops.iter().map(|h| h.alias.as_str()).collect();
            format!(" via {}", names.join(","))
        }
        Some(Via::Command(_)) => " via ProxyCommand".into(),
        None => String::new(),
    }
}

/// A byte stream an SSH session runs over.
trait Stream: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send {}
impl<T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send> Stream for T {}

/// The stream to an SSH server, with what must live as long as it: the jump
/// host's session its channel belongs to, or the ProxyCommand's process
/// (killed when the link is dropped).
struct Link {
    io: Box<dyn Stream>,
    _keep: Option<Box<dyn std::any::Any + Send>>,
    /// A TCP connection straight to sshd (a duplicate of its socket): quick
    /// ACKs are re-armed on it after each small read.
    quickack: Option<socket2::Socket>,
}

impl Link {
    fn new(io: impl Stream + 'static, keep: Option<Box<dyn std::any::Any + Send>>) -> Link {
        Link {
            io: Box::new(io),
            _keep: keep,
            quickack: None,
        }
    }

    /// A link over a TCP connection straight to sshd, which ACKs what it
    /// reads at once.
    ///
    /// sshd leaves Nagle's algorithm on for channels without a terminal
    /// (ours), so when it writes two small packets in a row the second waits
    /// for the first's ACK, and a receiver delays ACKs by up to 40 ms. That
    /// held each connection twice (the login's last packets, the agent
    /// channel's confirmation): `bridge up` with the agent running took 187
    /// ms, 92 ms with ACKs at once. `TCP_QUICKACK` does not stay set, so it
    /// is set again after every small read (a bulk read's full segments are
    /// not held by Nagle).
    fn tcp(tcp: TcpStream) -> Link {
        let sock = socket2::SockRef::from(&tcp);
        let _ = sock.set_tcp_quickack(true);
        let quickack = sock.try_clone().ok();
        Link {
            quickack,
            ..Link::new(tcp, None)
        }
    }

    /// Reads up to this long re-arm quick ACKs.
    const SMALL_READ: usize = 16 * 1024;
}

impl tokio::io::AsyncRead for Link {
    fn poll_read(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let me = self.get_mut();
        let r = std::pin::Pin::new(&mut me.io).poll_read(cx, buf);
        let read = buf.filled().len() - before;
        if let Some(s) = &me.quickack
            && matches!(r, std::task::Poll::Ready(Ok(())))
            && read > 0
            && read < Link::SMALL_READ
        {
            let _ = s.set_tcp_quickack(true);
        }
        r
    }
}

impl tokio::io::AsyncWrite for Link {
    fn poll_write(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        std::pin::Pin::new(&mut self.get_mut().io).poll_write(cx, buf)
    }

    fn poll_flush(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.get_mut().io).poll_flush(cx)
    }

    fn poll_shutdown(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.get_mut().io).poll_shutdown(cx)
    }
}

/// The system-wide known-hosts file, read (never written) after the user's.
const SYSTEM_KNOWN_HOSTS: &str = "/etc/ssh/ssh_known_hosts";

/// The agent on a remote machine over SSH. Cheap to share: the connection
/// lives behind an `Arc`, also held by the channels [`Provider::connect`]
/// returns (their reconnects open new SSH channels, and a new SSH session
/// when the old one died).
pub struct SshProvider {
    inner: Arc<Inner>,
}

struct Inner {
    config: SshConfig,
    /// The resolved host, or why it could not be resolved (reported by
    /// every operation, so that [`SshProvider::new`] cannot fail).
    target: Result<Target, String>,
    /// `user@host:port`, or `alias (user@host:port)`, for messages.
    label: String,
    /// The open session; replaced when it has closed. Held while one is
    /// being opened, so concurrent callers share one connection.
    session: Mutex<Option<Arc<Handle<Client>>>>,
    /// The remote's home and platform, asked once per provider.
    info: OnceCell<RemoteInfo>,
    /// The agent's token, read from the remote by `ensure_agent`.
    token: StdMutex<Option<String>>,
    /// The agent binary's hash, by its size and modification time: hashed
    /// again only when the file changed (it is tens of MiB, and every
    /// reconnect asks).
    agent_hash: StdMutex<Option<(u64, std::time::SystemTime, String)>>,
    /// What `ensure_agent` is doing, while it takes long (the upload).
    activity: tokio::sync::watch::Sender<Option<String>>,
}

#[derive(Debug, Clone)]
struct RemoteInfo {
    /// The remote directory, absolute.
    dir: String,
    /// `$HOME` there: never purged.
    home: String,
    /// `uname -sm`.
    platform: String,
}

impl SshProvider {
    /// Resolves the host (ssh config included). A malformed host or an
    /// unusable config (a `ProxyJump` loop) makes every operation fail
    /// (fatally); [`SshProvider::try_new`] reports it at once.
    pub fn new(config: SshConfig) -> SshProvider {
        let target = target::resolve(
            &config.host,
            &config.ssh_dir.join("config"),
            &local_home(),
            &local_user(),
        );
        let label = match &target {
            Ok(t) => {
                let hostport = format!("{}@{}:{}{}", t.user, t.host, t.port, via_text(t));
                if t.alias == t.host {
                    hostport
                } else {
                    format!("{} ({hostport})", t.alias)
                }
            }
            Err(_) => config.host.clone(),
        };
        SshProvider {
            inner: Arc::new(Inner {
                config,
                target,
                label,
                session: Mutex::new(None),
                info: OnceCell::new(),
                token: StdMutex::new(None),
                agent_hash: StdMutex::new(None),
                activity: tokio::sync::watch::Sender::new(None),
            }),
        }
    }

    /// [`SshProvider::new`], failing when the host cannot be resolved.
    pub fn try_new(config: SshConfig) -> Result<SshProvider, ProviderError> {
        let p = SshProvider::new(config);
        p.target()?;
        Ok(p)
    }

    /// The resolved connection target.
    pub fn target(&self) -> Result<&Target, ProviderError> {
        self.inner.target()
    }

    /// Connects (checking the host key and logging in) and returns the
    /// remote's `uname -sm`: a quick check of `--host`.
    pub async fn probe(&self) -> Result<String, ProviderError> {
        let (code, out, err) = self.exec("uname -sm", None).await?;
        if code != 0 {
            return Err(ProviderError::fatal(format!(
                "`uname -sm` failed on {} (exit {code}): {}",
                self.inner.label,
                String::from_utf8_lossy(&err).trim()
            )));
        }
        Ok(String::from_utf8_lossy(&out).trim().to_string())
    }

    /// Runs `cmd` through the remote user's shell, with `stdin` (then EOF),
    /// and returns its exit code, stdout and stderr. A lost connection is
    /// retryable; a non-zero exit is not an error here.
    pub async fn exec(
        &self,
        cmd: &str,
        stdin: Option<&[u8]>,
    ) -> Result<(i32, Vec<u8>, Vec<u8>), ProviderError> {
        self.inner.exec(cmd, stdin.map(Stdin::Bytes)).await
    }

    /// Stops the remote agent (SIGTERM, up to 5 s, then SIGKILL) and removes
    /// its socket and pid file. Running jobs keep running under their shims;
    /// the next agent adopts them.
    pub async fn stop_remote_agent(&self) -> Result<(), ProviderError> {
        let dir = self.inner.info().await?.dir;
        let (code, _, err) = self
            .inner
            .exec(&remote::command(&remote::stop_script(), &[&dir]), None)
            .await?;
        self.inner.script_result("stop the agent", code, &err)?;
        *self.inner.token.lock().unwrap_or_else(|p| p.into_inner()) = None;
        Ok(())
    }

    /// Stops the remote agent and deletes the whole remote directory
    /// (binaries, mirrors, job logs, token). Refuses `/` and the home.
    pub async fn purge_remote(&self) -> Result<(), ProviderError> {
        let RemoteInfo { dir, home, .. } = self.inner.info().await?;
        // The script checks again, on the physical paths.
        if !purgeable(&dir, &home) {
            return Err(ProviderError::fatal(format!(
                "refusing to remove the remote directory {dir} (it is / or the home directory): set another remote directory"
            )));
        }
        let (code, _, err) = self
            .inner
            .exec(&remote::command(&remote::purge_script(), &[&dir]), None)
            .await?;
        self.inner
            .script_result("remove the remote directory", code, &err)?;
        *self.inner.token.lock().unwrap_or_else(|p| p.into_inner()) = None;
        Ok(())
    }
}

impl Inner {
    fn target(&self) -> Result<&Target, ProviderError> {
        self.target
            .as_ref()
            .map_err(|e| ProviderError::fatal(e.clone()))
    }

    fn retryable(&self, what: impl std::fmt::Display) -> ProviderError {
        ProviderError::retryable(format!("{}: {what}", self.label))
    }

    /// The open session, or a new one.
    async fn session(&self) -> Result<Arc<Handle<Client>>, ProviderError> {
        let mut slot = self.session.lock().await;
        if let Some(h) = slot.as_ref()
            && !h.is_closed()
        {
            return Ok(h.clone());
        }
        *slot = None;
        let h = Arc::new(self.open_session().await?);
        *slot = Some(h.clone());
        Ok(h)
    }

    /// Drops `dead` as the current session (a channel could not be opened
    /// on it), unless another caller has replaced it already.
    async fn forget(&self, dead: &Arc<Handle<Client>>) {
        let mut slot = self.session.lock().await;
        if slot.as_ref().is_some_and(|h| Arc::ptr_eq(h, dead)) {
            *slot = None;
        }
    }

    fn host_key_policy(&self, t: &Target) -> HostKeyPolicy {
        let user_files = if self.config.user_known_hosts {
            vec![
                self.config.ssh_dir.join("known_hosts"),
                PathBuf::from(SYSTEM_KNOWN_HOSTS),
            ]
        } else {
            Vec::new()
        };
        HostKeyPolicy {
            label: if t.port == 22 {
                t.alias.clone()
            } else {
                format!("{}:{}", t.alias, t.port)
            },
            name: t.host_key_name.clone(),
            port: t.port,
            user_files,
            bridge_file: self.config.bridge_known_hosts.clone(),
            accept_new: self.config.accept_new_host_key,
        }
    }

    async fn open_session(&self) -> Result<Handle<Client>, ProviderError> {
        let t = self.target()?;
        let opened = self
            .open_to(t, self.config.identity.as_deref(), &self.label)
            .await;
        // A cloud instance that stopped answering may only have stopped
        // letting this machine in (its address changed): the next attempt
        // finds the rule moved.
        #[cfg(feature = "aws")]
        if let (Err(e), Some(f)) = (&opened, &self.config.follow_address)
            && e.retryable
        {
            f.check().await;
        }
        opened
    }

    /// Opens an SSH session to `t`: the link (direct, through its
    /// `ProxyJump` hops, or over its `ProxyCommand`), the handshake with
    /// `t`'s host key checked, and the login. `identity` is `--identity`,
    /// which only the target uses (as `ssh -i` with `-J`).
    fn open_to<'a>(
        &'a self,
        t: &'a Target,
        identity: Option<&'a Path>,
        label: &'a str,
    ) -> BoxFuture<'a, Result<Handle<Client>, ProviderError>> {
        Box::pin(async move {
            let timeout = self.config.connect_timeout;
            let link = self.link_to(t).await?;
            let policy = Arc::new(self.host_key_policy(t));
            // Ask for a host key type we have on record, as OpenSSH does.
            let known = policy.known_algorithms();
            let mut keys: Vec<_> = Preferred::DEFAULT.key.to_vec();
            keys.sort_by_key(|a| {
                !known
                    .iter()
                    .any(|k| k == a || (k.clone().is_rsa() && a.clone().is_rsa()))
            });
            let config = client::Config {
                keepalive_interval: Some(Duration::from_secs(5)),
                keepalive_max: 3,
                inactivity_timeout: None,
                nodelay: true,
                preferred: Preferred {
                    key: keys.into(),
                    cipher: CIPHERS.into(),
                    ..Preferred::DEFAULT
                },
                ..Default::default()
            };
            let refusal = Arc::new(StdMutex::new(None));
            let handler = Client {
                policy: policy.clone(),
                refusal: refusal.clone(),
            };
            let handshake = tokio::time::timeout(
                timeout,
                client::connect_stream(Arc::new(config), link, handler),
            )
            .await;
            let refused = || refusal.lock().unwrap_or_else(|p| p.into_inner()).take();
            let mut handle = match handshake {
                Err(_) => {
                    return Err(ProviderError::retryable(format!(
                        "the SSH handshake with {}:{} timed out after {} s",
                        t.host,
                        t.port,
                        timeout.as_secs_f32()
                    )));
                }
                Ok(Err(e)) => {
                    if let Some(r) = refused() {
                        return Err(ProviderError::fatal(r.to_string()));
                    }
                    return Err(self.handshake_error(t, e));
                }
                Ok(Ok(h)) => h,
            };

            let creds = Credentials {
                user: &t.user,
                label,
                identity,
                config_identities: &t.identity_files,
                ssh_dir: &self.config.ssh_dir,
            };
            match tokio::time::timeout(AUTH_TIMEOUT, auth::authenticate(&mut handle, &creds)).await
            {
                Err(_) => Err(ProviderError::retryable(format!(
                    "logging in to {label} timed out after {} s",
                    AUTH_TIMEOUT.as_secs()
                ))),
                Ok(Err(AuthError::Fatal(m))) => Err(ProviderError::fatal(m)),
                Ok(Err(AuthError::Link(m))) => Err(ProviderError::retryable(m)),
                Ok(Ok(())) => {
                    tracing::info!("connected to {label} over SSH");
                    Ok(handle)
                }
            }
        })
    }

    /// The byte stream to `t`'s SSH server.
    async fn link_to(&self, t: &Target) -> Result<Link, ProviderError> {
        let timeout = self.config.connect_timeout;
        match &t.via {
            None => {
                let reach = format!("cannot reach {}:{}", t.host, t.port);
                let tcp = match tokio::time::timeout(
                    timeout,
                    TcpStream::connect((t.host.as_str(), t.port)),
                )
                .await
                {
                    Err(_) => {
                        return Err(ProviderError::retryable(format!(
                            "{reach}: timed out after {} s",
                            timeout.as_secs_f32()
                        )));
                    }
                    Ok(Err(e)) => {
                        return Err(ProviderError::retryable(format!(
                            "{reach}: {}",
                            io_reason(&e)
                        )));
                    }
                    Ok(Ok(s)) => s,
                };
                let _ = tcp.set_nodelay(true);
                Ok(Link::tcp(tcp))
            }
            Some(Via::Jump(hops)) => {
                // The last hop opens the channel to the target; it is
                // itself reached through the hops before it.
                let mut last = hops.last().expect("resolve refuses no hops").clone();
                if hops.len() > 1 && last.via.is_none() {
                    last.via = Some(Via::Jump(hops[..hops.len() - 1].to_vec()));
                }
                let hop_label = format!("{}@{}:{} (ProxyJump)", last.user, last.host, last.port);
                let jump =
                    self.open_to(&last, None, &hop_label)
                        .await
                        .map_err(|e| ProviderError {
                            message: format!("through the jump host {}: {}", last.alias, e.message),
                            retryable: e.retryable,
                        })?;
                let channel = tokio::time::timeout(
                    timeout,
                    jump.channel_open_direct_tcpip(t.host.clone(), t.port as u32, "127.0.0.1", 0),
                )
                .await
                .map_err(|_| {
                    ProviderError::retryable(format!(
                        "the jump host {} did not open a connection to {}:{} within {} s",
                        last.alias,
                        t.host,
                        t.port,
                        timeout.as_secs_f32()
                    ))
                })?
                .map_err(|e| {
                    ProviderError::retryable(format!(
                        "the jump host {} could not connect to {}:{}: {e}",
                        last.alias, t.host, t.port
                    ))
                })?;
                Ok(Link::new(channel.into_stream(), Some(Box::new(jump))))
            }
            Some(Via::Command(cmd)) => {
                let mut child = tokio::process::Command::new("sh")
                    .arg("-c")
                    .arg(cmd)
                    .stdin(std::process::Stdio::piped())
                    .stdout(std::process::Stdio::piped())
                    // Its complaints go where the daemon's log goes.
                    .stderr(std::process::Stdio::inherit())
                    .kill_on_drop(true)
                    .spawn()
                    .map_err(|e| {
                        ProviderError::fatal(format!("cannot run the ProxyCommand `{cmd}`: {e}"))
                    })?;
                let (Some(stdout), Some(stdin)) = (child.stdout.take(), child.stdin.take()) else {
                    return Err(ProviderError::fatal("the ProxyCommand has no stdio"));
                };
                Ok(Link::new(
                    tokio::io::join(stdout, stdin),
                    Some(Box::new(child)),
                ))
            }
        }
    }

    fn handshake_error(&self, t: &Target, e: russh::Error) -> ProviderError {
        match e {
            russh::Error::NoCommonAlgo { kind, theirs, .. } => ProviderError::fatal(format!(
                "{}:{} offers no {kind:?} algorithm bridge supports (it offers {theirs:?})",
                t.host, t.port
            )),
            russh::Error::Version => ProviderError::fatal(format!(
                "{}:{} does not speak SSH (wrong port?)",
                t.host, t.port
            )),
            russh::Error::UnknownKey | russh::Error::WrongServerSig => ProviderError::fatal(
                format!("the host key of {}:{} was not accepted", t.host, t.port),
            ),
            russh::Error::IO(io) => ProviderError::retryable(format!(
                "the SSH handshake with {}:{} failed: {}",
                t.host,
                t.port,
                io_reason(&io)
            )),
            other => ProviderError::retryable(format!(
                "the SSH handshake with {}:{} failed: {other}",
                t.host, t.port
            )),
        }
    }

    /// Runs `f` on the session; if the session turns out to be dead (the
    /// channel cannot even be requested), reconnects once and retries.
    async fn open_channel<T, F, Fut>(&self, f: F) -> Result<T, ProviderError>
    where
        F: Fn(Arc<Handle<Client>>) -> Fut,
        Fut: Future<Output = Result<T, russh::Error>>,
    {
        match self.try_channel(f).await? {
            Ok(v) => Ok(v),
            Err(why) => Err(self.open_failure(why)),
        }
    }

    /// Opens a channel with `f` on the session, once more on a new session
    /// when the first one broke. The server's refusal is returned as it is
    /// (what it means depends on the channel).
    async fn try_channel<T, F, Fut>(
        &self,
        f: F,
    ) -> Result<Result<T, ChannelOpenFailure>, ProviderError>
    where
        F: Fn(Arc<Handle<Client>>) -> Fut,
        Fut: Future<Output = Result<T, russh::Error>>,
    {
        let mut last = None;
        for _ in 0..2 {
            let h = self.session().await?;
            match f(h.clone()).await {
                Ok(v) => return Ok(Ok(v)),
                Err(russh::Error::ChannelOpenFailure(why)) => return Ok(Err(why)),
                Err(e) => {
                    self.forget(&h).await;
                    last = Some(e);
                }
            }
        }
        Err(self.retryable(format!(
            "the SSH connection broke: {}",
            last.map(|e| e.to_string()).unwrap_or_default()
        )))
    }

    fn open_failure(&self, why: ChannelOpenFailure) -> ProviderError {
        match why {
            ChannelOpenFailure::ConnectFailed => self
                .retryable("nothing is listening on the agent's socket (the agent is not running)"),
            ChannelOpenFailure::AdministrativelyProhibited => ProviderError::fatal(format!(
                "the SSH server of {} refuses to forward to the agent's Unix socket: \
                 allow it in its sshd_config (`AllowStreamLocalForwarding yes`, no `DisableForwarding`)",
                self.label
            )),
            ChannelOpenFailure::ResourceShortage => {
                self.retryable("the SSH server is out of resources for a new channel")
            }
            other => ProviderError::fatal(format!(
                "the SSH server of {} refused a channel: {other:?}",
                self.label
            )),
        }
    }

    async fn exec(
        &self,
        cmd: &str,
        stdin: Option<Stdin<'_>>,
    ) -> Result<(i32, Vec<u8>, Vec<u8>), ProviderError> {
        let channel = self
            .open_channel(|h| async move { h.channel_open_session().await })
            .await?;
        let (mut rd, wr) = channel.split();
        let lost = |e: russh::Error| self.retryable(format!("the SSH connection broke: {e}"));
        wr.exec(true, cmd).await.map_err(lost)?;
        // Write and read at once: a command may answer before it has read
        // all its input (or without reading it).
        let send = async {
            match stdin {
                Some(Stdin::Bytes(data)) => wr.data(data).await?,
                Some(Stdin::File(path)) => {
                    use tokio::io::AsyncReadExt;
                    let mut f = tokio::fs::File::open(path).await?;
                    let mut buf = vec![0u8; 256 * 1024];
                    loop {
                        let n = f.read(&mut buf).await?;
                        if n == 0 {
                            break;
                        }
                        wr.data(&buf[..n]).await?;
                    }
                }
                None => {}
            }
            wr.eof().await
        };
        let recv = async {
            let (mut out, mut err, mut code) = (Vec::new(), Vec::new(), None);
            while let Some(msg) = rd.wait().await {
                match msg {
                    ChannelMsg::Data { data } => out.extend_from_slice(&data),
                    ChannelMsg::ExtendedData { data, ext: 1 } => err.extend_from_slice(&data),
                    ChannelMsg::ExitStatus { exit_status } => {
                        code = Some(i32::try_from(exit_status).unwrap_or(i32::MAX));
                    }
                    ChannelMsg::ExitSignal { signal_name, .. } => {
                        err.extend_from_slice(
                            format!("\n(killed by signal {signal_name:?})").as_bytes(),
                        );
                        code = Some(255);
                    }
                    ChannelMsg::Failure => {
                        err.extend_from_slice(b"the SSH server refused to run the command");
                        code = Some(255);
                    }
                    _ => {}
                }
            }
            (code, out, err)
        };
        // The reply ends the exchange: when the connection breaks, `recv`
        // ends while a write may wait forever for window space.
        tokio::pin!(send, recv);
        let mut sent: Option<Result<(), russh::Error>> = None;
        let (code, out, err) = loop {
            tokio::select! {
                r = &mut send, if sent.is_none() => sent = Some(r),
                r = &mut recv => break r,
            }
        };
        let sent = sent.unwrap_or(Ok(()));
        match code {
            Some(code) => Ok((code, out, err)),
            None => Err(self.retryable(format!(
                "the SSH connection broke while running a command{}",
                sent.err().map(|e| format!(" ({e})")).unwrap_or_default()
            ))),
        }
    }

    /// Takes the remote directory and platform from the setup script's
    /// answer, and refuses a platform the agent is not built for.
    fn note_info(&self, out: &[u8]) -> Result<RemoteInfo, ProviderError> {
        let out = String::from_utf8_lossy(out);
        let (Some(home), Some(platform), Some(dir)) = (
            remote::field(&out, "home"),
            remote::field(&out, "uname"),
            remote::field(&out, "dir"),
        ) else {
            return Err(ProviderError::fatal(format!(
                "unexpected answer from the agent setup on {}: {}",
                self.label,
                out.trim()
            )));
        };
        let info = RemoteInfo {
            dir: dir.to_string(),
            home: home.to_string(),
            platform: platform.to_string(),
        };
        if info.platform != SUPPORTED_PLATFORM {
            return Err(ProviderError::fatal(format!(
                "unsupported remote platform: {} on {}; bridge-agent is built for {SUPPORTED_PLATFORM}",
                info.platform, self.label
            )));
        }
        let _ = self.info.set(info.clone());
        Ok(info)
    }

    /// The remote directory (absolute) and platform, asked once.
    async fn info(&self) -> Result<RemoteInfo, ProviderError> {
        self.info
            .get_or_try_init(|| async {
                let (code, out, err) = self.exec(&remote::command(remote::INFO, &[]), None).await?;
                let out = String::from_utf8_lossy(&out);
                let (Some(home), Some(platform), 0) = (
                    remote::field(&out, "home"),
                    remote::field(&out, "uname"),
                    code,
                ) else {
                    return Err(ProviderError::fatal(format!(
                        "cannot query {} (`uname -sm`, $HOME): exit {code}: {}",
                        self.label,
                        String::from_utf8_lossy(&err).trim()
                    )));
                };
                let dir = resolve_remote_dir(self.remote_dir(), home);
                Ok(RemoteInfo {
                    dir,
                    home: home.to_string(),
                    platform: platform.to_string(),
                })
            })
            .await
            .cloned()
    }

    fn remote_dir(&self) -> &str {
        self.config
            .remote_dir
            .as_deref()
            .unwrap_or(DEFAULT_REMOTE_DIR)
    }

    /// Turns a script's exit code into a result.
    fn script_result(&self, what: &str, code: i32, stderr: &[u8]) -> Result<(), ProviderError> {
        let msg = String::from_utf8_lossy(stderr).trim().to_string();
        match code {
            0 => Ok(()),
            remote::EXIT_LOCK => Err(self.retryable(msg)),
            _ => Err(ProviderError::fatal(format!(
                "cannot {what} on {}: {}",
                self.label,
                if msg.is_empty() {
                    format!("exit {code}")
                } else {
                    msg
                }
            ))),
        }
    }

    /// The local agent binary's hash, streamed from the file (never held
    /// in memory), cached while its size and time stay the same.
    fn agent_file_hash(&self) -> Result<String, ProviderError> {
        let bin = &self.config.agent_bin;
        let unreadable = |e: std::io::Error| {
            ProviderError::fatal(format!(
                "cannot read the agent binary {}: {e} (build it with `cargo build --release -p bridge-agent`, or set BRIDGE_AGENT_BIN)",
                bin.display()
            ))
        };
        let meta = std::fs::metadata(bin).map_err(unreadable)?;
        let key = (meta.len(), meta.modified().map_err(unreadable)?);
        let mut cache = self.agent_hash.lock().unwrap_or_else(|p| p.into_inner());
        if let Some((len, time, hash)) = cache.as_ref()
            && (*len, *time) == key
        {
            return Ok(hash.clone());
        }
        let (hash, _) = bridge_proto::binary_hash(bin).map_err(unreadable)?;
        *cache = Some((key.0, key.1, hash.clone()));
        Ok(hash)
    }

    async fn ensure_agent(&self) -> Result<(), ProviderError> {
        let bin = &self.config.agent_bin;
        let hash = self.agent_file_hash()?;
        let version = agent_version(&hash, &self.config.agent_args);
        // The script resolves the directory and reports the platform itself:
        // one command per connection.
        let mut args = vec![self.remote_dir(), hash.as_str(), version.as_str()];
        args.extend(self.config.agent_args.iter().map(String::as_str));
        let ensure = remote::command(&remote::ensure_script(), &args);
        for attempt in 0..2 {
            let (code, out, err) = self.exec(&ensure, None).await?;
            let info = match self.note_info(&out) {
                Ok(info) => info,
                Err(e) => {
                    // A script that failed says why better than its output.
                    self.script_result("set up the agent", code, &err)?;
                    return Err(e);
                }
            };
            if code == remote::EXIT_NOT_STARTED {
                return Err(ProviderError::fatal(format!(
                    "the agent on {} did not start: {}",
                    self.label,
                    String::from_utf8_lossy(&err).trim()
                )));
            }
            self.script_result("set up the agent", code, &err)?;
            let out = String::from_utf8_lossy(&out);
            if remote::field(&out, "need") == Some("upload") && attempt == 0 {
                self.upload(&info.dir, bin, &hash).await?;
                continue;
            }
            let (Some(state), Some(token)) =
                (remote::field(&out, "state"), remote::field(&out, "token"))
            else {
                return Err(ProviderError::fatal(format!(
                    "unexpected answer from the agent setup on {}: {}",
                    self.label,
                    out.trim()
                )));
            };
            if state != "reused" {
                tracing::info!(
                    "{state} bridge-agent-{hash} on {} ({}/run/agent.sock)",
                    self.label,
                    info.dir
                );
            }
            *self.token.lock().unwrap_or_else(|p| p.into_inner()) = Some(token.to_string());
            return Ok(());
        }
        Err(ProviderError::fatal(format!(
            "the agent binary uploaded to {}:{}/bin is still missing",
            self.label,
            self.remote_dir()
        )))
    }

    /// Uploads the agent binary, streamed from the file (it is tens of MiB:
    /// never held in memory).
    async fn upload(&self, dir: &str, path: &Path, hash: &str) -> Result<(), ProviderError> {
        let (header, len) = read_header(path)?;
        let elf = elf::inspect(&header).map_err(|e| {
            ProviderError::fatal(format!(
                "the agent binary {} is unusable: {e}",
                path.display()
            ))
        })?;
        if !elf.x86_64 {
            return Err(ProviderError::fatal(format!(
                "the agent binary {} is not built for x86-64 Linux; build one with {STATIC_BUILD}",
                path.display()
            )));
        }
        if let Some(interp) = elf.interpreter {
            tracing::warn!(
                "the agent binary {} is dynamically linked (needs {interp}); it runs only where the remote's glibc is as new as this machine's. \
                 For a static one: {STATIC_BUILD}",
                path.display()
            );
        }
        let mut rand = [0u8; 8];
        getrandom::fill(&mut rand)
            .map_err(|e| ProviderError::fatal(format!("no randomness: {e}")))?;
        let tmp = hex::encode(rand);
        let size = len.to_string();
        tracing::info!(
            "uploading {} ({:.1} MiB) to {}:{dir}/bin/bridge-agent-{hash}",
            path.display(),
            len as f64 / (1024.0 * 1024.0),
            self.label
        );
        let cmd = remote::command(remote::UPLOAD, &[dir, &tmp, &size, hash]);
        let said = |what: Option<String>| {
            self.activity.send_replace(what);
        };
        said(Some(format!(
            "uploading the agent ({:.1} MiB)",
            len as f64 / (1024.0 * 1024.0)
        )));
        let res = self.exec(&cmd, Some(Stdin::File(path))).await;
        said(None);
        let (code, _, err) = res?;
        self.script_result("upload the agent", code, &err)
    }

    /// A fresh byte stream to the agent's socket.
    /// A `direct-tcpip` channel to 127.0.0.1:`port` of the remote machine.
    async fn tcp_stream(&self, port: u16) -> Result<ChannelStream<Msg>, super::DialError> {
        use super::DialError;
        let opened = self
            .try_channel(|h| async move {
                h.channel_open_direct_tcpip("127.0.0.1", port as u32, "127.0.0.1", 0)
                    .await
            })
            .await
            .map_err(|e| DialError::Link(e.message))?;
        match opened {
            Ok(c) => Ok(c.into_stream()),
            Err(ChannelOpenFailure::ConnectFailed) => Err(DialError::NothingListens {
                port,
                why: "connection refused".into(),
            }),
            Err(why) => Err(DialError::Unsupported(format!(
                "the SSH server of {} does not forward TCP ({why:?})",
                self.label
            ))),
        }
    }

    async fn agent_stream(&self) -> Result<ChannelStream<Msg>, ProviderError> {
        let socket = format!("{}/run/agent.sock", self.info().await?.dir);
        let channel = self
            .open_channel(|h| {
                let socket = socket.clone();
                async move { h.channel_open_direct_streamlocal(socket).await }
            })
            .await?;
        Ok(channel.into_stream())
    }
}

/// `~`, `~/x` and relative paths are under the remote home.
fn resolve_remote_dir(dir: &str, home: &str) -> String {
    let home = home.trim_end_matches('/');
    let dir = dir.trim_end_matches('/');
    if dir == "~" || dir.is_empty() {
        home.to_string()
    } else if let Some(rest) = dir.strip_prefix("~/") {
        format!("{home}/{rest}")
    } else if dir.starts_with('/') {
        dir.to_string()
    } else {
        format!("{home}/{dir}")
    }
}

/// Whether `rm -rf dir` is acceptable: not `/`, not the home.
fn purgeable(dir: &str, home: &str) -> bool {
    let d = dir.trim_end_matches('/');
    !d.is_empty() && d != home.trim_end_matches('/')
}

/// What `exec` feeds the command.
enum Stdin<'a> {
    Bytes(&'a [u8]),
    /// Streamed from the file.
    File(&'a Path),
}

/// The first MiB of the agent binary (its ELF headers and interpreter
/// path live there) and its size.
fn read_header(bin: &Path) -> Result<(Vec<u8>, u64), ProviderError> {
    use std::io::Read;
    let unreadable = |e: std::io::Error| {
        ProviderError::fatal(format!(
            "cannot read the agent binary {} to upload: {e} (build it with `cargo build --release -p bridge-agent`, or set BRIDGE_AGENT_BIN)",
            bin.display()
        ))
    };
    let f = std::fs::File::open(bin).map_err(unreadable)?;
    let len = f.metadata().map_err(unreadable)?.len();
    let mut header = Vec::new();
    f.take(1024 * 1024)
        .read_to_end(&mut header)
        .map_err(unreadable)?;
    Ok((header, len))
}

/// The name the binary is installed under: blake3, 16 hex digits (what
/// `agent_file_hash` computes streaming).
#[cfg(test)]
fn agent_hash(binary: &[u8]) -> String {
    blake3::hash(binary).to_hex()[..16].to_string()
}

/// What `run/agent.version` holds for an agent of `hash` started with
/// `args`: the hash alone without extra arguments.
fn agent_version(hash: &str, args: &[String]) -> String {
    if args.is_empty() {
        return hash.to_string();
    }
    let args_hash = blake3::hash(args.join("\0").as_bytes());
    format!("{hash}-{}", &args_hash.to_hex()[..8])
}

/// "connection refused", "timed out", … for people.
fn io_reason(e: &std::io::Error) -> String {
    use std::io::ErrorKind::*;
    match e.kind() {
        ConnectionRefused => "connection refused".into(),
        ConnectionReset => "connection reset".into(),
        ConnectionAborted => "connection aborted".into(),
        TimedOut => "timed out".into(),
        HostUnreachable => "host unreachable".into(),
        NetworkUnreachable => "network unreachable".into(),
        UnexpectedEof => "connection closed by the server".into(),
        _ => e.to_string(),
    }
}

impl Provider for SshProvider {
    fn name(&self) -> &'static str {
        "ssh"
    }

    fn address(&self) -> String {
        let dir = self
            .inner
            .info
            .get()
            .map(|i| i.dir.as_str())
            .unwrap_or_else(|| self.inner.remote_dir());
        match &self.inner.target {
            Ok(t) => format!(
                "ssh://{}@{}:{}{} ({dir}/run/agent.sock)",
                t.user,
                t.host,
                t.port,
                via_text(t)
            ),
            Err(_) => format!("ssh://{} ({dir}/run/agent.sock)", self.inner.config.host),
        }
    }

    fn activity(&self) -> Option<tokio::sync::watch::Receiver<Option<String>>> {
        Some(self.inner.activity.subscribe())
    }

    fn ensure_agent(&self) -> BoxFuture<'_, Result<(), ProviderError>> {
        Box::pin(self.inner.ensure_agent())
    }

    fn connect(&self) -> BoxFuture<'_, Result<Channel, ProviderError>> {
        Box::pin(async move {
            let inner = self.inner.clone();
            let open = move || {
                let inner = inner.clone();
                async move { inner.agent_stream().await }
            };
            super::channel_over("http://agent.ssh", self.inner.config.connect_timeout, open)
                .await?
                .map_err(|e| {
                    self.inner
                        .retryable(format!("cannot reach the agent over SSH: {e}"))
                })
        })
    }

    fn dial(
        &self,
        port: u16,
    ) -> Option<BoxFuture<'_, Result<Box<dyn super::PortStream>, super::DialError>>> {
        Some(Box::pin(async move {
            let s = self.inner.tcp_stream(port).await?;
            Ok(Box::new(s) as Box<dyn super::PortStream>)
        }))
    }

    /// Closes the SSH connection; the remote agent keeps running (other
    /// repositories and running jobs use it).
    fn teardown(&self) -> BoxFuture<'_, Result<(), ProviderError>> {
        Box::pin(async move {
            if let Some(h) = self.inner.session.lock().await.take() {
                let _ = h
                    .disconnect(Disconnect::ByApplication, "bridge down", "en")
                    .await;
            }
            Ok(())
        })
    }

    fn link_is_fast(&self) -> bool {
        false
    }

    fn stop_agent(&self) -> BoxFuture<'_, Result<(), ProviderError>> {
        Box::pin(self.stop_remote_agent())
    }

    fn purge(&self) -> BoxFuture<'_, Result<(), ProviderError>> {
        Box::pin(self.purge_remote())
    }

    /// The agent is shared by the remote user's repositories.
    fn down_stops_agent(&self) -> bool {
        false
    }

    fn agent_token(&self) -> Option<String> {
        self.inner
            .token
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn remote_dir_resolution() {
        assert_eq!(
            resolve_remote_dir("~/.bridge", "/home/u"),
            "/home/u/.bridge"
        );
        assert_eq!(resolve_remote_dir("~", "/home/u/"), "/home/u");
        assert_eq!(resolve_remote_dir(".bridge/", "/home/u"), "/home/u/.bridge");
        assert_eq!(resolve_remote_dir("/srv/bridge", "/home/u"), "/srv/bridge");
        assert!(purgeable("/home/u/.bridge", "/home/u"));
        for bad in ["/", "//", "/home/u", "/home/u/"] {
            assert!(!purgeable(bad, "/home/u/"), "{bad}");
        }
        assert!(!purgeable(&resolve_remote_dir("~", "/home/u"), "/home/u"));
    }

    #[test]
    fn address_and_name() {
        let dir = tempfile::tempdir().unwrap();
        let mut cfg = SshConfig::new("alice@gpu-box:2222", "/nonexistent/bridge-agent");
        cfg.ssh_dir = dir.path().to_path_buf();
        let p = SshProvider::new(cfg);
        assert_eq!(p.name(), "ssh");
        assert!(!p.link_is_fast());
        assert_eq!(
            p.address(),
            "ssh://alice@gpu-box:2222 (~/.bridge/run/agent.sock)"
        );
        assert_eq!(p.agent_token(), None);
        assert_eq!(agent_hash(b"x").len(), 16);
    }

    #[test]
    fn the_streamed_hash_is_the_installed_name_and_follows_changes() {
        let dir = tempfile::tempdir().unwrap();
        let bin = dir.path().join("bridge-agent");
        let content: Vec<u8> = (0..300_000u32).map(|i| (i * 7 % 251) as u8).collect();
        std::fs::write(&bin, &content).unwrap();
        let p = SshProvider::new(SshConfig::new("gpu-box", &bin));
        assert_eq!(p.inner.agent_file_hash().unwrap(), agent_hash(&content));
        std::fs::write(&bin, b"another binary").unwrap();
        assert_eq!(
            p.inner.agent_file_hash().unwrap(),
            agent_hash(b"another binary")
        );
    }

    #[test]
    fn bad_hosts_and_proxies_fail_at_construction() {
        let dir = tempfile::tempdir().unwrap();
        // A jump host that names itself: a loop, not a link.
        std::fs::write(dir.path().join("config"), "Host jump\n  ProxyJump jump\n").unwrap();
        for host in ["alice@", "jump"] {
            let mut cfg = SshConfig::new(host, "/x");
            cfg.ssh_dir = dir.path().to_path_buf();
            let err = SshProvider::try_new(cfg).err().unwrap();
            assert!(!err.retryable, "{err}");
        }
    }

    #[tokio::test]
    async fn a_small_read_from_the_server_acks_at_once_again() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let client = TcpStream::connect(addr).await.unwrap();
        let (mut server, _) = listener.accept().await.unwrap();
        let probe = socket2::SockRef::from(&client).try_clone().unwrap();
        let quick = || probe.tcp_quickack().unwrap();
        let mut link = Link::tcp(client);
        let mut buf = [0u8; 64];
        for _ in 0..3 {
            probe.set_tcp_quickack(false).unwrap();
            assert!(!quick());
            server.write_all(b"small packet").await.unwrap();
            let n = link.read(&mut buf).await.unwrap();
            assert_eq!(&buf[..n], b"small packet");
            assert!(quick(), "re-armed after the read");
        }
        link.write_all(b"and back").await.unwrap();
        let n = server.read(&mut buf).await.unwrap();
        assert_eq!(&buf[..n], b"and back");
    }

    #[tokio::test]
    async fn unreachable_port_is_retryable_and_says_what_failed() {
        // A port nothing listens on (bound, then closed).
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let dir = tempfile::tempdir().unwrap();
        let mut cfg = SshConfig::new(format!("127.0.0.1:{port}"), "/x");
        cfg.ssh_dir = dir.path().to_path_buf();
        let p = SshProvider::new(cfg);
        let err = p.probe().await.unwrap_err();
        assert!(err.retryable, "{err}");
        assert_eq!(
            err.message,
            format!("cannot reach 127.0.0.1:{port}: connection refused")
        );
    }
}

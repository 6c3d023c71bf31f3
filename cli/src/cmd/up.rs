//! `bridge up`: start the agent (through the daemon's provider) and the daemon,
//! then wait for the first exact mirror, showing progress.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{Context, anyhow, bail};
use bridge_daemon::provider::ProviderSpec;
use bridge_daemon::repo::ensure_token;
use bridge_proto::v1::SyncProgress;
use indicatif::{ProgressBar, ProgressStyle};
use tonic::Streaming;

use crate::client::{self, human_bytes};

#[derive(clap::Args)]
pub struct Args {
    /// Where the agent runs: `local` (an agent process on this machine), `ssh`
    /// (any machine you can SSH into), `aws` (an EC2 GPU instance bridge
    /// launches) or `k8s` (a pod on a Kubernetes cluster). Default: what the
    /// last `bridge up` here chose (`.bridge/provider.toml`), else the
    /// project config (`bridge.toml`), else local.
    #[arg(long, value_parser = ["local", "ssh", "aws", "k8s"])]
    provider: Option<String>,
    /// SSH: `[user@]host[:port]`, or a Host alias from ~/.ssh/config (implies --provider ssh).
    #[arg(long, value_name = "[USER@]HOST[:PORT]")]
    host: Option<String>,
    /// SSH: the private key to use (else ssh-agent, ~/.ssh/config's IdentityFile, ~/.ssh/id_*).
    #[arg(long, value_name = "FILE")]
    identity: Option<PathBuf>,
    /// SSH: trust a host key seen for the first time (recorded in bridge's own known-hosts file).
    #[arg(long)]
    accept_new_host_key: bool,
    /// SSH and AWS: where the agent keeps its files on the remote (default ~/.bridge).
    #[arg(long, value_name = "DIR")]
    remote_dir: Option<String>,
    /// Fail unless the agent has at least N GPUs (AWS: launch a type with N GPUs, default 1; Kubernetes: request N nvidia.com/gpu, default 0).
    #[arg(long, value_name = "N")]
    gpu: Option<u32>,
    /// AWS and Kubernetes: the agent ends its machine (instance, pod) after this long with no job and no daemon connected (e.g. 30m, 2h; default 30m).
    #[arg(long, value_name = "DURATION")]
    idle_timeout: Option<String>,
    #[cfg(feature = "aws")]
    #[command(flatten)]
    aws: crate::aws::UpArgs,
    #[cfg(feature = "k8s")]
    #[command(flatten)]
    k8s: crate::k8s::PodArgs,
    /// Report on stderr (when a job command starts bridge: its stdout is the
    /// job's).
    #[arg(skip)]
    quiet: bool,
}

impl Args {
    /// `bridge up` with the saved (or default) provider, for job commands.
    pub fn local() -> Args {
        Args {
            provider: None,
            host: None,
            identity: None,
            accept_new_host_key: false,
            remote_dir: None,
            gpu: None,
            idle_timeout: None,
            #[cfg(feature = "aws")]
            aws: crate::aws::UpArgs {
                disk: crate::aws::DEFAULT_DISK_GB,
                ..Default::default()
            },
            #[cfg(feature = "k8s")]
            k8s: Default::default(),
            quiet: true,
        }
    }

    /// `--yes`: launch a billed machine without asking.
    fn yes(&self) -> bool {
        #[cfg(feature = "aws")]
        return self.aws.yes;
        #[cfg(not(feature = "aws"))]
        false
    }

    /// Whether the flags name a provider (or its settings), rather than
    /// leaving the choice to what was saved.
    fn asks(&self) -> bool {
        #[cfg(feature = "aws")]
        if self.aws.any() {
            return true;
        }
        #[cfg(feature = "k8s")]
        if self.k8s.any() {
            return true;
        }
        self.provider.is_some()
            || self.host.is_some()
            || self.identity.is_some()
            || self.accept_new_host_key
            || self.remote_dir.is_some()
            || self.idle_timeout.is_some()
    }

    /// Takes the project config's provider settings as if they were flags
    /// (when no flag and no saved choice says where).
    fn fill_from(&mut self, p: &crate::project::Project) -> anyhow::Result<()> {
        #[cfg(not(feature = "aws"))]
        if p.provider() == Some("aws") || p.aws.any() {
            bail!(
                "{} asks for the AWS provider, and this bridge was built without it (cargo feature `aws`)",
                p.path.display()
            );
        }
        self.provider = p.provider().map(str::to_string);
        self.host = p.host.clone();
        self.identity = p.identity.as_deref().map(crate::project::expand_home);
        self.remote_dir = p.remote_dir.clone();
        // Each section fills the flags only for its own provider (a team may
        // keep defaults for both).
        let named = p.provider();
        let use_aws = named == Some("aws") || (named.is_none() && p.aws.any());
        let use_k8s = named == Some("k8s") || (named.is_none() && !use_aws && p.k8s.any());
        #[cfg(feature = "aws")]
        if use_aws {
            let a = &p.aws;
            self.aws.region = a.region.clone();
            self.aws.profile = a.profile.clone();
            self.aws.gpu_type = a.gpu_type.clone();
            self.aws.instance_type = a.instance_type.clone();
            self.aws.spot = a.spot.unwrap_or(false);
            self.idle_timeout = a.idle_timeout.clone();
        }
        #[cfg(not(feature = "k8s"))]
        if use_k8s {
            bail!(
                "{} asks for the Kubernetes provider, and this bridge was built without it (cargo feature `k8s`)",
                p.path.display()
            );
        }
        #[cfg(feature = "k8s")]
        if use_k8s {
            let k = &p.k8s;
            self.k8s.context = k.context.clone();
            self.k8s.namespace = k.namespace.clone();
            self.k8s.image = k.image.clone();
            self.k8s.cpu = k.cpu.clone();
            self.k8s.memory = k.memory.clone();
            self.k8s.volume = k.volume.clone();
            self.idle_timeout = k.idle_timeout.clone();
        }
        Ok(())
    }

    /// The provider this `up` uses: the flags (the project config's when no
    /// flag and no saved choice says where), else the saved choice, else local.
    fn spec(&self, saved: Option<ProviderSpec>) -> anyhow::Result<ProviderSpec> {
        if self.provider.as_deref() == Some("k8s") && !cfg!(feature = "k8s") {
            bail!("this bridge was built without the Kubernetes provider (cargo feature `k8s`)");
        }
        if self.provider.as_deref() == Some("aws") && !cfg!(feature = "aws") {
            bail!("this bridge was built without the AWS provider (cargo feature `aws`)");
        }
        #[cfg(feature = "k8s")]
        if let Some(spec) = self.k8s_spec(&saved)? {
            return Ok(spec);
        }
        #[cfg(feature = "aws")]
        if let Some(spec) = self.aws_spec(&saved)? {
            return Ok(spec);
        }
        if self.idle_timeout.is_some() {
            bail!(
                "--idle-timeout is for --provider aws or k8s (an SSH host's agent keeps running)"
            );
        }
        let ssh_flags =
            self.identity.is_some() || self.accept_new_host_key || self.remote_dir.is_some();
        let wants_ssh = self.provider.as_deref() == Some("ssh") || self.host.is_some();
        if self.provider.as_deref() == Some("local") && (self.host.is_some() || ssh_flags) {
            bail!(
                "--host, --identity, --accept-new-host-key and --remote-dir are for --provider ssh"
            );
        }
        if wants_ssh {
            let Some(host) = self.host.clone() else {
                bail!(
                    "--provider ssh needs --host [user@]host[:port] (or a Host alias from ~/.ssh/config)"
                );
            };
            return Ok(ProviderSpec::Ssh {
                host,
                identity: self.identity.clone(),
                accept_new_host_key: self.accept_new_host_key,
                remote_dir: self.remote_dir.clone(),
            });
        }
        if ssh_flags {
            bail!("--identity, --accept-new-host-key and --remote-dir need --host");
        }
        if self.provider.as_deref() == Some("local") {
            return Ok(ProviderSpec::Local);
        }
        Ok(saved.unwrap_or(ProviderSpec::Local))
    }

    /// The AWS spec when `--provider aws` or an AWS flag asks for it, or the
    /// saved choice is AWS and no other provider is asked for.
    #[cfg(feature = "aws")]
    fn aws_spec(&self, saved: &Option<ProviderSpec>) -> anyhow::Result<Option<ProviderSpec>> {
        let asked = self.provider.as_deref() == Some("aws");
        let saved_aws = matches!(saved, Some(ProviderSpec::Aws { .. }));
        let other = self.host.is_some() || self.provider.as_deref().is_some_and(|p| p != "aws");
        if (self.aws.any() || self.aws.yes) && other {
            bail!(
                "--region, --profile, --gpu-type, --instance-type, --ami, --spot, --on-idle, --idle-timeout and --ssh-cidr are for --provider aws"
            );
        }
        if other || !(asked || self.aws.any() || saved_aws) {
            return Ok(None);
        }
        if !asked && !self.aws.any() && self.gpu.is_none() && self.idle_timeout.is_none() {
            // A plain `bridge up` (or a job command) with AWS saved.
            return Ok(saved.clone());
        }
        self.aws
            .spec(
                self.gpu,
                self.remote_dir.clone(),
                self.idle_timeout.as_deref(),
                saved.clone(),
            )
            .map(Some)
    }

    /// The Kubernetes spec when `--provider k8s` or a Kubernetes flag asks
    /// for it, or the saved choice is Kubernetes and no other provider is
    /// asked for.
    #[cfg(feature = "k8s")]
    fn k8s_spec(&self, saved: &Option<ProviderSpec>) -> anyhow::Result<Option<ProviderSpec>> {
        let asked = self.provider.as_deref() == Some("k8s");
        let saved_k8s = matches!(saved, Some(ProviderSpec::K8s { .. }));
        let other = self.host.is_some()
            || self.identity.is_some()
            || self.remote_dir.is_some()
            || self.provider.as_deref().is_some_and(|p| p != "k8s");
        #[cfg(feature = "aws")]
        let other = other || self.aws.any();
        if self.k8s.any() && other {
            bail!(
                "--context, --namespace, --image, --cpu, --memory, --node-selector, --toleration, --volume, --pull and --schedule-timeout are for --provider k8s"
            );
        }
        if other || !(asked || self.k8s.any() || saved_k8s) {
            return Ok(None);
        }
        if !asked && !self.k8s.any() && self.gpu.is_none() && self.idle_timeout.is_none() {
            // A plain `bridge up` (or a job command) with Kubernetes saved.
            return Ok(saved.clone());
        }
        self.k8s
            .spec(self.gpu, self.idle_timeout.as_deref(), saved.clone())
            .map(Some)
    }
}

pub async fn run(cwd: &Path, args: Args) -> anyhow::Result<()> {
    let layout = client::repo(cwd)?;
    replace_lost_machine(&layout).await;
    if let Some(mut c) = client::daemon(&layout).await {
        let pid = c
            .status(bridge_proto::v1::StatusRequest {})
            .await
            .ok()
            .and_then(|r| serde_json::from_str::<serde_json::Value>(&r.into_inner().json).ok())
            .and_then(|v| v["daemon_pid"].as_u64())
            .map(|p| format!(" (daemon pid {p})"))
            .unwrap_or_default();
        bail!(
            "bridge is already up for {}{pid}; see `bridge status`, or `bridge down` first",
            layout.repo.display()
        );
    }
    layout
        .create()
        .with_context(|| format!("cannot create {}", layout.state.display()))?;
    let saved = ProviderSpec::load(&layout.provider)?;
    let project = crate::project::Project::load(&layout.repo)?;
    let mut args = args;
    args.gpu = args.gpu.or(project.gpus);
    if !args.asks() && saved.is_none() && project.places() {
        args.fill_from(&project)?;
    }
    let failed = UpFailed::load(&layout);
    let mut spec = match (&failed, args.asks()) {
        // A job command after a failed remote `up`: never the laptop instead.
        (Some(f), false) if args.quiet => bail!("{}", f.refusal()),
        // A plain `bridge up` tries the failed one again.
        (Some(f), false) => f.spec.clone(),
        _ => args.spec(saved.clone())?,
    };
    // A failed `up` leaves the previous choice in place.
    let restore = |layout: &bridge_daemon::repo::Layout| match &saved {
        Some(s) => {
            let _ = s.save(&layout.provider);
        }
        None => {
            let _ = std::fs::remove_file(&layout.provider);
        }
    };
    let asked = spec.clone();
    let ui = crate::out::Terminal;
    let mut machine = spec.machine(&layout, client::agent_bin());
    if let Some(m) = machine.as_mut() {
        if let Err(e) = m.prepare(&ui, args.yes()).await {
            restore(&layout);
            UpFailed::record(&layout, &asked, &e);
            return Err(e);
        }
        spec = m.spec().clone();
    }
    spec.save(&layout.provider)
        .with_context(|| format!("cannot write {}", layout.provider.display()))?;
    let res = start(&layout, &args).await;
    match &res {
        Ok(()) => UpFailed::clear(&layout),
        Err(e) => {
            if let Some(m) = machine.as_mut() {
                m.undo(&ui).await;
            }
            restore(&layout);
            UpFailed::record(&layout, &asked, e);
        }
    }
    res
}

/// A daemon whose machine is gone for good (its pod deleted or evicted)
/// serves nothing: stop it, so that this `up` makes a new machine.
async fn replace_lost_machine(layout: &bridge_daemon::repo::Layout) {
    let Some(mut c) = client::daemon(layout).await else {
        return;
    };
    let Some(spec) = ProviderSpec::load(&layout.provider).ok().flatten() else {
        return;
    };
    let Some(machine) = spec.machine(layout, client::agent_bin()) else {
        return;
    };
    let Ok(st) = machine.status().await else {
        return;
    };
    if !machine.gone(&st) {
        return;
    }
    crate::note!(
        "bridge: {} {}; stopping its daemon and making a new one",
        machine.noun(),
        machine.status_line(&st)
    );
    let _ = c
        .shutdown(bridge_proto::v1::ShutdownRequest::default())
        .await;
    crate::cmd::down::wait_gone(layout).await;
}

/// `.bridge/up-failed.toml`: the remote provider the last `bridge up` was
/// asked for and why it failed. While it is there, a job command does not
/// start the local agent in its place (the job would run on the laptop, said
/// only in a line that is easy to miss); a plain `bridge up` tries the same
/// provider again. A successful `up` or a `bridge down` removes it.
#[derive(serde::Serialize, serde::Deserialize)]
pub struct UpFailed {
    error: String,
    spec: ProviderSpec,
}

impl UpFailed {
    pub fn load(layout: &bridge_daemon::repo::Layout) -> Option<UpFailed> {
        let text = std::fs::read_to_string(&layout.up_failed).ok()?;
        toml::from_str(&text).ok()
    }

    /// Records a failed `up` of a remote provider (a failed local one needs
    /// no guard: there is nothing to fall back from).
    fn record(layout: &bridge_daemon::repo::Layout, spec: &ProviderSpec, e: &anyhow::Error) {
        if matches!(spec, ProviderSpec::Local) {
            Self::clear(layout);
            return;
        }
        let f = UpFailed {
            error: format!("{e:#}"),
            spec: spec.clone(),
        };
        if let Ok(text) = toml::to_string(&f) {
            let _ = bridge_proto::index::write_atomic(&layout.up_failed, text.as_bytes());
        }
    }

    pub fn clear(layout: &bridge_daemon::repo::Layout) {
        let _ = std::fs::remove_file(&layout.up_failed);
    }

    /// The provider that failed.
    pub fn spec(&self) -> &ProviderSpec {
        &self.spec
    }

    /// The error's first line.
    pub fn first_error(&self) -> &str {
        self.error.lines().next().unwrap_or_default()
    }

    fn refusal(&self) -> String {
        let first = self.first_error();
        format!(
            "the last `bridge up` for {} failed ({first}); not running on this machine instead. \
             Run `bridge up` to try {} again, or `bridge up --provider local` to use this machine",
            self.spec.describe(),
            self.spec.name()
        )
    }
}

/// The environment variable jemalloc (as built by `tikv-jemalloc-sys`)
/// reads its options from at start.
const ALLOCATOR_CONF: &str = "_RJEM_MALLOC_CONF";
// The daemon gets one arena per core, not jemalloc's four: its threads
// mostly wait, and each arena keeps partly used pages of its own (at 200k
// files: 36.2 MiB RSS with 2 arenas on 2 cores, 36.5-36.8 with 8, 35.5-35.9
// with 1, whose restarts were ~0.4 s slower in scenario 5).

async fn start(layout: &bridge_daemon::repo::Layout, args: &Args) -> anyhow::Result<()> {
    let layout = layout.clone();
    ensure_token(&layout.token)
        .with_context(|| format!("cannot write the agent token {}", layout.token.display()))?;

    let log = std::fs::File::create(&layout.daemon_log)
        .with_context(|| format!("cannot create {}", layout.daemon_log.display()))?;
    let exe = std::env::current_exe().context("cannot find the bridge executable")?;
    let mut cmd = std::process::Command::new(exe);
    cmd.arg("-C")
        .arg(&layout.repo)
        .arg("daemon")
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log);
    if std::env::var_os(ALLOCATOR_CONF).is_none() {
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        cmd.env(ALLOCATOR_CONF, format!("narenas:{cores}"));
    }
    std::os::unix::process::CommandExt::process_group(&mut cmd, 0);
    let mut child = cmd.spawn().context("cannot start the daemon")?;

    let started = Instant::now();
    let mut c = loop {
        if let Some(c) = client::daemon(&layout).await {
            break c;
        }
        if let Some(status) = child.try_wait()?
            && status.code() != Some(i32::from(super::daemon::ANOTHER_DAEMON))
        {
            bail!(
                "the daemon exited ({status}) before it was ready: {}",
                log_tail(&layout.daemon_log)
            );
        }
        if started.elapsed() > Duration::from_secs(15) {
            let _ = child.kill();
            bail!(
                "the daemon did not start within 15 s: {}",
                log_tail(&layout.daemon_log)
            );
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    // The daemon outlives this command; reap it if it exits while we wait.
    std::thread::spawn(move || {
        let _ = child.wait();
    });

    let mut stream = c
        .sync(bridge_proto::v1::SyncRequest {
            wait: true,
            issued_unix_ms: crate::started_unix_ms(),
        })
        .await?
        .into_inner();
    match follow(&mut stream, crate::out::progress()).await {
        Ok(done) => {
            let json = c
                .status(bridge_proto::v1::StatusRequest {})
                .await?
                .into_inner()
                .json;
            let st: serde_json::Value = serde_json::from_str(&json)?;
            let report = format!(
                "bridge is up: {} files ({}) mirrored to {} on the {} agent\nin sync: generation {}, root {}",
                st["files"],
                human_bytes(st["bytes"].as_u64().unwrap_or(0)),
                st["mirror_path"].as_str().unwrap_or("?"),
                st["provider"].as_str().unwrap_or("?"),
                done.generation,
                done.root
            );
            if args.quiet {
                crate::note!("{report}");
            } else {
                println!("{report}");
            }
            if let Some(why) = st["watcher"].get("polling").and_then(|w| w.as_str()) {
                eprintln!("bridge: warning: {why}");
            }
            if let Some(want) = args.gpu {
                let gpus = st["gpus"].as_array().cloned().unwrap_or_default();
                if (gpus.len() as u32) < want {
                    let have = if gpus.is_empty() {
                        format!(
                            "no GPUs ({})",
                            st["gpu_note"].as_str().unwrap_or("none found")
                        )
                    } else {
                        let names: Vec<&str> =
                            gpus.iter().filter_map(|g| g["name"].as_str()).collect();
                        format!("{} GPU(s): {}", gpus.len(), names.join(", "))
                    };
                    let _ = c
                        .shutdown(bridge_proto::v1::ShutdownRequest::default())
                        .await;
                    crate::cmd::down::wait_gone(&layout).await;
                    bail!("--gpu {want}: the agent has {have}; bridge was stopped again");
                }
            }
            Ok(())
        }
        Err(e) => {
            // Leave nothing half-up: stop the daemon and its agent, and wait
            // for the daemon to be gone.
            let stopped = c
                .shutdown(bridge_proto::v1::ShutdownRequest::default())
                .await;
            crate::cmd::down::wait_gone(&layout).await;
            Err(e.context(if stopped.is_ok() {
                "bridge up failed; the daemon was stopped (its log is in .bridge/daemon.log)"
            } else {
                "bridge up failed: the daemon died while it synced (killed?); its log is in .bridge/daemon.log"
            }))
        }
    }
}

fn log_tail(p: &Path) -> String {
    let text = std::fs::read_to_string(p).unwrap_or_default();
    let lines: Vec<&str> = text.lines().rev().take(5).collect();
    lines.into_iter().rev().collect::<Vec<_>>().join("\n")
}

/// Follows a `Sync(wait)` progress stream to the end, drawing a progress bar on
/// a terminal and plain lines otherwise. Connection errors while the daemon
/// retries are shown, not fatal.
pub async fn follow(
    stream: &mut Streaming<SyncProgress>,
    tty: bool,
) -> anyhow::Result<SyncProgress> {
    let bar = if tty {
        let b = ProgressBar::new(0);
        b.set_style(
            ProgressStyle::with_template(
                "{spinner} {msg:12} [{bar:30}] {pos}/{len} files, {prefix}",
            )
            .expect("valid template")
            .progress_chars("=> "),
        );
        b.enable_steady_tick(Duration::from_millis(100));
        Some(b)
    } else {
        None
    };
    let mut last_line = String::new();
    let mut last_error = String::new();
    while let Some(p) = stream
        .message()
        .await
        .map_err(|s| anyhow!("{}", s.message()))?
    {
        if p.in_sync {
            if let Some(b) = &bar {
                b.finish_and_clear();
            }
            return Ok(p);
        }
        if !p.error.is_empty() && p.error != last_error {
            last_error = p.error.clone();
            match &bar {
                Some(b) => b.println(format!("bridge: {} (retrying)", p.error)),
                None => crate::note!("bridge: {} (retrying)", p.error),
            }
        }
        let bytes = format!(
            "{} / {}",
            human_bytes(p.bytes_done),
            human_bytes(p.bytes_total)
        );
        match &bar {
            Some(b) => {
                b.set_message(p.phase.clone());
                b.set_length(p.files_total);
                b.set_position(p.files_done);
                b.set_prefix(bytes);
            }
            None => {
                let line = if p.files_total > 0 {
                    format!(
                        "{}: {}/{} files, {bytes}",
                        p.phase, p.files_done, p.files_total
                    )
                } else {
                    p.phase.clone()
                };
                if line != last_line && !p.phase.is_empty() {
                    crate::note!("{line}");
                    last_line = line;
                }
            }
        }
    }
    Err(anyhow!("the daemon ended the sync without a result"))
}

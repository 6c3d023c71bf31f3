//! `bridge-agent serve --root DIR --listen unix:PATH|tcp:HOST:PORT --token-file FILE
//!   [--idle-timeout SECS [--idle-command CMD]]`
//! `bridge-agent shim JOB_DIR` (run by the agent, one per job)
//! `bridge-agent gpus` (what GPU discovery finds, for manual checks)

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, bail};
use bridge_agent::idle::{DEFAULT_COMMAND, Policy};
use bridge_agent::{Config, DEFAULT_CACHE_BYTES, Listener};
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "bridge-agent",
    version,
    about = "The bridge agent: keeps mirrors and runs jobs"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Serve the bridge.v1 Agent protocol.
    Serve {
        /// Directory for mirrors, the chunk store and state.
        #[arg(long)]
        root: PathBuf,
        /// `unix:PATH` or `tcp:HOST:PORT`.
        #[arg(long)]
        listen: String,
        /// File holding the token clients must present (mode 0600).
        #[arg(long)]
        token_file: PathBuf,
        /// Bound on old file versions kept for dedup, in MiB.
        #[arg(long, default_value_t = DEFAULT_CACHE_BYTES / (1024 * 1024))]
        cache_mib: u64,
        /// Run --idle-command once no job has been queued or running and no
        /// daemon attached for this many seconds (absent or 0: never).
        #[arg(long, value_name = "SECS", default_value_t = 0)]
        idle_timeout: u64,
        /// What to run when idle, with `sh -c` (it runs again after another
        /// timeout if the machine is still up).
        #[arg(long, value_name = "CMD", default_value = DEFAULT_COMMAND)]
        idle_command: String,
    },
    /// Supervise one job (spawned by the agent).
    #[command(hide = true)]
    Shim {
        /// The job's directory, holding spec.json.
        job_dir: PathBuf,
    },
    /// Run one `placement = "cluster"` job as a Kubernetes Job (spawned by
    /// the shim).
    #[command(hide = true)]
    ClusterRun {
        /// The job's directory, holding spec.json.
        job_dir: PathBuf,
    },
    /// The pod side of a `placement = "cluster"` job (delivered into the
    /// pod by its head agent).
    #[command(hide = true)]
    Worker {
        /// The pod's bridge directory (run/worker.json, run/key).
        #[arg(long)]
        dir: PathBuf,
    },
    /// List the GPUs this machine reports.
    Gpus,
    /// Print the tree root of DIR as the agent computes a mirror's (what a
    /// job's `BRIDGE_GENERATION` names): a job can check that its snapshot
    /// is exactly its generation (bench/load_bench.py does).
    #[command(hide = true)]
    TreeRoot { dir: PathBuf },
}

fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("BRIDGE_LOG")
                .unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        // A log on a full disk must not take the process down: by default a
        // failed write is reported with `eprintln!`, which panics when
        // stderr itself cannot be written (a shim's stderr is `shim.log`,
        // on the disk a job may fill).
        .log_internal_errors(false)
        .init();
    match Cli::parse().cmd {
        Cmd::Serve {
            root,
            listen,
            token_file,
            cache_mib,
            idle_timeout,
            idle_command,
        } => {
            if idle_timeout > 0 && idle_command.trim().is_empty() {
                bail!("--idle-command is empty: give the command to run when idle");
            }
            let idle = (idle_timeout > 0).then(|| Policy {
                timeout: Duration::from_secs(idle_timeout),
                command: idle_command,
            });
            tokio::runtime::Runtime::new()?
                .block_on(serve(root, listen, token_file, cache_mib, idle))
        }
        // Before any runtime: the shim wants to be the only thread when it
        // sets up its signal mask.
        Cmd::Shim { job_dir } => std::process::exit(bridge_agent::shim::run(&job_dir)),
        Cmd::ClusterRun { job_dir } => std::process::exit(bridge_agent::cluster::run(&job_dir)),
        Cmd::Worker { dir } => std::process::exit(bridge_agent::cluster::worker::run(&dir)),
        Cmd::TreeRoot { dir } => {
            println!("{}", bridge_agent::mirror::tree_root(&dir)?);
            Ok(())
        }
        Cmd::Gpus => {
            use bridge_agent::gpu::{GpuError, GpuInventory, NvidiaSmi};
            match NvidiaSmi::default().discover() {
                Err(GpuError::NotFound) => println!("no GPUs (nvidia-smi is not on PATH)"),
                Ok(gpus) if gpus.is_empty() => println!("no GPUs"),
                Ok(gpus) => gpus.iter().for_each(|g| println!("{g}")),
                Err(e) => bail!(e),
            }
            Ok(())
        }
    }
}

async fn serve(
    root: PathBuf,
    listen: String,
    token_file: PathBuf,
    cache_mib: u64,
    idle: Option<Policy>,
) -> anyhow::Result<()> {
    let token = read_token(&token_file)?;
    std::fs::create_dir_all(&root).with_context(|| format!("cannot create {}", root.display()))?;
    let listener = bind(&listen).await?;
    let config = Config {
        root,
        token,
        cache_bytes: cache_mib * 1024 * 1024,
        idle,
    };
    bridge_agent::run(config, listener, shutdown_signal()).await?;
    Ok(())
}

fn read_token(path: &Path) -> anyhow::Result<String> {
    let meta = std::fs::metadata(path)
        .with_context(|| format!("cannot read token file {}", path.display()))?;
    if meta.permissions().mode() & 0o077 != 0 {
        bail!(
            "token file {} is readable by other users; run `chmod 600 {}`",
            path.display(),
            path.display()
        );
    }
    let token = std::fs::read_to_string(path)?.trim().to_string();
    if token.is_empty() {
        bail!("token file {} is empty", path.display());
    }
    Ok(token)
}

async fn bind(listen: &str) -> anyhow::Result<Listener> {
    if let Some(path) = listen.strip_prefix("unix:") {
        let path = Path::new(path);
        if path.exists() {
            if tokio::net::UnixStream::connect(path).await.is_ok() {
                bail!("{} is in use by a running agent", path.display());
            }
            std::fs::remove_file(path)?;
        }
        let l = tokio::net::UnixListener::bind(path)
            .with_context(|| format!("cannot listen on {}", path.display()))?;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
        Ok(Listener::Unix(l))
    } else if let Some(addr) = listen.strip_prefix("tcp:") {
        let l = tokio::net::TcpListener::bind(addr)
            .await
            .with_context(|| format!("cannot listen on {addr}"))?;
        eprintln!("listening on tcp:{}", l.local_addr()?);
        Ok(Listener::Tcp(l))
    } else {
        bail!("--listen must be unix:PATH or tcp:HOST:PORT, not {listen:?}")
    }
}

async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler");
    let mut int = signal(SignalKind::interrupt()).expect("SIGINT handler");
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
}

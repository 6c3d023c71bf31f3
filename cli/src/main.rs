//! `bridge`: develop locally, run on remote machines.
//!
//! Parses arguments, sets up logging, and hands each command to its module in
//! [`cmd`]. Errors are printed once, with what to do, by `anyhow`.

#[cfg(feature = "aws")]
mod aws;
mod client;
mod cmd;
mod jobs;
#[cfg(feature = "k8s")]
mod k8s;
mod out;
mod project;
mod sweeps;

use std::path::PathBuf;
use std::sync::OnceLock;
use std::time::{SystemTime, UNIX_EPOCH};

use bridge_cli::spec;
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "bridge",
    version,
    about = "Develop locally, run on remote CPU/GPU machines: a live mirror of your repository on an agent"
)]
struct Cli {
    /// Run as if started in DIR.
    #[arg(short = 'C', global = true, value_name = "DIR")]
    dir: Option<PathBuf>,
    /// Print only errors, warnings and what the command is for (a job's output,
    /// a table, JSON): no notes, no progress bars.
    #[arg(short, long, global = true, conflicts_with = "verbose")]
    quiet: bool,
    /// Show bridge's own log on stderr: -v debug, -vv trace (`BRIDGE_LOG=FILTER`
    /// picks the targets). The daemon's log stays in .bridge/daemon.log.
    #[arg(short, long, global = true, action = clap::ArgAction::Count)]
    verbose: u8,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Start the agent and the daemon for this repository; returns once the mirror is exact.
    Up(Box<cmd::up::Args>),
    /// Show the daemon's state: agent, mirror, sync, watcher, skipped paths.
    Status(cmd::status::Args),
    /// Sync now; with --wait, return once the agent's tree root equals the local one.
    Sync(cmd::sync::Args),
    /// Stop the daemon and the agent it started (AWS: terminate the instance).
    Down(cmd::down::Args),
    /// Run the daemon in the foreground (`bridge up` starts it in the background).
    Daemon(cmd::daemon::Args),
    /// Run a job file (train.toml) on the agent, streaming its logs; exits with its exit code.
    /// With [sweep], runs its trials on every free GPU and prints a summary table.
    Run(cmd::run::Args),
    /// Run a command on the agent as an ad-hoc job: `bridge exec [--gpus N] -- CMD...`.
    Exec(cmd::exec::Args),
    /// Show a job's log, or a sweep trial's (`bridge logs s3/2`); `-f` follows it,
    /// `--tail N` starts at the last N lines.
    Logs(cmd::logs::Args),
    /// List jobs: id, name, state, GPUs, start, duration, exit code.
    Ps(cmd::ps::Args),
    /// The agent's GPUs: model, memory used/total, utilisation, and the job
    /// holding each; `--watch` refreshes in place, `--json` for scripts.
    Gpus(cmd::gpus::Args),
    /// Stop a job: SIGTERM to its process group, SIGKILL after a grace period
    /// (a sweep id stops the sweep).
    Cancel(cmd::cancel::Args),
    /// Sweeps: `bridge sweep status [SWEEP] [--json] [--watch]`, `cancel SWEEP`,
    /// `resume SWEEP` (runs its failed, lost and cancelled trials again).
    Sweep(cmd::sweep::Args),
    /// Fetch a job's outputs into the local tree again.
    Pull(cmd::pull::Args),
    /// Forward ports between this machine and the agent (both loopback only):
    /// `bridge forward 6006`, `--reverse 5000`, `--list`, `--stop PORT`.
    Forward(cmd::forward::Args),
    /// A Jupyter kernel on the agent, in the live mirror: `bridge kernel install`,
    /// then pick it in JupyterLab, VS Code or PyCharm; `list`, `uninstall NAME`.
    Kernel(cmd::kernel::Args),
    /// Check what bridge needs, one line per check with the fix for each failure:
    /// repository, project config, agent binary, provider reachable, Python, GPUs,
    /// disk space, clock, inotify watches. Exits 1 when something blocks.
    Doctor(cmd::doctor::Args),
    /// Print a shell completion script: `source <(bridge completions bash)`,
    /// `bridge completions zsh > ~/.zfunc/_bridge`, `bridge completions fish | source`.
    Completions(cmd::completions::Args),
    /// Print the man page bridge(1), or write every command's page with `--out DIR`.
    Man(cmd::completions::ManArgs),
}

/// When this command started, in milliseconds since the Unix epoch.
static STARTED: OnceLock<u64> = OnceLock::new();

/// When this command started (ms since the epoch): a daemon whose full scan
/// began later has seen every change made before the command.
pub fn started_unix_ms() -> u64 {
    *STARTED.get_or_init(|| {
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_millis() as u64)
            .unwrap_or(0)
    })
}

/// jemalloc, not glibc's malloc: the daemon builds its tree of a 200k-file
/// repository next to a scan's worth of temporaries, and glibc kept those
/// freed temporaries resident for good, twice the live heap (mimalloc kept
/// as much). jemalloc keeps them in their own size classes' pages and, with
/// the daemon's background thread, hands those pages back (scenario 9).
#[global_allocator]
static GLOBAL: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

fn main() -> std::process::ExitCode {
    started_unix_ms();
    let cli = Cli::parse();
    // The daemon sets up its own log (BRIDGE_LOG, to .bridge/daemon.log).
    let verbose = if matches!(cli.cmd, Cmd::Daemon(_)) {
        0
    } else {
        cli.verbose
    };
    out::init(cli.quiet, verbose);
    match cli.cmd {
        Cmd::Completions(a) => return exit(cmd::completions::run(a)),
        Cmd::Man(a) => return exit(cmd::completions::man(a)),
        _ => {}
    }
    let cwd = match cli
        .dir
        .clone()
        .map(Ok)
        .unwrap_or_else(std::env::current_dir)
    {
        Ok(d) => d,
        Err(e) => {
            eprintln!("bridge: cannot read the current directory: {e}");
            return std::process::ExitCode::from(2);
        }
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    let res = rt.block_on(async move {
        match cli.cmd {
            Cmd::Up(a) => cmd::up::run(&cwd, *a).await.map(|()| 0),
            Cmd::Status(a) => cmd::status::run(&cwd, a).await.map(|()| 0),
            Cmd::Sync(a) => cmd::sync::run(&cwd, a).await.map(|()| 0),
            Cmd::Down(a) => cmd::down::run(&cwd, a).await.map(|()| 0),
            Cmd::Daemon(a) => cmd::daemon::run(&cwd, a).await,
            Cmd::Run(a) => cmd::run::run(&cwd, a).await,
            Cmd::Exec(a) => cmd::exec::run(&cwd, a).await,
            Cmd::Logs(a) => cmd::logs::run(&cwd, a).await,
            Cmd::Ps(a) => cmd::ps::run(&cwd, a).await,
            Cmd::Gpus(a) => cmd::gpus::run(&cwd, a).await,
            Cmd::Cancel(a) => cmd::cancel::run(&cwd, a).await,
            Cmd::Sweep(a) => cmd::sweep::run(&cwd, a).await,
            Cmd::Pull(a) => cmd::pull::run(&cwd, a).await,
            Cmd::Forward(a) => cmd::forward::run(&cwd, a).await,
            Cmd::Kernel(a) => cmd::kernel::run(&cwd, a).await,
            Cmd::Doctor(a) => cmd::doctor::run(&cwd, a).await,
            Cmd::Completions(_) | Cmd::Man(_) => unreachable!("handled before the runtime"),
        }
    });
    exit(res)
}

/// The process's exit status: the command's, or 1 after printing its error.
fn exit(res: anyhow::Result<u8>) -> std::process::ExitCode {
    match res {
        Ok(code) => std::process::ExitCode::from(code),
        Err(e) => {
            eprintln!("bridge: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

//! Integration tests: real `bridge` daemons and `bridge-agent` processes on
//! temporary git repositories (see the harness in `tests/src/lib.rs`).

/// A raw gRPC client attacking the agent: paths, chunks, tokens, versions.
mod agent_safety;
/// The AWS provider against a real EC2 API emulator (moto) and a private
/// sshd standing in for the instance: launch, reuse, autostop, down, bad input.
mod aws;
/// The command line's errors: outside a repository, `up` twice, `down`.
mod cli;
/// `image = "…"`: jobs in a container of their image (podman), cancel,
/// a missing image, a missing engine.
mod containers;
/// `bridge run --debug` / `exec --debug`: debugpy on the agent, a DAP
/// client attaching through the forward with local breakpoints.
mod debugger;
/// Editors' save strategies: atomic rename, vim, JetBrains; torn writes.
mod editors;
/// The fault suite: daemons and agents killed mid-work, `down` with no
/// daemon, two daemons and two runs at once.
mod faults;
/// Port forwards both ways, a job's own, over SSH through a cut link; only
/// loopback listens.
mod forwards;
/// Idle autostop: attached clients, running jobs and a connected daemon
/// hold the agent; the idle command runs a timeout after they are gone.
mod idle;
/// Ignore rules (nested .gitignore, negations, .bridgeignore, info/exclude)
/// and what is left alone on the agent.
mod ignore;
/// Jobs: exit codes, logs across restarts, snapshots, setup cache, GPUs,
/// cancel, outputs, the quickstart example, bad input.
mod jobs;
/// The Kubernetes provider on a real one-node cluster built here: a GPU
/// pod's whole flow, a port-forward cut, refusals, idle shutdown.
mod k8s;
/// `bridge kernel`: a real ipykernel on the agent driven by jupyter_client
/// through its kernelspec, locally and over SSH through link cuts.
mod kernel;
/// Large files: bytes on the wire for a small change.
mod large;
/// Live mode: uvicorn --reload in the mirror, restarts with backoff, down.
mod live;
/// The laptop's MLflow server from a job over SSH: params, metrics,
/// artifacts and bridge's tags land there; notes before a job.
mod mlflow;
/// Daemon restart without rehashing; agent killed mid-sync.
mod restart;
/// The SSH provider against a real sshd: the whole flow, agent reuse and
/// upgrade, host keys, bad input, link cuts.
mod ssh;
/// Sweeps: a grid on fake GPUs with a failure and its resume, a seeded random
/// search, Optuna workers, cancel, MLflow parent and child runs, bad input.
mod sweeps;
/// Symlinks inside, absolute and escaping.
mod symlinks;
/// Initial sync and live edits: files, directories, renames, modes, names.
mod sync;
/// The command line as a new user meets it: completions and man pages,
/// `--json` of every read command, `-q`, `bridge gpus`, the project config,
/// a failed remote `up` never replaced by the laptop, `bridge doctor`.
mod ux;
/// Watch limits: the polling fallback.
mod watch_limit;
/// The Python wheel (pyproject.toml, maturin): built, installed into a
/// fresh venv, and a job run from there with no cargo on PATH.
mod wheel;

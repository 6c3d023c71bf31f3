//! `bridge run FILE.toml [--set KEY=VALUE]... [--detach] [--debug[=pycharm:PORT]] [--yes]`: run a
//! job on the agent against exactly the tree saved now; exits with the job's
//! exit code. A job file with `[sweep]` runs its trials instead.

use std::path::{Path, PathBuf};

use anyhow::bail;

use crate::{client, jobs, spec, sweeps};

#[derive(clap::Args)]
pub struct Args {
    /// The job file (train.toml), or a directory holding one. Default: the
    /// project config's `job` (bridge.toml or [tool.bridge]).
    file: Option<PathBuf>,
    /// Override a field of the job file, e.g. `--set resources.gpus=2 --set env.LR=0.01`.
    #[arg(long = "set", value_name = "KEY=VALUE")]
    set: Vec<String>,
    /// Submit and return at once, printing the job id.
    #[arg(long, short = 'd')]
    detach: bool,
    #[command(flatten)]
    debug: jobs::DebugArgs,
    /// Submit a sweep of more than 10,000 trials.
    #[arg(long)]
    yes: bool,
}

pub async fn run(cwd: &Path, args: Args) -> anyhow::Result<u8> {
    let layout = client::repo(cwd)?;
    let file = match &args.file {
        Some(f) => cwd.join(f),
        None => {
            let project = crate::project::Project::load(&layout.repo)?;
            match project.job {
                Some(j) => layout.repo.join(j),
                None => bail!(
                    "which job file? `bridge run train.toml`, or set `job = \"train.toml\"` in bridge.toml (or [tool.bridge] in pyproject.toml)"
                ),
            }
        }
    };
    let loaded = spec::load(&file, &layout.repo, &args.set)?;
    if loaded.path != file {
        crate::note!("bridge: job file {}", loaded.path.display());
    }
    let mut spec = loaded.spec;
    spec.debug = args.debug.spec();
    if let Some(sweep) = loaded.sweep {
        if spec.debug.is_some() {
            bail!(
                "--debug runs one job under a debugger, and this job file is a sweep: debug one trial with a job file of its parameters (drop [sweep])"
            );
        }
        return sweeps::submit_and_follow(cwd, &layout, spec, sweep, args.detach, args.yes).await;
    }
    jobs::submit_and_follow(cwd, &layout, spec, args.detach).await
}

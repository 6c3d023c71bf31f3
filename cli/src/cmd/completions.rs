//! `bridge completions SHELL` and `bridge man [--out DIR]`: shell completion
//! scripts and man pages, generated from the same clap definitions as the
//! parser, so they cannot drift from it.

use std::path::PathBuf;

use anyhow::Context;
use clap::CommandFactory;
use clap_complete::Shell;

#[derive(clap::Args)]
pub struct Args {
    /// The shell: bash, zsh, fish, elvish or powershell.
    #[arg(value_enum)]
    shell: Shell,
}

/// Prints the completion script for `args.shell` on stdout.
pub fn run(args: Args) -> anyhow::Result<u8> {
    let mut cmd = crate::Cli::command();
    clap_complete::generate(args.shell, &mut cmd, "bridge", &mut std::io::stdout());
    Ok(0)
}

#[derive(clap::Args)]
pub struct ManArgs {
    /// Write bridge.1 and one page per command (bridge-run.1, bridge-sweep-status.1, …)
    /// into DIR instead of printing bridge(1) on stdout.
    #[arg(long, value_name = "DIR")]
    out: Option<PathBuf>,
}

/// Prints bridge(1), or writes every page into `--out`.
pub fn man(args: ManArgs) -> anyhow::Result<u8> {
    let cmd = crate::Cli::command();
    match args.out {
        None => clap_mangen::Man::new(cmd)
            .render(&mut std::io::stdout())
            .context("cannot write the man page")?,
        Some(dir) => {
            std::fs::create_dir_all(&dir)
                .with_context(|| format!("cannot create {}", dir.display()))?;
            clap_mangen::generate_to(cmd, &dir)
                .with_context(|| format!("cannot write the man pages into {}", dir.display()))?;
            crate::note!("bridge: man pages written to {}", dir.display());
        }
    }
    Ok(0)
}

//! `bridge exec [--gpus N] [--debug[=pycharm:PORT]] -- CMD [ARG]...`: an ad-hoc job without a job file,
//! run in the agent's copy of the directory you are in.

use std::path::Path;

use anyhow::bail;
use bridge_proto::v1::JobSpec;

use crate::{client, jobs};

#[derive(clap::Args)]
pub struct Args {
    /// GPUs the command gets (0: none visible).
    #[arg(long, default_value_t = 0)]
    gpus: u32,
    /// Submit and return at once, printing the job id.
    #[arg(long, short = 'd')]
    detach: bool,
    #[command(flatten)]
    debug: jobs::DebugArgs,
    /// The command and its arguments.
    #[arg(trailing_var_arg = true, allow_hyphen_values = true, required = true)]
    command: Vec<String>,
}

/// Quotes `s` for `/bin/sh` when it needs it.
fn shell_quote(s: &str) -> String {
    let plain = !s.is_empty()
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_./=:,+@%".contains(&b));
    if plain {
        s.to_string()
    } else {
        format!("'{}'", s.replace('\'', r"'\''"))
    }
}

pub async fn run(cwd: &Path, args: Args) -> anyhow::Result<u8> {
    let layout = client::repo(cwd)?;
    if args.command.is_empty() {
        bail!("nothing to run: give a command after `--`, e.g. `bridge exec -- python train.py`");
    }
    let here = cwd.canonicalize().unwrap_or_else(|_| cwd.to_path_buf());
    let workdir = here
        .strip_prefix(&layout.repo)
        .map(|p| p.to_string_lossy().into_owned())
        .unwrap_or_default();
    let name = Path::new(&args.command[0])
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "exec".into());
    let spec = JobSpec {
        name,
        run: args
            .command
            .iter()
            .map(|a| shell_quote(a))
            .collect::<Vec<_>>()
            .join(" "),
        workdir,
        gpus: args.gpus,
        debug: args.debug.spec(),
        ..Default::default()
    };
    jobs::submit_and_follow(cwd, &layout, spec, args.detach).await
}

#[cfg(test)]
mod tests {
    use super::shell_quote;

    #[test]
    fn quoting() {
        assert_eq!(shell_quote("python"), "python");
        assert_eq!(shell_quote("a b"), "'a b'");
        assert_eq!(shell_quote("it's"), r"'it'\''s'");
        assert_eq!(shell_quote(""), "''");
        assert_eq!(shell_quote("$HOME"), "'$HOME'");
    }
}

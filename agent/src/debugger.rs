//! `bridge run --debug`: the job's Python starts under debugpy, listening on
//! a loopback port of the agent and waiting for a client (the daemon
//! forwards a laptop port to it).
//!
//! How, without touching the command: a `sitecustomize.py` on `PYTHONPATH`
//! that every Python interpreter imports at start. The first one to see
//! `BRIDGE_DEBUGPY_LISTEN` takes it out of its environment (so the processes
//! it starts, debugpy's own adapter included, do not listen again: debugpy
//! follows subprocesses itself), calls `debugpy.listen` and waits for the
//! client. That works for `python train.py`, `python -m pkg`, a shell script
//! that ends up in Python, and any interpreter the env puts first on PATH.
//!
//! debugpy comes from the job's environment when it has it; otherwise it is
//! installed once per interpreter (its version and platform) with `pip
//! install --target` into `cache/debugpy/<tag>/`, under a lock, and put on
//! `PYTHONPATH`: the user's cached environments are never modified.

use std::ffi::OsString;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use crate::envcache::{self, Env, EnvError, StepRunner};

/// The variable the sitecustomize hook reads: `HOST:PORT` to listen on.
pub const LISTEN_VAR: &str = "BRIDGE_DEBUGPY_LISTEN";

const SITECUSTOMIZE: &str = r#"# Written by bridge for `bridge run --debug` (see the agent's debugger.rs).
import os as _os
_listen = _os.environ.pop("BRIDGE_DEBUGPY_LISTEN", None)
if _listen:
    import sys as _sys
    import debugpy as _debugpy
    _host, _, _port = _listen.rpartition(":")
    _debugpy.listen((_host, int(_port)))
    print("bridge: debugpy is listening; waiting for the debugger to attach", file=_sys.stderr, flush=True)
    _debugpy.wait_for_client()
    del _sys, _debugpy, _host, _port
del _os, _listen
"#;

/// Makes the job's environment start its first Python under debugpy on
/// 127.0.0.1:`port`: finds or installs debugpy and sets `PYTHONPATH` and
/// [`LISTEN_VAR`] in `env`.
pub fn prepare(
    cache_dir: &Path,
    env: &mut Env,
    cwd: &Path,
    port: u16,
    runner: &mut dyn StepRunner,
) -> Result<(), EnvError> {
    let found = ensure_tool(cache_dir, env, cwd, DEBUGPY, runner)?;
    let site = cache_dir.join("debugpy").join("site");
    envcache::write_atomic(
        &site.join("sitecustomize.py"),
        SITECUSTOMIZE.as_bytes(),
        false,
    )
    .map_err(|source| EnvError::Io {
        what: "cannot write",
        path: site.clone(),
        source,
    })?;
    let mut paths = vec![site];
    paths.extend(found.path);
    prepend_pythonpath(env, paths);
    env.insert(LISTEN_VAR.into(), format!("127.0.0.1:{port}").into());
    Ok(())
}

/// A Python package bridge needs in a job's interpreter (debugpy for
/// `--debug`, ipykernel for kernels).
#[derive(Debug, Clone, Copy)]
pub struct Tool {
    /// What `import` names.
    pub module: &'static str,
    /// What pip installs, and the cache directory's name.
    pub requirement: &'static str,
    /// Why bridge needs it, for the log.
    pub purpose: &'static str,
}

pub const DEBUGPY: Tool = Tool {
    module: "debugpy",
    requirement: "debugpy",
    purpose: "the debugger",
};

/// Where a tool was found.
pub struct Found {
    /// The interpreter that imports it.
    pub python: PathBuf,
    /// A directory to put on `PYTHONPATH` (installed by bridge), or `None`
    /// when the environment has it.
    pub path: Option<PathBuf>,
}

/// Finds `tool` in the environment's Python, or installs it once per
/// interpreter (its version and platform) with `pip install --target` into
/// `cache/<requirement>/<tag>/`, under a lock: the user's cached
/// environments are never modified.
pub fn ensure_tool(
    cache_dir: &Path,
    env: &Env,
    cwd: &Path,
    tool: Tool,
    runner: &mut dyn StepRunner,
) -> Result<Found, EnvError> {
    let python = envcache::which(env, "python3")
        .or_else(|| envcache::which(env, "python"))
        .ok_or(EnvError::NoPython)?;
    let probe = |code: &str| {
        Command::new(&python)
            .args(["-c", code])
            .current_dir(cwd)
            .env_clear()
            .envs(env.iter())
            .output()
    };
    if probe(&format!("import {}", tool.module)).is_ok_and(|o| o.status.success()) {
        return Ok(Found { python, path: None });
    }
    let tag = probe(
        "import sys, sysconfig; print(f'{sys.implementation.cache_tag}-{sysconfig.get_platform()}')",
    )
    .ok()
    .filter(|o| o.status.success())
    .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
    .filter(|t| !t.is_empty() && t.bytes().all(|b| b.is_ascii_graphic() && b != b'/'))
    .ok_or_else(|| EnvError::PythonProbe {
        program: python.clone(),
        detail: "no version tag".into(),
    })?;
    let dir = install(cache_dir, &python, &tag, tool, env, cwd, runner)?;
    Ok(Found {
        python,
        path: Some(dir),
    })
}

/// Puts `paths` first on the environment's `PYTHONPATH`.
pub fn prepend_pythonpath(env: &mut Env, mut paths: Vec<PathBuf>) {
    if let Some(p) = env.get(&OsString::from("PYTHONPATH")) {
        paths.extend(std::env::split_paths(p).filter(|p| !p.as_os_str().is_empty()));
    }
    if let Ok(joined) = std::env::join_paths(&paths) {
        env.insert("PYTHONPATH".into(), joined);
    }
}

/// `tool` for the interpreter `tag`, installed once under the cache.
fn install(
    cache_dir: &Path,
    python: &Path,
    tag: &str,
    tool: Tool,
    env: &Env,
    cwd: &Path,
    runner: &mut dyn StepRunner,
) -> Result<PathBuf, EnvError> {
    let name = tool.requirement;
    let base = cache_dir.join(name);
    fs::create_dir_all(&base).map_err(|source| EnvError::Io {
        what: "cannot create",
        path: base.clone(),
        source,
    })?;
    let dir = base.join(tag);
    let done = dir.join(".complete");
    if done.exists() {
        return Ok(dir);
    }
    let _lock = envcache::lock(
        &base.join(format!("{tag}.lock")),
        runner,
        &format!("{name} install"),
    )?;
    if done.exists() {
        return Ok(dir);
    }
    runner.note(&format!(
        "installing {name} for {} ({}; once per Python, in the agent's cache)",
        python.display(),
        tool.purpose
    ));
    let tmp = base.join(format!("{tag}.tmp"));
    let _ = fs::remove_dir_all(&tmp);
    let mut cmd = Command::new(python);
    cmd.args([
        "-m",
        "pip",
        "install",
        "--quiet",
        "--disable-pip-version-check",
        "--no-input",
        "--target",
    ])
    .arg(&tmp)
    .arg(name)
    .current_dir(cwd)
    .env_clear()
    .envs(env.iter());
    let outcome = runner.run(cmd).map_err(|source| EnvError::Io {
        what: "cannot run pip of",
        path: python.to_path_buf(),
        source,
    })?;
    if !outcome.success() {
        let _ = fs::remove_dir_all(&tmp);
        runner.note(&format!(
            "could not install {name} with {} -m pip ({outcome}): add {name} to the job's environment (requirements), or install pip for that Python on the agent",
            python.display()
        ));
        return Err(EnvError::ToolFailed {
            tool: name,
            outcome,
        });
    }
    let _ = fs::remove_dir_all(&dir);
    fs::rename(&tmp, &dir)
        .and_then(|()| fs::write(&done, b""))
        .map_err(|source| EnvError::Io {
            what: "cannot install",
            path: dir.clone(),
            source,
        })?;
    Ok(dir)
}

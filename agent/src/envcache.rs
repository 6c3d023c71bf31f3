//! Cached Python environments and setup commands, shared by the jobs of one
//! agent.
//!
//! Layout under the job's `cache_dir`:
//! - `envs/<key16>/`: a Python env (venv or conda prefix), complete once
//!   `.bridge-complete` exists in it; `envs/<key16>.lock` serialises builds.
//! - `setup/<key16>.done`: a setup command that succeeded for these inputs;
//!   `setup/<key16>.lock` serialises runs.
//! - `python/<id16>`: what `python3` on PATH is (interpreter and version), keyed
//!   by the binary's identity, so a cache hit does not start Python.
//!
//! Keys are BLAKE3 hashes of everything the result depends on (the file's
//! bytes, the interpreter's version, the setup's command and inputs), so a
//! change makes a new entry instead of invalidating one. Venvs are not
//! relocatable, so an env is built in place at its final path, under the lock,
//! and the marker is written last: a directory without it is a crashed build
//! and is rebuilt. Failures are never cached.
//!
//! The processes themselves (builds, the setup) are run by the caller's
//! [`StepRunner`], so their output lands in the job log and cancellation and
//! leftover-process cleanup work exactly as for the job's command.

use std::collections::BTreeMap;
use std::ffi::{OsStr, OsString};
use std::fmt;
use std::fs::{self, File};
use std::io::{self, Read};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::fcntl::{Flock, FlockArg};

use crate::shim::{PythonKind, PythonSpec, SetupSpec};

/// A process environment, as the job sees it.
pub type Env = BTreeMap<OsString, OsString>;

/// Marker written last into a finished env.
pub const COMPLETE_MARKER: &str = ".bridge-complete";

/// How often a job waiting for another job's build checks for cancellation.
const LOCK_POLL: Duration = Duration::from_millis(50);

/// How a step's main process ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Exited(i32),
    Signaled(i32),
}

impl Outcome {
    pub fn success(self) -> bool {
        self == Outcome::Exited(0)
    }

    /// The exit code a shell would report: 128 + signal when killed.
    pub fn code(self) -> i32 {
        match self {
            Outcome::Exited(c) => c,
            Outcome::Signaled(s) => 128 + s,
        }
    }

    pub fn signal(self) -> Option<i32> {
        match self {
            Outcome::Exited(_) => None,
            Outcome::Signaled(s) => Some(s),
        }
    }
}

impl fmt::Display for Outcome {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Outcome::Exited(c) => write!(f, "exit {c}"),
            Outcome::Signaled(s) => write!(f, "signal {s}"),
        }
    }
}

/// Runs the processes the cache needs, the way the shim runs any step.
pub trait StepRunner {
    /// Runs `cmd` (program, arguments, cwd and environment set) as one step:
    /// its own process group, stdout/stderr into the job log, leftovers killed
    /// after it ends. Returns how its main process ended.
    fn run(&mut self, cmd: Command) -> io::Result<Outcome>;
    /// Writes one of bridge's own lines (without "bridge: " or newline).
    fn note(&mut self, line: &str);
    /// Whether the job was cancelled: start nothing new.
    fn cancelled(&self) -> bool;
}

#[derive(Debug, thiserror::Error)]
pub enum EnvError {
    #[error("{what} {path}: {source}")]
    Io {
        what: &'static str,
        path: PathBuf,
        source: io::Error,
    },
    #[error("python3 is not on the agent's PATH")]
    NoPython,
    #[error("cannot ask {program} for its version: {detail}")]
    PythonProbe { program: PathBuf, detail: String },
    #[error("environment.yml needs conda, mamba or micromamba on the agent's PATH")]
    NoConda,
    #[error("python env build failed ({0})")]
    BuildFailed(Outcome),
    #[error("setup input {0} does not exist")]
    MissingInput(PathBuf),
    #[error("setup failed ({0})")]
    SetupFailed(Outcome),
    #[error("installing {tool} failed ({outcome}): add {tool} to the job's environment")]
    ToolFailed {
        tool: &'static str,
        outcome: Outcome,
    },
    #[error("cancelled")]
    Cancelled,
}

impl EnvError {
    /// The failed process's outcome, for the job's exit record.
    pub fn outcome(&self) -> Option<Outcome> {
        match self {
            EnvError::BuildFailed(o)
            | EnvError::SetupFailed(o)
            | EnvError::ToolFailed { outcome: o, .. } => Some(*o),
            _ => None,
        }
    }

    /// The line the job log gets for this failure.
    fn log_line(&self) -> String {
        let said = |what: &str, o: &Outcome| match o {
            Outcome::Exited(c) => format!("{what} failed with exit code {c}"),
            Outcome::Signaled(s) => format!("{what} killed by signal {s}"),
        };
        match self {
            EnvError::BuildFailed(o) => said("python env build", o),
            EnvError::SetupFailed(o) => said("setup", o),
            e => e.to_string(),
        }
    }
}

fn io_err<'a>(what: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> EnvError + 'a {
    move |source| EnvError::Io {
        what,
        path: path.to_path_buf(),
        source,
    }
}

/// A ready Python env.
#[derive(Debug, Clone)]
pub struct PythonEnv {
    pub dir: PathBuf,
    /// Full hex key (the directory name is its first 16 characters).
    pub key: String,
    /// A conda prefix rather than a venv.
    pub conda: bool,
    /// Whether this job built it (false: it was cached).
    pub built: bool,
}

impl PythonEnv {
    /// Activates the env in `env` the way `activate` scripts do.
    pub fn activate(&self, env: &mut Env) {
        let var = if self.conda {
            "CONDA_PREFIX"
        } else {
            "VIRTUAL_ENV"
        };
        env.insert(var.into(), self.dir.clone().into_os_string());
        env.remove(OsStr::new("PYTHONHOME"));
        let mut dirs = vec![self.dir.join("bin")];
        if let Some(p) = env.get(OsStr::new("PATH")) {
            dirs.extend(std::env::split_paths(p));
        }
        if let Ok(p) = std::env::join_paths(dirs) {
            env.insert("PATH".into(), p);
        }
    }
}

/// Finds an executable `name` on `env`'s PATH.
pub fn which(env: &Env, name: &str) -> Option<PathBuf> {
    let path = env.get(OsStr::new("PATH"))?;
    std::env::split_paths(path)
        .filter(|d| !d.as_os_str().is_empty())
        .map(|d| d.join(name))
        .find(|p| fs::metadata(p).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0))
}

/// What `python3` on PATH is.
#[derive(Debug, Clone)]
struct PythonId {
    /// `sys.executable`: the real interpreter (not a pyenv shim).
    exe: PathBuf,
    version: String,
}

/// The cache under one `cache_dir`.
#[derive(Debug, Clone)]
pub struct EnvCache {
    dir: PathBuf,
}

/// Feeds length-prefixed fields to a hasher, so no two field lists collide.
struct KeyHasher(blake3::Hasher);

impl KeyHasher {
    fn new(kind: &str) -> Self {
        let mut h = KeyHasher(blake3::Hasher::new());
        h.field(b"bridge-envcache-v1");
        h.field(kind.as_bytes());
        h
    }
    fn field(&mut self, b: &[u8]) {
        self.0.update(&(b.len() as u64).to_le_bytes());
        self.0.update(b);
    }
    fn file(&mut self, path: &Path) -> Result<(), EnvError> {
        let bytes = fs::read(path).map_err(io_err("cannot read", path))?;
        self.field(&bytes);
        Ok(())
    }
    fn finish(self) -> String {
        self.0.finalize().to_hex().to_string()
    }
}

/// What a version-manager shim (pyenv, asdf) decides by: the environment
/// (minus what differs per job) and the version files that apply to `cwd`.
/// Variables that differ from job to job and that no version manager reads:
/// bridge's own, the devices a job is given, MLflow's (its run context names
/// the job), the shell's directory. One of them in the key made every job ask
/// the shim again (~0.2 s a job through pyenv, issue 25).
fn per_job(name: &str) -> bool {
    name.starts_with("BRIDGE_")
        || name.starts_with("MLFLOW_")
        || name.ends_with("_VISIBLE_DEVICES")
        || matches!(name, "PWD" | "OLDPWD" | "SHLVL" | "_")
}

fn shim_inputs(h: &mut KeyHasher, env: &Env, cwd: &Path) {
    for (k, v) in env {
        let name = k.to_string_lossy();
        if per_job(&name) {
            continue;
        }
        h.field(k.as_bytes());
        h.field(v.as_bytes());
    }
    // The version files that apply to `cwd` count by their level above it,
    // not their path: a job's directory (its snapshot) is new for every job.
    let mut files: Vec<(String, PathBuf)> = cwd
        .ancestors()
        .enumerate()
        .flat_map(|(up, d)| {
            [".python-version", ".tool-versions"].map(|n| (format!("{up}:{n}"), d.join(n)))
        })
        .collect();
    let home = env.get(std::ffi::OsStr::new("HOME")).map(PathBuf::from);
    let pyenv_root = env
        .get(std::ffi::OsStr::new("PYENV_ROOT"))
        .map(PathBuf::from)
        .or_else(|| home.as_ref().map(|h| h.join(".pyenv")));
    for f in [
        pyenv_root.map(|r| r.join("version")),
        home.map(|h| h.join(".tool-versions")),
    ]
    .into_iter()
    .flatten()
    {
        files.push((f.display().to_string(), f));
    }
    for (label, f) in files {
        if let Ok(bytes) = fs::read(&f) {
            h.field(label.as_bytes());
            h.field(&bytes);
        }
    }
}

fn short(key: &str) -> &str {
    &key[..16]
}

fn file_name(p: &Path) -> String {
    p.file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| p.display().to_string())
}

impl EnvCache {
    pub fn new(cache_dir: &Path) -> EnvCache {
        EnvCache {
            dir: cache_dir.to_path_buf(),
        }
    }

    /// Makes sure the Python env `spec` asks for exists, building it (through
    /// `runner`) unless cached. `env` is the job's environment, `cwd` where
    /// `python3` is asked for its version (pyenv picks by directory).
    pub fn ensure_python(
        &self,
        spec: &PythonSpec,
        env: &Env,
        cwd: &Path,
        runner: &mut dyn StepRunner,
    ) -> Result<PythonEnv, EnvError> {
        let r = self.ensure_python_inner(spec, env, cwd, runner);
        if let Err(e) = &r
            && !matches!(e, EnvError::Cancelled)
        {
            runner.note(&e.log_line());
        }
        r
    }

    fn ensure_python_inner(
        &self,
        spec: &PythonSpec,
        env: &Env,
        cwd: &Path,
        runner: &mut dyn StepRunner,
    ) -> Result<PythonEnv, EnvError> {
        let plan = self.plan_python(spec, env, cwd)?;
        let envs = self.dir.join("envs");
        let dir = envs.join(short(&plan.key));
        let what = format!("{}, key {}", file_name(&spec.file), short(&plan.key));
        let done = |built| PythonEnv {
            dir: dir.clone(),
            key: plan.key.clone(),
            conda: spec.kind == PythonKind::Conda,
            built,
        };
        // The hit path: one stat, no lock, no process.
        if dir.join(COMPLETE_MARKER).exists() {
            runner.note(&format!("python env cached ({what})"));
            return Ok(done(false));
        }
        fs::create_dir_all(&envs).map_err(io_err("cannot create", &envs))?;
        let lock_path = envs.join(format!("{}.lock", short(&plan.key)));
        let _lock = lock(&lock_path, runner, "python env")?;
        if dir.join(COMPLETE_MARKER).exists() {
            runner.note(&format!("python env cached ({what})"));
            return Ok(done(false));
        }
        if dir.exists() {
            // A build that crashed or was cancelled half-way.
            fs::remove_dir_all(&dir).map_err(io_err("cannot remove", &dir))?;
        }
        runner.note(&format!("building python env ({what})"));
        let t0 = Instant::now();
        let steps = plan.steps(&dir, env);
        for cmd in steps {
            let outcome = match step(runner, cmd) {
                Ok(o) => o,
                Err(e) => {
                    let _ = fs::remove_dir_all(&dir);
                    return Err(e);
                }
            };
            if !outcome.success() {
                let _ = fs::remove_dir_all(&dir);
                return Err(EnvError::BuildFailed(outcome));
            }
        }
        let marker = dir.join(COMPLETE_MARKER);
        fs::write(&marker, format!("{}\n", plan.key)).map_err(io_err("cannot write", &marker))?;
        runner.note(&format!(
            "python env built ({what}) in {:.1} s",
            t0.elapsed().as_secs_f64()
        ));
        Ok(done(true))
    }

    /// The key and the build commands for `spec`.
    fn plan_python(&self, spec: &PythonSpec, env: &Env, cwd: &Path) -> Result<PyPlan, EnvError> {
        let file = spec.file.clone();
        let uv = which(env, "uv");
        match spec.kind {
            PythonKind::Requirements => {
                let py = self.python_id(env, cwd)?;
                let bytes = fs::read(&file).map_err(io_err("cannot read", &file))?;
                let mut h = KeyHasher::new("requirements");
                h.field(&bytes);
                h.field(py.exe.as_os_str().as_bytes());
                h.field(py.version.as_bytes());
                Ok(PyPlan {
                    key: h.finish(),
                    how: PyBuild::Requirements {
                        py,
                        uv,
                        file,
                        empty: requirements_empty(&String::from_utf8_lossy(&bytes)),
                    },
                })
            }
            PythonKind::Pyproject => {
                let project = file.parent().unwrap_or(Path::new("/")).to_path_buf();
                let lock = project.join("uv.lock");
                if let (Some(uv), true) = (uv, lock.is_file()) {
                    // uv picks the interpreter itself (requires-python,
                    // .python-version), as it does on the user's machine.
                    let mut h = KeyHasher::new("pyproject-uv");
                    h.file(&file)?;
                    h.file(&lock)?;
                    let pv = project.join(".python-version");
                    if pv.is_file() {
                        h.file(&pv)?;
                    }
                    return Ok(PyPlan {
                        key: h.finish(),
                        how: PyBuild::UvSync { uv, project },
                    });
                }
                let py = self.python_id(env, cwd)?;
                let mut h = KeyHasher::new("pyproject");
                h.file(&file)?;
                h.field(py.exe.as_os_str().as_bytes());
                h.field(py.version.as_bytes());
                Ok(PyPlan {
                    key: h.finish(),
                    how: PyBuild::Pyproject { py, file },
                })
            }
            PythonKind::Conda => {
                let tool = ["conda", "mamba", "micromamba"]
                    .iter()
                    .find_map(|t| which(env, t))
                    .ok_or(EnvError::NoConda)?;
                let mut h = KeyHasher::new("conda");
                h.file(&file)?;
                h.field(tool.as_os_str().as_bytes());
                Ok(PyPlan {
                    key: h.finish(),
                    how: PyBuild::Conda { tool, file },
                })
            }
        }
    }

    /// Resolves `python3` on PATH to its interpreter and version, cached by
    /// the binary's identity (path, inode, size, mtime). A script (a pyenv or
    /// asdf shim) picks the interpreter at run time from the environment and
    /// version files, so its answer is cached by those as well (every
    /// variable but the per-job `BRIDGE_*`/`*_VISIBLE_DEVICES` ones, and the
    /// `.python-version`/`.tool-versions` files that apply to `cwd`, plus
    /// pyenv's global `version` file): asking the shim costs ~0.2 s a job.
    fn python_id(&self, env: &Env, cwd: &Path) -> Result<PythonId, EnvError> {
        let python3 = which(env, "python3").ok_or(EnvError::NoPython)?;
        let real = fs::canonicalize(&python3).map_err(io_err("cannot resolve", &python3))?;
        let meta = fs::metadata(&real).map_err(io_err("cannot stat", &real))?;
        let mut magic = [0u8; 2];
        let is_script = File::open(&real)
            .and_then(|mut f| f.read_exact(&mut magic))
            .is_ok()
            && &magic == b"#!";
        let cache_file = {
            let mut h = KeyHasher::new("python-id");
            h.field(real.as_os_str().as_bytes());
            for n in [meta.ino(), meta.size()] {
                h.field(&n.to_le_bytes());
            }
            h.field(&meta.mtime().to_le_bytes());
            h.field(&meta.mtime_nsec().to_le_bytes());
            if is_script {
                shim_inputs(&mut h, env, cwd);
            }
            Some(self.dir.join("python").join(&h.finish()[..16]))
        };
        if let Some(cf) = &cache_file
            && let Ok(text) = fs::read_to_string(cf)
            && let Some((exe, version)) = text.trim_end().split_once('\n')
        {
            return Ok(PythonId {
                exe: exe.into(),
                version: version.into(),
            });
        }
        let probe = |detail: String| EnvError::PythonProbe {
            program: python3.clone(),
            detail,
        };
        let out = Command::new(&python3)
            .args([
                "-c",
                "import sys; print(sys.executable); print(sys.version.split()[0])",
            ])
            .current_dir(cwd)
            .env_clear()
            .envs(env)
            .stdin(Stdio::null())
            .output()
            .map_err(|e| probe(e.to_string()))?;
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        let Some((exe, version)) = text
            .trim_end()
            .split_once('\n')
            .filter(|_| out.status.success())
        else {
            return Err(probe(format!(
                "{}: {}",
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            )));
        };
        if let Some(cf) = &cache_file {
            // Best effort: a failed write only costs the next job a probe.
            let _ = write_atomic(cf, format!("{exe}\n{version}\n").as_bytes(), false);
        }
        Ok(PythonId {
            exe: exe.into(),
            version: version.into(),
        })
    }

    /// The setup's cache key: its command, every input file (relative path and
    /// bytes, in path order) and the Python env it runs in.
    pub fn setup_key(
        &self,
        spec: &SetupSpec,
        tree: &Path,
        python_key: Option<&str>,
    ) -> Result<String, EnvError> {
        let mut files: Vec<(PathBuf, PathBuf)> = Vec::new();
        for input in &spec.inputs {
            let meta = fs::symlink_metadata(input).map_err(|e| {
                if e.kind() == io::ErrorKind::NotFound {
                    EnvError::MissingInput(input.strip_prefix(tree).unwrap_or(input).to_path_buf())
                } else {
                    io_err("cannot read setup input", input)(e)
                }
            })?;
            collect_inputs(input, meta, tree, &mut files)?;
        }
        files.sort();
        files.dedup();
        let mut h = KeyHasher::new("setup");
        h.field(spec.command.as_bytes());
        for (rel, abs) in &files {
            h.field(rel.as_os_str().as_bytes());
            let meta = fs::symlink_metadata(abs).map_err(io_err("cannot read", abs))?;
            if meta.file_type().is_symlink() {
                let target = fs::read_link(abs).map_err(io_err("cannot read", abs))?;
                h.field(b"symlink");
                h.field(target.as_os_str().as_bytes());
            } else {
                let mut f = File::open(abs).map_err(io_err("cannot read", abs))?;
                h.field(b"file");
                let mut data = blake3::Hasher::new();
                io::copy(&mut f, &mut data).map_err(io_err("cannot read", abs))?;
                h.field(data.finalize().as_bytes());
            }
        }
        h.field(python_key.unwrap_or("no python env").as_bytes());
        Ok(h.finish())
    }

    /// Runs the setup command unless one with the same key already succeeded.
    /// `env` is the job's environment with the Python env already activated.
    pub fn ensure_setup(
        &self,
        spec: &SetupSpec,
        tree: &Path,
        cwd: &Path,
        env: &Env,
        python: Option<&PythonEnv>,
        runner: &mut dyn StepRunner,
    ) -> Result<(), EnvError> {
        let r = self.ensure_setup_inner(spec, tree, cwd, env, python, runner);
        if let Err(e) = &r
            && !matches!(e, EnvError::Cancelled)
        {
            runner.note(&e.log_line());
        }
        r
    }

    fn ensure_setup_inner(
        &self,
        spec: &SetupSpec,
        tree: &Path,
        cwd: &Path,
        env: &Env,
        python: Option<&PythonEnv>,
        runner: &mut dyn StepRunner,
    ) -> Result<(), EnvError> {
        let key = self.setup_key(spec, tree, python.map(|p| p.key.as_str()))?;
        let dir = self.dir.join("setup");
        let marker = dir.join(format!("{}.done", short(&key)));
        if marker.exists() {
            runner.note(&format!("setup cached (key {})", short(&key)));
            return Ok(());
        }
        fs::create_dir_all(&dir).map_err(io_err("cannot create", &dir))?;
        let _lock = lock(&dir.join(format!("{}.lock", short(&key))), runner, "setup")?;
        if marker.exists() {
            runner.note(&format!("setup cached (key {})", short(&key)));
            return Ok(());
        }
        runner.note(&format!(
            "running setup (key {}): {}",
            short(&key),
            spec.command
        ));
        let t0 = Instant::now();
        let mut cmd = Command::new("/bin/sh");
        cmd.arg("-c")
            .arg(&spec.command)
            .current_dir(cwd)
            .env_clear()
            .envs(env);
        let outcome = step(runner, cmd)?;
        if !outcome.success() {
            return Err(EnvError::SetupFailed(outcome));
        }
        fs::write(&marker, format!("{key}\n")).map_err(io_err("cannot write", &marker))?;
        runner.note(&format!(
            "setup done in {:.1} s",
            t0.elapsed().as_secs_f64()
        ));
        Ok(())
    }
}

/// Adds `path` (a file, a symlink, or every such entry under a directory) to
/// `out` as (path relative to the tree, absolute path).
fn collect_inputs(
    path: &Path,
    meta: fs::Metadata,
    tree: &Path,
    out: &mut Vec<(PathBuf, PathBuf)>,
) -> Result<(), EnvError> {
    if meta.is_dir() {
        for e in fs::read_dir(path).map_err(io_err("cannot read setup input", path))? {
            let e = e.map_err(io_err("cannot read setup input", path))?;
            let p = e.path();
            let m = fs::symlink_metadata(&p).map_err(io_err("cannot read setup input", &p))?;
            collect_inputs(&p, m, tree, out)?;
        }
    } else if meta.is_file() || meta.file_type().is_symlink() {
        // Inputs outside the tree keep their absolute path as their name.
        let rel = path.strip_prefix(tree).unwrap_or(path).to_path_buf();
        out.push((rel, path.to_path_buf()));
    }
    Ok(())
}

/// Whether a requirements file names nothing to install (pip would start,
/// print nothing and exit: a second of startup saved).
fn requirements_empty(text: &str) -> bool {
    text.lines().all(|l| {
        let l = l.trim();
        l.is_empty() || l.starts_with('#')
    })
}

/// How to build one Python env.
struct PyPlan {
    key: String,
    how: PyBuild,
}

enum PyBuild {
    Requirements {
        py: PythonId,
        uv: Option<PathBuf>,
        file: PathBuf,
        empty: bool,
    },
    UvSync {
        uv: PathBuf,
        project: PathBuf,
    },
    Pyproject {
        py: PythonId,
        file: PathBuf,
    },
    Conda {
        tool: PathBuf,
        file: PathBuf,
    },
}

/// Installs `[project] dependencies` of a pyproject.toml (argv[1]) with pip.
const PYPROJECT_INSTALL: &str = r#"
import subprocess, sys
try:
    import tomllib
except ImportError:
    sys.exit("bridge: reading pyproject.toml needs Python 3.11+ (tomllib), or uv with a uv.lock")
with open(sys.argv[1], "rb") as f:
    deps = tomllib.load(f).get("project", {}).get("dependencies", [])
if deps:
    sys.exit(subprocess.call([sys.executable, "-m", "pip", "install",
                              "--disable-pip-version-check", *deps]))
"#;

impl PyPlan {
    /// The build's commands, in order, each ready for the runner.
    fn steps(&self, dir: &Path, env: &Env) -> Vec<Command> {
        let dir_python = dir.join("bin").join("python");
        let base = |program: &Path, cwd: &Path| {
            let mut c = Command::new(program);
            c.current_dir(cwd)
                .env_clear()
                .envs(env)
                .env("PIP_NO_INPUT", "1");
            c
        };
        let parent = |f: &Path| f.parent().unwrap_or(Path::new("/")).to_path_buf();
        match &self.how {
            PyBuild::Requirements {
                py,
                uv,
                file,
                empty,
            } => {
                let cwd = parent(file);
                let mut steps = Vec::new();
                let mut venv;
                if let Some(uv) = uv {
                    venv = base(uv, &cwd);
                    venv.arg("venv").arg("--python").arg(&py.exe).arg(dir);
                } else {
                    venv = base(&py.exe, &cwd);
                    venv.args(["-m", "venv"]).arg(dir);
                }
                steps.push(venv);
                if !empty {
                    let mut install;
                    if let Some(uv) = uv {
                        install = base(uv, &cwd);
                        install
                            .args(["pip", "install", "--python"])
                            .arg(&dir_python);
                    } else {
                        install = base(&dir_python, &cwd);
                        install.args(["-m", "pip", "install", "--disable-pip-version-check"]);
                    }
                    install.arg("-r").arg(file);
                    steps.push(install);
                }
                steps
            }
            PyBuild::UvSync { uv, project } => {
                let mut c = base(uv, project);
                // The project's own packages come from the job's snapshot
                // (the env is shared by jobs with different snapshots).
                c.args(["sync", "--frozen", "--no-install-workspace"])
                    .env("UV_PROJECT_ENVIRONMENT", dir);
                vec![c]
            }
            PyBuild::Pyproject { py, file } => {
                let cwd = parent(file);
                let mut venv = base(&py.exe, &cwd);
                venv.args(["-m", "venv"]).arg(dir);
                let mut install = base(&dir_python, &cwd);
                install.arg("-c").arg(PYPROJECT_INSTALL).arg(file);
                vec![venv, install]
            }
            PyBuild::Conda { tool, file } => {
                let mut c = base(tool, &parent(file));
                let micromamba = tool.file_name() == Some(OsStr::new("micromamba"));
                if micromamba {
                    c.arg("create");
                } else {
                    c.args(["env", "create"]);
                }
                // stdin is /dev/null: never wait for a confirmation.
                c.arg("-p")
                    .arg(dir)
                    .arg("-f")
                    .arg(file)
                    .env("CONDA_ALWAYS_YES", "true")
                    .env("MAMBA_ALWAYS_YES", "true");
                if micromamba {
                    c.arg("-y");
                }
                vec![c]
            }
        }
    }
}

/// Runs one step unless the job was cancelled.
fn step(runner: &mut dyn StepRunner, cmd: Command) -> Result<Outcome, EnvError> {
    if runner.cancelled() {
        return Err(EnvError::Cancelled);
    }
    let program = PathBuf::from(cmd.get_program());
    runner.run(cmd).map_err(|source| EnvError::Io {
        what: "cannot run",
        path: program,
        source,
    })
}

/// Takes the exclusive lock at `path`, polling so that a job waiting for
/// another job's build can still be cancelled.
pub(crate) fn lock(
    path: &Path,
    runner: &mut dyn StepRunner,
    what: &str,
) -> Result<Flock<File>, EnvError> {
    let mut file = fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(path)
        .map_err(io_err("cannot open lock", path))?;
    let mut said = false;
    loop {
        match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
            Ok(l) => return Ok(l),
            Err((f, Errno::EWOULDBLOCK)) => {
                file = f;
                if !said {
                    runner.note(&format!("waiting for another job's {what}"));
                    said = true;
                }
                if runner.cancelled() {
                    return Err(EnvError::Cancelled);
                }
                std::thread::sleep(LOCK_POLL);
            }
            Err((_, e)) => {
                return Err(EnvError::Io {
                    what: "cannot lock",
                    path: path.to_path_buf(),
                    source: e.into(),
                });
            }
        }
    }
}

/// Writes `path` via a temporary file (named per process, so concurrent
/// shims never share one) and a rename: readers see all or nothing. `durable`
/// also syncs the data before the rename, for records that must survive a
/// crash of the machine (`exit.json`).
pub(crate) fn write_atomic(path: &Path, data: &[u8], durable: bool) -> io::Result<()> {
    use std::io::Write;
    let dir = path.parent().unwrap_or(Path::new("."));
    fs::create_dir_all(dir)?;
    let tmp = dir.join(format!(".{}.{}.tmp", file_name(path), std::process::id()));
    let written = (|| {
        let mut f = File::create(&tmp)?;
        f.write_all(data)?;
        if durable {
            f.sync_data()?;
        }
        drop(f);
        fs::rename(&tmp, path)
    })();
    if written.is_err() {
        // A full disk leaves no temporary behind.
        let _ = fs::remove_file(&tmp);
    }
    written
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};

    /// Runs steps as plain child processes and records notes.
    #[derive(Default, Clone)]
    struct TestRunner {
        notes: Arc<Mutex<Vec<String>>>,
    }

    impl StepRunner for TestRunner {
        fn run(&mut self, mut cmd: Command) -> io::Result<Outcome> {
            use std::os::unix::process::ExitStatusExt;
            let st = cmd.stdin(Stdio::null()).stdout(Stdio::null()).status()?;
            Ok(match st.code() {
                Some(c) => Outcome::Exited(c),
                None => Outcome::Signaled(st.signal().unwrap_or(0)),
            })
        }
        fn note(&mut self, line: &str) {
            self.notes.lock().unwrap().push(line.to_string());
        }
        fn cancelled(&self) -> bool {
            false
        }
    }

    fn job_env() -> Env {
        std::env::vars_os().collect()
    }

    fn setup_spec(tree: &Path, counter: &Path, exit: i32) -> SetupSpec {
        SetupSpec {
            command: format!("echo run >> {}; sleep 0.2; exit {exit}", counter.display()),
            inputs: vec![tree.join("setup.sh"), tree.join("data")],
        }
    }

    fn runs(counter: &Path) -> usize {
        fs::read_to_string(counter).map_or(0, |s| s.lines().count())
    }

    #[test]
    fn setup_runs_once_per_key_and_failures_are_not_cached() {
        let tmp = tempfile::tempdir().unwrap();
        let tree = tmp.path().join("tree");
        fs::create_dir_all(tree.join("data/sub")).unwrap();
        fs::write(tree.join("setup.sh"), "x").unwrap();
        fs::write(tree.join("data/sub/a"), "a").unwrap();
        let counter = tmp.path().join("counter");
        let cache = EnvCache::new(&tmp.path().join("cache"));
        let spec = setup_spec(&tree, &counter, 0);
        let env = job_env();

        // Two jobs at once with the same key: one runs, the other waits.
        let threads: Vec<_> = (0..2)
            .map(|_| {
                let (cache, spec, tree, env) =
                    (cache.clone(), spec.clone(), tree.clone(), env.clone());
                std::thread::spawn(move || {
                    let mut r = TestRunner::default();
                    cache
                        .ensure_setup(&spec, &tree, &tree, &env, None, &mut r)
                        .unwrap();
                    r.notes.lock().unwrap().clone()
                })
            })
            .collect();
        let notes: Vec<Vec<String>> = threads.into_iter().map(|t| t.join().unwrap()).collect();
        assert_eq!(runs(&counter), 1, "{notes:?}");
        assert!(
            notes
                .iter()
                .any(|n| n.iter().any(|l| l.starts_with("setup cached")))
        );

        let mut r = TestRunner::default();
        cache
            .ensure_setup(&spec, &tree, &tree, &env, None, &mut r)
            .unwrap();
        assert_eq!(runs(&counter), 1);

        // A changed input (deep in a directory) is a new key.
        fs::write(tree.join("data/sub/a"), "b").unwrap();
        cache
            .ensure_setup(&spec, &tree, &tree, &env, None, &mut r)
            .unwrap();
        assert_eq!(runs(&counter), 2);
        // So is another python env.
        let k1 = cache.setup_key(&spec, &tree, None).unwrap();
        let k2 = cache.setup_key(&spec, &tree, Some("abc")).unwrap();
        assert_ne!(k1, k2);

        // Failing setups run every time.
        let bad = setup_spec(&tree, &counter, 3);
        for n in [3, 4] {
            let e = cache
                .ensure_setup(&bad, &tree, &tree, &env, None, &mut r)
                .unwrap_err();
            assert!(matches!(e, EnvError::SetupFailed(Outcome::Exited(3))));
            assert_eq!(e.to_string(), "setup failed (exit 3)");
            assert_eq!(runs(&counter), n);
        }
        assert!(
            r.notes
                .lock()
                .unwrap()
                .contains(&"setup failed with exit code 3".to_string())
        );

        // A missing input is a setup failure that names it.
        fs::remove_file(tree.join("setup.sh")).unwrap();
        let e = cache
            .ensure_setup(&spec, &tree, &tree, &env, None, &mut r)
            .unwrap_err();
        assert_eq!(e.to_string(), "setup input setup.sh does not exist");
    }

    #[test]
    fn requirements_env_builds_once_then_is_reused() {
        let tmp = tempfile::tempdir().unwrap();
        let tree = tmp.path().join("tree");
        fs::create_dir_all(&tree).unwrap();
        let req = tree.join("requirements.txt");
        fs::write(&req, "# nothing yet\n").unwrap();
        let cache = EnvCache::new(&tmp.path().join("cache"));
        let spec = PythonSpec {
            kind: PythonKind::Requirements,
            file: req.clone(),
        };
        // The real interpreter first on PATH (not a pyenv shim, which is
        // asked every time): its identity is cached and a hit starts nothing.
        let mut env = job_env();
        let out = Command::new("python3")
            .args(["-c", "import sys; print(sys.executable)"])
            .output()
            .unwrap();
        let exe = PathBuf::from(String::from_utf8(out.stdout).unwrap().trim());
        let mut path = vec![exe.parent().unwrap().to_path_buf()];
        path.extend(std::env::split_paths(&env[OsStr::new("PATH")]));
        env.insert("PATH".into(), std::env::join_paths(path).unwrap());
        let mut r = TestRunner::default();
        let built = cache.ensure_python(&spec, &env, &tree, &mut r).unwrap();
        assert_eq!(
            fs::read_dir(tmp.path().join("cache/python"))
                .unwrap()
                .count(),
            1
        );
        assert!(built.built);
        assert!(built.dir.join("bin/python").exists());
        assert!(built.dir.join(COMPLETE_MARKER).exists());

        let t0 = Instant::now();
        let again = cache.ensure_python(&spec, &env, &tree, &mut r).unwrap();
        let hit = t0.elapsed();
        assert!(!again.built);
        assert_eq!(again.dir, built.dir);
        let notes = r.notes.lock().unwrap().clone();
        assert!(notes[0].starts_with("building python env (requirements.txt, key "));
        assert!(notes.last().unwrap().starts_with("python env cached"));
        eprintln!("cache hit took {hit:?}");

        let mut activated = env.clone();
        again.activate(&mut activated);
        assert_eq!(
            activated[OsStr::new("VIRTUAL_ENV")],
            built.dir.clone().into_os_string()
        );
        assert_eq!(
            which(&activated, "python"),
            Some(built.dir.join("bin/python"))
        );

        // Editing the file changes the key (checked without another build).
        fs::write(&req, "# still nothing\n").unwrap();
        let other = cache.plan_python(&spec, &env, &tree).unwrap();
        assert_ne!(other.key, built.key);
    }

    #[test]
    fn conda_without_a_tool_is_a_clear_failure() {
        let tmp = tempfile::tempdir().unwrap();
        let file = tmp.path().join("environment.yml");
        fs::write(&file, "name: x\n").unwrap();
        let cache = EnvCache::new(tmp.path());
        let mut env = job_env();
        env.insert("PATH".into(), "/nonexistent".into());
        let spec = PythonSpec {
            kind: PythonKind::Conda,
            file,
        };
        let mut r = TestRunner::default();
        let e = cache
            .ensure_python(&spec, &env, tmp.path(), &mut r)
            .unwrap_err();
        assert_eq!(
            e.to_string(),
            "environment.yml needs conda, mamba or micromamba on the agent's PATH"
        );
    }

    #[test]
    fn empty_requirements_detection() {
        assert!(requirements_empty(""));
        assert!(requirements_empty("  \n# c\n"));
        assert!(!requirements_empty("numpy\n"));
        assert!(!requirements_empty("-r other.txt\n"));
    }

    /// A shim on PATH (a script, like pyenv's) is asked once for every
    /// job's directory and per-job variable, and again once a version file
    /// that applies changes.
    #[test]
    fn a_python_shim_is_asked_once_across_jobs() {
        use std::os::unix::fs::PermissionsExt;
        let tmp = tempfile::tempdir().unwrap();
        // The interpreter itself (not a pyenv shim, which would find this
        // one again on PATH).
        let real = Command::new("python3")
            .args(["-c", "import sys; print(sys.executable)"])
            .output()
            .unwrap();
        let real = String::from_utf8(real.stdout).unwrap();
        let bin = tmp.path().join("bin");
        fs::create_dir(&bin).unwrap();
        let asked = tmp.path().join("asked");
        let shim = bin.join("python3");
        fs::write(
            &shim,
            format!(
                "#!/bin/sh\necho >> {}\nexec {} \"$@\"\n",
                asked.display(),
                real.trim()
            ),
        )
        .unwrap();
        fs::set_permissions(&shim, fs::Permissions::from_mode(0o755)).unwrap();
        let cache = EnvCache::new(&tmp.path().join("cache"));
        let mut env = job_env();
        let path = std::env::var_os("PATH").unwrap_or_default();
        let mut p = bin.as_os_str().to_os_string();
        p.push(":");
        p.push(path);
        env.insert("PATH".into(), p);
        for job in 1..=3 {
            let cwd = tmp.path().join(format!("jobs/{job}/tree"));
            fs::create_dir_all(&cwd).unwrap();
            env.insert("BRIDGE_JOB_ID".into(), job.to_string().into());
            env.insert(
                "MLFLOW_RUN_CONTEXT".into(),
                format!("{{\"bridge.job_id\":\"{job}\"}}").into(),
            );
            env.insert("PWD".into(), cwd.clone().into());
            let id = cache.python_id(&env, &cwd).unwrap();
            assert!(id.version.starts_with('3'), "{}", id.version);
        }
        assert_eq!(runs(&asked), 1, "asked once for three jobs");
        let cwd = tmp.path().join("jobs/4/tree");
        fs::create_dir_all(&cwd).unwrap();
        fs::write(cwd.join(".python-version"), "system\n").unwrap();
        let _ = cache.python_id(&env, &cwd);
        assert_eq!(runs(&asked), 2, "a version file of its own: asked again");
    }
}

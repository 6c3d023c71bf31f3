//! `bridge kernel`: a Jupyter kernel that runs on the agent, in the live
//! mirror, for any front end that reads kernelspecs (JupyterLab, Notebook,
//! VS Code, PyCharm, nbclient/papermill).
//!
//! - `bridge kernel install [--name N] [--display-name T] [--gpus N]
//!   [--env FILE.toml] [--user | --sys-prefix | --prefix P]` writes the
//!   kernelspec; `bridge kernel list [--json]`; `bridge kernel uninstall N`.
//! - `bridge kernel --connection-file F` is what the kernelspec runs: it
//!   brings the repository's daemon and agent up (the saved provider), and
//!   the daemon relays the five channels of `F` to the remote kernel (see
//!   the daemon's `kernel` module). SIGINT interrupts the running cell;
//!   SIGTERM, or the process dying, stops the remote kernel.
//!
//! The kernelspec's argv runs this `bridge` by absolute path through a
//! one-line `/bin/sh` guard, so that a binary that moved fails with a line
//! saying to run `bridge kernel install` again instead of a bare "file not
//! found".

use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{Context, anyhow, bail};
use bridge_proto::v1::{self, KernelUp};
use tokio::signal::unix::{SignalKind, signal};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;

use crate::{client, jobs, spec};

#[derive(clap::Args)]
#[command(args_conflicts_with_subcommands = true)]
pub struct Args {
    #[command(subcommand)]
    cmd: Option<Sub>,
    #[command(flatten)]
    serve: ServeArgs,
}

#[derive(clap::Subcommand)]
enum Sub {
    /// Write a kernelspec that runs this repository's kernel on the agent.
    Install(InstallArgs),
    /// The bridge kernelspecs installed, and whether each still works.
    List(ListArgs),
    /// Remove a bridge kernelspec.
    Uninstall(UninstallArgs),
}

#[derive(clap::Args)]
struct ServeArgs {
    /// The connection file the front end wrote (`{connection_file}`).
    #[arg(long, value_name = "FILE")]
    connection_file: Option<PathBuf>,
    /// The repository (default: the one holding the current directory).
    #[arg(long, value_name = "DIR")]
    repo: Option<PathBuf>,
    #[command(flatten)]
    kernel: KernelArgs,
}

/// What a kernel asks for, shared by `install` and the kernel itself.
#[derive(clap::Args, Clone, Default)]
struct KernelArgs {
    /// A job file (train.toml) whose Python environment, [env], setup and
    /// GPUs the kernel uses; relative to the repository root.
    #[arg(long, value_name = "FILE.toml")]
    env: Option<PathBuf>,
    /// GPUs the kernel holds for its whole life (default: the job file's).
    #[arg(long, value_name = "N")]
    gpus: Option<u32>,
    /// How long the agent keeps a kernel whose `bridge kernel` is out of
    /// reach (a laptop asleep) before it stops it, in seconds.
    #[arg(long, value_name = "SECONDS", default_value_t = 600)]
    orphan_grace: u32,
}

#[derive(clap::Args)]
struct InstallArgs {
    /// The kernelspec's name (default: `bridge-<repository>`).
    #[arg(long)]
    name: Option<String>,
    /// What front ends show (default: `Python (bridge: <repository>)`).
    #[arg(long)]
    display_name: Option<String>,
    #[command(flatten)]
    kernel: KernelArgs,
    #[command(flatten)]
    place: Place,
}

/// Where kernelspecs go, like ipykernel's own installer.
#[derive(clap::Args, Default)]
struct Place {
    /// Under PREFIX/share/jupyter/kernels (a venv or conda env's prefix).
    #[arg(long, value_name = "PREFIX", conflicts_with_all = ["sys_prefix", "user"])]
    prefix: Option<PathBuf>,
    /// Under the active Python environment ($VIRTUAL_ENV, $CONDA_PREFIX,
    /// else python3's sys.prefix).
    #[arg(long, conflicts_with = "user")]
    sys_prefix: bool,
    /// In the user's Jupyter data directory (the default).
    #[arg(long)]
    user: bool,
}

#[derive(clap::Args)]
struct ListArgs {
    /// One JSON object: {"schema_version": 1, "kernels": [...]}.
    #[arg(long)]
    json: bool,
}

#[derive(clap::Args)]
struct UninstallArgs {
    name: String,
    #[command(flatten)]
    place: Place,
}

pub async fn run(cwd: &Path, args: Args) -> anyhow::Result<u8> {
    match args.cmd {
        Some(Sub::Install(a)) => install(cwd, a).map(|()| 0),
        Some(Sub::List(a)) => list(a).map(|()| 0),
        Some(Sub::Uninstall(a)) => uninstall(a).map(|()| 0),
        None => match args.serve.connection_file.clone() {
            Some(f) => serve(cwd, args.serve, &f).await,
            None => bail!(
                "give a subcommand (install, list, uninstall), or --connection-file FILE \
                 (what a front end runs through the kernelspec)"
            ),
        },
    }
}

// ---- kernelspecs --------------------------------------------------------

/// The user's Jupyter data directory, as `jupyter --data-dir` prints it.
fn user_data_dir() -> anyhow::Result<PathBuf> {
    if let Some(d) = std::env::var_os("JUPYTER_DATA_DIR").filter(|d| !d.is_empty()) {
        return Ok(PathBuf::from(d));
    }
    let home = std::env::var_os("HOME")
        .filter(|h| !h.is_empty())
        .map(PathBuf::from)
        .ok_or_else(|| anyhow!("HOME is not set: give --prefix"))?;
    if cfg!(target_os = "macos") {
        return Ok(home.join("Library/Jupyter"));
    }
    Ok(std::env::var_os("XDG_DATA_HOME")
        .filter(|d| !d.is_empty())
        .map(PathBuf::from)
        .unwrap_or_else(|| home.join(".local/share"))
        .join("jupyter"))
}

/// The active Python environment's prefix.
fn sys_prefix() -> anyhow::Result<PathBuf> {
    for var in ["VIRTUAL_ENV", "CONDA_PREFIX"] {
        if let Some(p) = std::env::var_os(var).filter(|p| !p.is_empty()) {
            return Ok(PathBuf::from(p));
        }
    }
    let out = std::process::Command::new("python3")
        .args(["-c", "import sys; print(sys.prefix)"])
        .output()
        .context("--sys-prefix: no $VIRTUAL_ENV or $CONDA_PREFIX, and python3 does not run")?;
    let p = String::from_utf8_lossy(&out.stdout).trim().to_string();
    if !out.status.success() || p.is_empty() {
        bail!("--sys-prefix: python3 did not print its sys.prefix");
    }
    Ok(PathBuf::from(p))
}

impl Place {
    /// The kernels directory chosen.
    fn kernels_dir(&self) -> anyhow::Result<PathBuf> {
        let data = match (&self.prefix, self.sys_prefix) {
            (Some(p), _) => p.join("share/jupyter"),
            (None, true) => sys_prefix()?.join("share/jupyter"),
            _ => user_data_dir()?,
        };
        Ok(data.join("kernels"))
    }
}

/// Every kernels directory Jupyter searches, in its order, that exists.
fn search_path() -> Vec<PathBuf> {
    let mut dirs: Vec<PathBuf> = Vec::new();
    if let Ok(d) = user_data_dir() {
        dirs.push(d);
    }
    if let Some(p) = std::env::var_os("JUPYTER_PATH") {
        dirs.extend(std::env::split_paths(&p).filter(|p| !p.as_os_str().is_empty()));
    }
    for var in ["VIRTUAL_ENV", "CONDA_PREFIX"] {
        if let Some(p) = std::env::var_os(var).filter(|p| !p.is_empty()) {
            dirs.push(PathBuf::from(p).join("share/jupyter"));
        }
    }
    dirs.push("/usr/local/share/jupyter".into());
    dirs.push("/usr/share/jupyter".into());
    let mut out: Vec<PathBuf> = Vec::new();
    for d in dirs {
        let k = d.join("kernels");
        if k.is_dir() && !out.contains(&k) {
            out.push(k);
        }
    }
    out
}

/// Kernelspec names Jupyter accepts.
fn valid_name(n: &str) -> bool {
    !n.is_empty()
        && n.len() <= 64
        && n.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b))
}

/// `bridge-<repository directory>`, made a valid kernelspec name.
fn default_name(repo: &Path) -> String {
    let base: String = repo
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default()
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '_' || c == '.' {
                c.to_ascii_lowercase()
            } else {
                '-'
            }
        })
        .take(48)
        .collect();
    if base.is_empty() {
        "bridge".into()
    } else {
        format!("bridge-{base}")
    }
}

fn sh_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', r"'\''"))
}

/// The kernelspec (kernel.json) for `bridge` at `exe` serving `repo`.
fn kernelspec(
    exe: &Path,
    repo: &Path,
    name: &str,
    display_name: &str,
    k: &KernelArgs,
) -> serde_json::Value {
    let exe_s = exe.to_string_lossy();
    let mut line = format!(
        "exec \"$b\" kernel --connection-file \"$1\" --repo {}",
        sh_quote(&repo.to_string_lossy())
    );
    if let Some(e) = &k.env {
        line.push_str(&format!(" --env {}", sh_quote(&e.to_string_lossy())));
    }
    if let Some(g) = k.gpus {
        line.push_str(&format!(" --gpus {g}"));
    }
    if k.orphan_grace != 600 {
        line.push_str(&format!(" --orphan-grace {}", k.orphan_grace));
    }
    let script = format!(
        "b={}; [ -x \"$b\" ] || {{ echo \"bridge kernel: $b is gone (moved or uninstalled); \
         run \\`bridge kernel install\\` again to point this kernel ({name}) at bridge\" >&2; exit 127; }}; {line}",
        sh_quote(&exe_s)
    );
    serde_json::json!({
        "argv": ["/bin/sh", "-c", script, "bridge-kernel", "{connection_file}"],
        "display_name": display_name,
        "language": "python",
        "interrupt_mode": "signal",
        "env": {},
        "metadata": {
            "debugger": true,
            "bridge": {
                "bridge": exe_s,
                "repo": repo.to_string_lossy(),
                "env": k.env.as_ref().map(|e| e.to_string_lossy().into_owned()),
                "gpus": k.gpus,
            },
        },
    })
}

fn install(cwd: &Path, a: InstallArgs) -> anyhow::Result<()> {
    let layout = client::repo(cwd)?;
    let repo = layout.repo.canonicalize().unwrap_or(layout.repo.clone());
    if let Some(e) = &a.kernel.env {
        // Checked now rather than when a front end starts the kernel.
        let path = repo.join(e);
        spec::load(&path, &repo, &[]).map_err(|e| anyhow!("{e}"))?;
    }
    let name = a.name.clone().unwrap_or_else(|| default_name(&repo));
    if !valid_name(&name) {
        bail!("{name:?} is not a kernelspec name: letters, digits, '.', '_' and '-', at most 64");
    }
    let repo_name = repo
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| repo.display().to_string());
    let display = a
        .display_name
        .clone()
        .unwrap_or_else(|| match a.kernel.gpus {
            Some(g) if g > 0 => format!("Python (bridge: {repo_name}, {g} GPU)"),
            _ => format!("Python (bridge: {repo_name})"),
        });
    let exe = std::env::current_exe()
        .and_then(|e| e.canonicalize())
        .context("cannot find this bridge binary's path")?;
    let spec = kernelspec(&exe, &repo, &name, &display, &a.kernel);
    let dir = a.place.kernels_dir()?.join(&name);
    std::fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let tmp = dir.join(".kernel.json.tmp");
    std::fs::write(&tmp, serde_json::to_vec_pretty(&spec)?)
        .with_context(|| format!("cannot write {}", tmp.display()))?;
    std::fs::rename(&tmp, dir.join("kernel.json"))
        .with_context(|| format!("cannot write {}", dir.join("kernel.json").display()))?;
    println!("{}", dir.display());
    crate::note!(
        "bridge: installed kernel {name} (\"{display}\") for {}; pick it in JupyterLab, VS Code or PyCharm, \
         or `jupyter console --kernel {name}`",
        repo.display()
    );
    Ok(())
}

#[derive(serde::Serialize)]
struct Installed {
    name: String,
    display_name: String,
    path: String,
    bridge: String,
    repo: String,
    env: Option<String>,
    gpus: Option<u32>,
    /// The bridge binary it runs exists.
    ok: bool,
}

fn installed() -> Vec<Installed> {
    let mut out = Vec::new();
    for dir in search_path() {
        let Ok(entries) = std::fs::read_dir(&dir) else {
            continue;
        };
        let mut entries: Vec<_> = entries.flatten().collect();
        entries.sort_by_key(|e| e.file_name());
        for e in entries {
            let file = e.path().join("kernel.json");
            let Some(v) = std::fs::read(&file)
                .ok()
                .and_then(|b| serde_json::from_slice::<serde_json::Value>(&b).ok())
            else {
                continue;
            };
            let b = &v["metadata"]["bridge"];
            if !b.is_object() {
                continue;
            }
            let bridge = b["bridge"].as_str().unwrap_or_default().to_string();
            let name = e.file_name().to_string_lossy().into_owned();
            if out.iter().any(|k: &Installed| k.name == name) {
                continue; // shadowed by an earlier directory, as Jupyter does
            }
            out.push(Installed {
                ok: Path::new(&bridge).is_file(),
                name,
                display_name: v["display_name"].as_str().unwrap_or_default().into(),
                path: e.path().display().to_string(),
                bridge,
                repo: b["repo"].as_str().unwrap_or_default().into(),
                env: b["env"].as_str().map(String::from),
                gpus: b["gpus"].as_u64().map(|g| g as u32),
            });
        }
    }
    out
}

fn list(a: ListArgs) -> anyhow::Result<()> {
    let ks = installed();
    let mut out = std::io::stdout().lock();
    if a.json {
        let v = serde_json::json!({ "schema_version": 1, "kernels": ks });
        writeln!(out, "{v}")?;
        return Ok(());
    }
    if ks.is_empty() {
        eprintln!("bridge: no bridge kernels installed; add one with `bridge kernel install`");
        return Ok(());
    }
    for k in &ks {
        let extra = match (&k.env, k.gpus) {
            (Some(e), Some(g)) => format!(" env {e}, {g} GPU"),
            (Some(e), None) => format!(" env {e}"),
            (None, Some(g)) => format!(" {g} GPU"),
            (None, None) => String::new(),
        };
        let broken = if k.ok {
            String::new()
        } else {
            format!(
                "  [broken: {} is gone; run `bridge kernel install` again]",
                k.bridge
            )
        };
        writeln!(
            out,
            "{}  {}  {}{extra}  {}{broken}",
            k.name, k.display_name, k.repo, k.path
        )?;
    }
    Ok(())
}

fn uninstall(a: UninstallArgs) -> anyhow::Result<()> {
    if !valid_name(&a.name) {
        bail!("{:?} is not a kernelspec name", a.name);
    }
    let dirs = if a.place.prefix.is_some() || a.place.sys_prefix || a.place.user {
        vec![a.place.kernels_dir()?]
    } else {
        search_path()
    };
    for d in dirs {
        let dir = d.join(&a.name);
        let file = dir.join("kernel.json");
        let Ok(bytes) = std::fs::read(&file) else {
            continue;
        };
        let v: serde_json::Value = serde_json::from_slice(&bytes).unwrap_or_default();
        if !v["metadata"]["bridge"].is_object() {
            bail!(
                "{} is not a bridge kernel; remove it with `jupyter kernelspec remove {}`",
                dir.display(),
                a.name
            );
        }
        std::fs::remove_dir_all(&dir)
            .with_context(|| format!("cannot remove {}", dir.display()))?;
        crate::note!("bridge: removed kernel {} ({})", a.name, dir.display());
        return Ok(());
    }
    bail!(
        "no bridge kernel named {:?} is installed (see `bridge kernel list`)",
        a.name
    )
}

// ---- the kernel ---------------------------------------------------------

/// The parts of a Jupyter connection file bridge needs.
#[derive(serde::Deserialize)]
struct ConnectionFile {
    #[serde(default = "default_transport")]
    transport: String,
    #[serde(default)]
    ip: String,
    key: String,
    #[serde(default)]
    signature_scheme: String,
    shell_port: u32,
    iopub_port: u32,
    stdin_port: u32,
    control_port: u32,
    hb_port: u32,
}

fn default_transport() -> String {
    "tcp".into()
}

fn read_connection_file(path: &Path) -> anyhow::Result<ConnectionFile> {
    let bytes = std::fs::read(path)
        .with_context(|| format!("cannot read the connection file {}", path.display()))?;
    let c: ConnectionFile = serde_json::from_slice(&bytes)
        .with_context(|| format!("{} is not a Jupyter connection file", path.display()))?;
    if c.transport != "tcp" {
        bail!(
            "the front end asks for transport {:?}; bridge kernels relay tcp (on loopback)",
            c.transport
        );
    }
    Ok(c)
}

/// The job a kernel runs: the job file's environment, or none.
fn kernel_job(repo: &Path, k: &KernelArgs, c: &ConnectionFile) -> anyhow::Result<v1::JobSpec> {
    let mut spec = match &k.env {
        Some(e) => {
            let path = repo.join(e);
            spec::load(&path, repo, &[])
                .map_err(|e| anyhow!("{e}"))?
                .spec
        }
        None => v1::JobSpec::default(),
    };
    spec.name = "kernel".into();
    spec.run = "python -m ipykernel_launcher".into();
    spec.outputs.clear();
    spec.outputs_local.clear();
    spec.debug = None;
    spec.live = true;
    if let Some(g) = k.gpus {
        spec.gpus = g;
    }
    spec.kernel = Some(v1::KernelSpec {
        key: c.key.clone(),
        signature_scheme: c.signature_scheme.clone(),
        orphan_grace_s: k.orphan_grace,
    });
    jobs::tracking_from_shell(&mut spec);
    Ok(spec)
}

async fn serve(cwd: &Path, args: ServeArgs, file: &Path) -> anyhow::Result<u8> {
    let file = cwd.join(file);
    let c = read_connection_file(&file)?;
    let start = args.repo.as_deref().map(|r| cwd.join(r));
    let layout = client::repo(start.as_deref().unwrap_or(cwd))?;
    let spec = kernel_job(&layout.repo, &args.kernel, &c)?;
    let mut sigint = signal(SignalKind::interrupt())?;
    let mut sigterm = signal(SignalKind::terminate())?;
    let mut sighup = signal(SignalKind::hangup())?;
    let mut daemon = jobs::daemon_or_up(&layout.repo, &layout).await?;
    let (tx, rx) = mpsc::channel(8);
    tx.send(KernelUp {
        spec: Some(spec),
        ip: c.ip.clone(),
        ports: vec![
            c.shell_port,
            c.iopub_port,
            c.stdin_port,
            c.control_port,
            c.hb_port,
        ],
        interrupt: false,
    })
    .await?;
    let mut down = daemon
        .kernel(ReceiverStream::new(rx))
        .await
        .map_err(|s| anyhow!("{}", s.message()))?
        .into_inner();
    let mut job = String::new();
    let parent = front_end_pid();
    loop {
        tokio::select! {
            () = parent_gone(parent) => {
                eprintln!("bridge kernel: the front end that started this kernel is gone; stopping it");
                return Ok(0);
            }
            m = down.message() => match m {
                Ok(Some(d)) => {
                    if let Some(j) = &d.job && job.is_empty() && !j.id.is_empty() {
                        job = j.id.clone();
                    }
                    match d.state.as_str() {
                        "ready" => {
                            let gpus = d.job.as_ref().map(|j| j.gpus.clone()).unwrap_or_default();
                            let gpus = if gpus.is_empty() { String::new() } else { format!(", GPUs {gpus:?}") };
                            eprintln!("bridge kernel: ready (job {job}{gpus}; `bridge ps` shows it)");
                        }
                        "ended" => {
                            let j = d.job.unwrap_or_default();
                            if !d.message.is_empty() {
                                eprintln!("bridge kernel: {}", d.message);
                            }
                            return Ok(match j.exit_code {
                                Some(0) => 0,
                                _ if j.state() == v1::JobState::Cancelled => 0,
                                Some(c) => u8::try_from(c).unwrap_or(1),
                                None => 1,
                            });
                        }
                        _ if !d.message.is_empty() => eprintln!("bridge kernel: {}", d.message),
                        _ => {}
                    }
                }
                Ok(None) => bail!("the daemon went away; the kernel is stopped"),
                Err(s) => bail!("{}", s.message()),
            },
            _ = sigint.recv() => {
                // The front end's interrupt: the remote kernel gets SIGINT.
                let _ = tx.send(KernelUp { interrupt: true, ..Default::default() }).await;
            }
            _ = sigterm.recv() => return Ok(0),
            _ = sighup.recv() => return Ok(0),
        }
    }
}

/// The front end that started this process, when it said so
/// (jupyter_client sets `JPY_PARENT_PID`) and is still our parent.
fn front_end_pid() -> Option<nix::unistd::Pid> {
    let pid: i32 = std::env::var("JPY_PARENT_PID").ok()?.parse().ok()?;
    let parent = nix::unistd::getppid();
    (parent.as_raw() == pid && pid > 1).then_some(parent)
}

/// Resolves once `parent` is no longer this process's parent (it died: a
/// front end that crashed leaves no kernel running on the GPU, as ipykernel
/// does locally). Never resolves without a parent to watch.
async fn parent_gone(parent: Option<nix::unistd::Pid>) {
    let Some(parent) = parent else {
        return std::future::pending().await;
    };
    loop {
        tokio::time::sleep(std::time::Duration::from_millis(500)).await;
        if nix::unistd::getppid() != parent {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names() {
        assert_eq!(default_name(Path::new("/x/My Repo")), "bridge-my-repo");
        assert_eq!(default_name(Path::new("/")), "bridge");
        assert!(valid_name("bridge-ml.2"));
        assert!(!valid_name("a/b"));
        assert!(!valid_name(""));
    }

    #[test]
    fn the_kernelspec_runs_this_bridge_behind_a_guard() {
        let k = KernelArgs {
            env: Some("train.toml".into()),
            gpus: Some(1),
            orphan_grace: 600,
        };
        let v = kernelspec(
            Path::new("/opt/it's/bridge"),
            Path::new("/r"),
            "bridge-r",
            "Python (bridge: r)",
            &k,
        );
        assert_eq!(v["interrupt_mode"], "signal");
        assert_eq!(v["metadata"]["debugger"], true);
        assert_eq!(v["argv"][4], "{connection_file}");
        let script = v["argv"][2].as_str().unwrap();
        assert!(script.starts_with(r"b='/opt/it'\''s/bridge';"), "{script}");
        assert!(
            script.ends_with(
                r#"exec "$b" kernel --connection-file "$1" --repo '/r' --env 'train.toml' --gpus 1"#
            ),
            "{script}"
        );
    }

    #[test]
    fn connection_files_other_than_tcp_are_refused() {
        let d = tempfile::tempdir().unwrap();
        let f = d.path().join("c.json");
        std::fs::write(
            &f,
            r#"{"transport":"ipc","ip":"kernel","key":"k","shell_port":1,"iopub_port":2,"stdin_port":3,"control_port":4,"hb_port":5}"#,
        )
        .unwrap();
        let e = read_connection_file(&f).err().unwrap().to_string();
        assert!(e.contains("relay tcp"), "{e}");
        std::fs::write(&f, "{").unwrap();
        assert!(read_connection_file(&f).is_err());
    }
}

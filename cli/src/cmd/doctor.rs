//! `bridge doctor [--json]`: checks what bridge needs, one line per check,
//! with the fix for each that fails. Exits 1 when something blocks `bridge
//! up` or a job (a `FAIL`); warnings (`warn`) do not.
//!
//! It checks the provider a plain `bridge up` would use (this clone's last
//! choice, else the project config, else the local agent), on the agent's
//! machine where that is another one: over SSH, the same connection the
//! daemon would make (host key and login included).

use std::path::Path;
use std::time::Duration;

use anyhow::anyhow;
use bridge_daemon::provider::ProviderSpec;
use bridge_daemon::repo::{Layout, find_repo};

use crate::client::{self, human_bytes};
use crate::cmd::up::UpFailed;
use crate::project::Project;

/// Version of the `bridge doctor --json` schema.
pub const SCHEMA_VERSION: u32 = 1;

/// How long one remote check may take.
const REMOTE_LIMIT: Duration = Duration::from_secs(20);

/// Clock skew worth a warning.
const SKEW_WARN: f64 = 2.0;

#[derive(clap::Args)]
pub struct Args {
    /// JSON: {"schema_version": 1, "ok": bool, "checks": [{"name", "level",
    /// "detail", "fix"}]} (docs/json.md).
    #[arg(long)]
    json: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Level {
    Ok,
    Warn,
    Fail,
}

#[derive(Debug, serde::Serialize)]
pub struct Check {
    pub name: &'static str,
    pub level: Level,
    pub detail: String,
    pub fix: Option<String>,
}

impl Check {
    fn ok(name: &'static str, detail: impl Into<String>) -> Check {
        Check {
            name,
            level: Level::Ok,
            detail: detail.into(),
            fix: None,
        }
    }
    fn warn(name: &'static str, detail: impl Into<String>, fix: impl Into<String>) -> Check {
        Check {
            name,
            level: Level::Warn,
            detail: detail.into(),
            fix: Some(fix.into()),
        }
    }
    fn fail(name: &'static str, detail: impl Into<String>, fix: impl Into<String>) -> Check {
        Check {
            name,
            level: Level::Fail,
            detail: detail.into(),
            fix: Some(fix.into()),
        }
    }

    fn line(&self) -> String {
        let level = match self.level {
            Level::Ok => "ok",
            Level::Warn => "warn",
            Level::Fail => "FAIL",
        };
        let fix = self
            .fix
            .as_ref()
            .map(|f| format!(" — fix: {f}"))
            .unwrap_or_default();
        format!("{level:<4}  {:<8} {}{fix}", self.name, self.detail)
    }
}

pub async fn run(cwd: &Path, args: Args) -> anyhow::Result<u8> {
    let mut checks = Vec::new();
    // Each line as soon as its check is done (a remote one can take seconds).
    macro_rules! push {
        ($c:expr) => {{
            let c = $c;
            if !args.json {
                println!("{}", c.line());
            }
            checks.push(c);
        }};
    }

    // The repository.
    let Some(root) = find_repo(cwd) else {
        push!(Check::fail(
            "repo",
            format!("{} is not inside a git repository", cwd.display()),
            "cd into your repository, or `git init` one"
        ));
        push!(agent_binary(None));
        return finish(checks, args.json);
    };
    let layout = Layout::new(&root);
    push!(Check::ok(
        "repo",
        format!("git repository {}", root.display())
    ));

    // The project config and the provider a plain `bridge up` would use.
    let project = match Project::load(&root) {
        Ok(p) => {
            push!(Check::ok(
                "config",
                if p.path.as_os_str().is_empty() {
                    "no bridge.toml or [tool.bridge] (bridge's defaults)".to_string()
                } else {
                    format!("{} read", p.path.display())
                }
            ));
            p
        }
        Err(e) => {
            push!(Check::fail(
                "config",
                format!("{e}").replace('\n', " "),
                "correct the file at that line and column (README: Project config)"
            ));
            Project::default()
        }
    };
    let (spec, from) = match provider_choice(&layout, &project) {
        Choice::Spec(spec, from) => (*spec, from),
        Choice::AwsNotUp(from) => {
            push!(agent_binary(Some(&ProviderSpec::Ssh {
                host: String::new(),
                identity: None,
                accept_new_host_key: false,
                remote_dir: None,
            })));
            push!(aws_credentials(from));
            push!(local_disk(&root));
            push!(watches(tree_size(&root).0));
            return finish(checks, args.json);
        }
        Choice::NoHost => {
            push!(Check::fail(
                "provider",
                format!(
                    "{} says provider = \"ssh\" without a host",
                    project.path.display()
                ),
                "add host = \"[user@]host[:port]\" (or a Host alias of ~/.ssh/config) to it"
            ));
            push!(agent_binary(None));
            return finish(checks, args.json);
        }
    };
    push!(agent_binary(Some(&spec)));
    if let Some(f) = UpFailed::load(&layout) {
        push!(Check::warn(
            "lastup",
            format!(
                "the last `bridge up` for {} failed: {}",
                f.spec().describe(),
                f.first_error()
            ),
            "run `bridge up` again once the lines below are ok, or `bridge up --provider local`"
        ));
    }

    // Reach the agent's machine.
    let host = match Host::open(&spec).await {
        Ok((host, detail)) => {
            push!(Check::ok(
                "provider",
                format!("{} ({from}): {detail}", spec.describe())
            ));
            Some(host)
        }
        Err((detail, fix)) => {
            push!(Check::fail(
                "provider",
                format!("{} ({from}): {detail}", spec.describe()),
                fix
            ));
            None
        }
    };

    let tree = tree_size(&root);
    if let Some(host) = &host {
        push!(python(host).await);
        push!(gpus(host, project.gpus).await);
        push!(agent_disk(host, &spec, &layout, tree.1).await);
        push!(clock(host).await);
    }
    push!(local_disk(&root));
    push!(watches(tree.0));
    finish(checks, args.json)
}

fn finish(checks: Vec<Check>, json: bool) -> anyhow::Result<u8> {
    let blocked = checks.iter().any(|c| c.level == Level::Fail);
    if json {
        let v = serde_json::json!({
            "schema_version": SCHEMA_VERSION,
            "ok": !blocked,
            "checks": checks,
        });
        println!("{}", serde_json::to_string_pretty(&v)?);
    } else if blocked {
        eprintln!("bridge doctor: something blocks bridge here (FAIL above)");
    }
    Ok(if blocked { 1 } else { 0 })
}

/// The provider a plain `bridge up` uses, and where that choice comes from.
enum Choice {
    Spec(Box<ProviderSpec>, &'static str),
    /// AWS with no instance up yet: only the credentials can be checked.
    AwsNotUp(&'static str),
    /// A project config naming SSH without a host.
    NoHost,
}

fn provider_choice(layout: &Layout, project: &Project) -> Choice {
    if let Some(f) = UpFailed::load(layout) {
        return Choice::Spec(
            Box::new(f.spec().clone()),
            "the last `bridge up`, which failed",
        );
    }
    let saved = ProviderSpec::load(&layout.provider).ok().flatten();
    let from = "this clone's last `bridge up`";
    match saved {
        #[cfg(feature = "aws")]
        Some(ProviderSpec::Aws { instance: None, .. }) => return Choice::AwsNotUp(from),
        Some(s) => return Choice::Spec(Box::new(s), from),
        None => {}
    }
    let from = "the project config";
    match project.provider() {
        Some("ssh") | None if project.host.is_some() => Choice::Spec(
            Box::new(ProviderSpec::Ssh {
                host: project.host.clone().unwrap_or_default(),
                identity: project.identity.as_deref().map(crate::project::expand_home),
                accept_new_host_key: false,
                remote_dir: project.remote_dir.clone(),
            }),
            from,
        ),
        Some("ssh") => Choice::NoHost,
        Some("aws") => Choice::AwsNotUp(from),
        Some(_) => Choice::Spec(Box::new(ProviderSpec::Local), from),
        None if project.aws.any() => Choice::AwsNotUp(from),
        None => Choice::Spec(Box::new(ProviderSpec::Local), "the default"),
    }
}

/// AWS before `bridge up`: whether credentials are configured at all
/// (without a call to AWS: doctor sends nothing anywhere but the agent's
/// machine; `bridge up` checks them for real).
fn aws_credentials(from: &str) -> Check {
    let env = |k: &str| std::env::var_os(k).is_some_and(|v| !v.is_empty());
    let home = std::env::var_os("HOME").map(std::path::PathBuf::from);
    let file = |name: &str| {
        home.as_ref()
            .is_some_and(|h| h.join(".aws").join(name).is_file())
    };
    let source = if env("AWS_ACCESS_KEY_ID") && env("AWS_SECRET_ACCESS_KEY") {
        Some("AWS_ACCESS_KEY_ID in the environment")
    } else if env("AWS_WEB_IDENTITY_TOKEN_FILE") {
        Some("a web identity token (AWS_WEB_IDENTITY_TOKEN_FILE)")
    } else if env("AWS_CONTAINER_CREDENTIALS_FULL_URI")
        || env("AWS_CONTAINER_CREDENTIALS_RELATIVE_URI")
    {
        Some("the container's credentials endpoint")
    } else if file("credentials") || file("config") || env("AWS_CONFIG_FILE") {
        Some("~/.aws (profile")
    } else {
        None
    };
    match source {
        Some(s) if s.ends_with("(profile") => Check::ok(
            "provider",
            format!(
                "aws ({from}): no instance yet (`bridge up` launches one); credentials from {s} {})",
                std::env::var("AWS_PROFILE").unwrap_or_else(|_| "default".into())
            ),
        ),
        Some(s) => Check::ok(
            "provider",
            format!(
                "aws ({from}): no instance yet (`bridge up` launches one); credentials from {s}"
            ),
        ),
        None => Check::fail(
            "provider",
            format!("aws ({from}): no AWS credentials found (environment, ~/.aws)"),
            "`aws configure`, `aws sso login --profile NAME` with AWS_PROFILE, or AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY",
        ),
    }
}

/// The agent binary: found, runnable here, and (for a remote) a static
/// x86-64 Linux build.
fn agent_binary(spec: Option<&ProviderSpec>) -> Check {
    let bin = client::agent_bin();
    let shown = bin.display().to_string();
    let build = "cargo build --release -p bridge-agent (or reinstall bridge: `pip install .` or `cargo install --locked --path cli --features agent`), or set BRIDGE_AGENT_BIN";
    if !is_executable(&bin) {
        return Check::fail(
            "agent",
            format!("no bridge-agent at {shown} (looked next to bridge, then on PATH)"),
            build,
        );
    }
    let version = std::process::Command::new(&bin)
        .arg("--version")
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string());
    let Some(version) = version else {
        return Check::fail(
            "agent",
            format!("{shown} does not run (`bridge-agent --version` failed)"),
            build,
        );
    };
    let mine = format!("bridge-agent {}", env!("CARGO_PKG_VERSION"));
    let remote = spec.is_some_and(|s| !matches!(s, ProviderSpec::Local));
    #[cfg(feature = "ssh")]
    if remote {
        match bridge_daemon::provider::ssh::elf::inspect_file(&bin) {
            Ok(e) if !e.x86_64 => {
                return Check::fail(
                    "agent",
                    format!("{shown} is not an x86-64 Linux binary; remote agents must be"),
                    "build it on Linux x86-64 (README: Install)",
                );
            }
            Ok(e) if e.interpreter.is_some() => {
                return Check::warn(
                    "agent",
                    format!(
                        "{shown} ({version}) is dynamically linked: it runs only where glibc is as new as here"
                    ),
                    "build it static: RUSTFLAGS=\"-C target-feature=+crt-static\" cargo build --release -p bridge-agent --target x86_64-unknown-linux-gnu",
                );
            }
            Ok(_) => {}
            Err(why) => {
                return Check::fail("agent", format!("{shown}: {why}"), build);
            }
        }
    }
    if version != mine {
        return Check::warn(
            "agent",
            format!(
                "{shown} is {version}, this bridge is {}",
                env!("CARGO_PKG_VERSION")
            ),
            "install bridge and bridge-agent from the same build",
        );
    }
    Check::ok(
        "agent",
        format!(
            "{shown} ({version}{})",
            if remote { ", static" } else { "" }
        ),
    )
}

fn is_executable(p: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(p).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

/// Where the checks of the agent's machine run.
enum Host {
    /// This machine (the local provider).
    Here,
    #[cfg(feature = "ssh")]
    Ssh(Box<bridge_daemon::provider::ssh::SshProvider>),
    /// The agent's pod, through the API server's exec.
    #[cfg(feature = "k8s")]
    Pod(Box<(kube::Api<k8s_openapi::api::core::v1::Pod>, String)>),
}

impl Host {
    /// Reaches the machine; `Err((what happened, the fix))`.
    async fn open(spec: &ProviderSpec) -> Result<(Host, String), (String, String)> {
        let config = spec.clone().open(client::agent_bin()).map_err(|e| {
            (
                format!("{e:#}"),
                "run `bridge up` (it launches or finds the machine)".to_string(),
            )
        })?;
        match config {
            bridge_daemon::ProviderConfig::Local { .. } => {
                Ok((Host::Here, "the agent runs on this machine".into()))
            }
            #[cfg(feature = "ssh")]
            bridge_daemon::ProviderConfig::Ssh(c) => {
                let p = bridge_daemon::provider::ssh::SshProvider::try_new(c)
                    .map_err(|e| (e.to_string(), ssh_fix(&e.to_string())))?;
                match tokio::time::timeout(REMOTE_LIMIT, p.probe()).await {
                    Ok(Ok(platform)) => Ok((
                        Host::Ssh(Box::new(p)),
                        format!("logged in over SSH, {platform}"),
                    )),
                    Ok(Err(e)) => Err((e.to_string(), ssh_fix(&e.to_string()))),
                    Err(_) => Err((
                        format!("no answer in {} s", REMOTE_LIMIT.as_secs()),
                        "check the host name and port, and that `ssh HOST` works".into(),
                    )),
                }
            }
            #[cfg(feature = "k8s")]
            bridge_daemon::ProviderConfig::K8s(c) => {
                use bridge_daemon::provider::k8s;
                let fix = "check `kubectl get pod` there, then `bridge up`".to_string();
                let (client, _) = k8s::client(c.context.as_deref())
                    .await
                    .map_err(|e| (e, fix.clone()))?;
                let pods = kube::Api::namespaced(client, &c.namespace);
                let pod = match pods.get_opt(&c.pod).await {
                    Ok(Some(p)) => p,
                    Ok(None) => {
                        return Err((
                            format!("pod {}/{} is gone", c.namespace, c.pod),
                            "run `bridge up` for a new one".into(),
                        ));
                    }
                    Err(e) => return Err((k8s::api_error("read the pod", &c.namespace, &e), fix)),
                };
                match k8s::lifecycle::Phase::of(&pod) {
                    k8s::lifecycle::Phase::Running => Ok((
                        Host::Pod(Box::new((pods, c.pod.clone()))),
                        format!("pod {}/{} is Running", c.namespace, c.pod),
                    )),
                    other => Err((
                        format!("pod {}/{} is {}", c.namespace, c.pod, other.describe()),
                        "run `bridge up` for a new one".into(),
                    )),
                }
            }
        }
    }

    /// Runs `cmd` in a POSIX shell there: exit code, stdout, stderr.
    async fn sh(&self, cmd: &str) -> anyhow::Result<(i32, String, String)> {
        match self {
            Host::Here => {
                let out = tokio::time::timeout(
                    REMOTE_LIMIT,
                    tokio::process::Command::new("sh")
                        .args(["-c", cmd])
                        .stdin(std::process::Stdio::null())
                        .output(),
                )
                .await
                .map_err(|_| anyhow!("`{cmd}` did not finish"))??;
                Ok((
                    out.status.code().unwrap_or(-1),
                    String::from_utf8_lossy(&out.stdout).into_owned(),
                    String::from_utf8_lossy(&out.stderr).into_owned(),
                ))
            }
            #[cfg(feature = "ssh")]
            Host::Ssh(p) => {
                let (code, out, err) = tokio::time::timeout(REMOTE_LIMIT, p.exec(cmd, None))
                    .await
                    .map_err(|_| anyhow!("`{cmd}` did not finish"))??;
                Ok((
                    code,
                    String::from_utf8_lossy(&out).into_owned(),
                    String::from_utf8_lossy(&err).into_owned(),
                ))
            }
            #[cfg(feature = "k8s")]
            Host::Pod(pod) => {
                let (pods, name) = &**pod;
                let o = tokio::time::timeout(
                    REMOTE_LIMIT,
                    bridge_daemon::provider::k8s::exec(
                        pods,
                        name,
                        bridge_daemon::provider::k8s::CONTAINER,
                        cmd,
                        None,
                    ),
                )
                .await
                .map_err(|_| anyhow!("`{cmd}` did not finish"))?
                .map_err(|e| anyhow!(e))?;
                // "command terminated with non-zero exit code: … 3"
                let code = if o.ok {
                    0
                } else {
                    o.status
                        .rsplit(|c: char| !c.is_ascii_digit())
                        .find(|w| !w.is_empty())
                        .and_then(|w| w.parse().ok())
                        .unwrap_or(1)
                };
                Ok((code, o.stdout, o.stderr))
            }
        }
    }

    fn remote(&self) -> bool {
        !matches!(self, Host::Here)
    }
}

/// The fix for an SSH failure, by what it says.
#[cfg(feature = "ssh")]
fn ssh_fix(why: &str) -> String {
    let w = why.to_lowercase();
    if w.contains("authenticity") || w.contains("accept-new-host-key") {
        "check the fingerprint, then `bridge up --host HOST --accept-new-host-key`".into()
    } else if w.contains("has changed") || w.contains("host key") {
        "the host key changed: if the machine was reinstalled, remove its line from bridge's known_hosts (~/.config/bridge/known_hosts) or ~/.ssh/known_hosts".into()
    } else if w.contains("auth") || w.contains("denied") || w.contains("key") {
        "give a key the server accepts: `bridge up --identity ~/.ssh/KEY`, ssh-agent, or IdentityFile in ~/.ssh/config".into()
    } else {
        "check the host name and port, and that `ssh HOST` works from this machine".into()
    }
}

async fn python(host: &Host) -> Check {
    let cmd = "python3 -c 'import sys, venv, ensurepip; print(sys.version.split()[0])'";
    match host.sh(cmd).await {
        Ok((0, out, _)) => Check::ok(
            "python",
            format!("python3 {} with venv and pip", out.trim()),
        ),
        Ok((_, _, err)) => {
            let why = err.lines().last().unwrap_or("python3 not found").trim();
            Check::warn(
                "python",
                format!(
                    "python3 with venv is missing on the agent's machine ({why}); jobs with [python] cannot build their environment"
                ),
                "install Python 3 with venv there (Debian/Ubuntu: apt install python3-venv)",
            )
        }
        Err(e) => Check::warn(
            "python",
            format!("not checked: {e:#}"),
            "see `provider` above",
        ),
    }
}

async fn gpus(host: &Host, wanted: Option<u32>) -> Check {
    let cmd = "nvidia-smi --query-gpu=index,name,memory.total --format=csv,noheader,nounits";
    let found: Vec<(String, String)> = match host.sh(cmd).await {
        Ok((0, out, _)) => out
            .lines()
            .filter_map(|l| {
                let mut f = l.split(',').map(str::trim);
                let _ = f.next()?;
                Some((f.next()?.to_string(), f.next()?.to_string()))
            })
            .collect(),
        _ => Vec::new(),
    };
    let want = wanted.unwrap_or(0);
    if (found.len() as u32) < want {
        return Check::fail(
            "gpus",
            format!(
                "the project asks for {want} GPU(s) (gpus in the project config), the agent's machine has {}",
                found.len()
            ),
            "pick a machine with enough GPUs (`bridge up --host …`), or lower `gpus`",
        );
    }
    match found.first() {
        None => Check::warn(
            "gpus",
            "no GPUs (no nvidia-smi, or it lists none): jobs run on the CPU",
            "on a GPU machine, install the NVIDIA driver (nvidia-smi comes with it)",
        ),
        Some((name, mib)) => Check::ok("gpus", format!("{} × {name} ({mib} MiB)", found.len())),
    }
}

/// Free space on the agent's side against the repository's size (the mirror
/// holds a copy, the chunk store another).
async fn agent_disk(host: &Host, spec: &ProviderSpec, layout: &Layout, tree_bytes: u64) -> Check {
    let dir = match spec {
        ProviderSpec::Local => shell_quote(&layout.state.to_string_lossy()),
        ProviderSpec::Ssh {
            remote_dir: Some(d),
            ..
        } => d.clone(),
        _ => "~".into(),
    };
    let cmd =
        format!("d={dir}; while [ ! -d \"$d\" ]; do d=$(dirname \"$d\"); done; df -Pk \"$d\"");
    let free = match host.sh(&cmd).await {
        Ok((0, out, _)) => df_free(&out),
        _ => None,
    };
    let Some(free) = free else {
        return Check::warn(
            "disk",
            "cannot read the agent's free space (df)",
            "check `df` there",
        );
    };
    disk_verdict(
        "disk",
        "agent's side",
        free,
        2 * tree_bytes + (1 << 30),
        tree_bytes,
    )
}

fn local_disk(root: &Path) -> Check {
    let cmd = format!("df -Pk {}", shell_quote(&root.to_string_lossy()));
    let free = std::process::Command::new("sh")
        .args(["-c", &cmd])
        .output()
        .ok()
        .filter(|o| o.status.success())
        .and_then(|o| df_free(&String::from_utf8_lossy(&o.stdout)));
    match free {
        // Outputs come home here; bridge's index is small.
        Some(free) => disk_verdict("localdisk", "this machine's side", free, 1 << 30, 64 << 20),
        None => Check::warn(
            "localdisk",
            "cannot read free space (df)",
            "check `df` here",
        ),
    }
}

/// `ok` with room for `comfortable` bytes, `warn` below it, `fail` below `needed`.
fn disk_verdict(name: &'static str, side: &str, free: u64, comfortable: u64, needed: u64) -> Check {
    let detail = format!("{} free on the {side}", human_bytes(free));
    if free < needed {
        Check::fail(
            name,
            format!("{detail}; at least {} needed", human_bytes(needed)),
            "free space there (old mirrors: `bridge down --purge` in repositories you no longer use)",
        )
    } else if free < comfortable {
        Check::warn(
            name,
            format!("{detail}; {} recommended", human_bytes(comfortable)),
            "free space there before large outputs or environments fill it",
        )
    } else {
        Check::ok(name, detail)
    }
}

/// The available bytes in `df -Pk` output (the last line's fourth field).
fn df_free(out: &str) -> Option<u64> {
    let line = out.lines().rfind(|l| !l.trim().is_empty())?;
    let kib: u64 = line.split_whitespace().nth(3)?.parse().ok()?;
    Some(kib * 1024)
}

fn shell_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', "'\\''"))
}

/// The agent's clock against this one (a remote only).
async fn clock(host: &Host) -> Check {
    if !host.remote() {
        return Check::ok("clock", "the agent shares this machine's clock");
    }
    let before = crate::jobs::now_ms();
    let remote = host.sh("date +%s").await;
    let after = crate::jobs::now_ms();
    let Some(secs) = remote
        .ok()
        .filter(|r| r.0 == 0)
        .and_then(|r| r.1.trim().parse::<f64>().ok())
    else {
        return Check::warn(
            "clock",
            "cannot read the agent's clock (`date +%s`)",
            "check `date` there",
        );
    };
    // The remote read happened between before and after; `date +%s`
    // truncates, so compare with the middle of its second.
    let here = (before + after) as f64 / 2000.0;
    let skew = secs + 0.5 - here;
    let slack = (after - before) as f64 / 2000.0 + 0.5;
    if skew.abs() > SKEW_WARN + slack {
        Check::warn(
            "clock",
            format!("the agent's clock is {skew:+.0} s off this machine's"),
            "enable time sync (NTP, systemd-timesyncd or chrony) on both machines; bridge itself never compares mtimes across them, but logs and MLflow times will disagree",
        )
    } else {
        Check::ok(
            "clock",
            format!("within {SKEW_WARN:.0} s of this machine's"),
        )
    }
}

/// The repository's directory count (one inotify watch each) and bytes, as
/// the daemon would walk it.
fn tree_size(root: &Path) -> (usize, u64) {
    let (listings, _) =
        bridge_proto::scan::walk_listings(root, None, None, bridge_proto::scan::Side::Daemon);
    let bytes = listings
        .iter()
        .flat_map(|l| l.entries.iter())
        .map(|(_, s)| s.size)
        .sum();
    (listings.len(), bytes)
}

/// inotify's watch limit against the repository's directories (Linux; other
/// systems watch without a per-directory limit).
fn watches(dirs: usize) -> Check {
    #[cfg(target_os = "linux")]
    {
        let read = |p: &str| {
            std::fs::read_to_string(p)
                .ok()
                .and_then(|s| s.trim().parse::<usize>().ok())
        };
        // The user namespace's own limit, and the system's.
        let limit = [
            read("/proc/sys/user/max_inotify_watches"),
            read("/proc/sys/fs/inotify/max_user_watches"),
        ]
        .into_iter()
        .flatten()
        .min();
        match limit {
            Some(limit) if dirs > limit => Check::warn(
                "watches",
                format!(
                    "the repository has {dirs} directories, inotify allows {limit} watches: bridge would fall back to polling (slower to notice edits)"
                ),
                "sudo sysctl fs.inotify.max_user_watches=524288 (persist it in /etc/sysctl.d/), or ignore big directories in .bridgeignore",
            ),
            Some(limit) => Check::ok(
                "watches",
                format!("{dirs} directories to watch, inotify allows {limit}"),
            ),
            None => Check::warn(
                "watches",
                "cannot read the inotify watch limit",
                "check /proc/sys/fs/inotify/max_user_watches",
            ),
        }
    }
    #[cfg(not(target_os = "linux"))]
    {
        Check::ok(
            "watches",
            format!("{dirs} directories (no per-directory watch limit here)"),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn df_output_gives_the_available_bytes() {
        let out = "Filesystem     1024-blocks      Used Available Capacity Mounted on\n/dev/vda         263174212  20480000  75000000      22% /\n";
        assert_eq!(df_free(out), Some(75_000_000 * 1024));
        assert_eq!(df_free("garbage"), None);
    }

    #[test]
    fn disk_verdicts_by_room() {
        assert_eq!(
            disk_verdict("disk", "x", 10 << 30, 2 << 30, 1 << 30).level,
            Level::Ok
        );
        assert_eq!(
            disk_verdict("disk", "x", 3 << 29, 2 << 30, 1 << 30).level,
            Level::Warn
        );
        let f = disk_verdict("disk", "x", 1 << 20, 2 << 30, 1 << 30);
        assert_eq!(f.level, Level::Fail);
        assert!(f.line().starts_with("FAIL  disk"), "{}", f.line());
        assert!(f.line().contains(" — fix: "), "{}", f.line());
    }
}

//! What the job commands share: reaching a daemon that may restart under us,
//! following a job's log from an offset, waiting for its end, and turning its
//! end into an exit code.

use std::io::Write;
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail};
use bridge_daemon::repo::Layout;
pub use bridge_proto::jobs::state_name;
use bridge_proto::v1::control_client::ControlClient;
use bridge_proto::v1::{JobInfo, JobRef, JobState, LogStream, LogsRequest};
use tonic::Code;
use tonic::transport::Channel;

use crate::client;

/// How long a job command waits for the daemon to come back before starting
/// one itself, and how long it waits in all.
const DAEMON_GRACE: Duration = Duration::from_secs(3);
const DAEMON_GIVE_UP: Duration = Duration::from_secs(60);

/// The daemon, started with the local provider if none runs (a fresh clone
/// needs nothing but `bridge run`).
pub async fn daemon_or_up(cwd: &Path, layout: &Layout) -> anyhow::Result<ControlClient<Channel>> {
    if let Some(c) = client::daemon(layout).await {
        return Ok(c);
    }
    if !layout.up_failed.exists() {
        crate::note!(
            "bridge: not up yet for {}; starting the {}",
            layout.repo.display(),
            client::place(layout)
        );
    }
    if let Err(e) = crate::cmd::up::run(cwd, crate::cmd::up::Args::local()).await {
        // Another command may have started it meanwhile.
        if let Some(c) = client::daemon(layout).await {
            return Ok(c);
        }
        return Err(e);
    }
    client::require_daemon(layout).await
}

/// Reconnects to the daemon after it went away: waits for it to come back,
/// starts it after [`DAEMON_GRACE`].
pub async fn reconnect(cwd: &Path, layout: &Layout) -> anyhow::Result<ControlClient<Channel>> {
    let start = Instant::now();
    let mut started = false;
    loop {
        if let Some(c) = client::daemon(layout).await {
            return Ok(c);
        }
        if !started && start.elapsed() >= DAEMON_GRACE {
            started = true;
            crate::note!("bridge: the daemon went away; starting it again");
            let _ = crate::cmd::up::run(cwd, crate::cmd::up::Args::local()).await;
            continue;
        }
        if start.elapsed() >= DAEMON_GIVE_UP {
            bail!("the daemon for {} did not come back", layout.repo.display());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn gone(s: &tonic::Status) -> bool {
    matches!(
        s.code(),
        Code::Unavailable | Code::Unknown | Code::Cancelled
    )
}

/// Follows `id`'s log from `offset` to its end (or until the job ends, with
/// `follow`), writing stdout to stdout and stderr and bridge's own lines to
/// stderr. Survives daemon restarts: it resumes from the last offset it
/// printed, so nothing is lost or repeated. Returns the offset reached.
#[allow(clippy::too_many_arguments)]
pub async fn follow_log(
    cwd: &Path,
    layout: &Layout,
    c: &mut ControlClient<Channel>,
    id: &str,
    offset: u64,
    follow: bool,
    tail: u32,
    json: bool,
) -> anyhow::Result<u64> {
    let mut offset = offset;
    let mut tail = tail;
    let mut out = std::io::stdout().lock();
    let mut err = std::io::stderr();
    let mut lines = json.then(|| JsonLines::new(id));
    // Following on a terminal: an environment build is one live line.
    let mut build = (follow && !json && crate::out::progress()).then(EnvBuild::default);
    loop {
        let req = LogsRequest {
            id: id.to_string(),
            offset,
            follow,
            tail_lines: tail,
            // The daemon inflates what the agent compressed.
            accept_zstd: false,
        };
        let mut stream = match c.logs(req).await {
            Ok(s) => s.into_inner(),
            Err(s) if gone(&s) => {
                *c = reconnect(cwd, layout).await?;
                continue;
            }
            Err(s) => bail!("{}", s.message()),
        };
        loop {
            match stream.message().await {
                Ok(Some(chunk)) if lines.is_some() => {
                    let l = lines.as_mut().expect("checked");
                    l.chunk(&chunk, &mut out)?;
                    offset = chunk.next_offset;
                    tail = 0;
                }
                Ok(Some(chunk)) if build.as_mut().is_some_and(|b| b.takes(&chunk)) => {
                    offset = chunk.next_offset;
                    tail = 0;
                }
                Ok(Some(chunk)) => {
                    match chunk.stream() {
                        LogStream::Stdout | LogStream::Unspecified => {
                            out.write_all(&chunk.data)?;
                            out.flush()?;
                        }
                        LogStream::Stderr | LogStream::System => {
                            err.write_all(&chunk.data)?;
                        }
                    }
                    offset = chunk.next_offset;
                    tail = 0;
                }
                Ok(None) => {
                    if let Some(l) = lines.as_mut() {
                        l.finish(offset, &mut out)?;
                    }
                    if let Some(b) = build.as_mut() {
                        b.end(false);
                    }
                    return Ok(offset);
                }
                Err(s) if gone(&s) => {
                    *c = reconnect(cwd, layout).await?;
                    break;
                }
                Err(s) => bail!("{}", s.message()),
            }
        }
    }
}

/// On a terminal, an environment build's output (pip's hundreds of lines)
/// is shown as one live line: the build's note, its elapsed time and the
/// builder's last output line. When the build succeeds the line goes away
/// (the full output stays in `bridge logs`); when it fails, the whole output
/// is printed, so the error is there.
#[derive(Default)]
struct EnvBuild {
    /// While a build runs: its live line and everything it printed.
    running: Option<(indicatif::ProgressBar, Vec<u8>)>,
}

impl EnvBuild {
    /// Handles `chunk` when it belongs to a build (or starts one); false
    /// when it is for the normal path.
    fn takes(&mut self, chunk: &bridge_proto::v1::LogChunk) -> bool {
        let system = chunk.stream() == LogStream::System;
        let text = String::from_utf8_lossy(&chunk.data);
        match &mut self.running {
            None if system && text.contains("building python env") => {
                let _ = std::io::stderr().write_all(&chunk.data);
                self.running = Some((crate::out::spinner(""), Vec::new()));
                true
            }
            None => false,
            Some((bar, output)) if !system => {
                output.extend_from_slice(&chunk.data);
                let last = output
                    .split(|b| *b == b'\n' || *b == b'\r')
                    .rev()
                    .find(|l| !l.iter().all(u8::is_ascii_whitespace))
                    .map(|l| String::from_utf8_lossy(l).into_owned())
                    .unwrap_or_default();
                bar.set_message(last);
                true
            }
            Some(_) => {
                // bridge's next line ends the build, one way or the other.
                self.end(text.contains("python env built"));
                false
            }
        }
    }

    /// Ends a running build's live line; the builder's output is printed
    /// unless it `succeeded`.
    fn end(&mut self, succeeded: bool) {
        if let Some((bar, output)) = self.running.take() {
            bar.finish_and_clear();
            if !succeeded {
                let _ = std::io::stderr().write_all(&output);
            }
        }
    }
}

/// Version of the `bridge logs --json` line schema.
pub const LOG_SCHEMA_VERSION: u32 = 1;

/// `bridge logs --json`: one object per line of the log, in log order
/// (schema in docs/json.md). A line split over several records is
/// printed once it is whole; `next_offset` is given on a line only when
/// everything before that offset has been printed, so `bridge logs --offset N`
/// resumes after it with nothing lost or repeated.
struct JsonLines {
    job: String,
    /// Text of a line not yet ended, per stream, with its first timestamp.
    pending: [(Vec<u8>, u64); 3],
}

impl JsonLines {
    fn new(job: &str) -> Self {
        JsonLines {
            job: job.to_string(),
            pending: Default::default(),
        }
    }

    fn slot(stream: LogStream) -> (usize, &'static str) {
        match stream {
            LogStream::Stdout | LogStream::Unspecified => (0, "stdout"),
            LogStream::Stderr => (1, "stderr"),
            LogStream::System => (2, "bridge"),
        }
    }

    fn emit(
        &self,
        out: &mut impl Write,
        stream: &str,
        time_ns: u64,
        text: &[u8],
        next_offset: Option<u64>,
    ) -> std::io::Result<()> {
        let text = text.strip_suffix(b"\r").unwrap_or(text);
        let v = serde_json::json!({
            "schema_version": LOG_SCHEMA_VERSION,
            "job": self.job,
            "stream": stream,
            "time_ns": time_ns,
            "text": String::from_utf8_lossy(text),
            "next_offset": next_offset,
        });
        writeln!(out, "{v}")
    }

    fn chunk(
        &mut self,
        chunk: &bridge_proto::v1::LogChunk,
        out: &mut impl Write,
    ) -> anyhow::Result<()> {
        let (i, name) = Self::slot(chunk.stream());
        let mut rest: &[u8] = &chunk.data;
        let mut done: Vec<(u64, Vec<u8>)> = Vec::new();
        while let Some(nl) = memchr_newline(rest) {
            let (p, ts) = &mut self.pending[i];
            let start = if p.is_empty() {
                chunk.timestamp_ns
            } else {
                *ts
            };
            p.extend_from_slice(&rest[..nl]);
            done.push((start, std::mem::take(p)));
            rest = &rest[nl + 1..];
        }
        if !rest.is_empty() {
            let (p, ts) = &mut self.pending[i];
            if p.is_empty() {
                *ts = chunk.timestamp_ns;
            }
            p.extend_from_slice(rest);
        }
        let whole = self.pending.iter().all(|(p, _)| p.is_empty());
        let n = done.len();
        for (k, (ts, text)) in done.into_iter().enumerate() {
            let at = (whole && k + 1 == n).then_some(chunk.next_offset);
            self.emit(out, name, ts, &text, at)?;
        }
        out.flush()?;
        Ok(())
    }

    /// The end of the log: what is left of unended lines, as lines.
    fn finish(&mut self, offset: u64, out: &mut impl Write) -> anyhow::Result<()> {
        let left: Vec<(usize, Vec<u8>, u64)> = self
            .pending
            .iter_mut()
            .enumerate()
            .filter(|(_, (p, _))| !p.is_empty())
            .map(|(i, (p, ts))| (i, std::mem::take(p), *ts))
            .collect();
        let n = left.len();
        for (k, (i, text, ts)) in left.into_iter().enumerate() {
            let name = ["stdout", "stderr", "bridge"][i];
            self.emit(out, name, ts, &text, (k + 1 == n).then_some(offset))?;
        }
        out.flush()?;
        Ok(())
    }
}

fn memchr_newline(b: &[u8]) -> Option<usize> {
    b.iter().position(|&c| c == b'\n')
}

/// Waits for the job's end and its outputs, over daemon restarts.
pub async fn wait(
    cwd: &Path,
    layout: &Layout,
    c: &mut ControlClient<Channel>,
    id: &str,
) -> anyhow::Result<JobInfo> {
    loop {
        match c.wait(JobRef { id: id.to_string() }).await {
            Ok(r) => return Ok(r.into_inner()),
            Err(s) if gone(&s) => *c = reconnect(cwd, layout).await?,
            Err(s) => bail!("{}", s.message()),
        }
    }
}

/// Milliseconds since the Unix epoch, now.
pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// How long ago `ms` (Unix milliseconds) was, in words: "12s ago", "3m
/// ago"; "-" for 0 (not yet).
pub fn clock(ms: u64) -> String {
    if ms == 0 {
        return "-".into();
    }
    let ago = now_ms().saturating_sub(ms) / 1000;
    match ago {
        0..60 => format!("{ago}s ago"),
        60..3600 => format!("{}m ago", ago / 60),
        3600..86400 => format!("{}h ago", ago / 3600),
        _ => format!("{}d ago", ago / 86400),
    }
}

/// The exit code `bridge run` ends with for a finished job.
pub fn exit_code(j: &JobInfo) -> u8 {
    match (j.state(), j.exit_code) {
        (JobState::Succeeded, _) => 0,
        (_, Some(c)) if (1..=255).contains(&c) => c as u8,
        (JobState::Cancelled, _) => 130,
        _ => 1,
    }
}

/// One line saying how the job ended, for stderr.
pub fn summary(j: &JobInfo) -> String {
    let secs = if j.started_ms > 0 && j.finished_ms >= j.started_ms {
        format!(
            " in {:.1} s",
            (j.finished_ms - j.started_ms) as f64 / 1000.0
        )
    } else {
        String::new()
    };
    let mut s = format!(
        "bridge: job {} ({}) {}{secs}",
        j.id,
        j.name,
        state_name(j.state())
    );
    if let Some(c) = j.exit_code
        && c != 0
    {
        s.push_str(&format!(", exit code {c}"));
    }
    if !j.reason.is_empty() {
        s.push_str(&format!(": {}", j.reason));
    }
    if let Some(spec) = &j.spec
        && !spec.outputs.is_empty()
        && j.outputs_pulled
    {
        let dest = bridge_daemon::jobs::destination(spec, &j.id);
        let outs: Vec<String> = spec
            .outputs
            .iter()
            .map(|o| {
                if dest.is_empty() {
                    o.clone()
                } else {
                    format!("{dest}/{o}")
                }
            })
            .collect();
        s.push_str(&format!("; outputs in {}", outs.join(", ")));
        if !j.outputs_kept_local.is_empty() {
            s.push_str(&format!(
                "; kept {} file(s) you changed here since the job was submitted, the job's versions are beside them: {}",
                j.outputs_kept_local.len(),
                j.outputs_kept_local.join(", ")
            ));
        }
    }
    s
}

/// `--debug[=pycharm:PORT]` and `--debug-port`, shared by `run` and `exec`.
#[derive(clap::Args, Debug, Clone, Default)]
pub struct DebugArgs {
    /// Start the job's Python under debugpy, waiting for VS Code (or any DAP
    /// client) to attach through a forwarded port; `--debug=pycharm:PORT`
    /// instead lets the job reach PyCharm's debug server on this machine's PORT.
    #[arg(long, value_name = "pycharm:PORT", num_args = 0..=1, require_equals = true,
          default_missing_value = "debugpy", value_parser = parse_debug)]
    debug: Option<bridge_proto::v1::DebugSpec>,
    /// The local port for the debugger to attach to (default 5678 when free,
    /// else any free one).
    #[arg(long, value_name = "PORT", requires = "debug")]
    debug_port: Option<u16>,
}

impl DebugArgs {
    pub fn spec(&self) -> Option<bridge_proto::v1::DebugSpec> {
        let mut d = self.debug?;
        if d.kind() == bridge_proto::v1::debug_spec::Kind::Debugpy
            && let Some(p) = self.debug_port
        {
            d.local_port = p as u32;
        }
        Some(d)
    }
}

fn parse_debug(s: &str) -> Result<bridge_proto::v1::DebugSpec, String> {
    use bridge_proto::v1::{DebugSpec, debug_spec::Kind};
    let spec = |kind: Kind, local_port: u32| DebugSpec {
        kind: kind as i32,
        local_port,
        ..Default::default()
    };
    match s.split_once(':') {
        None if s == "debugpy" || s == "vscode" => Ok(spec(Kind::Debugpy, 0)),
        Some(("pycharm", p)) => match p.parse::<u16>() {
            Ok(p) if p != 0 => Ok(spec(Kind::Pycharm, p as u32)),
            _ => Err(format!(
                "{p:?} is not a port: give the port PyCharm's debug server listens on, e.g. --debug=pycharm:12345"
            )),
        },
        _ if s == "pycharm" => {
            Err("give the port PyCharm's debug server listens on: --debug=pycharm:12345".into())
        }
        _ => Err(format!(
            "unknown debugger {s:?}: use --debug (debugpy, for VS Code) or --debug=pycharm:PORT"
        )),
    }
}

/// The MLflow server of the user's shell (`MLFLOW_TRACKING_URI`), for a job
/// that names none itself ([mlflow] or its [env]): the job logs where the
/// user's local runs do.
pub fn tracking_from_shell(spec: &mut bridge_proto::v1::JobSpec) {
    if !spec.mlflow_tracking_uri.is_empty()
        || spec.env.contains_key(bridge_daemon::mlflow::TRACKING_VAR)
    {
        return;
    }
    if let Ok(uri) = std::env::var(bridge_daemon::mlflow::TRACKING_VAR)
        && (uri.starts_with("http://") || uri.starts_with("https://"))
    {
        spec.mlflow_tracking_uri = uri;
    }
}

/// One line for a job's forward: a URL to open, or where connections go.
pub fn forward_line(f: &bridge_proto::v1::ForwardInfo) -> String {
    use bridge_proto::v1::forward_spec::Direction;
    let spec = f.spec.clone().unwrap_or_default();
    let name = if spec.name.is_empty() {
        "forward".to_string()
    } else {
        spec.name.clone()
    };
    match spec.direction() {
        Direction::Local => format!(
            "{name}: http://127.0.0.1:{} (agent port {})",
            f.local_port, f.remote_port
        ),
        Direction::Reverse if name == bridge_daemon::forwards::MLFLOW_FORWARD => format!(
            "MLflow: the job logs to http://127.0.0.1:{} on this machine (through agent port {})",
            f.local_port, f.remote_port
        ),
        Direction::Reverse => format!(
            "{name}: agent 127.0.0.1:{} → 127.0.0.1:{} here",
            f.remote_port, f.local_port
        ),
    }
}

/// How to attach the debugger: VS Code's attach configuration, with the
/// local repository mapped onto the job's tree on the agent, or PyCharm's
/// settrace call.
fn print_debug(d: &bridge_proto::v1::DebugSpec, repo: &Path, job: &JobInfo) {
    use bridge_proto::v1::debug_spec::Kind;
    match d.kind() {
        Kind::None => {}
        Kind::Debugpy => {
            let config = serde_json::json!({
                "name": format!("bridge: attach to job {}", job.id),
                "type": "debugpy",
                "request": "attach",
                "connect": { "host": "127.0.0.1", "port": d.local_port },
                "pathMappings": [{
                    "localRoot": repo.display().to_string(),
                    "remoteRoot": job.tree_path,
                }],
                "justMyCode": false,
            });
            eprintln!(
                "bridge: the job waits for a debugger on 127.0.0.1:{} (debugpy). VS Code: add this to .vscode/launch.json \"configurations\" and start it:\n{}",
                d.local_port,
                serde_json::to_string_pretty(&config).unwrap_or_default()
            );
        }
        Kind::Pycharm => {
            eprintln!(
                "bridge: PyCharm's debug server (127.0.0.1:{}) is reachable from the job at 127.0.0.1:{} (BRIDGE_DEBUG_PORT); \
                 path mapping: {} = {}. In the job: pydevd_pycharm.settrace(\"127.0.0.1\", port=int(os.environ[\"BRIDGE_DEBUG_PORT\"]), stdoutToServer=True, stderrToServer=True)",
                d.local_port,
                d.port,
                repo.display(),
                job.tree_path
            );
        }
    }
}

/// Submits, then (unless detached) streams the log and waits for the end.
/// Ctrl-C detaches: the job goes on.
pub async fn submit_and_follow(
    cwd: &Path,
    layout: &Layout,
    spec: bridge_proto::v1::JobSpec,
    detach: bool,
) -> anyhow::Result<u8> {
    let mut spec = spec;
    tracking_from_shell(&mut spec);
    let mut c = daemon_or_up(cwd, layout).await?;
    let reply = c
        .submit(bridge_proto::v1::ControlSubmitRequest { spec: Some(spec) })
        .await
        .map_err(|s| anyhow!("{}", s.message()))?
        .into_inner();
    let info = reply.job.unwrap_or_default();
    let wanted = info.spec.as_ref().map_or(0, |s| s.gpus);
    let gpus = if info.gpus.is_empty() && wanted > 0 {
        format!(
            "waiting for {wanted} GPU{}",
            if wanted == 1 { "" } else { "s" }
        )
    } else {
        client::gpus_held(&info.gpus)
    };
    crate::note!(
        "bridge: job {} ({}) on {}, {gpus}: submitted at generation {}; {}",
        info.id,
        info.name,
        client::place(layout),
        info.generation.get(..12).unwrap_or(&info.generation),
        state_name(info.state())
    );
    for n in &reply.notes {
        eprintln!("bridge: warning: {n}");
    }
    for f in &reply.forwards {
        crate::note!("bridge: {}", forward_line(f));
    }
    // As the daemon filled it in (the ports).
    if let Some(d) = info.spec.as_ref().and_then(|s| s.debug) {
        print_debug(&d, &layout.repo, &info);
    }
    if detach {
        println!("{}", info.id);
        crate::note!("bridge: follow it with `bridge logs -f {}`", info.id);
        return Ok(0);
    }
    let id = info.id.clone();
    let run = async {
        follow_log(cwd, layout, &mut c, &id, 0, true, 0, false).await?;
        let outputs = info.spec.as_ref().is_some_and(|s| !s.outputs.is_empty());
        let waiting = wait(cwd, layout, &mut c, &id);
        if !outputs {
            return waiting.await;
        }
        // The job has ended; its outputs may still be on their way.
        tokio::pin!(waiting);
        tokio::select! {
            r = &mut waiting => return r,
            _ = tokio::time::sleep(Duration::from_millis(500)) => {}
        }
        let bar =
            crate::out::progress().then(|| crate::out::spinner("bringing the job's outputs home"));
        if bar.is_none() {
            crate::note!("bridge: bringing the job's outputs home");
        }
        let r = waiting.await;
        if let Some(b) = bar {
            b.finish_and_clear();
        }
        r
    };
    tokio::select! {
        r = run => {
            let j = r?;
            crate::note!("{}", summary(&j));
            if j.exit_code == Some(127) {
                eprintln!("bridge: exit code 127 means the shell did not find the command on the agent");
            }
            Ok(exit_code(&j))
        }
        _ = tokio::signal::ctrl_c() => {
            crate::note!(
                "\nbridge: detached; job {id} keeps running. Reattach with `bridge logs -f {id}`, stop it with `bridge cancel {id}`"
            );
            Ok(130)
        }
    }
}

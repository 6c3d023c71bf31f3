//! `bridge-agent worker`: the pod side of a `placement = "cluster"` job.
//!
//! Delivered into the Kubernetes Job's pod by the head (the job's
//! `cluster-run`), it connects back to the head over the pod network,
//! fetches the job's tree, runs it under its own shim (Python environment,
//! setup, the command, its log with offsets: the same code as on any agent)
//! and sends the log and the declared outputs back while the job runs. A
//! dropped connection is dialed again and the log resumes at the offset the
//! head has: nothing is lost or repeated. It exits with the command's code,
//! so the Kubernetes Job succeeds or fails (and retries) as the job did.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, anyhow, bail};
use serde::{Deserialize, Serialize};
use tokio::io::AsyncReadExt;
use tokio::net::TcpStream;

use super::wire::{self, Entry, EntryKind, Exit, Hello, Kind, Welcome};
use crate::shim::{self, PythonSpec, SetupSpec, ShimSpec};

/// Written by the head into `MOUNT/run/worker.json` with the key.
#[derive(Debug, Serialize, Deserialize)]
pub struct Config {
    /// `ip:port` of the head's listener.
    pub head: String,
    pub pod: String,
}

/// How long the worker keeps dialing a head it lost before it gives up (the
/// job then fails, and Kubernetes' retries decide).
const RECONNECT_FOR: Duration = Duration::from_secs(300);
/// How often the log is read and the outputs are looked at.
const LOG_POLL: Duration = Duration::from_millis(50);
const OUTPUT_POLL: Duration = Duration::from_secs(1);

/// Runs the worker in `dir` (the pod's `MOUNT`); returns the exit code.
pub fn run(dir: &Path) -> i32 {
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("bridge worker: {e}");
            return 2;
        }
    };
    let job_dir = dir.join("job");
    rt.block_on(async {
        let mut term =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(t) => t,
                Err(e) => {
                    eprintln!("bridge worker: {e}");
                    return 2;
                }
            };
        tokio::select! {
            r = Worker::new(dir).and_then_run() => match r {
                Ok(code) => code,
                Err(e) => {
                    eprintln!("bridge worker: {e:#}");
                    2
                }
            },
            // The pod is being deleted (the job was cancelled, the head
            // pod went): the job stops as a cancelled one does, within its
            // grace, and the pod ends at once instead of at the kill.
            _ = term.recv() => {
                stop_shim(&job_dir).await;
                143
            }
        }
    })
}

/// Cancels the job's shim (as the agent does: the cancel file, then SIGTERM)
/// and waits for it to end (its grace bounds that).
async fn stop_shim(job_dir: &Path) {
    let _ = std::fs::write(job_dir.join(shim::CANCEL_FILE), b"");
    let pid = std::fs::read(job_dir.join(shim::STATE_FILE))
        .ok()
        .and_then(|b| serde_json::from_slice::<serde_json::Value>(&b).ok())
        .and_then(|v| v["shim_pid"].as_i64());
    let Some(pid) = pid else { return };
    let pid = nix::unistd::Pid::from_raw(pid as i32);
    let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
    use nix::sys::wait::{WaitPidFlag, WaitStatus, waitpid};
    for _ in 0..600 {
        // The shim is our child: reaped here once it has ended.
        match waitpid(pid, Some(WaitPidFlag::WNOHANG)) {
            Ok(WaitStatus::StillAlive) => {}
            _ => return,
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

struct Worker {
    dir: PathBuf,
    config: anyhow::Result<Config>,
    key: anyhow::Result<String>,
}

/// What a connection left to the next one.
#[derive(Default)]
struct Progress {
    job: Option<wire::Job>,
    shim: Option<Child>,
    /// Outputs sent: path → (size, mtime ns).
    sent: HashMap<String, (u64, i64)>,
}

impl Worker {
    fn new(dir: &Path) -> Worker {
        let run = dir.join("run");
        Worker {
            dir: dir.to_path_buf(),
            config: std::fs::read(run.join("worker.json"))
                .context("cannot read run/worker.json")
                .and_then(|b| serde_json::from_slice(&b).context("bad run/worker.json")),
            key: std::fs::read_to_string(run.join("key"))
                .map(|k| k.trim().to_string())
                .context("cannot read run/key"),
        }
    }

    async fn and_then_run(self) -> anyhow::Result<i32> {
        let config = self.config.as_ref().map_err(|e| anyhow!("{e:#}"))?;
        let key = self.key.as_ref().map_err(|e| anyhow!("{e:#}"))?;
        let job_dir = self.dir.join("job");
        let mut progress = Progress::default();
        let mut lost_since: Option<Instant> = None;
        loop {
            match self.session(config, key, &job_dir, &mut progress).await {
                Ok(code) => return Ok(code),
                Err(e) => {
                    let since = *lost_since.get_or_insert_with(Instant::now);
                    if since.elapsed() > RECONNECT_FOR {
                        return Err(e.context(format!(
                            "the head agent at {} was unreachable for {} s",
                            config.head,
                            RECONNECT_FOR.as_secs()
                        )));
                    }
                    eprintln!("bridge worker: {e:#}; connecting again");
                    tokio::time::sleep(Duration::from_millis(500)).await;
                }
            }
            // A session that got as far as the job resets the clock.
            if progress.shim.is_some() {
                lost_since = None;
            }
        }
    }

    /// One connection: handshake, the tree when it is not here yet, then the
    /// log and outputs until the job has ended and the head has it all.
    async fn session(
        &self,
        config: &Config,
        key: &str,
        job_dir: &Path,
        p: &mut Progress,
    ) -> anyhow::Result<i32> {
        let stream =
            tokio::time::timeout(Duration::from_secs(10), TcpStream::connect(&config.head))
                .await
                .map_err(|_| anyhow!("connecting to the head agent at {} timed out", config.head))?
                .with_context(|| format!("cannot connect to the head agent at {}", config.head))?;
        stream.set_nodelay(true)?;
        let (mut r, mut w) = stream.into_split();
        let hello = Hello {
            key: key.to_string(),
            pod: config.pod.clone(),
            has_job: p.job.is_some(),
        };
        wire::write_json(&mut w, Kind::Hello, &hello).await?;
        let welcome: Welcome = wire::expect(&mut r, Kind::Welcome).await?.json()?;
        // What an earlier connection sent may not have arrived: every output
        // goes again (the log resumes at the head's offset instead).
        p.sent.clear();
        if p.job.is_none() {
            let job = receive_tree(&mut r, &job_dir.join("tree")).await?;
            write_spec(job_dir, &job)?;
            p.job = Some(job);
        }
        let job = p.job.clone().expect("job received");
        if p.shim.is_none() {
            let exe = std::env::current_exe().context("cannot find this executable")?;
            let out = std::fs::File::create(job_dir.join("shim.log"))?;
            p.shim = Some(
                Command::new(exe)
                    .arg("shim")
                    .arg(job_dir)
                    .stdin(Stdio::null())
                    .stdout(out.try_clone()?)
                    .stderr(out)
                    .spawn()
                    .context("cannot start the job's shim")?,
            );
        }
        let log = job_dir.join(shim::LOG_FILE);
        let cwd = cwd_of(job_dir, &job);
        let mut offset = welcome.log_offset;
        let mut next_outputs = Instant::now();
        loop {
            let ended = p.shim.as_mut().expect("started").try_wait()?.is_some();
            // The whole log once the shim has ended (it wrote it all).
            loop {
                let chunks = crate::joblog::read_chunks(&log, offset, wire::MAX_FRAME - 64)?;
                if chunks.is_empty() {
                    break;
                }
                for c in chunks {
                    let mut payload = Vec::with_capacity(9 + c.data.len());
                    payload.push(c.stream);
                    payload.extend_from_slice(&c.next_offset.to_le_bytes());
                    payload.extend_from_slice(&c.data);
                    wire::write(&mut w, Kind::Log, &payload).await?;
                    offset = c.next_offset;
                }
                if !ended {
                    break;
                }
            }
            if ended || Instant::now() >= next_outputs {
                send_outputs(&mut w, &cwd, &job.outputs, &mut p.sent, ended).await?;
                next_outputs = Instant::now() + OUTPUT_POLL;
            }
            if ended {
                let exit = exit_of(job_dir);
                wire::write_json(&mut w, Kind::Exit, &exit).await?;
                wire::expect(&mut r, Kind::Done).await?;
                return Ok(exit.code.unwrap_or(1));
            }
            // A head that closed the connection: find out now, not at the
            // next write.
            let mut probe = [0u8; 1];
            tokio::select! {
                _ = tokio::time::sleep(LOG_POLL) => {}
                n = r.read(&mut probe) => {
                    let _ = n?;
                    bail!("the head agent closed the connection");
                }
            }
        }
    }
}

fn cwd_of(job_dir: &Path, job: &wire::Job) -> PathBuf {
    let tree = job_dir.join("tree");
    let w = job.workdir.trim_matches('/');
    if w.is_empty() || w == "." {
        tree
    } else {
        tree.join(w)
    }
}

/// Receives the tree into `tree` (made afresh), then the job.
async fn receive_tree<R: tokio::io::AsyncRead + Unpin>(
    r: &mut R,
    tree: &Path,
) -> anyhow::Result<wire::Job> {
    if tree.exists() {
        std::fs::remove_dir_all(tree)?;
    }
    std::fs::create_dir_all(tree)?;
    loop {
        let f = wire::read(r)
            .await?
            .ok_or_else(|| anyhow!("the head agent closed the connection during the tree"))?;
        match f.kind {
            Kind::Job => return Ok(f.json()?),
            Kind::Entry => {
                let e: Entry = f.json()?;
                if !wire::safe_relative(&e.path) {
                    bail!("the head sent a path outside the tree: {:?}", e.path);
                }
                let path = tree.join(&e.path);
                match e.kind {
                    EntryKind::Dir => std::fs::create_dir_all(&path)?,
                    EntryKind::Symlink => std::os::unix::fs::symlink(&e.target, &path)?,
                    EntryKind::File => {
                        let mut f = std::fs::File::create(&path)?;
                        copy_data(r, e.size, |b| Ok(std::io::Write::write_all(&mut f, b)?)).await?;
                        use std::os::unix::fs::PermissionsExt;
                        std::fs::set_permissions(
                            &path,
                            std::fs::Permissions::from_mode(e.mode & 0o777),
                        )?;
                    }
                }
            }
            other => bail!("unexpected {other:?} frame in the tree"),
        }
    }
}

/// Reads `size` bytes sent as `Data` frames, handing each frame's bytes to
/// `each` as it arrives (nothing is held whole).
pub async fn copy_data<R: tokio::io::AsyncRead + Unpin>(
    r: &mut R,
    size: u64,
    mut each: impl FnMut(&[u8]) -> anyhow::Result<()>,
) -> anyhow::Result<()> {
    let mut got = 0u64;
    while got < size {
        let d = wire::expect(r, Kind::Data).await?;
        got += d.payload.len() as u64;
        each(&d.payload)?;
    }
    if got != size {
        bail!("{got} bytes where {size} were announced");
    }
    Ok(())
}

/// Sends the `size` bytes of `path` as `Data` frames, read a frame at a
/// time; a file that shrank meanwhile is an error (the connection is made
/// again and the file sent anew).
pub async fn send_file<W: tokio::io::AsyncWrite + Unpin>(
    w: &mut W,
    path: &Path,
    size: u64,
) -> anyhow::Result<()> {
    use tokio::io::AsyncReadExt;
    let mut f = tokio::fs::File::open(path)
        .await
        .with_context(|| format!("cannot read {}", path.display()))?;
    let mut buf = vec![0u8; wire::MAX_FRAME.min(size.max(1) as usize)];
    let mut left = size;
    while left > 0 {
        let want = buf.len().min(left as usize);
        let n = f.read(&mut buf[..want]).await?;
        if n == 0 {
            bail!("{} shrank while it was sent", path.display());
        }
        wire::write(w, Kind::Data, &buf[..n]).await?;
        left -= n as u64;
    }
    Ok(())
}

/// The shim's `spec.json` for the job, with this pod's paths. The GPUs are
/// the pod's (its runtime sets what the container sees).
fn write_spec(job_dir: &Path, job: &wire::Job) -> anyhow::Result<()> {
    let tree = job_dir.join("tree");
    let mut env = job.env.clone();
    for k in [
        "CUDA_VISIBLE_DEVICES",
        "NVIDIA_VISIBLE_DEVICES",
        "CUDA_DEVICE_ORDER",
    ] {
        env.remove(k);
    }
    let cwd = cwd_of(job_dir, job);
    if let Some(d) = job.outputs.iter().find(|o| o.ends_with('/')) {
        env.insert(
            "BRIDGE_OUTPUT_DIR".into(),
            cwd.join(d.trim_end_matches('/')).display().to_string(),
        );
    }
    let spec = ShimSpec {
        job_id: job.job_id.clone(),
        tree: tree.clone(),
        cwd,
        command: job.command.clone(),
        env,
        python: job.python.as_ref().map(|(kind, file)| PythonSpec {
            kind: *kind,
            file: tree.join(file),
        }),
        setup: job.setup.as_ref().map(|(command, inputs)| SetupSpec {
            command: command.clone(),
            inputs: inputs.iter().map(|i| tree.join(i)).collect(),
        }),
        cache_dir: job_dir.join("cache"),
        grace_ms: job.grace_ms,
        live: false,
        debugpy_port: None,
        kernel: None,
        cluster: None,
    };
    std::fs::create_dir_all(&spec.cache_dir)?;
    std::fs::write(
        job_dir.join(shim::SPEC_FILE),
        serde_json::to_vec_pretty(&spec)?,
    )?;
    Ok(())
}

/// Sends the declared outputs that are new or changed since they were last
/// sent and have settled (all of them at the end).
async fn send_outputs<W: tokio::io::AsyncWrite + Unpin>(
    w: &mut W,
    cwd: &Path,
    declared: &[String],
    sent: &mut HashMap<String, (u64, i64)>,
    complete: bool,
) -> anyhow::Result<()> {
    use std::os::unix::fs::MetadataExt;
    let settled_before =
        bridge_proto::index::now_ns() - crate::jobs::outputs::SETTLE.as_nanos() as i64;
    for (rel, _) in crate::jobs::outputs::walk_declared(cwd, declared) {
        let path = cwd.join(&rel);
        let Ok(meta) = std::fs::symlink_metadata(&path) else {
            continue;
        };
        if !meta.is_file() {
            continue;
        }
        let mtime = meta.mtime() * 1_000_000_000 + meta.mtime_nsec();
        let now = (meta.len(), mtime);
        if sent.get(&rel) == Some(&now) || (!complete && mtime > settled_before) {
            continue;
        }
        let entry = Entry {
            path: rel.clone(),
            kind: EntryKind::File,
            mode: meta.mode(),
            size: meta.len(),
            target: String::new(),
        };
        wire::write_json(w, Kind::Output, &entry).await?;
        send_file(w, &path, meta.len()).await?;
        sent.insert(rel, now);
    }
    Ok(())
}

/// The job's end as its shim recorded it.
fn exit_of(job_dir: &Path) -> Exit {
    match std::fs::read(job_dir.join(shim::EXIT_FILE))
        .ok()
        .and_then(|b| serde_json::from_slice::<shim::ShimExit>(&b).ok())
    {
        Some(e) => Exit {
            code: e.code.or(if e.reason.is_empty() { Some(0) } else { None }),
            reason: e.reason,
        },
        None => Exit {
            code: None,
            reason: "the job's shim ended without recording how".into(),
        },
    }
}

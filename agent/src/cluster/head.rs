//! `cluster-run`: the head's side of one `placement = "cluster"` job (see
//! the module above).

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::{Component, Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, anyhow, bail};
use bridge_proto::k8s::{HOPELESS, MOUNT, exec, secret_script, upload_script, wait_then};
use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, DeleteParams, ListParams, PostParams, PropagationPolicy};
use tokio::net::{TcpListener, TcpStream};

use super::ClusterSpec;
use super::wire::{self, Entry, EntryKind, Exit, Hello, Kind, Welcome};
use super::worker::{Config, copy_data, send_file};
use crate::joblog::{LogWriter, STDOUT, SYSTEM};
use crate::shim::{self, ShimSpec};

/// The container of a job's pod.
const CONTAINER: &str = "job";
/// How often the Job and its pods are looked at.
const POLL: Duration = Duration::from_millis(500);
/// Deliveries into one pod before the job fails.
const DELIVERY_TRIES: u32 = 5;
/// Pull failures get this long (a registry may be slow or briefly down).
const PULL_PATIENCE: Duration = Duration::from_secs(120);

pub fn run(job_dir: &Path) -> i32 {
    let log = match LogWriter::open(&job_dir.join(shim::LOG_FILE)) {
        Ok(l) => Arc::new(l),
        Err(e) => {
            eprintln!("bridge: cannot open the job log: {e}");
            return 2;
        }
    };
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            say(&log, &format!("cannot start: {e}"));
            return 2;
        }
    };
    match rt.block_on(run_async(job_dir, log.clone())) {
        Ok(code) => code,
        Err(e) => {
            say(&log, &format!("{e:#}"));
            1
        }
    }
}

/// A line of bridge's own in the job's log.
fn say(log: &LogWriter, line: &str) {
    let _ = log.write(SYSTEM, format!("bridge: {line}\n").as_bytes());
}

/// What the worker connections share with the main loop.
struct Shared {
    key: String,
    tree: PathBuf,
    cwd: PathBuf,
    job: wire::Job,
    outputs: Vec<String>,
    log: Arc<LogWriter>,
    /// Per pod: how much of its log is here.
    offsets: Mutex<HashMap<String, u64>>,
    /// Per pod: its command's exit, once reported.
    exits: Mutex<HashMap<String, Exit>>,
}

async fn run_async(job_dir: &Path, log: Arc<LogWriter>) -> anyhow::Result<i32> {
    let spec: ShimSpec = serde_json::from_slice(
        &std::fs::read(job_dir.join(shim::SPEC_FILE)).context("cannot read spec.json")?,
    )
    .context("bad spec.json")?;
    let cluster = spec
        .cluster
        .clone()
        .ok_or_else(|| anyhow!("spec.json has no cluster placement"))?;
    let head = std::env::var("BRIDGE_POD_NAME").context("BRIDGE_POD_NAME is not set")?;
    let head_ip = std::env::var("BRIDGE_POD_IP").context("BRIDGE_POD_IP is not set")?;
    let config =
        kube::Config::incluster().context("cannot read the pod's Kubernetes credentials")?;
    let ns = config.default_namespace.clone();
    let client =
        bridge_proto::k8s::client_for(&config).context("cannot make a Kubernetes client")?;
    let pods: Api<Pod> = Api::namespaced(client.clone(), &ns);
    let jobs: Api<Job> = Api::namespaced(client, &ns);
    let head_pod = pods
        .get(&head)
        .await
        .map_err(|e| anyhow!("cannot read this agent's pod {head}: {}", api_message(&e)))?;

    let listener = TcpListener::bind(("0.0.0.0", 0))
        .await
        .context("cannot listen for the job's pod")?;
    let port = listener.local_addr()?.port();
    let mut raw = [0u8; 32];
    getrandom::fill(&mut raw).map_err(|e| anyhow!("no randomness for the job's key: {e}"))?;
    let key = hex::encode(raw);

    let mut env = spec.env.clone();
    let _mlflow_proxy = proxy_loopback_urls(&mut env, &head_ip).await?;
    let rel = |p: &Path| -> String {
        p.strip_prefix(&spec.tree)
            .unwrap_or(p)
            .to_string_lossy()
            .into_owned()
    };
    let shared = Arc::new(Shared {
        key: key.clone(),
        tree: spec.tree.clone(),
        cwd: spec.cwd.clone(),
        job: wire::Job {
            job_id: spec.job_id.clone(),
            workdir: rel(&spec.cwd),
            command: spec.command.clone(),
            env,
            python: spec.python.as_ref().map(|p| (p.kind, rel(&p.file))),
            setup: spec
                .setup
                .as_ref()
                .map(|s| (s.command.clone(), s.inputs.iter().map(|i| rel(i)).collect())),
            outputs: cluster.outputs.clone(),
            grace_ms: spec.grace_ms,
        },
        outputs: cluster.outputs.clone(),
        log: log.clone(),
        offsets: Mutex::default(),
        exits: Mutex::default(),
    });
    let serving = tokio::spawn(serve(listener, shared.clone()));

    let name = job_name(&head, &spec.job_id);
    let manifest = job_manifest(&name, &head_pod, &spec, &cluster)?;
    create_job(&jobs, &name, &manifest).await?;
    say(
        &log,
        &format!(
            "running as Kubernetes Job {name} in namespace {ns} (image {}, {} GPU(s))",
            cluster.image, cluster.gpus
        ),
    );

    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    let exe = std::env::current_exe().context("cannot find this executable")?;
    let (hash, _) = bridge_proto::binary_hash(&exe)?;
    let mut seen: HashSet<String> = HashSet::new();
    let mut delivered: HashSet<String> = HashSet::new();
    let mut failures: HashMap<String, u32> = HashMap::new();
    let mut ended: HashSet<String> = HashSet::new();
    let mut said: HashSet<String> = HashSet::new();
    let started = tokio::time::Instant::now();
    let code = 'watch: loop {
        tokio::select! {
            _ = term.recv() => {
                delete_job(&jobs, &name).await;
                say(&log, &format!("cancelled: Kubernetes Job {name} deleted"));
                return Ok(143);
            }
            _ = tokio::time::sleep(POLL) => {}
        }
        let list = pods
            .list(&ListParams::default().labels(&format!("job-name={name}")))
            .await;
        let mut list = match list {
            Ok(l) => l.items,
            Err(e) => {
                tracing::warn!(error = %e, "cannot list the job's pods");
                continue;
            }
        };
        list.sort_by_key(|p| p.metadata.creation_timestamp.clone());
        for pod in &list {
            let pname = pod.metadata.name.clone().unwrap_or_default();
            if seen.insert(pname.clone()) && seen.len() > 1 {
                say(
                    &log,
                    &format!(
                        "attempt {} of {}: pod {pname}",
                        seen.len(),
                        cluster.retries + 1
                    ),
                );
            }
            let status = pod.status.clone().unwrap_or_default();
            let phase = status.phase.clone().unwrap_or_default();
            if phase == "Pending" {
                if let Some(c) = status
                    .conditions
                    .iter()
                    .flatten()
                    .find(|c| c.type_ == "PodScheduled" && c.status == "False")
                {
                    let m = c.message.clone().unwrap_or_default();
                    if said.insert(m.clone()) {
                        say(
                            &log,
                            &format!("waiting for Kubernetes to place pod {pname}: {m}"),
                        );
                    }
                }
                let waiting = status
                    .container_statuses
                    .iter()
                    .flatten()
                    .filter_map(|c| c.state.as_ref()?.waiting.clone())
                    .next();
                if let Some(w) = waiting {
                    let reason = w.reason.unwrap_or_default();
                    let pulling = reason == "ErrImagePull" || reason == "ImagePullBackOff";
                    if (HOPELESS.contains(&reason.as_str()) && !pulling)
                        || (pulling && started.elapsed() > PULL_PATIENCE)
                    {
                        say(
                            &log,
                            &format!(
                                "pod {pname} cannot start: {reason}: {} (image {:?}; check its name and that the cluster can pull it)",
                                w.message.unwrap_or_default(),
                                cluster.image
                            ),
                        );
                        delete_job(&jobs, &name).await;
                        break 'watch 1;
                    }
                }
            }
            if phase == "Running" && !delivered.contains(&pname) {
                let config = Config {
                    head: format!("{head_ip}:{port}"),
                    pod: pname.clone(),
                };
                match deliver(&pods, &pname, &exe, &hash, &key, &config).await {
                    Ok(()) => {
                        delivered.insert(pname.clone());
                    }
                    Err(e) => {
                        // Tried again at the next poll, a few times (the
                        // API server may be restarting).
                        let n = failures.entry(pname.clone()).or_insert(0);
                        *n += 1;
                        if *n >= DELIVERY_TRIES {
                            say(&log, &format!("cannot start the job in pod {pname}: {e:#}"));
                            delete_job(&jobs, &name).await;
                            break 'watch 1;
                        }
                        tracing::warn!(pod = %pname, error = %format!("{e:#}"), "delivery failed; trying again");
                    }
                }
            }
            if (phase == "Failed" || phase == "Succeeded") && ended.insert(pname.clone()) {
                let reported = shared
                    .exits
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .contains_key(&pname);
                if !reported {
                    say(&log, &format!("pod {pname} ended: {}", pod_end(pod)));
                }
            }
        }
        match jobs.get(&name).await {
            Ok(j) => {
                let st = j.status.unwrap_or_default();
                let done = |t: &str| {
                    st.conditions
                        .iter()
                        .flatten()
                        .any(|c| c.type_ == t && c.status == "True")
                };
                if done("Complete") {
                    break 0;
                }
                if done("Failed") {
                    let last = list
                        .last()
                        .and_then(|p| p.metadata.name.clone())
                        .and_then(|p| {
                            shared
                                .exits
                                .lock()
                                .unwrap_or_else(|e| e.into_inner())
                                .get(&p)
                                .and_then(|e| e.code)
                        });
                    break last.filter(|&c| c != 0).unwrap_or(1);
                }
            }
            Err(e) if matches!(&e, kube::Error::Api(s) if s.code == 404) => {
                say(&log, &format!("Kubernetes Job {name} was deleted"));
                break 1;
            }
            Err(e) => tracing::warn!(error = %e, "cannot read the Kubernetes Job"),
        }
    };
    serving.abort();
    Ok(code)
}

/// The Kubernetes Job's name: the head pod's plus the job id, a DNS label
/// (at most 63 characters, since it becomes the pods' `job-name` label).
fn job_name(head: &str, job_id: &str) -> String {
    let id = job_id.to_ascii_lowercase();
    let keep = 63 - 1 - id.len().min(40);
    let base = head[..head.len().min(keep)].trim_end_matches('-');
    format!("{base}-{id}")
}

fn job_manifest(
    name: &str,
    head: &Pod,
    spec: &ShimSpec,
    cluster: &ClusterSpec,
) -> anyhow::Result<Job> {
    let head_spec = head.spec.clone().unwrap_or_default();
    let mut labels: BTreeMap<String, String> = head
        .metadata
        .labels
        .clone()
        .unwrap_or_default()
        .into_iter()
        .filter(|(k, _)| k.starts_with("bridge/"))
        .collect();
    labels.insert(
        "bridge/head".into(),
        head.metadata.name.clone().unwrap_or_default(),
    );
    labels.insert("bridge/job".into(), spec.job_id.clone());
    let mut limits = serde_json::Map::new();
    if cluster.gpus > 0 {
        limits.insert("nvidia.com/gpu".into(), cluster.gpus.to_string().into());
    }
    let head_container = head_spec.containers.first().cloned().unwrap_or_default();
    let mut container = serde_json::json!({
        "name": CONTAINER,
        "image": cluster.image,
        "command": ["/bin/sh", "-c", wait_then(&format!("exec {MOUNT}/bin/bridge-agent worker --dir {MOUNT}"))],
        "workingDir": MOUNT,
        "resources": { "limits": limits },
        "volumeMounts": [{ "name": "bridge", "mountPath": MOUNT }],
    });
    if Some(&cluster.image) == head_container.image.as_ref()
        && let Some(p) = &head_container.image_pull_policy
    {
        container["imagePullPolicy"] = p.clone().into();
    }
    let job = serde_json::json!({
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {
            "name": name,
            "labels": labels,
            "annotations": { "bridge/job-name": cluster.name },
            "ownerReferences": [{
                "apiVersion": "v1",
                "kind": "Pod",
                "name": head.metadata.name,
                "uid": head.metadata.uid,
            }],
        },
        "spec": {
            "backoffLimit": cluster.retries,
            "template": {
                "metadata": { "labels": labels },
                "spec": {
                    "restartPolicy": "Never",
                    "automountServiceAccountToken": false,
                    "enableServiceLinks": false,
                    "terminationGracePeriodSeconds": (spec.grace_ms / 1000).max(1) + 5,
                    "containers": [container],
                    "volumes": [{ "name": "bridge", "emptyDir": {} }],
                    "nodeSelector": head_spec.node_selector,
                    "tolerations": head_spec.tolerations,
                    "imagePullSecrets": head_spec.image_pull_secrets,
                },
            },
        },
    });
    serde_json::from_value(job).context("cannot build the Kubernetes Job's spec")
}

async fn create_job(jobs: &Api<Job>, name: &str, manifest: &Job) -> anyhow::Result<()> {
    for _ in 0..2 {
        match jobs.create(&PostParams::default(), manifest).await {
            Ok(_) => return Ok(()),
            // A Job of a previous head with the same numbering: replace it.
            Err(kube::Error::Api(s)) if s.code == 409 => {
                delete_job(jobs, name).await;
                for _ in 0..100 {
                    if jobs.get_opt(name).await.ok().flatten().is_none() {
                        break;
                    }
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
            }
            Err(e) => bail!(
                "cannot create the Kubernetes Job {name}: {}",
                api_message(&e)
            ),
        }
    }
    bail!("cannot create the Kubernetes Job {name}: one of that name is still being deleted")
}

async fn delete_job(jobs: &Api<Job>, name: &str) {
    let dp = DeleteParams {
        propagation_policy: Some(PropagationPolicy::Background),
        grace_period_seconds: Some(0),
        ..Default::default()
    };
    if let Err(e) = jobs.delete(name, &dp).await {
        tracing::warn!(job = name, error = %e, "cannot delete the Kubernetes Job");
    }
}

fn api_message(e: &kube::Error) -> String {
    match e {
        kube::Error::Api(s) if s.code == 403 => format!(
            "{} (the agent's service account lacks the right; `bridge up --provider k8s` grants it when the user may)",
            s.message
        ),
        kube::Error::Api(s) => s.message.clone(),
        other => other.to_string(),
    }
}

/// Why a pod ended, as Kubernetes says it.
fn pod_end(pod: &Pod) -> String {
    let st = pod.status.clone().unwrap_or_default();
    let mut why = Vec::new();
    if let Some(r) = st.reason {
        why.push(r);
    }
    if let Some(m) = st.message {
        why.push(m);
    }
    for c in st.container_statuses.iter().flatten() {
        if let Some(t) = c.state.as_ref().and_then(|s| s.terminated.as_ref()) {
            why.push(format!(
                "exit code {}{}",
                t.exit_code,
                t.reason
                    .as_ref()
                    .map(|r| format!(" ({r})"))
                    .unwrap_or_default()
            ));
        }
    }
    if why.is_empty() {
        st.phase.unwrap_or_default()
    } else {
        why.join(": ")
    }
}

/// Copies this agent into the pod, then its key and where to connect, and
/// starts it.
async fn deliver(
    pods: &Api<Pod>,
    pod: &str,
    exe: &Path,
    hash: &str,
    key: &str,
    config: &Config,
) -> anyhow::Result<()> {
    let len = std::fs::metadata(exe)?.len();
    let mut file = tokio::fs::File::open(exe).await?;
    let out = exec(
        pods,
        pod,
        CONTAINER,
        &upload_script(len, hash),
        Some((&mut file, &|_| {})),
    )
    .await
    .map_err(|e| anyhow!(e))?;
    if !out.ok {
        bail!("{} {}", out.status, out.stderr.trim());
    }
    let json = serde_json::to_string(config)?;
    let script = format!(
        "{}; printf '%s' '{json}' > {MOUNT}/run/worker.json; touch {MOUNT}/run/start",
        secret_script("key", key.len())
    );
    let mut input = std::io::Cursor::new(key.as_bytes().to_vec());
    let out = exec(pods, pod, CONTAINER, &script, Some((&mut input, &|_| {})))
        .await
        .map_err(|e| anyhow!(e))?;
    if !out.ok {
        bail!("{} {}", out.status, out.stderr.trim());
    }
    Ok(())
}

async fn serve(listener: TcpListener, shared: Arc<Shared>) {
    loop {
        let Ok((stream, peer)) = listener.accept().await else {
            continue;
        };
        let shared = shared.clone();
        tokio::spawn(async move {
            if let Err(e) = worker_session(stream, &shared).await {
                tracing::info!(%peer, error = %format!("{e:#}"), "a worker's connection ended");
            }
        });
    }
}

/// One connection of a worker: the key, the tree when it asks, then its log,
/// outputs and exit.
async fn worker_session(stream: TcpStream, shared: &Shared) -> anyhow::Result<()> {
    stream.set_nodelay(true)?;
    let (mut r, w) = stream.into_split();
    let mut w = tokio::io::BufWriter::with_capacity(1 << 20, w);
    let hello: Hello =
        tokio::time::timeout(Duration::from_secs(10), wire::expect(&mut r, Kind::Hello))
            .await
            .map_err(|_| anyhow!("no hello"))??
            .json()?;
    if !constant_time_eq(hello.key.as_bytes(), shared.key.as_bytes()) {
        bail!("a worker with the wrong key");
    }
    let pod = hello.pod;
    let offset = *shared
        .offsets
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .entry(pod.clone())
        .or_default();
    wire::write_json(&mut w, Kind::Welcome, &Welcome { log_offset: offset }).await?;
    if !hello.has_job {
        send_tree(&mut w, &shared.tree).await?;
        wire::write_json(&mut w, Kind::Job, &shared.job).await?;
    }
    use tokio::io::AsyncWriteExt;
    w.flush().await?;
    loop {
        let Some(f) = wire::read(&mut r).await? else {
            return Ok(());
        };
        match f.kind {
            Kind::Log => {
                if f.payload.len() < 9 {
                    bail!("a short log frame");
                }
                let stream = f.payload[0];
                if !(STDOUT..=SYSTEM).contains(&stream) {
                    bail!("a log frame of stream {stream}");
                }
                let next = u64::from_le_bytes(f.payload[1..9].try_into().expect("8 bytes"));
                shared.log.write(stream, &f.payload[9..])?;
                shared
                    .offsets
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .insert(pod.clone(), next);
            }
            Kind::Output => {
                let e: Entry = f.json()?;
                if let Err(why) = receive_output(&mut r, &shared.cwd, &shared.outputs, &e).await? {
                    let _ = shared.log.write(
                        SYSTEM,
                        format!(
                            "bridge: output {:?} from pod {pod} refused: {why}\n",
                            e.path
                        )
                        .as_bytes(),
                    );
                }
            }
            Kind::Exit => {
                let e: Exit = f.json()?;
                if !e.reason.is_empty() {
                    let _ = shared.log.write(
                        SYSTEM,
                        format!("bridge: in pod {pod}: {}\n", e.reason).as_bytes(),
                    );
                }
                shared
                    .exits
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .insert(pod.clone(), e);
                wire::write(&mut w, Kind::Done, &[]).await?;
                w.flush().await?;
            }
            other => bail!("unexpected {other:?} frame from a worker"),
        }
    }
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// Sends the snapshot's tree: directories, files and symlinks, as they are.
async fn send_tree<W: tokio::io::AsyncWrite + Unpin>(w: &mut W, tree: &Path) -> anyhow::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    let mut stack = vec![PathBuf::new()];
    while let Some(dir) = stack.pop() {
        let mut entries: Vec<_> = std::fs::read_dir(tree.join(&dir))?.flatten().collect();
        entries.sort_by_key(|e| e.file_name());
        for e in entries {
            let rel = dir.join(e.file_name());
            let Some(path) = rel.to_str().map(str::to_string) else {
                continue;
            };
            let meta = std::fs::symlink_metadata(e.path())?;
            let mut entry = Entry {
                path,
                kind: EntryKind::File,
                mode: meta.permissions().mode(),
                size: 0,
                target: String::new(),
            };
            if meta.is_dir() {
                entry.kind = EntryKind::Dir;
                wire::write_json(w, Kind::Entry, &entry).await?;
                stack.push(rel);
            } else if meta.file_type().is_symlink() {
                entry.kind = EntryKind::Symlink;
                entry.target = std::fs::read_link(e.path())?.to_string_lossy().into_owned();
                wire::write_json(w, Kind::Entry, &entry).await?;
            } else if meta.is_file() {
                entry.size = meta.len();
                wire::write_json(w, Kind::Entry, &entry).await?;
                send_file(w, &e.path(), meta.len()).await?;
            }
        }
    }
    Ok(())
}

/// Where an output a worker sends goes in the job's snapshot (where the
/// daemon fetches outputs from): only under a declared output, never
/// through a symlink. Returns the path and its temporary file, created anew
/// (`O_EXCL | O_NOFOLLOW`), for the bytes to be written to.
fn open_output(
    cwd: &Path,
    declared: &[String],
    e: &Entry,
) -> Result<(PathBuf, PathBuf, std::fs::File), String> {
    if e.kind != EntryKind::File || !wire::safe_relative(&e.path) {
        return Err("not a relative file path inside the job's directory".into());
    }
    let inside = declared.iter().any(|d| {
        let d = d.trim_end_matches('/');
        e.path == d || e.path.starts_with(&format!("{d}/"))
    });
    if !inside {
        return Err("not under a declared output".into());
    }
    let path = cwd.join(&e.path);
    let mut at = cwd.to_path_buf();
    let parent = Path::new(&e.path).parent().unwrap_or(Path::new(""));
    for c in parent.components() {
        let Component::Normal(c) = c else {
            return Err("a bad path component".into());
        };
        at.push(c);
        match std::fs::symlink_metadata(&at) {
            Ok(m) if m.file_type().is_symlink() => {
                return Err(format!("{} is a symlink", at.display()));
            }
            Ok(m) if !m.is_dir() => return Err(format!("{} is not a directory", at.display())),
            Ok(_) => {}
            Err(_) => std::fs::create_dir(&at).map_err(|e| e.to_string())?,
        }
    }
    if std::fs::symlink_metadata(&path).is_ok_and(|m| m.file_type().is_symlink()) {
        return Err("it is a symlink here".into());
    }
    let tmp = path.with_file_name(format!(
        ".{}.bridge-tmp",
        path.file_name().and_then(|n| n.to_str()).unwrap_or("out")
    ));
    let _ = std::fs::remove_file(&tmp);
    use std::os::unix::fs::OpenOptionsExt;
    let file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .custom_flags(nix::libc::O_NOFOLLOW)
        .open(&tmp)
        .map_err(|e| e.to_string())?;
    Ok((path, tmp, file))
}

/// Puts a written output's temporary file in place, with its mode.
fn finish_output(path: &Path, tmp: &Path, mode: u32) -> Result<(), String> {
    use std::os::unix::fs::PermissionsExt;
    let _ = std::fs::set_permissions(tmp, std::fs::Permissions::from_mode(mode & 0o777));
    std::fs::rename(tmp, path).map_err(|e| {
        let _ = std::fs::remove_file(tmp);
        e.to_string()
    })
}

/// Receives one output's bytes (as `Data` frames) into the snapshot, a
/// frame at a time: a checkpoint never sits in memory whole. A refused
/// output's bytes are read and dropped; the reason is returned.
async fn receive_output<R: tokio::io::AsyncRead + Unpin>(
    r: &mut R,
    cwd: &Path,
    declared: &[String],
    e: &Entry,
) -> anyhow::Result<Result<(), String>> {
    let mut target = open_output(cwd, declared, e);
    let mut sink = match &mut target {
        Ok((_, _, f)) => Some(f),
        Err(_) => None,
    };
    let mut failed = None;
    copy_data(r, e.size, |bytes| {
        if let Some(f) = sink.as_mut()
            && let Err(err) = std::io::Write::write_all(f, bytes)
        {
            failed = Some(err.to_string());
            sink = None;
        }
        Ok(())
    })
    .await?;
    Ok(match target {
        Err(why) => Err(why),
        Ok((_, tmp, _)) if failed.is_some() => {
            let _ = std::fs::remove_file(&tmp);
            Err(failed.unwrap_or_default())
        }
        Ok((path, tmp, _)) => finish_output(&path, &tmp, e.mode),
    })
}

/// A job's environment may name a server on the head's loopback (the
/// MLflow forward the daemon made: `http://127.0.0.1:PORT`), which the
/// job's pod cannot reach: relay each such port from the pod network and
/// point the variable there.
async fn proxy_loopback_urls(
    env: &mut BTreeMap<String, String>,
    head_ip: &str,
) -> anyhow::Result<Vec<tokio::task::JoinHandle<()>>> {
    let mut relays = Vec::new();
    for (k, v) in env.iter_mut() {
        if k != "MLFLOW_TRACKING_URI" {
            continue;
        }
        let Some(rest) = v
            .strip_prefix("http://127.0.0.1:")
            .or_else(|| v.strip_prefix("http://localhost:"))
        else {
            continue;
        };
        let port: String = rest.chars().take_while(|c| c.is_ascii_digit()).collect();
        let Ok(port) = port.parse::<u16>() else {
            continue;
        };
        let tail = &rest[port.to_string().len()..];
        let listener = TcpListener::bind(("0.0.0.0", 0)).await?;
        let relay_port = listener.local_addr()?.port();
        relays.push(tokio::spawn(async move {
            while let Ok((mut inbound, _)) = listener.accept().await {
                tokio::spawn(async move {
                    if let Ok(mut out) = TcpStream::connect(("127.0.0.1", port)).await {
                        let _ = tokio::io::copy_bidirectional(&mut inbound, &mut out).await;
                    }
                });
            }
        }));
        *v = format!("http://{head_ip}:{relay_port}{tail}");
    }
    Ok(relays)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn job_names_are_dns_labels() {
        let n = job_name(&format!("bridge-{}", "x".repeat(70)), "J12");
        assert!(n.len() <= 63 && n.ends_with("-j12"), "{n}");
        assert_eq!(job_name("bridge-repo-abc", "j3"), "bridge-repo-abc-j3");
    }

    #[test]
    fn outputs_land_only_under_declared_paths_and_never_through_symlinks() {
        let dir = tempfile::tempdir().unwrap();
        let cwd = dir.path();
        std::fs::create_dir(cwd.join("runs")).unwrap();
        std::os::unix::fs::symlink("/tmp", cwd.join("evil")).unwrap();
        let declared = vec![
            "runs/".to_string(),
            "evil/".to_string(),
            "m.json".to_string(),
        ];
        let file = |p: &str| Entry {
            path: p.into(),
            kind: EntryKind::File,
            mode: 0o644,
            size: 2,
            target: String::new(),
        };
        let place = |cwd: &Path, declared: &[String], e: &Entry, bytes: &[u8]| {
            let (path, tmp, mut f) = open_output(cwd, declared, e)?;
            std::io::Write::write_all(&mut f, bytes).unwrap();
            finish_output(&path, &tmp, e.mode)
        };
        place(cwd, &declared, &file("runs/a/b.txt"), b"hi").unwrap();
        assert_eq!(std::fs::read(cwd.join("runs/a/b.txt")).unwrap(), b"hi");
        place(cwd, &declared, &file("m.json"), b"{}").unwrap();
        for bad in [
            "src/x.py",
            "../x",
            "/etc/passwd",
            "runs/../x",
            "evil/x",
            "runsx/y",
        ] {
            assert!(place(cwd, &declared, &file(bad), b"no").is_err(), "{bad}");
        }
        assert!(!Path::new("/tmp/x").exists() || std::fs::read("/tmp/x").unwrap() != b"no");
    }
}

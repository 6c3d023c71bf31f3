//! The pod's lifecycle behind [`Machine`]: create it (and its volume claim),
//! wait until it runs while surfacing what Kubernetes says (unschedulable,
//! image pull failures, refusals), deliver the agent, reuse a running pod,
//! replace an ended one, delete it.

use std::time::{Duration, Instant};

use anyhow::{Context, anyhow};
use k8s_openapi::api::core::v1::{PersistentVolumeClaim, Pod};
use kube::api::{Api, DeleteParams, PostParams};

use super::{
    CONTAINER, LABEL_MANAGED, LABEL_REPO, Launch, MOUNT, agent_hash, api_error, claim_name, exec,
    not_found, pod_manifest, pod_name, repo_hash,
};
use crate::provider::machine::{Machine, Ui, human_duration};
use crate::provider::{BoxFuture, ProviderSpec};
use crate::repo::Layout;

/// Bounds on the waits of `bridge up` and `bridge down`.
const RUNNING_LIMIT: Duration = Duration::from_secs(600);
const AGENT_LIMIT: Duration = Duration::from_secs(30);
const DELETE_LIMIT: Duration = Duration::from_secs(120);
const POLL: Duration = Duration::from_millis(100);

use bridge_proto::k8s::HOPELESS;

/// Where a pod stands, for people and for decisions.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Phase {
    /// Not placed yet: why (the scheduler's message), if it said.
    Pending {
        unschedulable: Option<String>,
        waiting: Option<(String, String)>,
    },
    Running,
    /// Ended: the agent stopped when idle (Succeeded), or the pod failed
    /// (evicted, killed, the agent exited with an error).
    Ended {
        succeeded: bool,
        reason: String,
    },
    /// Being deleted.
    Terminating,
}

impl Phase {
    pub fn of(pod: &Pod) -> Phase {
        if pod.metadata.deletion_timestamp.is_some() {
            return Phase::Terminating;
        }
        let Some(status) = &pod.status else {
            return Phase::Pending {
                unschedulable: None,
                waiting: None,
            };
        };
        let container = status
            .container_statuses
            .iter()
            .flatten()
            .find(|c| c.name == CONTAINER);
        let terminated = container
            .and_then(|c| c.state.as_ref())
            .and_then(|s| s.terminated.as_ref());
        match status.phase.as_deref() {
            Some("Running") if terminated.is_none() => Phase::Running,
            Some("Succeeded") | Some("Failed") | Some("Running") => {
                let mut reason = Vec::new();
                if let Some(r) = &status.reason {
                    reason.push(r.clone());
                }
                if let Some(m) = &status.message {
                    reason.push(m.trim().to_string());
                }
                if let Some(t) = terminated {
                    reason.push(format!(
                        "the agent exited with code {}{}",
                        t.exit_code,
                        t.reason
                            .as_ref()
                            .map(|r| format!(" ({r})"))
                            .unwrap_or_default()
                    ));
                    if let Some(m) = t.message.as_ref().filter(|m| !m.trim().is_empty()) {
                        reason.push(m.trim().to_string());
                    }
                }
                Phase::Ended {
                    succeeded: status.phase.as_deref() == Some("Succeeded"),
                    reason: reason.join(": "),
                }
            }
            _ => {
                let unschedulable = status
                    .conditions
                    .iter()
                    .flatten()
                    .find(|c| {
                        c.type_ == "PodScheduled"
                            && c.status == "False"
                            && c.reason.as_deref() == Some("Unschedulable")
                    })
                    .map(|c| c.message.clone().unwrap_or_default());
                let waiting = container
                    .and_then(|c| c.state.as_ref())
                    .and_then(|s| s.waiting.as_ref())
                    .map(|w| {
                        (
                            w.reason.clone().unwrap_or_default(),
                            w.message.clone().unwrap_or_default(),
                        )
                    });
                Phase::Pending {
                    unschedulable,
                    waiting,
                }
            }
        }
    }

    pub fn describe(&self) -> String {
        match self {
            Phase::Pending {
                unschedulable: Some(m),
                ..
            } => format!("Pending, unschedulable: {m}"),
            Phase::Pending {
                waiting: Some((r, _)),
                ..
            } if !r.is_empty() => format!("Pending ({r})"),
            Phase::Pending { .. } => "Pending".into(),
            Phase::Running => "Running".into(),
            Phase::Ended {
                succeeded: true,
                reason,
            } => format!(
                "Succeeded (ended{})",
                if reason.is_empty() {
                    String::new()
                } else {
                    format!(": {reason}")
                }
            ),
            Phase::Ended {
                succeeded: false,
                reason,
            } => format!("Failed: {reason}"),
            Phase::Terminating => "Terminating".into(),
        }
    }
}

/// The pod of one repository.
pub struct K8sMachine {
    layout: Layout,
    spec: ProviderSpec,
    /// The agent binary to copy into the pod.
    agent_bin: std::path::PathBuf,
    /// The pod the last `prepare` created.
    created: Option<String>,
}

impl K8sMachine {
    /// `None` unless `spec` is Kubernetes.
    pub fn new(
        spec: &ProviderSpec,
        layout: &Layout,
        agent_bin: std::path::PathBuf,
    ) -> Option<K8sMachine> {
        matches!(spec, ProviderSpec::K8s { .. }).then(|| K8sMachine {
            layout: layout.clone(),
            spec: spec.clone(),
            agent_bin,
            created: None,
        })
    }

    fn parts(&mut self) -> (&mut Launch, &mut Option<String>) {
        match &mut self.spec {
            ProviderSpec::K8s { launch, pod } => (launch, pod),
            _ => unreachable!("a K8sMachine holds a Kubernetes spec"),
        }
    }

    fn launch(&self) -> &Launch {
        match &self.spec {
            ProviderSpec::K8s { launch, .. } => launch,
            _ => unreachable!("a K8sMachine holds a Kubernetes spec"),
        }
    }

    fn save(&self) -> anyhow::Result<()> {
        self.spec
            .save(&self.layout.provider)
            .with_context(|| format!("cannot write {}", self.layout.provider.display()))
    }

    async fn api(&mut self) -> anyhow::Result<(kube::Client, String)> {
        let (client, default_ns) = super::client(self.launch().context.as_deref())
            .await
            .map_err(|e| anyhow!(e))?;
        let (launch, _) = self.parts();
        if launch.namespace.is_empty() {
            launch.namespace = default_ns;
        }
        let ns = launch.namespace.clone();
        Ok((client, ns))
    }

    async fn prepare(&mut self, ui: &dyn Ui) -> anyhow::Result<()> {
        self.created = None;
        crate::repo::ensure_token(&self.layout.token).with_context(|| {
            format!(
                "cannot write the agent token {}",
                self.layout.token.display()
            )
        })?;
        let bin = self.agent_bin.clone();
        let (hash, len) = agent_hash(&bin).map_err(|e| anyhow!(e))?;
        let (client, ns) = self.api().await?;
        let pods: Api<Pod> = Api::namespaced(client.clone(), &ns);
        let name = pod_name(&self.layout.repo);

        let existing = pods
            .get_opt(&name)
            .await
            .map_err(|e| anyhow!(api_error("read pods", &ns, &e)))?;
        let mut replaced = false;
        if let Some(p) = existing {
            replaced = true;
            let ours = p
                .metadata
                .labels
                .as_ref()
                .and_then(|l| l.get(LABEL_REPO))
                .is_some_and(|r| *r == repo_hash(&self.layout.repo));
            if !ours {
                return Err(anyhow!(
                    "pod {ns}/{name} exists and is not this repository's (label {LABEL_REPO}); delete it or pick another --namespace"
                ));
            }
            match Phase::of(&p) {
                Phase::Running if let Some(what) = differs(&p, self.launch()) => {
                    ui.note(&format!(
                        "bridge: pod {ns}/{name} was made with {what}; replacing it"
                    ));
                    delete_and_wait(ui, &pods, &name).await?;
                }
                Phase::Running => {
                    let have = exec(&pods, &name, CONTAINER, &format!("cat {MOUNT}/run/agent.hash 2>/dev/null; test -e {MOUNT}/run/start && echo started"), None)
                        .await
                        .map_err(|e| anyhow!(e))?;
                    let mut lines = have.stdout.lines();
                    let running = lines.next().unwrap_or_default().trim().to_string();
                    let started = lines.next() == Some("started");
                    if started && running == hash {
                        ui.note(&format!("bridge: reusing pod {ns}/{name}"));
                        self.parts().1.replace(name);
                        return self.save();
                    } else if started {
                        ui.note(&format!(
                            "bridge: pod {ns}/{name} runs another agent build; replacing it"
                        ));
                        delete_and_wait(ui, &pods, &name).await?;
                    } else {
                        // A pod an interrupted `up` made: deliver the agent now.
                        self.parts().1.replace(name.clone());
                        self.save()?;
                        return self
                            .deliver(ui, &pods, &name, &bin, &hash, len, false)
                            .await;
                    }
                }
                Phase::Pending { .. } => {
                    ui.note(&format!(
                        "bridge: pod {ns}/{name} from an earlier `bridge up` never started; replacing it"
                    ));
                    delete_and_wait(ui, &pods, &name).await?;
                }
                Phase::Terminating => {
                    delete_and_wait(ui, &pods, &name).await?;
                }
                ended @ Phase::Ended { .. } => {
                    ui.note(&format!(
                        "bridge: the previous pod {ns}/{name} is {}; starting a new one",
                        ended.describe()
                    ));
                    delete_and_wait(ui, &pods, &name).await?;
                }
            }
        }
        if self.launch().volume.is_some() {
            self.ensure_claim(ui, &client, &ns, &name).await?;
        } else if replaced {
            ui.note(
                "bridge: the new pod starts empty (no --volume): the first sync sends the whole repository",
            );
        }
        let account = match ensure_account(&client, &ns, &name, &self.layout.repo).await {
            Ok(()) => Some(name.as_str()),
            Err(e) => {
                ui.note(&format!(
                    "bridge: jobs with placement = \"cluster\" will not run from this pod: {e}"
                ));
                None
            }
        };
        let manifest = pod_manifest(&name, self.launch(), &self.layout.repo, account)
            .map_err(|e| anyhow!(e))?;
        // A service account made just now has no token yet on clusters that
        // make token Secrets (before 1.24), and the admission plugin refuses
        // its pods until it has: try again for a while.
        let mut tries = 0;
        loop {
            match pods.create(&PostParams::default(), &manifest).await {
                Ok(_) => break,
                Err(kube::Error::Api(s))
                    if s.message.contains("No API token found for service account")
                        && tries < 100 =>
                {
                    tries += 1;
                    tokio::time::sleep(POLL).await;
                }
                Err(e) => return Err(anyhow!(api_error("create a pod", &ns, &e))),
            }
        }
        self.created = Some(name.clone());
        self.parts().1.replace(name.clone());
        let ready = async {
            self.save()?;
            wait_running(ui, &pods, &name, self.launch()).await?;
            self.deliver(ui, &pods, &name, &bin, &hash, len, true).await
        };
        if let Err(e) = ready.await {
            ui.warn(&format!("bridge: deleting pod {ns}/{name}: {e:#}"));
            let _ = delete_and_wait(ui, &pods, &name).await;
            self.created = None;
            *self.parts().1 = None;
            let _ = self.save();
            return Err(e);
        }
        ui.note(&format!(
            "bridge: pod {ns}/{name} runs the agent{}",
            if self.launch().gpus > 0 {
                format!(" with {} GPU(s)", self.launch().gpus)
            } else {
                String::new()
            }
        ));
        Ok(())
    }

    /// The volume claim of `--volume`, made once and kept across pods.
    async fn ensure_claim(
        &self,
        ui: &dyn Ui,
        client: &kube::Client,
        ns: &str,
        pod: &str,
    ) -> anyhow::Result<()> {
        let claims: Api<PersistentVolumeClaim> = Api::namespaced(client.clone(), ns);
        let name = claim_name(pod);
        if claims
            .get_opt(&name)
            .await
            .map_err(|e| anyhow!(api_error("read volume claims", ns, &e)))?
            .is_some()
        {
            ui.note(&format!(
                "bridge: the agent's files are on volume claim {ns}/{name} (kept from before)"
            ));
            return Ok(());
        }
        let size = self.launch().volume.clone().unwrap_or_default();
        let claim: PersistentVolumeClaim = serde_json::from_value(serde_json::json!({
            "apiVersion": "v1",
            "kind": "PersistentVolumeClaim",
            "metadata": {
                "name": name,
                "labels": { LABEL_MANAGED: "true", LABEL_REPO: repo_hash(&self.layout.repo) },
            },
            "spec": {
                "accessModes": ["ReadWriteOnce"],
                "resources": { "requests": { "storage": size } },
            },
        }))?;
        claims
            .create(&PostParams::default(), &claim)
            .await
            .map_err(|e| anyhow!(api_error("create a volume claim", ns, &e)))?;
        ui.note(&format!(
            "bridge: made volume claim {ns}/{name} ({size}) for the agent's files"
        ));
        Ok(())
    }

    /// Copies the agent (unless this build is there) and the token into the
    /// pod, then lets the container start it.
    #[allow(clippy::too_many_arguments)]
    async fn deliver(
        &self,
        ui: &dyn Ui,
        pods: &Api<Pod>,
        name: &str,
        bin: &std::path::Path,
        hash: &str,
        len: u64,
        fresh: bool,
    ) -> anyhow::Result<()> {
        let there = if fresh {
            String::new()
        } else {
            exec(
                pods,
                name,
                CONTAINER,
                &format!("cat {MOUNT}/run/agent.hash 2>/dev/null"),
                None,
            )
            .await
            .map_err(|e| anyhow!(e))?
            .stdout
        };
        if there.trim() != hash {
            let mut file = tokio::fs::File::open(bin)
                .await
                .with_context(|| format!("cannot read the agent binary {}", bin.display()))?;
            let mib = len as f64 / (1024.0 * 1024.0);
            let step = std::sync::Mutex::new(ui.step());
            step.lock()
                .unwrap_or_else(|p| p.into_inner())
                .say(format!("copying the agent into pod {name} ({mib:.1} MiB)"));
            let progress = |sent: u64| {
                if sent % (8 << 20) < 256 * 1024 {
                    step.lock().unwrap_or_else(|p| p.into_inner()).say(format!(
                        "copying the agent into pod {name} ({:.1} of {mib:.1} MiB)",
                        sent as f64 / (1024.0 * 1024.0)
                    ));
                }
            };
            let script = bridge_proto::k8s::upload_script(len, hash);
            let out = exec(pods, name, CONTAINER, &script, Some((&mut file, &progress)))
                .await
                .map_err(|e| anyhow!(e))?;
            drop(step);
            if !out.ok {
                return Err(anyhow!(
                    "cannot copy the agent into pod {name}: {} {}",
                    out.status,
                    out.stderr.trim()
                ));
            }
        }
        // The token, the start marker, and the wait until the agent listens
        // (its port in /proc/net/tcp), in one exec: every exec is a round
        // trip through the API server and the kubelet.
        let token = crate::repo::ensure_token(&self.layout.token)?;
        let port = format!(":{:04X} 00000000:0000 0A", super::AGENT_PORT);
        let polls = AGENT_LIMIT.as_millis() / 50;
        let script = format!(
            "{}; touch {MOUNT}/run/start; i=0; \
             while ! grep -q '{port}' /proc/net/tcp 2>/dev/null; do \
               i=$((i+1)); [ $i -le {polls} ] || {{ echo 'the agent did not listen' >&2; exit 3; }}; sleep 0.05; \
             done",
            bridge_proto::k8s::secret_script("token", token.len())
        );
        let mut step = ui.step();
        step.say(format!("starting the agent in pod {name}"));
        let mut input = std::io::Cursor::new(token.into_bytes());
        let out = exec(pods, name, CONTAINER, &script, Some((&mut input, &|_| {}))).await;
        drop(step);
        match out {
            Ok(o) if o.ok => Ok(()),
            other => {
                let why = match other {
                    Ok(o) => format!("{} {}", o.status, o.stderr.trim()),
                    Err(e) => e,
                };
                let phase = pods
                    .get(name)
                    .await
                    .map(|p| Phase::of(&p).describe())
                    .unwrap_or_default();
                let tail = pod_log_tail(pods, name).await;
                Err(anyhow!(
                    "the agent did not start in pod {name} ({}): {why}{tail}",
                    if phase.is_empty() { "?" } else { &phase }
                ))
            }
        }
    }

    async fn undo(&mut self, ui: &dyn Ui) {
        let Some(name) = self.created.take() else {
            return;
        };
        if let Ok((client, ns)) = self.api().await {
            let pods: Api<Pod> = Api::namespaced(client, &ns);
            ui.warn(&format!(
                "bridge: deleting pod {ns}/{name}, made by this bridge up"
            ));
            if let Err(e) = delete_and_wait(ui, &pods, &name).await {
                ui.warn(&format!(
                    "bridge: could not delete pod {ns}/{name}: {e:#}; `kubectl delete pod -n {ns} {name}`"
                ));
            }
        }
        *self.parts().1 = None;
    }

    async fn down(&mut self, ui: &dyn Ui, purge: bool) -> anyhow::Result<()> {
        let name = pod_name(&self.layout.repo);
        if self.parts().1.is_none() && !(purge && self.launch().volume.is_some()) {
            ui.out(&format!("no pod is up for {}", self.layout.repo.display()));
            return Ok(());
        }
        let (client, ns) = self.api().await?;
        let pods: Api<Pod> = Api::namespaced(client.clone(), &ns);
        let existed = delete_and_wait(ui, &pods, &name).await?;
        delete_account(&client, &ns, &name).await;
        *self.parts().1 = None;
        self.save()?;
        let claim = claim_name(&name);
        let kept = match (&self.launch().volume, purge) {
            (Some(_), false) => format!(
                "; kept volume claim {ns}/{claim} for the next pod (`bridge down --purge` deletes it)"
            ),
            (Some(_), true) => {
                let claims: Api<PersistentVolumeClaim> = Api::namespaced(client, &ns);
                match claims.delete(&claim, &DeleteParams::default()).await {
                    Ok(_) => format!("; deleted volume claim {ns}/{claim}"),
                    Err(e) if not_found(&e) => String::new(),
                    Err(e) => {
                        return Err(anyhow!(api_error("delete the volume claim", &ns, &e)));
                    }
                }
            }
            (None, _) => String::new(),
        };
        if existed {
            ui.out(&format!("deleted pod {ns}/{name}{kept}"));
        } else {
            ui.out(&format!("pod {ns}/{name} was already gone{kept}"));
        }
        Ok(())
    }

    async fn status(&self) -> anyhow::Result<serde_json::Value> {
        let launch = self.launch();
        let ProviderSpec::K8s { pod, .. } = &self.spec else {
            unreachable!("a K8sMachine holds a Kubernetes spec")
        };
        let Some(name) = pod else {
            return Ok(serde_json::json!({ "namespace": launch.namespace, "pod": null }));
        };
        let (client, _) = super::client(launch.context.as_deref())
            .await
            .map_err(|e| anyhow!(e))?;
        let pods: Api<Pod> = Api::namespaced(client, &launch.namespace);
        let p = pods
            .get_opt(name)
            .await
            .map_err(|e| anyhow!(api_error("read the pod", &launch.namespace, &e)))?;
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs() as i64)
            .unwrap_or(0);
        let (state, node, uptime_s) = match &p {
            None => (
                "gone (deleted, or its node was lost)".to_string(),
                None,
                None,
            ),
            Some(p) => {
                let phase = Phase::of(p);
                let started = p
                    .status
                    .as_ref()
                    .and_then(|s| s.start_time.as_ref())
                    .map(|t| t.0.as_second());
                let up = (phase == Phase::Running)
                    .then_some(started)
                    .flatten()
                    .map(|s| (now - s).max(0) as u64);
                (
                    phase.describe(),
                    p.spec.as_ref().and_then(|s| s.node_name.clone()),
                    up,
                )
            }
        };
        Ok(serde_json::json!({
            "namespace": launch.namespace,
            "pod": name,
            "state": state,
            "node": node,
            "image": launch.image,
            "gpus": launch.gpus,
            "uptime_s": uptime_s,
            "volume": launch.volume,
            "idle_timeout_s": launch.idle_timeout_s,
        }))
    }
}

impl Machine for K8sMachine {
    fn noun(&self) -> &'static str {
        "pod"
    }

    fn spec(&self) -> &ProviderSpec {
        &self.spec
    }

    fn prepare<'a>(&'a mut self, ui: &'a dyn Ui, _yes: bool) -> BoxFuture<'a, anyhow::Result<()>> {
        Box::pin(self.prepare(ui))
    }

    fn undo<'a>(&'a mut self, ui: &'a dyn Ui) -> BoxFuture<'a, ()> {
        Box::pin(self.undo(ui))
    }

    fn down<'a>(&'a mut self, ui: &'a dyn Ui, purge: bool) -> BoxFuture<'a, anyhow::Result<()>> {
        Box::pin(self.down(ui, purge))
    }

    fn status(&self) -> BoxFuture<'_, anyhow::Result<serde_json::Value>> {
        Box::pin(self.status())
    }

    fn status_line(&self, v: &serde_json::Value) -> String {
        status_line(v)
    }

    fn gone(&self, v: &serde_json::Value) -> bool {
        v["state"].as_str().is_some_and(|s| {
            s.starts_with("gone") || s.starts_with("Succeeded") || s.starts_with("Failed")
        })
    }
}

/// What the running pod was made with that this launch asks otherwise
/// (image, GPUs, CPU, memory), for people; `None` when it fits.
fn differs(pod: &Pod, launch: &Launch) -> Option<String> {
    let c = pod
        .spec
        .as_ref()?
        .containers
        .iter()
        .find(|c| c.name == CONTAINER)?;
    let limit = |key: &str| {
        c.resources
            .as_ref()
            .and_then(|r| r.limits.as_ref())
            .and_then(|l| l.get(key))
            .map(|q| q.0.clone())
    };
    let gpus = limit("nvidia.com/gpu").unwrap_or_else(|| "0".into());
    let mut what = Vec::new();
    if c.image.as_deref() != Some(launch.image.as_str()) {
        what.push(format!("image {}", c.image.as_deref().unwrap_or("?")));
    }
    if gpus != launch.gpus.to_string() {
        what.push(format!("{gpus} GPU(s)"));
    }
    if limit("cpu") != launch.cpu {
        what.push(format!(
            "cpu {}",
            limit("cpu").unwrap_or_else(|| "unset".into())
        ));
    }
    if limit("memory") != launch.memory {
        what.push(format!(
            "memory {}",
            limit("memory").unwrap_or_else(|| "unset".into())
        ));
    }
    (!what.is_empty()).then(|| what.join(", "))
}

/// `bridge-x-1a2b in ml: Running on node-3, 1 GPU, up 5m`
pub fn status_line(v: &serde_json::Value) -> String {
    if let Some(e) = v["error"].as_str() {
        return format!("unknown: {e}");
    }
    let ns = v["namespace"].as_str().unwrap_or("?");
    let Some(pod) = v["pod"].as_str() else {
        return format!("no pod (namespace {ns}); `bridge up` makes one");
    };
    let mut line = format!("{ns}/{pod} {}", v["state"].as_str().unwrap_or("?"));
    if let Some(n) = v["node"].as_str() {
        line += &format!(" on {n}");
    }
    if let Some(g) = v["gpus"].as_u64().filter(|g| *g > 0) {
        line += &format!(", {g} GPU{}", if g == 1 { "" } else { "s" });
    }
    if let Some(s) = v["uptime_s"].as_u64() {
        line += &format!(", up {}", human_duration(Duration::from_secs(s)));
    }
    line
}

/// Waits until the pod runs; fails at once on what waiting cannot fix (an
/// image that cannot be pulled, a container that cannot be made), and when
/// the scheduler has said "unschedulable" for longer than the launch allows.
async fn wait_running(
    ui: &dyn Ui,
    pods: &Api<Pod>,
    name: &str,
    launch: &Launch,
) -> anyhow::Result<()> {
    let mut step = ui.step();
    let started = Instant::now();
    let mut unschedulable_since: Option<Instant> = None;
    loop {
        let p = pods
            .get(name)
            .await
            .map_err(|e| anyhow!(api_error("read the pod", &launch.namespace, &e)))?;
        let phase = Phase::of(&p);
        step.say(format!("waiting for pod {name}: {}", phase.describe()));
        match &phase {
            Phase::Running => return Ok(()),
            Phase::Ended { .. } | Phase::Terminating => {
                let tail = pod_log_tail(pods, name).await;
                return Err(anyhow!("pod {name} {}{tail}", phase.describe()));
            }
            Phase::Pending {
                waiting: Some((reason, message)),
                ..
            } if HOPELESS.contains(&reason.as_str()) => {
                return Err(anyhow!(
                    "pod {name} cannot start: {reason}: {} (image {:?}; check its name and that the cluster can pull it)",
                    message.trim(),
                    launch.image
                ));
            }
            Phase::Pending {
                unschedulable: Some(why),
                ..
            } => {
                let since = *unschedulable_since.get_or_insert_with(Instant::now);
                if since.elapsed() >= Duration::from_secs(launch.schedule_timeout_s) {
                    return Err(anyhow!(
                        "pod {name} cannot be scheduled: {} (asked for {} GPU(s){}{}; waited {}s — ask for less, or pass --schedule-timeout to wait for a node)",
                        why.trim(),
                        launch.gpus,
                        launch
                            .cpu
                            .as_ref()
                            .map(|c| format!(", {c} CPU"))
                            .unwrap_or_default(),
                        launch
                            .memory
                            .as_ref()
                            .map(|m| format!(", {m} memory"))
                            .unwrap_or_default(),
                        launch.schedule_timeout_s
                    ));
                }
            }
            Phase::Pending { .. } => unschedulable_since = None,
        }
        if started.elapsed() > RUNNING_LIMIT {
            return Err(anyhow!(
                "pod {name} is still {} after {}s",
                phase.describe(),
                RUNNING_LIMIT.as_secs()
            ));
        }
        tokio::time::sleep(POLL).await;
    }
}

/// Deletes the pod and waits until it is gone; `false`: it was not there.
/// What the head pod's agent may do in its namespace, for
/// `placement = "cluster"`: run Jobs and reach into their pods (to deliver
/// itself), nothing else.
fn account_rules() -> serde_json::Value {
    serde_json::json!([
        { "apiGroups": ["batch"], "resources": ["jobs"],
          "verbs": ["create", "get", "list", "watch", "delete"] },
        { "apiGroups": [""], "resources": ["pods"], "verbs": ["get", "list", "watch"] },
        { "apiGroups": [""], "resources": ["pods/exec"], "verbs": ["create", "get"] },
    ])
}

/// The pod's service account (named as the pod), with a Role of
/// [`account_rules`] bound to it; kept when they exist. Fails when the user
/// may not create them (RBAC): the pod then runs without a token.
async fn ensure_account(
    client: &kube::Client,
    ns: &str,
    name: &str,
    repo: &std::path::Path,
) -> Result<(), String> {
    use k8s_openapi::api::core::v1::ServiceAccount;
    use k8s_openapi::api::rbac::v1::{Role, RoleBinding};
    let metadata = serde_json::json!({
        "name": name,
        "labels": { LABEL_MANAGED: "true", LABEL_REPO: super::repo_hash(repo) },
    });
    let account: ServiceAccount =
        serde_json::from_value(serde_json::json!({ "metadata": metadata }))
            .map_err(|e| e.to_string())?;
    let role: Role = serde_json::from_value(serde_json::json!({
        "metadata": metadata,
        "rules": account_rules(),
    }))
    .map_err(|e| e.to_string())?;
    let binding: RoleBinding = serde_json::from_value(serde_json::json!({
        "metadata": metadata,
        "roleRef": { "apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": name },
        "subjects": [{ "kind": "ServiceAccount", "name": name, "namespace": ns }],
    }))
    .map_err(|e| e.to_string())?;
    async fn create<K>(api: Api<K>, obj: &K, what: &str, ns: &str) -> Result<(), String>
    where
        K: kube::Resource
            + Clone
            + serde::de::DeserializeOwned
            + serde::Serialize
            + std::fmt::Debug,
    {
        match api.create(&PostParams::default(), obj).await {
            Ok(_) => Ok(()),
            Err(kube::Error::Api(s)) if s.code == 409 => Ok(()),
            Err(e) => Err(api_error(what, ns, &e)),
        }
    }
    create(
        Api::namespaced(client.clone(), ns),
        &account,
        "create a service account",
        ns,
    )
    .await?;
    create(
        Api::namespaced(client.clone(), ns),
        &role,
        "create a role",
        ns,
    )
    .await?;
    create(
        Api::namespaced(client.clone(), ns),
        &binding,
        "create a role binding",
        ns,
    )
    .await
}

/// Deletes what [`ensure_account`] made (best effort: they hold no data).
async fn delete_account(client: &kube::Client, ns: &str, name: &str) {
    use k8s_openapi::api::core::v1::ServiceAccount;
    use k8s_openapi::api::rbac::v1::{Role, RoleBinding};
    let dp = DeleteParams::default();
    let _ = Api::<RoleBinding>::namespaced(client.clone(), ns)
        .delete(name, &dp)
        .await;
    let _ = Api::<Role>::namespaced(client.clone(), ns)
        .delete(name, &dp)
        .await;
    let _ = Api::<ServiceAccount>::namespaced(client.clone(), ns)
        .delete(name, &dp)
        .await;
}

async fn delete_and_wait(ui: &dyn Ui, pods: &Api<Pod>, name: &str) -> anyhow::Result<bool> {
    match pods.delete(name, &DeleteParams::default()).await {
        Ok(_) => {}
        Err(e) if not_found(&e) => return Ok(false),
        Err(e) => return Err(anyhow!(api_error("delete the pod", "", &e))),
    }
    let mut step = ui.step();
    step.say(format!("deleting pod {name}"));
    let started = Instant::now();
    loop {
        match pods.get_opt(name).await {
            Ok(None) => return Ok(true),
            Ok(Some(_)) => {}
            Err(e) => return Err(anyhow!(api_error("read the pod", "", &e))),
        }
        if started.elapsed() > DELETE_LIMIT {
            return Err(anyhow!(
                "pod {name} was still there {}s after its deletion",
                DELETE_LIMIT.as_secs()
            ));
        }
        tokio::time::sleep(POLL).await;
    }
}

/// `"; its last output: …"` (the container's last lines), or nothing.
async fn pod_log_tail(pods: &Api<Pod>, name: &str) -> String {
    let params = kube::api::LogParams {
        container: Some(CONTAINER.into()),
        tail_lines: Some(5),
        ..Default::default()
    };
    match pods.logs(name, &params).await {
        Ok(text) if !text.trim().is_empty() => {
            format!("; its last output: {}", text.trim().replace('\n', " | "))
        }
        _ => String::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pod(json: serde_json::Value) -> Pod {
        serde_json::from_value(json).unwrap()
    }

    #[test]
    fn phases_say_what_kubernetes_said() {
        let unsched = pod(serde_json::json!({
            "metadata": {"name": "p"},
            "status": {"phase": "Pending", "conditions": [{
                "type": "PodScheduled", "status": "False", "reason": "Unschedulable",
                "message": "0/1 nodes are available: 1 Insufficient nvidia.com/gpu."}]}
        }));
        assert_eq!(
            Phase::of(&unsched).describe(),
            "Pending, unschedulable: 0/1 nodes are available: 1 Insufficient nvidia.com/gpu."
        );
        let pull = pod(serde_json::json!({
            "metadata": {"name": "p"},
            "status": {"phase": "Pending", "containerStatuses": [{
                "name": "agent", "image": "x", "imageID": "", "ready": false, "restartCount": 0,
                "state": {"waiting": {"reason": "ErrImageNeverPull", "message": "not present"}}}]}
        }));
        assert!(
            matches!(Phase::of(&pull), Phase::Pending { waiting: Some((r, _)), .. } if r == "ErrImageNeverPull")
        );
        let evicted = pod(serde_json::json!({
            "metadata": {"name": "p"},
            "status": {"phase": "Failed", "reason": "Evicted", "message": "The node was low on resource: memory."}
        }));
        assert_eq!(
            Phase::of(&evicted).describe(),
            "Failed: Evicted: The node was low on resource: memory."
        );
        let idle = pod(serde_json::json!({
            "metadata": {"name": "p"},
            "status": {"phase": "Succeeded", "containerStatuses": [{
                "name": "agent", "image": "x", "imageID": "", "ready": false, "restartCount": 0,
                "state": {"terminated": {"exitCode": 0, "reason": "Completed"}}}]}
        }));
        assert!(Phase::of(&idle).describe().starts_with("Succeeded"));
    }

    #[test]
    fn a_pod_made_otherwise_is_told_apart() {
        let launch = Launch {
            context: None,
            namespace: "ml".into(),
            image: "img:1".into(),
            gpus: 1,
            cpu: None,
            memory: Some("4Gi".into()),
            node_selector: Default::default(),
            tolerations: Vec::new(),
            volume: None,
            pull: None,
            idle_timeout_s: 60,
            schedule_timeout_s: 60,
        };
        let pod =
            super::super::pod_manifest("p", &launch, std::path::Path::new("/r"), None).unwrap();
        assert_eq!(differs(&pod, &launch), None);
        let more = Launch {
            gpus: 2,
            image: "img:2".into(),
            ..launch.clone()
        };
        assert_eq!(
            differs(&pod, &more).as_deref(),
            Some("image img:1, 1 GPU(s)")
        );
    }

    #[test]
    fn status_lines() {
        let v = serde_json::json!({"namespace": "ml", "pod": "bridge-x", "state": "Running",
            "node": "n1", "gpus": 1, "uptime_s": 65});
        assert_eq!(
            status_line(&v),
            "ml/bridge-x Running on n1, 1 GPU, up 1m 05s"
        );
        let v = serde_json::json!({"namespace": "ml", "pod": null});
        assert!(status_line(&v).contains("`bridge up` makes one"));
    }
}

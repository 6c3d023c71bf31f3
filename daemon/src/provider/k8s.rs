//! The Kubernetes provider: the agent runs in one pod per repository, from
//! the user's image, with the GPUs Kubernetes gives it; the daemon reaches it
//! through the API server's port-forward, gRPC over that stream like any
//! other transport.
//!
//! No image carries the agent: the pod's container waits (a POSIX `sh` loop)
//! until `bridge up` has copied the static `bridge-agent` and the
//! repository's token into an `emptyDir` at [`MOUNT`] over `exec` (as
//! `kubectl cp` does), then runs it. The agent's idle shutdown ends the
//! container, so the pod completes and its GPUs go back to the cluster;
//! `bridge down` deletes it.
//!
//! # Layout
//! - this module: the pod's spec, the client, `exec`, and the daemon's
//!   [`K8sProvider`].
//! - [`lifecycle`]: what `bridge up`, `down` and `status` do with the pod.

pub mod lifecycle;

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::core::v1::Pod;
use kube::api::Api;
use serde::{Deserialize, Serialize};
use tonic::transport::Channel;

use super::{BoxFuture, Provider, ProviderError};

pub use bridge_proto::k8s::{CONTAINER, Input, MOUNT, Output, client_for, exec};

/// The agent's port inside the pod (on the pod's loopback only).
pub const AGENT_PORT: u16 = 7431;
/// `--image`'s default: Python, which the jobs need.
pub const DEFAULT_IMAGE: &str = "python:3.11-slim";
/// The default `--idle-timeout`.
pub const DEFAULT_IDLE_TIMEOUT: Duration = Duration::from_secs(30 * 60);
/// Labels on everything bridge creates.
pub const LABEL_MANAGED: &str = "bridge/managed";
pub const LABEL_REPO: &str = "bridge/repo";
pub const LABEL_OWNER: &str = "bridge/owner";
/// The repository's path, in full (label values cannot hold it).
pub const ANNOTATION_REPO: &str = "bridge/repo-path";

/// How to make the pod: the flags of the `bridge up` that chose Kubernetes,
/// kept so that a later `bridge up` makes the same again.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Launch {
    /// `--context`; else the kubeconfig's current one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub context: Option<String>,
    /// `--namespace`; else the context's, else `default` (resolved by the
    /// first `bridge up`).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub namespace: String,
    pub image: String,
    /// `nvidia.com/gpu` requested.
    pub gpus: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpu: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory: Option<String>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub node_selector: BTreeMap<String, String>,
    /// `KEY[=VALUE]:EFFECT` or `KEY[=VALUE]` (any effect).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tolerations: Vec<String>,
    /// `--volume SIZE`: a claim of that size holds the agent's root, so a
    /// new pod starts warm.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub volume: Option<String>,
    /// `--pull`: Always, IfNotPresent or Never (Kubernetes' default when
    /// absent).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pull: Option<String>,
    pub idle_timeout_s: u64,
    /// How long a pod may stay unschedulable before `bridge up` gives up (a
    /// cluster autoscaler may be adding a node meanwhile).
    pub schedule_timeout_s: u64,
}

/// A Kubernetes quantity (`500m`, `2`, `16Gi`): digits, an optional
/// fraction, an optional suffix; checked before anything is sent.
pub fn check_quantity(flag: &str, q: &str) -> Result<(), String> {
    const SUFFIXES: [&str; 14] = [
        "", "m", "k", "M", "G", "T", "P", "E", "Ki", "Mi", "Gi", "Ti", "Pi", "Ei",
    ];
    let digits = q.trim_end_matches(|c: char| c.is_ascii_alphabetic());
    let suffix = &q[digits.len()..];
    let number_ok = !digits.is_empty()
        && digits.chars().all(|c| c.is_ascii_digit() || c == '.')
        && digits.matches('.').count() <= 1
        && digits.chars().any(|c| c.is_ascii_digit());
    if number_ok && SUFFIXES.contains(&suffix) {
        Ok(())
    } else {
        Err(format!(
            "{flag} {q:?} is not a Kubernetes quantity (e.g. 500m, 4, 16Gi)"
        ))
    }
}

/// Parses `--toleration KEY[=VALUE][:EFFECT]`.
pub fn toleration(t: &str) -> Result<serde_json::Value, String> {
    let (kv, effect) = match t.rsplit_once(':') {
        Some((kv, e)) => (kv, Some(e)),
        None => (t, None),
    };
    if let Some(e) = effect
        && !["NoSchedule", "PreferNoSchedule", "NoExecute"].contains(&e)
    {
        return Err(format!(
            "--toleration {t:?}: the effect must be NoSchedule, PreferNoSchedule or NoExecute"
        ));
    }
    let (key, value) = match kv.split_once('=') {
        Some((k, v)) => (k, Some(v)),
        None => (kv, None),
    };
    if key.is_empty() {
        return Err(format!(
            "--toleration {t:?}: give KEY[=VALUE][:EFFECT], e.g. nvidia.com/gpu:NoSchedule"
        ));
    }
    let mut v = serde_json::json!({ "key": key });
    match value {
        Some(val) => {
            v["operator"] = "Equal".into();
            v["value"] = val.into();
        }
        None => v["operator"] = "Exists".into(),
    }
    if let Some(e) = effect {
        v["effect"] = e.into();
    }
    Ok(v)
}

/// The repository's pod: `bridge-<directory>-<hash of its path>`, a valid
/// DNS label (lower case, at most 63 characters).
pub fn pod_name(repo: &Path) -> String {
    let dir: String = repo
        .file_name()
        .map(|n| n.to_string_lossy().to_lowercase())
        .unwrap_or_default()
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '-' })
        .collect();
    let dir = dir.trim_matches('-');
    let dir: String = dir.chars().take(40).collect();
    let dir = dir.trim_end_matches('-');
    let hash = repo_hash(repo);
    if dir.is_empty() {
        format!("bridge-{hash}")
    } else {
        format!("bridge-{dir}-{hash}")
    }
}

/// 10 hex digits of the repository path's hash (its label).
pub fn repo_hash(repo: &Path) -> String {
    blake3::hash(repo.as_os_str().as_encoded_bytes()).to_hex()[..10].to_string()
}

/// `user@host` as a label value (at most 63 of `[A-Za-z0-9._-]`).
pub fn owner_label() -> String {
    let v: String = super::machine::owner()
        .replace('@', "_at_")
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || "._-".contains(c) {
                c
            } else {
                '-'
            }
        })
        .take(63)
        .collect();
    v.trim_matches(|c: char| !c.is_ascii_alphanumeric())
        .to_string()
}

/// The claim that holds the agent's root with `--volume`.
pub fn claim_name(pod: &str) -> String {
    format!("{pod}-data")
}

/// What the container runs: wait for `bridge up` to deliver the agent and
/// its token, then become the agent. Its idle command ends it (`kill` of
/// its parent, the agent), so the pod completes and frees its GPUs.
fn entrypoint(idle_timeout_s: u64) -> String {
    bridge_proto::k8s::wait_then(&format!(
        "mkdir -p {MOUNT}/agent\nexec {MOUNT}/bin/bridge-agent serve --root {MOUNT}/agent --listen tcp:127.0.0.1:{AGENT_PORT} --token-file {MOUNT}/run/token --idle-timeout {idle_timeout_s} --idle-command 'kill -TERM $PPID'"
    ))
}

/// The repository's pod as the API takes it.
/// `account`: the service account `bridge up` made for the pod (see
/// [`lifecycle`]'s `ensure_account`), whose token lets its agent run
/// `placement = "cluster"` jobs; `None`: no token in the pod.
pub fn pod_manifest(
    name: &str,
    launch: &Launch,
    repo: &Path,
    account: Option<&str>,
) -> Result<Pod, String> {
    let mut limits = serde_json::Map::new();
    let mut requests = serde_json::Map::new();
    if launch.gpus > 0 {
        limits.insert("nvidia.com/gpu".into(), launch.gpus.to_string().into());
    }
    for (key, value) in [("cpu", &launch.cpu), ("memory", &launch.memory)] {
        if let Some(v) = value {
            requests.insert(key.into(), v.clone().into());
            limits.insert(key.into(), v.clone().into());
        }
    }
    let tolerations = launch
        .tolerations
        .iter()
        .map(|t| toleration(t))
        .collect::<Result<Vec<_>, _>>()?;
    let mut mounts = vec![serde_json::json!({ "name": "bridge", "mountPath": MOUNT })];
    let mut volumes = vec![serde_json::json!({ "name": "bridge", "emptyDir": {} })];
    if launch.volume.is_some() {
        mounts.push(serde_json::json!({ "name": "data", "mountPath": format!("{MOUNT}/agent") }));
        volumes.push(serde_json::json!({
            "name": "data",
            "persistentVolumeClaim": { "claimName": claim_name(name) },
        }));
    }
    let mut container = serde_json::json!({
        "name": CONTAINER,
        "image": launch.image,
        "command": ["/bin/sh", "-c", entrypoint(launch.idle_timeout_s)],
        "workingDir": MOUNT,
        "resources": { "limits": limits, "requests": requests },
        "volumeMounts": mounts,
        // A job asking for the pod's own image runs as is (see the agent's
        // jobs::container); the name and address are for the pods of
        // `placement = "cluster"` jobs, which connect back to this one.
        "env": [
            { "name": "BRIDGE_POD_IMAGE", "value": launch.image },
            { "name": "BRIDGE_POD_NAME", "valueFrom": { "fieldRef": { "fieldPath": "metadata.name" } } },
            { "name": "BRIDGE_POD_IP", "valueFrom": { "fieldRef": { "fieldPath": "status.podIP" } } },
        ],
    });
    if let Some(p) = &launch.pull {
        container["imagePullPolicy"] = p.clone().into();
    }
    let pod = serde_json::json!({
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": name,
            "labels": {
                LABEL_MANAGED: "true",
                LABEL_REPO: repo_hash(repo),
                LABEL_OWNER: owner_label(),
            },
            "annotations": { ANNOTATION_REPO: repo.display().to_string() },
        },
        "spec": {
            "restartPolicy": "Never",
            "terminationGracePeriodSeconds": 30,
            "automountServiceAccountToken": account.is_some(),
            "serviceAccountName": account,
            "enableServiceLinks": false,
            "containers": [container],
            "volumes": volumes,
            "nodeSelector": launch.node_selector,
            "tolerations": tolerations,
        },
    });
    serde_json::from_value(pod).map_err(|e| format!("cannot build the pod's spec: {e}"))
}

/// A client for `context` (else the current one), found the way kubectl
/// finds it: `KUBECONFIG`, `~/.kube/config`, or in-cluster; with the
/// namespace the context names (else `default`).
pub async fn client(context: Option<&str>) -> Result<(kube::Client, String), String> {
    let config = match context {
        None => kube::Config::infer().await.map_err(|e| {
            format!("no Kubernetes configuration: {e} (set KUBECONFIG, or write ~/.kube/config)")
        })?,
        Some(c) => kube::Config::from_kubeconfig(&kube::config::KubeConfigOptions {
            context: Some(c.to_string()),
            ..Default::default()
        })
        .await
        .map_err(|e| format!("kubeconfig context {c:?}: {e}"))?,
    };
    let namespace = config.default_namespace.clone();
    let client =
        client_for(&config).map_err(|e| format!("cannot make a Kubernetes client: {e}"))?;
    Ok((client, namespace))
}

/// An API error as one line: what Kubernetes said, with what to do for the
/// common refusals.
pub fn api_error(what: &str, namespace: &str, e: &kube::Error) -> String {
    match e {
        kube::Error::Api(s) if s.code == 403 => format!(
            "Kubernetes refused to {what}: {} (ask a cluster admin for the rights, or pick another --namespace)",
            s.message
        ),
        kube::Error::Api(s) if s.code == 404 && s.message.contains("namespaces") => format!(
            "cannot {what}: {} (create it with `kubectl create namespace {namespace}`, or pick another --namespace)",
            s.message
        ),
        kube::Error::Api(s) => format!("cannot {what}: {}", s.message),
        other => format!("cannot {what}: {other}"),
    }
}

/// Whether `e` says the object does not exist.
pub fn not_found(e: &kube::Error) -> bool {
    matches!(e, kube::Error::Api(s) if s.code == 404)
}

/// What the daemon needs to reach the pod's agent.
#[derive(Debug, Clone)]
pub struct K8sConfig {
    pub context: Option<String>,
    pub namespace: String,
    pub pod: String,
}

/// The daemon's side: the pod's agent over port-forward.
pub struct K8sProvider {
    config: K8sConfig,
    client: tokio::sync::OnceCell<kube::Client>,
}

impl K8sProvider {
    pub fn new(config: K8sConfig) -> K8sProvider {
        K8sProvider {
            config,
            client: tokio::sync::OnceCell::new(),
        }
    }

    async fn pods(&self) -> Result<Api<Pod>, ProviderError> {
        let client = self
            .client
            .get_or_try_init(|| async {
                client(self.config.context.as_deref())
                    .await
                    .map(|(c, _)| c)
                    .map_err(ProviderError::fatal)
            })
            .await?;
        Ok(Api::namespaced(client.clone(), &self.config.namespace))
    }

    /// A fresh port-forward to the agent's port.
    async fn stream(&self) -> Result<tokio::io::DuplexStream, ProviderError> {
        let pods = self.pods().await?;
        let mut pf = pods
            .portforward(&self.config.pod, &[AGENT_PORT])
            .await
            .map_err(|e| {
                ProviderError::retryable(format!(
                    "cannot port-forward to pod {}: {e}",
                    self.config.pod
                ))
            })?;
        pf.take_stream(AGENT_PORT)
            .ok_or_else(|| ProviderError::retryable("the port-forward gave no stream"))
    }
}

impl Provider for K8sProvider {
    fn name(&self) -> &'static str {
        "k8s"
    }

    fn address(&self) -> String {
        format!(
            "pod {}/{}:{AGENT_PORT}",
            self.config.namespace, self.config.pod
        )
    }

    /// The agent was started by `bridge up`; here the pod must still be
    /// running. A pod that is gone or ended is reported, not replaced (that
    /// is `bridge up`'s call: it may cost a GPU).
    fn ensure_agent(&self) -> BoxFuture<'_, Result<(), ProviderError>> {
        Box::pin(async move {
            let pods = self.pods().await?;
            let name = &self.config.pod;
            match pods.get_opt(name).await {
                Ok(Some(p)) => match lifecycle::Phase::of(&p) {
                    lifecycle::Phase::Running => Ok(()),
                    other => Err(ProviderError::fatal(format!(
                        "pod {name} is {}; run `bridge up` for a new one",
                        other.describe()
                    ))),
                },
                Ok(None) => Err(ProviderError::fatal(format!(
                    "pod {name} is gone (deleted, or its node was lost); run `bridge up` for a new one"
                ))),
                Err(e) => Err(ProviderError::retryable(api_error(
                    "read the pod",
                    &self.config.namespace,
                    &e,
                ))),
            }
        })
    }

    fn connect(&self) -> BoxFuture<'_, Result<Channel, ProviderError>> {
        Box::pin(async move {
            let this = Arc::new(K8sProvider {
                config: self.config.clone(),
                client: self.client.clone(),
            });
            let open = move || {
                let this = this.clone();
                async move { this.stream().await }
            };
            super::channel_over("http://agent.k8s", Duration::from_secs(20), open)
                .await?
                .map_err(|e| {
                    ProviderError::retryable(format!(
                        "cannot reach the agent in pod {}: {e}",
                        self.config.pod
                    ))
                })
        })
    }

    /// The pod stays: `bridge down` deletes it, the agent's idle shutdown
    /// ends it.
    fn teardown(&self) -> BoxFuture<'_, Result<(), ProviderError>> {
        Box::pin(async { Ok(()) })
    }

    fn link_is_fast(&self) -> bool {
        false
    }

    fn down_stops_agent(&self) -> bool {
        false
    }
}

/// The agent binary's hash (blake3, 16 hex digits) and length.
pub fn agent_hash(bin: &Path) -> Result<(String, u64), String> {
    let unreadable = |e: std::io::Error| {
        format!(
            "cannot read the agent binary {}: {e} (build it with `cargo build --release -p bridge-agent`, or set BRIDGE_AGENT_BIN)",
            bin.display()
        )
    };
    bridge_proto::binary_hash(bin).map_err(unreadable)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn launch() -> Launch {
        Launch {
            context: None,
            namespace: "ml".into(),
            image: "pytorch/pytorch:2.5".into(),
            gpus: 2,
            cpu: Some("4".into()),
            memory: Some("16Gi".into()),
            node_selector: [("gpu".to_string(), "a100".to_string())].into(),
            tolerations: vec!["nvidia.com/gpu:NoSchedule".into()],
            volume: Some("50Gi".into()),
            pull: Some("IfNotPresent".into()),
            idle_timeout_s: 600,
            schedule_timeout_s: 60,
        }
    }

    #[test]
    fn names_are_dns_labels_and_stable() {
        let a = pod_name(Path::new("/home/me/My_Project.v2"));
        assert!(a.starts_with("bridge-my-project-v2-"), "{a}");
        assert_eq!(a, pod_name(Path::new("/home/me/My_Project.v2")));
        assert_ne!(a, pod_name(Path::new("/home/other/My_Project.v2")));
        let long = pod_name(Path::new(&format!("/x/{}", "a".repeat(200))));
        assert!(long.len() <= 63, "{long}");
        let odd = pod_name(Path::new("/"));
        assert!(odd.starts_with("bridge-") && !odd.ends_with('-'), "{odd}");
        for n in [&a, &long, &odd] {
            assert!(
                n.chars()
                    .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
            );
        }
    }

    #[test]
    fn the_pod_asks_for_what_the_flags_say() {
        let pod = pod_manifest("bridge-x-1", &launch(), Path::new("/r/x"), None).unwrap();
        let v = serde_json::to_value(&pod).unwrap();
        let c = &v["spec"]["containers"][0];
        assert_eq!(c["resources"]["limits"]["nvidia.com/gpu"], "2");
        assert_eq!(c["resources"]["requests"]["cpu"], "4");
        assert_eq!(c["resources"]["limits"]["memory"], "16Gi");
        assert_eq!(c["image"], "pytorch/pytorch:2.5");
        assert_eq!(c["imagePullPolicy"], "IfNotPresent");
        assert_eq!(v["spec"]["restartPolicy"], "Never");
        assert_eq!(v["spec"]["nodeSelector"]["gpu"], "a100");
        assert_eq!(v["spec"]["tolerations"][0]["key"], "nvidia.com/gpu");
        assert_eq!(v["spec"]["tolerations"][0]["operator"], "Exists");
        assert_eq!(
            v["spec"]["volumes"][1]["persistentVolumeClaim"]["claimName"],
            "bridge-x-1-data"
        );
        assert_eq!(v["metadata"]["labels"][LABEL_MANAGED], "true");
        assert_eq!(v["metadata"]["annotations"][ANNOTATION_REPO], "/r/x");
        // The token is never in the spec: it is copied in over exec.
        assert!(!v.to_string().contains("token-file /tmp"));
        let script = c["command"][2].as_str().unwrap();
        assert!(script.contains("--idle-timeout 600"), "{script}");
    }

    #[test]
    fn bad_flags_are_refused_before_anything_is_sent() {
        assert!(check_quantity("--memory", "16Gi").is_ok());
        assert!(check_quantity("--cpu", "500m").is_ok());
        assert!(check_quantity("--cpu", "1.5").is_ok());
        for bad in ["", "Gi", "16GB", "1.2.3", "-1", "lots"] {
            let e = check_quantity("--memory", bad).unwrap_err();
            assert!(e.contains("--memory"), "{e}");
        }
        assert!(toleration("k=v:NoExecute").is_ok());
        assert!(toleration("k=v:Sometimes").unwrap_err().contains("effect"));
        assert!(toleration("=v").unwrap_err().contains("KEY"));
        let mut l = launch();
        l.tolerations = vec!["x:Never".into()];
        assert!(pod_manifest("p", &l, Path::new("/r"), None).is_err());
    }
}

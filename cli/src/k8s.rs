//! The Kubernetes flags of `bridge up`, turned into a provider spec. The
//! pod's lifecycle is the daemon crate's (`provider::k8s::lifecycle`).

use std::time::Duration;

use anyhow::{anyhow, bail};
use bridge_daemon::provider::ProviderSpec;
use bridge_daemon::provider::k8s::{self, DEFAULT_IDLE_TIMEOUT, DEFAULT_IMAGE, Launch};
use bridge_daemon::provider::machine::parse_duration;

/// `--schedule-timeout`'s default: long enough for a cluster autoscaler to
/// add a node, short enough that a request no node can meet ends `up`.
const DEFAULT_SCHEDULE_TIMEOUT: &str = "2m";

/// The Kubernetes flags of `bridge up`.
#[derive(clap::Args, Clone, Default)]
pub struct PodArgs {
    /// Kubernetes: the kubeconfig context (default: the current one; KUBECONFIG and ~/.kube/config are read as kubectl does).
    #[arg(long, value_name = "NAME")]
    pub context: Option<String>,
    /// Kubernetes: the namespace (default: the context's, else `default`).
    #[arg(long, short = 'n', value_name = "NAME")]
    pub namespace: Option<String>,
    /// Kubernetes: the pod's image (default: python:3.11-slim); it needs /bin/sh and, for jobs, python3.
    #[arg(long, value_name = "IMAGE")]
    pub image: Option<String>,
    /// Kubernetes: CPU to request and limit (e.g. 4, 500m).
    #[arg(long, value_name = "QUANTITY")]
    pub cpu: Option<String>,
    /// Kubernetes: memory to request and limit (e.g. 16Gi).
    #[arg(long, value_name = "QUANTITY")]
    pub memory: Option<String>,
    /// Kubernetes: only nodes with this label (repeatable).
    #[arg(long = "node-selector", value_name = "KEY=VALUE")]
    pub node_selector: Vec<String>,
    /// Kubernetes: tolerate this taint (repeatable): KEY[=VALUE][:EFFECT].
    #[arg(long = "toleration", value_name = "KEY[=VALUE][:EFFECT]")]
    pub tolerations: Vec<String>,
    /// Kubernetes: keep the mirror, chunk store and environments on a volume claim of this size (e.g. 50Gi), so a new pod starts warm.
    #[arg(long, value_name = "SIZE")]
    pub volume: Option<String>,
    /// Kubernetes: the image pull policy (Always, IfNotPresent, Never).
    #[arg(long, value_name = "POLICY", value_parser = ["Always", "IfNotPresent", "Never"])]
    pub pull: Option<String>,
    /// Kubernetes: give up when the pod stays unschedulable this long (default 2m).
    #[arg(long, value_name = "DURATION")]
    pub schedule_timeout: Option<String>,
}

impl PodArgs {
    /// Whether any Kubernetes-only flag was given.
    pub fn any(&self) -> bool {
        self.context.is_some()
            || self.namespace.is_some()
            || self.image.is_some()
            || self.cpu.is_some()
            || self.memory.is_some()
            || !self.node_selector.is_empty()
            || !self.tolerations.is_empty()
            || self.volume.is_some()
            || self.pull.is_some()
            || self.schedule_timeout.is_some()
    }

    /// The provider spec for `--provider k8s`; everything is checked here,
    /// before anything is sent to the cluster. A saved pod is kept (reused
    /// if it still runs).
    pub fn spec(
        &self,
        gpus: Option<u32>,
        idle_timeout: Option<&str>,
        saved: Option<ProviderSpec>,
    ) -> anyhow::Result<ProviderSpec> {
        for (flag, q) in [("--cpu", &self.cpu), ("--memory", &self.memory)] {
            if let Some(q) = q {
                k8s::check_quantity(flag, q).map_err(|e| anyhow!(e))?;
            }
        }
        if let Some(v) = &self.volume {
            k8s::check_quantity("--volume", v).map_err(|e| anyhow!(e))?;
        }
        let mut node_selector = std::collections::BTreeMap::new();
        for s in &self.node_selector {
            match s.split_once('=') {
                Some((k, v)) if !k.is_empty() => {
                    node_selector.insert(k.to_string(), v.to_string());
                }
                _ => bail!("--node-selector {s:?}: give KEY=VALUE, e.g. gpu=a100"),
            }
        }
        for t in &self.tolerations {
            k8s::toleration(t).map_err(|e| anyhow!(e))?;
        }
        if let Some(ns) = &self.namespace
            && !is_dns_label(ns)
        {
            bail!(
                "--namespace {ns:?} is not a valid namespace name (lower-case letters, digits and '-')"
            );
        }
        // What the last `bridge up` here chose stays unless a flag changes
        // it (`bridge up --gpu 2` keeps the image, context, namespace, …).
        let (base, pod) = match saved {
            Some(ProviderSpec::K8s { launch, pod }) => (Some(launch), pod),
            _ => (None, None),
        };
        let idle = match (idle_timeout, &base) {
            (Some(t), _) => parse_duration(t).map_err(|e| anyhow!("--idle-timeout: {e}"))?,
            (None, Some(b)) => Duration::from_secs(b.idle_timeout_s),
            (None, None) => DEFAULT_IDLE_TIMEOUT,
        };
        if idle < Duration::from_secs(1) {
            bail!("--idle-timeout must be at least 1s");
        }
        let schedule = match (&self.schedule_timeout, &base) {
            (Some(t), _) => parse_duration(t).map_err(|e| anyhow!("--schedule-timeout: {e}"))?,
            (None, Some(b)) => Duration::from_secs(b.schedule_timeout_s),
            (None, None) => parse_duration(DEFAULT_SCHEDULE_TIMEOUT).expect("valid default"),
        };
        let b = base.clone();
        let launch = Launch {
            context: self
                .context
                .clone()
                .or(b.as_ref().and_then(|b| b.context.clone())),
            namespace: self
                .namespace
                .clone()
                .or(b.as_ref().map(|b| b.namespace.clone()))
                .unwrap_or_default(),
            image: self
                .image
                .clone()
                .or(b.as_ref().map(|b| b.image.clone()))
                .unwrap_or_else(|| DEFAULT_IMAGE.to_string()),
            gpus: gpus.or(b.as_ref().map(|b| b.gpus)).unwrap_or(0),
            cpu: self.cpu.clone().or(b.as_ref().and_then(|b| b.cpu.clone())),
            memory: self
                .memory
                .clone()
                .or(b.as_ref().and_then(|b| b.memory.clone())),
            node_selector: if node_selector.is_empty() {
                b.as_ref()
                    .map(|b| b.node_selector.clone())
                    .unwrap_or_default()
            } else {
                node_selector
            },
            tolerations: if self.tolerations.is_empty() {
                b.as_ref()
                    .map(|b| b.tolerations.clone())
                    .unwrap_or_default()
            } else {
                self.tolerations.clone()
            },
            volume: self
                .volume
                .clone()
                .or(b.as_ref().and_then(|b| b.volume.clone())),
            pull: self
                .pull
                .clone()
                .or(b.as_ref().and_then(|b| b.pull.clone())),
            idle_timeout_s: idle.as_secs(),
            schedule_timeout_s: schedule.as_secs(),
        };
        // The saved pod stays ours only where the new launch puts it too.
        let same_place = base.as_ref().is_some_and(|s| {
            s.context == launch.context
                && (launch.namespace.is_empty() || s.namespace == launch.namespace)
        });
        Ok(ProviderSpec::K8s {
            launch,
            pod: pod.filter(|_| same_place),
        })
    }
}

fn is_dns_label(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 63
        && s.chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
        && !s.starts_with('-')
        && !s.ends_with('-')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_later_up_keeps_what_no_flag_changes() {
        let first = PodArgs {
            context: Some("team".into()),
            namespace: Some("ml".into()),
            image: Some("pytorch/pytorch:2.5".into()),
            volume: Some("50Gi".into()),
            ..Default::default()
        };
        let ProviderSpec::K8s { launch, .. } = first.spec(Some(1), Some("10m"), None).unwrap()
        else {
            panic!("not k8s")
        };
        let saved = ProviderSpec::K8s {
            launch,
            pod: Some("bridge-x-1".into()),
        };
        let ProviderSpec::K8s { launch, pod } = PodArgs::default()
            .spec(Some(2), None, Some(saved.clone()))
            .unwrap()
        else {
            panic!("not k8s")
        };
        assert_eq!(launch.gpus, 2);
        assert_eq!(launch.image, "pytorch/pytorch:2.5");
        assert_eq!(launch.context.as_deref(), Some("team"));
        assert_eq!(launch.namespace, "ml");
        assert_eq!(launch.volume.as_deref(), Some("50Gi"));
        assert_eq!(launch.idle_timeout_s, 600);
        assert_eq!(pod.as_deref(), Some("bridge-x-1"));
        // Another namespace: the saved pod is not this launch's.
        let elsewhere = PodArgs {
            namespace: Some("other".into()),
            ..Default::default()
        };
        let ProviderSpec::K8s { pod, .. } = elsewhere.spec(None, None, Some(saved)).unwrap() else {
            panic!("not k8s")
        };
        assert!(pod.is_none());
    }

    #[test]
    fn flags_become_a_launch_and_bad_ones_are_refused() {
        let a = PodArgs {
            namespace: Some("ml".into()),
            image: Some("pytorch/pytorch:2.5".into()),
            node_selector: vec!["gpu=a100".into()],
            memory: Some("16Gi".into()),
            ..Default::default()
        };
        let ProviderSpec::K8s { launch, pod } = a.spec(Some(2), Some("10m"), None).unwrap() else {
            panic!("not k8s")
        };
        assert_eq!(launch.gpus, 2);
        assert_eq!(launch.idle_timeout_s, 600);
        assert_eq!(launch.schedule_timeout_s, 120);
        assert_eq!(launch.node_selector["gpu"], "a100");
        assert!(pod.is_none());
        for (bad, says) in [
            (
                PodArgs {
                    cpu: Some("lots".into()),
                    ..Default::default()
                },
                "--cpu",
            ),
            (
                PodArgs {
                    node_selector: vec!["gpu".into()],
                    ..Default::default()
                },
                "KEY=VALUE",
            ),
            (
                PodArgs {
                    namespace: Some("My_NS".into()),
                    ..Default::default()
                },
                "namespace",
            ),
            (
                PodArgs {
                    tolerations: vec!["a:Maybe".into()],
                    ..Default::default()
                },
                "effect",
            ),
            (
                PodArgs {
                    schedule_timeout: Some("soon".into()),
                    ..Default::default()
                },
                "--schedule-timeout",
            ),
        ] {
            let e = bad.spec(None, None, None).unwrap_err().to_string();
            assert!(e.contains(says), "{e}");
        }
    }
}

//! Starting a job: its environment (GPUs, bridge's variables, MLflow's run
//! context), the shim's `spec.json`, and the shim itself in a process group
//! of its own.

use std::collections::BTreeMap;
use std::fs;
use std::io;
use std::os::unix::process::CommandExt;
use std::process::{Command, Stdio};

use bridge_proto::v1::{self, JobState};

use super::{Inner, Jobs, container, grace_of, now_ms, start_ticks};
use crate::shim::{PythonKind, PythonSpec, SetupSpec, ShimSpec};

impl Jobs {
    pub(super) fn start(&self, inner: &mut Inner, id: u64, gpus: Vec<u32>) -> io::Result<()> {
        let dir = self.job_dir(id);
        let rec = inner.records.get_mut(&id).expect("queued job");
        let grace = grace_of(rec);
        let info = rec.info.as_mut().expect("info");
        let spec = info.spec.clone().unwrap_or_default();
        let tree = if spec.live {
            self.mirrors_dir.join(&info.mirror)
        } else {
            dir.join("tree")
        };
        let workdir = spec.workdir.trim_matches('/');
        let cwd = if workdir.is_empty() || workdir == "." {
            tree.clone()
        } else {
            tree.join(workdir)
        };
        let mut env: BTreeMap<String, String> = spec.env.clone().into_iter().collect();
        let visible = gpus
            .iter()
            .map(|g| g.to_string())
            .collect::<Vec<_>>()
            .join(",");
        env.insert("CUDA_DEVICE_ORDER".into(), "PCI_BUS_ID".into());
        env.insert("CUDA_VISIBLE_DEVICES".into(), visible.clone());
        env.insert(
            "NVIDIA_VISIBLE_DEVICES".into(),
            if visible.is_empty() {
                "none".into()
            } else {
                visible
            },
        );
        env.insert("BRIDGE_JOB_ID".into(), info.id.clone());
        env.insert("BRIDGE_JOB_NAME".into(), info.name.clone());
        env.insert("BRIDGE_GENERATION".into(), info.generation.clone());
        if let Some(t) = &spec.trial {
            env.insert("BRIDGE_SWEEP".into(), t.sweep.clone());
            env.insert("BRIDGE_TRIAL".into(), t.index.to_string());
            env.insert("BRIDGE_TRIAL_ATTEMPT".into(), t.attempt.to_string());
        }
        // The job's own output directory (the first declared one): a
        // sweep's trials each write theirs, which come home apart.
        if let Some(d) = spec.outputs.iter().find(|o| o.ends_with('/')) {
            env.insert(
                "BRIDGE_OUTPUT_DIR".into(),
                cwd.join(d.trim_end_matches('/')).display().to_string(),
            );
        }
        if spec.live {
            // Bytecode caches go beside the mirror, not into it (where the
            // next sync would delete them as strays), where applying a
            // changed module removes its stale bytecode.
            env.insert(
                "PYTHONPYCACHEPREFIX".into(),
                crate::kernel::pycache_dir(&tree).display().to_string(),
            );
        }
        env.insert(
            "MLFLOW_RUN_CONTEXT".into(),
            run_context(env.get("MLFLOW_RUN_CONTEXT"), &info.id, &self.hostname),
        );
        let debugpy_port = spec
            .debug
            .as_ref()
            .filter(|d| d.kind() == v1::debug_spec::Kind::Debugpy)
            .and_then(|d| u16::try_from(d.port).ok())
            .filter(|&p| p != 0);
        let python = spec.python.as_ref().and_then(|p| {
            let kind = match p.kind() {
                v1::python_env::Kind::None => return None,
                v1::python_env::Kind::Requirements => PythonKind::Requirements,
                v1::python_env::Kind::Pyproject => PythonKind::Pyproject,
                v1::python_env::Kind::Conda => PythonKind::Conda,
            };
            Some(PythonSpec {
                kind,
                file: tree.join(p.file.trim_matches('/')),
            })
        });
        let setup = (!spec.setup.trim().is_empty()).then(|| SetupSpec {
            command: spec.setup.clone(),
            inputs: spec
                .setup_inputs
                .iter()
                .map(|i| tree.join(i.trim_matches('/')))
                .collect(),
        });
        let has_setup =
            python.is_some() || setup.is_some() || debugpy_port.is_some() || spec.kernel.is_some();
        let shim = ShimSpec {
            job_id: info.id.clone(),
            tree: tree.clone(),
            cwd,
            command: spec.run.clone(),
            env,
            python,
            setup,
            cache_dir: self.cache_dir.clone(),
            grace_ms: grace.as_millis() as u64,
            live: spec.live,
            debugpy_port,
            kernel: spec
                .kernel
                .is_some()
                .then(|| dir.join(crate::kernel::CONNECTION_FILE)),
            cluster: (spec.placement == crate::cluster::CLUSTER).then(|| {
                crate::cluster::ClusterSpec {
                    gpus: spec.gpus,
                    image: if spec.image.is_empty() {
                        std::env::var(container::POD_IMAGE_VAR).unwrap_or_default()
                    } else {
                        spec.image.clone()
                    },
                    outputs: spec.outputs.clone(),
                    // A sweep retries a trial as a new job (an attempt of
                    // its own), so Kubernetes does not retry it again.
                    retries: 0,
                    name: info.name.clone(),
                }
            }),
        };
        // Not fsynced: the shim reads it at once, and a machine crash ends
        // the job anyway (see `store::Store::save`).
        crate::envcache::write_atomic(
            &dir.join("spec.json"),
            &serde_json::to_vec_pretty(&shim).map_err(io::Error::other)?,
            false,
        )?;
        let log = fs::File::create(dir.join("shim.log"))?;
        let engine = if spec.image.is_empty() || spec.placement == crate::cluster::CLUSTER {
            None
        } else {
            container::plan(&spec.image).map_err(|s| io::Error::other(s.message().to_string()))?
        };
        let mut cmd = match &engine {
            None => {
                let mut c = Command::new(&self.shim_exe);
                c.arg("shim").arg(&dir);
                c
            }
            Some(engine) => {
                let image_cache = container::cache_dir(&self.cache_dir, &spec.image);
                fs::create_dir_all(&image_cache)?;
                let mounts = container::Mounts {
                    shim_exe: &self.shim_exe,
                    job_dir: &dir,
                    tree: &tree,
                    cache_dir: &self.cache_dir,
                    image_cache: &image_cache,
                };
                container::command(engine, &spec.image, &mounts, !gpus.is_empty())
            }
        };
        let mut child = cmd
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .process_group(0)
            .spawn()?;
        let pid = child.id();
        // The shim is our child until we exit: reap it so it leaves no zombie,
        // and have the poller see its end at once.
        let wake = self.wake.clone();
        std::thread::spawn(move || {
            let _ = child.wait();
            wake.wake();
        });
        rec.shim_pid = pid;
        rec.shim_start_ticks = start_ticks(pid).unwrap_or(0);
        info.gpus = gpus;
        info.started_ms = now_ms();
        info.set_state(if has_setup {
            JobState::Setup
        } else {
            JobState::Running
        });
        let rec = rec.clone();
        self.save(id, &rec);
        tracing::info!(job = id, pid, "job started");
        Ok(())
    }
}

/// `MLFLOW_RUN_CONTEXT` for a job: the tags MLflow puts on every run the
/// job starts (MLflow's own `SystemEnvironmentContext`): the job id and the
/// agent's host, added to what the daemon put there (the git commit) or the
/// user did (their keys win).
pub fn run_context(given: Option<&String>, job: &str, host: &str) -> String {
    let mut tags = given
        .and_then(|g| serde_json::from_str::<serde_json::Map<String, serde_json::Value>>(g).ok())
        .unwrap_or_default();
    for (k, v) in [("bridge.job_id", job), ("bridge.agent_host", host)] {
        tags.entry(k.to_string())
            .or_insert_with(|| serde_json::Value::String(v.to_string()));
    }
    serde_json::Value::Object(tags).to_string()
}

#[cfg(test)]
mod tests {
    use super::run_context;

    #[test]
    fn run_context_adds_the_job_and_host_and_keeps_what_was_given() {
        let tags: serde_json::Value =
            serde_json::from_str(&run_context(None, "7", "gpu1")).unwrap();
        assert_eq!(tags["bridge.job_id"], "7");
        assert_eq!(tags["bridge.agent_host"], "gpu1");
        let given = r#"{"mlflow.source.git.commit":"abc","bridge.job_id":"mine"}"#.to_string();
        let tags: serde_json::Value =
            serde_json::from_str(&run_context(Some(&given), "7", "gpu1")).unwrap();
        assert_eq!(tags["mlflow.source.git.commit"], "abc");
        assert_eq!(tags["bridge.job_id"], "mine");
        assert_eq!(tags["bridge.agent_host"], "gpu1");
        // Not JSON: replaced by bridge's own tags rather than breaking MLflow.
        let tags: serde_json::Value =
            serde_json::from_str(&run_context(Some(&"{x".to_string()), "7", "h")).unwrap();
        assert_eq!(tags["bridge.job_id"], "7");
    }
}

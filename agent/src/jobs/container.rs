//! Jobs with `image`: the job's shim runs inside a container of that image,
//! started by podman or docker (whichever this machine has; podman first,
//! `BRIDGE_CONTAINER_ENGINE` to choose). Everything the shim touches is
//! bind-mounted at the same path: the job's directory (spec, log, exit
//! status), its tree (the snapshot, or the live mirror) and the environment
//! cache, one per image. The container shares the host's network (the job's
//! ports, debugpy and kernels listen where they would without it) and
//! process namespace (the pids the shim reports are the agent's to signal),
//! and the agent's binary is mounted read-only as the shim.
//!
//! On a Kubernetes agent the pod already runs an image (`BRIDGE_POD_IMAGE`):
//! a job asking for that one runs as is; another one is refused (pods have
//! no container engine), naming the `bridge up` that makes such a pod.

use std::path::{Path, PathBuf};
use std::process::Command;

use tonic::Status;

/// The container engine.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Engine {
    pub docker: bool,
    pub path: PathBuf,
}

/// The label naming the job's directory on every job container.
pub const LABEL_JOB_DIR: &str = "bridge.job-dir";

/// Set in a Kubernetes agent's pod: the pod's image.
pub const POD_IMAGE_VAR: &str = "BRIDGE_POD_IMAGE";

/// Where the agent's binary appears inside the container.
const SHIM_IN_CONTAINER: &str = "/.bridge-shim";

/// How a job with `image` runs here: `None` as is (the pod's own image).
pub fn plan(image: &str) -> Result<Option<Engine>, Status> {
    if let Some(pod_image) = std::env::var(POD_IMAGE_VAR).ok().filter(|i| !i.is_empty()) {
        if same_image(&pod_image, image) {
            return Ok(None);
        }
        return Err(Status::failed_precondition(format!(
            "the job asks for image {image:?}, and this agent runs in a Kubernetes pod of {pod_image:?} \
             (pods have no container engine): `bridge up --provider k8s --image {image}` makes a pod of it"
        )));
    }
    find_engine(image).map(Some)
}

/// `python:3.11` and `docker.io/library/python:3.11` are the same image.
fn same_image(a: &str, b: &str) -> bool {
    fn norm(i: &str) -> String {
        let i = i.strip_prefix("docker.io/").unwrap_or(i);
        let i = i.strip_prefix("library/").unwrap_or(i);
        if i.rsplit('/').next().is_some_and(|last| !last.contains(':')) && !i.contains('@') {
            format!("{i}:latest")
        } else {
            i.to_string()
        }
    }
    norm(a) == norm(b)
}

fn find_engine(image: &str) -> Result<Engine, Status> {
    let on_path = |name: &str| -> Option<PathBuf> {
        if name.contains('/') {
            return Path::new(name).is_file().then(|| PathBuf::from(name));
        }
        std::env::var_os("PATH").and_then(|paths| {
            std::env::split_paths(&paths)
                .map(|d| d.join(name))
                .find(|p| p.is_file())
        })
    };
    let engine = |path: PathBuf| Engine {
        docker: path
            .file_name()
            .is_some_and(|n| n.to_string_lossy().starts_with("docker")),
        path,
    };
    if let Ok(chosen) = std::env::var("BRIDGE_CONTAINER_ENGINE")
        && !chosen.is_empty()
    {
        return on_path(&chosen).map(engine).ok_or_else(|| {
            Status::failed_precondition(format!(
                "the job asks for image {image:?}, and BRIDGE_CONTAINER_ENGINE names {chosen:?}, which is not on the agent's PATH"
            ))
        });
    }
    on_path("podman")
        .or_else(|| on_path("docker"))
        .map(engine)
        .ok_or_else(|| {
            Status::failed_precondition(format!(
                "the job asks for image {image:?}, and the agent's machine has neither podman nor docker on PATH: \
                 install one (e.g. `sudo apt-get install podman`), or remove `image` to run on the machine as is"
            ))
        })
}

/// The container's name: stable for the job directory, so a leftover of a
/// crashed agent is found and replaced.
pub fn container_name(job_dir: &Path) -> String {
    let h = blake3::hash(job_dir.as_os_str().as_encoded_bytes()).to_hex();
    format!("bridge-job-{}", &h[..16])
}

/// The environment cache of `image`: beside the agent's own, one per image
/// (an environment built by the image's Python runs only there).
pub fn cache_dir(cache: &Path, image: &str) -> PathBuf {
    let h = blake3::hash(image.as_bytes()).to_hex();
    let name = cache
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "cache".into());
    cache
        .with_file_name(format!("{name}-images"))
        .join(&h[..16])
}

/// What the container runs and shares with the machine.
pub struct Mounts<'a> {
    pub shim_exe: &'a Path,
    pub job_dir: &'a Path,
    pub tree: &'a Path,
    pub cache_dir: &'a Path,
    pub image_cache: &'a Path,
}

/// `ENGINE run …` for the job's shim.
pub fn command(engine: &Engine, image: &str, m: &Mounts, gpus: bool) -> Command {
    let mut c = Command::new(&engine.path);
    let bind = |from: &Path, to: &Path, ro: bool| {
        format!(
            "type=bind,source={},destination={}{}",
            from.display(),
            to.display(),
            if ro { ",readonly" } else { "" }
        )
    };
    c.args(["run", "--rm", "--name"])
        .arg(container_name(m.job_dir))
        .arg("--label")
        .arg(format!("{LABEL_JOB_DIR}={}", m.job_dir.display()))
        .args(["--network", "host", "--pid", "host", "--ipc", "host"])
        .args(["--security-opt", "label=disable"])
        .arg("--mount")
        .arg(bind(m.shim_exe, Path::new(SHIM_IN_CONTAINER), true))
        .arg("--mount")
        .arg(bind(m.job_dir, m.job_dir, false))
        .arg("--mount")
        .arg(bind(m.image_cache, m.cache_dir, false));
    if !m.tree.starts_with(m.job_dir) {
        c.arg("--mount").arg(bind(m.tree, m.tree, false));
    }
    let uid = nix::unistd::getuid();
    let gid = nix::unistd::getgid();
    if engine.docker {
        // Files the job writes belong to the agent's user, not root.
        c.arg("--user").arg(format!("{uid}:{gid}"));
    } else if !uid.is_root() {
        c.arg("--userns=keep-id");
    }
    if gpus {
        // All of them: CUDA_VISIBLE_DEVICES (set by the shim, the host's
        // indices) picks the job's, as on the machine itself.
        if engine.docker {
            c.args(["--gpus", "all"]);
        } else {
            c.args(["--device", "nvidia.com/gpu=all"]);
        }
    }
    c.args(["--entrypoint", SHIM_IN_CONTAINER])
        .arg(image)
        .arg("shim")
        .arg(m.job_dir);
    c
}

/// Removes the job's container if it is still there (a shim killed hard
/// leaves it; `--rm` covers the rest). Best effort.
pub fn remove(engine: &Engine, job_dir: &Path) {
    let _ = Command::new(&engine.path)
        .args(["rm", "-f", "-t", "0"])
        .arg(container_name(job_dir))
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status();
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_command_mounts_the_same_paths_and_runs_the_shim() {
        let e = Engine {
            docker: false,
            path: "/usr/bin/podman".into(),
        };
        let m = Mounts {
            shim_exe: Path::new("/opt/bridge-agent"),
            job_dir: Path::new("/r/agent/jobs/7"),
            tree: Path::new("/r/agent/jobs/7/tree"),
            cache_dir: Path::new("/r/agent/cache"),
            image_cache: Path::new("/r/agent/cache-images/ab"),
        };
        let c = command(&e, "pytorch/pytorch:2.5", &m, true);
        let args: Vec<String> = c
            .get_args()
            .map(|a| a.to_string_lossy().into_owned())
            .collect();
        let line = args.join(" ");
        assert!(line.contains("--network host --pid host"), "{line}");
        assert!(
            line.contains("type=bind,source=/r/agent/jobs/7,destination=/r/agent/jobs/7"),
            "{line}"
        );
        assert!(
            line.contains("source=/r/agent/cache-images/ab,destination=/r/agent/cache"),
            "{line}"
        );
        assert!(line.contains("--device nvidia.com/gpu=all"), "{line}");
        assert!(
            line.ends_with("--entrypoint /.bridge-shim pytorch/pytorch:2.5 shim /r/agent/jobs/7"),
            "{line}"
        );
        // The snapshot is inside the job's directory: no mount of its own.
        assert_eq!(line.matches("--mount").count(), 3, "{line}");
    }

    #[test]
    fn images_compare_as_references() {
        assert!(same_image("python:3.11", "docker.io/library/python:3.11"));
        assert!(same_image(
            "bridge-test/python",
            "bridge-test/python:latest"
        ));
        assert!(!same_image("python:3.11", "python:3.12"));
        let a = cache_dir(Path::new("/r/agent/cache"), "python:3.11");
        assert!(a.starts_with("/r/agent/cache-images"), "{}", a.display());
        assert_ne!(a, cache_dir(Path::new("/r/agent/cache"), "python:3.12"));
    }
}

//! `image = "…"` in a job file: the job runs in a container of that image
//! with podman (Debian's package), on an image built here from Debian
//! packages (tests/k8s/images.sh, loaded by tests/run): its tree, log,
//! setup and outputs as anywhere; cancel leaves no container; an image that
//! is not there and a missing engine each fail with a clear line.

use std::fs;
use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use bridge_tests::sshd::{SshRepo, Sshd, require_sshd};
use bridge_tests::{Repo, Value, eventually};

const IMAGE: &str = "bridge-test/python:3.11";

/// The environment the agent gets: podman's configuration for this
/// machine. The sandbox lacks CAP_SYS_RESOURCE, so podman must not raise
/// the open-files limit (default_ulimits = []); and no registry is ever
/// reached: docker.io resolves to a closed loopback port.
fn podman_env(r: &Repo) -> Vec<(String, String)> {
    podman_env_in(&r.scratch(""))
}

fn podman_env_in(dir: &std::path::Path) -> Vec<(String, String)> {
    let conf = dir.join("containers.conf");
    fs::write(&conf, "[containers]\ndefault_ulimits = []\n").unwrap();
    let registries = dir.join("registries.conf");
    fs::write(
        &registries,
        "unqualified-search-registries = [\"docker.io\"]\n\
         [[registry]]\nprefix = \"docker.io\"\nlocation = \"127.0.0.1:9\"\ninsecure = true\n",
    )
    .unwrap();
    let podman = Command::new("podman")
        .args(["image", "exists", &format!("docker.io/{IMAGE}")])
        .status();
    assert!(
        podman.is_ok_and(|s| s.success()),
        "podman with the image {IMAGE} is needed: tests/run installs podman and loads it"
    );
    vec![
        ("CONTAINERS_CONF".into(), conf.display().to_string()),
        (
            "CONTAINERS_REGISTRIES_CONF".into(),
            registries.display().to_string(),
        ),
    ]
}

fn up(r: &Repo, extra: &[(&str, &str)]) {
    let env = podman_env(r);
    let mut all: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    all.extend_from_slice(extra);
    r.ok_env(&["up"], &all);
}

/// The job containers of `r`'s agent (labelled with the job's directory,
/// which is under the repository for the local provider), running or not.
fn containers_of(r: &Repo) -> Vec<String> {
    let o = Command::new("podman")
        .args([
            "ps",
            "-a",
            "--format",
            "{{.Names}} {{index .Labels \"bridge.job-dir\"}}",
        ])
        .output()
        .expect("podman ps");
    let root = r.root.display().to_string();
    String::from_utf8_lossy(&o.stdout)
        .lines()
        .filter_map(|l| l.split_once(' '))
        .filter(|(n, dir)| n.starts_with("bridge-job-") && dir.starts_with(&root))
        .map(|(n, _)| n.to_string())
        .collect()
}

fn job(r: &Repo, id: &str) -> Value {
    r.ps_json(true)
        .into_iter()
        .find(|j| j["id"] == id)
        .unwrap_or_else(|| panic!("no job {id}"))
}

#[test]
fn a_job_runs_in_its_image_with_its_tree_setup_log_and_outputs() {
    let r = Repo::new();
    r.write(
        "job.py",
        "import os\n\
         release = dict(l.split('=', 1) for l in open('/etc/os-release').read().split() if '=' in l)\n\
         print('os', release['VERSION_CODENAME'])\n\
         print('image marker', os.path.exists('/usr/local/bin/nvidia-smi'))\n\
         print('setup', open('setup.txt').read().strip())\n\
         print('job', os.environ['BRIDGE_JOB_ID'], os.getcwd() == os.environ['PWD'])\n\
         os.makedirs('outputs', exist_ok=True)\n\
         open('outputs/result.txt', 'w').write('from the container\\n')\n",
    );
    r.write(
        "train.toml",
        format!(
            "image = \"{IMAGE}\"\nsetup = \"python3 -c 'import sys; print(sys.version_info[:2])' > setup.txt\"\n\
             run = \"python3 job.py\"\n[outputs]\npaths = [\"outputs/\"]\n"
        ),
    );
    up(&r, &[]);
    let o = r.bridge(&["run", "train.toml"]);
    let out = String::from_utf8_lossy(&o.stdout).into_owned();
    assert!(
        o.status.success(),
        "{out}{}",
        String::from_utf8_lossy(&o.stderr)
    );
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines[0], "os bookworm", "{out}");
    // The image has it; this machine does not.
    assert!(!PathBuf::from("/usr/local/bin/nvidia-smi").exists());
    assert_eq!(lines[1], "image marker True", "{out}");
    assert_eq!(lines[2], "setup (3, 11)", "{out}");
    assert!(
        lines[3].starts_with("job ") && lines[3].ends_with(" True"),
        "{out}"
    );
    assert_eq!(
        fs::read_to_string(r.path("outputs/result.txt")).unwrap(),
        "from the container\n"
    );
    assert!(
        eventually(Duration::from_secs(10), || containers_of(&r).is_empty()),
        "containers left: {:?}",
        containers_of(&r)
    );
}

#[test]
fn a_cancelled_container_job_ends_and_leaves_no_container() {
    let r = Repo::new();
    r.write(
        "sleep.toml",
        format!("image = \"{IMAGE}\"\nrun = \"echo started; sleep 600\"\n"),
    );
    up(&r, &[]);
    let id = r.ok(&["run", "sleep.toml", "--detach"]).trim().to_string();
    assert!(
        eventually(Duration::from_secs(60), || {
            String::from_utf8_lossy(&r.bridge(&["logs", &id]).stdout).contains("started")
        }),
        "the job did not start: {}",
        job(&r, &id)
    );
    assert_eq!(containers_of(&r).len(), 1, "{:?}", containers_of(&r));
    r.ok(&["cancel", &id]);
    assert!(
        eventually(Duration::from_secs(30), || job(&r, &id)["state"]
            == "cancelled"),
        "{}",
        job(&r, &id)
    );
    assert!(
        eventually(Duration::from_secs(30), || containers_of(&r).is_empty()),
        "containers left: {:?}",
        containers_of(&r)
    );
}

#[test]
fn a_missing_image_and_a_missing_engine_each_fail_in_one_clear_line() {
    let r = Repo::new();
    r.write(
        "nope.toml",
        "image = \"bridge-test/no-such-image:1\"\nrun = \"echo never\"\n",
    );
    up(&r, &[]);
    let o = r.bridge(&["run", "nope.toml"]);
    let err = String::from_utf8_lossy(&o.stderr).into_owned();
    assert!(!o.status.success());
    assert!(
        err.contains("the container of image \"bridge-test/no-such-image:1\" did not run"),
        "{err}"
    );
    assert!(!String::from_utf8_lossy(&o.stdout).contains("never"));
    r.ok(&["down"]);

    // An agent whose machine has no such engine: refused at submit.
    let r = Repo::new();
    r.write(
        "a.toml",
        format!("image = \"{IMAGE}\"\nrun = \"echo never\"\n"),
    );
    up(&r, &[("BRIDGE_CONTAINER_ENGINE", "no-such-engine")]);
    let o = r.bridge(&["run", "a.toml"]);
    let err = String::from_utf8_lossy(&o.stderr).into_owned();
    assert!(!o.status.success());
    assert!(
        err.contains(
            "BRIDGE_CONTAINER_ENGINE names \"no-such-engine\", which is not on the agent's PATH"
        ),
        "{err}"
    );
    assert!(r.ps_json(true).is_empty(), "a job was recorded");
}

#[test]
fn over_ssh_the_remote_agent_runs_the_job_in_its_image() {
    require_sshd();
    let conf = tempfile::tempdir().unwrap();
    let env = podman_env_in(conf.path());
    let set_env: Vec<String> = env.iter().map(|(k, v)| format!("{k}={v}")).collect();
    let sshd = Sshd::start_with(&format!("SetEnv {}\n", set_env.join(" ")));
    let s = SshRepo::new(&sshd, true);
    let r = &s.repo;
    r.write(
        "job.py",
        "import os\nprint('in the image', os.path.exists('/usr/local/bin/nvidia-smi'))\n\
         os.makedirs('outputs', exist_ok=True)\nopen('outputs/r.txt', 'w').write('over ssh\\n')\n",
    );
    r.write(
        "train.toml",
        format!(
            "image = \"{IMAGE}\"\nrun = \"python3 job.py\"\n[outputs]\npaths = [\"outputs/\"]\n"
        ),
    );
    s.up(sshd.port());
    let o = r.bridge(&["run", "train.toml"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert_eq!(String::from_utf8_lossy(&o.stdout), "in the image True\n");
    assert_eq!(
        fs::read_to_string(r.path("outputs/r.txt")).unwrap(),
        "over ssh\n"
    );
}

//! The Kubernetes provider on a real one-node cluster built on this machine
//! (tests/k8s/cluster.sh): a pod with a GPU request, the mirror under random
//! edits, a job's log and outputs, `bridge down`; the port-forward cut by an
//! API server restart during a job; what Kubernetes refuses, each in one
//! line with no pod left; the agent's idle shutdown ending the pod.

use std::fs;
use std::time::{Duration, Instant};

use bridge_tests::k8s::{Cluster, K8sRepo};
use bridge_tests::{Value, eventually, random_bytes, read_tree, read_tree_ignoring, tree_diff};

fn err(o: &std::process::Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn out(o: &std::process::Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// The one bridge pod in `default`.
fn the_pod(c: &Cluster) -> Value {
    let pods = c.bridge_pods("default");
    assert_eq!(pods.len(), 1, "bridge pods: {pods:?}");
    pods[0].clone()
}

/// Deterministic random edits: new files, rewrites, deletions, renames and
/// directories, `n` of them.
fn random_edits(r: &bridge_tests::Repo, n: usize, seed: u64) {
    let mut s = seed;
    let mut next = move |m: u64| {
        s = s
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (s >> 33) % m
    };
    for i in 0..n {
        let dir = format!("pkg{}", next(4));
        let name = format!("{dir}/f{}.py", next(12));
        let path = r.path(&name);
        match next(5) {
            0 | 1 => r.write(&name, format!("x = {i}\n").repeat(1 + next(300) as usize)),
            2 if path.exists() => r.remove(&name),
            3 if path.exists() => {
                let to = format!("{dir}/moved{}.py", next(50));
                r.rename(&name, &to);
            }
            _ => r.write(
                &format!("{dir}/data{}.bin", next(3)),
                random_bytes(1 + next(200_000) as usize, i as u64),
            ),
        }
    }
}

/// Stops the repository's daemon with `signal`, leaving the pod.
fn kill_daemon(k: &K8sRepo, signal: nix::sys::signal::Signal) {
    let pid: i32 = fs::read_to_string(k.repo.path(".bridge/daemon.pid"))
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), signal).unwrap();
    assert!(
        eventually(Duration::from_secs(30), || {
            nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), None).is_err()
                || fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|s| s.contains(") Z"))
        }),
        "the daemon did not exit"
    );
}

#[test]
fn a_pod_with_a_gpu_runs_the_agent_mirror_jobs_and_outputs_and_down_deletes_it() {
    let c = Cluster::shared();
    let _one = c.lock();
    let k = K8sRepo::new(c);
    let r = &k.repo;
    r.write(
        "train.py",
        "import os\nfor i in range(5):\n    print(f'step {i}', flush=True)\nos.makedirs('outputs', exist_ok=True)\nopen('outputs/model.bin','wb').write(bytes(range(256))*1000)\n",
    );
    r.write(
        "train.toml",
        "run = \"python3 train.py\"\n[outputs]\npaths = [\"outputs/\"]\n",
    );
    r.write("data/big.bin", random_bytes(2_000_000, 3));
    let o = k.up(&["--gpu", "1"]);
    assert!(o.status.success(), "{}", err(&o));
    assert!(
        err(&o).contains("copying the agent into pod"),
        "no upload progress: {}",
        err(&o)
    );

    // A Running pod with the GPU request, labelled as bridge's.
    let pod = the_pod(c);
    let name = pod["metadata"]["name"].as_str().unwrap().to_string();
    assert_eq!(pod["status"]["phase"], "Running", "{pod}");
    let limits = &pod["spec"]["containers"][0]["resources"]["limits"];
    assert_eq!(limits["nvidia.com/gpu"], "1", "{pod}");
    assert!(name.starts_with("bridge-repo-"), "{name}");
    // The token is not in the pod's spec.
    let token = fs::read_to_string(r.path(".bridge/token")).unwrap();
    assert!(!pod.to_string().contains(token.trim()));

    let st = k.status();
    assert_eq!(st["provider"], "k8s");
    assert_eq!(st["connection"], "connected");
    assert_eq!(st["k8s"]["pod"], name.as_str(), "{st}");
    assert_eq!(st["k8s"]["state"], "Running", "{st}");
    let text = k.ok(&["status"]);
    assert!(
        text.contains(&format!(
            "pod          default/{name} Running on bridge-node, 1 GPU"
        )),
        "{text}"
    );

    // Random edits: the mirror (read on the node, in the pod's volume)
    // equals the local tree, and the agent agrees on the root.
    let mirror_in_pod = st["mirror_path"].as_str().unwrap().to_string();
    let mirror = c.pod_path("default", &name, &mirror_in_pod);
    for round in 0..3 {
        random_edits(r, 60, round);
        k.ok(&["sync", "--wait"]);
        let local = read_tree(&r.root);
        let remote = read_tree_ignoring(&mirror, &r.root);
        assert!(
            local == remote,
            "round {round}:\n{}",
            tree_diff(&local, &remote)
        );
    }

    // A job streams its log and brings its outputs home.
    let o = k.bridge(&["run", "train.toml"]);
    assert!(o.status.success(), "{}", err(&o));
    assert_eq!(
        out(&o),
        "step 0\nstep 1\nstep 2\nstep 3\nstep 4\n",
        "{}",
        err(&o)
    );
    assert_eq!(
        fs::read(r.path("outputs/model.bin")).unwrap(),
        (0..=255u8).collect::<Vec<_>>().repeat(1000)
    );

    // The daemon dies; the next `up` finds the pod and its agent and
    // reuses them (nothing copied again).
    kill_daemon(&k, nix::sys::signal::Signal::SIGKILL);
    let o = k.up(&["--gpu", "1"]);
    assert!(o.status.success(), "{}", err(&o));
    assert!(
        err(&o).contains(&format!("reusing pod default/{name}")),
        "{}",
        err(&o)
    );
    assert!(!err(&o).contains("copying the agent"), "{}", err(&o));
    assert_eq!(the_pod(c)["metadata"]["uid"], pod["metadata"]["uid"]);

    // The pod is lost (deleted behind bridge's back, as an eviction or a
    // lost node would): `bridge status` says so in one line, and `bridge
    // up` makes a new one although the daemon still runs.
    c.kubectl(&["delete", "pod", "-n", "default", &name, "--wait=true"]);
    let text = k.ok(&["status"]);
    assert!(
        text.contains(&format!(
            "pod          default/{name} gone (deleted, or its node was lost)"
        )),
        "{text}"
    );
    let o = k.up(&["--gpu", "1"]);
    assert!(o.status.success(), "{}", err(&o));
    assert!(
        err(&o).contains("stopping its daemon and making a new one"),
        "{}",
        err(&o)
    );
    let third = the_pod(c);
    assert_ne!(third["metadata"]["uid"], pod["metadata"]["uid"]);
    assert_eq!(k.status()["connection"], "connected");

    let down = k.ok(&["down", "--force"]);
    assert!(
        down.contains(&format!("deleted pod default/{name}")),
        "{down}"
    );
    assert!(
        c.bridge_pods("default").is_empty(),
        "the pod is still there"
    );
    assert!(c.get(&["pod", "-n", "default", &name]).is_none());
    let o = k.bridge(&["status", "--json"]);
    assert!(!o.status.success());
}

#[test]
fn a_port_forward_cut_by_an_api_server_restart_loses_no_log_line() {
    let c = Cluster::shared();
    let _one = c.lock();
    let k = K8sRepo::new(c);
    let r = &k.repo;
    r.write(
        "count.py",
        "import time\nfor i in range(400):\n    print(f'line {i}', flush=True)\n    time.sleep(0.02)\nopen('outputs/done.txt','w').write('done\\n')\n",
    );
    r.write(
        "count.toml",
        "run = \"mkdir -p outputs && python3 count.py\"\n[outputs]\npaths = [\"outputs/\"]\n",
    );
    let o = k.up(&[]);
    assert!(o.status.success(), "{}", err(&o));
    let kc = c.kubeconfig().to_string_lossy().into_owned();
    let job = r.spawn(&["run", "count.toml"], &[("KUBECONFIG", &kc)], "count.out");
    // Cut while lines flow.
    let log = r.scratch("count.out");
    assert!(
        eventually(Duration::from_secs(30), || fs::read_to_string(&log)
            .is_ok_and(|t| t.contains("line 50"))),
        "the job did not start: {}",
        fs::read_to_string(log.with_extension("err")).unwrap_or_default()
    );
    c.restart_apiserver();
    let mut job = job;
    let started = Instant::now();
    let status = loop {
        if let Some(s) = job.try_wait().unwrap() {
            break s;
        }
        assert!(
            started.elapsed() < Duration::from_secs(120),
            "the job did not end"
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    let text = fs::read_to_string(&log).unwrap();
    assert!(
        status.success(),
        "{status}: {}",
        fs::read_to_string(log.with_extension("err")).unwrap_or_default()
    );
    let want: String = (0..400).map(|i| format!("line {i}\n")).collect();
    assert!(text == want, "lines lost or repeated:\n{text}");
    assert_eq!(
        fs::read_to_string(r.path("outputs/done.txt")).unwrap(),
        "done\n"
    );
    // The same pod all along.
    assert_eq!(c.bridge_pods("default").len(), 1);

    // The pod's image is the job's: a job naming it runs as is, one naming
    // another is refused, saying how to get a pod of it.
    r.write(
        "same.toml",
        "image = \"bridge-test/python:3.11\"\nrun = \"echo same image\"\n",
    );
    r.write(
        "other.toml",
        "image = \"python:3.12\"\nrun = \"echo never\"\n",
    );
    let o = k.bridge(&["run", "same.toml"]);
    assert_eq!(out(&o), "same image\n", "{}", err(&o));
    let o = k.bridge(&["run", "other.toml"]);
    assert!(!o.status.success());
    assert!(
        err(&o).contains("`bridge up --provider k8s --image python:3.12` makes a pod of it"),
        "{}",
        err(&o)
    );
}

#[test]
fn what_kubernetes_refuses_ends_up_in_one_line_and_leaves_no_pod() {
    let c = Cluster::shared();
    let _one = c.lock();
    let k = K8sRepo::new(c);
    k.repo.write("a.py", "print(1)\n");
    let no_pod_left = |what: &str| {
        for ns in ["default", "forbidden"] {
            let pods = c.bridge_pods(ns);
            assert!(pods.is_empty(), "{what}: pods left in {ns}: {pods:?}");
        }
        assert!(
            !k.repo.path(".bridge/provider.toml").exists(),
            "{what}: a provider was saved"
        );
    };

    // More GPUs than any node has.
    let e = err(&k.up(&["--gpu", "8", "--schedule-timeout", "3s"]));
    assert!(
        e.contains("cannot be scheduled: 0/1 nodes are available: 1 Insufficient nvidia.com/gpu"),
        "{e}"
    );
    no_pod_left("8 GPUs");

    // An image that is not there (and may not be pulled).
    let o = k.bridge(&[
        "up",
        "--provider",
        "k8s",
        "--image",
        "bridge-test/no-such-image:1",
        "--pull",
        "Never",
    ]);
    let e = err(&o);
    assert!(!o.status.success());
    assert!(e.contains("ErrImageNeverPull"), "{e}");
    assert!(e.contains("bridge-test/no-such-image:1"), "{e}");
    no_pod_left("missing image");

    // A namespace that does not exist.
    let e = err(&k.up(&["--namespace", "nowhere"]));
    assert!(e.contains("namespaces \"nowhere\" not found"), "{e}");
    assert!(e.contains("kubectl create namespace nowhere"), "{e}");
    no_pod_left("missing namespace");

    // A user without the right to make pods there (RBAC).
    let alice = K8sRepo::new(c).with_kubeconfig(c.alice());
    alice.repo.write("a.py", "print(1)\n");
    let e = err(&alice.up(&["--namespace", "forbidden"]));
    assert!(e.contains("Kubernetes refused to"), "{e}");
    assert!(e.contains("User \"alice\" cannot"), "{e}");
    no_pod_left("RBAC");

    // Flags checked before anything is sent.
    for (flags, says) in [
        (
            &["--cpu", "lots"][..],
            "--cpu \"lots\" is not a Kubernetes quantity",
        ),
        (&["--node-selector", "gpu"][..], "--node-selector \"gpu\""),
        (&["--toleration", "a:Maybe"][..], "the effect must be"),
        (&["--namespace", "Bad_NS"][..], "not a valid namespace name"),
        (&["--host", "x"][..], "are for --provider k8s"),
    ] {
        let e = err(&k.up(flags));
        assert!(e.contains(says), "{flags:?}: {e}");
        assert_eq!(
            e.trim().lines().count(),
            1,
            "{flags:?}: more than one line: {e}"
        );
        no_pod_left(&format!("{flags:?}"));
    }
}

#[test]
fn the_agents_idle_shutdown_ends_the_pod_and_a_new_up_makes_another() {
    let c = Cluster::shared();
    let _one = c.lock();
    let k = K8sRepo::new(c);
    k.repo.write("a.py", "print(1)\n");
    let o = k.up(&["--gpu", "2", "--idle-timeout", "2s"]);
    assert!(o.status.success(), "{}", err(&o));
    let first_pod = the_pod(c);
    let first = first_pod["metadata"]["name"].as_str().unwrap().to_string();
    let first_uid = first_pod["metadata"]["uid"].clone();
    // The daemon goes (SIGTERM: its attachment ends with it); nothing holds
    // the agent any more.
    kill_daemon(&k, nix::sys::signal::Signal::SIGTERM);
    let ended = eventually(Duration::from_secs(60), || {
        c.get(&["pod", "-n", "default", &first])
            .is_some_and(|p| p["status"]["phase"] == "Succeeded")
    });
    assert!(
        ended,
        "the pod did not complete: {:?}",
        c.get(&["pod", "-n", "default", &first])
    );
    // Its GPUs are free while it is still there: a pod asking for all 4 is
    // scheduled (the scheduler counts only pods that have not ended).
    c.apply(
        r#"{"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "four-gpus"},
            "spec": {"restartPolicy": "Never", "containers": [{"name": "c",
              "image": "bridge-test/python:3.11", "imagePullPolicy": "Never",
              "command": ["true"], "resources": {"limits": {"nvidia.com/gpu": "4"}}}]}}"#,
    );
    let scheduled = eventually(Duration::from_secs(30), || {
        c.get(&["pod", "-n", "default", "four-gpus"])
            .is_some_and(|p| p["spec"]["nodeName"].is_string())
    });
    let four = c.get(&["pod", "-n", "default", "four-gpus"]);
    c.kubectl(&["delete", "pod", "four-gpus", "--wait=true"]);
    assert!(scheduled, "4 GPUs were not free: {four:?}");
    // (The test image's stand-in nvidia-smi shows 2 GPUs, whatever the pod
    // was given: `--gpu` above 2 would fail bridge's own check.)
    let o = k.up(&["--gpu", "2"]);
    assert!(o.status.success(), "{}", err(&o));
    assert!(
        err(&o).contains("is Succeeded"),
        "no word on the ended pod: {}",
        err(&o)
    );
    let second = the_pod(c);
    assert_eq!(second["status"]["phase"], "Running");
    assert_eq!(
        second["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"],
        "2"
    );
    assert_ne!(second["metadata"]["uid"], first_uid);
}

#[test]
fn a_volume_keeps_the_agents_files_so_the_next_pod_starts_warm() {
    let c = Cluster::shared();
    let _one = c.lock();
    // A statically provisioned volume (the test cluster has no provisioner),
    // on this machine's disk.
    let pv = format!("bridge-test-pv-{}", std::process::id());
    let store = tempfile::tempdir().unwrap();
    c.apply(&format!(
        r#"{{"apiVersion": "v1", "kind": "PersistentVolume", "metadata": {{"name": "{pv}"}},
            "spec": {{"capacity": {{"storage": "2Gi"}}, "accessModes": ["ReadWriteOnce"],
              "persistentVolumeReclaimPolicy": "Retain",
              "hostPath": {{"path": "{}", "type": "Directory"}}}}}}"#,
        store.path().display()
    ));
    let k = K8sRepo::new(c);
    let r = &k.repo;
    r.write("data/weights.bin", random_bytes(3_000_000, 11));
    r.write("train.py", "print('warm')\n");
    let o = k.up(&["--volume", "1Gi"]);
    assert!(o.status.success(), "{}", err(&o));
    assert!(
        err(&o).contains("made volume claim default/"),
        "{}",
        err(&o)
    );
    let first = the_pod(c);
    let claim = format!("{}-data", first["metadata"]["name"].as_str().unwrap());
    let sent = k.status()["bytes_sent"].as_u64().unwrap();
    assert!(sent > 2_500_000, "{sent} bytes for 3 MB of random data");

    let down = k.ok(&["down"]);
    assert!(
        down.contains(&format!("kept volume claim default/{claim}")),
        "{down}"
    );
    assert!(c.get(&["pvc", "-n", "default", &claim]).is_some());

    // A new pod on the same claim: the mirror and the chunk store are there.
    let o = k.up(&["--volume", "1Gi"]);
    assert!(o.status.success(), "{}", err(&o));
    assert!(err(&o).contains("kept from before"), "{}", err(&o));
    let second = the_pod(c);
    assert_ne!(second["metadata"]["uid"], first["metadata"]["uid"]);
    let st = k.status();
    let resent = st["bytes_sent"].as_u64().unwrap();
    assert!(
        resent < 100_000,
        "{resent} bytes sent again to a warm volume: {st}"
    );
    let o = k.bridge(&["exec", "--", "python3", "train.py"]);
    assert_eq!(out(&o), "warm\n", "{}", err(&o));

    let down = k.ok(&["down", "--purge"]);
    assert!(
        down.contains(&format!("deleted volume claim default/{claim}")),
        "{down}"
    );
    assert!(
        eventually(Duration::from_secs(30), || c
            .get(&["pvc", "-n", "default", &claim])
            .is_none()),
        "the claim is still there"
    );
    c.kubectl(&["delete", "pv", &pv, "--wait=true"]);
}

/// The start and end (unix ns) a trial printed, from its log.
fn span(log: &str) -> (u128, u128) {
    let at = |what: &str| -> u128 {
        log.lines()
            .find_map(|l| l.strip_prefix(what))
            .unwrap_or_else(|| panic!("no {what:?} in the log:\n{log}"))
            .trim()
            .parse()
            .unwrap()
    };
    (at("start "), at("end "))
}

/// `placement = "cluster"`: a job and a sweep's trials each run as a
/// Kubernetes Job of their own, in pods that fetch the code from the head
/// pod's agent (the laptop uploads it once); logs and outputs come home
/// through the head as for any job; the GPUs are counted by Kubernetes'
/// scheduler (3 trials × 2 GPUs on 4: two at once, the third Pending until
/// one ends, and its log says why); a failed command fails the job with its
/// code; cancel deletes the Kubernetes Job.
#[test]
fn cluster_placement_runs_jobs_and_trials_as_kubernetes_jobs() {
    let c = Cluster::shared();
    let _one = c.lock();
    let k = K8sRepo::new(c);
    let r = &k.repo;
    r.write(
        "job.py",
        "import os, socket, sys, time\n\
         print('start', time.time_ns(), flush=True)\n\
         print('host', socket.gethostname(), flush=True)\n\
         print('code', open('lib/data.txt').read().strip(), flush=True)\n\
         print('blob', os.path.getsize('data/blob.bin'), flush=True)\n\
         x = sys.argv[1]\n\
         os.makedirs(f'outputs/{x}', exist_ok=True)\n\
         open(f'outputs/{x}/result.txt', 'w').write(f'result {x}\\n' * 1000)\n\
         for i in range(200):\n    print(f'line {x} {i}', flush=True)\n\
         time.sleep(float(os.environ.get('HOLD', '0')))\n\
         print('end', time.time_ns(), flush=True)\n\
         sys.exit(int(os.environ.get('EXIT', '0')))\n",
    );
    r.write("lib/data.txt", "v1\n");
    r.write("data/blob.bin", random_bytes(3_000_000, 7));
    r.write(
        "one.toml",
        "run = \"python3 job.py one\"\nplacement = \"cluster\"\n\
         [resources]\ngpus = 1\n[outputs]\npaths = [\"outputs/\"]\n",
    );
    let o = k.up(&[]);
    assert!(o.status.success(), "{}", err(&o));
    let head = the_pod(c)["metadata"]["name"].as_str().unwrap().to_string();
    let sent = || k.status()["bytes_sent"].as_u64().unwrap();
    assert!(
        sent() >= 3_000_000,
        "the code went to the head pod: {}",
        sent()
    );

    let o = k.bridge(&["run", "one.toml"]);
    let (so, se) = (out(&o), err(&o));
    assert!(o.status.success(), "{so}\n{se}");
    assert!(se.contains("running as Kubernetes Job"), "{se}");
    let lines: Vec<&str> = so.lines().filter(|l| l.starts_with("line one ")).collect();
    assert_eq!(lines.len(), 200, "{so}");
    assert!(so.contains("code v1"), "{so}");
    // It ran in the Job's pod, not the head.
    let host = so.lines().find_map(|l| l.strip_prefix("host ")).unwrap();
    assert_ne!(host, head);
    assert!(host.starts_with(&head), "{host}");
    let jobs = c.get(&["jobs", "-l", "bridge/managed=true"]).unwrap();
    let job = jobs["items"]
        .as_array()
        .unwrap()
        .iter()
        .find(|j| host.starts_with(j["metadata"]["name"].as_str().unwrap()))
        .unwrap_or_else(|| panic!("no Kubernetes Job for pod {host}: {jobs}"));
    assert_eq!(job["metadata"]["ownerReferences"][0]["name"], head.as_str());
    assert_eq!(
        job["spec"]["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"],
        "1"
    );
    assert_eq!(
        fs::read_to_string(r.path("outputs/one/result.txt")).unwrap(),
        "result one\n".repeat(1000)
    );

    // A failing command fails the job with its code.
    r.write("lib/data.txt", "v2\n");
    let o = k.bridge(&["run", "one.toml", "--set", "env.EXIT=3"]);
    assert!(!o.status.success());
    assert!(out(&o).contains("code v2"), "the new code: {}", out(&o));
    assert!(
        err(&o).contains("exit 3") || err(&o).contains("exit code 3"),
        "{}",
        err(&o)
    );

    // A sweep: 3 trials of 2 GPUs on the node's 4.
    r.write(
        "sweep.toml",
        "run = \"python3 job.py {x}\"\nplacement = \"cluster\"\n\
         [env]\nHOLD = \"6\"\n[resources]\ngpus = 2\n[outputs]\npaths = [\"outputs/\"]\n\
         [sweep]\n[sweep.params]\nx = [\"a\", \"b\", \"c\"]\n",
    );
    let sent_before = sent();
    // The pods as Kubernetes has them, every 200 ms while the sweep runs.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let watcher = {
        let stop = stop.clone();
        std::thread::spawn(move || {
            let (mut most, mut waited) = (0, false);
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                if let Some(pods) = c.get(&["pods", "-l", "bridge/job"]) {
                    let phase = |p: &str| {
                        pods["items"]
                            .as_array()
                            .unwrap()
                            .iter()
                            .filter(|x| x["status"]["phase"] == p)
                            .count()
                    };
                    let (running, pending) = (phase("Running"), phase("Pending"));
                    most = most.max(running);
                    waited |= running == 2 && pending == 1;
                }
                std::thread::sleep(Duration::from_millis(200));
            }
            (most, waited)
        })
    };
    let o = k.bridge(&["run", "sweep.toml"]);
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let (most_running, one_waited) = watcher.join().unwrap();
    let (so, se) = (out(&o), err(&o));
    assert!(o.status.success(), "{so}\n{se}");
    assert!(se.contains("3 of 3 trials succeeded"), "{se}");
    assert_eq!(most_running, 2, "at most two pods of 2 GPUs run on 4");
    assert!(
        one_waited,
        "the third pod was never seen Pending beside two Running"
    );
    // Each trial's pod had the 3 MB file, and the laptop sent (almost)
    // nothing more: the pods got the code from the head pod.
    let more = sent() - sent_before;
    assert!(more < 100_000, "the laptop sent {more} bytes for the sweep");
    // Output and bridge's own lines (stderr).
    let logs: Vec<String> = (0..3)
        .map(|i| {
            let o = k.bridge(&["logs", &format!("s1/{i}")]);
            format!("{}{}", out(&o), err(&o))
        })
        .collect();
    let spans: Vec<(u128, u128)> = logs.iter().map(|l| span(l)).collect();
    let mut most = 0;
    for &(s, _) in &spans {
        let at_once = spans.iter().filter(|&&(a, b)| a <= s && s < b).count();
        most = most.max(at_once);
    }
    assert_eq!(most, 2, "two trials of 2 GPUs fit on 4 at once: {spans:?}");
    assert!(
        logs.iter()
            .any(|l| l.contains("Insufficient nvidia.com/gpu")),
        "the trial that waited says why: {logs:?}"
    );
    for (i, x) in ["a", "b", "c"].iter().enumerate() {
        assert_eq!(logs[i].matches(&format!("line {x} ")).count(), 200);
        assert!(logs[i].contains("blob 3000000"), "{}", logs[i]);
        // Each trial's outputs/ came home apart, under outputs/s1/<trial>/.
        assert_eq!(
            fs::read_to_string(r.path(&format!("outputs/s1/{i}/{x}/result.txt"))).unwrap(),
            format!("result {x}\n").repeat(1000)
        );
    }

    // Cancel deletes the Kubernetes Job.
    let o = k.bridge(&["run", "one.toml", "--set", "env.HOLD=300", "--detach"]);
    assert!(o.status.success(), "{}", err(&o));
    let id = out(&o).trim().to_string();
    assert!(
        eventually(Duration::from_secs(60), || k
            .ok(&["logs", &id])
            .contains("line one 199")),
        "the long job did not start"
    );
    let count = || {
        c.get(&["jobs", "-l", "bridge/managed=true"]).unwrap()["items"]
            .as_array()
            .unwrap()
            .len()
    };
    let before = count();
    k.ok(&["cancel", &id]);
    assert!(
        eventually(Duration::from_secs(30), || count() == before - 1),
        "the cancelled job's Kubernetes Job is still there"
    );

    // `down` deletes the head pod; the Jobs it owns go with it.
    k.ok(&["down"]);
    assert!(
        eventually(Duration::from_secs(60), || count() == 0),
        "Kubernetes Jobs left after down"
    );
    // And their pods (the cancelled one stops at its SIGTERM, not at the
    // kill after its grace), so no GPU stays held.
    assert!(
        eventually(Duration::from_secs(60), || c
            .get(&["pods", "-l", "bridge/job"])
            .is_some_and(|p| p["items"].as_array().unwrap().is_empty())),
        "pods of Kubernetes Jobs left after down: {:?}",
        c.get(&["pods", "-l", "bridge/job"])
    );
}

/// `placement = "cluster"` on an agent that is not in a Kubernetes pod: one
/// clear line, nothing run.
#[test]
fn cluster_placement_off_kubernetes_is_a_clear_error() {
    let r = bridge_tests::Repo::new();
    r.write("t.toml", "run = \"echo ran\"\nplacement = \"cluster\"\n");
    r.up();
    let o = r.bridge(&["run", "t.toml"]);
    assert!(!o.status.success());
    let e = err(&o);
    assert!(
        e.contains("not in a Kubernetes pod") && e.contains("--provider k8s"),
        "{e}"
    );
    assert!(!out(&o).contains("ran"));
    r.write("t.toml", "run = \"echo ran\"\nplacement = \"moon\"\n");
    let o = r.bridge(&["run", "t.toml"]);
    assert!(
        err(&o).contains("t.toml:2") && err(&o).contains("\"cluster\""),
        "{}",
        err(&o)
    );
}

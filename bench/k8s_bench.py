#!/usr/bin/env python3
"""Benchmark the Kubernetes provider on a real one-node cluster built here
(tests/k8s/cluster.sh), next to its peers measured in the same run:

1. `bridge up` to a ready agent: `bridge up --provider k8s` on a small repository
   (a new pod, the agent copied in, the first sync), with the image already on
   the node, against the peer `kubectl run` of the same image + `kubectl wait
   --for=condition=Ready` + `kubectl exec POD -- true` (the least anyone does
   to get a shell in a new pod). --runs (5) of each, alternating; `bridge down`
   and `kubectl delete` between runs are not timed. Medians and the ratio.
2. Initial sync of the ml-repo (bench/repos.py, the scenario of BENCHMARKS.md,
   full size by default: 20,000 source files, 1.4 GiB of binaries, ignored
   .venv) through the API server's port-forward (`--provider k8s`) and over SSH
   to a private sshd on 127.0.0.1 (`--provider ssh`): the time of `bridge up`
   from an empty agent, alternating, --sync-runs (1) each.
3. Warm `bridge run` -> first log line on each of the two (a one-line job, the
   time from the command's start until its first stdout line), --runs each.

`--quick` (CI-sized): 2 runs, a 200-file ml-repo; asserts correctness only.
Needs the release binaries with the k8s and ssh providers and a static agent:

    cargo build --release --no-default-features --features bridge-cli/ssh,bridge-cli/k8s --bins
    python3 bench/k8s_bench.py --out bench/results/k8s.json
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))

from repos import write_ml_repo  # noqa: E402
from sshd import Sshd, ensure_sshd  # noqa: E402

IMAGE = "bridge-test/python:3.11"


def log(msg: str) -> None:
    print(f"[k8s_bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


class Cluster:
    def __init__(self, work: Path):
        self.dir = work / "cluster"
        self.proc = subprocess.Popen([str(ROOT / "tests/k8s/cluster.sh"), str(self.dir)],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        self.kubeconfig = None
        for line in self.proc.stdout:
            line = line.strip()
            if line.startswith("KUBECONFIG="):
                self.kubeconfig = line.split("=", 1)[1]
            if line == "ready":
                break
        if not self.kubeconfig:
            raise SystemExit("tests/k8s/cluster.sh did not start the cluster")

    def kubectl(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        return subprocess.run(["kubectl", "--kubeconfig", self.kubeconfig, *args],
                              capture_output=True, text=True, check=check)

    def stop(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(timeout=120)


def median(v: list[float]) -> float:
    return round(statistics.median(v), 3)


def run(cmd: list[str], env: dict, cwd: Path | None = None) -> float:
    t0 = time.perf_counter()
    p = subprocess.run(cmd, env=env, cwd=cwd, capture_output=True, text=True)
    dt = time.perf_counter() - t0
    if p.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed ({p.returncode}):\n{p.stdout}\n{p.stderr}")
    return dt


def peer_up(c: Cluster, i: int) -> float:
    name = f"peer-{i}"
    t0 = time.perf_counter()
    c.kubectl("run", name, f"--image={IMAGE}", "--image-pull-policy=Never", "--restart=Never",
              "--command", "--", "sleep", "3600")
    c.kubectl("wait", "--for=condition=Ready", f"pod/{name}", "--timeout=120s")
    c.kubectl("exec", name, "--", "true")
    dt = time.perf_counter() - t0
    c.kubectl("delete", "pod", name, "--grace-period=0", "--force", "--wait=true", check=False)
    return dt


def first_line(bridge: str, repo: Path, env: dict) -> float:
    t0 = time.perf_counter()
    p = subprocess.Popen([bridge, "-C", str(repo), "run", "hello.toml"], env=env,
                         stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    line = p.stdout.readline()
    dt = time.perf_counter() - t0
    p.wait(timeout=60)
    if line.strip() != "hello" or p.returncode != 0:
        raise SystemExit(f"the job printed {line!r}, exit {p.returncode}")
    return dt


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--sync-runs", type=int, default=1)
    ap.add_argument("--bridge", default=str(ROOT / "target/release/bridge"))
    ap.add_argument("--agent", default=str(ROOT / "target/x86_64-unknown-linux-gnu/release/bridge-agent"),
                    help="the agent copied into pods and uploaded over SSH (static)")
    ap.add_argument("--no-strip", action="store_true", help="upload the agent as built (with line tables)")
    ap.add_argument("--workdir", default="/tmp")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    runs = 2 if args.quick else args.runs
    Path(args.workdir).mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="k8s-bench-", dir=args.workdir))
    # The agent goes into every new pod (and over SSH to a new remote):
    # uploaded stripped, as the wheel installs it (the release profile's
    # line tables make it ~6x larger).
    agent = work / "bridge-agent"
    if shutil.which("strip") and not args.no_strip:
        subprocess.run(["strip", "-o", str(agent), args.agent], check=True)
    else:
        shutil.copy2(args.agent, agent)
    results: dict = {"runs": runs, "bridge": args.bridge, "agent": args.agent,
                     "agent_mib": round(os.path.getsize(agent) / 2**20, 1)}
    cluster = Cluster(work)
    sshd = None
    try:
        env = dict(os.environ, KUBECONFIG=cluster.kubeconfig, BRIDGE_AGENT_BIN=str(agent))
        env.pop("BRIDGE_LOG", None)
        k8s_up = ["up", "--provider", "k8s", "--image", IMAGE, "--pull", "Never", "-q"]

        # 1. up to a ready agent, alternating with the peer.
        small = work / "small"
        small.mkdir()
        subprocess.run(["git", "init", "-q", str(small)], check=True)
        (small / "train.py").write_text("print('hello')\n")
        ups, peers = [], []
        peer_up(cluster, 999)  # the image's first use on the node, untimed
        for i in range(runs):
            peers.append(peer_up(cluster, i))
            ups.append(run([args.bridge, "-C", str(small), *k8s_up], env))
            run([args.bridge, "-C", str(small), "down", "-q"], env)
            log(f"up run {i}: bridge {ups[-1]:.2f} s, kubectl {peers[-1]:.2f} s")
        results["up"] = {"bridge_s": ups, "kubectl_s": peers, "bridge_median_s": median(ups),
                         "kubectl_median_s": median(peers),
                         "ratio": round(statistics.median(ups) / statistics.median(peers), 2)}

        # 2. the ml-repo's initial sync: port-forward against SSH.
        err = ensure_sshd(log)
        if err:
            raise SystemExit(f"no sshd: {err}")
        sshd = Sshd(work / "sshd", comment="k8s_bench")
        sshd.start()
        ssh_dir = sshd.client_dir(work / "client-ssh", [sshd.port])
        ssh_env = dict(env, BRIDGE_SSH_DIR=str(ssh_dir), BRIDGE_KNOWN_HOSTS=str(work / "known_hosts"),
                       SSH_AUTH_SOCK="")
        cfg = (dict(files=200, dirs=10, bins=[1, 2, 4], venv=300) if args.quick
               else dict(files=20_000, dirs=500, bins=[100, 300, 1024], venv=100_000))
        repos = {}
        for name in ("k8s", "ssh"):
            log(f"writing the ml-repo for {name}: {cfg}")
            repos[name] = write_ml_repo(work / f"ml-{name}", cfg["files"], cfg["dirs"], cfg["bins"],
                                        cfg["venv"], 0, 1).path
            (repos[name] / "hello.toml").write_text("run = \"echo hello\"\n")
        syncs = {"k8s": [], "ssh": []}
        for i in range(args.sync_runs):
            for name in ("k8s", "ssh"):
                repo = repos[name]
                if name == "k8s":
                    dt = run([args.bridge, "-C", str(repo), *k8s_up], env)
                else:
                    remote = work / f"remote-{i}"
                    dt = run([args.bridge, "-C", str(repo), "up", "-q", "--host", f"root@127.0.0.1:{sshd.port}",
                              "--remote-dir", str(remote)], ssh_env)
                syncs[name].append(dt)
                log(f"ml-repo initial sync over {name}: {dt:.2f} s")
                if i + 1 < args.sync_runs:
                    down = ["down", "-q"] if name == "k8s" else ["down", "-q", "--remote", "--purge", "--force"]
                    run([args.bridge, "-C", str(repo), *down], env if name == "k8s" else ssh_env)
        results["ml_repo_sync"] = {"config": cfg, "k8s_s": syncs["k8s"], "ssh_s": syncs["ssh"],
                                   "ratio_k8s_to_ssh": round(statistics.median(syncs["k8s"])
                                                             / statistics.median(syncs["ssh"]), 2)}

        # 3. warm run -> first log line.
        first = {"k8s": [], "ssh": []}
        for name in ("k8s", "ssh"):
            first_line(args.bridge, repos[name], env if name == "k8s" else ssh_env)  # warm-up
        for _ in range(runs):
            for name in ("k8s", "ssh"):
                first[name].append(first_line(args.bridge, repos[name], env if name == "k8s" else ssh_env))
        results["first_line"] = {"k8s_s": first["k8s"], "ssh_s": first["ssh"],
                                 "k8s_median_ms": round(statistics.median(first["k8s"]) * 1000, 1),
                                 "ssh_median_ms": round(statistics.median(first["ssh"]) * 1000, 1)}
        run([args.bridge, "-C", str(repos["k8s"]), "down", "-q"], env)
        run([args.bridge, "-C", str(repos["ssh"]), "down", "-q", "--remote", "--purge", "--force"], ssh_env)
    finally:
        if sshd:
            sshd.stop()
        cluster.stop()
    print(json.dumps(results, indent=2))
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=2) + "\n")
    shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

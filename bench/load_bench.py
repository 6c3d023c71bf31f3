#!/usr/bin/env python3
"""Load: many jobs under an edit storm, and a repository of a million files
(issue 22), on the local provider with 4 fake GPUs (tests/fixtures/nvidia-smi),
loopback only.

    storm     an edit storm (1,000 files rewritten per second for 30 s, in
              ticks of 100 files every 100 ms) while 10 jobs (1 GPU each, 4
              GPUs: they queue) are submitted at once in the middle of it.
              Each job prints the tree root of its own snapshot as the agent
              computes a mirror's (`bridge-agent tree-root`) and its
              BRIDGE_GENERATION: they must be equal (the job saw exactly its
              generation, nothing from later edits and nothing missing). After
              the storm: how long until the mirror is exact (`bridge sync
              --wait`), and the peak RSS (VmHWM) of the daemon and the agent.
    million   a generated repository of 1,000,000 small files (1,000
              directories × 1,000): the first `bridge up` until in sync, the
              daemon's and the agent's peak RSS during it, and their RSS once
              idle, per file.

`--quick` (CI): debug binaries, a 3 s storm of 100 files per second with 4
jobs, and 5,000 files; it asserts that every job saw its generation and
that the mirror converged, never a timing.

Usage:
    cargo build --release --bins
    python3 bench/load_bench.py                 # ~10 min, ~10 GB of disk
    python3 bench/load_bench.py --only storm
    cargo build --bins && python3 bench/load_bench.py --quick
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))
sys.dont_write_bytecode = True
from bridgectl import Bridge  # noqa: E402
from common import (  # noqa: E402
    BenchError, add_bridge_info, base_machine_info, check_binaries, git_init,
    compare_trees, install_term_handlers, log, proc_mem_kib, render_errors, write_results)

GPUS = 4


class Sampler(threading.Thread):
    """Samples the RSS of some pids every 50 ms; keeps each one's peak (also
    read from VmHWM at the end, which catches what sampling misses)."""

    def __init__(self, pids: dict[str, int]):
        super().__init__(daemon=True)
        self.pids = pids
        self.peak_kib = {k: 0 for k in pids}
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.is_set():
            self.sample()
            time.sleep(0.05)

    def sample(self) -> None:
        for k, pid in self.pids.items():
            m = proc_mem_kib(pid)
            self.peak_kib[k] = max(self.peak_kib[k], m.get("VmRSS", 0), m.get("VmHWM", 0))

    def finish(self) -> dict[str, float]:
        self.stop.set()
        self.join()
        self.sample()
        return {k: round(v / 1024, 1) for k, v in self.peak_kib.items()}


def pids_of(b: Bridge) -> dict[str, int]:
    st = b.status()
    agent = int((b.repo / ".bridge" / "agent.pid").read_text().strip())
    return {"daemon": st["daemon_pid"], "agent": agent}


def storm(b: Bridge, agent_exe: Path, files: int, per_tick: int, ticks: int, jobs: int) -> dict:
    """The storm scenario; returns its figures and what went wrong."""
    repo = b.repo
    for i in range(files):
        d = repo / "storm" / f"d{i % 50:02d}"
        d.mkdir(parents=True, exist_ok=True)
        (d / f"f{i:05d}.txt").write_text(f"file {i} tick -1\n" * 8)
    (repo / "job.toml").write_text(
        f'name = "gen"\nrun = "{agent_exe} tree-root . ; echo $BRIDGE_GENERATION; sleep 1"\n'
        "[resources]\ngpus = 1\n")
    b.up()
    pids = pids_of(b)
    sampler = Sampler(pids)
    sampler.start()
    stop = threading.Event()
    written = [0]

    def edit() -> None:
        t0 = time.perf_counter()
        for tick in range(ticks):
            for k in range(per_tick):
                i = (tick * per_tick + k) % files
                p = repo / "storm" / f"d{i % 50:02d}" / f"f{i:05d}.txt"
                p.write_text(f"file {i} tick {tick}\n" * 8)
                written[0] += 1
            # Ticks every 100 ms, whatever the writes took.
            time.sleep(max(0.0, t0 + (tick + 1) * 0.1 - time.perf_counter()))
            if stop.is_set():
                return

    editor = threading.Thread(target=edit, daemon=True)
    t_storm = time.perf_counter()
    editor.start()
    time.sleep(ticks * 0.1 / 2)
    # The jobs, submitted at once in the middle of the storm.
    procs = [subprocess.Popen(b.args("run", "job.toml", "--detach"), env=b.env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(jobs)]
    ids, errors = [], []
    for p in procs:
        out, err = p.communicate(timeout=600)
        if p.returncode != 0:
            errors.append(f"submit exited {p.returncode}: {err[-300:]}")
        else:
            ids.append(out.strip())
    editor.join()
    storm_s = time.perf_counter() - t_storm
    t_end = time.perf_counter()
    b.sync_wait()
    converge_s = time.perf_counter() - t_end
    # Every job to its end.
    deadline = time.monotonic() + 600
    while True:
        listed = json.loads(b.bridge("ps", "--all", "--json").stdout)["jobs"]
        mine = [j for j in listed if j["id"] in ids]
        if all(j["state"] in ("succeeded", "failed", "cancelled", "lost") for j in mine):
            break
        if time.monotonic() > deadline:
            errors.append("jobs did not end within 10 min")
            break
        time.sleep(0.2)
    peaks = sampler.finish()
    generations = set()
    for j in mine:
        if j["state"] != "succeeded":
            errors.append(f"job {j['id']}: {j['state']} ({j['reason']})")
            continue
        lines = b.bridge("logs", j["id"]).stdout.split()
        if len(lines) != 2 or lines[0] != lines[1] or lines[1] != j["generation"]:
            errors.append(f"job {j['id']} saw {lines[:1]} at generation {j['generation'][:12]}")
        generations.add(j["generation"])
    # Exact after the storm.
    try:
        compare_trees(repo, b.mirror, frozenset({".git", ".bridge"}))
    except BenchError as e:
        errors.append(f"after the storm: {e}")
    return {
        "files": files, "edits": written[0], "storm_s": round(storm_s, 2),
        "edits_per_s": round(written[0] / storm_s, 1), "jobs": len(ids),
        "jobs_own_generation": sum(1 for j in mine if j["state"] == "succeeded") - sum(
            1 for e in errors if e.startswith("job ")),
        "distinct_generations": len(generations), "converge_after_storm_s": round(converge_s, 3),
        "peak_rss_mib": peaks, "errors": errors,
    }


def million(b: Bridge, files: int) -> dict:
    """The million-file scenario."""
    repo = b.repo
    per_dir = 1000
    t0 = time.perf_counter()
    for d in range((files + per_dir - 1) // per_dir):
        dd = repo / "m" / f"d{d:04d}"
        dd.mkdir(parents=True)
        for i in range(min(per_dir, files - d * per_dir)):
            fd = os.open(dd / f"f{i:04d}", os.O_WRONLY | os.O_CREAT, 0o644)
            os.write(fd, b"%d\n" % (d * per_dir + i))
            os.close(fd)
    gen_s = time.perf_counter() - t0
    log(f"million: {files} files generated in {gen_s:.1f} s")
    # `up` in the background, sampling both processes from their start.
    b.up_done = True
    proc = subprocess.Popen(b.args(*b.up_args), env=b.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    t_up = time.perf_counter()
    pids: dict[str, int] = {}
    peak = {"daemon": 0, "agent": 0}
    while proc.poll() is None:
        for k, f in (("daemon", "daemon.pid"), ("agent", "agent.pid")):
            if k not in pids:
                try:
                    pids[k] = int((repo / ".bridge" / f).read_text().strip())
                except (OSError, ValueError):
                    continue
            m = proc_mem_kib(pids[k])
            peak[k] = max(peak[k], m.get("VmHWM", 0), m.get("VmRSS", 0))
        time.sleep(0.05)
    up_s = time.perf_counter() - t_up
    _, err = proc.communicate()
    if proc.returncode != 0:
        raise BenchError(f"bridge up exited {proc.returncode}: {err[-1000:]}")
    for k in pids:
        m = proc_mem_kib(pids[k])
        peak[k] = max(peak[k], m.get("VmHWM", 0))
    # Idle: let both settle, then their resident memory per file.
    time.sleep(5)
    idle = {k: proc_mem_kib(pid).get("VmRSS", 0) for k, pid in pids.items()}
    st = b.status()
    b.daemon_pid, b.agent_pid = pids.get("daemon"), None
    errors = []
    if st.get("files") != files:
        errors.append(f"status counts {st.get('files')} files, not {files}")
    return {
        "files": files, "generate_s": round(gen_s, 1), "up_s": round(up_s, 2),
        "peak_rss_mib": {k: round(v / 1024, 1) for k, v in peak.items()},
        "idle_rss_mib": {k: round(v / 1024, 1) for k, v in idle.items()},
        "idle_bytes_per_file": {k: round(v * 1024 / files) for k, v in idle.items()},
        "errors": errors,
    }


def render(r: dict) -> str:
    lines = ["load (local provider, 4 fake GPUs)", ""]
    s = r.get("storm")
    if s:
        lines += [
            f"  storm: {s['edits']} rewrites of {s['files']} files in {s['storm_s']} s "
            f"({s['edits_per_s']}/s), {s['jobs']} jobs submitted at once in the middle",
            f"    jobs that saw exactly their generation   {s['jobs_own_generation']} of {s['jobs']} "
            f"({s['distinct_generations']} distinct generations)",
            f"    mirror exact after the storm ended       {s['converge_after_storm_s'] * 1000:.0f} ms",
            f"    peak RSS: daemon {s['peak_rss_mib']['daemon']} MiB, agent {s['peak_rss_mib']['agent']} MiB",
        ]
    m = r.get("million")
    if m:
        lines += [
            f"  {m['files']:,} files: first up until in sync {m['up_s']} s "
            f"(generated in {m['generate_s']} s)",
            f"    peak RSS during it: daemon {m['peak_rss_mib']['daemon']} MiB, "
            f"agent {m['peak_rss_mib']['agent']} MiB",
            f"    idle RSS: daemon {m['idle_rss_mib']['daemon']} MiB "
            f"({m['idle_bytes_per_file']['daemon']} B/file), agent {m['idle_rss_mib']['agent']} MiB "
            f"({m['idle_bytes_per_file']['agent']} B/file)",
        ]
    render_errors(lines, r["errors"])
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="debug binaries, small sizes, correctness only")
    ap.add_argument("--bridge", default=os.environ.get("BRIDGE_BIN"),
                    help="bridge binary (bridge-agent next to it); default target/release/bridge")
    ap.add_argument("--only", choices=["storm", "million"])
    ap.add_argument("--files", type=int, help="files of the million scenario (full: 1,000,000)")
    ap.add_argument("--out", help="JSON results (default bench/results/load.json)")
    ap.add_argument("--workdir", default="/tmp")
    ap.add_argument("--keep", action="store_true")
    args = ap.parse_args()
    exe = Path(args.bridge or ROOT / "target" / ("debug" if args.quick else "release") / "bridge").resolve()
    agent = exe.with_name("bridge-agent")
    out = Path(args.out or HERE / "results" / ("load-quick.json" if args.quick else "load.json"))
    if not check_binaries(exe, f"cargo build {'' if args.quick else '--release '}--bins"):
        return 2
    install_term_handlers()
    info = base_machine_info()
    add_bridge_info(info, exe, rebuild="rebuild")
    results: dict = {"config": {"quick": args.quick, "bridge": str(exe)}, "machine": info, "errors": {}}
    Path(args.workdir).mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="bridge-loadbench-", dir=args.workdir))
    env = dict(os.environ, PATH=f"{ROOT / 'tests' / 'fixtures'}:{os.environ.get('PATH', '')}",
               BRIDGE_FAKE_GPUS=str(GPUS))
    env.pop("BRIDGE_LOG", None)
    env.pop("MLFLOW_TRACKING_URI", None)
    t0 = time.perf_counter()
    try:
        for name in ("storm", "million"):
            if args.only and args.only != name:
                continue
            repo = work / name / "repo"
            git_init(repo)
            b = Bridge(name, exe, repo, env, ["up", "--provider", "local"])
            try:
                if name == "storm":
                    r = storm(b, agent, files=1000 if args.quick else 10_000,
                              per_tick=10 if args.quick else 100, ticks=30 if args.quick else 300,
                              jobs=4 if args.quick else 10)
                else:
                    r = million(b, args.files or (5000 if args.quick else 1_000_000))
                results[name] = r
                if r["errors"]:
                    results["errors"][name] = "; ".join(r["errors"][:5])
            except BenchError as e:
                results["errors"][name] = str(e)
            finally:
                b.down()
                shutil.rmtree(repo.parent, ignore_errors=True)
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    results["total_s"] = round(time.perf_counter() - t0, 1)
    write_results(out, results, render)
    return 1 if results["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())

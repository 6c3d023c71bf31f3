#!/usr/bin/env python3
"""Benchmark a sweep's scheduling overhead per trial, on the local provider
with 4 fake GPUs (tests/fixtures/nvidia-smi), loopback only:

    sweep       `bridge run sweep.toml`: 100 trials (`workers = 100`) of
                `true`, 1 GPU each, so 4 run at once
    sequential  100 `bridge exec --gpus 1 -- true`, one after the other
    ideal       100 × one process start of `/bin/sh -c true` / 4

Per trial, the sweep's overhead is its wall time over the ideal's, two ways:
per GPU slot ((sweep − ideal) × 4 / 100: what a trial costs the slot it runs
in beyond starting its process) and amortized over the sweep ((sweep −
ideal) / 100). The sweep's wall time is `bridge run` from start to exit:
the barrier, the submit, every trial, the summary. Rounds alternate sweep
and sequential, so both see the same machine; medians.

`--quick` (CI): debug binaries, 12 trials, one round; asserts that every
trial succeeded and ran on a GPU of its own, never a timing.

Usage:
    cargo build --release --bins
    python3 bench/sweep_bench.py                  # ~2 min
    cargo build --bins && python3 bench/sweep_bench.py --quick
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))
sys.dont_write_bytecode = True
from bridgectl import Bridge  # noqa: E402
from common import (  # noqa: E402
    BenchError, add_bridge_info, base_machine_info, check_binaries, git_init,
    install_term_handlers, log, summarize, write_results)

GPUS = 4


def process_start_s(n: int) -> float:
    """Median wall time of `/bin/sh -c true`, started as a job's command is."""
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        subprocess.run(["/bin/sh", "-c", "true"], check=True)
        times.append(time.perf_counter() - t0)
    times.sort()
    return times[len(times) // 2]


def run_sweep(b: Bridge, trials: int) -> tuple[float, dict]:
    """`bridge run sweep.toml` of `trials` workers; its wall time and the
    sweep's status JSON."""
    (b.repo / "sweep.toml").write_text(
        f'name = "bench"\nrun = "true"\n[resources]\ngpus = 1\n[sweep]\nworkers = {trials}\n')
    t0 = time.perf_counter()
    cp = b.bridge("run", "sweep.toml", timeout=600, check=False)
    wall = time.perf_counter() - t0
    if cp.returncode != 0:
        raise BenchError(f"bridge run sweep.toml exited {cp.returncode}: {cp.stderr[-2000:]}")
    sid = next((l.split()[2] for l in cp.stderr.splitlines() if l.startswith("bridge: sweep s")), None)
    if sid is None:
        raise BenchError(f"no sweep id in {cp.stderr[-500:]}")
    st = json.loads(b.bridge("sweep", "status", sid, "--json").stdout)
    return wall, st


def agent_cpu_s(b: Bridge) -> float | None:
    """CPU time of the local agent and its reaped children (the shims and
    their commands), in seconds."""
    try:
        pid = int((b.repo / ".bridge" / "agent.pid").read_text().strip())
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return sum(int(x) for x in fields[11:15]) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return None


def run_sequential(b: Bridge, n: int) -> float:
    t0 = time.perf_counter()
    for _ in range(n):
        b.bridge("exec", "--gpus", "1", "--", "true", timeout=120)
    return time.perf_counter() - t0


def check_sweep(st: dict, trials: int) -> list[str]:
    """What is wrong with a finished sweep (quick mode's assertions)."""
    bad = []
    if st["state"] != "succeeded":
        bad.append(f"sweep {st['id']} is {st['state']}")
    if len(st["trials"]) != trials:
        bad.append(f"{len(st['trials'])} trials, not {trials}")
    for t in st["trials"]:
        if t["state"] != "succeeded" or len(t["gpus"]) != 1:
            bad.append(f"trial {t['index']}: {t['state']} on GPUs {t['gpus']}")
    return bad


def render(r: dict) -> str:
    lines = ["sweep scheduling overhead (local provider, 4 fake GPUs)", ""]
    s = r.get("summary")
    if s:
        n = r["config"]["trials"]
        lines += [
            f"  trials per sweep            {n} × `true`, 1 GPU each, {GPUS} at once",
            f"  process start (sh -c true)  {s['process_start_ms']:.2f} ms",
            f"  ideal ({n} × start / {GPUS})      {s['ideal_s'] * 1000:.0f} ms",
            f"  sweep, bridge run wall      {s['sweep_s']['median'] * 1000:.0f} ms (median of {s['sweep_s']['n']})",
        ]
        if s["sequential_s"]["n"]:
            lines.append(f"  sequential bridge exec      {s['sequential_s']['median'] * 1000:.0f} ms "
                         f"({s['sequential_s']['median'] / n * 1000:.1f} ms each)")
        lines += [
            f"  first trial start → last end  {s['trials_span_s']['median'] * 1000:.0f} ms",
            f"  overhead per trial, per GPU slot   {s['overhead_per_slot_ms']:.1f} ms (target ≤ 20 ms)",
            f"    of which the agent's (start → end span)   {s['agent_per_slot_ms']:.1f} ms",
        ]
        if s.get("agent_cpu_per_trial_ms") is not None:
            lines.append(f"  CPU per trial (agent, shim, command)  {s['agent_cpu_per_trial_ms']:.1f} ms "
                         f"on {s['cores']} cores: {GPUS} slots need ≥ "
                         f"{s['agent_cpu_per_trial_ms'] * GPUS / s['cores']:.1f} ms per trial per slot")
        lines += [
            f"  overhead per trial, amortized      {s['overhead_amortized_ms']:.1f} ms",
        ]
        if s["speedup"]:
            lines.append(f"  sweep vs sequential         {s['speedup']:.1f}× faster")
    from common import render_errors
    render_errors(lines, r["errors"])
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="debug binaries, 12 trials, correctness only")
    ap.add_argument("--bridge", default=os.environ.get("BRIDGE_BIN"),
                    help="bridge binary (bridge-agent next to it); default target/release/bridge")
    ap.add_argument("--trials", type=int, help="trials per sweep (full: 100)")
    ap.add_argument("--rounds", type=int, help="sweep/sequential rounds (full: 5)")
    ap.add_argument("--out", help="JSON results (default bench/results/sweep.json)")
    ap.add_argument("--workdir", default="/tmp")
    ap.add_argument("--keep", action="store_true")
    args = ap.parse_args()
    trials = args.trials or (12 if args.quick else 100)
    rounds = args.rounds or (1 if args.quick else 5)
    exe = Path(args.bridge or ROOT / "target" / ("debug" if args.quick else "release") / "bridge").resolve()
    out = Path(args.out or HERE / "results" / ("sweep-quick.json" if args.quick else "sweep.json"))
    if not check_binaries(exe, f"cargo build {'' if args.quick else '--release '}--bins"):
        return 2
    install_term_handlers()
    info = base_machine_info()
    add_bridge_info(info, exe, rebuild="rebuild")
    results: dict = {"config": {"quick": args.quick, "trials": trials, "rounds": rounds, "gpus": GPUS,
                                "bridge": str(exe)},
                     "machine": info, "rounds": [], "errors": {}}
    work = Path(tempfile.mkdtemp(prefix="bridge-sweepbench-", dir=args.workdir))
    Path(args.workdir).mkdir(parents=True, exist_ok=True)
    peer = None
    t0 = time.perf_counter()
    try:
        repo = work / "repo"
        git_init(repo)
        (repo / "README").write_text("sweep bench\n")
        env = dict(os.environ, PATH=f"{ROOT / 'tests' / 'fixtures'}:{os.environ.get('PATH', '')}",
                   BRIDGE_FAKE_GPUS=str(GPUS))
        env.pop("BRIDGE_LOG", None)
        env.pop("MLFLOW_TRACKING_URI", None)
        peer = Bridge("bridge", exe, repo, env, ["up", "--provider", "local"])
        peer.up()
        start = process_start_s(50 if args.quick else 500)
        # One warm-up of each: the first job of an agent builds its caches.
        run_sweep(peer, GPUS)
        peer.bridge("exec", "--", "true", timeout=120)
        sweeps, seqs, spans, cpus = [], [], [], []
        for i in range(rounds):
            cpu0 = agent_cpu_s(peer)
            wall, st = run_sweep(peer, trials)
            cpu1 = agent_cpu_s(peer)
            if cpu0 is not None and cpu1 is not None:
                cpus.append((cpu1 - cpu0) / trials)
            bad = check_sweep(st, trials)
            if bad:
                results["errors"][f"round_{i}"] = "; ".join(bad[:5])
            durations = sorted((t["duration_s"] or 0.0) for t in st["trials"])
            # The agent's part alone: first trial started → last one ended.
            span = (max(t["finished_ms"] for t in st["trials"])
                    - min(t["started_ms"] for t in st["trials"])) / 1000
            seq = None if args.quick else run_sequential(peer, trials)
            results["rounds"].append({"sweep_s": round(wall, 4), "sequential_s": seq and round(seq, 4),
                                      "trials_span_s": round(span, 4),
                                      "trial_duration_median_s": durations[len(durations) // 2]})
            sweeps.append(wall)
            spans.append(span)
            if seq is not None:
                seqs.append(seq)
            log(f"round {i + 1}/{rounds}: sweep {wall:.3f} s" + (f", sequential {seq:.3f} s" if seq else ""))
        ideal = trials * start / GPUS
        sw = summarize(sweeps, 4)
        results["summary"] = {
            "process_start_ms": round(start * 1000, 3),
            "ideal_s": round(ideal, 4),
            "sweep_s": sw,
            "sequential_s": summarize(seqs, 4),
            "overhead_per_slot_ms": round((sw["median"] - ideal) * GPUS / trials * 1000, 2),
            "overhead_amortized_ms": round((sw["median"] - ideal) / trials * 1000, 2),
            "trials_span_s": summarize(spans, 4),
            "agent_per_slot_ms": round((summarize(spans, 4)["median"] - ideal) * GPUS / trials * 1000, 2),
            "agent_cpu_per_trial_ms": round(summarize(cpus, 6)["median"] * 1000, 2) if cpus else None,
            "cores": len(os.sched_getaffinity(0)),
            "speedup": round(summarize(seqs, 4)["median"] / sw["median"], 2) if seqs else None,
        }
    except BenchError as e:
        results["errors"]["setup"] = str(e)
        log(f"error: {e}")
    except KeyboardInterrupt:
        results["errors"]["interrupted"] = "interrupted"
    finally:
        if peer is not None:
            e = peer.down()
            if e:
                results["errors"].setdefault("down", e)
        if args.keep:
            log(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    results["total_s"] = round(time.perf_counter() - t0, 1)
    write_results(out, results, render)
    return 1 if results["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python3
"""Benchmark `bridge kernel` against the same ipykernel run locally, on this
machine (loopback only), each kernel started by jupyter_client's
KernelManager through its kernelspec, as a front end does:

    local      ipykernel in the Jupyter venv, no bridge (the baseline)
    bridge     `bridge kernel` on the local provider
    bridge_ssh `bridge kernel` on the SSH provider (`bridge up --host
               root@127.0.0.1:PORT`, a private sshd)

1. Round trip of a trivial cell: `pass`'s execute_request → execute_reply,
   --rtts (1000) times per kernel; medians, p99, and the median added over
   the local kernel.
2. Save → cell sees it: pkg/mod.py rewritten, then `mod.value()` executed
   at once under `%autoreload 2` until it shows the new value; --edits (100)
   per kernel, p50/p99. Beside it, for each bridge peer, the sync's own
   edit → mirror time (the file's new content in the mirror), --edits
   times, 50 ms apart.

The three kernels are started by one client process (bench/kernel_measure.py,
run with the Jupyter venv's Python) and measured in 10 rounds whose order
rotates, so they share the machine's conditions. `--quick` (CI): debug binaries, 20
round trips, 10 edits; asserts that every value was right, never a timing.
Needs the Jupyter venv tests/run installs (BRIDGE_JUPYTER_VENV or
~/.cache/bridge/jupyter-*-venv) and its wheelhouse (the agent installs
ipykernel from it, with no network).

Usage:
    cargo build --release --bins
    python3 bench/kernel_bench.py                 # ~3 min
    cargo build --bins && python3 bench/kernel_bench.py --quick
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))
sys.dont_write_bytecode = True
from sshd import Sshd, SshdError, ensure_sshd  # noqa: E402
from bridgectl import Bridge  # noqa: E402
from common import (  # noqa: E402
    BenchError, add_bridge_info, base_machine_info, check_binaries, git_init,
    install_term_handlers, log, summarize, wait_content, write_results)


def jupyter_python() -> Path:
    venv = os.environ.get("BRIDGE_JUPYTER_VENV")
    cands = [Path(venv)] if venv else []
    cands += [Path(p) for p in sorted(glob.glob(os.path.expanduser("~/.cache/bridge/jupyter-*-venv")),
                                      key=os.path.getmtime, reverse=True)]
    for c in cands:
        py = c / "bin" / "python3"
        if py.exists() and subprocess.run([str(py), "-c", "import jupyter_client, ipykernel"],
                                          capture_output=True).returncode == 0:
            return py
    raise BenchError("no Jupyter venv: run tests/run once (it installs tests/python/requirements-kernel.txt)")


def wheelhouse() -> str:
    w = os.environ.get("BRIDGE_WHEELHOUSE") or os.path.expanduser("~/.cache/bridge/wheels")
    if not os.path.isdir(w):
        raise BenchError(f"no wheelhouse at {w}: run tests/wheels")
    return w


def write_package(repo: Path) -> None:
    (repo / "pkg").mkdir(parents=True, exist_ok=True)
    (repo / "pkg" / "__init__.py").write_text("")
    (repo / "pkg" / "mod.py").write_text("def value():\n    return 0\n")


def measure(py: Path, env: dict, kernels: list[tuple[str, str, Path]], rtts: int, edits: int,
            rounds: int) -> dict:
    """All kernels in one interleaved run (bench/kernel_measure.py)."""
    cp = subprocess.run([str(py), str(HERE / "kernel_measure.py"), str(rtts), str(edits), str(rounds),
                         *[f"{k}={repo}" for _, k, repo in kernels]],
                        env=env, capture_output=True, text=True, timeout=3600)
    if cp.returncode != 0:
        raise BenchError(f"kernel_measure failed:\n{cp.stderr[-3000:]}")
    r = json.loads(cp.stdout.strip().splitlines()[-1])
    return {name: {"rtt_ms": summarize(r[k]["rtt_ms"]), "save_ms": summarize(r[k]["save_ms"]),
                   "wrong": r[k]["wrong"]} for name, k, _ in kernels}


def edit_to_mirror(peer: Bridge, n: int) -> dict:
    """The sync's own edit → mirror time, for the same file."""
    times = []
    local, remote = peer.repo / "pkg" / "sync_probe.py", peer.mirror / "pkg" / "sync_probe.py"
    for i in range(n):
        content = f"X = {i}  # {time.time()}\n".encode()
        t0 = time.perf_counter()
        local.write_bytes(content)
        dt = wait_content(remote, content, t0, 30)
        if dt is None:
            raise BenchError(f"{peer.name}: edit {i} never reached the mirror")
        times.append(dt * 1000)
        time.sleep(0.05)
    return summarize(times)


def render(r: dict) -> str:
    k = r.get("kernels", {})
    lines = ["# bridge kernel", "",
             "| kernel | cell round trip p50 / p99 (ms) | added p50 vs local (ms) | save → cell sees it p50 / p99 (ms) | edit → mirror p50 / p99 (ms) |",
             "|---|---|---|---|---|"]
    base = k.get("local", {}).get("rtt_ms", {}).get("median")
    for name in ("local", "bridge", "bridge_ssh"):
        v = k.get(name)
        if not v:
            continue
        rt, sv = v["rtt_ms"], v["save_ms"]
        added = f"{rt['median'] - base:+.2f}" if base is not None and name != "local" else "—"
        m = r.get("edit_to_mirror", {}).get(name)
        mirror = f"{m['p50']:.1f} / {m['p99']:.1f}" if m else "—"
        lines.append(f"| {name} | {rt['median']:.2f} / {rt['p99']:.2f} | {added} | "
                     f"{sv['p50']:.1f} / {sv['p99']:.1f} | {mirror} |")
    if r.get("errors"):
        lines += ["", f"errors: {r['errors']}"]
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="debug binaries, tiny counts, correctness only")
    ap.add_argument("--bridge", default=os.environ.get("BRIDGE_BIN"),
                    help="bridge binary (bridge-agent next to it); default target/release/bridge")
    ap.add_argument("--rtts", type=int, help="cell round trips per kernel (full: 1000)")
    ap.add_argument("--edits", type=int, help="saves per kernel (full: 100)")
    ap.add_argument("--out", help="JSON results (default bench/results/kernel.json)")
    ap.add_argument("--workdir", default="/tmp")
    ap.add_argument("--keep", action="store_true")
    args = ap.parse_args()
    rtts = args.rtts or (20 if args.quick else 1000)
    edits = args.edits or (10 if args.quick else 100)
    rounds = 2 if args.quick else 10
    exe = Path(args.bridge or ROOT / "target" / ("debug" if args.quick else "release") / "bridge").resolve()
    out = Path(args.out or HERE / "results" / ("kernel-quick.json" if args.quick else "kernel.json"))
    if not check_binaries(exe, f"cargo build {'' if args.quick else '--release '}--bins"):
        return 2
    install_term_handlers()
    info = base_machine_info()
    add_bridge_info(info, exe, rebuild="rebuild")
    results: dict = {"config": {"quick": args.quick, "rtts": rtts, "edits": edits, "rounds": rounds,
                                "bridge": str(exe)},
                     "machine": info, "kernels": {}, "edit_to_mirror": {}, "errors": {}}
    work = Path(tempfile.mkdtemp(prefix="bridge-kernelbench-", dir=args.workdir))
    peers: list[Bridge] = []
    sshd = None
    t0 = time.perf_counter()
    try:
        py = jupyter_python()
        wheels = wheelhouse()
        err = ensure_sshd(log)
        if err:
            raise BenchError(f"no sshd: {err}")
        sshd = Sshd(work / "sshd", comment="kernel_bench")
        sshd.start()
        env = dict(os.environ, PIP_NO_INDEX="1", PIP_FIND_LINKS=wheels)
        env.pop("BRIDGE_LOG", None)
        ssh_dir = sshd.client_dir(work / "client-ssh", [sshd.port])
        ssh_env = dict(env, BRIDGE_SSH_DIR=str(ssh_dir), BRIDGE_KNOWN_HOSTS=str(work / "kh"), SSH_AUTH_SOCK="")
        repos = {}
        for name in ("local", "bridge", "bridge_ssh"):
            repos[name] = work / f"repo-{name}"
            git_init(repos[name])
            write_package(repos[name])
        remote = work / "remote"
        local_peer = Bridge("bridge", exe, repos["bridge"], env, ["up", "--provider", "local"])
        ssh_peer = Bridge("bridge_ssh", exe, repos["bridge_ssh"], ssh_env,
                          ["up", "--host", f"root@127.0.0.1:{sshd.port}", "--remote-dir", str(remote)],
                          remote=remote)
        jp = work / "jupyter"
        jenv = dict(env, JUPYTER_PATH=str(jp / "share" / "jupyter"), JUPYTER_DATA_DIR=str(work / "jdata"),
                    JUPYTER_RUNTIME_DIR=str(work / "jrun"), JUPYTER_PLATFORM_DIRS="1")
        for p in (local_peer, ssh_peer):
            peers.append(p)
            log(f"bridge up: {p.name}")
            p.up()
            p.bridge("kernel", "install", "--name", f"bench-{p.name}", "--prefix", str(jp))
        runs = [("local", "python3", repos["local"])] + [(p.name, f"bench-{p.name}", p.repo) for p in peers]
        log(f"kernels: {', '.join(r[0] for r in runs)}, {rounds} rounds")
        try:
            results["kernels"] = measure(py, jenv, runs, rtts, edits, rounds)
            for name, v in results["kernels"].items():
                log(f"  {name}: rtt p50 {v['rtt_ms']['median']} ms, save p50 {v['save_ms']['p50']} ms")
        except Exception as e:  # noqa: BLE001 - recorded and reported
            results["errors"]["kernels"] = f"{type(e).__name__}: {e}"
            log(traceback.format_exc())
        for p in peers:
            try:
                results["edit_to_mirror"][p.name] = edit_to_mirror(p, edits)
            except Exception as e:  # noqa: BLE001
                results["errors"][f"mirror_{p.name}"] = f"{type(e).__name__}: {e}"
        if args.quick:
            for name, v in results["kernels"].items():
                if v["save_ms"]["n"] != edits:
                    results["errors"][f"check_{name}"] = "not every save was seen"
    except (BenchError, SshdError) as e:
        results["errors"]["setup"] = str(e)
        log(f"error: {e}")
    except KeyboardInterrupt:
        results["errors"]["interrupted"] = "interrupted"
    finally:
        for p in peers:
            e = p.down()
            if e:
                results["errors"].setdefault(f"down_{p.name}", e)
        if sshd:
            sshd.stop()
        if args.keep:
            log(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    results["total_s"] = round(time.perf_counter() - t0, 1)
    write_results(out, results, render)
    return 1 if results["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())

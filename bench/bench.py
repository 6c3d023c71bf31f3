#!/usr/bin/env python3
"""bridge's benchmarks: every scenario of issue 6, side by side with the
peer tools, in one command.

    python3 bench/bench.py --quick                   # CI: tiny sizes, checks correctness
    python3 bench/bench.py                           # full run (long; a quiet machine)
    python3 bench/bench.py --scale 0.1 --only 1 --only 2   # a trial of some scenarios

Everything runs on this machine. A private sshd on 127.0.0.1 is the
"remote"; bridge (SSH provider), rsync, unison, lsyncd and ssh all reach it
through their own byte-counting TCP proxy (bench/lab.py), and a second
Syncthing on loopback is the remote of the first one, through a proxy too
(bench/syncthing.py). Peers missing
from the machine are installed with apt-get (bench/apt.py). The scenarios
(bench/scenarios/) run bridge and its peer alternately in the same run.

Writes the results as JSON (every sample), BENCHMARKS.md's generated table
(bench/report.py) and, in full mode, PNG charts (bench/charts.py, with
matplotlib from a private venv). `--quick` asserts correctness (exact
mirrors, no lost line, complete checkpoints), never timing. Exit status: 0
when every selected scenario ran and was correct (targets may be missed),
1 when one failed, 2 when the binaries are missing. Python 3.11 standard
library only; see bench/README.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import tempfile
import time
import traceback
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))
sys.dont_write_bytecode = True  # no bench/__pycache__

from apt import ensure_packages  # noqa: E402
from charts import make_charts  # noqa: E402
from common import (  # noqa: E402
    BenchError, add_bridge_info, base_machine_info, check_binaries, create_rate, git_state,
    install_term_handlers, log, run_cmd, ssh_version, write_results)
from lab import Lab  # noqa: E402
from peers import PROGRAMS, rsync_push  # noqa: E402
from report import command_line, console, write_markdown  # noqa: E402
from repos import write_ml_repo, write_monorepo  # noqa: E402
from scenarios import Context, bigfile, jobs, latency, link, monorepo, sync  # noqa: E402
from sshd import SSHD  # noqa: E402

# Sizes: full (issue 6), and --quick (CI, debug binaries: seconds per scenario).
FULL = dict(ml_files=20_000, ml_dirs=500, bin_mib=[100, 300, 1024], venv_files=100_000, branch_files=1000,
            mono_files=200_000, change_kib=1024, huge_mib=10_240, ckpt_mib=1024, lines=1_000_000,
            reps=5, edits=200, runs=20, idle_s=60)
QUICK = dict(ml_files=120, ml_dirs=8, bin_mib=[1, 2, 4], venv_files=300, branch_files=20,
             mono_files=600, change_kib=64, huge_mib=24, ckpt_mib=4, lines=20_000,
             reps=2, edits=8, runs=3, idle_s=2)
# What --scale multiplies (counts of files and lines, sizes of files).
SCALED = ("ml_files", "ml_dirs", "bin_mib", "venv_files", "branch_files", "mono_files", "huge_mib",
          "ckpt_mib", "lines")

# (scenario number, key in the results, function, what it needs first).
# 10 goes first: its 10 GiB file and the mirror's copy need ~25 GB, which
# the trash (it keeps what the other scenarios discard until the end) left
# it no more of on a 45 GB disk.
STEPS = [
    (10, "huge_file", bigfile.huge_file, None),
    (1, "initial_sync", sync.initial_sync, "ml"),
    (2, "edit_latency", latency.edit_latency, "ml_up"),
    (3, "big_delta", sync.big_delta, "ml_up"),
    (4, "branch_switch", sync.branch_switch, "ml_up"),
    (6, "first_line", jobs.first_line, "jobs"),
    (7, "log_throughput", jobs.log_throughput, "jobs"),
    (8, "checkpoint", jobs.checkpoint, "jobs"),
    (5, "noop_resync", monorepo.noop_resync, "mono"),
    (9, "idle", monorepo.idle, "mono_up"),
    (11, "far_link_and_heal", link.link, None),
]


# --------------------------------------------------------------------------
# configuration


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="tiny sizes; asserts correctness only (CI)")
    ap.add_argument("--only", type=int, action="append", choices=range(1, 12), metavar="N",
                    help="run only scenario N (repeatable)")
    ap.add_argument("--scale", type=float, help="multiply the full sizes (file counts, file sizes, lines) by F")
    for k, v in FULL.items():
        ap.add_argument("--" + k.replace("_", "-"), type=(lambda s: [int(x) for x in s.split(",")])
                        if isinstance(v, list) else int, metavar="N" + (",N..." if isinstance(v, list) else ""),
                        help=f"full: {','.join(map(str, v)) if isinstance(v, list) else v}; quick: "
                             f"{','.join(map(str, QUICK[k])) if isinstance(v, list) else QUICK[k]}")
    ap.add_argument("--pty", action="store_true", help="7: stream to a pseudo-terminal instead of a pipe")
    ap.add_argument("--delay-ms", type=float, default=0.0, help="one-way delay of every proxy (default 0)")
    ap.add_argument("--seed", type=int, default=6)
    ap.add_argument("--bridge", default=os.environ.get("BRIDGE_BIN", str(ROOT / "target" / "release" / "bridge")),
                    help="bridge binary, bridge-agent next to it (env BRIDGE_BIN; default target/release/bridge)")
    ap.add_argument("--out", help="results JSON (default bench/results/bench[-quick|-trial].json)")
    ap.add_argument("--markdown", help="the file whose generated table is updated "
                                       "(default BENCHMARKS.md; bench/results/bench-quick.md with --quick)")
    ap.add_argument("--no-charts", action="store_true", help="no PNG charts (full mode draws them)")
    ap.add_argument("--workdir", default="/tmp", help="parent of the temporary work directory")
    ap.add_argument("--keep", action="store_true", help="keep the work directory (logs of every tool)")
    ap.add_argument("--log", help="BRIDGE_LOG for bridge's daemons (diagnostics, e.g. bridge=debug; "
                                  "read .bridge/daemon.log with --keep)")
    return ap.parse_args()


def sizes(args: argparse.Namespace) -> tuple[dict, str]:
    """The sizes and the mode: quick, full, or trial (anything else)."""
    base = dict(QUICK if args.quick else FULL)
    if args.scale and not args.quick:
        for k in SCALED:
            v = base[k]
            base[k] = [max(1, round(x * args.scale)) for x in v] if isinstance(v, list) else max(1, round(v * args.scale))
        base["change_kib"] = min(base["change_kib"], max(base["bin_mib"]) * 1024 // 4)
    for k in FULL:
        if getattr(args, k) is not None:
            base[k] = getattr(args, k)
    mode = "quick" if args.quick else "full" if base == FULL and not args.only else "trial"
    return base, mode


def machine_info(bridge: Path, workdir: str) -> dict:
    info = base_machine_info()
    info["loadavg_start"] = [round(x, 2) for x in os.getloadavg()]
    try:
        info["cpu_model"] = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo")
                                 if line.startswith("model name"))
    except (OSError, StopIteration):
        info["cpu_model"] = platform.processor() or "?"
    best = ("", "")
    for line in open("/proc/mounts"):
        _, mnt, fstype = line.split()[:3]
        if (workdir + "/").startswith(mnt.rstrip("/") + "/") and len(mnt) >= len(best[0]):
            best = (mnt, fstype)
    info["workdir_fs"] = {"mount": best[0], "type": best[1]}
    add_bridge_info(info, bridge)
    versions = {"ssh": ssh_version()}
    for prog, flag in (("rsync", "--version"), ("unison", "-version"), ("lsyncd", "-version"),
                       ("syncthing", "--version")):
        try:
            cp = run_cmd([prog, flag], 10, check=False)
            first = ((cp.stdout or cp.stderr).strip().splitlines() or ["?"])[0]
            versions[prog] = " ".join(first.removeprefix(prog).split())
        except (BenchError, OSError):
            versions[prog] = None
    info["peer_versions"] = versions
    info.update(git_state())
    return info


# --------------------------------------------------------------------------
# what the scenarios need first


def need_ml(ctx: Context, selected: set[int]) -> None:
    """The ml-repo (and scenario 2's hard-linked copies, before anything watches it)."""
    if ctx.ml is not None:
        return
    c = ctx.cfg
    t0 = time.perf_counter()
    log(f"writing the ml-repo: {c['ml_files']:,} files in {c['ml_dirs']} dirs, binaries {c['bin_mib']} MiB, "
        f".venv of {c['venv_files']:,} files, branch of {c['branch_files']} files")
    ctx.ml = write_ml_repo(ctx.lab.work / "ml-repo", c["ml_files"], c["ml_dirs"], c["bin_mib"], c["venv_files"],
                           c["branch_files"], ctx.seed)
    ctx.ml_bridge = ctx.lab.bridge("ml", ctx.ml.path)
    if selected & {1, 2}:
        latency.make_copies(ctx)
    log(f"ml-repo written in {time.perf_counter() - t0:.1f} s")


def need_ml_up(ctx: Context, selected: set[int]) -> None:
    """bridge up on the ml-repo and rsync's mirror of it (what scenario 1 leaves)."""
    need_ml(ctx, selected)
    if not ctx.ml_bridge.up_done:
        ctx.ml_bridge.up()
    if ctx.rsync_mirror is None:
        ctx.rsync_mirror = ctx.lab.trash.new_dir("rsync-mirror-")
        rsync_push(ctx.lab, "rsync", ctx.ml.path, ctx.rsync_mirror)


def need_mono(ctx: Context, selected: set[int]) -> None:
    if ctx.mono is not None:
        return
    if ctx.ml_bridge is not None:  # one daemon at a time from here on
        ctx.lab.down(ctx.ml_bridge)
    t0 = time.perf_counter()
    ctx.mono = ctx.lab.work / "monorepo"
    write_monorepo(ctx.mono, ctx.cfg["mono_files"], ctx.seed + 5)
    ctx.mono_bridge = ctx.lab.bridge("mono", ctx.mono)
    log(f"monorepo of {ctx.cfg['mono_files']:,} files written in {time.perf_counter() - t0:.1f} s")


def need_mono_up(ctx: Context, selected: set[int]) -> None:
    need_mono(ctx, selected)
    if not ctx.mono_bridge.up_done:
        ctx.mono_bridge.up()


def run_steps(ctx: Context, selected: set[int], results: dict) -> None:
    jobs_ready = False
    needs = {"ml": need_ml, "ml_up": need_ml_up, "jobs": need_ml_up, "mono": need_mono, "mono_up": need_mono_up}
    for n, key, fn, need in STEPS:
        if n not in selected:
            continue
        log(f"=== scenario {n}: {key}")
        t0 = time.perf_counter()
        try:
            if need:
                needs[need](ctx, selected)
            if need == "jobs" and not jobs_ready:
                results["jobs_setup"] = jobs.prepare(ctx)
                jobs_ready = True
            out = fn(ctx)
        except (BenchError, OSError) as e:
            log(traceback.format_exc())
            out = {"error": f"{type(e).__name__}: {e}"}
            results["errors"][key] = out["error"]
        out["n"] = n
        out["duration_s"] = round(time.perf_counter() - t0, 1)
        results["scenarios"][key] = out
        # Untimed: the big files of what this scenario left (rsync's mirror
        # of the ml-repo serves scenario 3 too).
        keep = (ctx.rsync_mirror,) if ctx.rsync_mirror else ()
        ctx.lab.trash.free_big_files(ctx.lab.trash.dir, keep)


# --------------------------------------------------------------------------


def output_paths(args: argparse.Namespace, mode: str) -> tuple[Path, Path]:
    stem = {"quick": "bench-quick", "full": "bench", "trial": "bench-trial"}[mode]
    out = Path(args.out or HERE / "results" / f"{stem}.json")
    md = Path(args.markdown or (HERE / "results" / "bench-quick.md" if mode == "quick" else ROOT / "BENCHMARKS.md"))
    return out, md


def main() -> int:
    args = parse_args()
    cfg, mode = sizes(args)
    cfg["pty"] = args.pty
    selected = set(args.only or range(1, 12))
    bridge_exe = Path(args.bridge).resolve()
    if not check_binaries(bridge_exe):
        return 2
    install_term_handlers()
    # Every side's Python block-buffers its stdout: the job inherits the
    # environment of `bridge up`, the local peer ours, ssh's remote side a
    # fresh one; PYTHONUNBUFFERED=1 (set on the project's VMs) would make only
    # some of them write one line per syscall.
    removed_env = {k: os.environ.pop(k) for k in ("PYTHONUNBUFFERED", "BRIDGE_LOG") if k in os.environ}
    results: dict = {
        "config": {"mode": mode, "quick": args.quick, "sizes": {k: cfg[k] for k in FULL}, "pty": args.pty,
                   "scenarios": sorted(selected), "seed": args.seed, "delay_ms": args.delay_ms,
                   "bridge": str(bridge_exe), "command": command_line(sys.argv[1:]), "removed_env": removed_env},
        "errors": {}, "scenarios": {}}
    err = ensure_packages({**PROGRAMS, SSHD: "openssh-server", "ssh": "openssh-client", "git": "git"}, log)
    if err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    # A --workdir that does not exist yet is made (with its parents).
    Path(args.workdir).mkdir(parents=True, exist_ok=True)
    results["machine"] = machine_info(bridge_exe, os.path.realpath(args.workdir))
    work = Path(tempfile.mkdtemp(prefix="bridge-bench-", dir=args.workdir))
    lab = Lab(work, bridge_exe, args.delay_ms, args.log)
    started = time.perf_counter()
    log(f"{mode} run, scenarios {sorted(selected)}; work directory {work}")
    try:
        rate = create_rate(lab.trash, 2000 if args.quick else 20_000)
        results["machine"]["fs_create_files_per_s"] = round(rate)
        log(f"file system: {rate:,.0f} empty files created per second")
        lab.start()
        run_steps(Context(lab, cfg, args.quick, args.seed), selected, results)
    except (BenchError, OSError) as e:
        results["errors"]["setup"] = f"{type(e).__name__}: {e}"
        log(traceback.format_exc())
    except KeyboardInterrupt as e:
        results["errors"]["interrupted"] = str(e) or "interrupted"
    finally:
        results["errors"].update(lab.close())
        results["total_s"] = round(time.perf_counter() - started, 1)
        try:
            report(args, mode, results)
        finally:
            if args.keep:
                log(f"kept {work}")
            else:
                log(f"removing {work}")
                shutil.rmtree(work, ignore_errors=True)
    return 1 if results["errors"] else 0


def report(args: argparse.Namespace, mode: str, results: dict) -> None:
    """The JSON, the charts (full mode) and the markdown table."""
    out, md = output_paths(args, mode)
    charts = []
    if mode != "quick" and not args.no_charts:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(results, indent=2) + "\n")  # what the charts are drawn from
        try:
            charts = make_charts(out, out.with_name(out.stem + "-charts"), log)
        except Exception as e:  # noqa: BLE001 - no chart is worth losing the results over
            results["errors"]["charts"] = f"{type(e).__name__}: {e}"
    write_results(out, results, console)
    rel = lambda p: os.path.relpath(p, md.parent)  # noqa: E731
    write_markdown(md, results, rel(out), [rel(c) for c in charts])
    print(f"table: {md}")


if __name__ == "__main__":
    sys.exit(main())

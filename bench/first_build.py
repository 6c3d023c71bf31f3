#!/usr/bin/env python3
"""The README's first build, timed from a clean target directory.

A new user's first minutes are `cargo build --release --bins` (the README's
first command, before the job starts). This script exports a commit of this
repository into a fresh directory (`git archive`: no target/, no build
cache), fetches the crates first, unmeasured (`cargo fetch --locked`: the
download depends on the user's network, not on bridge), then times the
build with `--timings` and reports the wall time, the CPU time, and the
crates that took longest, so a change to the build profiles is judged on
the same machine by the same command:

    python3 bench/first_build.py --rev HEAD --out bench/results/first-build.json

`--cmd` times another build command (e.g. `cargo install --locked --path cli
--root DIR`). Exit status 0 when the build succeeded.
"""

from __future__ import annotations

import argparse
import html
import json
import os
import re
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
DEFAULT_CMD = "cargo build --release --bins"


def export(rev: str, dest: Path) -> str:
    commit = subprocess.check_output(["git", "-C", str(REPO), "rev-parse", rev], text=True).strip()
    archive = subprocess.Popen(["git", "-C", str(REPO), "archive", commit], stdout=subprocess.PIPE)
    subprocess.run(["tar", "-x", "-C", str(dest)], stdin=archive.stdout, check=True)
    if archive.wait() != 0:
        raise SystemExit(f"git archive {rev} failed")
    return commit


def slowest_units(timings_dir: Path, top: int) -> list[dict]:
    """The `UNIT_DATA` table of cargo's timing report: one row per crate
    compiled, with its duration in seconds."""
    reports = sorted(timings_dir.glob("cargo-timing*.html"))
    if not reports:
        return []
    text = reports[-1].read_text()
    m = re.search(r"const UNIT_DATA = (\[.*?\]);\n", text, re.S)
    if not m:
        return []
    units = json.loads(html.unescape(m.group(1)))
    rows = [
        {
            "crate": u.get("name"),
            "version": u.get("version"),
            "target": u.get("target", "").strip(),
            "duration_s": round(float(u.get("duration", 0.0)), 1),
        }
        for u in units
    ]
    rows.sort(key=lambda r: r["duration_s"], reverse=True)
    return rows[:top]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rev", default="HEAD", help="the commit to build (default HEAD)")
    ap.add_argument("--cmd", default=DEFAULT_CMD, help=f"the build command (default: {DEFAULT_CMD})")
    ap.add_argument("--out", type=Path, help="write the result as JSON here")
    ap.add_argument("--workdir", type=Path, help="build here instead of a temporary directory")
    ap.add_argument("--keep", action="store_true", help="keep the build directory")
    ap.add_argument("--top", type=int, default=12, help="how many of the slowest crates to report")
    args = ap.parse_args()

    if args.workdir:
        args.workdir.mkdir(parents=True, exist_ok=True)
    root = Path(tempfile.mkdtemp(prefix="bridge-first-build-", dir=args.workdir))
    try:
        commit = export(args.rev, root)
        env = dict(os.environ)
        env.pop("CARGO_TARGET_DIR", None)
        env.pop("RUSTFLAGS", None)
        print(f"first_build: {commit[:12]} exported to {root}; fetching crates (not timed)", flush=True)
        subprocess.run(["cargo", "fetch", "--locked"], cwd=root, env=env, check=True)
        cmd = args.cmd.split() + (["--timings"] if args.cmd.startswith("cargo build") else [])
        print(f"first_build: timing `{' '.join(cmd)}`", flush=True)
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        t0 = time.monotonic()
        proc = subprocess.run(cmd, cwd=root, env=env)
        wall = time.monotonic() - t0
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
        result = {
            "commit": commit,
            "command": " ".join(cmd),
            "ok": proc.returncode == 0,
            "wall_s": round(wall, 1),
            "cpu_s": round(cpu, 1),
            "cores": os.cpu_count(),
            "loadavg_at_end": os.getloadavg(),
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
            "rustc": subprocess.check_output(["rustc", "--version"], text=True).strip(),
            "slowest": slowest_units(root / "target" / "cargo-timings", args.top),
        }
        print(json.dumps(result, indent=2))
        print(f"first_build: {'ok' if result['ok'] else 'FAILED'} in {wall / 60:.1f} min wall, {cpu / 60:.1f} min CPU")
        if args.out:
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(json.dumps(result, indent=2) + "\n")
        return 0 if result["ok"] else 1
    finally:
        if args.keep:
            print(f"first_build: kept {root}")
        else:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())

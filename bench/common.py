"""Helpers shared by the benchmarks (sync_bench.py, job_bench.py,
ssh_bench.py): logging, running commands, percentiles, machine info, binary
checks, signal handling and writing the results. Python 3.11 standard
library only.
"""

from __future__ import annotations

import datetime as _dt
import json
import math
import os
import platform
import signal
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent


class BenchError(Exception):
    """A benchmark step failed (the tool errored, timed out or was wrong)."""


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def percentile(sorted_vals: list[float], q: float) -> float | None:
    """Nearest-rank percentile of an already sorted list."""
    if not sorted_vals:
        return None
    k = max(1, math.ceil(q / 100.0 * len(sorted_vals)))
    return sorted_vals[min(k, len(sorted_vals)) - 1]


def run_cmd(args: list[str], timeout: float, check: bool = True, env: dict | None = None,
            **kw) -> subprocess.CompletedProcess:
    try:
        cp = subprocess.run(args, capture_output=True, text=True, timeout=timeout, env=env, **kw)
    except subprocess.TimeoutExpired as e:
        raise BenchError(f"timed out after {timeout:.0f} s: {' '.join(args)}\n"
                         f"stdout: {e.stdout!r}\nstderr: {e.stderr!r}") from None
    if check and cp.returncode != 0:
        raise BenchError(f"exit {cp.returncode}: {' '.join(args)}\n"
                         f"stdout: {cp.stdout.strip()}\nstderr: {cp.stderr.strip()}")
    return cp


def git_init(repo: Path) -> None:
    repo.mkdir(parents=True, exist_ok=True)
    run_cmd(["git", "init", "-q", str(repo)], 60)


# --------------------------------------------------------------------------
# machine info


def base_machine_info(**extra) -> dict:
    """Date, CPUs, kernel, platform, Python (then `extra`) and total memory."""
    info: dict = {
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "nproc": os.cpu_count(),
        "nproc_usable": len(os.sched_getaffinity(0)),
        "kernel": platform.release(),
        "platform": platform.platform(),
        "machine": platform.machine(),
        "python": platform.python_version(),
        **extra,
    }
    try:
        with open("/proc/meminfo") as f:
            info["mem_total_kib"] = int(f.readline().split()[1])
    except OSError:
        pass
    return info


def add_bridge_info(info: dict, bridge: Path, record_path: bool = True,
                    rebuild: str = "rebuild with `cargo build --release --bins`") -> None:
    """bridge's version, path (with record_path), mtime, and whether the
    binary is older than the sources (logged as a warning)."""
    try:
        info["bridge_version"] = run_cmd([str(bridge), "--version"], 10).stdout.strip()
        if record_path:
            info["bridge_binary"] = str(bridge)
        info["bridge_binary_mtime"] = _dt.datetime.fromtimestamp(
            bridge.stat().st_mtime, _dt.timezone.utc).isoformat(timespec="seconds")
    except (BenchError, OSError) as e:
        info["bridge_version"] = f"unknown ({e})"
    # A binary older than the sources measures some other code: say so.
    try:
        newest = max((q.stat().st_mtime, str(q.relative_to(ROOT)))
                     for d in ("proto", "agent", "daemon", "cli")
                     for q in (ROOT / d).rglob("*")
                     if q.is_file() and q.suffix in (".rs", ".proto", ".toml"))
        info["bridge_binary_stale"] = newest[0] > bridge.stat().st_mtime
        if info["bridge_binary_stale"]:
            info["newest_source"] = newest[1]
            log(f"warning: {bridge} is older than {newest[1]}; {rebuild} to measure the current code")
    except (OSError, ValueError):
        pass


def ssh_version() -> str | None:
    """`ssh -V`, or None without ssh."""
    try:
        cp = run_cmd(["ssh", "-V"], 10, check=False)
        return (cp.stderr or cp.stdout).strip() or None
    except (BenchError, OSError):
        return None


def git_state() -> dict:
    """git_head and git_modified_files of the project (read-only git queries,
    no optional locks: never touch the index); {} when git fails."""
    env = dict(os.environ, GIT_OPTIONAL_LOCKS="0")
    try:
        rev = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "HEAD"], env=env,
                             capture_output=True, text=True, timeout=10)
        dirty = subprocess.run(["git", "-C", str(ROOT), "--no-optional-locks", "status",
                                "--porcelain", "--untracked-files=no"], env=env,
                               capture_output=True, text=True, timeout=30)
        return {"git_head": rev.stdout.strip() or None,
                "git_modified_files": len(dirty.stdout.splitlines()) if dirty.returncode == 0 else None}
    except (OSError, subprocess.TimeoutExpired):
        return {}


# --------------------------------------------------------------------------
# main() plumbing


def check_binaries(bridge_exe: Path, build: str = "cargo build --release --bins") -> bool:
    """True when bridge_exe and bridge-agent next to it exist; else says so."""
    if not bridge_exe.exists() or not (bridge_exe.parent / "bridge-agent").exists():
        print(f"error: {bridge_exe} (and bridge-agent next to it) not found; "
              f"run `{build}` first or pass --bridge", file=sys.stderr)
        return False
    return True


def install_term_handlers() -> None:
    """SIGTERM/SIGHUP: unwind through the finally blocks (bridge down, rm temp dirs)."""
    def _term(signum, _frame):
        raise KeyboardInterrupt(f"signal {signum}")
    signal.signal(signal.SIGTERM, _term)
    signal.signal(signal.SIGHUP, _term)


def render_errors(lines: list[str], errors: dict) -> None:
    """Append the "errors:" block of a report (nothing without errors)."""
    if errors:
        lines.append("")
        lines.append("errors:")
        for k, v in errors.items():
            lines.append(f"  {k}: {v}")


def write_results(out: Path, results: dict, render) -> None:
    """Write results as JSON to out, then print the report and where it went."""
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2) + "\n")
    print(render(results))
    print(f"\nresults: {out} (total {results['total_s']} s)")

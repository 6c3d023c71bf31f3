"""Helpers shared by the benchmarks (bench.py and its scenario modules,
ssh_bench.py): logging, running commands, statistics, file and tree
comparison, machine info, binary checks, signal handling and writing the
results. Python 3.11 standard library only.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import math
import os
import platform
import random
import signal
import stat
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
KIB = 1024
MIB = 1024 * KIB


class BenchError(Exception):
    """A benchmark step failed (the tool errored, timed out or was wrong)."""


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def flush_disk() -> float:
    """Writes every dirty page back (`sync`) before a timed run, so that no
    tool pays for the writeback of what an earlier step wrote (another
    tool's copy, the test trees); returns the seconds it took."""
    t0 = time.perf_counter()
    os.sync()
    return time.perf_counter() - t0


def percentile(sorted_vals: list[float], q: float) -> float | None:
    """Nearest-rank percentile of an already sorted list."""
    if not sorted_vals:
        return None
    k = max(1, math.ceil(q / 100.0 * len(sorted_vals)))
    return sorted_vals[min(k, len(sorted_vals)) - 1]


def summarize(vals: list[float], digits: int = 3) -> dict:
    """n, median, min, max, p50/p95/p99 (nearest rank) and every value, in input order."""
    if not vals:
        return {"n": 0}
    s = sorted(vals)
    r = lambda x: round(x, digits)  # noqa: E731
    return {"n": len(s), "median": r(statistics.median(s)), "min": r(s[0]), "max": r(s[-1]),
            "p50": r(percentile(s, 50)), "p95": r(percentile(s, 95)), "p99": r(percentile(s, 99)),
            "all": [r(x) for x in vals]}


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    return f"{n:.2f} GiB"


def stop_process(proc: subprocess.Popen | None, timeout: float) -> None:
    """SIGTERM, then SIGKILL after `timeout` seconds; waits for the exit."""
    if proc is None or proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


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
# files and trees


def sha256_file(p: Path) -> str:
    h = hashlib.sha256()
    with open(p, "rb") as f:
        while b := f.read(4 * MIB):
            h.update(b)
    return h.hexdigest()


def tree_sizes(root: Path, skip_top: frozenset[str]) -> dict[str, int]:
    """relative path -> size of every regular file under root, minus the
    top-level entries in skip_top (.git, .bridge, ignored directories)."""
    out: dict[str, int] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        rel_dir = os.path.relpath(dirpath, root)
        if rel_dir == ".":
            dirnames[:] = [d for d in dirnames if d not in skip_top]
            filenames = [f for f in filenames if f not in skip_top]
        for fn in filenames:
            rel = os.path.normpath(os.path.join(rel_dir, fn))
            out[rel] = os.lstat(os.path.join(dirpath, fn)).st_size
    return out


def same_content(a: Path, b: Path) -> bool:
    with open(a, "rb") as fa, open(b, "rb") as fb:
        while True:
            x, y = fa.read(4 * MIB), fb.read(4 * MIB)
            if x != y:
                return False
            if not x:
                return True


def compare_trees(src: Path, mirror: Path, skip_top: frozenset[str], sample: int | None = None,
                  also: list[str] | tuple = ()) -> int:
    """Raise unless mirror holds exactly src's files: the same paths and
    sizes, and the same contents (of every file, or with `sample` of
    `sample` files chosen at random plus the paths in `also`). Returns the
    number of files."""
    a, b = tree_sizes(src, skip_top), tree_sizes(mirror, skip_top)
    if a != b:
        differ = sorted(k for k in set(a) & set(b) if a[k] != b[k])[:5]
        raise BenchError(f"mirror {mirror} differs from {src}: {len(a)} vs {len(b)} files; "
                         f"missing in mirror {sorted(set(a) - set(b))[:5]}, "
                         f"extra in mirror {sorted(set(b) - set(a))[:5]}, sizes differ {differ}")
    paths = sorted(a)
    if sample is not None and sample < len(paths):
        paths = sorted(set(random.Random(len(paths)).sample(paths, sample)) | (set(also) & set(a)))
    wrong = [p for p in paths if not same_content(src / p, mirror / p)]
    if wrong:
        raise BenchError(f"mirror {mirror}: {len(wrong)} files differ from {src}: {wrong[:5]}")
    return len(a)


def wait_content(path: Path, content: bytes, t0: float, timeout: float, poll_s: float = 0.0002) -> float | None:
    """Poll until path holds exactly content; seconds since t0 (perf_counter), or None."""
    deadline = t0 + timeout
    while True:
        try:
            if os.stat(path).st_size == len(content):
                with open(path, "rb") as f:
                    if f.read() == content:
                        return time.perf_counter() - t0
        except FileNotFoundError:
            pass
        if time.perf_counter() > deadline:
            return None
        time.sleep(poll_s)


class Trash:
    """Moves directories aside instead of deleting them during the run.

    Deleting many files and then creating many files is very slow on ext4
    without a journal (this project's VMs): every create skips the inodes
    freed in the last 60-360 s (`recently_deleted()` in the kernel's inode
    allocator), so a timed sync right after a cleanup would be measured
    against the cleanup. So what is discarded is moved here and deleted at
    the end, except its big files (BIG_FILE bytes and more), deleted at
    once: they hold the disk space and free few inodes. Directories made here
    for a scenario's own use (a peer's mirror) lose their big files when the
    scenario ends (`bench.py`); a full run filled 46 GB before.
    """

    BIG_FILE = 16 * MIB

    def __init__(self, work: Path):
        self.dir = work / "trash"
        self.dir.mkdir(exist_ok=True)
        self.n = 0

    def new_dir(self, prefix: str) -> Path:
        return Path(tempfile.mkdtemp(prefix=prefix, dir=self.dir))

    def discard(self, path: Path) -> None:
        if not (path.exists() or path.is_symlink()):
            return
        self.free_big_files(path)
        self.n += 1
        os.rename(path, self.dir / f"{self.n:04d}-{path.name}")

    def free_big_files(self, path: Path, keep: tuple[Path, ...] = ()) -> None:
        """Deletes the big files under `path`, except under `keep`."""
        kept = {os.path.realpath(k) for k in keep}
        for dirpath, dirnames, filenames in os.walk(path):
            dirnames[:] = [d for d in dirnames if os.path.realpath(os.path.join(dirpath, d)) not in kept]
            for fn in filenames:
                p = os.path.join(dirpath, fn)
                st = os.lstat(p)
                if st.st_size >= self.BIG_FILE and stat.S_ISREG(st.st_mode):
                    os.unlink(p)


def create_rate(trash: Trash, n: int) -> float:
    """Empty files created per second in a fresh directory: a health check
    of the file system (see Trash); a small figure means every tool's
    initial-sync times are inflated."""
    d = trash.new_dir("calibrate-")
    t0 = time.perf_counter()
    for i in range(n):
        os.close(os.open(d / f"c{i:06d}", os.O_CREAT | os.O_WRONLY | os.O_EXCL, 0o644))
    return n / (time.perf_counter() - t0)


# --------------------------------------------------------------------------
# processes


def proc_mem_kib(pid: int) -> dict[str, int]:
    """VmRSS and VmHWM (peak RSS) of a process, KiB; {} once it is gone."""
    out = {}
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(("VmRSS:", "VmHWM:")):
                    out[line.split(":")[0]] = int(line.split()[1])
    except OSError:
        pass
    return out


def proc_cpu_s(pid: int) -> float | None:
    """User + system CPU seconds of a process (all its threads) so far."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


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
    # A binary older than the sources it is built from measures some other
    # code: say so. `bridge` does not contain the agent, which sits next to it.
    built_from = {bridge: ("proto", "daemon", "cli"),
                  bridge.with_name("bridge-agent"): ("proto", "agent")}
    info["bridge_binary_stale"] = False
    try:
        for binary, dirs in built_from.items():
            if not binary.exists():
                continue
            newest = max((q.stat().st_mtime, str(q.relative_to(ROOT)))
                         for d in dirs
                         for q in (ROOT / d).rglob("*")
                         if q.is_file() and q.suffix in (".rs", ".proto", ".toml"))
            if newest[0] > binary.stat().st_mtime:
                info["bridge_binary_stale"] = True
                info["newest_source"] = f"{newest[1]} (for {binary.name})"
                log(f"warning: {binary} is older than {newest[1]}; {rebuild} to measure the current code")
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

#!/usr/bin/env python3
"""Benchmark bridge's sync path from the command line.

Three figures, each next to a reference where one makes sense:

1. Edit-to-mirror latency: a 1 KiB edit to one file of a large tree (default
   100,000 files in ~1,000 directories) while `bridge` is up; the time from
   just before the write until the mirror file holds the new content.
   Half the edits overwrite the file in place, half write a temporary file
   and rename it over the original (an editor's atomic save).
2. Initial sync: wall time of `bridge up` from nothing (fresh repository
   state, no `.bridge/`) to an exact mirror, alternating with
   `rsync -a SRC/ DST/` into a fresh empty directory.
3. Bytes on the wire for a 1 MiB change in the middle of a 200 MiB file:
   the growth of `bytes_sent` in `bridge status --json`, next to
   `rsync --no-whole-file --stats` ("Total bytes sent").

`--quick` shrinks every size so the whole run takes seconds, and checks
correctness (mirror contents equal the source) instead of reporting timings
that would mean anything. Python 3.11 standard library only.

Usage:
    cargo build --release --bins
    python3 bench/sync_bench.py --quick        # smoke test, asserts correctness
    python3 bench/sync_bench.py                # full run (several minutes)
    python3 bench/sync_bench.py --help
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import random
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
KIB = 1024
MIB = 1024 * 1024

sys.path.insert(0, str(HERE))
sys.dont_write_bytecode = True  # no bench/__pycache__ from importing common.py
from common import (  # noqa: E402  (bench/common.py, shared with job_bench.py, ssh_bench.py)
    BenchError, add_bridge_info, base_machine_info, check_binaries, git_init, git_state,
    install_term_handlers, log, percentile, render_errors, run_cmd, write_results)

# Latency targets (ms) for a 1 KiB edit in the large tree.
TARGET_P50_MS = 50.0
TARGET_P95_MS = 150.0

# Generous timeouts: nothing may hang forever.
EDIT_TIMEOUT_S = 10.0
UP_TIMEOUT_S = 600.0
SYNC_TIMEOUT_S = 300.0
RSYNC_TIMEOUT_S = 600.0
SMALL_CMD_TIMEOUT_S = 60.0

# Files that `bridge` never syncs (proto/src/scan.rs: is_always_excluded):
# the JetBrains "safe write" temporary is what our atomic saves use, so the
# temporary never shows up in the mirror, as with a real editor.
ATOMIC_TMP_SUFFIX = "___jb_tmp___"

QUICK = dict(files=300, dirs=12, edits=20, reps=2, big_mib=8, change_kib=256)
FULL = dict(files=100_000, dirs=1000, edits=200, reps=3, big_mib=200, change_kib=1024)


# --------------------------------------------------------------------------
# helpers


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    return f"{n:.2f} GiB"


def sha256_file(p: Path) -> str:
    h = hashlib.sha256()
    with open(p, "rb") as f:
        while True:
            b = f.read(4 * MIB)
            if not b:
                break
            h.update(b)
    return h.hexdigest()


def tree_files(root: Path, skip_top: tuple[str, ...]) -> dict[str, tuple[int, str]]:
    """relative path -> (size, sha256) for every regular file under root."""
    out: dict[str, tuple[int, str]] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        rel_dir = os.path.relpath(dirpath, root)
        if rel_dir == ".":
            dirnames[:] = [d for d in dirnames if d not in skip_top]
            filenames = [f for f in filenames if f not in skip_top]
        for fn in filenames:
            p = Path(dirpath) / fn
            rel = os.path.normpath(os.path.join(rel_dir, fn))
            out[rel] = (p.stat().st_size, sha256_file(p))
    return out


def compare_trees(src: Path, mirror: Path) -> None:
    """Raise unless the mirror holds exactly the source's files and contents."""
    a = tree_files(src, (".git", ".bridge"))
    b = tree_files(mirror, (".git", ".bridge"))
    if a != b:
        only_a = sorted(set(a) - set(b))[:5]
        only_b = sorted(set(b) - set(a))[:5]
        differ = sorted(k for k in set(a) & set(b) if a[k] != b[k])[:5]
        raise BenchError(f"mirror {mirror} differs from {src}: {len(a)} vs {len(b)} files; "
                         f"missing in mirror {only_a}, extra in mirror {only_b}, "
                         f"different {differ}")


def machine_info(bridge: Path, workdir: str) -> dict:
    info = base_machine_info()
    try:
        info["loadavg"] = os.getloadavg()
    except OSError:
        pass
    for key, path in (("inotify_max_user_watches", "/proc/sys/fs/inotify/max_user_watches"),
                      ("inotify_max_queued_events", "/proc/sys/fs/inotify/max_queued_events")):
        try:
            info[key] = int(Path(path).read_text().strip())
        except (OSError, ValueError):
            pass
    try:  # the file system the work directory is on
        best = ("", "", "")
        with open("/proc/mounts") as f:
            for line in f:
                dev, mnt, fstype, opts = line.split()[:4]
                if (workdir + "/").startswith(mnt.rstrip("/") + "/") and len(mnt) >= len(best[0]):
                    best = (mnt, fstype, opts)
        info["workdir_fs"] = {"mount": best[0], "type": best[1], "options": best[2]}
    except OSError:
        pass
    add_bridge_info(info, bridge, record_path=False)
    try:
        out = run_cmd(["rsync", "--version"], 10).stdout.splitlines()
        info["rsync_version"] = out[0] if out else "?"
    except (BenchError, OSError):
        info["rsync_version"] = None
    info.update(git_state())
    return info


def ensure_rsync() -> str | None:
    """Install rsync if missing; returns an error string or None."""
    if shutil.which("rsync"):
        return None
    log("rsync is missing; installing it with apt-get")
    cp = subprocess.run(["sh", "-c", "command -v rsync || (apt-get update && apt-get install -y rsync)"],
                        capture_output=True, text=True, timeout=600)
    if cp.returncode != 0 or not shutil.which("rsync"):
        return f"cannot install rsync: {cp.stderr.strip()[-2000:]}"
    return None


# --------------------------------------------------------------------------
# bridge driver


class Bridge:
    def __init__(self, exe: Path):
        self.exe = exe
        self.up_repos: set[Path] = set()
        self.pids: dict[Path, int] = {}

    def _run(self, repo: Path, *args: str, timeout: float, check: bool = True):
        return run_cmd([str(self.exe), "-C", str(repo), *args], timeout, check)

    def up(self, repo: Path) -> float:
        """`bridge up`; returns its wall time in seconds."""
        self.up_repos.add(repo)
        t0 = time.perf_counter()
        try:
            self._run(repo, "up", timeout=UP_TIMEOUT_S)
        except BenchError as e:
            raise BenchError(f"{e}\ndaemon.log tail:\n{self.log_tail(repo)}") from None
        dt = time.perf_counter() - t0
        st = self.status(repo)
        if st.get("daemon_pid"):
            self.pids[repo] = int(st["daemon_pid"])
        return dt

    def status(self, repo: Path) -> dict:
        cp = self._run(repo, "status", "--json", timeout=SMALL_CMD_TIMEOUT_S)
        try:
            return json.loads(cp.stdout)
        except json.JSONDecodeError:
            raise BenchError(f"status --json printed no JSON: {cp.stdout!r} {cp.stderr!r}") from None

    def sync_wait(self, repo: Path) -> None:
        try:
            self._run(repo, "sync", "--wait", timeout=SYNC_TIMEOUT_S)
        except BenchError as e:
            raise BenchError(f"{e}\ndaemon.log tail:\n{self.log_tail(repo)}") from None

    def down(self, repo: Path) -> str | None:
        """Stop daemon and agent; returns an error string or None. Never raises."""
        err = None
        try:
            self._run(repo, "down", timeout=SMALL_CMD_TIMEOUT_S)
        except (BenchError, OSError) as e:
            err = f"bridge down failed for {repo}: {e}"
            pid = self.pids.get(repo)
            if pid:  # the daemon we started: end it by its id
                try:
                    os.kill(pid, signal.SIGTERM)
                except OSError:
                    pass
        self.up_repos.discard(repo)
        self.pids.pop(repo, None)
        return err

    @staticmethod
    def log_tail(repo: Path, n: int = 30) -> str:
        p = repo / ".bridge" / "daemon.log"
        try:
            return "\n".join(p.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return "(no daemon.log)"

    def wait_quiet(self, repo: Path, settle_s: float = 0.5, limit_s: float = 30.0) -> dict:
        """Status once bytes_sent/generation stop moving and the mirror is in sync."""
        deadline = time.monotonic() + limit_s
        prev = self.status(repo)
        while True:
            time.sleep(settle_s)
            cur = self.status(repo)
            same = (cur.get("bytes_sent") == prev.get("bytes_sent")
                    and cur.get("generation") == prev.get("generation"))
            if same and cur.get("in_sync") and not cur.get("pending_changes"):
                return cur
            if time.monotonic() > deadline:
                raise BenchError(f"bridge did not settle within {limit_s:.0f} s: {cur}")
            prev = cur


class Trash:
    """Moves directories aside instead of deleting them during the run.

    Deleting 100k files and then creating 100k files is very slow on some
    file systems: ext4 without a journal (as on this project's VMs) skips
    inodes deleted in the last 60-360 s on every create (`recently_deleted()`
    in the kernel's inode allocator), so a timed `bridge up` or rsync right
    after a cleanup is measured against the cleanup. Everything moved here is
    deleted once, when the run is over.
    """

    def __init__(self, work: Path):
        self.dir = work / "trash"
        self.dir.mkdir(exist_ok=True)
        self.n = 0

    def new_dir(self, prefix: str) -> Path:
        return Path(tempfile.mkdtemp(prefix=prefix, dir=self.dir))

    def discard(self, path: Path) -> None:
        if path.exists():
            self.n += 1
            os.rename(path, self.dir / f"{self.n:03d}-{path.name}")


def create_rate(trash: Trash, n: int) -> float:
    """Empty files created per second in a fresh directory: a health check for
    the file system (see Trash); a small figure means the initial-sync
    numbers of both tools are inflated."""
    d = trash.new_dir("calib-")
    t0 = time.perf_counter()
    for i in range(n):
        os.close(os.open(d / f"c{i:06d}", os.O_CREAT | os.O_WRONLY | os.O_EXCL, 0o644))
    return n / (time.perf_counter() - t0)


# --------------------------------------------------------------------------
# tree generation


def generate_tree(repo: Path, n_files: int, n_dirs: int, seed: int) -> tuple[list[str], int]:
    """Deterministic tree: n_files files of 1-4 KiB over ~n_dirs directories.

    About two thirds are compressible text (words from a small vocabulary),
    one third random bytes. Returns (relative paths, total bytes).
    """
    rng = random.Random(seed)
    alphabet = "abcdefghijklmnopqrstuvwxyz_"
    vocab = ["".join(rng.choices(alphabet, k=rng.randint(2, 10))) for _ in range(2000)]
    vocab += ["def", "return", "self", "if", "else", "for", "in", "import", "(", ")", ":", "=", "\n", "    "]
    pool = " ".join(rng.choices(vocab, k=400_000)).encode()  # ~2.4 MB of text
    per_top = max(1, math.ceil(math.sqrt(n_dirs)))
    leaves = []
    for i in range(n_dirs):
        d = repo / f"d{i // per_top:03d}" / f"s{i % per_top:03d}"
        d.mkdir(parents=True, exist_ok=True)
        leaves.append(f"d{i // per_top:03d}/s{i % per_top:03d}")
    rels: list[str] = []
    total = 0
    for j in range(n_files):
        size = rng.randint(1 * KIB, 4 * KIB)
        if rng.random() < 2 / 3:
            name = f"f{j:06d}.py"
            head = f"# file {j} seed {seed}\n".encode()
            off = rng.randrange(0, len(pool) - 4 * KIB)
            data = head + pool[off:off + size - len(head)]
        else:
            name = f"f{j:06d}.bin"
            data = rng.randbytes(size)
        rel = f"{leaves[j % n_dirs]}/{name}"
        with open(repo / rel, "wb") as f:
            f.write(data)
        rels.append(rel)
        total += len(data)
    return rels, total


# --------------------------------------------------------------------------
# 1. edit-to-mirror latency


def bench_latency(bridge: Bridge, repo: Path, rels: list[str], n_edits: int, seed: int,
                  quick: bool) -> dict:
    st = bridge.wait_quiet(repo)
    mirror = Path(st["mirror_path"])
    if not mirror.is_dir():
        raise BenchError(f"mirror_path {mirror} is not a directory")
    rng = random.Random(seed + 1)
    targets = rng.sample(rels, min(n_edits, len(rels)))
    while len(targets) < n_edits:  # tiny trees: allow repeats
        targets.append(rng.choice(rels))
    samples: list[dict] = []
    expected: dict[str, bytes] = {}
    status_before = st
    log(f"latency: {n_edits} edits into {len(rels)} files, mirror {mirror}")
    for i, rel in enumerate(targets):
        mode = "plain" if i % 2 == 0 else "atomic"
        header = f"edit {i} {mode} {rel} {rng.getrandbits(64):016x}\n".encode()
        body = "".join(rng.choices("abcdefghijklmnopqrstuvwxyz \n", k=KIB - len(header))).encode()
        content = header + body
        assert len(content) == KIB
        src = repo / rel
        dst = mirror / rel
        t0 = time.perf_counter()
        if mode == "plain":
            with open(src, "wb") as f:
                f.write(content)
        else:
            tmp = src.with_name(src.name + ATOMIC_TMP_SUFFIX)
            with open(tmp, "wb") as f:
                f.write(content)
            os.rename(tmp, src)
        deadline = t0 + EDIT_TIMEOUT_S
        ok = False
        while True:
            try:
                if os.stat(dst).st_size == KIB:
                    with open(dst, "rb") as f:
                        if f.read() == content:
                            ok = True
                            break
            except FileNotFoundError:
                pass
            now = time.perf_counter()
            if now > deadline:
                break
            time.sleep(0.0002)
        ms = (time.perf_counter() - t0) * 1000.0
        samples.append({"i": i, "mode": mode, "path": rel, "ms": round(ms, 3), "ok": ok})
        expected[rel] = content
        if not ok:
            log(f"latency: edit {i} ({mode}) of {rel} not in the mirror after {EDIT_TIMEOUT_S:.0f} s")
        time.sleep(0.020)

    # Correctness: once settled, every edited file holds its last content.
    bridge.sync_wait(repo)
    st_after = bridge.wait_quiet(repo)
    wrong = [r for r, c in expected.items() if (mirror / r).read_bytes() != c]
    if wrong:
        raise BenchError(f"after sync --wait, {len(wrong)} edited files differ in the mirror: {wrong[:5]}")
    stray = [p for p in mirror.rglob("*" + ATOMIC_TMP_SUFFIX)]
    if stray:
        raise BenchError(f"editor temporaries reached the mirror: {stray[:5]}")
    if quick:
        compare_trees(repo, mirror)
    failures = [s for s in samples if not s["ok"]]
    if quick and failures:
        raise BenchError(f"{len(failures)} edits never reached the mirror: {failures[:5]}")

    def summary(vals: list[float]) -> dict:
        v = sorted(vals)
        return {
            "n": len(v),
            "p50_ms": percentile(v, 50), "p95_ms": percentile(v, 95),
            "p99_ms": percentile(v, 99), "max_ms": v[-1] if v else None,
            "mean_ms": round(statistics.fmean(v), 3) if v else None,
        }

    ok_ms = [s["ms"] for s in samples if s["ok"]]
    res = {
        "files": len(rels),
        "edits": n_edits,
        "edit_bytes": KIB,
        "failures": len(failures),
        "failed_edits": failures,
        "timeout_s": EDIT_TIMEOUT_S,
        "all": summary(ok_ms),
        "plain": summary([s["ms"] for s in samples if s["ok"] and s["mode"] == "plain"]),
        "atomic": summary([s["ms"] for s in samples if s["ok"] and s["mode"] == "atomic"]),
        "target_p50_ms": TARGET_P50_MS,
        "target_p95_ms": TARGET_P95_MS,
        "daemon_bytes_sent_during_edits": st_after.get("bytes_sent", 0) - status_before.get("bytes_sent", 0),
        "daemon_files_hashed_during_edits": st_after.get("files_hashed", 0) - status_before.get("files_hashed", 0),
        "daemon_last_latency_ms": st_after.get("last_latency_ms"),
        "watcher": st_after.get("watcher"),
        "watches": st_after.get("watches"),
        "samples": samples,
    }
    a = res["all"]
    res["meets_target"] = (not failures and a["p50_ms"] is not None
                           and a["p50_ms"] <= TARGET_P50_MS and a["p95_ms"] <= TARGET_P95_MS)
    return res


# --------------------------------------------------------------------------
# 2. initial sync vs rsync


def rsync_copy(src: Path, trash: Trash) -> float:
    dst = trash.new_dir("rsync-dst-")  # fresh and empty; deleted at the end of the run
    t0 = time.perf_counter()
    run_cmd(["rsync", "-a", "--exclude", ".git", "--exclude", ".bridge", f"{src}/", f"{dst}/"],
            RSYNC_TIMEOUT_S)
    return time.perf_counter() - t0


def bench_initial(bridge: Bridge, repo: Path, trash: Trash, n_files: int, reps: int,
                  quick: bool, rels: list[str], keep_up: bool, have_rsync: bool) -> dict:
    bridge_s: list[float] = []
    rsync_s: list[float] = []
    statuses = []
    for r in range(reps):
        if have_rsync:
            dt = rsync_copy(repo, trash)
            rsync_s.append(dt)
            log(f"initial: rsync rep {r + 1}/{reps}: {dt:.2f} s")
        trash.discard(repo / ".bridge")
        dt = bridge.up(repo)
        st = bridge.status(repo)
        log(f"initial: bridge up rep {r + 1}/{reps}: {dt:.2f} s ({st.get('files')} files, "
            f"{human_bytes(st.get('bytes_sent', 0))} sent)")
        if not st.get("in_sync"):
            raise BenchError(f"`bridge up` returned but status says not in sync: {st}")
        if st.get("files") != n_files:
            raise BenchError(f"`bridge up` reports {st.get('files')} files, the tree has {n_files}")
        mirror = Path(st["mirror_path"])
        if quick:
            compare_trees(repo, mirror)
        else:  # spot-check a deterministic sample
            for rel in random.Random(r).sample(rels, min(200, len(rels))):
                if (mirror / rel).read_bytes() != (repo / rel).read_bytes():
                    raise BenchError(f"mirror file {rel} differs after `bridge up`")
        statuses.append({k: st.get(k) for k in ("files", "bytes", "bytes_sent", "chunks_sent",
                                                 "files_hashed", "generation", "watches")})
        bridge_s.append(dt)
        if not (keep_up and r == reps - 1):
            err = bridge.down(repo)
            if err:
                raise BenchError(err)
            trash.discard(repo / ".bridge")  # next `bridge up` starts from nothing

    def summary(v: list[float]) -> dict:
        if not v:
            return {"runs": 0}
        return {"runs": len(v), "median_s": round(statistics.median(v), 3),
                "min_s": round(min(v), 3), "max_s": round(max(v), 3),
                "all_s": [round(x, 3) for x in v]}

    res = {"bridge_up": summary(bridge_s), "rsync": summary(rsync_s), "bridge_status": statuses}
    if bridge_s and rsync_s:
        res["ratio_bridge_over_rsync"] = round(statistics.median(bridge_s) / statistics.median(rsync_s), 3)
    return res


# --------------------------------------------------------------------------
# 3. bytes on the wire for a change in a big file


RSYNC_FIELDS = {
    "total_bytes_sent": r"Total bytes sent:\s*([\d,.]+)",
    "total_bytes_received": r"Total bytes received:\s*([\d,.]+)",
    "literal_data": r"Literal data:\s*([\d,.]+)",
    "matched_data": r"Matched data:\s*([\d,.]+)",
}


def parse_rsync_stats(text: str) -> dict:
    out = {}
    for k, pat in RSYNC_FIELDS.items():
        m = re.search(pat, text)
        if m:
            out[k] = int(re.sub(r"[,.]", "", m.group(1)))
    return out


def bench_delta(bridge: Bridge, work: Path, big_mib: int, change_kib: int, seed: int,
                quick: bool, have_rsync: bool) -> dict:
    repo = work / "bigrepo"
    git_init(repo)
    big = repo / "big.bin"
    size = big_mib * MIB
    rng = random.Random(seed + 2)
    log(f"delta: writing {big_mib} MiB of random bytes")
    with open(big, "wb") as f:
        left = size
        while left:
            n = min(4 * MIB, left)
            f.write(rng.randbytes(n))
            left -= n
    # Backdate the original: rsync's quick check compares whole-second mtimes,
    # and an edit within the same second as the copy would be skipped.
    old_t = time.time() - 3600
    os.utime(big, (old_t, old_t))
    rsync_dst = work / "bigrepo-rsync-dst"
    rsync_dst.mkdir()
    shutil.copy2(big, rsync_dst / "big.bin")  # the destination holds the original

    res: dict = {"file_bytes": size, "change_bytes": change_kib * KIB, "offset": size // 2}
    up_s = bridge.up(repo)
    st0 = bridge.wait_quiet(repo)
    mirror = Path(st0["mirror_path"])
    res["bridge_up_s"] = round(up_s, 3)
    res["bridge_initial_bytes_sent"] = st0.get("bytes_sent")

    change = rng.randbytes(change_kib * KIB)
    t0 = time.perf_counter()
    with open(big, "r+b") as f:
        f.seek(size // 2)
        f.write(change)
    bridge.sync_wait(repo)
    t_bridge = time.perf_counter() - t0
    st1 = bridge.wait_quiet(repo)
    want = sha256_file(big)
    if sha256_file(mirror / "big.bin") != want:
        raise BenchError("the mirror's big.bin differs from the source after sync --wait")
    res["bridge"] = {
        "bytes_sent": st1["bytes_sent"] - st0["bytes_sent"],
        "chunks_sent": st1.get("chunks_sent", 0) - st0.get("chunks_sent", 0),
        "files_hashed": st1.get("files_hashed", 0) - st0.get("files_hashed", 0),
        "edit_to_sync_wait_s": round(t_bridge, 3),
        "daemon_last_latency_ms": st1.get("last_latency_ms"),
    }
    log(f"delta: bridge sent {res['bridge']['bytes_sent']} bytes in {t_bridge:.3f} s")
    if quick:
        b = res["bridge"]["bytes_sent"]
        if not (change_kib * KIB <= b < size):
            raise BenchError(f"bridge sent {b} bytes for a {change_kib} KiB change in a "
                             f"{size}-byte file (expected between the change size and the file size)")

    if have_rsync:
        t0 = time.perf_counter()
        cp = run_cmd(["rsync", "-a", "--no-whole-file", "--stats", "--exclude", ".git",
                      "--exclude", ".bridge", f"{repo}/", f"{rsync_dst}/"], RSYNC_TIMEOUT_S)
        t_rsync = time.perf_counter() - t0
        stats = parse_rsync_stats(cp.stdout)
        if "total_bytes_sent" not in stats:
            raise BenchError(f"cannot parse rsync --stats output:\n{cp.stdout}")
        if sha256_file(rsync_dst / "big.bin") != want:
            raise BenchError("rsync's destination differs from the source")
        res["rsync"] = {"bytes_sent": stats["total_bytes_sent"], "time_s": round(t_rsync, 3),
                        "stats": stats}
        log(f"delta: rsync sent {stats['total_bytes_sent']} bytes in {t_rsync:.3f} s")
    err = bridge.down(repo)
    if err:
        raise BenchError(err)
    return res


# --------------------------------------------------------------------------
# report


def fmt_ms(v) -> str:
    return "-" if v is None else f"{v:8.1f}"


def render(results: dict) -> str:
    cfg = results["config"]
    m = results["machine"]
    lines = [
        f"bridge sync benchmark ({'quick' if cfg['quick'] else 'full'}) - {m['date']}",
        f"machine: {m['nproc']} CPUs, kernel {m['kernel']}, {m.get('bridge_version', '?')}, "
        f"{m.get('rsync_version') or 'no rsync'}",
    ]
    if m.get("fs_create_files_per_s"):
        lines.append(f"file system ({m.get('workdir_fs', {}).get('type', '?')}): "
                     f"{m['fs_create_files_per_s']:,} empty files created/s before the run")
    if m.get("bridge_binary_stale"):
        lines.append(f"WARNING: the bridge binary is older than {m.get('newest_source')}")
    lines.append("")
    lat = results.get("latency")
    lines.append(f"1. Edit-to-mirror latency: 1 KiB edit, {cfg['files']} files, {cfg['edits']} edits")
    if isinstance(lat, dict) and "all" in lat:
        lines.append(f"   {'':8} {'n':>5} {'p50 ms':>8} {'p95 ms':>8} {'p99 ms':>8} {'max ms':>8} {'mean ms':>8}")
        for k in ("all", "plain", "atomic"):
            s = lat[k]
            lines.append(f"   {k:8} {s['n']:>5} {fmt_ms(s['p50_ms'])} {fmt_ms(s['p95_ms'])} "
                         f"{fmt_ms(s['p99_ms'])} {fmt_ms(s['max_ms'])} {fmt_ms(s['mean_ms'])}")
        lines.append(f"   failures (> {lat['timeout_s']:.0f} s): {lat['failures']};  target p50 <= "
                     f"{TARGET_P50_MS:.0f} ms, p95 <= {TARGET_P95_MS:.0f} ms: "
                     f"{'met' if lat['meets_target'] else 'NOT met'}")
    else:
        lines.append(f"   FAILED: {results['errors'].get('latency', 'not run')}")
    lines.append("")

    ini = results.get("initial_sync")
    lines.append(f"2. Initial sync: {cfg['files']} files ({human_bytes(results.get('tree_bytes', 0))}) "
                 f"in ~{cfg['dirs']} dirs")
    if isinstance(ini, dict):
        lines.append(f"   {'':14} {'runs':>4} {'median s':>9} {'min s':>8} {'max s':>8}")
        for k, label in (("bridge_up", "bridge up"), ("rsync", "rsync -a")):
            s = ini[k]
            if s["runs"]:
                lines.append(f"   {label:14} {s['runs']:>4} {s['median_s']:9.2f} {s['min_s']:8.2f} {s['max_s']:8.2f}")
            else:
                lines.append(f"   {label:14}    0")
        if "ratio_bridge_over_rsync" in ini:
            lines.append(f"   ratio bridge/rsync (medians): {ini['ratio_bridge_over_rsync']:.2f}")
    else:
        lines.append(f"   FAILED: {results['errors'].get('initial_sync', 'not run')}")
    lines.append("")

    d = results.get("delta")
    lines.append(f"3. Bytes on the wire: {cfg['change_kib']} KiB change at the middle of a "
                 f"{cfg['big_mib']} MiB file")
    if isinstance(d, dict) and "bridge" in d:
        lines.append(f"   {'':10} {'bytes sent':>14} {'':>11} {'time s':>8}")
        b = d["bridge"]
        lines.append(f"   {'bridge':10} {b['bytes_sent']:>14,} {'(' + human_bytes(b['bytes_sent']) + ')':>11} "
                     f"{b['edit_to_sync_wait_s']:8.3f}   (edit -> sync --wait returns)")
        r = d.get("rsync")
        if r:
            lines.append(f"   {'rsync':10} {r['bytes_sent']:>14,} {'(' + human_bytes(r['bytes_sent']) + ')':>11} "
                         f"{r['time_s']:8.3f}   (rsync --no-whole-file)")
        lines.append(f"   (bridge up of the {cfg['big_mib']} MiB file: {d['bridge_up_s']:.2f} s, "
                     f"{d['bridge_initial_bytes_sent']:,} bytes)")
    else:
        lines.append(f"   FAILED: {results['errors'].get('delta', 'not run')}")
    render_errors(lines, results["errors"])
    return "\n".join(lines)


# --------------------------------------------------------------------------


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true",
                    help="tiny sizes, check correctness (CI smoke test); timings mean nothing")
    ap.add_argument("--out", default=str(HERE / "results" / "sync.json"),
                    help="JSON results file (default: bench/results/sync.json; "
                         "bench/results/sync-quick.json with --quick)")
    ap.add_argument("--bridge", default=os.environ.get("BRIDGE_BIN", str(ROOT / "target" / "release" / "bridge")),
                    help="bridge binary (bridge-agent must sit next to it); env BRIDGE_BIN")
    ap.add_argument("--files", type=int, help="files in the tree (full: 100000)")
    ap.add_argument("--dirs", type=int, help="leaf directories (full: 1000)")
    ap.add_argument("--edits", type=int, help="latency edits (full: 200)")
    ap.add_argument("--reps", type=int, help="initial-sync repetitions, each bridge and rsync (full: 3)")
    ap.add_argument("--big-mib", type=int, help="size of the big file in MiB (full: 200)")
    ap.add_argument("--change-kib", type=int, help="size of the change in the big file in KiB (full: 1024)")
    ap.add_argument("--seed", type=int, default=1234)
    ap.add_argument("--only", choices=["latency", "initial", "delta"], action="append",
                    help="run only these parts (repeatable); latency implies initial")
    ap.add_argument("--workdir", default="/tmp", help="parent of the temporary work directory")
    ap.add_argument("--keep", action="store_true", help="keep the work directory")
    args = ap.parse_args()

    base = QUICK if args.quick else FULL
    cfg = {k: (getattr(args, k) if getattr(args, k) is not None else v) for k, v in base.items()}
    cfg.update(quick=args.quick, seed=args.seed)
    if args.quick and args.out == str(HERE / "results" / "sync.json"):
        args.out = str(HERE / "results" / "sync-quick.json")
    only = set(args.only or ["latency", "initial", "delta"])
    if "latency" in only:
        only.add("initial")

    bridge_exe = Path(args.bridge).resolve()
    if not check_binaries(bridge_exe):
        return 2

    install_term_handlers()

    rsync_err = ensure_rsync()
    results: dict = {"config": cfg, "machine": machine_info(bridge_exe, os.path.realpath(args.workdir)), "errors": {}}
    if rsync_err:
        results["errors"]["rsync"] = rsync_err
    have_rsync = rsync_err is None

    bridge = Bridge(bridge_exe)
    work = Path(tempfile.mkdtemp(prefix="bridge-bench-", dir=args.workdir))
    trash = Trash(work)
    started = time.perf_counter()
    log(f"work directory {work}")
    try:
        rate = create_rate(trash, 2000 if args.quick else 20_000)
        results["machine"]["fs_create_files_per_s"] = round(rate)
        log(f"file system: {rate:,.0f} empty files created per second")
        if "initial" in only:
            repo = work / "tree"
            git_init(repo)
            t0 = time.perf_counter()
            log(f"generating {cfg['files']} files in {cfg['dirs']} directories (seed {cfg['seed']})")
            rels, total = generate_tree(repo, cfg["files"], cfg["dirs"], cfg["seed"])
            results["tree_bytes"] = total
            results["tree_generation_s"] = round(time.perf_counter() - t0, 2)
            log(f"generated {human_bytes(total)} in {results['tree_generation_s']} s")
            up_for_latency = False
            try:
                results["initial_sync"] = bench_initial(
                    bridge, repo, trash, cfg["files"], cfg["reps"], args.quick, rels,
                    keep_up="latency" in only, have_rsync=have_rsync)
                up_for_latency = "latency" in only
            except Exception as e:  # noqa: BLE001 - recorded and reported
                results["errors"]["initial_sync"] = f"{type(e).__name__}: {e}"
                log(traceback.format_exc())
            if "latency" in only:
                try:
                    if not up_for_latency:  # initial sync failed part-way: try once more
                        bridge.down(repo)
                        trash.discard(repo / ".bridge")
                        bridge.up(repo)
                    results["latency"] = bench_latency(bridge, repo, rels, cfg["edits"], cfg["seed"], args.quick)
                except Exception as e:  # noqa: BLE001
                    results["errors"]["latency"] = f"{type(e).__name__}: {e}"
                    log(traceback.format_exc())
            err = bridge.down(repo)
            if err:
                results["errors"]["down"] = err
        if "delta" in only:
            try:
                results["delta"] = bench_delta(bridge, work, cfg["big_mib"], cfg["change_kib"],
                                               cfg["seed"], args.quick, have_rsync)
            except Exception as e:  # noqa: BLE001
                results["errors"]["delta"] = f"{type(e).__name__}: {e}"
                log(traceback.format_exc())
    finally:
        for repo in list(bridge.up_repos):
            err = bridge.down(repo)
            if err:
                results["errors"].setdefault("down", err)
        if args.keep:
            log(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)

    results["total_s"] = round(time.perf_counter() - started, 1)
    out = Path(args.out)
    write_results(out, results, render)
    if results["errors"]:
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

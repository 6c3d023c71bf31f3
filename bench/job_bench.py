#!/usr/bin/env python3
"""Benchmark bridge's job path (`bridge run`) from the command line.

Two figures, each measured in the same run, interleaved, next to a peer that
does the same work over ssh to a private sshd on 127.0.0.1 (this machine):

1. Warm `bridge run` to the first log line: with bridge up and the job's
   Python env already cached (an empty requirements.txt; one unmeasured
   warm-up run builds it), the time from spawning `bridge -C REPO run job.toml`
   until "first" arrives on its stdout, and the command's full wall time (the
   job sleeps 0.2 s after printing). Peers: `ssh 127.0.0.1 'cd DIR && python3
   -c ...'` with a fresh connection each time (what users type), and the same
   over a ControlMaster connection opened once (a fairer peer: no handshake).
   Target: bridge p50 <= 300 ms.
2. Log throughput: a job printing 1,000,000 lines "line N", `bridge run
   lines.toml > FILE`, next to the same `python3 -c` run locally `> FILE` and
   over ssh `> FILE`. Every output is checked (all lines, in order).

The sshd is set up by bench/sshd.py (shared with ssh_bench.py): openssh-server is installed with apt-get
when /usr/sbin/sshd is missing (as root; no service is started), keys and an
sshd_config go to the temporary work directory, `sshd -D` runs as a child on a
free port and is killed at the end. Without sshd the peers are skipped and the
reason is printed and recorded.

The peers run a venv (made here, without pip) of the interpreter running this
script, like bridge's cached env: no pyenv shim, no global site-packages. The
remote bash skips ~/.bashrc unless --ssh-bashrc (see sshd.Sshd.opts).

`--quick` (CI): 5 runs, 100,000 lines, 2 repetitions; asserts correctness
(first line, every line in order, exit codes), never timing. Works with the
debug build. Python 3.11 standard library only.

Usage:
    cargo build --release --bins
    python3 bench/job_bench.py --quick --bridge target/debug/bridge
    python3 bench/job_bench.py --bridge target/release/bridge
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import select
import shlex
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
sys.path.insert(0, str(HERE))
sys.dont_write_bytecode = True  # no bench/__pycache__ from importing sshd.py, common.py
from sshd import Sshd, SshdError, ensure_sshd  # noqa: E402  (bench/sshd.py, shared with ssh_bench.py)
from common import (  # noqa: E402  (bench/common.py, shared with sync_bench.py, ssh_bench.py)
    BenchError, add_bridge_info, base_machine_info, check_binaries, git_init, git_state,
    install_term_handlers, log, percentile, render_errors, run_cmd, ssh_version, write_results)

MB = 1_000_000

TARGET_FIRST_LINE_P50_MS = 300.0

UP_TIMEOUT_S = 120.0
RUN_TIMEOUT_S = 120.0
SMALL_CMD_TIMEOUT_S = 60.0

QUICK = dict(runs=5, lines=100_000, line_reps=2)
FULL = dict(runs=20, lines=1_000_000, line_reps=3)

FIRST_CODE = "print(\"first\", flush=True); import time; time.sleep(0.2)"
LINES_CODE = "import sys; sys.stdout.writelines(f'line {i}\\n' for i in range({n}))"


# --------------------------------------------------------------------------
# helpers


def stats_ms(vals_s: list[float]) -> dict:
    v = sorted(x * 1000 for x in vals_s)
    if not v:
        return {"n": 0}
    return {"n": len(v), "p50_ms": round(statistics.median(v), 1),
            "p90_ms": round(percentile(v, 90), 1), "min_ms": round(v[0], 1),
            "max_ms": round(v[-1], 1), "all_ms": [round(x * 1000, 1) for x in vals_s]}


def machine_info(bridge: Path, python: str) -> dict:
    info = base_machine_info(python_executable=python)
    try:
        info["loadavg"] = os.getloadavg()
    except OSError:
        pass
    add_bridge_info(info, bridge)
    info["ssh_version"] = ssh_version()
    info.update(git_state())
    return info


def timed_first_line(args: list[str], timeout: float, marker: bytes = b"first") -> dict:
    """Spawns args, reads stdout unbuffered; returns the time to the first
    complete line, the full wall time, the first line, stdout and stderr."""
    errf = tempfile.TemporaryFile()
    t0 = time.perf_counter()
    p = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                         stderr=errf, bufsize=0)
    fd = p.stdout.fileno()
    buf = bytearray()
    t_first = None
    deadline = t0 + timeout
    try:
        while True:
            left = deadline - time.perf_counter()
            if left <= 0:
                raise BenchError(f"timed out after {timeout:.0f} s: {' '.join(args)}")
            r, _, _ = select.select([fd], [], [], left)
            if not r:
                continue
            chunk = os.read(fd, 65536)
            if not chunk:
                break
            buf += chunk
            if t_first is None and b"\n" in buf:
                t_first = time.perf_counter()
        rc = p.wait(timeout=max(1.0, deadline - time.perf_counter()))
        t_end = time.perf_counter()
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
        p.stdout.close()
    errf.seek(0)
    err = errf.read().decode(errors="replace")
    errf.close()
    first = bytes(buf).split(b"\n", 1)[0]
    if rc != 0:
        raise BenchError(f"exit {rc}: {' '.join(args)}\nstdout: {bytes(buf)[:500]!r}\nstderr: {err[-2000:]}")
    if t_first is None or first != marker:
        raise BenchError(f"first stdout line {first!r}, expected {marker!r}: {' '.join(args)}\n"
                         f"stderr: {err[-2000:]}")
    return {"first_s": t_first - t0, "total_s": t_end - t0, "stdout": bytes(buf), "stderr": err}


def timed_to_file(args: list[str], out: Path, timeout: float, shell: bool = False) -> float:
    """Wall time of args with stdout redirected to out (a file)."""
    errf = tempfile.TemporaryFile()
    with open(out, "wb") as f:
        t0 = time.perf_counter()
        p = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=f, stderr=errf, shell=shell)
        try:
            rc = p.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()
            raise BenchError(f"timed out after {timeout:.0f} s: {args}") from None
        dt = time.perf_counter() - t0
    errf.seek(0)
    err = errf.read().decode(errors="replace")
    errf.close()
    if rc != 0:
        raise BenchError(f"exit {rc}: {args}\nstderr: {err[-2000:]}")
    return dt


def expected_lines(n: int) -> tuple[int, str]:
    data = "".join(f"line {i}\n" for i in range(n)).encode()
    return len(data), hashlib.sha256(data).hexdigest()


def check_lines(path: Path, n: int, want: tuple[int, str]) -> None:
    """Raise unless path holds exactly "line 0\\n" .. "line n-1\\n"."""
    data = path.read_bytes()
    if (len(data), hashlib.sha256(data).hexdigest()) == want:
        return
    lines = data.split(b"\n")
    n_got = len(lines) - 1
    bad = next((i for i, l in enumerate(lines[:n]) if l != f"line {i}".encode()), None)
    raise BenchError(f"{path}: {len(data)} bytes, {n_got} lines, expected "
                     f"{want[0]} bytes and {n} lines in order; first wrong line {bad}: "
                     f"{lines[bad][:80] if bad is not None else None!r}")


# --------------------------------------------------------------------------
# bridge driver


class Bridge:
    def __init__(self, exe: Path):
        self.exe = exe
        self.up_repos: set[Path] = set()
        self.pids: dict[Path, int] = {}

    def args(self, repo: Path, *a: str) -> list[str]:
        return [str(self.exe), "-C", str(repo), *a]

    def up(self, repo: Path) -> float:
        self.up_repos.add(repo)
        t0 = time.perf_counter()
        try:
            run_cmd(self.args(repo, "up"), UP_TIMEOUT_S)
        except BenchError as e:
            raise BenchError(f"{e}\ndaemon.log tail:\n{self.log_tail(repo)}") from None
        dt = time.perf_counter() - t0
        try:
            st = json.loads(run_cmd(self.args(repo, "status", "--json"), SMALL_CMD_TIMEOUT_S).stdout)
            if st.get("daemon_pid"):
                self.pids[repo] = int(st["daemon_pid"])
        except (BenchError, json.JSONDecodeError):
            pass
        return dt

    def down(self, repo: Path) -> str | None:
        """Stop daemon and agent; returns an error string or None. Never raises."""
        err = None
        try:
            run_cmd(self.args(repo, "down"), SMALL_CMD_TIMEOUT_S)
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
    def log_tail(repo: Path, n: int = 30, name: str = "daemon.log") -> str:
        p = repo / ".bridge" / name
        try:
            return "\n".join(p.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return f"(no {name})"


# --------------------------------------------------------------------------
# the benchmark


def peer_python(work: Path) -> str:
    """A venv of the interpreter running this script, for the peers.

    bridge runs the job in a cached venv, which does not load the global
    site-packages; the base interpreter may (on the project's VMs a .pth
    file there imports certifi: ~0.2 s per start). The peers get an
    equivalent venv, so all sides start the same interpreter the same way."""
    venv = work / "peer-venv"
    run_cmd([os.path.realpath(sys.executable), "-m", "venv", "--without-pip", str(venv)], 120)
    return str(venv / "bin" / "python")


def bridge_envs(repo: Path) -> list[str]:
    """The base interpreters of bridge's cached envs (pyvenv.cfg `home`/`version`)."""
    out = []
    for cfg in sorted((repo / ".bridge").glob("agent/cache/envs/*/pyvenv.cfg")):
        try:
            kv = dict(l.split(" = ", 1) for l in cfg.read_text().splitlines() if " = " in l)
            out.append(f"{kv.get('home', '?')} ({kv.get('version', kv.get('version_info', '?'))})")
        except OSError:
            pass
    return out


def python3_on_path() -> dict:
    """What `python3` is on the PATH bridge's agent inherited. A script there
    (a pyenv or asdf shim) is run by the agent on every job to find the
    interpreter (agent/src/envcache.rs: python_id), ~0.1-0.2 s per job; a
    binary is cached. Running this script through pyenv's `python3` puts the
    real interpreter's directory first on PATH, so bridge sees a binary."""
    p = shutil.which("python3")
    if not p:
        return {"path": None}
    try:
        with open(os.path.realpath(p), "rb") as f:
            script = f.read(2) == b"#!"
    except OSError:
        script = None
    return {"path": p, "real": os.path.realpath(p), "is_script": script}


def write_repo(repo: Path, n_lines: int) -> None:
    git_init(repo)
    (repo / "requirements.txt").write_text("")
    (repo / "job.toml").write_text(
        'name = "first"\n'
        f"run = {json.dumps('python -c ' + shlex.quote(FIRST_CODE))}\n"
        "\n[python]\nrequirements = \"requirements.txt\"\n")
    # The same cached env, so `python3` is the venv's interpreter (no PATH shims).
    (repo / "lines.toml").write_text(
        'name = "lines"\n'
        f"run = {json.dumps('python3 -c ' + shlex.quote(LINES_CODE.replace('{n}', str(n_lines))))}\n"
        "\n[python]\nrequirements = \"requirements.txt\"\n")


def bench_first_line(bridge: Bridge, repo: Path, sshd: Sshd | None, py: str, runs: int,
                     errors: dict) -> dict:
    remote = f"cd {shlex.quote(str(repo))} && {shlex.quote(py)} -c {shlex.quote(FIRST_CODE)}"
    peers: dict[str, list[str]] = {"bridge": bridge.args(repo, "run", "job.toml")}
    if sshd:
        peers["ssh"] = sshd.args(False, remote)
        if sshd.master:
            peers["ssh_mux"] = sshd.args(True, remote)
    peers["local"] = ["sh", "-c", remote]  # the floor: the same command, no transport
    # Unmeasured warm-up: builds bridge's cached env, warms every path.
    log("first line: warm-up (builds the job's cached Python env)")
    t0 = time.perf_counter()
    w = timed_first_line(peers["bridge"], RUN_TIMEOUT_S)
    res: dict = {"warmup_bridge_s": round(time.perf_counter() - t0, 3), "runs": runs}
    for name, args in list(peers.items()):
        if name != "bridge":
            try:
                timed_first_line(args, RUN_TIMEOUT_S)
            except BenchError as e:
                errors[f"first_line_{name}"] = str(e)
                log(f"first line: {name} fails, skipped: {e}")
                del peers[name]
    first: dict[str, list[float]] = {k: [] for k in peers}
    total: dict[str, list[float]] = {k: [] for k in peers}
    log(f"first line: {runs} runs each of {', '.join(peers)}, interleaved")
    for i in range(runs):
        for name, args in peers.items():
            r = timed_first_line(args, RUN_TIMEOUT_S)
            first[name].append(r["first_s"])
            total[name].append(r["total_s"])
            if name == "bridge" and i == 0:
                res["bridge_stderr_sample"] = r["stderr"].strip().splitlines()[:5]
    for name in peers:
        res[name] = {"first_line": stats_ms(first[name]), "total": stats_ms(total[name])}
    b50 = res["bridge"]["first_line"]["p50_ms"]
    res["meets_target"] = b50 <= TARGET_FIRST_LINE_P50_MS
    res["ratios_first_line_p50"] = {f"bridge/{k}": round(b50 / res[k]["first_line"]["p50_ms"], 2)
                                    for k in peers if k != "bridge"}
    res["ratios_total_p50"] = {f"bridge/{k}": round(res["bridge"]["total"]["p50_ms"] / res[k]["total"]["p50_ms"], 2)
                               for k in peers if k != "bridge"}
    return res


def bench_lines(bridge: Bridge, repo: Path, work: Path, sshd: Sshd | None, py: str, n: int,
                reps: int, errors: dict) -> dict:
    code = LINES_CODE.replace("{n}", str(n))
    cmd = f"cd {shlex.quote(str(repo))} && {shlex.quote(py)} -c {shlex.quote(code)}"
    want = expected_lines(n)
    peers: dict[str, tuple[list[str], bool]] = {
        "bridge": (bridge.args(repo, "run", "lines.toml"), False),
        "local": (["sh", "-c", cmd], False),
    }
    if sshd:
        peers["ssh"] = (sshd.args(False, cmd), False)
        if sshd.master:
            peers["ssh_mux"] = (sshd.args(True, cmd), False)
    times: dict[str, list[float]] = {k: [] for k in peers}
    log(f"log throughput: {n} lines, {reps} repetitions each of {', '.join(peers)}, interleaved")
    for r in range(reps):
        for name, (args, shell) in peers.items():
            out = work / f"lines-{name}.out"
            try:
                dt = timed_to_file(args, out, RUN_TIMEOUT_S * 3, shell=shell)
                check_lines(out, n, want)
            except BenchError as e:
                if name == "bridge":
                    raise
                errors[f"lines_{name}"] = str(e)
                continue
            finally:
                out.unlink(missing_ok=True)
            times[name].append(dt)
    res: dict = {"lines": n, "bytes": want[0], "reps": reps}
    for name, v in times.items():
        if not v:
            continue
        med = statistics.median(v)
        res[name] = {"median_s": round(med, 3), "min_s": round(min(v), 3), "max_s": round(max(v), 3),
                     "all_s": [round(x, 3) for x in v], "mb_per_s": round(want[0] / med / MB, 1),
                     "lines_per_s": round(n / med)}
    res["ratios_time_median"] = {f"bridge/{k}": round(res["bridge"]["median_s"] / res[k]["median_s"], 2)
                                 for k in times if k != "bridge" and k in res}
    return res


# --------------------------------------------------------------------------
# report


def render(results: dict) -> str:
    cfg = results["config"]
    m = results["machine"]
    lines = [
        f"bridge job benchmark ({'quick' if cfg['quick'] else 'full'}) - {m['date']}",
        f"machine: {m['nproc']} CPUs, kernel {m['kernel']}, {m.get('bridge_version', '?')}, "
        f"{m.get('ssh_version') or 'no ssh'}",
    ]
    if m.get("bridge_binary_stale"):
        lines.append(f"WARNING: the bridge binary is older than {m.get('newest_source')}")
    if results.get("ssh_skipped"):
        lines.append(f"ssh peers skipped: {results['ssh_skipped']}")
    pop = results.get("python", {}).get("python3_on_path", {})
    if pop.get("is_script"):
        lines.append(f"note: python3 on PATH is a script ({pop['path']}): bridge's agent runs it on every "
                     f"job to find the interpreter (~0.1-0.2 s more to the first line)")
    lines.append("")
    fl = results.get("first_line")
    lines.append(f"1. Warm `bridge run` to first log line ({cfg['runs']} runs each, interleaved; "
                 f"the job sleeps 0.2 s after the line)")
    if isinstance(fl, dict) and "bridge" in fl:
        lines.append(f"   {'':10} {'first p50':>10} {'p90':>8} {'min':>8}   {'total p50':>10} {'p90':>8}   "
                     f"{'bridge/peer (first, total)':>26}")
        for k in ("bridge", "ssh", "ssh_mux", "local"):
            if k not in fl:
                continue
            a, t = fl[k]["first_line"], fl[k]["total"]
            ratio = "" if k == "bridge" else \
                f"{fl['ratios_first_line_p50'][f'bridge/{k}']:.2f}x, {fl['ratios_total_p50'][f'bridge/{k}']:.2f}x"
            lines.append(f"   {k:10} {a['p50_ms']:8.1f}ms {a['p90_ms']:6.1f}ms {a['min_ms']:6.1f}ms   "
                         f"{t['p50_ms']:8.1f}ms {t['p90_ms']:6.1f}ms   {ratio:>26}")
        lines.append(f"   target bridge p50 <= {TARGET_FIRST_LINE_P50_MS:.0f} ms: "
                     f"{'met' if fl['meets_target'] else 'NOT met'}  "
                     f"(warm-up run that built the env: {fl['warmup_bridge_s']:.2f} s)")
    else:
        lines.append(f"   FAILED: {results['errors'].get('first_line', 'not run')}")
    lines.append("")
    ln = results.get("lines")
    lines.append(f"2. Log throughput: {cfg['lines']:,} lines to a file (median of {cfg['line_reps']})")
    if isinstance(ln, dict) and "bridge" in ln:
        lines.append(f"   ({ln['bytes'] / MB:.1f} MB)  {'median s':>9} {'min s':>7} {'max s':>7} {'MB/s':>8} "
                     f"{'lines/s':>11} {'bridge/peer':>12}")
        for k in ("bridge", "local", "ssh", "ssh_mux"):
            if k not in ln:
                continue
            s = ln[k]
            ratio = "" if k == "bridge" else f"{ln['ratios_time_median'][f'bridge/{k}']:.2f}x"
            lines.append(f"   {k:12} {s['median_s']:9.3f} {s['min_s']:7.3f} {s['max_s']:7.3f} "
                         f"{s['mb_per_s']:8.1f} {s['lines_per_s']:>11,} {ratio:>12}")
    else:
        lines.append(f"   FAILED: {results['errors'].get('lines', 'not run')}")
    render_errors(lines, results["errors"])
    return "\n".join(lines)


# --------------------------------------------------------------------------


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true",
                    help="small sizes, check correctness (CI smoke test); timings mean nothing")
    ap.add_argument("--out", default=str(HERE / "results" / "jobs.json"),
                    help="JSON results file (default: bench/results/jobs.json; "
                         "bench/results/jobs-quick.json with --quick)")
    ap.add_argument("--bridge", default=os.environ.get("BRIDGE_BIN", str(ROOT / "target" / "release" / "bridge")),
                    help="bridge binary (bridge-agent must sit next to it); env BRIDGE_BIN")
    ap.add_argument("--runs", type=int, help="first-line runs per peer (full: 20)")
    ap.add_argument("--lines", type=int, help="lines printed by the throughput job (full: 1000000)")
    ap.add_argument("--line-reps", type=int, help="throughput repetitions per peer (full: 3)")
    ap.add_argument("--no-ssh", action="store_true", help="skip the ssh peers")
    ap.add_argument("--ssh-bashrc", action="store_true",
                    help="let the remote bash source ~/.bashrc (skipped by default: SHLVL=1)")
    ap.add_argument("--workdir", default="/tmp", help="parent of the temporary work directory")
    ap.add_argument("--keep", action="store_true", help="keep the work directory (and .bridge/ logs)")
    args = ap.parse_args()

    base = QUICK if args.quick else FULL
    cfg = {k: (getattr(args, k) if getattr(args, k) is not None else v) for k, v in base.items()}
    cfg.update(quick=args.quick)
    if args.quick and args.out == str(HERE / "results" / "jobs.json"):
        args.out = str(HERE / "results" / "jobs-quick.json")

    bridge_exe = Path(args.bridge).resolve()
    if not check_binaries(bridge_exe):
        return 2

    install_term_handlers()

    cfg.update(ssh_bashrc=args.ssh_bashrc)
    # Every side runs Python with its default (block-buffered) stdout: bridge's
    # job inherits the environment of `bridge up` (daemon -> agent -> job) and
    # the local peer ours, while ssh's remote side gets a fresh one, so an
    # inherited PYTHONUNBUFFERED=1 (set on the project's VMs) would make only
    # some sides write one line per syscall (3x slower on 1M lines).
    cfg["removed_env"] = {k: os.environ.pop(k) for k in ("PYTHONUNBUFFERED",) if k in os.environ}
    results: dict = {"config": cfg, "machine": machine_info(bridge_exe, os.path.realpath(sys.executable)),
                     "errors": {}}
    bridge = Bridge(bridge_exe)
    work = Path(tempfile.mkdtemp(prefix="bridge-jobbench-", dir=args.workdir))
    repo = work / "repo"
    sshd: Sshd | None = None
    started = time.perf_counter()
    log(f"work directory {work}")
    try:
        if args.no_ssh:
            results["ssh_skipped"] = "--no-ssh"
        else:
            err = ensure_sshd(log)
            if err:
                results["ssh_skipped"] = err
            else:
                sshd = Sshd(work / "ssh", bashrc=args.ssh_bashrc, comment="job_bench")
                try:
                    sshd.start()
                    log(f"sshd on 127.0.0.1:{sshd.port}")
                    try:
                        sshd.start_master()
                    except SshdError as e:
                        results["errors"]["ssh_mux"] = str(e)
                except SshdError as e:
                    results["ssh_skipped"] = str(e)
                    sshd.stop()
                    sshd = None
            if results.get("ssh_skipped"):
                log(f"ssh peers skipped: {results['ssh_skipped']}")
        write_repo(repo, cfg["lines"])
        py = peer_python(work)
        results["bridge_up_s"] = round(bridge.up(repo), 3)
        try:
            results["first_line"] = bench_first_line(bridge, repo, sshd, py, cfg["runs"], results["errors"])
        except Exception as e:  # noqa: BLE001 - recorded and reported
            results["errors"]["first_line"] = f"{type(e).__name__}: {e}"
            log(traceback.format_exc())
        results["python"] = {"peers": f"venv of {os.path.realpath(sys.executable)}",
                             "bridge_envs": bridge_envs(repo), "python3_on_path": python3_on_path()}
        try:
            results["lines"] = bench_lines(bridge, repo, work, sshd, py, cfg["lines"], cfg["line_reps"],
                                           results["errors"])
        except Exception as e:  # noqa: BLE001
            results["errors"]["lines"] = f"{type(e).__name__}: {e}"
            log(traceback.format_exc())
    finally:
        for r in list(bridge.up_repos):
            err = bridge.down(r)
            if err:
                results["errors"].setdefault("down", err)
        if sshd:
            sshd.stop()
        if args.keep:
            log(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)

    results["total_s"] = round(time.perf_counter() - started, 1)
    out = Path(args.out)
    write_results(out, results, render)
    return 1 if results["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())

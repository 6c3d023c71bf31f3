"""Scenarios 6, 7 and 8: jobs on the ml-repo's agent (bridge up since
scenario 1), next to the same work done over `ssh` through the same kind of
link, and locally.

The job scripts live in the repository (`bench-jobs/`, synced like any
file); the ssh peers run them from bridge's mirror with a venv of the same
interpreter bridge's cached job environment uses, so every side starts the
same Python the same way. PYTHONUNBUFFERED is removed from the harness's
environment before anything starts (bench.py): every side's Python then
block-buffers its stdout.
"""

from __future__ import annotations

import os
import pty
import select
import shlex
import subprocess
import sys
import tempfile
import time
import tty
from pathlib import Path

from common import MIB, BenchError, human_bytes, log, run_cmd, sha256_file, summarize
from peers import rsync_pull
from scenarios import Context, dur, ratio, row

JOB_DIR = "bench-jobs"
RUN_TIMEOUT_S = 600.0
TARGET_FIRST_LINE_S = 0.030
TARGET_LOG_VS_SSH = 2.0
TARGET_CKPT_VS_RSYNC = 0.6
LINE_BYTES = 100

FIRST_PY = 'print("first", flush=True)\nimport time\ntime.sleep(0.2)\n'
# "line 000000042 xxx…x\n": exactly LINE_BYTES bytes per line.
LINES_PY = ("import sys\nfill = 'x' * 84\n"
            "sys.stdout.writelines(f'line {i:09d} {fill}\\n' for i in range(int(sys.argv[1])))\n")
CKPT_PY = """import hashlib, os, sys, time
h = hashlib.sha256()
os.makedirs("outputs", exist_ok=True)
with open("outputs/ckpt.bin", "wb") as f:
    for _ in range(int(sys.argv[1])):
        block = os.urandom(1 << 20)
        h.update(block)
        f.write(block)
with open("outputs/ckpt.sha256", "w") as f:
    f.write(h.hexdigest())
print("written", time.time(), flush=True)
"""


def write_jobs(repo: Path, lines: int, ckpt_mib: int) -> None:
    """The job scripts and job files, in the repository."""
    d = repo / JOB_DIR
    d.mkdir(exist_ok=True)
    (d / "requirements.txt").write_text("")
    py = f'\n[python]\nrequirements = "{JOB_DIR}/requirements.txt"\n'
    for name, code, args in (("first", FIRST_PY, ""), ("lines", LINES_PY, f" {lines}"),
                             ("ckpt", CKPT_PY, f" {ckpt_mib}")):
        (d / f"{name}.py").write_text(code)
        extra = '\n[outputs]\npaths = ["outputs/"]\n' if name == "ckpt" else ""
        (d / f"{name}.toml").write_text(f'name = "{name}"\nrun = "python {JOB_DIR}/{name}.py{args}"\n{py}{extra}')


def peer_python(ctx: Context) -> str:
    """A venv (no pip) of the interpreter bridge's cached env was made from
    (its pyvenv.cfg `home`), for the ssh and local peers."""
    base = os.path.realpath(sys.executable)
    for cfg in sorted((ctx.ml_bridge.remote / "agent" / "cache").rglob("pyvenv.cfg")):
        kv = dict(line.split(" = ", 1) for line in cfg.read_text().splitlines() if " = " in line)
        if kv.get("home") and os.path.exists(os.path.join(kv["home"], "python3")):
            base = os.path.join(kv["home"], "python3")
            break
    venv = ctx.lab.remote_dir("peer-venv")
    if not venv.exists():
        run_cmd([base, "-m", "venv", "--without-pip", str(venv)], 120)
    return str(venv / "bin" / "python")


# --------------------------------------------------------------------------
# running a command and reading its stdout


def read_stdout(args: list[str], env: dict | None, timeout: float, use_pty: bool = False,
                on_first_line=None) -> tuple[bytes, float]:
    """Run args with stdout on a pipe (or a raw pty) read as fast as it
    comes; returns (stdout, wall seconds). on_first_line(perf_counter) is
    called when the first newline arrives. Raises on a non-zero exit."""
    errf = tempfile.TemporaryFile()
    if use_pty:
        master, slave = pty.openpty()
        tty.setraw(slave)  # no \n -> \r\n: the bytes arrive as written
    else:
        master, slave = os.pipe()
    t0 = time.perf_counter()
    p = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=slave, stderr=errf, env=env)
    os.close(slave)
    buf = bytearray()
    try:
        while True:
            left = t0 + timeout - time.perf_counter()
            if left <= 0:
                raise BenchError(f"timed out after {timeout:.0f} s: {shlex.join(args)}")
            if not select.select([master], [], [], left)[0]:
                continue
            try:
                chunk = os.read(master, 1 << 20)
            except OSError:  # a pty's master reads EIO once the child side closed
                chunk = b""
            if not chunk:
                break
            if on_first_line and b"\n" not in buf and b"\n" in chunk:
                on_first_line(time.perf_counter())
            buf += chunk
        rc = p.wait(timeout=max(1.0, t0 + timeout - time.perf_counter()))
        dt = time.perf_counter() - t0
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
        os.close(master)
    errf.seek(0)
    err = errf.read().decode(errors="replace")
    errf.close()
    if rc != 0:
        raise BenchError(f"exit {rc}: {shlex.join(args)}\nstdout: {bytes(buf[:300])!r}\nstderr: {err[-2000:]}")
    return bytes(buf), dt


def timed_first_line(args: list[str], env: dict | None) -> dict:
    first: list[float] = []
    t0 = time.perf_counter()
    out, total = read_stdout(args, env, RUN_TIMEOUT_S, on_first_line=first.append)
    line = out.split(b"\n", 1)[0]
    if not first or line != b"first":
        raise BenchError(f"first stdout line {line!r}, expected b'first': {shlex.join(args)}")
    return {"first_s": round(first[0] - t0, 5), "total_s": round(total, 5)}


# --------------------------------------------------------------------------
# 6. warm bridge run to the first log line


def job_peers(ctx: Context, script: str, args: str = "") -> dict[str, tuple[list[str], dict | None]]:
    """{peer: (argv, env)} running bench-jobs/SCRIPT: bridge's job, the same
    over ssh in bridge's mirror, and locally in the repository."""
    b, py = ctx.ml_bridge, ctx.peer_python
    job = f"{shlex.quote(py)} {JOB_DIR}/{script}.py{args}"
    return {"bridge": (b.args("run", f"{JOB_DIR}/{script}.toml"), b.env),
            "ssh": (ctx.lab.ssh("ssh", f"cd {shlex.quote(str(b.mirror))} && {job}"), None),
            "local": (["sh", "-c", f"cd {shlex.quote(str(ctx.ml.path))} && {job}"], None)}


def prepare(ctx: Context) -> dict:
    """The job files in the ml-repo, one unmeasured `bridge run` (it builds
    the job's cached Python env), and the peers' venv."""
    b = ctx.ml_bridge
    write_jobs(ctx.ml.path, ctx.cfg["lines"], ctx.cfg["ckpt_mib"])
    log("jobs: warm-up `bridge run` (builds the job's cached Python env)")
    t0 = time.perf_counter()
    timed_first_line(b.args("run", f"{JOB_DIR}/first.toml"), b.env)
    warmup = time.perf_counter() - t0
    ctx.peer_python = peer_python(ctx)
    return {"warmup_s": round(warmup, 3), "peer_python": ctx.peer_python,
            "peer_python_version": run_cmd([ctx.peer_python, "--version"], 30).stdout.strip()}


def first_line(ctx: Context) -> dict:
    """Scenario 6: runs times each, interleaved, after one unmeasured run of each."""
    out: dict = {"runs": ctx.cfg["runs"]}
    peers = job_peers(ctx, "first")
    for argv, env in peers.values():
        timed_first_line(argv, env)
    samples: dict[str, list[dict]] = {k: [] for k in peers}
    for _ in range(ctx.cfg["runs"]):
        for k, (argv, env) in peers.items():
            samples[k].append(timed_first_line(argv, env))
    out["samples"] = samples
    for k, v in samples.items():
        out[k] = {"first_s": summarize([s["first_s"] for s in v], 5),
                  "total_s": summarize([s["total_s"] for s in v], 5)}
    b50, s50, l50 = (out[k]["first_s"]["p50"] for k in ("bridge", "ssh", "local"))
    log(f"6 first line p50: bridge {dur(b50)}, ssh {dur(s50)}, local {dur(l50)}")
    name = f"warm `bridge run` → first log line, p50 of {out['runs']}"
    out["rows"] = [
        row(6, name, dur(b50), f"ssh {dur(s50)}", ratio(b50, s50), "≤ 30 ms",
            b50 <= TARGET_FIRST_LINE_S),
        row(6, name, dur(b50), f"local python {dur(l50)}", ratio(b50, l50), "(reference)", None),
    ]
    return out


# --------------------------------------------------------------------------
# 7. log throughput


def expected_lines(n: int) -> bytes:
    fill = "x" * 84
    return "".join(f"line {i:09d} {fill}\n" for i in range(n)).encode()


def first_difference(got: bytes, want: bytes) -> str:
    lines_got, lines_want = got.split(b"\n"), want.split(b"\n")
    bad = next((i for i, (a, b) in enumerate(zip(lines_got, lines_want)) if a != b), None)
    return (f"{len(got)} bytes, {len(lines_got) - 1} lines (expected {len(want)}, {len(lines_want) - 1}); "
            f"first wrong line {bad}: {lines_got[bad][:60] if bad is not None else None!r}")


def log_throughput(ctx: Context) -> dict:
    n = ctx.cfg["lines"]
    want = expected_lines(n)
    peers = job_peers(ctx, "lines", f" {n}")
    samples: dict[str, list[float]] = {k: [] for k in peers}
    for r in range(ctx.cfg["reps"]):
        for k, (argv, env) in peers.items():
            got, dt = read_stdout(argv, env, RUN_TIMEOUT_S, use_pty=ctx.cfg["pty"])
            if got != want:
                raise BenchError(f"7: {k} lost or changed lines: {first_difference(got, want)}")
            samples[k].append(round(dt, 4))
        log(f"7 {n:,} lines rep {r + 1}: " + ", ".join(f"{k} {v[-1]:.2f} s" for k, v in samples.items()))
    out: dict = {"lines": n, "bytes": len(want), "sink": "pty" if ctx.cfg["pty"] else "pipe",
                 "lines_lost": 0, "samples": samples}
    for k, v in samples.items():
        med = summarize(v, 4)
        out[k] = {"time_s": med, "mb_per_s": round(len(want) / med["median"] / 1e6, 2)}
    bt, st, lt = (out[k]["mb_per_s"] for k in ("bridge", "ssh", "local"))
    name = f"{n:,} lines of {LINE_BYTES} B streamed to the terminal ({out['sink']})"
    out["rows"] = [
        row(7, name, f"{bt} MB/s, 0 lost", f"ssh {st} MB/s", ratio(bt, st), "≥ 2× ssh, 0 lines lost",
            bt >= TARGET_LOG_VS_SSH * st),
        row(7, name, f"{bt} MB/s", f"local {lt} MB/s", ratio(bt, lt), "(reference)", None),
    ]
    return out


# --------------------------------------------------------------------------
# 8. a checkpoint back to the laptop


def parse_written(stdout: bytes) -> float:
    for line in stdout.decode(errors="replace").splitlines():
        if line.startswith("written "):
            return float(line.split()[1])
    raise BenchError(f"the checkpoint job printed no 'written' line: {stdout[-300:]!r}")


def check_ckpt(outputs: Path, who: str) -> None:
    want = (outputs / "ckpt.sha256").read_text().strip()
    if sha256_file(outputs / "ckpt.bin") != want:
        raise BenchError(f"8: {who}'s checkpoint {outputs / 'ckpt.bin'} is incomplete or wrong")


def ckpt_bridge(ctx: Context) -> dict:
    """`bridge run ckpt.toml`: returns once the outputs are pulled."""
    b = ctx.ml_bridge
    ctx.lab.trash.discard(ctx.ml.path / "outputs")
    out, wall = read_stdout(b.args("run", f"{JOB_DIR}/ckpt.toml"), b.env, RUN_TIMEOUT_S)
    t_done = time.time()
    check_ckpt(ctx.ml.path / "outputs", "bridge")
    return {"time_s": round(t_done - parse_written(out), 4), "wall_s": round(wall, 4)}


def ckpt_ssh_rsync(ctx: Context, rep: int) -> dict:
    """The same job over ssh in a directory of the remote side, then
    `rsync -a` of its outputs/ into a fresh local directory."""
    d = ctx.lab.remote_dir(f"ckpt-ssh-{rep}")
    script = ctx.ml_bridge.mirror / JOB_DIR / "ckpt.py"
    cmd = (f"mkdir -p {shlex.quote(str(d))} && cd {shlex.quote(str(d))} && "
           f"{shlex.quote(ctx.peer_python)} {shlex.quote(str(script))} {ctx.cfg['ckpt_mib']}")
    t0 = time.perf_counter()
    out, _ = read_stdout(ctx.lab.ssh("ssh", cmd), None, RUN_TIMEOUT_S)
    written = parse_written(out)
    local = ctx.lab.trash.new_dir("ckpt-pull-")
    rs = rsync_pull(ctx.lab, "rsync-pull", d / "outputs", local)
    t_done = time.time()
    wall = time.perf_counter() - t0
    check_ckpt(local, "rsync")
    ctx.lab.trash.discard(d)
    return {"time_s": round(t_done - written, 4), "wall_s": round(wall, 4), "rsync_s": rs["time_s"],
            "wire_bytes": rs["wire_bytes"]}


def checkpoint(ctx: Context) -> dict:
    """Scenario 8: the time from the job's last write (the 'written' line
    it prints, a wall-clock time) until the checkpoint is complete locally:
    `bridge run` returned (outputs pulled), or rsync's pull returned."""
    samples: dict[str, list[dict]] = {"bridge": [], "rsync": []}
    for r in range(ctx.cfg["reps"]):
        samples["bridge"].append(ckpt_bridge(ctx))
        samples["rsync"].append(ckpt_ssh_rsync(ctx, r))
        log(f"8 checkpoint rep {r + 1}: bridge {samples['bridge'][-1]['time_s']:.2f} s, "
            f"rsync {samples['rsync'][-1]['time_s']:.2f} s after the job's last write")
    size = ctx.cfg["ckpt_mib"] * MIB
    out: dict = {"bytes": size, "samples": samples}
    for k, v in samples.items():
        out[k] = {"time_s": summarize([s["time_s"] for s in v], 4), "wall_s": summarize([s["wall_s"] for s in v], 4)}
    bt, rt = out["bridge"]["time_s"]["median"], out["rsync"]["time_s"]["median"]
    out["rows"] = [row(8, f"{human_bytes(size)} checkpoint written by a job → complete locally", dur(bt),
                       f"rsync pull {dur(rt)}", ratio(bt, rt), "≤ 0.6× rsync pull",
                       bt <= TARGET_CKPT_VS_RSYNC * rt)]
    return out

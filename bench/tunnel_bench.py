#!/usr/bin/env python3
"""Benchmark bridge's port forwards (`bridge forward`) side by side with the
tools they replace, on this machine (loopback only):

1. Throughput over SSH: --mib (1024) MiB through one TCP connection, from a
   server on the "agent" side to a client on the "laptop" side (a download:
   TensorBoard, a checkpoint), and the other way (an upload), through
     bridge         `bridge forward` of an SSH-provider repository
                    (`bridge up --host root@127.0.0.1:PORT`): a direct-tcpip
                    channel on the SSH connection the provider already has
     bridge_tunnel  the same with BRIDGE_TUNNEL_ONLY=1: the agent's gRPC
                    tunnel over that connection (what providers without a
                    dial of their own use)
     ssh -L         OpenSSH's own local forward to the same sshd, with the
                    cipher bridge negotiates (aes256-gcm@openssh.com)
   --reps (5) runs each, rotating the order, medians and ratios to ssh -L.
2. Added latency on the local provider: --rtts (2000) round trips of a
   64-byte request and its 64-byte answer on one connection to an echo
   server, direct and through `bridge forward`; p50/p99 of each and the
   added p50 (forward − direct).

The servers (a byte source/sink and an echo) run in processes of their own,
and so does the client of each timed run, so no measurement shares a Python
interpreter (and its lock) with another. `--quick` (CI): debug binaries,
16 MiB, 2 reps, 200 round trips; asserts that every byte arrived, never a
timing. Python 3.11 standard library only, plus git and OpenSSH.

Usage:
    cargo build --release --bins
    python3 bench/tunnel_bench.py                  # ~2 min
    cargo build --bins && python3 bench/tunnel_bench.py --quick
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
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
sys.dont_write_bytecode = True
from sshd import Sshd, SshdError, ensure_sshd, free_port  # noqa: E402
from bridgectl import Bridge  # noqa: E402
from common import (  # noqa: E402
    BenchError, add_bridge_info, base_machine_info, check_binaries, git_init,
    install_term_handlers, log, percentile, ssh_version, write_results)

MIB = 1024 * 1024
CIPHER = "aes256-gcm@openssh.com"

# The byte server: for each connection, reads "D <n>\n" (send n bytes) or
# "U <n>\n" (receive n bytes, then answer "ok\n").
SOURCE = r"""
import socket, sys, threading
buf = bytes(1 << 20)
def header(c):
    # Byte by byte: a buffered reader would swallow the upload's first bytes.
    line = b""
    while not line.endswith(b"\n"):
        b = c.recv(1)
        if not b:
            raise EOFError
        line += b
    return line.split()
def serve(c):
    with c:
        op, n = header(c)
        n = int(n)
        if op == b"D":
            while n > 0:
                k = c.send(memoryview(buf)[:min(n, len(buf))])
                n -= k
            c.shutdown(socket.SHUT_WR)
            c.recv(1)
        else:
            got = 0
            b = bytearray(1 << 20)
            while got < n:
                k = c.recv_into(b)
                if not k:
                    break
                got += k
            c.sendall(b"ok %d\n" % got)
s = socket.create_server(("127.0.0.1", int(sys.argv[1])), backlog=64)
while True:
    c, _ = s.accept()
    threading.Thread(target=serve, args=(c,), daemon=True).start()
"""

ECHO = r"""
import socket, sys, threading
def serve(c):
    with c:
        c.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        while True:
            b = c.recv(65536)
            if not b:
                return
            c.sendall(b)
s = socket.create_server(("127.0.0.1", int(sys.argv[1])), backlog=64)
while True:
    c, _ = s.accept()
    threading.Thread(target=serve, args=(c,), daemon=True).start()
"""

# One timed transfer (a process of its own): prints JSON {seconds, bytes}.
TRANSFER = r"""
import json, socket, sys, time
port, op, n = int(sys.argv[1]), sys.argv[2], int(sys.argv[3])
deadline = time.time() + 30
while True:
    try:
        c = socket.create_connection(("127.0.0.1", port), timeout=30)
        break
    except OSError:
        if time.time() > deadline:
            raise
        time.sleep(0.05)
c.settimeout(600)
t0 = time.perf_counter()
c.sendall(f"{op} {n}\n".encode())
got = 0
if op == "D":
    b = bytearray(1 << 20)
    while True:
        k = c.recv_into(b)
        if not k:
            break
        got += k
else:
    buf = bytes(1 << 20)
    left = n
    while left > 0:
        k = c.send(memoryview(buf)[:min(left, len(buf))])
        left -= k
    answer = c.makefile("rb").readline().split()
    got = int(answer[1]) if len(answer) == 2 else -1
dt = time.perf_counter() - t0
c.close()
print(json.dumps({"seconds": dt, "bytes": got}))
"""

# Round trips on one connection (a process of its own): prints JSON [µs…].
PINGS = r"""
import json, socket, sys, time
port, n = int(sys.argv[1]), int(sys.argv[2])
c = socket.create_connection(("127.0.0.1", port), timeout=30)
c.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
msg = b"x" * 64
out = []
for i in range(n + 50):
    t0 = time.perf_counter()
    c.sendall(msg)
    got = 0
    while got < len(msg):
        b = c.recv(65536)
        if not b:
            raise SystemExit("closed after %d round trips" % i)
        got += len(b)
    if i >= 50:  # warm-up
        out.append((time.perf_counter() - t0) * 1e6)
print(json.dumps(out))
"""


def spawn_server(code: str, port: int) -> subprocess.Popen:
    p = subprocess.Popen([sys.executable, "-c", code, str(port)], stdin=subprocess.DEVNULL,
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_port(port)
    return p


def wait_port(port: int, limit_s: float = 30) -> None:
    deadline = time.monotonic() + limit_s
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            if time.monotonic() > deadline:
                raise BenchError(f"nothing listens on 127.0.0.1:{port} after {limit_s:.0f} s") from None
            time.sleep(0.05)


def child_json(code: str, *args, timeout: float = 900) -> object:
    cp = subprocess.run([sys.executable, "-c", code, *map(str, args)], capture_output=True, text=True,
                        timeout=timeout)
    if cp.returncode != 0:
        raise BenchError(f"client failed: {cp.stderr.strip()[-800:]}")
    return json.loads(cp.stdout)


def transfer(port: int, op: str, n: int) -> float:
    r = child_json(TRANSFER, port, op, n)
    if r["bytes"] != n:
        raise BenchError(f"{op} through port {port}: {r['bytes']} of {n} bytes arrived")
    return r["seconds"]


def bench_throughput(ports: dict[str, int], n: int, reps: int) -> dict:
    out: dict = {"bytes": n}
    for op, what in (("D", "download"), ("U", "upload")):
        runs: dict[str, list[float]] = {k: [] for k in ports}
        for i in range(reps):
            order = list(ports.items())
            order = order[i % len(order):] + order[:i % len(order)]
            for name, port in order:
                s = transfer(port, op, n)
                runs[name].append(s)
                log(f"{what} {name}: {n / MIB / s:.0f} MiB/s")
        med = {k: statistics.median(v) for k, v in runs.items()}
        out[what] = {
            "seconds": {k: [round(x, 3) for x in v] for k, v in runs.items()},
            "median_mib_s": {k: round(n / MIB / s, 1) for k, s in med.items()},
            # Throughput ratios to ssh -L (≥ 0.8 is the target).
            "ratio": {k: round(med["ssh_L"] / med[k], 3) for k in ports if k != "ssh_L"},
        }
    return out


def bench_latency(direct_port: int, forward_port: int, n: int) -> dict:
    res = {}
    for name, port in (("direct", direct_port), ("forward", forward_port)):
        v = sorted(child_json(PINGS, port, n))
        res[name] = {"n": len(v), "p50_us": round(percentile(v, 50), 1),
                     "p99_us": round(percentile(v, 99), 1), "mean_us": round(statistics.fmean(v), 1)}
    res["added_p50_us"] = round(res["forward"]["p50_us"] - res["direct"]["p50_us"], 1)
    return res


def render(r: dict) -> str:
    lines = ["# bridge forward vs ssh -L / a direct connection", ""]
    t = r.get("throughput")
    if t:
        lines += [f"Throughput over SSH ({t['bytes'] // MIB} MiB, one connection, medians of "
                  f"{len(t['download']['seconds']['bridge'])}):", "",
                  "| direction | bridge forward | bridge, agent tunnel | ssh -L | bridge ÷ ssh -L | tunnel ÷ ssh -L |",
                  "|---|---|---|---|---|---|"]
        for d in ("download", "upload"):
            m, q = t[d]["median_mib_s"], t[d]["ratio"]
            lines.append(f"| {d} | {m['bridge']} MiB/s | {m['bridge_tunnel']} MiB/s | {m['ssh_L']} MiB/s "
                         f"| {q['bridge']}× | {q['bridge_tunnel']}× |")
        lines.append("")
    la = r.get("latency")
    if la:
        lines += [f"Round trip of 64 bytes on the local provider ({la['direct']['n']} on one connection):", "",
                  "| path | p50 | p99 |", "|---|---|---|",
                  f"| direct | {la['direct']['p50_us']} µs | {la['direct']['p99_us']} µs |",
                  f"| bridge forward | {la['forward']['p50_us']} µs | {la['forward']['p99_us']} µs |",
                  "", f"Added p50: {la['added_p50_us']} µs.", ""]
    for k, v in r.get("errors", {}).items():
        lines.append(f"error {k}: {v}")
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="debug binaries, tiny sizes, correctness only")
    ap.add_argument("--bridge", default=os.environ.get("BRIDGE_BIN"),
                    help="bridge binary (bridge-agent next to it); default target/release/bridge")
    ap.add_argument("--mib", type=int, help="MiB per transfer (full: 1024)")
    ap.add_argument("--reps", type=int, help="transfers per tool and direction (full: 5)")
    ap.add_argument("--rtts", type=int, help="round trips per path (full: 2000)")
    ap.add_argument("--out", help="JSON results (default bench/results/tunnel.json)")
    ap.add_argument("--workdir", default="/tmp")
    ap.add_argument("--keep", action="store_true")
    args = ap.parse_args()
    mib = args.mib or (16 if args.quick else 1024)
    reps = args.reps or (2 if args.quick else 5)
    rtts = args.rtts or (200 if args.quick else 2000)
    exe = Path(args.bridge or ROOT / "target" / ("debug" if args.quick else "release") / "bridge").resolve()
    out = Path(args.out or HERE / "results" / ("tunnel-quick.json" if args.quick else "tunnel.json"))
    if not check_binaries(exe, f"cargo build {'' if args.quick else '--release '}--bins"):
        return 2
    install_term_handlers()
    info = base_machine_info()
    add_bridge_info(info, exe, rebuild="rebuild")
    info["ssh_version"] = ssh_version()
    results: dict = {"config": {"quick": args.quick, "mib": mib, "reps": reps, "rtts": rtts,
                                "cipher": CIPHER, "bridge": str(exe)},
                     "machine": info, "errors": {}}
    work = Path(tempfile.mkdtemp(prefix="bridge-tunnelbench-", dir=args.workdir))
    procs: list[subprocess.Popen] = []
    peers: list[Bridge] = []
    sshd = None
    t0 = time.perf_counter()
    try:
        err = ensure_sshd(log)
        if err:
            raise BenchError(f"no sshd: {err}")
        sshd = Sshd(work / "sshd", comment="tunnel_bench")
        sshd.start()
        source_port, echo_port = free_port(), free_port()
        procs.append(spawn_server(SOURCE, source_port))
        procs.append(spawn_server(ECHO, echo_port))
        env = dict(os.environ)
        env.pop("BRIDGE_LOG", None)
        ssh_dir = sshd.client_dir(work / "client-ssh", [sshd.port])
        ssh_env = dict(env, BRIDGE_SSH_DIR=str(ssh_dir), BRIDGE_KNOWN_HOSTS=str(work / "kh"), SSH_AUTH_SOCK="")
        repos = {}
        for name in ("ssh", "tunnel", "local"):
            repos[name] = work / f"repo-{name}"
            git_init(repos[name])
            (repos[name] / "a.txt").write_text("a\n")
        remote = work / "remote"
        ssh_peer = Bridge("ssh", exe, repos["ssh"], ssh_env,
                          ["up", "--host", f"root@127.0.0.1:{sshd.port}", "--remote-dir", str(remote)],
                          remote=remote)
        remote_t = work / "remote-tunnel"
        tunnel_peer = Bridge("tunnel", exe, repos["tunnel"], dict(ssh_env, BRIDGE_TUNNEL_ONLY="1"),
                             ["up", "--host", f"root@127.0.0.1:{sshd.port}", "--remote-dir", str(remote_t)],
                             remote=remote_t)
        local_peer = Bridge("local", exe, repos["local"], env, ["up", "--provider", "local"])
        for p in (ssh_peer, tunnel_peer, local_peer):
            peers.append(p)
            log(f"bridge up: {p.name}")
            p.up()
        bridge_port, tunnel_port = free_port(), free_port()
        ssh_peer.bridge("forward", f"{bridge_port}:{source_port}")
        tunnel_peer.bridge("forward", f"{tunnel_port}:{source_port}")
        ssh_l_port = free_port()
        procs.append(subprocess.Popen(
            ["ssh", *sshd.opts(), "-N", "-c", CIPHER, "-o", "ExitOnForwardFailure=yes",
             "-L", f"127.0.0.1:{ssh_l_port}:127.0.0.1:{source_port}", "root@127.0.0.1"],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        wait_port(ssh_l_port)
        try:
            results["throughput"] = bench_throughput(
                {"bridge": bridge_port, "bridge_tunnel": tunnel_port, "ssh_L": ssh_l_port}, mib * MIB, reps)
        except Exception as e:  # noqa: BLE001 - recorded and reported
            results["errors"]["throughput"] = f"{type(e).__name__}: {e}"
            log(traceback.format_exc())
        fwd_port = free_port()
        local_peer.bridge("forward", f"{fwd_port}:{echo_port}")
        try:
            results["latency"] = bench_latency(echo_port, fwd_port, rtts)
            log(f"latency: {results['latency']}")
        except Exception as e:  # noqa: BLE001
            results["errors"]["latency"] = f"{type(e).__name__}: {e}"
            log(traceback.format_exc())
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
        for p in procs:
            p.kill()
            p.wait()
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

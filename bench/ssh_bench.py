#!/usr/bin/env python3
"""Benchmark bridge's SSH provider on loopback, next to the local provider.

Everything runs on this machine: a private sshd on 127.0.0.1 (bench/sshd.py,
shared with bench.py), and bridge with `--provider ssh --host
root@127.0.0.1:PORT --remote-dir DIR`, so the "remote" mirror is a directory
here and the script can watch it. Four repositories with the same tree, each
with its own `bridge up`, are measured interleaved, edit by edit:

  local        `bridge up --provider local` (the peer: no SSH at all)
  ssh          SSH straight to sshd's port
  ssh_proxy    SSH through a TCP proxy in this script (no delay): the cost
               of the proxy itself, and the connection the cut test cuts
  ssh_delay    SSH through the same kind of proxy holding every chunk
               --delay-ms (50) ms in each direction (RTT + 100 ms)

1. Edit-to-mirror latency: --edits (100) rounds; in each, every peer gets
   one 1 KiB edit (in-place overwrite of a random file of a --files (2,000)
   file tree); the time from just before the write until the mirror copy
   holds the new content (polled every 0.2 ms, as bench.py does). The
   next edit follows --spacing-ms (150) ms after the last one arrived.
   p50/p95/p99/max per peer, ratios against `local`, and the daemon's own
   `last_latency_ms` (first event of the burst -> agent's ack).
2. The same through a delayed link. netem is tried first (a network
   namespace of our own, `tc qdisc add dev lo root netem delay 50ms`), and
   its result recorded; the figures always come from the delaying proxy
   (comparable on every kernel). The RTT the proxy adds is measured with a
   TCP echo server.
3. Heal after a cut: with `ssh_proxy` up and in sync, --cuts (10) times: shut
   down both sockets of every proxied connection, write an edit at once, then
   (a) poll `bridge status --json` every 20 ms: when `connection` leaves
   "connected" and when it is "connected" again, (b) poll the mirror file:
   the time from the cut until the edit is visible there (the heal time).

`--quick` (CI): debug binaries by default, a 300-file tree, 12 edits per
peer, 3 cuts, ~30-60 s; asserts correctness (every edit arrives, every cut
heals, the mirrors equal the trees afterwards), never timing.
Python 3.11 standard library only, plus git and OpenSSH (openssh-server is
installed with apt-get when /usr/sbin/sshd is missing, as root).

Usage:
    cargo build --release --bins
    python3 bench/ssh_bench.py                 # full run, ~2-3 min
    cargo build --bins && python3 bench/ssh_bench.py --quick
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))
sys.dont_write_bytecode = True  # no bench/__pycache__ from importing sshd.py, common.py
from sshd import Sshd, SshdError, ensure_sshd  # noqa: E402  (bench/sshd.py)
from proxy import DelayProxy  # noqa: E402  (bench/proxy.py)
from bridgectl import Bridge  # noqa: E402  (bench/bridgectl.py)
from common import (  # noqa: E402  (bench/common.py, shared with bench.py)
    BenchError, add_bridge_info, base_machine_info, check_binaries, compare_trees, git_init,
    install_term_handlers, log, percentile, render_errors, ssh_version, wait_content,
    write_results)

KIB = 1024

QUICK = dict(files=300, edits=12, cuts=3)
FULL = dict(files=2000, edits=100, cuts=10)

SMALL_CMD_TIMEOUT_S = 60.0
EDIT_TIMEOUT_S = 10.0
HEAL_TIMEOUT_S = 60.0
STATUS_POLL_S = 0.020
# After the edit arrived without `connection` ever leaving "connected", keep
# polling status this long before concluding it never left.
NEVER_LEFT_GRACE_S = 1.0

SKIP_TOP = frozenset({".git", ".bridge"})

PEERS = ("local", "ssh", "ssh_proxy", "ssh_delay")
LABELS = {
    "local": "local provider",
    "ssh": "ssh, direct",
    "ssh_proxy": "ssh via proxy, 0 ms",
    "ssh_delay": "ssh via proxy, +{d} ms each way",
}


# --------------------------------------------------------------------------
# helpers


def summary_ms(vals: list[float]) -> dict:
    v = sorted(vals)
    if not v:
        return {"n": 0}
    r = lambda x: round(x, 2)  # noqa: E731
    return {"n": len(v), "p50_ms": r(percentile(v, 50)), "p95_ms": r(percentile(v, 95)),
            "p99_ms": r(percentile(v, 99)), "min_ms": r(v[0]), "max_ms": r(v[-1]),
            "mean_ms": r(statistics.fmean(v))}


def git_head() -> dict:
    """HEAD of the project, read from .git without running git."""
    g = ROOT / ".git"
    try:
        head = (g / "HEAD").read_text().strip()
        if not head.startswith("ref: "):
            return {"git_head": head}
        ref = head[5:]
        p = g / ref
        if p.exists():
            return {"git_head": p.read_text().strip(), "git_ref": ref}
        for line in (g / "packed-refs").read_text().splitlines():
            if line.endswith(" " + ref):
                return {"git_head": line.split()[0], "git_ref": ref}
    except OSError:
        pass
    return {}


def machine_info(bridge: Path) -> dict:
    info = base_machine_info()
    try:
        info["loadavg_start"] = [round(x, 2) for x in os.getloadavg()]
    except OSError:
        pass
    add_bridge_info(info, bridge, rebuild="rebuild")
    info["ssh_version"] = ssh_version()
    info.update(git_head())
    return info


# --------------------------------------------------------------------------
# netem probe


def probe_netem(delay_ms: int) -> dict:
    """Whether `tc qdisc add dev lo root netem delay` works in a network
    namespace of our own; the namespace is always deleted again."""
    ns = f"bridge-sshbench-{os.getpid()}"
    cmd = ["ip", "netns", "exec", ns, "tc", "qdisc", "add", "dev", "lo", "root", "netem",
           "delay", f"{delay_ms}ms"]
    res: dict = {"command": " ".join(cmd), "works": False}
    if not (shutil.which("ip") and shutil.which("tc")):
        res["error"] = "ip or tc is not installed"
        return res
    cp = subprocess.run(["ip", "netns", "add", ns], capture_output=True, text=True, timeout=30)
    if cp.returncode != 0:
        res["error"] = f"ip netns add: {cp.stderr.strip()}"
        return res
    try:
        subprocess.run(["ip", "netns", "exec", ns, "ip", "link", "set", "lo", "up"],
                       capture_output=True, text=True, timeout=30)
        cp = subprocess.run(cmd, capture_output=True, text=True, timeout=30)
        res["rc"] = cp.returncode
        res["works"] = cp.returncode == 0
        if cp.returncode != 0:
            res["error"] = (cp.stderr or cp.stdout).strip()
    finally:
        d = subprocess.run(["ip", "netns", "del", ns], capture_output=True, text=True, timeout=30)
        if d.returncode != 0:
            res["cleanup_error"] = d.stderr.strip()
    return res


def measure_rtt(delay_s: float, n: int = 20) -> dict:
    """Round trips of 64 bytes to a TCP echo server on 127.0.0.1, directly and
    through a DelayProxy with delay_s: the RTT the proxy adds."""
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(8)
    port = srv.getsockname()[1]

    def serve() -> None:
        while True:
            try:
                c, _ = srv.accept()
            except OSError:
                return

            def echo(c=c) -> None:
                with c:
                    while True:
                        try:
                            d = c.recv(65536)
                        except OSError:
                            return
                        if not d:
                            return
                        c.sendall(d)
            threading.Thread(target=echo, daemon=True).start()
    threading.Thread(target=serve, daemon=True).start()
    proxy = DelayProxy(port, delay_s)
    out = {}
    try:
        for name, p in (("direct", port), ("proxy", proxy.port)):
            with socket.create_connection(("127.0.0.1", p), timeout=10) as s:
                s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                times = []
                for i in range(n + 2):
                    msg = bytes([i % 256]) * 64
                    t0 = time.perf_counter()
                    s.sendall(msg)
                    got = b""
                    while len(got) < len(msg):
                        d = s.recv(65536)
                        if not d:
                            raise BenchError("echo server closed the connection")
                        got += d
                    if i >= 2:  # two warm-up round trips
                        times.append((time.perf_counter() - t0) * 1000)
                out[name] = summary_ms(times)
    finally:
        proxy.stop()
        srv.close()
    out["added_p50_ms"] = round(out["proxy"]["p50_ms"] - out["direct"]["p50_ms"], 2)
    out["delay_ms_each_way"] = delay_s * 1000
    return out


# --------------------------------------------------------------------------
# trees and edits


def write_tree(repo: Path, n_files: int, seed: int) -> list[str]:
    """git init + n_files deterministic files of 1-4 KiB (text) in ~sqrt(n) dirs."""
    git_init(repo)
    rng = random.Random(seed)
    n_dirs = max(1, int(math.sqrt(n_files)))
    words = ["".join(rng.choices("abcdefghijklmnopqrstuvwxyz", k=rng.randint(2, 9))) for _ in range(500)]
    rels = []
    for j in range(n_files):
        d = f"d{j % n_dirs:03d}"
        (repo / d).mkdir(exist_ok=True)
        size = rng.randint(KIB, 4 * KIB)
        text = (f"# file {j}\n" + " ".join(rng.choices(words, k=size // 4))).encode()[:size]
        rel = f"{d}/f{j:05d}.py"
        (repo / rel).write_bytes(text)
        rels.append(rel)
    return rels


def new_content(tag: str, rng: random.Random) -> bytes:
    header = f"{tag} {rng.getrandbits(64):016x}\n".encode()
    body = "".join(rng.choices("abcdefghijklmnopqrstuvwxyz \n", k=KIB - len(header))).encode()
    return header + body


# --------------------------------------------------------------------------
# 1 + 2. edit-to-mirror latency, interleaved


def bench_latency(peers: list[Bridge], rels: list[str], n_edits: int, spacing_s: float,
                  seed: int) -> dict:
    rng = random.Random(seed + 1)
    targets = rng.sample(rels, min(n_edits, len(rels)))
    while len(targets) < n_edits:
        targets.append(rng.choice(rels))
    samples: dict[str, list[dict]] = {p.name: [] for p in peers}
    before = {p.name: p.wait_ready() for p in peers}
    expected: dict[str, dict[str, bytes]] = {p.name: {} for p in peers}
    log(f"latency: {n_edits} edits each of {', '.join(p.name for p in peers)}, interleaved, "
        f"{spacing_s * 1000:.0f} ms apart")
    for i, rel in enumerate(targets):
        for p in peers:
            content = new_content(f"edit {i} {p.name} {rel}", rng)
            src, dst = p.repo / rel, p.mirror / rel
            t0 = time.perf_counter()
            with open(src, "wb") as f:
                f.write(content)
            dt = wait_content(dst, content, t0, EDIT_TIMEOUT_S)
            t_seen = time.perf_counter()
            expected[p.name][rel] = content
            s = {"i": i, "path": rel, "ok": dt is not None,
                 "ms": round(dt * 1000, 3) if dt is not None else None}
            if dt is None:
                log(f"latency: {p.name}: edit {i} of {rel} not in the mirror after {EDIT_TIMEOUT_S:.0f} s")
            # The daemon's own figure for this burst, read during the pause.
            try:
                st = p.status()
                s["daemon_ms"] = round(st["last_latency_ms"], 3) if st.get("last_latency_ms") is not None else None
                s["connection"] = st.get("connection")
            except BenchError:
                pass
            samples[p.name].append(s)
            left = spacing_s - (time.perf_counter() - t_seen)
            if left > 0:
                time.sleep(left)
    res: dict = {"edits": n_edits, "files": len(rels), "edit_bytes": KIB,
                 "spacing_ms": spacing_s * 1000, "timeout_s": EDIT_TIMEOUT_S}
    for p in peers:
        p.sync_wait()
        after = p.wait_ready()
        wrong = [r for r, c in expected[p.name].items() if (p.mirror / r).read_bytes() != c]
        if wrong:
            raise BenchError(f"{p.name}: after sync --wait, {len(wrong)} edited files differ in the mirror")
        compare_trees(p.repo, p.mirror, SKIP_TOP)
        ss = samples[p.name]
        ok = [s["ms"] for s in ss if s["ok"]]
        res[p.name] = {
            "latency": summary_ms(ok),
            "failures": sum(1 for s in ss if not s["ok"]),
            "daemon_last_latency": summary_ms([s["daemon_ms"] for s in ss if s.get("daemon_ms") is not None]),
            "bytes_sent_during_edits": after.get("bytes_sent", 0) - before[p.name].get("bytes_sent", 0),
            "not_connected_samples": sum(1 for s in ss if s.get("connection") not in (None, "connected")),
            "samples": ss,
        }
    loc = res.get("local", {}).get("latency", {})
    res["ratios_vs_local"] = {}
    for p in peers:
        lat = res[p.name]["latency"]
        if p.name != "local" and loc.get("n") and lat.get("n"):
            res["ratios_vs_local"][p.name] = {k: round(lat[k] / loc[k], 2)
                                              for k in ("p50_ms", "p95_ms", "p99_ms", "max_ms") if loc[k]}
    return res


# --------------------------------------------------------------------------
# 3. heal after a cut


class StatusPoller(threading.Thread):
    """`bridge status --json` every STATUS_POLL_S; records (t since t0 in ms
    when the answer came, connection, last_error, t when the call started)
    for each answer."""

    def __init__(self, peer: Bridge, t0: float):
        super().__init__(daemon=True)
        self.peer, self.t0 = peer, t0
        self.samples: list[tuple[float, str, str | None, float]] = []
        self.errors: list[str] = []
        self.stop_evt = threading.Event()
        self.lock = threading.Lock()

    def run(self) -> None:
        nxt = time.perf_counter()
        while not self.stop_evt.is_set():
            ts = (time.perf_counter() - self.t0) * 1000
            try:
                cp = subprocess.run([str(self.peer.exe), "-C", str(self.peer.repo), "status", "--json"],
                                    capture_output=True, text=True, timeout=SMALL_CMD_TIMEOUT_S,
                                    env=self.peer.env)
                t = (time.perf_counter() - self.t0) * 1000
                st = json.loads(cp.stdout)
                with self.lock:
                    self.samples.append((round(t, 2), st.get("connection"), st.get("last_error"), round(ts, 2)))
            except (OSError, subprocess.TimeoutExpired, json.JSONDecodeError) as e:
                self.errors.append(f"{type(e).__name__}: {e}")
            nxt += STATUS_POLL_S
            time.sleep(max(0.0, nxt - time.perf_counter()))

    def times(self) -> tuple[float | None, float | None]:
        """(first time not "connected", first "connected" after that), ms."""
        left = back = None
        with self.lock:
            for t, c, _, _ in self.samples:
                if left is None and c != "connected":
                    left = t
                elif left is not None and c == "connected":
                    back = t
                    break
        return left, back


def bench_heal(peer: Bridge, rels: list[str], cuts: int, seed: int) -> dict:
    rng = random.Random(seed + 2)
    proxy = peer.proxy
    assert proxy is not None
    trials = []
    log(f"heal: {cuts} cuts of {peer.name}'s connections, an edit right after each")
    for k in range(cuts):
        peer.wait_ready()
        time.sleep(0.3)
        rel = rng.choice(rels)
        content = new_content(f"heal {k} {rel}", rng)
        src, dst = peer.repo / rel, peer.mirror / rel
        accepted0 = proxy.accepted
        t0 = time.perf_counter()
        n_cut = proxy.cut()
        with open(src, "wb") as f:
            f.write(content)
        poller = StatusPoller(peer, t0)
        poller.start()
        dt = wait_content(dst, content, t0, HEAL_TIMEOUT_S)
        mirror_ms = round(dt * 1000, 2) if dt is not None else None
        # Keep polling status until it came back, or a grace period if it never left.
        deadline = time.perf_counter() + HEAL_TIMEOUT_S
        seen_at = time.perf_counter()
        while time.perf_counter() < deadline:
            left, back = poller.times()
            if back is not None or (left is None and time.perf_counter() - seen_at > NEVER_LEFT_GRACE_S):
                break
            time.sleep(0.01)
        poller.stop_evt.set()
        poller.join(timeout=10)
        left, back = poller.times()
        # The states seen, run-length compressed.
        states: list[list] = []
        for t, c, e, _ in poller.samples:
            if not states or states[-1][1] != c:
                states.append([t, c, e])
        polls = [t for t, _, _, _ in poller.samples]
        first_poll = poller.samples[0] if poller.samples else None
        reconnects = [round((a - t0) * 1000, 2) for a in proxy.accept_times if a >= t0]
        trial = {
            "cut": k, "path": rel, "connections_cut": n_cut,
            "mirror_ms": mirror_ms, "ok": mirror_ms is not None,
            "left_connected": left is not None, "left_ms": left, "connected_again_ms": back,
            "states": states, "status_polls": len(polls),
            "status_poll_interval_ms": round(statistics.fmean(b - a for a, b in zip(polls, polls[1:])), 1)
            if len(polls) > 2 else None,
            "new_proxy_connections": proxy.accepted - accepted0,
            # When the daemon opened its new TCP connection (the cut noticed).
            "reconnect_accepted_ms": reconnects[:3],
            # The first status call: when it started and when it answered
            # (a long one was held up by the daemon).
            "first_status_call_ms": [first_poll[3], first_poll[0]] if first_poll else None,
            "poll_errors": poller.errors[:3],
        }
        trials.append(trial)
        log(f"heal: cut {k}: {n_cut} connection(s) cut; new connection at {reconnects[:1]} ms; "
            f"edit in the mirror after {mirror_ms if mirror_ms is not None else 'NEVER'} ms; "
            f"first status call {trial['first_status_call_ms']} ms; status "
            + (f"left 'connected' at {left} ms, back at {back} ms" if left is not None
               else "never left 'connected'"))
    peer.sync_wait()
    peer.wait_ready()
    compare_trees(peer.repo, peer.mirror, SKIP_TOP)
    ok = [t["mirror_ms"] for t in trials if t["ok"]]
    backs = [t["connected_again_ms"] for t in trials if t["connected_again_ms"] is not None]
    recon = [t["reconnect_accepted_ms"][0] for t in trials if t["reconnect_accepted_ms"]]
    first_status = [t["first_status_call_ms"][1] for t in trials if t["first_status_call_ms"]]
    res = {
        "cuts": cuts,
        "failures": sum(1 for t in trials if not t["ok"]),
        "heal_cut_to_mirror": summary_ms(ok),
        "left_connected": sum(1 for t in trials if t["left_connected"]),
        "cut_to_connected_again": summary_ms(backs),
        "cut_to_new_connection": summary_ms(recon),
        # `status` waits for the agent (GPU list): the first call after the cut
        # is answered only once the session is back.
        "first_status_answer": summary_ms(first_status),
        "trials": trials,
    }
    # What the daemon logged about the cuts.
    try:
        lines = (peer.repo / ".bridge" / "daemon.log").read_text(errors="replace").splitlines()
        warn = [l for l in lines if "WARN" in l or "ERROR" in l]
        res["daemon_log"] = {"warn_lines": len(warn),
                             "sync_round_failed": sum("sync round failed" in l for l in warn),
                             "cannot_connect": sum("cannot connect" in l for l in warn),
                             "last_warn": warn[-6:]}
    except OSError:
        pass
    return res


# --------------------------------------------------------------------------
# report


def fmt(v, unit="ms") -> str:
    return "-" if v is None else f"{v:.1f}{unit}"


def render(results: dict) -> str:
    cfg, m = results["config"], results["machine"]
    lines = [
        f"bridge SSH provider benchmark ({'quick' if cfg['quick'] else 'full'}) - {m['date']}",
        f"machine: {m['nproc']} CPUs, kernel {m['kernel']}, load {m.get('loadavg_start')}, "
        f"{m.get('bridge_version', '?')} ({cfg['bridge']}), {m.get('ssh_version') or 'no ssh'}",
    ]
    if m.get("bridge_binary_stale"):
        lines.append(f"WARNING: the bridge binary is older than {m.get('newest_source')}")
    if not cfg.get("proxy_quickack", True):
        lines.append("NOTE: --proxy-delayed-ack: the proxies delay their ACKs of sshd's data (older daemons)")
    ne = results.get("netem", {})
    lines.append(f"netem: {'works' if ne.get('works') else 'not available'}"
                 + (f" ({ne.get('error')})" if ne.get("error") else "")
                 + "; delays come from the script's proxy")
    rtt = results.get("proxy_rtt", {})
    if rtt:
        lines.append("proxy RTT added (TCP echo, p50): "
                     + ", ".join(f"{v['delay_ms_each_way']:.0f} ms each way -> +{v['added_p50_ms']:.1f} ms"
                                 for v in rtt.values()))
    ups = results.get("up_s", {})
    if ups:
        lines.append("bridge up (initial sync incl. agent start/upload): "
                     + ", ".join(f"{k} {v:.2f} s" for k, v in ups.items()))
    lines.append("")
    lat = results.get("latency")
    lines.append(f"1/2. 1 KiB edit -> mirror, {cfg['files']:,}-file tree, {cfg['edits']} edits per peer, "
                 f"interleaved, {cfg['spacing_ms']:.0f} ms apart")
    if isinstance(lat, dict):
        lines.append(f"   {'peer':30} {'p50':>8} {'p95':>8} {'p99':>8} {'max':>8} {'fail':>4}  "
                     f"{'p50/local':>9} {'p95/local':>9}  {'daemon p50':>10}")
        for k in PEERS:
            if k not in lat:
                continue
            a = lat[k]["latency"]
            r = lat["ratios_vs_local"].get(k, {})
            label = LABELS[k].format(d=cfg["delay_ms"])
            lines.append(f"   {label:30} {fmt(a.get('p50_ms')):>8} {fmt(a.get('p95_ms')):>8} "
                         f"{fmt(a.get('p99_ms')):>8} {fmt(a.get('max_ms')):>8} {lat[k]['failures']:>4}  "
                         f"{(str(r.get('p50_ms')) + 'x') if r else '':>9} {(str(r.get('p95_ms')) + 'x') if r else '':>9}  "
                         f"{fmt(lat[k]['daemon_last_latency'].get('p50_ms')):>10}")
    else:
        lines.append(f"   FAILED: {results['errors'].get('latency', 'not run')}")
    lines.append("")
    heal = results.get("heal")
    lines.append(f"3. Heal after a cut (ssh via proxy, 0 ms; {cfg['cuts']} cuts, an edit right after each)")
    if isinstance(heal, dict):
        h, b = heal["heal_cut_to_mirror"], heal["cut_to_connected_again"]
        lines.append(f"   cut -> edit visible in the mirror: median {fmt(h.get('p50_ms'))}, max {fmt(h.get('max_ms'))}, "
                     f"min {fmt(h.get('min_ms'))}; failures {heal['failures']}")
        lines.append(f"   status left 'connected' in {heal['left_connected']}/{heal['cuts']} cuts; "
                     f"cut -> 'connected' again: median {fmt(b.get('p50_ms'))}, max {fmt(b.get('max_ms'))}")
        rc = heal.get("cut_to_new_connection", {})
        fs = heal.get("first_status_answer", {})
        lines.append(f"   cut -> daemon's new TCP connection at the proxy: median {fmt(rc.get('p50_ms'))}, "
                     f"max {fmt(rc.get('max_ms'))}; first status call (sent at ~2-8 ms) answered at "
                     f"median {fmt(fs.get('p50_ms'))}, max {fmt(fs.get('max_ms'))}")
        lines.append("   per cut (mirror ms / left ms / back ms): " + ", ".join(
            f"{fmt(t['mirror_ms'], '')}/{fmt(t['left_ms'], '')}/{fmt(t['connected_again_ms'], '')}"
            for t in heal["trials"]))
    else:
        lines.append(f"   FAILED: {results['errors'].get('heal', 'not run')}")
    render_errors(lines, results["errors"])
    return "\n".join(lines)


# --------------------------------------------------------------------------


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true",
                    help="debug binaries, small sizes, check correctness (CI smoke test)")
    ap.add_argument("--out", help="JSON results (default bench/results/ssh.json; ssh-quick.json with --quick)")
    ap.add_argument("--bridge", default=os.environ.get("BRIDGE_BIN"),
                    help="bridge binary (bridge-agent next to it); default target/release/bridge "
                         "(target/debug/bridge with --quick); env BRIDGE_BIN")
    ap.add_argument("--files", type=int, help="files in the tree (full: 2000)")
    ap.add_argument("--edits", type=int, help="edits per peer (full: 100)")
    ap.add_argument("--cuts", type=int, help="cuts in the heal test (full: 10)")
    ap.add_argument("--spacing-ms", type=float, default=150.0, help="pause after an edit arrived (150)")
    ap.add_argument("--delay-ms", type=int, default=50, help="one-way delay of the delaying proxy (50)")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--proxy-delayed-ack", action="store_true",
                    help="the proxies ACK sshd's data as the kernel decides (delayed ACKs), as "
                         "for a daemon before 2026-12-06 that did not ACK at once: for runs of "
                         "older binaries (by default they ACK at once, as the daemon does)")
    ap.add_argument("--log", default=None, help="BRIDGE_LOG for `bridge up` (e.g. debug)")
    ap.add_argument("--workdir", default="/tmp", help="parent of the temporary work directory")
    ap.add_argument("--keep", action="store_true", help="keep the work directory (and .bridge/ logs)")
    args = ap.parse_args()

    base = QUICK if args.quick else FULL
    cfg = {k: (getattr(args, k) if getattr(args, k) is not None else v) for k, v in base.items()}
    bridge_exe = Path(args.bridge or ROOT / "target" / ("debug" if args.quick else "release") / "bridge").resolve()
    cfg.update(quick=args.quick, spacing_ms=args.spacing_ms, delay_ms=args.delay_ms, seed=args.seed,
               bridge=str(bridge_exe), bridge_log=args.log, proxy_quickack=not args.proxy_delayed_ack)
    out = Path(args.out or HERE / "results" / ("ssh-quick.json" if args.quick else "ssh.json"))
    if not check_binaries(bridge_exe, f"cargo build {'' if args.quick else '--release '}--bins"):
        return 2

    install_term_handlers()

    results: dict = {"config": cfg, "machine": machine_info(bridge_exe), "errors": {}}
    work = Path(tempfile.mkdtemp(prefix="bridge-sshbench-", dir=args.workdir))
    log(f"work directory {work}")
    started = time.perf_counter()
    sshd: Sshd | None = None
    proxies: list[DelayProxy] = []
    peers: list[Bridge] = []
    try:
        results["netem"] = probe_netem(args.delay_ms)
        log(f"netem in a network namespace: {'works' if results['netem']['works'] else 'not available'}"
            f" ({results['netem'].get('error', '')})")
        results["proxy_rtt"] = {}
        for d in (0, args.delay_ms):
            results["proxy_rtt"][f"{d}ms"] = measure_rtt(d / 1000)
        err = ensure_sshd(log)
        if err:
            raise BenchError(f"no sshd: {err}")
        sshd = Sshd(work / "sshd", comment="ssh_bench")
        sshd.start()
        log(f"sshd on 127.0.0.1:{sshd.port}")
        plain = DelayProxy(sshd.port, 0.0, not args.proxy_delayed_ack)
        delayed = DelayProxy(sshd.port, args.delay_ms / 1000, not args.proxy_delayed_ack)
        proxies += [plain, delayed]
        ssh_dir = sshd.client_dir(work / "client-ssh", [sshd.port, plain.port, delayed.port])
        ssh_env = dict(os.environ, BRIDGE_SSH_DIR=str(ssh_dir),
                       BRIDGE_KNOWN_HOSTS=str(work / "bridge_known_hosts"), SSH_AUTH_SOCK="")
        local_env = dict(os.environ)
        for e in (ssh_env, local_env):
            e.pop("BRIDGE_LOG", None)
        ports = {"ssh": sshd.port, "ssh_proxy": plain.port, "ssh_delay": delayed.port}
        proxy_of = {"ssh_proxy": plain, "ssh_delay": delayed}
        rels: list[str] = []
        for name in PEERS:
            repo = work / f"repo-{name}"
            rels = write_tree(repo, cfg["files"], args.seed)
            if name == "local":
                peers.append(Bridge(name, bridge_exe, repo, local_env, ["up", "--provider", "local"]))
            else:
                remote = work / f"remote-{name}"
                peers.append(Bridge(name, bridge_exe, repo, ssh_env,
                                  ["up", "--host", f"root@127.0.0.1:{ports[name]}", "--remote-dir", str(remote)],
                                  remote=remote, proxy=proxy_of.get(name)))
        results["up_s"] = {}
        up_env = {"BRIDGE_LOG": args.log} if args.log else None
        for p in peers:
            log(f"bridge up: {p.name}")
            results["up_s"][p.name] = round(p.up(up_env), 3)
            compare_trees(p.repo, p.mirror, SKIP_TOP)
        try:
            results["latency"] = bench_latency(peers, rels, cfg["edits"], args.spacing_ms / 1000, args.seed)
        except Exception as e:  # noqa: BLE001 - recorded and reported
            results["errors"]["latency"] = f"{type(e).__name__}: {e}"
            log(traceback.format_exc())
        try:
            p = next(p for p in peers if p.name == "ssh_proxy")
            results["heal"] = bench_heal(p, rels, cfg["cuts"], args.seed)
        except Exception as e:  # noqa: BLE001
            results["errors"]["heal"] = f"{type(e).__name__}: {e}"
            log(traceback.format_exc())
        if args.quick:
            lat, heal = results.get("latency"), results.get("heal")
            if isinstance(lat, dict):
                bad = {k: lat[k]["failures"] for k in PEERS if k in lat and lat[k]["failures"]}
                if bad:
                    results["errors"]["latency_failures"] = f"edits that never arrived: {bad}"
            if isinstance(heal, dict) and heal["failures"]:
                results["errors"]["heal_failures"] = f"{heal['failures']} cuts never healed"
        try:
            results["loadavg_end"] = [round(x, 2) for x in os.getloadavg()]
        except OSError:
            pass
    except (BenchError, SshdError) as e:
        results["errors"]["setup"] = str(e)
        log(f"error: {e}")
    except KeyboardInterrupt as e:
        results["errors"]["interrupted"] = str(e) or "interrupted"
        log("interrupted; cleaning up")
    finally:
        for p in peers:
            err = p.down()
            if err:
                results["errors"].setdefault(f"down_{p.name}", err)
            if p.exit_wait_s:
                results.setdefault("exit_after_down_s", {})[p.name] = p.exit_wait_s
        for pr in proxies:
            pr.stop()
        if sshd:
            sshd.stop()
        if args.keep:
            log(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)

    results["total_s"] = round(time.perf_counter() - started, 1)
    write_results(out, results, render)
    return 1 if results["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())

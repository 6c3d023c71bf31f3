"""Scenarios 5 and 9 on the monorepo: a no-op resync after a daemon
restart (next to rsync's no-op run), then the daemon idle with the whole
tree watched.
"""

from __future__ import annotations

import time

from common import BenchError, compare_trees, flush_disk, human_bytes, log, proc_cpu_s, proc_mem_kib, summarize
from peers import rsync_push
from scenarios import Context, dur, ratio, row

SKIP_TOP = frozenset({".git", ".bridge"})
TARGET_NOOP_S = 1.0
TARGET_IDLE_CPU_PCT = 0.5
TARGET_RSS_PER_FILE = 200
IDLE_SAMPLE_S = 1.0


def noop_resync(ctx: Context) -> dict:
    """Scenario 5: the initial sync of both (unmeasured, recorded), then
    reps times: `bridge down` (the daemon stops, the agent keeps its mirror)
    and a timed `bridge up`, then a timed rsync of the unchanged tree."""
    b, lab = ctx.mono_bridge, ctx.lab
    out: dict = {"files": ctx.cfg["mono_files"]}
    t, b0 = b.up(), b.proxy.total_bytes()
    out["bridge_initial_s"] = round(t, 3)
    dst = lab.trash.new_dir("rsync-mono-")
    out["rsync_initial_s"] = rsync_push(lab, "rsync", ctx.mono, dst)["time_s"]
    log(f"5 monorepo initial sync: bridge {out['bridge_initial_s']:.1f} s, rsync {out['rsync_initial_s']:.1f} s")
    samples: dict[str, list[dict]] = {"bridge": [], "rsync": []}
    out["flush_s"] = []
    for r in range(ctx.cfg["reps"]):
        b.stop_daemon()
        # The three 200k-file trees just written (source, mirror, rsync's
        # copy) are still being written back for a minute or more.
        out["flush_s"].append(round(flush_disk(), 3))
        b0 = b.proxy.total_bytes()
        t = b.up()
        time.sleep(0.05)
        st = b.status()
        if not st.get("in_sync"):
            raise BenchError(f"5: `bridge up` after a restart returned out of sync: {st}")
        samples["bridge"].append({"time_s": round(t, 4), "wire_bytes": b.proxy.total_bytes() - b0,
                                  "files_hashed": st.get("files_hashed"), "bytes_sent": st.get("bytes_sent")})
        out["flush_s"].append(round(flush_disk(), 3))
        rs = rsync_push(lab, "rsync", ctx.mono, dst)
        samples["rsync"].append({"time_s": rs["time_s"], "wire_bytes": rs["wire_bytes"]})
        log(f"5 no-op resync rep {r + 1}: bridge {t:.2f} s {human_bytes(samples['bridge'][-1]['wire_bytes'])}, "
            f"rsync {rs['time_s']:.2f} s {human_bytes(rs['wire_bytes'])}")
    compare_trees(ctx.mono, b.mirror, SKIP_TOP, ctx.sample)
    compare_trees(ctx.mono, dst, SKIP_TOP, ctx.sample)
    out["samples"] = samples
    for k, v in samples.items():
        out[k] = {key: summarize([s[key] for s in v], 4 if key == "time_s" else 0) for key in ("time_s", "wire_bytes")}
    bt, rt = out["bridge"]["time_s"]["median"], out["rsync"]["time_s"]["median"]
    out["rows"] = [row(5, f"no-op resync after a daemon restart, monorepo ({out['files']:,} files)", dur(bt),
                       f"rsync {dur(rt)}", ratio(bt, rt), "≤ 1 s and ≤ rsync", bt <= TARGET_NOOP_S and bt <= rt)]
    return out


def idle(ctx: Context) -> dict:
    """Scenario 9: idle_s seconds with nothing changing: the CPU the daemon
    (and the agent) used, their RSS every second, and bytes on the wire."""
    b = ctx.mono_bridge
    st = b.wait_ready()
    time.sleep(2)  # let the last round's work drain
    pids = {"daemon": b.daemon_pid, "agent": b.read_agent_pid()}
    cpu0 = {k: proc_cpu_s(p) for k, p in pids.items() if p}
    w0, t0 = b.proxy.total_bytes(), time.perf_counter()
    rss: dict[str, list[int]] = {k: [] for k in cpu0}
    while time.perf_counter() - t0 < ctx.cfg["idle_s"]:
        for k in rss:
            rss[k].append(proc_mem_kib(pids[k]).get("VmRSS", 0))
        time.sleep(IDLE_SAMPLE_S)
    wall = time.perf_counter() - t0
    out: dict = {"idle_s": round(wall, 2), "files": st.get("files"), "watches": st.get("watches"),
                 "wire_bytes": b.proxy.total_bytes() - w0, "rss_kib_samples": rss}
    for k in cpu0:
        cpu1 = proc_cpu_s(pids[k])
        mem = proc_mem_kib(pids[k])
        out[k] = {"cpu_pct": round((cpu1 - cpu0[k]) / wall * 100, 3), "rss_kib": mem.get("VmRSS"),
                  "peak_rss_kib": mem.get("VmHWM")}
    if "daemon" not in out or not out["files"]:
        raise BenchError(f"9: no daemon to measure ({pids}) or no files ({st.get('files')})")
    d = out["daemon"]
    per_file = d["rss_kib"] * 1024 / out["files"]
    out["daemon"]["rss_bytes_per_file"] = round(per_file, 1)
    agent = out.get("agent", {})
    log(f"9 idle {wall:.0f} s: daemon {d['cpu_pct']:.2f}% CPU, RSS {d['rss_kib'] / 1024:.1f} MiB "
        f"({per_file:.0f} B/file); agent {agent.get('cpu_pct')}% CPU")
    name = f"daemon idle, monorepo watched ({out['files']:,} files, {ctx.cfg['idle_s']} s)"
    out["rows"] = [
        row(9, f"{name}: CPU", f"{d['cpu_pct']:.2f}% of a core", f"agent {agent.get('cpu_pct', 0):.2f}%", None,
            "≤ 0.5% of a core", d["cpu_pct"] <= TARGET_IDLE_CPU_PCT),
        row(9, f"{name}: RSS", f"{d['rss_kib'] / 1024:.1f} MiB = {per_file:.0f} B/file",
            f"agent {agent.get('rss_kib', 0) / 1024:.1f} MiB", None, "≤ 200 B per tracked file",
            per_file <= TARGET_RSS_PER_FILE),
    ]
    return out

"""Scenarios 5 and 9 on the monorepo: a no-op resync after a daemon
restart (next to rsync's no-op run), then the daemon idle with the whole
tree watched.
"""

from __future__ import annotations

import time

from common import BenchError, compare_trees, flush_disk, human_bytes, log, proc_cpu_s, proc_mem_kib, summarize
from peers import rsync_push
from scenarios import Context, dur, ratio, row
from scenarios.bigfile import RssSampler

SKIP_TOP = frozenset({".git", ".bridge"})
TARGET_NOOP_S = 0.150
TARGET_INITIAL_VS_RSYNC = 0.5
TARGET_AGENT_RSS_KIB = 40 * 1024
TARGET_IDLE_CPU_PCT = 0.5
TARGET_RSS_PER_FILE = 200
IDLE_SAMPLE_S = 1.0
# Rounds of the monorepo's initial sync (each writes a 200,000-file copy).
MONO_INITIAL_REPS = 3


def initial_sync(ctx: Context) -> dict:
    """The monorepo's initial sync: reps rounds, bridge and rsync
    alternating (who goes first rotates), each from nothing; during
    bridge's, the RSS of the daemon (its cold start: the first scan and
    hash of every file) and of the agent, sampled, with their peaks."""
    b, lab = ctx.mono_bridge, ctx.lab
    reps = min(ctx.cfg["reps"], MONO_INITIAL_REPS)
    samples: dict[str, list[dict]] = {"bridge": [], "rsync": []}
    dst = None
    for r in range(reps):
        for tool in (("bridge", "rsync") if r % 2 == 0 else ("rsync", "bridge")):
            flush_s = round(flush_disk(), 3)
            if tool == "rsync":
                dst = lab.trash.new_dir("rsync-mono-")
                res = rsync_push(lab, "rsync", ctx.mono, dst)
                s = {"time_s": res["time_s"], "wire_bytes": res["wire_bytes"]}
            else:
                lab.reset_bridge(b)
                sampler = RssSampler({"daemon": ctx.mono / ".bridge" / "daemon.pid",
                                      "agent": b.remote / "run" / "agent.pid"})
                sampler.start()
                b0 = b.proxy.total_bytes()
                try:
                    t = b.up()
                finally:
                    sampler.stop_evt.set()
                    sampler.join(timeout=5)
                st = b.status()
                if not st.get("in_sync") or st.get("files") != ctx.cfg["mono_files"]:
                    raise BenchError(f"5: the monorepo's `bridge up` returned with in_sync={st.get('in_sync')}, "
                                     f"{st.get('files')} files (the tree has {ctx.cfg['mono_files']})")
                s = {"time_s": round(t, 4), "wire_bytes": b.proxy.total_bytes() - b0}
                for k, pid in sampler.pids.items():
                    seen = [x[k] for x in sampler.samples if x.get(k)]
                    s[f"{k}_peak_rss_kib"] = proc_mem_kib(pid).get("VmHWM") or max(seen, default=0)
            s["flush_s"] = flush_s
            samples[tool].append(s)
            log(f"5 monorepo initial sync rep {r + 1}/{reps}: {tool} {s['time_s']:.2f} s, "
                f"{human_bytes(s['wire_bytes'])}")
    out: dict = {"reps": reps, "samples": samples, "rsync_dst": dst}
    for k, v in samples.items():
        out[k] = {"time_s": summarize([s["time_s"] for s in v], 4)}
    bt, rt = out["bridge"]["time_s"]["median"], out["rsync"]["time_s"]["median"]
    peaks = {k: max(s.get(f"{k}_peak_rss_kib", 0) for s in samples["bridge"]) / 1024 for k in ("daemon", "agent")}
    out["peak_rss_mib"] = {k: round(v, 1) for k, v in peaks.items()}
    name = f"initial sync, monorepo ({ctx.cfg['mono_files']:,} files)"
    out["rows"] = [
        row(5, name, dur(bt), f"rsync {dur(rt)}", ratio(bt, rt), "≤ 0.5× rsync", bt <= TARGET_INITIAL_VS_RSYNC * rt),
        row(5, f"{name}: peak RSS during it", f"daemon {peaks['daemon']:.1f} MiB", f"agent {peaks['agent']:.1f} MiB",
            None, "(report)", None),
    ]
    return out


def noop_resync(ctx: Context) -> dict:
    """Scenario 5: the initial sync of both (unmeasured, recorded), then
    reps times: `bridge down` (the daemon stops, the agent keeps its mirror)
    and a timed `bridge up`, then a timed rsync of the unchanged tree."""
    b, lab = ctx.mono_bridge, ctx.lab
    out: dict = {"files": ctx.cfg["mono_files"]}
    out["initial"] = initial_sync(ctx)
    dst = out["initial"].pop("rsync_dst")
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
    out["rows"] = out["initial"].pop("rows") + [row(5, f"no-op resync after a daemon restart, monorepo ({out['files']:,} files)", dur(bt),
                       f"rsync {dur(rt)}", ratio(bt, rt), "≤ 150 ms and ≤ rsync", bt <= TARGET_NOOP_S and bt <= rt)]
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
        row(9, f"{name}: agent RSS", f"{agent.get('rss_kib', 0) / 1024:.1f} MiB = "
            f"{agent.get('rss_kib', 0) * 1024 / max(1, out['files'] or 1):.0f} B/file", "(report)", None,
            "≤ 40 MiB", agent.get("rss_kib", 0) <= TARGET_AGENT_RSS_KIB),
    ]
    return out

"""Scenario 10: the daemon's and the agent's memory while `bridge up`
syncs a repository holding one huge random file (the initial sync)."""

from __future__ import annotations

import random
import threading
import time

from common import MIB, BenchError, git_init, human_bytes, log, proc_mem_kib, same_content
from repos import write_random_file
from scenarios import Context, row

TARGET_RSS_KIB = 100 * 1024
SAMPLE_S = 0.1


class RssSampler(threading.Thread):
    """Every SAMPLE_S: the RSS of the processes whose pid files exist
    (the daemon's `.bridge/daemon.pid`, the agent's `run/agent.pid`)."""

    def __init__(self, pid_files: dict):
        super().__init__(daemon=True)
        self.pid_files = pid_files
        self.samples: list[dict] = []
        self.pids: dict[str, int] = {}
        self.stop_evt = threading.Event()

    def run(self) -> None:
        t0 = time.perf_counter()
        while not self.stop_evt.is_set():
            s = {"t": round(time.perf_counter() - t0, 2)}
            for k, f in self.pid_files.items():
                if k not in self.pids:
                    try:
                        self.pids[k] = int(f.read_text().strip())
                    except (OSError, ValueError):
                        continue
                s[k] = proc_mem_kib(self.pids[k]).get("VmRSS")
            self.samples.append(s)
            time.sleep(SAMPLE_S)


def huge_file(ctx: Context) -> dict:
    lab = ctx.lab
    repo = lab.work / "huge"
    git_init(repo)
    size = ctx.cfg["huge_mib"] * MIB
    log(f"10 writing a {human_bytes(size)} random file")
    write_random_file(repo / "huge.bin", size, random.Random(ctx.seed + 10))
    b = lab.bridge("huge", repo)
    sampler = RssSampler({"daemon": repo / ".bridge" / "daemon.pid", "agent": b.remote / "run" / "agent.pid"})
    sampler.start()
    try:
        t = b.up()
    finally:
        sampler.stop_evt.set()
        sampler.join(timeout=5)
    out: dict = {"bytes": size, "up_s": round(t, 2), "rss_kib_samples": sampler.samples}
    for k, pid in sampler.pids.items():
        mem = proc_mem_kib(pid)
        seen = [s[k] for s in sampler.samples if s.get(k)]
        out[k] = {"peak_rss_kib": mem.get("VmHWM"), "max_sampled_rss_kib": max(seen, default=None)}
    if not same_content(repo / "huge.bin", b.mirror / "huge.bin"):
        raise BenchError("10: the mirror's huge.bin differs from the source")
    if "daemon" not in out or "agent" not in out:
        raise BenchError(f"10: could not find both processes: {sampler.pids}")
    lab.down(b)
    lab.trash.discard(repo)
    lab.trash.discard(b.remote)
    peaks = {k: out[k]["peak_rss_kib"] / 1024 for k in ("daemon", "agent")}
    log(f"10 up of {human_bytes(size)}: {t:.1f} s; peak RSS daemon {peaks['daemon']:.1f} MiB, "
        f"agent {peaks['agent']:.1f} MiB")
    name = f"peak RSS while syncing a {human_bytes(size)} file"
    out["rows"] = [row(10, f"{name}: {k}", f"{peaks[k]:.1f} MiB", "(report)", None, "≤ 100 MiB",
                       out[k]["peak_rss_kib"] <= TARGET_RSS_KIB) for k in ("daemon", "agent")]
    return out

#!/usr/bin/env python3
"""PNG charts of a bench.py results file (full mode only).

bench.py calls `make_charts`, which installs matplotlib with pip into a
private venv (~/.cache/bridge/bench-venv, once) and runs this file there:

    python charts.py RESULTS.json OUT_DIR

One chart per distribution the results hold: edit → mirror latency (2),
first log line (6), the per-repetition times of 1, 3, 4, 5, 7 and 8, and
the memory over time of 9 and 10. The harness itself (and --quick) never
imports matplotlib.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

VENV = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "bridge" / "bench-venv"
PIP_TIMEOUT_S = 900.0


def ensure_venv(log) -> Path:
    """The venv's python, with matplotlib (installed on first use)."""
    py = VENV / "bin" / "python"
    if py.exists() and subprocess.run([py, "-c", "import matplotlib"], capture_output=True).returncode == 0:
        return py
    log(f"charts: installing matplotlib into {VENV}")
    subprocess.run([sys.executable, "-m", "venv", str(VENV)], check=True, capture_output=True, timeout=300)
    subprocess.run([py, "-m", "pip", "install", "-q", "matplotlib"], check=True, capture_output=True,
                   timeout=PIP_TIMEOUT_S)
    return py


def make_charts(results_json: Path, out_dir: Path, log) -> list[Path]:
    """Draw the charts with the venv's matplotlib; returns the PNG paths."""
    py = ensure_venv(log)
    cp = subprocess.run([py, __file__, str(results_json), str(out_dir)], capture_output=True, text=True,
                        timeout=600)
    if cp.returncode != 0:
        raise RuntimeError(f"charts failed: {cp.stderr[-2000:]}")
    return [out_dir / line for line in cp.stdout.split()]


# --------------------------------------------------------------------------
# drawing (runs in the venv)


def cdf(ax, series: dict[str, list[float]], title: str) -> None:
    """Empirical CDFs in ms, log x."""
    for name, vals in series.items():
        v = sorted(x * 1000 for x in vals if x is not None)
        if v:
            ax.step(v, [(i + 1) / len(v) for i in range(len(v))], where="post", label=f"{name} (n={len(v)})")
    ax.set_xscale("log")
    ax.set_xlabel("ms (log)")
    ax.set_ylabel("fraction of samples")
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()


def strip(ax, series: dict[str, list[float]], title: str, unit: str) -> None:
    """Every sample as a dot, with its median as a bar."""
    for i, (name, vals) in enumerate(series.items()):
        v = [x for x in vals if x is not None]
        ax.scatter([i] * len(v), v, alpha=0.6)
        if v:
            med = sorted(v)[len(v) // 2]
            ax.hlines(med, i - 0.3, i + 0.3, colors="black")
    ax.set_xticks(range(len(series)), list(series))
    ax.set_ylim(bottom=0)
    ax.set_ylabel(unit)
    ax.set_title(title, fontsize=9)
    ax.grid(True, axis="y", alpha=0.3)


def rep_series(sc: dict, tools: list[str], key: str = "time_s") -> dict[str, list[float]]:
    s = sc["samples"]
    return {t: [x[key] if isinstance(x, dict) else x for x in s[t]] for t in tools if t in s}


def draw(results: dict, out_dir: Path) -> list[str]:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sc = results["scenarios"]
    made = []

    def save(fig, name: str) -> None:
        fig.tight_layout()
        fig.savefig(out_dir / name, dpi=110)
        plt.close(fig)
        made.append(name)

    if "samples" in sc.get("edit_latency", {}):
        fig, ax = plt.subplots(figsize=(7, 4))
        cdf(ax, {k: [x["s"] for x in v] for k, v in sc["edit_latency"]["samples"].items()},
            "2. 1 KiB edit → visible in the remote mirror")
        save(fig, "s2-edit-latency.png")
    if "samples" in sc.get("first_line", {}):
        fig, ax = plt.subplots(figsize=(7, 4))
        cdf(ax, {k: [x["first_s"] for x in v] for k, v in sc["first_line"]["samples"].items()},
            "6. warm run → first log line")
        save(fig, "s6-first-line.png")
    panels = [(k, t, title, unit) for k, t, title, unit in (
        ("initial_sync", ["bridge", "rsync", "unison"], "1. initial sync", "s"),
        ("big_delta", ["bridge", "rsync"], "3. change in a big file", "s"),
        ("noop_resync", ["bridge", "rsync"], "5. no-op resync", "s"),
        ("log_throughput", ["bridge", "ssh", "local"], "7. log lines", "s"),
        ("checkpoint", ["bridge", "rsync"], "8. checkpoint → local", "s"),
    ) if "samples" in sc.get(k, {})]
    if panels:
        fig, axes = plt.subplots(1, len(panels), figsize=(3.2 * len(panels), 3.6), squeeze=False)
        for ax, (k, tools, title, unit) in zip(axes[0], panels):
            strip(ax, rep_series(sc[k], tools), title, unit)
        save(fig, "repetitions.png")
    for k, title, name in (("huge_file", "10. RSS while syncing a huge file", "s10-rss.png"),
                           ("idle", "9. RSS of the idle daemon", "s9-idle-rss.png")):
        samples = sc.get(k, {}).get("rss_kib_samples")
        if not samples:
            continue
        fig, ax = plt.subplots(figsize=(7, 3.6))
        if isinstance(samples, dict):  # idle: one list per process, one sample a second
            for proc, v in samples.items():
                ax.plot(range(len(v)), [x / 1024 for x in v], label=proc)
        else:
            for proc in ("daemon", "agent"):
                pts = [(s["t"], s[proc] / 1024) for s in samples if s.get(proc)]
                ax.plot([p[0] for p in pts], [p[1] for p in pts], label=proc)
        ax.set_xlabel("s")
        ax.set_ylabel("RSS, MiB")
        ax.set_title(title)
        ax.grid(True, alpha=0.3)
        ax.legend()
        save(fig, name)
    return made


if __name__ == "__main__":
    out = Path(sys.argv[2])
    out.mkdir(parents=True, exist_ok=True)
    print("\n".join(draw(json.loads(Path(sys.argv[1]).read_text()), out)))

"""Cold sync of the monorepo, binaries side by side, each run on a fresh ext4.

    sudo python3 bench/cold_ab.py --files 200000 --reps 2 \\
        OLD_BRIDGE:OLD_AGENT NEW_BRIDGE:NEW_AGENT

Scenario 5's first `bridge up` (bench/scenarios/monorepo.py) for two or more
builds of bridge, next to `rsync -a` of the same tree, over the same SSH
lane as bench.py (private sshd, counting proxy). Every run gets a file system
of its own: a loop-mounted ext4 made again before the run (root: mkfs and
mount), so no tool pays for another's deletions (ext4's `recently_deleted`
slows file creation for minutes after a large removal, which made
back-to-back runs on one disk differ by 2-6x). Order alternates per round.
Prints each run (and, for bridge, the CPU seconds of its daemon and agent)
and the medians. Python 3.11 standard library only.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from lab import Lab  # noqa: E402
from peers import rsync_push  # noqa: E402
from repos import write_monorepo  # noqa: E402


def cpu_s(pid: int | None) -> float | None:
    """User + system CPU seconds of a live process."""
    try:
        f = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(f[11]) + int(f[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return None


def fresh_fs(image: Path, mnt: Path) -> None:
    subprocess.run(["umount", str(mnt)], stderr=subprocess.DEVNULL)
    subprocess.run(["mkfs.ext4", "-q", "-F", str(image)], check=True)
    subprocess.run(["mount", "-o", "loop", str(image), str(mnt)], check=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("builds", nargs="+", help="BRIDGE:AGENT binaries of one build")
    ap.add_argument("--files", type=int, default=200_000)
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--image", type=Path, default=Path("/tmp/bridge-cold-ab.img"))
    ap.add_argument("--image-gib", type=int, default=30)
    ap.add_argument("--mnt", type=Path, default=Path("/mnt/bridge-cold-ab"))
    ap.add_argument("--src", type=Path, help="the monorepo (written once, kept; default next to the image)")
    a = ap.parse_args()
    if os.geteuid() != 0:
        print("cold_ab.py mounts a file system per run: run it as root", file=sys.stderr)
        return 2
    src = a.src or a.image.with_name(f"bridge-cold-ab-src-{a.files}")
    if not (src / ".git").exists():
        shutil.rmtree(src, ignore_errors=True)
        write_monorepo(src, a.files, 5)
    a.mnt.mkdir(parents=True, exist_ok=True)
    if not a.image.exists():
        with open(a.image, "wb") as f:
            f.truncate(a.image_gib << 30)
    times: dict[str, list[float]] = {}
    try:
        for r in range(a.reps):
            order = ["rsync", *a.builds] if r % 2 == 0 else [*reversed(a.builds), "rsync"]
            for tool in order:
                fresh_fs(a.image, a.mnt)
                work = a.mnt / "w"
                work.mkdir()
                subprocess.run(["cp", "-a", str(src), str(work / "mono")], check=True)
                os.sync()
                time.sleep(1)
                exe, agent = (tool.split(":") + [""])[:2] if tool != "rsync" else ("", "")
                lab = Lab(work, Path(exe or "bridge"), 0.0)
                lab.start()
                extra = ""
                try:
                    if tool == "rsync":
                        t0 = time.perf_counter()
                        rsync_push(lab, "rsync", work / "mono", lab.remote_dir("rsync-dst"))
                        dt = time.perf_counter() - t0
                    else:
                        b = lab.bridge("mono", work / "mono")
                        if agent:
                            b.env = dict(b.env, BRIDGE_AGENT_BIN=agent)
                        dt = b.up()
                        extra = f" daemon {cpu_s(b.daemon_pid)} s agent {cpu_s(b.agent_pid)} s of CPU"
                finally:
                    lab.close()
                times.setdefault(tool, []).append(dt)
                print(f"round {r + 1} {tool}: {dt:.2f} s{extra}", flush=True)
    finally:
        subprocess.run(["umount", str(a.mnt)], stderr=subprocess.DEVNULL)
    rs = statistics.median(times["rsync"]) if times.get("rsync") else None
    for tool, v in times.items():
        m = statistics.median(v)
        vs = f", {m / rs:.2f}x rsync" if rs and tool != "rsync" else ""
        print(f"{tool}: median {m:.2f} s{vs} {[round(x, 2) for x in v]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Scenario 2: a 1 KiB edit to a source file of the ml-repo → visible in
the remote mirror, with no explicit flush.

Four copies of the same tree, one per tool, so each tool sees only its own
edits: the ml-repo itself (bridge, up since scenario 1), and three
hard-linked copies made before anything watched (lsyncd, Syncthing, and
rsync of the whole tree after each save). Edit i goes to the same file with the same new content in
each copy, one tool after the other. Every edit is an editor's atomic save:
the new content is written to a temporary file outside the tree and
renamed over the file (so the hard-linked copies never share a write).
"""

from __future__ import annotations

import os
import random
import time
from pathlib import Path

from common import BenchError, compare_trees, log, summarize, wait_content
from peers import Lsyncd, rsync_push
from repos import link_tree
from scenarios import EDIT_TIMEOUT_S, Context, dur, ratio, row
from scenarios.sync import SYNCTHING_TIMEOUT_S, syncthing_pair
from syncthing import OWN_FILES, SyncthingPair

TARGET_P50_S = 0.005
TARGET_P99_S = 0.010
TARGET_VS_RSYNC = 10.0
PAUSE_S = 0.02  # between one tool's edit arriving and the next tool's edit
LSYNCD_EXCLUDES = [".git", ".bridge", ".venv", "outputs"]
LSYNCD_SETTLE_S = 30.0


def edited(old: bytes, rng: random.Random) -> bytes:
    """old with 1 KiB of new text at a random offset (same size)."""
    new = "".join(rng.choices("abcdefghijklmnopqrstuvwxyz \n", k=1024)).encode()
    off = rng.randrange(0, max(1, len(old) - len(new)))
    return old[:off] + new + old[off + len(new):]


def save(path: Path, content: bytes, tmp: Path) -> float:
    """Atomic save through tmp (outside the tree); returns the perf_counter
    time just before the rename."""
    tmp.write_bytes(content)
    t0 = time.perf_counter()
    os.rename(tmp, path)
    return t0


def make_copies(ctx: Context) -> None:
    """The peers' copies of the ml-repo: hard links, made before bridge,
    lsyncd or Syncthing watch anything (a new link changes a file's ctime).
    Scenario 1's Syncthing starts from its copy too."""
    for peer in ("lsyncd", "rsync", "syncthing"):
        dst = ctx.lab.work / f"ml-{peer}"
        link_tree(ctx.ml.path, dst, frozenset({".git", ".bridge"}))
        ctx.ml_copies[peer] = dst


def edit_latency(ctx: Context) -> dict:
    ml, b, lab = ctx.ml, ctx.ml_bridge, ctx.lab
    dst_lsyncd = lab.trash.new_dir("lsyncd-mirror-")
    dst_rsync = lab.trash.new_dir("rsync-save-mirror-")
    dst_syncthing = lab.trash.new_dir("syncthing-edit-mirror-")
    # rsync and Syncthing replace files by rename: links are safe.
    for dst in (dst_lsyncd, dst_rsync, dst_syncthing):
        link_tree(ctx.rsync_mirror, dst, frozenset())
    lsyncd = Lsyncd(lab, "lsyncd", ctx.ml_copies["lsyncd"], dst_lsyncd, LSYNCD_EXCLUDES)
    syncthing = syncthing_pair(ctx)
    out: dict = {"edits": ctx.cfg["edits"], "files": len(ml.sources), "edit_bytes": 1024,
                 "timeout_s": EDIT_TIMEOUT_S, "syncthing_watch_delay_s": 1}
    try:
        out["lsyncd_startup_s"] = round(lsyncd.start(600), 3)
        want = len(ml.sources) + len(ml.binaries) + 1
        out["syncthing_startup_s"] = syncthing.restart(dst_syncthing, want, SYNCTHING_TIMEOUT_S)["time_s"]
        samples = run_edits(ctx, lsyncd, dst_lsyncd, dst_rsync, syncthing)
        out["samples"] = samples
        b.sync_wait()
        paths = [s["path"] for s in samples["bridge"]]
        compare_trees(ml.path, b.mirror, ml.SKIP_TOP, ctx.sample, paths)
        compare_trees(ctx.ml_copies["rsync"], dst_rsync, ml.SKIP_TOP, ctx.sample, paths)
        out["lsyncd_converged"] = converged(ctx, ctx.ml_copies["lsyncd"], dst_lsyncd, paths, ml.SKIP_TOP)
        out["syncthing_converged"] = converged(ctx, syncthing.src, dst_syncthing, paths, ml.SKIP_TOP | OWN_FILES)
    finally:
        lsyncd.stop()
        syncthing.stop()
    lost = {k: sum(1 for s in v if s["s"] is None) for k, v in samples.items()}
    out["lost"] = lost
    if lost["bridge"]:
        raise BenchError(f"2: {lost['bridge']} of bridge's edits never reached the mirror "
                         f"within {EDIT_TIMEOUT_S:.0f} s")
    for k, v in samples.items():
        out[k] = summarize([s["s"] for s in v if s["s"] is not None], 5)
    b50, b99 = out["bridge"]["p50"], out["bridge"]["p99"]
    l50, l99, r50 = out["lsyncd"].get("p50"), out["lsyncd"].get("p99"), out["rsync"]["p50"]
    s50, s99 = out["syncthing"].get("p50"), out["syncthing"].get("p99")
    name = f"1 KiB edit → mirror ({out['edits']} edits)"
    out["rows"] = [
        row(2, f"{name}: p50", dur(b50), f"lsyncd {dur(l50)}", ratio(b50, l50), "≤ 5 ms", b50 <= TARGET_P50_S),
        row(2, f"{name}: p99", dur(b99), f"lsyncd {dur(l99)}", ratio(b99, l99), "≤ 10 ms", b99 <= TARGET_P99_S),
        row(2, f"{name}: p50 vs rsync per save", dur(b50), f"rsync {dur(r50)}", ratio(b50, r50),
            "≥ 10× faster (≤ 0.1×)", r50 >= TARGET_VS_RSYNC * b50),
        row(2, f"{name}: p50 vs Syncthing (watcher, 1 s delay)", dur(b50), f"syncthing {dur(s50)}",
            ratio(b50, s50), "(reference)", None),
        row(2, f"{name}: p99 vs Syncthing", dur(b99), f"syncthing {dur(s99)}", ratio(b99, s99),
            "(reference)", None),
    ]
    if lost["lsyncd"]:
        out["rows"][0]["peer"] += f" ({lost['lsyncd']} edits late > {EDIT_TIMEOUT_S:.0f} s)"
    if lost["syncthing"]:
        out["rows"][3]["peer"] += f" ({lost['syncthing']} edits late > {EDIT_TIMEOUT_S:.0f} s)"
    return out


def run_edits(ctx: Context, lsyncd: Lsyncd, dst_lsyncd: Path, dst_rsync: Path,
              syncthing: SyncthingPair) -> dict[str, list[dict]]:
    """The edits, interleaved: edit i by bridge, then lsyncd, Syncthing and
    rsync."""
    ml, b, lab = ctx.ml, ctx.ml_bridge, ctx.lab
    rng = random.Random(ctx.seed + 2)
    n = ctx.cfg["edits"]
    targets = [rng.choice(ml.sources) for _ in range(n)]
    tmp = lab.work / "edit.tmp"
    samples: dict[str, list[dict]] = {"bridge": [], "lsyncd": [], "syncthing": [], "rsync": []}
    b.wait_ready()
    log(f"2 edit latency: {n} edits each for bridge, lsyncd, Syncthing, rsync per save")
    for i, rel in enumerate(targets):
        content = edited((ml.path / rel).read_bytes(), rng)
        t0 = save(ml.path / rel, content, tmp)
        samples["bridge"].append({"i": i, "path": rel, "s": wait_content(b.mirror / rel, content, t0, EDIT_TIMEOUT_S)})
        time.sleep(PAUSE_S)
        t0 = save(ctx.ml_copies["lsyncd"] / rel, content, tmp)
        samples["lsyncd"].append({"i": i, "path": rel, "s": wait_content(dst_lsyncd / rel, content, t0, EDIT_TIMEOUT_S)})
        time.sleep(PAUSE_S)
        t0 = save(syncthing.src / rel, content, tmp)
        samples["syncthing"].append({"i": i, "path": rel,
                                     "s": wait_content(syncthing.dst / rel, content, t0, EDIT_TIMEOUT_S)})
        time.sleep(PAUSE_S)
        t0 = save(ctx.ml_copies["rsync"] / rel, content, tmp)
        rs = rsync_push(lab, "rsync-save", ctx.ml_copies["rsync"], dst_rsync)
        ok = (dst_rsync / rel).read_bytes() == content
        samples["rsync"].append({"i": i, "path": rel, "s": time.perf_counter() - t0 if ok else None,
                                 "wire_bytes": rs["wire_bytes"]})
        time.sleep(PAUSE_S)
        if (i + 1) % max(1, n // 5) == 0:
            log(f"2 edit {i + 1}/{n}: " + ", ".join(
                f"{k} {dur(v[-1]['s'])}" for k, v in samples.items()))
    for v in samples.values():
        for s in v:
            s["s"] = None if s["s"] is None else round(s["s"], 5)
    return samples


def converged(ctx: Context, src: Path, dst: Path, paths: list[str], skip: frozenset[str]) -> bool:
    """Whether a peer's mirror equals its tree within LSYNCD_SETTLE_S (an
    event lsyncd or Syncthing holds back shows up here)."""
    deadline = time.monotonic() + LSYNCD_SETTLE_S
    while True:
        try:
            compare_trees(src, dst, skip, ctx.sample, paths)
            return True
        except BenchError as e:
            if time.monotonic() > deadline:
                log(f"2 a peer's mirror never converged: {e}")
                return False
            time.sleep(1)

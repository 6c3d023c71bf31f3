"""The scenarios of bench.py, one module per group:

- `sync`: 1 initial sync, 3 a change in a big file, 4 a branch switch
  (ml-repo; peers rsync, unison and, in 1, Syncthing).
- `latency`: 2 edit → mirror latency (ml-repo; peers lsyncd, Syncthing,
  rsync per save).
- `jobs`: 6 warm `bridge run` → first line, 7 log throughput, 8 a
  checkpoint back to the laptop (ml-repo; peers ssh, rsync).
- `monorepo`: 5 no-op resync after a daemon restart, 9 the idle daemon.
- `bigfile`: 10 memory while syncing a huge file.
- `link`: 11 an edit over a link of 50 ms each way (peer: rsync per save),
  and the heal after a cut (peer: a new ssh session).

Each scenario function takes the run's Context and returns its raw results
with `rows`: one line each for the BENCHMARKS.md table (see `row`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from bridgectl import Bridge  # bench/bridgectl.py
from lab import Lab  # bench/lab.py
from repos import MlRepo  # bench/repos.py
from syncthing import SyncthingPair  # bench/syncthing.py

# How long one edit may take to show up before it counts as lost.
EDIT_TIMEOUT_S = 10.0


@dataclass
class Context:
    lab: Lab
    cfg: dict
    quick: bool
    seed: int
    ml: MlRepo | None = None
    ml_bridge: Bridge | None = None
    # rsync's mirror of the ml-repo on the remote side (scenario 1's last).
    rsync_mirror: Path | None = None
    # Hard-linked copies of the ml-repo for scenario 2's peers, by peer.
    ml_copies: dict[str, Path] = field(default_factory=dict)
    # Syncthing's two instances (scenarios 1 and 2), made on first use.
    syncthing: SyncthingPair | None = None
    # The interpreter of the job scenarios' ssh and local peers.
    peer_python: str = ""
    mono: Path | None = None
    mono_bridge: Bridge | None = None

    @property
    def sample(self) -> int | None:
        """How many files' contents a mirror check compares: all in --quick,
        200 (plus the files a scenario changed) otherwise."""
        return None if self.quick else 200


def row(n: int, scenario: str, bridge: str, peer: str, ratio: float | None, target: str,
        met: bool | None) -> dict:
    """One line of the results table; met None: reported, no target."""
    return {"n": n, "scenario": scenario, "bridge": bridge, "peer": peer,
            "ratio": None if ratio is None else round(ratio, 3), "target": target, "met": met}


def dur(seconds: float | None) -> str:
    """A duration for the table: ms under a second, s above."""
    if seconds is None:
        return "-"
    return f"{seconds * 1000:.1f} ms" if seconds < 1 else f"{seconds:.2f} s"


def ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None

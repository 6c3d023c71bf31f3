"""The peer tools, driven over SSH through a Lab lane (bench/lab.py):
`rsync -a --delete -e ssh`, unison over ssh, and lsyncd (rsync over ssh on
every change, `delay = 0`). Each timed call returns its wall time and the
bytes that crossed its lane's proxy. Python 3.11 standard library only.
"""

from __future__ import annotations

import re
import shlex
import subprocess
import time
from pathlib import Path

from common import BenchError, run_cmd, stop_process  # bench/common.py

# The peers' programs and the Debian packages that bring them (bench/apt.py).
PROGRAMS = {"rsync": "rsync", "unison": "unison", "lsyncd": "lsyncd", "syncthing": "syncthing"}

PEER_TIMEOUT_S = 1800.0

# What the peers leave out: git's own directory, bridge's state, and what the
# repository's .gitignore files ignore (rsync reads them as merge files).
RSYNC_FILTER = ["--filter=:- .gitignore", "--exclude=/.git", "--exclude=/.bridge"]

RSYNC_FIELDS = {
    "total_bytes_sent": r"Total bytes sent:\s*([\d,.]+)",
    "total_bytes_received": r"Total bytes received:\s*([\d,.]+)",
    "literal_data": r"Literal data:\s*([\d,.]+)",
    "matched_data": r"Matched data:\s*([\d,.]+)",
    "files_transferred": r"Number of regular files transferred:\s*([\d,.]+)",
}


def parse_rsync_stats(text: str) -> dict:
    out = {}
    for k, pat in RSYNC_FIELDS.items():
        m = re.search(pat, text)
        if m:
            out[k] = int(re.sub(r"[,.]", "", m.group(1)))
    return out


def remote(path: Path) -> str:
    return f"127.0.0.1:{path}"


def timed(lab, lane: str, args: list[str], env: dict | None = None) -> dict:
    """Run args; wall time, bytes through the lane's proxy, and stdout."""
    b0 = lab.wire_bytes(lane)
    t0 = time.perf_counter()
    cp = run_cmd(args, PEER_TIMEOUT_S, env=env)
    dt = time.perf_counter() - t0
    time.sleep(0.05)  # the proxy's writer threads count what they just forwarded
    return {"time_s": round(dt, 4), "wire_bytes": lab.wire_bytes(lane) - b0, "stdout": cp.stdout}


def rsync_push(lab, lane: str, src: Path, dst: Path) -> dict:
    """`rsync -a --delete --stats` of the tree src into dst on the remote side."""
    r = timed(lab, lane, ["rsync", "-a", "--delete", "--stats", *RSYNC_FILTER, "-e", lab.ssh_e(lane),
                          f"{src}/", f"{remote(dst)}/"])
    r["stats"] = parse_rsync_stats(r.pop("stdout"))
    return r


def rsync_file(lab, lane: str, src: Path, dst: Path) -> dict:
    """`rsync -a -I --stats` of one file over its remote copy: always
    transferred (-I: no skipping on size and whole-second mtime), with
    rsync's delta transfer (the default over ssh)."""
    r = timed(lab, lane, ["rsync", "-a", "-I", "--stats", "-e", lab.ssh_e(lane), str(src), remote(dst)])
    r["stats"] = parse_rsync_stats(r.pop("stdout"))
    return r


def rsync_pull(lab, lane: str, src: Path, dst: Path) -> dict:
    """`rsync -a --stats` of the remote directory src into the local dst."""
    r = timed(lab, lane, ["rsync", "-a", "--stats", "-e", lab.ssh_e(lane), f"{remote(src)}/", f"{dst}/"])
    r["stats"] = parse_rsync_stats(r.pop("stdout"))
    return r


def unison_sync(lab, lane: str, src: Path, dst: Path, archives: Path, ignore_paths: list[str]) -> dict:
    """unison of src with dst on the remote side, batch mode; `archives`
    holds both sides' archive files (a fresh directory: a first sync)."""
    dst.chmod(src.stat().st_mode & 0o7777)  # a root whose mode differs is a conflict batch mode skips
    local_arch, remote_arch = archives / "local", archives / "remote"
    local_arch.mkdir(parents=True, exist_ok=True)
    remote_arch.mkdir(parents=True, exist_ok=True)
    ignores = [a for p in ignore_paths for a in ("-ignore", f"Path {p}")]
    args = ["unison", str(src), f"ssh://127.0.0.1/{dst}", "-batch", "-auto", "-silent",
            "-confirmbigdel=false", "-ignore", "Name .git", "-ignore", "Name .bridge", *ignores,
            "-sshcmd", "ssh", "-sshargs", shlex.join(lab.ssh_opts(lane)),
            "-servercmd", f"env UNISON={remote_arch} unison"]
    env = dict(lab.bridge_env, UNISON=str(local_arch))
    r = timed(lab, lane, args, env=env)
    r.pop("stdout")
    return r


class Lsyncd:
    """lsyncd mirroring src into dst on the remote side with rsync over ssh
    through the lane, `delay = 0` (each change is sent at once)."""

    def __init__(self, lab, lane: str, src: Path, dst: Path, excludes: list[str]):
        self.lab, self.lane = lab, lane
        self.dir = lab.work / f"lsyncd-{lane}"
        self.dir.mkdir(parents=True, exist_ok=True)
        self.log = self.dir / "lsyncd.log"
        self.conf = self.dir / "lsyncd.conf.lua"
        lua = lambda s: '"' + s.replace("\\", "\\\\").replace('"', '\\"') + '"'  # noqa: E731
        self.conf.write_text("\n".join([
            "settings {",
            f"  logfile = {lua(str(self.log))},",
            f"  statusFile = {lua(str(self.dir / 'status'))},",
            "  nodaemon = true,",
            "  insist = true,",
            "}",
            "sync {",
            "  default.rsync,",
            f"  source = {lua(str(src))},",
            f"  target = {lua(remote(dst))},",
            "  delay = 0,",
            "  exclude = { " + ", ".join(lua(e) for e in excludes) + " },",
            "  rsync = {",
            "    archive = true,",
            f"    rsh = {lua(lab.ssh_e(lane))},",
            "  },",
            "}",
            "",
        ]))
        self.proc: subprocess.Popen | None = None

    def start(self, timeout: float) -> float:
        """Start lsyncd; returns once its startup sync is done (seconds)."""
        t0 = time.perf_counter()
        with open(self.dir / "stdout.log", "ab") as out:
            self.proc = subprocess.Popen(["lsyncd", str(self.conf)], stdin=subprocess.DEVNULL,
                                         stdout=out, stderr=subprocess.STDOUT)
        while True:
            text = self.log.read_text(errors="replace") if self.log.exists() else ""
            if "finished" in text and "Startup" in text:
                return time.perf_counter() - t0
            if self.proc.poll() is not None or time.perf_counter() - t0 > timeout:
                raise BenchError(f"lsyncd did not finish its startup sync (exit {self.proc.poll()}): "
                                 f"{text[-1500:]}")
            time.sleep(0.05)

    def stop(self) -> None:
        stop_process(self.proc, 10)
        self.proc = None

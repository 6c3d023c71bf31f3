"""Syncthing as a peer of scenarios 1 and 2 (issue 25): two instances on
this machine, "local" sending a tree and "remote" receiving it, with the
local one reaching the remote one through a Lab lane's counting proxy (the
same kind of link as every other tool; Syncthing speaks its own TLS
protocol, not SSH).

Each instance has its own home (keys, config, index database) under the
work directory, its GUI/REST API on a loopback port with a known API key,
and listens on loopback only. Everything that would reach beyond the
machine is off: global and local discovery, relays, NAT traversal and STUN,
usage and crash reports, upgrade checks. The folder is send-only on the
local side and receive-only on the remote one (a mirror, as bridge keeps),
with the file-system watcher on and its delay at 1 s, the shortest
Syncthing 1.19 allows (`fsWatcherDelayS` is whole seconds). Python 3.11
standard library only.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import socket
import subprocess
import time
import urllib.error
import urllib.request
import xml.etree.ElementTree as ET
from pathlib import Path

from common import BenchError, run_cmd, stop_process  # bench/common.py

FOLDER = "bench"
WATCH_DELAY_S = 1
# What Syncthing keeps in the folders it syncs, left out of tree comparisons.
OWN_FILES = frozenset({".stfolder", ".stignore"})
NOWHERE = "http://127.0.0.1:9/"  # for the URLs of services that are off anyway
OPTIONS = {
    "globalAnnounceEnabled": "false", "localAnnounceEnabled": "false", "relaysEnabled": "false",
    "natEnabled": "false", "stunKeepaliveStartS": "0", "stunKeepaliveMinS": "0", "startBrowser": "false",
    "urAccepted": "-1", "urURL": NOWHERE, "autoUpgradeIntervalH": "0", "releasesURL": NOWHERE,
    "crashReportingEnabled": "false", "crashReportingURL": NOWHERE, "announceLANAddresses": "false",
    "setLowPriority": "false", "restartOnWakeup": "false",
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def version() -> str | None:
    try:
        out = run_cmd(["syncthing", "--version"], 10, check=False).stdout.split()
    except (BenchError, OSError):
        return None
    return out[1] if len(out) > 1 else None


class Instance:
    """One Syncthing: its home, ports and process."""

    def __init__(self, home: Path):
        self.home = home
        if not (home / "cert.pem").exists():
            run_cmd(["syncthing", "generate", f"--home={home}", "--no-default-folder", "--skip-port-probing"], 120)
        self.id = run_cmd(["syncthing", "serve", f"--home={home}", "--device-id"], 60).stdout.strip()
        self.gui = free_port()
        self.listen = free_port()
        self.key = secrets.token_hex(16)
        self.proc: subprocess.Popen | None = None

    def configure(self, folder: Path, kind: str, peer: "Instance", peer_address: str) -> None:
        """Rewrites config.xml: loopback only, one folder shared with peer
        (reached at peer_address: a tcp:// URL, or "dynamic": never dialled)."""
        conf = self.home / "config.xml"
        root = ET.parse(conf).getroot()
        opts = root.find("options")
        for k, v in OPTIONS.items():
            el = opts.find(k)
            if el is None:
                el = ET.SubElement(opts, k)
            el.text = v
        for el in opts.findall("listenAddress"):
            opts.remove(el)
        ET.SubElement(opts, "listenAddress").text = f"tcp://127.0.0.1:{self.listen}"
        gui = root.find("gui")
        gui.find("address").text = f"127.0.0.1:{self.gui}"
        gui.find("apikey").text = self.key
        for el in root.findall("device") + root.findall("folder"):
            if el.get("id") != self.id:
                root.remove(el)
        device = ET.fromstring(ET.tostring(root.find("defaults/device")))
        device.set("id", peer.id)
        device.set("name", "peer")
        device.find("address").text = peer_address
        root.insert(0, device)
        f = ET.fromstring(ET.tostring(root.find("defaults/folder")))
        f.attrib.update(id=FOLDER, label=FOLDER, path=str(folder), type=kind, rescanIntervalS="3600",
                        fsWatcherEnabled="true", fsWatcherDelayS=str(WATCH_DELAY_S))
        share = ET.SubElement(f, "device", id=peer.id, introducedBy="")
        ET.SubElement(share, "encryptionPassword")
        root.insert(0, f)
        ET.ElementTree(root).write(conf)
        (folder / ".stfolder").mkdir(parents=True, exist_ok=True)

    def start(self) -> None:
        env = dict(os.environ, STNODEFAULTFOLDER="1", STNOUPGRADE="1", STNORESTART="1")
        with open(self.home / "stdout.log", "ab") as out:
            self.proc = subprocess.Popen(
                ["syncthing", "serve", f"--home={self.home}", "--no-browser", "--no-restart", "--no-upgrade",
                 f"--logfile={self.home / 'syncthing.log'}", "--log-max-old-files=0"],
                stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, env=env)

    def api(self, path: str) -> dict | None:
        """GET of the REST API; None while it is not up."""
        req = urllib.request.Request(f"http://127.0.0.1:{self.gui}{path}", headers={"X-API-Key": self.key})
        try:
            with urllib.request.urlopen(req, timeout=5) as r:
                return json.loads(r.read())
        except (urllib.error.URLError, ConnectionError, TimeoutError, json.JSONDecodeError):
            return None

    def status(self) -> dict:
        return self.api(f"/rest/db/status?folder={FOLDER}") or {}

    def stop(self) -> None:
        stop_process(self.proc, 20)
        self.proc = None

    def forget(self) -> None:
        """Drops the index database: the next start scans from nothing."""
        for db in self.home.glob("index-*.db"):
            shutil.rmtree(db)

    def log_tail(self) -> str:
        p = self.home / "syncthing.log"
        return p.read_text(errors="replace")[-1500:] if p.exists() else ""


class SyncthingPair:
    """src (local, send-only) mirrored into dst (remote, receive-only); the
    local instance dials the remote one through the lane's proxy."""

    def __init__(self, lab, lane: str, src: Path, dst: Path, ignores: list[str]):
        self.lab, self.lane, self.src, self.dst = lab, lane, src, dst
        work = lab.work / f"syncthing-{lane}"
        self.local = Instance(work / "local")
        self.remote = Instance(work / "remote")
        self.proxy = lab.proxy(lane, self.remote.listen)
        (src / ".stignore").write_text("".join(f"{p}\n" for p in ignores))
        self.configure(dst)

    def configure(self, dst: Path) -> None:
        self.dst = dst
        self.local.configure(self.src, "sendonly", self.remote, f"tcp://127.0.0.1:{self.proxy.port}")
        self.remote.configure(dst, "receiveonly", self.local, "dynamic")

    def start(self) -> None:
        self.local.start()
        self.remote.start()

    def stop(self) -> None:
        self.local.stop()
        self.remote.stop()

    def wait_synced(self, files: int, timeout: float, poll_s: float = 0.02) -> float:
        """Until the remote holds `files` files, needs nothing and is idle,
        and the local side is idle; seconds waited."""
        t0 = time.perf_counter()
        last: dict = {}
        while True:
            for i in (self.local, self.remote):
                if i.proc is not None and i.proc.poll() is not None:
                    raise BenchError(f"syncthing ({i.home.name}) exited with {i.proc.returncode}: {i.log_tail()}")
            last = self.remote.status()
            if (last.get("globalFiles") == files and last.get("needTotalItems") == 0
                    and last.get("state") == "idle" and self.local.status().get("state") == "idle"):
                return time.perf_counter() - t0
            if time.perf_counter() - t0 > timeout:
                raise BenchError(f"syncthing did not finish within {timeout:.0f} s (remote: {last}): "
                                 f"{self.remote.log_tail()}")
            time.sleep(poll_s)

    def restart(self, dst: Path, files: int, timeout: float) -> dict:
        """A first sync into dst, from nothing: both index databases
        dropped, both processes started; wall time until the remote holds
        every file, and the bytes through the proxy."""
        self.stop()
        self.local.forget()
        self.remote.forget()
        self.configure(dst)
        b0 = self.proxy.total_bytes()
        t0 = time.perf_counter()
        self.start()
        self.wait_synced(files, timeout)
        dt = time.perf_counter() - t0
        time.sleep(0.05)
        return {"time_s": round(dt, 4), "wire_bytes": self.proxy.total_bytes() - b0}

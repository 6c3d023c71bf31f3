"""What every scenario of bench.py shares: the work directory and its
trash, the private sshd on 127.0.0.1, one counting TCP proxy per tool
("lane") in front of it, and the bridge repositories started through it.

Every tool reaches the "remote" side (directories on this machine) over
SSH through its own proxy: bridge's SSH provider, rsync and unison over
ssh, lsyncd's rsync, the ssh peers of the job scenarios. So all of them
cross the same kind of link, and the bytes each one moves are counted the
same way (SSH framing and encryption included). Python 3.11 standard
library only.
"""

from __future__ import annotations

import getpass
import os
import shlex
from pathlib import Path

from bridgectl import Bridge  # bench/bridgectl.py
from common import BenchError, Trash, log  # bench/common.py
from proxy import DelayProxy  # bench/proxy.py
from sshd import Sshd  # bench/sshd.py


class Lab:
    def __init__(self, work: Path, bridge_exe: Path, delay_ms: float, bridge_log: str | None = None):
        self.work = work
        self.trash = Trash(work)
        self.bridge_exe = bridge_exe
        self.delay_s = delay_ms / 1000.0
        self.user = getpass.getuser()
        self.sshd = Sshd(work / "sshd", comment="bench")
        self.proxies: dict[str, DelayProxy] = {}
        self.bridges: list[Bridge] = []
        self.bridge_env: dict = {}
        self.bridge_log = bridge_log

    def start(self) -> None:
        self.sshd.start()
        log(f"sshd on 127.0.0.1:{self.sshd.port}")
        # bridge reads no ~/.ssh and writes no ~/.config: a stand-in ssh
        # directory (the client key) and a known-hosts file of its own.
        ssh_dir = self.sshd.client_dir(self.work / "client-ssh", [])
        self.bridge_env = dict(os.environ, BRIDGE_SSH_DIR=str(ssh_dir),
                               BRIDGE_KNOWN_HOSTS=str(self.work / "bridge_known_hosts"), SSH_AUTH_SOCK="")
        self.bridge_env.pop("BRIDGE_LOG", None)
        if self.bridge_log:  # diagnostics only: the daemon's log level
            self.bridge_env["BRIDGE_LOG"] = self.bridge_log

    # ---------------------------------------------------------------- links

    def proxy(self, lane: str, port: int | None = None, delay_s: float | None = None,
              quickack: bool = False) -> DelayProxy:
        """The lane's proxy in front of sshd, or of another loopback `port`
        (a peer that does not speak SSH), started on first use; its one-way
        delay is the run's unless `delay_s` says otherwise. `quickack`: the
        client ACKs the server's data at once (bridge's daemon), so the
        proxy does too (bench/proxy.py)."""
        if lane not in self.proxies:
            self.proxies[lane] = DelayProxy(port or self.sshd.port, self.delay_s if delay_s is None else delay_s,
                                            quickack)
        return self.proxies[lane]

    def wire_bytes(self, lane: str) -> int:
        """Bytes through the lane's proxy so far, both directions."""
        return self.proxy(lane).total_bytes()

    def ssh_opts(self, lane: str) -> list[str]:
        return [*self.sshd.opts(self.proxy(lane).port), "-o", "ControlMaster=no", "-o", "ControlPath=none"]

    def ssh_e(self, lane: str) -> str:
        """The ssh command line for rsync's -e (and lsyncd's rsh)."""
        return shlex.join(["ssh", *self.ssh_opts(lane)])

    def ssh(self, lane: str, remote_cmd: str) -> list[str]:
        """`ssh … 127.0.0.1 remote_cmd` through the lane's proxy: a fresh
        connection per command, as users type it."""
        return ["ssh", *self.ssh_opts(lane), "127.0.0.1", remote_cmd]

    def remote_dir(self, name: str) -> Path:
        """A directory on the "remote" side (this machine, reached over SSH)."""
        d = self.work / "remote" / name
        d.parent.mkdir(parents=True, exist_ok=True)
        return d

    # ---------------------------------------------------------------- bridge

    def down(self, b: Bridge) -> None:
        """Stop a repository's daemon and agent before the end of the run (the
        agent's files stay: they go with the work directory; `--purge` of a
        large mirror outlasts `bridge down` on a slow file system)."""
        err = b.down(purge=False)
        if err:
            raise BenchError(err)

    def bridge(self, name: str, repo: Path, delay_s: float | None = None) -> Bridge:
        """A bridge repository on the SSH provider: its own proxy lane
        (`bridge-NAME`, delayed by `delay_s` when given) and its own remote
        directory, so its agent, chunk store and traffic are its own."""
        lane = f"bridge-{name}"
        remote = self.remote_dir(lane)
        up = ["up", "--host", f"{self.user}@127.0.0.1:{self.proxy(lane, delay_s=delay_s, quickack=True).port}",
               "--identity", str(self.sshd.key), "--accept-new-host-key", "--remote-dir", str(remote)]
        b = Bridge(name, self.bridge_exe, repo, self.bridge_env, up, remote=remote, proxy=self.proxy(lane))
        self.bridges.append(b)
        return b

    def reset_bridge(self, b: Bridge) -> None:
        """Back to nothing but the uploaded agent binary: the daemon and the
        agent stopped, the repository's `.bridge/` and the agent's state
        (mirror, chunk store) moved aside."""
        if b.up_done:
            b.stop_agent()
        self.trash.discard(b.repo / ".bridge")
        if b.remote is not None:
            self.trash.discard(b.remote / "agent")

    def close(self) -> dict[str, str]:
        """bridge down (daemons and remote agents), then the proxies and sshd.
        Returns the errors, by repository. Never raises."""
        errors = {}
        for b in self.bridges:
            err = b.down(purge=False)  # the remote directories go with the work directory
            if err:
                errors[f"down_{b.name}"] = err
        for p in self.proxies.values():
            p.stop()
        self.sshd.stop()
        return errors

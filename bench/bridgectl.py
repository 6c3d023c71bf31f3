"""Driving one repository's `bridge` from a benchmark: up, status, sync,
down, and the pids of its daemon and (SSH provider) remote agent.

Shared by bench.py's scenarios and ssh_bench.py. Python 3.11 standard
library only.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

from common import BenchError, run_cmd  # bench/common.py

UP_TIMEOUT_S = 1800.0  # a full-size initial sync through the Python proxy
SYNC_TIMEOUT_S = 900.0
SMALL_CMD_TIMEOUT_S = 60.0
DOWN_TIMEOUT_S = 120.0
READY_TIMEOUT_S = 60.0


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[-1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


class Bridge:
    """`bridge -C repo …` with its own environment. `up_args` is the whole
    `up` command line (provider options included); `remote` is the SSH
    provider's --remote-dir (None for the local provider), `proxy` the
    DelayProxy the daemon reaches sshd through, if any."""

    def __init__(self, name: str, exe: Path, repo: Path, env: dict, up_args: list[str],
                 remote: Path | None = None, proxy=None):
        self.name = name
        self.exe = exe
        self.repo = repo
        self.env = env
        self.up_args = up_args
        self.remote = remote
        self.proxy = proxy
        self.up_done = False
        self.daemon_pid: int | None = None
        self.agent_pid: int | None = None
        self.mirror: Path | None = None
        # After `bridge down` returned: how long until the daemon and the
        # remote agent were gone, seconds.
        self.exit_wait_s: dict[str, float] = {}

    def args(self, *a: str) -> list[str]:
        return [str(self.exe), "-C", str(self.repo), *a]

    def bridge(self, *args: str, timeout: float = SMALL_CMD_TIMEOUT_S, check: bool = True,
               extra_env: dict | None = None) -> subprocess.CompletedProcess:
        env = dict(self.env, **(extra_env or {}))
        return run_cmd(self.args(*args), timeout, check, env)

    def log_tail(self, n: int = 40) -> str:
        try:
            return "\n".join((self.repo / ".bridge" / "daemon.log").read_text(errors="replace")
                             .splitlines()[-n:])
        except OSError:
            return "(no daemon.log)"

    def up(self, extra_env: dict | None = None) -> float:
        """`bridge up`; returns its wall time in seconds."""
        self.up_done = True
        t0 = time.perf_counter()
        try:
            self.bridge(*self.up_args, timeout=UP_TIMEOUT_S, extra_env=extra_env)
        except BenchError as e:
            raise BenchError(f"{self.name}: {e}\ndaemon.log tail:\n{self.log_tail()}") from None
        dt = time.perf_counter() - t0
        st = self.status()
        self.daemon_pid = st.get("daemon_pid")
        self.mirror = Path(st["mirror_path"])
        self.agent_pid = self.read_agent_pid()
        return dt

    def read_agent_pid(self) -> int | None:
        """The remote agent's pid (SSH provider: `run/agent.pid` under --remote-dir)."""
        if self.remote is None:
            return None
        try:
            return int((self.remote / "run" / "agent.pid").read_text().strip())
        except (OSError, ValueError):
            return None

    def status(self) -> dict:
        cp = self.bridge("status", "--json")
        try:
            return json.loads(cp.stdout)
        except json.JSONDecodeError:
            raise BenchError(f"{self.name}: status --json printed no JSON: {cp.stdout!r} {cp.stderr!r}") from None

    def sync_wait(self) -> None:
        try:
            self.bridge("sync", "--wait", timeout=SYNC_TIMEOUT_S)
        except BenchError as e:
            raise BenchError(f"{self.name}: {e}\ndaemon.log tail:\n{self.log_tail()}") from None

    def wait_ready(self, limit_s: float = READY_TIMEOUT_S) -> dict:
        """Status once connected, in sync and with nothing pending."""
        deadline = time.monotonic() + limit_s
        while True:
            st = self.status()
            if st.get("connection") == "connected" and st.get("in_sync") and not st.get("pending_changes"):
                return st
            if time.monotonic() > deadline:
                raise BenchError(f"{self.name}: not connected and in sync within {limit_s:.0f} s: {st}")
            time.sleep(0.02)

    def stop_daemon(self) -> None:
        """`bridge down`: the daemon stops; a remote agent keeps running with
        its mirror and chunk store (what a daemon restart finds)."""
        self.bridge("down", timeout=DOWN_TIMEOUT_S)
        self._wait_gone("daemon", self.daemon_pid, signal.SIGTERM, time.monotonic())
        self.up_done = False

    def stop_agent(self) -> None:
        """`bridge down --remote --force`: the daemon and the remote agent
        stop; the agent's files stay (the uploaded binary included)."""
        self.bridge("down", "--remote", "--force", timeout=DOWN_TIMEOUT_S)
        t0 = time.monotonic()
        self._wait_gone("daemon", self.daemon_pid, signal.SIGTERM, t0)
        self._wait_gone("agent", self.agent_pid, signal.SIGKILL, t0)
        self.up_done = False

    def down(self, purge: bool = True) -> str | None:
        """Stop daemon and agent (and with purge, remove the agent's files);
        returns an error string or None. Never raises."""
        if not self.up_done:
            return None
        err = None
        args = ["down", *(["--remote", "--force"] if self.remote else []), *(["--purge"] if purge else [])]
        try:
            self.bridge(*args, timeout=DOWN_TIMEOUT_S)
        except (BenchError, OSError) as e:
            err = f"{self.name}: bridge {' '.join(args)} failed: {e}"
        t0 = time.monotonic()
        for what, pid, sig in (("daemon", self.daemon_pid, signal.SIGTERM),
                               ("agent", self.agent_pid, signal.SIGKILL)):
            err = self._wait_gone(what, pid, sig, t0) or err
        self.up_done = False
        return err

    def _wait_gone(self, what: str, pid: int | None, sig: int, t0: float) -> str | None:
        """Wait up to 10 s (from t0) for a process we started to exit (it may
        still be exiting after `down` returned); kill it by its id otherwise."""
        if not pid:
            return None
        deadline = t0 + 10
        while alive(pid) and time.monotonic() < deadline:
            time.sleep(0.01)
        self.exit_wait_s[what] = round(time.monotonic() - t0, 3)
        if not alive(pid):
            return None
        try:
            os.kill(pid, sig)
        except OSError:
            pass
        return f"{self.name}: {what} pid {pid} still alive 10 s after bridge down"

"""A private OpenSSH server on 127.0.0.1 for the benchmarks (bench.py,
ssh_bench.py). Python 3.11 standard library only.

`ensure_sshd()` installs Debian's openssh-server with apt-get when
/usr/sbin/sshd is missing (bench/apt.py: as root, no service starts).
`Sshd(dir)` generates a host key and an authorized client key in `dir`,
writes an sshd_config there and runs `sshd -D` as a child on a free port; `stop()` kills it and every per-connection server it
forked. `client_dir()` writes a directory that stands in for a client's
~/.ssh (what bridge's `BRIDGE_SSH_DIR` points at).
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

from apt import ensure_packages  # bench/apt.py
from common import BenchError, run_cmd  # bench/common.py

SSHD = "/usr/sbin/sshd"


class SshdError(BenchError):
    """Setting up or talking to the private sshd failed."""


def _run(args: list[str], timeout: float, check: bool = True) -> subprocess.CompletedProcess:
    try:
        return run_cmd(args, timeout, check)
    except BenchError as e:
        raise SshdError(str(e)) from None


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ensure_sshd(log=None) -> str | None:
    """Install openssh-server (and client) if sshd is missing (bench/apt.py:
    no service is started); returns an error string or None."""
    return ensure_packages({SSHD: "openssh-server", "ssh": "openssh-client",
                            "ssh-keygen": "openssh-client"}, log)


def _children() -> dict[int, list[int]]:
    """ppid -> [pid] for every process (from /proc)."""
    out: dict[int, list[int]] = {}
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/stat") as f:
                s = f.read()
        except OSError:
            continue
        fields = s.rsplit(")", 1)[-1].split()
        if len(fields) > 1:
            out.setdefault(int(fields[1]), []).append(int(d))
    return out


def _descendants(pid: int) -> list[list[int]]:
    """The descendants of pid by generation (children first)."""
    kids = _children()
    levels: list[list[int]] = []
    cur = [pid]
    while True:
        nxt = [c for p in cur for c in kids.get(p, [])]
        if not nxt:
            return levels
        levels.append(nxt)
        cur = nxt


class Sshd:
    """sshd -D on 127.0.0.1:PORT with its own keys and config in `dir`.

    `bashrc=False` makes bash skip ~/.bashrc in every session: sshd sets
    SHLVL=1 for all of them (bridge's SSH provider included, which cannot
    send environment variables), and opts() sends it too.
    """

    def __init__(self, dir: Path, bashrc: bool = False, comment: str = "bench"):
        self.dir = dir
        self.bashrc = bashrc
        self.comment = comment
        self.port = 0
        self.proc: subprocess.Popen | None = None
        self.key = dir / "id_ed25519"
        self.hostkey = dir / "ssh_host_ed25519_key"
        self.errlog = dir / "sshd.log"

    def start(self) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        os.chmod(self.dir, 0o700)
        Path("/run/sshd").mkdir(parents=True, exist_ok=True)  # sshd's privilege-separation dir
        for k in (self.hostkey, self.key):
            if not k.exists():
                _run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", self.comment,
                      "-f", str(k)], 30)
        auth = self.dir / "authorized_keys"
        auth.write_text((self.key.with_suffix(".pub")).read_text())
        auth.chmod(0o600)
        self.port = free_port()
        conf = self.dir / "sshd_config"
        conf.write_text("\n".join([
            "ListenAddress 127.0.0.1",
            f"Port {self.port}",
            f"HostKey {self.hostkey}",
            f"AuthorizedKeysFile {auth}",
            "StrictModes no",
            "UsePAM no",
            "PasswordAuthentication no",
            "KbdInteractiveAuthentication no",
            "PubkeyAuthentication yes",
            "PermitRootLogin prohibit-password",
            # bridge reaches its agent's Unix socket over direct-streamlocal.
            "AllowStreamLocalForwarding yes",
            "AllowTcpForwarding yes",
            f"PidFile {self.dir / 'sshd.pid'}",
            "UseDNS no",
            "PrintMotd no",
            "LogLevel ERROR",
            "MaxStartups 100:30:200",
            "AcceptEnv SHLVL",
            *([] if self.bashrc else ["SetEnv SHLVL=1"]),
            "",
        ]))
        _run([SSHD, "-t", "-f", str(conf)], 30)  # config check: a clear error
        with open(self.errlog, "wb") as errf:
            self.proc = subprocess.Popen([SSHD, "-D", "-f", str(conf), "-e"], stdin=subprocess.DEVNULL,
                                         stdout=subprocess.DEVNULL, stderr=errf)
        deadline = time.monotonic() + 10
        while True:
            if self.proc.poll() is not None:
                raise SshdError(f"sshd exited {self.proc.returncode}: {self.errlog.read_text()[-1500:]}")
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise SshdError(f"sshd did not listen on port {self.port} within 10 s") from None
                time.sleep(0.02)
        cp = _run(["ssh", *self.opts(), "127.0.0.1", "echo ok"], 30, check=False)
        if cp.returncode != 0 or cp.stdout.strip() != "ok":
            raise SshdError(f"ssh to the private sshd failed (exit {cp.returncode}): {cp.stderr.strip()}\n"
                            f"sshd log: {self.errlog.read_text()[-1500:]}")

    def host_key_pub(self) -> str:
        """`ssh-ed25519 AAAA…` (no comment)."""
        return " ".join(self.hostkey.with_suffix(".pub").read_text().split()[:2])

    def client_dir(self, path: Path, ports: list[int]) -> Path:
        """A directory standing in for a client's ~/.ssh: `id_ed25519` (+ .pub),
        the authorized client key (mode 0600), and `known_hosts` accepting the
        host key at 127.0.0.1 on each of `ports` (sshd's own port, or proxies
        in front of it)."""
        path.mkdir(parents=True, exist_ok=True)
        os.chmod(path, 0o700)
        shutil.copyfile(self.key, path / "id_ed25519")
        os.chmod(path / "id_ed25519", 0o600)
        shutil.copyfile(self.key.with_suffix(".pub"), path / "id_ed25519.pub")
        pub = self.host_key_pub()
        (path / "known_hosts").write_text("".join(f"[127.0.0.1]:{p} {pub}\n" for p in ports))
        return path

    def opts(self, port: int | None = None) -> list[str]:
        """ssh options for sshd's port, or `port` (a proxy in front of it)."""
        # SHLVL=1 (sshd accepts it: AcceptEnv) makes bash skip ~/.bashrc, which
        # Debian's bash otherwise sources for every ssh command; on the
        # project's VMs root's .bashrc runs `pyenv init` (~0.3 s), a cost of
        # this machine, not of ssh. bashrc=True keeps it.
        return ["-F", "/dev/null", "-p", str(port or self.port), "-i", str(self.key),
                "-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null",
                "-o", "BatchMode=yes", "-o", "LogLevel=ERROR", "-o", "IdentitiesOnly=yes",
                *([] if self.bashrc else ["-o", "SetEnv=SHLVL=1"])]

    def stop(self) -> None:
        """Ends sshd and every process it forked (the per-connection servers
        and their sessions; they start sessions of their own, so a
        process-group kill would miss them), leaves first. Processes that
        left the tree (a daemonized remote agent) are not touched: stop
        those by their own means first."""
        if self.proc is not None and self.proc.poll() is None:
            try:
                levels = _descendants(self.proc.pid)
            except OSError:
                levels = []
            for level in reversed(levels):
                for pid in level:
                    try:
                        os.kill(pid, signal.SIGKILL)
                    except OSError:
                        pass
                deadline = time.monotonic() + 0.5
                while time.monotonic() < deadline and any(os.path.exists(f"/proc/{p}") for p in level):
                    time.sleep(0.005)
            self.proc.terminate()
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None

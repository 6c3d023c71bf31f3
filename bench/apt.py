"""Installing the benchmarks' peer tools from Debian when they are missing.

`ensure_packages({"rsync": "rsync", "/usr/sbin/sshd": "openssh-server"})`
installs each package whose program (a name on PATH, or an absolute path) is
missing, with apt-get, as root. No system service starts during the install:
a temporary /usr/sbin/policy-rc.d refusing every start is in place unless
one already exists (it is removed afterwards). Idempotent: nothing runs when
every program is there. Python 3.11 standard library only.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

APT_TIMEOUT_S = 600.0
POLICY = Path("/usr/sbin/policy-rc.d")


def have(program: str) -> bool:
    return os.path.exists(program) if program.startswith("/") else shutil.which(program) is not None


def _apt(args: list[str]) -> subprocess.CompletedProcess:
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    return subprocess.run(["apt-get", *args], env=env, capture_output=True, text=True,
                          timeout=APT_TIMEOUT_S)


def ensure_packages(programs: dict[str, str], log=None) -> str | None:
    """Install the packages of the missing programs ({program: package});
    returns an error string or None."""
    pkgs = sorted({pkg for prog, pkg in programs.items() if not have(prog)})
    if not pkgs:
        return None
    if os.geteuid() != 0:
        return f"missing {', '.join(pkgs)} and not root (cannot apt-get install)"
    if not shutil.which("apt-get"):
        return f"missing {', '.join(pkgs)} and there is no apt-get"
    if log:
        log(f"installing {' '.join(pkgs)} with apt-get")
    made_policy = False
    try:
        if not POLICY.exists():
            POLICY.write_text("#!/bin/sh\n# bench/apt.py: no service starts during its install\nexit 101\n")
            POLICY.chmod(0o755)
            made_policy = True
        install = ["install", "-y", "-qq", "--no-install-recommends", *pkgs]
        cp = _apt(install)
        if cp.returncode != 0:  # stale package lists: update once and retry
            _apt(["update", "-qq"])
            cp = _apt(install)
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"cannot install {' '.join(pkgs)}: {e}"
    finally:
        if made_policy:
            POLICY.unlink(missing_ok=True)
    missing = [prog for prog in programs if not have(prog)]
    if cp.returncode != 0 or missing:
        return f"cannot install {' '.join(pkgs)} (still missing {missing}): {(cp.stderr or cp.stdout).strip()[-1500:]}"
    return None

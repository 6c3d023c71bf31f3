"""The kernels' figures for bench/kernel_bench.py, run with the Jupyter
venv's Python (jupyter_client): prints one JSON object, by kernel.

    kernel_measure.py RTTS EDITS ROUNDS KERNEL=REPO...

Every kernel is started first, then measured in ROUNDS rounds whose order
rotates, each round RTTS/ROUNDS round trips and EDITS/ROUNDS saves per
kernel, so that the kernels share the machine's conditions:
- rtt_ms: execute_request of `pass` → its execute_reply on the shell
  channel (after 20 warm-up cells).
- save_ms: REPO/pkg/mod.py rewritten to return i, then `mod.value()`
  executed at once (`%autoreload 2`) until its result shows i; from just
  before the write to the result. `wrong` counts cells that showed an
  older value (each is retried, so save_ms includes them).

Each kernel starts with its REPO as the working directory (a plain local
ipykernel imports the package from there; a bridge kernel runs in the
mirror anyway).
"""

import json
import sys
import time

from jupyter_client import KernelManager


def result(kc, msg_id):
    value = None
    while True:
        msg = kc.get_iopub_msg(timeout=60)
        if msg["parent_header"].get("msg_id") != msg_id:
            continue
        if msg["msg_type"] == "execute_result":
            value = msg["content"]["data"]["text/plain"]
        elif msg["msg_type"] == "error":
            raise RuntimeError(msg["content"]["ename"] + ": " + msg["content"]["evalue"])
        elif msg["msg_type"] == "status" and msg["content"]["execution_state"] == "idle":
            return value


def shell_reply(kc, msg_id):
    while True:
        m = kc.get_shell_msg(timeout=60)
        if m["parent_header"].get("msg_id") == msg_id:
            return m


def start(name, cwd):
    km = KernelManager(kernel_name=name)
    km.start_kernel(cwd=cwd)
    kc = km.client()
    kc.start_channels()
    kc.wait_for_ready(timeout=300)
    for code in ("%load_ext autoreload", "%autoreload 2", "from pkg import mod", "pass"):
        mid = kc.execute(code)
        shell_reply(kc, mid)
        result(kc, mid)
    return km, kc


def round_trips(kc, n):
    out = []
    for _ in range(n):
        t0 = time.perf_counter()
        mid = kc.execute("pass", store_history=False)
        shell_reply(kc, mid)
        out.append((time.perf_counter() - t0) * 1000)
        result(kc, mid)
    return out


def saves(kc, repo, first, n):
    """Save i, run `mod.value()` until it shows i; ms per save and stale cells."""
    out, wrong = [], 0
    mod = f"{repo}/pkg/mod.py"
    for i in range(first, first + n):
        t0 = time.perf_counter()
        with open(mod, "w") as f:
            f.write(f"def value():\n    return {i}\n")
        while True:
            mid = kc.execute("mod.value()")
            got = result(kc, mid)
            shell_reply(kc, mid)
            if got == str(i):
                break
            wrong += 1
            if wrong > 1000:
                raise RuntimeError(f"the kernel keeps showing {got} instead of {i}")
        out.append((time.perf_counter() - t0) * 1000)
    return out, wrong


def main():
    rtts, edits, rounds = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
    kernels = [a.split("=", 1) for a in sys.argv[4:]]
    started = {name: start(name, repo) for name, repo in kernels}
    res = {name: {"rtt_ms": [], "save_ms": [], "wrong": 0} for name, _ in kernels}
    for _, kc in started.values():
        round_trips(kc, 20)  # warm-up
    per_r, per_e = max(1, rtts // rounds), max(1, edits // rounds)
    for r in range(rounds):
        order = kernels[r % len(kernels):] + kernels[: r % len(kernels)]
        for name, repo in order:
            kc = started[name][1]
            res[name]["rtt_ms"] += round_trips(kc, per_r)
            got, wrong = saves(kc, repo, 1 + r * per_e, per_e)
            res[name]["save_ms"] += got
            res[name]["wrong"] += wrong
    for km, kc in started.values():
        kc.stop_channels()
        km.shutdown_kernel(now=False)
    print(json.dumps(res))


if __name__ == "__main__":
    main()

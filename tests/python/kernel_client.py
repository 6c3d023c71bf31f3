"""Drives a bridge kernel the way a front end does: jupyter_client's
KernelManager with the installed kernelspec (argv, interrupt_mode signal),
a blocking client on the five channels.

    kernel_client.py session NAME REPO   every check on one kernel, then JSON
    kernel_client.py cut NAME            link cuts, coordinated over stdin/stdout
    kernel_client.py kerneltest NAME     jupyter_kernel_test's KernelTests

The kernelspec is found through JUPYTER_PATH, which the Rust test sets.
Each check reports what it saw; the Rust test asserts on it.
"""

import json
import os
import signal
import sys
import time
import unittest

from jupyter_client import KernelManager

TIMEOUT = 120


def start(name):
    km = KernelManager(kernel_name=name)
    km.start_kernel()
    kc = km.client()
    kc.start_channels()
    kc.wait_for_ready(timeout=TIMEOUT)
    return km, kc


def collect(kc, msg_id, timeout=TIMEOUT):
    """The shell reply and the iopub output of one execution."""
    out = {"result": None, "stdout": "", "error": None}
    deadline = time.monotonic() + timeout
    idle = False
    while not idle:
        msg = kc.get_iopub_msg(timeout=max(0.1, deadline - time.monotonic()))
        if msg["parent_header"].get("msg_id") != msg_id:
            continue
        t, c = msg["msg_type"], msg["content"]
        if t == "execute_result":
            out["result"] = c["data"].get("text/plain")
        elif t == "stream" and c.get("name") == "stdout":
            out["stdout"] += c["text"]
        elif t == "error":
            out["error"] = c["ename"]
        elif t == "status" and c["execution_state"] == "idle":
            idle = True
    while True:
        reply = kc.get_shell_msg(timeout=max(0.1, deadline - time.monotonic()))
        if reply["parent_header"].get("msg_id") == msg_id:
            break
    out["status"] = reply["content"]["status"]
    return out


def run(kc, code, timeout=TIMEOUT):
    return collect(kc, kc.execute(code), timeout)


def value(kc, code):
    r = run(kc, code)
    if r["status"] != "ok":
        raise RuntimeError(f"{code!r} failed: {r}")
    return r["result"]


def gone(pid, within):
    """Seconds until process `pid` is gone, or None if it outlived `within`."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < within:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return time.monotonic() - t0
        time.sleep(0.05)
    return None


def session(name, repo):
    report = {}
    km, kc = start(name)
    report["one_plus_one"] = value(kc, "1+1")
    report["cwd"] = json.loads(value(kc, "import json, os; json.dumps(os.getcwd())").strip("'"))
    pid = int(value(kc, "os.getpid()"))
    report["pid"] = pid

    # stdin: input() answered on the stdin channel.
    msg_id = kc.execute("name = input('who? ')", allow_stdin=True)
    req = kc.get_stdin_msg(timeout=TIMEOUT)
    report["input_prompt"] = req["content"]["prompt"]
    kc.input("bridge")
    collect(kc, msg_id)
    report["input_value"] = value(kc, "name")

    # The debugger's first request on the control channel.
    dbg = kc.session.msg(
        "debug_request",
        content={
            "type": "request",
            "seq": 1,
            "command": "initialize",
            "arguments": {
                "clientID": "bridge-test",
                "adapterID": "python",
                "pathFormat": "path",
                "linesStartAt1": True,
                "columnsStartAt1": True,
            },
        },
    )
    kc.control_channel.send(dbg)
    while True:
        reply = kc.get_control_msg(timeout=TIMEOUT)
        if reply["parent_header"].get("msg_id") == dbg["header"]["msg_id"]:
            break
    report["debug_initialize"] = reply["content"].get("success")

    # Save, then run: %autoreload sees every save at once, no sleep.
    mod = os.path.join(repo, "pkg", "mod.py")
    value(kc, "%load_ext autoreload")
    value(kc, "%autoreload 2")
    value(kc, "from pkg import mod")
    wrong = []
    times = []
    for i in range(1, 21):
        with open(mod, "w") as f:
            f.write(f"def value():\n    return {i}\n")
        t0 = time.monotonic()
        got = value(kc, "mod.value()")
        times.append(time.monotonic() - t0)
        if got != str(i):
            wrong.append([i, got])
    report["autoreload_wrong"] = wrong
    report["autoreload_ms"] = sorted(t * 1000 for t in times)[len(times) // 2]

    # Interrupt: the running cell stops, the state stays.
    value(kc, "before = 41")
    msg_id = kc.execute("import time; time.sleep(100)")
    time.sleep(1.0)
    t0 = time.monotonic()
    km.interrupt_kernel()
    r = collect(kc, msg_id, timeout=30)
    report["interrupt_s"] = time.monotonic() - t0
    report["interrupt_error"] = r["error"]
    report["after_interrupt"] = value(kc, "before + 1")

    # Restart: a new remote process, the old one gone.
    km.restart_kernel(now=False)
    kc.wait_for_ready(timeout=TIMEOUT)
    new_pid = int(value(kc, "import os; os.getpid()"))
    report["restart_new_pid"] = new_pid
    report["restart_old_gone_s"] = gone(pid, 10)

    # kill -9 of the local `bridge kernel`: the remote kernel goes too.
    local = km.provisioner.process.pid
    os.kill(local, signal.SIGKILL)
    report["kill9_remote_gone_s"] = gone(new_pid, 15)
    kc.stop_channels()
    km.cleanup_resources()
    print(json.dumps(report), flush=True)


def wait_for(line):
    print(line, flush=True)
    got = sys.stdin.readline().strip()
    if got != "healed":
        raise RuntimeError(f"expected 'healed', got {got!r}")


def cut(name):
    report = {}
    km, kc = start(name)
    value(kc, "x = 6")
    pid = int(value(kc, "import os; os.getpid()"))
    report["pid"] = pid

    wait_for("CUT idle")
    report["idle_value"] = value(kc, "x * 7")
    report["idle_pid"] = int(value(kc, "os.getpid()"))

    # The cell ends during the cut: its result comes after the heal.
    msg_id = kc.execute("import time; time.sleep(3); print('done', flush=True); x * 7")
    wait_for("CUT running")
    r = collect(kc, msg_id, timeout=90)
    report["running_value"] = r["result"]
    report["running_stdout"] = r["stdout"]
    report["running_status"] = r["status"]
    report["running_pid"] = int(value(kc, "os.getpid()"))
    km.shutdown_kernel(now=False)
    report["shutdown_gone_s"] = gone(pid, 10)
    print(json.dumps(report), flush=True)


def kerneltest(name):
    import jupyter_kernel_test

    class BridgeKernelTests(jupyter_kernel_test.KernelTests):
        kernel_name = name
        language_name = "python"
        file_extension = ".py"
        code_hello_world = "print('hello, world')"
        code_stderr = "import sys; print('test', file=sys.stderr)"
        code_page_something = "print?"
        completion_samples = [{"text": "zi", "matches": {"zip"}}]
        complete_code_samples = ["1", "print('hello, world')", "def f(x):\n  return x*2\n\n\n"]
        incomplete_code_samples = ["print('''hello", "def f(x):\n  x*2"]
        invalid_code_samples = ["import = 7q"]
        code_generate_error = "raise"
        code_execute_result = [{"code": "1+2+3", "result": "6"}]
        code_display_data = [
            {"code": "from IPython.display import display; display(5)", "mime": "text/plain"}
        ]
        code_history_pattern = "1?2*"
        supported_history_operations = ("tail", "search")
        code_inspect_sample = "zip"
        code_clear_output = "from IPython.display import clear_output; clear_output()"

    suite = unittest.defaultTestLoader.loadTestsFromTestCase(BridgeKernelTests)
    result = unittest.TextTestRunner(stream=sys.stderr, verbosity=2).run(suite)
    print(json.dumps({"ran": result.testsRun, "failures": len(result.failures), "errors": len(result.errors)}), flush=True)
    sys.exit(0 if result.wasSuccessful() else 1)


if __name__ == "__main__":
    cmd, name = sys.argv[1], sys.argv[2]
    if cmd == "session":
        session(name, sys.argv[3])
    elif cmd == "cut":
        cut(name)
    elif cmd == "kerneltest":
        kerneltest(name)
    else:
        sys.exit(f"unknown command {cmd}")

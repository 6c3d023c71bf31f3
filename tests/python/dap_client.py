"""A Debug Adapter Protocol client, as VS Code speaks it, for the debugger
tests: raw DAP over TCP (Content-Length framed JSON), no library.

    python3 dap_client.py CONFIG.json FILE LINE EXPR

CONFIG is the attach configuration `bridge run --debug` printed (its
`connect` and `pathMappings` are used as VS Code would); FILE is the *local*
path of a source file, LINE a line in it, EXPR an expression to evaluate
where the program stops there. Prints one JSON object with what happened and
exits 0 when the program stopped at FILE:LINE and was continued.
"""

import json
import socket
import sys
import time


class Dap:
    def __init__(self, host, port, deadline):
        while True:
            try:
                self.sock = socket.create_connection((host, port), timeout=5)
                break
            except OSError:
                if time.time() > deadline:
                    raise
                time.sleep(0.1)
        self.sock.settimeout(60)
        self.buf = b""
        self.seq = 0
        self.events = []
        self.responses = {}

    def send(self, command, **arguments):
        self.seq += 1
        body = json.dumps(
            {"seq": self.seq, "type": "request", "command": command, "arguments": arguments}
        ).encode()
        self.sock.sendall(b"Content-Length: %d\r\n\r\n" % len(body) + body)
        return self.seq

    def read(self):
        while b"\r\n\r\n" not in self.buf:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise EOFError("the debug adapter closed the connection")
            self.buf += chunk
        head, _, rest = self.buf.partition(b"\r\n\r\n")
        length = int(
            [l.split(b":")[1] for l in head.split(b"\r\n") if l.lower().startswith(b"content-length")][0]
        )
        while len(rest) < length:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise EOFError("the debug adapter closed the connection")
            rest += chunk
        self.buf = rest[length:]
        return json.loads(rest[:length])

    def note(self, m):
        if m["type"] == "event":
            self.events.append(m)
        elif m["type"] == "response":
            self.responses[m["request_seq"]] = m

    def response(self, seq):
        while seq not in self.responses:
            self.note(self.read())
        m = self.responses.pop(seq)
        if not m["success"]:
            raise RuntimeError(f"{m['command']} failed: {m.get('message')}")
        return m

    def event(self, name):
        for i, e in enumerate(self.events):
            if e["event"] == name:
                return self.events.pop(i)
        while True:
            m = self.read()
            if m["type"] == "event" and m["event"] == name:
                return m
            self.note(m)


def main():
    config_path, file, line, expr = sys.argv[1:5]
    config = json.load(open(config_path))
    out = {}
    dap = Dap(config["connect"]["host"], config["connect"]["port"], time.time() + 60)
    dap.response(
        dap.send("initialize", clientID="vscode", adapterID="debugpy", pathFormat="path",
                 linesStartAt1=True, columnsStartAt1=True, supportsRunInTerminalRequest=False)
    )
    attach = dap.send("attach", **{k: v for k, v in config.items() if k not in ("name", "type", "request")})
    dap.event("initialized")
    bp = dap.response(
        dap.send("setBreakpoints", source={"path": file}, breakpoints=[{"line": int(line)}])
    )
    out["breakpoints"] = bp["body"]["breakpoints"]
    dap.response(dap.send("configurationDone"))
    dap.response(attach)
    stopped = dap.event("stopped")
    out["stopped_reason"] = stopped["body"].get("reason")
    thread = stopped["body"]["threadId"]
    frames = dap.response(dap.send("stackTrace", threadId=thread))["body"]["stackFrames"]
    top = frames[0]
    out["frame"] = {"path": top["source"]["path"], "line": top["line"]}
    value = dap.response(dap.send("evaluate", expression=expr, frameId=top["id"], context="repl"))
    out["value"] = value["body"]["result"]
    dap.response(dap.send("continue", threadId=thread))
    try:
        dap.event("terminated")
        out["terminated"] = True
    except (EOFError, OSError):
        out["terminated"] = True
    print(json.dumps(out))


if __name__ == "__main__":
    main()

"""A TCP proxy on loopback that counts and can delay and cut traffic.

Every tool in the benchmarks reaches the private sshd (bench/sshd.py)
through one of these, one proxy per tool, so bytes on the wire are counted
the same way for all of them (SSH framing and encryption included), and a
delay, where used, is the same for all. netem is not available on every
kernel (not on the project's VMs), so the delay is done here. Python 3.11
standard library only.
"""

from __future__ import annotations

import queue
import socket
import threading
import time

KIB = 1024


class DelayProxy:
    """127.0.0.1:port -> 127.0.0.1:target. Each direction of a connection has
    a reader and a writer thread joined by a bounded queue: the reader stamps
    each chunk with when it may leave (now + delay), the writer sleeps until
    then, so order is kept and the delay is one-way per direction (a round
    trip gains twice the delay). cut() shuts down both sockets of every live
    connection, as a broken link would; new connections are accepted."""

    CHUNK = 64 * KIB
    IN_FLIGHT = 256  # chunks per direction before the reader waits (16 MiB)

    def __init__(self, target_port: int, delay_s: float = 0.0, quickack: bool = False):
        self.target = ("127.0.0.1", target_port)
        self.delay_s = delay_s
        # ACK what the server sends at once (TCP_QUICKACK after every read),
        # as the client on the far side would: the proxy ends the server's
        # TCP connection, so the client's ACK policy towards sshd is the
        # proxy's. bridge's daemon ACKs at once (sshd leaves Nagle on, and
        # a delayed ACK held its small packets); OpenSSH, rsync and the
        # other peers do not, so their lanes keep the kernel's delayed ACKs.
        self.quickack = quickack
        self.lock = threading.Lock()
        self.live: dict[int, tuple[socket.socket, socket.socket]] = {}
        self.accepted = 0
        self.accept_times: list[float] = []  # perf_counter() of each accept
        self.cuts = 0
        self.bytes = [0, 0]  # client->server, server->client
        self.stopping = False
        self.listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(64)
        self.port = self.listener.getsockname()[1]
        self.thread = threading.Thread(target=self._accept_loop, name=f"proxy-{self.port}", daemon=True)
        self.thread.start()

    def _accept_loop(self) -> None:
        next_id = 0
        while not self.stopping:
            try:
                client, _ = self.listener.accept()
            except OSError:
                if self.stopping:
                    return
                time.sleep(0.01)
                continue
            if self.stopping:
                client.close()
                return
            next_id += 1
            with self.lock:
                self.accepted += 1
                self.accept_times.append(time.perf_counter())
            threading.Thread(target=self._connect, args=(next_id, client), daemon=True).start()

    def _connect(self, cid: int, client: socket.socket) -> None:
        try:
            server = socket.create_connection(self.target, timeout=5)
            server.settimeout(None)
        except OSError:
            client.close()
            return
        for s in (client, server):
            s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        with self.lock:
            self.live[cid] = (client, server)
        done = threading.Barrier(5)  # 4 forwarding threads + the closer below

        def closer() -> None:
            done.wait()
            with self.lock:
                self.live.pop(cid, None)
            for s in (client, server):
                try:
                    s.close()
                except OSError:
                    pass
        threading.Thread(target=closer, daemon=True).start()
        for src, dst, k in ((client, server, 0), (server, client, 1)):
            q: queue.Queue = queue.Queue(self.IN_FLIGHT)
            qa = self.quickack and src is server
            threading.Thread(target=self._reader, args=(src, dst, q, done, qa), daemon=True).start()
            threading.Thread(target=self._writer, args=(src, dst, q, k, done), daemon=True).start()

    def _kill(self, a: socket.socket, b: socket.socket) -> None:
        for s in (a, b):
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def _reader(self, src, dst, q: queue.Queue, done: threading.Barrier, quickack: bool) -> None:
        try:
            while True:
                try:
                    data = src.recv(self.CHUNK)
                except OSError:
                    data = b""
                if not data:
                    q.put(None)
                    return
                q.put((time.monotonic() + self.delay_s, data))
                if quickack:
                    try:
                        src.setsockopt(socket.IPPROTO_TCP, socket.TCP_QUICKACK, 1)
                    except OSError:
                        pass
        finally:
            done.wait()

    def _writer(self, src, dst, q: queue.Queue, k: int, done: threading.Barrier) -> None:
        try:
            while True:
                item = q.get()
                if item is None:  # EOF from src: pass it on
                    try:
                        dst.shutdown(socket.SHUT_WR)
                    except OSError:
                        pass
                    return
                due, data = item
                wait = due - time.monotonic()
                if wait > 0:
                    time.sleep(wait)
                try:
                    dst.sendall(data)
                except OSError:
                    self._kill(src, dst)
                    # Drain so the reader never blocks on a full queue.
                    while q.get() is not None:
                        pass
                    return
                with self.lock:
                    self.bytes[k] += len(data)
        finally:
            done.wait()

    def cut(self) -> int:
        """Shut down both sockets of every live connection; returns how many."""
        with self.lock:
            live = list(self.live.values())
            self.live.clear()
            self.cuts += 1
        for c, s in live:
            self._kill(c, s)
        return len(live)

    def n_live(self) -> int:
        with self.lock:
            return len(self.live)

    def stop(self) -> None:
        self.stopping = True
        try:
            socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
        except OSError:
            pass
        self.listener.close()
        self.thread.join(timeout=5)
        self.cut()

    def total_bytes(self) -> int:
        """Bytes forwarded so far, both directions."""
        with self.lock:
            return self.bytes[0] + self.bytes[1]

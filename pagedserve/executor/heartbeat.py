"""Worker liveness across hosts: each worker keeps a TCP connection to the engine core and writes
a byte every HEARTBEAT_INTERVAL_S.

A worker process that dies closes its connection (the kernel sends FIN or RST at once, also when a
whole node's processes are killed), and a node that vanishes without a word goes silent: the
engine core learns of the first at once and of the second after the silence timeout, where Ray
itself notices a dead node only after its health checks time out (tens of seconds by default).
"""

from __future__ import annotations

import os
import selectors
import socket
import threading
import time

from pagedserve.executor.abstract import WorkerDiedError

HEARTBEAT_INTERVAL_S = 0.5
# Silence after which a worker counts as gone (PAGEDSERVE_WORKER_HEARTBEAT_TIMEOUT_S). A worker
# that dies closes its connection and is caught at once, so this only bounds how long a vanished
# host goes unnoticed. TRAP: a live worker starved of CPU falls silent too (4.1 s seen on a loaded
# 2-core machine), and a false death kills the engine: keep it well above scheduling stalls.
DEFAULT_HEARTBEAT_TIMEOUT_S = 15.0
_RANK_BYTES = 4


class HeartbeatMonitor:
    """The engine core's end: accepts one connection per worker rank and remembers when each
    last spoke. `check()` raises WorkerDiedError for a closed connection, and for silence
    longer than the timeout once `enforce_silence` is set (after start-up: loading a model may
    hold a worker's interpreter for a long time)."""

    def __init__(self, host: str, timeout_s: float | None = None) -> None:
        if timeout_s is None:
            timeout_s = float(
                os.environ.get("PAGEDSERVE_WORKER_HEARTBEAT_TIMEOUT_S", DEFAULT_HEARTBEAT_TIMEOUT_S)
            )
        self.timeout_s = timeout_s
        self.enforce_silence = False
        self._server = socket.create_server((host, 0))
        self.address = f"{host}:{self._server.getsockname()[1]}"
        self._last_beat: dict[int, float] = {}
        self._dead_reason: str | None = None
        self._closed = threading.Event()
        self._selector = selectors.DefaultSelector()
        self._selector.register(self._server, selectors.EVENT_READ, None)
        self._thread = threading.Thread(target=self._run, daemon=True, name="worker-heartbeats")
        self._thread.start()

    def _run(self) -> None:
        while not self._closed.is_set():
            for key, _ in self._selector.select(timeout=0.2):
                if key.data is None:
                    self._accept()
                    continue
                try:
                    data = key.fileobj.recv(4096)  # type: ignore[union-attr]
                except OSError:
                    data = b""
                if data:
                    self._last_beat[key.data] = time.monotonic()
                else:
                    self._selector.unregister(key.fileobj)
                    key.fileobj.close()  # type: ignore[union-attr]
                    if self._dead_reason is None and not self._closed.is_set():
                        self._dead_reason = (
                            f"worker rank {key.data} is gone (its heartbeat connection closed)"
                        )

    def _accept(self) -> None:
        conn, _ = self._server.accept()
        try:
            conn.settimeout(5.0)
            rank = int.from_bytes(_recv_exactly(conn, _RANK_BYTES), "little")
        except OSError:
            conn.close()  # a worker that died while connecting is caught by its missing result
            return
        conn.setblocking(False)
        self._last_beat[rank] = time.monotonic()
        self._selector.register(conn, selectors.EVENT_READ, rank)

    def check(self) -> None:
        if self._dead_reason is not None:
            raise WorkerDiedError(self._dead_reason)
        if not self.enforce_silence:
            return
        now = time.monotonic()
        for rank, last_beat in list(self._last_beat.items()):
            if now - last_beat > self.timeout_s:
                self._dead_reason = f"worker rank {rank} has been silent for {now - last_beat:.1f} s"
                raise WorkerDiedError(self._dead_reason)

    def close(self) -> None:
        self._closed.set()
        self._thread.join(timeout=2.0)
        for key in list(self._selector.get_map().values()):
            key.fileobj.close()  # type: ignore[union-attr]
        self._selector.close()


def _recv_exactly(conn: socket.socket, num_bytes: int) -> bytes:
    data = b""
    while len(data) < num_bytes:
        chunk = conn.recv(num_bytes - len(data))
        if not chunk:
            raise ConnectionError("heartbeat connection closed during its handshake")
        data += chunk
    return data


def start_heartbeat(address: str, rank: int) -> None:
    """The worker's end: a daemon thread that beats until the engine core goes away."""
    host, port = address.rsplit(":", 1)
    conn = socket.create_connection((host, int(port)), timeout=10.0)
    conn.sendall(rank.to_bytes(_RANK_BYTES, "little"))

    def beat() -> None:
        try:
            while True:
                conn.sendall(b".")
                time.sleep(HEARTBEAT_INTERVAL_S)
        except OSError:
            return  # the engine core is gone; Ray ends this actor with its owner

    threading.Thread(target=beat, daemon=True, name="heartbeat").start()

"""A loopback TCP proxy for the fault tests: it forwards 127.0.0.1:<port> to a local server
(PostgreSQL, Redis) and can be cut (every connection closed, new ones reset), hung (new ones
accepted and never answered) and restored, so an outage never touches the shared server."""

from __future__ import annotations

import contextlib
import socket
import struct
import threading
from types import TracebackType

FORWARD, CUT, HANG = "forward", "cut", "hang"


class Proxy:
    """Forwards until told otherwise."""

    def __init__(self, target_port: int) -> None:
        self.target = ("127.0.0.1", target_port)
        self._listener = socket.create_server(("127.0.0.1", 0), backlog=128)
        self.port: int = self._listener.getsockname()[1]
        self._mode = FORWARD
        self._open: set[socket.socket] = set()
        self._lock = threading.Lock()
        threading.Thread(target=self._accept, daemon=True).start()

    def url(self, url: str) -> str:
        """`url` (on the target's port) pointed at the proxy instead."""
        old = f"127.0.0.1:{self.target[1]}"
        assert old in url, url
        return url.replace(old, f"127.0.0.1:{self.port}", 1)

    def cut(self) -> None:
        """The server is gone: close every connection and reset new ones."""
        self._switch(CUT)

    def hang(self) -> None:
        """The server takes connections and never answers (a hung host): close every
        connection; new ones are accepted and left silent."""
        self._switch(HANG)

    def restore(self) -> None:
        """Forward again (silent connections of a hang are closed)."""
        self._switch(FORWARD)

    def close(self) -> None:
        self._listener.close()
        self._switch(CUT)

    def __enter__(self) -> Proxy:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def _switch(self, mode: str) -> None:
        with self._lock:
            self._mode, doomed = mode, list(self._open)
            self._open.clear()
        for sock in doomed:
            _drop(sock)

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:  # closed
                return
            with self._lock:
                mode = self._mode
                if mode == HANG:
                    self._open.add(client)
            if mode == CUT:
                _reset(client)
            elif mode == FORWARD:
                threading.Thread(target=self._forward, args=(client,), daemon=True).start()

    def _forward(self, client: socket.socket) -> None:
        try:
            upstream = socket.create_connection(self.target, timeout=5)
        except OSError:
            _reset(client)
            return
        upstream.settimeout(None)
        with self._lock:
            if self._mode != FORWARD:  # cut while connecting
                forwarding = False
            else:
                forwarding = True
                self._open |= {client, upstream}
        if not forwarding:
            _reset(client)
            _drop(upstream)
            return
        threading.Thread(target=self._pump, args=(upstream, client), daemon=True).start()
        self._pump(client, upstream)

    def _pump(self, source: socket.socket, sink: socket.socket) -> None:
        """Copy bytes one way until either side closes; then close both."""
        try:
            while data := source.recv(65536):
                sink.sendall(data)
        except OSError:
            pass
        with self._lock:
            self._open -= {source, sink}
        _drop(source)
        _drop(sink)


def _drop(sock: socket.socket) -> None:
    # shutdown() wakes a thread blocked in recv() on it; close() alone would not.
    with contextlib.suppress(OSError):
        sock.shutdown(socket.SHUT_RDWR)
    sock.close()


def _reset(sock: socket.socket) -> None:
    """Close with a TCP reset, as a host with nothing on the port answers."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()

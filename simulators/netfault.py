"""A TCP link a tester can cut: the dead zone between a device and its broker.

``FaultyLink`` listens on a local port and forwards every connection to the broker, byte
for byte (TLS passes through untouched: the device still talks to the real broker).
``cut(seconds)`` drops every open connection at once and refuses new ones until the time
is up, which is what a device walking into a lift or a tunnel sees: the socket dies
without a goodbye, and reconnects fail until coverage returns.

``corrupt(marker)`` flips one bit in the next bytes the device sends that contain
``marker``: damage on the way that TCP's checksum missed. Only plain TCP lets it through
(TLS refuses the altered record and drops the connection), so it is how a tester shows
what the gateway does with a chunk whose bytes no longer match their own sha256.
"""

from __future__ import annotations

import contextlib
import select
import socket
import threading
import time

TAIL = 256  # bytes of the device's stream kept to find a marker split across reads


class FaultyLink:
    def __init__(self, target: tuple[str, int], host: str = "127.0.0.1") -> None:
        self.target = target
        self._server = socket.create_server((host, 0))
        self._server.settimeout(0.2)
        self.port = int(self._server.getsockname()[1])
        self._down_until = 0.0
        self._conns: set[socket.socket] = set()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self.cuts = 0
        self.corrupted = 0
        self._marker = b""
        self._thread = threading.Thread(target=self._accept, name="faulty-link", daemon=True)
        self._thread.start()

    @property
    def down(self) -> bool:
        return time.monotonic() < self._down_until

    def cut(self, seconds: float) -> None:
        """Drop every connection now; refuse new ones for ``seconds``."""
        self._down_until = time.monotonic() + seconds
        self.cuts += 1
        with self._lock:
            conns, self._conns = self._conns, set()
        for s in conns:
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)
            s.close()

    def corrupt(self, marker: bytes) -> None:
        """Flip the low bit of the last byte of ``marker`` where the device next sends it."""
        if not 0 < len(marker) <= TAIL:
            raise ValueError(f"corrupt needs a marker of 1 to {TAIL} bytes to look for")
        with self._lock:
            self._marker = marker

    def _damage(self, data: bytes, tail: bytes) -> bytes:
        """``data`` with the armed marker's last byte flipped, if it ends in ``data``."""
        with self._lock:
            marker = self._marker
            if not marker:
                return data
            # Only a marker that ends in ``data``: one wholly in ``tail`` has already gone.
            at = (tail + data).find(marker, max(0, len(tail) - len(marker) + 1))
            if at < 0:
                return data
            self._marker = b""
            self.corrupted += 1
        pos = at + len(marker) - 1 - len(tail)
        damaged = bytearray(data)
        damaged[pos] ^= 0x01
        return bytes(damaged)

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                client, _ = self._server.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            if self.down:
                client.close()
                continue
            try:
                upstream = socket.create_connection(self.target, timeout=5)
            except OSError:
                client.close()
                continue
            with self._lock:
                self._conns.update((client, upstream))
            threading.Thread(target=self._pump, args=(client, upstream), daemon=True).start()

    def _pump(self, a: socket.socket, b: socket.socket) -> None:
        """Forward both ways; ``a`` is the device's side, ``b`` the broker's."""
        peers = {a: b, b: a}
        tail = b""  # the device's last bytes, so a marker split across reads is found
        try:
            while not self._stop.is_set():
                readable, _, _ = select.select([a, b], [], [], 0.5)
                for s in readable:
                    data = s.recv(65536)
                    if not data:
                        return
                    if s is a:
                        data = self._damage(data, tail)
                        tail = (tail + data)[-TAIL:]
                    peers[s].sendall(data)
        except (OSError, ValueError):
            return
        finally:
            with self._lock:
                self._conns.discard(a)
                self._conns.discard(b)
            for s in (a, b):
                with contextlib.suppress(OSError):
                    s.close()

    def close(self) -> None:
        self._stop.set()
        self._server.close()
        self.cut(0)

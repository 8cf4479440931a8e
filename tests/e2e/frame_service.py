"""A TCP service speaking the gobase test codec (docs/backends.md: `msgid u32 LE · len u32 LE ·
body`), for the end-to-end tests of backend groups, the gate proxy and the plugin bindings: each
test subclasses it and answers frames in `on_frame`."""

from __future__ import annotations

import socket
import struct
import threading


def frame(msgid: int, body: bytes) -> bytes:
    """One frame of the gobase test codec."""
    return struct.pack("<II", msgid, len(body)) + body


class FrameService:
    """A service on 127.0.0.1:`port`: accepts connections, hands each whole frame to
    `on_frame(conn, msgid, body)`, and counts the connections it accepted and those the peer
    (warren) closed."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.accepted = 0
        self.closed = 0
        self.conns: list[socket.socket] = []
        self._lock = threading.Lock()
        self._sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._sock.bind(("127.0.0.1", port))
        self._sock.listen()
        threading.Thread(target=self._accept, daemon=True).start()

    def on_frame(self, conn: socket.socket, msgid: int, body: bytes) -> None:
        """Called on the connection's thread for each frame received."""

    def send(self, conn: socket.socket, msgid: int, body: bytes) -> None:
        """Write one frame (frames from several threads do not interleave)."""
        with self._lock:
            conn.sendall(frame(msgid, body))

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self._sock.accept()
            except OSError:
                return
            with self._lock:
                self.accepted += 1
                self.conns.append(conn)
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        buf = b""
        while True:
            try:
                data = conn.recv(65536)
            except OSError:
                return
            if not data:
                with self._lock:
                    self.closed += 1
                return
            buf += data
            while len(buf) >= 8:
                msgid, length = struct.unpack_from("<II", buf)
                if len(buf) < 8 + length:
                    break
                body, buf = buf[8 : 8 + length], buf[8 + length :]
                self.on_frame(conn, msgid, body)

    def stop(self) -> None:
        """Close the listener and every connection."""
        try:
            # wakes the thread blocked in accept(), which would otherwise keep the port bound
            self._sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self._sock.close()
        with self._lock:
            for c in self.conns:
                try:
                    c.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
                c.close()
            self.conns.clear()

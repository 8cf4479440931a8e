"""Backend groups from the config (docs/backends.md), against the real binary.

A `[[backend]]` table makes `warren serve` keep connections to the services it lists: a service
that is up is dialled and logged as connected, one that goes away is logged as disconnected and
dialled again every second until it is back, and one that never answers does not stop the rest.
`warren check-config` names the mistakes of a table. The services here are small TCP servers
speaking the gobase test codec (`msgid u32 LE · len u32 LE · body`).
"""

from __future__ import annotations

import socket
import struct
import subprocess
import threading
from pathlib import Path

from conftest import REPO_ROOT, Warren, free_port, wait_until, warren_bin


class GobaseService:
    """A TCP service on 127.0.0.1:`port` that answers the sample heartbeat (msgid 1 → msgid 2)
    and counts the connections it accepted."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.accepted = 0
        self.frames: list[tuple[int, bytes]] = []
        self._conns: list[socket.socket] = []
        self._lock = threading.Lock()
        self._sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._sock.bind(("127.0.0.1", port))
        self._sock.listen()
        self._stopped = False
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self._sock.accept()
            except OSError:
                return
            with self._lock:
                self.accepted += 1
                self._conns.append(conn)
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        buf = b""
        while True:
            try:
                data = conn.recv(65536)
            except OSError:
                return
            if not data:
                return
            buf += data
            while len(buf) >= 8:
                msgid, length = struct.unpack_from("<II", buf)
                if len(buf) < 8 + length:
                    break
                body, buf = buf[8 : 8 + length], buf[8 + length :]
                with self._lock:
                    self.frames.append((msgid, body))
                if msgid == 1:
                    conn.sendall(struct.pack("<II", 2, 11) + b"heatrespmsg")

    def stop(self) -> None:
        """Close the listener and every connection."""
        try:
            # wakes the thread blocked in accept(), which would otherwise keep the port bound
            self._sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self._sock.close()
        with self._lock:
            for c in self._conns:
                try:
                    c.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
                c.close()
            self._conns.clear()


def config(tmp_path: Path, services: list[tuple[str, int]]) -> Path:
    lines = ["[[backend]]", 'group = "Gate"', "dial_timeout_s = 2", "services = ["]
    for sid, port in services:
        lines.append(f'  {{ serviceid = "{sid}", serviceaddr = "127.0.0.1", serviceport = {port} }},')
    lines.append("]")
    path = tmp_path / "backends.toml"
    path.write_text("\n".join(lines) + "\n")
    return path


def test_a_configured_group_is_kept_connected(tmp_path: Path):
    port = free_port()
    service = GobaseService(port)
    dead = free_port()  # nothing listens there
    cfg = config(tmp_path, [("Gate1", port), ("gate2", dead)])
    w = Warren("--config", str(cfg), listen=[Warren.url("mqtt+mqant")], http=False).wait_ready()
    try:
        wait_until(lambda: service.accepted == 1, timeout=10, msg="warren dials the service")
        wait_until(
            lambda: "backend connected" in w.log() and "gate1" in w.log(),
            timeout=10,
            msg="the connect is logged",
        )

        service.stop()
        wait_until(lambda: "backend disconnected" in w.log(), timeout=10, msg="the disconnect is logged")

        # back on the same port: dialled again
        again = GobaseService(port)
        wait_until(lambda: again.accepted == 1, timeout=10, msg="warren dials again")
        wait_until(lambda: w.log().count("backend connected") >= 2, timeout=10, msg="the reconnect is logged")
        assert w.running()
        assert w.terminate() == 0
        again.stop()
    finally:
        w.kill()
        service.stop()


def test_check_config_names_the_mistakes_of_a_backend_table(tmp_path: Path):
    path = tmp_path / "bad.toml"
    path.write_text(
        "\n".join(
            [
                "[[backend]]",
                'group = "gate"',
                "services = [",
                '  { serviceid = "a", serviceaddr = "127.0.0.1", serviceport = 0 },',
                '  { servicename = "game", serviceid = "A", serviceaddr = "127.0.0.1", serviceport = 7001 },',
                "]",
                "",
            ]
        )
    )
    r = subprocess.run(
        [str(warren_bin()), "check-config", str(path)],
        cwd=REPO_ROOT,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=20,
    )
    assert r.returncode != 0, r.stdout + r.stderr
    out = r.stdout + r.stderr
    for key in [
        "backend[0].services[0].serviceport",
        "backend[0].services[1].servicename",
        "backend[0].services[1].serviceid",
    ]:
        assert key in out, out

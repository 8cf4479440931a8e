"""What the abuse tests share: a canary client that must keep being served while an attack runs,
and readings of the server's memory and log.
"""

from __future__ import annotations

import json
import re
import socket
import threading
import time
from pathlib import Path

from conftest import Warren
from rawmqtt import RawClient, parse_publish, publish_packet

CONNACK_OK = b"\x20\x02\x00\x00"
ANSI = re.compile(r"\x1b\[[0-9;]*m")


def rss_kib(pid: int) -> int:
    """The process's resident memory (VmRSS) in KiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS in /proc status")


def read_until_closed(s: socket.socket, timeout: float = 5) -> bytes:
    """Everything the server sends until it closes (fails if it stays open past `timeout`)."""
    got = b""
    deadline = time.monotonic() + timeout
    while True:
        s.settimeout(max(0.01, deadline - time.monotonic()))
        try:
            chunk = s.recv(4096)
        except ConnectionResetError:
            return got
        except socket.timeout:
            raise AssertionError(f"connection still open after {timeout} s (received {got!r})") from None
        if not chunk:
            return got
        got += chunk


def log_lines(w: Warren) -> list[str]:
    """The server's log, one entry per line, without colour codes."""
    return [ANSI.sub("", line) for line in w.log().splitlines()]


def logged(w: Warren, *words: str) -> list[str]:
    """The log lines that contain every one of `words`."""
    return [line for line in log_lines(w) if all(word in line for word in words)]


class Canary(threading.Thread):
    """A client doing Echo/HD_Echo request/reply every 100 ms over raw MQTT; records every miss."""

    def __init__(self, port: int, client_id: str = "canary") -> None:
        super().__init__(daemon=True)
        self.c = RawClient(port)
        assert self.c.connect(client_id) == CONNACK_OK
        self.stop = threading.Event()
        self.ok = 0
        self.failures: list[str] = []

    def run(self) -> None:
        n = 0
        while not self.stop.is_set():
            n += 1
            topic = f"Echo/HD_Echo/{n}"
            try:
                self.c.send(publish_packet(topic, json.dumps({"n": n}).encode()))
                while True:
                    first, body = self.c.recv_packet(timeout=3)
                    if first >> 4 == 3 and parse_publish(first, body)[0] == topic:
                        reply = json.loads(parse_publish(first, body)[3])
                        assert reply == {"Error": "", "Result": {"n": n}}, reply
                        break
                self.ok += 1
            except Exception as e:  # noqa: BLE001 - any miss is a failure of the server
                self.failures.append(f"request {n}: {e!r}")
                return
            self.stop.wait(0.1)

    def finish(self) -> None:
        """Stop; every request made must have been answered."""
        self.stop.set()
        self.join(10)
        self.c.close()
        assert not self.failures, f"the canary was not served: {self.failures}"
        assert self.ok > 0

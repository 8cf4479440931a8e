"""A raw-socket MQTT speaker for byte-exact protocol tests.

paho and other real clients hide the wire: they fix packet ids, retry, and
refuse to send malformed packets.  The protocol-vector and bad-input tests
need to send exact bytes (including broken ones) and read back exact bytes,
so this module speaks MQTT 3.1/3.1.1 by hand over a plain TCP socket.
"""

from __future__ import annotations

import socket
import struct
import time

__all__ = [
    "RawClient",
    "ClosedError",
    "remaining_length",
    "mqtt_str",
    "connect_packet",
    "publish_packet",
    "subscribe_packet",
    "unsubscribe_packet",
    "puback",
    "pubrec",
    "pubrel",
    "pubcomp",
    "PINGREQ",
    "DISCONNECT",
    "hexdump",
    "parse_publish",
]

PINGREQ = b"\xc0\x00"
DISCONNECT = b"\xe0\x00"


class ClosedError(ConnectionError):
    """The server closed the connection while bytes were still expected."""


def hexdump(data: bytes) -> str:
    """Space-separated hex, the notation of docs/protocols/mqtt.md, for assertion messages."""
    return " ".join(f"{b:02x}" for b in data)


def remaining_length(n: int) -> bytes:
    """Encode an MQTT variable-length 'remaining length' field."""
    if n < 0 or n > 268_435_455:
        raise ValueError(f"remaining length out of range: {n}")
    out = bytearray()
    while True:
        byte = n % 128
        n //= 128
        if n:
            byte |= 0x80
        out.append(byte)
        if not n:
            return bytes(out)


def mqtt_str(s: str | bytes) -> bytes:
    """A 2-byte big-endian length followed by the (UTF-8) bytes."""
    b = s.encode() if isinstance(s, str) else s
    return struct.pack(">H", len(b)) + b


def _packet(first: int, body: bytes) -> bytes:
    return bytes([first]) + remaining_length(len(body)) + body


def connect_packet(
    client_id: str | bytes = "a",
    proto: str = "MQTT",
    level: int = 4,
    keepalive: int = 60,
    clean: bool = True,
    username: str | None = None,
    password: str | None = None,
) -> bytes:
    """A CONNECT packet; flags are derived from the optional fields."""
    flags = 0x02 if clean else 0
    payload = mqtt_str(client_id)
    if username is not None:
        flags |= 0x80
        payload += mqtt_str(username)
    if password is not None:
        flags |= 0x40
        payload += mqtt_str(password)
    body = mqtt_str(proto) + bytes([level, flags]) + struct.pack(">H", keepalive) + payload
    return _packet(0x10, body)


def publish_packet(
    topic: str | bytes,
    payload: bytes | str = b"",
    qos: int = 0,
    pkid: int = 0,
    dup: bool = False,
    retain: bool = False,
) -> bytes:
    """A PUBLISH packet; `pkid` is written only for QoS 1 and 2."""
    if isinstance(payload, str):
        payload = payload.encode()
    first = 0x30 | (qos << 1) | (0x08 if dup else 0) | (0x01 if retain else 0)
    body = mqtt_str(topic)
    if qos > 0:
        body += struct.pack(">H", pkid)
    return _packet(first, body + payload)


def subscribe_packet(pkid: int, topics: list[tuple[str, int]]) -> bytes:
    """A SUBSCRIBE packet with (filter, requested QoS) pairs."""
    body = struct.pack(">H", pkid)
    for t, q in topics:
        body += mqtt_str(t) + bytes([q])
    return _packet(0x82, body)


def unsubscribe_packet(pkid: int, topics: list[str]) -> bytes:
    """An UNSUBSCRIBE packet."""
    body = struct.pack(">H", pkid)
    for t in topics:
        body += mqtt_str(t)
    return _packet(0xA2, body)


def puback(pkid: int) -> bytes:
    """PUBACK for `pkid`."""
    return b"\x40\x02" + struct.pack(">H", pkid)


def pubrec(pkid: int) -> bytes:
    """PUBREC for `pkid`."""
    return b"\x50\x02" + struct.pack(">H", pkid)


def pubrel(pkid: int) -> bytes:
    """PUBREL for `pkid` (flags 0b0010 as the spec requires)."""
    return b"\x62\x02" + struct.pack(">H", pkid)


def pubcomp(pkid: int) -> bytes:
    """PUBCOMP for `pkid`."""
    return b"\x70\x02" + struct.pack(">H", pkid)


def parse_publish(first: int, body: bytes) -> tuple[str, int, int | None, bytes]:
    """Split a PUBLISH body into (topic, qos, pkid or None, payload)."""
    if first >> 4 != 3:
        raise ValueError(f"not a PUBLISH: first byte {first:02x}")
    qos = (first >> 1) & 3
    (tlen,) = struct.unpack(">H", body[:2])
    topic = body[2 : 2 + tlen].decode()
    rest = body[2 + tlen :]
    pkid = None
    if qos:
        (pkid,) = struct.unpack(">H", rest[:2])
        rest = rest[2:]
    return topic, qos, pkid, rest


class RawClient:
    """One TCP connection to a warren MQTT listener, driven byte by byte.

    Reads go through an internal buffer so `recv_exact`, `recv_packet` and
    `expect` can be mixed freely.  Every read takes a timeout; a timeout
    raises `TimeoutError`, an EOF/reset while bytes are expected raises
    `ClosedError`.
    """

    def __init__(
        self,
        port: int,
        host: str = "127.0.0.1",
        timeout: float = 5.0,
        rcvbuf: int | None = None,
    ) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        if rcvbuf is not None:
            # Must be set before connect so the advertised window is small.
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        self.sock.settimeout(timeout)
        self.sock.connect((host, port))
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.buf = bytearray()
        self.eof = False
        self.discarded = b""

    # -- identity -------------------------------------------------------
    @property
    def local_addr(self) -> str:
        """`ip:port` of our end, i.e. the peer address warren logs."""
        host, port = self.sock.getsockname()[:2]
        return f"{host}:{port}"

    # -- writing --------------------------------------------------------
    def send(self, data: bytes) -> None:
        """Write all of `data`."""
        self.sock.sendall(data)

    # -- reading --------------------------------------------------------
    def _fill(self, deadline: float) -> bool:
        """Read one chunk into the buffer. False on EOF/reset."""
        if self.eof:
            return False
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError("timed out waiting for bytes")
        self.sock.settimeout(remaining)
        try:
            chunk = self.sock.recv(65536)
        except socket.timeout as e:
            raise TimeoutError("timed out waiting for bytes") from e
        except (ConnectionResetError, ConnectionAbortedError, BrokenPipeError):
            self.eof = True
            return False
        if not chunk:
            self.eof = True
            return False
        self.buf += chunk
        return True

    def recv_exact(self, n: int, timeout: float = 5.0) -> bytes:
        """Exactly `n` bytes, or TimeoutError / ClosedError."""
        deadline = time.monotonic() + timeout
        while len(self.buf) < n:
            if not self._fill(deadline):
                got = bytes(self.buf)
                raise ClosedError(
                    f"connection closed after {len(got)} of {n} bytes: {hexdump(got)}"
                )
        out = bytes(self.buf[:n])
        del self.buf[:n]
        return out

    def recv_packet(self, timeout: float = 5.0) -> tuple[int, bytes]:
        """One whole packet as (first byte, body) using the remaining length."""
        deadline = time.monotonic() + timeout

        def left() -> float:
            return max(0.001, deadline - time.monotonic())

        first = self.recv_exact(1, left())[0]
        mult, length = 1, 0
        for _ in range(4):
            b = self.recv_exact(1, left())[0]
            length += (b & 0x7F) * mult
            mult *= 128
            if not b & 0x80:
                break
        else:
            raise ValueError("malformed remaining length from server")
        return first, self.recv_exact(length, left())

    def recv_raw_packet(self, timeout: float = 5.0) -> bytes:
        """One whole packet as its exact wire bytes."""
        first, body = self.recv_packet(timeout)
        return bytes([first]) + remaining_length(len(body)) + body

    def expect(self, data: bytes, timeout: float = 5.0) -> None:
        """Assert the next bytes on the wire are exactly `data`."""
        try:
            got = self.recv_exact(len(data), timeout)
        except ClosedError as e:
            raise AssertionError(f"expected {hexdump(data)}; {e}") from e
        except TimeoutError as e:
            partial = bytes(self.buf)
            raise AssertionError(
                f"expected {hexdump(data)}; timed out with {hexdump(partial)!r} buffered"
            ) from e
        assert got == data, f"\nexpected {hexdump(data)}\n     got {hexdump(got)}"

    def quiet(self, timeout: float = 0.5) -> bool:
        """True when no byte arrives and the socket stays open for `timeout`."""
        if self.buf or self.eof:
            return False
        try:
            self._fill(time.monotonic() + timeout)
        except TimeoutError:
            return True
        return False  # bytes arrived, or the server closed

    def closed(self, timeout: float = 5.0) -> bool:
        """True when the server closes (EOF or reset) within `timeout`.

        Bytes that arrive meanwhile are read and discarded (the first 64 KiB
        are kept in `self.discarded` for assertions and diagnostics), so a
        server that flushes some data before closing still counts as closed.
        """
        deadline = time.monotonic() + timeout
        self.discarded = bytes(self.buf[:65536])
        self.buf.clear()
        while True:
            try:
                if not self._fill(deadline):
                    return True
            except TimeoutError:
                return False
            if len(self.discarded) < 65536:
                self.discarded += bytes(self.buf[: 65536 - len(self.discarded)])
            self.buf.clear()

    def connect(
        self,
        client_id: str | bytes = "a",
        proto: str = "MQTT",
        level: int = 4,
        keepalive: int = 60,
        timeout: float = 5.0,
        **kw,
    ) -> bytes:
        """Send CONNECT and return the 4 CONNACK bytes."""
        self.send(connect_packet(client_id, proto, level, keepalive, **kw))
        return self.recv_exact(4, timeout)

    def close(self) -> None:
        """Close our end (idempotent)."""
        try:
            self.sock.close()
        except OSError:
            pass

    def __enter__(self) -> "RawClient":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def connected(port: int, client_id: str, clean: bool, expect: bytes | None = None) -> RawClient:
    """A raw client connected with this client id and clean-session flag; the CONNACK is
    `expect`, or any accepting one."""
    c = RawClient(port)
    ack = c.connect(client_id, clean=clean)
    if expect is not None:
        assert ack == expect, f"CONNACK {ack.hex(' ')} for {client_id} clean={clean}"
    else:
        assert ack[:2] == b"\x20\x02" and ack[3] == 0, ack.hex(" ")
    return c


def granted(c: RawClient, topics: list[tuple[str, int]], pkid: int = 1) -> list[int]:
    """SUBSCRIBE and return the SUBACK's return codes."""
    c.send(subscribe_packet(pkid, topics))
    first, body = c.recv_packet()
    assert first == 0x90, f"expected SUBACK, got {first:02x}"
    assert struct.unpack(">H", body[:2])[0] == pkid
    return list(body[2:])


def sync(c: RawClient) -> list[tuple[int, bytes]]:
    """PINGREQ, then read until PINGRESP: everything the server sent before it (the server
    handles a connection's packets in order, so what was published before is routed)."""
    c.send(PINGREQ)
    seen = []
    while True:
        first, body = c.recv_packet()
        if first == 0xD0:
            return seen
        seen.append((first, body))

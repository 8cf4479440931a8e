"""The line protocol (docs/protocols/line.md) against a real warren, over raw sockets.

Inbound a message is `<length>[ tokens]\\r\\n<body>`; outbound every send is
`<length> \\r\\n<body>`. The default handler echoes (every vector of 5.3 except the plugin row);
`handler=router` turns a body `Module/Handler[/msgid] <json>` into a request, so a line client
can log in, join and chat with everybody else.
"""

from __future__ import annotations

import json
import socket
import time

import pytest

from conftest import Warren

ERROR = b"7 \r\nERROR\r\n"
WAIT_S = 5.0


class LineClient:
    """One TCP connection to a line listener, with exact reads and frame parsing."""

    def __init__(self, port: int) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=WAIT_S)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.buf = bytearray()
        self.eof = False

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def frame(self, body: bytes) -> None:
        """Send one message in the input framing."""
        self.send(str(len(body)).encode() + b"\r\n" + body)

    def _fill(self, deadline: float) -> bool:
        if self.eof:
            return False
        left = deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError
        self.sock.settimeout(left)
        try:
            chunk = self.sock.recv(65536)
        except TimeoutError:
            raise
        except OSError:
            chunk = b""
        if not chunk:
            self.eof = True
            return False
        self.buf += chunk
        return True

    def exact(self, n: int, timeout: float = WAIT_S) -> bytes:
        """Exactly `n` bytes; AssertionError on close or timeout."""
        deadline = time.monotonic() + timeout
        while len(self.buf) < n:
            try:
                if not self._fill(deadline):
                    raise AssertionError(f"closed after {bytes(self.buf)!r}, expected {n} bytes")
            except TimeoutError:
                raise AssertionError(f"timed out with {bytes(self.buf)!r}, expected {n} bytes") from None
        out = bytes(self.buf[:n])
        del self.buf[:n]
        return out

    def expect(self, data: bytes, timeout: float = WAIT_S) -> None:
        """The next bytes are exactly `data`."""
        got = self.exact(len(data), timeout)
        assert got == data, f"expected {data!r}, got {got!r}"

    def read_frame(self, timeout: float = WAIT_S) -> bytes:
        """One output frame `<len> \\r\\n<body>`; returns the body."""
        deadline = time.monotonic() + timeout
        while b"\r\n" not in self.buf:
            try:
                if not self._fill(deadline):
                    raise AssertionError(f"closed while reading a frame head: {bytes(self.buf)!r}")
            except TimeoutError:
                raise AssertionError(f"no frame within {timeout} s: {bytes(self.buf)!r}") from None
        head, _, _ = bytes(self.buf).partition(b"\r\n")
        assert head.endswith(b" "), f"head without the space before CRLF: {head!r}"
        n = int(head)
        del self.buf[: len(head) + 2]
        return self.exact(n, max(0.01, deadline - time.monotonic()))

    def quiet(self, within: float = 0.3) -> bool:
        """True when no byte arrives and the connection stays open for `within` s."""
        if self.buf or self.eof:
            return False
        try:
            self._fill(time.monotonic() + within)
        except TimeoutError:
            return True
        return False

    def closed(self, timeout: float = WAIT_S) -> bool:
        """True when the server closes within `timeout` (bytes meanwhile are kept in `buf`)."""
        deadline = time.monotonic() + timeout
        try:
            while self._fill(deadline):
                pass
        except TimeoutError:
            return False
        return True

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass


def line_server(**query: object) -> Warren:
    """A ready warren with one line listener (settings from `query`)."""
    return Warren(listen=[Warren.url("line", **query)], http=False).wait_ready()


@pytest.fixture
def echo():
    w = line_server()
    yield w
    w.kill()


def connect(w: Warren) -> LineClient:
    return LineClient(w.ports["line"])


# ---------------------------------------------------------------------------------------------
# 5.3 vectors (echo handler)
# ---------------------------------------------------------------------------------------------

VECTORS = [
    (b"5\r\nhello", b"5 \r\nhello"),
    (b"5\nhello", b"5 \r\nhello"),
    (b"11\r\nhello world", b"11 \r\nhello world"),
    (b"3 cmd key\r\nabc", b"3 \r\nabc"),
    (b"\r\n5\r\nhello", b"5 \r\nhello"),
    (b"2\r\nhi3\r\nabc", b"2 \r\nhi3 \r\nabc"),
    (b"0\r\n", b"0 \r\n"),
    (b"a b c d\r\n", ERROR),
    (b"abc\r\n", ERROR),
    (b"5abc\r\n", ERROR),
]


@pytest.mark.parametrize("sent,answer", VECTORS, ids=[repr(s) for s, _ in VECTORS])
def test_vector(echo, sent, answer):
    c = connect(echo)
    c.send(sent)
    c.expect(answer)
    assert c.quiet(), f"unexpected extra bytes {bytes(c.buf)!r}"
    # The connection goes on after each vector (errors included).
    c.send(b"2\r\nok")
    c.expect(b"2 \r\nok")
    c.close()


def test_vector_bytes_as_written(echo):
    """The two hex rows of 5.3, byte for byte."""
    assert b"5 \r\nhello" == bytes.fromhex("35 20 0d 0a 68 65 6c 6c 6f")
    assert ERROR == bytes.fromhex("37 20 0d 0a 45 52 52 4f 52 0d 0a")


def test_telnet_style_two_sends(echo):
    c = connect(echo)
    c.send(b"5\r\n")
    assert c.quiet(0.2), "a head alone must not dispatch"
    c.send(b"hello\r\n")
    c.expect(b"5 \r\nhello")
    # The trailing CRLF typed in telnet is a blank head: skipped, no "0 \r\n".
    assert c.quiet(0.5), f"extra bytes after the echo: {bytes(c.buf)!r}"
    c.close()


def test_every_split_of_a_message(echo):
    """One message cut at every byte boundary still echoes once."""
    msg = b"3 cmd key\r\nabc"
    c = connect(echo)
    for cut in range(1, len(msg)):
        c.send(msg[:cut])
        time.sleep(0.01)
        c.send(msg[cut:])
        c.expect(b"3 \r\nabc")
    assert c.quiet()
    c.close()


def test_bodies_are_binary_safe(echo):
    body = bytes(range(256)) + b"\r\n5\r\nhello\x00"
    c = connect(echo)
    c.frame(body)
    c.expect(str(len(body)).encode() + b" \r\n" + body)
    c.close()


def test_many_messages_in_one_write(echo):
    c = connect(echo)
    bodies = [f"m{i}".encode() * (i + 1) for i in range(50)]
    c.send(b"".join(str(len(b)).encode() + b"\r\n" + b for b in bodies))
    for b in bodies:
        assert c.read_frame() == b
    c.close()


def test_body_longer_than_max_body_is_a_bad_head(echo):
    c = connect(echo)
    c.send(b"65537\r\n")
    c.expect(ERROR)
    c.send(b"65536\r\n" + b"x" * 65536)
    assert c.read_frame() == b"x" * 65536
    c.close()


# ---------------------------------------------------------------------------------------------
# Limits: bad heads in a row, long heads
# ---------------------------------------------------------------------------------------------


def test_close_after_max_bad_heads_in_a_row(echo):
    c = connect(echo)
    # Seven bad heads, a good message (which resets the count), seven more: still open.
    c.send(b"abc\r\n" * 7)
    for _ in range(7):
        c.expect(ERROR)
    c.send(b"2\r\nok")
    c.expect(b"2 \r\nok")
    c.send(b"x y z w\r\n" * 7)
    for _ in range(7):
        c.expect(ERROR)
    assert c.quiet(), "closed before the 8th bad head in a row"
    # The eighth in a row: ERROR, then close.
    c.send(b"nope\r\n")
    c.expect(ERROR)
    assert c.closed(), "still open after max_bad_heads (8) bad heads in a row"
    c.close()


def test_max_bad_heads_setting():
    w = line_server(max_bad_heads=2)
    other = connect(w)
    c = connect(w)
    c.send(b"abc\r\ndef\r\n")
    c.expect(ERROR + ERROR)
    assert c.closed()
    c.close()
    other.send(b"5\r\nalive")
    other.expect(b"5 \r\nalive")
    other.close()
    w.kill()


@pytest.mark.parametrize("head", [b"1" * 65, b"9" * 100 + b"\r\n", b"5" + b" " * 70 + b"\r\nhello"])
def test_head_too_long_errors_and_closes(echo, head):
    other = connect(echo)
    c = connect(echo)
    c.send(head)
    c.expect(ERROR)
    assert c.closed(), "still open after a head longer than max_head"
    assert c.buf == bytearray(), f"bytes after ERROR: {bytes(c.buf)!r}"
    c.close()
    other.send(b"3\r\nyes")
    other.expect(b"3 \r\nyes")
    other.close()


def test_max_head_setting():
    w = line_server(max_head=8)
    c = connect(w)
    c.send(b"5 abcd\r\nhello")  # 6 bytes: fine
    c.expect(b"5 \r\nhello")
    c.send(b"5 abcdefgh\r\nhello")  # 10 bytes: too long
    c.expect(ERROR)
    assert c.closed()
    c.close()
    w.kill()


def test_no_space_before_crlf_setting():
    w = line_server(space_before_crlf="false")
    c = connect(w)
    c.send(b"5\r\nhello0\r\n")
    c.expect(b"5\r\nhello0\r\n")
    c.send(b"oops\r\n")
    c.expect(b"7\r\nERROR\r\n")
    c.close()
    w.kill()


def test_connections_are_independent(echo):
    a, b = connect(echo), connect(echo)
    a.send(b"5\r\nhel")
    b.send(b"3\r\nbbb")
    b.expect(b"3 \r\nbbb")
    a.send(b"lo")
    a.expect(b"5 \r\nhello")
    assert b.quiet()
    a.close()
    b.close()


# ---------------------------------------------------------------------------------------------
# handler=router: the chat demo from a line client
# ---------------------------------------------------------------------------------------------


def topic_and_json(body: bytes) -> tuple[str, object]:
    topic, _, rest = body.partition(b" ")
    return topic.decode(), json.loads(rest)


@pytest.fixture
def router():
    w = line_server(handler="router")
    yield w
    w.kill()


def test_router_login_join_say(router):
    carol, dave = connect(router), connect(router)

    carol.frame(b'Login/HD_Login/1 {"userName":"carol","passWord":"x"}')
    assert carol.read_frame() == b'Login/HD_Login/1 {"Error":"","Result":"login success carol"}'
    dave.frame(b'Login/HD_Login/1 {"userName":"dave","passWord":"x"}')
    assert dave.read_frame() == b'Login/HD_Login/1 {"Error":"","Result":"login success dave"}'

    carol.frame(b'Chat/HD_JoinChat/2 {"roomName":"mqant"}')
    assert carol.read_frame() == b'Chat/HD_JoinChat/2 {"Error":"","Result":{"users":["carol"]}}'
    dave.frame(b'Chat/HD_JoinChat/2 {"roomName":"mqant"}')
    assert dave.read_frame() == b'Chat/HD_JoinChat/2 {"Error":"","Result":{"users":["carol","dave"]}}'
    assert carol.read_frame() == b'Chat/OnJoin {"roomName":"mqant","user":"dave"}'

    carol.frame(b'Chat/HD_Say/3 {"roomName":"mqant","from":"carol","target":"*","content":"hi"}')
    onchat = b'Chat/OnChat {"from":"carol","msg":"hi","roomName":"mqant","target":"*"}'
    # A handler's push to its own session comes before its reply.
    assert carol.read_frame() == onchat
    assert carol.read_frame() == b'Chat/HD_Say/3 {"Error":"","Result":"say success"}'
    assert dave.read_frame() == onchat

    # No msgid: the handler runs, no reply comes back (only the push).
    dave.frame(b'Chat/HD_Say {"roomName":"mqant","target":"carol","content":"psst"}')
    assert carol.read_frame() == b'Chat/OnChat {"from":"dave","msg":"psst","roomName":"mqant","target":"carol"}'
    assert dave.quiet()

    # Departure.
    dave.close()
    assert carol.read_frame() == b'Chat/OnLeave {"roomName":"mqant","user":"dave"}'
    carol.close()


def test_router_errors(router):
    c = connect(router)
    c.frame(b'Chat/HD_JoinChat/1 {"roomName":"r"}')
    assert c.read_frame() == b'Chat/HD_JoinChat/1 {"Error":"Not Logined","Result":null}'
    c.frame(b'Nope/HD_X/2 {}')
    topic, reply = topic_and_json(c.read_frame())
    assert topic == "Nope/HD_X/2"
    assert reply["Result"] is None and reply["Error"] != ""
    c.frame(b'Login/HD_Login/3 {"userName":"err","passWord":"x"}')
    assert c.read_frame() == b'Login/HD_Login/3 {"Error":"","Result":"login success err"}'
    c.frame(b'Chat/HD_Say/4 {"roomName":"nowhere","content":"x"}')
    assert c.read_frame() == b'Chat/HD_Say/4 {"Error":"No room","Result":null}'
    # Framing errors still answer ERROR in router mode.
    c.send(b"abc\r\n")
    c.expect(ERROR)
    c.frame(b'Login/HD_Login/5 {"userName":"err","passWord":"x"}')
    assert c.read_frame() == b'Login/HD_Login/5 {"Error":"","Result":"login success err"}'
    c.close()

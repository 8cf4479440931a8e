"""JSON over WebSocket (docs/protocols/json-ws.md) against a real warren, with websocket-client.

Covers upstream's sample client exchange byte for byte, the demo functions `test` and
`phaserLogin` of module `global`, calls into the chat demo modules with their pushes, the error
reply, silence when `cb` is empty, and the close codes for a missing login (1008) and a frame
that is not JSON (1007), each of which leaves other connections alone.
"""

from __future__ import annotations

import json
import socket
import time
from typing import Any

import pytest
import websocket
from websocket import ABNF

from conftest import Warren

WAIT_S = 5.0


class Closed(Exception):
    """The server closed the connection; `code` is the close code (None without a close frame)."""

    def __init__(self, code: int | None) -> None:
        super().__init__(f"connection closed (code {code})")
        self.code = code


class JsonWs:
    """One JSON-over-WebSocket connection: send `{"tpc","func","cb","args"}`, read text frames.

    Frames that a `wait` skips (pushes while waiting for a reply, for instance) are kept in
    `backlog` and looked at first by the next `wait`.
    """

    def __init__(self, port: int, path: str = "/") -> None:
        self.ws = websocket.create_connection(f"ws://127.0.0.1:{port}{path}", timeout=WAIT_S)
        self.backlog: list[str] = []

    # ---- sending ----------------------------------------------------------------------------

    def send_text(self, text: str) -> None:
        """Send one text frame verbatim."""
        self.ws.send(text)

    def send(self, tpc: str, func: str, args: list[Any], cb: str = "") -> None:
        """Send a call in the sample client's key order."""
        self.send_text(json.dumps({"tpc": tpc, "func": func, "args": args, "cb": cb}, separators=(",", ":")))

    def login(self, guid: str, md5: str = "md5") -> str:
        """The mandatory first message; returns the server's reply text."""
        msg = {"tpc": "login", "func": "login", "args": [guid, md5], "cb": ""}
        self.send_text(json.dumps(msg, separators=(",", ":")))
        return self.recv_text()

    # ---- receiving --------------------------------------------------------------------------

    def recv_text(self, timeout: float = WAIT_S) -> str:
        """The next frame, which must be a text frame (warren always replies with text)."""
        if self.backlog:
            return self.backlog.pop(0)
        return self._read(timeout)

    def _read(self, timeout: float) -> str:
        self.ws.settimeout(timeout)
        try:
            opcode, data = self.ws.recv_data()
        except websocket.WebSocketConnectionClosedException:
            raise Closed(None) from None
        except (ConnectionResetError, BrokenPipeError):
            raise Closed(None) from None
        if opcode == ABNF.OPCODE_CLOSE:
            raise Closed(close_code(data))
        assert opcode == ABNF.OPCODE_TEXT, f"expected a text frame, got opcode {opcode}: {data!r}"
        return data.decode() if isinstance(data, bytes) else data

    def wait(self, pred, what: str, timeout: float = WAIT_S) -> dict:
        """The first message (parsed) satisfying `pred`, from the backlog or the wire."""
        for i, text in enumerate(self.backlog):
            msg = json.loads(text)
            if pred(msg):
                del self.backlog[i]
                return msg
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"no {what} within {timeout} s; unread: {self.backlog}")
            try:
                text = self._read(left)
            except websocket.WebSocketTimeoutException:
                raise AssertionError(f"no {what} within {timeout} s; unread: {self.backlog}") from None
            msg = json.loads(text)
            if pred(msg):
                return msg
            self.backlog.append(text)

    def reply(self, cb: str) -> dict:
        """The reply to callback name `cb`."""
        return self.wait(lambda m: m.get("func") == cb and m.get("tpc") == "", f"reply {cb!r}")

    def push(self, tpc: str, func: str) -> dict:
        """The next push `tpc`/`func`."""
        return self.wait(lambda m: m.get("tpc") == tpc and m.get("func") == func, f"push {tpc}/{func}")

    def call(self, tpc: str, func: str, args: list[Any], cb: str) -> dict:
        """Send a call and return its reply."""
        self.send(tpc, func, args, cb)
        return self.reply(cb)

    def quiet(self, within: float = 0.3) -> bool:
        """True when nothing arrives (and nothing is left unread) for `within` s."""
        if self.backlog:
            return False
        try:
            self.backlog.append(self._read(within))
        except websocket.WebSocketTimeoutException:
            return True
        return False

    def closed_with(self, timeout: float = WAIT_S) -> int | None:
        """Read until the server closes; return the close code. Fails if a data frame comes first."""
        try:
            text = self.recv_text(timeout)
        except Closed as e:
            return e.code
        except websocket.WebSocketTimeoutException:
            raise AssertionError(f"connection still open after {timeout} s") from None
        raise AssertionError(f"expected a close, got a frame: {text}")

    def close(self) -> None:
        try:
            self.ws.close(timeout=1)
        except (OSError, websocket.WebSocketException):
            pass


def close_code(frame: Any) -> int | None:
    """The status code of a close frame (None when the frame carries none)."""
    data = getattr(frame, "data", frame) or b""
    if len(data) < 2:
        return None
    return int.from_bytes(data[:2], "big")


@pytest.fixture
def server():
    """A ready warren with one JSON-over-WebSocket listener (the demo modules run too)."""
    w = Warren(listen=["json+ws://127.0.0.1:{port}"], http=False).wait_ready()
    yield w
    w.kill()


@pytest.fixture
def port(server) -> int:
    return server.ports["json+ws"]


def opened(port: int, guid: str | None = None) -> JsonWs:
    """A connection, logged in as `guid` when given."""
    c = JsonWs(port)
    if guid is not None:
        assert c.login(guid) == '{"tpc":"","func":"loginback","cb":"","args":[0]}'
    return c


# ---------------------------------------------------------------------------------------------
# The sample client (docs/protocols/json-ws.md, "Sample client exchange")
# ---------------------------------------------------------------------------------------------


def test_sample_exchange_byte_for_byte(port):
    c = JsonWs(port)
    # 1: login
    c.send_text('{"tpc":"login","func":"login","args":["guid","md5"],"cb":""}')
    assert c.recv_text() == '{"tpc":"","func":"loginback","cb":"","args":[0]}'
    # 2-51: ten rounds of five `test` calls (sent without upstream's 1 s pauses)
    for _ in range(10):
        for _ in range(5):
            c.send_text('{"tpc":"unknown","func":"test","args":["arg1","arg2"],"cb":"callback"}')
        for _ in range(5):
            assert c.recv_text() == '{"tpc":"","func":"callback","cb":"","args":["arg1arg2"]}'
    assert c.quiet()
    # 52: close
    c.close()


def test_any_key_order_and_binary_frames_are_accepted(port):
    c = opened(port, "order")
    c.send_text('{"cb":"k","args":["a","b"],"func":"test","tpc":"unknown"}')
    assert c.recv_text() == '{"tpc":"","func":"k","cb":"","args":["ab"]}'
    # A binary frame carrying JSON is a call too; the reply is still a text frame.
    c.ws.send(b'{"tpc":"unknown","func":"test","args":["x","y"],"cb":"bin"}', opcode=ABNF.OPCODE_BINARY)
    assert c.recv_text() == '{"tpc":"","func":"bin","cb":"","args":["xy"]}'
    # Missing keys mean "" / []: no tpc still reaches module global.
    c.send_text('{"func":"test","args":["p","q"],"cb":"nt"}')
    assert c.recv_text() == '{"tpc":"","func":"nt","cb":"","args":["pq"]}'
    c.close()


def test_integers_stay_integers(port):
    c = opened(port, "ints")
    assert c.call("unknown", "test", [40, 2], "sum") == {"tpc": "", "func": "sum", "cb": "", "args": [42]}
    c.close()


def test_phaser_login_returns_the_guid(port):
    for guid in ("guid-1", "player-42"):
        c = opened(port, guid)
        reply = c.call("unknown", "phaserLogin", [], "p")
        assert reply == {"tpc": "", "func": "p", "cb": "", "args": [guid, "测试名称", 99]}
        c.close()


# ---------------------------------------------------------------------------------------------
# The chat demo over JSON-WS: module calls, one-object args as the body, pushes
# ---------------------------------------------------------------------------------------------


def test_chat_demo_calls_and_pushes(port):
    room = "jroom"
    alice = opened(port, "alice")
    bob = opened(port, "bob")
    # The login message bound the session: the demo's join works at once.
    assert alice.call("Chat", "HD_JoinChat", [{"roomName": room}], "j1") == {
        "tpc": "",
        "func": "j1",
        "cb": "",
        "args": [{"users": ["alice"]}],
    }
    assert bob.call("Chat", "HD_JoinChat", [{"roomName": room}], "j1")["args"] == [{"users": ["alice", "bob"]}]
    # Pushes: tpc = the topic up to its first `/`, func = the rest, args = [push body].
    assert alice.push("Chat", "OnJoin")["args"] == [{"roomName": room, "user": "bob"}]
    bob.send("Chat", "HD_Say", [{"roomName": room, "from": "bob", "target": "*", "content": "hi all"}], "s1")
    onchat = (
        '{"tpc":"Chat","func":"OnChat","cb":"","args":'
        '[{"from":"bob","msg":"hi all","roomName":"jroom","target":"*"}]}'
    )
    assert alice.recv_text() == onchat
    # The sender gets the push before the reply to its say.
    assert bob.recv_text() == onchat
    assert bob.recv_text() == '{"tpc":"","func":"s1","cb":"","args":["say success"]}'
    # Departure: alice is told when bob's connection closes.
    bob.close()
    assert alice.push("Chat", "OnLeave")["args"] == [{"roomName": room, "user": "bob"}]
    alice.close()


def test_onjoin_push_bytes(port):
    alice = opened(port, "al")
    bob = opened(port, "bo")
    alice.call("Chat", "HD_JoinChat", [{"roomName": "raw"}], "j")
    bob.call("Chat", "HD_JoinChat", [{"roomName": "raw"}], "j")
    assert alice.recv_text() == '{"tpc":"Chat","func":"OnJoin","cb":"","args":[{"roomName":"raw","user":"bo"}]}'
    alice.close()
    bob.close()


def test_login_handler_binds_a_new_uid(port):
    c = opened(port, "first")
    reply = c.call("Login", "HD_Login", [{"userName": "carl", "passWord": "x"}], "l")
    assert reply == {"tpc": "", "func": "l", "cb": "", "args": ["login success carl"]}
    assert c.call("unknown", "phaserLogin", [], "p")["args"][0] == "carl"
    assert c.call("Chat", "HD_JoinChat", [{"roomName": "carls"}], "j")["args"] == [{"users": ["carl"]}]
    c.close()


# ---------------------------------------------------------------------------------------------
# Errors and silence
# ---------------------------------------------------------------------------------------------


def test_unknown_function_and_handler_errors(port):
    c = opened(port, "err")
    c.send("unknown", "nope", [], "e1")
    assert c.recv_text() == '{"tpc":"","func":"e1","cb":"","args":[],"error":"Remote function(nope) not found"}'
    # A module that exists: only its own functions count (no fallback to global).
    assert c.call("Chat", "test", ["a", "b"], "e2") == {
        "tpc": "",
        "func": "e2",
        "cb": "",
        "args": [],
        "error": "Remote function(test) not found",
    }
    # A handler's own error.
    assert c.call("Chat", "HD_Say", [{"roomName": "nowhere", "content": "x"}], "e3") == {
        "tpc": "",
        "func": "e3",
        "cb": "",
        "args": [],
        "error": "No room",
    }
    # The connection is fine afterwards.
    assert c.call("unknown", "test", ["o", "k"], "ok")["args"] == ["ok"]
    c.close()


def test_no_reply_when_cb_is_empty(port):
    c = opened(port, "silent")
    c.send("unknown", "test", ["a", "b"], "")
    c.send("unknown", "nope", [], "")  # not even an error
    c.send("Chat", "HD_Say", [{"roomName": "nowhere", "content": "x"}], "")
    c.send("unknown", "test", ["after", "wards"], "after")
    # The first frame to arrive is the reply to the last call.
    assert c.recv_text() == '{"tpc":"","func":"after","cb":"","args":["afterwards"]}'
    assert c.quiet()
    c.close()


def test_first_message_must_be_login(port):
    steady = opened(port, "steady")
    for first in (
        '{"tpc":"unknown","func":"test","args":["a","b"],"cb":"c"}',
        '{"tpc":"Login","func":"HD_Login","args":[{"userName":"x","passWord":"y"}],"cb":"c"}',
        '{"tpc":"","func":"phaserLogin","args":[],"cb":"c"}',
    ):
        c = JsonWs(port)
        c.send_text(first)
        assert c.closed_with() == 1008, first
        c.close()
    assert steady.call("unknown", "test", ["still", "here"], "s")["args"] == ["stillhere"]
    steady.close()


def test_non_json_frame_closes_with_1007(port):
    steady = opened(port, "steady2")
    for junk in ("not json", "{", "[1,2", "\x00\x01"):
        c = opened(port, "junk")
        c.send_text(junk)
        assert c.closed_with() == 1007, repr(junk)
        c.close()
    # Also as the very first message.
    c = JsonWs(port)
    c.send_text("hello?")
    assert c.closed_with() in (1007, 1008)
    c.close()
    assert steady.call("unknown", "test", ["un", "harmed"], "s")["args"] == ["unharmed"]
    steady.close()


def test_connection_dropped_mid_call_harms_no_one(port, server):
    steady = opened(port, "steady3")
    for i in range(5):
        c = opened(port, f"drop{i}")
        c.send("unknown", "test", ["a", "b"], "gone")
        # Drop the TCP connection without a close handshake.
        sock = c.ws.sock
        if sock is not None:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        c.close()
    assert steady.call("unknown", "test", ["x", "y"], "s")["args"] == ["xy"]
    assert server.running()
    steady.close()


# ---------------------------------------------------------------------------------------------
# Settings
# ---------------------------------------------------------------------------------------------


def test_require_login_false_and_silent_errors():
    w = Warren(
        listen=[
            Warren.url("json+ws", require_login="false"),
            Warren.url("json+ws", silent_errors="true"),
        ],
        http=False,
    ).wait_ready()
    no_login, silent = (p for _, p in w.listeners)
    # require_login = false: calls work from the first message.
    c = JsonWs(no_login)
    assert c.call("unknown", "test", ["no", "login"], "n")["args"] == ["nologin"]
    c.close()
    # silent_errors = true: an unknown function or a failed call gets no reply, as upstream.
    s = opened(silent, "hush")
    s.send("unknown", "nope", [], "e1")
    s.send("Chat", "HD_Say", [{"roomName": "nowhere", "content": "x"}], "e2")
    s.send("unknown", "test", ["still", "ok"], "ok")
    assert s.recv_text() == '{"tpc":"","func":"ok","cb":"","args":["stillok"]}'
    assert s.quiet()
    s.close()
    w.kill()


def test_login_handler_decides_who_gets_in():
    """`login_handler` names a module handler that receives [guid, md5] and answers true or 0."""
    w = Warren(
        "--module",
        "Debug",
        listen=[Warren.url("json+ws", login_handler="Debug/CheckLogin")],
        http=False,
    ).wait_ready()
    try:
        (_, port), = w.listeners
        ok = JsonWs(port)
        assert ok.login("ann", "secret") == '{"tpc":"","func":"loginback","cb":"","args":[0]}'
        assert ok.call("x", "phaserLogin", [], "p")["args"][0] == "ann"
        bad = JsonWs(port)
        assert bad.login("eve", "guess") == '{"tpc":"","func":"loginback","cb":"","args":[1]}'
        assert bad.closed_with() == 1008
        # the refused client did not disturb the accepted one
        assert ok.call("x", "test", ["a", "b"], "t")["args"] == ["ab"]
    finally:
        w.kill()

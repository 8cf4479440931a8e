"""One session model for every protocol: MQTT, pomelo, JSON-WS and line clients share a room.

Four clients, one per protocol, log in and join room `mix` on one warren; one of them says
"hello all" and all four receive the one `Chat/OnChat` push, each in its own protocol's framing:

| Client | How the push arrives |
|---|---|
| MQTT (paho, mqant mode) | PUBLISH on `Chat/OnChat`, payload the push body |
| pomelo (raw TCP packages) | data package, push message with route `Chat.OnChat`, body the push body |
| JSON over WebSocket | `{"tpc":"Chat","func":"OnChat","cb":"","args":[<push body>]}` |
| line (`handler=router`) | frame `<len> \\r\\n` + `Chat/OnChat <push body>` |

The pomelo client is driven with raw bytes (docs/protocols/pomelo.md, "Packages and messages"):
simple enough for this test.
"""

from __future__ import annotations

import json
import socket
import time
from typing import Any

import pytest
import websocket

from chat import ChatClient
from conftest import Warren

ROOM = "mix"
WAIT_S = 5.0


# ---------------------------------------------------------------------------------------------
# A raw pomelo client (package and message layers by hand)
# ---------------------------------------------------------------------------------------------


def pomelo_package(ptype: int, body: bytes = b"") -> bytes:
    """`type · 3-byte big-endian length · body`."""
    return bytes([ptype]) + len(body).to_bytes(3, "big") + body


def varint(n: int) -> bytes:
    """The message id: little-endian base-128."""
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        out.append(b | (0x80 if n else 0))
        if not n:
            return bytes(out)


class PomeloRaw:
    """A pomelo connection over TCP: handshake, ack, requests by id, pushes by route."""

    def __init__(self, port: int) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=WAIT_S)
        self.buf = bytearray()
        self.next_id = 0
        self.responses: dict[int, bytes] = {}
        self.pushes: list[tuple[str, bytes]] = []

    def _package(self, deadline: float) -> tuple[int, bytes]:
        while True:
            if len(self.buf) >= 4:
                n = int.from_bytes(self.buf[1:4], "big")
                if len(self.buf) >= 4 + n:
                    ptype, body = self.buf[0], bytes(self.buf[4 : 4 + n])
                    del self.buf[: 4 + n]
                    return ptype, body
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"pomelo: no package within the time; buffered {bytes(self.buf)!r}")
            self.sock.settimeout(left)
            chunk = self.sock.recv(65536)
            if not chunk:
                raise AssertionError("pomelo: connection closed")
            self.buf += chunk

    def _pump(self, done, what: str, timeout: float = WAIT_S) -> Any:
        deadline = time.monotonic() + timeout
        while True:
            found = done()
            if found is not None:
                return found
            ptype, body = self._package(deadline)
            if ptype != 4:
                continue  # heartbeats
            flag = body[0]
            mtype = (flag >> 1) & 0x7
            i = 1
            if mtype in (0, 2):  # request/response: id varint
                mid, shift = 0, 0
                while True:
                    b = body[i]
                    i += 1
                    mid |= (b & 0x7F) << shift
                    shift += 7
                    if not b & 0x80:
                        break
                if mtype == 2:
                    self.responses[mid] = body[i:]
                    continue
            if mtype == 3:
                assert not flag & 1, "push with a compressed route"
                rlen = body[i]
                route = body[i + 1 : i + 1 + rlen].decode()
                self.pushes.append((route, body[i + 1 + rlen :]))

    def start(self) -> dict:
        hs = b'{"sys":{"type":"js-websocket","version":"0.0.1","rsa":{}},"user":{}}'
        self.sock.sendall(pomelo_package(1, hs))
        ptype, body = self._package(time.monotonic() + WAIT_S)
        assert ptype == 1, f"expected a handshake response, got type {ptype}"
        reply = json.loads(body)
        assert reply["code"] == 200, reply
        self.sock.sendall(pomelo_package(2))
        ptype, _ = self._package(time.monotonic() + WAIT_S)
        assert ptype == 3, "no heartbeat after the ack"
        return reply

    def request(self, route: str, body: Any) -> Any:
        self.next_id += 1
        mid = self.next_id
        r = route.encode()
        msg = bytes([0x00]) + varint(mid) + bytes([len(r)]) + r + json.dumps(body).encode()
        self.sock.sendall(pomelo_package(4, msg))
        raw = self._pump(lambda: self.responses.pop(mid, None), f"response {mid}")
        return json.loads(raw)

    def push(self, route: str) -> bytes:
        """The body bytes of the next push on `route`."""

        def take():
            for i, (r, b) in enumerate(self.pushes):
                if r == route:
                    del self.pushes[i]
                    return b
            return None

        return self._pump(take, f"push {route}")

    def count(self, route: str, within: float = 0.5) -> int:
        """Pushes on `route` received within `within` s from now (not taken)."""
        try:
            self._pump(lambda: None, "nothing", timeout=within)
        except (AssertionError, TimeoutError, OSError):
            pass
        return sum(1 for r, _ in self.pushes if r == route)

    def close(self) -> None:
        self.sock.close()


# ---------------------------------------------------------------------------------------------
# JSON-WS and line, minimal
# ---------------------------------------------------------------------------------------------


class JsonWsClient:
    def __init__(self, port: int, guid: str) -> None:
        self.ws = websocket.create_connection(f"ws://127.0.0.1:{port}/", timeout=WAIT_S)
        self.frames: list[str] = []
        self.ws.send(json.dumps({"tpc": "login", "func": "login", "args": [guid, "md5"], "cb": ""}))
        assert self.ws.recv() == '{"tpc":"","func":"loginback","cb":"","args":[0]}'

    def _wait(self, pred, what: str, timeout: float = WAIT_S) -> str:
        deadline = time.monotonic() + timeout
        while True:
            for i, f in enumerate(self.frames):
                if pred(json.loads(f)):
                    return self.frames.pop(i)
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"json-ws: no {what}; unread {self.frames}")
            self.ws.settimeout(left)
            try:
                self.frames.append(self.ws.recv())
            except websocket.WebSocketTimeoutException:
                pass

    def call(self, tpc: str, func: str, args: list[Any], cb: str) -> dict:
        self.ws.send(json.dumps({"tpc": tpc, "func": func, "cb": cb, "args": args}))
        return json.loads(self._wait(lambda m: m["tpc"] == "" and m["func"] == cb, f"reply {cb}"))

    def push(self, func: str) -> str:
        return self._wait(lambda m: m["tpc"] == "Chat" and m["func"] == func, f"push Chat/{func}")

    def count(self, func: str, within: float = 0.5) -> int:
        try:
            self._wait(lambda m: False, "nothing", timeout=within)
        except AssertionError:
            pass
        return sum(1 for f in self.frames if json.loads(f)["func"] == func and json.loads(f)["tpc"] == "Chat")

    def close(self) -> None:
        self.ws.close(timeout=1)


class LineRouterClient:
    def __init__(self, port: int) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=WAIT_S)
        self.buf = bytearray()
        self.frames: list[bytes] = []

    def _frame(self, deadline: float) -> bytes:
        while True:
            if b"\r\n" in self.buf:
                head = bytes(self.buf).split(b"\r\n", 1)[0]
                assert head.endswith(b" "), head
                n = int(head)
                start = len(head) + 2
                if len(self.buf) >= start + n:
                    body = bytes(self.buf[start : start + n])
                    del self.buf[: start + n]
                    return body
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError
            self.sock.settimeout(left)
            chunk = self.sock.recv(65536)
            if not chunk:
                raise AssertionError("line: connection closed")
            self.buf += chunk

    def _wait(self, pred, what: str, timeout: float = WAIT_S) -> bytes:
        deadline = time.monotonic() + timeout
        while True:
            for i, f in enumerate(self.frames):
                if pred(f):
                    return self.frames.pop(i)
            try:
                self.frames.append(self._frame(deadline))
            except TimeoutError:
                raise AssertionError(f"line: no {what}; unread {self.frames}") from None

    def request(self, topic: str, body: Any) -> dict:
        payload = topic.encode() + b" " + json.dumps(body).encode()
        self.sock.sendall(str(len(payload)).encode() + b"\r\n" + payload)
        raw = self._wait(lambda f: f.startswith(topic.encode() + b" "), f"reply {topic}")
        return json.loads(raw.split(b" ", 1)[1])

    def push(self, topic: str) -> bytes:
        return self._wait(lambda f: f.startswith(topic.encode() + b" "), f"push {topic}")

    def count(self, topic: str, within: float = 0.5) -> int:
        try:
            self._wait(lambda f: False, "nothing", timeout=within)
        except AssertionError:
            pass
        return sum(1 for f in self.frames if f.startswith(topic.encode() + b" "))

    def close(self) -> None:
        self.sock.close()


# ---------------------------------------------------------------------------------------------
# The test
# ---------------------------------------------------------------------------------------------

USERS = {"mqtt": "mq", "pomelo": "po", "jsonws": "js", "line": "li"}


@pytest.fixture
def mixed():
    w = Warren(
        listen=[
            "mqtt+mqant://127.0.0.1:{port}",
            "pomelo://127.0.0.1:{port}",
            "json+ws://127.0.0.1:{port}",
            "line://127.0.0.1:{port}?handler=router",
        ],
        http=False,
    ).wait_ready()
    yield w
    w.kill()


def join_all(w: Warren) -> dict[str, Any]:
    """Connect one client per protocol, log each in and join `mix` in a fixed order."""
    mq = ChatClient(w.ports["mqtt+mqant"])
    po = PomeloRaw(w.ports["pomelo"])
    po.start()
    js = JsonWsClient(w.ports["json+ws"], USERS["jsonws"])
    li = LineRouterClient(w.ports["line"])

    assert mq.login(USERS["mqtt"]) == {"Error": "", "Result": "login success mq"}
    assert po.request("Login.HD_Login", {"userName": USERS["pomelo"], "passWord": "x"}) == "login success po"
    # JSON-WS: the login message already bound the uid
    assert li.request("Login/HD_Login/1", {"userName": USERS["line"], "passWord": "x"}) == {
        "Error": "",
        "Result": "login success li",
    }

    members: list[str] = []

    def joined(reply_users: list[str], who: str) -> None:
        members.append(who)
        assert reply_users == members, f"{who}: users {reply_users}, expected {members}"

    joined(mq.join(ROOM)["Result"]["users"], "mq")
    joined(po.request("Chat.HD_JoinChat", {"roomName": ROOM})["users"], "po")
    joined(js.call("Chat", "HD_JoinChat", [{"roomName": ROOM}], "j")["args"][0]["users"], "js")
    joined(li.request("Chat/HD_JoinChat/2", {"roomName": ROOM})["Result"]["users"], "li")

    # Every earlier member heard of every later one, in its own framing.
    assert mq.wait_push("Chat/OnJoin", lambda b: b["user"] == "li") == {"roomName": ROOM, "user": "li"}
    assert json.loads(po.push("Chat.OnJoin")) == {"roomName": ROOM, "user": "js"}
    assert js.push("OnJoin") == '{"tpc":"Chat","func":"OnJoin","cb":"","args":[{"roomName":"mix","user":"li"}]}'
    return {"mqtt": mq, "pomelo": po, "jsonws": js, "line": li}


def say(clients: dict[str, Any], sender: str, text: str) -> None:
    body = {"roomName": ROOM, "from": USERS[sender], "target": "*", "content": text}
    if sender == "mqtt":
        assert clients["mqtt"].request("Chat/HD_Say", body) == {"Error": "", "Result": "say success"}
    elif sender == "pomelo":
        assert clients["pomelo"].request("Chat.HD_Say", body) == "say success"
    elif sender == "jsonws":
        assert clients["jsonws"].call("Chat", "HD_Say", [body], "s")["args"] == ["say success"]
    else:
        assert clients["line"].request("Chat/HD_Say/3", body) == {"Error": "", "Result": "say success"}


@pytest.mark.parametrize("sender", list(USERS))
def test_four_protocols_one_room(mixed, sender):
    clients = join_all(mixed)
    mq, po, js, li = clients["mqtt"], clients["pomelo"], clients["jsonws"], clients["line"]
    try:
        say(clients, sender, "hello all")
        push = b'{"from":"%s","msg":"hello all","roomName":"mix","target":"*"}' % USERS[sender].encode()

        # MQTT: PUBLISH Chat/OnChat with the body as payload.
        assert mq.wait_push("Chat/OnChat") == json.loads(push)
        raw = [m.raw for m in mq.history() if m.topic == "Chat/OnChat"]
        assert raw == [push]
        # pomelo: push message, route Chat.OnChat.
        assert po.push("Chat.OnChat") == push
        # JSON-WS: the push body as the one argument.
        assert js.push("OnChat") == '{"tpc":"Chat","func":"OnChat","cb":"","args":[%s]}' % push.decode()
        # line: one frame, topic, a space, the body.
        assert li.push("Chat/OnChat") == b"Chat/OnChat " + push

        # Exactly one copy each.
        assert po.count("Chat.OnChat") == 0
        assert js.count("OnChat") == 0
        assert li.count("Chat/OnChat") == 0
        assert mq.no_push("Chat/OnChat")
    finally:
        for c in (mq, po, js, li):
            c.close()


def test_departures_reach_every_protocol(mixed):
    clients = join_all(mixed)
    mq, po, js, li = clients["mqtt"], clients["pomelo"], clients["jsonws"], clients["line"]
    try:
        po.close()
        leave = b'{"roomName":"mix","user":"po"}'
        assert mq.wait_push("Chat/OnLeave") == json.loads(leave)
        assert js.push("OnLeave") == '{"tpc":"Chat","func":"OnLeave","cb":"","args":[%s]}' % leave.decode()
        assert li.push("Chat/OnLeave") == b"Chat/OnLeave " + leave
        # The rest can still talk; a targeted say crosses protocols too.
        body = {"roomName": ROOM, "target": "li", "content": "just you"}
        assert js.call("Chat", "HD_Say", [body], "t")["args"] == ["say success"]
        assert li.push("Chat/OnChat") == b'Chat/OnChat {"from":"js","msg":"just you","roomName":"mix","target":"li"}'
        assert mq.no_push("Chat/OnChat")
    finally:
        for c in (mq, js, li):
            c.close()

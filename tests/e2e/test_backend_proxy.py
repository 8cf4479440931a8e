"""Routes served from config alone, against the real binary.

- The gate proxy (docs/backends.md, "The gate proxy"): a `[[proxy]]` table forwards the
  client requests of a module route to a `[[backend]]` group, one TCP connection per service
  for every session. The backend here is a small Python server written from the documented
  envelope (`seq u32 · sid_len u16 · sid · name_len u16 · name · payload`, little-endian, inside
  gobase test frames `msgid u32 · len u32 · body`). An MQTT client (paho, mqant mode) and a
  JSON-over-WebSocket client send on the route and get the backend's answers and pushes.
- `[[rpc_route]]` (docs/cluster.md, "Calling TianQinS functions from config"): a handler served
  by a function of a TianQinS peer over the Redis RPC; the peer is written from the wire format
  with redis-py, as the Python pymodule answers (by list).
"""

from __future__ import annotations

import json
import socket
import struct
import threading
from pathlib import Path

import pytest
from brokers import Broker, installed
from chat import ChatClient
from conftest import Warren, free_port, wait_until
from frame_service import FrameService
from test_jsonws import JsonWs

ECHO, SAY, CLOSED = 101, 102, 199


def envelope(seq: int, sid: str, name: str, payload: bytes) -> bytes:
    s, n = sid.encode(), name.encode()
    return struct.pack("<IH", seq, len(s)) + s + struct.pack("<H", len(n)) + n + payload


def unenvelope(body: bytes) -> tuple[int, str, str, bytes]:
    seq, sl = struct.unpack_from("<IH", body)
    sid = body[6 : 6 + sl].decode()
    at = 6 + sl
    (nl,) = struct.unpack_from("<H", body, at)
    name = body[at + 2 : at + 2 + nl].decode()
    return seq, sid, name, body[at + 2 + nl :]


class GameServer(FrameService):
    """A game server behind the gate: it answers msgid 101 (echo) with what it saw, answers
    msgid 102 (say) after pushing `Game/OnSay` to the session, and records every frame."""

    def __init__(self, port: int, name: str) -> None:
        self.name = name
        self.frames: list[tuple[int, int, str, str, bytes]] = []
        super().__init__(port)

    def push(self, sid: str, topic: str, body: bytes) -> None:
        """A push (seq 0) to a session, on the newest connection."""
        self.send(self.conns[-1], 900, envelope(0, sid, topic, body))

    def on_frame(self, conn: socket.socket, msgid: int, body: bytes) -> None:
        seq, sid, uid, payload = unenvelope(body)
        self.frames.append((msgid, seq, sid, uid, payload))
        if msgid == ECHO:
            answer = {"server": self.name, "sid": sid, "uid": uid, "got": json.loads(payload)}
            self.send(conn, ECHO, envelope(seq, sid, "", json.dumps(answer).encode()))
        elif msgid == SAY:
            self.send(conn, 900, envelope(0, sid, "Game/OnSay", payload))
            self.send(conn, SAY, envelope(seq, sid, "", b'"said"'))


def proxy_config(tmp_path: Path, ports: list[int]) -> Path:
    services = ", ".join(
        f'{{ serviceid = "g{i}", serviceaddr = "127.0.0.1", serviceport = {p} }}' for i, p in enumerate(ports)
    )
    path = tmp_path / "proxy.toml"
    path.write_text(
        f"""
[[backend]]
group = "game"
dial_timeout_s = 2
services = [{services}]

[[proxy]]
route = "Game"
backend = "game"
handlers = {{ HD_Echo = {ECHO}, HD_Say = {SAY} }}
timeout_s = 5
before_login = true
closed_msgid = {CLOSED}
"""
    )
    return path


@pytest.fixture
def game(tmp_path: Path):
    server = GameServer(free_port(), "g0")
    w = Warren(
        "--config",
        str(proxy_config(tmp_path, [server.port])),
        listen=[Warren.url("mqtt+mqant"), "json+ws://127.0.0.1:{port}"],
        http=False,
    ).wait_ready()
    wait_until(lambda: "backend connected" in w.log() or server.conns, timeout=10, msg="the gate dials the game server")
    yield w, server
    w.kill()
    server.stop()


def test_mqtt_and_json_ws_clients_reach_the_game_server_through_the_gate(game):
    w, server = game
    mqtt = ChatClient(w.mqtt_mqant)
    try:
        # an MQTT request on the route: the server sees the body as sent, the session id and no
        # uid (before login); its answer is the reply on the same topic
        reply = mqtt.request("Game/HD_Echo", {"x": 1})
        assert reply["Error"] == "", reply
        got = reply["Result"]
        assert got["server"] == "g0" and got["uid"] == "" and got["got"] == {"x": 1}, reply
        sid = got["sid"]
        assert sid

        # a push from the server, unasked, reaches that session on the topic it names
        server.push(sid, "Game/OnTick", b'{"tick":7}')
        assert mqtt.wait_push("Game/OnTick") == {"tick": 7}

        # a request whose handling pushes first: push, then the reply, in that order
        assert mqtt.request("Game/HD_Say", {"text": "hi"})["Result"] == "said"
        assert mqtt.wait_push("Game/OnSay") == {"text": "hi"}
    finally:
        mqtt.close()

    # JSON over WebSocket, logged in: the server sees the uid
    ws = JsonWs(w.ports["json+ws"])
    try:
        ws.login("alice")
        reply = ws.call("Game", "HD_Echo", [{"y": 2}], "cb1")
        answer = reply["args"][0]
        if isinstance(answer, str):
            answer = json.loads(answer)
        assert answer["uid"] == "alice" and answer["got"] == {"y": 2}, reply
        server.push(answer["sid"], "Game/OnTick", b'{"tick":8}')
        push = ws.push("Game", "OnTick")
        assert push["args"] == [{"tick": 8}], push
    finally:
        ws.close()

    # every session went over the one connection the gate keeps to the service
    assert len(server.conns) == 1
    # a closed session is told to its server (closed_msgid, seq 0, no payload)
    wait_until(
        lambda: any(f[0] == CLOSED and f[2] == sid and f[1] == 0 for f in server.frames),
        timeout=10,
        msg="the server learns that the MQTT session closed",
    )


def test_a_request_with_no_server_up_gets_an_error_not_silence(tmp_path: Path):
    dead = free_port()  # nothing listens there
    w = Warren(
        "--config",
        str(proxy_config(tmp_path, [dead])),
        listen=[Warren.url("mqtt+mqant")],
        http=False,
    ).wait_ready()
    try:
        with ChatClient(w.mqtt_mqant) as c:
            reply = c.request("Game/HD_Echo", {"x": 1})
            assert "no service" in reply["Error"], reply
    finally:
        w.kill()


def test_check_config_names_proxy_mistakes(tmp_path: Path):
    import subprocess

    from conftest import warren_bin

    path = tmp_path / "bad.toml"
    path.write_text('[[proxy]]\nroute = "Game"\nbackend = "nope"\n\n[[rpc_route]]\nroute = "Py"\n')
    out = subprocess.run([str(warren_bin()), "check-config", str(path)], capture_output=True, text=True)
    assert out.returncode != 0
    text = out.stdout + out.stderr
    for want in ["proxy[0].backend", "proxy[0].handlers", "rpc_route[0].route", "rpc_route[0].topic"]:
        assert want in text, text


@pytest.mark.skipif(not installed("redis"), reason="redis-server is not installed")
def test_an_rpc_route_calls_a_tianqins_function(tmp_path: Path):
    import redis

    broker = Broker("redis")
    try:
        (tmp_path / "node.toml").write_text(
            "[[redis_rpc]]\n"
            f'url = "{broker.url}"\n'
            'topic = "warren"\n'
            "db = 1\n"
            'module = "Py"\n'
            'reply = "list"\n\n'
            "[[rpc_route]]\n"
            'route = "Py/HD_Add"\n'
            'topic = "pyRpc"\n'
            'func = "add"\n'
            "timeout_s = 5\n"
            "before_login = true\n"
        )
        w = Warren("--config", str(tmp_path / "node.toml"), listen=[Warren.url("mqtt+mqant")], http=False)
        w.wait_ready()
        wait_until(lambda: "redis rpc serving" in w.log(), timeout=20)
        r = redis.Redis(host="127.0.0.1", port=broker.port, db=1, decode_responses=True)
        calls: list[dict] = []

        def peer():
            # the pymodule's loop: BLPOP its topic, run the function, RPUSH the callback on `ct`
            popped = r.blpop("pyRpc", timeout=10)
            if popped is None:
                return
            call = json.loads(popped[1])
            calls.append(call)
            total = sum(call["args"][0].values())
            r.rpush(call["ct"], json.dumps({"func": call["cb"], "ct": "pyRpc", "cb": "", "args": [total]}))

        t = threading.Thread(target=peer)
        t.start()
        with ChatClient(w.mqtt_mqant) as c:
            # an mqant-mode body is a JSON object: the function gets it as its one argument
            reply = c.request("Py/HD_Add", {"a": 2, "b": 3}, timeout=10)
        t.join(15)
        assert len(calls) == 1, w.tail()
        assert (calls[0]["func"], calls[0]["args"], calls[0]["ct"]) == ("add", [{"a": 2, "b": 3}], "warren"), calls
        assert reply == {"Error": "", "Result": 5}, reply
        w.kill()
    finally:
        broker.close()


@pytest.mark.skipif(not installed("redis"), reason="redis-server is not installed")
def test_a_proxied_group_follows_the_gobase_registry(tmp_path: Path):
    """A proxy whose group has `discovery = "registry"`: a game server that registers in the
    gobase key joins the ring and gets the requests; once it leaves, requests get an error."""
    from test_gobase_registry import GobasePeer

    broker = Broker("redis")
    server = GameServer(free_port(), "g0")
    peer = GobasePeer(broker.port, "games", "gobase")
    w = None
    try:
        member = f"game&g0&127.0.0.1&{server.port}&tcp"
        peer.register(member)
        path = tmp_path / "proxy.toml"
        path.write_text(
            f"""
[[backend]]
group = "game"
dial_timeout_s = 2
discovery = "registry"
registry = "{broker.url}/0"
key = "games"
immediately = true

[[proxy]]
route = "Game"
backend = "game"
handlers = {{ HD_Echo = {ECHO} }}
timeout_s = 5
before_login = true
"""
        )
        w = Warren("--config", str(path), listen=[Warren.url("mqtt+mqant")], http=False).wait_ready()
        wait_until(lambda: server.conns, timeout=15, msg="the gate dials the registered game server")
        with ChatClient(w.mqtt_mqant) as c:
            reply = c.request("Game/HD_Echo", {"x": 1})
            assert reply["Error"] == "" and reply["Result"]["server"] == "g0", reply
            peer.deregister(member)

            def refused() -> bool:
                r = c.request("Game/HD_Echo", {"x": 2})
                return "no service" in r["Error"]

            wait_until(refused, timeout=20, msg="the server that left the registry leaves the proxy's ring")
    finally:
        if w is not None:
            w.kill()
        peer.close()
        server.stop()
        broker.close()

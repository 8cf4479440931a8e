"""The cluster admin API (docs/admin-api.md) against the real binary, with real MQTT clients.

One node: a paho-mqtt client on an mqant-mode listener logs in through the chat demo (which
binds its uid) and joins a room; the API finds its session by uid and by id, pushes to it, sends
to its room and to everyone, lists the rooms, kicks it (the client sees its connection close),
refuses requests without the token, and shows the config with the token redacted. A pomelo
client that is kicked gets a kick package with the reason before its connection closes.

Two nodes over a real nats-server (started on a free port): a session held by node B is listed,
pushed to and kicked through node A's admin API, and /admin/nodes lists both nodes; the bus URL's
password is redacted in /admin/config.

/admin/config shows the config in force: a node's relative ACL path read from its config file's
directory; after the file's IP list and ACL are edited and SIGHUP is sent, the new values (and
the rest as the node started); after a broken edit and SIGHUP, still those, with the reload's
error.
"""

from __future__ import annotations

import json
import signal
import time
import urllib.parse
from pathlib import Path

import pytest
from brokers import Broker, installed
from chat import ChatClient
from conftest import Warren, free_port, wait_until
from test_admin import admin_request
from test_cross_protocol import PomeloRaw

TOKEN = "adm1n-t0ken"
# the chat demo's modules: Login binds the uid, Chat keeps rooms as gate groups (chat/<room>)
CHAT = ("--module", "Login", "--module", "Chat")


class Admin:
    """A client of one node's admin API."""

    def __init__(self, port: int, token: str | None = TOKEN) -> None:
        self.port = port
        self.token = token

    def call(self, method: str, path: str, body: dict | None = None, token: str | None = "default") -> tuple[int, dict]:
        """One request: (status, JSON answer)."""
        data = json.dumps(body).encode() if body is not None else None
        return admin_request(self.port, method, path, data, self.token if token == "default" else token)

    def get(self, path: str) -> dict:
        status, body = self.call("GET", path)
        assert status == 200, (path, status, body)
        return body

    def post(self, path: str, body: dict | None = None) -> dict:
        status, answer = self.call("POST", path, body)
        assert status == 200, (path, status, answer)
        return answer


def start_node(tmp_path: Path, name: str, *args: str, extra: str = "") -> tuple[Warren, Admin]:
    """A `warren serve` with an mqant-mode MQTT listener and the admin API (token set); `args`
    add modules (`--module Login`) and the bus."""
    admin = free_port()
    config = tmp_path / f"{name}.toml"
    config.write_text(f'[admin]\naddr = "127.0.0.1:{admin}"\ntoken = "{TOKEN}"\n{extra}')
    w = Warren("--config", str(config), "--node-id", name, *args, listen=["mqtt+mqant"], http=False)
    w.listeners.append(("admin", admin))
    w.wait_ready()
    return w, Admin(admin)


def login(port: int, user: str) -> ChatClient:
    """A chat demo client logged in as `user` (the demo binds the uid)."""
    c = ChatClient(port, client_id=f"{user}-c")
    assert c.login(user) == {"Error": "", "Result": f"login success {user}"}
    return c


def test_sessions_push_rooms_broadcast_and_kick_on_one_node(tmp_path):
    w, api = start_node(tmp_path, "solo", *CHAT)
    alice = login(w.mqtt_mqant, "alice")
    bob = login(w.mqtt_mqant, "bob")
    try:
        assert alice.join("lobby")["Error"] == ""

        # without the token, or with a wrong one: refused, nothing listed
        status, body = api.call("GET", "/admin/sessions", token=None)
        assert status == 401 and body["error"]["code"] == "unauthorized"
        status, _ = api.call("GET", "/admin/sessions", token="wrong")
        assert status == 401

        everyone = api.get("/admin/sessions")
        assert everyone["total"] == 2 and everyone["unreachable"] == []
        assert {s["uid"] for s in everyone["sessions"]} == {"alice", "bob"}

        found = api.get("/admin/sessions?uid=alice")
        assert found["total"] == 1
        s = found["sessions"][0]
        assert s["node"] == "solo" and s["protocol"] == "mqtt"
        assert s["listener"] == f"127.0.0.1:{w.mqtt_mqant}"
        assert s["peer"].startswith("127.0.0.1:") and s["connected_at"].endswith("Z")
        assert api.get(f"/admin/sessions/{s['id']}") == s
        status, body = api.call("GET", "/admin/sessions/no-such-id")
        assert status == 404 and body["error"]["code"] == "no_such_session"

        # paging: one at a time, in (node, id) order
        ids = sorted(x["id"] for x in everyone["sessions"])
        assert [api.get(f"/admin/sessions?offset={i}&limit=1")["sessions"][0]["id"] for i in range(2)] == ids
        status, _ = api.call("GET", "/admin/sessions?limit=5000")
        assert status == 400

        # push to alice's session: only she gets it
        assert api.post(f"/admin/sessions/{s['id']}/push", {"topic": "Admin/Notice", "body": "hello alice"}) == {
            "pushed": 1,
            "node": "solo",
        }
        assert alice.wait_push("Admin/Notice") == b"hello alice"
        assert bob.no_push("Admin/Notice")

        # rooms: the chat demo's room is the group chat/lobby
        rooms = api.get("/admin/rooms")["rooms"]
        assert {"name": "chat/lobby", "members": 1} in rooms
        room = api.get("/admin/rooms/" + urllib.parse.quote("chat/lobby", safe=""))
        assert room["members"] == [{"session": s["id"], "node": "solo", "uid": "alice"}]
        status, body = api.call("GET", "/admin/rooms/nowhere")
        assert status == 404 and body["error"]["code"] == "no_such_room"

        # a room broadcast reaches its member only; a broadcast to all reaches both
        lobby = urllib.parse.quote("chat/lobby", safe="")
        assert api.post(f"/admin/rooms/{lobby}/broadcast", {"topic": "Admin/Room", "body_base64": "aGk="})["sessions"] == 1
        assert alice.wait_push("Admin/Room") == b"hi"
        assert bob.no_push("Admin/Room")
        assert api.post("/admin/broadcast", {"topic": "Admin/All", "body": '{"n":1}'})["sessions"] == 2
        assert alice.wait_push("Admin/All") == {"n": 1}
        assert bob.wait_push("Admin/All") == {"n": 1}

        # kick alice: her client sees the connection close; bob stays
        assert api.post(f"/admin/sessions/{s['id']}/kick", {"reason": "maintenance"}) == {"kicked": 1, "node": "solo"}
        assert alice.wait_disconnected(5), "the kicked client's connection was not closed"
        wait_until(lambda: api.get("/admin/sessions?uid=alice")["total"] == 0, msg="the kicked session is still listed")
        alice.close()
        assert not bob.wait_disconnected(0.2)
        status, body = api.call("POST", f"/admin/sessions/{s['id']}/kick")
        assert status == 404

        # kick by uid, without a body
        assert api.post("/admin/kick?uid=bob")["kicked"] == 1
        assert bob.wait_disconnected(5)

        # every change is in the log, with who asked
        log = w.log()
        for what in ("admin: pushed to a session", "admin: broadcast", "admin: session kicked", "admin: uid kicked"):
            assert what in log, what
        assert "reason=maintenance" in log and "token=true" in log

        # the config: the token does not leave the node
        config = api.get("/admin/config")
        assert config["node"] == "solo"
        assert config["config"]["admin"]["token"] == "<redacted>"
        assert TOKEN not in json.dumps(config)
    finally:
        alice.close()
        bob.close()


def test_a_kicked_pomelo_client_gets_the_reason_then_the_close(tmp_path):
    pomelo = Warren.url("pomelo")
    port = urllib.parse.urlsplit(pomelo).port
    _, api = start_node(tmp_path, "solo", *CHAT, "--listen", pomelo)
    po = PomeloRaw(port)
    try:
        po.start()
        assert po.request("Login.HD_Login", {"userName": "pat", "passWord": "x"}) == "login success pat"
        s = api.get("/admin/sessions?uid=pat")["sessions"][0]
        assert s["protocol"] == "pomelo" and s["listener"] == f"127.0.0.1:{port}"
        assert api.post(f"/admin/sessions/{s['id']}/kick", {"reason": "maintenance"})["kicked"] == 1
        # the kick package (type 5) with the reason, then the end of the connection
        deadline = time.monotonic() + 5
        while True:
            ptype, body = po._package(deadline)
            if ptype == 5:
                break
        assert json.loads(body) == {"reason": "maintenance"}
        po.sock.settimeout(5)
        assert po.sock.recv(1) == b"", "the connection stays open after the kick"
    finally:
        po.close()


@pytest.fixture
def nats():
    if not installed("nats"):
        pytest.fail("nats-server is not installed (scripts/test installs it)")
    b = Broker("nats")
    yield b
    b.close()


def test_a_session_on_node_b_is_listed_and_kicked_through_node_a(tmp_path, nats):
    # the bus URL carries a user and password (the test server takes any): /admin/config hides it
    url = nats.url.replace("nats://", "nats://warren:hunter2@")
    a, api = start_node(tmp_path, "a", *CHAT, "--bus", url, "--registry", nats.url)
    b, api_b = start_node(tmp_path, "b", "--bus", url, "--registry", nats.url)
    wait_until(
        lambda: {n["id"] for n in api.get("/admin/nodes")["nodes"]} >= {"a", "b"},
        timeout=15,
        msg="node a never listed node b",
    )
    # node b runs no Login module: its client logs in through node a's, over the bus
    carol = login(b.mqtt_mqant, "carol")
    try:
        nodes = api.get("/admin/nodes")
        assert nodes["node"] == "a" and nodes["unreachable"] == []
        by_id = {n["id"]: n for n in nodes["nodes"]}
        assert by_id["a"]["self"] and not by_id["b"]["self"]
        assert by_id["b"]["sessions"] == 1 and by_id["a"]["sessions"] == 0
        assert {"Login", "Chat", "Gate"} <= {m["type"] for m in by_id["a"]["modules"]}
        assert "Login" not in {m["type"] for m in by_id["b"]["modules"]}

        found = api.get("/admin/sessions?uid=carol")
        assert found["total"] == 1 and found["unreachable"] == []
        s = found["sessions"][0]
        assert s["node"] == "b" and s["listener"] == f"127.0.0.1:{b.mqtt_mqant}"
        assert api.get("/admin/sessions?node=b")["total"] == 1
        assert api.get("/admin/sessions?node=a")["total"] == 0
        status, body = api.call("GET", "/admin/sessions?node=zz")
        assert status == 404 and body["error"]["code"] == "no_such_node"

        assert api.post(f"/admin/sessions/{s['id']}/push", {"topic": "Admin/Notice", "body": "from a"})["node"] == "b"
        assert carol.wait_push("Admin/Notice") == b"from a"

        assert api.post(f"/admin/sessions/{s['id']}/kick", {"reason": "moved"}) == {"kicked": 1, "node": "b"}
        assert carol.wait_disconnected(5), "the client on node b was not disconnected"
        assert "admin: session kicked" in b.log()  # node b did it, and says so
        wait_until(lambda: api_b.get("/admin/sessions?uid=carol")["total"] == 0, msg="node b still lists the session")

        config = api.get("/admin/config")["config"]
        assert config["bus"]["url"] == url.replace("hunter2", "<redacted>")
        assert "hunter2" not in json.dumps(config)
    finally:
        carol.close()
        a.kill()
        b.kill()


def test_admin_config_shows_what_a_sighup_reloaded_and_keeps_it_after_a_broken_edit(tmp_path):
    conf = tmp_path / "conf"
    conf.mkdir()
    (conf / "acl").write_text("topic readwrite #\n")
    (conf / "acl.new").write_text("topic read #\n")
    w, api = start_node(conf, "solo", extra='[access]\ndeny = ["192.0.2.1"]\n\n[auth]\nacl_file = "acl"\n')
    head = f'[admin]\naddr = "127.0.0.1:{api.port}"\ntoken = "{TOKEN}"\n'
    config_file = conf / "solo.toml"

    def shown() -> dict:
        return api.get("/admin/config")

    before = shown()
    assert before["config"]["auth"]["acl_file"] == str(conf / "acl"), "relative to the config file's directory"
    assert before["config"]["access"]["deny"] == ["192.0.2.1"]
    assert before["reloads"] == 0 and before["last_reload"] is None
    assert "access" in before["reloadable"] and "auth" in before["reloadable"]
    listeners = before["config"]["listener"]

    # a reloadable edit, and one that takes a restart (the admin token stays as started)
    config_file.write_text(
        head.replace(TOKEN, "another-token") + '[access]\ndeny = ["192.0.2.2"]\n\n[auth]\nacl_file = "acl.new"\n'
    )
    w.proc.send_signal(signal.SIGHUP)
    after = wait_until(
        lambda: (a := shown())["config"]["access"]["deny"] == ["192.0.2.2"] and a,
        msg="/admin/config never showed the reloaded IP list",
    )
    assert after["config"]["auth"]["acl_file"] == str(conf / "acl.new")
    assert after["reloads"] == 1
    assert after["last_reload"]["ok"] is True and after["last_reload"]["errors"] == []
    assert after["config"]["listener"] == listeners, "the command line's listeners stay"
    assert api.call("GET", "/admin/config", token="another-token")[0] == 401, "the token is fixed until a restart"
    assert after["config"]["admin"]["token"] == "<redacted>"
    assert TOKEN not in json.dumps(after)

    # a broken edit: the reload fails, and the config in force is still the last one that loaded
    config_file.write_text(head + '[access]\ndeny = ["not-a-network"]\n')
    w.proc.send_signal(signal.SIGHUP)
    failed = wait_until(
        lambda: (a := shown())["last_reload"]["ok"] is False and a,
        msg="/admin/config never showed the failed reload",
    )
    assert failed["config"] == after["config"]
    assert failed["reloads"] == 1 and failed["loaded_at"] == after["loaded_at"]
    assert any("access.deny[0]" in e for e in failed["last_reload"]["errors"]), failed["last_reload"]
    assert "SIGHUP: the config does not load" in w.log()

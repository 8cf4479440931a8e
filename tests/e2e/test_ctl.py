"""`warren ctl` (docs/ctl.md) against a three-node cluster over a real nats-server.

Three `warren serve` nodes (n1, n2, n3) share a NATS bus and registry; each has an mqant-mode
MQTT listener, the chat demo's Login and Chat modules and an `[admin]` API with a token. Every
command goes to n1's admin API, which answers for the whole cluster: a paho-mqtt client logged
in on n2 is found by its uid and kicked from there (paho's on_disconnect fires), pushes and room
broadcasts reach it. Also: `--json` is the API's JSON, the token is needed (exit 1,
unauthorized), usage errors exit 2 and an admin address where nothing listens exits 3.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
from pathlib import Path

import pytest
from brokers import Broker, installed
from chat import ChatClient
from conftest import REPO_ROOT, Warren, _live, free_port, wait_until, warren_bin

TOKEN = "ctl-s3cret"
NODES = ("n1", "n2", "n3")


class Cluster:
    """Three nodes on one nats-server, each with an MQTT listener and an admin API."""

    def __init__(self, tmp: Path, nats: str) -> None:
        self.nodes: dict[str, Warren] = {}
        self.mqtt: dict[str, int] = {}
        self.admin: dict[str, int] = {}
        for name in NODES:
            mqtt, admin = free_port(), free_port()
            cfg = tmp / f"{name}.toml"
            cfg.write_text(
                f'[node]\nid = "{name}"\n\n'
                f'[[listener]]\nprotocol = "mqtt"\nmode = "mqant"\naddr = "127.0.0.1:{mqtt}"\n\n'
                '[[module]]\ntype = "Login"\n\n'
                '[[module]]\ntype = "Chat"\n\n'
                f'[bus]\nurl = "{nats}"\n\n'
                '[registry]\nurl = ""\n\n'
                f'[admin]\naddr = "127.0.0.1:{admin}"\ntoken = "{TOKEN}"\n'
            )
            w = Warren("--config", str(cfg), http=False)
            w.listeners = [("mqtt+mqant", mqtt), ("admin", admin)]
            w.ports.update({"mqtt+mqant": mqtt, "admin": admin})
            w.wait_ready()
            self.nodes[name], self.mqtt[name], self.admin[name] = w, mqtt, admin
        # n1's registry view holds every node before the tests ask it
        wait_until(
            lambda: {n["id"] for n in self.json("nodes").get("nodes", [])} == set(NODES),
            timeout=20,
            interval=0.2,
            msg="n1 never listed the three nodes",
        )

    def ctl(self, *args: str, node: str = "n1", token: str | None = TOKEN) -> subprocess.CompletedProcess:
        """`warren ctl --admin <node's API> ARGS`, the token in WARREN_ADMIN_TOKEN."""
        return ctl("--admin", f"http://127.0.0.1:{self.admin[node]}", *args, token=token)

    def json(self, *args: str, node: str = "n1") -> dict:
        r = self.ctl("--json", *args, node=node)
        assert r.returncode == 0, r.stderr
        return json.loads(r.stdout)

    def client(self, node: str, user: str) -> ChatClient:
        c = ChatClient(self.mqtt[node], client_id=f"{user}-ctl")
        assert c.login(user) == {"Error": "", "Result": f"login success {user}"}
        return c

    def session_of(self, uid: str) -> dict:
        """The one session of `uid`, as n1 lists it (once the cluster reports it)."""
        found = wait_until(lambda: self.json("sessions", "--uid", uid)["sessions"], timeout=10, msg=f"no session of {uid}")
        assert len(found) == 1, found
        return found[0]


def ctl(*args: str, token: str | None = None, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """Run `warren ctl ARGS`; the token (if any) through WARREN_ADMIN_TOKEN."""
    e = {k: v for k, v in os.environ.items() if k not in ("WARREN_ADMIN", "WARREN_ADMIN_TOKEN")}
    if token is not None:
        e["WARREN_ADMIN_TOKEN"] = token
    e.update(env or {})
    return subprocess.run(
        [str(warren_bin()), "ctl", *args],
        cwd=REPO_ROOT,
        env=e,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=30,
    )


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    if not installed("nats"):
        pytest.fail("nats-server is not installed (scripts/test installs it)")
    nats = Broker("nats")
    before = len(_live)
    try:
        yield Cluster(tmp_path_factory.mktemp("ctl"), nats.url)
    finally:
        for w in _live[before:]:
            w.kill()
        del _live[before:]
        nats.close()


def kv(text: str) -> dict[str, str]:
    """The `key: value` lines printed by ctl, as a dict."""
    pairs = (line.split(":", 1) for line in text.splitlines() if ":" in line)
    return {k: v.strip() for k, v in pairs}


def rows(table: str) -> list[list[str]]:
    """The rows of a table printed by ctl, header first, split on runs of blanks."""
    return [line.split() for line in table.splitlines() if line.strip()]


# ---- nodes ----------------------------------------------------------------------------------------


def test_nodes_lists_the_three_nodes(cluster):
    r = cluster.ctl("nodes")
    assert r.returncode == 0, r.stderr
    table = rows(r.stdout)
    assert table[0] == ["ID", "SELF", "ADDR", "MODULES", "SESSIONS"], r.stdout
    by_id = {row[0]: row for row in table[1:]}
    assert set(by_id) == set(NODES), r.stdout
    assert by_id["n1"][1] == "yes" and by_id["n2"][1] == "no" and by_id["n3"][1] == "no", r.stdout
    for row in by_id.values():
        assert "Login" in row[3] and "Chat" in row[3], r.stdout
    # any node answers for the cluster
    body = cluster.json("nodes", node="n3")
    assert body["node"] == "n3"
    assert {n["id"] for n in body["nodes"]} == set(NODES)
    assert [n["id"] for n in body["nodes"] if n["self"]] == ["n3"]
    assert body["unreachable"] == []


# ---- sessions, kick ---------------------------------------------------------------------------


def test_sessions_by_uid_finds_a_client_on_another_node(cluster):
    alice = cluster.client("n2", "alice")
    try:
        s = cluster.session_of("alice")
        assert (s["node"], s["uid"], s["protocol"]) == ("n2", "alice", "mqtt"), s
        r = cluster.ctl("sessions", "--uid", "alice")
        assert r.returncode == 0, r.stderr
        table = rows(r.stdout)
        assert table[0] == ["ID", "NODE", "UID", "PROTOCOL", "PEER", "CONNECTED"], r.stdout
        assert table[1][:4] == [str(s["id"]), "n2", "alice", "mqtt"], r.stdout
        # the same session by its id, as `key: value` lines
        one = cluster.ctl("session", str(s["id"]))
        assert one.returncode == 0, one.stderr
        fields = kv(one.stdout)
        assert (fields["id"], fields["node"], fields["uid"]) == (str(s["id"]), "n2", "alice"), one.stdout
        # a node filter leaves it out when it names another node
        assert cluster.json("sessions", "--uid", "alice", "--node", "n3")["sessions"] == []
    finally:
        alice.close()


def test_kick_by_uid_closes_the_client_on_its_node(cluster):
    bob = cluster.client("n2", "bob")
    try:
        cluster.session_of("bob")
        r = cluster.ctl("kick", "--uid", "bob", "--reason", "ctl test")
        assert r.returncode == 0, r.stderr
        assert kv(r.stdout)["kicked"] == "1", r.stdout
        assert bob.wait_disconnected(10), "paho never saw the connection close"
        wait_until(lambda: cluster.json("sessions", "--uid", "bob")["sessions"] == [], timeout=10, msg="bob still listed")
    finally:
        bob.close()


def test_kick_by_id_closes_the_client_on_its_node(cluster):
    carol = cluster.client("n3", "carol")
    try:
        s = cluster.session_of("carol")
        body = cluster.json("kick", str(s["id"]), "--reason", "ctl test")
        assert body["kicked"] == 1 and body["node"] == "n3", body
        assert carol.wait_disconnected(10), "paho never saw the connection close"
        r = cluster.ctl("session", str(s["id"]))
        assert r.returncode == 1 and r.stderr.startswith("error: no_such_session: "), (r.returncode, r.stderr)
    finally:
        carol.close()


# ---- push, rooms, broadcast -------------------------------------------------------------------


def test_push_reaches_one_session(cluster):
    dave = cluster.client("n2", "dave")
    try:
        s = cluster.session_of("dave")
        r = cluster.ctl("push", str(s["id"]), "Ctl/OnNote", '{"note":"hello dave"}')
        assert r.returncode == 0, r.stderr
        assert dave.wait_push("Ctl/OnNote", timeout=10) == {"note": "hello dave"}
        # a broadcast to all reaches every session of every node, dave's among them
        b = cluster.json("broadcast", "Ctl/OnAll", '{"to":"all"}')
        assert b["sessions"] >= 1, b
        assert dave.wait_push("Ctl/OnAll", timeout=10) == {"to": "all"}
    finally:
        dave.close()


def test_rooms_and_a_room_broadcast(cluster):
    # the chat demo keeps a room's members in the gates' group `chat/<room>`; the name travels
    # as one path segment (its `/` escaped)
    room = "chat/ctl-room"
    erin = cluster.client("n2", "erin")
    try:
        assert erin.join("ctl-room")["Error"] == ""
        rooms = wait_until(
            lambda: [r for r in cluster.json("rooms")["rooms"] if r["name"] == room],
            timeout=10,
            msg=f"{room} not listed",
        )
        assert rooms[0]["members"] == 1, rooms
        r = cluster.ctl("rooms")
        assert r.returncode == 0, r.stderr
        assert rows(r.stdout)[0] == ["NAME", "MEMBERS"] and [room, "1"] in rows(r.stdout), r.stdout
        r = cluster.ctl("rooms", room)
        assert r.returncode == 0, r.stderr
        assert kv(r.stdout.split("\n\n")[0])["name"] == room, r.stdout
        assert any(row[1:] == ["n2", "erin"] for row in rows(r.stdout)), r.stdout
        b = cluster.json("broadcast", "--room", room, "Ctl/OnRoom", '{"to":"room"}')
        assert b["sessions"] == 1, b
        assert erin.wait_push("Ctl/OnRoom", timeout=10) == {"to": "room"}
    finally:
        erin.close()


# ---- the node's own resources --------------------------------------------------------------------


def test_plugins_and_the_log_filter_of_the_asked_node(cluster):
    r = cluster.ctl("plugins")
    assert r.returncode == 0, r.stderr
    assert rows(r.stdout) == [["NAME", "KIND", "ROLE", "VERSION", "PATH"]], r.stdout  # no plugins here
    r = cluster.ctl("reload", "Nope")
    assert r.returncode == 1 and r.stderr.startswith("error: no_such_plugin: "), (r.returncode, r.stderr)
    r = cluster.ctl("log", node="n2")
    assert r.returncode == 0, r.stderr
    assert kv(r.stdout)["node"] == "n2", r.stdout
    was = cluster.json("log", node="n2")["filter"]
    r = cluster.ctl("log", "info,warren::gate=debug", node="n2")
    assert r.returncode == 0, r.stderr
    assert kv(r.stdout)["filter"] == "info,warren::gate=debug", r.stdout
    assert cluster.json("log", node="n2")["filter"] == "info,warren::gate=debug"
    bad = cluster.ctl("log", "info,=[", node="n2")
    assert bad.returncode == 1 and bad.stderr.startswith("error: bad_filter: "), bad.stderr
    assert cluster.json("log", "--", was, node="n2")["filter"] == was


def test_config_hides_the_token(cluster):
    r = cluster.ctl("config")
    assert r.returncode == 0, r.stderr
    assert TOKEN not in r.stdout, r.stdout
    assert any(line.startswith("admin.addr:") for line in r.stdout.splitlines()), r.stdout
    body = cluster.json("config")
    assert TOKEN not in json.dumps(body)
    config = body.get("config", body)
    assert config["admin"]["token"] == "<redacted>", config["admin"]


def test_health(cluster):
    r = cluster.ctl("health", node="n3")
    assert r.returncode == 0, (r.stdout, r.stderr)
    body = cluster.json("health", node="n3")
    assert body["healthz"]["status"] == "ok" and body["readyz"]["ready"] is True, body


# ---- what goes wrong ------------------------------------------------------------------------------


def test_the_token_is_needed(cluster):
    for token in (None, "wrong"):
        r = cluster.ctl("nodes", token=token)
        assert r.returncode == 1, (token, r.returncode, r.stdout, r.stderr)
        assert r.stderr.startswith("error: unauthorized: "), r.stderr
        assert r.stdout == ""
    # --token on the command line does as well as the environment
    r = ctl("--admin", str(cluster.admin["n1"]), "--token", TOKEN, "nodes")
    assert r.returncode == 0, r.stderr
    # and WARREN_ADMIN names the API
    r = ctl("nodes", token=TOKEN, env={"WARREN_ADMIN": f"127.0.0.1:{cluster.admin['n1']}"})
    assert r.returncode == 0, r.stderr


def test_nothing_listening_exits_3():
    port = free_port()
    r = ctl("--admin", f"http://127.0.0.1:{port}", "nodes")
    assert r.returncode == 3, (r.returncode, r.stderr)
    assert r.stderr.startswith(f"error: cannot reach the admin API at http://127.0.0.1:{port}"), r.stderr


def test_usage_errors_exit_2():
    for args in (["kick"], ["kick", "7", "--uid", "bob"], ["sessions", "--limit", "x"], ["--admin", "https://127.0.0.1:1", "nodes"], ["nosuch"]):
        r = ctl(*args)
        assert r.returncode == 2, (args, r.returncode, r.stderr)
        assert r.stdout == "", (args, r.stdout)


def test_an_admin_address_that_never_answers_exits_3():
    # a socket that accepts connections (the kernel's backlog) but never answers a request
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen(8)
        port = s.getsockname()[1]
        r = ctl("--admin", str(port), "--timeout", "0.5", "nodes")
    assert r.returncode == 3, (r.returncode, r.stderr)
    assert r.stderr.strip() == f"error: cannot reach the admin API at http://127.0.0.1:{port}: no answer within 0.5 s", r.stderr

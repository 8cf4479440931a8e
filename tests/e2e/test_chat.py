"""The chat demo (examples/chat/README.md) against a real warren, as its paho clients speak it.

Covers its step-by-step session over TCP (MQTT 3.1 and 3.1.1) and WebSocket, QoS 0/1/2 requests,
the habits of mqant's Python client, the error texts, rejoin, departure and shared client ids.
"""

from __future__ import annotations

import json

import pytest
from chat import ChatClient, MQTTv31, MQTTv311

ROOM = "mqant"
PASSWORD = "Hello,anyone!"

# How each flavour of client connects: upstream's Python client speaks MQTT 3.1 (`MQIsdp`) with
# admin/password and keepalive 60; the others use 3.1.1, over TCP and over WebSocket (`/mqtt`).
FLAVOURS = {
    "tcp-3.1": {"transport": "tcp", "protocol": MQTTv31, "username": "admin", "password": "password", "keepalive": 60},
    "tcp-3.1.1": {"transport": "tcp", "protocol": MQTTv311},
    "ws-3.1.1": {"transport": "websockets", "protocol": MQTTv311},
}


def client(w, flavour: str = "tcp-3.1.1", **kw) -> ChatClient:
    """A connected ChatClient of the given flavour on the demo warren `w`."""
    opts = dict(FLAVOURS[flavour])
    opts.update(kw)
    port = w.ws_mqant if opts["transport"] == "websockets" else w.mqtt_mqant
    return ChatClient(port, **opts)


def login_body(user: str) -> dict:
    return {"userName": user, "passWord": PASSWORD}


def ok(result) -> dict:
    return {"Error": "", "Result": result}


def err(text: str) -> dict:
    return {"Error": text, "Result": None}


# ---------------------------------------------------------------------------------------------
# 2.3 step table
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("flavour", list(FLAVOURS))
def test_step_table(warren_demo, flavour):
    # 1. both connect (the constructor fails unless CONNACK is 0)
    alice = client(warren_demo, flavour, client_id="alice-c")
    bob = client(warren_demo, flavour, client_id="bob-c")

    # 2. join before login
    assert alice.request("Chat/HD_JoinChat/2", {"roomName": ROOM}, raw=True) == b'{"Error":"Not Logined","Result":null}'

    # 3., 4. login
    assert (
        alice.request("Login/HD_Login/1", login_body("alice"), raw=True)
        == b'{"Error":"","Result":"login success alice"}'
    )
    assert bob.request("Login/HD_Login/1", login_body("bob"), raw=True) == b'{"Error":"","Result":"login success bob"}'

    # 5. alice joins an empty room
    assert (
        alice.request("Chat/HD_JoinChat/2", {"roomName": ROOM}, raw=True)
        == b'{"Error":"","Result":{"users":["alice"]}}'
    )

    # 6. bob joins: his reply lists both (join order), alice is told
    assert (
        bob.request("Chat/HD_JoinChat/2", {"roomName": ROOM}, raw=True)
        == b'{"Error":"","Result":{"users":["alice","bob"]}}'
    )
    assert alice.wait_push("Chat/OnJoin") == {"roomName": ROOM, "user": "bob"}

    # 7. alice says to everyone: her push precedes her reply, bob gets the same push
    say = {"roomName": ROOM, "from": "alice", "target": "*", "content": "hi"}
    assert alice.request("Chat/HD_Say/2", say, raw=True) == b'{"Error":"","Result":"say success"}'
    chat_hi = b'{"from":"alice","msg":"hi","roomName":"mqant","target":"*"}'
    tail = alice.history()[-2:]
    assert [(m.kind, m.topic) for m in tail] == [("push", "Chat/OnChat"), ("reply", "Chat/HD_Say/2")]
    assert tail[0].raw == chat_hi
    assert alice.wait_push("Chat/OnChat") == json.loads(chat_hi)
    assert bob.wait_push("Chat/OnChat") == json.loads(chat_hi)
    assert [m.raw for m in bob.history() if m.topic == "Chat/OnChat"] == [chat_hi]

    # 8. bob whispers to alice: only alice gets the push
    say = {"roomName": ROOM, "from": "bob", "target": "alice", "content": "yo"}
    assert bob.request("Chat/HD_Say/2", say, raw=True) == b'{"Error":"","Result":"say success"}'
    assert alice.wait_push("Chat/OnChat") == {"from": "bob", "msg": "yo", "roomName": ROOM, "target": "alice"}
    assert [m.raw for m in alice.history() if m.topic == "Chat/OnChat"][-1] == (
        b'{"from":"bob","msg":"yo","roomName":"mqant","target":"alice"}'
    )
    assert bob.no_push("Chat/OnChat")  # only the one from step 7, already taken

    # bob saw nothing but his replies and the two pushes meant for him
    assert [(m.kind, m.topic) for m in bob.history()] == [
        ("reply", "Login/HD_Login/1"),
        ("reply", "Chat/HD_JoinChat/2"),
        ("push", "Chat/OnChat"),
        ("reply", "Chat/HD_Say/2"),
    ]

    # 9. bob disconnects: alice is told
    bob.close()
    assert alice.wait_push("Chat/OnLeave") == {"roomName": ROOM, "user": "bob"}
    assert [m.raw for m in alice.history() if m.topic == "Chat/OnLeave"] == [b'{"roomName":"mqant","user":"bob"}']

    # 10. a handler without the HD_ prefix is not client-visible
    assert (
        alice.request("Login/getRand/3", {}, raw=True)
        == b'{"Error":"Method(getRand) must begin with \'HD_\'","Result":null}'
    )
    alice.close()


@pytest.mark.parametrize("qos", [0, 1, 2])
def test_requests_of_every_qos_get_replies(warren_demo, qos):
    for flavour in FLAVOURS:
        c = client(warren_demo, flavour)
        user = f"q{qos}{flavour.replace('.', '').replace('-', '')}"
        assert c.login(user, qos=qos) == ok(f"login success {user}")
        assert c.join(ROOM, qos=qos)["Error"] == ""
        assert c.say(ROOM, "hello", qos=qos) == ok("say success")
        assert c.wait_push("Chat/OnChat")["msg"] == "hello"
        c.close()


def test_replies_and_pushes_use_push_qos_1(warren_demo):
    c = client(warren_demo)
    c.login("alice", qos=0)
    c.join(ROOM, qos=0)
    c.say(ROOM, "x", qos=0)
    assert {m.qos for m in c.history()} == {1}
    c.close()


def test_counter_topics_like_the_web_client(warren_demo):
    # The web library appends /<++n> to every request topic; each reply comes back on its own.
    c = client(warren_demo)
    assert c.request("Login/HD_Login", login_body("alice")) == ok("login success alice")
    assert c.request("Chat/HD_JoinChat", {"roomName": ROOM}) == ok({"users": ["alice"]})
    assert [m.topic for m in c.history()] == ["Login/HD_Login/1", "Chat/HD_JoinChat/2"]
    c.close()


# ---------------------------------------------------------------------------------------------
# the habits of mqant's clients
# ---------------------------------------------------------------------------------------------


class HabitualClient(ChatClient):
    """Behaves like upstream's Python client: (un)subscribes after every message it receives."""

    def _on_message(self, client, userdata, msg):
        super()._on_message(client, userdata, msg)
        client.subscribe([("chat", 2), ("aaa", 2)])
        client.unsubscribe(["chat"])


def test_python_client_habits(warren_demo):
    opts = dict(FLAVOURS["tcp-3.1"])
    alice = HabitualClient(warren_demo.mqtt_mqant, client_id="111", **opts)
    bob = HabitualClient(warren_demo.mqtt_mqant, client_id="112", **opts)
    assert alice.subscribe([("chat", 2), ("aaa", 2)]) == [1, 1]
    alice.unsubscribe(["chat"])

    assert alice.login("alice", qos=2) == ok("login success alice")
    assert bob.login("bob", qos=2) == ok("login success bob")
    assert alice.join(ROOM, qos=2) == ok({"users": ["alice"]})
    assert bob.join(ROOM, qos=2) == ok({"users": ["alice", "bob"]})
    assert alice.wait_push("Chat/OnJoin") == {"roomName": ROOM, "user": "bob"}
    for i in range(5):
        assert alice.say(ROOM, f"m{i}", qos=2) == ok("say success")
        assert bob.wait_push("Chat/OnChat")["msg"] == f"m{i}"
        assert bob.say(ROOM, f"r{i}", target="alice", qos=1) == ok("say success")
        assert alice.wait_push("Chat/OnChat", lambda b, i=i: b["msg"] == f"r{i}") == {
            "from": "bob",
            "msg": f"r{i}",
            "roomName": ROOM,
            "target": "alice",
        }
    # every SUBACK grants min(requested, 1) on each topic
    assert alice.subacks and all(codes == [1, 1] for codes in alice.subacks)

    for topic in ("Master/HD_Start_Process/2", "Master/HD_Stop_Process/2"):
        assert alice.request(topic, {"ProcessID": "001"}, qos=2) == err("Service(type:Master) not found")
    alice.close()
    bob.close()


# ---------------------------------------------------------------------------------------------
# 2.2 errors
# ---------------------------------------------------------------------------------------------


def test_errors_before_login(warren_demo):
    c = client(warren_demo)
    say = {"roomName": ROOM, "from": "x", "target": "*", "content": "hi"}
    assert c.request("Chat/HD_Say", say) == err("Not Logined")
    assert c.request("Chat/HD_JoinChat", {"roomName": ROOM}) == err("Not Logined")
    # the gate refuses every call before login (only login handlers answer), so upstream's
    # order — roomName checked before the login — is not observable any more
    assert c.request("Chat/HD_JoinChat", {"roomName": ""}) == err("Not Logined")
    c.close()


def test_login_bad_input_is_a_result(warren_demo):
    c = client(warren_demo)
    nil = ok("userName or passWord cannot be nil")
    assert c.request("Login/HD_Login", {"userName": "alice"}) == nil
    assert c.request("Login/HD_Login", {"passWord": PASSWORD}) == nil
    assert c.request("Login/HD_Login", {"userName": 5, "passWord": PASSWORD}) == nil
    assert c.request("Login/HD_Login", {"userName": "alice", "passWord": None}) == nil
    # still not logged in
    assert c.request("Chat/HD_JoinChat", {"roomName": ROOM}) == err("Not Logined")
    c.close()


def test_gate_errors(warren_demo):
    c = client(warren_demo)
    assert c.request("Login/HD_Login", b"x") == err("body must be JSON format")
    assert c.request("Nope/HD_X", {}) == err("Service(type:Nope) not found")
    assert c.request("Login/getRand", {}) == err("Method(getRand) must begin with 'HD_'")
    c.close()


def test_chat_errors_after_login(warren_demo):
    alice = client(warren_demo)
    bob = client(warren_demo)
    alice.login("alice")
    bob.login("bob")

    assert alice.request("Chat/HD_JoinChat", {"roomName": ""}) == err("roomName cannot be nil")
    assert alice.request("Chat/HD_JoinChat", {}) == err("roomName cannot be nil")
    assert alice.say("nowhere", "hi") == err("No room")

    assert bob.join("lobby") == ok({"users": ["bob"]})
    assert alice.say("lobby", "hi") == err("You haven't been in the room yet")

    assert alice.join(ROOM) == ok({"users": ["alice"]})
    assert alice.say(ROOM, "hi", target="bob") == err("This user haven't been in the room yet")
    assert alice.request("Chat/HD_Say", {"roomName": ROOM, "target": "*"}) == err("roomName or say cannot be nil")
    assert alice.request("Chat/HD_Say", {"content": "hi", "target": "*"}) == err("roomName or say cannot be nil")
    # a missing target means everyone
    assert alice.request("Chat/HD_Say", {"roomName": ROOM, "content": "all"}) == ok("say success")
    assert alice.wait_push("Chat/OnChat") == {"from": "alice", "msg": "all", "roomName": ROOM, "target": "*"}
    # `from` is ignored: the sender is the bound user
    assert alice.request("Chat/HD_Say", {"roomName": ROOM, "from": "mallory", "target": "*", "content": "x"}) == ok(
        "say success"
    )
    assert alice.wait_push("Chat/OnChat")["from"] == "alice"
    alice.close()
    bob.close()


# ---------------------------------------------------------------------------------------------
# rejoin, departure, shared client ids
# ---------------------------------------------------------------------------------------------


def test_a_second_login_of_a_live_user_is_refused_by_default(warren_demo):
    old = client(warren_demo)
    old.login("alice")
    new = client(warren_demo, "ws-3.1.1")
    # [auth] uid_conflict = "reject": alice cannot be taken over by whoever names her
    assert new.login("alice") == err("user alice is already logged in")
    assert old.join(ROOM) == ok({"users": ["alice"]})
    assert new.join(ROOM) == err("Not Logined")
    old.close()
    new.close()


@pytest.fixture
def warren_kick_old(tmp_path):
    """The demo's Login and Chat with `[auth] uid_conflict = "kick_old"`."""
    from conftest import Warren

    cfg = tmp_path / "kick_old.toml"
    cfg.write_text('[[module]]\ntype = "Login"\n\n[[module]]\ntype = "Chat"\n\n[auth]\nuid_conflict = "kick_old"\n')
    w = Warren("--config", str(cfg), listen=["mqtt+mqant", "ws+mqant"], http=False)
    try:
        w.wait_ready()
        yield w
    finally:
        w.kill()


def test_rejoin_replaces_the_members_session(warren_kick_old):
    old = client(warren_kick_old)
    bob = client(warren_kick_old)
    old.login("alice")
    bob.login("bob")
    assert old.join(ROOM) == ok({"users": ["alice"]})
    assert bob.join(ROOM) == ok({"users": ["alice", "bob"]})
    old.wait_push("Chat/OnJoin")

    # uid_conflict = "kick_old": the new login closes the older session, whose departure the
    # room hears
    new = client(warren_kick_old, "ws-3.1.1")
    assert new.login("alice") == ok("login success alice")
    assert old.wait_disconnected(5)
    assert bob.wait_push("Chat/OnLeave") == {"roomName": ROOM, "user": "alice"}
    reply = new.join(ROOM)
    assert reply["Error"] == ""
    assert sorted(reply["Result"]["users"]) == ["alice", "bob"]
    # the other members hear of the rejoin again
    assert bob.wait_push("Chat/OnJoin") == {"roomName": ROOM, "user": "alice"}

    # pushes for alice now reach the new session
    assert bob.say(ROOM, "to you", target="alice") == ok("say success")
    assert new.wait_push("Chat/OnChat")["msg"] == "to you"
    new.close()
    bob.close()


@pytest.mark.parametrize("clean", [True, False], ids=["disconnect", "dropped"])
def test_on_leave_when_a_member_goes(warren_demo, clean):
    alice, bob, carol = (client(warren_demo) for _ in range(3))
    for c, name in ((alice, "alice"), (bob, "bob"), (carol, "carol")):
        assert c.login(name) == ok(f"login success {name}")
        assert c.join(ROOM)["Error"] == ""

    bob.close(clean=clean)
    leave = {"roomName": ROOM, "user": "bob"}
    assert alice.wait_push("Chat/OnLeave") == leave
    assert carol.wait_push("Chat/OnLeave") == leave

    assert alice.say(ROOM, "bob?", target="bob") == err("This user haven't been in the room yet")
    assert alice.say(ROOM, "bye") == ok("say success")
    assert carol.wait_push("Chat/OnChat", lambda b: b["msg"] == "bye")

    dave = client(warren_demo)
    dave.login("dave")
    assert dave.join(ROOM) == ok({"users": ["alice", "carol", "dave"]})
    for c in (alice, carol, dave):
        c.close()


def test_same_client_id_twice_in_mqant_mode(warren_demo):
    first = client(warren_demo, "tcp-3.1", client_id="111")
    second = client(warren_demo, "ws-3.1.1", client_id="111")
    third = client(warren_demo, "tcp-3.1.1", client_id="111")
    assert first.login("alice") == ok("login success alice")
    assert second.login("bob") == ok("login success bob")
    assert third.login("carol") == ok("login success carol")
    for c in (first, second, third):
        assert c.join(ROOM)["Error"] == ""
    assert first.say(ROOM, "all here") == ok("say success")
    for c in (first, second, third):
        assert c.wait_push("Chat/OnChat", lambda b: b["msg"] == "all here")
    assert not first.wait_disconnected(0.1)
    for c in (first, second, third):
        c.close()


def test_debug_module_echo(warren_demo):
    # The Debug module of the test binary answers with the body unchanged.
    c = client(warren_demo)
    body = {"a": 1, "b": [1, 2, {"c": "d"}], "s": "ünïcode"}
    assert c.request("Debug/HD_Echo", body) == ok(body)
    c.close()

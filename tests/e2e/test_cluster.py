"""The chat demo spread over three `warren` processes joined by a real broker (docs/cluster.md):
a gate that owns the connections, and two module nodes running Login and Chat.

Each bus is tested with the real server from Debian, started by the test on free ports; the
failure tests kill module nodes and brokers for real.
"""

from __future__ import annotations

import socket
import subprocess
import threading
import time
import zlib

import pytest
from brokers import Broker, installed
from chat import ChatClient
from conftest import Warren, wait_until

ROOM = "mqant"

# bus kind -> (bus broker, registry broker: None means the bus's own URL)
SETUPS = {
    "nats": ("nats", None),
    "redis": ("redis", None),
    "amqp": ("amqp", "nats"),
}


@pytest.fixture
def brokers():
    """Brokers by kind, started on demand and stopped after the test."""
    started: dict[str, Broker] = {}

    def get(kind: str) -> Broker:
        if not installed(kind):
            pytest.fail(f"{kind} server is not installed (scripts/test installs it)")
        if kind not in started:
            started[kind] = Broker(kind)
        return started[kind]

    yield get
    for b in started.values():
        b.close()


def joined(w: Warren, *nodes: str) -> bool:
    log = w.log()
    return all(f"node={n}" in log for n in nodes)


class Cluster:
    """A gate and module nodes on one bus."""

    def __init__(self, bus: str, registry: str, nodes=("chat1", "chat2"), extra: dict | None = None) -> None:
        self.flags = ["--bus", bus, "--registry", registry]
        self.gate = Warren(*self.flags, "--node-id", "gate", "--no-demo-modules", listen=["mqtt+mqant"], http=False)
        self.gate.wait_ready()
        self.nodes: dict[str, Warren] = {}
        for n in nodes:
            self.add(n, *(extra or {}).get(n, ()))

    def add(self, name: str, *args: str) -> Warren:
        w = Warren(*self.flags, "--node-id", name, *args, command="node")
        wait_until(lambda: "ready" in w.stdout() or not w.running(), timeout=20, msg=f"{name} not ready")
        assert w.running(), w.tail()
        self.nodes[name] = w
        wait_until(lambda: joined(self.gate, name), timeout=15, msg=f"the gate never saw {name}\n{self.gate.tail()}")
        return w

    def client(self, user: str) -> ChatClient:
        c = ChatClient(self.gate.mqtt_mqant, client_id=f"{user}-c")
        assert c.login(user) == {"Error": "", "Result": f"login success {user}"}
        return c


@pytest.mark.parametrize("bus", list(SETUPS))
def test_chat_across_three_nodes(brokers, bus):
    kind, reg_kind = SETUPS[bus]
    b = brokers(kind)
    registry = brokers(reg_kind).url if reg_kind else b.url
    cl = Cluster(b.url, registry)
    users = ["alice", "bob", "carol", "dave"]
    clients = {u: cl.client(u) for u in users}
    for i, u in enumerate(users):
        r = clients[u].join(ROOM)
        assert r["Error"] == "", r
        assert r["Result"]["users"] == users[: i + 1]
    # joins reached the members already there, wherever the Chat instance runs
    assert clients["alice"].wait_push("Chat/OnJoin", lambda p: p["user"] == "dave")
    assert clients["alice"].say(ROOM, "hello from alice") == {"Error": "", "Result": "say success"}
    for u in users:
        push = clients[u].wait_push("Chat/OnChat", lambda p: p["msg"] == "hello from alice")
        assert push == {"from": "alice", "msg": "hello from alice", "roomName": ROOM, "target": "*"}
    # one member to another, and the leave notice when a connection closes
    assert clients["bob"].say(ROOM, "psst", target="carol")["Error"] == ""
    assert clients["carol"].wait_push("Chat/OnChat", lambda p: p["msg"] == "psst")["from"] == "bob"
    clients["dave"].close()
    assert clients["alice"].wait_push("Chat/OnLeave", lambda p: p["user"] == "dave")
    assert all(w.running() for w in cl.nodes.values())


def test_one_sessions_requests_keep_their_order_across_the_bus(brokers):
    # requests fired without waiting are handled in the order sent: Chat broadcasts each message
    # as it handles it, so the room sees them in that order
    b = brokers("nats")
    cl = Cluster(b.url, b.url, nodes=("chat1",))
    alice, bob = cl.client("alice"), cl.client("bob")
    assert alice.join(ROOM)["Error"] == "" and bob.join(ROOM)["Error"] == ""
    n = 200
    for i in range(n):
        body = {"roomName": ROOM, "from": "alice", "target": "*", "content": f"m{i}"}
        alice.publish(f"Chat/HD_Say/{i + 100}", body, qos=0)
    wait_until(lambda: len(bob.pushes("Chat/OnChat")) >= n, timeout=20, msg=f"{len(bob.pushes('Chat/OnChat'))} of {n} messages")
    got = [p["msg"] for _, p in bob.pushes("Chat/OnChat")]
    assert got == [f"m{i}" for i in range(n)]


def ring_owner(members: list[str], key: str) -> str:
    """The member of a stathat/consistent ring (docs/cluster.md, "Routing") that `key` maps to."""
    points: dict[int, str] = {}
    for m in sorted(x.strip().lower() for x in members):
        for i in range(20):
            points[zlib.crc32(f"{i}{m}".encode())] = m
    h = zlib.crc32(key.encode())
    for p in sorted(points):
        if p > h:
            return points[p]
    return points[min(points)]


def test_killed_module_node_fails_its_calls_fast_and_the_room_moves(brokers):
    b = brokers("nats")
    # the demo's Chat router keys a room by its name: find the node that holds ours, and kill it
    owner = ring_owner(["Chat-chat1", "Chat-chat2"], f"room:{ROOM}").split("-")[1]
    survivor = "chat1" if owner == "chat2" else "chat2"
    cl = Cluster(b.url, b.url, extra={owner: ("--module", "Debug")})
    alice, bob, carol = cl.client("alice"), cl.client("bob"), cl.client("carol")
    assert alice.join(ROOM)["Error"] == ""
    assert bob.join(ROOM)["Error"] == ""
    # a call in flight on the node that dies
    topic = "Debug/HD_Hang/1"
    alice.publish(topic, {})
    # and load on the room while it dies: every request ends in a reply, success or typed error
    results: list[dict] = []
    errors: list[Exception] = []

    def load() -> None:
        for i in range(60):
            try:
                results.append(carol.request("Login/HD_Login", {"userName": "carol", "passWord": "x"}, timeout=8))
            except Exception as e:  # noqa: BLE001 - a lost reply is what the test looks for
                errors.append(e)
            time.sleep(0.02)

    t = threading.Thread(target=load)
    t.start()
    time.sleep(0.3)
    killed_at = time.monotonic()
    cl.nodes[owner].kill()
    reply = wait_until(lambda: [m for m in alice.history() if m.topic == topic], timeout=10)[0]
    took = time.monotonic() - killed_at
    t.join()
    assert reply.body == {"Error": f"node {owner} left the cluster", "Result": None}
    assert took < 5, f"the call ended only after {took:.1f} s (its deadline is 5 s)"
    assert not errors, f"requests without any reply: {errors}"
    assert all(r["Error"] == "" or r["Error"] for r in results) and len(results) == 60
    # new calls go to the survivor, which takes the room over from the gate's group: members
    # keep chatting without joining again; the gate's sessions are intact
    r = bob.say(ROOM, "still here")
    assert r == {"Error": "", "Result": "say success"}, r
    assert alice.wait_push("Chat/OnChat", lambda p: p["msg"] == "still here")["from"] == "bob"
    assert "room taken over" in cl.nodes[survivor].log()
    assert cl.gate.running()


@pytest.mark.parametrize("bus", list(SETUPS))
def test_broker_restart_gives_typed_errors_then_traffic_resumes(brokers, bus):
    kind, reg_kind = SETUPS[bus]
    b = brokers(kind)
    registry = brokers(reg_kind).url if reg_kind else b.url
    cl = Cluster(b.url, registry, nodes=("chat1",))
    alice = cl.client("alice")
    assert alice.join(ROOM)["Error"] == ""
    b.kill()
    r = alice.say(ROOM, "into the void", timeout=8)
    assert r["Error"].startswith("rpc service connection failed"), r
    b.start()  # same port; nothing of the broker's state is kept (Redis) or needed

    def works() -> bool:
        try:
            return alice.say(ROOM, "back", timeout=2)["Error"] == ""
        except Exception:
            return False

    wait_until(works, timeout=60, interval=0.5, msg="traffic did not resume after the broker restart")
    assert all(w.running() for w in [cl.gate, *cl.nodes.values()])
    assert "panic" not in cl.gate.log() and "panic" not in cl.nodes["chat1"].log()


def test_hostile_frames_on_the_bus_are_dropped(brokers):
    b = brokers("nats")
    cl = Cluster(b.url, b.url, nodes=("chat1",))
    with socket.create_connection(("127.0.0.1", b.port)) as s:
        s.recv(4096)  # INFO
        for payload in [b"hello", b"W\x01\xc1", b"\x00" * 100, b"W\x02\x01" + b"\x07" * 30, b"W\x02\x03" + b"\x00" * 8 + b"\xff\xff"]:
            s.sendall(b'CONNECT {"verbose":false}\r\nPUB warren.node.chat1 %d\r\n%s\r\n' % (len(payload), payload))
        s.sendall(b"PING\r\n")
        time.sleep(0.5)
    alice = cl.client("alice")
    assert alice.join(ROOM)["Error"] == ""
    wait_until(lambda: "dropped a frame" in cl.nodes["chat1"].log(), timeout=5)
    assert cl.nodes["chat1"].running()


def test_example_configs_check_and_bad_urls_are_refused():
    from conftest import REPO_ROOT, warren_bin

    bin_ = str(warren_bin())
    for f in ["examples/cluster/gate.toml", "examples/cluster/node.toml"]:
        r = subprocess.run([bin_, "check-config", f], cwd=REPO_ROOT, capture_output=True, text=True)
        assert r.returncode == 0 and r.stdout.startswith("ok"), r.stderr
    # a remote bus with no shared registry, and an unknown scheme: refused before anything starts
    for args, why in [
        (["--bus", "amqp://guest:guest@127.0.0.1:1/%2f"], "registry.url"),
        (["--bus", "kafka://127.0.0.1:1"], "bus.url"),
        (["--bus", "nats://127.0.0.1:1"], "nats://127.0.0.1:1"),
    ]:
        r = subprocess.run([bin_, "node", *args], cwd=REPO_ROOT, capture_output=True, text=True, timeout=30)
        assert r.returncode != 0 and why in r.stderr, (args, r.stderr)

"""Default-mode MQTT across the gates of a cluster (docs/protocols/mqtt.md, "Across gates"):
two or three `warren serve` gates on one bus act as one MQTT server, and a persistent session
follows its client from one gate to another.

Each bus (NATS with JetStream, Redis) is the real server from Debian, started by the test on a
free port. Clients are paho-mqtt. Every check waits for a marker published after the messages
under test (forwards from one gate keep their order), then counts: each subscriber gets each
message exactly once.
"""

from __future__ import annotations

import re
import socket
import threading
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest
from brokers import Broker, installed
from conftest import Warren, wait_until
from rawmqtt import connected, granted, parse_publish, puback, publish_packet, sync

BUSES = ["nats", "redis"]
WAIT = 20


@pytest.fixture(params=BUSES)
def bus(request):
    if not installed(request.param):
        pytest.fail(f"{request.param} server is not installed (scripts/test installs it)")
    b = Broker(request.param)
    yield b
    b.close()


def saw_join(w: Warren, name: str) -> bool:
    return any("node joined" in line and f"node={name}" in line for line in w.log().splitlines())


class Gates:
    """Gates on one bus; each new one is waited for until every other gate has seen it."""

    def __init__(self, broker: Broker) -> None:
        self.broker = broker
        self.gates: dict[str, Warren] = {}

    def add(self, name: str, store: Path | None = None) -> Warren:
        """A gate named `name`; with `store`, its `[mqtt] store` is that file."""
        url = self.broker.url
        config: list[str] = []
        if store is not None:
            cfg = store.with_suffix(".toml")
            cfg.write_text(f'[mqtt]\nstore = "{store}"\nsys_interval = 0\n')
            config = ["--config", str(cfg)]
        w = Warren(*config, "--bus", url, "--registry", url, "--node-id", name, "--no-demo-modules", listen=["mqtt"], http=False)
        w.wait_ready()
        for other, g in self.gates.items():
            wait_until(lambda g=g: saw_join(g, name), timeout=WAIT, msg=f"{other} never saw {name}\n{g.tail()}")
        self.gates[name] = w
        return w

    def close(self) -> None:
        for g in self.gates.values():
            g.kill()


@pytest.fixture
def gates(bus):
    g = Gates(bus)
    yield g
    g.close()


class Client:
    """A paho client recording every PUBLISH it receives as (topic, payload, qos, retain)."""

    def __init__(self, w: Warren, client_id: str, will: tuple[str, bytes, int] | None = None, clean: bool = True) -> None:
        self.got: list[tuple[str, bytes, int, bool]] = []
        self.lock = threading.Lock()
        self.c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=client_id, clean_session=clean)
        self.c.on_message = self._on_message
        # the CONNACK's session-present flag, once connected
        self.present: list[bool] = []
        self.c.on_connect = lambda _c, _u, flags, *_: self.present.append(bool(flags.session_present))
        if will is not None:
            self.c.will_set(will[0], will[1], qos=will[2])
        self.subscribed = threading.Event()
        self.c.on_subscribe = lambda *a: self.subscribed.set()
        self.c.connect("127.0.0.1", w.mqtt_plain, keepalive=30)
        self.c.loop_start()

    def _on_message(self, _c, _u, m) -> None:
        with self.lock:
            self.got.append((m.topic, bytes(m.payload), m.qos, bool(m.retain)))

    def subscribe(self, *filters: tuple[str, int]) -> None:
        self.subscribed.clear()
        self.c.subscribe(list(filters))
        assert self.subscribed.wait(WAIT), "no SUBACK"

    def publish(self, topic: str, payload: bytes, qos: int = 0, retain: bool = False) -> None:
        self.c.publish(topic, payload, qos=qos, retain=retain).wait_for_publish(WAIT)

    def messages(self, topic: str | None = None) -> list[tuple[str, bytes, int, bool]]:
        with self.lock:
            return [m for m in self.got if topic is None or m[0] == topic]

    def wait_for(self, topic: str, count: int = 1) -> list[tuple[str, bytes, int, bool]]:
        return wait_until(lambda: len(self.messages(topic)) >= count and self.messages(topic), timeout=WAIT, msg=f"{topic} never arrived: {self.messages()}")

    def close(self) -> None:
        self.c.disconnect()
        self.c.loop_stop()

    def drop(self) -> None:
        """End the connection without DISCONNECT (as a crash would)."""
        self.c.loop_stop()
        s = self.c.socket()
        if s is not None:
            s.shutdown(socket.SHUT_RDWR)
            s.close()


def test_publishes_cross_gates_both_ways_once_at_the_granted_qos(gates):
    a, b = gates.add("gate-a"), gates.add("gate-b")
    on_a, on_b = Client(a, "sub-a"), Client(b, "sub-b")
    on_a.subscribe(("sensors/#", 1), ("marker/#", 1))
    # overlapping filters on B: one message per publish, at the highest granted QoS
    on_b.subscribe(("sensors/+/temp", 0), ("sensors/#", 1), ("marker/#", 1))
    pub_a, pub_b = Client(a, "pub-a"), Client(b, "pub-b")
    binary = bytes(range(256))
    pub_b.publish("sensors/1/temp", b"b-qos0", qos=0)
    pub_b.publish("sensors/1/temp", b"b-qos1", qos=1)
    pub_b.publish("sensors/bin", binary, qos=1)
    pub_a.publish("sensors/2/temp", b"a-qos1", qos=1)
    pub_a.publish("elsewhere/x", b"not subscribed", qos=1)
    pub_b.publish("marker/b", b"end", qos=1)
    pub_a.publish("marker/a", b"end", qos=1)
    for c in (on_a, on_b):
        c.wait_for("marker/a")
        c.wait_for("marker/b")
        got = [(t, p, q) for t, p, q, _ in c.messages() if not t.startswith("marker/")]
        assert sorted(got) == sorted(
            [
                ("sensors/1/temp", b"b-qos0", 0),
                ("sensors/1/temp", b"b-qos1", 1),
                ("sensors/bin", binary, 1),
                ("sensors/2/temp", b"a-qos1", 1),
            ]
        ), got
        assert not any(r for *_, r in c.messages()), "the retain flag is clear on forwarding"
    for c in (on_a, on_b, pub_a, pub_b):
        c.close()


def test_a_qos0_subscription_gets_a_qos1_publish_from_another_gate_at_qos0(gates):
    a, b = gates.add("gate-a"), gates.add("gate-b")
    sub = Client(a, "sub-q0")
    sub.subscribe(("q/#", 0))
    pub = Client(b, "pub-q1")
    pub.publish("q/1", b"x", qos=1)
    assert [(t, p, q) for t, p, q, _ in sub.wait_for("q/1")] == [("q/1", b"x", 0)]
    sub.close()
    pub.close()


def test_a_will_published_on_one_gate_reaches_another(gates):
    a, b = gates.add("gate-a"), gates.add("gate-b")
    watcher = Client(a, "watcher")
    watcher.subscribe(("will/#", 1))
    dying = Client(b, "dying", will=("will/dying", b"gone", 1))
    polite = Client(b, "polite", will=("will/polite", b"never", 1))
    polite.close()
    dying.drop()
    assert [(t, p, q) for t, p, q, _ in watcher.wait_for("will/dying")] == [("will/dying", b"gone", 1)]
    # the marker after the will: the polite client's will never comes
    Client(b, "marker").publish("will/marker", b"m", qos=1)
    watcher.wait_for("will/marker")
    assert watcher.messages("will/polite") == []
    watcher.close()


def retained_on(w: Warren, filt: str, marker: str, cid: str) -> list[tuple[str, bytes, int, bool]]:
    """What a new subscription to `filt` on `w` receives as retained copies (up to a marker)."""
    c = Client(w, cid)
    c.subscribe((filt, 1), (marker, 1))
    Client(w, cid + "-m").publish(marker, b"m", qos=1)
    c.wait_for(marker)
    got = [m for m in c.messages() if m[0] != marker]
    c.close()
    return got


def test_retained_messages_are_shared_deleted_and_seen_by_a_gate_started_later(gates):
    a, b = gates.add("gate-a"), gates.add("gate-b")
    pub = Client(a, "retainer")
    pub.publish("config/lamp", b"on", qos=1, retain=True)
    pub.publish("config/door", b"\x00locked\xff", qos=0, retain=True)
    pub.publish("config/gone", b"soon deleted", qos=1, retain=True)
    # a subscriber on B: the retained copies at SUBSCRIBE (flag set), then each later retained
    # publish once, flag clear (it was forwarded live)
    sync = Client(b, "sync-b")
    sync.subscribe(("config/sync", 1))
    pub.publish("config/sync", b"s", qos=1)
    sync.wait_for("config/sync")
    live = Client(b, "live")
    live.subscribe(("config/#", 1))
    pub.publish("config/lamp", b"off", qos=1, retain=True)
    pub.publish("config/gone", b"", qos=1, retain=True)
    pub.publish("config/marker", b"m", qos=1)
    live.wait_for("config/marker")
    assert live.messages("config/lamp") == [("config/lamp", b"on", 1, True), ("config/lamp", b"off", 1, False)]
    assert live.messages("config/gone") == [("config/gone", b"soon deleted", 1, True), ("config/gone", b"", 1, False)]
    assert live.messages("config/door") == [("config/door", b"\x00locked\xff", 0, True)]
    live.close()
    sync.close()

    want = sorted([("config/door", b"\x00locked\xff", 0, True), ("config/lamp", b"off", 1, True)])
    assert sorted(retained_on(b, "config/#", "mark/b", "new-on-b")) == want
    # replaced and deleted on B: seen on A
    pub_b = Client(b, "retainer-b")
    pub_b.publish("config/door", b"open", qos=1, retain=True)
    pub_b.publish("config/lamp", b"", qos=1, retain=True)
    pub_b.publish("mark/sync", b"s", qos=1)
    sync = Client(a, "sync")
    sync.subscribe(("mark/sync2", 1))
    pub_b.publish("mark/sync2", b"s", qos=1)
    sync.wait_for("mark/sync2")
    assert sorted(retained_on(a, "config/#", "mark/a", "new-on-a")) == [("config/door", b"open", 1, True)]

    # a gate that starts now reads the shared store: what was retained and not deleted
    c = gates.add("gate-c")
    assert sorted(retained_on(c, "config/#", "mark/c", "new-on-c")) == [("config/door", b"open", 1, True)]
    log = c.log()
    assert re.search(r"retained messages loaded from the cluster's shared store.*kept=1", log), log[-3000:]
    # three gates: a live publish on each reaches a subscriber on each other gate once
    subs = {name: Client(g, f"three-{name}") for name, g in gates.gates.items()}
    for x in subs.values():
        x.subscribe(("three/#", 1))
    for name, g in gates.gates.items():
        p = Client(g, f"three-pub-{name}")
        p.publish(f"three/{name}", name.encode(), qos=1)
        p.publish(f"three/end-{name}", b"", qos=1)
        p.close()
    for x in subs.values():
        for name in gates.gates:
            x.wait_for(f"three/end-{name}")
        assert sorted(m[:3] for m in x.messages() if "end" not in m[0]) == sorted((f"three/{n}", n.encode(), 1) for n in gates.gates)
        x.close()
    for x in (pub, pub_b, sync):
        x.close()


def publish_raw(w: Warren, client_id: str, messages: list[tuple[str, bytes]]) -> None:
    """Publish QoS 1 messages from a raw client and wait until the gate has routed them all (its
    PINGRESP comes after the PUBLISHes it read before)."""
    c = connected(w.mqtt_plain, client_id, clean=True)
    for i, (topic, payload) in enumerate(messages, start=1):
        c.send(publish_packet(topic, payload, qos=1, pkid=i))
    acks = sync(c)
    assert [first for first, _ in acks] == [0x40] * len(messages), acks
    c.close()


def test_a_persistent_session_resumes_on_another_gate_with_its_queue_and_subscriptions(gates):
    a, b = gates.add("gate-a"), gates.add("gate-b")
    mover = Client(a, "mover", clean=False)
    mover.subscribe(("t/#", 1))
    mover.close()
    # queued for the offline session on gate A
    queued = [(f"t/{i}", f"m{i}".encode()) for i in range(5)]
    publish_raw(a, "pub-a", queued)
    # the client comes back on gate B: the session comes with it
    back = Client(b, "mover", clean=False)
    wait_until(lambda: back.present, timeout=WAIT, msg="no CONNACK on gate B")
    assert back.present == [True], "session present = 1 on the new gate"
    got = wait_until(lambda: len(back.messages()) >= 5 and back.messages(), timeout=WAIT, msg=f"queued messages never arrived: {back.messages()}")
    assert [(t, p, q) for t, p, q, _ in got] == [(t, p, 1) for t, p in queued], "the queue, in order"
    # its subscription now lives on gate B: publishes on either gate reach it once
    publish_raw(a, "pub-a2", [("t/from-a", b"a")])
    back.wait_for("t/from-a")
    publish_raw(b, "pub-b", [("t/from-b", b"b")])
    back.wait_for("t/from-b")
    # a marker after both: nothing came twice
    publish_raw(a, "pub-a3", [("t/end", b"")])
    back.wait_for("t/end")
    assert [m[0] for m in back.messages()] == [t for t, _ in queued] + ["t/from-a", "t/from-b", "t/end"], back.messages()
    assert "persistent session handed over to another gate" in a.log(), a.tail()
    back.close()
    # gate A holds nothing of it any more, gate B does: a persistent reconnect to A takes it back
    again = connected(a.mqtt_plain, "mover", clean=False, expect=b"\x20\x02\x01\x00")
    again.close()


def test_a_connected_client_id_is_taken_over_from_another_gate(gates):
    a, b = gates.add("gate-a"), gates.add("gate-b")
    first = connected(a.mqtt_plain, "twice", clean=False)
    assert granted(first, [("x/#", 1)]) == [1]
    sync(first)
    # the same client id on gate B: the connection on A is closed, the session moves
    second = connected(b.mqtt_plain, "twice", clean=False, expect=b"\x20\x02\x01\x00")
    assert first.closed(WAIT), "the connection on gate A was not closed"
    publish_raw(a, "pub-x", [("x/1", b"after")])
    first_byte, body = second.recv_packet(timeout=WAIT)
    topic, qos, pkid, payload = parse_publish(first_byte, body)
    assert (topic, qos, payload) == ("x/1", 1, b"after")
    second.send(puback(pkid))
    # a clean session taken over too
    third = connected(a.mqtt_plain, "twice-clean", clean=True)
    fourth = connected(b.mqtt_plain, "twice-clean", clean=True, expect=b"\x20\x02\x00\x00")
    assert third.closed(WAIT), "the clean connection on gate A was not closed"
    for c in (second, fourth):
        c.close()


def test_a_clean_session_on_another_gate_discards_the_stored_session(gates):
    a, b = gates.add("gate-a"), gates.add("gate-b")
    c = connected(a.mqtt_plain, "forget-me", clean=False, expect=b"\x20\x02\x00\x00")
    assert granted(c, [("f/#", 1)]) == [1]
    c.close()
    # still stored on A: a persistent reconnect there would find it; a clean one on B discards it
    clean = connected(b.mqtt_plain, "forget-me", clean=True, expect=b"\x20\x02\x00\x00")
    sync(clean)
    clean.close()
    again = connected(a.mqtt_plain, "forget-me", clean=False, expect=b"\x20\x02\x00\x00")
    publish_raw(b, "pub-f", [("f/1", b"nobody")])
    assert again.quiet(1.0), "the discarded subscription still delivers"
    again.close()


def test_a_handed_over_session_is_in_the_new_gates_store_and_survives_its_crash(gates, tmp_path):
    a = gates.add("gate-a", store=tmp_path / "a.redb")
    b = gates.add("gate-b", store=tmp_path / "b.redb")
    c = connected(a.mqtt_plain, "kept", clean=False, expect=b"\x20\x02\x00\x00")
    assert granted(c, [("d/#", 1)]) == [1]
    c.send(b"\xe0\x00")
    c.close()
    publish_raw(a, "pub-d", [(f"d/{i}", f"v{i}".encode()) for i in range(3)])
    # taken over by gate B, whose store now holds it: the first message is read, not acknowledged
    on_b = connected(b.mqtt_plain, "kept", clean=False, expect=b"\x20\x02\x01\x00")
    topic, qos, _, payload = parse_publish(*on_b.recv_packet(timeout=WAIT))
    assert (topic, qos, payload) == ("d/0", 1, b"v0")
    sync(on_b)
    on_b.close()
    b.kill()
    del gates.gates["gate-b"]
    b = gates.add("gate-b", store=tmp_path / "b.redb")
    again = connected(b.mqtt_plain, "kept", clean=False, expect=b"\x20\x02\x01\x00")
    got = []
    for _ in range(3):
        first, body = again.recv_packet(timeout=WAIT)
        topic, qos, pkid, payload = parse_publish(first, body)
        got.append((topic, payload))
        again.send(puback(pkid))
    assert got == [(f"d/{i}", f"v{i}".encode()) for i in range(3)]
    again.close()

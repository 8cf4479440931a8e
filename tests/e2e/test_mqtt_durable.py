"""MQTT durability with `[mqtt] store` (docs/configuration.md "Durability", docs/protocols/mqtt.md
"Durability"): what was acknowledged survives `kill -9` and a restart.

Each test writes a config naming a store file in its own directory, starts the real binary,
kills it with SIGKILL (no drain, no flush) and starts it again on the same file. What must come
back: retained messages; persistent sessions with their subscriptions and their queued QoS 1 / 2
messages, delivered on reconnect in order; the inbound QoS 2 packet ids awaiting PUBREL (a resent
PUBLISH is not delivered twice). The PUBACK rule is checked the hard way: the server is killed
right after the last PUBACK of a burst, and every acknowledged message is there after the restart.
"""

from __future__ import annotations

import struct
import subprocess
import tempfile
import time
from pathlib import Path

import pytest
from conftest import Warren, warren_bin
from rawmqtt import (
    connected,
    granted,
    parse_publish,
    puback,
    pubcomp,
    publish_packet,
    pubrec,
    pubrel,
    RawClient,
    sync,
)

DISCONNECT = b"\xe0\x00"
PRESENT = b"\x20\x02\x01\x00"
NOT_PRESENT = b"\x20\x02\x00\x00"


@pytest.fixture(autouse=True)
def binary_has_the_store(tmp_path: Path):
    """A binary built without the cargo feature `mqtt-store` refuses the key: skip."""
    cfg = tmp_path / "probe.toml"
    cfg.write_text('[mqtt]\nstore = "probe.redb"\n')
    check = subprocess.run([str(warren_bin()), "check-config", str(cfg)], capture_output=True, text=True)
    if check.returncode != 0 and "mqtt-store" in check.stdout + check.stderr:
        pytest.skip("this warren binary was built without the MQTT store (cargo feature mqtt-store)")


class Durable:
    """A config with a store file in a fresh directory; `start()` runs a node on it, `crash()`
    kills it with SIGKILL."""

    def __init__(self) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="warren-durable-"))
        self.store = self.dir / "mqtt.redb"
        self.cfg = self.dir / "warren.toml"
        self.cfg.write_text(f'[mqtt]\nstore = "{self.store}"\nsys_interval = 0\n')
        self.w: Warren | None = None

    def start(self) -> Warren:
        self.w = Warren("--config", str(self.cfg), listen=["mqtt"], http=False).wait_ready()
        return self.w

    def crash(self) -> None:
        assert self.w is not None
        self.w.kill()
        assert self.w.proc.returncode == -9, self.w.proc.returncode

    def stop(self) -> None:
        if self.w is not None:
            self.w.kill()


@pytest.fixture
def node():
    d = Durable()
    try:
        yield d
    finally:
        d.stop()


def client(w: Warren, client_id: str, clean: bool, expect: bytes | None = None) -> RawClient:
    """A raw client of `w` connected with this client id and clean-session flag."""
    return connected(w.mqtt_plain, client_id, clean, expect)


def publish_acked(w: Warren, topic: str, payloads: list[str], qos: int = 1, retain: bool = False) -> None:
    """Publish from a fresh clean client and wait for every PUBACK (QoS 2: PUBREC, PUBCOMP)."""
    p = client(w, f"pub-{time.monotonic_ns()}", clean=True)
    for i, body in enumerate(payloads):
        p.send(publish_packet(topic, body, qos=qos, pkid=i + 1, retain=retain))
    for i in range(len(payloads)):
        first, body = p.recv_packet()
        assert first == (0x40 if qos == 1 else 0x50), f"{first:02x}"
        assert struct.unpack(">H", body)[0] == i + 1
        if qos == 2:
            p.send(pubrel(i + 1))
    if qos == 2:
        for i in range(len(payloads)):
            assert p.recv_packet() == (0x70, struct.pack(">H", i + 1))
    p.send(DISCONNECT)
    p.close()


def publishes(c: RawClient, n: int) -> list[tuple[str, int, int | None, bytes, bool, bool]]:
    """The next `n` packets, each a PUBLISH: (topic, qos, pkid, payload, dup, retain)."""
    out = []
    for _ in range(n):
        first, body = c.recv_packet()
        topic, qos, pkid, payload = parse_publish(first, body)
        out.append((topic, qos, pkid, payload, bool(first & 0x08), bool(first & 0x01)))
    return out


def test_retained_messages_survive_kill_9(node):
    w = node.start()
    publish_acked(w, "d/ret/a", ["kept-a"], retain=True)
    publish_acked(w, "d/ret/b", ["kept-b"], qos=2, retain=True)
    publish_acked(w, "d/ret/gone", ["soon gone"], retain=True)
    publish_acked(w, "d/ret/gone", [""], retain=True)
    publish_acked(w, "d/ret/b", ["replaced-b"], retain=True)
    node.crash()

    w = node.start()
    s = client(w, "ret-reader", clean=True)
    assert granted(s, [("d/ret/#", 2)]) == [2]
    got = publishes(s, 2)
    assert sorted((p[0], p[3], p[5]) for p in got) == [
        ("d/ret/a", b"kept-a", True),
        ("d/ret/b", b"replaced-b", True),
    ]
    for p in got:
        s.send(puback(p[2]))
    assert sync(s) == [], "the deleted topic retains nothing"
    s.send(DISCONNECT)


def test_a_persistent_sessions_subscriptions_and_queue_survive_kill_9_in_order(node):
    w = node.start()
    s = client(w, "dur-sub", clean=False, expect=NOT_PRESENT)
    assert granted(s, [("d/q/#", 1), ("d/other", 0)]) == [1, 0]
    s.send(DISCONNECT)
    s.close()
    publish_acked(w, "d/q/t", [f"m{i}" for i in range(1, 6)])
    publish_acked(w, "d/q/t", ["m6"], qos=2)
    node.crash()

    w = node.start()
    # the subscription is back in the trie: published while the client is still away, queued
    publish_acked(w, "d/q/t", ["m7"])
    s = client(w, "dur-sub", clean=False, expect=PRESENT)
    got = publishes(s, 7)
    assert [p[3] for p in got] == [f"m{i}".encode() for i in range(1, 8)]
    assert all(p[1] == 1 for p in got), got
    for p in got:
        s.send(puback(p[2]))
    assert sync(s) == []
    s.send(DISCONNECT)


def test_sent_but_unacknowledged_messages_are_resent_with_dup_after_kill_9(node):
    w = node.start()
    s = client(w, "dur-inflight", clean=False)
    assert granted(s, [("d/in/#", 1)]) == [1]
    publish_acked(w, "d/in/t", ["a", "b", "c"])
    first = publishes(s, 3)
    assert [p[3] for p in first] == [b"a", b"b", b"c"]
    s.close()  # no PUBACK at all
    # the store commits writes in the order they were made: once this retained message is
    # acknowledged, the "sent with this packet id" states written as the three went out are on
    # disk too
    publish_acked(w, "d/barrier", ["x"], retain=True)
    node.crash()

    w = node.start()
    s = client(w, "dur-inflight", clean=False, expect=PRESENT)
    again = publishes(s, 3)
    assert [(p[2], p[3], p[4]) for p in again] == [
        (first[0][2], b"a", True),
        (first[1][2], b"b", True),
        (first[2][2], b"c", True),
    ], "resent in order with their packet ids and DUP"
    for p in again:
        s.send(puback(p[2]))
    assert sync(s) == []
    s.send(DISCONNECT)


def test_a_clean_start_deletes_the_stored_session(node):
    w = node.start()
    s = client(w, "dur-clean", clean=False)
    assert granted(s, [("d/c/#", 1)]) == [1]
    s.send(DISCONNECT)
    s.close()
    publish_acked(w, "d/c/t", ["old"])
    c = client(w, "dur-clean", clean=True, expect=NOT_PRESENT)
    c.send(DISCONNECT)
    c.close()
    # written after the delete: once it is durable, so is the delete before it
    publish_acked(w, "d/unrelated", ["x"], retain=True)
    node.crash()

    w = node.start()
    s = client(w, "dur-clean", clean=False, expect=NOT_PRESENT)
    publish_acked(w, "d/c/t", ["new"])
    assert sync(s) == [], "no subscription and no queue survived the clean start"
    s.send(DISCONNECT)


def test_inbound_qos2_is_not_delivered_twice_across_a_restart(node):
    w = node.start()
    sub = client(w, "q2-sub", clean=False)
    assert granted(sub, [("d/q2/#", 2)]) == [2]
    sub.send(DISCONNECT)
    sub.close()
    pub = client(w, "q2-pub", clean=False)
    pub.send(publish_packet("d/q2/t", "exactly-once", qos=2, pkid=7))
    assert pub.recv_packet() == (0x50, struct.pack(">H", 7)), "PUBREC"
    pub.close()  # no PUBREL before the crash
    node.crash()

    w = node.start()
    pub = client(w, "q2-pub", clean=False, expect=PRESENT)
    # the client resends the PUBLISH with DUP: answered PUBREC, not routed again
    pub.send(publish_packet("d/q2/t", "exactly-once", qos=2, pkid=7, dup=True))
    assert pub.recv_packet() == (0x50, struct.pack(">H", 7))
    pub.send(pubrel(7))
    assert pub.recv_packet() == (0x70, struct.pack(">H", 7)), "PUBCOMP"
    pub.send(DISCONNECT)
    pub.close()

    sub = client(w, "q2-sub", clean=False, expect=PRESENT)
    (topic, qos, pkid, payload, _dup, _retain), = publishes(sub, 1)
    assert (topic, qos, payload) == ("d/q2/t", 2, b"exactly-once")
    sub.send(pubrec(pkid))
    assert sub.recv_packet() == (0x62, struct.pack(">H", pkid)), "PUBREL"
    sub.send(pubcomp(pkid))
    assert sync(sub) == [], "delivered once"
    sub.send(DISCONNECT)


def test_nothing_acknowledged_is_lost_when_the_server_dies_right_after_the_last_puback(node):
    n = 300
    w = node.start()
    s = client(w, "burst-sub", clean=False)
    assert granted(s, [("d/burst", 1)]) == [1]
    s.send(DISCONNECT)
    s.close()
    p = client(w, "burst-pub", clean=True)
    for i in range(n):
        p.send(publish_packet("d/burst", f"{i}", qos=1, pkid=i + 1))
    for i in range(n):
        first, body = p.recv_packet()
        assert first == 0x40 and struct.unpack(">H", body)[0] == i + 1
    # the last PUBACK is in: no drain, no flush
    node.crash()

    w = node.start()
    s = client(w, "burst-sub", clean=False, expect=PRESENT)
    got = []
    while len(got) < n:
        batch = publishes(s, 1)
        got += batch
        s.send(puback(batch[0][2]))
    assert [int(p[3]) for p in got] == list(range(n)), "all, in order"
    assert sync(s) == []
    s.send(DISCONNECT)

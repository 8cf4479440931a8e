"""MQTT 3.1.1 in default mode: persistent sessions and QoS 1 / 2 delivery to subscribers
(docs/protocols/mqtt.md, "Sessions and QoS").

Each test starts its own warren with a plain `mqtt://` listener (and the `[limits]` it needs),
and talks to it with raw sockets where the wire matters (DUP flags, packet ids, resend order,
not acknowledging) and with paho-mqtt where a real client's view is the point.
"""

from __future__ import annotations

import struct
import tempfile
import time
from pathlib import Path

import paho.mqtt.client as paho
import pytest
from conftest import Warren, wait_until
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


def server(limits: str = "") -> Warren:
    """A ready warren with one default-mode MQTT listener and these `[limits]` lines."""
    d = Path(tempfile.mkdtemp(prefix="warren-sessions-"))
    (d / "warren.toml").write_text("[mqtt]\nsys_interval = 0\n[limits]\n" + limits)
    return Warren("--config", str(d / "warren.toml"), listen=["mqtt"], http=False).wait_ready()


@pytest.fixture
def w():
    s = server()
    try:
        yield s
    finally:
        s.kill()


def client(w: Warren, client_id: str, clean: bool, expect: bytes | None = None) -> RawClient:
    """A raw client connected with this client id and clean-session flag."""
    c = RawClient(w.mqtt_plain)
    ack = c.connect(client_id, clean=clean)
    if expect is not None:
        assert ack == expect, f"CONNACK {ack.hex(' ')} for {client_id} clean={clean}"
    else:
        assert ack[:2] == b"\x20\x02" and ack[3] == 0, ack.hex(" ")
    return c


def publish(w: Warren, topic: str, payloads: list[str], qos: int = 1) -> None:
    """Publish from a fresh clean client and wait until the server has routed them."""
    p = client(w, f"pub-{time.monotonic_ns()}", clean=True)
    for i, body in enumerate(payloads):
        p.send(publish_packet(topic, body, qos=qos, pkid=i + 1))
    acks = sync(p)
    if qos == 2:
        for first, body in acks:
            assert first == 0x50
            p.send(pubrel(struct.unpack(">H", body)[0]))
        sync(p)
    p.send(DISCONNECT)
    p.close()


def publishes(c: RawClient, n: int) -> list[tuple[str, int, int | None, bytes, bool]]:
    """The next `n` packets, each a PUBLISH: (topic, qos, pkid, payload, dup)."""
    out = []
    for _ in range(n):
        first, body = c.recv_packet()
        topic, qos, pkid, payload = parse_publish(first, body)
        out.append((topic, qos, pkid, payload, bool(first & 0x08)))
    return out


def leave(c: RawClient, clean_goodbye: bool = True) -> None:
    """End a connection: DISCONNECT and close, or just drop the socket. After a DISCONNECT,
    wait for the server to close its side: it sets the session aside (offline) before that, so
    what is published next goes to the offline queue, not to the connection on its way out."""
    if clean_goodbye:
        c.send(DISCONNECT)
        assert c.closed(), "the server did not close after DISCONNECT"
    c.close()


def test_subscriptions_survive_a_reconnect_and_session_present_says_so(w):
    """paho with clean_session=False: the second CONNACK says session present, and messages
    arrive without subscribing again."""
    got: list[tuple[str, bytes, int]] = []
    flags: list[int] = []
    subacks: list[int] = []

    def make():
        c = paho.Client(
            paho.CallbackAPIVersion.VERSION2,
            client_id="paho-keeper",
            clean_session=False,
            protocol=paho.MQTTv311,
        )
        c.on_connect = lambda cl, u, f, rc, p=None: flags.append(int(f.session_present))
        c.on_message = lambda cl, u, m: got.append((m.topic, m.payload, m.qos))
        c.on_subscribe = lambda cl, u, mid, rcs, p=None: subacks.append(mid)
        c.connect("127.0.0.1", w.mqtt_plain)
        c.loop_start()
        return c

    c = make()
    wait_until(lambda: flags == [0], msg=f"first CONNACK flags {flags}")
    r = c.subscribe("h3/keep/#", qos=1)
    assert r[0] == paho.MQTT_ERR_SUCCESS
    # publish only once the SUBACK is back: before it, the subscription may not be in place
    wait_until(lambda: r[1] in subacks, msg="no SUBACK")
    publish(w, "h3/keep/a", ["one"])
    wait_until(lambda: got == [("h3/keep/a", b"one", 1)], msg=f"got {got}")
    c.disconnect()
    c.loop_stop()

    c = make()
    wait_until(lambda: flags == [0, 1], msg=f"second CONNACK flags {flags}")
    publish(w, "h3/keep/b", ["two"])
    wait_until(lambda: len(got) == 2, msg=f"got {got}")
    assert got[1] == ("h3/keep/b", b"two", 1)
    c.disconnect()
    c.loop_stop()


def test_offline_qos1_messages_are_queued_and_delivered_in_order_qos0_is_not(w):
    s = client(w, "offline-1", clean=False, expect=NOT_PRESENT)
    assert granted(s, [("h3/off/#", 1)]) == [1]
    leave(s)

    publish(w, "h3/off/t", ["m1", "m2", "m3", "m4", "m5"], qos=1)
    publish(w, "h3/off/t", ["not-kept"], qos=0)
    publish(w, "h3/off/t", ["m6"], qos=2)

    s = client(w, "offline-1", clean=False, expect=PRESENT)
    got = publishes(s, 6)
    assert [p[3] for p in got] == [b"m1", b"m2", b"m3", b"m4", b"m5", b"m6"]
    # delivered QoS = min(publish, granted 1); fresh messages carry no DUP
    assert all(p[1] == 1 and not p[4] for p in got)
    for p in got:
        s.send(puback(p[2]))
    assert sync(s) == [], "the QoS 0 message was not queued, nothing else follows"
    leave(s)


def test_unacknowledged_qos1_is_resent_with_dup_in_order_then_the_queue(w):
    s = client(w, "resend-1", clean=False)
    assert granted(s, [("h3/re/#", 1)]) == [1]
    publish(w, "h3/re/t", ["a", "b", "c"])
    first = publishes(s, 3)
    assert [p[3] for p in first] == [b"a", b"b", b"c"]
    s.send(puback(first[0][2]))  # only "a" is acknowledged
    sync(s)
    leave(s, clean_goodbye=False)
    publish(w, "h3/re/t", ["d"])

    s = client(w, "resend-1", clean=False, expect=PRESENT)
    again = publishes(s, 3)
    assert [(p[2], p[3], p[4]) for p in again[:2]] == [
        (first[1][2], b"b", True),
        (first[2][2], b"c", True),
    ], "unacknowledged PUBLISHes resent in order, same packet ids, DUP set"
    assert again[2][3] == b"d" and not again[2][4], "then the queue"
    for p in again:
        s.send(puback(p[2]))
    assert sync(s) == []
    leave(s)


def test_qos2_outbound_is_exactly_once_across_reconnects(w):
    s = client(w, "q2-out", clean=False)
    assert granted(s, [("h3/q2/#", 2)]) == [2]
    publish(w, "h3/q2/t", ["x", "y"], qos=2)
    got = publishes(s, 2)
    assert [(p[1], p[3]) for p in got] == [(2, b"x"), (2, b"y")]
    (x, y) = (got[0][2], got[1][2])
    s.send(pubrec(x))
    first, body = s.recv_packet()
    assert (first, struct.unpack(">H", body)[0]) == (0x62, x), "PUBREL for x"
    leave(s, clean_goodbye=False)

    # x was received (PUBREC'd): its PUBREL is resent, not the message; y is resent with DUP
    s = client(w, "q2-out", clean=False, expect=PRESENT)
    first, body = s.recv_packet()
    assert (first, struct.unpack(">H", body)[0]) == (0x62, x)
    (p,) = publishes(s, 1)
    assert (p[2], p[3], p[4], p[1]) == (y, b"y", True, 2)
    s.send(pubcomp(x))
    s.send(pubrec(y))
    first, body = s.recv_packet()
    assert (first, struct.unpack(">H", body)[0]) == (0x62, y)
    s.send(pubcomp(y))
    assert sync(s) == []
    leave(s, clean_goodbye=False)

    # complete: nothing is delivered again
    s = client(w, "q2-out", clean=False, expect=PRESENT)
    assert sync(s) == []
    leave(s)


def test_qos2_inbound_duplicates_are_suppressed_across_a_reconnect(w):
    sub = client(w, "q2-in-sub", clean=True)
    assert granted(sub, [("h3/in/#", 0)]) == [0]
    p = client(w, "q2-in-pub", clean=False)
    p.send(publish_packet("h3/in/t", "once", qos=2, pkid=7))
    assert sync(p) == [(0x50, b"\x00\x07")]
    leave(p, clean_goodbye=False)  # no PUBREL: the id stays awaiting release

    p = client(w, "q2-in-pub", clean=False, expect=PRESENT)
    p.send(publish_packet("h3/in/t", "once", qos=2, pkid=7, dup=True))
    assert sync(p) == [(0x50, b"\x00\x07")], "PUBREC again, not routed again"
    p.send(pubrel(7))
    assert sync(p) == [(0x70, b"\x00\x07")]
    leave(p)

    got = [parse_publish(f, b)[3] for f, b in sync(sub)]
    assert got == [b"once"]
    leave(sub)


def test_clean_session_discards_the_stored_session(w):
    s = client(w, "discard-1", clean=False, expect=NOT_PRESENT)
    assert granted(s, [("h3/dis/#", 1)]) == [1]
    leave(s)
    publish(w, "h3/dis/t", ["queued"])

    s = client(w, "discard-1", clean=True, expect=NOT_PRESENT)
    assert sync(s) == [], "a clean session gets nothing of the old one"
    leave(s)
    publish(w, "h3/dis/t", ["after"])

    s = client(w, "discard-1", clean=False, expect=NOT_PRESENT)
    assert sync(s) == [], "the subscription went with the session"
    leave(s)


def test_overlapping_subscriptions_deliver_once_at_the_highest_qos(w):
    for clean in (True, False):
        s = client(w, f"overlap-{clean}", clean=clean)
        assert granted(s, [("h3/ov/#", 1), ("h3/ov/+", 2), ("h3/+/x", 0)]) == [1, 2, 0]
        publish(w, "h3/ov/x", ["one"], qos=2)
        got = [parse_publish(f, b) for f, b in sync(s)]
        assert [(g[1], g[3]) for g in got] == [(2, b"one")], f"clean={clean}: {got}"
        leave(s)


def test_the_inflight_window_holds_later_messages_in_order():
    w = server("max_inflight_messages = 2\n")
    try:
        s = client(w, "window-1", clean=True)
        assert granted(s, [("h3/win", 1)]) == [1]
        publish(w, "h3/win", ["1", "2", "3", "4"])
        got = [parse_publish(f, b) for f, b in sync(s)]
        assert [g[3] for g in got] == [b"1", b"2"], "two in flight, the rest wait"
        s.send(puback(got[1][2]))
        more = [parse_publish(f, b) for f, b in sync(s)]
        assert [g[3] for g in more] == [b"3"]
        s.send(puback(got[0][2]))
        s.send(puback(more[0][2]))
        more = [parse_publish(f, b) for f, b in sync(s)]
        assert [g[3] for g in more] == [b"4"]
        leave(s)
    finally:
        w.kill()


def test_a_full_offline_queue_drops_the_newest_counted_and_logged_once():
    w = server("max_queued_messages = 3\n")
    try:
        s = client(w, "full-1", clean=False)
        assert granted(s, [("h3/full", 1)]) == [1]
        leave(s)
        publish(w, "h3/full", [f"m{i}" for i in range(1, 7)])
        s = client(w, "full-1", clean=False, expect=PRESENT)
        got = [parse_publish(f, b) for f, b in sync(s)]
        assert [g[3] for g in got] == [b"m1", b"m2", b"m3"], "the oldest are kept"
        leave(s)
        wait_until(lambda: "session queue full" in w.log(), msg=w.tail())
        assert w.log().count("session queue full") == 1, "one line per episode"
    finally:
        w.kill()


def test_a_session_expires_after_session_expiry_s_without_a_connection():
    w = server("session_expiry_s = 1\n")
    try:
        s = client(w, "expire-1", clean=False, expect=NOT_PRESENT)
        assert granted(s, [("h3/exp", 1)]) == [1]
        leave(s)
        time.sleep(1.5)
        s = client(w, "expire-1", clean=False, expect=NOT_PRESENT)
        leave(s)
    finally:
        w.kill()


def test_a_takeover_of_a_persistent_session_keeps_its_messages(w):
    old = client(w, "take-1", clean=False)
    assert granted(old, [("h3/take", 1)]) == [1]
    publish(w, "h3/take", ["a"])
    (a,) = publishes(old, 1)
    # a second connection with the client id takes over while the first is still open
    new = client(w, "take-1", clean=False, expect=PRESENT)
    (again,) = publishes(new, 1)
    assert (again[2], again[3], again[4]) == (a[2], b"a", True)
    new.send(puback(a[2]))
    publish(w, "h3/take", ["b"])
    (b,) = publishes(new, 1)
    assert b[3] == b"b"
    new.send(puback(b[2]))
    assert old.closed()
    leave(new)

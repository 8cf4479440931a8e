"""MQTT 3.1.1 in default mode: retained messages, wills, `$` topics and `$SYS`
(docs/protocols/mqtt.md, "MQTT 3.1.1 conformance").

Each test starts its own warren with a plain `mqtt://` listener and `[mqtt] sys_interval = 1`,
and talks to it with raw sockets (to see the exact flags, QoS and packet ids), paho-mqtt and
mosquitto_pub / mosquitto_sub.
"""

from __future__ import annotations

import shutil
import struct
import subprocess
import tempfile
import time
from pathlib import Path

import pytest
from conftest import Warren, wait_until
from rawmqtt import (
    RawClient,
    mqtt_str,
    publish_packet,
    puback,
    remaining_length,
    subscribe_packet,
)

DISCONNECT = b"\xe0\x00"


def server(config: str = "", *, acl: str | None = None) -> Warren:
    """A ready warren with one default-mode MQTT listener and this extra TOML."""
    d = Path(tempfile.mkdtemp(prefix="warren-retained-"))
    text = "[mqtt]\nsys_interval = 1\n" + config
    if acl is not None:
        (d / "acl").write_text(acl)
        text += f'[auth]\nacl_file = "{d / "acl"}"\n'
    (d / "warren.toml").write_text(text)
    return Warren("--module", "Echo", "--config", str(d / "warren.toml"), listen=["mqtt"], http=False).wait_ready()


@pytest.fixture
def w():
    s = server()
    try:
        yield s
    finally:
        s.kill()


def connect_with_will(
    client_id: str,
    topic: str,
    message: bytes,
    qos: int = 0,
    retain: bool = False,
    keepalive: int = 60,
    username: str | None = None,
) -> bytes:
    """A 3.1.1 CONNECT with a will (rawmqtt's connect_packet has no will fields)."""
    flags = 0x02 | 0x04 | (qos << 3) | (0x20 if retain else 0)
    payload = mqtt_str(client_id) + mqtt_str(topic) + mqtt_str(message)
    if username is not None:
        flags |= 0x80
        payload += mqtt_str(username)
    body = mqtt_str("MQTT") + bytes([4, flags]) + struct.pack(">H", keepalive) + payload
    return b"\x10" + remaining_length(len(body)) + body


def client(w: Warren, client_id: str, **kw) -> RawClient:
    c = RawClient(w.mqtt_plain)
    assert c.connect(client_id, **kw) == b"\x20\x02\x00\x00"
    return c


def will_client(w: Warren, client_id: str, topic: str, message: bytes, **kw) -> RawClient:
    c = RawClient(w.mqtt_plain)
    c.send(connect_with_will(client_id, topic, message, **kw))
    c.expect(b"\x20\x02\x00\x00")
    return c


class Msg:
    """A PUBLISH as received: topic, payload, QoS, retain flag, packet id."""

    def __init__(self, first: int, body: bytes) -> None:
        assert first >> 4 == 3, f"not a PUBLISH: {first:02x}"
        self.qos = (first >> 1) & 3
        self.retain = bool(first & 1)
        self.dup = bool(first & 8)
        (n,) = struct.unpack(">H", body[:2])
        self.topic = body[2 : 2 + n].decode()
        rest = body[2 + n :]
        self.pkid = None
        if self.qos:
            (self.pkid,) = struct.unpack(">H", rest[:2])
            rest = rest[2:]
        self.payload = bytes(rest)

    def __repr__(self) -> str:
        return f"Msg({self.topic!r}, {self.payload!r}, qos={self.qos}, retain={self.retain})"


def subscribe(c: RawClient, filters: list[tuple[str, int]], pkid: int = 1) -> list[int]:
    """SUBSCRIBE and return the SUBACK's return codes."""
    c.send(subscribe_packet(pkid, filters))
    first, body = c.recv_packet()
    assert first == 0x90, f"expected SUBACK, got {first:02x} {body.hex()}"
    assert body[:2] == struct.pack(">H", pkid)
    return list(body[2:])


def until_marker(c: RawClient, marker_topic: str, ack: bool = True) -> list[Msg]:
    """Every PUBLISH up to (not including) the first on `marker_topic`, acknowledging QoS 1."""
    got = []
    while True:
        m = Msg(*c.recv_packet())
        if m.qos == 1 and ack:
            c.send(puback(m.pkid))
        if m.topic == marker_topic:
            return got
        got.append(m)


def retained_after_subscribe(w: Warren, filters: list[tuple[str, int]], cid: str) -> list[Msg]:
    """What a fresh client receives after subscribing to `filters`: the retained messages.

    A marker the client publishes to itself afterwards (on a topic nothing retains) ends the
    list, so an empty answer is an answer, not a timeout.
    """
    c = client(w, cid)
    marker = f"marker/{cid}"
    codes = subscribe(c, filters + [(marker, 0)])
    assert 0x80 not in codes, codes
    c.send(publish_packet(marker, b"end"))
    got = until_marker(c, marker)
    c.close()
    return got


def publish(c: RawClient, topic: str, payload: bytes, qos: int = 0, retain: bool = False, pkid: int = 1) -> None:
    c.send(publish_packet(topic, payload, qos=qos, pkid=pkid, retain=retain))
    if qos == 1:
        first, body = c.recv_packet()
        assert (first, body) == (0x40, struct.pack(">H", pkid))


def sync(c: RawClient, cid: str) -> None:
    """Return once the server has handled everything `c` sent before (a round trip)."""
    marker = f"sync/{cid}/{time.monotonic_ns()}"
    subscribe(c, [(marker, 0)], pkid=99)
    c.send(publish_packet(marker, b"."))
    until_marker(c, marker)


# -- retained messages -------------------------------------------------------------------------


def test_retained_set_replace_delete(w):
    pub = client(w, "pub")
    publish(pub, "r/a", b"one", retain=True)
    sync(pub, "pub")
    got = retained_after_subscribe(w, [("r/a", 0)], "s1")
    assert [(m.topic, m.payload, m.retain) for m in got] == [("r/a", b"one", True)]

    publish(pub, "r/a", b"two", qos=1, retain=True)
    sync(pub, "pub")
    got = retained_after_subscribe(w, [("r/a", 1)], "s2")
    assert [(m.topic, m.payload, m.retain, m.qos) for m in got] == [("r/a", b"two", True, 1)]

    # an empty retained payload deletes it
    publish(pub, "r/a", b"", retain=True)
    sync(pub, "pub")
    assert retained_after_subscribe(w, [("r/a", 1)], "s3") == []
    # and a message without the retain flag neither sets nor deletes
    publish(pub, "r/b", b"kept", retain=True)
    publish(pub, "r/b", b"passing")
    sync(pub, "pub")
    got = retained_after_subscribe(w, [("r/b", 0)], "s4")
    assert [(m.payload, m.retain) for m in got] == [(b"kept", True)]
    pub.close()


def test_wildcard_delivery_and_dollar_topics(w):
    pub = client(w, "pub")
    for t in ["w", "w/1/t", "w/2/t", "w/2/h", "/w", "$priv/x"]:
        publish(pub, t, t.encode(), retain=True)
    sync(pub, "pub")

    def topics(filters):
        return sorted(m.topic for m in retained_after_subscribe(w, filters, f"c{time.monotonic_ns()}"))

    assert topics([("w/+/t", 0)]) == ["w/1/t", "w/2/t"]
    assert topics([("w/#", 0)]) == ["w", "w/1/t", "w/2/h", "w/2/t"]
    assert topics([("+/w", 0)]) == ["/w"]
    assert topics([("w/2/h", 0)]) == ["w/2/h"]
    # a leading wildcard never matches a topic starting with '$' ...
    everything = topics([("#", 0)])
    assert everything == ["/w", "w", "w/1/t", "w/2/h", "w/2/t"], everything
    assert topics([("+/x", 0)]) == []
    # ... a filter starting with '$' does
    assert topics([("$priv/#", 0)]) == ["$priv/x"]
    pub.close()


def test_retain_flag_set_on_the_retained_copy_and_clear_on_forwarding(w):
    live = client(w, "live")
    assert subscribe(live, [("f/#", 1)]) == [1]
    pub = client(w, "pub")
    publish(pub, "f/x", b"v1", qos=1, retain=True)
    m = Msg(*live.recv_packet())
    assert (m.topic, m.payload, m.retain, m.qos) == ("f/x", b"v1", False, 1)
    live.send(puback(m.pkid))
    got = retained_after_subscribe(w, [("f/#", 1)], "late")
    assert [(m.topic, m.payload, m.retain) for m in got] == [("f/x", b"v1", True)]
    # re-subscribing to the same filter sends the retained messages again
    assert subscribe(live, [("f/#", 1)], pkid=2) == [1]
    m = Msg(*live.recv_packet())
    assert (m.topic, m.retain) == ("f/x", True)
    live.close()
    pub.close()


def test_qos_of_the_retained_copy(w):
    pub = client(w, "pub")
    publish(pub, "q/one", b"1", qos=1, retain=True)
    publish(pub, "q/zero", b"0", qos=0, retain=True)
    publish(pub, "q/two", b"2", qos=2, pkid=7, retain=True)
    first, body = pub.recv_packet()
    assert (first, body) == (0x50, struct.pack(">H", 7))  # PUBREC
    pub.send(b"\x62\x02\x00\x07")
    assert pub.recv_packet() == (0x70, struct.pack(">H", 7))  # PUBCOMP
    sync(pub, "pub")

    # granted QoS 0: everything at 0
    got = {m.topic: m for m in retained_after_subscribe(w, [("q/+", 0)], "g0")}
    assert {t: m.qos for t, m in got.items()} == {"q/one": 0, "q/zero": 0, "q/two": 0}
    # granted QoS 1: min(retained, granted), QoS 1 copies with distinct non-zero packet ids
    c = client(w, "g1")
    assert subscribe(c, [("q/+", 1)]) == [1]
    got = {}
    for _ in range(3):
        m = Msg(*c.recv_packet())
        got[m.topic] = m
        if m.qos:
            c.send(puback(m.pkid))
    assert {t: (m.qos, m.retain) for t, m in got.items()} == {
        "q/one": (1, True),
        "q/zero": (0, True),
        "q/two": (1, True),
    }
    ids = [m.pkid for m in got.values() if m.qos]
    assert all(ids) and len(set(ids)) == 2
    # later QoS 1 messages on the connection get ids of their own
    assert subscribe(c, [("after", 1)], pkid=2) == [1]
    publish(pub, "after", b"x", qos=1, pkid=3)
    m = Msg(*c.recv_packet())
    assert m.pkid not in ids and m.pkid
    c.close()
    pub.close()


def test_interop_with_mosquitto_clients(w):
    if not (shutil.which("mosquitto_pub") and shutil.which("mosquitto_sub")):
        pytest.skip("mosquitto clients not installed")
    port = str(w.mqtt_plain)
    subprocess.run(["mosquitto_pub", "-p", port, "-t", "m/retained", "-m", "hello", "-r", "-q", "1"], check=True, timeout=10)
    out = subprocess.run(
        ["mosquitto_sub", "-p", port, "-t", "m/#", "-C", "1", "-v", "-W", "5", "-F", "%r %t %p"],
        capture_output=True,
        text=True,
        timeout=10,
    )
    assert out.stdout.strip() == "1 m/retained hello", out
    # -R: mosquitto_sub skips messages with the retain flag: a stale copy is all there is
    subprocess.run(["mosquitto_pub", "-p", port, "-t", "m/retained", "-n", "-r"], check=True, timeout=10)
    out = subprocess.run(
        ["mosquitto_sub", "-p", port, "-t", "m/#", "-C", "1", "-W", "1", "-v"],
        capture_output=True,
        text=True,
        timeout=10,
    )
    assert out.stdout.strip() == "", out


def test_retained_caps_refuse_and_still_deliver():
    s = server("[limits]\nmax_retained_messages = 2\n")
    try:
        live = client(s, "live")
        assert subscribe(live, [("cap/#", 0)]) == [0]
        pub = client(s, "pub")
        for t in ["cap/1", "cap/2", "cap/3"]:
            publish(pub, t, b"v", retain=True)
        got = [Msg(*live.recv_packet()).topic for _ in range(3)]
        assert got == ["cap/1", "cap/2", "cap/3"], "over the cap, still delivered"
        kept = sorted(m.topic for m in retained_after_subscribe(s, [("cap/#", 0)], "late"))
        assert kept == ["cap/1", "cap/2"]
        wait_until(lambda: "max_retained_messages" in s.log(), msg="no refusal line")
        # replacing at the cap is allowed
        publish(pub, "cap/1", b"new", retain=True)
        sync(pub, "pub")
        got = {m.topic: m.payload for m in retained_after_subscribe(s, [("cap/#", 0)], "late2")}
        assert got == {"cap/1": b"new", "cap/2": b"v"}
    finally:
        s.kill()


# -- wills ---------------------------------------------------------------------------------------


def watcher(w: Warren, filt: str = "will/#") -> RawClient:
    c = client(w, f"watch-{time.monotonic_ns()}")
    assert subscribe(c, [(filt, 1)]) == [1]
    return c


def next_msg(c: RawClient, timeout: float = 10.0) -> Msg:
    m = Msg(*c.recv_packet(timeout=timeout))
    if m.qos == 1:
        c.send(puback(m.pkid))
    return m


def test_will_on_keepalive_timeout(w):
    watch = watcher(w)
    silent = will_client(w, "sleepy", "will/sleepy", b"gone quiet", qos=1, keepalive=1)
    # it sends nothing more: 1.5 x keepalive later the server ends it and publishes the will
    m = next_msg(watch)
    assert (m.topic, m.payload, m.qos, m.retain) == ("will/sleepy", b"gone quiet", 1, False)
    assert silent.closed()


def test_will_on_a_killed_client(w):
    watch = watcher(w)
    dying = will_client(w, "dying", "will/dying", b"bye", qos=0)
    dying.sock.close()  # no DISCONNECT
    m = next_msg(watch)
    assert (m.topic, m.payload, m.qos) == ("will/dying", b"bye", 0)


def test_will_on_a_protocol_error(w):
    watch = watcher(w)
    bad = will_client(w, "bad", "will/bad", b"broken")
    bad.send(b"\x20\x02\x00\x00")  # CONNACK from a client: a protocol error
    m = next_msg(watch)
    assert (m.topic, m.payload) == ("will/bad", b"broken")


def test_will_on_takeover(w):
    watch = watcher(w)
    old = will_client(w, "same-id", "will/old", b"taken over")
    new = client(w, "same-id")
    m = next_msg(watch)
    assert (m.topic, m.payload) == ("will/old", b"taken over")
    assert old.closed()
    new.close()


def test_no_will_after_disconnect(w):
    watch = watcher(w)
    polite = will_client(w, "polite", "will/polite", b"should not appear")
    polite.send(DISCONNECT)
    assert polite.closed()
    # the will, had it been published, would come before this marker
    pub = client(w, "pub")
    publish(pub, "will/marker", b"m", qos=1)
    m = next_msg(watch)
    assert (m.topic, m.payload) == ("will/marker", b"m")
    pub.close()


def test_will_with_retain(w):
    dying = will_client(w, "ret", "will/retained", b"last words", qos=1, retain=True)
    dying.sock.close()
    watch = client(w, "later")

    def retained():
        assert subscribe(watch, [("will/retained", 1)], pkid=1) == [1]
        try:
            return next_msg(watch, timeout=0.5)
        except TimeoutError:
            return None

    m = wait_until(retained, timeout=10, msg="the will was not retained")
    assert (m.topic, m.payload, m.retain, m.qos) == ("will/retained", b"last words", True, 1)


def test_paho_will_on_a_killed_client(w):
    paho = pytest.importorskip("paho.mqtt.client")
    watch = watcher(w)
    kw = {"callback_api_version": paho.CallbackAPIVersion.VERSION2} if hasattr(paho, "CallbackAPIVersion") else {}
    c = paho.Client(client_id="paho-will", protocol=paho.MQTTv311, **kw)
    c.will_set("will/paho", b"paho gone", qos=1, retain=False)
    c.connect("127.0.0.1", w.mqtt_plain, keepalive=60)
    c.loop_start()
    wait_until(c.is_connected, msg="paho did not connect")
    c.loop_stop()
    c.socket().close()  # no DISCONNECT
    m = next_msg(watch)
    assert (m.topic, m.payload, m.qos) == ("will/paho", b"paho gone", 1)


def test_will_topics_are_checked_at_connect():
    s = server(acl="user ann\ntopic readwrite ann/#\n")
    try:
        denied = RawClient(s.mqtt_plain)
        denied.send(connect_with_will("a1", "elsewhere/x", b"w", username="ann"))
        denied.expect(b"\x20\x02\x00\x05")
        assert denied.closed()
        sys_will = RawClient(s.mqtt_plain)
        sys_will.send(connect_with_will("a2", "$SYS/broker/uptime", b"w", username="ann"))
        sys_will.expect(b"\x20\x02\x00\x05")
        allowed = RawClient(s.mqtt_plain)
        allowed.send(connect_with_will("a3", "ann/status", b"w", username="ann"))
        allowed.expect(b"\x20\x02\x00\x00")
        allowed.close()
        wait_until(lambda: "will topic" in s.log(), msg="no refusal line")
    finally:
        s.kill()


# -- $SYS ----------------------------------------------------------------------------------------


def sys_values(w: Warren, cid: str) -> dict[str, str]:
    return {m.topic: m.payload.decode() for m in retained_after_subscribe(w, [("$SYS/#", 0)], cid)}


def test_sys_topics(w):
    values = sys_values(w, "sys1")
    for key in [
        "$SYS/broker/version",
        "$SYS/broker/uptime",
        "$SYS/broker/clients/connected",
        "$SYS/broker/messages/received",
        "$SYS/broker/messages/sent",
        "$SYS/broker/bytes/received",
        "$SYS/broker/bytes/sent",
        "$SYS/broker/publish/messages/received",
        "$SYS/broker/publish/messages/sent",
        "$SYS/broker/subscriptions/count",
        "$SYS/broker/retained messages/count",
    ]:
        assert key in values, (key, values)
    assert values["$SYS/broker/version"].startswith("warren version ")
    assert values["$SYS/broker/uptime"].endswith(" seconds")
    # not with '#' or '+/...'
    assert retained_after_subscribe(w, [("#", 0), ("+/broker/#", 0)], "sys2") == []

    # the values follow the node: two clients stay connected, publish, hold subscriptions (the
    # client reading the values is connected only between two updates)
    a = client(w, "stay-a")
    b = client(w, "stay-b")
    assert subscribe(a, [("x/1", 0), ("x/2", 0)]) == [0, 0]
    publish(b, "x/1", b"hello", retain=True)

    def grown():
        v = sys_values(w, f"sys{time.monotonic_ns()}")
        ok = (
            int(v["$SYS/broker/clients/connected"]) >= 2
            and int(v["$SYS/broker/subscriptions/count"]) >= 2
            and int(v["$SYS/broker/publish/messages/received"]) > int(values["$SYS/broker/publish/messages/received"])
            and int(v["$SYS/broker/bytes/sent"]) > int(values["$SYS/broker/bytes/sent"])
            and int(v["$SYS/broker/retained messages/count"]) >= 12
        )
        return v if ok else None

    wait_until(grown, timeout=10, interval=0.3, msg="$SYS values did not follow")
    a.close()
    b.close()


def test_live_sys_updates_and_no_client_publishes_to_sys(w):
    watch = client(w, "sysw")
    assert subscribe(watch, [("$SYS/broker/uptime", 0)]) == [0]
    first = Msg(*watch.recv_packet())
    assert first.retain  # the retained copy
    # the next update comes live, retain flag clear
    live = Msg(*watch.recv_packet(timeout=10))
    assert (live.topic, live.retain) == ("$SYS/broker/uptime", False)

    # a client's publish under $SYS is dropped
    c = client(w, "intruder")
    assert subscribe(c, [("$SYS/fake", 0)]) == [0]
    publish(c, "$SYS/fake", b"nope", retain=True)
    sync(c, "intruder")
    assert retained_after_subscribe(w, [("$SYS/fake", 0)], "check") == []
    wait_until(lambda: "sys_topic" in w.log(), msg="no refusal line")
    c.close()
    watch.close()


def test_sys_off():
    d = Path(tempfile.mkdtemp(prefix="warren-sys-off-"))
    (d / "warren.toml").write_text("[mqtt]\nsys_interval = 0\n")
    s = Warren("--module", "Echo", "--config", str(d / "warren.toml"), listen=["mqtt"], http=False).wait_ready()
    try:
        assert retained_after_subscribe(s, [("$SYS/#", 0)], "off") == []
    finally:
        s.kill()


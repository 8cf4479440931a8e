"""Byte-exact MQTT vectors of an mqant-mode listener (docs/protocols/mqtt.md).

Each vector is written the way docs/protocols/mqtt.md ("Byte vectors") writes it: hex bytes with
quoted text in between, so a reader can check this file against the table line by line. Everything
is spoken over raw sockets (`rawmqtt.RawClient`) because real clients would hide the bytes.
"""

from __future__ import annotations

import json
import time

import pytest

from conftest import Warren
from rawmqtt import (
    DISCONNECT,
    PINGREQ,
    RawClient,
    connect_packet,
    hexdump,
    parse_publish,
    publish_packet,
    puback,
    remaining_length,
)


def v(*parts: str | bytes) -> bytes:
    """Build a vector: `str` parts are space-separated hex, `bytes` parts are literal text."""
    out = b""
    for p in parts:
        out += bytes.fromhex(p) if isinstance(p, str) else p
    return out


LOGIN_BODY = b'{"userName":"alice","passWord":"Hello,anyone!"}'
ONCHAT = b'{"from":"alice","msg":"hi","roomName":"mqant","target":"*"}'


def mqant_server(*args: str, **query: object) -> Warren:
    """A ready warren with one mqant-mode TCP listener (settings from `query`) and Debug."""
    w = Warren("--module", "Debug", *args, listen=[Warren.url("mqtt+mqant", **query)], http=False)
    return w.wait_ready()


@pytest.fixture
def mqant():
    w = mqant_server()
    yield w
    w.kill()


def test_vectors_are_self_consistent():
    """The remaining-length bytes in the table match the packets' real lengths."""
    assert len(v("00 10", b"Login/HD_Login/1", "00 01", LOGIN_BODY)) == 0x43
    assert len(v("00 10", b"Login/HD_Login/1", "00 01", b'{"Error":"","Result":"login success alice"}')) == 0x3F
    assert len(v("00 0b", b"Chat/OnChat", "00 05", ONCHAT)) == 0x4A
    assert len(v("00 0b", b"Chat/OnChat", ONCHAT)) == 0x48


# ---- CONNECT rows (each on its own connection) ---------------------------------------------


def test_connect_mqisdp_v31(mqant):
    with RawClient(mqant.mqtt_mqant) as c:
        c.send(v("10 22 00 06", b"MQIsdp", "03 c2 00 3c 00 03", b"111", "00 05", b"admin", "00 08", b"password"))
        c.expect(v("20 02 00 00"))
        c.send(PINGREQ)
        c.expect(v("d0 00"))


def test_connect_mqtt_v311(mqant):
    with RawClient(mqant.mqtt_mqant) as c:
        c.send(v("10 0d 00 04", b"MQTT", "04 02 00 3c 00 01", b"a"))
        c.expect(v("20 02 00 00"))
        c.send(PINGREQ)
        c.expect(v("d0 00"))


def test_connect_empty_client_id_is_refused(mqant):
    with RawClient(mqant.mqtt_mqant) as c:
        c.send(v("10 0c 00 04", b"MQTT", "04 02 00 3c 00 00"))
        c.expect(v("20 02 00 02"))
        assert c.closed(5), "connection not closed after CONNACK 2"


def test_connect_client_id_of_24_bytes_is_refused(mqant):
    with RawClient(mqant.mqtt_mqant) as c:
        c.send(connect_packet("x" * 24))
        c.expect(v("20 02 00 02"))
        assert c.closed(5), "connection not closed after CONNACK 2"


def test_connect_client_id_of_23_bytes_is_accepted(mqant):
    with RawClient(mqant.mqtt_mqant) as c:
        assert c.connect("x" * 23) == v("20 02 00 00")


def test_connect_mqtt_level_5_is_refused(mqant):
    with RawClient(mqant.mqtt_mqant) as c:
        # An MQTT 5 CONNECT also carries a properties length (00) after the keepalive.
        c.send(v("10 0e 00 04", b"MQTT", "05 02 00 3c 00 00 01", b"a"))
        c.expect(v("20 02 00 01"))
        assert c.closed(5), "connection not closed after CONNACK 1"


def test_connect_mqtt_level_5_without_properties_is_refused(mqant):
    with RawClient(mqant.mqtt_mqant) as c:
        c.send(connect_packet("a", proto="MQTT", level=5))
        c.expect(v("20 02 00 01"))
        assert c.closed(5), "connection not closed after CONNACK 1"


def test_connect_unknown_protocol_name_is_refused(mqant):
    with RawClient(mqant.mqtt_mqant) as c:
        c.send(connect_packet("a", proto="MQXX", level=4))
        c.expect(v("20 02 00 01"))
        assert c.closed(5)


def test_second_connect_closes(mqant):
    with RawClient(mqant.mqtt_mqant) as c:
        assert c.connect("a") == v("20 02 00 00")
        c.send(connect_packet("a"))
        assert c.closed(5), "a second CONNECT must close the connection"
        assert c.discarded == b"", f"no answer expected, got {hexdump(c.discarded)}"


# ---- the rest of the table, in order on one connection --------------------------------------


def test_vector_sequence_on_one_connection(mqant):
    with RawClient(mqant.mqtt_mqant) as c:
        c.send(v("10 0d 00 04", b"MQTT", "04 02 00 3c 00 01", b"a"))
        c.expect(v("20 02 00 00"))

        # QoS 1 login: PUBACK first, then the reply as push id 1.
        c.send(v("32 43 00 10", b"Login/HD_Login/1", "00 01", LOGIN_BODY))
        c.expect(v("40 02 00 01"))
        c.expect(v("32 3f 00 10", b"Login/HD_Login/1", "00 01", b'{"Error":"","Result":"login success alice"}'))

        # Non-JSON body.
        c.send(v("30 13 00 10", b"Login/HD_Login/1", b"x"))
        c.expect(v("32 46 00 10", b"Login/HD_Login/1", "00 02", b'{"Error":"body must be JSON format","Result":null}'))

        # No msgid: nothing comes back. The next request's reply must be the very next packet.
        c.send(v("30 11 00 0e", b"Login/HD_Login", b"x"))

        # Not client-visible.
        c.send(v("30 13 00 0f", b"Login/getRand/3", b"{}"))
        c.expect(
            v("32 52 00 0f", b"Login/getRand/3", "00 03", b"{\"Error\":\"Method(getRand) must begin with 'HD_'\",\"Result\":null}")
        )

        # Unknown module.
        c.send(v("30 0f 00 0b", b"Nope/HD_X/4", b"{}"))
        c.expect(v("32 45 00 0b", b"Nope/HD_X/4", "00 04", b'{"Error":"Service(type:Nope) not found","Result":null}'))

        # QoS 2 without msgid: PUBREC, then PUBREL -> PUBCOMP, and no reply.
        c.send(v("34 11 00 0b", b"Chat/HD_Say", "00 07", b"{}"))
        c.expect(v("50 02 00 07"))
        c.send(v("62 02 00 07"))
        c.expect(v("70 02 00 07"))

        # SUBSCRIBE: one SUBACK, granted min(requested, 1) per topic.
        c.send(v("82 0f 00 02 00 04", b"chat", "02 00 03", b"aaa", "02"))
        c.expect(v("90 04 00 02 01 01"))

        c.send(v("a2 08 00 03 00 04", b"chat"))
        c.expect(v("b0 02 00 03"))

        c.send(v("c0 00"))
        c.expect(v("d0 00"))

        # A handler pushes to this session: join room mqant, say hi -> OnChat, then the reply.
        c.send(publish_packet("Chat/HD_JoinChat/5", b'{"roomName":"mqant"}'))
        first, body = c.recv_packet()
        topic, qos, pkid, payload = parse_publish(first, body)
        assert (topic, qos, pkid) == ("Chat/HD_JoinChat/5", 1, 5), hexdump(bytes([first]) + body)
        assert json.loads(payload) == {"Error": "", "Result": {"users": ["alice"]}}

        c.send(publish_packet("Chat/HD_Say/6", b'{"roomName":"mqant","from":"alice","target":"*","content":"hi"}'))
        c.expect(v("32 4a 00 0b", b"Chat/OnChat", "00 06", ONCHAT))
        c.expect(publish_packet("Chat/HD_Say/6", b'{"Error":"","Result":"say success"}', qos=1, pkid=7))

        # PUBACK from the client for a push is accepted silently; the connection goes on.
        c.send(puback(6))
        c.send(puback(7))
        c.send(PINGREQ)
        c.expect(v("d0 00"))

        c.send(DISCONNECT)
        assert c.closed(5)


def test_push_qos_0_vectors():
    w = mqant_server(push_qos=0)
    with RawClient(w.mqtt_mqant) as c:
        assert c.connect("a") == v("20 02 00 00")
        c.send(publish_packet("Login/HD_Login/1", LOGIN_BODY))
        c.expect(v("30 3d 00 10", b"Login/HD_Login/1", b'{"Error":"","Result":"login success alice"}'))
        c.send(publish_packet("Chat/HD_JoinChat/2", b'{"roomName":"mqant"}'))
        first, body = c.recv_packet()
        topic, qos, pkid, payload = parse_publish(first, body)
        assert (topic, qos, pkid) == ("Chat/HD_JoinChat/2", 0, None)
        assert json.loads(payload) == {"Error": "", "Result": {"users": ["alice"]}}
        c.send(publish_packet("Chat/HD_Say/3", b'{"roomName":"mqant","from":"alice","target":"*","content":"hi"}'))
        c.expect(v("30 48 00 0b", b"Chat/OnChat", ONCHAT))
        c.expect(publish_packet("Chat/HD_Say/3", b'{"Error":"","Result":"say success"}'))


def test_pingresp_d2_compat():
    w = mqant_server(pingresp_d2="true")
    with RawClient(w.mqtt_mqant) as c:
        assert c.connect("a") == v("20 02 00 00")
        c.send(v("c0 00"))
        c.expect(v("d2 00"))


def test_qos2_resend_is_reacknowledged_but_routed_once(mqant):
    body = b'{"k":1}'
    with RawClient(mqant.mqtt_mqant) as c:
        assert c.connect("a") == v("20 02 00 00")
        c.send(publish_packet("Debug/HD_Echo/9", body, qos=2, pkid=9))
        c.send(publish_packet("Debug/HD_Echo/9", body, qos=2, pkid=9, dup=True))
        c.send(v("62 02 00 09"))
        # A later request to the same module: its reply closes the window in which a second
        # routing of msgid 9 would have answered (one session's requests run in order).
        c.send(publish_packet("Debug/HD_Echo/10", b'{"k":2}'))

        packets: list[bytes] = []
        replies: list[bytes] = []
        while True:
            first, pbody = c.recv_packet()
            packets.append(bytes([first]) + remaining_length(len(pbody)) + pbody)
            if first >> 4 != 3:
                continue
            topic, _qos, _pkid, payload = parse_publish(first, pbody)
            if topic == "Debug/HD_Echo/9":
                replies.append(payload)
            if topic == "Debug/HD_Echo/10":
                break
        dump = "\n".join(hexdump(p) for p in packets)
        pubrec9, pubcomp9 = v("50 02 00 09"), v("70 02 00 09")
        assert packets.count(pubrec9) == 2, f"expected two PUBRECs for id 9:\n{dump}"
        assert packets.count(pubcomp9) == 1, f"expected one PUBCOMP for id 9:\n{dump}"
        assert packets.index(pubrec9) < packets.index(pubcomp9), dump
        assert len(replies) == 1, f"msgid 9 routed {len(replies)} times:\n{dump}"
        assert json.loads(replies[0]) == {"Error": "", "Result": {"k": 1}}


# ---- keepalive (docs/protocols/mqtt.md, the table of modes) -------------------------------


def test_keepalive_1_closes_after_two_seconds_of_silence(mqant):
    with RawClient(mqant.mqtt_mqant) as c:
        assert c.connect("a", keepalive=1) == v("20 02 00 00")
        start = time.monotonic()
        assert c.quiet(1.0), "closed (or spoke) within the first second of a keepalive of 1"
        assert c.closed(5.0), "not closed within 6 s of silence with keepalive 1"
        assert time.monotonic() - start < 6.5


def test_keepalive_0_uses_idle_timeout():
    w = mqant_server(idle_timeout_s=1)
    with RawClient(w.mqtt_mqant) as c:
        assert c.connect("a", keepalive=0) == v("20 02 00 00")
        assert c.quiet(1.0), "closed within the first second of idle_timeout_s=1"
        assert c.closed(3.0), "keepalive 0 with idle_timeout_s=1 not closed within ~3 s"


def test_plain_mode_keepalive_is_one_and_a_half_times():
    w = Warren(listen=[Warren.url("mqtt")], http=False).wait_ready()
    with RawClient(w.mqtt_plain) as c:
        assert c.connect("a", keepalive=2) == v("20 02 00 00")
        assert c.quiet(2.0), "plain mode keepalive 2 closed within 2 s"
        assert c.closed(4.0), "plain mode keepalive 2 not closed within ~3 s"


def test_a_client_that_pings_stays_connected(mqant):
    with RawClient(mqant.mqtt_mqant) as c:
        assert c.connect("a", keepalive=1) == v("20 02 00 00")
        end = time.monotonic() + 4.0
        while time.monotonic() < end:
            c.send(PINGREQ)
            c.expect(v("d0 00"))
            assert c.quiet(0.5)
        c.send(publish_packet("Debug/HD_Echo/1", b'{"alive":true}'))
        first, body = c.recv_packet()
        assert json.loads(parse_publish(first, body)[3]) == {"Error": "", "Result": {"alive": True}}


# ---- packets that share a read with CONNECT, and in-flight limits -------------------------------


def test_packets_arriving_with_connect_are_handled_at_once(mqant):
    """A client may write CONNECT and its first requests in one segment; none may wait."""
    with RawClient(mqant.mqtt_mqant) as c:
        c.send(
            connect_packet("a")
            + publish_packet("Debug/HD_Echo/1", b'{"n":1}', qos=1, pkid=1)
            + PINGREQ
        )
        c.expect(v("20 02 00 00"))
        c.expect(v("40 02 00 01"))
        # the PINGRESP may overtake the reply: the ping is answered at once, the reply when the
        # handler is done
        got = [c.recv_packet(), c.recv_packet()]
        assert (0xD0, b"") in got
        first, body = next(p for p in got if p[0] & 0xF0 == 0x30)
        topic, _qos, _pkid, payload = parse_publish(first, body)
        assert topic == "Debug/HD_Echo/1"
        assert json.loads(payload) == {"Error": "", "Result": {"n": 1}}


def test_max_inflight_pauses_reading_without_losing_requests():
    """With max_inflight=2, ten slow requests sent at once are all answered, in order."""
    w = mqant_server(max_inflight=2)
    try:
        with RawClient(w.mqtt_mqant) as c:
            c.connect("a")
            c.send(b"".join(publish_packet(f"Debug/HD_Sleep/{i}", b'{"ms":50}') for i in range(1, 11)))
            topics = []
            for _ in range(10):
                first, body = c.recv_packet(timeout=10)
                topic, _qos, _pkid, payload = parse_publish(first, body)
                assert json.loads(payload) == {"Error": "", "Result": "slept"}
                topics.append(topic)
            assert topics == [f"Debug/HD_Sleep/{i}" for i in range(1, 11)]
    finally:
        w.kill()

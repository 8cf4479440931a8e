"""Bad input at an mqant-mode listener: the exact reply or close, a log line, no harm to others.

The project's standard for bad input (docs/security.md, "Threat model"): a typed error, a log line
naming the peer and the reason, and the close of that one connection (or a rejected call), never
harm to other sessions. Every case here therefore checks three things: what the offending client
sees, that warren's stderr has a line naming the offender's address together with a reason, and that
a second client connected to the same listener still gets an answer afterwards.
"""

from __future__ import annotations

import base64
import http.client
import json
import os
import re
import time
from pathlib import Path

import pytest
import websocket

from conftest import Warren, wait_until
from rawmqtt import (
    PINGREQ,
    RawClient,
    connect_packet,
    mqtt_str,
    parse_publish,
    publish_packet,
    remaining_length,
)

ANSI = re.compile(r"\x1b\[[0-9;]*m")

# Words a reason may use, per case (case-insensitive). Deliberately broad: the test pins the
# fact that the reason is logged next to the peer, not its wording.
REASON_PROTOCOL = r"protocol|malformed|invalid|decode|connect|packet|unexpected|type"
REASON_SIZE = r"too (large|big|long)|max_packet|size|limit|exceed|length"
REASON_TIMEOUT = r"timeout|timed out|deadline|connect"
REASON_UTF8 = r"utf-?8|topic|invalid|malformed|decode"


def server(*args: str, ws: bool = False, **query: object) -> Warren:
    """A ready warren with an mqant TCP listener (settings from `query`), optionally ws, and Debug."""
    listen = [Warren.url("mqtt+mqant", **query)]
    if ws:
        listen.append(Warren.url("ws+mqant", **query))
    return Warren("--module", "Debug", *args, listen=listen, http=False).wait_ready()


def log_lines(w: Warren) -> list[str]:
    return [ANSI.sub("", line) for line in w.log().splitlines()]


def assert_logged(w: Warren, peer: str, reason: str, timeout: float = 5) -> str:
    """Wait for one stderr line that names `peer` (ip:port) and matches the `reason` regex."""
    rx = re.compile(reason, re.IGNORECASE)

    def find() -> str | None:
        for line in log_lines(w):
            if peer in line and rx.search(line):
                return line
        return None

    try:
        return wait_until(find, timeout=timeout)
    except AssertionError:
        mine = [line for line in log_lines(w) if peer in line]
        raise AssertionError(
            f"no log line names peer {peer} with a reason matching /{reason}/; lines naming the peer: {mine!r}"
        ) from None


class Witness:
    """A well-behaved second client on the same listener, proving the server still serves."""

    def __init__(self, port: int) -> None:
        self.c = RawClient(port)
        assert self.c.connect("witness") == b"\x20\x02\x00\x00"
        self.n = 0
        self.works()

    def works(self) -> None:
        self.n += 1
        topic = f"Debug/HD_Echo/{self.n}"
        body = {"witness": self.n}
        self.c.send(publish_packet(topic, json.dumps(body).encode()))
        first, pbody = self.c.recv_packet(timeout=10)
        got_topic, _qos, _pkid, payload = parse_publish(first, pbody)
        assert got_topic == topic
        assert json.loads(payload) == {"Error": "", "Result": body}

    def close(self) -> None:
        self.c.close()


def echo_round_trip(c: RawClient, n: int, timeout: float = 10) -> None:
    """One Debug/HD_Echo request on `c` and its reply (skipping unrelated packets)."""
    topic = f"Debug/HD_Echo/{n}"
    c.send(publish_packet(topic, json.dumps({"n": n}).encode()))
    deadline = time.monotonic() + timeout
    while True:
        first, body = c.recv_packet(timeout=max(0.01, deadline - time.monotonic()))
        if first >> 4 == 3 and parse_publish(first, body)[0] == topic:
            assert json.loads(parse_publish(first, body)[3]) == {"Error": "", "Result": {"n": n}}
            return


def reply_to(c: RawClient, topic: str, payload: bytes, qos: int = 0, pkid: int = 0) -> dict:
    """Publish and return the parsed reply published back on the identical topic."""
    c.send(publish_packet(topic, payload, qos=qos, pkid=pkid))
    while True:
        first, body = c.recv_packet(timeout=10)
        if first >> 4 == 3:
            got, _q, _id, data = parse_publish(first, body)
            assert got == topic, f"unexpected publish on {got}: {data!r}"
            return json.loads(data)


# ---- connection-level garbage ---------------------------------------------------------------


def test_garbage_first_packet_closes():
    w = server()
    witness = Witness(w.mqtt_mqant)
    with RawClient(w.mqtt_mqant) as bad:
        bad.send(b"\xff\xff\xff\xff")
        assert bad.closed(5), "garbage first packet did not close the connection"
        assert bad.discarded == b"", "nothing may be answered to garbage"
        assert_logged(w, bad.local_addr, REASON_PROTOCOL)
    witness.works()


def test_first_packet_not_connect_closes():
    w = server()
    witness = Witness(w.mqtt_mqant)
    with RawClient(w.mqtt_mqant) as bad:
        bad.send(PINGREQ)
        assert bad.closed(5), "PINGREQ before CONNECT did not close the connection"
        assert bad.discarded == b""
        assert_logged(w, bad.local_addr, REASON_PROTOCOL)
    witness.works()


def test_connect_that_never_comes_times_out():
    w = server(connect_timeout_s=1)
    witness = Witness(w.mqtt_mqant)
    with RawClient(w.mqtt_mqant) as bad:
        assert bad.closed(5), "silent connection not closed within a few seconds (connect_timeout_s=1)"
        assert_logged(w, bad.local_addr, REASON_TIMEOUT)
    witness.works()


def test_oversized_publish_closes():
    w = server(max_packet=1024)
    witness = Witness(w.mqtt_mqant)
    with RawClient(w.mqtt_mqant) as bad:
        assert bad.connect("big") == b"\x20\x02\x00\x00"
        bad.send(publish_packet("Debug/HD_Echo/1", b'{"p":"' + b"x" * 2000 + b'"}'))
        assert bad.closed(5), "a 2000-byte PUBLISH on max_packet=1024 did not close"
        assert b"Debug/HD_Echo/1" not in bad.discarded, "the oversized request was routed"
        assert_logged(w, bad.local_addr, REASON_SIZE)
    witness.works()


def test_claimed_100mb_packet_closes_before_the_body():
    w = server(max_packet=1024)
    witness = Witness(w.mqtt_mqant)
    with RawClient(w.mqtt_mqant) as bad:
        assert bad.connect("big") == b"\x20\x02\x00\x00"
        bad.send(b"\x30" + remaining_length(100 * 1024 * 1024))
        # Keepalive is 60 s: a close within 3 s can only be the size check on the header.
        assert bad.closed(3), "header of a 100 MB packet did not close the connection at once"
        assert_logged(w, bad.local_addr, REASON_SIZE)
    witness.works()


def test_remaining_length_overflow_closes():
    w = server()
    witness = Witness(w.mqtt_mqant)
    with RawClient(w.mqtt_mqant) as bad:
        assert bad.connect("ovf") == b"\x20\x02\x00\x00"
        bad.send(bytes.fromhex("30 ff ff ff ff 7f"))
        assert bad.closed(3), "a 5-byte remaining length did not close the connection"
        assert_logged(w, bad.local_addr, REASON_PROTOCOL + "|" + REASON_SIZE)
    witness.works()


def test_invalid_utf8_topic_closes():
    w = server()
    witness = Witness(w.mqtt_mqant)
    with RawClient(w.mqtt_mqant) as bad:
        assert bad.connect("utf") == b"\x20\x02\x00\x00"
        topic = b"Debug/HD_\xff\xfe/1"
        body = mqtt_str(topic) + b"{}"
        bad.send(b"\x30" + remaining_length(len(body)) + body)
        assert bad.closed(5), "a topic with invalid UTF-8 did not close the connection"
        assert bad.discarded == b""
        assert_logged(w, bad.local_addr, REASON_UTF8)
    witness.works()


# ---- rejected calls (the connection stays) ---------------------------------------------------


@pytest.mark.parametrize(
    "topic, payload, error, reason",
    [
        ("Nope/HD_X/4", b"{}", "Service(type:Nope) not found", r"not found|Nope"),
        ("Login/getRand/3", b"{}", "Method(getRand) must begin with 'HD_'", r"getRand|HD_|visible"),
        ("Debug/HD_Echo/5", b"not json", "body must be JSON format", r"JSON"),
        ("Debug/HD_Echo/6", b"[1,2,3]", "body must be JSON format", r"JSON|object"),
    ],
    ids=["unknown-module", "not-visible", "non-json", "json-array"],
)
def test_rejected_call_gets_typed_error(topic, payload, error, reason):
    w = server()
    witness = Witness(w.mqtt_mqant)
    with RawClient(w.mqtt_mqant) as bad:
        assert bad.connect("rej") == b"\x20\x02\x00\x00"
        assert reply_to(bad, topic, payload) == {"Error": error, "Result": None}
        assert_logged(w, bad.local_addr, reason)
        # The rejected call leaves the connection usable.
        echo_round_trip(bad, 100)
    witness.works()


def test_handler_panic_gives_error_and_connection_survives():
    w = server()
    witness = Witness(w.mqtt_mqant)
    with RawClient(w.mqtt_mqant) as c:
        assert c.connect("pan") == b"\x20\x02\x00\x00"
        reply = reply_to(c, "Debug/HD_Panic/1", b"{}")
        assert reply["Result"] is None
        assert "debug panic" in reply["Error"], reply
        assert_logged(w, c.local_addr, r"panic")
        echo_round_trip(c, 2)
    witness.works()


def test_handler_that_never_returns_times_out_and_connection_survives():
    w = server(rpc_expired_s=1)
    witness = Witness(w.mqtt_mqant)
    with RawClient(w.mqtt_mqant) as c:
        assert c.connect("hang") == b"\x20\x02\x00\x00"
        assert reply_to(c, "Debug/HD_Hang/1", b"{}") == {"Error": "timeout: This is Call", "Result": None}
        assert_logged(w, c.local_addr, r"timeout|timed out|deadline|expired")
        echo_round_trip(c, 2)
    witness.works()


# ---- slow consumer ---------------------------------------------------------------------------


def rss_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS in /proc status")


def test_slow_consumer_is_disconnected_and_memory_stays_bounded():
    w = server(write_queue=16)
    pid = w.proc.pid
    witness = Witness(w.mqtt_mqant)
    bad = RawClient(w.mqtt_mqant, rcvbuf=4096)
    try:
        assert bad.connect("slow") == b"\x20\x02\x00\x00"
        peer = bad.local_addr
        bad.send(publish_packet("Debug/HD_PushSelf/1", b'{"n":200000,"topic":"flood","size":1024}'))
        # Never read. Watch memory while the server decides to cut us off.
        peak = 0

        def cut_off() -> bool:
            nonlocal peak
            peak = max(peak, rss_kb(pid))
            return any(peer in line and re.search(r"slow", line, re.IGNORECASE) for line in log_lines(w))

        try:
            wait_until(cut_off, timeout=25, interval=0.1)
        except AssertionError:
            was_closed = bad.closed(5)
            raise AssertionError(
                f"no log line names slow consumer {peer} within 25 s (socket closed: {was_closed}, peak RSS {peak} kB)"
            ) from None
        peak = max(peak, rss_kb(pid))
        assert peak < 200 * 1024, f"warren RSS reached {peak} kB while a client did not read"
        # Whatever the kernel still holds for us is bounded; after it, the socket is closed.
        assert bad.closed(20), "slow consumer's socket was not closed"
    finally:
        bad.close()
    witness.works()
    assert w.running()


# ---- connection cap --------------------------------------------------------------------------


def test_max_conn_refuses_the_fourth_connection():
    w = server(max_conn=3)
    port = w.mqtt_mqant
    # The readiness probe's connection may hold a slot for a moment after it closed, so the
    # first three are admitted as soon as the server has noticed that.
    clients = [wait_until(lambda i=i: admitted(port, f"c{i}"), timeout=10, interval=0.1) for i in range(3)]
    fourth = RawClient(port)
    try:
        try:
            fourth.send(connect_packet("c3"))
        except OSError:
            pass  # already closed by the server: that is the expected outcome
        assert fourth.closed(5), "the 4th connection over max_conn=3 was not closed"
        # refused at accept with CONNACK 3 (server unavailable), before its CONNECT is read
        assert fourth.discarded == b"\x20\x02\x00\x03", fourth.discarded
        assert_logged(w, fourth.local_addr, r"max_conn|limit|too many|capacity|full|refus|reject")
    finally:
        fourth.close()
    for i, c in enumerate(clients):
        echo_round_trip(c, i + 1)

    clients[0].close()
    clients[0] = wait_until(
        lambda: admitted(port, "c4"), timeout=10, interval=0.2, msg="no new connection accepted after one closed"
    )
    for i, c in enumerate(clients):
        echo_round_trip(c, 10 + i)


def admitted(port: int, client_id: str) -> RawClient | None:
    """A new connection that got CONNACK 0, or None when the server refused it."""
    c = RawClient(port)
    try:
        c.send(connect_packet(client_id))
        if c.recv_exact(4, timeout=2) == b"\x20\x02\x00\x00":
            return c
    except (OSError, TimeoutError):
        pass
    c.close()
    return None


# ---- WebSocket -------------------------------------------------------------------------------


def ws_mqtt_echo(port: int) -> None:
    """An MQTT-over-WebSocket client: CONNECT, one Debug/HD_Echo round trip."""
    ws = websocket.create_connection(f"ws://127.0.0.1:{port}/mqtt", subprotocols=["mqtt"], timeout=10)
    try:
        ws.send_binary(connect_packet("wsw"))
        buf = b""
        while len(buf) < 4:
            buf += ws.recv()
        assert buf[:4] == b"\x20\x02\x00\x00"
        buf = buf[4:]
        ws.send_binary(publish_packet("Debug/HD_Echo/1", b'{"ws":true}'))
        while True:
            if len(buf) >= 2:
                # Single-byte remaining length is enough for this small reply.
                total = 2 + buf[1]
                if len(buf) >= total:
                    topic, _q, _id, payload = parse_publish(buf[0], buf[2:total])
                    assert topic == "Debug/HD_Echo/1"
                    assert json.loads(payload) == {"Error": "", "Result": {"ws": True}}
                    return
            buf += ws.recv()
    finally:
        ws.close()


def test_websocket_non_get_gets_405():
    w = server(ws=True)
    port = w.ws_mqant
    ws_mqtt_echo(port)
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.request(
            "POST",
            "/mqtt",
            body=b"",
            headers={
                "Upgrade": "websocket",
                "Connection": "Upgrade",
                "Sec-WebSocket-Key": base64.b64encode(os.urandom(16)).decode(),
                "Sec-WebSocket-Version": "13",
                "Sec-WebSocket-Protocol": "mqtt",
            },
        )
        assert conn.getresponse().status == 405
    finally:
        conn.close()
    ws_mqtt_echo(port)

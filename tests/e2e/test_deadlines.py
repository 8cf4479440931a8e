"""Deadlines and WebSocket close codes.

Every protocol has a deadline for its first meaningful message (`connect_timeout_s`): the pomelo
handshake and its ack, the JSON-WS login, the pomelo-rpc CONNECT, a line listener's first message
(MQTT CONNECT had one already). Once established, a connection whose protocol has no keepalive
of its own (MQTT with keepalive 0, line, JSON-WS) is closed after `idle_timeout_s` of silence.
A WebSocket connection always ends with a close frame carrying a code: 1008 for a missed
deadline, 1007 for a text frame that is not UTF-8, 1009 for a frame over the size limit, 1002 for
an MQTT protocol error over WebSocket.
"""

from __future__ import annotations

import json
import re
import socket
import time

import websocket
from websocket import ABNF

from abuse import read_until_closed
from conftest import Warren
from rawmqtt import RawClient, connect_packet

CONNACK_OK = b"\x20\x02\x00\x00"
ANSI = re.compile(r"\x1b\[[0-9;]*m")
# the default idle timeout is 600 s: closing within this many seconds is the 1 s deadline's doing
CLOSED_WITHIN_S = 8


def logged(w: Warren, *words: str) -> list[str]:
    lines = [ANSI.sub("", line) for line in w.log().splitlines()]
    return [line for line in lines if all(word in line for word in words)]


def closed(s: socket.socket, timeout: float = CLOSED_WITHIN_S) -> bytes:
    """Read until the server closes the socket; return what came (fails if it stays open)."""
    return read_until_closed(s, timeout)


def ws_close_code(ws: websocket.WebSocket, timeout: float = CLOSED_WITHIN_S) -> int | None:
    """Read frames until the server's close frame; its status code (None without a code)."""
    ws.settimeout(timeout)
    while True:
        try:
            # the raw frame: no close reply is sent, so a server that already closed its end
            # cannot make this fail
            frame = ws.recv_frame()
        except websocket.WebSocketConnectionClosedException:
            raise AssertionError("closed without a close frame") from None
        except websocket.WebSocketTimeoutException:
            raise AssertionError(f"connection still open after {timeout} s") from None
        if frame.opcode == ABNF.OPCODE_CLOSE:
            data = frame.data
            return int.from_bytes(data[:2], "big") if len(data) >= 2 else None


def pomelo_package(ptype: int, body: bytes = b"") -> bytes:
    return bytes([ptype]) + len(body).to_bytes(3, "big") + body


# ---- first-message deadlines -----------------------------------------------------------------


def test_silent_connections_are_closed_at_the_connect_deadline_on_every_protocol():
    w = Warren(
        "--module", "Echo",
        listen=[
            Warren.url("pomelo", connect_timeout_s=1),
            Warren.url("json+ws", connect_timeout_s=1),
            Warren.url("pomelo-rpc", connect_timeout_s=1),
            Warren.url("line", connect_timeout_s=1),
            Warren.url("mqtt", connect_timeout_s=1),
        ],
        http=False,
    ).wait_ready()
    p = w.ports
    # TCP connections that say nothing
    silent = {name: socket.create_connection(("127.0.0.1", p[name])) for name in ("pomelo", "pomelo-rpc", "line", "mqtt")}
    # a pomelo client that sends its handshake but never the ack
    half = socket.create_connection(("127.0.0.1", p["pomelo"]))
    half.sendall(pomelo_package(1, json.dumps({"sys": {"type": "test"}}).encode()))
    # WebSocket connections that upgrade and then say nothing
    json_ws = websocket.create_connection(f"ws://127.0.0.1:{p['json+ws']}/")
    pomelo_ws = websocket.create_connection(f"ws://127.0.0.1:{p['pomelo']}/")
    try:
        for name, s in silent.items():
            closed(s)
        got = closed(half)
        assert got[:1] == b"\x01", f"no handshake reply before the close: {got!r}"
        assert ws_close_code(json_ws) == 1008
        assert ws_close_code(pomelo_ws) == 1008
        lines = logged(w, "connect_timeout")
        assert lines, "no log line names the connect deadline"
        for what in ("pomelo handshake", "login", "CONNECT", "first message"):
            assert any(what in line for line in lines), f"no connect_timeout line for {what}: {lines}"
        assert w.running()
    finally:
        for s in [*silent.values(), half]:
            s.close()
        json_ws.close()
        pomelo_ws.close()


def test_an_established_connection_is_not_held_to_the_connect_deadline():
    w = Warren(
        listen=[Warren.url("line", connect_timeout_s=1), Warren.url("json+ws", connect_timeout_s=1)],
        http=False,
    ).wait_ready()
    s = socket.create_connection(("127.0.0.1", w.ports["line"]), timeout=5)
    ws = websocket.create_connection(f"ws://127.0.0.1:{w.ports['json+ws']}/", timeout=5)
    try:
        s.sendall(b"5\r\nhello")
        assert s.recv(64) == b"5 \r\nhello"
        ws.send(json.dumps({"tpc": "login", "func": "login", "args": ["alice", "md5"], "cb": ""}))
        assert json.loads(ws.recv())["func"] == "loginback"
        time.sleep(2.5)  # past the 1 s connect deadline, far from the 600 s idle timeout
        s.sendall(b"2\r\nhi")
        assert s.recv(64) == b"2 \r\nhi"
        ws.ping()
        ws.send(json.dumps({"tpc": "global", "func": "test", "args": [1], "cb": "cb1"}))
        ws.settimeout(5)
        assert json.loads(ws.recv())["func"] == "cb1"
    finally:
        s.close()
        ws.close()


# ---- idle timeouts ---------------------------------------------------------------------------


def test_mqtt_keepalive_0_and_line_are_closed_at_the_idle_timeout():
    w = Warren(
        listen=[Warren.url("mqtt", idle_timeout_s=1), Warren.url("line", idle_timeout_s=1)],
        http=False,
    ).wait_ready()
    mqtt = RawClient(w.mqtt_plain)
    line = socket.create_connection(("127.0.0.1", w.ports["line"]), timeout=5)
    try:
        assert mqtt.connect("idle", keepalive=0) == CONNACK_OK
        line.sendall(b"3\r\nabc")
        assert line.recv(64) == b"3 \r\nabc"
        assert mqtt.closed(CLOSED_WITHIN_S), "an MQTT client with keepalive 0 was not closed when idle"
        closed(line)
        assert logged(w, "idle_timeout", mqtt.local_addr)
        assert w.running()
    finally:
        mqtt.close()
        line.close()


def test_json_ws_is_closed_at_the_idle_timeout_with_1001():
    w = Warren(listen=[Warren.url("json+ws", idle_timeout_s=1)], http=False).wait_ready()
    ws = websocket.create_connection(f"ws://127.0.0.1:{w.ports['json+ws']}/", timeout=5)
    try:
        ws.send(json.dumps({"tpc": "login", "func": "login", "args": ["bob", "md5"], "cb": ""}))
        assert json.loads(ws.recv())["func"] == "loginback"
        assert ws_close_code(ws) == 1001
    finally:
        ws.close()


# ---- WebSocket close codes -------------------------------------------------------------------


def test_json_ws_text_frame_that_is_not_utf8_is_closed_with_1007():
    w = Warren(listen=[Warren.url("json+ws")], http=False).wait_ready()
    ws = websocket.create_connection(f"ws://127.0.0.1:{w.ports['json+ws']}/", timeout=5)
    other = websocket.create_connection(f"ws://127.0.0.1:{w.ports['json+ws']}/", timeout=5)
    try:
        ws.send_frame(ABNF.create_frame(b'{"tpc":"\xff\xfe"}', ABNF.OPCODE_TEXT))
        assert ws_close_code(ws) == 1007
        # the others are unaffected
        other.send(json.dumps({"tpc": "login", "func": "login", "args": ["carol", "md5"], "cb": ""}))
        assert json.loads(other.recv())["func"] == "loginback"
        assert logged(w, "ws_bad_utf8")
    finally:
        ws.close()
        other.close()


def mqtt_ws(port: int) -> websocket.WebSocket:
    return websocket.create_connection(f"ws://127.0.0.1:{port}/mqtt", subprotocols=["mqtt"], timeout=5)


def test_mqtt_over_websocket_frame_too_big_is_closed_with_1009():
    w = Warren(listen=[Warren.url("ws", max_packet=1024)], http=False).wait_ready()
    ws = mqtt_ws(w.ws_plain)
    try:
        ws.send_binary(connect_packet("big"))
        opcode, data = ws.recv_data()
        assert data == CONNACK_OK
        ws.send_binary(b"\x30" + b"\xff" * 3 + b"\x7f" + b"x" * 4096)
        assert ws_close_code(ws) == 1009
        assert logged(w, "ws_too_big")
    finally:
        ws.close()


def test_mqtt_over_websocket_packet_too_big_across_frames_is_closed_with_1009():
    w = Warren(listen=[Warren.url("ws", max_packet=1024)], http=False).wait_ready()
    ws = mqtt_ws(w.ws_plain)
    try:
        ws.send_binary(connect_packet("big2"))
        assert ws.recv_data()[1] == CONNACK_OK
        # a PUBLISH header announcing 4096 bytes, in a small frame
        ws.send_binary(b"\x30\x80\x20")
        assert ws_close_code(ws) == 1009
    finally:
        ws.close()


def test_mqtt_over_websocket_protocol_error_is_closed_with_1002():
    w = Warren(listen=[Warren.url("ws")], http=False).wait_ready()
    ws = mqtt_ws(w.ws_plain)
    try:
        ws.send_binary(connect_packet("bad"))
        assert ws.recv_data()[1] == CONNACK_OK
        # packet type 0 is reserved
        ws.send_binary(b"\x00\x00")
        assert ws_close_code(ws) == 1002
    finally:
        ws.close()


def test_mqtt_over_websocket_before_connect_closes_with_a_code():
    w = Warren(listen=[Warren.url("ws", connect_timeout_s=1)], http=False).wait_ready()
    silent, wrong, refused = mqtt_ws(w.ws_plain), mqtt_ws(w.ws_plain), mqtt_ws(w.ws_plain)
    try:
        # a first packet that is not CONNECT: 1002
        wrong.send_binary(b"\xc0\x00")  # PINGREQ
        # CONNACK 2 (empty client id without clean session), then 1008
        refused.send_binary(connect_packet("", clean=False))
        assert ws_close_code(wrong) == 1002
        assert refused.recv_data()[1] == b"\x20\x02\x00\x02"
        assert ws_close_code(refused) == 1008
        # upgraded, then no CONNECT: the connect deadline, 1008
        assert ws_close_code(silent) == 1008
    finally:
        for ws in (silent, wrong, refused):
            ws.close()


def test_pomelo_over_websocket_too_big_is_closed_with_1009():
    w = Warren(listen=[Warren.url("pomelo")], http=False).wait_ready()
    header_only = websocket.create_connection(f"ws://127.0.0.1:{w.ports['pomelo']}/", timeout=5)
    one_frame = websocket.create_connection(f"ws://127.0.0.1:{w.ports['pomelo']}/", timeout=5)
    try:
        # a data package announcing 16 MiB, in a small frame
        header_only.send_binary(b"\x04\xff\xff\xff")
        # one WebSocket message over the listener's limit (max_package 64 KiB)
        one_frame.send_binary(pomelo_package(4, b"x" * 100_000))
        assert ws_close_code(header_only) == 1009
        assert ws_close_code(one_frame) == 1009
    finally:
        header_only.close()
        one_frame.close()

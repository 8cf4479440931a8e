"""Connection-level abuse: silent connections, full listeners, per-IP caps and rates, log floods.

Each test attacks a real warren the way a hostile client would and checks that the server
survives, that a canary client on another listener keeps getting its request/reply answered, and
that the refusal is the documented one (exact bytes, a close, a rate-limited log line).
"""

from __future__ import annotations

import json
import re
import resource
import select
import socket
import subprocess
import time
from pathlib import Path

import pytest

from conftest import Warren, wait_until
from abuse import Canary, read_until_closed
from rawmqtt import RawClient, connect_packet

CONNACK_OK = b"\x20\x02\x00\x00"
CONNACK_UNAVAILABLE = b"\x20\x02\x00\x03"


@pytest.fixture(autouse=True)
def _enough_descriptors():
    """This process opens over a thousand sockets: raise its own soft limit for the test."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = min(hard, 8192) if hard != resource.RLIM_INFINITY else 8192
    if soft < want:
        resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
    yield
    resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def raw_connect(port: int, source: str = "127.0.0.1", timeout: float = 5) -> socket.socket:
    """A TCP connection from `source` (any 127.0.0.0/8 address works on Linux loopback)."""
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.bind((source, 0))
    s.settimeout(timeout)
    s.connect(("127.0.0.1", port))
    return s


def mqtt_session(port: int, source: str = "127.0.0.1", client_id: str = "c") -> socket.socket | None:
    """CONNECT from `source`; the socket when CONNACK 0 came back, None when refused/closed."""
    try:
        s = raw_connect(port, source)
        s.sendall(connect_packet(client_id))
        got = b""
        while len(got) < 4:
            chunk = s.recv(4 - len(got))
            if not chunk:
                s.close()
                return None
            got += chunk
    except (ConnectionResetError, BrokenPipeError, socket.timeout):
        return None
    if got != CONNACK_OK:
        s.close()
        return None
    return s


def config_file(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "warren.toml"
    p.write_text(text)
    return p


def test_silent_connections_do_not_stop_other_listeners_and_are_closed_at_the_deadline():
    json_url = Warren.url("json+ws", handshake_timeout_s=1)
    w = Warren(
        "--module", "Echo",
        listen=[Warren.url("mqtt+mqant"), json_url],
        http=False,
    ).wait_ready()
    json_port = w.ports["json+ws"]
    canary = Canary(w.mqtt_mqant)
    canary.start()
    silent: list[socket.socket] = []
    try:
        # 1,100 silent TCP connections from eleven addresses (under the default per-IP caps)
        for i in range(1100):
            silent.append(raw_connect(json_port, source=f"127.0.0.{2 + i // 100}"))
        # the other listener keeps accepting and serving while they are held
        with RawClient(w.mqtt_mqant) as late:
            assert late.connect("late") == CONNACK_OK
        # every silent connection is closed by the server at the handshake deadline
        open_ = {s.fileno(): s for s in silent}
        poller = select.poll()
        for fd in open_:
            poller.register(fd, select.POLLIN)
        deadline = time.monotonic() + 15
        while open_ and time.monotonic() < deadline:
            for fd, _ev in poller.poll(500):
                try:
                    data = open_[fd].recv(1)
                except ConnectionResetError:
                    data = b""
                assert data == b"", f"a silent connection was sent {data!r}"
                poller.unregister(fd)
                del open_[fd]
        assert not open_, f"{len(open_)} silent connections still open after the handshake deadline"
        assert w.running()
    finally:
        for s in silent:
            s.close()
        canary.finish()
    # the closes are refusals, logged a limited number of times
    assert "handshake_timeout" in w.log()
    # after the flood, JSON-WS still serves an honest client
    import websocket

    ws = websocket.create_connection(f"ws://127.0.0.1:{json_port}/", timeout=5)
    # an upgraded connection is past the handshake: the deadline no longer applies to it
    time.sleep(1.5)
    ws.send(json.dumps({"tpc": "login", "func": "login", "args": ["guid", "md5"], "cb": ""}))
    assert "loginback" in ws.recv()
    ws.close()


def test_a_huge_upgrade_request_is_refused_with_431_and_others_are_served():
    w = Warren("--module", "Echo", listen=[Warren.url("mqtt+mqant"), Warren.url("json+ws")], http=False).wait_ready()
    canary = Canary(w.mqtt_mqant)
    canary.start()
    try:
        s = raw_connect(w.ports["json+ws"])
        # 200 KB of headers: more than a WebSocket upgrade needs (the limit is 32 KiB)
        head = b"GET / HTTP/1.1\r\nHost: x\r\n" + b"".join(b"X-Pad-%d: %s\r\n" % (i, b"a" * 1000) for i in range(200))
        try:
            s.sendall(head)
        except (BrokenPipeError, ConnectionResetError):
            pass
        answer = read_until_closed(s, timeout=5)
        assert answer.startswith(b"HTTP/1.1 431") or answer == b"", answer[:80]
        s.close()
        assert w.running()
    finally:
        canary.finish()


def test_over_max_conn_mqtt_gets_connack_3_and_websocket_503():
    w = Warren(
        "--module", "Echo",
        listen=[Warren.url("mqtt+mqant", max_conn=2), Warren.url("ws+mqant", max_conn=1)],
        http=False,
    ).wait_ready()
    # (the readiness probe's connection may hold a place for a moment)
    held = [wait_until(lambda: mqtt_session(w.mqtt_mqant, client_id=f"h{i}"), timeout=5, interval=0.1) for i in range(2)]
    s = raw_connect(w.mqtt_mqant)
    s.sendall(connect_packet("third"))
    assert read_until_closed(s) == CONNACK_UNAVAILABLE
    s.close()

    import websocket

    def ws_open():
        try:
            return websocket.create_connection(f"ws://127.0.0.1:{w.ws_mqant}/", subprotocols=["mqtt"], timeout=5)
        except websocket.WebSocketBadStatusException:
            return None

    ws = wait_until(ws_open, timeout=5, interval=0.1)
    try:
        with pytest.raises(websocket.WebSocketBadStatusException) as e:
            websocket.create_connection(f"ws://127.0.0.1:{w.ws_mqant}/", subprotocols=["mqtt"], timeout=5)
        assert e.value.status_code == 503
    finally:
        ws.close()
    # a freed place is usable again
    held[0].close()
    wait_until(lambda: mqtt_session(w.mqtt_mqant, client_id="again"), timeout=5)
    assert "max_conn" in w.log()


def test_per_ip_cap_and_rate_leave_other_addresses_alone(tmp_path):
    cfg = config_file(
        tmp_path,
        """
[limits]
max_conn_per_ip = 3
conn_rate_per_ip = 1
conn_burst_per_ip = 6
""",
    )
    w = Warren("--config", str(cfg), "--module", "Echo", listen=[Warren.url("mqtt+mqant")], http=False).wait_ready()
    port = w.mqtt_mqant
    held = [mqtt_session(port, "127.0.0.2", f"a{i}") for i in range(3)]
    assert all(held), "the first three connections of an address are served"
    # the fourth from the same address is closed before a byte is read: no CONNACK
    s = raw_connect(port, "127.0.0.2")
    try:
        s.sendall(connect_packet("a4"))
    except (BrokenPipeError, ConnectionResetError):
        pass
    assert read_until_closed(s) == b""
    s.close()
    # another address is not affected
    other = mqtt_session(port, "127.0.0.3", "b")
    assert other is not None
    # closing one gives the place back (two connection attempts of the burst are left)
    held[0].close()
    assert wait_until(lambda: mqtt_session(port, "127.0.0.2", "a5"), timeout=5, interval=0.2)

    # rate: a burst of 6 new connections, then refusals, while another address connects
    opened = [raw_connect(port, "127.0.0.4") for _ in range(6)]
    refused = raw_connect(port, "127.0.0.4")
    assert read_until_closed(refused) == b""
    assert mqtt_session(port, "127.0.0.5", "c") is not None
    for s in opened:
        s.close()
    log = w.log()
    assert "max_conn_per_ip" in log and "127.0.0.2" in log
    assert "conn_rate_per_ip" in log and "127.0.0.4" in log


def test_refusal_log_lines_are_rate_limited():
    w = Warren(listen=[Warren.url("mqtt", max_conn=1)], http=False).wait_ready()
    port = w.mqtt_plain
    # (the readiness probe's connection may hold the one place for a moment)
    holder = wait_until(lambda: mqtt_session(port, client_id="holder"), timeout=5, interval=0.1)
    started = time.monotonic()
    for i in range(500):
        s = raw_connect(port, source=f"127.0.1.{1 + i % 200}")
        s.close()
    elapsed = time.monotonic() - started
    time.sleep(1.2)
    # one more, after the window, reports how many were left out
    s = raw_connect(port, source="127.0.2.1")
    s.close()

    def lines():
        return [l for l in w.log().splitlines() if "WARN" in l and "max_conn" in l]

    wait_until(lambda: any("not logged" in l for l in lines()), timeout=5)
    n = len(lines())
    bound = 10 * (int(elapsed) + 3)
    assert 1 <= n <= bound, f"{n} WARN lines for 500 refusals in {elapsed:.1f} s (bound {bound})"
    holder.close()


def test_the_soft_descriptor_limit_is_raised_to_the_hard_one():
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or hard <= 1024:
        pytest.skip(f"hard nofile limit {hard} leaves nothing to raise")
    resource.setrlimit(resource.RLIMIT_NOFILE, (1024, hard))
    try:
        # listeners whose max_conn together cannot fit under the hard limit: warned at start
        w = Warren(listen=[Warren.url("mqtt", max_conn=hard)], http=False)
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    w.wait_ready()
    limits = Path(f"/proc/{w.proc.pid}/limits").read_text()
    m = re.search(r"Max open files\s+(\d+)\s+(\d+)", limits)
    assert m, limits
    assert (int(m.group(1)), int(m.group(2))) == (hard, hard)
    log = w.log()
    assert re.search(r"WARN.*exceed the open file limit", log), log[-3000:]


def test_out_of_descriptors_accept_backs_off_quietly_and_recovers():
    w = Warren("--module", "Echo", listen=[Warren.url("mqtt+mqant")], http=False).wait_ready()
    port = w.mqtt_mqant
    # leave the running server few descriptors: accepts soon fail with EMFILE
    subprocess.run(["prlimit", f"--pid={w.proc.pid}", "--nofile=64:64"], check=True)
    held: list[socket.socket] = []
    try:
        for i in range(150):
            held.append(raw_connect(port, source=f"127.0.3.{1 + i}"))
        wait_until(lambda: "accept failed" in w.log(), timeout=5, msg="no accept failure logged")
        time.sleep(2)
        assert w.running()
        failures = [l for l in w.log().splitlines() if "accept failed" in l]
        assert len(failures) <= 6, f"{len(failures)} accept-failure lines in about 2 s: {failures[:8]}"
    finally:
        for s in held:
            s.close()
    # once descriptors are free again, the listener serves (the backoff resets)
    assert wait_until(lambda: mqtt_session(port, "127.0.4.1", "after"), timeout=10, interval=0.2)

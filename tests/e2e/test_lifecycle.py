"""Process lifecycle: graceful drain on SIGTERM/SIGINT, and `warren serve` with no flags.

The rule (docs/architecture.md, "Concurrency model"): no silent loss; every call ends in a reply, a
typed error, or a deadline error, and shutdown drains. These tests hold requests in flight across
the signal and check that each one is answered before its client is let go, that the door closes to
newcomers, and that the process exits cleanly.
"""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import tempfile
import threading
import time
from pathlib import Path

import pytest

from conftest import REPO_ROOT, Warren, port_open, wait_until, warren_bin
from rawmqtt import RawClient, connect_packet, parse_publish, publish_packet


def refuses_new_connections(port: int) -> bool:
    """True when a new client cannot get a CONNACK: connect refused, or closed without one."""
    try:
        c = RawClient(port, timeout=1)
    except OSError:
        return True
    try:
        c.send(connect_packet("late"))
        ack = c.recv_exact(4, timeout=1)
    except (OSError, TimeoutError):
        return True
    finally:
        c.close()
    return ack != b"\x20\x02\x00\x00"


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_graceful_shutdown_answers_in_flight_requests(sig):
    w = Warren("--module", "Debug", listen=[Warren.url("mqtt+mqant")], http=False).wait_ready()
    port = w.mqtt_mqant
    clients = []
    for n in range(1, 6):
        c = RawClient(port, timeout=20)
        assert c.connect(f"drain{n}") == b"\x20\x02\x00\x00"
        clients.append(c)
    # QoS 1: the PUBACK is sent on receipt, before the handler runs, so once every client has
    # its PUBACK every request is known to be in flight.
    for n, c in enumerate(clients, start=1):
        c.send(publish_packet(f"Debug/HD_Sleep/{n}", b'{"ms":1500}', qos=1, pkid=n))
    for n, c in enumerate(clients, start=1):
        c.expect(bytes([0x40, 0x02, 0x00, n]))

    result: dict[str, int] = {}
    signalled = time.monotonic()
    waiter = threading.Thread(target=lambda: result.setdefault("code", w.terminate(sig, timeout=15)))
    waiter.start()

    # The listener stops accepting while the requests are still sleeping.
    wait_until(lambda: refuses_new_connections(port), timeout=5, interval=0.1, msg="new connection accepted while draining")

    for n, c in enumerate(clients, start=1):
        topic = f"Debug/HD_Sleep/{n}"
        while True:
            first, body = c.recv_packet(timeout=15)
            if first >> 4 == 3:
                got, _q, _id, payload = parse_publish(first, body)
                assert got == topic
                reply = json.loads(payload)
                break
        assert set(reply) == {"Error", "Result"}, reply
        # Either the sleep finished ("slept") or the drain deadline answered with a typed error.
        assert reply == {"Error": "", "Result": "slept"} or (reply["Error"] and reply["Result"] is None), reply
    for c in clients:
        assert c.closed(15), "client not disconnected by the drain"
        c.close()

    waiter.join(20)
    assert not waiter.is_alive()
    assert result.get("code") == 0, f"exit code {result.get('code')}\n{w.tail()}"
    assert time.monotonic() - signalled < 15
    assert not port_open(port)


# ---- `warren serve` with no flags --------------------------------------------------------------

DEFAULT_PORTS = (3563, 3653, 8080)


def port_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return not port_open(port)


def test_serve_with_no_flags_on_default_ports():
    busy = [p for p in DEFAULT_PORTS if not port_free(p)]
    if busy:
        pytest.skip(f"default ports in use: {busy}")
    out_dir = Path(tempfile.mkdtemp(prefix="warren-e2e-default-"))
    out = open(out_dir / "stdout.log", "wb")
    err = open(out_dir / "stderr.log", "wb")
    proc = subprocess.Popen(
        [str(warren_bin()), "serve"], cwd=REPO_ROOT, stdin=subprocess.DEVNULL, stdout=out, stderr=err
    )
    try:

        def tail() -> str:
            return (out_dir / "stdout.log").read_text() + "\n--- stderr ---\n" + (out_dir / "stderr.log").read_text()[-4000:]

        def ready() -> bool:
            assert proc.poll() is None, f"warren serve exited with {proc.returncode}\n{tail()}"
            return all(port_open(p) for p in DEFAULT_PORTS)

        wait_until(ready, timeout=20, interval=0.05, msg="default ports not accepting")
        wait_until(lambda: (out_dir / "stdout.log").read_text().count("\n") >= 3, timeout=5)
        stdout = (out_dir / "stdout.log").read_text()
        assert "listening mqtt+mqant tcp://127.0.0.1:3563" in stdout, stdout
        assert "listening ws+mqant ws://127.0.0.1:3653" in stdout, stdout
        assert "web page http://127.0.0.1:8080/" in stdout, stdout

        # The Python demo client's habits: MQTT 3.1, admin/password, keepalive 60.
        with RawClient(3563) as c:
            assert c.connect("111", proto="MQIsdp", level=3, username="admin", password="password") == b"\x20\x02\x00\x00"
            c.send(publish_packet("Login/HD_Login/1", b'{"userName":"alice","passWord":"Hello,anyone!"}', qos=1, pkid=1))
            c.expect(b"\x40\x02\x00\x01")
            first, body = c.recv_packet()
            topic, _q, _id, payload = parse_publish(first, body)
            assert topic == "Login/HD_Login/1"
            assert json.loads(payload) == {"Error": "", "Result": "login success alice"}

        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=15) == 0, tail()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)
        out.close()
        err.close()

"""TLS on every listener kind, client certificates, and certificate reload on SIGHUP.

Certificates are made at test time with the `openssl` CLI in a temporary directory: a CA, a
server certificate for 127.0.0.1/localhost, and a client certificate, all signed by the CA.
"""

from __future__ import annotations

import json
import signal
import socket
import ssl
import subprocess
import time
from pathlib import Path

import paho.mqtt.client as paho
import pytest
import websocket

from conftest import Warren, wait_until
from rawmqtt import connect_packet, publish_packet, subscribe_packet

CONNACK_OK = b"\x20\x02\x00\x00"


def openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


def make_leaf(d: Path, name: str, cn: str, usage: str) -> None:
    """`name.pem` / `name.key`, signed by the CA in `d`."""
    ext = d / f"{name}.ext"
    ext.write_text(
        "basicConstraints=critical,CA:FALSE\n"
        "keyUsage=critical,digitalSignature,keyEncipherment\n"
        f"extendedKeyUsage={usage}\n"
        "subjectAltName=DNS:localhost,IP:127.0.0.1\n"
    )
    openssl("req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
            "-keyout", f"{name}.key", "-out", f"{name}.csr", "-subj", f"/CN={cn}", cwd=d)
    openssl("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.pem", "-CAkey", "ca.key",
            "-CAcreateserial", "-out", f"{name}.pem", "-days", "2", "-extfile", ext.name, cwd=d)


@pytest.fixture(scope="module")
def certs(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("certs")
    openssl("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
            "-keyout", "ca.key", "-out", "ca.pem", "-days", "2", "-subj", "/CN=warren test CA",
            "-addext", "basicConstraints=critical,CA:TRUE",
            "-addext", "keyUsage=critical,keyCertSign,cRLSign", cwd=d)
    make_leaf(d, "server", "warren-server-1", "serverAuth")
    make_leaf(d, "server2", "warren-server-2", "serverAuth")
    make_leaf(d, "client", "warren-client", "clientAuth")
    return d


def tls_url(scheme: str, d: Path, **extra) -> str:
    return Warren.url(scheme, tls_cert=d / "server.pem", tls_key=d / "server.key", **extra)


def client_ctx(d: Path, cert: bool = False, alpn: list[str] | None = None) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=str(d / "ca.pem"))
    if cert:
        ctx.load_cert_chain(str(d / "client.pem"), str(d / "client.key"))
    if alpn:
        ctx.set_alpn_protocols(alpn)
    return ctx


def tls_socket(port: int, ctx: ssl.SSLContext) -> ssl.SSLSocket:
    raw = socket.create_connection(("127.0.0.1", port), timeout=5)
    return ctx.wrap_socket(raw, server_hostname="localhost")


def recv_exact(s: socket.socket, n: int) -> bytes:
    got = b""
    while len(got) < n:
        chunk = s.recv(n - len(got))
        if not chunk:
            raise ConnectionError(f"closed after {got!r}")
        got += chunk
    return got


def peer_cn(s: ssl.SSLSocket) -> str:
    subject = dict(x[0] for x in s.getpeercert()["subject"])
    return subject["commonName"]


def test_every_listener_kind_over_tls(certs, tmp_path):
    client_ca = dict(tls_client_ca=certs / "ca.pem")
    listen = [
        tls_url("mqtts", certs),
        tls_url("wss", certs),
        tls_url("json+wss", certs),
        tls_url("pomelo+tls", certs),
        tls_url("line+tls", certs),
        tls_url("mqtts+mqant", certs, **client_ca),
        tls_url("wss+mqant", certs),
        tls_url("pomelo-rpc+tls", certs),
    ]
    w = Warren("--module", "Echo", listen=listen, http=False).wait_ready()
    port = {scheme: p for scheme, p in w.listeners}

    # paho-mqtt with tls_set over mqtts://: subscribe and get its own publish back
    got: list[bytes] = []
    c = paho.Client(paho.CallbackAPIVersion.VERSION2, client_id="tls-paho")
    c.tls_set(ca_certs=str(certs / "ca.pem"))
    subscribed: list[bool] = []
    c.on_message = lambda _c, _u, m: got.append(m.payload)
    c.on_subscribe = lambda *_a: subscribed.append(True)
    c.connect("localhost", port["mqtts"])
    c.loop_start()
    try:
        c.subscribe("tls/t", qos=1)
        wait_until(lambda: subscribed, timeout=5, msg="no SUBACK over mqtts")
        c.publish("tls/t", b"over tls", qos=1)
        wait_until(lambda: got, timeout=5, msg="no publish back over mqtts")
        assert got[0] == b"over tls"
        # a packet larger than several TLS records arrives whole
        big = bytes(range(256)) * 1200
        c.publish("tls/t", big, qos=1)
        wait_until(lambda: len(got) == 2, timeout=5, msg="no large publish back over mqtts")
        assert got[1] == big
    finally:
        c.loop_stop()
        c.disconnect()

    # websocket-client over wss:// (MQTT over WebSocket)
    ws = websocket.create_connection(
        f"wss://localhost:{port['wss']}/", subprotocols=["mqtt"],
        sslopt={"ca_certs": str(certs / "ca.pem")}, timeout=5,
    )
    ws.send_binary(connect_packet("tls-ws"))
    assert ws.recv() == CONNACK_OK
    ws.close()

    # wss+mqant:// and pomelo-rpc+tls:// (MQTT framing under the RPC protocol)
    ws = websocket.create_connection(
        f"wss://localhost:{port['wss+mqant']}/", subprotocols=["mqtt"],
        sslopt={"ca_certs": str(certs / "ca.pem")}, timeout=5,
    )
    ws.send_binary(connect_packet("tls-ws-mqant"))
    assert ws.recv() == CONNACK_OK
    ws.close()
    s = tls_socket(port["pomelo-rpc+tls"], client_ctx(certs))
    s.sendall(connect_packet("rpc-peer"))
    assert recv_exact(s, 4) == CONNACK_OK
    s.close()

    # JSON over wss://
    ws = websocket.create_connection(
        f"wss://localhost:{port['json+wss']}/", sslopt={"ca_certs": str(certs / "ca.pem")}, timeout=5
    )
    ws.send(json.dumps({"tpc": "login", "func": "login", "args": ["guid", "md5"], "cb": ""}))
    assert ws.recv() == '{"tpc":"","func":"loginback","cb":"","args":[0]}'
    ws.close()

    # a raw pomelo handshake over pomelo+tls:// with Python's ssl module
    s = tls_socket(port["pomelo+tls"], client_ctx(certs))
    body = json.dumps({"sys": {"type": "python", "version": "0.1"}, "user": {}}).encode()
    s.sendall(bytes([1]) + len(body).to_bytes(3, "big") + body)
    head = recv_exact(s, 4)
    assert head[0] == 1, head
    reply = json.loads(recv_exact(s, int.from_bytes(head[1:], "big")))
    assert reply["code"] == 200, reply
    s.close()
    # the same port upgrades to WebSocket over TLS (the first byte decides)
    ws = websocket.create_connection(
        f"wss://localhost:{port['pomelo+tls']}/", sslopt={"ca_certs": str(certs / "ca.pem")}, timeout=5
    )
    ws.send_binary(bytes([1]) + len(body).to_bytes(3, "big") + body)
    assert ws.recv()[0] == 1
    ws.close()

    # openssl s_client against line+tls:// (echo)
    p = subprocess.Popen(
        ["openssl", "s_client", "-connect", f"127.0.0.1:{port['line+tls']}", "-quiet",
         "-CAfile", str(certs / "ca.pem"), "-verify_return_error"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
    )
    try:
        assert p.stdin and p.stdout
        p.stdin.write(b"5\r\nhello")
        p.stdin.flush()
        out = b""
        deadline = time.monotonic() + 10
        while b"hello" not in out and time.monotonic() < deadline:
            out += p.stdout.read1(64)
        assert out == b"5 \r\nhello", out
    finally:
        p.kill()
        p.wait()

    # client certificates: required on the listener with tls_client_ca
    mq = port["mqtts+mqant"]
    s = tls_socket(mq, client_ctx(certs, cert=True))
    s.sendall(connect_packet("with-cert"))
    assert recv_exact(s, 4) == CONNACK_OK
    s.close()
    with pytest.raises((ssl.SSLError, ConnectionError, OSError)):
        s = tls_socket(mq, client_ctx(certs))
        s.sendall(connect_packet("no-cert"))
        recv_exact(s, 4)
    wait_until(lambda: "tls_handshake" in w.log(), timeout=5, msg="no refusal line for the TLS handshake")
    assert w.running()


def test_plaintext_on_a_tls_port_is_refused_and_logged(certs):
    w = Warren(listen=[tls_url("mqtts", certs, handshake_timeout_s=1)], http=False).wait_ready()
    port = w.listeners[0][1]
    s = socket.create_connection(("127.0.0.1", port), timeout=5)
    s.sendall(connect_packet("plain"))
    data = b""
    try:
        while chunk := s.recv(100):
            data += chunk
    except ConnectionResetError:
        pass
    assert not data.startswith(b"\x20"), "a plaintext CONNECT was answered with CONNACK"
    # a silent connection is closed at the handshake deadline
    s = socket.create_connection(("127.0.0.1", port), timeout=5)
    assert s.recv(1) == b""
    wait_until(lambda: "handshake_timeout" in w.log() and "tls_handshake" in w.log(), timeout=5)


def test_bad_certificate_file_refuses_to_start(certs, tmp_path):
    bad = tmp_path / "bad.pem"
    bad.write_text("not a certificate\n")
    w = Warren(listen=[Warren.url("mqtts", tls_cert=bad, tls_key=certs / "server.key")], http=False)
    assert w.proc.wait(timeout=20) != 0
    err = w.log()
    assert "tls_cert" in err and "bad.pem" in err, err[-2000:]


def test_sighup_swaps_the_certificate_for_new_connections_and_keeps_open_ones(certs, tmp_path):
    d = tmp_path / "live"
    d.mkdir()
    (d / "server.pem").write_bytes((certs / "server.pem").read_bytes())
    (d / "server.key").write_bytes((certs / "server.key").read_bytes())
    w = Warren(
        listen=[Warren.url("mqtts", tls_cert=d / "server.pem", tls_key=d / "server.key")], http=False
    ).wait_ready()
    port = w.listeners[0][1]
    ctx = client_ctx(certs)

    old = tls_socket(port, ctx)
    assert peer_cn(old) == "warren-server-1"
    old.sendall(connect_packet("kept"))
    assert recv_exact(old, 4) == CONNACK_OK
    old.sendall(subscribe_packet(1, [("reload/t", 0)]))
    assert recv_exact(old, 5)[0] == 0x90

    (d / "server.pem").write_bytes((certs / "server2.pem").read_bytes())
    (d / "server.key").write_bytes((certs / "server2.key").read_bytes())
    w.proc.send_signal(signal.SIGHUP)
    wait_until(lambda: "reloaded" in w.log(), timeout=5, msg="no reload line after SIGHUP")

    new = tls_socket(port, ctx)
    assert peer_cn(new) == "warren-server-2"
    new.sendall(connect_packet("new"))
    assert recv_exact(new, 4) == CONNACK_OK
    # the connection made before the reload is still served
    new.sendall(publish_packet("reload/t", b"after"))
    first = recv_exact(old, 1)
    assert first[0] >> 4 == 3
    rest = old.recv(100)
    assert rest.endswith(b"after")
    old.close()
    new.close()

    # a broken file on SIGHUP keeps the old certificate
    (d / "server.pem").write_text("broken\n")
    w.proc.send_signal(signal.SIGHUP)
    wait_until(lambda: "not reloaded" in w.log(), timeout=5)
    again = tls_socket(port, ctx)
    assert peer_cn(again) == "warren-server-2"
    again.close()

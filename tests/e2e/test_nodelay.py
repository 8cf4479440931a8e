"""Every accepted connection has Nagle's algorithm off (TCP_NODELAY), WebSocket ones included.

With Nagle on, a server's small writes wait for the client's delayed ACK: MQTT over WebSocket
once stalled at a quarter of its TCP throughput with the server mostly idle, and browsers saw up
to 40 ms added under load. warren sets TCP_NODELAY where it accepts, before any handshake
(crates/warren/src/gate/listener.rs), so every protocol and transport gets it.

The test reads the option on warren's own end of each connection: it finds the server's socket
for a client connection in /proc (the inode of the local/peer port pair), takes a duplicate of
that descriptor with pidfd_getfd(2) and asks getsockopt(TCP_NODELAY). A client socket left with
Nagle on reads 0 the same way, which shows the probe tells the two apart. Each client really
speaks its protocol first (a WebSocket upgrade, a TLS handshake, an MQTT CONNECT), so the
connection has reached the protocol's code, not only the accept.
"""

from __future__ import annotations

import ctypes
import os
import socket
import ssl
import subprocess
from pathlib import Path

import pytest
from websocket import create_connection

from conftest import Warren

SYS_PIDFD_GETFD = 438  # the same number on every architecture (added in Linux 5.6)
CONNECT = bytes.fromhex("100d00044d5154540402003c000161")  # MQTT 3.1.1 CONNECT, client id "a"


def server_socket_inode(pid: int, local_port: int, peer_port: int) -> int:
    """The inode of the TCP socket of process `pid` from `local_port` to `peer_port`."""
    for table in (f"/proc/{pid}/net/tcp", f"/proc/{pid}/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            f = line.split()
            local, remote, state, inode = f[1], f[2], f[3], int(f[9])
            if state != "01" or inode == 0:  # only ESTABLISHED sockets someone holds
                continue
            if int(local.rsplit(":", 1)[1], 16) == local_port and int(remote.rsplit(":", 1)[1], 16) == peer_port:
                return inode
    raise AssertionError(f"no TCP socket {local_port} -> {peer_port} in process {pid}")


def fd_of_inode(pid: int, inode: int) -> int:
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            if os.readlink(f"/proc/{pid}/fd/{fd}") == f"socket:[{inode}]":
                return int(fd)
        except OSError:
            continue
    raise AssertionError(f"process {pid} holds no descriptor for socket inode {inode}")


def nodelay_of(pid: int, fd: int) -> int:
    """getsockopt(TCP_NODELAY) on descriptor `fd` of process `pid`."""
    libc = ctypes.CDLL(None, use_errno=True)
    pidfd = os.pidfd_open(pid)
    try:
        dup = libc.syscall(SYS_PIDFD_GETFD, pidfd, fd, 0)
        if dup < 0:
            err = ctypes.get_errno()
            pytest.fail(f"pidfd_getfd: {os.strerror(err)} (Linux 5.6+ and ptrace rights over warren are needed)")
    finally:
        os.close(pidfd)
    s = socket.socket(fileno=dup)
    try:
        return s.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)
    finally:
        s.close()


def server_nodelay(w: Warren, port: int, client: socket.socket) -> int:
    """TCP_NODELAY on warren's end of `client`'s connection to `port`."""
    peer_port = client.getsockname()[1]
    return nodelay_of(w.proc.pid, fd_of_inode(w.proc.pid, server_socket_inode(w.proc.pid, port, peer_port)))


@pytest.fixture(scope="module")
def cert(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("nodelay-tls")
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes", "-days", "2",
         "-subj", "/CN=localhost", "-keyout", "key.pem", "-out", "cert.pem"],
        cwd=d, check=True, capture_output=True,
    )
    return d


def tls_client() -> ssl.SSLContext:
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    return ctx


def test_every_listener_kind_accepts_with_nagle_off(cert: Path):
    tls = f"tls_cert={cert / 'cert.pem'}&tls_key={cert / 'key.pem'}"
    kinds = ["mqtt", "mqtt+mqant", "ws", "ws+mqant", "json+ws", "pomelo", "line", "pomelo-rpc", "pomelo-rpc+tcp", "wss", "mqtts"]
    listen = [Warren.url(k) + (f"?{tls}" if k in ("wss", "mqtts") else "") for k in kinds]
    w = Warren("--module", "Echo", listen=listen, http=False).wait_ready()
    port = {k: p for k, (_, p) in zip(kinds, w.listeners)}

    checked: dict[str, int] = {}
    # stream protocols: speak first, then read warren's end
    for kind in ("mqtt", "mqtt+mqant", "pomelo-rpc"):
        with socket.create_connection(("127.0.0.1", port[kind])) as c:
            c.sendall(CONNECT)
            assert c.recv(4) == bytes.fromhex("20020000"), kind
            checked[kind] = server_nodelay(w, port[kind], c)
    with socket.create_connection(("127.0.0.1", port["line"])) as c:
        c.sendall(b"5\r\nhello")
        assert c.recv(64).endswith(b"hello")
        checked["line"] = server_nodelay(w, port["line"], c)
    with socket.create_connection(("127.0.0.1", port["pomelo"])) as c:
        body = b'{"sys":{"type":"js-websocket","version":"0.0.1"},"user":{}}'
        c.sendall(bytes([1]) + len(body).to_bytes(3, "big") + body)
        assert c.recv(1) == b"\x01"  # the handshake response
        checked["pomelo"] = server_nodelay(w, port["pomelo"], c)
    with socket.create_connection(("127.0.0.1", port["pomelo-rpc+tcp"])) as c:
        req = b'{"id":1,"msg":{"namespace":"user","service":"Echo","method":"HD_Echo","args":[{"a":1}]}}'
        assert len(req) < 128  # a one-byte stream-pkg length
        c.sendall(bytes([len(req)]) + req)
        assert b'"id":1' in c.recv(256)
        checked["pomelo-rpc+tcp"] = server_nodelay(w, port["pomelo-rpc+tcp"], c)
    with tls_client().wrap_socket(socket.create_connection(("127.0.0.1", port["mqtts"])), server_hostname="localhost") as c:
        c.sendall(CONNECT)
        assert c.recv(4) == bytes.fromhex("20020000")
        checked["mqtts"] = server_nodelay(w, port["mqtts"], c)
    # WebSocket: the upgrade is served by hyper, then the protocol runs on the upgraded stream
    for kind, scheme, sub in (("ws", "ws", "mqtt"), ("ws+mqant", "ws", "mqtt"), ("json+ws", "ws", None), ("wss", "wss", "mqtt")):
        opts = {"subprotocols": [sub]} if sub else {}
        if scheme == "wss":
            opts["sslopt"] = {"cert_reqs": ssl.CERT_NONE, "check_hostname": False}
        ws = create_connection(f"{scheme}://127.0.0.1:{port[kind]}/mqtt", **opts)
        try:
            if sub:
                ws.send_binary(CONNECT)
                assert ws.recv() == bytes.fromhex("20020000"), kind
            else:
                ws.send('{"tpc":"login","func":"login","args":["guid","md5"],"cb":""}')
                assert "loginback" in ws.recv()
            raw = ws.sock
            checked[kind] = server_nodelay(w, port[kind], raw)
        finally:
            ws.close()
    assert sorted(checked) == sorted(kinds)
    off = {k: v for k, v in checked.items() if not v}
    assert not off, f"TCP_NODELAY off on warren's end of: {sorted(off)}"


def test_the_probe_sees_nagle_on_where_it_is_on():
    # a client socket with the option untouched reads 0 through the same probe
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        with socket.create_connection(listener.getsockname()) as c:
            fd = fd_of_inode(os.getpid(), server_socket_inode(os.getpid(), c.getsockname()[1], listener.getsockname()[1]))
            assert fd == c.fileno()
            assert nodelay_of(os.getpid(), fd) == 0
            c.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            assert nodelay_of(os.getpid(), fd) != 0

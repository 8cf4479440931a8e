"""IP allow and deny lists (node-wide and per listener), their reload on SIGHUP, and the PROXY
protocol (v1 and v2) giving the client's address to the IP checks and the logs.

Linux routes all of 127.0.0.0/8 to loopback, so a client picks its address by binding to
127.0.0.x before connecting.
"""

from __future__ import annotations

import signal
import socket
import struct
from pathlib import Path

from conftest import Warren, free_port, wait_until
from rawmqtt import PINGREQ, connect_packet

CONNACK_OK = b"\x20\x02\x00\x00"


def connect_from(port: int, source: str) -> socket.socket:
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.bind((source, 0))
    s.settimeout(5)
    s.connect(("127.0.0.1", port))
    return s


def answer(s: socket.socket, send: bytes, n: int = 4) -> bytes:
    """Send `send`; return the first `n` bytes answered, or b"" when the server closed."""
    try:
        s.sendall(send)
        got = b""
        while len(got) < n:
            chunk = s.recv(n - len(got))
            if not chunk:
                return got
            got += chunk
        return got
    except (ConnectionResetError, BrokenPipeError):
        return b""


def session(port: int, source: str, cid: str = "c") -> bytes:
    s = connect_from(port, source)
    try:
        return answer(s, connect_packet(cid))
    finally:
        s.close()


def write_config(path: Path, port: int, node_deny: list[str], allow: list[str], deny: list[str]) -> None:
    q = lambda l: "[" + ", ".join(f'"{x}"' for x in l) + "]"  # noqa: E731
    path.write_text(
        f"""
[access]
deny = {q(node_deny)}

[[listener]]
protocol = "mqtt"
mode = "mqant"
addr = "127.0.0.1:{port}"
allow = {q(allow)}
deny = {q(deny)}
"""
    )


def test_allow_and_deny_lists_and_their_reload_on_sighup(tmp_path):
    port = free_port()
    cfg = tmp_path / "warren.toml"
    write_config(cfg, port, node_deny=["127.0.0.2"], allow=["127.0.0.0/29"], deny=["127.0.0.3/32"])
    w = Warren("--config", str(cfg), "--no-http", http=False)
    w.listeners.append(("mqtt+mqant", port))
    w.wait_ready()

    assert session(port, "127.0.0.1") == CONNACK_OK
    assert session(port, "127.0.0.5") == CONNACK_OK
    assert session(port, "127.0.0.2") == b"", "node-wide deny"
    assert session(port, "127.0.0.3") == b"", "listener deny"
    assert session(port, "127.0.0.9") == b"", "outside the listener's allow list"
    log = w.log()
    for ip in ("127.0.0.2", "127.0.0.3", "127.0.0.9"):
        assert any(ip in l and "ip_denied" in l for l in log.splitlines()), f"no refusal line for {ip}"

    # a connection open before the reload stays open after its address is denied
    kept = connect_from(port, "127.0.0.6")
    assert answer(kept, connect_packet("kept")) == CONNACK_OK

    write_config(cfg, port, node_deny=["127.0.0.4", "127.0.0.6"], allow=[], deny=[])
    w.proc.send_signal(signal.SIGHUP)
    wait_until(lambda: "reloaded" in w.log(), timeout=5, msg="no reload line after SIGHUP")

    assert session(port, "127.0.0.2") == CONNACK_OK
    assert session(port, "127.0.0.3") == CONNACK_OK
    assert session(port, "127.0.0.9") == CONNACK_OK
    assert session(port, "127.0.0.4") == b""
    assert session(port, "127.0.0.6") == b""
    assert answer(kept, PINGREQ, 2) == b"\xd0\x00", "the open connection was dropped by the reload"
    kept.close()

    # a config that no longer loads changes nothing
    cfg.write_text("[access]\ndeny = [\"not an address\"]\n")
    w.proc.send_signal(signal.SIGHUP)
    wait_until(lambda: "the config does not load" in w.log(), timeout=5)
    assert session(port, "127.0.0.4") == b""
    assert session(port, "127.0.0.2") == CONNACK_OK


V2_SIG = b"\r\n\r\n\x00\r\nQUIT\n"


def proxy_v1(src: str, sport: int, dport: int) -> bytes:
    return f"PROXY TCP4 {src} 127.0.0.1 {sport} {dport}\r\n".encode()


def proxy_v2(src: str, sport: int, dport: int) -> bytes:
    addrs = socket.inet_aton(src) + socket.inet_aton("127.0.0.1") + struct.pack(">HH", sport, dport)
    return V2_SIG + bytes([0x21, 0x11]) + struct.pack(">H", len(addrs)) + addrs


def test_proxy_protocol_v1_and_v2_give_the_client_address(tmp_path):
    port = free_port()
    cfg = tmp_path / "warren.toml"
    cfg.write_text(
        f"""
[access]
deny = ["203.0.113.0/24"]

[[listener]]
protocol = "mqtt"
mode = "mqant"
addr = "127.0.0.1:{port}"
proxy_protocol = true
handshake_timeout_s = 2
"""
    )
    w = Warren("--config", str(cfg), "--no-http", http=False)
    w.listeners.append(("mqtt+mqant", port))
    w.wait_ready()

    for header in (proxy_v1("198.51.100.7", 40001, port), proxy_v2("198.51.100.8", 40002, port)):
        s = connect_from(port, "127.0.0.1")
        assert answer(s, header + connect_packet("proxied")) == CONNACK_OK
        s.close()

    # the header's address is the peer in the connection's log lines
    for header, addr in (
        (proxy_v1("198.51.100.9", 40003, port), "198.51.100.9:40003"),
        (proxy_v2("198.51.100.10", 40004, port), "198.51.100.10:40004"),
    ):
        s = connect_from(port, "127.0.0.1")
        assert answer(s, header + b"\xff\xff\xff\xff") == b""
        s.close()
        wait_until(lambda: addr in w.log(), timeout=5, msg=f"{addr} not in the log")

    # and the address the IP lists check: denied by [access] though the balancer is allowed
    for header in (proxy_v1("203.0.113.9", 40005, port), proxy_v2("203.0.113.10", 40006, port)):
        s = connect_from(port, "127.0.0.1")
        assert answer(s, header + connect_packet("denied")) == b""
        s.close()
    wait_until(
        lambda: any("203.0.113.9:40005" in l and "ip_denied" in l for l in w.log().splitlines()),
        timeout=5,
    )

    # a connection without a header is closed
    s = connect_from(port, "127.0.0.1")
    assert answer(s, connect_packet("no-header")) == b""
    s.close()
    # a malformed v1 header too
    s = connect_from(port, "127.0.0.1")
    assert answer(s, b"PROXY TCP4 1.2.3.4 nonsense\r\n" + connect_packet("bad")) == b""
    s.close()
    wait_until(lambda: "proxy_header" in w.log(), timeout=5)
    assert w.running()

"""Authentication on every protocol (issue 11 item 6), against the release binary.

`warren passwd` manages a password file of argon2 hashes; MQTT CONNECT is checked against it
(exact CONNACK bytes 20 02 00 00 / 04 / 05 with raw sockets, paho-mqtt and mosquitto_pub), as
well as against JWTs built here by hand (HS256 with Python's hmac) and an HTTP auth service run
in a thread, over plain HTTP and over HTTPS with a private CA (`ca_file`). Client-id takeover is refused to another user; binding a uid a live session holds
follows `[auth] uid_conflict`; calls before login are refused; JSON-WS logins and a line
listener's first line go through the same checks.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import os
import signal
import socket
import ssl
import stat
import subprocess
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import paho.mqtt.client as paho
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from chat import ChatClient
from conftest import Warren, wait_until, warren_bin
from rawmqtt import PINGREQ, RawClient, parse_publish, publish_packet, subscribe_packet
from test_jsonws import Closed, JsonWs
from test_tls import certs  # noqa: F401 (the CA and certificates fixture)

OK = b"\x20\x02\x00\x00"
BAD_CREDENTIALS = b"\x20\x02\x00\x04"
NOT_AUTHORIZED = b"\x20\x02\x00\x05"
SECRET = "jwt-test-secret"


def passwd(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(warren_bin()), "passwd", *args],
        input=stdin,
        capture_output=True,
        text=True,
        timeout=30,
    )


def write_config(tmp: Path, auth: str, modules: tuple[str, ...] = ("Login", "Chat", "Echo")) -> Path:
    """A config with these modules and this `[auth]` table body (listeners come from --listen)."""
    text = "".join(f'[[module]]\ntype = "{m}"\n\n' for m in modules)
    text += "[auth]\n" + auth + "\n"
    path = tmp / "warren.toml"
    path.write_text(text)
    return path


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def jwt_hs256(claims: dict, secret: str = SECRET) -> str:
    """A compact HS256 JWT, built by hand."""
    head = b64url(json.dumps({"alg": "HS256", "typ": "JWT"}).encode())
    body = b64url(json.dumps(claims).encode())
    sig = hmac.new(secret.encode(), f"{head}.{body}".encode(), hashlib.sha256).digest()
    return f"{head}.{body}.{b64url(sig)}"


def raw_connack(port: int, client_id: str = "c1", **kw) -> tuple[bytes, RawClient]:
    c = RawClient(port)
    return c.connect(client_id, **kw), c


def paho_connect(port: int, user: str | None, password: str | None) -> int:
    """Connect with paho-mqtt; the MQTT 3.1.1 CONNACK return code."""
    got: list[int] = []
    done = threading.Event()
    c = paho.Client(callback_api_version=CallbackAPIVersion.VERSION2, client_id="paho-" + os.urandom(4).hex(),
                    protocol=paho.MQTTv311, reconnect_on_failure=False)
    if user is not None:
        c.username_pw_set(user, password)

    def on_connect(client, userdata, flags, rc, props):
        v = int(rc.value) if hasattr(rc, "value") else int(rc)
        got.append({0x86: 4, 0x87: 5, 0x88: 3}.get(v, v))
        done.set()

    c.on_connect = on_connect
    c.connect("127.0.0.1", port, keepalive=30)
    c.loop_start()
    try:
        assert done.wait(5), "no CONNACK"
        return got[0]
    finally:
        c.disconnect()
        c.loop_stop()


@pytest.fixture
def password_file(tmp_path: Path) -> Path:
    f = tmp_path / "passwd"
    assert passwd("-b", str(f), "alice", "wonderland").returncode == 0
    assert passwd("-b", str(f), "bob", "builder").returncode == 0
    return f


# ---------------------------------------------------------------------------------------------
# warren passwd
# ---------------------------------------------------------------------------------------------


def test_passwd_batch_stdin_delete_and_mode(tmp_path: Path):
    f = tmp_path / "passwd"
    r = passwd("-b", str(f), "alice", "one")
    assert r.returncode == 0, r.stderr
    assert stat.S_IMODE(f.stat().st_mode) == 0o600
    # not a terminal: one line from standard input
    r = passwd(str(f), "bob", stdin="two\n")
    assert r.returncode == 0, r.stderr
    lines = f.read_text().splitlines()
    assert [l.split(":", 1)[0] for l in lines] == ["alice", "bob"]
    assert all(l.split(":", 1)[1].startswith("$argon2id$") for l in lines)
    # replacing keeps one line per user
    assert passwd("-b", str(f), "alice", "three").returncode == 0
    assert [l.split(":", 1)[0] for l in f.read_text().splitlines()] == ["alice", "bob"]
    # -D deletes; deleting an absent user fails
    assert passwd("-D", str(f), "alice").returncode == 0
    assert [l.split(":", 1)[0] for l in f.read_text().splitlines()] == ["bob"]
    assert passwd("-D", str(f), "alice").returncode != 0
    # bad input is refused with a message
    r = passwd("-b", str(f), "a:b", "x")
    assert r.returncode != 0 and "user name" in r.stderr
    assert passwd(str(f), "carol", stdin="\n").returncode != 0


def test_check_config_refuses_a_bad_password_file(tmp_path: Path):
    bad = tmp_path / "passwd"
    bad.write_text("alice:plaintext\n")
    cfg = write_config(tmp_path, f'password_file = "{bad}"')
    w = Warren("--config", str(cfg), listen=["mqtt"], http=False)
    assert w.proc.wait(timeout=20) != 0
    assert "PHC" in w.log() + w.stdout()


# ---------------------------------------------------------------------------------------------
# MQTT with a password file
# ---------------------------------------------------------------------------------------------


def test_mqtt_password_file(tmp_path: Path, password_file: Path):
    cfg = write_config(tmp_path, f'password_file = "{password_file}"')
    w = Warren("--config", str(cfg), listen=["mqtt", "mqtt+mqant"], http=False).wait_ready()
    plain, mqant = w.ports["mqtt"], w.ports["mqtt+mqant"]

    connack, c = raw_connack(plain, username="alice", password="wonderland")
    assert connack == OK
    c.send(PINGREQ)
    c.expect(b"\xd0\x00")
    c.close()
    for kw, want in [
        ({"username": "alice", "password": "nope"}, BAD_CREDENTIALS),
        ({"username": "mallory", "password": "wonderland"}, BAD_CREDENTIALS),
        ({"username": "alice"}, BAD_CREDENTIALS),
        ({}, NOT_AUTHORIZED),  # anonymous is refused once a method is configured
    ]:
        connack, c = raw_connack(plain, **kw)
        assert connack == want, kw
        assert c.closed(), kw
    # paho-mqtt and mosquitto_pub see the same codes
    assert paho_connect(plain, "bob", "builder") == 0
    assert paho_connect(plain, "bob", "wrong") == 4
    assert paho_connect(plain, None, None) == 5
    ok = subprocess.run(["mosquitto_pub", "-h", "127.0.0.1", "-p", str(plain), "-u", "alice", "-P", "wonderland",
                         "-t", "x/y", "-m", "hi"], capture_output=True, timeout=10)
    assert ok.returncode == 0, ok.stderr
    bad = subprocess.run(["mosquitto_pub", "-h", "127.0.0.1", "-p", str(plain), "-u", "alice", "-P", "guess",
                          "-t", "x/y", "-m", "hi"], capture_output=True, text=True, timeout=10)
    assert bad.returncode != 0
    assert "not authorised" in (bad.stderr + bad.stdout).lower() or "password" in (bad.stderr + bad.stdout).lower()

    # an authenticated session is bound to its user: module calls work without the demo Login
    chat = ChatClient(mqant, username="alice", password="wonderland")
    assert chat.request("Chat/HD_JoinChat", {"roomName": "authroom"}) == {"Error": "", "Result": {"users": ["alice"]}}
    chat.close()
    # the refusals were logged, rate-limited, with their kind
    assert "auth_bad_credentials" in w.log()
    w.kill()


# ---------------------------------------------------------------------------------------------
# JWT
# ---------------------------------------------------------------------------------------------


def test_mqtt_jwt_hs256(tmp_path: Path):
    cfg = write_config(tmp_path, f'[auth.jwt]\nalgorithm = "HS256"\nsecret = "{SECRET}"\nleeway_s = 0')
    w = Warren("--config", str(cfg), listen=["mqtt+mqant"], http=False).wait_ready()
    port = w.ports["mqtt+mqant"]
    now = int(time.time())
    good = jwt_hs256({"sub": "zoe", "exp": now + 300, "rooms": ["lobby"]})
    connack, c = raw_connack(port, username="any", password=good)
    assert connack == OK
    c.close()
    for token in [
        jwt_hs256({"sub": "zoe", "exp": now - 60}),  # expired
        jwt_hs256({"sub": "zoe", "exp": now + 300}, secret="forged"),  # wrong key
        jwt_hs256({"sub": "zoe", "exp": now + 600, "nbf": now + 300}),  # not yet valid
        "not-a-token",  # nobody recognises it
    ]:
        connack, c = raw_connack(port, username="any", password=token)
        assert connack == BAD_CREDENTIALS, token
        assert c.closed()
    # uid = sub
    chat = ChatClient(port, username="", password=good)
    assert chat.request("Chat/HD_JoinChat", {"roomName": "jwtroom"}) == {"Error": "", "Result": {"users": ["zoe"]}}
    chat.close()
    w.kill()


def test_jwt_topics_claim_limits_default_mode_mqtt(tmp_path: Path):
    """A token with `"topics": ["rooms/lobby/#"]` may subscribe and publish there only (read and
    write): SUBACK 0x80 elsewhere, publishes elsewhere acknowledged and dropped. A token without
    the claim is not limited."""
    cfg = write_config(tmp_path, f'[auth.jwt]\nalgorithm = "HS256"\nsecret = "{SECRET}"')
    w = Warren("--config", str(cfg), listen=["mqtt"], http=False).wait_ready()
    port = w.ports["mqtt"]
    exp = int(time.time()) + 300
    limited = jwt_hs256({"sub": "tess", "exp": exp, "topics": ["rooms/lobby/#"]})
    free = jwt_hs256({"sub": "watcher", "exp": exp})

    connack, watcher = raw_connack(port, "watch-1", username="watcher", password=free)
    assert connack == OK
    watcher.send(subscribe_packet(1, [("#", 0)]))
    watcher.expect(b"\x90\x03\x00\x01\x00")

    connack, tess = raw_connack(port, "tess-1", username="tess", password=limited)
    assert connack == OK
    tess.send(subscribe_packet(1, [("rooms/other/#", 0), ("rooms/lobby/#", 1), ("#", 0), ("rooms/#", 0)]))
    tess.expect(b"\x90\x06\x00\x01\x80\x01\x80\x80")
    # mosquitto_sub sees the refusal too (it reports the denied subscription and exits)
    sub = subprocess.run(["mosquitto_sub", "-h", "127.0.0.1", "-p", str(port), "-i", "tess-2", "-u", "tess",
                          "-P", limited, "-t", "rooms/other/#", "-C", "1", "-W", "3"],
                         capture_output=True, text=True, timeout=15)
    assert "all subscription requests were denied" in (sub.stderr + sub.stdout).lower(), sub.stderr + sub.stdout

    # a publish outside the claim is acknowledged and dropped; inside it is delivered
    tess.send(publish_packet("rooms/other/x", b"nope", qos=1, pkid=2))
    tess.expect(b"\x40\x02\x00\x02")
    tess.send(publish_packet("rooms/lobby/x", b"yes", qos=1, pkid=3))
    tess.expect(b"\x40\x02\x00\x03")
    got = parse_publish(*tess.recv_packet())
    assert (got[0], got[3]) == ("rooms/lobby/x", b"yes")
    # one connection's publishes are routed in order: the dropped one would have come first
    got = parse_publish(*watcher.recv_packet())
    assert (got[0], got[3]) == ("rooms/lobby/x", b"yes")
    assert watcher.quiet()
    # the watcher's token names no topics: it may publish anywhere
    watcher.send(publish_packet("rooms/other/y", b"free", qos=0))
    got = parse_publish(*watcher.recv_packet())
    assert (got[0], got[3]) == ("rooms/other/y", b"free")
    assert tess.quiet()
    log = w.log()
    assert 'kind="token_topics"' in log or "kind=token_topics" in log, log[-2000:]
    assert "rooms/other/x" in log
    tess.close()
    watcher.close()
    w.kill()


# ---------------------------------------------------------------------------------------------
# HTTP callback
# ---------------------------------------------------------------------------------------------


class AuthService(BaseHTTPRequestHandler):
    seen: list[dict] = []

    def do_POST(self):  # noqa: N802 (http.server's naming)
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        AuthService.seen.append(body)
        if body["username"] == "ann" and body["password"] == "letmein":
            answer = {"result": "allow", "uid": "user-42"}
        elif body["username"] == "slow":
            time.sleep(3)
            answer = {"result": "allow"}
        else:
            answer = {"result": "deny"}
        out = json.dumps(answer).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(out)))
        self.end_headers()
        self.wfile.write(out)

    def log_message(self, *args):
        pass


def test_mqtt_http_callback(tmp_path: Path):
    server = ThreadingHTTPServer(("127.0.0.1", 0), AuthService)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    AuthService.seen.clear()
    url = f"http://127.0.0.1:{server.server_address[1]}/auth"
    cfg = write_config(tmp_path, f'[auth.http]\nurl = "{url}"\ntimeout_ms = 1000\ncache_s = 60')
    w = Warren("--config", str(cfg), listen=["mqtt+mqant"], http=False).wait_ready()
    port = w.ports["mqtt+mqant"]
    try:
        connack, c = raw_connack(port, "dev1", username="ann", password="letmein")
        assert connack == OK
        c.close()
        assert AuthService.seen[0]["protocol"] == "mqtt"
        assert AuthService.seen[0]["clientid"] == "dev1"
        assert AuthService.seen[0]["peer"].startswith("127.0.0.1:")
        connack, c = raw_connack(port, "dev1", username="ann", password="wrong")
        assert connack == BAD_CREDENTIALS
        # no answer within timeout_ms: refused (server unavailable, CONNACK 3)
        connack, c = raw_connack(port, "dev2", username="slow", password="x")
        assert connack == b"\x20\x02\x00\x03"
        # the service's uid is the session's
        chat = ChatClient(port, username="ann", password="letmein")
        assert chat.request("Chat/HD_JoinChat", {"roomName": "httproom"}) == {
            "Error": "", "Result": {"users": ["user-42"]}}
        chat.close()
    finally:
        server.shutdown()
        w.kill()


def test_mqtt_https_callback_with_a_private_ca(tmp_path: Path, certs: Path):
    """`[auth.http] url = "https://…"` with `ca_file`: the service's certificate is checked
    against that CA only; one the CA did not sign refuses every client as unavailable."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), AuthService)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(certs / "server.pem", certs / "server.key")
    server.socket = ctx.wrap_socket(server.socket, server_side=True)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    AuthService.seen.clear()
    url = f"https://127.0.0.1:{server.server_address[1]}/auth"
    cfg = write_config(tmp_path, f'[auth.http]\nurl = "{url}"\ntimeout_ms = 2000\ncache_s = 0\n'
                                 f'ca_file = "{certs / "ca.pem"}"')
    w = Warren("--config", str(cfg), listen=["mqtt"], http=False).wait_ready()
    # a leaf certificate as the only root: the service's chain does not lead to it
    (tmp_path / "wrong").mkdir()
    wrong = write_config(tmp_path / "wrong", f'[auth.http]\nurl = "{url}"\ntimeout_ms = 2000\n'
                                             f'ca_file = "{certs / "client.pem"}"')
    w2 = Warren("--config", str(wrong), listen=["mqtt"], http=False).wait_ready()
    try:
        connack, c = raw_connack(w.ports["mqtt"], "dev1", username="ann", password="letmein")
        assert connack == OK
        c.close()
        assert AuthService.seen[0]["username"] == "ann"
        assert AuthService.seen[0]["clientid"] == "dev1"
        connack, c = raw_connack(w.ports["mqtt"], "dev1", username="ann", password="wrong")
        assert connack == BAD_CREDENTIALS
        assert c.closed()
        assert paho_connect(w.ports["mqtt"], "ann", "letmein") == 0
        seen = len(AuthService.seen)
        connack, c = raw_connack(w2.ports["mqtt"], "dev1", username="ann", password="letmein")
        assert connack == b"\x20\x02\x00\x03"
        assert c.closed()
        assert len(AuthService.seen) == seen  # nothing was sent to a service it cannot trust
        assert "auth service unreachable" in w2.log()
    finally:
        server.shutdown()
        w.kill()
        w2.kill()


def test_ca_file_that_is_not_pem_stops_the_node(tmp_path: Path):
    junk = tmp_path / "junk.pem"
    junk.write_text("not a certificate\n")
    cfg = write_config(tmp_path, f'[auth.http]\nurl = "https://127.0.0.1:9/auth"\nca_file = "{junk}"')
    w = Warren("--config", str(cfg), listen=["mqtt"], http=False)
    assert w.proc.wait(timeout=20) != 0
    out = w.log() + w.stdout()
    assert "ca_file" in out and "no PEM certificate" in out, out


# ---------------------------------------------------------------------------------------------
# client-id takeover and uid conflicts
# ---------------------------------------------------------------------------------------------


def test_takeover_only_by_the_same_user(tmp_path: Path, password_file: Path):
    cfg = write_config(tmp_path, f'password_file = "{password_file}"')
    w = Warren("--config", str(cfg), listen=["mqtt"], http=False).wait_ready()
    port = w.ports["mqtt"]
    connack, alice = raw_connack(port, "shared-id", username="alice", password="wonderland")
    assert connack == OK
    # another user's CONNECT with that client id: CONNACK 5, alice untouched
    connack, bob = raw_connack(port, "shared-id", username="bob", password="builder")
    assert connack == NOT_AUTHORIZED
    assert bob.closed()
    alice.send(PINGREQ)
    alice.expect(b"\xd0\x00")
    # nor can an anonymous CONNECT (anonymous clients are refused here anyway)
    connack, anon = raw_connack(port, "shared-id")
    assert connack == NOT_AUTHORIZED
    # the same user takes it over: the older connection is closed
    connack, again = raw_connack(port, "shared-id", username="alice", password="wonderland")
    assert connack == OK
    assert alice.closed()
    again.send(PINGREQ)
    again.expect(b"\xd0\x00")
    again.close()
    w.kill()


def login(c: ChatClient, user: str) -> dict:
    return c.request("Login/HD_Login", {"userName": user, "passWord": "x"})


def test_uid_conflict_reject_is_the_default():
    w = Warren(listen=["mqtt+mqant"], http=False).wait_ready()
    port = w.ports["mqtt+mqant"]
    first = ChatClient(port)
    assert login(first, "alice") == {"Error": "", "Result": "login success alice"}
    second = ChatClient(port)
    assert login(second, "alice") == {"Error": "user alice is already logged in", "Result": None}
    # the first keeps alice; the second is still not logged in
    assert first.request("Chat/HD_JoinChat", {"roomName": "r"})["Error"] == ""
    assert second.request("Chat/HD_JoinChat", {"roomName": "r"}) == {"Error": "Not Logined", "Result": None}
    # once the first leaves, the name is free
    first.close()
    wait_until(lambda: login(second, "alice")["Error"] == "", timeout=5)
    second.close()
    w.kill()


def test_uid_conflict_kick_old(tmp_path: Path):
    cfg = write_config(tmp_path, 'uid_conflict = "kick_old"')
    w = Warren("--config", str(cfg), listen=["mqtt+mqant"], http=False).wait_ready()
    port = w.ports["mqtt+mqant"]
    first = ChatClient(port)
    assert login(first, "alice")["Error"] == ""
    second = ChatClient(port)
    assert login(second, "alice") == {"Error": "", "Result": "login success alice"}
    assert first.wait_disconnected(5)
    assert second.request("Chat/HD_JoinChat", {"roomName": "k"})["Result"] == {"users": ["alice"]}
    second.close()
    w.kill()


# ---------------------------------------------------------------------------------------------
# login before routes
# ---------------------------------------------------------------------------------------------


def test_calls_before_login_are_refused():
    w = Warren("--module", "Echo", listen=["mqtt+mqant", "mqtt"], http=False).wait_ready()
    for port in (w.ports["mqtt+mqant"], w.ports["mqtt"]):
        c = ChatClient(port)
        say = {"roomName": "x", "from": "x", "target": "*", "content": "hi"}
        assert c.request("Chat/HD_Say", say) == {"Error": "Not Logined", "Result": None}
        assert c.request("Chat/HD_JoinChat", {"roomName": ""}) == {"Error": "Not Logined", "Result": None}
        # RPC-only handlers stay unreachable
        assert "getRand" in c.request("Login/getRand", {})["Error"]
        # login handlers are callable before login: the demo's Login and Echo
        assert c.request("Echo/HD_Echo", {"a": 1}) == {"Error": "", "Result": {"a": 1}}
        assert login(c, "u" + str(port))["Error"] == ""
        assert c.request("Chat/HD_JoinChat", {"roomName": "after"})["Error"] == ""
        c.close()
    w.kill()


# ---------------------------------------------------------------------------------------------
# JSON over WebSocket
# ---------------------------------------------------------------------------------------------


def test_jsonws_login_checked_by_the_password_file(tmp_path: Path, password_file: Path):
    cfg = write_config(tmp_path, f'password_file = "{password_file}"', modules=("global", "Echo"))
    w = Warren("--config", str(cfg), listen=[Warren.url("json+ws")], http=False).wait_ready()
    (_, port), = w.listeners
    bad = JsonWs(port)
    assert bad.login("alice", "guess") == '{"tpc":"","func":"loginback","cb":"","args":[1]}'
    with pytest.raises(Closed) as closed:
        bad.recv_text()
    assert closed.value.code == 1008
    good = JsonWs(port)
    assert good.login("alice", "wonderland") == '{"tpc":"","func":"loginback","cb":"","args":[0]}'
    assert good.call("x", "phaserLogin", [], "p")["args"][0] == "alice"
    # the same user again, with her password: a second device, both stay
    twice = JsonWs(port)
    assert twice.login("alice", "wonderland") == '{"tpc":"","func":"loginback","cb":"","args":[0]}'
    assert good.call("x", "test", ["a", "b"], "t")["args"] == ["ab"]
    w.kill()


def test_verified_users_may_connect_twice_but_nobody_can_log_in_as_them(tmp_path: Path, password_file: Path):
    """uid_conflict protects a uid from a bind by name; proved credentials may share it."""
    cfg = write_config(tmp_path, f'password_file = "{password_file}"\nanonymous = true')
    w = Warren("--config", str(cfg), listen=["mqtt+mqant"], http=False).wait_ready()
    port = w.ports["mqtt+mqant"]
    phone = ChatClient(port, username="alice", password="wonderland")
    laptop = ChatClient(port, username="alice", password="wonderland")
    assert phone.request("Chat/HD_JoinChat", {"roomName": "dev"})["Error"] == ""
    assert laptop.request("Chat/HD_JoinChat", {"roomName": "dev"})["Error"] == ""
    # an anonymous client naming alice through the demo Login is refused
    intruder = ChatClient(port)
    assert login(intruder, "alice") == {"Error": "user alice is already logged in", "Result": None}
    for c in (phone, laptop, intruder):
        c.close()
    w.kill()


# ---------------------------------------------------------------------------------------------
# line: auth_first_line
# ---------------------------------------------------------------------------------------------


def line_frame(body: bytes) -> bytes:
    return str(len(body)).encode() + b"\r\n" + body


def read_line_frame(s: socket.socket) -> bytes:
    buf = b""
    while b"\r\n" not in buf:
        chunk = s.recv(1)
        if not chunk:
            raise ConnectionError("closed")
        buf += chunk
    n = int(buf.split(b"\r\n")[0].strip())
    body = b""
    while len(body) < n:
        chunk = s.recv(n - len(body))
        if not chunk:
            raise ConnectionError("closed")
        body += chunk
    return body


def test_line_first_line_auth(tmp_path: Path, password_file: Path):
    cfg = write_config(tmp_path, f'password_file = "{password_file}"', modules=("Echo",))
    w = Warren("--config", str(cfg), listen=[Warren.url("line", auth_first_line="true")], http=False).wait_ready()
    (_, port), = w.listeners
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        s.sendall(line_frame(b"alice wonderland"))
        assert read_line_frame(s) == b"auth ok"
        s.sendall(line_frame(b"hello"))
        assert read_line_frame(s) == b"hello"
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        s.sendall(line_frame(b"alice nope"))
        assert read_line_frame(s) == b"auth failed: bad user name or password"
        assert s.recv(1) == b""
    w.kill()


def test_sighup_reloads_the_password_file(tmp_path: Path, password_file: Path):
    cfg = write_config(tmp_path, f'password_file = "{password_file}"')
    w = Warren("--config", str(cfg), listen=["mqtt"], http=False).wait_ready()
    port = w.ports["mqtt"]
    connack, c = raw_connack(port, "new-1", username="carol", password="fresh")
    assert connack == BAD_CREDENTIALS
    # a user added (and one deleted) with warren passwd counts once the node is told
    assert passwd("-b", str(password_file), "carol", "fresh").returncode == 0
    assert passwd("-D", str(password_file), "bob").returncode == 0
    w.proc.send_signal(signal.SIGHUP)
    wait_until(lambda: raw_connack(port, "new-2", username="carol", password="fresh")[0] == OK, timeout=5)
    connack, c = raw_connack(port, "new-3", username="bob", password="builder")
    assert connack == BAD_CREDENTIALS
    # a password file that no longer loads keeps the old checks, and says so
    password_file.write_text("broken line\n")
    w.proc.send_signal(signal.SIGHUP)
    wait_until(lambda: "password_file" in w.log(), timeout=5)
    connack, c = raw_connack(port, "new-4", username="carol", password="fresh")
    assert connack == OK
    w.kill()


def test_listener_auth_false_skips_the_checks(tmp_path: Path, password_file: Path):
    cfg = write_config(tmp_path, f'password_file = "{password_file}"')
    w = Warren("--config", str(cfg), listen=["mqtt", Warren.url("mqtt", auth="false")], http=False).wait_ready()
    (_, checked), (_, open_port) = w.listeners
    connack, c = raw_connack(checked, "x1")
    assert connack == NOT_AUTHORIZED
    # auth = false: anyone, with any credentials, and nothing is bound (the demo's Login binds)
    connack, c = raw_connack(open_port, "x2", username="alice", password="whatever")
    assert connack == OK
    c.close()
    w.kill()

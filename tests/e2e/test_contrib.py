"""The deployment files in contrib/ (docs/operations.md, "Deploy"), against the real binary.

- `contrib/production.toml` passes `warren check-config` from the repository root, as
  docs/operations.md shows it (the block is run as written), and from its own directory: its
  relative paths (the ACL) are read from the file's directory, whatever the working directory
  (contrib/ mirrors /etc/warren). A copy without its ACL next to it is refused, naming the key.
- The same file, with only its host-specific values changed (addresses to free local ports, the
  bus to a private nats-server, the store to a temporary directory) and the files it names made
  (a certificate, a password file), runs from another working directory: TLS MQTT with a user
  from the password file, anonymous clients refused, the admin API and its dashboard behind the
  token, and a drain on SIGTERM that ends with exit code 0 well within the unit's stop timeout.
- `contrib/warren.service` is what the docs say (the command line, SIGTERM with a stop timeout
  longer than the config's drain, the file limit, SIGHUP on reload) and passes
  `systemd-analyze verify` when that tool is installed.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import signal
import ssl
import subprocess
import time
import tomllib
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from brokers import Broker, installed
from conftest import REPO_ROOT, free_port, port_open, wait_until, warren_bin
from docblocks import commands, find_block
from rawmqtt import connect_packet
from test_tls import recv_exact, tls_socket

CONTRIB = REPO_ROOT / "contrib"
CONFIG = CONTRIB / "production.toml"
UNIT = CONTRIB / "warren.service"
CONNACK_OK = b"\x20\x02\x00\x00"


def run(*args: str, cwd: Path = REPO_ROOT, timeout: float = 30) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(warren_bin()), *args], cwd=cwd, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=timeout
    )


def unit_settings() -> dict[str, list[str]]:
    """`Key=value` lines of the unit, each key with every value it is given, in order."""
    out: dict[str, list[str]] = {}
    for line in UNIT.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith(("#", ";", "[")):
            continue
        key, _, value = line.partition("=")
        out.setdefault(key.strip(), []).append(value.strip())
    return out


def seconds(value: str) -> float:
    m = re.fullmatch(r"(\d+)\s*(s|min)?", value)
    assert m, f"not a duration this test reads: {value!r}"
    return int(m.group(1)) * (60 if m.group(2) == "min" else 1)


# ---------------------------------------------------------------------------------------------
# check-config
# ---------------------------------------------------------------------------------------------


def test_production_config_passes_check_config_from_the_repository_root():
    # docs/operations.md's block, as written: `warren` is the binary under test
    (step,) = commands(find_block(REPO_ROOT / "docs" / "operations.md", "warren check-config contrib/").lines)
    argv = shlex.split(step.cmd)
    assert argv[0] == "warren", step.cmd
    res = run(*argv[1:], cwd=REPO_ROOT)
    assert res.returncode == 0, f"check-config failed:\n{res.stdout}{res.stderr}"
    assert [res.stdout.strip()] == step.expected


def test_production_config_passes_check_config_from_anywhere():
    res = run("check-config", "production.toml", cwd=CONTRIB)
    assert res.returncode == 0, f"check-config failed:\n{res.stdout}{res.stderr}"
    assert res.stdout.strip() == "ok: production.toml"
    res = run("check-config", str(CONFIG), cwd=REPO_ROOT / "tests")
    assert res.returncode == 0, f"check-config failed:\n{res.stdout}{res.stderr}"


def test_production_config_checks_its_acl_file(tmp_path: Path):
    # the ACL is read by check-config, next to the file: a copy without one is refused
    shutil.copy(CONFIG, tmp_path / "warren.toml")
    res = run("check-config", str(tmp_path / "warren.toml"), cwd=CONTRIB)
    assert res.returncode == 1, res.stdout + res.stderr
    assert "auth.acl_file" in res.stderr and str(tmp_path / "acl") in res.stderr, res.stderr


# ---------------------------------------------------------------------------------------------
# the unit
# ---------------------------------------------------------------------------------------------


def test_unit_runs_the_documented_command_and_stops_after_the_drain():
    s = unit_settings()
    assert s["ExecStart"] == ["/usr/local/bin/warren serve --config /etc/warren/warren.toml"]
    assert s["ExecStartPre"] == ["/usr/local/bin/warren check-config /etc/warren/warren.toml"]
    assert s["ExecReload"][-1] == "/bin/kill -HUP $MAINPID"
    assert s["User"] == ["warren"] and s["Group"] == ["warren"]
    assert s["WorkingDirectory"] == ["/etc/warren"]
    assert s["LimitNOFILE"] == ["1048576"]
    assert s["KillSignal"] == ["SIGTERM"]
    assert s["Restart"] == ["on-failure"]
    assert s["NoNewPrivileges"] == ["yes"] and s["ProtectSystem"] == ["strict"]
    store = tomllib.loads(CONFIG.read_text())["mqtt"]["store"]
    assert any(store.startswith(p.rstrip("/") + "/") for p in s["ReadWritePaths"]), "the store is writable"
    drain = tomllib.loads(CONFIG.read_text())["node"]["drain_timeout_s"]
    # the drain, then up to 2 s to close what is left, then the modules' stop: room to spare
    assert seconds(s["TimeoutStopSec"][0]) >= drain + 15, (s["TimeoutStopSec"], drain)


def test_unit_passes_systemd_analyze_verify(tmp_path: Path):
    tool = shutil.which("systemd-analyze")
    if tool is None:
        pytest.skip("systemd-analyze is not installed")
    # verify checks that the commands exist: point them at the binary under test
    unit = tmp_path / "warren.service"
    unit.write_text(UNIT.read_text().replace("/usr/local/bin/warren", str(warren_bin())))
    res = subprocess.run([tool, "verify", str(unit)], capture_output=True, text=True, timeout=60)
    complaints = [l for l in (res.stdout + res.stderr).splitlines() if "warren.service" in l]
    assert res.returncode == 0 and not complaints, res.stdout + res.stderr


# ---------------------------------------------------------------------------------------------
# the config runs
# ---------------------------------------------------------------------------------------------


def openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


def localise(text: str, ports: dict[str, int], bus: str, store: Path) -> str:
    """production.toml with its host-specific values replaced, each replacement checked."""
    swaps = [
        ('addr = "0.0.0.0:8883"', f'addr = "127.0.0.1:{ports["mqtts"]}"'),
        ('addr = "0.0.0.0:8884"', f'addr = "127.0.0.1:{ports["wss"]}"'),
        ('addr = "0.0.0.0:3443"', f'addr = "127.0.0.1:{ports["pomelo"]}"'),
        ('addr = "10.0.0.11:9090"', f'addr = "127.0.0.1:{ports["admin"]}"'),
        ('url = "nats://nats.internal:4222"', f'url = "{bus}"'),
        ('store = "/var/lib/warren/mqtt.redb"', f'store = "{store}"'),
    ]
    for old, new in swaps:
        assert text.count(old) == 1, f"production.toml no longer has {old!r} once"
        text = text.replace(old, new)
    return text


def tls_connect(port: int, ca: Path) -> ssl.SSLSocket:
    return tls_socket(port, ssl.create_default_context(cafile=str(ca)))


def admin_get(port: int, path: str, token: str | None) -> tuple[int, bytes]:
    req = urllib.request.Request(f"http://127.0.0.1:{port}{path}")
    if token:
        req.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(req, timeout=5) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


@pytest.mark.skipif(not installed("nats"), reason="nats-server is not installed")
def test_production_config_runs_and_drains(tmp_path: Path):
    etc = tmp_path / "etc-warren"
    (etc / "tls").mkdir(parents=True)
    shutil.copy(CONTRIB / "acl", etc / "acl")
    openssl("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
            "-keyout", "tls/privkey.pem", "-out", "tls/fullchain.pem", "-days", "2",
            "-subj", "/CN=localhost", "-addext", "subjectAltName=DNS:localhost", cwd=etc)
    made = run("passwd", "-b", "passwd", "alice", "alice-pw", cwd=etc)
    assert made.returncode == 0, made.stderr
    ports = {k: free_port() for k in ("mqtts", "wss", "pomelo", "admin")}
    broker = Broker("nats")
    try:
        text = localise(CONFIG.read_text(), ports, broker.url, tmp_path / "mqtt.redb")
        token = tomllib.loads(text)["admin"]["token"]
        (etc / "warren.toml").write_text(text)
        # the relative paths are the file's directory's, not the working directory's
        check = run("check-config", "etc-warren/warren.toml", cwd=tmp_path)
        assert check.returncode == 0, check.stderr
        log = open(tmp_path / "warren.log", "wb")
        proc = subprocess.Popen(
            [str(warren_bin()), "serve", "--config", "etc-warren/warren.toml"],
            cwd=tmp_path, stdin=subprocess.DEVNULL, stdout=log, stderr=log,
            env={**os.environ, "RUST_LOG": "info", "NO_COLOR": "1"},
        )
        try:
            wait_until(lambda: all(port_open(p) for p in ports.values()) or proc.poll() is not None, timeout=30,
                       msg="the listeners and the admin API did not open")
            assert proc.poll() is None, (tmp_path / "warren.log").read_text()

            # a user of the password file over TLS; anonymous clients refused
            with tls_connect(ports["mqtts"], etc / "tls/fullchain.pem") as s:
                s.sendall(connect_packet("alice-1", username="alice", password="alice-pw"))
                assert recv_exact(s, 4) == CONNACK_OK
            with tls_connect(ports["mqtts"], etc / "tls/fullchain.pem") as s:
                s.sendall(connect_packet("nobody"))
                assert recv_exact(s, 4) != CONNACK_OK

            # the admin API wants its token; the dashboard page does not
            assert admin_get(ports["admin"], "/admin/plugins", None)[0] == 401
            assert admin_get(ports["admin"], "/admin/plugins", token)[0] == 200
            status, page = admin_get(ports["admin"], "/", None)
            assert status == 200 and b"warren dashboard" in page

            # SIGTERM drains: a connected client sees its connection closed, and the node
            # exits 0 within the unit's stop timeout
            client = tls_connect(ports["mqtts"], etc / "tls/fullchain.pem")
            client.sendall(connect_packet("alice-2", username="alice", password="alice-pw"))
            assert recv_exact(client, 4) == CONNACK_OK
            started = time.monotonic()
            proc.send_signal(signal.SIGTERM)
            stop_timeout = seconds(unit_settings()["TimeoutStopSec"][0])
            client.settimeout(stop_timeout)
            try:
                # MQTT 3.1.1 has no server DISCONNECT: the drain closes the connection
                got = client.recv(1)
            except (ssl.SSLEOFError, ConnectionResetError):
                got = b""
            finally:
                client.close()
            assert got == b"", f"the drain should close the connection, got {got!r}"
            code = proc.wait(timeout=stop_timeout)
            assert code == 0, (tmp_path / "warren.log").read_text()
            assert time.monotonic() - started < stop_timeout
            assert "shutdown requested" in (tmp_path / "warren.log").read_text()
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait(timeout=10)
            log.close()
    finally:
        broker.close()

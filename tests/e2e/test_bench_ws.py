"""`warren bench` against warren over WebSocket: MQTT over `ws://` (request/reply through the
Echo module, and fan-out) and pomelo over WebSocket on a pomelo listener's own port, each a short
run that must finish with every request answered and every message delivered.

Also the hidden reference servers that `bench/compare` measures ceilings with: the WebSocket echo
answers the same requests, and the fan-out relay delivers every message to every subscriber.
"""

from __future__ import annotations

import json
import subprocess

import pytest

from conftest import REPO_ROOT, Warren, free_port, port_open, wait_until, warren_bin

SHORT = ["--duration", "1", "--warmup", "0.3", "--json", "--quiet", "--threads", "1"]


def bench(*args: str, timeout: float = 60) -> dict:
    """Runs `warren bench ARGS` and returns its JSON line (failing on a non-zero exit)."""
    p = subprocess.run(
        [str(warren_bin()), "bench", *args, *SHORT],
        cwd=REPO_ROOT,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert p.returncode == 0, f"warren bench {' '.join(args)} failed:\n{p.stdout}\n{p.stderr}"
    return json.loads(p.stdout.strip().splitlines()[-1])


def clean(report: dict) -> None:
    assert report["errors"] == 0, report.get("first_error")
    assert report["lost"] == 0, report


@pytest.fixture
def warren_ws():
    w = Warren(
        "--module", "Echo",
        listen=["ws://127.0.0.1:{port}", "pomelo://127.0.0.1:{port}?heartbeat_s=0"],
        http=False,
    ).wait_ready()
    yield w
    w.kill()


def test_mqtt_requests_over_websocket(warren_ws: Warren):
    port = warren_ws.ports["ws"]
    for frames in ([], ["--ws-batch"]):
        r = bench("request", "--target", f"ws://127.0.0.1:{port}/mqtt", "--clients", "4", "--inflight", "8", *frames)
        clean(r)
        assert r["requests_per_s"] > 0, r
        assert r["error_replies"] == 0, r


def test_pomelo_requests_over_websocket(warren_ws: Warren):
    port = warren_ws.ports["pomelo"]
    r = bench("pomelo-request", "--target", f"ws://127.0.0.1:{port}/", "--clients", "4", "--inflight", "8")
    clean(r)
    assert r["requests_per_s"] > 0, r
    assert r["params"]["ws_frames"] == "package"


def test_fanout_over_websocket(warren_ws: Warren):
    port = warren_ws.ports["ws"]
    r = bench("pubsub", "--target", f"ws://127.0.0.1:{port}", "--subscribers", "5")
    clean(r)
    assert r["published"] > 0
    assert r["delivered"] == 5 * r["published"], r


def test_requests_over_websocket_over_tls(tmp_path):
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
         "-nodes", "-days", "2", "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1",
         "-keyout", str(tmp_path / "key.pem"), "-out", str(tmp_path / "cert.pem")],
        check=True, capture_output=True,
    )
    listen = Warren.url("wss", tls_cert=tmp_path / "cert.pem", tls_key=tmp_path / "key.pem")
    with Warren("--module", "Echo", listen=[listen], http=False) as w:
        w.wait_ready()
        # the generator does not check the certificate without --ca
        r = bench("request", "--target", f"wss://127.0.0.1:{w.ports['wss']}/mqtt", "--clients", "2", "--inflight", "8")
        clean(r)
        assert r["requests_per_s"] > 0, r


def test_a_plain_mqtt_listener_refuses_the_upgrade():
    with Warren(listen=["mqtt://127.0.0.1:{port}"], http=False) as w:
        w.wait_ready()
        p = subprocess.run(
            [str(warren_bin()), "bench", "request", "--target", f"ws://127.0.0.1:{w.ports['mqtt']}", *SHORT],
            cwd=REPO_ROOT,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert p.returncode != 0
        assert "WebSocket upgrade failed" in p.stderr or "closed" in p.stderr, p.stderr


class Reference:
    """A hidden reference server of `warren bench` on a free port."""

    def __init__(self, kind: str) -> None:
        self.port = free_port()
        self.proc = subprocess.Popen(
            [str(warren_bin()), "bench", kind, "--listen", f"127.0.0.1:{self.port}"],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        wait_until(lambda: port_open(self.port), timeout=10, msg=f"{kind} did not start")

    def __enter__(self) -> Reference:
        return self

    def __exit__(self, *exc: object) -> None:
        self.proc.kill()
        self.proc.wait(timeout=10)


def test_the_websocket_echo_answers_mqtt_and_pomelo_requests():
    with Reference("ws-echo-server") as ref:
        r = bench("request", "--target", f"ws://127.0.0.1:{ref.port}/mqtt", "--clients", "4", "--inflight", "8")
        clean(r)
        assert r["requests_per_s"] > 0
        r = bench("pomelo-request", "--target", f"ws://127.0.0.1:{ref.port}/", "--clients", "4", "--inflight", "8")
        clean(r)
        assert r["requests_per_s"] > 0


def test_the_relay_delivers_every_message_to_every_subscriber():
    with Reference("relay-server") as ref:
        r = bench("pubsub", "--target", f"127.0.0.1:{ref.port}", "--publishers", "2", "--subscribers", "10")
        clean(r)
        assert r["published"] > 0
        assert r["delivered"] == 10 * r["published"], r

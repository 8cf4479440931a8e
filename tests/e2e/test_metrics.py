"""Prometheus metrics, /healthz and /readyz (docs/metrics.md) against the real binary.

A node runs the demo's `Debug` module behind an mqant-mode MQTT listener and a default-mode MQTT
listener. A known workload goes through real clients (raw MQTT requests on a route, paho-mqtt
publishes to a subscriber); then `/metrics` is scraped and parsed here, and the counts must match
the workload exactly: requests by route and result, the latency histogram's count, messages in
and out by listener, open connections. `/readyz` turns to 503 "draining" after SIGTERM while a
request keeps the drain going; with `--no-http` the admin listener still serves all three.
The queue gauges see a subscriber that stops reading while a publisher floods it, and `/readyz`
names a Redis bus and registry that went away until Redis is back.
"""

from __future__ import annotations

import json
import re
import signal
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import paho.mqtt.client as paho
import pytest

from brokers import Broker, installed
from conftest import Warren, free_port, wait_until
from rawmqtt import RawClient, parse_publish, publish_packet
from test_abuse_queue import Publisher, subscriber

# ---- a tiny parser of the Prometheus text format -------------------------------------------

SAMPLE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})?\s+(\S+)$")
LABEL = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"')


def parse(text: str) -> dict[str, list[tuple[dict[str, str], float]]]:
    """Samples by metric name: (labels, value) for every sample line; comments skipped."""
    out: dict[str, list[tuple[dict[str, str], float]]] = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        m = SAMPLE.match(line)
        assert m, f"not a sample line: {line!r}"
        name, labels, value = m.groups()
        out.setdefault(name, []).append((dict(LABEL.findall(labels or "")), float(value)))
    return out


def value(samples, name: str, **labels: str) -> float:
    """The one sample of `name` with these labels (others may have more labels); 0 if none."""
    found = [v for ls, v in samples.get(name, []) if all(ls.get(k) == w for k, w in labels.items())]
    assert len(found) <= 1, f"{name}{labels}: {len(found)} samples"
    return found[0] if found else 0.0


def test_parser_reads_labels_and_values():
    text = '# HELP x y\n# TYPE a counter\na_total{route="M/H",result="ok"} 3\nb 1.5\nc{q="a\\"b"} +Inf\n'
    s = parse(text)
    assert value(s, "a_total", route="M/H") == 3
    assert value(s, "b") == 1.5
    assert s["c"][0][0] == {"q": 'a\\"b'}


# ---- the node -------------------------------------------------------------------------------


def get(port: int, path: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


def start(
    tmp_path: Path, *extra: str, http: bool = True, metrics: str = "", plain: str = ""
) -> tuple[Warren, dict[str, int]]:
    """A node with the two MQTT listeners; `plain` adds keys to the default-mode one."""
    ports = {"mqant": free_port(), "mqtt": free_port(), "admin": free_port()}
    config = tmp_path / "warren.toml"
    config.write_text(
        "[[listener]]\n"
        'protocol = "mqtt"\n'
        'mode = "mqant"\n'
        f'addr = "127.0.0.1:{ports["mqant"]}"\n\n'
        "[[listener]]\n"
        'protocol = "mqtt"\n'
        'mode = "default"\n'
        f'addr = "127.0.0.1:{ports["mqtt"]}"\n{plain}\n\n'
        "[[module]]\n"
        'type = "Debug"\n\n'
        "[admin]\n"
        f'addr = "127.0.0.1:{ports["admin"]}"\n\n'
        f"[metrics]\n{metrics}\n"
    )
    w = Warren("--config", str(config), *extra, http=http)
    w.listeners += [("mqtt+mqant", ports["mqant"]), ("mqtt", ports["mqtt"]), ("http", ports["admin"])]
    return w.wait_ready(), ports


def request(c: RawClient, topic: str, body: bytes = b"{}") -> dict:
    """One mqant request (QoS 0): its reply, a PUBLISH on the same topic."""
    c.send(publish_packet(topic, body))
    while True:
        first, rest = c.recv_packet(timeout=10)
        if first >> 4 == 3:
            got, _q, _id, payload = parse_publish(first, rest)
            assert got == topic
            return json.loads(payload)


REQUESTS = 7
UNKNOWN = 2
PUBLISHES = 20


def test_counts_match_a_known_workload(tmp_path):
    w, ports = start(tmp_path)
    with w:
        status, body = get(w.http, "/healthz")
        assert (status, json.loads(body)) == (200, {"status": "ok"})
        wait_until(lambda: get(w.http, "/readyz")[0] == 200, timeout=10, msg="never ready")
        assert json.loads(get(w.http, "/readyz")[1]) == {"ready": True, "reasons": []}

        # requests on a registered route, and on a handler the module does not have
        c = RawClient(ports["mqant"], timeout=10)
        assert c.connect("metrics-req") == b"\x20\x02\x00\x00"
        for n in range(REQUESTS):
            reply = request(c, f"Debug/HD_Echo/{n}", json.dumps({"n": n}).encode())
            assert reply["Error"] == "", reply
        for n in range(UNKNOWN):
            reply = request(c, f"Debug/HD_NoSuchHandler/{n}")
            assert reply["Error"], reply

        # default-mode MQTT: a subscriber (QoS 0) and a publisher (paho, QoS 1)
        got: list[bytes] = []
        all_in = threading.Event()

        def on_message(_c, _u, msg):
            got.append(msg.payload)
            if len(got) == PUBLISHES:
                all_in.set()

        sub = paho.Client(paho.CallbackAPIVersion.VERSION2, client_id="metrics-sub")
        sub.on_message = on_message
        subscribed = threading.Event()
        sub.on_subscribe = lambda *_a: subscribed.set()
        sub.connect("127.0.0.1", ports["mqtt"])
        sub.loop_start()
        sub.subscribe("metrics/t", qos=0)
        assert subscribed.wait(10)
        pub = paho.Client(paho.CallbackAPIVersion.VERSION2, client_id="metrics-pub")
        pub.connect("127.0.0.1", ports["mqtt"])
        pub.loop_start()
        for n in range(PUBLISHES):
            pub.publish("metrics/t", f"m{n}".encode(), qos=1).wait_for_publish(10)
        assert all_in.wait(10), f"{len(got)} of {PUBLISHES} delivered"

        s = parse(get(w.http, "/metrics")[1])
        # requests by route: exactly the workload, and the histogram counted each one
        assert value(s, "warren_requests_total", route="Debug/HD_Echo", result="ok") == REQUESTS
        assert value(s, "warren_requests_total", route="Debug/HD_Echo", result="error") == 0
        assert value(s, "warren_request_duration_seconds_count", route="Debug/HD_Echo") == REQUESTS
        assert value(s, "warren_request_duration_seconds_bucket", route="Debug/HD_Echo", le="+Inf") == REQUESTS
        # a handler the module does not have is not a client-visible route: the gate refuses it
        # (not a login handler, and the client has no uid) before any module counts it
        assert value(s, "warren_refusals_total", kind="login_required") == UNKNOWN
        assert value(s, "warren_requests_total", route="other", result="error") == 0
        # routes are only the registered handlers of the node's modules (Debug, the gate's own)
        routes = {ls["route"] for ls, _ in s["warren_requests_total"]}
        assert "Debug/HD_Echo" in routes
        assert all(r == "other" or r.split("/")[0] in ("Debug", "Gate") for r in routes), routes
        assert not any("NoSuchHandler" in r for r in routes)

        # the mqant listener: the requests in (CONNECT comes before the session: not counted),
        # the replies out
        mqant = {"protocol": "mqtt", "listener": f"127.0.0.1:{ports['mqant']}"}
        assert value(s, "warren_messages_received_total", **mqant) == REQUESTS + UNKNOWN
        assert value(s, "warren_messages_sent_total", **mqant) >= REQUESTS + UNKNOWN
        assert value(s, "warren_bytes_received_total", **mqant) > 0
        assert value(s, "warren_bytes_sent_total", **mqant) > 0
        # default mode: the SUBSCRIBE and the publishes in (the subscriber takes QoS 0: it sends
        # no PUBACK; keepalives are 60 s away); the SUBACK, the PUBACKs and the deliveries out
        plain = {"protocol": "mqtt", "listener": f"127.0.0.1:{ports['mqtt']}"}
        assert value(s, "warren_messages_received_total", **plain) == 1 + PUBLISHES
        assert value(s, "warren_messages_sent_total", **plain) >= PUBLISHES
        # every PUBLISH of both listeners (the requests are PUBLISH packets too)
        assert value(s, "warren_publishes_received_total") == REQUESTS + UNKNOWN + PUBLISHES
        # three clients are connected now
        assert value(s, "warren_connections_active", **mqant) == 1
        assert value(s, "warren_connections_active", **plain) == 2
        # the process figures
        assert value(s, "process_resident_memory_bytes") > 0
        assert value(s, "process_open_fds") > 0
        # nothing waits: every queue gauge is there, at 0
        assert value(s, "warren_outbound_queue_bytes") == 0
        assert value(s, "warren_outbound_queue_bytes_max") == 0
        assert "warren_module_queue_depth" in s and value(s, "warren_module_queue_depth", module="Debug") == 0

        # a client that leaves is no longer counted
        c.close()
        pub.loop_stop()
        pub.disconnect()

        def mqant_open() -> float:
            return value(parse(get(w.http, "/metrics")[1]), "warren_connections_active", **mqant)

        wait_until(lambda: mqant_open() == 0, timeout=10, msg="closed connection still counted")
        sub.loop_stop()
        sub.disconnect()

        # the admin listener serves the same, without its token
        status, text = get(ports["admin"], "/metrics")
        assert status == 200
        assert value(parse(text), "warren_requests_total", route="Debug/HD_Echo", result="ok") == REQUESTS


def test_readyz_says_draining_while_the_node_drains(tmp_path):
    w, ports = start(tmp_path)
    with w:
        wait_until(lambda: get(ports["admin"], "/readyz")[0] == 200, timeout=10, msg="never ready")
        # a request in flight keeps the drain going
        c = RawClient(ports["mqant"], timeout=20)
        assert c.connect("drainer") == b"\x20\x02\x00\x00"
        c.send(publish_packet("Debug/HD_Sleep/1", b'{"ms":3000}', qos=1, pkid=1))
        c.expect(bytes([0x40, 0x02, 0x00, 0x01]))
        w.proc.send_signal(signal.SIGTERM)

        def draining() -> bool:
            status, body = get(w.http, "/readyz")
            return status == 503 and "draining" in json.loads(body)["reasons"]

        wait_until(draining, timeout=5, interval=0.05, msg="/readyz not 503 draining after SIGTERM")
        status, body = get(ports["admin"], "/readyz")
        assert status == 503 and json.loads(body)["ready"] is False
        # /healthz: the process is still up
        assert get(w.http, "/healthz")[0] == 200
        c.close()
        assert w.proc.wait(15) == 0


def test_admin_listener_serves_them_without_the_page(tmp_path):
    w, ports = start(tmp_path, "--no-http", http=False)
    with w:
        wait_until(lambda: get(ports["admin"], "/readyz")[0] == 200, timeout=10, msg="never ready")
        assert get(ports["admin"], "/healthz")[0] == 200
        status, text = get(ports["admin"], "/metrics")
        assert status == 200
        assert "warren_connections_active" in text


def test_metrics_off_installs_no_recorder(tmp_path):
    w, ports = start(tmp_path, metrics="enabled = false")
    with w:
        status, _ = get(w.http, "/metrics")
        assert status == 404
        # health does not depend on metrics
        assert get(w.http, "/healthz")[0] == 200
        wait_until(lambda: get(w.http, "/readyz")[0] == 200, timeout=10, msg="never ready")


def queued(port: int) -> tuple[float, float]:
    """`warren_outbound_queue_bytes` and its `_max`, scraped now."""
    s = parse(get(port, "/metrics")[1])
    return value(s, "warren_outbound_queue_bytes"), value(s, "warren_outbound_queue_bytes_max")


FLOOD = 256
FLOOD_SIZE = 64 * 1024


def test_queue_gauges_show_a_client_that_stops_reading(tmp_path):
    # the queue holds the whole flood (16 MiB, far more than the sockets' buffers) without
    # closing the client: its bytes stay queued until it leaves
    w, ports = start(
        tmp_path, plain="write_queue = 100000\nwrite_queue_bytes = 268435456\nwrite_timeout_s = 3600"
    )
    with w:
        assert queued(w.http) == (0, 0)
        slow = subscriber(ports["mqtt"], "never-reads", filt="flood/#", rcvbuf=4096)
        pub = Publisher(ports["mqtt"], count=FLOOD, size=FLOOD_SIZE)
        pub.start()
        pub.join(60)
        assert not pub.is_alive() and pub.error is None, f"sent {pub.sent} of {FLOOD}: {pub.error!r}"
        total, biggest = wait_until(
            lambda: (q := queued(w.http))[0] > 0 and q, timeout=10, msg="nothing queued for a client that does not read"
        )
        # one session holds it all (nothing is sent to the publisher), at most the flood
        assert 0 < biggest == total <= FLOOD * (FLOOD_SIZE + 64), (total, biggest)
        s = parse(get(w.http, "/metrics")[1])
        plain = {"protocol": "mqtt", "listener": f"127.0.0.1:{ports['mqtt']}"}
        assert value(s, "warren_connections_active", **plain) == 2, "the slow subscriber was closed"
        slow.close()
        pub.c.close()
        wait_until(lambda: queued(w.http) == (0, 0), timeout=10, msg="a gone client's queue still counted")


def test_readyz_names_a_redis_bus_and_registry_that_went_away():
    if not installed("redis"):
        pytest.fail("redis-server is not installed (scripts/test installs it)")
    redis = Broker("redis")
    try:
        w = Warren("--bus", redis.url, "--registry", redis.url, "--node-id", "ready1", "--no-demo-modules", listen=["mqtt"])
        with w.wait_ready():

            def readyz() -> tuple[int, list[str]]:
                status, body = get(w.http, "/readyz")
                return status, json.loads(body)["reasons"]

            wait_until(lambda: readyz() == (200, []), timeout=10, msg="never ready")
            s = parse(get(w.http, "/metrics")[1])
            assert "warren_bus_calls_in_flight" in s
            assert value(s, "warren_bus_calls_in_flight", transport="redis") == 0

            redis.kill()
            gone = (503, ["bus disconnected", "registry disconnected"])
            wait_until(lambda: readyz() == gone, timeout=30, interval=0.1, msg=f"/readyz after redis died: {readyz()}")
            assert get(w.http, "/healthz")[0] == 200

            redis.start()  # the same port
            wait_until(lambda: readyz() == (200, []), timeout=30, interval=0.1, msg=f"/readyz after redis came back: {readyz()}")
            assert w.running()
    finally:
        redis.close()

"""Traces and JSON logs (docs/configuration.md, "Traces and logs"): a client request keeps one
W3C trace id from the gate through the bus to the module's node, and that id is on the log
lines of the request on both nodes; `[log] trace = false` leaves it out; a JSON-WS client's
own `traceparent` is kept; with the `otel` feature the spans reach an OTLP/HTTP collector.
"""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from brokers import Broker, installed
from chat import ChatClient
from conftest import Warren, wait_until

TRACE_FILTER = "info,warren::trace=debug"


def json_lines(w: Warren) -> list[dict]:
    """Every log line of `w`, each of which must be one JSON object."""
    lines = []
    for line in w.log().splitlines():
        if not line.strip():
            continue
        obj = json.loads(line)  # a line that is not JSON fails the test here
        assert {"timestamp", "level", "target", "fields"} <= obj.keys(), line
        lines.append(obj)
    return lines


def trace_ids(obj) -> set[str]:
    """The `trace_id` values anywhere in a log line: its own fields, its span and its spans."""
    found: set[str] = set()
    if isinstance(obj, dict):
        for k, v in obj.items():
            if k == "trace_id" and isinstance(v, str):
                found.add(v)
            else:
                found |= trace_ids(v)
    elif isinstance(obj, list):
        for v in obj:
            found |= trace_ids(v)
    return found


def message(obj: dict) -> str:
    return obj.get("fields", {}).get("message", "")


def login_trace(lines: list[dict]) -> str:
    """The trace id of the gate's one Login/HD_Login request."""
    ids = {
        t
        for line in lines
        if message(line) == "request" and line.get("span", {}).get("module") == "Login"
        for t in trace_ids(line)
    }
    assert len(ids) == 1, ids
    return ids.pop()


def write_config(w_dir: Path, text: str) -> Path:
    w_dir.mkdir(parents=True, exist_ok=True)
    path = w_dir / "warren.toml"
    path.write_text(text)
    return path


@pytest.fixture
def nats():
    if not installed("nats"):
        pytest.fail("nats-server is not installed (scripts/test installs it)")
    b = Broker("nats")
    yield b
    b.close()


def test_a_request_has_one_trace_id_on_the_gate_and_on_the_module_node(nats):
    flags = ["--bus", nats.url, "--registry", nats.url, "--log-format", "json"]
    env = {"RUST_LOG": TRACE_FILTER}
    gate = Warren(*flags, "--node-id", "gate", "--no-demo-modules", listen=["mqtt+mqant"], http=False, env=env)
    gate.wait_ready()
    node = Warren(*flags, "--node-id", "mods", command="node", env=env)
    wait_until(lambda: "ready" in node.stdout() or not node.running(), timeout=20, msg="module node not ready")
    assert node.running(), node.tail()
    wait_until(lambda: '"mods"' in gate.log(), timeout=15, msg=f"the gate never saw the module node\n{gate.tail()}")

    c = ChatClient(gate.mqtt_mqant, client_id="alice-c")
    assert c.login("alice") == {"Error": "", "Result": "login success alice"}
    c.close()

    gate_lines = json_lines(gate)
    trace = login_trace(gate_lines)
    assert len(trace) == 32 and int(trace, 16)
    # the reply came back under the gate's request span
    assert any(message(line) == "reply" and trace in trace_ids(line) for line in gate_lines), gate.tail()

    def node_lines() -> list[dict]:
        return [line for line in json_lines(node) if trace in trace_ids(line)]

    wait_until(lambda: len(node_lines()) >= 3, timeout=5, msg=f"the module node's lines of {trace}\n{node.tail()}")
    said = [message(line) for line in node_lines()]
    # received from the bus, the handler run in the call span, its reply sent: same trace id
    assert {"call received", "handler starts", "reply sent"} <= set(said), said
    received = next(line for line in node_lines() if message(line) == "call received")
    assert received["fields"]["from"] == "gate" and received["fields"]["handler"] == "HD_Login"


RELAY_LUA = """
-- answers a client by calling the Login module, which runs on another node
function HD_Relay(session, msg)
  return warren.call("Login", "HD_Login", msg)
end
"""


def test_a_handlers_own_call_carries_the_trace_to_a_third_node(nats, tmp_path):
    """gate -> Relay (a Lua module on node "mid") -> Login (node "mods"): one trace id on all
    three nodes, the call from mid to mods carrying it on."""
    relay = tmp_path / "relay.lua"
    relay.write_text(RELAY_LUA)
    flags = ["--bus", nats.url, "--registry", nats.url, "--log-format", "json"]
    env = {"RUST_LOG": TRACE_FILTER}
    gate = Warren(*flags, "--node-id", "gate", "--no-demo-modules", listen=["mqtt+mqant"], http=False, env=env)
    gate.wait_ready()
    # mods first: mid, started once the gate sees mods, finds it in the registry at start
    mods = Warren(*flags, "--node-id", "mods", command="node", env=env)
    mid = None
    for name in ("mods", "mid"):
        if name == "mid":
            mid = Warren(
                *flags, "--node-id", "mid", "--no-demo-modules", "--module", f"Relay={relay}?login_handlers=HD_Relay",
                command="node", env=env,
            )
        n = mid or mods
        wait_until(lambda: "ready" in n.stdout() or not n.running(), timeout=20, msg=f"node not ready\n{n.tail()}")
        assert n.running(), n.tail()
        wait_until(lambda: f'"{name}"' in gate.log(), timeout=15, msg=f"the gate never saw {name}\n{gate.tail()}")

    c = ChatClient(gate.mqtt_mqant, client_id="carol-c")
    assert c.request("Relay/HD_Relay", {"userName": "carol", "passWord": "123456"}) == {
        "Error": "",
        "Result": "login success carol",
    }
    c.close()

    ids = {
        t
        for line in json_lines(gate)
        if message(line) == "request" and line.get("span", {}).get("module") == "Relay"
        for t in trace_ids(line)
    }
    assert len(ids) == 1, ids
    trace = ids.pop()

    def said(n: Warren) -> list[tuple[str, dict]]:
        return [(message(line), line) for line in json_lines(n) if trace in trace_ids(line)]

    wait_until(lambda: len(said(mods)) >= 3, timeout=5, msg=f"mods' lines of {trace}\n{mods.tail()}")
    # mid ran Relay for the gate and made its call to mods in the same trace
    mid_said = said(mid)
    assert any(m == "call received" and line["fields"]["handler"] == "HD_Relay" for m, line in mid_said), mid.tail()
    received = [line for m, line in said(mods) if m == "call received"]
    assert received and received[0]["fields"]["from"] == "mid", mods.tail()
    assert received[0]["fields"]["handler"] == "HD_Login"
    assert {"handler starts", "reply sent"} <= {m for m, _ in said(mods)}


@pytest.mark.parametrize("trace", [True, False])
def test_log_section_sets_json_lines_and_trace_switch(tmp_path, trace):
    cfg = write_config(
        tmp_path,
        f'[log]\nformat = "json"\nfilter = "{TRACE_FILTER}"\ntrace = {str(trace).lower()}\n',
    )
    # RUST_LOG would override the file's filter: this test is about the file
    w = Warren("--config", str(cfg), "--module", "Login", listen=["mqtt+mqant"], http=False, env={"RUST_LOG": ""})
    w.wait_ready()
    c = ChatClient(w.mqtt_mqant)
    assert c.login("bob") == {"Error": "", "Result": "login success bob"}
    c.close()
    lines = json_lines(w)
    assert lines, w.tail()
    ids = set().union(*(trace_ids(line) for line in lines))
    if trace:
        trace_id = login_trace(lines)
        # the handler ran in this process, in a call span with the same trace id
        assert any(message(line) == "handler starts" and trace_id in trace_ids(line) for line in lines), w.tail()
    else:
        assert ids == set(), ids
        assert not any(message(line) == "request" for line in lines)


def test_a_bad_log_section_is_refused(tmp_path):
    cfg = write_config(tmp_path, '[log]\nformat = "xml"\n')
    w = Warren("--config", str(cfg), listen=["mqtt+mqant"], http=False)
    assert w.proc.wait(timeout=10) != 0
    assert "format" in w.log(), w.tail()


class _Collector(BaseHTTPRequestHandler):
    """An OTLP/HTTP collector that keeps the bodies POSTed to /v1/traces."""

    bodies: list[bytes] = []

    def do_POST(self) -> None:  # noqa: N802 - the http.server API
        n = int(self.headers.get("Content-Length", "0"))
        body = self.rfile.read(n)
        if self.path == "/v1/traces":
            type(self).bodies.append(body)
        self.send_response(200)
        self.send_header("Content-Type", "application/x-protobuf")
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args) -> None:
        pass


def test_spans_reach_an_otlp_collector_with_the_request_trace_id(tmp_path):
    _Collector.bodies = []
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Collector)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        port = server.server_address[1]
        cfg = write_config(
            tmp_path,
            f'[node]\nid = "otel-node"\n\n[log]\nformat = "json"\nfilter = "{TRACE_FILTER}"\n'
            f'otlp_endpoint = "http://127.0.0.1:{port}"\n',
        )
        w = Warren("--config", str(cfg), "--module", "Login", listen=["mqtt+mqant"], http=False, env={"RUST_LOG": ""})
        try:
            w.wait_ready()
        except RuntimeError:
            if "otel feature" in w.log():
                pytest.skip("this warren is built without the otel feature")
            raise
        c = ChatClient(w.mqtt_mqant)
        assert c.login("carol") == {"Error": "", "Result": "login success carol"}
        c.close()
        trace = login_trace(json_lines(w))
        # the exporter sends what it holds when the node stops
        assert w.terminate() == 0, w.tail()
        wait_until(lambda: _Collector.bodies, timeout=10, msg="no spans reached the collector")
        body = b"".join(_Collector.bodies)
        assert bytes.fromhex(trace) in body, "the request's trace id is not in the exported spans"
        assert b"otel-node" in body  # service.name
    finally:
        server.shutdown()


def test_a_json_ws_clients_traceparent_is_kept(tmp_path):
    websocket = pytest.importorskip("websocket")
    cfg = write_config(tmp_path, f'[log]\nformat = "json"\nfilter = "{TRACE_FILTER}"\n')
    w = Warren(
        "--config", str(cfg), "--module", "global", listen=["json+ws://127.0.0.1:{port}"], http=False, env={"RUST_LOG": ""}
    )
    w.wait_ready()
    ws = websocket.create_connection(f"ws://127.0.0.1:{w.ports['json+ws']}/", timeout=5)
    try:
        ws.send(json.dumps({"tpc": "login", "func": "login", "args": ["dan", "md5"], "cb": ""}))
        assert json.loads(ws.recv())["func"] == "loginback"
        given = "4bf92f3577b34da6a3ce929d0e0e4736"
        call = {"tpc": "unknown", "func": "test", "cb": "t1", "args": ["a", "b"]}
        ws.send(json.dumps({**call, "traceparent": f"00-{given}-00f067aa0ba902b7-01"}))
        assert json.loads(ws.recv()) == {"tpc": "", "func": "t1", "cb": "", "args": ["ab"]}
        # a value that is not a traceparent: the request gets an id of its own
        ws.send(json.dumps({**call, "cb": "t2", "traceparent": "nonsense"}))
        assert json.loads(ws.recv())["func"] == "t2"
    finally:
        ws.close()
    requests = [line for line in json_lines(w) if message(line) == "request"]
    assert len(requests) == 2, w.tail()
    assert trace_ids(requests[0]) == {given}
    assert trace_ids(requests[1]) != {given} and len(trace_ids(requests[1])) == 1

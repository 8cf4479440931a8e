"""warren next to mqant: a stock mqant `server.conf`, process groups (mqant's `ProcessID`),
module types only mqant peers serve, mqant's AMQP URIs, session operations on sessions an mqant
gate holds, and mqant's arity error — against the real binary, a RabbitMQ started on a free port
and pika peers written from mqant's wire format (mqant_peer.py). docs/cluster.md, "Compatibility
bridges", and docs/protocols/mqtt.md, "mqant's server.conf", say what is tested here.
"""

from __future__ import annotations

import json
import re
import subprocess
import uuid
from pathlib import Path

import pytest

from brokers import Broker, installed
from conftest import REPO_ROOT, Warren, free_port, port_open, wait_until, warren_bin
from mqant_peer import MqantGate, MqantServer, mqant_call
from rawmqtt import RawClient, connect_packet, parse_publish, publish_packet

STOCK = REPO_ROOT / "tests" / "e2e" / "data" / "mqantserver.conf"

# what warren answers a call whose Args are not [session, body]: mqant's text, word for word
HANDLER = "<func(map[string]interface {}, interface {}) (interface {}, string) Value>"


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(warren_bin()), *args], cwd=REPO_ROOT, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=30
    )


def serve(config: Path, *extra: str) -> Warren:
    """`warren serve --config config` (its listeners are the file's)."""
    return Warren("--config", str(config), *extra, http=False)


def request(port: int, topic: str, body: dict, login: str | None = None) -> dict:
    """One mqant-mode request over a fresh MQTT connection, after logging in as `login` when
    given (warren's login rule): the reply's JSON."""

    def ask(c: RawClient, topic: str, body: dict) -> dict:
        c.send(publish_packet(topic, json.dumps(body)))
        while True:
            first, packet = c.recv_packet(timeout=15)
            if first >> 4 == 3:
                got, _qos, _pkid, payload = parse_publish(first, packet)
                if got == topic:
                    return json.loads(payload)

    with RawClient(port) as c:
        c.send(connect_packet("c1"))
        c.expect(bytes.fromhex("20020000"))
        if login is not None:
            r = ask(c, "Login/HD_Login/0", {"userName": login, "passWord": "x"})
            assert r == {"Error": "", "Result": f"login success {login}"}, r
        return ask(c, topic, body)


def stock_with_ports(tmp_path: Path, tcp: int, ws: int, **process: str) -> Path:
    """The stock file on free ports, with the ProcessID of some modules changed."""
    text = STOCK.read_text()
    text = text.replace('":3563"', f'"127.0.0.1:{tcp}"').replace('":3653"', f'"127.0.0.1:{ws}"')
    for module, pid in process.items():
        text, n = re.subn(rf'("Id":"{module}001",\s*"ProcessID":)"development"', rf'\1"{pid}"', text)
        assert n == 1, module
    path = tmp_path / "server.conf"
    path.write_text(text)
    return path


# ---------------------------------------------------------------------------------------------
# 1. a stock server.conf, and ProcessID
# ---------------------------------------------------------------------------------------------


def test_check_config_accepts_a_stock_mqantserver_file(tmp_path: Path):
    res = run("check-config", str(STOCK))
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == f"ok: {STOCK}"
    warnings = res.stderr
    assert "warning: Master is ignored" in warnings
    assert "warning: Module.Master is ignored" in warnings
    assert "warning: Rpc.MaxCoroutine is ignored" in warnings
    assert 'module type "Hitball" has no implementation here' in warnings
    assert "unknown module type" not in warnings
    # the converted TOML says the same: the process group, and the types served elsewhere
    res = run("config", "convert", str(STOCK))
    assert res.returncode == 0, res.stderr
    assert 'process_id = "development"' in res.stdout
    assert '"Hitball"' in res.stdout and "remote_types" in res.stdout
    converted = tmp_path / "converted.toml"
    converted.write_text(res.stdout)
    res = run("check-config", str(converted))
    assert res.returncode == 0, res.stderr


def test_serve_runs_the_modules_of_its_process_id(tmp_path: Path):
    tcp, ws = free_port(), free_port()
    conf = stock_with_ports(tmp_path, tcp, ws, Chat="chat-process")
    w = serve(conf)
    wait_until(lambda: port_open(tcp) or not w.running(), timeout=30)
    assert w.running(), w.tail()
    # Login runs here (ProcessID development, warren's default process id)
    assert request(tcp, "Login/HD_Login/1", {"userName": "alice", "passWord": "x"}) == {
        "Error": "",
        "Result": "login success alice",
    }
    # Chat belongs to another process group, Hitball to mqant peers: neither runs here, and a
    # call to them is looked for on the bus (none here) instead of the file being refused
    for module in ("Chat", "Hitball"):
        r = request(tcp, f"{module}/HD_X/2", {}, login="bob")
        assert r == {"Error": f"Service(type:{module}) not found", "Result": None}
    assert "unknown module type" not in w.log()


def test_another_process_id_runs_none_of_the_stock_modules(tmp_path: Path):
    tcp, ws = free_port(), free_port()
    conf = stock_with_ports(tmp_path, tcp, ws)
    w = serve(conf, "--process-id", "elsewhere")
    # the gate is the development process's: this one opens no listener
    wait_until(lambda: "ready" in w.stdout() or not w.running(), timeout=30)
    assert w.running(), w.tail()
    assert not port_open(tcp)
    assert "no listeners configured" in w.log()


# ---------------------------------------------------------------------------------------------
# the AMQP tests share one broker (it boots in 10-20 s)
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def rabbit():
    if not installed("amqp"):
        pytest.skip("rabbitmq-server is not installed")
    b = Broker("amqp")
    yield b
    b.close()


def slash_uri(rabbit: Broker) -> str:
    """The broker's URI as mqant's samples write it: ending in `/`, no vhost named."""
    return f"amqp://guest:guest@127.0.0.1:{rabbit.port}/"


def rabbitmq(uri: str, exchange: str, queue: str) -> dict:
    return {"Uri": uri, "Exchange": exchange, "ExchangeType": "direct", "Queue": queue, "BindingKey": queue, "ConsumerTag": queue}


def mqant_conf(tmp_path: Path, modules: dict) -> Path:
    path = tmp_path / "server.conf"
    path.write_text("// written by the test\n" + json.dumps({"Module": modules, "Mqtt": {"ReadTimeout": 600}}, indent=1))
    return path


def gate(tcp: int, pid: str = "development", **extra) -> list:
    return [{"Id": "Gate001", "ProcessID": pid, "Settings": {"TCPAddr": f"127.0.0.1:{tcp}"}, **extra}]


def started(w: Warren, port: int | None = None) -> Warren:
    """Wait for the ready line: printed once the RabbitMQ bridge serves and reaches its instances
    (the listeners open before)."""
    wait_until(lambda: "ready" in w.stdout() or not w.running(), timeout=30)
    assert w.running(), w.tail()
    if port is not None:
        assert port_open(port), w.tail()
    return w


# ---------------------------------------------------------------------------------------------
# 2. module types only mqant peers serve
# ---------------------------------------------------------------------------------------------


def hitball(session: dict, body: dict) -> tuple:
    return f"hit {body.get('x')} from {session.get('Sessionid', '?')[:4]}", ""


@pytest.mark.parametrize("form", ["server.conf", "toml"])
def test_calls_reach_a_module_type_only_mqant_peers_serve(rabbit: Broker, tmp_path: Path, form: str):
    ex, queue = f"mqant-{form}", f"{form}.Hitball001"
    peer = MqantServer(rabbit.url, ex, queue, {"HD_Hit": hitball})
    try:
        tcp = free_port()
        if form == "server.conf":
            # Hitball001 runs in an mqant process: another ProcessID, reached over RabbitMQ
            conf = mqant_conf(
                tmp_path,
                {
                    "Gate": gate(tcp),
                    "Login": [{"Id": "Login001", "ProcessID": "development"}],
                    "Hitball": [{"Id": "Hitball001", "ProcessID": "mqant-1", "Rabbitmq": rabbitmq(rabbit.url, ex, queue)}],
                },
            )
        else:
            conf = tmp_path / "warren.toml"
            conf.write_text(
                f"""[node]
remote_types = ["Hitball"]

[[listener]]
protocol = "mqtt"
mode = "mqant"
addr = "127.0.0.1:{tcp}"

[[module]]
type = "Login"

[[module]]
type = "Hitball"
id = "Hitball001"
[module.bus]
kind = "amqp"
uri = "{rabbit.url}"
exchange = "{ex}"
queue = "{queue}"
binding_key = "{queue}"
"""
            )
        assert run("check-config", str(conf)).returncode == 0
        w = started(serve(conf), tcp)
        r = request(tcp, "Hitball/HD_Hit/1", {"x": 7}, login="alice")
        assert r["Error"] == "" and r["Result"].startswith("hit 7 from "), r
        call = peer.calls[-1]
        assert call["Fn"] == "HD_Hit" and call["Args"][1] == {"x": 7}
        assert call["Args"][0]["Serverid"] == "Gate001"
        # without the declaration the type is refused, naming it
        if form == "toml":
            conf.write_text(conf.read_text().replace('remote_types = ["Hitball"]', ""))
            res = run("check-config", str(conf))
            assert res.returncode == 1 and 'unknown module type "Hitball"' in res.stderr
        w.terminate()
    finally:
        peer.stop()


# ---------------------------------------------------------------------------------------------
# 3. an AMQP URI ending in `/` is vhost `/`
# ---------------------------------------------------------------------------------------------


def test_an_amqp_uri_ending_in_a_slash_is_the_default_vhost(rabbit: Broker, tmp_path: Path):
    ex, queue = "mqant-slash", "slash.Login001"
    conf = mqant_conf(tmp_path, {"Login": [{"Id": "Login001", "ProcessID": "development", "Rabbitmq": rabbitmq(slash_uri(rabbit), ex, queue)}]})
    w = started(serve(conf))
    assert "vhost" not in w.log()
    # an mqant client calls the Login warren serves on that broker
    export = {"IP": "127.0.0.1:5", "Network": "tcp", "Serverid": "Gate001", "Sessionid": "s-slash", "Settings": {}}
    r = mqant_call(rabbit.url, ex, queue, "getRand", [export, "lobby"])
    assert r["Error"] == "" and r["Result"] == "My is Login Module lobby", r
    # and the bus URL of warren's own cluster reads it the same way
    res = run("check-config", str(conf))
    assert res.returncode == 0, res.stderr
    w.terminate()


def test_the_bus_url_ending_in_a_slash_connects(rabbit: Broker):
    if not installed("redis"):
        pytest.skip("redis-server is not installed")
    redis = Broker("redis")
    try:
        w = Warren("--bus", slash_uri(rabbit), "--registry", redis.url, "--no-demo-modules", "--module", "Login", listen=["mqtt+mqant"], http=False)
        w.wait_ready()
        assert "NOT_ALLOWED" not in w.log()
        r = request(w.mqtt_mqant, "Login/HD_Login/1", {"userName": "bo", "passWord": "x"})
        assert r == {"Error": "", "Result": "login success bo"}
        w.terminate()
    finally:
        redis.close()


# ---------------------------------------------------------------------------------------------
# 4. session operations on sessions an mqant gate holds
# ---------------------------------------------------------------------------------------------


def test_a_warren_module_binds_and_sets_sessions_an_mqant_gate_holds(rabbit: Broker, tmp_path: Path):
    ex = "mqant-gate"
    peer_gate = MqantGate(rabbit.url, ex, "gate.Gate001", "Gate001")
    try:
        tcp = free_port()
        conf = mqant_conf(
            tmp_path,
            {
                # the gate runs in an mqant process; Login here
                "Gate": gate(tcp, "mqant-gates", Rabbitmq=rabbitmq(slash_uri(rabbit), ex, "gate.Gate001")),
                "Login": [{"Id": "Login001", "ProcessID": "development", "Rabbitmq": rabbitmq(slash_uri(rabbit), ex, "gate.Login001")}],
            },
        )
        w = started(serve(conf))
        assert not port_open(tcp), "the gate is the mqant process's, not this node's"
        sid = str(uuid.uuid4())
        export = peer_gate.open(sid)
        # the mqant gate forwards a client's HD_Login to warren's Login, with its session
        r = mqant_call(rabbit.url, ex, "gate.Login001", "HD_Login", [dict(export), {"userName": "alice", "passWord": "x"}])
        assert r == {"Cid": r["Cid"], "Error": "", "Result": "login success alice"}
        # Login bound the session, set a key and pushed the settings, on the mqant gate, with
        # the arguments of mqant's gate functions
        ops = [(c["Fn"], c["Args"]) for c in peer_gate.calls()]
        assert ops == [
            ("Bind", [sid, "alice"]),
            ("Set", [sid, "login", True]),
            ("Push", [sid, {"login": True}]),
        ], ops
        assert peer_gate.sessions[sid]["Userid"] == "alice"
        # a session the gate does not hold: its error reaches the caller
        gone = dict(export, Sessionid="no-such-session")
        r = mqant_call(rabbit.url, ex, "gate.Login001", "HD_Login", [gone, {"userName": "bob", "passWord": "x"}])
        assert r["Error"] == "No Sesssion found", r
        w.terminate()
    finally:
        peer_gate.stop()


# ---------------------------------------------------------------------------------------------
# 5. the wrong number of arguments
# ---------------------------------------------------------------------------------------------


def test_the_wrong_number_of_arguments_gets_mqants_error(rabbit: Broker, tmp_path: Path):
    ex, queue = "mqant-arity", "arity.Login001"
    conf = mqant_conf(tmp_path, {"Login": [{"Id": "Login001", "ProcessID": "development", "Rabbitmq": rabbitmq(rabbit.url, ex, queue)}]})
    w = started(serve(conf))
    export = {"Network": "tcp", "Serverid": "Gate001", "Sessionid": "s1", "Settings": {}}
    r = mqant_call(rabbit.url, ex, queue, "getRand", [export, "x"])
    assert r["Error"] == "", r
    cases = [
        ([1, 2, 3], "[%!s(float64=1) %!s(float64=2) %!s(float64=3)]"),
        ([{"b": True, "a": "x"}], "[map[a:x b:%!s(bool=true)]]"),
        ([], "[]"),
    ]
    for args, shown in cases:
        r = mqant_call(rabbit.url, ex, queue, "getRand", args)
        assert r["Error"] == f"The number of params {shown} is not adapted.{HANDLER}", r
        assert r["Result"] is None
    assert "wrong number of Args" in w.log()
    w.terminate()

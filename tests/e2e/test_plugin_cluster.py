"""Plugin modules across nodes (docs/plugins.md, docs/cluster.md): a plugin module is routed,
clustered, hashed and called like a Rust module, whatever node it runs on.

Each test starts its own broker (nats-server or redis-server from Debian, on free ports) and its
own `warren` processes: a gate (`serve`, a default-mode MQTT listener and the Rust `Echo`) and
module nodes (`node`) running the same Lua `Greeter` and Python `PyGreeter` from a config file
of their own, with file watching off.

- An MQTT client (paho) on the gate calls `Greeter/HD_Hello/1` and `PyGreeter/HD_Hello/1`,
  served on another node: the push, then the reply.
- With the module on two nodes, each logged-in user reaches the instance the consistent-hash
  ring gives for their uid (stathat's ring over the instance ids, as `ring_owner` of
  test_cluster.py computes it), every time; the users cover both nodes.
- A plugin calls the Rust `Echo` on the gate's node with `warren.call`, and a call to a module
  that runs nowhere is an error the script catches, with its kind (Python's `CallError.kind`)
  and mqant's text.
- SIGHUP reloads every plugin of the node that gets it: an edited file answers with its new
  version, a broken one keeps the running version (the log names file and line), and a second
  SIGHUP once it is fixed loads it.
- The admin API patches a handler on its own node only; its answer names that node and the
  instance on the other node, which keeps the old handler. A node that does not run the module
  says where it runs.
"""

from __future__ import annotations

import json
import re
import signal
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from brokers import Broker, installed
from chat import ChatClient
from conftest import Warren, free_port, wait_until
from test_cluster import ring_owner

WAIT_S = 20.0

# Every handler is callable before login (the gate applies the login rule with the list the
# module node registers).
HANDLERS = ["HD_Hello", "HD_Login", "HD_Where", "HD_CallEcho", "HD_CallNowhere", "HD_Version"]

GREETER_LUA = """
function HD_Hello(session, msg)
  session:push("Greeter/OnHello", msg)
  return "hello " .. msg
end

function HD_Login(session, msg)
  session:bind(msg)
  return "welcome " .. msg
end

function HD_Where(session, msg) return warren.instance end

function HD_CallEcho(session, msg)
  return "echo said " .. warren.call("Echo", "HD_Echo", msg)
end

function HD_CallNowhere(session, msg)
  local ok, err = pcall(warren.call, "Nowhere", "HD_Echo", msg)
  return (tostring(err):match("^[^\\n]*"))  -- the message, without the traceback
end

function HD_Version(session, msg) return VERSION end

VERSION = "v1"
"""

GREETER_PY = """
import warren


def HD_Hello(session, msg):
    session.push("PyGreeter/OnHello", msg)
    return "hello " + msg


def HD_Login(session, msg):
    session.bind(msg)
    return "welcome " + msg


def HD_Where(session, msg):
    return warren.instance


def HD_CallEcho(session, msg):
    return "echo said " + warren.call("Echo", "HD_Echo", msg)


def HD_CallNowhere(session, msg):
    try:
        warren.call("Nowhere", "HD_Echo", msg)
    except warren.CallError as e:
        return e.kind + ": " + e.text


def HD_Version(session, msg):
    return VERSION


VERSION = "v1"
"""

KINDS = {"lua": ("Greeter", "greeter.lua", GREETER_LUA), "py": ("PyGreeter", "greeter.py", GREETER_PY)}


def ok(result) -> dict:
    return {"Error": "", "Result": result}


@pytest.fixture(params=["nats", "redis"])
def broker(request):
    """A broker of the parameter's kind: the bus, and the registry (NATS KV, Redis gobase)."""
    if not installed(request.param):
        pytest.fail(f"{request.param} server is not installed (scripts/test installs it)")
    b = Broker(request.param)
    yield b
    b.close()


@pytest.fixture
def nats():
    if not installed("nats"):
        pytest.fail("nats server is not installed (scripts/test installs it)")
    b = Broker("nats")
    yield b
    b.close()


class ModuleNode:
    """`warren node` running the Lua Greeter and the Python PyGreeter from a config file in a
    directory of its own (watching off), with an admin API on a free port."""

    def __init__(self, cluster: Cluster, name: str) -> None:
        self.name = name
        self.dir = cluster.dir / name
        self.dir.mkdir()
        for _, file, text in KINDS.values():
            (self.dir / file).write_text(text)
        listed = ", ".join(f'"{h}"' for h in HANDLERS)
        self.admin = free_port()
        config = "[plugins]\nwatch = false\n\n"
        config += f'[admin]\naddr = "127.0.0.1:{self.admin}"\n'
        for module, file, _ in KINDS.values():
            config += f'\n[[module]]\ntype = "{module}"\nplugin = "{file}"\nlogin_handlers = [{listed}]\n'
        (self.dir / "node.toml").write_text(config)
        self.w = Warren(*cluster.flags, "--node-id", name, "--config", str(self.dir / "node.toml"), command="node")
        wait_until(lambda: "ready" in self.w.stdout() or not self.w.running(), WAIT_S, msg=f"{name} not ready")
        assert self.w.running(), self.w.tail()
        wait_until(
            lambda: f"node={name}" in cluster.gate.log(), WAIT_S, msg=f"the gate never saw {name}\n{cluster.gate.tail()}"
        )

    def edit(self, kind: str, old: str, new: str) -> None:
        path = self.dir / KINDS[kind][1]
        path.write_text(path.read_text().replace(old, new))

    def api(self, method: str, path: str, body: str | None = None) -> tuple[int, dict]:
        """One request to this node's admin API: (status, JSON body)."""
        req = urllib.request.Request(
            f"http://127.0.0.1:{self.admin}{path}", method=method, data=body.encode() if body is not None else None
        )
        try:
            with urllib.request.urlopen(req, timeout=10) as r:
                return r.status, json.loads(r.read())
        except urllib.error.HTTPError as e:
            return e.code, json.loads(e.read())


class Cluster:
    """A gate (default-mode MQTT, the Rust Echo, its admin API) and plugin module nodes on one
    broker."""

    def __init__(self, broker: Broker, tmp_path: Path, nodes: tuple[str, ...]) -> None:
        self.dir = tmp_path
        self.flags = ["--bus", broker.url, "--registry", broker.url]
        self.gate_admin = free_port()
        (tmp_path / "gate.toml").write_text(
            f'[admin]\naddr = "127.0.0.1:{self.gate_admin}"\n\n[[module]]\ntype = "Echo"\n'
        )
        self.gate = Warren(
            *self.flags, "--node-id", "gate", "--config", str(tmp_path / "gate.toml"), listen=["mqtt"], http=False
        )
        self.gate.wait_ready()
        self.nodes = {n: ModuleNode(self, n) for n in nodes}
        self.port = self.gate.mqtt_plain

    def client(self) -> ChatClient:
        return ChatClient(self.port)

    def login(self, user: str) -> ChatClient:
        c = self.client()
        assert c.request("Greeter/HD_Login", user) == ok(f"welcome {user}")
        return c


@pytest.mark.parametrize("kind", list(KINDS))
def test_a_client_on_the_gate_calls_a_plugin_module_on_another_node(broker, tmp_path, kind):
    cl = Cluster(broker, tmp_path, nodes=("b",))
    module = KINDS[kind][0]
    with cl.client() as c:
        raw = c.request(f"{module}/HD_Hello/1", "ann", raw=True)
        assert raw == b'{"Error":"","Result":"hello ann"}'
        history = [(m.kind, m.topic, m.raw) for m in c.history()]
        # the push, from the module node through the gate, arrives before the reply
        assert history == [("push", f"{module}/OnHello", b"ann"), ("reply", f"{module}/HD_Hello/1", raw)], history
        assert c.request(f"{module}/HD_Where", "") == ok(f"{module}-b")
        # the plugin on node b calls the Rust Echo on the gate's node
        assert c.request(f"{module}/HD_CallEcho", "bob") == ok("echo said bob")
        # a module that runs nowhere: the script sees a typed error (Lua: its text; Python: .kind)
        nowhere = "Service(type:Nowhere) not found"
        if kind == "py":
            nowhere = f"service_not_found: {nowhere}"
        assert c.request(f"{module}/HD_CallNowhere", "x") == ok(nowhere)
    assert all(n.w.running() for n in cl.nodes.values()) and cl.gate.running()
    assert "panic" not in cl.gate.log() + cl.nodes["b"].w.log()


def test_two_instances_on_two_nodes_are_chosen_by_consistent_hash(broker, tmp_path):
    cl = Cluster(broker, tmp_path, nodes=("b", "c"))
    users = [f"user{i}" for i in range(12)]
    for module in ("Greeter", "PyGreeter"):
        members = [f"{module}-b", f"{module}-c"]
        owners = {u: ring_owner(members, u) for u in users}
        # the users cover both nodes, so the test sees the ring choose each
        assert set(owners.values()) == {m.lower() for m in members}, owners
        for u in users:
            c = cl.login(u)
            try:
                # the same key reaches the same instance, call after call
                for _ in range(3):
                    assert c.request(f"{module}/HD_Where", "") == ok(owners[u].replace(module.lower(), module)), u
            finally:
                c.close()
    # the modules call Echo on the gate from both nodes
    for u in users[:4]:
        with cl.login(u) as c:
            assert c.request("PyGreeter/HD_CallEcho", u) == ok(f"echo said {u}")
            assert c.request("Greeter/HD_CallEcho", u) == ok(f"echo said {u}")


def test_sighup_reloads_every_plugin_and_keeps_one_that_does_not_load(nats, tmp_path):
    cl = Cluster(nats, tmp_path, nodes=("b",))
    b = cl.nodes["b"]
    with cl.client() as c:
        assert c.request("Greeter/HD_Version", "") == ok("v1")
        assert c.request("PyGreeter/HD_Version", "") == ok("v1")
        # watching is off: an edit alone changes nothing
        b.edit("lua", 'VERSION = "v1"', 'VERSION = "v2"')
        b.edit("py", 'VERSION = "v1"', 'VERSION = "v2" +')
        assert c.request("Greeter/HD_Version", "") == ok("v1")
        b.w.proc.send_signal(signal.SIGHUP)
        wait_until(lambda: "SIGHUP: 1 plugin(s) did not load" in b.w.log(), WAIT_S, msg=b.w.tail())
        assert c.request("Greeter/HD_Version", "") == ok("v2")
        # the broken file keeps the running version, and the log names its file and line
        assert c.request("PyGreeter/HD_Version", "") == ok("v1")
        log = b.w.log()
        assert re.search(r"SIGHUP: plugin reloaded: version 2 runs plugin=\"?Greeter\"? ", log), log
        assert re.search(
            rf"SIGHUP: plugin does not load: version 1 keeps running plugin=\"?PyGreeter\"? .*{re.escape(str(b.dir / 'greeter.py'))}:\d+: SyntaxError",
            log,
        ), log
        # fixed, and a second SIGHUP loads it (the Lua plugin reloads again too)
        b.edit("py", 'VERSION = "v2" +', 'VERSION = "v2"')
        b.w.proc.send_signal(signal.SIGHUP)
        wait_until(lambda: "SIGHUP: reloaded every plugin" in b.w.log(), WAIT_S, msg=b.w.tail())
        assert c.request("PyGreeter/HD_Version", "") == ok("v2")
        assert c.request("Greeter/HD_Version", "") == ok("v2")
    status, listing = b.api("GET", "/admin/plugins")
    assert status == 200 and listing["node"] == "b", listing
    versions = {p["name"]: (p["version"], p["last_error"]) for p in listing["plugins"]}
    assert versions == {"Greeter": (3, None), "PyGreeter": (2, None)}, versions
    assert b.w.running() and "panic" not in b.w.log()


def test_an_admin_patch_applies_to_its_own_node_and_names_the_others(nats, tmp_path):
    cl = Cluster(nats, tmp_path, nodes=("b", "c"))
    members = ["Greeter-b", "Greeter-c"]
    on_b = next(f"u{i}" for i in range(100) if ring_owner(members, f"u{i}") == "greeter-b")
    on_c = next(f"u{i}" for i in range(100) if ring_owner(members, f"u{i}") == "greeter-c")
    status, body = cl.nodes["b"].api(
        "PUT", "/admin/modules/Greeter/handlers/HD_Hello", 'function(session, msg) return "patched " .. msg end'
    )
    assert status == 200, body
    assert body == {
        "module": "Greeter",
        "handler": "HD_Hello",
        "instances": [{"name": "Greeter", "version": 1, "patched": ["HD_Hello"]}],
        "node": "b",
        "elsewhere": [{"node": "c", "instance": "Greeter-c"}],
    }, body
    # the users the ring sends to b get the patched handler; those on c the file's
    with cl.login(on_b) as c:
        assert c.request("Greeter/HD_Hello", "ann") == ok("patched ann")
    with cl.login(on_c) as c:
        assert c.request("Greeter/HD_Hello", "ann") == ok("hello ann")
    # the gate runs no Greeter: it says where the module runs, and patches nothing
    req = urllib.request.Request(
        f"http://127.0.0.1:{cl.gate_admin}/admin/modules/Greeter/handlers/HD_Hello",
        method="PUT",
        data=b'function(session, msg) return "x" end',
    )
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(req, timeout=10)
    assert e.value.code == 409
    error = json.loads(e.value.read())["error"]
    assert error["code"] == "not_on_this_node", error
    assert "does not run on this node (gate) but on b, c" in error["message"], error
    # ... and a Rust module that runs on the gate is still not a plugin
    req = urllib.request.Request(
        f"http://127.0.0.1:{cl.gate_admin}/admin/modules/Echo/handlers/HD_Echo", method="PUT", data=b"function(s, m) end"
    )
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(req, timeout=10)
    assert (e.value.code, json.loads(e.value.read())["error"]["code"]) == (409, "not_a_plugin")
    # c's API patches c
    status, body = cl.nodes["c"].api(
        "PUT", "/admin/modules/Greeter/handlers/HD_Hello", 'function(session, msg) return "patched on c " .. msg end'
    )
    assert (status, body["node"], body["elsewhere"]) == (200, "c", [{"node": "b", "instance": "Greeter-b"}]), body
    with cl.login(on_c) as c:
        assert c.request("Greeter/HD_Hello", "ann") == ok("patched on c ann")

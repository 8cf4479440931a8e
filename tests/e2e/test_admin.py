"""The admin HTTP API (docs/plugins.md, "Hotfix over the admin API") against the real binary.

A node runs two plugin modules (Lua `Greeter`, Python `PyGreeter`) and the Rust `Echo`, with
`[admin]` on a free port and file watching off, so that only the API reloads. Covered: the
plugin list; a reload that works and one that does not (the old version keeps answering MQTT
clients); a handler replaced over HTTP, then seen by an MQTT client; what is refused (a body
that does not compile, a handler or module that does not exist, a Rust module); the bearer
token; who did what in the log; every answer naming the node; SIGHUP reloading every plugin,
channel handler included, as the API would; and no admin listener at all without `[admin]`.
"""

from __future__ import annotations

import json
import re
import signal
import socket
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from chat import ChatClient
from conftest import Warren, free_port, wait_until

def admin_request(port: int, method: str, path: str, data: bytes | None, token: str | None) -> tuple[int, dict]:
    """One request to the admin API on 127.0.0.1:`port`, with the bearer token when one is
    given: (status, JSON answer), error statuses included."""
    req = urllib.request.Request(f"http://127.0.0.1:{port}{path}", method=method, data=data)
    if token is not None:
        req.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


GREETER_LUA = 'function HD_Hello(session, msg) return "hello " .. msg end\n'
GREETER_PY = 'def HD_Hello(session, msg):\n    return "hi " + msg\n'
ECHO_LUA = "function handle_msg(id, msg) channel.send(id, msg) end\n"


class Node:
    """A warren with the two plugin modules, a line listener's Lua channel handler, and (maybe)
    its admin API."""

    def __init__(self, tmp_path: Path, admin: bool = True, token: str | None = None, extra: str = "") -> None:
        self.dir = tmp_path
        (tmp_path / "greeter.lua").write_text(GREETER_LUA)
        (tmp_path / "greeter.py").write_text(GREETER_PY)
        (tmp_path / "echo.lua").write_text(ECHO_LUA)
        self.mqtt = free_port()
        self.line = free_port()
        self.admin = free_port() if admin else None
        self.token = token
        config = (
            "[[listener]]\n"
            'protocol = "mqtt"\n'
            'mode = "default"\n'
            f'addr = "127.0.0.1:{self.mqtt}"\n\n'
            "[[listener]]\n"
            'protocol = "line"\n'
            f'addr = "127.0.0.1:{self.line}"\n'
            'plugin = "echo.lua"\n\n'
            "[[module]]\n"
            'type = "Greeter"\n'
            'plugin = "greeter.lua"\n'
            'login_handlers = ["HD_Hello"]\n\n'
            "[[module]]\n"
            'type = "PyGreeter"\n'
            'plugin = "greeter.py"\n'
            'login_handlers = ["HD_Hello"]\n\n'
            "[[module]]\n"
            'type = "Echo"\n\n'
            "[plugins]\n"
            "watch = false\n"
        )
        if admin:
            config += f'\n[admin]\naddr = "127.0.0.1:{self.admin}"\n'
            if token is not None:
                config += f'token = "{token}"\n'
        config += extra
        (tmp_path / "node.toml").write_text(config)
        self.w = Warren("--config", str(tmp_path / "node.toml"), http=False)
        self.w.listeners = [("mqtt", self.mqtt), ("line", self.line)] + ([("admin", self.admin)] if admin else [])
        self.w.ports.update({"mqtt": self.mqtt})
        self.w.wait_ready()

    def api(self, method: str, path: str, body: str | None = None, token: str | None = "default") -> tuple[int, dict]:
        """One request to the admin API: (status, JSON body). The node's token by default."""
        return admin_request(self.admin, method, path, body.encode() if body is not None else None, self.token if token == "default" else token)

    def hello(self, module: str = "Greeter", name: str = "ann") -> dict:
        """`<module>/HD_Hello` over MQTT: the reply envelope."""
        c = ChatClient(self.mqtt)
        try:
            return c.request(f"{module}/HD_Hello", name)
        finally:
            c.close()


def ok(result) -> dict:
    return {"Error": "", "Result": result}


@pytest.fixture
def node(tmp_path):
    return Node(tmp_path)


def listening_ports(pid: int) -> set[int]:
    """The TCP ports process `pid` listens on (its socket inodes matched in /proc/net/tcp*)."""
    fd_dir = Path(f"/proc/{pid}/fd")
    inodes = set()
    for fd in fd_dir.iterdir():
        try:
            target = fd.readlink()
        except OSError:
            continue
        m = re.fullmatch(r"socket:\[(\d+)\]", str(target))
        if m:
            inodes.add(m.group(1))
    ports = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            f = line.split()
            if f[3] == "0A" and f[9] in inodes:  # 0A: LISTEN
                ports.add(int(f[1].rsplit(":", 1)[1], 16))
    return ports


def test_the_plugins_are_listed(node):
    status, body = node.api("GET", "/admin/plugins")
    assert status == 200, body
    assert body["node"] == "warren"  # the node's id (the default: this node has no cluster)
    plugins = {p["name"]: p for p in body["plugins"]}
    line = f"line@127.0.0.1:{node.line}"
    assert set(plugins) == {"Greeter", "PyGreeter", line}, body  # Echo is Rust: not a plugin
    lua, py = plugins["Greeter"], plugins["PyGreeter"]
    echo = plugins[line]
    assert (echo["kind"], echo["role"], echo["module"], echo["listener"], echo["version"]) == (
        "lua",
        "listener",
        None,
        f"127.0.0.1:{node.line}",
        1,
    ), echo
    assert echo["path"] == str(node.dir / "echo.lua") and echo["patched"] == []
    assert (lua["kind"], lua["role"], lua["module"], lua["version"]) == ("lua", "module", "Greeter", 1)
    assert (py["kind"], py["role"], py["module"], py["version"]) == ("python", "module", "PyGreeter", 1)
    assert lua["path"] == str(node.dir / "greeter.lua")
    assert py["path"] == str(node.dir / "greeter.py")
    for p in (lua, py, echo):
        assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", p["loaded_at"]), p
        assert p["last_error"] is None and p["patched"] == []
    assert lua["listener"] is None and py["listener"] is None
    assert f"admin http://127.0.0.1:{node.admin}/" in node.w.stdout()


def test_a_reload_loads_the_new_version(node):
    assert node.hello() == ok("hello ann")
    (node.dir / "greeter.lua").write_text('function HD_Hello(session, msg) return "bonjour " .. msg end\n')
    status, body = node.api("POST", "/admin/plugins/Greeter/reload")
    assert (status, body) == (200, {"name": "Greeter", "version": 2, "previous": 1, "node": "warren"})
    assert node.hello() == ok("bonjour ann")
    _, listing = node.api("GET", "/admin/plugins")
    lua = next(p for p in listing["plugins"] if p["name"] == "Greeter")
    assert lua["version"] == 2 and lua["last_error"] is None
    assert re.search(r"admin: plugin reloaded peer=127\.0\.0\.1:\d+ token=false plugin=Greeter .*version=2", node.w.log())
    # a line listener's channel handler reloads the same way, under its listener's name
    (node.dir / "echo.lua").write_text('function handle_msg(id, msg) channel.send(id, "v2 " .. msg) end\n')
    status, body = node.api("POST", f"/admin/plugins/line@127.0.0.1:{node.line}/reload")
    assert (status, body["version"]) == (200, 2), body
    with socket.create_connection(("127.0.0.1", node.line), timeout=5) as s:
        s.sendall(b"2\r\nhi")
        got = b""
        while not got.endswith(b"v2 hi"):
            chunk = s.recv(64)
            assert chunk, got
            got += chunk
    assert got == b"5 \r\nv2 hi"


def test_sighup_reloads_every_plugin_as_the_api_does(node):
    # watching is off: edits change nothing until the signal
    (node.dir / "greeter.lua").write_text('function HD_Hello(session, msg) return "hup " .. msg end\n')
    (node.dir / "echo.lua").write_text('function handle_msg(id, msg) channel.send(id, "hup " .. msg) end\n')
    assert node.hello() == ok("hello ann")
    node.w.proc.send_signal(signal.SIGHUP)
    wait_until(lambda: "SIGHUP: reloaded every plugin" in node.w.log(), msg=node.w.tail())
    assert node.hello() == ok("hup ann")
    assert node.hello("PyGreeter") == ok("hi ann")  # its file did not change: the same text, anew
    with socket.create_connection(("127.0.0.1", node.line), timeout=5) as s:
        s.sendall(b"2\r\nhi")
        got = b""
        while not got.endswith(b"hup hi"):
            chunk = s.recv(64)
            assert chunk, got
            got += chunk
    assert got == b"6 \r\nhup hi"
    # the record is the same as after the API's reloads
    _, listing = node.api("GET", "/admin/plugins")
    assert {p["name"]: p["version"] for p in listing["plugins"]} == {
        "Greeter": 2,
        "PyGreeter": 2,
        f"line@127.0.0.1:{node.line}": 2,
    }, listing
    assert node.w.running()


def test_a_broken_reload_keeps_the_old_version(node):
    (node.dir / "greeter.py").write_text('def HD_Hello(session, msg):\n    return "oops " + \n')
    status, body = node.api("POST", "/admin/plugins/PyGreeter/reload")
    assert status == 422, body
    assert body["error"]["code"] == "reload_failed"
    assert body["error"]["message"].startswith(f"{node.dir / 'greeter.py'}:2: SyntaxError"), body
    assert body["error"]["line"] == 2 and body["version"] == 1
    # the old version keeps answering
    assert node.hello("PyGreeter") == ok("hi ann")
    _, listing = node.api("GET", "/admin/plugins")
    py = next(p for p in listing["plugins"] if p["name"] == "PyGreeter")
    assert py["version"] == 1
    assert py["last_error"]["line"] == 2 and "greeter.py:2" in py["last_error"]["message"], py
    assert "admin: plugin reload failed; the running version stays" in node.w.log()

    status, body = node.api("POST", "/admin/plugins/Nope/reload")
    assert (status, body["error"]["code"]) == (404, "no_such_plugin")


@pytest.mark.parametrize(
    "module, source",
    [
        ("Greeter", 'function(session, msg) return "patched " .. msg end'),
        ("PyGreeter", 'def handler(session, msg):\n    return "patched " + msg\n'),
    ],
)
def test_a_handler_replaced_over_http_answers_mqtt_clients(node, module, source):
    status, body = node.api("PUT", f"/admin/modules/{module}/handlers/HD_Hello", source)
    assert status == 200, body
    # one node, which the answer names; no instance elsewhere (test_plugin_cluster.py has a cluster)
    assert body == {
        "module": module,
        "handler": "HD_Hello",
        "instances": [{"name": module, "version": 1, "patched": ["HD_Hello"]}],
        "node": "warren",
        "elsewhere": [],
    }
    assert node.hello(module) == ok("patched ann")
    log = node.w.log()
    assert re.search(rf"admin: handler replaced peer=127\.0\.0\.1:\d+ token=false module={module} .*handler=HD_Hello", log), log
    _, listing = node.api("GET", "/admin/plugins")
    assert next(p for p in listing["plugins"] if p["name"] == module)["patched"] == ["HD_Hello"]


def test_what_cannot_be_patched_is_refused(node):
    # a body that does not compile: 422 with the line in the body; the handler is unchanged
    status, body = node.api("PUT", "/admin/modules/Greeter/handlers/HD_Hello", "function(session, msg)\n  return 'x' ..\nend")
    assert status == 422, body
    assert body["error"]["code"] == "patch_failed" and body["error"]["line"] == 3, body
    status, body = node.api("PUT", "/admin/modules/PyGreeter/handlers/HD_Hello", "x = 1\n")
    assert (status, body["error"]["code"]) == (422, "patch_failed"), body
    assert node.hello() == ok("hello ann")
    assert node.hello("PyGreeter") == ok("hi ann")
    # no such handler, no such module, a Rust module
    status, body = node.api("PUT", "/admin/modules/Greeter/handlers/HD_Nope", "function(s, m) end")
    assert (status, body["error"]["code"]) == (404, "no_such_handler"), body
    status, body = node.api("PUT", "/admin/modules/Nope/handlers/HD_Hello", "function(s, m) end")
    assert (status, body["error"]["code"]) == (404, "no_such_module"), body
    status, body = node.api("PUT", "/admin/modules/Echo/handlers/HD_Echo", "function(s, m) end")
    assert (status, body["error"]["code"]) == (409, "not_a_plugin"), body
    # not script text
    status, body = node.api("PUT", "/admin/modules/Greeter/handlers/HD_Hello", "")
    assert (status, body["error"]["code"]) == (400, "bad_request"), body
    status, body = node.api("PUT", "/admin/modules/Greeter/handlers/HD_Hello", "x" * (65 * 1024))
    assert (status, body["error"]["code"]) == (413, "too_large"), body
    # unknown paths and methods answer in the same shape
    status, body = node.api("GET", "/admin/nope")
    assert (status, body["error"]["code"]) == (404, "not_found"), body
    status, body = node.api("DELETE", "/admin/plugins")
    assert (status, body["error"]["code"]) == (405, "method_not_allowed"), body
    assert "admin: handler not replaced; the running one stays" in node.w.log()


def test_a_token_is_required_when_set(tmp_path):
    n = Node(tmp_path, token="s3cret")
    status, body = n.api("GET", "/admin/plugins", token=None)
    assert (status, body["error"]["code"]) == (401, "unauthorized"), body
    status, body = n.api("GET", "/admin/plugins", token="wrong")
    assert (status, body["error"]["code"]) == (401, "unauthorized"), body
    # nothing is revealed without it, not even which paths exist
    status, body = n.api("GET", "/admin/nope", token=None)
    assert status == 401, body
    status, body = n.api("PUT", "/admin/modules/Greeter/handlers/HD_Hello", 'function(s, m) return "x" end', token=None)
    assert status == 401, body
    assert n.hello() == ok("hello ann")

    status, body = n.api("GET", "/admin/plugins")
    assert status == 200 and len(body["plugins"]) == 3, body
    status, body = n.api("PUT", "/admin/modules/Greeter/handlers/HD_Hello", 'function(s, m) return "with token " .. m end')
    assert status == 200, body
    assert n.hello() == ok("with token ann")
    log = n.w.log()
    assert re.search(r"admin: handler replaced peer=127\.0\.0\.1:\d+ token=true module=Greeter", log), log
    assert "admin: request refused" in log


def test_no_admin_listener_without_admin(tmp_path):
    n = Node(tmp_path, admin=False)
    assert n.hello() == ok("hello ann")
    # the node listens on its MQTT and line ports and its web page, nothing else
    assert listening_ports(n.w.proc.pid) == {n.mqtt, n.line, n.w.http}
    assert "admin API listening" not in n.w.log()
    assert "admin http" not in n.w.stdout()


def test_with_admin_the_node_listens_on_it(node):
    assert listening_ports(node.w.proc.pid) == {node.mqtt, node.line, node.w.http, node.admin}
    assert wait_until(lambda: "admin API listening" in node.w.log())


def test_a_reachable_admin_api_needs_a_token(tmp_path):
    (tmp_path / "open.toml").write_text(f'[admin]\naddr = "0.0.0.0:{free_port()}"\n')
    w = Warren("--config", str(tmp_path / "open.toml"), http=False)
    assert w.proc.wait(timeout=20) != 0
    assert "admin.token" in w.log() + w.stdout(), w.tail()

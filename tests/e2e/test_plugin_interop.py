"""What plugin modules open to the other systems warren speaks to, with no Rust at all.

- pomelo-rpc (docs/protocols/pomelo-rpc.md): a listener's `service_map` points the service
  `service` at a Lua or a Python module, and pomelo-rpc's own sample client (its
  `sample/client.js`, only its port changed) gets its `service.echo` answered by the script.
- TianQinS Redis RPC (docs/cluster.md, "Compatibility bridges"): `[[redis_rpc]] module = …`
  exposes a Python module's functions to Redis-RPC peers, and the module calls their functions
  with `warren.rpc_call`. The peer is redis-py against a redis-server the test starts.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import threading
from pathlib import Path

import pytest

from brokers import Broker, installed
from conftest import REPO_ROOT, Warren, free_port, wait_until

NODE_MODULES = REPO_ROOT / "tests" / "node" / "node_modules"
SAMPLE = NODE_MODULES / "pomelo-rpc" / "sample"

ECHO = {
    # pomelo-rpc's echo(msg, data, cb) answers cb(null, msg): the first argument
    "echo.lua": "function echo(session, args) return args[1] end\n",
    "echo.py": "def echo(session, args):\n    return args[0]\n",
}


@pytest.mark.parametrize("script", list(ECHO))
def test_pomelo_rpc_sample_client_reaches_a_plugin_service(tmp_path: Path, script: str):
    if shutil.which("node") is None or not (SAMPLE / "client.js").is_file():
        pytest.skip("node and tests/node/node_modules (npm ci --prefix tests/node) are needed")
    (tmp_path / script).write_text(ECHO[script])
    port = free_port()
    (tmp_path / "rpc.toml").write_text(
        "[[listener]]\n"
        'protocol = "pomelo-rpc"\n'
        f'addr = "127.0.0.1:{port}"\n'
        'allow = ["127.0.0.1"]             # the local peer is a trusted server\n'
        'service_map = { service = "Skills" }\n\n'
        "[[module]]\n"
        'type = "Skills"\n'
        f'plugin = "{script}"\n'
        'msg_type = "json"\n'
    )
    w = Warren("--config", str(tmp_path / "rpc.toml"), http=False)
    w.listeners = [("pomelo-rpc", port)]
    w.wait_ready()

    # upstream's sample client, unchanged but for where it finds pomelo-rpc and its server
    client = (SAMPLE / "client.js").read_text()
    assert "require('..')" in client and "port: 3333" in client and "__dirname + '/remote/test'" in client
    client = (
        client.replace("require('..')", "require('pomelo-rpc')")
        .replace("port: 3333", f"port: {port}")
        .replace("__dirname + '/remote/test'", json.dumps(str(SAMPLE / "remote" / "test")))
    )
    (tmp_path / "client.js").write_text(client)
    proc = subprocess.Popen(
        ["node", str(tmp_path / "client.js")],
        cwd=tmp_path,
        env={"NODE_PATH": str(NODE_MODULES), "PATH": "/usr/bin:/bin"},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    # the sample never exits: read until it printed its reply (resp, then data), then stop it
    lines: list[str] = []
    timer = threading.Timer(20, proc.kill)
    timer.start()
    try:
        for line in proc.stdout:
            lines.append(line.rstrip("\n"))
            if line.strip() == "undefined":
                break
    finally:
        timer.cancel()
        proc.kill()
        proc.wait()
    # console.log spreads the array over lines when it is long: compare it as one line. The
    # object went through a Lua table, which has no order: Lua gives its keys back sorted
    said = " ".join(" ".join(lines).split())
    push = "{ isPush: true, type: 'push', userOptions: {} }" if script.endswith(".lua") else "{ type: 'push', userOptions: {}, isPush: true }"
    assert said == f"rpc client start ok. [ 'onReloadSkill', [ '210108' ], {push} ] undefined", "\n".join(lines) + "\n" + w.tail()


RPC_PY = '''
import warren

def test(session, args):
    # the function TianQinS's samples call, in Python
    return "args: %s, %s." % (args[0], args[1])

def add_there(session, args):
    # a function of a TianQinS peer, called over Redis RPC: its return values, as a list
    return warren.rpc_call("peer", "add", args, 5)
'''


@pytest.mark.skipif(not installed("redis"), reason="redis-server is not installed")
def test_tianqins_peers_call_and_are_called_by_a_python_module(tmp_path: Path):
    import redis

    broker = Broker("redis")
    try:
        (tmp_path / "rpc.py").write_text(RPC_PY)
        (tmp_path / "node.toml").write_text(
            "[[module]]\n"
            'type = "PyRpc"\n'
            'plugin = "rpc.py"\n'
            'msg_type = "json"\n\n'
            "[[redis_rpc]]\n"
            f'url = "{broker.url}"\n'
            'topic = "warren"\n'
            "db = 1\n"
            'module = "PyRpc"\n'
            'reply = "list"                 # the Python pymodule reads its list\n'
        )
        w = Warren("--config", str(tmp_path / "node.toml"), http=False)
        w.wait_ready()
        r = redis.Redis(host="127.0.0.1", port=broker.port, db=1, decode_responses=True)
        # the endpoint consumes its list once it says so
        wait_until(lambda: "redis rpc serving" in w.log(), timeout=20)

        # a peer calls the module's function, as the pymodule's RPCModule.call does
        r.rpush("warren", json.dumps({"func": "test", "ct": "pyside", "cb": "callback", "args": ["arg1", "arg2"]}))
        reply = r.blpop("pyside", timeout=10)[1]
        assert json.loads(reply) == {"func": "callback", "ct": "warren", "cb": "", "args": ["args: arg1, arg2."]}

        # the module calls a peer's function: the peer (a thread here) serves `add` on its list
        # and answers the way the pymodule does, on the caller's list
        calls: list[dict] = []

        def peer():
            popped = r.blpop("peer", timeout=10)
            if popped is None:
                return
            call = json.loads(popped[1])
            calls.append(call)
            r.rpush(call["ct"], json.dumps({"func": call["cb"], "ct": "peer", "cb": "", "args": [sum(call["args"])]}))

        t = threading.Thread(target=peer)
        t.start()
        r.rpush("warren", json.dumps({"func": "add_there", "ct": "pyside", "cb": "cb2", "args": [2, 3]}))
        t.join(15)
        assert len(calls) == 1, w.tail()
        assert (calls[0]["func"], calls[0]["args"], calls[0]["ct"]) == ("add", [2, 3], "warren"), calls
        assert calls[0]["cb"].startswith("warren.cb."), calls
        reply = r.blpop("pyside", timeout=10)[1]
        # add_there returned the peer's return values, [5]: one value, so args is [[5]]
        assert json.loads(reply) == {"func": "cb2", "ct": "warren", "cb": "", "args": [[5]]}, w.tail()
    finally:
        broker.close()

"""Plugins in the real binary (docs/plugins.md): a user writes a .lua, .py or .so file, points the
config or the command line at it, and `warren` serves it — and reloads it when the file changes.

- Channel handlers: ffown's echo plugins (the fixtures of crates/warren-plugin) in Lua and Python
  and the C example (compiled here with `cc`) answer the line protocol's vectors
  (docs/protocols/line.md), from a config file (a path relative to the file) and from
  `--listen 'line://…?plugin=…'`.
- Modules: the issue's `Greeter` (`HD_Hello`) in Lua and Python, over MQTT (paho-mqtt), pomelo
  (the raw client of test_cross_protocol.py) and JSON over WebSocket (websocket-client), from a
  `[[module]]` with `plugin` and from `--module Greeter=PATH`; an error raised by a handler is the
  error reply; a Lua loop that never ends is stopped, its caller answered with an error, and the
  node goes on serving; one session's pipelined calls run one after the other, in order (Python
  hands them to its threads a run at a time), a push in the middle of a run before its reply.
- Reloads: 20 rewrites of a module plugin while `warren bench request` runs against it, with no
  failed request; a broken edit keeps the running version (the log names the file and line);
  a line client's connection stays open across a reload, without `handle_broken`.
- `check-config` reports a missing plugin, an unknown suffix and a syntax error with the
  plugin's file and line.
"""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import threading
from pathlib import Path

import pytest

from chat import ChatClient
from conftest import REPO_ROOT, Warren, free_port, port_open, wait_until, warren_bin
from test_cross_protocol import JsonWsClient, PomeloRaw

FIXTURES = REPO_ROOT / "crates" / "warren-plugin" / "tests" / "fixtures"
ECHO_C = REPO_ROOT / "examples" / "plugins" / "echo_c" / "echo.c"
WAIT_S = 10.0

# ---- plugins written by the tests ---------------------------------------------------------------

# The issue's Greeter, word for word.
ISSUE_GREETER = {
    "lua": 'function HD_Hello(session, msg) session:push("Greeter/OnHello", msg) return "hello " .. msg end\n',
    "py": 'def HD_Hello(session, msg): session.push("Greeter/OnHello", msg); return "hello " + msg\n',
}

# A Greeter for every protocol, loaded with msg_type = "json": the name is the body itself (a JSON
# string: MQTT default mode, pomelo), its "name" (an object, as mqant mode requires) or its first
# element (JSON-WS passes its args array). Besides HD_Hello: an echo for the benchmark, a handler
# that fails, and (Lua) one that never ends.
GREETER = {
    "lua": """
local function name_of(msg)
  if type(msg) == "table" then return msg.name or msg[1] end
  return msg
end

function HD_Hello(session, msg)
  local name = name_of(msg)
  session:push("Greeter/OnHello", { name = name })
  return "hello " .. name
end

function HD_Echo(session, msg) return msg end

function HD_Fail(session, msg) error("bad input: " .. name_of(msg)) end

function HD_Spin(session, msg)
  local n = 0
  while true do n = n + 1 end
end

function HD_Version(session, msg) return VERSION end

VERSION = "v0"
""",
    "py": """
def _name(msg):
    if isinstance(msg, dict):
        return msg.get("name")
    if isinstance(msg, list):
        return msg[0]
    return msg


def HD_Hello(session, msg):
    name = _name(msg)
    session.push("Greeter/OnHello", {"name": name})
    return "hello " + name


def HD_Echo(session, msg):
    return msg


def HD_Fail(session, msg):
    raise ValueError("bad input: " + _name(msg))


def HD_Version(session, msg):
    return VERSION


VERSION = "v0"
""",
}

GREETER_HANDLERS = ["HD_Hello", "HD_Echo", "HD_Fail", "HD_Version"]


def greeter_handlers(kind: str) -> list[str]:
    """The Greeter's handlers of `kind` (a Python loop is not stopped: only Lua has HD_Spin)."""
    return GREETER_HANDLERS + (["HD_Spin"] if kind == "lua" else [])


def greeter(kind: str, version: str = "v0") -> str:
    """The every-protocol Greeter in `kind`, answering `HD_Version` with `version`."""
    return GREETER[kind].replace('VERSION = "v0"', f'VERSION = "{version}"')


def save_by_rename(path: Path, text: str) -> None:
    """Replace `path` as editors that save by rename do: a new file beside it, renamed over it."""
    tmp = path.with_name(f".{path.name}.swp")
    tmp.write_text(text)
    tmp.rename(path)


# ---- helpers ------------------------------------------------------------------------------------


def serve_config(tmp_path: Path, text: str, *args: str, ports: list[int] = (), **kw) -> Warren:
    """`warren serve --config <tmp_path>/warren.toml` with `text`, ready on `ports`."""
    cfg = tmp_path / "warren.toml"
    cfg.write_text(text)
    w = Warren("--config", str(cfg), *args, **kw).wait_ready()
    for p in ports:
        wait_until(lambda: port_open(p) or not w.running(), WAIT_S, msg=f"port {p} not open\n{w.tail()}")
    assert w.running(), w.tail()
    return w


def line_exchange(port: int, sends: list[bytes], want: bytes) -> bytes:
    """Send `sends` (one write each) on a new line connection; read `len(want)` bytes back."""
    with socket.create_connection(("127.0.0.1", port), timeout=WAIT_S) as s:
        for chunk in sends:
            s.sendall(chunk)
        got = b""
        while len(got) < len(want):
            more = s.recv(65536)
            assert more, f"closed after {got!r}"
            got += more
        return got


class LineConn:
    """One line connection kept open: send a message, read the next `<len> \\r\\n<body>`."""

    def __init__(self, port: int) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=WAIT_S)
        self.buf = b""

    def ask(self, msg: bytes) -> bytes:
        self.sock.sendall(str(len(msg)).encode() + b"\r\n" + msg)
        while True:
            if b" \r\n" in self.buf:
                head, rest = self.buf.split(b" \r\n", 1)
                n = int(head)
                if len(rest) >= n:
                    self.buf = rest[n:]
                    return rest[:n]
            more = self.sock.recv(65536)
            assert more, f"line connection closed after {self.buf!r}"
            self.buf += more

    def close(self) -> None:
        self.sock.close()


def check_config(path: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(warren_bin()), "check-config", str(path)],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )


@pytest.fixture(scope="module")
def echo_c(tmp_path_factory) -> Path:
    """The C example plugin (ffown's "oh nice"), compiled with the machine's `cc`."""
    cc = shutil.which("cc")
    assert cc, "a C compiler (cc) is needed for the native plugin"
    out = tmp_path_factory.mktemp("echo_c") / "libecho_c.so"
    subprocess.run([cc, "-shared", "-fPIC", "-I", str(REPO_ROOT / "include"), "-o", str(out), str(ECHO_C)], check=True)
    return out


def plugin_file(kind: str, echo_c: Path) -> Path:
    return {"lua": FIXTURES / "echo.lua", "python": FIXTURES / "echo.py", "native": echo_c}[kind]


# ---- channel handlers ---------------------------------------------------------------------------

# docs/protocols/line.md, "Echo handler": what the client sends (one write each), what comes back
ECHO_VECTORS = [
    ([b"5\r\nhello"], b"5 \r\nhello"),
    ([b"5\nhello"], b"5 \r\nhello"),
    ([b"11\r\nhello world"], b"11 \r\nhello world"),
    ([b"3 cmd key\r\nabc"], b"3 \r\nabc"),
    ([b"\r\n5\r\nhello"], b"5 \r\nhello"),
    ([b"2\r\nhi3\r\nabc"], b"2 \r\nhi3 \r\nabc"),
    ([b"5\r\n", b"hello\r\n"], b"5 \r\nhello"),
    ([b"0\r\n"], b"0 \r\n"),
    ([b"a b c d\r\n"], b"7 \r\nERROR\r\n"),
]


@pytest.mark.parametrize("how", ["config", "listen"])
@pytest.mark.parametrize("kind", ["lua", "python", "native"])
def test_echo_plugins_answer_the_line_vectors(kind: str, how: str, tmp_path: Path, echo_c: Path):
    source = plugin_file(kind, echo_c)
    port = free_port()
    if how == "config":
        # a path relative to the config file's directory
        (tmp_path / "plugins").mkdir()
        shutil.copy(source, tmp_path / "plugins" / source.name)
        w = serve_config(
            tmp_path,
            f'[[listener]]\nprotocol = "line"\naddr = "127.0.0.1:{port}"\nplugin = "plugins/{source.name}"\n',
            ports=[port],
        )
    else:
        w = Warren(listen=[f"line://127.0.0.1:{port}?plugin={source}"]).wait_ready()
    if kind == "native":
        # the C example answers every message with "oh nice", as ffown's example plugin did
        assert line_exchange(port, [b"5\r\nhello"], b"7 \r\noh nice") == b"7 \r\noh nice"
        assert line_exchange(port, [b"2\r\nhi3\r\nabc"], b"7 \r\noh nice" * 2) == b"7 \r\noh nice" * 2
    else:
        for sends, want in ECHO_VECTORS:
            assert line_exchange(port, sends, want) == want, (kind, sends)
    assert f"listening line tcp://127.0.0.1:{port}" in w.stdout()
    assert "plugin loaded" in w.log(), w.tail()


# ---- modules ------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["lua", "py"])
def test_the_issues_greeter_over_mqtt(kind: str, tmp_path: Path):
    """`ann` to `Greeter/HD_Hello/1`: the push `ann`, then `{"Error":"","Result":"hello ann"}`."""
    (tmp_path / f"greeter.{kind}").write_text(ISSUE_GREETER[kind])
    port = free_port()
    w = serve_config(
        tmp_path,
        f'[[listener]]\naddr = "127.0.0.1:{port}"\n\n'
        f'[[module]]\ntype = "Greeter"\nplugin = "greeter.{kind}"\nlogin_handlers = ["HD_Hello"]\n',
        ports=[port],
    )
    with ChatClient(port) as c:
        raw = c.request("Greeter/HD_Hello/1", "ann", raw=True)
        assert raw == b'{"Error":"","Result":"hello ann"}'
        history = [(m.kind, m.topic, m.raw) for m in c.history()]
        assert history == [("push", "Greeter/OnHello", b"ann"), ("reply", "Greeter/HD_Hello/1", raw)], history
    assert w.running()


def greeter_node(kind: str, how: str, tmp_path: Path, *extra: str) -> Warren:
    """A node running the every-protocol Greeter of `kind` (from a `[[module]]` or `--module`)
    with mqant-mode MQTT, pomelo and JSON-WS listeners."""
    path = tmp_path / f"greeter.{kind}"
    path.write_text(greeter(kind))
    listen = ["mqtt+mqant", "pomelo://127.0.0.1:{port}?heartbeat_s=0", "json+ws://127.0.0.1:{port}"]
    handlers = ",".join(greeter_handlers(kind))
    if how == "module-flag":
        return Warren(
            "--no-demo-modules", "--module", f"Greeter={path}?login_handlers={handlers}&msg_type=json", *extra, listen=listen
        ).wait_ready()
    listed = ", ".join(f'"{h}"' for h in greeter_handlers(kind))
    text = f'[[module]]\ntype = "Greeter"\nplugin = "{path.name}"\nlogin_handlers = [{listed}]\nmsg_type = "json"\n'
    (tmp_path / "warren.toml").write_text(text)
    return Warren("--config", str(tmp_path / "warren.toml"), *extra, listen=listen).wait_ready()


@pytest.mark.parametrize("how", ["config", "module-flag"])
@pytest.mark.parametrize("kind", ["lua", "py"])
def test_a_plugin_module_on_mqtt_pomelo_and_json_ws(kind: str, how: str, tmp_path: Path):
    w = greeter_node(kind, how, tmp_path)
    # MQTT in mqant mode: a JSON object body; the push comes before the reply
    with ChatClient(w.ports["mqtt+mqant"]) as c:
        assert c.request("Greeter/HD_Hello/1", {"name": "ann"}) == {"Error": "", "Result": "hello ann"}
        assert c.history()[0].topic == "Greeter/OnHello" and c.history()[0].body == {"name": "ann"}
        assert c.request("Greeter/HD_Echo/2", {"a": [1, 2]}) == {"Error": "", "Result": {"a": [1, 2]}}
    # pomelo: route Greeter.HD_Hello
    p = PomeloRaw(w.ports["pomelo"])
    try:
        p.start()
        assert p.request("Greeter.HD_Hello", "bob") == "hello bob"
        assert json.loads(p.push("Greeter.OnHello")) == {"name": "bob"}
        assert p.request("Greeter.HD_Fail", "x") == {"code": 500, "msg": "bad input: x"}
    finally:
        p.close()
    # JSON over WebSocket: args are the body
    j = JsonWsClient(w.ports["json+ws"], "cid")
    try:
        assert j.call("Greeter", "HD_Hello", ["cid"], "h1") == {"tpc": "", "func": "h1", "cb": "", "args": ["hello cid"]}
        pushed = j._wait(lambda m: m["tpc"] == "Greeter" and m["func"] == "OnHello", "push Greeter/OnHello")
        assert json.loads(pushed)["args"] == [{"name": "cid"}]
    finally:
        j.close()


@pytest.mark.parametrize("kind", ["lua", "py"])
def test_the_module_flag_alone_runs_a_plugin_as_a_module_type(kind: str, tmp_path: Path):
    """`--module Greeter=PATH` beside the demo's Login: in mqant mode `HD_` handlers are
    client-visible once logged in, and a text plugin gets the body as it was sent."""
    path = tmp_path / f"greeter.{kind}"
    path.write_text(ISSUE_GREETER[kind])
    w = Warren("--module", f"Greeter={path}", listen=["mqtt+mqant"]).wait_ready()
    with ChatClient(w.mqtt_mqant) as c:
        refused = c.request("Greeter/HD_Hello/1", {"name": "ann"})
        assert refused["Result"] is None and refused["Error"], refused
        assert c.login("alice")["Error"] == ""
        assert c.request("Greeter/HD_Hello/2", {"name": "ann"}) == {"Error": "", "Result": 'hello {"name":"ann"}'}


@pytest.mark.parametrize("kind", ["lua", "py"])
def test_an_error_in_a_handler_is_the_error_reply(kind: str, tmp_path: Path):
    w = greeter_node(kind, "config", tmp_path)
    with ChatClient(w.mqtt_mqant) as c:
        assert c.request("Greeter/HD_Fail/1", {"name": "x"}) == {"Error": "bad input: x", "Result": None}
        # the node and the module go on serving
        assert c.request("Greeter/HD_Hello/2", {"name": "y"})["Result"] == "hello y"
    if kind == "py":
        wait_until(lambda: "Traceback" in w.log() or "ValueError" in w.log(), 5, msg=w.tail())


# One session's calls, pipelined: each handler appends its body to the session's list and
# answers with the list so far; every third one also pushes (a wait on the node in the middle of
# a run of calls).
SEQUENCE = {
    "lua": """
SEEN = {}
function HD_Add(session, msg)
  local got = SEEN[session.id] or {}
  SEEN[session.id] = got
  got[#got + 1] = msg
  if #got % 3 == 0 then session:push("Seq/OnThird", msg) end
  return table.concat(got, ",")
end
""",
    "py": """
SEEN = {}
def HD_Add(session, msg):
    got = SEEN.setdefault(session.id, [])
    got.append(msg)
    if len(got) % 3 == 0:
        session.push("Seq/OnThird", msg)
    return ",".join(got)
""",
}


@pytest.mark.parametrize("kind", ["lua", "py"])
def test_a_sessions_pipelined_calls_run_one_after_the_other_in_order(kind: str, tmp_path: Path):
    """60 requests sent back to back by each of two clients: every reply shows exactly the calls
    before it (no two ran at once, none out of order), and every third pushed before its reply."""
    (tmp_path / f"seq.{kind}").write_text(SEQUENCE[kind])
    port = free_port()
    # each Lua state of a pool has globals of its own: one state, so that SEEN is one table
    # (Python's threads share one interpreter)
    workers = "workers = 1\n" if kind == "lua" else ""
    serve_config(
        tmp_path,
        f'[[listener]]\naddr = "127.0.0.1:{port}"\n\n'
        f'[[module]]\ntype = "Seq"\nplugin = "seq.{kind}"\nlogin_handlers = ["HD_Add"]\n{workers}',
        ports=[port],
    )
    n = 60
    with ChatClient(port) as a, ChatClient(port) as b:
        for c in (a, b):
            with c._cond:
                c._request_topics.update(f"Seq/HD_Add/{i}" for i in range(n))
        for i in range(n):
            for c in (a, b):
                c.mqtt.publish(f"Seq/HD_Add/{i}", str(i).encode(), qos=0)
        for c in (a, b):
            wait_until(lambda: sum(m.kind == "reply" for m in c.history()) == n, WAIT_S, msg=f"{n} replies")
            replies = {m.topic: m.raw for m in c.history() if m.kind == "reply"}
            for i in range(n):
                want = ",".join(str(k) for k in range(i + 1))
                assert json.loads(replies[f"Seq/HD_Add/{i}"]) == {"Error": "", "Result": want}
            order = [(m.kind, m.topic, m.raw) for m in c.history()]
            for i in range(2, n, 3):
                pushed = order.index(("push", "Seq/OnThird", str(i).encode()))
                replied = next(k for k, o in enumerate(order) if o[1] == f"Seq/HD_Add/{i}")
                assert pushed < replied, (i, order[pushed - 2 : replied + 2])


def test_a_runaway_lua_handler_is_stopped_and_the_node_serves_on(tmp_path: Path):
    w = greeter_node("lua", "config", tmp_path)
    with ChatClient(w.mqtt_mqant) as spinner, ChatClient(w.mqtt_mqant) as other:
        spun: dict = {}
        t = threading.Thread(target=lambda: spun.update(reply=spinner.request("Greeter/HD_Spin/1", {"name": "loop"}, timeout=30)))
        t.start()
        # the other workers answer meanwhile
        assert other.request("Greeter/HD_Hello/1", {"name": "z"})["Result"] == "hello z"
        t.join(40)
        # the loop was stopped: its caller got an error, not silence
        reply = spun.get("reply")
        assert reply is not None and reply["Result"] is None and reply["Error"], spun
        assert spinner.request("Greeter/HD_Hello/2", {"name": "after"})["Result"] == "hello after"
    assert w.running()
    assert "runaway Lua call stopped" in w.log(), w.tail()


# ---- reloads ------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["lua", "py"])
def test_twenty_reloads_under_load_fail_no_request(kind: str, tmp_path: Path):
    path = tmp_path / f"greeter.{kind}"
    path.write_text(greeter(kind, "v0"))
    port = free_port()
    listed = ", ".join(f'"{h}"' for h in GREETER_HANDLERS)
    w = serve_config(
        tmp_path,
        f'[[listener]]\naddr = "127.0.0.1:{port}"\n\n[plugins]\ndebounce_ms = 50\n\n'
        f'[[module]]\ntype = "Greeter"\nplugin = "{path.name}"\nlogin_handlers = [{listed}]\nmsg_type = "json"\n',
        ports=[port],
    )
    bench = subprocess.Popen(
        [
            str(warren_bin()), "bench", "request", "--target", f"127.0.0.1:{port}", "--route", "Greeter/HD_Echo",
            "--clients", "4", "--inflight", "4", "--duration", "10", "--warmup", "0.5", "--threads", "1",
            "--json", "--quiet",
        ],
        cwd=REPO_ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        with ChatClient(port) as c:
            for i in range(1, 21):
                save_by_rename(path, greeter(kind, f"v{i}"))
                want = f"v{i}"
                wait_until(
                    lambda: c.request("Greeter/HD_Version", {})["Result"] == want,
                    WAIT_S,
                    msg=f"version {want} never answered\n{w.tail()}",
                )
            assert bench.poll() is None, "the benchmark ended before the 20 reloads did; lengthen it"
        out, err = bench.communicate(timeout=90)
    finally:
        if bench.poll() is None:
            bench.kill()
    assert bench.returncode == 0, err
    report = json.loads(out.strip().splitlines()[-1])
    assert report["errors"] == 0, report
    assert report["error_replies"] == 0, report
    assert report["requests_per_s"] > 0, report
    log = w.log()
    assert log.count("plugin file changed: version") >= 20, w.tail()


@pytest.mark.parametrize("kind", ["lua", "py"])
def test_a_broken_edit_keeps_the_running_version(kind: str, tmp_path: Path):
    w = greeter_node(kind, "config", tmp_path)
    path = tmp_path / f"greeter.{kind}"
    with ChatClient(w.mqtt_mqant) as c:
        save_by_rename(path, greeter(kind, "v1"))
        wait_until(lambda: c.request("Greeter/HD_Version/1", {})["Result"] == "v1", WAIT_S, msg=w.tail())
        broken = greeter(kind, "v2").replace("return msg", "return msg +", 1)
        save_by_rename(path, broken)
        line = next(i for i, ln in enumerate(broken.splitlines(), 1) if "return msg +" in ln)
        wait_until(lambda: "does not load" in w.log(), WAIT_S, msg=w.tail())
        failure = next(ln for ln in w.log().splitlines() if "does not load" in ln)
        # the file and a line (Lua names where the expression ends, Python where it is broken)
        assert f"{path}:" in failure, failure
        assert any(f"{path}:{n}:" in failure for n in (line, line + 1)), failure
        # the old version answers
        assert c.request("Greeter/HD_Version/2", {})["Result"] == "v1"
        assert c.request("Greeter/HD_Hello/3", {"name": "still"})["Result"] == "hello still"


def test_a_line_connection_stays_open_across_reloads(tmp_path: Path):
    path = tmp_path / "hot.lua"
    body = (
        'function handle_msg(id, msg)\n'
        '  if msg == "id" then channel.send(id, tostring(id)) else channel.send(id, "{v} " .. msg) end\n'
        "end\n"
        'function handle_broken(id) print("broken " .. id) end\n'
    )
    path.write_text(body.format(v="v1"))
    port = free_port()
    w = serve_config(
        tmp_path,
        f'[plugins]\ndebounce_ms = 50\n\n[[listener]]\nprotocol = "line"\naddr = "127.0.0.1:{port}"\nplugin = "hot.lua"\n',
        ports=[port],
    )
    c = LineConn(port)
    me = c.ask(b"id").decode()
    assert c.ask(b"a") == b"v1 a"
    for v in ("v2", "v3"):
        save_by_rename(path, body.format(v=v))
        wait_until(lambda: c.ask(b"x").startswith(v.encode()), WAIT_S, msg=w.tail())
    assert c.ask(b"b") == b"v3 b"
    assert f"broken {me}\n" not in w.stdout(), "a reload told the plugin the connection broke"
    c.close()
    # the one real disconnect is reported, by the version the channel was on
    wait_until(lambda: f"broken {me}\n" in w.stdout(), WAIT_S, msg=w.tail())


def test_watching_can_be_turned_off(tmp_path: Path):
    (tmp_path / "greeter.lua").write_text(ISSUE_GREETER["lua"])
    w = serve_config(tmp_path, '[plugins]\nwatch = false\n\n[[module]]\ntype = "Greeter"\nplugin = "greeter.lua"\n')
    assert "module plugin loaded" in w.log(), w.tail()
    assert "watching the plugin file" not in w.log(), w.tail()


# ---- check-config -------------------------------------------------------------------------------


def test_check_config_names_plugins_that_do_not_load(tmp_path: Path):
    (tmp_path / "broken.lua").write_text("function HD_Hello(session, msg)\n  return 'hi' ..\nend\n")
    (tmp_path / "ok.py").write_text(ISSUE_GREETER["py"])
    cfg = tmp_path / "warren.toml"
    cfg.write_text(
        '[[listener]]\nprotocol = "line"\naddr = "127.0.0.1:10241"\nplugin = "missing.lua"\n\n'
        '[[module]]\ntype = "Greeter"\nplugin = "broken.lua"\n\n'
        '[[module]]\ntype = "Other"\nplugin = "other.rb"\n\n'
        '[[module]]\ntype = "Py"\nplugin = "ok.py"\n'
    )
    r = check_config(cfg)
    assert r.returncode == 1, r
    lines = r.stderr.strip().splitlines()
    assert lines == [
        f"{cfg}:4:10: listener[0].plugin: {tmp_path}/missing.lua: no such file",
        f"{cfg}:8:10: module[0].plugin: {tmp_path}/broken.lua:3: unexpected symbol near 'end'",
        f"{cfg}:12:10: module[1].plugin: {tmp_path}/other.rb: unknown plugin kind (the file name must end in .lua, .py, .so, .dylib or .dll)",
    ], r.stderr
    # fixed, it passes
    (tmp_path / "broken.lua").write_text(ISSUE_GREETER["lua"])
    cfg.write_text('[[module]]\ntype = "Greeter"\nplugin = "broken.lua"\n\n[[module]]\ntype = "Py"\nplugin = "ok.py"\n')
    r = check_config(cfg)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == f"ok: {cfg}"

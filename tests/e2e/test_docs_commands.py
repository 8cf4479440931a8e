"""The shell blocks of docs/, examples/ and fuzz/, run as written: verbatim and in the order shown.

Each block runs in a `Shell` of docblocks.py (read its docstring: a fresh network namespace, so
the docs' default ports are free; `warren` is the binary under test; servers stay up as in a
terminal and must exit 0 on Ctrl-C). Where a doc's text around a block says what happens (what
a sample prints, which node joins), the test checks that too.

`INVENTORY` names every ```sh block of README.md, docs/**/*.md, examples/**/README.md and
fuzz/README.md and the test that runs it; `test_every_shell_block_is_accounted_for` fails when a
block is added, changed at its first line or removed without the inventory following. The
blocks not run here, and why:

- docs/benchmarks.md, `bench/compare …` (all three blocks): measurement runs of several minutes each
  on a quiet machine (every scenario against every installed broker, 3 runs); the first rewrites
  docs/benchmarks.md itself. They are how the published figures were made, not a check.
- docs/benchmarks.md, the plugin benchmark (`taskset -c 0 target/release/warren serve …`): a
  measurement run of a minute on a quiet machine; tests/e2e/test_plugins.py serves the same kind of
  plugin modules and drives `warren bench request` at them.
- docs/cluster.md, the RabbitMQ line of "The same example on another broker": it needs a
  RabbitMQ on its default port, and Debian's `rabbitmq-server` started as it is shares
  /var/lib/rabbitmq with any broker the machine already runs; the AMQP bus is tested against a
  private broker by test_cluster.py. The Redis lines of that block run, against `redis-server`,
  the block's other broker.
- fuzz/README.md: scripts/test runs every fuzz target the way the block shows
  (`cargo fuzz run <target> --sanitizer none -- -max_total_time=$FUZZ_SECONDS`).
- README.md's blocks run in test_readme.py, docs/security.md's in test_docs_security.py.

Two conventions of the blocks: alternatives shown one per line (line.md's echo and router
listeners, pomelo-rpc.md's two framings) each start the demo's listeners too, so they run one
after the other, each stopped with Ctrl-C before the next; examples/chat/client/README.md's
"Scripting example" names `chat_client.py` as seen from its own directory, and runs there, with
the server of its "Install and run" block still up.
"""

from __future__ import annotations

import json
import re
import shlex
import shutil
from pathlib import Path

import pytest

from conftest import REPO_ROOT, wait_until
from docblocks import Shell, Step, Terminal, blocks, chat_through, commands, find_block, nodes_joined, wait_normalized

DOCS = REPO_ROOT / "docs"
PROTOCOLS = DOCS / "protocols"
CLIENT_README = REPO_ROOT / "examples" / "chat" / "client" / "README.md"
NODE_MODULES = REPO_ROOT / "tests" / "node" / "node_modules"

# (file, first line of the block) -> the test that runs it, or why it is not run
INVENTORY: dict[tuple[str, str], str] = {
    ("README.md", "cargo run --release -- serve     # the chat demo"): "test_readme.py",
    ("README.md", "python3 examples/chat/client/chat_client.py --user carol"): "test_readme.py",
    ("README.md", "cargo run --release -- serve --listen mqtt://127.0.0.1:1884"): "test_readme.py",
    ("README.md", "cargo run --release -- serve --listen pomelo://127.0.0.1:3010"): "test_readme.py",
    ("README.md", "warren print-default-config > warren.toml"): "test_readme.py",
    ("README.md", "nats-server -js &"): "test_readme.py",
    ("docs/security.md", "openssl req -x509"): "test_docs_security.py",
    ("docs/benchmarks.md", "cargo build --release -p warren-cli"): "test_warren_bench_as_documented",
    ("docs/benchmarks.md", "bench/compare                      # every scenario"): "not run: a measurement run of minutes that rewrites docs/benchmarks.md",
    ("docs/benchmarks.md", "bench/compare --only fanout100,1to1,request,idle"): "not run: a measurement run of minutes",
    ("docs/benchmarks.md", "git worktree add --detach /tmp/warren-before"): "not run: a release build and measurement runs of minutes (the issue 12 baseline)",
    ("docs/benchmarks.md", "bench/compare --wait-quiet --only request,request16"): "not run: measurement runs of minutes (issue 12, after the rework)",
    ("docs/benchmarks.md", "taskset -c 0 target/release/warren serve --no-http"): "not run: a measurement run of a minute (plugins, issue 13)",
    ("docs/benchmarks.md", "bench/compare --wait-quiet --only qos1-1to1"): "not run: measurement runs of minutes (MQTT QoS 1 and the store, issue 14)",
    ("docs/benchmarks.md", "for run in 1 2 3; do target/release/warren bench backend --json; done"): "test_backend_bench_as_documented",
    ("docs/cluster.md", "nats-server -js"): "test_cluster_walk_with_target_release_warren",
    ("docs/cluster.md", "# terminal 1: the gate"): "test_cluster_walk_with_target_release_warren",
    ("docs/cluster.md", "warren serve --config examples/cluster/gate.toml --bus redis://"): "test_cluster_on_redis (the RabbitMQ line is not run)",
    ("docs/backends.md", "redis-server &"): "test_backends_gobase_sample",
    ("docs/protocols/mqtt.md", "warren serve --listen mqtt://127.0.0.1:1884"): "test_mqtt_try_it",
    ("docs/protocols/line.md", "warren serve --listen line://127.0.0.1:10241                    # echo handler"): "test_line_listeners",
    ("docs/protocols/line.md", "warren serve --listen line://127.0.0.1:10241 --listen"): "test_line_try_it_with_telnet",
    ("docs/protocols/json-ws.md", "warren serve --listen json+ws://127.0.0.1:23456"): "test_json_ws_try_it (both blocks)",
    ("docs/protocols/pomelo.md", "warren serve --listen 'pomelo://127.0.0.1:3010?heartbeat_s=10'"): "test_pomelo_listener",
    ("docs/protocols/pomelo.md", "warren serve --listen pomelo://127.0.0.1:3010"): "test_pomelo_try_it",
    ("docs/protocols/pomelo-rpc.md", "warren serve --module Echo --listen 'pomelo-rpc://127.0.0.1:3333?allow"): "test_pomelo_rpc_listeners",
    ("docs/protocols/pomelo-rpc.md", "warren serve --listen 'pomelo-rpc://127.0.0.1:3333?allow=127.0.0.1' --module Echo"): "test_pomelo_rpc_try_it",
    ("docs/plugins.md", "mkdir -p plugins"): "test_plugins_try_it",
    ("docs/plugins.md", "warren serve --config examples/chat-lua/chat.toml"): "test_admin_hotfix_walkthrough",
    ("docs/admin-api.md", "warren serve --config examples/chat-lua/chat.toml"): "test_admin_api_try_it",
    ("docs/operations.md", "warren check-config contrib/production.toml"): "test_contrib.py (test_production_config_passes_check_config_from_the_repository_root)",
    ("examples/chat/client/README.md", "python3 -m pip install"): "test_terminal_client_readme",
    ("examples/chat/client/README.md", "python3 chat_client.py --user alice"): "test_terminal_client_readme",
    ("examples/my-game/README.md", "cargo build --release"): "test_my_game.py (built with the real cargo, not the stand-in)",
    ("fuzz/README.md", "cargo fuzz run mqtt_decode"): "not run here: scripts/test fuzzes every target this way",
}


def documented_files() -> list[Path]:
    files = [REPO_ROOT / "README.md", REPO_ROOT / "fuzz" / "README.md"]
    files += sorted(DOCS.rglob("*.md"))
    files += sorted((REPO_ROOT / "examples").rglob("README.md"))
    return [f for f in files if f.is_file()]


def test_every_shell_block_is_accounted_for():
    found: dict[tuple[str, str], int] = {}
    for f in documented_files():
        rel = str(f.relative_to(REPO_ROOT))
        for b in blocks(f):
            keys = [k for k in INVENTORY if k[0] == rel and b.first.startswith(k[1])]
            assert keys, f"{b.name}: a ```sh block no test runs (first line {b.first!r}); run it or say why in INVENTORY"
            for k in keys:
                found[k] = found.get(k, 0) + 1
    missing = [k for k in INVENTORY if k not in found]
    assert not missing, f"INVENTORY names blocks that are gone: {missing}"


# ---- helpers -----------------------------------------------------------------------------------


def ports_in(cmd: str) -> list[int]:
    """The ports of the listener URLs in a command line."""
    return [int(p) for p in re.findall(r"[a-z+-]+://127\.0\.0\.1:(\d+)", cmd)]


def serving(sh: Shell, t: Terminal) -> None:
    """Every listener URL of the server command in `t` answers, and warren said so."""
    for port in ports_in(t.cmd):
        assert sh.port_open(port), f"nothing on {port}:\n{t.output()}"
        assert f"127.0.0.1:{port}" in t.output(), t.output()


def one_at_a_time(sh: Shell, steps: list[Step]) -> None:
    """Alternatives: each server started, checked, and stopped with Ctrl-C (exit 0) in turn."""
    for step in steps:
        (t,) = sh.walk([step]).values()
        serving(sh, t)
        assert t.interrupt() == 0, t.output()


def printed_in_order(output: str, lines: list[str]) -> None:
    """Each of `lines` is a line of `output`, in that order (other lines may come between)."""
    got = output.splitlines()
    at = 0
    for want in lines:
        assert want in got[at:], f"{want!r} not printed (after line {at}):\n{output}"
        at = got.index(want, at) + 1


def python_heredoc_expectations(cmd: str) -> list[list[str]]:
    """For each `print(...)  # text` of a Python heredoc, the fragments of `text` between `...`."""
    out = []
    for line in cmd.splitlines():
        m = re.match(r"\s*print\(.*\)\s+#\s*(.+)$", line)
        if m:
            out.append([f for f in m.group(1).split("...") if f.strip()])
    return out


def next_block(after, lang: str):
    """The first block tagged `lang` after block `after` in the same file."""
    return next(b for b in blocks(after.path, lang) if b.line > after.line)


def node_sample(sh: Shell, name: str, code: str) -> str:
    """Save `code` as `name` next to tests/node's node_modules (as the doc says), run
    `node <name>` there; its output."""
    if not NODE_MODULES.is_dir():
        pytest.skip("tests/node/node_modules is not installed (npm ci --prefix tests/node; scripts/test does it)")
    here = sh.dir / "node-sample"
    here.mkdir()
    (here / "node_modules").symlink_to(NODE_MODULES)
    (here / name).write_text(code)
    r = sh.run(f"node {name}", cwd=here, timeout=60)
    assert r.returncode == 0, r.stdout
    return r.stdout


# ---- docs/benchmarks.md ------------------------------------------------------------------------


def test_warren_bench_as_documented(tmp_path: Path):
    steps = commands(find_block(DOCS / "benchmarks.md", "cargo build --release -p warren-cli").lines)
    assert [s.cmd.split()[:2] for s in steps][1:] == [["target/release/warren", "serve"]] + [["target/release/warren", "bench"]] * 4
    with Shell(tmp_path, "bench") as sh:
        sh.walk(steps)
        for s in steps[2:]:
            last = json.loads(sh.outputs[s.cmd].strip().splitlines()[-1])
            assert last["errors"] == 0, last
        # `--pid $(pgrep -n warren)` found the server: its memory was read
        conns = json.loads(sh.outputs[steps[-1].cmd].strip().splitlines()[-1])
        assert conns["opened"] == 10000 and any(k.startswith("rss") for k in conns), conns


def test_backend_bench_as_documented(tmp_path: Path):
    steps = commands(find_block(DOCS / "benchmarks.md", "for run in 1 2 3; do target/release/warren bench backend").lines)
    assert len(steps) == 1, steps
    with Shell(tmp_path, "bench-backend") as sh:
        sh.walk(steps)
        runs = [json.loads(line) for line in sh.outputs[steps[0].cmd].strip().splitlines()]
        assert len(runs) == 3, runs
        for r in runs:
            assert r["scenario"] == "backend" and r["raw_rps"] > 0 and r["backend_rps"] > 0, r


# ---- docs/cluster.md ---------------------------------------------------------------------------


def test_cluster_walk_with_target_release_warren(tmp_path: Path):
    broker = commands(find_block(DOCS / "cluster.md", "nats-server -js").lines)
    walk = commands(find_block(DOCS / "cluster.md", "# terminal 1: the gate").lines)
    assert [s.cmd.split()[0] for s in broker + walk] == ["nats-server"] + ["target/release/warren"] * 3
    with Shell(tmp_path, "cluster") as sh:
        started = sh.walk(broker + walk)
        nodes_joined(started[walk[0].cmd], "chat1", "chat2")
        chat_through(sh)


def test_cluster_on_redis(tmp_path: Path):
    broker = find_block(DOCS / "cluster.md", "nats-server -js").first
    assert "redis-server" in broker, broker
    steps = commands(find_block(DOCS / "cluster.md", "warren serve --config examples/cluster/gate.toml --bus redis://").lines)
    redis = [s for s in steps if "redis://" in s.cmd]
    assert len(redis) == 2 and all("amqp://" in s.cmd for s in steps if s not in redis), steps
    with Shell(tmp_path, "cluster-redis") as sh:
        started = sh.walk([Step("redis-server")] + redis)
        nodes_joined(started[redis[0].cmd], "chat1")
        chat_through(sh)


def test_backends_gobase_sample(tmp_path: Path):
    steps = commands(find_block(DOCS / "backends.md", "redis-server &").lines)
    assert [s.cmd.split()[0] for s in steps] == ["redis-server", "python3", "python3", "warren"], steps
    with Shell(tmp_path, "backends") as sh:
        started = sh.walk(steps)
        # both services of the block are called, each round trip logged with its service
        node = started[steps[3].cmd]
        for sid in ("gate1", "gate2"):
            wait_until(
                lambda sid=sid: any("backend heartbeat answered" in line and f"service={sid}" in line for line in node.output().splitlines()),
                timeout=30,
                msg=f"no round trip to {sid} logged:\n{node.output()[-3000:]}",
            )


# ---- docs/protocols ----------------------------------------------------------------------------


def test_mqtt_try_it(tmp_path: Path):
    b = find_block(PROTOCOLS / "mqtt.md", "warren serve --listen mqtt://127.0.0.1:1884")
    steps = commands(b.lines)
    assert [s.cmd.split()[0] for s in steps] == ["warren", "mosquitto_sub", "mosquitto_pub", "python3"], steps
    with Shell(tmp_path, "mqtt") as sh:
        started = sh.walk(steps)
        # the subscriber got the publish
        started["mosquitto_sub -p 1884 -t 'sensors/#' -v"].wait_for("sensors/kitchen/temp 21.5")
        # the raw-socket request printed what its comments say
        said = sh.outputs[steps[3].cmd]
        expectations = python_heredoc_expectations(steps[3].cmd)
        assert len(expectations) == 2, expectations
        for fragments in expectations:
            for f in fragments:
                assert f.strip() in said, f"{f!r} not in {said!r}"


def test_line_listeners(tmp_path: Path):
    steps = commands(find_block(PROTOCOLS / "line.md", "warren serve --listen line://127.0.0.1:10241                    #").lines)
    assert len(steps) == 2, steps
    with Shell(tmp_path, "line") as sh:
        one_at_a_time(sh, steps)


LINE_TELNET = 'telnet 127.0.0.1 10241      # type 5, Enter, hello, Enter: the answer is "5 " and "hello"'


def line_telnet(sh: Shell, t: Terminal) -> None:
    t.wait_for("Connected to 127.0.0.1")
    t.type("5\n")
    t.type("hello\n")
    wait_normalized(t, "5 \nhello")
    t.end_input()
    assert t.wait() == 0, t.output()


def test_line_try_it_with_telnet(tmp_path: Path):
    steps = commands(find_block(PROTOCOLS / "line.md", "warren serve --listen line://127.0.0.1:10241 --listen").lines)
    assert [s.cmd for s in steps][1:] == [LINE_TELNET], steps
    with Shell(tmp_path, "line-telnet") as sh:
        started = sh.walk(steps, {LINE_TELNET: line_telnet})
        serving(sh, started[steps[0].cmd])


def test_json_ws_try_it(tmp_path: Path):
    found = [b for b in blocks(PROTOCOLS / "json-ws.md") if b.first.startswith("warren serve --listen json+ws://")]
    assert len(found) == 2 and found[0].lines == found[1].lines, found
    sample = next_block(found[1], "python")
    with Shell(tmp_path, "json-ws") as sh:
        started = sh.walk(commands(found[1].lines))
        serving(sh, started[found[1].first])
        # "Try it": the Python sample prints what its comments say
        r = sh.run("python3 -", stdin="\n".join(sample.lines).encode(), timeout=30)
        assert r.returncode == 0, r.stdout
        want = [re.match(r".*print\(.*\)\s+#\s*(.+)$", ln).group(1) for ln in sample.lines if re.match(r"\s*print\(.*\)\s+#", ln)]
        assert len(want) == 5, want
        assert r.stdout.splitlines() == want


def test_pomelo_listener(tmp_path: Path):
    steps = commands(find_block(PROTOCOLS / "pomelo.md", "warren serve --listen 'pomelo://127.0.0.1:3010?heartbeat_s=10'").lines)
    with Shell(tmp_path, "pomelo") as sh:
        one_at_a_time(sh, steps)


def test_pomelo_try_it(tmp_path: Path):
    b = find_block(PROTOCOLS / "pomelo.md", "warren serve --listen pomelo://127.0.0.1:3010")
    sample = next_block(b, "js")
    shown = next_block(sample, "")
    with Shell(tmp_path, "pomelo-try") as sh:
        started = sh.walk(commands(b.lines))
        serving(sh, started[b.first])
        out = node_sample(sh, "pomelo-demo.mjs", "\n".join(sample.lines) + "\n")
        assert out.splitlines() == shown.lines


def test_pomelo_rpc_listeners(tmp_path: Path):
    steps = commands(find_block(PROTOCOLS / "pomelo-rpc.md", "warren serve --module Echo --listen 'pomelo-rpc://127.0.0.1:3333?allow").lines)
    assert len(steps) == 2, steps
    with Shell(tmp_path, "pomelo-rpc") as sh:
        one_at_a_time(sh, steps)


def test_pomelo_rpc_try_it(tmp_path: Path):
    b = find_block(PROTOCOLS / "pomelo-rpc.md", "warren serve --listen 'pomelo-rpc://127.0.0.1:3333?allow=127.0.0.1' --module Echo")
    sample = next_block(b, "js")
    want = [m.group(1) for ln in sample.lines if (m := re.search(r"console\.log\(.*\);\s*//\s*(.+)$", ln))]
    assert want == ["null hello"], want
    with Shell(tmp_path, "pomelo-rpc-try") as sh:
        started = sh.walk(commands(b.lines))
        serving(sh, started[b.first])
        out = node_sample(sh, "rpc.mjs", "\n".join(sample.lines) + "\n")
        assert out.splitlines()[-1:] == want, out


# ---- docs/plugins.md: running plugins with warren ----------------------------------------------


def test_plugins_try_it(tmp_path: Path):
    steps = commands(find_block(DOCS / "plugins.md", "mkdir -p plugins").lines)
    assert [s.cmd.split()[0] for s in steps] == ["mkdir", "cat", "cat", "cat", "warren", "warren", "python3", "cat", "python3", "sed", "python3"], steps
    with Shell(tmp_path, "plugins") as sh:
        # every `# →` of the block is checked as it runs: the check, the line plugin's answer, the
        # module's reply, the reload in the server's log, the reply of the new version
        started = sh.walk(steps)
        (server,) = started.values()
        assert "module plugin loaded" in server.output() and "channel plugin loaded" in server.output(), server.output()
        # the push came before the reply
        said = sh.outputs["python3 hello.py"]
        assert said.index("Greeter/OnHello") < said.index("Greeter/HD_Hello/1"), said


# ---- docs/plugins.md: the admin API -------------------------------------------------------------

# The test's own client: a login to the Lua chat demo over MQTT, printing the reply envelope.
LOGIN_AS = (
    "python3 -c 'import json, sys; sys.path.insert(0, \"tests/e2e\"); from chat import ChatClient; "
    "c = ChatClient(3563); print(json.dumps(c.login(sys.argv[1]), separators=(\",\", \":\"))); c.close()' "
)


def test_admin_hotfix_walkthrough(tmp_path: Path):
    steps = commands(find_block(DOCS / "plugins.md", "warren serve --config examples/chat-lua/chat.toml").lines)
    assert len(steps) == 4, steps
    with Shell(tmp_path, "admin") as sh:

        def login(user: str) -> str:
            r = sh.run(LOGIN_AS + shlex.quote(user))
            assert r.returncode == 0, r.stdout
            return r.stdout.strip()

        # the demo, its plugin list, and the patch
        sh.walk(steps[:3])
        # "a client logging in as "" gets …": the patched handler answers
        assert login("") == '{"Error":"userName cannot be empty","Result":null}'
        assert login("alice") == '{"Error":"","Result":"login success alice"}'
        # the reload runs login.lua again: the patch is gone
        sh.walk(steps[3:])
        assert login("") == '{"Error":"","Result":"login success "}'


def test_admin_api_try_it(tmp_path: Path):
    steps = commands(find_block(DOCS / "admin-api.md", "warren serve --config examples/chat-lua/chat.toml").lines)
    assert len(steps) == 7, steps
    with Shell(tmp_path, "admin-api") as sh:
        sh.walk(steps)


# ---- examples/chat/client/README.md ------------------------------------------------------------

ALICE = "python3 examples/chat/client/chat_client.py --user alice"
BOB = "python3 examples/chat/client/chat_client.py --user bob --ws   # same room, over WebSocket"


def alice(sh: Shell, t: Terminal) -> None:
    t.wait_for("joined mqant as alice")


def bob(sh: Shell, t: Terminal) -> None:
    a = next(x for x in sh.terminals if x.cmd == ALICE)
    t.wait_for("joined mqant as bob")
    a.wait_for("* bob joined")
    t.type("hi\n")
    a.wait_for("[mqant] bob: hi")
    t.type("/w alice just you\n")
    a.wait_for("[mqant] bob (to alice): just you")
    t.type("/quit\n")
    assert t.wait() == 0, t.output()
    a.wait_for("* bob left")
    a.end_input()
    assert a.wait() == 0, a.output()


def test_terminal_client_readme(tmp_path: Path):
    install = find_block(CLIENT_README, "python3 -m pip install")
    steps = commands(install.lines)
    assert [s.foreground for s in steps][2:] == [ALICE, BOB], steps
    shown = next_block(install, "")
    script = commands(find_block(CLIENT_README, "python3 chat_client.py --user alice").lines)
    assert len(script) == 2 and script[0].background, script
    with Shell(tmp_path, "client") as sh:
        # Debian's own python3 refuses pip installs outside a virtualenv unless told otherwise:
        # the machine's policy, which scripts/test sets the same way for its own installs
        sh.env["PIP_BREAK_SYSTEM_PACKAGES"] = "1"
        sh.walk(steps, {ALICE: alice, BOB: bob})
        # "Output looks like": what alice's terminal showed
        printed_in_order(next(t for t in sh.terminals if t.cmd == ALICE).output(), shown.lines)
        # "Scripting example", from the client's directory, against the same server
        here = sh.work / "examples" / "chat" / "client"
        started = sh.walk(script, cwd=here)
        a = started[script[0].foreground]
        assert a.wait(timeout=40) == 0, a.output()
        printed_in_order(a.output(), ["* bob joined", "[mqant] bob: hello", "[mqant] bob (to alice): psst", "* bob left"])


def test_no_sample_needs_a_tool_the_suite_lacks():
    # the tools the blocks above call, beyond warren and Python: scripts/test installs them
    for tool in ("unshare", "nsenter", "ip", "telnet", "pgrep", "mosquitto_sub", "nats-server", "redis-server", "node", "curl"):
        assert shutil.which(tool), f"{tool} is not installed (scripts/test installs it)"

"""README.md, run as written: every ```sh block, verbatim and in the order shown.

Each block runs in a `Shell` of docblocks.py (read its docstring): a fresh network namespace, so
the README's own ports (3563, 3653, 8080, 1884, NATS on 4222 …) are free whatever this machine
runs; `warren` on PATH is the binary under test. A block that talks to a server another block
started (the terminal clients, after "Two commands") runs in that block's shell. Servers are
left running as in a terminal, and stopped with Ctrl-C at the end, which must exit 0.

`cargo run --release -- ARGS` runs the binary under test with ARGS, through a `cargo` stand-in
on PATH. Running cargo itself would not test the binary the suite tests: scripts/test builds
`cargo build --release -p warren-cli --features etcd,otel`, while `cargo run --release` at the
workspace root builds warren-cli with its default features (no etcd, no otel). That is a different build:
it takes minutes on a fresh clone, and it would overwrite target/release/warren, the binary every
other end-to-end test (the etcd ones included) runs, with one lacking the etcd registry. What
`cargo run` would start is checked instead (`test_cargo_run_starts_the_warren_binary`): the
workspace's default members have exactly one binary, warren-cli's `warren`, so `cargo run
--release -- ARGS` is `warren ARGS` built from this tree; the etcd and otel features only add the
etcd:// registry and the OTLP exporter, which no README command uses.

Beyond the commands: the addresses the "Two commands" comment gives answer; the output "A
five-minute tour" shows is what the demo prints (each shown line begins a printed line, in order:
the ready line goes on to name the bus and registry); the two terminal clients chat; telnet gets
the echo the comment shows; the cluster's gate logs both nodes joining and a chat goes through.

Not run: `scripts/test` ("Two commands") is the script that runs this test.
"""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

from conftest import REPO_ROOT
from docblocks import Shell, Terminal, chat_through, commands, find_block, nodes_joined, wait_normalized

README = REPO_ROOT / "README.md"


def block(first: str, lang: str = "sh"):
    return find_block(README, first, lang)


# ---- the demo and its terminal clients ---------------------------------------------------------

CAROL = "python3 examples/chat/client/chat_client.py --user carol          # MQTT over TCP"
DAVE = "python3 examples/chat/client/chat_client.py --user dave --ws      # MQTT over WebSocket"


def carol(sh: Shell, t: Terminal) -> None:
    t.wait_for("joined mqant as carol")


def dave(sh: Shell, t: Terminal) -> None:
    c = sh.terminals[-2]
    assert c.cmd == CAROL
    t.wait_for("joined mqant as dave (here: carol, dave)")
    c.wait_for("* dave joined")
    t.type("hello from dave\n")
    c.wait_for("[mqant] dave: hello from dave")
    c.type("hi dave\n")
    t.wait_for("[mqant] carol: hi dave")
    t.type("/quit\n")
    assert t.wait() == 0, t.output()
    c.wait_for("* dave left")
    c.type("/quit\n")
    assert c.wait() == 0, c.output()


def test_the_demo_serves_what_the_readme_says_and_the_terminal_clients_chat(tmp_path: Path):
    two = commands(block("cargo run --release -- serve     #").lines)
    assert [s.cmd.split()[0] for s in two] == ["cargo", "scripts/test"], two
    with Shell(tmp_path, "demo") as sh:
        (serve,) = sh.walk(two[:1]).values()
        # the comment's addresses answer
        said = re.findall(r"127\.0\.0\.1:(\d+)", two[0].cmd.split("#", 1)[1])
        assert len(said) == 3, two[0].cmd
        for port in said:
            assert sh.port_open(int(port)), f"nothing on {port}:\n{serve.output()}"
        # "A five-minute tour" shows the same command and what it prints
        tour = block("$ cargo run --release -- serve", "text").lines
        assert tour[0] == "$ " + two[0].cmd.split("#", 1)[0].strip()
        printed = serve.output().splitlines()
        at = 0
        for want in tour[1:]:
            hits = [i for i in range(at, len(printed)) if printed[i].startswith(want)]
            assert hits, f"the README shows {want!r}; warren printed:\n{serve.output()}"
            at = hits[0] + 1
        # "The same room from a terminal": two clients in two more terminals
        clients = commands(block("python3 examples/chat/client/chat_client.py --user carol").lines)
        assert [s.cmd for s in clients] == [CAROL, DAVE]
        sh.walk(clients, {CAROL: carol, DAVE: dave})


# ---- mosquitto through warren ------------------------------------------------------------------


def test_mosquitto_clients_chat_through_a_plain_mqtt_listener(tmp_path: Path):
    steps = commands(block("cargo run --release -- serve --listen mqtt://127.0.0.1:1884").lines)
    assert [s.cmd.split()[0] for s in steps] == ["cargo", "mosquitto_sub", "mosquitto_pub"], steps
    assert steps[-1].expected, "the block says what mosquitto_sub prints"
    with Shell(tmp_path, "mosquitto") as sh:
        sh.walk(steps)


# ---- every protocol ----------------------------------------------------------------------------

TELNET = "telnet 127.0.0.1 10241      # type 5, Enter, hello  →  5 \\r\\nhello (the echo channel handler)"


def telnet(sh: Shell, t: Terminal) -> None:
    t.wait_for("Connected to 127.0.0.1")
    t.type("5\n")
    t.type("hello")
    # the echo handler's answer `5 \r\nhello`; telnet shows the CR LF as a line break
    wait_normalized(t, "5 \nhello")
    t.end_input()
    assert t.wait() == 0, t.output()


def test_one_server_on_every_protocol_and_telnet_on_the_line_echo(tmp_path: Path):
    steps = commands(block("cargo run --release -- serve --listen pomelo://").lines)
    assert len(steps) == 2 and steps[1].cmd == TELNET, steps
    with Shell(tmp_path, "protocols") as sh:
        started = sh.walk(steps, {TELNET: telnet})
        serve = started[steps[0].cmd]
        urls = re.findall(r"'?([a-z+-]+://127\.0\.0\.1:(\d+)[^' ]*)'?", steps[0].cmd)
        assert len(urls) == 5, urls
        for url, port in urls:
            assert sh.port_open(int(port)), f"{url} does not answer:\n{serve.output()}"
        assert "Echo" in steps[0].cmd


# ---- a config file -----------------------------------------------------------------------------


def test_the_config_file_commands(tmp_path: Path):
    steps = commands(block("warren print-default-config > warren.toml").lines)
    assert [s.cmd.split()[1] for s in steps] == ["print-default-config", "check-config", "serve"], steps
    with Shell(tmp_path, "config") as sh:
        sh.walk(steps)
        assert sh.outputs[steps[1].cmd].startswith("ok"), sh.outputs[steps[1].cmd]
        assert (sh.work / "warren.toml").stat().st_size > 0


# ---- the cluster -------------------------------------------------------------------------------


def test_the_three_process_cluster_walk_and_a_chat_through_it(tmp_path: Path):
    steps = commands(block("nats-server -js &").lines)
    assert [s.cmd.split()[0] for s in steps] == ["nats-server", "warren", "warren", "warren"], steps
    with Shell(tmp_path, "cluster") as sh:
        started = sh.walk(steps)
        nodes_joined(started[steps[1].cmd], "chat1", "chat2")
        chat_through(sh)


# ---- what `cargo run` would run ----------------------------------------------------------------


def test_cargo_run_starts_the_warren_binary():
    meta = subprocess.run(
        ["cargo", "metadata", "--no-deps", "--format-version", "1", "--offline"],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert meta.returncode == 0, meta.stderr
    m = json.loads(meta.stdout)
    defaults = set(m.get("workspace_default_members") or m["workspace_members"])
    bins = [(p["name"], t["name"]) for p in m["packages"] if p["id"] in defaults for t in p["targets"] if "bin" in t["kind"]]
    assert bins == [("warren-cli", "warren")], bins
    # the stand-in maps only what the README runs; nothing there needs the etcd feature
    text = README.read_text()
    assert "etcd://" not in "".join(b for b in re.findall(r"```sh\n(.*?)```", text, re.S))

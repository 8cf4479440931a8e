"""`warren check-config` and the command line's config errors, against the real binary.

A config with several mistakes is reported whole, one `FILE:LINE:COL: key: why` line each, so an
operator fixes them in one pass; a file that cannot be read says why; two listeners the OS would
not both bind are refused before anything starts; `--listen` errors carry one prefix; and a
listener URL can carry the map and list settings a config file can.
"""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
from pathlib import Path

import pytest

from conftest import REPO_ROOT, Warren, free_port, port_open, wait_until, warren_bin


def run(*args: str, timeout: float = 20) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(warren_bin()), *args],
        cwd=REPO_ROOT,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def check(tmp_path: Path, text: str) -> tuple[subprocess.CompletedProcess, Path]:
    path = tmp_path / "warren.toml"
    path.write_text(text)
    return run("check-config", str(path)), path


# ---------------------------------------------------------------------------------------------
# every mistake, one line each
# ---------------------------------------------------------------------------------------------


def test_every_schema_mistake_is_reported_one_line_each(tmp_path: Path):
    text = "\n".join(
        [
            "[node]",
            'idd = "a"',  # 2: typo
            "",
            "[[listener]]",
            'adr = "127.0.0.1:1"',  # 5: typo
            'max_conn = "many"',  # 6: wrong type
            "",
            "[[listener]]",
            'protocl = "mqtt"',  # 9: typo
            "",
        ]
    )
    res, path = check(tmp_path, text)
    assert res.returncode == 1, res
    lines = res.stderr.strip().splitlines()
    assert lines == [
        f"{path}:2:1: node.idd: unknown key `idd`, did you mean `id`?",
        f"{path}:5:1: listener[0].adr: unknown key `adr`, did you mean `addr`?",
        f'{path}:6:12: listener[0].max_conn: invalid type: string "many", expected usize',
        f"{path}:9:1: listener[1].protocl: unknown key `protocl`, did you mean `protocol`?",
    ], res.stderr
    assert res.stdout == ""


def test_every_value_mistake_is_reported_one_line_each(tmp_path: Path):
    text = "\n".join(
        [
            "[[listener]]",
            f'addr = "127.0.0.1:{free_port()}"',
            "push_qos = 2",  # 3
            "",
            "[[module]]",
            'type = "Chatt"',  # 6
            "",
            "[[module]]",
            'type = "Chat"',
            "[module.settings]",
            'flavour = "v9"',  # the module's own check: placed at its [[module]] (line 8)
            "",
            "[bus]",
            'url = "kafka://x"',  # 14
            "",
        ]
    )
    res, path = check(tmp_path, text)
    assert res.returncode == 1, res
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 4, res.stderr
    assert lines[0] == f"{path}:3:12: listener[0].push_qos: must be 0 or 1, got 2"
    assert lines[1] == f'{path}:6:8: module[0].type: unknown module type "Chatt", did you mean "Chat"?'
    assert re.match(rf"{re.escape(str(path))}:8:1: module\[1\]: .*flavour", lines[2]), lines
    assert lines[3].startswith(f"{path}:14:7: bus.url:"), lines


def test_a_key_of_another_protocol_is_an_unknown_key_at_its_place(tmp_path: Path):
    text = "\n".join(
        [
            "[[listener]]",
            f'addr = "127.0.0.1:{free_port()}"',
            "heartbeat_s = 5",  # 3: pomelo's, on an MQTT listener
            "max_package = 4096",  # 4: pomelo's, close to MQTT's max_packet
            "",
            "[[listener]]",
            'protocol = "pomelo"',
            f'addr = "127.0.0.1:{free_port()}"',
            "push_qos = 0",  # 9: MQTT's
            "transport = \"ws\"",  # 10: pomelo serves TCP and WebSocket on one port
            "",
        ]
    )
    res, path = check(tmp_path, text)
    assert res.returncode == 1, res
    assert res.stderr.strip().splitlines() == [
        f"{path}:3:1: listener[0].heartbeat_s: unknown key `heartbeat_s`: it applies to pomelo listeners, not mqtt",
        f"{path}:4:1: listener[0].max_package: unknown key `max_package`, did you mean `max_packet`? "
        "(`max_package` applies to pomelo listeners, not mqtt)",
        f"{path}:9:1: listener[1].push_qos: unknown key `push_qos`: it applies to mqtt listeners, not pomelo",
        f"{path}:10:1: listener[1].transport: unknown key `transport`: it applies to mqtt and pomelo-rpc listeners, not pomelo",
    ], res.stderr
    # the same key in a --listen URL, the same words
    res = run("serve", "--no-demo-listeners", "--no-http", "--listen", "mqtt://127.0.0.1:1?heartbeat_s=5", timeout=15)
    assert res.returncode == 1
    assert res.stderr.strip() == (
        "error: --listen.heartbeat_s: unknown key `heartbeat_s`: it applies to pomelo listeners, not mqtt"
    )


def test_a_key_with_nothing_close_does_not_list_every_key(tmp_path: Path):
    res, path = check(tmp_path, '[[listener]]\naddr = "127.0.0.1:1"\nno_such_setting = 1\n')
    assert res.returncode == 1
    line = res.stderr.strip()
    assert line.startswith(f"{path}:3:1: listener[0].no_such_setting: unknown key"), line
    assert "print-default-config" in line and "max_conn" not in line, line


def test_serve_reports_every_mistake_too(tmp_path: Path):
    path = tmp_path / "bad.toml"
    path.write_text('[node]\nidd = 1\n[[listener]]\nadr = "x"\n')
    res = run("serve", "--config", str(path), "--no-http", timeout=15)
    assert res.returncode == 1
    assert res.stderr.strip().splitlines() == [
        f"error: {path}:2:1: node.idd: unknown key `idd`, did you mean `id`?",
        f"error: {path}:4:1: listener[0].adr: unknown key `adr`, did you mean `addr`?",
    ], res.stderr


# ---------------------------------------------------------------------------------------------
# files that cannot be read
# ---------------------------------------------------------------------------------------------


def test_a_missing_file_says_so(tmp_path: Path):
    res = run("check-config", str(tmp_path / "nope.toml"))
    assert res.returncode == 1
    assert res.stderr.strip() == f"{tmp_path / 'nope.toml'}: cannot read: no such file"


def test_a_directory_says_so(tmp_path: Path):
    res = run("check-config", str(tmp_path))
    assert res.returncode == 1
    assert res.stderr.strip() == f"{tmp_path}: cannot read: it is a directory"


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads every file whatever its mode")
def test_an_unreadable_file_says_so(tmp_path: Path):
    path = tmp_path / "secret.toml"
    path.write_text("[node]\n")
    path.chmod(0)
    res = run("check-config", str(path))
    assert res.returncode == 1
    assert res.stderr.strip() == f"{path}: cannot read: permission denied"


# ---------------------------------------------------------------------------------------------
# addresses the OS would not both bind
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "first,second",
    [
        ("127.0.0.1", "0.0.0.0"),
        ("0.0.0.0", "127.0.0.1"),
        ("127.0.0.1", "127.0.0.1"),
        ("[::]", "[::1]"),
        ("[::]", "127.0.0.1"),
    ],
)
def test_overlapping_listener_addresses_fail_the_check_and_serve(tmp_path: Path, first: str, second: str):
    port = free_port()
    text = f'[[listener]]\naddr = "{first}:{port}"\n\n[[listener]]\naddr = "{second}:{port}"\n'
    res, path = check(tmp_path, text)
    assert res.returncode == 1, res
    assert res.stderr.startswith(f"{path}:5:8: listener[1].addr: "), res.stderr
    assert "listener[0].addr" in res.stderr
    # serve refuses the same file with the same line, before binding anything
    served = run("serve", "--config", str(path), "--no-http", timeout=15)
    assert served.returncode == 1
    assert f"{path}:5:8: listener[1].addr: " in served.stderr, served.stderr
    assert not port_open(port)


def test_distinct_addresses_on_one_port_pass(tmp_path: Path):
    port = free_port()
    text = f'[[listener]]\naddr = "127.0.0.1:{port}"\n\n[[listener]]\naddr = "[::1]:{port}"\n[http]\nenabled = false\n'
    res, _ = check(tmp_path, text)
    assert res.returncode == 0, res.stderr


def test_a_listen_flag_on_the_page_address_is_refused():
    http = free_port()
    res = run("serve", "--no-demo-listeners", "--http", f"127.0.0.1:{http}", "--listen", f"mqtt://0.0.0.0:{http}", timeout=15)
    assert res.returncode == 1
    assert f"listener[0].addr: 0.0.0.0:{http} and http.addr (127.0.0.1:{http})" in res.stderr, res.stderr


# ---------------------------------------------------------------------------------------------
# --listen
# ---------------------------------------------------------------------------------------------


def test_listen_errors_have_one_prefix():
    res = run("serve", "--no-demo-listeners", "--no-http", "--listen", "line://127.0.0.1:1?handler=nope", timeout=15)
    assert res.returncode == 1
    assert res.stderr.strip() == "error: --listen.handler: unknown variant `nope`, expected `echo` or `router`"
    res = run("serve", "--no-demo-listeners", "--no-http", "--listen", "mqtt://127.0.0.1:1?max_con=3", timeout=15)
    assert res.stderr.strip() == "error: --listen.max_con: unknown key `max_con`, did you mean `max_conn`?"


def stream_pkg(body: bytes) -> bytes:
    """stream-pkg framing: the length as a big-endian base-128 varint, then the body."""
    n = len(body)
    groups = [n & 0x7F]
    n >>= 7
    while n:
        groups.append((n & 0x7F) | 0x80)
        n >>= 7
    return bytes(reversed(groups)) + body


def read_stream_pkg(sock: socket.socket, timeout: float = 5) -> bytes:
    sock.settimeout(timeout)
    buf = b""
    while True:
        length, i = 0, 0
        while i < len(buf):
            length = (length << 7) | (buf[i] & 0x7F)
            i += 1
            if buf[i - 1] & 0x80 == 0:
                break
        else:
            i = -1
        if i > 0 and len(buf) >= i + length:
            return buf[i : i + length]
        chunk = sock.recv(65536)
        assert chunk, "connection closed"
        buf += chunk


def test_service_map_in_a_listener_url_renames_services():
    port = free_port()
    url = f"pomelo-rpc+tcp://127.0.0.1:{port}?service_map=service:Echo,other:Echo&allow=127.0.0.1"
    w = Warren("--module", "Echo", listen=[url], http=False).wait_ready()
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
            for i, service in enumerate(["service", "other"]):
                msg = {"namespace": "user", "serverType": "t", "service": service, "method": "echo", "args": ["hi", "x"]}
                s.sendall(stream_pkg(json.dumps({"id": i, "msg": msg}).encode()))
                assert json.loads(read_stream_pkg(s)) == {"id": i, "resp": [None, "hi"]}
    finally:
        w.terminate()


# ---------------------------------------------------------------------------------------------
# help and the default config name every scheme and module type
# ---------------------------------------------------------------------------------------------

SCHEMES = [
    "mqtt", "mqtts", "mqtt+mqant", "mqtts+mqant", "ws", "wss", "ws+mqant", "wss+mqant",
    "pomelo", "pomelo+tls", "json+ws", "json+wss", "line", "line+tls",
    "pomelo-rpc", "pomelo-rpc+tls", "pomelo-rpc+tcp", "pomelo-rpc+tcp+tls",
]  # fmt: skip
MODULE_TYPES = ["Login", "Chat", "Echo", "Debug", "global", "rpc"]


def words(text: str) -> set[str]:
    return set(re.findall(r"[\w+-]+", text))


def test_help_and_default_config_name_every_scheme_and_module_type():
    help_ = run("serve", "--help").stdout
    printed = run("print-default-config").stdout
    for scheme in SCHEMES:
        assert scheme in words(help_), f"{scheme} missing from `warren serve --help`"
        assert scheme in words(printed), f"{scheme} missing from print-default-config"
    module_help = help_[help_.index("--module") :]
    for kind in MODULE_TYPES:
        assert kind in words(module_help), f"{kind} missing from --module help"
        assert re.search(rf"^#\s+{kind}\s+\S", printed, re.M), f"{kind} missing from print-default-config"


# ---------------------------------------------------------------------------------------------
# `warren node` and the web page
# ---------------------------------------------------------------------------------------------


def node_banner(tmp_path: Path, text: str, *extra: str) -> str:
    """Start `warren node --config`, and once it is ready stop it: its whole banner."""
    path = tmp_path / "node.toml"
    path.write_text(text)
    w = Warren("--config", str(path), *extra, command="node")
    try:
        wait_until(lambda: "ready" in w.stdout() or not w.running(), timeout=20, msg="node not ready")
        assert w.running(), w.tail()
    finally:
        code = w.terminate()
    assert code == 0, w.tail()
    return w.stdout()


def test_a_node_serves_the_page_only_when_its_file_asks(tmp_path: Path):
    out = node_banner(tmp_path, '[[module]]\ntype = "Echo"\n')
    assert "web page" not in out, out
    http = free_port()
    out = node_banner(tmp_path, f'[[module]]\ntype = "Echo"\n[http]\naddr = "127.0.0.1:{http}"\n')
    assert f"web page http://127.0.0.1:{http}/" in out, out
    http = free_port()
    out = node_banner(tmp_path, '[[module]]\ntype = "Echo"\n', "--http", f"127.0.0.1:{http}")
    assert f"web page http://127.0.0.1:{http}/" in out, out

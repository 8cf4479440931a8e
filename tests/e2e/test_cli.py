"""The `warren` command line: help, config printing and checking, serving from a config file.

A config mistake must be caught before anything starts and reported as `FILE:LINE:COL: key: why`
so an operator can jump to it; `serve` must refuse the same file with the same message.
"""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import pytest

from conftest import REPO_ROOT, free_port, port_open, wait_until, warren_bin
from rawmqtt import RawClient, parse_publish, publish_packet, subscribe_packet


def run(*args: str, timeout: float = 20) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(warren_bin()), *args],
        cwd=REPO_ROOT,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def test_help_exits_zero():
    top = run("--help")
    assert top.returncode == 0, top.stderr
    assert "serve" in top.stdout
    sub = run("serve", "--help")
    assert sub.returncode == 0, sub.stderr
    for flag in ("--listen", "--http", "--no-demo-listeners", "--module", "--config"):
        assert flag in sub.stdout, f"{flag} missing from `warren serve --help`"


def test_default_config_passes_check(tmp_path: Path):
    printed = run("print-default-config")
    assert printed.returncode == 0, printed.stderr
    assert printed.stdout.strip(), "print-default-config printed nothing"
    path = tmp_path / "default.toml"
    path.write_text(printed.stdout)
    checked = run("check-config", str(path))
    assert checked.returncode == 0, f"{checked.stdout}\n{checked.stderr}"
    assert checked.stdout.strip().split(":")[0] == "ok", checked.stdout


# Each bad file: (contents, line of the mistake, key the message must name).
BAD_CONFIGS = {
    "unknown-key": (
        '[[listener]]\nprotocol = "mqtt"\naddr = "127.0.0.1:{port}"\nno_such_setting = 1\n',
        4,
        "no_such_setting",
    ),
    "wrong-type": (
        '[[listener]]\nprotocol = "mqtt"\naddr = "127.0.0.1:{port}"\nmax_conn = "many"\n',
        4,
        "max_conn",
    ),
    "bad-listener-address": (
        '[[listener]]\nprotocol = "mqtt"\naddr = "not an address"\n',
        3,
        "addr",
    ),
}


def bad_config(tmp_path: Path, case: str) -> tuple[Path, int, str]:
    text, line, key = BAD_CONFIGS[case]
    path = tmp_path / f"{case}.toml"
    path.write_text(text.format(port=free_port()))
    return path, line, key


def assert_names_file_line_key(output: str, path: Path, line: int, key: str) -> None:
    # FILE:LINE:COL: key: why (the column is optional here: the brief asks for file, line and key)
    rx = re.compile(re.escape(str(path)) + rf":{line}:(\d+:)?.*\b{re.escape(key)}\b")
    assert rx.search(output), f"expected `{path}:{line}:COL: {key}: ...` in:\n{output}"


@pytest.mark.parametrize("case", sorted(BAD_CONFIGS))
def test_check_config_rejects_bad_file(tmp_path: Path, case: str):
    path, line, key = bad_config(tmp_path, case)
    res = run("check-config", str(path))
    assert res.returncode == 1, f"exit {res.returncode}\n{res.stdout}\n{res.stderr}"
    assert_names_file_line_key(res.stdout + res.stderr, path, line, key)


@pytest.mark.parametrize("case", sorted(BAD_CONFIGS))
def test_serve_refuses_bad_file(tmp_path: Path, case: str):
    path, line, key = bad_config(tmp_path, case)
    http = free_port()
    try:
        res = run("serve", "--config", str(path), "--no-demo-listeners", "--http", f"127.0.0.1:{http}", timeout=15)
    except subprocess.TimeoutExpired:
        pytest.fail("warren serve started with an invalid config file")
    assert res.returncode != 0
    assert_names_file_line_key(res.stdout + res.stderr, path, line, key)


def test_serve_from_config_file(tmp_path: Path):
    port = free_port()
    http = free_port()
    path = tmp_path / "warren.toml"
    path.write_text(
        "\n".join(
            [
                "[[listener]]",
                'protocol = "mqtt"',
                f'addr = "127.0.0.1:{port}"',
                "",
                "[[module]]",
                'type = "Login"',
                "",
                "[[module]]",
                'type = "Chat"',
                "",
            ]
        )
    )
    checked = run("check-config", str(path))
    assert checked.returncode == 0, f"{checked.stdout}\n{checked.stderr}"

    err_path = tmp_path / "stderr.log"
    with open(err_path, "wb") as err:
        proc = subprocess.Popen(
            [str(warren_bin()), "serve", "--config", str(path), "--no-demo-listeners", "--http", f"127.0.0.1:{http}"],
            cwd=REPO_ROOT,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=err,
        )
        try:

            def ready() -> bool:
                assert proc.poll() is None, f"exited {proc.returncode}: {err_path.read_text()[-3000:]}"
                return port_open(port)

            wait_until(ready, timeout=20, interval=0.05, msg="config listener not accepting")
            with RawClient(port) as c:
                assert c.connect("cfg") == b"\x20\x02\x00\x00"
                c.send(subscribe_packet(1, [("Login/#", 1)]))
                c.expect(b"\x90\x03\x00\x01\x01")
                topic = "Login/HD_Login/1"
                c.send(publish_packet(topic, b'{"userName":"alice","passWord":"Hello,anyone!"}', qos=1, pkid=2))
                reply = None
                while reply is None:
                    first, body = c.recv_packet(timeout=10)
                    if first >> 4 == 3:
                        got, _q, _id, payload = parse_publish(first, body)
                        assert got == topic
                        reply = json.loads(payload)
                assert reply == {"Error": "", "Result": "login success alice"}
        finally:
            proc.kill()
            proc.wait(timeout=10)

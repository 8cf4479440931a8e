"""The chat demo's end-to-end test (test_chat.py) against its Lua modules (examples/chat-lua).

Every test of test_chat.py is collected again here, with the two fixtures it starts servers
through replaced: the server runs `examples/chat-lua/chat.toml` (its Login and Chat modules are
login.lua and chat.lua) on free ports, plus the Rust `Debug` module the file's last test calls.
Passing here means the Lua modules speak the chat contract of examples/chat/README.md exactly as
the Rust ones do.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from conftest import REPO_ROOT, Warren, free_port, wait_until
from test_chat import *  # noqa: F403 -- the Rust demo's tests, collected again with the fixtures below

CHAT_LUA = REPO_ROOT / "examples" / "chat-lua"


def lua_chat(tmp_path: Path, extra: str = "") -> Warren:
    """A ready warren running examples/chat-lua/chat.toml (copied, its ports made free ones),
    with `extra` appended to the config and `--module Debug` on the command line."""
    here = tmp_path / "chat-lua"
    shutil.copytree(CHAT_LUA, here)
    config = here / "chat.toml"
    tcp, ws, admin = free_port(), free_port(), free_port()
    text = config.read_text()
    for addr in ("127.0.0.1:3563", "127.0.0.1:3653", "127.0.0.1:9090"):
        assert f'"{addr}"' in text, f"chat.toml no longer binds {addr}"
    for addr, port in (("127.0.0.1:3563", tcp), ("127.0.0.1:3653", ws), ("127.0.0.1:9090", admin)):
        text = text.replace(f'"{addr}"', f'"127.0.0.1:{port}"')
    config.write_text(text + extra)
    w = Warren("--config", str(config), "--module", "Debug", http=False)
    # the listeners come from the file: tell the harness where they are
    w.listeners = [("mqtt+mqant", tcp), ("ws+mqant", ws)]
    w.ports.update({"mqtt+mqant": tcp, "ws+mqant": ws})
    w.wait_ready()
    return w


@pytest.fixture
def warren_demo(tmp_path):  # noqa: F811 -- replaces conftest's Rust demo
    """The Lua chat: `.mqtt_mqant` and `.ws_mqant` are its listeners' ports."""
    w = lua_chat(tmp_path)
    try:
        yield w
    finally:
        w.kill()


@pytest.fixture
def warren_kick_old(tmp_path):  # noqa: F811 -- replaces test_chat's Rust one
    """The Lua chat with `[auth] uid_conflict = "kick_old"`."""
    w = lua_chat(tmp_path, '\n[auth]\nuid_conflict = "kick_old"\n')
    try:
        yield w
    finally:
        w.kill()


def test_the_modules_are_the_lua_ones(warren_demo):
    # Login and Chat came from the .lua files, not from the binary's Rust modules
    log = wait_until(lambda: "module plugin loaded" in warren_demo.log() and warren_demo.log())
    for name in ("login.lua", "chat.lua"):
        assert name in log, log
    c = client(warren_demo)  # noqa: F405 -- test_chat's helper
    assert c.login("alice") == ok("login success alice")  # noqa: F405
    c.close()

"""examples/my-game: a server of one's own is a module and a ten-line `main` over warren-app.

The README's block runs as written, in the example's directory: `cargo build --release` builds
the project (outside the workspace, with its own Cargo.lock), `cargo run --release -- serve …`
serves it, and the paho snippet gets the push and then the reply the README shows. The server
and the client run in a fresh network namespace (docblocks.py), so the README's port is free;
the build runs outside it, with the network cargo may need.

Where the build goes: CARGO_TARGET_DIR is the workspace's `target/`. The example's own
`target/` would share nothing with the workspace's builds and compile all ~330 crates again in
release mode on every fresh checkout (several minutes of CI on two cores); in `target/`, the
release build of `warren` that CI makes before the end-to-end tests already holds nearly all of
them (same versions, since the example's Cargo.lock is the workspace's, pruned; same release
profile), and only the crates whose features differ (warren-cluster without etcd, warren-app and
a few others) are compiled. Building the example must not change its Cargo.lock: a dependency
added to warren without the example's lock following fails here.

The ten-line `main` shown in README.md, examples/my-game/README.md and docs/modules.md is the example's
src/main.rs, character for character (docs/modules.md's Rust blocks are compiled by `cargo test`
but this one, which needs warren-app). Beyond the README, the binary's own command line is
checked: `print-default-config` passes
`check-config`, and `check-config` knows the app's module types (an unknown one is reported
with the types the binary has).
"""

from __future__ import annotations

import os
import re
import subprocess
import time
from pathlib import Path

from conftest import REPO_ROOT
from docblocks import Namespace, Terminal, commands, expected_text, find_block

EXAMPLE = REPO_ROOT / "examples" / "my-game"
README = EXAMPLE / "README.md"
TARGET = REPO_ROOT / "target"
BUILD_TIMEOUT_S = 1800
# `cargo run` checks that the build is fresh before the server starts, and waits for the target
# directory while another cargo holds it (a build of the workspace in another terminal)
READY_TIMEOUT_S = BUILD_TIMEOUT_S
READY = re.compile(r'^my-game \S+ node ".*" ready', re.M)


def env() -> dict[str, str]:
    e = dict(os.environ, CARGO_TARGET_DIR=str(TARGET), NO_COLOR="1")
    for key in ("RUST_LOG", "WARREN_BIN"):
        e.pop(key, None)
    return e


def build(cmd: str) -> None:
    """Run the README's build command; the example's Cargo.lock must come out unchanged."""
    lock = (EXAMPLE / "Cargo.lock").read_bytes()
    r = subprocess.run(["bash", "-c", cmd], cwd=EXAMPLE, env=env(), capture_output=True, text=True, timeout=BUILD_TIMEOUT_S)
    assert r.returncode == 0, f"{cmd!r} failed ({r.returncode}):\n{r.stderr[-6000:]}"
    assert (EXAMPLE / "Cargo.lock").read_bytes() == lock, (
        "building examples/my-game changed its Cargo.lock: commit the new lock "
        "(`cargo build --manifest-path examples/my-game/Cargo.toml`, no upgrades)"
    )


def test_the_documented_main_is_the_examples():
    main = (EXAMPLE / "src" / "main.rs").read_text()
    shown = [
        find_block(README, "fn main() -> std::process::ExitCode", lang="rust"),
        find_block(REPO_ROOT / "README.md", "fn main() -> std::process::ExitCode", lang="rust"),
        find_block(REPO_ROOT / "docs" / "modules.md", "fn main() -> std::process::ExitCode", lang="rust,ignore"),
    ]
    for block in shown:
        text = "\n".join(block.lines) + "\n"
        assert text in main, f"{block.name} is not examples/my-game/src/main.rs's main:\n{text}"
    assert len(main.split("fn main()", 1)[1].splitlines()) <= 10, "the example's main is ten lines at most"


def my_game(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(TARGET / "release" / "my-game"), *args], cwd=EXAMPLE, env=env(), capture_output=True, text=True, timeout=60)


def test_the_readme_builds_serves_and_answers(tmp_path: Path):
    steps = commands(find_block(README, "cargo build --release").lines)
    assert [s.cmd.split()[0] for s in steps] == ["cargo", "cargo", "python3"], steps
    build_step, serve_step, client_step = steps
    build(build_step.cmd)

    ns = Namespace()
    server = Terminal(ns, serve_step.cmd, EXAMPLE, env(), tmp_path / "server.log", stdin=False)
    try:
        deadline = time.monotonic() + READY_TIMEOUT_S
        while not READY.search(server.output()):
            assert server.running(), f"{serve_step.cmd!r} exited ({server.proc.returncode}):\n{server.output()[-4000:]}"
            assert time.monotonic() < deadline, f"{serve_step.cmd!r} not ready:\n{server.output()[-4000:]}"
            time.sleep(0.05)
        assert "listening mqtt tcp://127.0.0.1:1884" in server.output(), server.output()

        client = subprocess.run(ns.argv(EXAMPLE, "bash", "-c", client_step.cmd), env=env(), capture_output=True, text=True, timeout=60)
        assert client.returncode == 0, f"{client.stdout}\n{client.stderr}"
        expected = [expected_text(n) for n in client_step.expected]
        assert expected == ['Greeter/OnHello {"to":"ann"}', 'Greeter/HD_Hello/1 {"Error":"","Result":"hello ann"}'], expected
        # the push first, then the reply: exactly the README's lines, in its order
        assert client.stdout.splitlines() == expected, client.stdout

        assert server.interrupt() == 0, server.output()
    finally:
        server.kill()
        server.close()
        ns.close()


def test_the_binary_knows_its_module_types(tmp_path: Path):
    build(find_block(README, "cargo build --release").lines[0])
    printed = my_game("print-default-config")
    assert printed.returncode == 0, printed.stderr
    assert 'type = "Greeter"' in printed.stdout, printed.stdout
    default = tmp_path / "default.toml"
    default.write_text(printed.stdout)
    checked = my_game("check-config", str(default))
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert checked.stdout.strip() == f"ok: {default}", checked.stdout

    settings = tmp_path / "greeting.toml"
    settings.write_text('[[module]]\ntype = "Greeter"\n[module.settings]\ngreeting = 7\n')
    bad = my_game("check-config", str(settings))
    assert bad.returncode == 1, bad.stdout + bad.stderr
    assert f"{settings}:1:1: module[0]: settings.greeting must be a string" in bad.stderr, bad.stderr

    unknown = tmp_path / "unknown.toml"
    unknown.write_text('[[module]]\ntype = "Chat"\n')
    bad = my_game("check-config", str(unknown))
    assert bad.returncode == 1, bad.stdout + bad.stderr
    assert f'{unknown}:2:8: module[0].type: unknown module type "Chat" (this binary has: Greeter)' in bad.stderr, bad.stderr

    refused = my_game("serve", "--module", "Login")
    assert refused.returncode == 1, refused.stdout + refused.stderr
    assert 'unknown module type "Login" (this binary has: Greeter)' in refused.stderr, refused.stderr
    helped = my_game("serve", "--help")
    assert "Also run a module of this type (repeatable): Greeter" in helped.stdout, helped.stdout
    assert my_game("--version").stdout.strip() == "my-game 0.1.0"

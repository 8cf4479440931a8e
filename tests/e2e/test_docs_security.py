"""docs/security.md, run as written: the deployment walk-through's commands, verbatim and in order.

The shell block under "Deploying with TLS, passwords and an ACL" is split into commands (a
heredoc stays with its command) and run with bash in an empty directory, `warren` being the
binary under test. A command ending in `&` runs in the background for the rest of the block. A
`# → text` line under a command is what that command prints; `(printed by mosquitto_sub)` means
the background subscriber prints it. The harness only waits (for the server's port, for the
subscriber to subscribe); it adds nothing to the commands.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import time
from pathlib import Path

import pytest

from conftest import REPO_ROOT, port_open, wait_until, warren_bin

DOC = REPO_ROOT / "docs" / "security.md"
HEADING = "## Deploying with TLS, passwords and an ACL"


def shell_block(text: str, heading: str) -> list[str]:
    """The lines of the first ```sh block after `heading`."""
    rest = text.split(heading, 1)[1]
    block = rest.split("```sh\n", 1)[1].split("```", 1)[0]
    return block.splitlines()


def commands(lines: list[str]) -> list[tuple[str, list[str]]]:
    """(command, expected outputs) in order; a heredoc's body belongs to its command."""
    out: list[tuple[str, list[str]]] = []
    i = 0
    while i < len(lines):
        line = lines[i]
        i += 1
        if not line.strip():
            continue
        if line.startswith("#"):
            m = re.match(r"#\s*→\s*(.*)$", line)
            if m and out:
                out[-1][1].append(m.group(1).strip())
            continue
        cmd = line
        here = re.search(r"<<'(\w+)'", line)
        if here:
            end = here.group(1)
            while i < len(lines):
                cmd += "\n" + lines[i]
                i += 1
                if lines[i - 1] == end:
                    break
        out.append((cmd, []))
    return out


def test_the_deployment_walkthrough_runs_as_written(tmp_path: Path):
    for tool in ("openssl", "mosquitto_pub", "mosquitto_sub"):
        if subprocess.run(["which", tool], capture_output=True).returncode != 0:
            pytest.fail(f"{tool} is not installed (scripts/test installs it)")
    steps = commands(shell_block(DOC.read_text(), HEADING))
    assert len(steps) >= 8, steps
    port = int(re.search(r'addr = "127\.0\.0\.1:(\d+)"', DOC.read_text().split(HEADING, 1)[1]).group(1))
    assert not port_open(port), f"port {port} is taken; the walk-through needs it"

    env = dict(os.environ)
    env["PATH"] = f"{Path(warren_bin()).resolve().parent}:{env['PATH']}"
    env["NO_COLOR"] = "1"
    background: list[tuple[str, subprocess.Popen, Path]] = []
    try:
        for n, (cmd, expected) in enumerate(steps):
            if cmd.rstrip().endswith("&"):
                log = tmp_path / f"bg{n}.log"
                p = subprocess.Popen(
                    ["bash", "-c", cmd.rstrip()[:-1]],
                    cwd=tmp_path,
                    env=env,
                    stdout=open(log, "wb"),
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                )
                background.append((cmd, p, log))
                if cmd.startswith("warren serve"):
                    wait_until(lambda: port_open(port), timeout=20, msg=f"warren did not listen on {port}")
                else:
                    time.sleep(1.0)  # let the subscriber subscribe
                continue
            r = subprocess.run(["bash", "-c", cmd], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60)
            said = r.stdout + r.stderr
            for exp in expected:
                text = exp.split("   (", 1)[0].strip()
                if "(printed by mosquitto_sub)" in exp:
                    sub = next(log for c, _, log in background if c.startswith("mosquitto_sub"))
                    wait_until(lambda: text in sub.read_text(errors="replace"), timeout=10, msg=f"mosquitto_sub did not print {text!r}")
                else:
                    assert text in said, f"{cmd!r} printed {said!r}, the doc says {text!r}"
            if not expected:
                assert r.returncode == 0, f"{cmd!r} failed ({r.returncode}): {said}"
    finally:
        for _, p, _ in reversed(background):
            try:
                os.killpg(p.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)

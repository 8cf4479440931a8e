"""docs/security.md, run as written: the deployment walk-through's commands, verbatim and in order.

The shell block under "Deploying with TLS, passwords and an ACL" runs in a `Shell` of
docblocks.py (read its docstring): bash in a fresh directory and network namespace, `warren`
being the binary under test. A command ending in `&` runs in the background for the rest of the
block. A `# → text` line under a command is what that command prints; `(printed by
mosquitto_sub)` means the background subscriber prints it. The harness only waits (for the
server to say it is ready, for the subscriber to subscribe); it adds nothing to the commands.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from conftest import REPO_ROOT
from docblocks import Shell, commands, shell_block

DOC = REPO_ROOT / "docs" / "security.md"
HEADING = "## Deploying with TLS, passwords and an ACL"


def test_the_deployment_walkthrough_runs_as_written(tmp_path: Path):
    for tool in ("openssl", "mosquitto_pub", "mosquitto_sub"):
        if shutil.which(tool) is None:
            pytest.fail(f"{tool} is not installed (scripts/test installs it)")
    steps = commands(shell_block(DOC.read_text(), HEADING))
    assert len(steps) >= 8, steps
    assert sum(len(s.expected) for s in steps) >= 3, steps
    with Shell(tmp_path, "security") as sh:
        sh.walk(steps)

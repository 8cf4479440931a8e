"""`bench/compare --instructions`: the count that docs/benchmarks.md gives the cost of metrics and
traces with ("Metrics and traces: their cost (issue 16)"). A short run of the request scenario
against `warren` and `warren-bare`, each server under valgrind's callgrind: the report must carry
both counts per message and their ratio, and no run may fail or lose a request.

The figures themselves are not checked: tests assert behaviour, and the count of a one-second run
includes more of the connections' setup than the published runs do.
"""

from __future__ import annotations

import re
import shutil
import subprocess

import pytest

from conftest import REPO_ROOT, warren_bin


@pytest.mark.skipif(shutil.which("valgrind") is None, reason="valgrind is not installed (scripts/test installs it)")
def test_instructions_per_message_of_warren_and_warren_bare():
    p = subprocess.run(
        [
            str(REPO_ROOT / "bench" / "compare"), "--instructions", "--only", "request",
            "--targets", "warren,warren-bare", "--runs", "1", "--duration", "1", "--warmup", "0.5",
            "--warren", str(warren_bin()),
        ],
        cwd=REPO_ROOT,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert p.returncode == 0, p.stderr[-2000:]
    report = p.stdout
    row = re.search(
        r"server instructions per message \(([\d,]+) / ([\d,]+)\) \| ([\d.]+)× \|", report
    )
    assert row, report
    shipped, bare = (int(row.group(i).replace(",", "")) for i in (1, 2))
    # an Echo request costs the server some thousands of instructions either way
    assert 1_000 < shipped < 100_000 and 1_000 < bare < 100_000, row.group(0)
    assert "`server_instructions_per_msg`" in report, report
    losses = report.split("### Losses, errors and failed runs", 1)[1].split("###", 1)[0]
    assert losses.strip() == "- none", losses

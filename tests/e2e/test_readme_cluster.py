"""The README's three-process cluster walk, run as written.

The commands are read from README.md ("The same chat over three processes and a broker") and run
verbatim: `nats-server -js`, the gate from examples/cluster/gate.toml, and two module nodes from
examples/cluster/node.toml. They use fixed ports (NATS 4222, MQTT 3563/3653, the page on 8080),
so the walk runs in a private network namespace (`unshare -rn`), where those ports are free
whatever the machine runs; a private PID namespace ends every process with the walk.

The walk passes when both nodes join the gate, neither node serves the page (it is the gate's),
the page answers on :8080, and two chat clients on :3563 reach Login and Chat on the nodes.
"""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
import tempfile
import urllib.request
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

from conftest import REPO_ROOT, port_open, wait_until, warren_bin  # noqa: E402

ROOM = "readme"


def walk_commands() -> list[str]:
    """The README's cluster commands, comments and the trailing `&` removed."""
    readme = (REPO_ROOT / "README.md").read_text()
    start = readme.index("The same chat over three processes and a broker")
    block = readme[start:].split("```sh\n", 1)[1].split("```", 1)[0]
    commands = []
    for line in block.splitlines():
        cmd = line.split(" #", 1)[0].strip()
        if cmd and not cmd.startswith("#"):
            commands.append(cmd.removesuffix("&").strip())
    return commands


def test_readme_cluster_walk_runs_verbatim():
    commands = walk_commands()
    assert [c.split()[:2] for c in commands] == [
        ["nats-server", "-js"],
        ["warren", "serve"],
        ["warren", "node"],
        ["warren", "node"],
    ], commands
    if not os.path.exists("/usr/sbin/nats-server"):
        pytest.fail("nats-server is not installed (scripts/test installs it)")
    if subprocess.run(["unshare", "-rn", "true"], capture_output=True).returncode != 0:
        why = "unshare -rn (a private network namespace) is not permitted here"
        if os.environ.get("CI"):
            pytest.fail(why)
        pytest.skip(why)
    env = dict(os.environ, WARREN_BIN=str(warren_bin()))
    res = subprocess.run(
        ["unshare", "-rnp", "--fork", "--kill-child", sys.executable, __file__],
        cwd=REPO_ROOT,
        env=env,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert res.returncode == 0, f"{res.stdout[-6000:]}\n{res.stderr[-6000:]}"
    assert "walk ok" in res.stdout, res.stdout


class Proc:
    """One README command, started from the repository root, its output in files."""

    def __init__(self, cmd: str, env: dict[str, str], logs: Path, name: str) -> None:
        self.cmd = cmd
        self.out = logs / f"{name}.out"
        self.err = logs / f"{name}.err"
        with open(self.out, "wb") as out, open(self.err, "wb") as err:
            self.proc = subprocess.Popen(shlex.split(cmd), cwd=REPO_ROOT, env=env, stdin=subprocess.DEVNULL, stdout=out, stderr=err)

    def stdout(self) -> str:
        return self.out.read_text(errors="replace")

    def stderr(self) -> str:
        return self.err.read_text(errors="replace")

    def alive(self) -> bool:
        assert self.proc.poll() is None, f"`{self.cmd}` exited {self.proc.returncode}:\n{self.stdout()}\n{self.stderr()[-3000:]}"
        return True


def walk() -> None:
    """Inside the namespace: bring up loopback, run the commands, chat through them."""
    subprocess.run(["ip", "link", "set", "lo", "up"], check=True)
    tmp = Path(tempfile.mkdtemp(prefix="warren-readme-"))
    bindir = tmp / "bin"
    bindir.mkdir()
    (bindir / "warren").symlink_to(Path(os.environ["WARREN_BIN"]))
    env = dict(os.environ)
    env["PATH"] = os.pathsep.join([str(bindir), "/usr/sbin", "/usr/bin", env.get("PATH", "")])
    env["TMPDIR"] = str(tmp)  # nats-server keeps its JetStream files under it
    env["RUST_LOG"] = "info"
    env["NO_COLOR"] = "1"
    procs: list[Proc] = []
    try:
        nats, gate_cmd, *node_cmds = walk_commands()
        procs.append(Proc(nats, env, tmp, "nats"))
        wait_until(lambda: procs[0].alive() and port_open(4222), timeout=20, msg="nats-server not listening")
        gate = Proc(gate_cmd, env, tmp, "gate")
        procs.append(gate)
        wait_until(lambda: gate.alive() and all(port_open(p) for p in (3563, 3653, 8080)), timeout=30, msg="gate not ready")
        nodes = []
        for i, cmd in enumerate(node_cmds):
            node = Proc(cmd, env, tmp, f"node{i}")
            procs.append(node)
            nodes.append(node)
            wait_until(lambda: node.alive() and "ready" in node.stdout(), timeout=30, msg=f"`{cmd}` not ready")
        for name in ("chat1", "chat2"):
            wait_until(lambda: gate.alive() and f"node={name}" in gate.stderr(), timeout=20, msg=f"the gate never saw {name}")
        for node in nodes:
            assert "web page" not in node.stdout(), node.stdout()
        with urllib.request.urlopen("http://127.0.0.1:8080/", timeout=5) as page:
            assert page.status == 200

        from chat import ChatClient

        alice = ChatClient(3563, client_id="readme-alice")
        bob = ChatClient(3563, client_id="readme-bob")
        try:
            for c, user in ((alice, "alice"), (bob, "bob")):
                assert c.login(user) == {"Error": "", "Result": f"login success {user}"}
                assert c.join(ROOM)["Error"] == ""
            assert alice.say(ROOM, "hello from the README") == {"Error": "", "Result": "say success"}
            push = bob.wait_push("Chat/OnChat", lambda p: p["msg"] == "hello from the README")
            assert push["from"] == "alice", push
        finally:
            alice.close()
            bob.close()
        print("walk ok")
    finally:
        for p in reversed(procs):
            if p.proc.poll() is None:
                p.proc.terminate()
                try:
                    p.proc.wait(timeout=15)
                except subprocess.TimeoutExpired:
                    p.proc.kill()


if __name__ == "__main__":
    walk()

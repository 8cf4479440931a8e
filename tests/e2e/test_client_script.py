"""The terminal chat client (examples/chat/client/chat_client.py) against a real warren."""

from __future__ import annotations

import subprocess
import sys
import threading

from conftest import REPO_ROOT, free_port, wait_until

SCRIPT = REPO_ROOT / "examples/chat/client/chat_client.py"


class Script:
    """The client script running in the background, its stdout collected line by line."""

    def __init__(self, *args: str) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, str(SCRIPT), *args],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        self.lines: list[str] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append(line.rstrip("\n"))

    def wait(self, timeout: float = 30) -> tuple[int, list[str], str]:
        code = self.proc.wait(timeout=timeout)
        self._reader.join(5)
        assert self.proc.stderr is not None
        return code, self.lines, self.proc.stderr.read()

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


def run(*args: str, timeout: float = 30) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(SCRIPT), *args],
        stdin=subprocess.DEVNULL,
        check=False,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def test_two_clients_talk(warren_demo):
    tcp = str(warren_demo.mqtt_mqant)
    ws = str(warren_demo.ws_mqant)
    alice = Script("--port", tcp, "--user", "alice", "--linger", "30", "--until", "* bob left")
    try:
        wait_until(
            lambda: any(l.startswith("joined mqant as alice") for l in alice.lines),
            timeout=15,
            msg=f"alice did not join: {alice.lines}",
        )

        bob = run(
            "--ws", "--port", ws, "--user", "bob", "--say", "hello all", "--say", "/w alice psst", "--linger", "0.5"
        )
        assert bob.returncode == 0, bob.stderr
        bob_lines = bob.stdout.splitlines()
        assert bob_lines[0] == "joined mqant as bob (here: alice, bob)"
        assert "[mqant] bob: hello all" in bob_lines
        assert not any("psst" in l for l in bob_lines)  # a whisper reaches its target only

        code, lines, err = alice.wait()
        assert code == 0, err
        assert lines[0] == "joined mqant as alice (here: alice)"
        assert lines[1:] == [
            "* bob joined",
            "[mqant] bob: hello all",
            "[mqant] bob (to alice): psst",
            "* bob left",
        ]
    finally:
        alice.kill()


def test_say_with_mqtt311_and_room(warren_demo):
    r = run(
        "--port",
        str(warren_demo.mqtt_mqant),
        "--mqtt311",
        "--user",
        "carol",
        "--room",
        "lobby",
        "--say",
        "anyone?",
        "--linger",
        "0.3",
    )
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines() == ["joined lobby as carol (here: carol)", "[lobby] carol: anyone?"]


def test_whisper_to_absent_user_prints_error(warren_demo):
    r = run("--port", str(warren_demo.mqtt_mqant), "--user", "dave", "--say", "/w nobody hi", "--linger", "0.2")
    assert r.returncode == 0, r.stderr
    assert "! This user haven't been in the room yet" in r.stdout.splitlines()


def test_unreachable_server_exits_nonzero():
    r = run("--port", str(free_port()), "--user", "alice", "--say", "hi", "--timeout", "2")
    assert r.returncode == 2
    assert "cannot connect" in r.stderr

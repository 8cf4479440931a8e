"""Backend groups from the config (docs/backends.md), against the real binary.

A `[[backend]]` table makes `warren serve` keep connections to the services it lists: a service
that is up is dialled and logged as connected, one that goes away is logged as disconnected and
dialled again every second until it is back, and one that never answers does not stop the rest.
`warren check-config` names the mistakes of a table. The services here are small TCP servers
speaking the gobase test codec (`msgid u32 LE · len u32 LE · body`).

The gobase sample (examples/backends/heartbeat.toml) finds its services in a gobase Redis
registry, where a peer written from the layout (test_gobase_registry.py's, redis-py and gobase's
Lua scripts) registers and deregisters them, and calls each with the heartbeat every second.
"""

from __future__ import annotations

import socket
import subprocess
from pathlib import Path

import pytest
from brokers import Broker, installed
from conftest import REPO_ROOT, Warren, free_port, wait_until, warren_bin
from frame_service import FrameService
from test_gobase_registry import GobasePeer


class GobaseService(FrameService):
    """A TCP service on 127.0.0.1:`port` that answers the sample heartbeat (msgid 1 → msgid 2)
    and counts the connections it accepted."""

    def __init__(self, port: int) -> None:
        self.frames: list[tuple[int, bytes]] = []
        super().__init__(port)

    def on_frame(self, conn: socket.socket, msgid: int, body: bytes) -> None:
        self.frames.append((msgid, body))
        if msgid == 1:
            self.send(conn, 2, b"heatrespmsg")


def config(tmp_path: Path, services: list[tuple[str, int]]) -> Path:
    lines = ["[[backend]]", 'group = "Gate"', "dial_timeout_s = 2", "services = ["]
    for sid, port in services:
        lines.append(f'  {{ serviceid = "{sid}", serviceaddr = "127.0.0.1", serviceport = {port} }},')
    lines.append("]")
    path = tmp_path / "backends.toml"
    path.write_text("\n".join(lines) + "\n")
    return path


def test_a_configured_group_is_kept_connected(tmp_path: Path):
    port = free_port()
    service = GobaseService(port)
    dead = free_port()  # nothing listens there
    cfg = config(tmp_path, [("Gate1", port), ("gate2", dead)])
    w = Warren("--config", str(cfg), listen=[Warren.url("mqtt+mqant")], http=False).wait_ready()
    try:
        wait_until(lambda: service.accepted == 1, timeout=10, msg="warren dials the service")
        wait_until(
            lambda: "backend connected" in w.log() and "gate1" in w.log(),
            timeout=10,
            msg="the connect is logged",
        )

        service.stop()
        wait_until(lambda: "backend disconnected" in w.log(), timeout=10, msg="the disconnect is logged")

        # back on the same port: dialled again
        again = GobaseService(port)
        wait_until(lambda: again.accepted == 1, timeout=10, msg="warren dials again")
        wait_until(lambda: w.log().count("backend connected") >= 2, timeout=10, msg="the reconnect is logged")
        assert w.running()
        assert w.terminate() == 0
        again.stop()
    finally:
        w.kill()
        service.stop()


def test_check_config_names_the_mistakes_of_a_backend_table(tmp_path: Path):
    path = tmp_path / "bad.toml"
    path.write_text(
        "\n".join(
            [
                "[[backend]]",
                'group = "gate"',
                "services = [",
                '  { serviceid = "a", serviceaddr = "127.0.0.1", serviceport = 0 },',
                '  { servicename = "game", serviceid = "A", serviceaddr = "127.0.0.1", serviceport = 7001 },',
                "]",
                "",
            ]
        )
    )
    r = subprocess.run(
        [str(warren_bin()), "check-config", str(path)],
        cwd=REPO_ROOT,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=20,
    )
    assert r.returncode != 0, r.stdout + r.stderr
    out = r.stdout + r.stderr
    for key in [
        "backend[0].services[0].serviceport",
        "backend[0].services[1].servicename",
        "backend[0].services[1].serviceid",
    ]:
        assert key in out, out


def heartbeats(service: GobaseService) -> int:
    """Heartbeat requests (msgid 1, `heatreqmsg`) the service received."""
    return sum(1 for msgid, body in list(service.frames) if msgid == 1 and body == b"heatreqmsg")


def answered(w: Warren, sid: str) -> int:
    """Round trips the node logged for service `sid`."""
    return sum(1 for line in w.log().splitlines() if "backend heartbeat answered" in line and f"service={sid}" in line)


@pytest.fixture
def redis_broker():
    if not installed("redis"):
        pytest.fail("redis-server is not installed (scripts/test installs it)")
    b = Broker("redis")
    yield b
    b.close()


@pytest.mark.parametrize("layout", ["gobase", "gobase-seconds"])
def test_the_gobase_sample_follows_the_registry(redis_broker, layout):
    key = "backend-demo"
    peer = GobasePeer(redis_broker.port, key, layout)
    gate1, gate2, gate3, other = (GobaseService(free_port()) for _ in range(4))
    member = lambda sid, s, scheme="tcp", name="gate": f"{name}&{sid}&127.0.0.1&{s.port}&{scheme}"  # noqa: E731
    peer.register(member("gate1", gate1))
    peer.register(member("gate2", gate2))
    # neither of these is the sample's: another group, another scheme
    peer.register(member("game1", other, name="game"))
    peer.register(member("gate9", other, scheme="http"))
    w = Warren(
        "--config",
        str(REPO_ROOT / "examples" / "backends" / "heartbeat.toml"),
        "--registry",
        f"{redis_broker.url}/0?layout={layout}",
        listen=[Warren.url("mqtt")],
        http=False,
    ).wait_ready()
    try:
        for sid, s in (("gate1", gate1), ("gate2", gate2)):
            wait_until(lambda s=s: heartbeats(s) >= 2, timeout=15, msg=f"{sid} gets a heartbeat every second")
            wait_until(lambda sid=sid: answered(w, sid) >= 2, timeout=15, msg=f"the round trips to {sid} are logged")

        # gone from the registry: its connection is closed at once, the other one stays
        peer.deregister(member("gate2", gate2))
        wait_until(lambda: gate2.closed == 1, timeout=15, msg="warren closes gate2's connection")
        assert "backend left discovery; closed" in w.log()
        sent = heartbeats(gate2)
        before = answered(w, "gate1")
        wait_until(lambda: answered(w, "gate1") >= before + 2, timeout=15, msg="gate1 is still called")
        assert heartbeats(gate2) == sent and gate2.accepted == 1

        # a new member is dialled and called
        peer.register(member("gate3", gate3))
        wait_until(lambda: gate3.accepted == 1, timeout=15, msg="warren dials gate3")
        wait_until(lambda: answered(w, "gate3") >= 1, timeout=15, msg="gate3 is called")

        assert other.accepted == 0, "only members of group gate and scheme tcp are dialled"
        assert w.running()
        assert w.terminate() == 0
    finally:
        w.kill()
        peer.close()
        for s in (gate1, gate2, gate3, other):
            s.stop()


def test_registry_discovery_needs_a_redis_registry(tmp_path: Path):
    cfg = tmp_path / "demo.toml"
    cfg.write_text((REPO_ROOT / "examples" / "backends" / "heartbeat.toml").read_text())
    w = Warren("--config", str(cfg), listen=[Warren.url("mqtt")], http=False)
    try:
        code = w.proc.wait(timeout=20)
        assert code != 0
        assert 'discovery = "registry" reads a redis://, nats:// or etcd:// registry' in w.log(), w.log()
    finally:
        w.kill()

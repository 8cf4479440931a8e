"""Real brokers for the cluster tests: nats-server, redis-server and rabbitmq-server (Debian's
packages) started on free ports in a private directory, killable and restartable on the same port.
Never the machine's own services.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path

from conftest import free_port, port_open

BINARIES = {
    "nats": "/usr/sbin/nats-server",
    "redis": "/usr/bin/redis-server",
    # the /usr/sbin script switches to the rabbitmq user; this one runs as the caller
    "amqp": "/usr/lib/rabbitmq/bin/rabbitmq-server",
}


class Broker:
    """One broker process. `.url` is what `--bus` / `--registry` take."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self.port = free_port()
        self.dist_port = free_port()
        self.dir = Path(tempfile.mkdtemp(prefix=f"warren-{kind}-"))
        self.proc: subprocess.Popen | None = None
        self.start()

    @property
    def url(self) -> str:
        if self.kind == "nats":
            return f"nats://127.0.0.1:{self.port}"
        if self.kind == "redis":
            return f"redis://127.0.0.1:{self.port}"
        return f"amqp://guest:guest@127.0.0.1:{self.port}/%2f"

    def start(self) -> None:
        env = dict(os.environ)
        if self.kind == "nats":
            args = [BINARIES["nats"], "-a", "127.0.0.1", "-p", str(self.port), "-js", "-sd", str(self.dir / "js")]
            within = 15
        elif self.kind == "redis":
            args = [BINARIES["redis"], "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no", "--dir", str(self.dir)]
            within = 15
        else:
            (self.dir / "enabled_plugins").write_text("[].\n")
            (self.dir / "rabbitmq.conf").write_text("loopback_users = none\n")
            env.update(
                RABBITMQ_NODENAME=f"warren{self.port}@localhost",
                RABBITMQ_NODE_IP_ADDRESS="127.0.0.1",
                RABBITMQ_NODE_PORT=str(self.port),
                RABBITMQ_DIST_PORT=str(self.dist_port),
                RABBITMQ_MNESIA_BASE=str(self.dir / "mnesia"),
                RABBITMQ_LOG_BASE=str(self.dir / "log"),
                RABBITMQ_CONFIG_FILE=str(self.dir / "rabbitmq"),
                RABBITMQ_ENABLED_PLUGINS_FILE=str(self.dir / "enabled_plugins"),
                RABBITMQ_PID_FILE=str(self.dir / "rabbit.pid"),
                HOME=str(self.dir),
            )
            args = [BINARIES["amqp"]]
            within = 90
        log = open(self.dir / "server.log", "ab")
        self.proc = subprocess.Popen(args, env=env, cwd=self.dir, stdin=subprocess.DEVNULL, stdout=log, stderr=log, start_new_session=True)
        deadline = time.monotonic() + within
        while not port_open(self.port):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"{self.kind} did not start on {self.port}:\n{self.log()[-3000:]}")
            time.sleep(0.05)
        if self.kind == "amqp":
            time.sleep(2)  # the port opens before the broker finishes booting

    def log(self) -> str:
        try:
            return (self.dir / "server.log").read_text(errors="replace")
        except OSError:
            return ""

    def kill(self) -> None:
        """SIGKILL the broker (and, for RabbitMQ, its Erlang VM) and wait until the port closes."""
        if self.proc is not None and self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self.proc.wait(timeout=10)
        if self.kind == "amqp":
            # the Erlang VM outlives its start script; it runs with `-home <our private dir>`
            subprocess.run(["pkill", "-9", "-f", "--", f"-home {self.dir}"], check=False)
        deadline = time.monotonic() + 10
        while port_open(self.port) and time.monotonic() < deadline:
            time.sleep(0.05)

    def restart(self) -> None:
        self.kill()
        self.start()

    def close(self) -> None:
        self.kill()
        shutil.rmtree(self.dir, ignore_errors=True)


def installed(kind: str) -> bool:
    return os.path.exists(BINARIES[kind])

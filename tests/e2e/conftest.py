"""Shared harness for the end-to-end tests: start real `warren` processes on free ports.

Every test file in this directory starts its own server(s) through `Warren` (or the
`warren_demo` fixture), so files are independent and may run in any order. Servers are always
killed at the end of the test that started them, and their logs are attached to the report of a
failing test.
"""

from __future__ import annotations

import os
import signal
import random
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Self
from urllib.parse import urlencode, urlsplit

import pytest

HERE = Path(__file__).resolve().parent
# The repository root: tests/e2e/conftest.py -> two levels up.
REPO_ROOT = HERE.parents[1]

# Helpers (`chat.py`, `rawmqtt.py`) live next to this file; make them importable whatever the
# rootdir or import mode pytest uses.
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

READY_TIMEOUT_S = 20.0
LOG_TAIL_CHARS = 6000


def warren_bin() -> Path:
    """Return the server binary to test, or skip (fail under CI) when there is none.

    Order: `$WARREN_BIN` (relative paths are taken from the repo root), then
    `target/release/warren`, then `target/debug/warren`.
    """
    explicit = os.environ.get("WARREN_BIN")
    candidates: list[Path] = []
    if explicit:
        path = Path(explicit)
        candidates.append(path if path.is_absolute() else REPO_ROOT / path)
    else:
        candidates += [REPO_ROOT / "target/release/warren", REPO_ROOT / "target/debug/warren"]
    for path in candidates:
        if path.is_file() and os.access(path, os.X_OK):
            return path
    why = "warren binary not found (tried: {}); build it with `cargo build --release -p warren-cli` or set WARREN_BIN".format(
        ", ".join(str(p.relative_to(REPO_ROOT)) if p.is_relative_to(REPO_ROOT) else str(p) for p in candidates)
    )
    if explicit or os.environ.get("CI"):
        pytest.fail(why, pytrace=False)
    pytest.skip(why)


_port_lock = threading.Lock()
_ports_given: set[int] = set()


def free_port() -> int:
    """Return a TCP port on 127.0.0.1 that is free now and not handed out before in this run.

    Ports come from below the kernel's ephemeral range (32768+ on Linux), so the outgoing
    connections of tests (or of anything else on the machine) cannot take a port between the
    moment it is chosen here and the moment warren binds it.
    """
    with _port_lock:
        for _ in range(2000):
            port = random.randint(20000, 32000)
            if port in _ports_given:
                continue
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
                try:
                    s.bind(("127.0.0.1", port))
                except OSError:
                    continue
            _ports_given.add(port)
            return port
    raise RuntimeError("no free port found")


def port_open(port: int, host: str = "127.0.0.1", timeout: float = 0.2) -> bool:
    """True when something accepts TCP connections on host:port."""
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def wait_until(pred: Callable[[], Any], timeout: float = 5, interval: float = 0.02, msg: str = "") -> Any:
    """Poll `pred` until it returns something truthy and return that; fail after `timeout` s."""
    deadline = time.monotonic() + timeout
    while True:
        value = pred()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise AssertionError(msg or f"condition not met within {timeout} s: {pred!r}")
        time.sleep(interval)


# Every Warren started during the current test, so it can be killed (and its log reported).
_live: list[Warren] = []


class Warren:
    """One `warren serve` process on free ports, with its stdout/stderr captured to files.

    `listen` entries are `--listen` URLs. An entry may be a bare scheme (`"mqtt+mqant"`), which
    gets `scheme://127.0.0.1:<free port>`, or contain `{port}`, which is replaced by a free port.
    `http=True` puts the web page on a free port (`.http`); `http="127.0.0.1:P"` or an int port
    picks it; `http=False` still moves it to a free port (so it can never collide with the
    default 8080 of another server) but does not wait for it.
    The process starts in the constructor; call `.wait_ready()` before talking to it.
    """

    SCHEMES = ("mqtt", "mqtt+mqant", "ws", "ws+mqant")

    def __init__(
        self,
        *extra_args: str,
        listen: list[str] | tuple[str, ...] | None = None,
        http: bool | int | str = True,
        env: dict[str, str] | None = None,
        command: str = "serve",
    ) -> None:
        self.bin = warren_bin()
        self.listen: list[str] = []
        self.listeners: list[tuple[str, int]] = []
        self.ports: dict[str, int] = {}
        for entry in listen or []:
            url = self._expand(entry)
            parts = urlsplit(url)
            if parts.port is None:
                raise ValueError(f"listener URL without a port: {url}")
            self.listen.append(url)
            self.listeners.append((parts.scheme, parts.port))
            self.ports.setdefault(parts.scheme, parts.port)

        self._wait_http = bool(http)
        if http is True or http is False:
            self.http: int | None = free_port()
        elif isinstance(http, int):
            self.http = http
        else:
            self.http = int(str(http).rsplit(":", 1)[1])
        self.ports.setdefault("http", self.http)

        self.args = [str(self.bin), command]
        if command == "serve":
            self.args.append("--no-demo-listeners")
        for url in self.listen:
            self.args += ["--listen", url]
        if command == "serve":
            self.args += ["--http", f"127.0.0.1:{self.http}"]
        else:
            self._wait_http = False
        self.args += [str(a) for a in extra_args]

        self.env = dict(os.environ)
        self.env["RUST_LOG"] = "info"
        # Logs go to a file: keep them free of terminal colour codes so tests can search them.
        self.env["NO_COLOR"] = "1"
        self.env.update(env or {})

        self.dir = Path(tempfile.mkdtemp(prefix="warren-e2e-"))
        self.stdout_path = self.dir / "stdout.log"
        self.stderr_path = self.dir / "stderr.log"
        self._out = open(self.stdout_path, "wb")
        self._err = open(self.stderr_path, "wb")
        self.proc = subprocess.Popen(
            self.args,
            cwd=REPO_ROOT,
            env=self.env,
            stdin=subprocess.DEVNULL,
            stdout=self._out,
            stderr=self._err,
        )
        _live.append(self)

    # ---- building listener URLs -------------------------------------------------------------

    @staticmethod
    def url(scheme: str, port: int | None = None, **query: Any) -> str:
        """Build `scheme://127.0.0.1:PORT?k=v&...` for `--listen` (a free port unless given)."""
        url = f"{scheme}://127.0.0.1:{port if port is not None else free_port()}"
        if query:
            url += "?" + urlencode({k: str(v) for k, v in query.items()})
        return url

    @classmethod
    def _expand(cls, entry: str) -> str:
        if "://" not in entry:
            return cls.url(entry)
        if "{port}" in entry:
            return entry.replace("{port}", str(free_port()))
        return entry

    # ---- ports by role ----------------------------------------------------------------------

    @property
    def mqtt_mqant(self) -> int | None:
        """Port of the first `mqtt+mqant://` listener."""
        return self.ports.get("mqtt+mqant")

    @property
    def ws_mqant(self) -> int | None:
        """Port of the first `ws+mqant://` listener."""
        return self.ports.get("ws+mqant")

    @property
    def mqtt_plain(self) -> int | None:
        """Port of the first plain `mqtt://` listener."""
        return self.ports.get("mqtt")

    @property
    def ws_plain(self) -> int | None:
        """Port of the first plain `ws://` listener."""
        return self.ports.get("ws")

    # ---- lifecycle --------------------------------------------------------------------------

    def running(self) -> bool:
        """True while the process has not exited."""
        return self.proc.poll() is None

    def wait_ready(self, timeout: float = READY_TIMEOUT_S) -> Warren:
        """Wait until every listener (and the web page) accepts TCP connections."""
        ports = [p for _, p in self.listeners]
        if self._wait_http and self.http is not None:
            ports.append(self.http)
        deadline = time.monotonic() + timeout
        pending = list(ports)
        while pending:
            if not self.running():
                raise RuntimeError(
                    f"warren exited with code {self.proc.returncode} before it was ready\n"
                    f"command: {' '.join(self.args)}\n{self.tail()}"
                )
            pending = [p for p in pending if not port_open(p)]
            if not pending:
                break
            if time.monotonic() >= deadline:
                raise RuntimeError(
                    f"warren not ready after {timeout} s: ports {pending} not accepting\n"
                    f"command: {' '.join(self.args)}\n{self.tail()}"
                )
            time.sleep(0.05)
        return self

    def log(self) -> str:
        """The stderr text (logs) written so far."""
        self._err.flush()
        return self.stderr_path.read_text(errors="replace")

    def stdout(self) -> str:
        """The stdout text (listening lines) written so far."""
        self._out.flush()
        return self.stdout_path.read_text(errors="replace")

    def tail(self, chars: int = LOG_TAIL_CHARS) -> str:
        """The last `chars` characters of stdout and stderr, for error messages."""
        return f"--- warren stdout ---\n{self.stdout()[-chars:]}\n--- warren stderr ---\n{self.log()[-chars:]}"

    def terminate(self, sig: int = signal.SIGTERM, timeout: float = 15) -> int:
        """Send `sig` and wait for exit; returns the exit code (kills and fails on timeout)."""
        if self.running():
            self.proc.send_signal(sig)
        try:
            code = self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise AssertionError(f"warren did not exit within {timeout} s of signal {sig}\n{self.tail()}") from None
        self._close_files()
        return code

    def kill(self) -> None:
        """Kill the process at once (no drain) and reap it."""
        if self.running():
            self.proc.kill()
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            pass
        self._close_files()

    def _close_files(self) -> None:
        for f in (self._out, self._err):
            try:
                f.flush()
            except ValueError:
                pass

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.kill()

    def __repr__(self) -> str:
        return f"Warren(pid={self.proc.pid}, ports={self.ports})"


@pytest.fixture(autouse=True)
def _kill_warrens():
    """Kill every warren a test started, whatever the test did."""
    start = len(_live)
    yield
    for w in _live[start:]:
        w.kill()
    del _live[start:]


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """Attach the logs of the test's warren processes to the report when it fails."""
    outcome = yield
    report = outcome.get_result()
    if report.failed:
        for i, w in enumerate(_live):
            try:
                report.sections.append((f"warren #{i} {w.ports}", w.tail()))
            except OSError:
                pass


@pytest.fixture
def warren_demo():
    """A ready warren with mqtt+mqant, ws+mqant and plain mqtt listeners, `--module Debug`, http.

    Attributes: `.mqtt_mqant`, `.ws_mqant`, `.mqtt_plain`, `.http` (ports).
    """
    w = Warren("--module", "Debug", listen=["mqtt+mqant", "ws+mqant", "mqtt"])
    try:
        w.wait_ready()
        yield w
    finally:
        w.kill()

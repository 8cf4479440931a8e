"""Running the shell blocks of the README and docs/ as written.

The project's rule: every command the README and docs/ show runs verbatim in an end-to-end test,
in the order shown, with nothing added (no extra flags, no other ports). This module is the
harness those tests share (test_readme.py, test_docs_commands.py, test_docs_security.py).

Reading a block (`commands`): a command is one line, with the lines that follow it when it ends
in `\\` or opens a heredoc (`<<'END'` … `END`). A line starting with `#` is a comment; `# → text`
says what the command above prints, on its own output or on that of a command still running (a
background `&` job, a server). A comment at the end of a command line stays in the command: bash
ignores it.

Running a block (`Shell`): the commands run with bash, one after the other, in
- a fresh network, PID and mount namespace (`unshare --net --pid --fork --mount-proc`, as root;
  `unshare -r` adds a user namespace otherwise), so the default ports the docs use (3563, 8080,
  NATS 4222, 1883 …) are free whatever the machine runs, `pgrep` sees only the block's own
  processes, and everything the block started dies with the namespace;
- a fresh directory in which every top-level entry of the repository is a symbolic link (so
  `examples/cluster/gate.toml` resolves) and `target/release/warren` is the binary under test;
  files the commands write (`warren.toml`, certificates, a Redis dump) land there;
- a PATH that starts with a directory holding `warren`, the binary under test, and a `cargo`
  stand-in (see `CARGO_SHIM` and test_readme.py for why `cargo run --release -- …` runs that
  binary rather than a build); TMPDIR is private too (nats-server keeps its JetStream store under
  it) and NO_COLOR=1 keeps logs searchable.

How each command runs: one ending in `&` runs in the background; a server (`warren serve|node`,
`cargo run --release -- serve|node`, `nats-server`, `redis-server`) gets its own "terminal" and
is waited for until it says it is ready, then left running, as a reader leaves it running in its
terminal; a background chat client is waited for until it has joined, a background
`mosquitto_sub` is given a second to subscribe; a command the test lists as interactive gets a
terminal whose keystrokes the test types; any other command runs to completion and must exit 0
unless `# →` lines say what it prints (`(printed by X)`: what the running command X prints). The
harness only waits (for readiness, for a subscriber to subscribe, for output); it adds nothing to
the commands. When the block is done, each command still running gets Ctrl-C
(SIGINT to its processes) in the reverse order of starting, and a warren must then exit 0, as the
README promises.
"""

from __future__ import annotations

import os
import re
import shlex
import signal
import subprocess
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from conftest import REPO_ROOT, warren_bin

# The `cargo` the shells find first. The docs' `cargo run --release -- ARGS` runs the binary under
# test with ARGS (test_readme.py says why); `cargo build --release -p warren-cli` has nothing to
# do, that binary being the release build of this tree. Anything else fails loudly, so a new cargo
# command in the docs cannot pass unnoticed.
CARGO_SHIM = """#!/bin/sh
# stand-in for cargo in the doc tests (tests/e2e/docblocks.py)
case "$*" in
  "run --release --"|"run --release -- "*) shift 3; exec warren "$@" ;;
  "build --release -p warren-cli") exit 0 ;;
esac
echo "cargo stand-in: no mapping for: cargo $*" >&2
exit 127
"""

READY_TIMEOUT_S = 30.0
OUTPUT_TIMEOUT_S = 15.0


# ---- reading blocks ----------------------------------------------------------------------------


@dataclass
class Block:
    """One fenced block of a Markdown file."""

    path: Path
    line: int  # 1-based line of the opening fence
    lang: str
    lines: list[str]

    @property
    def name(self) -> str:
        """`file:line`, relative to the repository, for messages."""
        return f"{self.path.relative_to(REPO_ROOT)}:{self.line}"

    @property
    def first(self) -> str:
        """The first non-blank line: what the inventory names a block by."""
        return next((ln for ln in self.lines if ln.strip()), "")


def blocks(path: Path, lang: str | None = "sh") -> list[Block]:
    """The fenced blocks of `path` in order; only those tagged `lang` unless it is None."""
    out: list[Block] = []
    current: Block | None = None
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if current is None:
            m = re.match(r"^```(\S*)\s*$", line)
            if m:
                current = Block(path, n, m.group(1), [])
        elif line.startswith("```"):
            if lang is None or current.lang == lang:
                out.append(current)
            current = None
        else:
            current.lines.append(line)
    return out


def find_block(path: Path, first: str, lang: str | None = "sh") -> Block:
    """The block of `path` whose first line starts with `first` (exactly one must)."""
    found = [b for b in blocks(path, lang) if b.first.startswith(first)]
    assert len(found) == 1, f"{path.relative_to(REPO_ROOT)}: {len(found)} ```{lang} blocks start with {first!r}"
    return found[0]


def shell_block(text: str, heading: str) -> list[str]:
    """The lines of the first ```sh block after `heading` in `text`."""
    rest = text.split(heading, 1)[1]
    block = rest.split("```sh\n", 1)[1].split("```", 1)[0]
    return block.splitlines()


@dataclass
class Step:
    """One command of a block and what the block says it prints."""

    cmd: str
    expected: list[str] = field(default_factory=list)

    @property
    def background(self) -> bool:
        """Whether the command ends in `&` (before its comment, if any)."""
        code, _ = split_comment(self.cmd)
        return code.rstrip().endswith("&") and not code.rstrip().endswith("&&")

    @property
    def foreground(self) -> str:
        """The command without its trailing `&` (its comment kept)."""
        if not self.background:
            return self.cmd
        code, comment = split_comment(self.cmd)
        return code.rstrip()[:-1].rstrip() + (f"  {comment}" if comment else "")


def split_comment(cmd: str) -> tuple[str, str]:
    """`cmd` as (code, comment): the comment is from the first `#` that starts a word outside
    quotes on the command's last line, to the end."""
    head, _, last = cmd.rpartition("\n")
    quote = ""
    i = 0
    while i < len(last):
        c = last[i]
        if quote:
            if c == quote:
                quote = ""
            elif c == "\\" and quote == '"':
                i += 1
        elif c in "'\"":
            quote = c
        elif c == "\\":
            i += 1
        elif c == "#" and (i == 0 or last[i - 1] in " \t"):
            code = (head + "\n" if head else "") + last[:i]
            return code.rstrip(), last[i:]
        i += 1
    return cmd, ""


def commands(lines: list[str]) -> list[Step]:
    """The commands of a block in order, with their `# →` lines; see the module docstring."""
    out: list[Step] = []
    i = 0
    while i < len(lines):
        line = lines[i]
        i += 1
        if not line.strip():
            continue
        if line.lstrip().startswith("#"):
            m = re.match(r"\s*#\s*→\s*(.*)$", line)
            if m and out:
                out[-1].expected.append(m.group(1).strip())
            continue
        cmd = line
        while cmd.endswith("\\") and i < len(lines):
            cmd += "\n" + lines[i]
            i += 1
        here = re.search(r"<<-?\s*'?(\w+)'?", line)
        if here:
            end = here.group(1)
            while i < len(lines):
                cmd += "\n" + lines[i]
                i += 1
                if lines[i - 1].strip() == end:
                    break
        out.append(Step(cmd))
    return out


def expected_text(note: str) -> str:
    """The text of a `# →` note without its trailing remark (`hi   (printed by mosquitto_sub)`)."""
    return re.split(r"\s{2,}\(", note, maxsplit=1)[0].strip()


# ---- processes in a namespace -------------------------------------------------------------------


def descendants(pid: int) -> list[int]:
    """Every process below `pid`, children first."""
    out: list[int] = []
    todo = [pid]
    while todo:
        p = todo.pop()
        try:
            kids = [int(k) for k in Path(f"/proc/{p}/task/{p}/children").read_text().split()]
        except OSError:
            kids = []
        out += kids
        todo += kids
    return out


class Namespace:
    """Fresh network, PID and mount namespaces, held open by a `sleep` that is their PID 1."""

    def __init__(self) -> None:
        root = os.geteuid() == 0
        user = [] if root else ["-r"]
        self._enter_user = [] if root else ["--user", "--preserve-credentials"]
        self.holder = subprocess.Popen(
            ["unshare", *user, "--net", "--pid", "--fork", "--mount-proc", "--", "sh", "-c", "ip link set lo up && echo up && exec sleep infinity"],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        assert self.holder.stdout is not None
        if self.holder.stdout.readline().strip() != "up":
            err = self.holder.stderr.read() if self.holder.stderr else ""
            raise RuntimeError(f"cannot make a network namespace (unshare, ip from util-linux and iproute2): {err}")
        kids = descendants(self.holder.pid)
        assert kids, "the namespace holder has no child"
        self.init = kids[0]

    def argv(self, cwd: Path, *args: str) -> list[str]:
        """`args` as a command line that runs inside the namespaces, in directory `cwd`."""
        return ["nsenter", "-t", str(self.init), *self._enter_user, "--net", "--pid", "--mount", f"--wd={cwd}", "--", *args]

    def port_open(self, port: int, host: str = "127.0.0.1") -> bool:
        """Whether something accepts TCP connections on host:port inside the namespace."""
        probe = f"exec 3<>/dev/tcp/{host}/{port}"
        return subprocess.run(self.argv(Path("/"), "bash", "-c", probe), capture_output=True).returncode == 0

    def close(self) -> None:
        """Kill the namespace's PID 1, and with it every process inside."""
        try:
            os.kill(self.init, signal.SIGKILL)
        except ProcessLookupError:
            pass
        try:
            self.holder.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.holder.kill()


class Terminal:
    """One command running in the namespace, as in a terminal window of its own."""

    def __init__(self, ns: Namespace, cmd: str, cwd: Path, env: dict[str, str], log: Path, stdin: bool) -> None:
        self.cmd = cmd
        self.log_path = log
        self._log = open(log, "wb")
        self.proc = subprocess.Popen(
            ns.argv(cwd, "bash", "-c", cmd),
            cwd=cwd,
            env=env,
            stdin=subprocess.PIPE if stdin else subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    def raw(self) -> bytes:
        """Everything the command printed so far (stdout and stderr)."""
        self._log.flush()
        return self.log_path.read_bytes()

    def output(self) -> str:
        """`raw()` as text."""
        return self.raw().decode(errors="replace")

    def running(self) -> bool:
        """True while the command has not exited."""
        return self.proc.poll() is None

    def type(self, text: str) -> None:
        """Type `text` (with its `\\n` for Enter) into the command's standard input."""
        assert self.proc.stdin is not None, f"{self.cmd!r} has no terminal input"
        self.proc.stdin.write(text.encode())
        self.proc.stdin.flush()

    def end_input(self) -> None:
        """Ctrl-D: close the standard input."""
        if self.proc.stdin is not None and not self.proc.stdin.closed:
            self.proc.stdin.close()

    def wait_for(self, text: str, timeout: float = OUTPUT_TIMEOUT_S) -> str:
        """Wait until the output contains `text` (or the command exits without it); the output."""
        deadline = time.monotonic() + timeout
        while True:
            out = self.output()
            if text in out:
                return out
            if not self.running():
                out = self.output()
                assert text in out, f"{self.cmd!r} exited ({self.proc.returncode}) without printing {text!r}:\n{out[-4000:]}"
                return out
            assert time.monotonic() < deadline, f"{self.cmd!r} did not print {text!r} within {timeout} s:\n{out[-4000:]}"
            time.sleep(0.05)

    def wait(self, timeout: float = OUTPUT_TIMEOUT_S) -> int:
        """Wait for the command to exit; its exit code."""
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"{self.cmd!r} still runs after {timeout} s:\n{self.output()[-4000:]}") from None

    def interrupt(self, timeout: float = 30) -> int:
        """Ctrl-C: SIGINT to the command's processes; its exit code once it has exited."""
        if self.running():
            for pid in descendants(self.proc.pid):
                try:
                    os.kill(pid, signal.SIGINT)
                except ProcessLookupError:
                    pass
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise AssertionError(f"{self.cmd!r} did not stop within {timeout} s of Ctrl-C:\n{self.output()[-4000:]}") from None

    def kill(self) -> None:
        """Kill the command and everything it started."""
        for pid in [*descendants(self.proc.pid), self.proc.pid]:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            pass

    def close(self) -> None:
        """Release the log file and the input pipe."""
        self.end_input()
        self._log.close()


# ---- a reader's session -------------------------------------------------------------------------

# What a server prints once it serves: (pattern of the command, text in its output).
READY = [
    (re.compile(r"^(\S*/)?warren\s+(serve|node)\b|^cargo run --release -- (serve|node)\b"), re.compile(r'^warren \S+ node ".*" ready', re.M)),
    (re.compile(r"^nats-server\b"), re.compile(r"Server is ready")),
    (re.compile(r"^redis-server\b"), re.compile(r"Ready to accept connections")),
]
# What a background client prints once it is in (the next command may count on it).
GOING = [
    (re.compile(r"^python3 \S*chat_client\.py\b"), re.compile(r"^joined \S+ as ", re.M)),
]
# Background clients that subscribe: given a moment to do so before the next command publishes.
SUBSCRIBERS = re.compile(r"^mosquitto_sub\b")
WARREN = re.compile(r"^(\S*/)?warren\s|^cargo run\b")

Interactive = Callable[["Shell", Terminal], None]


class Shell:
    """A reader at a terminal: a namespace, a working directory and PATH (module docstring)."""

    def __init__(self, tmp: Path, name: str = "shell", cwd: str = ".") -> None:
        self.dir = Path(tempfile.mkdtemp(prefix=f"{name}-", dir=tmp))
        self.work = self.dir / "work"
        self.work.mkdir()
        for entry in REPO_ROOT.iterdir():
            if entry.name not in ("target", ".git"):
                (self.work / entry.name).symlink_to(entry)
        binary = Path(warren_bin()).resolve()
        (self.work / "target" / "release").mkdir(parents=True)
        (self.work / "target" / "release" / "warren").symlink_to(binary)
        bindir = self.dir / "bin"
        bindir.mkdir()
        (bindir / "warren").symlink_to(binary)
        (bindir / "cargo").write_text(CARGO_SHIM)
        (bindir / "cargo").chmod(0o755)
        (self.dir / "tmp").mkdir()
        self.cwd = self.work / cwd
        self.env = dict(os.environ)
        self.env.update(PATH=f"{bindir}:{self.env['PATH']}", TMPDIR=str(self.dir / "tmp"), NO_COLOR="1")
        for key in ("RUST_LOG", "WARREN_BIN"):
            self.env.pop(key, None)
        self.ns = Namespace()
        self.terminals: list[Terminal] = []
        # what each command run to completion printed, by command
        self.outputs: dict[str, str] = {}
        self._n = 0

    # ---- starting and running commands ----------------------------------------------------------

    def start(self, cmd: str, stdin: bool = False, cwd: Path | None = None) -> Terminal:
        """Start `cmd` in a terminal of its own and leave it running."""
        self._n += 1
        t = Terminal(self.ns, cmd, cwd or self.cwd, self.env, self.dir / f"term{self._n}.log", stdin)
        self.terminals.append(t)
        return t

    def run(self, cmd: str, timeout: float = 120, stdin: bytes | None = None, cwd: Path | None = None) -> subprocess.CompletedProcess:
        """Run `cmd` to completion; output is stdout and stderr together, as text."""
        cwd = cwd or self.cwd
        try:
            r = subprocess.run(
                self.ns.argv(cwd, "bash", "-c", cmd),
                cwd=cwd,
                env=self.env,
                input=stdin if stdin is not None else b"",
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                timeout=timeout,
            )
        except subprocess.TimeoutExpired as e:
            said = (e.output or b"").decode(errors="replace")
            raise AssertionError(f"{cmd!r} still runs after {timeout} s; it printed:\n{said[-4000:]}") from None
        return subprocess.CompletedProcess(r.args, r.returncode, r.stdout.decode(errors="replace"), "")

    def port_open(self, port: int) -> bool:
        """Whether 127.0.0.1:port accepts connections in this shell's namespace."""
        return self.ns.port_open(port)

    def wait_ready(self, t: Terminal) -> None:
        """Wait until the server (or background client) in `t` says it is ready."""
        for cmd_re, ready_re in READY + GOING:
            if cmd_re.search(t.cmd):
                deadline = time.monotonic() + READY_TIMEOUT_S
                while not ready_re.search(t.output()):
                    assert t.running(), f"{t.cmd!r} exited with {t.proc.returncode} before it was ready:\n{t.output()[-4000:]}"
                    assert time.monotonic() < deadline, f"{t.cmd!r} not ready within {READY_TIMEOUT_S} s:\n{t.output()[-4000:]}"
                    time.sleep(0.05)
                return
        raise AssertionError(f"no readiness rule for {t.cmd!r} (tests/e2e/docblocks.py, READY)")

    def is_server(self, cmd: str) -> bool:
        """Whether `cmd` starts a server (see READY)."""
        return any(cmd_re.search(cmd) for cmd_re, _ in READY)

    def expect(self, note: str, own: str = "", timeout: float = OUTPUT_TIMEOUT_S) -> None:
        """The text of a `# →` note is in `own` output or, within `timeout`, in a terminal's."""
        text = expected_text(note)
        by = re.search(r"\(printed by (\S+)\)", note)
        if text in own and not by:
            return
        terminals = [t for t in self.terminals if not by or t.cmd.startswith(by.group(1))]
        assert terminals, f"no command {by.group(1) if by else ''!r} runs to print {text!r}"
        deadline = time.monotonic() + timeout
        while True:
            if any(text in t.output() for t in terminals):
                return
            if time.monotonic() >= deadline:
                shown = "\n".join(f"--- {t.cmd}\n{t.output()[-2000:]}" for t in self.terminals)
                raise AssertionError(f"nothing printed {text!r}; the command said {own!r}\n{shown}")
            time.sleep(0.05)

    def walk(self, steps: list[Step], interactive: dict[str, Interactive] | None = None, cwd: Path | None = None) -> dict[str, Terminal]:
        """Run `steps` as the module docstring says (in `cwd`, a directory of the shell's work
        directory, when given); the terminals left running, by command."""
        interactive = interactive or {}
        started: dict[str, Terminal] = {}
        for step in steps:
            cmd = step.foreground
            own = ""
            if cmd in interactive:
                t = self.start(cmd, stdin=True, cwd=cwd)
                started[cmd] = t
                interactive[cmd](self, t)
            elif step.background or self.is_server(cmd):
                t = self.start(cmd, cwd=cwd)
                started[cmd] = t
                if SUBSCRIBERS.search(cmd):
                    time.sleep(1.0)  # a moment to connect and subscribe before anything publishes
                    assert t.running(), f"{cmd!r} exited:\n{t.output()}"
                elif self.is_server(cmd) or any(c.search(cmd) for c, _ in GOING):
                    self.wait_ready(t)
            else:
                r = self.run(cmd, cwd=cwd)
                own = self.outputs[cmd] = r.stdout
                if not step.expected:
                    assert r.returncode == 0, f"{cmd!r} failed ({r.returncode}):\n{r.stdout}"
            for note in step.expected:
                self.expect(note, own=own)
        return started

    # ---- ending -----------------------------------------------------------------------------

    def close(self, check: bool = True) -> None:
        """Ctrl-C every command still running, newest first; a warren must exit 0. Then the
        namespace goes, with whatever is left in it."""
        failures: list[str] = []
        try:
            for t in reversed(self.terminals):
                if not t.running():
                    continue
                try:
                    code = t.interrupt()
                except AssertionError as e:
                    failures.append(str(e))
                    continue
                if check and WARREN.search(t.cmd) and code != 0:
                    failures.append(f"{t.cmd!r} exited with {code} after Ctrl-C, not 0:\n{t.output()[-3000:]}")
        finally:
            for t in self.terminals:
                t.kill()
                t.close()
            self.ns.close()
        assert not failures, "\n".join(failures)

    def __enter__(self) -> Shell:
        return self

    def __exit__(self, exc_type, *rest) -> None:
        self.close(check=exc_type is None)


# ---- checks the tests share ----------------------------------------------------------------------


def wait_normalized(t: Terminal, text: str) -> None:
    """Wait until the output, CR LF read as LF, contains `text`."""
    deadline = time.monotonic() + OUTPUT_TIMEOUT_S
    while text not in t.raw().decode(errors="replace").replace("\r\n", "\n"):
        assert time.monotonic() < deadline, f"{t.cmd!r} did not print {text!r}:\n{t.output()!r}"
        time.sleep(0.05)


def chat_through(sh: Shell, port: int = 3563) -> None:
    """The test's own check that the chat works through the servers `sh` runs: alice waits in the
    room, bob logs in, joins and says something, alice sees it."""
    client = "examples/chat/client/chat_client.py"
    alice = sh.start(quoted("python3", client, "--port", str(port), "--user", "alice", "--linger", "30", "--until", "bob: hello through the cluster"))
    alice.wait_for("joined mqant as alice")
    bob = sh.run(quoted("python3", client, "--port", str(port), "--user", "bob", "--say", "hello through the cluster"))
    assert bob.returncode == 0, bob.stdout
    assert "joined mqant as bob (here: alice, bob)" in bob.stdout, bob.stdout
    assert alice.wait(timeout=30) == 0, alice.output()
    assert "[mqant] bob: hello through the cluster" in alice.output()


def nodes_joined(gate: Terminal, *nodes: str) -> None:
    """The gate logged each module node joining (docs/cluster.md: `node joined node=chat1`)."""
    for n in nodes:
        deadline = time.monotonic() + READY_TIMEOUT_S
        while not re.search(rf"node joined.*\bnode={n}\b", gate.output()):
            assert gate.running(), f"the gate exited ({gate.proc.returncode}):\n{gate.output()[-4000:]}"
            assert time.monotonic() < deadline, f"the gate never logged `node joined node={n}`:\n{gate.output()[-4000:]}"
            time.sleep(0.05)


def quoted(*args: str) -> str:
    """A command line of `args`, quoted for bash (for the tests' own checks, not doc commands)."""
    return " ".join(shlex.quote(a) for a in args)

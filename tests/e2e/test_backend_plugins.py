"""Backend groups from module plugins (docs/plugins.md "Backend groups", docs/backends.md), against
the real binary.

A `[[backend]]` static group holds one TCP service speaking the gobase test codec
(`msgid u32 LE · len u32 LE · body`). A Lua and a Python module each call it with
`warren.backend_call` from a handler and return the answer to an MQTT client; the errors a script
sees are the gobase words (`timeout`, `no service`, and `rpcId exist` for a second call waiting
for the same answer on one service); `warren.backend_send` makes the service push a
frame no call waits for, which reaches the `on_backend_msg` of both plugins, and each passes it on
to the sessions in its room.
"""

from __future__ import annotations

import socket
import threading
from pathlib import Path

import pytest
from chat import ChatClient
from conftest import Warren, free_port, port_open, wait_until
from frame_service import FrameService

WAIT_S = 10.0


class Service(FrameService):
    """A TCP service on 127.0.0.1:`port`: msgid 10 is answered with msgid 11 and `echo:` + body,
    msgid 12 never, and msgid 20 makes it push msgid 30 with `pushed:` + body."""

    def __init__(self, port: int) -> None:
        self.unanswered = 0  # frames of msgid 12 received
        super().__init__(port)

    def on_frame(self, conn: socket.socket, msgid: int, body: bytes) -> None:
        if msgid == 12:
            self.unanswered += 1
        out = {10: (11, b"echo:" + body), 20: (30, b"pushed:" + body)}.get(msgid)
        if out is not None:
            self.send(conn, *out)


LUA = """
function HD_Ask(session, msg)
  return warren.backend_call("game", session.id, 10, msg)
end

function HD_AskG1(session, msg)
  return warren.backend_call_to("game", "g1", 10, msg)
end

function HD_Slow(session, msg)
  local ok, e = pcall(warren.backend_call, "game", "k", 12, msg, 0.3)
  return tostring(ok) .. " " .. tostring(e)
end

function HD_Hold(session, msg)
  local ok, e = pcall(warren.backend_call, "game", "k", 12, msg, tonumber(msg))
  return tostring(ok) .. " " .. tostring(e)
end

function HD_Nowhere(session, msg)
  local ok, e = pcall(warren.backend_call, "nope", "k", 10, msg)
  return tostring(ok) .. " " .. tostring(e)
end

function HD_Watch(session, msg)
  warren.room_add("lua-watchers")
  return "watching"
end

function HD_Poke(session, msg)
  warren.backend_send("game", session.id, 20, msg)
  return "sent"
end

function on_backend_msg(group, service, msgid, body)
  warren.log("info", "lua on_backend_msg", group, service, msgid, body)
  warren.room_broadcast("lua-watchers", "LuaGame/OnBackend",
    "lua " .. group .. " " .. service .. " " .. msgid .. " " .. body)
end
"""

PY = """
import warren


def HD_Ask(session, msg):
    return warren.backend_call("game", session.id, 10, msg).decode()


def HD_AskG1(session, msg):
    return warren.backend_call_to("game", "g1", 10, msg).decode()


def HD_Slow(session, msg):
    try:
        warren.backend_call("game", "k", 12, msg, 0.3)
        return "true"
    except Exception as e:
        return "false " + str(e)


def HD_Hold(session, msg):
    try:
        warren.backend_call("game", "k", 12, msg, float(msg))
        return "true"
    except Exception as e:
        return "false " + str(e)


def HD_Nowhere(session, msg):
    try:
        warren.backend_call("nope", "k", 10, msg)
        return "true"
    except Exception as e:
        return "false " + str(e)


def HD_Watch(session, msg):
    warren.room_add("py-watchers")
    return "watching"


def HD_Poke(session, msg):
    warren.backend_send_to("game", "g1", 20, msg)
    return "sent"


def on_backend_msg(group, service, msgid, body):
    warren.log("info", "py on_backend_msg", group, service, msgid, body.decode())
    warren.room_broadcast("py-watchers", "PyGame/OnBackend", f"py {group} {service} {msgid} {body.decode()}")
"""

HANDLERS = '["HD_Ask", "HD_AskG1", "HD_Slow", "HD_Hold", "HD_Nowhere", "HD_Watch", "HD_Poke"]'


def node(tmp_path: Path, service_port: int) -> tuple[Warren, int]:
    (tmp_path / "game.lua").write_text(LUA)
    (tmp_path / "game.py").write_text(PY)
    port = free_port()
    cfg = tmp_path / "warren.toml"
    cfg.write_text(
        f'[[listener]]\naddr = "127.0.0.1:{port}"\n\n'
        f'[[module]]\ntype = "LuaGame"\nplugin = "game.lua"\nlogin_handlers = {HANDLERS}\n\n'
        f'[[module]]\ntype = "PyGame"\nplugin = "game.py"\nlogin_handlers = {HANDLERS}\n\n'
        '[[backend]]\ngroup = "game"\ndial_timeout_s = 2\nservices = [\n'
        f'  {{ serviceid = "g1", serviceaddr = "127.0.0.1", serviceport = {service_port} }},\n]\n'
    )
    w = Warren("--config", str(cfg), http=False).wait_ready()
    wait_until(lambda: port_open(port) or not w.running(), WAIT_S, msg=f"port {port} not open\n{w.tail()}")
    wait_until(lambda: "backend connected" in w.log(), WAIT_S, msg=f"the group connects\n{w.tail()}")
    return w, port


def test_plugins_call_send_and_hear_a_backend_group(tmp_path: Path):
    service = Service(free_port())
    w, port = node(tmp_path, service.port)
    try:
        with ChatClient(port) as c:
            # a call from a handler: the answer's body is the reply
            for module in ["LuaGame", "PyGame"]:
                assert c.request(f"{module}/HD_Ask/1", "hi", raw=True) == b'{"Error":"","Result":"echo:hi"}'
                # the same call to the service named by its id
                assert c.request(f"{module}/HD_AskG1/1", "yo", raw=True) == b'{"Error":"","Result":"echo:yo"}'
                # no answer within the call's timeout; a group that does not exist
                slow = c.request(f"{module}/HD_Slow/1", "x")["Result"]
                assert slow.startswith("false") and "timeout" in slow, slow
                nowhere = c.request(f"{module}/HD_Nowhere/1", "x")["Result"]
                assert nowhere.startswith("false") and "no service" in nowhere, nowhere

            # a frame no call waits for reaches every plugin's on_backend_msg, in order
            assert c.request("LuaGame/HD_Watch/1", "")["Result"] == "watching"
            assert c.request("PyGame/HD_Watch/1", "")["Result"] == "watching"
            assert c.request("LuaGame/HD_Poke/1", "one")["Result"] == "sent"
            assert c.request("PyGame/HD_Poke/1", "two")["Result"] == "sent"
            got = [
                c.wait_push("LuaGame/OnBackend", timeout=WAIT_S),
                c.wait_push("LuaGame/OnBackend", timeout=WAIT_S),
                c.wait_push("PyGame/OnBackend", timeout=WAIT_S),
                c.wait_push("PyGame/OnBackend", timeout=WAIT_S),
            ]
            as_text = [g.decode() if isinstance(g, bytes) else str(g) for g in got]
            assert as_text == [
                "lua game g1 30 pushed:one",
                "lua game g1 30 pushed:two",
                "py game g1 30 pushed:one",
                "py game g1 30 pushed:two",
            ], as_text
        assert "lua on_backend_msg" in w.log() and "py on_backend_msg" in w.log()
        assert w.running()
        assert w.terminate() == 0
    finally:
        w.kill()
        service.stop()


@pytest.mark.parametrize("module", ["LuaGame", "PyGame"])
def test_a_second_call_waiting_for_the_same_answer_is_refused(module: str, tmp_path: Path):
    """gobase's rule: one call per answer msgid and service; the second gets `rpcId exist`."""
    service = Service(free_port())
    w, port = node(tmp_path, service.port)
    try:
        with ChatClient(port) as a, ChatClient(port) as b:
            first: list = []
            t = threading.Thread(target=lambda: first.append(a.request(f"{module}/HD_Hold/1", "3", timeout=WAIT_S)))
            t.start()
            # the waiter is in place before the frame is written
            wait_until(lambda: service.unanswered == 1, WAIT_S, msg="the first call reaches the service")
            second = b.request(f"{module}/HD_Hold/1", "1")["Result"]
            assert second.startswith("false") and "rpcId exist" in second, second
            t.join(WAIT_S)
            assert first and first[0]["Result"].startswith("false") and "timeout" in first[0]["Result"], first
        assert w.running()
    finally:
        w.kill()
        service.stop()


HTTP_LUA = """
function HD_Web(session, msg)
  local status, body = warren.http_call("web", session.id, "POST", "/echo?from=lua", msg)
  return status .. " " .. body
end

function HD_Missing(session, msg)
  local status, body = warren.http_call("web", "k", "GET", "/nothing")
  return status .. " " .. body
end

function HD_NoGroup(session, msg)
  local ok, e = pcall(warren.http_call, "nope", "k", "GET", "/")
  return tostring(ok) .. " " .. tostring(e)
end
"""

HTTP_PY = """
import warren


def HD_Web(session, msg):
    status, body = warren.http_call("web", session.id, "POST", "/echo?from=py", msg)
    return f"{status} {body.decode()}"


def HD_Missing(session, msg):
    status, body = warren.http_call("web", "k", "GET", "/nothing")
    return f"{status} {body.decode()}"


def HD_NoGroup(session, msg):
    try:
        warren.http_call("nope", "k", "GET", "/")
        return "true"
    except Exception as e:
        return "false " + str(e)
"""


class WebService:
    """An HTTP service: GET /health is 200, POST /echo answers 200 with the query and the body,
    anything else 404."""

    def __init__(self) -> None:
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

        class Handler(BaseHTTPRequestHandler):
            def _answer(self, status: int, body: bytes) -> None:
                self.send_response(status)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def do_GET(self) -> None:  # noqa: N802 (the server's method name)
                self._answer(200 if self.path == "/health" else 404, b"ok" if self.path == "/health" else b"not here")

            def do_POST(self) -> None:  # noqa: N802
                n = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(n)
                if self.path.startswith("/echo?"):
                    self._answer(200, self.path.split("?", 1)[1].encode() + b":" + body)
                else:
                    self._answer(404, b"not here")

            def log_message(self, *_args) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def test_plugins_call_an_http_backend_group(tmp_path: Path):
    web = WebService()
    (tmp_path / "web.lua").write_text(HTTP_LUA)
    (tmp_path / "web.py").write_text(HTTP_PY)
    port = free_port()
    handlers = '["HD_Web", "HD_Missing", "HD_NoGroup"]'
    cfg = tmp_path / "warren.toml"
    cfg.write_text(
        f'[[listener]]\naddr = "127.0.0.1:{port}"\n\n'
        f'[[module]]\ntype = "LuaWeb"\nplugin = "web.lua"\nlogin_handlers = {handlers}\n\n'
        f'[[module]]\ntype = "PyWeb"\nplugin = "web.py"\nlogin_handlers = {handlers}\n\n'
        '[[backend]]\nkind = "http"\ngroup = "web"\nhealth_path = "/health"\nservices = [\n'
        f'  {{ serviceid = "web1", serviceaddr = "127.0.0.1", serviceport = {web.port} }},\n]\n'
    )
    w = Warren("--config", str(cfg), http=False).wait_ready()
    try:
        wait_until(lambda: port_open(port) or not w.running(), WAIT_S, msg=f"port {port} not open\n{w.tail()}")
        wait_until(lambda: "http backend healthy" in w.log(), WAIT_S, msg=f"the probe passes\n{w.tail()}")
        with ChatClient(port) as c:
            for module, lang in [("LuaWeb", "lua"), ("PyWeb", "py")]:
                assert c.request(f"{module}/HD_Web/1", "hi")["Result"] == f"200 from={lang}:hi"
                # any status is an answer the script reads
                assert c.request(f"{module}/HD_Missing/1", "")["Result"] == "404 not here"
                nogroup = c.request(f"{module}/HD_NoGroup/1", "")["Result"]
                assert nogroup.startswith("false") and "no service" in nogroup, nogroup
        assert w.running()
    finally:
        w.kill()
        web.stop()

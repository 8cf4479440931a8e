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

HANDLERS = '["HD_Ask", "HD_Slow", "HD_Hold", "HD_Nowhere", "HD_Watch", "HD_Poke"]'


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

#!/usr/bin/env python3
"""Terminal client for the warren chat demo (the mqant v1.1 chat contract).

Connects over MQTT (TCP, or WebSocket with --ws), logs in, joins a room, prints what the room
says, and sends what you type. See README.md beside this file.
"""

from __future__ import annotations

import argparse
import json
import secrets
import sys
import threading
import time
from typing import Any

try:
    import paho.mqtt.client as mqtt
    from paho.mqtt.enums import CallbackAPIVersion
except ImportError:  # pragma: no cover - depends on the machine
    sys.stderr.write("error: paho-mqtt 2.x is required: python3 -m pip install 'paho-mqtt>=2,<3'\n")
    sys.exit(1)

EXIT_OK = 0
EXIT_ERROR = 1
EXIT_UNREACHABLE = 2
EXIT_REFUSED = 3

# Upstream's Python client sends these MQTT credentials; warren's default auth accepts anything.
MQTT_USER = "admin"
MQTT_PASSWORD = "password"


class ChatFailure(Exception):
    """Something that ends the client, with the exit code to use."""

    def __init__(self, message: str, code: int = EXIT_ERROR) -> None:
        super().__init__(message)
        self.code = code


class Chat:
    """One connection: request/reply on `Module/Handler/<n>` and printing of room pushes."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.room = args.room
        self.user = args.user
        self._n = 0
        self._lock = threading.Condition()
        self._replies: dict[str, bytes] = {}
        self._connack: int | None = None
        self._lost = threading.Event()
        self._closing = False
        self.until_seen = threading.Event()
        transport = "websockets" if args.ws else "tcp"
        self.client = mqtt.Client(
            callback_api_version=CallbackAPIVersion.VERSION2,
            client_id=args.client_id or "chat-" + secrets.token_hex(4),
            transport=transport,
            protocol=mqtt.MQTTv311 if args.mqtt311 else mqtt.MQTTv31,
            reconnect_on_failure=False,
        )
        if args.ws:
            self.client.ws_set_options(path=args.path)
        self.client.username_pw_set(MQTT_USER, MQTT_PASSWORD)
        self.client.on_connect = self._on_connect
        self.client.on_disconnect = self._on_disconnect
        self.client.on_message = self._on_message

    # ---- output -----------------------------------------------------------------------------

    def say_line(self, text: str) -> None:
        """Print one line at once (other programs read this output line by line)."""
        with self._lock:
            print(text, flush=True)
        if self.args.until and self.args.until in text:
            self.until_seen.set()

    # ---- connection -------------------------------------------------------------------------

    def connect(self) -> None:
        where = f"{self.args.host}:{self.args.port}"
        try:
            self.client.connect(self.args.host, self.args.port, keepalive=60)
        except OSError as e:
            raise ChatFailure(f"cannot connect to {where}: {e.strerror or e}", EXIT_UNREACHABLE) from None
        self.client.loop_start()
        with self._lock:
            done = self._lock.wait_for(lambda: self._connack is not None or self._lost.is_set(), self.args.timeout)
        if not done or self._connack is None:
            raise ChatFailure(f"no MQTT answer from {where}", EXIT_UNREACHABLE)
        if self._connack != 0:
            raise ChatFailure(f"{where} refused the connection (code {self._connack})", EXIT_REFUSED)

    def close(self) -> None:
        self._closing = True
        try:
            self.client.disconnect()
        except (OSError, ValueError):
            pass
        self.client.loop_stop()

    def _on_connect(self, client, userdata, flags, reason_code, properties) -> None:
        with self._lock:
            self._connack = 0 if not reason_code.is_failure else int(reason_code.value)
            self._lock.notify_all()

    def _on_disconnect(self, client, userdata, flags, reason_code, properties) -> None:
        self._lost.set()
        with self._lock:
            self._lock.notify_all()
        if not self._closing:
            self.say_line("! connection lost")

    def _on_message(self, client, userdata, msg: mqtt.MQTTMessage) -> None:
        with self._lock:
            if msg.topic in self._replies or msg.topic.count("/") >= 2:
                self._replies[msg.topic] = bytes(msg.payload)
                self._lock.notify_all()
                return
        self._show_push(msg.topic, msg.payload)

    def _show_push(self, topic: str, payload: bytes) -> None:
        try:
            body = json.loads(payload)
        except ValueError:
            self.say_line(f"? {topic}: {payload!r}")
            return
        if not isinstance(body, dict):
            self.say_line(f"? {topic}: {body!r}")
        elif topic == "Chat/OnChat":
            target = body.get("target", "*")
            whisper = "" if target == "*" else f" (to {target})"
            self.say_line(f"[{body.get('roomName', '?')}] {body.get('from', '?')}{whisper}: {body.get('msg', '')}")
        elif topic == "Chat/OnJoin":
            self.say_line(f"* {body.get('user', '?')} joined")
        elif topic == "Chat/OnLeave":
            self.say_line(f"* {body.get('user', '?')} left")
        else:
            self.say_line(f"? {topic}: {json.dumps(body)}")

    # ---- requests ---------------------------------------------------------------------------

    def request(self, route: str, body: dict[str, Any]) -> dict[str, Any]:
        """Send `body` to `Module/Handler` and wait for the `{"Error","Result"}` reply."""
        self._n += 1
        topic = f"{route}/{self._n}"
        with self._lock:
            self._replies.pop(topic, None)
        info = self.client.publish(topic, json.dumps(body), qos=1)
        if info.rc != mqtt.MQTT_ERR_SUCCESS:
            raise ChatFailure(f"cannot send {route}: {mqtt.error_string(info.rc)}")
        with self._lock:
            got = self._lock.wait_for(lambda: topic in self._replies or self._lost.is_set(), self.args.timeout)
            raw = self._replies.pop(topic, None)
        if raw is None:
            raise ChatFailure("connection lost" if got else f"no reply to {route} within {self.args.timeout} s")
        try:
            reply = json.loads(raw)
        except ValueError:
            raise ChatFailure(f"bad reply to {route}: {raw!r}") from None
        if not isinstance(reply, dict):
            raise ChatFailure(f"bad reply to {route}: {raw!r}")
        return reply

    def login(self) -> None:
        reply = self.request("Login/HD_Login", {"userName": self.user, "passWord": self.args.password})
        result = reply.get("Result")
        if reply.get("Error") or not (isinstance(result, str) and result.startswith("login success")):
            why = reply.get("Error") or result
            raise ChatFailure(f"login failed: {why}", EXIT_REFUSED)

    def join(self) -> None:
        reply = self.request("Chat/HD_JoinChat", {"roomName": self.room})
        if reply.get("Error"):
            raise ChatFailure(f"cannot join {self.room}: {reply['Error']}", EXIT_REFUSED)
        users = (reply.get("Result") or {}).get("users", [])
        self.say_line(f"joined {self.room} as {self.user} (here: {', '.join(users)})")

    def send_line(self, line: str) -> bool:
        """Act on one typed line; returns False when the user asked to quit."""
        line = line.strip()
        if not line:
            return True
        if line in ("/quit", "/exit"):
            return False
        target = "*"
        if line.startswith(("/w ", "/whisper ")):
            parts = line.split(None, 2)
            if len(parts) < 3:
                self.say_line("! usage: /w USER TEXT")
                return True
            target, line = parts[1], parts[2]
        elif line.startswith("/"):
            self.say_line("! commands: /w USER TEXT, /quit")
            return True
        body = {"roomName": self.room, "from": self.user, "target": target, "content": line}
        reply = self.request("Chat/HD_Say", body)
        if reply.get("Error"):
            self.say_line(f"! {reply['Error']}")
        return True


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="Terminal client for the warren chat demo.")
    p.add_argument("--host", default="127.0.0.1", help="server host (default 127.0.0.1)")
    p.add_argument("--port", type=int, help="server port (default 3563, or 3653 with --ws)")
    p.add_argument("--ws", action="store_true", help="connect over WebSocket instead of TCP")
    p.add_argument("--path", default="/mqtt", help="WebSocket path (default /mqtt)")
    p.add_argument("--mqtt311", action="store_true", help="speak MQTT 3.1.1 instead of 3.1")
    p.add_argument("--user", required=True, help="user name to log in as")
    p.add_argument("--password", default="Hello,anyone!", help="login password (not checked by the demo)")
    p.add_argument("--room", default="mqant", help="room to join (default mqant)")
    p.add_argument("--client-id", help="MQTT client id (default random)")
    p.add_argument("--say", action="append", metavar="TEXT", help="send TEXT (repeatable), then linger and exit")
    p.add_argument("--linger", type=float, help="seconds to keep printing after the --say lines (default 1)")
    p.add_argument("--until", metavar="TEXT", help="with --linger: exit early once a printed line contains TEXT")
    p.add_argument("--timeout", type=float, default=5, help="seconds to wait for the server (default 5)")
    args = p.parse_args(argv)
    if args.port is None:
        args.port = 3653 if args.ws else 3563
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    scripted = args.say is not None or args.linger is not None
    chat = Chat(args)
    try:
        chat.connect()
        chat.login()
        chat.join()
        if scripted:
            for line in args.say or []:
                if not chat.send_line(line):
                    return EXIT_OK
            linger = 1.0 if args.linger is None else args.linger
            deadline = time.monotonic() + linger
            while not chat._lost.is_set() and not chat.until_seen.is_set():
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                chat.until_seen.wait(min(left, 0.1))
            if chat._lost.is_set():
                return EXIT_ERROR
            return EXIT_OK
        chat.say_line("type to talk, /w USER TEXT to whisper, /quit to leave")
        for line in sys.stdin:
            if chat._lost.is_set():
                return EXIT_ERROR
            if not chat.send_line(line):
                break
        return EXIT_OK
    except ChatFailure as e:
        sys.stderr.write(f"error: {e}\n")
        return e.code
    except KeyboardInterrupt:
        return EXIT_OK
    finally:
        chat.close()


if __name__ == "__main__":
    sys.exit(main())

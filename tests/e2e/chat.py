"""A paho-mqtt client that speaks the chat demo contract (examples/chat/README.md).

Requests are published on `Module/Handler/<n>` and their reply arrives on the identical topic;
everything else the server publishes to the session is a push. The client records replies and
pushes in one arrival-ordered history so tests can check that a handler's pushes precede its reply.
"""

from __future__ import annotations

import json
import secrets
import socket
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Self

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

MQTTv31 = mqtt.MQTTv31
MQTTv311 = mqtt.MQTTv311

DEFAULT_PASSWORD = "Hello,anyone!"


class ChatError(Exception):
    """A connect or request failure seen by the client (timeout, refused CONNACK, ...)."""


def _parse(payload: bytes) -> Any:
    try:
        return json.loads(payload)
    except (ValueError, UnicodeDecodeError):
        return payload


@dataclass(frozen=True)
class Message:
    """One PUBLISH received from the server: a reply to a request, or a push."""

    kind: str  # "reply" or "push"
    topic: str
    body: Any  # parsed JSON, or the raw bytes when the payload is not JSON
    raw: bytes
    qos: int
    retain: bool


class _Waiter:
    def __init__(self) -> None:
        self.event = threading.Event()
        self.payload: bytes | None = None


class ChatClient:
    """One MQTT connection to a warren mqant-mode listener, with request/reply and push helpers.

    `transport` is `"tcp"` or `"websockets"` (path `ws_path`); `protocol` is `MQTTv31`
    (`MQIsdp`) or `MQTTv311`. The constructor connects and waits for CONNACK (raising
    `ChatError` with the return code on refusal) unless `connect=False`.
    """

    def __init__(
        self,
        port: int,
        transport: str = "tcp",
        protocol: int = MQTTv311,
        client_id: str | None = None,
        *,
        host: str = "127.0.0.1",
        username: str | None = None,
        password: str | None = None,
        keepalive: int = 60,
        ws_path: str = "/mqtt",
        connect: bool = True,
        timeout: float = 5,
    ) -> None:
        self.port = port
        self.host = host
        self.client_id = client_id if client_id is not None else "t" + secrets.token_hex(6)
        self.user: str | None = None
        self._counter = 0
        self._cond = threading.Condition()
        self._pending: dict[str, deque[_Waiter]] = {}
        self._request_topics: set[str] = set()
        # Replies and pushes in arrival order.
        self._history: list[Message] = []
        self._pushes: list[tuple[str, Any]] = []
        self._taken: set[int] = set()
        self._connack: int | None = None
        self._disconnected = threading.Event()
        self.subacks: list[list[int]] = []
        self._unsubacks: set[int] = set()

        self.mqtt = mqtt.Client(
            callback_api_version=CallbackAPIVersion.VERSION2,
            client_id=self.client_id,
            transport=transport,
            protocol=protocol,
            clean_session=True,
            reconnect_on_failure=False,
        )
        if transport == "websockets":
            self.mqtt.ws_set_options(path=ws_path)
        if username is not None:
            self.mqtt.username_pw_set(username, password)
        self.mqtt.on_connect = self._on_connect
        self.mqtt.on_disconnect = self._on_disconnect
        self.mqtt.on_message = self._on_message
        self.mqtt.on_subscribe = self._on_subscribe
        self.mqtt.on_unsubscribe = self._on_unsubscribe
        self.keepalive = keepalive
        if connect:
            self.connect(timeout=timeout)

    # ---- connection -------------------------------------------------------------------------

    def connect(self, timeout: float = 5) -> ChatClient:
        """Connect, start the network thread and wait for a successful CONNACK."""
        self.mqtt.connect(self.host, self.port, keepalive=self.keepalive)
        self.mqtt.loop_start()
        with self._cond:
            if not self._cond.wait_for(lambda: self._connack is not None, timeout):
                self.close()
                raise ChatError(f"no CONNACK within {timeout} s from {self.host}:{self.port}")
            rc = self._connack
        if rc != 0:
            self.close()
            raise ChatError(f"connection refused: CONNACK return code {rc}")
        return self

    def close(self, clean: bool = True) -> None:
        """Disconnect (sending DISCONNECT when `clean`, else just dropping the socket)."""
        if not clean:
            sock = self.mqtt.socket()
            raw = getattr(sock, "_socket", sock)  # the websocket wrapper keeps its TCP socket inside
            if raw is not None:
                try:
                    raw.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
        else:
            try:
                self.mqtt.disconnect()
            except (OSError, ValueError):
                pass
        self.mqtt.loop_stop()

    def wait_disconnected(self, timeout: float = 5) -> bool:
        """True once the server closed the connection (or we did) within `timeout`."""
        return self._disconnected.wait(timeout)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---- paho callbacks (network thread) -----------------------------------------------------

    def _on_connect(self, client, userdata, flags, reason_code, properties) -> None:
        with self._cond:
            self._connack = int(reason_code.value) if hasattr(reason_code, "value") else int(reason_code)
            if self._connack >= 0x80:  # paho maps MQTT 3 return codes onto v5 reason codes
                self._connack = {0x84: 1, 0x85: 2, 0x88: 3, 0x86: 4, 0x87: 5}.get(self._connack, self._connack)
            self._cond.notify_all()

    def _on_disconnect(self, client, userdata, flags, reason_code, properties) -> None:
        self._disconnected.set()

    def _on_subscribe(self, client, userdata, mid, reason_codes, properties) -> None:
        with self._cond:
            self.subacks.append([int(rc.value) if hasattr(rc, "value") else int(rc) for rc in reason_codes])
            self._cond.notify_all()

    def _on_unsubscribe(self, client, userdata, mid, reason_codes, properties) -> None:
        with self._cond:
            self._unsubacks.add(mid)
            self._cond.notify_all()

    def _on_message(self, client, userdata, msg: mqtt.MQTTMessage) -> None:
        with self._cond:
            parsed = _parse(msg.payload)
            payload = bytes(msg.payload)
            waiters = self._pending.get(msg.topic)
            # A topic we sent a request on is a reply (also a late one, after its request timed out).
            kind = "reply" if waiters or msg.topic in self._request_topics else "push"
            self._history.append(Message(kind, msg.topic, parsed, payload, msg.qos, bool(msg.retain)))
            if waiters:
                waiter = waiters.popleft()
                waiter.payload = payload
                waiter.event.set()
            elif kind == "push":
                self._pushes.append((msg.topic, parsed))
            self._cond.notify_all()

    # ---- requests ---------------------------------------------------------------------------

    def next_topic(self, module_handler: str) -> str:
        """`Module/Handler/<n>` with the next counter value (a 3-segment route is kept as is)."""
        if module_handler.count("/") >= 2:
            return module_handler
        self._counter += 1
        return f"{module_handler}/{self._counter}"

    def request(self, module_handler: str, body: Any, qos: int = 1, timeout: float = 5, raw: bool = False) -> Any:
        """Publish a request and return the parsed reply (a dict) from the identical topic.

        `body` is a JSON-able object, or `bytes`/`str` sent verbatim. With `raw=True` the reply
        payload bytes are returned unparsed. Raises `ChatError` when no reply arrives within
        `timeout` s.
        """
        topic = self.next_topic(module_handler)
        payload = self._encode(body)
        waiter = _Waiter()
        with self._cond:
            self._request_topics.add(topic)
            self._pending.setdefault(topic, deque()).append(waiter)
        info = self.mqtt.publish(topic, payload, qos=qos)
        if info.rc != mqtt.MQTT_ERR_SUCCESS:
            raise ChatError(f"publish on {topic} failed: {mqtt.error_string(info.rc)}")
        if not waiter.event.wait(timeout):
            with self._cond:
                queue = self._pending.get(topic)
                if queue and waiter in queue:
                    queue.remove(waiter)
            raise ChatError(f"no reply on {topic} within {timeout} s")
        assert waiter.payload is not None
        if raw:
            return waiter.payload
        reply = _parse(waiter.payload)
        if not isinstance(reply, dict):
            raise ChatError(f"reply on {topic} is not a JSON object: {waiter.payload!r}")
        return reply

    def publish(self, topic: str, payload: Any, qos: int = 0) -> mqtt.MQTTMessageInfo:
        """Publish without waiting for any reply (bytes/str verbatim, other values as JSON)."""
        info = self.mqtt.publish(topic, self._encode(payload), qos=qos)
        if qos > 0:
            info.wait_for_publish(5)
        return info

    def subscribe(self, topics: list[tuple[str, int]], timeout: float = 5) -> list[int]:
        """Subscribe and return the granted codes of the SUBACK."""
        with self._cond:
            before = len(self.subacks)
        self.mqtt.subscribe(topics)
        with self._cond:
            if not self._cond.wait_for(lambda: len(self.subacks) > before, timeout):
                raise ChatError(f"no SUBACK within {timeout} s")
            return self.subacks[before]

    def unsubscribe(self, topics: list[str], wait: bool = False, timeout: float = 5) -> None:
        """Unsubscribe; with `wait=True` return only once the UNSUBACK has arrived."""
        rc, mid = self.mqtt.unsubscribe(topics)
        if rc != mqtt.MQTT_ERR_SUCCESS:
            raise ChatError(f"unsubscribe failed: {mqtt.error_string(rc)}")
        if wait:
            with self._cond:
                if not self._cond.wait_for(lambda: mid in self._unsubacks, timeout):
                    raise ChatError(f"no UNSUBACK within {timeout} s")

    @staticmethod
    def _encode(body: Any) -> bytes:
        if isinstance(body, bytes):
            return body
        if isinstance(body, str):
            return body.encode()
        return json.dumps(body, separators=(",", ":")).encode()

    # ---- pushes -----------------------------------------------------------------------------

    def pushes(self, topic: str | None = None) -> list[tuple[str, Any]]:
        """All pushes received so far as (topic, parsed JSON), optionally only on `topic`."""
        with self._cond:
            return [p for p in self._pushes if topic is None or p[0] == topic]

    def history(self) -> list[Message]:
        """Replies and pushes in arrival order."""
        with self._cond:
            return list(self._history)

    def wait_push(self, topic: str | None = None, pred: Callable[[Any], bool] | None = None, timeout: float = 5) -> Any:
        """Wait for the earliest push on `topic` matching `pred` not returned before; return its body.

        Each push is returned at most once, so waiting twice for the same topic yields two
        different pushes. Raises `ChatError` on timeout, listing what did arrive.
        """

        def find() -> int | None:
            for i, (t, body) in enumerate(self._pushes):
                if i in self._taken or (topic is not None and t != topic):
                    continue
                if pred is None or pred(body):
                    return i
            return None

        with self._cond:
            found: list[int | None] = [None]

            def ready() -> bool:
                found[0] = find()
                return found[0] is not None

            if not self._cond.wait_for(ready, timeout):
                raise ChatError(f"no push on {topic} matching within {timeout} s; pushes: {self._pushes}")
            index = found[0]
            assert index is not None
            self._taken.add(index)
            return self._pushes[index][1]

    def no_push(self, topic: str | None = None, within: float = 0.3) -> bool:
        """True when no (untaken) push on `topic` arrives within `within` s."""
        deadline = time.monotonic() + within
        with self._cond:
            while True:
                if any(i not in self._taken and (topic is None or t == topic) for i, (t, _) in enumerate(self._pushes)):
                    return False
                left = deadline - time.monotonic()
                if left <= 0:
                    return True
                self._cond.wait(left)

    # ---- chat demo helpers ------------------------------------------------------------------

    def login(self, user: str, password: str = DEFAULT_PASSWORD, **kw: Any) -> dict:
        """`Login/HD_Login` as `user`; remembers the user name for `say`."""
        self.user = user
        return self.request("Login/HD_Login", {"userName": user, "passWord": password}, **kw)

    def join(self, room: str, **kw: Any) -> dict:
        """`Chat/HD_JoinChat` into `room`."""
        return self.request("Chat/HD_JoinChat", {"roomName": room}, **kw)

    def say(self, room: str, content: str, target: str = "*", **kw: Any) -> dict:
        """`Chat/HD_Say` to everyone in `room` (`target="*"`) or to one member."""
        body = {"roomName": room, "from": self.user or "", "target": target, "content": content}
        return self.request("Chat/HD_Say", body, **kw)

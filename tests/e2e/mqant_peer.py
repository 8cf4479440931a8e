"""mqant v1 peers over RabbitMQ, written with pika from mqant's wire format (docs/cluster.md,
"Compatibility bridges"), for the tests of warren next to mqant processes.

- `MqantServer` serves one module instance the way mqant's AMQP server does: it declares the
  exchange (durable, not auto-deleted) and its durable queue bound with the binding key, consumes
  with manual acks acknowledged on receipt, drops calls past `Expired`, answers only when `Reply`
  is true, to the queue named by the `reply_to` header, with a `ResultInfo`
  `{"Cid","Error","Result"}`. Its functions are Python callables `fn(*args) -> (result, error)`;
  an unknown one gets `Remote function(<Fn>) not found`. Every call received is recorded.
- `mqant_call` is mqant's AMQP client for one call: a server-named exclusive callback queue, the
  `CallInfo` published to the target's exchange with its binding key and the callback queue in
  the `reply_to` header, the reply matched by `Cid`.
- `MqantGate` is an mqant gate's RPC side: the session operations of mqant's gate handler
  (`Update`, `Bind`, `UnBind`, `Push`, `Set`, `Remove`, `Send`, `Close`) over the sessions it
  holds, with `No Sesssion found` for any other session.
"""

from __future__ import annotations

import base64
import json
import threading
import time
import uuid
from typing import Any, Callable

import pika

Fn = Callable[..., tuple[Any, str]]


def _declare_exchange(ch, exchange: str) -> None:
    ch.exchange_declare(exchange=exchange, exchange_type="direct", durable=True, auto_delete=False, internal=False)


class MqantServer:
    """One module instance served on its own queue, on a thread of its own until `.stop()`."""

    def __init__(self, url: str, exchange: str, queue: str, functions: dict[str, Fn]) -> None:
        self.url, self.exchange, self.queue = url, exchange, queue
        self.functions = functions
        self.calls: list[dict] = []
        self._stop = threading.Event()
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        if not self._ready.wait(30):
            raise RuntimeError(f"mqant server for {queue} did not start: {self._error!r}")

    def _run(self) -> None:
        try:
            conn = pika.BlockingConnection(pika.URLParameters(self.url))
            ch = conn.channel()
            _declare_exchange(ch, self.exchange)
            ch.queue_declare(queue=self.queue, durable=True, auto_delete=False, exclusive=False)
            ch.queue_bind(queue=self.queue, exchange=self.exchange, routing_key=self.queue)
            ch.basic_consume(queue=self.queue, on_message_callback=self._on_call, auto_ack=False)
        except BaseException as e:  # reported by the constructor
            self._error = e
            return
        self._ready.set()
        while not self._stop.is_set():
            conn.process_data_events(time_limit=0.05)
        conn.close()

    def _on_call(self, ch, method, props, body: bytes) -> None:
        ch.basic_ack(method.delivery_tag)
        call = json.loads(body)
        self.calls.append(call)
        if call.get("Expired", 0) < int(time.time() * 1000) or not call.get("Reply"):
            return
        fn = self.functions.get(call["Fn"])
        if fn is None:
            result, error = None, "Remote function(%s) not found" % call["Fn"]
        else:
            result, error = fn(*(call.get("Args") or []))
        reply_to = (props.headers or {}).get("reply_to")
        if isinstance(reply_to, bytes):
            reply_to = reply_to.decode()
        out = {"Cid": call["Cid"], "Error": error, "Result": result}
        ch.basic_publish(
            exchange="",
            routing_key=reply_to,
            body=json.dumps(out, separators=(",", ":")).encode(),
            properties=pika.BasicProperties(content_type="text/plain", delivery_mode=1, headers={}),
        )

    def fns(self) -> list[str]:
        """The `Fn` of every call received, in order."""
        return [c["Fn"] for c in self.calls]

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(10)


def mqant_call(url: str, exchange: str, binding_key: str, fn: str, args: list, timeout: float = 15) -> dict:
    """Call `fn(*args)` on the instance bound with `binding_key`; the `ResultInfo` as a dict."""
    conn = pika.BlockingConnection(pika.URLParameters(url))
    try:
        ch = conn.channel()
        _declare_exchange(ch, exchange)
        callback = ch.queue_declare(queue="", durable=False, auto_delete=True, exclusive=True).method.queue
        replies: list[dict] = []

        def on_reply(channel, method, _props, body):
            channel.basic_ack(method.delivery_tag)
            replies.append(json.loads(body))

        ch.basic_consume(queue=callback, on_message_callback=on_reply, auto_ack=False)
        cid = str(uuid.uuid4())
        call = {
            "Cid": cid,
            "Fn": fn,
            "Args": args,
            "Expired": int(time.time() * 1000) + int(timeout * 1000),
            "Reply": True,
            "Result": {"Cid": "", "Error": "", "Result": None},
        }
        ch.basic_publish(
            exchange=exchange,
            routing_key=binding_key,
            body=json.dumps(call, separators=(",", ":")).encode(),
            properties=pika.BasicProperties(content_type="text/plain", delivery_mode=1, headers={"reply_to": callback}),
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            conn.process_data_events(time_limit=0.05)
            for r in replies:
                if r.get("Cid") == cid:
                    return r
        raise AssertionError(f"no reply to {fn} within {timeout} s")
    finally:
        conn.close()


class MqantGate:
    """The RPC side of an mqant gate `gate_id` holding the sessions in `sessions` (Sessionid ->
    export map), served on queue `queue`. What its session operations did is in `.sent`
    (Send's topic and decoded body) and in the sessions themselves."""

    def __init__(self, url: str, exchange: str, queue: str, gate_id: str) -> None:
        self.gate_id = gate_id
        self.sessions: dict[str, dict] = {}
        self.sent: list[tuple[str, str, bytes]] = []
        fns: dict[str, Fn] = {
            "Update": lambda sid: self._op(sid, lambda s: None),
            "Bind": lambda sid, uid: self._op(sid, lambda s: s.__setitem__("Userid", uid)),
            "UnBind": lambda sid: self._op(sid, lambda s: s.pop("Userid", None)),
            "Push": lambda sid, settings: self._op(sid, lambda s: s.__setitem__("Settings", settings)),
            "Set": lambda sid, key, value: self._op(sid, lambda s: s["Settings"].__setitem__(key, value)),
            "Remove": lambda sid, key: self._op(sid, lambda s: s["Settings"].pop(key, None)),
            "Send": self._send,
            "Close": lambda sid: (None, "") if sid in self.sessions else (None, "No Sesssion found"),
        }
        self.server = MqantServer(url, exchange, queue, fns)

    def open(self, sid: str, ip: str = "127.0.0.1:50000") -> dict:
        """A client connected: its session export map."""
        self.sessions[sid] = {"IP": ip, "Network": "tcp", "Serverid": self.gate_id, "Sessionid": sid, "Settings": {}}
        return self.sessions[sid]

    def _op(self, sid: str, change: Callable[[dict], Any]) -> tuple[Any, str]:
        s = self.sessions.get(sid)
        if s is None:
            return None, "No Sesssion found"
        change(s)
        return s, ""

    def _send(self, sid: str, topic: str, body: str) -> tuple[Any, str]:
        if sid not in self.sessions:
            return None, "No Sesssion found"
        # a Go []byte arrives as base64
        self.sent.append((sid, topic, base64.b64decode(body)))
        return "success", ""

    def calls(self) -> list[dict]:
        return self.server.calls

    def stop(self) -> None:
        self.server.stop()

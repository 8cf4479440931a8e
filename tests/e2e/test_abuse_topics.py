"""Topic abuse against default-mode MQTT (issue 11, items 1-3): deep filters and topics, huge
SUBSCRIBE packets, many filters.

Each case runs against the attacker's setup (`warren serve --no-demo-listeners --listen mqtt://…
--listen json+ws://… --listen ws://… --module Echo`) and checks four things: what the attacking
client sees (exact SUBACK bytes, PUBACK, or the close), that the server process is still alive,
that a canary client doing request/reply through Echo every 100 ms was answered every time
throughout, and that the server's resident memory grew less than a stated bound.

Cases with raised limits (a config file) show the code itself holds up, not only the limits: a
7,000-level filter and a 30,000-level topic are handled without recursion, and three SUBSCRIBE
packets of 40,000 filters each cost about the same (linear, no scan per filter).
"""

from __future__ import annotations

import struct
import tempfile
import threading
import time
from pathlib import Path

import websocket
from chat import ChatClient, ChatError, MQTTv311
from abuse import log_lines, rss_kib
from conftest import Warren, wait_until
from rawmqtt import (
    DISCONNECT,
    RawClient,
    connect_packet,
    hexdump,
    parse_publish,
    publish_packet,
    remaining_length,
    subscribe_packet,
    unsubscribe_packet,
)

# Resident memory a single attack may add to the server, in KiB.
RSS_BOUND_KB = 64 * 1024



def config(text: str) -> str:
    """Write a TOML config file and return its path."""
    d = Path(tempfile.mkdtemp(prefix="warren-abuse-"))
    p = d / "warren.toml"
    p.write_text(text)
    return str(p)


RAISED = """
[limits]
max_topic_len = 65535
max_topic_levels = 40000
max_filters_per_subscribe = 50000
max_filters_per_session = 200000
max_subscriptions = 1000000
"""


def server(cfg: str | None = None) -> Warren:
    """The attacker's setup: plain MQTT, JSON over WebSocket, MQTT over WebSocket, Echo."""
    args = ["--module", "Echo"]
    if cfg is not None:
        args += ["--config", cfg]
    return Warren(*args, listen=["mqtt", "json+ws", "ws"], http=False).wait_ready()


def assert_logged(w: Warren, peer: str, kind: str) -> str:
    """One log line names the peer and the refusal kind."""

    def find() -> str | None:
        for line in log_lines(w):
            if peer in line and f'kind="{kind}"' in line:
                return line
        return None

    try:
        return wait_until(find, timeout=5)
    except AssertionError:
        mine = [line for line in log_lines(w) if peer in line]
        raise AssertionError(f"no line with peer {peer} and kind={kind!r}: {mine!r}") from None


class Canary:
    """A well-behaved client doing request/reply through Echo every 100 ms on its own thread."""

    def __init__(self, w: Warren) -> None:
        self.client = ChatClient(w.mqtt_plain, protocol=MQTTv311, client_id="canary")
        self.answered = 0
        self.failures: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        wait_until(lambda: self.answered >= 2 or self.failures, msg="canary never answered")

    def _run(self) -> None:
        n = 0
        while not self._stop.is_set():
            n += 1
            try:
                reply = self.client.request("Echo/HD_Echo", {"n": n}, qos=0, timeout=5)
                if reply != {"Error": "", "Result": {"n": n}}:
                    self.failures.append(f"request {n}: unexpected reply {reply!r}")
                else:
                    self.answered += 1
            except ChatError as e:
                self.failures.append(f"request {n}: {e}")
            self._stop.wait(0.1)

    def check(self) -> None:
        """Stop; every request of the run must have been answered, and several were made."""
        before = self.answered
        wait_until(lambda: self.answered >= before + 2 or self.failures, timeout=10, msg="canary stalled")
        self._stop.set()
        self._thread.join(10)
        self.client.close()
        assert not self.failures, f"the canary was not served: {self.failures[:5]}"
        assert self.answered >= 4


def attacker(w: Warren, client_id: str = "attacker") -> RawClient:
    c = RawClient(w.mqtt_plain, timeout=30)
    c.send(connect_packet(client_id))
    c.expect(b"\x20\x02\x00\x00")
    return c


def subscribe_many(pkid: int, filters: list[tuple[str, int]]) -> bytes:
    """A SUBSCRIBE built in one join (rawmqtt's builder concatenates, quadratic for 40,000)."""
    parts = [struct.pack(">H", pkid)]
    for f, q in filters:
        b = f.encode()
        parts.append(struct.pack(">H", len(b)) + b + bytes([q]))
    body = b"".join(parts)
    return b"\x82" + remaining_length(len(body)) + body


def suback(pkid: int, codes: list[int]) -> bytes:
    body = struct.pack(">H", pkid) + bytes(codes)
    return b"\x90" + remaining_length(len(body)) + body


# ---- item 1: stack overflow ------------------------------------------------------------------


DEEP_FILTER = "/" * 6999  # 7,000 empty levels


def test_deep_filter_is_refused_with_default_limits():
    w = server()
    canary = Canary(w)
    before = rss_kib(w.proc.pid)
    a = attacker(w)
    a.send(subscribe_packet(1, [(DEEP_FILTER, 0), ("ok/+", 1)]))
    a.expect(suback(1, [0x80, 0x01]))
    a.send(DISCONNECT)
    assert a.closed()
    # the filter is 6,999 bytes: over max_topic_len (1024) before its levels are counted
    assert_logged(w, a.local_addr, "topic_len")
    b = attacker(w, "attacker-2")
    b.send(subscribe_packet(2, [("/" * 200, 0)]))
    b.expect(suback(2, [0x80]))
    assert_logged(w, b.local_addr, "topic_levels")
    b.send(DISCONNECT)
    assert w.running()
    canary.check()
    assert rss_kib(w.proc.pid) - before < RSS_BOUND_KB


def test_deep_filter_then_disconnect_does_not_overflow_with_raised_limits():
    w = server(config(RAISED))
    canary = Canary(w)
    for round_ in range(3):
        a = attacker(w, f"deep-{round_}")
        a.send(subscribe_packet(1, [(DEEP_FILTER, 0), (DEEP_FILTER + "/#", 0)]))
        a.expect(suback(1, [0x00, 0x00]))
        a.send(DISCONNECT)
        assert a.closed()
    assert w.running(), w.tail()
    canary.check()


def test_deep_publish_is_dropped_with_default_limits():
    w = server()
    canary = Canary(w)
    sub = attacker(w, "listener")
    sub.send(subscribe_packet(1, [("#", 0)]))
    sub.expect(suback(1, [0x00]))
    a = attacker(w)
    # QoS 1: acknowledged as usual, then dropped
    a.send(publish_packet("/" * 29999, b"x", qos=1, pkid=7))
    a.expect(b"\x40\x02\x00\x07")
    assert_logged(w, a.local_addr, "topic_len")
    a.send(publish_packet("/" * 200, b"x", qos=1, pkid=8))
    a.expect(b"\x40\x02\x00\x08")
    assert_logged(w, a.local_addr, "topic_levels")
    # an ordinary publish still flows, and is the only thing the `#` subscriber gets
    a.send(publish_packet("fine/topic", b"ok", qos=0))
    first, body = sub.recv_packet()
    assert parse_publish(first, body)[0] == "fine/topic"
    assert sub.quiet(0.3)
    assert w.running()
    canary.check()


def test_deep_publish_matching_a_deep_subscription_with_raised_limits():
    w = server(config(RAISED))
    canary = Canary(w)
    sub = attacker(w, "deep-sub")
    sub.send(subscribe_packet(1, [(DEEP_FILTER + "/#", 0), ("+/" * 6999 + "+", 0)]))
    sub.expect(suback(1, [0x00, 0x00]))
    a = attacker(w)
    topic = "/" * 29999  # 30,000 levels, under the 7,000-level subscription
    a.send(publish_packet(topic, b"deep", qos=1, pkid=1))
    a.expect(b"\x40\x02\x00\x01")
    first, body = sub.recv_packet(timeout=30)
    got_topic, _, _, payload = parse_publish(first, body)
    assert (len(got_topic), payload) == (29999, b"deep")
    # exactly 7,000 levels: both filters match, delivered once
    a.send(publish_packet("/" * 6999, b"both", qos=0))
    first, body = sub.recv_packet(timeout=30)
    assert parse_publish(first, body)[3] == b"both"
    assert sub.quiet(0.3)
    sub.send(DISCONNECT)
    assert sub.closed()
    assert w.running(), w.tail()
    canary.check()


class WsMqtt:
    """MQTT over a WebSocket (binary frames, subprotocol `mqtt`) with websocket-client."""

    def __init__(self, port: int) -> None:
        self.ws = websocket.create_connection(
            f"ws://127.0.0.1:{port}/mqtt", subprotocols=["mqtt"], timeout=30
        )
        self.buf = b""

    def send(self, data: bytes) -> None:
        self.ws.send_binary(data)

    def recv(self, n: int) -> bytes:
        while len(self.buf) < n:
            frame = self.ws.recv()
            assert isinstance(frame, bytes), f"text frame {frame!r}"
            self.buf += frame
        out, self.buf = self.buf[:n], self.buf[n:]
        return out


def test_deep_filter_over_websocket():
    for cfg, code in ((None, 0x80), (config(RAISED), 0x00)):
        w = server(cfg)
        canary = Canary(w)
        c = WsMqtt(w.ports["ws"])
        c.send(connect_packet("ws-attacker"))
        assert c.recv(4) == b"\x20\x02\x00\x00"
        c.send(subscribe_packet(3, [(DEEP_FILTER, 0)]))
        want = suback(3, [code])
        got = c.recv(len(want))
        assert got == want, hexdump(got)
        c.send(DISCONNECT)
        c.ws.close()
        assert w.running(), w.tail()
        canary.check()
        w.kill()


# ---- item 2: memory amplification ------------------------------------------------------------


def test_subscribe_of_200_deep_filters_is_refused_and_memory_stays_bounded():
    w = server()
    canary = Canary(w)
    before = rss_kib(w.proc.pid)
    a = attacker(w)
    filters = [(f"{i}" + "/" * 4000, 0) for i in range(200)]  # 4,001 levels each, ~0.8 MB
    packet = subscribe_many(9, filters)
    assert len(packet) > 800_000
    a.send(packet)
    a.expect(suback(9, [0x80] * 200), timeout=30)
    assert_logged(w, a.local_addr, "topic_len")
    # the same again from a second connection: nothing accumulates
    b = attacker(w, "attacker-2")
    b.send(packet)
    b.expect(suback(9, [0x80] * 200), timeout=30)
    assert w.running()
    canary.check()
    grown = rss_kib(w.proc.pid) - before
    print(f"RSS grew by {grown} KiB")
    assert grown < RSS_BOUND_KB, f"RSS grew by {grown} KiB"


# ---- item 3: quadratic SUBSCRIBE -------------------------------------------------------------


def many_filters(round_: int, n: int = 40_000) -> list[tuple[str, int]]:
    return [(f"r{round_}/f/{i}", 0) for i in range(n)]


def test_subscribe_of_40000_filters_closes_with_default_limits():
    w = server()
    canary = Canary(w)
    before = rss_kib(w.proc.pid)
    for round_ in range(3):
        a = attacker(w, f"many-{round_}")
        a.send(subscribe_many(1, many_filters(round_)))
        assert a.closed(timeout=30)
        assert a.discarded == b"", f"expected no SUBACK, got {hexdump(a.discarded[:16])}"
        assert_logged(w, a.local_addr, "filters_per_subscribe")
    # UNSUBSCRIBE is held to the same cap
    u = attacker(w, "unsub")
    u.send(unsubscribe_packet(2, [f"u/{i}" for i in range(257)]))
    assert u.closed()
    assert_logged(w, u.local_addr, "filters_per_subscribe")
    assert w.running()
    canary.check()
    assert rss_kib(w.proc.pid) - before < RSS_BOUND_KB


def test_three_subscribes_of_40000_filters_cost_the_same_with_raised_limits():
    w = server(config(RAISED))
    canary = Canary(w)
    before = rss_kib(w.proc.pid)
    a = attacker(w)
    took = []
    for round_ in range(3):
        packet = subscribe_many(round_ + 1, many_filters(round_))
        start = time.monotonic()
        a.send(packet)
        a.expect(suback(round_ + 1, [0x00] * 40_000), timeout=60)
        took.append(time.monotonic() - start)
    # the session now holds 120,000 filters; a scan per new filter made the third packet 6x
    # slower than the first. Linear: the third costs about what the first did.
    print(f"SUBSCRIBE of 40,000 filters took {took}")
    assert took[2] < 3 * took[0] + 0.5, f"SUBSCRIBE took {took}"
    # the subscriptions work, and leaving them is as cheap
    pub = attacker(w, "pub")
    pub.send(publish_packet("r2/f/39999", b"last", qos=0))
    first, body = a.recv_packet()
    assert parse_publish(first, body)[0] == "r2/f/39999"
    a.send(DISCONNECT)
    assert a.closed(timeout=30)
    assert w.running()
    canary.check()
    assert rss_kib(w.proc.pid) - before < RSS_BOUND_KB


# ---- the other caps --------------------------------------------------------------------------


def test_deep_filters_from_many_sessions_stop_at_the_node_level_cap():
    # each session may hold 1,024 filters of 128 levels (the defaults): 131,072 trie levels of
    # unique filters, about 20 MiB. The node-wide cap on levels bounds what many sessions hold.
    w = server(config("[limits]\nmax_subscription_levels = 150000\n"))
    canary = Canary(w)
    before = rss_kib(w.proc.pid)
    granted = refused = 0
    clients = []
    for s in range(4):
        a = attacker(w, f"levels-{s}")
        for k in range(4):
            filters = [(f"s{s}k{k}f{i}" + "/a" * 127, 0) for i in range(256)]
            a.send(subscribe_many(k + 1, filters))
            first, body = a.recv_packet(timeout=30)
            assert first == 0x90 and body[:2] == struct.pack(">H", k + 1)
            granted += body[2:].count(0x00)
            refused += body[2:].count(0x80)
        clients.append(a)
    # 150,000 levels hold 1,171 filters of 128 unique levels
    assert (granted, refused) == (150_000 // 128, 4 * 1024 - 150_000 // 128)
    assert_logged(w, clients[1].local_addr, "max_subscription_levels")
    assert w.running()
    canary.check()
    grown = rss_kib(w.proc.pid) - before
    print(f"RSS grew by {grown} KiB")
    assert grown < RSS_BOUND_KB, f"RSS grew by {grown} KiB"
    # leaving frees the levels for others
    for a in clients:
        a.send(DISCONNECT)
        assert a.closed(timeout=30)
    b = attacker(w, "after")
    b.send(subscribe_many(1, [(f"after{i}" + "/a" * 127, 0) for i in range(256)]))
    b.expect(suback(1, [0x00] * 256), timeout=30)



def test_filters_per_session_and_subscriptions_per_node():
    w = server(
        config(
            """
[limits]
max_filters_per_session = 3
max_subscriptions = 5
"""
        )
    )
    a = attacker(w, "a")
    a.send(subscribe_packet(1, [("a/1", 0), ("a/2", 1), ("a/3", 0), ("a/4", 0)]))
    a.expect(suback(1, [0x00, 0x01, 0x00, 0x80]))
    assert_logged(w, a.local_addr, "filters_per_session")
    # re-subscribing to a held filter is not a new one
    a.send(subscribe_packet(2, [("a/1", 1)]))
    a.expect(suback(2, [0x01]))
    b = attacker(w, "b")
    b.send(subscribe_packet(3, [("b/1", 0), ("b/2", 0), ("b/3", 0)]))
    b.expect(suback(3, [0x00, 0x00, 0x80]))
    assert_logged(w, b.local_addr, "max_subscriptions")
    # unsubscribing frees room, on the session and on the node
    a.send(unsubscribe_packet(4, ["a/1", "never/subscribed"]))
    a.expect(b"\xb0\x02\x00\x04")
    b.send(subscribe_packet(5, [("b/3", 0)]))
    b.expect(suback(5, [0x00]))
    # a closed session's subscriptions are released
    a.send(DISCONNECT)
    assert a.closed()
    c = attacker(w, "c")
    c.send(subscribe_packet(6, [("c/1", 0), ("c/2", 0)]))
    c.expect(suback(6, [0x00, 0x00]))
    assert w.running()


def test_subscription_levels_per_node():
    w = server(config("[limits]\nmax_subscription_levels = 4\n"))
    a = attacker(w, "a")
    # l/1/2/3 takes the 4 levels; l/1/2/x needs one more; l/1/2 and l/# need none
    a.send(subscribe_packet(1, [("l/1/2/3", 0), ("l/1/2/x", 0), ("l/1/2", 0), ("l/#", 1)]))
    a.expect(suback(1, [0x00, 0x80, 0x00, 0x01]))
    assert_logged(w, a.local_addr, "max_subscription_levels")
    a.send(unsubscribe_packet(2, ["l/1/2/3"]))
    a.expect(b"\xb0\x02\x00\x02")
    a.send(subscribe_packet(3, [("l/1/2/x", 0)]))
    a.expect(suback(3, [0x00]))

"""Output abuse: clients that stop reading, a node's output budget, per-connection rates.

A client that subscribes and never reads must not make the server hold its messages without
bound: its queue is bounded in bytes (`write_queue_bytes`), all queues of the node together by
`[limits] max_queued_bytes`, and a client over its bound is closed as a slow consumer. A client
that sends too fast (`msg_rate`, `byte_rate`) is slowed down, not disconnected. In every case a
canary doing request/reply through `--module Echo` every 100 ms keeps being answered.
"""

from __future__ import annotations

import json
import threading
import time

from abuse import Canary, logged, rss_kib
from conftest import Warren, wait_until
from rawmqtt import RawClient, parse_publish, publish_packet, subscribe_packet

CONNACK_OK = b"\x20\x02\x00\x00"


def subscriber(port: int, client_id: str, filt: str = "#", rcvbuf: int | None = None) -> RawClient:
    """A raw MQTT client subscribed to `filt` at QoS 0 (SUBACK read)."""
    c = RawClient(port, rcvbuf=rcvbuf)
    assert c.connect(client_id) == CONNACK_OK
    c.send(subscribe_packet(1, [(filt, 0)]))
    first, body = c.recv_packet()
    assert first == 0x90 and body == b"\x00\x01\x00", (first, body)
    return c


class Publisher(threading.Thread):
    """Publishes `count` QoS 0 messages of `size` bytes on `topic` as fast as the server reads."""

    def __init__(self, port: int, count: int, size: int, topic: str = "flood/big") -> None:
        super().__init__(daemon=True)
        self.c = RawClient(port, timeout=60)
        assert self.c.connect("publisher") == CONNACK_OK
        self.packet = publish_packet(topic, b"x" * size)
        self.count = count
        self.sent = 0
        self.error: Exception | None = None

    def run(self) -> None:
        try:
            for _ in range(self.count):
                self.c.send(self.packet)
                self.sent += 1
        except Exception as e:  # noqa: BLE001
            self.error = e


def a_reader_still_gets(port: int, payload: bytes) -> None:
    """After a flood, a new subscriber that reads gets a new publish whole."""
    fresh = subscriber(port, "fresh")
    with RawClient(port) as p:
        assert p.connect("publisher2") == CONNACK_OK
        p.send(publish_packet("after/flood", payload))
        first, body = fresh.recv_packet()
        topic, _, _, got = parse_publish(first, body)
        assert topic == "after/flood" and got == payload
    fresh.close()


def test_slow_subscribers_are_closed_and_memory_stays_bounded():
    # four subscribers to `#` that never read, 1 MiB messages: before byte bounds, each of them
    # could pin write_queue (1024) × 1 MiB
    w = Warren(
        "--module", "Echo",
        listen=[Warren.url("mqtt")],
        http=False,
    ).wait_ready()
    port = w.mqtt_plain
    pid = w.proc.pid
    canary = Canary(port)
    canary.start()
    slow = [subscriber(port, f"slow{i}", rcvbuf=4096) for i in range(4)]
    peers = [s.local_addr for s in slow]
    before = rss_kib(pid)
    peak = before
    pub = Publisher(port, count=200, size=1024 * 1024 - 64)
    try:
        pub.start()
        while pub.is_alive():
            peak = max(peak, rss_kib(pid))
            time.sleep(0.05)
        assert pub.error is None, f"the publisher was cut off: {pub.error!r}"
        assert pub.sent == 200
        peak = max(peak, rss_kib(pid))
        grown_mib = (peak - before) / 1024
        print(f"RSS {before} KiB before, peak {peak} KiB: +{grown_mib:.1f} MiB")
        assert grown_mib < 200, f"RSS grew by {grown_mib:.0f} MiB with four clients not reading"
        for s, peer in zip(slow, peers):
            assert s.closed(20), f"slow subscriber {peer} was not disconnected"
            lines = logged(w, peer, "slow consumer")
            assert lines, f"no slow-consumer line names {peer}"
            assert "write_queue_bytes" in lines[0], lines[0]
        assert w.running()
    finally:
        for s in slow:
            s.close()
        pub.c.close()
    canary.finish()
    # a subscriber that reads still gets what is published
    a_reader_still_gets(port, b"hello")


def test_the_node_output_budget_closes_slow_consumers_and_then_takes_work_again(tmp_path):
    cfg = tmp_path / "warren.toml"
    # 3 MB for the whole node: less than one session's own 4 MiB cap, so the node budget decides
    cfg.write_text("[limits]\nmax_queued_bytes = 3000000\n")
    w = Warren(
        "--config", str(cfg), "--module", "Echo",
        listen=[Warren.url("mqtt")],
        http=False,
    ).wait_ready()
    port = w.mqtt_plain
    canary = Canary(port)
    canary.start()
    slow = [subscriber(port, f"slow{i}", rcvbuf=4096) for i in range(2)]
    peers = [s.local_addr for s in slow]
    pub = Publisher(port, count=60, size=200_000)
    try:
        pub.start()
        pub.join(60)
        assert pub.error is None and pub.sent == 60
        for s, peer in zip(slow, peers):
            assert s.closed(20), f"slow subscriber {peer} was not disconnected"
        lines = logged(w, "slow consumer", "max_queued_bytes")
        assert lines, "no log line names the node budget"
        assert any(peer in line for line in lines for peer in peers), lines
        assert w.running()
    finally:
        for s in slow:
            s.close()
        pub.c.close()
    canary.finish()
    # the budget was given back: a reading subscriber gets a message as large as the first ones
    a_reader_still_gets(port, b"y" * 200_000)


def test_a_client_over_its_message_rate_is_slowed_not_disconnected():
    rate, burst, count = 20, 5, 100
    w = Warren(
        "--module", "Echo",
        listen=[Warren.url("mqtt", msg_rate=rate, msg_burst=burst)],
        http=False,
    ).wait_ready()
    port = w.mqtt_plain
    canary = Canary(port)
    canary.start()
    flooder = RawClient(port, timeout=30)
    try:
        assert flooder.connect("flooder") == CONNACK_OK
        peer = flooder.local_addr
        started = time.monotonic()
        # all at once, QoS 1: each PUBACK says the server took one in
        flooder.send(b"".join(publish_packet("flood/x", b"m", qos=1, pkid=i + 1) for i in range(count)))
        for i in range(count):
            first, body = flooder.recv_packet(timeout=30)
            assert (first, body) == (0x40, (i + 1).to_bytes(2, "big")), (first, body)
        elapsed = time.monotonic() - started
        # the limiter lets `burst` through at once, then `rate` per second: the flooder cannot
        # have been served faster than that (a slow machine only makes this longer)
        floor = (count - burst - 1) / rate
        assert elapsed >= floor * 0.9, f"{count} messages taken in {elapsed:.2f} s, under {floor:.2f} s"
        assert flooder.quiet(0.3), "the flooder was disconnected"
        assert logged(w, peer, "msg_rate"), "no log line says the flooder was throttled"
    finally:
        flooder.close()
    canary.finish()
    assert w.running()


def test_a_client_over_its_byte_rate_is_slowed_not_disconnected():
    rate = 200_000
    w = Warren(
        "--module", "Echo",
        listen=[Warren.url("mqtt", byte_rate=rate, byte_burst=65536, max_packet=65536)],
        http=False,
    ).wait_ready()
    port = w.mqtt_plain
    canary = Canary(port)
    canary.start()
    flooder = RawClient(port, timeout=30)
    try:
        assert flooder.connect("flooder") == CONNACK_OK
        peer = flooder.local_addr
        packet = publish_packet("flood/y", b"z" * 50_000, qos=1, pkid=1)
        count = 20  # 1 MB
        started = time.monotonic()
        sender = threading.Thread(target=lambda: flooder.send(packet * count), daemon=True)
        sender.start()
        for _ in range(count):
            first, body = flooder.recv_packet(timeout=30)
            assert first == 0x40, first
        elapsed = time.monotonic() - started
        floor = (count * len(packet) - 65536 - 65536) / rate
        assert elapsed >= floor * 0.9, f"{count * len(packet)} bytes taken in {elapsed:.2f} s, under {floor:.2f} s"
        assert flooder.quiet(0.3), "the flooder was disconnected"
        assert logged(w, peer, "byte_rate"), "no log line says the flooder was throttled"
    finally:
        flooder.close()
    canary.finish()
    assert w.running()


def test_a_client_that_sends_requests_and_never_reads_its_replies_is_closed():
    # replies wait for room in the queue (backpressure on that client alone); a client that never
    # reads cannot hold its connection that way: the writer gives up after write_timeout_s
    w = Warren(
        "--module", "Echo",
        listen=[Warren.url("mqtt", write_timeout_s=2)],
        http=False,
    ).wait_ready()
    port = w.mqtt_plain
    pid = w.proc.pid
    canary = Canary(port)
    canary.start()
    deaf = RawClient(port, rcvbuf=4096, timeout=60)
    before = rss_kib(pid)
    try:
        assert deaf.connect("deaf") == CONNACK_OK
        peer = deaf.local_addr
        body = json.dumps({"pad": "p" * 65536}).encode()
        requests = b"".join(publish_packet(f"Echo/HD_Echo/{i}", body) for i in range(300))

        def flood() -> None:
            try:
                deaf.send(requests)
            except OSError:
                pass  # closed by the server while we were still sending: expected

        threading.Thread(target=flood, daemon=True).start()
        wait_until(
            lambda: logged(w, peer, "write_timeout_s"),
            timeout=30,
            interval=0.1,
            msg="no slow-consumer line for a client that does not read its replies",
        )
        assert deaf.closed(20), "the client that never reads was not disconnected"
        grown_mib = (rss_kib(pid) - before) / 1024
        assert grown_mib < 100, f"RSS grew by {grown_mib:.0f} MiB for one client not reading"
        assert w.running()
    finally:
        deaf.close()
    canary.finish()

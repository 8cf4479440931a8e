"""Plain MQTT 3.1.1 on a `mqtt://` listener: publish/subscribe between clients, takeover, routing.

A PUBLISH whose first topic segment is not a module name is delivered to matching subscribers;
one whose first segment names a module still goes to that module.
"""

from __future__ import annotations

import shutil
import subprocess

import pytest
from chat import ChatClient, MQTTv311
from conftest import wait_until


def plain(w, client_id: str | None = None) -> ChatClient:
    """A paho client on the plain listener (every PUBLISH it receives is recorded as a push)."""
    return ChatClient(w.mqtt_plain, protocol=MQTTv311, client_id=client_id)


def received(c: ChatClient, topic: str | None = None):
    return [m for m in c.history() if topic is None or m.topic == topic]


def test_suback_grants_min_of_requested_and_2(warren_demo):
    c = plain(warren_demo)
    # default mode delivers QoS 2 (docs/protocols/mqtt.md, "Sessions and QoS")
    assert c.subscribe([("a/b", 0), ("c/+", 1), ("d/#", 2)]) == [0, 1, 2]
    assert c.subscribe([("e", 2)]) == [2]
    c.close()


def test_wildcards_and_qos(warren_demo):
    s_temp = plain(warren_demo)
    s_all = plain(warren_demo)
    pub = plain(warren_demo)
    assert s_temp.subscribe([("sensors/+/temp", 1)]) == [1]
    assert s_all.subscribe([("sensors/#", 0)]) == [0]

    pub.publish("sensors/kitchen/temp", b"21.5", qos=1)
    pub.publish("sensors/kitchen/humidity", b"40", qos=1)
    pub.publish("sensors/hall/temp", b"19", qos=0)
    pub.publish("sensors", b"root", qos=1)
    pub.publish("other/kitchen/temp", b"nope", qos=1)
    pub.publish("sensors/a/b/temp", b"deep", qos=1)

    wait_until(lambda: len(received(s_all)) >= 5, msg=f"sensors/# got {received(s_all)}")
    wait_until(lambda: len(received(s_temp)) >= 2, msg=f"sensors/+/temp got {received(s_temp)}")

    # delivered QoS = min(publish QoS, granted QoS)
    assert sorted((m.topic, m.raw, m.qos) for m in received(s_temp)) == [
        ("sensors/hall/temp", b"19", 0),
        ("sensors/kitchen/temp", b"21.5", 1),
    ]
    # `#` also matches the parent level; the subscription was granted QoS 0
    assert sorted((m.topic, m.raw, m.qos) for m in received(s_all)) == sorted(
        [
            ("sensors/kitchen/temp", b"21.5", 0),
            ("sensors/kitchen/humidity", b"40", 0),
            ("sensors/hall/temp", b"19", 0),
            ("sensors", b"root", 0),
            ("sensors/a/b/temp", b"deep", 0),
        ]
    )
    assert all(not m.retain for m in received(s_all) + received(s_temp))
    # a publisher that subscribed to nothing receives nothing
    assert received(pub) == []
    for c in (s_temp, s_all, pub):
        c.close()


def test_qos1_subscriber_gets_qos1_and_qos0_messages(warren_demo):
    sub = plain(warren_demo)
    pub = plain(warren_demo)
    assert sub.subscribe([("q/#", 1)]) == [1]
    for i in range(20):
        pub.publish(f"q/{i}", str(i).encode(), qos=i % 2)
    wait_until(lambda: len(received(sub)) == 20, msg=f"got {len(received(sub))} of 20")
    assert sorted((m.topic, m.qos) for m in received(sub)) == sorted((f"q/{i}", i % 2) for i in range(20))
    # one publisher's messages of the same QoS arrive in order
    qos1 = [int(m.raw) for m in received(sub) if m.qos == 1]
    assert qos1 == sorted(qos1)
    sub.close()
    pub.close()


def test_unsubscribe_stops_delivery(warren_demo):
    leaver = plain(warren_demo)
    stayer = plain(warren_demo)
    pub = plain(warren_demo)
    assert leaver.subscribe([("news/+", 1)]) == [1]
    assert stayer.subscribe([("news/+", 1)]) == [1]
    pub.publish("news/1", b"one", qos=1)
    wait_until(lambda: received(leaver) and received(stayer))

    leaver.unsubscribe(["news/+"], wait=True)
    assert leaver.subscribe([("sync/none", 0)]) == [0]

    pub.publish("news/2", b"two", qos=1)
    wait_until(lambda: len(received(stayer)) == 2, msg=f"stayer got {received(stayer)}")
    pub.publish("sync/none", b"marker", qos=1)
    wait_until(lambda: received(leaver, "sync/none"), msg="marker not delivered")
    assert [m.raw for m in received(leaver, "news/2")] == []
    for c in (leaver, stayer, pub):
        c.close()


def test_dollar_topics_not_matched_by_wildcards(warren_demo):
    wild = plain(warren_demo)
    exact = plain(warren_demo)
    pub = plain(warren_demo)
    assert wild.subscribe([("#", 1), ("+/status", 1)]) == [1, 1]
    assert exact.subscribe([("$test/status", 1)]) == [1]

    pub.publish("$test/status", b"hidden", qos=1)
    pub.publish("dev/status", b"shown", qos=1)
    wait_until(lambda: received(wild, "dev/status"), msg=f"wild got {received(wild)}")
    wait_until(lambda: received(exact, "$test/status"), msg=f"exact got {received(exact)}")
    assert received(wild, "$test/status") == []
    # one copy or one per matching subscription are both allowed by 3.1.1, and nothing else
    assert {m.topic for m in received(wild)} == {"dev/status"}
    for c in (wild, exact, pub):
        c.close()


def test_mosquitto_clients_exchange_a_message(warren_demo, tmp_path):
    if not (shutil.which("mosquitto_sub") and shutil.which("mosquitto_pub")):
        pytest.skip("mosquitto-clients not installed (scripts/test installs it)")
    port = str(warren_demo.mqtt_plain)
    out = tmp_path / "sub.out"
    with open(out, "wb") as f:
        sub = subprocess.Popen(
            # line-buffered so that the debug line for the SUBACK reaches the file at once
            [
                "stdbuf",
                "-oL",
                "mosquitto_sub",
                "-h",
                "127.0.0.1",
                "-p",
                port,
                "-i",
                "msub",
                "-t",
                "room/+/msg",
                "-q",
                "1",
                "-C",
                "1",
                "-W",
                "20",
                "-v",
                "-d",
            ],
            stdout=f,
            stderr=subprocess.STDOUT,
        )
    try:
        # -d prints the SUBACK; publish only once the subscription is in place
        wait_until(lambda: b"SUBACK" in out.read_bytes(), timeout=10, msg=f"no SUBACK: {out.read_bytes()!r}")
        pub = subprocess.run(
            [
                "mosquitto_pub",
                "-h",
                "127.0.0.1",
                "-p",
                port,
                "-i",
                "mpub",
                "-t",
                "room/7/msg",
                "-q",
                "1",
                "-m",
                "hello from mosquitto",
            ],
            check=False,
            capture_output=True,
            timeout=20,
        )
        assert pub.returncode == 0, pub.stderr
        assert sub.wait(timeout=20) == 0
        assert b"room/7/msg hello from mosquitto" in out.read_bytes()
    finally:
        if sub.poll() is None:
            sub.kill()
            sub.wait()


def test_client_id_takeover(warren_demo):
    first = plain(warren_demo, client_id="dup")
    assert first.subscribe([("t/#", 1)]) == [1]
    second = plain(warren_demo, client_id="dup")
    assert first.wait_disconnected(10), "the first connection with id 'dup' was not closed"
    assert not second.wait_disconnected(0.2)

    # the new connection works and the old subscription is gone with the old connection
    assert second.subscribe([("t/#", 1)]) == [1]
    pub = plain(warren_demo)
    pub.publish("t/1", b"after", qos=1)
    wait_until(lambda: received(second, "t/1"), msg="second did not get t/1")
    assert received(first, "t/1") == []
    for c in (first, second, pub):
        c.close()


def test_module_topics_route_on_plain_listener(warren_demo):
    # The first segment names a module, so these are requests, not pub/sub; the demo registers
    # its HD_ handlers explicitly, so they are client-visible on a plain listener too.
    snoop = plain(warren_demo)
    assert snoop.subscribe([("#", 1)]) == [1]
    c = plain(warren_demo)
    assert c.request("Login/HD_Login/1", {"userName": "alice", "passWord": "Hello,anyone!"}) == {
        "Error": "",
        "Result": "login success alice",
    }
    assert c.request("Chat/HD_JoinChat/2", {"roomName": "mqant"}) == {"Error": "", "Result": {"users": ["alice"]}}
    assert c.request("Chat/HD_Say/1", {"roomName": "mqant", "from": "alice", "target": "*", "content": "hi"}) == {
        "Error": "",
        "Result": "say success",
    }
    assert c.wait_push("Chat/OnChat") == {"from": "alice", "msg": "hi", "roomName": "mqant", "target": "*"}
    # requests are not published to subscribers
    assert snoop.no_push(within=0.3)
    c.close()
    snoop.close()

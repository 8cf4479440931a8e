"""Topic ACLs (`[auth] acl_file`, mosquitto's format) on a default-mode `mqtt://` listener.

A SUBSCRIBE filter is granted only when a read rule covers it (the filter is a subset of the
rule) and no deny rule overlaps it, otherwise its SUBACK return code is 0x80; a PUBLISH needs a
write rule matching its topic, otherwise it is acknowledged (QoS 1/2) and dropped, so a `#`
subscriber of another user never sees it. Driven with raw sockets (exact bytes), paho-mqtt and
mosquitto_pub / mosquitto_sub. No password method is configured, so (as in mosquitto) the ACL
applies to the user name the client gives.
"""

from __future__ import annotations

import re
import shutil
import signal
import struct
import subprocess
import tempfile
from pathlib import Path

import pytest
from chat import ChatClient, MQTTv311
from conftest import Warren, wait_until
from rawmqtt import DISCONNECT, RawClient, connect_packet, parse_publish, publish_packet, subscribe_packet

ACL = """\
# clients without a user name may only read public/#
topic read public/#

user alice
topic readwrite rooms/#
topic deny rooms/secret
topic write alerts/+

user bob
topic read rooms/+

user admin
topic read #

# everyone: their own tree, their device's state
pattern readwrite users/%u/#
pattern read clients/%c/#
pattern write clients/%c/state
"""

ANSI = re.compile(r"\x1b\[[0-9;]*m")


def acl_server(acl: str = ACL) -> Warren:
    d = Path(tempfile.mkdtemp(prefix="warren-acl-"))
    (d / "acl").write_text(acl)
    (d / "warren.toml").write_text(f'[auth]\nacl_file = "{d / "acl"}"\n')
    return Warren("--module", "Echo", "--config", str(d / "warren.toml"), listen=["mqtt"], http=False).wait_ready()


def raw(w: Warren, client_id: str, user: str | None) -> RawClient:
    c = RawClient(w.mqtt_plain)
    c.send(connect_packet(client_id, username=user))
    c.expect(b"\x20\x02\x00\x00")
    return c


def suback(pkid: int, codes: list[int]) -> bytes:
    return b"\x90" + bytes([2 + len(codes)]) + struct.pack(">H", pkid) + bytes(codes)


def paho(w: Warren, user: str | None, client_id: str | None = None) -> ChatClient:
    return ChatClient(w.mqtt_plain, protocol=MQTTv311, username=user, client_id=client_id)


def denied_line(w: Warren, peer: str | None, text: str) -> str:
    """Wait for the INFO line of an ACL refusal naming `text` (and the peer, when given)."""

    def find() -> str | None:
        for line in ANSI.sub("", w.log()).splitlines():
            if 'kind="acl"' in line and text in line and (peer is None or peer in line):
                return line
        return None

    return wait_until(find, msg=f"no ACL refusal logged for {text!r}")


def topics(c: ChatClient) -> list[str]:
    return [m.topic for m in c.history()]


def test_denied_subscribe_gets_0x80():
    w = acl_server()
    alice = raw(w, "a1", "alice")
    alice.send(
        subscribe_packet(
            1,
            [
                ("rooms/lobby", 1),  # covered by rooms/#
                ("rooms/+/x", 0),  # covered, and cannot match rooms/secret
                ("#", 0),  # wider than rooms/#
                ("rooms/+", 0),  # could receive rooms/secret, which is denied
                ("alerts/+", 0),  # write only
                ("users/alice/#", 1),  # pattern users/%u/#
                ("users/bob/#", 0),  # someone else's tree
                ("public/#", 0),  # only for clients without a user name
            ],
        )
    )
    alice.expect(suback(1, [0x01, 0x00, 0x80, 0x80, 0x80, 0x01, 0x80, 0x80]))
    # one INFO line per refusal (rate-limited), naming the peer and the kind
    peer = alice.local_addr
    line = denied_line(w, peer, "users/bob/#")
    assert " INFO " in line, line
    anon = raw(w, "anon-1", None)
    anon.send(subscribe_packet(2, [("public/#", 0), ("public/news", 0), ("rooms/lobby", 0), ("#", 0)]))
    anon.expect(suback(2, [0x00, 0x00, 0x80, 0x80]))
    # paho sees the same codes
    bob = paho(w, "bob")
    assert bob.subscribe([("rooms/+", 1), ("rooms/#", 0), ("rooms/lobby/x", 0)]) == [1, 0x80, 0x80]
    bob.close()
    assert w.running()


def test_denied_publish_is_acked_and_not_delivered_to_a_hash_subscriber():
    w = acl_server()
    admin = paho(w, "admin")
    assert admin.subscribe([("#", 1)]) == [1]
    alice = raw(w, "a1", "alice")
    # QoS 1 and 2 are acknowledged as usual, then dropped
    alice.send(publish_packet("rooms/secret", b"s1", qos=1, pkid=1))
    alice.expect(b"\x40\x02\x00\x01")
    alice.send(publish_packet("public/news", b"s2", qos=2, pkid=2))
    alice.expect(b"\x50\x02\x00\x02")
    alice.send(publish_packet("users/bob/inbox", b"s3", qos=0))
    # allowed: her rooms, her alerts, her own tree
    alice.send(publish_packet("rooms/lobby", b"ok1", qos=1, pkid=3))
    alice.expect(b"\x40\x02\x00\x03")
    alice.send(publish_packet("alerts/disk", b"ok2", qos=0))
    alice.send(publish_packet("users/alice/status", b"ok3", qos=0))
    # one connection's publishes are routed in order: once the allowed ones are in, the denied
    # ones (sent before them) would have been too
    wait_until(lambda: len(admin.history()) >= 3, msg=f"admin got {topics(admin)}")
    assert sorted((m.topic, m.raw) for m in admin.history()) == [
        ("alerts/disk", b"ok2"),
        ("rooms/lobby", b"ok1"),
        ("users/alice/status", b"ok3"),
    ]
    denied_line(w, alice.local_addr, "rooms/secret")
    denied_line(w, alice.local_addr, "users/bob/inbox")
    # a client without a user name may write nothing
    anon = raw(w, "anon-1", None)
    anon.send(publish_packet("public/news", b"anon", qos=1, pkid=9))
    anon.expect(b"\x40\x02\x00\x09")
    denied_line(w, anon.local_addr, "public/news")
    # module routes are not topic-ACL'd: alice may call Echo although no rule names Echo/#
    c = paho(w, "alice")
    assert c.request("Echo/HD_Echo", {"hi": 1}, qos=0) == {"Error": "", "Result": {"hi": 1}}
    c.close()
    assert not any(m.topic.startswith("Echo/") or m.raw == b"anon" for m in admin.history())
    admin.close()


def test_patterns_substitute_user_and_client_id():
    w = acl_server()
    carol = paho(w, "carol", client_id="dev-7")
    assert carol.subscribe(
        [
            ("users/carol/#", 1),
            ("users/dave/#", 0),
            ("clients/dev-7/#", 0),
            ("clients/dev-8/#", 0),
            ("clients/+/state", 0),
        ]
    ) == [1, 0x80, 0, 0x80, 0x80]
    # %u: her own tree, both ways
    carol.publish("users/carol/note", b"mine", qos=1)
    wait_until(lambda: "users/carol/note" in topics(carol))
    # %c: the device may write its state (read through clients/%c/#)
    carol.publish("clients/dev-7/state", b"on", qos=1)
    wait_until(lambda: "clients/dev-7/state" in topics(carol))
    # not another user's tree, not another device's state
    dave = paho(w, "dave", client_id="dev-8")
    assert dave.subscribe([("users/dave/#", 0), ("clients/dev-8/#", 0)]) == [0, 0]
    carol.publish("users/dave/x", b"no", qos=1)
    carol.publish("clients/dev-8/state", b"no", qos=1)
    denied_line(w, None, "users/dave/x")
    denied_line(w, None, "clients/dev-8/state")
    dave.publish("users/dave/ok", b"yes", qos=1)
    wait_until(lambda: "users/dave/ok" in topics(dave))
    assert topics(dave) == ["users/dave/ok"]
    carol.close()
    dave.close()


@pytest.mark.skipif(not (shutil.which("mosquitto_sub") and shutil.which("mosquitto_pub")), reason="no mosquitto clients")
def test_mosquitto_clients_with_user_names():
    w = acl_server()
    port = str(w.mqtt_plain)
    common = ["-h", "127.0.0.1", "-p", port, "-V", "mqttv311"]
    sub = subprocess.Popen(
        ["mosquitto_sub", *common, "-u", "bob", "-t", "rooms/+", "-C", "1", "-W", "10", "-v"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    def pub(user: str, topic: str, msg: str) -> None:
        subprocess.run(["mosquitto_pub", *common, "-u", user, "-q", "1", "-t", topic, "-m", msg], check=True, timeout=10)

    # denied publishes first: bob must not receive them
    pub("alice", "rooms/secret", "denied")
    pub("bob", "rooms/lobby", "bob may not write")
    # bob's SUBACK cannot be observed through mosquitto_sub: publish until one message arrives
    for _ in range(50):
        if sub.poll() is not None:
            break
        pub("alice", "rooms/lobby", "hello")
        try:
            sub.wait(0.2)
        except subprocess.TimeoutExpired:
            pass
    out, err = sub.communicate(timeout=10)
    assert out.strip() == "rooms/lobby hello", (out, err)
    # a denied subscription: mosquitto_sub reports the refusal
    denied = subprocess.run(
        ["mosquitto_sub", *common, "-u", "bob", "-t", "#", "-C", "1", "-W", "3"],
        capture_output=True,
        text=True,
        timeout=10,
    )
    assert "denied" in (denied.stdout + denied.stderr).lower(), (denied.returncode, denied.stdout, denied.stderr)


def test_sighup_reloads_the_acl_file():
    w = acl_server()
    acl_path = Path(re.search(r'acl_file = "([^"]+)"', Path(w.args[w.args.index("--config") + 1]).read_text()).group(1))
    bob = raw(w, "b1", "bob")
    bob.send(subscribe_packet(1, [("news/#", 0)]))
    bob.expect(suback(1, [0x80]))
    acl_path.write_text(ACL + "\nuser bob\ntopic readwrite news/#\n")
    w.proc.send_signal(signal.SIGHUP)
    wait_until(lambda: "topic ACL" in w.log(), msg="no reload line after SIGHUP")
    # the same session: its next SUBSCRIBE and PUBLISH use the new rules
    bob.send(subscribe_packet(2, [("news/#", 0), ("rooms/+", 0)]))
    bob.expect(suback(2, [0x00, 0x00]))
    bob.send(publish_packet("news/today", b"fresh", qos=0))
    first, body = bob.recv_packet()
    assert parse_publish(first, body)[0] == "news/today"
    # a broken file keeps the rules in force and says why
    acl_path.write_text("user bob\ntopic readwrite\n")
    w.proc.send_signal(signal.SIGHUP)
    wait_until(lambda: f"{acl_path}:2: missing topic" in ANSI.sub("", w.log()), msg="no error for the broken file")
    fresh = raw(w, "b2", "bob")
    fresh.send(subscribe_packet(3, [("news/#", 0)]))
    fresh.expect(suback(3, [0x00]))


def test_a_bad_acl_file_stops_the_node_with_file_and_line():
    d = Path(tempfile.mkdtemp(prefix="warren-acl-"))
    (d / "acl").write_text("user alice\ntopic read rooms/#\ntopic reed rooms/#\n")
    (d / "warren.toml").write_text(f'[auth]\nacl_file = "{d / "acl"}"\n')
    w = Warren("--module", "Echo", "--config", str(d / "warren.toml"), listen=["mqtt"], http=False)
    code = w.proc.wait(timeout=20)
    assert code != 0
    assert f"{d / 'acl'}:3:" in w.log() + w.stdout(), w.tail()
    # `warren check-config` says the same without starting anything
    check = subprocess.run([str(w.bin), "check-config", str(d / "warren.toml")], capture_output=True, text=True, timeout=20)
    assert check.returncode != 0
    assert f"{d / 'acl'}:3: \"reed\" is not an access word" in check.stderr, check.stderr
    (d / "warren.toml").write_text(f'[auth]\nacl_file = "{d / "missing"}"\n')
    w = Warren("--module", "Echo", "--config", str(d / "warren.toml"), listen=["mqtt"], http=False)
    assert w.proc.wait(timeout=20) != 0
    assert "missing" in w.log() + w.stdout(), w.tail()


def test_without_an_acl_file_everything_is_allowed():
    w = Warren("--module", "Echo", listen=["mqtt"], http=False).wait_ready()
    c = raw(w, "x", "anyone")
    c.send(subscribe_packet(1, [("#", 0), ("rooms/secret", 1)]))
    c.expect(suback(1, [0x00, 0x01]))
    c.send(publish_packet("rooms/secret", b"x", qos=0))
    first, body = c.recv_packet()
    assert parse_publish(first, body)[0] == "rooms/secret"
    c.send(DISCONNECT)

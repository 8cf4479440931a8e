"""warren's Redis registry against peers of the gobase Go package (docs/cluster.md, "The gobase
layouts"), in both layouts: `gobase` (the seed era's, scores in milliseconds) and
`gobase-seconds` (what gobase writes today, scores in seconds).

The peer here is written from the layouts, with redis-py and Lua scripts that do what gobase's
`goredis` register, watch and checker scripts do: register a member, refresh it every 4 s, read
the live members, take the checker lock, and watch the channel. warren is the real release
binary on its own redis-server.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass

import pytest
import redis
from brokers import Broker, installed
from conftest import Warren, free_port, wait_until

LIVE_S = 8
# warren's default registry key (`[registry] key`)
KEY = "warren"


@dataclass(frozen=True)
class Layout:
    """The names and units of one layout, for one registry key."""

    name: str
    per_second: int  # score units per second
    zset: str
    list_key: str
    channel: str
    lock: str
    lock_expiry: tuple[str, int]

    @classmethod
    def of(cls, name: str, key: str) -> Layout:
        if name == "gobase":
            return cls(name, 1000, key, f"_{{{key}}}_list_", f"_{{{key}}}_channel_", f"_{{{key}}}_locker_", ("PX", 8000))
        return cls(name, 1, key, f"{key}_list", key, f"{key}_check", ("EX", 8))

    @property
    def window(self) -> int:
        return LIVE_S * self.per_second

    def reg_message(self, member: str) -> str:
        return f"reg {member}" if self.name == "gobase" else f"reg:{member}"


# The peer's scripts, as gobase runs them: ARGV[1] is the unit per second (1000 in the seed
# layout's `TIME` arithmetic, 1 in today's), ARGV[2] the liveness window in that unit.
NOW = """
local per = tonumber(ARGV[1])
local t = redis.call('TIME')
local stamp = tonumber(t[1]) * per + tonumber(t[2]) * per / 1000000
local expireat = stamp - tonumber(ARGV[2])
"""

# KEYS: zset, list. ARGV: per, window, channel, message, member.
REGISTER = (
    "redis.replicate_commands()\n"
    + NOW
    + """
local score = redis.call('ZSCORE', KEYS[1], ARGV[5])
redis.call('ZADD', KEYS[1], stamp, ARGV[5])
if score and tonumber(score) > expireat then
  return 0
end
local slist = redis.call('ZREVRANGEBYSCORE', KEYS[1], stamp, expireat)
table.sort(slist)
redis.call('SET', KEYS[2], table.concat(slist, ','))
redis.call('PUBLISH', ARGV[3], ARGV[4])
return 1
"""
)

# KEYS: zset, list. ARGV: per, window, channel, message, member.
DEREGISTER = (
    "redis.replicate_commands()\n"
    + NOW
    + """
local score = redis.call('ZSCORE', KEYS[1], ARGV[5])
redis.call('ZREM', KEYS[1], ARGV[5])
if not (score and tonumber(score) > expireat) then
  return 0
end
local slist = redis.call('ZREVRANGEBYSCORE', KEYS[1], stamp, expireat)
table.sort(slist)
redis.call('SET', KEYS[2], table.concat(slist, ','))
redis.call('PUBLISH', ARGV[3], ARGV[4])
return 1
"""
)

# KEYS: zset. ARGV: per, window.
READ = NOW + "return redis.call('ZREVRANGEBYSCORE', KEYS[1], stamp, expireat)\n"

# The checker, as gobase's: KEYS: zset, list, lock. ARGV: per, window, channel, uuid, lock
# option, lock expiry, check message.
CHECK = (
    """
local v = redis.call('GET', KEYS[3])
if not v then
  redis.call('SET', KEYS[3], ARGV[4], ARGV[5], ARGV[6])
elseif v ~= ARGV[4] then
  return 0
end
redis.replicate_commands()
"""
    + NOW
    + """
local slist = redis.call('ZREVRANGEBYSCORE', KEYS[1], stamp, expireat)
table.sort(slist)
local str = table.concat(slist, ',')
if str == (redis.call('GET', KEYS[2]) or '') then
  return 1
end
redis.call('SET', KEYS[2], str)
redis.call('PUBLISH', ARGV[3], ARGV[7])
redis.call('ZREMRANGEBYSCORE', KEYS[1], 0, expireat - 1)
return 2
"""
)


class GobasePeer:
    """A gobase service in one layout: registers members and refreshes them every 4 s, reads the
    live list, and collects what its channel announces."""

    def __init__(self, port: int, key: str, layout: str) -> None:
        self.r = redis.Redis(host="127.0.0.1", port=port, decode_responses=True)
        self.layout = Layout.of(layout, key)
        self._register = self.r.register_script(REGISTER)
        self._deregister = self.r.register_script(DEREGISTER)
        self._read = self.r.register_script(READ)
        self._check = self.r.register_script(CHECK)
        self.messages: list[str] = []
        self._members: set[str] = set()
        self._stop = threading.Event()
        self._pubsub = self.r.pubsub(ignore_subscribe_messages=True)
        self._pubsub.subscribe(self.layout.channel)
        self._threads = [
            threading.Thread(target=self._refresh_loop, daemon=True),
            threading.Thread(target=self._watch_loop, daemon=True),
        ]
        for t in self._threads:
            t.start()

    def _args(self, message: str, member: str) -> list:
        return [self.layout.per_second, self.layout.window, self.layout.channel, message, member]

    def register(self, member: str) -> None:
        self._register(keys=[self.layout.zset, self.layout.list_key], args=self._args(self.layout.reg_message(member), member))
        self._members.add(member)

    def stop_refreshing(self, member: str) -> None:
        """Freeze: the member stays in the ZSET with its last score, as after a crash."""
        self._members.discard(member)

    def deregister(self, member: str) -> None:
        self._members.discard(member)
        word = f"dereg {member}" if self.layout.name == "gobase" else f"quit:{member}"
        self._deregister(keys=[self.layout.zset, self.layout.list_key], args=self._args(word, member))

    def live(self) -> list[str]:
        return self._read(keys=[self.layout.zset], args=[self.layout.per_second, self.layout.window])

    def check(self, uuid: str) -> int:
        option, expiry = self.layout.lock_expiry
        message = "check" if self.layout.name == "gobase" else f"check:{uuid}"
        return self._check(
            keys=[self.layout.zset, self.layout.list_key, self.layout.lock],
            args=[self.layout.per_second, self.layout.window, self.layout.channel, uuid, option, expiry, message],
        )

    def _refresh_loop(self) -> None:
        while not self._stop.wait(LIVE_S / 2):
            for m in list(self._members):
                self.register(m)

    def _watch_loop(self) -> None:
        while not self._stop.is_set():
            try:
                msg = self._pubsub.get_message(timeout=0.2)
            except (redis.ConnectionError, ValueError):
                return
            if msg and msg["type"] == "message":
                self.messages.append(msg["data"])

    def close(self) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(timeout=5)
        self._pubsub.close()
        self.r.close()


@pytest.fixture
def redis_broker():
    if not installed("redis"):
        pytest.fail("redis-server is not installed (scripts/test installs it)")
    b = Broker("redis")
    yield b
    b.close()


@pytest.fixture
def peers():
    made: list[GobasePeer] = []

    def make(port: int, key: str, layout: str) -> GobasePeer:
        p = GobasePeer(port, key, layout)
        made.append(p)
        return p

    yield make
    for p in made:
        p.close()


def registry_url(broker: Broker, layout: str) -> str:
    return f"{broker.url}/0?layout={layout}"


def serve(registry: str, node: str, port: int, *extra: str) -> Warren:
    w = Warren("--registry", registry, "--node-id", node, "--no-demo-modules", *extra, listen=[f"mqtt://127.0.0.1:{port}"], http=False)
    w.wait_ready()
    return w


def config_file(tmp_path, text: str) -> str:
    path = tmp_path / "warren.toml"
    path.write_text(text)
    return str(path)


@pytest.mark.parametrize("layout", ["gobase", "gobase-seconds"])
def test_warren_and_a_gobase_peer_see_each_other(redis_broker, peers, layout):
    key = KEY
    peer = peers(redis_broker.port, key, layout)
    gate = "gate&gate1&10.0.0.5&7001&tcp"
    peer.register(gate)

    port = free_port()
    w = serve(registry_url(redis_broker, layout), "w1", port)
    me = f"warren&w1&127.0.0.1&{port}&warren"

    # the peer sees warren, with its address and port, in the live list and on the channel
    wait_until(lambda: me in peer.live(), timeout=10, msg=f"the peer never saw warren\n{w.tail()}")
    wait_until(lambda: peer.layout.reg_message(me) in peer.messages, timeout=10, msg=f"no reg message: {peer.messages}")
    lay = peer.layout
    assert me in peer.r.get(lay.list_key).split(",")
    # warren sees the peer's service
    wait_until(lambda: f"registry service joined key={key} member={gate}" in w.log(), timeout=10, msg=w.tail())

    # the peer leaves: warren notices
    peer.deregister(gate)
    wait_until(lambda: f"registry service left key={key} member={gate}" in w.log(), timeout=15, msg=w.tail())

    # warren leaves on SIGTERM: the peer's read no longer lists it
    assert w.terminate() == 0
    wait_until(lambda: me not in peer.live(), timeout=10, msg="warren still listed after its shutdown")


@pytest.mark.parametrize("layout", ["gobase", "gobase-seconds"])
def test_a_peer_that_stops_refreshing_is_purged(redis_broker, peers, layout):
    key = KEY
    # warren first, so its checker holds the lock
    w = serve(registry_url(redis_broker, layout), "w1", free_port())
    peer = peers(redis_broker.port, key, layout)
    gone = "gate&gone1&10.0.0.6&7002&tcp"
    peer.register(gone)
    wait_until(lambda: f"registry service joined key={key} member={gone}" in w.log(), timeout=10, msg=w.tail())
    peer.stop_refreshing(gone)
    wait_until(lambda: f"registry service left key={key} member={gone}" in w.log(), timeout=30, msg=w.tail())
    wait_until(lambda: peer.r.zscore(key, gone) is None, timeout=30, msg="the stale member was never purged")
    assert gone not in peer.r.get(peer.layout.list_key).split(",")


@pytest.mark.parametrize(
    ("warren_layout", "peer_layout"),
    [("gobase", "gobase-seconds"), ("gobase-seconds", "gobase")],
)
def test_the_checker_leaves_another_layouts_members_alone(redis_broker, peers, warren_layout, peer_layout):
    key = KEY
    w = serve(registry_url(redis_broker, warren_layout), "w1", free_port())
    ours = Layout.of(warren_layout, key)
    # a live member of the other layout, refreshed by its peer, in the same ZSET
    other = peers(redis_broker.port, key, peer_layout)
    theirs = "gate&theirs1&10.0.0.7&7003&tcp"
    other.register(theirs)
    # and a member of warren's own layout that died a minute ago: this one must go
    r = redis.Redis(host="127.0.0.1", port=redis_broker.port, decode_responses=True)
    sec, usec = r.time()
    now = sec * ours.per_second + usec * ours.per_second / 1_000_000
    dead = "gate&dead1&10.0.0.8&7004&tcp"
    r.zadd(key, {dead: now - 60 * ours.per_second})

    wait_until(lambda: r.zscore(key, dead) is None, timeout=30, msg=f"the dead member was not purged\n{w.tail()}")
    # the other layout's member is still there, and still live for its own peers, and the
    # checker said once why it left it
    assert r.zscore(key, theirs) is not None
    assert theirs in other.live()
    # (seconds next to milliseconds sit in the stale range, milliseconds next to seconds far in
    # the future: neither is read as this layout's)
    unit = "seconds" if peer_layout == "gobase-seconds" else "milliseconds"
    wait_until(lambda: f"member={theirs}" in w.log() and "left alone" in w.log(), timeout=20, msg=w.tail())
    line = next(line for line in w.log().splitlines() if f"member={theirs}" in line and "left alone" in line)
    assert f"a timestamp in {unit}" in line, line
    # several more checks: still there, and logged once
    time.sleep(3 * LIVE_S / 2)
    assert r.zscore(key, theirs) is not None
    assert theirs in other.live()
    assert sum(1 for line in w.log().splitlines() if f"member={theirs}" in line and "left alone" in line) <= 1
    # warren did not list it as a service of its own layout
    assert f"registry service joined key={key} member={theirs}" not in w.log()
    r.close()


def test_advertise_addr_is_the_member_address(redis_broker, peers, tmp_path):
    key = "adv"
    peer = peers(redis_broker.port, key, "gobase")
    cfg = config_file(
        tmp_path,
        f'[registry]\nurl = "{redis_broker.url}/0"\nkey = "{key}"\nadvertise_addr = "203.0.113.7:7001"\n',
    )
    port = free_port()
    w = Warren("--config", cfg, "--node-id", "a1", "--no-demo-modules", listen=[f"mqtt://127.0.0.1:{port}"], http=False)
    w.wait_ready()
    wait_until(lambda: "warren&a1&203.0.113.7&7001&warren" in peer.live(), timeout=10, msg=f"{peer.live()}\n{w.tail()}")

    # a host alone keeps the first listener's port (each node on a key of its own: nodes sharing
    # one would also share the gate's default instance id)
    peer2 = peers(redis_broker.port, "adv2", "gobase")
    cfg = config_file(tmp_path, f'[registry]\nurl = "{redis_broker.url}/0"\nkey = "adv2"\nadvertise_addr = "gw.example"\n')
    port = free_port()
    w2 = Warren("--config", cfg, "--node-id", "a2", "--no-demo-modules", listen=[f"mqtt://127.0.0.1:{port}"], http=False)
    w2.wait_ready()
    wait_until(lambda: f"warren&a2&gw.example&{port}&warren" in peer2.live(), timeout=10, msg=f"{peer2.live()}\n{w2.tail()}")

    # a listener on port 0 is announced with the port it got
    w3 = Warren("--registry", f"{redis_broker.url}/0", "--node-id", "a3", "--no-demo-modules", listen=["mqtt://127.0.0.1:0"], http=False)
    wait_until(lambda: "listening" in w3.stdout() or not w3.running(), timeout=20, msg=w3.tail())
    bound = int(next(line for line in w3.stdout().splitlines() if line.startswith("listening")).rsplit(":", 1)[1])
    # the registry key of a3 is warren's default
    warren_peer = peers(redis_broker.port, KEY, "gobase")
    wait_until(lambda: f"warren&a3&127.0.0.1&{bound}&warren" in warren_peer.live(), timeout=10, msg=f"{warren_peer.live()}\n{w3.tail()}")
    assert not any(m.startswith("warren&a3&") and m.endswith("&0&warren") for m in warren_peer.live())


def test_a_bad_layout_or_advertise_addr_is_refused(tmp_path):
    cfg = config_file(tmp_path, '[registry]\nlayout = "gobase2"\nadvertise_addr = "a&b"\n')
    w = Warren("--config", cfg, http=False)
    w.proc.wait(timeout=20)
    out = w.stdout() + w.log()
    assert w.proc.returncode != 0
    assert 'registry.layout: unknown layout "gobase2" (expected gobase or gobase-seconds)' in out, out
    assert "registry.advertise_addr" in out, out

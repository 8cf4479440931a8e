#!/usr/bin/env python3
"""A service of the gobase backend sample, for examples/backends/heartbeat.toml.

It listens on 127.0.0.1:PORT, speaks the sample's framing (`msgid u32 LE · len u32 LE · body`),
answers the heartbeat request (msgid 1, `heatreqmsg`) with the response (msgid 2,
`heatrespmsg`), and registers itself in a gobase Redis registry as the member
`gate&<id>&127.0.0.1&<port>&tcp`, refreshed every 4 s as gobase does (the register script below
is the gobase one, in either layout). Ctrl-C deregisters it and stops.

    python3 examples/backends/gate_service.py --id gate1 --port 7001

Needs redis-py (`pip install redis`). docs/backends.md, "The gobase sample".
"""

from __future__ import annotations

import argparse
import signal
import socket
import struct
import sys
import threading

import redis

LIVE_S = 8

# gobase's register script: score = Redis server time in the layout's unit; if the member was
# not live already, store the sorted live list and announce it. KEYS: zset, list.
# ARGV: units per second, live window, channel, message, member.
REGISTER = """
redis.replicate_commands()
local per = tonumber(ARGV[1])
local t = redis.call('TIME')
local stamp = tonumber(t[1]) * per + tonumber(t[2]) * per / 1000000
local expireat = stamp - tonumber(ARGV[2])
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

# gobase's deregister: ZREM, and if the member was live, store the list and announce it.
DEREGISTER = """
redis.replicate_commands()
local per = tonumber(ARGV[1])
local t = redis.call('TIME')
local stamp = tonumber(t[1]) * per + tonumber(t[2]) * per / 1000000
local expireat = stamp - tonumber(ARGV[2])
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


def layout_keys(key: str, layout: str) -> tuple[int, str, str]:
    """Units per second, list key and channel of `key` in `layout` (docs/cluster.md)."""
    if layout == "gobase":
        return 1000, f"_{{{key}}}_list_", f"_{{{key}}}_channel_"
    return 1, f"{key}_list", key


def serve_conn(conn: socket.socket, name: str) -> None:
    buf = b""
    with conn:
        while True:
            try:
                data = conn.recv(65536)
            except OSError:
                return
            if not data:
                print(f"{name}: connection closed", flush=True)
                return
            buf += data
            while len(buf) >= 8:
                msgid, length = struct.unpack_from("<II", buf)
                if len(buf) < 8 + length:
                    break
                buf = buf[8 + length :]
                if msgid == 1:
                    conn.sendall(struct.pack("<II", 2, 11) + b"heatrespmsg")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--id", required=True, help="service id (the member's second field)")
    p.add_argument("--port", type=int, required=True, help="TCP port to listen on")
    p.add_argument("--registry", default="redis://127.0.0.1:6379/0", help="Redis URL")
    p.add_argument("--key", default="backend-demo", help="gobase registry key")
    p.add_argument("--layout", default="gobase", choices=["gobase", "gobase-seconds"])
    p.add_argument("--name", default="gate", help="service (group) name")
    args = p.parse_args()

    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind(("127.0.0.1", args.port))
    listener.listen()

    r = redis.Redis.from_url(args.registry)
    per, list_key, channel = layout_keys(args.key, args.layout)
    member = f"{args.name}&{args.id}&127.0.0.1&{args.port}&tcp"
    register, deregister = r.register_script(REGISTER), r.register_script(DEREGISTER)
    reg = f"reg {member}" if args.layout == "gobase" else f"reg:{member}"
    quit_ = f"dereg {member}" if args.layout == "gobase" else f"quit:{member}"
    argv = [per, LIVE_S * per, channel]

    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())

    def accept() -> None:
        while True:
            try:
                conn, _ = listener.accept()
            except OSError:
                return
            threading.Thread(target=serve_conn, args=(conn, args.id), daemon=True).start()

    threading.Thread(target=accept, daemon=True).start()
    register(keys=[args.key, list_key], args=argv + [reg, member])
    print(f"{args.id}: listening on 127.0.0.1:{args.port}, registered as {member}", flush=True)
    while not stop.wait(LIVE_S / 2):
        register(keys=[args.key, list_key], args=argv + [reg, member])
    deregister(keys=[args.key, list_key], args=argv + [quit_, member])
    print(f"{args.id}: deregistered", flush=True)
    listener.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())

# -*- coding: utf8 -*-
"""A Go service registered with gobase's Redis registry (docs/cluster.md, "Registries"), played with
plain redis-py commands, for warren's registry tests.

Every 4 s, like gobase's Register: read the server time (TIME -> sec*1000 + usec/1000, fractional
ms), read the member's old score, ZADD it with the time; unless the old score was live
(>= now - 8000), recompute the live list (ZREVRANGEBYSCORE key now now-8000, byte-sorted,
comma-joined), SET it and PUBLISH `reg <member>`. gobase does these in one Lua script; here they
are separate commands, which changes nothing for a single registrant.

Usage: gobase_service.py PORT KEY MEMBER
stdout: {"event": "registered"} after the first registration
stdin:  a line `quit` (or end of input) deregisters like gobase's DeReg and exits
"""

import json
import sys
import threading

from redis import StrictRedis

WINDOW = 8000


def now_ms(db):
    sec, usec = db.time()
    return sec * 1000 + usec / 1000.0


def live_list(db, key, now):
    members = [m.decode() for m in db.zrevrangebyscore(key, now, now - WINDOW)]
    members.sort(key=lambda m: m.encode())
    return ",".join(members)


def register(db, key, member):
    now = now_ms(db)
    old = db.zscore(key, member)
    db.zadd(key, {member: now})
    if old is not None and old >= now - WINDOW:
        return
    db.set("_{%s}_list_" % key, live_list(db, key, now))
    db.publish("_{%s}_channel_" % key, "reg " + member)


def deregister(db, key, member):
    now = now_ms(db)
    old = db.zscore(key, member)
    db.zrem(key, member)
    if old is None or old < now - WINDOW:
        return
    db.set("_{%s}_list_" % key, live_list(db, key, now))
    db.publish("_{%s}_channel_" % key, "dereg " + member)


if __name__ == "__main__":
    port, key, member = int(sys.argv[1]), sys.argv[2], sys.argv[3]
    db = StrictRedis(host="127.0.0.1", port=port)
    register(db, key, member)
    sys.stdout.write(json.dumps({"event": "registered"}) + "\n")
    sys.stdout.flush()
    stop = threading.Event()

    def wait_for_quit():
        for line in sys.stdin:
            if line.strip() == "quit":
                break
        stop.set()

    t = threading.Thread(target=wait_for_quit)
    t.daemon = True
    t.start()
    while not stop.wait(4):
        register(db, key, member)
    deregister(db, key, member)

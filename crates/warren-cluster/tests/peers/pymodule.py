# -*- coding: utf8 -*-
"""A TianQinS pymodule peer for warren's Redis RPC tests (docs/cluster.md, "Compatibility bridges").

It speaks exactly like scripts/pymodule of TianQinS/websocket: a StrictRedis built the same way
(DB 1, a connection pool with a 3 s connect timeout), a loop that BLPOPs its topic `pyRpc`, runs
`func(*args)`, and, when the message names both a callback and a callback topic, RPUSHes
`{"func": cb, "ct": <own topic>, "cb": "", "args": [ret]}`; calls go out as
`{"func": f, "ct": <own topic>, "cb": cb, "args": [...]}`, all with json.dumps's default
`", "` / `": "` separators. Registered functions: `test(a, b) -> a + b` and `callback(arg)`, as in
its main.py, plus `reload(*args)` for broadcasts.

Test harness additions, outside the pymodule's wire behaviour:
- redis-py ends an idle BLPOP with TimeoutError once its socket timeout passes; the pymodule's
  loop would die there, this one starts the BLPOP again;
- the pymodule does not subscribe; a thread here runs broadcasts like a Go TianQinS process does
  (skipping those that carry its own pid) so broadcasts from warren can be observed;
- commands arrive on stdin and events leave on stdout, one JSON object per line.

Usage: pymodule.py PORT [PID]
stdin:  {"call": [topic, func, callback, arg...]}   -> RPUSH topic, like RPCModule.call
        {"quit": true}
stdout: {"event": "ready"}
        {"event": "dispatch", "path": "list"|"channel", "func": f, "args": [...]}
        {"event": "callback", "arg": value}
"""

import json
import sys
import threading
import traceback

from redis import ConnectionPool, StrictRedis
from redis.exceptions import TimeoutError

TOPIC = "pyRpc"
_out = threading.Lock()


def emit(**event):
    with _out:
        sys.stdout.write(json.dumps(event) + "\n")
        sys.stdout.flush()


class App(object):
    """The pymodule's ModuleManager: a table of functions and a dispatcher."""

    def __init__(self):
        self.cmd_tables = {}

    def register(self, f, func):
        self.cmd_tables[f] = func

    def dispatch(self, f, args):
        ret = None
        func = self.cmd_tables.get(f, None)
        if func:
            ret = func(*args)
        return ret


class RPCModule(object):
    """The pymodule's RPCModule, with the loop restarted after a socket timeout."""

    def __init__(self, app, **conf):
        self.app = app
        self.conf = conf
        self.topic = TOPIC
        self.closeSig = False
        self.pool = ConnectionPool(socket_connect_timeout=3, **self.conf)
        self.db = StrictRedis(connection_pool=self.pool, socket_timeout=1, socket_keepalive=60,
                              socket_connect_timeout=1, **self.conf)

    def call(self, topic, f, callback, *args):
        _data = json.dumps({
            "func": f,
            "ct": self.topic,
            "cb": callback,
            "args": args,
        })
        self.db.rpush(topic, _data)

    def Run(self):
        while self.closeSig == False:
            try:
                topic, data = self.db.blpop(self.topic)
            except TimeoutError:
                continue
            data = json.loads(data)
            f = data.get("func", None)
            if f:
                emit(event="dispatch", path="list", func=f, args=data.get("args", []))
                ret = self.app.dispatch(f, data["args"])
                cb = data.get("cb", None)
                ct = data.get("ct", None)
                if cb and ct:
                    self.call(ct, cb, "", ret)


def subscriber(db, pid):
    """A Go TianQinS process's onSubscribe: run every broadcast whose pid is not ours."""
    ps = db.pubsub()
    ps.subscribe(TOPIC)
    while True:
        try:
            m = ps.get_message(timeout=1.0)
        except TimeoutError:
            continue
        if m is None:
            continue
        if m["type"] == "subscribe":
            emit(event="ready")
            continue
        if m["type"] != "message":
            continue
        try:
            data = json.loads(m["data"])
        except ValueError:
            continue
        if data.get("pid") == pid:
            continue
        f = data.get("func", None)
        if f:
            emit(event="dispatch", path="channel", func=f, args=data.get("args", []))
            app.dispatch(f, data.get("args", []))


def test(arg1, arg2):
    return arg1 + arg2


def callback(arg):
    emit(event="callback", arg=arg)


def reload(*args):
    return None


if __name__ == "__main__":
    port = int(sys.argv[1])
    pid = sys.argv[2] if len(sys.argv) > 2 else "pymodule"
    app = App()
    app.register("test", test)
    app.register("callback", callback)
    app.register("reload", reload)
    rpc = RPCModule(app, host="127.0.0.1", port=port, db=1, password="")
    sub = StrictRedis(host="127.0.0.1", port=port, db=1)
    for target, args in ((rpc.Run, ()), (subscriber, (sub, pid))):
        t = threading.Thread(target=target, args=args)
        t.daemon = True
        t.start()
    for line in sys.stdin:
        try:
            cmd = json.loads(line)
            if cmd.get("quit"):
                break
            if "call" in cmd:
                rpc.call(*cmd["call"])
        except Exception:
            traceback.print_exc()

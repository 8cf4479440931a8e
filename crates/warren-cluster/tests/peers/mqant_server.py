#!/usr/bin/env python3
"""An mqant v1 RPC server over RabbitMQ, written with pika exactly as docs/cluster.md
("Compatibility bridges") says mqant's Go server behaves: it declares the exchange (durable, not
auto-deleted, not internal) and its durable queue bound with its binding key, consumes with manual
acks acknowledged on receipt, drops calls whose `Expired` (unix ms) has passed, answers only when
`Reply` is true, and sends the ResultInfo to the default exchange with the routing key taken from
the `reply_to` *header*, content type text/plain, delivery mode 1 and empty headers.

Usage: mqant_server.py URL EXCHANGE EXCHANGE_TYPE QUEUE BINDING_KEY

Functions (Args are [session export map, body]):
  HD_Login   Result "login success <body.userName>"
  HD_Who     Result = the export map it received
  HD_Fail    Error "No room"
  HD_Silent  never answers
  other      Error "Remote function(<Fn>) not found"

Prints "READY" once consuming, then one JSON line per received message describing it (the
CallInfo, its headers and properties), so a test can check what a caller sent. Runs until killed.
"""

import json
import sys
import time

import pika


def main() -> int:
    url, exchange, exchange_type, queue, binding_key = sys.argv[1:6]
    conn = pika.BlockingConnection(pika.URLParameters(url))
    ch = conn.channel()
    ch.exchange_declare(
        exchange=exchange,
        exchange_type=exchange_type,
        durable=True,
        auto_delete=False,
        internal=False,
    )
    ch.queue_declare(queue=queue, durable=True, auto_delete=False, exclusive=False)
    ch.queue_bind(queue=queue, exchange=exchange, routing_key=binding_key)

    def on_call(channel, method, props, body):
        channel.basic_ack(method.delivery_tag)
        headers = props.headers or {}
        seen = {
            "body": body.decode("utf-8", "replace"),
            "headers": {k: (v.decode() if isinstance(v, bytes) else v) for k, v in headers.items()},
            "reply_to_property": props.reply_to,
            "content_type": props.content_type,
            "delivery_mode": props.delivery_mode,
            "received_ms": int(time.time() * 1000),
        }
        print(json.dumps(seen), flush=True)
        try:
            call = json.loads(body)
        except ValueError:
            return
        if call.get("Expired", 0) < int(time.time() * 1000) or not call.get("Reply"):
            return
        fn = call.get("Fn")
        args = call.get("Args") or []
        result, error = None, ""
        if fn == "HD_Login":
            result = "login success " + str((args[1] if len(args) > 1 else {}).get("userName"))
        elif fn == "HD_Who":
            result = args[0] if args else None
        elif fn == "HD_Fail":
            error = "No room"
        elif fn == "HD_Silent":
            return
        else:
            error = "Remote function(%s) not found" % fn
        reply_to = headers.get("reply_to")
        if isinstance(reply_to, bytes):
            reply_to = reply_to.decode()
        if not reply_to:
            return
        out = {"Cid": call.get("Cid"), "Error": error, "Result": result}
        channel.basic_publish(
            exchange="",
            routing_key=reply_to,
            body=json.dumps(out, separators=(",", ":")).encode(),
            properties=pika.BasicProperties(
                content_type="text/plain", delivery_mode=1, headers={}
            ),
        )

    ch.basic_consume(queue=queue, on_message_callback=on_call, auto_ack=False)
    print("READY", flush=True)
    ch.start_consuming()
    return 0


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python3
"""An mqant v1 RPC client over RabbitMQ, written with pika exactly as docs/cluster.md
("Compatibility bridges") says mqant's Go client behaves: it declares the exchange (durable, not
auto-deleted, not internal), a server-named exclusive auto-deleted callback queue consumed with
manual acks, and publishes each CallInfo to the exchange with the target's binding key, content type
text/plain, delivery mode 1 and the callback queue in the `reply_to` *header* (the AMQP reply_to
property is not set). Replies are correlated by `Cid` only.

Usage: mqant_client.py URL EXCHANGE EXCHANGE_TYPE BINDING_KEY PLAN_JSON

PLAN_JSON is a list of steps, run in order. A step is an object with:
  cid            the Cid to use (default: a new UUIDv4)
  fn             the Fn to call
  args           the Args (default: [{}, {}])
  expired_in_ms  Expired = now + this many ms (default 5000; negative: already expired)
  reply          the Reply flag (default true)
  raw            publish this text as the body instead of a CallInfo
  via_property   name the callback queue in the reply_to property instead of the header
  wait           wait (up to 15 s) until the reply with this Cid has arrived

Prints one JSON object: {"queue": <callback queue>, "replies": [<raw ResultInfo text>, ...]} in
arrival order, after the last step (and a last drain of pending deliveries). Exits with status 2
when a awaited reply does not come.
"""

import json
import sys
import time
import uuid

import pika


def main() -> int:
    url, exchange, exchange_type, binding_key, plan = sys.argv[1:6]
    plan = json.loads(plan)
    conn = pika.BlockingConnection(pika.URLParameters(url))
    ch = conn.channel()
    ch.exchange_declare(
        exchange=exchange,
        exchange_type=exchange_type,
        durable=True,
        auto_delete=False,
        internal=False,
    )
    callback = ch.queue_declare(
        queue="", durable=False, auto_delete=True, exclusive=True
    ).method.queue

    replies = []

    def on_reply(channel, method, _props, body):
        channel.basic_ack(method.delivery_tag)
        replies.append(body.decode("utf-8", "replace"))

    ch.basic_consume(queue=callback, on_message_callback=on_reply, auto_ack=False)

    def got(cid):
        for r in replies:
            try:
                if json.loads(r).get("Cid") == cid:
                    return True
            except ValueError:
                pass
        return False

    for step in plan:
        cid = step.get("cid") or str(uuid.uuid4())
        if "raw" in step:
            body = step["raw"].encode()
        else:
            call = {
                "Cid": cid,
                "Fn": step["fn"],
                "Args": step.get("args", [{}, {}]),
                "Expired": int(time.time() * 1000) + int(step.get("expired_in_ms", 5000)),
                "Reply": step.get("reply", True),
                "Result": {"Cid": "", "Error": "", "Result": None},
            }
            body = json.dumps(call, separators=(",", ":")).encode()
        if step.get("via_property"):
            props = pika.BasicProperties(
                content_type="text/plain", delivery_mode=1, reply_to=callback
            )
        else:
            props = pika.BasicProperties(
                content_type="text/plain", delivery_mode=1, headers={"reply_to": callback}
            )
        ch.basic_publish(
            exchange=exchange, routing_key=binding_key, body=body, properties=props
        )
        if step.get("wait"):
            deadline = time.time() + 15
            while not got(cid):
                if time.time() > deadline:
                    print(json.dumps({"queue": callback, "replies": replies, "missing": cid}))
                    return 2
                conn.process_data_events(time_limit=0.05)
    conn.process_data_events(time_limit=0.2)
    print(json.dumps({"queue": callback, "replies": replies}))
    conn.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())

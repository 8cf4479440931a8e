//! What every default-mode MQTT connection of a node shares beyond subscriptions
//! (docs/protocols/mqtt.md, "MQTT 3.1.1 conformance"): the retained messages, the traffic
//! counters, and the `$SYS/broker/...` topics published from them every `[mqtt] sys_interval`.
//!
//! A client's PUBLISH, a will and the `$SYS` updates all reach subscribers through
//! [`Broker::publish`]: retained first when asked (under the `[limits]` caps), then one shared
//! message to every matching subscription, with the retain flag clear. Retained copies sent on
//! SUBSCRIBE ([`send_retained`]) carry the retain flag, set by the framer as it frames them.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

use bytes::Bytes;

use super::conn::{End, SessionConn};
use super::{Gate, Host};
use crate::config::Config;
use crate::refusal;
use crate::retained::{Retain, RetainedStore};
use crate::session::{Message, Outbound};

/// Counter shards: each thread adds to its own cache line, so counting every packet framed for
/// a large fan-out costs no contended atomic.
const SHARDS: usize = 16;

#[derive(Debug, Default)]
#[repr(align(128))]
struct Shard {
    packets: AtomicU64,
    bytes: AtomicU64,
    publishes: AtomicU64,
}

/// Packets, bytes and PUBLISH packets in one direction, summed over shards when read.
#[derive(Debug, Default)]
pub(crate) struct Traffic {
    shards: [Shard; SHARDS],
}

static NEXT_SHARD: AtomicUsize = AtomicUsize::new(0);

thread_local! {
    static SHARD: usize = NEXT_SHARD.fetch_add(1, Ordering::Relaxed) % SHARDS;
}

impl Traffic {
    /// Count `packets` packets of `bytes` bytes, `publishes` of them PUBLISH.
    pub(crate) fn add(&self, packets: u64, bytes: u64, publishes: u64) {
        let s = &self.shards[SHARD.with(|s| *s)];
        s.packets.fetch_add(packets, Ordering::Relaxed);
        s.bytes.fetch_add(bytes, Ordering::Relaxed);
        if publishes > 0 {
            s.publishes.fetch_add(publishes, Ordering::Relaxed);
        }
    }

    /// (packets, bytes, publishes) so far.
    pub(crate) fn totals(&self) -> (u64, u64, u64) {
        self.shards.iter().fold((0, 0, 0), |(p, b, m), s| {
            (
                p + s.packets.load(Ordering::Relaxed),
                b + s.bytes.load(Ordering::Relaxed),
                m + s.publishes.load(Ordering::Relaxed),
            )
        })
    }
}

/// The node's MQTT broker state (one per gate, shared by every MQTT listener).
#[derive(Debug)]
pub(crate) struct Broker {
    /// Retained messages (`[limits] max_retained_messages`, `max_retained_bytes`).
    pub(crate) retained: RetainedStore,
    /// The node's own `$SYS` topics, retained apart: outside the caps (a dozen topics rewritten
    /// in place) and never written to a backend (meaningless after a restart).
    sys: RetainedStore,
    /// MQTT packets read from clients.
    pub(crate) received: Traffic,
    /// MQTT packets framed for clients.
    pub(crate) sent: Traffic,
    /// Default-mode MQTT connections open now.
    clients: AtomicUsize,
    started: Instant,
    /// `[mqtt] sys_interval` in seconds; 0: no `$SYS`.
    sys_interval: u64,
    sys_started: AtomicBool,
}

impl Broker {
    pub(crate) fn new(config: &Config) -> Self {
        Broker {
            retained: RetainedStore::new(
                config.limits.max_retained_messages,
                config.limits.max_retained_bytes,
            ),
            sys: RetainedStore::new(usize::MAX, usize::MAX),
            received: Traffic::default(),
            sent: Traffic::default(),
            clients: AtomicUsize::new(0),
            started: Instant::now(),
            sys_interval: config.mqtt.sys_interval,
            sys_started: AtomicBool::new(false),
        }
    }

    /// Publish to subscribers as a client's PUBLISH does: kept first when `retain` is set (an
    /// empty payload deletes), then one shared message to every matching subscription. A
    /// retained message over a cap is refused (logged, counted) and still delivered.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn publish(
        &self,
        node: &dyn Host,
        peer: &SocketAddr,
        topic: &str,
        topic_bytes: Bytes,
        qos: u8,
        payload: Bytes,
        retain: bool,
    ) -> usize {
        if retain {
            self.retain(peer, topic, qos, payload.clone());
        }
        node.subscriptions()
            .publish(topic, qos, topic_bytes, payload)
    }

    /// Keep (or, with an empty payload, delete) the retained message of `topic`.
    fn retain(&self, peer: &SocketAddr, topic: &str, qos: u8, payload: Bytes) {
        match self.retained.set(topic, qos, payload) {
            Ok(Retain::Added | Retain::Deleted) => {
                metrics::gauge!("warren_retained_messages").set(self.retained.len() as f64);
            }
            Ok(Retain::Replaced | Retain::Nothing) => {}
            Err(full) => {
                let why = format!("retained message on {:?} not kept: {full}", preview(topic));
                refusal::refuse(peer, full.kind(), why);
            }
        }
    }

    /// A default-mode client connected: counted, and the `$SYS` updates start with the first.
    pub(crate) fn client_connected(&self, gate: &Arc<Gate>) {
        self.clients.fetch_add(1, Ordering::Relaxed);
        if self.sys_interval > 0 && !self.sys_started.swap(true, Ordering::AcqRel) {
            // the first values are there before this client's CONNACK
            self.publish_sys(&*gate.node, true);
            let weak = Arc::downgrade(gate);
            let every = Duration::from_secs(self.sys_interval);
            gate.tracker.spawn(sys_loop(
                weak,
                gate.draining.clone(),
                gate.killing.clone(),
                every,
            ));
        }
    }

    /// A default-mode client's connection ended.
    pub(crate) fn client_left(&self) {
        self.clients.fetch_sub(1, Ordering::Relaxed);
    }

    /// Whether any topic retains a message (the node's own `$SYS` topics included).
    pub(crate) fn has_retained(&self) -> bool {
        !self.retained.is_empty() || !self.sys.is_empty()
    }

    /// Publish the `$SYS/broker/...` topics, retained (in `sys`), to their subscribers.
    fn publish_sys(&self, node: &dyn Host, first: bool) {
        let (rx_packets, rx_bytes, rx_publishes) = self.received.totals();
        let (tx_packets, tx_bytes, tx_publishes) = self.sent.totals();
        let mut values: Vec<(&str, String)> = vec![
            (
                "$SYS/broker/uptime",
                format!("{} seconds", self.started.elapsed().as_secs()),
            ),
            (
                "$SYS/broker/clients/connected",
                self.clients.load(Ordering::Relaxed).to_string(),
            ),
            ("$SYS/broker/messages/received", rx_packets.to_string()),
            ("$SYS/broker/messages/sent", tx_packets.to_string()),
            (
                "$SYS/broker/publish/messages/received",
                rx_publishes.to_string(),
            ),
            (
                "$SYS/broker/publish/messages/sent",
                tx_publishes.to_string(),
            ),
            ("$SYS/broker/bytes/received", rx_bytes.to_string()),
            ("$SYS/broker/bytes/sent", tx_bytes.to_string()),
            (
                "$SYS/broker/subscriptions/count",
                node.subscriptions().len().to_string(),
            ),
        ];
        if first {
            values.push((
                "$SYS/broker/version",
                format!("warren version {}", env!("CARGO_PKG_VERSION")),
            ));
        }
        for (topic, value) in values {
            self.sys_topic(node, topic, value);
        }
        // as mosquitto, the count includes the $SYS topics themselves
        let count = self.retained.len() + self.sys.len() + usize::from(first);
        self.sys_topic(
            node,
            "$SYS/broker/retained messages/count",
            count.to_string(),
        );
    }

    fn sys_topic(&self, node: &dyn Host, topic: &str, value: String) {
        let payload = Bytes::from(value);
        let _ = self.sys.set(topic, 0, payload.clone());
        let topic_bytes = Bytes::copy_from_slice(topic.as_bytes());
        node.subscriptions().publish(topic, 0, topic_bytes, payload);
    }
}

/// Publish the `$SYS` topics every `every` until the gate drains, is killed or is gone.
async fn sys_loop(
    gate: Weak<Gate>,
    draining: tokio_util::sync::CancellationToken,
    killing: tokio_util::sync::CancellationToken,
    every: Duration,
) {
    let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = draining.cancelled() => break,
            _ = killing.cancelled() => break,
            _ = tick.tick() => {
                let Some(gate) = gate.upgrade() else { break };
                gate.broker.publish_sys(&*gate.node, false);
            }
        }
    }
}

/// The start of a client-chosen topic for a log line (at most 64 bytes).
pub(crate) fn preview(t: &str) -> &str {
    let mut end = t.len().min(64);
    while !t.is_char_boundary(end) {
        end -= 1;
    }
    &t[..end]
}

/// Whether `topic` is one of the node's own: clients may not publish under `$SYS`.
pub(crate) fn is_sys(topic: &str) -> bool {
    topic == "$SYS" || topic.starts_with("$SYS/")
}

/// After a SUBACK: send every retained message matching each granted `(filter, QoS)`, with the
/// retain flag set, at the lower of its QoS and the granted one, through the connection's framer
/// (so that a copy at QoS 1 or 2 takes a packet id and a slot of the inflight window like any
/// other message).
pub(crate) async fn send_retained<T: Send + Unpin + 'static>(
    broker: &Broker,
    conn: &mut SessionConn<T>,
    granted: &[(String, u8)],
) -> Result<(), End> {
    let mut found = Vec::new();
    for (filter, qos) in granted {
        found.clear();
        broker.retained.matching(filter, &mut found);
        // only a filter starting with '$' matches a '$' topic
        if filter.starts_with('$') {
            broker.sys.matching(filter, &mut found);
        }
        for m in &found {
            metrics::counter!("warren_retained_deliveries_total").increment(1);
            let msg = Message::retained(m.topic.clone(), m.payload.clone());
            let qos = Some(m.qos.min(*qos));
            conn.send(Outbound::Message { msg, qos }).await?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::BytesMut;
    use warren_proto::mqtt::{self, QoS};

    #[test]
    fn a_retained_copy_carries_the_retain_flag_and_a_forwarded_message_does_not() {
        for (msg, retain) in [
            (Message::retained("a/b", "kept"), true),
            (Message::new("a/b", "live"), false),
        ] {
            let mut bytes = BytesMut::from(&msg.mqtt_qos0()[..]);
            match mqtt::decode(&mut bytes, 1 << 20) {
                Ok(Some(mqtt::Packet::Publish(p))) => {
                    assert_eq!((p.retain, p.qos), (retain, QoS::AtMostOnce));
                }
                other => panic!("{other:?}"),
            }
        }
    }

    #[test]
    fn traffic_sums_its_shards() {
        let t = Arc::new(Traffic::default());
        let handles: Vec<_> = (0..4)
            .map(|_| {
                let t = t.clone();
                std::thread::spawn(move || {
                    for _ in 0..1000 {
                        t.add(1, 10, 1);
                    }
                })
            })
            .collect();
        for h in handles {
            h.join().expect("thread");
        }
        t.add(1, 2, 0);
        assert_eq!(t.totals(), (4001, 40002, 4000));
    }

    #[test]
    fn sys_topics() {
        assert!(is_sys("$SYS/broker/uptime"));
        assert!(is_sys("$SYS"));
        assert!(!is_sys("$SYSTEM/x"));
        assert!(!is_sys("a/$SYS"));
    }
}

//! The value of a retained MQTT message in a cluster's shared store (the NATS KV bucket of
//! [`crate::nats::NatsRetained`], the Redis hash of [`crate::redis::RedisRetained`]), and the
//! change a gate queues for its writer.
//!
//! Binary, so a payload is any bytes: `[version = 1][QoS][topic length, u16 big-endian][topic]
//! [payload]`. The topic is in the value (not only in the key) so a key's escaping never has to
//! be undone.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use bytes::{Bytes, BytesMut};
use tokio::sync::mpsc;
use warren::retained::RetainedBackend;

/// First byte: the format's version.
const VERSION: u8 = 1;
/// Bytes before the topic.
const HEADER: usize = 4;

/// A change a gate made to its retained messages, waiting to be written to the shared store.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Change {
    /// `topic` retains this message now.
    Put {
        topic: String,
        qos: u8,
        payload: Bytes,
    },
    /// `topic` retains nothing now.
    Delete { topic: String },
}

impl Change {
    pub(crate) fn topic(&self) -> &str {
        match self {
            Change::Put { topic, .. } | Change::Delete { topic } => topic,
        }
    }
}

/// The stored value of a retained message (a topic name is at most 65535 bytes).
pub(crate) fn encode(topic: &str, qos: u8, payload: &Bytes) -> Bytes {
    let len = u16::try_from(topic.len()).unwrap_or(u16::MAX);
    let mut b = BytesMut::with_capacity(HEADER + topic.len() + payload.len());
    b.extend_from_slice(&[VERSION, qos]);
    b.extend_from_slice(&len.to_be_bytes());
    b.extend_from_slice(&topic.as_bytes()[..usize::from(len)]);
    b.extend_from_slice(payload);
    b.freeze()
}

/// A stored value back to `(topic, QoS, payload)`; every field checked (another node, or
/// anyone with access to the store, wrote it).
pub(crate) fn decode(mut value: Bytes) -> Result<(String, u8, Bytes), String> {
    if value.len() < HEADER {
        return Err(format!("{} bytes, shorter than the header", value.len()));
    }
    if value[0] != VERSION {
        return Err(format!("format version {} (this node reads 1)", value[0]));
    }
    let qos = value[1];
    if qos > 2 {
        return Err(format!("QoS {qos}"));
    }
    let len = usize::from(u16::from_be_bytes([value[2], value[3]]));
    if len > value.len() - HEADER {
        return Err(format!(
            "a topic of {len} bytes announced, {} present",
            value.len() - HEADER
        ));
    }
    let mut rest = value.split_off(HEADER);
    let payload = rest.split_off(len);
    let topic = String::from_utf8(rest.to_vec()).map_err(|_| "a topic that is not UTF-8")?;
    // a valid MQTT topic name: not empty, no wildcard, no NUL (MQTT 3.1.1 sections 1.5.3, 4.7)
    if topic.is_empty() || topic.contains(['+', '#', '\0']) {
        return Err("a topic that is not a valid MQTT topic name".into());
    }
    if payload.is_empty() {
        return Err("an empty payload".into());
    }
    Ok((topic, qos, payload))
}

/// The gate's side of a shared store: a [`RetainedBackend`] that queues each change, without
/// waiting, for the store's one writer task. A full queue drops the change (it is still on the
/// gates), counted and logged at most once a second.
pub(crate) struct ChangeQueue {
    tx: mpsc::Sender<Change>,
    /// `nats` or `redis`: the metric's label.
    store: &'static str,
    /// The bucket or key written, for the log.
    name: String,
    /// Seconds since `started` of the last "queue full" line.
    logged_full: AtomicU64,
    started: Instant,
}

impl ChangeQueue {
    /// Most changes waiting for a store's writer.
    pub(crate) const CAPACITY: usize = 16_384;

    /// A queue for the store `store` (`nats`, `redis`) named `name`, and its receiving end for
    /// the writer task.
    pub(crate) fn new(store: &'static str, name: String) -> (ChangeQueue, mpsc::Receiver<Change>) {
        let (tx, rx) = mpsc::channel(Self::CAPACITY);
        let queue = ChangeQueue {
            tx,
            store,
            name,
            logged_full: AtomicU64::new(0),
            started: Instant::now(),
        };
        (queue, rx)
    }

    fn push(&self, change: Change) {
        if self.tx.try_send(change).is_err() {
            metrics::counter!("warren_retained_shared_dropped_total", "store" => self.store)
                .increment(1);
            let now = self.started.elapsed().as_secs() + 1;
            if self.logged_full.swap(now, Ordering::Relaxed) != now {
                tracing::warn!(
                    store = self.store,
                    name = %self.name,
                    queue = Self::CAPACITY,
                    "the queue of retained changes to the shared store is full: a change is kept \
                     on the gates but not in the store"
                );
            }
        }
    }
}

impl std::fmt::Debug for ChangeQueue {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChangeQueue")
            .field("store", &self.store)
            .field("name", &self.name)
            .finish_non_exhaustive()
    }
}

impl RetainedBackend for ChangeQueue {
    fn put_retained(&self, topic: &str, qos: u8, payload: &Bytes) {
        self.push(Change::Put {
            topic: topic.to_owned(),
            qos,
            payload: payload.clone(),
        });
    }

    fn delete_retained(&self, topic: &str) {
        self.push(Change::Delete {
            topic: topic.to_owned(),
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_refusals() {
        let p = Bytes::from_static(b"\x00\xffbin");
        let v = encode("a/b", 1, &p);
        assert_eq!(decode(v.clone()), Ok(("a/b".to_owned(), 1, p)));
        for n in 0..=HEADER + 3 {
            assert!(decode(v.slice(..n)).is_err(), "{n} bytes");
        }
        assert!(decode(Bytes::from_static(b"\x02\x00\x00\x01a1")).is_err());
        assert!(decode(Bytes::from_static(b"\x01\x03\x00\x01a1")).is_err());
        assert!(decode(Bytes::from_static(b"\x01\x00\x00\x01+1")).is_err());
        assert!(decode(Bytes::from_static(b"\x01\x00\x00\x01\xff1")).is_err());
        assert!(decode(Bytes::from_static(b"\x01\x00\x00\x09a1")).is_err());
    }
}

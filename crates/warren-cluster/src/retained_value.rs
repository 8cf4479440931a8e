//! The value of a retained MQTT message in a cluster's shared store (the NATS KV bucket of
//! [`crate::nats::NatsRetained`], the Redis hash of [`crate::redis::RedisRetained`]), and the
//! change a gate queues for its writer.
//!
//! The value is the same binary body a gate forwards to the others
//! (`warren_proto::mqtt_forward`, fuzzed), with the retain flag set, so a payload is any bytes
//! and one checked decoder reads both. The topic is in the value (not only in the key) so a
//! key's escaping never has to be undone.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use bytes::Bytes;
use tokio::sync::mpsc;
use warren::retained::RetainedBackend;
use warren_proto::mqtt_forward::Forwarded;

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

/// The stored value of a retained message.
pub(crate) fn encode(topic: &str, qos: u8, payload: &Bytes) -> Bytes {
    Forwarded {
        topic: Bytes::copy_from_slice(topic.as_bytes()),
        qos,
        retain: true,
        payload: payload.clone(),
    }
    .encode()
}

/// A stored value back to `(topic, QoS, payload)`; every field checked (another node, or
/// anyone with access to the store, wrote it).
pub(crate) fn decode(value: Bytes) -> Result<(String, u8, Bytes), String> {
    let f = Forwarded::decode(value).map_err(|e| e.to_string())?;
    if !f.retain {
        return Err("a value without the retain flag".into());
    }
    if f.payload.is_empty() {
        return Err("an empty payload".into());
    }
    // the decoder checked that the topic is UTF-8
    let topic = String::from_utf8(f.topic.to_vec()).map_err(|_| "a topic that is not UTF-8")?;
    Ok((topic, f.qos, f.payload))
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
        for n in 0..=warren_proto::mqtt_forward::HEADER + 3 {
            assert!(decode(v.slice(..n)).is_err(), "{n} bytes");
        }
        // version, retain flag, QoS, topic, topic length, empty payload
        for bad in [
            &b"\x02\x01\x00\x00\x01a1"[..],
            b"\x01\x00\x00\x00\x01a1",
            b"\x01\x01\x03\x00\x01a1",
            b"\x01\x01\x00\x00\x01+1",
            b"\x01\x01\x00\x00\x01\xff1",
            b"\x01\x01\x00\x00\x09a1",
            b"\x01\x01\x00\x00\x01a",
        ] {
            assert!(decode(Bytes::copy_from_slice(bad)).is_err(), "{bad:?}");
        }
    }
}

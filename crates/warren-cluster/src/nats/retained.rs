//! [`NatsRetained`]: the cluster's shared copy of the retained MQTT messages in a NATS JetStream
//! key-value bucket (docs/protocols/mqtt.md, "Across gates").
//!
//! One key per topic (the topic escaped into the key alphabet), its value the topic, the QoS and
//! the payload in binary. A gate reads the bucket once at start; each change a client makes on
//! a gate is queued by that gate (never blocking the publish) and put by one writer task, in
//! the order the gate applied them. The bucket is on disk (file storage) and keeps one value per
//! key, so it survives a restart of the server; a delete leaves the key's delete marker.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_nats::jetstream::{self, kv};
use bytes::Bytes;
use futures_util::StreamExt;
use tokio::sync::mpsc;
use warren::retained::SharedRetained;

use super::connect_client;
use crate::retained_value::{self, Change, ChangeQueue};

/// Longest wait for one store operation.
const OP_TIMEOUT: Duration = Duration::from_secs(2);
/// Longest wait for the whole read at start.
const LOAD_TIMEOUT: Duration = Duration::from_secs(30);
/// Longest key: a NATS subject travels in a control line (4 KiB by default) with the bucket's
/// prefix. A topic whose key would be longer is kept and forwarded, not shared.
const MAX_KEY: usize = 3_072;

/// The key of `topic`: letters, digits, `-`, `_` and `/` as they are, every other byte as `=XX`
/// (hex), so every topic maps to a distinct valid key. `None` when longer than [`MAX_KEY`].
fn topic_key(topic: &str) -> Option<String> {
    use std::fmt::Write as _;
    let mut k = String::with_capacity(topic.len());
    for b in topic.bytes() {
        if b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'/' {
            k.push(char::from(b));
        } else {
            let _ = write!(k, "={b:02X}");
        }
        if k.len() > MAX_KEY {
            return None;
        }
    }
    if k.is_empty() { None } else { Some(k) }
}

/// `prefix` + `_retained` as a valid bucket name (letters, digits, `-`, `_`).
fn bucket_name(prefix: &str) -> String {
    super::kv::bucket_name(&format!("{prefix}_retained"))
}

/// The stream behind the bucket: a KV bucket on disk, with no age limit.
fn bucket_stream(bucket: &str) -> jetstream::stream::Config {
    super::kv::kv_stream(
        bucket,
        "warren retained MQTT messages",
        jetstream::stream::StorageType::File,
    )
}

/// The shared retained messages in a NATS KV bucket: [`NatsRetained::connect`] reads them and
/// starts the writer task; the gate's [`warren::retained::RetainedBackend`] queues each change for it.
#[derive(Debug)]
pub struct NatsRetained;

impl NatsRetained {
    /// Connect to `url`, open (or create) the bucket `<prefix>_retained`, read what it holds (at
    /// most `max` messages; more are left out, logged) and start the writer.
    pub async fn connect(url: &str, prefix: &str, max: usize) -> Result<SharedRetained, String> {
        let (client, _) = connect_client(url, "retained")
            .await
            .map_err(|d| d.to_string())?;
        let mut js = jetstream::new(client);
        js.set_timeout(OP_TIMEOUT);
        let bucket = bucket_name(prefix);
        let store = match js.get_key_value(bucket.clone()).await {
            Ok(s) => s,
            Err(open) => {
                if let Err(create) = js.create_stream(bucket_stream(&bucket)).await {
                    return Err(format!(
                        "NATS KV bucket {bucket}: cannot open it ({open}) nor create it ({create})"
                    ));
                }
                js.get_key_value(bucket.clone())
                    .await
                    .map_err(|e| format!("NATS KV bucket {bucket}: {e}"))?
            }
        };
        let entries = tokio::time::timeout(LOAD_TIMEOUT, load(&store, &bucket, max))
            .await
            .map_err(|_| format!("NATS KV bucket {bucket}: not read within {LOAD_TIMEOUT:?}"))??;
        let (queue, rx) = ChangeQueue::new("nats", bucket.clone());
        tokio::spawn(write_loop(store, bucket, rx));
        Ok(SharedRetained {
            backend: Arc::new(queue),
            entries,
        })
    }
}

/// Every retained message the bucket holds: the latest value of each key, replayed by an
/// ordered consumer until it is caught up.
async fn load(
    store: &kv::Store,
    bucket: &str,
    max: usize,
) -> Result<Vec<(String, u8, Bytes)>, String> {
    let status = store
        .status()
        .await
        .map_err(|e| format!("NATS KV bucket {bucket}: {e}"))?;
    if status.info.state.messages == 0 {
        return Ok(Vec::new());
    }
    let mut watch = store
        .watch_with_history(">")
        .await
        .map_err(|e| format!("NATS KV bucket {bucket}: {e}"))?;
    let mut held: HashMap<String, (String, u8, Bytes)> = HashMap::new();
    let mut left_out = 0usize;
    while let Some(e) = watch.next().await {
        let e = e.map_err(|e| format!("NATS KV bucket {bucket}: {e}"))?;
        match e.operation {
            kv::Operation::Put => match retained_value::decode(e.value) {
                Ok(m) if held.len() < max || held.contains_key(&e.key) => {
                    held.insert(e.key, m);
                }
                Ok(_) => left_out += 1,
                Err(why) => {
                    metrics::counter!("warren_retained_shared_refused_total", "store" => "nats")
                        .increment(1);
                    tracing::warn!(bucket, key = %e.key, %why, "ignored a malformed retained message");
                }
            },
            kv::Operation::Delete | kv::Operation::Purge => {
                held.remove(&e.key);
            }
        }
        if e.delta == 0 {
            break;
        }
    }
    if left_out > 0 {
        tracing::warn!(
            bucket,
            left_out,
            max,
            "the shared store holds more retained messages than [limits] max_retained_messages"
        );
    }
    Ok(held.into_values().collect())
}

/// Put each queued change, in order, until the backend is dropped.
async fn write_loop(store: kv::Store, bucket: String, mut rx: mpsc::Receiver<Change>) {
    let mut last_warned: Option<Instant> = None;
    while let Some(change) = rx.recv().await {
        let Some(key) = topic_key(change.topic()) else {
            metrics::counter!("warren_retained_shared_dropped_total", "store" => "nats")
                .increment(1);
            tracing::warn!(%bucket, topic_bytes = change.topic().len(), "a retained message's topic is too long for a NATS key: kept on the gates, not in the store");
            continue;
        };
        let result = match &change {
            Change::Put {
                topic,
                qos,
                payload,
            } => tokio::time::timeout(
                OP_TIMEOUT,
                store.put(&key, retained_value::encode(topic, *qos, payload)),
            )
            .await
            .map(|r| r.map(|_| ()).map_err(|e| e.to_string())),
            Change::Delete { .. } => tokio::time::timeout(OP_TIMEOUT, store.delete(&key))
                .await
                .map(|r| r.map_err(|e| e.to_string())),
        };
        let failed = match result {
            Ok(Ok(())) => None,
            Ok(Err(e)) => Some(e),
            Err(_) => Some(format!("no answer within {OP_TIMEOUT:?}")),
        };
        if let Some(why) = failed {
            metrics::counter!("warren_retained_shared_errors_total", "store" => "nats")
                .increment(1);
            if last_warned.is_none_or(|t| t.elapsed() >= Duration::from_secs(1)) {
                last_warned = Some(Instant::now());
                tracing::warn!(%bucket, key, %why, "a retained change did not reach the shared store");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_distinct_and_valid() {
        assert_eq!(
            topic_key("sensors/1/temp").as_deref(),
            Some("sensors/1/temp")
        );
        assert_eq!(topic_key("a.b").as_deref(), Some("a=2Eb"));
        assert_eq!(topic_key("a=2Eb").as_deref(), Some("a=3D2Eb"));
        assert_eq!(topic_key("é").as_deref(), Some("=C3=A9"));
        assert_eq!(topic_key(""), None);
        assert_eq!(topic_key(&"x".repeat(MAX_KEY + 1)), None);
        assert!(topic_key(&"x".repeat(MAX_KEY)).is_some());
        let k = topic_key("$SYS/a b/+").unwrap_or_default();
        assert!(
            k.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"-_/=".contains(&b)),
            "{k}"
        );
        assert_eq!(bucket_name("warren.test"), "warren_test_retained");
    }
}

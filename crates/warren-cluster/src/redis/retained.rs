//! [`RedisRetained`]: the cluster's shared copy of the retained MQTT messages in one Redis hash,
//! `<prefix>:retained` (docs/protocols/mqtt.md, "Across gates").
//!
//! One field per topic (the topic's bytes), its value the topic, the QoS and the payload in
//! binary. A gate reads the hash once at start (`HSCAN`, a batch at a time); each change a client
//! makes on a gate is queued by that gate (never blocking the publish) and written by one writer
//! task (`HSET` / `HDEL`), in the order the gate applied them.

use std::sync::Arc;
use std::time::{Duration, Instant};

use redis::aio::ConnectionManager;
use tokio::sync::mpsc;
use warren::retained::SharedRetained;

use super::{COMMAND_TIMEOUT, bounded, client, manager};
use crate::retained_value::{self, Change, ChangeQueue};

/// Fields asked for per `HSCAN` at start.
const SCAN_BATCH: usize = 512;

/// One `HSCAN` answer: the next cursor, and (field, value) pairs.
type ScanPage = (u64, Vec<(Vec<u8>, Vec<u8>)>);

/// The shared retained messages in a Redis hash: [`RedisRetained::connect`] reads them and
/// starts the writer task; the gate's [`warren::retained::RetainedBackend`] queues each change for it.
#[derive(Debug)]
pub struct RedisRetained;

impl RedisRetained {
    /// The hash holding the retained messages of the cluster whose bus prefix is `prefix`.
    pub fn key(prefix: &str) -> String {
        format!("{prefix}:retained")
    }

    /// Connect to `url`, read what the hash holds (at most `max` messages; more are left out,
    /// logged) and start the writer.
    pub async fn connect(url: &str, prefix: &str, max: usize) -> Result<SharedRetained, String> {
        let client = client(url, None).map_err(|d| d.to_string())?;
        let mut conn = manager(&client).await.map_err(|d| d.to_string())?;
        let key = RedisRetained::key(prefix);
        let entries = load(&mut conn, &key, max).await?;
        let (queue, rx) = ChangeQueue::new("redis", key.clone());
        tokio::spawn(write_loop(conn, key, rx));
        Ok(SharedRetained {
            backend: Arc::new(queue),
            entries,
        })
    }
}

/// Every retained message of the hash, a batch at a time.
async fn load(
    conn: &mut ConnectionManager,
    key: &str,
    max: usize,
) -> Result<Vec<(String, u8, bytes::Bytes)>, String> {
    let mut out = Vec::new();
    let mut cursor: u64 = 0;
    let mut left_out = 0usize;
    loop {
        let mut cmd = redis::cmd("HSCAN");
        cmd.arg(key).arg(cursor).arg("COUNT").arg(SCAN_BATCH);
        let (next, fields): ScanPage = bounded(COMMAND_TIMEOUT, cmd.query_async(conn))
            .await
            .map_err(|d| format!("redis hash {key}: {d}"))?;
        for (_, value) in fields {
            match retained_value::decode(bytes::Bytes::from(value)) {
                Ok(m) if out.len() < max => out.push(m),
                Ok(_) => left_out += 1,
                Err(why) => {
                    metrics::counter!("warren_retained_shared_refused_total", "store" => "redis")
                        .increment(1);
                    tracing::warn!(key, %why, "ignored a malformed retained message");
                }
            }
        }
        if next == 0 {
            break;
        }
        cursor = next;
    }
    if left_out > 0 {
        tracing::warn!(
            key,
            left_out,
            max,
            "the shared store holds more retained messages than [limits] max_retained_messages"
        );
    }
    Ok(out)
}

/// Write each queued change, in order, until the backend is dropped.
async fn write_loop(mut conn: ConnectionManager, key: String, mut rx: mpsc::Receiver<Change>) {
    let mut last_warned: Option<Instant> = None;
    while let Some(change) = rx.recv().await {
        let cmd = match &change {
            Change::Put {
                topic,
                qos,
                payload,
            } => {
                let mut c = redis::cmd("HSET");
                c.arg(&key)
                    .arg(topic.as_bytes())
                    .arg(&retained_value::encode(topic, *qos, payload)[..]);
                c
            }
            Change::Delete { topic } => {
                let mut c = redis::cmd("HDEL");
                c.arg(&key).arg(topic.as_bytes());
                c
            }
        };
        let done: Result<(), _> = bounded(COMMAND_TIMEOUT, cmd.exec_async(&mut conn)).await;
        if let Err(why) = done {
            metrics::counter!("warren_retained_shared_errors_total", "store" => "redis")
                .increment(1);
            if last_warned.is_none_or(|t| t.elapsed() >= Duration::from_secs(1)) {
                last_warned = Some(Instant::now());
                tracing::warn!(%key, %why, "a retained change did not reach the shared store");
            }
        }
    }
}

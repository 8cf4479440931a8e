//! [`KvRegistry`]: the registry in a NATS JetStream key-value bucket.
//!
//! One key per node (its id, escaped into the key alphabet) holding the [`NodeRecord`] as JSON
//! with a `refreshed_ms` stamp, rewritten by a keepalive every third of the TTL. nats-server 2.9
//! has no per-key TTL, so the bucket's `max_age` is the TTL (the server drops records nobody
//! refreshes) and readers also treat a record whose stamp is older than the TTL as dead, which
//! the server does not announce.
//!
//! The stamps are the writers' wall clocks, read against the reader's: hosts' clocks must agree
//! to well within the TTL (NTP does).
//!
//! Readers follow the bucket with one ordered consumer that first replays the latest value of
//! every key, then each change (news within milliseconds), and check the stamps every 500 ms.
//! While the server is unreachable the last known list stands still; when it is back the
//! consumer is started again, every keepalive puts its record again (recreating the bucket if the
//! server lost it) and, for one TTL, nothing expires, so the list never flaps to empty.

use parking_lot::{Mutex, MutexGuard};
use std::collections::HashMap;
use std::fmt::Write as _;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use async_nats::jetstream::{self, kv};
use bytes::Bytes;
use futures_util::future::BoxFuture;
use futures_util::{StreamExt, TryStreamExt};
use serde::{Deserialize, Serialize};
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use warren::registry::{NodeRecord, Registry, RegistryError};

use super::{connect_client, is_connected};

/// Longest wait for one store operation; the client would otherwise wait for a reconnect.
const OP_TIMEOUT: Duration = Duration::from_secs(2);
/// How often readers check the record stamps and the connection.
const CHECK_EVERY: Duration = Duration::from_millis(500);
/// How often a keepalive looks at the connection between two refreshes, so it puts its record
/// again soon after a reconnect rather than at the next refresh.
const KEEPALIVE_SLICE: Duration = Duration::from_millis(250);
/// First and longest pause between retries while the store fails.
const RETRY_MIN: Duration = Duration::from_millis(100);
const RETRY_MAX: Duration = Duration::from_secs(1);
/// Records silent this many TTLs are forgotten (the server dropped them long ago).
const FORGET_AFTER_TTLS: u32 = 4;

/// A node record as stored: the record's own fields plus the time of the refresh.
#[derive(Serialize)]
struct StoredRef<'a> {
    #[serde(flatten)]
    node: &'a NodeRecord,
    refreshed_ms: u64,
}

#[derive(Deserialize)]
struct Stored {
    #[serde(flatten)]
    node: NodeRecord,
    refreshed_ms: u64,
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// The bucket key of node `id`: letters, digits, `-` and `_` as they are, every other byte as
/// `=XX` (hex), so any id maps to a distinct valid key.
fn node_key(id: &str) -> String {
    if id.is_empty() {
        return "=".to_owned();
    }
    let mut k = String::with_capacity(id.len());
    for b in id.bytes() {
        if b.is_ascii_alphanumeric() || b == b'-' || b == b'_' {
            k.push(char::from(b));
        } else {
            let _ = write!(k, "={b:02X}");
        }
    }
    k
}

/// `name` as a valid bucket name (letters, digits, `-`, `_`); also for the retained bucket
/// (`nats/retained.rs`).
pub(super) fn bucket_name(name: &str) -> String {
    let b: String = name
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '_' {
                c
            } else {
                '_'
            }
        })
        .collect();
    if b.is_empty() { "warren".to_owned() } else { b }
}

/// The stream behind bucket `bucket`, as a KV bucket with one value per key, `max_age = ttl` and
/// memory storage (records are rewritten every few seconds: no disk for them).
fn bucket_stream(bucket: &str, ttl: Duration) -> jetstream::stream::Config {
    jetstream::stream::Config {
        max_age: ttl,
        ..kv_stream(
            bucket,
            "warren nodes",
            jetstream::stream::StorageType::Memory,
        )
    }
}

/// The stream behind a KV bucket, as the KV layout wants it: one value per key, rolled up,
/// never deleted, read directly. The client's `create_key_value` cannot be used with
/// nats-server 2.9: it first reads the account info, whose 2.9 form it no longer parses; so the
/// registry and the retained bucket (`nats/retained.rs`) create the stream themselves.
pub(super) fn kv_stream(
    bucket: &str,
    description: &str,
    storage: jetstream::stream::StorageType,
) -> jetstream::stream::Config {
    jetstream::stream::Config {
        name: format!("KV_{bucket}"),
        description: Some(description.into()),
        subjects: vec![format!("$KV.{bucket}.>")],
        max_messages_per_subject: 1,
        storage,
        num_replicas: 1,
        discard: jetstream::stream::DiscardPolicy::New,
        allow_rollup: true,
        deny_delete: true,
        allow_direct: true,
        ..Default::default()
    }
}

fn decode(key: &str, value: &[u8]) -> Result<Stored, String> {
    let s: Stored = serde_json::from_slice(value).map_err(|e| format!("not a node record: {e}"))?;
    if node_key(&s.node.id) != key {
        return Err(format!(
            "record of node {:?} stored under another node's key",
            s.node.id
        ));
    }
    Ok(s)
}

struct Cached {
    node: NodeRecord,
    refreshed_ms: u64,
    revision: u64,
}

/// What a reader knows of the bucket.
#[derive(Default)]
struct Cache {
    entries: HashMap<String, Cached>,
    /// Revision of the delete of each deleted key, so an older put seen late does not revive it.
    tombstones: HashMap<String, u64>,
    /// Revision of the malformed value last reported per key (each is logged once).
    refused: HashMap<String, u64>,
    /// The store is unreachable: keep every record as it is.
    outage: bool,
    /// After an outage, records do not expire before this (their owners need a moment to put
    /// them again).
    grace_until: Option<Instant>,
}

impl Cache {
    fn put(&mut self, bucket: &str, key: &str, value: &[u8], revision: u64) {
        if self.entries.get(key).is_some_and(|c| c.revision > revision)
            || self.tombstones.get(key).is_some_and(|&t| t >= revision)
        {
            return;
        }
        match decode(key, value) {
            Ok(s) => {
                self.tombstones.remove(key);
                self.refused.remove(key);
                self.entries.insert(
                    key.to_owned(),
                    Cached {
                        node: s.node,
                        refreshed_ms: s.refreshed_ms,
                        revision,
                    },
                );
            }
            Err(why) => {
                if self.refused.insert(key.to_owned(), revision) != Some(revision) {
                    metrics::counter!("warren_registry_records_refused_total", "registry" => "nats")
                        .increment(1);
                    tracing::warn!(bucket, key, revision, %why, "ignored a malformed node record");
                }
            }
        }
    }

    fn delete(&mut self, key: &str, revision: u64) {
        if self.entries.get(key).is_some_and(|c| c.revision > revision) {
            return;
        }
        self.entries.remove(key);
        self.tombstones.insert(key.to_owned(), revision);
    }

    /// Records keep their stamps across an outage, but the revisions restart if the server lost
    /// the bucket: forget them, the consumer started afterwards replays everything.
    fn forget_revisions(&mut self) {
        for c in self.entries.values_mut() {
            c.revision = 0;
        }
        self.tombstones.clear();
    }

    fn frozen(&self, now: Instant) -> bool {
        self.outage || self.grace_until.is_some_and(|g| now < g)
    }

    /// The live nodes, sorted by id; forgets records long dead.
    fn live(&mut self, ttl: Duration, now_ms: u64, now: Instant) -> Vec<NodeRecord> {
        let ttl_ms = u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX);
        let frozen = self.frozen(now);
        if !frozen {
            let forget_ms = ttl_ms.saturating_mul(u64::from(FORGET_AFTER_TTLS));
            self.entries
                .retain(|_, c| now_ms.saturating_sub(c.refreshed_ms) <= forget_ms);
        }
        let mut v: Vec<NodeRecord> = self
            .entries
            .values()
            .filter(|c| frozen || now_ms.saturating_sub(c.refreshed_ms) <= ttl_ms)
            .map(|c| c.node.clone())
            .collect();
        v.sort_by(|a, b| a.id.cmp(&b.id));
        v
    }
}

/// What the registry handle, its reader task and its keepalives share.
struct Shared {
    client: async_nats::Client,
    js: jetstream::Context,
    store: kv::Store,
    bucket: String,
    stream: jetstream::stream::Config,
    ttl: Duration,
    disconnects: Arc<AtomicU64>,
    cache: Mutex<Cache>,
    tx: watch::Sender<Arc<Vec<NodeRecord>>>,
}

impl Shared {
    fn cache(&self) -> MutexGuard<'_, Cache> {
        self.cache.lock()
    }

    fn bucket(&self) -> &str {
        &self.bucket
    }

    /// Send the live list to watchers if it changed.
    fn publish(&self) {
        let list = self.cache().live(self.ttl, now_ms(), Instant::now());
        self.tx.send_if_modified(|cur| {
            if **cur == list {
                false
            } else {
                *cur = Arc::new(list);
                true
            }
        });
    }

    fn apply(&self, e: &kv::Entry) {
        let mut c = self.cache();
        match e.operation {
            kv::Operation::Put => c.put(self.bucket(), &e.key, &e.value, e.revision),
            kv::Operation::Delete | kv::Operation::Purge => c.delete(&e.key, e.revision),
        }
    }

    fn enter_outage(&self, why: &str) {
        let mut c = self.cache();
        if !c.outage {
            c.outage = true;
            c.forget_revisions();
            tracing::warn!(bucket = self.bucket(), %why, "registry store unreachable; keeping the last known nodes");
        }
    }

    fn leave_outage(&self) {
        let mut c = self.cache();
        if c.outage {
            c.outage = false;
            c.grace_until = Some(Instant::now() + self.ttl);
            tracing::info!(bucket = self.bucket(), "registry store reachable again");
        }
    }

    /// Store `node` with a fresh stamp. A failed put may mean the server lost the bucket: create
    /// it again and retry once.
    async fn put_record(&self, key: &str, node: &NodeRecord) -> Result<(), String> {
        if !is_connected(&self.client) {
            return Err("not connected to NATS".into());
        }
        let value = serde_json::to_vec(&StoredRef {
            node,
            refreshed_ms: now_ms(),
        })
        .map(Bytes::from)
        .map_err(|e| format!("cannot encode the node record: {e}"))?;
        let first = match tokio::time::timeout(OP_TIMEOUT, self.store.put(key, value.clone())).await
        {
            Ok(Ok(rev)) => Ok(rev),
            Ok(Err(e)) => Err(e.to_string()),
            Err(_) => Err(format!("no answer within {OP_TIMEOUT:?}")),
        };
        let rev = match first {
            Ok(rev) => rev,
            Err(why) => {
                tracing::debug!(bucket = self.bucket(), %why, "put failed; making sure the bucket exists");
                self.ensure_bucket().await;
                match tokio::time::timeout(OP_TIMEOUT, self.store.put(key, value.clone())).await {
                    Ok(Ok(rev)) => rev,
                    Ok(Err(e)) => return Err(format!("put {key}: {e}")),
                    Err(_) => return Err(format!("put {key}: no answer within {OP_TIMEOUT:?}")),
                }
            }
        };
        self.cache().put(self.bucket(), key, &value, rev);
        self.publish();
        Ok(())
    }

    async fn ensure_bucket(&self) {
        match tokio::time::timeout(OP_TIMEOUT, self.js.create_stream(self.stream.clone())).await {
            Ok(Ok(_)) => {}
            Ok(Err(e)) => tracing::debug!(bucket = self.bucket(), error = %e, "create bucket"),
            Err(_) => tracing::debug!(bucket = self.bucket(), "create bucket timed out"),
        }
    }

    /// A consumer of the bucket: the latest value of every key, then every change.
    async fn start_watch(&self) -> Result<kv::Watch, String> {
        match tokio::time::timeout(OP_TIMEOUT, self.store.watch_with_history(">")).await {
            Ok(Ok(w)) => Ok(w),
            Ok(Err(e)) => Err(format!("watch bucket {}: {e}", self.bucket())),
            Err(_) => Err(format!(
                "watch bucket {}: no answer within {OP_TIMEOUT:?}",
                self.bucket()
            )),
        }
    }

    /// Read every record once (so a new registry knows the cluster before `connect` returns).
    async fn snapshot(&self) -> Result<(), String> {
        let keys = tokio::time::timeout(OP_TIMEOUT, async {
            let keys = self.store.keys().await.map_err(|e| e.to_string())?;
            keys.try_collect::<Vec<String>>()
                .await
                .map_err(|e| e.to_string())
        })
        .await
        .map_err(|_| format!("list keys: no answer within {OP_TIMEOUT:?}"))??;
        for key in keys {
            match tokio::time::timeout(OP_TIMEOUT, self.store.entry(key.clone())).await {
                Ok(Ok(Some(e))) => self.apply(&e),
                Ok(Ok(None)) => {}
                Ok(Err(e)) => return Err(format!("read {key}: {e}")),
                Err(_) => return Err(format!("read {key}: no answer within {OP_TIMEOUT:?}")),
            }
        }
        Ok(())
    }

    /// The reader: applies the consumer's news, restarts the consumer when it fails, notices
    /// outages and expired records.
    async fn run(self: Arc<Self>, mut watcher: Option<kv::Watch>, stop: CancellationToken) {
        let mut seen = self.disconnects.load(Ordering::Relaxed);
        let mut retry = RETRY_MIN;
        let mut next_try = Instant::now();
        let mut tick = tokio::time::interval(CHECK_EVERY);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                biased;
                _ = stop.cancelled() => break,
                item = next_entry(&mut watcher) => match item {
                    Some(Ok(e)) => {
                        self.apply(&e);
                        self.publish();
                    }
                    Some(Err(e)) => {
                        tracing::debug!(bucket = self.bucket(), error = %e, "bucket consumer failed; restarting it");
                        watcher = None;
                    }
                    None => watcher = None,
                },
                _ = tick.tick() => {
                    let connected = is_connected(&self.client);
                    let disconnects = self.disconnects.load(Ordering::Relaxed);
                    if !connected || disconnects != seen {
                        // the server may have restarted and lost the bucket: start over
                        seen = disconnects;
                        watcher = None;
                        self.enter_outage("connection to NATS lost");
                    }
                    if watcher.is_none() && connected && Instant::now() >= next_try {
                        match self.start_watch().await {
                            Ok(w) => {
                                watcher = Some(w);
                                retry = RETRY_MIN;
                                self.leave_outage();
                            }
                            Err(why) => {
                                self.enter_outage(&why);
                                next_try = Instant::now() + retry;
                                retry = (retry * 2).min(RETRY_MAX);
                            }
                        }
                    }
                    self.publish();
                }
            }
        }
    }
}

/// The next change from the consumer, or never without one (cancel-safe).
async fn next_entry(w: &mut Option<kv::Watch>) -> Option<Result<kv::Entry, kv::WatcherError>> {
    match w {
        Some(w) => w.next().await,
        None => std::future::pending().await,
    }
}

/// Refresh `node` every third of the TTL until aborted; after a failure retry with backoff, and
/// after a reconnect put at once (the server may have lost the record).
async fn keepalive(shared: Arc<Shared>, key: String, node: NodeRecord, stored: bool) {
    let period = (shared.ttl / 3).max(KEEPALIVE_SLICE);
    let mut failing = !stored;
    let mut retry = RETRY_MIN;
    let mut seen = shared.disconnects.load(Ordering::Relaxed);
    loop {
        let due = Instant::now() + if failing { retry } else { period };
        while Instant::now() < due {
            tokio::time::sleep_until(due.min(Instant::now() + KEEPALIVE_SLICE)).await;
            let d = shared.disconnects.load(Ordering::Relaxed);
            if d != seen && is_connected(&shared.client) {
                seen = d;
                break;
            }
        }
        match shared.put_record(&key, &node).await {
            Ok(()) => {
                if failing {
                    tracing::info!(bucket = shared.bucket(), node = %node.id, "node record stored again");
                }
                failing = false;
                retry = RETRY_MIN;
            }
            Err(why) => {
                if !failing {
                    tracing::warn!(bucket = shared.bucket(), node = %node.id, %why, "cannot refresh the node record; retrying");
                }
                failing = true;
                retry = (retry * 2).min(RETRY_MAX);
            }
        }
    }
}

/// The registry in a NATS JetStream key-value bucket (see the module docs): one record per node,
/// liveness by TTL, news within milliseconds, and the last known list kept through an outage.
///
/// Dropping the handle stops its keepalives without deleting their records (as a crash would):
/// call [`Registry::deregister`] for a graceful exit.
pub struct KvRegistry {
    shared: Arc<Shared>,
    keepalives: Mutex<HashMap<String, JoinHandle<()>>>,
    stop: CancellationToken,
}

impl std::fmt::Debug for KvRegistry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KvRegistry")
            .field("bucket", &self.shared.bucket)
            .field("ttl", &self.shared.ttl)
            .finish_non_exhaustive()
    }
}

impl KvRegistry {
    /// Connect to the NATS server at `url`, open (or create) the bucket `bucket` and read it.
    /// Records not refreshed for `ttl` (at least a second) are dead. Fails at once if the server
    /// cannot be reached or has no JetStream.
    pub async fn connect(
        url: &str,
        bucket: &str,
        ttl: Duration,
    ) -> Result<Arc<KvRegistry>, RegistryError> {
        let ttl = ttl.max(Duration::from_secs(1));
        let (client, disconnects) = connect_client(url, "registry")
            .await
            .map_err(|d| RegistryError::Unavailable(d.to_string()))?;
        let mut js = jetstream::new(client.clone());
        js.set_timeout(OP_TIMEOUT);
        let bucket = bucket_name(bucket);
        let stream = bucket_stream(&bucket, ttl);
        let store = match js.get_key_value(bucket.clone()).await {
            Ok(s) => s,
            Err(open) => {
                if let Err(create) = js.create_stream(stream.clone()).await {
                    return Err(RegistryError::Unavailable(format!(
                        "NATS KV bucket {bucket}: cannot open it ({open}) nor create it ({create})"
                    )));
                }
                js.get_key_value(bucket.clone()).await.map_err(|e| {
                    RegistryError::Unavailable(format!("NATS KV bucket {bucket}: {e}"))
                })?
            }
        };
        let shared = Arc::new(Shared {
            client,
            js,
            store,
            bucket,
            stream,
            ttl,
            disconnects,
            cache: Mutex::new(Cache::default()),
            tx: watch::Sender::new(Arc::new(Vec::new())),
        });
        let watcher = shared
            .start_watch()
            .await
            .map_err(RegistryError::Unavailable)?;
        if let Err(why) = shared.snapshot().await {
            tracing::debug!(bucket = shared.bucket(), %why, "first read incomplete; the consumer will fill in");
        }
        shared.publish();
        let stop = CancellationToken::new();
        tokio::spawn(shared.clone().run(Some(watcher), stop.clone()));
        Ok(Arc::new(KvRegistry {
            shared,
            keepalives: Mutex::new(HashMap::new()),
            stop,
        }))
    }

    fn keepalives(&self) -> MutexGuard<'_, HashMap<String, JoinHandle<()>>> {
        self.keepalives.lock()
    }

    async fn stop_keepalive(&self, id: &str) {
        let handle = self.keepalives().remove(id);
        if let Some(h) = handle {
            h.abort();
            let _ = h.await;
        }
    }
}

impl Drop for KvRegistry {
    fn drop(&mut self) {
        self.stop.cancel();
        for (_, h) in self.keepalives().drain() {
            h.abort();
        }
    }
}

impl Registry for KvRegistry {
    /// Store `node` and keep it fresh. An error means it is not stored yet; the keepalive keeps
    /// trying in the background either way.
    fn register(&self, node: NodeRecord) -> BoxFuture<'_, Result<(), RegistryError>> {
        Box::pin(async move {
            self.stop_keepalive(&node.id).await;
            let key = node_key(&node.id);
            let first = self.shared.put_record(&key, &node).await;
            let id = node.id.clone();
            let task = tokio::spawn(keepalive(self.shared.clone(), key, node, first.is_ok()));
            if let Some(prev) = self.keepalives().insert(id, task) {
                prev.abort();
            }
            first.map_err(RegistryError::Unavailable)
        })
    }

    fn deregister(&self, node_id: &str) -> BoxFuture<'_, Result<(), RegistryError>> {
        let node_id = node_id.to_owned();
        Box::pin(async move {
            self.stop_keepalive(&node_id).await;
            let key = node_key(&node_id);
            {
                let mut c = self.shared.cache();
                let rev = c
                    .entries
                    .get(&key)
                    .map_or(0, |e| e.revision.saturating_add(1));
                c.delete(&key, rev);
            }
            self.shared.publish();
            if !is_connected(&self.shared.client) {
                return Err(RegistryError::Unavailable("not connected to NATS".into()));
            }
            match tokio::time::timeout(OP_TIMEOUT, self.shared.store.delete(&key)).await {
                Ok(Ok(())) => Ok(()),
                Ok(Err(e)) => Err(RegistryError::Unavailable(format!("delete {key}: {e}"))),
                Err(_) => Err(RegistryError::Unavailable(format!(
                    "delete {key}: no answer within {OP_TIMEOUT:?}"
                ))),
            }
        })
    }

    fn watch(&self) -> watch::Receiver<Arc<Vec<NodeRecord>>> {
        self.shared.tx.subscribe()
    }

    fn kind(&self) -> &'static str {
        "nats"
    }

    fn is_connected(&self) -> bool {
        is_connected(&self.shared.client)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(id: &str) -> NodeRecord {
        NodeRecord {
            id: id.into(),
            version: "1".into(),
            ..Default::default()
        }
    }

    fn stored(n: &NodeRecord, at: u64) -> Vec<u8> {
        serde_json::to_vec(&StoredRef {
            node: n,
            refreshed_ms: at,
        })
        .expect("encode")
    }

    #[test]
    fn keys_are_valid_and_distinct() {
        assert_eq!(node_key("Chat-001_x"), "Chat-001_x");
        assert_eq!(node_key("a.b"), "a=2Eb");
        assert_eq!(node_key("a_2Eb"), "a_2Eb");
        assert_eq!(node_key("é"), "=C3=A9");
        assert_eq!(node_key(""), "=");
        assert_eq!(bucket_name("warren.prod"), "warren_prod");
    }

    #[test]
    fn records_expire_by_stamp_unless_frozen() {
        let ttl = Duration::from_secs(3);
        let now = Instant::now();
        let mut c = Cache::default();
        c.put("b", "a", &stored(&record("a"), 10_000), 1);
        c.put("b", "b", &stored(&record("b"), 12_000), 2);
        let ids = |v: Vec<NodeRecord>| v.into_iter().map(|n| n.id).collect::<Vec<_>>();
        assert_eq!(ids(c.live(ttl, 13_000, now)), ["a", "b"]);
        assert_eq!(ids(c.live(ttl, 14_500, now)), ["b"]);
        c.outage = true;
        assert_eq!(ids(c.live(ttl, 14_500, now)), ["a", "b"]);
        c.outage = false;
        c.grace_until = Some(now + Duration::from_secs(1));
        assert_eq!(ids(c.live(ttl, 14_500, now)), ["a", "b"]);
    }

    #[test]
    fn late_and_foreign_values_are_ignored() {
        let ttl = Duration::from_secs(3);
        let now = Instant::now();
        let mut c = Cache::default();
        c.put("b", "a", &stored(&record("a"), 1_000), 5);
        c.delete("a", 6);
        c.put("b", "a", &stored(&record("a"), 1_000), 5);
        assert!(c.live(ttl, 1_000, now).is_empty());
        c.put("b", "x", &stored(&record("y"), 1_000), 7);
        c.put("b", "z", b"garbage", 8);
        assert!(c.live(ttl, 1_000, now).is_empty());
        c.put("b", "a", &stored(&record("a"), 1_000), 9);
        assert_eq!(c.live(ttl, 1_000, now).len(), 1);
    }
}

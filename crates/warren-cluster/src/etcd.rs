//! [`EtcdRegistry`]: the registry in etcd (feature `etcd`).
//!
//! Each node is the key `<key>/nodes/<id>` holding its [`NodeRecord`] as JSON, attached to a lease
//! of the TTL that a keepalive renews every third of the TTL; when a node stops renewing, etcd
//! deletes its key and every watcher hears it. Readers take a snapshot of the prefix, watch it from
//! the snapshot's revision on (so nothing falls between the two), and take a fresh snapshot every
//! two seconds in case a watch silently stalled.
//!
//! While etcd is unreachable the last known list stands still, and the registry says it is not
//! connected (for `/readyz`) until a snapshot succeeds again. When it is back, keepalives renew
//! their lease (etcd keeps leases across a restart) or, if it is gone, grant a new one and put the
//! record again; for one TTL after the outage snapshots only add records, so the list never
//! flaps to empty while the nodes re-announce themselves.

use parking_lot::{Mutex, MutexGuard};
use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::time::Duration;

use etcd_client::{
    Client, ConnectOptions, EventType, GetOptions, LeaseKeepAliveStream, LeaseKeeper, PutOptions,
    WatchOptions, WatchRequestSender, WatchResponseStream,
};
use futures_util::StreamExt;
use futures_util::future::BoxFuture;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use warren::registry::{NodeRecord, Registry, RegistryError};

/// Longest wait for one etcd operation.
pub(crate) const OP_TIMEOUT: Duration = Duration::from_secs(2);
/// How often readers take a full snapshot besides watching.
const SYNC_EVERY: Duration = Duration::from_secs(2);
/// First and longest pause between retries while etcd fails.
const RETRY_MIN: Duration = Duration::from_millis(100);
const RETRY_MAX: Duration = Duration::from_secs(1);

/// The gRPC endpoints of an `etcd://host:port[,host:port…]` URL.
pub(crate) fn endpoints(url: &str) -> Result<Vec<String>, String> {
    let rest = url
        .strip_prefix("etcd://")
        .ok_or_else(|| format!("{url:?} is not an etcd:// URL"))?;
    let rest = rest.trim_end_matches('/');
    let eps: Vec<String> = rest
        .split(',')
        .map(str::trim)
        .filter(|h| !h.is_empty())
        .map(|h| format!("http://{h}"))
        .collect();
    if eps.is_empty() {
        return Err(format!("{url:?} names no etcd host"));
    }
    Ok(eps)
}

/// etcd leases count whole seconds.
fn ttl_secs(ttl: Duration) -> i64 {
    i64::try_from(ttl.as_millis().div_ceil(1000))
        .unwrap_or(i64::MAX)
        .max(1)
}

pub(crate) async fn timed<T, E: std::fmt::Display>(
    what: &str,
    f: impl Future<Output = Result<T, E>>,
) -> Result<T, String> {
    match tokio::time::timeout(OP_TIMEOUT, f).await {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(e)) => Err(format!("{what}: {e}")),
        Err(_) => Err(format!("{what}: no answer within {OP_TIMEOUT:?}")),
    }
}

/// What a reader knows of the prefix.
#[derive(Default)]
struct Cache {
    /// Key → record and the revision that wrote it.
    nodes: HashMap<Vec<u8>, (NodeRecord, i64)>,
    /// Highest store revision applied (snapshots older than it are stale).
    applied_rev: i64,
    /// Revision of the malformed value last reported per key (each is logged once).
    refused: HashMap<Vec<u8>, i64>,
    /// etcd is unreachable: keep every record as it is.
    outage: bool,
    /// After an outage, snapshots only add records until this instant.
    grace_until: Option<Instant>,
}

impl Cache {
    /// The record in `value`, or `None` (logged once per key and revision) if it is not one.
    fn decode(&mut self, key: &[u8], value: &[u8], rev: i64) -> Option<NodeRecord> {
        let decoded = serde_json::from_slice::<NodeRecord>(value)
            .map_err(|e| format!("not a node record: {e}"))
            .and_then(|n| {
                // the key ends with `/<id>`: a record under another node's key is refused
                let own = key
                    .strip_suffix(n.id.as_bytes())
                    .is_some_and(|k| k.ends_with(b"/"));
                if own {
                    Ok(n)
                } else {
                    Err(format!(
                        "record of node {:?} stored under another key",
                        n.id
                    ))
                }
            });
        match decoded {
            Ok(n) => {
                self.refused.remove(key);
                Some(n)
            }
            Err(e) => {
                if self.refused.insert(key.to_vec(), rev) != Some(rev) {
                    metrics::counter!("warren_registry_records_refused_total", "registry" => "etcd")
                        .increment(1);
                    tracing::warn!(key = %String::from_utf8_lossy(key), revision = rev, error = %e, "ignored a malformed node record");
                }
                None
            }
        }
    }

    fn put(&mut self, key: &[u8], value: &[u8], rev: i64) {
        if self.nodes.get(key).is_some_and(|(_, r)| *r > rev) {
            return;
        }
        match self.decode(key, value, rev) {
            Some(n) => {
                self.nodes.insert(key.to_vec(), (n, rev));
            }
            None => {
                self.nodes.remove(key);
            }
        }
    }

    fn live(&self) -> Vec<NodeRecord> {
        let mut v: Vec<NodeRecord> = self.nodes.values().map(|(n, _)| n.clone()).collect();
        v.sort_by(|a, b| a.id.cmp(&b.id));
        v
    }
}

/// What the registry handle, its reader task and its keepalives share.
struct Shared {
    client: Client,
    url: String,
    /// `<key>/nodes/`.
    prefix: String,
    ttl: Duration,
    cache: Mutex<Cache>,
    tx: watch::Sender<Arc<Vec<NodeRecord>>>,
    /// The reader's last snapshot succeeded (what [`Registry::is_connected`] says): cleared when
    /// a read fails, set when one succeeds.
    reachable: AtomicBool,
}

/// A watch on the prefix: the request half must live as long as the responses are read.
struct Watching {
    _requests: WatchRequestSender,
    responses: WatchResponseStream,
}

impl Shared {
    fn cache(&self) -> MutexGuard<'_, Cache> {
        self.cache.lock()
    }

    fn key(&self, id: &str) -> String {
        format!("{}{id}", self.prefix)
    }

    /// Send the live list to watchers if it changed.
    fn publish(&self) {
        let list = self.cache().live();
        self.tx.send_if_modified(|cur| {
            if **cur == list {
                false
            } else {
                *cur = Arc::new(list);
                true
            }
        });
    }

    fn enter_outage(&self, why: &str) {
        self.reachable.store(false, Ordering::Relaxed);
        let mut c = self.cache();
        if !c.outage {
            c.outage = true;
            // revisions start over if etcd lost its data
            c.applied_rev = 0;
            tracing::warn!(url = %self.url, %why, "etcd unreachable; keeping the last known nodes");
        }
    }

    /// Read the prefix and apply it; returns the store revision it was read at.
    async fn sync(&self) -> Result<i64, String> {
        let mut client = self.client.clone();
        let resp = timed(
            "etcd get",
            client.get(self.prefix.as_str(), Some(GetOptions::new().with_prefix())),
        )
        .await?;
        self.reachable.store(true, Ordering::Relaxed);
        let rev = resp.header().map_or(0, |h| h.revision());
        let now = Instant::now();
        {
            let mut c = self.cache();
            if c.outage {
                c.outage = false;
                c.grace_until = Some(now + self.ttl);
                tracing::info!(url = %self.url, "etcd reachable again");
            }
            let merge_only = c.grace_until.is_some_and(|g| now < g);
            if merge_only {
                for kv in resp.kvs() {
                    c.put(kv.key(), kv.value(), kv.mod_revision());
                }
            } else if rev >= c.applied_rev {
                let mut fresh = HashMap::with_capacity(resp.kvs().len());
                for kv in resp.kvs() {
                    if let Some(n) = c.decode(kv.key(), kv.value(), kv.mod_revision()) {
                        fresh.insert(kv.key().to_vec(), (n, kv.mod_revision()));
                    }
                }
                c.nodes = fresh;
            }
            c.applied_rev = c.applied_rev.max(rev);
        }
        self.publish();
        Ok(rev)
    }

    async fn start_watch(&self, from: i64) -> Result<Watching, String> {
        let mut client = self.client.clone();
        let stream = timed(
            "etcd watch",
            client.watch(
                self.prefix.as_str(),
                Some(WatchOptions::new().with_prefix().with_start_revision(from)),
            ),
        )
        .await?;
        let (requests, responses) = stream.split();
        Ok(Watching {
            _requests: requests,
            responses,
        })
    }

    /// Apply one watch response; `false` if the watch ended (cancelled by etcd).
    fn apply(&self, resp: &etcd_client::WatchResponse) -> bool {
        if resp.canceled() {
            tracing::debug!(url = %self.url, reason = resp.cancel_reason(), "etcd cancelled the watch; restarting it");
            return false;
        }
        {
            let mut c = self.cache();
            for ev in resp.events() {
                let Some(kv) = ev.kv() else { continue };
                match ev.event_type() {
                    EventType::Put => c.put(kv.key(), kv.value(), kv.mod_revision()),
                    EventType::Delete => {
                        c.nodes.remove(kv.key());
                    }
                }
            }
            if let Some(h) = resp.header() {
                c.applied_rev = c.applied_rev.max(h.revision());
            }
        }
        self.publish();
        true
    }

    /// The reader: snapshot, then watch from the snapshot's revision; a fresh snapshot every
    /// [`SYNC_EVERY`]; start over after any failure.
    async fn run(self: Arc<Self>, stop: CancellationToken) {
        let mut watching: Option<Watching> = None;
        let mut retry = RETRY_MIN;
        let mut tick = tokio::time::interval(SYNC_EVERY);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            if watching.is_none() {
                let started = match self.sync().await {
                    Ok(rev) => self.start_watch(rev + 1).await,
                    Err(why) => Err(why),
                };
                match started {
                    Ok(w) => {
                        watching = Some(w);
                        retry = RETRY_MIN;
                    }
                    Err(why) => {
                        self.enter_outage(&why);
                        tokio::select! {
                            _ = stop.cancelled() => break,
                            _ = tokio::time::sleep(retry) => {}
                        }
                        retry = (retry * 2).min(RETRY_MAX);
                        continue;
                    }
                }
            }
            let Some(w) = watching.as_mut() else { continue };
            tokio::select! {
                biased;
                _ = stop.cancelled() => break,
                msg = w.responses.next() => match msg {
                    Some(Ok(resp)) => {
                        if !self.apply(&resp) {
                            watching = None;
                        }
                    }
                    Some(Err(e)) => {
                        tracing::debug!(url = %self.url, error = %e, "etcd watch failed; restarting it");
                        watching = None;
                    }
                    None => watching = None,
                },
                _ = tick.tick() => {
                    if let Err(why) = self.sync().await {
                        self.enter_outage(&why);
                        watching = None;
                    }
                }
            }
        }
    }
}

/// One node's lease and record: grants the lease and puts the record, renews the lease, and
/// starts over when etcd forgot the lease.
struct Keeper {
    shared: Arc<Shared>,
    key: String,
    value: Vec<u8>,
    /// The current lease (0: none), shared with `deregister` so it can revoke it.
    lease: Arc<AtomicI64>,
    stream: Option<(LeaseKeeper, LeaseKeepAliveStream)>,
    /// Put the record again at the next renewal (after a failure etcd may have lost it).
    reput: bool,
}

impl Keeper {
    async fn put(&self, lease: i64) -> Result<(), String> {
        let mut client = self.shared.client.clone();
        timed(
            "etcd put",
            client.put(
                self.key.as_str(),
                self.value.clone(),
                Some(PutOptions::new().with_lease(lease)),
            ),
        )
        .await
        .map(|_| ())
    }

    async fn grant(&mut self) -> Result<(), String> {
        let mut client = self.shared.client.clone();
        let granted = timed(
            "etcd lease grant",
            client.lease_grant(ttl_secs(self.shared.ttl), None),
        )
        .await?;
        self.lease.store(granted.id(), Ordering::Relaxed);
        self.stream = None;
        self.put(granted.id()).await?;
        self.reput = false;
        Ok(())
    }

    /// Make sure the record is stored under a live lease.
    async fn refresh(&mut self) -> Result<(), String> {
        let lease = self.lease.load(Ordering::Relaxed);
        if lease == 0 {
            return self.grant().await;
        }
        let renewed = self.renew(lease).await;
        match renewed {
            Ok(true) => {
                if self.reput {
                    self.put(lease).await?;
                    self.reput = false;
                }
                Ok(())
            }
            Ok(false) => {
                tracing::info!(url = %self.shared.url, key = %self.key, "lease expired; granting a new one");
                self.lease.store(0, Ordering::Relaxed);
                self.grant().await
            }
            Err(why) => {
                self.stream = None;
                self.reput = true;
                Err(why)
            }
        }
    }

    /// Renew `lease`: `Ok(false)` if etcd no longer knows it.
    async fn renew(&mut self, lease: i64) -> Result<bool, String> {
        if self.stream.is_none() {
            let mut client = self.shared.client.clone();
            self.stream =
                Some(timed("etcd lease keepalive", client.lease_keep_alive(lease)).await?);
        }
        let Some((keeper, responses)) = self.stream.as_mut() else {
            return Err("no keepalive stream".into());
        };
        timed("etcd lease keepalive", keeper.keep_alive()).await?;
        match timed("etcd lease keepalive", responses.message()).await? {
            Some(resp) => Ok(resp.ttl() > 0),
            None => Err("etcd closed the keepalive stream".into()),
        }
    }

    /// Renew every third of the TTL until aborted; retry with backoff after a failure.
    async fn run(mut self, mut failing: bool) {
        let period = (self.shared.ttl / 3).max(Duration::from_millis(300));
        let mut retry = RETRY_MIN;
        loop {
            tokio::time::sleep(if failing { retry } else { period }).await;
            match self.refresh().await {
                Ok(()) => {
                    if failing {
                        tracing::info!(url = %self.shared.url, key = %self.key, "node record stored again");
                    }
                    failing = false;
                    retry = RETRY_MIN;
                }
                Err(why) => {
                    if !failing {
                        tracing::warn!(url = %self.shared.url, key = %self.key, %why, "cannot renew the node record; retrying");
                    }
                    failing = true;
                    retry = (retry * 2).min(RETRY_MAX);
                }
            }
        }
    }
}

struct Keepalive {
    task: JoinHandle<()>,
    lease: Arc<AtomicI64>,
}

/// The registry in etcd (see the module docs): one key per node under a lease of the TTL,
/// watched by every node.
///
/// Dropping the handle stops its keepalives without deleting their keys (as a crash would: etcd
/// drops them when their lease runs out); call [`Registry::deregister`] for a graceful exit.
pub struct EtcdRegistry {
    shared: Arc<Shared>,
    keepalives: Mutex<HashMap<String, Keepalive>>,
    stop: CancellationToken,
}

impl std::fmt::Debug for EtcdRegistry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EtcdRegistry")
            .field("url", &self.shared.url)
            .field("prefix", &self.shared.prefix)
            .field("ttl", &self.shared.ttl)
            .finish_non_exhaustive()
    }
}

impl EtcdRegistry {
    /// Connect to etcd at `url` (`etcd://host:port`, several hosts separated by commas) and read
    /// the nodes under `<key>/nodes/`. Leases last `ttl` rounded up to whole seconds (etcd may
    /// raise very short ones to its minimum). Fails at once if etcd cannot be reached.
    pub async fn connect(
        url: &str,
        key: &str,
        ttl: Duration,
    ) -> Result<Arc<EtcdRegistry>, RegistryError> {
        let eps = endpoints(url).map_err(RegistryError::Unavailable)?;
        let options = ConnectOptions::new()
            .with_connect_timeout(OP_TIMEOUT)
            .with_timeout(OP_TIMEOUT)
            .with_keep_alive(Duration::from_secs(2), OP_TIMEOUT);
        let client = timed("connect", Client::connect(&eps, Some(options)))
            .await
            .map_err(|e| RegistryError::Unavailable(format!("cannot reach etcd at {url}: {e}")))?;
        let ttl = Duration::from_secs(ttl_secs(ttl).unsigned_abs());
        let shared = Arc::new(Shared {
            client,
            url: url.to_owned(),
            prefix: format!("{}/nodes/", key.trim_end_matches('/')),
            ttl,
            cache: Mutex::new(Cache::default()),
            tx: watch::Sender::new(Arc::new(Vec::new())),
            reachable: AtomicBool::new(false),
        });
        // the first read proves etcd answers, and gives watchers the cluster at once
        shared
            .sync()
            .await
            .map_err(|e| RegistryError::Unavailable(format!("cannot reach etcd at {url}: {e}")))?;
        let stop = CancellationToken::new();
        tokio::spawn(shared.clone().run(stop.clone()));
        Ok(Arc::new(EtcdRegistry {
            shared,
            keepalives: Mutex::new(HashMap::new()),
            stop,
        }))
    }

    fn keepalives(&self) -> MutexGuard<'_, HashMap<String, Keepalive>> {
        self.keepalives.lock()
    }

    /// Stop the keepalive of `id`; returns its lease (0 if none).
    async fn stop_keepalive(&self, id: &str) -> i64 {
        let k = self.keepalives().remove(id);
        match k {
            Some(k) => {
                k.task.abort();
                let _ = k.task.await;
                k.lease.load(Ordering::Relaxed)
            }
            None => 0,
        }
    }
}

impl Drop for EtcdRegistry {
    fn drop(&mut self) {
        self.stop.cancel();
        for (_, k) in self.keepalives().drain() {
            k.task.abort();
        }
    }
}

impl Registry for EtcdRegistry {
    /// Store `node` under a fresh lease and keep it alive. An error means it is not stored yet;
    /// the keepalive keeps trying in the background either way.
    fn register(&self, node: NodeRecord) -> BoxFuture<'_, Result<(), RegistryError>> {
        Box::pin(async move {
            let old_lease = self.stop_keepalive(&node.id).await;
            let value = serde_json::to_vec(&node).map_err(|e| {
                RegistryError::Unavailable(format!("cannot encode the node record: {e}"))
            })?;
            let lease = Arc::new(AtomicI64::new(old_lease));
            let mut keeper = Keeper {
                shared: self.shared.clone(),
                key: self.shared.key(&node.id),
                value,
                lease: lease.clone(),
                stream: None,
                reput: true,
            };
            let first = keeper.refresh().await;
            let task = tokio::spawn(keeper.run(first.is_err()));
            if let Some(prev) = self
                .keepalives()
                .insert(node.id.clone(), Keepalive { task, lease })
            {
                prev.task.abort();
            }
            first.map_err(RegistryError::Unavailable)
        })
    }

    fn deregister(&self, node_id: &str) -> BoxFuture<'_, Result<(), RegistryError>> {
        let node_id = node_id.to_owned();
        Box::pin(async move {
            let lease = self.stop_keepalive(&node_id).await;
            let key = self.shared.key(&node_id);
            self.shared.cache().nodes.remove(key.as_bytes());
            self.shared.publish();
            let mut client = self.shared.client.clone();
            timed("etcd delete", client.delete(key.as_str(), None))
                .await
                .map_err(RegistryError::Unavailable)?;
            if lease != 0 {
                let mut client = self.shared.client.clone();
                if let Err(why) = timed("etcd lease revoke", client.lease_revoke(lease)).await {
                    tracing::debug!(%why, "lease revoke after deregister (it expires anyway)");
                }
            }
            Ok(())
        })
    }

    fn watch(&self) -> watch::Receiver<Arc<Vec<NodeRecord>>> {
        self.shared.tx.subscribe()
    }

    fn kind(&self) -> &'static str {
        "etcd"
    }

    fn is_connected(&self) -> bool {
        self.shared.reachable.load(Ordering::Relaxed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_become_endpoints() {
        assert_eq!(
            endpoints("etcd://127.0.0.1:2379").expect("url"),
            ["http://127.0.0.1:2379"]
        );
        assert_eq!(
            endpoints("etcd://a:1,b:2/").expect("url"),
            ["http://a:1", "http://b:2"]
        );
        assert!(endpoints("etcd://").is_err());
        assert!(endpoints("http://a:1").is_err());
        assert_eq!(ttl_secs(Duration::from_millis(2500)), 3);
        assert_eq!(ttl_secs(Duration::ZERO), 1);
    }

    #[test]
    fn malformed_values_are_dropped_and_older_revisions_ignored() {
        let mut c = Cache::default();
        let n = NodeRecord {
            id: "n1".into(),
            ..Default::default()
        };
        let v = serde_json::to_vec(&n).expect("json");
        c.put(b"k/n1", &v, 5);
        c.put(b"k/n1", b"{garbage", 4);
        assert_eq!(c.live(), std::slice::from_ref(&n));
        c.put(b"k/n1", b"{garbage", 6);
        assert!(c.live().is_empty());
        c.put(b"k/n2", &v, 7);
        assert!(c.live().is_empty(), "n1's record under n2's key");
    }
}

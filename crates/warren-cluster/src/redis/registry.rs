//! [`GobaseRegistry`]: the node registry in the Redis layouts of the gobase Go package
//! (docs/cluster.md, "Registries"), so warren nodes and Go services that use gobase see each other
//! in one place. The two layouts (the seed era's, in milliseconds, and today's, in seconds) differ
//! only in what redis/layout.rs describes; everything here serves both.
//!
//! A warren node is the member `warren&<node id>&<host>&<port>&warren`; the full record (module
//! instances, tags, version) does not fit a member, so it lives in a hash beside the ZSET, written
//! in the same script as the `ZADD` and deleted on deregistration. Liveness is logical, as in
//! gobase: a member is live while its score is at least `now − 8 s` (server time, bound included);
//! the checker purges stale members (and their hash entries) when the live list changes, and only
//! those whose score reads as a timestamp in the layout's unit: a member another layout wrote in
//! the same key is left alone, and logged once.

use parking_lot::Mutex;
use std::collections::{HashMap, HashSet};
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use futures_util::StreamExt;
use futures_util::future::BoxFuture;
use redis::Client;
use redis::aio::{ConnectionManager, PubSubStream};
use tokio::sync::{Notify, watch};
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use warren::registry::{NodeRecord, Registry, RegistryError};

use super::layout::{GobaseKeys, GobaseLayout, LIVE_S, PLAUSIBLE_FACTOR, Scripts, split_layout};
use super::{Backoff, COMMAND_TIMEOUT, CONNECT_TIMEOUT, bounded, client, manager};

/// Registration refresh period (half the liveness window, as gobase).
const KEEPALIVE: Duration = Duration::from_secs(LIVE_S / 2);
/// Checker period while another process holds the lock.
const CHECK_IDLE: Duration = Duration::from_secs(LIVE_S);
/// The watcher re-reads this often even without channel messages (messages are lost across
/// reconnects), and while it has no subscription at all.
const POLL: Duration = Duration::from_secs(LIVE_S);
/// Scheme and service name of warren's own members.
const WARREN: &str = "warren";
/// Members the checker left alone that one check reports (the rest wait for later checks).
const FOREIGN_REPORT: usize = 16;
/// Distinct left-alone members logged per registry, so a key full of them cannot grow memory.
const FOREIGN_LOGGED_MAX: usize = 1024;

/// One live registry member as gobase sees it: a Go service (`gate&gate1&10.0.0.5&7001&tcp`) or a
/// warren node (`warren&<node id>&<host>&<port>&warren`). Exposed so that warren code can find
/// and dial the Go services registered next to it.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct GobaseMember {
    /// Service (group) name.
    pub name: String,
    /// Service id, unique in the group.
    pub id: String,
    /// Address the service announces.
    pub addr: String,
    /// Port it announces (a member whose port is not a number from 0 to 65535 is ignored).
    pub port: u16,
    /// Its protocol (`tcp`, `http`, `warren`, …).
    pub scheme: String,
}

impl GobaseMember {
    /// Read a member string the way the gobase watcher does: at least five `&`-separated fields
    /// (extra ones are ignored) and a numeric port; `None` otherwise.
    pub fn parse(member: &str) -> Option<GobaseMember> {
        let f: Vec<&str> = member.split('&').collect();
        if f.len() < 5 {
            return None;
        }
        Some(GobaseMember {
            name: f[0].to_owned(),
            id: f[1].to_owned(),
            addr: f[2].to_owned(),
            port: f[3].parse().ok()?,
            scheme: f[4].to_owned(),
        })
    }

    /// The member string (`name&id&addr&port&scheme`).
    pub fn encode(&self) -> String {
        format!(
            "{}&{}&{}&{}&{}",
            self.name, self.id, self.addr, self.port, self.scheme
        )
    }

    fn is_warren(&self) -> bool {
        self.name == WARREN && self.scheme == WARREN
    }
}

impl std::fmt::Display for GobaseMember {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.encode())
    }
}

/// Host and port of a node's announced address (`host:port`, `[v6]:port`, a URL, or a bare
/// host); `127.0.0.1` and 0 when it announces none.
fn host_port(address: Option<&str>) -> (String, u16) {
    let Some(a) = address.map(str::trim).filter(|a| !a.is_empty()) else {
        return ("127.0.0.1".into(), 0);
    };
    let a = a.split_once("://").map_or(a, |(_, rest)| rest);
    let a = a.split('/').next().unwrap_or(a);
    if let Ok(sa) = a.parse::<SocketAddr>() {
        return (sa.ip().to_string(), sa.port());
    }
    if let Some((h, p)) = a.rsplit_once(':')
        && let Ok(p) = p.parse::<u16>()
    {
        return (h.trim_matches(['[', ']']).to_owned(), p);
    }
    (a.to_owned(), 0)
}

/// The member string of a warren node, refusing fields that would corrupt the layout.
fn warren_member(node: &NodeRecord) -> Result<String, RegistryError> {
    let refuse = |what: &str, v: &str| {
        RegistryError::Unavailable(format!(
            "cannot register node {:?} in the gobase layout: its {what} {v:?} {}",
            node.id,
            if v.is_empty() {
                "is empty"
            } else {
                "contains '&', the layout's field separator"
            }
        ))
    };
    if node.id.is_empty() || node.id.contains('&') {
        return Err(refuse("id", &node.id));
    }
    let (host, port) = host_port(node.address.as_deref());
    if host.is_empty() || host.contains('&') {
        return Err(refuse("address", node.address.as_deref().unwrap_or("")));
    }
    Ok(GobaseMember {
        name: WARREN.into(),
        id: node.id.clone(),
        addr: host,
        port,
        scheme: WARREN.into(),
    }
    .encode())
}

/// A connection failure as [`RegistryError`] holds it: words only (the registry's errors carry
/// no source).
fn text(d: warren::error::Detail) -> RegistryError {
    RegistryError::Unavailable(d.to_string())
}

/// The address of the interface this host reaches other machines through (the one its default
/// route uses), as gobase's `LocalIPString` finds it; `None` on a host with no route out. What a
/// node announces when nothing more specific is known, and part of the checker lock's value.
pub fn local_ip() -> Option<IpAddr> {
    let s = std::net::UdpSocket::bind("0.0.0.0:0").ok()?;
    // a UDP connect sends nothing; it only picks the outgoing interface
    s.connect("10.255.255.255:1").ok()?;
    let ip = s.local_addr().ok()?.ip();
    (!ip.is_unspecified()).then_some(ip)
}

/// The checker lock's value: `<local ip>:<pid>:<8 random chars>`, as gobase makes it.
fn lock_uuid() -> String {
    let ip = local_ip().map_or_else(|| "127.0.0.1".to_owned(), |ip| ip.to_string());
    let rand = uuid::Uuid::new_v4().simple().to_string();
    format!("{ip}:{}:{}", std::process::id(), &rand[..8])
}

/// The keepalive of one registered node.
struct Keepalive {
    member: String,
    stop: CancellationToken,
    task: JoinHandle<()>,
}

struct Inner {
    client: Client,
    conn: ConnectionManager,
    layout: GobaseLayout,
    keys: GobaseKeys,
    uuid: String,
    nodes: watch::Sender<Arc<Vec<NodeRecord>>>,
    services: watch::Sender<Arc<Vec<GobaseMember>>>,
    own: Mutex<HashMap<String, Keepalive>>,
    /// Wakes the keepalives so they re-put their record at once (the store came back).
    reput: Notify,
    checker_started: AtomicBool,
    /// The watcher's last read of the registry succeeded (what [`Registry::is_connected`] says).
    reachable: AtomicBool,
    runtime: tokio::runtime::Handle,
    scripts: Scripts,
    /// Members the checker left alone and logged already (bounded by [`FOREIGN_LOGGED_MAX`]).
    foreign_logged: Mutex<HashSet<String>>,
}

/// The node registry in a gobase Redis layout (docs/cluster.md, "Registries").
///
/// Registered nodes are refreshed every 4 s by a background keepalive; [`Registry::watch`] lists
/// the live warren nodes (re-read on every channel message and every 8 s); [`GobaseRegistry::services`]
/// lists every live member, Go services included. [`Registry::is_connected`] says whether the
/// watcher's last read succeeded (it reads again at once when its subscription drops, so a dead
/// Redis shows within a command's deadline). A Redis outage keeps the last lists; once
/// Redis is back (a restart loses everything, nothing is persisted) the keepalives put their
/// records again at once, and for one liveness window the lists only grow, so other nodes do
/// not flap out while they re-register.
pub struct GobaseRegistry {
    inner: Arc<Inner>,
    stop: CancellationToken,
}

impl std::fmt::Debug for GobaseRegistry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GobaseRegistry")
            .field("key", &self.inner.keys.zset)
            .field("layout", &self.inner.layout)
            .field("uuid", &self.inner.uuid)
            .finish_non_exhaustive()
    }
}

impl Drop for GobaseRegistry {
    fn drop(&mut self) {
        // keepalives stop with it: the records expire after the liveness window
        self.stop.cancel();
    }
}

impl GobaseRegistry {
    /// Connect to `url` and use the gobase registry `key` in the `gobase` layout (or the one a
    /// `?layout=` on the URL names): see [`GobaseRegistry::connect_layout`].
    pub async fn connect(url: &str, key: &str) -> Result<Arc<GobaseRegistry>, RegistryError> {
        GobaseRegistry::connect_layout(url, key, GobaseLayout::default()).await
    }

    /// Connect to `url` and use the gobase registry `key` in `layout`, unless the URL's query
    /// names one (`?layout=gobase-seconds`: it wins, as the command line's URL wins over a
    /// file): reads the live nodes once (so [`Registry::watch`] is filled from the start) and
    /// starts watching.
    pub async fn connect_layout(
        url: &str,
        key: &str,
        layout: GobaseLayout,
    ) -> Result<Arc<GobaseRegistry>, RegistryError> {
        if key.is_empty() {
            return Err(RegistryError::Unavailable(
                "the gobase registry needs a non-empty key".into(),
            ));
        }
        let (url, named) = split_layout(url).map_err(RegistryError::Invalid)?;
        let layout = named.unwrap_or(layout);
        let client = client(&url, None).map_err(text)?;
        let conn = manager(&client).await.map_err(text)?;
        let inner = Arc::new(Inner {
            client,
            conn,
            layout,
            keys: GobaseKeys::for_layout(key, layout),
            uuid: lock_uuid(),
            nodes: watch::Sender::new(Arc::new(Vec::new())),
            services: watch::Sender::new(Arc::new(Vec::new())),
            own: Mutex::new(HashMap::new()),
            reput: Notify::new(),
            checker_started: AtomicBool::new(false),
            reachable: AtomicBool::new(true),
            runtime: tokio::runtime::Handle::current(),
            scripts: Scripts::new(),
            foreign_logged: Mutex::new(HashSet::new()),
        });
        let (members, nodes) = inner.read(None).await.map_err(RegistryError::Unavailable)?;
        let mut state = WatchState::default();
        inner.publish(members, nodes, &mut state);
        let stop = CancellationToken::new();
        tokio::spawn(watch_loop(inner.clone(), state, stop.child_token()));
        Ok(Arc::new(GobaseRegistry { inner, stop }))
    }

    /// Every live member of the registry (Go services and warren nodes), sorted by (id, name),
    /// now and on every change: what warren code needs to reach the Go services registered in
    /// the same key.
    pub fn services(&self) -> watch::Receiver<Arc<Vec<GobaseMember>>> {
        self.start_checker();
        self.inner.services.subscribe()
    }

    /// The Redis keys of this registry.
    pub fn keys(&self) -> &GobaseKeys {
        &self.inner.keys
    }

    /// The layout this registry reads and writes.
    pub fn layout(&self) -> GobaseLayout {
        self.inner.layout
    }

    /// The raw live members, read now at server time, or as of `now` (Redis time in the
    /// layout's unit: ms for `gobase`, seconds for `gobase-seconds`) when given: for
    /// diagnostics, and to check the liveness bound against fixed scores.
    pub async fn live_members_at(&self, now: Option<f64>) -> Result<Vec<String>, RegistryError> {
        self.inner
            .live(now)
            .await
            .map_err(RegistryError::Unavailable)
    }

    /// The checker runs once anyone watches, as gobase starts it with the first watch.
    fn start_checker(&self) {
        if !self.inner.checker_started.swap(true, Ordering::SeqCst) {
            self.inner
                .runtime
                .spawn(check_loop(self.inner.clone(), self.stop.child_token()));
        }
    }

    async fn register_node(&self, node: NodeRecord) -> Result<(), RegistryError> {
        let member = warren_member(&node)?;
        let json = serde_json::to_string(&node)
            .map_err(|e| RegistryError::Unavailable(format!("cannot encode node record: {e}")))?;
        let old = self.take_keepalive(&node.id).await;
        let old_member = old.unwrap_or_default();
        self.inner
            .put(&node.id, &member, &json, &old_member)
            .await
            .map_err(RegistryError::Unavailable)?;
        let stop = self.stop.child_token();
        let task = tokio::spawn(keepalive(
            self.inner.clone(),
            node.id.clone(),
            member.clone(),
            json,
            stop.clone(),
        ));
        let replaced = self
            .inner
            .own()
            .insert(node.id.clone(), Keepalive { member, stop, task });
        if let Some(k) = replaced {
            // a concurrent register of the same id: the later one wins
            k.stop.cancel();
        }
        Ok(())
    }

    /// Stop the keepalive of `id`, if this registry runs one; returns the member it refreshed.
    async fn take_keepalive(&self, id: &str) -> Option<String> {
        let k = self.inner.own().remove(id)?;
        k.stop.cancel();
        let _ = k.task.await;
        Some(k.member)
    }

    async fn deregister_node(&self, id: &str) -> Result<(), RegistryError> {
        self.take_keepalive(id).await;
        let keys = &self.inner.keys;
        let mut conn = self.inner.conn.clone();
        let layout = self.inner.layout;
        let mut inv = self.inner.scripts.deregister.prepare_invoke();
        inv.key(&keys.zset)
            .key(&keys.list)
            .key(&keys.nodes)
            .arg(layout.per_second())
            .arg(layout.window())
            .arg(&keys.channel)
            .arg(layout.style())
            .arg(layout.dereg_word())
            .arg(format!("{WARREN}&{id}&"))
            .arg(id);
        bounded(COMMAND_TIMEOUT, inv.invoke_async::<i64>(&mut conn))
            .await
            .map(|_| ())
            .map_err(text)
    }
}

impl Inner {
    fn own(&self) -> parking_lot::MutexGuard<'_, HashMap<String, Keepalive>> {
        self.own.lock()
    }

    /// One registration (the REGISTER script).
    async fn put(
        &self,
        id: &str,
        member: &str,
        json: &str,
        old_member: &str,
    ) -> Result<(), String> {
        let keys = &self.keys;
        let mut conn = self.conn.clone();
        let mut inv = self.scripts.register.prepare_invoke();
        inv.key(&keys.zset)
            .key(&keys.list)
            .key(&keys.nodes)
            .arg(self.layout.per_second())
            .arg(self.layout.window())
            .arg(&keys.channel)
            .arg(self.layout.style())
            .arg(member)
            .arg(id)
            .arg(json)
            .arg(old_member);
        bounded(COMMAND_TIMEOUT, inv.invoke_async::<i64>(&mut conn))
            .await
            .map(|_| ())
            .map_err(|d| d.to_string())
    }

    async fn live(&self, now: Option<f64>) -> Result<Vec<String>, String> {
        let mut conn = self.conn.clone();
        let mut inv = self.scripts.read.prepare_invoke();
        inv.key(&self.keys.zset)
            .arg(self.layout.per_second())
            .arg(self.layout.window())
            .arg(now.map(|n| format!("{n:.6}")).unwrap_or_default());
        bounded(COMMAND_TIMEOUT, inv.invoke_async::<Vec<String>>(&mut conn))
            .await
            .map_err(|d| d.to_string())
    }

    /// The live members and the records of the live warren nodes, both sorted.
    async fn read(
        &self,
        now_ms: Option<f64>,
    ) -> Result<(Vec<GobaseMember>, Vec<NodeRecord>), String> {
        let raw = self.live(now_ms).await?;
        let mut members: Vec<GobaseMember> = raw
            .iter()
            .filter_map(|m| {
                let p = GobaseMember::parse(m);
                if p.is_none() {
                    tracing::debug!(key = %self.keys.zset, member = %m, "ignored a registry member that is not name&id&addr&port&scheme");
                }
                p
            })
            .collect();
        members.sort_by(|a, b| (&a.id, &a.name, a).cmp(&(&b.id, &b.name, b)));
        members.dedup();
        let mut ids: Vec<&str> = members
            .iter()
            .filter(|m| m.is_warren())
            .map(|m| m.id.as_str())
            .collect();
        ids.sort_unstable();
        ids.dedup();
        let mut nodes = Vec::with_capacity(ids.len());
        if !ids.is_empty() {
            let mut conn = self.conn.clone();
            let mut cmd = redis::cmd("HMGET");
            cmd.arg(&self.keys.nodes).arg(&ids);
            let records: Vec<Option<String>> = bounded(COMMAND_TIMEOUT, cmd.query_async(&mut conn))
                .await
                .map_err(|d| d.to_string())?;
            for (id, json) in ids.iter().zip(records) {
                let Some(json) = json else {
                    // deregistered between the two reads, or written by something else
                    continue;
                };
                match serde_json::from_str::<NodeRecord>(&json) {
                    Ok(n) if n.id == *id => nodes.push(n),
                    Ok(n) => {
                        metrics::counter!("warren_registry_records_refused_total", "registry" => "redis").increment(1);
                        tracing::warn!(key = %self.keys.nodes, field = %id, record_id = %n.id, "ignored a node record filed under another id");
                    }
                    Err(e) => {
                        metrics::counter!("warren_registry_records_refused_total", "registry" => "redis").increment(1);
                        tracing::warn!(key = %self.keys.nodes, field = %id, error = %e, "ignored a malformed node record");
                    }
                }
            }
        }
        Ok((members, nodes))
    }

    /// Send the lists to the watchers when they changed. Within a grace window after an outage,
    /// entries missing from the new lists are kept: they may simply not have re-registered yet.
    fn publish(
        &self,
        mut members: Vec<GobaseMember>,
        mut nodes: Vec<NodeRecord>,
        st: &mut WatchState,
    ) {
        if let Some(until) = st.grace_until {
            if Instant::now() < until {
                let have: HashSet<String> = nodes.iter().map(|n| n.id.clone()).collect();
                nodes.extend(
                    self.nodes
                        .borrow()
                        .iter()
                        .filter(|n| !have.contains(&n.id))
                        .cloned(),
                );
                nodes.sort_by(|a, b| a.id.cmp(&b.id));
                let have: HashSet<(String, String)> = members
                    .iter()
                    .map(|m| (m.id.clone(), m.name.clone()))
                    .collect();
                members.extend(
                    self.services
                        .borrow()
                        .iter()
                        .filter(|m| !have.contains(&(m.id.clone(), m.name.clone())))
                        .cloned(),
                );
                members.sort_by(|a, b| (&a.id, &a.name, a).cmp(&(&b.id, &b.name, b)));
            } else {
                st.grace_until = None;
            }
        }
        self.nodes.send_if_modified(|cur| {
            if **cur == nodes {
                return false;
            }
            *cur = Arc::new(nodes);
            true
        });
        self.services.send_if_modified(|cur| {
            if **cur == members {
                return false;
            }
            // warren nodes are logged by the node ("node joined"); the others only here
            let before: HashSet<&GobaseMember> = cur.iter().filter(|m| !m.is_warren()).collect();
            let after: HashSet<&GobaseMember> = members.iter().filter(|m| !m.is_warren()).collect();
            for m in after.difference(&before) {
                tracing::info!(key = %self.keys.zset, member = %m, "registry service joined");
            }
            for m in before.difference(&after) {
                tracing::info!(key = %self.keys.zset, member = %m, "registry service left");
            }
            *cur = Arc::new(members);
            true
        });
    }

    /// A subscriber connection to the registry channel, confirmed.
    async fn subscribe(&self) -> Result<PubSubStream, String> {
        let mut ps = bounded(CONNECT_TIMEOUT, self.client.get_async_pubsub())
            .await
            .map_err(|d| d.to_string())?;
        bounded(CONNECT_TIMEOUT, ps.subscribe(&self.keys.channel))
            .await
            .map_err(|d| d.to_string())?;
        Ok(ps.into_on_message())
    }
}

/// What the watcher remembers between reads.
#[derive(Debug, Default)]
struct WatchState {
    /// Reads fail since then (logged once).
    failing_since: Option<Instant>,
    /// Until then, keep entries that vanished (see [`Inner::publish`]).
    grace_until: Option<Instant>,
}

impl WatchState {
    /// The store may have lost its data (a failed read or a dropped subscription): hold
    /// removals back for one liveness window and have our keepalives re-put their records.
    fn suspect(&mut self, inner: &Inner) {
        self.grace_until = Some(Instant::now() + Duration::from_secs(LIVE_S));
        inner.reput.notify_waiters();
    }
}

/// Re-read on every channel message, every [`POLL`], and (re)subscribe with backoff.
async fn watch_loop(inner: Arc<Inner>, mut st: WatchState, stop: CancellationToken) {
    let mut sub: Option<PubSubStream> = None;
    let mut backoff = Backoff::new(POLL);
    let key = inner.keys.zset.clone();
    loop {
        if sub.is_none() {
            match inner.subscribe().await {
                Ok(s) => {
                    sub = Some(s);
                    backoff.reset();
                }
                Err(why) => tracing::debug!(%key, %why, "registry channel subscription failed"),
            }
        }
        let read = inner.read(None).await;
        inner.reachable.store(read.is_ok(), Ordering::Relaxed);
        match read {
            Ok((members, nodes)) => {
                if let Some(t) = st.failing_since.take() {
                    tracing::info!(%key, down_ms = t.elapsed().as_millis() as u64, "redis registry reachable again");
                    st.suspect(&inner);
                }
                inner.publish(members, nodes, &mut st);
            }
            Err(why) => {
                if st.failing_since.is_none() {
                    tracing::warn!(%key, %why, "redis registry unreachable; keeping the last known nodes");
                    st.failing_since = Some(Instant::now());
                }
            }
        }
        let wait = if sub.is_some() && st.failing_since.is_none() {
            POLL
        } else {
            backoff.step()
        };
        tokio::select! {
            _ = stop.cancelled() => return,
            m = next_message(&mut sub) => match m {
                Some(_) => {
                    // one re-read covers a burst of messages
                    if let Some(s) = sub.as_mut() {
                        while let Some(Some(_)) = futures_util::FutureExt::now_or_never(s.next()) {}
                    }
                }
                None => {
                    tracing::debug!(%key, "registry channel subscription lost");
                    sub = None;
                    st.suspect(&inner);
                }
            },
            _ = tokio::time::sleep(wait) => {}
        }
    }
}

/// The next channel message; `None` when the subscription ended; pending forever without one.
async fn next_message(sub: &mut Option<PubSubStream>) -> Option<redis::Msg> {
    match sub {
        Some(s) => s.next().await,
        None => std::future::pending().await,
    }
}

/// Re-put one node's record every [`KEEPALIVE`], faster (with backoff) while it fails, and at
/// once when the watcher saw the store come back.
async fn keepalive(
    inner: Arc<Inner>,
    id: String,
    member: String,
    json: String,
    stop: CancellationToken,
) {
    let mut backoff = Backoff::new(KEEPALIVE);
    let mut failing = false;
    loop {
        let delay = if failing { backoff.step() } else { KEEPALIVE };
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(delay) => {}
            _ = inner.reput.notified() => {}
        }
        match inner.put(&id, &member, &json, "").await {
            Ok(()) => {
                if failing {
                    tracing::info!(node = %id, key = %inner.keys.zset, "node record refreshed again");
                }
                failing = false;
                backoff.reset();
            }
            Err(why) => {
                if !failing {
                    tracing::warn!(node = %id, key = %inner.keys.zset, %why, "node record refresh failed; retrying");
                }
                failing = true;
            }
        }
    }
}

/// The gobase checker: while this process holds the lock, every second (`gobase`) or every 4 s
/// (`gobase-seconds`); every 8 s otherwise.
async fn check_loop(inner: Arc<Inner>, stop: CancellationToken) {
    let layout = inner.layout;
    let (lock_option, lock_expiry) = layout.lock_expiry();
    let check_message = layout.check_message(&inner.uuid);
    loop {
        let keys = &inner.keys;
        let mut conn = inner.conn.clone();
        let mut inv = inner.scripts.check.prepare_invoke();
        inv.key(&keys.zset)
            .key(&keys.list)
            .key(&keys.locker)
            .key(&keys.nodes)
            .arg(layout.per_second())
            .arg(layout.window())
            .arg(&keys.channel)
            .arg(&inner.uuid)
            .arg(lock_option)
            .arg(lock_expiry)
            .arg(&check_message)
            .arg(PLAUSIBLE_FACTOR)
            .arg(FOREIGN_REPORT);
        let holding =
            match bounded(COMMAND_TIMEOUT, inv.invoke_async::<Vec<String>>(&mut conn)).await {
                Ok(r) => {
                    if r.first().map(String::as_str) == Some("2") {
                        tracing::debug!(key = %keys.zset, "registry checker found a change");
                    }
                    if r.len() > 1 {
                        inner.left_alone(&r[1..]);
                    }
                    r.first().is_some_and(|s| s != "0")
                }
                Err(why) => {
                    tracing::debug!(key = %keys.zset, %why, "registry check failed");
                    false
                }
            };
        let wait = if holding {
            layout.check_holding()
        } else {
            CHECK_IDLE
        };
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(wait) => {}
        }
    }
}

impl Inner {
    /// Log, once per member, what the checker left in the ZSET because it could not read it:
    /// `report` is the server time followed by (member, score) pairs.
    fn left_alone(&self, report: &[String]) {
        let Some(now) = report.first().and_then(|n| n.parse::<f64>().ok()) else {
            return;
        };
        for pair in report[1..].chunks_exact(2) {
            let (member, score) = (&pair[0], &pair[1]);
            {
                let mut seen = self.foreign_logged.lock();
                if seen.contains(member) || seen.len() >= FOREIGN_LOGGED_MAX {
                    continue;
                }
                seen.insert(member.clone());
            }
            let why = match score.parse::<f64>() {
                _ if GobaseMember::parse(member).is_none() => {
                    "it is not name&id&addr&port&scheme".to_owned()
                }
                Ok(s) => format!(
                    "its score is {}",
                    self.layout
                        .foreign_score(s, now)
                        .unwrap_or("not a timestamp near now")
                ),
                Err(_) => "its score is not a number".to_owned(),
            };
            metrics::counter!("warren_registry_members_left_alone_total", "registry" => "redis")
                .increment(1);
            tracing::warn!(
                key = %self.keys.zset,
                layout = %self.layout,
                %member,
                %score,
                %why,
                "the registry checker left alone a member it cannot read in this layout",
            );
        }
    }
}

impl Registry for GobaseRegistry {
    fn register(&self, node: NodeRecord) -> BoxFuture<'_, Result<(), RegistryError>> {
        Box::pin(self.register_node(node))
    }

    fn deregister(&self, node_id: &str) -> BoxFuture<'_, Result<(), RegistryError>> {
        let id = node_id.to_owned();
        Box::pin(async move { self.deregister_node(&id).await })
    }

    fn watch(&self) -> watch::Receiver<Arc<Vec<NodeRecord>>> {
        self.start_checker();
        self.inner.nodes.subscribe()
    }

    fn kind(&self) -> &'static str {
        "redis"
    }

    fn is_connected(&self) -> bool {
        self.inner.reachable.load(Ordering::Relaxed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn members_parse_like_the_gobase_watcher() {
        let m = GobaseMember::parse("gate&gate1&10.0.0.5&7001&tcp").expect("member");
        assert_eq!(
            (
                m.name.as_str(),
                m.id.as_str(),
                m.addr.as_str(),
                m.port,
                m.scheme.as_str()
            ),
            ("gate", "gate1", "10.0.0.5", 7001, "tcp")
        );
        assert_eq!(m.encode(), "gate&gate1&10.0.0.5&7001&tcp");
        assert!(GobaseMember::parse("gate&gate1&10.0.0.5&7001&tcp&extra").is_some());
        assert!(GobaseMember::parse("gate&gate1&10.0.0.5&7001").is_none());
        assert!(GobaseMember::parse("gate&gate1&10.0.0.5&x&tcp").is_none());
        assert!(GobaseMember::parse("").is_none());
    }

    #[test]
    fn warren_members_carry_the_node_address() {
        let mut n = NodeRecord {
            id: "n1".into(),
            ..NodeRecord::default()
        };
        assert_eq!(
            warren_member(&n).expect("member"),
            "warren&n1&127.0.0.1&0&warren"
        );
        for (addr, want) in [
            ("10.0.0.5:7001", "warren&n1&10.0.0.5&7001&warren"),
            (
                "nats://host.example:4222",
                "warren&n1&host.example&4222&warren",
            ),
            ("[::1]:9", "warren&n1&::1&9&warren"),
            ("host.example", "warren&n1&host.example&0&warren"),
        ] {
            n.address = Some(addr.into());
            assert_eq!(warren_member(&n).expect("member"), want, "{addr}");
        }
        n.address = Some("a&b:1".into());
        assert!(warren_member(&n).is_err());
        n.address = None;
        n.id = "bad&id".into();
        let e = warren_member(&n).expect_err("refused").to_string();
        assert!(e.contains("'&'"), "{e}");
        n.id = String::new();
        assert!(warren_member(&n).is_err());
    }

    #[test]
    fn lock_uuid_has_the_gobase_shape() {
        let u = lock_uuid();
        let parts: Vec<&str> = u.rsplitn(3, ':').collect();
        assert_eq!(parts.len(), 3, "{u}");
        assert_eq!(parts[0].len(), 8);
        assert_eq!(parts[1], std::process::id().to_string());
    }
}

//! Backends: a node as a client of TCP services it did not write (docs/backends.md).
//!
//! The gobase `backend` model: services are grouped by name (`gate`, `game`, …); each service is
//! kept connected (dial with a timeout, dial again every second); a group's consistent-hash ring
//! ([`warren::ring::Ring`], the one ring of the project) holds only its connected services, with
//! one more ring per routing tag; the node sends to a service by id, by hash of a key, by tag and
//! hash, or to a whole group, and calls a service with request/reply by rpc id.
//!
//! Which services exist is told by discovery through one plain call,
//! [`Backends::update`]`(group, services)`: a static list from the config is one source, and
//! registry watchers feed the same call. How the bytes look is the group's [`Codec`]; what the
//! node does with them is its [`Hooks`].
//!
//! Files: this one holds the groups, their rings and the discovery update; `tcp.rs` a service,
//! its connection and its delivery; `codec.rs` the codec trait and the gobase test codec;
//! `hooks.rs` the hooks; `configured.rs` the groups of the config's `[[backend]]` tables;
//! `discovery.rs` the registry watchers that feed `update`; `http.rs` the HTTP groups.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use bytes::BytesMut;
use parking_lot::RwLock;
use serde::{Deserialize, Serialize};
use thiserror::Error;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use warren::ring::{Ring, normalize};

mod codec;
pub(crate) mod configured;
pub mod discovery;
#[cfg(feature = "etcd")]
pub mod discovery_etcd;
mod hooks;
mod http;
mod tcp;

pub use codec::{Codec, CodecError, GobaseTestCodec};
pub use configured::{ConfiguredBackends, ConfiguredGroup, ConfiguredHooks, MsgSink};
pub use hooks::{Hooks, NoHooks, Redial};
pub use http::{HttpBackends, HttpOptions, HttpService};
pub use tcp::Service;
pub use warren_proto::backend_frame::TestMsg;

/// The id a call waits on, as the hooks' `check_rpc_resp` reads it from an answer.
pub type RpcId = u64;

/// One service as discovery lists it. The serde names are those of gobase's service records.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct ServiceConf {
    /// Its group.
    #[serde(rename = "servicename")]
    pub name: String,
    /// Its id, unique in the group: the member of the group's rings.
    #[serde(rename = "serviceid")]
    pub id: String,
    /// Host name or IP address to dial.
    #[serde(rename = "serviceaddr")]
    pub addr: String,
    /// Port to dial.
    #[serde(rename = "serviceport")]
    pub port: u16,
    /// Routing tag: a service with one is also on its group's ring for that tag.
    #[serde(rename = "routertag", default)]
    pub tag: String,
}

impl ServiceConf {
    /// A record with no tag.
    pub fn new(
        name: impl Into<String>,
        id: impl Into<String>,
        addr: impl Into<String>,
        port: u16,
    ) -> Self {
        ServiceConf {
            name: name.into(),
            id: id.into(),
            addr: addr.into(),
            port,
            tag: String::new(),
        }
    }

    /// The same record with a routing tag.
    pub fn with_tag(mut self, tag: impl Into<String>) -> Self {
        self.tag = tag.into();
        self
    }

    /// `addr:port` (IPv6 addresses in brackets), as dialled.
    pub fn peer(&self) -> String {
        if self.addr.contains(':') && !self.addr.starts_with('[') {
            format!("[{}]:{}", self.addr, self.port)
        } else {
            format!("{}:{}", self.addr, self.port)
        }
    }

    /// Name, id and tag lowercased and trimmed, as groups and rings compare them.
    fn normalized(mut self) -> Self {
        self.name = normalize(&self.name);
        self.id = normalize(&self.id);
        self.tag = normalize(&self.tag);
        self.addr = self.addr.trim().to_owned();
        self
    }
}

/// Why a send or a call to a backend did not happen. The texts of `timeout`, `close` and
/// `rpcId exist` are those of the gobase backend package.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[non_exhaustive]
pub enum BackendError {
    /// No such group or service, or no connected service on the ring.
    #[error("no service")]
    NoService,
    /// The service is not connected now.
    #[error("not connected")]
    NotConnected,
    /// The service's outbound queue holds `queue_bytes` already: it reads slower than the node
    /// writes.
    #[error("queue full")]
    QueueFull,
    /// The codec refused the message.
    #[error("encode: {0}")]
    Encode(CodecError),
    /// No answer within the call's timeout.
    #[error("timeout")]
    Timeout,
    /// The connection dropped while the call waited.
    #[error("close")]
    Close,
    /// A call with the same rpc id is already waiting on this service.
    #[error("rpcId exist")]
    RpcIdExist,
    /// The HTTP client of an HTTP group could not be built.
    #[error("http: {0}")]
    Http(String),
}

/// How a [`Backends`] behaves (the `[[backend]]` keys of the config, docs/backends.md).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BackendOptions {
    /// Longest wait for a dial (30 s).
    pub dial_timeout: Duration,
    /// `on_msg` and `on_tick` one after the other per service, in arrival order (true, the
    /// default), or on a bounded pool of tasks.
    pub msg_seq: bool,
    /// A service that leaves discovery is closed at once (true), or when its connection next
    /// drops or its next dial fails (false, the default).
    pub immediately: bool,
    /// Bytes a service's outbound queue may hold before sends fail with `queue full` (4 MiB).
    pub queue_bytes: usize,
    /// Hooks running at once when `msg_seq` is false (64), over all services.
    pub concurrency: usize,
}

impl Default for BackendOptions {
    fn default() -> Self {
        BackendOptions {
            dial_timeout: Duration::from_secs(30),
            msg_seq: true,
            immediately: false,
            queue_bytes: 4 * 1024 * 1024,
            concurrency: 64,
        }
    }
}

/// The backend groups of a node that speak one codec, with their hooks: a cheap handle.
///
/// Dropping every handle does not stop the services; [`shutdown`](Backends::shutdown) does.
pub struct Backends<C: Codec, H: Hooks<C> = NoHooks> {
    shared: Arc<Shared<C, H>>,
}

impl<C: Codec, H: Hooks<C>> Clone for Backends<C, H> {
    fn clone(&self) -> Self {
        Backends {
            shared: self.shared.clone(),
        }
    }
}

/// What the handles and the service tasks share.
pub(crate) struct Shared<C: Codec, H: Hooks<C>> {
    codec: Arc<C>,
    hooks: Arc<H>,
    dial_timeout: Duration,
    msg_seq: bool,
    immediately: bool,
    queue_bytes: usize,
    pool: Arc<Semaphore>,
    groups: RwLock<HashMap<String, Group<C>>>,
    cancel: CancellationToken,
    tracker: TaskTracker,
}

/// One group: its services by id and the rings of the connected ones.
struct Group<C: Codec> {
    services: HashMap<String, Service<C>>,
    ring: Ring,
    tags: HashMap<String, Ring>,
}

impl<C: Codec> Default for Group<C> {
    fn default() -> Self {
        Group {
            services: HashMap::new(),
            ring: Ring::new(),
            tags: HashMap::new(),
        }
    }
}

impl<C: Codec> Group<C> {
    fn is_current(&self, svc: &Service<C>) -> bool {
        self.services.get(svc.id()).is_some_and(|s| s.same(svc))
    }

    fn ring_remove(&mut self, svc: &Service<C>) {
        self.ring.remove(svc.id());
        let tag = &svc.conf().tag;
        if let Some(r) = self.tags.get_mut(tag) {
            r.remove(svc.id());
            if r.is_empty() {
                self.tags.remove(tag);
            }
        }
    }

    fn pick(&self, ring: Option<&Ring>, key: &str) -> Option<Service<C>> {
        let id = ring?.get(key)?;
        self.services.get(id).cloned()
    }
}

impl<C: Codec, H: Hooks<C>> Shared<C, H> {
    /// A service's connection is up: onto the rings, if it is still the one of its id.
    fn ring_join(&self, svc: &Service<C>) {
        let mut groups = self.groups.write();
        let Some(g) = groups.get_mut(svc.name()) else {
            return;
        };
        if !g.is_current(svc) || svc.inner_cancelled() {
            return;
        }
        g.ring.add(svc.id());
        let tag = &svc.conf().tag;
        if !tag.is_empty() {
            g.tags.entry(tag.clone()).or_default().add(svc.id());
        }
    }

    /// A service's connection is down: off the rings, if it is still the one of its id.
    fn ring_leave(&self, svc: &Service<C>) {
        let mut groups = self.groups.write();
        if let Some(g) = groups.get_mut(svc.name())
            && g.is_current(svc)
        {
            g.ring_remove(svc);
        }
    }

    /// A service leaves its group on its own (lazy removal, or the dial hook said stop).
    fn retire(&self, svc: &Service<C>) {
        let mut groups = self.groups.write();
        let Some(g) = groups.get_mut(svc.name()) else {
            return;
        };
        if g.is_current(svc) {
            g.ring_remove(svc);
            g.services.remove(svc.id());
        }
        if g.services.is_empty() {
            groups.remove(svc.name());
        }
    }
}

impl<C: Codec> Service<C> {
    fn inner_cancelled(&self) -> bool {
        self.cancel_token().is_cancelled()
    }
}

impl<C: Codec, H: Hooks<C>> Backends<C, H> {
    /// Backend groups speaking `codec`, reporting to `hooks`; no group until the first
    /// [`update`](Backends::update). Must be called within a tokio runtime.
    pub fn new(codec: C, hooks: H, options: BackendOptions) -> Self {
        Backends {
            shared: Arc::new(Shared {
                codec: Arc::new(codec),
                hooks: Arc::new(hooks),
                dial_timeout: options.dial_timeout,
                msg_seq: options.msg_seq,
                immediately: options.immediately,
                queue_bytes: options.queue_bytes,
                pool: Arc::new(Semaphore::new(options.concurrency.max(1))),
                groups: RwLock::new(HashMap::new()),
                cancel: CancellationToken::new(),
                tracker: TaskTracker::new(),
            }),
        }
    }

    /// The hooks, as given to [`new`](Backends::new).
    pub fn hooks(&self) -> &H {
        &self.shared.hooks
    }

    /// Discovery says `group` holds exactly `services` now (docs/backends.md, "Discovery").
    ///
    /// Records of another group, or with an empty id, address or a port 0, are skipped (with a
    /// warning); then the hooks' `filter` chooses. A new id is added (`on_add`) and dialled in
    /// the background; an id whose address or port changed is closed and added anew; an id that
    /// is gone is closed at once (`immediately`) or marked, to leave at its next disconnect or
    /// dial failure; a marked id that is listed again is unmarked. A group left empty is
    /// removed.
    pub fn update(&self, group: &str, services: Vec<ServiceConf>) {
        let shared = &self.shared;
        if shared.cancel.is_cancelled() {
            return;
        }
        let group = normalize(group);
        let mut listed: Vec<ServiceConf> = Vec::with_capacity(services.len());
        for s in services {
            let s = s.normalized();
            if s.name != group {
                tracing::warn!(group = %group, service = %s.id, name = %s.name, "backend record of another group skipped");
            } else if s.id.is_empty() || s.addr.is_empty() || s.port == 0 {
                tracing::warn!(group = %group, service = %s.id, addr = %s.addr, port = s.port, "backend record without id, address or port skipped");
            } else {
                listed.push(s);
            }
        }
        let listed = shared.hooks.filter(&group, listed);
        let mut want: HashMap<String, ServiceConf> = HashMap::with_capacity(listed.len());
        for s in listed {
            let s = s.normalized();
            want.insert(s.id.clone(), s);
        }

        let mut added = Vec::new();
        let mut closed = Vec::new();
        {
            let mut groups = shared.groups.write();
            let g = groups.entry(group.clone()).or_default();
            let gone: Vec<String> = g
                .services
                .keys()
                .filter(|id| !want.contains_key(*id))
                .cloned()
                .collect();
            for id in gone {
                if shared.immediately {
                    if let Some(svc) = g.services.remove(&id) {
                        g.ring_remove(&svc);
                        tracing::info!(group = %group, service = %id, "backend left discovery; closed");
                        closed.push(svc);
                    }
                } else if let Some(svc) = g.services.get(&id)
                    && !svc.set_marked(true)
                {
                    tracing::info!(group = %group, service = %id, "backend left discovery; leaves at its next disconnect");
                }
            }
            for (id, conf) in want {
                match g.services.get(&id) {
                    Some(svc) if svc.conf().addr == conf.addr && svc.conf().port == conf.port => {
                        if svc.set_marked(false) {
                            tracing::info!(group = %group, service = %id, "backend back in discovery");
                        }
                    }
                    Some(_) => {
                        if let Some(old) = g.services.remove(&id) {
                            g.ring_remove(&old);
                            tracing::info!(group = %group, service = %id, old = %old.peer(), new = %conf.peer(), "backend address changed; reconnecting");
                            closed.push(old);
                        }
                        let svc = self.service_for(conf);
                        g.services.insert(id, svc.clone());
                        added.push(svc);
                    }
                    None => {
                        tracing::info!(group = %group, service = %id, peer = %conf.peer(), "backend added");
                        let svc = self.service_for(conf);
                        g.services.insert(id, svc.clone());
                        added.push(svc);
                    }
                }
            }
            if g.services.is_empty() {
                groups.remove(&group);
            }
        }
        for svc in closed {
            svc.cancel_token().cancel();
        }
        for svc in added {
            shared.hooks.on_add(&svc);
            shared.tracker.spawn(tcp::run(shared.clone(), svc));
        }
    }

    /// Discovery says these are all the services of every group: each group named in `services`
    /// is updated with its records, and every other group with none.
    pub fn update_all(&self, services: Vec<ServiceConf>) {
        let mut by_group: HashMap<String, Vec<ServiceConf>> = HashMap::new();
        for s in services {
            by_group.entry(normalize(&s.name)).or_default().push(s);
        }
        let known: HashSet<String> = self.groups().into_iter().collect();
        for g in known {
            by_group.entry(g).or_default();
        }
        for (g, list) in by_group {
            self.update(&g, list);
        }
    }

    fn service_for(&self, conf: ServiceConf) -> Service<C> {
        Service::new(
            conf,
            self.shared.codec.clone(),
            self.shared.queue_bytes,
            self.shared.cancel.child_token(),
        )
    }

    /// The names of the groups, sorted.
    pub fn groups(&self) -> Vec<String> {
        let mut v: Vec<String> = self.shared.groups.read().keys().cloned().collect();
        v.sort();
        v
    }

    /// Every service of a group (connected or not), sorted by id.
    pub fn services(&self, group: &str) -> Vec<Service<C>> {
        let groups = self.shared.groups.read();
        let mut v: Vec<Service<C>> = groups
            .get(&normalize(group))
            .map(|g| g.services.values().cloned().collect())
            .unwrap_or_default();
        v.sort_by(|a, b| a.id().cmp(b.id()));
        v
    }

    /// A service by group and id.
    pub fn service(&self, group: &str, id: &str) -> Option<Service<C>> {
        let groups = self.shared.groups.read();
        groups
            .get(&normalize(group))?
            .services
            .get(&normalize(id))
            .cloned()
    }

    /// The connected service of a group that owns `key` on the group's ring (the key is hashed
    /// as given, case-sensitive).
    pub fn service_by_hash(&self, group: &str, key: &str) -> Option<Service<C>> {
        let groups = self.shared.groups.read();
        let g = groups.get(&normalize(group))?;
        g.pick(Some(&g.ring), key)
    }

    /// The connected service with routing tag `tag` that owns `key` on that tag's ring.
    pub fn service_by_tag_and_hash(&self, group: &str, tag: &str, key: &str) -> Option<Service<C>> {
        let groups = self.shared.groups.read();
        let g = groups.get(&normalize(group))?;
        g.pick(g.tags.get(&normalize(tag)), key)
    }

    /// The ids on a group's ring (its connected services), sorted.
    pub fn ring_members(&self, group: &str) -> Vec<String> {
        let groups = self.shared.groups.read();
        let mut v: Vec<String> = groups
            .get(&normalize(group))
            .map(|g| g.ring.members().map(str::to_owned).collect())
            .unwrap_or_default();
        v.sort();
        v
    }

    /// Send to a service by id.
    pub fn send(&self, group: &str, id: &str, msg: &C::Msg) -> Result<(), BackendError> {
        self.service(group, id)
            .ok_or(BackendError::NoService)?
            .send(msg)
    }

    /// Send to the connected service that owns `key` on the group's ring.
    pub fn send_by_hash(&self, group: &str, key: &str, msg: &C::Msg) -> Result<(), BackendError> {
        self.service_by_hash(group, key)
            .ok_or(BackendError::NoService)?
            .send(msg)
    }

    /// Send to the connected service with tag `tag` that owns `key` on that tag's ring.
    pub fn send_by_tag_and_hash(
        &self,
        group: &str,
        tag: &str,
        key: &str,
        msg: &C::Msg,
    ) -> Result<(), BackendError> {
        self.service_by_tag_and_hash(group, tag, key)
            .ok_or(BackendError::NoService)?
            .send(msg)
    }

    /// Send to every connected service of a group, encoding once; how many took it. A service
    /// that is not connected or whose queue is full is skipped.
    pub fn broadcast(&self, group: &str, msg: &C::Msg) -> Result<usize, BackendError> {
        let bytes = self.encode(msg)?;
        Ok(self
            .services(group)
            .iter()
            .filter(|s| s.send_raw(&bytes).is_ok())
            .count())
    }

    /// Send to every connected service of every group, encoding once; how many took it.
    pub fn broadcast_all(&self, msg: &C::Msg) -> Result<usize, BackendError> {
        let bytes = self.encode(msg)?;
        let all: Vec<Service<C>> = {
            let groups = self.shared.groups.read();
            groups
                .values()
                .flat_map(|g| g.services.values().cloned())
                .collect()
        };
        Ok(all.iter().filter(|s| s.send_raw(&bytes).is_ok()).count())
    }

    fn encode(&self, msg: &C::Msg) -> Result<BytesMut, BackendError> {
        let mut out = BytesMut::new();
        self.shared
            .codec
            .encode(msg, &mut out)
            .map_err(BackendError::Encode)?;
        Ok(out)
    }

    /// Call a service by id ([`Service::call`]).
    pub async fn call(
        &self,
        group: &str,
        id: &str,
        rpc_id: RpcId,
        msg: &C::Msg,
        timeout: Duration,
    ) -> Result<C::Msg, BackendError> {
        let svc = self.service(group, id).ok_or(BackendError::NoService)?;
        svc.call(rpc_id, msg, timeout).await
    }

    /// Call the connected service that owns `key` on the group's ring ([`Service::call`]).
    pub async fn call_by_hash(
        &self,
        group: &str,
        key: &str,
        rpc_id: RpcId,
        msg: &C::Msg,
        timeout: Duration,
    ) -> Result<C::Msg, BackendError> {
        let svc = self
            .service_by_hash(group, key)
            .ok_or(BackendError::NoService)?;
        svc.call(rpc_id, msg, timeout).await
    }

    /// Close every service (each fires `on_disconnect` if it was connected, then `on_remove`),
    /// end every waiting call with `close`, and wait for their tasks.
    pub async fn shutdown(&self) {
        self.shared.cancel.cancel();
        self.shared.tracker.close();
        self.shared.tracker.wait().await;
        self.shared.groups.write().clear();
    }
}

//! The `[[backend]]` groups of a node's config, started as they are: each table a
//! [`Backends`] of its codec, fed its static service list, or the live members of a registry
//! key (`discovery = "registry"`), through the same [`Backends::update`] call; with the
//! gobase sample's heartbeat when the table asks for it (`heartbeat_s`), so the sample runs
//! from config alone.

use std::time::{Duration, Instant};

use futures_util::future::BoxFuture;
use tokio_util::sync::CancellationToken;
use warren::config::{
    BackendCodec, BackendConfig, BackendDiscovery, BackendKind, BackendServiceConfig,
};
use warren_proto::backend_frame::{HEARTBEAT_REQ_ID, HEARTBEAT_RESP_ID};

use super::discovery::{self, MemberFilter, NatsKvSource, RedisSource};
use super::{
    BackendOptions, Backends, GobaseTestCodec, Hooks, HttpBackends, HttpOptions, RpcId, Service,
    ServiceConf, TestMsg,
};
use crate::redis::GobaseLayout;

/// A config-built group: the gobase test codec and the hooks of [`ConfiguredHooks`].
pub type ConfiguredGroup = Backends<GobaseTestCodec, ConfiguredHooks>;

/// The rpc id of the sample heartbeat call: a configured group's calls wait for the msgid of
/// their answer (the heartbeat's is 2).
const HEARTBEAT_RPC: RpcId = HEARTBEAT_RESP_ID as RpcId;

/// Where a configured group's messages that answer no call go: the module plugins'
/// `on_backend_msg` (docs/plugins.md), set once the node runs ([`ConfiguredBackends::set_sink`]).
/// Its future says whether anything took the frame: one nobody took is counted
/// (`warren_backend_frames_unhandled_total{group}`), so dropped frames show.
pub type MsgSink = std::sync::Arc<
    dyn Fn(&Service<GobaseTestCodec>, TestMsg) -> BoxFuture<'static, bool> + Send + Sync,
>;

/// The sink of a group's hooks, empty until set.
#[derive(Clone, Default)]
struct Sink(std::sync::Arc<std::sync::OnceLock<MsgSink>>);

impl std::fmt::Debug for Sink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(if self.0.get().is_some() {
            "Sink(set)"
        } else {
            "Sink(empty)"
        })
    }
}

/// The hooks a `[[backend]]` table can ask for: the gobase sample heartbeat; calls answered by
/// the frame whose msgid is the call's rpc id; the other frames to a sink (the plugins).
#[derive(Debug, Clone, Default)]
pub struct ConfiguredHooks {
    /// Where frames that answer no call go.
    sink: Sink,
    /// Period and timeout of the heartbeat call, if the table has one.
    heartbeat: Option<(Duration, Duration)>,
    /// When each service was last sent a heartbeat (only read by its own delivery task).
    last: std::sync::Arc<parking_lot::Mutex<std::collections::HashMap<String, Instant>>>,
}

impl ConfiguredHooks {
    /// The hooks of one table.
    pub fn for_table(c: &BackendConfig) -> Self {
        ConfiguredHooks {
            heartbeat: (c.heartbeat_s > 0).then(|| {
                (
                    Duration::from_secs(c.heartbeat_s),
                    Duration::from_secs(c.heartbeat_timeout_s.max(1)),
                )
            }),
            last: Default::default(),
            sink: Sink::default(),
        }
    }

    fn due(&self, svc: &Service<GobaseTestCodec>, every: Duration) -> bool {
        let mut last = self.last.lock();
        let now = Instant::now();
        match last.get(svc.id()) {
            // ticks come every second: allow for their jitter
            Some(t) if now.duration_since(*t) + Duration::from_millis(500) < every => false,
            _ => {
                last.insert(svc.id().to_owned(), now);
                true
            }
        }
    }
}

impl Hooks<GobaseTestCodec> for ConfiguredHooks {
    fn check_rpc_resp(&self, msg: &TestMsg) -> Option<RpcId> {
        // a frame no call waits for goes on to `on_msg`
        Some(RpcId::from(msg.msgid))
    }

    async fn on_msg(&self, svc: &Service<GobaseTestCodec>, msg: TestMsg) {
        if self.heartbeat.is_some() && msg.msgid == HEARTBEAT_RESP_ID {
            return; // a heartbeat answered after its call ended
        }
        let msgid = msg.msgid;
        let taken = match self.sink.0.get() {
            Some(sink) => sink(svc, msg).await,
            None => false,
        };
        if !taken {
            metrics::counter!("warren_backend_frames_unhandled_total", "group" => svc.name().to_owned())
                .increment(1);
            tracing::debug!(group = %svc.name(), service = %svc.id(), msgid, "backend frame no call waits for and no plugin takes: dropped");
        }
    }

    fn on_remove(&self, svc: &Service<GobaseTestCodec>) {
        let mut last = self.last.lock();
        last.remove(svc.id());
    }

    async fn on_tick(&self, svc: &Service<GobaseTestCodec>) {
        let Some((every, timeout)) = self.heartbeat else {
            return;
        };
        if !svc.is_connected() || !self.due(svc, every) {
            return;
        }
        let start = Instant::now();
        let req = TestMsg::heartbeat_request();
        debug_assert_eq!(req.msgid, HEARTBEAT_REQ_ID);
        match svc.call(HEARTBEAT_RPC, &req, timeout).await {
            Ok(answer) => {
                let rtt_us = u64::try_from(start.elapsed().as_micros()).unwrap_or(u64::MAX);
                metrics::counter!("warren_backend_heartbeats_total", "group" => svc.name().to_owned()).increment(1);
                tracing::info!(group = %svc.name(), service = %svc.id(), peer = %svc.peer(), rtt_us, msgid = answer.msgid, "backend heartbeat answered");
            }
            Err(e) => {
                metrics::counter!("warren_backend_heartbeat_failures_total", "group" => svc.name().to_owned()).increment(1);
                tracing::warn!(group = %svc.name(), service = %svc.id(), peer = %svc.peer(), error = %e, "backend heartbeat failed");
            }
        }
    }
}

/// The running `[[backend]]` groups of a node.
#[derive(Default)]
pub struct ConfiguredBackends {
    groups: Vec<(String, ConfiguredGroup)>,
    http: Vec<(String, HttpBackends)>,
    stop: CancellationToken,
}

impl ConfiguredBackends {
    /// Start every `[[backend]]` table's group (the config was validated): services are dialled
    /// in the background, connects and disconnects logged. A table with `discovery =
    /// "registry"` and no `registry` URL of its own finds no registry here: see
    /// [`ConfiguredBackends::start_with_registry`]. Must be called within a tokio runtime.
    pub fn start(configs: &[BackendConfig]) -> Self {
        Self::start_with_registry(configs, "").unwrap_or_else(|e| {
            tracing::error!(error = %e, "backend groups not started");
            ConfiguredBackends::default()
        })
    }

    /// Start every `[[backend]]` table's group; a table with `discovery = "registry"` and no
    /// `registry` of its own watches `node_registry` (the node's registry URL). Fails, before
    /// starting anything, when such a table has no Redis registry to read.
    pub fn start_with_registry(
        configs: &[BackendConfig],
        node_registry: &str,
    ) -> Result<Self, String> {
        let mut sources = Vec::with_capacity(configs.len());
        for c in configs {
            sources.push(source(c, node_registry)?);
        }
        let stop = CancellationToken::new();
        let mut groups = Vec::new();
        let mut http = Vec::new();
        for (c, src) in configs.iter().zip(sources) {
            let group = c.group_name();
            let filter = MemberFilter {
                group: group.clone(),
                scheme: c.member_scheme().unwrap_or_default(),
            };
            match c.kind {
                BackendKind::Tcp => {
                    let codec = match c.codec {
                        BackendCodec::GobaseTest => GobaseTestCodec::new(c.max_body),
                    };
                    let b = Backends::new(codec, ConfiguredHooks::for_table(c), options(c));
                    let feed = b.clone();
                    follow(src, &group, c, move |g, s| feed.update(g, s), filter, &stop);
                    groups.push((group, b));
                }
                BackendKind::Http => {
                    let b = HttpBackends::new(http_options(c))
                        .map_err(|e| format!("[[backend]] group {:?}: {e}", c.group))?;
                    let feed = b.clone();
                    follow(src, &group, c, move |g, s| feed.update(g, s), filter, &stop);
                    http.push((group, b));
                }
            }
        }
        Ok(ConfiguredBackends { groups, http, stop })
    }

    /// The group of this name (lowercased and trimmed), if a `[[backend]]` table made it.
    pub fn get(&self, group: &str) -> Option<&ConfiguredGroup> {
        let group = warren::ring::normalize(group);
        self.groups
            .iter()
            .find(|(g, _)| *g == group)
            .map(|(_, b)| b)
    }

    /// The HTTP group of this name (lowercased and trimmed), if a `[[backend]]` table with
    /// `kind = "http"` made it.
    pub fn get_http(&self, group: &str) -> Option<&HttpBackends> {
        let group = warren::ring::normalize(group);
        self.http.iter().find(|(g, _)| *g == group).map(|(_, b)| b)
    }

    /// Hand every TCP group's frames that answer no call to `sink` (the module plugins'
    /// `on_backend_msg`); a second call changes nothing.
    pub fn set_sink(&self, sink: MsgSink) {
        for (_, b) in &self.groups {
            let _ = b.hooks().sink.0.set(sink.clone());
        }
    }

    /// Whether the config has no `[[backend]]` table.
    pub fn is_empty(&self) -> bool {
        self.groups.is_empty() && self.http.is_empty()
    }

    /// Stop watching the registries, close every service of every group and wait for them.
    pub async fn shutdown(&self) {
        self.stop.cancel();
        for (_, b) in &self.groups {
            b.shutdown().await;
        }
        for (_, b) in &self.http {
            b.shutdown().await;
        }
    }
}

/// Where a registry table's services come from.
enum Source {
    Redis(RedisSource),
    NatsKv(NatsKvSource),
    #[cfg(feature = "etcd")]
    Etcd(super::discovery_etcd::EtcdSource),
}

impl Source {
    /// Start the watcher feeding `update`.
    fn spawn(
        self,
        update: impl Fn(&str, Vec<ServiceConf>) + Send + Sync + 'static,
        filter: MemberFilter,
        stop: CancellationToken,
    ) {
        match self {
            Source::Redis(src) => {
                tokio::spawn(discovery::watch_redis_with(update, src, filter, stop));
            }
            Source::NatsKv(src) => {
                tokio::spawn(discovery::watch_nats_kv(update, src, filter, stop));
            }
            #[cfg(feature = "etcd")]
            Source::Etcd(src) => {
                tokio::spawn(super::discovery_etcd::watch_etcd(update, src, filter, stop));
            }
        }
    }
}

/// Feed the group of table `c` its services through `update`: its static list now, or what its
/// registry lists from now on (a table without a `registry` of its own reads `node_registry`)
/// until `stop`. Fails, before starting anything, when a registry table has no registry to read.
/// The gate proxy's groups are fed this way too (crate::proxy).
pub(crate) fn feed_table(
    c: &BackendConfig,
    node_registry: &str,
    update: impl Fn(&str, Vec<ServiceConf>) + Send + Sync + 'static,
    stop: &CancellationToken,
) -> Result<(), String> {
    let src = source(c, node_registry)?;
    let filter = MemberFilter {
        group: c.group_name(),
        scheme: c.member_scheme().unwrap_or_default(),
    };
    follow(src, &c.group_name(), c, update, filter, stop);
    Ok(())
}

/// Feed a group its services: the table's static list now, or what its registry source lists
/// from now on.
fn follow(
    src: Option<Source>,
    group: &str,
    c: &BackendConfig,
    update: impl Fn(&str, Vec<ServiceConf>) + Send + Sync + 'static,
    filter: MemberFilter,
    stop: &CancellationToken,
) {
    match src {
        None => update(group, services(c)),
        Some(src) => src.spawn(update, filter, stop.child_token()),
    }
}

fn source(c: &BackendConfig, node_registry: &str) -> Result<Option<Source>, String> {
    if c.discovery != BackendDiscovery::Registry {
        return Ok(None);
    }
    let own = !c.registry.trim().is_empty();
    let url = if own {
        c.registry.trim()
    } else {
        node_registry.trim()
    };
    let key = c.key.trim().to_owned();
    if url.starts_with("redis://") || url.starts_with("rediss://") {
        let layout = GobaseLayout::from_name(&c.layout).ok_or_else(|| {
            format!(
                "[[backend]] group {:?}: unknown layout {:?}",
                c.group, c.layout
            )
        })?;
        return Ok(Some(Source::Redis(RedisSource {
            url: url.to_owned(),
            key,
            layout,
        })));
    }
    if url.starts_with("nats://") {
        return Ok(Some(Source::NatsKv(NatsKvSource {
            url: url.to_owned(),
            bucket: key,
        })));
    }
    if url.starts_with("etcd://") {
        #[cfg(feature = "etcd")]
        return Ok(Some(Source::Etcd(super::discovery_etcd::EtcdSource {
            url: url.to_owned(),
            prefix: key,
        })));
        #[cfg(not(feature = "etcd"))]
        return Err(format!(
            "[[backend]] group {:?}: an etcd:// registry needs a binary built with the `etcd` feature",
            c.group
        ));
    }
    Err(format!(
        "[[backend]] group {:?}: discovery = \"registry\" reads a redis://, nats:// or etcd:// registry, and the {} is {:?} (set the table's registry, [registry] url or --registry)",
        c.group,
        if own {
            "table's registry"
        } else {
            "node's registry"
        },
        if url.is_empty() { "memory" } else { url }
    ))
}

/// A table's options.
pub fn options(c: &BackendConfig) -> BackendOptions {
    BackendOptions {
        dial_timeout: Duration::from_secs(c.dial_timeout_s),
        msg_seq: c.msg_seq,
        immediately: c.immediately,
        queue_bytes: c.queue_bytes,
        ..BackendOptions::default()
    }
}

/// An HTTP table's probe: the port check (3 s) and its `health_path`.
pub fn http_options(c: &BackendConfig) -> HttpOptions {
    let path = c.health_path.trim();
    HttpOptions {
        health_path: (!path.is_empty()).then(|| path.to_owned()),
        ..HttpOptions::default()
    }
}

/// A table's static service list, each record in its group (an empty `servicename` is the
/// table's `group`).
pub fn services(c: &BackendConfig) -> Vec<ServiceConf> {
    c.services.iter().map(|s| service(c, s)).collect()
}

fn service(c: &BackendConfig, s: &BackendServiceConfig) -> ServiceConf {
    let name = if s.servicename.trim().is_empty() {
        c.group.clone()
    } else {
        s.servicename.clone()
    };
    ServiceConf::new(name, &s.serviceid, &s.serviceaddr, s.serviceport).with_tag(&s.routertag)
}

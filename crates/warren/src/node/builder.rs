//! [`NodeBuilder`]: from a validated config and module definitions to a running [`Node`].

use super::*;
use crate::config::{ConfigError, LineHandler, ListenerConfig};
#[cfg(feature = "mqtt-store")]
use crate::mqtt_store::{MqttStore, StoreError, StoreOptions};

/// The listeners' configs as the gate binds them, and the line listeners among them that have a
/// channel handler of their own.
type LineHandlers = (
    Vec<Arc<ListenerConfig>>,
    Vec<(Arc<ListenerConfig>, Arc<dyn ChannelHandler>)>,
);

/// Assembles a node from its config and module definitions.
pub struct NodeBuilder {
    pub(super) config: Config,
    pub(super) modules: Vec<(Module, ModuleConfig)>,
    pub(super) auth: Option<Arc<dyn AuthHook>>,
    pub(super) channel_handler: Option<Arc<dyn ChannelHandler>>,
    /// Handlers of particular line listeners, by their index in `config.listeners`.
    pub(super) line_handlers: Vec<(usize, Arc<dyn ChannelHandler>)>,
    pub(super) transport: Option<Arc<dyn BusTransport>>,
    pub(super) registry: Option<Arc<dyn Registry>>,
    pub(super) hooks: Vec<ClusterHook>,
    pub(super) route_keys: Vec<(String, RouteKeyFn)>,
    pub(super) shared_retained: Option<crate::retained::SharedRetained>,
}

impl NodeBuilder {
    /// A builder for this (already validated) config.
    pub fn new(config: Config) -> Self {
        NodeBuilder {
            config,
            modules: Vec::new(),
            auth: None,
            channel_handler: None,
            line_handlers: Vec::new(),
            transport: None,
            registry: None,
            hooks: Vec::new(),
            route_keys: Vec::new(),
            shared_retained: None,
        }
    }

    /// Carry calls to other nodes over this broker (NATS, Redis, RabbitMQ: crate
    /// `warren-cluster`). Without it every call stays in this process.
    pub fn transport(mut self, transport: Arc<dyn BusTransport>) -> Self {
        self.transport = Some(transport);
        self
    }

    /// Announce this node and learn about the others in this registry (default: in memory).
    pub fn registry(mut self, registry: Arc<dyn Registry>) -> Self {
        self.registry = Some(registry);
        self
    }

    /// Call `hook` whenever a node joins, leaves or changes.
    pub fn on_cluster_change(
        mut self,
        hook: impl Fn(&ClusterEvent) + Send + Sync + 'static,
    ) -> Self {
        self.hooks.push(Arc::new(hook));
        self
    }

    /// Route calls to module type `module` with a custom router (see [`RouteKeyFn`]). Install it
    /// on every node that calls the module, the gate first of all.
    pub fn route_key(mut self, module: &str, f: RouteKeyFn) -> Self {
        self.route_keys.push((module.to_owned(), f));
        self
    }

    /// Share the retained messages of default-mode MQTT with the other gates of the cluster
    /// through this copy (crate `warren-cluster`'s NATS KV or Redis one): loaded at start, written
    /// for every change made on this gate. Used only with a [`NodeBuilder::transport`].
    pub fn shared_retained(mut self, shared: crate::retained::SharedRetained) -> Self {
        self.shared_retained = Some(shared);
        self
    }

    /// Run an instance of `module` with these settings.
    pub fn module(mut self, module: Module, config: ModuleConfig) -> Self {
        self.modules.push((module, config));
        self
    }

    /// Check client credentials with this hook, on every protocol, before the methods of
    /// `[auth]` (see [`crate::auth`]). Without a hook or a method, everyone is let in.
    pub fn auth(mut self, hook: Arc<dyn AuthHook>) -> Self {
        self.auth = Some(hook);
        self
    }

    /// Bind line listeners (without `handler = "router"`) to this channel handler instead of the
    /// built-in echo; a listener given its own with [`NodeBuilder::listener_channel_handler`]
    /// keeps that one.
    pub fn channel_handler(mut self, handler: Arc<dyn ChannelHandler>) -> Self {
        self.channel_handler = Some(handler);
        self
    }

    /// Bind the line listener `config.listeners[index]` to this channel handler: what a
    /// listener's `plugin` key asks for (the plugin loaded by crate `warren-plugin`). Each line
    /// listener may have its own; [`NodeBuilder::start`] refuses an index that is not a line
    /// listener answering through a channel handler, and a listener whose `plugin` was given
    /// no handler.
    pub fn listener_channel_handler(
        mut self,
        index: usize,
        handler: Arc<dyn ChannelHandler>,
    ) -> Self {
        self.line_handlers.retain(|(i, _)| *i != index);
        self.line_handlers.push((index, handler));
        self
    }

    /// The listeners as the gate binds them, each with the channel handler it was given; an
    /// error when a handler was given to a listener that cannot use one, or a plugin was given
    /// no handler.
    fn bind_line_handlers(
        cfg: &Config,
        given: Vec<(usize, Arc<dyn ChannelHandler>)>,
    ) -> Result<LineHandlers, NodeError> {
        let listeners: Vec<Arc<ListenerConfig>> =
            cfg.listeners.iter().map(|l| Arc::new(l.clone())).collect();
        let mut bound = Vec::new();
        for (index, handler) in given {
            let takes_one = listeners
                .get(index)
                .and_then(|l| l.protocol.line())
                .is_some_and(|o| o.handler == LineHandler::Echo);
            if !takes_one {
                return Err(ConfigError::invalid(
                    format!("listener[{index}]"),
                    "a channel handler was given for it, but it is not a line listener answering through one",
                )
                .into());
            }
            bound.push((listeners[index].clone(), handler));
        }
        for (i, l) in listeners.iter().enumerate() {
            let plugin = l.protocol.line().and_then(|o| o.plugin.as_deref());
            if let Some(path) = plugin
                && !bound.iter().any(|(b, _)| Arc::ptr_eq(b, l))
            {
                return Err(ConfigError::invalid(
                    format!("listener[{i}].plugin"),
                    format!(
                        "{path}: nothing loaded this plugin (the warren binary does; a program of \
                         its own loads it with warren-plugin and gives it to \
                         NodeBuilder::listener_channel_handler)"
                    ),
                )
                .into());
            }
        }
        Ok((listeners, bound))
    }

    /// Open the MQTT store of `[mqtt] store`, if set, on a blocking thread (the open checks
    /// the whole file). Its records may be as large as the largest packet an MQTT listener
    /// takes.
    #[cfg(feature = "mqtt-store")]
    async fn open_mqtt_store(cfg: &Config) -> Result<Option<MqttStore>, NodeError> {
        let Some(path) = cfg.mqtt.store.clone() else {
            return Ok(None);
        };
        let mut options = StoreOptions::default();
        let largest = cfg
            .listeners
            .iter()
            .filter_map(|l| l.protocol.mqtt())
            .map(|o| o.max_packet())
            .max()
            .unwrap_or(0);
        // a PUBLISH of `max_packet` bytes, plus the client id and the record's own fields
        options.max_value = options.max_value.max(largest.saturating_add(64 << 10));
        let opened = {
            let path = path.clone();
            tokio::task::spawn_blocking(move || MqttStore::open(path, options)).await
        };
        match opened {
            Ok(store) => Ok(Some(store?)),
            Err(e) => Err(StoreError::Open {
                path,
                reason: format!("the opening thread failed: {e}"),
            }
            .into()),
        }
    }

    /// Hand the durable store to the default-mode MQTT state and fill that state from it: the
    /// retained messages (under the `[limits]` caps) and the persistent sessions with their
    /// subscriptions (back in the trie, so messages published before their client reconnects
    /// are queued for them), queued messages and QoS 2 ids awaiting PUBREL. Every change from
    /// then on is written through (crate::mqtt_session, "Durability"). A store that cannot be
    /// read stops the node.
    #[cfg(feature = "mqtt-store")]
    fn restore_mqtt(gate: &Gate, store: &MqttStore, cfg: &Config) -> Result<(), NodeError> {
        use crate::fanout::Subscriber;
        use crate::mqtt_session::SessionLimits;
        let retained = store.retained()?;
        let stored = retained.len();
        let kept = gate
            .broker
            .retained
            .load(retained.into_iter().map(|r| (r.topic, r.qos, r.payload)));
        if kept < stored {
            tracing::warn!(
                stored,
                kept,
                "retained messages past [limits] max_retained_messages / max_retained_bytes \
                 were not loaded"
            );
        }
        metrics::gauge!("warren_retained_messages").set(kept as f64);
        if !gate.broker.retained.set_backend(Arc::new(store.clone())) {
            tracing::warn!(
                "the retained messages already have a backend; the MQTT store does not keep them"
            );
        }
        let subs = gate.node.subscriptions();
        subs.sessions().set_backend(store.clone());
        let limits = SessionLimits::from_config(&cfg.limits);
        let now = std::time::Instant::now();
        let (mut sessions, mut messages) = (0usize, 0usize);
        for s in store.sessions()? {
            let queued = store.queued(&s.client_id)?;
            let awaiting = store.awaiting_release(&s.client_id)?;
            messages += queued.len();
            sessions += 1;
            let state = subs.sessions().restore(&s, queued, awaiting, limits, now);
            for (filter, qos) in &s.subscriptions {
                // what the node held before it stopped, whatever the caps are now
                let _ = subs.subscribe_within(
                    filter,
                    Subscriber::Stored(state.clone()),
                    *qos,
                    usize::MAX,
                    usize::MAX,
                );
            }
        }
        tracing::info!(
            path = %store.path().display(),
            retained = kept,
            sessions,
            queued_messages = messages,
            "MQTT state restored from the store"
        );
        Ok(())
    }

    /// Start modules, register, bind listeners.
    pub async fn start(self) -> Result<Node, NodeError> {
        let cfg = self.config;
        let (listener_configs, line_handlers) =
            NodeBuilder::bind_line_handlers(&cfg, self.line_handlers)?;
        // before anything starts: a store that does not open stops the node here
        #[cfg(feature = "mqtt-store")]
        let mqtt_store = NodeBuilder::open_mqtt_store(&cfg).await?;
        let authenticator = Arc::new(Authenticator::from_config(&cfg.auth, self.auth)?);
        let acl = match &cfg.auth.acl_file {
            Some(path) => Some(Arc::new(crate::acl::Acl::load(path)?)),
            None => None,
        };
        let bus = Arc::new(LocalBus::default());
        let remote = self.transport.map(|t| RemoteBus::new(&cfg.node.id, t));
        let carrier: Arc<dyn Bus> = match &remote {
            Some(r) => r.clone(),
            None => bus.clone(),
        };
        let registry: Arc<dyn Registry> = self
            .registry
            .unwrap_or_else(|| Arc::new(MemoryRegistry::default()));
        let sessions = Arc::new(
            SessionTable::new(cfg.node.gate_id.as_str().into())
                .with_uid_conflict(cfg.auth.uid_conflict),
        );
        let groups = Arc::new(Groups::with_limit(cfg.limits.max_groups_per_session));
        let shared = Arc::new(NodeShared {
            id: cfg.node.id.as_str().into(),
            router: Router::with_local(carrier, &cfg.node.id, bus.clone()),
            bus: bus.clone(),
            remote: remote.clone(),
            registry: registry.clone(),
            sessions: sessions.clone(),
            groups: groups.clone(),
            subscriptions: Subscriptions::default(),
            call_timeout: Duration::from_secs(cfg.node.call_timeout_s),
        });
        for (m, f) in self.route_keys {
            shared.router.set_route_key(&m, f);
        }
        let handle = NodeHandle { inner: shared };
        let module_tasks = TaskTracker::new();
        let stop_modules = CancellationToken::new();

        let mqtt_slot = Arc::new(gate::BrokerSlot::default());
        let mut all = vec![(gate_module(sessions.clone(), groups, mqtt_slot.clone()), {
            let mut m = ModuleConfig::new("Gate");
            m.id = Some(cfg.node.gate_id.clone());
            m
        })];
        all.extend(self.modules);
        let mut instances = Vec::new();
        let mut records = Vec::new();
        {
            // refuse to start a second copy of an instance that already runs elsewhere
            let live = registry.watch().borrow().clone();
            for (_, mcfg) in &all {
                let id = mcfg.instance_id();
                if let Some(n) = live
                    .iter()
                    .find(|n| n.id != cfg.node.id && n.instances.iter().any(|i| i.id == id))
                {
                    return Err(NodeError::DuplicateInstance {
                        instance: id,
                        node: n.id.clone(),
                    });
                }
            }
        }
        for (module, mcfg) in all {
            let module = match mcfg.execution {
                Some(e) if e != module.execution() => module.with_execution(e),
                _ => module,
            };
            let info = Arc::new(InstanceInfo {
                module: module.name().into(),
                id: mcfg.instance_id().into(),
                settings: mcfg.settings_json(),
            });
            let inst = Instance::start(
                module.clone(),
                info.clone(),
                handle.services(),
                cfg.node.mailbox,
                &module_tasks,
            );
            inst.init(handle.services())
                .await
                .map_err(|error| NodeError::Init {
                    module: info.id.to_string(),
                    error,
                })?;
            records.push(InstanceRecord {
                module: info.module.to_string(),
                id: info.id.to_string(),
                client_handlers: module.client_handlers(),
                login_handlers: module.login_handlers(),
                tags: mcfg.tags.clone(),
                sticky: mcfg.sticky,
                watches_sessions: module.wants_session_closed(),
                queue_group: mcfg.queue_group,
            });
            bus.attach(inst.clone());
            instances.push(inst);
        }
        let record = NodeRecord {
            id: cfg.node.id.clone(),
            version: env!("CARGO_PKG_VERSION").into(),
            address: None,
            started_at_ms: SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(0, |d| d.as_millis() as u64),
            tags: vec![],
            instances: records,
        };
        let stop_bus = CancellationToken::new();
        if let Some(r) = &remote {
            r.serve(bus.clone(), stop_bus.clone()).await?;
            let mut grouped: Vec<&str> = record
                .instances
                .iter()
                .filter(|i| i.queue_group)
                .map(|i| i.module.as_str())
                .collect();
            grouped.sort_unstable();
            grouped.dedup();
            for module in grouped {
                if r.has_groups() {
                    r.join_group(bus.clone(), module, stop_bus.clone()).await?;
                    tracing::info!(module, "taking calls from the module's queue group");
                } else {
                    tracing::warn!(
                        module,
                        bus = r.transport_kind(),
                        "queue_group is set but this bus has no queue groups: calls are routed by the ring"
                    );
                }
            }
        }
        let own_record = record.clone();
        registry.register(record).await?;
        let mut watch = registry.watch();
        let apply = {
            let h = handle.clone();
            let own = own_record;
            move |nodes: &Arc<Vec<NodeRecord>>| {
                // our own record is routable at once, before the registry echoes it back
                let mut list = Vec::clone(nodes);
                if !list.iter().any(|n| n.id == own.id) {
                    list.push(own.clone());
                }
                h.inner.router.refresh(&list);
                metrics::gauge!("warren_cluster_nodes").set(list.len() as f64);
                if let Some(r) = &h.inner.remote {
                    let live: HashSet<&str> = list.iter().map(|n| n.id.as_str()).collect();
                    r.retain_nodes(&live);
                }
                list
            }
        };
        let mut known = apply(&watch.borrow_and_update());
        {
            let hooks = self.hooks;
            let stop = stop_modules.clone();
            let node_id = cfg.node.id.clone();
            module_tasks.spawn(async move {
                loop {
                    tokio::select! {
                        _ = stop.cancelled() => break,
                        r = watch.changed() => {
                            if r.is_err() { break; }
                            let nodes = watch.borrow_and_update().clone();
                            let now = apply(&nodes);
                            for ev in cluster_events(&known, &now) {
                                let change = match &ev {
                                    ClusterEvent::Joined(_) => "joined",
                                    ClusterEvent::Left(_) => "left",
                                    ClusterEvent::Changed(_) => "changed",
                                };
                                metrics::counter!("warren_registry_changes_total", "change" => change).increment(1);
                                match &ev {
                                    ClusterEvent::Joined(n) if n.id != node_id => tracing::info!(node = %n.id, instances = n.instances.len(), "node joined"),
                                    ClusterEvent::Left(n) => tracing::info!(node = %n.id, "node left"),
                                    ClusterEvent::Changed(n) => tracing::info!(node = %n.id, "node changed"),
                                    ClusterEvent::Joined(_) => {}
                                }
                                for hook in &hooks {
                                    hook(&ev);
                                }
                            }
                            known = now;
                        }
                    }
                }
            });
        }
        for inst in &instances {
            inst.run(handle.services(), stop_modules.child_token(), &module_tasks);
        }

        let gate = Arc::new(Gate::new(
            Arc::new(handle.clone()),
            &cfg,
            authenticator,
            self.channel_handler,
            line_handlers,
        ));
        gate.acl.store(acl);
        // before any client: the retained messages and persistent sessions of the last run
        #[cfg(feature = "mqtt-store")]
        if let Some(store) = &mqtt_store {
            NodeBuilder::restore_mqtt(&gate, store, &cfg)?;
        }
        // then the cluster's: forwards between gates, the shared retained messages (over the
        // node's own copy)
        mqtt_slot.set(&gate.broker);
        if remote.is_some() {
            gate::join_cluster(&gate, self.shared_retained);
        }
        let mut listeners = Vec::new();
        for l in listener_configs {
            let bound = gate::listen(gate.clone(), l.clone())
                .await
                .map_err(|source| NodeError::Bind {
                    addr: l.addr.clone(),
                    source,
                })?;
            tracing::info!(listener = %bound.describe(), "listening");
            listeners.push(bound);
        }
        tracing::info!(
            bus = remote.as_ref().map_or("local", |r| r.transport_kind()),
            registry = registry.kind(),
            "node started"
        );
        Ok(Node {
            handle,
            gate,
            listeners,
            instances,
            module_tasks,
            stop_modules,
            stop_bus,
            drain_timeout: Duration::from_secs(cfg.node.drain_timeout_s),
            #[cfg(feature = "mqtt-store")]
            mqtt_store,
        })
    }
}

#[cfg(feature = "mqtt-store")]
impl Node {
    /// The durable MQTT store (`[mqtt] store`), opened at start; `None` when the key is unset.
    /// This is what retained messages, persistent sessions and their QoS 1/2 queues are kept
    /// in across restarts (see [`crate::mqtt_store`] for which write goes with which MQTT
    /// event); the default-mode MQTT state takes a clone of the handle. It is closed, with
    /// every queued write committed, when the node and every clone are dropped.
    pub fn mqtt_store(&self) -> Option<&MqttStore> {
        self.mqtt_store.as_ref()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gate::{Channel, EchoHandler};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// Answers every message with a prefix, to tell which handler a listener reached.
    struct Prefixed(&'static str);

    impl ChannelHandler for Prefixed {
        fn handle_msg(&self, channel: &Channel, msg: Bytes) {
            let mut out = self.0.as_bytes().to_vec();
            out.extend_from_slice(&msg);
            channel.send(out);
        }
    }

    fn config(urls: &[&str]) -> Config {
        let mut c = Config::default();
        c.http.enabled = false;
        c.listeners = urls
            .iter()
            .map(|u| ListenerConfig::from_url(u).expect("a listener URL"))
            .collect();
        c
    }

    async fn line_round_trip(addr: std::net::SocketAddr, msg: &str) -> String {
        let mut s = tokio::net::TcpStream::connect(addr)
            .await
            .expect("connects");
        s.write_all(format!("{}\r\n{msg}", msg.len()).as_bytes())
            .await
            .expect("writes");
        // one reply: `<len> \r\n` and len bytes
        let complete = |got: &[u8]| {
            let text = String::from_utf8_lossy(got);
            text.split_once(" \r\n")
                .is_some_and(|(len, body)| len.parse::<usize>().is_ok_and(|n| body.len() >= n))
        };
        let mut got = Vec::new();
        let mut buf = [0u8; 256];
        while !complete(&got) {
            let n = s.read(&mut buf).await.expect("reads");
            assert!(n > 0, "closed after {got:?}");
            got.extend_from_slice(&buf[..n]);
        }
        String::from_utf8_lossy(&got).into_owned()
    }

    #[tokio::test]
    async fn each_line_listener_may_have_its_own_channel_handler() {
        let c = config(&[
            "line://127.0.0.1:0",
            "line://127.0.0.1:0",
            "line://127.0.0.1:0?plugin=two.lua",
        ]);
        let node = NodeBuilder::new(c)
            .channel_handler(Arc::new(Prefixed("node:")))
            .listener_channel_handler(2, Arc::new(Prefixed("two:")))
            .listener_channel_handler(1, Arc::new(EchoHandler))
            .start()
            .await
            .expect("starts");
        let addr = |i: usize| node.listeners()[i].local_addr;
        assert_eq!(line_round_trip(addr(0), "hi").await, "7 \r\nnode:hi");
        assert_eq!(line_round_trip(addr(1), "hi").await, "2 \r\nhi");
        assert_eq!(line_round_trip(addr(2), "hi").await, "6 \r\ntwo:hi");
        node.shutdown().await;
    }

    #[cfg(feature = "mqtt-store")]
    #[tokio::test]
    async fn the_mqtt_store_is_opened_at_start_and_a_bad_file_stops_the_node() {
        let dir = std::env::temp_dir().join(format!(
            "warren-node-store-{}-{}",
            std::process::id(),
            uuid::Uuid::new_v4().simple()
        ));
        std::fs::create_dir_all(&dir).expect("a temp dir");
        let mut c = config(&["mqtt://127.0.0.1:0?max_packet=4194304"]);
        let node = NodeBuilder::new(c.clone()).start().await.expect("starts");
        assert!(node.mqtt_store().is_none());
        node.shutdown().await;

        c.mqtt.store = Some(dir.join("mqtt.redb"));
        let node = NodeBuilder::new(c.clone()).start().await.expect("starts");
        let store = node.mqtt_store().expect("a store").clone();
        // records as large as the listener's packets fit
        assert!(store.options().max_value > 4 << 20);
        store
            .put_retained("a/b", 1, Bytes::from_static(b"kept"))
            .await
            .expect("queued")
            .await
            .expect("durable");
        node.shutdown().await;
        drop(store);
        let node = NodeBuilder::new(c.clone()).start().await.expect("starts");
        let kept = node
            .mqtt_store()
            .expect("a store")
            .retained()
            .expect("reads");
        assert_eq!(kept.len(), 1);
        assert_eq!(kept[0].payload, Bytes::from_static(b"kept"));
        node.shutdown().await;

        let bad = dir.join("not-a-store");
        std::fs::write(&bad, vec![0x42u8; 8192]).expect("writes");
        c.mqtt.store = Some(bad.clone());
        let e = NodeBuilder::new(c).start().await.err().expect("refused");
        assert!(matches!(e, NodeError::Store(_)), "{e}");
        assert!(e.to_string().contains(&bad.display().to_string()), "{e}");
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[tokio::test]
    async fn a_plugin_without_a_handler_and_a_handler_without_a_line_listener_are_refused() {
        let e = NodeBuilder::new(config(&["line://127.0.0.1:0?plugin=echo.lua"]))
            .start()
            .await
            .err()
            .expect("refused");
        assert!(
            e.to_string()
                .starts_with("listener[0].plugin: echo.lua: nothing loaded"),
            "{e}"
        );
        for index in [0, 1, 7] {
            let e = NodeBuilder::new(config(&[
                "mqtt://127.0.0.1:0",
                "line://127.0.0.1:0?handler=router",
            ]))
            .listener_channel_handler(index, Arc::new(EchoHandler))
            .start()
            .await
            .err()
            .expect("refused");
            assert!(
                e.to_string()
                    .starts_with(&format!("listener[{index}]: a channel handler")),
                "{e}"
            );
        }
    }
}

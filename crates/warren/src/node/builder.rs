//! [`NodeBuilder`]: from a validated config and module definitions to a running [`Node`].

use super::*;

/// Assembles a node from its config and module definitions.
pub struct NodeBuilder {
    pub(super) config: Config,
    pub(super) modules: Vec<(Module, ModuleConfig)>,
    pub(super) auth: Option<Arc<dyn AuthHook>>,
    pub(super) channel_handler: Option<Arc<dyn ChannelHandler>>,
    pub(super) transport: Option<Arc<dyn BusTransport>>,
    pub(super) registry: Option<Arc<dyn Registry>>,
    pub(super) hooks: Vec<ClusterHook>,
    pub(super) route_keys: Vec<(String, RouteKeyFn)>,
}

impl NodeBuilder {
    /// A builder for this (already validated) config.
    pub fn new(config: Config) -> Self {
        NodeBuilder {
            config,
            modules: Vec::new(),
            auth: None,
            channel_handler: None,
            transport: None,
            registry: None,
            hooks: Vec::new(),
            route_keys: Vec::new(),
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
    /// built-in echo.
    pub fn channel_handler(mut self, handler: Arc<dyn ChannelHandler>) -> Self {
        self.channel_handler = Some(handler);
        self
    }

    /// Start modules, register, bind listeners.
    pub async fn start(self) -> Result<Node, NodeError> {
        let cfg = self.config;
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

        let mut all = vec![(gate_module(sessions.clone(), groups), {
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
        ));
        gate.acl.store(acl);
        let mut listeners = Vec::new();
        for l in &cfg.listeners {
            let l = Arc::new(l.clone());
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
        })
    }
}

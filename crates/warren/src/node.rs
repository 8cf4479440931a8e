//! The node: one process, its modules, its gate, and their shared services.
//!
//! [`NodeBuilder`] takes a validated [`Config`] and the module definitions, starts every instance
//! (init, then run), registers the node, binds the listeners and returns a running [`Node`].
//! [`NodeHandle`] is the cheap clone handlers and connections use to reach the router, the
//! session table, groups and subscriptions. Shutdown drains: stop accepting, let in-flight requests
//! finish up to `drain_timeout_s`, close clients, stop modules.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use serde_json::{Map, Value, json};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::bus::LocalBus;
use crate::config::{Config, ListenerConfig, ModuleConfig};
use crate::error::CallError;
use crate::fanout::{Groups, Subscriptions};
use crate::gate::{self, AuthHook, ChannelHandler, Gate};
use crate::module::{Instance, InstanceInfo, Json, Module, SESSION_CLOSED};
use crate::registry::{InstanceRecord, MemoryRegistry, NodeRecord, Registry};
use crate::router::{Router, Target};
use crate::session::{Session, SessionTable, Transport};

/// Services shared by everything in one node.
pub(crate) struct NodeShared {
    id: Arc<str>,
    router: Router,
    bus: Arc<LocalBus>,
    registry: Arc<dyn Registry>,
    sessions: Arc<SessionTable>,
    groups: Groups,
    subscriptions: Subscriptions,
    call_timeout: Duration,
    closed_watchers: std::sync::RwLock<Vec<Target>>,
}

/// A cheap handle to a node's services: calls, session operations, groups, subscriptions.
#[derive(Clone)]
pub struct NodeHandle {
    inner: Arc<NodeShared>,
}

impl std::fmt::Debug for NodeHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NodeHandle")
            .field("id", &self.inner.id)
            .finish_non_exhaustive()
    }
}

impl NodeHandle {
    /// Node id.
    pub fn id(&self) -> &str {
        &self.inner.id
    }

    /// The router.
    pub fn router(&self) -> &Router {
        &self.inner.router
    }

    /// Session operations (PROTOCOLS.md §1.8) on any session, wherever its gate runs.
    pub fn sessions(&self) -> SessionOps<'_> {
        SessionOps { node: self }
    }

    /// The session table of this node's gate.
    pub fn session_table(&self) -> &Arc<SessionTable> {
        &self.inner.sessions
    }

    /// Named groups of sessions on this node (rooms).
    pub fn groups(&self) -> &Groups {
        &self.inner.groups
    }

    /// Add a session to a group (a room). The session must belong to this node's gate.
    pub fn group_add(&self, group: &str, session: &Session) -> Result<(), CallError> {
        let h = self.inner.sessions.get(&session.id)?;
        self.inner.groups.add(group, &h);
        Ok(())
    }

    /// Remove a session from a group.
    pub fn group_remove(&self, group: &str, session: &str) {
        self.inner.groups.remove(group, session);
    }

    /// Send one message to every member of a group, except `except` (a session id), encoding it
    /// once. Returns the number of members reached.
    pub fn group_broadcast(
        &self,
        group: &str,
        topic: &str,
        body: impl Into<Bytes>,
        except: Option<&str>,
    ) -> usize {
        self.inner.groups.broadcast(
            group,
            Bytes::copy_from_slice(topic.as_bytes()),
            body,
            except,
        )
    }

    /// Plain MQTT subscriptions on this node.
    pub fn subscriptions(&self) -> &Subscriptions {
        &self.inner.subscriptions
    }

    /// Default deadline of calls between modules.
    pub fn call_timeout(&self) -> Duration {
        self.inner.call_timeout
    }

    fn target(&self, module: &str, session: Option<&Session>) -> Result<Target, CallError> {
        let (m, at) = match module.split_once('@') {
            Some((m, at)) => (m, Some(at)),
            None => (module, None),
        };
        let key = session.map_or(self.id(), Session::hash_key);
        self.inner.router.resolve(m, at, key)
    }

    /// Call `module`'s `handler` (module may be `Module@instance` or `Module@node`) and wait for
    /// the reply, up to `timeout` (default: the node's call timeout).
    pub async fn call(
        &self,
        module: &str,
        handler: &str,
        session: Option<Arc<Session>>,
        body: Bytes,
        timeout: Option<Duration>,
    ) -> Result<Bytes, CallError> {
        let target = self.target(module, session.as_deref())?;
        let deadline = Instant::now() + timeout.unwrap_or(self.inner.call_timeout);
        let pending = self
            .inner
            .router
            .send(&target, handler, session, body, deadline, true)
            .await?
            .ok_or(CallError::Closed)?;
        match tokio::time::timeout_at(deadline, pending).await {
            Ok(r) => r,
            Err(_) => Err(CallError::Timeout),
        }
    }

    /// Call without waiting for a result (mqant `CallNR`).
    pub async fn call_nr(
        &self,
        module: &str,
        handler: &str,
        session: Option<Arc<Session>>,
        body: Bytes,
    ) -> Result<(), CallError> {
        let target = self.target(module, session.as_deref())?;
        let deadline = Instant::now() + self.inner.call_timeout;
        self.inner
            .router
            .send(&target, handler, session, body, deadline, false)
            .await
            .map(|_| ())
    }

    /// Tell the modules that asked for it that a session closed.
    pub(crate) async fn session_closed(&self, session: Arc<Session>) {
        let targets = self
            .inner
            .closed_watchers
            .read()
            .map(|v| v.clone())
            .unwrap_or_default();
        for t in targets {
            let deadline = Instant::now() + self.inner.call_timeout;
            let r = self
                .inner
                .router
                .send(
                    &t,
                    SESSION_CLOSED,
                    Some(session.clone()),
                    Bytes::new(),
                    deadline,
                    false,
                )
                .await;
            if let Err(e) = r {
                tracing::debug!(module = %t.module, error = %e, "session-closed notification not delivered");
            }
        }
    }
}

/// Session operations, addressed by the session's gate (mqant `Serverid`): local sessions are
/// edited in place, others through the owning gate's `Gate` module.
#[derive(Debug, Clone, Copy)]
pub struct SessionOps<'a> {
    node: &'a NodeHandle,
}

impl SessionOps<'_> {
    fn local(&self, s: &Session) -> bool {
        *s.gate == **self.node.inner.sessions.gate_id()
    }

    async fn remote(&self, s: &Session, op: &str, args: Value) -> Result<Bytes, CallError> {
        let module = format!("Gate@{}", s.gate);
        let body = Bytes::from(args.to_string());
        self.node
            .call(&module, op, None, body, None)
            .await
            .map_err(|e| match e {
                CallError::ServiceNotFound(_) => CallError::GateNotFound(s.gate.to_string()),
                other => other,
            })
    }

    async fn remote_session(
        &self,
        s: &Session,
        op: &str,
        args: Value,
    ) -> Result<Arc<Session>, CallError> {
        let reply = self.remote(s, op, args).await?;
        let v: Value = serde_json::from_slice(&reply).map_err(|_| CallError::BodyNotJson)?;
        Session::from_export_map(&v, s.transport)
            .map(Arc::new)
            .ok_or_else(|| CallError::App("malformed session from gate".into()))
    }

    /// Bind the session to a user id.
    pub async fn bind(&self, s: &Session, uid: &str) -> Result<Arc<Session>, CallError> {
        if self.local(s) {
            return self.node.inner.sessions.bind(&s.id, uid);
        }
        self.remote_session(s, "Bind", json!([&*s.id, uid])).await
    }

    /// Clear the session's user id.
    pub async fn unbind(&self, s: &Session) -> Result<Arc<Session>, CallError> {
        if self.local(s) {
            return self.node.inner.sessions.unbind(&s.id);
        }
        self.remote_session(s, "UnBind", json!([&*s.id])).await
    }

    /// Set one setting.
    pub async fn set(
        &self,
        s: &Session,
        key: &str,
        value: Value,
    ) -> Result<Arc<Session>, CallError> {
        if self.local(s) {
            return self.node.inner.sessions.set(&s.id, key, value);
        }
        self.remote_session(s, "Set", json!([&*s.id, key, value]))
            .await
    }

    /// Remove one setting.
    pub async fn remove(&self, s: &Session, key: &str) -> Result<Arc<Session>, CallError> {
        if self.local(s) {
            return self.node.inner.sessions.remove_setting(&s.id, key);
        }
        self.remote_session(s, "Remove", json!([&*s.id, key])).await
    }

    /// Replace all settings (mqant `Push`).
    pub async fn push(
        &self,
        s: &Session,
        settings: Map<String, Value>,
    ) -> Result<Arc<Session>, CallError> {
        if self.local(s) {
            return self.node.inner.sessions.push_settings(&s.id, settings);
        }
        self.remote_session(s, "Push", json!([&*s.id, settings]))
            .await
    }

    /// The session as its gate sees it now.
    pub async fn update(&self, s: &Session) -> Result<Arc<Session>, CallError> {
        if self.local(s) {
            return self.node.inner.sessions.update(&s.id);
        }
        self.remote_session(s, "Update", json!([&*s.id])).await
    }

    /// Send a message to the session's client.
    pub async fn send(&self, s: &Session, topic: &str, body: Bytes) -> Result<(), CallError> {
        if self.local(s) {
            return self.node.inner.sessions.send(&s.id, topic, body);
        }
        let text = String::from_utf8_lossy(&body).into_owned();
        self.remote(s, "Send", json!([&*s.id, topic, text]))
            .await
            .map(|_| ())
    }

    /// Close the session's connection.
    pub async fn close(&self, s: &Session) -> Result<(), CallError> {
        if self.local(s) {
            return self.node.inner.sessions.close(&s.id);
        }
        self.remote(s, "Close", json!([&*s.id])).await.map(|_| ())
    }

    /// Live sessions of this node's gate bound to `uid`.
    pub fn find_by_uid(&self, uid: &str) -> Vec<Arc<Session>> {
        self.node
            .inner
            .sessions
            .by_uid(uid)
            .iter()
            .map(|h| h.snapshot())
            .collect()
    }
}

/// The `Gate` module: session operations as RPC handlers, so modules on other nodes (and mqant
/// peers) can reach sessions on this gate (PROTOCOLS.md §1.8).
fn gate_module(table: Arc<SessionTable>) -> Module {
    fn arg(a: &[Value], i: usize) -> &str {
        a.get(i).and_then(Value::as_str).unwrap_or_default()
    }
    fn export(r: Result<Arc<Session>, CallError>) -> Result<Value, CallError> {
        r.map(|s| s.export_map())
    }
    type T = Arc<SessionTable>;
    Module::builder("Gate", table)
        .handler(
            "Bind",
            |cx: crate::Context<T>, Json(a): Json<Vec<Value>>| async move {
                export(cx.state().bind(arg(&a, 0), arg(&a, 1)))
            },
        )
        .handler(
            "UnBind",
            |cx: crate::Context<T>, Json(a): Json<Vec<Value>>| async move {
                export(cx.state().unbind(arg(&a, 0)))
            },
        )
        .handler(
            "Set",
            |cx: crate::Context<T>, Json(a): Json<Vec<Value>>| async move {
                let v = a.get(2).cloned().unwrap_or(Value::Null);
                export(cx.state().set(arg(&a, 0), arg(&a, 1), v))
            },
        )
        .handler(
            "Remove",
            |cx: crate::Context<T>, Json(a): Json<Vec<Value>>| async move {
                export(cx.state().remove_setting(arg(&a, 0), arg(&a, 1)))
            },
        )
        .handler(
            "Push",
            |cx: crate::Context<T>, Json(a): Json<Vec<Value>>| async move {
                let m = a
                    .get(1)
                    .and_then(Value::as_object)
                    .cloned()
                    .unwrap_or_default();
                export(cx.state().push_settings(arg(&a, 0), m))
            },
        )
        .handler(
            "Update",
            |cx: crate::Context<T>, Json(a): Json<Vec<Value>>| async move {
                export(cx.state().update(arg(&a, 0)))
            },
        )
        .handler(
            "Send",
            |cx: crate::Context<T>, Json(a): Json<Vec<Value>>| async move {
                let body = Bytes::from(arg(&a, 2).to_owned());
                cx.state()
                    .send(arg(&a, 0), arg(&a, 1), body)
                    .map(|()| "success")
            },
        )
        .handler(
            "Close",
            |cx: crate::Context<T>, Json(a): Json<Vec<Value>>| async move {
                cx.state().close(arg(&a, 0))
            },
        )
        .build()
}

/// A listener that is accepting clients.
#[derive(Debug, Clone)]
pub struct BoundListener {
    /// Its configuration.
    pub config: Arc<ListenerConfig>,
    /// The address it actually bound (port 0 resolved).
    pub local_addr: SocketAddr,
}

impl BoundListener {
    /// `mqtt+mqant tcp://127.0.0.1:3563`-style description for the startup banner.
    pub fn describe(&self) -> String {
        let t = match Transport::from(self.config.transport()) {
            Transport::Tcp => "tcp",
            Transport::Ws => "ws",
        };
        format!("{} {t}://{}", self.config.scheme(), self.local_addr)
    }
}

/// Why a node did not start.
#[derive(Debug, thiserror::Error)]
pub enum NodeError {
    /// The configuration was refused.
    #[error(transparent)]
    Config(#[from] crate::config::ConfigError),
    /// A listener could not bind.
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        /// Address.
        addr: String,
        /// Cause.
        source: std::io::Error,
    },
    /// A module's init hook failed.
    #[error("module {module} failed to start: {error}")]
    Init {
        /// Instance id.
        module: String,
        /// Its error.
        error: CallError,
    },
    /// The registry refused the node.
    #[error(transparent)]
    Registry(#[from] crate::registry::RegistryError),
}

/// Assembles a node from its config and module definitions.
pub struct NodeBuilder {
    config: Config,
    modules: Vec<(Module, ModuleConfig)>,
    auth: Option<Arc<dyn AuthHook>>,
    channel_handler: Option<Arc<dyn ChannelHandler>>,
}

impl NodeBuilder {
    /// A builder for this (already validated) config.
    pub fn new(config: Config) -> Self {
        NodeBuilder {
            config,
            modules: Vec::new(),
            auth: None,
            channel_handler: None,
        }
    }

    /// Run an instance of `module` with these settings.
    pub fn module(mut self, module: Module, config: ModuleConfig) -> Self {
        self.modules.push((module, config));
        self
    }

    /// Check CONNECT credentials with this hook (the default accepts everyone).
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
        let bus = Arc::new(LocalBus::default());
        let registry: Arc<dyn Registry> = Arc::new(MemoryRegistry::default());
        let sessions = Arc::new(SessionTable::new(cfg.node.gate_id.as_str().into()));
        let shared = Arc::new(NodeShared {
            id: cfg.node.id.as_str().into(),
            router: Router::with_local(bus.clone(), &cfg.node.id, bus.clone()),
            bus: bus.clone(),
            registry: registry.clone(),
            sessions: sessions.clone(),
            groups: Groups::default(),
            subscriptions: Subscriptions::default(),
            call_timeout: Duration::from_secs(cfg.node.call_timeout_s),
            closed_watchers: Default::default(),
        });
        let handle = NodeHandle { inner: shared };
        let module_tasks = TaskTracker::new();
        let stop_modules = CancellationToken::new();

        let mut all = vec![(gate_module(sessions.clone()), {
            let mut m = ModuleConfig::new("Gate");
            m.id = Some(cfg.node.gate_id.clone());
            m
        })];
        all.extend(self.modules);
        let mut instances = Vec::new();
        let mut records = Vec::new();
        let mut watchers = Vec::new();
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
                handle.clone(),
                cfg.node.mailbox,
                &module_tasks,
            );
            inst.init(handle.clone())
                .await
                .map_err(|error| NodeError::Init {
                    module: info.id.to_string(),
                    error,
                })?;
            records.push(InstanceRecord {
                module: info.module.to_string(),
                id: info.id.to_string(),
                client_handlers: module.client_handlers(),
                tags: vec![],
            });
            if module.wants_session_closed() {
                watchers.push(info.id.clone());
            }
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
        registry.register(record).await?;
        let mut watch = registry.watch();
        handle.inner.router.refresh(&watch.borrow_and_update());
        {
            let h = handle.clone();
            let ids = watchers;
            let refresh_watchers = move |h: &NodeHandle| {
                let targets: Vec<Target> = ids
                    .iter()
                    .filter_map(|id| h.inner.router.resolve_instance(id))
                    .collect();
                if let Ok(mut w) = h.inner.closed_watchers.write() {
                    *w = targets;
                }
            };
            refresh_watchers(&h);
            let stop = stop_modules.clone();
            module_tasks.spawn(async move {
                loop {
                    tokio::select! {
                        _ = stop.cancelled() => break,
                        r = watch.changed() => {
                            if r.is_err() { break; }
                            let nodes = watch.borrow_and_update().clone();
                            h.inner.router.refresh(&nodes);
                            refresh_watchers(&h);
                        }
                    }
                }
            });
        }
        for inst in &instances {
            inst.run(handle.clone(), stop_modules.child_token(), &module_tasks);
        }

        let gate = Arc::new(Gate::new(handle.clone(), self.auth, self.channel_handler));
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
        Ok(Node {
            handle,
            gate,
            listeners,
            instances,
            module_tasks,
            stop_modules,
            drain_timeout: Duration::from_secs(cfg.node.drain_timeout_s),
        })
    }
}

/// A running node.
pub struct Node {
    handle: NodeHandle,
    gate: Arc<Gate>,
    listeners: Vec<BoundListener>,
    instances: Vec<Arc<Instance>>,
    module_tasks: TaskTracker,
    stop_modules: CancellationToken,
    drain_timeout: Duration,
}

impl Node {
    /// Start assembling a node.
    pub fn builder(config: Config) -> NodeBuilder {
        NodeBuilder::new(config)
    }

    /// The node's services.
    pub fn handle(&self) -> &NodeHandle {
        &self.handle
    }

    /// The bound listeners, in config order.
    pub fn listeners(&self) -> &[BoundListener] {
        &self.listeners
    }

    /// Drain and stop: refuse new connections, let in-flight requests finish (up to the drain
    /// timeout), close every client, then stop the modules.
    pub async fn shutdown(self) {
        let started = Instant::now();
        tracing::info!(sessions = self.handle.session_table().len(), "draining");
        self.gate.drain();
        if tokio::time::timeout(self.drain_timeout, self.gate.wait())
            .await
            .is_err()
        {
            tracing::warn!("drain timeout passed; closing the remaining connections");
            self.gate.kill();
            let _ = tokio::time::timeout(Duration::from_secs(2), self.gate.wait()).await;
        }
        self.stop_modules.cancel();
        for inst in &self.instances {
            inst.destroy(self.handle.clone()).await;
        }
        let _ = self
            .handle
            .inner
            .registry
            .deregister(&self.handle.inner.id)
            .await;
        self.handle.inner.bus.clear();
        drop(self.instances);
        self.module_tasks.close();
        let _ = tokio::time::timeout(Duration::from_secs(2), self.module_tasks.wait()).await;
        tracing::info!(elapsed_ms = started.elapsed().as_millis() as u64, "stopped");
    }
}

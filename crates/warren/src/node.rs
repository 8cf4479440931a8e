//! The node: one process, its modules, its gate, and their shared services.
//!
//! [`NodeBuilder`] takes a validated [`Config`] and the module definitions, starts every instance
//! (init, then run), registers the node, binds the listeners and returns a running [`Node`].
//! [`NodeHandle`] is the cheap clone handlers and connections use to reach the router, the
//! session table, groups and subscriptions. Shutdown drains: stop accepting, let in-flight requests
//! finish up to `drain_timeout_s`, close clients, stop modules.

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use serde_json::{Map, Value, json};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::auth::{AuthHook, Authenticator};
use crate::bus::{Bus, LocalBus};
use crate::config::{Config, ListenerConfig, ModuleConfig};
use crate::error::CallError;
use crate::fanout::{Groups, Subscriptions};
use crate::gate::{self, ChannelHandler, Gate};
use crate::module::{Instance, InstanceInfo, Json, Module, SESSION_CLOSED};
use crate::registry::{InstanceRecord, MemoryRegistry, NodeRecord, Registry};
use crate::remote::{RemoteBus, Transport as BusTransport, TransportError};
use crate::router::{RouteKeyFn, Router, Target};
use crate::session::{Session, SessionTable, Transport};

/// Services shared by everything in one node.
pub(crate) struct NodeShared {
    id: Arc<str>,
    router: Router,
    bus: Arc<LocalBus>,
    remote: Option<Arc<RemoteBus>>,
    registry: Arc<dyn Registry>,
    sessions: Arc<SessionTable>,
    groups: Arc<Groups>,
    subscriptions: Subscriptions,
    call_timeout: Duration,
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

    /// Session operations (docs/protocols/mqtt.md, "Session operations") on any session, wherever
    /// its gate runs.
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

    fn is_local_gate(&self, gate: &str) -> bool {
        **self.inner.sessions.gate_id() == *gate
    }

    /// Add a session to a group (a room). Groups live at the gates that own their members, so a
    /// module on any node can keep rooms, and they survive the death of that module's node.
    pub async fn group_add(&self, group: &str, session: &Session) -> Result<(), CallError> {
        if self.is_local_gate(&session.gate) {
            let h = self.inner.sessions.get(&session.id)?;
            return self.inner.groups.add(group, &h);
        }
        self.gate_call(&session.gate, "GroupAdd", json!([group, &*session.id]))
            .await
            .map(|_| ())
    }

    /// Remove a session from a group.
    pub async fn group_remove(&self, group: &str, session: &Session) -> Result<(), CallError> {
        if self.is_local_gate(&session.gate) {
            self.inner.groups.remove(group, &session.id);
            return Ok(());
        }
        self.gate_call(&session.gate, "GroupRemove", json!([group, &*session.id]))
            .await
            .map(|_| ())
    }

    /// Send one message to every member of a group, on every gate of the cluster, except
    /// `except` (a session id). Each gate encodes it once per protocol and shares the bytes among
    /// its members. Returns the number of members reached on this node's gate (other gates are
    /// told without waiting).
    pub async fn group_broadcast(
        &self,
        group: &str,
        topic: &str,
        body: impl Into<Bytes>,
        except: Option<&str>,
    ) -> usize {
        let body: Bytes = body.into();
        let own = self.inner.sessions.gate_id().clone();
        for gate in self.inner.router.instances(GATE) {
            if gate.instance == own {
                continue;
            }
            let args = json!([group, topic, String::from_utf8_lossy(&body), except]);
            let deadline = Instant::now() + self.inner.call_timeout;
            if let Err(e) = self
                .inner
                .router
                .send(
                    &gate,
                    "GroupBroadcast",
                    None,
                    Bytes::from(args.to_string()),
                    deadline,
                    false,
                )
                .await
            {
                tracing::warn!(gate = %gate.instance, %group, error = %e, "broadcast did not reach a gate");
            }
        }
        self.inner.groups.broadcast(
            group,
            Bytes::copy_from_slice(topic.as_bytes()),
            body,
            except,
        )
    }

    /// The members of a group on every gate of the cluster (for a module that rebuilds its state
    /// after taking over a room).
    pub async fn group_members(&self, group: &str) -> Vec<Arc<Session>> {
        let mut out: Vec<Arc<Session>> = self
            .inner
            .groups
            .members(group)
            .iter()
            .filter_map(|id| self.inner.sessions.get(id).ok())
            .map(|h| h.snapshot())
            .collect();
        let own = self.inner.sessions.gate_id().clone();
        for gate in self.inner.router.instances(GATE) {
            if gate.instance == own {
                continue;
            }
            match self
                .gate_call(&gate.instance, "GroupMembers", json!([group]))
                .await
            {
                Ok(Value::Array(list)) => out.extend(
                    list.iter()
                        .filter_map(|v| Session::from_export_map(v, Transport::Tcp))
                        .map(Arc::new),
                ),
                Ok(_) => {}
                Err(e) => {
                    tracing::warn!(gate = %gate.instance, %group, error = %e, "could not list a gate's group members")
                }
            }
        }
        out
    }

    async fn gate_call(&self, gate: &str, op: &str, args: Value) -> Result<Value, CallError> {
        let target = self
            .inner
            .router
            .resolve_instance(gate)
            .ok_or_else(|| CallError::GateNotFound(gate.to_owned()))?;
        let deadline = Instant::now() + self.inner.call_timeout;
        let pending = self
            .inner
            .router
            .send(
                &target,
                op,
                None,
                Bytes::from(args.to_string()),
                deadline,
                true,
            )
            .await?
            .ok_or(CallError::Closed)?;
        let bytes = match tokio::time::timeout_at(deadline, pending).await {
            Ok(r) => r?,
            Err(_) => return Err(CallError::Timeout),
        };
        Ok(serde_json::from_slice(&bytes).unwrap_or(Value::Null))
    }

    /// The live nodes of the cluster, as the registry last reported them.
    pub fn nodes(&self) -> Arc<Vec<NodeRecord>> {
        self.inner.registry.watch().borrow().clone()
    }

    /// Plain MQTT subscriptions on this node.
    pub fn subscriptions(&self) -> &Subscriptions {
        &self.inner.subscriptions
    }

    /// Default deadline of calls between modules.
    pub fn call_timeout(&self) -> Duration {
        self.inner.call_timeout
    }

    fn target(
        &self,
        module: &str,
        handler: &str,
        session: Option<&Session>,
        body: &[u8],
    ) -> Result<Target, CallError> {
        let (m, at) = match module.split_once('@') {
            Some((m, at)) => (m, Some(at)),
            None => (module, None),
        };
        if session.is_none() && at.is_none() {
            // calls without a session hash on the calling node's id
            let key = self.id().to_owned();
            let t = self.inner.router.resolve_call(m, None, handler, None, body);
            return t.or_else(|_| self.inner.router.resolve(m, None, &key));
        }
        self.inner
            .router
            .resolve_call(m, at, handler, session, body)
    }

    /// Call an instance of `module` carrying routing tag `tag` (chosen on that tag's ring by the
    /// session's key) and wait for the reply.
    pub async fn call_tagged(
        &self,
        module: &str,
        tag: &str,
        handler: &str,
        session: Option<Arc<Session>>,
        body: Bytes,
        timeout: Option<Duration>,
    ) -> Result<Bytes, CallError> {
        let key = session.as_deref().map_or(self.id(), Session::hash_key);
        let target = self.inner.router.resolve_tagged(module, tag, key)?;
        self.call_target(&target, handler, session, body, timeout)
            .await
    }

    async fn call_target(
        &self,
        target: &Target,
        handler: &str,
        session: Option<Arc<Session>>,
        body: Bytes,
        timeout: Option<Duration>,
    ) -> Result<Bytes, CallError> {
        let deadline = Instant::now() + timeout.unwrap_or(self.inner.call_timeout);
        let pending = self
            .inner
            .router
            .send(target, handler, session, body, deadline, true)
            .await?
            .ok_or(CallError::Closed)?;
        match tokio::time::timeout_at(deadline, pending).await {
            Ok(r) => r,
            Err(_) => Err(CallError::Timeout),
        }
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
        let target = self.target(module, handler, session.as_deref(), &body)?;
        self.call_target(&target, handler, session, body, timeout)
            .await
    }

    /// Call without waiting for a result (mqant `CallNR`).
    pub async fn call_nr(
        &self,
        module: &str,
        handler: &str,
        session: Option<Arc<Session>>,
        body: Bytes,
    ) -> Result<(), CallError> {
        let target = self.target(module, handler, session.as_deref(), &body)?;
        let deadline = Instant::now() + self.inner.call_timeout;
        self.inner
            .router
            .send(&target, handler, session, body, deadline, false)
            .await
            .map(|_| ())
    }

    /// Run `handler` on every live instance of `module`, on every node, without waiting for
    /// results (configuration reloads, cache invalidation). Returns how many instances the call
    /// was handed to; the others are logged.
    pub async fn broadcast(&self, module: &str, handler: &str, body: Bytes) -> usize {
        let mut n = 0;
        for t in self.inner.router.instances(module) {
            let deadline = Instant::now() + self.inner.call_timeout;
            match self
                .inner
                .router
                .send(&t, handler, None, body.clone(), deadline, false)
                .await
            {
                Ok(_) => n += 1,
                Err(e) => {
                    tracing::warn!(instance = %t.instance, %handler, error = %e, "broadcast not delivered")
                }
            }
        }
        n
    }

    /// Tell the module instances that asked for it, on any node, that a session closed.
    pub(crate) async fn session_closed(&self, session: Arc<Session>) {
        self.inner.router.forget_session(&session.id);
        for t in self.inner.router.session_watchers() {
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

/// Module type of the gate's session operations.
const GATE: &str = "Gate";

/// The `Gate` module: session operations as RPC handlers, so modules on other nodes (and mqant
/// peers) can reach sessions on this gate (docs/protocols/mqtt.md,
/// "Session operations").
fn gate_module(table: Arc<SessionTable>, groups: Arc<Groups>) -> Module {
    fn arg(a: &[Value], i: usize) -> &str {
        a.get(i).and_then(Value::as_str).unwrap_or_default()
    }
    fn export(r: Result<Arc<Session>, CallError>) -> Result<Value, CallError> {
        r.map(|s| s.export_map())
    }
    struct G {
        table: Arc<SessionTable>,
        groups: Arc<Groups>,
    }
    impl std::ops::Deref for G {
        type Target = SessionTable;
        fn deref(&self) -> &SessionTable {
            &self.table
        }
    }
    type T = G;
    // one task in mailbox order: session ops, pushes and room broadcasts arriving from other
    // nodes carry no session of their own, and must still take effect in the order sent
    Module::builder(GATE, G { table, groups })
        .execution(crate::Execution::Sequential)
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
            "GroupAdd",
            |cx: crate::Context<T>, Json(a): Json<Vec<Value>>| async move {
                let h = cx.state().table.get(arg(&a, 1))?;
                cx.state().groups.add(arg(&a, 0), &h)?;
                Ok::<_, CallError>(true)
            },
        )
        .handler(
            "GroupRemove",
            |cx: crate::Context<T>, Json(a): Json<Vec<Value>>| async move {
                cx.state().groups.remove(arg(&a, 0), arg(&a, 1));
                Ok::<_, CallError>(true)
            },
        )
        .handler(
            "GroupBroadcast",
            |cx: crate::Context<T>, Json(a): Json<Vec<Value>>| async move {
                let body = Bytes::from(arg(&a, 2).to_owned());
                let except = a.get(3).and_then(Value::as_str);
                let topic = Bytes::copy_from_slice(arg(&a, 1).as_bytes());
                Ok::<_, CallError>(Json(cx.state().groups.broadcast(
                    arg(&a, 0),
                    topic,
                    body,
                    except,
                )))
            },
        )
        .handler(
            "GroupMembers",
            |cx: crate::Context<T>, Json(a): Json<Vec<Value>>| async move {
                let st = cx.state();
                let list: Vec<Value> = st
                    .groups
                    .members(arg(&a, 0))
                    .iter()
                    .filter_map(|id| st.table.get(id).ok())
                    .map(|h| h.snapshot().export_map())
                    .collect();
                Ok::<_, CallError>(Value::Array(list))
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
    /// The bus could not subscribe this node's inbox.
    #[error("bus: {0}")]
    Bus(#[from] TransportError),
    /// `[auth]` could not be set up (password file, JWT key, HTTP callback URL).
    #[error(transparent)]
    Auth(#[from] crate::auth::AuthError),
    /// The ACL file (`[auth] acl_file`) could not be read or has a bad line.
    #[error(transparent)]
    Acl(#[from] crate::acl::AclError),
    /// Another live node already runs an instance with one of this node's instance ids.
    #[error(
        "instance id {instance:?} is already run by node {node:?}; instance ids must be unique in the cluster"
    )]
    DuplicateInstance {
        /// The instance id.
        instance: String,
        /// The node running it.
        node: String,
    },
}

/// A change in the cluster, as hooks see it.
#[derive(Debug, Clone)]
pub enum ClusterEvent {
    /// A node appeared in the registry.
    Joined(NodeRecord),
    /// A node left (deregistered, or stopped refreshing its record).
    Left(NodeRecord),
    /// A live node's record changed (modules, tags, address).
    Changed(NodeRecord),
}

/// A function told about every [`ClusterEvent`].
pub type ClusterHook = Arc<dyn Fn(&ClusterEvent) + Send + Sync>;

fn cluster_events(old: &[NodeRecord], new: &[NodeRecord]) -> Vec<ClusterEvent> {
    let before: HashMap<&str, &NodeRecord> = old.iter().map(|n| (n.id.as_str(), n)).collect();
    let after: HashMap<&str, &NodeRecord> = new.iter().map(|n| (n.id.as_str(), n)).collect();
    let mut ev = Vec::new();
    for n in new {
        match before.get(n.id.as_str()) {
            None => ev.push(ClusterEvent::Joined(n.clone())),
            Some(o) if *o != n => ev.push(ClusterEvent::Changed(n.clone())),
            Some(_) => {}
        }
    }
    for o in old {
        if !after.contains_key(o.id.as_str()) {
            ev.push(ClusterEvent::Left(o.clone()));
        }
    }
    ev
}

/// Assembles a node from its config and module definitions.
pub struct NodeBuilder {
    config: Config,
    modules: Vec<(Module, ModuleConfig)>,
    auth: Option<Arc<dyn AuthHook>>,
    channel_handler: Option<Arc<dyn ChannelHandler>>,
    transport: Option<Arc<dyn BusTransport>>,
    registry: Option<Arc<dyn Registry>>,
    hooks: Vec<ClusterHook>,
    route_keys: Vec<(String, RouteKeyFn)>,
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
            inst.run(handle.clone(), stop_modules.child_token(), &module_tasks);
        }

        let gate = Arc::new(Gate::new(
            handle.clone(),
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

/// A running node.
pub struct Node {
    handle: NodeHandle,
    gate: Arc<Gate>,
    listeners: Vec<BoundListener>,
    instances: Vec<Arc<Instance>>,
    module_tasks: TaskTracker,
    stop_modules: CancellationToken,
    stop_bus: CancellationToken,
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

    /// Apply what can change without a restart (SIGHUP): the IP allow and deny lists (`[access]`
    /// and each listener's) and the listeners' TLS certificates, for new connections; open
    /// connections are kept. `config` is the whole new config; its listeners are matched to the
    /// running ones by position. The `[auth]` checks are rebuilt (password file, JWT key, HTTP
    /// callback) for later logins. The topic ACL file is read again too: it applies to later
    /// SUBSCRIBE and PUBLISH packets of every session (subscriptions already granted are kept).
    /// Returns what could not be reloaded (the old setting stays).
    pub fn reload(&self, config: &Config) -> Vec<String> {
        let mut errors = self.gate.reload(config);
        // [auth]: the password file and the JWT key are read again, the uid policy is swapped
        if let Err(e) = self.gate.reload_auth(&config.auth) {
            errors.push(e.to_string());
        }
        self.handle
            .session_table()
            .set_uid_conflict(config.auth.uid_conflict);
        match &config.auth.acl_file {
            Some(path) => match crate::acl::Acl::load(path) {
                Ok(acl) => self.gate.acl.store(Some(Arc::new(acl))),
                Err(e) => errors.push(e.to_string()),
            },
            None => self.gate.acl.store(None),
        }
        errors
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
        if let Err(e) = self
            .handle
            .inner
            .registry
            .deregister(&self.handle.inner.id)
            .await
        {
            tracing::warn!(error = %e, "could not deregister");
        }
        self.stop_bus.cancel();
        self.handle.inner.bus.clear();
        drop(self.instances);
        self.module_tasks.close();
        let _ = tokio::time::timeout(Duration::from_secs(2), self.module_tasks.wait()).await;
        tracing::info!(elapsed_ms = started.elapsed().as_millis() as u64, "stopped");
    }
}

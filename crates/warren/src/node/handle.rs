//! [`NodeHandle`]: the cheap clone handlers and connections use to reach the node's services
//! (calls, the router, sessions, groups, subscriptions).

use super::*;
use crate::module::{Context, Services};
use futures_util::future::BoxFuture;

/// Services shared by everything in one node.
pub(crate) struct NodeShared {
    pub(super) id: Arc<str>,
    pub(super) router: Router,
    pub(super) bus: Arc<LocalBus>,
    pub(super) remote: Option<Arc<RemoteBus>>,
    pub(super) registry: Arc<dyn Registry>,
    pub(super) sessions: Arc<SessionTable>,
    pub(super) groups: Arc<Groups>,
    pub(super) subscriptions: Subscriptions,
    pub(super) call_timeout: Duration,
}

/// A cheap handle to a node's services: calls, session operations, groups, subscriptions.
#[derive(Clone)]
pub struct NodeHandle {
    pub(super) inner: Arc<NodeShared>,
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

    /// The bus to other nodes, when the node has one: what the metrics read its transport's
    /// kind and its calls awaiting a reply from.
    pub fn remote(&self) -> Option<&Arc<RemoteBus>> {
        self.inner.remote.as_ref()
    }

    /// Jobs waiting in the mailboxes of this node's module instances, per module type (for the
    /// metrics).
    pub fn module_queue_depths(&self) -> Vec<(Arc<str>, usize)> {
        self.inner.bus.queue_depths()
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
                .call_nr(
                    &gate,
                    gate.call("GroupBroadcast", deadline).body(args.to_string()),
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
                        .filter_map(|v| Session::from_export_map(v, Network::Tcp))
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
            .call(&target, target.call(op, deadline).body(args.to_string()))
            .await?;
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
            .call(
                target,
                target
                    .call(handler, deadline)
                    .session(session)
                    .body(body)
                    .trace(crate::trace::current_child()),
            )
            .await?;
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
            .call_nr(
                &target,
                target
                    .call(handler, deadline)
                    .session(session)
                    .body(body)
                    .trace(crate::trace::current_child()),
            )
            .await
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
                .call_nr(&t, t.call(handler, deadline).body(body.clone()))
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
                .call_nr(
                    &t,
                    t.call(SESSION_CLOSED, deadline)
                        .session(Some(session.clone())),
                )
                .await;
            if let Err(e) = r {
                tracing::debug!(module = %t.module, error = %e, "session-closed notification not delivered");
            }
        }
    }
}

impl NodeHandle {
    /// This node as the [`Services`] its modules' handlers see.
    pub fn services(&self) -> Arc<dyn Services> {
        Arc::new(self.clone())
    }
}

impl Services for NodeHandle {
    fn call<'a>(
        &'a self,
        module: &'a str,
        handler: &'a str,
        session: Option<Arc<Session>>,
        body: Bytes,
        timeout: Option<Duration>,
    ) -> BoxFuture<'a, Result<Bytes, CallError>> {
        Box::pin(NodeHandle::call(
            self, module, handler, session, body, timeout,
        ))
    }

    fn call_nr<'a>(
        &'a self,
        module: &'a str,
        handler: &'a str,
        session: Option<Arc<Session>>,
        body: Bytes,
    ) -> BoxFuture<'a, Result<(), CallError>> {
        Box::pin(NodeHandle::call_nr(self, module, handler, session, body))
    }

    fn push<'a>(
        &'a self,
        session: &'a Session,
        topic: &'a str,
        body: Bytes,
    ) -> BoxFuture<'a, Result<(), CallError>> {
        Box::pin(async move { self.sessions().send(session, topic, body).await })
    }

    fn as_any(&self) -> &dyn std::any::Any {
        self
    }
}

impl<S> Context<S> {
    /// The node's services beyond calls and pushes: session operations, groups, subscriptions,
    /// the router. (Defined by the node, so that the module layer does not depend on it.)
    pub fn node(&self) -> &NodeHandle {
        self.services()
            .as_any()
            .downcast_ref::<NodeHandle>()
            .expect("a handler's services are the node that runs it")
    }
}

impl crate::gate::Host for NodeHandle {
    fn id(&self) -> &str {
        NodeHandle::id(self)
    }

    fn router(&self) -> &Router {
        NodeHandle::router(self)
    }

    fn session_table(&self) -> &Arc<SessionTable> {
        NodeHandle::session_table(self)
    }

    fn groups(&self) -> &Groups {
        NodeHandle::groups(self)
    }

    fn subscriptions(&self) -> &Subscriptions {
        NodeHandle::subscriptions(self)
    }

    fn session_closed(&self, session: Arc<Session>) -> BoxFuture<'_, ()> {
        Box::pin(NodeHandle::session_closed(self, session))
    }
}

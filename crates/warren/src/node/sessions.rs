//! [`SessionOps`]: session operations addressed by the session's gate, local or remote.

use super::*;

/// Session operations, addressed by the session's gate (mqant `Serverid`): local sessions are
/// edited in place, others through the owning gate's `Gate` module.
#[derive(Debug, Clone, Copy)]
pub struct SessionOps<'a> {
    pub(super) node: &'a NodeHandle,
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
        Session::from_export_map(&v, s.network)
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

//! The gate: listeners that accept clients and the connection tasks that serve them.
//!
//! `listener.rs` accepts TCP and WebSocket connections under a connection cap, `io.rs`
//! turns either into a byte stream, and `mqtt.rs` runs one MQTT connection: decode, session,
//! route, reply, push. [`Gate`] holds what connections share: the node, the drain and kill
//! signals, the task tracker, and the client-id table for MQTT takeover.

mod access;
mod args;
mod conn;
mod json;
pub mod line;
mod listener;
pub mod mqtt;
mod mqtt_broker;
mod mqtt_will;
mod pomelo;
mod pomelo_rpc;
pub mod proxy;

mod io;
mod tls;
pub(crate) mod traffic;
pub mod upgrade;

pub use line::{Channel, ChannelHandler, Channels, EchoHandler};

use parking_lot::Mutex;
use std::collections::HashMap;
use std::sync::Arc;

use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::{Config, LimitsConfig};
use crate::fanout::{Groups, Subscriptions};
use crate::router::Router;
use crate::session::SessionHandle;
use crate::session::{Session, SessionTable};
use futures_util::future::BoxFuture;

pub use listener::BoundListener;
pub(crate) use listener::listen;
pub(crate) use mqtt_broker::{BrokerSlot, GATE_MODULE, join_cluster};

pub use crate::auth::{AuthHook, AuthRefusal, Credentials, Identity};

use crate::auth::{AuthError, Authenticator};
use crate::config::ListenerConfig;
use crate::error::CallError;

/// Who holds a default-mode MQTT client id: the session, and its verified uid (`None`:
/// anonymous).
type ClientIdOwner = (Arc<SessionHandle>, Option<String>);

/// The log text of a refused authentication: protocol, client id, user name and why.
pub(crate) fn auth_refusal_reason(creds: &Credentials, r: AuthRefusal) -> String {
    let who = creds.username.as_deref().unwrap_or_default();
    format!(
        "{:?} client {:?} user {who:?}: {r}",
        creds.protocol, creds.client_id
    )
}

/// What the gate needs from the node it serves: the router its requests go through, the
/// session table, groups and subscriptions its connections join, and who to tell when a session
/// closes. The node implements it; the gate does not depend on the node.
pub(crate) trait Host: crate::module::Services {
    /// The node's id.
    fn id(&self) -> &str;
    /// Where calls go.
    fn router(&self) -> &Router;
    /// The live sessions of this gate.
    fn session_table(&self) -> &Arc<SessionTable>;
    /// Named groups of sessions (rooms).
    fn groups(&self) -> &Groups;
    /// Default-mode MQTT subscriptions.
    fn subscriptions(&self) -> &Subscriptions;
    /// A session ended: forget it where it was remembered, tell the modules that asked.
    fn session_closed(&self, session: Arc<Session>) -> BoxFuture<'_, ()>;
}

/// Shared state of every listener of a node.
pub(crate) struct Gate {
    pub(crate) node: Arc<dyn Host>,
    /// Stop accepting and reading; finish in-flight requests.
    pub(crate) draining: CancellationToken,
    /// Close every connection now.
    pub(crate) killing: CancellationToken,
    pub(crate) tracker: TaskTracker,
    /// The node's credential checks (`[auth]` and the builder's hook); swapped whole when
    /// SIGHUP reloads `[auth]`.
    pub(crate) auth: arc_swap::ArcSwap<Authenticator>,
    /// Node-wide caps (`[limits]`).
    pub(crate) limits: LimitsConfig,
    /// Bytes queued for output by every session of the node (`[limits] max_queued_bytes`).
    pub(crate) output: Arc<crate::session::OutputBudget>,
    /// Who may open a connection: the IP lists (`[access]` and each listener's, reloaded on
    /// SIGHUP) and the per-IP limits.
    pub(crate) admission: access::Admission,
    /// Topic ACLs of default-mode MQTT (`[auth] acl_file`), parsed at start; `None`: no
    /// ACL file, everything allowed. Swapped as a whole when the file is reloaded.
    pub(crate) acl: arc_swap::ArcSwapOption<crate::acl::Acl>,
    /// What line listeners without a handler of their own talk to.
    pub(crate) channel_handler: Arc<dyn ChannelHandler>,
    /// Line listeners with a handler of their own (a plugin), by the config the listener was
    /// bound with: every connection of a listener carries that same `Arc`.
    line_handlers: Vec<(Arc<ListenerConfig>, Arc<dyn ChannelHandler>)>,
    /// Live line channels by id.
    pub(crate) channels: Channels,
    /// Default-mode MQTT client ids → the session using it and its verified uid (takeover is
    /// allowed only to the same user).
    client_ids: Mutex<HashMap<String, ClientIdOwner>>,
    /// Default-mode MQTT's node-wide state: retained messages, traffic counters, `$SYS`.
    pub(crate) broker: Arc<mqtt_broker::Broker>,
    /// Each bound listener's traffic metrics (gate/traffic.rs).
    pub(crate) traffic: traffic::Traffic,
}

impl Gate {
    pub(crate) fn new(
        node: Arc<dyn Host>,
        config: &Config,
        auth: Arc<Authenticator>,
        channel_handler: Option<Arc<dyn ChannelHandler>>,
        line_handlers: Vec<(Arc<ListenerConfig>, Arc<dyn ChannelHandler>)>,
    ) -> Self {
        Gate {
            node,
            draining: CancellationToken::new(),
            killing: CancellationToken::new(),
            tracker: TaskTracker::new(),
            auth: arc_swap::ArcSwap::new(auth),
            limits: config.limits.clone(),
            output: crate::session::OutputBudget::new(config.limits.max_queued_bytes),
            admission: access::Admission::new(&config.limits, &config.access),
            acl: arc_swap::ArcSwapOption::empty(),
            channel_handler: channel_handler.unwrap_or_else(|| Arc::new(EchoHandler)),
            line_handlers,
            channels: Channels::default(),
            client_ids: Mutex::new(HashMap::new()),
            broker: Arc::new(mqtt_broker::Broker::new(config)),
            traffic: traffic::Traffic::default(),
        }
    }

    /// The channel handler of the line listener bound with `cfg`: its own, else the node's.
    pub(crate) fn channel_handler_for(&self, cfg: &Arc<ListenerConfig>) -> Arc<dyn ChannelHandler> {
        self.line_handlers
            .iter()
            .find(|(c, _)| Arc::ptr_eq(c, cfg))
            .map_or_else(|| self.channel_handler.clone(), |(_, h)| h.clone())
    }

    /// Begin a drain.
    pub(crate) fn drain(&self) {
        self.draining.cancel();
        self.tracker.close();
        // each connection hears it through its session's queue (a connection that opens after
        // this sees `draining` when its loop starts)
        for h in self.node.session_table().all() {
            h.drain();
        }
    }

    /// Close everything now.
    pub(crate) fn kill(&self) {
        self.killing.cancel();
        for h in self.node.session_table().all() {
            h.shut();
        }
    }

    /// Wait for every connection (and accept loop) to end.
    pub(crate) async fn wait(&self) {
        self.tracker.wait().await;
    }

    /// Claim a client id for a session of user `uid` (`None`: anonymous). Returns the session
    /// it takes over from, if any; `Err(())` when a live session of another user holds it (that
    /// session is left alone).
    pub(crate) fn claim_client_id(
        &self,
        id: &str,
        session: &Arc<SessionHandle>,
        uid: Option<&str>,
    ) -> Result<Option<Arc<SessionHandle>>, ()> {
        let mut m = self.client_ids.lock();
        if let Some((old, owner)) = m.get(id)
            && !old.is_closed()
            && owner.as_deref() != uid
        {
            return Err(());
        }
        Ok(
            m.insert(id.to_owned(), (session.clone(), uid.map(str::to_owned)))
                .map(|(s, _)| s),
        )
    }

    /// Release a client id if this session still holds it.
    pub(crate) fn release_client_id(&self, id: &str, session: &Arc<SessionHandle>) {
        let mut m = self.client_ids.lock();
        if m.get(id).is_some_and(|(s, _)| Arc::ptr_eq(s, session)) {
            m.remove(id);
        }
    }

    /// Run the node's credential checks for a client of a listener: `Ok(None)` lets it in
    /// anonymously (also on listeners with `auth = false`), `Ok(Some)` with a verified identity.
    /// A refusal is counted and logged here (rate-limited); the caller answers in its protocol.
    pub(crate) async fn authenticate(
        &self,
        cfg: &ListenerConfig,
        creds: &Credentials,
    ) -> Result<Option<Identity>, AuthRefusal> {
        let verdict = self.authenticate_quietly(cfg, creds).await;
        if let Err(r) = &verdict {
            crate::refusal::refuse(&creds.peer, r.kind(), auth_refusal_reason(creds, *r));
        }
        verdict
    }

    /// As [`Gate::authenticate`], counting but not logging a refusal: for a caller that logs it
    /// itself as it closes the connection (with [`auth_refusal_reason`]).
    pub(crate) async fn authenticate_quietly(
        &self,
        cfg: &ListenerConfig,
        creds: &Credentials,
    ) -> Result<Option<Identity>, AuthRefusal> {
        if !cfg.auth {
            return Ok(None);
        }
        let auth = self.auth.load_full();
        let verdict = auth.authenticate(creds).await;
        let result = match &verdict {
            Ok(_) => "allow",
            Err(r) => r.kind(),
        };
        metrics::counter!("warren_auth_total", "result" => result).increment(1);
        verdict
    }

    /// Take the checks of a new `[auth]` (SIGHUP): the password file and the JWT key are read
    /// again. On an error the old checks stay.
    pub(crate) fn reload_auth(&self, cfg: &crate::config::AuthConfig) -> Result<(), AuthError> {
        let fresh = self.auth.load().rebuild(cfg)?;
        self.auth.store(Arc::new(fresh));
        Ok(())
    }

    /// Bind a session to the uid of its verified identity, under the `uid_conflict` policy.
    /// The uid is proved by the session's own credentials, so other sessions of that user are
    /// left alone (several devices); `uid_conflict` applies to binds by name (login handlers).
    /// What the credentials say the client may use (JWT `topics` / `rooms`, the HTTP service's
    /// `acl`) goes into the session's settings under `auth`, where modules on any node read it.
    pub(crate) fn bind_identity(
        &self,
        session: &SessionHandle,
        identity: &Identity,
    ) -> Result<(), CallError> {
        let table = self.node.session_table();
        table.bind_verified(session.id(), &identity.uid)?;
        if let Some(claims) = identity.claims() {
            table.set(session.id(), "auth", claims)?;
        }
        Ok(())
    }
}

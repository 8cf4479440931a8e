//! The gate: listeners that accept clients and the connection tasks that serve them.
//!
//! `listener.rs` accepts TCP and WebSocket connections under a connection cap, `transport.rs`
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
mod pomelo;
mod pomelo_rpc;
mod proxy;
pub(crate) mod refusal;
mod tls;
mod transport;

pub use line::{Channel, ChannelHandler, Channels, EchoHandler};

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use futures_util::future::BoxFuture;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::{AccessConfig, AuthConfig, Config, LimitsConfig};
use crate::node::NodeHandle;
use crate::session::SessionHandle;

pub(crate) use listener::listen;

/// What a client presented when it connected, for authentication.
#[derive(Debug, Clone)]
pub struct ConnectInfo {
    /// Remote address.
    pub peer: SocketAddr,
    /// MQTT client id.
    pub client_id: String,
    /// User name, if given.
    pub username: Option<String>,
    /// Password bytes, if given.
    pub password: Option<bytes::Bytes>,
}

/// Why a client was refused at connect.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AuthRefusal {
    /// CONNACK 4: bad user name or password.
    BadCredentials,
    /// CONNACK 5: not authorized.
    NotAuthorized,
}

/// Checks credentials before a session exists. The default accepts everyone (as mqant does).
pub trait AuthHook: Send + Sync + 'static {
    /// Accept or refuse a connecting client.
    fn check(&self, info: &ConnectInfo) -> BoxFuture<'static, Result<(), AuthRefusal>>;
}

/// Shared state of every listener of a node.
pub(crate) struct Gate {
    pub(crate) node: NodeHandle,
    /// Stop accepting and reading; finish in-flight requests.
    pub(crate) draining: CancellationToken,
    /// Close every connection now.
    pub(crate) killing: CancellationToken,
    pub(crate) tracker: TaskTracker,
    pub(crate) auth: Option<Arc<dyn AuthHook>>,
    /// Node-wide caps (`[limits]`).
    pub(crate) limits: LimitsConfig,
    /// Node-wide IP lists (`[access]`).
    pub(crate) access: AccessConfig,
    /// Who may open a connection: IP lists and per-IP limits, reloaded on SIGHUP.
    pub(crate) admission: access::Admission,
    /// Who may connect (`[auth]`).
    pub(crate) auth_config: AuthConfig,
    /// Topic ACLs of default-mode MQTT (`[auth] acl_file`), parsed at start; `None`: no
    /// ACL file, everything allowed. Swapped as a whole when the file is reloaded.
    pub(crate) acl: arc_swap::ArcSwapOption<crate::acl::Acl>,
    /// What line listeners bound to a channel handler talk to.
    pub(crate) channel_handler: Arc<dyn ChannelHandler>,
    /// Live line channels by id.
    pub(crate) channels: Channels,
    /// Default-mode MQTT client ids → the session using it (for takeover).
    client_ids: Mutex<HashMap<String, Arc<SessionHandle>>>,
}

impl Gate {
    pub(crate) fn new(
        node: NodeHandle,
        config: &Config,
        auth: Option<Arc<dyn AuthHook>>,
        channel_handler: Option<Arc<dyn ChannelHandler>>,
    ) -> Self {
        Gate {
            node,
            draining: CancellationToken::new(),
            killing: CancellationToken::new(),
            tracker: TaskTracker::new(),
            auth,
            limits: config.limits.clone(),
            access: config.access.clone(),
            admission: access::Admission::new(&config.limits, &config.access),
            auth_config: config.auth.clone(),
            acl: arc_swap::ArcSwapOption::empty(),
            channel_handler: channel_handler.unwrap_or_else(|| Arc::new(EchoHandler)),
            channels: Channels::default(),
            client_ids: Mutex::new(HashMap::new()),
        }
    }

    /// Begin a drain.
    pub(crate) fn drain(&self) {
        self.draining.cancel();
        self.tracker.close();
    }

    /// Close everything now.
    pub(crate) fn kill(&self) {
        self.killing.cancel();
    }

    /// Wait for every connection (and accept loop) to end.
    pub(crate) async fn wait(&self) {
        self.tracker.wait().await;
    }

    /// Claim a client id; returns the session it takes over from, if any.
    pub(crate) fn claim_client_id(
        &self,
        id: &str,
        session: &Arc<SessionHandle>,
    ) -> Option<Arc<SessionHandle>> {
        let mut m = self.client_ids.lock().unwrap_or_else(|e| e.into_inner());
        m.insert(id.to_owned(), session.clone())
    }

    /// Release a client id if this session still holds it.
    pub(crate) fn release_client_id(&self, id: &str, session: &Arc<SessionHandle>) {
        let mut m = self.client_ids.lock().unwrap_or_else(|e| e.into_inner());
        if m.get(id).is_some_and(|s| Arc::ptr_eq(s, session)) {
            m.remove(id);
        }
    }
}

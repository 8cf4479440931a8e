//! The node: one process, its modules, its gate, and their shared services.
//!
//! [`NodeBuilder`] takes a validated [`Config`] and the module definitions, starts every instance
//! (init, then run), registers the node, binds the listeners and returns a running [`Node`].
//! [`NodeHandle`] is the cheap clone handlers and connections use to reach the router, the
//! session table, groups and subscriptions. Shutdown drains: stop accepting, let in-flight requests
//! finish up to `drain_timeout_s`, close clients, stop modules.
//!
//! Files, by what they hold: `handle.rs` (the call facade handlers use), `sessions.rs` (session
//! operations), `gate_module.rs` (the gate's RPC module), `cluster.rs` (cluster diffs for hooks),
//! `builder.rs` (starting a node), and here the running [`Node`] and why it may not start.

pub mod admin;
mod builder;
mod cluster;
mod gate_module;
mod handle;
mod sessions;

pub use crate::gate::BoundListener;
pub use builder::NodeBuilder;
pub(crate) use cluster::cluster_events;
pub use cluster::{ClusterEvent, ClusterHook};
pub(crate) use gate_module::{GATE, gate_module};
pub use handle::NodeHandle;
pub(crate) use handle::NodeShared;
pub use sessions::SessionOps;

use std::collections::{HashMap, HashSet};

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use serde_json::{Map, Value, json};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::auth::{AuthHook, Authenticator};
use crate::bus::Bus;
use crate::config::{Config, ModuleConfig};
use crate::error::CallError;
use crate::fanout::{Groups, Subscriptions};
use crate::gate::{self, ChannelHandler, Gate};
use crate::module::LocalBus;
use crate::module::{Instance, InstanceInfo, Json, Module, SESSION_CLOSED};
use crate::registry::{InstanceRecord, MemoryRegistry, NodeRecord, Registry};
use crate::remote::{RemoteBus, Transport as BusTransport, TransportError};
use crate::router::{RouteKeyFn, Router, Target};
use crate::session::{Network, Session, SessionTable};

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
    /// The MQTT store (`[mqtt] store`) could not be opened.
    #[cfg(feature = "mqtt-store")]
    #[error(transparent)]
    Store(#[from] crate::mqtt_store::StoreError),
}

/// A running node.
pub struct Node {
    pub(super) handle: NodeHandle,
    pub(super) gate: Arc<Gate>,
    pub(super) listeners: Vec<BoundListener>,
    pub(super) instances: Vec<Arc<Instance>>,
    pub(super) module_tasks: TaskTracker,
    pub(super) stop_modules: CancellationToken,
    pub(super) stop_bus: CancellationToken,
    pub(super) drain_timeout: Duration,
    /// The durable MQTT store, when `[mqtt] store` is set ([`Node::mqtt_store`]).
    #[cfg(feature = "mqtt-store")]
    pub(super) mqtt_store: Option<crate::mqtt_store::MqttStore>,
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
            inst.destroy(self.handle.services()).await;
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

/// Set the traffic counters (client messages and bytes in and out by listener, socket writes,
/// MQTT publishes received) from the connections' own counts. Connections count without shared
/// atomics (crates/warren/src/gate/traffic.rs), so these counters move only when asked: a
/// metrics exporter calls this before it renders, and now and then in between
/// (docs/metrics.md).
pub fn publish_traffic() {
    crate::gate::traffic::publish();
}

//! The registry: which nodes are alive and which module instances they run. [`Registry`] is the
//! seam for Redis, NATS KV and etcd; [`MemoryRegistry`] serves a single process. The router
//! watches it and rebuilds its routing table on every change.

use std::sync::Arc;

use futures_util::future::BoxFuture;
use serde::{Deserialize, Serialize};
use tokio::sync::watch;

/// One module instance as the cluster sees it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct InstanceRecord {
    /// Module type name.
    pub module: String,
    /// Instance id, unique in the cluster.
    pub id: String,
    /// Handlers registered as client-visible (a remote gate needs them to admit client calls).
    #[serde(default)]
    pub client_handlers: Vec<String>,
    /// Client handlers callable before login (a remote gate applies the login rule with them).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub login_handlers: Vec<String>,
    /// Routing tags.
    #[serde(default)]
    pub tags: Vec<String>,
    /// Sessions stay on the instance they first reached (see `ModuleConfig::sticky`).
    #[serde(default)]
    pub sticky: bool,
    /// The instance wants to hear when any session closes (`on_session_closed`).
    #[serde(default)]
    pub watches_sessions: bool,
    /// The instance takes calls from its module type's queue group (`ModuleConfig::queue_group`).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub queue_group: bool,
}

/// One live node.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeRecord {
    /// Node id.
    pub id: String,
    /// warren version the node runs.
    pub version: String,
    /// Where the node can be reached directly, if anywhere.
    #[serde(default)]
    pub address: Option<String>,
    /// Start time, unix milliseconds.
    pub started_at_ms: u64,
    /// Node tags.
    #[serde(default)]
    pub tags: Vec<String>,
    /// Module instances it runs.
    pub instances: Vec<InstanceRecord>,
}

/// Registry failures.
#[derive(Debug, Clone, thiserror::Error)]
pub enum RegistryError {
    /// The backing store could not be reached.
    #[error("registry unavailable: {0}")]
    Unavailable(String),
    /// The record cannot be stored in this registry's format (a field the layout forbids).
    #[error("registry refused the record: {0}")]
    Invalid(String),
}

/// Where nodes announce themselves and learn about each other.
pub trait Registry: Send + Sync + 'static {
    /// Announce (or refresh) this node.
    fn register(&self, node: NodeRecord) -> BoxFuture<'_, Result<(), RegistryError>>;
    /// Withdraw a node (graceful shutdown).
    fn deregister(&self, node_id: &str) -> BoxFuture<'_, Result<(), RegistryError>>;
    /// The live nodes, now and on every change.
    fn watch(&self) -> watch::Receiver<Arc<Vec<NodeRecord>>>;
    /// Short name for logs.
    fn kind(&self) -> &'static str;
    /// Whether the registry's server is reachable now, for `/readyz` (one that cannot tell, or
    /// lives in memory, says yes).
    fn is_connected(&self) -> bool {
        true
    }
}

/// A registry held in memory: the nodes of this process.
#[derive(Debug)]
pub struct MemoryRegistry {
    tx: watch::Sender<Arc<Vec<NodeRecord>>>,
}

impl Default for MemoryRegistry {
    fn default() -> Self {
        MemoryRegistry {
            tx: watch::Sender::new(Arc::new(Vec::new())),
        }
    }
}

impl Registry for MemoryRegistry {
    fn register(&self, node: NodeRecord) -> BoxFuture<'_, Result<(), RegistryError>> {
        self.tx.send_modify(|nodes| {
            let mut v = Vec::clone(nodes);
            v.retain(|n| n.id != node.id);
            v.push(node);
            *nodes = Arc::new(v);
        });
        Box::pin(std::future::ready(Ok(())))
    }

    fn deregister(&self, node_id: &str) -> BoxFuture<'_, Result<(), RegistryError>> {
        self.tx.send_modify(|nodes| {
            let v: Vec<NodeRecord> = nodes.iter().filter(|n| n.id != node_id).cloned().collect();
            *nodes = Arc::new(v);
        });
        Box::pin(std::future::ready(Ok(())))
    }

    fn watch(&self) -> watch::Receiver<Arc<Vec<NodeRecord>>> {
        self.tx.subscribe()
    }

    fn kind(&self) -> &'static str {
        "memory"
    }
}

//! Traffic metrics of each listener (docs/metrics.md): open connections, client messages and
//! bytes in and out, labelled by protocol and listener address.
//!
//! The handles are resolved once, when the listener binds, and every connection of that
//! listener holds them: counting costs an atomic add on a handle, never a new label set. Bytes
//! are counted per socket read and write; messages are added per decoded batch and per write, not
//! one atomic operation per message.

use std::net::SocketAddr;
use std::sync::Arc;

use metrics::{Counter, Gauge};

use crate::config::{ListenerConfig, protocol_name};

pub(crate) use crate::message_path::MESSAGE_PATH;

/// One listener's handles.
pub(crate) struct ListenerTraffic {
    /// Connections open now (`warren_connections_active`).
    pub(crate) connections: Gauge,
    /// Client messages decoded (`warren_messages_received_total`).
    pub(crate) messages_in: Counter,
    /// Messages framed for clients: replies, pushes, deliveries (`warren_messages_sent_total`).
    pub(crate) messages_out: Counter,
    /// Bytes read from client sockets (`warren_bytes_received_total`).
    pub(crate) bytes_in: Counter,
    /// Bytes written to client sockets (`warren_bytes_sent_total`).
    pub(crate) bytes_out: Counter,
}

impl ListenerTraffic {
    /// The handles of the listener `cfg` bound at `local`.
    pub(crate) fn new(cfg: &ListenerConfig, local: SocketAddr) -> Arc<ListenerTraffic> {
        let protocol = protocol_name(cfg.protocol.protocol());
        let listener = local.to_string();
        let labels = [("protocol", protocol.to_owned()), ("listener", listener)];
        Arc::new(ListenerTraffic {
            connections: metrics::gauge!("warren_connections_active", &labels),
            messages_in: metrics::counter!("warren_messages_received_total", &labels),
            messages_out: metrics::counter!("warren_messages_sent_total", &labels),
            bytes_in: metrics::counter!("warren_bytes_received_total", &labels),
            bytes_out: metrics::counter!("warren_bytes_sent_total", &labels),
        })
    }

    /// Handles that count nothing, for a connection whose listener was not registered (tests).
    pub(crate) fn none() -> Arc<ListenerTraffic> {
        Arc::new(ListenerTraffic {
            connections: Gauge::noop(),
            messages_in: Counter::noop(),
            messages_out: Counter::noop(),
            bytes_in: Counter::noop(),
            bytes_out: Counter::noop(),
        })
    }

    /// Count one more open connection until the returned guard is dropped.
    pub(crate) fn open(self: &Arc<Self>) -> OpenConnection {
        self.connections.increment(1.0);
        OpenConnection(self.clone())
    }
}

/// One open connection in `warren_connections_active`, from accept to close.
pub(crate) struct OpenConnection(Arc<ListenerTraffic>);

impl Drop for OpenConnection {
    fn drop(&mut self) {
        self.0.connections.decrement(1.0);
    }
}

/// The handles of every bound listener, by the config `Arc` its connections carry.
#[derive(Default)]
pub(crate) struct Traffic {
    listeners: parking_lot::RwLock<Vec<(Arc<ListenerConfig>, Arc<ListenerTraffic>)>>,
}

impl Traffic {
    /// Remember the handles of the listener bound with `cfg`.
    pub(crate) fn add(&self, cfg: &Arc<ListenerConfig>, traffic: Arc<ListenerTraffic>) {
        self.listeners.write().push((cfg.clone(), traffic));
    }

    /// The handles of the listener bound with `cfg` (looked up once per connection).
    pub(crate) fn of(&self, cfg: &Arc<ListenerConfig>) -> Arc<ListenerTraffic> {
        self.listeners
            .read()
            .iter()
            .find(|(c, _)| Arc::ptr_eq(c, cfg))
            .map(|(_, t)| t.clone())
            .unwrap_or_else(ListenerTraffic::none)
    }
}

//! Traffic metrics of each listener (docs/metrics.md): open connections, client messages and
//! bytes in and out, labelled by protocol and listener address, and the node's socket writes,
//! MQTT publishes received and acknowledgements of the messages it sent.
//!
//! These move with every message, so they are not counted through shared atomics on the way.
//! Each connection keeps its own counts ([`ConnCounts`]), written only by its own task: plain
//! loads and stores, no locked instruction, no cache line shared with another connection. The
//! counters a scrape reads are set from the sums when it asks ([`publish`]): the counts of the
//! connections open now plus what the closed ones left behind. A connection's counts move to its
//! listener's closed total under the same lock the sum takes, so a counter never goes back.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, LazyLock, Weak};

use metrics::{Counter, Gauge};
use parking_lot::Mutex;

use crate::config::{ListenerConfig, protocol_name};

pub(crate) use crate::message_path::MESSAGE_PATH;
use crate::message_path::bump;

/// One connection's counts, written by the connection's task alone and read by [`publish`].
#[derive(Default)]
pub(crate) struct Tally {
    /// Client messages decoded (`warren_messages_received_total`).
    messages_in: AtomicU64,
    /// Messages framed for the client (`warren_messages_sent_total`).
    messages_out: AtomicU64,
    /// Bytes read from the socket (`warren_bytes_received_total`).
    bytes_in: AtomicU64,
    /// Bytes written to the socket (`warren_bytes_sent_total`).
    bytes_out: AtomicU64,
    /// Socket writes (`warren_socket_writes_total`, node-wide).
    socket_writes: AtomicU64,
    /// MQTT PUBLISH packets received (`warren_publishes_received_total`, node-wide).
    publishes_in: AtomicU64,
    /// PUBACK/PUBCOMP received for messages sent (`warren_push_acks_total`, node-wide).
    push_acks: AtomicU64,
}

/// The counts as plain numbers, in [`Tally`]'s order.
type Sums = [u64; 7];

impl Tally {
    fn read(&self) -> Sums {
        [
            &self.messages_in,
            &self.messages_out,
            &self.bytes_in,
            &self.bytes_out,
            &self.socket_writes,
            &self.publishes_in,
            &self.push_acks,
        ]
        .map(|c| c.load(Ordering::Relaxed))
    }
}

fn add(into: &mut Sums, from: Sums) {
    for (a, b) in into.iter_mut().zip(from) {
        *a = a.wrapping_add(b);
    }
}

/// One listener's handles and the counts of its connections.
pub(crate) struct ListenerTraffic {
    /// Connections open now (`warren_connections_active`).
    pub(crate) connections: Gauge,
    /// `warren_messages_received_total`, set by [`publish`].
    messages_in: Counter,
    /// `warren_messages_sent_total`, set by [`publish`].
    messages_out: Counter,
    /// `warren_bytes_received_total`, set by [`publish`].
    bytes_in: Counter,
    /// `warren_bytes_sent_total`, set by [`publish`].
    bytes_out: Counter,
    /// The counts of the open connections (by their tally's address) and of the closed ones.
    tallies: Mutex<(HashMap<usize, Arc<Tally>>, Sums)>,
}

/// Every listener whose counts [`publish`] sums (process-wide, as the counters are).
static LISTENERS: LazyLock<Mutex<Vec<Weak<ListenerTraffic>>>> = LazyLock::new(Default::default);

impl ListenerTraffic {
    /// The handles of the listener `cfg` bound at `local`.
    pub(crate) fn new(cfg: &ListenerConfig, local: SocketAddr) -> Arc<ListenerTraffic> {
        let protocol = protocol_name(cfg.protocol.protocol());
        let listener = local.to_string();
        let labels = [("protocol", protocol.to_owned()), ("listener", listener)];
        let traffic = Arc::new(ListenerTraffic {
            connections: metrics::gauge!("warren_connections_active", &labels),
            messages_in: metrics::counter!("warren_messages_received_total", &labels),
            messages_out: metrics::counter!("warren_messages_sent_total", &labels),
            bytes_in: metrics::counter!("warren_bytes_received_total", &labels),
            bytes_out: metrics::counter!("warren_bytes_sent_total", &labels),
            tallies: Mutex::default(),
        });
        let mut all = LISTENERS.lock();
        all.retain(|l| l.strong_count() > 0);
        all.push(Arc::downgrade(&traffic));
        traffic
    }

    /// Handles that count nothing, for a connection whose listener was not registered (tests).
    pub(crate) fn none() -> Arc<ListenerTraffic> {
        Arc::new(ListenerTraffic {
            connections: Gauge::noop(),
            messages_in: Counter::noop(),
            messages_out: Counter::noop(),
            bytes_in: Counter::noop(),
            bytes_out: Counter::noop(),
            tallies: Mutex::default(),
        })
    }

    /// Count one more open connection until the returned guard is dropped.
    pub(crate) fn open(self: &Arc<Self>) -> OpenConnection {
        self.connections.increment(1.0);
        OpenConnection(self.clone())
    }

    /// The counts of a new connection of this listener, summed until it closes.
    pub(crate) fn counts(self: &Arc<Self>) -> ConnCounts {
        let tally = Arc::new(Tally::default());
        self.tallies
            .lock()
            .0
            .insert(Arc::as_ptr(&tally) as usize, tally.clone());
        ConnCounts {
            listener: self.clone(),
            tally,
        }
    }

    /// Set this listener's counters from its sums; answer the sums.
    fn publish(&self) -> Sums {
        let sums = {
            let tallies = self.tallies.lock();
            let mut sums = tallies.1;
            for t in tallies.0.values() {
                add(&mut sums, t.read());
            }
            sums
        };
        self.messages_in.absolute(sums[0]);
        self.messages_out.absolute(sums[1]);
        self.bytes_in.absolute(sums[2]);
        self.bytes_out.absolute(sums[3]);
        sums
    }
}

impl Drop for ListenerTraffic {
    /// A listener that is gone (its node stopped) leaves its last counts: its own counters keep
    /// them, and the node-wide ones go on counting from them.
    fn drop(&mut self) {
        let sums = self.publish();
        add(&mut GONE.lock(), sums);
    }
}

/// What the listeners that are gone counted ([`ListenerTraffic`]'s `Drop`).
static GONE: Mutex<Sums> = Mutex::new([0; 7]);

/// Set every traffic counter of this process from the connections' counts: what `/metrics`
/// does before it renders, and its upkeep every few seconds.
pub(crate) fn publish() {
    let listeners: Vec<Arc<ListenerTraffic>> =
        LISTENERS.lock().iter().filter_map(Weak::upgrade).collect();
    let mut node: Sums = *GONE.lock();
    for l in &listeners {
        add(&mut node, l.publish());
    }
    MESSAGE_PATH.socket_writes.absolute(node[4]);
    MESSAGE_PATH.publishes_received.absolute(node[5]);
    MESSAGE_PATH.push_acks.absolute(node[6]);
}

/// One open connection in `warren_connections_active`, from accept to close.
pub(crate) struct OpenConnection(Arc<ListenerTraffic>);

impl Drop for OpenConnection {
    fn drop(&mut self) {
        self.0.connections.decrement(1.0);
    }
}

/// A connection's counts ([`Tally`]), counted by its task; at the end they join the listener's
/// closed total.
pub(crate) struct ConnCounts {
    listener: Arc<ListenerTraffic>,
    tally: Arc<Tally>,
}

impl ConnCounts {
    /// `n` client messages decoded.
    pub(crate) fn messages_in(&self, n: u64) {
        bump(&self.tally.messages_in, n);
    }

    /// `n` messages framed for the client.
    pub(crate) fn messages_out(&self, n: u64) {
        bump(&self.tally.messages_out, n);
    }

    /// `n` bytes read from the socket.
    pub(crate) fn bytes_in(&self, n: u64) {
        bump(&self.tally.bytes_in, n);
    }

    /// One socket write of `n` bytes.
    pub(crate) fn wrote(&self, n: u64) {
        bump(&self.tally.bytes_out, n);
        bump(&self.tally.socket_writes, 1);
    }

    /// One MQTT PUBLISH received.
    pub(crate) fn publish_in(&self) {
        bump(&self.tally.publishes_in, 1);
    }

    /// One PUBACK or PUBCOMP received for a message sent to the client.
    pub(crate) fn push_ack(&self) {
        bump(&self.tally.push_acks, 1);
    }
}

impl Drop for ConnCounts {
    fn drop(&mut self) {
        let mut tallies = self.listener.tallies.lock();
        tallies.0.remove(&(Arc::as_ptr(&self.tally) as usize));
        let read = self.tally.read();
        add(&mut tallies.1, read);
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn closed_connections_keep_counting_in_the_sums() {
        let l = ListenerTraffic::none();
        let a = l.counts();
        let b = l.counts();
        a.messages_in(3);
        a.wrote(100);
        b.messages_in(2);
        b.bytes_in(7);
        b.publish_in();
        assert_eq!(l.publish(), [5, 0, 7, 100, 1, 1, 0]);
        drop(a);
        b.messages_out(4);
        b.push_ack();
        assert_eq!(l.publish(), [5, 4, 7, 100, 1, 1, 1]);
        drop(b);
        assert_eq!(l.publish(), [5, 4, 7, 100, 1, 1, 1]);
        assert!(l.tallies.lock().0.is_empty());
    }
}

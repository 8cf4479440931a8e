//! The node-wide counters of the message path (docs/metrics.md): socket writes, MQTT publishes
//! received, acknowledgements of pushes, fan-out deliveries. They sit below the gate and the
//! fan-out, which both count into them.

use std::sync::LazyLock;

use metrics::Counter;

/// Node-wide counters of the message path, resolved once on first use: a `counter!` on the path
/// itself would look its name up in the recorder's registry each time. The node starts after the
/// recorder is installed, so the first use finds it.
pub(crate) struct MessagePath {
    /// `warren_socket_writes_total`: socket writes to clients (set from the connections' own
    /// counts, gate/traffic.rs).
    pub(crate) socket_writes: Counter,
    /// `warren_publishes_received_total`: MQTT PUBLISH packets received (set like
    /// `socket_writes`).
    pub(crate) publishes_received: Counter,
    /// `warren_push_acks_total`: PUBACK/PUBCOMP for messages sent to MQTT clients (set like
    /// `socket_writes`).
    pub(crate) push_acks: Counter,
    /// `warren_fanout_deliveries_total`: messages delivered to subscribers and group members.
    pub(crate) fanout_deliveries: Counter,
}

/// The node-wide counters of the message path ([`MessagePath`]).
pub(crate) static MESSAGE_PATH: LazyLock<MessagePath> = LazyLock::new(|| MessagePath {
    socket_writes: metrics::counter!("warren_socket_writes_total"),
    publishes_received: metrics::counter!("warren_publishes_received_total"),
    push_acks: metrics::counter!("warren_push_acks_total"),
    fanout_deliveries: metrics::counter!("warren_fanout_deliveries_total"),
});

/// Add `n` to a count that only the calling thread writes (a connection's own counts, a thread's
/// shard of a route's): a load and a store, not a locked add, while readers see a whole value.
pub(crate) fn bump(count: &std::sync::atomic::AtomicU64, n: u64) {
    use std::sync::atomic::Ordering::Relaxed;
    count.store(count.load(Relaxed).wrapping_add(n), Relaxed);
}

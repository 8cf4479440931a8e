//! What every default-mode MQTT connection of a node shares beyond subscriptions
//! (docs/protocols/mqtt.md, "MQTT 3.1.1 conformance"): the retained messages, the traffic
//! counters, and the `$SYS/broker/...` topics published from them every `[mqtt] sys_interval`.
//!
//! A client's PUBLISH, a will and the `$SYS` updates all reach subscribers through
//! [`Broker::publish`]: retained first when asked (under the `[limits]` caps), then one shared
//! message to every matching subscription, with the retain flag clear. Retained copies sent on
//! SUBSCRIBE ([`send_retained`]) carry the retain flag, set by the framer as it frames them.
//!
//! In a cluster (a node with a bus), [`Broker::publish`] also hands each publish to the other
//! gates (docs/protocols/mqtt.md, "Across gates"): a bounded queue, one task that sends it in a
//! binary body ([`Forwarded`]) to the gate module `Gate` of every other gate, whose handler
//! `MqttPublish` runs [`Broker::publish_forwarded`] (its retained store and local fan-out, never
//! a forward again). A node without a bus has no forwarder and pays one `OnceLock` read.
//!
//! A persistent session follows its client to another gate: a `clean_session = 0` CONNECT for
//! a client id this gate holds no session of asks every other gate for it
//! ([`take_from_other_gates`], handler `MqttTakeSession`); the gate holding it closes its
//! connection, detaches it and answers with its transferable part
//! ([`BrokerSlot::take_session`], the codec `warren_proto::mqtt_handover`). Every CONNECT in a
//! cluster of several gates makes the same call, so a client id is connected once in the
//! cluster and a `clean_session = 1` CONNECT discards the session wherever it is.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock, Weak};
use std::time::{Duration, Instant};

use bytes::Bytes;
use parking_lot::Mutex;

use super::conn::{End, SessionConn};
use super::{Gate, Host};
use crate::config::Config;
use crate::error::{CallError, Detail};
use crate::refusal;
use crate::retained::{Retain, RetainedBackend, RetainedStore, SharedRetained};
use crate::session::{Message, Outbound};
use warren_proto::mqtt_forward::Forwarded;
use warren_proto::mqtt_handover::{self as handover, Answer, Handover};

/// Counter shards: each thread adds to its own cache line, so counting every packet framed for
/// a large fan-out costs no contended atomic.
const SHARDS: usize = 16;

#[derive(Debug, Default)]
#[repr(align(128))]
struct Shard {
    packets: AtomicU64,
    bytes: AtomicU64,
    publishes: AtomicU64,
}

/// Packets, bytes and PUBLISH packets in one direction, summed over shards when read.
#[derive(Debug, Default)]
pub(crate) struct Traffic {
    shards: [Shard; SHARDS],
}

static NEXT_SHARD: AtomicUsize = AtomicUsize::new(0);

thread_local! {
    static SHARD: usize = NEXT_SHARD.fetch_add(1, Ordering::Relaxed) % SHARDS;
}

impl Traffic {
    /// Count `packets` packets of `bytes` bytes, `publishes` of them PUBLISH.
    pub(crate) fn add(&self, packets: u64, bytes: u64, publishes: u64) {
        let s = &self.shards[SHARD.with(|s| *s)];
        s.packets.fetch_add(packets, Ordering::Relaxed);
        s.bytes.fetch_add(bytes, Ordering::Relaxed);
        if publishes > 0 {
            s.publishes.fetch_add(publishes, Ordering::Relaxed);
        }
    }

    /// (packets, bytes, publishes) so far.
    pub(crate) fn totals(&self) -> (u64, u64, u64) {
        self.shards.iter().fold((0, 0, 0), |(p, b, m), s| {
            (
                p + s.packets.load(Ordering::Relaxed),
                b + s.bytes.load(Ordering::Relaxed),
                m + s.publishes.load(Ordering::Relaxed),
            )
        })
    }
}

impl std::fmt::Debug for dyn RetainedBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("RetainedBackend")
    }
}

/// The node's MQTT broker state (one per gate, shared by every MQTT listener).
#[derive(Debug)]
pub(crate) struct Broker {
    /// Retained messages (`[limits] max_retained_messages`, `max_retained_bytes`).
    pub(crate) retained: RetainedStore,
    /// The node's own `$SYS` topics, retained apart: outside the caps (a dozen topics rewritten
    /// in place) and never written to a backend (meaningless after a restart).
    sys: RetainedStore,
    /// MQTT packets read from clients.
    pub(crate) received: Traffic,
    /// MQTT packets framed for clients.
    pub(crate) sent: Traffic,
    /// Default-mode MQTT connections open now.
    clients: AtomicUsize,
    started: Instant,
    /// `[mqtt] sys_interval` in seconds; 0: no `$SYS`.
    sys_interval: u64,
    sys_started: AtomicBool,
    /// Set when the node has a cluster bus: the queue to the task forwarding publishes to the
    /// other gates.
    forward: OnceLock<Forwarder>,
    /// The cluster's shared copy of the retained messages (a NATS KV bucket, a Redis hash),
    /// written for the changes made here, not for those forwarded by other gates.
    shared: OnceLock<Arc<dyn RetainedBackend>>,
    /// `[node] call_timeout_s`: the deadline of a forward.
    call_timeout: Duration,
    /// The gate, once a client connected: where a session take from another gate finds the
    /// connections holding a client id.
    gate: OnceLock<Weak<Gate>>,
    /// Work to run in the gate module's mailbox order ([`Broker::in_gate_order`]), by id.
    ordered: OrderedJobs,
    next_ordered: AtomicU64,
    /// Seconds since `started` of the last "another gate did not answer" line.
    logged_take_failure: AtomicU64,
}

/// A job run by the gate module's `MqttInOrder` handler.
type OrderedJob = Box<dyn FnOnce() + Send>;

/// The jobs waiting for the gate module, by id.
#[derive(Default)]
struct OrderedJobs(Mutex<HashMap<u64, OrderedJob>>);

impl std::fmt::Debug for OrderedJobs {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "OrderedJobs({})", self.0.lock().len())
    }
}

impl Broker {
    pub(crate) fn new(config: &Config) -> Self {
        Broker {
            retained: RetainedStore::new(
                config.limits.max_retained_messages,
                config.limits.max_retained_bytes,
            ),
            sys: RetainedStore::new(usize::MAX, usize::MAX),
            received: Traffic::default(),
            sent: Traffic::default(),
            clients: AtomicUsize::new(0),
            started: Instant::now(),
            sys_interval: config.mqtt.sys_interval,
            sys_started: AtomicBool::new(false),
            forward: OnceLock::new(),
            shared: OnceLock::new(),
            call_timeout: Duration::from_secs(config.node.call_timeout_s.max(1)),
            gate: OnceLock::new(),
            ordered: OrderedJobs::default(),
            next_ordered: AtomicU64::new(1),
            logged_take_failure: AtomicU64::new(0),
        }
    }

    /// Run `f` in the order of the calls this gate's gate module takes: after every call that
    /// reached its mailbox before (the publishes other gates forwarded so far), before those
    /// arriving after. A session handed over from another gate is imported this way, so a
    /// publish of that gate is delivered to it exactly once: either it was in the session's
    /// queue (forwarded before the answer, it reaches this gate's subscribers before the import)
    /// or it was published after the handover (forwarded after the answer, delivered after the
    /// import). Runs `f` here if the gate module cannot be reached.
    pub(crate) async fn in_gate_order<R: Send + 'static>(
        &self,
        node: &dyn Host,
        f: impl FnOnce() -> R + Send + 'static,
    ) -> R {
        let (tx, rx) = tokio::sync::oneshot::channel();
        let job: OrderedJob = Box::new(move || {
            let _ = tx.send(f());
        });
        let own = node.session_table().gate_id().clone();
        let target = node.router().resolve_instance(&own);
        match target {
            None => job(),
            Some(target) => {
                let id = self.next_ordered.fetch_add(1, Ordering::Relaxed);
                self.ordered.0.lock().insert(id, job);
                let deadline = tokio::time::Instant::now() + TAKE_TIMEOUT;
                let call = target
                    .call(ORDER_HANDLER, deadline)
                    .body(Bytes::copy_from_slice(&id.to_be_bytes()));
                let r = match node.router().call(&target, call).await {
                    Ok(pending) => pending.await,
                    Err(e) => Err(e),
                };
                // not run by the gate module (it failed or timed out): run it now, once
                let left = self.ordered.0.lock().remove(&id);
                if let Some(job) = left {
                    if let Err(e) = r {
                        tracing::debug!(error = %e, "the gate module did not run an ordered job; running it here");
                    }
                    job();
                }
            }
        }
        rx.await
            .expect("an ordered job runs exactly once and sends its result")
    }

    /// The gate module's `MqttInOrder`: run the job `body` names, if it still waits.
    fn run_ordered(&self, body: &[u8]) -> Result<(), CallError> {
        let id = <[u8; 8]>::try_from(body)
            .map(u64::from_be_bytes)
            .map_err(|_| CallError::bad_request(Detail::new("an ordered job id is 8 bytes")))?;
        let job = self.ordered.0.lock().remove(&id);
        if let Some(job) = job {
            job();
        }
        Ok(())
    }

    /// Remember the gate this broker belongs to (each MQTT connection calls this; only the
    /// first sets it).
    pub(crate) fn know_gate(&self, gate: &Arc<Gate>) {
        if self.gate.get().is_none() {
            let _ = self.gate.set(Arc::downgrade(gate));
        }
    }

    /// The other gates of the cluster, or `None` when there are none (a node without a bus, a
    /// cluster of one gate: two atomic loads until the routing table changes).
    pub(crate) fn other_gates(&self, node: &dyn Host) -> Option<Vec<crate::router::Target>> {
        let f = self.forward.get()?;
        if !f.has_peers(node) {
            return None;
        }
        let own = node.session_table().gate_id().clone();
        let mut gates = node.router().instances(GATE_MODULE);
        gates.retain(|t| t.instance != own);
        (!gates.is_empty()).then_some(gates)
    }

    /// Publish to subscribers as a client's PUBLISH does: kept first when `retain` is set (an
    /// empty payload deletes), then one shared message to every matching subscription. A
    /// retained message over a cap is refused (logged, counted) and still delivered.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn publish(
        &self,
        node: &dyn Host,
        peer: &SocketAddr,
        topic: &str,
        topic_bytes: Bytes,
        qos: u8,
        payload: Bytes,
        retain: bool,
    ) -> usize {
        if retain {
            self.retain(peer, topic, qos, payload.clone(), self.shared.get());
        }
        let forward = match self.forward.get() {
            Some(f) if f.has_peers(node) => Some((f, topic_bytes.clone(), payload.clone())),
            _ => None,
        };
        let n = node
            .subscriptions()
            .publish(topic, qos, topic_bytes, payload);
        if let Some((f, topic, payload)) = forward {
            f.send(Forwarded {
                topic,
                qos,
                retain,
                payload,
            });
        }
        n
    }

    /// A publish another gate forwarded: kept when retained (in this gate's store and its
    /// durable backend, not in the shared copy: the first gate wrote that), then to this gate's
    /// subscribers. Never forwarded again. Returns the subscribers reached.
    pub(crate) fn publish_forwarded(&self, node: &dyn Host, f: Forwarded) -> usize {
        let topic = std::str::from_utf8(&f.topic).unwrap_or_default();
        metrics::counter!("warren_mqtt_forwards_received_total").increment(1);
        if f.retain {
            self.retain(&FORWARDED_PEER, topic, f.qos, f.payload.clone(), None);
        }
        node.subscriptions()
            .publish(topic, f.qos, f.topic.clone(), f.payload)
    }

    /// Keep (or, with an empty payload, delete) the retained message of `topic`, writing the
    /// change through to `shared` as well when given.
    fn retain(
        &self,
        peer: &SocketAddr,
        topic: &str,
        qos: u8,
        payload: Bytes,
        shared: Option<&Arc<dyn RetainedBackend>>,
    ) {
        match self
            .retained
            .set_with(topic, qos, payload, shared.map(|b| &**b))
        {
            Ok(Retain::Added | Retain::Deleted) => {
                metrics::gauge!("warren_retained_messages").set(self.retained.len() as f64);
            }
            Ok(Retain::Replaced | Retain::Nothing) => {}
            Err(full) => {
                let why = format!("retained message on {:?} not kept: {full}", preview(topic));
                refusal::refuse(peer, full.kind(), why);
            }
        }
    }

    /// A default-mode client connected: counted, and the `$SYS` updates start with the first.
    pub(crate) fn client_connected(&self, gate: &Arc<Gate>) {
        self.clients.fetch_add(1, Ordering::Relaxed);
        if self.sys_interval > 0 && !self.sys_started.swap(true, Ordering::AcqRel) {
            // the first values are there before this client's CONNACK
            self.publish_sys(&*gate.node, true);
            let weak = Arc::downgrade(gate);
            let every = Duration::from_secs(self.sys_interval);
            gate.tracker.spawn(sys_loop(
                weak,
                gate.draining.clone(),
                gate.killing.clone(),
                every,
            ));
        }
    }

    /// A default-mode client's connection ended.
    pub(crate) fn client_left(&self) {
        self.clients.fetch_sub(1, Ordering::Relaxed);
    }

    /// Whether any topic retains a message (the node's own `$SYS` topics included).
    pub(crate) fn has_retained(&self) -> bool {
        !self.retained.is_empty() || !self.sys.is_empty()
    }

    /// Publish the `$SYS/broker/...` topics, retained (in `sys`), to their subscribers.
    fn publish_sys(&self, node: &dyn Host, first: bool) {
        let (rx_packets, rx_bytes, rx_publishes) = self.received.totals();
        let (tx_packets, tx_bytes, tx_publishes) = self.sent.totals();
        let mut values: Vec<(&str, String)> = vec![
            (
                "$SYS/broker/uptime",
                format!("{} seconds", self.started.elapsed().as_secs()),
            ),
            (
                "$SYS/broker/clients/connected",
                self.clients.load(Ordering::Relaxed).to_string(),
            ),
            ("$SYS/broker/messages/received", rx_packets.to_string()),
            ("$SYS/broker/messages/sent", tx_packets.to_string()),
            (
                "$SYS/broker/publish/messages/received",
                rx_publishes.to_string(),
            ),
            (
                "$SYS/broker/publish/messages/sent",
                tx_publishes.to_string(),
            ),
            ("$SYS/broker/bytes/received", rx_bytes.to_string()),
            ("$SYS/broker/bytes/sent", tx_bytes.to_string()),
            (
                "$SYS/broker/subscriptions/count",
                node.subscriptions().len().to_string(),
            ),
        ];
        if first {
            values.push((
                "$SYS/broker/version",
                format!("warren version {}", env!("CARGO_PKG_VERSION")),
            ));
        }
        for (topic, value) in values {
            self.sys_topic(node, topic, value);
        }
        // as mosquitto, the count includes the $SYS topics themselves
        let count = self.retained.len() + self.sys.len() + usize::from(first);
        self.sys_topic(
            node,
            "$SYS/broker/retained messages/count",
            count.to_string(),
        );
    }

    fn sys_topic(&self, node: &dyn Host, topic: &str, value: String) {
        let payload = Bytes::from(value);
        let _ = self.sys.set(topic, 0, payload.clone());
        let topic_bytes = Bytes::copy_from_slice(topic.as_bytes());
        node.subscriptions().publish(topic, 0, topic_bytes, payload);
    }
}

/// The module type of the gate module that every node runs (`crate::node`'s `GATE`, defined
/// here, below the node layer, so that the forwarder can name it).
pub(crate) const GATE_MODULE: &str = "Gate";

/// The handler of the gate module `Gate` that takes a publish forwarded by another gate.
pub(crate) const FORWARD_HANDLER: &str = "MqttPublish";

/// Publishes waiting for the forwarder task; past it a publish is not forwarded (counted and
/// logged): a bus slower than the clients must not grow the node's memory.
const FORWARD_QUEUE: usize = 16_384;

/// The peer logged with a refusal of a forwarded publish: it has no client on this gate.
const FORWARDED_PEER: SocketAddr =
    SocketAddr::new(std::net::IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED), 0);

/// The queue to the task that forwards this gate's publishes to the other gates, and whether
/// there are any (worked out again only when the routing table changes).
#[derive(Debug)]
struct Forwarder {
    tx: tokio::sync::mpsc::Sender<ForwardJob>,
    /// The router generation `peers` was worked out at (`u64::MAX`: never).
    seen: AtomicU64,
    /// Whether the cluster has a gate besides this one.
    peers: AtomicBool,
    /// Seconds since `started` of the last "queue full" line (one a second at most).
    logged_full: AtomicU64,
    started: Instant,
}

impl Forwarder {
    /// Whether another gate may need this gate's publishes: a cluster of one gate forwards
    /// nothing. Two atomic loads unless the routing table changed.
    fn has_peers(&self, node: &dyn Host) -> bool {
        let generation = node.router().generation();
        if self.seen.load(Ordering::Acquire) != generation {
            let own = node.session_table().gate_id();
            let peers = node
                .router()
                .instances(GATE_MODULE)
                .iter()
                .any(|t| t.instance != *own);
            self.peers.store(peers, Ordering::Relaxed);
            self.seen.store(generation, Ordering::Release);
        }
        self.peers.load(Ordering::Relaxed)
    }

    /// Wait (at most `wait`) until every publish queued before this call has been handed to
    /// the bus: what is sent after it reaches each other gate after them. Whether it got there.
    async fn barrier(&self, wait: Duration) -> bool {
        let (tx, rx) = tokio::sync::oneshot::channel();
        let sent = tokio::time::timeout(wait, self.tx.send(ForwardJob::Barrier(tx))).await;
        matches!(sent, Ok(Ok(()))) && matches!(tokio::time::timeout(wait, rx).await, Ok(Ok(())))
    }

    fn send(&self, f: Forwarded) {
        if let Err(tokio::sync::mpsc::error::TrySendError::Full(ForwardJob::Publish(f))) =
            self.tx.try_send(ForwardJob::Publish(f))
        {
            metrics::counter!("warren_mqtt_forwards_dropped_total", "reason" => "queue_full")
                .increment(1);
            let now = self.started.elapsed().as_secs() + 1;
            if self.logged_full.swap(now, Ordering::Relaxed) != now {
                tracing::warn!(
                    topic = preview(std::str::from_utf8(&f.topic).unwrap_or_default()),
                    queue = FORWARD_QUEUE,
                    "the queue of publishes to the other gates is full: a publish reaches only \
                     this gate's subscribers"
                );
            }
        }
    }
}

/// What the forwarder task takes from its queue.
#[derive(Debug)]
enum ForwardJob {
    /// A publish to send to every other gate.
    Publish(Forwarded),
    /// Answered once every publish queued before it has been handed to the bus.
    Barrier(tokio::sync::oneshot::Sender<()>),
}

/// Make `gate`'s broker part of a cluster: its publishes are forwarded to the other gates from
/// now on, and its retained messages are shared through `shared` (loaded from it now, before
/// any client connects). Called once, at start, on a node with a cluster bus.
pub(crate) fn join_cluster(gate: &Gate, shared: Option<SharedRetained>) {
    let broker = &gate.broker;
    if let Some(SharedRetained { backend, entries }) = shared {
        let stored = entries.len();
        let kept = broker.retained.load(entries);
        metrics::gauge!("warren_retained_messages").set(broker.retained.len() as f64);
        tracing::info!(
            stored,
            kept,
            "retained messages loaded from the cluster's shared store"
        );
        let _ = broker.shared.set(backend);
    }
    let (tx, rx) = tokio::sync::mpsc::channel(FORWARD_QUEUE);
    let forwarder = Forwarder {
        tx,
        seen: AtomicU64::new(u64::MAX),
        peers: AtomicBool::new(false),
        logged_full: AtomicU64::new(0),
        started: Instant::now(),
    };
    if broker.forward.set(forwarder).is_ok() {
        tokio::spawn(forward_loop(
            gate.node.clone(),
            rx,
            gate.killing.clone(),
            broker.call_timeout,
        ));
    }
}

/// Send each queued publish to every other gate, in the order they were queued, until the node
/// is killed or the broker is gone.
async fn forward_loop(
    node: Arc<dyn Host>,
    mut rx: tokio::sync::mpsc::Receiver<ForwardJob>,
    killing: tokio_util::sync::CancellationToken,
    call_timeout: Duration,
) {
    let mut last_warned: Option<Instant> = None;
    // the other gates, worked out again only when the routing table changes
    let mut peers: (u64, Vec<crate::router::Target>) = (u64::MAX, Vec::new());
    loop {
        let f = tokio::select! {
            _ = killing.cancelled() => break,
            f = rx.recv() => match f {
                Some(ForwardJob::Publish(f)) => f,
                Some(ForwardJob::Barrier(done)) => {
                    let _ = done.send(());
                    continue;
                }
                None => break,
            },
        };
        let generation = node.router().generation();
        if peers.0 != generation {
            let own = node.session_table().gate_id().clone();
            let mut gates = node.router().instances(GATE_MODULE);
            gates.retain(|t| t.instance != own);
            peers = (generation, gates);
        }
        let body = f.encode();
        for gate in &peers.1 {
            let deadline = tokio::time::Instant::now() + call_timeout;
            let call = gate.call(FORWARD_HANDLER, deadline).body(body.clone());
            match node.router().call_nr(gate, call).await {
                Ok(()) => metrics::counter!("warren_mqtt_forwards_sent_total").increment(1),
                Err(e) => {
                    metrics::counter!("warren_mqtt_forwards_dropped_total", "reason" => "bus")
                        .increment(1);
                    if last_warned.is_none_or(|t| t.elapsed() >= Duration::from_secs(1)) {
                        last_warned = Some(Instant::now());
                        tracing::warn!(gate = %gate.instance, error = %e, "a publish did not reach another gate");
                    }
                }
            }
        }
    }
}

/// The handler of the gate module `Gate` that hands a persistent session over to another gate
/// (or discards it, and closes a connection holding the client id).
pub(crate) const TAKE_HANDLER: &str = "MqttTakeSession";

/// The handler of the gate module `Gate` that runs a job of this gate in its mailbox order
/// ([`Broker::in_gate_order`]).
pub(crate) const ORDER_HANDLER: &str = "MqttInOrder";

/// How long a CONNECT waits for the other gates' answers about its client id.
pub(crate) const TAKE_TIMEOUT: Duration = Duration::from_secs(2);

/// How long the gate holding the session waits for its connection to hand back its unsent
/// messages (half the asker's deadline: the answer must still reach it).
const TAKE_DETACH_WAIT_MS: u64 = 1000;

/// Most bytes of a handed-over session: one message of every bus (NATS carries 1 MiB by
/// default), with room for the frame around it.
pub(crate) const HANDOVER_MAX_BYTES: usize = 960 * 1024;

/// What a gate asks the others for when a client connects (JSON: it is small and fixed).
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
struct TakeRequest {
    client_id: String,
    /// The verified user connecting (`None`: anonymous): a session or connection of another
    /// user is not touched and the answer is "refused".
    owner: Option<String>,
    /// Hand the session over (`clean_session = 0` with no session on the asking gate); else
    /// discard it.
    take: bool,
    /// How long to wait for the session's connection to detach, in milliseconds.
    wait_ms: u64,
    /// The asking gate's caps ([`handover::Limits`]): what they do not hold is dropped here.
    max_filters: usize,
    max_topic_len: usize,
    max_messages: usize,
    max_awaiting: usize,
    max_bytes: usize,
}

/// The caps a handed-over session is read under: this gate's `[limits]`.
pub(crate) fn handover_caps(limits: &crate::config::LimitsConfig) -> handover::Limits {
    handover::Limits {
        max_filters: limits.max_filters_per_session,
        max_topic_len: limits.max_topic_len,
        max_messages: limits
            .max_inflight_messages
            .saturating_add(limits.max_queued_messages),
        max_awaiting: crate::mqtt_session::MAX_AWAITING_REL,
        max_bytes: HANDOVER_MAX_BYTES,
    }
}

/// What the other gates answered about a client id.
#[derive(Debug)]
pub(crate) enum Taken {
    /// No other gate holds a session of it (or none answered in time).
    Nothing,
    /// Another gate holds it for another user: the connection is refused.
    Refused,
    /// The session, detached and removed from the gate that held it.
    Session(Box<Handover>),
}

/// Ask every other gate about `client_id` (handler `MqttTakeSession`, deadline
/// [`TAKE_TIMEOUT`]): each closes a connection of it and discards its session, or (when `take`
/// says so, asked only once there are other gates) hands the session over. `None` when there is
/// no other gate (nothing is sent). A gate that does not answer in time is logged and counts as
/// holding nothing.
pub(crate) async fn take_from_other_gates(
    gate: &Gate,
    client_id: &str,
    owner: Option<&str>,
    take: impl FnOnce() -> bool,
) -> Option<Taken> {
    let peers = gate.broker.other_gates(&*gate.node)?;
    let take = take();
    let caps = handover_caps(&gate.limits);
    let req = TakeRequest {
        client_id: client_id.to_owned(),
        owner: owner.map(str::to_owned),
        take,
        wait_ms: TAKE_DETACH_WAIT_MS,
        max_filters: caps.max_filters,
        max_topic_len: caps.max_topic_len,
        max_messages: caps.max_messages,
        max_awaiting: caps.max_awaiting,
        max_bytes: caps.max_bytes,
    };
    let body = match serde_json::to_vec(&req) {
        Ok(b) => Bytes::from(b),
        Err(e) => {
            tracing::warn!(client_id, error = %e, "cannot encode a session take request");
            return Some(Taken::Nothing);
        }
    };
    let deadline = tokio::time::Instant::now() + TAKE_TIMEOUT;
    let router = gate.node.router();
    let calls = peers.iter().map(|t| {
        let call = t.call(TAKE_HANDLER, deadline).body(body.clone());
        async move {
            let r = match router.call(t, call).await {
                Ok(pending) => pending.await,
                Err(e) => Err(e),
            };
            (t, r)
        }
    });
    let answers = futures_util::future::join_all(calls).await;
    let mut taken = Taken::Nothing;
    let mut refused = false;
    for (t, r) in answers {
        let body = match r {
            Ok(b) => b,
            Err(e) => {
                metrics::counter!("warren_mqtt_session_takes_failed_total").increment(1);
                // one line a second at most: a gate gone silent fails every CONNECT until the
                // registry drops it
                let now = gate.broker.started.elapsed().as_secs() + 1;
                if gate.broker.logged_take_failure.swap(now, Ordering::Relaxed) != now {
                    tracing::warn!(gate = %t.instance, client_id, error = %e, take, "another gate did not answer about the client id's session; going on without it");
                }
                continue;
            }
        };
        match Answer::decode(body, &caps) {
            Ok(Answer::None) => {}
            Ok(Answer::Refused) => refused = true,
            Ok(Answer::Session(h)) => {
                if matches!(taken, Taken::Nothing) {
                    tracing::info!(gate = %t.instance, client_id, filters = h.filters.len(), messages = h.messages.len(), "persistent session taken over from another gate");
                    taken = Taken::Session(Box::new(h));
                } else {
                    tracing::warn!(gate = %t.instance, client_id, "a second gate also held a session of the client id; its session is dropped");
                }
            }
            Err(e) => {
                metrics::counter!("warren_mqtt_session_takes_failed_total").increment(1);
                let why = format!(
                    "session of {:?} from gate {}: {e}",
                    preview(client_id),
                    t.instance
                );
                refusal::refuse(&FORWARDED_PEER, e.kind(), why);
            }
        }
    }
    if refused {
        if matches!(taken, Taken::Session(_)) {
            tracing::warn!(
                client_id,
                "another gate refused the client id; the session handed over by a third is dropped"
            );
        }
        return Some(Taken::Refused);
    }
    Some(taken)
}

/// The gate module's way to this gate's broker, set once the gate exists: a publish forwarded
/// before that (or after the gate is gone) reaches nobody here.
#[derive(Debug, Default)]
pub(crate) struct BrokerSlot(OnceLock<Weak<Broker>>);

impl BrokerSlot {
    /// The gate's broker is `broker`.
    pub(crate) fn set(&self, broker: &Arc<Broker>) {
        let _ = self.0.set(Arc::downgrade(broker));
    }

    /// Deliver a publish another gate forwarded (the gate module's `MqttPublish`): a body that
    /// does not decode is refused with a typed error, logged and counted.
    pub(crate) fn deliver(&self, node: &dyn Host, body: Bytes) -> Result<usize, CallError> {
        let f = match Forwarded::decode(body) {
            Ok(f) => f,
            Err(e) => {
                refusal::refuse(&FORWARDED_PEER, e.kind(), &e);
                return Err(CallError::bad_request(Detail::new(e.to_string())));
            }
        };
        match self.0.get().and_then(Weak::upgrade) {
            Some(broker) => Ok(broker.publish_forwarded(node, f)),
            None => Ok(0),
        }
    }
}

impl BrokerSlot {
    /// The gate module's `MqttInOrder` (see [`Broker::in_gate_order`]).
    pub(crate) fn run_ordered(&self, body: &[u8]) -> Result<(), CallError> {
        match self.0.get().and_then(Weak::upgrade) {
            Some(broker) => broker.run_ordered(body),
            None => Ok(()),
        }
    }

    /// Another gate asks about a client id (the gate module's `MqttTakeSession`, see
    /// [`take_from_other_gates`]): close a connection of it here, as a takeover does (its will
    /// is published), and take its persistent session out of this gate (its store, its durable
    /// rows, its subscriptions in the trie). Answers the session (when asked to take it and it
    /// has not expired), "none", or "refused" when the client id here is another user's. Only
    /// one asker gets a session: it leaves the store under its lock.
    pub(crate) async fn take_session(
        &self,
        node: &dyn Host,
        body: Bytes,
    ) -> Result<Bytes, CallError> {
        let req: TakeRequest = match serde_json::from_slice(&body) {
            Ok(r) => r,
            Err(e) => {
                let why = format!("a session take request that does not decode: {e}");
                refusal::refuse(&FORWARDED_PEER, "mqtt_take_malformed", &why);
                return Err(CallError::bad_request(Detail::new(why)));
            }
        };
        let client_id = req.client_id.as_str();
        let owner = req.owner.as_deref();
        let broker = self.0.get().and_then(Weak::upgrade);
        let gate = broker
            .as_ref()
            .and_then(|b| b.gate.get().and_then(Weak::upgrade));
        if let Some(gate) = &gate {
            let holder = gate.client_ids.lock().get(client_id).cloned();
            if let Some((h, holder_uid)) = holder
                && !h.is_closed()
            {
                if holder_uid.as_deref() != owner {
                    tracing::info!(
                        client_id,
                        "client id asked for by another gate for another user; refused"
                    );
                    return Ok(Answer::Refused.encode());
                }
                tracing::info!(client_id, session = %h.id(), "client id taken over by a connection on another gate; closing this one");
                h.close();
            }
        }
        let subs = node.subscriptions();
        let state = match subs.sessions().take(client_id, owner) {
            Ok(Some(s)) => s,
            Ok(None) => return Ok(Answer::None.encode()),
            Err(e) => {
                tracing::info!(client_id, error = %e, "session asked for by another gate for another user; refused");
                return Ok(Answer::Refused.encode());
            }
        };
        if state.is_attached()
            && !state
                .wait_detached(Duration::from_millis(req.wait_ms.min(TAKE_DETACH_WAIT_MS)))
                .await
        {
            tracing::debug!(
                client_id,
                "the session's connection is still attached; handing over what it holds now"
            );
        }
        if !req.take || state.expired(Instant::now()) {
            tracing::debug!(
                client_id,
                "session discarded for a connection on another gate"
            );
            subs.discard_session(&state);
            return Ok(Answer::None.encode());
        }
        let caps = handover::Limits {
            max_filters: req.max_filters,
            max_topic_len: req.max_topic_len,
            max_messages: req.max_messages,
            max_awaiting: req.max_awaiting,
            max_bytes: req.max_bytes.min(HANDOVER_MAX_BYTES),
        };
        let (h, filters) = state.hand_over(&caps);
        for f in &filters {
            subs.unsubscribe(f, state.id());
        }
        // what this gate published before the handover reaches the asker before the answer
        if let Some(f) = broker.as_ref().and_then(|b| b.forward.get())
            && !f.barrier(Duration::from_millis(TAKE_DETACH_WAIT_MS)).await
        {
            tracing::debug!(
                client_id,
                "the forwarder did not drain before the handover answer"
            );
        }
        metrics::counter!("warren_mqtt_sessions_handed_over_total").increment(1);
        tracing::info!(
            client_id,
            filters = h.filters.len(),
            messages = h.messages.len(),
            "persistent session handed over to another gate"
        );
        Ok(Answer::Session(h).encode())
    }
}

/// Publish the `$SYS` topics every `every` until the gate drains, is killed or is gone.
async fn sys_loop(
    gate: Weak<Gate>,
    draining: tokio_util::sync::CancellationToken,
    killing: tokio_util::sync::CancellationToken,
    every: Duration,
) {
    let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = draining.cancelled() => break,
            _ = killing.cancelled() => break,
            _ = tick.tick() => {
                let Some(gate) = gate.upgrade() else { break };
                gate.broker.publish_sys(&*gate.node, false);
            }
        }
    }
}

/// The start of a client-chosen topic for a log line (at most 64 bytes).
pub(crate) fn preview(t: &str) -> &str {
    let mut end = t.len().min(64);
    while !t.is_char_boundary(end) {
        end -= 1;
    }
    &t[..end]
}

/// Whether `topic` is one of the node's own: clients may not publish under `$SYS`.
pub(crate) fn is_sys(topic: &str) -> bool {
    topic == "$SYS" || topic.starts_with("$SYS/")
}

/// After a SUBACK: send every retained message matching each granted `(filter, QoS)`, with the
/// retain flag set, at the lower of its QoS and the granted one, through the connection's framer
/// (so that a copy at QoS 1 or 2 takes a packet id and a slot of the inflight window like any
/// other message).
pub(crate) async fn send_retained<T: Send + Unpin + 'static>(
    broker: &Broker,
    conn: &mut SessionConn<T>,
    granted: &[(String, u8)],
) -> Result<(), End> {
    let mut found = Vec::new();
    for (filter, qos) in granted {
        found.clear();
        broker.retained.matching(filter, &mut found);
        // only a filter starting with '$' matches a '$' topic
        if filter.starts_with('$') {
            broker.sys.matching(filter, &mut found);
        }
        for m in &found {
            metrics::counter!("warren_retained_deliveries_total").increment(1);
            let msg = Message::retained(m.topic.clone(), m.payload.clone());
            let qos = Some(m.qos.min(*qos));
            conn.send(Outbound::Message { msg, qos }).await?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::BytesMut;
    use warren_proto::mqtt::{self, QoS};

    #[test]
    fn a_retained_copy_carries_the_retain_flag_and_a_forwarded_message_does_not() {
        for (msg, retain) in [
            (Message::retained("a/b", "kept"), true),
            (Message::new("a/b", "live"), false),
        ] {
            let mut bytes = BytesMut::from(&msg.mqtt_qos0()[..]);
            match mqtt::decode(&mut bytes, 1 << 20) {
                Ok(Some(mqtt::Packet::Publish(p))) => {
                    assert_eq!((p.retain, p.qos), (retain, QoS::AtMostOnce));
                }
                other => panic!("{other:?}"),
            }
        }
    }

    #[test]
    fn traffic_sums_its_shards() {
        let t = Arc::new(Traffic::default());
        let handles: Vec<_> = (0..4)
            .map(|_| {
                let t = t.clone();
                std::thread::spawn(move || {
                    for _ in 0..1000 {
                        t.add(1, 10, 1);
                    }
                })
            })
            .collect();
        for h in handles {
            h.join().expect("thread");
        }
        t.add(1, 2, 0);
        assert_eq!(t.totals(), (4001, 40002, 4000));
    }

    #[test]
    fn sys_topics() {
        assert!(is_sys("$SYS/broker/uptime"));
        assert!(is_sys("$SYS"));
        assert!(!is_sys("$SYSTEM/x"));
        assert!(!is_sys("a/$SYS"));
    }
}

//! Sessions: what the gate knows about one client connection, and the table of live ones.
//!
//! A connection task owns its socket; everything else reaches the client through the session's
//! [`SessionHandle`]: a bounded outbound queue (pushes, replies) and a cancellation token (close).
//! Handlers receive a [`Session`] *snapshot*; session operations (docs/protocols/mqtt.md) go to the
//! [`SessionTable`] of the gate that owns the connection.

use parking_lot::RwLock;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};

use arc_swap::ArcSwap;
use bytes::Bytes;
use serde_json::{Map, Value};
use tokio::sync::mpsc;

use crate::error::CallError;

/// A session id: a random UUIDv4, lowercase with dashes, shared cheaply.
pub type SessionId = Arc<str>;

/// How a client connected (tcp, ws) and which protocol it speaks: named once, with the
/// listener configuration that decides them (config/listener.rs).
pub use crate::config::{Network, Protocol};

/// A snapshot of one session, as handlers see it.
#[derive(Debug, Clone, PartialEq)]
pub struct Session {
    /// Session id.
    pub id: SessionId,
    /// User id, set by `bind`.
    pub uid: Option<String>,
    /// Free-form settings, `{}` at connect.
    pub settings: Map<String, Value>,
    /// Remote address of the connection.
    pub remote: SocketAddr,
    /// Network of the connection (tcp or ws).
    pub network: Network,
    /// Client protocol of the connection.
    pub protocol: Protocol,
    /// Id of the gate instance that owns the connection (mqant `Serverid`).
    pub gate: Arc<str>,
}

impl Session {
    /// The mqant session export map (docs/protocols/mqtt.md, "Session export map"): the first
    /// argument of every mqant RPC. Keys with empty values are omitted; keys come out in
    /// alphabetical order.
    pub fn export_map(&self) -> Value {
        let mut m = Map::new();
        m.insert("IP".into(), Value::String(self.remote.to_string()));
        // upstream reports the socket kind, which is TCP under WebSocket too
        m.insert("Network".into(), Value::String("tcp".into()));
        m.insert("Serverid".into(), Value::String(self.gate.to_string()));
        m.insert("Sessionid".into(), Value::String(self.id.to_string()));
        m.insert("Settings".into(), Value::Object(self.settings.clone()));
        if let Some(uid) = self.uid.as_deref().filter(|u| !u.is_empty()) {
            m.insert("Userid".into(), Value::String(uid.to_owned()));
        }
        Value::Object(m)
    }

    /// Read a session back from an export map (the form session operations return).
    pub fn from_export_map(v: &Value, network: Network) -> Option<Session> {
        let o = v.as_object()?;
        let s = |k: &str| o.get(k).and_then(Value::as_str);
        Some(Session {
            id: s("Sessionid")?.into(),
            uid: s("Userid").map(str::to_owned),
            settings: o
                .get("Settings")
                .and_then(Value::as_object)
                .cloned()
                .unwrap_or_default(),
            remote: s("IP")?.parse().ok()?,
            network,
            protocol: Protocol::Mqtt,
            gate: s("Serverid")?.into(),
        })
    }

    /// The key the router hashes on: the uid once bound, the session id before.
    pub fn hash_key(&self) -> &str {
        self.uid.as_deref().unwrap_or(&self.id)
    }
}

/// One message for a client: a topic (route) and a body. Built once and shared by every recipient
/// of a broadcast; each protocol's encoding of it is also built once, by the first connection of
/// that protocol that writes it, and then shared (a room with members on four protocols costs four
/// encodings, not one per member).
#[derive(Debug)]
pub struct Message {
    /// Topic the message is published on (a push route, or the request topic for a reply).
    pub topic: Bytes,
    /// Body bytes, unchanged.
    pub body: Bytes,
    /// MQTT: sent with the retain flag set (a retained message's copy on SUBSCRIBE); every
    /// other delivery has it clear.
    pub retain: bool,
    frames: [OnceLock<Bytes>; FrameKind::COUNT],
}

/// The protocol encodings a [`Message`] caches.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FrameKind {
    /// A complete MQTT QoS 0 PUBLISH (QoS 1 needs a per-connection packet id).
    MqttQos0 = 0,
    /// A pomelo push package.
    Pomelo = 1,
    /// A JSON-over-WebSocket frame.
    Json = 2,
    /// A line-protocol frame.
    Line = 3,
}

impl FrameKind {
    const COUNT: usize = 4;
}

impl Message {
    /// A shared message.
    pub fn new(topic: impl Into<Bytes>, body: impl Into<Bytes>) -> Arc<Message> {
        Arc::new(Message {
            topic: topic.into(),
            body: body.into(),
            retain: false,
            frames: Default::default(),
        })
    }

    /// A retained message's copy for one MQTT subscriber: framed with the retain flag set, and
    /// at QoS ≥ 1 sent through the session's inflight window like any other message.
    pub fn retained(topic: impl Into<Bytes>, body: impl Into<Bytes>) -> Arc<Message> {
        Arc::new(Message {
            topic: topic.into(),
            body: body.into(),
            retain: true,
            frames: Default::default(),
        })
    }

    /// This message's encoding for one protocol, built on first use.
    pub fn frame(&self, kind: FrameKind, build: impl FnOnce(&Message) -> Bytes) -> &Bytes {
        self.frames[kind as usize].get_or_init(|| build(self))
    }

    /// The complete MQTT QoS 0 PUBLISH for this message.
    pub fn mqtt_qos0(&self) -> &Bytes {
        self.frame(FrameKind::MqttQos0, |m| {
            let mut b = bytes::BytesMut::with_capacity(m.topic.len() + m.body.len() + 7);
            warren_proto::mqtt::encode_publish(
                &mut b,
                &m.topic,
                warren_proto::mqtt::QoS::AtMostOnce,
                m.retain,
                false,
                0,
                &m.body,
            );
            b.freeze()
        })
    }
}

/// Protocol bytes small enough to travel inside a queue slot without an allocation (acks, pings).
#[derive(Debug, Clone, Copy)]
pub struct InlineFrame {
    len: u8,
    buf: [u8; 14],
}

impl InlineFrame {
    /// Wrap up to 14 bytes; longer input is truncated (callers only pass fixed-size control packets).
    pub fn new(bytes: &[u8]) -> Self {
        let len = bytes.len().min(14);
        let mut buf = [0u8; 14];
        buf[..len].copy_from_slice(&bytes[..len]);
        InlineFrame {
            len: len as u8,
            buf,
        }
    }

    /// The wrapped bytes.
    pub fn as_bytes(&self) -> &[u8] {
        &self.buf[..self.len as usize]
    }
}

/// An item on a session's outbound queue. The connection's writer frames each one in its protocol
/// and coalesces everything queued into one socket write.
#[derive(Debug)]
pub enum Outbound {
    /// A push or reply; `qos` caps the delivery QoS (plain MQTT subscriptions), `None` means the
    /// listener's push QoS.
    Message {
        /// The shared message.
        msg: Arc<Message>,
        /// Delivery QoS cap, if any.
        qos: Option<u8>,
    },
    /// Pre-encoded small protocol bytes.
    Inline(InlineFrame),
    /// Pre-encoded protocol bytes (boxed, so that every queue slot stays 16 bytes).
    Bytes(Box<Bytes>),
    /// Flush what is queued, then close the connection.
    Close,
    /// Flush, then close with this WebSocket close code (plain close on TCP).
    CloseCode(u16),
}

/// Bytes counted for a [`Outbound::Message`] beyond its topic and body: the largest fixed header
/// any protocol frames it with.
const MESSAGE_OVERHEAD: usize = 16;

impl Outbound {
    /// The bytes this item is counted for while it waits in a queue: topic + body + header for a
    /// message (a shared broadcast message counts in full in every queue it is in: that is what
    /// each queue may keep alive), the length of pre-encoded bytes, nothing for a close.
    pub fn queued_size(&self) -> usize {
        match self {
            Outbound::Message { msg, .. } => msg.topic.len() + msg.body.len() + MESSAGE_OVERHEAD,
            Outbound::Inline(f) => f.len as usize,
            Outbound::Bytes(b) => b.len(),
            Outbound::Close | Outbound::CloseCode(_) => 0,
        }
    }
}

/// The bytes queued for output by all sessions of a node together, against
/// `[limits] max_queued_bytes`: the node refuses new deliveries (and closes the session they were
/// for as a slow consumer) before slow readers together can exhaust the machine's memory.
/// Each session counts in it in whole [`NODE_GRANULE`]s.
#[derive(Debug)]
pub struct OutputBudget {
    queued: AtomicUsize,
    max: usize,
}

impl OutputBudget {
    /// A budget of `max` bytes, nothing queued.
    pub fn new(max: usize) -> Arc<Self> {
        Arc::new(OutputBudget {
            queued: AtomicUsize::new(0),
            max: max.max(1),
        })
    }

    /// Bytes queued now, all sessions together.
    pub fn queued(&self) -> usize {
        self.queued.load(Ordering::Relaxed)
    }

    /// The budget.
    pub fn max(&self) -> usize {
        self.max
    }
}

/// Which bound a queued item would have passed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Overflow {
    /// The session's `write_queue` (items).
    QueueLen,
    /// The session's `write_queue_bytes`.
    QueueBytes,
    /// The node's `[limits] max_queued_bytes`.
    NodeBudget,
}

impl Overflow {
    /// The `reason` label of `warren_slow_consumer_disconnects_total`.
    pub fn reason(self) -> &'static str {
        match self {
            Overflow::QueueLen => "write_queue",
            Overflow::QueueBytes => "write_queue_bytes",
            Overflow::NodeBudget => "max_queued_bytes",
        }
    }
}

/// One session's output in bytes: what waits in its outbound queue or in its writer until the
/// socket has taken it. Added when an item is queued, released by the writer once the item is
/// written (or dropped), so a client that stops reading can hold at most `write_queue_bytes`
/// (plus one item, when its queue was empty), and the node's [`OutputBudget`] sees every byte.
#[derive(Debug)]
pub struct QueueBytes {
    queued: AtomicUsize,
    max: usize,
    node: Option<Arc<OutputBudget>>,
}

impl QueueBytes {
    /// A session's account with a cap of `max` bytes, counted in `node` too when given.
    pub fn new(max: usize, node: Option<Arc<OutputBudget>>) -> Arc<Self> {
        Arc::new(QueueBytes {
            queued: AtomicUsize::new(0),
            max: max.max(1),
            node,
        })
    }

    /// Bytes queued now.
    pub fn queued(&self) -> usize {
        self.queued.load(Ordering::Relaxed)
    }

    /// Add `n` bytes to this queue's count and the whole granules it crossed to the node's.
    /// Returns the queue's count before, and the node's count after when it changed.
    fn add(&self, n: usize) -> (usize, Option<usize>) {
        let before = self.queued.fetch_add(n, Ordering::Relaxed);
        let granules = (before + n) / NODE_GRANULE - before / NODE_GRANULE;
        let node_after = match &self.node {
            Some(node) if granules > 0 => {
                let d = granules * NODE_GRANULE;
                Some(node.queued.fetch_add(d, Ordering::Relaxed) + d)
            }
            _ => None,
        };
        (before, node_after)
    }

    /// Take `n` bytes off this queue's count and the whole granules it crossed off the node's.
    /// (Each change moves the node's count by the change of `count / granule`, so whatever the
    /// interleaving, the node holds exactly the sum of its queues' counts rounded down.)
    fn sub(&self, n: usize) {
        let before = self.queued.fetch_sub(n, Ordering::Relaxed);
        let granules = before / NODE_GRANULE - (before - n) / NODE_GRANULE;
        if let Some(node) = &self.node
            && granules > 0
        {
            node.queued
                .fetch_sub(granules * NODE_GRANULE, Ordering::Relaxed);
        }
    }

    /// Count `n` bytes about to be queued; refused (nothing counted) when it would pass the
    /// session's cap or the node's budget. An empty queue always takes one item, so an item
    /// larger than the cap is not refused forever; with `spare_node`, an empty queue also takes
    /// it past the node's budget (replies, which wait for room instead of being refused).
    /// One relaxed add on the session's counter; the node's shared counter only when the queue
    /// crosses a [`NODE_GRANULE`] boundary, which is where the budget is checked.
    fn reserve(&self, n: usize, spare_node: bool) -> Result<(), Overflow> {
        let (before, node_after) = self.add(n);
        if before != 0 && before + n > self.max {
            self.sub(n);
            return Err(Overflow::QueueBytes);
        }
        if let (Some(total), Some(node)) = (node_after, &self.node)
            && total > node.max
            && !(spare_node && before == 0)
        {
            self.sub(n);
            return Err(Overflow::NodeBudget);
        }
        Ok(())
    }

    /// Give back `n` bytes: written, dropped, or never queued after [`QueueBytes::reserve`].
    pub(crate) fn release(&self, n: usize) {
        if n == 0 {
            return;
        }
        self.sub(n);
    }

    /// Count `n` bytes for a reply if there is room now: the cap, and the node's budget unless
    /// the queue is empty (a reply to a client that reads is never refused by others' backlog).
    pub(crate) fn try_reserve_reply(&self, n: usize) -> bool {
        self.reserve(n, true).is_ok()
    }
}

/// A session's outbound queue, bounded in items (the listener's `write_queue`; its bytes are
/// counted in [`QueueBytes`]). Many senders (fan-out, other sessions' handlers, the module
/// runtime) and one receiver, the connection's task. Nothing is allocated until the first item
/// (an idle connection holds no slots), and a queue drained after a burst gives its slots back.
#[derive(Debug)]
struct Outbox {
    state: parking_lot::Mutex<OutboxState>,
    /// The connection's task, when it waits for an item.
    waker: futures_util::task::AtomicWaker,
    cap: usize,
    /// How many items `state` holds (written under its lock): the receiver looks here first,
    /// so an empty queue costs no lock.
    len: std::sync::atomic::AtomicUsize,
    /// [`Signal`]s raised for the connection (close now, drain), outside the queue: they are
    /// seen even when the queue is full, and they cost an idle connection no waiter of its own.
    signals: std::sync::atomic::AtomicU8,
}

/// What a connection is told outside its queue's order (see [`OutboxTx::signal`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Signal {
    /// Close now, without flushing what is queued (a slow consumer, the gate shutting down).
    Close = 1,
    /// The node is draining: say goodbye the protocol's way and stop reading.
    Drain = 2,
}

#[derive(Debug, Default)]
struct OutboxState {
    items: std::collections::VecDeque<Outbound>,
    closed: bool,
}

/// A new outbound queue of at most `cap` items: its sending and receiving ends.
pub fn outbox(cap: usize) -> (OutboxTx, OutboxRx) {
    let q = Arc::new(Outbox {
        state: parking_lot::Mutex::new(OutboxState::default()),
        waker: futures_util::task::AtomicWaker::new(),
        cap: cap.max(1),
        len: Default::default(),
        signals: Default::default(),
    });
    (OutboxTx(q.clone()), OutboxRx(q))
}

/// The sending end of a session's outbound queue (held by its [`SessionHandle`]).
#[derive(Debug, Clone)]
pub struct OutboxTx(Arc<Outbox>);

/// The receiving end of a session's outbound queue (the connection's task). Dropping it closes
/// the queue: later sends are refused.
#[derive(Debug)]
pub struct OutboxRx(Arc<Outbox>);

impl OutboxTx {
    /// Queue an item if there is room; the item comes back when the queue is full or closed.
    pub fn try_send(&self, item: Outbound) -> Result<(), mpsc::error::TrySendError<Outbound>> {
        {
            let mut st = self.0.state.lock();
            if st.closed {
                return Err(mpsc::error::TrySendError::Closed(item));
            }
            if st.items.len() >= self.0.cap {
                return Err(mpsc::error::TrySendError::Full(item));
            }
            st.items.push_back(item);
            self.0
                .len
                .store(st.items.len(), std::sync::atomic::Ordering::Release);
        }
        self.0.waker.wake();
        Ok(())
    }

    /// Whether the receiving end is gone.
    pub fn is_closed(&self) -> bool {
        self.0.state.lock().closed
    }

    /// Raise a signal for the connection and wake it.
    pub fn signal(&self, signal: Signal) {
        self.0
            .signals
            .fetch_or(signal as u8, std::sync::atomic::Ordering::AcqRel);
        self.0.waker.wake();
    }

    /// Whether `signal` was raised.
    pub fn signaled(&self, signal: Signal) -> bool {
        self.0.signals.load(std::sync::atomic::Ordering::Acquire) & signal as u8 != 0
    }
}

impl OutboxRx {
    /// The next item, if one is queued.
    pub fn try_recv(&mut self) -> Option<Outbound> {
        if self.0.len.load(std::sync::atomic::Ordering::Acquire) == 0 {
            return None;
        }
        let mut st = self.0.state.lock();
        let item = st.items.pop_front()?;
        self.0
            .len
            .store(st.items.len(), std::sync::atomic::Ordering::Release);
        if st.items.is_empty() && st.items.capacity() > 16 {
            // a burst is over: do not keep its slots
            st.items = std::collections::VecDeque::new();
        }
        Some(item)
    }

    /// Wait for the next item; `None` once the queue is closed and empty. Cancel-safe.
    pub async fn recv(&mut self) -> Option<Outbound> {
        std::future::poll_fn(|cx| self.poll_recv(cx)).await
    }

    /// The next item, or the task's waker registered for it; `None` once the queue is closed
    /// and empty.
    pub fn poll_recv(
        &mut self,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Outbound>> {
        if let Some(item) = self.try_recv() {
            return std::task::Poll::Ready(Some(item));
        }
        self.0.waker.register(cx.waker());
        let mut st = self.0.state.lock();
        match st.items.pop_front() {
            Some(item) => {
                self.0
                    .len
                    .store(st.items.len(), std::sync::atomic::Ordering::Release);
                std::task::Poll::Ready(Some(item))
            }
            None if st.closed => std::task::Poll::Ready(None),
            None => std::task::Poll::Pending,
        }
    }

    /// The signals raised so far (a bit per [`Signal`]), with the task's waker registered for
    /// later ones.
    pub fn poll_signals(&mut self, cx: &mut std::task::Context<'_>) -> u8 {
        let now = self.0.signals.load(std::sync::atomic::Ordering::Acquire);
        if now != 0 {
            return now;
        }
        self.0.waker.register(cx.waker());
        self.0.signals.load(std::sync::atomic::Ordering::Acquire)
    }

    /// Refuse further items (what is queued can still be taken).
    pub fn close(&mut self) {
        self.0.state.lock().closed = true;
    }
}

impl Drop for OutboxRx {
    fn drop(&mut self) {
        self.close();
    }
}

/// What a session's queue holds by default when no listener configured it (4 MiB).
pub const DEFAULT_QUEUE_BYTES: usize = 4 << 20;

/// The unit in which the node's [`OutputBudget`] counts each queue (its bytes rounded down to
/// it): the shared counter is touched once per 4 KiB a queue grows or shrinks, not once per
/// message, so a fan-out does not make every core fight over one cache line. The node's count
/// is therefore short by less than this per session.
pub const NODE_GRANULE: usize = 4096;

/// What the gate holds for one live session: its current snapshot and its outbound queue (which
/// also carries the signals that close or drain it).
#[derive(Debug)]
pub struct SessionHandle {
    id: SessionId,
    snapshot: ArcSwap<Session>,
    outbound: OutboxTx,
    /// The bytes waiting in `outbound` (and in the writer).
    bytes: Arc<QueueBytes>,
    /// Subscriptions and groups this session is in, so closing it can clean up.
    memberships: parking_lot::Mutex<Vec<Arc<str>>>,
    /// When the connection was accepted (the admin API shows it).
    connected_at: std::time::SystemTime,
    /// The configured address of the listener that accepted it, set once by the gate.
    listener: OnceLock<Arc<str>>,
}

impl SessionHandle {
    /// A handle for a new connection, its queue capped at [`DEFAULT_QUEUE_BYTES`] and outside
    /// any node budget.
    pub fn new(session: Session, outbound: OutboxTx) -> Arc<Self> {
        Self::bounded(
            session,
            outbound,
            QueueBytes::new(DEFAULT_QUEUE_BYTES, None),
        )
    }

    /// A handle whose queue is bounded in bytes by `bytes` (the listener's `write_queue_bytes`
    /// and the node's budget). Whoever reads `outbound` must release what it takes from it.
    pub fn bounded(session: Session, outbound: OutboxTx, bytes: Arc<QueueBytes>) -> Arc<Self> {
        Arc::new(SessionHandle {
            id: session.id.clone(),
            snapshot: ArcSwap::from_pointee(session),
            outbound,
            bytes,
            memberships: parking_lot::Mutex::new(Vec::new()),
            connected_at: std::time::SystemTime::now(),
            listener: OnceLock::new(),
        })
    }

    /// When the connection was accepted.
    pub fn connected_at(&self) -> std::time::SystemTime {
        self.connected_at
    }

    /// The configured address of the listener that accepted the connection, when the gate said.
    pub fn listener(&self) -> Option<&str> {
        self.listener.get().map(|a| &**a)
    }

    /// Record the listener's address (once; later calls are ignored).
    pub fn set_listener(&self, addr: &str) {
        let _ = self.listener.set(addr.into());
    }

    /// Close the connection on an operator's word: a pomelo client first gets a kick package
    /// with `reason` (when its queue has room), every other protocol sees its connection close.
    pub fn kick(&self, reason: &str) {
        if self.snapshot.load().protocol == Protocol::Pomelo {
            let body = serde_json::json!({ "reason": reason }).to_string();
            let mut b = bytes::BytesMut::with_capacity(4 + body.len());
            warren_proto::pomelo::encode_package(
                warren_proto::pomelo::PackageType::Kick,
                body.as_bytes(),
                &mut b,
            );
            let item = Outbound::Bytes(Box::new(b.freeze()));
            let n = item.queued_size();
            if self.bytes.reserve(n, true).is_ok() && self.outbound.try_send(item).is_err() {
                self.bytes.release(n);
            }
        }
        self.close();
    }

    /// The byte account of this session's queue.
    pub fn queue_bytes(&self) -> &Arc<QueueBytes> {
        &self.bytes
    }

    /// The current snapshot.
    pub fn snapshot(&self) -> Arc<Session> {
        self.snapshot.load_full()
    }

    /// Session id.
    pub fn id(&self) -> &SessionId {
        &self.id
    }

    /// Replace the snapshot with an edited copy.
    pub fn update(&self, f: impl FnOnce(&mut Session)) -> Arc<Session> {
        let mut s = Session::clone(&self.snapshot.load());
        f(&mut s);
        let s = Arc::new(s);
        self.snapshot.store(s.clone());
        s
    }

    /// Queue a message without waiting. A queue that is full (in items or bytes), or a node
    /// whose output budget is spent, means the client is not reading fast enough: the session is
    /// closed (slow-consumer policy) and the message is refused.
    pub fn deliver(&self, msg: Arc<Message>, qos: Option<u8>) -> Result<(), CallError> {
        let item = Outbound::Message { msg, qos };
        let n = item.queued_size();
        if let Err(over) = self.bytes.reserve(n, false) {
            self.slow_consumer(over);
            return Err(CallError::ConnectionClosed);
        }
        match self.outbound.try_send(item) {
            Ok(()) => Ok(()),
            Err(mpsc::error::TrySendError::Full(_)) => {
                self.bytes.release(n);
                self.slow_consumer(Overflow::QueueLen);
                Err(CallError::ConnectionClosed)
            }
            Err(mpsc::error::TrySendError::Closed(_)) => {
                self.bytes.release(n);
                Err(CallError::ConnectionClosed)
            }
        }
    }

    /// Close a session that cannot keep up: one rate-limited log line, one metric, once.
    fn slow_consumer(&self, over: Overflow) {
        if self.outbound.signaled(Signal::Close) {
            return;
        }
        let s = self.snapshot.load();
        let why = match over {
            Overflow::QueueLen => "slow consumer: outbound queue full (write_queue)".to_owned(),
            Overflow::QueueBytes => format!(
                "slow consumer: {} bytes queued, cap write_queue_bytes = {}",
                self.bytes.queued(),
                self.bytes.max
            ),
            Overflow::NodeBudget => format!(
                "slow consumer: the node's queued output is at [limits] max_queued_bytes = {}",
                self.bytes.node.as_ref().map_or(0, |n| n.max)
            ),
        };
        crate::refusal::refuse(&s.remote, "slow_consumer", why);
        metrics::counter!("warren_slow_consumer_disconnects_total", "reason" => over.reason())
            .increment(1);
        self.outbound.signal(Signal::Close);
    }

    /// Ask the connection to flush and close.
    pub fn close(&self) {
        if self.outbound.try_send(Outbound::Close).is_err() {
            self.outbound.signal(Signal::Close);
        }
    }

    /// Close the connection now, without flushing what is queued (the gate shutting down).
    pub fn shut(&self) {
        self.outbound.signal(Signal::Close);
    }

    /// Tell the connection that the node is draining.
    pub fn drain(&self) {
        self.outbound.signal(Signal::Drain);
    }

    /// Whether the connection was told to close now ([`SessionHandle::shut`], a slow consumer).
    pub fn shut_down(&self) -> bool {
        self.outbound.signaled(Signal::Close)
    }

    /// Whether the connection is gone or closing.
    pub fn is_closed(&self) -> bool {
        self.outbound.signaled(Signal::Close) || self.outbound.is_closed()
    }

    /// Record that this session joins a group: `Ok(false)` when it is in it already, an error
    /// when it is in `max` groups.
    pub(crate) fn join(&self, name: &str, max: usize) -> Result<bool, CallError> {
        let mut m = self.memberships.lock();
        if m.iter().any(|g| &**g == name) {
            return Ok(false);
        }
        if m.len() >= max {
            return Err(CallError::bad_request(format!(
                "session is in {} groups already ([limits] max_groups_per_session)",
                m.len()
            )));
        }
        m.push(name.into());
        Ok(true)
    }

    /// Forget a group this session left.
    pub(crate) fn left(&self, name: &str) {
        self.memberships.lock().retain(|g| &**g != name);
    }

    /// Take the list of groups this session is in (on close).
    pub(crate) fn take_memberships(&self) -> Vec<Arc<str>> {
        std::mem::take(&mut *self.memberships.lock())
    }
}

/// The live sessions of one gate, by id and by uid. Session operations from any handler land here.
#[derive(Debug)]
pub struct SessionTable {
    gate: Arc<str>,
    inner: RwLock<Tables>,
    /// What binding a uid that another live session holds does (`[auth] uid_conflict`): true
    /// for `kick_old`. Atomic, so SIGHUP can change it under live sessions.
    kick_old: std::sync::atomic::AtomicBool,
}

#[derive(Debug, Default)]
struct Tables {
    by_id: HashMap<SessionId, Arc<SessionHandle>>,
    by_uid: HashMap<String, Vec<SessionId>>,
}

impl SessionTable {
    /// An empty table for the gate with this id.
    pub fn new(gate: Arc<str>) -> Self {
        SessionTable {
            gate,
            inner: RwLock::new(Tables::default()),
            kick_old: std::sync::atomic::AtomicBool::new(false),
        }
    }

    /// The same table with another uid conflict policy (`[auth] uid_conflict`).
    pub fn with_uid_conflict(self, policy: crate::config::UidConflict) -> Self {
        self.set_uid_conflict(policy);
        self
    }

    /// Change the uid conflict policy for binds from now on (SIGHUP).
    pub fn set_uid_conflict(&self, policy: crate::config::UidConflict) {
        self.kick_old.store(
            policy == crate::config::UidConflict::KickOld,
            std::sync::atomic::Ordering::Relaxed,
        );
    }

    fn uid_conflict(&self) -> crate::config::UidConflict {
        if self.kick_old.load(std::sync::atomic::Ordering::Relaxed) {
            crate::config::UidConflict::KickOld
        } else {
            crate::config::UidConflict::Reject
        }
    }

    /// Id of the gate owning this table (mqant `Serverid`).
    pub fn gate_id(&self) -> &Arc<str> {
        &self.gate
    }

    fn read(&self) -> parking_lot::RwLockReadGuard<'_, Tables> {
        self.inner.read()
    }

    fn write(&self) -> parking_lot::RwLockWriteGuard<'_, Tables> {
        self.inner.write()
    }

    /// Add a new session.
    pub fn insert(&self, handle: Arc<SessionHandle>) {
        let s = handle.snapshot();
        let mut t = self.write();
        if let Some(uid) = &s.uid {
            t.by_uid.entry(uid.clone()).or_default().push(s.id.clone());
        }
        t.by_id.insert(s.id.clone(), handle);
        metrics::gauge!("warren_sessions_active").set(t.by_id.len() as f64);
    }

    /// Remove a closed session.
    pub fn remove(&self, id: &str) -> Option<Arc<SessionHandle>> {
        let mut t = self.write();
        let h = t.by_id.remove(id)?;
        if let Some(uid) = &h.snapshot().uid {
            unindex(&mut t.by_uid, uid, id);
        }
        metrics::gauge!("warren_sessions_active").set(t.by_id.len() as f64);
        Some(h)
    }

    /// The handle of a live session.
    pub fn get(&self, id: &str) -> Result<Arc<SessionHandle>, CallError> {
        self.read()
            .by_id
            .get(id)
            .cloned()
            .ok_or(CallError::NoSession)
    }

    /// Number of live sessions.
    pub fn len(&self) -> usize {
        self.read().by_id.len()
    }

    /// Whether no session is live.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// All live sessions bound to a uid (a user may be connected more than once).
    pub fn by_uid(&self, uid: &str) -> Vec<Arc<SessionHandle>> {
        let t = self.read();
        t.by_uid
            .get(uid)
            .map(|ids| {
                ids.iter()
                    .filter_map(|id| t.by_id.get(id).cloned())
                    .collect()
            })
            .unwrap_or_default()
    }

    /// Bytes queued for output now: every session's together, and the most one session holds
    /// (the `warren_outbound_queue_bytes` gauges). Read at scrape time from the counters the
    /// queues keep anyway: one relaxed load per session, under the table's read lock.
    pub fn queued_output(&self) -> (usize, usize) {
        self.read()
            .by_id
            .values()
            .map(|h| h.bytes.queued())
            .fold((0, 0), |(sum, max), q| (sum + q, max.max(q)))
    }

    /// Every live session handle (for drain).
    pub fn all(&self) -> Vec<Arc<SessionHandle>> {
        self.read().by_id.values().cloned().collect()
    }

    /// `Bind(Sessionid, Userid)`. A uid is held by one live session of the gate: when another
    /// one holds it, the table's policy decides: `reject` fails with [`CallError::UidInUse`] and
    /// changes nothing; `kick_old` closes the other sessions (their snapshots keep the uid, the
    /// index forgets them) and binds this one. Binding the uid a session already has is a no-op.
    pub fn bind(&self, id: &str, uid: &str) -> Result<Arc<Session>, CallError> {
        self.bind_with(id, uid, true)
    }

    /// Bind a uid that the session's own credentials proved (the gate's authentication at
    /// connect): the user may be connected more than once (one session per device), so other
    /// sessions holding the uid are left alone. A later [`SessionTable::bind`] of that uid by
    /// a session without those credentials still meets the policy.
    pub fn bind_verified(&self, id: &str, uid: &str) -> Result<Arc<Session>, CallError> {
        self.bind_with(id, uid, false)
    }

    fn bind_with(&self, id: &str, uid: &str, policy: bool) -> Result<Arc<Session>, CallError> {
        let mut t = self.write();
        let h = t.by_id.get(id).cloned().ok_or(CallError::NoSession)?;
        let old = h.snapshot().uid.clone();
        if old.as_deref() == Some(uid) {
            return Ok(h.snapshot());
        }
        let holders: Vec<Arc<SessionHandle>> = t
            .by_uid
            .get(uid)
            .map(|ids| {
                ids.iter()
                    .filter(|s| &***s != id)
                    .filter_map(|s| t.by_id.get(s).cloned())
                    .filter(|s| !s.is_closed())
                    .collect()
            })
            .unwrap_or_default();
        if policy && !holders.is_empty() {
            match self.uid_conflict() {
                crate::config::UidConflict::Reject => {
                    metrics::counter!("warren_uid_conflicts_total", "policy" => "reject")
                        .increment(1);
                    return Err(CallError::UidInUse(uid.to_owned()));
                }
                crate::config::UidConflict::KickOld => {
                    metrics::counter!("warren_uid_conflicts_total", "policy" => "kick_old")
                        .increment(1);
                    for old in holders {
                        let s = old.snapshot();
                        tracing::info!(uid, old_session = %s.id, old_peer = %s.remote, "uid bound by a new session; closing the older one");
                        unindex(&mut t.by_uid, uid, old.id());
                        old.close();
                    }
                }
            }
        }
        let s = h.update(|s| s.uid = Some(uid.to_owned()));
        if let Some(old) = old {
            unindex(&mut t.by_uid, &old, id);
        }
        t.by_uid
            .entry(uid.to_owned())
            .or_default()
            .push(s.id.clone());
        Ok(s)
    }

    /// `UnBind(Sessionid)`.
    pub fn unbind(&self, id: &str) -> Result<Arc<Session>, CallError> {
        let mut t = self.write();
        let h = t.by_id.get(id).cloned().ok_or(CallError::NoSession)?;
        if let Some(old) = h.snapshot().uid.clone() {
            unindex(&mut t.by_uid, &old, id);
        }
        Ok(h.update(|s| s.uid = None))
    }

    /// `Set(Sessionid, key, value)`.
    pub fn set(&self, id: &str, key: &str, value: Value) -> Result<Arc<Session>, CallError> {
        let h = self.get(id)?;
        Ok(h.update(|s| {
            s.settings.insert(key.to_owned(), value);
        }))
    }

    /// `Remove(Sessionid, key)`.
    pub fn remove_setting(&self, id: &str, key: &str) -> Result<Arc<Session>, CallError> {
        let h = self.get(id)?;
        Ok(h.update(|s| {
            s.settings.remove(key);
        }))
    }

    /// `Push(Sessionid, Settings)`: replace the settings entirely.
    pub fn push_settings(
        &self,
        id: &str,
        settings: Map<String, Value>,
    ) -> Result<Arc<Session>, CallError> {
        let h = self.get(id)?;
        Ok(h.update(|s| s.settings = settings))
    }

    /// `Update(Sessionid)`: the current snapshot.
    pub fn update(&self, id: &str) -> Result<Arc<Session>, CallError> {
        Ok(self.get(id)?.snapshot())
    }

    /// `Send(Sessionid, topic, body)`.
    pub fn send(&self, id: &str, topic: &str, body: Bytes) -> Result<(), CallError> {
        let h = self.get(id)?;
        if h.is_closed() {
            return Err(CallError::ConnectionClosed);
        }
        h.deliver(
            Message::new(Bytes::copy_from_slice(topic.as_bytes()), body),
            None,
        )
    }

    /// `Close(Sessionid)`.
    pub fn close(&self, id: &str) -> Result<(), CallError> {
        self.get(id)?.close();
        Ok(())
    }
}

fn unindex(by_uid: &mut HashMap<String, Vec<SessionId>>, uid: &str, id: &str) {
    if let Some(ids) = by_uid.get_mut(uid) {
        ids.retain(|s| &**s != id);
        if ids.is_empty() {
            by_uid.remove(uid);
        }
    }
}

/// A session handle with an outbox of `capacity` messages, for unit tests of the layers that
/// deliver to sessions (fan-out, MQTT session state).
#[cfg(test)]
pub(crate) fn test_handle(id: &str, capacity: usize) -> (Arc<SessionHandle>, OutboxRx) {
    let (tx, rx) = outbox(capacity);
    let s = Session {
        id: id.into(),
        uid: None,
        settings: Default::default(),
        remote: "127.0.0.1:1".parse().expect("an address"),
        network: Network::Tcp,
        protocol: Protocol::Mqtt,
        gate: "g".into(),
    };
    (SessionHandle::new(s, tx), rx)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn session(id: &str) -> Session {
        Session {
            id: id.into(),
            uid: None,
            settings: Map::new(),
            remote: "127.0.0.1:53422".parse().unwrap(),
            network: Network::Tcp,
            protocol: Protocol::Mqtt,
            gate: "Gate001".into(),
        }
    }

    #[test]
    fn a_kicked_pomelo_session_gets_a_kick_package_then_closes() {
        let (tx, mut rx) = outbox(8);
        let h = SessionHandle::new(
            Session {
                protocol: Protocol::Pomelo,
                ..session("p1")
            },
            tx,
        );
        h.set_listener("127.0.0.1:3010");
        h.set_listener("ignored");
        assert_eq!(h.listener(), Some("127.0.0.1:3010"));
        h.kick("maintenance");
        let Some(Outbound::Bytes(b)) = rx.try_recv() else {
            panic!("a kick package first")
        };
        // type 5 (kick), a 3-byte length, then the JSON body
        assert_eq!(b[0], 5);
        assert_eq!(&b[4..], br#"{"reason":"maintenance"}"#);
        assert!(matches!(rx.try_recv(), Some(Outbound::Close)));

        let (tx, mut rx) = outbox(8);
        let h = SessionHandle::new(session("m1"), tx);
        h.kick("bye");
        assert!(
            matches!(rx.try_recv(), Some(Outbound::Close)),
            "MQTT: only the close"
        );
        assert!(h.connected_at() <= std::time::SystemTime::now());
    }

    #[test]
    fn export_map_has_the_mqant_shape() {
        let s = session("8f3c0b6e-1d2a-4c3b-9e8f-0a1b2c3d4e5f");
        assert_eq!(
            serde_json::to_string(&s.export_map()).unwrap(),
            r#"{"IP":"127.0.0.1:53422","Network":"tcp","Serverid":"Gate001","Sessionid":"8f3c0b6e-1d2a-4c3b-9e8f-0a1b2c3d4e5f","Settings":{}}"#
        );
        let back = Session::from_export_map(&s.export_map(), Network::Tcp).unwrap();
        assert_eq!(back, s);
    }

    fn msg(body: usize) -> Arc<Message> {
        Message::new(Bytes::from_static(b"t"), Bytes::from(vec![b'x'; body]))
    }

    /// What a writer does with what it takes: give the bytes back.
    fn drain(rx: &mut OutboxRx, bytes: &QueueBytes) -> usize {
        let mut n = 0;
        while let Some(item) = rx.try_recv() {
            let size = item.queued_size();
            bytes.release(size);
            n += 1;
        }
        n
    }

    #[tokio::test]
    async fn the_outbox_is_bounded_wakes_its_reader_and_closes_with_it() {
        let (tx, mut rx) = outbox(2);
        assert!(rx.try_recv().is_none());
        tx.try_send(Outbound::Close).unwrap();
        tx.try_send(Outbound::CloseCode(1000)).unwrap();
        assert!(matches!(
            tx.try_send(Outbound::Close),
            Err(mpsc::error::TrySendError::Full(_))
        ));
        assert!(matches!(rx.try_recv(), Some(Outbound::Close)));
        tx.try_send(Outbound::Close).unwrap();
        assert!(matches!(rx.recv().await, Some(Outbound::CloseCode(1000))));
        assert!(matches!(rx.recv().await, Some(Outbound::Close)));
        // a reader waiting on an empty queue is woken by a send from elsewhere
        let sender = tx.clone();
        let waiter = tokio::spawn(async move { rx.recv().await.is_some() });
        tokio::task::yield_now().await;
        sender.try_send(Outbound::Close).unwrap();
        assert!(waiter.await.unwrap());
        // the reader is gone: sends are refused
        assert!(tx.is_closed());
        assert!(matches!(
            tx.try_send(Outbound::Close),
            Err(mpsc::error::TrySendError::Closed(_))
        ));
    }

    #[tokio::test]
    async fn a_session_that_never_reads_holds_at_most_its_byte_cap() {
        let node = OutputBudget::new(1 << 30);
        let bytes = QueueBytes::new(64 * 1024, Some(node.clone()));
        let (tx, mut rx) = outbox(1024);
        let h = SessionHandle::bounded(session("s1"), tx, bytes.clone());
        let mut delivered = 0;
        while h.deliver(msg(10_000), None).is_ok() {
            delivered += 1;
            assert!(delivered < 1024, "the byte cap never refused");
        }
        // far below the 1024-item queue: the bytes decided
        assert_eq!(delivered, 6);
        assert!(bytes.queued() <= 64 * 1024);
        assert_eq!(node.queued(), bytes.queued() / NODE_GRANULE * NODE_GRANULE);
        assert!(h.is_closed(), "the slow consumer is closed");
        assert_eq!(drain(&mut rx, &bytes), 6);
        assert_eq!(bytes.queued(), 0);
        assert_eq!(node.queued(), 0);
    }

    #[tokio::test]
    async fn an_empty_queue_takes_one_item_larger_than_the_cap() {
        let bytes = QueueBytes::new(1024, None);
        let (tx, mut rx) = outbox(16);
        let h = SessionHandle::bounded(session("s1"), tx, bytes.clone());
        assert!(h.deliver(msg(5000), None).is_ok());
        assert!(h.deliver(msg(10), None).is_err());
        drain(&mut rx, &bytes);
        assert_eq!(bytes.queued(), 0);
    }

    #[tokio::test]
    async fn the_node_budget_refuses_and_closes_only_the_recipient() {
        let node = OutputBudget::new(20_000);
        let (tx_a, mut rx_a) = outbox(1024);
        let (tx_b, _rx_b) = outbox(1024);
        let bytes_a = QueueBytes::new(1 << 20, Some(node.clone()));
        let a = SessionHandle::bounded(session("a"), tx_a, bytes_a.clone());
        let b = SessionHandle::bounded(
            session("b"),
            tx_b,
            QueueBytes::new(1 << 20, Some(node.clone())),
        );
        for _ in 0..4 {
            a.deliver(msg(5000), None).expect("within the budget");
        }
        // 4 × 5017 bytes queued, counted as 4 granules; b's first granule would pass 20 000
        assert_eq!(node.queued(), 4 * NODE_GRANULE);
        assert_eq!(
            b.deliver(msg(5000), None).unwrap_err(),
            CallError::ConnectionClosed
        );
        assert!(b.is_closed());
        assert!(!a.is_closed());
        assert_eq!(node.queued(), 4 * NODE_GRANULE);
        // once a's writer catches up, the node takes work again
        drain(&mut rx_a, &bytes_a);
        assert_eq!(node.queued(), 0);
        a.deliver(msg(5000), None).expect("budget given back");
    }

    #[tokio::test]
    async fn a_full_item_queue_is_a_slow_consumer_too_and_gives_its_bytes_back() {
        let node = OutputBudget::new(1 << 30);
        let bytes = QueueBytes::new(1 << 20, Some(node.clone()));
        let (tx, _rx) = outbox(2);
        let h = SessionHandle::bounded(session("s1"), tx, bytes.clone());
        h.deliver(msg(1), None).unwrap();
        h.deliver(msg(1), None).unwrap();
        assert!(h.deliver(msg(1), None).is_err());
        assert!(h.is_closed());
        assert_eq!(bytes.queued(), 2 * 18);
        assert_eq!(node.queued(), 0, "less than a granule");
    }

    #[tokio::test]
    async fn a_reply_to_an_empty_queue_is_not_held_by_the_node_budget() {
        const G: usize = NODE_GRANULE;
        let node = OutputBudget::new(2 * G);
        let other = QueueBytes::new(1 << 20, Some(node.clone()));
        assert!(other.try_reserve_reply(2 * G));
        let mine = QueueBytes::new(1 << 20, Some(node.clone()));
        // a push is refused, a reply is not (it would wait for a writer with nothing to write)
        assert_eq!(mine.reserve(G, false), Err(Overflow::NodeBudget));
        assert!(mine.try_reserve_reply(G));
        assert!(!mine.try_reserve_reply(G), "not empty any more: waits");
        mine.release(G);
        other.release(2 * G);
        assert_eq!(node.queued(), 0);
    }

    #[test]
    fn the_node_count_is_each_queue_rounded_down_to_granules_whatever_the_order() {
        let node = OutputBudget::new(1 << 30);
        let q = QueueBytes::new(1 << 30, Some(node.clone()));
        let sizes = [1, 4095, 3000, 5000, 17, 9000, 4096, 1];
        for n in sizes {
            q.reserve(n, false).unwrap();
            assert_eq!(node.queued(), q.queued() / NODE_GRANULE * NODE_GRANULE);
        }
        for n in sizes.iter().rev().step_by(2).chain(sizes.iter().step_by(2)) {
            q.release(*n);
            assert_eq!(node.queued(), q.queued() / NODE_GRANULE * NODE_GRANULE);
        }
        assert_eq!((q.queued(), node.queued()), (0, 0));
    }

    #[tokio::test]
    async fn bind_follows_the_uid_conflict_policy() {
        use crate::config::UidConflict;
        for policy in [UidConflict::Reject, UidConflict::KickOld] {
            // the policy as SIGHUP sets it on a live table
            let t = SessionTable::new("Gate001".into()).with_uid_conflict(UidConflict::Reject);
            t.set_uid_conflict(policy);
            let (tx1, mut rx1) = outbox(4);
            let (tx2, _rx2) = outbox(4);
            t.insert(SessionHandle::new(session("s1"), tx1));
            t.insert(SessionHandle::new(session("s2"), tx2));
            t.bind("s1", "alice").unwrap();
            // binding the uid a session already has changes nothing
            t.bind("s1", "alice").unwrap();
            // a verified bind (credentials at connect) shares the uid whatever the policy
            let (tx3, _rx3) = outbox(4);
            t.insert(SessionHandle::new(session("s3"), tx3));
            t.bind_verified("s3", "alice").unwrap();
            assert_eq!(t.by_uid("alice").len(), 2);
            t.unbind("s3").unwrap();
            match policy {
                UidConflict::Reject => {
                    assert_eq!(
                        t.bind("s2", "alice").unwrap_err(),
                        CallError::UidInUse("alice".into())
                    );
                    assert_eq!(t.update("s2").unwrap().uid, None);
                    assert_eq!(t.by_uid("alice").len(), 1);
                    assert_eq!(&**t.by_uid("alice")[0].id(), "s1");
                }
                UidConflict::KickOld => {
                    assert_eq!(t.bind("s2", "alice").unwrap().uid.as_deref(), Some("alice"));
                    assert_eq!(t.by_uid("alice").len(), 1);
                    assert_eq!(&**t.by_uid("alice")[0].id(), "s2");
                    // the older session was asked to close
                    assert!(matches!(rx1.recv().await, Some(Outbound::Close)));
                }
            }
        }
    }

    #[tokio::test]
    async fn operations_edit_the_live_session_and_the_uid_index() {
        let t = SessionTable::new("Gate001".into());
        let (tx, mut rx) = outbox(4);
        t.insert(SessionHandle::new(session("s1"), tx));
        assert_eq!(t.bind("s1", "alice").unwrap().uid.as_deref(), Some("alice"));
        assert_eq!(t.by_uid("alice").len(), 1);
        t.set("s1", "login", Value::Bool(true)).unwrap();
        assert_eq!(t.update("s1").unwrap().settings["login"], Value::Bool(true));
        t.remove_setting("s1", "login").unwrap();
        assert!(t.update("s1").unwrap().settings.is_empty());
        t.unbind("s1").unwrap();
        assert!(t.by_uid("alice").is_empty());
        t.send("s1", "a/b", Bytes::from_static(b"x")).unwrap();
        assert!(matches!(rx.recv().await, Some(Outbound::Message { .. })));
        assert_eq!(t.bind("nope", "x").unwrap_err(), CallError::NoSession);
        t.remove("s1");
        assert_eq!(t.update("s1").unwrap_err().to_string(), "No Sesssion found");
    }
}

//! Default-mode MQTT session state (docs/protocols/mqtt.md, "Sessions and QoS"): what MQTT 3.1.1
//! §4.1 says a server keeps for a client, in memory.
//!
//! Every default-mode connection has an [`MqttState`]: its subscriptions (filter → granted QoS),
//! the outbound QoS 1 / 2 inflight window (packet id → message, awaiting PUBACK, PUBREC or
//! PUBCOMP), the messages waiting for a slot in that window, and the inbound QoS 2 packet ids
//! awaiting PUBREL. A `clean_session = 0` state is *persistent*: it is kept in the node's
//! [`Store`] by client id when its connection ends, the subscription trie keeps pointing at it
//! (`fanout::Subscriber::Stored`), and QoS ≥ 1 messages published while no connection is
//! attached wait in its queue (bounded in count and bytes by `[limits]`; when full the newest
//! is dropped, counted and logged once per episode). The next connection with that client id
//! attaches to it: unacknowledged PUBLISHes are resent with DUP = 1 (PUBREL for those already
//! PUBREC'd), in their order, then the queue.
//!
//! **Durability** (`[mqtt] store`, docs/configuration.md "Durability"): with the node's
//! [`crate::mqtt_store::MqttStore`] handed to the [`Store`] ([`Store::set_backend`]), a
//! persistent session writes through to it: its subscriptions (`PutSession`, on every
//! SUBSCRIBE / UNSUBSCRIBE), each QoS ≥ 1 message it takes (`Enqueue`, with the session's
//! increasing sequence number, before the message reaches the connection or the queue), its
//! delivery state (`SetState` when sent with a packet id or PUBREC'd), its end (`Ack` on
//! PUBACK / PUBCOMP or when the queue drops it), and the inbound QoS 2 ids awaiting PUBREL
//! (`AwaitRelease` / `Release`); discarding the session (clean start, expiry) deletes it. The
//! writes are queued without waiting ([`crate::mqtt_store::MqttStore::write_through`]); a
//! publisher that must know them durable (before its PUBACK) collects them
//! ([`crate::mqtt_store::collecting`]). At start the node rebuilds the sessions from the file
//! with [`Store::restore`]. A message handed to the attached connection's outbound queue is
//! remembered with its sequence number until the framer takes it, so its later writes name it.
//!
//! The QoS 0 path does not come here: a clean session's subscriptions point at its
//! `SessionHandle` and get the shared, encoded-once QoS 0 frame as before; a persistent one
//! costs one pointer load per QoS 0 delivery. Per-recipient work (a lock, a packet id, an
//! encode) is only for QoS ≥ 1.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

use arc_swap::ArcSwapOption;
use bytes::BytesMut;
use parking_lot::Mutex;
use warren_proto::mqtt::{self, Ack, QoS};
use warren_proto::mqtt_handover as handover;

use crate::config::LimitsConfig;
use crate::session::{Message, SessionHandle, SessionId};

/// The bounds of one session's state, from `[limits]` (taken when a connection attaches).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SessionLimits {
    /// Outbound QoS 1 / 2 messages sent and not yet acknowledged (`max_inflight_messages`).
    pub max_inflight: usize,
    /// Messages waiting for the window or for a connection (`max_queued_messages`).
    pub max_queued: usize,
    /// Topic + payload bytes of those messages (`max_session_queued_bytes`).
    pub max_queued_bytes: usize,
    /// How long a persistent session is kept with no connection (`session_expiry_s`; `None`:
    /// for ever).
    pub expiry: Option<Duration>,
}

impl SessionLimits {
    /// The bounds `[limits]` sets.
    pub fn from_config(l: &LimitsConfig) -> Self {
        SessionLimits {
            max_inflight: l.max_inflight_messages.clamp(1, 65535),
            max_queued: l.max_queued_messages,
            max_queued_bytes: l.max_session_queued_bytes,
            expiry: (l.session_expiry_s > 0).then(|| Duration::from_secs(l.session_expiry_s)),
        }
    }
}

impl Default for SessionLimits {
    fn default() -> Self {
        SessionLimits::from_config(&LimitsConfig::default())
    }
}

/// Why a stored session was not resumed or discarded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StoreError {
    /// The stored session belongs to another verified user (as a takeover would be refused).
    #[error("client id {0:?} has a stored session of another user")]
    NotOwner(String),
}

/// A message waiting for the window or for a connection.
#[derive(Debug)]
struct Queued {
    msg: Arc<Message>,
    qos: u8,
    /// Its sequence number in the durable store, when it is kept there.
    seq: Option<u64>,
}

impl Queued {
    fn size(&self) -> usize {
        self.msg.topic.len() + self.msg.body.len()
    }
}

/// An outbound QoS 1 / 2 message sent and not yet acknowledged.
#[derive(Debug)]
struct Inflight {
    pkid: u16,
    msg: Arc<Message>,
    qos: u8,
    /// QoS 2: PUBREC received, PUBREL sent, PUBCOMP awaited.
    released: bool,
    /// Its sequence number in the durable store, when it is kept there.
    seq: Option<u64>,
}

/// The durable store a persistent session writes through to (`[mqtt] store`).
#[cfg(feature = "mqtt-store")]
pub type Backend = crate::mqtt_store::MqttStore;

/// Without the `mqtt-store` feature there is no durable store: a type nothing outside this
/// module can make.
#[cfg(not(feature = "mqtt-store"))]
#[derive(Debug, Clone)]
pub struct Backend(());

/// A persistent session's link to the durable store.
#[derive(Debug, Clone)]
#[cfg_attr(not(feature = "mqtt-store"), allow(dead_code))]
struct Keeper {
    store: Backend,
    client_id: Box<str>,
    owner: Option<Box<str>>,
}

/// A change of a persistent session, written through to the durable store.
#[cfg_attr(not(feature = "mqtt-store"), allow(dead_code))]
enum Change<'a> {
    Enqueue { seq: u64, msg: &'a Message, qos: u8 },
    Sent { seq: u64, pkid: u16 },
    Released { seq: u64, pkid: u16 },
    Ack { seq: u64 },
    Session(&'a HashMap<Box<str>, u8>),
    Delete,
    AwaitRelease(u16),
    Release(u16),
}

impl Keeper {
    #[cfg(feature = "mqtt-store")]
    fn keep(&self, change: Change<'_>) {
        use crate::mqtt_store::{MessageState, StoredMessage, Write};
        let client_id = self.client_id.to_string();
        let w = match change {
            Change::Enqueue { seq, msg, qos } => Write::Enqueue {
                client_id,
                seq,
                message: StoredMessage {
                    topic: String::from_utf8_lossy(&msg.topic).into_owned(),
                    qos,
                    retain: msg.retain,
                    payload: msg.body.clone(),
                },
            },
            Change::Sent { seq, pkid } => Write::SetState {
                client_id,
                seq,
                state: MessageState::Sent { packet_id: pkid },
            },
            Change::Released { seq, pkid } => Write::SetState {
                client_id,
                seq,
                state: MessageState::Released { packet_id: pkid },
            },
            Change::Ack { seq } => Write::Ack { client_id, seq },
            Change::Session(filters) => Write::PutSession {
                client_id,
                owner: self.owner.as_deref().map(str::to_owned),
                subscriptions: filters.iter().map(|(f, q)| (f.to_string(), *q)).collect(),
            },
            Change::Delete => Write::DeleteSession { client_id },
            Change::AwaitRelease(packet_id) => Write::AwaitRelease {
                client_id,
                packet_id,
            },
            Change::Release(packet_id) => Write::Release {
                client_id,
                packet_id,
            },
        };
        self.store.write_through(w);
    }

    #[cfg(not(feature = "mqtt-store"))]
    fn keep(&self, _change: Change<'_>) {}
}

/// Where a new persistent session's sequence numbers start: the clock in microseconds, so a
/// late write of a discarded session of the same client id cannot name a newer one's message.
fn seq_base() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_micros() as u64)
}

/// The state of one MQTT session (see the module documentation).
pub struct MqttState {
    /// The id the subscription trie knows a persistent session by (stable across connections).
    id: SessionId,
    client_id: Box<str>,
    /// The verified user that owns it (`None`: anonymous).
    owner: Option<Box<str>>,
    persistent: bool,
    /// The attached connection's handle (persistent sessions; what fan-out delivers to).
    online: ArcSwapOption<SessionHandle>,
    inner: Mutex<Inner>,
    /// Woken when a connection detaches (a takeover waits for the older one).
    detached: tokio::sync::Notify,
    /// Whether it writes through to the durable store (its `Inner::keeper` is set): read
    /// without the lock so that a QoS ≥ 1 delivery without a store takes none.
    durable: std::sync::atomic::AtomicBool,
}

impl std::fmt::Debug for MqttState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MqttState")
            .field("id", &self.id)
            .field("client_id", &self.client_id)
            .field("persistent", &self.persistent)
            .finish_non_exhaustive()
    }
}

#[derive(Debug)]
struct Inner {
    limits: SessionLimits,
    /// The last epoch handed to a connection; `current` is the attached one's.
    epochs: u64,
    current: Option<u64>,
    /// Discarded (clean session, expiry): takes no subscription and no message any more.
    discarded: bool,
    last_pkid: u16,
    inflight: VecDeque<Inflight>,
    queue: VecDeque<Queued>,
    /// Deliveries the attached connection's queue refused (it is closing): they go after what
    /// that queue still holds when it detaches.
    refused: VecDeque<Queued>,
    /// Bytes of `queue` and `refused`.
    queued_bytes: usize,
    /// Messages are being dropped for a full queue (logged once per episode).
    overflowing: bool,
    awaiting_rel: HashSet<u16>,
    filters: HashMap<Box<str>, u8>,
    detached_at: Option<Instant>,
    /// The durable store, for a persistent session when the node has one.
    keeper: Option<Keeper>,
    /// The next sequence number of a message kept in the store.
    next_seq: u64,
    /// Messages kept in the store and handed to the attached connection's outbound queue, not
    /// framed yet, in order: the framer (or the detach) takes each back with its number.
    handed: VecDeque<(Arc<Message>, u64, u8)>,
}

/// Most inbound QoS 2 publishes a client may leave unreleased (PUBREL not yet sent).
pub const MAX_AWAITING_REL: usize = 1024;

impl MqttState {
    /// A new, empty session state.
    pub fn new(
        client_id: &str,
        owner: Option<&str>,
        persistent: bool,
        limits: SessionLimits,
    ) -> Arc<Self> {
        Arc::new(MqttState {
            id: format!("mqtt-session-{}", uuid::Uuid::new_v4()).into(),
            client_id: client_id.into(),
            owner: owner.map(Into::into),
            persistent,
            online: ArcSwapOption::empty(),
            inner: Mutex::new(Inner {
                limits,
                epochs: 0,
                current: None,
                discarded: false,
                last_pkid: 0,
                inflight: VecDeque::new(),
                queue: VecDeque::new(),
                refused: VecDeque::new(),
                queued_bytes: 0,
                overflowing: false,
                awaiting_rel: HashSet::new(),
                filters: HashMap::new(),
                detached_at: None,
                keeper: None,
                next_seq: 0,
                handed: VecDeque::new(),
            }),
            detached: tokio::sync::Notify::new(),
            durable: std::sync::atomic::AtomicBool::new(false),
        })
    }

    /// Write through to `store` from now on (a persistent session of a node with a store).
    fn keep_in(&self, store: Backend, next_seq: u64) {
        let mut st = self.inner.lock();
        st.keeper = Some(Keeper {
            store,
            client_id: self.client_id.clone(),
            owner: self.owner.clone(),
        });
        st.next_seq = next_seq;
        self.durable
            .store(true, std::sync::atomic::Ordering::Release);
    }

    /// Delete the session from the durable store and stop writing to it (it is discarded).
    fn forget(&self) {
        let mut st = self.inner.lock();
        if let Some(k) = st.keeper.take() {
            k.keep(Change::Delete);
        }
        self.durable
            .store(false, std::sync::atomic::Ordering::Release);
    }

    /// The id subscriptions of a persistent session are held under.
    pub fn id(&self) -> &SessionId {
        &self.id
    }

    /// The client id.
    pub fn client_id(&self) -> &str {
        &self.client_id
    }

    /// Whether it outlives its connection (`clean_session = 0`).
    pub fn is_persistent(&self) -> bool {
        self.persistent
    }

    /// An epoch for a connection about to attach: what it frames and acknowledges counts only
    /// while it is the attached one.
    pub fn next_epoch(&self) -> u64 {
        let mut st = self.inner.lock();
        st.epochs += 1;
        st.epochs
    }

    /// Whether a connection is attached.
    pub fn is_attached(&self) -> bool {
        self.inner.lock().current.is_some()
    }

    /// Wait (at most `timeout`) until no connection is attached: a takeover lets the older
    /// connection hand its unsent messages back first. Returns whether it is detached.
    pub async fn wait_detached(&self, timeout: Duration) -> bool {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let notified = self.detached.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if !self.is_attached() {
                return true;
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                return !self.is_attached();
            }
        }
    }

    /// Attach the connection `handle` with `epoch`: from now on deliveries go to it. The
    /// resends (unacknowledged PUBLISHes with DUP = 1, PUBREL for PUBREC'd ones, in their
    /// order) and the first window of queued messages are framed into `out`, which the
    /// connection writes before anything queued for it after this call.
    pub fn attach(
        &self,
        epoch: u64,
        handle: &Arc<SessionHandle>,
        limits: SessionLimits,
        out: &mut BytesMut,
    ) {
        let mut st = self.inner.lock();
        st.limits = limits;
        st.current = Some(epoch);
        st.detached_at = None;
        let refused = std::mem::take(&mut st.refused);
        st.queue.extend(refused);
        for i in &st.inflight {
            if i.released {
                out.extend_from_slice(&mqtt::ack_bytes(Ack::PubRel, i.pkid));
            } else {
                encode(out, &i.msg, i.qos, true, i.pkid);
            }
        }
        if !st.inflight.is_empty() {
            metrics::counter!("warren_mqtt_resent_total").increment(st.inflight.len() as u64);
        }
        st.fill_window(out);
        if self.persistent {
            self.online.store(Some(handle.clone()));
        }
    }

    /// The connection of `epoch` ends: unless another one attached meanwhile, deliveries queue
    /// from now on. `unsent` closes that connection's outbound queue and hands back what it
    /// still held (called under the state's lock, so nothing delivered later overtakes it).
    pub fn detach(&self, epoch: u64, unsent: impl FnOnce() -> Vec<(Arc<Message>, u8)>) {
        let mut st = self.inner.lock();
        let mine = st.current == Some(epoch);
        if mine {
            self.online.store(None);
        }
        for (msg, qos) in unsent() {
            if qos > 0 {
                let seq = st.take_handed(&msg);
                st.enqueue(&self.client_id, Queued { msg, qos, seq });
            }
        }
        if mine {
            // kept messages the connection neither framed nor handed back (it was shut)
            while let Some((msg, seq, qos)) = st.handed.pop_front() {
                st.enqueue(
                    &self.client_id,
                    Queued {
                        qos,
                        msg,
                        seq: Some(seq),
                    },
                );
            }
        }
        let refused = std::mem::take(&mut st.refused);
        st.queue.extend(refused);
        if mine {
            st.current = None;
            st.detached_at = Some(Instant::now());
        }
        drop(st);
        self.detached.notify_waiters();
    }

    /// Fan-out to a persistent session: to the attached connection, else (QoS ≥ 1) into the
    /// queue. Whether the message was taken.
    pub fn deliver(&self, msg: &Arc<Message>, qos: u8) -> bool {
        if qos > 0 && self.durable.load(std::sync::atomic::Ordering::Acquire) {
            return self.deliver_kept(msg, qos);
        }
        if let Some(h) = &*self.online.load()
            && h.deliver(msg.clone(), Some(qos)).is_ok()
        {
            return true;
        }
        if qos == 0 {
            return false;
        }
        let mut st = self.inner.lock();
        if st.discarded {
            return false;
        }
        let q = Queued {
            msg: msg.clone(),
            qos,
            seq: None,
        };
        if st.current.is_some() {
            // attached after the load above, or its queue refused: try it, else keep the
            // message for after what that connection hands back when it detaches
            if let Some(h) = &*self.online.load()
                && h.deliver(msg.clone(), Some(qos)).is_ok()
            {
                return true;
            }
            if st.over_bounds(&q) {
                st.overflow(&self.client_id);
                return false;
            }
            st.queued_bytes += q.size();
            st.refused.push_back(q);
            return true;
        }
        st.enqueue(&self.client_id, q)
    }

    /// [`Self::deliver`] of a QoS ≥ 1 message to a session kept in the durable store: the
    /// message is written (`Enqueue`) before it reaches the connection or the queue, all under
    /// the state's lock so that the store sees the session's messages in their order.
    fn deliver_kept(&self, msg: &Arc<Message>, qos: u8) -> bool {
        let mut st = self.inner.lock();
        if st.discarded {
            return false;
        }
        let mut q = Queued {
            msg: msg.clone(),
            qos,
            seq: None,
        };
        let online = self.online.load_full();
        if online.is_none() && st.over_bounds(&q) {
            st.overflow(&self.client_id);
            return false;
        }
        st.admit(&mut q);
        if let Some(h) = online {
            if let Some(seq) = q.seq {
                st.handed.push_back((msg.clone(), seq, qos));
            }
            if h.deliver(msg.clone(), Some(qos)).is_ok() {
                return true;
            }
            if q.seq.is_some() {
                st.handed.pop_back();
            }
            // its queue refused (it is closing): after what it hands back when it detaches
            if st.over_bounds(&q) {
                st.overflow(&self.client_id);
                st.dropped(&q);
                return false;
            }
            st.queued_bytes += q.size();
            if st.current.is_some() {
                st.refused.push_back(q);
            } else {
                st.queue.push_back(q);
            }
            return true;
        }
        st.queued_bytes += q.size();
        if st.current.is_some() {
            st.refused.push_back(q);
        } else {
            st.queue.push_back(q);
        }
        true
    }

    /// Frame an outbound QoS ≥ 1 message for the connection of `epoch` (its framer): into the
    /// window with a packet id if it has a slot and nothing waits before it, else into the
    /// queue (bounded).
    pub fn frame(&self, epoch: u64, msg: Arc<Message>, qos: u8, out: &mut BytesMut) {
        let mut st = self.inner.lock();
        let seq = st.take_handed(&msg);
        st.enqueue(&self.client_id, Queued { msg, qos, seq });
        if st.current == Some(epoch) {
            st.fill_window(out);
        }
    }

    /// A packet id for a QoS 1 push or reply that is not tracked (acknowledgement counted, not
    /// required): one not in the window, so it cannot be mistaken for a tracked message's.
    pub fn spare_pkid(&self) -> u16 {
        self.inner.lock().next_pkid()
    }

    /// PUBACK from the connection of `epoch`: frees the slot (and frames the next queued
    /// message into `out`). Whether the packet id was awaiting a PUBACK.
    pub fn puback(&self, epoch: u64, pkid: u16, out: &mut BytesMut) -> bool {
        self.complete(epoch, pkid, out, |i| i.qos == 1)
    }

    /// PUBREC: the QoS 2 message is received; PUBCOMP is awaited now (and PUBREL resent on a
    /// reconnect). Whether the packet id was awaiting a PUBREC (or had one already).
    pub fn pubrec(&self, pkid: u16) -> bool {
        let mut st = self.inner.lock();
        let Some(i) = st
            .inflight
            .iter_mut()
            .find(|i| i.pkid == pkid && i.qos == 2)
        else {
            return false;
        };
        i.released = true;
        if let (Some(seq), Some(k)) = (i.seq, &st.keeper) {
            k.keep(Change::Released { seq, pkid });
        }
        true
    }

    /// PUBCOMP: the QoS 2 exchange is over; as [`Self::puback`].
    pub fn pubcomp(&self, epoch: u64, pkid: u16, out: &mut BytesMut) -> bool {
        self.complete(epoch, pkid, out, |i| i.qos == 2 && i.released)
    }

    fn complete(
        &self,
        epoch: u64,
        pkid: u16,
        out: &mut BytesMut,
        awaiting: impl Fn(&Inflight) -> bool,
    ) -> bool {
        let mut st = self.inner.lock();
        let Some(pos) = st
            .inflight
            .iter()
            .position(|i| i.pkid == pkid && awaiting(i))
        else {
            return false;
        };
        if let Some(done) = st.inflight.remove(pos)
            && let (Some(seq), Some(k)) = (done.seq, &st.keeper)
        {
            k.keep(Change::Ack { seq });
        }
        if st.current == Some(epoch) {
            st.fill_window(out);
        }
        true
    }

    /// An inbound QoS 2 PUBLISH with `pkid`: `Ok(true)` the first time (route it), `Ok(false)`
    /// for a resend before PUBREL (answer PUBREC only), `Err(())` past [`MAX_AWAITING_REL`].
    #[allow(clippy::result_unit_err)]
    pub fn receive_qos2(&self, pkid: u16) -> Result<bool, ()> {
        let mut st = self.inner.lock();
        if st.awaiting_rel.contains(&pkid) {
            return Ok(false);
        }
        if st.awaiting_rel.len() >= MAX_AWAITING_REL {
            return Err(());
        }
        st.awaiting_rel.insert(pkid);
        if let Some(k) = &st.keeper {
            k.keep(Change::AwaitRelease(pkid));
        }
        Ok(true)
    }

    /// PUBREL for an inbound QoS 2 packet id: forget it.
    pub fn release(&self, pkid: u16) {
        let mut st = self.inner.lock();
        if st.awaiting_rel.remove(&pkid)
            && let Some(k) = &st.keeper
        {
            k.keep(Change::Release(pkid));
        }
    }

    /// How many filters the session holds, and whether it holds `filter`.
    pub fn filters(&self, filter: &str) -> (usize, bool) {
        let st = self.inner.lock();
        (st.filters.len(), st.filters.contains_key(filter))
    }

    /// Record a subscription, running `insert` (the trie) under the state's lock so that a
    /// discard cannot miss it. `None` when the session was discarded meanwhile.
    pub fn subscribe<T, E>(
        &self,
        filter: &str,
        qos: u8,
        insert: impl FnOnce() -> Result<T, E>,
    ) -> Option<Result<T, E>> {
        let mut st = self.inner.lock();
        if st.discarded {
            return None;
        }
        let r = insert();
        if r.is_ok() {
            st.filters.insert(filter.into(), qos);
            if let Some(k) = &st.keeper {
                k.keep(Change::Session(&st.filters));
            }
        }
        Some(r)
    }

    /// Forget a subscription; whether it was held.
    pub fn unsubscribe(&self, filter: &str) -> bool {
        let mut st = self.inner.lock();
        let held = st.filters.remove(filter).is_some();
        if held && let Some(k) = &st.keeper {
            k.keep(Change::Session(&st.filters));
        }
        held
    }

    /// The filters held, with their granted QoS.
    pub fn subscriptions(&self) -> Vec<(Box<str>, u8)> {
        let st = self.inner.lock();
        st.filters.iter().map(|(f, q)| (f.clone(), *q)).collect()
    }

    /// Mark the session as taking nothing more (discarded or handed over); its durable rows
    /// are deleted by whoever took it out of the node's store.
    fn stop_taking(&self, st: &mut Inner) {
        st.discarded = true;
        st.keeper = None;
        st.handed.clear();
        self.durable
            .store(false, std::sync::atomic::Ordering::Release);
    }

    /// Discard the session (clean session, expiry): it takes nothing more; returns its filters
    /// so the trie can drop them.
    pub fn discard(&self) -> Vec<Box<str>> {
        let mut st = self.inner.lock();
        self.stop_taking(&mut st);
        st.queue.clear();
        st.refused.clear();
        st.inflight.clear();
        st.queued_bytes = 0;
        st.filters.drain().map(|(f, _)| f).collect()
    }

    /// Hand the session over to another gate (docs/protocols/mqtt.md, "Across gates"): like
    /// [`Self::discard`] it takes nothing more from now on, and its transferable part is
    /// exported within `caps` (the asking gate's): the subscriptions, the inbound QoS 2 ids
    /// awaiting PUBREL, and the outbound messages in delivery order, in flight first. What the
    /// caps do not hold is dropped, newest first, as a full queue drops (counted, logged). Returns
    /// the export and the filters, which the caller takes out of the trie.
    pub fn hand_over(&self, caps: &handover::Limits) -> (handover::Handover, Vec<Box<str>>) {
        let mut st = self.inner.lock();
        self.stop_taking(&mut st);
        let filters: Vec<(Box<str>, u8)> = st.filters.drain().collect();
        let mut size = 2
            + 1
            + 4
            + self.client_id.len()
            + self.owner.as_deref().map_or(0, str::len)
            + 6
            + 2
            + 2
            + 4;
        let mut out = handover::Handover {
            client_id: self.client_id.to_string(),
            owner: self.owner.as_deref().map(str::to_owned),
            expiry_s: st
                .limits
                .expiry
                .map_or(0, |e| u32::try_from(e.as_secs()).unwrap_or(u32::MAX)),
            last_pkid: st.last_pkid,
            filters: Vec::new(),
            awaiting: Vec::new(),
            messages: Vec::new(),
        };
        let mut dropped_filters = 0usize;
        for (f, q) in &filters {
            let need = f.len() + handover::FILTER_OVERHEAD;
            if out.filters.len() < caps.max_filters
                && f.len() <= caps.max_topic_len
                && size + need <= caps.max_bytes
            {
                size += need;
                out.filters.push((f.to_string(), *q));
            } else {
                dropped_filters += 1;
            }
        }
        let mut awaiting: Vec<u16> = st.awaiting_rel.drain().collect();
        awaiting.sort_unstable();
        awaiting.truncate(
            caps.max_awaiting
                .min((caps.max_bytes.saturating_sub(size)) / 2),
        );
        size += awaiting.len() * 2;
        out.awaiting = awaiting;
        let inflight = std::mem::take(&mut st.inflight);
        let queued = std::mem::take(&mut st.queue)
            .into_iter()
            .chain(std::mem::take(&mut st.refused));
        let all = inflight
            .into_iter()
            .map(|i| {
                let state = match (i.released, i.qos) {
                    (true, 2) => handover::Delivery::Released { packet_id: i.pkid },
                    _ => handover::Delivery::Sent { packet_id: i.pkid },
                };
                (i.msg, i.qos, state)
            })
            .chain(queued.map(|q| (q.msg, q.qos, handover::Delivery::Queued)));
        let mut dropped = 0usize;
        for (msg, qos, state) in all {
            let m = handover::HandedMessage {
                topic: msg.topic.clone(),
                payload: msg.body.clone(),
                qos: qos.clamp(1, 2),
                retain: msg.retain,
                state,
            };
            let need = m.encoded_len();
            if out.messages.len() < caps.max_messages
                && m.topic.len() <= caps.max_topic_len
                && size + need <= caps.max_bytes
            {
                size += need;
                out.messages.push(m);
            } else {
                dropped += 1;
            }
        }
        st.queued_bytes = 0;
        drop(st);
        if dropped > 0 || dropped_filters > 0 {
            metrics::counter!("warren_mqtt_queue_dropped_total").increment(dropped as u64);
            tracing::warn!(
                client_id = %self.client_id,
                dropped_messages = dropped,
                dropped_filters,
                max_messages = caps.max_messages,
                max_bytes = caps.max_bytes,
                "session handed over to another gate without what its caps do not hold"
            );
        }
        let filters = filters.into_iter().map(|(f, _)| f).collect();
        (out, filters)
    }

    /// Whether the session has had no connection for longer than its expiry at `now`.
    pub fn expired(&self, now: Instant) -> bool {
        let st = self.inner.lock();
        match (st.detached_at, st.limits.expiry) {
            (Some(at), Some(e)) => st.current.is_none() && now.duration_since(at) >= e,
            _ => false,
        }
    }

    /// Messages waiting (queued, not in the window) and messages in the window.
    pub fn counts(&self) -> (usize, usize) {
        let st = self.inner.lock();
        (st.queue.len() + st.refused.len(), st.inflight.len())
    }
}

impl Inner {
    fn over_bounds(&self, q: &Queued) -> bool {
        self.queue.len() + self.refused.len() >= self.limits.max_queued
            || self.queued_bytes + q.size() > self.limits.max_queued_bytes
    }

    /// Drop the newest message for a full queue: counted, and logged once per episode.
    fn overflow(&mut self, client_id: &str) {
        metrics::counter!("warren_mqtt_queue_dropped_total").increment(1);
        if !self.overflowing {
            self.overflowing = true;
            tracing::warn!(
                client_id,
                queued = self.queue.len() + self.refused.len(),
                bytes = self.queued_bytes,
                max_queued_messages = self.limits.max_queued,
                max_session_queued_bytes = self.limits.max_queued_bytes,
                "session queue full: dropping the newest QoS 1/2 messages until it drains"
            );
        }
    }

    /// Give a message taken for a kept session its sequence number and write it to the store.
    fn admit(&mut self, q: &mut Queued) {
        if let Some(k) = &self.keeper {
            let seq = self.next_seq;
            self.next_seq += 1;
            k.keep(Change::Enqueue {
                seq,
                msg: &q.msg,
                qos: q.qos,
            });
            q.seq = Some(seq);
        }
    }

    /// A kept message was dropped (a full queue): it leaves the store too.
    fn dropped(&self, q: &Queued) {
        if let (Some(seq), Some(k)) = (q.seq, &self.keeper) {
            k.keep(Change::Ack { seq });
        }
    }

    /// The sequence number of a kept message handed to the connection, taken back.
    fn take_handed(&mut self, msg: &Arc<Message>) -> Option<u64> {
        if self.handed.is_empty() {
            return None;
        }
        let at = self
            .handed
            .iter()
            .position(|(m, _, _)| Arc::ptr_eq(m, msg))?;
        self.handed.remove(at).map(|(_, seq, _)| seq)
    }

    /// Queue a message at the end (bounded: the newest is dropped). Whether it was kept.
    fn enqueue(&mut self, client_id: &str, q: Queued) -> bool {
        if self.discarded {
            return false;
        }
        if self.over_bounds(&q) {
            self.overflow(client_id);
            self.dropped(&q);
            return false;
        }
        self.queued_bytes += q.size();
        self.queue.push_back(q);
        true
    }

    /// Move queued messages into free window slots, framing each into `out`.
    fn fill_window(&mut self, out: &mut BytesMut) {
        while self.inflight.len() < self.limits.max_inflight {
            let Some(q) = self.queue.pop_front() else {
                break;
            };
            self.queued_bytes -= q.size();
            let pkid = self.next_pkid();
            encode(out, &q.msg, q.qos, false, pkid);
            if let (Some(seq), Some(k)) = (q.seq, &self.keeper) {
                k.keep(Change::Sent { seq, pkid });
            }
            self.inflight.push_back(Inflight {
                pkid,
                msg: q.msg,
                qos: q.qos,
                released: false,
                seq: q.seq,
            });
        }
        if self.queue.is_empty() {
            self.overflowing = false;
        }
    }

    /// The next packet id not in the window (the window is smaller than the id space).
    fn next_pkid(&mut self) -> u16 {
        loop {
            self.last_pkid = self.last_pkid.checked_add(1).unwrap_or(1);
            let id = self.last_pkid;
            if !self.inflight.iter().any(|i| i.pkid == id) {
                return id;
            }
        }
    }
}

fn encode(out: &mut BytesMut, msg: &Message, qos: u8, dup: bool, pkid: u16) {
    let qos = if qos >= 2 {
        QoS::ExactlyOnce
    } else {
        QoS::AtLeastOnce
    };
    mqtt::encode_publish(out, &msg.topic, qos, msg.retain, dup, pkid, &msg.body);
}

/// What [`Store::resume`] found.
#[derive(Debug)]
pub struct Resumed {
    /// The session the connection attaches to.
    pub state: Arc<MqttState>,
    /// Whether it was stored before (CONNACK session present).
    pub present: bool,
    /// A stored session of the client id that had expired: to discard.
    pub expired: Option<Arc<MqttState>>,
}

/// The node's persistent sessions, by client id.
#[derive(Debug, Default)]
pub struct Store {
    sessions: Mutex<HashMap<Box<str>, Arc<MqttState>>>,
    next_sweep: Mutex<Option<Instant>>,
    /// The durable store new sessions write through to (`[mqtt] store`), set at start.
    backend: std::sync::OnceLock<Backend>,
}

impl Store {
    /// Keep the persistent sessions made from now on in `backend` (the node does this at start,
    /// before any client connects, then restores the sessions it holds with
    /// [`Store::restore`]). `false` when a backend was set already.
    pub fn set_backend(&self, backend: Backend) -> bool {
        self.backend.set(backend).is_ok()
    }

    /// Rebuild a persistent session read back from the durable store: its subscriptions (which
    /// the caller puts back in the trie), its messages by sequence number (those sent or
    /// PUBREC'd in the inflight window with their packet ids, resent on reconnect; the others
    /// queued) and its inbound QoS 2 ids awaiting PUBREL. It expires as if its connection had
    /// ended at `now`. Needs [`Store::set_backend`] first (else it is kept in memory only).
    #[cfg(feature = "mqtt-store")]
    pub fn restore(
        &self,
        stored: &crate::mqtt_store::StoredSession,
        queued: Vec<crate::mqtt_store::Queued>,
        awaiting: Vec<u16>,
        limits: SessionLimits,
        now: Instant,
    ) -> Arc<MqttState> {
        use crate::mqtt_store::MessageState;
        let s = MqttState::new(&stored.client_id, stored.owner.as_deref(), true, limits);
        let next = queued.last().map_or(0, |q| q.seq.saturating_add(1));
        if let Some(b) = self.backend.get() {
            s.keep_in(b.clone(), next.max(seq_base()));
        }
        {
            let mut st = s.inner.lock();
            st.detached_at = Some(now);
            st.filters = stored
                .subscriptions
                .iter()
                .map(|(f, q)| (Box::from(f.as_str()), *q))
                .collect();
            st.awaiting_rel = awaiting.into_iter().collect();
            for q in queued {
                let m = q.message;
                let msg = if m.retain {
                    Message::retained(m.topic, m.payload)
                } else {
                    Message::new(m.topic, m.payload)
                };
                let (qos, seq) = (m.qos, Some(q.seq));
                match q.state {
                    MessageState::Queued => {
                        let q = Queued { msg, qos, seq };
                        st.queued_bytes += q.size();
                        st.queue.push_back(q);
                    }
                    MessageState::Sent { packet_id } | MessageState::Released { packet_id } => {
                        let released = matches!(q.state, MessageState::Released { .. });
                        st.last_pkid = st.last_pkid.max(packet_id);
                        st.inflight.push_back(Inflight {
                            pkid: packet_id,
                            msg,
                            qos,
                            released: released && qos == 2,
                            seq,
                        });
                    }
                }
            }
        }
        let mut m = self.sessions.lock();
        m.insert(stored.client_id.as_str().into(), s.clone());
        metrics::gauge!("warren_mqtt_sessions_stored").set(m.len() as f64);
        s
    }

    /// The durable store of the node's persistent sessions (`[mqtt] store`), if any.
    pub fn backend(&self) -> Option<&Backend> {
        self.backend.get()
    }

    /// A new persistent session, written to the durable store when the node has one.
    fn new_session(
        &self,
        client_id: &str,
        owner: Option<&str>,
        limits: SessionLimits,
    ) -> Arc<MqttState> {
        let s = MqttState::new(client_id, owner, true, limits);
        if let Some(b) = self.backend.get() {
            s.keep_in(b.clone(), seq_base());
            let st = s.inner.lock();
            if let Some(k) = &st.keeper {
                k.keep(Change::Session(&st.filters));
            }
        }
        s
    }
    /// Whether a session of `client_id` is stored here (expired or not).
    pub fn holds(&self, client_id: &str) -> bool {
        self.sessions.lock().contains_key(client_id)
    }

    /// Rebuild a session another gate handed over (docs/protocols/mqtt.md, "Across gates"),
    /// written through to the durable store when the node has one: its inflight messages with
    /// their packet ids (resent with DUP, or PUBREL, when the connection attaches), its queue
    /// in order and its inbound QoS 2 ids awaiting PUBREL. Its subscriptions are not in it: the
    /// caller subscribes each filter the ACL still allows ([`MqttState::subscribe`]). It
    /// replaces any session of the client id stored here, which is returned to be discarded.
    pub fn import(
        &self,
        h: &handover::Handover,
        limits: SessionLimits,
    ) -> (Arc<MqttState>, Option<Arc<MqttState>>) {
        let mut m = self.sessions.lock();
        // out of the file before the new session goes in
        let old = m.remove(h.client_id.as_str());
        if let Some(old) = &old {
            old.forget();
        }
        let s = self.new_session(&h.client_id, h.owner.as_deref(), limits);
        {
            let mut st = s.inner.lock();
            st.last_pkid = h.last_pkid;
            for &id in &h.awaiting {
                if st.awaiting_rel.insert(id)
                    && let Some(k) = &st.keeper
                {
                    k.keep(Change::AwaitRelease(id));
                }
            }
            for m in &h.messages {
                let msg = if m.retain {
                    Message::retained(m.topic.clone(), m.payload.clone())
                } else {
                    Message::new(m.topic.clone(), m.payload.clone())
                };
                let mut q = Queued {
                    msg,
                    qos: m.qos,
                    seq: None,
                };
                st.admit(&mut q);
                match m.state {
                    handover::Delivery::Queued => {
                        st.queued_bytes += q.size();
                        st.queue.push_back(q);
                    }
                    handover::Delivery::Sent { packet_id }
                    | handover::Delivery::Released { packet_id } => {
                        let released = matches!(m.state, handover::Delivery::Released { .. });
                        if let (Some(seq), Some(k)) = (q.seq, &st.keeper) {
                            k.keep(if released {
                                Change::Released {
                                    seq,
                                    pkid: packet_id,
                                }
                            } else {
                                Change::Sent {
                                    seq,
                                    pkid: packet_id,
                                }
                            });
                        }
                        st.inflight.push_back(Inflight {
                            pkid: packet_id,
                            msg: q.msg,
                            qos: q.qos,
                            released,
                            seq: q.seq,
                        });
                    }
                }
            }
            st.detached_at = Some(Instant::now());
        }
        m.insert(h.client_id.as_str().into(), s.clone());
        metrics::gauge!("warren_mqtt_sessions_stored").set(m.len() as f64);
        (s, old)
    }

    /// The stored session of `client_id` for a `clean_session = 0` connection of `owner`: the
    /// stored one (session present) unless it expired, else a new one, stored. Refused when it
    /// belongs to another user.
    pub fn resume(
        &self,
        client_id: &str,
        owner: Option<&str>,
        limits: SessionLimits,
        now: Instant,
    ) -> Result<Resumed, StoreError> {
        let mut m = self.sessions.lock();
        let mut expired = None;
        if let Some(s) = m.get(client_id) {
            if s.owner.as_deref() != owner {
                return Err(StoreError::NotOwner(client_id.to_owned()));
            }
            if !s.expired(now) {
                return Ok(Resumed {
                    state: s.clone(),
                    present: true,
                    expired: None,
                });
            }
            expired = m.remove(client_id);
            if let Some(old) = &expired {
                // out of the file before the new session goes in
                old.forget();
            }
        }
        let s = self.new_session(client_id, owner, limits);
        m.insert(client_id.into(), s.clone());
        metrics::gauge!("warren_mqtt_sessions_stored").set(m.len() as f64);
        Ok(Resumed {
            state: s,
            present: false,
            expired,
        })
    }

    /// Take the stored session of `client_id` out (a `clean_session = 1` connection discards
    /// it). Refused when it belongs to another user.
    pub fn take(
        &self,
        client_id: &str,
        owner: Option<&str>,
    ) -> Result<Option<Arc<MqttState>>, StoreError> {
        let mut m = self.sessions.lock();
        match m.get(client_id) {
            None => Ok(None),
            Some(s) if s.owner.as_deref() != owner => {
                Err(StoreError::NotOwner(client_id.to_owned()))
            }
            Some(_) => {
                let s = m.remove(client_id);
                if let Some(s) = &s {
                    s.forget();
                }
                metrics::gauge!("warren_mqtt_sessions_stored").set(m.len() as f64);
                Ok(s)
            }
        }
    }

    /// Take out the sessions whose expiry passed, at most once per `every` (memory stays
    /// bounded: offline sessions are made only by connections, which call this).
    pub fn sweep(&self, now: Instant, every: Duration) -> Vec<Arc<MqttState>> {
        {
            let mut next = self.next_sweep.lock();
            if next.is_some_and(|n| now < n) {
                return Vec::new();
            }
            *next = Some(now + every);
        }
        let mut m = self.sessions.lock();
        let gone: Vec<Box<str>> = m
            .iter()
            .filter(|(_, s)| s.expired(now))
            .map(|(k, _)| k.clone())
            .collect();
        let out: Vec<_> = gone.iter().filter_map(|k| m.remove(k)).collect();
        for s in &out {
            s.forget();
        }
        if !out.is_empty() {
            metrics::counter!("warren_mqtt_sessions_expired_total").increment(out.len() as u64);
            metrics::gauge!("warren_mqtt_sessions_stored").set(m.len() as f64);
        }
        out
    }

    /// Stored sessions.
    pub fn len(&self) -> usize {
        self.sessions.lock().len()
    }

    /// Whether none is stored.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::session::{Outbound, OutboxRx};

    fn limits(inflight: usize, queued: usize) -> SessionLimits {
        SessionLimits {
            max_inflight: inflight,
            max_queued: queued,
            max_queued_bytes: 1 << 20,
            expiry: Some(Duration::from_secs(60)),
        }
    }

    fn handle(id: &str) -> (Arc<SessionHandle>, OutboxRx) {
        crate::session::test_handle(id, 64)
    }

    fn msg(body: &str) -> Arc<Message> {
        Message::new(bytes::Bytes::from_static(b"t"), body.to_owned())
    }

    /// The (packet type nibble, dup, pkid, body) of each packet in `buf`.
    fn packets(buf: &mut BytesMut) -> Vec<(u8, bool, u16, String)> {
        let mut v = vec![];
        while let Ok(Some(p)) = mqtt::decode(buf, 1 << 20) {
            match p {
                mqtt::Packet::Publish(p) => v.push((
                    3,
                    p.dup,
                    p.pkid,
                    String::from_utf8_lossy(&p.payload).into_owned(),
                )),
                mqtt::Packet::PubRel(id) => v.push((6, false, id, String::new())),
                other => panic!("unexpected {}", other.name()),
            }
        }
        v
    }

    #[test]
    fn the_window_holds_max_inflight_and_acks_free_slots_in_order() {
        let s = MqttState::new("c", None, false, limits(2, 10));
        let (h, _rx) = handle("h");
        let e = s.next_epoch();
        let mut out = BytesMut::new();
        s.attach(e, &h, limits(2, 10), &mut out);
        for b in ["a", "b", "c", "d"] {
            s.frame(e, msg(b), 1, &mut out);
        }
        let got = packets(&mut out);
        assert_eq!(
            got.iter().map(|p| (p.2, p.3.as_str())).collect::<Vec<_>>(),
            vec![(1, "a"), (2, "b")]
        );
        assert_eq!(s.counts(), (2, 2));
        assert!(!s.puback(e, 7, &mut out), "unknown id");
        assert!(s.puback(e, 2, &mut out));
        assert!(!s.puback(e, 2, &mut out), "acked twice");
        let got = packets(&mut out);
        assert_eq!(got, vec![(3, false, 3, "c".into())]);
        // a PUBACK does not complete a QoS 2 message, nor PUBCOMP a QoS 1 one
        s.frame(e, msg("q2"), 2, &mut out);
        assert!(s.puback(e, 1, &mut out));
        assert_eq!(packets(&mut out), vec![(3, false, 4, "d".into())]);
        assert!(s.puback(e, 3, &mut out));
        assert_eq!(packets(&mut out), vec![(3, false, 5, "q2".into())]);
        assert!(!s.puback(e, 5, &mut out));
        assert!(!s.pubcomp(e, 5, &mut out), "PUBCOMP before PUBREC");
        assert!(s.pubrec(5));
        assert!(s.pubcomp(e, 5, &mut out));
        assert_eq!(s.counts(), (0, 1));
    }

    #[test]
    fn a_reconnect_resends_in_order_with_dup_then_pubrel_then_the_queue() {
        let s = MqttState::new("c", None, true, limits(3, 10));
        let (h1, _rx1) = handle("h1");
        let e1 = s.next_epoch();
        let mut out = BytesMut::new();
        s.attach(e1, &h1, limits(3, 10), &mut out);
        s.frame(e1, msg("one"), 1, &mut out);
        s.frame(e1, msg("two"), 2, &mut out);
        s.frame(e1, msg("three"), 1, &mut out);
        assert!(s.pubrec(2));
        assert!(s.puback(e1, 1, &mut out));
        packets(&mut out);
        // the connection ends with one message still in its outbound queue
        s.detach(e1, || vec![(msg("four"), 1), (msg("qos0"), 0)]);
        assert!(!s.is_attached());
        // offline: QoS 1 is queued, QoS 0 is not
        assert!(s.deliver(&msg("five"), 1));
        assert!(!s.deliver(&msg("six"), 0));
        // an old connection's late framing or acks do nothing to the window
        s.frame(e1, msg("late"), 1, &mut out);
        assert!(out.is_empty());
        let (h2, _rx2) = handle("h2");
        let e2 = s.next_epoch();
        s.attach(e2, &h2, limits(3, 10), &mut out);
        assert_eq!(
            packets(&mut out),
            vec![
                (6, false, 2, String::new()),
                (3, true, 3, "three".into()),
                (3, false, 4, "four".into()),
            ]
        );
        assert!(s.pubcomp(e2, 2, &mut out));
        assert_eq!(packets(&mut out), vec![(3, false, 5, "five".into())]);
        assert!(s.puback(e2, 3, &mut out));
        assert_eq!(packets(&mut out), vec![(3, false, 6, "late".into())]);
    }

    #[test]
    fn the_queue_drops_the_newest_past_its_bounds() {
        let s = MqttState::new("c", None, true, limits(1, 3));
        for i in 0..5 {
            let kept = s.deliver(&msg(&i.to_string()), 1);
            assert_eq!(kept, i < 3, "{i}");
        }
        assert_eq!(s.counts(), (3, 0));
        let (h, _rx) = handle("h");
        let e = s.next_epoch();
        let mut out = BytesMut::new();
        s.attach(e, &h, limits(1, 3), &mut out);
        assert_eq!(packets(&mut out), vec![(3, false, 1, "0".into())]);
        // bytes bound too
        let small = SessionLimits {
            max_queued_bytes: 10,
            ..limits(1, 100)
        };
        let s = MqttState::new("c", None, true, small);
        assert!(s.deliver(&msg("12345678"), 1));
        assert!(!s.deliver(&msg("12"), 1));
    }

    #[tokio::test]
    async fn online_deliveries_go_to_the_connection_and_refused_ones_after_its_queue() {
        let s = MqttState::new("c", None, true, limits(8, 10));
        let (h, mut rx) = handle("h");
        let e = s.next_epoch();
        let mut out = BytesMut::new();
        s.attach(e, &h, limits(8, 10), &mut out);
        assert!(s.deliver(&msg("a"), 0));
        assert!(s.deliver(&msg("b"), 1));
        let mut unsent = vec![];
        while let Some(Outbound::Message { msg, qos }) = rx.try_recv() {
            unsent.push((msg, qos.unwrap_or(0)));
        }
        assert_eq!(unsent.len(), 2);
        // the connection closes; a delivery now is refused by its queue and kept for later
        rx.close();
        assert!(s.deliver(&msg("c"), 1));
        s.detach(e, || unsent);
        let (h2, _rx2) = handle("h2");
        let e2 = s.next_epoch();
        s.attach(e2, &h2, limits(8, 10), &mut out);
        let bodies: Vec<String> = packets(&mut out).into_iter().map(|p| p.3).collect();
        assert_eq!(bodies, vec!["b", "c"]);
    }

    #[test]
    fn inbound_qos2_ids_are_remembered_until_pubrel() {
        let s = MqttState::new("c", None, true, limits(8, 10));
        assert_eq!(s.receive_qos2(9), Ok(true));
        assert_eq!(s.receive_qos2(9), Ok(false));
        s.release(9);
        assert_eq!(s.receive_qos2(9), Ok(true));
    }

    /// A fresh store file in the temp dir, removed with the handle.
    #[cfg(feature = "mqtt-store")]
    fn durable_store(name: &str) -> (crate::mqtt_store::MqttStore, std::path::PathBuf) {
        let p = std::env::temp_dir().join(format!(
            "warren-session-{name}-{}-{}.redb",
            std::process::id(),
            uuid::Uuid::new_v4().simple()
        ));
        let s = crate::mqtt_store::MqttStore::open(&p, Default::default()).unwrap();
        (s, p)
    }

    #[cfg(feature = "mqtt-store")]
    #[tokio::test]
    async fn a_kept_session_writes_through_and_is_restored_as_it_was() {
        use crate::mqtt_store::{MessageState, collecting};
        let (db, path) = durable_store("kept");
        let store = Store::default();
        assert!(store.set_backend(db.clone()));
        let now = Instant::now();
        let l = limits(2, 10);
        let s = store.resume("c", Some("ann"), l, now).unwrap().state;
        assert!(s.subscribe("a/#", 1, || Ok::<_, ()>(())).unwrap().is_ok());
        assert!(s.subscribe("b", 2, || Ok::<_, ()>(())).unwrap().is_ok());
        assert!(s.unsubscribe("b"));
        // offline: the publisher collects the Enqueue writes and waits for them
        let (kept, writes) = collecting(|| {
            ["one", "two", "three"]
                .iter()
                .all(|b| s.deliver(&msg(b), 1))
        });
        assert!(kept);
        assert!(!writes.is_empty());
        writes.settle(&db).await.unwrap();
        assert_eq!(db.queued("c").unwrap().len(), 3);
        // QoS 0 is never written
        let (_, writes) = collecting(|| s.deliver(&msg("zero"), 0));
        assert!(writes.is_empty());
        // attach: two go in flight (Sent), one is acked
        let (h, _rx) = handle("h");
        let e = s.next_epoch();
        let mut out = BytesMut::new();
        s.attach(e, &h, l, &mut out);
        let sent = packets(&mut out);
        assert_eq!(sent.len(), 2);
        assert!(s.puback(e, sent[0].2, &mut out));
        assert_eq!(
            packets(&mut out).len(),
            1,
            "the third moves into the window"
        );
        assert_eq!(s.receive_qos2(42), Ok(true));
        db.flush().await.unwrap();
        let q = db.queued("c").unwrap();
        assert_eq!(q.len(), 2);
        assert!(
            q.iter()
                .all(|m| matches!(m.state, MessageState::Sent { .. }))
        );
        assert_eq!(db.awaiting_release("c").unwrap(), vec![42]);
        let stored = db.sessions().unwrap();
        assert_eq!(stored.len(), 1);
        assert_eq!(stored[0].subscriptions, vec![("a/#".to_owned(), 1)]);
        assert_eq!(stored[0].owner.as_deref(), Some("ann"));

        // a restart: rebuilt from the file, the two resent with DUP in order
        let again = Store::default();
        again.set_backend(db.clone());
        let r = again.restore(
            &stored[0],
            db.queued("c").unwrap(),
            db.awaiting_release("c").unwrap(),
            l,
            now,
        );
        assert_eq!(r.filters("a/#"), (1, true));
        assert_eq!(r.receive_qos2(42), Ok(false), "still awaiting PUBREL");
        assert!(
            again.resume("c", Some("bob"), l, now).is_err(),
            "the owner is kept"
        );
        let (h2, _rx2) = handle("h2");
        let e2 = r.next_epoch();
        r.attach(e2, &h2, l, &mut out);
        let resent = packets(&mut out);
        assert_eq!(
            resent
                .iter()
                .map(|p| (p.1, p.3.as_str()))
                .collect::<Vec<_>>(),
            vec![(true, "two"), (true, "three")]
        );
        // a clean start deletes it from the file
        let gone = again.take("c", Some("ann")).unwrap().unwrap();
        gone.discard();
        db.flush().await.unwrap();
        assert!(db.sessions().unwrap().is_empty());
        assert!(db.queued("c").unwrap().is_empty());
        drop((db, s, r, gone, store, again));
        let _ = std::fs::remove_file(path);
    }

    #[cfg(feature = "mqtt-store")]
    #[tokio::test]
    async fn an_online_kept_delivery_is_named_by_the_framer_and_handed_back_on_detach() {
        use crate::mqtt_store::collecting;
        let (db, path) = durable_store("online");
        let store = Store::default();
        store.set_backend(db.clone());
        let l = limits(8, 10);
        let s = store.resume("c", None, l, Instant::now()).unwrap().state;
        let (h, mut rx) = handle("h");
        let e = s.next_epoch();
        let mut out = BytesMut::new();
        s.attach(e, &h, l, &mut out);
        let (_, w) = collecting(|| {
            assert!(s.deliver(&msg("framed"), 1));
            assert!(s.deliver(&msg("unsent"), 1));
        });
        w.settle(&db).await.unwrap();
        let mut items = vec![];
        while let Some(Outbound::Message { msg, qos }) = rx.try_recv() {
            items.push((msg, qos.unwrap_or(0)));
        }
        assert_eq!(items.len(), 2);
        // the framer takes the first; the second is handed back when the connection ends
        let (m, q) = items.remove(0);
        s.frame(e, m, q, &mut out);
        let p = packets(&mut out);
        assert_eq!(p.len(), 1);
        assert!(s.puback(e, p[0].2, &mut out));
        s.detach(e, || items);
        db.flush().await.unwrap();
        let q = db.queued("c").unwrap();
        assert_eq!(q.len(), 1, "the acked one is gone: {q:?}");
        assert_eq!(&q[0].message.payload[..], b"unsent");
        drop((db, s, store));
        let _ = std::fs::remove_file(path);
    }

    #[test]
    fn a_session_handed_over_resumes_on_another_store_as_it_was() {
        let caps = |max_messages| handover::Limits {
            max_filters: 8,
            max_topic_len: 64,
            max_messages,
            max_awaiting: 8,
            max_bytes: 1 << 20,
        };
        let l = limits(2, 10);
        let a = Store::default();
        let s = a.resume("c", Some("ann"), l, Instant::now()).unwrap().state;
        assert!(s.subscribe("t/#", 1, || Ok::<_, ()>(())).unwrap().is_ok());
        let (h, _rx) = handle("h");
        let e = s.next_epoch();
        let mut out = BytesMut::new();
        s.attach(e, &h, l, &mut out);
        s.frame(e, msg("one"), 2, &mut out);
        s.frame(e, msg("two"), 1, &mut out);
        s.frame(e, msg("three"), 1, &mut out);
        assert!(s.pubrec(1));
        packets(&mut out);
        s.detach(e, Vec::new);
        assert_eq!(s.receive_qos2(7), Ok(true));
        assert!(s.deliver(&msg("four"), 1));
        // taken out of gate A's store: only one taker gets it
        let taken = a.take("c", Some("ann")).unwrap().unwrap();
        assert!(a.take("c", Some("ann")).unwrap().is_none());
        let (exp, filters) = taken.hand_over(&caps(8));
        assert_eq!(filters, vec![Box::<str>::from("t/#")]);
        assert!(
            !taken.deliver(&msg("late"), 1),
            "a handed-over session takes nothing more"
        );
        // through the wire form into gate B's store
        let body = handover::Answer::Session(exp).encode();
        let Ok(handover::Answer::Session(exp)) = handover::Answer::decode(body, &caps(8)) else {
            panic!("the handover does not decode");
        };
        assert_eq!(exp.filters, vec![("t/#".to_owned(), 1)]);
        let b = Store::default();
        let (r, old) = b.import(&exp, l);
        assert!(old.is_none() && r.is_persistent() && b.holds("c"));
        assert_eq!(r.receive_qos2(7), Ok(false), "still awaiting PUBREL");
        assert!(
            b.resume("c", Some("bob"), l, Instant::now()).is_err(),
            "the owner is kept"
        );
        let (h2, _rx2) = handle("h2");
        let e2 = r.next_epoch();
        r.attach(e2, &h2, l, &mut out);
        assert_eq!(
            packets(&mut out),
            vec![(6, false, 1, String::new()), (3, true, 2, "two".into())]
        );
        assert!(r.puback(e2, 2, &mut out));
        assert_eq!(packets(&mut out), vec![(3, false, 3, "three".into())]);
        assert!(r.pubcomp(e2, 1, &mut out));
        assert_eq!(packets(&mut out), vec![(3, false, 4, "four".into())]);

        // caps smaller than the session: the newest messages are dropped
        let s = MqttState::new("d", None, true, limits(8, 10));
        for m in ["a", "b", "c"] {
            assert!(s.deliver(&msg(m), 1));
        }
        let (exp, _) = s.hand_over(&caps(2));
        let kept: Vec<_> = exp.messages.iter().map(|m| m.payload.clone()).collect();
        assert_eq!(kept, vec![bytes::Bytes::from("a"), bytes::Bytes::from("b")]);
    }

    #[cfg(feature = "mqtt-store")]
    #[tokio::test]
    async fn the_durable_rows_move_with_a_handed_over_session() {
        use crate::mqtt_store::MessageState;
        let caps = handover::Limits {
            max_filters: 8,
            max_topic_len: 64,
            max_messages: 8,
            max_awaiting: 8,
            max_bytes: 1 << 20,
        };
        let l = limits(1, 10);
        let (db_a, path_a) = durable_store("from");
        let (db_b, path_b) = durable_store("to");
        let a = Store::default();
        a.set_backend(db_a.clone());
        let s = a.resume("c", None, l, Instant::now()).unwrap().state;
        assert!(s.subscribe("t/#", 2, || Ok::<_, ()>(())).unwrap().is_ok());
        let (h, _rx) = handle("h");
        let e = s.next_epoch();
        let mut out = BytesMut::new();
        s.attach(e, &h, l, &mut out);
        s.frame(e, msg("sent"), 2, &mut out);
        s.frame(e, msg("queued"), 1, &mut out);
        assert!(s.pubrec(1));
        assert_eq!(s.receive_qos2(5), Ok(true));
        s.detach(e, Vec::new);
        db_a.flush().await.unwrap();
        assert_eq!(db_a.sessions().unwrap().len(), 1);
        // gate A gives it up: its rows go
        let taken = a.take("c", None).unwrap().unwrap();
        let (exp, _) = taken.hand_over(&caps);
        db_a.flush().await.unwrap();
        assert!(db_a.sessions().unwrap().is_empty());
        assert!(db_a.queued("c").unwrap().is_empty());
        assert!(db_a.awaiting_release("c").unwrap().is_empty());
        // gate B takes it: its rows are written as the session was
        let b = Store::default();
        b.set_backend(db_b.clone());
        let (r, _) = b.import(&exp, l);
        assert!(r.subscribe("t/#", 2, || Ok::<_, ()>(())).unwrap().is_ok());
        db_b.flush().await.unwrap();
        let stored = db_b.sessions().unwrap();
        assert_eq!(stored.len(), 1);
        assert_eq!(stored[0].subscriptions, vec![("t/#".to_owned(), 2)]);
        let q = db_b.queued("c").unwrap();
        let states: Vec<_> = q
            .iter()
            .map(|m| (m.message.payload.clone(), m.state))
            .collect();
        assert_eq!(
            states,
            vec![
                (
                    bytes::Bytes::from("sent"),
                    MessageState::Released { packet_id: 1 }
                ),
                (bytes::Bytes::from("queued"), MessageState::Queued),
            ]
        );
        assert_eq!(db_b.awaiting_release("c").unwrap(), vec![5]);
        drop((db_a, db_b, s, taken, r, a, b));
        let _ = std::fs::remove_file(path_a);
        let _ = std::fs::remove_file(path_b);
    }

    #[test]
    fn the_store_resumes_discards_and_expires() {
        let store = Store::default();
        let now = Instant::now();
        let l = SessionLimits {
            expiry: Some(Duration::from_secs(10)),
            ..limits(8, 10)
        };
        let r = store.resume("c1", Some("ann"), l, now).unwrap();
        let a = r.state;
        assert!(!r.present);
        let r = store.resume("c1", Some("ann"), l, now).unwrap();
        assert!(r.present && Arc::ptr_eq(&a, &r.state));
        assert_eq!(
            store
                .resume("c1", Some("bob"), l, now)
                .map(|_| ())
                .unwrap_err(),
            StoreError::NotOwner("c1".into())
        );
        assert!(store.take("c1", None).is_err());
        // detached for longer than the expiry: not resumed, swept
        let (h, _rx) = handle("h");
        let e = a.next_epoch();
        a.attach(e, &h, l, &mut BytesMut::new());
        a.detach(e, Vec::new);
        let later = Instant::now() + Duration::from_secs(11);
        assert!(a.expired(later));
        assert_eq!(store.sweep(later, Duration::from_secs(1)).len(), 1);
        assert!(store.is_empty());
        let r = store.resume("c1", Some("ann"), l, later).unwrap();
        assert!(!r.present && !Arc::ptr_eq(&a, &r.state));
        assert!(store.take("c1", Some("ann")).unwrap().is_some());
        assert!(store.is_empty());
    }
}

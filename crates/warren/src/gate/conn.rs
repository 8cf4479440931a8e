//! What every connection task shares, whatever protocol it speaks.
//!
//! A protocol module (`mqtt.rs`, …) implements [`Dialect`]: how to handle the complete frames in
//! the read buffer, how to turn a handler's result into a reply, and how to frame outbound items
//! ([`Framer`]). [`SessionConn`] owns the session, its outbound queue, the pending replies and the
//! socket's writing side; [`run`] is the one loop (close, drain, writes, replies, queued items,
//! deadlines, reads) they all use, on the connection's one task, and [`SessionConn::finish`] the
//! one way a connection ends. (The trait is a *dialect* of that loop; `session::Protocol` names
//! which protocol a session speaks.)
//!
//! The limits every protocol gets from here: the outbound queue is bounded in items
//! (`write_queue`) and bytes (`write_queue_bytes`, and the node's `max_queued_bytes`), a push
//! that does not fit closes the session as a slow consumer, a reply waits for the socket; the
//! connection's rates (`msg_rate`, `byte_rate`) pause reading; the first meaningful message is
//! due within `connect_timeout_s`, then silence ends at the protocol's read timeout; a WebSocket
//! always closes with a code that says why ([`close_code`]).

use std::collections::VecDeque;
use std::future::Future;
use std::net::SocketAddr;
use std::num::NonZeroU32;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context as TaskContext, Poll};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use futures_util::StreamExt;
use futures_util::stream::FuturesUnordered;
use governor::clock::{Clock, DefaultClock};
use governor::{DefaultDirectRateLimiter, Quota, RateLimiter};
use tokio::time::Instant;

use super::Gate;
use super::io::{Reader, Writer};
use crate::bus::Pending;
use crate::config::ListenerConfig;
use crate::error::CallError;
use crate::refusal;
use crate::route::Route;
use crate::router::Target;
use crate::session::{
    Network, Outbound, Protocol as SessionProtocol, QueueBytes, Session, SessionHandle, Signal,
};

/// WebSocket close codes (RFC 6455 §7.4.1) a connection says goodbye with. On TCP there is no
/// code: the socket is shut down.
pub(crate) mod close_code {
    /// The connection did what it was for (the client said goodbye or closed, a session `Close`).
    pub(crate) const NORMAL: u16 = 1000;
    /// The server is going away (drain) or the client went silent (idle timeout).
    pub(crate) const GOING_AWAY: u16 = 1001;
    /// The client broke its protocol (a malformed packet, a WebSocket protocol error).
    pub(crate) const PROTOCOL_ERROR: u16 = 1002;
    /// A data type the endpoint cannot accept (a text frame on a binary protocol).
    pub(crate) const UNSUPPORTED_DATA: u16 = 1003;
    /// A text frame that is not UTF-8, or a message that is not what the protocol carries.
    pub(crate) const BAD_DATA: u16 = 1007;
    /// A rule of this server (login refused, deadline missed, slow consumer).
    pub(crate) const POLICY: u16 = 1008;
    /// A frame or message over the listener's size limit.
    pub(crate) const TOO_BIG: u16 = 1009;
    /// The server failed.
    pub(crate) const SERVER_ERROR: u16 = 1011;
}

/// Why a connection ends, for the log line and for how it closes.
pub(crate) enum End {
    /// The peer closed the socket.
    PeerClosed,
    /// The client said goodbye in its protocol.
    Disconnect,
    /// The client broke a rule; the text is logged with its address (WebSocket close 1002).
    Refused(String),
    /// As `Refused`, closing a WebSocket with this close code (1007 bad data, 1008 policy).
    RefusedWithCode(u16, String),
    /// A limit or deadline ended it: the kind names it in `warren_refusals_total` and the log
    /// line (`connect_timeout`, `idle_timeout`, `ws_too_big`…), then the WebSocket close code.
    Limit(&'static str, u16, String),
    /// The server closed it (session `Close`, takeover, slow consumer).
    ServerClosed,
    /// Shutdown: in-flight requests are done.
    Drained,
    /// A write made no progress for `write_timeout_s`: a client that does not read.
    Stalled(Duration),
}

impl End {
    /// The WebSocket close code this end says goodbye with.
    pub(crate) fn close_code(&self) -> u16 {
        match self {
            End::PeerClosed | End::Disconnect | End::ServerClosed => close_code::NORMAL,
            End::Refused(_) => close_code::PROTOCOL_ERROR,
            End::RefusedWithCode(code, _) | End::Limit(_, code, _) => *code,
            End::Drained => close_code::GOING_AWAY,
            End::Stalled(_) => close_code::POLICY,
        }
    }

    /// The refusal kind of a close code, for the metric and the log line.
    fn kind_of(code: u16) -> &'static str {
        match code {
            close_code::UNSUPPORTED_DATA => "unsupported_data",
            close_code::BAD_DATA => "bad_data",
            close_code::POLICY => "policy",
            close_code::TOO_BIG => "too_big",
            close_code::SERVER_ERROR => "server_error",
            _ => "protocol",
        }
    }
}

/// A read that failed: the peer went away, or the WebSocket layer refused what the client sent
/// (each with its close code: not UTF-8 1007, too big 1009, a protocol violation 1002).
pub(crate) fn read_error(e: &std::io::Error) -> End {
    use tungstenite::error::{CapacityError, Error as WsError, ProtocolError};
    if matches!(
        e.kind(),
        std::io::ErrorKind::ConnectionReset
            | std::io::ErrorKind::BrokenPipe
            | std::io::ErrorKind::ConnectionAborted
            | std::io::ErrorKind::UnexpectedEof
    ) {
        return End::PeerClosed;
    }
    let inner = e.get_ref();
    if inner.is_some_and(|i| i.is::<super::io::TextOnBinary>()) {
        return End::Limit("ws_data_type", close_code::UNSUPPORTED_DATA, e.to_string());
    }
    // the WebSocket library's error, inside the io::Error the reader returns
    let ws = inner.and_then(|i| i.downcast_ref::<WsError>());
    match ws {
        Some(
            WsError::ConnectionClosed
            | WsError::AlreadyClosed
            | WsError::Protocol(ProtocolError::ResetWithoutClosingHandshake),
        ) => End::PeerClosed,
        Some(WsError::Utf8(_)) => End::Limit(
            "ws_bad_utf8",
            close_code::BAD_DATA,
            format!("text frame is not UTF-8: {e}"),
        ),
        Some(WsError::Capacity(CapacityError::MessageTooLong { .. })) => End::Limit(
            "ws_too_big",
            close_code::TOO_BIG,
            format!("frame or message over the size limit: {e}"),
        ),
        Some(WsError::Capacity(_) | WsError::Protocol(_) | WsError::AttackAttempt) => End::Limit(
            "ws_protocol",
            close_code::PROTOCOL_ERROR,
            format!("websocket protocol error: {e}"),
        ),
        Some(WsError::Io(io)) if io.kind() != std::io::ErrorKind::Other => read_error(io),
        _ => End::Refused(format!("read failed: {e}")),
    }
}

/// Frames outbound items in one protocol's bytes, on the connection's task.
pub(crate) trait Framer: Send + 'static {
    /// Append `item`'s bytes to `out`. `Outbound::Close` never reaches the framer.
    fn frame(&mut self, item: Outbound, out: &mut Out);
}

/// The writer's buffer. Stream protocols just append; message protocols on WebSocket (JSON)
/// mark where each message ends so each goes in its own frame.
#[derive(Default)]
pub(crate) struct Out {
    pub(crate) buf: BytesMut,
    pub(crate) ends: Vec<usize>,
    /// Written but not yet flushed (TLS, WebSocket).
    pub(crate) unflushed: bool,
}

impl Out {
    /// Mark the end of one message (message-oriented transports only).
    pub(crate) fn end_message(&mut self) {
        self.ends.push(self.buf.len());
    }
}

/// A reply on its way back: the protocol's tag for it (the MQTT topic, a pomelo request id…),
/// `None` when the client wants no reply, and the pending result.
pub(crate) struct ReplyFuture<T> {
    tag: Option<T>,
    pending: Pending,
}

impl<T: Unpin> Future for ReplyFuture<T> {
    type Output = (Option<T>, Result<Bytes, CallError>);
    fn poll(mut self: Pin<&mut Self>, cx: &mut TaskContext<'_>) -> Poll<Self::Output> {
        match std::pin::Pin::new(&mut self.pending).poll(cx) {
            Poll::Pending => Poll::Pending,
            Poll::Ready(r) => Poll::Ready((self.tag.take(), r)),
        }
    }
}

/// One protocol's connection logic, driven by [`run`].
pub(crate) trait Dialect: Send + Sized + 'static {
    /// What identifies a reply (topic, request id, callback name).
    type Tag: Send + Unpin + 'static;

    /// Handle the complete frames in `buf` while `conn` has room for more requests in flight.
    /// Returns whether anything was handled (to re-arm the read deadline).
    fn handle_buffered(
        &mut self,
        conn: &mut SessionConn<Self::Tag>,
        buf: &mut BytesMut,
    ) -> impl Future<Output = Result<bool, End>> + Send;

    /// Turn a handler result into the protocol's reply: the item to send, or `None` when the
    /// protocol sends nothing now (a silent listener, a batch flushed on the next tick).
    fn reply(&mut self, tag: Self::Tag, result: Result<Bytes, CallError>) -> Option<Outbound>;

    /// How long the connection may stay silent.
    fn read_timeout(&self) -> Option<Duration>;

    /// What the connection still waits for before it is established (`"the pomelo handshake"`,
    /// `"login"`…), or `None` once it is. Until then the read deadline is the listener's
    /// `connect_timeout_s`, counted from the start and not re-armed by other traffic, so a
    /// client that never says its first meaningful message cannot hold a connection.
    fn awaiting(&self, _conn: &SessionConn<Self::Tag>) -> Option<&'static str> {
        None
    }

    /// A period at which [`Dialect::on_tick`] runs (buffered flushes), if any.
    fn tick(&self) -> Option<Duration> {
        None
    }

    /// Runs every [`Dialect::tick`].
    fn on_tick(
        &mut self,
        _conn: &mut SessionConn<Self::Tag>,
    ) -> impl Future<Output = Result<(), End>> + Send {
        async { Ok(()) }
    }

    /// Runs once when the node starts draining (say goodbye the protocol's way, e.g. a kick).
    fn on_drain(&mut self, _conn: &mut SessionConn<Self::Tag>) -> impl Future<Output = ()> + Send {
        async {}
    }

    /// Clean up protocol state (subscriptions, client ids) when the connection ends.
    fn on_close(&mut self, _conn: &SessionConn<Self::Tag>) {}

    /// Runs first when the connection ends, before [`Dialect::on_close`], with the connection
    /// still mutable: a protocol that keeps state beyond the connection (MQTT persistent
    /// sessions) takes back what its queue still holds ([`SessionConn::take_unsent`]).
    fn on_end(&mut self, _conn: &mut SessionConn<Self::Tag>) {}
}

/// A finished call: the protocol's tag for its reply (`None`: the client wants none) and the
/// result.
type Reply<T> = (Option<T>, Result<Bytes, CallError>);

/// The replies a connection waits for: results already known (handlers that ran to their end
/// on this task), in the order they came, and replies still on their way. Created with the first
/// request, in one allocation, so a connection that never calls anything holds one pointer.
pub(crate) struct PendingSet<T> {
    sets: Option<Box<Sets<T>>>,
}

struct Sets<T> {
    ready: VecDeque<Reply<T>>,
    waiting: Option<FuturesUnordered<ReplyFuture<T>>>,
}

impl<T> Default for PendingSet<T> {
    fn default() -> Self {
        PendingSet { sets: None }
    }
}

impl<T: Unpin> PendingSet<T> {
    pub(crate) fn len(&self) -> usize {
        self.sets.as_ref().map_or(0, |s| {
            s.ready.len() + s.waiting.as_ref().map_or(0, FuturesUnordered::len)
        })
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn push(&mut self, mut f: ReplyFuture<T>) {
        let sets = self.sets.get_or_insert_with(|| {
            Box::new(Sets {
                ready: VecDeque::new(),
                waiting: None,
            })
        });
        if let Pending::Ready(r) = &mut f.pending {
            let r = r.take().unwrap_or(Err(CallError::Closed));
            sets.ready.push_back((f.tag, r));
            return;
        }
        sets.waiting
            .get_or_insert_with(FuturesUnordered::new)
            .push(f);
    }

    /// A result already known, if any (no waiting).
    fn pop_ready(&mut self) -> Option<Reply<T>> {
        let sets = self.sets.as_mut()?;
        let r = sets.ready.pop_front();
        if sets.ready.is_empty() && sets.ready.capacity() > 64 {
            // a burst is over: do not keep its slots
            sets.ready = VecDeque::new();
        }
        r
    }

    /// The next reply to complete; pending while the set is empty. Registers the task's waker
    /// for the replies still on their way.
    fn poll_next(&mut self, cx: &mut TaskContext<'_>) -> Poll<Option<Reply<T>>> {
        if let Some(r) = self.pop_ready() {
            return Poll::Ready(Some(r));
        }
        match self.sets.as_mut().and_then(|s| s.waiting.as_mut()) {
            Some(f) if !f.is_empty() => f.poll_next_unpin(cx),
            _ => Poll::Pending,
        }
    }
}

/// A live session's connection: the session, its queue, its pending replies, its socket's
/// writing side. One task runs it all (reads, replies, queued pushes, writes), so a request
/// and its reply never cross to another task.
pub(crate) struct SessionConn<T> {
    pub(crate) gate: Arc<Gate>,
    pub(crate) cfg: Arc<ListenerConfig>,
    pub(crate) handle: Arc<SessionHandle>,
    /// What others queue for this client (pushes, fan-out, a close), counted in the session's
    /// [`QueueBytes`].
    queue: QueueRx,
    /// The socket's writing side, what is framed for it, and the framer.
    writer: Writer,
    out: Out,
    framer: Box<dyn Framer>,
    /// Bytes of what is in `out` still counted in the session's [`QueueBytes`]: given back as
    /// they are written.
    out_counted: usize,
    /// When a write that cannot progress gives up (armed while the socket has no room).
    stall: Option<Pin<Box<tokio::time::Sleep>>>,
    /// A close was framed: flush, then say goodbye with this code; nothing after it is written.
    closing: Option<u16>,
    pub(crate) peer: SocketAddr,
    pub(crate) pending: PendingSet<T>,
    /// Client messages taken in so far (see [`SessionConn::admit_message`]).
    messages_in: u64,
    /// The clock reading the last request ended with when it was measured on this task (a
    /// handler that finished at once, metrics on): the next request of the same batch of input
    /// starts from it instead of reading the clock again. Dropped whenever the connection
    /// waits (for the socket, for room in its queue, at the end of a batch), so it is never
    /// more than a few microseconds old.
    clock: Option<Instant>,
    /// The listener's per-connection rates, when it sets any.
    rates: Option<Box<Rates>>,
    /// The last route this connection resolved, kept while it holds (most clients call one
    /// module over and over): no table lookups, ring walks or instance lookups per request.
    route_cache: Option<Box<RouteCache>>,
    /// Its traffic counts (gate/traffic.rs).
    counts: super::traffic::ConnCounts,
    /// Messages framed since the last write: added to `warren_messages_sent_total` once per
    /// write, not once per message (a fan-out frames many per write).
    framed: u64,
}

/// One resolved route of a connection: valid while the router's generation and the session
/// snapshot it was resolved with are the same.
struct RouteCache {
    generation: u64,
    session: Arc<Session>,
    module: Box<str>,
    at: Option<Box<str>>,
    target: Arc<Target>,
    /// The instance behind `target` when it runs in this process (looked up once).
    instance: Option<Arc<crate::module::Instance>>,
}

/// What `out` may hold before queued items wait in the queue instead (they are taken again as
/// the socket drains).
const OUT_HIGH: usize = 64 * 1024;
/// Queued items framed in one go.
const QUEUE_BATCH: usize = 128;

/// Per-connection rate limits (`msg_rate`/`msg_burst`, `byte_rate`/`byte_burst`): what the
/// client has sent beyond what its limiters allowed so far is a debt; while there is one, the
/// connection stops reading (TCP backpressure on that client) until the limiter lets it be paid.
struct Rates {
    clock: DefaultClock,
    msgs: Option<DefaultDirectRateLimiter>,
    bytes: Option<(DefaultDirectRateLimiter, u32)>,
    msg_debt: u64,
    byte_debt: u64,
    /// Reading resumes at this time.
    resume_at: Option<Instant>,
    /// The one log line of this connection's throttling was written.
    logged: bool,
}

impl Rates {
    /// The limiters a listener configures; `None` when it sets no rate (nothing to pay for).
    fn new(cfg: &ListenerConfig) -> Option<Box<Rates>> {
        let clock = DefaultClock::default();
        let limiter = |rate: u32, burst: u32| {
            let rate = NonZeroU32::new(rate)?;
            let burst = NonZeroU32::new(burst.max(1)).unwrap_or(NonZeroU32::MIN);
            Some(RateLimiter::direct_with_clock(
                Quota::per_second(rate).allow_burst(burst),
                clock.clone(),
            ))
        };
        let msgs = limiter(cfg.msg_rate, cfg.msg_burst);
        let bytes = limiter(cfg.byte_rate, cfg.byte_burst).map(|l| (l, cfg.byte_burst.max(1)));
        if msgs.is_none() && bytes.is_none() {
            return None;
        }
        Some(Box::new(Rates {
            clock,
            msgs,
            bytes,
            msg_debt: 0,
            byte_debt: 0,
            resume_at: None,
            logged: false,
        }))
    }

    /// Pay what the limiters allow now; when a debt remains, say when reading may resume.
    /// Returns the rate that is over, if any.
    fn settle(&mut self) -> Option<&'static str> {
        let mut wait = None;
        let mut over = None;
        if let Some(l) = &self.msgs {
            while self.msg_debt > 0 {
                match l.check() {
                    Ok(()) => self.msg_debt -= 1,
                    Err(not_until) => {
                        wait = Some(not_until.wait_time_from(self.clock.now()));
                        over = Some("msg_rate");
                        break;
                    }
                }
            }
        } else {
            self.msg_debt = 0;
        }
        if wait.is_none() {
            if let Some((l, burst)) = &self.bytes {
                while self.byte_debt > 0 {
                    let chunk = self.byte_debt.min(u64::from(*burst)) as u32;
                    let Some(cells) = NonZeroU32::new(chunk) else {
                        break;
                    };
                    match l.check_n(cells) {
                        Ok(Ok(())) => self.byte_debt -= u64::from(chunk),
                        Ok(Err(not_until)) => {
                            wait = Some(not_until.wait_time_from(self.clock.now()));
                            over = Some("byte_rate");
                            break;
                        }
                        // a chunk is never larger than the burst; should it be, forgive it
                        Err(_) => self.byte_debt = 0,
                    }
                }
            } else {
                self.byte_debt = 0;
            }
        }
        // a limiter that says "now" is retried on the next turn of the loop, not spun on here
        self.resume_at = wait.map(|w| Instant::now() + w.max(Duration::from_millis(1)));
        over
    }
}

impl<T: Send + Unpin + 'static> SessionConn<T> {
    /// Create the session and register it with the gate.
    pub(crate) fn open(
        gate: Arc<Gate>,
        cfg: Arc<ListenerConfig>,
        peer: SocketAddr,
        protocol: SessionProtocol,
        writer: Writer,
        framer: impl Framer,
    ) -> Self {
        let (tx, rx) = crate::session::outbox(cfg.write_queue);
        let node = gate.node.clone();
        let session = Session {
            id: uuid::Uuid::new_v4().to_string().into(),
            uid: None,
            settings: Default::default(),
            remote: peer,
            network: match &writer {
                Writer::Tcp(_) => Network::Tcp,
                Writer::Ws(..) => Network::Ws,
            },
            protocol,
            gate: node.session_table().gate_id().clone(),
        };
        tracing::Span::current().record("session", tracing::field::display(&session.id));
        let bytes = QueueBytes::new(cfg.write_queue_bytes, Some(gate.output.clone()));
        let handle = SessionHandle::bounded(session, tx, bytes.clone());
        handle.set_listener(&cfg.addr);
        node.session_table().insert(handle.clone());
        let rates = Rates::new(&cfg);
        let counts = gate.traffic.of(&cfg).counts();
        SessionConn {
            gate,
            cfg,
            handle,
            queue: QueueRx { rx, bytes },
            writer,
            out: Out::default(),
            framer: Box::new(framer),
            out_counted: 0,
            stall: None,
            closing: None,
            peer,
            pending: PendingSet::default(),
            messages_in: 0,
            clock: None,
            rates,
            route_cache: None,
            counts,
            framed: 0,
        }
    }

    /// Whether another request may be taken in: fewer than `max_inflight` awaiting their
    /// handlers, and the connection is not over its rates.
    pub(crate) fn has_room(&self) -> bool {
        self.pending.len() < self.cfg.max_inflight.max(1)
            && self.rates.as_ref().is_none_or(|r| r.resume_at.is_none())
    }

    /// Count one decoded client message, whatever the protocol (every protocol's decode loop
    /// calls it once per message). Over `msg_rate`, the connection stops reading until the
    /// limiter allows again; the message itself is handled.
    pub(crate) fn admit_message(&mut self) {
        self.messages_in += 1;
        self.counts.messages_in(1);
        if let Some(r) = self.rates.as_deref_mut()
            && r.msgs.is_some()
        {
            r.msg_debt += 1;
            if r.resume_at.is_none() {
                self.settle_rates();
            }
        }
    }

    /// Client messages taken in so far.
    pub(crate) fn messages_in(&self) -> u64 {
        self.messages_in
    }

    /// Count one MQTT PUBLISH received (node-wide).
    pub(crate) fn admit_publish(&mut self) {
        self.counts.publish_in();
    }

    /// Count one PUBACK or PUBCOMP received for a message sent (node-wide).
    pub(crate) fn admit_push_ack(&mut self) {
        self.counts.push_ack();
    }

    /// Count `n` bytes read from the socket against `byte_rate`.
    fn admit_bytes(&mut self, n: usize) {
        self.counts.bytes_in(n as u64);
        if let Some(r) = self.rates.as_deref_mut()
            && r.bytes.is_some()
        {
            r.byte_debt += n as u64;
            if r.resume_at.is_none() {
                self.settle_rates();
            }
        }
    }

    /// Pay the rate debts the limiters allow now; count (and log once) a pause.
    fn settle_rates(&mut self) {
        let Some(r) = self.rates.as_deref_mut() else {
            return;
        };
        let Some(over) = r.settle() else { return };
        metrics::counter!("warren_throttled_total", "reason" => over).increment(1);
        if !r.logged {
            r.logged = true;
            let (rate, burst) = if over == "msg_rate" {
                (self.cfg.msg_rate, self.cfg.msg_burst)
            } else {
                (self.cfg.byte_rate, self.cfg.byte_burst)
            };
            refusal::deny(
                &self.peer,
                over,
                format_args!("over {over} = {rate}/s (burst {burst}): reading paused"),
            );
        }
    }

    /// When reading resumes, if the connection is over a rate.
    fn throttled_until(&self) -> Option<Instant> {
        self.rates.as_ref().and_then(|r| r.resume_at)
    }

    /// Frame an item for the client after everything queued before it, waiting for room
    /// (backpressure on this client only): room in bytes (`write_queue_bytes`, counted with the
    /// session's queue; an empty queue always takes one item). A client that never reads cannot
    /// hold this forever: after `write_timeout_s` without progress the connection is closed.
    pub(crate) async fn send(&mut self, mut o: Outbound) -> Result<(), End> {
        loop {
            match self.send_now(o) {
                Ok(()) => return Ok(()),
                Err(back) => o = back,
            }
            self.clock = None;
            if self.has_output() {
                // over the cap: write until what `out` holds is given back
                self.write_some().await?;
            } else {
                // what holds the cap was queued by others just now: take it on the next try
                tokio::task::yield_now().await;
            }
        }
    }

    /// Frame an item if there is room now, without waiting (the reply path): the item comes
    /// back when the client's queue is over its cap and [`SessionConn::send`] must wait.
    pub(crate) fn send_now(&mut self, o: Outbound) -> Result<(), Outbound> {
        if self.closing.is_some() {
            return Ok(());
        }
        self.take_queued(usize::MAX);
        let n = o.queued_size();
        if !self.queue.bytes.try_reserve_reply(n) {
            return Err(o);
        }
        self.out_counted += n;
        self.frame(o);
        if self.out.buf.len() >= OUT_HIGH {
            // a write error surfaces on the loop's next write
            let _ = self.write_now();
        }
        Ok(())
    }

    /// Append bytes the protocol framed itself (MQTT resends and window refills) after
    /// everything framed so far, without taking queued items first: what the protocol framed
    /// under its own lock keeps its place before anything queued after it. Bounded by the
    /// protocol (an inflight window), not counted in the session's queue bytes.
    pub(crate) fn push_framed(&mut self, bytes: &[u8]) {
        if self.closing.is_none() && !bytes.is_empty() {
            self.out.buf.extend_from_slice(bytes);
        }
    }

    /// Close the session's queue (later deliveries are refused) and hand each item it still
    /// holds to `keep`, giving its bytes back: a protocol whose session outlives the
    /// connection keeps what was not sent.
    pub(crate) fn take_unsent(&mut self, mut keep: impl FnMut(Outbound)) {
        self.queue.rx.close();
        while let Some(item) = self.queue.rx.try_recv() {
            self.queue.bytes.release(item.queued_size());
            keep(item);
        }
    }

    /// Frame an item only if there is room now (a goodbye while draining); whether it was.
    pub(crate) fn try_send(&mut self, o: Outbound) -> bool {
        self.closing.is_none() && self.send_now(o).is_ok()
    }

    /// Frame one item into `out` (a close marks the end: nothing after it is written).
    fn frame(&mut self, o: Outbound) {
        match o {
            Outbound::Close => self.closing = Some(close_code::NORMAL),
            Outbound::CloseCode(code) => self.closing = Some(code),
            o => {
                self.framed += 1;
                self.framer.frame(o, &mut self.out)
            }
        }
    }

    /// Frame what others queued, up to `limit` items and while `out` is under [`OUT_HIGH`]
    /// (or all of it for `usize::MAX`, to keep order before a direct item).
    fn take_queued(&mut self, limit: usize) {
        let mut taken = 0;
        while taken < limit && self.closing.is_none() {
            if limit != usize::MAX && self.out.buf.len() >= OUT_HIGH {
                break;
            }
            let Some(item) = self.queue.rx.try_recv() else {
                break;
            };
            taken += 1;
            self.out_counted += item.queued_size();
            self.frame(item);
        }
    }

    /// Account for `n` bytes written: give back what `out` held of the session's queue bytes.
    fn wrote(&mut self, n: usize) {
        if n > 0 {
            self.counts.wrote(n as u64);
        }
        if self.framed > 0 {
            self.counts.messages_out(std::mem::take(&mut self.framed));
        }
        let empty = self.out.buf.is_empty();
        let back = if empty {
            self.out_counted
        } else {
            n.min(self.out_counted)
        };
        self.out_counted -= back;
        self.queue.bytes.release(back);
        if empty {
            self.stall = None;
            if self.out.buf.capacity() > 4 * 1024 {
                // a burst is over: give its buffer back instead of holding it while idle
                self.out.buf = BytesMut::new();
            }
        }
    }

    /// Whether anything waits to be written (or flushed).
    fn has_output(&self) -> bool {
        !self.out.buf.is_empty() || self.out.unflushed
    }

    /// Write what the socket takes right now, without waiting.
    fn write_now(&mut self) -> Result<(), End> {
        if !self.has_output() {
            return Ok(());
        }
        let waker = std::task::Waker::noop();
        let mut cx = TaskContext::from_waker(waker);
        match self.writer.poll_write_out(&mut cx, &mut self.out) {
            Poll::Ready(Ok(n)) => {
                self.wrote(n);
                Ok(())
            }
            Poll::Ready(Err(e)) => {
                tracing::debug!(error = %e, "write failed");
                Err(End::PeerClosed)
            }
            Poll::Pending => Ok(()),
        }
    }

    /// Wait until the socket takes some of `out` (at most `write_timeout_s` without progress).
    async fn write_some(&mut self) -> Result<(), End> {
        self.clock = None;
        let timeout = Duration::from_secs(self.cfg.write_timeout_s);
        let n = std::future::poll_fn(|cx| {
            poll_write(
                &mut self.writer,
                &mut self.out,
                &mut self.stall,
                timeout,
                cx,
            )
        })
        .await?;
        self.wrote(n);
        Ok(())
    }

    /// Resolve a route to a target for this session.
    pub(crate) fn resolve(
        &mut self,
        route: &Route<'_>,
        body: &[u8],
    ) -> Result<Arc<Target>, CallError> {
        let session = self.handle.snapshot();
        self.resolve_as(route, body, &session)
    }

    /// [`SessionConn::resolve`] for a snapshot the caller holds; a route resolved before with
    /// the same snapshot and routing table comes from the connection's cache.
    pub(crate) fn resolve_as(
        &mut self,
        route: &Route<'_>,
        body: &[u8],
        session: &Arc<Session>,
    ) -> Result<Arc<Target>, CallError> {
        let router = self.gate.node.router();
        let generation = router.generation();
        if let Some(c) = &self.route_cache
            && c.generation == generation
            && Arc::ptr_eq(&c.session, session)
            && *c.module == *route.module
            && c.at.as_deref() == route.target
        {
            return Ok(c.target.clone());
        }
        let (target, cacheable) = router.resolve_call_cacheable(
            route.module,
            route.target,
            route.handler,
            Some(session),
            body,
        )?;
        let target = Arc::new(target);
        if cacheable {
            let instance = router.local_instance(&target);
            self.route_cache = Some(Box::new(RouteCache {
                generation,
                session: session.clone(),
                module: route.module.into(),
                at: route.target.map(Into::into),
                target: target.clone(),
                instance,
            }));
        }
        Ok(target)
    }

    /// Whether `module` is the module of the route this connection resolved last, with the
    /// routing table unchanged since (then it names a live module: no table lookup needed).
    pub(crate) fn names_cached_module(&self, module: &str) -> bool {
        self.route_cache.as_ref().is_some_and(|c| {
            *c.module == *module && c.generation == self.gate.node.router().generation()
        })
    }

    /// The instance behind `target` if it runs in this process: from the route cache when it
    /// holds that target, else looked up.
    fn local_instance(&self, target: &Target) -> Option<Arc<crate::module::Instance>> {
        let router = self.gate.node.router();
        if let Some(c) = &self.route_cache
            && Arc::ptr_eq(&c.target.instance, &target.instance)
            && Arc::ptr_eq(&c.target.node, &target.node)
            && c.generation == router.generation()
        {
            return c.instance.clone();
        }
        router.local_instance(target)
    }

    /// Send a request to a module instance. The result is always awaited (so in-flight requests
    /// are counted, bounded and drained); `tag` says where the reply goes, `None` to discard it.
    pub(crate) async fn call(
        &mut self,
        target: &Target,
        handler: &str,
        body: Bytes,
        tag: Option<T>,
    ) -> Result<(), (Option<T>, CallError)> {
        let session = self.handle.snapshot();
        self.call_as(target, handler, body, tag, session).await
    }

    /// [`SessionConn::call`] with the session snapshot the caller already holds (the one the
    /// target was resolved and admitted with).
    pub(crate) async fn call_as(
        &mut self,
        target: &Target,
        handler: &str,
        body: Bytes,
        tag: Option<T>,
        session: Arc<Session>,
    ) -> Result<(), (Option<T>, CallError)> {
        self.call_traced(target, handler, body, tag, session, None)
            .await
    }

    /// [`SessionConn::call_as`] for a request whose client sent its own trace context (a
    /// JSON-WS `traceparent`): the request keeps that trace id.
    pub(crate) async fn call_traced(
        &mut self,
        target: &Target,
        handler: &str,
        body: Bytes,
        tag: Option<T>,
        session: Arc<Session>,
        given: Option<crate::trace::TraceContext>,
    ) -> Result<(), (Option<T>, CallError)> {
        // the clock reading the previous request of this batch ended with, if it ended here a
        // moment ago (`clock`), else a new one
        let now = self.clock.take().unwrap_or_else(Instant::now);
        let deadline = now + self.cfg.rpc_expired();
        let local = self.local_instance(target);
        // the request's trace (crate::trace): for a call that crosses the bus, or while this
        // process opens spans (off unless `warren::trace` logs debug or an exporter is on)
        let mut trace = if local.is_none() || crate::trace::spans_on() {
            crate::trace::start(given)
        } else {
            None
        };
        let span = trace.as_mut().map(|t| {
            let span = crate::trace::request_span(t, &target.module, handler, &session.id);
            span.in_scope(|| tracing::debug!(target: "warren::trace", node = %target.node, instance = %target.instance, "request"));
            span
        });
        let session = Some(session);
        let router = self.gate.node.router();
        let sent = match local {
            // in this process: run it here when the instance allows (no envelope, no channel)
            Some(instance) => {
                instance
                    .call_here(
                        handler,
                        session,
                        body,
                        now,
                        deadline,
                        true,
                        trace,
                        &mut self.clock,
                    )
                    .await
            }
            None => router
                .call(
                    target,
                    target
                        .call(handler, deadline)
                        .session(session)
                        .body(body)
                        .trace(trace),
                )
                .await
                .map(Some),
        };
        match sent {
            Ok(Some(pending)) => {
                let pending = match span {
                    Some(span) if !span.is_disabled() => traced_reply(pending, span),
                    _ => pending,
                };
                self.pending.push(ReplyFuture { tag, pending });
                Ok(())
            }
            Ok(None) => Ok(()),
            Err(e) => Err((tag, e)),
        }
    }

    /// End the connection: log why, leave groups, flush what is owed (or not), say goodbye,
    /// tell the modules that asked for it.
    pub(crate) async fn finish(mut self, end: End) {
        match &end {
            End::Refused(why) => {
                refusal::refuse(&self.peer, "protocol", why);
                metrics::counter!("warren_connections_refused_total", "reason" => "protocol")
                    .increment(1);
            }
            End::RefusedWithCode(code, why) => {
                let kind = End::kind_of(*code);
                refusal::refuse(&self.peer, kind, why);
                metrics::counter!("warren_connections_refused_total", "reason" => kind)
                    .increment(1);
            }
            End::Limit(kind, _, why) => {
                refusal::refuse(&self.peer, kind, why);
                metrics::counter!("warren_connections_refused_total", "reason" => *kind)
                    .increment(1);
            }
            End::Stalled(timeout) => {
                refusal::refuse(
                    &self.peer,
                    "slow_consumer",
                    format_args!(
                        "slow consumer: a write took longer than write_timeout_s = {}",
                        timeout.as_secs()
                    ),
                );
                metrics::counter!("warren_slow_consumer_disconnects_total", "reason" => "write_timeout")
                    .increment(1);
            }
            End::PeerClosed => tracing::debug!("peer closed"),
            End::Disconnect => tracing::debug!("client said goodbye"),
            End::ServerClosed => tracing::debug!("closed by the server"),
            End::Drained => tracing::debug!("drained"),
        }
        let node = self.gate.node.clone();
        let sid = self.handle.id().clone();
        node.session_table().remove(&sid);
        node.groups().remove_everywhere(&self.handle);
        let last = self.handle.snapshot();
        let write_timeout = Duration::from_secs(self.cfg.write_timeout_s);
        let flush = match end {
            // nothing more to say to a client that left, or that does not read
            End::PeerClosed | End::Disconnect | End::Stalled(_) => false,
            // killed (slow consumer elsewhere, shutdown): no waiting on this client
            _ if self.handle.shut_down() && self.closing.is_none() => false,
            _ => true,
        };
        let code = self.closing.unwrap_or(end.close_code());
        // nothing more is taken from the queue; what is in it is given back
        self.queue.rx.close();
        if flush {
            // what is queued goes out, then the goodbye; a client not reading it meets the
            // write deadline
            self.take_queued(usize::MAX);
            let done = tokio::time::timeout(write_timeout, async {
                while self.has_output() {
                    if self.write_some().await.is_err() {
                        break;
                    }
                }
            })
            .await;
            if done.is_err() {
                tracing::debug!("goodbye not flushed within write_timeout_s");
            }
        }
        self.handle.shut();
        let counted = std::mem::take(&mut self.out_counted);
        self.queue.bytes.release(counted);
        let SessionConn {
            mut writer,
            queue,
            handle,
            ..
        } = self;
        drop(queue);
        drop(handle);
        if !matches!(end, End::Stalled(_)) {
            // a peer that does not read cannot hold the goodbye either
            let code = match end {
                End::PeerClosed | End::Disconnect => close_code::NORMAL,
                _ => code,
            };
            let _ = tokio::time::timeout(
                write_timeout.min(Duration::from_secs(5)),
                writer.close(Some(code)),
            )
            .await;
        }
        drop(writer);
        node.session_closed(last).await;
    }
}

/// The connection's occasional steps (decoding a batch, a reply, a tick, a drain, the end),
/// each boxed while it runs so that an idle connection's state holds none of them. Plain
/// functions: a future built inside an `async` block and boxed there still takes its full size
/// in that block's state.
mod boxed {
    use super::*;

    type Boxed<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

    pub(super) fn handle_buffered<'a, P: Dialect>(
        proto: &'a mut P,
        conn: &'a mut SessionConn<P::Tag>,
        buf: &'a mut BytesMut,
    ) -> Boxed<'a, Result<bool, End>> {
        Box::pin(proto.handle_buffered(conn, buf))
    }

    pub(super) fn send<T: Send + Unpin + 'static>(
        conn: &mut SessionConn<T>,
        o: Outbound,
    ) -> Boxed<'_, Result<(), End>> {
        Box::pin(conn.send(o))
    }

    pub(super) fn on_tick<'a, P: Dialect>(
        proto: &'a mut P,
        conn: &'a mut SessionConn<P::Tag>,
    ) -> Boxed<'a, Result<(), End>> {
        Box::pin(proto.on_tick(conn))
    }

    pub(super) fn on_drain<'a, P: Dialect>(
        proto: &'a mut P,
        conn: &'a mut SessionConn<P::Tag>,
    ) -> Boxed<'a, ()> {
        Box::pin(proto.on_drain(conn))
    }

    pub(super) fn finish<T: Send + Unpin + 'static>(
        conn: SessionConn<T>,
        end: End,
    ) -> Boxed<'static, ()> {
        Box::pin(conn.finish(end))
    }
}

/// Progress on `out`, or the stall deadline (armed while the socket has no room): what the
/// connection loop's write branch polls. Takes the connection's fields apart so the loop's other
/// branches can borrow the rest.
fn poll_write(
    writer: &mut Writer,
    out: &mut Out,
    stall: &mut Option<Pin<Box<tokio::time::Sleep>>>,
    timeout: Duration,
    cx: &mut TaskContext<'_>,
) -> Poll<Result<usize, End>> {
    match writer.poll_write_out(cx, out) {
        Poll::Ready(Ok(n)) => Poll::Ready(Ok(n)),
        Poll::Ready(Err(e)) => {
            tracing::debug!(error = %e, "write failed");
            Poll::Ready(Err(End::PeerClosed))
        }
        Poll::Pending => {
            let stall = stall.get_or_insert_with(|| Box::pin(tokio::time::sleep(timeout)));
            match stall.as_mut().poll(cx) {
                Poll::Ready(()) => Poll::Ready(Err(End::Stalled(timeout))),
                Poll::Pending => Poll::Pending,
            }
        }
    }
}

/// A traced request's pending reply, logged under the request's span when it arrives (only
/// while that span is on: see crate::trace).
fn traced_reply(pending: Pending, span: tracing::Span) -> Pending {
    Pending::Remote(Box::pin(tracing::Instrument::instrument(
        async move {
            let r = pending.await;
            match &r {
                Ok(body) => tracing::debug!(target: "warren::trace", bytes = body.len(), "reply"),
                Err(e) => tracing::debug!(target: "warren::trace", error = %e, "reply"),
            }
            r
        },
        span,
    )))
}

/// Run a session to its end: the read loop, then the protocol's cleanup, then
/// [`SessionConn::finish`].
///
/// (An `async move` block rather than an `async fn`: an async fn keeps a second copy of its
/// arguments in its state, and this state lives as long as the connection.)
#[allow(clippy::manual_async_fn)] // deliberate: see above
pub(crate) fn serve_session<P: Dialect>(
    mut proto: P,
    mut conn: SessionConn<P::Tag>,
    mut reader: Reader,
    mut buf: BytesMut,
) -> impl Future<Output = ()> + Send {
    async move {
        let end = run(&mut proto, &mut conn, &mut reader, &mut buf).await;
        drop(reader);
        drop(buf);
        proto.on_end(&mut conn);
        proto.on_close(&conn);
        drop(proto);
        boxed::finish(conn, end).await;
    }
}

/// The read loop every protocol uses: server close, drain, replies, keepalive, rate pauses,
/// socket — in that order of priority. Returns why the connection ends.
///
/// Until the protocol is established ([`Dialect::awaiting`]) the read deadline is
/// `connect_timeout_s` from the start; then it is the protocol's [`Dialect::read_timeout`],
/// re-armed by every frame handled.
pub(crate) async fn run<P: Dialect>(
    proto: &mut P,
    conn: &mut SessionConn<P::Tag>,
    reader: &mut Reader,
    buf: &mut BytesMut,
) -> End {
    let read_timeout = proto.read_timeout();
    let far = Instant::now() + Duration::from_secs(86400 * 365);
    let mut awaiting = proto.awaiting(conn);
    let first = match awaiting {
        Some(_) => Some(Duration::from_secs(conn.cfg.connect_timeout_s.max(1))),
        None => read_timeout,
    };
    // when the connection ends for silence (the connect deadline until established, then the
    // idle deadline, which traffic pushes later); one timer serves it and the rate pauses, and it
    // is moved only earlier: a deadline pushed later is met when the timer fires early
    let mut idle_at = first.map_or(far, |d| Instant::now() + d);
    let timer = tokio::time::sleep_until(idle_at);
    tokio::pin!(timer);
    let mut draining = false;
    // the close and drain signals come through the session's queue (raised by the session, or
    // by the gate for every session): an idle connection keeps no waiter of its own for them.
    // A connection that opens while the gate drains or shuts down sees it here.
    if conn.gate.killing.is_cancelled() {
        return End::ServerClosed;
    }
    if conn.gate.draining.is_cancelled() {
        conn.handle.drain();
    }
    let tick_every = proto.tick();
    let mut ticker = tick_every.map(|every| {
        let mut t = tokio::time::interval(every);
        t.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        Box::new(t)
    });
    loop {
        if conn.closing.is_some() {
            // a close was framed: finish flushes what came before it
            return End::ServerClosed;
        }
        if draining && conn.pending.is_empty() {
            return End::Drained;
        }
        if !draining {
            // frames already buffered (a first packet may arrive with more) go first
            // boxed: the decode-and-dispatch state exists only while it runs, so an idle
            // connection's task stays small
            let handled = boxed::handle_buffered(proto, conn, buf).await;
            // the batch is over: the next one reads the clock afresh
            conn.clock = None;
            match handled {
                Err(end) => return end,
                Ok(handled) => {
                    if awaiting.is_some() {
                        // the connect deadline is not re-armed: only being established ends it
                        awaiting = proto.awaiting(conn);
                        if awaiting.is_none() {
                            idle_at = read_timeout.map_or(far, |d| Instant::now() + d);
                        }
                    } else if handled && let Some(d) = read_timeout {
                        idle_at = Instant::now() + d;
                    }
                }
            }
            if buf.is_empty() && buf.capacity() > 0 {
                // an idle connection holds no read buffer
                *buf = BytesMut::new();
            }
        }
        let room = conn.has_room();
        let resume = conn.throttled_until();
        // while reading is paused for a rate the client is not idle (the connect deadline
        // still runs: a rate does not buy time to say the first message)
        let wake = match resume {
            Some(r) if awaiting.is_none() => r,
            Some(r) => r.min(idle_at),
            None => idle_at,
        };
        if wake < timer.deadline() {
            timer.as_mut().reset(wake);
        }
        // one hand-written poll instead of `select!`: the wait holds a few references, not a
        // future per branch, in the state an idle connection keeps for its whole life
        let wants = Wants {
            output: !conn.out.buf.is_empty() || conn.out.unflushed,
            queue: conn.out.buf.len() < OUT_HIGH,
            timer: resume.is_some() || !draining,
            drain: !draining,
            read: !draining && room,
        };
        let event = {
            // a `move` closure over a handful of references: captured field by field, the
            // borrows alone would take more room than the rest of the wait
            let (c, r, b, t, k) = (
                &mut *conn,
                &mut *reader,
                &mut *buf,
                timer.as_mut(),
                &mut ticker,
            );
            let mut t = t;
            std::future::poll_fn(move |cx| poll_event(cx, wants, c, r, b, t.as_mut(), k)).await
        };
        match event {
            Event::Closed => return End::ServerClosed,
            Event::Drain => {
                draining = true;
                boxed::on_drain(proto, conn).await;
            }
            Event::Tick => {
                if let Err(end) = boxed::on_tick(proto, conn).await {
                    return end;
                }
            }
            Event::Written(written) => match written {
                Ok(n) => conn.wrote(n),
                Err(end) => return end,
            },
            Event::Reply(tag, result) => {
                // this reply, and every other already known, in one go
                let mut next = Some((tag, result));
                while let Some((tag, result)) = next {
                    match tag {
                        Some(tag) => {
                            if let Some(o) = proto.reply(tag, result)
                                && let Err(o) = conn.send_now(o)
                                && let Err(end) = boxed::send(conn, o).await
                            {
                                return end;
                            }
                        }
                        None => {
                            if let Err(e) = result {
                                tracing::debug!(error = %e, "request without reply failed");
                            }
                        }
                    }
                    next = conn.pending.pop_ready();
                    if next.is_none() {
                        // replies that arrived together (a plugin's run of this session's
                        // calls) leave in one write too
                        next = std::future::poll_fn(|cx| {
                            Poll::Ready(match conn.pending.poll_next(cx) {
                                Poll::Ready(r) => r,
                                Poll::Pending => None,
                            })
                        })
                        .await;
                    }
                }
            }
            Event::Queued(item) => match item {
                Some(item) => {
                    conn.out_counted += item.queued_size();
                    conn.frame(item);
                    conn.take_queued(QUEUE_BATCH);
                }
                // every sender is gone: the session was dropped
                None => return End::ServerClosed,
            },
            Event::Timer => {
                let now = Instant::now();
                timer.as_mut().reset(far);
                if let Some(r) = resume
                    && now >= r
                {
                    conn.settle_rates();
                    // the client was sending, not idle: its idle deadline starts again
                    if awaiting.is_none()
                        && let Some(d) = read_timeout
                    {
                        idle_at = now + d;
                    }
                    continue;
                }
                if now < idle_at || draining || (resume.is_some() && awaiting.is_none()) {
                    // early (the deadline moved later), or not a deadline that applies now
                    continue;
                }
                return match awaiting {
                    Some(what) => End::Limit(
                        "connect_timeout",
                        close_code::POLICY,
                        format!(
                            "no {what} within connect_timeout_s = {}",
                            conn.cfg.connect_timeout_s.max(1)
                        ),
                    ),
                    None => End::Limit(
                        "idle_timeout",
                        close_code::GOING_AWAY,
                        format!(
                            "idle timeout: nothing received for {:?}",
                            read_timeout.unwrap_or_default()
                        ),
                    ),
                };
            }
            Event::Read(r) => match r {
                Ok(0) => return End::PeerClosed,
                Ok(n) => conn.admit_bytes(n),
                Err(e) => return read_error(&e),
            },
        }
    }
}

/// Which of the connection loop's sources it listens to on this turn.
#[derive(Clone, Copy)]
struct Wants {
    output: bool,
    queue: bool,
    timer: bool,
    drain: bool,
    read: bool,
}

/// The connection loop's wait: the first source ready, in [`Event`]'s order.
fn poll_event<T: Unpin>(
    cx: &mut TaskContext<'_>,
    wants: Wants,
    conn: &mut SessionConn<T>,
    reader: &mut Reader,
    buf: &mut BytesMut,
    mut timer: Pin<&mut tokio::time::Sleep>,
    ticker: &mut Option<Box<tokio::time::Interval>>,
) -> Poll<Event<T>> {
    let signals = conn.queue.rx.poll_signals(cx);
    if signals & Signal::Close as u8 != 0 {
        return Poll::Ready(Event::Closed);
    }
    if wants.drain && signals & Signal::Drain as u8 != 0 {
        return Poll::Ready(Event::Drain);
    }
    if let Some(t) = ticker.as_mut()
        && t.poll_tick(cx).is_ready()
    {
        return Poll::Ready(Event::Tick);
    }
    if wants.output
        && let Poll::Ready(r) = poll_write(
            &mut conn.writer,
            &mut conn.out,
            &mut conn.stall,
            Duration::from_secs(conn.cfg.write_timeout_s),
            cx,
        )
    {
        return Poll::Ready(Event::Written(r));
    }
    if let Poll::Ready(Some((tag, result))) = conn.pending.poll_next(cx) {
        return Poll::Ready(Event::Reply(tag, result));
    }
    if wants.queue
        && let Poll::Ready(item) = conn.queue.rx.poll_recv(cx)
    {
        return Poll::Ready(Event::Queued(item));
    }
    if wants.timer && timer.as_mut().poll(cx).is_ready() {
        return Poll::Ready(Event::Timer);
    }
    if wants.read
        && let Poll::Ready(r) = reader.poll_read(cx, buf)
    {
        return Poll::Ready(Event::Read(r));
    }
    Poll::Pending
}

/// What woke the connection loop, in the order [`run`] looks: a server close, a drain, the
/// protocol's tick, socket writes, replies, queued items, the deadline timer, socket reads.
enum Event<T> {
    Closed,
    Drain,
    Tick,
    Written(Result<usize, End>),
    Reply(Option<T>, Result<Bytes, CallError>),
    Queued(Option<Outbound>),
    Timer,
    Read(std::io::Result<usize>),
}

/// The writer's end of a session's queue. Every item taken from it gives its bytes back to the
/// session's [`QueueBytes`] (once written, or when dropped unwritten), so the node's budget
/// never keeps bytes of a connection that is gone.
struct QueueRx {
    rx: crate::session::OutboxRx,
    bytes: Arc<QueueBytes>,
}

impl Drop for QueueRx {
    fn drop(&mut self) {
        self.rx.close();
        let mut n = 0;
        while let Some(item) = self.rx.try_recv() {
            n += item.queued_size();
        }
        self.bytes.release(n);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::session::{Message, OutputBudget};

    #[tokio::test]
    async fn what_the_writer_never_wrote_is_given_back_to_the_node() {
        let node = OutputBudget::new(1 << 20);
        let bytes = QueueBytes::new(1 << 20, Some(node.clone()));
        let (tx, rx) = crate::session::outbox(16);
        let h = SessionHandle::bounded(
            Session {
                id: "s1".into(),
                uid: None,
                settings: Default::default(),
                remote: "127.0.0.1:1".parse().unwrap(),
                network: Network::Tcp,
                protocol: SessionProtocol::Mqtt,
                gate: "g".into(),
            },
            tx,
            bytes.clone(),
        );
        for _ in 0..3 {
            h.deliver(Message::new("t", vec![0u8; 5000]), None).unwrap();
        }
        assert!(node.queued() >= 12_000);
        drop(QueueRx { rx, bytes });
        assert_eq!(node.queued(), 0);
        // a delivery after the writer is gone is refused and counts nothing
        assert!(h.deliver(Message::new("t", vec![0u8; 10]), None).is_err());
        assert_eq!(node.queued(), 0);
    }

    #[test]
    fn no_rates_configured_means_no_limiter() {
        assert!(Rates::new(&ListenerConfig::default()).is_none());
    }

    #[test]
    fn over_the_message_rate_reading_pauses_and_nothing_is_forgiven() {
        let cfg = ListenerConfig {
            msg_rate: 1,
            msg_burst: 3,
            ..ListenerConfig::default()
        };
        let mut r = Rates::new(&cfg).expect("a limiter");
        for _ in 0..3 {
            r.msg_debt += 1;
            assert_eq!(r.settle(), None, "within the burst");
            assert!(r.resume_at.is_none());
        }
        r.msg_debt += 1;
        assert_eq!(r.settle(), Some("msg_rate"));
        assert!(r.resume_at.is_some(), "reading pauses");
        assert_eq!(r.msg_debt, 1, "the message is still owed");
    }

    #[test]
    fn bytes_are_paid_in_chunks_of_the_burst() {
        let cfg = ListenerConfig {
            byte_rate: 1,
            byte_burst: 1000,
            ..ListenerConfig::default()
        };
        let mut r = Rates::new(&cfg).expect("a limiter");
        r.byte_debt = 900;
        assert_eq!(r.settle(), None);
        // a read larger than the whole burst cannot be paid at once, and is not forgiven
        r.byte_debt = 5000;
        assert_eq!(r.settle(), Some("byte_rate"));
        assert_eq!(r.byte_debt, 5000);
    }

    #[test]
    fn ends_close_websockets_with_their_codes() {
        assert_eq!(End::Drained.close_code(), 1001);
        assert_eq!(End::Refused("x".into()).close_code(), 1002);
        assert_eq!(End::PeerClosed.close_code(), 1000);
        use tungstenite::error::{CapacityError, Error as WsError, ProtocolError};
        // what the WebSocket reader returns: tungstenite's error inside io::Error
        let ws = |e: WsError| std::io::Error::other(e);
        let utf8 = ws(WsError::Utf8("invalid utf-8 sequence".into()));
        assert_eq!(read_error(&utf8).close_code(), 1007);
        let big = ws(WsError::Capacity(CapacityError::MessageTooLong {
            size: 9,
            max_size: 4,
        }));
        assert_eq!(read_error(&big).close_code(), 1009);
        let proto = ws(WsError::Protocol(ProtocolError::UnmaskedFrameFromClient));
        assert_eq!(read_error(&proto).close_code(), 1002);
        let reset = ws(WsError::Protocol(
            ProtocolError::ResetWithoutClosingHandshake,
        ));
        assert!(matches!(read_error(&reset), End::PeerClosed));
        let text = std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            super::super::io::TextOnBinary,
        );
        assert_eq!(read_error(&text).close_code(), 1003);
        // an error message that merely looks like one is not taken for it
        let lookalike = std::io::Error::other("UTF-8 encoding error: not from the socket");
        assert!(matches!(read_error(&lookalike), End::Refused(_)));
        let reset = std::io::Error::from(std::io::ErrorKind::ConnectionReset);
        assert!(matches!(read_error(&reset), End::PeerClosed));
    }
}

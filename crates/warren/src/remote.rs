//! The remote bus: calls between nodes over a broker.
//!
//! A [`Transport`] is the least a broker must do for warren: put a frame in one node's inbox, and
//! hand this node the frames of its own inbox in order. NATS, Redis and RabbitMQ each implement it
//! (crate `warren-cluster`); everything else — the call envelope, reply correlation, deadlines,
//! failing calls fast when their node leaves the registry — is here, once, in [`RemoteBus`], so
//! the three brokers behave the same and the router and the modules never know which one runs.
//!
//! Ordering: a node sends all its frames through one writer task and one broker connection, and
//! the receiving node hands each call to its instance's mailbox before reading the next frame, so
//! one session's calls reach a module in the order they were sent, across the bus as in process.
//!
//! Throughput: the writer takes every frame queued while it was busy and hands them to the
//! transport per destination node in one go ([`Transport::send_batch`]), so under load a broker
//! round trip or a socket write carries many calls and replies; frames are
//! [`warren_proto::node_frame`]s, a fixed binary header and the body uncopied.

use parking_lot::Mutex;
use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use bytes::Bytes;
use futures_util::StreamExt as _;
use futures_util::future::BoxFuture;
use futures_util::stream::FuturesUnordered;
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use warren_proto::node_frame::{self, CallRef, NodeFrame, SessionRef, WireSession};

use crate::bus::{Bus, Call, Pending};
use crate::error::{CallError, Detail};
use crate::module::LocalBus;
use crate::session::{Network as Net, Protocol, Session};

/// Why a transport could not carry a frame.
///
/// The detail keeps the broker client's error as the source ([`std::error::Error::source`]), so
/// `Display` shows only this side's words and a printed chain names each cause once; turned into
/// a [`CallError`], the detail's full text (words and cause) is what a peer sees.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TransportError {
    /// The broker is unreachable or the connection is down (the frame was not sent).
    Unavailable(Detail),
    /// The frame is larger than the broker accepts (checked before sending).
    TooLarge {
        /// Frame size.
        size: usize,
        /// Broker limit.
        max: usize,
    },
    /// The broker refused or failed the operation.
    Broker(Detail),
}

impl TransportError {
    /// A [`TransportError::Unavailable`] whose cause is the broker client's `source`.
    pub fn unavailable(
        message: impl Into<String>,
        source: impl Into<Box<dyn std::error::Error + Send + Sync + 'static>>,
    ) -> TransportError {
        TransportError::Unavailable(Detail::caused(message, source))
    }

    /// A [`TransportError::Broker`] whose cause is the broker client's `source`.
    pub fn broker(
        message: impl Into<String>,
        source: impl Into<Box<dyn std::error::Error + Send + Sync + 'static>>,
    ) -> TransportError {
        TransportError::Broker(Detail::caused(message, source))
    }
}

impl std::fmt::Display for TransportError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            TransportError::Unavailable(d) => write!(f, "broker unavailable: {}", d.summary()),
            TransportError::TooLarge { size, max } => write!(
                f,
                "frame of {size} bytes exceeds the broker limit of {max} bytes"
            ),
            TransportError::Broker(d) => write!(f, "broker error: {}", d.summary()),
        }
    }
}

impl std::error::Error for TransportError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            TransportError::Unavailable(d) | TransportError::Broker(d) => {
                d.source().map(|s| s as &(dyn std::error::Error + 'static))
            }
            TransportError::TooLarge { .. } => None,
        }
    }
}

impl From<TransportError> for CallError {
    fn from(e: TransportError) -> Self {
        match e {
            TransportError::TooLarge { size, max } => CallError::TooLarge { size, max },
            TransportError::Unavailable(d) | TransportError::Broker(d) => CallError::Unavailable(d),
        }
    }
}

/// A broker connection as the remote bus needs it: one inbox per node.
///
/// Implementations own their connections, reconnect with backoff by themselves after a broker
/// restart, and never buffer a frame while disconnected: [`Transport::send`] fails fast instead,
/// so a caller gets a typed error rather than a call that runs minutes later.
pub trait Transport: Send + Sync + 'static {
    /// Put `frame` in the inbox of node `node`. Resolves once the broker has taken it; frames sent
    /// by one transport to one node arrive in the order sent.
    fn send(&self, node: &str, frame: Bytes) -> BoxFuture<'_, Result<(), TransportError>>;

    /// Put `frames` in the inbox of node `node`, in order, in as few broker operations as the
    /// broker allows (one `RPUSH` of many values, publishes written together, confirms awaited
    /// together). Resolves once the broker took them all; an error means some may not have been
    /// taken. The remote bus sends everything through this, so a transport that can batch should
    /// override it; the default sends one frame after the other.
    fn send_batch(
        &self,
        node: &str,
        frames: Vec<Bytes>,
    ) -> BoxFuture<'_, Result<(), TransportError>> {
        let node = node.to_owned();
        Box::pin(async move {
            for f in frames {
                self.send(&node, f).await?;
            }
            Ok(())
        })
    }

    /// Receive the inbox of node `node`: resolves once the broker confirmed the subscription,
    /// with the frames in arrival order. The bus pulls them as it is ready for them, so
    /// backpressure reaches the broker. The transport resubscribes after reconnects by itself;
    /// the frames end when `stop` is cancelled or the stream is dropped.
    fn serve(
        &self,
        node: &str,
        stop: CancellationToken,
    ) -> BoxFuture<'_, Result<InboxFrames, TransportError>>;

    /// Whether the broker has queue groups: [`Transport::send_to_group`] and
    /// [`Transport::serve_group`] work.
    fn has_groups(&self) -> bool {
        false
    }

    /// Put `frames` in queue group `group`, in order; the broker hands each to one member,
    /// whichever takes it first. Resolves once the broker took them all.
    fn send_to_group(
        &self,
        group: &str,
        frames: Vec<Bytes>,
    ) -> BoxFuture<'_, Result<(), TransportError>> {
        let _ = frames;
        let why = format!("the {} bus has no queue groups ({group})", self.kind());
        Box::pin(std::future::ready(Err(TransportError::Unavailable(
            why.into(),
        ))))
    }

    /// Join queue group `group`: the frames the broker hands this member, as
    /// [`Transport::serve`] gives a node's inbox.
    fn serve_group(
        &self,
        group: &str,
        stop: CancellationToken,
    ) -> BoxFuture<'_, Result<InboxFrames, TransportError>> {
        let _ = stop;
        let why = format!("the {} bus has no queue groups ({group})", self.kind());
        Box::pin(std::future::ready(Err(TransportError::Unavailable(
            why.into(),
        ))))
    }

    /// Largest frame the broker carries.
    fn max_frame(&self) -> usize;

    /// Short name for logs and metrics (`nats`, `redis`, `amqp`).
    fn kind(&self) -> &'static str;

    /// Whether the broker connection is up now, for `/readyz` (a transport that cannot tell
    /// says yes: a failed send is its report).
    fn is_connected(&self) -> bool {
        true
    }
}

/// A node's inbox as a transport hands it over ([`Transport::serve`]): the frames in arrival
/// order. The remote bus reads it in the task that runs the calls, with no task in between.
pub type InboxFrames = futures_util::stream::BoxStream<'static, Bytes>;

/// An inbox fed by a task of the transport's own (a `BLPOP` loop, a consumer): what the task
/// sends comes out of the frames in order, and with `capacity` frames queued the task waits, so
/// backpressure reaches the broker.
pub fn inbox_channel(capacity: usize) -> (mpsc::Sender<Bytes>, InboxFrames) {
    let (tx, mut rx) = mpsc::channel(capacity);
    let frames = futures_util::stream::poll_fn(move |cx| rx.poll_recv(cx));
    (tx, Box::pin(frames))
}

/// A session as a call carries it (see [`node_frame::SessionRef`]).
fn session_ref(s: &Session) -> SessionRef<'_> {
    SessionRef {
        id: &s.id,
        uid: s.uid.as_deref(),
        settings: &s.settings,
        remote: s.remote,
        ws: s.network == Net::Ws,
        protocol: protocol_name(s.protocol),
        gate: &s.gate,
    }
}

fn protocol_name(p: Protocol) -> &'static str {
    match p {
        Protocol::Mqtt => "mqtt",
        Protocol::Pomelo => "pomelo",
        Protocol::Json => "json",
        Protocol::Line => "line",
        Protocol::PomeloRpc => "pomelo-rpc",
    }
}

fn protocol_from(name: &str) -> Option<Protocol> {
    Some(match name {
        "mqtt" => Protocol::Mqtt,
        "pomelo" => Protocol::Pomelo,
        "json" => Protocol::Json,
        "line" => Protocol::Line,
        "pomelo-rpc" => Protocol::PomeloRpc,
        _ => return None,
    })
}

/// The session a received call carries, or `None` when its protocol is unknown.
fn into_session(w: WireSession) -> Option<Session> {
    Some(Session {
        protocol: protocol_from(&w.protocol)?,
        id: w.id.into(),
        uid: w.uid,
        settings: w.settings,
        remote: w.remote,
        network: if w.ws { Net::Ws } else { Net::Tcp },
        gate: w.gate.into(),
    })
}

/// Clock difference between hosts tolerated before a queued call counts as stale.
const STALE_GRACE_MS: u64 = 2_000;

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// The reply frame for a result.
fn reply_frame(id: u64, r: &Result<Bytes, CallError>) -> Option<Bytes> {
    match r {
        Ok(b) => Some(node_frame::encode_reply_ok(id, b)),
        Err(e) => node_frame::encode_reply_err(id, e.kind().as_str(), &e.detail()).ok(),
    }
}

/// Where a frame goes.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Dest {
    /// The inbox of one node.
    Node(Arc<str>),
    /// The queue group of a module type: one of its members takes it.
    Group(Arc<str>),
}

impl std::fmt::Display for Dest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Dest::Node(n) => write!(f, "node {n}"),
            Dest::Group(g) => write!(f, "queue group {g}"),
        }
    }
}

/// A frame on its way, and who hears of it when the broker does not take it.
struct Outgoing {
    dest: Dest,
    frame: Bytes,
    report: Report,
}

/// Who learns the fate of an [`Outgoing`] frame.
enum Report {
    /// Nobody: a reply (a failure is logged).
    Log,
    /// A call without reply, whose sender waits to hear that the broker took it.
    Done(oneshot::Sender<Result<(), TransportError>>),
    /// A call with a reply: if the broker does not take it, its waiter ends with the error at
    /// once (the caller does not wait for the broker otherwise, only for the reply).
    Waiter(u64),
}

type Waiting = Arc<Mutex<HashMap<u64, Waiter>>>;

fn lock(w: &Waiting) -> parking_lot::MutexGuard<'_, HashMap<u64, Waiter>> {
    w.lock()
}

/// Frames handed to the transport in one go at most.
const BATCH: usize = 512;

/// The writer of a bus: takes every frame queued since its last turn, groups them by node
/// (keeping their order) and hands each group to [`Transport::send_batch`], the groups for
/// different nodes concurrently. Under load many frames wait while a batch is out, so each broker
/// round trip or socket write carries many of them.
async fn write_frames(
    transport: Arc<dyn Transport>,
    waiting: Waiting,
    mut rx: mpsc::Receiver<Outgoing>,
) {
    let mut queued = Vec::with_capacity(BATCH);
    type Group = (Dest, Vec<Bytes>, Vec<Report>);
    while rx.recv_many(&mut queued, BATCH).await > 0 {
        let mut groups: Vec<Group> = Vec::new();
        for o in queued.drain(..) {
            let at = match groups.iter().position(|g| g.0 == o.dest) {
                Some(i) => i,
                None => {
                    groups.push((o.dest, Vec::new(), Vec::new()));
                    groups.len() - 1
                }
            };
            let g = &mut groups[at];
            g.1.push(o.frame);
            g.2.push(o.report);
        }
        let (transport, waiting) = (&transport, &waiting);
        let sends = groups.into_iter().map(|(dest, frames, reports)| async move {
            let n = frames.len();
            let r = match &dest {
                Dest::Node(node) => transport.send_batch(node, frames).await,
                Dest::Group(group) => transport.send_to_group(group, frames).await,
            };
            if let Err(e) = &r {
                metrics::counter!("warren_bus_send_errors_total", "transport" => transport.kind())
                    .increment(n as u64);
                if reports.iter().any(|x| matches!(x, Report::Log)) {
                    tracing::warn!(to = %dest, frames = n, error = e as &dyn std::error::Error, "could not send replies");
                }
            }
            for report in reports {
                match report {
                    Report::Log => {}
                    Report::Done(tx) => {
                        let _ = tx.send(r.clone());
                    }
                    Report::Waiter(id) => {
                        if let Err(e) = &r {
                            let w = lock(waiting).remove(&id);
                            if let Some(w) = w {
                                let _ = w.tx.send(Err(e.clone().into()));
                            }
                        }
                    }
                }
            }
        });
        futures_util::future::join_all(sends).await;
    }
}

/// A call this node runs, resolving to (caller node, call id, result).
type Running = std::pin::Pin<
    Box<dyn std::future::Future<Output = (String, u64, Result<Bytes, CallError>)> + Send>,
>;

struct Waiter {
    /// The node the call went to; `None` for a queue group's call (any member may run it, so
    /// the loss of one node says nothing about it: it ends at its deadline).
    node: Option<Arc<str>>,
    deadline: Instant,
    tx: oneshot::Sender<Result<Bytes, CallError>>,
    /// When the call was queued, for `warren_bus_call_duration_seconds`.
    sent: Instant,
}

/// A [`Bus`] over a [`Transport`]: encodes calls, correlates replies, enforces deadlines, and fails
/// the calls of a node that leaves the registry at once instead of at their deadline.
pub struct RemoteBus {
    node: Arc<str>,
    transport: Arc<dyn Transport>,
    next_id: AtomicU64,
    waiting: Waiting,
    /// Frames for the writer task ([`write_frames`]), started with the first frame sent.
    outbox: OnceLock<mpsc::Sender<Outgoing>>,
    /// `warren_bus_calls_total{transport}`: calls sent, with or without reply.
    calls: metrics::Counter,
    /// `warren_bus_call_duration_seconds{transport}`: from sending to the reply's arrival.
    call_duration: metrics::Histogram,
}

impl std::fmt::Debug for RemoteBus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RemoteBus")
            .field("node", &self.node)
            .field("transport", &self.transport.kind())
            .finish_non_exhaustive()
    }
}

impl RemoteBus {
    /// A bus for node `node` over `transport`. Call [`RemoteBus::serve`] to receive.
    pub fn new(node: &str, transport: Arc<dyn Transport>) -> Arc<RemoteBus> {
        let kind = transport.kind();
        Arc::new(RemoteBus {
            calls: metrics::counter!("warren_bus_calls_total", "transport" => kind),
            call_duration: metrics::histogram!("warren_bus_call_duration_seconds", "transport" => kind),
            node: node.into(),
            transport,
            next_id: AtomicU64::new(1),
            waiting: Arc::new(Mutex::new(HashMap::new())),
            outbox: OnceLock::new(),
        })
    }

    /// Queue a frame for `node` (waiting for room when the writer is behind); `report` says who
    /// hears of it if the broker does not take it.
    async fn enqueue(
        &self,
        dest: Dest,
        frame: Bytes,
        report: Report,
    ) -> Result<(), TransportError> {
        let tx = self.outbox.get_or_init(|| {
            let (tx, rx) = mpsc::channel(4 * BATCH);
            tokio::spawn(write_frames(
                self.transport.clone(),
                self.waiting.clone(),
                rx,
            ));
            tx
        });
        tx.send(Outgoing {
            dest,
            frame,
            report,
        })
        .await
        .map_err(|_| TransportError::Unavailable("the bus is shut down".into()))
    }

    /// The transport's name.
    pub fn transport_kind(&self) -> &'static str {
        self.transport.kind()
    }

    fn waiting(&self) -> parking_lot::MutexGuard<'_, HashMap<u64, Waiter>> {
        lock(&self.waiting)
    }

    /// Number of calls waiting for a reply (for tests and metrics).
    pub fn in_flight(&self) -> usize {
        self.waiting().len()
    }

    /// Fail every waiting call whose node is not in `live`: called on each registry change, so a
    /// call to a node that died ends as soon as the registry drops it.
    pub fn retain_nodes(&self, live: &HashSet<&str>) {
        let lost: Vec<Waiter> = {
            let mut w = self.waiting();
            let ids: Vec<u64> = w
                .iter()
                .filter(|(_, x)| x.node.as_ref().is_some_and(|n| !live.contains(&**n)))
                .map(|(id, _)| *id)
                .collect();
            ids.iter().filter_map(|id| w.remove(id)).collect()
        };
        for x in lost {
            let node = x.node.as_deref().unwrap_or_default().to_owned();
            let _ = x.tx.send(Err(CallError::NodeLost(node)));
        }
    }

    fn sweep(&self, now: Instant) {
        let expired: Vec<Waiter> = {
            let mut w = self.waiting();
            let ids: Vec<u64> = w
                .iter()
                .filter(|(_, x)| x.deadline <= now)
                .map(|(id, _)| *id)
                .collect();
            ids.iter().filter_map(|id| w.remove(id)).collect()
        };
        for x in expired {
            let _ = x.tx.send(Err(CallError::Timeout));
        }
    }

    /// Receive this node's inbox and run the calls in it on `local`, until `stop`. Resolves once
    /// the transport confirmed the subscription; the work continues on spawned tasks.
    pub async fn serve(
        self: &Arc<Self>,
        local: Arc<LocalBus>,
        stop: CancellationToken,
    ) -> Result<(), TransportError> {
        let inbox = self.transport.serve(&self.node, stop.clone()).await?;
        tokio::spawn(self.clone().run_inbox(local, inbox, None, stop.clone()));
        let bus = self.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_millis(250));
            loop {
                tokio::select! {
                    _ = stop.cancelled() => break,
                    _ = tick.tick() => bus.sweep(Instant::now()),
                }
            }
            // whatever still waits will get no reply from this bus
            let left: Vec<Waiter> = bus.waiting().drain().map(|(_, w)| w).collect();
            for w in left {
                let _ = w.tx.send(Err(CallError::Closed));
            }
        });
        Ok(())
    }

    /// Whether the transport has queue groups ([`RemoteBus::join_group`]).
    pub fn has_groups(&self) -> bool {
        self.transport.has_groups()
    }

    /// Take calls from module type `module`'s queue group and run them on this node's instance
    /// of that type, until `stop` (`ModuleConfig::queue_group`). Resolves once the broker
    /// confirmed the membership.
    pub async fn join_group(
        self: &Arc<Self>,
        local: Arc<LocalBus>,
        module: &str,
        stop: CancellationToken,
    ) -> Result<(), TransportError> {
        // the group's calls name the module type; the instance that runs them is found once
        let Some(instance) = local.instance_of(module) else {
            tracing::warn!(
                module,
                "no instance of the module here: not joining its queue group"
            );
            return Ok(());
        };
        let frames = self.transport.serve_group(module, stop.clone()).await?;
        tokio::spawn(self.clone().run_inbox(local, frames, Some(instance), stop));
        Ok(())
    }

    /// Read `frames` and run the calls in them, awaiting their results here rather than on a
    /// task each, until `stop`. The frames are this node's inbox, or with `group` a queue group's
    /// share, whose calls all run on that instance.
    async fn run_inbox(
        self: Arc<Self>,
        local: Arc<LocalBus>,
        mut frames: InboxFrames,
        group: Option<Arc<str>>,
        stop: CancellationToken,
    ) {
        let mut running: FuturesUnordered<Running> = FuturesUnordered::new();
        loop {
            tokio::select! {
                _ = stop.cancelled() => break,
                Some((from, id, r)) = running.next(), if !running.is_empty() => {
                    self.answer(&from, id, true, r).await;
                }
                frame = frames.next() => match frame {
                    Some(f) => self.receive(&local, f, group.as_ref(), &mut running).await,
                    None => {
                        tracing::warn!(transport = self.transport.kind(), node = %self.node, group = group.is_some(), "the transport ended an inbox; no longer receiving its calls");
                        break;
                    }
                },
            }
        }
    }

    async fn receive(
        &self,
        local: &Arc<LocalBus>,
        bytes: Bytes,
        group: Option<&Arc<str>>,
        running: &mut FuturesUnordered<Running>,
    ) {
        let len = bytes.len();
        let frame = match node_frame::decode(bytes) {
            Ok(f) => f,
            Err(why) => {
                metrics::counter!("warren_bus_frames_refused_total", "transport" => self.transport.kind())
                    .increment(1);
                tracing::warn!(transport = self.transport.kind(), len, %why, "dropped a frame from the bus");
                return;
            }
        };
        match frame {
            NodeFrame::Reply { id, result } => {
                let Some(w) = self.waiting().remove(&id) else {
                    tracing::debug!(
                        id,
                        "reply for a call that no longer waits (late or unknown)"
                    );
                    return;
                };
                self.call_duration.record(w.sent.elapsed().as_secs_f64());
                let _ =
                    w.tx.send(result.map_err(|(label, detail)| CallError::rebuild(&label, detail)));
            }
            NodeFrame::Call {
                id,
                from,
                instance,
                handler,
                session,
                body,
                timeout_ms,
                sent_ms,
                reply,
                trace,
            } => {
                if let Some(t) = &trace {
                    tracing::debug!(target: "warren::trace", trace_id = %t.trace_id, parent_span_id = %t.span_id, %from, %instance, %handler, "call received");
                }
                let age = now_ms().saturating_sub(sent_ms);
                if age > timeout_ms.saturating_add(STALE_GRACE_MS) {
                    metrics::counter!("warren_bus_calls_expired_total").increment(1);
                    tracing::warn!(%from, %handler, age_ms = age, timeout_ms, "dropped a call that outlived its deadline in the broker");
                    return;
                }
                let session = match session {
                    None => None,
                    Some(ws) => match into_session(ws) {
                        Some(s) => Some(Arc::new(s)),
                        None => {
                            tracing::warn!(%from, %handler, "dropped a call with a malformed session");
                            self.answer(
                                &from,
                                id,
                                reply,
                                Err(CallError::BadRequest("malformed session".into())),
                            )
                            .await;
                            return;
                        }
                    },
                };
                let deadline = Instant::now() + Duration::from_millis(timeout_ms.min(86_400_000));
                // a queue group's call names the module type: this node's instance of it runs it
                let target: Arc<str> = match group {
                    Some(id) => id.clone(),
                    None => instance.as_str().into(),
                };
                let call = Call {
                    instance: target,
                    handler: handler.into(),
                    session,
                    body,
                    deadline,
                    trace,
                };
                match local.deliver(call, reply).await {
                    Err(CallError::Closed) => {
                        self.answer(&from, id, reply, Err(CallError::ServiceNotFound(instance)))
                            .await
                    }
                    Err(e) => self.answer(&from, id, reply, Err(e)).await,
                    Ok(None) => {}
                    Ok(Some(pending)) => running.push(Box::pin(async move {
                        let r = match tokio::time::timeout_at(deadline, pending).await {
                            Ok(r) => r,
                            Err(_) => Err(CallError::Timeout),
                        };
                        if let Some(t) = &trace {
                            tracing::debug!(target: "warren::trace", trace_id = %t.trace_id, to = %from, ok = r.is_ok(), "reply sent");
                        }
                        (from, id, r)
                    })),
                }
            }
        }
    }

    /// Queue the reply to call `id` of node `to`; the writer sends it with the other frames for
    /// that node, and this does not wait for the broker.
    async fn answer(&self, to: &str, id: u64, reply: bool, r: Result<Bytes, CallError>) {
        if !reply {
            if let Err(e) = r {
                tracing::debug!(%to, error = %e, "call without reply failed");
            }
            return;
        }
        let Some(mut bytes) = reply_frame(id, &r) else {
            return;
        };
        let max = self.transport.max_frame();
        if bytes.len() > max {
            let e = CallError::TooLarge {
                size: bytes.len(),
                max,
            };
            let Some(b) = reply_frame(id, &Err(e)) else {
                return;
            };
            bytes = b;
        }
        if let Err(e) = self
            .enqueue(Dest::Node(to.into()), bytes, Report::Log)
            .await
        {
            tracing::warn!(%to, error = &e as &dyn std::error::Error, "could not send a reply");
        }
    }

    /// Encode `call` and queue it for `dest`; for a queue group, `call.instance` is replaced by
    /// the module type, which the receiving member resolves to its own instance.
    async fn call(
        &self,
        dest: Dest,
        call: Call,
        reply: bool,
    ) -> Result<Option<Pending>, CallError> {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        self.calls.increment(1);
        let timeout_ms = call
            .deadline
            .saturating_duration_since(Instant::now())
            .as_millis() as u64;
        let bytes = node_frame::encode_call(&CallRef {
            id,
            from: &self.node,
            instance: match &dest {
                Dest::Node(_) => &call.instance,
                Dest::Group(module) => module,
            },
            handler: &call.handler,
            session: call.session.as_deref().map(session_ref),
            body: &call.body,
            timeout_ms,
            sent_ms: now_ms(),
            reply,
            trace: call.trace,
        })
        .map_err(|e| CallError::bad_request(Detail::caused("cannot encode call", e)))?;
        let max = self.transport.max_frame();
        if bytes.len() > max {
            return Err(CallError::TooLarge {
                size: bytes.len(),
                max,
            });
        }
        if !reply {
            // nobody waits for a reply: the caller learns here whether the broker took it
            let (done, taken) = oneshot::channel();
            self.enqueue(dest, bytes, Report::Done(done)).await?;
            taken.await.unwrap_or_else(|_| {
                Err(TransportError::Unavailable("the bus is shut down".into()))
            })?;
            return Ok(None);
        }
        let (tx, rx) = oneshot::channel();
        self.waiting().insert(
            id,
            Waiter {
                node: match &dest {
                    Dest::Node(n) => Some(n.clone()),
                    Dest::Group(_) => None,
                },
                deadline: call.deadline,
                tx,
                sent: Instant::now(),
            },
        );
        if let Err(e) = self.enqueue(dest, bytes, Report::Waiter(id)).await {
            self.waiting().remove(&id);
            return Err(e.into());
        }
        Ok(Some(Pending::Local(rx)))
    }
}

impl Bus for RemoteBus {
    fn send(
        &self,
        node: &str,
        call: Call,
        reply: bool,
    ) -> BoxFuture<'_, Result<Option<Pending>, CallError>> {
        let dest = Dest::Node(node.into());
        Box::pin(async move { self.call(dest, call, reply).await })
    }

    fn send_to_group(
        &self,
        module: &str,
        call: Call,
        reply: bool,
    ) -> BoxFuture<'_, Result<Option<Pending>, CallError>> {
        let dest = Dest::Group(module.into());
        Box::pin(async move { self.call(dest, call, reply).await })
    }

    fn has_groups(&self) -> bool {
        self.transport.has_groups()
    }

    fn kind(&self) -> &'static str {
        self.transport.kind()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sessions_cross_the_bus_unchanged() {
        for (protocol, network) in [
            (Protocol::Pomelo, Net::Ws),
            (Protocol::PomeloRpc, Net::Tcp),
            (Protocol::Mqtt, Net::Tcp),
            (Protocol::Json, Net::Ws),
            (Protocol::Line, Net::Tcp),
        ] {
            let mut settings = serde_json::Map::new();
            settings.insert("room".into(), "lobby".into());
            let s = Session {
                id: "sid".into(),
                uid: Some("alice".into()),
                settings,
                remote: "127.0.0.1:5".parse().expect("addr"),
                network,
                protocol,
                gate: "Gate001".into(),
            };
            // the names on the wire are the serde names of the protocols
            assert_eq!(
                serde_json::to_value(protocol).expect("name"),
                protocol_name(protocol)
            );
            let b = node_frame::encode_call(&CallRef {
                id: 7,
                from: "n1",
                instance: "Chat001",
                handler: "HD_Say",
                session: Some(session_ref(&s)),
                body: b"{}",
                timeout_ms: 5000,
                sent_ms: now_ms(),
                reply: true,
                trace: None,
            })
            .expect("encode");
            match node_frame::decode(b).expect("decode") {
                NodeFrame::Call { session, body, .. } => {
                    assert_eq!(session.and_then(into_session), Some(s));
                    assert_eq!(&body[..], b"{}");
                }
                NodeFrame::Reply { .. } => panic!("wrong frame"),
            }
        }
    }

    #[test]
    fn a_transport_failure_keeps_the_broker_error() {
        let refused = std::io::Error::new(std::io::ErrorKind::ConnectionRefused, "refused");
        let e = TransportError::unavailable("cannot connect to redis://h:6379", refused);
        // Display has this side's words; the chain has the broker client's, once
        assert_eq!(
            e.to_string(),
            "broker unavailable: cannot connect to redis://h:6379"
        );
        let cause = std::error::Error::source(&e).expect("the broker error");
        assert!(cause.is::<std::io::Error>());
        // a call that fails on it keeps the chain, and its wire text has the words of both
        let c = CallError::from(e);
        assert_eq!(c.kind(), crate::error::CallErrorKind::Unavailable);
        let cause = std::error::Error::source(&c).expect("the same broker error");
        assert!(cause.is::<std::io::Error>());
        assert_eq!(
            c.wire_text(),
            "rpc service connection failed: cannot connect to redis://h:6379: refused"
        );
        let large = CallError::from(TransportError::TooLarge { size: 9, max: 4 });
        assert_eq!(large, CallError::TooLarge { size: 9, max: 4 });
    }

    #[test]
    fn errors_cross_the_bus_unchanged() {
        for e in [
            CallError::Timeout,
            CallError::ServiceNotFound("Chat".into()),
            CallError::NotClientVisible {
                handler: "x".into(),
                prefix: "HD_".into(),
            },
            CallError::TooLarge { size: 9, max: 4 },
            CallError::App("No room".into()),
        ] {
            assert_eq!(CallError::rebuild(e.kind().as_str(), e.detail()), e);
        }
    }
}

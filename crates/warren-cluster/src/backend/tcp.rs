//! One TCP backend service: its handle ([`Service`]), the task that dials it and owns its
//! socket, and the task that delivers its messages to the hooks.
//!
//! A service's connection task dials (with `dial_timeout`), and while connected runs a reader
//! and a writer over the two halves of the socket: the writer drains everything queued since its
//! last write into one write; the reader decodes with the group's codec, completes waiting calls
//! and hands every other message to the delivery task. When the connection ends, the service
//! leaves the rings, every waiting call ends with `close`, and the task dials again a second
//! later, unless the service left discovery (it then leaves its group) or was closed.

use std::collections::HashMap;
use std::io;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use bytes::{Buf, BytesMut};
use parking_lot::Mutex;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::sync::{Notify, Semaphore, mpsc, oneshot};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::codec::{Codec, CodecError};
use super::hooks::{Hooks, Redial};
use super::{BackendError, RpcId, ServiceConf, Shared};

/// Pause between a dial failure or a disconnect and the next dial.
pub(super) const REDIAL: Duration = Duration::from_secs(1);
/// Period of `on_tick`.
pub(super) const TICK: Duration = Duration::from_secs(1);
/// Decoded messages waiting for the delivery task; a full queue stops the reader, which leaves
/// the bytes in the socket (TCP backpressure) rather than in memory.
const DELIVERY_QUEUE: usize = 256;
/// Read size: the buffer grows by this much when it is full.
const READ_CHUNK: usize = 8 * 1024;

type Waiter<M> = (u64, oneshot::Sender<Result<M, BackendError>>);

/// A handle to one service of a backend group: cheap to clone, valid after the service left
/// (sends then fail with `not connected`).
pub struct Service<C: Codec> {
    inner: Arc<Inner<C>>,
}

impl<C: Codec> Clone for Service<C> {
    fn clone(&self) -> Self {
        Service {
            inner: self.inner.clone(),
        }
    }
}

impl<C: Codec> std::fmt::Debug for Service<C> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Service")
            .field("conf", &self.inner.conf)
            .field("connected", &self.is_connected())
            .finish()
    }
}

pub(super) struct Inner<C: Codec> {
    conf: ServiceConf,
    codec: Arc<C>,
    /// Bytes encoded and not yet written; never longer than `queue_bytes`.
    out: Mutex<BytesMut>,
    out_ready: Notify,
    queue_bytes: usize,
    connected: AtomicBool,
    /// Left discovery under lazy removal: leaves its group at its next disconnect or dial
    /// failure, unless discovery lists it again first.
    marked: AtomicBool,
    waiters: Mutex<HashMap<RpcId, Waiter<C::Msg>>>,
    next_waiter: AtomicU64,
    cancel: CancellationToken,
}

impl<C: Codec> Service<C> {
    pub(super) fn new(
        conf: ServiceConf,
        codec: Arc<C>,
        queue_bytes: usize,
        cancel: CancellationToken,
    ) -> Self {
        Service {
            inner: Arc::new(Inner {
                conf,
                codec,
                out: Mutex::new(BytesMut::new()),
                out_ready: Notify::new(),
                queue_bytes,
                connected: AtomicBool::new(false),
                marked: AtomicBool::new(false),
                waiters: Mutex::new(HashMap::new()),
                next_waiter: AtomicU64::new(0),
                cancel,
            }),
        }
    }

    /// The service as discovery described it (name, id and tag lowercased and trimmed).
    pub fn conf(&self) -> &ServiceConf {
        &self.inner.conf
    }

    /// The group's name.
    pub fn name(&self) -> &str {
        &self.inner.conf.name
    }

    /// The service's id in its group.
    pub fn id(&self) -> &str {
        &self.inner.conf.id
    }

    /// `addr:port`, as dialled.
    pub fn peer(&self) -> String {
        self.inner.conf.peer()
    }

    /// Whether its connection is up (it is then on its group's rings).
    pub fn is_connected(&self) -> bool {
        self.inner.connected.load(Ordering::SeqCst)
    }

    /// Whether it left discovery and waits for its next disconnect or dial failure to leave its
    /// group (lazy removal).
    pub fn is_marked(&self) -> bool {
        self.inner.marked.load(Ordering::SeqCst)
    }

    pub(super) fn cancel_token(&self) -> &CancellationToken {
        &self.inner.cancel
    }

    pub(super) fn set_marked(&self, marked: bool) -> bool {
        self.inner.marked.swap(marked, Ordering::SeqCst)
    }

    /// Whether two handles are the same service (not merely the same id: a changed address
    /// makes a new service under the old id).
    pub fn same(&self, other: &Service<C>) -> bool {
        Arc::ptr_eq(&self.inner, &other.inner)
    }

    /// Encode `msg` and queue it for the writer. One-way: `Ok` means queued, not delivered;
    /// bytes queued when the connection drops are lost with it ([`call`](Service::call) gets an
    /// answer or an error).
    pub fn send(&self, msg: &C::Msg) -> Result<(), BackendError> {
        self.queue(|out| self.inner.codec.encode(msg, out))
    }

    /// Queue bytes already encoded (a broadcast encodes once and queues the same bytes on every
    /// service).
    pub fn send_raw(&self, bytes: &[u8]) -> Result<(), BackendError> {
        self.queue(|out| {
            out.extend_from_slice(bytes);
            Ok(())
        })
    }

    fn queue(
        &self,
        put: impl FnOnce(&mut BytesMut) -> Result<(), CodecError>,
    ) -> Result<(), BackendError> {
        if !self.is_connected() {
            return Err(BackendError::NotConnected);
        }
        let mut out = self.inner.out.lock();
        let start = out.len();
        if let Err(e) = put(&mut out) {
            out.truncate(start);
            return Err(BackendError::Encode(e));
        }
        if out.len() > self.inner.queue_bytes {
            out.truncate(start);
            drop(out);
            metrics::counter!("warren_backend_queue_full_total", "group" => self.name().to_owned())
                .increment(1);
            return Err(BackendError::QueueFull);
        }
        drop(out);
        self.inner.out_ready.notify_one();
        Ok(())
    }

    /// Send `msg` and wait for its answer: the first message for which the hooks'
    /// `check_rpc_resp` gives `rpc_id`.
    ///
    /// The waiter is in place before the bytes are queued, so an answer cannot overtake it.
    /// Errors: `rpcId exist` (a call with this id is waiting on this service), `timeout`,
    /// `close` (the connection dropped), `not connected`, `queue full`, or the codec's.
    pub async fn call(
        &self,
        rpc_id: RpcId,
        msg: &C::Msg,
        timeout: Duration,
    ) -> Result<C::Msg, BackendError> {
        if !self.is_connected() {
            return Err(BackendError::NotConnected);
        }
        let (tx, rx) = oneshot::channel();
        let seq = self.inner.next_waiter.fetch_add(1, Ordering::Relaxed);
        {
            let mut w = self.inner.waiters.lock();
            if w.contains_key(&rpc_id) {
                return Err(BackendError::RpcIdExist);
            }
            w.insert(rpc_id, (seq, tx));
        }
        // removes the waiter however this call ends (answer, error, or the caller dropping it)
        let _guard = WaiterGuard {
            service: self,
            rpc_id,
            seq,
        };
        // a disconnect that drained the waiters just before ours went in: nobody would wake us
        if !self.is_connected() {
            return Err(BackendError::Close);
        }
        self.send(msg)?;
        match tokio::time::timeout(timeout, rx).await {
            Ok(Ok(answer)) => answer,
            Ok(Err(_)) => Err(BackendError::Close),
            Err(_) => Err(BackendError::Timeout),
        }
    }

    /// End every waiting call with `close`.
    fn fail_waiters(&self) {
        let waiters: Vec<_> = self.inner.waiters.lock().drain().collect();
        for (_, (_, tx)) in waiters {
            let _ = tx.send(Err(BackendError::Close));
        }
    }

    /// Hand `msg` to the call waiting for `rpc_id`; gives it back when no call waits.
    fn complete(&self, rpc_id: RpcId, msg: C::Msg) -> Option<C::Msg> {
        let waiter = self.inner.waiters.lock().remove(&rpc_id);
        match waiter {
            Some((_, tx)) => match tx.send(Ok(msg)) {
                Ok(()) => None,
                Err(Ok(msg)) => Some(msg),
                Err(Err(_)) => None,
            },
            None => Some(msg),
        }
    }

    fn take_queued(&self) -> Option<bytes::Bytes> {
        let mut out = self.inner.out.lock();
        (!out.is_empty()).then(|| out.split().freeze())
    }
}

struct WaiterGuard<'a, C: Codec> {
    service: &'a Service<C>,
    rpc_id: RpcId,
    seq: u64,
}

impl<C: Codec> Drop for WaiterGuard<'_, C> {
    fn drop(&mut self) {
        let mut w = self.service.inner.waiters.lock();
        if w.get(&self.rpc_id).is_some_and(|(s, _)| *s == self.seq) {
            w.remove(&self.rpc_id);
        }
    }
}

/// Why a connection ended.
#[derive(Debug)]
enum End {
    Closed,
    Cancelled,
    Io(io::Error),
    Decode(CodecError),
    /// The codec claimed a count of bytes it was not given, or none for a message.
    Consumed {
        consumed: usize,
        available: usize,
    },
    /// More unconsumed bytes than the codec's longest frame.
    Oversize {
        buffered: usize,
        max: usize,
    },
}

impl std::fmt::Display for End {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            End::Closed => f.write_str("closed by the service"),
            End::Cancelled => f.write_str("closed by this node"),
            End::Io(e) => write!(f, "{e}"),
            End::Decode(e) => write!(f, "{e}"),
            End::Consumed {
                consumed,
                available,
            } => write!(
                f,
                "the codec consumed {consumed} bytes of {available} (a message needs 1 to {available})"
            ),
            End::Oversize { buffered, max } => write!(
                f,
                "{buffered} bytes buffered without a whole message (longest frame {max})"
            ),
        }
    }
}

/// The life of one service: dial, run the connection, dial again, until it is closed or leaves
/// its group. Fires `on_remove` last.
pub(super) async fn run<C: Codec, H: Hooks<C>>(shared: Arc<Shared<C, H>>, svc: Service<C>) {
    let hooks = &shared.hooks;
    let cancel = svc.inner.cancel.clone();
    let (deliver_tx, deliver_rx) = mpsc::channel(DELIVERY_QUEUE);
    shared.tracker.spawn(deliver(
        shared.hooks.clone(),
        svc.clone(),
        deliver_rx,
        if shared.msg_seq {
            Delivery::InOrder
        } else {
            Delivery::Pool(shared.pool.clone(), shared.tracker.clone())
        },
        cancel.clone(),
    ));
    let group = svc.name().to_owned();
    let peer = svc.peer();
    loop {
        let dialled = tokio::select! {
            biased;
            _ = cancel.cancelled() => break,
            r = tokio::time::timeout(shared.dial_timeout, TcpStream::connect(&peer)) => r,
        };
        let stream = match dialled {
            Ok(Ok(s)) => s,
            Ok(Err(e)) => {
                if !dial_failed(&shared, &svc, &e, &cancel).await {
                    break;
                }
                continue;
            }
            Err(_) => {
                let e = io::Error::new(io::ErrorKind::TimedOut, "dial timed out");
                if !dial_failed(&shared, &svc, &e, &cancel).await {
                    break;
                }
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        svc.inner.out.lock().clear();
        svc.inner.connected.store(true, Ordering::SeqCst);
        shared.ring_join(&svc);
        metrics::counter!("warren_backend_connects_total", "group" => group.clone()).increment(1);
        tracing::info!(group = %group, service = %svc.id(), peer = %peer, "backend connected");
        hooks.on_connected(&svc);

        let (r, w) = stream.into_split();
        let end = tokio::select! {
            biased;
            _ = cancel.cancelled() => End::Cancelled,
            e = write_loop(hooks.as_ref(), &svc, w) => e,
            e = read_loop(hooks.as_ref(), &svc, r, &deliver_tx) => e,
        };

        svc.inner.connected.store(false, Ordering::SeqCst);
        svc.inner.out.lock().clear();
        shared.ring_leave(&svc);
        svc.fail_waiters();
        match &end {
            End::Closed | End::Cancelled => {
                tracing::info!(group = %group, service = %svc.id(), peer = %peer, reason = %end, "backend disconnected")
            }
            End::Io(_) => {
                tracing::warn!(group = %group, service = %svc.id(), peer = %peer, reason = %end, "backend disconnected")
            }
            End::Decode(_) | End::Consumed { .. } | End::Oversize { .. } => {
                metrics::counter!("warren_backend_decode_errors_total", "group" => group.clone())
                    .increment(1);
                tracing::warn!(group = %group, service = %svc.id(), peer = %peer, reason = %end, "backend sent bad bytes; dropping the connection")
            }
        }
        hooks.on_disconnect(&svc);
        if cancel.is_cancelled() {
            break;
        }
        if svc.is_marked() {
            tracing::info!(group = %group, service = %svc.id(), "backend left discovery; removed at disconnect");
            shared.retire(&svc);
            break;
        }
        tokio::select! {
            biased;
            _ = cancel.cancelled() => break,
            _ = tokio::time::sleep(REDIAL) => {}
        }
    }
    svc.inner.connected.store(false, Ordering::SeqCst);
    // stops the delivery task too, if the loop ended on its own
    cancel.cancel();
    hooks.on_remove(&svc);
}

/// After a failed dial: leave the group (marked, or the hook says stop) and return false, or
/// wait a second and return true.
async fn dial_failed<C: Codec, H: Hooks<C>>(
    shared: &Shared<C, H>,
    svc: &Service<C>,
    e: &io::Error,
    cancel: &CancellationToken,
) -> bool {
    metrics::counter!("warren_backend_dial_failures_total", "group" => svc.name().to_owned())
        .increment(1);
    tracing::debug!(group = %svc.name(), service = %svc.id(), peer = %svc.peer(), error = %e, "backend dial failed");
    if svc.is_marked() {
        tracing::info!(
            group = %svc.name(),
            service = %svc.id(),
            "backend left discovery; removed at dial failure"
        );
        shared.retire(svc);
        return false;
    }
    if shared.hooks.on_dial_fail(svc, e) == Redial::Stop {
        tracing::info!(group = %svc.name(), service = %svc.id(), error = %e, "backend dial failed; the hook stops it");
        shared.retire(svc);
        return false;
    }
    tokio::select! {
        biased;
        _ = cancel.cancelled() => false,
        _ = tokio::time::sleep(REDIAL) => true,
    }
}

/// Write whatever is queued, all of it in one write, until the socket fails.
async fn write_loop<C: Codec, H: Hooks<C>>(
    hooks: &H,
    svc: &Service<C>,
    mut w: OwnedWriteHalf,
) -> End {
    loop {
        match svc.take_queued() {
            Some(bytes) => {
                if let Err(e) = w.write_all(&bytes).await {
                    return End::Io(e);
                }
                hooks.on_send(svc, bytes.len());
            }
            None => {
                svc.inner.out_ready.notified().await;
                // let the other senders woken with the one that notified (a batch of answers
                // wakes a batch of callers) queue theirs first: one write for all of them
                tokio::task::yield_now().await;
            }
        }
    }
}

/// Read and decode until the socket or the codec fails; answers go to their calls, the rest to
/// the delivery task.
async fn read_loop<C: Codec, H: Hooks<C>>(
    hooks: &H,
    svc: &Service<C>,
    mut r: OwnedReadHalf,
    deliver: &mpsc::Sender<C::Msg>,
) -> End {
    let codec = &svc.inner.codec;
    let max = codec.max_frame();
    let mut buf = BytesMut::new();
    loop {
        if buf.capacity() - buf.len() < READ_CHUNK / 2 {
            buf.reserve(READ_CHUNK);
        }
        let n = match r.read_buf(&mut buf).await {
            Ok(0) => return End::Closed,
            Ok(n) => n,
            Err(e) => return End::Io(e),
        };
        hooks.on_recv(svc, n);
        loop {
            let available = buf.len();
            let (msg, consumed) = match codec.decode(&buf) {
                Ok(Some(m)) => m,
                Ok(None) => break,
                Err(e) => return End::Decode(e),
            };
            if consumed == 0 || consumed > available {
                return End::Consumed {
                    consumed,
                    available,
                };
            }
            buf.advance(consumed);
            let msg = match hooks.check_rpc_resp(&msg) {
                Some(id) => svc.complete(id, msg),
                None => Some(msg),
            };
            if let Some(msg) = msg
                && deliver.send(msg).await.is_err()
            {
                return End::Cancelled;
            }
        }
        if buf.len() > max {
            return End::Oversize {
                buffered: buf.len(),
                max,
            };
        }
    }
}

enum Delivery {
    InOrder,
    Pool(Arc<Semaphore>, TaskTracker),
}

/// The service's delivery task: `on_msg` for each message and `on_tick` every second, one after
/// the other, or each on a pooled task.
async fn deliver<C: Codec, H: Hooks<C>>(
    hooks: Arc<H>,
    svc: Service<C>,
    mut rx: mpsc::Receiver<C::Msg>,
    how: Delivery,
    cancel: CancellationToken,
) {
    let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + TICK, TICK);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let msg = tokio::select! {
            biased;
            _ = cancel.cancelled() => return,
            m = rx.recv() => match m {
                Some(m) => Some(m),
                None => return,
            },
            _ = tick.tick() => None,
        };
        match &how {
            Delivery::InOrder => match msg {
                Some(m) => hooks.on_msg(&svc, m).await,
                None => hooks.on_tick(&svc).await,
            },
            Delivery::Pool(pool, tracker) => {
                let permit = tokio::select! {
                    biased;
                    _ = cancel.cancelled() => return,
                    p = pool.clone().acquire_owned() => match p {
                        Ok(p) => p,
                        Err(_) => return,
                    },
                };
                let (hooks, svc) = (hooks.clone(), svc.clone());
                tracker.spawn(async move {
                    match msg {
                        Some(m) => hooks.on_msg(&svc, m).await,
                        None => hooks.on_tick(&svc).await,
                    }
                    drop(permit);
                });
            }
        }
    }
}

//! What every connection task shares, whatever protocol it speaks.
//!
//! A protocol module (`mqtt.rs`, …) implements [`Protocol`]: how to handle the complete frames in
//! the read buffer, how to turn a handler's result into a reply, and how to frame outbound items
//! ([`Framer`]). [`SessionConn`] owns the session, its outbound queue, the pending replies and the
//! writer task; [`run`] is the one read loop (close, drain, replies, keepalive, socket) they all
//! use, and [`SessionConn::finish`] the one way a connection ends.

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context as TaskContext, Poll};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use futures_util::StreamExt;
use futures_util::stream::FuturesUnordered;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use super::Gate;
use super::transport::{Reader, Writer};
use crate::bus::Pending;
use crate::config::ListenerConfig;
use crate::error::CallError;
use crate::route::Route;
use crate::router::Target;
use crate::session::{Outbound, Protocol as SessionProtocol, Session, SessionHandle, Transport};

/// Why a connection ends, for the log line and for how it closes.
pub(crate) enum End {
    /// The peer closed the socket.
    PeerClosed,
    /// The client said goodbye in its protocol.
    Disconnect,
    /// The client broke a rule; the text is logged with its address.
    Refused(String),
    /// As `Refused`, closing a WebSocket with this close code (1007 bad data, 1008 policy).
    RefusedWithCode(u16, String),
    /// The server closed it (session `Close`, takeover, slow consumer).
    ServerClosed,
    /// Shutdown: in-flight requests are done.
    Drained,
}

/// Frames outbound items in one protocol's bytes. Runs on the writer task.
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
    /// WebSocket close code to say goodbye with.
    pub(crate) close_code: Option<u16>,
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
pub(crate) trait Protocol: Send + Sized + 'static {
    /// What identifies a reply (topic, request id, callback name).
    type Tag: Send + Unpin + 'static;

    /// Handle the complete frames in `buf` while `conn` has room for more requests in flight.
    /// Returns whether anything was handled (to re-arm the read deadline).
    fn handle_buffered(
        &mut self,
        conn: &mut SessionConn<Self::Tag>,
        buf: &mut BytesMut,
    ) -> impl Future<Output = Result<bool, End>> + Send;

    /// Turn a handler result into the protocol's reply and queue it.
    fn reply(
        &mut self,
        conn: &mut SessionConn<Self::Tag>,
        tag: Self::Tag,
        result: Result<Bytes, CallError>,
    ) -> impl Future<Output = Result<(), End>> + Send;

    /// How long the connection may stay silent.
    fn read_timeout(&self) -> Option<Duration>;

    /// A period at which [`Protocol::on_tick`] runs (buffered flushes), if any.
    fn tick(&self) -> Option<Duration> {
        None
    }

    /// Runs every [`Protocol::tick`].
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
}

/// The replies a connection waits for. The set is created with the first request, so a
/// connection that never calls anything does not pay for it.
pub(crate) struct PendingSet<T> {
    inner: Option<FuturesUnordered<ReplyFuture<T>>>,
}

impl<T> Default for PendingSet<T> {
    fn default() -> Self {
        PendingSet { inner: None }
    }
}

impl<T: Unpin> PendingSet<T> {
    pub(crate) fn len(&self) -> usize {
        self.inner.as_ref().map_or(0, FuturesUnordered::len)
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn push(&mut self, f: ReplyFuture<T>) {
        self.inner.get_or_insert_with(FuturesUnordered::new).push(f);
    }

    /// The next reply to complete; pending forever while the set is empty (callers guard on
    /// `is_empty`). Cancel-safe.
    async fn next(&mut self) -> Option<(Option<T>, Result<Bytes, CallError>)> {
        match &mut self.inner {
            Some(f) => f.next().await,
            None => std::future::pending().await,
        }
    }
}

/// A live session's connection: the session, its queue, its pending replies, its writer.
pub(crate) struct SessionConn<T> {
    pub(crate) gate: Arc<Gate>,
    pub(crate) cfg: Arc<ListenerConfig>,
    pub(crate) handle: Arc<SessionHandle>,
    pub(crate) tx: mpsc::Sender<Outbound>,
    pub(crate) close: CancellationToken,
    pub(crate) peer: SocketAddr,
    pub(crate) pending: PendingSet<T>,
    write_task: JoinHandle<()>,
}

impl<T: Send + Unpin + 'static> SessionConn<T> {
    /// Create the session, register it with the gate, and start the writer.
    pub(crate) fn open(
        gate: Arc<Gate>,
        cfg: Arc<ListenerConfig>,
        peer: SocketAddr,
        protocol: SessionProtocol,
        writer: Writer,
        framer: impl Framer,
    ) -> Self {
        let (tx, rx) = mpsc::channel(cfg.write_queue);
        let close = gate.killing.child_token();
        let node = gate.node.clone();
        let session = Session {
            id: uuid::Uuid::new_v4().to_string().into(),
            uid: None,
            settings: Default::default(),
            remote: peer,
            transport: match &writer {
                Writer::Tcp(_) => Transport::Tcp,
                Writer::Ws(..) => Transport::Ws,
            },
            protocol,
            gate: node.session_table().gate_id().clone(),
        };
        tracing::Span::current().record("session", tracing::field::display(&session.id));
        let handle = SessionHandle::new(session, tx.clone(), close.clone());
        node.session_table().insert(handle.clone());
        let write_task = tokio::spawn(
            write_loop(
                writer,
                rx,
                close.clone(),
                framer,
                Duration::from_secs(cfg.write_timeout_s),
            )
            .instrument(tracing::Span::current()),
        );
        SessionConn {
            gate,
            cfg,
            handle,
            tx,
            close,
            peer,
            pending: PendingSet::default(),
            write_task,
        }
    }

    /// Whether another request may be taken in.
    pub(crate) fn has_room(&self) -> bool {
        self.pending.len() < self.cfg.max_inflight.max(1)
    }

    /// Queue an outbound item, waiting for room (backpressure on this client only).
    pub(crate) async fn send(&mut self, o: Outbound) -> Result<(), End> {
        self.tx.send(o).await.map_err(|_| End::ServerClosed)
    }

    /// Resolve a route to a target for this session.
    pub(crate) fn resolve(&self, route: &Route<'_>, body: &[u8]) -> Result<Target, CallError> {
        let snapshot = self.handle.snapshot();
        self.gate.node.router().resolve_call(
            route.module,
            route.target,
            route.handler,
            Some(&snapshot),
            body,
        )
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
        let deadline = Instant::now() + self.cfg.rpc_expired();
        let sent = self
            .gate
            .node
            .router()
            .send(
                target,
                handler,
                Some(self.handle.snapshot()),
                body,
                deadline,
                true,
            )
            .await;
        match sent {
            Ok(Some(pending)) => {
                self.pending.push(ReplyFuture { tag, pending });
                Ok(())
            }
            Ok(None) => Ok(()),
            Err(e) => Err((tag, e)),
        }
    }

    /// End the connection: log why, leave groups, let the writer flush (or stop it), tell the
    /// modules that asked for it.
    pub(crate) async fn finish(self, end: End) {
        match &end {
            End::Refused(why) | End::RefusedWithCode(_, why) => {
                tracing::warn!(peer = %self.peer, reason = %why, "closing connection");
                metrics::counter!("warren_connections_refused_total", "reason" => "protocol")
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
        if let End::RefusedWithCode(code, _) = end {
            let _ = self.tx.try_send(Outbound::CloseCode(code));
        } else if matches!(end, End::Drained | End::ServerClosed | End::Refused(_)) {
            let _ = self.tx.try_send(Outbound::Close);
        } else {
            self.close.cancel();
        }
        let SessionConn {
            mut write_task,
            close,
            tx,
            handle,
            cfg,
            ..
        } = self;
        drop(tx);
        drop(handle);
        let wait = Duration::from_secs(cfg.write_timeout_s);
        if tokio::time::timeout(wait, &mut write_task).await.is_err() {
            close.cancel();
            let _ = write_task.await;
        }
        close.cancel();
        node.session_closed(last).await;
    }
}

/// Run a session to its end: the read loop, then the protocol's cleanup, then
/// [`SessionConn::finish`].
///
/// (An `async move` block rather than an `async fn`: an async fn keeps a second copy of its
/// arguments in its state, and this state lives as long as the connection.)
#[allow(clippy::manual_async_fn)] // deliberate: see above
pub(crate) fn serve_session<P: Protocol>(
    mut proto: P,
    mut conn: SessionConn<P::Tag>,
    mut reader: Reader,
    mut buf: BytesMut,
) -> impl Future<Output = ()> + Send {
    async move {
        let end = run(&mut proto, &mut conn, &mut reader, &mut buf).await;
        drop(reader);
        drop(buf);
        proto.on_close(&conn);
        drop(proto);
        Box::pin(conn.finish(end)).await;
    }
}

/// The read loop every protocol uses: server close, drain, replies, keepalive, socket — in that
/// order of priority. Returns why the connection ends.
pub(crate) async fn run<P: Protocol>(
    proto: &mut P,
    conn: &mut SessionConn<P::Tag>,
    reader: &mut Reader,
    buf: &mut BytesMut,
) -> End {
    let read_timeout = proto.read_timeout();
    let far = Instant::now() + Duration::from_secs(86400 * 365);
    let deadline = tokio::time::sleep_until(read_timeout.map_or(far, |d| Instant::now() + d));
    tokio::pin!(deadline);
    let mut draining = false;
    let tick_every = proto.tick();
    let mut ticker = tick_every.map(|every| {
        let mut t = tokio::time::interval(every);
        t.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        t
    });
    loop {
        if draining && conn.pending.is_empty() {
            return End::Drained;
        }
        if !draining {
            // frames already buffered (a first packet may arrive with more) go first
            // boxed: the decode-and-dispatch state exists only while it runs, so an idle
            // connection's task stays small
            match Box::pin(proto.handle_buffered(conn, buf)).await {
                Err(end) => return end,
                Ok(true) => {
                    if let Some(d) = read_timeout {
                        deadline.as_mut().reset(Instant::now() + d);
                    }
                }
                Ok(false) => {}
            }
            if buf.is_empty() && buf.capacity() > 0 {
                // an idle connection holds no read buffer
                *buf = BytesMut::new();
            }
        }
        let room = conn.has_room();
        tokio::select! {
            biased;
            _ = conn.close.cancelled() => return End::ServerClosed,
            _ = conn.gate.draining.cancelled(), if !draining => {
                draining = true;
                Box::pin(proto.on_drain(conn)).await;
            }
            _ = async { ticker.as_mut()?.tick().await; Some(()) }, if ticker.is_some() => {
                if let Err(end) = Box::pin(proto.on_tick(conn)).await {
                    return end;
                }
            }
            Some((tag, result)) = conn.pending.next(), if !conn.pending.is_empty() => {
                match tag {
                    Some(tag) => {
                        if let Err(end) = Box::pin(proto.reply(conn, tag, result)).await {
                            return end;
                        }
                    }
                    None => {
                        if let Err(e) = result {
                            tracing::debug!(error = %e, "request without reply failed");
                        }
                    }
                }
            }
            _ = &mut deadline, if !draining => {
                return End::Refused(format!(
                    "idle timeout: nothing received for {:?}",
                    read_timeout.unwrap_or_default()
                ));
            }
            r = reader.read(buf), if !draining && room => {
                match r {
                    Ok(0) => return End::PeerClosed,
                    Ok(_) => {}
                    Err(e) if matches!(e.kind(), std::io::ErrorKind::ConnectionReset | std::io::ErrorKind::BrokenPipe) => {
                        return End::PeerClosed;
                    }
                    Err(e) if e.to_string().contains("without closing handshake") => return End::PeerClosed,
                    Err(e) => return End::Refused(format!("read failed: {e}")),
                }
            }
        }
    }
}

/// Drain the outbound queue into the socket: everything already queued goes out in one write.
async fn write_loop(
    mut w: Writer,
    mut rx: mpsc::Receiver<Outbound>,
    close: CancellationToken,
    mut framer: impl Framer,
    write_timeout: Duration,
) {
    let mut out = Out::default();
    'outer: loop {
        let first = tokio::select! {
            biased;
            _ = close.cancelled() => break,
            o = rx.recv() => o,
        };
        let Some(first) = first else { break };
        let mut closing = false;
        // everything else already queued comes out in one batch: one permit release (one lock)
        // per batch instead of per message
        let mut batch = Vec::new();
        if !rx.is_empty() {
            batch.reserve(rx.len().min(128));
            rx.recv_many(&mut batch, 128).await;
        }
        for item in std::iter::once(first).chain(batch) {
            match item {
                Outbound::Close => closing = true,
                Outbound::CloseCode(code) => {
                    closing = true;
                    out.close_code = Some(code);
                }
                // nothing queued after a close is written
                _ if closing => {}
                item => framer.frame(item, &mut out),
            }
        }
        if !out.buf.is_empty() {
            metrics::counter!("warren_socket_writes_total").increment(1);
            // boxed: the write and its timer exist only while writing, not in an idle task
            match Box::pin(tokio::time::timeout(write_timeout, w.write(&mut out))).await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => {
                    tracing::debug!(error = %e, "write failed");
                    break 'outer;
                }
                Err(_) => {
                    tracing::warn!(
                        reason = "write timeout: client not reading",
                        "closing connection"
                    );
                    metrics::counter!("warren_slow_consumer_disconnects_total").increment(1);
                    break 'outer;
                }
            }
            if rx.is_empty() && out.buf.capacity() > 4 * 1024 {
                // a burst is over: give its buffer back instead of holding it while idle
                out.buf = BytesMut::new();
            }
        }
        if closing {
            break;
        }
    }
    close.cancel();
    w.close(out.close_code).await;
}

//! The remote bus: calls between nodes over a broker.
//!
//! A [`Transport`] is the least a broker must do for warren: put a frame in one node's inbox, and
//! hand this node the frames of its own inbox in order. NATS, Redis and RabbitMQ each implement it
//! (crate `warren-cluster`); everything else — the call envelope, reply correlation, deadlines,
//! failing calls fast when their node leaves the registry — is here, once, in [`RemoteBus`], so
//! the three brokers behave the same and the router and the modules never know which one runs.
//!
//! Ordering: a node sends its frames to one inbox through one broker connection, and the receiving
//! node hands each call to its instance's mailbox before reading the next frame, so one session's
//! calls reach a module in the order they were sent, across the bus as in process.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::{BufMut, Bytes, BytesMut};
use futures_util::StreamExt as _;
use futures_util::future::BoxFuture;
use futures_util::stream::FuturesUnordered;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::bus::{Bus, Call, LocalBus, Pending};
use crate::error::CallError;
use crate::session::{Protocol, Session, Transport as Net};

/// Why a transport could not carry a frame.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TransportError {
    /// The broker is unreachable or the connection is down (the frame was not sent).
    #[error("broker unavailable: {0}")]
    Unavailable(String),
    /// The frame is larger than the broker accepts (checked before sending).
    #[error("frame of {size} bytes exceeds the broker limit of {max} bytes")]
    TooLarge {
        /// Frame size.
        size: usize,
        /// Broker limit.
        max: usize,
    },
    /// The broker refused or failed the operation.
    #[error("broker error: {0}")]
    Broker(String),
}

impl From<TransportError> for CallError {
    fn from(e: TransportError) -> Self {
        match e {
            TransportError::TooLarge { size, max } => CallError::TooLarge { size, max },
            TransportError::Unavailable(s) | TransportError::Broker(s) => CallError::Unavailable(s),
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

    /// Receive the inbox of node `node`: resolves once the broker confirmed the subscription, then
    /// feeds each frame to `inbox` in arrival order (awaiting room: backpressure reaches the
    /// broker) until `stop` is cancelled, resubscribing after reconnects.
    fn serve(
        &self,
        node: &str,
        inbox: mpsc::Sender<Bytes>,
        stop: CancellationToken,
    ) -> BoxFuture<'_, Result<(), TransportError>>;

    /// Largest frame the broker carries.
    fn max_frame(&self) -> usize;

    /// Short name for logs and metrics (`nats`, `redis`, `amqp`).
    fn kind(&self) -> &'static str;
}

/// Frames start with this tag and a version byte, so a stray or hostile message on a node's inbox
/// is recognised and dropped before decoding.
const MAGIC: [u8; 2] = [b'W', 1];

/// A session as it crosses the bus.
#[derive(Debug, Serialize, Deserialize)]
struct WireSession {
    id: String,
    uid: Option<String>,
    settings: Map<String, Value>,
    remote: String,
    ws: bool,
    protocol: String,
    gate: String,
}

impl WireSession {
    fn from_session(s: &Session) -> Self {
        WireSession {
            id: s.id.to_string(),
            uid: s.uid.clone(),
            settings: s.settings.clone(),
            remote: s.remote.to_string(),
            ws: s.transport == Net::Ws,
            protocol: serde_json::to_value(s.protocol)
                .ok()
                .and_then(|v| v.as_str().map(str::to_owned))
                .unwrap_or_default(),
            gate: s.gate.to_string(),
        }
    }

    fn into_session(self) -> Option<Session> {
        let protocol = serde_json::from_value::<Protocol>(Value::String(self.protocol)).ok()?;
        Some(Session {
            id: self.id.into(),
            uid: self.uid,
            settings: self.settings,
            remote: self.remote.parse().ok()?,
            transport: if self.ws { Net::Ws } else { Net::Tcp },
            protocol,
            gate: self.gate.into(),
        })
    }
}

/// The envelope between nodes (MessagePack, after [`MAGIC`]). Short-lived: built, encoded and
/// dropped, so the size difference of its variants does not matter.
#[derive(Debug, Serialize, Deserialize)]
#[allow(clippy::large_enum_variant)]
enum Frame {
    /// A call for an instance of the receiving node.
    Call {
        /// Correlation id, unique per sending node.
        id: u64,
        /// Sending node (where the reply goes).
        from: String,
        instance: String,
        handler: String,
        session: Option<WireSession>,
        body: Bytes,
        /// Time left until the caller's deadline when sent (relative, so host clocks need not
        /// agree).
        timeout_ms: u64,
        /// Wall-clock send time, unix ms: a call that waited in a broker queue past its deadline
        /// (a list or queue of a node that was down) is dropped instead of run late.
        sent_ms: u64,
        reply: bool,
    },
    /// The result of a call made by the receiving node.
    Reply {
        id: u64,
        ok: Option<Bytes>,
        /// Error kind label and detail (see [`CallError::rebuild`]).
        err: Option<(String, String)>,
    },
}

/// Clock difference between hosts tolerated before a queued call counts as stale.
const STALE_GRACE_MS: u64 = 2_000;

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

fn encode(frame: &Frame) -> Result<Bytes, CallError> {
    let body = match frame {
        Frame::Call { body, .. } => body.len(),
        Frame::Reply { ok, .. } => ok.as_ref().map_or(0, Bytes::len),
    };
    let mut out = BytesMut::with_capacity(body + 192).writer();
    out.get_mut().put_slice(&MAGIC);
    rmp_serde::encode::write(&mut out, frame)
        .map_err(|e| CallError::BadRequest(format!("cannot encode call: {e}")))?;
    Ok(out.into_inner().freeze())
}

fn decode(bytes: &[u8]) -> Result<Frame, String> {
    let rest = bytes
        .strip_prefix(&MAGIC[..])
        .ok_or_else(|| "not a warren frame (bad magic or version)".to_owned())?;
    rmp_serde::from_slice(rest).map_err(|e| format!("malformed frame: {e}"))
}

/// A call this node runs, resolving to (caller node, call id, result).
type Running = std::pin::Pin<
    Box<dyn std::future::Future<Output = (String, u64, Result<Bytes, CallError>)> + Send>,
>;

struct Waiter {
    node: Arc<str>,
    deadline: Instant,
    tx: oneshot::Sender<Result<Bytes, CallError>>,
}

/// A [`Bus`] over a [`Transport`]: encodes calls, correlates replies, enforces deadlines, and fails
/// the calls of a node that leaves the registry at once instead of at their deadline.
pub struct RemoteBus {
    node: Arc<str>,
    transport: Arc<dyn Transport>,
    next_id: AtomicU64,
    waiting: Mutex<HashMap<u64, Waiter>>,
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
        Arc::new(RemoteBus {
            node: node.into(),
            transport,
            next_id: AtomicU64::new(1),
            waiting: Mutex::new(HashMap::new()),
        })
    }

    /// The transport's name.
    pub fn transport_kind(&self) -> &'static str {
        self.transport.kind()
    }

    fn waiting(&self) -> std::sync::MutexGuard<'_, HashMap<u64, Waiter>> {
        self.waiting.lock().unwrap_or_else(|e| e.into_inner())
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
                .filter(|(_, x)| !live.contains(&*x.node))
                .map(|(id, _)| *id)
                .collect();
            ids.iter().filter_map(|id| w.remove(id)).collect()
        };
        for x in lost {
            let _ = x.tx.send(Err(CallError::NodeLost(x.node.to_string())));
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
        let (tx, mut rx) = mpsc::channel::<Bytes>(1024);
        self.transport.serve(&self.node, tx, stop.clone()).await?;
        let bus = self.clone();
        let stop2 = stop.clone();
        tokio::spawn(async move {
            // results of the calls this node runs, awaited here rather than on a task each
            let mut running: FuturesUnordered<Running> = FuturesUnordered::new();
            loop {
                tokio::select! {
                    _ = stop2.cancelled() => break,
                    Some((from, id, r)) = running.next(), if !running.is_empty() => {
                        bus.answer(&from, id, true, r).await;
                    }
                    frame = rx.recv() => match frame {
                        Some(f) => bus.receive(&local, f, &mut running).await,
                        None => break,
                    },
                }
            }
        });
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

    async fn receive(
        self: &Arc<Self>,
        local: &Arc<LocalBus>,
        bytes: Bytes,
        running: &mut FuturesUnordered<Running>,
    ) {
        let frame = match decode(&bytes) {
            Ok(f) => f,
            Err(why) => {
                metrics::counter!("warren_bus_frames_refused_total", "transport" => self.transport.kind())
                    .increment(1);
                tracing::warn!(transport = self.transport.kind(), len = bytes.len(), %why, "dropped a frame from the bus");
                return;
            }
        };
        match frame {
            Frame::Reply { id, ok, err } => {
                let Some(w) = self.waiting().remove(&id) else {
                    tracing::debug!(
                        id,
                        "reply for a call that no longer waits (late or unknown)"
                    );
                    return;
                };
                let r = match (ok, err) {
                    (Some(b), None) => Ok(b),
                    (_, Some((label, detail))) => Err(CallError::rebuild(&label, detail)),
                    (None, None) => Ok(Bytes::new()),
                };
                let _ = w.tx.send(r);
            }
            Frame::Call {
                id,
                from,
                instance,
                handler,
                session,
                body,
                timeout_ms,
                sent_ms,
                reply,
            } => {
                let age = now_ms().saturating_sub(sent_ms);
                if age > timeout_ms.saturating_add(STALE_GRACE_MS) {
                    metrics::counter!("warren_bus_calls_expired_total").increment(1);
                    tracing::warn!(%from, %handler, age_ms = age, timeout_ms, "dropped a call that outlived its deadline in the broker");
                    return;
                }
                let session = match session {
                    None => None,
                    Some(ws) => match ws.into_session() {
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
                let call = Call {
                    instance: instance.as_str().into(),
                    handler: handler.into(),
                    session,
                    body,
                    deadline,
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
                        (from, id, r)
                    })),
                }
            }
        }
    }

    async fn answer(&self, to: &str, id: u64, reply: bool, r: Result<Bytes, CallError>) {
        if !reply {
            if let Err(e) = r {
                tracing::debug!(%to, error = %e, "call without reply failed");
            }
            return;
        }
        let frame = match r {
            Ok(b) => Frame::Reply {
                id,
                ok: Some(b),
                err: None,
            },
            Err(e) => Frame::Reply {
                id,
                ok: None,
                err: Some((e.kind().as_str().to_owned(), e.detail())),
            },
        };
        let Ok(mut bytes) = encode(&frame) else {
            return;
        };
        if bytes.len() > self.transport.max_frame() {
            let e = CallError::TooLarge {
                size: bytes.len(),
                max: self.transport.max_frame(),
            };
            let Ok(b) = encode(&Frame::Reply {
                id,
                ok: None,
                err: Some((e.kind().as_str().to_owned(), e.detail())),
            }) else {
                return;
            };
            bytes = b;
        }
        if let Err(e) = self.transport.send(to, bytes).await {
            tracing::warn!(%to, error = %e, "could not send a reply");
        }
    }

    async fn call(
        &self,
        node: &str,
        call: Call,
        reply: bool,
    ) -> Result<Option<Pending>, CallError> {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let timeout_ms = call
            .deadline
            .saturating_duration_since(Instant::now())
            .as_millis() as u64;
        let frame = Frame::Call {
            id,
            from: self.node.to_string(),
            instance: call.instance.to_string(),
            handler: call.handler.into(),
            session: call.session.as_deref().map(WireSession::from_session),
            body: call.body,
            timeout_ms,
            sent_ms: now_ms(),
            reply,
        };
        let bytes = encode(&frame)?;
        let max = self.transport.max_frame();
        if bytes.len() > max {
            return Err(CallError::TooLarge {
                size: bytes.len(),
                max,
            });
        }
        let rx = if reply {
            let (tx, rx) = oneshot::channel();
            self.waiting().insert(
                id,
                Waiter {
                    node: node.into(),
                    deadline: call.deadline,
                    tx,
                },
            );
            Some(rx)
        } else {
            None
        };
        if let Err(e) = self.transport.send(node, bytes).await {
            self.waiting().remove(&id);
            metrics::counter!("warren_bus_send_errors_total", "transport" => self.transport.kind())
                .increment(1);
            return Err(e.into());
        }
        Ok(rx.map(Pending::Local))
    }
}

impl Bus for RemoteBus {
    fn send(
        &self,
        node: &str,
        call: Call,
        reply: bool,
    ) -> BoxFuture<'_, Result<Option<Pending>, CallError>> {
        let node = node.to_owned();
        Box::pin(async move { self.call(&node, call, reply).await })
    }

    fn kind(&self) -> &'static str {
        self.transport.kind()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_round_trip_and_garbage_is_refused() {
        let s = Session {
            id: "sid".into(),
            uid: Some("alice".into()),
            settings: Map::new(),
            remote: "127.0.0.1:5".parse().expect("addr"),
            transport: Net::Ws,
            protocol: Protocol::Pomelo,
            gate: "Gate001".into(),
        };
        let f = Frame::Call {
            id: 7,
            from: "n1".into(),
            instance: "Chat001".into(),
            handler: "HD_Say".into(),
            session: Some(WireSession::from_session(&s)),
            body: Bytes::from_static(b"{}"),
            timeout_ms: 5000,
            sent_ms: now_ms(),
            reply: true,
        };
        let b = encode(&f).expect("encode");
        match decode(&b).expect("decode") {
            Frame::Call { session, body, .. } => {
                assert_eq!(session.and_then(WireSession::into_session), Some(s));
                assert_eq!(&body[..], b"{}");
            }
            Frame::Reply { .. } => panic!("wrong frame"),
        }
        assert!(decode(b"hello").is_err());
        assert!(decode(&b[..b.len() - 1]).is_err());
        assert!(decode(&[b'W', 1, 0xc1]).is_err());
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

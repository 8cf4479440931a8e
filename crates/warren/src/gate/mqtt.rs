//! One MQTT connection, from CONNECT to close (PROTOCOLS.md §1).
//!
//! The reader (this task) owns the session state: it decodes packets, answers the protocol
//! (CONNACK, PUBACK, PUBREC/PUBCOMP, SUBACK, UNSUBACK, PINGRESP), routes publishes to modules or
//! to subscribers, and turns handler results into replies. A writer task owns the socket's write
//! half and drains the session's bounded outbound queue, coalescing everything queued into one
//! write. Handlers push into the same queue, so a handler's pushes precede its reply.
//!
//! The same code serves both modes: `default` (MQTT 3.1.1 as specified, client-id takeover,
//! plain publish/subscribe between clients) and `mqant` (the mqant gate's behaviour).

use std::collections::HashSet;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context as TaskContext, Poll};
use std::time::Duration;

use bytes::{BufMut, Bytes, BytesMut};
use futures_util::StreamExt;
use futures_util::stream::FuturesUnordered;
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;
use warren_proto::mqtt::{self, Packet, Publish, QoS};

use super::transport::{Reader, Writer};
use super::{AuthRefusal, ConnectInfo, Gate};
use crate::bus::Pending;
use crate::config::{ListenerConfig, Mode};
use crate::error::CallError;
use crate::route::Route;
use crate::session::{InlineFrame, Outbound, Protocol, Session, SessionHandle};

/// Most QoS 2 publishes a client may leave unreleased (PUBREL not yet sent).
const MAX_AWAITING_REL: usize = 1024;

/// Serve one connection until it closes.
pub(crate) async fn serve(
    gate: Arc<Gate>,
    cfg: Arc<ListenerConfig>,
    reader: Reader,
    writer: Writer,
    peer: SocketAddr,
) {
    let span =
        tracing::info_span!("conn", node = %gate.node.id(), %peer, session = tracing::field::Empty);
    metrics::counter!("warren_connections_total").increment(1);
    run(gate, cfg, reader, writer, peer).instrument(span).await;
}

/// Why a connection ends, for the log line.
enum End {
    PeerClosed,
    Disconnect,
    Refused(String),
    ServerClosed,
    Drained,
}

async fn run(
    gate: Arc<Gate>,
    cfg: Arc<ListenerConfig>,
    mut reader: Reader,
    mut writer: Writer,
    peer: SocketAddr,
) {
    let mqant = cfg.mode == Mode::Mqant;
    let max_packet = cfg.max_packet();
    let max_inflight = cfg.max_inflight.max(1);
    let mut buf = BytesMut::new();

    // 1. The first packet must be CONNECT, within the connect deadline.
    let first = tokio::select! {
        biased;
        _ = gate.killing.cancelled() => return,
        r = tokio::time::timeout(
            Duration::from_secs(cfg.connect_timeout_s),
            read_packet(&mut reader, &mut buf, max_packet),
        ) => r,
    };
    let connect = match first {
        Err(_) => {
            return refuse(
                &peer,
                "no CONNECT before the connect deadline",
                "connect_timeout",
            );
        }
        Ok(Err(ReadError::Closed)) => return,
        Ok(Err(ReadError::Io(e))) => return refuse(&peer, &format!("read failed: {e}"), "io"),
        Ok(Err(ReadError::Decode(mqtt::DecodeError::UnsupportedProtocol { name, level }))) => {
            let mut out = BytesMut::with_capacity(4);
            mqtt::encode(
                &Packet::ConnAck(mqtt::ConnAck {
                    session_present: false,
                    code: 1,
                }),
                &mut out,
            );
            let _ = tokio::time::timeout(
                Duration::from_secs(cfg.write_timeout_s),
                writer.write(&mut out),
            )
            .await;
            writer.close().await;
            return refuse(
                &peer,
                &format!("unacceptable protocol {name:?} level {level}"),
                "connack_refused",
            );
        }
        Ok(Err(ReadError::Decode(e))) => {
            return refuse(&peer, &format!("malformed packet: {e}"), e.kind());
        }
        Ok(Ok(Packet::Connect(c))) => c,
        Ok(Ok(p)) => {
            return refuse(
                &peer,
                &format!("first packet is {} instead of CONNECT", p.name()),
                "not_connect",
            );
        }
    };

    // 2. Check protocol, client id, credentials; answer CONNACK.
    let known_protocol = matches!(
        (connect.protocol_name.as_str(), connect.protocol_level),
        ("MQIsdp", 3) | ("MQTT", 4)
    );
    let mut code = 0u8;
    if !known_protocol {
        code = 1;
    } else if connect.client_id.is_empty() {
        if mqant || connect.protocol_level == 3 || !connect.clean_session {
            code = 2;
        }
    } else if (mqant || connect.protocol_level == 3) && connect.client_id.len() > 23 {
        code = 2;
    }
    if code == 0
        && let Some(auth) = &gate.auth
    {
        let info = ConnectInfo {
            peer,
            client_id: connect.client_id.clone(),
            username: connect.username.clone(),
            password: connect.password.clone(),
        };
        code = match auth.check(&info).await {
            Ok(()) => 0,
            Err(AuthRefusal::BadCredentials) => 4,
            Err(AuthRefusal::NotAuthorized) => 5,
        };
    }
    if code != 0 {
        let mut out = BytesMut::with_capacity(4);
        mqtt::encode(
            &Packet::ConnAck(mqtt::ConnAck {
                session_present: false,
                code,
            }),
            &mut out,
        );
        let _ = tokio::time::timeout(
            Duration::from_secs(cfg.write_timeout_s),
            writer.write(&mut out),
        )
        .await;
        writer.close().await;
        let why = match code {
            1 => format!(
                "unacceptable protocol {:?} level {}",
                connect.protocol_name, connect.protocol_level
            ),
            2 => format!("client id of {} bytes refused", connect.client_id.len()),
            _ => "credentials refused".to_owned(),
        };
        return refuse(&peer, &why, "connack_refused");
    }
    let client_id = if connect.client_id.is_empty() {
        format!("auto-{}", uuid::Uuid::new_v4())
    } else {
        connect.client_id.clone()
    };

    // 3. The session.
    let (tx, rx) = mpsc::channel(cfg.write_queue);
    let close = gate.killing.child_token();
    let node = gate.node.clone();
    let session = Session {
        id: uuid::Uuid::new_v4().to_string().into(),
        uid: None,
        settings: Default::default(),
        remote: peer,
        transport: cfg.transport.into(),
        protocol: Protocol::Mqtt,
        gate: node.session_table().gate_id().clone(),
    };
    tracing::Span::current().record("session", tracing::field::display(&session.id));
    let handle = SessionHandle::new(session, tx.clone(), close.clone());
    node.session_table().insert(handle.clone());
    if !mqant && let Some(old) = gate.claim_client_id(&client_id, &handle) {
        let s = old.snapshot();
        tracing::info!(client_id = %client_id, old_session = %s.id, old_peer = %s.remote, "client id taken over; closing the older connection");
        old.close();
    }
    let _ = tx
        .send(Outbound::Inline(InlineFrame::new(&[
            0x20, 0x02, 0x00, 0x00,
        ])))
        .await;
    tracing::debug!(client_id = %client_id, keep_alive = connect.keep_alive, level = connect.protocol_level, "connected");

    let write_task = tokio::spawn(
        write_loop(
            writer,
            rx,
            close.clone(),
            cfg.push_qos,
            Duration::from_secs(cfg.write_timeout_s),
        )
        .instrument(tracing::Span::current()),
    );

    // Keepalive: mqant re-arms floor(1.5 × keepalive) + 1 s before each read; MQTT 3.1.1 allows
    // 1.5 × keepalive. Keepalive 0 falls back to the listener's idle timeout.
    let read_timeout = match (connect.keep_alive, mqant) {
        (0, true) => cfg
            .idle_timeout()
            .map(|d| Duration::from_secs(d.as_secs() * 3 / 2 + 1)),
        (0, false) => cfg.idle_timeout(),
        (k, true) => Some(Duration::from_secs(u64::from(k) * 3 / 2 + 1)),
        (k, false) => Some(Duration::from_millis(u64::from(k) * 1500)),
    };

    let mut conn = Conn {
        gate: gate.clone(),
        cfg: cfg.clone(),
        handle: handle.clone(),
        tx,
        peer,
        mqant,
        awaiting_rel: HashSet::new(),
        filters: Vec::new(),
        pending: FuturesUnordered::new(),
    };
    let far = Instant::now() + Duration::from_secs(86400 * 365);
    let deadline = tokio::time::sleep_until(read_timeout.map_or(far, |d| Instant::now() + d));
    tokio::pin!(deadline);
    let mut draining = false;

    // 4. The read loop.
    let end = loop {
        if draining && conn.pending.is_empty() {
            break End::Drained;
        }
        // Handle the complete packets already buffered (CONNECT may have arrived with more),
        // while fewer than `max_inflight` requests await their replies.
        if !draining {
            let (handled, outcome) = conn
                .handle_buffered(&mut buf, max_packet, max_inflight)
                .await;
            if let Some(end) = outcome {
                break end;
            }
            if handled && let Some(d) = read_timeout {
                deadline.as_mut().reset(Instant::now() + d);
            }
            if buf.is_empty() && buf.capacity() > 16 * 1024 {
                buf = BytesMut::new();
            }
        }
        tokio::select! {
            biased;
            _ = close.cancelled() => break End::ServerClosed,
            _ = gate.draining.cancelled(), if !draining => { draining = true; }
            Some((topic, result)) = conn.pending.next(), if !conn.pending.is_empty() => {
                match topic {
                    Some(topic) => {
                        if conn.reply(topic, result).await.is_err() {
                            break End::ServerClosed;
                        }
                    }
                    None => {
                        if let Err(e) = result {
                            tracing::debug!(error = %e, "request without msgid failed");
                        }
                    }
                }
            }
            _ = &mut deadline, if !draining => {
                break End::Refused(format!("keepalive expired: nothing received for {:?}", read_timeout.unwrap_or_default()));
            }
            r = reader.read(&mut buf), if !draining && conn.pending.len() < max_inflight => {
                match r {
                    Ok(0) => break End::PeerClosed,
                    Ok(_) => {}
                    Err(e) => break End::Refused(format!("read failed: {e}")),
                }
                if buf.is_empty() && buf.capacity() > 16 * 1024 {
                    buf = BytesMut::new();
                }
            }
        }
    };

    // 5. Close: log why, clean up, tell the modules, let the writer flush.
    match &end {
        End::Refused(why) => {
            tracing::warn!(%peer, reason = %why, "closing connection");
            metrics::counter!("warren_connections_refused_total", "reason" => "protocol")
                .increment(1);
        }
        End::PeerClosed => tracing::debug!("peer closed"),
        End::Disconnect => tracing::debug!("client sent DISCONNECT"),
        End::ServerClosed => tracing::debug!("closed by the server"),
        End::Drained => tracing::debug!("drained"),
    }
    let sid = handle.id();
    node.session_table().remove(sid);
    node.groups().remove_everywhere(&handle);
    for f in &conn.filters {
        node.subscriptions().unsubscribe(f, sid);
    }
    if !mqant {
        gate.release_client_id(&client_id, &handle);
    }
    let last = handle.snapshot();
    let flush = matches!(end, End::Drained | End::ServerClosed | End::Refused(_));
    if flush {
        let _ = conn.tx.try_send(Outbound::Close);
    } else {
        close.cancel();
    }
    drop(conn);
    drop(handle);
    let mut write_task = write_task;
    if tokio::time::timeout(Duration::from_secs(cfg.write_timeout_s), &mut write_task)
        .await
        .is_err()
    {
        close.cancel();
        let _ = write_task.await;
    }
    close.cancel();
    node.session_closed(last).await;
}

fn refuse(peer: &SocketAddr, why: &str, kind: &'static str) {
    tracing::warn!(%peer, reason = %why, "closing connection");
    metrics::counter!("warren_connections_refused_total", "reason" => kind).increment(1);
}

enum ReadError {
    Closed,
    Io(std::io::Error),
    Decode(mqtt::DecodeError),
}

async fn read_packet(
    reader: &mut Reader,
    buf: &mut BytesMut,
    max_packet: usize,
) -> Result<Packet, ReadError> {
    loop {
        match mqtt::decode(buf, max_packet) {
            Ok(Some(p)) => return Ok(p),
            Ok(None) => {}
            Err(e) => return Err(ReadError::Decode(e)),
        }
        match reader.read(buf).await {
            Ok(0) => return Err(ReadError::Closed),
            Ok(_) => {}
            Err(e) => return Err(ReadError::Io(e)),
        }
    }
}

/// A reply on its way back: the request topic (`None` when the client wants no reply) and the
/// pending result.
struct ReplyFuture {
    topic: Option<Bytes>,
    pending: Pending,
}

impl Future for ReplyFuture {
    type Output = (Option<Bytes>, Result<Bytes, CallError>);
    fn poll(mut self: Pin<&mut Self>, cx: &mut TaskContext<'_>) -> Poll<Self::Output> {
        match self.pending.as_mut().poll(cx) {
            Poll::Pending => Poll::Pending,
            Poll::Ready(r) => Poll::Ready((self.topic.take(), r)),
        }
    }
}

/// The reader's state for one connection.
struct Conn {
    gate: Arc<Gate>,
    cfg: Arc<ListenerConfig>,
    handle: Arc<SessionHandle>,
    tx: mpsc::Sender<Outbound>,
    peer: SocketAddr,
    mqant: bool,
    awaiting_rel: HashSet<u16>,
    filters: Vec<String>,
    pending: FuturesUnordered<ReplyFuture>,
}

impl Conn {
    /// Decode and handle buffered packets until the buffer holds no complete packet or the
    /// in-flight limit is reached. Returns whether any packet was handled, and why to close.
    async fn handle_buffered(
        &mut self,
        buf: &mut BytesMut,
        max_packet: usize,
        max_inflight: usize,
    ) -> (bool, Option<End>) {
        let mut handled = false;
        while self.pending.len() < max_inflight {
            match mqtt::decode(buf, max_packet) {
                Ok(None) => break,
                Ok(Some(p)) => {
                    handled = true;
                    if let Err(end) = self.handle(p).await {
                        return (handled, Some(end));
                    }
                }
                Err(e) => {
                    metrics::counter!("warren_decode_errors_total", "kind" => e.kind())
                        .increment(1);
                    return (
                        handled,
                        Some(End::Refused(format!("malformed packet: {e}"))),
                    );
                }
            }
        }
        (handled, None)
    }

    async fn send(&mut self, o: Outbound) -> Result<(), End> {
        self.tx.send(o).await.map_err(|_| End::ServerClosed)
    }

    async fn ack(&mut self, bytes: [u8; 4]) -> Result<(), End> {
        self.send(Outbound::Inline(InlineFrame::new(&bytes))).await
    }

    async fn handle(&mut self, p: Packet) -> Result<(), End> {
        match p {
            Packet::Publish(p) => self.publish(p).await,
            Packet::PubRel(id) => {
                self.awaiting_rel.remove(&id);
                let [h, l] = id.to_be_bytes();
                self.ack([0x70, 0x02, h, l]).await
            }
            Packet::PubAck(_) | Packet::PubComp(_) => {
                metrics::counter!("warren_push_acks_total").increment(1);
                Ok(())
            }
            Packet::PubRec(id) => {
                let [h, l] = id.to_be_bytes();
                self.ack([0x62, 0x02, h, l]).await
            }
            Packet::Subscribe(s) => self.subscribe(s).await,
            Packet::Unsubscribe(u) => {
                for f in &u.filters {
                    if !self.mqant {
                        self.gate
                            .node
                            .subscriptions()
                            .unsubscribe(f, self.handle.id());
                    }
                    self.filters.retain(|x| x != f);
                }
                let [h, l] = u.pkid.to_be_bytes();
                self.ack([0xb0, 0x02, h, l]).await
            }
            Packet::PingReq => {
                self.send(Outbound::Inline(InlineFrame::new(mqtt::pingresp_bytes(
                    self.cfg.pingresp_d2,
                ))))
                .await
            }
            Packet::Disconnect => Err(End::Disconnect),
            Packet::Connect(_) => Err(End::Refused("second CONNECT on one connection".into())),
            other => Err(End::Refused(format!(
                "unexpected {} from a client",
                other.name()
            ))),
        }
    }

    async fn subscribe(&mut self, s: mqtt::Subscribe) -> Result<(), End> {
        let mut codes = Vec::with_capacity(s.filters.len());
        for f in &s.filters {
            if !mqtt::topic::valid_filter(&f.filter) {
                codes.push(0x80);
                continue;
            }
            let granted = f.qos.as_u8().min(1);
            if !self.mqant {
                self.gate
                    .node
                    .subscriptions()
                    .subscribe(&f.filter, &self.handle, granted);
            }
            if !self.filters.contains(&f.filter) {
                self.filters.push(f.filter.clone());
            }
            codes.push(granted);
        }
        let mut out = BytesMut::with_capacity(4 + codes.len());
        mqtt::encode(
            &Packet::SubAck(mqtt::SubAck {
                pkid: s.pkid,
                return_codes: codes,
            }),
            &mut out,
        );
        self.send(Outbound::Bytes(out.freeze())).await
    }

    async fn publish(&mut self, p: Publish) -> Result<(), End> {
        let [h, l] = p.pkid.to_be_bytes();
        match p.qos {
            QoS::AtMostOnce => {}
            QoS::AtLeastOnce => self.ack([0x40, 0x02, h, l]).await?,
            QoS::ExactlyOnce => {
                let resend = self.awaiting_rel.contains(&p.pkid);
                if !resend {
                    if self.awaiting_rel.len() >= MAX_AWAITING_REL {
                        return Err(End::Refused(format!(
                            "more than {MAX_AWAITING_REL} QoS 2 publishes awaiting PUBREL"
                        )));
                    }
                    self.awaiting_rel.insert(p.pkid);
                }
                self.ack([0x50, 0x02, h, l]).await?;
                if resend {
                    return Ok(());
                }
            }
        }
        metrics::counter!("warren_publishes_received_total").increment(1);
        self.route(p).await
    }

    /// Route a publish: to a module handler, or (default mode) to subscribers.
    async fn route(&mut self, p: Publish) -> Result<(), End> {
        let node = self.gate.node.clone();
        let topic = p.topic_str();
        let module = Route::module_of(topic);
        let is_module = node.router().has_module(module);
        if !self.mqant && !is_module {
            if self.cfg.pubsub {
                node.subscriptions().publish(
                    topic,
                    p.qos.as_u8(),
                    p.topic.clone(),
                    p.payload.clone(),
                );
            } else {
                tracing::debug!(
                    topic,
                    "publish to a topic that names no module; pub/sub is off"
                );
            }
            return Ok(());
        }
        let route = match Route::parse(topic) {
            Ok(r) => r,
            Err(e) => {
                tracing::info!(peer = %self.peer, reason = %e, "dropping publish");
                metrics::counter!("warren_requests_refused_total", "reason" => "bad_route")
                    .increment(1);
                return Ok(());
            }
        };
        let wants_reply = route.msgid.is_some();
        match self.check(&route, &p.payload) {
            Err(e) => {
                metrics::counter!("warren_requests_refused_total", "reason" => e.kind().as_str())
                    .increment(1);
                tracing::info!(peer = %self.peer, route = %route, reason = %e, "refusing request");
                if wants_reply {
                    return self.reply(p.topic.clone(), Err(e)).await;
                }
                Ok(())
            }
            Ok(target) => {
                let deadline = Instant::now() + self.cfg.rpc_expired();
                let sent = node
                    .router()
                    .send(
                        &target,
                        route.handler,
                        Some(self.handle.snapshot()),
                        p.payload.clone(),
                        deadline,
                        wants_reply,
                    )
                    .await;
                match sent {
                    Ok(Some(pending)) => {
                        self.pending.push(ReplyFuture {
                            topic: Some(p.topic.clone()),
                            pending,
                        });
                        Ok(())
                    }
                    Ok(None) => Ok(()),
                    Err(e) if wants_reply => self.reply(p.topic.clone(), Err(e)).await,
                    Err(e) => {
                        tracing::debug!(route = %route, error = %e, "call without reply failed");
                        Ok(())
                    }
                }
            }
        }
    }

    /// The gate-side checks, in the order that decides which error wins (PROTOCOLS.md §1.5).
    fn check(&self, route: &Route<'_>, body: &[u8]) -> Result<crate::router::Target, CallError> {
        if self.mqant && !is_json_object(body) {
            return Err(CallError::BodyNotJson);
        }
        let snapshot = self.handle.snapshot();
        let target =
            self.gate
                .node
                .router()
                .resolve(route.module, route.target, snapshot.hash_key())?;
        let by_prefix = self.mqant
            && self
                .cfg
                .handler_prefixes
                .iter()
                .any(|p| !p.is_empty() && route.handler.starts_with(p.as_str()));
        if !by_prefix && !target.is_client_handler(route.handler) {
            let prefix = self
                .cfg
                .handler_prefixes
                .first()
                .cloned()
                .unwrap_or_default();
            return Err(CallError::NotClientVisible {
                handler: route.handler.to_owned(),
                prefix,
            });
        }
        Ok(target)
    }

    /// Queue a reply `{"Error":…,"Result":…}` on the request topic.
    async fn reply(&mut self, topic: Bytes, result: Result<Bytes, CallError>) -> Result<(), End> {
        let body = envelope(result);
        self.send(Outbound::Message {
            msg: crate::session::Message::new(topic, body),
            qos: None,
        })
        .await
    }
}

/// The mqant reply envelope. `Result` bytes are inserted as they are (handlers return JSON).
pub fn envelope(result: Result<Bytes, CallError>) -> Bytes {
    let mut out = BytesMut::new();
    match result {
        Ok(r) => {
            let r: &[u8] = if r.is_empty() { b"null" } else { &r };
            out.reserve(22 + r.len());
            out.put_slice(b"{\"Error\":\"\",\"Result\":");
            out.put_slice(r);
            out.put_u8(b'}');
        }
        Err(e) => {
            let text = serde_json::to_string(&e.to_string()).unwrap_or_else(|_| "\"error\"".into());
            out.put_slice(b"{\"Error\":");
            out.put_slice(text.as_bytes());
            out.put_slice(b",\"Result\":null}");
        }
    }
    out.freeze()
}

fn is_json_object(body: &[u8]) -> bool {
    body.iter().find(|b| !b.is_ascii_whitespace()) == Some(&b'{')
        && serde_json::from_slice::<serde::de::IgnoredAny>(body).is_ok()
}

/// Drain the outbound queue into the socket: everything queued goes out in one write.
async fn write_loop(
    mut w: Writer,
    mut rx: mpsc::Receiver<Outbound>,
    close: CancellationToken,
    push_qos: u8,
    write_timeout: Duration,
) {
    let mut buf = BytesMut::new();
    let mut pkid: u16 = 0;
    'outer: loop {
        let first = tokio::select! {
            biased;
            _ = close.cancelled() => break,
            o = rx.recv() => o,
        };
        let Some(mut item) = first else { break };
        let mut closing = false;
        loop {
            match item {
                Outbound::Message { msg, qos } => {
                    let q = qos.unwrap_or(push_qos);
                    let qos = if q >= 1 {
                        QoS::AtLeastOnce
                    } else {
                        QoS::AtMostOnce
                    };
                    let id = if q >= 1 {
                        pkid = if pkid == u16::MAX { 1 } else { pkid + 1 };
                        pkid
                    } else {
                        0
                    };
                    mqtt::encode_publish(&mut buf, &msg.topic, qos, false, false, id, &msg.body);
                }
                Outbound::Inline(f) => buf.extend_from_slice(f.as_bytes()),
                Outbound::Bytes(b) => buf.extend_from_slice(&b),
                Outbound::Close => {
                    closing = true;
                    break;
                }
            }
            if buf.len() >= 64 * 1024 {
                break;
            }
            match rx.try_recv() {
                Ok(next) => item = next,
                Err(_) => break,
            }
        }
        if !buf.is_empty() {
            metrics::counter!("warren_socket_writes_total").increment(1);
            match tokio::time::timeout(write_timeout, w.write(&mut buf)).await {
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
            if buf.capacity() > 64 * 1024 {
                buf = BytesMut::new();
            }
        }
        if closing {
            break;
        }
    }
    close.cancel();
    w.close().await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn envelopes_match_the_vectors() {
        assert_eq!(
            &envelope(Ok(Bytes::from_static(b"\"login success alice\"")))[..],
            br#"{"Error":"","Result":"login success alice"}"#
        );
        assert_eq!(
            &envelope(Err(CallError::BodyNotJson))[..],
            br#"{"Error":"body must be JSON format","Result":null}"#
        );
    }

    #[test]
    fn json_object_check() {
        assert!(is_json_object(b" {\"a\":1}"));
        assert!(!is_json_object(b"[1]"));
        assert!(!is_json_object(b"x"));
        assert!(!is_json_object(b"{"));
    }
}

//! MQTT 3.1.1 / 3.1 connections (docs/protocols/mqtt.md).
//!
//! [`serve`] reads CONNECT (deadline, protocol, client id, auth hook), answers CONNACK, opens the
//! session and hands the connection to the shared read loop ([`conn::run`]) with an
//! [`MqttSession`]: it answers the protocol (PUBACK, PUBREC/PUBCOMP, SUBACK, UNSUBACK, PINGRESP),
//! routes publishes to modules or to subscribers, and turns results into replies on the request
//! topic. [`MqttFramer`] frames pushes and replies with the connection's QoS and packet ids.
//!
//! The same code serves both modes: `default` (MQTT 3.1.1 as specified, client-id takeover,
//! plain publish/subscribe between clients) and `mqant` (the mqant gate's behaviour).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::{BufMut, Bytes, BytesMut};
use warren_proto::mqtt::{self, Ack, Packet, Publish, QoS};

use super::conn::{self, End, Framer, Out, SessionConn};
use super::io::{Reader, Writer};
use super::{Credentials, Gate, Identity, mqtt_broker, mqtt_will};
use crate::acl::{Acl, ClientAcl};
use crate::config::{LimitsConfig, ListenerConfig, Mode, MqttOptions};
use crate::error::CallError;
use crate::fanout::Subscriber;
use crate::mqtt_session::{MAX_AWAITING_REL, MqttState, SessionLimits};
use crate::refusal;
use crate::route::Route;
use crate::session::{InlineFrame, Message, Outbound, Protocol};

/// Serve one connection until it closes. (An `async move` block: an `async fn` would keep a
/// second copy of its arguments for the connection's whole life.)
#[allow(clippy::manual_async_fn)]
pub(crate) fn serve(
    gate: Arc<Gate>,
    cfg: Arc<ListenerConfig>,
    reader: Reader,
    writer: Writer,
    peer: SocketAddr,
) -> impl std::future::Future<Output = ()> + Send {
    async move {
        // two phases in two allocations: the CONNECT exchange is freed once the session runs,
        // so an idle connection's task holds only the session's state
        let Some(session) = boxed_handshake(gate, cfg, reader, writer, peer).await else {
            return;
        };
        boxed_session(session).await;
    }
}

/// The handshake's future, boxed. Built by a plain function: a future built inside an `async`
/// block and then boxed still takes its full size in that block's state.
fn boxed_handshake(
    gate: Arc<Gate>,
    cfg: Arc<ListenerConfig>,
    reader: Reader,
    writer: Writer,
    peer: SocketAddr,
) -> std::pin::Pin<Box<impl std::future::Future<Output = Option<Established>> + Send>> {
    Box::pin(handshake(gate, cfg, reader, writer, peer))
}

/// The session's future, boxed (as [`boxed_handshake`]).
fn boxed_session(
    (proto, conn, reader, buf): Established,
) -> std::pin::Pin<Box<impl std::future::Future<Output = ()> + Send>> {
    Box::pin(conn::serve_session(proto, conn, reader, buf))
}

/// What a completed handshake hands to the session: its MQTT state, the connection, the reading
/// side and what was read past CONNECT.
type Established = (MqttSession, Conn, Reader, BytesMut);

fn refuse(peer: &SocketAddr, why: &str, kind: &'static str) {
    refusal::refuse(peer, kind, why);
    metrics::counter!("warren_connections_refused_total", "reason" => kind).increment(1);
}

async fn connack_and_close(writer: &mut Writer, cfg: &ListenerConfig, code: u8) {
    let _ = tokio::time::timeout(
        Duration::from_secs(cfg.write_timeout_s),
        writer.write_raw(&mqtt::connack_bytes(false, code)),
    )
    .await;
    let ws_code = match code {
        1 => conn::close_code::PROTOCOL_ERROR,
        _ => conn::close_code::POLICY,
    };
    close_with(writer, cfg, ws_code).await;
}

/// Close before a session exists: over WebSocket, a close frame with `code` (within the write
/// deadline: a peer that does not read cannot hold the goodbye).
async fn close_with(writer: &mut Writer, cfg: &ListenerConfig, code: u16) {
    let wait = Duration::from_secs(cfg.write_timeout_s);
    let _ = tokio::time::timeout(wait, writer.close(Some(code))).await;
}

/// CONNECT, checks, CONNACK: returns the opened session, or `None` when the client was refused.
async fn handshake(
    gate: Arc<Gate>,
    cfg: Arc<ListenerConfig>,
    mut reader: Reader,
    mut writer: Writer,
    peer: SocketAddr,
) -> Option<Established> {
    let Some(
        opts @ &MqttOptions {
            mode,
            push_qos,
            pingresp_d2,
            pubsub,
            ..
        },
    ) = cfg.protocol.mqtt()
    else {
        // gate/listener.rs sends only MQTT listeners' connections here
        return None;
    };
    let mqant = mode == Mode::Mqant;
    let max_packet = opts.max_packet();
    let mut buf = BytesMut::new();

    // 1. The first packet must be CONNECT, within the connect deadline.
    let first = tokio::select! {
        biased;
        _ = gate.killing.cancelled() => return None,
        r = tokio::time::timeout(
            Duration::from_secs(cfg.connect_timeout_s),
            read_packet(&mut reader, &mut buf, max_packet),
        ) => r,
    };
    let connect = match first {
        Err(_) => {
            refuse(
                &peer,
                "no CONNECT before the connect deadline",
                "connect_timeout",
            );
            close_with(&mut writer, &cfg, conn::close_code::POLICY).await;
            return None;
        }
        Ok(Err(ReadError::Closed)) => return None,
        Ok(Err(ReadError::Io(e))) => {
            refuse(&peer, &format!("read failed: {e}"), "io");
            close_with(&mut writer, &cfg, conn::read_error(&e).close_code()).await;
            return None;
        }
        Ok(Err(ReadError::Decode(mqtt::DecodeError::UnsupportedProtocol { name, level }))) => {
            connack_and_close(&mut writer, &cfg, 1).await;
            let why = format!("unacceptable protocol {name:?} level {level}");
            refuse(&peer, &why, "connack_refused");
            return None;
        }
        Ok(Err(ReadError::Decode(e))) => {
            refuse(&peer, &format!("malformed packet: {e}"), e.kind());
            let code = match e {
                mqtt::DecodeError::PacketTooLarge { .. } => conn::close_code::TOO_BIG,
                _ => conn::close_code::PROTOCOL_ERROR,
            };
            close_with(&mut writer, &cfg, code).await;
            return None;
        }
        Ok(Ok(Packet::Connect(c))) => c,
        Ok(Ok(p)) => {
            let why = format!("first packet is {} instead of CONNECT", p.name());
            refuse(&peer, &why, "not_connect");
            close_with(&mut writer, &cfg, conn::close_code::PROTOCOL_ERROR).await;
            return None;
        }
    };

    // 2. Check the client id and credentials; answer CONNACK.
    let v31 = connect.protocol_level == 3;
    let mut code = 0u8;
    if connect.client_id.is_empty() {
        if mqant || v31 || !connect.clean_session {
            code = 2;
        }
    } else if (mqant || v31) && connect.client_id.len() > 23 {
        code = 2;
    }
    if code != 0 {
        connack_and_close(&mut writer, &cfg, code).await;
        let why = format!("client id of {} bytes refused", connect.client_id.len());
        refuse(&peer, &why, "connack_refused");
        return None;
    }
    // the node's credential checks (logged and counted by the gate): CONNACK 4, 5 or 3
    let creds = Credentials {
        peer,
        protocol: Protocol::Mqtt,
        client_id: connect.client_id.clone(),
        username: connect.username.clone(),
        password: connect.password.clone(),
    };
    let identity: Option<Identity> = match gate.authenticate(&cfg, &creds).await {
        Ok(id) => id,
        Err(refusal) => {
            connack_and_close(&mut writer, &cfg, refusal.connack_code()).await;
            return None;
        }
    };
    drop(creds);
    let client_id = if connect.client_id.is_empty() {
        format!("auto-{}", uuid::Uuid::new_v4())
    } else {
        connect.client_id.clone()
    };
    // default mode: the will is checked now, as a publish to its topic (CONNACK 5 if refused)
    let will = match connect.will.clone().filter(|_| !mqant) {
        None => None,
        Some(w) => {
            let user = connect.username.as_deref();
            match mqtt_will::accept(&gate, w, identity.as_ref(), user, &client_id) {
                Ok(w) => Some(w),
                Err((kind, why)) => {
                    refusal::refuse(&peer, kind, why);
                    connack_and_close(&mut writer, &cfg, 5).await;
                    return None;
                }
            }
        }
    };

    // the name topic ACLs apply to: the verified uid, else (as mosquitto) the CONNECT user name
    let user: Option<Arc<str>> = match &identity {
        Some(id) => Some(Arc::from(id.uid.as_str())),
        None => connect.username.as_deref().map(Arc::from),
    };
    // a token naming its topics limits the client to them (default mode), on top of acl_file
    let token_acl = match identity.as_ref().and_then(|i| i.topics.as_deref()) {
        Some(topics) if !mqant => Some(Box::new(ClientAcl::only(topics))),
        _ => None,
    };

    // 3. The MQTT session state (docs/protocols/mqtt.md, "Sessions and QoS"): clean_session = 1
    //    discards a stored one, clean_session = 0 resumes it (session present) or stores a new one.
    //    In a cluster of several gates the others are asked first ("Across gates"): they close
    //    a connection of the client id and discard its session, or hand it over to this gate.
    let uid = identity.as_ref().map(|i| i.uid.as_str());
    let limits = SessionLimits::from_config(&gate.limits);
    let (state, present) = if mqant {
        (MqttState::new(&client_id, uid, false, limits), false)
    } else {
        gate.broker.know_gate(&gate);
        // asked only in a cluster of several gates: a lone gate pays nothing here
        let clean = connect.clean_session;
        let mut take = false;
        let taken = mqtt_broker::take_from_other_gates(&gate, &client_id, uid, || {
            take = !clean && !gate.node.subscriptions().sessions().holds(&client_id);
            take
        })
        .await;
        let resolved = match taken {
            Some(mqtt_broker::Taken::Refused) => Err(format!(
                "client id {client_id:?} is held on another gate by another user"
            )),
            Some(mqtt_broker::Taken::Session(h)) if take => {
                let acl = (user.clone(), token_acl.clone());
                Ok((import_session(&gate, peer, h, acl, limits).await, true))
            }
            other => {
                if take && other.is_some() {
                    tracing::debug!(client_id = %client_id, "no other gate holds a session of the client id");
                }
                resolve_state(&gate, &client_id, uid, connect.clean_session, limits)
                    .map_err(|e| e.to_string())
            }
        };
        match resolved {
            Ok(r) => r,
            Err(e) => {
                connack_and_close(&mut writer, &cfg, 5).await;
                refusal::refuse(&peer, "takeover", format_args!("{e}; refused"));
                metrics::counter!("warren_connections_refused_total", "reason" => "takeover")
                    .increment(1);
                return None;
            }
        }
    };
    let epoch = state.next_epoch();

    // 4. The session.
    let framer = MqttFramer {
        push_qos,
        pkid: 0,
        state: (!mqant).then(|| (state.clone(), epoch)),
        broker: gate.broker.clone(),
    };
    let mut conn = SessionConn::open(
        gate.clone(),
        cfg.clone(),
        peer,
        Protocol::Mqtt,
        writer,
        framer,
    );
    if !mqant {
        match gate.claim_client_id(&client_id, &conn.handle, uid) {
            Ok(Some(old)) => {
                let s = old.snapshot();
                tracing::info!(client_id = %client_id, old_session = %s.id, old_peer = %s.remote, "client id taken over; closing the older connection");
                // the uid goes with the client id: the new session binds it next
                if s.uid.is_some() {
                    let _ = gate.node.session_table().unbind(&s.id);
                }
                old.close();
            }
            Ok(None) => {}
            Err(()) => {
                let why = format!(
                    "client id {client_id:?} is held by a session of another user; takeover refused"
                );
                refusal::refuse(&peer, "takeover", why);
                refuse_session(conn, 5).await;
                return None;
            }
        }
    }
    if let Some(id) = &identity
        && let Err(e) = gate.bind_identity(&conn.handle, id)
    {
        refusal::refuse(&peer, "uid_conflict", format_args!("{e}"));
        if !mqant {
            gate.release_client_id(&client_id, &conn.handle);
        }
        refuse_session(conn, 5).await;
        return None;
    }
    if !mqant && state.is_attached() {
        // a takeover: the older connection hands its unsent messages back first
        let wait = Duration::from_secs(cfg.write_timeout_s + 1);
        if !state.wait_detached(wait).await {
            tracing::debug!(client_id = %client_id, "older connection still attached; attaching anyway");
        }
    }
    if conn
        .send(Outbound::Inline(InlineFrame::new(&mqtt::connack_bytes(
            present, 0,
        ))))
        .await
        .is_err()
    {
        conn.finish(End::ServerClosed).await;
        return None;
    }
    if !mqant {
        // deliveries reach this connection from now on, after the resends framed here
        let mut resend = BytesMut::new();
        state.attach(epoch, &conn.handle, limits, &mut resend);
        conn.push_framed(&resend);
    }
    tracing::debug!(client_id = %client_id, keep_alive = connect.keep_alive, level = connect.protocol_level, present, "connected");
    if !mqant {
        gate.broker.client_connected(&gate);
    }

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
    // nothing of CONNECT is needed from here on; dropping it keeps the connection's task small
    drop(connect);
    let proto = MqttSession {
        mqant,
        pingresp_d2,
        pubsub,
        max_packet,
        read_timeout,
        client_id,
        state,
        epoch,
        user,
        acl: None,
        token_acl,
        will,
        unacked: None,
    };
    Some((proto, conn, reader, buf))
}

/// The session state of a default-mode connection and whether a stored one is resumed:
/// `clean_session = 1` discards a stored session of the client id, `clean_session = 0` resumes
/// it (unless it expired) or stores a new one. Refused when a stored one belongs to another user.
fn resolve_state(
    gate: &Gate,
    client_id: &str,
    uid: Option<&str>,
    clean: bool,
    limits: SessionLimits,
) -> Result<(Arc<MqttState>, bool), crate::mqtt_session::StoreError> {
    let subs = gate.node.subscriptions();
    let now = std::time::Instant::now();
    if let Some(e) = limits.expiry {
        subs.expire_sessions(now, (e / 8).max(Duration::from_secs(1)));
    }
    if clean {
        if let Some(old) = subs.sessions().take(client_id, uid)? {
            tracing::debug!(client_id, "clean session: the stored session is discarded");
            subs.discard_session(&old);
        }
        return Ok((MqttState::new(client_id, uid, false, limits), false));
    }
    let r = subs.sessions().resume(client_id, uid, limits, now)?;
    if let Some(old) = r.expired {
        subs.discard_session(&old);
    }
    Ok((r.state, r.present))
}

/// Rebuild a persistent session another gate handed over (docs/protocols/mqtt.md, "Across
/// gates"): its messages and inbound QoS 2 ids as they were, and each of its subscriptions that
/// this gate's checks still allow for this client (`acl`: its user and its token's topics) —
/// the `[limits]` on filters, the ACL file, the token — in the trie; a filter refused now is
/// dropped from the session and logged. It runs in the gate module's mailbox order
/// (`Broker::in_gate_order`), between the publishes the old gate forwarded before its answer and
/// those after. With a durable store, the session is on disk before the CONNACK.
async fn import_session(
    gate: &Arc<Gate>,
    peer: SocketAddr,
    h: Box<warren_proto::mqtt_handover::Handover>,
    (user, token_acl): (Option<Arc<str>>, Option<Box<ClientAcl>>),
    limits: SessionLimits,
) -> Arc<MqttState> {
    let g = gate.clone();
    let state = gate
        .broker
        .in_gate_order(&*gate.node, move || {
            let acl = (user.as_deref(), token_acl.as_deref());
            import_now(&g, &peer, &h, acl, limits)
        })
        .await;
    #[cfg(feature = "mqtt-store")]
    if let Some(store) = gate.node.subscriptions().sessions().backend()
        && let Err(e) = store.flush().await
    {
        metrics::counter!("warren_store_unacknowledged_total").increment(1);
        tracing::warn!(%peer, client_id = %state.client_id(), error = %e, "MQTT store failed: the session handed over is kept in memory only");
    }
    state
}

/// [`import_session`]'s work, in the gate module's order.
fn import_now(
    gate: &Gate,
    peer: &SocketAddr,
    h: &warren_proto::mqtt_handover::Handover,
    (user, token_acl): (Option<&str>, Option<&ClientAcl>),
    limits: SessionLimits,
) -> Arc<MqttState> {
    let subs = gate.node.subscriptions();
    let (state, old) = subs.sessions().import(h, limits);
    if let Some(old) = old {
        subs.discard_session(&old);
    }
    let acl = gate
        .acl
        .load()
        .as_ref()
        .map(|a| a.for_client(user, &h.client_id));
    let subscriber = Subscriber::Stored(state.clone());
    let l = &gate.limits;
    let who = user.unwrap_or("");
    for (filter, qos) in &h.filters {
        let denied = topic_over_limits(l, filter, "filter")
            .or_else(|| {
                acl.as_ref().filter(|a| !a.may_subscribe(filter)).map(|_| {
                    (
                        "acl",
                        format!(
                            "no ACL read rule covers filter {:?} for user {who:?}",
                            preview(filter)
                        ),
                    )
                })
            })
            .or_else(|| {
                token_acl.filter(|t| !t.may_subscribe(filter)).map(|_| {
                    (
                        "token_topics",
                        format!(
                            "the token's topics do not cover filter {:?} for user {who:?}",
                            preview(filter)
                        ),
                    )
                })
            });
        if let Some((kind, why)) = denied {
            refusal::deny(
                peer,
                kind,
                format_args!("{why}; dropped from the session handed over"),
            );
            continue;
        }
        let (held, _) = state.filters(filter);
        if held >= l.max_filters_per_session {
            let why = format!(
                "session holds {held} filters, limits.max_filters_per_session is {}; {:?} dropped from the session handed over",
                l.max_filters_per_session,
                preview(filter)
            );
            refusal::refuse(peer, "filters_per_session", why);
            continue;
        }
        let added = state.subscribe(filter, *qos, || {
            subs.subscribe_within(
                filter,
                subscriber.clone(),
                *qos,
                l.max_subscriptions,
                l.max_subscription_levels,
            )
        });
        if let Some(Err(full)) = added {
            refusal::refuse(peer, full.kind(), full);
        }
    }
    state
}

/// Answer CONNACK `code` on an opened session and close it (its uid was never bound).
async fn refuse_session(mut conn: Conn, code: u8) {
    let _ = conn
        .send(Outbound::Inline(InlineFrame::new(&mqtt::connack_bytes(
            false, code,
        ))))
        .await;
    conn.finish(End::ServerClosed).await;
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

/// The MQTT state of one connection.
struct MqttSession {
    mqant: bool,
    /// Answer PINGREQ with mqant's `d2 00` (the listener's `pingresp_d2`).
    pingresp_d2: bool,
    /// Default mode: publishes to topics naming no module go to subscribers (`pubsub`).
    pubsub: bool,
    max_packet: usize,
    read_timeout: Option<Duration>,
    client_id: String,
    /// Subscriptions, the outbound window, inbound QoS 2 ids awaiting PUBREL: kept beyond the
    /// connection for a persistent session (crate::mqtt_session).
    state: Arc<MqttState>,
    /// This connection's epoch in `state`.
    epoch: u64,
    /// The user name topic ACLs apply to; authentication may replace it with the verified one.
    user: Option<Arc<str>>,
    /// The node's ACL as resolved for this client, with the ACL it was resolved from (resolved
    /// again when that one is swapped); `None` while the node has no ACL file.
    acl: Option<Box<(Arc<Acl>, ClientAcl)>>,
    /// The topics the verified credentials limit this client to (JWT claim `topics`), read and
    /// write; applied on top of `acl`, both having to allow. `None` when they name none.
    token_acl: Option<Box<ClientAcl>>,
    /// Default mode: the will, published if the connection ends without DISCONNECT.
    will: Option<Box<mqtt_will::Will>>,
    /// With a durable store: the PUBACKs / PUBRECs of the PUBLISHes read together, in order,
    /// sent once their writes are on disk (see `publish_kept`).
    unacked: Option<Box<Unacked>>,
}

/// PUBLISHes acknowledged once their store writes are durable: the writes, the acks in order.
#[cfg(feature = "mqtt-store")]
struct Unacked {
    store: crate::mqtt_store::MqttStore,
    writes: crate::mqtt_store::Collected,
    acks: Vec<[u8; 4]>,
    /// While `route_kept` routes one PUBLISH: its writes.
    current: Option<crate::mqtt_store::Collected>,
}

#[cfg(feature = "mqtt-store")]
impl Unacked {
    fn new(store: crate::mqtt_store::MqttStore) -> Self {
        Unacked {
            store,
            writes: crate::mqtt_store::Collected::default(),
            acks: Vec::new(),
            current: None,
        }
    }
}
/// Without the store feature nothing waits.
#[cfg(not(feature = "mqtt-store"))]
enum Unacked {}

/// PUBLISHes acknowledged together at most: past it their writes are waited for at once.
#[cfg(feature = "mqtt-store")]
const MAX_UNACKED: usize = 1024;

type Conn = SessionConn<Bytes>;

impl conn::Dialect for MqttSession {
    type Tag = Bytes;

    /// A persistent session keeps its subscriptions and takes back its unsent QoS ≥ 1
    /// messages; a clean one leaves its subscriptions.
    fn on_end(&mut self, conn: &mut Conn) {
        if self.mqant {
            return;
        }
        if self.state.is_persistent() {
            let state = self.state.clone();
            state.detach(self.epoch, || {
                let mut kept = Vec::new();
                conn.take_unsent(|item| {
                    if let Outbound::Message { msg, qos: Some(q) } = item
                        && q > 0
                    {
                        kept.push((msg, q));
                    }
                });
                kept
            });
        } else {
            let subs = conn.gate.node.subscriptions();
            for (f, _) in self.state.subscriptions() {
                subs.unsubscribe(&f, conn.handle.id());
            }
        }
    }

    async fn handle_buffered(&mut self, conn: &mut Conn, buf: &mut BytesMut) -> Result<bool, End> {
        let mut handled = false;
        while conn.has_room() {
            let before = buf.len();
            match mqtt::decode(buf, self.max_packet) {
                Ok(None) => break,
                Ok(Some(p)) => {
                    handled = true;
                    let publish = u64::from(matches!(p, Packet::Publish(_)));
                    let read = (before - buf.len()) as u64;
                    conn.gate.broker.received.add(1, read, publish);
                    conn.admit_message();
                    if !matches!(p, Packet::Publish(_)) {
                        // what the client sent before this is acknowledged before it
                        self.flush_acks(conn).await?;
                    }
                    self.handle(conn, p).await?;
                }
                Err(e) => {
                    self.flush_acks(conn).await?;
                    metrics::counter!("warren_decode_errors_total", "kind" => e.kind())
                        .increment(1);
                    if matches!(e, mqtt::DecodeError::PacketTooLarge { .. }) {
                        let code = conn::close_code::TOO_BIG;
                        return Err(End::Limit("too_big", code, format!("{e}")));
                    }
                    return Err(End::Refused(format!("malformed packet: {e}")));
                }
            }
        }
        self.flush_acks(conn).await?;
        Ok(handled)
    }

    fn reply(&mut self, topic: Bytes, result: Result<Bytes, CallError>) -> Option<Outbound> {
        Some(reply_item(topic, result))
    }

    fn read_timeout(&self) -> Option<Duration> {
        self.read_timeout
    }

    /// Leave the subscriptions and the client id (the session table and groups are handled by
    /// `SessionConn::finish`).
    fn on_close(&mut self, conn: &Conn) {
        if !self.mqant {
            conn.gate.release_client_id(&self.client_id, &conn.handle);
            conn.gate.broker.client_left();
        }
        // not after DISCONNECT, which took it
        if let Some(will) = self.will.take()
            && self.pubsub
        {
            will.publish(&conn.gate, &conn.peer);
        }
    }
}

async fn ack(conn: &mut Conn, bytes: [u8; 4]) -> Result<(), End> {
    conn.send(Outbound::Inline(InlineFrame::new(&bytes))).await
}

/// A reply `{"Error":…,"Result":…}` on the request topic.
fn reply_item(topic: Bytes, result: Result<Bytes, CallError>) -> Outbound {
    Outbound::Message {
        msg: Message::new(topic, envelope(result)),
        qos: None,
    }
}

/// Queue a reply on the request topic.
async fn reply(conn: &mut Conn, topic: Bytes, result: Result<Bytes, CallError>) -> Result<(), End> {
    conn.send(reply_item(topic, result)).await
}

impl MqttSession {
    async fn handle(&mut self, conn: &mut Conn, p: Packet) -> Result<(), End> {
        match p {
            Packet::Publish(p) => self.publish(conn, p).await,
            Packet::PubRel(id) => {
                self.state.release(id);
                ack(conn, mqtt::ack_bytes(Ack::PubComp, id)).await
            }
            Packet::PubAck(id) | Packet::PubComp(id) => {
                conn.admit_push_ack();
                let mut next = BytesMut::new();
                let known = match p {
                    Packet::PubAck(_) => self.state.puback(self.epoch, id, &mut next),
                    _ => self.state.pubcomp(self.epoch, id, &mut next),
                };
                if !known && !self.mqant {
                    tracing::debug!(pkid = id, "acknowledgement for no message in flight");
                }
                conn.push_framed(&next);
                Ok(())
            }
            Packet::PubRec(id) => {
                if !self.state.pubrec(id) && !self.mqant {
                    tracing::debug!(pkid = id, "PUBREC for no QoS 2 message in flight");
                }
                ack(conn, mqtt::ack_bytes(Ack::PubRel, id)).await
            }
            Packet::Subscribe(s) => self.subscribe(conn, s).await,
            Packet::Unsubscribe(u) => {
                let max = conn.gate.limits.max_filters_per_subscribe;
                if u.filters.len() > max {
                    let why = format!(
                        "UNSUBSCRIBE of {} filters, limits.max_filters_per_subscribe is {max}",
                        u.filters.len()
                    );
                    refusal::refuse(&conn.peer, "filters_per_subscribe", why);
                    return Err(End::ServerClosed);
                }
                let id = self.subscriber(conn).id().clone();
                for f in &u.filters {
                    // only what this session holds is in the trie: nothing else to walk
                    if self.state.unsubscribe(f.as_str()) && !self.mqant {
                        conn.gate.node.subscriptions().unsubscribe(f, &id);
                    }
                }
                ack(conn, mqtt::ack_bytes(Ack::UnsubAck, u.pkid)).await
            }
            Packet::PingReq => {
                let bytes = mqtt::pingresp_bytes(self.pingresp_d2);
                conn.send(Outbound::Inline(InlineFrame::new(bytes))).await
            }
            Packet::Disconnect => {
                // a clean goodbye: the will is discarded (MQTT 3.1.1 section 3.14.4)
                self.will = None;
                Err(End::Disconnect)
            }
            Packet::Connect(_) => Err(End::Refused("second CONNECT on one connection".into())),
            other => Err(End::Refused(format!(
                "unexpected {} from a client",
                other.name()
            ))),
        }
    }

    /// Grant or refuse each filter (SUBACK 0x80 for a refused one): length and levels, syntax,
    /// the topic ACL, the session's and the node's caps. A SUBSCRIBE of more filters than
    /// `limits.max_filters_per_subscribe` is abuse and closes the connection.
    async fn subscribe(&mut self, conn: &mut Conn, s: mqtt::Subscribe) -> Result<(), End> {
        let gate = conn.gate.clone();
        let limits = &gate.limits;
        let peer = conn.peer;
        if s.filters.len() > limits.max_filters_per_subscribe {
            let why = format!(
                "SUBSCRIBE of {} filters, limits.max_filters_per_subscribe is {}",
                s.filters.len(),
                limits.max_filters_per_subscribe
            );
            refusal::refuse(&peer, "filters_per_subscribe", why);
            return Err(End::ServerClosed);
        }
        if !self.mqant {
            self.refresh_acl(&gate);
        }
        let subscriptions = gate.node.subscriptions();
        let subscriber = self.subscriber(conn);
        let mut codes = Vec::with_capacity(s.filters.len());
        // default mode: the granted filters, whose retained messages follow the SUBACK
        let mut granted_filters: Vec<(String, u8)> = Vec::new();
        for f in s.filters {
            let filter = f.filter;
            if let Some((kind, why)) = topic_over_limits(limits, &filter, "filter") {
                refusal::refuse(&peer, kind, why);
                codes.push(0x80);
                continue;
            }
            if !mqtt::topic::valid_filter(&filter) {
                refusal::deny(
                    &peer,
                    "bad_filter",
                    format!("invalid filter {:?}", preview(&filter)),
                );
                codes.push(0x80);
                continue;
            }
            if let Some((kind, why)) = self.subscribe_denied(&filter) {
                refusal::deny(&peer, kind, why);
                codes.push(0x80);
                continue;
            }
            let (held, holds) = self.state.filters(&filter);
            if !holds && held >= limits.max_filters_per_session {
                let why = format!(
                    "session holds {held} filters, limits.max_filters_per_session is {}",
                    limits.max_filters_per_session
                );
                refusal::refuse(&peer, "filters_per_session", why);
                codes.push(0x80);
                continue;
            }
            // default mode grants up to QoS 2; mqant mode, as upstream, up to 1
            let granted = f.qos.as_u8().min(if self.mqant { 1 } else { 2 });
            // the trie and the session's record change together (a discard cannot miss one)
            let added = self.state.subscribe(&filter, granted, || {
                if self.mqant {
                    return Ok(true);
                }
                subscriptions.subscribe_within(
                    &filter,
                    subscriber.clone(),
                    granted,
                    limits.max_subscriptions,
                    limits.max_subscription_levels,
                )
            });
            match added {
                Some(Ok(_)) => {}
                Some(Err(full)) => {
                    refusal::refuse(&peer, full.kind(), full);
                    codes.push(0x80);
                    continue;
                }
                None => {
                    codes.push(0x80);
                    continue;
                }
            }
            if !self.mqant && gate.broker.has_retained() {
                granted_filters.push((filter.clone(), granted));
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
        conn.send(Outbound::Bytes(Box::new(out.freeze()))).await?;
        mqtt_broker::send_retained(&gate.broker, conn, &granted_filters).await
    }

    async fn publish(&mut self, conn: &mut Conn, p: Publish) -> Result<(), End> {
        #[cfg(feature = "mqtt-store")]
        if !self.mqant
            && let Some(store) = conn.gate.node.subscriptions().sessions().backend()
        {
            let store = store.clone();
            return self.publish_kept(conn, p, store).await;
        }
        match p.qos {
            QoS::AtMostOnce => {}
            QoS::AtLeastOnce => ack(conn, mqtt::ack_bytes(Ack::PubAck, p.pkid)).await?,
            QoS::ExactlyOnce => {
                // the ids awaiting PUBREL are the session's: a resend after a reconnect is
                // recognised too
                let resend = match self.state.receive_qos2(p.pkid) {
                    Ok(first) => !first,
                    Err(()) => {
                        return Err(End::Refused(format!(
                            "more than {MAX_AWAITING_REL} QoS 2 publishes awaiting PUBREL"
                        )));
                    }
                };
                ack(conn, mqtt::ack_bytes(Ack::PubRec, p.pkid)).await?;
                if resend {
                    return Ok(());
                }
            }
        }
        conn.admit_publish();
        self.route(conn, p).await
    }

    /// Route a publish: to a module handler, or (default mode) to subscribers. A topic over
    /// the `[limits]` is dropped; in pub/sub, so is one the topic ACL does not let this client
    /// write (the publish was acknowledged already, as MQTT 3.1.1 has no way to refuse it).
    async fn route(&mut self, conn: &mut Conn, p: Publish) -> Result<(), End> {
        let node = conn.gate.node.clone();
        let Publish {
            topic: topic_bytes,
            payload,
            qos,
            retain,
            ..
        } = p;
        let topic = std::str::from_utf8(&topic_bytes).unwrap_or("");
        if let Some((kind, why)) = topic_over_limits(&conn.gate.limits, topic, "topic") {
            refusal::refuse(&conn.peer, kind, why);
            return Ok(());
        }
        let module = Route::module_of(topic);
        let is_module = conn.names_cached_module(module) || node.router().has_module(module);
        if !self.mqant && !is_module {
            if self.pubsub {
                self.refresh_acl(&conn.gate);
                if let Some((kind, why)) = self.publish_denied(topic) {
                    refusal::deny(&conn.peer, kind, why);
                    return Ok(());
                }
                if mqtt_broker::is_sys(topic) {
                    let why = format!(
                        "publish to {:?} dropped: $SYS is the node's",
                        preview(topic)
                    );
                    refusal::deny(&conn.peer, "sys_topic", why);
                    return Ok(());
                }
                let broker = &conn.gate.broker;
                let (peer, q) = (conn.peer, qos.as_u8());
                let kept = kept_writes(&*node, || {
                    broker.publish(
                        &*node,
                        &peer,
                        topic,
                        topic_bytes.clone(),
                        q,
                        payload,
                        retain,
                    )
                });
                self.settle_publish(kept, q, &peer).await?;
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
                refusal::deny(
                    &conn.peer,
                    "bad_route",
                    format_args!("dropping publish: {e}"),
                );
                metrics::counter!("warren_requests_refused_total", "reason" => "bad_route")
                    .increment(1);
                return Ok(());
            }
        };
        let tag = route.msgid.is_some().then(|| topic_bytes.clone());
        let checked = self.check(conn, &route, &payload);
        let outcome = match checked {
            Err(e) => Err((tag, e)),
            Ok((target, session)) => {
                conn.call_as(&target, route.handler, payload, tag, session)
                    .await
            }
        };
        match outcome {
            Ok(()) => Ok(()),
            Err((tag, e)) => {
                metrics::counter!("warren_requests_refused_total", "reason" => e.kind().as_str())
                    .increment(1);
                refusal::deny(&conn.peer, e.kind().as_str(), format_args!("{route}: {e}"));
                match tag {
                    Some(topic) => reply(conn, topic, Err(e)).await,
                    None => Ok(()),
                }
            }
        }
    }

    /// [`Self::publish`] on a node with a durable store (`[mqtt] store`): the PUBACK (QoS 2:
    /// PUBREC) goes only once what the PUBLISH changed is on disk: the messages queued for
    /// persistent sessions, the retained message, the packet id awaiting PUBREL (docs/
    /// protocols/mqtt.md, "Durability"). A store that fails closes the connection unacknowledged.
    #[cfg(feature = "mqtt-store")]
    async fn publish_kept(
        &mut self,
        conn: &mut Conn,
        p: Publish,
        store: crate::mqtt_store::MqttStore,
    ) -> Result<(), End> {
        let (qos, pkid) = (p.qos, p.pkid);
        let mut writes = crate::mqtt_store::Collected::default();
        if qos == QoS::ExactlyOnce {
            let (first, kept) = crate::mqtt_store::collecting(|| self.state.receive_qos2(pkid));
            match first {
                Ok(true) => writes = kept,
                // a resend: its PUBREC after those of what came before it
                Ok(false) => {
                    self.unack(store, writes, mqtt::ack_bytes(Ack::PubRec, pkid));
                    return Ok(());
                }
                Err(()) => {
                    return Err(End::Refused(format!(
                        "more than {MAX_AWAITING_REL} QoS 2 publishes awaiting PUBREL"
                    )));
                }
            }
        }
        conn.admit_publish();
        let module = self.route_kept(conn, p).await?;
        if let Some(kept) = module {
            writes.absorb(kept);
        }
        let ack = match qos {
            QoS::AtMostOnce => {
                // nobody waits: only room in the store's queue
                return settle(Some((store, writes)), 0, &conn.peer).await;
            }
            QoS::AtLeastOnce => mqtt::ack_bytes(Ack::PubAck, pkid),
            QoS::ExactlyOnce => mqtt::ack_bytes(Ack::PubRec, pkid),
        };
        self.unack(store, writes, ack);
        if self
            .unacked
            .as_ref()
            .is_some_and(|u| u.acks.len() >= MAX_UNACKED)
        {
            self.flush_acks(conn).await?;
        }
        Ok(())
    }

    /// [`Self::route`], handing back the store writes of a pub/sub publish instead of waiting
    /// for them.
    #[cfg(feature = "mqtt-store")]
    async fn route_kept(
        &mut self,
        conn: &mut Conn,
        p: Publish,
    ) -> Result<Option<crate::mqtt_store::Collected>, End> {
        let store = conn.gate.node.subscriptions().sessions().backend().cloned();
        if let Some(store) = store {
            let u = self
                .unacked
                .get_or_insert_with(|| Box::new(Unacked::new(store)));
            u.current = Some(crate::mqtt_store::Collected::default());
        }
        let r = self.route(conn, p).await;
        let current = self.unacked.as_mut().and_then(|u| u.current.take());
        r?;
        Ok(current)
    }

    /// The store writes of a publish routed to subscribers: kept for `route_kept`'s caller
    /// (who acknowledges once they are durable) while it runs, else waited for now.
    async fn settle_publish(&mut self, kept: Kept, qos: u8, peer: &SocketAddr) -> Result<(), End> {
        #[cfg(feature = "mqtt-store")]
        if let Some(current) = self.unacked.as_deref_mut().and_then(|u| u.current.as_mut()) {
            if let Some((_, writes)) = kept {
                current.absorb(writes);
            }
            return Ok(());
        }
        settle(kept, qos, peer).await
    }

    /// Queue an acknowledgement behind the writes it waits for.
    #[cfg(feature = "mqtt-store")]
    fn unack(
        &mut self,
        store: crate::mqtt_store::MqttStore,
        writes: crate::mqtt_store::Collected,
        ack: [u8; 4],
    ) {
        let u = self
            .unacked
            .get_or_insert_with(|| Box::new(Unacked::new(store)));
        u.writes.absorb(writes);
        u.acks.push(ack);
    }

    /// What this session's subscriptions deliver to in the trie: the persistent state, or the
    /// connection for a clean session.
    fn subscriber(&self, conn: &Conn) -> Subscriber {
        if self.state.is_persistent() {
            Subscriber::Stored(self.state.clone())
        } else {
            Subscriber::Conn(conn.handle.clone())
        }
    }

    /// Why this client may not subscribe to `filter` (a valid filter), as a refusal kind and
    /// reason: the ACL file (`acl`) or its token's topics (`token_topics`) does not cover it.
    /// Call [`Self::refresh_acl`] first.
    fn subscribe_denied(&self, filter: &str) -> Option<(&'static str, String)> {
        let user = self.user.as_deref().unwrap_or("");
        if let Some((_, acl)) = self.acl.as_deref()
            && !acl.may_subscribe(filter)
        {
            let why = format!(
                "no ACL read rule covers filter {:?} for user {user:?}",
                preview(filter)
            );
            return Some(("acl", why));
        }
        if let Some(t) = &self.token_acl
            && !t.may_subscribe(filter)
        {
            let why = format!(
                "the token's topics do not cover filter {:?} for user {user:?}",
                preview(filter)
            );
            return Some(("token_topics", why));
        }
        None
    }

    /// Why this client may not publish to `topic`, as for [`Self::subscribe_denied`].
    fn publish_denied(&self, topic: &str) -> Option<(&'static str, String)> {
        let user = self.user.as_deref().unwrap_or("");
        if let Some((_, acl)) = self.acl.as_deref()
            && !acl.may_publish(topic)
        {
            let why = format!(
                "no ACL write rule for topic {:?} for user {user:?}; publish dropped",
                preview(topic)
            );
            return Some(("acl", why));
        }
        if let Some(t) = &self.token_acl
            && !t.may_publish(topic)
        {
            let why = format!(
                "the token's topics do not include topic {:?} for user {user:?}; publish dropped",
                preview(topic)
            );
            return Some(("token_topics", why));
        }
        None
    }

    /// Keep `self.acl` in step with the node's ACL: resolved for this client once, again only
    /// when the node's ACL is swapped, dropped when it has none.
    fn refresh_acl(&mut self, gate: &Gate) {
        let current = gate.acl.load();
        match current.as_ref() {
            None => self.acl = None,
            Some(node_acl) => {
                if !matches!(self.acl.as_deref(), Some((a, _)) if Arc::ptr_eq(a, node_acl)) {
                    let resolved = node_acl.for_client(self.user.as_deref(), &self.client_id);
                    self.acl = Some(Box::new((node_acl.clone(), resolved)));
                }
            }
        }
    }

    /// The gate-side checks, in the order that decides which error wins (docs/protocols/mqtt.md,
    /// "Requests, replies and pushes").
    fn check(
        &self,
        conn: &mut Conn,
        route: &Route<'_>,
        body: &[u8],
    ) -> Result<(Arc<crate::router::Target>, Arc<crate::session::Session>), CallError> {
        if self.mqant && !is_json_object(body) {
            return Err(CallError::BodyNotJson);
        }
        let session = conn.handle.snapshot();
        let target = conn.resolve_as(route, body, &session)?;
        let prefixes = conn
            .cfg
            .protocol
            .mqtt()
            .map_or(&[][..], |o| &o.handler_prefixes[..]);
        let by_prefix = self.mqant
            && prefixes
                .iter()
                .any(|p| !p.is_empty() && route.handler.starts_with(p.as_str()));
        if !by_prefix && !target.is_client_handler(route.handler) {
            let prefix = prefixes.first().cloned().unwrap_or_default();
            return Err(CallError::NotClientVisible {
                handler: route.handler.to_owned(),
                prefix,
            });
        }
        crate::auth::admit_call(&target, route.handler, &session)?;
        Ok((target, session))
    }
}

/// Whether a topic name or filter is over `limits.max_topic_len` or `limits.max_topic_levels`:
/// the refusal kind and reason. The length is checked first, so counting levels scans at most
/// `max_topic_len` bytes and nothing is allocated.
fn topic_over_limits(limits: &LimitsConfig, t: &str, what: &str) -> Option<(&'static str, String)> {
    if t.len() > limits.max_topic_len {
        let why = format!(
            "{what} of {} bytes, limits.max_topic_len is {}",
            t.len(),
            limits.max_topic_len
        );
        return Some(("topic_len", why));
    }
    let levels = t.bytes().filter(|b| *b == b'/').count() + 1;
    if levels > limits.max_topic_levels {
        let why = format!(
            "{what} of {levels} levels, limits.max_topic_levels is {}",
            limits.max_topic_levels
        );
        return Some(("topic_levels", why));
    }
    None
}

/// The start of a client-chosen topic for a log line (at most 64 bytes).
fn preview(t: &str) -> &str {
    let mut end = t.len().min(64);
    while !t.is_char_boundary(end) {
        end -= 1;
    }
    &t[..end]
}

/// The store writes `f` makes (a publish's fan-out and retained message) and the store they go
/// to, when the node has a durable store (`[mqtt] store`).
#[cfg(feature = "mqtt-store")]
type Kept = Option<(crate::mqtt_store::MqttStore, crate::mqtt_store::Collected)>;
/// Without the store feature nothing is kept.
#[cfg(not(feature = "mqtt-store"))]
type Kept = Option<std::convert::Infallible>;

impl MqttSession {
    /// Wait until the writes of the PUBLISHes read so far are on disk, then send their
    /// acknowledgements in order. A store that fails ends the connection unacknowledged.
    async fn flush_acks(&mut self, conn: &mut Conn) -> Result<(), End> {
        let Some(u) = self.unacked.take() else {
            return Ok(());
        };
        #[cfg(feature = "mqtt-store")]
        {
            let Unacked {
                store,
                writes,
                acks,
                ..
            } = *u;
            settle(Some((store, writes)), 1, &conn.peer).await?;
            for a in acks {
                ack(conn, a).await?;
            }
            Ok(())
        }
        #[cfg(not(feature = "mqtt-store"))]
        {
            let _ = conn;
            match *u {}
        }
    }
}

/// Run `f` (synchronous), collecting the durable store's writes it makes, if the node has one.
fn kept_writes<R>(node: &dyn super::Host, f: impl FnOnce() -> R) -> Kept {
    #[cfg(feature = "mqtt-store")]
    if let Some(store) = node.subscriptions().sessions().backend() {
        let (_, kept) = crate::mqtt_store::collecting(f);
        return (!kept.is_empty()).then(|| (store.clone(), kept));
    }
    let _ = (node, f());
    None
}

/// Wait for the writes of a QoS ≥ 1 publish to be durable (for QoS 0, only for room in the
/// store's queue); a failed store ends the connection, unacknowledged.
async fn settle(kept: Kept, qos: u8, peer: &SocketAddr) -> Result<(), End> {
    #[cfg(feature = "mqtt-store")]
    if let Some((store, kept)) = kept {
        if qos == 0 {
            kept.queue(&store).await;
            return Ok(());
        }
        if let Err(e) = kept.settle(&store).await {
            metrics::counter!("warren_store_unacknowledged_total").increment(1);
            tracing::warn!(%peer, error = %e, "MQTT store failed: PUBLISH not acknowledged; closing");
            return Err(End::ServerClosed);
        }
    }
    #[cfg(not(feature = "mqtt-store"))]
    let _ = (kept, qos, peer);
    Ok(())
}

/// Frames pushes and replies as PUBLISH packets with this connection's QoS and packet ids.
pub(crate) struct MqttFramer {
    push_qos: u8,
    pkid: u16,
    /// Default mode: the session state and this connection's epoch in it; QoS ≥ 1 messages
    /// take a packet id and a slot of its inflight window there (mqant mode: none, a fresh id
    /// per message, QoS 1).
    state: Option<(Arc<MqttState>, u64)>,
    /// Counts what is framed, for `$SYS`.
    broker: Arc<mqtt_broker::Broker>,
}

impl Framer for MqttFramer {
    fn frame(&mut self, item: Outbound, out: &mut Out) {
        let before = out.buf.len();
        match item {
            Outbound::Message { msg, qos } => {
                let q = qos.unwrap_or(self.push_qos);
                if q == 0 {
                    out.buf.extend_from_slice(msg.mqtt_qos0());
                } else if let (Some(_), Some((state, epoch))) = (qos, &self.state) {
                    // a subscription's delivery: through the session's inflight window
                    state.frame(*epoch, msg, q.min(2), &mut out.buf);
                } else {
                    // a push or reply (push_qos): QoS 1, acknowledgement not required
                    self.pkid = match &self.state {
                        Some((state, _)) => state.spare_pkid(),
                        None if self.pkid == u16::MAX => 1,
                        None => self.pkid + 1,
                    };
                    mqtt::encode_publish(
                        &mut out.buf,
                        &msg.topic,
                        QoS::AtLeastOnce,
                        false,
                        false,
                        self.pkid,
                        &msg.body,
                    );
                }
            }
            Outbound::Inline(f) => out.buf.extend_from_slice(f.as_bytes()),
            Outbound::Bytes(b) => out.buf.extend_from_slice(&b),
            Outbound::Close | Outbound::CloseCode(_) => {}
        }
        let framed = (out.buf.len() - before) as u64;
        if framed > 0 {
            let publish = u64::from(out.buf[before] >> 4 == 3);
            self.broker.sent.add(1, framed, publish);
        }
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
            let text = serde_json::to_string(&e.wire_text()).unwrap_or_else(|_| "\"error\"".into());
            out.put_slice(b"{\"Error\":");
            out.put_slice(text.as_bytes());
            out.put_slice(b",\"Result\":null}");
        }
    }
    out.freeze()
}

pub(crate) fn is_json_object(body: &[u8]) -> bool {
    body.iter().find(|b| !b.is_ascii_whitespace()) == Some(&b'{')
        && serde_json::from_slice::<serde::de::IgnoredAny>(body).is_ok()
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

    /// A default-mode session of `user` with this ACL file and these token topics.
    fn session(file: Option<&str>, topics: Option<&[&str]>) -> MqttSession {
        let user = "ann";
        MqttSession {
            mqant: false,
            pingresp_d2: false,
            pubsub: true,
            max_packet: 1024,
            read_timeout: None,
            client_id: "c1".into(),
            state: MqttState::new("c1", None, false, SessionLimits::default()),
            epoch: 1,
            user: Some(Arc::from(user)),
            acl: file.map(|text| {
                let acl = Arc::new(Acl::parse(text, "acl").expect("acl"));
                let resolved = acl.for_client(Some(user), "c1");
                Box::new((acl, resolved))
            }),
            token_acl: topics.map(|t| Box::new(ClientAcl::only(t))),
            will: None,
            unacked: None,
        }
    }

    #[test]
    fn a_tokens_topics_and_the_acl_file_must_both_allow() {
        let kind = |d: Option<(&'static str, String)>| d.map(|(k, _)| k);
        // the token alone
        let s = session(None, Some(&["rooms/lobby/#"]));
        assert_eq!(kind(s.subscribe_denied("rooms/lobby/#")), None);
        assert_eq!(kind(s.publish_denied("rooms/lobby/x")), None);
        assert_eq!(
            kind(s.subscribe_denied("rooms/other/#")),
            Some("token_topics")
        );
        assert_eq!(kind(s.subscribe_denied("#")), Some("token_topics"));
        assert_eq!(
            kind(s.publish_denied("rooms/other/x")),
            Some("token_topics")
        );
        // no token topics, no file: everything
        let s = session(None, None);
        assert_eq!(kind(s.subscribe_denied("#")), None);
        assert_eq!(kind(s.publish_denied("any/topic")), None);
        // with a file, both must allow
        let file = "user ann\ntopic readwrite rooms/#\ntopic deny rooms/lobby/secret\n";
        let s = session(Some(file), Some(&["rooms/lobby/#", "news/#"]));
        assert_eq!(kind(s.publish_denied("rooms/lobby/x")), None);
        assert_eq!(
            kind(s.subscribe_denied("rooms/lobby/+")),
            Some("acl"),
            "may match the denied topic"
        );
        assert_eq!(kind(s.publish_denied("rooms/lobby/secret")), Some("acl"));
        assert_eq!(
            kind(s.publish_denied("news/today")),
            Some("acl"),
            "the token allows, the file does not"
        );
        assert_eq!(
            kind(s.subscribe_denied("rooms/other/#")),
            Some("token_topics"),
            "the file allows, the token does not"
        );
        assert_eq!(
            kind(s.publish_denied("rooms/other/x")),
            Some("token_topics")
        );
        // a token with an empty list may use no topic
        let s = session(None, Some(&[]));
        assert_eq!(
            kind(s.publish_denied("rooms/lobby/x")),
            Some("token_topics")
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

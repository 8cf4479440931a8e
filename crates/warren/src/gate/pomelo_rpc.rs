//! The pomelo-rpc acceptor (docs/protocols/pomelo-rpc.md): pomelo and pinus servers call warren
//! modules as if they were pomelo services. Two transports: MQTT (pomelo-rpc's default: PUBLISH on
//! topic `rpc`) and stream-pkg over TCP (`<varint length><JSON>`).
//!
//! `namespace.service.method` dispatches to module `service` (or its `service_map` alias) and
//! handler `method`, within the namespaces allowed (`sys`, `user`). Peers are servers, and a
//! *trusted* peer may call any handler, RPC-only ones included. A peer is trusted when it
//! authenticated with credentials in its CONNECT (checked by the node's `[auth]`), or when the
//! listener restricts who may connect (an `allow` list, or `tls_client_ca`: client certificates).
//! Any other peer is treated as a client: client-visible handlers only, and the login rule.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use serde_json::Value;
use warren_proto::mqtt::{self, Packet, QoS};
use warren_proto::pomelo_rpc::{self, RpcRequest};
use warren_proto::stream_pkg;

use super::args::body_from_args;
use super::conn::{self, End, Framer, Out, SessionConn};
use super::io::{Reader, Writer};
use super::{Credentials, Gate};
use crate::config::{ListenerConfig, RpcFraming};
use crate::error::CallError;
use crate::refusal;
use crate::route::Route;
use crate::session::{InlineFrame, Outbound, Protocol};

/// Where a response goes: the request id, and the tracing keys to echo.
type Tag = (Value, Option<(Value, Value, Value)>);

/// Serve one connection until it closes.
pub(crate) async fn serve(
    gate: Arc<Gate>,
    cfg: Arc<ListenerConfig>,
    reader: Reader,
    writer: Writer,
    peer: SocketAddr,
) {
    let Some(opts) = cfg.protocol.pomelo_rpc() else {
        // gate/listener.rs sends only pomelo-rpc listeners' connections here
        return;
    };
    let over_mqtt = opts.framing == RpcFraming::Mqtt;
    // the listener decides who connects: every peer that got here is a trusted server
    let restricted = !cfg.allow.is_empty() || cfg.tls_client_ca.is_some();
    if !over_mqtt && !restricted && cfg.auth && !gate.auth.load().allows_anonymous() {
        // stream-pkg carries no credentials: with anonymous peers refused, nobody gets in
        crate::refusal::refuse(
            &peer,
            "auth_not_authorized",
            "pomelo-rpc over stream-pkg carries no credentials and anonymous peers are refused",
        );
        drop((reader, writer));
        return;
    }
    let conn = SessionConn::open(
        gate,
        cfg.clone(),
        peer,
        Protocol::PomeloRpc,
        writer,
        PassThrough,
    );
    let proto = RpcSession {
        over_mqtt,
        connected: !over_mqtt,
        trusted: restricted,
        send_connack: opts.send_connack,
        buffered: opts.buffer_msg.then(Vec::new),
        interval: Duration::from_millis(opts.interval_ms.max(1)),
        trace: opts.trace,
        max: opts.pkg_size,
        namespaces: opts.namespaces.clone(),
        idle: cfg.idle_timeout(),
    };
    conn::serve_session(proto, conn, reader, BytesMut::new()).await;
}

struct RpcSession {
    over_mqtt: bool,
    connected: bool,
    /// May call RPC-only handlers (authenticated peer, or a listener that restricts peers).
    trusted: bool,
    send_connack: bool,
    /// Responses waiting for the next flush (`buffer_msg`).
    buffered: Option<Vec<Bytes>>,
    interval: Duration,
    trace: bool,
    max: usize,
    namespaces: Vec<String>,
    idle: Option<Duration>,
}

type Conn = SessionConn<Tag>;

impl RpcSession {
    /// One payload of responses in the transport's framing.
    fn frame(&self, payload: &[u8]) -> Outbound {
        let mut b = BytesMut::with_capacity(payload.len() + 16);
        if self.over_mqtt {
            mqtt::encode_publish(&mut b, b"rpc", QoS::AtMostOnce, false, false, 0, payload);
        } else {
            stream_pkg::encode(payload, &mut b);
        }
        Outbound::Bytes(Box::new(b.freeze()))
    }

    async fn respond(&mut self, conn: &mut Conn, tag: Tag, resp: &[Value]) -> Result<(), End> {
        match self.response(tag, resp) {
            Some(out) => conn.send(out).await,
            None => Ok(()),
        }
    }

    /// A response to send now, or `None` when it joins the batch flushed on the next tick.
    fn response(&mut self, tag: Tag, resp: &[Value]) -> Option<Outbound> {
        let (id, trace) = tag;
        let trace = trace
            .as_ref()
            .filter(|_| self.trace)
            .map(|(a, b, c)| (a, b, c));
        let body = pomelo_rpc::encode_response(&id, resp, trace);
        match &mut self.buffered {
            Some(queue) => {
                queue.push(body);
                None
            }
            None => Some(self.frame(&body)),
        }
    }

    async fn payload(&mut self, conn: &mut Conn, payload: &[u8]) -> Result<(), End> {
        let requests = match pomelo_rpc::decode_requests(payload, self.max) {
            Ok(r) => r,
            Err(e) => {
                // no id to answer: the caller's own timeout fires
                refusal::refuse(
                    &conn.peer,
                    "bad_rpc_payload",
                    format_args!("dropping unparseable rpc payload: {e}"),
                );
                metrics::counter!("warren_decode_errors_total", "kind" => e.kind()).increment(1);
                return Ok(());
            }
        };
        for r in requests {
            self.dispatch(conn, r).await?;
        }
        Ok(())
    }

    async fn dispatch(&mut self, conn: &mut Conn, r: RpcRequest) -> Result<(), End> {
        let trace = match (&r.trace_id, &r.seq_id, &r.source) {
            (None, None, None) => None,
            (a, b, c) => Some((
                a.clone().unwrap_or(Value::Null),
                b.clone().unwrap_or(Value::Null),
                c.clone().unwrap_or(Value::Null),
            )),
        };
        let tag = (r.id, trace);
        let Some(msg) = r.msg else {
            return self
                .respond(conn, tag, &[pomelo_rpc::error_value("invalid request")])
                .await;
        };
        let error = if !self.namespaces.contains(&msg.namespace) {
            Some(format!("no such namespace:{}", msg.namespace))
        } else {
            let module = conn
                .cfg
                .protocol
                .pomelo_rpc()
                .and_then(|o| o.service_map.get(&msg.service))
                .cloned()
                .unwrap_or_else(|| msg.service.clone());
            if !conn.gate.node.router().has_module(&module) {
                Some(format!("no such service:{}", msg.service))
            } else {
                let route = Route {
                    module: &module,
                    target: None,
                    handler: &msg.method,
                    msgid: None,
                };
                let body = body_from_args(&msg.args);
                let admitted = conn.resolve(&route, &body).and_then(|t| {
                    if !self.trusted {
                        if !t.is_client_handler(&msg.method) {
                            return Err(CallError::HandlerNotFound(msg.method.clone()));
                        }
                        crate::auth::admit_call(&t, &msg.method, &conn.handle.snapshot())?;
                    }
                    Ok(t)
                });
                match admitted {
                    Err(CallError::HandlerNotFound(m)) => Some(format!("no such method:{m}")),
                    Err(e) => Some(e.wire_text()),
                    Ok(target) => match conn
                        .call(&target, &msg.method, body, Some(tag.clone()))
                        .await
                    {
                        Ok(()) => return Ok(()),
                        Err((_, e)) => Some(e.wire_text()),
                    },
                }
            }
        };
        let text = error.unwrap_or_default();
        crate::refusal::deny(&conn.peer, "rpc", format_args!("{text}"));
        self.respond(conn, tag, &[pomelo_rpc::error_value(&text)])
            .await
    }
}

impl conn::Dialect for RpcSession {
    type Tag = Tag;

    async fn handle_buffered(&mut self, conn: &mut Conn, buf: &mut BytesMut) -> Result<bool, End> {
        let mut handled = false;
        while conn.has_room() {
            if !self.over_mqtt {
                let frame = match stream_pkg::decode(buf, self.max) {
                    Ok(None) => break,
                    Ok(Some(f)) => f,
                    Err(e) => return Err(End::Refused(format!("malformed package: {e}"))),
                };
                handled = true;
                conn.admit_message();
                self.payload(conn, &frame).await?;
                continue;
            }
            let packet = match mqtt::decode(buf, self.max + 16) {
                Ok(None) => break,
                Ok(Some(p)) => p,
                Err(e) => return Err(End::Refused(format!("malformed packet: {e}"))),
            };
            handled = true;
            conn.admit_message();
            match packet {
                Packet::Connect(c) if !self.connected => {
                    // credentials in CONNECT are checked by the node; a peer that passes is
                    // trusted; one that presents none relies on the listener's restrictions
                    let creds = Credentials {
                        peer: conn.peer,
                        protocol: Protocol::PomeloRpc,
                        client_id: c.client_id.clone(),
                        username: c.username.clone(),
                        password: c.password.clone(),
                    };
                    let gate = conn.gate.clone();
                    if creds.is_empty() && self.trusted {
                        // allowed by address or certificate
                    } else {
                        match gate.authenticate(&conn.cfg, &creds).await {
                            Ok(Some(_)) => self.trusted = true,
                            Ok(None) => {}
                            Err(refusal) => {
                                let code = refusal.connack_code();
                                conn.send(Outbound::Inline(InlineFrame::new(
                                    &mqtt::connack_bytes(false, code),
                                )))
                                .await?;
                                conn.send(Outbound::Close).await?;
                                return Err(End::ServerClosed);
                            }
                        }
                    }
                    self.connected = true;
                    if self.send_connack {
                        conn.send(Outbound::Inline(InlineFrame::new(&mqtt::connack_bytes(
                            false, 0,
                        ))))
                        .await?;
                    }
                }
                _ if !self.connected => {
                    return Err(End::Refused("first packet is not CONNECT".into()));
                }
                Packet::PingReq => {
                    conn.send(Outbound::Inline(InlineFrame::new(mqtt::pingresp_bytes(
                        false,
                    ))))
                    .await?
                }
                Packet::Publish(p) => {
                    if p.qos == QoS::AtLeastOnce {
                        let ack = mqtt::ack_bytes(mqtt::Ack::PubAck, p.pkid);
                        conn.send(Outbound::Inline(InlineFrame::new(&ack))).await?;
                    }
                    self.payload(conn, &p.payload).await?;
                }
                Packet::Disconnect => return Err(End::Disconnect),
                Packet::PubAck(_) | Packet::PubComp(_) => {}
                other => {
                    return Err(End::Refused(format!(
                        "unexpected {} on an rpc link",
                        other.name()
                    )));
                }
            }
        }
        Ok(handled)
    }

    fn reply(&mut self, tag: Tag, result: Result<Bytes, CallError>) -> Option<Outbound> {
        let resp = match result {
            Ok(bytes) => {
                let v = serde_json::from_slice::<Value>(&bytes).unwrap_or_else(|_| {
                    Value::String(String::from_utf8_lossy(&bytes).into_owned())
                });
                vec![Value::Null, v]
            }
            Err(CallError::HandlerNotFound(m)) => {
                vec![pomelo_rpc::error_value(&format!("no such method:{m}"))]
            }
            Err(e) => vec![pomelo_rpc::error_value(&e.wire_text())],
        };
        self.response(tag, &resp)
    }

    fn read_timeout(&self) -> Option<Duration> {
        self.idle
    }

    fn awaiting(&self, _conn: &Conn) -> Option<&'static str> {
        (!self.connected).then_some("CONNECT")
    }

    fn tick(&self) -> Option<Duration> {
        self.buffered.is_some().then_some(self.interval)
    }

    async fn on_tick(&mut self, conn: &mut Conn) -> Result<(), End> {
        let Some(queue) = &mut self.buffered else {
            return Ok(());
        };
        if queue.is_empty() {
            return Ok(());
        }
        let batch = pomelo_rpc::encode_batch(queue);
        queue.clear();
        let out = self.frame(&batch);
        conn.send(out).await
    }
}

/// Everything an rpc connection writes is framed by the session itself.
struct PassThrough;

impl Framer for PassThrough {
    fn frame(&mut self, item: Outbound, out: &mut Out) {
        match item {
            Outbound::Inline(f) => out.buf.extend_from_slice(f.as_bytes()),
            Outbound::Bytes(b) => out.buf.extend_from_slice(&b),
            // pushes to an rpc peer have no meaning in pomelo-rpc; they are dropped
            Outbound::Message { .. } | Outbound::Close | Outbound::CloseCode(_) => {}
        }
    }
}

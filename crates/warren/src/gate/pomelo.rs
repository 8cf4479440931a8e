//! pomelo client connections (docs/protocols/pomelo.md): handshake, ack, heartbeats, requests,
//! notifies, responses and pushes, over raw TCP or WebSocket (the listener decides by the first
//! byte).
//!
//! Routes `module.handler…` map onto warren routes: the first dot-separated segment is the module,
//! the rest the handler (`Chat.HD_Say` → `Chat/HD_Say`). Pushes go out with the push topic's `/`
//! turned into `.` (`Chat/OnChat` → `Chat.OnChat`).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use serde_json::{Value, json};
use warren_proto::pomelo::{
    self, MessageRoute, MessageType, PackageType, decode_message, decode_package,
};

use super::args::{is_json, split_dotted};
use super::conn::{self, End, Framer, Out, SessionConn};
use super::io::{Reader, Writer};
use super::{Credentials, Gate};
use crate::config::ListenerConfig;
use crate::error::CallError;
use crate::route::Route;
use crate::session::{FrameKind, Outbound, Protocol};

/// Serve one connection until it closes.
pub(crate) async fn serve(
    gate: Arc<Gate>,
    cfg: Arc<ListenerConfig>,
    reader: Reader,
    writer: Writer,
    peer: SocketAddr,
) {
    let Some(opts) = cfg.protocol.pomelo() else {
        // gate/listener.rs sends only pomelo listeners' connections here
        return;
    };
    let dict = opts.route_dict.clone();
    let framer = PomeloFramer {
        dict: Arc::new(dict.clone()),
    };
    let heartbeat = opts.heartbeat();
    let read_timeout = match (opts.heartbeat_timeout(), cfg.idle_timeout()) {
        (Some(h), Some(idle)) => Some(h.min(idle)),
        (h, idle) => h.or(idle),
    };
    let codes: HashMap<u16, String> = dict.iter().map(|(r, c)| (*c, r.clone())).collect();
    let proto = PomeloSession {
        state: State::Inited,
        max_package: opts.max_package,
        heartbeat,
        read_timeout,
        dict,
        codes,
    };
    let conn = SessionConn::open(gate, cfg.clone(), peer, Protocol::Pomelo, writer, framer);
    conn::serve_session(proto, conn, reader, BytesMut::new()).await;
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Inited,
    WaitAck,
    Working,
}

struct PomeloSession {
    state: State,
    max_package: usize,
    heartbeat: Option<Duration>,
    read_timeout: Option<Duration>,
    dict: std::collections::BTreeMap<String, u16>,
    codes: HashMap<u16, String>,
}

type Conn = SessionConn<u32>;

fn package(kind: PackageType, body: &[u8]) -> Outbound {
    let mut b = BytesMut::with_capacity(4 + body.len());
    pomelo::encode_package(kind, body, &mut b);
    Outbound::Bytes(Box::new(b.freeze()))
}

fn response(id: u32, body: &[u8]) -> Outbound {
    let mut b = BytesMut::with_capacity(16 + body.len());
    pomelo::encode_data(MessageType::Response, id, &MessageRoute::None, body, &mut b);
    Outbound::Bytes(Box::new(b.freeze()))
}

fn error_body(e: &CallError) -> Vec<u8> {
    json!({"code": 500, "msg": e.wire_text()})
        .to_string()
        .into_bytes()
}

impl conn::Dialect for PomeloSession {
    type Tag = u32;

    async fn handle_buffered(&mut self, conn: &mut Conn, buf: &mut BytesMut) -> Result<bool, End> {
        let mut handled = false;
        while conn.has_room() {
            let p = match decode_package(buf, self.max_package) {
                Ok(None) => break,
                Ok(Some(p)) => p,
                Err(e) => {
                    metrics::counter!("warren_decode_errors_total", "kind" => e.kind())
                        .increment(1);
                    if matches!(e, pomelo::PomeloError::PackageTooLarge { .. }) {
                        let code = conn::close_code::TOO_BIG;
                        return Err(End::Limit("too_big", code, format!("{e}")));
                    }
                    return Err(End::Refused(format!("malformed package: {e}")));
                }
            };
            handled = true;
            conn.admit_message();
            match p.kind {
                PackageType::Handshake => self.handshake(conn, &p.body).await?,
                PackageType::HandshakeAck => {
                    if self.state == State::WaitAck {
                        self.state = State::Working;
                        conn.send(package(PackageType::Heartbeat, b"")).await?;
                    }
                }
                PackageType::Heartbeat => {
                    if self.state != State::Working {
                        return Err(End::Refused(
                            "heartbeat before the handshake completed".into(),
                        ));
                    }
                    conn.send(package(PackageType::Heartbeat, b"")).await?;
                }
                PackageType::Data => {
                    if self.state != State::Working {
                        return Err(End::Refused("data before the handshake completed".into()));
                    }
                    self.data(conn, p.body).await?;
                }
                PackageType::Kick => return Err(End::Refused("kick package from a client".into())),
            }
        }
        Ok(handled)
    }

    fn reply(&mut self, id: u32, result: Result<Bytes, CallError>) -> Option<Outbound> {
        Some(match result {
            Ok(body) if body.is_empty() => response(id, b"null"),
            Ok(body) => response(id, &body),
            Err(e) => response(id, &error_body(&e)),
        })
    }

    fn read_timeout(&self) -> Option<Duration> {
        self.read_timeout
    }

    fn awaiting(&self, _conn: &Conn) -> Option<&'static str> {
        (self.state != State::Working).then_some("pomelo handshake and ack")
    }

    async fn on_drain(&mut self, conn: &mut Conn) {
        let body = json!({"reason": "server shutting down"}).to_string();
        let _ = conn.try_send(package(PackageType::Kick, body.as_bytes()));
    }
}

impl PomeloSession {
    async fn handshake(&mut self, conn: &mut Conn, body: &[u8]) -> Result<(), End> {
        if self.state != State::Inited {
            return Ok(()); // as upstream: a handshake in the wrong state is ignored
        }
        let hs = serde_json::from_slice::<Value>(body)
            .ok()
            .filter(|v| v.get("sys").is_some_and(Value::is_object));
        let Some(hs) = hs else {
            conn.send(package(PackageType::Handshake, br#"{"code":500}"#))
                .await?;
            return Err(End::Refused("handshake without a sys object".into()));
        };
        // the node's credential checks on the handshake's `user` data: `{"token": …}` or
        // `{"username": …, "password": …}`; a refusal is pomelo's handshake error, code 500
        let creds = handshake_credentials(conn.peer, hs.get("user"));
        let gate = conn.gate.clone();
        let refused = match gate.authenticate(&conn.cfg, &creds).await {
            Ok(None) => false,
            Ok(Some(identity)) => match gate.bind_identity(&conn.handle, &identity) {
                Ok(()) => false,
                Err(e) => {
                    crate::refusal::refuse(&conn.peer, "uid_conflict", format_args!("{e}"));
                    true
                }
            },
            Err(_) => true,
        };
        if refused {
            conn.send(package(PackageType::Handshake, br#"{"code":500}"#))
                .await?;
            conn.send(Outbound::Close).await?;
            return Err(End::ServerClosed);
        }
        let mut sys = serde_json::Map::new();
        if let Some(h) = self.heartbeat {
            sys.insert("heartbeat".into(), json!(h.as_secs()));
        }
        if !self.dict.is_empty() {
            sys.insert("dict".into(), json!(self.dict));
        }
        let reply = json!({"code": 200, "sys": sys}).to_string();
        conn.send(package(PackageType::Handshake, reply.as_bytes()))
            .await?;
        self.state = State::WaitAck;
        Ok(())
    }

    async fn data(&mut self, conn: &mut Conn, body: Bytes) -> Result<(), End> {
        let msg = decode_message(body).map_err(|e| {
            metrics::counter!("warren_decode_errors_total", "kind" => e.kind()).increment(1);
            End::Refused(format!("malformed message: {e}"))
        })?;
        let tag = match msg.kind {
            MessageType::Request => Some(msg.id),
            MessageType::Notify => None,
            other => {
                return Err(End::Refused(format!(
                    "{} message from a client",
                    other.name()
                )));
            }
        };
        let body = if msg.gzip {
            pomelo::inflate(&msg.body, self.max_package)
                .map_err(|e| End::Refused(format!("bad gzip body: {e}")))?
        } else {
            msg.body
        };
        let route = match &msg.route {
            MessageRoute::Name(r) => Some(r.clone()),
            MessageRoute::Code(c) => self.codes.get(c).cloned(),
            MessageRoute::None => None,
        };
        let checked = match route.as_deref().and_then(split_dotted) {
            None => Err(CallError::bad_request(format!(
                "invalid route {:?}",
                route.unwrap_or_default()
            ))),
            Some(_) if !is_json(&body) => Err(CallError::BodyNotJson),
            Some((module, handler)) => {
                let r = Route {
                    module,
                    target: None,
                    handler,
                    msgid: None,
                };
                let session = conn.handle.snapshot();
                conn.resolve_as(&r, &body, &session).and_then(|t| {
                    if t.is_client_handler(handler) {
                        crate::auth::admit_call(&t, handler, &session)?;
                        Ok((t, handler, session))
                    } else {
                        Err(CallError::HandlerNotFound(handler.to_owned()))
                    }
                })
            }
        };
        let outcome = match checked {
            Ok((target, handler, session)) => {
                conn.call_as(&target, handler, body, tag, session).await
            }
            Err(e) => Err((tag, e)),
        };
        if let Err((tag, e)) = outcome {
            crate::refusal::deny(&conn.peer, e.kind().as_str(), format_args!("{e}"));
            metrics::counter!("warren_requests_refused_total", "reason" => e.kind().as_str())
                .increment(1);
            if let Some(id) = tag {
                conn.send(response(id, &error_body(&e))).await?;
            }
        }
        Ok(())
    }
}

/// The credentials in a handshake's `user` data. A token may come as `token` (or as the
/// password); a missing or non-object `user` presents nothing.
fn handshake_credentials(peer: SocketAddr, user: Option<&Value>) -> Credentials {
    let field = |k: &str| {
        user.and_then(|u| u.get(k))
            .and_then(Value::as_str)
            .map(str::to_owned)
    };
    let password = field("password")
        .filter(|p| !p.is_empty())
        .or_else(|| field("token"));
    Credentials {
        peer,
        protocol: Protocol::Pomelo,
        client_id: field("clientid").unwrap_or_default(),
        username: field("username"),
        password: password.map(Bytes::from),
    }
}

/// Frames pushes as pomelo push messages; protocol packages pass through.
struct PomeloFramer {
    dict: Arc<std::collections::BTreeMap<String, u16>>,
}

fn push_route(topic: &[u8]) -> String {
    String::from_utf8_lossy(topic).replace('/', ".")
}

impl Framer for PomeloFramer {
    fn frame(&mut self, item: Outbound, out: &mut Out) {
        match item {
            Outbound::Message { msg, .. } => {
                if self.dict.is_empty() {
                    let frame = msg.frame(FrameKind::Pomelo, |m| {
                        let mut b = BytesMut::new();
                        let route = MessageRoute::Name(push_route(&m.topic));
                        pomelo::encode_data(MessageType::Push, 0, &route, &m.body, &mut b);
                        b.freeze()
                    });
                    out.buf.extend_from_slice(frame);
                } else {
                    let name = push_route(&msg.topic);
                    let route = match self.dict.get(&name) {
                        Some(c) => MessageRoute::Code(*c),
                        None => MessageRoute::Name(name),
                    };
                    pomelo::encode_data(MessageType::Push, 0, &route, &msg.body, &mut out.buf);
                }
            }
            Outbound::Inline(f) => out.buf.extend_from_slice(f.as_bytes()),
            Outbound::Bytes(b) => out.buf.extend_from_slice(&b),
            Outbound::Close | Outbound::CloseCode(_) => {}
        }
    }
}

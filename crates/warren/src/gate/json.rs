//! JSON-over-WebSocket connections (docs/protocols/json-ws.md, TianQinS style): one JSON object per
//! WebSocket message, `{"tpc","func","cb","args"}` both ways, login first.
//!
//! `tpc` names the module (falling back to `fallback_module`, default `global`, when no module
//! has that name), `func` the handler. Exactly one object in `args` is passed as the request body;
//! any other list is passed as a JSON array. A reply goes to the callback the client named; a
//! push on topic `Chat/OnChat` arrives as `{"tpc":"Chat","func":"OnChat","cb":"","args":[body]}`.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::{BufMut, Bytes, BytesMut};
use serde_json::Value;
use warren_proto::json_ws::{self, Frame};

use super::args::{args_from_result, body_from_args};
use super::conn::{self, End, Framer, Out, SessionConn};
use super::io::{Reader, Writer};
use super::{Credentials, Gate};
use crate::config::ListenerConfig;
use crate::error::CallError;
use crate::refusal;
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
    let Some(opts) = cfg.protocol.json() else {
        // gate/listener.rs sends only JSON listeners' connections here
        return;
    };
    let proto = JsonSession {
        logged_in: !opts.require_login,
        max: opts.max_packet,
        fallback: opts.fallback_module.clone(),
        silent: opts.silent_errors,
        idle: cfg.idle_timeout(),
    };
    let conn = SessionConn::open(gate, cfg.clone(), peer, Protocol::Json, writer, JsonFramer);
    conn::serve_session(proto, conn, reader, BytesMut::new()).await;
}

struct JsonSession {
    logged_in: bool,
    max: usize,
    fallback: String,
    silent: bool,
    idle: Option<Duration>,
}

type Conn = SessionConn<String>;

fn frame_out(f: &Frame) -> Outbound {
    Outbound::Bytes(Box::new(json_ws::encode(f)))
}

/// Take one length-prefixed message from a buffer filled by a message-framed WebSocket reader.
fn take_message(buf: &mut BytesMut) -> Option<Bytes> {
    if buf.len() < 4 {
        return None;
    }
    let len = u32::from_be_bytes([buf[0], buf[1], buf[2], buf[3]]) as usize;
    if buf.len() < 4 + len {
        return None;
    }
    let _ = buf.split_to(4);
    Some(buf.split_to(len).freeze())
}

impl conn::Dialect for JsonSession {
    type Tag = String;

    async fn handle_buffered(&mut self, conn: &mut Conn, buf: &mut BytesMut) -> Result<bool, End> {
        let mut handled = false;
        while conn.has_room() {
            let Some(raw) = take_message(buf) else { break };
            handled = true;
            conn.admit_message();
            let frame = json_ws::decode(&raw, self.max).map_err(|e| {
                metrics::counter!("warren_decode_errors_total", "kind" => e.kind()).increment(1);
                End::RefusedWithCode(1007, format!("bad frame: {e}"))
            })?;
            if !self.logged_in {
                self.login(conn, frame).await?;
                continue;
            }
            self.call(conn, frame).await?;
        }
        Ok(handled)
    }

    fn reply(&mut self, cb: String, result: Result<Bytes, CallError>) -> Option<Outbound> {
        let out = match result {
            Ok(r) => {
                let args = args_from_result(&r);
                let cb = serde_json::to_string(&cb).unwrap_or_default();
                let mut b = BytesMut::with_capacity(40 + cb.len() + args.len());
                b.put_slice(b"{\"tpc\":\"\",\"func\":");
                b.put_slice(cb.as_bytes());
                b.put_slice(b",\"cb\":\"\",\"args\":");
                b.put_slice(&args);
                b.put_u8(b'}');
                Outbound::Bytes(Box::new(b.freeze()))
            }
            Err(_) if self.silent => return None,
            Err(e) => frame_out(&Frame {
                error: Some(e.wire_text()),
                ..json_ws::reply(&cb, Vec::new())
            }),
        };
        Some(out)
    }

    fn read_timeout(&self) -> Option<Duration> {
        self.idle
    }

    fn awaiting(&self, _conn: &Conn) -> Option<&'static str> {
        (!self.logged_in).then_some("login")
    }
}

impl JsonSession {
    async fn login(&mut self, conn: &mut Conn, frame: Frame) -> Result<(), End> {
        if frame.func != "login" || frame.args.len() != 2 {
            return Err(End::RefusedWithCode(
                1008,
                format!("first message is {:?}, not login", frame.func),
            ));
        }
        let guid = match &frame.args[0] {
            Value::String(s) => s.clone(),
            other => other.to_string(),
        };
        // the node's credential checks: the guid is the user name, the md5 slot the password
        // or token; a verified identity's uid replaces the guid
        let creds = Credentials {
            peer: conn.peer,
            protocol: Protocol::Json,
            client_id: guid.clone(),
            username: Some(guid.clone()),
            password: Some(Bytes::from(match &frame.args[1] {
                Value::String(s) => s.clone(),
                other => other.to_string(),
            })),
        };
        let gate = conn.gate.clone();
        let identity = match gate.authenticate_quietly(&conn.cfg, &creds).await {
            Ok(identity) => identity,
            Err(r) => {
                let why = super::auth_refusal_reason(&creds, r);
                return refuse_login(conn, r.kind(), why).await;
            }
        };
        let login_handler = conn
            .cfg
            .protocol
            .json()
            .and_then(|o| o.login_handler.clone());
        if let Some(route) = login_handler {
            let accepted = self.check_login(conn, &route, &frame.args).await;
            if !accepted {
                conn.send(frame_out(&json_ws::loginback(1))).await?;
                return Err(End::RefusedWithCode(
                    1008,
                    "login refused by the login handler".into(),
                ));
            }
        }
        // a verified identity is bound as proved (several sessions of one user are fine); a
        // guid nobody checked meets the uid_conflict policy
        let bound = match &identity {
            Some(id) => gate.bind_identity(&conn.handle, id),
            None => gate
                .node
                .session_table()
                .bind(conn.handle.id(), &guid)
                .map(|_| ()),
        };
        if let Err(e) = bound {
            return refuse_login(conn, "uid_conflict", e.to_string()).await;
        }
        self.logged_in = true;
        conn.send(frame_out(&json_ws::loginback(0))).await
    }

    /// Ask the configured login handler: it gets `[guid, md5]`; `true` or `0` accepts.
    async fn check_login(&mut self, conn: &mut Conn, route: &str, args: &[Value]) -> bool {
        let Ok(r) = Route::parse(route) else {
            return false;
        };
        let module = match r.target {
            Some(t) => format!("{}@{t}", r.module),
            None => r.module.to_owned(),
        };
        let body = Bytes::from(Value::Array(args.to_vec()).to_string());
        let session = Some(conn.handle.snapshot());
        match conn
            .gate
            .node
            .call(
                &module,
                r.handler,
                session,
                body,
                Some(conn.cfg.rpc_expired()),
            )
            .await
        {
            Ok(reply) => matches!(
                serde_json::from_slice::<Value>(&reply),
                Ok(v) if v == Value::Bool(true) || v == 0
            ),
            Err(e) => {
                refusal::deny(
                    &conn.peer,
                    "login_handler",
                    format_args!("login handler failed: {e}"),
                );
                false
            }
        }
    }

    async fn call(&mut self, conn: &mut Conn, frame: Frame) -> Result<(), End> {
        let node = conn.gate.node.clone();
        let module = if node.router().has_module(&frame.tpc) {
            frame.tpc.as_str()
        } else {
            self.fallback.as_str()
        };
        let tag = (!frame.cb.is_empty()).then(|| frame.cb.clone());
        let route = Route {
            module,
            target: None,
            handler: &frame.func,
            msgid: None,
        };
        let body = body_from_args(&frame.args);
        let checked = conn.resolve(&route, &body).and_then(|t| {
            if t.is_client_handler(&frame.func) {
                crate::auth::admit_call(&t, &frame.func, &conn.handle.snapshot())?;
                Ok(t)
            } else {
                Err(CallError::HandlerNotFound(frame.func.clone()))
            }
        });
        let outcome = match checked {
            Ok(target) => {
                // a client's own trace context is kept (docs/protocols/json-ws.md, "Traces")
                let given = frame
                    .traceparent
                    .as_deref()
                    .and_then(crate::trace::TraceContext::parse);
                let session = conn.handle.snapshot();
                conn.call_traced(&target, &frame.func, body, tag, session, given)
                    .await
            }
            Err(CallError::ServiceNotFound(_)) => {
                Err((tag, CallError::HandlerNotFound(frame.func.clone())))
            }
            Err(e) => Err((tag, e)),
        };
        if let Err((tag, e)) = outcome {
            crate::refusal::deny(
                &conn.peer,
                e.kind().as_str(),
                format_args!("call {:?}: {e}", frame.func),
            );
            metrics::counter!("warren_requests_refused_total", "reason" => e.kind().as_str())
                .increment(1);
            if let Some(cb) = tag {
                return match conn::Dialect::reply(self, cb, Err(e)) {
                    Some(o) => conn.send(o).await,
                    None => Ok(()),
                };
            }
        }
        Ok(())
    }
}

/// Answer a refused login with `loginback [1]`; the connection then closes with 1008, and the
/// refusal is logged once under `kind`.
async fn refuse_login(conn: &mut Conn, kind: &'static str, why: String) -> Result<(), End> {
    conn.send(frame_out(&json_ws::loginback(1))).await?;
    Err(End::Limit(kind, 1008, format!("login refused: {why}")))
}

/// Frames every outbound item as one text message.
struct JsonFramer;

impl Framer for JsonFramer {
    fn frame(&mut self, item: Outbound, out: &mut Out) {
        match item {
            Outbound::Message { msg, .. } => {
                let frame = msg.frame(FrameKind::Json, |m| {
                    let topic = String::from_utf8_lossy(&m.topic);
                    let (tpc, func) = topic.split_once('/').unwrap_or(("", &topic));
                    let t = serde_json::to_string(tpc).unwrap_or_default();
                    let f = serde_json::to_string(func).unwrap_or_default();
                    let body: &[u8] = if m.body.is_empty() { b"null" } else { &m.body };
                    let mut b = BytesMut::with_capacity(40 + topic.len() + body.len());
                    b.put_slice(b"{\"tpc\":");
                    b.put_slice(t.as_bytes());
                    b.put_slice(b",\"func\":");
                    b.put_slice(f.as_bytes());
                    b.put_slice(b",\"cb\":\"\",\"args\":[");
                    b.put_slice(body);
                    b.put_slice(b"]}");
                    b.freeze()
                });
                out.buf.extend_from_slice(frame);
            }
            Outbound::Inline(f) => out.buf.extend_from_slice(f.as_bytes()),
            Outbound::Bytes(b) => out.buf.extend_from_slice(&b),
            Outbound::Close | Outbound::CloseCode(_) => return,
        }
        out.end_message();
    }
}

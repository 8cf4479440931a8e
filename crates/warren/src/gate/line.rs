//! Line-protocol connections (docs/protocols/line.md, ffown style): `"<len>\r\n<body>"` in,
//! `"<len> \r\n<body>"` out, usable from telnet.
//!
//! A line listener is bound to a [`ChannelHandler`]: an object told about every connection
//! (`on_connect`), every message (`handle_msg`) and every disconnect (`handle_broken`), which
//! answers through the [`Channel`] API. warren ships [`EchoHandler`]; plugins (Lua, Python,
//! native) implement the same trait. Each line listener may have a handler of its own (its
//! `plugin`, `NodeBuilder::listener_channel_handler`); the others share the node's. With `handler = "router"` the listener instead routes each
//! message, written `Module/Handler[/msgid] <json body>`, to a module like any other client.
//! Either way every connection is a session: pushes and rooms reach line clients too.

use parking_lot::{Mutex, RwLock};
use std::any::Any;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use bytes::{BufMut, Bytes, BytesMut};
use warren_proto::line::{self, LineDecoder, LineEvent};

use super::conn::{self, End, Framer, Out, SessionConn};
use super::io::{Reader, Writer};
use super::{Credentials, Gate};
use crate::config::{LineHandler, ListenerConfig};
use crate::error::CallError;
use crate::refusal;
use crate::route::Route;
use crate::session::{FrameKind, Message, Outbound, Protocol, SessionHandle};

/// Receives the events of line-protocol connections. Calls for different channels may run at the
/// same time; a handler that needs them serialized (as plugin hosts do) serializes them itself.
pub trait ChannelHandler: Send + Sync + 'static {
    /// A connection opened (not called with `lazy_channels`).
    fn on_connect(&self, _channel: &Channel) {}
    /// One message arrived.
    fn handle_msg(&self, channel: &Channel, msg: Bytes);
    /// The connection closed; the channel refuses sends from here on.
    fn handle_broken(&self, _channel: &Channel) {}
}

/// Answers every message with itself: the reference handler, and what `telnet` users see first.
#[derive(Debug, Default, Clone, Copy)]
pub struct EchoHandler;

impl ChannelHandler for EchoHandler {
    fn handle_msg(&self, channel: &Channel, msg: Bytes) {
        channel.send(msg);
    }
}

static NEXT_CHANNEL: AtomicU64 = AtomicU64::new(1);

/// One line-protocol connection as a channel handler sees it. Cheap to clone; valid from
/// `on_connect` until `handle_broken` returns, and safe to use from any thread.
#[derive(Clone)]
pub struct Channel {
    inner: Arc<ChannelInner>,
}

struct ChannelInner {
    id: u64,
    peer: SocketAddr,
    handle: Arc<SessionHandle>,
    closed: AtomicBool,
    data: Mutex<Option<Arc<dyn Any + Send + Sync>>>,
}

impl std::fmt::Debug for Channel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Channel")
            .field("id", &self.inner.id)
            .field("peer", &self.inner.peer)
            .finish()
    }
}

impl Channel {
    /// Process-unique id (never reused, < 2^53).
    pub fn id(&self) -> u64 {
        self.inner.id
    }

    /// Remote address.
    pub fn peer(&self) -> SocketAddr {
        self.inner.peer
    }

    /// Queue `msg`, framed as `<len> \r\n<msg>`. Returns 0 when queued, −1 when the channel is
    /// closed (or closing because its client cannot keep up).
    pub fn send(&self, msg: impl Into<Bytes>) -> i32 {
        if self.inner.closed.load(Ordering::Acquire) {
            return -1;
        }
        match self
            .inner
            .handle
            .deliver(Message::new(Bytes::new(), msg), None)
        {
            Ok(()) => 0,
            Err(_) => -1,
        }
    }

    /// Close the connection after what is queued has been written.
    pub fn close(&self) {
        self.inner.handle.close();
    }

    /// Attach a value to the channel (for example a user id after authentication).
    pub fn set_data(&self, data: Option<Arc<dyn Any + Send + Sync>>) {
        *self.inner.data.lock() = data;
    }

    /// The value attached with [`Channel::set_data`].
    pub fn get_data(&self) -> Option<Arc<dyn Any + Send + Sync>> {
        self.inner.data.lock().clone()
    }
}

/// Live channels by id, so plugins holding only an id can send (`channel.send(id, msg)`).
#[derive(Default)]
pub struct Channels {
    by_id: RwLock<HashMap<u64, Channel>>,
}

impl Channels {
    /// The live channel with this id.
    pub fn get(&self, id: u64) -> Option<Channel> {
        self.by_id.read().get(&id).cloned()
    }

    /// Send to a channel by id: 0 queued, −1 unknown or closed.
    pub fn send(&self, id: u64, msg: impl Into<Bytes>) -> i32 {
        self.get(id).map_or(-1, |c| c.send(msg))
    }

    fn insert(&self, c: &Channel) {
        self.by_id.write().insert(c.id(), c.clone());
    }

    fn remove(&self, id: u64) {
        self.by_id.write().remove(&id);
    }
}

/// Serve one connection until it closes.
pub(crate) async fn serve(
    gate: Arc<Gate>,
    cfg: Arc<ListenerConfig>,
    reader: Reader,
    writer: Writer,
    peer: SocketAddr,
) {
    let Some(opts) = cfg.protocol.line() else {
        // gate/listener.rs sends only line listeners' connections here
        return;
    };
    let space = opts.space_before_crlf;
    let conn = SessionConn::open(
        gate.clone(),
        cfg.clone(),
        peer,
        Protocol::Line,
        writer,
        LineFramer { space },
    );
    let router = opts.handler == LineHandler::Router;
    let channel = Channel {
        inner: Arc::new(ChannelInner {
            id: NEXT_CHANNEL.fetch_add(1, Ordering::Relaxed),
            peer,
            handle: conn.handle.clone(),
            closed: AtomicBool::new(false),
            data: Mutex::new(None),
        }),
    };
    let lazy = opts.lazy_channels;
    let handler: Option<Arc<dyn ChannelHandler>> =
        (!router).then(|| gate.channel_handler_for(&cfg));
    let mut proto = LineSession {
        decoder: LineDecoder::new(opts.max_head, opts.max_body),
        space,
        bad_heads: 0,
        max_bad_heads: opts.max_bad_heads,
        handler,
        channel,
        announced: false,
        idle: cfg.idle_timeout(),
        awaiting_auth: cfg.auth && opts.auth_first_line,
        lazy,
    };
    if !lazy && !proto.awaiting_auth {
        proto.announce(&gate);
    }
    conn::serve_session(proto, conn, reader, BytesMut::new()).await;
}

struct LineSession {
    decoder: LineDecoder,
    space: bool,
    bad_heads: u32,
    max_bad_heads: u32,
    /// `None` in router mode.
    handler: Option<Arc<dyn ChannelHandler>>,
    channel: Channel,
    announced: bool,
    idle: Option<Duration>,
    /// `auth_first_line`: the next message carries credentials, nothing else is read before.
    awaiting_auth: bool,
    /// Channels are announced at the first message (`lazy_channels`).
    lazy: bool,
}

type Conn = SessionConn<Bytes>;

impl LineSession {
    /// Make the channel exist for its handler (at accept, or at the first message when lazy).
    fn announce(&mut self, gate: &Gate) {
        if self.announced {
            return;
        }
        self.announced = true;
        if let Some(h) = &self.handler {
            gate.channels.insert(&self.channel);
            // lazy_channels: the channel is born with its first message, without a connect event
            if !self.lazy {
                h.on_connect(&self.channel);
            }
        }
    }

    /// A one-message frame with this text.
    fn text_frame(&self, text: &str) -> Outbound {
        let mut b = BytesMut::with_capacity(text.len() + 12);
        line::encode(text.as_bytes(), self.space, &mut b);
        Outbound::Bytes(Box::new(b.freeze()))
    }

    /// `auth_first_line`: the first message is `user password`, or a token alone. Accepted:
    /// `auth ok` and the session is bound to the verified uid; refused: `auth failed: <why>`,
    /// then the connection closes.
    async fn first_line(&mut self, conn: &mut Conn, msg: Bytes) -> Result<(), End> {
        let text = String::from_utf8_lossy(&msg);
        let mut words = text.split_whitespace();
        let (username, password) = match (words.next(), words.next()) {
            (Some(u), Some(p)) => (Some(u.to_owned()), Some(p.to_owned())),
            (Some(token), None) => (None, Some(token.to_owned())),
            _ => (None, None),
        };
        let creds = Credentials {
            peer: conn.peer,
            protocol: Protocol::Line,
            client_id: String::new(),
            username,
            password: password.map(Bytes::from),
        };
        let gate = conn.gate.clone();
        let outcome = match gate.authenticate(&conn.cfg, &creds).await {
            Ok(None) => Ok(()),
            Ok(Some(identity)) => gate.bind_identity(&conn.handle, &identity).map_err(|e| {
                crate::refusal::refuse(&conn.peer, "uid_conflict", format_args!("{e}"));
                e.to_string()
            }),
            Err(refusal) => Err(refusal.to_string()),
        };
        match outcome {
            Ok(()) => {
                self.awaiting_auth = false;
                if !self.lazy {
                    self.announce(&gate);
                }
                conn.send(self.text_frame("auth ok")).await
            }
            Err(why) => {
                conn.send(self.text_frame(&format!("auth failed: {why}")))
                    .await?;
                conn.send(Outbound::Close).await?;
                Err(End::ServerClosed)
            }
        }
    }

    fn error_frame(&self) -> Outbound {
        let mut b = BytesMut::with_capacity(12);
        line::encode(line::ERROR_BODY, self.space, &mut b);
        Outbound::Bytes(Box::new(b.freeze()))
    }

    /// Router mode: `Module/Handler[/msgid] <json body>`.
    async fn route(&mut self, conn: &mut Conn, msg: Bytes) -> Result<(), End> {
        let text = String::from_utf8_lossy(&msg);
        let (topic, body) = text.split_once([' ', '\t']).unwrap_or((&text, ""));
        let body = Bytes::copy_from_slice(body.trim_start().as_bytes());
        let Ok(route) = Route::parse(topic.trim()) else {
            refusal::deny(
                &conn.peer,
                "bad_route",
                "dropping message: line is not `Module/Handler[/msgid] body`",
            );
            return conn.send(self.error_frame()).await;
        };
        let tag = route
            .msgid
            .is_some()
            .then(|| Bytes::copy_from_slice(topic.trim().as_bytes()));
        let checked = conn.resolve(&route, &body).and_then(|t| {
            if t.is_client_handler(route.handler) {
                crate::auth::admit_call(&t, route.handler, &conn.handle.snapshot())?;
                Ok(t)
            } else {
                Err(CallError::HandlerNotFound(route.handler.to_owned()))
            }
        });
        let outcome = match checked {
            Ok(target) => conn.call(&target, route.handler, body, tag).await,
            Err(e) => Err((tag, e)),
        };
        if let Err((tag, e)) = outcome {
            crate::refusal::deny(&conn.peer, e.kind().as_str(), format_args!("{route}: {e}"));
            if let Some(topic) = tag {
                return match conn::Dialect::reply(self, topic, Err(e)) {
                    Some(o) => conn.send(o).await,
                    None => Ok(()),
                };
            }
        }
        Ok(())
    }
}

impl conn::Dialect for LineSession {
    type Tag = Bytes;

    async fn handle_buffered(&mut self, conn: &mut Conn, buf: &mut BytesMut) -> Result<bool, End> {
        let mut handled = false;
        while conn.has_room() {
            let event = match self.decoder.decode(buf) {
                Ok(None) => break,
                Ok(Some(e)) => e,
                Err(e) => {
                    let _ = conn.send(self.error_frame()).await;
                    return Err(End::Refused(format!("bad head: {e}")));
                }
            };
            handled = true;
            conn.admit_message();
            match event {
                LineEvent::BadHead => {
                    self.bad_heads += 1;
                    metrics::counter!("warren_decode_errors_total", "kind" => "line_bad_head")
                        .increment(1);
                    conn.send(self.error_frame()).await?;
                    if self.bad_heads >= self.max_bad_heads {
                        return Err(End::Refused(format!(
                            "{} bad heads in a row",
                            self.bad_heads
                        )));
                    }
                }
                LineEvent::Message(msg) if self.awaiting_auth => {
                    self.bad_heads = 0;
                    self.first_line(conn, msg).await?;
                }
                LineEvent::Message(msg) => {
                    self.bad_heads = 0;
                    match self.handler.clone() {
                        Some(h) => {
                            self.announce(&conn.gate);
                            h.handle_msg(&self.channel, msg);
                        }
                        None => self.route(conn, msg).await?,
                    }
                }
            }
        }
        Ok(handled)
    }

    fn reply(&mut self, topic: Bytes, result: Result<Bytes, CallError>) -> Option<Outbound> {
        let body = super::mqtt::envelope(result);
        Some(Outbound::Message {
            msg: Message::new(topic, body),
            qos: None,
        })
    }

    fn read_timeout(&self) -> Option<Duration> {
        self.idle
    }

    fn awaiting(&self, conn: &Conn) -> Option<&'static str> {
        (conn.messages_in() == 0).then_some("first message")
    }

    fn on_close(&mut self, conn: &Conn) {
        self.channel.inner.closed.store(true, Ordering::Release);
        if self.announced
            && let Some(h) = &self.handler
        {
            conn.gate.channels.remove(self.channel.id());
            h.handle_broken(&self.channel);
        }
    }
}

/// Frames every message as `<len> \r\n<body>`; messages with a topic (pushes, router replies)
/// carry `<topic> <body>` as their body.
struct LineFramer {
    space: bool,
}

impl Framer for LineFramer {
    fn frame(&mut self, item: Outbound, out: &mut Out) {
        match item {
            Outbound::Message { msg, .. } => {
                let space = self.space;
                let build = |m: &Message| {
                    let mut b = BytesMut::new();
                    if m.topic.is_empty() {
                        line::encode(&m.body, space, &mut b);
                    } else {
                        let mut body = BytesMut::with_capacity(m.topic.len() + 1 + m.body.len());
                        body.put_slice(&m.topic);
                        body.put_u8(b' ');
                        body.put_slice(&m.body);
                        line::encode(&body, space, &mut b);
                    }
                    b.freeze()
                };
                if msg.topic.is_empty() || !space {
                    // a channel's own message has one recipient; the shared cache holds the
                    // default framing only
                    out.buf.extend_from_slice(&build(&msg));
                } else {
                    out.buf.extend_from_slice(msg.frame(FrameKind::Line, build));
                }
            }
            Outbound::Inline(f) => out.buf.extend_from_slice(f.as_bytes()),
            Outbound::Bytes(b) => out.buf.extend_from_slice(&b),
            Outbound::Close | Outbound::CloseCode(_) => {}
        }
    }
}

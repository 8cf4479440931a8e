//! Node frames: the calls and replies warren nodes send each other over a broker.
//!
//! Every call that crosses the cluster is encoded here once by the caller and decoded once by the
//! node that runs it, so the format is plain binary with the fixed fields first and the body last,
//! uncopied: no self-describing encoding on the hot path, no field names on the wire, and the
//! body handed on as a slice of the received buffer.
//!
//! Layout (integers little-endian; `str16` is a `u16` length then UTF-8 bytes; `bytes32` a `u32`
//! length then bytes):
//!
//! ```text
//! 'W' 2                         magic and version
//! kind: u8                      1 call, 2 reply with a result, 3 reply with an error
//! call:   id u64, timeout_ms u64, sent_ms u64, flags u8 (1 = wants a reply, 2 = has a session,
//!         4 = has a trace context),
//!         [trace: trace id 16 bytes, span id 8 bytes, trace flags u8 (when flagged)],
//!         from str16, instance str16, handler str16,
//!         [session: flags u8 (1 = WebSocket, 2 = has a uid), protocol str16, id str16,
//!                   uid str16 (when flagged), remote address (4 then 4 address bytes, or 6
//!                   then 16, then port u16), gate str16,
//!                   settings bytes32 (a JSON object, empty for `{}`)],
//!         body: the rest
//! result: id u64, body: the rest
//! error:  id u64, kind label str16, detail: the rest (UTF-8)
//! ```
//!
//! The trace context (flag 4) is the W3C `traceparent` of the request the call belongs to
//! ([`crate::trace_context`]) in raw bytes: the receiving node logs the call under the same trace
//! id. A frame without the flag decodes as before; a node older than the flag cannot read a frame
//! that has it (`[log] trace = false` on the new nodes during such an upgrade).
//!
//! A message on a node's inbox that does not start with the magic, is truncated, or holds bad
//! UTF-8 or a bad address is refused with a [`FrameError`]; lengths are checked against what is
//! left of the frame before anything is allocated.

use std::net::SocketAddr;

use bytes::{Buf, BufMut, Bytes, BytesMut};
use serde_json::{Map, Value};
use thiserror::Error;

use crate::trace_context::{SpanId, TraceContext, TraceId};

/// First two bytes of every frame: a tag and the format version.
pub const MAGIC: [u8; 2] = [b'W', 2];

const KIND_CALL: u8 = 1;
const KIND_OK: u8 = 2;
const KIND_ERR: u8 = 3;
const CALL_REPLY: u8 = 1;
const CALL_SESSION: u8 = 2;
const CALL_TRACE: u8 = 4;
const SESSION_WS: u8 = 1;
const SESSION_UID: u8 = 2;

/// Why bytes are not a node frame, or a frame cannot be encoded.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[non_exhaustive]
pub enum FrameError {
    /// Not a warren node frame: wrong tag or version.
    #[error("not a warren frame (bad magic or version)")]
    BadMagic,
    /// The frame ends inside a field.
    #[error("truncated frame: {0} cut short")]
    Truncated(&'static str),
    /// Unknown frame kind byte.
    #[error("unknown frame kind {0}")]
    Kind(u8),
    /// A field holds something it may not.
    #[error("malformed frame: {0}")]
    Malformed(String),
    /// A string is too long for its length prefix (encoding only).
    #[error("{0} is too long for a frame ({1} bytes)")]
    TooLong(&'static str, usize),
}

/// The caller's session as a call carries it, borrowed for encoding.
#[derive(Debug, Clone, Copy)]
pub struct SessionRef<'a> {
    /// Session id.
    pub id: &'a str,
    /// Bound user id.
    pub uid: Option<&'a str>,
    /// Session settings.
    pub settings: &'a Map<String, Value>,
    /// Remote address of the client.
    pub remote: SocketAddr,
    /// Whether the client came over WebSocket.
    pub ws: bool,
    /// Client protocol name (`mqtt`, `pomelo`, …).
    pub protocol: &'a str,
    /// Gate instance owning the connection.
    pub gate: &'a str,
}

/// A call to encode, borrowed from the caller's own structures.
#[derive(Debug, Clone, Copy)]
pub struct CallRef<'a> {
    /// Correlation id, unique per sending node.
    pub id: u64,
    /// Sending node: where the reply goes.
    pub from: &'a str,
    /// Target instance on the receiving node.
    pub instance: &'a str,
    /// Handler name.
    pub handler: &'a str,
    /// Caller's session.
    pub session: Option<SessionRef<'a>>,
    /// Request body.
    pub body: &'a [u8],
    /// Time left until the caller's deadline when sent.
    pub timeout_ms: u64,
    /// Wall-clock send time, unix ms.
    pub sent_ms: u64,
    /// Whether the caller waits for a reply.
    pub reply: bool,
    /// The request this call belongs to, when the caller traces it.
    pub trace: Option<TraceContext>,
}

/// A decoded session.
#[derive(Debug, Clone, PartialEq)]
pub struct WireSession {
    /// Session id.
    pub id: String,
    /// Bound user id.
    pub uid: Option<String>,
    /// Session settings.
    pub settings: Map<String, Value>,
    /// Remote address of the client.
    pub remote: SocketAddr,
    /// Whether the client came over WebSocket.
    pub ws: bool,
    /// Client protocol name.
    pub protocol: String,
    /// Gate instance owning the connection.
    pub gate: String,
}

impl WireSession {
    /// The session borrowed for [`encode_call`], as a node forwarding it would send it on.
    pub fn as_session_ref(&self) -> SessionRef<'_> {
        SessionRef {
            id: &self.id,
            uid: self.uid.as_deref(),
            settings: &self.settings,
            remote: self.remote,
            ws: self.ws,
            protocol: &self.protocol,
            gate: &self.gate,
        }
    }
}

/// A decoded frame. Short-lived (decoded, taken apart, dropped), so the size difference of its
/// variants does not matter.
#[derive(Debug, Clone, PartialEq)]
#[allow(clippy::large_enum_variant)]
pub enum NodeFrame {
    /// A call for an instance of the receiving node.
    Call {
        /// Correlation id.
        id: u64,
        /// Sending node.
        from: String,
        /// Target instance.
        instance: String,
        /// Handler name.
        handler: String,
        /// Caller's session.
        session: Option<WireSession>,
        /// Request body (a slice of the received frame).
        body: Bytes,
        /// Time left until the caller's deadline when sent.
        timeout_ms: u64,
        /// Wall-clock send time, unix ms.
        sent_ms: u64,
        /// Whether the caller waits for a reply.
        reply: bool,
        /// The request this call belongs to, when the caller traces it.
        trace: Option<TraceContext>,
    },
    /// The result of a call made by the receiving node.
    Reply {
        /// Correlation id of the call.
        id: u64,
        /// The handler's result, or an error kind label and detail.
        result: Result<Bytes, (String, String)>,
    },
}

fn put_str16(out: &mut BytesMut, what: &'static str, s: &str) -> Result<(), FrameError> {
    let len = u16::try_from(s.len()).map_err(|_| FrameError::TooLong(what, s.len()))?;
    out.put_u16_le(len);
    out.put_slice(s.as_bytes());
    Ok(())
}

/// Bytes a call needs besides its settings, for sizing the buffer.
fn call_size(c: &CallRef<'_>) -> usize {
    let session = c.session.map_or(0, |s| {
        1 + 14 + s.protocol.len() + s.id.len() + s.uid.map_or(0, str::len) + 19 + s.gate.len()
    });
    let trace = if c.trace.is_some() { 25 } else { 0 };
    2 + 1
        + 25
        + trace
        + 6
        + c.from.len()
        + c.instance.len()
        + c.handler.len()
        + session
        + c.body.len()
}

/// Encode a call.
pub fn encode_call(c: &CallRef<'_>) -> Result<Bytes, FrameError> {
    let mut out = BytesMut::with_capacity(call_size(c) + 16);
    out.put_slice(&MAGIC);
    out.put_u8(KIND_CALL);
    out.put_u64_le(c.id);
    out.put_u64_le(c.timeout_ms);
    out.put_u64_le(c.sent_ms);
    let mut flags = 0;
    if c.reply {
        flags |= CALL_REPLY;
    }
    if c.session.is_some() {
        flags |= CALL_SESSION;
    }
    if c.trace.is_some() {
        flags |= CALL_TRACE;
    }
    out.put_u8(flags);
    if let Some(t) = &c.trace {
        out.put_slice(&t.trace_id.0);
        out.put_slice(&t.span_id.0);
        out.put_u8(t.flags);
    }
    put_str16(&mut out, "sending node id", c.from)?;
    put_str16(&mut out, "instance id", c.instance)?;
    put_str16(&mut out, "handler name", c.handler)?;
    if let Some(s) = &c.session {
        let mut sf = 0;
        if s.ws {
            sf |= SESSION_WS;
        }
        if s.uid.is_some() {
            sf |= SESSION_UID;
        }
        out.put_u8(sf);
        put_str16(&mut out, "protocol", s.protocol)?;
        put_str16(&mut out, "session id", s.id)?;
        if let Some(uid) = s.uid {
            put_str16(&mut out, "uid", uid)?;
        }
        match s.remote {
            SocketAddr::V4(a) => {
                out.put_u8(4);
                out.put_slice(&a.ip().octets());
            }
            SocketAddr::V6(a) => {
                out.put_u8(6);
                out.put_slice(&a.ip().octets());
            }
        }
        out.put_u16_le(s.remote.port());
        put_str16(&mut out, "gate id", s.gate)?;
        if s.settings.is_empty() {
            out.put_u32_le(0);
        } else {
            let json = serde_json::to_vec(s.settings)
                .map_err(|e| FrameError::Malformed(format!("settings: {e}")))?;
            let len = u32::try_from(json.len())
                .map_err(|_| FrameError::TooLong("session settings", json.len()))?;
            out.put_u32_le(len);
            out.put_slice(&json);
        }
    }
    out.put_slice(c.body);
    Ok(out.freeze())
}

/// Encode a successful reply.
pub fn encode_reply_ok(id: u64, body: &[u8]) -> Bytes {
    let mut out = BytesMut::with_capacity(11 + body.len());
    out.put_slice(&MAGIC);
    out.put_u8(KIND_OK);
    out.put_u64_le(id);
    out.put_slice(body);
    out.freeze()
}

/// Encode a failed reply: the error's kind label and its detail text.
pub fn encode_reply_err(id: u64, label: &str, detail: &str) -> Result<Bytes, FrameError> {
    let mut out = BytesMut::with_capacity(13 + label.len() + detail.len());
    out.put_slice(&MAGIC);
    out.put_u8(KIND_ERR);
    out.put_u64_le(id);
    put_str16(&mut out, "error kind", label)?;
    out.put_slice(detail.as_bytes());
    Ok(out.freeze())
}

/// A cursor over a received frame.
struct Reader {
    buf: Bytes,
}

impl Reader {
    fn u8(&mut self, what: &'static str) -> Result<u8, FrameError> {
        if self.buf.remaining() < 1 {
            return Err(FrameError::Truncated(what));
        }
        Ok(self.buf.get_u8())
    }

    fn u16(&mut self, what: &'static str) -> Result<u16, FrameError> {
        if self.buf.remaining() < 2 {
            return Err(FrameError::Truncated(what));
        }
        Ok(self.buf.get_u16_le())
    }

    fn u64(&mut self, what: &'static str) -> Result<u64, FrameError> {
        if self.buf.remaining() < 8 {
            return Err(FrameError::Truncated(what));
        }
        Ok(self.buf.get_u64_le())
    }

    fn take(&mut self, len: usize, what: &'static str) -> Result<Bytes, FrameError> {
        if self.buf.remaining() < len {
            return Err(FrameError::Truncated(what));
        }
        Ok(self.buf.split_to(len))
    }

    fn str16(&mut self, what: &'static str) -> Result<String, FrameError> {
        if self.buf.remaining() < 2 {
            return Err(FrameError::Truncated(what));
        }
        let len = usize::from(self.buf.get_u16_le());
        let raw = self.take(len, what)?;
        std::str::from_utf8(&raw)
            .map(str::to_owned)
            .map_err(|_| FrameError::Malformed(format!("{what} is not UTF-8")))
    }

    fn array<const N: usize>(&mut self, what: &'static str) -> Result<[u8; N], FrameError> {
        if self.buf.remaining() < N {
            return Err(FrameError::Truncated(what));
        }
        let mut out = [0u8; N];
        self.buf.copy_to_slice(&mut out);
        Ok(out)
    }

    fn trace(&mut self) -> Result<TraceContext, FrameError> {
        Ok(TraceContext {
            trace_id: TraceId(self.array("trace id")?),
            span_id: SpanId(self.array("span id")?),
            flags: self.u8("trace flags")?,
        })
    }

    fn bytes32(&mut self, what: &'static str) -> Result<Bytes, FrameError> {
        if self.buf.remaining() < 4 {
            return Err(FrameError::Truncated(what));
        }
        let len = self.buf.get_u32_le() as usize;
        self.take(len, what)
    }

    fn session(&mut self) -> Result<WireSession, FrameError> {
        let flags = self.u8("session flags")?;
        let protocol = self.str16("protocol")?;
        let id = self.str16("session id")?;
        let uid = if flags & SESSION_UID != 0 {
            Some(self.str16("uid")?)
        } else {
            None
        };
        let remote = match self.u8("address family")? {
            4 => {
                let ip = self.take(4, "remote address")?;
                let ip = <[u8; 4]>::try_from(&ip[..])
                    .map_err(|_| FrameError::Truncated("remote address"))?;
                SocketAddr::from((ip, self.u16("port")?))
            }
            6 => {
                let ip = self.take(16, "remote address")?;
                let ip = <[u8; 16]>::try_from(&ip[..])
                    .map_err(|_| FrameError::Truncated("remote address"))?;
                SocketAddr::from((ip, self.u16("port")?))
            }
            f => return Err(FrameError::Malformed(format!("address family {f}"))),
        };
        let gate = self.str16("gate id")?;
        let raw = self.bytes32("session settings")?;
        let settings = if raw.is_empty() {
            Map::new()
        } else {
            serde_json::from_slice(&raw)
                .map_err(|e| FrameError::Malformed(format!("session settings: {e}")))?
        };
        Ok(WireSession {
            id,
            uid,
            settings,
            remote,
            ws: flags & SESSION_WS != 0,
            protocol,
            gate,
        })
    }
}

/// Decode a frame received on a node's inbox. The body of a call or a reply is a slice of
/// `frame`, not a copy.
pub fn decode(frame: Bytes) -> Result<NodeFrame, FrameError> {
    if frame.len() < 3 || frame[..2] != MAGIC {
        return Err(FrameError::BadMagic);
    }
    let kind = frame[2];
    let mut r = Reader {
        buf: frame.slice(3..),
    };
    match kind {
        KIND_CALL => {
            let id = r.u64("call id")?;
            let timeout_ms = r.u64("timeout")?;
            let sent_ms = r.u64("send time")?;
            let flags = r.u8("call flags")?;
            let trace = if flags & CALL_TRACE != 0 {
                Some(r.trace()?)
            } else {
                None
            };
            let from = r.str16("sending node id")?;
            let instance = r.str16("instance id")?;
            let handler = r.str16("handler name")?;
            let session = if flags & CALL_SESSION != 0 {
                Some(r.session()?)
            } else {
                None
            };
            Ok(NodeFrame::Call {
                id,
                from,
                instance,
                handler,
                session,
                body: r.buf,
                timeout_ms,
                sent_ms,
                reply: flags & CALL_REPLY != 0,
                trace,
            })
        }
        KIND_OK => {
            let id = r.u64("reply id")?;
            Ok(NodeFrame::Reply {
                id,
                result: Ok(r.buf),
            })
        }
        KIND_ERR => {
            let id = r.u64("reply id")?;
            let label = r.str16("error kind")?;
            let detail = std::str::from_utf8(&r.buf)
                .map_err(|_| FrameError::Malformed("error detail is not UTF-8".into()))?
                .to_owned();
            Ok(NodeFrame::Reply {
                id,
                result: Err((label, detail)),
            })
        }
        k => Err(FrameError::Kind(k)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings() -> Map<String, Value> {
        let mut m = Map::new();
        m.insert("room".into(), Value::String("lobby".into()));
        m.insert("level".into(), Value::from(3));
        m
    }

    #[test]
    fn calls_round_trip_with_and_without_a_session() {
        let s = settings();
        for (session, reply) in [
            (
                Some(SessionRef {
                    id: "7",
                    uid: Some("alice"),
                    settings: &s,
                    remote: "[::1]:4000".parse().unwrap(),
                    ws: true,
                    protocol: "mqtt",
                    gate: "Gate-1",
                }),
                true,
            ),
            (None, false),
        ] {
            let call = CallRef {
                id: 42,
                from: "gate-1",
                instance: "Chat-2",
                handler: "HD_Say",
                session,
                body: b"{\"x\":1}",
                timeout_ms: 5000,
                sent_ms: 1_700_000_000_000,
                reply,
                trace: None,
            };
            let wire = encode_call(&call).unwrap();
            let NodeFrame::Call {
                id,
                from,
                instance,
                handler,
                session: got,
                body,
                timeout_ms,
                sent_ms,
                reply: r,
                ..
            } = decode(wire.clone()).unwrap()
            else {
                panic!("not a call");
            };
            assert_eq!(
                (id, from.as_str(), instance.as_str(), handler.as_str()),
                (42, "gate-1", "Chat-2", "HD_Say")
            );
            assert_eq!((timeout_ms, sent_ms, r), (5000, 1_700_000_000_000, reply));
            assert_eq!(&body[..], b"{\"x\":1}");
            match (session, got) {
                (None, None) => {}
                (Some(want), Some(got)) => {
                    assert_eq!(got.id, want.id);
                    assert_eq!(got.uid.as_deref(), want.uid);
                    assert_eq!(&got.settings, want.settings);
                    assert_eq!(got.remote, want.remote);
                    assert_eq!(
                        (got.ws, got.protocol.as_str(), got.gate.as_str()),
                        (true, "mqtt", "Gate-1")
                    );
                }
                other => panic!("session mismatch: {other:?}"),
            }
            // every cut is refused, never a panic
            for cut in 0..wire.len() - call.body.len() {
                assert!(decode(wire.slice(..cut)).is_err(), "cut at {cut}");
            }
        }
    }

    #[test]
    fn replies_round_trip() {
        let ok = encode_reply_ok(9, b"pong");
        assert_eq!(
            decode(ok).unwrap(),
            NodeFrame::Reply {
                id: 9,
                result: Ok(Bytes::from_static(b"pong"))
            }
        );
        let err = encode_reply_err(10, "timeout", "deadline exceeded").unwrap();
        assert_eq!(
            decode(err).unwrap(),
            NodeFrame::Reply {
                id: 10,
                result: Err(("timeout".into(), "deadline exceeded".into()))
            }
        );
    }

    #[test]
    fn garbage_is_refused() {
        assert_eq!(decode(Bytes::new()), Err(FrameError::BadMagic));
        assert_eq!(
            decode(Bytes::from_static(b"W\x01\x01")),
            Err(FrameError::BadMagic)
        );
        assert_eq!(
            decode(Bytes::from_static(b"W\x02\x09")),
            Err(FrameError::Kind(9))
        );
        let mut bad = encode_reply_err(1, "x", "y").unwrap().to_vec();
        bad[13] = 0xff; // the label's byte
        assert!(matches!(decode(bad.into()), Err(FrameError::Malformed(_))));
        let long = "x".repeat(70_000);
        let call = CallRef {
            id: 1,
            from: &long,
            instance: "i",
            handler: "h",
            session: None,
            body: b"",
            timeout_ms: 1,
            sent_ms: 1,
            reply: true,
            trace: None,
        };
        assert!(matches!(encode_call(&call), Err(FrameError::TooLong(..))));
    }
}

//! pomelo-rpc messages (pomelo-rpc 1.0.7, docs/protocols/pomelo-rpc.md, "Messages").
//!
//! The same JSON travels over both transports: as MQTT PUBLISH payloads on topic `rpc`, or in
//! [`crate::stream_pkg`] frames over TCP. A request names a namespace, service and method and
//! carries the call's arguments; a response carries the callback's arguments, `[err, result…]`.
//! This module owns the size-limited request decoder (one object, or an array of them from a
//! client that buffers) and the byte-exact response encoders. Dispatch, queues and transports
//! are the gate's.

use bytes::{BufMut, Bytes, BytesMut};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use thiserror::Error;

/// Error text of the reply to a parseable request without a usable `msg`.
pub const INVALID_REQUEST: &str = "invalid request";

/// The call a request asks for: `namespace → service → method` with `args`.
///
/// Missing keys default to `""` and `[]`, so that dispatch answers them with the usual
/// `no such …` errors instead of dropping the request.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct RpcMsg {
    /// Namespace: `sys`, `user` or a configured one.
    pub namespace: String,
    /// Server type the client routed by; carried but not used by the server.
    #[serde(rename = "serverType")]
    pub server_type: String,
    /// Service, mapped to a module.
    pub service: String,
    /// Method, mapped to a handler of that module.
    pub method: String,
    /// Call arguments, as sent.
    pub args: Vec<Value>,
}

/// One decoded request.
#[derive(Debug, Clone, PartialEq)]
pub struct RpcRequest {
    /// Request id, echoed in the response exactly as sent (a number from 0 up per connection
    /// for pomelo-rpc clients; `null` when the request had none).
    pub id: Value,
    /// The call, or `None` when `msg` is missing or not a valid call object; such a request is
    /// answered with [`error_value`]`(`[`INVALID_REQUEST`]`)`.
    pub msg: Option<RpcMsg>,
    /// Optional tracing key `traceId`, echoed when the listener's `trace` is on.
    pub trace_id: Option<Value>,
    /// Optional tracing key `seqId`, echoed when the listener's `trace` is on.
    pub seq_id: Option<Value>,
    /// Optional tracing key `source`, echoed when the listener's `trace` is on.
    pub source: Option<Value>,
}

/// Why a payload holds no request to answer; the gate logs and drops it (there is no id to
/// reply to), and the client's callback timeout fires.
#[derive(Error, Debug)]
#[non_exhaustive]
pub enum PomeloRpcError {
    /// The payload is larger than the listener's limit; checked before parsing.
    #[error("payload of {size} bytes exceeds the limit of {max}")]
    TooLarge {
        /// The payload size in bytes.
        size: usize,
        /// The configured limit.
        max: usize,
    },
    /// The payload is not valid JSON.
    #[error("invalid json: {0}")]
    Json(#[from] serde_json::Error),
    /// The payload is JSON but neither a request object nor an array of request objects.
    #[error("payload is not a request object or an array of them")]
    NotRequest,
}

impl PomeloRpcError {
    /// A short stable label for metrics and logs (for example `"too_large"`).
    pub fn kind(&self) -> &'static str {
        match self {
            Self::TooLarge { .. } => "too_large",
            Self::Json(_) => "invalid_json",
            Self::NotRequest => "not_request",
        }
    }
}

/// Decodes a request payload no larger than `max` bytes: one request object, or a JSON array
/// of them (client-side buffering; an empty array gives no requests).
///
/// Only unparseable payloads are errors: invalid JSON, or anything but an object or an array
/// of objects. The optional key `remote` and unknown keys are ignored.
pub fn decode_requests(payload: &[u8], max: usize) -> Result<Vec<RpcRequest>, PomeloRpcError> {
    if payload.len() > max {
        return Err(PomeloRpcError::TooLarge {
            size: payload.len(),
            max,
        });
    }
    match serde_json::from_slice::<Value>(payload)? {
        Value::Object(obj) => Ok(vec![request(obj)]),
        Value::Array(items) => items
            .into_iter()
            .map(|item| match item {
                Value::Object(obj) => Ok(request(obj)),
                _ => Err(PomeloRpcError::NotRequest),
            })
            .collect(),
        _ => Err(PomeloRpcError::NotRequest),
    }
}

/// Turns one request object into an [`RpcRequest`].
fn request(mut obj: Map<String, Value>) -> RpcRequest {
    let msg = obj
        .remove("msg")
        .filter(Value::is_object)
        .and_then(|m| serde_json::from_value(m).ok());
    RpcRequest {
        id: obj.remove("id").unwrap_or(Value::Null),
        msg,
        trace_id: obj.remove("traceId"),
        seq_id: obj.remove("seqId"),
        source: obj.remove("source"),
    }
}

/// Appends the compact JSON of `value`.
fn put_json<T: Serialize + ?Sized>(buf: &mut BytesMut, value: &T) {
    serde_json::to_writer((&mut *buf).writer(), value)
        .expect("JSON values have string keys and a growable buffer cannot fail");
}

/// Encodes a response, compact, keys in the order `id, resp` and then, when `trace` is given
/// (the listener's `trace` is on), `traceId, seqId, source` with the values passed.
///
/// `resp` is the callback's arguments: `[null, result…]` on success, `[error_value(…)]` on
/// failure.
pub fn encode_response(
    id: &Value,
    resp: &[Value],
    trace: Option<(&Value, &Value, &Value)>,
) -> Bytes {
    let mut buf = BytesMut::new();
    buf.put_slice(b"{\"id\":");
    put_json(&mut buf, id);
    buf.put_slice(b",\"resp\":");
    put_json(&mut buf, resp);
    if let Some((trace_id, seq_id, source)) = trace {
        buf.put_slice(b",\"traceId\":");
        put_json(&mut buf, trace_id);
        buf.put_slice(b",\"seqId\":");
        put_json(&mut buf, seq_id);
        buf.put_slice(b",\"source\":");
        put_json(&mut buf, source);
    }
    buf.put_u8(b'}');
    buf.freeze()
}

/// Encodes a JSON request, for clients and tests: `{"id":<id>,"msg":{…}}`.
pub fn encode_request(id: &Value, msg: &RpcMsg) -> Bytes {
    let mut buf = BytesMut::new();
    buf.put_slice(b"{\"id\":");
    put_json(&mut buf, id);
    buf.put_slice(b",\"msg\":");
    put_json(&mut buf, msg);
    buf.put_u8(b'}');
    buf.freeze()
}

/// Joins already-encoded responses into one JSON array, the payload of a buffered flush
/// (`buffer_msg`, docs/protocols/pomelo-rpc.md, "Settings").
pub fn encode_batch(responses: &[Bytes]) -> Bytes {
    let len = responses.iter().map(|r| r.len() + 1).sum::<usize>() + 1;
    let mut buf = BytesMut::with_capacity(len);
    buf.put_u8(b'[');
    for (i, r) in responses.iter().enumerate() {
        if i > 0 {
            buf.put_u8(b',');
        }
        buf.put_slice(r);
    }
    buf.put_u8(b']');
    buf.freeze()
}

/// `resp[0]` of a failed call: `{"msg":"<text>","stack":"Error: <text>"}`.
pub fn error_value(text: &str) -> Value {
    let mut obj = Map::new();
    obj.insert("msg".to_owned(), Value::from(text));
    obj.insert("stack".to_owned(), Value::from(format!("Error: {text}")));
    Value::Object(obj)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn request_shapes() {
        let reqs = decode_requests(br#"{"id":3}"#, 100).unwrap();
        assert_eq!(reqs.len(), 1);
        assert_eq!(reqs[0].id, json!(3));
        assert_eq!(reqs[0].msg, None);
        let reqs = decode_requests(br#"{"msg":{"namespace":"user"}}"#, 100).unwrap();
        assert_eq!(reqs[0].id, Value::Null);
        assert_eq!(reqs[0].msg.as_ref().unwrap().namespace, "user");
        assert_eq!(reqs[0].msg.as_ref().unwrap().args, Vec::<Value>::new());
        let reqs = decode_requests(br#"{"id":1,"msg":{"args":"x"}}"#, 100).unwrap();
        assert_eq!(reqs[0].msg, None);
        let reqs = decode_requests(br#"{"id":1,"msg":[]}"#, 100).unwrap();
        assert_eq!(reqs[0].msg, None);
        assert!(decode_requests(b"[]", 100).unwrap().is_empty());
    }

    #[test]
    fn errors() {
        let e = decode_requests(b"{", 100).unwrap_err();
        assert_eq!(e.kind(), "invalid_json");
        assert_eq!(
            decode_requests(b"1", 100).unwrap_err().kind(),
            "not_request"
        );
        assert_eq!(
            decode_requests(b"[{},1]", 100).unwrap_err().kind(),
            "not_request"
        );
        let e = decode_requests(b"{}   ", 4).unwrap_err();
        assert_eq!(e.to_string(), "payload of 5 bytes exceeds the limit of 4");
    }

    #[test]
    fn request_round_trip() {
        let msg = RpcMsg {
            namespace: "user".into(),
            server_type: "test".into(),
            service: "service".into(),
            method: "echo".into(),
            args: vec![json!({"b":1,"a":2}), json!("aaa")],
        };
        let wire = encode_request(&json!(7), &msg);
        assert_eq!(
            &wire[..],
            br#"{"id":7,"msg":{"namespace":"user","serverType":"test","service":"service","method":"echo","args":[{"b":1,"a":2},"aaa"]}}"#
        );
        let reqs = decode_requests(&wire, 1000).unwrap();
        assert_eq!(reqs[0].msg.as_ref(), Some(&msg));
    }

    #[test]
    fn batch() {
        assert_eq!(&encode_batch(&[])[..], b"[]");
        let one = encode_response(&json!(0), &[Value::Null], None);
        assert_eq!(&encode_batch(&[one])[..], br#"[{"id":0,"resp":[null]}]"#);
    }
}

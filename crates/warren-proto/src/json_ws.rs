//! JSON-over-WebSocket frames (TianQinS/websocket, docs/protocols/json-ws.md).
//!
//! Each WebSocket message carries one JSON object of the same shape in both directions:
//! `{"tpc":<module>,"func":<function>,"cb":<callback name or "">,"args":[…]}`, plus an `error`
//! key on warren's error replies. This module owns that [`Frame`], its size-limited [`decode`]
//! (any key order, missing keys default to `""`/`[]`) and its compact [`encode`] with the keys
//! in contract order. Login handling, dispatch and the WebSocket itself are the gate's.

use bytes::Bytes;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use serde_json::error::Category;
use thiserror::Error;

/// One JSON-over-WebSocket message, inbound or outbound.
///
/// Field order is the wire order of [`encode`]. Arguments stay JSON values, so integers stay
/// integers (upstream turned every number into a float).
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct Frame {
    /// Module the call is addressed to (`""` on server replies).
    #[serde(default)]
    pub tpc: String,
    /// Function to call, or on a reply the callback name the client asked for.
    #[serde(default)]
    pub func: String,
    /// Callback name the client wants the reply under; `""` asks for no reply.
    #[serde(default)]
    pub cb: String,
    /// Call arguments, or a reply's return values.
    #[serde(default)]
    pub args: Vec<Value>,
    /// Error text on a failed call's reply; the browser library routes such replies to its
    /// `onError`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// A call's W3C trace context (`00-<trace id>-<span id>-<flags>`), when the client traces
    /// its requests: warren logs the call under that trace id (docs/protocols/json-ws.md,
    /// "Traces"). An extension of the contract: upstream ignores it as any unknown key.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub traceparent: Option<String>,
}

/// Why a WebSocket message is not a valid frame; the gate closes the connection (1007).
#[derive(Error, Debug)]
#[non_exhaustive]
pub enum JsonWsError {
    /// The message is larger than the listener's limit; checked before parsing.
    #[error("frame of {size} bytes exceeds the limit of {max}")]
    TooLarge {
        /// The message size in bytes.
        size: usize,
        /// The configured limit.
        max: usize,
    },
    /// The message is JSON (or starts like it) but not an object.
    #[error("frame is not a json object")]
    NotObject,
    /// The message is not valid JSON, or a known key holds a value of the wrong type.
    #[error("invalid frame: {0}")]
    Json(#[from] serde_json::Error),
}

impl JsonWsError {
    /// A short stable label for metrics and logs (for example `"too_large"`).
    pub fn kind(&self) -> &'static str {
        match self {
            Self::TooLarge { .. } => "too_large",
            Self::NotObject => "not_object",
            Self::Json(e) => match e.classify() {
                Category::Data => "wrong_type",
                Category::Io | Category::Syntax | Category::Eof => "invalid_json",
            },
        }
    }
}

/// Decodes one WebSocket message (text or binary payload) no larger than `max` bytes.
///
/// Keys may come in any order; unknown keys are ignored; missing ones default to `""`, `[]`
/// or no error. A message that is not a JSON object, or whose known keys have the wrong type
/// (`"args":"x"`, `"tpc":null`), is an error.
pub fn decode(frame: &[u8], max: usize) -> Result<Frame, JsonWsError> {
    if frame.len() > max {
        return Err(JsonWsError::TooLarge {
            size: frame.len(),
            max,
        });
    }
    // serde would also read a struct from a JSON array; the contract wants an object.
    let first = frame
        .iter()
        .find(|b| !matches!(b, b' ' | b'\t' | b'\n' | b'\r'));
    match first {
        Some(b'{') => Ok(serde_json::from_slice(frame)?),
        // Tell valid JSON of another type from bytes that are not JSON at all.
        _ => match serde_json::from_slice::<serde::de::IgnoredAny>(frame) {
            Ok(_) => Err(JsonWsError::NotObject),
            Err(e) => Err(JsonWsError::Json(e)),
        },
    }
}

/// Encodes a frame as compact JSON with the keys in the order `tpc, func, cb, args[, error]`.
pub fn encode(f: &Frame) -> Bytes {
    let json = serde_json::to_vec(f)
        .expect("strings and JSON values with string keys always serialize to JSON");
    Bytes::from(json)
}

/// The reply to a call that named callback `cb`: `{"tpc":"","func":cb,"cb":"","args":args}`.
pub fn reply(cb: &str, args: Vec<Value>) -> Frame {
    Frame {
        func: cb.to_owned(),
        args,
        ..Frame::default()
    }
}

/// The answer to a login: `{"tpc":"","func":"loginback","cb":"","args":[code]}`, where code 0
/// is success and 1 a bad password.
pub fn loginback(code: i64) -> Frame {
    reply("loginback", vec![Value::from(code)])
}

/// The default reply to a call of an unknown function `func` that named callback `cb`:
/// `{"tpc":"","func":cb,"cb":"","args":[],"error":"Remote function(<func>) not found"}`.
pub fn not_found(cb: &str, func: &str) -> Frame {
    Frame {
        error: Some(format!("Remote function({func}) not found")),
        ..reply(cb, Vec::new())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn a_traceparent_is_read_and_written_only_when_there_is_one() {
        let tp = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        let raw =
            format!(r#"{{"tpc":"Chat","func":"HD_Say","cb":"c","args":[],"traceparent":"{tp}"}}"#);
        let f = decode(raw.as_bytes(), 1024).unwrap();
        assert_eq!(f.traceparent.as_deref(), Some(tp));
        // replies never carry one: the contract's four keys, as before
        assert_eq!(
            &encode(&reply("c", vec![]))[..],
            br#"{"tpc":"","func":"c","cb":"","args":[]}"#
        );
    }

    #[test]
    fn defaults_and_order() {
        let f = decode(br#" {"args":[1,"x"],"func":"f"} "#, 100).unwrap();
        assert_eq!(f.tpc, "");
        assert_eq!(f.cb, "");
        assert_eq!(f.error, None);
        assert_eq!(
            &encode(&f)[..],
            br#"{"tpc":"","func":"f","cb":"","args":[1,"x"]}"#
        );
        assert_eq!(
            &encode(&not_found("cb/1", "nope"))[..],
            br#"{"tpc":"","func":"cb/1","cb":"","args":[],"error":"Remote function(nope) not found"}"#
        );
        assert_eq!(decode(b"{}", 2).unwrap(), Frame::default());
    }

    #[test]
    fn errors() {
        let e = decode(b"[1]", 100).unwrap_err();
        assert!(matches!(e, JsonWsError::NotObject), "{e}");
        assert_eq!(e.kind(), "not_object");
        assert_eq!(decode(b"\"x\"", 100).unwrap_err().kind(), "not_object");
        assert_eq!(decode(b"", 100).unwrap_err().kind(), "invalid_json");
        assert_eq!(decode(b"  ", 100).unwrap_err().kind(), "invalid_json");
        assert_eq!(decode(b"{", 100).unwrap_err().kind(), "invalid_json");
        assert_eq!(decode(b"[", 100).unwrap_err().kind(), "invalid_json");
        assert_eq!(decode(b"{} x", 100).unwrap_err().kind(), "invalid_json");
        assert_eq!(
            decode(br#"{"args":"x"}"#, 100).unwrap_err().kind(),
            "wrong_type"
        );
        assert_eq!(
            decode(br#"{"tpc":null}"#, 100).unwrap_err().kind(),
            "wrong_type"
        );
        let e = decode(b"{}  ", 3).unwrap_err();
        assert_eq!(e.kind(), "too_large");
        assert_eq!(e.to_string(), "frame of 4 bytes exceeds the limit of 3");
    }

    #[test]
    fn values_keep_type_and_order() {
        let f = decode(br#"{"args":[7,-2,1.5,{"z":1,"a":2}]}"#, 100).unwrap();
        assert_eq!(f.args[0], json!(7));
        assert!(f.args[0].is_u64() && f.args[1].is_i64());
        assert_eq!(
            &encode(&f)[..],
            br#"{"tpc":"","func":"","cb":"","args":[7,-2,1.5,{"z":1,"a":2}]}"#
        );
    }
}

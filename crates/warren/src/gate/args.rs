//! Conventions shared by the protocols whose calls carry an argument list (JSON over WebSocket,
//! pomelo-rpc) or a dotted route (pomelo): how those map onto warren's single request body and
//! `Module/Handler` routes.

use bytes::{BufMut, Bytes, BytesMut};
use serde_json::Value;

/// The request body for an argument list: exactly one JSON object is passed as the body itself (so
/// handlers taking an object work from every protocol); any other list is passed as a JSON array.
pub(crate) fn body_from_args(args: &[Value]) -> Bytes {
    match args {
        [one @ Value::Object(_)] => Bytes::from(one.to_string()),
        _ => Bytes::from(Value::Array(args.to_vec()).to_string()),
    }
}

/// A handler result as an argument list: a JSON array is the list itself, anything else `v` is
/// `[v]`. The bytes are inserted as they are (handlers return JSON).
pub(crate) fn args_from_result(result: &[u8]) -> Bytes {
    let first = result.iter().find(|b| !b.is_ascii_whitespace());
    match first {
        Some(b'[') => Bytes::copy_from_slice(result),
        None => Bytes::from_static(b"[null]"),
        Some(_) => {
            let mut b = BytesMut::with_capacity(result.len() + 2);
            b.put_u8(b'[');
            b.put_slice(result);
            b.put_u8(b']');
            b.freeze()
        }
    }
}

/// `chat.chatHandler.send` → (`chat`, `chatHandler.send`): the first dot-separated segment is the
/// module, the rest the handler (docs/protocols/pomelo.md, "Routes, requests, notifies, pushes").
pub(crate) fn split_dotted(route: &str) -> Option<(&str, &str)> {
    let (m, h) = route.split_once('.')?;
    (!m.is_empty() && !h.is_empty()).then_some((m, h))
}

/// Whether bytes are one JSON value.
pub(crate) fn is_json(body: &[u8]) -> bool {
    serde_json::from_slice::<serde::de::IgnoredAny>(body).is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn argument_conventions() {
        assert_eq!(
            &body_from_args(&[json!({"roomName":"r"})])[..],
            br#"{"roomName":"r"}"#
        );
        assert_eq!(
            &body_from_args(&[json!("a"), json!("b")])[..],
            br#"["a","b"]"#
        );
        assert_eq!(&body_from_args(&[])[..], b"[]");
        assert_eq!(&args_from_result(b"[1,2]")[..], b"[1,2]");
        assert_eq!(&args_from_result(b"\"x\"")[..], b"[\"x\"]");
        assert_eq!(
            split_dotted("chat.chatHandler.send"),
            Some(("chat", "chatHandler.send"))
        );
        assert_eq!(split_dotted("nodot"), None);
        assert_eq!(split_dotted(".x"), None);
    }
}

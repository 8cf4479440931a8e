//! The gobase test codec: the frames of the sample TCP backend service of the gobase `backend`
//! package, which a warren node can keep connections to (docs/backends.md).
//!
//! A backend group speaks whatever its services speak; this is the one codec warren ships so
//! that a group works from config alone and the backend tests have a real protocol to talk. It
//! is pure (no IO) and checks the body length against a cap before it allocates, because the
//! bytes come from a network peer.
//!
//! Layout (integers little-endian):
//!
//! ```text
//! msgid u32 · len u32 · body (len bytes)
//! ```
//!
//! The sample's heartbeat is an exchange of msgid 1 (`heatreqmsg`) and msgid 2 (`heatrespmsg`).
//! The length counts the body only and is read from the 8-byte header; a partial header or a
//! partial body means "wait for more bytes".

use bytes::{BufMut, Bytes, BytesMut};
use thiserror::Error;

/// Bytes before the body: msgid and length.
pub const HEADER_LEN: usize = 8;

/// The default cap on a body: 1 MiB.
pub const DEFAULT_MAX_BODY: usize = 1024 * 1024;

/// msgid of the heartbeat request.
pub const HEARTBEAT_REQ_ID: u32 = 1;
/// Body of the heartbeat request.
pub const HEARTBEAT_REQ_BODY: &[u8] = b"heatreqmsg";
/// msgid of the heartbeat response.
pub const HEARTBEAT_RESP_ID: u32 = 2;
/// Body of the heartbeat response.
pub const HEARTBEAT_RESP_BODY: &[u8] = b"heatrespmsg";

/// One frame of the test codec.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TestMsg {
    /// What the frame is (the sample uses 1 and 2 for the heartbeat).
    pub msgid: u32,
    /// The payload, opaque to the codec.
    pub body: Bytes,
}

impl TestMsg {
    /// A frame with this msgid and body.
    pub fn new(msgid: u32, body: impl Into<Bytes>) -> Self {
        TestMsg {
            msgid,
            body: body.into(),
        }
    }

    /// The sample's heartbeat request (msgid 1, `heatreqmsg`).
    pub fn heartbeat_request() -> Self {
        TestMsg::new(HEARTBEAT_REQ_ID, Bytes::from_static(HEARTBEAT_REQ_BODY))
    }

    /// The sample's heartbeat response (msgid 2, `heatrespmsg`).
    pub fn heartbeat_response() -> Self {
        TestMsg::new(HEARTBEAT_RESP_ID, Bytes::from_static(HEARTBEAT_RESP_BODY))
    }

    /// Bytes this frame takes on the wire.
    pub fn encoded_len(&self) -> usize {
        HEADER_LEN + self.body.len()
    }
}

/// Why bytes are not a test-codec frame, or a frame cannot be encoded.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[non_exhaustive]
pub enum BackendFrameError {
    /// The header announces a body longer than the cap: the connection is to be dropped.
    #[error("frame body of {len} bytes is over the limit of {max}")]
    TooLong {
        /// Announced (or given) body length.
        len: u64,
        /// The cap.
        max: usize,
    },
}

/// Decode one frame from the start of `buf`.
///
/// `Ok(None)` when `buf` holds less than a whole frame (nothing is consumed); otherwise the frame
/// and the number of bytes it took (header plus body). A body announced longer than `max_body`
/// is an error before anything is allocated.
pub fn decode(buf: &[u8], max_body: usize) -> Result<Option<(TestMsg, usize)>, BackendFrameError> {
    let Some((head, rest)) = buf.split_first_chunk::<HEADER_LEN>() else {
        return Ok(None);
    };
    let msgid = u32::from_le_bytes([head[0], head[1], head[2], head[3]]);
    let len = u32::from_le_bytes([head[4], head[5], head[6], head[7]]);
    let len_usize = usize::try_from(len).map_err(|_| BackendFrameError::TooLong {
        len: u64::from(len),
        max: max_body,
    })?;
    if len_usize > max_body {
        return Err(BackendFrameError::TooLong {
            len: u64::from(len),
            max: max_body,
        });
    }
    let Some(body) = rest.get(..len_usize) else {
        return Ok(None);
    };
    Ok(Some((
        TestMsg::new(msgid, Bytes::copy_from_slice(body)),
        HEADER_LEN + len_usize,
    )))
}

/// Append the frame of `msg` to `out`; a body longer than `max_body` (or than a u32 can say) is
/// refused, so that a node never sends what its peer must refuse.
pub fn encode(msg: &TestMsg, max_body: usize, out: &mut BytesMut) -> Result<(), BackendFrameError> {
    let len = msg.body.len();
    let too_long = BackendFrameError::TooLong {
        len: len as u64,
        max: max_body,
    };
    if len > max_body {
        return Err(too_long);
    }
    let len32 = u32::try_from(len).map_err(|_| too_long)?;
    out.reserve(HEADER_LEN + len);
    out.put_u32_le(msg.msgid);
    out.put_u32_le(len32);
    out.put_slice(&msg.body);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const REQ: &[u8] = b"\x01\x00\x00\x00\x0a\x00\x00\x00heatreqmsg";
    const RESP: &[u8] = b"\x02\x00\x00\x00\x0b\x00\x00\x00heatrespmsg";

    fn encoded(m: &TestMsg) -> Vec<u8> {
        let mut out = BytesMut::new();
        encode(m, DEFAULT_MAX_BODY, &mut out).expect("small body");
        out.to_vec()
    }

    #[test]
    fn heartbeat_vectors() {
        assert_eq!(REQ.len(), 18);
        assert_eq!(RESP.len(), 19);
        assert_eq!(encoded(&TestMsg::heartbeat_request()), REQ);
        assert_eq!(encoded(&TestMsg::heartbeat_response()), RESP);
        assert_eq!(
            decode(REQ, DEFAULT_MAX_BODY),
            Ok(Some((TestMsg::heartbeat_request(), 18)))
        );
        assert_eq!(
            decode(RESP, DEFAULT_MAX_BODY),
            Ok(Some((TestMsg::heartbeat_response(), 19)))
        );
    }

    #[test]
    fn partial_header_or_body_waits() {
        assert_eq!(decode(&REQ[..7], DEFAULT_MAX_BODY), Ok(None));
        assert_eq!(decode(&REQ[..HEADER_LEN + 3], DEFAULT_MAX_BODY), Ok(None));
        assert_eq!(decode(&[], DEFAULT_MAX_BODY), Ok(None));
        for cut in 0..REQ.len() {
            assert_eq!(decode(&REQ[..cut], DEFAULT_MAX_BODY), Ok(None), "cut {cut}");
        }
    }

    #[test]
    fn a_frame_followed_by_part_of_the_next() {
        let mut buf = REQ.to_vec();
        buf.extend_from_slice(&RESP[..5]);
        assert_eq!(
            decode(&buf, DEFAULT_MAX_BODY),
            Ok(Some((TestMsg::heartbeat_request(), 18)))
        );
        assert_eq!(decode(&buf[18..], DEFAULT_MAX_BODY), Ok(None));
    }

    #[test]
    fn the_length_is_checked_before_the_body_is_there() {
        // announces 4 GiB − 1 with no body at all: refused at once, nothing allocated
        let head = b"\x07\x00\x00\x00\xff\xff\xff\xff";
        assert_eq!(
            decode(head, 16),
            Err(BackendFrameError::TooLong {
                len: u64::from(u32::MAX),
                max: 16
            })
        );
        let m = TestMsg::new(3, vec![0u8; 17]);
        assert!(encode(&m, 16, &mut BytesMut::new()).is_err());
        assert_eq!(
            decode(&encoded(&m), 17).map(|r| r.map(|f| f.1)),
            Ok(Some(25))
        );
    }

    proptest! {
        #[test]
        fn round_trip(msgid: u32, body in proptest::collection::vec(any::<u8>(), 0..64), tail in proptest::collection::vec(any::<u8>(), 0..16)) {
            let m = TestMsg::new(msgid, body);
            let mut bytes = encoded(&m);
            let n = bytes.len();
            bytes.extend_from_slice(&tail);
            prop_assert_eq!(decode(&bytes, 64), Ok(Some((m, n))));
        }

        #[test]
        fn never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..64), max in 0usize..32) {
            if let Ok(Some((m, n))) = decode(&bytes, max) {
                prop_assert!(n <= bytes.len());
                prop_assert!(m.body.len() <= max);
            }
        }
    }
}

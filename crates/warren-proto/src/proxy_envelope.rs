//! The gate proxy's envelope: what a backend behind warren's gate reads and writes inside each
//! frame body, so that one TCP connection per backend service carries the messages of many
//! client sessions (docs/backends.md, "The gate proxy").
//!
//! Layout (integers little-endian), the same both ways:
//!
//! ```text
//! seq u32 · sid_len u16 · sid · name_len u16 · name · payload
//! ```
//!
//! - `seq`: towards a backend, the request's number (never 0), which the backend echoes in its
//!   answer; from a backend, the number of the request answered, or 0 for a push.
//! - `sid`: the client session's id.
//! - `name`: towards a backend, the session's uid (empty before login); from a backend, the
//!   topic of a push (ignored in an answer).
//! - `payload`: the client's body as it sent it, or the answer or push body as the client gets
//!   it.
//!
//! Pure, no IO; the frame around it is already bounded by its codec, and every length is checked
//! against what is left before anything is sliced.

use bytes::{BufMut, Bytes, BytesMut};
use thiserror::Error;

/// Bytes of the fixed part: seq and the two lengths.
pub const FIXED_LEN: usize = 8;

/// One envelope.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Envelope {
    /// Request number (0: a push from the backend).
    pub seq: u32,
    /// The session's id.
    pub sid: String,
    /// The session's uid (towards a backend) or a push's topic (from it).
    pub name: String,
    /// The body, opaque.
    pub payload: Bytes,
}

/// Why bytes are not an envelope.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum EnvelopeError {
    /// Fewer bytes than the lengths announce.
    #[error("envelope truncated: {need} bytes announced, {have} left")]
    Truncated {
        /// Bytes the next field needs.
        need: usize,
        /// Bytes left.
        have: usize,
    },
    /// The session id or the name is not UTF-8.
    #[error("envelope {0} is not UTF-8")]
    NotUtf8(&'static str),
    /// A session id or name longer than a u16 length can say (encoding only).
    #[error("envelope {0} longer than 65535 bytes")]
    TooLong(&'static str),
}

impl Envelope {
    /// Append the envelope's bytes to `out`.
    pub fn encode(&self, out: &mut BytesMut) -> Result<(), EnvelopeError> {
        let sid_len = u16::try_from(self.sid.len()).map_err(|_| EnvelopeError::TooLong("sid"))?;
        let name_len =
            u16::try_from(self.name.len()).map_err(|_| EnvelopeError::TooLong("name"))?;
        out.reserve(FIXED_LEN + self.sid.len() + self.name.len() + self.payload.len());
        out.put_u32_le(self.seq);
        out.put_u16_le(sid_len);
        out.put_slice(self.sid.as_bytes());
        out.put_u16_le(name_len);
        out.put_slice(self.name.as_bytes());
        out.put_slice(&self.payload);
        Ok(())
    }

    /// The envelope's bytes.
    pub fn to_bytes(&self) -> Result<Bytes, EnvelopeError> {
        let mut out = BytesMut::new();
        self.encode(&mut out)?;
        Ok(out.freeze())
    }

    /// Only the `seq` of a body: which request it answers (0: a push), without decoding the
    /// rest.
    pub fn peek_seq(body: &[u8]) -> Result<u32, EnvelopeError> {
        let b: [u8; 4] =
            body.get(..4)
                .and_then(|s| s.try_into().ok())
                .ok_or(EnvelopeError::Truncated {
                    need: 4,
                    have: body.len(),
                })?;
        Ok(u32::from_le_bytes(b))
    }

    /// Read a whole body as an envelope; the payload shares `body`'s memory.
    pub fn decode(body: &Bytes) -> Result<Envelope, EnvelopeError> {
        let seq = Self::peek_seq(body)?;
        let mut at = 4;
        let sid = string(body, &mut at, "sid")?;
        let name = string(body, &mut at, "name")?;
        Ok(Envelope {
            seq,
            sid,
            name,
            payload: body.slice(at..),
        })
    }
}

/// A u16-prefixed string at `*at`, advancing `*at` past it.
fn string(body: &[u8], at: &mut usize, what: &'static str) -> Result<String, EnvelopeError> {
    let rest = body.get(*at..).unwrap_or_default();
    let len = rest
        .get(..2)
        .map(|s| u16::from_le_bytes([s[0], s[1]]) as usize)
        .ok_or(EnvelopeError::Truncated {
            need: 2,
            have: rest.len(),
        })?;
    let bytes = rest.get(2..2 + len).ok_or(EnvelopeError::Truncated {
        need: len,
        have: rest.len().saturating_sub(2),
    })?;
    let s = std::str::from_utf8(bytes).map_err(|_| EnvelopeError::NotUtf8(what))?;
    *at += 2 + len;
    Ok(s.to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn golden_bytes() {
        let e = Envelope {
            seq: 7,
            sid: "s1".into(),
            name: "bob".into(),
            payload: Bytes::from_static(b"{}"),
        };
        let b = e.to_bytes().expect("short fields");
        assert_eq!(
            &b[..],
            b"\x07\x00\x00\x00\x02\x00s1\x03\x00bob{}".as_slice()
        );
        assert_eq!(Envelope::decode(&b), Ok(e));
        assert_eq!(Envelope::peek_seq(&b), Ok(7));
    }

    #[test]
    fn empty_name_and_payload() {
        let b = Bytes::from_static(b"\x00\x00\x00\x00\x01\x00x\x00\x00");
        let e = Envelope::decode(&b).expect("valid");
        assert_eq!(e.seq, 0);
        assert_eq!(e.sid, "x");
        assert!(e.name.is_empty() && e.payload.is_empty());
    }

    #[test]
    fn truncated_and_bad_utf8_are_errors() {
        for bad in [
            &b""[..],
            b"\x01\x00\x00",
            b"\x01\x00\x00\x00",
            b"\x01\x00\x00\x00\x05\x00ab",
            b"\x01\x00\x00\x00\x01\x00a\x09\x00",
        ] {
            assert!(matches!(
                Envelope::decode(&Bytes::copy_from_slice(bad)),
                Err(EnvelopeError::Truncated { .. })
            ));
        }
        let b = Bytes::from_static(b"\x01\x00\x00\x00\x01\x00\xff\x00\x00");
        assert_eq!(Envelope::decode(&b), Err(EnvelopeError::NotUtf8("sid")));
    }

    proptest::proptest! {
        #[test]
        fn round_trip(seq: u32, sid in ".{0,40}", name in ".{0,40}", payload: Vec<u8>) {
            let e = Envelope { seq, sid, name, payload: Bytes::from(payload) };
            let b = e.to_bytes().expect("short fields");
            proptest::prop_assert_eq!(Envelope::decode(&b), Ok(e));
        }

        #[test]
        fn never_panics(bytes: Vec<u8>) {
            let _ = Envelope::decode(&Bytes::from(bytes));
        }
    }
}

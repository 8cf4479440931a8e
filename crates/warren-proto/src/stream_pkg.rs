//! stream-pkg framing: pomelo-rpc's TCP transport (stream-pkg 0.0.5, docs/protocols/pomelo-rpc.md,
//! "Transports").
//!
//! A frame is `length · body`, where the length is a **big-endian** base-128 varint: the most
//! significant 7-bit group comes first and every byte but the last has `0x80` set (the reverse
//! of protobuf's order). warren reads at most four length bytes, refuses empty bodies, and
//! checks the announced length against the listener's `pkg_size` as soon as the length is
//! complete, before waiting for (or allocating) the body. The body is the JSON of
//! [`crate::pomelo_rpc`].

use bytes::{Buf, BufMut, Bytes, BytesMut};
use thiserror::Error;

/// Most length bytes warren accepts (lengths up to 2^28 − 1).
pub const MAX_LENGTH_BYTES: usize = 4;

/// How much the codec reserves ahead for a body it is still waiting for, so that a small
/// header cannot make the server commit a whole `pkg_size` of memory per connection.
const MAX_PRE_RESERVE: usize = 64 * 1024;

/// Why a stream-pkg byte stream cannot be read; the connection must be closed.
#[derive(Error, Debug)]
#[non_exhaustive]
pub enum StreamPkgError {
    /// The length uses more than [`MAX_LENGTH_BYTES`] bytes.
    #[error("length prefix longer than 4 bytes")]
    LengthTooLong,
    /// The length is 0; stream-pkg never sends an empty package.
    #[error("empty package")]
    EmptyBody,
    /// The announced body is larger than the configured limit.
    #[error("package of {size} bytes exceeds the limit of {max}")]
    TooLarge {
        /// The announced body length.
        size: usize,
        /// The configured limit (`pkg_size`).
        max: usize,
    },
    /// An IO error from the underlying stream (required by `tokio_util::codec::Decoder`).
    #[error("io error: {0}")]
    Io(#[from] std::io::Error),
}

impl StreamPkgError {
    /// A short stable label for metrics and logs (for example `"too_large"`).
    pub fn kind(&self) -> &'static str {
        match self {
            Self::LengthTooLong => "length_too_long",
            Self::EmptyBody => "empty",
            Self::TooLarge { .. } => "too_large",
            Self::Io(_) => "io",
        }
    }
}

/// Reads the length prefix at the start of `buf` without consuming anything: `Ok(None)` while
/// it is incomplete, else the number of prefix bytes and the checked body length.
fn parse_len(buf: &[u8], max: usize) -> Result<Option<(usize, usize)>, StreamPkgError> {
    let mut len = 0usize;
    for i in 0..MAX_LENGTH_BYTES {
        let Some(&b) = buf.get(i) else {
            return Ok(None);
        };
        len = (len << 7) | usize::from(b & 0x7f);
        if b & 0x80 == 0 {
            if len == 0 {
                return Err(StreamPkgError::EmptyBody);
            }
            if len > max {
                return Err(StreamPkgError::TooLarge { size: len, max });
            }
            return Ok(Some((i + 1, len)));
        }
    }
    Err(StreamPkgError::LengthTooLong)
}

/// Decodes one package body from the front of `buf`.
///
/// Returns `Ok(None)` when more bytes are needed, leaving `buf` untouched; on `Ok(Some)`
/// exactly that package's bytes are consumed and the body is a zero-copy slice of them. A body
/// longer than `max` fails as soon as its length has arrived. After an error the connection
/// must be closed.
pub fn decode(buf: &mut BytesMut, max: usize) -> Result<Option<Bytes>, StreamPkgError> {
    let Some((prefix, len)) = parse_len(buf, max)? else {
        return Ok(None);
    };
    if buf.len() - prefix < len {
        return Ok(None);
    }
    buf.advance(prefix);
    Ok(Some(buf.split_to(len).freeze()))
}

/// Appends the big-endian base-128 encoding of `n`.
///
/// Lengths of 2^28 and more take five bytes or more, which [`decode`] refuses: keep packages
/// below that.
pub fn encode_len(n: usize, buf: &mut BytesMut) {
    let groups = (usize::BITS - n.leading_zeros()).div_ceil(7).max(1);
    for g in (0..groups).rev() {
        // Only the low seven bits of the shifted value are kept.
        let byte = ((n >> (7 * g)) & 0x7f) as u8;
        buf.put_u8(if g == 0 { byte } else { byte | 0x80 });
    }
}

/// Appends `body` as one package: its length, then the body.
pub fn encode(body: &[u8], buf: &mut BytesMut) {
    buf.reserve(MAX_LENGTH_BYTES + body.len());
    encode_len(body.len(), buf);
    buf.put_slice(body);
}

/// `tokio_util` framing for stream-pkg with an inbound size limit (`pkg_size`).
#[derive(Debug, Clone)]
pub struct StreamPkgCodec {
    max: usize,
}

impl StreamPkgCodec {
    /// A codec that rejects inbound bodies longer than `max` bytes.
    pub fn new(max: usize) -> Self {
        Self { max }
    }
}

impl tokio_util::codec::Decoder for StreamPkgCodec {
    type Item = Bytes;
    type Error = StreamPkgError;

    fn decode(&mut self, src: &mut BytesMut) -> Result<Option<Bytes>, StreamPkgError> {
        let body = decode(src, self.max)?;
        if body.is_none() {
            // The prefix may already say how much is coming (and has passed the size check).
            if let Some((prefix, len)) = parse_len(src, self.max)? {
                let wanted = (prefix + len).min(MAX_PRE_RESERVE);
                src.reserve(wanted.saturating_sub(src.len()));
            }
        }
        Ok(body)
    }
}

impl tokio_util::codec::Encoder<&[u8]> for StreamPkgCodec {
    type Error = StreamPkgError;

    fn encode(&mut self, item: &[u8], dst: &mut BytesMut) -> Result<(), StreamPkgError> {
        encode(item, dst);
        Ok(())
    }
}

impl tokio_util::codec::Encoder<Bytes> for StreamPkgCodec {
    type Error = StreamPkgError;

    fn encode(&mut self, item: Bytes, dst: &mut BytesMut) -> Result<(), StreamPkgError> {
        encode(&item, dst);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The length table of docs/protocols/pomelo-rpc.md, "Transports".
    const LENGTHS: &[(usize, &[u8])] = &[
        (5, &[0x05]),
        (127, &[0x7f]),
        (128, &[0x81, 0x00]),
        (300, &[0x82, 0x2c]),
        (16384, &[0x81, 0x80, 0x00]),
        (2_097_151, &[0xff, 0xff, 0x7f]),
        (2_097_152, &[0x81, 0x80, 0x80, 0x00]),
    ];

    #[test]
    fn length_table_both_ways() {
        for &(n, bytes) in LENGTHS {
            let mut buf = BytesMut::new();
            encode_len(n, &mut buf);
            assert_eq!(&buf[..], bytes, "encode {n}");
            assert_eq!(
                parse_len(bytes, usize::MAX).unwrap(),
                Some((bytes.len(), n))
            );
        }
        let mut buf = BytesMut::new();
        encode_len(0, &mut buf);
        assert_eq!(&buf[..], [0x00]);
        buf.clear();
        encode_len((1 << 28) - 1, &mut buf);
        assert_eq!(&buf[..], [0xff, 0xff, 0xff, 0x7f]);
    }

    #[test]
    fn frame_example() {
        let body = br#"{"id":1,"resp":[null,"ok"]}"#;
        let mut wire = vec![0x1b];
        wire.extend_from_slice(body);
        let mut buf = BytesMut::new();
        encode(body, &mut buf);
        assert_eq!(&buf[..], &wire[..]);
        for cut in 0..wire.len() {
            let mut part = BytesMut::from(&wire[..cut]);
            assert_eq!(decode(&mut part, 1 << 20).unwrap(), None);
            assert_eq!(part.len(), cut, "need-more consumes nothing");
        }
        buf.extend_from_slice(&[0x01, b'x']);
        assert_eq!(&decode(&mut buf, 1 << 20).unwrap().unwrap()[..], body);
        assert_eq!(&decode(&mut buf, 1 << 20).unwrap().unwrap()[..], b"x");
        assert!(buf.is_empty());
    }

    #[test]
    fn errors() {
        let mut buf = BytesMut::from(&[0x80, 0x80, 0x80, 0x80][..]);
        let e = decode(&mut buf, usize::MAX).unwrap_err();
        assert!(matches!(e, StreamPkgError::LengthTooLong));
        assert_eq!(e.kind(), "length_too_long");
        assert_eq!(
            decode(&mut BytesMut::from(&[0x80, 0x80, 0x80][..]), 9).unwrap(),
            None
        );
        assert_eq!(
            decode(&mut BytesMut::from(&[0x00][..]), 9)
                .unwrap_err()
                .kind(),
            "empty"
        );
        assert_eq!(
            decode(&mut BytesMut::from(&[0x80, 0x00][..]), 9)
                .unwrap_err()
                .kind(),
            "empty"
        );
        // Refused from the prefix alone, before any body byte arrives.
        let e = decode(&mut BytesMut::from(&[0x81, 0x00][..]), 127).unwrap_err();
        assert_eq!(
            e.to_string(),
            "package of 128 bytes exceeds the limit of 127"
        );
    }
}

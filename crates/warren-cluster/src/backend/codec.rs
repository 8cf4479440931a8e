//! How a backend group turns the bytes of its services into messages and back.
//!
//! A group speaks whatever its services already speak, so the framing is the user's: a
//! [`Codec`] decodes from the unconsumed bytes of a connection and encodes what the node sends.
//! The rules of a decode (docs/backends.md, "Codecs") are those of the gobase backend package, so
//! a codec written for it carries over: nothing yet → wait for more bytes; an error, or a count
//! of consumed bytes that is zero with a message or larger than what was given → drop the
//! connection and dial again.
//!
//! [`GobaseTestCodec`] is the codec of the gobase sample service, built on
//! `warren_proto::backend_frame` (pure and fuzzed).

use bytes::BytesMut;
use thiserror::Error;
use warren_proto::backend_frame::{self, BackendFrameError, DEFAULT_MAX_BODY, HEADER_LEN, TestMsg};

/// The framing of a backend group's services.
///
/// One codec value is shared by every connection of a [`Backends`](super::Backends), so it holds
/// settings, not per-connection state: the unconsumed bytes are the connection's and are handed
/// to [`decode`](Codec::decode) again, with more appended, until a whole message is there.
pub trait Codec: Send + Sync + 'static {
    /// A decoded message, handed to a waiting call or to the `on_msg` hook.
    type Msg: Send + 'static;

    /// Decode one message from the start of `buf`: `Ok(None)` to wait for more bytes, or the
    /// message and how many bytes it took (at least 1, at most `buf.len()`). An error drops the
    /// connection, which is then dialled again.
    fn decode(&self, buf: &[u8]) -> Result<Option<(Self::Msg, usize)>, CodecError>;

    /// Append the bytes of `msg` to `out`.
    fn encode(&self, msg: &Self::Msg, out: &mut BytesMut) -> Result<(), CodecError>;

    /// The longest frame this codec accepts, in bytes: a connection holding more unconsumed
    /// bytes than this without a whole message is dropped, which bounds its read buffer.
    fn max_frame(&self) -> usize;
}

/// Why bytes are not a message of a codec, or a message cannot be encoded.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[non_exhaustive]
pub enum CodecError {
    /// A frame (announced or given) longer than the codec's limit.
    #[error("frame of {len} bytes is over the limit of {max}")]
    TooLong {
        /// Its length.
        len: u64,
        /// The limit.
        max: usize,
    },
    /// Bytes that are not a frame of the protocol.
    #[error("malformed frame: {0}")]
    Malformed(String),
}

/// The gobase sample service's codec: `msgid u32 LE · len u32 LE · body`, with the heartbeat
/// request (msgid 1, `heatreqmsg`) and response (msgid 2, `heatrespmsg`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GobaseTestCodec {
    max_body: usize,
}

impl GobaseTestCodec {
    /// A codec accepting bodies up to `max_body` bytes.
    pub fn new(max_body: usize) -> Self {
        GobaseTestCodec { max_body }
    }
}

impl Default for GobaseTestCodec {
    /// Bodies up to 1 MiB.
    fn default() -> Self {
        GobaseTestCodec::new(DEFAULT_MAX_BODY)
    }
}

impl From<BackendFrameError> for CodecError {
    fn from(e: BackendFrameError) -> Self {
        match e {
            BackendFrameError::TooLong { len, max } => CodecError::TooLong { len, max },
            other => CodecError::Malformed(other.to_string()),
        }
    }
}

impl Codec for GobaseTestCodec {
    type Msg = TestMsg;

    fn decode(&self, buf: &[u8]) -> Result<Option<(TestMsg, usize)>, CodecError> {
        Ok(backend_frame::decode(buf, self.max_body)?)
    }

    fn encode(&self, msg: &TestMsg, out: &mut BytesMut) -> Result<(), CodecError> {
        Ok(backend_frame::encode(msg, self.max_body, out)?)
    }

    fn max_frame(&self) -> usize {
        HEADER_LEN.saturating_add(self.max_body)
    }
}

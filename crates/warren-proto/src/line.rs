//! Line protocol framing (ffown msg broker, docs/protocols/line.md, "Framing").
//!
//! A message is a head line holding its decimal body length, then exactly that many body bytes:
//! `"5\r\nhello"`. The protocol is meant to be typed in telnet, so the decoder is forgiving where
//! a human makes mistakes: blank lines between messages are skipped, a bare `\n` ends a head as
//! well as `\r\n`, and a bad head is reported as [`LineEvent::BadHead`] (the gate answers it with
//! [`ERROR_BODY`] and reads on) instead of failing the connection. Only a head that never ends
//! within `max_head` bytes is fatal, since there is no way to find the next message after it.
//!
//! Outbound messages are framed by [`encode`] as `"<length> \r\n<body>"`, with the space before
//! CRLF that upstream clients expect byte for byte.

use bytes::{BufMut, Bytes, BytesMut};
use thiserror::Error;

/// What the broker sends for a bad head, framed with [`encode`]: `"7 \r\nERROR\r\n"`.
pub const ERROR_BODY: &[u8] = b"ERROR\r\n";

/// How much [`LineDecoder`] reserves ahead for a body it is still waiting for, so that a small
/// head cannot make the server commit a whole `max_body` of memory per connection.
const MAX_PRE_RESERVE: usize = 64 * 1024;

/// One thing the decoder found in the inbound byte stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LineEvent {
    /// A complete message body (possibly empty), to dispatch to the plugin.
    Message(Bytes),
    /// A head line that is not a valid length was consumed; the gate sends the framed
    /// [`ERROR_BODY`], counts consecutive bad heads and goes on with the next line.
    BadHead,
}

/// Why the line stream cannot be read any further.
#[derive(Error, Debug)]
#[non_exhaustive]
pub enum LineError {
    /// No line end within `max_head` bytes: the gate sends the framed [`ERROR_BODY`] and closes.
    #[error("head line exceeds the limit of {max} bytes")]
    HeadTooLong {
        /// The configured head limit.
        max: usize,
    },
    /// An IO error from the underlying stream (required by `tokio_util::codec::Decoder`).
    #[error("io error: {0}")]
    Io(#[from] std::io::Error),
}

impl LineError {
    /// A short stable label for metrics and logs (for example `"head_too_long"`).
    pub fn kind(&self) -> &'static str {
        match self {
            Self::HeadTooLong { .. } => "head_too_long",
            Self::Io(_) => "io",
        }
    }
}

/// Where the decoder is within the current message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// Waiting for a head line.
    Head,
    /// A valid head announced this many body bytes.
    Body(usize),
}

/// Incremental decoder of the inbound line stream.
///
/// It keeps the state between reads (a head may have been consumed while its body is still on
/// the way), so one decoder belongs to one connection.
#[derive(Debug, Clone)]
pub struct LineDecoder {
    max_head: usize,
    max_body: usize,
    state: State,
}

impl LineDecoder {
    /// A decoder refusing heads longer than `max_head` bytes (line end excluded) and bodies
    /// longer than `max_body` bytes. The listener's defaults are 64 and 64 KiB.
    pub fn new(max_head: usize, max_body: usize) -> Self {
        Self {
            max_head,
            max_body,
            state: State::Head,
        }
    }

    /// Decodes the next event from the front of `buf`, consuming what it used.
    ///
    /// `Ok(None)` means more bytes are needed. [`LineEvent::BadHead`] means a bad head line was
    /// consumed (more than three tokens, a non-numeric length, a length over `max_body`).
    /// [`LineError::HeadTooLong`] means no line end came within `max_head` bytes; the stream
    /// cannot be resynchronised after it. Blank heads are skipped silently, and a trailing `\r`
    /// is stripped from every head.
    pub fn decode(&mut self, buf: &mut BytesMut) -> Result<Option<LineEvent>, LineError> {
        loop {
            match self.state {
                State::Body(len) => {
                    if buf.len() < len {
                        let wanted = len.min(MAX_PRE_RESERVE);
                        buf.reserve(wanted.saturating_sub(buf.len()));
                        return Ok(None);
                    }
                    self.state = State::Head;
                    return Ok(Some(LineEvent::Message(buf.split_to(len).freeze())));
                }
                State::Head => {
                    // A head of `max_head` bytes, a `\r` and the `\n`: no need to look further.
                    let window = buf.len().min(self.max_head.saturating_add(2));
                    let Some(newline) = buf[..window].iter().position(|&b| b == b'\n') else {
                        // A trailing `\r` may still be the first half of a line end.
                        let pending = buf.strip_suffix(b"\r").unwrap_or(&buf[..]).len();
                        if pending > self.max_head {
                            return Err(LineError::HeadTooLong { max: self.max_head });
                        }
                        return Ok(None);
                    };
                    let line = buf.split_to(newline + 1);
                    let head = &line[..newline];
                    let head = head.strip_suffix(b"\r").unwrap_or(head);
                    if head.len() > self.max_head {
                        return Err(LineError::HeadTooLong { max: self.max_head });
                    }
                    match parse_head(head, self.max_body) {
                        Head::Blank => continue,
                        Head::Bad => return Ok(Some(LineEvent::BadHead)),
                        Head::Length(len) => self.state = State::Body(len),
                    }
                }
            }
        }
    }
}

/// What a head line says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Head {
    /// No tokens at all: skipped.
    Blank,
    /// Not a usable length.
    Bad,
    /// A body of this many bytes follows.
    Length(usize),
}

/// Parses a head line (line end already removed) under the body limit.
fn parse_head(head: &[u8], max_body: usize) -> Head {
    let mut tokens = head
        .split(|&b| b == b' ' || b == b'\t')
        .filter(|t| !t.is_empty());
    let Some(first) = tokens.next() else {
        return Head::Blank;
    };
    // Tokens 2 and 3 (cmd and key upstream) are ignored; a fourth makes the head bad.
    if tokens.nth(2).is_some() {
        return Head::Bad;
    }
    parse_length(first, max_body).map_or(Head::Bad, Head::Length)
}

/// Parses an all-digit token as a length no greater than `max`, without overflowing.
fn parse_length(token: &[u8], max: usize) -> Option<usize> {
    let mut n = 0usize;
    for &b in token {
        if !b.is_ascii_digit() {
            return None;
        }
        n = n
            .checked_mul(10)?
            .checked_add(usize::from(b - b'0'))
            .filter(|&n| n <= max)?;
    }
    Some(n)
}

/// Appends `body` framed as `"<decimal length> \r\n<body>"`, or `"<length>\r\n<body>"` when
/// `space_before_crlf` is off (listener setting `space_before_crlf = false`).
pub fn encode(body: &[u8], space_before_crlf: bool, buf: &mut BytesMut) {
    let mut digits = [0u8; 20];
    let mut at = digits.len();
    let mut n = body.len();
    loop {
        at -= 1;
        // `n % 10` is a single decimal digit.
        digits[at] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    let head = &digits[at..];
    buf.reserve(head.len() + 3 + body.len());
    buf.put_slice(head);
    if space_before_crlf {
        buf.put_u8(b' ');
    }
    buf.put_slice(b"\r\n");
    buf.put_slice(body);
}

/// `tokio_util` framing for the line protocol: decodes [`LineEvent`]s and frames outbound
/// bodies with [`encode`].
#[derive(Debug, Clone)]
pub struct LineCodec {
    decoder: LineDecoder,
    space_before_crlf: bool,
}

impl LineCodec {
    /// A codec with the given head and body limits and outbound head style.
    pub fn new(max_head: usize, max_body: usize, space_before_crlf: bool) -> Self {
        Self {
            decoder: LineDecoder::new(max_head, max_body),
            space_before_crlf,
        }
    }
}

impl tokio_util::codec::Decoder for LineCodec {
    type Item = LineEvent;
    type Error = LineError;

    fn decode(&mut self, src: &mut BytesMut) -> Result<Option<LineEvent>, LineError> {
        self.decoder.decode(src)
    }

    /// At end of stream an unfinished message (a partial head or body) is dropped: the peer
    /// left before finishing it, which is not an error worth reporting for a telnet protocol.
    fn decode_eof(&mut self, src: &mut BytesMut) -> Result<Option<LineEvent>, LineError> {
        let event = self.decoder.decode(src)?;
        if event.is_none() {
            src.clear();
        }
        Ok(event)
    }
}

impl tokio_util::codec::Encoder<&[u8]> for LineCodec {
    type Error = LineError;

    fn encode(&mut self, item: &[u8], dst: &mut BytesMut) -> Result<(), LineError> {
        encode(item, self.space_before_crlf, dst);
        Ok(())
    }
}

impl tokio_util::codec::Encoder<Bytes> for LineCodec {
    type Error = LineError;

    fn encode(&mut self, item: Bytes, dst: &mut BytesMut) -> Result<(), LineError> {
        encode(&item, self.space_before_crlf, dst);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Decodes everything `input` holds, in one read.
    fn events(input: &[u8]) -> (Vec<LineEvent>, BytesMut) {
        let mut decoder = LineDecoder::new(64, 64 * 1024);
        let mut buf = BytesMut::from(input);
        let mut out = Vec::new();
        while let Some(event) = decoder.decode(&mut buf).unwrap() {
            out.push(event);
        }
        (out, buf)
    }

    fn message(body: &[u8]) -> LineEvent {
        LineEvent::Message(Bytes::copy_from_slice(body))
    }

    #[test]
    fn heads() {
        assert_eq!(parse_head(b"", 10), Head::Blank);
        assert_eq!(parse_head(b" \t ", 10), Head::Blank);
        assert_eq!(parse_head(b"5", 10), Head::Length(5));
        assert_eq!(parse_head(b"\t05  cmd\tkey ", 10), Head::Length(5));
        assert_eq!(parse_head(b"10", 10), Head::Length(10));
        assert_eq!(parse_head(b"11", 10), Head::Bad);
        assert_eq!(parse_head(b"1 2 3 4", 10), Head::Bad);
        assert_eq!(parse_head(b"5abc", 10), Head::Bad);
        assert_eq!(parse_head(b"+5", 10), Head::Bad);
        assert_eq!(parse_head(b"-1", 10), Head::Bad);
        assert_eq!(parse_head("٥".as_bytes(), 10), Head::Bad);
        assert_eq!(
            parse_head(b"99999999999999999999999999999999", usize::MAX),
            Head::Bad
        );
        assert_eq!(
            parse_head(b"0000000000000000000000000000000000007", 10),
            Head::Length(7)
        );
    }

    #[test]
    fn bodies_are_any_bytes() {
        let (got, rest) = events(b"3\r\n\0\r\n2\n\xff\xfe");
        assert_eq!(got, vec![message(b"\0\r\n"), message(b"\xff\xfe")]);
        assert!(rest.is_empty());
    }

    #[test]
    fn head_limit() {
        let mut decoder = LineDecoder::new(4, 100);
        // Four bytes and a pending `\r` may still become a valid head.
        let mut buf = BytesMut::from(&b"   5\r"[..]);
        assert!(decoder.decode(&mut buf).unwrap().is_none());
        buf.extend_from_slice(b"\nhello");
        assert_eq!(decoder.decode(&mut buf).unwrap(), Some(message(b"hello")));

        let mut buf = BytesMut::from(&b"    5"[..]);
        let err = decoder.decode(&mut buf).unwrap_err();
        assert!(matches!(err, LineError::HeadTooLong { max: 4 }));
        assert_eq!(err.kind(), "head_too_long");
        assert_eq!(err.to_string(), "head line exceeds the limit of 4 bytes");

        let mut decoder = LineDecoder::new(4, 100);
        let mut buf = BytesMut::from(&b"    5\n"[..]);
        assert!(decoder.decode(&mut buf).is_err());
    }

    #[test]
    fn body_waits_for_all_bytes() {
        let mut decoder = LineDecoder::new(64, 100);
        let mut buf = BytesMut::from(&b"5\r\nhel"[..]);
        assert_eq!(decoder.decode(&mut buf).unwrap(), None);
        assert_eq!(&buf[..], b"hel");
        buf.extend_from_slice(b"lo5");
        assert_eq!(decoder.decode(&mut buf).unwrap(), Some(message(b"hello")));
        assert_eq!(decoder.decode(&mut buf).unwrap(), None);
        assert_eq!(&buf[..], b"5");
    }

    #[test]
    fn encoding() {
        let mut buf = BytesMut::new();
        encode(b"hello", true, &mut buf);
        assert_eq!(&buf[..], b"5 \r\nhello");
        buf.clear();
        encode(b"", true, &mut buf);
        assert_eq!(&buf[..], b"0 \r\n");
        buf.clear();
        encode(ERROR_BODY, true, &mut buf);
        assert_eq!(&buf[..], b"7 \r\nERROR\r\n");
        buf.clear();
        encode(&[b'x'; 1234], false, &mut buf);
        assert_eq!(&buf[..6], b"1234\r\n");
        assert_eq!(buf.len(), 1240);
    }

    #[test]
    fn codec_drops_unfinished_message_at_eof() {
        use tokio_util::codec::Decoder;
        let mut codec = LineCodec::new(64, 100, true);
        let mut buf = BytesMut::from(&b"2\r\nhi5\r\nhe"[..]);
        assert_eq!(codec.decode_eof(&mut buf).unwrap(), Some(message(b"hi")));
        assert_eq!(codec.decode_eof(&mut buf).unwrap(), None);
        assert!(buf.is_empty());
    }
}

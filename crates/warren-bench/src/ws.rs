//! The client side of WebSocket (RFC 6455) for `ws://` and `wss://` targets: MQTT over
//! WebSocket (`pubsub`, `request`, `connections`) and pomelo over WebSocket (`pomelo-request`).
//!
//! WebSocket is a layer under the protocol's byte stream, nothing more: the [`Framer`] wraps the
//! bytes the scenario queued into masked binary frames, and the [`Deframer`] takes the payload of
//! every data frame out of what the socket delivered and appends it to the protocol's read
//! buffer. The protocol decoders then see the same byte stream as over TCP, so an MQTT packet or
//! a pomelo package may span frames and a frame may hold several (docs/protocols/mqtt.md,
//! "WebSocket"); payload bytes are passed on as they arrive, without waiting for the end of their
//! frame.
//!
//! By default each packet goes in its own frame, as browser clients (mqtt.js, paho, the pomelo
//! client) send them; with `--ws-batch` one frame carries everything queued for one write. Either
//! way a frame holds at most `--ws-max-frame` payload bytes (warren's WebSocket frame limit is the
//! listener's packet limit: 4096 in mqant mode). The whole batch still goes out in one socket
//! write.
//!
//! What a load generator can leave out is left out: no extensions (compression is never
//! offered), and a server's ping is not answered (neither warren nor the echo reference sends
//! any). A close frame from the server ends the connection like a TCP close.

use bytes::{Buf, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio_tungstenite::tungstenite::handshake::{client::generate_key, derive_accept_key};

use crate::BenchError;

/// Largest HTTP response to the upgrade request that is read.
const MAX_RESPONSE: usize = 16 * 1024;

/// Largest control frame payload (RFC 6455 §5.5).
const MAX_CONTROL: u64 = 125;

/// Frame opcodes.
const OP_CONTINUATION: u8 = 0x0;
const OP_TEXT: u8 = 0x1;
const OP_BINARY: u8 = 0x2;
const OP_CLOSE: u8 = 0x8;
const OP_PING: u8 = 0x9;
const OP_PONG: u8 = 0xA;

/// How the connections of a run speak WebSocket, from a `ws://` or `wss://` target.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WsSettings {
    /// The `Host` header: the target's `HOST:PORT` as written.
    pub host: String,
    /// The request path (`/mqtt` for MQTT and `/` for pomelo when the target names none).
    pub path: String,
    /// The subprotocol offered (`mqtt` for MQTT, none for pomelo).
    pub protocol: Option<&'static str>,
    /// One frame per write instead of one per packet.
    pub batch: bool,
    /// Largest payload in one frame.
    pub max_frame: usize,
}

impl WsSettings {
    /// The settings for `target` when it is a `ws://` or `wss://` URL (`None` otherwise), with
    /// `default_path` when the URL has no path.
    pub fn from_target(
        target: &str,
        default_path: &str,
        protocol: Option<&'static str>,
        batch: bool,
        max_frame: usize,
    ) -> Option<WsSettings> {
        let rest = target
            .strip_prefix("ws://")
            .or_else(|| target.strip_prefix("wss://"))?;
        let (host, path) = match rest.find(['/', '?']) {
            Some(i) if rest[i..].starts_with('/') => (&rest[..i], rest[i..].to_owned()),
            Some(i) => (&rest[..i], format!("{default_path}{}", &rest[i..])),
            None => (rest, default_path.to_owned()),
        };
        Some(WsSettings {
            host: host.to_owned(),
            path,
            protocol,
            batch,
            max_frame: max_frame.max(1),
        })
    }
}

/// Whether `target` asks for TLS under the WebSocket.
pub fn is_wss(target: &str) -> bool {
    target.starts_with("wss://")
}

/// Sends the upgrade request on `w`, reads the `101 Switching Protocols` answer from `r` and
/// checks its `Sec-WebSocket-Accept`. Returns the bytes that followed the answer (the first
/// frames, if the server was quick), which belong to the [`Deframer`].
pub async fn handshake<R, W>(r: &mut R, w: &mut W, s: &WsSettings) -> Result<BytesMut, BenchError>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let key = generate_key();
    w.write_all(upgrade_request(s, &key).as_bytes()).await?;
    w.flush().await?;
    let mut buf = BytesMut::with_capacity(1024);
    loop {
        if let Some(end) = find_header_end(&buf) {
            check_response(&buf[..end], &key)?;
            buf.advance(end);
            return Ok(buf);
        }
        if buf.len() >= MAX_RESPONSE {
            return Err(BenchError::WsHandshake(format!(
                "no end of the HTTP response in its first {MAX_RESPONSE} bytes"
            )));
        }
        buf.reserve(1024);
        if r.read_buf(&mut buf).await? == 0 {
            return Err(BenchError::WsHandshake(
                "the server closed the connection during the upgrade".into(),
            ));
        }
    }
}

/// The HTTP request that asks for the upgrade.
fn upgrade_request(s: &WsSettings, key: &str) -> String {
    let mut req = format!(
        "GET {} HTTP/1.1\r\nHost: {}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n",
        s.path, s.host
    );
    if let Some(p) = s.protocol {
        req.push_str("Sec-WebSocket-Protocol: ");
        req.push_str(p);
        req.push_str("\r\n");
    }
    req.push_str("\r\n");
    req
}

/// The length of the HTTP head (up to and including the blank line), once it is all there.
fn find_header_end(buf: &[u8]) -> Option<usize> {
    buf.windows(4).position(|w| w == b"\r\n\r\n").map(|i| i + 4)
}

/// Checks the server's answer: status 101 and the accept key that `key` calls for.
fn check_response(head: &[u8], key: &str) -> Result<(), BenchError> {
    let text = String::from_utf8_lossy(head);
    let mut lines = text.split("\r\n");
    let status = lines.next().unwrap_or_default();
    let code = status.split(' ').nth(1).unwrap_or_default();
    if code != "101" {
        return Err(BenchError::WsHandshake(format!(
            "the server answered {:?}",
            status.chars().take(200).collect::<String>()
        )));
    }
    let want = derive_accept_key(key.as_bytes());
    let accept = lines.find_map(|l| {
        let (name, value) = l.split_once(':')?;
        name.trim()
            .eq_ignore_ascii_case("sec-websocket-accept")
            .then(|| value.trim().to_owned())
    });
    match accept {
        Some(a) if a == want => Ok(()),
        Some(a) => Err(BenchError::WsHandshake(format!(
            "wrong Sec-WebSocket-Accept {a:?} (expected {want:?})"
        ))),
        None => Err(BenchError::WsHandshake(
            "no Sec-WebSocket-Accept in the answer".into(),
        )),
    }
}

/// Where the [`Deframer`] is in the frame it reads.
#[derive(Debug, Clone, Copy)]
enum State {
    /// Waiting for (the rest of) a frame header.
    Header,
    /// Inside a frame's payload: `left` bytes to come, `pos` bytes already passed (for the
    /// mask's phase).
    Payload {
        opcode: u8,
        left: u64,
        pos: usize,
        mask: Option<[u8; 4]>,
    },
}

/// What the frames read so far said about the connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Status {
    /// Still open.
    Open,
    /// The server sent a close frame.
    Closed,
}

/// Takes the payload out of the frames a server sends: the socket is read into [`Self::raw`],
/// and [`Self::decode`] appends the payload of each data frame (binary, text or continuation)
/// to the protocol's buffer, as far as it has arrived.
#[derive(Debug)]
pub struct Deframer {
    raw: BytesMut,
    state: State,
    /// The payload of the control frame being read.
    control: BytesMut,
}

impl Deframer {
    /// A deframer that starts with `leftover`, the bytes read after the upgrade answer.
    pub fn new(leftover: BytesMut) -> Self {
        Self {
            raw: leftover,
            state: State::Header,
            control: BytesMut::new(),
        }
    }

    /// The buffer the socket is read into.
    pub fn raw(&mut self) -> &mut BytesMut {
        &mut self.raw
    }

    /// Moves every payload byte of data frames from the raw buffer to `out`, handles control
    /// frames, and keeps an incomplete header for the next call.
    pub fn decode(&mut self, out: &mut BytesMut) -> Result<Status, BenchError> {
        loop {
            match self.state {
                State::Header => {
                    let Some((header_len, opcode, len, mask)) = parse_header(&self.raw)? else {
                        return Ok(Status::Open);
                    };
                    self.raw.advance(header_len);
                    self.control.clear();
                    self.state = State::Payload {
                        opcode,
                        left: len,
                        pos: 0,
                        mask,
                    };
                }
                State::Payload {
                    opcode,
                    left,
                    pos,
                    mask,
                } => {
                    let n = usize::try_from(left)
                        .unwrap_or(usize::MAX)
                        .min(self.raw.len());
                    if n == 0 && left > 0 {
                        return Ok(Status::Open);
                    }
                    let data = matches!(opcode, OP_CONTINUATION | OP_TEXT | OP_BINARY);
                    let dst = if data { &mut *out } else { &mut self.control };
                    let start = dst.len();
                    dst.extend_from_slice(&self.raw[..n]);
                    if let Some(m) = mask {
                        apply_mask(&mut dst[start..], m, pos);
                    }
                    self.raw.advance(n);
                    let left = left - n as u64;
                    if left > 0 {
                        self.state = State::Payload {
                            opcode,
                            left,
                            pos: pos + n,
                            mask,
                        };
                        return Ok(Status::Open);
                    }
                    self.state = State::Header;
                    if opcode == OP_CLOSE {
                        return Ok(Status::Closed);
                    }
                    // A ping is not answered and a pong needs nothing (see the module comment).
                }
            }
        }
    }
}

/// A frame header: (header length, opcode, payload length, mask).
type Header = (usize, u8, u64, Option<[u8; 4]>);

/// Parses one frame header at the start of `buf`, or `None` until all of it is there.
fn parse_header(buf: &[u8]) -> Result<Option<Header>, BenchError> {
    let (Some(&b0), Some(&b1)) = (buf.first(), buf.get(1)) else {
        return Ok(None);
    };
    if b0 & 0x70 != 0 {
        return Err(BenchError::WsProtocol(format!(
            "reserved bits set in a frame header ({b0:#04x}) without an extension"
        )));
    }
    let fin = b0 & 0x80 != 0;
    let opcode = b0 & 0x0F;
    let masked = b1 & 0x80 != 0;
    let (len, mut at) = match b1 & 0x7F {
        126 => {
            let Some(b) = buf.get(2..4) else {
                return Ok(None);
            };
            (u64::from(u16::from_be_bytes([b[0], b[1]])), 4)
        }
        127 => {
            let Some(b) = buf.get(2..10) else {
                return Ok(None);
            };
            let mut a = [0u8; 8];
            a.copy_from_slice(b);
            (u64::from_be_bytes(a), 10)
        }
        n => (u64::from(n), 2),
    };
    let mask = if masked {
        let Some(b) = buf.get(at..at + 4) else {
            return Ok(None);
        };
        at += 4;
        Some([b[0], b[1], b[2], b[3]])
    } else {
        None
    };
    match opcode {
        OP_CONTINUATION | OP_TEXT | OP_BINARY => {}
        OP_CLOSE | OP_PING | OP_PONG => {
            if !fin || len > MAX_CONTROL {
                return Err(BenchError::WsProtocol(format!(
                    "a control frame (opcode {opcode:#x}) fragmented or longer than 125 bytes"
                )));
            }
        }
        _ => {
            return Err(BenchError::WsProtocol(format!(
                "reserved frame opcode {opcode:#x}"
            )));
        }
    }
    Ok(Some((at, opcode, len, mask)))
}

/// XORs `buf` with the mask, `pos` bytes into the frame's payload.
fn apply_mask(buf: &mut [u8], mask: [u8; 4], pos: usize) {
    let m = [
        mask[pos % 4],
        mask[(pos + 1) % 4],
        mask[(pos + 2) % 4],
        mask[(pos + 3) % 4],
    ];
    let m64 = u64::from_ne_bytes([m[0], m[1], m[2], m[3], m[0], m[1], m[2], m[3]]);
    let mut chunks = buf.chunks_exact_mut(8);
    for c in &mut chunks {
        let mut a = [0u8; 8];
        a.copy_from_slice(c);
        c.copy_from_slice(&(u64::from_ne_bytes(a) ^ m64).to_ne_bytes());
    }
    // the remainder starts at a multiple of 8 bytes, so the mask's phase is m[0]
    for (i, b) in chunks.into_remainder().iter_mut().enumerate() {
        *b ^= m[i % 4];
    }
}

/// Wraps the bytes a scenario queues into masked binary frames (a client must mask every
/// frame). Packets are encoded into [`Self::plain`] and sealed into frames in the write buffer:
/// after each packet, or, in batch mode, all at once before the write.
#[derive(Debug)]
pub struct Framer {
    plain: BytesMut,
    batch: bool,
    max_frame: usize,
    /// xorshift state for the masking keys.
    rng: u64,
}

impl Framer {
    /// A framer for one connection.
    pub fn new(s: &WsSettings) -> Self {
        use std::hash::BuildHasher;
        let seed = std::collections::hash_map::RandomState::new().hash_one(std::process::id());
        Self {
            plain: BytesMut::new(),
            batch: s.batch,
            max_frame: s.max_frame.max(1),
            rng: seed | 1,
        }
    }

    /// Where the next packet is encoded.
    pub fn plain(&mut self) -> &mut BytesMut {
        &mut self.plain
    }

    /// Whether packets wait for the write to be framed together.
    pub fn batch(&self) -> bool {
        self.batch
    }

    /// Bytes encoded and not yet framed.
    pub fn pending(&self) -> usize {
        self.plain.len()
    }

    /// Frames everything encoded so far into `out`: binary frames of at most the maximum
    /// payload each.
    pub fn seal(&mut self, out: &mut BytesMut) {
        if self.plain.is_empty() {
            return;
        }
        let max = self.max_frame;
        let mut from = 0;
        while from < self.plain.len() {
            let to = (from + max).min(self.plain.len());
            let mask = self.next_mask();
            encode_frame(OP_BINARY, &self.plain[from..to], mask, out);
            from = to;
        }
        self.plain.clear();
    }

    /// Queues a close frame (status 1000, normal closure) into `out`.
    pub fn close(&mut self, out: &mut BytesMut) {
        let mask = self.next_mask();
        encode_frame(OP_CLOSE, &1000u16.to_be_bytes(), mask, out);
    }

    fn next_mask(&mut self) -> [u8; 4] {
        // xorshift64: masks only have to differ, not to be secret from ourselves
        let mut x = self.rng;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.rng = x;
        let [a, b, c, d, ..] = x.to_le_bytes();
        [a, b, c, d]
    }
}

/// Appends one final frame of `opcode` with `payload`, masked with `mask`.
fn encode_frame(opcode: u8, payload: &[u8], mask: [u8; 4], out: &mut BytesMut) {
    out.reserve(payload.len() + 14);
    out.extend_from_slice(&[0x80 | opcode]);
    let len = payload.len();
    if len < 126 {
        out.extend_from_slice(&[0x80 | len as u8]);
    } else if let Ok(l) = u16::try_from(len) {
        out.extend_from_slice(&[0x80 | 126]);
        out.extend_from_slice(&l.to_be_bytes());
    } else {
        out.extend_from_slice(&[0x80 | 127]);
        out.extend_from_slice(&(len as u64).to_be_bytes());
    }
    out.extend_from_slice(&mask);
    let start = out.len();
    out.extend_from_slice(payload);
    apply_mask(&mut out[start..], mask, 0);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings(batch: bool, max_frame: usize) -> WsSettings {
        WsSettings::from_target("ws://h:1", "/mqtt", Some("mqtt"), batch, max_frame).unwrap()
    }

    /// An unmasked server frame.
    fn server_frame(opcode: u8, fin: bool, payload: &[u8]) -> Vec<u8> {
        let mut v = vec![if fin { 0x80 } else { 0 } | opcode];
        match payload.len() {
            n if n < 126 => v.push(n as u8),
            n if n <= 0xFFFF => {
                v.push(126);
                v.extend_from_slice(&(n as u16).to_be_bytes());
            }
            n => {
                v.push(127);
                v.extend_from_slice(&(n as u64).to_be_bytes());
            }
        }
        v.extend_from_slice(payload);
        v
    }

    #[test]
    fn targets_give_host_path_and_protocol() {
        let s = WsSettings::from_target("ws://127.0.0.1:3653", "/mqtt", Some("mqtt"), false, 9)
            .unwrap();
        assert_eq!(
            (s.host.as_str(), s.path.as_str()),
            ("127.0.0.1:3653", "/mqtt")
        );
        let s = WsSettings::from_target("wss://h:1/x/y?a=b", "/", None, true, 0).unwrap();
        assert_eq!((s.host.as_str(), s.path.as_str()), ("h:1", "/x/y?a=b"));
        assert_eq!(s.max_frame, 1);
        let s = WsSettings::from_target("ws://h:1?a=b", "/mqtt", None, false, 9).unwrap();
        assert_eq!(s.path, "/mqtt?a=b");
        assert!(WsSettings::from_target("mqtt://h:1", "/", None, false, 9).is_none());
        assert!(WsSettings::from_target("h:1", "/", None, false, 9).is_none());
        assert!(is_wss("wss://h:1") && !is_wss("ws://h:1"));
    }

    #[test]
    fn upgrade_request_and_answer() {
        let s = settings(false, 4096);
        let req = upgrade_request(&s, "dGhlIHNhbXBsZSBub25jZQ==");
        assert!(req.starts_with("GET /mqtt HTTP/1.1\r\nHost: h:1\r\n"));
        assert!(req.contains("Sec-WebSocket-Protocol: mqtt\r\n"));
        assert!(req.ends_with("\r\n\r\n"));
        // RFC 6455's example key and answer
        let ok = b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n\
                   sec-websocket-accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n\r\n";
        assert_eq!(find_header_end(ok), Some(ok.len()));
        check_response(ok, "dGhlIHNhbXBsZSBub25jZQ==").unwrap();
        assert!(check_response(ok, "AAAAAAAAAAAAAAAAAAAAAA==").is_err());
        let refused = b"HTTP/1.1 503 Service Unavailable\r\n\r\n";
        let e = check_response(refused, "x").unwrap_err();
        assert!(e.to_string().contains("503"), "{e}");
        assert_eq!(find_header_end(b"HTTP/1.1 101 x\r\n"), None);
    }

    #[test]
    fn frames_round_trip_through_the_deframer() {
        for (batch, max) in [(false, 4096), (true, 4096), (true, 7), (true, 70_000)] {
            let mut f = Framer::new(&settings(batch, max));
            let mut wire = BytesMut::new();
            let mut want = Vec::new();
            for i in 0..50u32 {
                let packet: Vec<u8> = (0..(i * 37 % 300)).map(|b| (b + i) as u8).collect();
                f.plain().extend_from_slice(&packet);
                want.extend_from_slice(&packet);
                if !f.batch() {
                    f.seal(&mut wire);
                }
            }
            f.seal(&mut wire);
            assert_eq!(f.pending(), 0);
            // every frame is masked and final
            let (_, op, _, mask) = parse_header(&wire).unwrap().unwrap();
            assert_eq!(op, OP_BINARY);
            assert!(mask.is_some());
            // fed one byte at a time, the payload comes out whole and in order
            let mut d = Deframer::new(BytesMut::new());
            let mut out = BytesMut::new();
            for b in wire.iter() {
                d.raw().extend_from_slice(&[*b]);
                assert_eq!(d.decode(&mut out).unwrap(), Status::Open);
            }
            assert_eq!(&out[..], &want[..], "batch {batch} max {max}");
        }
    }

    #[test]
    fn large_payloads_use_the_extended_lengths() {
        for len in [125usize, 126, 65_535, 65_536, 200_000] {
            let payload: Vec<u8> = (0..len).map(|i| (i % 251) as u8).collect();
            let mut wire = BytesMut::new();
            encode_frame(OP_BINARY, &payload, [1, 2, 3, 4], &mut wire);
            let mut d = Deframer::new(wire);
            let mut out = BytesMut::new();
            d.decode(&mut out).unwrap();
            assert_eq!(out.len(), len);
            assert_eq!(&out[..], &payload[..]);
            let server = server_frame(OP_BINARY, true, &payload);
            let mut d = Deframer::new(BytesMut::from(&server[..]));
            let mut out = BytesMut::new();
            d.decode(&mut out).unwrap();
            assert_eq!(&out[..], &payload[..]);
        }
    }

    #[test]
    fn packets_split_and_merged_across_frames() {
        use warren_proto::mqtt::{self, Packet, QoS};
        // Three PUBLISH packets: the first split over two frames (one a continuation of a
        // fragmented message), the second and third together in one frame, with a ping and a
        // pong between frames.
        let mut stream = BytesMut::new();
        for i in 0..3u8 {
            mqtt::encode_publish(
                &mut stream,
                b"a/b",
                QoS::AtMostOnce,
                false,
                false,
                0,
                &[i; 10],
            );
        }
        let first = mqtt::decode(&mut stream.clone(), 1 << 20).unwrap().unwrap();
        let Packet::Publish(p) = first else {
            panic!("not a publish")
        };
        assert_eq!(&p.payload[..], &[0u8; 10]);
        let one = 2 + 2 + 3 + 10;
        let mut wire = Vec::new();
        wire.extend(server_frame(OP_BINARY, false, &stream[..5]));
        wire.extend(server_frame(OP_PING, true, b"hi"));
        wire.extend(server_frame(OP_CONTINUATION, true, &stream[5..one]));
        wire.extend(server_frame(OP_PONG, true, b""));
        wire.extend(server_frame(OP_BINARY, true, &stream[one..]));
        for cut in [1, 3, 6, 17, wire.len()] {
            let mut d = Deframer::new(BytesMut::new());
            let mut out = BytesMut::new();
            let mut got = Vec::new();
            for part in wire.chunks(cut) {
                d.raw().extend_from_slice(part);
                assert_eq!(d.decode(&mut out).unwrap(), Status::Open);
                while let Some(Packet::Publish(p)) = mqtt::decode(&mut out, 1 << 20).unwrap() {
                    got.push(p.payload[0]);
                }
            }
            assert_eq!(got, [0, 1, 2], "cut {cut}");
            assert!(out.is_empty());
        }
    }

    #[test]
    fn close_frames_and_bad_frames() {
        let mut wire = server_frame(OP_BINARY, true, b"abc");
        wire.extend(server_frame(OP_CLOSE, true, &1000u16.to_be_bytes()));
        let mut d = Deframer::new(BytesMut::from(&wire[..]));
        let mut out = BytesMut::new();
        assert_eq!(d.decode(&mut out).unwrap(), Status::Closed);
        assert_eq!(&out[..], b"abc");
        // our own close frame parses as one
        let mut f = Framer::new(&settings(false, 10));
        let mut wire = BytesMut::new();
        f.close(&mut wire);
        let mut d = Deframer::new(wire);
        assert_eq!(d.decode(&mut out).unwrap(), Status::Closed);
        for bad in [
            vec![0x82 | 0x40, 0],                   // reserved bit
            vec![0x83, 0],                          // reserved opcode
            vec![0x09, 0],                          // fragmented ping
            server_frame(OP_PING, true, &[0; 126]), // control frame too long
        ] {
            let mut d = Deframer::new(BytesMut::from(&bad[..]));
            assert!(d.decode(&mut out).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn masks_at_any_phase() {
        let data: Vec<u8> = (0..41u8).collect();
        let mask = [0xA1, 0x02, 0xF3, 0x44];
        let mut whole = data.clone();
        apply_mask(&mut whole, mask, 0);
        for (i, b) in whole.iter().enumerate() {
            assert_eq!(*b, data[i] ^ mask[i % 4]);
        }
        // masking in two pieces, the second at phase 13, gives the same
        let mut parts = data.clone();
        let (a, b) = parts.split_at_mut(13);
        apply_mask(a, mask, 0);
        apply_mask(b, mask, 13);
        assert_eq!(parts, whole);
    }
}

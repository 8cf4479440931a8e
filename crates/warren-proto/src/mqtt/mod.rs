//! MQTT 3.1.1 codec (also reads MQTT 3.1 `MQIsdp` CONNECTs).
//!
//! This module owns the fixed header, the remaining-length varint, the [`Packet`] enum, the
//! free functions [`decode`] and [`encode`], and [`MqttCodec`] for `tokio_util` framing. Each
//! packet type has its own file with its `read`/`write` and byte tests; topic name and filter
//! rules live in [`topic`].
//!
//! The decoder is written for hostile input: the size limit is checked as soon as the fixed
//! header is known, before the body is awaited or allocated; a remaining length longer than
//! four bytes is rejected as soon as it is seen; nothing is allocated from an unchecked length;
//! and no input makes it panic (see the fuzz target in `fuzz/`). PUBLISH payloads are zero-copy
//! slices of the read buffer.

mod ack;
mod connack;
mod connect;
mod disconnect;
mod error;
mod pingreq;
mod pingresp;
mod puback;
mod pubcomp;
mod publish;
mod pubrec;
mod pubrel;
mod suback;
mod subscribe;
pub mod topic;
mod unsuback;
mod unsubscribe;

use bytes::{Buf, BufMut, Bytes, BytesMut};

pub use ack::{Ack, ack_bytes, connack_bytes};
pub use connack::ConnAck;
pub use connect::{Connect, LastWill};
pub use error::{DecodeError, EncodeError};
pub use pingresp::pingresp_bytes;
pub use publish::{Publish, encode_publish, try_encode_publish};
pub use suback::SubAck;
pub use subscribe::{Subscribe, SubscribeFilter};
pub use unsubscribe::Unsubscribe;

/// Largest body the four-byte remaining length can express (MQTT 3.1.1 §2.2.3).
pub const MAX_REMAINING_LENGTH: usize = 268_435_455;

/// Largest string or binary field a two-byte length prefix can express (MQTT 3.1.1 §1.5.3).
pub const MAX_FIELD_LEN: usize = 65_535;

/// How much [`MqttCodec`] reserves ahead for a body it is still waiting for. A small header
/// must not make the server commit a whole `max_packet` of memory per connection.
const MAX_PRE_RESERVE: usize = 64 * 1024;

// Packet types (high nibble of the first byte).
const CONNECT: u8 = 1;
const CONNACK: u8 = 2;
const PUBLISH: u8 = 3;
const PUBACK: u8 = 4;
const PUBREC: u8 = 5;
const PUBREL: u8 = 6;
const PUBCOMP: u8 = 7;
const SUBSCRIBE: u8 = 8;
const SUBACK: u8 = 9;
const UNSUBSCRIBE: u8 = 10;
const UNSUBACK: u8 = 11;
const PINGREQ: u8 = 12;
const PINGRESP: u8 = 13;
const DISCONNECT: u8 = 14;

/// Delivery guarantee of a PUBLISH or a subscription.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
#[repr(u8)]
pub enum QoS {
    /// Fire and forget.
    #[default]
    AtMostOnce = 0,
    /// Acknowledged with PUBACK; may be delivered twice.
    AtLeastOnce = 1,
    /// Four-way PUBREC/PUBREL/PUBCOMP handshake; delivered once.
    ExactlyOnce = 2,
}

impl QoS {
    /// Parses the wire value; `None` for anything but 0, 1 or 2.
    pub fn from_u8(v: u8) -> Option<QoS> {
        match v {
            0 => Some(QoS::AtMostOnce),
            1 => Some(QoS::AtLeastOnce),
            2 => Some(QoS::ExactlyOnce),
            _ => None,
        }
    }

    /// The wire value.
    pub fn as_u8(self) -> u8 {
        self as u8
    }
}

impl TryFrom<u8> for QoS {
    type Error = DecodeError;

    fn try_from(v: u8) -> Result<Self, Self::Error> {
        QoS::from_u8(v).ok_or(DecodeError::InvalidQoS(v))
    }
}

/// One MQTT control packet, from either side of the connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Packet {
    /// Client opens a session.
    Connect(Connect),
    /// Server answers CONNECT.
    ConnAck(ConnAck),
    /// Application message, either direction.
    Publish(Publish),
    /// QoS 1 acknowledgement, with its packet id.
    PubAck(u16),
    /// QoS 2 step 1 acknowledgement, with its packet id.
    PubRec(u16),
    /// QoS 2 release, with its packet id.
    PubRel(u16),
    /// QoS 2 completion, with its packet id.
    PubComp(u16),
    /// Client subscribes to topic filters.
    Subscribe(Subscribe),
    /// Server answers SUBSCRIBE.
    SubAck(SubAck),
    /// Client removes subscriptions.
    Unsubscribe(Unsubscribe),
    /// Server answers UNSUBSCRIBE, with its packet id.
    UnsubAck(u16),
    /// Client keepalive probe.
    PingReq,
    /// Server keepalive answer.
    PingResp,
    /// Client closes the session cleanly.
    Disconnect,
}

impl Packet {
    /// A short stable name of the packet type for logs and metrics (for example `"publish"`).
    pub fn name(&self) -> &'static str {
        match self {
            Packet::Connect(_) => "connect",
            Packet::ConnAck(_) => "connack",
            Packet::Publish(_) => "publish",
            Packet::PubAck(_) => "puback",
            Packet::PubRec(_) => "pubrec",
            Packet::PubRel(_) => "pubrel",
            Packet::PubComp(_) => "pubcomp",
            Packet::Subscribe(_) => "subscribe",
            Packet::SubAck(_) => "suback",
            Packet::Unsubscribe(_) => "unsubscribe",
            Packet::UnsubAck(_) => "unsuback",
            Packet::PingReq => "pingreq",
            Packet::PingResp => "pingresp",
            Packet::Disconnect => "disconnect",
        }
    }
}

/// What the fixed header says about the packet that starts a buffer.
#[derive(Debug, Clone, Copy)]
struct FixedHeader {
    /// Packet type and flags.
    byte1: u8,
    /// Bytes taken by the first byte and the remaining length.
    header_len: usize,
    /// Body length.
    remaining: usize,
}

impl FixedHeader {
    fn total(&self) -> usize {
        self.header_len + self.remaining
    }
}

/// Parses the fixed header at the start of `buf` without consuming anything, checking the
/// packet type, its flags, the remaining-length encoding and `max_packet`.
fn parse_fixed_header(buf: &[u8], max_packet: usize) -> Result<Option<FixedHeader>, DecodeError> {
    let Some(&byte1) = buf.first() else {
        return Ok(None);
    };
    check_type_and_flags(byte1)?;
    let mut remaining = 0usize;
    for i in 0..4 {
        let Some(&b) = buf.get(1 + i) else {
            return Ok(None);
        };
        remaining |= usize::from(b & 0x7f) << (7 * i);
        if b & 0x80 == 0 {
            let header = FixedHeader {
                byte1,
                header_len: 2 + i,
                remaining,
            };
            let size = header.total();
            if size > max_packet {
                return Err(DecodeError::PacketTooLarge {
                    size,
                    max: max_packet,
                });
            }
            return Ok(Some(header));
        }
    }
    // The fourth length byte has its continuation bit set: a fifth would follow.
    Err(DecodeError::MalformedRemainingLength)
}

/// Rejects reserved packet types and flag nibbles that MQTT 3.1.1 §2.2.2 forbids.
fn check_type_and_flags(byte1: u8) -> Result<(), DecodeError> {
    let packet_type = byte1 >> 4;
    let flags = byte1 & 0x0f;
    let required = match packet_type {
        0 | 15 => return Err(DecodeError::InvalidPacketType(packet_type)),
        PUBLISH => {
            let qos = (flags >> 1) & 0b11;
            return if qos == 3 {
                Err(DecodeError::InvalidQoS(qos))
            } else {
                Ok(())
            };
        }
        PUBREL | SUBSCRIBE | UNSUBSCRIBE => 0b0010,
        _ => 0,
    };
    if flags == required {
        Ok(())
    } else {
        Err(DecodeError::InvalidFlags { packet_type, flags })
    }
}

/// Decodes one packet from the front of `buf`.
///
/// Returns `Ok(None)` when more bytes are needed, leaving `buf` untouched. On `Ok(Some)`
/// exactly that packet's bytes are consumed. Packets whose size (fixed header included)
/// exceeds `max_packet` fail with [`DecodeError::PacketTooLarge`] as soon as their header has
/// arrived. After an error the buffer state is unspecified and the connection must be closed.
pub fn decode(buf: &mut BytesMut, max_packet: usize) -> Result<Option<Packet>, DecodeError> {
    let Some(header) = parse_fixed_header(buf, max_packet)? else {
        return Ok(None);
    };
    if buf.len() < header.total() {
        return Ok(None);
    }
    let mut body = buf.split_to(header.total()).freeze();
    body.advance(header.header_len);
    read_body(header.byte1, body).map(Some)
}

/// Dispatches a complete body to its packet type's reader.
fn read_body(byte1: u8, body: Bytes) -> Result<Packet, DecodeError> {
    let flags = byte1 & 0x0f;
    Ok(match byte1 >> 4 {
        CONNECT => Packet::Connect(connect::read(body)?),
        CONNACK => Packet::ConnAck(connack::read(body)?),
        PUBLISH => Packet::Publish(publish::read(flags, body)?),
        PUBACK => Packet::PubAck(puback::read(body)?),
        PUBREC => Packet::PubRec(pubrec::read(body)?),
        PUBREL => Packet::PubRel(pubrel::read(body)?),
        PUBCOMP => Packet::PubComp(pubcomp::read(body)?),
        SUBSCRIBE => Packet::Subscribe(subscribe::read(body)?),
        SUBACK => Packet::SubAck(suback::read(body)?),
        UNSUBSCRIBE => Packet::Unsubscribe(unsubscribe::read(body)?),
        UNSUBACK => Packet::UnsubAck(unsuback::read(body)?),
        PINGREQ => {
            pingreq::read(body)?;
            Packet::PingReq
        }
        PINGRESP => {
            pingresp::read(body)?;
            Packet::PingResp
        }
        DISCONNECT => {
            disconnect::read(body)?;
            Packet::Disconnect
        }
        other => return Err(DecodeError::InvalidPacketType(other)),
    })
}

/// Appends `packet` to `buf` in wire format and returns the number of bytes written.
///
/// Fails, writing nothing, only when a field is longer than MQTT can express
/// ([`MAX_FIELD_LEN`], [`MAX_REMAINING_LENGTH`]). Packet contents are written as given: a
/// caller that builds a QoS 1 PUBLISH with packet id 0 gets exactly that on the wire.
pub fn try_encode(packet: &Packet, buf: &mut BytesMut) -> Result<usize, EncodeError> {
    match packet {
        Packet::Connect(c) => connect::write(c, buf),
        Packet::ConnAck(c) => Ok(connack::write(c, buf)),
        Packet::Publish(p) => publish::write(p, buf),
        Packet::PubAck(id) => Ok(puback::write(*id, buf)),
        Packet::PubRec(id) => Ok(pubrec::write(*id, buf)),
        Packet::PubRel(id) => Ok(pubrel::write(*id, buf)),
        Packet::PubComp(id) => Ok(pubcomp::write(*id, buf)),
        Packet::Subscribe(s) => subscribe::write(s, buf),
        Packet::SubAck(s) => suback::write(s, buf),
        Packet::Unsubscribe(u) => unsubscribe::write(u, buf),
        Packet::UnsubAck(id) => Ok(unsuback::write(*id, buf)),
        Packet::PingReq => Ok(pingreq::write(buf)),
        Packet::PingResp => Ok(pingresp::write(buf)),
        Packet::Disconnect => Ok(disconnect::write(buf)),
    }
}

/// Appends `packet` to `buf` in wire format.
///
/// A packet that MQTT cannot express (a field over [`MAX_FIELD_LEN`] bytes, a body over
/// [`MAX_REMAINING_LENGTH`]) is not written at all; use [`try_encode`] to learn about it.
pub fn encode(packet: &Packet, buf: &mut BytesMut) {
    // Writing nothing is the documented outcome for unrepresentable packets.
    let _ = try_encode(packet, buf);
}

/// `tokio_util` framing for MQTT with an inbound size limit.
///
/// Decoding applies `max_packet` to whole packets (fixed header included); encoding has no
/// limit beyond what MQTT can express.
#[derive(Debug, Clone)]
pub struct MqttCodec {
    max_packet: usize,
}

impl MqttCodec {
    /// A codec that rejects inbound packets larger than `max_packet` bytes.
    pub fn new(max_packet: usize) -> Self {
        Self { max_packet }
    }

    /// The inbound packet size limit.
    pub fn max_packet(&self) -> usize {
        self.max_packet
    }
}

impl tokio_util::codec::Decoder for MqttCodec {
    type Item = Packet;
    type Error = DecodeError;

    fn decode(&mut self, src: &mut BytesMut) -> Result<Option<Packet>, DecodeError> {
        let packet = decode(src, self.max_packet)?;
        if packet.is_none() {
            // The header may already say how much is coming (and has passed the size check).
            if let Some(header) = parse_fixed_header(src, self.max_packet)? {
                let wanted = header.total().min(MAX_PRE_RESERVE);
                src.reserve(wanted.saturating_sub(src.len()));
            }
        }
        Ok(packet)
    }
}

impl tokio_util::codec::Encoder<Packet> for MqttCodec {
    type Error = DecodeError;

    fn encode(&mut self, item: Packet, dst: &mut BytesMut) -> Result<(), DecodeError> {
        try_encode(&item, dst)?;
        Ok(())
    }
}

impl tokio_util::codec::Encoder<&Packet> for MqttCodec {
    type Error = DecodeError;

    fn encode(&mut self, item: &Packet, dst: &mut BytesMut) -> Result<(), DecodeError> {
        try_encode(item, dst)?;
        Ok(())
    }
}

// ---- field readers shared by the packet files ----

/// Reads one byte of the body.
fn read_u8(body: &mut Bytes) -> Result<u8, DecodeError> {
    if body.is_empty() {
        return Err(DecodeError::Truncated);
    }
    Ok(body.get_u8())
}

/// Reads a big-endian two-byte integer.
fn read_u16(body: &mut Bytes) -> Result<u16, DecodeError> {
    if body.len() < 2 {
        return Err(DecodeError::Truncated);
    }
    Ok(body.get_u16())
}

/// Reads a packet identifier, which must not be 0.
fn read_pkid(body: &mut Bytes) -> Result<u16, DecodeError> {
    match read_u16(body)? {
        0 => Err(DecodeError::ZeroPacketId),
        id => Ok(id),
    }
}

/// Reads a length-prefixed binary field as a zero-copy slice.
fn read_binary(body: &mut Bytes) -> Result<Bytes, DecodeError> {
    let len = usize::from(read_u16(body)?);
    if body.len() < len {
        return Err(DecodeError::Truncated);
    }
    Ok(body.split_to(len))
}

/// Checks that a string field is UTF-8 without U+0000 (MQTT 3.1.1 §1.5.3).
fn check_str(raw: &[u8]) -> Result<&str, DecodeError> {
    let s = std::str::from_utf8(raw).map_err(|_| DecodeError::InvalidUtf8)?;
    if s.contains('\0') {
        return Err(DecodeError::NullCharacter);
    }
    Ok(s)
}

/// Reads a length-prefixed UTF-8 string field.
fn read_string(body: &mut Bytes) -> Result<String, DecodeError> {
    let raw = read_binary(body)?;
    check_str(&raw).map(str::to_owned)
}

/// Checks a topic name (PUBLISH or will topic) that already passed [`check_str`].
fn check_topic_name(topic: &str) -> Result<(), DecodeError> {
    if topic.is_empty() {
        Err(DecodeError::EmptyTopic)
    } else if topic.contains(['+', '#']) {
        Err(DecodeError::WildcardInTopicName)
    } else {
        Ok(())
    }
}

/// Reads a length-prefixed topic filter and checks the wildcard rules.
fn read_filter(body: &mut Bytes) -> Result<String, DecodeError> {
    let filter = read_string(body)?;
    if topic::valid_filter(&filter) {
        Ok(filter)
    } else {
        Err(DecodeError::InvalidFilter)
    }
}

/// Fails when the body holds bytes after the last field.
fn expect_end(body: &Bytes) -> Result<(), DecodeError> {
    if body.is_empty() {
        Ok(())
    } else {
        Err(DecodeError::TrailingBytes)
    }
}

/// Reads the body of PUBACK, PUBREC, PUBREL, PUBCOMP and UNSUBACK: exactly a packet id.
fn read_ack(mut body: Bytes) -> Result<u16, DecodeError> {
    let pkid = read_pkid(&mut body)?;
    expect_end(&body)?;
    Ok(pkid)
}

// ---- field writers shared by the packet files ----

/// Encoded size of a length-prefixed field, or why it cannot be encoded.
fn field_len(data: &[u8]) -> Result<usize, EncodeError> {
    if data.len() > MAX_FIELD_LEN {
        Err(EncodeError::FieldTooLong { len: data.len() })
    } else {
        Ok(2 + data.len())
    }
}

/// Writes a length-prefixed field. Callers check [`field_len`] first; an over-long field is
/// cut so that the prefix always matches the bytes that follow.
fn write_binary(buf: &mut BytesMut, data: &[u8]) {
    let len = u16::try_from(data.len()).unwrap_or(u16::MAX);
    buf.put_u16(len);
    buf.put_slice(data.get(..usize::from(len)).unwrap_or(data));
}

/// Number of bytes the remaining-length varint takes for `len`.
fn remaining_length_len(len: usize) -> usize {
    match len {
        0..=127 => 1,
        128..=16_383 => 2,
        16_384..=2_097_151 => 3,
        _ => 4,
    }
}

/// Checks `remaining`, reserves room for the whole packet, writes the first byte and the
/// remaining length, and returns the whole packet size.
fn write_fixed_header(
    buf: &mut BytesMut,
    byte1: u8,
    remaining: usize,
) -> Result<usize, EncodeError> {
    if remaining > MAX_REMAINING_LENGTH {
        return Err(EncodeError::PacketTooLarge { size: remaining });
    }
    let total = 1 + remaining_length_len(remaining) + remaining;
    buf.reserve(total);
    buf.put_u8(byte1);
    let mut len = remaining;
    loop {
        // `len % 128` always fits in a byte.
        let mut byte = (len % 128) as u8;
        len /= 128;
        if len > 0 {
            byte |= 0x80;
        }
        buf.put_u8(byte);
        if len == 0 {
            break;
        }
    }
    Ok(total)
}

/// Writes a two-byte packet whose body is a packet id (PUBACK and friends).
fn write_ack(buf: &mut BytesMut, byte1: u8, pkid: u16) -> usize {
    buf.reserve(4);
    buf.put_u8(byte1);
    buf.put_u8(2);
    buf.put_u16(pkid);
    4
}

/// Helpers for the per-packet byte tests.
#[cfg(test)]
pub(crate) mod test_util {
    use super::*;

    /// Generous limit for tests that are not about limits.
    pub const MAX: usize = 1 << 20;

    /// Decodes exactly one packet that fills `bytes`.
    pub fn decode_one(bytes: &[u8]) -> Result<Packet, DecodeError> {
        let mut buf = BytesMut::from(bytes);
        let packet = decode(&mut buf, MAX)?.expect("a complete packet");
        assert!(buf.is_empty(), "decode left {} bytes", buf.len());
        Ok(packet)
    }

    /// Encodes a packet into a fresh vector.
    pub fn encode_vec(packet: &Packet) -> Vec<u8> {
        let mut buf = BytesMut::new();
        let n = try_encode(packet, &mut buf).expect("encodable");
        assert_eq!(n, buf.len());
        buf.to_vec()
    }

    /// Asserts that `bytes` decode to `packet` and that `packet` encodes to `bytes`, that
    /// every strict prefix asks for more bytes without consuming any, and that the packet
    /// decodes the same when followed by another one.
    pub fn assert_golden(bytes: &[u8], packet: &Packet) {
        assert_eq!(&decode_one(bytes).expect("valid packet"), packet);
        assert_eq!(encode_vec(packet), bytes);
        assert_prefixes_incomplete(bytes);
        let mut buf = BytesMut::from(bytes);
        buf.extend_from_slice(&[0xc0, 0x00]);
        assert_eq!(decode(&mut buf, MAX).unwrap().as_ref(), Some(packet));
        assert_eq!(decode(&mut buf, MAX).unwrap(), Some(Packet::PingReq));
        assert!(buf.is_empty());
    }

    /// Asserts that every strict prefix of `bytes` yields `Ok(None)` and consumes nothing.
    pub fn assert_prefixes_incomplete(bytes: &[u8]) {
        for n in 0..bytes.len() {
            let mut buf = BytesMut::from(&bytes[..n]);
            assert!(
                matches!(decode(&mut buf, MAX), Ok(None)),
                "prefix of {n} bytes"
            );
            assert_eq!(buf.len(), n, "prefix of {n} bytes was consumed");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::test_util::*;
    use super::*;
    use tokio_util::codec::{Decoder, Encoder};

    #[test]
    fn qos_from_u8() {
        assert_eq!(QoS::from_u8(0), Some(QoS::AtMostOnce));
        assert_eq!(QoS::from_u8(1), Some(QoS::AtLeastOnce));
        assert_eq!(QoS::from_u8(2), Some(QoS::ExactlyOnce));
        assert_eq!(QoS::from_u8(3), None);
        assert!(QoS::AtMostOnce < QoS::ExactlyOnce);
        assert!(matches!(QoS::try_from(7), Err(DecodeError::InvalidQoS(7))));
    }

    #[test]
    fn remaining_length_boundaries() {
        for len in [
            0usize,
            127,
            128,
            16_383,
            16_384,
            2_097_151,
            2_097_152,
            MAX_REMAINING_LENGTH,
        ] {
            let mut buf = BytesMut::new();
            write_fixed_header(&mut buf, 0x30, len).unwrap();
            assert_eq!(buf.len(), 1 + remaining_length_len(len));
            let h = parse_fixed_header(&buf, usize::MAX).unwrap().unwrap();
            assert_eq!(h.remaining, len);
            assert_eq!(h.header_len, buf.len());
        }
        let mut buf = BytesMut::new();
        assert_eq!(
            write_fixed_header(&mut buf, 0x30, MAX_REMAINING_LENGTH + 1),
            Err(EncodeError::PacketTooLarge {
                size: MAX_REMAINING_LENGTH + 1
            })
        );
        assert!(buf.is_empty());
    }

    #[test]
    fn five_byte_remaining_length_is_rejected_early() {
        // Rejected as soon as the fourth length byte announces a fifth, body or not.
        for bytes in [
            &[0x30, 0xff, 0xff, 0xff, 0xff][..],
            &[0x30, 0xff, 0xff, 0xff, 0xff, 0x01],
            &[0x30, 0x80, 0x80, 0x80, 0x80, 0x00],
        ] {
            let mut buf = BytesMut::from(bytes);
            assert!(matches!(
                decode(&mut buf, usize::MAX),
                Err(DecodeError::MalformedRemainingLength)
            ));
        }
        // Three continuation bytes are still only "need more".
        let mut buf = BytesMut::from(&[0x30, 0xff, 0xff, 0xff][..]);
        assert!(matches!(decode(&mut buf, usize::MAX), Ok(None)));
    }

    #[test]
    fn oversize_is_rejected_before_the_body() {
        // 70000-byte body announced, only the header present.
        let mut buf = BytesMut::new();
        write_fixed_header(&mut buf, 0x30, 70_000 - 4).unwrap();
        let e = decode(&mut buf, 4096).unwrap_err();
        assert_eq!(
            e.to_string(),
            "packet of 70000 bytes exceeds the limit of 4096"
        );
        assert_eq!(e.kind(), "too_large");
        // The limit counts the fixed header: 4096 total is fine, 4097 is not.
        let mut buf = BytesMut::new();
        write_fixed_header(&mut buf, 0x30, 4093).unwrap(); // 1 + 2 + 4093
        assert!(matches!(decode(&mut buf, 4096), Ok(None)));
        let mut buf = BytesMut::new();
        write_fixed_header(&mut buf, 0x30, 4094).unwrap();
        assert!(matches!(
            decode(&mut buf, 4096),
            Err(DecodeError::PacketTooLarge {
                size: 4097,
                max: 4096
            })
        ));
        // Even a PINGREQ is too large for a limit of 1.
        let mut buf = BytesMut::from(&[0xc0, 0x00][..]);
        assert!(matches!(
            decode(&mut buf, 1),
            Err(DecodeError::PacketTooLarge { size: 2, max: 1 })
        ));
    }

    #[test]
    fn reserved_packet_types_are_rejected() {
        for byte1 in [0x00, 0x0f, 0xf0, 0xff] {
            let mut buf = BytesMut::from(&[byte1][..]);
            assert!(matches!(
                decode(&mut buf, MAX),
                Err(DecodeError::InvalidPacketType(t)) if t == byte1 >> 4
            ));
        }
    }

    #[test]
    fn flags_are_checked_per_type() {
        for packet_type in 1u8..=14 {
            for flags in 0u8..16 {
                let mut buf = BytesMut::from(&[packet_type << 4 | flags][..]);
                let result = decode(&mut buf, MAX);
                let ok = match packet_type {
                    PUBLISH => (flags >> 1) & 3 != 3,
                    PUBREL | SUBSCRIBE | UNSUBSCRIBE => flags == 0b0010,
                    _ => flags == 0,
                };
                assert_eq!(ok, matches!(result, Ok(None)), "{packet_type} {flags}");
            }
        }
        let mut buf = BytesMut::from(&[0x80, 0x00][..]);
        assert!(matches!(
            decode(&mut buf, MAX),
            Err(DecodeError::InvalidFlags {
                packet_type: 8,
                flags: 0
            })
        ));
        let mut buf = BytesMut::from(&[0x36][..]);
        assert!(matches!(
            decode(&mut buf, MAX),
            Err(DecodeError::InvalidQoS(3))
        ));
    }

    #[test]
    fn two_packets_in_one_buffer() {
        let mut buf = BytesMut::new();
        encode_publish(&mut buf, b"a/b", QoS::AtLeastOnce, false, false, 9, b"x");
        encode(&Packet::PingReq, &mut buf);
        buf.extend_from_slice(&[0x30]); // start of a third
        let first = decode(&mut buf, MAX).unwrap().unwrap();
        assert!(matches!(&first, Packet::Publish(p) if p.pkid == 9 && p.topic_str() == "a/b"));
        assert_eq!(decode(&mut buf, MAX).unwrap(), Some(Packet::PingReq));
        assert!(decode(&mut buf, MAX).unwrap().is_none());
        assert_eq!(&buf[..], &[0x30]);
    }

    #[test]
    fn codec_frames_and_reserves_within_limits() {
        let mut codec = MqttCodec::new(1 << 20);
        assert_eq!(codec.max_packet(), 1 << 20);
        let mut out = BytesMut::new();
        let subscribe = Packet::Subscribe(Subscribe {
            pkid: 2,
            filters: vec![SubscribeFilter {
                filter: "chat".into(),
                qos: QoS::ExactlyOnce,
            }],
        });
        codec.encode(subscribe.clone(), &mut out).unwrap();
        Encoder::<&Packet>::encode(&mut codec, &Packet::PingResp, &mut out).unwrap();
        assert_eq!(codec.decode(&mut out).unwrap(), Some(subscribe));
        assert_eq!(&out[..], &[0xd0, 0x00]);

        // A header announcing 500 000 bytes reserves at most the pre-reserve cap.
        let mut header = BytesMut::new();
        write_fixed_header(&mut header, 0x30, 500_000).unwrap();
        let mut buf = BytesMut::from(&header[..]);
        assert!(codec.decode(&mut buf).unwrap().is_none());
        assert!(buf.capacity() >= MAX_PRE_RESERVE);
        assert!(buf.capacity() < 500_000);

        let mut small = MqttCodec::new(16);
        let mut buf = BytesMut::from(&[0x30, 0x7f][..]);
        assert!(matches!(
            small.decode(&mut buf),
            Err(DecodeError::PacketTooLarge { size: 129, max: 16 })
        ));
    }

    #[test]
    fn unencodable_packets_write_nothing() {
        let long = "x".repeat(MAX_FIELD_LEN + 1);
        let packet = Packet::Unsubscribe(Unsubscribe {
            pkid: 1,
            filters: vec![long],
        });
        let mut buf = BytesMut::new();
        assert_eq!(
            try_encode(&packet, &mut buf),
            Err(EncodeError::FieldTooLong {
                len: MAX_FIELD_LEN + 1
            })
        );
        encode(&packet, &mut buf);
        assert!(buf.is_empty());
        let mut codec = MqttCodec::new(10);
        assert!(matches!(
            codec.encode(packet, &mut buf),
            Err(DecodeError::Encode(_))
        ));
    }

    #[test]
    fn packet_names() {
        assert_eq!(Packet::PingReq.name(), "pingreq");
        assert_eq!(Packet::PubRel(1).name(), "pubrel");
    }

    #[test]
    fn truncated_bodies() {
        // PUBLISH whose topic length says 16 but only 2 bytes follow.
        assert!(matches!(
            decode_one(&[0x30, 0x04, 0x00, 0x10, b'a', b'b']),
            Err(DecodeError::Truncated)
        ));
        // PUBACK with a one-byte body.
        assert!(matches!(
            decode_one(&[0x40, 0x01, 0x00]),
            Err(DecodeError::Truncated)
        ));
    }
}

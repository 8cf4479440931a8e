//! PUBLISH: an application message in either direction (MQTT 3.1.1 §3.3).
//!
//! Decoding is zero-copy: topic and payload are slices of the read buffer. The gate's writer
//! uses [`encode_publish`] to frame pushes straight from borrowed topic and body bytes.

use bytes::{BufMut, Bytes, BytesMut};

use super::{
    DecodeError, EncodeError, QoS, check_str, check_topic_name, field_len, read_binary, read_pkid,
    write_binary, write_fixed_header,
};

const DUP: u8 = 0b1000;
const RETAIN: u8 = 0b0001;

/// An application message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Publish {
    /// Redelivery of an earlier attempt.
    pub dup: bool,
    /// Delivery guarantee.
    pub qos: QoS,
    /// Ask the server to keep this as the topic's last message.
    pub retain: bool,
    /// Topic name: validated UTF-8 without wildcards when decoded; see [`Publish::topic_str`].
    pub topic: Bytes,
    /// Packet identifier; 0 for QoS 0, non-zero otherwise.
    pub pkid: u16,
    /// Message body, a zero-copy slice of the read buffer when decoded.
    pub payload: Bytes,
}

impl Publish {
    /// A message with no flags set and packet id 0 (set `pkid` for QoS 1 and 2).
    pub fn new(topic: impl Into<String>, qos: QoS, payload: impl Into<Bytes>) -> Self {
        Self {
            dup: false,
            qos,
            retain: false,
            topic: Bytes::from(topic.into()),
            pkid: 0,
            payload: payload.into(),
        }
    }

    /// The topic as text. Decoded packets always have a valid topic; a hand-built one that is
    /// not UTF-8 yields `""` rather than a panic.
    pub fn topic_str(&self) -> &str {
        std::str::from_utf8(&self.topic).unwrap_or("")
    }
}

/// Reads a PUBLISH body; `flags` is the low nibble of the first byte.
pub(crate) fn read(flags: u8, mut body: Bytes) -> Result<Publish, DecodeError> {
    let qos_bits = (flags >> 1) & 0b11;
    let qos = QoS::from_u8(qos_bits).ok_or(DecodeError::InvalidQoS(qos_bits))?;
    let topic = read_binary(&mut body)?;
    check_topic_name(check_str(&topic)?)?;
    let pkid = if qos == QoS::AtMostOnce {
        0
    } else {
        read_pkid(&mut body)?
    };
    Ok(Publish {
        dup: flags & DUP != 0,
        qos,
        retain: flags & RETAIN != 0,
        topic,
        pkid,
        payload: body,
    })
}

/// Writes a whole PUBLISH packet; nothing is written on error.
pub(crate) fn write(p: &Publish, buf: &mut BytesMut) -> Result<usize, EncodeError> {
    try_encode_publish(buf, &p.topic, p.qos, p.retain, p.dup, p.pkid, &p.payload)
}

/// Appends one complete PUBLISH (fixed header, remaining length, topic, packet id when QoS >
/// 0, payload) without building a [`Publish`], and returns the number of bytes written.
///
/// Fails, writing nothing, when the topic is longer than 65 535 bytes or the packet larger
/// than MQTT can express. `pkid` is ignored for QoS 0.
pub fn try_encode_publish(
    buf: &mut BytesMut,
    topic: &[u8],
    qos: QoS,
    retain: bool,
    dup: bool,
    pkid: u16,
    payload: &[u8],
) -> Result<usize, EncodeError> {
    let with_pkid = qos != QoS::AtMostOnce;
    let len = field_len(topic)? + if with_pkid { 2 } else { 0 } + payload.len();
    let mut byte1 = 0x30 | (qos.as_u8() << 1);
    if dup {
        byte1 |= DUP;
    }
    if retain {
        byte1 |= RETAIN;
    }
    let total = write_fixed_header(buf, byte1, len)?;
    write_binary(buf, topic);
    if with_pkid {
        buf.put_u16(pkid);
    }
    buf.put_slice(payload);
    Ok(total)
}

/// Fast path for the gate's writer: appends one complete PUBLISH (fixed header, remaining
/// length, topic, packet id when QoS > 0, payload) without building a [`Publish`] value.
///
/// A topic over 65 535 bytes or a packet over MQTT's size limit is not written at all; use
/// [`try_encode_publish`] to learn about it.
pub fn encode_publish(
    buf: &mut BytesMut,
    topic: &[u8],
    qos: QoS,
    retain: bool,
    dup: bool,
    pkid: u16,
    payload: &[u8],
) {
    // Writing nothing is the documented outcome for unrepresentable packets.
    let _ = try_encode_publish(buf, topic, qos, retain, dup, pkid, payload);
}

#[cfg(test)]
mod tests {
    use super::super::test_util::*;
    use super::super::{MAX_FIELD_LEN, Packet, decode};
    use super::*;

    fn cat(parts: &[&[u8]]) -> Vec<u8> {
        parts.concat()
    }

    #[test]
    fn qos1_request_and_reply() {
        let body = br#"{"userName":"alice","passWord":"Hello,anyone!"}"#;
        let bytes = cat(&[
            &[0x32, 0x43, 0x00, 0x10],
            b"Login/HD_Login/1",
            &[0x00, 0x01],
            body,
        ]);
        let mut p = Publish::new(
            "Login/HD_Login/1",
            QoS::AtLeastOnce,
            Bytes::from_static(body),
        );
        p.pkid = 1;
        assert_golden(&bytes, &Packet::Publish(p));

        let reply = br#"{"Error":"","Result":"login success alice"}"#;
        let mut buf = BytesMut::new();
        encode_publish(
            &mut buf,
            b"Login/HD_Login/1",
            QoS::AtLeastOnce,
            false,
            false,
            1,
            reply,
        );
        let expected = cat(&[
            &[0x32, 0x3f, 0x00, 0x10],
            b"Login/HD_Login/1",
            &[0x00, 0x01],
            reply,
        ]);
        assert_eq!(&buf[..], &expected[..]);
    }

    #[test]
    fn qos0_has_no_packet_id() {
        let bytes = cat(&[&[0x30, 0x13, 0x00, 0x10], b"Login/HD_Login/1", b"x"]);
        let p = Publish::new(
            "Login/HD_Login/1",
            QoS::AtMostOnce,
            Bytes::from_static(b"x"),
        );
        assert_golden(&bytes, &Packet::Publish(p));
        // pkid is ignored when encoding QoS 0.
        let mut buf = BytesMut::new();
        encode_publish(
            &mut buf,
            b"Login/HD_Login/1",
            QoS::AtMostOnce,
            false,
            false,
            77,
            b"x",
        );
        assert_eq!(&buf[..], &bytes[..]);
    }

    #[test]
    fn qos2_dup_retain_and_empty_payload() {
        let bytes = cat(&[&[0x3d, 0x05, 0x00, 0x01], b"t", &[0x12, 0x34]]);
        let mut p = Publish::new("t", QoS::ExactlyOnce, Bytes::new());
        p.dup = true;
        p.retain = true;
        p.pkid = 0x1234;
        assert_golden(&bytes, &Packet::Publish(p));
    }

    #[test]
    fn payload_is_zero_copy() {
        let bytes = cat(&[&[0x30, 0x06, 0x00, 0x01], b"t", b"abc"]);
        let mut buf = BytesMut::from(&bytes[..]);
        let start = buf.as_ptr() as usize;
        let Some(Packet::Publish(p)) = decode(&mut buf, MAX).unwrap() else {
            panic!("not a publish");
        };
        assert_eq!(p.payload.as_ptr() as usize, start + 5);
        assert_eq!(p.topic.as_ptr() as usize, start + 4);
    }

    #[test]
    fn zero_packet_id() {
        assert!(matches!(
            decode_one(&cat(&[&[0x32, 0x05, 0x00, 0x01], b"t", &[0x00, 0x00]])),
            Err(DecodeError::ZeroPacketId)
        ));
    }

    #[test]
    fn invalid_topics() {
        assert!(matches!(
            decode_one(&[0x30, 0x05, 0x00, 0x02, 0xc3, 0x28, b'x']),
            Err(DecodeError::InvalidUtf8)
        ));
        assert!(matches!(
            decode_one(&cat(&[&[0x30, 0x05, 0x00, 0x03], b"a/+"])),
            Err(DecodeError::WildcardInTopicName)
        ));
        assert!(matches!(
            decode_one(&cat(&[&[0x30, 0x03, 0x00, 0x01], b"#"])),
            Err(DecodeError::WildcardInTopicName)
        ));
        assert!(matches!(
            decode_one(&[0x30, 0x03, 0x00, 0x00, b'x']),
            Err(DecodeError::EmptyTopic)
        ));
        assert!(matches!(
            decode_one(&[0x30, 0x04, 0x00, 0x02, b'a', 0x00]),
            Err(DecodeError::NullCharacter)
        ));
    }

    #[test]
    fn truncated_packet_id() {
        assert!(matches!(
            decode_one(&cat(&[&[0x32, 0x04, 0x00, 0x01], b"t", &[0x00]])),
            Err(DecodeError::Truncated)
        ));
    }

    #[test]
    fn topic_str_never_panics() {
        let mut p = Publish::new("a", QoS::AtMostOnce, Bytes::new());
        assert_eq!(p.topic_str(), "a");
        p.topic = Bytes::from_static(&[0xff]);
        assert_eq!(p.topic_str(), "");
    }

    #[test]
    fn long_topic_is_not_encoded() {
        let topic = vec![b'a'; MAX_FIELD_LEN + 1];
        let mut buf = BytesMut::new();
        assert_eq!(
            try_encode_publish(&mut buf, &topic, QoS::AtMostOnce, false, false, 0, b""),
            Err(EncodeError::FieldTooLong {
                len: MAX_FIELD_LEN + 1
            })
        );
        encode_publish(&mut buf, &topic, QoS::AtMostOnce, false, false, 0, b"");
        assert!(buf.is_empty());
        // The longest legal topic is fine.
        let n = try_encode_publish(&mut buf, &topic[1..], QoS::AtMostOnce, false, false, 0, b"")
            .unwrap();
        assert_eq!(n, buf.len());
    }
}

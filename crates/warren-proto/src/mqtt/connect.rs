//! CONNECT: the first packet of every client connection (MQTT 3.1.1 §3.1).
//!
//! MQTT 3.1 (`MQIsdp`, level 3) CONNECTs have the same layout as 3.1.1 and decode here too. Any
//! other protocol name or level stops the decoder with [`DecodeError::UnsupportedProtocol`]
//! before the rest of the body (whose layout differs, e.g. MQTT 5 properties) is read, so the
//! gate can answer CONNACK 1 instead of reporting a malformed packet.

use bytes::{BufMut, Bytes, BytesMut};

use super::{
    DecodeError, EncodeError, QoS, check_topic_name, expect_end, field_len, read_binary,
    read_string, read_u8, read_u16, write_binary, write_fixed_header,
};

const RESERVED: u8 = 0b0000_0001;
const CLEAN_SESSION: u8 = 0b0000_0010;
const WILL: u8 = 0b0000_0100;
const WILL_QOS_SHIFT: u8 = 3;
const WILL_QOS_MASK: u8 = 0b0001_1000;
const WILL_RETAIN: u8 = 0b0010_0000;
const PASSWORD: u8 = 0b0100_0000;
const USERNAME: u8 = 0b1000_0000;

/// A client's request to open a session.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Connect {
    /// `"MQTT"` (3.1.1) or `"MQIsdp"` (3.1); the decoder accepts any name, the gate validates.
    pub protocol_name: String,
    /// 4 (3.1.1) or 3 (3.1); the gate validates.
    pub protocol_level: u8,
    /// Discard any previous session state.
    pub clean_session: bool,
    /// Keepalive interval in seconds; 0 disables it.
    pub keep_alive: u16,
    /// Client identifier; may be empty here, the gate validates its length.
    pub client_id: String,
    /// Message to publish if the connection ends without DISCONNECT.
    pub will: Option<LastWill>,
    /// User name, if the client sent one.
    pub username: Option<String>,
    /// Password, if the client sent one (binary in MQTT 3.1.1).
    pub password: Option<Bytes>,
}

impl Connect {
    /// A 3.1.1 CONNECT with a clean session and no will or credentials, as test clients send.
    pub fn new(client_id: impl Into<String>, keep_alive: u16) -> Self {
        Self {
            protocol_name: "MQTT".to_owned(),
            protocol_level: 4,
            clean_session: true,
            keep_alive,
            client_id: client_id.into(),
            will: None,
            username: None,
            password: None,
        }
    }

    /// The connect-flags byte this packet encodes to.
    fn flags(&self) -> u8 {
        let mut flags = 0;
        if self.clean_session {
            flags |= CLEAN_SESSION;
        }
        if let Some(will) = &self.will {
            flags |= WILL | (will.qos.as_u8() << WILL_QOS_SHIFT);
            if will.retain {
                flags |= WILL_RETAIN;
            }
        }
        if self.password.is_some() {
            flags |= PASSWORD;
        }
        if self.username.is_some() {
            flags |= USERNAME;
        }
        flags
    }
}

/// The will message of a CONNECT.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LastWill {
    /// Topic name the will is published on (valid, without wildcards).
    pub topic: String,
    /// Will payload.
    pub message: Bytes,
    /// QoS of the will publication.
    pub qos: QoS,
    /// Whether the will is retained.
    pub retain: bool,
}

/// Reads a CONNECT body.
pub(crate) fn read(mut body: Bytes) -> Result<Connect, DecodeError> {
    let protocol_name = read_string(&mut body)?;
    let protocol_level = read_u8(&mut body)?;
    if !matches!(
        (protocol_name.as_str(), protocol_level),
        ("MQTT", 4) | ("MQIsdp", 3)
    ) {
        return Err(DecodeError::UnsupportedProtocol {
            name: protocol_name,
            level: protocol_level,
        });
    }
    let flags = read_u8(&mut body)?;
    if flags & RESERVED != 0 {
        return Err(DecodeError::InvalidConnectFlags(flags));
    }
    let keep_alive = read_u16(&mut body)?;
    let client_id = read_string(&mut body)?;
    let will = if flags & WILL != 0 {
        let qos_bits = (flags & WILL_QOS_MASK) >> WILL_QOS_SHIFT;
        let qos = QoS::from_u8(qos_bits).ok_or(DecodeError::InvalidQoS(qos_bits))?;
        let topic = read_string(&mut body)?;
        check_topic_name(&topic)?;
        let message = read_binary(&mut body)?;
        Some(LastWill {
            topic,
            message,
            qos,
            retain: flags & WILL_RETAIN != 0,
        })
    } else if flags & (WILL_QOS_MASK | WILL_RETAIN) != 0 {
        // MQTT 3.1.1 §3.1.2.6/§3.1.2.7: no will, so will QoS and retain must be 0.
        return Err(DecodeError::InvalidConnectFlags(flags));
    } else {
        None
    };
    let username = if flags & USERNAME != 0 {
        Some(read_string(&mut body)?)
    } else {
        None
    };
    // A password without a user name is tolerated: some 3.1 clients send one.
    let password = if flags & PASSWORD != 0 {
        Some(read_binary(&mut body)?)
    } else {
        None
    };
    expect_end(&body)?;
    Ok(Connect {
        protocol_name,
        protocol_level,
        clean_session: flags & CLEAN_SESSION != 0,
        keep_alive,
        client_id,
        will,
        username,
        password,
    })
}

/// Writes a whole CONNECT packet; nothing is written on error.
pub(crate) fn write(c: &Connect, buf: &mut BytesMut) -> Result<usize, EncodeError> {
    let mut len = field_len(c.protocol_name.as_bytes())? + 1 + 1 + 2;
    len += field_len(c.client_id.as_bytes())?;
    if let Some(will) = &c.will {
        len += field_len(will.topic.as_bytes())? + field_len(&will.message)?;
    }
    if let Some(username) = &c.username {
        len += field_len(username.as_bytes())?;
    }
    if let Some(password) = &c.password {
        len += field_len(password)?;
    }
    let total = write_fixed_header(buf, 0x10, len)?;
    write_binary(buf, c.protocol_name.as_bytes());
    buf.put_u8(c.protocol_level);
    buf.put_u8(c.flags());
    buf.put_u16(c.keep_alive);
    write_binary(buf, c.client_id.as_bytes());
    if let Some(will) = &c.will {
        write_binary(buf, will.topic.as_bytes());
        write_binary(buf, &will.message);
    }
    if let Some(username) = &c.username {
        write_binary(buf, username.as_bytes());
    }
    if let Some(password) = &c.password {
        write_binary(buf, password);
    }
    Ok(total)
}

#[cfg(test)]
mod tests {
    use super::super::Packet;
    use super::super::test_util::*;
    use super::*;

    fn cat(parts: &[&[u8]]) -> Vec<u8> {
        parts.concat()
    }

    #[test]
    fn mqtt_3_1_with_credentials() {
        let bytes = cat(&[
            &[0x10, 0x22, 0x00, 0x06],
            b"MQIsdp",
            &[0x03, 0xc2, 0x00, 0x3c, 0x00, 0x03],
            b"111",
            &[0x00, 0x05],
            b"admin",
            &[0x00, 0x08],
            b"password",
        ]);
        let packet = Packet::Connect(Connect {
            protocol_name: "MQIsdp".into(),
            protocol_level: 3,
            clean_session: true,
            keep_alive: 60,
            client_id: "111".into(),
            will: None,
            username: Some("admin".into()),
            password: Some(Bytes::from_static(b"password")),
        });
        assert_golden(&bytes, &packet);
    }

    #[test]
    fn mqtt_3_1_1_minimal_and_empty_client_id() {
        let bytes = cat(&[
            &[0x10, 0x0d, 0x00, 0x04],
            b"MQTT",
            &[0x04, 0x02, 0x00, 0x3c, 0x00, 0x01, b'a'],
        ]);
        assert_golden(&bytes, &Packet::Connect(Connect::new("a", 60)));
        let bytes = cat(&[
            &[0x10, 0x0c, 0x00, 0x04],
            b"MQTT",
            &[0x04, 0x02, 0x00, 0x3c, 0x00, 0x00],
        ]);
        assert_golden(&bytes, &Packet::Connect(Connect::new("", 60)));
    }

    #[test]
    fn will_flags() {
        let mut connect = Connect::new("c", 0);
        connect.clean_session = false;
        connect.will = Some(LastWill {
            topic: "bye/c".into(),
            message: Bytes::from_static(b"gone"),
            qos: QoS::ExactlyOnce,
            retain: true,
        });
        let bytes = cat(&[
            &[0x10, 0x1a, 0x00, 0x04],
            b"MQTT",
            &[0x04, 0x34, 0x00, 0x00, 0x00, 0x01, b'c', 0x00, 0x05],
            b"bye/c",
            &[0x00, 0x04],
            b"gone",
        ]);
        assert_golden(&bytes, &Packet::Connect(connect));
    }

    #[test]
    fn password_without_username_is_tolerated() {
        let mut connect = Connect::new("c", 10);
        connect.password = Some(Bytes::from_static(&[0xff, 0x00]));
        let bytes = encode_vec(&Packet::Connect(connect.clone()));
        assert_eq!(decode_one(&bytes).unwrap(), Packet::Connect(connect));
    }

    /// A CONNECT for client `c` with the given flags byte and extra body bytes.
    fn with_flags(flags: u8, extra: &[u8]) -> Vec<u8> {
        let body = cat(&[
            &[0x00, 0x04],
            b"MQTT",
            &[0x04, flags, 0x00, 0x00, 0x00, 0x01, b'c'],
            extra,
        ]);
        cat(&[&[0x10, body.len() as u8], &body])
    }

    #[test]
    fn reserved_flag_is_rejected() {
        assert!(matches!(
            decode_one(&with_flags(0x03, &[])),
            Err(DecodeError::InvalidConnectFlags(0x03))
        ));
    }

    #[test]
    fn will_qos_or_retain_without_will_is_rejected() {
        for flags in [0x08, 0x10, 0x20] {
            assert!(matches!(
                decode_one(&with_flags(flags, &[])),
                Err(DecodeError::InvalidConnectFlags(f)) if f == flags
            ));
        }
    }

    #[test]
    fn will_qos_3_is_rejected() {
        assert!(matches!(
            decode_one(&with_flags(0x1c, &[0x00, 0x01, b't', 0x00, 0x00])),
            Err(DecodeError::InvalidQoS(3))
        ));
    }

    #[test]
    fn will_topic_rules() {
        assert!(matches!(
            decode_one(&with_flags(0x04, &[0x00, 0x01, b'#', 0x00, 0x00])),
            Err(DecodeError::WildcardInTopicName)
        ));
        assert!(matches!(
            decode_one(&with_flags(0x04, &[0x00, 0x00, 0x00, 0x00])),
            Err(DecodeError::EmptyTopic)
        ));
    }

    #[test]
    fn missing_and_extra_fields() {
        // Username flag set but no username.
        assert!(matches!(
            decode_one(&with_flags(0x82, &[])),
            Err(DecodeError::Truncated)
        ));
        // One byte after the client id.
        assert!(matches!(
            decode_one(&with_flags(0x02, &[0x00])),
            Err(DecodeError::TrailingBytes)
        ));
        // Body ends inside the fixed part.
        assert!(matches!(
            decode_one(&[0x10, 0x03, 0x00, 0x01, b'M']),
            Err(DecodeError::Truncated)
        ));
    }

    #[test]
    fn bad_strings() {
        assert!(matches!(
            decode_one(&with_flags(0x82, &[0x00, 0x01, 0xff])),
            Err(DecodeError::InvalidUtf8)
        ));
        assert!(matches!(
            decode_one(&with_flags(0x82, &[0x00, 0x01, 0x00])),
            Err(DecodeError::NullCharacter)
        ));
    }

    #[test]
    fn oversized_field_is_not_encoded() {
        let connect = Connect::new("x".repeat(70_000), 0);
        let mut buf = BytesMut::new();
        assert_eq!(
            write(&connect, &mut buf),
            Err(EncodeError::FieldTooLong { len: 70_000 })
        );
        assert!(buf.is_empty());
    }
}

//! CONNACK: the server's answer to CONNECT (MQTT 3.1.1 §3.2).

use bytes::{Bytes, BytesMut};

use super::{DecodeError, expect_end, read_u8, write_ack};

/// The server's verdict on a CONNECT.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConnAck {
    /// Whether the server resumed a stored session (always false in mqant mode).
    pub session_present: bool,
    /// Return code, one of the `ConnAck` constants (0..=5).
    pub code: u8,
}

impl ConnAck {
    /// Connection accepted.
    pub const ACCEPTED: u8 = 0;
    /// The server does not support the requested protocol name or level.
    pub const UNACCEPTABLE_PROTOCOL: u8 = 1;
    /// The client identifier is not allowed.
    pub const IDENTIFIER_REJECTED: u8 = 2;
    /// The service is unavailable.
    pub const SERVER_UNAVAILABLE: u8 = 3;
    /// The user name or password is malformed or wrong.
    pub const BAD_CREDENTIALS: u8 = 4;
    /// The client is not authorized to connect.
    pub const NOT_AUTHORIZED: u8 = 5;

    /// A CONNACK with `code` and no session present.
    pub fn new(code: u8) -> Self {
        Self {
            session_present: false,
            code,
        }
    }
}

/// Reads a CONNACK body.
pub(crate) fn read(mut body: Bytes) -> Result<ConnAck, DecodeError> {
    let flags = read_u8(&mut body)?;
    if flags & 0xfe != 0 {
        return Err(DecodeError::InvalidConnAckFlags(flags));
    }
    let code = read_u8(&mut body)?;
    if code > ConnAck::NOT_AUTHORIZED {
        return Err(DecodeError::InvalidReturnCode(code));
    }
    expect_end(&body)?;
    Ok(ConnAck {
        session_present: flags & 1 != 0,
        code,
    })
}

/// Writes a whole CONNACK packet.
pub(crate) fn write(c: &ConnAck, buf: &mut BytesMut) -> usize {
    // Same shape as an ack: two body bytes after `20 02`.
    write_ack(
        buf,
        0x20,
        u16::from_be_bytes([u8::from(c.session_present), c.code]),
    )
}

#[cfg(test)]
mod tests {
    use super::super::Packet;
    use super::super::test_util::*;
    use super::*;

    #[test]
    fn golden() {
        assert_golden(&[0x20, 0x02, 0x00, 0x00], &Packet::ConnAck(ConnAck::new(0)));
        assert_golden(
            &[0x20, 0x02, 0x00, 0x02],
            &Packet::ConnAck(ConnAck::new(ConnAck::IDENTIFIER_REJECTED)),
        );
        assert_golden(
            &[0x20, 0x02, 0x01, 0x00],
            &Packet::ConnAck(ConnAck {
                session_present: true,
                code: 0,
            }),
        );
    }

    #[test]
    fn invalid() {
        assert!(matches!(
            decode_one(&[0x20, 0x02, 0x02, 0x00]),
            Err(DecodeError::InvalidConnAckFlags(2))
        ));
        assert!(matches!(
            decode_one(&[0x20, 0x02, 0x00, 0x06]),
            Err(DecodeError::InvalidReturnCode(6))
        ));
        assert!(matches!(
            decode_one(&[0x20, 0x03, 0x00, 0x00, 0x00]),
            Err(DecodeError::TrailingBytes)
        ));
        assert!(matches!(
            decode_one(&[0x20, 0x01, 0x00]),
            Err(DecodeError::Truncated)
        ));
        assert!(matches!(
            decode_one(&[0x21, 0x02, 0x00, 0x00]),
            Err(DecodeError::InvalidFlags {
                packet_type: 2,
                flags: 1
            })
        ));
    }
}

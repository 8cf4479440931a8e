//! PINGREQ: the client's keepalive probe (MQTT 3.1.1 §3.12).

use bytes::{BufMut, Bytes, BytesMut};

use super::{DecodeError, expect_end};

/// The whole PINGREQ packet: the body is always empty.
const BYTES: [u8; 2] = [0xc0, 0x00];

/// Reads a PINGREQ body, which must be empty.
pub(crate) fn read(body: Bytes) -> Result<(), DecodeError> {
    expect_end(&body)
}

/// Writes a whole PINGREQ packet.
pub(crate) fn write(buf: &mut BytesMut) -> usize {
    buf.put_slice(&BYTES);
    BYTES.len()
}

#[cfg(test)]
mod tests {
    use super::super::Packet;
    use super::super::test_util::*;
    use super::*;

    #[test]
    fn golden() {
        assert_golden(&BYTES, &Packet::PingReq);
    }

    #[test]
    fn invalid() {
        assert!(matches!(
            decode_one(&[BYTES[0], 0x01, 0x00]),
            Err(DecodeError::TrailingBytes)
        ));
        assert!(matches!(
            decode_one(&[BYTES[0] | 0x01, 0x00]),
            Err(DecodeError::InvalidFlags { .. })
        ));
    }
}

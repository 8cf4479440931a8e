//! UNSUBACK: the server's answer to UNSUBSCRIBE (MQTT 3.1.1 §3.11).

use bytes::{Bytes, BytesMut};

use super::{DecodeError, read_ack, write_ack};

/// First byte of every UNSUBACK.
const BYTE1: u8 = 0xb0;

/// Reads a UNSUBACK body: exactly a non-zero packet id.
pub(crate) fn read(body: Bytes) -> Result<u16, DecodeError> {
    read_ack(body)
}

/// Writes a whole UNSUBACK packet.
pub(crate) fn write(pkid: u16, buf: &mut BytesMut) -> usize {
    write_ack(buf, BYTE1, pkid)
}

#[cfg(test)]
mod tests {
    use super::super::Packet;
    use super::super::test_util::*;
    use super::*;

    #[test]
    fn golden() {
        assert_golden(&[BYTE1, 0x02, 0x00, 0x07], &Packet::UnsubAck(7));
        assert_golden(&[BYTE1, 0x02, 0xff, 0xff], &Packet::UnsubAck(65535));
    }

    #[test]
    fn invalid() {
        assert!(matches!(
            decode_one(&[BYTE1, 0x02, 0x00, 0x00]),
            Err(DecodeError::ZeroPacketId)
        ));
        assert!(matches!(
            decode_one(&[BYTE1, 0x03, 0x00, 0x01, 0x00]),
            Err(DecodeError::TrailingBytes)
        ));
        assert!(matches!(
            decode_one(&[BYTE1, 0x01, 0x01]),
            Err(DecodeError::Truncated)
        ));
        assert!(matches!(
            decode_one(&[BYTE1 ^ 0x01, 0x02, 0x00, 0x01]),
            Err(DecodeError::InvalidFlags { .. })
        ));
    }
}

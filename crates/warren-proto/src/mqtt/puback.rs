//! PUBACK: the acknowledgement of a QoS 1 PUBLISH (MQTT 3.1.1 §3.4).

use bytes::{Bytes, BytesMut};

use super::{DecodeError, read_ack, write_ack};

/// First byte of every PUBACK.
const BYTE1: u8 = 0x40;

/// Reads a PUBACK body: exactly a non-zero packet id.
pub(crate) fn read(body: Bytes) -> Result<u16, DecodeError> {
    read_ack(body)
}

/// Writes a whole PUBACK packet.
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
        assert_golden(&[BYTE1, 0x02, 0x00, 0x07], &Packet::PubAck(7));
        assert_golden(&[BYTE1, 0x02, 0xff, 0xff], &Packet::PubAck(65535));
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
            decode_one(&[BYTE1 ^ 0x02, 0x02, 0x00, 0x01]),
            Err(DecodeError::InvalidFlags { .. })
        ));
    }
}

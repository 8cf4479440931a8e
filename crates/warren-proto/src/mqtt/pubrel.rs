//! PUBREL: the release step of the QoS 2 handshake; its flags must be 0b0010 (MQTT 3.1.1 §3.6).

use bytes::{Bytes, BytesMut};

use super::{DecodeError, read_ack, write_ack};

/// First byte of every PUBREL.
const BYTE1: u8 = 0x62;

/// Reads a PUBREL body: exactly a non-zero packet id.
pub(crate) fn read(body: Bytes) -> Result<u16, DecodeError> {
    read_ack(body)
}

/// Writes a whole PUBREL packet.
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
        assert_golden(&[BYTE1, 0x02, 0x00, 0x07], &Packet::PubRel(7));
        assert_golden(&[BYTE1, 0x02, 0xff, 0xff], &Packet::PubRel(65535));
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

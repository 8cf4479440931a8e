//! PUBCOMP: the last step of the QoS 2 handshake (MQTT 3.1.1 §3.7).

use bytes::{Bytes, BytesMut};

use super::{DecodeError, read_ack, write_ack};

/// First byte of every PUBCOMP.
const BYTE1: u8 = 0x70;

/// Reads a PUBCOMP body: exactly a non-zero packet id.
pub(crate) fn read(body: Bytes) -> Result<u16, DecodeError> {
    read_ack(body)
}

/// Writes a whole PUBCOMP packet.
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
        assert_golden(&[BYTE1, 0x02, 0x00, 0x07], &Packet::PubComp(7));
        assert_golden(&[BYTE1, 0x02, 0xff, 0xff], &Packet::PubComp(65535));
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

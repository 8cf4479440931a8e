//! PINGRESP: the server's keepalive answer (MQTT 3.1.1 §3.13).

use bytes::{BufMut, Bytes, BytesMut};

use super::{DecodeError, expect_end};

/// The whole PINGRESP packet: the body is always empty.
const BYTES: [u8; 2] = [0xd0, 0x00];

/// Reads a PINGRESP body, which must be empty.
pub(crate) fn read(body: Bytes) -> Result<(), DecodeError> {
    expect_end(&body)
}

/// Writes a whole PINGRESP packet.
pub(crate) fn write(buf: &mut BytesMut) -> usize {
    buf.put_slice(&BYTES);
    BYTES.len()
}

/// The PINGRESP bytes the gate writes: `d0 00`, or `d2 00` with the mqant compatibility
/// setting `pingresp_d2`, which reproduces upstream's wrongly set QoS bit.
pub fn pingresp_bytes(d2_compat: bool) -> &'static [u8] {
    const D2: [u8; 2] = [0xd2, 0x00];
    if d2_compat { &D2 } else { &BYTES }
}

#[cfg(test)]
mod tests {
    use super::super::Packet;
    use super::super::test_util::*;
    use super::*;

    #[test]
    fn golden() {
        assert_golden(&[0xd0, 0x00], &Packet::PingResp);
        assert_eq!(pingresp_bytes(false), &[0xd0, 0x00]);
        assert_eq!(pingresp_bytes(true), &[0xd2, 0x00]);
    }

    #[test]
    fn invalid() {
        assert!(matches!(
            decode_one(&[0xd0, 0x01, 0x00]),
            Err(DecodeError::TrailingBytes)
        ));
        // The compat bytes are not valid 3.1.1.
        assert!(matches!(
            decode_one(&[0xd2, 0x00]),
            Err(DecodeError::InvalidFlags {
                packet_type: 13,
                flags: 2
            })
        ));
    }
}

//! DISCONNECT: the client's clean goodbye (MQTT 3.1.1 §3.14).

use bytes::{BufMut, Bytes, BytesMut};

use super::{DecodeError, expect_end};

/// The whole DISCONNECT packet: the body is always empty.
const BYTES: [u8; 2] = [0xe0, 0x00];

/// Reads a DISCONNECT body, which must be empty.
pub(crate) fn read(body: Bytes) -> Result<(), DecodeError> {
    expect_end(&body)
}

/// Writes a whole DISCONNECT packet.
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
        assert_golden(&BYTES, &Packet::Disconnect);
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

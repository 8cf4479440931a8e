//! SUBACK: the server's answer to SUBSCRIBE, one return code per filter (MQTT 3.1.1 §3.9).

use bytes::{BufMut, Bytes, BytesMut};

use super::{DecodeError, EncodeError, read_pkid, write_fixed_header};

/// The server's answer to a SUBSCRIBE.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SubAck {
    /// Packet identifier of the SUBSCRIBE.
    pub pkid: u16,
    /// Granted QoS (0, 1 or 2) or [`SubAck::FAILURE`], one per filter in request order.
    pub return_codes: Vec<u8>,
}

impl SubAck {
    /// Return code for a refused filter.
    pub const FAILURE: u8 = 0x80;
}

/// Reads a SUBACK body.
pub(crate) fn read(mut body: Bytes) -> Result<SubAck, DecodeError> {
    let pkid = read_pkid(&mut body)?;
    if let Some(&bad) = body
        .iter()
        .find(|&&c| !matches!(c, 0 | 1 | 2 | SubAck::FAILURE))
    {
        return Err(DecodeError::InvalidReturnCode(bad));
    }
    Ok(SubAck {
        pkid,
        return_codes: body.to_vec(),
    })
}

/// Writes a whole SUBACK packet; nothing is written on error.
pub(crate) fn write(s: &SubAck, buf: &mut BytesMut) -> Result<usize, EncodeError> {
    let total = write_fixed_header(buf, 0x90, 2 + s.return_codes.len())?;
    buf.put_u16(s.pkid);
    buf.put_slice(&s.return_codes);
    Ok(total)
}

#[cfg(test)]
mod tests {
    use super::super::Packet;
    use super::super::test_util::*;
    use super::*;

    #[test]
    fn golden() {
        assert_golden(
            &[0x90, 0x04, 0x00, 0x02, 0x01, 0x01],
            &Packet::SubAck(SubAck {
                pkid: 2,
                return_codes: vec![1, 1],
            }),
        );
        assert_golden(
            &[0x90, 0x05, 0x01, 0x00, 0x00, 0x02, 0x80],
            &Packet::SubAck(SubAck {
                pkid: 256,
                return_codes: vec![0, 2, SubAck::FAILURE],
            }),
        );
    }

    #[test]
    fn invalid() {
        assert!(matches!(
            decode_one(&[0x90, 0x03, 0x00, 0x02, 0x03]),
            Err(DecodeError::InvalidReturnCode(3))
        ));
        assert!(matches!(
            decode_one(&[0x90, 0x03, 0x00, 0x00, 0x00]),
            Err(DecodeError::ZeroPacketId)
        ));
        assert!(matches!(
            decode_one(&[0x92, 0x03, 0x00, 0x02, 0x00]),
            Err(DecodeError::InvalidFlags { .. })
        ));
    }
}

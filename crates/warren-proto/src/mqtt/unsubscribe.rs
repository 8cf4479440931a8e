//! UNSUBSCRIBE: a client drops topic filters (MQTT 3.1.1 §3.10).

use bytes::{BufMut, Bytes, BytesMut};

use super::{
    DecodeError, EncodeError, field_len, read_filter, read_pkid, write_binary, write_fixed_header,
};

/// A client's request to drop subscriptions.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Unsubscribe {
    /// Packet identifier, echoed by the UNSUBACK.
    pub pkid: u16,
    /// At least one valid topic filter when decoded.
    pub filters: Vec<String>,
}

/// Reads an UNSUBSCRIBE body.
pub(crate) fn read(mut body: Bytes) -> Result<Unsubscribe, DecodeError> {
    let pkid = read_pkid(&mut body)?;
    // Grows with what was actually parsed, never from a length field.
    let mut filters = Vec::new();
    while !body.is_empty() {
        filters.push(read_filter(&mut body)?);
    }
    if filters.is_empty() {
        return Err(DecodeError::NoFilters);
    }
    Ok(Unsubscribe { pkid, filters })
}

/// Writes a whole UNSUBSCRIBE packet; nothing is written on error.
pub(crate) fn write(u: &Unsubscribe, buf: &mut BytesMut) -> Result<usize, EncodeError> {
    let mut len = 2;
    for f in &u.filters {
        len += field_len(f.as_bytes())?;
    }
    let total = write_fixed_header(buf, 0xa2, len)?;
    buf.put_u16(u.pkid);
    for f in &u.filters {
        write_binary(buf, f.as_bytes());
    }
    Ok(total)
}

#[cfg(test)]
mod tests {
    use super::super::Packet;
    use super::super::test_util::*;
    use super::*;

    #[test]
    fn golden() {
        let bytes = [&[0xa2, 0x08, 0x00, 0x03, 0x00, 0x04][..], b"chat"].concat();
        assert_golden(
            &bytes,
            &Packet::Unsubscribe(Unsubscribe {
                pkid: 3,
                filters: vec!["chat".into()],
            }),
        );
        let bytes = [
            &[0xa2, 0x0a, 0x00, 0x03, 0x00, 0x01][..],
            b"#",
            &[0x00, 0x03],
            b"a/+",
        ]
        .concat();
        assert_golden(
            &bytes,
            &Packet::Unsubscribe(Unsubscribe {
                pkid: 3,
                filters: vec!["#".into(), "a/+".into()],
            }),
        );
    }

    #[test]
    fn invalid() {
        assert!(matches!(
            decode_one(&[0xa2, 0x02, 0x00, 0x03]),
            Err(DecodeError::NoFilters)
        ));
        assert!(matches!(
            decode_one(&[0xa2, 0x06, 0x00, 0x03, 0x00, 0x02, b'a', b'+']),
            Err(DecodeError::InvalidFilter)
        ));
        assert!(matches!(
            decode_one(&[0xa2, 0x05, 0x00, 0x03, 0x00, 0x02, b'a']),
            Err(DecodeError::Truncated)
        ));
        assert!(matches!(
            decode_one(&[0xa0, 0x05, 0x00, 0x03, 0x00, 0x01, b'a']),
            Err(DecodeError::InvalidFlags { .. })
        ));
    }
}

//! SUBSCRIBE: a client asks for messages on topic filters (MQTT 3.1.1 §3.8).

use bytes::{BufMut, Bytes, BytesMut};

use super::{
    DecodeError, EncodeError, QoS, field_len, read_filter, read_pkid, read_u8, write_binary,
    write_fixed_header,
};

/// One topic filter with the QoS the client asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SubscribeFilter {
    /// Topic filter, valid per [`super::topic::valid_filter`] when decoded.
    pub filter: String,
    /// Requested maximum QoS.
    pub qos: QoS,
}

/// A client's subscription request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Subscribe {
    /// Packet identifier, echoed by the SUBACK.
    pub pkid: u16,
    /// At least one filter when decoded.
    pub filters: Vec<SubscribeFilter>,
}

/// Reads a SUBSCRIBE body.
pub(crate) fn read(mut body: Bytes) -> Result<Subscribe, DecodeError> {
    let pkid = read_pkid(&mut body)?;
    // Grows with what was actually parsed, never from a length field.
    let mut filters = Vec::new();
    while !body.is_empty() {
        let filter = read_filter(&mut body)?;
        // The upper six bits are reserved, so any value above 2 is invalid.
        let requested = read_u8(&mut body)?;
        let qos = QoS::from_u8(requested).ok_or(DecodeError::InvalidQoS(requested))?;
        filters.push(SubscribeFilter { filter, qos });
    }
    if filters.is_empty() {
        return Err(DecodeError::NoFilters);
    }
    Ok(Subscribe { pkid, filters })
}

/// Writes a whole SUBSCRIBE packet; nothing is written on error.
pub(crate) fn write(s: &Subscribe, buf: &mut BytesMut) -> Result<usize, EncodeError> {
    let mut len = 2;
    for f in &s.filters {
        len += field_len(f.filter.as_bytes())? + 1;
    }
    let total = write_fixed_header(buf, 0x82, len)?;
    buf.put_u16(s.pkid);
    for f in &s.filters {
        write_binary(buf, f.filter.as_bytes());
        buf.put_u8(f.qos.as_u8());
    }
    Ok(total)
}

#[cfg(test)]
mod tests {
    use super::super::Packet;
    use super::super::test_util::*;
    use super::*;

    fn cat(parts: &[&[u8]]) -> Vec<u8> {
        parts.concat()
    }

    #[test]
    fn golden_two_filters() {
        let bytes = cat(&[
            &[0x82, 0x0f, 0x00, 0x02, 0x00, 0x04],
            b"chat",
            &[0x02, 0x00, 0x03],
            b"aaa",
            &[0x02],
        ]);
        let packet = Packet::Subscribe(Subscribe {
            pkid: 2,
            filters: vec![
                SubscribeFilter {
                    filter: "chat".into(),
                    qos: QoS::ExactlyOnce,
                },
                SubscribeFilter {
                    filter: "aaa".into(),
                    qos: QoS::ExactlyOnce,
                },
            ],
        });
        assert_golden(&bytes, &packet);
    }

    #[test]
    fn wildcard_filters() {
        let bytes = cat(&[&[0x82, 0x0b, 0x00, 0x01, 0x00, 0x06], b"a/+/#/", &[0x00]]);
        // "a/+/#/" puts # before the last level.
        assert!(matches!(
            decode_one(&bytes),
            Err(DecodeError::InvalidFilter)
        ));
        let bytes = cat(&[&[0x82, 0x0a, 0x00, 0x01, 0x00, 0x05], b"a/+/#", &[0x01]]);
        assert!(
            matches!(decode_one(&bytes), Ok(Packet::Subscribe(s)) if s.filters[0].filter == "a/+/#")
        );
    }

    #[test]
    fn invalid() {
        // No filters.
        assert!(matches!(
            decode_one(&[0x82, 0x02, 0x00, 0x01]),
            Err(DecodeError::NoFilters)
        ));
        // Zero packet id.
        assert!(matches!(
            decode_one(&[0x82, 0x06, 0x00, 0x00, 0x00, 0x01, b'a', 0x00]),
            Err(DecodeError::ZeroPacketId)
        ));
        // QoS 3 and reserved bits.
        for requested in [0x03, 0x41] {
            assert!(matches!(
                decode_one(&[0x82, 0x06, 0x00, 0x01, 0x00, 0x01, b'a', requested]),
                Err(DecodeError::InvalidQoS(q)) if q == requested
            ));
        }
        // Filter without its QoS byte.
        assert!(matches!(
            decode_one(&[0x82, 0x05, 0x00, 0x01, 0x00, 0x01, b'a']),
            Err(DecodeError::Truncated)
        ));
        // Empty filter.
        assert!(matches!(
            decode_one(&[0x82, 0x05, 0x00, 0x01, 0x00, 0x00, 0x00]),
            Err(DecodeError::InvalidFilter)
        ));
        // Flags must be 0b0010.
        assert!(matches!(
            decode_one(&[0x80, 0x06, 0x00, 0x01, 0x00, 0x01, b'a', 0x00]),
            Err(DecodeError::InvalidFlags {
                packet_type: 8,
                flags: 0
            })
        ));
    }
}

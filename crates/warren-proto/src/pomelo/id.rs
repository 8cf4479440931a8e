//! The message id varint (docs/protocols/pomelo.md, "Packages and messages").
//!
//! Request and response ids are unsigned little-endian base-128 varints: the low seven bits
//! come first and `0x80` means another byte follows. pomelo ids are 32-bit, so at most five
//! bytes are read, and the fifth may only carry the top four bits.

use bytes::{BufMut, BytesMut};

use super::PomeloError;

/// Longest id varint: five bytes carry 35 bits, enough for a `u32`.
pub const MAX_ID_LEN: usize = 5;

/// Number of bytes [`encode_id`] writes for `id`.
pub fn id_len(id: u32) -> usize {
    match id {
        0..=0x7f => 1,
        0x80..=0x3fff => 2,
        0x4000..=0x1f_ffff => 3,
        0x20_0000..=0x0fff_ffff => 4,
        _ => 5,
    }
}

/// Appends `id` as a little-endian base-128 varint (1 → `01`, 300 → `ac 02`).
pub fn encode_id(id: u32, buf: &mut BytesMut) {
    buf.reserve(id_len(id));
    let mut rest = id;
    loop {
        // The low seven bits always fit in a byte.
        let low = (rest & 0x7f) as u8;
        rest >>= 7;
        if rest == 0 {
            buf.put_u8(low);
            return;
        }
        buf.put_u8(low | 0x80);
    }
}

/// Reads an id varint from the front of `buf` and returns it with the number of bytes it took.
///
/// Fails with [`PomeloError::Truncated`] when `buf` ends while a continuation bit is set, and
/// with [`PomeloError::IdTooLong`] as soon as a fifth byte asks for a sixth or carries bits
/// beyond 32. Non-minimal encodings (`80 00` for 0) are accepted, as upstream does.
pub fn decode_id(buf: &[u8]) -> Result<(u32, usize), PomeloError> {
    let mut id = 0u32;
    for i in 0..MAX_ID_LEN {
        let Some(&byte) = buf.get(i) else {
            return Err(PomeloError::Truncated);
        };
        let bits = u32::from(byte & 0x7f);
        if i == MAX_ID_LEN - 1 && (byte & 0x80 != 0 || bits > 0x0f) {
            return Err(PomeloError::IdTooLong);
        }
        id |= bits << (7 * i);
        if byte & 0x80 == 0 {
            return Ok((id, i + 1));
        }
    }
    // Unreachable in practice: the fifth byte either ends the varint or fails above.
    Err(PomeloError::IdTooLong)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn encoded(id: u32) -> Vec<u8> {
        let mut buf = BytesMut::new();
        encode_id(id, &mut buf);
        buf.to_vec()
    }

    #[test]
    fn golden_varints() {
        let vectors: [(u32, &[u8]); 8] = [
            (0, &[0x00]),
            (1, &[0x01]),
            (127, &[0x7f]),
            (128, &[0x80, 0x01]),
            (300, &[0xac, 0x02]),
            (16384, &[0x80, 0x80, 0x01]),
            (0x7fff_ffff, &[0xff, 0xff, 0xff, 0xff, 0x07]),
            (u32::MAX, &[0xff, 0xff, 0xff, 0xff, 0x0f]),
        ];
        for (id, bytes) in vectors {
            assert_eq!(encoded(id), bytes, "{id}");
            assert_eq!(id_len(id), bytes.len(), "{id}");
            assert_eq!(decode_id(bytes).unwrap(), (id, bytes.len()), "{id}");
            // Trailing bytes are not part of the id.
            let mut longer = bytes.to_vec();
            longer.extend_from_slice(b"{}");
            assert_eq!(decode_id(&longer).unwrap(), (id, bytes.len()), "{id}");
        }
    }

    #[test]
    fn length_boundaries() {
        for (id, len) in [
            (0x7f, 1),
            (0x80, 2),
            (0x3fff, 2),
            (0x4000, 3),
            (0x1f_ffff, 3),
            (0x20_0000, 4),
            (0x0fff_ffff, 4),
            (0x1000_0000, 5),
        ] {
            assert_eq!(encoded(id).len(), len, "{id:#x}");
            assert_eq!(id_len(id), len, "{id:#x}");
        }
    }

    #[test]
    fn truncated_and_overlong() {
        assert!(matches!(decode_id(&[]), Err(PomeloError::Truncated)));
        assert!(matches!(decode_id(&[0x80]), Err(PomeloError::Truncated)));
        assert!(matches!(
            decode_id(&[0xff, 0xff, 0xff, 0xff]),
            Err(PomeloError::Truncated)
        ));
        // A sixth byte is announced: rejected at the fifth, whether or not it is there.
        assert!(matches!(
            decode_id(&[0x80, 0x80, 0x80, 0x80, 0x80]),
            Err(PomeloError::IdTooLong)
        ));
        assert!(matches!(
            decode_id(&[0x80, 0x80, 0x80, 0x80, 0x80, 0x01]),
            Err(PomeloError::IdTooLong)
        ));
        // Five bytes whose value exceeds u32.
        assert!(matches!(
            decode_id(&[0xff, 0xff, 0xff, 0xff, 0x10]),
            Err(PomeloError::IdTooLong)
        ));
        // Non-minimal but in range.
        assert_eq!(decode_id(&[0x80, 0x00]).unwrap(), (0, 2));
    }
}

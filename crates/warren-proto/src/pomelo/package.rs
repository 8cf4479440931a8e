//! The package layer (docs/protocols/pomelo.md, "Packages and messages"):
//! `type (1 B) · length (3 B, big-endian) · body`.
//!
//! Packages are what the socket carries: several may share one read and one may span reads.
//! The decoder rejects a bad type byte as soon as it arrives and an oversize body as soon as the
//! four-byte header is complete, before the body is awaited or allocated.

use bytes::{Buf, BufMut, Bytes, BytesMut};

use super::PomeloError;

/// Bytes of the package header: the type byte and the three-byte length.
pub const HEADER_LEN: usize = 4;

/// Largest body the three-byte length field can express (16 MiB − 1).
pub const MAX_PACKAGE_BODY: usize = 0x00ff_ffff;

/// What a package carries; the first byte on the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum PackageType {
    /// Handshake JSON, client → server and server → client.
    Handshake = 1,
    /// Client acknowledges the server's handshake; empty body.
    HandshakeAck = 2,
    /// Keepalive in both directions; empty body.
    Heartbeat = 3,
    /// One message: `flag · [id] · [route] · body`.
    Data = 4,
    /// Server tells the client why it is being disconnected: `{"reason":"…"}`.
    Kick = 5,
}

impl PackageType {
    /// Parses the wire value; `None` for anything but 1 to 5.
    pub fn from_u8(v: u8) -> Option<PackageType> {
        match v {
            1 => Some(PackageType::Handshake),
            2 => Some(PackageType::HandshakeAck),
            3 => Some(PackageType::Heartbeat),
            4 => Some(PackageType::Data),
            5 => Some(PackageType::Kick),
            _ => None,
        }
    }

    /// The wire value.
    pub fn as_u8(self) -> u8 {
        self as u8
    }

    /// A short stable name for logs and metrics (for example `"heartbeat"`).
    pub fn name(self) -> &'static str {
        match self {
            PackageType::Handshake => "handshake",
            PackageType::HandshakeAck => "handshake_ack",
            PackageType::Heartbeat => "heartbeat",
            PackageType::Data => "data",
            PackageType::Kick => "kick",
        }
    }
}

impl TryFrom<u8> for PackageType {
    type Error = PomeloError;

    fn try_from(v: u8) -> Result<Self, Self::Error> {
        PackageType::from_u8(v).ok_or(PomeloError::InvalidPackageType(v))
    }
}

/// One package off the wire: its type and its body, a zero-copy slice of the read buffer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Package {
    /// What the body holds.
    pub kind: PackageType,
    /// The body bytes (JSON for handshake and kick, a message for data, empty otherwise).
    pub body: Bytes,
}

impl Package {
    /// A package of `kind` with `body`.
    pub fn new(kind: PackageType, body: impl Into<Bytes>) -> Self {
        Self {
            kind,
            body: body.into(),
        }
    }
}

/// Parses the header at the front of `buf` without consuming anything: the package type and
/// the announced body length, checked against `max_package`. `Ok(None)` until all four header
/// bytes are there (a bad type byte fails at once).
pub(crate) fn parse_header(
    buf: &[u8],
    max_package: usize,
) -> Result<Option<(PackageType, usize)>, PomeloError> {
    let Some(&type_byte) = buf.first() else {
        return Ok(None);
    };
    let kind = PackageType::try_from(type_byte)?;
    let Some(&[_, b1, b2, b3]) = buf.get(..HEADER_LEN) else {
        return Ok(None);
    };
    let size = (usize::from(b1) << 16) | (usize::from(b2) << 8) | usize::from(b3);
    if size > max_package {
        return Err(PomeloError::PackageTooLarge {
            size,
            max: max_package,
        });
    }
    Ok(Some((kind, size)))
}

/// Decodes one package from the front of `buf`.
///
/// Returns `Ok(None)` when more bytes are needed, leaving `buf` untouched; on `Ok(Some)` exactly
/// that package's bytes are consumed. A body longer than `max_package` fails with
/// [`PomeloError::PackageTooLarge`] as soon as the four-byte header is there, and a type byte
/// other than 1 to 5 fails with [`PomeloError::InvalidPackageType`] as soon as it arrives. After
/// an error the connection must be closed.
pub fn decode_package(
    buf: &mut BytesMut,
    max_package: usize,
) -> Result<Option<Package>, PomeloError> {
    let Some((kind, size)) = parse_header(buf, max_package)? else {
        return Ok(None);
    };
    if buf.len() < HEADER_LEN + size {
        return Ok(None);
    }
    buf.advance(HEADER_LEN);
    let body = buf.split_to(size).freeze();
    Ok(Some(Package { kind, body }))
}

/// Appends a package of `kind` with `body` to `buf`.
///
/// Fails, writing nothing, when `body` is longer than [`MAX_PACKAGE_BODY`].
pub fn try_encode_package(
    kind: PackageType,
    body: &[u8],
    buf: &mut BytesMut,
) -> Result<(), PomeloError> {
    write_header(kind, body.len(), buf)?;
    buf.put_slice(body);
    Ok(())
}

/// Appends a package of `kind` with `body` to `buf`.
///
/// `body` must be at most [`MAX_PACKAGE_BODY`] bytes: a longer one is a bug in the caller
/// (debug builds panic) and is not written at all; use [`try_encode_package`] to learn about it.
pub fn encode_package(kind: PackageType, body: &[u8], buf: &mut BytesMut) {
    let result = try_encode_package(kind, body, buf);
    debug_assert!(result.is_ok(), "pomelo package body too large: {result:?}");
}

/// Checks `size`, reserves room for the whole package and writes its header.
pub(crate) fn write_header(
    kind: PackageType,
    size: usize,
    buf: &mut BytesMut,
) -> Result<(), PomeloError> {
    let len = u32::try_from(size)
        .ok()
        .filter(|&len| len as usize <= MAX_PACKAGE_BODY)
        .ok_or(PomeloError::PackageTooLarge {
            size,
            max: MAX_PACKAGE_BODY,
        })?;
    buf.reserve(HEADER_LEN + size);
    // Type byte, then the low three bytes of the length, big-endian.
    buf.put_u32((u32::from(kind.as_u8()) << 24) | len);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const MAX: usize = 1 << 20;

    fn encoded(kind: PackageType, body: &[u8]) -> Vec<u8> {
        let mut buf = BytesMut::new();
        encode_package(kind, body, &mut buf);
        buf.to_vec()
    }

    #[test]
    fn empty_packages() {
        for (kind, byte) in [
            (PackageType::HandshakeAck, 2u8),
            (PackageType::Heartbeat, 3),
        ] {
            let bytes = [byte, 0, 0, 0];
            assert_eq!(encoded(kind, b""), bytes);
            let mut buf = BytesMut::from(&bytes[..]);
            assert_eq!(
                decode_package(&mut buf, 0).unwrap(),
                Some(Package::new(kind, Bytes::new()))
            );
            assert!(buf.is_empty());
        }
    }

    #[test]
    fn kick_package() {
        let body = br#"{"reason":"kick"}"#;
        let mut bytes = vec![0x05, 0x00, 0x00, 0x11];
        bytes.extend_from_slice(body);
        assert_eq!(encoded(PackageType::Kick, body), bytes);
        let mut buf = BytesMut::from(&bytes[..]);
        let package = decode_package(&mut buf, MAX).unwrap().unwrap();
        assert_eq!(package, Package::new(PackageType::Kick, &body[..]));
    }

    #[test]
    fn prefixes_need_more_and_consume_nothing() {
        let bytes = encoded(PackageType::Data, b"\x06\x06onChat{}");
        for n in 0..bytes.len() {
            let mut buf = BytesMut::from(&bytes[..n]);
            assert!(matches!(decode_package(&mut buf, MAX), Ok(None)), "{n}");
            assert_eq!(buf.len(), n);
        }
    }

    #[test]
    fn length_uses_all_three_bytes() {
        let body = vec![7u8; 0x01_0203];
        let bytes = encoded(PackageType::Handshake, &body);
        assert_eq!(&bytes[..4], &[0x01, 0x01, 0x02, 0x03]);
        let mut buf = BytesMut::from(&bytes[..]);
        let package = decode_package(&mut buf, 0x01_0203).unwrap().unwrap();
        assert_eq!(package.body.len(), 0x01_0203);
    }

    #[test]
    fn oversize_is_rejected_from_the_header() {
        let mut buf = BytesMut::from(&[0x04, 0x01, 0x00, 0x01][..]);
        let e = decode_package(&mut buf, 64 * 1024).unwrap_err();
        assert!(matches!(
            e,
            PomeloError::PackageTooLarge {
                size: 65537,
                max: 65536
            }
        ));
        // Exactly the limit only waits for the body.
        let mut buf = BytesMut::from(&[0x04, 0x01, 0x00, 0x00][..]);
        assert!(matches!(decode_package(&mut buf, 64 * 1024), Ok(None)));
        // The largest length field against the largest limit is fine too.
        let mut buf = BytesMut::from(&[0x01, 0xff, 0xff, 0xff][..]);
        assert!(matches!(decode_package(&mut buf, usize::MAX), Ok(None)));
    }

    #[test]
    fn bad_type_bytes_fail_at_once() {
        for byte in [0u8, 6, 7, 0x41, 0x47, 0xff] {
            let mut buf = BytesMut::from(&[byte][..]);
            assert!(
                matches!(
                    decode_package(&mut buf, MAX),
                    Err(PomeloError::InvalidPackageType(b)) if b == byte
                ),
                "{byte}"
            );
        }
        assert_eq!(PackageType::from_u8(4), Some(PackageType::Data));
        assert_eq!(PackageType::Kick.as_u8(), 5);
        assert_eq!(PackageType::HandshakeAck.name(), "handshake_ack");
    }

    #[test]
    fn unencodable_body_writes_nothing() {
        let body = vec![0u8; MAX_PACKAGE_BODY + 1];
        let mut buf = BytesMut::new();
        assert!(matches!(
            try_encode_package(PackageType::Data, &body, &mut buf),
            Err(PomeloError::PackageTooLarge {
                size,
                max: MAX_PACKAGE_BODY
            }) if size == MAX_PACKAGE_BODY + 1
        ));
        assert!(buf.is_empty());
    }
}

//! pomelo client protocol codec (docs/protocols/pomelo.md; pomelo-protocol 0.1.6).
//!
//! This module owns the two layers pomelo clients speak: the package layer
//! (`type · 3-byte length · body`, [`decode_package`]) that frames the byte stream, and the message layer (`flag · [id] · [route] · body`, [`decode_message`]) inside
//! data packages, with its id varint ([`encode_id`], [`decode_id`]) and the gzip body flag
//! ([`inflate`]). [`PomeloCodec`] plugs the package layer into `tokio_util` framing; the gate
//! owns everything above (handshake state machine, heartbeats, route dictionary, JSON).
//!
//! The decoders are written for hostile input: a bad package type fails on its first byte, the
//! size limit is checked as soon as the four-byte header is there, nothing is allocated from an
//! unchecked length, gzip bodies inflate under a hard limit, and no input makes them panic (see
//! the `pomelo_decode` fuzz target in `fuzz/`). Package and message bodies are zero-copy slices
//! of the read buffer.

mod error;
mod id;
mod inflate;
mod message;
mod package;

use bytes::BytesMut;

pub use error::PomeloError;
pub use id::{MAX_ID_LEN, decode_id, encode_id};
pub use inflate::inflate;
pub use message::{
    MAX_ROUTE_LEN, Message, MessageRoute, MessageType, decode_message, encode_data, encode_message,
    try_encode_data, try_encode_message,
};
pub use package::{
    HEADER_LEN, MAX_PACKAGE_BODY, Package, PackageType, decode_package, encode_package,
    try_encode_package,
};

/// Default `max_package` of a pomelo listener: 64 KiB of package body.
pub const DEFAULT_MAX_PACKAGE: usize = 64 * 1024;

/// How much [`PomeloCodec`] reserves ahead for a body it is still waiting for. A small header
/// must not make the server commit a whole `max_package` of memory per connection.
const MAX_PRE_RESERVE: usize = 64 * 1024;

/// `tokio_util` framing for pomelo packages with an inbound size limit.
///
/// Decoding rejects package bodies longer than `max_package`; encoding has no limit beyond
/// what the three-byte length can express ([`MAX_PACKAGE_BODY`]).
#[derive(Debug, Clone)]
pub struct PomeloCodec {
    max_package: usize,
}

impl PomeloCodec {
    /// A codec that rejects inbound package bodies longer than `max_package` bytes.
    pub fn new(max_package: usize) -> Self {
        Self { max_package }
    }

    /// The inbound package body limit.
    pub fn max_package(&self) -> usize {
        self.max_package
    }
}

impl Default for PomeloCodec {
    /// A codec with [`DEFAULT_MAX_PACKAGE`].
    fn default() -> Self {
        Self::new(DEFAULT_MAX_PACKAGE)
    }
}

impl tokio_util::codec::Decoder for PomeloCodec {
    type Item = Package;
    type Error = PomeloError;

    fn decode(&mut self, src: &mut BytesMut) -> Result<Option<Package>, PomeloError> {
        let package = decode_package(src, self.max_package)?;
        if package.is_none() {
            // The header may already say how much is coming (and has passed the size check).
            if let Some((_, size)) = package::parse_header(src, self.max_package)? {
                let wanted = (HEADER_LEN + size).min(MAX_PRE_RESERVE);
                src.reserve(wanted.saturating_sub(src.len()));
            }
        }
        Ok(package)
    }
}

impl tokio_util::codec::Encoder<Package> for PomeloCodec {
    type Error = PomeloError;

    fn encode(&mut self, item: Package, dst: &mut BytesMut) -> Result<(), PomeloError> {
        try_encode_package(item.kind, &item.body, dst)
    }
}

impl tokio_util::codec::Encoder<&Package> for PomeloCodec {
    type Error = PomeloError;

    fn encode(&mut self, item: &Package, dst: &mut BytesMut) -> Result<(), PomeloError> {
        try_encode_package(item.kind, &item.body, dst)
    }
}

#[cfg(test)]
mod tests {
    use bytes::Bytes;
    use tokio_util::codec::{Decoder, Encoder};

    use super::*;

    #[test]
    fn codec_frames_and_reserves_within_limits() {
        let mut codec = PomeloCodec::default();
        assert_eq!(codec.max_package(), DEFAULT_MAX_PACKAGE);
        let mut out = BytesMut::new();
        let kick = Package::new(PackageType::Kick, &br#"{"reason":"kick"}"#[..]);
        codec.encode(kick.clone(), &mut out).unwrap();
        let heartbeat = Package::new(PackageType::Heartbeat, Bytes::new());
        Encoder::<&Package>::encode(&mut codec, &heartbeat, &mut out).unwrap();
        out.extend_from_slice(&[0x04, 0x00]);
        assert_eq!(codec.decode(&mut out).unwrap(), Some(kick));
        assert_eq!(codec.decode(&mut out).unwrap(), Some(heartbeat));
        assert_eq!(codec.decode(&mut out).unwrap(), None);
        assert_eq!(&out[..], &[0x04, 0x00]);

        // A header announcing 500 000 bytes reserves at most the pre-reserve cap.
        let mut codec = PomeloCodec::new(1 << 20);
        let mut buf = BytesMut::from(&[0x04, 0x07, 0xa1, 0x20][..]);
        assert!(codec.decode(&mut buf).unwrap().is_none());
        assert!(buf.capacity() >= MAX_PRE_RESERVE);
        assert!(buf.capacity() < 500_000);

        let mut small = PomeloCodec::new(16);
        let mut buf = BytesMut::from(&[0x01, 0x00, 0x00, 0x11][..]);
        assert!(matches!(
            small.decode(&mut buf),
            Err(PomeloError::PackageTooLarge { size: 17, max: 16 })
        ));
        let mut buf = BytesMut::new();
        let huge = Package::new(PackageType::Data, vec![0u8; MAX_PACKAGE_BODY + 1]);
        assert!(matches!(
            small.encode(huge, &mut buf),
            Err(PomeloError::PackageTooLarge { .. })
        ));
        assert!(buf.is_empty());
    }
}

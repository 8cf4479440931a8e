//! Inflating gzip message bodies (flag bit 4, docs/protocols/pomelo.md, "Packages and
//! messages") under a hard size limit.
//!
//! A few kilobytes of gzip can inflate to gigabytes, so the output is produced in small chunks
//! and inflating stops with [`PomeloError::InflateTooLarge`] as soon as it would pass the limit;
//! the output buffer never grows beyond the limit. pomelo clients compress with gzip framing;
//! a body without the gzip magic bytes is read as a zlib stream, which some clients send.

use std::io::{ErrorKind, Read};

use bytes::Bytes;
use flate2::read::{GzDecoder, ZlibDecoder};

use super::PomeloError;

/// The two bytes every gzip member starts with (RFC 1952 §2.3.1).
const GZIP_MAGIC: [u8; 2] = [0x1f, 0x8b];

/// How much output is pulled from the decompressor at a time.
const CHUNK: usize = 8 * 1024;

/// Inflates a gzip (or zlib) `body` without ever producing more than `limit` bytes.
///
/// Fails with [`PomeloError::InflateTooLarge`] when the inflated body would be longer than
/// `limit`, and with [`PomeloError::InflateFailed`] when `body` is not a complete, valid stream
/// (checksums included).
pub fn inflate(body: &[u8], limit: usize) -> Result<Bytes, PomeloError> {
    if body.is_empty() {
        return Err(PomeloError::InflateFailed("empty body".into()));
    }
    if body.starts_with(&GZIP_MAGIC) {
        read_limited(GzDecoder::new(body), limit)
    } else {
        read_limited(ZlibDecoder::new(body), limit)
    }
}

/// Reads `reader` to the end into a buffer that never grows past `limit` bytes.
fn read_limited(mut reader: impl Read, limit: usize) -> Result<Bytes, PomeloError> {
    let mut out = Vec::new();
    let mut chunk = [0u8; CHUNK];
    loop {
        let n = match reader.read(&mut chunk) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == ErrorKind::Interrupted => continue,
            Err(e) => return Err(PomeloError::InflateFailed(e.to_string())),
        };
        let len = out.len().saturating_add(n);
        if len > limit {
            return Err(PomeloError::InflateTooLarge { limit });
        }
        if len > out.capacity() {
            // Grow geometrically, but never past the limit.
            let target = out.capacity().saturating_mul(2).max(len).min(limit);
            out.reserve_exact(target - out.len());
        }
        out.extend_from_slice(chunk.get(..n).unwrap_or(&chunk));
    }
    Ok(Bytes::from(out))
}

#[cfg(test)]
mod tests {
    use std::io::Write;

    use flate2::Compression;
    use flate2::write::{GzEncoder, ZlibEncoder};

    use super::*;

    fn gzip(data: &[u8]) -> Vec<u8> {
        let mut e = GzEncoder::new(Vec::new(), Compression::default());
        e.write_all(data).unwrap();
        e.finish().unwrap()
    }

    /// Counts how many compressed bytes the decoder pulled.
    struct Counting<'a> {
        inner: &'a [u8],
        pulled: usize,
    }

    impl Read for Counting<'_> {
        fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
            // Small reads, so that the decoder cannot take all its input at once.
            let len = buf.len().min(256);
            let n = self.inner.read(&mut buf[..len])?;
            self.pulled += n;
            Ok(n)
        }
    }

    #[test]
    fn round_trip() {
        let body = br#"{"msg":"hello","n":[1,2,3]}"#.repeat(100);
        let packed = gzip(&body);
        assert!(packed.len() < body.len());
        assert_eq!(&inflate(&packed, body.len()).unwrap()[..], &body[..]);
        assert!(matches!(
            inflate(&packed, body.len() - 1),
            Err(PomeloError::InflateTooLarge { .. })
        ));
        assert_eq!(&inflate(&gzip(b""), 0).unwrap()[..], b"");
    }

    #[test]
    fn zlib_is_accepted() {
        let mut e = ZlibEncoder::new(Vec::new(), Compression::default());
        e.write_all(b"{}").unwrap();
        let packed = e.finish().unwrap();
        assert_eq!(&inflate(&packed, 2).unwrap()[..], b"{}");
    }

    #[test]
    fn invalid_streams_fail() {
        for bad in [&b""[..], b"{}", b"\x1f\x8b", b"\x1f\x8b\x08\x00garbage"] {
            assert!(
                matches!(inflate(bad, 1024), Err(PomeloError::InflateFailed(_))),
                "{bad:?}"
            );
        }
        // A truncated member and a corrupted checksum.
        let packed = gzip(b"hello hello hello");
        assert!(matches!(
            inflate(&packed[..packed.len() - 4], 1024),
            Err(PomeloError::InflateFailed(_))
        ));
        let mut corrupt = packed.clone();
        let crc = corrupt.len() - 8;
        corrupt[crc] ^= 0xff;
        assert!(matches!(
            inflate(&corrupt, 1024),
            Err(PomeloError::InflateFailed(_))
        ));
    }

    #[test]
    fn bomb_stops_early() {
        let zeros = vec![0u8; 10 * 1024 * 1024];
        let bomb = gzip(&zeros);
        let mut input = Counting {
            inner: &bomb,
            pulled: 0,
        };
        let result = read_limited(GzDecoder::new(&mut input), 64 * 1024);
        assert!(matches!(
            result,
            Err(PomeloError::InflateTooLarge { limit: 65536 })
        ));
        // Only a small part of the ~10 KB of compressed input was needed to see it.
        assert!(
            input.pulled < bomb.len() / 2,
            "{} of {}",
            input.pulled,
            bomb.len()
        );
    }
}

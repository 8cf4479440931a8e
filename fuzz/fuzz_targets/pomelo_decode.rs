//! Fuzz target for the pomelo codec: arbitrary bytes must never make the package decoder, the
//! message decoder, the id varint reader or the gzip inflater panic; whatever decodes must
//! survive a re-encode; and feeding the bytes in chunks through `PomeloCodec` must give the
//! same packages as decoding them from one buffer.

#![no_main]
#![forbid(unsafe_code)]

use bytes::{Bytes, BytesMut};
use libfuzzer_sys::fuzz_target;
use tokio_util::codec::Decoder;
use warren_proto::pomelo::{
    Package, PackageType, PomeloCodec, decode_id, decode_message, decode_package, encode_id,
    encode_package, inflate,
};

/// Limit for inflated bodies: small, so that bombs are cut short quickly.
const INFLATE_LIMIT: usize = 4096;

/// Decodes packages from the front of `data` until the decoder needs more bytes or fails.
/// Returns the packages and whether it stopped on an error.
fn decode_all(data: &[u8], max_package: usize) -> (Vec<Package>, bool) {
    let mut buf = BytesMut::from(data);
    let mut packages = Vec::new();
    loop {
        let before = buf.len();
        match decode_package(&mut buf, max_package) {
            Ok(Some(package)) => {
                assert!(buf.len() < before, "a package must consume bytes");
                assert!(package.body.len() <= max_package);
                packages.push(package);
            }
            Ok(None) => {
                assert_eq!(buf.len(), before, "need-more must consume nothing");
                return (packages, false);
            }
            Err(e) => {
                assert!(!e.kind().is_empty());
                return (packages, true);
            }
        }
    }
}

/// Feeds `data` to a codec in chunks of `chunk` bytes, with the same stopping rule.
fn decode_chunked(data: &[u8], max_package: usize, chunk: usize) -> (Vec<Package>, bool) {
    let mut codec = PomeloCodec::new(max_package);
    let mut buf = BytesMut::new();
    let mut packages = Vec::new();
    for piece in data.chunks(chunk) {
        buf.extend_from_slice(piece);
        loop {
            match codec.decode(&mut buf) {
                Ok(Some(package)) => packages.push(package),
                Ok(None) => break,
                Err(_) => return (packages, true),
            }
        }
    }
    (packages, false)
}

/// Decodes `body` as a message; if it decodes, re-encodes it and checks it decodes the same,
/// and inflates a gzip body under a small limit.
fn check_message(body: Bytes) {
    let Ok(message) = decode_message(body) else {
        return;
    };
    let mut again = BytesMut::new();
    message
        .try_encode(&mut again)
        .expect("a decoded message re-encodes");
    let redecoded = decode_message(again.freeze()).expect("a re-encoded message decodes");
    assert_eq!(redecoded, message);
    if message.gzip
        && let Ok(inflated) = inflate(&message.body, INFLATE_LIMIT)
    {
        assert!(inflated.len() <= INFLATE_LIMIT);
    }
}

fuzz_target!(|data: &[u8]| {
    let chunk = usize::from(data.first().copied().unwrap_or(0) % 17) + 1;
    for max_package in [16, 1 << 20] {
        let (packages, failed) = decode_all(data, max_package);
        for package in &packages {
            let mut again = BytesMut::new();
            encode_package(package.kind, &package.body, &mut again);
            let redecoded =
                decode_package(&mut again, max_package).expect("re-encoded package decodes");
            assert_eq!(redecoded.as_ref(), Some(package));
            assert!(again.is_empty());
            if package.kind == PackageType::Data {
                check_message(package.body.clone());
            }
        }
        assert_eq!(decode_chunked(data, max_package, chunk), (packages, failed));
    }

    // The message layer, the id varint and the inflater on the raw input too.
    check_message(Bytes::copy_from_slice(data));
    if let Ok((id, used)) = decode_id(data) {
        assert!((1..=5).contains(&used));
        let mut again = BytesMut::new();
        encode_id(id, &mut again);
        assert!(again.len() <= used);
        assert_eq!(
            decode_id(&again).expect("re-encoded id decodes"),
            (id, again.len())
        );
    }
    if let Ok(inflated) = inflate(data, INFLATE_LIMIT) {
        assert!(inflated.len() <= INFLATE_LIMIT);
    }
});

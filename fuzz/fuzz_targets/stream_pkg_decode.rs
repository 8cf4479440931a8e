//! Fuzz target for stream-pkg framing: arbitrary bytes must never make `decode` panic,
//! need-more must consume nothing, every package must respect the limit and re-encode to the
//! bytes it came from (when its length was written minimally), and chunked decoding through
//! `StreamPkgCodec` must agree with whole-buffer decoding.

#![no_main]
#![forbid(unsafe_code)]

use bytes::{Bytes, BytesMut};
use libfuzzer_sys::fuzz_target;
use tokio_util::codec::Decoder;
use warren_proto::stream_pkg::{StreamPkgCodec, decode, encode};

fn decode_all(data: &[u8], max: usize) -> (Vec<Bytes>, bool) {
    let mut buf = BytesMut::from(data);
    let mut bodies = Vec::new();
    loop {
        let before = buf.clone();
        match decode(&mut buf, max) {
            Ok(Some(body)) => {
                assert!(!body.is_empty() && body.len() <= max);
                let consumed = &before[..before.len() - buf.len()];
                let mut again = BytesMut::new();
                encode(&body, &mut again);
                // Non-minimal prefixes (leading 0x80 bytes) are accepted but not produced.
                if consumed[0] != 0x80 {
                    assert_eq!(&again[..], consumed);
                }
                bodies.push(body);
            }
            Ok(None) => {
                assert_eq!(buf, before, "need-more must consume nothing");
                return (bodies, false);
            }
            Err(e) => {
                assert!(!e.kind().is_empty());
                return (bodies, true);
            }
        }
    }
}

fn decode_chunked(data: &[u8], max: usize, chunk: usize) -> (Vec<Bytes>, bool) {
    let mut codec = StreamPkgCodec::new(max);
    let mut buf = BytesMut::new();
    let mut bodies = Vec::new();
    for piece in data.chunks(chunk) {
        buf.extend_from_slice(piece);
        loop {
            match codec.decode(&mut buf) {
                Ok(Some(body)) => bodies.push(body),
                Ok(None) => break,
                Err(_) => return (bodies, true),
            }
        }
    }
    (bodies, false)
}

fuzz_target!(|data: &[u8]| {
    let chunk = usize::from(data.first().copied().unwrap_or(0) % 17) + 1;
    for max in [16, 1 << 20] {
        let whole = decode_all(data, max);
        assert_eq!(decode_chunked(data, max, chunk), whole);
    }
});

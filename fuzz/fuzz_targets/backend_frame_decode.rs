//! Fuzz target for the gobase test codec a node speaks to its TCP backend services: arbitrary
//! bytes must never make `backend_frame::decode` panic, the body cap must hold, and decoding a
//! stream frame by frame must agree with decoding it in arbitrary chunks.

#![no_main]
#![forbid(unsafe_code)]

use bytes::BytesMut;
use libfuzzer_sys::fuzz_target;
use warren_proto::backend_frame::{decode, encode};

/// Decode every whole frame of `buf`, as a backend connection does: stop at "need more", at an
/// error, or at the end.
fn frames(buf: &[u8], max: usize) -> (Vec<(u32, Vec<u8>)>, usize, bool) {
    let mut out = Vec::new();
    let mut at = 0;
    loop {
        match decode(&buf[at..], max) {
            Ok(Some((m, n))) => {
                assert!(
                    n >= 8 && n <= buf.len() - at,
                    "consumed {n} of {}",
                    buf.len() - at
                );
                assert!(m.body.len() <= max);
                // a decoded frame encodes back to the bytes it came from
                let mut again = BytesMut::new();
                encode(&m, max, &mut again).expect("a decoded body fits its own cap");
                assert_eq!(&again[..], &buf[at..at + n]);
                out.push((m.msgid, m.body.to_vec()));
                at += n;
            }
            Ok(None) => return (out, at, false),
            Err(_) => return (out, at, true),
        }
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&split, rest)) = data.split_first() else {
        return;
    };
    for max in [16usize, 1 << 20] {
        let whole = frames(rest, max);
        // the same bytes arriving in two reads give the same frames
        let cut = usize::from(split).min(rest.len());
        let mut buf = rest[..cut].to_vec();
        let (mut first, used, failed) = frames(&buf, max);
        if failed {
            assert!(whole.2);
            continue;
        }
        buf.drain(..used);
        buf.extend_from_slice(&rest[cut..]);
        let (second, used2, failed2) = frames(&buf, max);
        first.extend(second);
        assert_eq!(first, whole.0);
        assert_eq!(used + used2, whole.1);
        assert_eq!(failed2, whole.2);
    }
});

//! Fuzz target for the line protocol decoder: arbitrary bytes fed in chunks must never make
//! `LineDecoder` panic, must give the same events as one whole read, and every message must
//! survive the broker's echo (encode, then decode again).

#![no_main]
#![forbid(unsafe_code)]

use bytes::BytesMut;
use libfuzzer_sys::fuzz_target;
use warren_proto::line::{ERROR_BODY, LineDecoder, LineEvent, encode};

/// Feeds `data` in chunks of `chunk` bytes; returns the events and whether it stopped on an
/// error.
fn decode_chunked(
    data: &[u8],
    chunk: usize,
    max_head: usize,
    max_body: usize,
) -> (Vec<LineEvent>, bool) {
    let mut decoder = LineDecoder::new(max_head, max_body);
    let mut buf = BytesMut::new();
    let mut events = Vec::new();
    for piece in data.chunks(chunk) {
        buf.extend_from_slice(piece);
        loop {
            let before = buf.len();
            match decoder.decode(&mut buf) {
                Ok(Some(event)) => events.push(event),
                Ok(None) => break,
                Err(e) => {
                    assert!(!e.kind().is_empty());
                    return (events, true);
                }
            }
            assert!(buf.len() <= before, "decoding never adds bytes");
        }
    }
    (events, false)
}

fuzz_target!(|data: &[u8]| {
    let chunk = usize::from(data.first().copied().unwrap_or(0) % 17) + 1;
    for (max_head, max_body) in [(8, 16), (64, 64 * 1024)] {
        let whole = decode_chunked(data, data.len().max(1), max_head, max_body);
        assert_eq!(decode_chunked(data, chunk, max_head, max_body), whole);

        // The echo of every event decodes back to the same messages (ERROR for bad heads).
        let mut echoed = BytesMut::new();
        let mut expected = Vec::new();
        for event in &whole.0 {
            let body = match event {
                LineEvent::Message(body) => &body[..],
                LineEvent::BadHead => ERROR_BODY,
            };
            encode(
                body,
                event == &LineEvent::BadHead || body.len() % 2 == 0,
                &mut echoed,
            );
            expected.push(LineEvent::Message(bytes::Bytes::copy_from_slice(body)));
        }
        let mut decoder = LineDecoder::new(64, usize::MAX);
        let mut again = Vec::new();
        while let Some(event) = decoder.decode(&mut echoed).expect("echo decodes") {
            again.push(event);
        }
        assert!(echoed.is_empty());
        assert_eq!(again, expected);
    }
});

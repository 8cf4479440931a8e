//! Fuzz target for the WebSocket upgrade request reader: arbitrary bytes must never make
//! `warren::gate::upgrade::parse` panic; a complete head must never be claimed longer than the
//! bytes given, and it is decided by its own bytes (parsing only the head gives the same answer,
//! and so does any prefix that contains it).

#![no_main]
#![forbid(unsafe_code)]

use libfuzzer_sys::fuzz_target;
use warren::gate::upgrade::{MAX_REQUEST, parse};

/// The opening request the fuzzer starts from, so that it explores the header checks rather than
/// the request line.
const OPENING: &[u8] = b"GET / HTTP/1.1\r\nConnection: Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: ";

fuzz_target!(|raw: &[u8]| {
    let mut buf = Vec::with_capacity(raw.len() + OPENING.len());
    if raw.first().is_some_and(|b| b % 2 == 0) {
        buf.extend_from_slice(OPENING);
    }
    buf.extend_from_slice(raw);
    buf.truncate(MAX_REQUEST);
    match parse(&buf) {
        Ok(Some((req, used))) => {
            assert!(used <= buf.len(), "head of {used} bytes in {}", buf.len());
            let again = parse(&buf[..used]).expect("the head alone parses");
            let (req2, used2) = again.expect("the head alone is complete");
            assert_eq!(used2, used);
            assert_eq!(req2, req);
            assert!(!req.accept.is_empty());
        }
        Ok(None) => {}
        Err(refused) => {
            assert!(
                matches!(refused.status, 400 | 405 | 431),
                "status {}",
                refused.status
            );
            assert!(refused.response().starts_with(b"HTTP/1.1 "));
        }
    }
});

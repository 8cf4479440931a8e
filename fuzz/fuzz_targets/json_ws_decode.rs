//! Fuzz target for JSON-over-WebSocket frames: arbitrary bytes must never make `decode` panic,
//! the size limit must hold, and every decoded frame must survive encode → decode.

#![no_main]
#![forbid(unsafe_code)]

use libfuzzer_sys::fuzz_target;
use warren_proto::json_ws::{JsonWsError, decode, encode};

fuzz_target!(|data: &[u8]| {
    for max in [16, 1 << 20] {
        match decode(data, max) {
            Ok(frame) => {
                assert!(data.len() <= max);
                let wire = encode(&frame);
                let again = decode(&wire, usize::MAX).expect("an encoded frame decodes");
                assert_eq!(again, frame);
                assert_eq!(encode(&again), wire, "encoding is stable");
            }
            Err(JsonWsError::TooLarge { size, .. }) => assert!(size > max),
            Err(e) => assert!(!e.kind().is_empty()),
        }
    }
});

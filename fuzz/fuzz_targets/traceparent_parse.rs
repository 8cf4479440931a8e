//! Fuzz target for W3C `traceparent` values (a JSON-WS client may send one): arbitrary text must
//! never make `TraceContext::parse` panic, and every context it accepts prints as a version-00
//! value that parses back to the same context.

#![no_main]
#![forbid(unsafe_code)]

use libfuzzer_sys::fuzz_target;
use warren_proto::trace_context::TraceContext;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Some(tc) = TraceContext::parse(text) {
        let printed = tc.to_string();
        assert_eq!(printed.len(), 55, "{printed}");
        assert_eq!(TraceContext::parse(&printed), Some(tc));
    }
});

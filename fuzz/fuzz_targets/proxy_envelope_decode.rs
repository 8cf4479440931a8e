//! Fuzz target for the gate proxy's envelope, which a backend service behind the gate writes in
//! every frame body: arbitrary bytes must never make `Envelope::decode` panic, `peek_seq` must
//! agree with it, and every accepted envelope must encode back to the bytes it came from.

#![no_main]
#![forbid(unsafe_code)]

use bytes::Bytes;
use libfuzzer_sys::fuzz_target;
use warren_proto::proxy_envelope::Envelope;

fuzz_target!(|data: &[u8]| {
    let body = Bytes::copy_from_slice(data);
    if let Ok(e) = Envelope::decode(&body) {
        assert_eq!(Envelope::peek_seq(data), Ok(e.seq));
        let again = e.to_bytes().expect("decoded fields fit their u16 lengths");
        assert_eq!(&again[..], data);
    }
});

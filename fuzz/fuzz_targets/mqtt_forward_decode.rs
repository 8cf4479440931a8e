//! Fuzz target for the publishes MQTT gates forward to each other over the cluster's broker:
//! arbitrary bytes must never make `mqtt_forward::Forwarded::decode` panic, and every body it
//! accepts must encode back to the same bytes.

#![no_main]
#![forbid(unsafe_code)]

use bytes::Bytes;
use libfuzzer_sys::fuzz_target;
use warren_proto::mqtt_forward::Forwarded;

fuzz_target!(|data: &[u8]| {
    let body = Bytes::copy_from_slice(data);
    let Ok(f) = Forwarded::decode(body.clone()) else {
        return;
    };
    assert!(f.qos <= 2);
    assert!(!f.topic.is_empty());
    assert_eq!(f.encode(), body, "an accepted body encodes back to itself");
});

//! Fuzz target for the persistent sessions MQTT gates hand over to each other over the cluster's
//! broker: arbitrary bytes must never make `mqtt_handover::Answer::decode` panic, what it accepts
//! must hold the caps it was given, and every accepted body must encode back to the same bytes.

#![no_main]
#![forbid(unsafe_code)]

use bytes::Bytes;
use libfuzzer_sys::fuzz_target;
use warren_proto::mqtt_handover::{Answer, Delivery, Limits};

fuzz_target!(|data: &[u8]| {
    let body = Bytes::copy_from_slice(data);
    let small = Limits {
        max_filters: 4,
        max_topic_len: 16,
        max_messages: 4,
        max_awaiting: 4,
        max_bytes: 512,
    };
    let large = Limits {
        max_filters: 1 << 16,
        max_topic_len: 1 << 16,
        max_messages: 1 << 20,
        max_awaiting: 1 << 16,
        max_bytes: 1 << 20,
    };
    for limits in [small, large] {
        let Ok(answer) = Answer::decode(body.clone(), &limits) else {
            continue;
        };
        if let Answer::Session(h) = &answer {
            assert!(!h.client_id.is_empty());
            assert!(h.filters.len() <= limits.max_filters);
            assert!(h.messages.len() <= limits.max_messages);
            assert!(h.awaiting.len() <= limits.max_awaiting);
            assert!(
                h.filters
                    .iter()
                    .all(|(f, q)| f.len() <= limits.max_topic_len && *q <= 2)
            );
            assert!(h.messages.iter().all(|m| {
                (1..=2).contains(&m.qos)
                    && !m.topic.is_empty()
                    && !matches!(m.state, Delivery::Released { .. } if m.qos != 2)
            }));
        }
        assert_eq!(
            answer.encode(),
            body,
            "an accepted body encodes back to itself"
        );
    }
});

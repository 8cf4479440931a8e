//! Property tests: every valid packet survives encode → decode, streams of packets survive
//! arbitrary chunking, and arbitrary bytes never make the decoder panic.

use bytes::{Bytes, BytesMut};
use proptest::collection::vec;
use proptest::prelude::*;
use tokio_util::codec::Decoder;
use warren_proto::mqtt::{
    ConnAck, Connect, LastWill, MqttCodec, Packet, Publish, QoS, SubAck, Subscribe,
    SubscribeFilter, Unsubscribe, decode, encode, topic,
};

fn qos() -> impl Strategy<Value = QoS> {
    prop_oneof![
        Just(QoS::AtMostOnce),
        Just(QoS::AtLeastOnce),
        Just(QoS::ExactlyOnce)
    ]
}

fn pkid() -> impl Strategy<Value = u16> {
    1..=u16::MAX
}

/// Any MQTT string: printable characters (no U+0000), including multi-byte ones.
fn text() -> impl Strategy<Value = String> {
    "\\PC{0,12}"
}

fn bytes(max: usize) -> impl Strategy<Value = Bytes> {
    vec(any::<u8>(), 0..max).prop_map(Bytes::from)
}

/// Valid topic names: levels of text without wildcards, possibly empty levels or `$`.
fn topic_name() -> impl Strategy<Value = String> {
    vec("[a-zA-Z0-9_$é ]{0,6}", 1..5)
        .prop_map(|levels| levels.join("/"))
        .prop_filter("valid topic name", |t| topic::valid_topic_name(t))
}

/// Valid topic filters: words, `+` and empty levels, optionally ending in `#`.
fn filter() -> impl Strategy<Value = String> {
    let level = prop_oneof![Just("+".to_owned()), "[a-z0-9$ü]{0,5}"];
    (vec(level, 0..4), any::<bool>())
        .prop_map(|(mut levels, hash)| {
            if hash || levels.is_empty() {
                levels.push("#".to_owned());
            }
            levels.join("/")
        })
        .prop_filter("valid filter", |f| topic::valid_filter(f))
}

fn connect() -> impl Strategy<Value = Connect> {
    let will = (topic_name(), bytes(16), qos(), any::<bool>()).prop_map(
        |(topic, message, qos, retain)| LastWill {
            topic,
            message,
            qos,
            retain,
        },
    );
    (
        (
            prop_oneof![
                Just(("MQTT".to_owned(), 4u8)),
                Just(("MQIsdp".to_owned(), 3u8))
            ],
            any::<bool>(),
            any::<u16>(),
            text(),
        ),
        proptest::option::of(will),
        proptest::option::of(text()),
        proptest::option::of(bytes(16)),
    )
        .prop_map(
            |(
                ((protocol_name, protocol_level), clean_session, keep_alive, client_id),
                will,
                username,
                password,
            )| Connect {
                protocol_name,
                protocol_level,
                clean_session,
                keep_alive,
                client_id,
                will,
                username,
                password,
            },
        )
}

fn publish() -> impl Strategy<Value = Publish> {
    (
        any::<bool>(),
        qos(),
        any::<bool>(),
        topic_name(),
        pkid(),
        bytes(200),
    )
        .prop_map(|(dup, qos, retain, topic, pkid, payload)| Publish {
            dup,
            qos,
            retain,
            topic: Bytes::from(topic),
            pkid: if qos == QoS::AtMostOnce { 0 } else { pkid },
            payload,
        })
}

fn packet() -> impl Strategy<Value = Packet> {
    prop_oneof![
        connect().prop_map(Packet::Connect),
        (any::<bool>(), 0u8..=5).prop_map(|(session_present, code)| Packet::ConnAck(ConnAck {
            session_present,
            code
        })),
        publish().prop_map(Packet::Publish),
        pkid().prop_map(Packet::PubAck),
        pkid().prop_map(Packet::PubRec),
        pkid().prop_map(Packet::PubRel),
        pkid().prop_map(Packet::PubComp),
        (pkid(), vec((filter(), qos()), 1..5)).prop_map(|(pkid, filters)| {
            Packet::Subscribe(Subscribe {
                pkid,
                filters: filters
                    .into_iter()
                    .map(|(filter, qos)| SubscribeFilter { filter, qos })
                    .collect(),
            })
        }),
        (
            pkid(),
            vec(prop_oneof![Just(0u8), Just(1), Just(2), Just(0x80)], 0..5)
        )
            .prop_map(|(pkid, return_codes)| Packet::SubAck(SubAck { pkid, return_codes })),
        (pkid(), vec(filter(), 1..5))
            .prop_map(|(pkid, filters)| Packet::Unsubscribe(Unsubscribe { pkid, filters })),
        pkid().prop_map(Packet::UnsubAck),
        Just(Packet::PingReq),
        Just(Packet::PingResp),
        Just(Packet::Disconnect),
    ]
}

fn encoded(packet: &Packet) -> BytesMut {
    let mut buf = BytesMut::new();
    encode(packet, &mut buf);
    buf
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn valid_packets_round_trip(packet in packet(), cut in any::<prop::sample::Index>()) {
        let bytes = encoded(&packet);
        // Any strict prefix asks for more and consumes nothing.
        let n = cut.index(bytes.len());
        let mut prefix = BytesMut::from(&bytes[..n]);
        prop_assert!(matches!(decode(&mut prefix, usize::MAX), Ok(None)));
        prop_assert_eq!(prefix.len(), n);
        // The whole packet decodes to the same value and is consumed exactly.
        let mut buf = bytes.clone();
        let decoded = decode(&mut buf, bytes.len()).unwrap();
        prop_assert_eq!(decoded, Some(packet));
        prop_assert!(buf.is_empty());
        // One byte less of limit rejects it before the body is needed.
        let mut header_only = BytesMut::from(&bytes[..bytes.len().min(5)]);
        let too_small = decode(&mut header_only, bytes.len() - 1);
        prop_assert!(
            matches!(too_small, Err(ref e) if e.kind() == "too_large"),
            "{:?}",
            too_small
        );
    }

    #[test]
    fn packet_streams_survive_any_chunking(
        packets in vec(packet(), 1..8),
        chunk in 1usize..64,
    ) {
        let mut all = BytesMut::new();
        for p in &packets {
            all.extend_from_slice(&encoded(p));
        }
        let mut codec = MqttCodec::new(usize::MAX);
        let mut buf = BytesMut::new();
        let mut got = Vec::new();
        for piece in all.chunks(chunk) {
            buf.extend_from_slice(piece);
            while let Some(p) = codec.decode(&mut buf).unwrap() {
                got.push(p);
            }
        }
        prop_assert!(buf.is_empty());
        prop_assert_eq!(got, packets);
    }

    #[test]
    fn arbitrary_bytes_never_panic(data in vec(any::<u8>(), 0..300), max in prop_oneof![Just(16usize), Just(4096), Just(usize::MAX)]) {
        let mut buf = BytesMut::from(&data[..]);
        loop {
            let before = buf.len();
            match decode(&mut buf, max) {
                Ok(Some(packet)) => {
                    prop_assert!(buf.len() < before);
                    // Whatever decodes re-encodes to something that decodes the same.
                    let mut again = encoded(&packet);
                    prop_assert_eq!(decode(&mut again, usize::MAX).unwrap(), Some(packet));
                }
                Ok(None) => {
                    prop_assert_eq!(buf.len(), before);
                    break;
                }
                Err(e) => {
                    prop_assert!(!e.kind().is_empty());
                    prop_assert!(!e.to_string().is_empty());
                    break;
                }
            }
        }
    }

    #[test]
    fn mutated_packets_never_panic(packet in packet(), pos in any::<prop::sample::Index>(), byte in any::<u8>()) {
        let mut bytes = encoded(&packet).to_vec();
        let i = pos.index(bytes.len());
        bytes[i] = byte;
        let mut buf = BytesMut::from(&bytes[..]);
        while let Ok(Some(p)) = decode(&mut buf, 4096) {
            let mut again = encoded(&p);
            prop_assert_eq!(decode(&mut again, usize::MAX).unwrap(), Some(p));
        }
    }

    #[test]
    fn matching_agrees_with_a_filter_built_from_the_topic(topic in topic_name(), mask in vec(any::<bool>(), 5)) {
        // Replacing any levels by `+` keeps a match, unless the topic is a `$` topic and
        // the first level became a wildcard.
        let levels: Vec<&str> = topic::levels(&topic).collect();
        let filter: Vec<&str> = levels
            .iter()
            .enumerate()
            .map(|(i, l)| if mask.get(i).copied().unwrap_or(false) { "+" } else { l })
            .collect();
        let filter = filter.join("/");
        let dollar_blocked = topic.starts_with('$') && filter.starts_with('+');
        prop_assert_eq!(topic::matches(&filter, &topic), !dollar_blocked);
        let with_hash = format!("{filter}/#");
        prop_assert_eq!(topic::matches(&with_hash, &topic), !dollar_blocked);
        let longer = format!("{filter}/x/y");
        prop_assert!(!topic::matches(&longer, &topic));
    }
}

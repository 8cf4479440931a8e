//! Every MQTT vector of docs/protocols/mqtt.md, "Byte vectors (mqant mode)" (push_qos 1): the
//! client bytes decode to the expected packets and the gate's answers encode to exactly the listed
//! bytes.

use bytes::{Bytes, BytesMut};
use tokio_util::codec::Decoder;
use warren_proto::mqtt::{
    ConnAck, Connect, MqttCodec, Packet, Publish, QoS, SubAck, Subscribe, SubscribeFilter,
    Unsubscribe, decode, encode, encode_publish, pingresp_bytes,
};

/// Concatenates byte pieces, the way the vectors mix hex and quoted text.
fn cat(parts: &[&[u8]]) -> Vec<u8> {
    parts.concat()
}

/// Decodes `bytes` as exactly one packet under the mqant default limit.
fn decode_exact(bytes: &[u8]) -> Packet {
    let mut buf = BytesMut::from(bytes);
    let packet = decode(&mut buf, 4096).unwrap().expect("complete packet");
    assert!(buf.is_empty(), "{} bytes left over", buf.len());
    packet
}

fn encoded(packet: &Packet) -> Vec<u8> {
    let mut buf = BytesMut::new();
    encode(packet, &mut buf);
    buf.to_vec()
}

fn push(topic: &str, qos: QoS, pkid: u16, payload: &str) -> Vec<u8> {
    let mut buf = BytesMut::new();
    encode_publish(
        &mut buf,
        topic.as_bytes(),
        qos,
        false,
        false,
        pkid,
        payload.as_bytes(),
    );
    buf.to_vec()
}

fn publish(topic: &str, qos: QoS, pkid: u16, payload: &[u8]) -> Packet {
    let mut p = Publish::new(topic, qos, Bytes::copy_from_slice(payload));
    p.pkid = pkid;
    Packet::Publish(p)
}

const LOGIN_BODY: &[u8] = br#"{"userName":"alice","passWord":"Hello,anyone!"}"#;
const ON_CHAT: &str = r#"{"from":"alice","msg":"hi","roomName":"mqant","target":"*"}"#;

/// The client bytes of rows 4 to 12, in order on one connection.
fn client_stream() -> Vec<(Vec<u8>, Packet)> {
    vec![
        (
            cat(&[
                &[0x32, 0x43, 0x00, 0x10],
                b"Login/HD_Login/1",
                &[0x00, 0x01],
                LOGIN_BODY,
            ]),
            publish("Login/HD_Login/1", QoS::AtLeastOnce, 1, LOGIN_BODY),
        ),
        (
            cat(&[&[0x30, 0x13, 0x00, 0x10], b"Login/HD_Login/1", b"x"]),
            publish("Login/HD_Login/1", QoS::AtMostOnce, 0, b"x"),
        ),
        (
            cat(&[&[0x30, 0x11, 0x00, 0x0e], b"Login/HD_Login", b"x"]),
            publish("Login/HD_Login", QoS::AtMostOnce, 0, b"x"),
        ),
        (
            cat(&[&[0x30, 0x13, 0x00, 0x0f], b"Login/getRand/3", b"{}"]),
            publish("Login/getRand/3", QoS::AtMostOnce, 0, b"{}"),
        ),
        (
            cat(&[&[0x30, 0x0f, 0x00, 0x0b], b"Nope/HD_X/4", b"{}"]),
            publish("Nope/HD_X/4", QoS::AtMostOnce, 0, b"{}"),
        ),
        (
            cat(&[
                &[0x34, 0x11, 0x00, 0x0b],
                b"Chat/HD_Say",
                &[0x00, 0x07],
                b"{}",
            ]),
            publish("Chat/HD_Say", QoS::ExactlyOnce, 7, b"{}"),
        ),
        (vec![0x62, 0x02, 0x00, 0x07], Packet::PubRel(7)),
        (
            cat(&[
                &[0x82, 0x0f, 0x00, 0x02, 0x00, 0x04],
                b"chat",
                &[0x02, 0x00, 0x03],
                b"aaa",
                &[0x02],
            ]),
            Packet::Subscribe(Subscribe {
                pkid: 2,
                filters: vec![
                    SubscribeFilter {
                        filter: "chat".into(),
                        qos: QoS::ExactlyOnce,
                    },
                    SubscribeFilter {
                        filter: "aaa".into(),
                        qos: QoS::ExactlyOnce,
                    },
                ],
            }),
        ),
        (
            cat(&[&[0xa2, 0x08, 0x00, 0x03, 0x00, 0x04], b"chat"]),
            Packet::Unsubscribe(Unsubscribe {
                pkid: 3,
                filters: vec!["chat".into()],
            }),
        ),
        (vec![0xc0, 0x00], Packet::PingReq),
    ]
}

#[test]
fn connect_mqtt_3_1_with_credentials() {
    let bytes = cat(&[
        &[0x10, 0x22, 0x00, 0x06],
        b"MQIsdp",
        &[0x03, 0xc2, 0x00, 0x3c, 0x00, 0x03],
        b"111",
        &[0x00, 0x05],
        b"admin",
        &[0x00, 0x08],
        b"password",
    ]);
    let expected = Connect {
        protocol_name: "MQIsdp".into(),
        protocol_level: 3,
        clean_session: true,
        keep_alive: 60,
        client_id: "111".into(),
        will: None,
        username: Some("admin".into()),
        password: Some(Bytes::from_static(b"password")),
    };
    assert_eq!(decode_exact(&bytes), Packet::Connect(expected));
    assert_eq!(
        encoded(&Packet::ConnAck(ConnAck::new(ConnAck::ACCEPTED))),
        [0x20, 0x02, 0x00, 0x00]
    );
}

#[test]
fn connect_mqtt_3_1_1() {
    let bytes = cat(&[
        &[0x10, 0x0d, 0x00, 0x04],
        b"MQTT",
        &[0x04, 0x02, 0x00, 0x3c, 0x00, 0x01],
        b"a",
    ]);
    assert_eq!(decode_exact(&bytes), Packet::Connect(Connect::new("a", 60)));
    assert_eq!(
        encoded(&Packet::ConnAck(ConnAck::new(0))),
        [0x20, 0x02, 0x00, 0x00]
    );
}

#[test]
fn connect_with_empty_client_id_decodes() {
    let bytes = cat(&[
        &[0x10, 0x0c, 0x00, 0x04],
        b"MQTT",
        &[0x04, 0x02, 0x00, 0x3c, 0x00, 0x00],
    ]);
    assert_eq!(decode_exact(&bytes), Packet::Connect(Connect::new("", 60)));
    assert_eq!(
        encoded(&Packet::ConnAck(ConnAck::new(ConnAck::IDENTIFIER_REJECTED))),
        [0x20, 0x02, 0x00, 0x02]
    );
}

#[test]
fn client_packets_decode_one_by_one() {
    for (bytes, expected) in client_stream() {
        assert_eq!(decode_exact(&bytes), expected);
        // Encoding the decoded packet gives the client's bytes back.
        assert_eq!(encoded(&expected), bytes);
    }
}

#[test]
fn client_stream_decodes_in_order_from_one_buffer() {
    let stream = client_stream();
    let mut buf = BytesMut::new();
    for (bytes, _) in &stream {
        buf.extend_from_slice(bytes);
    }
    for (_, expected) in &stream {
        assert_eq!(decode(&mut buf, 4096).unwrap().as_ref(), Some(expected));
    }
    assert!(decode(&mut buf, 4096).unwrap().is_none());
    assert!(buf.is_empty());
}

#[test]
fn client_stream_decodes_when_split_at_every_byte() {
    let stream = client_stream();
    let all: Vec<u8> = stream.iter().flat_map(|(b, _)| b.clone()).collect();
    let mut codec = MqttCodec::new(4096);
    let mut buf = BytesMut::new();
    let mut got = Vec::new();
    for &byte in &all {
        buf.extend_from_slice(&[byte]);
        while let Some(packet) = codec.decode(&mut buf).unwrap() {
            got.push(packet);
        }
    }
    let expected: Vec<Packet> = stream.into_iter().map(|(_, p)| p).collect();
    assert_eq!(got, expected);
}

#[test]
fn gate_answers() {
    // QoS 1 login request: PUBACK, then the reply on the same topic with push id 1.
    assert_eq!(encoded(&Packet::PubAck(1)), [0x40, 0x02, 0x00, 0x01]);
    let reply = r#"{"Error":"","Result":"login success alice"}"#;
    assert_eq!(
        push("Login/HD_Login/1", QoS::AtLeastOnce, 1, reply),
        cat(&[
            &[0x32, 0x3f, 0x00, 0x10],
            b"Login/HD_Login/1",
            &[0x00, 0x01],
            reply.as_bytes()
        ])
    );
    // Non-JSON body.
    let reply = r#"{"Error":"body must be JSON format","Result":null}"#;
    assert_eq!(
        push("Login/HD_Login/1", QoS::AtLeastOnce, 2, reply),
        cat(&[
            &[0x32, 0x46, 0x00, 0x10],
            b"Login/HD_Login/1",
            &[0x00, 0x02],
            reply.as_bytes()
        ])
    );
    // Handler without the prefix.
    let reply = r#"{"Error":"Method(getRand) must begin with 'HD_'","Result":null}"#;
    assert_eq!(
        push("Login/getRand/3", QoS::AtLeastOnce, 3, reply),
        cat(&[
            &[0x32, 0x52, 0x00, 0x0f],
            b"Login/getRand/3",
            &[0x00, 0x03],
            reply.as_bytes()
        ])
    );
    // Unknown module.
    let reply = r#"{"Error":"Service(type:Nope) not found","Result":null}"#;
    assert_eq!(
        push("Nope/HD_X/4", QoS::AtLeastOnce, 4, reply),
        cat(&[
            &[0x32, 0x45, 0x00, 0x0b],
            b"Nope/HD_X/4",
            &[0x00, 0x04],
            reply.as_bytes()
        ])
    );
    // QoS 2 handshake.
    assert_eq!(encoded(&Packet::PubRec(7)), [0x50, 0x02, 0x00, 0x07]);
    assert_eq!(encoded(&Packet::PubComp(7)), [0x70, 0x02, 0x00, 0x07]);
    // One SUBACK, granted min(requested, 1) per topic.
    let suback = Packet::SubAck(SubAck {
        pkid: 2,
        return_codes: vec![1, 1],
    });
    assert_eq!(encoded(&suback), [0x90, 0x04, 0x00, 0x02, 0x01, 0x01]);
    assert_eq!(encoded(&Packet::UnsubAck(3)), [0xb0, 0x02, 0x00, 0x03]);
    assert_eq!(encoded(&Packet::PingResp), [0xd0, 0x00]);
    assert_eq!(pingresp_bytes(false), [0xd0, 0x00]);
    assert_eq!(pingresp_bytes(true), [0xd2, 0x00]);
}

#[test]
fn pushes() {
    assert_eq!(
        push("Chat/OnChat", QoS::AtLeastOnce, 5, ON_CHAT),
        cat(&[
            &[0x32, 0x4a, 0x00, 0x0b],
            b"Chat/OnChat",
            &[0x00, 0x05],
            ON_CHAT.as_bytes()
        ])
    );
    assert_eq!(
        push("Chat/OnChat", QoS::AtMostOnce, 0, ON_CHAT),
        cat(&[
            &[0x30, 0x48, 0x00, 0x0b],
            b"Chat/OnChat",
            ON_CHAT.as_bytes()
        ])
    );
    // The Publish value path gives the same bytes as the fast path.
    let mut p = Publish::new("Chat/OnChat", QoS::AtLeastOnce, ON_CHAT);
    p.pkid = 5;
    assert_eq!(
        encoded(&Packet::Publish(p)),
        push("Chat/OnChat", QoS::AtLeastOnce, 5, ON_CHAT)
    );
}

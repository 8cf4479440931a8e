//! The pomelo codec against the byte table of docs/protocols/pomelo.md, against the bytes of the
//! reference encoder, and under property tests: every vector decodes and encodes exactly, every
//! prefix asks for more, every valid package and message survives a round trip, and arbitrary bytes
//! never panic.

use std::io::Write;

use bytes::{Bytes, BytesMut};
use flate2::Compression;
use flate2::write::GzEncoder;
use proptest::collection::vec;
use proptest::prelude::*;
use tokio_util::codec::Decoder;
use warren_proto::pomelo::{
    Message, MessageRoute, MessageType, Package, PackageType, PomeloCodec, PomeloError, decode_id,
    decode_message, decode_package, encode_data, encode_id, encode_message, encode_package,
    inflate,
};

/// The listener default.
const MAX: usize = 64 * 1024;

/// Concatenates byte pieces, the way the vectors mix hex and quoted text.
fn cat(parts: &[&[u8]]) -> Vec<u8> {
    parts.concat()
}

/// Parses space-separated hex.
fn hex(text: &str) -> Vec<u8> {
    text.split_whitespace()
        .map(|b| u8::from_str_radix(b, 16).unwrap())
        .collect()
}

fn name(route: &str) -> MessageRoute {
    MessageRoute::Name(route.to_owned())
}

fn message(kind: MessageType, id: u32, route: MessageRoute, body: &[u8]) -> Message {
    Message {
        kind,
        id,
        route,
        body: Bytes::copy_from_slice(body),
        gzip: false,
    }
}

/// Decodes `bytes` as exactly one package.
fn decode_exact(bytes: &[u8]) -> Package {
    let mut buf = BytesMut::from(bytes);
    let package = decode_package(&mut buf, MAX)
        .unwrap()
        .expect("complete package");
    assert!(buf.is_empty(), "{} bytes left over", buf.len());
    package
}

fn package_bytes(kind: PackageType, body: &[u8]) -> Vec<u8> {
    let mut buf = BytesMut::new();
    encode_package(kind, body, &mut buf);
    buf.to_vec()
}

fn message_bytes(m: &Message) -> Vec<u8> {
    let mut buf = BytesMut::new();
    encode_message(m.kind, m.id, &m.route, &m.body, &mut buf);
    buf.to_vec()
}

fn data_bytes(m: &Message) -> Vec<u8> {
    let mut buf = BytesMut::new();
    encode_data(m.kind, m.id, &m.route, &m.body, &mut buf);
    buf.to_vec()
}

/// Asserts that every strict prefix of `bytes` yields `Ok(None)` and consumes nothing.
fn assert_prefixes_incomplete(bytes: &[u8]) {
    for n in 0..bytes.len() {
        let mut buf = BytesMut::from(&bytes[..n]);
        assert!(
            matches!(decode_package(&mut buf, MAX), Ok(None)),
            "prefix of {n} bytes"
        );
        assert_eq!(buf.len(), n, "prefix of {n} bytes was consumed");
    }
}

/// Asserts a package vector both ways, its prefixes, and that it is followed cleanly by a
/// heartbeat in the same buffer.
fn assert_package(bytes: &[u8], kind: PackageType, body: &[u8]) {
    let package = decode_exact(bytes);
    assert_eq!(package, Package::new(kind, Bytes::copy_from_slice(body)));
    assert_eq!(package_bytes(kind, body), bytes);
    assert_prefixes_incomplete(bytes);
    let mut buf = BytesMut::from(bytes);
    buf.extend_from_slice(&[0x03, 0x00, 0x00, 0x00]);
    assert_eq!(decode_package(&mut buf, MAX).unwrap(), Some(package));
    assert_eq!(
        decode_package(&mut buf, MAX).unwrap(),
        Some(Package::new(PackageType::Heartbeat, Bytes::new()))
    );
    assert!(buf.is_empty());
}

/// Asserts a data-package vector: the package, the message inside it, and `encode_data`.
fn assert_data(bytes: &[u8], m: &Message) {
    assert_package(bytes, PackageType::Data, &message_bytes(m));
    assert_eq!(decode_message(decode_exact(bytes).body).unwrap(), *m);
    assert_eq!(data_bytes(m), bytes);
}

/// Asserts a message-only vector both ways.
fn assert_message(bytes: &[u8], m: &Message) {
    assert_eq!(decode_message(Bytes::copy_from_slice(bytes)).unwrap(), *m);
    assert_eq!(message_bytes(m), bytes);
}

// ---- the byte table of docs/protocols/pomelo.md, "Packages and messages" ----

#[test]
fn handshake_packages() {
    let request = br#"{"sys":{"type":"js-websocket","version":"0.0.1","rsa":{}},"user":{}}"#;
    assert_package(
        &cat(&[&[0x01, 0x00, 0x00, 0x44], request]),
        PackageType::Handshake,
        request,
    );
    let response = br#"{"code":200,"sys":{"heartbeat":3}}"#;
    assert_package(
        &cat(&[&[0x01, 0x00, 0x00, 0x22], response]),
        PackageType::Handshake,
        response,
    );
}

#[test]
fn ack_heartbeat_and_kick() {
    assert_package(&[0x02, 0x00, 0x00, 0x00], PackageType::HandshakeAck, b"");
    assert_package(&[0x03, 0x00, 0x00, 0x00], PackageType::Heartbeat, b"");
    let kick = br#"{"reason":"kick"}"#;
    assert_package(
        &cat(&[&[0x05, 0x00, 0x00, 0x11], kick]),
        PackageType::Kick,
        kick,
    );
}

#[test]
fn request_package() {
    let bytes = cat(&[
        &[0x04, 0x00, 0x00, 0x21, 0x00, 0x01, 0x1c],
        b"connector.entryHandler.entry",
        &[0x7b, 0x7d],
    ]);
    let m = message(
        MessageType::Request,
        1,
        name("connector.entryHandler.entry"),
        b"{}",
    );
    assert_data(&bytes, &m);
}

#[test]
fn response_packages() {
    let bytes = cat(&[&[0x04, 0x00, 0x00, 0x0e, 0x04, 0x01], br#"{"code":200}"#]);
    let m = message(
        MessageType::Response,
        1,
        MessageRoute::None,
        br#"{"code":200}"#,
    );
    assert_data(&bytes, &m);
    let m = message(
        MessageType::Response,
        300,
        MessageRoute::None,
        br#"{"code":200}"#,
    );
    assert_message(&cat(&[&[0x04, 0xac, 0x02], br#"{"code":200}"#]), &m);
}

#[test]
fn notify_push_and_compressed_route() {
    let m = message(MessageType::Notify, 0, name("chat.chatHandler.send"), b"{}");
    assert_message(
        &cat(&[&[0x02, 0x15], b"chat.chatHandler.send", &[0x7b, 0x7d]]),
        &m,
    );
    let m = message(MessageType::Push, 0, name("onChat"), b"{}");
    assert_data(
        &cat(&[
            &[0x04, 0x00, 0x00, 0x0a, 0x06, 0x06],
            b"onChat",
            &[0x7b, 0x7d],
        ]),
        &m,
    );
    let m = message(MessageType::Request, 1, MessageRoute::Code(1), b"{}");
    assert_message(&[0x01, 0x01, 0x00, 0x01, 0x7b, 0x7d], &m);
}

#[test]
fn id_varints() {
    for (id, bytes) in [
        (1u32, &[0x01][..]),
        (127, &[0x7f]),
        (128, &[0x80, 0x01]),
        (300, &[0xac, 0x02]),
        (16384, &[0x80, 0x80, 0x01]),
    ] {
        let mut buf = BytesMut::new();
        encode_id(id, &mut buf);
        assert_eq!(&buf[..], bytes, "{id}");
        assert_eq!(decode_id(bytes).unwrap(), (id, bytes.len()), "{id}");
    }
}

// ---- the reference encoder ----

/// Bytes printed by pomelo-protocol 0.1.6's encoder (`Message.encode` and `Package.encode`
/// under Node.js), so that a misreading of the contract cannot hide in both the vectors and
/// the codec.
#[test]
fn matches_reference_encoder() {
    let messages = [
        (
            message(
                MessageType::Request,
                300,
                name("connector.entryHandler.entry"),
                b"{}",
            ),
            "00 ac 02 1c 63 6f 6e 6e 65 63 74 6f 72 2e 65 6e 74 72 79 48 61 6e 64 6c 65 72 2e 65 \
             6e 74 72 79 7b 7d",
        ),
        (
            message(MessageType::Push, 0, name("onChat"), br#"{"msg":"hi"}"#),
            "06 06 6f 6e 43 68 61 74 7b 22 6d 73 67 22 3a 22 68 69 22 7d",
        ),
        (
            message(
                MessageType::Request,
                16384,
                MessageRoute::Code(0x1234),
                b"{}",
            ),
            "01 80 80 01 12 34 7b 7d",
        ),
        (
            message(MessageType::Notify, 0, MessageRoute::Code(1), b"{}"),
            "03 00 01 7b 7d",
        ),
        (
            message(
                MessageType::Response,
                300,
                MessageRoute::None,
                br#"{"code":200}"#,
            ),
            "04 ac 02 7b 22 63 6f 64 65 22 3a 32 30 30 7d",
        ),
        (
            message(
                MessageType::Response,
                0x7fff_ffff,
                MessageRoute::None,
                b"{}",
            ),
            "04 ff ff ff ff 07 7b 7d",
        ),
        (
            message(MessageType::Push, 0, name("é.ü"), b"{}"),
            "06 05 c3 a9 2e c3 bc 7b 7d",
        ),
    ];
    for (m, reference) in &messages {
        let reference = hex(reference);
        assert_eq!(message_bytes(m), reference, "{m:?}");
        assert_eq!(decode_message(Bytes::from(reference)).unwrap(), *m);
    }

    let push = message(MessageType::Push, 0, name("onChat"), b"{}");
    assert_eq!(
        data_bytes(&push),
        hex("04 00 00 0a 06 06 6f 6e 43 68 61 74 7b 7d")
    );
    let response = message(
        MessageType::Response,
        300,
        MessageRoute::None,
        br#"{"code":200}"#,
    );
    assert_eq!(
        data_bytes(&response),
        hex("04 00 00 0f 04 ac 02 7b 22 63 6f 64 65 22 3a 32 30 30 7d")
    );
    assert_eq!(
        package_bytes(PackageType::Heartbeat, b""),
        hex("03 00 00 00")
    );
    assert_eq!(
        package_bytes(PackageType::Kick, br#"{"reason":"kick"}"#),
        hex("05 00 00 11 7b 22 72 65 61 73 6f 6e 22 3a 22 6b 69 63 6b 22 7d")
    );
}

// ---- malformed input ----

#[test]
fn oversize_is_rejected_from_the_header_alone() {
    let mut buf = BytesMut::from(&[0x04, 0x01, 0x00, 0x01][..]);
    assert!(matches!(
        decode_package(&mut buf, MAX),
        Err(PomeloError::PackageTooLarge {
            size: 65537,
            max: MAX
        })
    ));
    let mut codec = PomeloCodec::new(MAX);
    let mut buf = BytesMut::from(&[0x01, 0xff, 0xff, 0xff][..]);
    let e = codec.decode(&mut buf).unwrap_err();
    assert_eq!(e.kind(), "too_large");
}

#[test]
fn bad_type_bytes() {
    for byte in [0x00u8, 0x06, 0x16, 0x47, 0xff] {
        let mut buf = BytesMut::from(&[byte, 0x00, 0x00, 0x00][..]);
        assert!(
            matches!(
                decode_package(&mut buf, MAX),
                Err(PomeloError::InvalidPackageType(b)) if b == byte
            ),
            "{byte:#x}"
        );
    }
}

#[test]
fn malformed_messages() {
    let decode = |bytes: &[u8]| decode_message(Bytes::copy_from_slice(bytes));
    for flag in [0x20u8, 0x40, 0x80, 0xe1] {
        assert!(matches!(
            decode(&[flag, 0x01, 0x00]),
            Err(PomeloError::InvalidFlag(f)) if f == flag
        ));
    }
    assert!(matches!(
        decode(&[0x08, 0x01]),
        Err(PomeloError::InvalidMessageType(4))
    ));
    // Six-byte id.
    assert!(matches!(
        decode(&[0x04, 0x81, 0x81, 0x81, 0x81, 0x81, 0x01, 0x7b, 0x7d]),
        Err(PomeloError::IdTooLong)
    ));
    // Route length beyond the body.
    assert!(matches!(
        decode(&cat(&[
            &[0x00, 0x01, 0x1d],
            b"connector.entryHandler.entry"
        ])),
        Err(PomeloError::Truncated)
    ));
    assert!(matches!(
        decode(&[0x06, 0x01, 0xc3]),
        Err(PomeloError::RouteNotUtf8)
    ));
    assert!(matches!(decode(&[0x06]), Err(PomeloError::MissingRoute)));
}

// ---- gzip ----

fn gzip(data: &[u8]) -> Vec<u8> {
    let mut e = GzEncoder::new(Vec::new(), Compression::default());
    e.write_all(data).unwrap();
    e.finish().unwrap()
}

#[test]
fn gzip_body_round_trip() {
    let body = br#"{"content":"hello hello hello hello hello"}"#;
    let packed = gzip(body);
    let mut bytes = vec![0x10, 0x07, 0x05]; // gzip request, id 7, 5-byte route
    bytes.extend_from_slice(b"a.b.c");
    bytes.extend_from_slice(&packed);
    let mut wire = BytesMut::new();
    encode_package(PackageType::Data, &bytes, &mut wire);
    let m = decode_message(decode_exact(&wire).body).unwrap();
    assert!(m.gzip);
    assert_eq!((m.kind, m.id), (MessageType::Request, 7));
    assert_eq!(m.route, name("a.b.c"));
    assert_eq!(&inflate(&m.body, MAX).unwrap()[..], body);
}

#[test]
fn gzip_bomb_is_rejected_at_the_limit() {
    let bomb = gzip(&vec![0u8; 10 * 1024 * 1024]);
    assert!(bomb.len() < 64 * 1024, "{}", bomb.len());
    let e = inflate(&bomb, 64 * 1024).unwrap_err();
    assert!(matches!(e, PomeloError::InflateTooLarge { limit: 65536 }));
    assert_eq!(e.kind(), "inflate_too_large");
}

// ---- properties ----

fn body(max: usize) -> impl Strategy<Value = Bytes> {
    vec(any::<u8>(), 0..max).prop_map(Bytes::from)
}

fn package_type() -> impl Strategy<Value = PackageType> {
    prop_oneof![
        Just(PackageType::Handshake),
        Just(PackageType::HandshakeAck),
        Just(PackageType::Heartbeat),
        Just(PackageType::Data),
        Just(PackageType::Kick),
    ]
}

fn package() -> impl Strategy<Value = Package> {
    (package_type(), body(300)).prop_map(|(kind, body)| Package { kind, body })
}

fn route() -> impl Strategy<Value = MessageRoute> {
    prop_oneof![
        any::<u16>().prop_map(MessageRoute::Code),
        // Up to 255 bytes of UTF-8, multi-byte characters included.
        "\\PC{0,60}"
            .prop_filter("fits the length byte", |s: &String| s.len() <= 255)
            .prop_map(MessageRoute::Name),
    ]
}

/// Valid messages: id only where the type carries one, route only where it carries one.
fn valid_message() -> impl Strategy<Value = Message> {
    let kind = prop_oneof![
        Just(MessageType::Request),
        Just(MessageType::Notify),
        Just(MessageType::Response),
        Just(MessageType::Push),
    ];
    (kind, any::<u32>(), route(), body(64), any::<bool>()).prop_map(
        |(kind, id, route, body, gzip)| Message {
            kind,
            id: if kind.has_id() { id } else { 0 },
            route: if kind.has_route() {
                route
            } else {
                MessageRoute::None
            },
            body,
            gzip,
        },
    )
}

proptest! {
    #[test]
    fn packages_round_trip_in_any_chunking(
        packages in vec(package(), 1..6),
        chunk in 1usize..40,
    ) {
        let mut wire = BytesMut::new();
        for p in &packages {
            encode_package(p.kind, &p.body, &mut wire);
        }
        let mut codec = PomeloCodec::new(300);
        let mut buf = BytesMut::new();
        let mut out = Vec::new();
        for piece in wire.chunks(chunk) {
            buf.extend_from_slice(piece);
            while let Some(p) = codec.decode(&mut buf).unwrap() {
                out.push(p);
            }
        }
        prop_assert_eq!(out, packages);
        prop_assert!(buf.is_empty());
    }

    #[test]
    fn messages_round_trip(m in valid_message()) {
        let mut buf = BytesMut::new();
        m.try_encode(&mut buf).unwrap();
        prop_assert_eq!(&decode_message(buf.clone().freeze()).unwrap(), &m);
        if !m.gzip {
            prop_assert_eq!(message_bytes(&m), buf.to_vec());
            let data = data_bytes(&m);
            let mut wire = BytesMut::from(&data[..]);
            let package = decode_package(&mut wire, usize::MAX).unwrap().unwrap();
            prop_assert_eq!(package.kind, PackageType::Data);
            prop_assert_eq!(decode_message(package.body).unwrap(), m);
        }
    }

    #[test]
    fn ids_round_trip(id in any::<u32>()) {
        let mut buf = BytesMut::new();
        encode_id(id, &mut buf);
        prop_assert_eq!(decode_id(&buf).unwrap(), (id, buf.len()));
    }

    #[test]
    fn arbitrary_bytes_never_panic(bytes in vec(any::<u8>(), 0..200), limit in 0usize..300) {
        let mut buf = BytesMut::from(&bytes[..]);
        while let Ok(Some(p)) = decode_package(&mut buf, limit) {
            if p.kind == PackageType::Data
                && let Ok(m) = decode_message(p.body)
            {
                let _ = inflate(&m.body, limit);
            }
        }
        let _ = decode_message(Bytes::from(bytes.clone()));
        let _ = decode_id(&bytes);
        let _ = inflate(&bytes, limit);
    }
}

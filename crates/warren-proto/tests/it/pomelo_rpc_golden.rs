//! pomelo-rpc (docs/protocols/pomelo-rpc.md, "Transports" and "Messages"): the sample client's
//! request, the server's response, error and buffered payloads byte for byte (the MQTT framing
//! around them is the gate's), and stream-pkg framing.

use bytes::{Bytes, BytesMut};
use proptest::collection::vec;
use proptest::prelude::*;
use serde_json::{Value, json};
use tokio_util::codec::Decoder;
use warren_proto::pomelo_rpc::{
    INVALID_REQUEST, PomeloRpcError, RpcMsg, decode_requests, encode_batch, encode_response,
    error_value,
};
use warren_proto::stream_pkg::{self, StreamPkgCodec, StreamPkgError};

const MAX: usize = 1 << 20;

const REQUEST: &[u8] = br#"{"id":0,"msg":{"namespace":"user","serverType":"test","service":"service","method":"echo","args":[["onReloadSkill",["210108"],{"type":"push","userOptions":{},"isPush":true}],"aaa"]}}"#;
const RESPONSE: &[u8] = br#"{"id":0,"resp":[null,["onReloadSkill",["210108"],{"type":"push","userOptions":{},"isPush":true}]]}"#;
const ERROR: &[u8] =
    br#"{"id":1,"resp":[{"msg":"no such namespace:nope","stack":"Error: no such namespace:nope"}]}"#;

#[test]
fn vector_lengths_match_the_publish_headers() {
    // `30 bb 01 00 03 'rpc' …`, `30 67 …`, `30 5f …`: remaining length = 5 + payload.
    assert_eq!(REQUEST.len() + 5, 0x3b + (0x01 << 7));
    assert_eq!(RESPONSE.len() + 5, 0x67);
    assert_eq!(ERROR.len() + 5, 0x5f);
}

#[test]
fn sample_request_and_echo_response() {
    let reqs = decode_requests(REQUEST, MAX).unwrap();
    assert_eq!(reqs.len(), 1);
    let req = &reqs[0];
    assert_eq!(req.id, json!(0));
    assert!(req.id.is_u64());
    assert_eq!(
        (&req.trace_id, &req.seq_id, &req.source),
        (&None, &None, &None)
    );
    let msg = req.msg.as_ref().unwrap();
    assert_eq!(
        (
            msg.namespace.as_str(),
            msg.server_type.as_str(),
            msg.service.as_str(),
            msg.method.as_str()
        ),
        ("user", "test", "service", "echo")
    );
    assert_eq!(msg.args.len(), 2);
    assert_eq!(msg.args[1], json!("aaa"));

    // echo(msg, data, cb) → cb(null, msg)
    let resp = [Value::Null, msg.args[0].clone()];
    assert_eq!(&encode_response(&req.id, &resp, None)[..], RESPONSE);
}

#[test]
fn error_response() {
    let resp = [error_value("no such namespace:nope")];
    assert_eq!(&encode_response(&json!(1), &resp, None)[..], ERROR);
    assert_eq!(
        error_value(INVALID_REQUEST),
        json!({"msg": "invalid request", "stack": "Error: invalid request"})
    );
}

#[test]
fn buffered_flush() {
    let a = encode_response(&json!(0), &[Value::Null, json!(1)], None);
    let b = encode_response(&json!(1), &[Value::Null, json!(2)], None);
    assert_eq!(
        &encode_batch(&[a, b])[..],
        br#"[{"id":0,"resp":[null,1]},{"id":1,"resp":[null,2]}]"#
    );
}

#[test]
fn request_missing_msg() {
    let reqs = decode_requests(br#"{"id":4}"#, MAX).unwrap();
    assert_eq!(reqs[0].id, json!(4));
    assert_eq!(reqs[0].msg, None);
    assert_eq!(
        &encode_response(&reqs[0].id, &[error_value(INVALID_REQUEST)], None)[..],
        br#"{"id":4,"resp":[{"msg":"invalid request","stack":"Error: invalid request"}]}"#
    );
}

#[test]
fn arrays_of_requests() {
    let payload = format!(
        "[{},{}]",
        String::from_utf8_lossy(REQUEST),
        r#"{"id":1,"msg":{"namespace":"sys","serverType":"s","service":"a","method":"b","args":[]}}"#
    );
    let reqs = decode_requests(payload.as_bytes(), MAX).unwrap();
    assert_eq!(reqs.len(), 2);
    assert_eq!(reqs[1].id, json!(1));
    assert_eq!(
        reqs[1].msg,
        Some(RpcMsg {
            namespace: "sys".into(),
            server_type: "s".into(),
            service: "a".into(),
            method: "b".into(),
            args: vec![],
        })
    );
}

#[test]
fn trace_keys() {
    let reqs = decode_requests(
        br#"{"remote":"x","seqId":2,"id":9,"traceId":"t-1","source":"conn","msg":{"namespace":"user","serverType":"s","service":"a","method":"b","args":[]}}"#,
        MAX,
    )
    .unwrap();
    let r = &reqs[0];
    assert_eq!(r.trace_id, Some(json!("t-1")));
    assert_eq!(r.seq_id, Some(json!(2)));
    assert_eq!(r.source, Some(json!("conn")));
    let null = Value::Null;
    let trace = (
        r.trace_id.as_ref().unwrap_or(&null),
        r.seq_id.as_ref().unwrap_or(&null),
        r.source.as_ref().unwrap_or(&null),
    );
    assert_eq!(
        &encode_response(&r.id, &[Value::Null, json!("ok")], Some(trace))[..],
        br#"{"id":9,"resp":[null,"ok"],"traceId":"t-1","seqId":2,"source":"conn"}"#
    );
}

#[test]
fn unparseable_payloads() {
    for bad in [&b""[..], b"{", b"id:0", b"\"x\"", b"[1]", b"[{}, null]"] {
        assert!(
            decode_requests(bad, MAX).is_err(),
            "{}",
            String::from_utf8_lossy(bad)
        );
    }
    assert!(matches!(
        decode_requests(REQUEST, REQUEST.len() - 1),
        Err(PomeloRpcError::TooLarge { .. })
    ));
}

#[test]
fn stream_pkg_frame_example() {
    let body = encode_response(&json!(1), &[Value::Null, json!("ok")], None);
    let mut wire = BytesMut::new();
    stream_pkg::encode(&body, &mut wire);
    let mut expected = vec![0x1b];
    expected.extend_from_slice(br#"{"id":1,"resp":[null,"ok"]}"#);
    assert_eq!(&wire[..], &expected[..]);

    let mut codec = StreamPkgCodec::new(MAX);
    assert_eq!(codec.decode(&mut wire).unwrap(), Some(body));
}

#[test]
fn stream_pkg_length_table() {
    let table: &[(usize, &[u8])] = &[
        (5, &[0x05]),
        (127, &[0x7f]),
        (128, &[0x81, 0x00]),
        (300, &[0x82, 0x2c]),
        (16384, &[0x81, 0x80, 0x00]),
        (2_097_151, &[0xff, 0xff, 0x7f]),
        (2_097_152, &[0x81, 0x80, 0x80, 0x00]),
    ];
    for &(n, prefix) in table {
        let mut len = BytesMut::new();
        stream_pkg::encode_len(n, &mut len);
        assert_eq!(&len[..], prefix, "encode {n}");

        let body = vec![b'x'; n];
        let mut wire = BytesMut::new();
        stream_pkg::encode(&body, &mut wire);
        assert_eq!(&wire[..prefix.len()], prefix);
        let got = stream_pkg::decode(&mut wire, n).unwrap().unwrap();
        assert_eq!(got.len(), n, "decode {n}");
        assert!(wire.is_empty());
    }
}

#[test]
fn stream_pkg_limits() {
    // 2097152 announced, limit 1 MiB: refused from the four prefix bytes alone.
    let mut buf = BytesMut::from(&[0x81, 0x80, 0x80, 0x00][..]);
    assert!(matches!(
        stream_pkg::decode(&mut buf, MAX),
        Err(StreamPkgError::TooLarge {
            size: 2_097_152,
            max: MAX
        })
    ));
    let mut buf = BytesMut::from(&[0x81, 0x80, 0x80, 0x80, 0x00][..]);
    assert!(matches!(
        stream_pkg::decode(&mut buf, usize::MAX),
        Err(StreamPkgError::LengthTooLong)
    ));
    let mut buf = BytesMut::from(&[0x00, b'x'][..]);
    assert!(matches!(
        stream_pkg::decode(&mut buf, MAX),
        Err(StreamPkgError::EmptyBody)
    ));
}

proptest! {
    /// Packages survive encode → decode however the stream is cut into reads.
    #[test]
    fn stream_pkg_chunking(
        bodies in vec(vec(any::<u8>(), 1..300), 0..5),
        chunk in 1usize..64,
    ) {
        let mut wire = BytesMut::new();
        for body in &bodies {
            stream_pkg::encode(body, &mut wire);
        }
        let mut codec = StreamPkgCodec::new(300);
        let mut buf = BytesMut::new();
        let mut got: Vec<Bytes> = Vec::new();
        for piece in wire.chunks(chunk) {
            buf.extend_from_slice(piece);
            while let Some(body) = codec.decode(&mut buf).unwrap() {
                got.push(body);
            }
        }
        prop_assert_eq!(got, bodies);
        prop_assert!(buf.is_empty());
    }

    /// Every length up to the four-byte limit survives encode → decode.
    #[test]
    fn stream_pkg_lengths(n in 1usize..(1 << 28)) {
        let mut buf = BytesMut::new();
        stream_pkg::encode_len(n, &mut buf);
        prop_assert!(buf.len() <= stream_pkg::MAX_LENGTH_BYTES);
        // The limit check reports the length it read.
        match stream_pkg::decode(&mut buf, n - 1) {
            Err(StreamPkgError::TooLarge { size, .. }) => prop_assert_eq!(size, n),
            other => prop_assert!(false, "{:?}", other),
        }
    }

    /// Arbitrary payloads never panic the request decoder.
    #[test]
    fn arbitrary_requests(data in vec(any::<u8>(), 0..64)) {
        let _ = decode_requests(&data, 64);
    }
}

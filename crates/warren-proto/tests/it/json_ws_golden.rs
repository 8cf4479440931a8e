//! JSON over WebSocket (docs/protocols/json-ws.md): the sample client exchange byte for byte, and
//! the decoder's leniency and strictness.

use proptest::prelude::*;
use serde_json::{Value, json};
use warren_proto::json_ws::{Frame, JsonWsError, decode, encode, loginback, reply};

const MAX: usize = 4096;

#[test]
fn sample_client_exchange() {
    let login = decode(
        br#"{"tpc":"login","func":"login","args":["guid","md5"],"cb":""}"#,
        MAX,
    )
    .unwrap();
    assert_eq!(login.func, "login");
    assert_eq!(login.args, vec![json!("guid"), json!("md5")]);
    assert_eq!(
        &encode(&loginback(0))[..],
        br#"{"tpc":"","func":"loginback","cb":"","args":[0]}"#
    );
    assert_eq!(
        &encode(&loginback(1))[..],
        br#"{"tpc":"","func":"loginback","cb":"","args":[1]}"#
    );

    let call = decode(
        br#"{"tpc":"unknown","func":"test","args":["arg1","arg2"],"cb":"callback"}"#,
        MAX,
    )
    .unwrap();
    assert_eq!(
        call,
        Frame {
            tpc: "unknown".into(),
            func: "test".into(),
            cb: "callback".into(),
            args: vec![json!("arg1"), json!("arg2")],
            error: None,
            traceparent: None,
        }
    );
    // The global `test` function concatenates its two arguments.
    let joined: String = call.args.iter().filter_map(Value::as_str).collect();
    assert_eq!(
        &encode(&reply(&call.cb, vec![json!(joined)]))[..],
        br#"{"tpc":"","func":"callback","cb":"","args":["arg1arg2"]}"#
    );
}

#[test]
fn keys_in_any_order_and_whitespace() {
    let a = decode(br#"{"cb":"c","args":[1],"func":"f","tpc":"t"}"#, MAX).unwrap();
    let b = decode(
        b" {\n\t\"tpc\" : \"t\", \"func\":\"f\",\"cb\":\"c\",\"args\":[ 1 ]}\r\n",
        MAX,
    )
    .unwrap();
    assert_eq!(a, b);
    assert_eq!(
        &encode(&a)[..],
        br#"{"tpc":"t","func":"f","cb":"c","args":[1]}"#
    );
}

#[test]
fn integers_stay_integers() {
    let f = decode(
        br#"{"func":"f","args":[1,-1,18446744073709551615,2.0,1e3]}"#,
        MAX,
    )
    .unwrap();
    assert!(f.args[0].is_u64());
    assert!(f.args[1].is_i64());
    assert_eq!(f.args[2].as_u64(), Some(u64::MAX));
    assert!(f.args[3].is_f64());
    assert_eq!(
        &encode(&f)[..],
        br#"{"tpc":"","func":"f","cb":"","args":[1,-1,18446744073709551615,2.0,1000.0]}"#
    );
}

#[test]
fn floats_echo_exactly() {
    let wire = br#"{"tpc":"","func":"f","cb":"","args":[0.1,0.30000000000000004,1.7976931348623157e+308,5e-324,-0.0]}"#;
    assert_eq!(&encode(&decode(wire, MAX).unwrap())[..], wire);
}

#[test]
fn non_objects_and_oversize_fail() {
    for bad in [&b"[]"[..], b"null", b"1", b"\"s\"", b"true"] {
        assert!(
            matches!(decode(bad, MAX), Err(JsonWsError::NotObject)),
            "{}",
            String::from_utf8_lossy(bad)
        );
    }
    for bad in [&b"not json"[..], b"{\"tpc\":", b"\xff", b""] {
        assert!(matches!(decode(bad, MAX), Err(JsonWsError::Json(_))));
    }
    let big = format!(r#"{{"args":["{}"]}}"#, "x".repeat(MAX));
    assert!(matches!(
        decode(big.as_bytes(), MAX),
        Err(JsonWsError::TooLarge { max: MAX, .. })
    ));
    assert!(decode(big.as_bytes(), big.len()).is_ok());
}

proptest! {
    /// Every frame survives encode → decode.
    #[test]
    fn round_trip(
        tpc in "\\PC{0,8}",
        func in "\\PC{0,8}",
        cb in "\\PC{0,8}",
        ints in proptest::collection::vec(any::<i64>(), 0..4),
        error in proptest::option::of("\\PC{0,8}"),
        traceparent in proptest::option::of("\\PC{0,8}"),
    ) {
        let args = ints.into_iter().map(Value::from).collect();
        let f = Frame { tpc, func, cb, args, error, traceparent };
        prop_assert_eq!(decode(&encode(&f), usize::MAX).unwrap(), f);
    }

    /// Arbitrary bytes never panic the decoder.
    #[test]
    fn arbitrary_bytes(data in proptest::collection::vec(any::<u8>(), 0..64)) {
        let _ = decode(&data, 64);
    }
}

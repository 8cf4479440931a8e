//! Node frames: golden bytes of a call with and without a trace context (a frame written before
//! the trace flag existed still decodes), and property round trips of calls and replies.

use bytes::Bytes;
use proptest::prelude::*;
use warren_proto::node_frame::{CallRef, NodeFrame, decode, encode_call, encode_reply_ok};
use warren_proto::trace_context::{SpanId, TraceContext, TraceId};

/// A call without session: `W 2`, kind 1, id 7, timeout 1000, sent 5, flags (1 = reply, plus
/// 4 = trace when traced), [trace], from "a", instance "I", handler "H", body "{}".
fn golden(trace: bool) -> Vec<u8> {
    let mut v = vec![b'W', 2, 1];
    v.extend_from_slice(&7u64.to_le_bytes());
    v.extend_from_slice(&1000u64.to_le_bytes());
    v.extend_from_slice(&5u64.to_le_bytes());
    v.push(if trace { 1 | 4 } else { 1 });
    if trace {
        v.extend_from_slice(&[0x4b; 16]);
        v.extend_from_slice(&[0x00, 0xf0, 0x67, 0xaa, 0x0b, 0xa9, 0x02, 0xb7]);
        v.push(1);
    }
    v.extend_from_slice(b"\x01\x00a\x01\x00I\x01\x00H{}");
    v
}

fn trace() -> TraceContext {
    TraceContext {
        trace_id: TraceId([0x4b; 16]),
        span_id: SpanId([0x00, 0xf0, 0x67, 0xaa, 0x0b, 0xa9, 0x02, 0xb7]),
        flags: 1,
    }
}

fn call(trace: Option<TraceContext>) -> CallRef<'static> {
    CallRef {
        id: 7,
        from: "a",
        instance: "I",
        handler: "H",
        session: None,
        body: b"{}",
        timeout_ms: 1000,
        sent_ms: 5,
        reply: true,
        trace,
    }
}

#[test]
fn a_call_without_trace_keeps_its_bytes() {
    assert_eq!(&encode_call(&call(None)).unwrap()[..], &golden(false)[..]);
    // the bytes of a node that knows no trace flag decode, with no trace
    match decode(Bytes::from(golden(false))).unwrap() {
        NodeFrame::Call {
            trace,
            handler,
            body,
            ..
        } => {
            assert_eq!(trace, None);
            assert_eq!((handler.as_str(), &body[..]), ("H", &b"{}"[..]));
        }
        other => panic!("not a call: {other:?}"),
    }
}

#[test]
fn a_traced_call_carries_25_more_bytes_after_its_flags() {
    let wire = encode_call(&call(Some(trace()))).unwrap();
    assert_eq!(&wire[..], &golden(true)[..]);
    match decode(wire.clone()).unwrap() {
        NodeFrame::Call { trace: t, from, .. } => {
            assert_eq!(t, Some(trace()));
            assert_eq!(from, "a");
        }
        other => panic!("not a call: {other:?}"),
    }
    // cut anywhere inside the trace context: refused, never a panic
    for cut in 28..28 + 25 {
        assert!(decode(wire.slice(..cut)).is_err(), "cut at {cut}");
    }
}

fn any_trace() -> impl Strategy<Value = Option<TraceContext>> {
    proptest::option::of((any::<[u8; 16]>(), any::<[u8; 8]>(), any::<u8>()).prop_map(
        |(t, s, flags)| TraceContext {
            trace_id: TraceId(t),
            span_id: SpanId(s),
            flags,
        },
    ))
}

proptest! {
    #[test]
    fn calls_round_trip(
        id in any::<u64>(),
        timeout_ms in any::<u64>(),
        sent_ms in any::<u64>(),
        reply in any::<bool>(),
        from in "\\PC{0,8}",
        instance in "\\PC{0,8}",
        handler in "\\PC{0,8}",
        body in proptest::collection::vec(any::<u8>(), 0..64),
        trace in any_trace(),
    ) {
        let c = CallRef {
            id, from: &from, instance: &instance, handler: &handler, session: None,
            body: &body, timeout_ms, sent_ms, reply, trace,
        };
        let wire = encode_call(&c).unwrap();
        let NodeFrame::Call {
            id: i, from: f, instance: n, handler: h, session, body: b, timeout_ms: t,
            sent_ms: s, reply: r, trace: tr,
        } = decode(wire).unwrap() else {
            panic!("not a call");
        };
        prop_assert_eq!((i, t, s, r, tr), (id, timeout_ms, sent_ms, reply, trace));
        prop_assert_eq!((f, n, h), (from, instance, handler));
        prop_assert!(session.is_none());
        prop_assert_eq!(&b[..], &body[..]);
    }

    #[test]
    fn replies_round_trip(id in any::<u64>(), body in proptest::collection::vec(any::<u8>(), 0..64)) {
        let wire = encode_reply_ok(id, &body);
        prop_assert_eq!(
            decode(wire).unwrap(),
            NodeFrame::Reply { id, result: Ok(Bytes::from(body)) }
        );
    }

    #[test]
    fn arbitrary_bytes_never_panic(raw in proptest::collection::vec(any::<u8>(), 0..96)) {
        let mut v = vec![b'W', 2, 1];
        v.extend_from_slice(&raw);
        let _ = decode(Bytes::from(v));
    }
}

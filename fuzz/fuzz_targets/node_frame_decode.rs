//! Fuzz target for the frames nodes send each other over a broker: arbitrary bytes must never
//! make `node_frame::decode` panic, and every frame it accepts must encode back to a frame that
//! decodes to the same thing.

#![no_main]
#![forbid(unsafe_code)]

use bytes::Bytes;
use libfuzzer_sys::fuzz_target;
use warren_proto::node_frame::{
    CallRef, NodeFrame, decode, encode_call, encode_reply_err, encode_reply_ok,
};

fuzz_target!(|data: &[u8]| {
    let Ok(frame) = decode(Bytes::copy_from_slice(data)) else {
        return;
    };
    let again = match &frame {
        NodeFrame::Call {
            id,
            from,
            instance,
            handler,
            session,
            body,
            timeout_ms,
            sent_ms,
            reply,
            trace,
        } => encode_call(&CallRef {
            id: *id,
            from,
            instance,
            handler,
            session: session.as_ref().map(|s| s.as_session_ref()),
            body,
            timeout_ms: *timeout_ms,
            sent_ms: *sent_ms,
            reply: *reply,
            trace: *trace,
        })
        .expect("a decoded call encodes"),
        NodeFrame::Reply { id, result: Ok(b) } => encode_reply_ok(*id, b),
        NodeFrame::Reply {
            id,
            result: Err((label, detail)),
        } => encode_reply_err(*id, label, detail).expect("a decoded error encodes"),
    };
    assert_eq!(decode(again).expect("an encoded frame decodes"), frame);
});

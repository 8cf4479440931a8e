//! Fuzz target for pomelo-rpc request payloads: arbitrary bytes must never make
//! `decode_requests` panic, the size limit must hold, and every decoded call must survive
//! `encode_request` → `decode_requests`, and its response must parse with the same id.

#![no_main]
#![forbid(unsafe_code)]

use libfuzzer_sys::fuzz_target;
use warren_proto::pomelo_rpc::{
    PomeloRpcError, decode_requests, encode_batch, encode_request, encode_response, error_value,
};

fuzz_target!(|data: &[u8]| {
    for max in [16, 1 << 20] {
        let requests = match decode_requests(data, max) {
            Ok(requests) => requests,
            Err(PomeloRpcError::TooLarge { size, .. }) => {
                assert!(size > max);
                continue;
            }
            Err(e) => {
                assert!(!e.kind().is_empty());
                continue;
            }
        };
        assert!(data.len() <= max);
        let mut responses = Vec::new();
        for request in &requests {
            let response = match &request.msg {
                Some(msg) => {
                    let wire = encode_request(&request.id, msg);
                    let again = decode_requests(&wire, usize::MAX).expect("a request decodes");
                    assert_eq!(again.len(), 1);
                    assert_eq!(again[0].id, request.id);
                    assert_eq!(again[0].msg.as_ref(), Some(msg));
                    encode_response(&request.id, &msg.args, None)
                }
                None => encode_response(&request.id, &[error_value("invalid request")], None),
            };
            let parsed = decode_requests(&response, usize::MAX).expect("a response parses");
            assert_eq!(parsed.len(), 1);
            assert_eq!(parsed[0].id, request.id);
            responses.push(response);
        }
        let batch = encode_batch(&responses);
        let parsed = decode_requests(&batch, usize::MAX).expect("a batch parses");
        assert_eq!(parsed.len(), responses.len());
    }
});

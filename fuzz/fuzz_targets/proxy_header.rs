//! Fuzz target for the PROXY protocol header reader: arbitrary bytes must never make
//! `warren::gate::proxy::parse_header` panic, it must never claim a header longer than the bytes
//! it was given nor ask for fewer bytes than it has or more than `HEADER_MAX`, and reading the
//! way the listener does (only as many bytes as it asks for) must stop exactly at the header's
//! end and reach the same decision as parsing all the bytes at once.

#![no_main]
#![forbid(unsafe_code)]

use libfuzzer_sys::fuzz_target;
use warren::gate::proxy::{HEADER_MAX, Parsed, ProxyError, parse_header};

/// The decision without the error's text, for comparing two runs.
#[derive(Debug, PartialEq, Eq)]
enum Outcome {
    Parsed(Parsed),
    Missing,
    Invalid,
}

fn outcome(r: Result<Parsed, ProxyError>) -> Outcome {
    match r {
        Ok(p) => Outcome::Parsed(p),
        Err(ProxyError::Missing) => Outcome::Missing,
        Err(ProxyError::Invalid(_)) => Outcome::Invalid,
        Err(ProxyError::Io(e)) => panic!("parse_header does no I/O, yet returned {e}"),
    }
}

/// The v2 signature, HAProxy's 12 fixed bytes.
const V2_SIGNATURE: &[u8; 12] = b"\r\n\r\n\0\r\nQUIT\n";

/// The bytes to parse: the first input byte picks a start the fuzzer would rarely guess (a v1
/// prefix, the v2 signature, the v2 signature with a length that fits what follows), the rest
/// follows it as is.
fn input(data: &[u8]) -> Vec<u8> {
    let Some((&mode, rest)) = data.split_first() else {
        return Vec::new();
    };
    let mut out = Vec::with_capacity(rest.len() + 16);
    match mode % 6 {
        0 => {}
        1 => out.extend_from_slice(b"PROXY "),
        2 => out.extend_from_slice(b"PROXY TCP4 "),
        3 => out.extend_from_slice(b"PROXY TCP6 "),
        4 => out.extend_from_slice(V2_SIGNATURE),
        _ => {
            out.extend_from_slice(V2_SIGNATURE);
            let (fixed, tail) = rest.split_at(rest.len().min(2));
            out.extend_from_slice(fixed);
            let len = u16::try_from(tail.len()).unwrap_or(u16::MAX);
            out.extend_from_slice(&len.to_be_bytes());
            out.extend_from_slice(tail);
            return out;
        }
    }
    out.extend_from_slice(rest);
    out
}

fuzz_target!(|raw: &[u8]| {
    let buf = input(raw);
    let data = buf.as_slice();
    let whole = outcome(parse_header(data));
    match whole {
        Outcome::Parsed(Parsed::Header { len, .. }) => {
            assert!(len <= data.len(), "header of {len} bytes in {}", data.len());
            assert!(len <= HEADER_MAX, "header of {len} bytes");
        }
        Outcome::Parsed(Parsed::NeedMore { total }) => {
            assert!(
                total > data.len(),
                "asks for {total} bytes with {}",
                data.len()
            );
            assert!(total <= HEADER_MAX, "asks for {total} bytes");
        }
        Outcome::Missing | Outcome::Invalid => {}
    }

    // read as the listener does: only the bytes asked for, starting from none
    let mut have = 0;
    let stepwise = loop {
        match outcome(parse_header(&data[..have])) {
            Outcome::Parsed(Parsed::NeedMore { total }) if total <= data.len() => {
                assert!(total > have, "asks for {total} bytes with {have}");
                have = total;
            }
            Outcome::Parsed(Parsed::Header { len, source }) => {
                assert_eq!(len, have, "the reader read past the header's end");
                break Outcome::Parsed(Parsed::Header { len, source });
            }
            other => break other,
        }
    };
    // the header is decided by its own bytes: what follows it changes nothing
    assert_eq!(stepwise, whole);
});

//! Trace context: the W3C `traceparent` of one client request, as it travels from the gate
//! through the bus to the module and back (docs/configuration.md, "Traces and logs").
//!
//! A request keeps one 16-byte trace id end to end, so every log line of that request, on every
//! node it crosses, carries the same `trace_id`; the 8-byte span id names the caller's span, and
//! the flags byte carries the W3C `sampled` bit. The text form is W3C Trace Context level 1:
//!
//! ```text
//! 00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01
//! version-trace id (32 hex)-span id (16 hex)-flags (2 hex)
//! ```
//!
//! In a node frame the same context is 25 raw bytes ([`crate::node_frame`]).

use std::fmt;

/// The W3C `sampled` flag: the caller records this trace.
pub const SAMPLED: u8 = 1;

/// A 16-byte trace id: the same for every span of one request, on every node.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct TraceId(pub [u8; 16]);

/// An 8-byte span id: one step of a request (the gate's request, a node's call).
#[derive(Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct SpanId(pub [u8; 8]);

/// The trace context a call carries: which request it belongs to and which span made it.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct TraceContext {
    /// The request's trace id.
    pub trace_id: TraceId,
    /// The caller's span id.
    pub span_id: SpanId,
    /// W3C trace flags ([`SAMPLED`]).
    pub flags: u8,
}

fn write_hex(f: &mut fmt::Formatter<'_>, bytes: &[u8]) -> fmt::Result {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let mut buf = [0u8; 32];
    for (i, b) in bytes.iter().enumerate().take(16) {
        buf[2 * i] = HEX[usize::from(b >> 4)];
        buf[2 * i + 1] = HEX[usize::from(b & 0xf)];
    }
    let text = std::str::from_utf8(&buf[..2 * bytes.len().min(16)]).map_err(|_| fmt::Error)?;
    f.write_str(text)
}

impl fmt::Display for TraceId {
    /// 32 lowercase hex digits, as in a `traceparent` and in log lines.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write_hex(f, &self.0)
    }
}

impl fmt::Debug for TraceId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

impl fmt::Display for SpanId {
    /// 16 lowercase hex digits.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write_hex(f, &self.0)
    }
}

impl fmt::Debug for SpanId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

impl fmt::Display for TraceContext {
    /// The `traceparent` form: `00-<trace id>-<span id>-<flags>`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "00-{}-{}-{:02x}",
            self.trace_id, self.span_id, self.flags
        )
    }
}

impl fmt::Debug for TraceContext {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

fn hex_digit(c: u8) -> Option<u8> {
    match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        _ => None,
    }
}

fn parse_hex<const N: usize>(text: &[u8]) -> Option<[u8; N]> {
    if text.len() != 2 * N {
        return None;
    }
    let mut out = [0u8; N];
    for (i, pair) in text.chunks_exact(2).enumerate() {
        out[i] = (hex_digit(pair[0])? << 4) | hex_digit(pair[1])?;
    }
    Some(out)
}

impl TraceContext {
    /// Read a W3C `traceparent` value, as a client sends it. Version `00` must be exactly
    /// 55 characters; a later version is read by its first four fields (as the W3C text
    /// asks); version `ff`, upper-case hex, and all-zero trace or span ids are refused.
    pub fn parse(text: &str) -> Option<TraceContext> {
        let b = text.trim().as_bytes();
        if b.len() < 55 {
            return None;
        }
        let version = parse_hex::<1>(&b[0..2])?[0];
        if version == 0xff || (version == 0 && b.len() != 55) || (b.len() > 55 && b[55] != b'-') {
            return None;
        }
        if b[2] != b'-' || b[35] != b'-' || b[52] != b'-' {
            return None;
        }
        let trace_id = parse_hex::<16>(&b[3..35])?;
        let span_id = parse_hex::<8>(&b[36..52])?;
        let flags = parse_hex::<1>(&b[53..55])?[0];
        if trace_id == [0; 16] || span_id == [0; 8] {
            return None;
        }
        Some(TraceContext {
            trace_id: TraceId(trace_id),
            span_id: SpanId(span_id),
            flags,
        })
    }

    /// The same trace, as seen from a new span `span_id` (a call the holder makes).
    pub fn child(&self, span_id: SpanId) -> TraceContext {
        TraceContext { span_id, ..*self }
    }

    /// Whether the caller samples this trace (the W3C `sampled` flag).
    pub fn sampled(&self) -> bool {
        self.flags & SAMPLED != 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const W3C: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

    #[test]
    fn the_w3c_example_reads_and_prints_back() {
        let t = TraceContext::parse(W3C).unwrap();
        assert_eq!(t.trace_id.to_string(), "4bf92f3577b34da6a3ce929d0e0e4736");
        assert_eq!(t.span_id.to_string(), "00f067aa0ba902b7");
        assert!(t.sampled());
        assert_eq!(t.to_string(), W3C);
        let c = t.child(SpanId([1; 8]));
        assert_eq!((c.trace_id, c.flags), (t.trace_id, t.flags));
    }

    #[test]
    fn bad_values_are_refused() {
        for bad in [
            "",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7",
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-x",
            "00_4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e473é-00f067aa0ba902b7-01",
        ] {
            assert_eq!(TraceContext::parse(bad), None, "{bad:?}");
        }
        // a later version may carry more fields after the four it shares with 00
        assert!(
            TraceContext::parse("01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra")
                .is_some()
        );
    }
}

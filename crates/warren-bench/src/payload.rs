//! The header every `pubsub` payload starts with, so a subscriber can tell who sent a message,
//! which one it is (loss and order accounting) and when it was sent (latency), with no state
//! shared with the publisher beyond the clock's origin.

/// Bytes taken by the header: publisher index (u32), sequence number (u64), send time (u64 ns).
pub const HEADER_LEN: usize = 20;

/// What a subscriber learns from a payload.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Stamp {
    /// Index of the publishing connection.
    pub publisher: u32,
    /// 0-based sequence number within that publisher.
    pub seq: u64,
    /// Send time in nanoseconds since the run's clock origin.
    pub sent_ns: u64,
}

/// Writes `stamp` over the first [`HEADER_LEN`] bytes of `payload`; a shorter payload is left
/// untouched (the scenario refuses such sizes up front).
pub fn write(payload: &mut [u8], stamp: Stamp) {
    if let Some(h) = payload.get_mut(..HEADER_LEN) {
        h[..4].copy_from_slice(&stamp.publisher.to_be_bytes());
        h[4..12].copy_from_slice(&stamp.seq.to_be_bytes());
        h[12..20].copy_from_slice(&stamp.sent_ns.to_be_bytes());
    }
}

/// Reads the header; `None` when the payload is too short to hold one (not ours).
pub fn read(payload: &[u8]) -> Option<Stamp> {
    let h = payload.get(..HEADER_LEN)?;
    let publisher = u32::from_be_bytes(h[..4].try_into().ok()?);
    let seq = u64::from_be_bytes(h[4..12].try_into().ok()?);
    let sent_ns = u64::from_be_bytes(h[12..20].try_into().ok()?);
    Some(Stamp {
        publisher,
        seq,
        sent_ns,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips() {
        let mut p = vec![b'x'; 64];
        let s = Stamp {
            publisher: 3,
            seq: 1 << 40,
            sent_ns: 123_456_789,
        };
        write(&mut p, s);
        assert_eq!(read(&p), Some(s));
        assert_eq!(p[HEADER_LEN..], [b'x'; 44]);
    }

    #[test]
    fn short_payloads_are_not_ours() {
        assert_eq!(read(&[0; HEADER_LEN - 1]), None);
        let mut short = [7u8; 5];
        write(&mut short, read(&[0; HEADER_LEN]).unwrap());
        assert_eq!(short, [7; 5]);
    }
}

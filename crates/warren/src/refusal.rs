//! Refusals: the one log line and the metric that every refused connection, packet or call gets.
//!
//! An attacker decides how often the gate refuses something, so the log line is rate-limited per
//! reason kind: up to [`LINES_PER_SECOND`] lines of a kind each second; past that, lines are
//! counted, and the next line that gets out says how many of its kind were left out. The metric
//! `warren_refusals_total{kind}` counts every refusal, logged or not.

use parking_lot::Mutex;
use std::collections::HashMap;
use std::fmt::Display;
use std::net::SocketAddr;
use std::time::Instant;

/// Log lines of one kind per second; the rest are counted and reported with the next line.
pub(crate) const LINES_PER_SECOND: u32 = 10;

struct Window {
    started: Instant,
    logged: u32,
    suppressed: u64,
}

static WINDOWS: Mutex<Option<HashMap<&'static str, Window>>> = Mutex::new(None);

/// Whether a line of `kind` may be logged now, and how many of its kind were left out since the
/// last one that was.
fn admit(kind: &'static str) -> Option<u64> {
    let mut guard = WINDOWS.lock();
    let windows = guard.get_or_insert_with(HashMap::new);
    let now = Instant::now();
    let w = windows.entry(kind).or_insert(Window {
        started: now,
        logged: 0,
        suppressed: 0,
    });
    if now.duration_since(w.started).as_secs() >= 1 {
        w.started = now;
        w.logged = 0;
    }
    if w.logged < LINES_PER_SECOND {
        w.logged += 1;
        Some(std::mem::take(&mut w.suppressed))
    } else {
        w.suppressed += 1;
        None
    }
}

/// Record a refusal: count it under `kind` (a short snake_case word: `max_conn`, `acl`,
/// `topic_levels`…) and log one WARN line with the peer and the reason, rate-limited per kind.
pub(crate) fn refuse(peer: &SocketAddr, kind: &'static str, reason: impl Display) {
    metrics::counter!("warren_refusals_total", "kind" => kind).increment(1);
    if let Some(suppressed) = admit(kind) {
        if suppressed > 0 {
            tracing::warn!(%peer, kind, reason = %reason, suppressed, "refused ({suppressed} more of this kind not logged)");
        } else {
            tracing::warn!(%peer, kind, reason = %reason, "refused");
        }
    }
}

/// As [`refuse`], at INFO: for refusals that are a client's ordinary mistake rather than abuse
/// (a denied topic, a call before login).
pub(crate) fn deny(peer: &SocketAddr, kind: &'static str, reason: impl Display) {
    metrics::counter!("warren_refusals_total", "kind" => kind).increment(1);
    if let Some(suppressed) = admit(kind) {
        tracing::info!(%peer, kind, reason = %reason, suppressed, "denied");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_are_limited_per_kind_and_the_gap_is_reported() {
        let mut out = 0;
        for _ in 0..100 {
            if admit("test_flood").is_some() {
                out += 1;
            }
        }
        assert_eq!(out, LINES_PER_SECOND);
        // another kind has its own allowance
        assert_eq!(admit("test_other"), Some(0));
    }
}

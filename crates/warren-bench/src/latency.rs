//! Latency histograms: HDR histograms in nanoseconds, sharded so that a thousand subscriber
//! tasks can record without one shared lock, merged once at the end.

use parking_lot::{Mutex, MutexGuard};

use hdrhistogram::Histogram;
use serde::Serialize;

/// Highest latency the histograms hold; anything slower is recorded as this.
const MAX_NS: u64 = 60_000_000_000;

/// A histogram of nanoseconds from 1 ns to 60 s with three significant digits.
pub fn histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, MAX_NS, 3).expect("1 ns .. 60 s with 3 digits is a valid range")
}

/// Latency samples recorded by many tasks: task `i` records into shard `i % shards`, taking the
/// shard's lock once per batch of messages.
#[derive(Debug)]
pub struct Latency {
    shards: Box<[Mutex<Histogram<u64>>]>,
}

impl Latency {
    /// `shards` empty histograms (at least one).
    pub fn new(shards: usize) -> Self {
        Self {
            shards: (0..shards.max(1))
                .map(|_| Mutex::new(histogram()))
                .collect(),
        }
    }

    /// The shard task `i` records into.
    pub fn shard(&self, i: usize) -> MutexGuard<'_, Histogram<u64>> {
        let m = &self.shards[i % self.shards.len()];
        m.lock()
    }

    /// All shards added together.
    pub fn merged(&self) -> Histogram<u64> {
        let mut all = histogram();
        for i in 0..self.shards.len() {
            // Same bounds everywhere, so adding cannot fail.
            let _ = all.add(&*self.shard(i));
        }
        all
    }
}

/// The percentiles a report shows, in microseconds.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Percentiles {
    /// Samples.
    pub count: u64,
    /// Arithmetic mean.
    pub mean: f64,
    /// Median.
    pub p50: f64,
    /// 90th percentile.
    pub p90: f64,
    /// 99th percentile.
    pub p99: f64,
    /// 99.9th percentile.
    pub p999: f64,
    /// Largest sample.
    pub max: f64,
}

impl Percentiles {
    /// The percentiles of `h` (recorded in ns); `None` when it holds no sample.
    pub fn of(h: &Histogram<u64>) -> Option<Self> {
        if h.is_empty() {
            return None;
        }
        let us = |ns: u64| round1(ns as f64 / 1000.0);
        Some(Self {
            count: h.len(),
            mean: round1(h.mean() / 1000.0),
            p50: us(h.value_at_quantile(0.50)),
            p90: us(h.value_at_quantile(0.90)),
            p99: us(h.value_at_quantile(0.99)),
            p999: us(h.value_at_quantile(0.999)),
            max: us(h.max()),
        })
    }
}

/// Rounds to one decimal, for readable JSON.
pub fn round1(x: f64) -> f64 {
    (x * 10.0).round() / 10.0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_of_a_known_distribution() {
        let l = Latency::new(4);
        // 1..=1000 µs spread over the shards.
        for i in 1..=1000u64 {
            l.shard(i as usize).saturating_record(i * 1000);
        }
        let p = Percentiles::of(&l.merged()).unwrap();
        assert_eq!(p.count, 1000);
        assert!((p.p50 - 500.0).abs() <= 1.0, "{p:?}");
        assert!((p.p90 - 900.0).abs() <= 1.0, "{p:?}");
        assert!((p.p99 - 990.0).abs() <= 1.0, "{p:?}");
        assert!((p.max - 1000.0).abs() <= 1.0, "{p:?}");
        assert!((p.mean - 500.5).abs() <= 1.0, "{p:?}");
    }

    #[test]
    fn empty_and_out_of_range() {
        let l = Latency::new(0);
        assert_eq!(Percentiles::of(&l.merged()), None);
        l.shard(7).saturating_record(u64::MAX);
        let p = Percentiles::of(&l.merged()).unwrap();
        assert!(p.max >= 59_000_000.0, "{p:?}");
    }

    #[test]
    fn rounding() {
        assert_eq!(round1(1.25), 1.3);
        assert_eq!(round1(1234.04), 1234.0);
    }
}

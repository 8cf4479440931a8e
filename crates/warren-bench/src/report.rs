//! What a run prints: a human summary, one JSON line (the machine-readable record that
//! `bench/compare` collects), and a progress line on stderr once per second while it runs.

use std::fmt::Write as _;
use std::time::Duration;

use serde::Serialize;
use serde_json::{Map, Value};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::latency::{Percentiles, round1};

/// The outcome of one run, serialised as the JSON line.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    /// `pubsub`, `request`, `pomelo-request`, `connections` or `broker-echo`.
    pub scenario: &'static str,
    /// The server address as resolved.
    pub target: String,
    /// The `--label` given, if any.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub label: Option<String>,
    /// The scenario's options.
    pub params: Map<String, Value>,
    /// Seconds actually measured (shorter than asked when interrupted).
    pub duration_s: f64,
    /// Seconds of warm-up before measuring.
    pub warmup_s: f64,
    /// Messages (or requests) sent over the whole run, warm-up included.
    pub published: u64,
    /// Messages (or replies) received over the whole run, warm-up included.
    pub delivered: u64,
    /// Sent and never received (after the drain wait).
    pub lost: u64,
    /// Connection or protocol errors during the run, and error replies.
    pub errors: u64,
    /// Messages (or requests) sent per second while measuring.
    pub published_per_s: f64,
    /// Messages (or replies) received per second while measuring.
    pub delivered_per_s: f64,
    /// Replies per second (`request`, `pomelo-request` and `broker-echo` only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub requests_per_s: Option<f64>,
    /// End-to-end latency while measuring, in microseconds.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub latency_us: Option<Percentiles>,
    /// The server's resident memory before the load, KiB (with `--pid`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rss_before_kib: Option<u64>,
    /// The server's resident memory under load, KiB (with `--pid`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rss_after_kib: Option<u64>,
    /// The server's peak resident memory so far, KiB (with `--pid`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rss_peak_kib: Option<u64>,
    /// Scenario-specific figures (stalls, duplicates, connect rate, bytes per connection, …).
    #[serde(flatten)]
    pub extra: Map<String, Value>,
    /// The first error seen, for diagnosis.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub first_error: Option<String>,
    /// Stopped early by Ctrl-C or SIGTERM.
    pub interrupted: bool,
}

impl Report {
    /// An empty report for `scenario` against `target`.
    pub fn new(scenario: &'static str, target: String, label: Option<String>) -> Self {
        Self {
            scenario,
            target,
            label,
            params: Map::new(),
            duration_s: 0.0,
            warmup_s: 0.0,
            published: 0,
            delivered: 0,
            lost: 0,
            errors: 0,
            published_per_s: 0.0,
            delivered_per_s: 0.0,
            requests_per_s: None,
            latency_us: None,
            rss_before_kib: None,
            rss_after_kib: None,
            rss_peak_kib: None,
            extra: Map::new(),
            first_error: None,
            interrupted: false,
        }
    }

    /// Adds an option to `params`.
    pub fn param(&mut self, key: &str, value: impl Into<Value>) {
        self.params.insert(key.to_owned(), value.into());
    }

    /// Adds a scenario-specific figure.
    pub fn extra(&mut self, key: &str, value: impl Into<Value>) {
        self.extra.insert(key.to_owned(), value.into());
    }

    /// Adds the CPU figures of the measured span: `server_cpu_pct` and `generator_cpu_pct`
    /// (100 = one core busy), and `server_cpu_ns_per_msg` over `messages` (deliveries or
    /// requests). A generator near 100 % means the figures are the generator's limit.
    pub fn cpu(&mut self, used: Option<crate::CpuUsed>, measured: Duration, messages: u64) {
        let Some((server, generator)) = used else {
            return;
        };
        let secs = measured.as_secs_f64();
        if secs <= 0.0 {
            return;
        }
        if let Some(s) = server {
            self.extra("server_cpu_pct", round1(100.0 * s.as_secs_f64() / secs));
            if messages > 0 {
                self.extra(
                    "server_cpu_ns_per_msg",
                    round1(s.as_nanos() as f64 / messages as f64),
                );
            }
        }
        if let Some(g) = generator {
            self.extra("generator_cpu_pct", round1(100.0 * g.as_secs_f64() / secs));
        }
    }

    /// The JSON line (no newline).
    pub fn json_line(&self) -> String {
        serde_json::to_string(self).unwrap_or_else(|e| format!("{{\"error\":\"{e}\"}}"))
    }

    /// The human summary (several lines, newline-terminated).
    pub fn human(&self) -> String {
        let mut s = String::new();
        let label = self
            .label
            .as_deref()
            .map(|l| format!(" ({l})"))
            .unwrap_or_default();
        let params: Vec<String> = self
            .params
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect();
        let _ = writeln!(s, "{} → {}{}", self.scenario, self.target, label);
        let _ = writeln!(s, "  params      {}", params.join(" "));
        let interrupted = if self.interrupted {
            " (interrupted)"
        } else {
            ""
        };
        if self.scenario == "connections" {
            let _ = writeln!(s, "  held        {:.1} s{interrupted}", self.duration_s);
        } else {
            let _ = writeln!(
                s,
                "  measured    {:.1} s after {:.1} s warm-up{interrupted}",
                self.duration_s, self.warmup_s,
            );
        }
        match self.scenario {
            "connections" => {}
            "request" | "pomelo-request" | "broker-echo" => {
                let _ = writeln!(
                    s,
                    "  requests    {}/s  ({} sent, {} replies, {} unanswered, {} errors)",
                    group(self.requests_per_s.unwrap_or(0.0)),
                    group(self.published as f64),
                    group(self.delivered as f64),
                    group(self.lost as f64),
                    group(self.errors as f64),
                );
            }
            _ => {
                let _ = writeln!(
                    s,
                    "  published   {}/s  ({} total)",
                    group(self.published_per_s),
                    group(self.published as f64)
                );
                let _ = writeln!(
                    s,
                    "  delivered   {}/s  ({} total, {} lost, {} errors)",
                    group(self.delivered_per_s),
                    group(self.delivered as f64),
                    group(self.lost as f64),
                    group(self.errors as f64),
                );
            }
        }
        if let Some(l) = &self.latency_us {
            let what = if self.scenario == "connections" {
                "connect µs"
            } else {
                "latency µs"
            };
            let _ = writeln!(
                s,
                "  {what}  p50 {}  p90 {}  p99 {}  p99.9 {}  max {}  (mean {}, {} samples)",
                l.p50,
                l.p90,
                l.p99,
                l.p999,
                l.max,
                l.mean,
                group(l.count as f64)
            );
        }
        if !self.extra.is_empty() {
            let extra: Vec<String> = self.extra.iter().map(|(k, v)| format!("{k}={v}")).collect();
            let _ = writeln!(s, "  figures     {}", extra.join(" "));
        }
        if let (Some(b), Some(a)) = (self.rss_before_kib, self.rss_after_kib) {
            let _ = writeln!(
                s,
                "  server RSS  {} KiB before, {} KiB after, {} KiB peak",
                group(b as f64),
                group(a as f64),
                group(self.rss_peak_kib.unwrap_or(a) as f64)
            );
        }
        if let Some(e) = &self.first_error {
            let _ = writeln!(s, "  first error {e}");
        }
        s
    }
}

/// Per-second rate over a measured span; 0 for an empty span.
pub fn per_second(count: u64, span: Duration) -> f64 {
    let secs = span.as_secs_f64();
    if secs > 0.0 {
        round1(count as f64 / secs)
    } else {
        0.0
    }
}

/// A number rounded to an integer with thin thousands separators (`1 234 567`).
pub fn group(x: f64) -> String {
    let n = x.round().max(0.0) as u64;
    let digits = n.to_string();
    let mut out = String::with_capacity(digits.len() + digits.len() / 3);
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(' ');
        }
        out.push(c);
    }
    out
}

/// Prints `line(elapsed)` on stderr once per second until `stop` is cancelled (nothing at all
/// when `quiet`).
pub fn spawn_progress<F>(quiet: bool, stop: CancellationToken, mut line: F) -> JoinHandle<()>
where
    F: FnMut(Duration) -> String + Send + 'static,
{
    tokio::spawn(async move {
        if quiet {
            return;
        }
        let start = tokio::time::Instant::now();
        let mut tick =
            tokio::time::interval_at(start + Duration::from_secs(1), Duration::from_secs(1));
        loop {
            tokio::select! {
                biased;
                _ = stop.cancelled() => break,
                _ = tick.tick() => eprintln!("{}", line(start.elapsed())),
            }
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn groups_thousands() {
        assert_eq!(group(0.0), "0");
        assert_eq!(group(999.4), "999");
        assert_eq!(group(1000.0), "1 000");
        assert_eq!(group(1_234_567.0), "1 234 567");
    }

    #[test]
    fn rates() {
        assert_eq!(per_second(500, Duration::from_millis(500)), 1000.0);
        assert_eq!(per_second(500, Duration::ZERO), 0.0);
    }

    #[test]
    fn json_line_is_one_flat_object() {
        let mut r = Report::new("pubsub", "127.0.0.1:1883".into(), Some("mosquitto".into()));
        r.param("subscribers", 100);
        r.extra("stalls", 0);
        r.delivered = 7;
        let line = r.json_line();
        assert!(!line.contains('\n'));
        let v: Value = serde_json::from_str(&line).unwrap();
        assert_eq!(v["scenario"], "pubsub");
        assert_eq!(v["label"], "mosquitto");
        assert_eq!(v["params"]["subscribers"], 100);
        assert_eq!(v["stalls"], 0);
        assert_eq!(v["delivered"], 7);
        assert!(v.get("latency_us").is_none());
        assert!(r.human().contains("delivered"));
    }
}

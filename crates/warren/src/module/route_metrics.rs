//! Requests by route: `warren_requests_total{route,result}` and
//! `warren_request_duration_seconds{route}` for every call a module of this node handles
//! (docs/metrics.md).
//!
//! These two are the only metrics counted once per request on every node, so they are kept
//! here rather than through the `metrics` facade: a facade counter costs two locked atomic
//! operations per update (the value and its generation), and the Prometheus exporter's
//! histogram keeps every sample in a queue until its upkeep folds them into buckets (at 700,000
//! requests a second, millions of samples and their memory between two folds). Here each thread
//! counts into a shard of its own, so a finished call costs three plain loads and stores (its
//! bucket, the sum, its result) and nothing later; a scrape adds the shards up. The exporter of
//! the binary asks for the text with [`render`] and serves it beside its own.
//!
//! The label set is bounded by construction: a route is `Module/Handler` for a handler the module
//! registered, and every other name a caller sends (a typo, a probe) is counted under
//! `route="other"`. Routes live in one table for the process, so instances of one module type
//! (and a plugin module's reloads) count into the same series.

use std::collections::{BTreeMap, HashMap};
use std::fmt::Write as _;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, LazyLock};
use std::time::Duration;

use crate::error::CallError;
use crate::message_path::bump;

/// Histogram buckets of request durations, in seconds: a request path's range, from 50 µs to
/// 10 s. The exporter uses the same for its other `*_seconds` histograms.
pub const BUCKETS: &[f64] = &[
    0.000_05, 0.000_1, 0.000_25, 0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5,
    1.0, 2.5, 5.0, 10.0,
];

/// [`BUCKETS`] in nanoseconds, the unit a duration is compared in.
const BOUNDS_NS: [u64; 17] = [
    50_000,
    100_000,
    250_000,
    500_000,
    1_000_000,
    2_500_000,
    5_000_000,
    10_000_000,
    25_000_000,
    50_000_000,
    100_000_000,
    250_000_000,
    500_000_000,
    1_000_000_000,
    2_500_000_000,
    5_000_000_000,
    10_000_000_000,
];

/// The route label of a handler name the module does not have.
pub(crate) const OTHER: &str = "other";

/// Whether calls are counted: off until the binary installs its exporter ([`enable`]), so a
/// node with `[metrics] enabled = false` does not even read the clock for them.
static ENABLED: AtomicBool = AtomicBool::new(false);

/// Count requests by route from now on (the exporter calls it when it is installed).
pub fn enable() {
    ENABLED.store(true, Ordering::Relaxed);
}

/// Whether requests are counted ([`enable`]).
pub(crate) fn enabled() -> bool {
    ENABLED.load(Ordering::Relaxed)
}

/// Every route's counts in this process, by route label (sorted, so the text is stable).
static TABLE: LazyLock<parking_lot::Mutex<BTreeMap<String, Arc<RouteStats>>>> =
    LazyLock::new(Default::default);

/// Shards of a route's counts: each thread that counts (the async workers, plugin threads) takes
/// one of its own while there are some left, and adds to it with a plain load and store, no
/// locked instruction; threads beyond them share the last one, with atomic adds.
const SHARDS: usize = 16;

/// Which shards live threads hold ([`Slot`]).
static TAKEN: parking_lot::Mutex<[bool; SHARDS - 1]> = parking_lot::Mutex::new([false; SHARDS - 1]);

/// A thread's shard, given back when the thread ends: the next thread to take it goes on from
/// its counts (the lock orders the two threads' writes).
struct Slot(Option<usize>);

impl Slot {
    fn take() -> Slot {
        let mut taken = TAKEN.lock();
        let free = taken.iter().position(|t| !t);
        if let Some(i) = free {
            taken[i] = true;
        }
        Slot(free)
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        if let Some(i) = self.0 {
            TAKEN.lock()[i] = false;
        }
    }
}

thread_local! {
    /// This thread's shard ([`SHARDS`]).
    static SLOT: Slot = Slot::take();
}

/// One shard of a route's counts, on cache lines of its own.
#[derive(Default)]
#[repr(align(64))]
struct Shard {
    /// Calls per duration bucket, not cumulative; the last one is `+Inf`.
    buckets: [AtomicU64; BOUNDS_NS.len() + 1],
    /// The durations' sum, in nanoseconds.
    sum_ns: AtomicU64,
    ok: AtomicU64,
    error: AtomicU64,
    timeout: AtomicU64,
}

impl Shard {
    fn result(&self, result: &Result<bytes::Bytes, CallError>) -> &AtomicU64 {
        match result {
            Ok(_) => &self.ok,
            Err(CallError::Timeout) => &self.timeout,
            Err(_) => &self.error,
        }
    }
}

/// One route's counts. A handler's entry holds its own (module/mod.rs, `HandlerEntry`), so a
/// finished call is counted without looking its route up again.
#[derive(Default)]
pub(crate) struct RouteStats {
    shards: [Shard; SHARDS],
}

impl RouteStats {
    /// The process's counts of `route`, created on first use.
    fn of(route: String) -> Arc<RouteStats> {
        TABLE.lock().entry(route).or_default().clone()
    }

    /// Count one finished call that took `took`.
    pub(crate) fn record(&self, took: Duration, result: &Result<bytes::Bytes, CallError>) {
        // (u64 arithmetic: `as_nanos` would multiply in u128; 2^64 ns is 584 years)
        let ns = took
            .as_secs()
            .saturating_mul(1_000_000_000)
            .saturating_add(u64::from(took.subsec_nanos()));
        let i = BOUNDS_NS
            .iter()
            .position(|&b| ns <= b)
            .unwrap_or(BOUNDS_NS.len());
        let own = SLOT.try_with(|s| s.0).ok().flatten();
        match own {
            Some(slot) => {
                let shard = &self.shards[slot];
                bump(&shard.buckets[i], 1);
                bump(&shard.sum_ns, ns);
                bump(shard.result(result), 1);
            }
            None => {
                let shard = &self.shards[SHARDS - 1];
                shard.buckets[i].fetch_add(1, Ordering::Relaxed);
                shard.sum_ns.fetch_add(ns, Ordering::Relaxed);
                shard.result(result).fetch_add(1, Ordering::Relaxed);
            }
        }
    }

    /// The buckets (not cumulative), the sum in nanoseconds, and the ok, error and timeout
    /// counts, over every shard.
    fn read(&self) -> ([u64; BOUNDS_NS.len() + 1], u64, [u64; 3]) {
        let mut buckets = [0u64; BOUNDS_NS.len() + 1];
        let (mut sum, mut results) = (0u64, [0u64; 3]);
        for shard in &self.shards {
            for (b, c) in buckets.iter_mut().zip(&shard.buckets) {
                *b = b.wrapping_add(c.load(Ordering::Relaxed));
            }
            sum = sum.wrapping_add(shard.sum_ns.load(Ordering::Relaxed));
            for (r, c) in results
                .iter_mut()
                .zip([&shard.ok, &shard.error, &shard.timeout])
            {
                *r = r.wrapping_add(c.load(Ordering::Relaxed));
            }
        }
        (buckets, sum, results)
    }
}

/// The counts of every route of one module type, and of its `other` route.
pub(crate) struct RouteMetrics {
    routes: HashMap<Box<str>, Arc<RouteStats>, foldhash::fast::RandomState>,
    other: Arc<RouteStats>,
}

impl RouteMetrics {
    /// The counts of module `module`'s `handlers` (internal names starting with `$`, like the
    /// session-closed notice, are not requests and are left out).
    pub(crate) fn new<'a>(module: &str, handlers: impl Iterator<Item = &'a str>) -> RouteMetrics {
        let routes = handlers
            .filter(|h| !h.starts_with('$'))
            .map(|h| (Box::from(h), RouteStats::of(format!("{module}/{h}"))))
            .collect();
        RouteMetrics {
            routes,
            other: RouteStats::of(OTHER.to_owned()),
        }
    }

    /// The counts of handler `handler`, for its entry to keep: none for an internal name (`$…`),
    /// which is not a request.
    pub(crate) fn route(&self, handler: &str) -> Option<Arc<RouteStats>> {
        self.routes.get(handler).cloned()
    }

    /// The counts of the handler names the module does not have (`route="other"`).
    pub(crate) fn other(&self) -> &Arc<RouteStats> {
        &self.other
    }

    /// Count one finished call of `handler` that took `took` (what the runtime does through the
    /// handler's entry).
    #[cfg(test)]
    fn record(&self, handler: &str, took: Duration, result: &Result<bytes::Bytes, CallError>) {
        if handler.starts_with('$') {
            return;
        }
        self.routes
            .get(handler)
            .unwrap_or(&self.other)
            .record(took, result);
    }

    /// The route label a call of `handler` is counted under (for tests and docs).
    #[cfg(test)]
    pub(crate) fn route_of(&self, handler: &str) -> Option<bool> {
        (!handler.starts_with('$')).then(|| self.routes.contains_key(handler))
    }
}

/// Append both metrics, for every route counted so far, to `out` in the Prometheus text format
/// (what `/metrics` serves after the exporter's own text). Nothing while no route exists.
pub fn render(out: &mut String) {
    let table = TABLE.lock();
    if table.is_empty() {
        return;
    }
    let routes: Vec<(String, _)> = table
        .iter()
        .map(|(route, stats)| (escape(route), stats.read()))
        .collect();
    out.push_str(
        "# HELP warren_requests_total calls handled by this node's modules, by route \
         (Module/Handler, or other) and result\n# TYPE warren_requests_total counter\n",
    );
    for (route, (_, _, results)) in &routes {
        for (result, n) in ["ok", "error", "timeout"].into_iter().zip(results) {
            let _ = writeln!(
                out,
                "warren_requests_total{{route=\"{route}\",result=\"{result}\"}} {n}"
            );
        }
    }
    out.push_str(
        "# HELP warren_request_duration_seconds time from a call's arrival at its module to its \
         result, by route\n# TYPE warren_request_duration_seconds histogram\n",
    );
    for (route, (buckets, sum_ns, _)) in &routes {
        let mut count = 0u64;
        for (i, n) in buckets.iter().enumerate() {
            count += n;
            let le = BUCKETS.get(i).map_or("+Inf".to_owned(), |b| b.to_string());
            let _ = writeln!(
                out,
                "warren_request_duration_seconds_bucket{{route=\"{route}\",le=\"{le}\"}} {count}"
            );
        }
        let sum = Duration::from_nanos(*sum_ns).as_secs_f64();
        let _ = writeln!(
            out,
            "warren_request_duration_seconds_sum{{route=\"{route}\"}} {sum}\n\
             warren_request_duration_seconds_count{{route=\"{route}\"}} {count}"
        );
    }
}

/// A label value as the text format wants it: backslash, quote and newline escaped.
fn escape(value: &str) -> String {
    let mut s = String::with_capacity(value.len());
    for c in value.chars() {
        match c {
            '\\' => s.push_str("\\\\"),
            '"' => s.push_str("\\\""),
            '\n' => s.push_str("\\n"),
            c => s.push(c),
        }
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_registered_handlers_are_routes_of_their_own() {
        let m = RouteMetrics::new("RouteTest", ["HD_Say", "$session_closed"].into_iter());
        assert_eq!(m.route_of("HD_Say"), Some(true));
        assert_eq!(m.route_of("HD_Whatever"), Some(false));
        assert_eq!(m.route_of("$session_closed"), None);
    }

    #[test]
    fn counts_render_as_prometheus_text() {
        let m = RouteMetrics::new("RenderTest", ["HD_A"].into_iter());
        // a second instance of the type counts into the same series
        let again = RouteMetrics::new("RenderTest", ["HD_A"].into_iter());
        m.record("HD_A", Duration::from_micros(10), &Ok(bytes::Bytes::new()));
        again.record("HD_A", Duration::from_millis(3), &Err(CallError::Timeout));
        m.record("HD_A", Duration::from_secs(60), &Err(CallError::NoSession));
        m.record("$session_closed", Duration::ZERO, &Ok(bytes::Bytes::new()));
        let mut text = String::new();
        render(&mut text);
        let line = |prefix: &str| {
            text.lines()
                .find(|l| l.starts_with(prefix))
                .unwrap_or_else(|| panic!("no {prefix} in\n{text}"))
                .rsplit_once(' ')
                .map(|(_, v)| v.to_owned())
                .expect("a value")
        };
        let route = "{route=\"RenderTest/HD_A\"";
        assert_eq!(
            line(&format!("warren_requests_total{route},result=\"ok\"}}")),
            "1"
        );
        assert_eq!(
            line(&format!(
                "warren_requests_total{route},result=\"timeout\"}}"
            )),
            "1"
        );
        assert_eq!(
            line(&format!("warren_requests_total{route},result=\"error\"}}")),
            "1"
        );
        let bucket = |le: &str| {
            line(&format!(
                "warren_request_duration_seconds_bucket{route},le=\"{le}\"}}"
            ))
        };
        assert_eq!(bucket("0.00005"), "1");
        assert_eq!(bucket("0.0025"), "1");
        assert_eq!(bucket("0.005"), "2");
        assert_eq!(bucket("10"), "2");
        assert_eq!(bucket("+Inf"), "3");
        assert_eq!(
            line(&format!("warren_request_duration_seconds_count{route}}}")),
            "3"
        );
        let sum: f64 = line(&format!("warren_request_duration_seconds_sum{route}}}"))
            .parse()
            .expect("a number");
        assert!((sum - 60.00301).abs() < 1e-9, "{sum}");
        assert_eq!(
            text.matches("# TYPE warren_requests_total counter").count(),
            1
        );
    }

    #[test]
    fn threads_beyond_the_shards_still_count_exactly() {
        let m = Arc::new(RouteMetrics::new("ShardTest", ["HD_A"].into_iter()));
        let threads: Vec<_> = (0..SHARDS + 8)
            .map(|_| {
                let m = m.clone();
                std::thread::spawn(move || {
                    for _ in 0..100 {
                        m.record("HD_A", Duration::from_micros(1), &Ok(bytes::Bytes::new()));
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().expect("a counting thread");
        }
        let (buckets, sum, results) = m.routes["HD_A"].read();
        let n = (SHARDS as u64 + 8) * 100;
        assert_eq!((buckets[0], results), (n, [n, 0, 0]));
        assert_eq!(sum, n * 1_000);
    }

    #[test]
    fn label_values_are_escaped() {
        assert_eq!(escape("a\"b\\c\nd"), "a\\\"b\\\\c\\nd");
    }
}

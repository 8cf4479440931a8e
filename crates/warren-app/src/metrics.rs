//! Metrics and health (docs/metrics.md): the Prometheus recorder behind the `metrics` facade the
//! whole code base counts with, and the three routes load balancers and Prometheus ask:
//! `/metrics` (the text format), `/healthz` (the process is up) and `/readyz` (the node takes
//! clients: listeners bound, bus and registry connected, not draining). Gauges of queue depths are
//! read from the queues at each scrape (and upkeep), never counted on the request path.
//!
//! The recorder is installed once per process, before the node is built, so every handle the
//! node resolves at start counts. `[metrics] enabled = false` installs none: every update is then
//! a no-op, which is how the cost of recording is measured. The routes are served on the `[http]`
//! page listener and on the admin listener, without the admin token: they say nothing a probe
//! may not know, and the admin listener is loopback unless a token is set.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock, PoisonError};
use std::time::Duration;

use axum::Router;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use tokio_util::sync::CancellationToken;
use warren::config::MetricsConfig;
use warren::node::NodeHandle;
use warren::registry::Registry;
use warren::remote::Transport;

/// Histogram buckets of every `*_seconds` metric, in seconds: a request path's range, from
/// 50 µs to 10 s (the ones the requests by route use too).
pub(crate) const BUCKETS: &[f64] = warren::module::route_metrics::BUCKETS;

/// How often histogram samples are folded into their buckets between scrapes (each sample waits
/// in a lock-free queue until then).
const UPKEEP_EVERY: Duration = Duration::from_secs(5);

/// The process's recorder handle, once installed.
static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();

/// What the health routes report on: the running node's [`Health`] (a process runs one node;
/// a later `serve` in the same process, as tests do, replaces it).
static CURRENT: Mutex<Option<Arc<Health>>> = Mutex::new(None);

/// Install the Prometheus recorder if `[metrics] enabled` (once per process: later calls keep
/// the first). Call before anything resolves a metric handle.
pub(crate) fn install(cfg: &MetricsConfig) {
    if !cfg.enabled || HANDLE.get().is_some() {
        return;
    }
    let builder = match PrometheusBuilder::new()
        .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), BUCKETS)
    {
        Ok(b) => b,
        Err(e) => {
            tracing::error!(error = %e, "metrics: bad histogram buckets; no metrics recorded");
            return;
        }
    };
    let recorder = builder.build_recorder();
    let handle = recorder.handle();
    match metrics::set_global_recorder(recorder) {
        Ok(()) => {
            let _ = HANDLE.set(handle);
            warren::module::route_metrics::enable();
            describe();
            process::started();
        }
        Err(e) => tracing::warn!(error = %e, "metrics: another recorder is installed"),
    }
}

/// Help lines of the metrics whose meaning is not plain from the name.
fn describe() {
    metrics::describe_gauge!(
        "warren_connections_active",
        "client connections open now, by protocol and listener"
    );
    metrics::describe_histogram!(
        "warren_bus_call_duration_seconds",
        metrics::Unit::Seconds,
        "time from sending a call over the bus to its reply, by transport"
    );
    metrics::describe_gauge!(
        "warren_outbound_queue_bytes",
        metrics::Unit::Bytes,
        "bytes queued for writing to clients, all sessions of this node together"
    );
    metrics::describe_gauge!(
        "warren_outbound_queue_bytes_max",
        metrics::Unit::Bytes,
        "the most bytes one session has queued for writing"
    );
    metrics::describe_gauge!(
        "warren_bus_calls_in_flight",
        "calls sent over the bus that await their reply, by transport"
    );
    metrics::describe_gauge!(
        "warren_module_queue_depth",
        "calls waiting in the mailboxes of this node's instances, by module type"
    );
}

/// Fold histogram samples into their buckets every few seconds until `stop`, so memory stays
/// bounded between scrapes, and read the queue gauges and the connections' traffic counts as
/// often, so a recorder other than a scrape sees them move. Nothing to do when metrics are off.
pub(crate) fn spawn_upkeep(stop: CancellationToken) {
    let Some(handle) = HANDLE.get() else { return };
    tokio::spawn(async move {
        let mut every = tokio::time::interval(UPKEEP_EVERY);
        loop {
            tokio::select! {
                _ = stop.cancelled() => break,
                _ = every.tick() => {
                    if let Some(h) = current() {
                        h.record_queues();
                    }
                    warren::node::publish_traffic();
                    handle.run_upkeep();
                }
            }
        }
    });
}

/// Why a node does not take clients now; `/readyz` lists them.
#[derive(Default)]
pub(crate) struct Health {
    /// Every listener, the page and the admin listener are bound.
    bound: AtomicBool,
    /// SIGTERM/SIGINT came: the node drains.
    draining: AtomicBool,
    /// The bus transport, when the node has one (asked whether it is connected).
    bus: Option<Arc<dyn Transport>>,
    /// The registry, when the node has one.
    registry: Option<Arc<dyn Registry>>,
    /// Include process figures in `/metrics`.
    process: bool,
    /// The running node, whose queues the queue gauges read (set once it is built).
    node: OnceLock<NodeHandle>,
    /// The module types given a `warren_module_queue_depth` so far, so that one no longer
    /// running here goes back to 0 instead of keeping its last depth.
    modules: Mutex<Vec<Arc<str>>>,
}

impl Health {
    /// The health of a node with this bus and registry, not bound yet; the health routes
    /// report on it from now on.
    pub(crate) fn start(
        cfg: &MetricsConfig,
        bus: Option<Arc<dyn Transport>>,
        registry: Option<Arc<dyn Registry>>,
    ) -> Arc<Health> {
        let h = Arc::new(Health {
            bus,
            registry,
            process: cfg.process,
            ..Health::default()
        });
        *CURRENT.lock().unwrap_or_else(PoisonError::into_inner) = Some(h.clone());
        h
    }

    /// The node runs: the queue gauges read its sessions, bus and modules from now on.
    pub(crate) fn set_node(&self, node: NodeHandle) {
        let _ = self.node.set(node);
    }

    /// Set the queue gauges from the queues as they are now (at each scrape and each upkeep):
    /// the per-session byte counters the queues keep anyway, the bus's table of calls awaiting
    /// a reply and the mailboxes' lengths. Nothing on the request path or fan-out counts for
    /// them.
    fn record_queues(&self) {
        let Some(node) = self.node.get() else { return };
        let (total, max) = node.session_table().queued_output();
        metrics::gauge!("warren_outbound_queue_bytes").set(total as f64);
        metrics::gauge!("warren_outbound_queue_bytes_max").set(max as f64);
        if let Some(remote) = node.remote() {
            metrics::gauge!("warren_bus_calls_in_flight", "transport" => remote.transport_kind())
                .set(remote.in_flight() as f64);
        }
        let depths = node.module_queue_depths();
        let mut known = self.modules.lock().unwrap_or_else(PoisonError::into_inner);
        for gone in known
            .iter()
            .filter(|m| !depths.iter().any(|(d, _)| d == *m))
        {
            metrics::gauge!("warren_module_queue_depth", "module" => gone.to_string()).set(0.0);
        }
        for (module, n) in &depths {
            metrics::gauge!("warren_module_queue_depth", "module" => module.to_string())
                .set(*n as f64);
        }
        *known = depths.into_iter().map(|(m, _)| m).collect();
    }

    /// Everything is bound: the node takes clients.
    pub(crate) fn set_bound(&self) {
        self.bound.store(true, Ordering::Release);
    }

    /// The node drains: load balancers should stop sending clients.
    pub(crate) fn set_draining(&self) {
        self.draining.store(true, Ordering::Release);
    }

    /// Why the node is not ready; empty when it is.
    pub(crate) fn reasons(&self) -> Vec<&'static str> {
        let mut why = Vec::new();
        if !self.bound.load(Ordering::Acquire) {
            why.push("listeners not bound");
        }
        if self.draining.load(Ordering::Acquire) {
            why.push("draining");
        }
        if self.bus.as_ref().is_some_and(|b| !b.is_connected()) {
            why.push("bus disconnected");
        }
        if self.registry.as_ref().is_some_and(|r| !r.is_connected()) {
            why.push("registry disconnected");
        }
        why
    }
}

/// The node the routes report on.
fn current() -> Option<Arc<Health>> {
    CURRENT
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .clone()
}

/// `/metrics`, `/healthz` and `/readyz`, open to anyone who reaches the listener (no token): the
/// admin listener merges them beside its own routes, the page serves them before its own.
pub(crate) fn health_routes() -> Router {
    Router::new()
        .route("/metrics", get(metrics_text))
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
}

/// The page's router behind [`health_routes`]: the three paths are answered here, every other
/// path by the page (a page that has its own `/healthz` is shadowed, not refused).
pub(crate) fn with_page(page: Router) -> Router {
    health_routes().fallback_service(page)
}

/// `GET /healthz`: the process answers.
async fn healthz() -> Response {
    axum::Json(serde_json::json!({"status": "ok"})).into_response()
}

/// `GET /readyz`: 200 when the node takes clients, else 503 with the reasons.
async fn readyz() -> Response {
    let reasons = match current() {
        Some(h) => h.reasons(),
        None => vec!["starting"],
    };
    let ready = reasons.is_empty();
    let status = if ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (
        status,
        axum::Json(serde_json::json!({"ready": ready, "reasons": reasons})),
    )
        .into_response()
}

/// `GET /metrics`: the Prometheus text format; 404 when `[metrics] enabled = false`.
async fn metrics_text() -> Response {
    let Some(handle) = HANDLE.get() else {
        return (
            StatusCode::NOT_FOUND,
            "metrics are off ([metrics] enabled = false)\n",
        )
            .into_response();
    };
    let health = current();
    if health.as_ref().is_none_or(|h| h.process) {
        process::record();
    }
    if let Some(h) = &health {
        h.record_queues();
    }
    warren::node::publish_traffic();
    // the exporter's metrics, then the requests by route, which the node keeps itself
    // (crates/warren/src/module/route_metrics.rs)
    let mut text = handle.render();
    if !text.is_empty() && !text.ends_with('\n') {
        text.push('\n');
    }
    warren::module::route_metrics::render(&mut text);
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        text,
    )
        .into_response()
}

/// The process's own figures, read from `/proc/self` at each scrape (Linux; elsewhere none).
mod process {
    use std::sync::OnceLock;
    use std::time::{SystemTime, UNIX_EPOCH};

    /// Clock ticks per second of `/proc/self/stat`'s CPU times (`USER_HZ`, 100 on every Linux
    /// architecture warren builds for).
    const TICKS_PER_SECOND: f64 = 100.0;

    /// When the recorder was installed: the process's start, within milliseconds.
    static STARTED: OnceLock<f64> = OnceLock::new();

    /// The start time in Unix seconds, taken on the first call ([`super::install`] makes it).
    pub(super) fn started() -> f64 {
        *STARTED.get_or_init(|| {
            SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(0.0, |d| d.as_secs_f64())
        })
    }

    /// Set the process gauges from `/proc/self`; a file that cannot be read leaves its gauge.
    pub(super) fn record() {
        metrics::gauge!("process_start_time_seconds").set(started());
        if let Some(s) = read("/proc/self/stat").as_deref().and_then(parse_stat) {
            metrics::gauge!("process_cpu_seconds_total")
                .set((s.utime + s.stime) as f64 / TICKS_PER_SECOND);
            metrics::gauge!("process_threads").set(s.threads as f64);
        }
        if let Some(kb) = read("/proc/self/status").as_deref().and_then(parse_rss_kb) {
            metrics::gauge!("process_resident_memory_bytes").set((kb * 1024) as f64);
        }
        if let Ok(dir) = std::fs::read_dir("/proc/self/fd") {
            metrics::gauge!("process_open_fds").set(dir.count() as f64);
        }
        if let Some(max) = read("/proc/self/limits").as_deref().and_then(parse_max_fds) {
            metrics::gauge!("process_max_fds").set(max as f64);
        }
    }

    fn read(path: &str) -> Option<String> {
        std::fs::read_to_string(path).ok()
    }

    /// The CPU times and thread count of `/proc/self/stat`.
    #[derive(Debug, PartialEq)]
    pub(super) struct Stat {
        pub(super) utime: u64,
        pub(super) stime: u64,
        pub(super) threads: u64,
    }

    /// Parse `/proc/self/stat`: fields after the command (which is in parentheses and may hold
    /// spaces); utime and stime are fields 14 and 15, num_threads field 20.
    pub(super) fn parse_stat(text: &str) -> Option<Stat> {
        let rest = &text[text.rfind(')')? + 1..];
        // rest starts at field 3 (state)
        let f: Vec<&str> = rest.split_whitespace().collect();
        let field = |n: usize| f.get(n - 3)?.parse::<u64>().ok();
        Some(Stat {
            utime: field(14)?,
            stime: field(15)?,
            threads: field(20)?,
        })
    }

    /// `VmRSS` of `/proc/self/status`, in kB.
    pub(super) fn parse_rss_kb(text: &str) -> Option<u64> {
        let line = text.lines().find(|l| l.starts_with("VmRSS:"))?;
        line.split_whitespace().nth(1)?.parse().ok()
    }

    /// The soft limit of "Max open files" in `/proc/self/limits`.
    pub(super) fn parse_max_fds(text: &str) -> Option<u64> {
        let line = text.lines().find(|l| l.starts_with("Max open files"))?;
        line["Max open files".len()..]
            .split_whitespace()
            .next()?
            .parse()
            .ok()
    }
}

#[cfg(test)]
mod tests {
    use super::process::*;
    use super::*;

    #[test]
    fn stat_fields_are_counted_after_the_command() {
        let text = "4242 (warren (x) y) S 1 4242 4242 0 -1 4194560 900 0 0 0 \
                    250 75 0 0 20 0 7 0 123456 1000000 2000 18446744073709551615";
        assert_eq!(
            parse_stat(text),
            Some(Stat {
                utime: 250,
                stime: 75,
                threads: 7
            })
        );
        assert_eq!(parse_stat("garbage"), None);
        assert_eq!(parse_stat("1 (x) S 1 2"), None);
    }

    #[test]
    fn rss_and_fd_limit() {
        let status = "Name:\twarren\nVmPeak:\t  9000 kB\nVmRSS:\t   5120 kB\nThreads:\t3\n";
        assert_eq!(parse_rss_kb(status), Some(5120));
        assert_eq!(parse_rss_kb("Name: x\n"), None);
        let limits = "Limit                     Soft Limit           Hard Limit           Units\n\
                      Max open files            1048576              1048576              files\n";
        assert_eq!(parse_max_fds(limits), Some(1_048_576));
        assert_eq!(parse_max_fds(""), None);
    }

    #[test]
    fn readiness_lists_every_reason() {
        let h = Health::start(&MetricsConfig::default(), None, None);
        assert_eq!(h.reasons(), vec!["listeners not bound"]);
        h.set_bound();
        assert!(h.reasons().is_empty());
        h.set_draining();
        assert_eq!(h.reasons(), vec!["draining"]);
    }

    #[test]
    fn the_buckets_span_a_request_path() {
        assert_eq!(BUCKETS.first(), Some(&0.000_05));
        assert_eq!(BUCKETS.last(), Some(&10.0));
        assert!(BUCKETS.windows(2).all(|w| w[0] < w[1]));
    }
}

//! `warren bench`: the load generator that measures how fast warren (or any MQTT 3.1.1 server)
//! moves messages between many connections.
//!
//! Scenarios: [`Scenario::Pubsub`] (P publishers → S subscribers, closed loop or fixed rate),
//! [`Scenario::Request`] (requests with a msgid to a module route, answered on the same topic),
//! [`Scenario::PomeloRequest`] (the same over raw-TCP pomelo: request messages with an id),
//! [`Scenario::Connections`] (many idle connections: connect rate and the server's memory per
//! connection), [`Scenario::BrokerEcho`] (a bare request/reply through a NATS, Redis or
//! RabbitMQ server: the reference for requests to a module on another node),
//! [`Scenario::Backend`] (calls through a backend group against the raw round trip to the same
//! TCP service), and three hidden
//! servers that are the physical-limit references: the raw TCP echo and the WebSocket echo for
//! requests, the one-topic relay for fan-out. The client scenarios reach their target over TCP,
//! TLS (`mqtts://`), or WebSocket (`ws://`, `wss://`). Each run prints a human summary and one
//! JSON line; `bench/compare` runs them side by side against other brokers, `bench/cluster`
//! compares requests across nodes with the bare broker round trip.
//!
//! The generator must not be the bottleneck: one task per connection, writes coalesced into one
//! syscall per batch, reads decoded in batches with one clock reading per batch, and latency
//! recorded into sharded HDR histograms.

#![forbid(unsafe_code)]

mod args;
mod backend;
mod broker;
mod client;
mod connections;
mod echo;
mod error;
mod latency;
mod login;
mod loss;
mod payload;
mod pomelo;
mod proc;
mod pubsub;
mod relay;
mod report;
mod request;
mod window;
mod ws;
mod ws_echo;

use std::io::Write as _;
use std::net::SocketAddr;
use std::process::ExitCode;
use std::time::Duration;

use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

pub use args::{
    BackendArgs, BenchArgs, BrokerEchoArgs, CommonArgs, ConnectionsArgs, EchoServerArgs,
    PomeloRequestArgs, PubsubArgs, RequestArgs, Scenario,
};
pub use error::BenchError;
pub use latency::Percentiles;
pub use report::Report;

/// Runs `warren bench …` to completion: builds the runtime, stops cleanly on the first Ctrl-C or
/// SIGTERM (a second one exits at once), prints the summary and JSON line, and returns the exit
/// status.
pub fn main(args: BenchArgs) -> ExitCode {
    let threads = match &args.scenario {
        Scenario::Pubsub(a) => a.common.threads,
        Scenario::Request(a) => a.common.threads,
        Scenario::PomeloRequest(a) => a.common.threads,
        Scenario::Connections(a) => a.common.threads,
        Scenario::BrokerEcho(a) => a.threads,
        Scenario::Backend(a) => a.threads,
        Scenario::EchoServer(a) | Scenario::WsEchoServer(a) | Scenario::RelayServer(a) => a.threads,
    };
    let json_only = match &args.scenario {
        Scenario::Pubsub(a) => a.common.json,
        Scenario::Request(a) => a.common.json,
        Scenario::PomeloRequest(a) => a.common.json,
        Scenario::Connections(a) => a.common.json,
        Scenario::BrokerEcho(a) => a.json,
        Scenario::Backend(_) => true,
        Scenario::EchoServer(_) | Scenario::WsEchoServer(_) | Scenario::RelayServer(_) => true,
    };
    let rt = match runtime(threads) {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::FAILURE;
        }
    };
    let stop = CancellationToken::new();
    let code = rt.block_on(async {
        tokio::spawn(stop_on_signal(stop.clone()));
        match run(args, stop).await {
            Ok(Some(report)) => {
                let mut out = std::io::stdout().lock();
                if !json_only {
                    let _ = write!(out, "{}", report.human());
                }
                let _ = writeln!(out, "{}", report.json_line());
                let _ = out.flush();
                ExitCode::SUCCESS
            }
            Ok(None) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("error: {e}");
                ExitCode::FAILURE
            }
        }
    });
    rt.shutdown_timeout(Duration::from_secs(1));
    code
}

/// Runs one scenario until its duration ends or `stop` is cancelled, and returns its report
/// (`None` for the reference servers, which report nothing).
pub async fn run(args: BenchArgs, stop: CancellationToken) -> Result<Option<Report>, BenchError> {
    match args.scenario {
        Scenario::Pubsub(a) => pubsub::run(&a, stop).await.map(Some),
        Scenario::Request(a) => request::run(&a, stop).await.map(Some),
        Scenario::PomeloRequest(a) => pomelo::run(&a, stop).await.map(Some),
        Scenario::Connections(a) => connections::run(&a, stop).await.map(Some),
        Scenario::BrokerEcho(a) => broker::run(&a, stop).await.map(Some),
        Scenario::Backend(a) => backend::run(&a, stop).await.map(|()| None),
        Scenario::EchoServer(a) => echo::run(&a, stop).await.map(|()| None),
        Scenario::WsEchoServer(a) => ws_echo::run(&a, stop).await.map(|()| None),
        Scenario::RelayServer(a) => relay::run(&a, stop).await.map(|()| None),
    }
}

/// A multi-threaded runtime with `threads` workers, or a current-thread one for a single
/// worker (less overhead when the generator is pinned to one core).
fn runtime(threads: Option<usize>) -> Result<tokio::runtime::Runtime, BenchError> {
    let n = threads
        .or_else(|| std::thread::available_parallelism().ok().map(|n| n.get()))
        .unwrap_or(1)
        .max(1);
    let mut b = if n == 1 {
        tokio::runtime::Builder::new_current_thread()
    } else {
        let mut b = tokio::runtime::Builder::new_multi_thread();
        b.worker_threads(n);
        b
    };
    b.enable_all().build().map_err(BenchError::Runtime)
}

/// Cancels `stop` on the first Ctrl-C or SIGTERM so the run ends with its summary; exits the
/// process on the second.
async fn stop_on_signal(stop: CancellationToken) {
    signal().await;
    eprintln!("stopping (again to quit at once)");
    stop.cancel();
    signal().await;
    std::process::exit(130);
}

async fn signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        if let Ok(mut term) = signal(SignalKind::terminate()) {
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = term.recv() => {}
            }
            return;
        }
    }
    if tokio::signal::ctrl_c().await.is_err() {
        std::future::pending::<()>().await;
    }
}

/// Resolves `HOST:PORT` (optionally written `mqtt://HOST:PORT`, `ws://HOST:PORT/PATH`, …).
pub(crate) async fn resolve(target: &str) -> Result<SocketAddr, BenchError> {
    let bare = target
        .split_once("://")
        .map_or(target, |(_, rest)| rest)
        .split(['/', '?'])
        .next()
        .unwrap_or_default();
    let mut addrs = tokio::net::lookup_host(bare)
        .await
        .map_err(|source| BenchError::Resolve {
            target: target.to_owned(),
            source,
        })?;
    addrs
        .next()
        .ok_or_else(|| BenchError::NoAddress(target.to_owned()))
}

/// The run's time origin: payload timestamps are nanoseconds since it, so publisher and
/// subscriber tasks compare readings of one monotonic clock.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Clock {
    base: Instant,
}

impl Clock {
    /// A clock starting now.
    pub(crate) fn new() -> Self {
        Self {
            base: Instant::now(),
        }
    }

    /// Nanoseconds since the origin.
    pub(crate) fn now_ns(&self) -> u64 {
        self.ns_at(Instant::now())
    }

    /// Nanoseconds from the origin to `t` (0 before it).
    pub(crate) fn ns_at(&self, t: Instant) -> u64 {
        u64::try_from(t.saturating_duration_since(self.base).as_nanos()).unwrap_or(u64::MAX)
    }

    /// The instant `ns` nanoseconds after the origin.
    pub(crate) fn at(&self, ns: u64) -> Instant {
        self.base + Duration::from_nanos(ns)
    }
}

/// Where a run stands in time: measuring happens from `t0` to `t1` (ns on the run's [`Clock`]);
/// `t1` moves earlier when the run is interrupted.
#[derive(Debug)]
pub(crate) struct Phase {
    pub(crate) clock: Clock,
    pub(crate) t0: u64,
    t1: std::sync::atomic::AtomicU64,
}

impl Phase {
    /// Measuring starts `warmup` after now and lasts `duration`.
    pub(crate) fn new(clock: Clock, warmup: Duration, duration: Duration) -> Self {
        let t0 = clock.now_ns() + dur_ns(warmup);
        Self {
            clock,
            t0,
            t1: std::sync::atomic::AtomicU64::new(t0.saturating_add(dur_ns(duration))),
        }
    }

    /// End of measuring (ns).
    pub(crate) fn t1(&self) -> u64 {
        self.t1.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Whether a reading at `ns` falls in the measured span.
    pub(crate) fn measuring(&self, ns: u64) -> bool {
        ns >= self.t0 && ns < self.t1()
    }

    /// Ends measuring now (when interrupted early).
    pub(crate) fn end_now(&self) {
        let now = self.clock.now_ns();
        self.t1
            .fetch_min(now.max(self.t0), std::sync::atomic::Ordering::Relaxed);
    }

    /// The span actually measured.
    pub(crate) fn measured(&self) -> Duration {
        Duration::from_nanos(self.t1().saturating_sub(self.t0))
    }

    /// `"warm-up"` or `"measuring"` or `"done"` at `ns`, for the progress line.
    pub(crate) fn name(&self, ns: u64) -> &'static str {
        if ns < self.t0 {
            "warm-up"
        } else if ns < self.t1() {
            "measuring"
        } else {
            "draining"
        }
    }
}

/// CPU time used while measuring by (the server, the generator), where known.
pub(crate) type CpuUsed = (Option<Duration>, Option<Duration>);

/// Waits through the warm-up and the measured span of `phase`, or until `stop`, reading the
/// server's and the generator's CPU time at both ends of the measured span. Returns that CPU
/// time (`None` when stopped during the warm-up) and whether the run was interrupted.
pub(crate) async fn measure(
    phase: &Phase,
    pid: Option<u32>,
    stop: &CancellationToken,
) -> (Option<CpuUsed>, bool) {
    let start = tokio::select! {
        _ = tokio::time::sleep_until(phase.clock.at(phase.t0)) => Some(proc::CpuMeter::start(pid)),
        _ = stop.cancelled() => None,
    };
    if start.is_some() {
        tokio::select! {
            _ = tokio::time::sleep_until(phase.clock.at(phase.t1())) => {}
            _ = stop.cancelled() => {}
        }
    }
    let interrupted = stop.is_cancelled();
    if interrupted {
        phase.end_now();
    }
    (start.map(|m| m.used()), interrupted)
}

fn dur_ns(d: Duration) -> u64 {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
}

/// Records the first error message of a run (later ones only count).
#[derive(Debug, Default)]
pub(crate) struct Errors {
    count: std::sync::atomic::AtomicU64,
    first: parking_lot::Mutex<Option<String>>,
}

impl Errors {
    /// Counts an error, keeping its text if it is the first.
    pub(crate) fn record(&self, what: impl std::fmt::Display) {
        self.count
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let mut first = self.first.lock();
        if first.is_none() {
            *first = Some(what.to_string());
        }
    }

    /// Errors counted so far.
    pub(crate) fn count(&self) -> u64 {
        self.count.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// The first error's text.
    pub(crate) fn first(&self) -> Option<String> {
        self.first.lock().clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn resolves_with_and_without_scheme() {
        let a = resolve("127.0.0.1:1883").await.unwrap();
        assert_eq!(a, "127.0.0.1:1883".parse().unwrap());
        let b = resolve("mqtt://127.0.0.1:1884/x?y=1").await.unwrap();
        assert_eq!(b.port(), 1884);
        assert!(resolve("no-port").await.is_err());
    }

    #[test]
    fn phase_window_and_interrupt() {
        let p = Phase::new(Clock::new(), Duration::ZERO, Duration::from_secs(3600));
        let now = p.clock.now_ns();
        assert!(p.measuring(now));
        assert_eq!(p.name(now), "measuring");
        p.end_now();
        assert!(p.measured() < Duration::from_secs(1));
        assert!(!p.measuring(p.clock.now_ns() + 1_000_000));
    }

    #[test]
    fn errors_keep_the_first_text() {
        let e = Errors::default();
        assert_eq!(e.first(), None);
        e.record("one");
        e.record("two");
        assert_eq!(e.count(), 2);
        assert_eq!(e.first().as_deref(), Some("one"));
    }
}

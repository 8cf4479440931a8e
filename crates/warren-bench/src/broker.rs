//! `broker-echo`: the bare request/reply round trip through a broker, with no warren in the path.
//!
//! A responder task and C client connections talk through the broker named by `--bus`
//! (NATS, Redis or RabbitMQ); each client keeps K requests in flight and the responder sends
//! every request's bytes back to the client's own inbox, list or queue. It is the reference for
//! `request` against a module on another node: that path crosses the same broker twice (gate →
//! module node → gate) plus the MQTT hop, so warren's figure over this one is the cost of
//! everything warren adds.
//!
//! A request body is 8 bytes of header (the client's number and the request's number, both
//! u32 little-endian) padded with `x` to `--payload` bytes; the reply is the same bytes, so the
//! header correlates it. The responder is one task on one connection, as a module node has one
//! inbox. Latency is from the moment a request is queued to the read of its reply.
//!
//! `--clients 1 --inflight C×K` puts every request on one connection, the shape of a gate (all
//! its sessions' calls share its one broker connection, so the broker sees large batches);
//! `--clients C --inflight K` gives each client its own. `bench/cluster` runs both and compares
//! warren with the faster.

mod amqp;
mod nats;
mod redis;

use std::collections::HashMap;
use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::args::{BrokerEchoArgs, seconds};
use crate::latency::{Latency, Percentiles};
use crate::report::{Report, per_second, spawn_progress};
use crate::{BenchError, Clock, Errors, Phase, measure, proc};

/// Deadline for connecting (and subscribing, declaring) each client and the responder.
const SETUP_TIMEOUT: Duration = Duration::from_secs(10);

/// Bytes of the request header: client number and request number.
pub(crate) const HEADER: usize = 8;

/// The brokers `broker-echo` knows, from the `--bus` URL's scheme.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Bus {
    /// `nats://`: core NATS publish/subscribe.
    Nats,
    /// `redis://`: lists, RPUSH and BLPOP.
    Redis,
    /// `amqp://`: RabbitMQ queues through the default exchange.
    Amqp,
}

impl Bus {
    /// The bus a URL names.
    pub(crate) fn of(url: &str) -> Result<Self, BenchError> {
        match url.split_once("://").map(|(s, _)| s) {
            Some("nats") => Ok(Self::Nats),
            Some("redis") => Ok(Self::Redis),
            Some("amqp") => Ok(Self::Amqp),
            _ => Err(BenchError::Invalid(format!(
                "--bus must be a nats://, redis:// or amqp:// URL, got {url:?}"
            ))),
        }
    }

    /// Short name for the report and errors.
    pub(crate) fn name(self) -> &'static str {
        match self {
            Self::Nats => "nats",
            Self::Redis => "redis",
            Self::Amqp => "amqp",
        }
    }
}

/// Names of the broker objects one run uses, unique per run so runs against a shared broker do
/// not meet.
#[derive(Debug, Clone)]
pub(crate) struct Names {
    /// `wb.<pid>.<nonce>` (NATS subjects, RabbitMQ queues) or `wb:<pid>:<nonce>` (Redis keys).
    pub(crate) base: String,
}

impl Names {
    /// Fresh names for this process and moment, with `sep` between the parts.
    fn new(sep: char) -> Self {
        let nonce = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.subsec_nanos());
        Self {
            base: format!("wb{sep}{}{sep}{nonce:x}", std::process::id()),
        }
    }
}

/// One client's side of the broker: sends requests and collects replies.
pub(crate) trait Requester: Send + 'static {
    /// Sends one request per number in `seqs` (bodies from [`body`]).
    fn send(&mut self, seqs: &[u32]) -> impl Future<Output = Result<(), BenchError>> + Send;

    /// Waits for at least one reply, then appends the bodies of every reply available without
    /// waiting to `out`. Dropping the future may lose replies in flight: it is dropped only at
    /// the hard stop.
    fn recv(
        &mut self,
        out: &mut Vec<bytes::Bytes>,
    ) -> impl Future<Output = Result<(), BenchError>> + Send;
}

/// State shared by every client task and the responder.
pub(crate) struct Shared {
    phase: Phase,
    latency: Latency,
    /// Replies so far (all clients), for the progress line.
    replies: AtomicU64,
    /// Errors of the clients and the responder.
    pub(crate) errors: Errors,
}

/// What a client task reports at the end.
#[derive(Debug, Default)]
struct ClientResult {
    sent: u64,
    replies: u64,
    replies_measuring: u64,
    unanswered: u64,
    unknown: u64,
}

/// Runs the scenario and returns its report.
pub async fn run(a: &BrokerEchoArgs, stop: CancellationToken) -> Result<Report, BenchError> {
    if a.clients == 0 || a.inflight == 0 {
        return Err(BenchError::Invalid(
            "--clients and --inflight must be at least 1".into(),
        ));
    }
    let clients = u32::try_from(a.clients)
        .map_err(|_| BenchError::Invalid(format!("--clients {} is too many", a.clients)))?;
    let bus = Bus::of(&a.bus)?;
    let duration = a.duration()?;
    let warmup = a.warmup()?;
    let drain = seconds("--drain", a.drain)?;
    let size = a.payload.max(HEADER);

    let mut report = Report::new("broker-echo", redact(&a.bus), a.label.clone());
    report.param("bus", bus.name());
    report.param("clients", a.clients as u64);
    report.param("inflight", a.inflight as u64);
    report.param("payload", size as u64);
    report.rss_before_kib = a.pid.and_then(proc::rss_kib);

    let responder_stop = CancellationToken::new();
    let setup = async {
        match bus {
            Bus::Nats => {
                let names = Names::new('.');
                let responder = nats::Responder::start(&a.bus, &names).await?;
                let mut cs = Vec::with_capacity(a.clients);
                for i in 0..clients {
                    cs.push(nats::NatsRequester::connect(&a.bus, &names, i, size).await?);
                }
                Ok::<_, BenchError>((Started::Nats(responder), Clients::Nats(cs)))
            }
            Bus::Redis => {
                let names = Names::new(':');
                let responder = redis::Responder::start(&a.bus, &names, clients).await?;
                let mut cs = Vec::with_capacity(a.clients);
                for i in 0..clients {
                    cs.push(redis::RedisRequester::connect(&a.bus, &names, i, size).await?);
                }
                Ok((Started::Redis(responder), Clients::Redis(cs)))
            }
            Bus::Amqp => {
                let names = Names::new('.');
                let responder = amqp::Responder::start(&a.bus, &names).await?;
                let mut cs = Vec::with_capacity(a.clients);
                for i in 0..clients {
                    cs.push(amqp::AmqpRequester::connect(&a.bus, &names, i, size).await?);
                }
                Ok((Started::Amqp(Box::new(responder)), Clients::Amqp(cs)))
            }
        }
    };
    let (responder, requesters) = tokio::select! {
        r = tokio::time::timeout(SETUP_TIMEOUT * 2, setup) => r.map_err(|_| BenchError::Timeout {
            what: "the broker connections",
            after: SETUP_TIMEOUT * 2,
        })??,
        _ = stop.cancelled() => return Err(BenchError::Interrupted),
    };

    // The clock starts now that every connection is up.
    let shared = Arc::new(Shared {
        phase: Phase::new(Clock::new(), warmup, duration),
        latency: Latency::new(16),
        replies: AtomicU64::new(0),
        errors: Errors::default(),
    });
    let responder_task = match responder {
        Started::Nats(r) => tokio::spawn(r.run(shared.clone(), responder_stop.clone())),
        Started::Redis(r) => tokio::spawn(r.run(shared.clone(), responder_stop.clone())),
        Started::Amqp(r) => tokio::spawn(r.run(shared.clone(), responder_stop.clone())),
    };
    let send_stop = CancellationToken::new();
    let hard_stop = CancellationToken::new();
    let mut tasks = JoinSet::new();
    let spawn = Spawner {
        shared: &shared,
        inflight: a.inflight,
        send_stop: &send_stop,
        hard_stop: &hard_stop,
    };
    match requesters {
        Clients::Nats(cs) => spawn.all(&mut tasks, cs),
        Clients::Redis(cs) => spawn.all(&mut tasks, cs),
        Clients::Amqp(cs) => spawn.all(&mut tasks, cs),
    }

    let progress_stop = CancellationToken::new();
    let progress = {
        let sh = shared.clone();
        let mut last = 0u64;
        spawn_progress(a.quiet, progress_stop.clone(), move |elapsed| {
            let r = sh.replies.load(Ordering::Relaxed);
            let line = format!(
                "broker-echo {:>5.1}s {:<9} replies {:>10}/s  errors {}",
                elapsed.as_secs_f64(),
                sh.phase.name(sh.phase.clock.now_ns()),
                r - last,
                sh.errors.count()
            );
            last = r;
            line
        })
    };

    let (cpu, interrupted) = measure(&shared.phase, a.pid, &stop).await;
    report.interrupted = interrupted;
    report.rss_after_kib = a.pid.and_then(proc::rss_kib);
    send_stop.cancel();
    let hard = {
        let hard_stop = hard_stop.clone();
        tokio::spawn(async move {
            tokio::time::sleep(drain).await;
            hard_stop.cancel();
        })
    };
    let mut total = ClientResult::default();
    while let Some(r) = tasks.join_next().await {
        let r = r.map_err(|e| BenchError::Task(e.to_string()))?;
        total.sent += r.sent;
        total.replies += r.replies;
        total.replies_measuring += r.replies_measuring;
        total.unanswered += r.unanswered;
        total.unknown += r.unknown;
    }
    hard.abort();
    responder_stop.cancel();
    let _ = responder_task.await;
    progress_stop.cancel();
    let _ = progress.await;

    let measured = shared.phase.measured();
    report.duration_s = (measured.as_secs_f64() * 1000.0).round() / 1000.0;
    report.warmup_s = warmup.as_secs_f64();
    report.published = total.sent;
    report.delivered = total.replies;
    report.lost = total.unanswered;
    report.errors = shared.errors.count();
    report.first_error = shared.errors.first();
    let rate = per_second(total.replies_measuring, measured);
    report.published_per_s = rate;
    report.delivered_per_s = rate;
    report.requests_per_s = Some(rate);
    report.latency_us = Percentiles::of(&shared.latency.merged());
    report.rss_peak_kib = a.pid.and_then(proc::peak_rss_kib);
    report.cpu(cpu, measured, total.replies_measuring);
    report.extra("unknown_replies", total.unknown);
    Ok(report)
}

/// The responder of the bus in use, connected and subscribed.
enum Started {
    Nats(nats::Responder),
    Redis(redis::Responder),
    Amqp(Box<amqp::Responder>),
}

/// The clients of the bus in use, connected and ready.
enum Clients {
    Nats(Vec<nats::NatsRequester>),
    Redis(Vec<redis::RedisRequester>),
    Amqp(Vec<amqp::AmqpRequester>),
}

/// What every client task gets.
struct Spawner<'a> {
    shared: &'a Arc<Shared>,
    inflight: usize,
    send_stop: &'a CancellationToken,
    hard_stop: &'a CancellationToken,
}

impl Spawner<'_> {
    /// Spawns a client task per requester.
    fn all<R: Requester>(&self, tasks: &mut JoinSet<ClientResult>, requesters: Vec<R>) {
        for (i, r) in requesters.into_iter().enumerate() {
            tasks.spawn(client_task(
                i,
                r,
                self.shared.clone(),
                self.inflight,
                self.send_stop.clone(),
                self.hard_stop.clone(),
            ));
        }
    }
}

/// One client: keeps `inflight` requests outstanding until told to stop sending, then waits for
/// the outstanding replies until the hard stop.
async fn client_task<R: Requester>(
    idx: usize,
    mut r: R,
    sh: Arc<Shared>,
    inflight: usize,
    send_stop: CancellationToken,
    hard_stop: CancellationToken,
) -> ClientResult {
    let mut res = ClientResult::default();
    // request number → send time (ns on the run's clock).
    let mut outstanding: HashMap<u32, u64> = HashMap::with_capacity(inflight * 2);
    let mut next: u32 = 1;
    let mut seqs: Vec<u32> = Vec::with_capacity(inflight);
    let mut got = Vec::with_capacity(inflight);
    let mut sending = true;
    let mut to_send = inflight;
    loop {
        if sending && send_stop.is_cancelled() {
            sending = false;
        }
        if sending && to_send > 0 {
            let now = sh.phase.clock.now_ns();
            seqs.clear();
            for _ in 0..to_send {
                seqs.push(next);
                outstanding.insert(next, now);
                next = next.wrapping_add(1).max(1);
            }
            res.sent += to_send as u64;
            let sent = tokio::select! {
                biased;
                _ = hard_stop.cancelled() => break,
                s = r.send(&seqs) => s,
            };
            if let Err(e) = sent {
                sh.errors.record(format!("client {idx}: {e}"));
                break;
            }
        }
        if !sending && outstanding.is_empty() {
            break;
        }
        got.clear();
        let received = tokio::select! {
            biased;
            _ = hard_stop.cancelled() => break,
            g = r.recv(&mut got) => g,
        };
        if let Err(e) = received {
            sh.errors.record(format!("client {idx}: {e}"));
            break;
        }
        let now = sh.phase.clock.now_ns();
        let measuring = sh.phase.measuring(now);
        let mut n = 0u64;
        {
            let mut hist = measuring.then(|| sh.latency.shard(idx));
            for body in &got {
                let sent = header(body).and_then(|(_, seq)| outstanding.remove(&seq));
                let Some(sent) = sent else {
                    res.unknown += 1;
                    continue;
                };
                n += 1;
                if let Some(h) = hist.as_deref_mut() {
                    h.saturating_record(now.saturating_sub(sent).max(1));
                }
            }
        }
        res.replies += n;
        if measuring {
            res.replies_measuring += n;
        }
        if n > 0 {
            sh.replies.fetch_add(n, Ordering::Relaxed);
        }
        to_send = n as usize;
    }
    res.unanswered = outstanding.len() as u64;
    res
}

/// A request body: client number, request number, then `x` up to `size` bytes (at least the
/// header).
pub(crate) fn body(client: u32, seq: u32, size: usize) -> Vec<u8> {
    let mut b = Vec::with_capacity(size.max(HEADER));
    b.extend_from_slice(&client.to_le_bytes());
    b.extend_from_slice(&seq.to_le_bytes());
    b.resize(size.max(HEADER), b'x');
    b
}

/// The (client number, request number) of a request or reply body.
pub(crate) fn header(body: &[u8]) -> Option<(u32, u32)> {
    let client = body.get(..4)?.try_into().ok().map(u32::from_le_bytes)?;
    let seq = body.get(4..8)?.try_into().ok().map(u32::from_le_bytes)?;
    Some((client, seq))
}

/// The URL without its password, for the report.
pub(crate) fn redact(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_owned();
    };
    let end = rest.find(['/', '?']).unwrap_or(rest.len());
    let (authority, tail) = rest.split_at(end);
    match authority.rsplit_once('@') {
        Some((userinfo, host)) => {
            let user = userinfo.split(':').next().unwrap_or_default();
            if userinfo.contains(':') {
                format!("{scheme}://{user}:***@{host}{tail}")
            } else {
                format!("{scheme}://{user}@{host}{tail}")
            }
        }
        None => url.to_owned(),
    }
}

/// A broker error of `bus` during `what`.
pub(crate) fn broker_err(
    bus: Bus,
    what: &'static str,
) -> impl FnOnce(&dyn std::fmt::Display) -> BenchError {
    move |e| BenchError::Broker {
        bus: bus.name(),
        what,
        why: e.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buses_from_schemes() {
        assert_eq!(Bus::of("nats://127.0.0.1:4222").unwrap(), Bus::Nats);
        assert_eq!(Bus::of("redis://127.0.0.1:6379/0").unwrap(), Bus::Redis);
        assert_eq!(Bus::of("amqp://guest:guest@h:5672/%2f").unwrap(), Bus::Amqp);
        assert!(Bus::of("mqtt://127.0.0.1:1883").is_err());
        assert!(Bus::of("127.0.0.1:4222").is_err());
    }

    #[test]
    fn bodies_carry_their_header() {
        let b = body(7, 0xdead_beef, 64);
        assert_eq!(b.len(), 64);
        assert_eq!(header(&b), Some((7, 0xdead_beef)));
        assert!(b[HEADER..].iter().all(|&c| c == b'x'));
        // Never shorter than the header.
        assert_eq!(body(1, 2, 0).len(), HEADER);
        assert_eq!(header(b"short"), None);
    }

    #[test]
    fn passwords_are_redacted() {
        assert_eq!(
            redact("amqp://guest:guest@127.0.0.1:5672/%2f"),
            "amqp://guest:***@127.0.0.1:5672/%2f"
        );
        assert_eq!(redact("nats://127.0.0.1:4222"), "nats://127.0.0.1:4222");
        assert_eq!(redact("redis://u@h:1/0"), "redis://u@h:1/0");
        assert_eq!(redact("no-scheme"), "no-scheme");
    }

    #[test]
    fn names_are_unique_per_run() {
        let n = Names::new('.');
        assert!(n.base.starts_with(&format!("wb.{}.", std::process::id())));
        assert!(!Names::new(':').base.contains('.'));
    }
}

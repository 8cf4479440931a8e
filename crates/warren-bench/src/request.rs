//! `request`: C clients each keep K requests in flight to a route with a msgid.
//!
//! A request is a PUBLISH on `<route>/<n>` (n counts per client) with a JSON body; the reply is
//! a PUBLISH on the same topic. warren's Echo module answers `{"Error":"","Result":<body>}`; a
//! reply whose `Error` is not empty counts as an error. The raw echo reference sends the request
//! itself back, which reads as a successful reply. Latency is from the request's write to the
//! reply's read; a reply that never comes counts as unanswered.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use hdrhistogram::Histogram;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use warren_proto::mqtt::{Packet, QoS};

use crate::args::{RequestArgs, seconds};
use crate::client::{Client, ConnectOptions, Writer, open_many};
use crate::latency::{Latency, Percentiles};
use crate::report::{Report, per_second, spawn_progress};
use crate::{BenchError, Clock, Errors, Phase, measure, proc, resolve};

/// Deadline for connecting each client.
const SETUP_TIMEOUT: Duration = Duration::from_secs(10);

/// State shared by every client task.
struct Shared {
    phase: Phase,
    latency: Latency,
    /// Replies so far (all clients), for the progress line.
    replies: AtomicU64,
    errors: Errors,
    /// Error replies (`Error` not empty).
    error_replies: AtomicU64,
}

/// What each client sends.
struct Plan {
    route: Vec<u8>,
    body: Vec<u8>,
    qos: QoS,
    inflight: usize,
    keep_alive: Duration,
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
pub async fn run(a: &RequestArgs, stop: CancellationToken) -> Result<Report, BenchError> {
    let c = &a.common;
    if a.clients == 0 || a.inflight == 0 {
        return Err(BenchError::Invalid(
            "--clients and --inflight must be at least 1".into(),
        ));
    }
    let qos = match a.qos {
        0 => QoS::AtMostOnce,
        1 => QoS::AtLeastOnce,
        q => {
            return Err(BenchError::Invalid(format!(
                "--qos must be 0 or 1, got {q}"
            )));
        }
    };
    if a.route.split('/').count() != 2 {
        return Err(BenchError::Invalid(format!(
            "--route must be Module/Handler, got {:?}",
            a.route
        )));
    }
    let duration = c.duration()?;
    let warmup = c.warmup()?;
    let drain = seconds("--drain", a.drain)?;
    let target = resolve(&c.target).await?;
    let login = c.login()?;
    let tag = std::process::id();

    let mut report = Report::new("request", target.to_string(), c.label.clone());
    report.param("clients", a.clients as u64);
    report.param("inflight", a.inflight as u64);
    report.param("route", a.route.clone());
    report.param("payload", a.payload as u64);
    report.param("qos", a.qos);
    report.rss_before_kib = c.pid.and_then(proc::rss_kib);

    let base = crate::connections::random_base();
    let clients = open_many(a.clients, c.ramp, 64, &stop, |i| {
        let o = ConnectOptions {
            target,
            source: crate::connections::source_for(
                target,
                i,
                crate::connections::SPREAD_PER_SOURCE,
                base,
            ),
            client_id: format!("wb-{tag}-r{i}"),
            keep_alive: c.keepalive,
            timeout: SETUP_TIMEOUT,
            read_chunk: 64 * 1024,
            login: login.clone(),
            clean_session: true,
        };
        async move { Client::connect(&o).await }
    })
    .await?;

    let shared = Arc::new(Shared {
        phase: Phase::new(Clock::new(), warmup, duration),
        latency: Latency::new(16),
        replies: AtomicU64::new(0),
        errors: Errors::default(),
        error_replies: AtomicU64::new(0),
    });
    let plan = Arc::new(Plan {
        route: a.route.as_bytes().to_vec(),
        body: json_body(a.payload),
        qos,
        inflight: a.inflight,
        keep_alive: Duration::from_secs(u64::from(c.keepalive.max(1))),
    });
    let send_stop = CancellationToken::new();
    let hard_stop = CancellationToken::new();
    let mut tasks = JoinSet::new();
    for (i, client) in clients.into_iter().enumerate() {
        tasks.spawn(client_task(
            i,
            client,
            shared.clone(),
            plan.clone(),
            send_stop.clone(),
            hard_stop.clone(),
        ));
    }

    let progress_stop = CancellationToken::new();
    let progress = {
        let sh = shared.clone();
        let mut last = 0u64;
        spawn_progress(c.quiet, progress_stop.clone(), move |elapsed| {
            let r = sh.replies.load(Ordering::Relaxed);
            let line = format!(
                "request {:>5.1}s {:<9} replies {:>10}/s  error replies {}  errors {}",
                elapsed.as_secs_f64(),
                sh.phase.name(sh.phase.clock.now_ns()),
                r - last,
                sh.error_replies.load(Ordering::Relaxed),
                sh.errors.count()
            );
            last = r;
            line
        })
    };

    let (cpu, interrupted) = measure(&shared.phase, c.pid, &stop).await;
    report.interrupted = interrupted;
    report.rss_after_kib = c.pid.and_then(proc::rss_kib);
    // Stop sending; clients leave once their outstanding replies are in, or at the drain end.
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
    progress_stop.cancel();
    let _ = progress.await;

    let measured = shared.phase.measured();
    let error_replies = shared.error_replies.load(Ordering::Relaxed);
    report.duration_s = (measured.as_secs_f64() * 1000.0).round() / 1000.0;
    report.warmup_s = warmup.as_secs_f64();
    report.published = total.sent;
    report.delivered = total.replies;
    report.lost = total.unanswered;
    report.errors = shared.errors.count() + error_replies;
    report.first_error = shared.errors.first();
    let rate = per_second(total.replies_measuring, measured);
    report.published_per_s = rate;
    report.delivered_per_s = rate;
    report.requests_per_s = Some(rate);
    report.latency_us = Percentiles::of(&shared.latency.merged());
    report.rss_peak_kib = c.pid.and_then(proc::peak_rss_kib);
    report.cpu(cpu, measured, total.replies_measuring);
    report.extra("error_replies", error_replies);
    report.extra("unknown_replies", total.unknown);
    Ok(report)
}

/// One client: keeps `plan.inflight` requests outstanding until told to stop sending, then
/// waits for the outstanding replies until the hard stop.
async fn client_task(
    idx: usize,
    mut client: Client,
    sh: Arc<Shared>,
    plan: Arc<Plan>,
    send_stop: CancellationToken,
    hard_stop: CancellationToken,
) -> ClientResult {
    let mut res = ClientResult::default();
    // msgid → send time (ns on the run's clock).
    let mut outstanding: HashMap<u32, u64> = HashMap::with_capacity(plan.inflight * 2);
    let mut next_id: u32 = 1;
    let mut topic = Vec::with_capacity(plan.route.len() + 11);
    let mut sending = true;
    let now = sh.phase.clock.now_ns();
    for _ in 0..plan.inflight {
        queue_request(
            &mut client.writer,
            &plan,
            &mut topic,
            &mut next_id,
            &mut outstanding,
            now,
        );
        res.sent += 1;
    }
    let ping = tokio::time::sleep(plan.keep_alive);
    tokio::pin!(ping);
    loop {
        if client.writer.queued() > 0 {
            if let Err(e) = client.writer.flush().await {
                sh.errors.record(format!("client {idx}: {e}"));
                break;
            }
            ping.as_mut()
                .reset(tokio::time::Instant::now() + plan.keep_alive);
        }
        if !sending && outstanding.is_empty() {
            break;
        }
        tokio::select! {
            biased;
            _ = hard_stop.cancelled() => break,
            _ = send_stop.cancelled(), if sending => {
                sending = false;
                continue;
            }
            r = client.reader.fill() => {
                if let Err(e) = r {
                    sh.errors.record(format!("client {idx}: {e}"));
                    break;
                }
            }
            () = &mut ping => {
                client.writer.queue(&Packet::PingReq);
                continue;
            }
        }
        let now = sh.phase.clock.now_ns();
        let measuring = sh.phase.measuring(now);
        let got = {
            let mut hist = measuring.then(|| sh.latency.shard(idx));
            absorb(&mut client, &mut outstanding, hist.as_deref_mut(), now)
        };
        let (n, errors, unknown) = match got {
            Ok(x) => x,
            Err(e) => {
                sh.errors.record(format!("client {idx}: {e}"));
                break;
            }
        };
        res.replies += n;
        res.unknown += unknown;
        if measuring {
            res.replies_measuring += n;
        }
        if n > 0 {
            sh.replies.fetch_add(n, Ordering::Relaxed);
        }
        if errors > 0 {
            sh.error_replies.fetch_add(errors, Ordering::Relaxed);
        }
        if sending {
            for _ in 0..n {
                queue_request(
                    &mut client.writer,
                    &plan,
                    &mut topic,
                    &mut next_id,
                    &mut outstanding,
                    now,
                );
                res.sent += 1;
            }
        }
    }
    res.unanswered = outstanding.len() as u64;
    client.writer.goodbye().await;
    res
}

/// Queues one request on `<route>/<next_id>` and remembers when it was sent.
fn queue_request(
    w: &mut Writer<crate::login::WriteIo>,
    plan: &Plan,
    topic: &mut Vec<u8>,
    next_id: &mut u32,
    outstanding: &mut HashMap<u32, u64>,
    now: u64,
) {
    let id = *next_id;
    *next_id = next_id.wrapping_add(1).max(1);
    topic.clear();
    topic.extend_from_slice(&plan.route);
    topic.push(b'/');
    push_decimal(topic, id);
    // QoS 1 packet ids: the msgid's low 16 bits, never 0.
    let pkid = match plan.qos {
        QoS::AtMostOnce => 0,
        _ => (id % 65_535) as u16 + 1,
    };
    w.queue_publish(topic, plan.qos, pkid, &plan.body);
    outstanding.insert(id, now);
}

/// Decodes every complete packet buffered: matches replies to outstanding requests, records
/// their latency, acknowledges QoS 1. Returns (replies, error replies, unmatched publishes).
fn absorb(
    client: &mut Client,
    outstanding: &mut HashMap<u32, u64>,
    mut hist: Option<&mut Histogram<u64>>,
    now: u64,
) -> Result<(u64, u64, u64), BenchError> {
    let (mut n, mut errors, mut unknown) = (0, 0, 0);
    while let Some(packet) = client.reader.next_packet()? {
        let Packet::Publish(p) = packet else {
            continue;
        };
        if p.qos == QoS::AtLeastOnce {
            client.writer.queue_puback(p.pkid);
        }
        let sent = msgid(&p.topic).and_then(|id| outstanding.remove(&id));
        let Some(sent) = sent else {
            unknown += 1;
            continue;
        };
        n += 1;
        if is_error_reply(&p.payload) {
            errors += 1;
        }
        if let Some(h) = hist.as_deref_mut() {
            h.saturating_record(now.saturating_sub(sent).max(1));
        }
    }
    Ok((n, errors, unknown))
}

/// The msgid: the decimal number after the topic's last `/`.
fn msgid(topic: &[u8]) -> Option<u32> {
    let pos = topic.iter().rposition(|&b| b == b'/')?;
    let digits = topic.get(pos + 1..)?;
    std::str::from_utf8(digits).ok()?.parse().ok()
}

/// Whether a reply is `{"Error":"<something>",…}` with a non-empty error.
fn is_error_reply(body: &[u8]) -> bool {
    const PREFIX: &[u8] = b"{\"Error\":\"";
    body.starts_with(PREFIX) && body.get(PREFIX.len()) != Some(&b'"')
}

/// Appends `n` in decimal without allocating.
fn push_decimal(out: &mut Vec<u8>, mut n: u32) {
    let mut digits = [0u8; 10];
    let mut i = digits.len();
    loop {
        i -= 1;
        digits[i] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    out.extend_from_slice(&digits[i..]);
}

/// A JSON object of exactly `size` bytes where possible (`{"p":"xxx…"}`, at least 8 bytes).
fn json_body(size: usize) -> Vec<u8> {
    let pad = size.saturating_sub(8);
    let mut b = Vec::with_capacity(pad + 8);
    b.extend_from_slice(b"{\"p\":\"");
    b.resize(6 + pad, b'x');
    b.extend_from_slice(b"\"}");
    b
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn msgids_from_topics() {
        assert_eq!(msgid(b"Echo/HD_Echo/17"), Some(17));
        assert_eq!(msgid(b"Echo/HD_Echo/"), None);
        assert_eq!(msgid(b"Echo/HD_Echo/x"), None);
        assert_eq!(msgid(b"nothing"), None);
    }

    #[test]
    fn decimal_digits() {
        for n in [0u32, 7, 10, 65_535, u32::MAX] {
            let mut v = b"a/".to_vec();
            push_decimal(&mut v, n);
            assert_eq!(v, format!("a/{n}").into_bytes());
        }
    }

    #[test]
    fn error_replies() {
        assert!(!is_error_reply(br#"{"Error":"","Result":{"p":"x"}}"#));
        assert!(is_error_reply(
            br#"{"Error":"Service(type:Echo) not found","Result":null}"#
        ));
        // The echo reference sends the request back.
        assert!(!is_error_reply(br#"{"p":"xxxx"}"#));
    }

    #[test]
    fn bodies_are_json_of_the_asked_size() {
        for size in [0, 8, 64, 1000] {
            let b = json_body(size);
            assert_eq!(b.len(), size.max(8));
            let v: serde_json::Value = serde_json::from_slice(&b).unwrap();
            assert!(v["p"].is_string());
        }
    }
}

//! `pubsub`: P publishers → S subscribers on one topic.
//!
//! Closed loop (default): each publisher stays at most `--window` messages ahead of the slowest
//! subscriber ([`crate::window`]), which measures saturation throughput with bounded queues.
//! Fixed rate (`--rate R`): publishers send R messages per second in total, and the latency
//! figures are the point. Every payload carries its publisher, sequence number and send time
//! ([`crate::payload`]), so subscribers account for loss ([`crate::loss`]) and latency on their
//! own. Messages that a publisher sends late because it was held back are stamped with the time
//! they were due (no coordinated omission); timer jitter below [`LATE`] is not counted.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use hdrhistogram::Histogram;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use warren_proto::mqtt::{Packet, QoS};

use crate::args::{PubsubArgs, seconds};
use crate::client::{Client, ConnectOptions, Reader, open_many};
use crate::latency::{Latency, Percentiles};
use crate::loss::SeqTracker;
use crate::payload::{self, HEADER_LEN, Stamp};
use crate::report::{Report, per_second, spawn_progress};
use crate::window::{Progress, Window};
use crate::{BenchError, Clock, Errors, Phase, measure, proc, resolve};

/// Most messages a publisher encodes into one write.
const BATCH: u64 = 1024;

/// How late a fixed-rate message may go out before it is stamped with its due time.
pub const LATE: Duration = Duration::from_millis(2);

/// Deadline for connecting and subscribing each client.
const SETUP_TIMEOUT: Duration = Duration::from_secs(10);

/// Longest wait for messages in flight after publishing stops.
const MAX_DRAIN: Duration = Duration::from_secs(30);

/// Read room for a subscriber: large, because fan-out arrives in big writes.
const SUB_READ_CHUNK: usize = 64 * 1024;

/// State shared by every task of the run.
struct Shared {
    phase: Phase,
    progress: Progress,
    latency: Latency,
    /// Messages sent so far (all publishers), for the progress line.
    published: AtomicU64,
    /// Messages received so far (all subscribers), for the progress line.
    delivered: AtomicU64,
    errors: Errors,
}

/// Settings every publisher task uses.
struct PubConfig {
    topic: Arc<[u8]>,
    qos: QoS,
    payload: usize,
    window: u64,
    /// Messages per second for this publisher, or `None` for the closed loop.
    rate: Option<f64>,
    stall_timeout: Duration,
    keep_alive: Duration,
}

/// What a publisher task reports at the end.
#[derive(Debug, Default)]
struct PubResult {
    sent: u64,
    sent_measuring: u64,
    stalls: u64,
}

/// What a subscriber task reports at the end.
#[derive(Debug, Default)]
struct SubResult {
    trackers: Vec<SeqTracker>,
    received_measuring: u64,
    disconnected: bool,
}

/// Runs the scenario and returns its report.
pub async fn run(a: &PubsubArgs, stop: CancellationToken) -> Result<Report, BenchError> {
    let c = &a.common;
    if a.publishers == 0 || a.subscribers == 0 {
        return Err(BenchError::Invalid(
            "--publishers and --subscribers must be at least 1".into(),
        ));
    }
    if a.payload < HEADER_LEN {
        return Err(BenchError::Invalid(format!(
            "--payload must be at least {HEADER_LEN} bytes (publisher, sequence, timestamp)"
        )));
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
    if let Some(r) = a.rate
        && !(r.is_finite() && r > 0.0)
    {
        return Err(BenchError::Invalid(format!(
            "--rate must be a positive number, got {r}"
        )));
    }
    let duration = c.duration()?;
    let warmup = c.warmup()?;
    let stall_timeout = seconds("--stall-timeout", a.stall_timeout)?;
    let drain = seconds("--drain", a.drain)?;
    let target = resolve(&c.target).await?;
    let login = c.login()?;
    let topic = a
        .topic
        .clone()
        .unwrap_or_else(|| format!("bench/{}", std::process::id()));
    let keep_alive = Duration::from_secs(u64::from(c.keepalive.max(1)));
    let tag = std::process::id();

    let mut report = Report::new("pubsub", target.to_string(), c.label.clone());
    report.param("publishers", a.publishers as u64);
    report.param("subscribers", a.subscribers as u64);
    report.param("payload", a.payload as u64);
    report.param("qos", a.qos);
    report.param("persistent", a.persistent);
    report.param(
        "mode",
        if a.rate.is_some() {
            "fixed-rate"
        } else {
            "closed-loop"
        },
    );
    report.param("window", a.window());
    if let Some(r) = a.rate {
        report.param("rate", r);
    }
    report.param("topic", topic.clone());
    report.rss_before_kib = c.pid.and_then(proc::rss_kib);

    // Subscribers first, each with its SUBACK, so that no message is published before
    // everyone listens.
    let base = crate::connections::random_base();
    let subscribers_n = a.subscribers;
    let persistent = a.persistent;
    let options = move |kind: &str, i: usize| ConnectOptions {
        target,
        // subscribers first, then publishers, spread over loopback source addresses
        source: crate::connections::source_for(
            target,
            if kind == "p" { subscribers_n + i } else { i },
            crate::connections::SPREAD_PER_SOURCE,
            base,
        ),
        client_id: if persistent && kind == "s" {
            format!("wb-persist-s{i}")
        } else {
            format!("wb-{tag}-{kind}{i}")
        },
        keep_alive: c.keepalive,
        timeout: SETUP_TIMEOUT,
        read_chunk: SUB_READ_CHUNK,
        login: login.clone(),
        clean_session: !(persistent && kind == "s"),
    };
    let subscribers = {
        let topic = topic.clone();
        open_many(a.subscribers, c.ramp, 64, &stop, |i| {
            let o = options("s", i);
            let topic = topic.clone();
            async move {
                if !o.clean_session {
                    // discard what an earlier run left under this id
                    let clean = ConnectOptions {
                        clean_session: true,
                        ..o.clone()
                    };
                    Client::connect(&clean).await?.close(SETUP_TIMEOUT).await;
                }
                let mut client = Client::connect(&o).await?;
                client.subscribe(&topic, qos, SETUP_TIMEOUT).await?;
                Ok(client)
            }
        })
        .await?
    };
    let publishers = open_many(a.publishers, c.ramp, 64, &stop, |i| {
        let o = ConnectOptions {
            read_chunk: 4096,
            ..options("p", i)
        };
        async move { Client::connect(&o).await }
    })
    .await?;

    let shared = Arc::new(Shared {
        phase: Phase::new(Clock::new(), warmup, duration),
        progress: Progress::new(a.publishers, a.subscribers),
        latency: Latency::new(16),
        published: AtomicU64::new(0),
        delivered: AtomicU64::new(0),
        errors: Errors::default(),
    });

    let sub_stop = CancellationToken::new();
    let mut sub_tasks = JoinSet::new();
    for (i, client) in subscribers.into_iter().enumerate() {
        sub_tasks.spawn(subscriber(
            i,
            client,
            a.publishers,
            shared.clone(),
            sub_stop.clone(),
            keep_alive,
        ));
    }
    let pub_stop = CancellationToken::new();
    let config = Arc::new(PubConfig {
        topic: topic.as_bytes().into(),
        qos,
        payload: a.payload,
        window: a.window(),
        rate: a.rate.map(|r| r / a.publishers as f64),
        stall_timeout,
        keep_alive,
    });
    let mut pub_tasks = JoinSet::new();
    for (i, client) in publishers.into_iter().enumerate() {
        pub_tasks.spawn(publisher(
            i,
            client,
            shared.clone(),
            config.clone(),
            pub_stop.clone(),
        ));
    }

    let progress_stop = CancellationToken::new();
    let progress = {
        let sh = shared.clone();
        let (mut last_p, mut last_d) = (0u64, 0u64);
        spawn_progress(c.quiet, progress_stop.clone(), move |elapsed| {
            let p = sh.published.load(Ordering::Relaxed);
            let d = sh.delivered.load(Ordering::Relaxed);
            let line = format!(
                "pubsub {:>5.1}s {:<9} published {:>10}/s  delivered {:>11}/s  errors {}",
                elapsed.as_secs_f64(),
                sh.phase.name(sh.phase.clock.now_ns()),
                p - last_p,
                d - last_d,
                sh.errors.count()
            );
            (last_p, last_d) = (p, d);
            line
        })
    };

    // Run until the measured span ends or we are stopped.
    let (cpu, interrupted) = measure(&shared.phase, c.pid, &stop).await;
    report.interrupted = interrupted;
    report.rss_after_kib = c.pid.and_then(proc::rss_kib);
    pub_stop.cancel();
    let mut sent = vec![0u64; a.publishers];
    let mut sent_measuring = 0;
    let mut stalls = 0;
    while let Some(r) = pub_tasks.join_next().await {
        let (i, r) = r.map_err(|e| BenchError::Task(e.to_string()))?;
        if let Some(s) = sent.get_mut(i) {
            *s = r.sent;
        }
        sent_measuring += r.sent_measuring;
        stalls += r.stalls;
    }

    // Give messages in flight time to land, as long as they keep arriving.
    let hard_end = tokio::time::Instant::now() + MAX_DRAIN;
    let mut quiet_end = tokio::time::Instant::now() + drain;
    let mut last = shared.delivered.load(Ordering::Relaxed);
    loop {
        let now = tokio::time::Instant::now();
        let done = sent
            .iter()
            .enumerate()
            .all(|(p, &n)| shared.progress.min(p) >= n);
        if done || now >= hard_end || now >= quiet_end {
            break;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
        let d = shared.delivered.load(Ordering::Relaxed);
        if d != last {
            last = d;
            quiet_end = tokio::time::Instant::now() + drain;
        }
    }
    sub_stop.cancel();
    let mut totals = SeqTracker::default();
    let mut lost = 0;
    let mut received_measuring = 0;
    let mut disconnects = 0u64;
    while let Some(r) = sub_tasks.join_next().await {
        let r = r.map_err(|e| BenchError::Task(e.to_string()))?;
        for (p, t) in r.trackers.iter().enumerate() {
            totals.merge_counts(t);
            lost += t.lost(sent.get(p).copied().unwrap_or(0));
        }
        received_measuring += r.received_measuring;
        disconnects += u64::from(r.disconnected);
    }
    progress_stop.cancel();
    let _ = progress.await;

    let measured = shared.phase.measured();
    report.duration_s = (measured.as_secs_f64() * 1000.0).round() / 1000.0;
    report.warmup_s = warmup.as_secs_f64();
    report.published = sent.iter().sum();
    report.delivered = totals.received();
    report.lost = lost;
    report.errors = shared.errors.count();
    report.first_error = shared.errors.first();
    report.published_per_s = per_second(sent_measuring, measured);
    report.delivered_per_s = per_second(received_measuring, measured);
    report.latency_us = Percentiles::of(&shared.latency.merged());
    report.rss_peak_kib = c.pid.and_then(proc::peak_rss_kib);
    report.cpu(cpu, measured, received_measuring);
    report.extra("duplicates", totals.late());
    report.extra("stalls", stalls);
    report.extra("disconnects", disconnects);
    Ok(report)
}

/// One subscriber connection: reads, accounts for every message, acknowledges QoS 1, pings
/// when idle, and reports its progress to the publishers.
async fn subscriber(
    idx: usize,
    mut client: Client,
    publishers: usize,
    sh: Arc<Shared>,
    stop: CancellationToken,
    keep_alive: Duration,
) -> SubResult {
    let mut res = SubResult {
        trackers: vec![SeqTracker::default(); publishers],
        ..SubResult::default()
    };
    let mut before = vec![0u64; publishers];
    let ping = tokio::time::sleep(keep_alive);
    tokio::pin!(ping);
    loop {
        tokio::select! {
            biased;
            _ = stop.cancelled() => break,
            r = client.reader.fill() => {
                if let Err(e) = r {
                    sh.errors.record(format!("subscriber {idx}: {e}"));
                    res.disconnected = true;
                    break;
                }
            }
            () = &mut ping => {
                client.writer.queue(&Packet::PingReq);
                ping.as_mut().reset(tokio::time::Instant::now() + keep_alive);
            }
        }
        let now = sh.phase.clock.now_ns();
        let measuring = sh.phase.measuring(now);
        for (b, t) in before.iter_mut().zip(&res.trackers) {
            *b = t.progress();
        }
        let got = {
            let mut hist = measuring.then(|| sh.latency.shard(idx));
            absorb(&mut client, &mut res.trackers, hist.as_deref_mut(), now)
        };
        let n = match got {
            Ok(n) => n,
            Err(e) => {
                sh.errors.record(format!("subscriber {idx}: {e}"));
                res.disconnected = true;
                break;
            }
        };
        if measuring {
            res.received_measuring += n;
        }
        for (p, (t, old)) in res.trackers.iter().zip(&before).enumerate() {
            if t.progress() != *old {
                sh.progress.update(p, idx, *old, t.progress());
            }
        }
        if n > 0 {
            sh.delivered.fetch_add(n, Ordering::Relaxed);
        }
        if client.writer.queued() > 0
            && let Err(e) = client.writer.flush().await
        {
            sh.errors.record(format!("subscriber {idx}: {e}"));
            res.disconnected = true;
            break;
        }
    }
    if res.disconnected {
        sh.progress.gone(idx);
    } else {
        client.writer.goodbye().await;
    }
    res
}

/// Decodes every complete packet buffered in `client`: accounts for publishes (and queues
/// their PUBACKs), records latency into `hist` when measuring. Returns the publishes seen.
fn absorb(
    client: &mut Client,
    trackers: &mut [SeqTracker],
    mut hist: Option<&mut Histogram<u64>>,
    now: u64,
) -> Result<u64, BenchError> {
    let mut n = 0;
    while let Some(packet) = client.reader.next_packet()? {
        let Packet::Publish(p) = packet else {
            continue;
        };
        n += 1;
        if p.qos == QoS::AtLeastOnce {
            client.writer.queue_puback(p.pkid);
        }
        let Some(s) = payload::read(&p.payload) else {
            continue;
        };
        if let Some(t) = trackers.get_mut(s.publisher as usize) {
            t.record(s.seq);
        }
        if let Some(h) = hist.as_deref_mut() {
            h.saturating_record(now.saturating_sub(s.sent_ns).max(1));
        }
    }
    Ok(n)
}

/// Why a blocked publisher stopped waiting.
enum Wait {
    /// The subscribers caught up.
    Ready,
    /// The slowest subscriber made no progress for the stall timeout; the window moved on.
    Stalled,
    /// The run is over.
    Stopped,
}

/// One publisher connection: sends as the window (closed loop) or the schedule (fixed rate)
/// allows, one write per batch. Its read side runs in a helper task that counts PUBACKs.
async fn publisher(
    idx: usize,
    client: Client,
    sh: Arc<Shared>,
    cfg: Arc<PubConfig>,
    stop: CancellationToken,
) -> (usize, PubResult) {
    let Client { reader, mut writer } = client;
    let acked = Arc::new(AtomicU64::new(0));
    let ack_wake = Arc::new(tokio::sync::Notify::new());
    let reader_stop = CancellationToken::new();
    let reader_task = tokio::spawn(publisher_reader(
        idx,
        reader,
        acked.clone(),
        ack_wake.clone(),
        sh.clone(),
        reader_stop.clone(),
    ));

    let mut res = PubResult::default();
    let mut window = Window::new(cfg.window);
    let qos1 = cfg.qos == QoS::AtLeastOnce;
    // Packet ids must not be reused while unacknowledged.
    let inflight_cap = if qos1 {
        cfg.window.min(65_000)
    } else {
        u64::MAX
    };
    let mut pkid: u16 = 0;
    let mut body = vec![b'x'; cfg.payload];
    let start_ns = sh.phase.clock.now_ns();
    let late_ns = u64::try_from(LATE.as_nanos()).unwrap_or(u64::MAX);
    let mut last_write = tokio::time::Instant::now();

    'run: loop {
        if stop.is_cancelled() {
            break;
        }
        let unacked = window.sent() - acked.load(Ordering::Acquire).min(window.sent());
        let allowance = window.allowance().min(inflight_cap.saturating_sub(unacked));
        if allowance == 0 {
            let wait = if window.allowance() == 0 {
                wait_for_subscribers(idx, &sh.progress, &mut window, &stop, cfg.stall_timeout).await
            } else {
                tokio::select! {
                    biased;
                    _ = stop.cancelled() => Wait::Stopped,
                    _ = ack_wake.notified() => Wait::Ready,
                    _ = tokio::time::sleep(Duration::from_millis(100)) => Wait::Ready,
                }
            };
            match wait {
                Wait::Ready => {}
                Wait::Stalled => res.stalls += 1,
                Wait::Stopped => break,
            }
            continue;
        }
        let now = sh.phase.clock.now_ns();
        let n = match cfg.rate {
            None => allowance.min(BATCH),
            Some(rate) => {
                let due = due_count(now.saturating_sub(start_ns), rate);
                let behind = due.saturating_sub(window.sent());
                if behind == 0 {
                    let next = start_ns + scheduled_ns(window.sent(), rate);
                    // Idle publishers ping so the server keeps them.
                    let ping_at = last_write + cfg.keep_alive;
                    tokio::select! {
                        biased;
                        _ = stop.cancelled() => break 'run,
                        _ = tokio::time::sleep_until(sh.phase.clock.at(next)) => {}
                        _ = tokio::time::sleep_until(ping_at) => {
                            writer.queue(&Packet::PingReq);
                            if writer.flush().await.is_err() {
                                break 'run;
                            }
                            last_write = tokio::time::Instant::now();
                        }
                    }
                    continue;
                }
                behind.min(allowance).min(BATCH)
            }
        };
        for i in 0..n {
            let seq = window.sent() + i;
            let sent_ns = match cfg.rate {
                None => now,
                Some(rate) => {
                    let due = start_ns + scheduled_ns(seq, rate);
                    if now > due + late_ns { due } else { now }
                }
            };
            payload::write(
                &mut body,
                Stamp {
                    publisher: u32::try_from(idx).unwrap_or(u32::MAX),
                    seq,
                    sent_ns,
                },
            );
            let id = if qos1 {
                pkid = if pkid == u16::MAX { 1 } else { pkid + 1 };
                pkid
            } else {
                0
            };
            writer.queue_publish(&cfg.topic, cfg.qos, id, &body);
        }
        window.record_sent(n);
        if sh.phase.measuring(now) {
            res.sent_measuring += n;
        }
        sh.published.fetch_add(n, Ordering::Relaxed);
        let flushed = tokio::select! {
            biased;
            r = writer.flush() => r,
            _ = stop.cancelled() => {
                // Finish the batch already counted as sent, unless the server stopped reading.
                match tokio::time::timeout(Duration::from_secs(1), writer.flush()).await {
                    Ok(r) => r,
                    Err(_) => Err(BenchError::Timeout { what: "the server to read", after: Duration::from_secs(1) }),
                }
            }
        };
        if let Err(e) = flushed {
            sh.errors.record(format!("publisher {idx}: {e}"));
            break;
        }
        last_write = tokio::time::Instant::now();
    }
    res.sent = window.sent();
    // QoS 1: let the last PUBACKs arrive before closing.
    if qos1 {
        let until = tokio::time::Instant::now() + Duration::from_secs(1);
        while acked.load(Ordering::Acquire) < res.sent && tokio::time::Instant::now() < until {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }
    reader_stop.cancel();
    let _ = reader_task.await;
    writer.goodbye().await;
    (idx, res)
}

/// Waits until every subscriber has reached the window's resume point, the slowest one makes
/// no progress for `stall_timeout`, or the run stops.
async fn wait_for_subscribers(
    idx: usize,
    progress: &Progress,
    window: &mut Window,
    stop: &CancellationToken,
    stall_timeout: Duration,
) -> Wait {
    let target = window.resume_at();
    progress.wait_for(idx, target);
    let mut from = 0;
    let mut last = (usize::MAX, 0);
    let mut quiet_since = tokio::time::Instant::now();
    loop {
        match progress.first_behind(idx, from, target) {
            None => {
                window.advance(target);
                return Wait::Ready;
            }
            Some((s, v)) => {
                from = s;
                if (s, v) != last {
                    last = (s, v);
                    quiet_since = tokio::time::Instant::now();
                } else if quiet_since.elapsed() >= stall_timeout {
                    window.advance(target);
                    return Wait::Stalled;
                }
            }
        }
        let Some(notified) = progress.notified(idx) else {
            return Wait::Stopped;
        };
        tokio::select! {
            biased;
            _ = stop.cancelled() => return Wait::Stopped,
            _ = notified => {}
            _ = tokio::time::sleep(Duration::from_millis(100)) => {}
        }
    }
}

/// A publisher's read side: counts PUBACKs and ignores everything else.
async fn publisher_reader(
    idx: usize,
    mut reader: Reader<crate::login::ReadIo>,
    acked: Arc<AtomicU64>,
    wake: Arc<tokio::sync::Notify>,
    sh: Arc<Shared>,
    stop: CancellationToken,
) {
    loop {
        let r = tokio::select! {
            biased;
            _ = stop.cancelled() => return,
            r = reader.fill() => r,
        };
        let mut acks = 0;
        let r = r.and_then(|()| {
            while let Some(p) = reader.next_packet()? {
                if let Packet::PubAck(_) = p {
                    acks += 1;
                }
            }
            Ok(())
        });
        if acks > 0 {
            acked.fetch_add(acks, Ordering::Release);
            wake.notify_one();
        }
        if let Err(e) = r {
            if !stop.is_cancelled() {
                sh.errors.record(format!("publisher {idx}: {e}"));
            }
            return;
        }
    }
}

/// Messages due `elapsed_ns` after the start at `rate` per second (the first is due at once).
fn due_count(elapsed_ns: u64, rate: f64) -> u64 {
    (elapsed_ns as f64 * rate / 1e9) as u64 + 1
}

/// When message `seq` is due, in ns after the start.
fn scheduled_ns(seq: u64, rate: f64) -> u64 {
    (seq as f64 * 1e9 / rate) as u64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fixed_rate_schedule() {
        // 500/s: one message every 2 ms, the first at once.
        assert_eq!(due_count(0, 500.0), 1);
        assert_eq!(due_count(1_999_999, 500.0), 1);
        assert_eq!(due_count(2_000_000, 500.0), 2);
        assert_eq!(due_count(1_000_000_000, 500.0), 501);
        assert_eq!(scheduled_ns(0, 500.0), 0);
        assert_eq!(scheduled_ns(3, 500.0), 6_000_000);
    }
}

//! `connections`: open N connections, hold them idle with keepalive, and measure what they
//! cost: how fast the server accepts them (connect + CONNACK), how many fail, and, with
//! `--pid`, how much resident memory the server holds per idle connection.
//!
//! One source address has only ~28 k ephemeral ports, so on a loopback target the connections
//! bind to source addresses 127.a.b.c, `per_source` each, from a random start every run.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use warren_proto::mqtt::Packet;

use crate::args::{ConnectionsArgs, seconds};
use crate::client::{Client, ConnectOptions};
use crate::latency::{Latency, Percentiles};
use crate::report::{Report, per_second, spawn_progress};
use crate::{BenchError, Errors, proc, resolve};

/// Counters shared by the connection tasks.
#[derive(Debug)]
struct Shared {
    opened: AtomicU64,
    failed: AtomicU64,
    /// Connections the server closed while they were held.
    dropped: AtomicU64,
    /// Connections that finished trying (opened or failed).
    settled: AtomicU64,
    errors: Errors,
    /// Connect + CONNACK time.
    latency: Latency,
}

/// Runs the scenario and returns its report.
pub async fn run(a: &ConnectionsArgs, stop: CancellationToken) -> Result<Report, BenchError> {
    let c = &a.common;
    if a.count == 0 || a.per_source == 0 {
        return Err(BenchError::Invalid(
            "--count and --per-source must be at least 1".into(),
        ));
    }
    let hold = c.duration()?;
    let settle = seconds("--settle", a.settle)?;
    let connect_timeout = seconds("--connect-timeout", a.connect_timeout)?;
    let target = resolve(&c.target).await?;
    let login = c.login()?;
    if let Some(limit) = proc::open_files_limit()
        && (a.count as u64).saturating_add(64) > limit
    {
        eprintln!(
            "warning: {} connections need more open files than this process may have ({limit}); raise `ulimit -n`",
            a.count
        );
    }
    let mut report = Report::new("connections", target.to_string(), c.label.clone());
    report.param("count", a.count as u64);
    report.param("per_source", a.per_source as u64);
    report.param("ramp", c.ramp);
    report.param("keepalive", c.keepalive);
    report.param("latency", "connect + CONNACK");
    report.rss_before_kib = c.pid.and_then(proc::rss_kib);

    let sh = Arc::new(Shared {
        opened: AtomicU64::new(0),
        failed: AtomicU64::new(0),
        dropped: AtomicU64::new(0),
        settled: AtomicU64::new(0),
        errors: Errors::default(),
        latency: Latency::new(4),
    });
    let progress_stop = CancellationToken::new();
    let progress = {
        let sh = sh.clone();
        let count = a.count;
        spawn_progress(c.quiet, progress_stop.clone(), move |elapsed| {
            format!(
                "connections {:>5.1}s open {:>6}/{count}  failed {}  dropped {}",
                elapsed.as_secs_f64(),
                sh.opened.load(Ordering::Relaxed) - sh.dropped.load(Ordering::Relaxed),
                sh.failed.load(Ordering::Relaxed),
                sh.dropped.load(Ordering::Relaxed),
            )
        })
    };

    let hold_stop = CancellationToken::new();
    let tracker = TaskTracker::new();
    let gate = Arc::new(Semaphore::new(a.concurrency.max(1)));
    let keep_alive = Duration::from_secs(u64::from(c.keepalive.max(1)));
    let tag = std::process::id();
    let base = random_base();
    let start = Instant::now();
    let mut started = 0usize;
    'spawn: for i in 0..a.count {
        if c.ramp > 0.0 {
            let at = start + Duration::from_secs_f64(i as f64 / c.ramp);
            tokio::select! {
                _ = stop.cancelled() => break 'spawn,
                _ = tokio::time::sleep_until(at) => {}
            }
        }
        let permit = tokio::select! {
            _ = stop.cancelled() => break 'spawn,
            p = gate.clone().acquire_owned() => match p {
                Ok(p) => p,
                Err(_) => break 'spawn,
            },
        };
        let o = ConnectOptions {
            target,
            source: source_for(target, i, a.per_source, base),
            client_id: format!("wb-{tag}-c{i}"),
            keep_alive: c.keepalive,
            timeout: connect_timeout,
            read_chunk: 64,
            login: login.clone(),
            clean_session: true,
        };
        tracker.spawn(idle_connection(
            o,
            permit,
            sh.clone(),
            hold_stop.clone(),
            keep_alive,
        ));
        started += 1;
    }
    // Wait for every attempt to finish.
    while sh.settled.load(Ordering::Acquire) < started as u64 && !stop.is_cancelled() {
        tokio::select! {
            _ = stop.cancelled() => {}
            _ = tokio::time::sleep(Duration::from_millis(10)) => {}
        }
    }
    let connect_time = start.elapsed();
    let opened = sh.opened.load(Ordering::Acquire);

    // Let the server settle, read its memory, then hold.
    tokio::select! {
        _ = stop.cancelled() => {}
        _ = tokio::time::sleep(settle) => {}
    }
    report.rss_after_kib = c.pid.and_then(proc::rss_kib);
    let held_from = Instant::now();
    tokio::select! {
        _ = stop.cancelled() => {}
        _ = tokio::time::sleep(hold) => {}
    }
    let held = held_from.elapsed();
    report.rss_peak_kib = c.pid.and_then(proc::peak_rss_kib);
    report.interrupted = stop.is_cancelled();

    hold_stop.cancel();
    tracker.close();
    if tokio::time::timeout(Duration::from_secs(10), tracker.wait())
        .await
        .is_err()
    {
        sh.errors
            .record("connections still closing after 10 s; abandoned");
    }
    progress_stop.cancel();
    let _ = progress.await;

    let failed = sh.failed.load(Ordering::Acquire);
    let dropped = sh.dropped.load(Ordering::Acquire);
    report.duration_s = (held.as_secs_f64() * 1000.0).round() / 1000.0;
    report.errors = sh.errors.count();
    report.first_error = sh.errors.first();
    report.latency_us = Percentiles::of(&sh.latency.merged());
    report.extra("attempted", started as u64);
    report.extra("opened", opened);
    report.extra("failed", failed);
    report.extra("dropped", dropped);
    report.extra(
        "connect_s",
        (connect_time.as_secs_f64() * 1000.0).round() / 1000.0,
    );
    report.extra("connect_per_s", per_second(opened, connect_time));
    if let (Some(b), Some(a)) = (report.rss_before_kib, report.rss_after_kib)
        && opened > 0
    {
        let per = (a.saturating_sub(b) * 1024) as f64 / opened as f64;
        report.extra("bytes_per_conn", per.round());
    }
    Ok(report)
}

/// One idle connection: connect, then read (and discard) until told to stop, pinging once
/// per keepalive interval; DISCONNECT at the end.
async fn idle_connection(
    o: ConnectOptions,
    permit: OwnedSemaphorePermit,
    sh: Arc<Shared>,
    stop: CancellationToken,
    keep_alive: Duration,
) {
    let t = Instant::now();
    let connected = Client::connect(&o).await;
    drop(permit);
    let mut client = match connected {
        Ok(c) => {
            let ns = u64::try_from(t.elapsed().as_nanos()).unwrap_or(u64::MAX);
            sh.latency.shard(0).saturating_record(ns.max(1));
            sh.opened.fetch_add(1, Ordering::Release);
            sh.settled.fetch_add(1, Ordering::Release);
            c
        }
        Err(e) => {
            sh.failed.fetch_add(1, Ordering::Release);
            sh.errors.record(format!("{}: {e}", o.client_id));
            sh.settled.fetch_add(1, Ordering::Release);
            return;
        }
    };
    let ping = tokio::time::sleep(keep_alive);
    tokio::pin!(ping);
    loop {
        tokio::select! {
            biased;
            _ = stop.cancelled() => {
                client.close(Duration::from_secs(2)).await;
                return;
            }
            r = client.reader.fill() => {
                let r = r.and_then(|()| {
                    while client.reader.next_packet()?.is_some() {}
                    Ok(())
                });
                if let Err(e) = r {
                    sh.dropped.fetch_add(1, Ordering::Release);
                    sh.errors.record(format!("{}: {e}", o.client_id));
                    return;
                }
            }
            () = &mut ping => {
                client.writer.queue(&Packet::PingReq);
                if let Err(e) = client.writer.flush().await {
                    sh.dropped.fetch_add(1, Ordering::Release);
                    sh.errors.record(format!("{}: {e}", o.client_id));
                    return;
                }
                ping.as_mut().reset(Instant::now() + keep_alive);
            }
        }
    }
}

/// First source port used on each source address.
const FIRST_PORT: u16 = 20_000;

/// Most connections per source address (ports 20 000 to 60 000).
const MAX_PER_SOURCE: usize = 40_000;

/// Connections per source address in the `pubsub` and `request` scenarios: below the per-address
/// caps servers keep (warren's `[limits] max_conn_per_ip` is 1000 by default), so 1 → 1000
/// fan-out measures delivery, not a server's defence against one address opening everything.
pub(crate) const SPREAD_PER_SOURCE: usize = 250;

/// The local address connection `i` binds to on a loopback IPv4 target: 127.a.b.c (c never 0
/// or 255) starting at address number `base`, `per_source` connections per address on ports
/// from 20 000 up. A random `base` per run keeps clear of ports that earlier runs left in
/// TIME_WAIT. Other targets get none (the kernel chooses).
pub(crate) fn source_for(
    target: SocketAddr,
    i: usize,
    per_source: usize,
    base: u32,
) -> Option<SocketAddr> {
    match target.ip() {
        IpAddr::V4(ip) if ip.is_loopback() => {
            let per_source = per_source.clamp(1, MAX_PER_SOURCE);
            let k = base.wrapping_add((i / per_source) as u32) % (254 * 256 * 256);
            let c = (k % 254 + 1) as u8;
            let b = ((k / 254) % 256) as u8;
            let a = (k / (254 * 256)) as u8;
            let port = FIRST_PORT + (i % per_source) as u16;
            Some(SocketAddr::new(
                IpAddr::V4(Ipv4Addr::new(127, a, b, c)),
                port,
            ))
        }
        _ => None,
    }
}

/// A random starting address number for [`source_for`].
pub(crate) fn random_base() -> u32 {
    use std::hash::BuildHasher;
    (std::collections::hash_map::RandomState::new().hash_one(std::process::id()) % (1 << 22)) as u32
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sources_spread_over_loopback() {
        let lo: SocketAddr = "127.0.0.1:1883".parse().unwrap();
        let at = |s: &str| Some(s.parse::<SocketAddr>().unwrap());
        assert_eq!(source_for(lo, 0, 10_000, 0), at("127.0.0.1:20000"));
        assert_eq!(source_for(lo, 9_999, 10_000, 0), at("127.0.0.1:29999"));
        assert_eq!(source_for(lo, 10_000, 10_000, 0), at("127.0.0.2:20000"));
        assert_eq!(source_for(lo, 25_000, 10_000, 0), at("127.0.0.3:25000"));
        assert_eq!(source_for(lo, 0, 10_000, 253), at("127.0.0.254:20000"));
        assert_eq!(source_for(lo, 10_000, 10_000, 253), at("127.0.1.1:20000"));
        assert_eq!(source_for(lo, 0, 1, 254 * 256), at("127.1.0.1:20000"));
        // Wraps instead of leaving 127/8; ports stay below 60 000.
        assert_eq!(source_for(lo, 0, 1, 254 * 256 * 256), at("127.0.0.1:20000"));
        assert_eq!(source_for(lo, 99_999, 1_000_000, 0), at("127.0.0.3:39999"));
        let remote: SocketAddr = "[::1]:1883".parse().unwrap();
        assert_eq!(source_for(remote, 50_000, 10_000, 0), None);
        assert!(random_base() < 1 << 22);
    }
}

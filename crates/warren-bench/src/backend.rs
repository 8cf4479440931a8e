//! `warren bench backend`: request/reply through a backend group (docs/backends.md) against the
//! raw round trip to the same TCP service, in one run.
//!
//! The service is a TCP echo (the raw echo server, in this process unless `--target` names
//! one): an echoed frame of the gobase test codec (`msgid u32 LE · len u32 LE · body`) is its
//! own answer, with the same msgid. Two phases, each a warm-up and a measured window:
//! - **raw**: this tool writes frames to the echo on one connection and keeps `--inflight` of
//!   them outstanding, writing a new one for each answer (every batch of answers read gets one
//!   write): the physical limit of one connection here;
//! - **backend**: a `Backends` group with the echo as its one service (one connection, as a
//!   gobase client keeps) and `--inflight` tasks, each calling `Service::call` in a loop as a
//!   module handler does: the rpc id is the msgid, which the echo sends back.
//!
//! It prints both rates, their ratio (backend / raw) and one JSON line.

use std::io::Write as _;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use bytes::{Buf, BytesMut};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use warren_cluster::backend::{
    BackendOptions, Backends, GobaseTestCodec, Hooks, RpcId, ServiceConf, TestMsg,
};
use warren_proto::backend_frame::{self, DEFAULT_MAX_BODY, HEADER_LEN};

use crate::args::{BackendArgs, seconds};
use crate::{BenchError, resolve};

/// Longest wait for one call's answer in the backend phase.
const CALL_TIMEOUT: Duration = Duration::from_secs(5);

/// Answers are matched to calls by msgid, which the echo sends back unchanged.
struct ByMsgid;

impl Hooks<GobaseTestCodec> for ByMsgid {
    fn check_rpc_resp(&self, msg: &TestMsg) -> Option<RpcId> {
        Some(RpcId::from(msg.msgid))
    }
}

/// Runs both phases and prints the summary (unless `--json`) and the JSON line.
pub async fn run(a: &BackendArgs, stop: CancellationToken) -> Result<(), BenchError> {
    let duration = seconds("--duration", a.duration)?;
    let warmup = seconds("--warmup", a.warmup)?;
    if a.inflight == 0 || a.inflight > u32::MAX as usize {
        return Err(BenchError::Invalid("--inflight must be at least 1".into()));
    }
    let body = vec![0x5a_u8; a.payload];
    let echo_stop = stop.child_token();
    let target = match &a.target {
        Some(t) => resolve(t).await?,
        None => start_echo(echo_stop.clone()).await?,
    };

    let raw = raw_phase(target, a.inflight, &body, warmup, duration, &stop).await?;
    if stop.is_cancelled() {
        echo_stop.cancel();
        return Ok(());
    }
    let through = backend_phase(target, a.inflight, &body, warmup, duration, &stop).await?;
    echo_stop.cancel();

    let ratio = if raw > 0.0 { through / raw } else { 0.0 };
    let mut out = std::io::stdout().lock();
    if !a.json {
        let _ = writeln!(
            out,
            "backend: {} in flight, {} B bodies, {:.1} s measured per phase",
            a.inflight, a.payload, a.duration
        );
        let _ = writeln!(out, "  raw TCP echo           {raw:>12.0} req/s");
        let _ = writeln!(out, "  through a backend group {through:>11.0} req/s");
        let _ = writeln!(out, "  ratio                  {ratio:>12.2}");
    }
    let json = serde_json::json!({
        "scenario": "backend",
        "label": a.label,
        "inflight": a.inflight,
        "payload": a.payload,
        "duration_s": a.duration,
        "raw_rps": raw.round(),
        "backend_rps": through.round(),
        "ratio": (ratio * 1000.0).round() / 1000.0,
    });
    let _ = writeln!(out, "{json}");
    let _ = out.flush();
    Ok(())
}

/// The raw echo of `warren bench echo-server` (its per-connection loop), on a free port of
/// 127.0.0.1, until `stop`.
async fn start_echo(stop: CancellationToken) -> Result<SocketAddr, BenchError> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    tokio::spawn(async move {
        loop {
            tokio::select! {
                biased;
                _ = stop.cancelled() => return,
                r = listener.accept() => {
                    if let Ok((sock, _)) = r {
                        tokio::spawn(crate::echo::echo(sock, stop.clone()));
                    }
                }
            }
        }
    });
    Ok(addr)
}

/// Answers per second over `duration`, after `warmup`, with `inflight` frames outstanding on one
/// connection.
async fn raw_phase(
    target: SocketAddr,
    inflight: usize,
    body: &[u8],
    warmup: Duration,
    duration: Duration,
    stop: &CancellationToken,
) -> Result<f64, BenchError> {
    let sock = TcpStream::connect(target)
        .await
        .map_err(|source| BenchError::Connect {
            addr: target,
            source,
        })?;
    let _ = sock.set_nodelay(true);
    let (mut r, mut w) = sock.into_split();
    let frame = {
        let mut f = BytesMut::new();
        backend_frame::encode(&TestMsg::new(1, body.to_vec()), DEFAULT_MAX_BODY, &mut f)
            .map_err(|e| BenchError::Invalid(e.to_string()))?;
        f.freeze()
    };
    let mut out = BytesMut::with_capacity(frame.len() * inflight);
    for _ in 0..inflight {
        out.extend_from_slice(&frame);
    }
    w.write_all(&out).await?;
    let start = Instant::now();
    let measure_from = start + warmup;
    let end = measure_from + duration;
    let mut counted = 0u64;
    let mut buf = BytesMut::with_capacity(64 * 1024);
    loop {
        let n = tokio::select! {
            biased;
            _ = stop.cancelled() => return Ok(0.0),
            _ = tokio::time::sleep_until(end) => break,
            n = r.read_buf(&mut buf) => n?,
        };
        if n == 0 {
            return Err(BenchError::Closed);
        }
        let mut answers = 0usize;
        loop {
            match backend_frame::decode(&buf, DEFAULT_MAX_BODY) {
                Ok(Some((_, used))) => {
                    buf.advance(used);
                    answers += 1;
                }
                Ok(None) => break,
                Err(e) => return Err(BenchError::Invalid(format!("echo sent bad bytes: {e}"))),
            }
        }
        if buf.capacity() - buf.len() < HEADER_LEN + body.len() {
            buf.reserve(64 * 1024);
        }
        if Instant::now() >= measure_from {
            counted += answers as u64;
        }
        out.clear();
        for _ in 0..answers {
            out.extend_from_slice(&frame);
        }
        w.write_all(&out).await?;
    }
    Ok(counted as f64 / duration.as_secs_f64())
}

/// Calls per second over `duration`, after `warmup`, with `inflight` callers on one backend
/// service.
async fn backend_phase(
    target: SocketAddr,
    inflight: usize,
    body: &[u8],
    warmup: Duration,
    duration: Duration,
    stop: &CancellationToken,
) -> Result<f64, BenchError> {
    let options = BackendOptions {
        dial_timeout: Duration::from_secs(5),
        ..BackendOptions::default()
    };
    let group = Backends::new(GobaseTestCodec::default(), ByMsgid, options);
    group.update(
        "echo",
        vec![ServiceConf::new(
            "echo",
            "echo1",
            target.ip().to_string(),
            target.port(),
        )],
    );
    let deadline = Instant::now() + Duration::from_secs(5);
    let svc = loop {
        if let Some(s) = group.service("echo", "echo1").filter(|s| s.is_connected()) {
            break s;
        }
        if Instant::now() >= deadline {
            group.shutdown().await;
            return Err(BenchError::Timeout {
                what: "the backend connection",
                after: Duration::from_secs(5),
            });
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    let counted = Arc::new(AtomicU64::new(0));
    let failed = Arc::new(AtomicU64::new(0));
    let start = Instant::now();
    let measure_from = start + warmup;
    let end = measure_from + duration;
    let phase = stop.child_token();
    let mut tasks = Vec::with_capacity(inflight);
    for i in 0..inflight {
        let (svc, counted, failed, phase) =
            (svc.clone(), counted.clone(), failed.clone(), phase.clone());
        let msgid = u32::try_from(i + 1).unwrap_or(u32::MAX);
        let msg = TestMsg::new(msgid, body.to_vec());
        tasks.push(tokio::spawn(async move {
            while !phase.is_cancelled() {
                match svc.call(RpcId::from(msgid), &msg, CALL_TIMEOUT).await {
                    Ok(_) => {
                        if Instant::now() >= measure_from && Instant::now() < end {
                            counted.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                    Err(_) => {
                        failed.fetch_add(1, Ordering::Relaxed);
                        tokio::time::sleep(Duration::from_millis(10)).await;
                    }
                }
            }
        }));
    }
    tokio::select! {
        _ = stop.cancelled() => {}
        _ = tokio::time::sleep_until(end) => {}
    }
    phase.cancel();
    for t in tasks {
        let _ = t.await;
    }
    group.shutdown().await;
    let failed = failed.load(Ordering::Relaxed);
    if failed > 0 {
        eprintln!("backend: {failed} calls failed");
    }
    Ok(counted.load(Ordering::Relaxed) as f64 / duration.as_secs_f64())
}

//! `pomelo-request`: C pomelo clients (raw TCP, or WebSocket on a `ws://` target) each keep K
//! requests in flight to a route.
//!
//! The pomelo counterpart of `request` (docs/protocols/pomelo.md). Each client does the handshake
//! (package type 1, then the ack, type 2), then sends data packages holding request messages:
//! id counting from 1, route `Echo.HD_Echo` by default, JSON body `{"n":<id>,"pad":"xxx…"}`
//! padded to the payload size. The response (message type 2) carries the same id; warren's
//! error responses are `{"code":500,…}` and count as error replies. Latency is from the
//! request's write to the response's read; a response that never comes counts as unanswered.
//!
//! Heartbeats: when the handshake announces an interval, a client sends one heartbeat per
//! interval and ignores the heartbeats it receives (warren answers every heartbeat, so
//! answering its answers would loop). Against the raw echo reference (`warren bench
//! echo-server`) the client's own handshake and requests come back: the handshake is taken as
//! accepted and an echoed request as its own response, so that reference costs one read and one
//! write per batch on each side, exactly like the real thing minus the server's work.
//!
//! Over WebSocket (`ws://HOST:PORT[/PATH]`, the pomelo listener's own port: docs/protocols/pomelo.md,
//! "One port, raw TCP and WebSocket") the packages travel in binary frames, one package per
//! frame as the pomelo web client sends them (or one frame per write with `--ws-batch`); the
//! connection, TLS and framing are those of the MQTT scenarios ([`crate::client`]).

use std::collections::HashMap;
use std::io::Write as _;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use bytes::BytesMut;
use hdrhistogram::Histogram;
use serde_json::Value;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use warren_proto::pomelo::{
    MAX_PACKAGE_BODY, MessageRoute, MessageType, PackageType, decode_message, decode_package,
    encode_data, encode_package, try_encode_data,
};

use crate::args::{PomeloRequestArgs, seconds};
use crate::client::{Reader, Writer, connect_stream, open_many};
use crate::latency::{Latency, Percentiles};
use crate::login::{Login, ReadIo, WriteIo};
use crate::report::{Report, per_second, spawn_progress};
use crate::{BenchError, Clock, Errors, Phase, measure, proc, resolve};

/// Deadline for connecting each client and completing its handshake.
const SETUP_TIMEOUT: Duration = Duration::from_secs(10);

/// The handshake every client sends.
const HANDSHAKE: &[u8] = br#"{"sys":{"type":"warren-bench","version":"0.1.0"},"user":{}}"#;

/// Spare read-buffer room ensured before each read.
const READ_CHUNK: usize = 64 * 1024;

/// What marks an error response: warren answers failed requests with `{"code":500,…}`.
const ERROR_CODE: &[u8] = br#""code":500"#;

/// State shared by every client task.
struct Shared {
    phase: Phase,
    latency: Latency,
    /// Replies so far (all clients), for the progress line.
    replies: AtomicU64,
    errors: Errors,
    /// Error replies (`"code":500`).
    error_replies: AtomicU64,
}

/// What each client sends.
struct Plan {
    route: MessageRoute,
    payload: usize,
    inflight: usize,
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
pub async fn run(a: &PomeloRequestArgs, stop: CancellationToken) -> Result<Report, BenchError> {
    let c = &a.common;
    if a.clients == 0 || a.inflight == 0 {
        return Err(BenchError::Invalid(
            "--clients and --inflight must be at least 1".into(),
        ));
    }
    if !a.route.contains('.') {
        return Err(BenchError::Invalid(format!(
            "--route must be Module.Handler, got {:?}",
            a.route
        )));
    }
    let route = MessageRoute::Name(a.route.clone());
    // The largest request must be encodable (route length, package size).
    let mut probe = BytesMut::new();
    let mut body = Vec::new();
    request_body(&mut body, u32::MAX, a.payload);
    try_encode_data(MessageType::Request, u32::MAX, &route, &body, &mut probe)
        .map_err(|e| BenchError::Invalid(format!("cannot encode the requests: {e}")))?;
    let duration = c.duration()?;
    let warmup = c.warmup()?;
    let drain = seconds("--drain", a.drain)?;
    let target = resolve(&c.target).await?;
    let login = c.login_for("/", None)?;

    let mut report = Report::new("pomelo-request", target.to_string(), c.label.clone());
    report.param("clients", a.clients as u64);
    report.param("inflight", a.inflight as u64);
    report.param("route", a.route.clone());
    report.param("payload", a.payload as u64);
    report.rss_before_kib = c.pid.and_then(proc::rss_kib);

    if let Some(ws) = &login.ws {
        report.param("ws_frames", if ws.batch { "write" } else { "package" });
    }
    let clients = open_many(a.clients, c.ramp, 64, &stop, |_| {
        let login = login.clone();
        async move { Conn::connect(target, &login, SETUP_TIMEOUT).await }
    })
    .await?;
    let heartbeat = clients.iter().find_map(|c| c.heartbeat);
    report.param("heartbeat_s", heartbeat.map_or(0, |h| h.as_secs()));

    let shared = Arc::new(Shared {
        phase: Phase::new(Clock::new(), warmup, duration),
        latency: Latency::new(16),
        replies: AtomicU64::new(0),
        errors: Errors::default(),
        error_replies: AtomicU64::new(0),
    });
    let plan = Arc::new(Plan {
        route,
        payload: a.payload,
        inflight: a.inflight,
    });
    let send_stop = CancellationToken::new();
    let hard_stop = CancellationToken::new();
    let mut tasks = JoinSet::new();
    for (i, conn) in clients.into_iter().enumerate() {
        tasks.spawn(client_task(
            i,
            conn,
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
                "pomelo-request {:>5.1}s {:<9} replies {:>10}/s  error replies {}  errors {}",
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
/// waits for the outstanding responses until the hard stop.
async fn client_task(
    idx: usize,
    mut conn: Conn,
    sh: Arc<Shared>,
    plan: Arc<Plan>,
    send_stop: CancellationToken,
    hard_stop: CancellationToken,
) -> ClientResult {
    let mut res = ClientResult::default();
    // request id → send time (ns on the run's clock).
    let mut outstanding: HashMap<u32, u64> = HashMap::with_capacity(plan.inflight * 2);
    let mut next_id: u32 = 1;
    let mut scratch = Vec::with_capacity(plan.payload + 16);
    let mut sending = true;
    let now = sh.phase.clock.now_ns();
    for _ in 0..plan.inflight {
        let id = take_id(&mut next_id);
        conn.writer
            .queue_with(|b| queue_request(b, &mut scratch, &plan, id));
        outstanding.insert(id, now);
        res.sent += 1;
    }
    // One heartbeat per announced interval; never an answer to the server's.
    let every = conn.heartbeat;
    let beat = tokio::time::sleep(every.unwrap_or(Duration::from_secs(3600)));
    tokio::pin!(beat);
    loop {
        if conn.writer.queued() > 0
            && let Err(e) = conn.writer.flush().await
        {
            sh.errors.record(format!("client {idx}: {e}"));
            break;
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
            r = conn.reader.fill() => {
                if let Err(e) = r {
                    sh.errors.record(format!("client {idx}: {e}"));
                    break;
                }
            }
            () = &mut beat, if every.is_some() => {
                conn.writer
                    .queue_with(|b| encode_package(PackageType::Heartbeat, b"", b));
                if let Some(h) = every {
                    beat.as_mut().reset(tokio::time::Instant::now() + h);
                }
                continue;
            }
        }
        let now = sh.phase.clock.now_ns();
        let measuring = sh.phase.measuring(now);
        let got = {
            let mut hist = measuring.then(|| sh.latency.shard(idx));
            absorb(
                conn.reader.buf_mut(),
                &mut outstanding,
                hist.as_deref_mut(),
                now,
            )
        };
        let got = match got {
            Ok(x) => x,
            Err(e) => {
                sh.errors.record(format!("client {idx}: {e}"));
                break;
            }
        };
        let n = got.replies;
        res.replies += n;
        res.unknown += got.unknown;
        if measuring {
            res.replies_measuring += n;
        }
        if n > 0 {
            sh.replies.fetch_add(n, Ordering::Relaxed);
        }
        if got.error_replies > 0 {
            sh.error_replies
                .fetch_add(got.error_replies, Ordering::Relaxed);
        }
        if sending {
            for _ in 0..n {
                let id = take_id(&mut next_id);
                conn.writer
                    .queue_with(|b| queue_request(b, &mut scratch, &plan, id));
                outstanding.insert(id, now);
                res.sent += 1;
            }
        }
    }
    res.unanswered = outstanding.len() as u64;
    conn.writer.shutdown().await;
    res
}

/// A pomelo connection past its handshake: requests are queued on the writer and written in
/// one go, reads append to the reader's buffer.
#[derive(Debug)]
struct Conn {
    reader: Reader<ReadIo>,
    writer: Writer<WriteIo>,
    /// The heartbeat interval the server announced, if any.
    heartbeat: Option<Duration>,
}

impl Conn {
    /// Connects (TCP, TLS, WebSocket as `login` says), sends the handshake, waits for the
    /// server's (or, from an echo reference, our own) handshake and sends the ack, all within
    /// `timeout`.
    async fn connect(
        target: SocketAddr,
        login: &Login,
        timeout: Duration,
    ) -> Result<Conn, BenchError> {
        tokio::time::timeout(timeout, Self::connect_inner(target, login))
            .await
            .map_err(|_| BenchError::Timeout {
                what: "the pomelo handshake",
                after: timeout,
            })?
    }

    async fn connect_inner(target: SocketAddr, login: &Login) -> Result<Conn, BenchError> {
        let (reader, writer) = connect_stream(target, None, login, READ_CHUNK).await?;
        let mut conn = Conn {
            reader,
            writer,
            heartbeat: None,
        };
        conn.writer
            .queue_with(|b| encode_package(PackageType::Handshake, HANDSHAKE, b));
        conn.writer.flush().await?;
        let heartbeat = loop {
            let Some(p) = decode_package(conn.reader.buf_mut(), MAX_PACKAGE_BODY)? else {
                conn.reader.fill().await?;
                continue;
            };
            match p.kind {
                PackageType::Handshake => break handshake_reply(&p.body)?,
                PackageType::Kick => return Err(BenchError::Kicked(kick_reason(&p.body))),
                other => return Err(BenchError::Unexpected(other.name())),
            }
        };
        conn.heartbeat = heartbeat;
        conn.writer
            .queue_with(|b| encode_package(PackageType::HandshakeAck, b"", b));
        conn.writer.flush().await?;
        Ok(conn)
    }
}

/// The heartbeat interval from the server's handshake reply (`None` when it announces none),
/// or why the handshake failed. Our own handshake coming back (the raw echo reference) is
/// accepted.
fn handshake_reply(body: &[u8]) -> Result<Option<Duration>, BenchError> {
    if body == HANDSHAKE {
        return Ok(None);
    }
    let v: Value = serde_json::from_slice(body).map_err(|_| {
        BenchError::HandshakeRefused(String::from_utf8_lossy(body).chars().take(200).collect())
    })?;
    match v.get("code").and_then(Value::as_u64) {
        Some(200) => Ok(v
            .get("sys")
            .and_then(|s| s.get("heartbeat"))
            .and_then(Value::as_u64)
            .filter(|&h| h > 0)
            .map(Duration::from_secs)),
        Some(code) => Err(BenchError::HandshakeRefused(format!("code {code}"))),
        None => Err(BenchError::HandshakeRefused("no code".into())),
    }
}

/// The `reason` of a kick package, or its raw text.
fn kick_reason(body: &[u8]) -> String {
    serde_json::from_slice::<Value>(body)
        .ok()
        .and_then(|v| v.get("reason").and_then(Value::as_str).map(str::to_owned))
        .unwrap_or_else(|| String::from_utf8_lossy(body).into_owned())
}

/// The next request id (from 1, never 0, wrapping after `u32::MAX`).
fn take_id(next: &mut u32) -> u32 {
    let id = *next;
    *next = next.wrapping_add(1).max(1);
    id
}

/// Queues one request package with id `id` and a body of `plan.payload` bytes.
fn queue_request(out: &mut BytesMut, scratch: &mut Vec<u8>, plan: &Plan, id: u32) {
    request_body(scratch, id, plan.payload);
    encode_data(MessageType::Request, id, &plan.route, scratch, out);
}

/// Writes `{"n":<n>,"pad":"xxx…"}` into `out`: exactly `size` bytes where possible (at least
/// the object with an empty pad).
fn request_body(out: &mut Vec<u8>, n: u32, size: usize) {
    out.clear();
    out.extend_from_slice(b"{\"n\":");
    let _ = write!(out, "{n}");
    out.extend_from_slice(b",\"pad\":\"");
    let pad = size.saturating_sub(out.len() + 2);
    out.resize(out.len() + pad, b'x');
    out.extend_from_slice(b"\"}");
}

/// Whether a response body is one of warren's error responses (`{"code":500,…}`).
fn is_error_reply(body: &[u8]) -> bool {
    body.windows(ERROR_CODE.len()).any(|w| w == ERROR_CODE)
}

/// What [`absorb`] found in the read buffer.
#[derive(Debug, Default, PartialEq, Eq)]
struct Absorbed {
    /// Responses to outstanding requests.
    replies: u64,
    /// Of those, error responses.
    error_replies: u64,
    /// Messages that answer no outstanding request (pushes, unknown ids).
    unknown: u64,
}

/// Decodes every complete package buffered: matches responses to outstanding requests by id
/// and records their latency. Heartbeats and handshake packages (the echo reference's) are
/// skipped; a kick ends the connection.
fn absorb(
    buf: &mut BytesMut,
    outstanding: &mut HashMap<u32, u64>,
    mut hist: Option<&mut Histogram<u64>>,
    now: u64,
) -> Result<Absorbed, BenchError> {
    let mut got = Absorbed::default();
    while let Some(p) = decode_package(buf, MAX_PACKAGE_BODY)? {
        match p.kind {
            PackageType::Data => {}
            PackageType::Kick => return Err(BenchError::Kicked(kick_reason(&p.body))),
            PackageType::Heartbeat | PackageType::Handshake | PackageType::HandshakeAck => {
                continue;
            }
        }
        let m = decode_message(p.body)?;
        // A request comes back only from the echo reference: it is its own response.
        let sent = match m.kind {
            MessageType::Response | MessageType::Request => outstanding.remove(&m.id),
            MessageType::Push | MessageType::Notify => None,
        };
        let Some(sent) = sent else {
            got.unknown += 1;
            continue;
        };
        got.replies += 1;
        if is_error_reply(&m.body) {
            got.error_replies += 1;
        }
        if let Some(h) = hist.as_deref_mut() {
            h.saturating_record(now.saturating_sub(sent).max(1));
        }
    }
    Ok(got)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::latency::histogram;

    fn plan(payload: usize) -> Plan {
        Plan {
            route: MessageRoute::Name("Echo.HD_Echo".into()),
            payload,
            inflight: 1,
        }
    }

    fn response(id: u32, body: &[u8], out: &mut BytesMut) {
        encode_data(MessageType::Response, id, &MessageRoute::None, body, out);
    }

    #[test]
    fn bodies_are_json_of_the_asked_size() {
        let mut b = Vec::new();
        for (n, size) in [(1u32, 0usize), (7, 16), (300, 64), (u32::MAX, 1000)] {
            request_body(&mut b, n, size);
            let min = format!(r#"{{"n":{n},"pad":""}}"#).len();
            assert_eq!(b.len(), size.max(min), "{n} {size}");
            let v: Value = serde_json::from_slice(&b).unwrap();
            assert_eq!(v["n"], n);
            assert!(v["pad"].as_str().unwrap().bytes().all(|c| c == b'x'));
        }
    }

    #[test]
    fn requests_are_framed_as_pomelo_data() {
        let mut out = BytesMut::new();
        let mut scratch = Vec::new();
        queue_request(&mut out, &mut scratch, &plan(64), 1);
        queue_request(&mut out, &mut scratch, &plan(64), 300);
        // Golden header of the first: data package, request flag 00, id 01, route length 0c.
        assert_eq!(&out[..4], &[0x04, 0x00, 0x00, 3 + 12 + 64]);
        assert_eq!(&out[4..7], &[0x00, 0x01, 0x0c]);
        assert_eq!(&out[7..19], b"Echo.HD_Echo");
        for id in [1u32, 300] {
            let p = decode_package(&mut out, MAX_PACKAGE_BODY).unwrap().unwrap();
            assert_eq!(p.kind, PackageType::Data);
            let m = decode_message(p.body).unwrap();
            assert_eq!(m.kind, MessageType::Request);
            assert_eq!(m.id, id);
            assert_eq!(m.route, MessageRoute::Name("Echo.HD_Echo".into()));
            assert_eq!(m.body.len(), 64);
            let v: Value = serde_json::from_slice(&m.body).unwrap();
            assert_eq!(v["n"], id);
        }
        assert!(out.is_empty());
    }

    #[test]
    fn ids_count_from_one_and_skip_zero() {
        let mut next = 1;
        assert_eq!(take_id(&mut next), 1);
        assert_eq!(take_id(&mut next), 2);
        let mut next = u32::MAX;
        assert_eq!(take_id(&mut next), u32::MAX);
        assert_eq!(take_id(&mut next), 1);
    }

    #[test]
    fn responses_match_outstanding_requests() {
        let mut outstanding: HashMap<u32, u64> = [(1, 1_000), (2, 2_000), (3, 3_000)].into();
        let mut buf = BytesMut::new();
        response(2, br#"{"n":2,"pad":"xx"}"#, &mut buf);
        encode_package(PackageType::Heartbeat, b"", &mut buf);
        response(1, br#"{"code":500,"msg":"handler not found"}"#, &mut buf);
        // An id nobody waits for, and a push.
        response(9, b"{}", &mut buf);
        encode_data(
            MessageType::Push,
            0,
            &MessageRoute::Name("Chat.OnChat".into()),
            b"{}",
            &mut buf,
        );
        // Half of the next response: left in the buffer for the next read.
        let mut tail = BytesMut::new();
        response(3, b"{}", &mut tail);
        buf.extend_from_slice(&tail[..5]);
        let mut h = histogram();
        let got = absorb(&mut buf, &mut outstanding, Some(&mut h), 11_000).unwrap();
        assert_eq!(
            got,
            Absorbed {
                replies: 2,
                error_replies: 1,
                unknown: 2
            }
        );
        assert_eq!(h.len(), 2);
        assert_eq!(h.max(), h.highest_equivalent(10_000));
        assert_eq!(outstanding.len(), 1);
        assert_eq!(buf.len(), 5);
        buf.extend_from_slice(&tail[5..]);
        let got = absorb(&mut buf, &mut outstanding, None, 12_000).unwrap();
        assert_eq!(got.replies, 1);
        assert!(outstanding.is_empty());
    }

    #[test]
    fn the_echo_reference_answers_with_the_request() {
        let mut outstanding: HashMap<u32, u64> = [(5, 0)].into();
        let mut buf = BytesMut::new();
        encode_package(PackageType::HandshakeAck, b"", &mut buf);
        let mut scratch = Vec::new();
        queue_request(&mut buf, &mut scratch, &plan(64), 5);
        let got = absorb(&mut buf, &mut outstanding, None, 1).unwrap();
        assert_eq!(got.replies, 1);
        assert_eq!(got.error_replies, 0);
        assert_eq!(handshake_reply(HANDSHAKE).unwrap(), None);
    }

    #[test]
    fn kicks_and_garbage_end_the_connection() {
        let mut buf = BytesMut::new();
        encode_package(
            PackageType::Kick,
            br#"{"reason":"server shutting down"}"#,
            &mut buf,
        );
        let e = absorb(&mut buf, &mut HashMap::new(), None, 0).unwrap_err();
        assert!(matches!(e, BenchError::Kicked(r) if r == "server shutting down"));
        let mut buf = BytesMut::from(&b"\x10\x00\x00\x00"[..]);
        let e = absorb(&mut buf, &mut HashMap::new(), None, 0).unwrap_err();
        assert!(matches!(e, BenchError::PomeloDecode(_)));
    }

    #[test]
    fn handshake_replies() {
        assert_eq!(
            handshake_reply(br#"{"code":200,"sys":{"heartbeat":3}}"#).unwrap(),
            Some(Duration::from_secs(3))
        );
        assert_eq!(handshake_reply(br#"{"code":200,"sys":{}}"#).unwrap(), None);
        assert_eq!(
            handshake_reply(br#"{"code":200,"sys":{"heartbeat":0}}"#).unwrap(),
            None
        );
        assert!(matches!(
            handshake_reply(br#"{"code":501}"#),
            Err(BenchError::HandshakeRefused(r)) if r == "code 501"
        ));
        assert!(handshake_reply(b"nope").is_err());
    }

    #[test]
    fn error_replies() {
        assert!(is_error_reply(br#"{"code":500,"msg":"x"}"#));
        assert!(is_error_reply(br#"{"msg":"x","code":500}"#));
        assert!(!is_error_reply(br#"{"n":1,"pad":"xxxx"}"#));
        assert!(!is_error_reply(br#"{"code":200}"#));
    }
}

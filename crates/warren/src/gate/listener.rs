//! Accepting clients: one accept loop for every listener kind. A connection counts toward the
//! listener's `max_conn` and its address's `max_conn_per_ip` from accept to close, HTTP upgrade
//! included; the transport handshake (PROXY header, TLS, WebSocket upgrade) must finish within
//! `handshake_timeout_s` of accept. A pomelo listener serves raw TCP and WebSocket on one port:
//! the first byte of a connection decides (docs/protocols/pomelo.md, "One port, raw TCP and
//! WebSocket").
//!
//! Refusals at accept read nothing: IP lists and per-IP limits close the socket; a full listener
//! answers MQTT over TCP with CONNACK 3 and WebSocket with HTTP 503 (one non-blocking write), the
//! others with a close. Each refusal is one rate-limited log line and a count
//! (`crate::refusal`).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tracing::Instrument;

use super::access::{IpSlot, ListenerAccess};
use super::io::{self, Prefixed, Reader, Writer, WsFraming, WsIo};
use super::tls::TlsState;
use super::traffic::{ListenerTraffic, OpenConnection};
use super::{Gate, json, line, mqtt, pomelo, pomelo_rpc, proxy, upgrade};
use crate::config::{ListenerConfig, ProtocolOptions};
use crate::refusal::{deny, refuse};
use crate::session::Network;

/// MQTT CONNACK, return code 3 (server unavailable): the answer of a full MQTT listener.
pub(crate) const CONNACK_UNAVAILABLE: [u8; 4] = warren_proto::mqtt::connack_bytes(false, 3);
/// The answer of a full WebSocket listener.
pub(crate) const HTTP_UNAVAILABLE: &[u8] =
    b"HTTP/1.1 503 Service Unavailable\r\ncontent-length: 0\r\nconnection: close\r\n\r\n";

/// First pause after a failed accept; it doubles up to [`ACCEPT_BACKOFF_MAX`] while accepts keep
/// failing (out of descriptors, usually) and resets on success.
const ACCEPT_BACKOFF_MIN: Duration = Duration::from_millis(5);
/// Longest pause between failed accepts.
const ACCEPT_BACKOFF_MAX: Duration = Duration::from_secs(1);

/// Bind the listener's address and start accepting. The TLS files are read first: a bad one
/// stops the node with the key and the reason.
pub(crate) async fn listen(
    gate: Arc<Gate>,
    cfg: Arc<ListenerConfig>,
) -> std::io::Result<BoundListener> {
    let invalid = |e: String| std::io::Error::new(std::io::ErrorKind::InvalidInput, e);
    let addr = cfg.socket_addr().map_err(invalid)?;
    let tls = TlsState::load(&cfg).map_err(invalid)?;
    let socket = TcpListener::bind(addr).await?;
    let local_addr = socket.local_addr()?;
    let access = gate.admission.add_listener(&cfg, tls);
    let kind = if matches!(cfg.protocol, ProtocolOptions::Pomelo(_)) {
        Kind::Sniff
    } else if cfg.serves_websocket() {
        Kind::WebSocket
    } else {
        Kind::Stream
    };
    let traffic = ListenerTraffic::new(&cfg, local_addr);
    gate.traffic.add(&cfg, traffic.clone());
    let listener = Arc::new(Listener {
        traffic,
        slots: Arc::new(Semaphore::new(cfg.max_conn)),
        gate: gate.clone(),
        cfg: cfg.clone(),
        access,
        kind,
    });
    gate.tracker.spawn(accept_loop(listener, socket));
    Ok(BoundListener {
        config: cfg,
        local_addr,
    })
}

/// What a listener's connections carry once the transport is up.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    /// The protocol's bytes straight away (MQTT, line, pomelo-rpc).
    Stream,
    /// An HTTP request upgrading to WebSocket (MQTT over WebSocket, JSON).
    WebSocket,
    /// pomelo: the first byte tells raw TCP from a WebSocket upgrade.
    Sniff,
}

/// One listener's accept state.
struct Listener {
    gate: Arc<Gate>,
    cfg: Arc<ListenerConfig>,
    /// `max_conn` permits.
    slots: Arc<Semaphore>,
    /// IP lists and TLS settings, reloaded on SIGHUP.
    access: Arc<ListenerAccess>,
    /// Its traffic metrics (gate/traffic.rs).
    traffic: Arc<ListenerTraffic>,
    kind: Kind,
}

/// What one connection holds from accept to close: a place under the listener's `max_conn` and,
/// when per-IP limits are on, under its address's `max_conn_per_ip`.
struct Slot {
    _permit: OwnedSemaphorePermit,
    ip: Option<IpSlot>,
    /// Its place in `warren_connections_active`.
    _open: OpenConnection,
}

/// Hand a connection to its protocol, inside the connection's span (node, peer, protocol,
/// session) so every line it logs says whose it is. The span is at debug level: with the default
/// filter it is off and costs a connection nothing (lines that matter name their peer
/// themselves); `RUST_LOG=warren=debug` turns it on.
/// A plain function, not an `async fn`: the connection's task then holds only the boxed
/// protocol future (and the span, when it is on), not a second copy of the arguments.
fn serve(
    gate: Arc<Gate>,
    cfg: Arc<ListenerConfig>,
    r: Reader,
    w: Writer,
    peer: SocketAddr,
) -> std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>> {
    let span = tracing::debug_span!(
        "conn",
        node = %gate.node.id(),
        %peer,
        protocol = cfg.scheme(),
        session = tracing::field::Empty
    );
    metrics::counter!("warren_connections_total", "protocol" => cfg.scheme()).increment(1);
    let conn = dispatch(gate, cfg, r, w, peer);
    if span.is_disabled() {
        // the span is off (the default filter): the task need not carry it
        conn
    } else {
        Box::pin(conn.instrument(span))
    }
}

/// The connection's protocol future, boxed: each protocol's state lives in its own allocation,
/// sized for that protocol alone (an idle MQTT connection does not pay for the largest
/// protocol's state). A plain function, so the unboxed future never takes room in the caller's.
fn dispatch(
    gate: Arc<Gate>,
    cfg: Arc<ListenerConfig>,
    r: Reader,
    w: Writer,
    peer: SocketAddr,
) -> std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>> {
    match cfg.protocol {
        ProtocolOptions::Mqtt(_) => Box::pin(mqtt::serve(gate, cfg, r, w, peer)),
        ProtocolOptions::Pomelo(_) => Box::pin(pomelo::serve(gate, cfg, r, w, peer)),
        ProtocolOptions::Json(_) => Box::pin(json::serve(gate, cfg, r, w, peer)),
        ProtocolOptions::Line(_) => Box::pin(line::serve(gate, cfg, r, w, peer)),
        ProtocolOptions::PomeloRpc(_) => Box::pin(pomelo_rpc::serve(gate, cfg, r, w, peer)),
    }
}

/// A WARN at most once a second for failed accepts, saying how many were not logged.
struct AcceptErrors {
    last: Option<Instant>,
    suppressed: u64,
}

impl AcceptErrors {
    fn record(&mut self, addr: &str, e: &std::io::Error, backoff: Duration) {
        let kind = match e.raw_os_error() {
            Some(24) | Some(23) => "out_of_descriptors",
            _ => "other",
        };
        metrics::counter!("warren_accept_errors_total", "reason" => kind).increment(1);
        let now = Instant::now();
        if self
            .last
            .is_some_and(|t| now.duration_since(t) < Duration::from_secs(1))
        {
            self.suppressed += 1;
            return;
        }
        self.last = Some(now);
        let suppressed = std::mem::take(&mut self.suppressed);
        tracing::warn!(listener = addr, error = %e, backoff_ms = backoff.as_millis() as u64, suppressed, "accept failed; backing off");
    }
}

async fn accept_loop(l: Arc<Listener>, socket: TcpListener) {
    let mut backoff = Duration::ZERO;
    let mut errors = AcceptErrors {
        last: None,
        suppressed: 0,
    };
    loop {
        let accepted = tokio::select! {
            biased;
            _ = l.gate.draining.cancelled() => break,
            r = socket.accept() => r,
        };
        match accepted {
            Ok((stream, peer)) => {
                backoff = Duration::ZERO;
                l.accepted(stream, peer);
            }
            Err(e) => {
                // out of file descriptors and the like: back off instead of spinning
                backoff = (backoff * 2).clamp(ACCEPT_BACKOFF_MIN, ACCEPT_BACKOFF_MAX);
                errors.record(&l.cfg.addr, &e, backoff);
                tokio::select! {
                    _ = l.gate.draining.cancelled() => break,
                    _ = tokio::time::sleep(backoff) => {}
                }
            }
        }
    }
}

impl Listener {
    /// Admit or refuse a new connection without reading from it; an admitted one gets its task.
    fn accepted(self: &Arc<Self>, stream: TcpStream, peer: SocketAddr) {
        let started = Instant::now();
        // behind a PROXY balancer the socket's address is the balancer's: the client's is
        // checked once the header is read
        let ip = if self.cfg.proxy_protocol {
            None
        } else {
            match self.gate.admission.admit(&self.access, peer.ip()) {
                Ok(ip) => ip,
                Err(r) => {
                    refuse(&peer, r.kind(), &r);
                    return;
                }
            }
        };
        let Ok(permit) = self.slots.clone().try_acquire_owned() else {
            self.refuse_full(stream, peer);
            return;
        };
        let _ = stream.set_nodelay(true);
        let slot = Slot {
            _permit: permit,
            ip,
            _open: self.traffic.open(),
        };
        if self.kind == Kind::Stream && !self.cfg.proxy_protocol && self.access.tls.is_none() {
            // nothing comes before the protocol: its task is the connection's, no larger
            self.spawn_serving(io::tcp(stream), peer, slot);
            return;
        }
        let l = self.clone();
        self.gate
            .tracker
            .spawn(async move { l.handshake(stream, peer, slot, started).await });
    }

    /// The listener is full: say so the protocol's way if that costs one non-blocking write of
    /// a few bytes (MQTT over TCP: CONNACK 3; WebSocket: HTTP 503), then close.
    fn refuse_full(&self, stream: TcpStream, peer: SocketAddr) {
        let answer: &[u8] = match (self.kind, self.access.tls.is_some()) {
            (_, true) => &[],
            (Kind::Stream, false) if matches!(self.cfg.protocol, ProtocolOptions::Mqtt(_)) => {
                &CONNACK_UNAVAILABLE
            }
            (Kind::WebSocket, false) => HTTP_UNAVAILABLE,
            _ => &[],
        };
        if !answer.is_empty() {
            let _ = stream.try_write(answer);
        }
        refuse(
            &peer,
            "max_conn",
            format_args!(
                "{} connections open on {} (max_conn)",
                self.cfg.max_conn,
                self.cfg.scheme()
            ),
        );
    }

    fn deadline(&self, started: Instant) -> tokio::time::Instant {
        tokio::time::Instant::from_std(started + Duration::from_secs(self.cfg.handshake_timeout_s))
    }

    /// Run `f` until the handshake deadline; `None` when it passed (after one refusal line) or
    /// the node drains (a connection still in its handshake is not worth waiting for).
    async fn within<T>(
        &self,
        peer: &SocketAddr,
        deadline: tokio::time::Instant,
        what: &str,
        f: impl Future<Output = T>,
    ) -> Option<T> {
        tokio::select! {
            _ = self.gate.draining.cancelled() => None,
            r = tokio::time::timeout_at(deadline, f) => match r {
                Ok(v) => Some(v),
                Err(_) => {
                    refuse(
                        peer,
                        "handshake_timeout",
                        format_args!(
                            "{what} not complete within {} s of accept (handshake_timeout_s)",
                            self.cfg.handshake_timeout_s
                        ),
                    );
                    None
                }
            }
        }
    }

    /// PROXY header, TLS, then the listener's kind of connection; the slot is held throughout.
    /// The task lives as long as the connection, so each large step (the PROXY header buffer,
    /// the TLS state, the HTTP exchange) is boxed: the task keeps only what the current step
    /// needs.
    async fn handshake(
        self: Arc<Self>,
        mut stream: TcpStream,
        mut peer: SocketAddr,
        mut slot: Slot,
        started: Instant,
    ) {
        let deadline = self.deadline(started);
        if self.cfg.proxy_protocol {
            let header = self
                .within(
                    &peer,
                    deadline,
                    "PROXY header",
                    Box::pin(proxy::read_header(&mut stream)),
                )
                .await;
            match header {
                None => return,
                Some(Err(e)) => {
                    refuse(&peer, "proxy_header", e);
                    return;
                }
                Some(Ok(Some(client))) => peer = client,
                Some(Ok(None)) => {}
            }
            match self.gate.admission.admit(&self.access, peer.ip()) {
                Ok(ip) => slot.ip = ip,
                Err(r) => {
                    refuse(&peer, r.kind(), &r);
                    return;
                }
            }
        }
        let Some(tls) = &self.access.tls else {
            return self.plain(stream, peer, slot, started).await;
        };
        let acceptor = tls.acceptor();
        let Some(accepted) = self
            .within(
                &peer,
                deadline,
                "TLS handshake",
                Box::pin(acceptor.accept(stream)),
            )
            .await
        else {
            return;
        };
        match accepted {
            Ok(s) => Box::pin(self.tls(s, peer, slot, started)).await,
            Err(e) => {
                refuse(
                    &peer,
                    "tls_handshake",
                    format_args!("TLS handshake failed: {e}"),
                );
            }
        }
    }

    /// After the TLS handshake.
    async fn tls(
        self: Arc<Self>,
        tls_stream: tokio_rustls::server::TlsStream<TcpStream>,
        peer: SocketAddr,
        slot: Slot,
        started: Instant,
    ) {
        let deadline = self.deadline(started);
        let mut io = Prefixed::new(Bytes::new(), tls_stream);
        match self.kind {
            Kind::Stream => self.raw(io::tls(io), peer, slot).await,
            Kind::WebSocket => {
                Box::pin(self.websocket(WsIo::Tls(Box::new(io)), peer, slot, deadline)).await
            }
            Kind::Sniff => {
                let mut first = [0u8; 1];
                let sniff = self.sniff_deadline(started);
                let read = tokio::select! {
                    _ = self.gate.draining.cancelled() => return,
                    r = tokio::time::timeout_at(sniff, io.get_mut().read(&mut first)) => r,
                };
                match self.sniffed(&peer, read, first[0]) {
                    Some(Kind::Stream) => {
                        let io = Prefixed::new(Bytes::copy_from_slice(&first), io.into_inner());
                        self.raw(io::tls(io), peer, slot).await
                    }
                    Some(_) => {
                        let io = Prefixed::new(Bytes::copy_from_slice(&first), io.into_inner());
                        Box::pin(self.websocket(WsIo::Tls(Box::new(io)), peer, slot, deadline))
                            .await
                    }
                    None => {}
                }
            }
        }
    }

    /// After the PROXY header (if any), without TLS.
    async fn plain(
        self: Arc<Self>,
        stream: TcpStream,
        peer: SocketAddr,
        slot: Slot,
        started: Instant,
    ) {
        match self.kind {
            Kind::Stream => self.raw(io::tcp(stream), peer, slot).await,
            Kind::WebSocket => {
                let deadline = self.deadline(started);
                Box::pin(self.websocket(WsIo::Tcp(stream), peer, slot, deadline)).await
            }
            Kind::Sniff => {
                // peek, so the raw path keeps the plain TCP reader
                let mut first = [0u8; 1];
                let sniff = self.sniff_deadline(started);
                let peeked = tokio::select! {
                    _ = self.gate.draining.cancelled() => return,
                    r = tokio::time::timeout_at(sniff, stream.peek(&mut first)) => r,
                };
                match self.sniffed(&peer, peeked, first[0]) {
                    Some(Kind::Stream) => self.raw(io::tcp(stream), peer, slot).await,
                    Some(_) => {
                        let deadline = self.deadline(started);
                        Box::pin(self.websocket(WsIo::Tcp(stream), peer, slot, deadline)).await
                    }
                    None => {}
                }
            }
        }
    }

    /// The first byte of a pomelo connection's data comes within the connect deadline (it is the
    /// pomelo handshake, or an HTTP request).
    fn sniff_deadline(&self, started: Instant) -> tokio::time::Instant {
        tokio::time::Instant::from_std(started + Duration::from_secs(self.cfg.connect_timeout_s))
    }

    /// One port, two transports: 0x01–0x05 is a pomelo package type (raw TCP); an ASCII letter
    /// starts an HTTP request (a WebSocket upgrade); anything else is refused.
    fn sniffed(
        &self,
        peer: &SocketAddr,
        read: Result<std::io::Result<usize>, tokio::time::error::Elapsed>,
        first: u8,
    ) -> Option<Kind> {
        match read {
            Err(_) => {
                refuse(
                    peer,
                    "connect_timeout",
                    format_args!(
                        "nothing received within {} s (connect_timeout_s)",
                        self.cfg.connect_timeout_s
                    ),
                );
                None
            }
            Ok(Ok(0)) | Ok(Err(_)) => None,
            Ok(Ok(_)) if (1..=5).contains(&first) => Some(Kind::Stream),
            Ok(Ok(_)) if first.is_ascii_alphabetic() => Some(Kind::WebSocket),
            Ok(Ok(_)) => {
                refuse(
                    peer,
                    "bad_first_byte",
                    format_args!("first byte {first:#04x} is neither a pomelo package nor HTTP"),
                );
                None
            }
        }
    }

    /// Serve a byte-stream connection; the slot is given back when it ends.
    async fn raw(&self, (r, w): (Reader, Writer), peer: SocketAddr, slot: Slot) {
        serve(self.gate.clone(), self.cfg.clone(), r, w, peer).await;
        drop(slot);
    }

    /// Answer the HTTP request that opens a WebSocket (gate/upgrade.rs), within the handshake
    /// deadline, then serve the protocol over it. A refused request gets its status and the
    /// connection closes; the slot is held until then.
    async fn websocket(
        &self,
        io: WsIo,
        peer: SocketAddr,
        slot: Slot,
        deadline: tokio::time::Instant,
    ) {
        // boxed, and over before the connection is served: the request, its buffer and the
        // answer are gone by then, so an open WebSocket holds only its socket's state
        let Some((socket, framing)) = Box::pin(self.open_websocket(io, peer, deadline)).await
        else {
            return;
        };
        // the connection gets a task of its own, holding only what serving needs; this one,
        // sized for every kind of handshake, ends here
        self.spawn_serving(io::ws(socket, framing), peer, slot);
    }

    /// Serve a connection on a task of its own (tracked, so a drain waits for it) that holds
    /// only the boxed protocol future and the slot, given back when it ends.
    fn spawn_serving(&self, (r, w): (Reader, Writer), peer: SocketAddr, slot: Slot) {
        let conn = serve(self.gate.clone(), self.cfg.clone(), r, w, peer);
        self.gate.tracker.spawn(async move {
            conn.await;
            drop(slot);
        });
    }

    /// Read the upgrade request and answer it: the WebSocket and how it carries the protocol,
    /// or `None` when it was refused (with its status) or did not come in time.
    async fn open_websocket(
        &self,
        mut io: WsIo,
        peer: SocketAddr,
        deadline: tokio::time::Instant,
    ) -> Option<(io::WebSocket, WsFraming)> {
        let read = self
            .within(
                &peer,
                deadline,
                "WebSocket upgrade",
                Box::pin(upgrade::read(&mut io)),
            )
            .await;
        let (request, rest) = match read {
            None | Some(Ok(None)) => return None,
            Some(Err(e)) => {
                tracing::debug!(%peer, error = %e, "upgrade request not read");
                return None;
            }
            Some(Ok(Some(r))) => r,
        };
        let (max, framing, protocols): (usize, WsFraming, &[&'static str]) = match &self
            .cfg
            .protocol
        {
            ProtocolOptions::Mqtt(o) => (o.max_packet(), WsFraming::Stream, &["mqtt", "mqttv3.1"]),
            ProtocolOptions::Pomelo(o) => (o.max_package + 4, WsFraming::Stream, &[]),
            ProtocolOptions::Json(o) => (o.max_packet, WsFraming::TextMessages, &[]),
            // neither takes WebSocket upgrades (`serves_websocket`)
            ProtocolOptions::Line(_) | ProtocolOptions::PomeloRpc(_) => return None,
        };
        let request = request.and_then(|r| match self.gate.draining.is_cancelled() {
            true => Err(upgrade::Refused {
                status: 503,
                why: "the node is draining".to_owned(),
            }),
            false => Ok(r),
        });
        let request = match request {
            Ok(r) => r,
            Err(refused) => {
                if refused.status != 503 {
                    deny(&peer, "ws_upgrade", &refused.why);
                }
                let _ = tokio::time::timeout_at(deadline, async {
                    let _ = io.write_all(&refused.response()).await;
                    let _ = io.shutdown().await;
                })
                .await;
                return None;
            }
        };
        let answer = request.accepted(request.choose(protocols));
        let written = tokio::time::timeout_at(deadline, async {
            io.write_all(&answer).await?;
            io.flush().await
        })
        .await;
        if !matches!(written, Ok(Ok(()))) {
            tracing::debug!(%peer, "upgrade answer not written");
            return None;
        }
        // tungstenite reads in chunks of this size into a buffer it allocates up front, for the
        // connection's whole life: its default (128 KiB) made an idle WebSocket connection cost
        // 141 KB (docs/benchmarks.md)
        let config = tungstenite::protocol::WebSocketConfig::default()
            .read_buffer_size(WS_READ_CHUNK)
            .max_message_size(Some(max))
            .max_frame_size(Some(max));
        let socket = tokio_tungstenite::WebSocketStream::from_partially_read(
            io,
            rest.to_vec(),
            tungstenite::protocol::Role::Server,
            Some(config),
        )
        .await;
        Some((socket, framing))
    }
}

/// The WebSocket layer's read chunk: what each WebSocket connection holds while idle, and the
/// most one socket read takes in.
const WS_READ_CHUNK: usize = 8 * 1024;

/// A listener that is accepting clients.
#[derive(Debug, Clone)]
pub struct BoundListener {
    /// Its configuration.
    pub config: Arc<ListenerConfig>,
    /// The address it actually bound (port 0 resolved).
    pub local_addr: SocketAddr,
}

impl BoundListener {
    /// `mqtt+mqant tcp://127.0.0.1:3563`-style description for the startup banner.
    pub fn describe(&self) -> String {
        let t = match self.config.network() {
            Network::Tcp => "tcp",
            Network::Ws => "ws",
        };
        format!("{} {t}://{}", self.config.scheme(), self.local_addr)
    }
}

//! A minimal MQTT 3.1.1 client on warren-proto's codec, made for load generation: packets are
//! encoded into one write buffer and sent with one write per batch; reads take whatever the
//! socket holds and decode every complete packet in it.
//!
//! The socket is split into a [`Reader`] and a [`Writer`] so one task can wait on reads while it
//! owns the write side too, and a publisher can hand its read side to a helper task.
//!
//! Against the raw echo reference (`warren bench echo-server`) the server's first answer is our
//! own CONNECT echoed back; [`Client::connect`] accepts that in place of a CONNACK.
//!
//! On a `ws://` or `wss://` target the same byte stream travels in WebSocket frames
//! ([`crate::ws`]): the reader takes the frames' payload out before decoding, the writer wraps
//! what was queued into frames before writing. Nothing above these two sees the difference.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::BytesMut;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpSocket;
use tokio::sync::Semaphore;
use tokio::task::JoinSet;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use warren_proto::mqtt::{self, Connect, Packet, QoS, Subscribe, SubscribeFilter};

use crate::BenchError;
use crate::login::{self, Login, ReadIo, WriteIo};
use crate::ws::{Deframer, Framer, Status};

/// Largest packet the client accepts from a server.
pub const MAX_PACKET: usize = 16 << 20;

/// Where and how to connect.
#[derive(Debug, Clone)]
pub struct ConnectOptions {
    /// Server address.
    pub target: SocketAddr,
    /// Local address to bind before connecting (spreads many connections over 127.x.y.z). A
    /// port of 0 lets the kernel choose; an explicit port that is taken falls back to that.
    pub source: Option<SocketAddr>,
    /// MQTT client id.
    pub client_id: String,
    /// Keepalive announced in CONNECT, seconds.
    pub keep_alive: u16,
    /// Deadline for TCP connect plus CONNACK.
    pub timeout: Duration,
    /// Spare read-buffer room ensured before each read: large for busy connections, tiny for
    /// idle ones.
    pub read_chunk: usize,
    /// TLS and credentials.
    pub login: Arc<Login>,
    /// CONNECT's clean_session flag: `false` asks the server to keep the session.
    pub clean_session: bool,
}

/// The read side: a socket half and the bytes read but not yet decoded.
#[derive(Debug)]
pub struct Reader<R> {
    io: R,
    buf: BytesMut,
    chunk: usize,
    /// WebSocket: the frames read, before their payload joins `buf`.
    ws: Option<Deframer>,
}

impl<R: AsyncRead + Unpin> Reader<R> {
    /// Reads once, appending whatever the socket has (over WebSocket: the payload of the frames
    /// read). Cancel-safe: bytes are never lost when the future is dropped. A closed connection
    /// (or a WebSocket close frame) is [`BenchError::Closed`].
    pub async fn fill(&mut self) -> Result<(), BenchError> {
        let raw = match &mut self.ws {
            None => &mut self.buf,
            Some(ws) => ws.raw(),
        };
        if raw.capacity() - raw.len() < self.chunk / 4 + 1 {
            raw.reserve(self.chunk);
        }
        if self.io.read_buf(raw).await? == 0 {
            return Err(BenchError::Closed);
        }
        if let Some(ws) = &mut self.ws
            && ws.decode(&mut self.buf)? == Status::Closed
        {
            return Err(BenchError::Closed);
        }
        Ok(())
    }

    /// The bytes read and not yet decoded, for protocols other than MQTT (pomelo).
    pub(crate) fn buf_mut(&mut self) -> &mut BytesMut {
        &mut self.buf
    }

    /// The next complete packet in the buffer, if there is one.
    pub fn next_packet(&mut self) -> Result<Option<Packet>, BenchError> {
        Ok(mqtt::decode(&mut self.buf, MAX_PACKET)?)
    }

    /// Reads until a complete packet arrives.
    pub async fn packet(&mut self) -> Result<Packet, BenchError> {
        loop {
            if let Some(p) = self.next_packet()? {
                return Ok(p);
            }
            self.fill().await?;
        }
    }
}

/// The write side: a socket half and the packets queued for the next write.
#[derive(Debug)]
pub struct Writer<W> {
    io: W,
    /// Bytes ready for the socket (over WebSocket: whole frames).
    buf: BytesMut,
    /// WebSocket: packets encoded and not yet framed.
    ws: Option<Framer>,
}

impl<W: AsyncWrite + Unpin> Writer<W> {
    /// Queues the bytes `encode` appends: one packet of the protocol (over WebSocket, its own
    /// frame unless frames are batched per write).
    pub(crate) fn queue_with(&mut self, encode: impl FnOnce(&mut BytesMut)) {
        match &mut self.ws {
            None => encode(&mut self.buf),
            Some(ws) => {
                encode(ws.plain());
                if !ws.batch() {
                    ws.seal(&mut self.buf);
                }
            }
        }
    }

    /// Queues any packet.
    pub fn queue(&mut self, p: &Packet) {
        self.queue_with(|b| mqtt::encode(p, b));
    }

    /// Queues a PUBLISH without building a packet value.
    pub fn queue_publish(&mut self, topic: &[u8], qos: QoS, pkid: u16, payload: &[u8]) {
        self.queue_with(|b| mqtt::encode_publish(b, topic, qos, false, false, pkid, payload));
    }

    /// Queues the PUBACK for an incoming QoS 1 PUBLISH.
    pub fn queue_puback(&mut self, pkid: u16) {
        let [h, l] = pkid.to_be_bytes();
        self.queue_with(|b| b.extend_from_slice(&[0x40, 0x02, h, l]));
    }

    /// Bytes queued and not yet written.
    pub fn queued(&self) -> usize {
        self.buf.len() + self.ws.as_ref().map_or(0, Framer::pending)
    }

    /// Writes everything queued in one go (one syscall when the socket has room).
    /// Cancel-safe: what was written is dropped from the queue, the rest stays for the next
    /// call, so no byte is ever sent twice.
    pub async fn flush(&mut self) -> Result<(), BenchError> {
        if let Some(ws) = &mut self.ws {
            ws.seal(&mut self.buf);
        }
        while !self.buf.is_empty() {
            if self.io.write_buf(&mut self.buf).await? == 0 {
                return Err(BenchError::Closed);
            }
        }
        // TLS keeps what it could not send yet; plain TCP has nothing to do here
        self.io.flush().await?;
        Ok(())
    }

    /// Closes the write side after what is queued (over WebSocket, with a close frame),
    /// ignoring errors (the run is over).
    pub(crate) async fn shutdown(&mut self) {
        if let Some(ws) = &mut self.ws {
            ws.seal(&mut self.buf);
            ws.close(&mut self.buf);
        }
        let _ = self.flush().await;
        let _ = self.io.shutdown().await;
    }

    /// Sends DISCONNECT and closes the write side, ignoring errors (the run is over).
    pub async fn goodbye(&mut self) {
        self.queue(&Packet::Disconnect);
        self.shutdown().await;
    }
}

/// Opens a connection to `target` from `source` (see [`ConnectOptions::source`]) with Nagle's
/// algorithm off, then does what `login` asks: TLS, and the WebSocket upgrade for `ws://` and
/// `wss://` targets. `read_chunk` is the read room kept free (see
/// [`ConnectOptions::read_chunk`]).
pub(crate) async fn connect_stream(
    target: SocketAddr,
    source: Option<SocketAddr>,
    login: &Login,
    read_chunk: usize,
) -> Result<(Reader<ReadIo>, Writer<WriteIo>), BenchError> {
    let connect_err = |source| BenchError::Connect {
        addr: target,
        source,
    };
    let new_socket = || match target {
        SocketAddr::V4(_) => TcpSocket::new_v4(),
        SocketAddr::V6(_) => TcpSocket::new_v6(),
    };
    let socket = new_socket().map_err(connect_err)?;
    let socket = match source {
        None => socket,
        Some(addr) => {
            // An explicit port avoids the kernel's search for a free one, which walks the
            // whole port range once tens of thousands of sockets (or their TIME_WAIT
            // remains) exist, and slows connecting to a few hundred per second.
            match socket.bind(addr) {
                Ok(()) => socket,
                Err(e) if e.kind() == std::io::ErrorKind::AddrInUse && addr.port() != 0 => {
                    let socket = new_socket().map_err(connect_err)?;
                    socket
                        .bind(SocketAddr::new(addr.ip(), 0))
                        .map_err(connect_err)?;
                    socket
                }
                Err(e) => return Err(connect_err(e)),
            }
        }
    };
    let stream = socket.connect(target).await.map_err(connect_err)?;
    stream.set_nodelay(true).map_err(connect_err)?;
    let (mut r, mut w) = login::split(stream, login).await.map_err(connect_err)?;
    let (deframer, framer) = match &login.ws {
        None => (None, None),
        Some(s) => {
            let leftover = crate::ws::handshake(&mut r, &mut w, s).await?;
            (Some(Deframer::new(leftover)), Some(Framer::new(s)))
        }
    };
    Ok((
        Reader {
            io: r,
            buf: BytesMut::new(),
            chunk: read_chunk.max(64),
            ws: deframer,
        },
        Writer {
            io: w,
            buf: BytesMut::new(),
            ws: framer,
        },
    ))
}

/// A connected MQTT client: both halves of its socket.
#[derive(Debug)]
pub struct Client {
    /// Incoming packets.
    pub reader: Reader<ReadIo>,
    /// Outgoing packets.
    pub writer: Writer<WriteIo>,
}

impl Client {
    /// Opens the connection (TCP, TLS, WebSocket as the target asks), sends CONNECT and waits
    /// for CONNACK (or, from an echo reference, the CONNECT itself), all within `o.timeout`.
    pub async fn connect(o: &ConnectOptions) -> Result<Client, BenchError> {
        tokio::time::timeout(o.timeout, Self::connect_inner(o))
            .await
            .map_err(|_| BenchError::Timeout {
                what: "CONNACK",
                after: o.timeout,
            })?
    }

    async fn connect_inner(o: &ConnectOptions) -> Result<Client, BenchError> {
        let (reader, writer) = connect_stream(o.target, o.source, &o.login, o.read_chunk).await?;
        let mut client = Client { reader, writer };
        let mut connect = Connect::new(o.client_id.clone(), o.keep_alive);
        connect.clean_session = o.clean_session;
        connect.username = o.login.username.clone();
        connect.password = o.login.password.clone().map(bytes::Bytes::from);
        client.writer.queue(&Packet::Connect(connect));
        client.writer.flush().await?;
        match client.reader.packet().await? {
            Packet::ConnAck(a) if a.code == 0 => Ok(client),
            Packet::ConnAck(a) => Err(BenchError::Refused(a.code)),
            // The echo reference sends our own bytes back.
            Packet::Connect(_) => Ok(client),
            other => Err(BenchError::Unexpected(other.name())),
        }
    }

    /// Sends DISCONNECT and waits up to `linger` for the server to close first, so the
    /// TIME_WAIT state lands on the server's side and the client's port is free at once.
    pub async fn close(mut self, linger: Duration) {
        self.writer.queue(&Packet::Disconnect);
        if self.writer.flush().await.is_err() {
            return;
        }
        let _ = tokio::time::timeout(linger, async {
            while self.reader.fill().await.is_ok() {
                self.reader.buf.clear();
            }
        })
        .await;
    }

    /// Subscribes to one filter and waits for the SUBACK.
    pub async fn subscribe(
        &mut self,
        filter: &str,
        qos: QoS,
        timeout: Duration,
    ) -> Result<(), BenchError> {
        const PKID: u16 = 1;
        self.writer.queue(&Packet::Subscribe(Subscribe {
            pkid: PKID,
            filters: vec![SubscribeFilter {
                filter: filter.to_owned(),
                qos,
            }],
        }));
        self.writer.flush().await?;
        let wait = async {
            loop {
                match self.reader.packet().await? {
                    Packet::SubAck(a) if a.pkid == PKID => {
                        return if a.return_codes.iter().any(|&c| c > 2) {
                            Err(BenchError::SubscribeRefused(filter.to_owned()))
                        } else {
                            Ok(())
                        };
                    }
                    // Nothing else is expected before the SUBACK; a retained message or a
                    // ping answer is harmless.
                    _ => {}
                }
            }
        };
        tokio::time::timeout(timeout, wait)
            .await
            .map_err(|_| BenchError::Timeout {
                what: "SUBACK",
                after: timeout,
            })?
    }
}

/// Runs `open(i)` for `i` in `0..n` (typically connect, maybe subscribe), at most `concurrency`
/// at once and, when `ramp` > 0, starting no more than `ramp` per second. Returns the results in
/// index order; the first failure is returned as the error.
pub async fn open_many<T, F, Fut>(
    n: usize,
    ramp: f64,
    concurrency: usize,
    stop: &CancellationToken,
    open: F,
) -> Result<Vec<T>, BenchError>
where
    T: Send + 'static,
    F: Fn(usize) -> Fut,
    Fut: Future<Output = Result<T, BenchError>> + Send + 'static,
{
    let gate = Arc::new(Semaphore::new(concurrency.max(1)));
    let mut set = JoinSet::new();
    let mut out: Vec<Option<T>> = (0..n).map(|_| None).collect();
    let mut keep = |done: Result<(usize, Result<T, BenchError>), tokio::task::JoinError>| {
        let (i, r) = done.map_err(|e| BenchError::Task(e.to_string()))?;
        if let Some(slot) = out.get_mut(i) {
            *slot = Some(r?);
        }
        Ok::<(), BenchError>(())
    };
    let start = Instant::now();
    for i in 0..n {
        if ramp > 0.0 {
            let at = start + Duration::from_secs_f64(i as f64 / ramp);
            tokio::select! {
                _ = stop.cancelled() => return Err(BenchError::Interrupted),
                _ = tokio::time::sleep_until(at) => {}
            }
        }
        let permit = tokio::select! {
            _ = stop.cancelled() => return Err(BenchError::Interrupted),
            p = gate.clone().acquire_owned() => p.map_err(|e| BenchError::Task(e.to_string()))?,
        };
        let fut = open(i);
        set.spawn(async move {
            let r = fut.await;
            drop(permit);
            (i, r)
        });
        while let Some(done) = set.try_join_next() {
            keep(done)?;
        }
    }
    loop {
        let done = tokio::select! {
            _ = stop.cancelled() => return Err(BenchError::Interrupted),
            d = set.join_next() => d,
        };
        match done {
            Some(d) => keep(d)?,
            None => break,
        }
    }
    Ok(out.into_iter().flatten().collect())
}

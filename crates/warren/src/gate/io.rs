//! A client connection as bytes, whatever carries it: a TCP socket, or a WebSocket. Stream
//! protocols (MQTT, pomelo) see WebSocket binary frames as a byte stream (a packet may span frames,
//! a frame may hold several); message protocols (JSON) keep frame boundaries: the reader prefixes
//! each WebSocket message with its 4-byte length, and the writer sends each marked message in its
//! own frame.
//!
//! A TLS connection is a third kind: a byte stream like TCP, read through rustls. Plain TCP keeps
//! its readiness-based read (no buffer while idle), the fast path.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::{Buf, BufMut, Bytes, BytesMut};
use futures_util::stream::{SplitSink, SplitStream};
use futures_util::{Sink, SinkExt, StreamExt};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, ReadBuf, ReadHalf, WriteHalf};
use tokio::net::TcpStream;
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio_tungstenite::WebSocketStream;
use tungstenite::Message as WsMessage;
use tungstenite::Utf8Bytes;
use tungstenite::protocol::CloseFrame;
use tungstenite::protocol::frame::coding::CloseCode;

use super::conn::Out;

/// How a WebSocket carries the protocol.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum WsFraming {
    /// Binary frames carrying a byte stream (MQTT, pomelo).
    Stream,
    /// One message per frame, sent as text (JSON).
    TextMessages,
}

/// A WebSocket connection: the socket the upgrade came on, plain or TLS.
pub(crate) type WebSocket = WebSocketStream<WsIo>;

/// The socket under a WebSocket: plain TCP or TLS (boxed: the TLS state is large, and most
/// WebSocket connections are plain behind a proxy that ends TLS).
pub(crate) enum WsIo {
    /// Plain TCP.
    Tcp(TcpStream),
    /// TLS over TCP.
    Tls(Box<TlsIo>),
}

impl AsyncRead for WsIo {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            WsIo::Tcp(s) => Pin::new(s).poll_read(cx, buf),
            WsIo::Tls(s) => Pin::new(&mut **s).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for WsIo {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            WsIo::Tcp(s) => Pin::new(s).poll_write(cx, buf),
            WsIo::Tls(s) => Pin::new(&mut **s).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            WsIo::Tcp(s) => Pin::new(s).poll_flush(cx),
            WsIo::Tls(s) => Pin::new(&mut **s).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            WsIo::Tcp(s) => Pin::new(s).poll_shutdown(cx),
            WsIo::Tls(s) => Pin::new(&mut **s).poll_shutdown(cx),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            WsIo::Tcp(s) => Pin::new(s).poll_write_vectored(cx, bufs),
            WsIo::Tls(s) => Pin::new(&mut **s).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match self {
            WsIo::Tcp(s) => s.is_write_vectored(),
            WsIo::Tls(s) => s.is_write_vectored(),
        }
    }
}

/// The reading side.
pub(crate) enum Reader {
    /// A TCP socket and how much room the next read gets (grows while reads fill it).
    Tcp(OwnedReadHalf, usize),
    /// A TLS connection and how much room the next read gets (as for TCP).
    Tls(ReadHalf<TlsIo>, usize),
    /// A WebSocket (over TCP or TLS), and how a read that already took messages in ended, to
    /// report on the next read (the peer's close, an error).
    Ws(SplitStream<WebSocket>, WsFraming, Option<io::Result<()>>),
}

/// The writing side.
pub(crate) enum Writer {
    /// A byte stream: TCP, or TLS over TCP.
    Tcp(StreamWriter),
    /// A WebSocket (over TCP or TLS); boxed, so that a TCP connection's writer stays small.
    Ws(Box<SplitSink<WebSocket, WsMessage>>, WsFraming),
}

/// The writing side of a byte stream.
pub(crate) enum StreamWriter {
    /// Plain TCP.
    Plain(OwnedWriteHalf),
    /// TLS: writes go through rustls and are flushed.
    Tls(WriteHalf<TlsIo>),
}

/// A server-side TLS connection, with any bytes read before the protocol was known put back.
pub(crate) type TlsIo = Prefixed<tokio_rustls::server::TlsStream<TcpStream>>;

pub(crate) fn tcp(s: TcpStream) -> (Reader, Writer) {
    let (r, w) = s.into_split();
    (
        Reader::Tcp(r, MIN_READ),
        Writer::Tcp(StreamWriter::Plain(w)),
    )
}

pub(crate) fn tls(s: TlsIo) -> (Reader, Writer) {
    let (r, w) = tokio::io::split(s);
    (Reader::Tls(r, MIN_READ), Writer::Tcp(StreamWriter::Tls(w)))
}

pub(crate) fn ws(s: WebSocket, framing: WsFraming) -> (Reader, Writer) {
    let (w, r) = s.split();
    (
        Reader::Ws(r, framing, None),
        Writer::Ws(Box::new(w), framing),
    )
}

/// Smallest room a read gets; small, so connections that send little stay cheap.
const MIN_READ: usize = 512;
/// Largest room a read gets: a client that streams fills it and needs few syscalls.
const MAX_READ: usize = 64 * 1024;
/// Largest room a TLS read gets: one TLS record's plaintext. A TLS read reserves its room
/// before waiting (rustls, not the socket, knows when data is ready), so an idle TLS connection
/// may hold this much.
const MAX_TLS_READ: usize = 16 * 1024;

impl Reader {
    /// Read what is available into `buf`. `Ok(0)` means the peer closed. Cancel-safe: nothing is
    /// lost if the future is dropped before it completes.
    pub(crate) async fn read(&mut self, buf: &mut BytesMut) -> io::Result<usize> {
        std::future::poll_fn(|cx| self.poll_read(cx, buf)).await
    }

    /// [`Reader::read`] as a poll: what the connection loop waits on, so that its state holds no
    /// read future (an idle connection's whole state is a few hundred bytes).
    pub(crate) fn poll_read(
        &mut self,
        cx: &mut Context<'_>,
        buf: &mut BytesMut,
    ) -> Poll<io::Result<usize>> {
        match self {
            Reader::Tcp(r, room) => loop {
                // wait for data before reserving room, so an idle connection holds no buffer
                if let Err(e) = std::task::ready!(r.as_ref().poll_read_ready(cx)) {
                    return Poll::Ready(Err(e));
                }
                if buf.capacity() - buf.len() < *room {
                    buf.reserve(*room);
                }
                let spare = buf.capacity() - buf.len();
                match r.try_read_buf(buf) {
                    Ok(n) => {
                        // a read that filled its room means more was waiting: give the next one
                        // more; a small read lets the room shrink back
                        if n == spare {
                            *room = (*room * 2).min(MAX_READ);
                        } else if n < *room / 4 {
                            *room = (*room / 2).max(MIN_READ);
                        }
                        return Poll::Ready(Ok(n));
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                        // readiness was stale (left from the last read): wait again without
                        // holding the room just reserved
                        if buf.is_empty() {
                            *buf = BytesMut::new();
                        }
                        continue;
                    }
                    Err(e) => return Poll::Ready(Err(e)),
                }
            },
            Reader::Tls(r, room) => {
                if buf.capacity() - buf.len() < *room {
                    buf.reserve(*room);
                }
                let spare = buf.capacity() - buf.len();
                let n = std::task::ready!(tokio_util::io::poll_read_buf(Pin::new(r), cx, buf))?;
                if n == spare {
                    *room = (*room * 2).min(MAX_TLS_READ);
                } else if n < *room / 4 {
                    *room = (*room / 2).max(MIN_READ);
                }
                Poll::Ready(Ok(n))
            }
            Reader::Ws(r, framing, ended) => {
                if let Some(end) = ended.take() {
                    return Poll::Ready(end.map(|()| 0));
                }
                // every message already buffered, not one per read: each read is one pass of
                // the protocol's decoding, and a batch of frames costs one
                let mut taken = 0;
                while taken < MAX_READ {
                    let data: Bytes = match r.poll_next_unpin(cx) {
                        Poll::Pending if taken > 0 => break,
                        Poll::Pending => return Poll::Pending,
                        Poll::Ready(None) | Poll::Ready(Some(Ok(WsMessage::Close(_)))) => {
                            if taken > 0 {
                                *ended = Some(Ok(()));
                                break;
                            }
                            return Poll::Ready(Ok(0));
                        }
                        Poll::Ready(Some(Err(e))) => {
                            let e = io::Error::other(e);
                            if taken > 0 {
                                *ended = Some(Err(e));
                                break;
                            }
                            return Poll::Ready(Err(e));
                        }
                        Poll::Ready(Some(Ok(WsMessage::Binary(b)))) => b,
                        Poll::Ready(Some(Ok(WsMessage::Text(t))))
                            if *framing == WsFraming::TextMessages =>
                        {
                            Bytes::from(t)
                        }
                        Poll::Ready(Some(Ok(WsMessage::Text(_)))) => {
                            let e = io::Error::new(io::ErrorKind::InvalidData, TextOnBinary);
                            if taken > 0 {
                                *ended = Some(Err(e));
                                break;
                            }
                            return Poll::Ready(Err(e));
                        }
                        Poll::Ready(Some(Ok(_))) => continue,
                    };
                    match framing {
                        WsFraming::Stream => {
                            if data.is_empty() {
                                continue;
                            }
                            buf.extend_from_slice(&data);
                        }
                        WsFraming::TextMessages => {
                            buf.reserve(4 + data.len());
                            buf.put_u32(data.len() as u32);
                            buf.extend_from_slice(&data);
                        }
                    }
                    taken += data.len().max(1);
                }
                Poll::Ready(Ok(taken))
            }
        }
    }
}

impl Writer {
    /// Make progress on `out` without waiting: write what the socket takes now (a WebSocket: hand
    /// it to the sink as frames), and flush. `Ready(Ok(n))` with the bytes taken from `out`
    /// (0: only flushed); `Pending` when the transport has no room, the task being woken when it
    /// has. Cancel-safe: what was taken is gone from `out`, what was not stays.
    pub(crate) fn poll_write_out(
        &mut self,
        cx: &mut Context<'_>,
        out: &mut Out,
    ) -> Poll<io::Result<usize>> {
        match self {
            Writer::Tcp(StreamWriter::Plain(w)) => poll_write_stream(w, cx, out, false),
            // rustls holds what it encrypted until flushed
            Writer::Tcp(StreamWriter::Tls(w)) => poll_write_stream(w, cx, out, true),
            Writer::Ws(w, WsFraming::Stream) => {
                let mut taken = 0;
                if !out.buf.is_empty() {
                    match Pin::new(&mut *w).poll_ready(cx) {
                        Poll::Ready(Ok(())) => {}
                        Poll::Ready(Err(e)) => return Poll::Ready(Err(io::Error::other(e))),
                        Poll::Pending => return Poll::Pending,
                    }
                    taken = out.buf.len();
                    out.ends.clear();
                    let all = out.buf.split().freeze();
                    Pin::new(&mut *w)
                        .start_send(WsMessage::Binary(all))
                        .map_err(io::Error::other)?;
                    out.unflushed = true;
                }
                flush_ws(w, cx, out, taken)
            }
            Writer::Ws(w, WsFraming::TextMessages) => {
                // one text frame per marked message; the sink takes one at a time (each
                // `start_send` after its `poll_ready`)
                let mut taken = 0;
                let mut sent = 0;
                while sent < out.ends.len() {
                    match Pin::new(&mut *w).poll_ready(cx) {
                        Poll::Ready(Ok(())) => {}
                        Poll::Ready(Err(e)) => return Poll::Ready(Err(io::Error::other(e))),
                        Poll::Pending => break,
                    }
                    let end = out.ends[sent];
                    let msg = out.buf.split_to(end - taken).freeze();
                    taken = end;
                    sent += 1;
                    let text = Utf8Bytes::try_from(msg).map_err(io::Error::other)?;
                    Pin::new(&mut *w)
                        .start_send(WsMessage::Text(text))
                        .map_err(io::Error::other)?;
                    out.unflushed = true;
                }
                out.ends.drain(..sent);
                for e in &mut out.ends {
                    *e -= taken;
                }
                if sent == 0 && !out.ends.is_empty() && !out.unflushed {
                    return Poll::Pending;
                }
                flush_ws(w, cx, out, taken)
            }
        }
    }

    /// Write what the framer produced, then clear it.
    pub(crate) async fn write(&mut self, out: &mut Out) -> io::Result<()> {
        match self {
            Writer::Tcp(StreamWriter::Plain(w)) => {
                w.write_all(&out.buf).await?;
                out.buf.clear();
                out.ends.clear();
                Ok(())
            }
            Writer::Tcp(StreamWriter::Tls(w)) => {
                w.write_all(&out.buf).await?;
                w.flush().await?;
                out.buf.clear();
                out.ends.clear();
                Ok(())
            }
            Writer::Ws(w, WsFraming::Stream) => {
                out.ends.clear();
                let b: Bytes = out.buf.split().freeze();
                w.send(WsMessage::Binary(b)).await.map_err(io::Error::other)
            }
            Writer::Ws(w, WsFraming::TextMessages) => {
                let mut all = out.buf.split().freeze();
                let mut start = 0;
                for end in out.ends.drain(..) {
                    let msg = all.split_to(end - start);
                    start = end;
                    let text = Utf8Bytes::try_from(msg).map_err(io::Error::other)?;
                    w.feed(WsMessage::Text(text))
                        .await
                        .map_err(io::Error::other)?;
                }
                w.flush().await.map_err(io::Error::other)
            }
        }
    }

    /// Say goodbye the transport's way (a WebSocket close frame, with `code` if given) and close.
    pub(crate) async fn close(&mut self, code: Option<u16>) {
        match self {
            Writer::Tcp(StreamWriter::Plain(w)) => {
                let _ = w.shutdown().await;
            }
            Writer::Tcp(StreamWriter::Tls(w)) => {
                // close_notify, then FIN
                let _ = w.shutdown().await;
            }
            Writer::Ws(w, _) => {
                let frame = code.map(|code| CloseFrame {
                    code: CloseCode::from(code),
                    reason: Utf8Bytes::from_static(""),
                });
                let _ = w.send(WsMessage::Close(frame)).await;
                let _ = w.close().await;
            }
        }
    }

    /// Write raw bytes before a session exists (a refusal such as CONNACK 2).
    pub(crate) async fn write_raw(&mut self, bytes: &[u8]) -> io::Result<()> {
        let mut out = Out::default();
        out.buf.extend_from_slice(bytes);
        out.end_message();
        self.write(&mut out).await
    }
}

/// A text frame where the protocol carries binary frames only (MQTT, pomelo): the connection
/// ends with WebSocket close code 1003.
#[derive(Debug)]
pub(crate) struct TextOnBinary;

impl std::fmt::Display for TextOnBinary {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("text frame on a binary protocol")
    }
}

impl std::error::Error for TextOnBinary {}

/// [`Writer::poll_write_out`] for a byte stream (TCP, TLS): write what the socket takes, then
/// flush when `flush` (TLS). `Ready(taken)` once something was taken or flushed, `Pending` with
/// no progress.
fn poll_write_stream<W: AsyncWrite + Unpin>(
    w: &mut W,
    cx: &mut Context<'_>,
    out: &mut Out,
    flush: bool,
) -> Poll<io::Result<usize>> {
    let mut taken = 0;
    while !out.buf.is_empty() {
        match Pin::new(&mut *w).poll_write(cx, &out.buf) {
            Poll::Ready(Ok(0)) => return Poll::Ready(Err(io::ErrorKind::WriteZero.into())),
            Poll::Ready(Ok(n)) => {
                out.buf.advance(n);
                out.unflushed = flush;
                taken += n;
            }
            Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
            Poll::Pending if taken > 0 => return Poll::Ready(Ok(taken)),
            Poll::Pending => return Poll::Pending,
        }
    }
    out.ends.clear();
    if out.unflushed {
        match Pin::new(&mut *w).poll_flush(cx) {
            Poll::Ready(Ok(())) => out.unflushed = false,
            Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
            Poll::Pending if taken > 0 => {}
            Poll::Pending => return Poll::Pending,
        }
    }
    Poll::Ready(Ok(taken))
}

/// Flush a WebSocket sink after `taken` bytes went to it: `Ready(taken)` once flushed, or with
/// progress made; `Pending` with none.
fn flush_ws(
    w: &mut SplitSink<WebSocket, WsMessage>,
    cx: &mut Context<'_>,
    out: &mut Out,
    taken: usize,
) -> Poll<io::Result<usize>> {
    if out.unflushed {
        match Pin::new(&mut *w).poll_flush(cx) {
            Poll::Ready(Ok(())) => out.unflushed = false,
            Poll::Ready(Err(e)) => return Poll::Ready(Err(io::Error::other(e))),
            Poll::Pending if taken > 0 => {}
            Poll::Pending => return Poll::Pending,
        }
    }
    Poll::Ready(Ok(taken))
}

/// A stream with bytes already read from it put back in front: the first byte a pomelo
/// listener read to tell a pomelo package from an HTTP request, over TLS (where peeking is not
/// possible).
pub(crate) struct Prefixed<S> {
    prefix: Bytes,
    inner: S,
}

impl<S> Prefixed<S> {
    /// `inner`, to be read after `prefix`.
    pub(crate) fn new(prefix: Bytes, inner: S) -> Self {
        Prefixed { prefix, inner }
    }

    /// The stream itself.
    pub(crate) fn get_mut(&mut self) -> &mut S {
        &mut self.inner
    }

    /// The stream, dropping any prefix not read yet.
    pub(crate) fn into_inner(self) -> S {
        self.inner
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Prefixed<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if !self.prefix.is_empty() {
            let n = self.prefix.len().min(buf.remaining());
            let head = self.prefix.split_to(n);
            buf.put_slice(&head);
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Prefixed<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncReadExt;

    #[tokio::test]
    async fn prefixed_reads_the_prefix_then_the_stream() {
        let mut p = Prefixed::new(Bytes::from_static(b"GE"), &b"T / HTTP/1.1"[..]);
        let mut out = Vec::new();
        p.read_to_end(&mut out).await.expect("read");
        assert_eq!(out, b"GET / HTTP/1.1");
    }
}

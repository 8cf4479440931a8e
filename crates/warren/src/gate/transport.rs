//! A client connection as a byte stream, whatever carries it: a TCP socket, or a WebSocket whose
//! binary frames carry the protocol's bytes (a packet may span frames, a frame may hold several).

use std::io;

use axum::extract::ws::{Message as WsMessage, WebSocket};
use bytes::{Bytes, BytesMut};
use futures_util::stream::{SplitSink, SplitStream};
use futures_util::{SinkExt, StreamExt};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};

/// The reading side.
pub(crate) enum Reader {
    Tcp(OwnedReadHalf),
    Ws(SplitStream<WebSocket>),
}

/// The writing side.
pub(crate) enum Writer {
    Tcp(OwnedWriteHalf),
    Ws(SplitSink<WebSocket, WsMessage>),
}

pub(crate) fn tcp(s: TcpStream) -> (Reader, Writer) {
    let (r, w) = s.into_split();
    (Reader::Tcp(r), Writer::Tcp(w))
}

pub(crate) fn ws(s: WebSocket) -> (Reader, Writer) {
    let (w, r) = s.split();
    (Reader::Ws(r), Writer::Ws(w))
}

/// Smallest free space kept in the read buffer before a read; small, so idle connections stay
/// cheap, and doubled while a large packet arrives.
const MIN_READ: usize = 512;

impl Reader {
    /// Read what is available into `buf`. `Ok(0)` means the peer closed. Cancel-safe: nothing is
    /// lost if the future is dropped before it completes.
    pub(crate) async fn read(&mut self, buf: &mut BytesMut) -> io::Result<usize> {
        match self {
            Reader::Tcp(r) => {
                if buf.capacity() - buf.len() < MIN_READ / 2 {
                    buf.reserve(buf.capacity().max(MIN_READ));
                }
                r.read_buf(buf).await
            }
            Reader::Ws(r) => loop {
                match r.next().await {
                    None => return Ok(0),
                    Some(Err(e)) => return Err(io::Error::other(e)),
                    Some(Ok(WsMessage::Binary(b))) => {
                        if b.is_empty() {
                            continue;
                        }
                        buf.extend_from_slice(&b);
                        return Ok(b.len());
                    }
                    Some(Ok(WsMessage::Text(_))) => {
                        return Err(io::Error::new(
                            io::ErrorKind::InvalidData,
                            "text frame on a binary protocol",
                        ));
                    }
                    Some(Ok(WsMessage::Close(_))) => return Ok(0),
                    Some(Ok(_)) => continue,
                }
            },
        }
    }
}

impl Writer {
    /// Write one coalesced buffer.
    pub(crate) async fn write(&mut self, buf: &mut BytesMut) -> io::Result<()> {
        match self {
            Writer::Tcp(w) => {
                w.write_all(buf).await?;
                buf.clear();
                Ok(())
            }
            Writer::Ws(w) => {
                let b: Bytes = buf.split().freeze();
                w.send(WsMessage::Binary(b)).await.map_err(io::Error::other)
            }
        }
    }

    /// Say goodbye the transport's way and close.
    pub(crate) async fn close(&mut self) {
        match self {
            Writer::Tcp(w) => {
                let _ = w.shutdown().await;
            }
            Writer::Ws(w) => {
                let _ = w.send(WsMessage::Close(None)).await;
                let _ = w.close().await;
            }
        }
    }
}

//! The WebSocket echo server (`warren bench ws-echo-server`): the physical-limit reference for
//! `request` and `pomelo-request` over WebSocket, as `echo-server` is over TCP. It is the least a
//! WebSocket server built on tokio-tungstenite (the stack under warren's WebSocket listeners)
//! can do: upgrade the connection (any path; the `mqtt` subprotocol is accepted when offered),
//! then send every data message back as it came, the messages already read in one write.
//!
//! The client takes its own CONNECT (or pomelo handshake) coming back as the server's answer and
//! each echoed request as its reply, so a round trip costs the server one read, the frames'
//! parsing and unmasking, and one write of unmasked frames, and nothing else.

use futures_util::{FutureExt, SinkExt, StreamExt};
use tokio::net::TcpStream;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::handshake::server::{
    ErrorResponse, Request as HsRequest, Response as HsResponse,
};
use tokio_tungstenite::tungstenite::http::HeaderValue;
use tokio_util::sync::CancellationToken;

use crate::BenchError;
use crate::args::EchoServerArgs;

/// Most messages echoed in one write.
const BATCH: usize = 1024;

/// Serves until `stop` is cancelled; prints `listening ADDR` on stdout once bound.
pub async fn run(a: &EchoServerArgs, stop: CancellationToken) -> Result<(), BenchError> {
    crate::echo::accept_loop(a, stop, serve).await
}

/// Accepts the `mqtt` subprotocol when the client offers it (MQTT clients want it confirmed).
/// The error type is tungstenite's callback signature.
#[allow(clippy::result_large_err)]
fn choose_protocol(req: &HsRequest, mut resp: HsResponse) -> Result<HsResponse, ErrorResponse> {
    let offered = req
        .headers()
        .get_all("sec-websocket-protocol")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|p| p.trim() == "mqtt");
    if offered {
        resp.headers_mut()
            .insert("sec-websocket-protocol", HeaderValue::from_static("mqtt"));
    }
    Ok(resp)
}

async fn serve(sock: TcpStream, stop: CancellationToken) {
    let _ = sock.set_nodelay(true);
    let ws = tokio::select! {
        _ = stop.cancelled() => return,
        r = tokio_tungstenite::accept_hdr_async(sock, choose_protocol) => match r {
            Ok(ws) => ws,
            Err(_) => return,
        },
    };
    let _ = echo(ws, stop).await;
}

/// Sends every data message back: waits for one, takes the others already readable, writes
/// them all at once. Pings are answered by tungstenite on the same write.
async fn echo(
    mut ws: WebSocketStream<TcpStream>,
    stop: CancellationToken,
) -> Result<(), tokio_tungstenite::tungstenite::Error> {
    loop {
        let first = tokio::select! {
            biased;
            _ = stop.cancelled() => return Ok(()),
            m = ws.next() => m,
        };
        let mut next = first;
        let mut n = 0;
        loop {
            match next {
                None => return Ok(()),
                Some(Err(e)) => return Err(e),
                Some(Ok(m @ (Message::Binary(_) | Message::Text(_)))) => ws.feed(m).await?,
                Some(Ok(Message::Close(_))) => {
                    ws.flush().await?;
                    return Ok(());
                }
                Some(Ok(_)) => {}
            }
            n += 1;
            if n == BATCH {
                break;
            }
            // what is already read (or readable without waiting) goes in the same write
            match ws.next().now_or_never() {
                Some(m) => next = m,
                None => break,
            }
        }
        ws.flush().await?;
    }
}

//! Accepting clients: a TCP accept loop, or an HTTP server that upgrades to WebSocket, both under
//! the listener's connection cap (`max_conn`) and both stopping at drain. A pomelo listener serves
//! raw TCP and WebSocket on one port: the first byte of a connection decides (PROTOCOLS.md §3.6).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::ws::WebSocketUpgrade;
use axum::extract::{ConnectInfo, State};
use axum::http::{Method, StatusCode};
use axum::response::{IntoResponse, Response};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tracing::Instrument;

use super::transport::{self, Reader, Writer, WsFraming};
use super::{Gate, json, line, mqtt, pomelo, pomelo_rpc};
use crate::config::{ListenerConfig, ListenerProtocol};
use crate::node::BoundListener;

/// Bind the listener's address and start accepting.
pub(crate) async fn listen(
    gate: Arc<Gate>,
    cfg: Arc<ListenerConfig>,
) -> std::io::Result<BoundListener> {
    let addr = cfg
        .socket_addr()
        .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e))?;
    let socket = TcpListener::bind(addr).await?;
    let local_addr = socket.local_addr()?;
    let slots = Arc::new(Semaphore::new(cfg.max_conn));
    let all_ws = cfg.serves_websocket() && cfg.protocol != ListenerProtocol::Pomelo;
    if all_ws {
        let app = ws_app(WsState {
            gate: gate.clone(),
            cfg: cfg.clone(),
            slots,
        });
        let stop = gate.draining.clone();
        gate.tracker.spawn(async move {
            let served = axum::serve(
                socket,
                app.into_make_service_with_connect_info::<SocketAddr>(),
            )
            .with_graceful_shutdown(stop.cancelled_owned())
            .await;
            if let Err(e) = served {
                tracing::error!(error = %e, "websocket listener failed");
            }
        });
    } else {
        gate.tracker
            .spawn(accept_tcp(gate.clone(), cfg.clone(), socket, slots));
    }
    Ok(BoundListener {
        config: cfg,
        local_addr,
    })
}

/// Hand a connection to its protocol, inside the connection's span (node, peer, protocol,
/// session) so every line it logs says whose it is.
async fn serve(gate: Arc<Gate>, cfg: Arc<ListenerConfig>, r: Reader, w: Writer, peer: SocketAddr) {
    let span = tracing::info_span!(
        "conn",
        node = %gate.node.id(),
        %peer,
        protocol = cfg.scheme(),
        session = tracing::field::Empty
    );
    metrics::counter!("warren_connections_total", "protocol" => cfg.scheme()).increment(1);
    dispatch(gate, cfg, r, w, peer).instrument(span).await;
}

async fn dispatch(
    gate: Arc<Gate>,
    cfg: Arc<ListenerConfig>,
    r: Reader,
    w: Writer,
    peer: SocketAddr,
) {
    // each protocol's connection future lives in its own allocation, sized for that protocol
    // alone (an idle MQTT connection does not pay for the largest protocol's state)
    match cfg.protocol {
        ListenerProtocol::Mqtt => Box::pin(mqtt::serve(gate, cfg, r, w, peer)).await,
        ListenerProtocol::Pomelo => Box::pin(pomelo::serve(gate, cfg, r, w, peer)).await,
        ListenerProtocol::Json => Box::pin(json::serve(gate, cfg, r, w, peer)).await,
        ListenerProtocol::Line => Box::pin(line::serve(gate, cfg, r, w, peer)).await,
        ListenerProtocol::PomeloRpc => Box::pin(pomelo_rpc::serve(gate, cfg, r, w, peer)).await,
    }
}

fn refuse_full(peer: SocketAddr, cfg: &ListenerConfig) {
    tracing::warn!(%peer, reason = "connection limit reached", max_conn = cfg.max_conn, "refusing connection");
    metrics::counter!("warren_connections_refused_total", "reason" => "max_conn").increment(1);
}

async fn accept_tcp(
    gate: Arc<Gate>,
    cfg: Arc<ListenerConfig>,
    socket: TcpListener,
    slots: Arc<Semaphore>,
) {
    let ws = (cfg.protocol == ListenerProtocol::Pomelo).then(|| WsState {
        gate: gate.clone(),
        cfg: cfg.clone(),
        slots: slots.clone(),
    });
    loop {
        let accepted = tokio::select! {
            biased;
            _ = gate.draining.cancelled() => break,
            r = socket.accept() => r,
        };
        let (stream, peer) = match accepted {
            Ok(x) => x,
            Err(e) => {
                // out of file descriptors and the like: back off instead of spinning
                tracing::warn!(error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let Ok(permit) = slots.clone().try_acquire_owned() else {
            refuse_full(peer, &cfg);
            drop(stream);
            continue;
        };
        let _ = stream.set_nodelay(true);
        let g = gate.clone();
        let c = cfg.clone();
        let ws = ws.clone();
        gate.tracker.spawn(async move {
            match ws {
                Some(ws) => Box::pin(sniff(ws, stream, peer, permit)).await,
                None => {
                    let (r, w) = transport::tcp(stream);
                    serve(g, c, r, w, peer).await;
                    drop(permit);
                }
            }
        });
    }
}

/// One port, two transports: peek at the first byte. 0x01–0x05 is a pomelo package type (raw
/// TCP); an ASCII letter starts an HTTP request (a WebSocket upgrade); anything else is refused.
async fn sniff(ws: WsState, stream: TcpStream, peer: SocketAddr, permit: OwnedSemaphorePermit) {
    let mut first = [0u8; 1];
    let deadline = Duration::from_secs(ws.cfg.connect_timeout_s);
    let peeked = tokio::select! {
        _ = ws.gate.killing.cancelled() => return,
        r = tokio::time::timeout(deadline, stream.peek(&mut first)) => r,
    };
    match peeked {
        Err(_) => {
            tracing::warn!(%peer, reason = "nothing received before the connect deadline", "closing connection");
        }
        Ok(Ok(0)) | Ok(Err(_)) => {}
        Ok(Ok(_)) if (1..=5).contains(&first[0]) => {
            let (r, w) = transport::tcp(stream);
            serve(ws.gate.clone(), ws.cfg.clone(), r, w, peer).await;
            drop(permit);
        }
        Ok(Ok(_)) if first[0].is_ascii_alphabetic() => {
            // the upgrade handler takes its own slot; this one only covers the HTTP exchange
            drop(permit);
            let app = ws_app(ws.clone()).layer(axum::Extension(ConnectInfo(peer)));
            let service = hyper_util::service::TowerToHyperService::new(app);
            let io = hyper_util::rt::TokioIo::new(stream);
            let served = hyper::server::conn::http1::Builder::new()
                .timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(Duration::from_secs(ws.cfg.handshake_timeout_s))
                .serve_connection(io, service)
                .with_upgrades()
                .await;
            if let Err(e) = served {
                tracing::debug!(%peer, error = %e, "http connection ended");
            }
        }
        Ok(Ok(_)) => {
            tracing::warn!(%peer, reason = format!("first byte {:#04x} is neither a pomelo package nor HTTP", first[0]), "closing connection");
            metrics::counter!("warren_connections_refused_total", "reason" => "bad_first_byte")
                .increment(1);
        }
    }
}

#[derive(Clone)]
struct WsState {
    gate: Arc<Gate>,
    cfg: Arc<ListenerConfig>,
    slots: Arc<Semaphore>,
}

fn ws_app(state: WsState) -> axum::Router {
    axum::Router::new().fallback(upgrade).with_state(state)
}

async fn upgrade(
    State(st): State<WsState>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    method: Method,
    ws: Result<WebSocketUpgrade, axum::extract::ws::rejection::WebSocketUpgradeRejection>,
) -> Response {
    if method != Method::GET {
        tracing::info!(%peer, reason = "websocket listener only accepts GET", %method, "refusing request");
        return StatusCode::METHOD_NOT_ALLOWED.into_response();
    }
    let ws = match ws {
        Ok(ws) => ws,
        Err(e) => {
            tracing::info!(%peer, reason = %e, "refusing websocket upgrade");
            return e.into_response();
        }
    };
    if st.gate.draining.is_cancelled() {
        return StatusCode::SERVICE_UNAVAILABLE.into_response();
    }
    let Ok(permit) = st.slots.clone().try_acquire_owned() else {
        refuse_full(peer, &st.cfg);
        return StatusCode::SERVICE_UNAVAILABLE.into_response();
    };
    let (max, framing, protocols): (usize, WsFraming, &[&'static str]) = match st.cfg.protocol {
        ListenerProtocol::Mqtt => (
            st.cfg.max_packet(),
            WsFraming::Stream,
            &["mqtt", "mqttv3.1"],
        ),
        ListenerProtocol::Pomelo => (pomelo::max_package(&st.cfg) + 4, WsFraming::Stream, &[]),
        _ => (json::max_message(&st.cfg), WsFraming::TextMessages, &[]),
    };
    let gate = st.gate.clone();
    let cfg = st.cfg.clone();
    // track the connection from now, so a drain waits for it
    let token = gate.tracker.token();
    ws.protocols(protocols.iter().copied())
        .max_message_size(max)
        .max_frame_size(max)
        .on_upgrade(move |socket| async move {
            let (r, w) = transport::ws(socket, framing);
            serve(gate, cfg, r, w, peer).await;
            drop(permit);
            drop(token);
        })
}

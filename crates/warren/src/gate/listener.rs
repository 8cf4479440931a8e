//! Accepting clients: a TCP accept loop, or an HTTP server that upgrades to WebSocket, both under
//! the listener's connection cap (`max_conn`) and both stopping at drain.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::ws::WebSocketUpgrade;
use axum::extract::{ConnectInfo, State};
use axum::http::{Method, StatusCode};
use axum::response::{IntoResponse, Response};
use tokio::net::TcpListener;
use tokio::sync::Semaphore;

use super::{Gate, mqtt, transport};
use crate::config::{ListenerConfig, TransportName};
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
    match cfg.transport {
        TransportName::Tcp => {
            gate.tracker
                .spawn(accept_tcp(gate.clone(), cfg.clone(), socket, slots));
        }
        TransportName::Ws => {
            let state = WsState {
                gate: gate.clone(),
                cfg: cfg.clone(),
                slots,
            };
            let app = axum::Router::new().fallback(upgrade).with_state(state);
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
        }
    }
    Ok(BoundListener {
        config: cfg,
        local_addr,
    })
}

async fn accept_tcp(
    gate: Arc<Gate>,
    cfg: Arc<ListenerConfig>,
    socket: TcpListener,
    slots: Arc<Semaphore>,
) {
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
            tracing::warn!(%peer, reason = "connection limit reached", max_conn = cfg.max_conn, "refusing connection");
            metrics::counter!("warren_connections_refused_total", "reason" => "max_conn")
                .increment(1);
            drop(stream);
            continue;
        };
        let _ = stream.set_nodelay(true);
        let (r, w) = transport::tcp(stream);
        let g = gate.clone();
        let c = cfg.clone();
        gate.tracker.spawn(async move {
            mqtt::serve(g, c, r, w, peer).await;
            drop(permit);
        });
    }
}

#[derive(Clone)]
struct WsState {
    gate: Arc<Gate>,
    cfg: Arc<ListenerConfig>,
    slots: Arc<Semaphore>,
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
        tracing::warn!(%peer, reason = "connection limit reached", max_conn = st.cfg.max_conn, "refusing connection");
        metrics::counter!("warren_connections_refused_total", "reason" => "max_conn").increment(1);
        return StatusCode::SERVICE_UNAVAILABLE.into_response();
    };
    let max = st.cfg.max_packet();
    let gate = st.gate.clone();
    let cfg = st.cfg.clone();
    // track the connection from now, so a drain waits for it
    let token = gate.tracker.token();
    ws.protocols(["mqtt", "mqttv3.1"])
        .max_message_size(max)
        .max_frame_size(max)
        .on_upgrade(move |socket| async move {
            let (r, w) = transport::ws(socket, transport::WsFraming::Stream);
            mqtt::serve(gate, cfg, r, w, peer).await;
            drop(permit);
            drop(token);
        })
}

//! The HTTP side of `warren serve`: the chat page, its assets, and `/config.json`, which tells
//! the page where the MQTT-over-WebSocket listener is.

use std::net::SocketAddr;

use axum::Router;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use warren::config::{ListenerProtocol, Mode, TransportName};
use warren::node::BoundListener;
use warren_chat::web::{self as assets, Asset};

#[derive(Clone)]
struct Page {
    /// The WebSocket listener the page should use: (address, path).
    ws: Option<SocketAddr>,
}

/// Bind `addr` and serve until `stop` fires. Returns the bound address and the server task.
pub async fn serve(
    addr: &str,
    listeners: &[BoundListener],
    stop: CancellationToken,
) -> std::io::Result<(SocketAddr, JoinHandle<()>)> {
    let ws = listeners
        .iter()
        .filter(|l| {
            l.config.protocol == ListenerProtocol::Mqtt && l.config.transport() == TransportName::Ws
        })
        .max_by_key(|l| l.config.mode == Mode::Mqant)
        .map(|l| l.local_addr);
    let app = Router::new()
        .route("/", get(index))
        .route("/index.html", get(index))
        .route("/mqant/index.html", get(index))
        .route("/config.json", get(config_json))
        .route("/static/{*path}", get(static_file))
        .with_state(Page { ws });
    let socket = tokio::net::TcpListener::bind(addr).await?;
    let local = socket.local_addr()?;
    let task = tokio::spawn(async move {
        let r = axum::serve(socket, app)
            .with_graceful_shutdown(stop.cancelled_owned())
            .await;
        if let Err(e) = r {
            tracing::error!(error = %e, "web server failed");
        }
    });
    Ok((local, task))
}

fn respond(a: Asset) -> Response {
    (
        [
            (header::CONTENT_TYPE, a.content_type),
            (header::CACHE_CONTROL, "no-cache"),
        ],
        a.body,
    )
        .into_response()
}

async fn index() -> Response {
    respond(assets::INDEX)
}

async fn static_file(Path(path): Path<String>) -> Response {
    match assets::asset(&path) {
        Some(a) => respond(a),
        None => StatusCode::NOT_FOUND.into_response(),
    }
}

async fn config_json(State(page): State<Page>, headers: HeaderMap) -> Response {
    let Some(ws) = page.ws else {
        return axum::Json(serde_json::json!({ "ws_url": null })).into_response();
    };
    // a listener on all interfaces is reached by the name the browser used for this page
    let host = if ws.ip().is_unspecified() {
        headers
            .get(header::HOST)
            .and_then(|h| h.to_str().ok())
            .map(|h| match h.rsplit_once(':') {
                Some((name, port)) if port.chars().all(|c| c.is_ascii_digit()) => name.to_owned(),
                _ => h.to_owned(),
            })
            .unwrap_or_else(|| "127.0.0.1".into())
    } else {
        ws.ip().to_string()
    };
    let host = if host.contains(':') && !host.starts_with('[') {
        format!("[{host}]")
    } else {
        host
    };
    let url = format!("ws://{host}:{}/mqtt", ws.port());
    axum::Json(serde_json::json!({ "ws_url": url })).into_response()
}

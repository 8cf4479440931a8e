//! The chat page of `warren serve`: the page, its assets, and `/config.json`, which tells the
//! page where the MQTT-over-WebSocket listener is. warren-app serves this router on `[http] addr`.

use std::net::SocketAddr;

use warren::config::{Mode, Network};
use warren::node::BoundListener;
use warren_app::axum::extract::{Path, State};
use warren_app::axum::http::{HeaderMap, StatusCode, header};
use warren_app::axum::response::{IntoResponse, Response};
use warren_app::axum::routing::get;
use warren_app::axum::{self, Router};
use warren_chat::web::{self as assets, Asset};

#[derive(Clone)]
struct Page {
    /// The WebSocket listener the page should use: (address, path).
    ws: Option<SocketAddr>,
}

/// The page's routes, given the node's bound listeners.
pub fn router(listeners: &[BoundListener]) -> Router {
    let ws = listeners
        .iter()
        .filter_map(|l| Some((l, l.config.protocol.mqtt()?)))
        .filter(|(_, o)| o.network == Network::Ws)
        .max_by_key(|(_, o)| o.mode == Mode::Mqant)
        .map(|(l, _)| l)
        .map(|l| l.local_addr);
    Router::new()
        .route("/", get(index))
        .route("/index.html", get(index))
        .route("/mqant/index.html", get(index))
        .route("/config.json", get(config_json))
        .route("/static/{*path}", get(static_file))
        .with_state(Page { ws })
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

//! The admin HTTP API (`[admin]`; docs/admin-api.md): what an operator asks of a running
//! cluster, on an address of its own — never through a client listener or a broker topic, so no
//! client can reach it. Any node answers for the whole cluster: nodes, sessions (paged, by uid,
//! by id), kick, push, broadcast, rooms. It asks every node's gate over the bus through the `Gate`
//! module's `Admin…` handlers, as it already does for session operations (`cluster.rs`; those
//! handlers are not client-visible, and the bus is trusted like every node on it), and lists
//! the nodes that did not answer in time as `"unreachable"`. The plugins (docs/plugins.md,
//! "Hotfix over the admin API"), the log filter and the effective config (secrets redacted) are
//! this node's: those answers name the node (`"node"`); a replaced handler's answer also lists
//! the instances of the module type on other nodes, which were not patched (`"elsewhere"`), so
//! an operator knows which nodes' APIs to call next. One file per resource: `nodes.rs`,
//! `sessions.rs` (kick, push and broadcast too), `rooms.rs`, `plugins.rs`, `log.rs`,
//! `config.rs`.
//!
//! - **Who may call**: with `[admin] token` set, every request carries
//!   `Authorization: Bearer <token>` (401 otherwise). Without a token the API listens only on a
//!   loopback address: the config refuses anything else, and so does [`serve`].
//! - **Errors** are `{"error":{"code":"…","message":"…"}}` with the status that fits: 400 a body
//!   or query that is not what the endpoint takes, 401 no or a wrong token, 404 nothing by that
//!   name or id on any node that answered, 409 a module
//!   that is not a plugin (Rust) or runs only on other nodes, 413 a body over 64 KiB, 422 a plugin file or a handler body
//!   that does not load (the message names the file and line; what ran before keeps running),
//!   503 a plugin host that has stopped.
//! - **Every change** (a kick, a push, a broadcast, a log filter, a reload, a replaced handler,
//!   good or bad) is logged at info — warn when it failed — with who asked (the peer's address
//!   and whether a token was used) and what.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::SystemTime;

use anyhow::Context as _;
use axum::Json;
use axum::Router;
use axum::extract::{ConnectInfo, DefaultBodyLimit, Request, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post, put};
use serde_json::{Value, json};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use warren::config::Config;
use warren::node::NodeHandle;
use warren_plugin::{PluginError, PluginErrorKind};

use crate::logging::LogControl;
use crate::plugins::Plugins;

mod cluster;
mod config;
mod dashboard;
mod log;
mod nodes;
mod plugins;
mod rooms;
mod sessions;

pub(crate) use config::ConfigInForce;

/// The largest request body: a handler's source is a few lines.
pub(super) const MAX_BODY: usize = 64 * 1024;

/// What the handlers share.
#[derive(Clone)]
pub(super) struct AdminState {
    plugins: Arc<Plugins>,
    node: NodeHandle,
    /// The process's log filter, read and changed by `/admin/log`.
    log: LogControl,
    /// The bearer token requests must carry, when one is configured.
    token: Option<Arc<str>>,
    /// The node's configuration in force (`/admin/config`), updated by SIGHUP reloads.
    config: Arc<ConfigInForce>,
}

/// Who made a request, for the change log: set by [`authorize`].
#[derive(Debug, Clone, Copy)]
pub(super) struct Caller {
    peer: SocketAddr,
    /// Whether the request carried the (right) token; false on a token-less loopback API.
    token: bool,
}

/// Start the admin API when `[admin] addr` is set: bind it and serve until `stop`; `in_force`
/// is the config `/admin/config` shows. Returns the bound address and the server task, or
/// `None` when the API is off.
pub(crate) async fn serve(
    config: &Config,
    in_force: Arc<ConfigInForce>,
    plugins: Arc<Plugins>,
    node: NodeHandle,
    log: LogControl,
    stop: CancellationToken,
) -> anyhow::Result<Option<(SocketAddr, JoinHandle<()>)>> {
    let cfg = &config.admin;
    let Some(addr) = cfg.socket_addr() else {
        return Ok(None);
    };
    let addr = addr.map_err(|why| anyhow::anyhow!("admin.addr: {why}"))?;
    let token: Option<Arc<str>> = cfg
        .token
        .as_deref()
        .filter(|t| !t.is_empty())
        .map(Arc::from);
    if token.is_none() && !addr.ip().to_canonical().is_loopback() {
        anyhow::bail!(
            "admin.addr: the admin API on {addr} would be reachable from other hosts without a \
             token: set [admin] token (or bind 127.0.0.1)"
        );
    }
    let socket = tokio::net::TcpListener::bind(addr)
        .await
        .with_context(|| format!("cannot serve the admin API on {addr}"))?;
    let local = socket.local_addr()?;
    let has_token = token.is_some();
    let app = router(AdminState {
        plugins,
        node,
        log,
        token,
        config: in_force,
    });
    let task = tokio::spawn(async move {
        let r = axum::serve(
            socket,
            app.into_make_service_with_connect_info::<SocketAddr>(),
        )
        .with_graceful_shutdown(stop.cancelled_owned())
        .await;
        if let Err(e) = r {
            tracing::error!(error = %e, "admin API failed");
        }
    });
    tracing::info!(addr = %local, token = has_token, "admin API listening");
    Ok(Some((local, task)))
}

/// The API's routes, behind the token check.
fn router(state: AdminState) -> Router {
    Router::new()
        .route("/admin/log", get(log::get_log).put(log::set_log))
        .route("/admin/config", get(get_config))
        .route("/admin/nodes", get(nodes::list))
        .route("/admin/sessions", get(sessions::list))
        .route("/admin/sessions/{id}", get(sessions::get))
        .route("/admin/sessions/{id}/kick", post(sessions::kick_one))
        .route("/admin/sessions/{id}/push", post(sessions::push))
        .route("/admin/kick", post(sessions::kick_uid))
        .route("/admin/broadcast", post(sessions::broadcast_all))
        .route("/admin/rooms", get(rooms::list))
        .route("/admin/rooms/{room}", get(rooms::get))
        .route(
            "/admin/rooms/{room}/broadcast",
            post(sessions::broadcast_room),
        )
        .route("/admin/plugins", get(plugins::list_plugins))
        .route("/admin/plugins/{name}/reload", post(plugins::reload_plugin))
        .route(
            "/admin/modules/{module}/handlers/{handler}",
            put(plugins::replace_handler),
        )
        .fallback(|| async { AdminError::new(StatusCode::NOT_FOUND, "not_found", "no such path") })
        .method_not_allowed_fallback(|| async {
            AdminError::new(
                StatusCode::METHOD_NOT_ALLOWED,
                "method_not_allowed",
                "this path does not take that method",
            )
        })
        .layer(DefaultBodyLimit::max(MAX_BODY))
        .layer(middleware::from_fn_with_state(state.clone(), authorize))
        .with_state(state)
        // the dashboard page: code only, no data, so no token (admin/dashboard.rs)
        .merge(dashboard::routes())
        // /metrics, /healthz, /readyz: for probes and Prometheus, no token (metrics.rs)
        .merge(crate::metrics::health_routes())
}

/// `GET /admin/config`: this node's configuration in force, secrets redacted.
async fn get_config(State(s): State<AdminState>) -> Json<Value> {
    let mut answer = serde_json::Map::new();
    answer.insert("node".into(), s.node.id().into());
    answer.extend(s.config.shown());
    Json(Value::Object(answer))
}

/// Refuse a request without the configured token (before anything else, unknown paths
/// included), and note who asked.
async fn authorize(State(s): State<AdminState>, mut req: Request, next: Next) -> Response {
    let peer = req
        .extensions()
        .get::<ConnectInfo<SocketAddr>>()
        .map(|c| c.0)
        .unwrap_or_else(|| SocketAddr::from(([0, 0, 0, 0], 0)));
    let presented = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(bearer);
    let token = match (&s.token, presented) {
        (None, _) => false,
        (Some(want), Some(got)) if same(want.as_bytes(), got.as_bytes()) => true,
        (Some(_), got) => {
            let why = if got.is_some() {
                "the token is not this node's"
            } else {
                "this admin API needs `Authorization: Bearer <token>`"
            };
            tracing::warn!(peer = %peer, method = %req.method(), path = %req.uri().path(), reason = why, "admin: request refused");
            return AdminError::new(StatusCode::UNAUTHORIZED, "unauthorized", why).into_response();
        }
    };
    req.extensions_mut().insert(Caller { peer, token });
    next.run(req).await
}

/// The token of an `Authorization: Bearer <token>` header value.
fn bearer(value: &str) -> Option<&str> {
    let (scheme, token) = value.trim().split_once(' ')?;
    scheme
        .eq_ignore_ascii_case("bearer")
        .then(|| token.trim())
        .filter(|t| !t.is_empty())
}

/// Compare two tokens in time that does not depend on where they differ.
fn same(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// An error reply: `{"error":{"code":…,"message":…}}` and its status; a failed reload also says
/// which version still runs.
#[derive(Debug)]
pub(super) struct AdminError {
    status: StatusCode,
    code: &'static str,
    message: String,
    /// The line of the file (or of a handler's body) the error points at.
    line: Option<u32>,
    /// The version that keeps running after a failed reload.
    running: Option<u64>,
}

impl AdminError {
    fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> AdminError {
        AdminError {
            status,
            code,
            message: message.into(),
            line: None,
            running: None,
        }
    }

    /// A plugin's refusal: 404 for a handler it lacks, 503 when its host has stopped, 422 for
    /// everything the file or the body is to blame for.
    fn plugin(code: &'static str, e: &PluginError) -> AdminError {
        let (status, code) = match e.kind() {
            PluginErrorKind::NoHandler => (StatusCode::NOT_FOUND, code),
            PluginErrorKind::Stopped => (StatusCode::SERVICE_UNAVAILABLE, "stopped"),
            _ => (StatusCode::UNPROCESSABLE_ENTITY, code),
        };
        AdminError {
            line: e.line(),
            ..AdminError::new(status, code, e.to_string())
        }
    }

    fn running(self, version: u64) -> AdminError {
        AdminError {
            running: Some(version),
            ..self
        }
    }
}

impl IntoResponse for AdminError {
    fn into_response(self) -> Response {
        let mut error = json!({ "code": self.code, "message": self.message });
        if let Some(line) = self.line {
            error["line"] = json!(line);
        }
        let mut body = json!({ "error": error });
        if let Some(v) = self.running {
            body["version"] = json!(v);
        }
        let mut response = (self.status, Json(body)).into_response();
        if self.status == StatusCode::UNAUTHORIZED {
            response.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                HeaderValue::from_static("Bearer realm=\"warren admin\""),
            );
        }
        response
    }
}

/// A time as RFC 3339 in UTC, to the millisecond (`2026-01-02T03:04:05.678Z`).
pub(super) fn rfc3339(t: SystemTime) -> String {
    let since = t.duration_since(SystemTime::UNIX_EPOCH).unwrap_or_default();
    let secs = since.as_secs();
    let (days, rest) = (secs / 86_400, secs % 86_400);
    let (y, m, d) = civil_from_days(days);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}.{:03}Z",
        rest / 3600,
        rest % 3600 / 60,
        rest % 60,
        since.subsec_millis()
    )
}

/// The calendar date `days` after 1970-01-01 (Howard Hinnant's `civil_from_days`, for dates
/// after the epoch).
fn civil_from_days(days: u64) -> (u64, u64, u64) {
    let z = days + 719_468;
    let era = z / 146_097;
    let doe = z % 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + u64::from(m <= 2);
    (y, m, d)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn times_are_rfc3339_in_utc() {
        let at = |s: u64, ms: u64| {
            rfc3339(SystemTime::UNIX_EPOCH + Duration::from_secs(s) + Duration::from_millis(ms))
        };
        assert_eq!(at(0, 0), "1970-01-01T00:00:00.000Z");
        assert_eq!(at(951_782_400, 5), "2000-02-29T00:00:00.005Z");
        assert_eq!(at(1_767_323_045, 678), "2026-01-02T03:04:05.678Z");
    }

    #[test]
    fn the_bearer_token_is_read_and_compared_whole() {
        assert_eq!(bearer("Bearer s3cret"), Some("s3cret"));
        assert_eq!(bearer("bearer  s3cret "), Some("s3cret"));
        assert_eq!(bearer("Basic czNjcmV0"), None);
        assert_eq!(bearer("Bearer "), None);
        assert!(same(b"s3cret", b"s3cret"));
        assert!(!same(b"s3cret", b"s3cre"));
        assert!(!same(b"s3cret", b"s3creT"));
    }
}

//! `/admin/log`: read and change this node's log filter at run time (this node only).

use axum::extract::State;
use axum::http::StatusCode;
use axum::{Extension, Json};
use serde_json::{Value, json};

use super::{AdminError, AdminState, Caller};

/// `GET /admin/log`: the log filter in force on this node.
pub(super) async fn get_log(State(s): State<AdminState>) -> Json<Value> {
    Json(json!({ "node": s.node.id(), "filter": s.log.filter() }))
}

/// `PUT /admin/log` with `{"filter":"<RUST_LOG directives>"}`: change this node's log filter
/// now; a filter that does not parse is refused (400) and the old one stays.
pub(super) async fn set_log(
    State(s): State<AdminState>,
    Extension(caller): Extension<Caller>,
    body: Result<Json<Value>, axum::extract::rejection::JsonRejection>,
) -> Result<Json<Value>, AdminError> {
    let Json(body) =
        body.map_err(|r| AdminError::new(StatusCode::BAD_REQUEST, "bad_request", r.body_text()))?;
    let filter = body
        .get("filter")
        .and_then(Value::as_str)
        .ok_or_else(|| {
            AdminError::new(
                StatusCode::BAD_REQUEST,
                "bad_request",
                "the body is {\"filter\":\"<directives>\"}, e.g. {\"filter\":\"info,warren::gate=debug\"}",
            )
        })?;
    let before = s.log.filter();
    s.log.set_filter(filter).map_err(|why| {
        tracing::warn!(peer = %caller.peer, token = caller.token, filter = %filter, reason = %why, "admin: log filter not changed");
        AdminError::new(StatusCode::BAD_REQUEST, "bad_filter", why)
    })?;
    tracing::info!(peer = %caller.peer, token = caller.token, from = %before, filter = %filter, "admin: log filter changed");
    Ok(Json(
        json!({ "node": s.node.id(), "filter": filter, "previous": before }),
    ))
}

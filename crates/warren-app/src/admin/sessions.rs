//! `/admin/sessions…`, `/admin/kick` and `/admin/broadcast` (docs/admin-api.md): the sessions of
//! every node — listed with paging, found by uid or id — kicked, pushed to, broadcast to. Each
//! question goes to every gate node ([`super::cluster`]); each node acts on the sessions it holds.

use std::time::{Duration, SystemTime};

use axum::body::Bytes;
use axum::extract::rejection::{BytesRejection, QueryRejection};
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::{Extension, Json};
use base64::Engine as _;
use serde::Deserialize;
use serde::de::DeserializeOwned;
use serde_json::{Value, json};
use warren::node::admin::{
    self as gate, BroadcastRequest, KickRequest, PushRequest, Reached, SessionInfo, SessionPage,
    SessionQuery,
};

use super::cluster::{self, GateNode};
use super::{AdminError, AdminState, Caller, rfc3339};

/// The page size when the request names none.
const DEFAULT_LIMIT: usize = 100;
/// The largest page a request may ask for.
const MAX_LIMIT: usize = 1000;

/// A session as the API shows it (SESSION in docs/admin-api.md).
pub(super) fn session_json(s: &SessionInfo) -> Value {
    json!({
        "id": s.id,
        "node": s.node,
        "uid": s.uid,
        "protocol": s.protocol,
        "listener": s.listener,
        "peer": s.peer,
        "connected_at": rfc3339(SystemTime::UNIX_EPOCH + Duration::from_millis(s.connected_at_ms)),
        "settings": s.settings,
    })
}

/// The query of `GET /admin/sessions`.
#[derive(Debug, Deserialize)]
pub(super) struct ListParams {
    uid: Option<String>,
    node: Option<String>,
    offset: Option<usize>,
    limit: Option<usize>,
}

/// The slices of each node's sorted sessions that the page `offset..offset+limit` of all of them
/// (sorted by node, then id) covers, given each node's total: `(node index, offset in that
/// node, count)`, in order; nodes the page does not reach are left out.
pub(super) fn plan(totals: &[usize], offset: usize, limit: usize) -> Vec<(usize, usize, usize)> {
    let end = offset.saturating_add(limit);
    let mut start = 0usize;
    let mut out = Vec::new();
    for (i, &n) in totals.iter().enumerate() {
        let (lo, hi) = (offset.max(start), end.min(start + n));
        if lo < hi {
            out.push((i, lo - start, hi - lo));
        }
        start += n;
    }
    out
}

fn bad(message: impl Into<String>) -> AdminError {
    AdminError::new(StatusCode::BAD_REQUEST, "bad_request", message)
}

/// The gate nodes a request asks: all, or the one `node` names (404 when none by that id).
fn targets(s: &AdminState, node: Option<&str>) -> Result<Vec<GateNode>, AdminError> {
    let all = cluster::gate_nodes(&s.node);
    match node {
        None => Ok(all),
        Some(id) => {
            let one: Vec<GateNode> = all.into_iter().filter(|g| g.node == id).collect();
            if one.is_empty() {
                return Err(AdminError::new(
                    StatusCode::NOT_FOUND,
                    "no_such_node",
                    format!("no gate node {id:?} in the cluster (GET /admin/nodes lists them)"),
                ));
            }
            Ok(one)
        }
    }
}

/// `GET /admin/sessions?uid=U&node=N&offset=0&limit=100`: the sessions of every node (or of
/// one), sorted by (node, id), one page of them.
pub(super) async fn list(
    State(s): State<AdminState>,
    query: Result<Query<ListParams>, QueryRejection>,
) -> Result<Json<Value>, AdminError> {
    let Query(p) = query.map_err(|r| bad(r.body_text()))?;
    let offset = p.offset.unwrap_or(0);
    let limit = p.limit.unwrap_or(DEFAULT_LIMIT);
    if limit > MAX_LIMIT {
        return Err(bad(format!("limit is at most {MAX_LIMIT}")));
    }
    let uid = p.uid.filter(|u| !u.is_empty());
    let targets = targets(&s, p.node.as_deref())?;
    let first = SessionQuery {
        id: None,
        uid: uid.clone(),
        offset: 0,
        limit: offset.saturating_add(limit).min(gate::MAX_PAGE),
    };
    let answers = cluster::ask(&s.node, &targets, "AdminSessions", &first, |n| {
        gate::sessions(n, &first)
    })
    .await;
    let mut unreachable = answers.unreachable;
    let pages: Vec<(String, SessionPage)> = answers.ok;
    let totals: Vec<usize> = pages.iter().map(|(_, p)| p.total).collect();
    let mut sessions = Vec::new();
    for (i, lo, len) in plan(&totals, offset, limit) {
        let (id, page) = &pages[i];
        if lo + len <= page.sessions.len() {
            sessions.extend(page.sessions[lo..lo + len].iter().map(session_json));
            continue;
        }
        // deeper than the first answer went: ask that node for exactly its part
        let Some(target) = targets.iter().find(|t| &t.node == id) else {
            continue;
        };
        let exact = SessionQuery {
            id: None,
            uid: uid.clone(),
            offset: lo,
            limit: len,
        };
        let more = cluster::ask(
            &s.node,
            std::slice::from_ref(target),
            "AdminSessions",
            &exact,
            |n| gate::sessions(n, &exact),
        )
        .await;
        unreachable.extend(more.unreachable);
        for (_, page) in more.ok {
            sessions.extend(page.sessions.iter().map(session_json));
        }
    }
    Ok(Json(json!({
        "sessions": sessions,
        "total": totals.iter().sum::<usize>(),
        "offset": offset,
        "limit": limit,
        "unreachable": unreachable,
    })))
}

/// Find one session by id on every node: the node's answer, and who did not answer.
async fn find(s: &AdminState, id: &str) -> (Option<SessionInfo>, Vec<String>) {
    let q = SessionQuery {
        id: Some(id.to_owned()),
        uid: None,
        offset: 0,
        limit: 1,
    };
    let targets = cluster::gate_nodes(&s.node);
    let answers = cluster::ask(&s.node, &targets, "AdminSessions", &q, |n| {
        gate::sessions(n, &q)
    })
    .await;
    let found = answers
        .ok
        .into_iter()
        .find_map(|(_, mut p)| p.sessions.pop());
    (found, answers.unreachable)
}

/// 404 for a session no node holds, saying which nodes could not be asked.
fn no_session(id: &str, unreachable: &[String]) -> AdminError {
    let mut message = format!("no session {id:?} on any node");
    if !unreachable.is_empty() {
        message.push_str(&format!(
            " (not answering: {}; it may be there)",
            unreachable.join(", ")
        ));
    }
    AdminError::new(StatusCode::NOT_FOUND, "no_such_session", message)
}

/// `GET /admin/sessions/{id}`: one session, wherever it is.
pub(super) async fn get(
    State(s): State<AdminState>,
    Path(id): Path<String>,
) -> Result<Json<Value>, AdminError> {
    match find(&s, &id).await {
        (Some(info), _) => Ok(Json(session_json(&info))),
        (None, unreachable) => Err(no_session(&id, &unreachable)),
    }
}

/// A JSON body that may be left out (`{}` then), as `T`.
fn optional_body<T: DeserializeOwned + Default>(
    body: Result<Bytes, BytesRejection>,
) -> Result<T, AdminError> {
    let body = body.map_err(|r| {
        if r.status() == StatusCode::PAYLOAD_TOO_LARGE {
            AdminError::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                "too_large",
                format!("a body is at most {} bytes", super::MAX_BODY),
            )
        } else {
            bad(r.body_text())
        }
    })?;
    if body.iter().all(u8::is_ascii_whitespace) {
        return Ok(T::default());
    }
    serde_json::from_slice(&body)
        .map_err(|e| bad(format!("the body is not the JSON expected: {e}")))
}

/// The body of a kick.
#[derive(Debug, Default, Deserialize)]
pub(super) struct KickBody {
    #[serde(default)]
    reason: Option<String>,
}

/// The reason a kick gives when the request names none.
const DEFAULT_REASON: &str = "kicked by an operator";

/// The nodes that kicked something, and how many in all.
fn kicked(answers: &[(String, Reached)]) -> (usize, Vec<&str>) {
    let n = answers.iter().map(|(_, r)| r.sessions).sum();
    let nodes = answers
        .iter()
        .filter(|(_, r)| r.sessions > 0)
        .map(|(id, _)| id.as_str())
        .collect();
    (n, nodes)
}

/// `POST /admin/sessions/{id}/kick` with `{"reason":"…"}` (optional): close that session's
/// connection, wherever it is.
pub(super) async fn kick_one(
    State(s): State<AdminState>,
    Extension(caller): Extension<Caller>,
    Path(id): Path<String>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Json<Value>, AdminError> {
    let b: KickBody = optional_body(body)?;
    let reason = b.reason.unwrap_or_else(|| DEFAULT_REASON.to_owned());
    let k = KickRequest {
        id: Some(id.clone()),
        uid: None,
        reason: reason.clone(),
    };
    let targets = cluster::gate_nodes(&s.node);
    let answers = cluster::ask(&s.node, &targets, "AdminKick", &k, |n| gate::kick(n, &k)).await;
    let (n, nodes) = kicked(&answers.ok);
    if n == 0 {
        tracing::info!(peer = %caller.peer, token = caller.token, session = %id, reason = %reason, "admin: kick found no session");
        return Err(no_session(&id, &answers.unreachable));
    }
    tracing::info!(peer = %caller.peer, token = caller.token, session = %id, node = %nodes.join(","), reason = %reason, "admin: session kicked");
    Ok(Json(json!({ "kicked": n, "node": nodes.first() })))
}

/// The query of `POST /admin/kick`.
#[derive(Debug, Deserialize)]
pub(super) struct UidParam {
    uid: Option<String>,
}

/// `POST /admin/kick?uid=U` with `{"reason":"…"}` (optional): close every session of that uid,
/// on every node.
pub(super) async fn kick_uid(
    State(s): State<AdminState>,
    Extension(caller): Extension<Caller>,
    query: Result<Query<UidParam>, QueryRejection>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Json<Value>, AdminError> {
    let Query(p) = query.map_err(|r| bad(r.body_text()))?;
    let uid = p
        .uid
        .filter(|u| !u.is_empty())
        .ok_or_else(|| bad("name the user: POST /admin/kick?uid=<uid>"))?;
    let b: KickBody = optional_body(body)?;
    let reason = b.reason.unwrap_or_else(|| DEFAULT_REASON.to_owned());
    let k = KickRequest {
        id: None,
        uid: Some(uid.clone()),
        reason: reason.clone(),
    };
    let targets = cluster::gate_nodes(&s.node);
    let answers = cluster::ask(&s.node, &targets, "AdminKick", &k, |n| gate::kick(n, &k)).await;
    let (n, nodes) = kicked(&answers.ok);
    tracing::info!(peer = %caller.peer, token = caller.token, uid = %uid, kicked = n, nodes = %nodes.join(","), reason = %reason, "admin: uid kicked");
    Ok(Json(
        json!({ "kicked": n, "nodes": nodes, "unreachable": answers.unreachable }),
    ))
}

/// The body of a push or a broadcast: a topic and the body as text or base64.
#[derive(Debug, Default, Deserialize)]
pub(super) struct MessageBody {
    topic: Option<String>,
    body: Option<String>,
    body_base64: Option<String>,
}

impl MessageBody {
    /// The topic and the body bytes, or why not.
    fn parts(self) -> Result<(String, Vec<u8>), AdminError> {
        let topic = self.topic.filter(|t| !t.is_empty()).ok_or_else(|| {
            bad("the body is {\"topic\":\"…\",\"body\":\"…\"} (or \"body_base64\")")
        })?;
        let body = match (self.body, self.body_base64) {
            (Some(_), Some(_)) => return Err(bad("give \"body\" or \"body_base64\", not both")),
            (Some(text), None) => text.into_bytes(),
            (None, Some(b64)) => base64::engine::general_purpose::STANDARD
                .decode(b64.trim())
                .map_err(|e| bad(format!("body_base64 is not base64: {e}")))?,
            (None, None) => Vec::new(),
        };
        Ok((topic, body))
    }
}

/// `POST /admin/sessions/{id}/push` with `{"topic","body"}`: one message to that session's
/// client, wherever it is.
pub(super) async fn push(
    State(s): State<AdminState>,
    Extension(caller): Extension<Caller>,
    Path(id): Path<String>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Json<Value>, AdminError> {
    let (topic, body) = optional_body::<MessageBody>(body)?.parts()?;
    let bytes = body.len();
    let p = PushRequest {
        id: id.clone(),
        topic: topic.clone(),
        body,
    };
    let targets = cluster::gate_nodes(&s.node);
    let answers = cluster::ask(&s.node, &targets, "AdminPush", &p, |n| gate::push(n, &p)).await;
    let (n, nodes) = kicked(&answers.ok);
    if n == 0 {
        tracing::info!(peer = %caller.peer, token = caller.token, session = %id, topic = %topic, "admin: push found no session");
        return Err(no_session(&id, &answers.unreachable));
    }
    tracing::info!(peer = %caller.peer, token = caller.token, session = %id, node = %nodes.join(","), topic = %topic, bytes, "admin: pushed to a session");
    Ok(Json(json!({ "pushed": n, "node": nodes.first() })))
}

/// Broadcast to a room or to everyone, on every node.
async fn broadcast_to(
    s: &AdminState,
    caller: Caller,
    room: Option<String>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Json<Value>, AdminError> {
    let (topic, body) = optional_body::<MessageBody>(body)?.parts()?;
    let bytes = body.len();
    let b = BroadcastRequest {
        room: room.clone(),
        topic: topic.clone(),
        body,
    };
    let targets = cluster::gate_nodes(&s.node);
    let answers = cluster::ask(&s.node, &targets, "AdminBroadcast", &b, |n| {
        gate::broadcast(n, &b)
    })
    .await;
    let (n, _) = kicked(&answers.ok);
    tracing::info!(peer = %caller.peer, token = caller.token, room = room.as_deref().unwrap_or("*"), topic = %topic, bytes, sessions = n, unreachable = answers.unreachable.len(), "admin: broadcast");
    Ok(Json(
        json!({ "sessions": n, "unreachable": answers.unreachable }),
    ))
}

/// `POST /admin/broadcast` with `{"topic","body"}`: one message to every session of every node.
pub(super) async fn broadcast_all(
    State(s): State<AdminState>,
    Extension(caller): Extension<Caller>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Json<Value>, AdminError> {
    broadcast_to(&s, caller, None, body).await
}

/// `POST /admin/rooms/{room}/broadcast` with `{"topic","body"}`: one message to every member of
/// the room, on every node.
pub(super) async fn broadcast_room(
    State(s): State<AdminState>,
    Extension(caller): Extension<Caller>,
    Path(room): Path<String>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Json<Value>, AdminError> {
    broadcast_to(&s, caller, Some(room), body).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_page_takes_the_right_slice_of_each_node() {
        // nodes with 3, 0 and 5 sessions: 8 in all, in that order
        let totals = [3, 0, 5];
        assert_eq!(plan(&totals, 0, 100), vec![(0, 0, 3), (2, 0, 5)]);
        assert_eq!(plan(&totals, 2, 2), vec![(0, 2, 1), (2, 0, 1)]);
        assert_eq!(plan(&totals, 3, 2), vec![(2, 0, 2)]);
        assert_eq!(plan(&totals, 7, 10), vec![(2, 4, 1)]);
        assert_eq!(plan(&totals, 8, 10), vec![]);
        assert_eq!(plan(&totals, 0, 0), vec![]);
        assert_eq!(plan(&[], 0, 10), vec![]);
        assert_eq!(plan(&[2], usize::MAX, usize::MAX), vec![]);
    }

    #[test]
    fn a_message_body_is_text_or_base64() {
        let m = |v: Value| serde_json::from_value::<MessageBody>(v).map(MessageBody::parts);
        let (t, b) = m(json!({"topic": "Chat/OnMsg", "body": "hi"}))
            .unwrap()
            .unwrap();
        assert_eq!((t.as_str(), b.as_slice()), ("Chat/OnMsg", &b"hi"[..]));
        let (_, b) = m(json!({"topic": "t", "body_base64": "AAEC"}))
            .unwrap()
            .unwrap();
        assert_eq!(b, vec![0, 1, 2]);
        assert!(m(json!({"body": "hi"})).unwrap().is_err());
        assert!(
            m(json!({"topic": "t", "body": "a", "body_base64": "AA=="}))
                .unwrap()
                .is_err()
        );
        assert!(
            m(json!({"topic": "t", "body_base64": "!!"}))
                .unwrap()
                .is_err()
        );
    }
}

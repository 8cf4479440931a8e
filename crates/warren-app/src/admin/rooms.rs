//! `/admin/rooms` (docs/admin-api.md): the rooms (groups) of the cluster with their member
//! counts, and one room's members. A room lives at the gates of its members, so each gate node
//! is asked for its part and the parts are added up.

use std::collections::BTreeMap;

use axum::Json;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use serde_json::{Value, json};
use warren::node::admin::{self as gate, RoomsReply, RoomsRequest};

use super::cluster;
use super::{AdminError, AdminState};

/// Add up the rooms each node reported: one entry per name, sorted by name.
pub(super) fn merge(replies: &[(String, RoomsReply)]) -> Vec<Value> {
    let mut rooms: BTreeMap<&str, usize> = BTreeMap::new();
    for (_, r) in replies {
        for room in &r.rooms {
            *rooms.entry(room.name.as_str()).or_default() += room.members;
        }
    }
    rooms
        .into_iter()
        .map(|(name, members)| json!({ "name": name, "members": members }))
        .collect()
}

/// `GET /admin/rooms`: every room of every node, with its member count.
pub(super) async fn list(State(s): State<AdminState>) -> Json<Value> {
    let q = RoomsRequest { room: None };
    let targets = cluster::gate_nodes(&s.node);
    let answers = cluster::ask(&s.node, &targets, "AdminRooms", &q, |n| gate::rooms(n, &q)).await;
    Json(json!({ "rooms": merge(&answers.ok), "unreachable": answers.unreachable }))
}

/// `GET /admin/rooms/{room}`: the room's members on every node (404 when it has none).
pub(super) async fn get(
    State(s): State<AdminState>,
    Path(room): Path<String>,
) -> Result<Json<Value>, AdminError> {
    let q = RoomsRequest {
        room: Some(room.clone()),
    };
    let targets = cluster::gate_nodes(&s.node);
    let answers = cluster::ask(&s.node, &targets, "AdminRooms", &q, |n| gate::rooms(n, &q)).await;
    let members: Vec<Value> = answers
        .ok
        .iter()
        .flat_map(|(_, r)| r.members.iter())
        .map(|m| json!({ "session": m.session, "node": m.node, "uid": m.uid }))
        .collect();
    if members.is_empty() && answers.unreachable.is_empty() {
        return Err(AdminError::new(
            StatusCode::NOT_FOUND,
            "no_such_room",
            format!("no room {room:?} has a member on any node"),
        ));
    }
    Ok(Json(json!({
        "name": room,
        "members": members,
        "unreachable": answers.unreachable,
    })))
}

#[cfg(test)]
mod tests {
    use super::*;
    use warren::node::admin::RoomInfo;

    #[test]
    fn rooms_of_all_nodes_add_up_by_name() {
        let reply = |rooms: &[(&str, usize)]| RoomsReply {
            rooms: rooms
                .iter()
                .map(|(n, m)| RoomInfo {
                    name: (*n).to_owned(),
                    members: *m,
                })
                .collect(),
            members: Vec::new(),
        };
        let merged = merge(&[
            ("a".into(), reply(&[("lobby", 2), ("t1", 1)])),
            ("b".into(), reply(&[("lobby", 3)])),
        ]);
        assert_eq!(
            merged,
            vec![
                json!({"name": "lobby", "members": 5}),
                json!({"name": "t1", "members": 1})
            ]
        );
    }
}

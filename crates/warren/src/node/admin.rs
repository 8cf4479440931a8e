//! What an operator asks of one node's gate (docs/admin-api.md): list its sessions and rooms,
//! kick, push, broadcast. The admin API of any node answers for the whole cluster by asking
//! every node's `Gate` module (its `Admin…` handlers run these functions there) and asks its
//! own gate the same way, so each node acts only on the sessions it holds. The requests and
//! answers are plain serde types: they travel as JSON on the bus.

use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use super::NodeHandle;
use crate::config::protocol_name;
use crate::session::{Message, SessionHandle};

/// The most sessions one node lists in one answer, whatever the request asks: an answer is one
/// bus message, so it stays bounded.
pub const MAX_PAGE: usize = 2000;

/// `AdminInfo`: what the node says of itself beyond the registry's record.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct NodeInfo {
    /// The node's id.
    pub node: String,
    /// Live sessions on its gate.
    pub sessions: usize,
    /// The warren version it runs.
    pub version: String,
}

/// `AdminSessions`: which of the node's sessions to list, sorted by id.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct SessionQuery {
    /// Only this session.
    #[serde(default)]
    pub id: Option<String>,
    /// Only sessions bound to this user id.
    #[serde(default)]
    pub uid: Option<String>,
    /// How many of the matching sessions (sorted by id) to skip.
    #[serde(default)]
    pub offset: usize,
    /// How many to list at most (capped at [`MAX_PAGE`]).
    #[serde(default)]
    pub limit: usize,
}

/// One session as the admin API shows it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct SessionInfo {
    /// Session id.
    pub id: String,
    /// The node whose gate holds the connection.
    pub node: String,
    /// The bound user id, if any.
    pub uid: Option<String>,
    /// The client protocol, as a listener's `protocol` key names it.
    pub protocol: String,
    /// The listener's configured address, when known.
    pub listener: Option<String>,
    /// The client's address.
    pub peer: String,
    /// When the connection was accepted, unix milliseconds.
    pub connected_at_ms: u64,
    /// The session's settings.
    pub settings: Map<String, Value>,
}

/// The answer to a [`SessionQuery`]: how many matched in all, and the requested slice.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct SessionPage {
    /// Sessions matching the query's id and uid on this node.
    pub total: usize,
    /// The slice `offset..offset+limit` of them, sorted by id.
    pub sessions: Vec<SessionInfo>,
}

/// `AdminKick`: close one session (by id) or every session of a uid, saying why.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct KickRequest {
    /// The session to close.
    #[serde(default)]
    pub id: Option<String>,
    /// Close every session bound to this uid.
    #[serde(default)]
    pub uid: Option<String>,
    /// The reason, logged and sent where the protocol has a kick packet.
    #[serde(default)]
    pub reason: String,
}

/// `AdminPush`: one message to one session.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct PushRequest {
    /// The session.
    pub id: String,
    /// The topic (push route).
    pub topic: String,
    /// The body bytes.
    pub body: Vec<u8>,
}

/// `AdminBroadcast`: one message to every session of a room, or of the node.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct BroadcastRequest {
    /// The room (group); every session of the node when absent.
    #[serde(default)]
    pub room: Option<String>,
    /// The topic (push route).
    pub topic: String,
    /// The body bytes.
    pub body: Vec<u8>,
}

/// How many sessions an action reached on one node.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq)]
pub struct Reached {
    /// Sessions kicked, pushed to or broadcast to.
    pub sessions: usize,
}

/// `AdminRooms`: every room of the node with its member count, or one room's members.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct RoomsRequest {
    /// The room whose members to list; all rooms' counts when absent.
    #[serde(default)]
    pub room: Option<String>,
}

/// One room and how many of its members this node holds.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct RoomInfo {
    /// Room name.
    pub name: String,
    /// Members on this node.
    pub members: usize,
}

/// One member of a room.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct RoomMember {
    /// Its session id.
    pub session: String,
    /// The node holding it.
    pub node: String,
    /// Its user id, if bound.
    pub uid: Option<String>,
}

/// The answer to a [`RoomsRequest`].
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct RoomsReply {
    /// Every room of the node (when no room was named).
    pub rooms: Vec<RoomInfo>,
    /// The named room's members on this node.
    pub members: Vec<RoomMember>,
}

/// This node's [`NodeInfo`].
pub fn info(node: &NodeHandle) -> NodeInfo {
    NodeInfo {
        node: node.id().to_owned(),
        sessions: node.session_table().len(),
        version: env!("CARGO_PKG_VERSION").to_owned(),
    }
}

fn describe(node: &NodeHandle, h: &SessionHandle) -> SessionInfo {
    let s = h.snapshot();
    SessionInfo {
        id: s.id.to_string(),
        node: node.id().to_owned(),
        uid: s.uid.clone().filter(|u| !u.is_empty()),
        protocol: protocol_name(s.protocol).to_owned(),
        listener: h.listener().map(str::to_owned),
        peer: s.remote.to_string(),
        connected_at_ms: unix_ms(h.connected_at()),
        settings: s.settings.clone(),
    }
}

fn matching(
    node: &NodeHandle,
    id: Option<&str>,
    uid: Option<&str>,
) -> Vec<std::sync::Arc<SessionHandle>> {
    let table = node.session_table();
    match (id, uid) {
        (Some(id), _) => table
            .get(id)
            .ok()
            .filter(|h| uid.is_none_or(|u| h.snapshot().uid.as_deref() == Some(u)))
            .into_iter()
            .collect(),
        (None, Some(uid)) => table.by_uid(uid),
        (None, None) => table.all(),
    }
}

/// The node's sessions matching `q`, sorted by id, sliced by its offset and limit.
pub fn sessions(node: &NodeHandle, q: &SessionQuery) -> SessionPage {
    let mut all = matching(node, q.id.as_deref(), q.uid.as_deref());
    all.sort_unstable_by(|a, b| a.id().cmp(b.id()));
    SessionPage {
        total: all.len(),
        sessions: all
            .iter()
            .skip(q.offset)
            .take(q.limit.min(MAX_PAGE))
            .map(|h| describe(node, h))
            .collect(),
    }
}

/// Close the sessions `k` names that this node holds (a pomelo client gets a kick packet with
/// the reason first); each is logged at info.
pub fn kick(node: &NodeHandle, k: &KickRequest) -> Reached {
    if k.id.is_none() && k.uid.is_none() {
        return Reached::default();
    }
    let found = matching(node, k.id.as_deref(), k.uid.as_deref());
    for h in &found {
        let s = h.snapshot();
        tracing::info!(session = %s.id, uid = s.uid.as_deref().unwrap_or(""), peer = %s.remote, reason = %k.reason, "admin: session kicked");
        h.kick(&k.reason);
    }
    Reached {
        sessions: found.len(),
    }
}

/// Queue one message for a session this node holds (0 when it holds none by that id, or the
/// session is closing).
pub fn push(node: &NodeHandle, p: &PushRequest) -> Reached {
    let sent = node
        .session_table()
        .send(&p.id, &p.topic, bytes::Bytes::copy_from_slice(&p.body))
        .is_ok();
    Reached {
        sessions: usize::from(sent),
    }
}

/// Send one message to a room's members on this node, or to every session of it.
pub fn broadcast(node: &NodeHandle, b: &BroadcastRequest) -> Reached {
    let topic = bytes::Bytes::copy_from_slice(b.topic.as_bytes());
    let body = bytes::Bytes::copy_from_slice(&b.body);
    let sessions = match &b.room {
        Some(room) => node.groups().broadcast(room, topic, body, None),
        None => {
            let msg = Message::new(topic, body);
            node.session_table()
                .all()
                .iter()
                .filter(|h| !h.is_closed())
                .filter(|h| h.deliver(msg.clone(), None).is_ok())
                .count()
        }
    };
    Reached { sessions }
}

/// This node's rooms, or one room's members on it.
pub fn rooms(node: &NodeHandle, r: &RoomsRequest) -> RoomsReply {
    match &r.room {
        None => RoomsReply {
            rooms: node
                .groups()
                .list()
                .into_iter()
                .map(|(name, members)| RoomInfo {
                    name: name.to_string(),
                    members,
                })
                .collect(),
            members: Vec::new(),
        },
        Some(room) => RoomsReply {
            rooms: Vec::new(),
            members: node
                .groups()
                .members(room)
                .iter()
                .map(|id| RoomMember {
                    session: id.to_string(),
                    node: node.id().to_owned(),
                    uid: node
                        .session_table()
                        .get(id)
                        .ok()
                        .and_then(|h| h.snapshot().uid.clone()),
                })
                .collect(),
        },
    }
}

/// Unix milliseconds of `t` (0 before the epoch).
pub fn unix_ms(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

//! The `Chat` module (examples/chat/README.md): rooms of logged-in users, join, say (to all or to
//! one), and leave notices when a member's connection closes.
//!
//! Rooms are kept here (who joined, in join order, with which session) and mirrored as gate
//! groups, so a message to the whole room is encoded once and shared by every member's queue.
//!
//! In a cluster with several Chat instances, [`route_key`] sends every call about one room to
//! the same instance (the ring keyed by room name). Membership lives in the gates' groups, so
//! when that instance dies the room's next call lands on the next instance of the ring, which
//! rebuilds the room from the groups ([`ensure_room`]): members keep chatting without joining
//! again. What is lost is only the join order of the room's user list.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use serde_json::{Value, json};
use warren::{CallError, Context, Json, Module, Session};

use crate::Flavour;

/// The Chat module for a demo flavour.
pub fn module(flavour: Flavour) -> Module {
    let state = Chat {
        flavour,
        rooms: Mutex::new(HashMap::new()),
    };
    let (join, say) = match flavour {
        Flavour::V11 => ("HD_JoinChat", "HD_Say"),
        Flavour::V10 => ("Handler_JoinChat", "Handler_Say"),
    };
    Module::builder("Chat", state)
        .client_handler(join, join_chat)
        .client_handler(say, say_handler)
        .on_session_closed(session_closed)
        .build()
}

/// The custom router of the Chat module: calls naming a room are keyed by the room, so a room
/// lives on exactly one instance whatever the users' own keys.
pub fn route_key(_handler: &str, _session: Option<&Session>, body: &[u8]) -> Option<String> {
    let v: Value = serde_json::from_slice(body).ok()?;
    str_field(&v, "roomName")
        .filter(|r| !r.is_empty())
        .map(|r| format!("room:{r}"))
}

/// Rooms by name.
pub struct Chat {
    flavour: Flavour,
    rooms: Mutex<HashMap<String, Room>>,
}

#[derive(Default)]
struct Room {
    /// Members in join order.
    members: Vec<Member>,
}

#[derive(Clone)]
struct Member {
    uid: String,
    session: Arc<Session>,
}

type Cx = Context<Chat>;

fn group(room: &str) -> String {
    format!("chat/{room}")
}

impl Chat {
    fn rooms(&self) -> std::sync::MutexGuard<'_, HashMap<String, Room>> {
        self.rooms.lock().unwrap_or_else(|e| e.into_inner())
    }
}

fn str_field<'a>(v: &'a Value, k: &str) -> Option<&'a str> {
    v.get(k).and_then(Value::as_str)
}

fn logged_in(cx: &Cx) -> Result<(Arc<Session>, String), CallError> {
    let s = cx.session().ok_or(CallError::NoSession)?.clone();
    match s.uid.clone().filter(|u| !u.is_empty()) {
        Some(uid) => Ok((s, uid)),
        None => Err(CallError::app("Not Logined")),
    }
}

async fn join_chat(cx: Cx, Json(body): Json<Value>) -> Result<Value, CallError> {
    let flavour = cx.state().flavour;
    let room = str_field(&body, "roomName").unwrap_or_default().to_owned();
    if room.is_empty() {
        return match flavour {
            Flavour::V11 => Err(CallError::app("roomName cannot be nil")),
            Flavour::V10 => Ok(json!("roomName cannot be nil")),
        };
    }
    let (session, uid) = logged_in(&cx)?;
    // the original demo calls another module here to show inter-module RPC
    match cx.call_json::<Value>("Login", "getRand", &room).await {
        Ok(v) => tracing::debug!(reply = %v, "Login/getRand answered"),
        Err(e) => tracing::debug!(error = %e, "Login/getRand failed"),
    }
    let node = cx.node();
    ensure_room(&cx, &room).await;
    let (users, replaced) = {
        let mut rooms = cx.state().rooms();
        let r = rooms.entry(room.clone()).or_default();
        let existing = r.members.iter().position(|m| m.uid == uid);
        if flavour == Flavour::V10 && existing.is_some() {
            return Err(CallError::app("Already in this chat room"));
        }
        let replaced = match existing {
            Some(i) => Some(std::mem::replace(
                &mut r.members[i].session,
                session.clone(),
            )),
            None => {
                r.members.push(Member {
                    uid: uid.clone(),
                    session: session.clone(),
                });
                None
            }
        };
        let users: Vec<String> = r.members.iter().map(|m| m.uid.clone()).collect();
        (users, replaced)
    };
    if let Some(old) = replaced
        && old.id != session.id
    {
        let _ = node.group_remove(&group(&room), &old).await;
    }
    node.group_add(&group(&room), &session).await?;
    match flavour {
        Flavour::V11 => {
            let push = json!({"roomName": room, "user": uid}).to_string();
            node.group_broadcast(&group(&room), "Chat/OnJoin", push, Some(&session.id))
                .await;
            Ok(json!({ "users": users }))
        }
        Flavour::V10 => {
            let push = json!({"roomName": room, "userName": uid}).to_string();
            node.group_broadcast(&group(&room), "Chat/OnJoin", push, None)
                .await;
            Ok(json!("join success"))
        }
    }
}

async fn say_handler(cx: Cx, Json(body): Json<Value>) -> Result<Value, CallError> {
    match cx.state().flavour {
        Flavour::V11 => say_v11(cx, body).await,
        Flavour::V10 => say_v10(cx, body).await,
    }
}

async fn say_v11(cx: Cx, body: Value) -> Result<Value, CallError> {
    let (Some(room), Some(content)) = (str_field(&body, "roomName"), str_field(&body, "content"))
    else {
        return Err(CallError::app("roomName or say cannot be nil"));
    };
    let target = str_field(&body, "target").unwrap_or("*");
    let (session, uid) = logged_in(&cx)?;
    ensure_room(&cx, room).await;
    let recipient = {
        let rooms = cx.state().rooms();
        let r = rooms.get(room).ok_or_else(|| CallError::app("No room"))?;
        if !r.members.iter().any(|m| m.uid == uid) {
            return Err(CallError::app("You haven't been in the room yet"));
        }
        if target == "*" {
            None
        } else {
            let m = r.members.iter().find(|m| m.uid == target);
            Some(
                m.cloned()
                    .ok_or_else(|| CallError::app("This user haven't been in the room yet"))?,
            )
        }
    };
    let push = json!({"from": uid, "msg": content, "roomName": room, "target": target}).to_string();
    let node = cx.node();
    match recipient {
        None => {
            node.group_broadcast(&group(room), "Chat/OnChat", push, None)
                .await;
        }
        Some(m) => {
            if node
                .sessions()
                .send(&m.session, "Chat/OnChat", push.into())
                .await
                .is_err()
            {
                leave(&cx, room, &m.session).await;
                return Err(CallError::app("The user has left the room"));
            }
        }
    }
    let _ = session;
    Ok(json!("say success"))
}

async fn say_v10(cx: Cx, body: Value) -> Result<Value, CallError> {
    let (Some(room), Some(say)) = (str_field(&body, "roomName"), str_field(&body, "say")) else {
        return Ok(json!("roomName or say cannot be nil"));
    };
    let (_session, uid) = logged_in(&cx)?;
    ensure_room(&cx, room).await;
    {
        let rooms = cx.state().rooms();
        let r = rooms.get(room).ok_or_else(|| CallError::app("No room"))?;
        if !r.members.iter().any(|m| m.uid == uid) {
            return Err(CallError::app("You haven't been in the room yet"));
        }
    }
    let push = json!({"roomName": room, "say": say, "userName": uid}).to_string();
    cx.node()
        .group_broadcast(&group(room), "Chat/OnSay", push, None)
        .await;
    Ok(json!("say success"))
}

/// Remove the member holding `session` from `room` and tell the others (v1.1).
async fn leave(cx: &Cx, room: &str, session: &Session) {
    let left = {
        let mut rooms = cx.state().rooms();
        let Some(r) = rooms.get_mut(room) else { return };
        let Some(i) = r.members.iter().position(|m| m.session.id == session.id) else {
            return;
        };
        let m = r.members.remove(i);
        if r.members.is_empty() {
            rooms.remove(room);
        }
        m
    };
    let _ = cx.node().group_remove(&group(room), session).await;
    if cx.state().flavour == Flavour::V11 {
        let push = json!({"roomName": room, "user": left.uid}).to_string();
        cx.node()
            .group_broadcast(&group(room), "Chat/OnLeave", push, None)
            .await;
    }
}

async fn session_closed(cx: Cx, _body: ()) -> Result<(), CallError> {
    let Some(s) = cx.session().cloned() else {
        return Ok(());
    };
    let rooms: Vec<String> = cx
        .state()
        .rooms()
        .iter()
        .filter(|(_, r)| r.members.iter().any(|m| m.session.id == s.id))
        .map(|(name, _)| name.clone())
        .collect();
    for room in rooms {
        leave(&cx, &room, &s).await;
    }
    Ok(())
}

/// Make sure this instance knows `room`: a room it has never seen may have lived on an instance
/// that died, in which case its members are still in the gates' group; take them over.
async fn ensure_room(cx: &Cx, room: &str) {
    if cx.state().rooms().contains_key(room) {
        return;
    }
    let members = cx.node().group_members(&group(room)).await;
    if members.is_empty() {
        return;
    }
    let mut rooms = cx.state().rooms();
    let r = rooms.entry(room.to_owned()).or_default();
    for s in members {
        if let Some(uid) = s.uid.clone().filter(|u| !u.is_empty())
            && !r.members.iter().any(|m| m.uid == uid)
        {
            tracing::info!(%room, user = %uid, "room taken over: member restored from the gate group");
            r.members.push(Member { uid, session: s });
        }
    }
}

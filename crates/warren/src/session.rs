//! Sessions: what the gate knows about one client connection, and the table of live ones.
//!
//! A connection task owns its socket; everything else reaches the client through the session's
//! [`SessionHandle`]: a bounded outbound queue (pushes, replies) and a cancellation token (close).
//! Handlers receive a [`Session`] *snapshot*; session operations (PROTOCOLS.md §1.8) go to the
//! [`SessionTable`] of the gate that owns the connection.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, OnceLock, RwLock};

use arc_swap::ArcSwap;
use bytes::Bytes;
use serde_json::{Map, Value};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::error::CallError;

/// A session id: a random UUIDv4, lowercase with dashes, shared cheaply.
pub type SessionId = Arc<str>;

/// The transport a client connected over.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Transport {
    /// Plain TCP.
    Tcp,
    /// WebSocket.
    Ws,
}

/// The client protocol a session speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    /// MQTT 3.1 / 3.1.1.
    Mqtt,
    /// The pomelo client protocol.
    Pomelo,
    /// JSON over WebSocket.
    Json,
    /// The line protocol.
    Line,
    /// A pomelo-rpc peer (a server calling modules).
    #[serde(rename = "pomelo-rpc")]
    PomeloRpc,
}

/// A snapshot of one session, as handlers see it.
#[derive(Debug, Clone, PartialEq)]
pub struct Session {
    /// Session id.
    pub id: SessionId,
    /// User id, set by `bind`.
    pub uid: Option<String>,
    /// Free-form settings, `{}` at connect.
    pub settings: Map<String, Value>,
    /// Remote address of the connection.
    pub remote: SocketAddr,
    /// Transport of the connection.
    pub transport: Transport,
    /// Client protocol of the connection.
    pub protocol: Protocol,
    /// Id of the gate instance that owns the connection (mqant `Serverid`).
    pub gate: Arc<str>,
}

impl Session {
    /// The mqant session export map (PROTOCOLS.md §1.7): the first argument of every mqant RPC.
    /// Keys with empty values are omitted; keys come out in alphabetical order.
    pub fn export_map(&self) -> Value {
        let mut m = Map::new();
        m.insert("IP".into(), Value::String(self.remote.to_string()));
        // upstream reports the socket kind, which is TCP under WebSocket too
        m.insert("Network".into(), Value::String("tcp".into()));
        m.insert("Serverid".into(), Value::String(self.gate.to_string()));
        m.insert("Sessionid".into(), Value::String(self.id.to_string()));
        m.insert("Settings".into(), Value::Object(self.settings.clone()));
        if let Some(uid) = self.uid.as_deref().filter(|u| !u.is_empty()) {
            m.insert("Userid".into(), Value::String(uid.to_owned()));
        }
        Value::Object(m)
    }

    /// Read a session back from an export map (the form session operations return).
    pub fn from_export_map(v: &Value, transport: Transport) -> Option<Session> {
        let o = v.as_object()?;
        let s = |k: &str| o.get(k).and_then(Value::as_str);
        Some(Session {
            id: s("Sessionid")?.into(),
            uid: s("Userid").map(str::to_owned),
            settings: o
                .get("Settings")
                .and_then(Value::as_object)
                .cloned()
                .unwrap_or_default(),
            remote: s("IP")?.parse().ok()?,
            transport,
            protocol: Protocol::Mqtt,
            gate: s("Serverid")?.into(),
        })
    }

    /// The key the router hashes on: the uid once bound, the session id before.
    pub fn hash_key(&self) -> &str {
        self.uid.as_deref().unwrap_or(&self.id)
    }
}

/// One message for a client: a topic (route) and a body. Built once and shared by every recipient
/// of a broadcast; each protocol's encoding of it is also built once, by the first connection of
/// that protocol that writes it, and then shared (a room with members on four protocols costs four
/// encodings, not one per member).
#[derive(Debug)]
pub struct Message {
    /// Topic the message is published on (a push route, or the request topic for a reply).
    pub topic: Bytes,
    /// Body bytes, unchanged.
    pub body: Bytes,
    frames: [OnceLock<Bytes>; FrameKind::COUNT],
}

/// The protocol encodings a [`Message`] caches.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FrameKind {
    /// A complete MQTT QoS 0 PUBLISH (QoS 1 needs a per-connection packet id).
    MqttQos0 = 0,
    /// A pomelo push package.
    Pomelo = 1,
    /// A JSON-over-WebSocket frame.
    Json = 2,
    /// A line-protocol frame.
    Line = 3,
}

impl FrameKind {
    const COUNT: usize = 4;
}

impl Message {
    /// A shared message.
    pub fn new(topic: impl Into<Bytes>, body: impl Into<Bytes>) -> Arc<Message> {
        Arc::new(Message {
            topic: topic.into(),
            body: body.into(),
            frames: Default::default(),
        })
    }

    /// This message's encoding for one protocol, built on first use.
    pub fn frame(&self, kind: FrameKind, build: impl FnOnce(&Message) -> Bytes) -> &Bytes {
        self.frames[kind as usize].get_or_init(|| build(self))
    }

    /// The complete MQTT QoS 0 PUBLISH for this message.
    pub fn mqtt_qos0(&self) -> &Bytes {
        self.frame(FrameKind::MqttQos0, |m| {
            let mut b = bytes::BytesMut::with_capacity(m.topic.len() + m.body.len() + 7);
            warren_proto::mqtt::encode_publish(
                &mut b,
                &m.topic,
                warren_proto::mqtt::QoS::AtMostOnce,
                false,
                false,
                0,
                &m.body,
            );
            b.freeze()
        })
    }
}

/// Protocol bytes small enough to travel inside a queue slot without an allocation (acks, pings).
#[derive(Debug, Clone, Copy)]
pub struct InlineFrame {
    len: u8,
    buf: [u8; 14],
}

impl InlineFrame {
    /// Wrap up to 14 bytes; longer input is truncated (callers only pass fixed-size control packets).
    pub fn new(bytes: &[u8]) -> Self {
        let len = bytes.len().min(14);
        let mut buf = [0u8; 14];
        buf[..len].copy_from_slice(&bytes[..len]);
        InlineFrame {
            len: len as u8,
            buf,
        }
    }

    /// The wrapped bytes.
    pub fn as_bytes(&self) -> &[u8] {
        &self.buf[..self.len as usize]
    }
}

/// An item on a session's outbound queue. The connection's writer frames each one in its protocol
/// and coalesces everything queued into one socket write.
#[derive(Debug)]
pub enum Outbound {
    /// A push or reply; `qos` caps the delivery QoS (plain MQTT subscriptions), `None` means the
    /// listener's push QoS.
    Message {
        /// The shared message.
        msg: Arc<Message>,
        /// Delivery QoS cap, if any.
        qos: Option<u8>,
    },
    /// Pre-encoded small protocol bytes.
    Inline(InlineFrame),
    /// Pre-encoded protocol bytes (boxed, so that every queue slot stays 16 bytes).
    Bytes(Box<Bytes>),
    /// Flush what is queued, then close the connection.
    Close,
    /// Flush, then close with this WebSocket close code (plain close on TCP).
    CloseCode(u16),
}

/// What the gate holds for one live session: its current snapshot, its outbound queue and the
/// token that closes it.
#[derive(Debug)]
pub struct SessionHandle {
    id: SessionId,
    snapshot: ArcSwap<Session>,
    outbound: mpsc::Sender<Outbound>,
    close: CancellationToken,
    /// Subscriptions and groups this session is in, so closing it can clean up.
    memberships: std::sync::Mutex<Vec<Arc<str>>>,
}

impl SessionHandle {
    /// A handle for a new connection.
    pub fn new(
        session: Session,
        outbound: mpsc::Sender<Outbound>,
        close: CancellationToken,
    ) -> Arc<Self> {
        Arc::new(SessionHandle {
            id: session.id.clone(),
            snapshot: ArcSwap::from_pointee(session),
            outbound,
            close,
            memberships: std::sync::Mutex::new(Vec::new()),
        })
    }

    /// The current snapshot.
    pub fn snapshot(&self) -> Arc<Session> {
        self.snapshot.load_full()
    }

    /// Session id.
    pub fn id(&self) -> &SessionId {
        &self.id
    }

    /// Replace the snapshot with an edited copy.
    pub fn update(&self, f: impl FnOnce(&mut Session)) -> Arc<Session> {
        let mut s = Session::clone(&self.snapshot.load());
        f(&mut s);
        let s = Arc::new(s);
        self.snapshot.store(s.clone());
        s
    }

    /// Queue a message without waiting. A full queue means the client is not reading fast enough:
    /// the session is closed (slow-consumer policy) and the message is refused.
    pub fn deliver(&self, msg: Arc<Message>, qos: Option<u8>) -> Result<(), CallError> {
        match self.outbound.try_send(Outbound::Message { msg, qos }) {
            Ok(()) => Ok(()),
            Err(mpsc::error::TrySendError::Full(_)) => {
                if !self.close.is_cancelled() {
                    let s = self.snapshot.load();
                    tracing::warn!(session = %s.id, peer = %s.remote, reason = "slow consumer: outbound queue full", "closing connection");
                    metrics::counter!("warren_slow_consumer_disconnects_total").increment(1);
                    self.close.cancel();
                }
                Err(CallError::ConnectionClosed)
            }
            Err(mpsc::error::TrySendError::Closed(_)) => Err(CallError::ConnectionClosed),
        }
    }

    /// Ask the connection to flush and close.
    pub fn close(&self) {
        if self.outbound.try_send(Outbound::Close).is_err() {
            self.close.cancel();
        }
    }

    /// Whether the connection is gone or closing.
    pub fn is_closed(&self) -> bool {
        self.close.is_cancelled() || self.outbound.is_closed()
    }

    /// Record a group or subscription this session joined.
    pub(crate) fn joined(&self, name: Arc<str>) {
        if let Ok(mut m) = self.memberships.lock()
            && !m.contains(&name)
        {
            m.push(name);
        }
    }

    /// Forget a group this session left.
    pub(crate) fn left(&self, name: &str) {
        if let Ok(mut m) = self.memberships.lock() {
            m.retain(|g| &**g != name);
        }
    }

    /// Take the list of groups this session is in (on close).
    pub(crate) fn take_memberships(&self) -> Vec<Arc<str>> {
        self.memberships
            .lock()
            .map(|mut m| std::mem::take(&mut *m))
            .unwrap_or_default()
    }
}

/// The live sessions of one gate, by id and by uid. Session operations from any handler land here.
#[derive(Debug)]
pub struct SessionTable {
    gate: Arc<str>,
    inner: RwLock<Tables>,
}

#[derive(Debug, Default)]
struct Tables {
    by_id: HashMap<SessionId, Arc<SessionHandle>>,
    by_uid: HashMap<String, Vec<SessionId>>,
}

impl SessionTable {
    /// An empty table for the gate with this id.
    pub fn new(gate: Arc<str>) -> Self {
        SessionTable {
            gate,
            inner: RwLock::new(Tables::default()),
        }
    }

    /// Id of the gate owning this table (mqant `Serverid`).
    pub fn gate_id(&self) -> &Arc<str> {
        &self.gate
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, Tables> {
        self.inner.read().unwrap_or_else(|e| e.into_inner())
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, Tables> {
        self.inner.write().unwrap_or_else(|e| e.into_inner())
    }

    /// Add a new session.
    pub fn insert(&self, handle: Arc<SessionHandle>) {
        let s = handle.snapshot();
        let mut t = self.write();
        if let Some(uid) = &s.uid {
            t.by_uid.entry(uid.clone()).or_default().push(s.id.clone());
        }
        t.by_id.insert(s.id.clone(), handle);
        metrics::gauge!("warren_sessions_active").set(t.by_id.len() as f64);
    }

    /// Remove a closed session.
    pub fn remove(&self, id: &str) -> Option<Arc<SessionHandle>> {
        let mut t = self.write();
        let h = t.by_id.remove(id)?;
        if let Some(uid) = &h.snapshot().uid {
            unindex(&mut t.by_uid, uid, id);
        }
        metrics::gauge!("warren_sessions_active").set(t.by_id.len() as f64);
        Some(h)
    }

    /// The handle of a live session.
    pub fn get(&self, id: &str) -> Result<Arc<SessionHandle>, CallError> {
        self.read()
            .by_id
            .get(id)
            .cloned()
            .ok_or(CallError::NoSession)
    }

    /// Number of live sessions.
    pub fn len(&self) -> usize {
        self.read().by_id.len()
    }

    /// Whether no session is live.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// All live sessions bound to a uid (a user may be connected more than once).
    pub fn by_uid(&self, uid: &str) -> Vec<Arc<SessionHandle>> {
        let t = self.read();
        t.by_uid
            .get(uid)
            .map(|ids| {
                ids.iter()
                    .filter_map(|id| t.by_id.get(id).cloned())
                    .collect()
            })
            .unwrap_or_default()
    }

    /// Every live session handle (for drain).
    pub fn all(&self) -> Vec<Arc<SessionHandle>> {
        self.read().by_id.values().cloned().collect()
    }

    /// `Bind(Sessionid, Userid)`.
    pub fn bind(&self, id: &str, uid: &str) -> Result<Arc<Session>, CallError> {
        let mut t = self.write();
        let h = t.by_id.get(id).cloned().ok_or(CallError::NoSession)?;
        let old = h.snapshot().uid.clone();
        let s = h.update(|s| s.uid = Some(uid.to_owned()));
        if let Some(old) = old {
            unindex(&mut t.by_uid, &old, id);
        }
        t.by_uid
            .entry(uid.to_owned())
            .or_default()
            .push(s.id.clone());
        Ok(s)
    }

    /// `UnBind(Sessionid)`.
    pub fn unbind(&self, id: &str) -> Result<Arc<Session>, CallError> {
        let mut t = self.write();
        let h = t.by_id.get(id).cloned().ok_or(CallError::NoSession)?;
        if let Some(old) = h.snapshot().uid.clone() {
            unindex(&mut t.by_uid, &old, id);
        }
        Ok(h.update(|s| s.uid = None))
    }

    /// `Set(Sessionid, key, value)`.
    pub fn set(&self, id: &str, key: &str, value: Value) -> Result<Arc<Session>, CallError> {
        let h = self.get(id)?;
        Ok(h.update(|s| {
            s.settings.insert(key.to_owned(), value);
        }))
    }

    /// `Remove(Sessionid, key)`.
    pub fn remove_setting(&self, id: &str, key: &str) -> Result<Arc<Session>, CallError> {
        let h = self.get(id)?;
        Ok(h.update(|s| {
            s.settings.remove(key);
        }))
    }

    /// `Push(Sessionid, Settings)`: replace the settings entirely.
    pub fn push_settings(
        &self,
        id: &str,
        settings: Map<String, Value>,
    ) -> Result<Arc<Session>, CallError> {
        let h = self.get(id)?;
        Ok(h.update(|s| s.settings = settings))
    }

    /// `Update(Sessionid)`: the current snapshot.
    pub fn update(&self, id: &str) -> Result<Arc<Session>, CallError> {
        Ok(self.get(id)?.snapshot())
    }

    /// `Send(Sessionid, topic, body)`.
    pub fn send(&self, id: &str, topic: &str, body: Bytes) -> Result<(), CallError> {
        let h = self.get(id)?;
        if h.is_closed() {
            return Err(CallError::ConnectionClosed);
        }
        h.deliver(
            Message::new(Bytes::copy_from_slice(topic.as_bytes()), body),
            None,
        )
    }

    /// `Close(Sessionid)`.
    pub fn close(&self, id: &str) -> Result<(), CallError> {
        self.get(id)?.close();
        Ok(())
    }
}

fn unindex(by_uid: &mut HashMap<String, Vec<SessionId>>, uid: &str, id: &str) {
    if let Some(ids) = by_uid.get_mut(uid) {
        ids.retain(|s| &**s != id);
        if ids.is_empty() {
            by_uid.remove(uid);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn session(id: &str) -> Session {
        Session {
            id: id.into(),
            uid: None,
            settings: Map::new(),
            remote: "127.0.0.1:53422".parse().unwrap(),
            transport: Transport::Tcp,
            protocol: Protocol::Mqtt,
            gate: "Gate001".into(),
        }
    }

    #[test]
    fn export_map_has_the_mqant_shape() {
        let s = session("8f3c0b6e-1d2a-4c3b-9e8f-0a1b2c3d4e5f");
        assert_eq!(
            serde_json::to_string(&s.export_map()).unwrap(),
            r#"{"IP":"127.0.0.1:53422","Network":"tcp","Serverid":"Gate001","Sessionid":"8f3c0b6e-1d2a-4c3b-9e8f-0a1b2c3d4e5f","Settings":{}}"#
        );
        let back = Session::from_export_map(&s.export_map(), Transport::Tcp).unwrap();
        assert_eq!(back, s);
    }

    #[tokio::test]
    async fn operations_edit_the_live_session_and_the_uid_index() {
        let t = SessionTable::new("Gate001".into());
        let (tx, mut rx) = mpsc::channel(4);
        t.insert(SessionHandle::new(
            session("s1"),
            tx,
            CancellationToken::new(),
        ));
        assert_eq!(t.bind("s1", "alice").unwrap().uid.as_deref(), Some("alice"));
        assert_eq!(t.by_uid("alice").len(), 1);
        t.set("s1", "login", Value::Bool(true)).unwrap();
        assert_eq!(t.update("s1").unwrap().settings["login"], Value::Bool(true));
        t.remove_setting("s1", "login").unwrap();
        assert!(t.update("s1").unwrap().settings.is_empty());
        t.unbind("s1").unwrap();
        assert!(t.by_uid("alice").is_empty());
        t.send("s1", "a/b", Bytes::from_static(b"x")).unwrap();
        assert!(matches!(rx.recv().await, Some(Outbound::Message { .. })));
        assert_eq!(t.bind("nope", "x").unwrap_err(), CallError::NoSession);
        t.remove("s1");
        assert_eq!(t.update("s1").unwrap_err().to_string(), "No Sesssion found");
    }
}

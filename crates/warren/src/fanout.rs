//! Fan-out: one message to many sessions. Rooms ([`Groups`]) and plain MQTT subscriptions
//! ([`Subscriptions`]) share the same mechanism: the message is built once as an
//! `Arc<Message>` and every recipient's queue receives a pointer to it; each connection only frames
//! the shared bytes. No per-recipient lock, allocation or encode.

use std::collections::HashMap;
use std::sync::{Arc, RwLock};

use bytes::Bytes;
use warren_proto::mqtt::topic;

use crate::session::{Message, SessionHandle, SessionId};

fn read<T>(l: &RwLock<T>) -> std::sync::RwLockReadGuard<'_, T> {
    l.read().unwrap_or_else(|e| e.into_inner())
}

fn write<T>(l: &RwLock<T>) -> std::sync::RwLockWriteGuard<'_, T> {
    l.write().unwrap_or_else(|e| e.into_inner())
}

/// Named groups of sessions (chat rooms, game tables): add, remove, broadcast.
#[derive(Debug, Default)]
pub struct Groups {
    groups: RwLock<HashMap<Arc<str>, Arc<Group>>>,
}

#[derive(Debug, Default)]
struct Group {
    members: RwLock<Vec<Arc<SessionHandle>>>,
}

impl Groups {
    /// Add a session to a group (created on first member). Adding twice is a no-op.
    pub fn add(&self, name: &str, session: &Arc<SessionHandle>) {
        let group = {
            let mut g = write(&self.groups);
            match g.get(name) {
                Some(group) => group.clone(),
                None => {
                    let group = Arc::new(Group::default());
                    g.insert(name.into(), group.clone());
                    group
                }
            }
        };
        let id = session.id().clone();
        let mut members = write(&group.members);
        if !members.iter().any(|m| *m.id() == id) {
            members.push(session.clone());
            session.joined(name.into());
        }
    }

    /// Remove a session from a group; an emptied group is dropped.
    pub fn remove(&self, name: &str, session: &str) {
        let mut g = write(&self.groups);
        let Some(group) = g.get(name).cloned() else {
            return;
        };
        let mut members = write(&group.members);
        if let Some(pos) = members.iter().position(|m| &**m.id() == session) {
            let h = members.swap_remove(pos);
            h.left(name);
        }
        if members.is_empty() {
            g.remove(name);
        }
    }

    /// Remove a closing session from every group it is in.
    pub fn remove_everywhere(&self, session: &SessionHandle) {
        let id = session.id().clone();
        for name in session.take_memberships() {
            self.remove(&name, &id);
        }
    }

    /// Session ids in a group, in join order (after removals, order is not kept).
    pub fn members(&self, name: &str) -> Vec<SessionId> {
        let group = read(&self.groups).get(name).cloned();
        group
            .map(|g| read(&g.members).iter().map(|m| m.id().clone()).collect())
            .unwrap_or_default()
    }

    /// Send one message to every member; returns how many queues accepted it. Members that cannot
    /// keep up are closed by their own slow-consumer policy; the others are unaffected.
    pub fn broadcast(
        &self,
        name: &str,
        topic: impl Into<Bytes>,
        body: impl Into<Bytes>,
        except: Option<&str>,
    ) -> usize {
        let Some(group) = read(&self.groups).get(name).cloned() else {
            return 0;
        };
        let msg = Message::new(topic, body);
        let members = read(&group.members);
        let mut n = 0;
        for m in members.iter() {
            if except.is_some_and(|e| **m.id() == *e) {
                continue;
            }
            if m.deliver(msg.clone(), None).is_ok() {
                n += 1;
            }
        }
        metrics::counter!("warren_fanout_deliveries_total").increment(n as u64);
        n
    }
}

/// Plain MQTT subscriptions of the sessions on one node: a trie over topic levels with `+` and `#`.
#[derive(Debug, Default)]
pub struct Subscriptions {
    root: RwLock<Level>,
}

#[derive(Debug, Default)]
struct Level {
    children: HashMap<Box<str>, Level>,
    plus: Option<Box<Level>>,
    /// Subscribers whose filter ends with `#` at this level.
    hash: Vec<Sub>,
    /// Subscribers whose filter ends exactly at this level.
    here: Vec<Sub>,
}

#[derive(Debug, Clone)]
struct Sub {
    session: Arc<SessionHandle>,
    id: SessionId,
    qos: u8,
}

impl Level {
    fn is_empty(&self) -> bool {
        self.children.is_empty()
            && self.plus.is_none()
            && self.hash.is_empty()
            && self.here.is_empty()
    }
}

fn upsert(subs: &mut Vec<Sub>, sub: Sub) {
    match subs.iter_mut().find(|s| s.id == sub.id) {
        Some(s) => s.qos = sub.qos,
        None => subs.push(sub),
    }
}

impl Subscriptions {
    /// Subscribe a session to a (valid) filter with a granted QoS; re-subscribing replaces the QoS.
    pub fn subscribe(&self, filter: &str, session: &Arc<SessionHandle>, qos: u8) {
        let sub = Sub {
            session: session.clone(),
            id: session.id().clone(),
            qos,
        };
        let mut root = write(&self.root);
        let mut node: &mut Level = &mut root;
        let mut levels = filter.split('/').peekable();
        while let Some(level) = levels.next() {
            match level {
                "#" => {
                    upsert(&mut node.hash, sub);
                    return;
                }
                "+" => node = node.plus.get_or_insert_with(Default::default),
                l => node = node.children.entry(l.into()).or_default(),
            }
            if levels.peek().is_none() {
                upsert(&mut node.here, sub);
                return;
            }
        }
    }

    /// Remove one subscription of a session.
    pub fn unsubscribe(&self, filter: &str, session: &str) {
        let mut root = write(&self.root);
        let levels: Vec<&str> = filter.split('/').collect();
        remove_at(&mut root, &levels, session);
    }

    /// Deliver a message to every session with a matching filter, at most once per session, with
    /// QoS = min(publish QoS, highest granted QoS among its matching filters). Returns the count.
    pub fn publish(&self, topic_name: &str, qos: u8, topic: Bytes, body: Bytes) -> usize {
        let mut hits: Vec<(Arc<SessionHandle>, u8)> = Vec::new();
        let sources = {
            let root = read(&self.root);
            let levels: Vec<&str> = topic_name.split('/').collect();
            let dollar = topic_name.starts_with('$');
            collect(&root, &levels, dollar, &mut hits)
        };
        if hits.is_empty() {
            return 0;
        }
        // each subscriber list holds a session once, so duplicates exist only when several
        // filters matched: only then sort (by handle address, not by id) and keep the best QoS
        if sources > 1 {
            hits.sort_unstable_by(|a, b| {
                (Arc::as_ptr(&a.0) as usize)
                    .cmp(&(Arc::as_ptr(&b.0) as usize))
                    .then(b.1.cmp(&a.1))
            });
            hits.dedup_by(|a, b| Arc::ptr_eq(&a.0, &b.0));
        }
        let msg = Message::new(topic, body);
        let mut n = 0;
        for (s, granted) in hits {
            if s.deliver(msg.clone(), Some(qos.min(granted))).is_ok() {
                n += 1;
            }
        }
        metrics::counter!("warren_fanout_deliveries_total").increment(n as u64);
        n
    }
}

fn remove_at(node: &mut Level, levels: &[&str], session: &str) -> bool {
    match levels.split_first() {
        None => node.here.retain(|s| &*s.id != session),
        Some((&"#", _)) => node.hash.retain(|s| &*s.id != session),
        Some((&"+", rest)) => {
            if let Some(p) = node.plus.as_mut()
                && remove_at(p, rest, session)
            {
                node.plus = None;
            }
        }
        Some((l, rest)) => {
            if let Some(c) = node.children.get_mut(*l)
                && remove_at(c, rest, session)
            {
                node.children.remove(*l);
            }
        }
    }
    node.is_empty()
}

/// Gather the subscribers matching `levels`; returns how many subscriber lists contributed.
fn collect(
    node: &Level,
    levels: &[&str],
    dollar_first: bool,
    out: &mut Vec<(Arc<SessionHandle>, u8)>,
) -> usize {
    fn take(subs: &[Sub], out: &mut Vec<(Arc<SessionHandle>, u8)>) -> usize {
        out.extend(subs.iter().map(|s| (s.session.clone(), s.qos)));
        usize::from(!subs.is_empty())
    }
    // a wildcard in the first level never matches a topic starting with '$'
    let wild_ok = !dollar_first;
    let mut sources = 0;
    if wild_ok {
        sources += take(&node.hash, out);
    }
    match levels.split_first() {
        None => sources += take(&node.here, out),
        Some((l, rest)) => {
            if let Some(c) = node.children.get(*l) {
                sources += collect(c, rest, false, out);
            }
            if wild_ok && let Some(p) = node.plus.as_ref() {
                sources += collect(p, rest, false, out);
            }
        }
    }
    sources
}

/// Whether a subscription filter is acceptable (shared with the MQTT gate).
pub fn valid_filter(f: &str) -> bool {
    topic::valid_filter(f)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::session::{Outbound, Protocol, Session, Transport};
    use tokio::sync::mpsc;
    use tokio_util::sync::CancellationToken;

    fn handle(id: &str) -> (Arc<SessionHandle>, mpsc::Receiver<Outbound>) {
        let (tx, rx) = mpsc::channel(8);
        let s = Session {
            id: id.into(),
            uid: None,
            settings: Default::default(),
            remote: "127.0.0.1:1".parse().unwrap(),
            transport: Transport::Tcp,
            protocol: Protocol::Mqtt,
            gate: "g".into(),
        };
        (SessionHandle::new(s, tx, CancellationToken::new()), rx)
    }

    fn got(rx: &mut mpsc::Receiver<Outbound>) -> Vec<(String, Option<u8>)> {
        let mut v = vec![];
        while let Ok(o) = rx.try_recv() {
            if let Outbound::Message { msg, qos } = o {
                v.push((String::from_utf8_lossy(&msg.topic).into_owned(), qos));
            }
        }
        v
    }

    #[test]
    fn filters_match_like_mqtt() {
        let subs = Subscriptions::default();
        let (a, mut ra) = handle("a");
        let (b, mut rb) = handle("b");
        subs.subscribe("sensors/+/temp", &a, 1);
        subs.subscribe("sensors/#", &a, 0);
        subs.subscribe("#", &b, 1);
        let n = subs.publish(
            "sensors/1/temp",
            1,
            Bytes::from_static(b"sensors/1/temp"),
            Bytes::new(),
        );
        assert_eq!(n, 2);
        assert_eq!(got(&mut ra), vec![("sensors/1/temp".into(), Some(1))]);
        assert_eq!(got(&mut rb), vec![("sensors/1/temp".into(), Some(1))]);
        subs.publish("sensors", 1, Bytes::from_static(b"sensors"), Bytes::new());
        assert_eq!(got(&mut ra), vec![("sensors".into(), Some(0))]);
        assert_eq!(got(&mut rb), vec![("sensors".into(), Some(1))]);
        subs.publish("$SYS/x", 0, Bytes::from_static(b"$SYS/x"), Bytes::new());
        assert!(got(&mut rb).is_empty());
        subs.unsubscribe("#", "b");
        subs.publish("x", 0, Bytes::from_static(b"x"), Bytes::new());
        assert!(got(&mut rb).is_empty());
    }

    #[test]
    fn groups_broadcast_once_to_each_member() {
        let g = Groups::default();
        let (a, mut ra) = handle("a");
        let (b, mut rb) = handle("b");
        g.add("room", &a);
        g.add("room", &a);
        g.add("room", &b);
        assert_eq!(g.members("room").len(), 2);
        assert_eq!(g.broadcast("room", "Chat/OnChat", "{}", None), 2);
        assert_eq!(got(&mut ra).len(), 1);
        assert_eq!(got(&mut rb).len(), 1);
        g.remove_everywhere(&a);
        assert_eq!(g.members("room").len(), 1);
        g.remove("room", "b");
        assert_eq!(g.broadcast("room", "t", "b", None), 0);
    }
}

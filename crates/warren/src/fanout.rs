//! Fan-out: one message to many sessions. Rooms ([`Groups`]) and plain MQTT subscriptions
//! ([`Subscriptions`]) share the same mechanism: the message is built once as an
//! `Arc<Message>` and every recipient's queue receives a pointer to it; each connection only frames
//! the shared bytes. No per-recipient lock, allocation or encode.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
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
///
/// Every walk over the trie (subscribe, unsubscribe, publish, drop) is a loop with an explicit
/// stack, never a recursion per level, so a client cannot overflow a worker's stack with a deep
/// filter or topic whatever the configured limits are. The number of subscriptions is counted so
/// the gate can cap it node-wide (`[limits] max_subscriptions`).
#[derive(Debug, Default)]
pub struct Subscriptions {
    root: RwLock<Level>,
    /// (filter, session) pairs in the trie; changed only under the write lock.
    count: AtomicUsize,
}

/// The node already holds `[limits] max_subscriptions` subscriptions: a new one is refused
/// (re-subscribing to a filter a session holds is still allowed).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("the node holds its maximum of {max} subscriptions")]
pub struct SubscriptionsFull {
    /// The cap that was reached.
    pub max: usize,
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

    /// Whether this level must stay for reasons other than its child on one path: it has
    /// subscribers or more than one child.
    fn needed_besides_one_child(&self) -> bool {
        !self.here.is_empty()
            || !self.hash.is_empty()
            || self.children.len() + usize::from(self.plus.is_some()) > 1
    }

    fn child(&self, level: &str) -> Option<&Level> {
        if level == "+" {
            self.plus.as_deref()
        } else {
            self.children.get(level)
        }
    }

    fn child_mut(&mut self, level: &str) -> Option<&mut Level> {
        if level == "+" {
            self.plus.as_deref_mut()
        } else {
            self.children.get_mut(level)
        }
    }
}

/// Dropping a level drops its descendants one by one from a heap stack: the default drop glue
/// would recurse once per level.
impl Drop for Level {
    fn drop(&mut self) {
        if self.children.is_empty() && self.plus.is_none() {
            return;
        }
        let mut stack: Vec<Level> = self.children.drain().map(|(_, l)| l).collect();
        stack.extend(self.plus.take().map(|p| *p));
        while let Some(mut l) = stack.pop() {
            stack.extend(l.children.drain().map(|(_, c)| c));
            stack.extend(l.plus.take().map(|p| *p));
            // `l` now has no children: dropping it here does not recurse
        }
    }
}

/// Insert or update a session's entry; returns whether it is new.
fn upsert(subs: &mut Vec<Sub>, sub: Sub) -> bool {
    match subs.iter_mut().find(|s| s.id == sub.id) {
        Some(s) => {
            s.qos = sub.qos;
            false
        }
        None => {
            subs.push(sub);
            true
        }
    }
}

/// The levels of a filter that are edges of the trie (up to a `#`), and whether it ends in `#`.
fn edges(filter: &str) -> (impl Iterator<Item = &str>, bool) {
    let hash = filter == "#" || filter.ends_with("/#");
    let body = if hash {
        &filter[..filter.len().saturating_sub(2)]
    } else {
        filter
    };
    let empty = hash && filter == "#";
    (
        body.split('/').take(if empty { 0 } else { usize::MAX }),
        hash,
    )
}

impl Subscriptions {
    /// Subscribe a session to a (valid) filter with a granted QoS; re-subscribing replaces the QoS.
    /// Returns whether the subscription is new. Not capped: see [`Self::subscribe_within`].
    pub fn subscribe(&self, filter: &str, session: &Arc<SessionHandle>, qos: u8) -> bool {
        let mut root = write(&self.root);
        self.insert(&mut root, filter, session, qos)
    }

    /// As [`Self::subscribe`], refusing a new subscription when the node already holds `max`.
    pub fn subscribe_within(
        &self,
        filter: &str,
        session: &Arc<SessionHandle>,
        qos: u8,
        max: usize,
    ) -> Result<bool, SubscriptionsFull> {
        let mut root = write(&self.root);
        if self.count.load(Ordering::Relaxed) >= max && !holds(&root, filter, session.id()) {
            return Err(SubscriptionsFull { max });
        }
        Ok(self.insert(&mut root, filter, session, qos))
    }

    fn insert(
        &self,
        root: &mut Level,
        filter: &str,
        session: &Arc<SessionHandle>,
        qos: u8,
    ) -> bool {
        let sub = Sub {
            session: session.clone(),
            id: session.id().clone(),
            qos,
        };
        let (levels, hash) = edges(filter);
        let mut node = root;
        for level in levels {
            node = match level {
                "+" => node.plus.get_or_insert_with(Default::default),
                l => node.children.entry(l.into()).or_default(),
            };
        }
        let subs = if hash { &mut node.hash } else { &mut node.here };
        let new = upsert(subs, sub);
        if new {
            self.count.fetch_add(1, Ordering::Relaxed);
        }
        new
    }

    /// Remove one subscription of a session; returns whether it existed. Levels left without
    /// subscribers or children are freed.
    pub fn unsubscribe(&self, filter: &str, session: &str) -> bool {
        let mut root = write(&self.root);
        // 1. Walk to the filter's level, remembering the deepest level on the way that stays
        //    whatever happens below it: the chain after it is freed if the last level empties.
        let mut node: &mut Level = &mut root;
        let mut cut = 0;
        let mut depth = 0;
        let (levels, hash) = edges(filter);
        for level in levels {
            if node.needed_besides_one_child() {
                cut = depth;
            }
            node = match node.child_mut(level) {
                Some(c) => c,
                None => return false,
            };
            depth += 1;
        }
        let subs = if hash { &mut node.hash } else { &mut node.here };
        let before = subs.len();
        subs.retain(|s| &*s.id != session);
        let removed = subs.len() < before;
        if removed {
            self.count.fetch_sub(1, Ordering::Relaxed);
        }
        if depth == 0 || !node.is_empty() {
            return removed;
        }
        // 2. Free the emptied chain: cut the edge below level `cut`.
        let mut node: &mut Level = &mut root;
        let (levels, _) = edges(filter);
        for (i, level) in levels.enumerate() {
            if i == cut {
                if level == "+" {
                    node.plus = None;
                } else {
                    node.children.remove(level);
                }
                break;
            }
            node = match node.child_mut(level) {
                Some(c) => c,
                None => break,
            };
        }
        removed
    }

    /// Subscriptions on this node, all sessions together.
    pub fn len(&self) -> usize {
        self.count.load(Ordering::Relaxed)
    }

    /// Whether no session subscribes to anything.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Deliver a message to every session with a matching filter, at most once per session, with
    /// QoS = min(publish QoS, highest granted QoS among its matching filters). Returns the count.
    pub fn publish(&self, topic_name: &str, qos: u8, topic: Bytes, body: Bytes) -> usize {
        let mut hits: Vec<(Arc<SessionHandle>, u8)> = Vec::new();
        let sources = {
            let root = read(&self.root);
            collect(&root, topic_name, &mut hits)
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

/// Whether `session` holds exactly `filter`.
fn holds(root: &Level, filter: &str, session: &str) -> bool {
    let (levels, hash) = edges(filter);
    let mut node = root;
    for level in levels {
        match node.child(level) {
            Some(c) => node = c,
            None => return false,
        }
    }
    let subs = if hash { &node.hash } else { &node.here };
    subs.iter().any(|s| &*s.id == session)
}

/// Gather the subscribers matching `topic`; returns how many subscriber lists contributed.
///
/// The walk follows the topic's literal level in a loop and keeps only the `+` branches it has
/// yet to visit on a stack, so a topic that meets no `+` subscription allocates nothing here.
fn collect(root: &Level, topic: &str, out: &mut Vec<(Arc<SessionHandle>, u8)>) -> usize {
    fn take(subs: &[Sub], out: &mut Vec<(Arc<SessionHandle>, u8)>) -> usize {
        out.extend(subs.iter().map(|s| (s.session.clone(), s.qos)));
        usize::from(!subs.is_empty())
    }
    let dollar = topic.starts_with('$');
    let mut sources = 0;
    // (level, byte offset of the topic's next level or None past the last one, first level)
    let mut pending: Vec<(&Level, Option<usize>, bool)> = Vec::new();
    let mut current = Some((root, Some(0), true));
    while let Some((node, at, first)) = current.take().or_else(|| pending.pop()) {
        // a wildcard in the first level never matches a topic starting with '$'
        let wild_ok = !(first && dollar);
        if wild_ok {
            sources += take(&node.hash, out);
        }
        let Some(start) = at else {
            sources += take(&node.here, out);
            continue;
        };
        let rest = &topic[start..];
        let (level, next) = match rest.find('/') {
            Some(i) => (&rest[..i], Some(start + i + 1)),
            None => (rest, None),
        };
        if wild_ok && let Some(p) = node.plus.as_deref() {
            pending.push((p, next, false));
        }
        if let Some(c) = node.children.get(level) {
            current = Some((c, next, false));
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
    fn deep_filters_and_topics_do_not_recurse() {
        const DEPTH: usize = 200_000;
        let subs = Subscriptions::default();
        let (a, mut ra) = handle("a");
        let (b, mut rb) = handle("b");
        let empty_levels = "/".repeat(DEPTH - 1);
        let plus_levels = vec!["+"; DEPTH].join("/");
        let topic = vec!["x"; DEPTH].join("/");
        assert!(subs.subscribe(&empty_levels, &a, 0));
        assert!(subs.subscribe(&plus_levels, &b, 1));
        assert!(subs.subscribe(&format!("{empty_levels}/#"), &a, 0));
        assert_eq!(subs.len(), 3);
        let n = subs.publish(&empty_levels, 1, Bytes::from_static(b"deep"), Bytes::new());
        assert_eq!(n, 2);
        assert_eq!(got(&mut ra), vec![("deep".into(), Some(0))]);
        assert_eq!(got(&mut rb), vec![("deep".into(), Some(1))]);
        assert_eq!(
            subs.publish(&topic, 1, Bytes::from_static(b"x"), Bytes::new()),
            1
        );
        assert_eq!(got(&mut rb).len(), 1);
        // a topic deeper than every filter matches nothing and still does not recurse
        let deeper = "/".repeat(3 * DEPTH);
        assert_eq!(subs.publish(&deeper, 0, Bytes::new(), Bytes::new()), 1);
        assert!(subs.unsubscribe(&empty_levels, "a"));
        assert!(!subs.unsubscribe(&empty_levels, "a"));
        assert!(subs.unsubscribe(&plus_levels, "b"));
        assert_eq!(subs.len(), 1);
        assert!(subs.unsubscribe(&format!("{empty_levels}/#"), "a"));
        assert_eq!(subs.len(), 0);
        assert!(read(&subs.root).is_empty());
        // dropping a deep trie without unsubscribing does not recurse either
        subs.subscribe(&plus_levels, &b, 0);
        subs.subscribe(&empty_levels, &a, 0);
        drop(subs);
    }

    #[test]
    fn unsubscribing_frees_only_the_emptied_chain() {
        let subs = Subscriptions::default();
        let (a, _ra) = handle("a");
        let (b, mut rb) = handle("b");
        subs.subscribe("a/b/c/d", &a, 0);
        subs.subscribe("a/b", &b, 0);
        subs.subscribe("a/+/x", &b, 0);
        subs.subscribe("#", &a, 0);
        assert!(subs.unsubscribe("a/b/c/d", "a"));
        {
            let root = read(&subs.root);
            let ab = root
                .child("a")
                .and_then(|l| l.child("b"))
                .expect("a/b stays");
            assert!(ab.children.is_empty(), "the c/d chain is freed");
            assert!(root.child("a").and_then(|l| l.child("+")).is_some());
        }
        assert_eq!(
            subs.publish("a/b", 0, Bytes::from_static(b"a/b"), Bytes::new()),
            2
        );
        assert_eq!(got(&mut rb).len(), 1);
        assert!(subs.unsubscribe("a/b", "b"));
        assert!(subs.unsubscribe("a/+/x", "b"));
        assert!(!subs.unsubscribe("a/+/x", "b"));
        assert!(!subs.unsubscribe("never/there", "b"));
        assert!(subs.unsubscribe("#", "a"));
        assert!(read(&subs.root).is_empty());
        assert!(subs.is_empty());
    }

    #[test]
    fn the_node_cap_refuses_new_subscriptions_only() {
        let subs = Subscriptions::default();
        let (a, _ra) = handle("a");
        let (b, _rb) = handle("b");
        assert_eq!(subs.subscribe_within("t/1", &a, 0, 2), Ok(true));
        assert_eq!(subs.subscribe_within("t/1", &b, 0, 2), Ok(true));
        assert_eq!(
            subs.subscribe_within("t/2", &a, 0, 2),
            Err(SubscriptionsFull { max: 2 })
        );
        // re-subscribing (a new QoS) is not a new subscription
        assert_eq!(subs.subscribe_within("t/1", &a, 1, 2), Ok(false));
        subs.unsubscribe("t/1", "b");
        assert_eq!(subs.subscribe_within("t/2", &a, 0, 2), Ok(true));
        assert_eq!(subs.len(), 2);
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

//! Fan-out: one message to many sessions. Rooms ([`Groups`]) and plain MQTT subscriptions
//! ([`Subscriptions`]) share the same mechanism: the message is built once as an
//! `Arc<Message>` and every recipient's queue receives a pointer to it; each connection only frames
//! the shared bytes. No per-recipient lock, allocation or encode.

use parking_lot::RwLock;
use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use bytes::Bytes;
use warren_proto::mqtt::topic;

use crate::error::CallError;
use crate::mqtt_session::{MqttState, Store};
use crate::session::{Message, SessionHandle, SessionId};

fn read<T>(l: &RwLock<T>) -> parking_lot::RwLockReadGuard<'_, T> {
    l.read()
}

fn write<T>(l: &RwLock<T>) -> parking_lot::RwLockWriteGuard<'_, T> {
    l.write()
}

/// Named groups of sessions (chat rooms, game tables): add, remove, broadcast.
#[derive(Debug)]
pub struct Groups {
    groups: RwLock<HashMap<Arc<str>, Arc<Group>>>,
    /// Most groups one session may be in (`[limits] max_groups_per_session`): group names often
    /// come from clients (a room to join), so each session's share of the table is bounded.
    max_per_session: usize,
}

impl Default for Groups {
    fn default() -> Self {
        Groups::with_limit(crate::config::LimitsConfig::default().max_groups_per_session)
    }
}

#[derive(Debug, Default)]
struct Group {
    members: RwLock<Vec<Arc<SessionHandle>>>,
}

impl Groups {
    /// Add a session to a group (created on first member). Adding twice is a no-op.
    pub fn add(&self, name: &str, session: &Arc<SessionHandle>) -> Result<(), CallError> {
        let mut g = write(&self.groups);
        // membership is checked on the session's own bounded list, not by scanning the group
        if !session.join(name, self.max_per_session)? {
            return Ok(());
        }
        let group = match g.get(name) {
            Some(group) => group.clone(),
            None => {
                let group = Arc::new(Group::default());
                g.insert(name.into(), group.clone());
                group
            }
        };
        write(&group.members).push(session.clone());
        Ok(())
    }

    /// Groups whose sessions may each be in at most `max_per_session` groups.
    pub fn with_limit(max_per_session: usize) -> Self {
        Groups {
            groups: RwLock::new(HashMap::new()),
            max_per_session,
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

    /// Every group's name and member count, sorted by name (the admin API's room list).
    pub fn list(&self) -> Vec<(Arc<str>, usize)> {
        let mut out: Vec<(Arc<str>, usize)> = read(&self.groups)
            .iter()
            .map(|(name, g)| (name.clone(), read(&g.members).len()))
            .collect();
        out.sort_unstable_by(|a, b| a.0.cmp(&b.0));
        out
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
        crate::message_path::MESSAGE_PATH
            .fanout_deliveries
            .increment(n as u64);
        n
    }
}

/// Plain MQTT subscriptions of the sessions on one node: a trie over topic levels with `+` and `#`.
///
/// Every walk over the trie (subscribe, unsubscribe, publish, drop) is a loop with an explicit
/// stack, never a recursion per level, so a client cannot overflow a worker's stack with a deep
/// filter or topic whatever the configured limits are. The subscriptions and the levels of the
/// trie (its nodes, which are what its memory is made of) are counted so the gate can cap both
/// node-wide (`[limits] max_subscriptions`, `max_subscription_levels`).
#[derive(Debug, Default)]
pub struct Subscriptions {
    root: RwLock<Level>,
    /// The persistent MQTT sessions whose subscriptions are in the trie (`clean_session = 0`),
    /// by client id: they own subscriptions while no connection is attached.
    sessions: Store,
    /// (filter, session) pairs in the trie; changed only under the write lock.
    count: AtomicUsize,
    /// Levels (nodes) of the trie below the root; changed only under the write lock.
    levels: AtomicUsize,
}

/// A new subscription was refused because the node is at one of its caps (re-subscribing to a
/// filter a session holds is still allowed).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum SubscriptionsFull {
    /// `[limits] max_subscriptions` subscriptions are held.
    #[error("the node holds its maximum of {max} subscriptions")]
    Subscriptions {
        /// The cap that was reached.
        max: usize,
    },
    /// The filter would take the trie past `[limits] max_subscription_levels` levels.
    #[error(
        "the filter needs {needed} new levels; the node's subscriptions hold {held} of at most {max}"
    )]
    Levels {
        /// Levels the filter would add.
        needed: usize,
        /// Levels held now.
        held: usize,
        /// The cap.
        max: usize,
    },
}

impl SubscriptionsFull {
    /// The refusal kind for logs and metrics: the name of the `[limits]` key.
    pub fn kind(&self) -> &'static str {
        match self {
            SubscriptionsFull::Subscriptions { .. } => "max_subscriptions",
            SubscriptionsFull::Levels { .. } => "max_subscription_levels",
        }
    }
}

/// Literal children of a level: a vector sized to its entries while there are few (most levels
/// have one child: a chain of unique levels then costs about its entries, not a hash table per
/// level), a hash map past [`FEW_CHILDREN`].
#[derive(Debug)]
enum Children {
    Few(Vec<(Box<str>, Level)>),
    // boxed: every level holds a `Children`, and most never need the map's 48 bytes inline
    #[expect(clippy::box_collection, reason = "keeps every level of the trie small")]
    Many(Box<HashMap<Box<str>, Level>>),
}

/// Children kept in a vector (searched linearly) before they move to a hash map.
const FEW_CHILDREN: usize = 8;

impl Default for Children {
    fn default() -> Self {
        Children::Few(Vec::new())
    }
}

impl Children {
    fn len(&self) -> usize {
        match self {
            Children::Few(v) => v.len(),
            Children::Many(m) => m.len(),
        }
    }

    fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn get(&self, key: &str) -> Option<&Level> {
        match self {
            Children::Few(v) => v.iter().find(|(k, _)| &**k == key).map(|(_, l)| l),
            Children::Many(m) => m.get(key),
        }
    }

    fn get_mut(&mut self, key: &str) -> Option<&mut Level> {
        match self {
            Children::Few(v) => v.iter_mut().find(|(k, _)| &**k == key).map(|(_, l)| l),
            Children::Many(m) => m.get_mut(key),
        }
    }

    /// The child `key`, created if missing; and whether it was.
    fn get_or_insert(&mut self, key: &str) -> (&mut Level, bool) {
        if let Children::Few(v) = self
            && v.len() >= FEW_CHILDREN
            && !v.iter().any(|(k, _)| &**k == key)
        {
            let map: HashMap<Box<str>, Level> = std::mem::take(v).into_iter().collect();
            *self = Children::Many(Box::new(map));
        }
        match self {
            Children::Few(v) => match v.iter().position(|(k, _)| &**k == key) {
                Some(i) => (&mut v[i].1, false),
                None => {
                    v.reserve_exact(1);
                    v.push((key.into(), Level::default()));
                    let last = v.len() - 1;
                    (&mut v[last].1, true)
                }
            },
            Children::Many(m) => {
                let created = !m.contains_key(key);
                (m.entry(key.into()).or_default(), created)
            }
        }
    }

    fn remove(&mut self, key: &str) -> Option<Level> {
        match self {
            Children::Few(v) => {
                let i = v.iter().position(|(k, _)| &**k == key)?;
                let (_, l) = v.swap_remove(i);
                if v.capacity() > 2 * v.len() {
                    v.shrink_to_fit();
                }
                Some(l)
            }
            Children::Many(m) => m.remove(key),
        }
    }

    /// Move every child into `out`.
    fn drain_into(&mut self, out: &mut Vec<Level>) {
        match self {
            Children::Few(v) => out.extend(v.drain(..).map(|(_, l)| l)),
            Children::Many(m) => out.extend(m.drain().map(|(_, l)| l)),
        }
    }
}

#[derive(Debug, Default)]
struct Level {
    children: Children,
    plus: Option<Box<Level>>,
    /// Subscribers whose filter ends with `#` at this level.
    hash: Vec<Sub>,
    /// Subscribers whose filter ends exactly at this level.
    here: Vec<Sub>,
}

#[derive(Debug, Clone)]
struct Sub {
    to: Subscriber,
    id: SessionId,
    qos: u8,
}

/// Who a subscription delivers to: a connection's session (a clean MQTT session: QoS 0 takes
/// the shared encoded frame, nothing per recipient), or a persistent MQTT session's state, which
/// forwards to its connection while one is attached and queues QoS ≥ 1 messages while none is.
#[derive(Debug, Clone)]
pub enum Subscriber {
    /// A live connection's session.
    Conn(Arc<SessionHandle>),
    /// A persistent session (docs/protocols/mqtt.md, "Sessions and QoS").
    Stored(Arc<MqttState>),
}

impl Subscriber {
    /// The id the trie holds it under.
    pub fn id(&self) -> &SessionId {
        match self {
            Subscriber::Conn(h) => h.id(),
            Subscriber::Stored(s) => s.id(),
        }
    }

    /// Identity, to deliver once to a subscriber several filters matched.
    fn key(&self) -> usize {
        match self {
            Subscriber::Conn(h) => Arc::as_ptr(h) as usize,
            Subscriber::Stored(s) => Arc::as_ptr(s) as usize,
        }
    }

    /// Hand over one message; whether it was taken.
    fn deliver(&self, msg: &Arc<Message>, qos: u8) -> bool {
        match self {
            Subscriber::Conn(h) => h.deliver(msg.clone(), Some(qos)).is_ok(),
            Subscriber::Stored(s) => s.deliver(msg, qos),
        }
    }
}

impl From<&Arc<SessionHandle>> for Subscriber {
    fn from(h: &Arc<SessionHandle>) -> Self {
        Subscriber::Conn(h.clone())
    }
}

impl From<&Arc<MqttState>> for Subscriber {
    fn from(s: &Arc<MqttState>) -> Self {
        Subscriber::Stored(s.clone())
    }
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
        let mut stack: Vec<Level> = Vec::new();
        self.children.drain_into(&mut stack);
        stack.extend(self.plus.take().map(|p| *p));
        while let Some(mut l) = stack.pop() {
            l.children.drain_into(&mut stack);
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
        self.insert(&mut root, filter, session.into(), qos)
    }

    /// As [`Self::subscribe`], refusing a new subscription when the node already holds
    /// `max_subscriptions`, or when the levels it adds to the trie would take it past
    /// `max_levels`. Checked before anything is allocated.
    pub fn subscribe_within(
        &self,
        filter: &str,
        session: impl Into<Subscriber>,
        qos: u8,
        max_subscriptions: usize,
        max_levels: usize,
    ) -> Result<bool, SubscriptionsFull> {
        let session: Subscriber = session.into();
        let mut root = write(&self.root);
        if self.count.load(Ordering::Relaxed) >= max_subscriptions
            && !holds(&root, filter, session.id())
        {
            return Err(SubscriptionsFull::Subscriptions {
                max: max_subscriptions,
            });
        }
        let held = self.levels.load(Ordering::Relaxed);
        // the exact count needs a walk: only when the filter's depth could reach the cap
        if held + edges(filter).0.count() > max_levels {
            let needed = missing_levels(&root, filter);
            if held + needed > max_levels {
                return Err(SubscriptionsFull::Levels {
                    needed,
                    held,
                    max: max_levels,
                });
            }
        }
        Ok(self.insert(&mut root, filter, session, qos))
    }

    fn insert(&self, root: &mut Level, filter: &str, to: Subscriber, qos: u8) -> bool {
        let sub = Sub {
            id: to.id().clone(),
            to,
            qos,
        };
        let (levels, hash) = edges(filter);
        let mut node = root;
        let mut created = 0;
        for level in levels {
            node = if level == "+" {
                if node.plus.is_none() {
                    created += 1;
                }
                node.plus.get_or_insert_with(Default::default)
            } else {
                let (child, new) = node.children.get_or_insert(level);
                created += usize::from(new);
                child
            };
        }
        if created > 0 {
            self.levels.fetch_add(created, Ordering::Relaxed);
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
        // 2. Free the emptied chain: cut the edge below level `cut` (levels cut+1 ..= depth).
        self.levels.fetch_sub(depth - cut, Ordering::Relaxed);
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

    /// Levels (nodes) of the trie, shared prefixes counted once.
    pub fn levels(&self) -> usize {
        self.levels.load(Ordering::Relaxed)
    }

    /// Whether no session subscribes to anything.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The node's persistent MQTT sessions.
    pub fn sessions(&self) -> &Store {
        &self.sessions
    }

    /// Discard a persistent session taken out of the store: it takes nothing more, and its
    /// subscriptions leave the trie.
    pub fn discard_session(&self, session: &MqttState) {
        for f in session.discard() {
            self.unsubscribe(&f, session.id());
        }
    }

    /// Discard the stored sessions whose expiry passed (checked at most once per `every`).
    pub fn expire_sessions(&self, now: std::time::Instant, every: std::time::Duration) {
        for s in self.sessions.sweep(now, every) {
            tracing::debug!(client_id = s.client_id(), "persistent session expired");
            self.discard_session(&s);
        }
    }

    /// Deliver a message to every session with a matching filter, at most once per session, with
    /// QoS = min(publish QoS, highest granted QoS among its matching filters). Returns the count.
    pub fn publish(&self, topic_name: &str, qos: u8, topic: Bytes, body: Bytes) -> usize {
        let mut hits: Vec<(Subscriber, u8)> = Vec::new();
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
            hits.sort_unstable_by(|a, b| a.0.key().cmp(&b.0.key()).then(b.1.cmp(&a.1)));
            hits.dedup_by(|a, b| a.0.key() == b.0.key());
        }
        let msg = Message::new(topic, body);
        let mut n = 0;
        for (s, granted) in hits {
            if s.deliver(&msg, qos.min(granted)) {
                n += 1;
            }
        }
        crate::message_path::MESSAGE_PATH
            .fanout_deliveries
            .increment(n as u64);
        n
    }
}

/// How many levels the trie lacks to hold `filter`.
fn missing_levels(root: &Level, filter: &str) -> usize {
    let (levels, _) = edges(filter);
    let mut node = Some(root);
    let mut missing = 0;
    for level in levels {
        node = node.and_then(|n| n.child(level));
        missing += usize::from(node.is_none());
    }
    missing
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
fn collect(root: &Level, topic: &str, out: &mut Vec<(Subscriber, u8)>) -> usize {
    fn take(subs: &[Sub], out: &mut Vec<(Subscriber, u8)>) -> usize {
        out.extend(subs.iter().map(|s| (s.to.clone(), s.qos)));
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
    use crate::session::{Outbound, OutboxRx};

    fn handle(id: &str) -> (Arc<SessionHandle>, OutboxRx) {
        crate::session::test_handle(id, 8)
    }

    fn got(rx: &mut OutboxRx) -> Vec<(String, Option<u8>)> {
        let mut v = vec![];
        while let Some(o) = rx.try_recv() {
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
        let within =
            |f: &str, s: &Arc<SessionHandle>, q: u8| subs.subscribe_within(f, s, q, 2, 100);
        assert_eq!(within("t/1", &a, 0), Ok(true));
        assert_eq!(within("t/1", &b, 0), Ok(true));
        assert_eq!(
            within("t/2", &a, 0),
            Err(SubscriptionsFull::Subscriptions { max: 2 })
        );
        // re-subscribing (a new QoS) is not a new subscription
        assert_eq!(within("t/1", &a, 1), Ok(false));
        subs.unsubscribe("t/1", "b");
        assert_eq!(within("t/2", &a, 0), Ok(true));
        assert_eq!(subs.len(), 2);
    }

    #[test]
    fn trie_levels_are_counted_and_capped() {
        let subs = Subscriptions::default();
        let (a, _ra) = handle("a");
        let (b, _rb) = handle("b");
        let within = |f: &str, s: &Arc<SessionHandle>| subs.subscribe_within(f, s, 0, 100, 6);
        assert_eq!(within("a/b/c", &a), Ok(true));
        assert_eq!(subs.levels(), 3);
        // shared prefixes cost nothing; `#` is not a level of the trie
        assert_eq!(within("a/b/c", &b), Ok(true));
        assert_eq!(within("a/b/#", &b), Ok(true));
        assert_eq!(within("#", &b), Ok(true));
        assert_eq!(subs.levels(), 3);
        assert_eq!(within("a/+/d", &a), Ok(true));
        assert_eq!(subs.levels(), 5);
        assert_eq!(
            within("x/y", &a),
            Err(SubscriptionsFull::Levels {
                needed: 2,
                held: 5,
                max: 6
            })
        );
        assert_eq!(within("a/b/c/d", &a), Ok(true));
        assert_eq!(subs.levels(), 6);
        // unsubscribing frees the levels only this filter used
        subs.unsubscribe("a/b/c/d", "a");
        subs.unsubscribe("a/+/d", "a");
        assert_eq!(subs.levels(), 3);
        assert_eq!(within("x/y", &a), Ok(true));
        for (f, s) in [
            ("a/b/c", "a"),
            ("a/b/c", "b"),
            ("a/b/#", "b"),
            ("#", "b"),
            ("x/y", "a"),
        ] {
            assert!(subs.unsubscribe(f, s), "{f} {s}");
        }
        assert_eq!((subs.len(), subs.levels()), (0, 0));
    }

    #[test]
    fn wide_levels_move_to_a_map_and_still_match() {
        let subs = Subscriptions::default();
        let (a, mut ra) = handle("a");
        for i in 0..100 {
            subs.subscribe(&format!("w/{i}/x"), &a, 0);
        }
        assert_eq!(subs.levels(), 1 + 100 + 100);
        for i in [0, 7, 8, 99] {
            let t = format!("w/{i}/x");
            assert_eq!(subs.publish(&t, 0, Bytes::from(t.clone()), Bytes::new()), 1);
        }
        assert_eq!(got(&mut ra).len(), 4);
        for i in 0..100 {
            assert!(subs.unsubscribe(&format!("w/{i}/x"), "a"));
        }
        assert_eq!(subs.levels(), 0);
        assert!(read(&subs.root).is_empty());
    }

    #[test]
    fn matches_like_the_reference_on_random_filters() {
        let mut seed = 0x2545_f491_4f6c_dd1d_u64;
        let mut next = move |n: usize| {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            (seed % n as u64) as usize
        };
        let mut random = |wild: bool| {
            let words = ["a", "b", "", "$s", "+", "#"];
            let n = 1 + next(5);
            let mut levels = Vec::new();
            for i in 0..n {
                let mut w = words[next(if wild { 6 } else { 4 })];
                if (w == "$s" && i > 0) || (w == "#" && i + 1 < n) {
                    w = "a";
                }
                levels.push(w);
            }
            match levels.join("/") {
                empty if empty.is_empty() => "a".to_owned(),
                t => t,
            }
        };
        let subs = Subscriptions::default();
        let mut sessions = Vec::new();
        for i in 0..24 {
            let (h, rx) = handle(&format!("s{i}"));
            let filters: Vec<String> = (0..4).map(|_| random(true)).collect();
            for f in &filters {
                assert!(topic::valid_filter(f), "{f}");
                subs.subscribe(f, &h, 0);
            }
            sessions.push((h, rx, filters));
        }
        for round in 0..2 {
            for _ in 0..400 {
                let t = random(false);
                subs.publish(&t, 0, Bytes::from(t.clone()), Bytes::new());
                for (h, rx, filters) in sessions.iter_mut() {
                    let want = filters.iter().any(|f| topic::matches(f, &t));
                    let n = got(rx).len();
                    assert_eq!(n, usize::from(want), "{} {filters:?} on {t:?}", h.id());
                }
            }
            if round == 0 {
                // drop half of the filters and check again
                for (h, _, filters) in sessions.iter_mut() {
                    let id = h.id().clone();
                    let keep = filters.split_off(2);
                    for f in filters.iter() {
                        if !keep.contains(f) {
                            subs.unsubscribe(f, &id);
                        }
                    }
                    *filters = keep;
                }
            }
        }
        for (h, _, filters) in &sessions {
            for f in filters {
                subs.unsubscribe(f, h.id());
            }
        }
        assert_eq!((subs.len(), subs.levels()), (0, 0));
        assert!(read(&subs.root).is_empty());
    }

    #[test]
    fn a_persistent_session_queues_qos1_while_offline_and_is_discarded_with_its_filters() {
        use crate::mqtt_session::SessionLimits;
        let subs = Subscriptions::default();
        let st = MqttState::new("c", None, true, SessionLimits::default());
        let (a, mut ra) = handle("a");
        for (f, q) in [("a/#", 1), ("a/+", 2)] {
            let added = st.subscribe(f, q, || subs.subscribe_within(f, &st, q, 100, 100));
            assert_eq!(added, Some(Ok(true)));
        }
        subs.subscribe("a/b", &a, 0);
        // overlapping filters: one copy each, the persistent one queued (no connection)
        assert_eq!(
            subs.publish("a/b", 2, Bytes::from_static(b"a/b"), Bytes::new()),
            2
        );
        assert_eq!(st.counts(), (1, 0));
        assert_eq!(got(&mut ra), vec![("a/b".into(), Some(0))]);
        // QoS 0 is not queued for an offline session
        assert_eq!(
            subs.publish("a/b", 0, Bytes::from_static(b"a/b"), Bytes::new()),
            1
        );
        assert_eq!(st.counts(), (1, 0));
        subs.discard_session(&st);
        assert_eq!(st.counts(), (0, 0));
        assert_eq!(subs.len(), 1, "only the clean session's filter is left");
        assert_eq!(st.subscribe("x", 0, || Ok::<_, ()>(())), None, "discarded");
    }

    #[test]
    fn groups_broadcast_once_to_each_member() {
        let g = Groups::default();
        let (a, mut ra) = handle("a");
        let (b, mut rb) = handle("b");
        g.add("room", &a).unwrap();
        g.add("room", &a).unwrap();
        g.add("room", &b).unwrap();
        assert_eq!(g.members("room").len(), 2);
        assert_eq!(g.broadcast("room", "Chat/OnChat", "{}", None), 2);
        assert_eq!(got(&mut ra).len(), 1);
        assert_eq!(got(&mut rb).len(), 1);
        g.remove_everywhere(&a);
        assert_eq!(g.members("room").len(), 1);
        g.remove("room", "b");
        assert_eq!(g.broadcast("room", "t", "b", None), 0);
    }

    #[test]
    fn a_session_is_in_at_most_max_groups() {
        let g = Groups::with_limit(2);
        let (a, _ra) = handle("a");
        g.add("r1", &a).unwrap();
        g.add("r2", &a).unwrap();
        g.add("r2", &a).unwrap(); // already a member: not counted again
        assert!(matches!(g.add("r3", &a), Err(CallError::BadRequest(_))));
        g.remove("r1", "a");
        g.add("r3", &a).unwrap();
        assert_eq!(g.members("r3").len(), 1);
    }
}

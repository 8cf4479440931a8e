//! Retained MQTT messages (MQTT 3.1.1 section 3.3.1.3): the last message published with the
//! retain flag on each topic, handed to every new subscription whose filter matches it.
//!
//! [`RetainedStore`] keeps them in memory in a trie over topic levels, so matching a filter
//! visits only the branches the filter can reach (a literal level is one lookup; `+` and `#`
//! visit what is below them), never the whole store. Every walk is a loop with an explicit stack:
//! a deep topic or filter cannot overflow a worker's stack. The store is bounded in messages and
//! bytes (`[limits] max_retained_messages`, `max_retained_bytes`), checked before anything is
//! allocated.
//!
//! A durable or cluster-wide copy plugs in behind [`RetainedBackend`]: every change that the
//! store accepts is written through to it, in the order the store applied them, and
//! [`RetainedStore::load`] fills the store from it at start.

use std::collections::HashMap;
use std::sync::Arc;

use bytes::Bytes;
use parking_lot::RwLock;

/// Bytes each topic level of a retained message counts for, besides its text: the trie node it
/// may need. Keeps `max_retained_bytes` a bound on memory for topics of many short levels.
pub const LEVEL_COST: usize = 64;

/// Where the retained messages are kept beyond this process's memory (a file, a cluster's
/// key-value store): the store writes each accepted change through to it.
///
/// Called with the store's lock held, so that a backend sees the changes of one topic in the
/// order they happened: an implementation must not block (queue the write and batch it).
pub trait RetainedBackend: Send + Sync {
    /// `topic` now retains this message (replacing any other).
    fn put_retained(&self, topic: &str, qos: u8, payload: &Bytes);
    /// `topic` retains nothing any more.
    fn delete_retained(&self, topic: &str);
}

/// The cluster's shared copy of the retained messages (crate `warren-cluster`: a NATS
/// JetStream KV bucket, a Redis hash), handed to a node at start
/// ([`crate::node::NodeBuilder::shared_retained`]): a gate that starts after others finds the
/// retained messages they kept (docs/protocols/mqtt.md, "Across gates").
pub struct SharedRetained {
    /// Where the changes made on this gate are written (queued, never blocking).
    pub backend: Arc<dyn RetainedBackend>,
    /// What the shared copy held when the node started: `(topic, QoS, payload)`.
    pub entries: Vec<(String, u8, Bytes)>,
}

impl std::fmt::Debug for SharedRetained {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SharedRetained")
            .field("entries", &self.entries.len())
            .finish_non_exhaustive()
    }
}

/// One retained message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RetainedMessage {
    /// The topic name it was published on.
    pub topic: Bytes,
    /// The QoS it was published with: it is delivered at the lower of this and the subscription's.
    pub qos: u8,
    /// The payload (never empty: an empty one deletes).
    pub payload: Bytes,
}

/// What [`RetainedStore::set`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Retain {
    /// The topic retains the message; it retained none before.
    Added,
    /// The message replaced the topic's earlier one.
    Replaced,
    /// An empty payload deleted the topic's retained message.
    Deleted,
    /// An empty payload on a topic that retained nothing.
    Nothing,
}

/// A retained message was refused because the store is at one of its caps; the message is still
/// delivered to the subscribers of its topic, only not kept.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum RetainedFull {
    /// `[limits] max_retained_messages` topics retain a message.
    #[error("the node retains its maximum of {max} messages")]
    Messages {
        /// The cap.
        max: usize,
    },
    /// The message would take the store past `[limits] max_retained_bytes`.
    #[error("a retained message of {needed} bytes; retained messages hold {held} of at most {max}")]
    Bytes {
        /// What the message counts for.
        needed: usize,
        /// Bytes held now.
        held: usize,
        /// The cap.
        max: usize,
    },
}

impl RetainedFull {
    /// The refusal kind for logs and metrics: the name of the `[limits]` key.
    pub fn kind(&self) -> &'static str {
        match self {
            RetainedFull::Messages { .. } => "max_retained_messages",
            RetainedFull::Bytes { .. } => "max_retained_bytes",
        }
    }
}

/// One level of the trie: its children by level text, and the message retained on the topic
/// that ends here.
#[derive(Debug, Default)]
struct Node {
    children: HashMap<Box<str>, Node>,
    entry: Option<Arc<RetainedMessage>>,
}

/// Dropping a level drops its descendants one by one from a heap stack: the default drop glue
/// would recurse once per level.
impl Drop for Node {
    fn drop(&mut self) {
        if self.children.is_empty() {
            return;
        }
        let mut stack: Vec<Node> = self.children.drain().map(|(_, n)| n).collect();
        while let Some(mut n) = stack.pop() {
            stack.extend(n.children.drain().map(|(_, c)| c));
        }
    }
}

#[derive(Debug, Default)]
struct Inner {
    root: Node,
    count: usize,
    bytes: usize,
}

/// The retained messages of a node, bounded in count and bytes.
pub struct RetainedStore {
    inner: RwLock<Inner>,
    max_messages: usize,
    max_bytes: usize,
    /// Set once, at start (before any client connects) or when built.
    backend: std::sync::OnceLock<Arc<dyn RetainedBackend>>,
}

impl std::fmt::Debug for RetainedStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RetainedStore")
            .field("len", &self.len())
            .field("bytes", &self.bytes())
            .field("max_messages", &self.max_messages)
            .field("max_bytes", &self.max_bytes)
            .field("backend", &self.backend.get().is_some())
            .finish()
    }
}

/// What a retained message on `topic` with `payload` counts for against `max_retained_bytes`.
pub fn cost(topic: &str, payload: usize) -> usize {
    let levels = topic.bytes().filter(|b| *b == b'/').count() + 1;
    topic.len() + payload + levels * LEVEL_COST
}

impl RetainedStore {
    /// An empty store holding at most `max_messages` messages and `max_bytes` bytes.
    pub fn new(max_messages: usize, max_bytes: usize) -> Self {
        RetainedStore {
            inner: RwLock::new(Inner::default()),
            max_messages,
            max_bytes,
            backend: std::sync::OnceLock::new(),
        }
    }

    /// Write every accepted change through to `backend` from now on.
    pub fn with_backend(self, backend: Arc<dyn RetainedBackend>) -> Self {
        let _ = self.backend.set(backend);
        self
    }

    /// Write every accepted change through to `backend` from now on, for a store already
    /// shared (the node sets its durable store at start). A store has one backend: `false`
    /// when it has one already (then nothing changes).
    pub fn set_backend(&self, backend: Arc<dyn RetainedBackend>) -> bool {
        self.backend.set(backend).is_ok()
    }

    /// Retained messages held.
    pub fn len(&self) -> usize {
        self.inner.read().count
    }

    /// Whether no topic retains a message.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Bytes held, as counted against `max_retained_bytes` (see [`cost`]).
    pub fn bytes(&self) -> usize {
        self.inner.read().bytes
    }

    /// Retain `payload` on `topic` (a valid topic name) at `qos`, replacing what it retained; an
    /// empty payload deletes it. Refused when a new topic or a bigger message would pass a cap.
    /// Accepted changes are written through to the backend.
    pub fn set(&self, topic: &str, qos: u8, payload: Bytes) -> Result<Retain, RetainedFull> {
        self.apply(topic, qos, payload, self.backend.get().map(|b| &**b), None)
    }

    /// As [`RetainedStore::set`], and an accepted change is also written through to `also`
    /// (the cluster's shared copy, for a change made on this gate), in the same order.
    pub fn set_with(
        &self,
        topic: &str,
        qos: u8,
        payload: Bytes,
        also: Option<&dyn RetainedBackend>,
    ) -> Result<Retain, RetainedFull> {
        self.apply(topic, qos, payload, self.backend.get().map(|b| &**b), also)
    }

    /// Fill the store from a backend's copy at start (not written back to it). Entries past a
    /// cap are skipped: returns how many were kept.
    pub fn load(&self, entries: impl IntoIterator<Item = (String, u8, Bytes)>) -> usize {
        let mut kept = 0;
        for (topic, qos, payload) in entries {
            if !payload.is_empty() && self.apply(&topic, qos, payload, None, None).is_ok() {
                kept += 1;
            }
        }
        kept
    }

    fn apply(
        &self,
        topic: &str,
        qos: u8,
        payload: Bytes,
        backend: Option<&dyn RetainedBackend>,
        also: Option<&dyn RetainedBackend>,
    ) -> Result<Retain, RetainedFull> {
        let mut inner = self.inner.write();
        if payload.is_empty() {
            let removed = delete(&mut inner, topic);
            if removed {
                for b in backend.into_iter().chain(also) {
                    b.delete_retained(topic);
                }
            }
            return Ok(if removed {
                Retain::Deleted
            } else {
                Retain::Nothing
            });
        }
        let needed = cost(topic, payload.len());
        let old = find(&inner.root, topic).map(|m| cost(topic, m.payload.len()));
        if old.is_none() && inner.count >= self.max_messages {
            return Err(RetainedFull::Messages {
                max: self.max_messages,
            });
        }
        let held = inner.bytes - old.unwrap_or(0);
        if held + needed > self.max_bytes {
            return Err(RetainedFull::Bytes {
                needed,
                held,
                max: self.max_bytes,
            });
        }
        for b in backend.into_iter().chain(also) {
            b.put_retained(topic, qos, &payload);
        }
        let msg = Arc::new(RetainedMessage {
            topic: Bytes::copy_from_slice(topic.as_bytes()),
            qos,
            payload,
        });
        let mut node = &mut inner.root;
        for level in topic.split('/') {
            node = node.children.entry(level.into()).or_default();
        }
        node.entry = Some(msg);
        inner.bytes = inner.bytes - old.unwrap_or(0) + needed;
        match old {
            Some(_) => Ok(Retain::Replaced),
            None => {
                inner.count += 1;
                Ok(Retain::Added)
            }
        }
    }

    /// The message `topic` retains, if any.
    pub fn get(&self, topic: &str) -> Option<Arc<RetainedMessage>> {
        find(&self.inner.read().root, topic).cloned()
    }

    /// Append to `out` every retained message whose topic matches `filter` (a valid filter):
    /// `+` one level, `#` the rest including the parent, and a filter starting with a wildcard
    /// matches no topic starting with `$`. Returns how many were appended.
    pub fn matching(&self, filter: &str, out: &mut Vec<Arc<RetainedMessage>>) -> usize {
        let before = out.len();
        let inner = self.inner.read();
        // (level, index of the filter's next level, byte offset of that level in the filter)
        let mut stack: Vec<(&Node, usize, usize)> = vec![(&inner.root, 0, 0)];
        // whole subtrees under a `#`
        let mut subtrees: Vec<&Node> = Vec::new();
        while let Some((node, depth, at)) = stack.pop() {
            if at > filter.len() {
                // past the filter's last level: the topic ends here
                if let Some(e) = &node.entry {
                    out.push(e.clone());
                }
                continue;
            }
            let rest = &filter[at..];
            let (level, next) = match rest.find('/') {
                Some(i) => (&rest[..i], at + i + 1),
                None => (rest, filter.len() + 1),
            };
            // a wildcard as the first level never matches a topic starting with '$'
            let visible = |name: &str| depth > 0 || !name.starts_with('$');
            match level {
                "#" => {
                    // the parent level itself (`a/#` matches `a`), not the root
                    if depth > 0
                        && let Some(e) = &node.entry
                    {
                        out.push(e.clone());
                    }
                    subtrees.extend(
                        node.children
                            .iter()
                            .filter(|(k, _)| visible(k))
                            .map(|(_, c)| c),
                    );
                    while let Some(n) = subtrees.pop() {
                        if let Some(e) = &n.entry {
                            out.push(e.clone());
                        }
                        subtrees.extend(n.children.values());
                    }
                }
                "+" => {
                    for (k, c) in &node.children {
                        if visible(k) {
                            stack.push((c, depth + 1, next));
                        }
                    }
                }
                lit => {
                    if let Some(c) = node.children.get(lit) {
                        stack.push((c, depth + 1, next));
                    }
                }
            }
        }
        out.len() - before
    }
}

/// The durable store keeps the retained messages of `[mqtt] store`: each change is queued to
/// its writer without waiting (the store's lock is held). A publisher that must know the change
/// is on disk runs the publish inside [`crate::mqtt_store::collecting`] and waits on what it
/// collected; a full write queue is counted and logged, and the change is then kept in memory
/// only (or, inside `collecting`, written once there is room).
#[cfg(feature = "mqtt-store")]
impl RetainedBackend for crate::mqtt_store::MqttStore {
    fn put_retained(&self, topic: &str, qos: u8, payload: &Bytes) {
        self.write_through(crate::mqtt_store::Write::PutRetained {
            topic: topic.to_owned(),
            qos,
            payload: payload.clone(),
        });
    }

    fn delete_retained(&self, topic: &str) {
        self.write_through(crate::mqtt_store::Write::DeleteRetained {
            topic: topic.to_owned(),
        });
    }
}

/// The message `topic` retains, walking the trie without creating anything.
fn find<'a>(root: &'a Node, topic: &str) -> Option<&'a Arc<RetainedMessage>> {
    let mut node = root;
    for level in topic.split('/') {
        node = node.children.get(level)?;
    }
    node.entry.as_ref()
}

/// Remove what `topic` retains and free the levels left empty; whether there was something.
fn delete(inner: &mut Inner, topic: &str) -> bool {
    // 1. Walk to the topic's level, remembering the deepest level on the way that stays whatever
    //    happens below it (it retains a message or has other children): the chain after it goes.
    let mut node = &mut inner.root;
    let mut cut = 0;
    for (depth, level) in topic.split('/').enumerate() {
        if node.entry.is_some() || node.children.len() > 1 {
            cut = depth;
        }
        node = match node.children.get_mut(level) {
            Some(c) => c,
            None => return false,
        };
    }
    let Some(old) = node.entry.take() else {
        return false;
    };
    let freed = node.children.is_empty();
    inner.count -= 1;
    inner.bytes -= cost(topic, old.payload.len());
    if !freed {
        return true;
    }
    // 2. Cut the edge below level `cut`.
    let mut node = &mut inner.root;
    for (i, level) in topic.split('/').enumerate() {
        if i == cut {
            node.children.remove(level);
            break;
        }
        node = match node.children.get_mut(level) {
            Some(c) => c,
            None => break,
        };
    }
    true
}

#[cfg(test)]
mod tests {
    use super::*;
    use warren_proto::mqtt::topic;

    fn b(s: &str) -> Bytes {
        Bytes::copy_from_slice(s.as_bytes())
    }

    fn topics(store: &RetainedStore, filter: &str) -> Vec<String> {
        let mut out = Vec::new();
        store.matching(filter, &mut out);
        let mut v: Vec<String> = out
            .iter()
            .map(|m| String::from_utf8_lossy(&m.topic).into_owned())
            .collect();
        v.sort();
        v
    }

    #[test]
    fn set_replace_delete() {
        let s = RetainedStore::new(10, 1 << 20);
        assert_eq!(s.set("a/b", 1, b("one")), Ok(Retain::Added));
        assert_eq!(s.set("a/b", 0, b("two")), Ok(Retain::Replaced));
        let m = s.get("a/b").expect("retained");
        assert_eq!((m.qos, &m.payload[..]), (0, &b"two"[..]));
        assert_eq!(s.len(), 1);
        assert_eq!(s.bytes(), cost("a/b", 3));
        assert_eq!(s.set("a/b", 0, Bytes::new()), Ok(Retain::Deleted));
        assert_eq!(s.set("a/b", 0, Bytes::new()), Ok(Retain::Nothing));
        assert!(s.get("a/b").is_none());
        assert_eq!((s.len(), s.bytes()), (0, 0));
        assert!(
            s.inner.read().root.children.is_empty(),
            "the chain is freed"
        );
    }

    #[test]
    fn deleting_frees_only_the_emptied_chain() {
        let s = RetainedStore::new(10, 1 << 20);
        s.set("a/b/c/d", 0, b("x")).unwrap();
        s.set("a/b", 0, b("y")).unwrap();
        s.set("a/x", 0, b("z")).unwrap();
        s.set("a/b/c/d", 0, Bytes::new()).unwrap();
        {
            let inner = s.inner.read();
            let ab = &inner.root.children["a"].children["b"];
            assert!(ab.children.is_empty(), "c/d is freed");
            assert!(ab.entry.is_some());
        }
        assert_eq!(topics(&s, "#"), ["a/b", "a/x"]);
        s.set("a/b", 0, Bytes::new()).unwrap();
        s.set("a/x", 0, Bytes::new()).unwrap();
        assert!(s.inner.read().root.children.is_empty());
        assert_eq!((s.len(), s.bytes()), (0, 0));
    }

    #[test]
    fn wildcards_match_like_mqtt() {
        let s = RetainedStore::new(100, 1 << 20);
        for t in [
            "sensors",
            "sensors/1/temp",
            "sensors/2/temp",
            "sensors/2/hum",
            "$SYS/broker/uptime",
            "/lead",
            "other",
        ] {
            s.set(t, 0, b("v")).unwrap();
        }
        assert_eq!(
            topics(&s, "sensors/+/temp"),
            ["sensors/1/temp", "sensors/2/temp"]
        );
        assert_eq!(
            topics(&s, "sensors/#"),
            [
                "sensors",
                "sensors/1/temp",
                "sensors/2/hum",
                "sensors/2/temp"
            ]
        );
        assert_eq!(topics(&s, "sensors/2/temp"), ["sensors/2/temp"]);
        assert_eq!(topics(&s, "+"), ["other", "sensors"]);
        assert_eq!(topics(&s, "+/lead"), ["/lead"]);
        assert_eq!(topics(&s, "#").len(), 6, "everything but $SYS");
        assert!(topics(&s, "+/broker/uptime").is_empty());
        assert_eq!(topics(&s, "$SYS/#"), ["$SYS/broker/uptime"]);
        assert_eq!(topics(&s, "$SYS/+/uptime"), ["$SYS/broker/uptime"]);
        assert!(topics(&s, "nope/#").is_empty());
    }

    #[test]
    fn matches_like_the_reference_on_random_topics() {
        let mut seed = 0x9e37_79b9_7f4a_7c15_u64;
        let mut next = move |n: usize| {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            (seed % n as u64) as usize
        };
        let mut random = |wild: bool| {
            let words = ["a", "b", "", "$s", "+", "#"];
            let n = 1 + next(4);
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
        let s = RetainedStore::new(10_000, 1 << 30);
        let mut held = std::collections::BTreeSet::new();
        for _ in 0..300 {
            let t = random(false);
            s.set(&t, 0, b("v")).unwrap();
            held.insert(t);
        }
        for _ in 0..300 {
            let f = random(true);
            assert!(topic::valid_filter(&f), "{f}");
            let want: Vec<String> = held
                .iter()
                .filter(|t| topic::matches(&f, t))
                .cloned()
                .collect();
            assert_eq!(topics(&s, &f), want, "{f}");
        }
    }

    #[test]
    fn caps_refuse_new_topics_and_growth_only() {
        let s = RetainedStore::new(2, 1 << 20);
        s.set("a", 0, b("1")).unwrap();
        s.set("b", 0, b("1")).unwrap();
        assert_eq!(
            s.set("c", 0, b("1")),
            Err(RetainedFull::Messages { max: 2 })
        );
        // replacing and deleting are allowed at the cap
        assert_eq!(s.set("a", 1, b("2")), Ok(Retain::Replaced));
        assert_eq!(s.set("b", 0, Bytes::new()), Ok(Retain::Deleted));
        assert_eq!(s.set("c", 0, b("1")), Ok(Retain::Added));

        let max = cost("t", 10);
        let s = RetainedStore::new(10, max);
        assert_eq!(s.set("t", 0, b("0123456789")), Ok(Retain::Added));
        let e = s.set("t", 0, b("0123456789x")).unwrap_err();
        assert_eq!(e.kind(), "max_retained_bytes");
        assert_eq!(s.set("t", 0, b("short")), Ok(Retain::Replaced));
        assert_eq!(s.bytes(), cost("t", 5));
    }

    #[derive(Default)]
    struct Log(parking_lot::Mutex<Vec<String>>);

    impl RetainedBackend for Log {
        fn put_retained(&self, topic: &str, qos: u8, payload: &Bytes) {
            let p = String::from_utf8_lossy(payload);
            self.0.lock().push(format!("put {topic} {qos} {p}"));
        }
        fn delete_retained(&self, topic: &str) {
            self.0.lock().push(format!("del {topic}"));
        }
    }

    #[test]
    fn the_backend_sees_accepted_changes_in_order() {
        let log = Arc::new(Log::default());
        let s = RetainedStore::new(1, 1 << 20).with_backend(log.clone());
        s.set("a", 1, b("x")).unwrap();
        s.set("b", 0, b("refused")).unwrap_err();
        s.set("a", 0, b("y")).unwrap();
        s.set("a", 0, Bytes::new()).unwrap();
        s.set("a", 0, Bytes::new()).unwrap();
        assert_eq!(*log.0.lock(), ["put a 1 x", "put a 0 y", "del a"]);
        // loading fills the store without writing back
        let fresh = RetainedStore::new(1, 1 << 20).with_backend(log.clone());
        let n = fresh.load([
            ("k".to_owned(), 1, b("v")),
            ("over".to_owned(), 0, b("cap")),
        ]);
        assert_eq!(n, 1);
        assert_eq!(fresh.get("k").map(|m| m.qos), Some(1));
        assert_eq!(log.0.lock().len(), 3);
    }

    #[test]
    fn deep_topics_do_not_recurse() {
        const DEPTH: usize = 200_000;
        let s = RetainedStore::new(10, usize::MAX);
        let deep = "/".repeat(DEPTH - 1);
        let words = vec!["x"; DEPTH].join("/");
        s.set(&deep, 0, b("v")).unwrap();
        s.set(&words, 0, b("w")).unwrap();
        assert_eq!(topics(&s, "#").len(), 2);
        assert_eq!(topics(&s, &vec!["+"; DEPTH].join("/")).len(), 2);
        assert_eq!(topics(&s, &deep).len(), 1);
        s.set(&deep, 0, Bytes::new()).unwrap();
        assert_eq!(s.len(), 1);
        // dropping a deep trie does not recurse either
        drop(s);
    }
}

//! The router: from a route to one module instance, and from there onto the bus.
//!
//! It keeps a routing table built from the registry: instances per module type, instances by id,
//! and which node runs each. `Module@x` resolves `x` first as an instance id, then as a node id
//! (docs/protocols/mqtt.md); without `@` an instance is picked on the module's consistent-hash ring
//! (`ring.rs`, docs/cluster.md "Routing") keyed by the session's uid (or session id): one user
//! keeps reaching the same instance, and when an instance leaves only its keys move.

use parking_lot::{Mutex, RwLock};
use std::sync::Arc;

/// The router's maps are read on every request: a fast hasher (keys come from the registry
/// and the module code, not from clients).
type HashMap<K, V> = std::collections::HashMap<K, V, foldhash::fast::RandomState>;

use arc_swap::ArcSwap;

use tokio::time::Instant;

use crate::bus::{Bus, Call, Pending};
use crate::error::CallError;
use crate::module::LocalBus;
use crate::registry::NodeRecord;
use crate::ring::{Ring, normalize};
use crate::session::Session;

/// A resolved call target: one instance on one node.
#[derive(Debug, Clone)]
pub struct Target {
    /// Node running the instance.
    pub node: Arc<str>,
    /// Instance id.
    pub instance: Arc<str>,
    /// Module type.
    pub module: Arc<str>,
    client_handlers: Arc<[String]>,
    login_handlers: Arc<[String]>,
    /// The instance's own bus, for instances outside warren's bus (see [`Router::add_static`]).
    via: Option<Arc<dyn Bus>>,
    sticky: bool,
    watches_sessions: bool,
    /// Sent to the module type's queue group instead of this instance (see
    /// [`Target::is_group`]).
    group: bool,
}

/// A custom router for one module type: from the handler, the caller's session and the request
/// body to the key the module's ring is consulted with (`None`: the default, the session's uid or
/// id). The chat demo keys `Chat` by room name, so a room lives on exactly one instance.
pub type RouteKeyFn = Arc<dyn Fn(&str, Option<&Session>, &[u8]) -> Option<String> + Send + Sync>;

impl std::fmt::Debug for dyn Bus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.kind())
    }
}

impl Target {
    /// A call of `handler` on this target's instance, due by `deadline` (add a session and a
    /// body with [`Call::session`] and [`Call::body`], then [`Router::call`] it).
    pub fn call(&self, handler: &str, deadline: Instant) -> Call {
        Call::new(self.instance.clone(), handler, deadline)
    }

    /// Whether the module registered `handler` as client-visible.
    pub fn is_client_handler(&self, handler: &str) -> bool {
        self.client_handlers.iter().any(|h| h == handler)
    }

    /// Whether the module registered `handler` as callable before login
    /// (`ModuleBuilder::login_handler`).
    pub fn is_login_handler(&self, handler: &str) -> bool {
        self.login_handlers.iter().any(|h| h == handler)
    }

    /// Whether the call goes to the module type's queue group, where the broker hands it to
    /// whichever instance's node takes it first (`ModuleConfig::queue_group`): `node` and
    /// `instance` then name only one of the instances that may take it.
    pub fn is_group(&self) -> bool {
        self.group
    }
}

#[derive(Debug, Default)]
struct Table {
    by_module: HashMap<Arc<str>, Vec<Target>>,
    by_instance: HashMap<Arc<str>, Target>,
    /// Per module type: the ring over its instance ids, and normalized id → target.
    rings: HashMap<Arc<str>, Members>,
    /// Per module type and normalized tag: the ring over the instances carrying the tag.
    tag_rings: HashMap<(Arc<str>, String), Members>,
    /// Instances that want session-closed notices.
    watchers: Vec<Target>,
    /// Module types whose every instance takes calls from the type's queue group.
    groups: std::collections::HashSet<Arc<str>>,
}

/// A ring over some instances, and normalized instance id → target.
type Members = (Ring, HashMap<String, Target>);
/// The registry's last view, and the static instances with their buses.
type Views = (Arc<Vec<NodeRecord>>, Vec<(NodeRecord, Arc<dyn Bus>)>);
/// (session id, module type) → instance id.
type StickyMap = HashMap<(Arc<str>, Arc<str>), Arc<str>>;

fn ring_of(v: &[Target]) -> Members {
    let ring = Ring::with_members(v.iter().map(|x| &*x.instance));
    let ids = v
        .iter()
        .map(|x| (normalize(&x.instance), x.clone()))
        .collect();
    (ring, ids)
}

/// Routes calls to module instances over a [`Bus`].
pub struct Router {
    bus: Arc<dyn Bus>,
    /// This node's id and its in-process bus: calls to local instances skip the `Bus` trait.
    local: Option<(Arc<str>, Arc<LocalBus>)>,
    table: ArcSwap<Table>,
    /// The registry's last view, and instances added by [`Router::add_static`].
    nodes: Mutex<Views>,
    key_fns: RwLock<HashMap<String, RouteKeyFn>>,
    /// Sticky choices: (session, module type) → instance id.
    sticky: Mutex<StickyMap>,
    /// Bumped whenever a resolution may change (the table, a custom key): what a connection's
    /// cached resolution is checked against.
    generation: std::sync::atomic::AtomicU64,
}

impl std::fmt::Debug for Router {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Router")
            .field("bus", &self.bus.kind())
            .finish_non_exhaustive()
    }
}

impl Router {
    /// A router with an empty table.
    pub fn new(bus: Arc<dyn Bus>) -> Self {
        Router {
            bus,
            local: None,
            table: ArcSwap::from_pointee(Table::default()),
            nodes: Default::default(),
            key_fns: Default::default(),
            sticky: Default::default(),
            generation: Default::default(),
        }
    }

    /// A router that delivers calls for instances of node `node` through `local` directly and
    /// everything else through `bus`.
    pub fn with_local(bus: Arc<dyn Bus>, node: &str, local: Arc<LocalBus>) -> Self {
        Router {
            bus,
            local: Some((node.into(), local)),
            table: ArcSwap::from_pointee(Table::default()),
            nodes: Default::default(),
            key_fns: Default::default(),
            sticky: Default::default(),
            generation: Default::default(),
        }
    }

    /// Add the instances of `node`, which the registry does not list, reached through `bus`
    /// (for example mqant servers over RabbitMQ, docs/cluster.md). They stay until the router is
    /// dropped.
    pub fn add_static(&self, node: NodeRecord, bus: Arc<dyn Bus>) {
        let live = {
            let mut g = self.nodes.lock();
            g.1.push((node, bus));
            g.0.clone()
        };
        self.refresh(&live);
    }

    /// Rebuild the routing table from the registry's live nodes.
    pub fn refresh(&self, nodes: &[NodeRecord]) {
        let statics = {
            let mut g = self.nodes.lock();
            g.0 = Arc::new(nodes.to_vec());
            g.1.clone()
        };
        let mut t = Table::default();
        let mut grouped_modules = std::collections::HashSet::new();
        let mut ungrouped = std::collections::HashSet::new();
        let all = nodes
            .iter()
            .map(|n| (n, None))
            .chain(statics.iter().map(|(n, b)| (n, Some(b.clone()))));
        for (n, via) in all {
            let node: Arc<str> = n.id.as_str().into();
            for i in &n.instances {
                if via.is_some() && t.by_instance.contains_key(i.id.as_str()) {
                    // a peer instance that a warren node also registers (it serves the mqant
                    // format as well): the registry's entry, over warren's own bus, is the one
                    continue;
                }
                let target = Target {
                    node: node.clone(),
                    instance: i.id.as_str().into(),
                    module: i.module.as_str().into(),
                    client_handlers: i.client_handlers.clone().into(),
                    login_handlers: i.login_handlers.clone().into(),
                    via: via.clone(),
                    sticky: i.sticky,
                    watches_sessions: i.watches_sessions,
                    group: false,
                };
                let grouped = i.queue_group && via.is_none();
                if target.watches_sessions {
                    t.watchers.push(target.clone());
                }
                for tag in &i.tags {
                    let tag = normalize(tag);
                    if !tag.is_empty() {
                        t.tag_rings
                            .entry((target.module.clone(), tag))
                            .or_insert_with(|| (Ring::default(), HashMap::default()))
                            .1
                            .insert(normalize(&target.instance), target.clone());
                    }
                }
                if grouped {
                    grouped_modules.insert(target.module.clone());
                } else {
                    ungrouped.insert(target.module.clone());
                }
                t.by_module
                    .entry(target.module.clone())
                    .or_default()
                    .push(target.clone());
                t.by_instance.insert(target.instance.clone(), target);
            }
        }
        // a type shares through its group only when every instance takes from it
        t.groups = grouped_modules
            .into_iter()
            .filter(|m| !ungrouped.contains(m))
            .collect();
        for (module, v) in t.by_module.iter_mut() {
            v.sort_by(|a, b| a.instance.cmp(&b.instance));
            t.rings.insert(module.clone(), ring_of(v));
        }
        for (ring, ids) in t.tag_rings.values_mut() {
            let mut v: Vec<Target> = ids.values().cloned().collect();
            v.sort_by(|a, b| a.instance.cmp(&b.instance));
            *ring = ring_of(&v).0;
        }
        // sticky choices whose instance left are forgotten: those sessions re-hash
        let live = &t.by_instance;
        self.sticky_map().retain(|_, inst| live.contains_key(inst));
        self.table.store(Arc::new(t));
        self.bump();
    }

    fn sticky_map(&self) -> parking_lot::MutexGuard<'_, StickyMap> {
        self.sticky.lock()
    }

    /// Install a custom router for module type `module` (see [`RouteKeyFn`]).
    pub fn set_route_key(&self, module: &str, f: RouteKeyFn) {
        self.key_fns.write().insert(module.to_owned(), f);
        self.bump();
    }

    fn bump(&self) {
        self.generation
            .fetch_add(1, std::sync::atomic::Ordering::Release);
    }

    /// A number that changes whenever a call could resolve differently than before: the routing
    /// table, the custom keys, or this node's running instances.
    pub(crate) fn generation(&self) -> u64 {
        let local = self.local.as_ref().map_or(0, |(_, l)| l.generation());
        self.generation
            .load(std::sync::atomic::Ordering::Acquire)
            .wrapping_add(local << 32)
    }

    /// Pick the instance for one call from a client or a module: `at` when given, else the
    /// module's custom router or the session's key on the ring, honouring sticky modules.
    pub fn resolve_call(
        &self,
        module: &str,
        at: Option<&str>,
        handler: &str,
        session: Option<&Session>,
        body: &[u8],
    ) -> Result<Target, CallError> {
        self.resolve_call_cacheable(module, at, handler, session, body)
            .map(|(t, _)| t)
    }

    /// [`Router::resolve_call`], and whether the answer holds for any handler and body of the
    /// same module, target and session until [`Router::generation`] changes (no custom key, no
    /// queue group, not sticky): a connection may keep it.
    pub(crate) fn resolve_call_cacheable(
        &self,
        module: &str,
        at: Option<&str>,
        handler: &str,
        session: Option<&Session>,
        body: &[u8],
    ) -> Result<(Target, bool), CallError> {
        if at.is_some() {
            return self.resolve(module, at, "").map(|t| (t, true));
        }
        let custom = self
            .key_fns
            .read()
            .get(module)
            .and_then(|f| f(handler, session, body));
        if let Some(key) = custom {
            return self.resolve(module, None, &key).map(|t| (t, false));
        }
        if self.bus.has_groups() {
            let t = self.table.load();
            if t.groups.contains(module)
                && let Some(first) = t.by_module.get(module).and_then(|v| v.first())
            {
                return Ok((
                    Target {
                        group: true,
                        ..first.clone()
                    },
                    false,
                ));
            }
        }
        let key = session.map_or("", Session::hash_key);
        let target = self.resolve(module, None, key)?;
        if let (true, Some(s)) = (target.sticky, session) {
            let k = (s.id.clone(), target.module.clone());
            let chosen = self.sticky_map().get(&k).cloned();
            if let Some(inst) = chosen
                && let Some(t) = self.table.load().by_instance.get(&inst)
            {
                return Ok((t.clone(), false));
            }
            self.sticky_map().insert(k, target.instance.clone());
            return Ok((target, false));
        }
        let cacheable = !self.key_fns.read().contains_key(module);
        Ok((target, cacheable))
    }

    /// Pick an instance of `module` carrying `tag`, by `key` on that tag's ring.
    pub fn resolve_tagged(&self, module: &str, tag: &str, key: &str) -> Result<Target, CallError> {
        let t = self.table.load();
        let (ring, ids) = t
            .tag_rings
            .get(&(Arc::from(module), normalize(tag)))
            .ok_or_else(|| CallError::ServiceNotFound(format!("{module}#{tag}")))?;
        ring.get(key)
            .and_then(|id| ids.get(id))
            .cloned()
            .ok_or_else(|| CallError::ServiceNotFound(format!("{module}#{tag}")))
    }

    /// Forget a closed session's sticky choices.
    pub fn forget_session(&self, session: &str) {
        self.sticky_map().retain(|(s, _), _| &**s != session);
    }

    /// Every instance, on any node, that asked to hear about closed sessions.
    pub fn session_watchers(&self) -> Vec<Target> {
        self.table.load().watchers.clone()
    }

    /// Whether any live instance of the module type exists.
    pub fn has_module(&self, module: &str) -> bool {
        self.table.load().by_module.contains_key(module)
    }

    /// Pick the instance for a call.
    pub fn resolve(&self, module: &str, at: Option<&str>, key: &str) -> Result<Target, CallError> {
        let t = self.table.load();
        let not_found = || CallError::ServiceNotFound(module.to_owned());
        if let Some(at) = at {
            if let Some(target) = t.by_instance.get(at) {
                return if &*target.module == module {
                    Ok(target.clone())
                } else {
                    Err(not_found())
                };
            }
            let on_node = t
                .by_module
                .get(module)
                .and_then(|v| v.iter().find(|x| &*x.node == at));
            return on_node.cloned().ok_or_else(not_found);
        }
        let all = t.by_module.get(module).ok_or_else(not_found)?;
        if all.len() == 1 {
            return Ok(all[0].clone());
        }
        let (ring, ids) = t.rings.get(module).ok_or_else(not_found)?;
        ring.get(key)
            .and_then(|id| ids.get(id))
            .cloned()
            .ok_or_else(not_found)
    }

    /// Hand `call` to `target`'s instance and get its reply to come. Resolves once the call is
    /// accepted (a caller that awaits its calls in turn keeps their order); the [`Pending`]
    /// resolves to the result, a typed error, or a timeout at the call's deadline.
    pub async fn call(&self, target: &Target, call: Call) -> Result<Pending, CallError> {
        self.dispatch(target, call, true)
            .await?
            .ok_or(CallError::Closed)
    }

    /// Hand `call` to `target`'s instance without waiting for a result (mqant `CallNR`).
    pub async fn call_nr(&self, target: &Target, call: Call) -> Result<(), CallError> {
        self.dispatch(target, call, false).await.map(|_| ())
    }

    async fn dispatch(
        &self,
        target: &Target,
        call: Call,
        reply: bool,
    ) -> Result<Option<Pending>, CallError> {
        if let Some(via) = &target.via {
            return via.send(&target.node, call, reply).await;
        }
        if target.group {
            return self.bus.send_to_group(&target.module, call, reply).await;
        }
        match &self.local {
            Some((node, local)) if *node == target.node => local.deliver(call, reply).await,
            _ => self.bus.send(&target.node, call, reply).await,
        }
    }

    /// The running instance behind `target` when it is on this node and reached through this
    /// node's own bus (not a queue group, not a foreign bus): the gate calls it on the
    /// connection's task ([`crate::module`]'s `Instance::call_here`).
    pub(crate) fn local_instance(&self, target: &Target) -> Option<Arc<crate::module::Instance>> {
        if target.via.is_some() || target.group {
            return None;
        }
        match &self.local {
            Some((node, local)) if *node == target.node => local.get(&target.instance),
            _ => None,
        }
    }

    /// The target of one instance id, if it is live.
    pub fn resolve_instance(&self, id: &str) -> Option<Target> {
        self.table.load().by_instance.get(id).cloned()
    }

    /// Every instance of a module type (for broadcasts to all of them).
    pub fn instances(&self, module: &str) -> Vec<Target> {
        self.table
            .load()
            .by_module
            .get(module)
            .cloned()
            .unwrap_or_default()
    }

    /// Every module type with a live instance.
    pub fn modules(&self) -> Vec<Arc<str>> {
        self.table.load().by_module.keys().cloned().collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::module::LocalBus;
    use crate::registry::InstanceRecord;

    fn node(id: &str, inst: &[(&str, &str)]) -> NodeRecord {
        NodeRecord {
            id: id.into(),
            version: "t".into(),
            address: None,
            started_at_ms: 0,
            tags: vec![],
            instances: inst
                .iter()
                .map(|(m, i)| InstanceRecord {
                    module: (*m).into(),
                    id: (*i).into(),
                    ..Default::default()
                })
                .collect(),
        }
    }

    fn inst(m: &str, i: &str, tags: &[&str], sticky: bool) -> InstanceRecord {
        InstanceRecord {
            module: m.into(),
            id: i.into(),
            tags: tags.iter().map(|t| (*t).into()).collect(),
            sticky,
            ..Default::default()
        }
    }

    fn session(id: &str, uid: &str) -> Session {
        Session {
            id: id.into(),
            uid: Some(uid.into()),
            settings: Default::default(),
            remote: "127.0.0.1:1".parse().unwrap(),
            network: crate::session::Network::Tcp,
            protocol: crate::session::Protocol::Mqtt,
            gate: "g".into(),
        }
    }

    fn with(instances: Vec<InstanceRecord>) -> NodeRecord {
        NodeRecord {
            id: "n1".into(),
            instances,
            ..Default::default()
        }
    }

    /// A bus that says it has queue groups (nothing is sent through it here).
    struct Grouping;

    impl Bus for Grouping {
        fn send(
            &self,
            _node: &str,
            _call: Call,
            _reply: bool,
        ) -> futures_util::future::BoxFuture<'_, Result<Option<Pending>, CallError>> {
            Box::pin(std::future::ready(Err(CallError::Closed)))
        }

        fn has_groups(&self) -> bool {
            true
        }

        fn kind(&self) -> &'static str {
            "grouping"
        }
    }

    #[test]
    fn queue_groups_only_when_the_bus_has_them_and_every_instance_takes_part() {
        let grouped = |m: &str, i: &str| InstanceRecord {
            queue_group: true,
            ..inst(m, i, &[], false)
        };
        let view = [with(vec![
            grouped("Work", "w1"),
            grouped("Work", "w2"),
            grouped("Mixed", "m1"),
            inst("Mixed", "m2", &[], false),
        ])];
        let r = Router::new(Arc::new(Grouping));
        r.refresh(&view);
        let s = session("s1", "alice");
        let t = r.resolve_call("Work", None, "h", Some(&s), b"").unwrap();
        assert!(t.is_group(), "all of Work's instances take from the group");
        assert!(
            !r.resolve_call("Work", Some("w2"), "h", None, b"")
                .unwrap()
                .is_group()
        );
        assert!(
            !r.resolve_call("Mixed", None, "h", Some(&s), b"")
                .unwrap()
                .is_group()
        );
        // a bus without groups: the ring decides
        let local = Router::new(Arc::new(LocalBus::default()));
        local.refresh(&view);
        assert!(
            !local
                .resolve_call("Work", None, "h", Some(&s), b"")
                .unwrap()
                .is_group()
        );
    }

    #[test]
    fn a_static_instance_the_registry_also_lists_is_routed_once() {
        let r = Router::new(Arc::new(LocalBus::default()));
        let peer = NodeRecord {
            id: "mqant-peer".into(),
            instances: vec![inst("Login", "Login001", &[], false)],
            ..Default::default()
        };
        r.add_static(peer, Arc::new(LocalBus::default()));
        assert_eq!(&*r.resolve_instance("Login001").unwrap().node, "mqant-peer");
        r.refresh(&[node("n1", &[("Login", "Login001")])]);
        assert_eq!(r.instances("Login").len(), 1, "listed once");
        let t = r.resolve_instance("Login001").unwrap();
        assert_eq!(&*t.node, "n1", "the registry's entry wins");
        // when the node leaves, the peer's entry is back
        r.refresh(&[]);
        assert_eq!(&*r.resolve_instance("Login001").unwrap().node, "mqant-peer");
    }

    #[test]
    fn tags_custom_keys_and_sticky_sessions() {
        let r = Router::new(Arc::new(LocalBus::default()));
        r.refresh(&[with(vec![
            inst("Game", "game1", &["EU"], false),
            inst("Game", "game2", &["us"], false),
            inst("Game", "game3", &["eu"], false),
        ])]);
        // tags are normalized; only tagged instances are candidates
        for key in ["user1", "user2", "user3", "alice", "bob"] {
            let t = r.resolve_tagged("Game", " eu ", key).unwrap();
            assert!(["game1", "game3"].contains(&&*t.instance), "{key}");
        }
        assert_eq!(
            &*r.resolve_tagged("Game", "us", "x").unwrap().instance,
            "game2"
        );
        assert!(r.resolve_tagged("Game", "asia", "x").is_err());

        // a custom router keys by the body; None falls back to the session's key
        r.set_route_key(
            "Game",
            Arc::new(|_h, _s, body: &[u8]| (!body.is_empty()).then(|| "bob".to_owned())),
        );
        let s = session("s1", "user1");
        let by_body = r.resolve_call("Game", None, "h", Some(&s), b"x").unwrap();
        assert_eq!(&*by_body.instance, "game1"); // bob → game1 (docs/cluster.md's ring example)
        let by_uid = r.resolve_call("Game", None, "h", Some(&s), b"").unwrap();
        assert_eq!(&*by_uid.instance, "game2"); // user1 → game2 (the same example)

        // sticky: user1 reaches game1 on {game1, game3}; when game2 joins the ring alone would move
        // it to game2 (the ring example of docs/cluster.md), but it stays on game1 until game1
        // leaves
        let r = Router::new(Arc::new(LocalBus::default()));
        r.refresh(&[with(vec![
            inst("S", "game1", &[], true),
            inst("S", "game3", &[], true),
        ])]);
        let first = r.resolve_call("S", None, "h", Some(&s), b"").unwrap();
        assert_eq!(&*first.instance, "game1");
        r.refresh(&[with(vec![
            inst("S", "game1", &[], true),
            inst("S", "game2", &[], true),
            inst("S", "game3", &[], true),
        ])]);
        assert_eq!(&*r.resolve("S", None, "user1").unwrap().instance, "game2");
        let again = r.resolve_call("S", None, "h", Some(&s), b"").unwrap();
        assert_eq!(&*again.instance, "game1");
        r.refresh(&[with(vec![
            inst("S", "game2", &[], true),
            inst("S", "game3", &[], true),
        ])]);
        let moved = r.resolve_call("S", None, "h", Some(&s), b"").unwrap();
        assert_ne!(&*moved.instance, "game1");
        r.forget_session("s1");
    }

    #[test]
    fn resolves_by_instance_node_and_hash() {
        let r = Router::new(Arc::new(LocalBus::default()));
        r.refresh(&[
            node("n1", &[("Chat", "Chat001"), ("Login", "Login001")]),
            node("n2", &[("Chat", "Chat002")]),
        ]);
        assert_eq!(
            &*r.resolve("Chat", Some("Chat002"), "k").unwrap().instance,
            "Chat002"
        );
        assert_eq!(
            &*r.resolve("Chat", Some("n1"), "k").unwrap().instance,
            "Chat001"
        );
        assert!(r.resolve("Login", Some("Chat001"), "k").is_err());
        assert!(r.resolve("Login", Some("n2"), "k").is_err());
        let a = r.resolve("Chat", None, "alice").unwrap();
        assert_eq!(
            a.instance,
            r.resolve("Chat", None, "alice").unwrap().instance
        );
        assert_eq!(
            r.resolve("Nope", None, "k").unwrap_err().to_string(),
            "Service(type:Nope) not found"
        );
        // without @, the module's ring decides (the ring example of docs/cluster.md, instance ids
        // as members)
        r.refresh(&[node(
            "n1",
            &[("Game", "game1"), ("Game", "game2"), ("Game", "game3")],
        )]);
        for (key, want) in [("user1", "game2"), ("user2", "game3"), ("bob", "game1")] {
            assert_eq!(&*r.resolve("Game", None, key).unwrap().instance, want);
        }
        r.refresh(&[node("n1", &[("Game", "game1"), ("Game", "game3")])]);
        assert_eq!(
            &*r.resolve("Game", None, "user1").unwrap().instance,
            "game1"
        );
        assert_eq!(
            &*r.resolve("Game", None, "user2").unwrap().instance,
            "game3"
        );
    }
}

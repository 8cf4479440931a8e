//! HTTP backend groups: HTTP services grouped by name, kept on a ring while a health probe says
//! they are up, chosen by hash or tag and called with [`reqwest`] (docs/backends.md, "HTTP
//! groups").
//!
//! An HTTP service has no connection to keep: instead each service has a probe task that, every
//! second, opens a TCP connection to its port (waiting at most 3 s) and, when the group has a
//! health path, asks `GET <path>` and wants a 2xx answer. A service joins its group's ring (and
//! its tag's) when the probe first succeeds and leaves it when a probe fails, so a key always
//! goes to a service that answered a moment ago. Discovery is the same `update(group,
//! services)` call as for TCP groups; a service that leaves discovery leaves at once (there is no
//! connection to wait for), and a changed address or port is a new service.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use parking_lot::RwLock;
use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use warren::ring::{Ring, normalize};

use super::{BackendError, ServiceConf};

/// How an [`HttpBackends`] probes and calls its services.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HttpOptions {
    /// Time between two probes of a service (1 s).
    pub probe_every: Duration,
    /// Longest wait for the probe's TCP connection, and for its health answer (3 s).
    pub dial_timeout: Duration,
    /// `GET` this path (for example `/health`) after the port check and want a 2xx; `None`:
    /// the port check alone.
    pub health_path: Option<String>,
    /// Longest wait for a whole call made through [`HttpBackends::client`] (30 s).
    pub request_timeout: Duration,
}

impl Default for HttpOptions {
    fn default() -> Self {
        HttpOptions {
            probe_every: Duration::from_secs(1),
            dial_timeout: Duration::from_secs(3),
            health_path: None,
            request_timeout: Duration::from_secs(30),
        }
    }
}

/// One HTTP service of a group: a cheap handle.
#[derive(Clone)]
pub struct HttpService {
    inner: Arc<HttpInner>,
}

struct HttpInner {
    conf: ServiceConf,
    base: String,
    healthy: AtomicBool,
    cancel: CancellationToken,
}

impl std::fmt::Debug for HttpService {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HttpService")
            .field("conf", &self.inner.conf)
            .field("healthy", &self.is_healthy())
            .finish()
    }
}

impl HttpService {
    fn new(conf: ServiceConf, cancel: CancellationToken) -> Self {
        let base = format!("http://{}", conf.peer());
        HttpService {
            inner: Arc::new(HttpInner {
                conf,
                base,
                healthy: AtomicBool::new(false),
                cancel,
            }),
        }
    }

    /// The service as discovery described it (name, id and tag lowercased and trimmed).
    pub fn conf(&self) -> &ServiceConf {
        &self.inner.conf
    }

    /// The service's id in its group.
    pub fn id(&self) -> &str {
        &self.inner.conf.id
    }

    /// Whether its last probe succeeded (it is then on its group's rings).
    pub fn is_healthy(&self) -> bool {
        self.inner.healthy.load(Ordering::SeqCst)
    }

    /// `http://addr:port` followed by `path` (which should start with `/`).
    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.inner.base)
    }

    fn same(&self, other: &HttpService) -> bool {
        Arc::ptr_eq(&self.inner, &other.inner)
    }
}

#[derive(Default)]
struct HttpGroup {
    services: HashMap<String, HttpService>,
    ring: Ring,
    tags: HashMap<String, Ring>,
}

impl HttpGroup {
    fn ring_remove(&mut self, svc: &HttpService) {
        self.ring.remove(svc.id());
        let tag = &svc.conf().tag;
        if let Some(r) = self.tags.get_mut(tag) {
            r.remove(svc.id());
            if r.is_empty() {
                self.tags.remove(tag);
            }
        }
    }

    fn pick(&self, ring: Option<&Ring>, key: &str) -> Option<HttpService> {
        let id = ring?.get(key)?;
        self.services.get(id).cloned()
    }
}

struct HttpShared {
    client: reqwest::Client,
    options: HttpOptions,
    groups: RwLock<HashMap<String, HttpGroup>>,
    cancel: CancellationToken,
    tracker: TaskTracker,
}

impl HttpShared {
    /// A probe changed its service's health: onto the rings or off them, if it is still the
    /// service of its id.
    fn set_health(&self, svc: &HttpService, healthy: bool) {
        let mut groups = self.groups.write();
        let Some(g) = groups.get_mut(&svc.conf().name) else {
            return;
        };
        if !g.services.get(svc.id()).is_some_and(|s| s.same(svc)) || svc.inner.cancel.is_cancelled()
        {
            return;
        }
        svc.inner.healthy.store(healthy, Ordering::SeqCst);
        if healthy {
            g.ring.add(svc.id());
            let tag = &svc.conf().tag;
            if !tag.is_empty() {
                g.tags.entry(tag.clone()).or_default().add(svc.id());
            }
        } else {
            g.ring_remove(svc);
        }
    }
}

/// HTTP backend groups: a cheap handle. [`shutdown`](HttpBackends::shutdown) stops the probes.
#[derive(Clone)]
pub struct HttpBackends {
    shared: Arc<HttpShared>,
}

impl HttpBackends {
    /// HTTP groups probed and called as `options` says; no group until the first
    /// [`update`](HttpBackends::update). Must be called within a tokio runtime.
    pub fn new(options: HttpOptions) -> Result<Self, BackendError> {
        let client = reqwest::Client::builder()
            .connect_timeout(options.dial_timeout)
            .timeout(options.request_timeout)
            .build()
            .map_err(|e| BackendError::Http(e.to_string()))?;
        Ok(HttpBackends {
            shared: Arc::new(HttpShared {
                client,
                options,
                groups: RwLock::new(HashMap::new()),
                cancel: CancellationToken::new(),
                tracker: TaskTracker::new(),
            }),
        })
    }

    /// The HTTP client calls are made with (connection pool shared by every service).
    pub fn client(&self) -> &reqwest::Client {
        &self.shared.client
    }

    /// Discovery says `group` holds exactly `services` now: a new id is probed in the background
    /// (and joins the ring at its first good probe), a gone id leaves at once, a changed address
    /// or port replaces the service. Records of another group, or without id, address or port,
    /// are skipped with a warning.
    pub fn update(&self, group: &str, services: Vec<ServiceConf>) {
        let shared = &self.shared;
        if shared.cancel.is_cancelled() {
            return;
        }
        let group = normalize(group);
        let mut want: HashMap<String, ServiceConf> = HashMap::with_capacity(services.len());
        for s in services {
            let s = s.normalized();
            if s.name != group || s.id.is_empty() || s.addr.is_empty() || s.port == 0 {
                tracing::warn!(group = %group, service = %s.id, name = %s.name, addr = %s.addr, port = s.port, "http backend record skipped (another group, or no id, address or port)");
                continue;
            }
            want.insert(s.id.clone(), s);
        }
        let mut added = Vec::new();
        let mut closed = Vec::new();
        {
            let mut groups = shared.groups.write();
            let g = groups.entry(group.clone()).or_default();
            let gone: Vec<String> = g
                .services
                .keys()
                .filter(|id| !want.contains_key(*id))
                .cloned()
                .collect();
            for id in gone {
                if let Some(svc) = g.services.remove(&id) {
                    g.ring_remove(&svc);
                    tracing::info!(group = %group, service = %id, "http backend left discovery");
                    closed.push(svc);
                }
            }
            for (id, conf) in want {
                if let Some(old) = g.services.get(&id) {
                    if old.conf().addr == conf.addr && old.conf().port == conf.port {
                        continue;
                    }
                    if let Some(old) = g.services.remove(&id) {
                        g.ring_remove(&old);
                        closed.push(old);
                    }
                }
                tracing::info!(group = %group, service = %id, peer = %conf.peer(), "http backend added");
                let svc = HttpService::new(conf, shared.cancel.child_token());
                g.services.insert(id, svc.clone());
                added.push(svc);
            }
            if g.services.is_empty() {
                groups.remove(&group);
            }
        }
        for svc in closed {
            svc.inner.cancel.cancel();
        }
        for svc in added {
            shared.tracker.spawn(probe(shared.clone(), svc));
        }
    }

    /// Discovery lists every service of every group: each group named is updated with its
    /// records, every other group with none.
    pub fn update_all(&self, services: Vec<ServiceConf>) {
        let mut by_group: HashMap<String, Vec<ServiceConf>> = HashMap::new();
        for s in services {
            by_group.entry(normalize(&s.name)).or_default().push(s);
        }
        let known: HashSet<String> = self.shared.groups.read().keys().cloned().collect();
        for g in known {
            by_group.entry(g).or_default();
        }
        for (g, list) in by_group {
            self.update(&g, list);
        }
    }

    /// Every service of a group (healthy or not), sorted by id.
    pub fn services(&self, group: &str) -> Vec<HttpService> {
        let groups = self.shared.groups.read();
        let mut v: Vec<HttpService> = groups
            .get(&normalize(group))
            .map(|g| g.services.values().cloned().collect())
            .unwrap_or_default();
        v.sort_by(|a, b| a.id().cmp(b.id()));
        v
    }

    /// The ids on a group's ring (its healthy services), sorted.
    pub fn ring_members(&self, group: &str) -> Vec<String> {
        let groups = self.shared.groups.read();
        let mut v: Vec<String> = groups
            .get(&normalize(group))
            .map(|g| g.ring.members().map(str::to_owned).collect())
            .unwrap_or_default();
        v.sort();
        v
    }

    /// The healthy service of a group that owns `key` on the group's ring.
    pub fn service_by_hash(&self, group: &str, key: &str) -> Option<HttpService> {
        let groups = self.shared.groups.read();
        let g = groups.get(&normalize(group))?;
        g.pick(Some(&g.ring), key)
    }

    /// The healthy service with routing tag `tag` that owns `key` on that tag's ring.
    pub fn service_by_tag_and_hash(
        &self,
        group: &str,
        tag: &str,
        key: &str,
    ) -> Option<HttpService> {
        let groups = self.shared.groups.read();
        let g = groups.get(&normalize(group))?;
        g.pick(g.tags.get(&normalize(tag)), key)
    }

    /// A request to `path` on the service that owns `key`, ready to be given a body and sent:
    /// `no service` when the group has no healthy service.
    pub fn request_by_hash(
        &self,
        group: &str,
        key: &str,
        method: reqwest::Method,
        path: &str,
    ) -> Result<reqwest::RequestBuilder, BackendError> {
        let svc = self
            .service_by_hash(group, key)
            .ok_or(BackendError::NoService)?;
        Ok(self.shared.client.request(method, svc.url(path)))
    }

    /// As [`request_by_hash`](HttpBackends::request_by_hash), on the ring of routing tag `tag`.
    pub fn request_by_tag_and_hash(
        &self,
        group: &str,
        tag: &str,
        key: &str,
        method: reqwest::Method,
        path: &str,
    ) -> Result<reqwest::RequestBuilder, BackendError> {
        let svc = self
            .service_by_tag_and_hash(group, tag, key)
            .ok_or(BackendError::NoService)?;
        Ok(self.shared.client.request(method, svc.url(path)))
    }

    /// Stop every probe and forget every group.
    pub async fn shutdown(&self) {
        self.shared.cancel.cancel();
        self.shared.tracker.close();
        self.shared.tracker.wait().await;
        self.shared.groups.write().clear();
    }
}

/// Probe one service until it leaves: its health changes are logged and move it on and off the
/// rings.
async fn probe(shared: Arc<HttpShared>, svc: HttpService) {
    let cancel = svc.inner.cancel.clone();
    let group = svc.conf().name.clone();
    let mut last: Option<bool> = None;
    loop {
        let result = tokio::select! {
            biased;
            _ = cancel.cancelled() => return,
            r = check(&shared, &svc) => r,
        };
        let healthy = result.is_ok();
        if last != Some(healthy) {
            shared.set_health(&svc, healthy);
            match &result {
                Ok(()) => {
                    tracing::info!(group = %group, service = %svc.id(), peer = %svc.conf().peer(), "http backend healthy")
                }
                Err(why) => {
                    metrics::counter!("warren_backend_probe_failures_total", "group" => group.clone()).increment(1);
                    tracing::warn!(group = %group, service = %svc.id(), peer = %svc.conf().peer(), reason = %why, "http backend unhealthy")
                }
            }
            last = Some(healthy);
        }
        tokio::select! {
            biased;
            _ = cancel.cancelled() => return,
            _ = tokio::time::sleep(shared.options.probe_every) => {}
        }
    }
}

/// One probe: the port accepts a connection, and the health path (if any) answers 2xx.
async fn check(shared: &HttpShared, svc: &HttpService) -> Result<(), String> {
    let timeout = shared.options.dial_timeout;
    match tokio::time::timeout(timeout, TcpStream::connect(svc.conf().peer())).await {
        Ok(Ok(_)) => {}
        Ok(Err(e)) => return Err(format!("port check: {e}")),
        Err(_) => return Err(format!("port check: no connection within {timeout:?}")),
    }
    let Some(path) = &shared.options.health_path else {
        return Ok(());
    };
    let answer = shared
        .client
        .get(svc.url(path))
        .timeout(timeout)
        .send()
        .await
        .map_err(|e| format!("GET {path}: {e}"))?;
    if answer.status().is_success() {
        Ok(())
    } else {
        Err(format!("GET {path}: {}", answer.status()))
    }
}

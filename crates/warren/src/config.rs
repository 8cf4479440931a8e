//! One config tree for a node, loaded from TOML and validated before anything starts.
//!
//! Every table rejects unknown keys (a listener those of other protocols: its type is its
//! protocol's, config/listener.rs), every key has a default, and errors name the line, the
//! column and the key, all of them at once ([`Config::load_all`]; config/source.rs reads the
//! positions from the toml crate's spans). `warren print-default-config` prints
//! [`DEFAULT_CONFIG`]; `warren check-config` runs [`Config::load_all_with`].
//!
//! This file holds the top of the tree; config/listener.rs the listeners,
//! config/listen_url.rs the `--listen` URLs, config/security.rs the limits, IP lists and auth,
//! config/source.rs the reading of a file, config/paths.rs the files a config names (relative
//! to the config file's directory), config/reload.rs what SIGHUP reloads.

use std::net::SocketAddr;

use serde::{Deserialize, Serialize};

mod backend;
mod listen_url;
mod listener;
mod log;
mod paths;
mod proxy;
mod reload;
mod security;
mod source;
pub use backend::{
    BackendCodec, BackendConfig, BackendDiscovery, BackendKind, BackendServiceConfig,
};
pub use listen_url::LISTENER_SCHEMES;
pub use listener::{
    COMMON_KEYS, JsonOptions, LineHandler, LineOptions, ListenerConfig, Mode, MqttOptions, Network,
    PROTOCOLS, PomeloOptions, PomeloRpcOptions, Protocol, ProtocolOptions, PythonMsgType,
    RpcFraming, protocol_name,
};
pub use log::{LogConfig, LogFormat};
pub use proxy::{ProxyConfig, RpcRouteConfig};
pub use reload::RELOADABLE;
pub use security::{
    AccessConfig, AuthConfig, HttpAuthConfig, JwtConfig, LimitsConfig, UidConflict, parse_network,
};

/// The whole configuration of one node.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// Node identity and process-wide settings.
    pub node: NodeConfig,
    /// Client listeners (`[[listener]]`).
    #[serde(rename = "listener")]
    pub listeners: Vec<ListenerConfig>,
    /// Module instances (`[[module]]`).
    #[serde(rename = "module")]
    pub modules: Vec<ModuleConfig>,
    /// The web page / HTTP server.
    pub http: HttpConfig,
    /// How calls travel between nodes.
    pub bus: BusConfig,
    /// Where nodes find each other.
    pub registry: RegistryConfig,
    /// TianQinS Redis RPC endpoints (`[[redis_rpc]]`).
    pub redis_rpc: Vec<RedisRpcConfig>,
    /// TCP backend groups this node is a client of (`[[backend]]`, config/backend.rs).
    #[serde(rename = "backend")]
    pub backends: Vec<BackendConfig>,
    /// Module routes served by a backend group (`[[proxy]]`, config/proxy.rs).
    #[serde(rename = "proxy")]
    pub proxies: Vec<ProxyConfig>,
    /// Handlers served by a TianQinS Redis-RPC function (`[[rpc_route]]`, config/proxy.rs).
    #[serde(rename = "rpc_route")]
    pub rpc_routes: Vec<RpcRouteConfig>,
    /// Caps on what clients may make the node hold (`[limits]`).
    pub limits: LimitsConfig,
    /// Node-wide IP allow and deny lists (`[access]`).
    pub access: AccessConfig,
    /// Who may connect (`[auth]`).
    pub auth: AuthConfig,
    /// The admin HTTP API (`[admin]`): off unless `addr` is set.
    pub admin: AdminConfig,
    /// Plugin files: watching and reloading (`[plugins]`).
    pub plugins: PluginsConfig,
    /// The process's log and request traces (`[log]`, config/log.rs).
    pub log: LogConfig,
    /// Node-wide settings of default-mode MQTT (`[mqtt]`).
    pub mqtt: MqttConfig,
    /// The Prometheus metrics of `/metrics` (`[metrics]`).
    pub metrics: MetricsConfig,
}

/// `[metrics]`: whether the node records metrics for `/metrics` (docs/metrics.md). Off, no
/// recorder is installed at all, so what recording costs can be measured against nothing.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MetricsConfig {
    /// Record metrics and serve them at `/metrics`; false: `/metrics` answers 404 and every
    /// metric update is a no-op.
    pub enabled: bool,
    /// Include the process's own figures (resident memory, CPU seconds, open descriptors),
    /// read from `/proc/self` at each scrape.
    pub process: bool,
}

impl Default for MetricsConfig {
    fn default() -> Self {
        MetricsConfig {
            enabled: true,
            process: true,
        }
    }
}

/// `[mqtt]`: what every default-mode MQTT listener of a node shares (docs/protocols/mqtt.md):
/// one broker per node, whatever the number of listeners, so these keys are not per listener.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MqttConfig {
    /// Seconds between two updates of the retained `$SYS/broker/...` statistics topics, as
    /// mosquitto's `sys_interval`; 0 publishes none.
    pub sys_interval: u64,
    /// The file of the durable store (docs/configuration.md, "Durability"): retained messages,
    /// persistent sessions and their queued QoS 1/2 messages kept across restarts, in redb
    /// (crate feature `mqtt-store`). A relative path is relative to the config file's directory.
    /// Unset: all of it lives in memory and a restart forgets it.
    pub store: Option<std::path::PathBuf>,
}

impl Default for MqttConfig {
    fn default() -> Self {
        MqttConfig {
            sys_interval: 10,
            store: None,
        }
    }
}

impl MqttConfig {
    /// Longest `sys_interval`: a day (longer is certainly a typo, and keeps the timer sane).
    pub const MAX_SYS_INTERVAL: u64 = 86_400;

    fn check(&self, p: &mut Problems) {
        if self.sys_interval > Self::MAX_SYS_INTERVAL {
            p.add(
                "mqtt.sys_interval",
                format!(
                    "at most {} seconds (0 turns $SYS off), got {}",
                    Self::MAX_SYS_INTERVAL,
                    self.sys_interval
                ),
            );
        }
        if let Some(path) = &self.store {
            if path.as_os_str().is_empty() {
                p.add("mqtt.store", "must name a file");
            } else if !cfg!(feature = "mqtt-store") {
                p.add(
                    "mqtt.store",
                    "this build has no MQTT store (the warren crate's cargo feature `mqtt-store`)",
                );
            }
        }
    }
}

/// `[node]`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct NodeConfig {
    /// Node id, unique in the cluster.
    pub id: String,
    /// Gate instance id reported to handlers as the session's `Serverid`.
    pub gate_id: String,
    /// How long shutdown waits for in-flight requests before closing connections.
    pub drain_timeout_s: u64,
    /// Default deadline of calls between modules.
    pub call_timeout_s: u64,
    /// Mailbox size of sequential modules.
    pub mailbox: usize,
    /// Runtime worker threads; 0 means one per CPU. Fewer than the CPUs pays when several
    /// processes (gate, module nodes, the broker) share one machine's cores: each worker that
    /// parks and wakes costs a context switch, and on a crowded machine those dominate.
    pub threads: usize,
    /// The process group this node belongs to, mqant's `ProcessID` (its `-pid`): a module entry
    /// with a `process_id` runs only on nodes of that group. Unlike `id` it need not be unique:
    /// several nodes may run the same group's instances. `--process-id` overrides it.
    pub process_id: String,
    /// Module types this node never runs, served by peers (mqant processes, other nodes): their
    /// entries need no implementation here, and calls to them travel over the bus.
    pub remote_types: Vec<String>,
}

impl Default for NodeConfig {
    fn default() -> Self {
        NodeConfig {
            id: "warren".into(),
            gate_id: "Gate001".into(),
            drain_timeout_s: 10,
            call_timeout_s: 10,
            mailbox: 1024,
            threads: 0,
            process_id: DEFAULT_PROCESS_ID.into(),
            remote_types: Vec::new(),
        }
    }
}

/// The process group of a node that names none, as in mqant (`development`).
pub const DEFAULT_PROCESS_ID: &str = "development";

/// How a module runs its handlers (defined with the config, which names it; the module API
/// re-exports it).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Deserialize, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Execution {
    /// One task, mailbox order: handlers never overlap. Keep them short.
    Sequential,
    /// Concurrent across sessions; one session's messages still run one after another, in
    /// order. A handler that does not wait runs on the caller's task.
    #[default]
    Concurrent,
}

/// `[[module]]`: one module instance.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModuleConfig {
    /// Module type (`Chat`).
    #[serde(rename = "type")]
    pub kind: String,
    /// Instance id, unique in the cluster; defaults to `<type>001`.
    #[serde(default)]
    pub id: Option<String>,
    /// Node that runs the instance (ignored by single-process `warren serve`).
    #[serde(default)]
    pub node: Option<String>,
    /// Process group that runs the instance (mqant's `ProcessID`): only nodes whose
    /// `[node] process_id` is this one run it; elsewhere it is a peer's, reached over the bus.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub process_id: Option<String>,
    /// Override the module's execution mode.
    #[serde(default)]
    pub execution: Option<Execution>,
    /// Routing tags: calls asking for a tag go to instances that carry it.
    #[serde(default)]
    pub tags: Vec<String>,
    /// Keep each session on the instance it first reached while both live, even when instances
    /// join (without it only the ring decides, and a join moves some keys).
    #[serde(default)]
    pub sticky: bool,
    /// Share the load of this module type through the bus's queue group (NATS): a call without
    /// `@` goes to whichever instance's node takes it first, not to the one the ring picks.
    /// For stateless modules: such calls keep no per-session order and no instance affinity.
    /// Every instance of the type should say the same; callers use the group only when all do.
    #[serde(default)]
    pub queue_group: bool,
    /// Reach this instance through a broker in a compatible format (`[module.bus]`).
    #[serde(default)]
    pub bus: Option<ModuleBusConfig>,
    /// Settings passed verbatim to the module.
    #[serde(default)]
    pub settings: toml::Table,
    /// The module is a plugin: a `.lua` or `.py` file whose functions are its handlers
    /// (docs/plugins.md); `type` is then any name. A relative path is relative to the config
    /// file's directory (to the working directory for `--module TYPE=PATH`).
    #[serde(default)]
    pub plugin: Option<String>,
    /// Plugin modules: handlers clients may call on every protocol once logged in (a Rust
    /// module's `client_handler`). Unset: clients reach a handler only through an mqant
    /// listener's name prefixes (`HD_`).
    #[serde(default)]
    pub handlers: Option<Vec<String>>,
    /// Plugin modules: handlers clients may call before logging in (a Rust module's
    /// `login_handler`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub login_handlers: Vec<String>,
    /// Plugin modules: what a handler's `msg` is: `text` (default), `bytes` or `json`.
    #[serde(default)]
    pub msg_type: Option<PluginMsgType>,
    /// Plugin modules: Lua states or Python threads of a concurrent module (default 4).
    #[serde(default)]
    pub workers: Option<usize>,
    /// Lua plugin modules: instructions one call may run before it is stopped (default 100
    /// million).
    #[serde(default)]
    pub max_instructions: Option<u64>,
    /// Lua plugin modules: milliseconds one call may run before it is stopped (default: the
    /// node's call timeout).
    #[serde(default)]
    pub time_limit_ms: Option<u64>,
}

/// What a plugin module's handlers receive as `msg` (docs/plugins.md).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PluginMsgType {
    /// A string (Python: `str`, decoded with `surrogateescape`).
    #[default]
    Text,
    /// Python: `bytes`; Lua: a string, as for `text`.
    Bytes,
    /// The body decoded as JSON (a table or dict for an object); a body that is not JSON is
    /// refused before the handler runs.
    Json,
}

/// `[plugins]`: what the node does with the plugin files it loaded (docs/plugins.md).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PluginsConfig {
    /// Watch every loaded plugin file and reload it when it changes (turn it off in
    /// production, where changes go through the admin API or a restart).
    pub watch: bool,
    /// How long a file must stay unchanged before it is reloaded, so an editor's several
    /// writes make one reload.
    pub debounce_ms: u64,
}

impl Default for PluginsConfig {
    fn default() -> Self {
        PluginsConfig {
            watch: true,
            debounce_ms: 200,
        }
    }
}

impl ModuleConfig {
    /// A module entry with defaults.
    pub fn new(kind: &str) -> Self {
        ModuleConfig {
            kind: kind.into(),
            id: None,
            node: None,
            process_id: None,
            execution: None,
            tags: Vec::new(),
            sticky: false,
            queue_group: false,
            bus: None,
            settings: toml::Table::new(),
            plugin: None,
            handlers: None,
            login_handlers: Vec::new(),
            msg_type: None,
            workers: None,
            max_instructions: None,
            time_limit_ms: None,
        }
    }

    /// A plugin module: type `kind`, its handlers in the file at `path` (`--module TYPE=PATH`).
    pub fn plugin(kind: &str, path: &str) -> Self {
        ModuleConfig {
            plugin: Some(path.into()),
            ..ModuleConfig::new(kind)
        }
    }

    /// Effective instance id.
    pub fn instance_id(&self) -> String {
        self.id
            .clone()
            .unwrap_or_else(|| format!("{}001", self.kind))
    }

    /// A plugin module from the command line: `--module TYPE=PATH`, with the entry's other keys
    /// as a query (`Greeter=greeter.lua?login_handlers=HD_Hello&msg_type=json`): lists
    /// (`handlers`, `login_handlers`, `tags`) comma-separated, `%2C` a literal comma. Read and
    /// checked like a `[[module]]` table; errors name the key as `--module.KEY`.
    pub fn from_arg(kind: &str, spec: &str) -> Result<ModuleConfig, ConfigError> {
        let (path, query) = spec.split_once('?').unwrap_or((spec, ""));
        let mut t = toml::Table::new();
        t.insert("type".into(), kind.into());
        t.insert("plugin".into(), listen_url::percent_decode(path).into());
        for kv in query.split('&').filter(|s| !s.is_empty()) {
            let (k, v) = kv.split_once('=').unwrap_or((kv, "true"));
            let k = listen_url::percent_decode(k);
            if k == "type" || k == "plugin" {
                return Err(ConfigError::invalid(
                    format!("--module.{k}"),
                    "set by the argument itself (TYPE=PATH), not a query parameter",
                ));
            }
            let value = match k.as_str() {
                "handlers" | "login_handlers" | "tags" => toml::Value::Array(
                    v.split(',')
                        .filter(|s| !s.is_empty())
                        .map(|s| listen_url::percent_decode(s).into())
                        .collect(),
                ),
                _ => {
                    let v = listen_url::percent_decode(v);
                    if let Ok(i) = v.parse::<i64>() {
                        toml::Value::Integer(i)
                    } else if let Ok(b) = v.parse::<bool>() {
                        toml::Value::Boolean(b)
                    } else {
                        toml::Value::String(v)
                    }
                }
            };
            t.insert(k, value);
        }
        let mut root = toml::Table::new();
        root.insert("module".into(), toml::Value::Array(vec![t.into()]));
        let on_flag = |e: ConfigError| match e {
            ConfigError::Invalid { key, why, .. } => {
                ConfigError::invalid(key.replacen("module[0]", "--module", 1), why)
            }
            other => other,
        };
        let text = toml::to_string(&root)
            .map_err(|e| ConfigError::invalid("--module", format!("{kind}={spec}: {e}")))?;
        let config = Config::from_toml_all(&text).map_err(|e| on_flag(first(e)))?;
        let m =
            config.modules.into_iter().next().ok_or_else(|| {
                ConfigError::invalid("--module", format!("{kind}={spec}: no module"))
            })?;
        let mut p = Problems::default();
        m.check_plugin("--module", &mut p);
        match p.0.into_iter().next() {
            Some(e) => Err(e),
            None => Ok(m),
        }
    }

    /// Record the problems of the plugin keys, under `key` (`module[0]`): a plugin needs a type
    /// that can be a route's module, and the plugin options need a plugin.
    fn check_plugin(&self, key: &str, p: &mut Problems) {
        match self.plugin.as_deref() {
            Some(path) => {
                if path.trim().is_empty() {
                    p.add(format!("{key}.plugin"), "must name a file");
                }
                if self.kind.is_empty() || self.kind.contains(['/', '@', ' ', '.']) {
                    p.add(
                        format!("{key}.type"),
                        format!(
                            "{:?} cannot name a module in a route (no `/`, `@`, `.` or spaces)",
                            self.kind
                        ),
                    );
                }
                if self.workers == Some(0) {
                    p.add(format!("{key}.workers"), "must be at least 1");
                }
                if self.max_instructions == Some(0) {
                    p.add(format!("{key}.max_instructions"), "must be at least 1");
                }
                if self.time_limit_ms == Some(0) {
                    p.add(format!("{key}.time_limit_ms"), "must be at least 1");
                }
            }
            None => {
                let set = [
                    ("handlers", self.handlers.is_some()),
                    ("login_handlers", !self.login_handlers.is_empty()),
                    ("msg_type", self.msg_type.is_some()),
                    ("workers", self.workers.is_some()),
                    ("max_instructions", self.max_instructions.is_some()),
                    ("time_limit_ms", self.time_limit_ms.is_some()),
                ];
                for (k, _) in set.into_iter().filter(|(_, on)| *on) {
                    p.add(
                        format!("{key}.{k}"),
                        "applies to plugin modules: set plugin too",
                    );
                }
            }
        }
    }

    /// Settings as JSON, as modules receive them.
    pub fn settings_json(&self) -> serde_json::Value {
        serde_json::to_value(&self.settings).unwrap_or(serde_json::Value::Null)
    }
}

/// `[http]`: the web page and its `config.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HttpConfig {
    /// Serve the page at all.
    pub enabled: bool,
    /// Bind address.
    pub addr: String,
}

impl Default for HttpConfig {
    fn default() -> Self {
        HttpConfig {
            enabled: true,
            addr: "127.0.0.1:8080".into(),
        }
    }
}

/// `[admin]`: the admin HTTP API, through which an operator lists and reloads plugins and
/// replaces a handler at run time (docs/configuration.md). It is never reachable through a
/// client listener, and it is off unless `addr` is set.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AdminConfig {
    /// Where the admin API listens; unset: nowhere. A port alone (`9090` or `:9090`) binds
    /// 127.0.0.1, so an address reachable from elsewhere is always written out in full.
    pub addr: Option<String>,
    /// The bearer token every admin request must carry (`Authorization: Bearer <token>`).
    /// Required when `addr` is not a loopback address.
    pub token: Option<String>,
}

impl AdminConfig {
    /// The address to bind: `None` when the admin API is off, an error when `addr` is not an
    /// address. A port alone means 127.0.0.1 (not every interface, unlike a listener's `:3563`).
    pub fn socket_addr(&self) -> Option<Result<SocketAddr, String>> {
        let addr = self.addr.as_deref()?;
        let port_only = addr.strip_prefix(':').unwrap_or(addr);
        if !port_only.is_empty() && port_only.bytes().all(|b| b.is_ascii_digit()) {
            return Some(
                port_only
                    .parse::<u16>()
                    .map(|p| SocketAddr::from(([127, 0, 0, 1], p)))
                    .map_err(|_| format!("{addr:?}: the port must be at most 65535")),
            );
        }
        Some(addr.parse::<SocketAddr>().map_err(|_| {
            format!("{addr:?} is not an address like 127.0.0.1:9090 (or a port alone: 9090)")
        }))
    }

    fn check(&self, p: &mut Problems) {
        if let Some(Ok(a)) = self.socket_addr()
            && !a.ip().to_canonical().is_loopback()
            && self.token.as_deref().is_none_or(str::is_empty)
        {
            p.add(
                "admin.token",
                format!(
                    "the admin API on {a} is reachable from other hosts: set a token (or bind \
                     127.0.0.1)"
                ),
            );
        }
        if self.token.as_deref().is_some_and(|t| t.trim().is_empty()) {
            p.add("admin.token", "must not be empty");
        }
    }
}

/// `[bus]`: how calls travel between nodes.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct BusConfig {
    /// `local` (in-process, one node), `nats://host:4222`, `redis://host:6379/0` or
    /// `amqp://user:pass@host:5672/%2f`. `warren serve|node --bus URL` overrides it.
    pub url: String,
    /// Name prefix of the broker subjects, lists and queues, so several clusters can share one
    /// broker.
    pub prefix: String,
}

impl Default for BusConfig {
    fn default() -> Self {
        BusConfig {
            url: "local".into(),
            prefix: "warren".into(),
        }
    }
}

impl BusConfig {
    /// Whether calls stay in this process.
    pub fn is_local(&self) -> bool {
        self.url.is_empty() || self.url == "local"
    }
}

/// `[registry]`: where nodes find each other.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RegistryConfig {
    /// `memory` (this process only), `nats://host:4222` (JetStream KV), `redis://host:6379/0`
    /// (the gobase layout, docs/cluster.md) or `etcd://host:2379`. `--registry URL` overrides
    /// it. Empty: the bus's URL when the bus is NATS or Redis, else `memory`.
    pub url: String,
    /// Name of the registry's key, bucket or prefix (the gobase `key`).
    pub key: String,
    /// A node that has not refreshed its record for this long is dead (NATS KV, etcd; the gobase
    /// layout has its fixed 8 s).
    pub ttl_s: u64,
    /// Which gobase layout a `redis://` registry uses ([`REGISTRY_LAYOUTS`]): `gobase`, the
    /// seed era's (scores in ms), or `gobase-seconds`, what gobase writes today. A `?layout=`
    /// on the URL wins. Peers of one layout do not see peers of the other.
    pub layout: String,
    /// `host[:port]` this node announces to its peers in its registry record (a gobase member's
    /// address and port), for NAT and containers where the bound address is not the one others
    /// reach. Unset: the first listener's bound address and port (docs/cluster.md).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub advertise_addr: Option<String>,
}

/// The names `[registry] layout` takes, the default first (docs/cluster.md, "The gobase
/// layouts").
pub const REGISTRY_LAYOUTS: [&str; 2] = ["gobase", "gobase-seconds"];

impl Default for RegistryConfig {
    fn default() -> Self {
        RegistryConfig {
            url: String::new(),
            key: "warren".into(),
            ttl_s: 3,
            layout: REGISTRY_LAYOUTS[0].into(),
            advertise_addr: None,
        }
    }
}

/// Split `host[:port]` (`[v6]:port`, or a bare IPv6 address) as `advertise_addr` takes it; the
/// reason when it is not one: an empty host, a character a gobase member cannot hold (`&`,
/// whitespace, `/`, `,`), or a port that is not 1-65535.
pub fn parse_advertise_addr(s: &str) -> Result<(String, Option<u16>), String> {
    let bare = s.trim_start_matches('[').trim_end_matches(']');
    let (host, port) = if let Ok(sa) = s.parse::<SocketAddr>() {
        (sa.ip().to_string(), Some(sa.port()))
    } else if bare.parse::<std::net::IpAddr>().is_ok() {
        (bare.to_owned(), None)
    } else if let Some((h, p)) = s.rsplit_once(':') {
        let p = p
            .parse::<u16>()
            .map_err(|_| format!("{s:?}: the port {p:?} is not a number from 1 to 65535"))?;
        (h.trim_matches(['[', ']']).to_owned(), Some(p))
    } else {
        (s.to_owned(), None)
    };
    if host.is_empty() {
        return Err(format!("{s:?}: expected host[:port]"));
    }
    if let Some(c) = host
        .chars()
        .find(|c| c.is_whitespace() || matches!(c, '&' | '/' | ',' | ':' | '[' | ']'))
        .filter(|_| host.parse::<std::net::IpAddr>().is_err())
    {
        return Err(format!("{s:?}: the host may not contain {c:?}"));
    }
    if port == Some(0) {
        return Err(format!(
            "{s:?}: port 0 is not reachable (leave the port out to announce the first listener's)"
        ));
    }
    Ok((host, port))
}

impl RegistryConfig {
    /// The registry URL to use given the bus URL (see [`RegistryConfig::url`]).
    pub fn effective_url(&self, bus: &BusConfig) -> String {
        if !self.url.is_empty() {
            return self.url.clone();
        }
        if bus.url.starts_with("nats://") || bus.url.starts_with("redis://") {
            bus.url.clone()
        } else {
            "memory".into()
        }
    }
}

/// `[module.bus]`: a module instance reached through a broker in a compatible wire format rather
/// than warren's own, so peers of the original system can call it or serve it. Today: RabbitMQ
/// in mqant's format (docs/cluster.md), from a `server.conf` module's `Rabbitmq` object.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModuleBusConfig {
    /// `amqp`.
    pub kind: String,
    /// `mqant`.
    #[serde(default = "mqant")]
    pub mode: String,
    /// Broker URL.
    pub uri: String,
    /// Exchange the instance's queue is bound to.
    pub exchange: String,
    /// Its type (`direct`).
    #[serde(default = "direct")]
    pub exchange_type: String,
    /// The instance's queue.
    pub queue: String,
    /// Binding key of the queue (callers publish with it).
    pub binding_key: String,
    /// Consumer tag.
    #[serde(default)]
    pub consumer_tag: String,
}

fn mqant() -> String {
    "mqant".into()
}

fn direct() -> String {
    "direct".into()
}

/// `[[redis_rpc]]`: the TianQinS Redis RPC (docs/cluster.md). Functions called on `topic` run
/// the handlers of `module` on this node; [`RedisRpcConfig`] is also how this node calls peers.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RedisRpcConfig {
    /// `redis://host:port`.
    pub url: String,
    /// This process's topic (list and channel).
    #[serde(default = "rpc_topic")]
    pub topic: String,
    /// Redis database of the lists (TianQinS peers use 1).
    #[serde(default)]
    pub db: i64,
    /// Own pid for the broadcast filter; default: the node id.
    #[serde(default)]
    pub pid: Option<String>,
    /// Module type whose handlers the functions name.
    pub module: String,
    /// `publish` (Go peers) or `list` (the Python pymodule).
    #[serde(default = "publish")]
    pub reply: String,
    /// Caller topics answered by list whatever `reply` says.
    #[serde(default)]
    pub reply_via_list: Vec<String>,
}

fn rpc_topic() -> String {
    "rpc".into()
}

fn publish() -> String {
    "publish".into()
}

/// Why a config was refused.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum ConfigError {
    /// The TOML did not parse (a syntax error), or the mqant JSON did not.
    #[error("{}{message}", location(*line, *column))]
    Parse {
        /// 1-based line, if known.
        line: Option<usize>,
        /// 1-based column, if known.
        column: Option<usize>,
        /// What is wrong.
        message: String,
    },
    /// A key does not fit the schema (unknown, wrong type) or its value is out of range or
    /// inconsistent with another.
    #[error("{}{key}: {why}", location(*line, *column))]
    Invalid {
        /// Dotted key path (`listener[0].addr`).
        key: String,
        /// Why it is refused.
        why: String,
        /// 1-based line, if known.
        line: Option<usize>,
        /// 1-based column, if known.
        column: Option<usize>,
    },
}

impl ConfigError {
    /// An error about the key at a dotted path, not yet placed in a file.
    pub fn invalid(key: impl Into<String>, why: impl Into<String>) -> ConfigError {
        ConfigError::Invalid {
            key: key.into(),
            why: why.into(),
            line: None,
            column: None,
        }
    }

    /// The same error placed at its key's line and column in the TOML `text` it came from (the
    /// nearest table the file has when the key itself is left at its default). Errors already
    /// placed, or whose text does not parse, are returned unchanged.
    pub fn located_in(self, text: &str) -> ConfigError {
        match source::Source::parse(text) {
            Ok(src) => src.locate(self),
            Err(_) => self,
        }
    }
}

fn location(line: Option<usize>, column: Option<usize>) -> String {
    match (line, column) {
        (Some(l), Some(c)) => format!("{l}:{c}: "),
        (Some(l), None) => format!("{l}: "),
        _ => String::new(),
    }
}

/// The problems validation finds, collected so that all are reported at once.
#[derive(Debug, Default)]
pub(crate) struct Problems(Vec<ConfigError>);

impl Problems {
    /// Record that `key` is wrong and why.
    pub(crate) fn add(&mut self, key: impl Into<String>, why: impl Into<String>) {
        self.0.push(ConfigError::invalid(key, why));
    }
}

impl Config {
    /// Parse TOML text, without the semantic checks of [`Config::validate`]; the first error
    /// ([`Config::load_all`] has them all).
    pub fn from_toml(text: &str) -> Result<Config, ConfigError> {
        Config::from_toml_all(text).map_err(first)
    }

    /// Parse TOML text; every syntax error, or else every key that does not fit the schema
    /// (unknown, of the wrong type, or of another protocol's listener).
    fn from_toml_all(text: &str) -> Result<Config, Vec<ConfigError>> {
        source::Source::parse(text)?
            .deserialize_all(source::Shape::Config)
            .map_err(in_file_order)
    }

    /// Parse and validate, locating errors in the text; the first error.
    pub fn load(text: &str, known_modules: &[&str]) -> Result<Config, ConfigError> {
        Config::load_all(text, known_modules).map_err(first)
    }

    /// Parse and validate, reporting every error, each with its key, line and column: all
    /// syntax errors; else every key that does not fit the schema; else every value that does
    /// not pass [`Config::validate`].
    pub fn load_all(text: &str, known_modules: &[&str]) -> Result<Config, Vec<ConfigError>> {
        Config::load_all_with(text, known_modules, |_| Vec::new())
    }

    /// [`Config::load_all`] with more checks: `more` sees the parsed config and returns what
    /// else is wrong (a module's own settings, files the node reads at start), keyed by dotted
    /// paths like the config's own errors; they are placed in the text and reported with them,
    /// in file order.
    pub fn load_all_with(
        text: &str,
        known_modules: &[&str],
        more: impl FnOnce(&Config) -> Vec<ConfigError>,
    ) -> Result<Config, Vec<ConfigError>> {
        let c = Config::from_toml_all(text)?;
        let src = source::Source::parse(text)?;
        let mut problems = c.problems(known_modules);
        problems.extend(more(&c));
        if problems.is_empty() {
            Ok(c)
        } else {
            Err(in_file_order(
                problems.into_iter().map(|e| src.locate(e)).collect(),
            ))
        }
    }

    /// Check values and cross-references; `known_modules` are the module types this binary has
    /// (empty: any). The first problem ([`Config::problems`] lists them all).
    pub fn validate(&self, known_modules: &[&str]) -> Result<(), ConfigError> {
        match self.problems(known_modules).into_iter().next() {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }

    /// Whether a module entry is a peer's: its type is one of `[node] remote_types`, or it
    /// names a `process_id` other than this node's. Such an entry is never run here, needs no
    /// implementation here, and is reached over the bus (its `[module.bus]` when it has one).
    pub fn is_remote(&self, m: &ModuleConfig) -> bool {
        self.node.remote_types.contains(&m.kind)
            || m.process_id
                .as_ref()
                .is_some_and(|p| *p != self.node.process_id)
    }

    /// Whether this node runs a module entry: it is not a peer's ([`Config::is_remote`]) and
    /// names this node, or no node.
    pub fn runs_here(&self, m: &ModuleConfig) -> bool {
        !self.is_remote(m) && m.node.as_ref().is_none_or(|n| *n == self.node.id)
    }

    /// Every problem [`Config::validate`] finds, each naming its key.
    pub fn problems(&self, known_modules: &[&str]) -> Vec<ConfigError> {
        let mut p = Problems::default();
        self.check(known_modules, &mut p);
        p.0
    }

    fn check(&self, known_modules: &[&str], p: &mut Problems) {
        if self.node.id.is_empty() {
            p.add("node.id", "must not be empty");
        }
        if self.node.gate_id.is_empty() {
            p.add("node.gate_id", "must not be empty");
        }
        if self.node.mailbox == 0 {
            p.add("node.mailbox", "must be at least 1");
        }
        if self.node.process_id.is_empty() {
            p.add("node.process_id", "must not be empty");
        }
        self.limits.check(p);
        self.access.check(p);
        self.auth.check(p);
        self.admin.check(p);
        self.log.check(p);
        self.mqtt.check(p);
        backend::check_all(&self.backends, p);
        let module_types: Vec<&str> = self.modules.iter().map(|m| m.kind.as_str()).collect();
        proxy::check_all(
            &self.proxies,
            &self.rpc_routes,
            &self.backends,
            &module_types,
            !self.redis_rpc.is_empty(),
            p,
        );
        // every address this node binds, to refuse two that the OS would not both grant
        let mut bound: Vec<(String, SocketAddr)> = Vec::new();
        for (i, l) in self.listeners.iter().enumerate() {
            let key = format!("listener[{i}]");
            l.check(&key, p);
            if let Ok(a) = l.socket_addr() {
                bound.push((format!("{key}.addr"), a));
            }
        }
        if self.http.enabled {
            match self.http.addr.parse::<SocketAddr>() {
                Ok(a) => bound.push(("http.addr".into(), a)),
                Err(_) => p.add(
                    "http.addr",
                    format!("{:?} is not an address like 127.0.0.1:8080", self.http.addr),
                ),
            }
        }
        match self.admin.socket_addr() {
            Some(Ok(a)) => bound.push(("admin.addr".into(), a)),
            Some(Err(why)) => p.add("admin.addr", why),
            None => {}
        }
        for (j, later) in bound.iter().enumerate() {
            if let Some(earlier) = bound[..j].iter().find(|(_, b)| binds_overlap(later.1, *b)) {
                // the page comes after the listeners and is often left at its default, not in
                // the file: name the listener (or the admin API), which is
                let ((key, a), (other, b)) = if later.0 == "http.addr" {
                    (earlier, later)
                } else {
                    (later, earlier)
                };
                let why = if a == b {
                    format!("{a} is also {other}")
                } else {
                    format!(
                        "{a} and {other} ({b}) cannot both be bound: an unspecified address \
                         (0.0.0.0, ::) takes its port on every address"
                    )
                };
                p.add(key.clone(), why);
            }
        }
        if self.plugins.debounce_ms == 0 {
            p.add("plugins.debounce_ms", "must be at least 1");
        }
        let mut ids: Vec<String> = Vec::new();
        for (i, m) in self.modules.iter().enumerate() {
            m.check_plugin(&format!("module[{i}]"), p);
            if m.plugin.is_none()
                && !self.is_remote(m)
                && !known_modules.is_empty()
                && !known_modules.contains(&m.kind.as_str())
            {
                let why = match source::closest(&m.kind, known_modules) {
                    Some(k) => format!("unknown module type {:?}, did you mean {k:?}?", m.kind),
                    None => format!(
                        "unknown module type {:?} (this binary has: {})",
                        m.kind,
                        known_modules.join(", ")
                    ),
                };
                p.add(format!("module[{i}].type"), why);
            }
            let id = m.instance_id();
            if ids.contains(&id) {
                p.add(
                    format!("module[{i}].id"),
                    format!("instance id {id:?} is used twice"),
                );
            }
            if m.kind == "Gate" && id == self.node.gate_id {
                p.add(
                    format!("module[{i}].id"),
                    format!(
                        "{id:?} is this node's own gate (node.gate_id): a peer's gate needs another id"
                    ),
                );
            }
            ids.push(id);
            if m.queue_group && (m.sticky || m.bus.is_some()) {
                p.add(
                    format!("module[{i}].queue_group"),
                    "a queue group shares calls among instances: it excludes sticky and [module.bus]",
                );
            }
            if let Some(b) = &m.bus {
                if b.kind != "amqp" || b.mode != "mqant" {
                    p.add(
                        format!("module[{i}].bus.kind"),
                        format!(
                            "only kind = \"amqp\" with mode = \"mqant\" is supported, got kind {:?} mode {:?}",
                            b.kind, b.mode
                        ),
                    );
                }
                if !b.uri.starts_with("amqp://") && !b.uri.starts_with("amqps://") {
                    p.add(
                        format!("module[{i}].bus.uri"),
                        format!("{:?} is not an amqp:// URL", b.uri),
                    );
                }
            }
        }
        let scheme = |u: &str| u.split_once("://").map(|(s, _)| s.to_owned());
        let bus_ok = self.bus.is_local()
            || matches!(
                scheme(&self.bus.url).as_deref(),
                Some("nats" | "redis" | "amqp")
            );
        if !bus_ok {
            p.add(
                "bus.url",
                format!(
                    "{:?}: expected local, nats://HOST:PORT, redis://HOST:PORT[/DB] or amqp://USER:PASS@HOST:PORT/VHOST",
                    self.bus.url
                ),
            );
        }
        let reg = &self.registry.url;
        let shared = matches!(scheme(reg).as_deref(), Some("nats" | "redis" | "etcd"));
        if !reg.is_empty() && reg != "memory" && !shared {
            p.add(
                "registry.url",
                format!("{reg:?}: expected memory, nats://, redis:// or etcd://"),
            );
        } else if bus_ok
            && !self.bus.is_local()
            && self.registry.effective_url(&self.bus) == "memory"
        {
            p.add(
                "registry.url",
                "a remote bus needs a shared registry: nodes in other processes cannot see an in-memory one (nats://, redis:// or etcd://)",
            );
        }
        if self.bus.prefix.is_empty()
            || self
                .bus
                .prefix
                .contains(|c: char| c.is_whitespace() || c == '*' || c == '>')
        {
            p.add(
                "bus.prefix",
                "must be non-empty, without spaces, `*` or `>`",
            );
        }
        if self.registry.ttl_s == 0 {
            p.add("registry.ttl_s", "must be at least 1");
        }
        let url_layout = reg.split_once('?').and_then(|(_, q)| {
            q.split('&')
                .find_map(|kv| kv.strip_prefix("layout="))
                .map(str::to_owned)
        });
        for (key, layout) in [
            ("registry.layout", Some(self.registry.layout.clone())),
            ("registry.url", url_layout),
        ] {
            if let Some(l) = layout.filter(|l| !REGISTRY_LAYOUTS.contains(&l.as_str())) {
                p.add(
                    key,
                    format!(
                        "unknown layout {l:?} (expected {})",
                        REGISTRY_LAYOUTS.join(" or ")
                    ),
                );
            }
        }
        if let Some(a) = &self.registry.advertise_addr
            && let Err(why) = parse_advertise_addr(a)
        {
            p.add("registry.advertise_addr", why);
        }
        for (i, r) in self.redis_rpc.iter().enumerate() {
            if !r.url.starts_with("redis://") {
                p.add(
                    format!("redis_rpc[{i}].url"),
                    format!("{:?} is not a redis:// URL", r.url),
                );
            }
            if r.reply != "publish" && r.reply != "list" {
                p.add(
                    format!("redis_rpc[{i}].reply"),
                    format!("{:?}: expected \"publish\" or \"list\"", r.reply),
                );
            }
        }
    }
}

/// Errors sorted by line and column; those with no place keep their order, after the rest.
fn in_file_order(mut errors: Vec<ConfigError>) -> Vec<ConfigError> {
    errors.sort_by_key(|e| match e {
        ConfigError::Parse { line, column, .. } | ConfigError::Invalid { line, column, .. } => {
            (line.unwrap_or(usize::MAX), column.unwrap_or(0))
        }
    });
    errors
}

fn first(errors: Vec<ConfigError>) -> ConfigError {
    errors.into_iter().next().unwrap_or(ConfigError::Parse {
        line: None,
        column: None,
        message: "invalid config".into(),
    })
}

/// Whether two listening sockets cannot both be bound: the same port and the same address, or
/// an unspecified address (`0.0.0.0`, `::`) that takes the port on every address of its family
/// — and `::`, dual-stack by default on Linux, on IPv4 addresses too. Port 0 (any free port)
/// never conflicts.
pub fn binds_overlap(a: SocketAddr, b: SocketAddr) -> bool {
    if a.port() != b.port() || a.port() == 0 {
        return false;
    }
    let (x, y) = (a.ip().to_canonical(), b.ip().to_canonical());
    let v6_any = |ip: std::net::IpAddr| ip.is_ipv6() && ip.is_unspecified();
    x == y
        || v6_any(x)
        || v6_any(y)
        || (x.is_ipv4() == y.is_ipv4() && (x.is_unspecified() || y.is_unspecified()))
}

/// The commented default configuration `warren print-default-config` prints.
pub const DEFAULT_CONFIG: &str = include_str!("default_config.toml");

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_config_parses_and_validates() {
        let c = Config::load(DEFAULT_CONFIG, &["Login", "Chat"]).unwrap();
        assert_eq!(c.listeners.len(), 2);
        let schemes: Vec<_> = c.listeners.iter().map(ListenerConfig::scheme).collect();
        assert_eq!(schemes, ["mqtt+mqant", "ws+mqant"]);
    }

    #[test]
    fn registry_layout_and_advertise_addr_are_checked() {
        let c = Config::load("", &[]).unwrap();
        assert_eq!(c.registry.layout, "gobase");
        assert_eq!(c.registry.advertise_addr, None);
        let c = Config::load(
            "[registry]\nlayout = \"gobase-seconds\"\nadvertise_addr = \"10.0.0.5:7001\"\n",
            &[],
        )
        .unwrap();
        assert_eq!(c.registry.layout, "gobase-seconds");
        assert_eq!(c.registry.advertise_addr.as_deref(), Some("10.0.0.5:7001"));
        let e = Config::load("[registry]\nlayout = \"gobase2\"\n", &[])
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("registry.layout: unknown layout \"gobase2\""),
            "{e}"
        );
        let e = Config::load("[registry]\nurl = \"redis://h:1/0?layout=ms\"\n", &[])
            .unwrap_err()
            .to_string();
        assert!(e.contains("registry.url: unknown layout \"ms\""), "{e}");
        let e = Config::load("[registry]\nadvertise_addr = \"a&b\"\n", &[])
            .unwrap_err()
            .to_string();
        assert!(e.contains("registry.advertise_addr"), "{e}");
        for (addr, want) in [
            ("10.0.0.5:7001", Ok(("10.0.0.5".into(), Some(7001)))),
            ("host.example", Ok(("host.example".into(), None))),
            ("host.example:9", Ok(("host.example".into(), Some(9)))),
            ("[::1]:9", Ok(("::1".into(), Some(9)))),
            ("::1", Ok(("::1".into(), None))),
            ("[fe80::1]", Ok(("fe80::1".into(), None))),
        ] {
            assert_eq!(parse_advertise_addr(addr), want, "{addr}");
        }
        for bad in ["", ":7001", "h:0", "h:x", "a b", "a&b:1", "h/x"] {
            assert!(parse_advertise_addr(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn the_mqtt_store_key_names_a_file() {
        let c = Config::load("[mqtt]\nstore = \"data/mqtt.redb\"\n", &[]);
        if cfg!(feature = "mqtt-store") {
            let c = c.unwrap();
            assert_eq!(
                c.mqtt.store.as_deref(),
                Some(std::path::Path::new("data/mqtt.redb"))
            );
        } else {
            let e = c.unwrap_err().to_string();
            assert!(
                e.starts_with("2:9: mqtt.store:") && e.contains("mqtt-store"),
                "{e}"
            );
        }
        let e = Config::load("[mqtt]\nstore = \"\"\n", &[])
            .unwrap_err()
            .to_string();
        assert_eq!(e, "2:9: mqtt.store: must name a file");
        assert_eq!(Config::default().mqtt.store, None);
    }

    #[test]
    fn the_sys_interval_is_bounded() {
        let e = Config::load("[mqtt]\nsys_interval = 100000\n", &[])
            .unwrap_err()
            .to_string();
        assert!(
            e.starts_with("2:") && e.contains("mqtt.sys_interval"),
            "{e}"
        );
        let c = Config::load("[mqtt]\nsys_interval = 0\n", &[]).unwrap();
        assert_eq!(c.mqtt.sys_interval, 0);
        assert_eq!(Config::default().mqtt.sys_interval, 10);
    }

    #[test]
    fn unknown_keys_are_refused_with_their_line() {
        let e = Config::from_toml("[node]\nid = \"a\"\nbogus = 1\n").unwrap_err();
        let s = e.to_string();
        assert!(s.starts_with("3:"), "{s}");
        assert!(s.contains("bogus"), "{s}");
        let e = Config::from_toml(
            "[[listener]]\naddr = \"127.0.0.1:1\"\n[[listener]]\nmax_conn = \"many\"\n",
        )
        .unwrap_err()
        .to_string();
        assert!(
            e.starts_with("4:12: listener[1].max_conn: invalid type"),
            "{e}"
        );
    }

    #[test]
    fn semantic_errors_name_key_and_line() {
        let text = "[[listener]]\naddr = \"127.0.0.1:1\"\n\n[[listener]]\nmode = \"mqant\"\naddr = \"nope\"\n";
        let e = Config::load(text, &[]).unwrap_err().to_string();
        assert!(e.starts_with("6:8: listener[1].addr:"), "{e}");
    }

    #[test]
    fn queue_groups_exclude_sticky() {
        let text = "[[module]]\ntype = \"Work\"\nqueue_group = true\nsticky = true\n";
        let e = Config::load(text, &[]).unwrap_err().to_string();
        assert!(e.contains("module[0].queue_group"), "{e}");
        let c = Config::load("[[module]]\ntype = \"Work\"\nqueue_group = true\n", &[]).unwrap();
        assert!(c.modules[0].queue_group);
    }

    #[test]
    fn cluster_urls_are_checked() {
        let e = Config::load("[bus]\nurl = \"kafka://x:1\"\n", &[])
            .unwrap_err()
            .to_string();
        assert!(e.starts_with("2:7: bus.url:"), "{e}");
        let e = Config::load("[registry]\nurl = \"zk://x\"\n", &[])
            .unwrap_err()
            .to_string();
        assert!(e.contains("registry.url"), "{e}");
        let ok = "[bus]\nurl = \"nats://127.0.0.1:4222\"\n[registry]\nurl = \"redis://127.0.0.1:6379/0\"\n";
        let c = Config::load(ok, &[]).unwrap();
        assert_eq!(c.registry.effective_url(&c.bus), "redis://127.0.0.1:6379/0");
        let c = Config::load("[bus]\nurl = \"nats://h:1\"\n", &[]).unwrap();
        assert_eq!(c.registry.effective_url(&c.bus), "nats://h:1");
        let e = Config::load("[bus]\nurl = \"amqp://h:1\"\n", &[]).unwrap_err();
        assert!(e.to_string().contains("shared registry"), "{e}");
    }

    fn all_errors(text: &str) -> Vec<String> {
        Config::load_all(text, &["Login", "Chat", "Echo"])
            .unwrap_err()
            .iter()
            .map(ToString::to_string)
            .collect()
    }

    #[test]
    fn every_schema_error_is_reported_at_its_place() {
        let text = "[node]\nidd = \"a\"\n\n[[listener]]\nadr = \"127.0.0.1:1\"\nmax_conn = \"many\"\n\n[[module]]\nid = \"x\"\n\n[[listener]]\nprotocl = \"mqtt\"\n\n[nod]\n";
        let e = all_errors(text);
        assert_eq!(
            e,
            [
                "2:1: node.idd: unknown key `idd`, did you mean `id`?",
                "5:1: listener[0].adr: unknown key `adr`, did you mean `addr`?",
                "6:12: listener[0].max_conn: invalid type: string \"many\", expected usize",
                "8:1: module[0]: missing field `type`",
                "12:1: listener[1].protocl: unknown key `protocl`, did you mean `protocol`?",
                "14:2: nod: unknown key `nod`, did you mean `node`?",
            ],
            "{e:#?}"
        );
        // nothing close: no list of forty keys either
        let e = all_errors("[[listener]]\nno_such_setting = 1\n");
        assert_eq!(e.len(), 1);
        assert!(
            e[0].starts_with("2:1: listener[0].no_such_setting: unknown key"),
            "{e:?}"
        );
        assert!(e[0].contains("print-default-config"), "{e:?}");
    }

    #[test]
    fn every_syntax_error_is_reported() {
        let e = all_errors("[node]\nid = \n\n[http]\naddr = 127.0.0.1:1\n");
        assert_eq!(e.len(), 2, "{e:#?}");
        assert!(e[0].starts_with("2:"), "{e:?}");
        assert!(e[1].starts_with("5:"), "{e:?}");
    }

    #[test]
    fn every_value_error_is_reported() {
        let text = "[node]\nmailbox = 0\n\n[[listener]]\naddr = \"127.0.0.1:1\"\npush_qos = 2\nmax_conn = 0\nallow = [\"10.0.0.0/8\", \"nope\"]\n\n[[module]]\ntype = \"Chatt\"\n\n[bus]\nurl = \"kafka://x\"\n";
        let e = all_errors(text);
        assert_eq!(
            e,
            [
                "2:11: node.mailbox: must be at least 1",
                "6:12: listener[0].push_qos: must be 0 or 1, got 2",
                "7:12: listener[0].max_conn: must be at least 1",
                "8:24: listener[0].allow[1]: \"nope\" is not a network like 10.0.0.0/8 or an address like 192.0.2.7",
                "11:8: module[0].type: unknown module type \"Chatt\", did you mean \"Chat\"?",
                "14:7: bus.url: \"kafka://x\": expected local, nats://HOST:PORT, redis://HOST:PORT[/DB] or amqp://USER:PASS@HOST:PORT/VHOST",
            ],
            "{e:#?}"
        );
    }

    #[test]
    fn addresses_that_cannot_both_be_bound_are_refused() {
        let conf = |a: &str, b: &str| {
            format!(
                "[http]\nenabled = false\n[[listener]]\naddr = \"{a}\"\n[[listener]]\naddr = \"{b}\"\n"
            )
        };
        for (a, b) in [
            ("127.0.0.1:4000", "0.0.0.0:4000"),
            ("0.0.0.0:4000", "127.0.0.1:4000"),
            (":4000", "127.0.0.1:4000"),
            ("127.0.0.1:4000", "127.0.0.1:4000"),
            ("[::]:4000", "[::1]:4000"),
            ("[::1]:4000", "[::1]:4000"),
            ("[::]:4000", "127.0.0.1:4000"),
            ("0.0.0.0:4000", "[::]:4000"),
        ] {
            let e = all_errors(&conf(a, b));
            assert_eq!(e.len(), 1, "{a} {b}: {e:?}");
            assert!(e[0].starts_with("6:8: listener[1].addr:"), "{a} {b}: {e:?}");
            assert!(e[0].contains("listener[0].addr"), "{e:?}");
        }
        for (a, b) in [
            ("127.0.0.1:4000", "127.0.0.2:4000"),
            ("127.0.0.1:4000", "0.0.0.0:4001"),
            ("[::1]:4000", "0.0.0.0:4000"),
            ("[::1]:4000", "127.0.0.1:4000"),
            ("0.0.0.0:0", "127.0.0.1:0"),
        ] {
            assert!(Config::load(&conf(a, b), &[]).is_ok(), "{a} {b}");
        }
        // the web page binds too
        let text = "[[listener]]\naddr = \"0.0.0.0:8080\"\n";
        let e = all_errors(text);
        assert_eq!(e.len(), 1, "{e:?}");
        assert_eq!(
            e[0],
            "2:8: listener[0].addr: 0.0.0.0:8080 and http.addr (127.0.0.1:8080) cannot both be \
             bound: an unspecified address (0.0.0.0, ::) takes its port on every address"
        );
    }

    #[test]
    fn the_admin_api_binds_localhost_unless_told_and_needs_a_token_beyond_it() {
        let admin = |text: &str| Config::load(text, &[]).map(|c| c.admin);
        let off = admin("").unwrap();
        assert!(off.socket_addr().is_none());
        for port_only in ["[admin]\naddr = \"9090\"\n", "[admin]\naddr = \":9090\"\n"] {
            let a = admin(port_only).unwrap();
            assert_eq!(a.socket_addr(), Some(Ok("127.0.0.1:9090".parse().unwrap())));
        }
        assert!(admin("[admin]\naddr = \"[::1]:9090\"\n").is_ok());
        let e = all_errors("[admin]\naddr = \"0.0.0.0:9090\"\n");
        assert_eq!(e.len(), 1, "{e:?}");
        assert!(
            e[0].starts_with("1:1: admin.token: the admin API on 0.0.0.0:9090"),
            "{e:?}"
        );
        let a = admin("[admin]\naddr = \"0.0.0.0:9090\"\ntoken = \"s3cret\"\n").unwrap();
        assert_eq!(a.token.as_deref(), Some("s3cret"));
        let e = all_errors("[admin]\naddr = \"nope\"\n");
        assert!(
            e[0].starts_with("2:8: admin.addr: \"nope\" is not an address"),
            "{e:?}"
        );
        let e = all_errors("[admin]\naddr = \"99999\"\n");
        assert!(e[0].contains("at most 65535"), "{e:?}");
        let e = all_errors("[admin]\naddr = \"127.0.0.1:9090\"\ntoken = \" \"\n");
        assert!(
            e[0].starts_with("3:9: admin.token: must not be empty"),
            "{e:?}"
        );
        // it binds like the others
        let e = all_errors("[admin]\naddr = \"8080\"\n");
        assert!(
            e[0].starts_with("2:8: admin.addr: 127.0.0.1:8080 is also http.addr"),
            "{e:?}"
        );
    }

    #[test]
    fn plugins_are_modules_of_any_type_and_line_handlers() {
        let text = "[[listener]]\nprotocol = \"line\"\naddr = \"127.0.0.1:1\"\nplugin = \"echo.py\"\npython_msg_type = \"bytes\"\n\n[[module]]\ntype = \"Greeter\"\nplugin = \"greeter.lua\"\nlogin_handlers = [\"HD_Hello\"]\nmsg_type = \"json\"\nworkers = 2\n";
        let c = Config::load(text, &["Login"]).unwrap();
        let line = c.listeners[0].protocol.line().expect("a line listener");
        assert_eq!(line.plugin.as_deref(), Some("echo.py"));
        assert_eq!(line.python_msg_type, Some(PythonMsgType::Bytes));
        let m = &c.modules[0];
        assert_eq!(m.plugin.as_deref(), Some("greeter.lua"));
        assert_eq!(m.login_handlers, ["HD_Hello"]);
        assert_eq!(
            (m.msg_type, m.workers),
            (Some(PluginMsgType::Json), Some(2))
        );
        assert!(c.plugins.watch, "watching is on by default");
        // written back, read back
        let back = Config::load(&toml::to_string(&c).unwrap(), &["Login"]).unwrap();
        assert_eq!(back, c);
        // the plugin options need a plugin; a plugin needs a type that routes can name
        let e = all_errors(
            "[[module]]\ntype = \"Chat\"\nlogin_handlers = [\"HD_X\"]\n\n[[module]]\ntype = \"a/b\"\nplugin = \"x.lua\"\nworkers = 0\n\n[[listener]]\nprotocol = \"line\"\naddr = \"127.0.0.1:1\"\nhandler = \"router\"\nplugin = \"x.lua\"\n\n[[listener]]\nprotocol = \"line\"\naddr = \"127.0.0.1:2\"\npython_msg_type = \"str\"\n\n[plugins]\nwatch = false\ndebounce_ms = 0\n",
        );
        assert_eq!(
            e,
            [
                "3:18: module[0].login_handlers: applies to plugin modules: set plugin too",
                "6:8: module[1].type: \"a/b\" cannot name a module in a route (no `/`, `@`, `.` or spaces)",
                "8:11: module[1].workers: must be at least 1",
                "14:10: listener[0].plugin: a plugin answers the messages itself: it excludes handler = \"router\"",
                "19:19: listener[1].python_msg_type: applies to a listener's plugin: set plugin too",
                "23:15: plugins.debounce_ms: must be at least 1",
            ],
            "{e:#?}"
        );
        let l = ListenerConfig::from_url(
            "line://127.0.0.1:1?plugin=/srv/echo.lua&python_msg_type=bytes",
        )
        .unwrap();
        let o = l.protocol.line().expect("a line listener");
        assert_eq!(o.plugin.as_deref(), Some("/srv/echo.lua"));
        let e = ListenerConfig::from_url("mqtt://127.0.0.1:1?plugin=x.lua").unwrap_err();
        assert!(e.to_string().contains("applies to line listeners"), "{e}");
    }

    #[test]
    fn a_plugin_module_on_the_command_line() {
        let m = ModuleConfig::from_arg("Greeter", "plugins/greeter.lua").unwrap();
        assert_eq!(m, ModuleConfig::plugin("Greeter", "plugins/greeter.lua"));
        let m = ModuleConfig::from_arg(
            "Greeter",
            "g.py?login_handlers=HD_Hello,HD_Bye&msg_type=json&workers=2&execution=sequential&id=G7",
        )
        .unwrap();
        assert_eq!(m.login_handlers, ["HD_Hello", "HD_Bye"]);
        assert_eq!(m.msg_type, Some(PluginMsgType::Json));
        assert_eq!(
            (m.workers, m.execution),
            (Some(2), Some(Execution::Sequential))
        );
        assert_eq!(m.instance_id(), "G7");
        let e = |spec: &str| {
            ModuleConfig::from_arg("Greeter", spec)
                .unwrap_err()
                .to_string()
        };
        assert!(
            e("g.lua?worker=2")
                .starts_with("--module.worker: unknown key `worker`, did you mean `workers`?"),
            "{}",
            e("g.lua?worker=2")
        );
        assert!(
            e("g.lua?workers=0").starts_with("--module.workers: must be at least 1"),
            "{}",
            e("g.lua?workers=0")
        );
        assert!(
            e("g.lua?msg_type=xml").starts_with("--module.msg_type: unknown variant `xml`"),
            "{}",
            e("g.lua?msg_type=xml")
        );
        assert!(e("g.lua?plugin=x.lua").starts_with("--module.plugin: set by the argument"));
        assert!(
            e("").starts_with("--module.plugin: must name a file"),
            "{}",
            e("")
        );
    }

    #[test]
    fn errors_are_located_after_the_fact() {
        let text = "[[module]]\ntype = \"Chat\"\n\n[[module]]\ntype = \"Login\"\n[module.settings]\nflavour = \"v9\"\n";
        let e =
            ConfigError::invalid("module[1].settings.flavour", "unknown flavour").located_in(text);
        assert_eq!(
            e.to_string(),
            "7:11: module[1].settings.flavour: unknown flavour"
        );
        let e = ConfigError::invalid("module[1]", "bad").located_in(text);
        assert_eq!(e.to_string(), "4:1: module[1]: bad");
        let e = ConfigError::invalid("--listen", "bad").located_in(text);
        assert_eq!(e.to_string(), "--listen: bad");
    }

    #[test]
    fn a_listener_takes_only_its_protocols_keys() {
        let text = "[[listener]]\nprotocol = \"pomelo\"\naddr = \"127.0.0.1:1\"\npubsub = true\nheartbeat_s = 5\n\n[[listener]]\naddr = \"127.0.0.1:2\"\nheartbeat_s = 5\nmax_packet = 4096\n\n[[listener]]\naddr = \"127.0.0.1:3\"\nmax_package = 4096\nmode = \"mqant\"\nprotocol = \"line\"\n";
        let e = all_errors(text);
        assert_eq!(
            e,
            [
                "4:1: listener[0].pubsub: unknown key `pubsub`: it applies to mqtt listeners, not pomelo",
                "9:1: listener[1].heartbeat_s: unknown key `heartbeat_s`: it applies to pomelo listeners, not mqtt",
                "14:1: listener[2].max_package: unknown key `max_package`: it applies to pomelo listeners, not line",
                "15:1: listener[2].mode: unknown key `mode`: it applies to mqtt listeners, not line",
            ],
            "{e:#?}"
        );
        // a key of another protocol close to one of this protocol's: both said
        let e = all_errors("[[listener]]\nmax_package = 4096\n");
        assert_eq!(
            e,
            [
                "2:1: listener[0].max_package: unknown key `max_package`, did you mean `max_packet`? (`max_package` applies to pomelo listeners, not mqtt)"
            ]
        );
        // reported with the other schema errors, in file order
        let e = all_errors("[[listener]]\nprotocol = \"json\"\npush_qos = 0\nbogus = 1\n");
        assert_eq!(e.len(), 2, "{e:?}");
        assert!(
            e[0].starts_with(
                "3:1: listener[0].push_qos: unknown key `push_qos`: it applies to mqtt"
            ),
            "{e:?}"
        );
        assert!(
            e[1].starts_with("4:1: listener[0].bogus: unknown key"),
            "{e:?}"
        );
        // json takes max_packet; a listener's keys may come before its protocol
        let c = Config::load(
            "[[listener]]\nmax_packet = 100\nrequire_login = false\nprotocol = \"json\"\n",
            &[],
        )
        .unwrap();
        let o = c.listeners[0].protocol.json().expect("a JSON listener");
        assert_eq!((o.max_packet, o.require_login), (100, false));
    }

    #[test]
    fn an_unknown_protocol_is_refused_and_its_listener_skipped() {
        let text = "[[listener]]\nprotocol = \"mqttt\"\nheartbeat_s = 5\n\n[[listener]]\nprotocol = \"pomelo\"\naddr = \"127.0.0.1:2\"\nbogus = 1\n";
        let e = all_errors(text);
        assert_eq!(e.len(), 2, "{e:#?}");
        assert!(
            e[0].starts_with(
                "2:12: listener[0].protocol: unknown variant `mqttt`, expected one of"
            ),
            "{e:?}"
        );
        assert!(
            e[1].starts_with("8:1: listener[1].bogus: unknown key"),
            "{e:?}"
        );
        let e = all_errors("[[listener]]\nprotocol = 5\n");
        assert_eq!(e.len(), 1, "{e:#?}");
        assert!(
            e[0].starts_with("2:12: listener[0].protocol: invalid type"),
            "{e:?}"
        );
    }

    #[test]
    fn transport_is_the_old_name_of_network_and_framing() {
        let text = "[http]\nenabled = false\n[[listener]]\ntransport = \"ws\"\naddr = \"127.0.0.1:1\"\n[[listener]]\nprotocol = \"pomelo-rpc\"\ntransport = \"tcp\"\naddr = \"127.0.0.1:2\"\n[[listener]]\nnetwork = \"ws\"\nmode = \"mqant\"\naddr = \"127.0.0.1:3\"\n";
        let c = Config::load(text, &[]).unwrap();
        let schemes: Vec<_> = c.listeners.iter().map(ListenerConfig::scheme).collect();
        assert_eq!(schemes, ["ws", "pomelo-rpc+tcp", "ws+mqant"]);
        // each protocol's own values: pomelo-rpc frames in mqtt or tcp, MQTT runs on tcp or ws
        let e = all_errors("[[listener]]\nprotocol = \"pomelo-rpc\"\ntransport = \"ws\"\n");
        assert!(
            e[0].starts_with(
                "3:13: listener[0].transport: unknown variant `ws`, expected `mqtt` or `tcp`"
            ),
            "{e:?}"
        );
    }

    #[test]
    fn mqant_mode_defaults() {
        let c = Config::load(
            "[[listener]]\nmode = \"mqant\"\naddr = \":3563\"\n[http]\nenabled = false\n",
            &[],
        )
        .unwrap();
        let l = &c.listeners[0];
        assert!(l.is_mqant());
        assert_eq!(l.protocol.mqtt().map(MqttOptions::max_packet), Some(4096));
        assert_eq!(l.rpc_expired(), std::time::Duration::from_secs(5));
        assert_eq!(l.socket_addr().unwrap().to_string(), "0.0.0.0:3563");
    }

    #[test]
    fn a_written_config_reads_back_the_same() {
        let mut c = Config::load(DEFAULT_CONFIG, &[]).unwrap();
        c.listeners.push(ListenerConfig::new(
            "127.0.0.1:5000",
            ProtocolOptions::Pomelo(PomeloOptions {
                heartbeat_s: 3,
                route_dict: [("Chat.HD_Say".to_owned(), 1)].into(),
                ..PomeloOptions::default()
            }),
        ));
        c.listeners.push(
            ListenerConfig::from_url("pomelo-rpc+tcp://127.0.0.1:5001?service_map=s:Echo").unwrap(),
        );
        c.listeners
            .push(ListenerConfig::from_url("line://127.0.0.1:5002?handler=router").unwrap());
        let text = toml::to_string(&c).unwrap();
        let back = Config::load(&text, &[]).unwrap_or_else(|e| panic!("{e}\n{text}"));
        assert_eq!(back, c);
    }

    #[test]
    fn every_shipped_config_loads() {
        let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
        let mut files = vec![root.join("crates/warren/src/default_config.toml")];
        let mut dirs = vec![root.join("examples")];
        while let Some(dir) = dirs.pop() {
            for entry in std::fs::read_dir(&dir).unwrap().flatten() {
                let path = entry.path();
                if path.is_dir() && !path.ends_with("target") {
                    dirs.push(path);
                } else if path.extension().is_some_and(|e| e == "toml")
                    && path.file_name().is_some_and(|n| n != "Cargo.toml")
                {
                    files.push(path);
                }
            }
        }
        assert!(files.len() >= 3, "{files:?}");
        for f in files {
            let text = std::fs::read_to_string(&f).unwrap();
            if let Err(e) = Config::load_all(&text, &[]) {
                panic!("{}: {e:#?}", f.display());
            }
        }
    }
}

//! One config tree for a node, loaded from TOML and validated before anything starts.
//!
//! Every table rejects unknown keys, every key has a default, and errors name the file, the line
//! and the key. `warren print-default-config` prints [`DEFAULT_CONFIG`]; `warren check-config`
//! runs [`Config::from_toml`] and [`Config::validate`].

use std::net::SocketAddr;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::module::Execution;
use crate::session::Transport;

mod security;
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
    /// Caps on what clients may make the node hold (`[limits]`).
    pub limits: LimitsConfig,
    /// Node-wide IP allow and deny lists (`[access]`).
    pub access: AccessConfig,
    /// Who may connect (`[auth]`).
    pub auth: AuthConfig,
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
        }
    }
}

/// Client protocol of a listener.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ListenerProtocol {
    /// MQTT 3.1 / 3.1.1 (docs/protocols/mqtt.md).
    #[default]
    Mqtt,
    /// The pomelo client protocol, raw TCP and WebSocket on one port (docs/protocols/pomelo.md).
    Pomelo,
    /// JSON over WebSocket, TianQinS style (docs/protocols/json-ws.md).
    Json,
    /// The telnet-friendly line framing, ffown style (docs/protocols/line.md).
    Line,
    /// A pomelo-rpc acceptor, so pomelo/pinus servers can call modules
    /// (docs/protocols/pomelo-rpc.md).
    #[serde(rename = "pomelo-rpc")]
    PomeloRpc,
}

/// Behaviour flavour of an MQTT listener.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// Standard MQTT 3.1.1 (client-id takeover, plain publish/subscribe between clients).
    #[default]
    Default,
    /// mqant gate compatibility (docs/protocols/mqtt.md).
    Mqant,
}

/// `[[listener]]`: one address accepting clients.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ListenerConfig {
    /// Client protocol.
    pub protocol: ListenerProtocol,
    /// `tcp` or `ws` (MQTT); `mqtt` (the default) or `tcp` (stream-pkg) for pomelo-rpc. pomelo
    /// serves both TCP and WebSocket on one port; JSON is always WebSocket; line always TCP.
    pub transport: Option<TransportName>,
    /// `default` or `mqant`.
    pub mode: Mode,
    /// Bind address; `:3563` means all interfaces.
    pub addr: String,
    /// Handler name prefixes clients may call in mqant mode.
    pub handler_prefixes: Vec<String>,
    /// QoS of server pushes and replies (0 or 1).
    pub push_qos: u8,
    /// Answer PINGREQ with the old mqant bytes `d2 00`.
    pub pingresp_d2: bool,
    /// Deadline for the first meaningful message of every protocol: MQTT CONNECT, the pomelo
    /// handshake, the JSON-WS login, the pomelo-rpc CONNECT, a line's first message.
    pub connect_timeout_s: u64,
    /// Read deadline when the protocol's keepalive or heartbeat is off (default 600 s; 0: none).
    pub idle_timeout_s: Option<u64>,
    /// Deadline for one socket write.
    pub write_timeout_s: u64,
    /// Largest packet (or WebSocket frame) accepted (mqant: 4096; default mode: 1 MiB).
    pub max_packet: Option<usize>,
    /// Connection cap.
    pub max_conn: usize,
    /// Outbound queue length per connection; a client that lets it fill is disconnected.
    pub write_queue: usize,
    /// Outbound queue bytes per connection; a client that lets it fill is disconnected.
    pub write_queue_bytes: usize,
    /// Requests one connection may have awaiting their handlers; past it, the gate stops
    /// reading from that client until replies come back (backpressure, bounded memory).
    pub max_inflight: usize,
    /// Deadline of client requests (mqant: 5 s; default mode: 10 s).
    pub rpc_expired_s: Option<u64>,
    /// Default mode: deliver publishes to topics that name no module to matching subscribers.
    pub pubsub: bool,
    /// Deadline for the transport handshakes, counted from accept: PROXY header, TLS, the
    /// WebSocket upgrade request.
    #[serde(alias = "ws_handshake_timeout_s")]
    pub handshake_timeout_s: u64,
    /// Messages per second one connection may send (0: no cap); past it, reading pauses.
    pub msg_rate: u32,
    /// Messages one connection may send at once above `msg_rate`.
    pub msg_burst: u32,
    /// Bytes per second one connection may send (0: no cap); past it, reading pauses.
    pub byte_rate: u32,
    /// Bytes one connection may send at once above `byte_rate`.
    pub byte_burst: u32,
    /// When not empty, only these networks may connect to this listener (CIDR or address).
    pub allow: Vec<String>,
    /// Networks that may not connect to this listener; deny wins over allow.
    pub deny: Vec<String>,
    /// Expect a PROXY protocol v1 or v2 header first (behind a load balancer): the address in
    /// it is the client's, for IP lists, per-IP limits and logs.
    pub proxy_protocol: bool,
    /// PEM certificate chain: serve TLS (`mqtts://`, `wss://`, `pomelo+tls://`, …).
    pub tls_cert: Option<String>,
    /// PEM private key of `tls_cert`.
    pub tls_key: Option<String>,
    /// PEM CA certificates: when set, clients must present a certificate signed by one.
    pub tls_client_ca: Option<String>,
    /// Apply the node's `[auth]` checks on this listener (default true).
    pub auth: bool,
    /// Minimum seconds between storage heartbeats of a bound session.
    pub min_hb_storage_s: u64,

    /// pomelo: heartbeat interval announced in the handshake; 0 turns heartbeats off.
    pub heartbeat_s: Option<u64>,
    /// pomelo: disconnect when nothing arrives for this long (default 2 × heartbeat).
    pub heartbeat_timeout_s: Option<u64>,
    /// pomelo: largest package body (default 64 KiB).
    pub max_package: Option<usize>,
    /// pomelo: route compression dictionary sent in the handshake (`route = code`).
    pub route_dict: Option<std::collections::BTreeMap<String, u16>>,

    /// JSON: the first message must be `login` (default true).
    pub require_login: Option<bool>,
    /// JSON: module whose handlers answer calls whose `tpc` names no module (default `global`).
    pub fallback_module: Option<String>,
    /// JSON: send no reply for unknown functions or failed calls, as upstream (default false).
    pub silent_errors: Option<bool>,
    /// JSON: a `Module/Handler` that checks logins: it receives `[guid, md5]` and answers `true`
    /// (or 0) to accept. Unset, every login is accepted (unless the node's auth hook refuses).
    pub login_handler: Option<String>,

    /// line: longest head line (default 64).
    pub max_head: Option<usize>,
    /// line: largest message body (default 65536).
    pub max_body: Option<usize>,
    /// line: consecutive bad heads before the connection closes (default 8).
    pub max_bad_heads: Option<u32>,
    /// line: write `<len> \r\n` with the upstream space (default true).
    pub space_before_crlf: Option<bool>,
    /// line: create channels on first message and report only those (upstream behaviour).
    pub lazy_channels: Option<bool>,
    /// line: `echo` (default) or `router` (bodies are `Module/Handler[/msgid] <json>`).
    pub handler: Option<String>,
    /// line: the first message carries credentials (`user password` or a token), checked by
    /// `[auth]` before anything else is read (default false).
    pub auth_first_line: Option<bool>,

    /// pomelo-rpc: answer CONNECT with CONNACK (default true; upstream never did).
    pub send_connack: Option<bool>,
    /// pomelo-rpc: queue responses and flush them as one JSON array every `interval_ms`.
    pub buffer_msg: Option<bool>,
    /// pomelo-rpc: flush interval (default 50 ms).
    pub interval_ms: Option<u64>,
    /// pomelo-rpc: echo `traceId`, `seqId` and `source` in responses.
    pub trace: Option<bool>,
    /// pomelo-rpc over stream-pkg: largest package (default 1 MiB).
    pub pkg_size: Option<usize>,
    /// pomelo-rpc: namespaces accepted (default `sys` and `user`).
    pub namespaces: Option<Vec<String>>,
    /// pomelo-rpc: service name → module name, for peers whose service names differ.
    pub service_map: Option<std::collections::BTreeMap<String, String>>,
}

fn pick(tls: bool, plain: &'static str, secure: &'static str) -> &'static str {
    if tls { secure } else { plain }
}

/// Transport name in config (`tcp` / `ws`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TransportName {
    /// Plain TCP.
    #[default]
    Tcp,
    /// WebSocket.
    Ws,
    /// MQTT over TCP (pomelo-rpc's default transport).
    Mqtt,
}

impl From<TransportName> for Transport {
    fn from(t: TransportName) -> Self {
        match t {
            TransportName::Tcp | TransportName::Mqtt => Transport::Tcp,
            TransportName::Ws => Transport::Ws,
        }
    }
}

impl Default for ListenerConfig {
    fn default() -> Self {
        ListenerConfig {
            protocol: ListenerProtocol::Mqtt,
            transport: None,
            mode: Mode::Default,
            addr: "127.0.0.1:1883".into(),
            handler_prefixes: vec!["HD_".into(), "Handler_".into()],
            push_qos: 1,
            pingresp_d2: false,
            connect_timeout_s: 10,
            idle_timeout_s: None,
            write_timeout_s: 30,
            max_packet: None,
            max_conn: 20000,
            write_queue: 1024,
            write_queue_bytes: 4 << 20,
            max_inflight: 1024,
            rpc_expired_s: None,
            pubsub: true,
            handshake_timeout_s: 10,
            msg_rate: 0,
            msg_burst: 0,
            byte_rate: 0,
            byte_burst: 0,
            allow: Vec::new(),
            deny: Vec::new(),
            proxy_protocol: false,
            tls_cert: None,
            tls_key: None,
            tls_client_ca: None,
            auth: true,
            min_hb_storage_s: 60,
            heartbeat_s: None,
            heartbeat_timeout_s: None,
            max_package: None,
            route_dict: None,
            require_login: None,
            fallback_module: None,
            silent_errors: None,
            login_handler: None,
            max_head: None,
            max_body: None,
            max_bad_heads: None,
            space_before_crlf: None,
            lazy_channels: None,
            handler: None,
            auth_first_line: None,
            send_connack: None,
            buffer_msg: None,
            interval_ms: None,
            trace: None,
            pkg_size: None,
            namespaces: None,
            service_map: None,
        }
    }
}

impl ListenerConfig {
    /// A listener from a URL such as `mqtt+mqant://127.0.0.1:3563?rpc_expired_s=1` (the
    /// `--listen` flag). Query parameters are listener keys; values are read as integers or
    /// booleans when they look like one.
    pub fn from_url(url: &str) -> Result<ListenerConfig, ConfigError> {
        let bad = |why: String| ConfigError::Invalid {
            key: "--listen".into(),
            why,
            line: None,
        };
        let (scheme, rest) = url
            .split_once("://")
            .ok_or_else(|| bad(format!("{url:?} is not a URL like mqtt://127.0.0.1:1883")))?;
        let (protocol, transport, mode, tls) = match scheme {
            "mqtt" | "tcp" => ("mqtt", "tcp", "default", false),
            "mqtts" | "ssl" => ("mqtt", "tcp", "default", true),
            "mqtt+mqant" => ("mqtt", "tcp", "mqant", false),
            "mqtts+mqant" => ("mqtt", "tcp", "mqant", true),
            "ws" | "mqtt+ws" => ("mqtt", "ws", "default", false),
            "wss" | "mqtt+wss" => ("mqtt", "ws", "default", true),
            "ws+mqant" => ("mqtt", "ws", "mqant", false),
            "wss+mqant" => ("mqtt", "ws", "mqant", true),
            "pomelo" => ("pomelo", "tcp", "default", false),
            "pomelo+tls" => ("pomelo", "tcp", "default", true),
            "json+ws" | "json" => ("json", "ws", "default", false),
            "json+wss" => ("json", "ws", "default", true),
            "line" => ("line", "tcp", "default", false),
            "line+tls" => ("line", "tcp", "default", true),
            "pomelo-rpc" => ("pomelo-rpc", "mqtt", "default", false),
            "pomelo-rpc+tls" => ("pomelo-rpc", "mqtt", "default", true),
            "pomelo-rpc+tcp" => ("pomelo-rpc", "tcp", "default", false),
            "pomelo-rpc+tcp+tls" => ("pomelo-rpc", "tcp", "default", true),
            other => {
                return Err(bad(format!(
                    "unknown scheme {other:?} (expected mqtt, mqtts, mqtt+mqant, mqtts+mqant, ws, \
                     wss, ws+mqant, wss+mqant, pomelo, pomelo+tls, json+ws, json+wss, line, \
                     line+tls, pomelo-rpc, pomelo-rpc+tls, pomelo-rpc+tcp or pomelo-rpc+tcp+tls)"
                )));
            }
        };
        let (authority, query) = rest.split_once('?').unwrap_or((rest, ""));
        let addr = authority.split('/').next().unwrap_or_default();
        let mut t = toml::Table::new();
        t.insert("protocol".into(), protocol.into());
        t.insert("transport".into(), transport.into());
        t.insert("mode".into(), mode.into());
        t.insert("addr".into(), addr.into());
        for kv in query.split('&').filter(|s| !s.is_empty()) {
            let (k, v) = kv.split_once('=').unwrap_or((kv, "true"));
            let v = percent_decode(v);
            let v = v.as_str();
            let value = if let Ok(i) = v.parse::<i64>() {
                toml::Value::Integer(i)
            } else if let Ok(b) = v.parse::<bool>() {
                toml::Value::Boolean(b)
            } else if matches!(k, "handler_prefixes" | "allow" | "deny") {
                toml::Value::Array(v.split(',').map(toml::Value::from).collect())
            } else {
                toml::Value::String(v.to_owned())
            };
            t.insert(k.to_owned(), value);
        }
        let l: ListenerConfig = t
            .try_into()
            .map_err(|e: toml::de::Error| bad(format!("{url}: {}", e.message())))?;
        if tls != l.tls() {
            return Err(bad(if tls {
                format!("{scheme}:// serves TLS: give ?tls_cert=FILE&tls_key=FILE")
            } else {
                format!("tls_cert on {scheme}://: use the TLS scheme (mqtts://, wss://, …)")
            }));
        }
        l.validate("--listen").map_err(|e| match e {
            ConfigError::Invalid { key, why, .. } => bad(format!("{key}: {why}")),
            other => other,
        })?;
        Ok(l)
    }

    /// The listener's URL form (for logs and the startup banner).
    pub fn scheme(&self) -> &'static str {
        let tls = self.tls();
        match (self.protocol, self.transport(), self.mode) {
            (ListenerProtocol::Mqtt, TransportName::Ws, Mode::Default) => pick(tls, "ws", "wss"),
            (ListenerProtocol::Mqtt, TransportName::Ws, Mode::Mqant) => {
                pick(tls, "ws+mqant", "wss+mqant")
            }
            (ListenerProtocol::Mqtt, _, Mode::Mqant) => pick(tls, "mqtt+mqant", "mqtts+mqant"),
            (ListenerProtocol::Mqtt, _, Mode::Default) => pick(tls, "mqtt", "mqtts"),
            (ListenerProtocol::Pomelo, _, _) => pick(tls, "pomelo", "pomelo+tls"),
            (ListenerProtocol::Json, _, _) => pick(tls, "json+ws", "json+wss"),
            (ListenerProtocol::Line, _, _) => pick(tls, "line", "line+tls"),
            (ListenerProtocol::PomeloRpc, TransportName::Tcp, _) => {
                pick(tls, "pomelo-rpc+tcp", "pomelo-rpc+tcp+tls")
            }
            (ListenerProtocol::PomeloRpc, _, _) => pick(tls, "pomelo-rpc", "pomelo-rpc+tls"),
        }
    }

    /// The transport in effect: the configured one, or the protocol's default.
    pub fn transport(&self) -> TransportName {
        self.transport.unwrap_or(match self.protocol {
            ListenerProtocol::Json => TransportName::Ws,
            ListenerProtocol::PomeloRpc => TransportName::Mqtt,
            _ => TransportName::Tcp,
        })
    }

    /// Whether the listener accepts WebSocket upgrades (all of its connections, or, for pomelo,
    /// those that start with an HTTP request).
    pub fn serves_websocket(&self) -> bool {
        match self.protocol {
            ListenerProtocol::Mqtt => self.transport() == TransportName::Ws,
            ListenerProtocol::Json | ListenerProtocol::Pomelo => true,
            ListenerProtocol::Line | ListenerProtocol::PomeloRpc => false,
        }
    }

    /// pomelo heartbeat interval (default 10 s; `None` when off).
    pub fn heartbeat(&self) -> Option<Duration> {
        match self.heartbeat_s.unwrap_or(10) {
            0 => None,
            s => Some(Duration::from_secs(s)),
        }
    }

    /// The bind address, with mqant's `:3563` form meaning all interfaces.
    pub fn socket_addr(&self) -> Result<SocketAddr, String> {
        let a = if self.addr.starts_with(':') {
            format!("0.0.0.0{}", self.addr)
        } else {
            self.addr.clone()
        };
        a.parse()
            .map_err(|_| format!("{:?} is not an address like 127.0.0.1:3563", self.addr))
    }

    /// Effective max packet size.
    pub fn max_packet(&self) -> usize {
        self.max_packet.unwrap_or(match self.mode {
            Mode::Mqant => 4096,
            Mode::Default => 1024 * 1024,
        })
    }

    /// Keys that only one protocol understands, with that protocol, to refuse them elsewhere.
    fn protocol_keys(&self) -> Vec<(&'static str, bool, ListenerProtocol)> {
        use ListenerProtocol::*;
        vec![
            ("heartbeat_s", self.heartbeat_s.is_some(), Pomelo),
            (
                "heartbeat_timeout_s",
                self.heartbeat_timeout_s.is_some(),
                Pomelo,
            ),
            ("max_package", self.max_package.is_some(), Pomelo),
            ("route_dict", self.route_dict.is_some(), Pomelo),
            ("require_login", self.require_login.is_some(), Json),
            ("fallback_module", self.fallback_module.is_some(), Json),
            ("silent_errors", self.silent_errors.is_some(), Json),
            ("login_handler", self.login_handler.is_some(), Json),
            ("max_head", self.max_head.is_some(), Line),
            ("max_body", self.max_body.is_some(), Line),
            ("max_bad_heads", self.max_bad_heads.is_some(), Line),
            ("space_before_crlf", self.space_before_crlf.is_some(), Line),
            ("lazy_channels", self.lazy_channels.is_some(), Line),
            ("handler", self.handler.is_some(), Line),
            ("auth_first_line", self.auth_first_line.is_some(), Line),
            ("send_connack", self.send_connack.is_some(), PomeloRpc),
            ("buffer_msg", self.buffer_msg.is_some(), PomeloRpc),
            ("interval_ms", self.interval_ms.is_some(), PomeloRpc),
            ("trace", self.trace.is_some(), PomeloRpc),
            ("pkg_size", self.pkg_size.is_some(), PomeloRpc),
            ("namespaces", self.namespaces.is_some(), PomeloRpc),
            ("service_map", self.service_map.is_some(), PomeloRpc),
        ]
    }

    /// Effective request deadline.
    pub fn rpc_expired(&self) -> Duration {
        Duration::from_secs(self.rpc_expired_s.unwrap_or(match self.mode {
            Mode::Mqant => 5,
            Mode::Default => 10,
        }))
    }

    /// Effective idle read deadline for clients whose keepalive or heartbeat is off.
    pub fn idle_timeout(&self) -> Option<Duration> {
        match self.idle_timeout_s {
            Some(0) => None,
            Some(s) => Some(Duration::from_secs(s)),
            None => Some(Duration::from_secs(600)),
        }
    }

    /// Whether the listener serves TLS.
    pub fn tls(&self) -> bool {
        self.tls_cert.is_some()
    }

    fn validate(&self, key: &str) -> Result<(), ConfigError> {
        let bad = |k: &str, why: String| {
            Err(ConfigError::Invalid {
                key: format!("{key}.{k}"),
                why,
                line: None,
            })
        };
        if let Err(why) = self.socket_addr() {
            return bad("addr", why);
        }
        for (k, set, proto) in self.protocol_keys() {
            if set && proto != self.protocol {
                return bad(
                    k,
                    format!(
                        "only applies to {proto:?} listeners, not {:?}",
                        self.protocol
                    ),
                );
            }
        }
        let transport_ok = match self.protocol {
            ListenerProtocol::Mqtt => self.transport() != TransportName::Mqtt,
            ListenerProtocol::PomeloRpc => self.transport() != TransportName::Ws,
            // pomelo serves TCP and WebSocket on one port; JSON is WebSocket; line is TCP
            _ => true,
        };
        if !transport_ok {
            return bad(
                "transport",
                format!(
                    "{:?} listeners cannot use {:?}",
                    self.protocol,
                    self.transport()
                ),
            );
        }
        if let Some(h) = &self.login_handler
            && crate::route::Route::parse(h).is_err()
        {
            return bad(
                "login_handler",
                format!("{h:?} is not a route like Login/CheckLogin"),
            );
        }
        if let Some(h) = &self.handler
            && !matches!(h.as_str(), "echo" | "router")
        {
            return bad(
                "handler",
                format!("unknown line handler {h:?} (expected \"echo\" or \"router\")"),
            );
        }
        if self.push_qos > 1 {
            return bad("push_qos", format!("must be 0 or 1, got {}", self.push_qos));
        }
        if let Some(m) = self.max_packet
            && !(16..=268_435_455).contains(&m)
        {
            return bad(
                "max_packet",
                format!("must be between 16 and 268435455, got {m}"),
            );
        }
        if self.write_queue == 0 {
            return bad("write_queue", "must be at least 1".into());
        }
        if self.write_queue_bytes < 1024 {
            return bad(
                "write_queue_bytes",
                format!("must be at least 1024, got {}", self.write_queue_bytes),
            );
        }
        if self.handshake_timeout_s == 0 {
            return bad("handshake_timeout_s", "must be at least 1".into());
        }
        if self.msg_rate > 0 && self.msg_burst == 0 {
            return bad(
                "msg_burst",
                "must be at least 1 when msg_rate is set".into(),
            );
        }
        if self.byte_rate > 0 && (self.byte_burst as usize) < self.max_packet().min(1 << 20) {
            return bad(
                "byte_burst",
                "must hold at least one largest packet (max_packet, up to 1 MiB) when byte_rate is set"
                    .into(),
            );
        }
        for (k, list) in [("allow", &self.allow), ("deny", &self.deny)] {
            if let Err(ConfigError::Invalid { key: _, why, .. }) = security::check_networks(k, list)
            {
                return bad(k, why);
            }
        }
        if self.tls_cert.is_some() != self.tls_key.is_some() {
            return bad(
                if self.tls_cert.is_some() {
                    "tls_key"
                } else {
                    "tls_cert"
                },
                "TLS needs both tls_cert and tls_key".into(),
            );
        }
        if self.tls_client_ca.is_some() && !self.tls() {
            return bad(
                "tls_client_ca",
                "client certificates need TLS (tls_cert and tls_key)".into(),
            );
        }
        if self.max_inflight == 0 {
            return bad("max_inflight", "must be at least 1".into());
        }
        if self.max_conn == 0 {
            return bad("max_conn", "must be at least 1".into());
        }
        if self.connect_timeout_s == 0 {
            return bad("connect_timeout_s", "must be at least 1".into());
        }
        if self.write_timeout_s == 0 {
            return bad("write_timeout_s", "must be at least 1".into());
        }
        if self.rpc_expired_s == Some(0) {
            return bad("rpc_expired_s", "must be at least 1".into());
        }
        if self.mode == Mode::Mqant && self.handler_prefixes.iter().all(|p| p.is_empty()) {
            return bad(
                "handler_prefixes",
                "mqant mode needs at least one non-empty prefix".into(),
            );
        }
        Ok(())
    }
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
}

impl ModuleConfig {
    /// A module entry with defaults.
    pub fn new(kind: &str) -> Self {
        ModuleConfig {
            kind: kind.into(),
            id: None,
            node: None,
            execution: None,
            tags: Vec::new(),
            sticky: false,
            queue_group: false,
            bus: None,
            settings: toml::Table::new(),
        }
    }

    /// Effective instance id.
    pub fn instance_id(&self) -> String {
        self.id
            .clone()
            .unwrap_or_else(|| format!("{}001", self.kind))
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
}

impl Default for RegistryConfig {
    fn default() -> Self {
        RegistryConfig {
            url: String::new(),
            key: "warren".into(),
            ttl_s: 3,
        }
    }
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
    /// The TOML did not parse or did not fit the schema (unknown key, wrong type).
    #[error("{}{message}", location(*line, *column))]
    Parse {
        /// 1-based line, if known.
        line: Option<usize>,
        /// 1-based column, if known.
        column: Option<usize>,
        /// What is wrong, naming the key.
        message: String,
    },
    /// A value is out of range or inconsistent.
    #[error("{}{key}: {why}", location(*line, None))]
    Invalid {
        /// Dotted key path (`listener[0].addr`).
        key: String,
        /// Why it is refused.
        why: String,
        /// 1-based line, if known.
        line: Option<usize>,
    },
}

fn location(line: Option<usize>, column: Option<usize>) -> String {
    match (line, column) {
        (Some(l), Some(c)) => format!("{l}:{c}: "),
        (Some(l), None) => format!("{l}: "),
        _ => String::new(),
    }
}

impl Config {
    /// Parse TOML text (no semantic checks; see [`Config::validate`]).
    pub fn from_toml(text: &str) -> Result<Config, ConfigError> {
        toml::from_str(text).map_err(|e| {
            let (line, column) = e
                .span()
                .map(|s| line_col(text, s.start))
                .map_or((None, None), |(l, c)| (Some(l), Some(c)));
            let message = e.message().trim().to_owned();
            let message = match e.span().and_then(|s| key_at(text, s.start)) {
                Some(key) => format!("{key}: {message}"),
                None => message,
            };
            ConfigError::Parse {
                line,
                column,
                message,
            }
        })
    }

    /// Parse and validate, locating semantic errors in the text.
    pub fn load(text: &str, known_modules: &[&str]) -> Result<Config, ConfigError> {
        let c = Config::from_toml(text)?;
        c.validate(known_modules).map_err(|e| match e {
            ConfigError::Invalid { key, why, .. } => {
                let line = find_line(text, &key);
                ConfigError::Invalid { key, why, line }
            }
            other => other,
        })?;
        Ok(c)
    }

    /// Check values and cross-references; `known_modules` are the module types this binary has.
    pub fn validate(&self, known_modules: &[&str]) -> Result<(), ConfigError> {
        let bad = |key: String, why: String| {
            Err(ConfigError::Invalid {
                key,
                why,
                line: None,
            })
        };
        if self.node.id.is_empty() {
            return bad("node.id".into(), "must not be empty".into());
        }
        if self.node.gate_id.is_empty() {
            return bad("node.gate_id".into(), "must not be empty".into());
        }
        if self.node.mailbox == 0 {
            return bad("node.mailbox".into(), "must be at least 1".into());
        }
        self.limits.validate()?;
        self.access.validate()?;
        self.auth.validate()?;
        let mut addrs = Vec::new();
        for (i, l) in self.listeners.iter().enumerate() {
            l.validate(&format!("listener[{i}]"))?;
            let a = l.socket_addr().map_err(|why| ConfigError::Invalid {
                key: format!("listener[{i}].addr"),
                why,
                line: None,
            })?;
            if a.port() != 0 && addrs.contains(&a) {
                return bad(
                    format!("listener[{i}].addr"),
                    format!("{a} is used by another listener"),
                );
            }
            addrs.push(a);
        }
        if self.http.enabled && self.http.addr.parse::<SocketAddr>().is_err() {
            return bad(
                "http.addr".into(),
                format!("{:?} is not an address like 127.0.0.1:8080", self.http.addr),
            );
        }
        let mut ids = Vec::new();
        for (i, m) in self.modules.iter().enumerate() {
            if !known_modules.is_empty() && !known_modules.contains(&m.kind.as_str()) {
                return bad(
                    format!("module[{i}].type"),
                    format!(
                        "unknown module type {:?} (this binary has: {})",
                        m.kind,
                        known_modules.join(", ")
                    ),
                );
            }
            let id = m.instance_id();
            if ids.contains(&id) {
                return bad(
                    format!("module[{i}].id"),
                    format!("instance id {id:?} is used twice"),
                );
            }
            ids.push(id);
            if m.queue_group && (m.sticky || m.bus.is_some()) {
                return bad(
                    format!("module[{i}].queue_group"),
                    "a queue group shares calls among instances: it excludes sticky and [module.bus]"
                        .into(),
                );
            }
            if let Some(b) = &m.bus {
                if b.kind != "amqp" || b.mode != "mqant" {
                    return bad(
                        format!("module[{i}].bus.kind"),
                        format!(
                            "only kind = \"amqp\" with mode = \"mqant\" is supported, got kind {:?} mode {:?}",
                            b.kind, b.mode
                        ),
                    );
                }
                if !b.uri.starts_with("amqp://") && !b.uri.starts_with("amqps://") {
                    return bad(
                        format!("module[{i}].bus.uri"),
                        format!("{:?} is not an amqp:// URL", b.uri),
                    );
                }
            }
        }
        let scheme = |u: &str| u.split_once("://").map(|(s, _)| s.to_owned());
        if !self.bus.is_local()
            && !matches!(
                scheme(&self.bus.url).as_deref(),
                Some("nats" | "redis" | "amqp")
            )
        {
            return bad(
                "bus.url".into(),
                format!(
                    "{:?}: expected local, nats://HOST:PORT, redis://HOST:PORT[/DB] or amqp://USER:PASS@HOST:PORT/VHOST",
                    self.bus.url
                ),
            );
        }
        let reg = &self.registry.url;
        let shared = matches!(scheme(reg).as_deref(), Some("nats" | "redis" | "etcd"));
        if !reg.is_empty() && reg != "memory" && !shared {
            return bad(
                "registry.url".into(),
                format!("{reg:?}: expected memory, nats://, redis:// or etcd://"),
            );
        }
        if self.bus.prefix.is_empty()
            || self
                .bus
                .prefix
                .contains(|c: char| c.is_whitespace() || c == '*' || c == '>')
        {
            return bad(
                "bus.prefix".into(),
                "must be non-empty, without spaces, `*` or `>`".into(),
            );
        }
        if !self.bus.is_local() && self.registry.effective_url(&self.bus) == "memory" {
            return bad(
                "registry.url".into(),
                "a remote bus needs a shared registry: nodes in other processes cannot see an in-memory one (nats://, redis:// or etcd://)".into(),
            );
        }
        if self.registry.ttl_s == 0 {
            return bad("registry.ttl_s".into(), "must be at least 1".into());
        }
        for (i, r) in self.redis_rpc.iter().enumerate() {
            if !r.url.starts_with("redis://") {
                return bad(
                    format!("redis_rpc[{i}].url"),
                    format!("{:?} is not a redis:// URL", r.url),
                );
            }
            if r.reply != "publish" && r.reply != "list" {
                return bad(
                    format!("redis_rpc[{i}].reply"),
                    format!("{:?}: expected \"publish\" or \"list\"", r.reply),
                );
            }
        }
        Ok(())
    }
}

fn line_col(text: &str, offset: usize) -> (usize, usize) {
    let before = &text[..offset.min(text.len())];
    let line = before.matches('\n').count() + 1;
    let col = before.len() - before.rfind('\n').map_or(0, |p| p + 1) + 1;
    (line, col)
}

/// The dotted key path (`listener[0].max_conn`) of the assignment on the line holding `offset`,
/// so that type errors name their key.
fn key_at(text: &str, offset: usize) -> Option<String> {
    let offset = offset.min(text.len());
    let start = text[..offset].rfind('\n').map_or(0, |p| p + 1);
    let end = text[offset..].find('\n').map_or(text.len(), |p| offset + p);
    let line = text[start..end].trim();
    let key = line
        .split_once('=')
        .map(|(k, _)| k.trim().trim_matches('"'))?;
    if key.is_empty() || key.starts_with('[') {
        return None;
    }
    // the table this line belongs to: the nearest header above, with its index for arrays
    let mut table: Option<String> = None;
    let mut counts: std::collections::HashMap<String, usize> = Default::default();
    for l in text[..start].lines() {
        let t = l.trim();
        if let Some(name) = t
            .strip_prefix("[[")
            .and_then(|r| r.split_once("]]"))
            .map(|(n, _)| n.trim())
        {
            let n = counts.entry(name.to_owned()).or_insert(0);
            table = Some(format!("{name}[{n}]"));
            *n += 1;
        } else if let Some(name) = t
            .strip_prefix('[')
            .and_then(|r| r.split_once(']'))
            .map(|(n, _)| n.trim())
        {
            table = Some(match name.rsplit_once('.') {
                // `[module.settings]` belongs to the latest `[[module]]`
                Some((parent, child)) if counts.contains_key(parent) => {
                    format!("{parent}[{}].{child}", counts[parent] - 1)
                }
                _ => name.to_owned(),
            });
        }
    }
    Some(match table {
        Some(t) => format!("{t}.{key}"),
        None => key.to_owned(),
    })
}

/// Decode `%XX` escapes (and `+` as a space) in a URL query value.
fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'%' => {
                let byte = b
                    .get(i + 1..i + 3)
                    .and_then(|h| std::str::from_utf8(h).ok())
                    .and_then(|h| u8::from_str_radix(h, 16).ok());
                match byte {
                    Some(byte) => {
                        out.push(byte);
                        i += 3;
                    }
                    None => {
                        out.push(b'%');
                        i += 1;
                    }
                }
            }
            b'+' => {
                out.push(b' ');
                i += 1;
            }
            c => {
                out.push(c);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Find the line of a dotted key like `listener[1].addr` in the text: the n-th `[[listener]]`
/// header, then the first line below it assigning that key.
fn find_line(text: &str, key: &str) -> Option<usize> {
    let (table, field) = key.split_once('.')?;
    let (name, index) = match table.split_once('[') {
        Some((n, rest)) => (n, rest.trim_end_matches(']').parse::<usize>().ok()?),
        None => (table, 0),
    };
    let headers = [format!("[[{name}]]"), format!("[{name}]")];
    let mut seen = 0usize;
    let mut inside = false;
    for (no, line) in text.lines().enumerate() {
        let t = line.trim();
        if t.starts_with('[') {
            inside = false;
            if headers.iter().any(|h| t.starts_with(h.as_str())) {
                if seen == index {
                    inside = true;
                }
                seen += 1;
            }
            continue;
        }
        if inside
            && let Some(rest) = t.strip_prefix(field)
            && rest.trim_start().starts_with('=')
        {
            return Some(no + 1);
        }
    }
    None
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
        assert_eq!(c.listeners[0].mode, Mode::Mqant);
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
        assert!(e.starts_with("6: listener[1].addr:"), "{e}");
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
        assert!(e.starts_with("2: bus.url:"), "{e}");
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

    #[test]
    fn listener_urls() {
        let l = ListenerConfig::from_url(
            "mqtt+mqant://127.0.0.1:4000?rpc_expired_s=1&pingresp_d2=true",
        )
        .unwrap();
        assert_eq!(l.mode, Mode::Mqant);
        assert_eq!(l.rpc_expired(), Duration::from_secs(1));
        assert!(l.pingresp_d2);
        assert_eq!(l.max_packet(), 4096);
        let l = ListenerConfig::from_url("ws://0.0.0.0:9001/mqtt").unwrap();
        assert_eq!(l.transport(), TransportName::Ws);
        assert!(ListenerConfig::from_url("mqtt://127.0.0.1:1?bogus=1").is_err());
        let l = ListenerConfig::from_url("json+ws://127.0.0.1:1?login_handler=Debug%2FCheckLogin")
            .unwrap();
        assert_eq!(l.login_handler.as_deref(), Some("Debug/CheckLogin"));
        assert_eq!(percent_decode("a%2"), "a%2");
        assert_eq!(percent_decode("a+b%41"), "a bA");
        assert!(ListenerConfig::from_url("http://127.0.0.1:1").is_err());
        assert!(ListenerConfig::from_url("mqtt://nowhere").is_err());
    }
}

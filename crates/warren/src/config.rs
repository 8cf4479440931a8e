//! One config tree for a node, loaded from TOML and validated before anything starts.
//!
//! Every table rejects unknown keys, a listener refuses the keys of other protocols, every key
//! has a default, and errors name the line, the column and the key, all of them at once
//! ([`Config::load_all`]; config/source.rs reads the positions from the toml crate's spans).
//! `warren print-default-config` prints [`DEFAULT_CONFIG`]; `warren check-config` runs
//! [`Config::load_all_with`].

use std::net::SocketAddr;
use std::time::Duration;

use serde::{Deserialize, Serialize};

mod security;
mod source;
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

impl ListenerProtocol {
    /// Every protocol.
    pub const ALL: [ListenerProtocol; 5] = [
        ListenerProtocol::Mqtt,
        ListenerProtocol::Pomelo,
        ListenerProtocol::Json,
        ListenerProtocol::Line,
        ListenerProtocol::PomeloRpc,
    ];

    /// The protocol a config file names.
    pub fn from_name(name: &str) -> Option<ListenerProtocol> {
        ListenerProtocol::ALL.into_iter().find(|p| p.name() == name)
    }

    /// The name a config file uses (`protocol = "pomelo-rpc"`).
    pub fn name(self) -> &'static str {
        match self {
            ListenerProtocol::Mqtt => "mqtt",
            ListenerProtocol::Pomelo => "pomelo",
            ListenerProtocol::Json => "json",
            ListenerProtocol::Line => "line",
            ListenerProtocol::PomeloRpc => "pomelo-rpc",
        }
    }
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

/// Every `--listen` URL scheme, in the order help texts list them: the plain form, then TLS.
pub const LISTENER_SCHEMES: &[&str] = &[
    "mqtt",
    "mqtts",
    "mqtt+mqant",
    "mqtts+mqant",
    "ws",
    "wss",
    "ws+mqant",
    "wss+mqant",
    "pomelo",
    "pomelo+tls",
    "json+ws",
    "json+wss",
    "line",
    "line+tls",
    "pomelo-rpc",
    "pomelo-rpc+tls",
    "pomelo-rpc+tcp",
    "pomelo-rpc+tcp+tls",
];

/// Scheme names (the first is the one [`LISTENER_SCHEMES`] lists; the others are aliases) and
/// the listener they mean: protocol, transport, mode, TLS.
type Scheme = (
    &'static [&'static str],
    &'static str,
    &'static str,
    &'static str,
    bool,
);

const SCHEMES: &[Scheme] = &[
    (&["mqtt", "tcp"], "mqtt", "tcp", "default", false),
    (&["mqtts", "ssl"], "mqtt", "tcp", "default", true),
    (&["mqtt+mqant"], "mqtt", "tcp", "mqant", false),
    (&["mqtts+mqant"], "mqtt", "tcp", "mqant", true),
    (&["ws", "mqtt+ws"], "mqtt", "ws", "default", false),
    (&["wss", "mqtt+wss"], "mqtt", "ws", "default", true),
    (&["ws+mqant"], "mqtt", "ws", "mqant", false),
    (&["wss+mqant"], "mqtt", "ws", "mqant", true),
    (&["pomelo"], "pomelo", "tcp", "default", false),
    (&["pomelo+tls"], "pomelo", "tcp", "default", true),
    (&["json+ws", "json"], "json", "ws", "default", false),
    (&["json+wss"], "json", "ws", "default", true),
    (&["line"], "line", "tcp", "default", false),
    (&["line+tls"], "line", "tcp", "default", true),
    (&["pomelo-rpc"], "pomelo-rpc", "mqtt", "default", false),
    (&["pomelo-rpc+tls"], "pomelo-rpc", "mqtt", "default", true),
    (&["pomelo-rpc+tcp"], "pomelo-rpc", "tcp", "default", false),
    (
        &["pomelo-rpc+tcp+tls"],
        "pomelo-rpc",
        "tcp",
        "default",
        true,
    ),
];

/// A `--listen` query value as the TOML value its key takes (see
/// [`ListenerConfig::from_url`]).
fn url_value(key: &str, raw: &str) -> Result<toml::Value, String> {
    let list = || -> Vec<String> {
        raw.split(',')
            .filter(|s| !s.is_empty())
            .map(percent_decode)
            .collect()
    };
    let pairs = |example: &str| -> Result<Vec<(String, String)>, String> {
        raw.split(',')
            .filter(|s| !s.is_empty())
            .map(|piece| match piece.split_once(':') {
                Some((k, v)) if !k.is_empty() && !v.is_empty() => {
                    Ok((percent_decode(k), percent_decode(v)))
                }
                _ => Err(format!(
                    "{:?} is not a NAME:VALUE pair (expected a comma-separated list like {example})",
                    percent_decode(piece)
                )),
            })
            .collect()
    };
    let guess = |v: String| {
        if let Ok(i) = v.parse::<i64>() {
            toml::Value::Integer(i)
        } else if let Ok(b) = v.parse::<bool>() {
            toml::Value::Boolean(b)
        } else {
            toml::Value::String(v)
        }
    };
    Ok(match key {
        "handler_prefixes" | "allow" | "deny" | "namespaces" => {
            toml::Value::Array(list().into_iter().map(toml::Value::String).collect())
        }
        "service_map" => toml::Value::Table(
            pairs("service:Echo,chat:Chat")?
                .into_iter()
                .map(|(k, v)| (k, toml::Value::String(v)))
                .collect(),
        ),
        "route_dict" => toml::Value::Table(
            pairs("Chat.HD_Say:1,Login.HD_Login:2")?
                .into_iter()
                .map(|(k, v)| (k, guess(v)))
                .collect(),
        ),
        "protocol" | "transport" | "mode" | "addr" | "fallback_module" | "login_handler"
        | "handler" | "tls_cert" | "tls_key" | "tls_client_ca" => {
            toml::Value::String(percent_decode(raw))
        }
        _ => guess(percent_decode(raw)),
    })
}

/// Listener keys that only some protocols take, with those protocols; every other key applies
/// to all. A config file that sets one of these on another protocol's listener is refused as
/// it is parsed, like an unknown key, rather than the key being silently ignored.
pub const PROTOCOL_ONLY_KEYS: &[(&str, &[ListenerProtocol])] = {
    use ListenerProtocol::*;
    &[
        ("mode", &[Mqtt]),
        ("pingresp_d2", &[Mqtt]),
        ("push_qos", &[Mqtt]),
        ("handler_prefixes", &[Mqtt]),
        ("pubsub", &[Mqtt]),
        ("max_packet", &[Mqtt, Json]),
        ("heartbeat_s", &[Pomelo]),
        ("heartbeat_timeout_s", &[Pomelo]),
        ("max_package", &[Pomelo]),
        ("route_dict", &[Pomelo]),
        ("require_login", &[Json]),
        ("fallback_module", &[Json]),
        ("silent_errors", &[Json]),
        ("login_handler", &[Json]),
        ("max_head", &[Line]),
        ("max_body", &[Line]),
        ("max_bad_heads", &[Line]),
        ("space_before_crlf", &[Line]),
        ("lazy_channels", &[Line]),
        ("handler", &[Line]),
        ("auth_first_line", &[Line]),
        ("send_connack", &[PomeloRpc]),
        ("buffer_msg", &[PomeloRpc]),
        ("interval_ms", &[PomeloRpc]),
        ("trace", &[PomeloRpc]),
        ("pkg_size", &[PomeloRpc]),
        ("namespaces", &[PomeloRpc]),
        ("service_map", &[PomeloRpc]),
    ]
};

/// Why `key` does not belong on a `protocol` listener, if it does not.
fn foreign_key(key: &str, protocol: ListenerProtocol) -> Option<String> {
    let (_, owners) = PROTOCOL_ONLY_KEYS.iter().find(|(k, _)| *k == key)?;
    if owners.contains(&protocol) {
        return None;
    }
    let names: Vec<&str> = owners.iter().map(|p| p.name()).collect();
    Some(format!(
        "only applies to {} listeners, not {}",
        names.join(" and "),
        protocol.name()
    ))
}

/// For a listener table of a parsed file, each key its protocol does not take (the protocol
/// is the table's `protocol` value, `mqtt` when absent): `(key, why)`.
fn foreign_keys<'k>(
    protocol: Option<&str>,
    keys: impl Iterator<Item = &'k str>,
) -> Vec<(&'k str, String)> {
    let protocol = match protocol {
        None => ListenerProtocol::Mqtt,
        Some(name) => match ListenerProtocol::from_name(name) {
            Some(p) => p,
            None => return Vec::new(), // the schema check names the bad protocol
        },
    };
    keys.filter_map(|k| foreign_key(k, protocol).map(|why| (k, why)))
        .collect()
}

fn pick(tls: bool, plain: &'static str, secure: &'static str) -> &'static str {
    if tls { secure } else { plain }
}

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
    /// `--listen` flag; [`LISTENER_SCHEMES`] lists the schemes). Query parameters are listener
    /// keys, read by the key's type: lists (`allow`, `deny`, `handler_prefixes`, `namespaces`)
    /// are comma-separated, maps (`service_map`, `route_dict`) are comma-separated `NAME:VALUE`
    /// pairs (`service_map=service:Echo,chat:Chat`), and other values are integers or booleans
    /// when they look like one. Values are percent-decoded after splitting, so `%2C` and `%3A`
    /// are a literal `,` and `:`.
    ///
    /// Errors name the key as `--listen.KEY` (or `--listen` for the URL itself).
    pub fn from_url(url: &str) -> Result<ListenerConfig, ConfigError> {
        let bad = |why: String| ConfigError::invalid("--listen", why);
        let (scheme, rest) = url
            .split_once("://")
            .ok_or_else(|| bad(format!("{url:?} is not a URL like mqtt://127.0.0.1:1883")))?;
        let Some(&(_, protocol, transport, mode, tls)) =
            SCHEMES.iter().find(|(names, ..)| names.contains(&scheme))
        else {
            return Err(bad(format!(
                "unknown scheme {scheme:?} (expected {})",
                LISTENER_SCHEMES.join(", ")
            )));
        };
        let (authority, query) = rest.split_once('?').unwrap_or((rest, ""));
        let addr = authority.split('/').next().unwrap_or_default();
        let mut t = toml::Table::new();
        t.insert("protocol".into(), protocol.into());
        t.insert("transport".into(), transport.into());
        if protocol == "mqtt" {
            t.insert("mode".into(), mode.into());
        }
        t.insert("addr".into(), addr.into());
        for kv in query.split('&').filter(|s| !s.is_empty()) {
            let (k, v) = kv.split_once('=').unwrap_or((kv, "true"));
            let k = percent_decode(k);
            let value = url_value(&k, v)
                .map_err(|why| ConfigError::invalid(format!("--listen.{k}"), why))?;
            t.insert(k, value);
        }
        // the same checks as a config file's [[listener]], keys named `--listen.KEY`
        let text = toml::to_string(&t).map_err(|e| bad(format!("{url}: {e}")))?;
        let on_flag = |e: ConfigError| match e {
            ConfigError::Invalid { key, why, .. } => {
                ConfigError::invalid(format!("--listen.{key}"), why)
            }
            other => other,
        };
        let l: ListenerConfig = source::Source::parse(&text)
            .and_then(|src| {
                let l = src.deserialize_all()?;
                match src.foreign_listener_keys(true).into_iter().next() {
                    Some(e) => Err(vec![e]),
                    None => Ok(l),
                }
            })
            .map_err(|errors| on_flag(first(errors)))?;
        if tls != l.tls() {
            return Err(bad(if tls {
                format!("{scheme}:// serves TLS: give ?tls_cert=FILE&tls_key=FILE")
            } else {
                format!("tls_cert on {scheme}://: use the TLS scheme (mqtts://, wss://, …)")
            }));
        }
        let mut p = Problems::default();
        l.check("--listen", &mut p);
        match p.0.into_iter().next() {
            Some(e) => Err(e),
            None => Ok(l),
        }
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

    /// The keys of [`PROTOCOL_ONLY_KEYS`] whose value is set (the optional ones), to refuse
    /// them on listeners built in code as a config file's are refused when parsed.
    fn protocol_keys(&self) -> [(&'static str, bool); 23] {
        [
            ("max_packet", self.max_packet.is_some()),
            ("heartbeat_s", self.heartbeat_s.is_some()),
            ("heartbeat_timeout_s", self.heartbeat_timeout_s.is_some()),
            ("max_package", self.max_package.is_some()),
            ("route_dict", self.route_dict.is_some()),
            ("require_login", self.require_login.is_some()),
            ("fallback_module", self.fallback_module.is_some()),
            ("silent_errors", self.silent_errors.is_some()),
            ("login_handler", self.login_handler.is_some()),
            ("max_head", self.max_head.is_some()),
            ("max_body", self.max_body.is_some()),
            ("max_bad_heads", self.max_bad_heads.is_some()),
            ("space_before_crlf", self.space_before_crlf.is_some()),
            ("lazy_channels", self.lazy_channels.is_some()),
            ("handler", self.handler.is_some()),
            ("auth_first_line", self.auth_first_line.is_some()),
            ("send_connack", self.send_connack.is_some()),
            ("buffer_msg", self.buffer_msg.is_some()),
            ("interval_ms", self.interval_ms.is_some()),
            ("trace", self.trace.is_some()),
            ("pkg_size", self.pkg_size.is_some()),
            ("namespaces", self.namespaces.is_some()),
            ("service_map", self.service_map.is_some()),
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

    /// Record every problem of this listener, its keys under `key` (`listener[0]`).
    fn check(&self, key: &str, p: &mut Problems) {
        let mut bad = |k: &str, why: String| p.add(format!("{key}.{k}"), why);
        if let Err(why) = self.socket_addr() {
            bad("addr", why);
        }
        for (k, set) in self.protocol_keys() {
            if let Some(why) = set.then(|| foreign_key(k, self.protocol)).flatten() {
                bad(k, why);
            }
        }
        let transport_ok = match self.protocol {
            ListenerProtocol::Mqtt => self.transport() != TransportName::Mqtt,
            ListenerProtocol::PomeloRpc => self.transport() != TransportName::Ws,
            // pomelo serves TCP and WebSocket on one port; JSON is WebSocket; line is TCP
            _ => true,
        };
        if !transport_ok {
            bad(
                "transport",
                format!(
                    "{} listeners cannot use {:?}",
                    self.protocol.name(),
                    self.transport()
                ),
            );
        }
        if let Some(h) = &self.login_handler
            && crate::route::Route::parse(h).is_err()
        {
            bad(
                "login_handler",
                format!("{h:?} is not a route like Login/CheckLogin"),
            );
        }
        if let Some(h) = &self.handler
            && !matches!(h.as_str(), "echo" | "router")
        {
            bad(
                "handler",
                format!("unknown line handler {h:?} (expected \"echo\" or \"router\")"),
            );
        }
        if self.push_qos > 1 {
            bad("push_qos", format!("must be 0 or 1, got {}", self.push_qos));
        }
        if let Some(m) = self.max_packet
            && !(16..=268_435_455).contains(&m)
        {
            bad(
                "max_packet",
                format!("must be between 16 and 268435455, got {m}"),
            );
        }
        if self.write_queue == 0 {
            bad("write_queue", "must be at least 1".into());
        }
        if self.write_queue_bytes < 1024 {
            bad(
                "write_queue_bytes",
                format!("must be at least 1024, got {}", self.write_queue_bytes),
            );
        }
        if self.handshake_timeout_s == 0 {
            bad("handshake_timeout_s", "must be at least 1".into());
        }
        if self.msg_rate > 0 && self.msg_burst == 0 {
            bad(
                "msg_burst",
                "must be at least 1 when msg_rate is set".into(),
            );
        }
        if self.byte_rate > 0 && (self.byte_burst as usize) < self.max_packet().min(1 << 20) {
            bad(
                "byte_burst",
                "must hold at least one largest packet (max_packet, up to 1 MiB) when byte_rate is set"
                    .into(),
            );
        }
        for (k, list) in [("allow", &self.allow), ("deny", &self.deny)] {
            for (i, n) in list.iter().enumerate() {
                if let Err(why) = security::check_network(n) {
                    bad(&format!("{k}[{i}]"), why);
                }
            }
        }
        if self.tls_cert.is_some() != self.tls_key.is_some() {
            bad(
                if self.tls_cert.is_some() {
                    "tls_key"
                } else {
                    "tls_cert"
                },
                "TLS needs both tls_cert and tls_key".into(),
            );
        }
        if self.tls_client_ca.is_some() && !self.tls() {
            bad(
                "tls_client_ca",
                "client certificates need TLS (tls_cert and tls_key)".into(),
            );
        }
        if self.max_inflight == 0 {
            bad("max_inflight", "must be at least 1".into());
        }
        if self.max_conn == 0 {
            bad("max_conn", "must be at least 1".into());
        }
        if self.connect_timeout_s == 0 {
            bad("connect_timeout_s", "must be at least 1".into());
        }
        if self.write_timeout_s == 0 {
            bad("write_timeout_s", "must be at least 1".into());
        }
        if self.rpc_expired_s == Some(0) {
            bad("rpc_expired_s", "must be at least 1".into());
        }
        if self.mode == Mode::Mqant && self.handler_prefixes.iter().all(|p| p.is_empty()) {
            bad(
                "handler_prefixes",
                "mqant mode needs at least one non-empty prefix".into(),
            );
        }
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
        let src = source::Source::parse(text)?;
        let parsed = src.deserialize_all::<Config>();
        let mut foreign = src.foreign_listener_keys(false);
        match parsed {
            Ok(c) if foreign.is_empty() => Ok(c),
            Ok(_) => Err(in_file_order(foreign)),
            Err(mut errors) => {
                foreign.retain(|f| !errors.contains(f));
                errors.extend(foreign);
                Err(in_file_order(errors))
            }
        }
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
        self.limits.check(p);
        self.access.check(p);
        self.auth.check(p);
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
        for (j, later) in bound.iter().enumerate() {
            if let Some(earlier) = bound[..j].iter().find(|(_, b)| binds_overlap(later.1, *b)) {
                // the page comes last and is often left at its default, not in the file: name
                // the listener, which is
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
        let mut ids: Vec<String> = Vec::new();
        for (i, m) in self.modules.iter().enumerate() {
            if !known_modules.is_empty() && !known_modules.contains(&m.kind.as_str()) {
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
    fn maps_and_lists_in_listener_urls() {
        let l = ListenerConfig::from_url(
            "pomelo-rpc://127.0.0.1:1?service_map=service:Echo,chat:Chat&namespaces=sys,user,game",
        )
        .unwrap();
        let map = l.service_map.unwrap();
        assert_eq!(map.get("service").map(String::as_str), Some("Echo"));
        assert_eq!(map.get("chat").map(String::as_str), Some("Chat"));
        assert_eq!(l.namespaces.unwrap(), ["sys", "user", "game"]);
        let l = ListenerConfig::from_url(
            "pomelo://127.0.0.1:1?route_dict=Chat.HD_Say:1,Login.HD_Login:2",
        )
        .unwrap();
        let dict = l.route_dict.unwrap();
        assert_eq!(dict.get("Chat.HD_Say"), Some(&1));
        assert_eq!(dict.get("Login.HD_Login"), Some(&2));
        // a literal comma or colon is percent-encoded
        let l =
            ListenerConfig::from_url("pomelo-rpc://127.0.0.1:1?service_map=a%3Ab:Echo").unwrap();
        assert!(l.service_map.unwrap().contains_key("a:b"));
        let e = ListenerConfig::from_url("pomelo-rpc://127.0.0.1:1?service_map=Echo")
            .unwrap_err()
            .to_string();
        assert!(
            e.starts_with("--listen.service_map: \"Echo\" is not a NAME:VALUE pair"),
            "{e}"
        );
        // strings stay strings even when they look like numbers
        let l = ListenerConfig::from_url("json+ws://127.0.0.1:1?fallback_module=123").unwrap();
        assert_eq!(l.fallback_module.as_deref(), Some("123"));
    }

    #[test]
    fn listener_url_errors_have_one_prefix() {
        let e = |url: &str| ListenerConfig::from_url(url).unwrap_err().to_string();
        assert_eq!(
            e("line://127.0.0.1:1?handler=nope"),
            "--listen.handler: unknown line handler \"nope\" (expected \"echo\" or \"router\")"
        );
        assert_eq!(
            e("mqtt://127.0.0.1:1?max_con=5"),
            "--listen.max_con: unknown key `max_con`, did you mean `max_conn`?"
        );
        assert_eq!(
            e("mqtt://127.0.0.1:1?max_conn=many"),
            "--listen.max_conn: invalid type: string \"many\", expected usize"
        );
        assert_eq!(
            e("mqtt://127.0.0.1:1?heartbeat_s=5"),
            "--listen.heartbeat_s: only applies to pomelo listeners, not mqtt"
        );
        assert!(e("gopher://127.0.0.1:1").starts_with("--listen: unknown scheme \"gopher\""));
        for scheme in LISTENER_SCHEMES {
            let tls =
                if scheme.contains("tls") || scheme.contains("mqtts") || scheme.contains("wss") {
                    "?tls_cert=c.pem&tls_key=k.pem"
                } else {
                    ""
                };
            let l = ListenerConfig::from_url(&format!("{scheme}://127.0.0.1:1{tls}"))
                .unwrap_or_else(|e| panic!("{scheme}: {e}"));
            assert_eq!(l.scheme(), *scheme);
        }
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
        let text = "[[listener]]\nprotocol = \"pomelo\"\naddr = \"127.0.0.1:1\"\npubsub = true\nheartbeat_s = 5\n\n[[listener]]\naddr = \"127.0.0.1:2\"\nheartbeat_s = 5\nmax_packet = 4096\n\n[[listener]]\nprotocol = \"line\"\naddr = \"127.0.0.1:3\"\nmax_packet = 4096\nmode = \"mqant\"\n";
        let e = all_errors(text);
        assert_eq!(
            e,
            [
                "4:1: listener[0].pubsub: only applies to mqtt listeners, not pomelo",
                "9:1: listener[1].heartbeat_s: only applies to pomelo listeners, not mqtt",
                "15:1: listener[2].max_packet: only applies to mqtt and json listeners, not line",
                "16:1: listener[2].mode: only applies to mqtt listeners, not line",
            ],
            "{e:#?}"
        );
        // reported with the other schema errors, in file order
        let e = all_errors("[[listener]]\nprotocol = \"json\"\npush_qos = 0\nbogus = 1\n");
        assert_eq!(e.len(), 2, "{e:?}");
        assert!(
            e[0].starts_with("3:1: listener[0].push_qos: only applies to mqtt"),
            "{e:?}"
        );
        assert!(
            e[1].starts_with("4:1: listener[0].bogus: unknown key"),
            "{e:?}"
        );
        // json takes max_packet; the same from a URL
        assert!(Config::load("[[listener]]\nprotocol = \"json\"\nmax_packet = 100\n", &[]).is_ok());
        let e = ListenerConfig::from_url("pomelo://127.0.0.1:1?push_qos=0").unwrap_err();
        assert_eq!(
            e.to_string(),
            "--listen.push_qos: only applies to mqtt listeners, not pomelo"
        );
        assert!(ListenerConfig::from_url("json+ws://127.0.0.1:1?max_packet=100").is_ok());
        // a listener built in code is held to the same rule for the keys it sets
        let l = ListenerConfig {
            protocol: ListenerProtocol::Line,
            max_packet: Some(100),
            ..ListenerConfig::default()
        };
        let c = Config {
            listeners: vec![l],
            ..Config::default()
        };
        assert_eq!(
            c.validate(&[]).unwrap_err().to_string(),
            "listener[0].max_packet: only applies to mqtt and json listeners, not line"
        );
    }
}

//! `[[listener]]`: one address accepting clients, the keys every protocol takes, and one options
//! struct per protocol.
//!
//! A listener is a [`ListenerConfig`]: the common keys (address, timeouts, queues, rates, IP
//! lists, TLS, auth) as fields, and [`ProtocolOptions`], which holds the options of its protocol
//! and nothing else. serde does the refusing: a table is read as its protocol's table type
//! (chosen by its `protocol` key, `mqtt` when absent), and each of those is
//! `deny_unknown_fields`, so a pomelo key on an MQTT listener is an unknown key like a typo,
//! with its line and column. serde's internally tagged enums buffer a table and lose the toml
//! crate's spans, so config/source.rs hands each listener table to serde tagged from outside,
//! `{ pomelo = { … } }`: an externally tagged enum keeps every key's place in the file.
//!
//! Each field list is written once, in the macros below: the common keys in
//! `with_common_keys!`, each protocol's in its `protocol_options!` invocation; the macros
//! build the public structs, their defaults, and the private table types serde reads.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::Duration;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

use super::Problems;

/// The network a client connects over (mqant's session `Network`): what an MQTT listener's
/// `network` key chooses, and what each session records. "Transport" names only what carries
/// the bus between nodes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Network {
    /// Plain TCP.
    #[default]
    Tcp,
    /// WebSocket.
    Ws,
}

/// The client protocol a listener serves and its sessions speak; a config file names it in
/// `protocol` ([`protocol_name`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    /// MQTT 3.1 / 3.1.1 (docs/protocols/mqtt.md).
    Mqtt,
    /// The pomelo client protocol (docs/protocols/pomelo.md).
    Pomelo,
    /// JSON over WebSocket, TianQinS style (docs/protocols/json-ws.md).
    Json,
    /// The telnet-friendly line framing, ffown style (docs/protocols/line.md).
    Line,
    /// A pomelo-rpc peer: a pomelo/pinus server calling modules (docs/protocols/pomelo-rpc.md).
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

/// How a pomelo-rpc listener frames its messages (docs/protocols/pomelo-rpc.md).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RpcFraming {
    /// MQTT packets over TCP, pomelo-rpc 1.0.7's default.
    #[default]
    Mqtt,
    /// stream-pkg: a varint length, then the message.
    Tcp,
}

/// What answers a line listener's messages (docs/protocols/line.md).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LineHandler {
    /// The listener's channel handler: its `plugin` when it has one, else the node's (by
    /// default an echo).
    #[default]
    Echo,
    /// Bodies are `Module/Handler[/msgid] <json>`, routed to modules like any request.
    Router,
}

/// What a Python channel-handler plugin receives as `msg` (docs/plugins.md).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PythonMsgType {
    /// A `str`, decoded as UTF-8 with `surrogateescape` so that every byte round-trips (what
    /// ffown passed). `text` is read as the same.
    #[default]
    #[serde(alias = "text")]
    Str,
    /// `bytes`.
    Bytes,
}

/// Calls `$callback!` with its own arguments and the list of common listener keys, so that list
/// is written once and every type that holds the common keys is built from it.
macro_rules! with_common_keys {
    ($callback:ident ! { $($args:tt)* }) => {
        $callback! {
            { $($args)* }
            {
                /// Bind address; `:3563` means all interfaces.
                addr: String = "127.0.0.1:1883".into(),
                /// Deadline for the first meaningful message of every protocol: MQTT CONNECT, the
                /// pomelo handshake, the JSON-WS login, the pomelo-rpc CONNECT, a line's first
                /// message.
                connect_timeout_s: u64 = 10,
                /// Read deadline when the protocol's keepalive or heartbeat is off; 0: none. The
                /// default depends on the protocol ([`ListenerConfig::idle_timeout`]).
                idle_timeout_s: Option<u64> = None,
                /// Deadline for one socket write.
                write_timeout_s: u64 = 30,
                /// Connection cap.
                max_conn: usize = 20000,
                /// Outbound queue length per connection; a client that lets it fill is
                /// disconnected.
                write_queue: usize = 1024,
                /// Outbound queue bytes per connection; a client that lets it fill is
                /// disconnected.
                write_queue_bytes: usize = 4 << 20,
                /// Requests one connection may have awaiting their handlers; past it, the gate
                /// stops reading from that client until replies come back (backpressure, bounded
                /// memory).
                max_inflight: usize = 1024,
                /// Deadline of client requests (mqant mode: 5 s; otherwise 10 s).
                rpc_expired_s: Option<u64> = None,
                /// Deadline for the connection handshakes, counted from accept: PROXY header,
                /// TLS, the WebSocket upgrade request.
                handshake_timeout_s | "ws_handshake_timeout_s": u64 = 10,
                /// Messages per second one connection may send (0: no cap); past it, reading
                /// pauses.
                msg_rate: u32 = 0,
                /// Messages one connection may send at once above `msg_rate`.
                msg_burst: u32 = 0,
                /// Bytes per second one connection may send (0: no cap); past it, reading pauses.
                byte_rate: u32 = 0,
                /// Bytes one connection may send at once above `byte_rate`.
                byte_burst: u32 = 0,
                /// When not empty, only these networks may connect to this listener (CIDR or
                /// address).
                allow: Vec<String> = Vec::new(),
                /// Networks that may not connect to this listener; deny wins over allow.
                deny: Vec<String> = Vec::new(),
                /// Expect a PROXY protocol v1 or v2 header first (behind a load balancer): the
                /// address in it is the client's, for IP lists, per-IP limits and logs.
                proxy_protocol: bool = false,
                /// PEM certificate chain: serve TLS (`mqtts://`, `wss://`, `pomelo+tls://`, …).
                tls_cert: Option<String> = None,
                /// PEM private key of `tls_cert`.
                tls_key: Option<String> = None,
                /// PEM CA certificates: when set, clients must present a certificate signed by
                /// one.
                tls_client_ca: Option<String> = None,
                /// Apply the node's `[auth]` checks on this listener.
                auth: bool = true,
                /// Minimum seconds between storage heartbeats of a bound session (mqant's
                /// `MinHBStorage`).
                min_hb_storage_s: u64 = 60,
            }
        }
    };
}

/// Builds [`ListenerConfig`] from the common keys.
macro_rules! listener_config {
    (
        {}
        { $( $(#[doc = $doc:literal])* $field:ident $(| $alias:literal)? : $ty:ty = $default:expr ),* $(,)? }
    ) => {
        /// `[[listener]]`: one address accepting clients. The fields are the keys every protocol
        /// takes; [`ListenerConfig::protocol`] holds the protocol and its own options.
        ///
        /// Read from TOML through [`Config::from_toml`](super::Config::from_toml) and its
        /// siblings, or from a `--listen` URL ([`ListenerConfig::from_url`]); written back as
        /// one flat table with a `protocol` key.
        #[derive(Debug, Clone, PartialEq)]
        pub struct ListenerConfig {
            /// The client protocol, with the options only it takes.
            pub protocol: ProtocolOptions,
            $( $(#[doc = $doc])* pub $field: $ty, )*
        }

        impl Default for ListenerConfig {
            fn default() -> Self {
                ListenerConfig {
                    protocol: ProtocolOptions::default(),
                    $( $field: $default, )*
                }
            }
        }

        /// The keys every protocol's listeners take (old names included), besides `protocol`.
        pub const COMMON_KEYS: &[&str] = &[ $( stringify!($field), $($alias,)? )* ];
    };
}

with_common_keys!(listener_config! {});

/// Builds one protocol's options struct (public) and its table type (what serde reads: the
/// common keys and the protocol's, unknown keys refused).
macro_rules! protocol_options {
    (
        {
            $variant:ident, $options:ident, $table:ident,
            $(#[doc = $odoc:literal])*
            { $( $(#[doc = $doc:literal])* $field:ident $(| $alias:literal)? : $ty:ty = $default:expr ),* $(,)? }
        }
        { $( $(#[doc = $cdoc:literal])* $cfield:ident $(| $calias:literal)? : $cty:ty = $cdefault:expr ),* $(,)? }
    ) => {
        $(#[doc = $odoc])*
        #[derive(Debug, Clone, PartialEq)]
        pub struct $options {
            $( $(#[doc = $doc])* pub $field: $ty, )*
        }

        impl Default for $options {
            fn default() -> Self {
                $options { $( $field: $default, )* }
            }
        }

        impl $options {
            /// The keys only this protocol's listeners take (old names included).
            pub const KEYS: &'static [&'static str] = &[ $( stringify!($field), $($alias,)? )* ];
        }

        /// A listener table of this protocol as serde reads and writes it.
        #[derive(Serialize, Deserialize)]
        #[serde(deny_unknown_fields, default)]
        struct $table {
            /// Checked by the tag config/source.rs reads from it; a string here.
            protocol: String,
            $( $(#[serde(alias = $calias)])? $cfield: $cty, )*
            $( $(#[serde(alias = $alias)])? $field: $ty, )*
        }

        impl Default for $table {
            fn default() -> Self {
                $table {
                    protocol: protocol_name(Protocol::$variant).to_owned(),
                    $( $cfield: $cdefault, )*
                    $( $field: $default, )*
                }
            }
        }

        impl $table {
            fn into_config(self) -> ListenerConfig {
                ListenerConfig {
                    protocol: ProtocolOptions::$variant($options { $( $field: self.$field, )* }),
                    $( $cfield: self.$cfield, )*
                }
            }

            fn of(l: &ListenerConfig, o: &$options) -> $table {
                $table {
                    protocol: protocol_name(Protocol::$variant).to_owned(),
                    $( $cfield: l.$cfield.clone(), )*
                    $( $field: o.$field.clone(), )*
                }
            }
        }
    };
}

with_common_keys!(protocol_options! {
    Mqtt, MqttOptions, MqttTable,
    /// An MQTT listener's options (docs/protocols/mqtt.md).
    {
        /// `tcp` or `ws` (MQTT over WebSocket). The key `transport` is its older name.
        network | "transport": Network = Network::Tcp,
        /// `default` or `mqant`.
        mode: Mode = Mode::Default,
        /// Handler name prefixes clients may call in mqant mode.
        handler_prefixes: Vec<String> = vec!["HD_".into(), "Handler_".into()],
        /// QoS of server pushes and replies (0 or 1).
        push_qos: u8 = 1,
        /// Answer PINGREQ with the old mqant bytes `d2 00`.
        pingresp_d2: bool = false,
        /// Default mode: deliver publishes to topics that name no module to matching
        /// subscribers.
        pubsub: bool = true,
        /// Largest packet (or WebSocket frame) accepted; unset, it follows the mode
        /// ([`MqttOptions::max_packet`]).
        max_packet: Option<usize> = None,
    }
});

with_common_keys!(protocol_options! {
    Pomelo, PomeloOptions, PomeloTable,
    /// A pomelo listener's options (docs/protocols/pomelo.md). One port serves raw TCP and
    /// WebSocket: the first byte of a connection decides.
    {
        /// Heartbeat interval announced in the handshake; 0 turns heartbeats off.
        heartbeat_s: u64 = 10,
        /// Disconnect when nothing arrives for this long (default 2 × heartbeat).
        heartbeat_timeout_s: Option<u64> = None,
        /// Largest package body.
        max_package: usize = warren_proto::pomelo::DEFAULT_MAX_PACKAGE,
        /// Route compression dictionary sent in the handshake (`route = code`).
        route_dict: BTreeMap<String, u16> = BTreeMap::new(),
    }
});

with_common_keys!(protocol_options! {
    Json, JsonOptions, JsonTable,
    /// A JSON-over-WebSocket listener's options (docs/protocols/json-ws.md).
    {
        /// Largest message (WebSocket frame) accepted.
        max_packet: usize = 64 * 1024,
        /// The first message must be `login`.
        require_login: bool = true,
        /// Module whose handlers answer calls whose `tpc` names no module.
        fallback_module: String = "global".into(),
        /// Send no reply for unknown functions or failed calls, as upstream.
        silent_errors: bool = false,
        /// A `Module/Handler` that checks logins: it receives `[guid, md5]` and answers `true`
        /// (or 0) to accept. Unset, every login is accepted (unless the node's auth refuses).
        login_handler: Option<String> = None,
    }
});

with_common_keys!(protocol_options! {
    Line, LineOptions, LineTable,
    /// A line listener's options (docs/protocols/line.md).
    {
        /// Longest head line.
        max_head: usize = 64,
        /// Largest message body.
        max_body: usize = 64 * 1024,
        /// Consecutive bad heads before the connection closes.
        max_bad_heads: u32 = 8,
        /// Write `<len> \r\n` with the upstream space.
        space_before_crlf: bool = true,
        /// Create channels on first message and report only those (upstream behaviour).
        lazy_channels: bool = false,
        /// `echo` (the listener's channel handler) or `router` (bodies are
        /// `Module/Handler[/msgid] <json>`).
        handler: LineHandler = LineHandler::Echo,
        /// A channel-handler plugin answering this listener's messages: a `.lua`, `.py` or
        /// `.so` file (docs/plugins.md). A relative path is relative to the config file's
        /// directory (to the working directory on the command line).
        plugin: Option<String> = None,
        /// What a Python plugin's `msg` is: `str` (the default) or `bytes`.
        python_msg_type: Option<PythonMsgType> = None,
        /// The first message carries credentials (`user password` or a token), checked by
        /// `[auth]` before anything else is read.
        auth_first_line: bool = false,
    }
});

with_common_keys!(protocol_options! {
    PomeloRpc, PomeloRpcOptions, PomeloRpcTable,
    /// A pomelo-rpc acceptor's options, so pomelo/pinus servers can call modules
    /// (docs/protocols/pomelo-rpc.md).
    {
        /// `mqtt` (MQTT packets) or `tcp` (stream-pkg). The key `transport` is its older name.
        framing | "transport": RpcFraming = RpcFraming::Mqtt,
        /// Answer CONNECT with CONNACK (upstream never did).
        send_connack: bool = true,
        /// Queue responses and flush them as one JSON array every `interval_ms`.
        buffer_msg: bool = false,
        /// Flush interval of `buffer_msg`.
        interval_ms: u64 = 50,
        /// Echo `traceId`, `seqId` and `source` in responses.
        trace: bool = false,
        /// Largest stream-pkg message.
        pkg_size: usize = 1024 * 1024,
        /// Namespaces accepted.
        namespaces: Vec<String> = vec!["sys".into(), "user".into()],
        /// Service name → module name, for peers whose service names differ.
        service_map: BTreeMap<String, String> = BTreeMap::new(),
    }
});

/// A listener's protocol and the options only that protocol takes.
#[derive(Debug, Clone, PartialEq)]
pub enum ProtocolOptions {
    /// MQTT 3.1 / 3.1.1 over TCP or WebSocket.
    Mqtt(MqttOptions),
    /// The pomelo client protocol, raw TCP and WebSocket on one port.
    Pomelo(PomeloOptions),
    /// JSON over WebSocket, TianQinS style.
    Json(JsonOptions),
    /// The telnet-friendly line framing, ffown style.
    Line(LineOptions),
    /// A pomelo-rpc acceptor.
    PomeloRpc(PomeloRpcOptions),
}

impl Default for ProtocolOptions {
    fn default() -> Self {
        ProtocolOptions::Mqtt(MqttOptions::default())
    }
}

/// Every protocol a listener may speak, in the order help texts list them.
pub const PROTOCOLS: [Protocol; 5] = [
    Protocol::Mqtt,
    Protocol::Pomelo,
    Protocol::Json,
    Protocol::Line,
    Protocol::PomeloRpc,
];

/// The name a config file gives a protocol (`protocol = "pomelo-rpc"`).
pub fn protocol_name(p: Protocol) -> &'static str {
    match p {
        Protocol::Mqtt => "mqtt",
        Protocol::Pomelo => "pomelo",
        Protocol::Json => "json",
        Protocol::Line => "line",
        Protocol::PomeloRpc => "pomelo-rpc",
    }
}

/// The keys only `p`'s listeners take.
fn own_keys(p: Protocol) -> &'static [&'static str] {
    match p {
        Protocol::Mqtt => MqttOptions::KEYS,
        Protocol::Pomelo => PomeloOptions::KEYS,
        Protocol::Json => JsonOptions::KEYS,
        Protocol::Line => LineOptions::KEYS,
        Protocol::PomeloRpc => PomeloRpcOptions::KEYS,
    }
}

/// For a key a `protocol` listener does not take, the protocols whose listeners do: "pomelo",
/// "mqtt and json". `None` when no listener takes it (a typo) or this one does.
pub(super) fn taken_by_others(key: &str, protocol: &str) -> Option<String> {
    if COMMON_KEYS.contains(&key) || key == "protocol" {
        return None;
    }
    let owners: Vec<&str> = PROTOCOLS
        .into_iter()
        .filter(|p| own_keys(*p).contains(&key))
        .map(protocol_name)
        .collect();
    if owners.is_empty() || owners.contains(&protocol) {
        return None;
    }
    Some(owners.join(" and "))
}

impl ProtocolOptions {
    /// The options of protocol `p`, all at their defaults.
    pub fn defaults(p: Protocol) -> ProtocolOptions {
        match p {
            Protocol::Mqtt => ProtocolOptions::Mqtt(MqttOptions::default()),
            Protocol::Pomelo => ProtocolOptions::Pomelo(PomeloOptions::default()),
            Protocol::Json => ProtocolOptions::Json(JsonOptions::default()),
            Protocol::Line => ProtocolOptions::Line(LineOptions::default()),
            Protocol::PomeloRpc => ProtocolOptions::PomeloRpc(PomeloRpcOptions::default()),
        }
    }

    /// Which protocol these are the options of.
    pub fn protocol(&self) -> Protocol {
        match self {
            ProtocolOptions::Mqtt(_) => Protocol::Mqtt,
            ProtocolOptions::Pomelo(_) => Protocol::Pomelo,
            ProtocolOptions::Json(_) => Protocol::Json,
            ProtocolOptions::Line(_) => Protocol::Line,
            ProtocolOptions::PomeloRpc(_) => Protocol::PomeloRpc,
        }
    }

    /// The protocol's name in a config file.
    pub fn name(&self) -> &'static str {
        protocol_name(self.protocol())
    }

    /// The MQTT options, on an MQTT listener.
    pub fn mqtt(&self) -> Option<&MqttOptions> {
        match self {
            ProtocolOptions::Mqtt(o) => Some(o),
            _ => None,
        }
    }

    /// The pomelo options, on a pomelo listener.
    pub fn pomelo(&self) -> Option<&PomeloOptions> {
        match self {
            ProtocolOptions::Pomelo(o) => Some(o),
            _ => None,
        }
    }

    /// The JSON-WS options, on a JSON listener.
    pub fn json(&self) -> Option<&JsonOptions> {
        match self {
            ProtocolOptions::Json(o) => Some(o),
            _ => None,
        }
    }

    /// The line options, on a line listener.
    pub fn line(&self) -> Option<&LineOptions> {
        match self {
            ProtocolOptions::Line(o) => Some(o),
            _ => None,
        }
    }

    /// The pomelo-rpc options, on a pomelo-rpc listener.
    pub fn pomelo_rpc(&self) -> Option<&PomeloRpcOptions> {
        match self {
            ProtocolOptions::PomeloRpc(o) => Some(o),
            _ => None,
        }
    }
}

impl MqttOptions {
    /// Largest packet accepted: `max_packet`, else 4096 in mqant mode (mqant's `MaxMsgLen`) and
    /// 1 MiB otherwise.
    pub fn max_packet(&self) -> usize {
        self.max_packet.unwrap_or(match self.mode {
            Mode::Mqant => 4096,
            Mode::Default => 1024 * 1024,
        })
    }
}

impl PomeloOptions {
    /// The heartbeat interval, `None` when heartbeats are off.
    pub fn heartbeat(&self) -> Option<Duration> {
        (self.heartbeat_s > 0).then(|| Duration::from_secs(self.heartbeat_s))
    }

    /// How long a client may send nothing: `heartbeat_timeout_s`, else twice the heartbeat;
    /// `None` with heartbeats off and no timeout set.
    pub fn heartbeat_timeout(&self) -> Option<Duration> {
        self.heartbeat_timeout_s
            .map(Duration::from_secs)
            .or(self.heartbeat().map(|h| h * 2))
    }
}

/// A `[[listener]]` table as serde reads it: the table type of its protocol, tagged with the
/// protocol's name by config/source.rs.
#[derive(Deserialize)]
#[serde(rename_all = "kebab-case")]
enum ListenerTable {
    Mqtt(MqttTable),
    Pomelo(PomeloTable),
    Json(JsonTable),
    Line(LineTable),
    PomeloRpc(PomeloRpcTable),
}

impl<'de> Deserialize<'de> for ListenerConfig {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        Ok(match ListenerTable::deserialize(d)? {
            ListenerTable::Mqtt(t) => t.into_config(),
            ListenerTable::Pomelo(t) => t.into_config(),
            ListenerTable::Json(t) => t.into_config(),
            ListenerTable::Line(t) => t.into_config(),
            ListenerTable::PomeloRpc(t) => t.into_config(),
        })
    }
}

impl Serialize for ListenerConfig {
    /// One flat table, `protocol` first: the form a config file takes.
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match &self.protocol {
            ProtocolOptions::Mqtt(o) => MqttTable::of(self, o).serialize(s),
            ProtocolOptions::Pomelo(o) => PomeloTable::of(self, o).serialize(s),
            ProtocolOptions::Json(o) => JsonTable::of(self, o).serialize(s),
            ProtocolOptions::Line(o) => LineTable::of(self, o).serialize(s),
            ProtocolOptions::PomeloRpc(o) => PomeloRpcTable::of(self, o).serialize(s),
        }
    }
}

fn pick(tls: bool, plain: &'static str, secure: &'static str) -> &'static str {
    if tls { secure } else { plain }
}

impl ListenerConfig {
    /// A listener of `protocol` on `addr`, every other key at its default.
    pub fn new(addr: impl Into<String>, protocol: ProtocolOptions) -> ListenerConfig {
        ListenerConfig {
            protocol,
            addr: addr.into(),
            ..ListenerConfig::default()
        }
    }

    /// The listener's URL scheme (for logs, metrics and the startup banner).
    pub fn scheme(&self) -> &'static str {
        let tls = self.tls();
        match &self.protocol {
            ProtocolOptions::Mqtt(o) => match (o.network, o.mode) {
                (Network::Tcp, Mode::Default) => pick(tls, "mqtt", "mqtts"),
                (Network::Tcp, Mode::Mqant) => pick(tls, "mqtt+mqant", "mqtts+mqant"),
                (Network::Ws, Mode::Default) => pick(tls, "ws", "wss"),
                (Network::Ws, Mode::Mqant) => pick(tls, "ws+mqant", "wss+mqant"),
            },
            ProtocolOptions::Pomelo(_) => pick(tls, "pomelo", "pomelo+tls"),
            ProtocolOptions::Json(_) => pick(tls, "json+ws", "json+wss"),
            ProtocolOptions::Line(_) => pick(tls, "line", "line+tls"),
            ProtocolOptions::PomeloRpc(o) => match o.framing {
                RpcFraming::Mqtt => pick(tls, "pomelo-rpc", "pomelo-rpc+tls"),
                RpcFraming::Tcp => pick(tls, "pomelo-rpc+tcp", "pomelo-rpc+tcp+tls"),
            },
        }
    }

    /// The network clients reach the listener over: WebSocket for MQTT over WebSocket and JSON,
    /// TCP for the rest (pomelo also takes WebSocket upgrades on its port:
    /// [`ListenerConfig::serves_websocket`]).
    pub fn network(&self) -> Network {
        match &self.protocol {
            ProtocolOptions::Mqtt(o) => o.network,
            ProtocolOptions::Json(_) => Network::Ws,
            _ => Network::Tcp,
        }
    }

    /// Whether the listener accepts WebSocket upgrades (all of its connections, or, for pomelo,
    /// those that start with an HTTP request).
    pub fn serves_websocket(&self) -> bool {
        matches!(self.protocol, ProtocolOptions::Pomelo(_)) || self.network() == Network::Ws
    }

    /// Whether this is an MQTT listener in mqant mode.
    pub fn is_mqant(&self) -> bool {
        self.protocol.mqtt().is_some_and(|o| o.mode == Mode::Mqant)
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

    /// Effective request deadline: `rpc_expired_s`, else 5 s in mqant mode and 10 s otherwise.
    pub fn rpc_expired(&self) -> Duration {
        let default = if self.is_mqant() { 5 } else { 10 };
        Duration::from_secs(self.rpc_expired_s.unwrap_or(default))
    }

    /// Effective idle read deadline for clients whose keepalive or heartbeat is off:
    /// `idle_timeout_s` (0: none), else the protocol's default: 90 s for pomelo, 60 s for
    /// pomelo-rpc peers, 600 s for the others.
    pub fn idle_timeout(&self) -> Option<Duration> {
        let default = match self.protocol {
            ProtocolOptions::Pomelo(_) => 90,
            ProtocolOptions::PomeloRpc(_) => 60,
            _ => 600,
        };
        match self.idle_timeout_s.unwrap_or(default) {
            0 => None,
            s => Some(Duration::from_secs(s)),
        }
    }

    /// Whether the listener serves TLS.
    pub fn tls(&self) -> bool {
        self.tls_cert.is_some()
    }

    /// The largest message a client of this listener may send, as its protocol bounds it.
    fn largest_message(&self) -> usize {
        match &self.protocol {
            ProtocolOptions::Mqtt(o) => o.max_packet(),
            ProtocolOptions::Pomelo(o) => o.max_package + 4,
            ProtocolOptions::Json(o) => o.max_packet,
            ProtocolOptions::Line(o) => o.max_head + o.max_body,
            ProtocolOptions::PomeloRpc(o) => o.pkg_size,
        }
    }

    /// Record every problem of this listener, its keys under `key` (`listener[0]`).
    pub(super) fn check(&self, key: &str, p: &mut Problems) {
        let mut bad = |k: &str, why: String| p.add(format!("{key}.{k}"), why);
        if let Err(why) = self.socket_addr() {
            bad("addr", why);
        }
        for (k, v) in [
            ("write_queue", self.write_queue as u64),
            ("max_inflight", self.max_inflight as u64),
            ("max_conn", self.max_conn as u64),
            ("connect_timeout_s", self.connect_timeout_s),
            ("write_timeout_s", self.write_timeout_s),
            ("handshake_timeout_s", self.handshake_timeout_s),
            ("rpc_expired_s", self.rpc_expired_s.unwrap_or(1)),
        ] {
            if v == 0 {
                bad(k, "must be at least 1".into());
            }
        }
        if self.write_queue_bytes < 1024 {
            bad(
                "write_queue_bytes",
                format!("must be at least 1024, got {}", self.write_queue_bytes),
            );
        }
        if self.msg_rate > 0 && self.msg_burst == 0 {
            bad(
                "msg_burst",
                "must be at least 1 when msg_rate is set".into(),
            );
        }
        if self.byte_rate > 0 && (self.byte_burst as usize) < self.largest_message().min(1 << 20) {
            bad(
                "byte_burst",
                "must hold at least one largest message (up to 1 MiB) when byte_rate is set".into(),
            );
        }
        for (k, list) in [("allow", &self.allow), ("deny", &self.deny)] {
            for (i, n) in list.iter().enumerate() {
                if let Err(why) = super::security::check_network(n) {
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
        let packet_range = |m: usize| {
            (!(16..=268_435_455).contains(&m))
                .then(|| format!("must be between 16 and 268435455, got {m}"))
        };
        match &self.protocol {
            ProtocolOptions::Mqtt(o) => {
                if o.push_qos > 1 {
                    bad("push_qos", format!("must be 0 or 1, got {}", o.push_qos));
                }
                if let Some(why) = o.max_packet.and_then(packet_range) {
                    bad("max_packet", why);
                }
                if o.mode == Mode::Mqant && o.handler_prefixes.iter().all(|p| p.is_empty()) {
                    bad(
                        "handler_prefixes",
                        "mqant mode needs at least one non-empty prefix".into(),
                    );
                }
            }
            ProtocolOptions::Json(o) => {
                if let Some(why) = packet_range(o.max_packet) {
                    bad("max_packet", why);
                }
                if let Some(h) = &o.login_handler
                    && crate::route::Route::parse(h).is_err()
                {
                    bad(
                        "login_handler",
                        format!("{h:?} is not a route like Login/CheckLogin"),
                    );
                }
            }
            ProtocolOptions::Line(o) => {
                match o.plugin.as_deref() {
                    Some(path) if path.trim().is_empty() => {
                        bad("plugin", "must name a file".into());
                    }
                    Some(_) if o.handler == LineHandler::Router => bad(
                        "plugin",
                        "a plugin answers the messages itself: it excludes handler = \"router\""
                            .into(),
                    ),
                    _ => {}
                }
                if o.python_msg_type.is_some() && o.plugin.is_none() {
                    bad(
                        "python_msg_type",
                        "applies to a listener's plugin: set plugin too".into(),
                    );
                }
            }
            ProtocolOptions::Pomelo(_) | ProtocolOptions::PomeloRpc(_) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_key_list_is_disjoint_from_the_common_one() {
        for p in PROTOCOLS {
            for k in own_keys(p) {
                assert!(!COMMON_KEYS.contains(k), "{k} of {p:?} is also common");
            }
        }
    }

    #[test]
    fn defaults_per_protocol() {
        let mqtt = MqttOptions::default();
        assert_eq!(
            (mqtt.network, mqtt.mode, mqtt.push_qos),
            (Network::Tcp, Mode::Default, 1)
        );
        assert_eq!(mqtt.max_packet(), 1024 * 1024);
        let mqant = MqttOptions {
            mode: Mode::Mqant,
            ..MqttOptions::default()
        };
        assert_eq!(mqant.max_packet(), 4096);
        let l = ListenerConfig::new(":3563", ProtocolOptions::Mqtt(mqant));
        assert_eq!(l.rpc_expired(), Duration::from_secs(5));
        assert_eq!(l.idle_timeout(), Some(Duration::from_secs(600)));
        assert_eq!(
            ListenerConfig::default().rpc_expired(),
            Duration::from_secs(10)
        );

        let pomelo = PomeloOptions::default();
        assert_eq!(pomelo.heartbeat(), Some(Duration::from_secs(10)));
        assert_eq!(pomelo.heartbeat_timeout(), Some(Duration::from_secs(20)));
        assert_eq!(pomelo.max_package, 64 * 1024);
        let off = PomeloOptions {
            heartbeat_s: 0,
            ..PomeloOptions::default()
        };
        assert_eq!((off.heartbeat(), off.heartbeat_timeout()), (None, None));
        let l = ListenerConfig::new("127.0.0.1:1", ProtocolOptions::Pomelo(pomelo));
        assert_eq!(l.idle_timeout(), Some(Duration::from_secs(90)));
        assert!(l.serves_websocket());

        let json = JsonOptions::default();
        assert_eq!(
            (
                json.max_packet,
                json.require_login,
                json.fallback_module.as_str()
            ),
            (64 * 1024, true, "global")
        );
        let line = LineOptions::default();
        assert_eq!(
            (line.max_head, line.max_body, line.max_bad_heads),
            (64, 65536, 8)
        );
        assert_eq!(line.handler, LineHandler::Echo);
        let rpc = PomeloRpcOptions::default();
        assert_eq!(
            (rpc.framing, rpc.interval_ms, rpc.pkg_size),
            (RpcFraming::Mqtt, 50, 1 << 20)
        );
        assert_eq!(rpc.namespaces, ["sys", "user"]);
        let l = ListenerConfig::new("127.0.0.1:1", ProtocolOptions::PomeloRpc(rpc));
        assert_eq!(l.idle_timeout(), Some(Duration::from_secs(60)));
        let l = ListenerConfig {
            idle_timeout_s: Some(0),
            ..l
        };
        assert_eq!(l.idle_timeout(), None);
    }

    #[test]
    fn keys_of_other_protocols_are_named() {
        assert_eq!(
            taken_by_others("heartbeat_s", "mqtt").as_deref(),
            Some("pomelo")
        );
        assert_eq!(
            taken_by_others("max_packet", "line").as_deref(),
            Some("mqtt and json")
        );
        assert_eq!(
            taken_by_others("transport", "json").as_deref(),
            Some("mqtt and pomelo-rpc")
        );
        assert_eq!(taken_by_others("max_packet", "json"), None);
        assert_eq!(taken_by_others("addr", "line"), None);
        assert_eq!(taken_by_others("bogus", "mqtt"), None);
    }
}

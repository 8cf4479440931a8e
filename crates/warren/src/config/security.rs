//! The node-wide safety settings: `[limits]` (what any one client, address or the whole node may
//! hold), `[access]` (IP allow and deny lists) and `[auth]` (who may connect and what they may
//! use). Per-listener knobs (TLS, PROXY protocol, rates, queue bytes) live on
//! [`ListenerConfig`](super::ListenerConfig). docs/security.md explains each key and the attack it
//! stops.

use serde::{Deserialize, Serialize};

use super::Problems;

/// `[limits]`: caps on what clients may make a node hold. Each one is checked before the thing
/// it bounds is allocated, and refusing it names the key in the log line.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LimitsConfig {
    /// Longest topic name or filter, in bytes (publishes and subscriptions alike).
    pub max_topic_len: usize,
    /// Most levels (`/`-separated parts) in a topic name or filter.
    pub max_topic_levels: usize,
    /// Most filters in one SUBSCRIBE or UNSUBSCRIBE packet.
    pub max_filters_per_subscribe: usize,
    /// Most subscriptions one session may hold.
    pub max_filters_per_session: usize,
    /// Most subscriptions on this node, all sessions together.
    pub max_subscriptions: usize,
    /// Most topic levels all subscriptions of this node hold together (the nodes of the
    /// subscription trie; a prefix shared by several filters counts once). Bounds the trie's
    /// memory, which grows with levels rather than with subscriptions.
    pub max_subscription_levels: usize,
    /// Most groups (rooms) one session may be in: group names often come from clients.
    pub max_groups_per_session: usize,
    /// Most retained MQTT messages (topics with a retained message) on this node: any client
    /// may retain one on every topic it may publish to. Past it, a new retained topic is refused
    /// (the message is still delivered, not kept); replacing or deleting one is always allowed.
    pub max_retained_messages: usize,
    /// Most bytes all retained MQTT messages of this node hold together (each counts its topic,
    /// its payload and 64 bytes per topic level). Past it, a retained message is refused as
    /// above.
    pub max_retained_bytes: usize,
    /// Bytes of output queued for all connections of the node together; past it, new
    /// deliveries are refused (slow consumers are closed) before the machine runs out.
    pub max_queued_bytes: usize,
    /// Open connections from one IP address, all listeners together (0: no cap).
    pub max_conn_per_ip: usize,
    /// New connections per second from one IP address (0: no cap).
    pub conn_rate_per_ip: u32,
    /// New connections one IP address may open at once above its rate.
    pub conn_burst_per_ip: u32,
    /// Outbound MQTT QoS 1 / 2 messages one session may have sent and not yet had
    /// acknowledged; later ones wait in order in its queue (at most 65535).
    pub max_inflight_messages: usize,
    /// Most QoS 1 / 2 messages one MQTT session queues (waiting for its window, or for its
    /// client while a persistent session is offline); past it the newest are dropped.
    pub max_queued_messages: usize,
    /// Most topic + payload bytes of those queued messages, per session.
    pub max_session_queued_bytes: usize,
    /// Seconds a persistent MQTT session (`clean_session = 0`) is kept with no connection;
    /// 0 keeps it for ever.
    pub session_expiry_s: u64,
}

impl Default for LimitsConfig {
    fn default() -> Self {
        LimitsConfig {
            max_topic_len: 1024,
            max_topic_levels: 128,
            max_filters_per_subscribe: 256,
            max_filters_per_session: 1024,
            max_subscriptions: 1_000_000,
            max_subscription_levels: 4_000_000,
            max_groups_per_session: 256,
            max_retained_messages: 100_000,
            max_retained_bytes: 64 << 20,
            max_queued_bytes: 1 << 30,
            max_conn_per_ip: 1000,
            conn_rate_per_ip: 200,
            conn_burst_per_ip: 1000,
            max_inflight_messages: 32,
            max_queued_messages: 1000,
            max_session_queued_bytes: 16 << 20,
            session_expiry_s: 7200,
        }
    }
}

impl LimitsConfig {
    pub(super) fn check(&self, p: &mut Problems) {
        let at_least_one = [
            ("max_topic_len", self.max_topic_len),
            ("max_topic_levels", self.max_topic_levels),
            ("max_filters_per_subscribe", self.max_filters_per_subscribe),
            ("max_filters_per_session", self.max_filters_per_session),
            ("max_subscriptions", self.max_subscriptions),
            ("max_subscription_levels", self.max_subscription_levels),
            ("max_groups_per_session", self.max_groups_per_session),
            ("max_retained_messages", self.max_retained_messages),
            ("max_retained_bytes", self.max_retained_bytes),
            ("max_queued_bytes", self.max_queued_bytes),
        ];
        for (key, v) in at_least_one {
            if v == 0 {
                p.add(format!("limits.{key}"), "must be at least 1");
            }
        }
        if self.max_topic_len > 65535 {
            p.add(
                "limits.max_topic_len",
                format!(
                    "MQTT topics are at most 65535 bytes, got {}",
                    self.max_topic_len
                ),
            );
        }
        for (key, v) in [
            ("max_inflight_messages", self.max_inflight_messages),
            ("max_queued_messages", self.max_queued_messages),
            ("max_session_queued_bytes", self.max_session_queued_bytes),
        ] {
            if v == 0 {
                p.add(format!("limits.{key}"), "must be at least 1");
            }
        }
        if self.max_inflight_messages > 65535 {
            p.add(
                "limits.max_inflight_messages",
                format!(
                    "MQTT has 65535 packet ids, got {}",
                    self.max_inflight_messages
                ),
            );
        }
        if self.conn_rate_per_ip > 0 && self.conn_burst_per_ip == 0 {
            p.add(
                "limits.conn_burst_per_ip",
                "must be at least 1 when conn_rate_per_ip is set",
            );
        }
    }
}

/// `[access]`: node-wide IP allow and deny lists (CIDR), applied at accept on every listener
/// before a byte is read, together with each listener's own `allow` and `deny`. Reloaded on
/// SIGHUP.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AccessConfig {
    /// When not empty, only these networks may connect (`10.0.0.0/8`, `::1/128`, `192.0.2.7`).
    pub allow: Vec<String>,
    /// These networks may never connect; deny wins over allow.
    pub deny: Vec<String>,
}

impl AccessConfig {
    pub(super) fn check(&self, p: &mut Problems) {
        for (key, list) in [("access.allow", &self.allow), ("access.deny", &self.deny)] {
            for (i, n) in list.iter().enumerate() {
                if let Err(why) = check_network(n) {
                    p.add(format!("{key}[{i}]"), why);
                }
            }
        }
    }
}

/// Check that a list entry is a network (`10.0.0.0/8`) or a single address.
pub(super) fn check_network(n: &str) -> Result<(), String> {
    match parse_network(n) {
        Some(_) => Ok(()),
        None => Err(format!(
            "{n:?} is not a network like 10.0.0.0/8 or an address like 192.0.2.7"
        )),
    }
}

/// A network from config: CIDR, or a bare address meaning just that host.
pub fn parse_network(s: &str) -> Option<ipnet::IpNet> {
    let s = s.trim();
    s.parse::<ipnet::IpNet>()
        .ok()
        .or_else(|| s.parse::<std::net::IpAddr>().ok().map(ipnet::IpNet::from))
}

/// What happens when a session binds a uid that another live session already holds.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum UidConflict {
    /// The new bind fails; the session holding the uid keeps it.
    #[default]
    Reject,
    /// The older session is closed and the new one takes the uid.
    KickOld,
}

/// `[auth]`: who may connect. Every protocol asks the same checks before anything is routed;
/// with no method configured, everyone is let in (the demo's default) unless `anonymous = false`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AuthConfig {
    /// A password file of `user:$argon2id$…` lines, managed with `warren passwd FILE USER`.
    pub password_file: Option<String>,
    /// Topic ACLs for default-mode MQTT, in mosquitto's `acl_file` format.
    pub acl_file: Option<String>,
    /// Clients that present no credentials may connect (default: true when no method is
    /// configured, false otherwise).
    pub anonymous: Option<bool>,
    /// Binding a uid that a live session holds: `reject` (default) or `kick_old`.
    pub uid_conflict: UidConflict,
    /// Ask an HTTP service (`[auth.http]`).
    pub http: Option<HttpAuthConfig>,
    /// Accept signed JWTs as passwords or tokens (`[auth.jwt]`).
    pub jwt: Option<JwtConfig>,
}

impl AuthConfig {
    /// Whether any credential check is configured.
    pub fn has_method(&self) -> bool {
        self.password_file.is_some() || self.http.is_some() || self.jwt.is_some()
    }

    /// Whether clients without credentials are let in.
    pub fn allows_anonymous(&self) -> bool {
        self.anonymous.unwrap_or(!self.has_method())
    }

    pub(super) fn check(&self, p: &mut Problems) {
        if let Some(h) = &self.http {
            if !(h.url.starts_with("http://") || h.url.starts_with("https://")) {
                p.add(
                    "auth.http.url",
                    format!("{:?} is not an http:// or https:// URL", h.url),
                );
            }
            if h.timeout_ms == 0 {
                p.add("auth.http.timeout_ms", "must be at least 1");
            }
            if h.ca_file.is_some() && !h.url.starts_with("https://") {
                p.add(
                    "auth.http.ca_file",
                    format!("is only used with an https:// URL, not {:?}", h.url),
                );
            }
        }
        if let Some(j) = &self.jwt {
            let hmac = j.algorithm.starts_with("HS");
            if !matches!(
                j.algorithm.as_str(),
                "HS256" | "HS384" | "HS512" | "RS256" | "ES256"
            ) {
                p.add(
                    "auth.jwt.algorithm",
                    format!(
                        "unknown algorithm {:?} (expected HS256, HS384, HS512, RS256 or ES256)",
                        j.algorithm
                    ),
                );
            } else if hmac && j.secret.is_none() {
                p.add("auth.jwt.secret", format!("{} needs a secret", j.algorithm));
            } else if !hmac && j.public_key_file.is_none() {
                p.add(
                    "auth.jwt.public_key_file",
                    format!("{} needs a PEM public key file", j.algorithm),
                );
            }
        }
    }
}

/// `[auth.http]`: POST the credentials as JSON to a URL; a 200 answer with `{"result":"allow"}`
/// lets the client in (docs/security.md has the exchange).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HttpAuthConfig {
    /// Where to POST.
    pub url: String,
    /// How long to wait for the answer; no answer in time refuses the client.
    pub timeout_ms: u64,
    /// How long an answer is reused for the same credentials (0: not cached).
    pub cache_s: u64,
    /// PEM CA certificates to trust for an `https://` URL instead of the system's roots (an
    /// internal auth service whose certificate a private CA signed).
    pub ca_file: Option<String>,
}

impl Default for HttpAuthConfig {
    fn default() -> Self {
        HttpAuthConfig {
            url: String::new(),
            timeout_ms: 2000,
            cache_s: 60,
            ca_file: None,
        }
    }
}

/// `[auth.jwt]`: a token in the password (MQTT), the handshake `user` data (pomelo) or the login
/// (JSON-WS); its `sub` becomes the session's uid.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct JwtConfig {
    /// `HS256`, `HS384`, `HS512`, `RS256` or `ES256`.
    pub algorithm: String,
    /// The shared secret of the HS algorithms.
    pub secret: Option<String>,
    /// PEM public key of RS256 / ES256.
    pub public_key_file: Option<String>,
    /// Required `iss`, if set.
    pub issuer: Option<String>,
    /// Required `aud`, if set.
    pub audience: Option<String>,
    /// Seconds of clock skew allowed on `exp` and `nbf`.
    pub leeway_s: u64,
}

impl Default for JwtConfig {
    fn default() -> Self {
        JwtConfig {
            algorithm: "HS256".into(),
            secret: None,
            public_key_file: None,
            issuer: None,
            audience: None,
            leeway_s: 30,
        }
    }
}

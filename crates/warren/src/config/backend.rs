//! `[[backend]]`: TCP services this node keeps connections to, grouped by name (docs/backends.md).
//!
//! Plain data, checked by [`BackendConfig::check`]; the groups themselves are built by
//! warren-cluster's `backend` module. Service records use the key names of gobase's service
//! records (`servicename`, `serviceid`, `serviceaddr`, `serviceport`, `routertag`), so a list
//! copied from a gobase deployment fits as it is.

use std::collections::HashSet;

use serde::{Deserialize, Serialize};

use super::Problems;

/// How the bytes of a group's services look.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub enum BackendCodec {
    /// The gobase sample service's frames: `msgid u32 LE · len u32 LE · body`.
    #[default]
    #[serde(rename = "gobase-test")]
    GobaseTest,
}

/// What a group's services are.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BackendKind {
    /// TCP services kept connected, speaking `codec`.
    #[default]
    Tcp,
    /// HTTP services checked by a health probe and called with an HTTP client.
    Http,
}

impl BackendKind {
    /// Its name in config, also the registry scheme its services are kept by default.
    pub fn name(self) -> &'static str {
        match self {
            BackendKind::Tcp => "tcp",
            BackendKind::Http => "http",
        }
    }
}

/// Where a group learns which services it holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BackendDiscovery {
    /// The table's `services` list, read once at start.
    #[default]
    Static,
    /// The live members of a registry (`registry`, `key`, `layout`), watched for changes.
    Registry,
}

/// `[[backend]]`: one group of TCP backend services.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct BackendConfig {
    /// The group's name (lowercased and trimmed, as the services' `servicename`).
    pub group: String,
    /// `tcp` (kept connected) or `http` (health-probed).
    pub kind: BackendKind,
    /// The services' framing.
    pub codec: BackendCodec,
    /// Longest wait for a dial, in seconds; a failed dial is retried every second.
    pub dial_timeout_s: u64,
    /// Deliver a service's messages and ticks one after the other, in order (true), or on a
    /// bounded pool of tasks (false).
    pub msg_seq: bool,
    /// A service that leaves discovery is closed at once (true), or at its next disconnect or
    /// dial failure (false).
    pub immediately: bool,
    /// Bytes a service's outbound queue may hold before sends to it fail with `queue full`.
    pub queue_bytes: usize,
    /// Longest message body accepted from or sent to a service, in bytes; a service that
    /// announces a longer one is disconnected and dialled again.
    pub max_body: usize,
    /// The group's services, as a static list (`discovery = "static"`).
    pub services: Vec<BackendServiceConfig>,
    /// Where the group's services come from: `static` (the `services` list) or `registry`.
    pub discovery: BackendDiscovery,
    /// The registry URL of `discovery = "registry"`: `redis://…` (a gobase key), `nats://…`
    /// (a JetStream key-value bucket of member strings) or `etcd://…` (a key prefix of member
    /// strings; feature `etcd`). Empty: the node's registry (`[registry] url`, `--registry`).
    pub registry: String,
    /// The registry key whose members are the services (Redis: the gobase ZSET key; NATS: the
    /// bucket; etcd: the prefix, each service a key below `<key>/`).
    pub key: String,
    /// The gobase layout of a Redis `key` (`gobase` or `gobase-seconds`); a `?layout=` on the
    /// URL wins.
    pub layout: String,
    /// Keep only registry members of this scheme; empty: the group's `kind` (`tcp` or
    /// `http`, so the gobase sample keeps `tcp`); `any`: every scheme.
    pub scheme: String,
    /// HTTP groups: after the port check, `GET` this path and want a 2xx (`/health`); empty:
    /// the port check alone.
    pub health_path: String,
    /// Every this many seconds, call each connected service with the gobase sample heartbeat
    /// (msgid 1, answered by msgid 2) and log the round trip; 0: no heartbeat.
    pub heartbeat_s: u64,
    /// Longest wait for a heartbeat's answer, in seconds.
    pub heartbeat_timeout_s: u64,
}

impl Default for BackendConfig {
    fn default() -> Self {
        BackendConfig {
            group: String::new(),
            kind: BackendKind::Tcp,
            codec: BackendCodec::default(),
            dial_timeout_s: 30,
            msg_seq: true,
            immediately: false,
            queue_bytes: 4 * 1024 * 1024,
            max_body: 1024 * 1024,
            services: Vec::new(),
            discovery: BackendDiscovery::Static,
            registry: String::new(),
            key: String::new(),
            layout: super::REGISTRY_LAYOUTS[0].into(),
            scheme: String::new(),
            health_path: String::new(),
            heartbeat_s: 0,
            heartbeat_timeout_s: 5,
        }
    }
}

/// One service of a static list, with gobase's key names.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BackendServiceConfig {
    /// Its group; empty means the `group` of the `[[backend]]` table.
    #[serde(default)]
    pub servicename: String,
    /// Its id, unique in the group.
    pub serviceid: String,
    /// Host name or IP address.
    pub serviceaddr: String,
    /// Port.
    pub serviceport: u16,
    /// Routing tag (optional): the service is also on its group's ring for this tag.
    #[serde(default)]
    pub routertag: String,
}

/// How names are compared: trimmed and lowercased (docs/backends.md).
fn norm(s: &str) -> String {
    s.trim().to_lowercase()
}

impl BackendConfig {
    /// Longest `dial_timeout_s`: an hour (more is certainly a typo).
    pub const MAX_DIAL_TIMEOUT_S: u64 = 3600;

    /// The group's name as groups compare it.
    pub fn group_name(&self) -> String {
        norm(&self.group)
    }

    /// The registry scheme whose members the group keeps (`None`: any).
    pub fn member_scheme(&self) -> Option<String> {
        match norm(&self.scheme).as_str() {
            "" => Some(self.kind.name().to_owned()),
            "any" => None,
            s => Some(s.to_owned()),
        }
    }

    pub(super) fn check(&self, key: &str, p: &mut Problems) {
        let group = self.group_name();
        if group.is_empty() {
            p.add(format!("{key}.group"), "must not be empty");
        }
        if self.dial_timeout_s == 0 || self.dial_timeout_s > Self::MAX_DIAL_TIMEOUT_S {
            p.add(
                format!("{key}.dial_timeout_s"),
                format!("must be 1 to {}", Self::MAX_DIAL_TIMEOUT_S),
            );
        }
        if self.queue_bytes == 0 {
            p.add(format!("{key}.queue_bytes"), "must be at least 1");
        }
        if self.max_body == 0 || u32::try_from(self.max_body).is_err() {
            p.add(
                format!("{key}.max_body"),
                format!("must be 1 to {}", u32::MAX),
            );
        }
        if self.discovery == BackendDiscovery::Registry {
            if self.key.trim().is_empty() {
                p.add(
                    format!("{key}.key"),
                    "must name the registry key of the services (discovery = \"registry\")",
                );
            }
            if !self.services.is_empty() {
                p.add(
                    format!("{key}.services"),
                    "a static list and discovery = \"registry\" do not mix (leave one out)",
                );
            }
            let url = self.registry.trim();
            if !url.is_empty()
                && !["redis://", "rediss://", "nats://", "etcd://"]
                    .iter()
                    .any(|s| url.starts_with(s))
            {
                p.add(
                    format!("{key}.registry"),
                    format!(
                        "{url:?}: backend discovery reads a redis://, nats:// or etcd:// registry"
                    ),
                );
            }
        }
        if !super::REGISTRY_LAYOUTS.contains(&self.layout.as_str()) {
            p.add(
                format!("{key}.layout"),
                format!(
                    "{:?} is not one of {}",
                    self.layout,
                    super::REGISTRY_LAYOUTS.join(", ")
                ),
            );
        }
        if self.kind == BackendKind::Http && self.heartbeat_s > 0 {
            p.add(
                format!("{key}.heartbeat_s"),
                "the heartbeat is a call of the gobase test codec: a tcp group's",
            );
        }
        let path = self.health_path.trim();
        if !path.is_empty() && (!path.starts_with('/') || path.contains(char::is_whitespace)) {
            p.add(
                format!("{key}.health_path"),
                format!("{path:?} is not a path (it starts with /)"),
            );
        }
        if self.heartbeat_s > 0
            && (self.heartbeat_timeout_s == 0
                || self.heartbeat_timeout_s > Self::MAX_DIAL_TIMEOUT_S)
        {
            p.add(
                format!("{key}.heartbeat_timeout_s"),
                format!("must be 1 to {}", Self::MAX_DIAL_TIMEOUT_S),
            );
        }
        let mut ids = HashSet::new();
        for (i, s) in self.services.iter().enumerate() {
            let k = format!("{key}.services[{i}]");
            let name = norm(&s.servicename);
            if !name.is_empty() && name != group {
                p.add(
                    format!("{k}.servicename"),
                    format!(
                        "{:?} is not this table's group {:?} (leave it out)",
                        s.servicename, self.group
                    ),
                );
            }
            let id = norm(&s.serviceid);
            if id.is_empty() {
                p.add(format!("{k}.serviceid"), "must not be empty");
            } else if !ids.insert(id) {
                p.add(
                    format!("{k}.serviceid"),
                    format!("{:?} is listed twice in this group", s.serviceid),
                );
            }
            if s.serviceaddr.trim().is_empty() {
                p.add(format!("{k}.serviceaddr"), "must not be empty");
            }
            if s.serviceport == 0 {
                p.add(format!("{k}.serviceport"), "must not be 0");
            }
        }
    }
}

/// Every `[[backend]]` table checked, and no group named twice.
pub(super) fn check_all(backends: &[BackendConfig], p: &mut Problems) {
    let mut groups = HashSet::new();
    for (i, b) in backends.iter().enumerate() {
        let key = format!("backend[{i}]");
        b.check(&key, p);
        let g = b.group_name();
        if !g.is_empty() && !groups.insert(g) {
            p.add(
                format!("{key}.group"),
                format!("group {:?} has another [[backend]] table", b.group),
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use crate::config::Config;

    #[test]
    fn a_static_group_parses_with_gobase_key_names() {
        let c = Config::from_toml(
            r#"
            [[backend]]
            group = "Gate"
            codec = "gobase-test"
            dial_timeout_s = 5
            immediately = true
            services = [
              { servicename = "gate", serviceid = "gate1", serviceaddr = "127.0.0.1", serviceport = 7001 },
              { serviceid = "gate2", serviceaddr = "10.0.0.5", serviceport = 7001, routertag = "red" },
            ]
            "#,
        )
        .expect("parses");
        assert!(c.problems(&[]).is_empty(), "{:?}", c.problems(&[]));
        let b = &c.backends[0];
        assert_eq!(b.group_name(), "gate");
        assert!(b.msg_seq && b.immediately);
        assert_eq!(b.dial_timeout_s, 5);
        assert_eq!(b.services[1].routertag, "red");
        assert!(Config::default().backends.is_empty());
    }

    #[test]
    fn the_example_of_the_docs_is_valid() {
        let page = include_str!("../../../../docs/backends.md");
        let start = page.find("```toml\n").expect("a toml block") + "```toml\n".len();
        let len = page[start..].find("```").expect("its end");
        let c = Config::from_toml(&page[start..start + len]).expect("parses");
        assert!(c.problems(&[]).is_empty(), "{:?}", c.problems(&[]));
        assert_eq!(c.backends[0].services.len(), 2);
        let defaults = super::BackendConfig {
            group: "gate".into(),
            services: c.backends[0].services.clone(),
            ..Default::default()
        };
        assert_eq!(c.backends[0], defaults, "the page shows the defaults");
    }

    #[test]
    fn registry_discovery_and_http_keys_are_checked() {
        let demo = include_str!("../../../../examples/backends/heartbeat.toml");
        let c = Config::from_toml(demo).expect("the demo parses");
        assert!(c.problems(&[]).is_empty(), "{:?}", c.problems(&[]));
        let b = &c.backends[0];
        assert_eq!(b.discovery, super::BackendDiscovery::Registry);
        assert_eq!(b.member_scheme().as_deref(), Some("tcp"));
        assert_eq!((b.heartbeat_s, b.heartbeat_timeout_s), (1, 5));

        let c = Config::from_toml(
            r#"
            [[backend]]
            group = "gate"
            discovery = "registry"
            registry = "zk://127.0.0.1:2181"
            layout = "gobase3"
            services = [{ serviceid = "a", serviceaddr = "h", serviceport = 1 }]
            [[backend]]
            group = "web"
            kind = "http"
            heartbeat_s = 1
            health_path = "health"
            scheme = "any"
            "#,
        )
        .expect("parses");
        let all = c
            .problems(&[])
            .iter()
            .map(|e| e.to_string())
            .collect::<Vec<_>>()
            .join("\n");
        for k in [
            "backend[0].key",
            "backend[0].services",
            "backend[0].registry",
            "backend[0].layout",
            "backend[1].heartbeat_s",
            "backend[1].health_path",
        ] {
            assert!(all.contains(k), "{k} not in {all}");
        }
        assert_eq!(c.backends[1].member_scheme(), None);
        assert_eq!(
            super::BackendConfig::default().member_scheme().as_deref(),
            Some("tcp")
        );
    }

    #[test]
    fn mistakes_are_named() {
        let c = Config::from_toml(
            r#"
            [[backend]]
            group = "gate"
            dial_timeout_s = 0
            services = [
              { servicename = "game", serviceid = "a", serviceaddr = "h", serviceport = 1 },
              { serviceid = "A ", serviceaddr = "", serviceport = 0 },
            ]
            [[backend]]
            group = " GATE"
            "#,
        )
        .expect("parses");
        let keys: Vec<String> = c
            .problems(&[])
            .iter()
            .map(|e| e.to_string())
            .collect::<Vec<_>>();
        let all = keys.join("\n");
        for k in [
            "backend[0].dial_timeout_s",
            "backend[0].services[0].servicename",
            "backend[0].services[1].serviceid",
            "backend[0].services[1].serviceaddr",
            "backend[0].services[1].serviceport",
            "backend[1].group",
        ] {
            assert!(all.contains(k), "{k} not in {all}");
        }
        assert!(
            Config::from_toml("[[backend]]\ngroup = \"g\"\nservice = []\n").is_err(),
            "unknown key"
        );
        assert!(
            Config::from_toml("[[backend]]\ngroup = \"g\"\ncodec = \"json\"\n").is_err(),
            "unknown codec"
        );
    }
}

//! What a running node takes from its config file again on SIGHUP, and what stays as it started
//! until a restart: so that what the admin API shows as the config in force
//! (`GET /admin/config`) is the node's, not the file's. The node's side of the reload is
//! `Node::reload` (node/mod.rs); the two lists must match.

use super::Config;

/// The keys SIGHUP reloads (`listener[].KEY`: of each listener the node started with, matched by
/// position); every other key stays as the node started until it restarts.
pub const RELOADABLE: &[&str] = &[
    "access",
    "auth",
    "listener[].allow",
    "listener[].deny",
    "listener[].tls_cert",
    "listener[].tls_key",
    "listener[].tls_client_ca",
];

impl Config {
    /// The config in force after a node running `self` reloaded `file` without an error: `self`
    /// with the [`RELOADABLE`] keys of `file`. A listener the file adds is not bound; one it
    /// drops keeps its settings; TLS files are taken only by a listener that serves TLS already
    /// (a plain listener does not start TLS on a reload).
    pub fn reloaded(&self, file: &Config) -> Config {
        let mut c = self.clone();
        c.access = file.access.clone();
        c.auth = file.auth.clone();
        for (l, new) in c.listeners.iter_mut().zip(&file.listeners) {
            l.allow = new.allow.clone();
            l.deny = new.deny.clone();
            if l.tls() {
                l.tls_cert = new.tls_cert.clone();
                l.tls_key = new.tls_key.clone();
                l.tls_client_ca = new.tls_client_ca.clone();
            }
        }
        c
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const STARTED: &str = r#"
[node]
id = "n1"

[[listener]]
protocol = "mqtt"
addr = "127.0.0.1:8883"
tls_cert = "old-cert.pem"
tls_key = "old-key.pem"
allow = ["10.0.0.0/8"]

[[listener]]
protocol = "pomelo"
addr = "127.0.0.1:3010"

[access]
deny = ["192.0.2.1"]

[auth]
acl_file = "old-acl"
"#;

    #[test]
    fn the_reloadable_keys_come_from_the_file_and_the_rest_stays() {
        let started = Config::from_toml(STARTED).expect("parses");
        let file = Config::from_toml(
            r#"
[node]
id = "renamed"

[[listener]]
protocol = "mqtt"
addr = "127.0.0.1:9999"
tls_cert = "new-cert.pem"
tls_key = "new-key.pem"
deny = ["10.9.0.0/16"]

[[listener]]
protocol = "pomelo"
addr = "127.0.0.1:3010"
tls_cert = "cert.pem"
tls_key = "key.pem"

[[listener]]
protocol = "line"
addr = "127.0.0.1:10241"

[access]
allow = ["127.0.0.1"]

[auth]
acl_file = "new-acl"
uid_conflict = "kick_old"
"#,
        )
        .expect("parses");
        let now = started.reloaded(&file);
        assert_eq!(now.node.id, "n1", "[node] is fixed until a restart");
        assert_eq!(now.listeners.len(), 2, "a new listener is not bound");
        let mqtt = &now.listeners[0];
        assert_eq!(mqtt.addr, "127.0.0.1:8883");
        assert_eq!(mqtt.tls_cert.as_deref(), Some("new-cert.pem"));
        assert_eq!(mqtt.tls_key.as_deref(), Some("new-key.pem"));
        assert!(mqtt.allow.is_empty());
        assert_eq!(mqtt.deny, ["10.9.0.0/16"]);
        assert!(!now.listeners[1].tls(), "a plain listener stays plain");
        assert_eq!(now.access, file.access);
        assert_eq!(now.auth, file.auth);
    }

    #[test]
    fn reloading_the_same_file_changes_nothing() {
        let started = Config::from_toml(STARTED).expect("parses");
        assert_eq!(started.reloaded(&started), started);
    }
}

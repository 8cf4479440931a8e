//! `GET /admin/config` (docs/admin-api.md): the effective configuration of this node as JSON,
//! with its secrets replaced by `"<redacted>"`, so an operator can see what a node runs with
//! without the API handing out what lets one impersonate it.
//!
//! What is redacted: the value of every key that names a secret (`token`, `secret`, `password`,
//! `passwd`, `credentials`, `private_key`, `api_key`… — but not `*_file`, `*_path` or `*_dir`
//! keys, which hold paths and are shown), any string holding PEM key material, and the
//! credentials inside URLs (`amqp://user:<redacted>@host`, `redis://:<redacted>@host`, a NATS
//! token `nats://<redacted>@host`) and in their query (`?password=<redacted>`).
//!
//! The config shown is the one in force ([`ConfigInForce`]): the node's start config, then,
//! after each SIGHUP that reloaded without an error, that one with the reloadable keys of the
//! file ([`warren::config::RELOADABLE`]), so an operator sees what the node runs with, not
//! what the file says now.

use std::sync::{PoisonError, RwLock};
use std::time::SystemTime;

use serde_json::{Map, Value, json};
use warren::config::{Config, RELOADABLE};

use super::rfc3339;

/// The config a running node is using, kept up to date by the SIGHUP reload (serve.rs
/// `reload_config`) and read by `GET /admin/config`.
pub(crate) struct ConfigInForce {
    state: RwLock<InForce>,
}

/// What [`ConfigInForce`] holds.
struct InForce {
    config: Config,
    /// When `config` was read: the start, or the last reload that succeeded.
    loaded_at: SystemTime,
    /// How many reloads succeeded.
    reloads: u64,
    /// The last SIGHUP's outcome, if there was one.
    last_reload: Option<LastReload>,
}

/// One SIGHUP's outcome.
struct LastReload {
    at: SystemTime,
    /// Empty when it succeeded.
    errors: Vec<String>,
}

impl ConfigInForce {
    /// The config the node started with.
    pub(crate) fn new(started: Config) -> ConfigInForce {
        ConfigInForce {
            state: RwLock::new(InForce {
                config: started,
                loaded_at: SystemTime::now(),
                reloads: 0,
                last_reload: None,
            }),
        }
    }

    /// The node reloaded `file` without an error: its reloadable keys are in force now.
    pub(crate) fn reloaded(&self, file: &Config) {
        let mut s = self.state.write().unwrap_or_else(PoisonError::into_inner);
        s.config = s.config.reloaded(file);
        s.loaded_at = SystemTime::now();
        s.reloads += 1;
        s.last_reload = Some(LastReload {
            at: s.loaded_at,
            errors: Vec::new(),
        });
    }

    /// A reload failed (the file does not load, or the node refused part of it): the config
    /// shown stays as it was, and the errors are shown with it.
    pub(crate) fn failed(&self, errors: Vec<String>) {
        let mut s = self.state.write().unwrap_or_else(PoisonError::into_inner);
        s.last_reload = Some(LastReload {
            at: SystemTime::now(),
            errors,
        });
    }

    /// The answer of `GET /admin/config` (without the node's name), secrets redacted.
    pub(super) fn shown(&self) -> Map<String, Value> {
        let s = self.state.read().unwrap_or_else(PoisonError::into_inner);
        let last = s.last_reload.as_ref().map(|r| {
            json!({
                "at": rfc3339(r.at),
                "ok": r.errors.is_empty(),
                "errors": r.errors.iter().map(|e| redact_str(e)).collect::<Vec<_>>(),
            })
        });
        let mut out = Map::new();
        out.insert("config".into(), effective(&s.config));
        out.insert("loaded_at".into(), rfc3339(s.loaded_at).into());
        out.insert("reloads".into(), s.reloads.into());
        out.insert("last_reload".into(), last.unwrap_or(Value::Null));
        out.insert("reloadable".into(), RELOADABLE.into());
        out
    }
}

/// What a redacted value reads.
pub(super) const REDACTED: &str = "<redacted>";

/// Words that make a key's value a secret.
const SECRET_WORDS: &[&str] = &[
    "token",
    "secret",
    "password",
    "passwd",
    "credential",
    "private_key",
    "api_key",
    "apikey",
    "access_key",
];

/// Whether a key's value is a secret by its name.
fn secret_key(key: &str) -> bool {
    let k = key.to_ascii_lowercase();
    if k.ends_with("_file") || k.ends_with("_path") || k.ends_with("_dir") {
        return false;
    }
    SECRET_WORDS.iter().any(|w| k.contains(w))
}

/// `v` with its secrets redacted (see the module's doc).
pub(super) fn redact(v: Value) -> Value {
    match v {
        Value::Object(m) => Value::Object(
            m.into_iter()
                .map(|(k, v)| {
                    let v = if secret_key(&k) && !is_empty(&v) {
                        Value::String(REDACTED.to_owned())
                    } else {
                        redact(v)
                    };
                    (k, v)
                })
                .collect::<Map<String, Value>>(),
        ),
        Value::Array(a) => Value::Array(a.into_iter().map(redact).collect()),
        Value::String(s) => Value::String(redact_str(&s)),
        other => other,
    }
}

/// Nothing to hide: null, an empty string, an empty list or table.
fn is_empty(v: &Value) -> bool {
    match v {
        Value::Null => true,
        Value::String(s) => s.is_empty(),
        Value::Array(a) => a.is_empty(),
        Value::Object(o) => o.is_empty(),
        _ => false,
    }
}

/// A string with key material hidden and the credentials of the URLs in it replaced (a list of
/// URLs separated by commas is handled URL by URL).
pub(super) fn redact_str(s: &str) -> String {
    if s.contains("-----BEGIN") {
        return REDACTED.to_owned();
    }
    if !s.contains("://") {
        return s.to_owned();
    }
    s.split(',').map(redact_url).collect::<Vec<_>>().join(",")
}

/// One URL with the password of its userinfo (or the whole userinfo when it has no `:`, a
/// token) and secret query values replaced.
fn redact_url(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_owned();
    };
    let authority_end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    let (authority, tail) = rest.split_at(authority_end);
    let authority = match authority.rsplit_once('@') {
        Some((userinfo, host)) => match userinfo.split_once(':') {
            Some((user, _)) => format!("{user}:{REDACTED}@{host}"),
            None => format!("{REDACTED}@{host}"),
        },
        None => authority.to_owned(),
    };
    let tail = match tail.split_once('?') {
        Some((path, query)) => {
            let (query, fragment) = match query.split_once('#') {
                Some((q, f)) => (q, Some(f)),
                None => (query, None),
            };
            let query: Vec<String> = query
                .split('&')
                .map(|pair| match pair.split_once('=') {
                    Some((k, v)) if secret_key(k) && !v.is_empty() => format!("{k}={REDACTED}"),
                    _ => pair.to_owned(),
                })
                .collect();
            let mut t = format!("{path}?{}", query.join("&"));
            if let Some(f) = fragment {
                t.push('#');
                t.push_str(f);
            }
            t
        }
        None => tail.to_owned(),
    };
    format!("{scheme}://{authority}{tail}")
}

/// The effective config of a node as the API shows it.
pub(super) fn effective(config: &Config) -> Value {
    match serde_json::to_value(config) {
        Ok(v) => redact(v),
        Err(e) => {
            serde_json::json!({ "error": format!("the configuration does not serialize: {e}") })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn credentials_inside_urls_are_redacted() {
        assert_eq!(
            redact_str("amqp://guest:guest@127.0.0.1:5672/%2f"),
            "amqp://guest:<redacted>@127.0.0.1:5672/%2f"
        );
        assert_eq!(
            redact_str("redis://:s3cret@10.0.0.1:6379/0"),
            "redis://:<redacted>@10.0.0.1:6379/0"
        );
        assert_eq!(
            redact_str("nats://tok3n@n1:4222,nats://u:p@n2:4222"),
            "nats://<redacted>@n1:4222,nats://u:<redacted>@n2:4222"
        );
        assert_eq!(
            redact_str("redis://h:6379/0?layout=gobase&password=x#f"),
            "redis://h:6379/0?layout=gobase&password=<redacted>#f"
        );
        // a password with an @ in it: the host is after the last one
        assert_eq!(
            redact_str("nats://u:p@ss@h:4222"),
            "nats://u:<redacted>@h:4222"
        );
        assert_eq!(redact_str("nats://127.0.0.1:4222"), "nats://127.0.0.1:4222");
        assert_eq!(redact_str("127.0.0.1:1883"), "127.0.0.1:1883");
        assert_eq!(
            redact_str("-----BEGIN PRIVATE KEY-----\nMII…"),
            "<redacted>"
        );
    }

    #[test]
    fn secret_keys_are_redacted_and_paths_shown() {
        let config = json!({
            "admin": { "addr": "127.0.0.1:9090", "token": "t0ken" },
            "auth": {
                "password_file": "/etc/warren/passwd",
                "jwt": { "secret": "hs-secret", "public_key_file": "/etc/jwt.pem", "issuer": null },
                "http": { "url": "https://u:p@auth.example/check" },
            },
            "bus": { "url": "amqp://u:pw@mq:5672/" },
            "listener": [ { "tls_key": "/etc/tls/key.pem", "password": "", "protocol": "mqtt" } ],
            "module": [ { "settings": { "api_key": "k", "db_password": "x", "count": 3 } } ],
            "registry": { "key": "warren", "token": null },
        });
        let out = redact(config);
        assert_eq!(out["admin"]["token"], "<redacted>");
        assert_eq!(out["admin"]["addr"], "127.0.0.1:9090");
        assert_eq!(out["auth"]["password_file"], "/etc/warren/passwd");
        assert_eq!(out["auth"]["jwt"]["secret"], "<redacted>");
        assert_eq!(out["auth"]["jwt"]["public_key_file"], "/etc/jwt.pem");
        assert_eq!(out["auth"]["jwt"]["issuer"], Value::Null);
        assert_eq!(
            out["auth"]["http"]["url"],
            "https://u:<redacted>@auth.example/check"
        );
        assert_eq!(out["bus"]["url"], "amqp://u:<redacted>@mq:5672/");
        assert_eq!(out["listener"][0]["tls_key"], "/etc/tls/key.pem");
        assert_eq!(out["listener"][0]["password"], "");
        assert_eq!(out["module"][0]["settings"]["api_key"], "<redacted>");
        assert_eq!(out["module"][0]["settings"]["db_password"], "<redacted>");
        assert_eq!(out["module"][0]["settings"]["count"], 3);
        assert_eq!(out["registry"]["key"], "warren");
        assert_eq!(out["registry"]["token"], Value::Null);
    }

    #[test]
    fn a_successful_reload_shows_the_files_reloadable_keys_and_a_failed_one_keeps_them() {
        let mut started = Config::default();
        started.node.id = "n1".into();
        started.auth.acl_file = Some("/etc/warren/acl".into());
        started.auth.jwt = Some(warren::config::JwtConfig {
            secret: Some("hs-secret".into()),
            ..Default::default()
        });
        let in_force = ConfigInForce::new(started.clone());
        let shown = in_force.shown();
        assert_eq!(shown["reloads"], 0);
        assert_eq!(shown["last_reload"], Value::Null);
        assert_eq!(shown["config"]["auth"]["acl_file"], "/etc/warren/acl");
        assert!(
            shown["reloadable"]
                .as_array()
                .is_some_and(|a| a.contains(&json!("auth")))
        );

        let mut file = started.clone();
        file.node.id = "renamed".into();
        file.auth.acl_file = Some("/etc/warren/acl.new".into());
        file.access.deny = vec!["192.0.2.1".into()];
        in_force.reloaded(&file);
        let shown = in_force.shown();
        assert_eq!(shown["reloads"], 1);
        assert_eq!(shown["last_reload"]["ok"], true);
        assert_eq!(shown["config"]["auth"]["acl_file"], "/etc/warren/acl.new");
        assert_eq!(shown["config"]["access"]["deny"], json!(["192.0.2.1"]));
        assert_eq!(shown["config"]["node"]["id"], "n1", "fixed until a restart");
        assert_eq!(shown["config"]["auth"]["jwt"]["secret"], REDACTED);

        in_force.failed(vec![
            "auth.acl_file: /etc/warren/acl.bad:3: bad line".into(),
        ]);
        let after = in_force.shown();
        assert_eq!(after["config"], shown["config"]);
        assert_eq!(after["loaded_at"], shown["loaded_at"]);
        assert_eq!(after["reloads"], 1);
        assert_eq!(after["last_reload"]["ok"], false);
        assert_eq!(
            after["last_reload"]["errors"],
            json!(["auth.acl_file: /etc/warren/acl.bad:3: bad line"])
        );
    }

    #[test]
    fn the_default_config_shows_no_token() {
        let mut c = warren::config::Config::default();
        c.admin.token = Some("hunter2".into());
        c.bus.url = "nats://user:hunter2@127.0.0.1:4222".into();
        let text = effective(&c).to_string();
        assert!(!text.contains("hunter2"), "{text}");
        assert!(text.contains("<redacted>"));
    }
}

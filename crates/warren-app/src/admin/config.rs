//! `GET /admin/config` (docs/admin-api.md): the effective configuration of this node as JSON,
//! with its secrets replaced by `"<redacted>"`, so an operator can see what a node runs with
//! without the API handing out what lets one impersonate it.
//!
//! What is redacted: the value of every key that names a secret (`token`, `secret`, `password`,
//! `passwd`, `credentials`, `private_key`, `api_key`… — but not `*_file`, `*_path` or `*_dir`
//! keys, which hold paths and are shown), any string holding PEM key material, and the
//! credentials inside URLs (`amqp://user:<redacted>@host`, `redis://:<redacted>@host`, a NATS
//! token `nats://<redacted>@host`) and in their query (`?password=<redacted>`).

use serde_json::{Map, Value};

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
pub(super) fn effective(config: &warren::config::Config) -> Value {
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
    fn the_default_config_shows_no_token() {
        let mut c = warren::config::Config::default();
        c.admin.token = Some("hunter2".into());
        c.bus.url = "nats://user:hunter2@127.0.0.1:4222".into();
        let text = effective(&c).to_string();
        assert!(!text.contains("hunter2"), "{text}");
        assert!(text.contains("<redacted>"));
    }
}

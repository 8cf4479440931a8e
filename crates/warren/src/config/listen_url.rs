//! `--listen` URLs: a listener on the command line, `mqtt+mqant://127.0.0.1:3563?max_conn=100`.
//!
//! The scheme names the protocol (and its network, framing, mode and TLS), the authority the
//! address, and query parameters are listener keys. The URL becomes the TOML table a config file
//! would hold and goes through the same reading (config/source.rs), so a key of another protocol
//! is refused with the same message as in a file, named `--listen.KEY`.

use super::listener::{ListenerConfig, Protocol};
use super::{ConfigError, Problems, first, source};

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

/// What a scheme sets: its names (the first is the one [`LISTENER_SCHEMES`] lists, the others
/// aliases), the protocol, the keys it fixes besides `protocol` and `addr`, and whether it
/// serves TLS.
struct Scheme {
    names: &'static [&'static str],
    protocol: Protocol,
    keys: &'static [(&'static str, &'static str)],
    tls: bool,
}

const fn scheme(
    names: &'static [&'static str],
    protocol: Protocol,
    keys: &'static [(&'static str, &'static str)],
    tls: bool,
) -> Scheme {
    Scheme {
        names,
        protocol,
        keys,
        tls,
    }
}

const MQTT_TCP: &[(&str, &str)] = &[("network", "tcp"), ("mode", "default")];
const MQANT_TCP: &[(&str, &str)] = &[("network", "tcp"), ("mode", "mqant")];
const MQTT_WS: &[(&str, &str)] = &[("network", "ws"), ("mode", "default")];
const MQANT_WS: &[(&str, &str)] = &[("network", "ws"), ("mode", "mqant")];
const RPC_MQTT: &[(&str, &str)] = &[("framing", "mqtt")];
const RPC_TCP: &[(&str, &str)] = &[("framing", "tcp")];

const SCHEMES: &[Scheme] = &[
    scheme(&["mqtt", "tcp"], Protocol::Mqtt, MQTT_TCP, false),
    scheme(&["mqtts", "ssl"], Protocol::Mqtt, MQTT_TCP, true),
    scheme(&["mqtt+mqant"], Protocol::Mqtt, MQANT_TCP, false),
    scheme(&["mqtts+mqant"], Protocol::Mqtt, MQANT_TCP, true),
    scheme(&["ws", "mqtt+ws"], Protocol::Mqtt, MQTT_WS, false),
    scheme(&["wss", "mqtt+wss"], Protocol::Mqtt, MQTT_WS, true),
    scheme(&["ws+mqant"], Protocol::Mqtt, MQANT_WS, false),
    scheme(&["wss+mqant"], Protocol::Mqtt, MQANT_WS, true),
    scheme(&["pomelo"], Protocol::Pomelo, &[], false),
    scheme(&["pomelo+tls"], Protocol::Pomelo, &[], true),
    scheme(&["json+ws", "json"], Protocol::Json, &[], false),
    scheme(&["json+wss"], Protocol::Json, &[], true),
    scheme(&["line"], Protocol::Line, &[], false),
    scheme(&["line+tls"], Protocol::Line, &[], true),
    scheme(&["pomelo-rpc"], Protocol::PomeloRpc, RPC_MQTT, false),
    scheme(&["pomelo-rpc+tls"], Protocol::PomeloRpc, RPC_MQTT, true),
    scheme(&["pomelo-rpc+tcp"], Protocol::PomeloRpc, RPC_TCP, false),
    scheme(&["pomelo-rpc+tcp+tls"], Protocol::PomeloRpc, RPC_TCP, true),
];

/// A `--listen` query value as the TOML value its key takes (see [`ListenerConfig::from_url`]).
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
        "fallback_module" | "login_handler" | "handler" | "tls_cert" | "tls_key"
        | "tls_client_ca" | "plugin" | "python_msg_type" => {
            toml::Value::String(percent_decode(raw))
        }
        _ => guess(percent_decode(raw)),
    })
}

impl ListenerConfig {
    /// A listener from a URL such as `mqtt+mqant://127.0.0.1:3563?rpc_expired_s=1` (the
    /// `--listen` flag; [`LISTENER_SCHEMES`] lists the schemes). Query parameters are listener
    /// keys, read by the key's type: lists (`allow`, `deny`, `handler_prefixes`, `namespaces`)
    /// are comma-separated, maps (`service_map`, `route_dict`) are comma-separated `NAME:VALUE`
    /// pairs (`service_map=service:Echo,chat:Chat`), and other values are integers or booleans
    /// when they look like one. Values are percent-decoded after splitting, so `%2C` and `%3A`
    /// are a literal `,` and `:`. A key the scheme's protocol does not take is refused as in a
    /// config file.
    ///
    /// Errors name the key as `--listen.KEY` (or `--listen` for the URL itself).
    pub fn from_url(url: &str) -> Result<ListenerConfig, ConfigError> {
        let bad = |why: String| ConfigError::invalid("--listen", why);
        let (name, rest) = url
            .split_once("://")
            .ok_or_else(|| bad(format!("{url:?} is not a URL like mqtt://127.0.0.1:1883")))?;
        let Some(scheme) = SCHEMES.iter().find(|s| s.names.contains(&name)) else {
            return Err(bad(format!(
                "unknown scheme {name:?} (expected {})",
                LISTENER_SCHEMES.join(", ")
            )));
        };
        let (authority, query) = rest.split_once('?').unwrap_or((rest, ""));
        let addr = authority.split('/').next().unwrap_or_default();
        let mut t = toml::Table::new();
        t.insert(
            "protocol".into(),
            super::listener::protocol_name(scheme.protocol).into(),
        );
        for (k, v) in scheme.keys {
            t.insert((*k).into(), (*v).into());
        }
        t.insert("addr".into(), addr.into());
        // what the URL itself says (network and framing under their old name too)
        let fixed = |k: &str| {
            matches!(k, "protocol" | "addr")
                || scheme.keys.iter().any(|(key, _)| *key == k)
                || (k == "transport" && !scheme.keys.is_empty())
        };
        for kv in query.split('&').filter(|s| !s.is_empty()) {
            let (k, v) = kv.split_once('=').unwrap_or((kv, "true"));
            let k = percent_decode(k);
            if fixed(&k) {
                return Err(ConfigError::invalid(
                    format!("--listen.{k}"),
                    format!("set by the URL itself ({name}://ADDRESS), not a query parameter"),
                ));
            }
            let value = url_value(&k, v)
                .map_err(|why| ConfigError::invalid(format!("--listen.{k}"), why))?;
            t.insert(k, value);
        }
        // the same reading as a config file's [[listener]], keys named `--listen.KEY`
        let text = toml::to_string(&t).map_err(|e| bad(format!("{url}: {e}")))?;
        let on_flag = |e: ConfigError| match e {
            ConfigError::Invalid { key, why, .. } => {
                ConfigError::invalid(format!("--listen.{key}"), why)
            }
            other => other,
        };
        let l: ListenerConfig = source::Source::parse(&text)
            .and_then(|src| src.deserialize_all(source::Shape::Listener))
            .map_err(|errors| on_flag(first(errors)))?;
        if scheme.tls != l.tls() {
            return Err(bad(if scheme.tls {
                format!("{name}:// serves TLS: give ?tls_cert=FILE&tls_key=FILE")
            } else {
                format!("tls_cert on {name}://: use the TLS scheme (mqtts://, wss://, …)")
            }));
        }
        let mut p = Problems::default();
        l.check("--listen", &mut p);
        match p.0.into_iter().next() {
            Some(e) => Err(e),
            None => Ok(l),
        }
    }
}

/// Decode `%XX` escapes (and `+` as a space) in a URL query value.
pub(super) fn percent_decode(s: &str) -> String {
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

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::config::{LineHandler, Mode, Network, ProtocolOptions, RpcFraming};

    #[test]
    fn listener_urls() {
        let l = ListenerConfig::from_url(
            "mqtt+mqant://127.0.0.1:4000?rpc_expired_s=1&pingresp_d2=true",
        )
        .unwrap();
        let o = l.protocol.mqtt().expect("an MQTT listener");
        assert_eq!(o.mode, Mode::Mqant);
        assert!(o.pingresp_d2);
        assert_eq!(o.max_packet(), 4096);
        assert_eq!(l.rpc_expired(), Duration::from_secs(1));
        let l = ListenerConfig::from_url("ws://0.0.0.0:9001/mqtt").unwrap();
        assert_eq!(l.network(), Network::Ws);
        assert!(ListenerConfig::from_url("mqtt://127.0.0.1:1?bogus=1").is_err());
        let l = ListenerConfig::from_url("json+ws://127.0.0.1:1?login_handler=Debug%2FCheckLogin")
            .unwrap();
        let o = l.protocol.json().expect("a JSON listener");
        assert_eq!(o.login_handler.as_deref(), Some("Debug/CheckLogin"));
        let l = ListenerConfig::from_url("line://127.0.0.1:1?handler=router").unwrap();
        assert_eq!(
            l.protocol.line().map(|o| o.handler),
            Some(LineHandler::Router)
        );
        let l = ListenerConfig::from_url("pomelo-rpc+tcp://127.0.0.1:1").unwrap();
        assert_eq!(
            l.protocol.pomelo_rpc().map(|o| o.framing),
            Some(RpcFraming::Tcp)
        );
        assert_eq!(percent_decode("a%2"), "a%2");
        assert_eq!(percent_decode("a+b%41"), "a bA");
        assert!(ListenerConfig::from_url("http://127.0.0.1:1").is_err());
        assert!(ListenerConfig::from_url("mqtt://nowhere").is_err());
    }

    #[test]
    fn maps_and_lists_in_listener_urls() {
        let l = ListenerConfig::from_url(
            "pomelo-rpc://127.0.0.1:1?service_map=service:Echo,chat:Chat&namespaces=sys,user,game",
        )
        .unwrap();
        let ProtocolOptions::PomeloRpc(o) = l.protocol else {
            panic!("a pomelo-rpc listener: {l:?}");
        };
        assert_eq!(
            o.service_map.get("service").map(String::as_str),
            Some("Echo")
        );
        assert_eq!(o.service_map.get("chat").map(String::as_str), Some("Chat"));
        assert_eq!(o.namespaces, ["sys", "user", "game"]);
        let l = ListenerConfig::from_url(
            "pomelo://127.0.0.1:1?route_dict=Chat.HD_Say:1,Login.HD_Login:2",
        )
        .unwrap();
        let dict = &l.protocol.pomelo().expect("a pomelo listener").route_dict;
        assert_eq!(dict.get("Chat.HD_Say"), Some(&1));
        assert_eq!(dict.get("Login.HD_Login"), Some(&2));
        // a literal comma or colon is percent-encoded
        let l =
            ListenerConfig::from_url("pomelo-rpc://127.0.0.1:1?service_map=a%3Ab:Echo").unwrap();
        let o = l.protocol.pomelo_rpc().expect("a pomelo-rpc listener");
        assert!(o.service_map.contains_key("a:b"));
        let e = ListenerConfig::from_url("pomelo-rpc://127.0.0.1:1?service_map=Echo")
            .unwrap_err()
            .to_string();
        assert!(
            e.starts_with("--listen.service_map: \"Echo\" is not a NAME:VALUE pair"),
            "{e}"
        );
        // strings stay strings even when they look like numbers
        let l = ListenerConfig::from_url("json+ws://127.0.0.1:1?fallback_module=123").unwrap();
        let o = l.protocol.json().expect("a JSON listener");
        assert_eq!(o.fallback_module, "123");
    }

    #[test]
    fn listener_url_errors_have_one_prefix() {
        let e = |url: &str| ListenerConfig::from_url(url).unwrap_err().to_string();
        assert_eq!(
            e("line://127.0.0.1:1?handler=nope"),
            "--listen.handler: unknown variant `nope`, expected `echo` or `router`"
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
            e("mqtt://127.0.0.1:1?mode=mqant"),
            "--listen.mode: set by the URL itself (mqtt://ADDRESS), not a query parameter"
        );
        assert!(e("ws://127.0.0.1:1?transport=tcp").starts_with("--listen.transport: set by"));
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
    fn a_query_key_of_another_protocol_is_refused_as_in_a_file() {
        let e = |url: &str| ListenerConfig::from_url(url).unwrap_err().to_string();
        assert_eq!(
            e("mqtt://127.0.0.1:1?heartbeat_s=5"),
            "--listen.heartbeat_s: unknown key `heartbeat_s`: it applies to pomelo listeners, not mqtt"
        );
        assert_eq!(
            e("pomelo://127.0.0.1:1?push_qos=0"),
            "--listen.push_qos: unknown key `push_qos`: it applies to mqtt listeners, not pomelo"
        );
        assert_eq!(
            e("pomelo://127.0.0.1:1?transport=ws"),
            "--listen.transport: unknown key `transport`: it applies to mqtt and pomelo-rpc listeners, not pomelo"
        );
        assert!(ListenerConfig::from_url("json+ws://127.0.0.1:1?max_packet=100").is_ok());
    }
}

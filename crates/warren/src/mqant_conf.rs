//! Reading mqant's `server.conf` (docs/protocols/mqtt.md, "mqant's server.conf"), so an mqant
//! deployment's config runs on warren unchanged and `warren config convert` can print the
//! equivalent TOML.
//!
//! The file is JSON with full-line `//` comments; keys match case-insensitively, as Go's
//! `encoding/json` does. The `Gate` module's settings become two mqant-mode listeners; `Mqtt`
//! timeouts become listener settings; every other module becomes a `[[module]]` instance.

use serde_json::{Map, Value};

use crate::config::{
    Config, ConfigError, DEFAULT_PROCESS_ID, ListenerConfig, Mode, ModuleBusConfig, ModuleConfig,
    MqttOptions, Network, ProtocolOptions,
};

/// Whether text is mqant's JSON shape: its first character outside whitespace and `//` lines is `{`.
pub fn is_mqant_json(text: &str) -> bool {
    strip_comments(text).trim_start().starts_with('{')
}

/// Drop every line whose text, after leading spaces and tabs, starts with `//` (end-of-line
/// comments are not allowed by the format).
fn strip_comments(text: &str) -> String {
    text.lines()
        .map(|l| {
            if l.trim_start_matches([' ', '\t']).starts_with("//") {
                ""
            } else {
                l
            }
        })
        .collect::<Vec<_>>()
        .join("\n")
}

fn get<'a>(o: &'a Map<String, Value>, key: &str) -> Option<&'a Value> {
    o.iter()
        .find(|(k, _)| k.eq_ignore_ascii_case(key))
        .map(|(_, v)| v)
}

fn invalid(key: &str, why: impl Into<String>) -> ConfigError {
    ConfigError::invalid(key, why)
}

fn number(o: &Map<String, Value>, key: &str, path: &str) -> Result<Option<u64>, ConfigError> {
    match get(o, key) {
        None | Some(Value::Null) => Ok(None),
        Some(v) => v.as_u64().map(Some).ok_or_else(|| {
            invalid(
                &format!("{path}.{key}"),
                format!("must be a JSON number, got {v}"),
            )
        }),
    }
}

fn string<'a>(o: &'a Map<String, Value>, key: &str) -> Option<&'a str> {
    get(o, key).and_then(Value::as_str)
}

/// Top-level sections of a `server.conf` that warren reads; any other is ignored with a warning.
const READ: [&str; 4] = ["Module", "Mqtt", "Rpc", "Master"];

/// Convert mqant's `server.conf` into a warren config for a node of the process group
/// [`DEFAULT_PROCESS_ID`] (mqant's default `-pid`). Returns the config and warnings about what
/// was ignored.
pub fn from_mqant_json(text: &str) -> Result<(Config, Vec<String>), ConfigError> {
    from_mqant_json_as(text, DEFAULT_PROCESS_ID)
}

/// Convert mqant's `server.conf` into the config of a node of process group `process_id`, as
/// mqant's `-pid` picks what a process runs: instances whose `ProcessID` is another group's
/// become peers' entries (`process_id` set, reached over the bus); a `Gate` instance of this
/// group becomes the node's listeners and gate id, one of another group a remote `Gate` entry,
/// so that session operations on its sessions travel to it. Returns the config and warnings
/// about what was ignored.
pub fn from_mqant_json_as(
    text: &str,
    process_id: &str,
) -> Result<(Config, Vec<String>), ConfigError> {
    let json: Value =
        serde_json::from_str(&strip_comments(text)).map_err(|e| ConfigError::Parse {
            line: Some(e.line()),
            column: Some(e.column()),
            message: e.to_string(),
        })?;
    let root = json
        .as_object()
        .ok_or_else(|| invalid("(root)", "must be a JSON object"))?;
    let mut warnings = Vec::new();
    let mut config = Config::default();
    config.http.enabled = false;
    config.listeners.clear();
    config.node.process_id = process_id.to_owned();

    for key in root.keys() {
        if !READ.iter().any(|r| r.eq_ignore_ascii_case(key)) {
            warnings.push(format!("{key} is ignored: warren has no equivalent"));
        }
    }
    let mqtt = get(root, "Mqtt").and_then(Value::as_object);
    let (idle, write, queue) = match mqtt {
        Some(m) => (
            number(m, "ReadTimeout", "Mqtt")?,
            number(m, "WriteTimeout", "Mqtt")?,
            // mqant's own spelling, and the corrected one
            number(m, "WirteLoopChanNum", "Mqtt")?.or(number(m, "WriteLoopChanNum", "Mqtt")?),
        ),
        None => (None, None, None),
    };
    let rpc_expired = match get(root, "Rpc").and_then(Value::as_object) {
        Some(r) => {
            for key in r.keys() {
                if !key.eq_ignore_ascii_case("RpcExpired") {
                    warnings.push(format!("Rpc.{key} is ignored"));
                }
            }
            number(r, "RpcExpired", "Rpc")?.filter(|v| *v > 0)
        }
        None => None,
    };
    // mqant's Master is a module type of its own (`MasterType`, "Master" by default)
    let master_type = get(root, "Master")
        .and_then(Value::as_object)
        .and_then(|m| string(m, "MasterType"))
        .filter(|t| !t.is_empty())
        .unwrap_or("Master")
        .to_owned();
    if get(root, "Master").is_some() {
        warnings.push("Master is ignored: warren's admin API replaces it".into());
    }
    let modules = get(root, "Module")
        .and_then(Value::as_object)
        .ok_or_else(|| invalid("Module", "missing: the file names no modules"))?;
    let mut ids: Vec<String> = Vec::new();
    let mut own_gate = false;
    for (kind, instances) in modules {
        let list = instances
            .as_array()
            .ok_or_else(|| invalid(&format!("Module.{kind}"), "must be a list of instances"))?;
        if kind.eq_ignore_ascii_case(&master_type) {
            warnings.push(format!(
                "Module.{kind} is ignored: it is mqant's Master (warren's admin API replaces it)"
            ));
            continue;
        }
        for (i, inst) in list.iter().enumerate() {
            let path = format!("Module.{kind}[{i}]");
            let o = inst
                .as_object()
                .ok_or_else(|| invalid(&path, "must be an object"))?;
            let id = string(o, "Id").ok_or_else(|| invalid(&format!("{path}.Id"), "missing"))?;
            if ids.iter().any(|x| x == id) {
                return Err(invalid(
                    &format!("{path}.Id"),
                    format!("instance id {id:?} is used twice"),
                ));
            }
            ids.push(id.to_owned());
            if get(o, "Group").is_some() {
                warnings.push(format!("{path}.Group is ignored"));
            }
            let process = string(o, "ProcessID")
                .filter(|p| !p.is_empty())
                .map(str::to_owned);
            // v1.0's Host is an address; a loopback one ran on every process
            let node = string(o, "Host")
                .filter(|h| !matches!(*h, "" | "127.0.0.1" | "localhost"))
                .map(str::to_owned);
            let settings = get(o, "Settings")
                .and_then(Value::as_object)
                .cloned()
                .unwrap_or_default();
            let bus = match get(o, "Rabbitmq").and_then(Value::as_object) {
                None => None,
                Some(r) => {
                    let field = |k: &str| string(r, k).unwrap_or_default().to_owned();
                    Some(ModuleBusConfig {
                        kind: "amqp".into(),
                        mode: "mqant".into(),
                        uri: field("Uri"),
                        exchange: field("Exchange"),
                        exchange_type: Some(field("ExchangeType"))
                            .filter(|t| !t.is_empty())
                            .unwrap_or_else(|| "direct".into()),
                        queue: field("Queue"),
                        binding_key: field("BindingKey"),
                        consumer_tag: field("ConsumerTag"),
                    })
                }
            };
            let here = process.as_deref().is_none_or(|p| p == process_id);
            if kind.eq_ignore_ascii_case("Gate") && here {
                own_gate = true;
                config.node.gate_id = id.to_owned();
                gate_listeners(&mut config, &settings, &path, idle, write, queue)?;
                continue;
            }
            let mut m = ModuleConfig::new(if kind.eq_ignore_ascii_case("Gate") {
                // another process's gate: the node's session operations reach it by this type
                "Gate"
            } else {
                kind
            });
            m.id = Some(id.to_owned());
            m.node = node;
            m.process_id = process;
            m.bus = bus;
            if !kind.eq_ignore_ascii_case("Gate") {
                m.settings = toml::Table::try_from(Value::Object(settings))
                    .map_err(|e| invalid(&format!("{path}.Settings"), e.to_string()))?;
            }
            config.modules.push(m);
        }
    }
    if let Some(s) = rpc_expired {
        for l in &mut config.listeners {
            l.rpc_expired_s = Some(s);
        }
    }
    // this node's own gate must not take the id of another process's gate: its sessions'
    // Serverid decides where session operations go
    if !own_gate {
        let taken = |g: &str| {
            config
                .modules
                .iter()
                .any(|m| m.kind == "Gate" && m.instance_id() == g)
        };
        if taken(&config.node.gate_id) {
            config.node.gate_id = format!("Gate-{process_id}");
        }
    }
    Ok((config, warnings))
}

/// Make the module types of `config` that this binary has no implementation of remote-only
/// (`[node] remote_types`): in an mqant deployment they are served by mqant processes, so calls
/// to them travel over the bus instead of being refused. `known` are the binary's types (empty:
/// none). Returns one warning per type.
pub fn remote_unimplemented(config: &mut Config, known: &[&str]) -> Vec<String> {
    let mut warnings = Vec::new();
    let mut add = Vec::new();
    for m in &config.modules {
        if m.plugin.is_some()
            || known.contains(&m.kind.as_str())
            || config.node.remote_types.contains(&m.kind)
            || add.contains(&m.kind)
        {
            continue;
        }
        add.push(m.kind.clone());
    }
    for kind in add {
        warnings.push(format!(
            "module type {kind:?} has no implementation here: its instances are peers', reached \
             over the bus"
        ));
        config.node.remote_types.push(kind);
    }
    warnings
}

fn gate_listeners(
    config: &mut Config,
    s: &Map<String, Value>,
    path: &str,
    idle: Option<u64>,
    write: Option<u64>,
    queue: Option<u64>,
) -> Result<(), ConfigError> {
    let p = format!("{path}.Settings");
    let max_packet = number(s, "MaxMsgLen", &p)?;
    let max_conn = number(s, "MaxConnNum", &p)?;
    let handshake = number(s, "HTTPTimeout", &p)?;
    let hb = number(s, "MinHBStorage", &p)?;
    // mqant serves both its TCP and its WebSocket address with TLS when `Tls` is set
    let tls = if get(s, "Tls").and_then(Value::as_bool).unwrap_or(false) {
        let cert = string(s, "CertFile").filter(|f| !f.is_empty());
        let key = string(s, "KeyFile").filter(|f| !f.is_empty());
        match (cert, key) {
            (Some(c), Some(k)) => Some((c.to_owned(), k.to_owned())),
            _ => {
                return Err(invalid(
                    &format!("{p}.Tls"),
                    "TLS needs CertFile and KeyFile",
                ));
            }
        }
    } else {
        None
    };
    for (key, network) in [("TCPAddr", Network::Tcp), ("WSAddr", Network::Ws)] {
        let Some(addr) = string(s, key).filter(|a| !a.is_empty()) else {
            continue;
        };
        let mut l = ListenerConfig::new(
            addr,
            ProtocolOptions::Mqtt(MqttOptions {
                mode: Mode::Mqant,
                network,
                max_packet: max_packet.map(|v| v as usize),
                ..MqttOptions::default()
            }),
        );
        if let Some((cert, key)) = &tls {
            l.tls_cert = Some(cert.clone());
            l.tls_key = Some(key.clone());
        }
        if let Some(v) = max_conn {
            l.max_conn = v as usize;
        }
        if let Some(v) = handshake {
            l.handshake_timeout_s = v;
        }
        if let Some(v) = hb {
            l.min_hb_storage_s = v;
        }
        l.idle_timeout_s = idle;
        if let Some(v) = write.filter(|v| *v > 0) {
            l.write_timeout_s = v;
        }
        if let Some(v) = queue.filter(|v| *v > 0) {
            l.write_queue = v as usize;
        }
        config.listeners.push(l);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const SAMPLE: &str = r#"{
  // Id must be unique; ProcessID picks the process (node) that runs the instance
  "Module": {
    "Gate":  [{"Id":"Gate001","ProcessID":"development",
               "Settings":{"WSAddr":":3653","TCPAddr":":3563","MaxMsgLen":4096,"HTTPTimeout":10,
                           "MaxConnNum":20000,"Tls":false,"CertFile":"","KeyFile":"","MinHBStorage":60}}],
    "Login": [{"Id":"Login001","ProcessID":"development",
               "Rabbitmq":{"Uri":"amqp://user:password@host:5672/","Exchange":"mqant","ExchangeType":"direct",
                           "Queue":"Login001","BindingKey":"Login001","ConsumerTag":"Login001"}}],
    "Chat":  [{"Id":"Chat001","ProcessID":"development"}]
  },
  "Mqtt": {"WirteLoopChanNum":10,"ReadPackLoop":10,"ReadTimeout":600,"WriteTimeout":300}
}
// a last comment without a newline"#;

    #[test]
    fn an_mqant_sample_converts() {
        assert!(is_mqant_json(SAMPLE));
        assert!(!is_mqant_json("[node]\nid = \"x\"\n"));
        let (c, warnings) = from_mqant_json(SAMPLE).unwrap();
        assert_eq!(c.node.gate_id, "Gate001");
        assert_eq!(c.listeners.len(), 2);
        let tcp = &c.listeners[0];
        assert_eq!((tcp.scheme(), tcp.addr.as_str()), ("mqtt+mqant", ":3563"));
        assert_eq!(tcp.socket_addr().unwrap().to_string(), "0.0.0.0:3563");
        let ws = &c.listeners[1];
        let o = ws.protocol.mqtt().expect("an MQTT listener");
        assert_eq!(
            (o.network, o.mode, o.max_packet),
            (Network::Ws, Mode::Mqant, Some(4096))
        );
        assert_eq!(
            (ws.idle_timeout_s, ws.write_timeout_s, ws.write_queue),
            (Some(600), 300, 10)
        );
        let kinds: Vec<_> = c
            .modules
            .iter()
            .map(|m| (m.kind.as_str(), m.instance_id()))
            .collect();
        assert_eq!(
            kinds,
            [
                ("Login", "Login001".to_owned()),
                ("Chat", "Chat001".to_owned())
            ]
        );
        assert_eq!(c.modules[0].process_id.as_deref(), Some("development"));
        assert_eq!(c.modules[0].node, None);
        assert!(
            c.runs_here(&c.modules[0]),
            "the default process group runs it"
        );
        let bus = c.modules[0]
            .bus
            .as_ref()
            .expect("Rabbitmq maps to [module.bus]");
        assert_eq!(
            (bus.kind.as_str(), bus.exchange.as_str(), bus.queue.as_str()),
            ("amqp", "mqant", "Login001")
        );
        let _ = warnings;
        c.validate(&[]).unwrap();
    }

    /// mqantserver's sample file, kept in the repository for the end-to-end tests.
    const STOCK: &str = include_str!("../../../tests/e2e/data/mqantserver.conf");

    #[test]
    fn a_stock_mqantserver_file_converts_with_warnings() {
        let (mut c, mut warnings) = from_mqant_json(STOCK).unwrap();
        let kinds: Vec<_> = c.modules.iter().map(|m| m.kind.as_str()).collect();
        assert_eq!(
            kinds,
            [
                "HelloWorld",
                "Login",
                "Chat",
                "PyChat",
                "Test",
                "Hitball",
                "XaXb",
                "Webapp",
                "Tracing"
            ]
        );
        assert!(warnings.iter().any(|w| w.starts_with("Master is ignored")));
        assert!(
            warnings
                .iter()
                .any(|w| w.starts_with("Module.Master is ignored"))
        );
        assert!(warnings.iter().any(|w| w == "Rpc.MaxCoroutine is ignored"));
        assert_eq!(c.node.gate_id, "Gate001");
        assert!(c.listeners.iter().all(|l| l.rpc_expired_s == Some(1)));
        // unimplemented types become remote-only, and then the file passes
        assert!(c.validate(&["Login", "Chat"]).is_err());
        warnings.extend(remote_unimplemented(&mut c, &["Login", "Chat"]));
        assert_eq!(
            c.node.remote_types,
            [
                "HelloWorld",
                "PyChat",
                "Test",
                "Hitball",
                "XaXb",
                "Webapp",
                "Tracing"
            ]
        );
        c.validate(&["Login", "Chat"]).unwrap();
        let here: Vec<_> = c
            .modules
            .iter()
            .filter(|m| c.runs_here(m))
            .map(|m| m.kind.as_str())
            .collect();
        assert_eq!(here, ["Login", "Chat"]);
    }

    #[test]
    fn the_process_id_picks_what_runs_and_whose_gate_it_is() {
        let text = r#"{"Module":{
            "Gate":[{"Id":"Gate001","ProcessID":"front","Settings":{"TCPAddr":":3563"},
                     "Rabbitmq":{"Uri":"amqp://g:g@h:5672/","Exchange":"mqant","Queue":"Gate001",
                                 "BindingKey":"Gate001"}}],
            "Chat":[{"Id":"Chat001","ProcessID":"back"}],
            "Login":[{"Id":"Login001","ProcessID":"front"}]},
          "Log":{"file":"x"},"Settings":{"a":1}}"#;
        // the gate's process: listeners, its gate id; Chat is another group's
        let (c, warnings) = from_mqant_json_as(text, "front").unwrap();
        assert!(warnings.contains(&"Log is ignored: warren has no equivalent".to_owned()));
        assert!(warnings.contains(&"Settings is ignored: warren has no equivalent".to_owned()));
        assert_eq!((c.node.gate_id.as_str(), c.listeners.len()), ("Gate001", 1));
        assert_eq!(c.node.process_id, "front");
        let here: Vec<_> = c
            .modules
            .iter()
            .map(|m| (m.kind.as_str(), c.runs_here(m)))
            .collect();
        assert_eq!(here, [("Chat", false), ("Login", true)]);
        c.validate(&["Login"]).unwrap();
        // another process: no listeners, and the gate is a peer's, reached over RabbitMQ
        let (c, _) = from_mqant_json_as(text, "back").unwrap();
        assert!(c.listeners.is_empty());
        assert_ne!(
            c.node.gate_id, "Gate001",
            "its own gate id may not be the peer gate's"
        );
        let gate = &c.modules[0];
        assert_eq!(
            (gate.kind.as_str(), gate.instance_id()),
            ("Gate", "Gate001".into())
        );
        assert!(c.is_remote(gate));
        assert_eq!(gate.bus.as_ref().map(|b| b.queue.as_str()), Some("Gate001"));
        let here: Vec<_> = c
            .modules
            .iter()
            .map(|m| (m.kind.as_str(), c.runs_here(m)))
            .collect();
        assert_eq!(here, [("Gate", false), ("Chat", true), ("Login", false)]);
        c.validate(&["Chat"]).unwrap();
    }

    #[test]
    fn keys_match_case_insensitively_and_errors_name_their_key() {
        let (c, _) =
            from_mqant_json(r#"{"module":{"chat":[{"id":"c1","host":"127.0.0.1"}]}}"#).unwrap();
        assert_eq!(c.modules[0].instance_id(), "c1");
        assert_eq!(
            c.modules[0].node, None,
            "a loopback Host runs on every process"
        );
        let e = from_mqant_json(r#"{"Module":{"A":[{"Id":"x"}],"B":[{"Id":"x"}]}}"#).unwrap_err();
        assert!(e.to_string().contains("Module.B[0].Id"), "{e}");
        let e =
            from_mqant_json(r#"{"Module":{"Gate":[{"Id":"g","Settings":{"MaxMsgLen":"big"}}]}}"#)
                .unwrap_err();
        assert!(e.to_string().contains("MaxMsgLen"), "{e}");
        assert!(from_mqant_json("{ // not a full-line comment\n}").is_err());
    }

    #[test]
    fn a_tls_gate_keeps_its_certificate() {
        let gate = |tls: &str| {
            format!(
                r#"{{"Module":{{"Gate":[{{"Id":"g","Settings":{{"TCPAddr":":3563","WSAddr":":3653",{tls}}}}}]}}}}"#
            )
        };
        let (c, _) =
            from_mqant_json(&gate(r#""Tls":true,"CertFile":"c.pem","KeyFile":"k.pem""#)).unwrap();
        assert_eq!(c.listeners.len(), 2);
        for l in &c.listeners {
            assert_eq!(l.tls_cert.as_deref(), Some("c.pem"));
            assert_eq!(l.tls_key.as_deref(), Some("k.pem"));
        }
        assert_eq!(c.listeners[0].scheme(), "mqtts+mqant");
        assert_eq!(c.listeners[1].scheme(), "wss+mqant");
        let e = from_mqant_json(&gate(r#""Tls":true,"CertFile":"""#)).unwrap_err();
        assert!(e.to_string().contains("Tls"), "{e}");
    }
}

//! From URLs in the config (or `--bus` / `--registry`) to connected parts, and the compatibility
//! bridges a config asks for: what `warren serve` and `warren node` call at start.

use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;
use warren::config::{BusConfig, Config, ModuleConfig, RegistryConfig};
use warren::node::NodeHandle;
use warren::registry::Registry;
use warren::remote::Transport;
use warren::retained::SharedRetained;

/// Why a cluster part did not start.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    /// The URL names no bus or registry this build has.
    #[error("{what} URL {url:?}: {why}")]
    Url {
        /// `bus` or `registry`.
        what: &'static str,
        /// The URL.
        url: String,
        /// Why it is refused.
        why: String,
    },
    /// The server could not be reached or refused us. The part's own error is the source, so
    /// the chain goes down to the broker client's error.
    #[error("{what} {url}")]
    Connect {
        /// `bus`, `registry`, `redis_rpc` or `amqp`.
        what: &'static str,
        /// The URL.
        url: String,
        /// The cause.
        #[source]
        source: Box<dyn std::error::Error + Send + Sync + 'static>,
    },
}

fn scheme(url: &str) -> &str {
    url.split_once("://").map_or(url, |(s, _)| s)
}

/// Connect the bus a config names; `None` for `local`.
pub async fn transport(cfg: &BusConfig) -> Result<Option<Arc<dyn Transport>>, ConnectError> {
    if cfg.is_local() {
        return Ok(None);
    }
    let err = |e: warren::remote::TransportError| ConnectError::Connect {
        what: "bus",
        url: cfg.url.clone(),
        source: e.into(),
    };
    let t: Arc<dyn Transport> = match scheme(&cfg.url) {
        "nats" => crate::nats::NatsTransport::connect(&cfg.url, &cfg.prefix)
            .await
            .map_err(err)?,
        "redis" => crate::redis::RedisTransport::connect(&cfg.url, &cfg.prefix)
            .await
            .map_err(err)?,
        "amqp" => crate::amqp::AmqpTransport::connect(&cfg.url, &cfg.prefix)
            .await
            .map_err(err)?,
        other => {
            return Err(ConnectError::Url {
                what: "bus",
                url: cfg.url.clone(),
                why: format!(
                    "unknown scheme {other:?} (expected local, nats://, redis:// or amqp://)"
                ),
            });
        }
    };
    Ok(Some(t))
}

/// Connect the registry a config names; `None` for `memory`.
pub async fn registry(
    cfg: &RegistryConfig,
    bus: &BusConfig,
) -> Result<Option<Arc<dyn Registry>>, ConnectError> {
    let url = cfg.effective_url(bus);
    let err = |e: warren::registry::RegistryError| ConnectError::Connect {
        what: "registry",
        url: url.clone(),
        source: e.into(),
    };
    let ttl = Duration::from_secs(cfg.ttl_s.max(1));
    let r: Arc<dyn Registry> = match scheme(&url) {
        "memory" | "" => return Ok(None),
        "nats" => crate::nats::KvRegistry::connect(&url, &cfg.key, ttl)
            .await
            .map_err(err)?,
        "redis" => {
            let layout = cfg.layout.parse().map_err(|why| ConnectError::Url {
                what: "registry",
                url: url.clone(),
                why,
            })?;
            crate::redis::GobaseRegistry::connect_layout(&url, &cfg.key, layout)
                .await
                .map_err(err)?
        }
        #[cfg(feature = "etcd")]
        "etcd" => crate::etcd::EtcdRegistry::connect(&url, &cfg.key, ttl)
            .await
            .map_err(err)?,
        #[cfg(not(feature = "etcd"))]
        "etcd" => {
            return Err(ConnectError::Url {
                what: "registry",
                url: url.clone(),
                why: "this build has no etcd support (build with `--features etcd`)".into(),
            });
        }
        other => {
            return Err(ConnectError::Url {
                what: "registry",
                url: url.clone(),
                why: format!(
                    "unknown scheme {other:?} (expected memory, nats://, redis:// or etcd://)"
                ),
            });
        }
    };
    Ok(Some(r))
}

/// The cluster's shared copy of the retained MQTT messages for the bus `config` names (NATS: a
/// JetStream KV bucket, Redis: a hash; docs/protocols/mqtt.md, "Across gates"), read now, for
/// [`warren::NodeBuilder::shared_retained`]. `None` without an MQTT listener, with a bus that
/// has no store (local, AMQP), or when the store cannot be opened or read: that is logged, and
/// the node runs with forwards between gates only (a gate started later does not see the
/// retained messages set before).
pub async fn shared_retained(config: &Config) -> Option<SharedRetained> {
    let bus = &config.bus;
    if bus.is_local() || !config.listeners.iter().any(|l| l.protocol.mqtt().is_some()) {
        return None;
    }
    let max = config.limits.max_retained_messages;
    let opened = match scheme(&bus.url) {
        "nats" => crate::nats::NatsRetained::connect(&bus.url, &bus.prefix, max).await,
        "redis" => crate::redis::RedisRetained::connect(&bus.url, &bus.prefix, max).await,
        _ => return None,
    };
    match opened {
        Ok(shared) => Some(shared),
        Err(why) => {
            metrics::counter!("warren_retained_shared_errors_total", "store" => "open")
                .increment(1);
            tracing::warn!(
                bus = %bus.url,
                %why,
                "the cluster's shared store of retained messages is not available: retained \
                 messages reach the gates running now only"
            );
            None
        }
    }
}

/// The compatibility bridges of a running node; dropping it does not stop them, [`Bridges::stop`]
/// does.
#[derive(Debug)]
pub struct Bridges {
    stop: CancellationToken,
    /// The TianQinS Redis RPC endpoints, in config order (for calls to peers).
    pub redis_rpc: Vec<Arc<crate::redis::RedisRpc>>,
    _mqant: Option<crate::amqp::MqantBridge>,
}

impl Bridges {
    /// Stop consuming.
    pub fn stop(&self) {
        self.stop.cancel();
    }
}

/// Start what `config` asks beyond warren's own bus: `[[redis_rpc]]` endpoints, and mqant AMQP
/// instances (`[module.bus]`) — served when `runs_here` says the instance runs on this node,
/// reached through RabbitMQ otherwise.
pub async fn bridges(
    config: &Config,
    node: &NodeHandle,
    runs_here: impl Fn(&ModuleConfig) -> bool,
) -> Result<Bridges, ConnectError> {
    let stop = CancellationToken::new();
    let mut redis_rpc = Vec::new();
    for r in &config.redis_rpc {
        let b = crate::redis::RedisRpc::start(r, node.clone(), stop.child_token())
            .await
            .map_err(|e| ConnectError::Connect {
                what: "redis_rpc",
                url: r.url.clone(),
                source: e.into(),
            })?;
        redis_rpc.push(b);
    }
    let (serve, reach): (Vec<ModuleConfig>, Vec<ModuleConfig>) = config
        .modules
        .iter()
        .filter(|m| m.bus.as_ref().is_some_and(|b| b.kind == "amqp"))
        .cloned()
        .partition(|m| runs_here(m));
    let mqant = if serve.is_empty() && reach.is_empty() {
        None
    } else {
        let url = serve
            .iter()
            .chain(&reach)
            .find_map(|m| m.bus.as_ref().map(|b| b.uri.clone()))
            .unwrap_or_default();
        Some(
            crate::amqp::MqantBridge::start(node.clone(), serve, reach, stop.child_token())
                .await
                .map_err(|e| ConnectError::Connect {
                    what: "amqp",
                    url,
                    source: e.into(),
                })?,
        )
    };
    Ok(Bridges {
        stop,
        redis_rpc,
        _mqant: mqant,
    })
}

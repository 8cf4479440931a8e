//! The address a node announces in its registry record (`NodeRecord::address`; a gobase member's
//! `addr&port`), so that peers learn where it really is rather than `127.0.0.1&0`.
//!
//! The rule (docs/cluster.md, "The advertised address"):
//! - `[registry] advertise_addr = "host[:port]"` wins, for NAT and containers;
//! - otherwise the host is the first listener's bind address when it names one, else the address
//!   of the interface the default route uses, else `127.0.0.1`;
//! - the port is the first listener's bound port (a listener on port 0 is announced with its port
//!   once bound); a node without listeners announces port 0.
//!
//! The node registers before its listeners are bound, so [`Advertising`] wraps the registry: it
//! fills the address into the record the node registers, and [`Advertising::bound`] registers the
//! record again if the bound port is not the one announced.

use std::future::Future;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::pin::Pin;
use std::sync::Arc;

use tokio::sync::{Mutex, watch};
use warren::config::{Config, parse_advertise_addr};
use warren::registry::{NodeRecord, Registry, RegistryError};

/// What a node announces: its host, and the port when it is known before the listeners bind.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Advertised {
    host: String,
    /// Fixed by `advertise_addr`: the bound port never replaces it.
    fixed_port: Option<u16>,
    /// The port announced now.
    port: u16,
}

impl Advertised {
    /// The address `config` asks for (the config was validated: a bad `advertise_addr` cannot
    /// reach here, and is ignored if it does).
    pub(crate) fn from_config(config: &Config) -> Advertised {
        let first = config.listeners.first().and_then(|l| l.socket_addr().ok());
        let (host, fixed_port) = match config
            .registry
            .advertise_addr
            .as_deref()
            .and_then(|a| parse_advertise_addr(a).ok())
        {
            Some((host, port)) => (host, port),
            None => (default_host(first).to_string(), None),
        };
        Advertised {
            host,
            fixed_port,
            port: fixed_port.or(first.map(|a| a.port())).unwrap_or(0),
        }
    }

    /// `host:port` as `NodeRecord::address` holds it (`[v6]:port` for IPv6).
    pub(crate) fn address(&self) -> String {
        match self.host.parse::<IpAddr>() {
            Ok(ip) => SocketAddr::new(ip, self.port).to_string(),
            Err(_) => format!("{}:{}", self.host, self.port),
        }
    }
}

/// The first listener's address when it is a specific one, else the outgoing interface's, else
/// loopback.
fn default_host(first: Option<SocketAddr>) -> IpAddr {
    match first.map(|a| a.ip()) {
        Some(ip) if !ip.is_unspecified() => ip,
        _ => warren_cluster::redis::local_ip()
            .filter(|ip| !ip.is_loopback())
            .unwrap_or(IpAddr::V4(Ipv4Addr::LOCALHOST)),
    }
}

/// The future a [`Registry`] method returns.
type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// A registry that puts the advertised address into the records registered through it.
pub(crate) struct Advertising {
    inner: Arc<dyn Registry>,
    state: Mutex<State>,
}

struct State {
    advertised: Advertised,
    /// The last record registered (with the address it was given), to register again when the
    /// bound port is known.
    last: Option<NodeRecord>,
}

impl Advertising {
    /// Wrap `inner`, announcing `advertised`.
    pub(crate) fn new(inner: Arc<dyn Registry>, advertised: Advertised) -> Arc<Advertising> {
        Arc::new(Advertising {
            inner,
            state: Mutex::new(State {
                advertised,
                last: None,
            }),
        })
    }

    /// The node's first listener is bound on `addr`: when its port is not the one announced
    /// (a listener on port 0) and no `advertise_addr` fixed one, register the record again with
    /// it.
    pub(crate) async fn bound(&self, addr: Option<SocketAddr>) -> Result<(), RegistryError> {
        let again = {
            let mut st = self.state.lock().await;
            let Some(port) = addr.map(|a| a.port()) else {
                return Ok(());
            };
            if st.advertised.fixed_port.is_some() || st.advertised.port == port {
                return Ok(());
            }
            st.advertised.port = port;
            let address = st.advertised.address();
            st.last.as_mut().map(|r| {
                r.address = Some(address);
                r.clone()
            })
        };
        match again {
            Some(record) => {
                tracing::info!(node = %record.id, address = ?record.address, "announcing the bound port");
                self.inner.register(record).await
            }
            None => Ok(()),
        }
    }
}

impl Registry for Advertising {
    fn register(&self, mut node: NodeRecord) -> BoxFuture<'_, Result<(), RegistryError>> {
        Box::pin(async move {
            {
                let mut st = self.state.lock().await;
                if node.address.is_none() {
                    node.address = Some(st.advertised.address());
                }
                st.last = Some(node.clone());
            }
            self.inner.register(node).await
        })
    }

    fn deregister(&self, node_id: &str) -> BoxFuture<'_, Result<(), RegistryError>> {
        let id = node_id.to_owned();
        Box::pin(async move {
            {
                let mut st = self.state.lock().await;
                if st.last.as_ref().is_some_and(|r| r.id == id) {
                    st.last = None;
                }
            }
            self.inner.deregister(&id).await
        })
    }

    fn watch(&self) -> watch::Receiver<Arc<Vec<NodeRecord>>> {
        self.inner.watch()
    }

    fn kind(&self) -> &'static str {
        self.inner.kind()
    }

    fn is_connected(&self) -> bool {
        self.inner.is_connected()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use warren::config::ListenerConfig;
    use warren::registry::MemoryRegistry;

    fn config(listen: &[&str], advertise: Option<&str>) -> Config {
        let mut c = Config {
            listeners: listen
                .iter()
                .map(|u| ListenerConfig::from_url(u).expect("a listener URL"))
                .collect(),
            ..Config::default()
        };
        c.registry.advertise_addr = advertise.map(str::to_owned);
        c
    }

    #[test]
    fn the_first_listener_gives_host_and_port_unless_advertise_addr_does() {
        let a =
            Advertised::from_config(&config(&["mqtt://10.1.2.3:3563", "ws://127.0.0.1:1"], None));
        assert_eq!(a.address(), "10.1.2.3:3563");
        let a = Advertised::from_config(&config(&["mqtt://127.0.0.1:3563"], Some("gw.example")));
        assert_eq!(a.address(), "gw.example:3563");
        let a = Advertised::from_config(&config(&["mqtt://127.0.0.1:3563"], Some("[::1]:7")));
        assert_eq!(a.address(), "[::1]:7");
        // no listener: port 0; every interface: not 0.0.0.0
        let a = Advertised::from_config(&config(&[], None));
        assert!(a.address().ends_with(":0"), "{}", a.address());
        let a = Advertised::from_config(&config(&["mqtt://0.0.0.0:3563"], None));
        assert!(!a.address().starts_with("0.0.0.0"), "{}", a.address());
        assert!(a.address().ends_with(":3563"), "{}", a.address());
    }

    #[tokio::test]
    async fn the_bound_port_is_announced_again() {
        let memory: Arc<dyn Registry> = Arc::new(MemoryRegistry::default());
        let reg = Advertising::new(
            memory.clone(),
            Advertised::from_config(&config(&["mqtt://127.0.0.1:0"], None)),
        );
        let record = NodeRecord {
            id: "n1".into(),
            ..NodeRecord::default()
        };
        reg.register(record).await.expect("register");
        let address = |r: &Arc<dyn Registry>| r.watch().borrow()[0].address.clone();
        assert_eq!(address(&memory).as_deref(), Some("127.0.0.1:0"));
        reg.bound(Some("127.0.0.1:4321".parse().expect("addr")))
            .await
            .expect("again");
        assert_eq!(address(&memory).as_deref(), Some("127.0.0.1:4321"));

        // a fixed port stays
        let memory: Arc<dyn Registry> = Arc::new(MemoryRegistry::default());
        let reg = Advertising::new(
            memory.clone(),
            Advertised::from_config(&config(&["mqtt://127.0.0.1:0"], Some("gw:9"))),
        );
        reg.register(NodeRecord::default()).await.expect("register");
        reg.bound(Some("127.0.0.1:4321".parse().expect("addr")))
            .await
            .expect("kept");
        assert_eq!(address(&memory).as_deref(), Some("gw:9"));
    }
}

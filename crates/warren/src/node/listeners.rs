//! [`BoundListener`]: a listener that is accepting clients, as the node reports it.

#[allow(unused_imports)]
use super::*;

/// A listener that is accepting clients.
#[derive(Debug, Clone)]
pub struct BoundListener {
    /// Its configuration.
    pub config: Arc<ListenerConfig>,
    /// The address it actually bound (port 0 resolved).
    pub local_addr: SocketAddr,
}

impl BoundListener {
    /// `mqtt+mqant tcp://127.0.0.1:3563`-style description for the startup banner.
    pub fn describe(&self) -> String {
        let t = match Transport::from(self.config.transport()) {
            Transport::Tcp => "tcp",
            Transport::Ws => "ws",
        };
        format!("{} {t}://{}", self.config.scheme(), self.local_addr)
    }
}

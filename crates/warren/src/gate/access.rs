//! Who may open a connection, decided at accept before a byte is read: the IP allow and deny
//! lists (node-wide `[access]` and each listener's `allow`/`deny`, reloaded on SIGHUP), the open
//! connections per IP (`[limits] max_conn_per_ip`) and the connection rate per IP
//! (`conn_rate_per_ip`, `conn_burst_per_ip`), all listeners of the node together.
//!
//! An attacker chooses the addresses, so nothing here grows with them beyond what is live: the
//! per-IP count holds only addresses with an open connection, and the rate limiter's keys are
//! pruned once they are indistinguishable from a fresh key. An IPv6 client is counted by its
//! /64 network (one subscriber's usual allocation, which a client can roam freely).

use parking_lot::Mutex;
use std::collections::HashMap;
use std::net::IpAddr;
use std::num::NonZeroU32;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};

use arc_swap::ArcSwap;
use governor::{DefaultKeyedRateLimiter, Quota, RateLimiter};
use ipnet::IpNet;

use super::tls::TlsState;
use crate::config::{AccessConfig, Config, LimitsConfig, ListenerConfig, parse_network};

/// An allow list and a deny list of networks. Deny wins; an empty allow list allows everyone.
#[derive(Debug, Default, Clone, PartialEq)]
pub(crate) struct NetLists {
    allow: Vec<IpNet>,
    deny: Vec<IpNet>,
}

impl NetLists {
    /// Parse lists from config; entries were validated with the config, an entry that does not
    /// parse (impossible after validation) is left out.
    pub(crate) fn new(allow: &[String], deny: &[String]) -> Self {
        let parse = |l: &[String]| l.iter().filter_map(|s| parse_network(s)).collect();
        NetLists {
            allow: parse(allow),
            deny: parse(deny),
        }
    }

    fn node(a: &AccessConfig) -> Self {
        Self::new(&a.allow, &a.deny)
    }

    fn listener(l: &ListenerConfig) -> Self {
        Self::new(&l.allow, &l.deny)
    }

    /// `Err` names the list that keeps `ip` out.
    fn check(&self, ip: IpAddr) -> Result<(), &'static str> {
        if self.deny.iter().any(|n| n.contains(&ip)) {
            return Err("deny");
        }
        if !self.allow.is_empty() && !self.allow.iter().any(|n| n.contains(&ip)) {
            return Err("allow");
        }
        Ok(())
    }
}

/// What a listener reloads on SIGHUP: its IP lists and its TLS certificate.
pub(crate) struct ListenerAccess {
    lists: ArcSwap<NetLists>,
    /// The listener's TLS settings, when it serves TLS.
    pub(crate) tls: Option<TlsState>,
}

impl ListenerAccess {
    pub(crate) fn new(cfg: &ListenerConfig, tls: Option<TlsState>) -> Self {
        ListenerAccess {
            lists: ArcSwap::from_pointee(NetLists::listener(cfg)),
            tls,
        }
    }
}

/// Why a connection was refused at accept.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Refused {
    /// A deny list names the address, or an allow list does not.
    Denied(String),
    /// `max_conn_per_ip` connections from this address are open.
    PerIpCap(usize),
    /// The address opens connections faster than `conn_rate_per_ip`.
    PerIpRate(u32),
}

impl Refused {
    /// The refusal kind for logs and the metric.
    pub(crate) fn kind(&self) -> &'static str {
        match self {
            Refused::Denied(_) => "ip_denied",
            Refused::PerIpCap(_) => "max_conn_per_ip",
            Refused::PerIpRate(_) => "conn_rate_per_ip",
        }
    }
}

impl std::fmt::Display for Refused {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Refused::Denied(list) => write!(f, "address not permitted by {list}"),
            Refused::PerIpCap(n) => write!(
                f,
                "{n} connections from this address are open (limits.max_conn_per_ip)"
            ),
            Refused::PerIpRate(n) => write!(
                f,
                "more than {n} new connections per second from this address (limits.conn_rate_per_ip)"
            ),
        }
    }
}

/// Open connections per address. Entries exist only while a connection from the address is open.
#[derive(Default)]
struct OpenCounts {
    map: Mutex<HashMap<IpAddr, u32>>,
}

/// One open connection counted against its address; dropping it (when the connection ends)
/// gives the count back.
pub(crate) struct IpSlot {
    counts: Arc<OpenCounts>,
    ip: IpAddr,
}

impl Drop for IpSlot {
    fn drop(&mut self) {
        let mut m = self.counts.map.lock();
        if let Some(n) = m.get_mut(&self.ip) {
            *n -= 1;
            if *n == 0 {
                m.remove(&self.ip);
            }
        }
    }
}

/// Rate-limiter checks between two prunings of stale keys.
const PRUNE_EVERY: u32 = 4096;

/// The node's admission state, shared by every listener.
pub(crate) struct Admission {
    node_lists: ArcSwap<NetLists>,
    listeners: Mutex<Vec<Arc<ListenerAccess>>>,
    max_per_ip: usize,
    counts: Arc<OpenCounts>,
    rate: Option<(DefaultKeyedRateLimiter<IpAddr>, u32)>,
    checks: AtomicU32,
}

impl Admission {
    pub(crate) fn new(limits: &LimitsConfig, access: &AccessConfig) -> Self {
        let rate = NonZeroU32::new(limits.conn_rate_per_ip).map(|r| {
            let burst = NonZeroU32::new(limits.conn_burst_per_ip).unwrap_or(r);
            let quota = Quota::per_second(r).allow_burst(burst);
            (RateLimiter::keyed(quota), r.get())
        });
        Admission {
            node_lists: ArcSwap::from_pointee(NetLists::node(access)),
            listeners: Mutex::new(Vec::new()),
            max_per_ip: limits.max_conn_per_ip,
            counts: Arc::default(),
            rate,
            checks: AtomicU32::new(0),
        }
    }

    /// Register a listener's lists, in config order (the order `reload` matches them in).
    pub(crate) fn add_listener(
        &self,
        cfg: &ListenerConfig,
        tls: Option<TlsState>,
    ) -> Arc<ListenerAccess> {
        let l = Arc::new(ListenerAccess::new(cfg, tls));
        self.listeners.lock().push(l.clone());
        l
    }

    /// Take the new IP lists and TLS certificates of `config` (node-wide and per listener,
    /// listeners matched by position). A certificate that does not load leaves the old one in
    /// use; the errors are returned, one per listener.
    pub(crate) fn reload(&self, config: &Config) -> Vec<String> {
        self.node_lists
            .store(Arc::new(NetLists::node(&config.access)));
        let listeners = self.listeners.lock();
        let mut errors = Vec::new();
        for (i, (l, cfg)) in listeners.iter().zip(&config.listeners).enumerate() {
            l.lists.store(Arc::new(NetLists::listener(cfg)));
            if let Some(tls) = &l.tls
                && let Err(e) = tls.reload(cfg)
            {
                errors.push(format!("listener[{i}] {}: {e}", cfg.addr));
            }
        }
        errors
    }

    /// Whether `ip` may connect to the listener: its lists, the node's lists, its rate and its
    /// count of open connections. On success the returned slot counts the connection until it is
    /// dropped.
    pub(crate) fn admit(
        &self,
        listener: &ListenerAccess,
        ip: IpAddr,
    ) -> Result<Option<IpSlot>, Refused> {
        let ip = ip.to_canonical();
        self.node_lists
            .load()
            .check(ip)
            .map_err(|l| Refused::Denied(format!("access.{l}")))?;
        listener
            .lists
            .load()
            .check(ip)
            .map_err(|l| Refused::Denied(format!("the listener's {l}")))?;
        let ip = limit_key(ip);
        if let Some((limiter, per_s)) = &self.rate {
            if self.checks.fetch_add(1, Ordering::Relaxed) % PRUNE_EVERY == PRUNE_EVERY - 1 {
                limiter.retain_recent();
                limiter.shrink_to_fit();
            }
            if limiter.check_key(&ip).is_err() {
                return Err(Refused::PerIpRate(*per_s));
            }
        }
        if self.max_per_ip == 0 {
            return Ok(None);
        }
        let mut m = self.counts.map.lock();
        let n = m.entry(ip).or_insert(0);
        if *n as usize >= self.max_per_ip {
            if *n == 0 {
                m.remove(&ip);
            }
            return Err(Refused::PerIpCap(self.max_per_ip));
        }
        *n += 1;
        Ok(Some(IpSlot {
            counts: self.counts.clone(),
            ip,
        }))
    }

    /// Addresses with an open connection counted (for tests).
    #[cfg(test)]
    fn tracked(&self) -> usize {
        self.counts.map.lock().len()
    }
}

/// The address the per-IP limits count: an IPv4 address, or an IPv6 address's /64 network.
fn limit_key(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V4(_) => ip,
        IpAddr::V6(v6) => {
            let bits = u128::from(v6) & !((1u128 << 64) - 1);
            IpAddr::V6(std::net::Ipv6Addr::from(bits))
        }
    }
}

impl super::Gate {
    /// Reload the IP lists and TLS certificates from `config` (SIGHUP). Returns what could not
    /// be reloaded; the rest took effect for new connections.
    pub(crate) fn reload(&self, config: &Config) -> Vec<String> {
        self.admission.reload(config)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().expect("test address")
    }

    fn lists(allow: &[&str], deny: &[&str]) -> NetLists {
        let v = |l: &[&str]| l.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        NetLists::new(&v(allow), &v(deny))
    }

    #[test]
    fn deny_wins_and_empty_allow_allows_all() {
        let l = lists(&[], &["10.0.0.0/8"]);
        assert_eq!(l.check(ip("10.1.2.3")), Err("deny"));
        assert_eq!(l.check(ip("192.0.2.1")), Ok(()));
        let l = lists(&["10.0.0.0/8", "::1"], &["10.9.0.0/16"]);
        assert_eq!(l.check(ip("10.1.2.3")), Ok(()));
        assert_eq!(l.check(ip("10.9.2.3")), Err("deny"));
        assert_eq!(l.check(ip("192.0.2.1")), Err("allow"));
        assert_eq!(l.check(ip("::1")), Ok(()));
    }

    fn admission(max_per_ip: usize, rate: u32, burst: u32, access: AccessConfig) -> Admission {
        let limits = LimitsConfig {
            max_conn_per_ip: max_per_ip,
            conn_rate_per_ip: rate,
            conn_burst_per_ip: burst,
            ..LimitsConfig::default()
        };
        Admission::new(&limits, &access)
    }

    #[test]
    fn node_and_listener_lists_both_apply_and_reload() {
        let a = admission(
            0,
            0,
            0,
            AccessConfig {
                allow: vec![],
                deny: vec!["127.0.0.3".into()],
            },
        );
        let cfg = ListenerConfig {
            deny: vec!["127.0.0.2/32".into()],
            ..ListenerConfig::default()
        };
        let l = a.add_listener(&cfg, None);
        assert!(a.admit(&l, ip("127.0.0.1")).is_ok());
        assert_eq!(
            a.admit(&l, ip("127.0.0.2")).err().map(|r| r.kind()),
            Some("ip_denied")
        );
        assert!(a.admit(&l, ip("127.0.0.3")).is_err());
        // IPv4-mapped IPv6 addresses are their IPv4 address
        assert!(a.admit(&l, ip("::ffff:127.0.0.3")).is_err());

        let mut config = Config::default();
        config.access.deny = vec!["127.0.0.1".into()];
        config.listeners = vec![ListenerConfig::default()];
        a.reload(&config);
        assert!(a.admit(&l, ip("127.0.0.1")).is_err());
        assert!(a.admit(&l, ip("127.0.0.2")).is_ok());
        assert!(a.admit(&l, ip("127.0.0.3")).is_ok());
    }

    #[test]
    fn open_connections_per_ip_are_capped_and_given_back_on_drop() {
        let a = admission(2, 0, 0, AccessConfig::default());
        let l = a.add_listener(&ListenerConfig::default(), None);
        let s1 = a.admit(&l, ip("192.0.2.1")).expect("first");
        let s2 = a.admit(&l, ip("192.0.2.1")).expect("second");
        assert_eq!(
            a.admit(&l, ip("192.0.2.1")).err(),
            Some(Refused::PerIpCap(2))
        );
        // another address is unaffected
        let other = a.admit(&l, ip("192.0.2.2")).expect("other address");
        // IPv6 addresses of one /64 share a count
        let v6a = a.admit(&l, ip("2001:db8::1")).expect("v6");
        let v6b = a.admit(&l, ip("2001:db8::ffff:2")).expect("v6, same /64");
        assert_eq!(
            a.admit(&l, ip("2001:db8::3")).err(),
            Some(Refused::PerIpCap(2))
        );
        assert!(a.admit(&l, ip("2001:db8:0:1::1")).is_ok(), "another /64");
        drop((v6a, v6b));
        drop(s1);
        let s3 = a.admit(&l, ip("192.0.2.1")).expect("after a close");
        drop((s2, s3, other));
        assert_eq!(a.tracked(), 0, "closed addresses leave no entry");
    }

    #[test]
    fn connection_rate_per_ip_allows_the_burst_then_refuses() {
        let a = admission(0, 1, 3, AccessConfig::default());
        let l = a.add_listener(&ListenerConfig::default(), None);
        for _ in 0..3 {
            assert!(a.admit(&l, ip("192.0.2.1")).is_ok());
        }
        assert_eq!(
            a.admit(&l, ip("192.0.2.1")).err(),
            Some(Refused::PerIpRate(1))
        );
        assert!(a.admit(&l, ip("192.0.2.9")).is_ok());
    }
}

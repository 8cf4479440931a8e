//! Registry discovery for backend groups: a watcher per source that reads the live members of a
//! registry key and feeds them to [`Backends::update`] (docs/backends.md, "Registry
//! discovery").
//!
//! The Redis source is the gobase watcher (docs/cluster.md, "The gobase layouts"): the members
//! of the key's ZSET that are live in its layout, re-read on every message of the key's channel
//! and every 8 s, are read with [`GobaseMember::parse`] (at least five `&`-separated fields, a
//! numeric port); a group keeps the members of its own name and of the configured scheme, sorted
//! by (id, name), and is updated when that set changed (the scheme is not compared). The watch
//! itself is [`GobaseRegistry::services`], so both layouts and their checker come with it.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use warren::ring::normalize;

use super::codec::Codec;
use super::hooks::Hooks;
use super::{Backends, ServiceConf};
use crate::redis::{GobaseLayout, GobaseMember, GobaseRegistry};

/// Pause between two attempts to reach a registry that does not answer (gobase's poll period).
const RECONNECT: Duration = Duration::from_secs(8);

/// Which registry members a group takes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MemberFilter {
    /// The group: members of this service name (lowercased and trimmed as groups compare).
    pub group: String,
    /// Only members of this scheme (`tcp`); empty: any.
    pub scheme: String,
}

impl MemberFilter {
    /// The group's services among `members`, sorted by (id, name), as a gobase watcher keeps
    /// them: the members of the group's name and scheme.
    pub fn select(&self, members: &[GobaseMember]) -> Vec<ServiceConf> {
        let group = normalize(&self.group);
        let scheme = self.scheme.trim();
        let mut v: Vec<ServiceConf> = members
            .iter()
            .filter(|m| normalize(&m.name) == group)
            .filter(|m| scheme.is_empty() || m.scheme.trim().eq_ignore_ascii_case(scheme))
            .map(|m| ServiceConf::new(&m.name, &m.id, &m.addr, m.port))
            .collect();
        v.sort_by(|a, b| (&a.id, &a.name).cmp(&(&b.id, &b.name)));
        v.dedup_by(|a, b| a.id == b.id && a.name == b.name);
        v
    }
}

/// A Redis registry key in a gobase layout, as a discovery source.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RedisSource {
    /// `redis://host:port/db` (a `?layout=` on it wins over `layout`).
    pub url: String,
    /// The gobase key (the ZSET of members).
    pub key: String,
    /// The key's layout.
    pub layout: GobaseLayout,
}

/// Watch `source` until `stop`: every change of the group's members (as `filter` selects them)
/// becomes one [`Backends::update`]. The first read is an update too, even when empty. While
/// the registry cannot be reached the group keeps what it has, and the watcher tries again every
/// 8 s.
pub async fn watch_redis<C: Codec, H: Hooks<C>>(
    backends: Backends<C, H>,
    source: RedisSource,
    filter: MemberFilter,
    stop: CancellationToken,
) {
    watch_redis_with(
        move |group: &str, services| backends.update(group, services),
        source,
        filter,
        stop,
    )
    .await;
}

/// [`watch_redis`] for any kind of group: `update(group, services)` is called on each change
/// (an [`HttpBackends`](super::HttpBackends)' update, for one).
pub async fn watch_redis_with(
    update: impl Fn(&str, Vec<ServiceConf>) + Send + 'static,
    source: RedisSource,
    filter: MemberFilter,
    stop: CancellationToken,
) {
    let mut failing = false;
    let registry = loop {
        let connect = GobaseRegistry::connect_layout(&source.url, &source.key, source.layout);
        let r = tokio::select! {
            biased;
            _ = stop.cancelled() => return,
            r = connect => r,
        };
        match r {
            Ok(r) => break r,
            Err(e) => {
                if !failing {
                    tracing::warn!(group = %filter.group, key = %source.key, error = %e, "backend registry unreachable; trying again every 8 s");
                    failing = true;
                }
                tokio::select! {
                    biased;
                    _ = stop.cancelled() => return,
                    _ = tokio::time::sleep(RECONNECT) => {}
                }
            }
        }
    };
    tracing::info!(group = %filter.group, key = %source.key, layout = %registry.layout(), "backend group watches the registry");
    follow(update, registry, filter, stop).await;
}

async fn follow(
    update: impl Fn(&str, Vec<ServiceConf>),
    registry: Arc<GobaseRegistry>,
    filter: MemberFilter,
    stop: CancellationToken,
) {
    let mut rx: watch::Receiver<Arc<Vec<GobaseMember>>> = registry.services();
    let mut last: Option<Vec<ServiceConf>> = None;
    loop {
        let now = filter.select(&rx.borrow_and_update());
        if last.as_ref() != Some(&now) {
            update(&filter.group, now.clone());
            last = Some(now);
        }
        tokio::select! {
            biased;
            _ = stop.cancelled() => return,
            changed = rx.changed() => if changed.is_err() {
                return;
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn members(list: &[&str]) -> Vec<GobaseMember> {
        list.iter().filter_map(|m| GobaseMember::parse(m)).collect()
    }

    #[test]
    fn a_group_keeps_its_name_and_scheme_sorted() {
        let f = MemberFilter {
            group: "Gate".into(),
            scheme: "tcp".into(),
        };
        let m = members(&[
            "gate&gate2&127.0.0.1&7002&tcp",
            "gate&gate1&127.0.0.1&7001&tcp",
            "gate&gate3&127.0.0.1&7003&http",
            "game&game1&127.0.0.1&7101&tcp",
            "warren&n1&127.0.0.1&0&warren",
            "gate&gate4&127.0.0.1&x&tcp",
        ]);
        let got: Vec<String> = f.select(&m).iter().map(|s| s.id.clone()).collect();
        assert_eq!(got, ["gate1", "gate2"]);
        let any = MemberFilter {
            scheme: String::new(),
            ..f
        };
        assert_eq!(any.select(&m).len(), 3);
    }
}

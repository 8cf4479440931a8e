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
//!
//! The NATS source is a JetStream key-value bucket in which each service puts its gobase member
//! string under a key of its own (its id, say) and deletes it when it leaves (or lets the
//! bucket's `max_age` drop it): the watcher follows the bucket's changes and applies the same
//! member rules.

use std::sync::Arc;
use std::time::Duration;

use std::collections::HashMap;

use futures_util::StreamExt;
use futures_util::future::BoxFuture;
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
    update: impl Fn(&str, Vec<ServiceConf>) + Send + Sync + 'static,
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

/// A NATS JetStream key-value bucket of gobase member strings, as a discovery source.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NatsKvSource {
    /// `nats://host:port`.
    pub url: String,
    /// The bucket.
    pub bucket: String,
}

/// Longest wait for one NATS step (connect, open the bucket, start the watch).
const NATS_STEP: Duration = Duration::from_secs(5);

/// Watch a NATS KV bucket until `stop`: every change of the group's members becomes one
/// `update(group, services)`. A value that is not a member string is skipped (logged once per
/// revision); a deleted or purged key is a member gone. When the connection or the watch fails,
/// the group keeps what it has and the watcher starts again 8 s later, replaying the bucket.
pub async fn watch_nats_kv(
    update: impl Fn(&str, Vec<ServiceConf>) + Send + Sync + 'static,
    source: NatsKvSource,
    filter: MemberFilter,
    stop: CancellationToken,
) {
    let from = source.bucket.clone();
    let (update, source, group) = (Arc::new(update), Arc::new(source), Arc::new(filter.clone()));
    lives(&from, &filter, &stop, move |st| {
        let (update, source, group) = (update.clone(), source.clone(), group.clone());
        Box::pin(async move { follow_kv(&*update, &source, &group, st).await })
    })
    .await;
}

/// What a watcher keeps across the lives of its connection: the services it last handed over,
/// and whether it is failing (logged once until it is back).
#[derive(Default)]
pub(super) struct Following {
    pub(super) last: Option<Vec<ServiceConf>>,
    pub(super) failing: bool,
}

/// Run `life` (connect, read and follow a source: `from` names it in the logs) until `stop`,
/// again 8 s after each end; the first failure of a series is logged with its reason.
pub(super) async fn lives(
    from: &str,
    filter: &MemberFilter,
    stop: &CancellationToken,
    mut life: impl for<'a> FnMut(&'a mut Following) -> BoxFuture<'a, String>,
) {
    let mut st = Following::default();
    loop {
        let why = tokio::select! {
            biased;
            _ = stop.cancelled() => return,
            why = life(&mut st) => why,
        };
        if !st.failing {
            tracing::warn!(group = %filter.group, source = %from, %why, "backend registry unreachable; trying again every 8 s");
            st.failing = true;
        }
        tokio::select! {
            biased;
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(RECONNECT) => {}
        }
    }
}

/// One life of the NATS watcher: connect, open the bucket, replay it and follow its changes;
/// returns why it stopped.
async fn follow_kv(
    update: &impl Fn(&str, Vec<ServiceConf>),
    source: &NatsKvSource,
    filter: &MemberFilter,
    st: &mut Following,
) -> String {
    let step = |what: &'static str| move |_| format!("{what}: no answer within {NATS_STEP:?}");
    let client = match tokio::time::timeout(NATS_STEP, async_nats::connect(&source.url))
        .await
        .map_err(step("connect"))
    {
        Ok(Ok(c)) => c,
        Ok(Err(e)) => return format!("connect: {e}"),
        Err(e) => return e,
    };
    let js = async_nats::jetstream::new(client);
    let store = match tokio::time::timeout(NATS_STEP, js.get_key_value(source.bucket.clone()))
        .await
        .map_err(step("open the bucket"))
    {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => return format!("open bucket {}: {e}", source.bucket),
        Err(e) => return e,
    };
    let mut watch = match tokio::time::timeout(NATS_STEP, store.watch_with_history(">"))
        .await
        .map_err(step("watch the bucket"))
    {
        Ok(Ok(w)) => w,
        Ok(Err(e)) => return format!("watch bucket {}: {e}", source.bucket),
        Err(e) => return e,
    };
    if st.failing {
        tracing::info!(group = %filter.group, bucket = %source.bucket, "backend registry reachable again");
        st.failing = false;
    } else {
        tracing::info!(group = %filter.group, bucket = %source.bucket, "backend group watches the registry");
    }
    let mut members: HashMap<String, GobaseMember> = HashMap::new();
    // the replay of the bucket ends when the watch has nothing pending: publish then, and on
    // every change after
    let mut replayed = false;
    loop {
        let next = if replayed {
            watch.next().await
        } else {
            match tokio::time::timeout(Duration::from_millis(200), watch.next()).await {
                Ok(n) => n,
                Err(_) => {
                    replayed = true;
                    publish(update, filter, &members, &mut st.last);
                    continue;
                }
            }
        };
        let entry = match next {
            Some(Ok(e)) => e,
            Some(Err(e)) => return format!("watch bucket {}: {e}", source.bucket),
            None => return format!("watch bucket {}: ended", source.bucket),
        };
        match entry.operation {
            async_nats::jetstream::kv::Operation::Put => {
                let parsed = std::str::from_utf8(&entry.value)
                    .ok()
                    .and_then(|v| GobaseMember::parse(v.trim()));
                match parsed {
                    Some(m) => {
                        members.insert(entry.key, m);
                    }
                    None => {
                        members.remove(&entry.key);
                        tracing::warn!(bucket = %source.bucket, key = %entry.key, revision = entry.revision, "ignored a registry value that is not name&id&addr&port&scheme");
                    }
                }
            }
            async_nats::jetstream::kv::Operation::Delete
            | async_nats::jetstream::kv::Operation::Purge => {
                members.remove(&entry.key);
            }
        }
        if replayed || entry.delta == 0 {
            replayed = true;
            publish(update, filter, &members, &mut st.last);
        }
    }
}

/// Hand the group its services when they changed since `last`.
pub(super) fn publish(
    update: &impl Fn(&str, Vec<ServiceConf>),
    filter: &MemberFilter,
    members: &HashMap<String, GobaseMember>,
    last: &mut Option<Vec<ServiceConf>>,
) {
    let all: Vec<GobaseMember> = members.values().cloned().collect();
    let now = filter.select(&all);
    if last.as_ref() != Some(&now) {
        update(&filter.group, now.clone());
        *last = Some(now);
    }
}

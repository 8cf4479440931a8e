//! etcd as a discovery source for backend groups (feature `etcd`; docs/backends.md, "Registry
//! discovery"): each service puts its gobase member string (`name&id&addr&port&scheme…`) under
//! a key of its own below a prefix (`<key>/<id>`, usually attached to a lease so that etcd drops
//! it when the service stops renewing), and deletes it when it leaves.
//!
//! The watcher reads the prefix, then follows a watch on it: every event, and every 8 s in case a
//! watch stalled without a word, reads the prefix again and applies the same member rules as the
//! Redis and NATS sources ([`MemberFilter`]). While etcd cannot be reached the group keeps what it
//! has and the watcher starts again 8 s later.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use etcd_client::{Client, ConnectOptions, GetOptions, WatchOptions};
use futures_util::StreamExt;
use tokio_util::sync::CancellationToken;

use super::ServiceConf;
use super::discovery::{Following, MemberFilter, lives, publish};
use crate::redis::GobaseMember;

/// The period of the full re-read (the pause before trying again is the other sources').
const REREAD: Duration = Duration::from_secs(8);

/// An etcd key prefix of gobase member strings, as a discovery source.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EtcdSource {
    /// `etcd://host:port[,host:port…]`.
    pub url: String,
    /// The prefix: the services are the keys below `<prefix>/`.
    pub prefix: String,
}

/// Watch the prefix until `stop`: every change of the group's members becomes one
/// `update(group, services)`, the first read included (even when empty).
pub async fn watch_etcd(
    update: impl Fn(&str, Vec<ServiceConf>) + Send + Sync + 'static,
    source: EtcdSource,
    filter: MemberFilter,
    stop: CancellationToken,
) {
    let from = source.prefix.clone();
    let (update, source, group) = (Arc::new(update), Arc::new(source), Arc::new(filter.clone()));
    lives(&from, &filter, &stop, move |st| {
        let (update, source, group) = (update.clone(), source.clone(), group.clone());
        Box::pin(async move { follow(&*update, &source, &group, st).await })
    })
    .await;
}

/// One life of the watcher: connect, read, watch and re-read; returns why it stopped.
async fn follow(
    update: &impl Fn(&str, Vec<ServiceConf>),
    source: &EtcdSource,
    filter: &MemberFilter,
    st: &mut Following,
) -> String {
    let run = async {
        let eps = crate::etcd::endpoints(&source.url)?;
        let options = ConnectOptions::new()
            .with_connect_timeout(crate::etcd::OP_TIMEOUT)
            .with_timeout(crate::etcd::OP_TIMEOUT);
        let mut client =
            crate::etcd::timed("connect", Client::connect(&eps, Some(options))).await?;
        let prefix = format!("{}/", source.prefix.trim_end_matches('/'));
        let mut refused: HashMap<Vec<u8>, i64> = HashMap::new();
        let rev = read(
            &mut client,
            &prefix,
            &mut refused,
            update,
            filter,
            &mut st.last,
        )
        .await?;
        if st.failing {
            tracing::info!(group = %filter.group, prefix = %source.prefix, "backend registry reachable again");
            st.failing = false;
        } else {
            tracing::info!(group = %filter.group, prefix = %source.prefix, "backend group watches the registry");
        }
        let watch = crate::etcd::timed(
            "watch",
            client.watch(
                prefix.as_str(),
                Some(
                    WatchOptions::new()
                        .with_prefix()
                        .with_start_revision(rev + 1),
                ),
            ),
        )
        .await?;
        // the request half lives as long as the responses are read
        let (_requests, mut responses) = watch.split();
        let mut tick = tokio::time::interval(REREAD);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        tick.tick().await;
        loop {
            tokio::select! {
                msg = responses.next() => match msg {
                    Some(Ok(resp)) if resp.canceled() => {
                        return Err(format!("watch cancelled: {}", resp.cancel_reason()));
                    }
                    Some(Ok(resp)) if resp.events().is_empty() => continue,
                    Some(Ok(_)) => {}
                    Some(Err(e)) => return Err(format!("watch: {e}")),
                    None => return Err("watch: ended".to_owned()),
                },
                _ = tick.tick() => {}
            }
            read(
                &mut client,
                &prefix,
                &mut refused,
                update,
                filter,
                &mut st.last,
            )
            .await?;
        }
    };
    match run.await {
        Ok(()) => "stopped".to_owned(),
        Err(why) => why,
    }
}

/// Read every member below `prefix` and publish the group's services if they changed; returns
/// the store revision read at. A value that is not a member string is skipped, logged once per
/// key and revision.
async fn read(
    client: &mut Client,
    prefix: &str,
    refused: &mut HashMap<Vec<u8>, i64>,
    update: &impl Fn(&str, Vec<ServiceConf>),
    filter: &MemberFilter,
    last: &mut Option<Vec<ServiceConf>>,
) -> Result<i64, String> {
    let resp = crate::etcd::timed(
        "read",
        client.get(prefix, Some(GetOptions::new().with_prefix())),
    )
    .await?;
    let mut members = HashMap::with_capacity(resp.kvs().len());
    for kv in resp.kvs() {
        let parsed = std::str::from_utf8(kv.value())
            .ok()
            .and_then(|v| GobaseMember::parse(v.trim()));
        match parsed {
            Some(m) => {
                refused.remove(kv.key());
                members.insert(String::from_utf8_lossy(kv.key()).into_owned(), m);
            }
            None => {
                if refused.insert(kv.key().to_vec(), kv.mod_revision()) != Some(kv.mod_revision()) {
                    tracing::warn!(key = %String::from_utf8_lossy(kv.key()), revision = kv.mod_revision(), "ignored a registry value that is not name&id&addr&port&scheme");
                }
            }
        }
    }
    publish(update, filter, &members, last);
    Ok(resp.header().map_or(0, |h| h.revision()))
}

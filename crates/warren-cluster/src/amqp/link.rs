//! One RabbitMQ connection that comes back by itself.
//!
//! A [`Link`] owns a lapin connection and its publish channel (publisher confirms on), watched by
//! a supervisor task: when the connection or the publish channel dies the link reports itself
//! down at once (publishes fail fast, nothing is buffered), then reconnects with exponential
//! backoff and declares its exchanges again. Consumers never share the publish channel: each
//! runs on a channel of its own through [`run_subscription`], which subscribes again after every
//! reconnect, so a slow consumer never delays a publish and a consumer's channel error never
//! takes the publishers down.

use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt;
use futures_util::future::BoxFuture;
use lapin::message::Delivery;
use lapin::options::{BasicPublishOptions, ConfirmSelectOptions, ExchangeDeclareOptions};
use lapin::types::{FieldTable, ShortString};
use lapin::{
    BasicProperties, Channel, Confirmation, Connection, ConnectionProperties, Consumer,
    ExchangeKind,
};
use tokio::sync::{Notify, watch};
use tokio_util::sync::CancellationToken;
use warren::error::Detail;

use super::redact;

/// How long a connection attempt may take (the AMQP port opens before a booting broker answers).
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a publish waits for the broker's confirm before the link counts as broken.
const CONFIRM_TIMEOUT: Duration = Duration::from_secs(10);
/// First and longest pause between reconnection or resubscription attempts.
const BACKOFF_MIN: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(5);
/// How often the supervisor looks at the connection's state between publish failures.
const CHECK_EVERY: Duration = Duration::from_millis(200);

/// An exchange a link declares on every (re)connect, before it reports itself up: publishing to
/// an exchange that does not exist would close the publish channel.
#[derive(Debug, Clone)]
pub(crate) struct ExchangeSpec {
    /// Exchange name.
    pub name: String,
    /// Its type.
    pub kind: ExchangeKind,
}

/// The exchange type named in a config (`direct`, `fanout`, `topic`, `headers`, or a plugin's).
pub(crate) fn exchange_kind(s: &str) -> ExchangeKind {
    match s {
        "" | "direct" => ExchangeKind::Direct,
        "fanout" => ExchangeKind::Fanout,
        "topic" => ExchangeKind::Topic,
        "headers" => ExchangeKind::Headers,
        other => ExchangeKind::Custom(other.to_owned()),
    }
}

/// The URL handed to the AMQP client, with the virtual host spelled out: an empty path or a lone
/// `/` (`amqp://guest:guest@host:5672/`, mqant's sample URIs) means vhost `/`, as mqant's Go
/// client (streadway/amqp) and the AMQP URI spec's default read it, where lapin would ask for a
/// vhost named "" and be refused (`NOT_ALLOWED - vhost  not found`). Other URLs are unchanged.
pub(crate) fn with_vhost(url: &str) -> String {
    match url::Url::parse(url) {
        Ok(mut u) if u.has_host() && matches!(u.path(), "" | "/") => {
            u.set_path("/%2f");
            u.to_string()
        }
        _ => url.to_owned(),
    }
}

/// An AMQP short string (names, routing keys: at most 255 bytes), refused rather than panicking.
pub(crate) fn short(s: &str) -> Result<ShortString, Detail> {
    ShortString::try_new(s).map_err(|e| Detail::caused(format!("{s:.40}…"), e))
}

/// A lapin failure while doing `what`, keeping lapin's error as the source.
pub(crate) fn failed(what: impl Into<String>) -> impl FnOnce(lapin::Error) -> Detail {
    let what = what.into();
    move |e| Detail::caused(what, e)
}

/// One established connection; replaced by a new one (with a higher `generation`) after a
/// reconnect.
pub(crate) struct Live {
    /// Counts connections of this link, from 1.
    pub generation: u64,
    /// The connection (consumers open their channels on it).
    pub conn: Connection,
    /// The channel every publish of this link goes through (confirm mode).
    pub publish: Channel,
}

/// Why a publish failed (the detail keeps lapin's error as the source).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum PublishError {
    /// Not connected, or the connection broke during the publish: nothing was delivered.
    Down(Detail),
    /// `mandatory` was set and no queue is bound for the routing key: the broker returned it.
    Unroutable,
    /// The broker refused the message, or its names were unusable.
    Refused(Detail),
}

/// A broker connection with reconnection, shared by the publishers and consumers of one
/// transport or bridge.
pub(crate) struct Link {
    url: String,
    label: &'static str,
    exchanges: Vec<ExchangeSpec>,
    state: watch::Sender<Option<Arc<Live>>>,
    kick: Notify,
    stop: CancellationToken,
}

impl Link {
    /// Connect to `url` and declare `exchanges` (durable, not auto-deleted, as mqant peers declare
    /// them: docs/cluster.md, "Compatibility bridges"); fails if the broker cannot be reached now.
    /// Afterwards the link reconnects by itself until `stop` fires, when it closes the connection.
    pub async fn open(
        url: &str,
        label: &'static str,
        exchanges: Vec<ExchangeSpec>,
        stop: CancellationToken,
    ) -> Result<Arc<Link>, Detail> {
        let link = Arc::new(Link {
            url: url.to_owned(),
            label,
            exchanges,
            state: watch::Sender::new(None),
            kick: Notify::new(),
            stop,
        });
        let live = Arc::new(link.connect(1).await?);
        link.state.send_replace(Some(live.clone()));
        tokio::spawn(link.clone().supervise(live));
        Ok(link)
    }

    /// The connection if it is up now.
    pub fn current(&self) -> Option<Arc<Live>> {
        self.state.borrow().clone()
    }

    /// Hears every change of connection (down, up again).
    pub fn watch(&self) -> watch::Receiver<Option<Arc<Live>>> {
        self.state.subscribe()
    }

    /// Wait for a live connection; `None` once `stop` or the link's own token fires.
    pub async fn wait_live(&self, stop: &CancellationToken) -> Option<Arc<Live>> {
        let mut rx = self.state.subscribe();
        loop {
            if let Some(l) = rx.borrow_and_update().clone() {
                return Some(l);
            }
            tokio::select! {
                _ = stop.cancelled() => return None,
                _ = self.stop.cancelled() => return None,
                r = rx.changed() => if r.is_err() { return None },
            }
        }
    }

    /// Fires when the link shuts down.
    pub fn stopped(&self) -> tokio_util::sync::WaitForCancellationFuture<'_> {
        self.stop.cancelled()
    }

    /// Stop the link (closes the connection; consumers end).
    pub fn shutdown(&self) {
        self.stop.cancel();
    }

    /// Ask the supervisor to look at the connection now (a publish just failed).
    fn kick(&self) {
        self.kick.notify_one();
    }

    /// Publish on the confirm channel and wait for the broker's confirm. With `mandatory`, a
    /// message no queue receives comes back as [`PublishError::Unroutable`] instead of
    /// vanishing. Publishes awaited one after another reach a queue in that order.
    pub async fn publish(
        &self,
        exchange: &str,
        key: &str,
        payload: &[u8],
        props: BasicProperties,
        mandatory: bool,
    ) -> Result<(), PublishError> {
        self.publish_batch(exchange, key, &[payload], props, mandatory)
            .await
    }

    /// Publish `payloads` in order to one exchange and routing key, all written before any
    /// confirm is awaited, then wait for every confirm together: one broker round trip for the
    /// lot instead of one per message. Fails with the first failure; messages before it may have
    /// been taken.
    pub async fn publish_batch(
        &self,
        exchange: &str,
        key: &str,
        payloads: &[impl AsRef<[u8]>],
        props: BasicProperties,
        mandatory: bool,
    ) -> Result<(), PublishError> {
        let live = self
            .current()
            .ok_or_else(|| PublishError::Down("not connected to the broker".into()))?;
        let exchange = short(exchange).map_err(PublishError::Refused)?;
        let key = short(key).map_err(PublishError::Refused)?;
        let opts = BasicPublishOptions {
            mandatory,
            immediate: false,
        };
        let mut confirms = Vec::with_capacity(payloads.len());
        for p in payloads {
            match live
                .publish
                .basic_publish(
                    exchange.clone(),
                    key.clone(),
                    opts,
                    p.as_ref(),
                    props.clone(),
                )
                .await
            {
                Ok(c) => confirms.push(c),
                Err(e) => {
                    self.kick();
                    return Err(PublishError::Down(Detail::from_error(e)));
                }
            }
        }
        let all =
            tokio::time::timeout(CONFIRM_TIMEOUT, futures_util::future::join_all(confirms)).await;
        match all {
            Err(e) => self.confirmed(Err(e)),
            Ok(results) => {
                for r in results {
                    self.confirmed(Ok(r))?;
                }
                Ok(())
            }
        }
    }

    /// What a publisher confirm (or its absence within [`CONFIRM_TIMEOUT`]) says of a message.
    fn confirmed(
        &self,
        confirm: Result<Result<Confirmation, lapin::Error>, tokio::time::error::Elapsed>,
    ) -> Result<(), PublishError> {
        match confirm {
            Err(_) => {
                self.kick();
                Err(PublishError::Down(
                    "no publisher confirm from the broker".into(),
                ))
            }
            Ok(Err(e)) => {
                self.kick();
                Err(PublishError::Down(Detail::from_error(e)))
            }
            Ok(Ok(Confirmation::Ack(Some(_)) | Confirmation::Nack(Some(_)))) => {
                Err(PublishError::Unroutable)
            }
            Ok(Ok(Confirmation::Nack(None))) => Err(PublishError::Refused(
                "the broker did not accept the message (nack)".into(),
            )),
            Ok(Ok(Confirmation::Ack(None) | Confirmation::NotRequested)) => Ok(()),
        }
    }

    async fn connect(&self, generation: u64) -> Result<Live, Detail> {
        let props = ConnectionProperties::default()
            .with_connection_name(format!("warren {}", self.label).into());
        let url = with_vhost(&self.url);
        let conn = tokio::time::timeout(CONNECT_TIMEOUT, Connection::connect(&url, props))
            .await
            .map_err(|_| Detail::new("the broker did not complete the handshake in time"))?
            .map_err(Detail::from_error)?;
        let ready = async {
            let publish = conn.create_channel().await.map_err(Detail::from_error)?;
            publish
                .confirm_select(ConfirmSelectOptions::default())
                .await
                .map_err(Detail::from_error)?;
            for ex in &self.exchanges {
                let opts = ExchangeDeclareOptions {
                    durable: true,
                    auto_delete: false,
                    internal: false,
                    ..Default::default()
                };
                publish
                    .exchange_declare(
                        short(&ex.name)?,
                        ex.kind.clone(),
                        opts,
                        FieldTable::default(),
                    )
                    .await
                    .map_err(failed(format!("exchange {}", ex.name)))?;
            }
            Ok::<_, Detail>(publish)
        };
        match ready.await {
            Ok(publish) => Ok(Live {
                generation,
                conn,
                publish,
            }),
            Err(e) => {
                let _ = conn.close(200, "setup failed".into()).await;
                Err(e)
            }
        }
    }

    /// Watch the connection; after a loss, report down, reconnect with backoff, report up.
    async fn supervise(self: Arc<Self>, mut live: Arc<Live>) {
        let url = redact(&self.url);
        let mut generation = live.generation;
        loop {
            self.until_lost(&live).await;
            self.state.send_replace(None);
            // a publish channel can die on a live connection: close it, so every consumer
            // resubscribes on the next one too
            let _ = tokio::time::timeout(
                Duration::from_secs(1),
                live.conn.close(200, "reconnecting".into()),
            )
            .await;
            drop(live);
            if self.stop.is_cancelled() {
                return;
            }
            metrics::counter!("warren_amqp_disconnects_total", "link" => self.label).increment(1);
            tracing::warn!(link = self.label, %url, "lost the RabbitMQ connection; reconnecting");
            let mut delay = BACKOFF_MIN;
            live = loop {
                tokio::select! {
                    _ = self.stop.cancelled() => return,
                    _ = tokio::time::sleep(delay) => {}
                }
                generation += 1;
                match self.connect(generation).await {
                    Ok(l) => break Arc::new(l),
                    Err(why) => {
                        tracing::debug!(link = self.label, %url, %why, "RabbitMQ still unreachable");
                        delay = (delay * 2).min(BACKOFF_MAX);
                    }
                }
            };
            tracing::info!(link = self.label, %url, generation, "RabbitMQ connection restored");
            self.state.send_replace(Some(live.clone()));
        }
    }

    async fn until_lost(&self, live: &Live) {
        let mut tick = tokio::time::interval(CHECK_EVERY);
        loop {
            tokio::select! {
                _ = self.stop.cancelled() => return,
                _ = self.kick.notified() => {}
                _ = tick.tick() => {}
            }
            if !live.conn.status().connected() || !live.publish.status().connected() {
                return;
            }
        }
    }
}

/// A consumer of a link: what it subscribes to on a connection and what it does with each
/// delivery. [`run_subscription`] drives it across reconnects.
pub(crate) trait Subscriber: Send + Sync + 'static {
    /// For logs: what this consumer receives.
    fn what(&self) -> &str;

    /// Declare what is needed and start consuming, on a channel of its own.
    fn subscribe<'a>(
        &'a self,
        live: &'a Live,
    ) -> BoxFuture<'a, Result<(Channel, Consumer), Detail>>;

    /// Handle one delivery (acknowledging it is the subscriber's business). `false` ends the
    /// subscription for good (its receiver is gone).
    fn deliver(&self, delivery: Delivery) -> BoxFuture<'_, bool>;

    /// No further delivery is ready right now: acknowledge what is held, for a subscriber that
    /// acknowledges in groups.
    fn settle(&self) -> BoxFuture<'_, ()> {
        Box::pin(std::future::ready(()))
    }

    /// The subscription ended (connection lost or channel closed); it will be made again.
    fn lost(&self) {}
}

/// Subscribe now on the current connection, failing if the link is down or the broker refuses.
pub(crate) async fn subscribe_now<S: Subscriber>(
    link: &Link,
    sub: &S,
) -> Result<(u64, Channel, Consumer), Detail> {
    let live = link
        .current()
        .ok_or_else(|| Detail::new("not connected to the broker"))?;
    let (ch, consumer) = sub.subscribe(&live).await?;
    Ok((live.generation, ch, consumer))
}

/// Feed the deliveries of `first` to `sub` in order, and subscribe again (with backoff) whenever
/// the subscription ends, until `stop` or the link stops.
pub(crate) async fn run_subscription<S: Subscriber>(
    link: Arc<Link>,
    sub: Arc<S>,
    stop: CancellationToken,
    first: (u64, Channel, Consumer),
) {
    let (mut generation, mut channel, mut consumer) = first;
    let mut states = link.watch();
    loop {
        // deliveries handed on since the subscriber last settled
        let mut unsettled = false;
        loop {
            tokio::select! {
                biased;
                _ = stop.cancelled() => {
                    let _ = channel.close(200, "stopped".into()).await;
                    return;
                }
                _ = link.stopped() => return,
                changed = states.changed() => {
                    if changed.is_err() {
                        return;
                    }
                    let now = states.borrow_and_update().as_ref().map(|l| l.generation);
                    if now != Some(generation) {
                        break;
                    }
                }
                d = consumer.next() => match d {
                    Some(Ok(d)) => {
                        if !sub.deliver(d).await {
                            let _ = channel.close(200, "receiver gone".into()).await;
                            return;
                        }
                        unsettled = true;
                    }
                    Some(Err(e)) => {
                        tracing::debug!(what = sub.what(), error = %e, "consumer failed");
                        break;
                    }
                    None => {
                        tracing::debug!(what = sub.what(), "consumer cancelled");
                        break;
                    }
                },
                // polled only when no delivery is ready (the select is biased)
                _ = std::future::ready(()), if unsettled => {
                    sub.settle().await;
                    unsettled = false;
                }
            }
        }
        sub.lost();
        drop(consumer);
        let mut delay = BACKOFF_MIN;
        (generation, channel, consumer) = loop {
            let Some(live) = link.wait_live(&stop).await else {
                return;
            };
            match sub.subscribe(&live).await {
                Ok((ch, c)) => {
                    tracing::info!(
                        what = sub.what(),
                        generation = live.generation,
                        "consuming again"
                    );
                    break (live.generation, ch, c);
                }
                Err(why) => {
                    tracing::debug!(what = sub.what(), %why, "cannot subscribe yet");
                    tokio::select! {
                        _ = stop.cancelled() => return,
                        _ = link.stopped() => return,
                        _ = tokio::time::sleep(delay) => {}
                    }
                    delay = (delay * 2).min(BACKOFF_MAX);
                }
            }
        };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exchange_types_and_long_names() {
        assert_eq!(exchange_kind("direct"), ExchangeKind::Direct);
        assert_eq!(exchange_kind(""), ExchangeKind::Direct);
        assert_eq!(exchange_kind("topic"), ExchangeKind::Topic);
        assert_eq!(
            exchange_kind("x-delayed-message"),
            ExchangeKind::Custom("x-delayed-message".into())
        );
        assert!(short(&"q".repeat(255)).is_ok());
        assert!(short(&"q".repeat(256)).is_err());
    }

    #[test]
    fn a_url_without_a_vhost_means_the_default_one() {
        let want = "amqp://guest:guest@127.0.0.1:5672/%2f";
        assert_eq!(with_vhost("amqp://guest:guest@127.0.0.1:5672/"), want);
        assert_eq!(with_vhost("amqp://guest:guest@127.0.0.1:5672"), want);
        assert_eq!(with_vhost(want), want);
        assert_eq!(with_vhost("amqp://h:1/game"), "amqp://h:1/game");
        assert_eq!(
            with_vhost("amqps://h:1/?heartbeat=5"),
            "amqps://h:1/%2f?heartbeat=5"
        );
        assert_eq!(with_vhost("not a url"), "not a url");
    }
}

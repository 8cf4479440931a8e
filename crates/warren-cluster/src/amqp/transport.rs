//! [`AmqpTransport`]: warren's node inboxes on RabbitMQ.
//!
//! Topology: one direct exchange named after the bus prefix; node `id` receives on queue
//! `<prefix>.node.<id>`, bound with routing key `id`. A frame to a node is published on the
//! exchange with the node id as routing key, `mandatory` and under publisher confirms, so a
//! frame for a node whose queue does not exist (dead, not started, reconnecting) fails its send
//! instead of vanishing.

use std::sync::Arc;

use bytes::Bytes;
use futures_util::future::BoxFuture;
use lapin::message::Delivery;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicQosOptions, QueueBindOptions, QueueDeclareOptions,
};
use lapin::types::FieldTable;
use lapin::{Acker, BasicProperties, Channel, Consumer};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use warren::error::Detail;
use warren::remote::{InboxFrames, Transport, TransportError, inbox_channel};

use super::MAX_MESSAGE;
use super::link::{
    ExchangeSpec, Link, Live, PublishError, Subscriber, exchange_kind, failed, run_subscription,
    short, subscribe_now,
};

/// Frames received but not yet taken by the bus; a full queue pauses the receiving loop.
const INBOX_QUEUE: usize = 1024;

/// Deliveries a node's consumer may hold unacknowledged: once its inbox is full and this many
/// wait, the broker stops delivering (backpressure reaches the queue).
const PREFETCH: u16 = 256;

/// The RabbitMQ [`Transport`]: one inbox queue per node on a direct exchange, publishes confirmed
/// by the broker, reconnection in the background. Build it with [`AmqpTransport::connect`].
pub struct AmqpTransport {
    link: Arc<Link>,
    prefix: String,
}

impl std::fmt::Debug for AmqpTransport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AmqpTransport")
            .field("prefix", &self.prefix)
            .field("connected", &self.link.current().is_some())
            .finish_non_exhaustive()
    }
}

impl AmqpTransport {
    /// Connect to the broker at `url` (`amqp://user:pass@host:5672/%2f`) and declare the
    /// exchange `prefix`. Fails if the broker cannot be reached now; later outages are
    /// recovered in the background (sends fail with [`TransportError::Unavailable`] meanwhile).
    pub async fn connect(url: &str, prefix: &str) -> Result<Arc<AmqpTransport>, TransportError> {
        if prefix.is_empty() {
            return Err(TransportError::Broker(
                "the bus prefix names the exchange and may not be empty".into(),
            ));
        }
        short(&format!("{prefix}.node.")).map_err(TransportError::Broker)?;
        let exchanges = vec![ExchangeSpec {
            name: prefix.to_owned(),
            kind: exchange_kind("direct"),
        }];
        let link = Link::open(url, "bus", exchanges, CancellationToken::new())
            .await
            .map_err(TransportError::Unavailable)?;
        Ok(Arc::new(AmqpTransport {
            link,
            prefix: prefix.to_owned(),
        }))
    }

    /// Whether the broker connection is up now.
    pub fn is_connected(&self) -> bool {
        self.link.current().is_some()
    }
}

impl Drop for AmqpTransport {
    fn drop(&mut self) {
        self.link.shutdown();
    }
}

impl AmqpTransport {
    async fn publish(&self, node: &str, frames: &[Bytes]) -> Result<(), TransportError> {
        if let Some(f) = frames.iter().find(|f| f.len() > MAX_MESSAGE) {
            return Err(TransportError::TooLarge {
                size: f.len(),
                max: MAX_MESSAGE,
            });
        }
        let props = BasicProperties::default().with_delivery_mode(1);
        match self
            .link
            .publish_batch(&self.prefix, node, frames, props, true)
            .await
        {
            Ok(()) => Ok(()),
            Err(PublishError::Down(why)) => Err(TransportError::Unavailable(why)),
            Err(PublishError::Unroutable) => Err(TransportError::Broker(
                format!(
                    "no inbox for node {node} (no queue bound on exchange {})",
                    self.prefix
                )
                .into(),
            )),
            Err(PublishError::Refused(why)) => Err(TransportError::Broker(why)),
        }
    }
}

impl Transport for AmqpTransport {
    fn is_connected(&self) -> bool {
        AmqpTransport::is_connected(self)
    }

    fn send(&self, node: &str, frame: Bytes) -> BoxFuture<'_, Result<(), TransportError>> {
        let node = node.to_owned();
        Box::pin(async move { self.publish(&node, &[frame]).await })
    }

    fn send_batch(
        &self,
        node: &str,
        frames: Vec<Bytes>,
    ) -> BoxFuture<'_, Result<(), TransportError>> {
        let node = node.to_owned();
        Box::pin(async move { self.publish(&node, &frames).await })
    }

    fn serve(
        &self,
        node: &str,
        stop: CancellationToken,
    ) -> BoxFuture<'_, Result<InboxFrames, TransportError>> {
        let (inbox, frames) = inbox_channel(INBOX_QUEUE);
        let sub = Arc::new(Inbox {
            what: format!("inbox of node {node}"),
            exchange: self.prefix.clone(),
            queue: format!("{}.node.{node}", self.prefix),
            node: node.to_owned(),
            inbox,
            stop: stop.clone(),
            held: parking_lot::Mutex::new(None),
        });
        Box::pin(async move {
            let first = subscribe_now(&self.link, &*sub).await.map_err(|why| {
                if self.link.current().is_none() {
                    TransportError::Unavailable(why)
                } else {
                    TransportError::Broker(why)
                }
            })?;
            tokio::spawn(run_subscription(self.link.clone(), sub, stop, first));
            Ok(frames)
        })
    }

    fn max_frame(&self) -> usize {
        MAX_MESSAGE
    }

    fn kind(&self) -> &'static str {
        "amqp"
    }
}

/// The consumer of one node's inbox queue.
struct Inbox {
    what: String,
    exchange: String,
    queue: String,
    node: String,
    inbox: mpsc::Sender<Bytes>,
    stop: CancellationToken,
    /// The newest delivery handed on but not acknowledged, and how many wait with it: one ack
    /// with `multiple` covers them all.
    held: parking_lot::Mutex<Option<(Acker, u16)>>,
}

/// Deliveries acknowledged together at most, well inside the prefetch window so the broker
/// keeps delivering while they are handed on.
const ACK_EVERY: u16 = PREFETCH / 4;

impl Inbox {
    fn held(&self) -> parking_lot::MutexGuard<'_, Option<(Acker, u16)>> {
        self.held.lock()
    }

    async fn ack_all(&self, acker: Acker) {
        let opts = BasicAckOptions { multiple: true };
        if let Err(e) = acker.ack(opts).await {
            tracing::debug!(queue = %self.queue, error = %e, "ack failed (connection lost?)");
        }
    }
}

impl Subscriber for Inbox {
    fn what(&self) -> &str {
        &self.what
    }

    fn subscribe<'a>(
        &'a self,
        live: &'a Live,
    ) -> BoxFuture<'a, Result<(Channel, Consumer), Detail>> {
        Box::pin(async move {
            let err = |what: &str| failed(format!("{what} {}", self.queue));
            let ch = live
                .conn
                .create_channel()
                .await
                .map_err(err("channel for"))?;
            ch.basic_qos(PREFETCH, BasicQosOptions::default())
                .await
                .map_err(err("qos on"))?;
            // Exclusive and auto-deleted, not durable: the queue lives exactly as long as this
            // node's connection. A node killed with -9 takes its queue with it at once (the
            // broker sees the socket close), so calls for it are returned as unroutable instead
            // of piling up for a node that may never come back, and a restarted broker holds no
            // stale inboxes. Exclusivity also refuses a second process claiming the same node
            // id. The price: frames sent while this node reconnects are refused (the sender
            // gets an error at once), which is the fail-fast rule anyway.
            let opts = QueueDeclareOptions {
                durable: false,
                exclusive: true,
                auto_delete: true,
                ..Default::default()
            };
            ch.queue_declare(short(&self.queue)?, opts, FieldTable::default())
                .await
                .map_err(err("declare"))?;
            ch.queue_bind(
                short(&self.queue)?,
                short(&self.exchange)?,
                short(&self.node)?,
                QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await
            .map_err(err("bind"))?;
            let consumer = ch
                .basic_consume(
                    short(&self.queue)?,
                    short("")?,
                    BasicConsumeOptions::default(),
                    FieldTable::default(),
                )
                .await
                .map_err(err("consume"))?;
            Ok((ch, consumer))
        })
    }

    fn deliver(&self, d: Delivery) -> BoxFuture<'_, bool> {
        Box::pin(async move {
            let Delivery { data, acker, .. } = d;
            tokio::select! {
                biased;
                _ = self.stop.cancelled() => return false,
                sent = self.inbox.send(Bytes::from(data)) => if sent.is_err() { return false },
            }
            // acknowledged once handed on, in groups: when no further delivery is ready
            // (`settle`) or every ACK_EVERY deliveries; the prefetch window bounds the backlog
            let due = {
                let mut held = self.held();
                let n = held.as_ref().map_or(0, |h| h.1) + 1;
                if n >= ACK_EVERY {
                    *held = None;
                    Some(acker)
                } else {
                    *held = Some((acker, n));
                    None
                }
            };
            if let Some(acker) = due {
                self.ack_all(acker).await;
            }
            true
        })
    }

    fn settle(&self) -> BoxFuture<'_, ()> {
        Box::pin(async move {
            let held = self.held().take();
            if let Some((acker, _)) = held {
                self.ack_all(acker).await;
            }
        })
    }

    fn lost(&self) {
        // its channel is gone, and with it every unacknowledged delivery
        self.held().take();
    }
}

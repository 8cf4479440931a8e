//! `broker-echo` over RabbitMQ (AMQP 0-9-1).
//!
//! The classic RPC pattern: the responder consumes a request queue (`<base>.req`, auto-delete);
//! each client has an exclusive, server-named reply queue and publishes its requests to the
//! request queue through the default exchange with `reply_to` set to it; the responder
//! publishes each request's body to its `reply_to` queue. Consumers run without acks and
//! nothing asks for publisher confirms: the bare round trip. lapin resolves a publish once its
//! frames are written, so a batch of publishes is issued together instead of one after the
//! other.

use bytes::Bytes;
use futures_util::future::join_all;
use futures_util::{FutureExt as _, StreamExt as _};
use lapin::options::{BasicConsumeOptions, BasicPublishOptions, QueueDeclareOptions};
use lapin::types::{FieldTable, ShortString};
use lapin::{BasicProperties, Channel, Connection, ConnectionProperties, Consumer};
use tokio_util::sync::CancellationToken;

use super::{Bus, Names, Requester, Shared, body, broker_err};
use crate::BenchError;

/// Deliveries taken from a consumer in one go.
const BATCH: usize = 1024;

/// The responder's connection, channel and consumer.
pub(crate) struct Responder {
    _conn: Connection,
    channel: Channel,
    consumer: Consumer,
}

impl Responder {
    /// Connects, declares the run's request queue and consumes it.
    pub(crate) async fn start(url: &str, names: &Names) -> Result<Self, BenchError> {
        let (conn, channel) = open(url).await?;
        let queue = requests_queue(names);
        channel
            .queue_declare(
                queue.clone(),
                QueueDeclareOptions {
                    auto_delete: true,
                    ..QueueDeclareOptions::default()
                },
                FieldTable::default(),
            )
            .await
            .map_err(|e| broker_err(Bus::Amqp, "queue.declare")(&e))?;
        let consumer = consume(&channel, queue).await?;
        Ok(Self {
            _conn: conn,
            channel,
            consumer,
        })
    }

    /// Sends every request back to its `reply_to` queue until `stop`.
    pub(crate) async fn run(mut self, sh: std::sync::Arc<Shared>, stop: CancellationToken) {
        let mut batch = Vec::with_capacity(BATCH);
        loop {
            batch.clear();
            let first = tokio::select! {
                biased;
                _ = stop.cancelled() => break,
                d = self.consumer.next() => d,
            };
            let Some(first) = first else {
                sh.errors
                    .record("amqp responder: the consumer was cancelled");
                break;
            };
            batch.push(first);
            while batch.len() < BATCH {
                match self.consumer.next().now_or_never() {
                    Some(Some(d)) => batch.push(d),
                    _ => break,
                }
            }
            let mut fatal = false;
            let publishes = batch.iter().filter_map(|d| match d {
                Ok(d) => match d.properties.reply_to() {
                    Some(to) => Some(self.channel.basic_publish(
                        ShortString::from(""),
                        to.clone(),
                        BasicPublishOptions::default(),
                        &d.data,
                        BasicProperties::default(),
                    )),
                    None => {
                        sh.errors
                            .record("amqp responder: a request without reply_to");
                        None
                    }
                },
                Err(e) => {
                    sh.errors.record(format!("amqp responder: consume: {e}"));
                    fatal = true;
                    None
                }
            });
            let results = join_all(publishes).await;
            for r in results {
                if let Err(e) = r {
                    sh.errors.record(format!("amqp responder: publish: {e}"));
                    fatal = true;
                }
            }
            if fatal {
                break;
            }
        }
    }
}

/// A client connection with its exclusive reply queue.
pub(crate) struct AmqpRequester {
    _conn: Connection,
    channel: Channel,
    consumer: Consumer,
    requests: ShortString,
    reply_to: ShortString,
    idx: u32,
    size: usize,
}

impl AmqpRequester {
    /// Connects client `idx`, declares its reply queue and consumes it.
    pub(crate) async fn connect(
        url: &str,
        names: &Names,
        idx: u32,
        size: usize,
    ) -> Result<Self, BenchError> {
        let (conn, channel) = open(url).await?;
        let queue = channel
            .queue_declare(
                ShortString::from(""),
                QueueDeclareOptions {
                    exclusive: true,
                    auto_delete: true,
                    ..QueueDeclareOptions::default()
                },
                FieldTable::default(),
            )
            .await
            .map_err(|e| broker_err(Bus::Amqp, "queue.declare")(&e))?;
        let reply_to = queue.name().clone();
        let consumer = consume(&channel, reply_to.clone()).await?;
        Ok(Self {
            _conn: conn,
            channel,
            consumer,
            requests: requests_queue(names),
            reply_to,
            idx,
            size,
        })
    }
}

impl Requester for AmqpRequester {
    async fn send(&mut self, seqs: &[u32]) -> Result<(), BenchError> {
        let bodies: Vec<Vec<u8>> = seqs
            .iter()
            .map(|&seq| body(self.idx, seq, self.size))
            .collect();
        let publishes = bodies.iter().map(|b| {
            self.channel.basic_publish(
                ShortString::from(""),
                self.requests.clone(),
                BasicPublishOptions::default(),
                b,
                BasicProperties::default().with_reply_to(self.reply_to.clone()),
            )
        });
        for r in join_all(publishes).await {
            r.map_err(|e| broker_err(Bus::Amqp, "publish")(&e))?;
        }
        Ok(())
    }

    async fn recv(&mut self, out: &mut Vec<Bytes>) -> Result<(), BenchError> {
        let first = self.consumer.next().await.ok_or(BenchError::Broker {
            bus: "amqp",
            what: "consume",
            why: "the consumer was cancelled".into(),
        })?;
        let first = first.map_err(|e| broker_err(Bus::Amqp, "consume")(&e))?;
        out.push(Bytes::from(first.data));
        while out.len() < BATCH {
            match self.consumer.next().now_or_never() {
                Some(Some(Ok(d))) => out.push(Bytes::from(d.data)),
                Some(Some(Err(e))) => return Err(broker_err(Bus::Amqp, "consume")(&e)),
                _ => break,
            }
        }
        Ok(())
    }
}

/// The queue requests go to.
fn requests_queue(names: &Names) -> ShortString {
    ShortString::from(format!("{}.req", names.base))
}

/// A connection and one channel on it.
async fn open(url: &str) -> Result<(Connection, Channel), BenchError> {
    let conn = Connection::connect(url, ConnectionProperties::default())
        .await
        .map_err(|e| broker_err(Bus::Amqp, "connect")(&e))?;
    let channel = conn
        .create_channel()
        .await
        .map_err(|e| broker_err(Bus::Amqp, "channel.open")(&e))?;
    Ok((conn, channel))
}

/// Consumes `queue` without acks.
async fn consume(channel: &Channel, queue: ShortString) -> Result<Consumer, BenchError> {
    channel
        .basic_consume(
            queue,
            ShortString::from(""),
            BasicConsumeOptions {
                no_ack: true,
                ..BasicConsumeOptions::default()
            },
            FieldTable::default(),
        )
        .await
        .map_err(|e| broker_err(Bus::Amqp, "basic.consume")(&e))
}

//! `broker-echo` over core NATS.
//!
//! Publish with a reply subject, not `Client::request`: each client subscribes once to its own
//! inbox and publishes every request to the responder's subject with that inbox as the reply
//! subject; the request header correlates the reply. This is what a warren node does (one inbox
//! subscription per node, correlation in the frame) and it costs the client library no
//! per-request subscription token, oneshot or inbox string, so it is the faster of the two bare
//! round trips. The responder is one subscription on its own connection that publishes each
//! request's payload to its reply subject.

use bytes::Bytes;
use futures_util::{FutureExt as _, StreamExt as _};
use tokio_util::sync::CancellationToken;

use super::{Bus, Names, Requester, Shared, body, broker_err};
use crate::BenchError;

/// Replies taken from the subscription in one go before recording them.
const BATCH: usize = 1024;

/// The responder's connection and subscription.
pub(crate) struct Responder {
    client: async_nats::Client,
    sub: async_nats::Subscriber,
}

impl Responder {
    /// Connects and subscribes to the run's request subject (confirmed by a flush, so no
    /// request can arrive before the subscription).
    pub(crate) async fn start(url: &str, names: &Names) -> Result<Self, BenchError> {
        let client = connect(url).await?;
        let sub = client
            .subscribe(subject(names))
            .await
            .map_err(|e| broker_err(Bus::Nats, "subscribe")(&e))?;
        client
            .flush()
            .await
            .map_err(|e| broker_err(Bus::Nats, "flush")(&e))?;
        Ok(Self { client, sub })
    }

    /// Sends every request back to its reply subject until `stop`.
    pub(crate) async fn run(mut self, sh: std::sync::Arc<Shared>, stop: CancellationToken) {
        loop {
            let msg = tokio::select! {
                biased;
                _ = stop.cancelled() => break,
                m = self.sub.next() => m,
            };
            let Some(msg) = msg else {
                sh.errors.record("nats responder: subscription closed");
                break;
            };
            let Some(reply) = msg.reply else {
                sh.errors
                    .record("nats responder: a request without a reply subject");
                continue;
            };
            if let Err(e) = self.client.publish(reply, msg.payload).await {
                sh.errors.record(format!("nats responder: publish: {e}"));
                break;
            }
        }
    }
}

/// A client connection with its inbox subscription.
pub(crate) struct NatsRequester {
    client: async_nats::Client,
    subject: async_nats::Subject,
    inbox: async_nats::Subject,
    sub: async_nats::Subscriber,
    idx: u32,
    size: usize,
}

impl NatsRequester {
    /// Connects client `idx` and subscribes to its inbox.
    pub(crate) async fn connect(
        url: &str,
        names: &Names,
        idx: u32,
        size: usize,
    ) -> Result<Self, BenchError> {
        let client = connect(url).await?;
        let inbox = client.new_inbox();
        let sub = client
            .subscribe(inbox.clone())
            .await
            .map_err(|e| broker_err(Bus::Nats, "subscribe")(&e))?;
        client
            .flush()
            .await
            .map_err(|e| broker_err(Bus::Nats, "flush")(&e))?;
        Ok(Self {
            client,
            subject: subject(names).into(),
            inbox: inbox.into(),
            sub,
            idx,
            size,
        })
    }
}

impl Requester for NatsRequester {
    async fn send(&mut self, seqs: &[u32]) -> Result<(), BenchError> {
        for &seq in seqs {
            self.client
                .publish_with_reply(
                    self.subject.clone(),
                    self.inbox.clone(),
                    Bytes::from(body(self.idx, seq, self.size)),
                )
                .await
                .map_err(|e| broker_err(Bus::Nats, "publish")(&e))?;
        }
        Ok(())
    }

    async fn recv(&mut self, out: &mut Vec<Bytes>) -> Result<(), BenchError> {
        let first = self.sub.next().await.ok_or(BenchError::Broker {
            bus: "nats",
            what: "receive",
            why: "the inbox subscription closed".into(),
        })?;
        out.push(first.payload);
        while out.len() < BATCH {
            match self.sub.next().now_or_never() {
                Some(Some(m)) => out.push(m.payload),
                _ => break,
            }
        }
        Ok(())
    }
}

/// The subject requests go to.
fn subject(names: &Names) -> String {
    format!("{}.echo", names.base)
}

async fn connect(url: &str) -> Result<async_nats::Client, BenchError> {
    async_nats::connect(url)
        .await
        .map_err(|e| broker_err(Bus::Nats, "connect")(&e))
}

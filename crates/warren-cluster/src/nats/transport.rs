//! [`NatsTransport`]: warren's remote bus over core NATS. Each node's inbox is the subject
//! `<prefix>.node.<node id>`; a frame is one published message. Core NATS keeps the order of the
//! messages one connection publishes to one subject, which is the order the remote bus promises.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures_util::StreamExt;
use futures_util::future::BoxFuture;
use tokio_util::sync::CancellationToken;
use warren::error::Detail;
use warren::remote::{InboxFrames, Transport, TransportError};

use super::{connect_client, is_connected};

/// How long `serve` waits for the server to confirm a subscription.
const SUBSCRIBE_TIMEOUT: Duration = Duration::from_secs(5);

/// The remote bus over NATS: publishes frames to a node's inbox subject and feeds this node the
/// messages of its own.
///
/// Frames are never buffered across an outage: [`Transport::send`] fails with
/// [`TransportError::Unavailable`] while the client reconnects, so callers get a typed error at
/// once instead of a call that runs when the server is back. The client resubscribes the inbox by
/// itself after a reconnect; frames published to it while this node was disconnected are lost
/// (core NATS keeps nothing), and their callers end at their deadline.
#[derive(Debug)]
pub struct NatsTransport {
    client: async_nats::Client,
    prefix: String,
}

impl NatsTransport {
    /// Connect to the NATS server at `url` (`nats://host:port`); subjects start with `prefix`.
    /// Fails at once if the server cannot be reached: a node that starts without its bus should
    /// say so rather than wait. After that first connection the client reconnects forever.
    pub async fn connect(url: &str, prefix: &str) -> Result<Arc<NatsTransport>, TransportError> {
        let (client, _) = connect_client(url, "bus")
            .await
            .map_err(TransportError::Unavailable)?;
        tracing::info!(
            url,
            prefix,
            max_payload = client.max_payload(),
            "NATS bus connected"
        );
        Ok(Arc::new(NatsTransport {
            client,
            prefix: subject_prefix(prefix),
        }))
    }

    /// The underlying client, for what the inbox-per-node model does not cover (raw round trips
    /// in benchmarks). Shares this transport's connection.
    pub fn client(&self) -> &async_nats::Client {
        &self.client
    }

    /// The inbox subject of node `node`: `<prefix>.node.<token>`, where the token is the node id
    /// with the characters NATS reserves in a subject token (`.`, `*`, `>`, whitespace) replaced
    /// by `_`. Two node ids that differ only in those characters share an inbox: keep ids plain.
    pub fn inbox_subject(&self, node: &str) -> String {
        let mut s = String::with_capacity(self.prefix.len() + 6 + node.len());
        s.push_str(&self.prefix);
        s.push_str(".node.");
        push_token(&mut s, node);
        s
    }
}

impl NatsTransport {
    /// The subject of module type `module`'s queue group, `<prefix>.group.<token>`; the queue
    /// group's name is the subject too.
    pub fn group_subject(&self, module: &str) -> String {
        let mut s = String::with_capacity(self.prefix.len() + 7 + module.len());
        s.push_str(&self.prefix);
        s.push_str(".group.");
        push_token(&mut s, module);
        s
    }

    /// Subscribe `subject` (in queue group `queue` when given) and wait until the server has it.
    async fn subscribe_confirmed(
        &self,
        subject: String,
        queue: Option<String>,
        stop: CancellationToken,
    ) -> Result<InboxFrames, TransportError> {
        if !is_connected(&self.client) {
            return Err(TransportError::Unavailable(
                "not connected to NATS (reconnecting)".into(),
            ));
        }
        let sub = match queue {
            None => self.client.subscribe(subject.clone()).await,
            Some(q) => self.client.queue_subscribe(subject.clone(), q).await,
        }
        .map_err(|e| TransportError::broker(format!("subscribe {subject}"), e))?;
        // The server handles one connection's operations in order: once a message published on
        // a probe subject comes back, the SUB before it is in place too. (A flush only empties
        // the client's write buffer; frames another connection sends meanwhile would be lost.)
        let confirmed = async {
            let probe = self.client.new_inbox();
            let mut echo = self.client.subscribe(probe.clone()).await?;
            self.client.publish(probe, Bytes::new()).await?;
            self.client.flush().await?;
            echo.next()
                .await
                .map(|_| ())
                .ok_or_else(|| async_nats::Error::from("probe subscription closed"))
        };
        match tokio::time::timeout(SUBSCRIBE_TIMEOUT, confirmed).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                return Err(TransportError::unavailable(
                    format!("subscribe {subject}"),
                    e,
                ));
            }
            Err(_) => {
                return Err(TransportError::Unavailable(
                    format!(
                        "subscribe {subject}: no confirmation from the server within {SUBSCRIBE_TIMEOUT:?}"
                    )
                    .into(),
                ));
            }
        }
        tracing::debug!(%subject, "serving a NATS subscription");
        Ok(Box::pin(
            sub.map(|m| m.payload).take_until(stop.cancelled_owned()),
        ))
    }
}

/// `node` as one subject token (see [`NatsTransport::inbox_subject`]).
fn push_token(out: &mut String, node: &str) {
    if node.is_empty() {
        out.push('_');
        return;
    }
    out.extend(node.chars().map(|c| {
        if c == '.' || c == '*' || c == '>' || c.is_whitespace() {
            '_'
        } else {
            c
        }
    }));
}

/// The configured prefix as a valid subject prefix: tokens may not be empty or hold wildcards or
/// whitespace; dots between tokens are kept (`acme.prod` is two tokens).
fn subject_prefix(prefix: &str) -> String {
    let tokens: Vec<String> = prefix
        .split('.')
        .filter(|t| !t.is_empty())
        .map(|t| {
            let mut s = String::with_capacity(t.len());
            push_token(&mut s, t);
            s
        })
        .collect();
    if tokens.is_empty() {
        "warren".to_owned()
    } else {
        tokens.join(".")
    }
}

impl NatsTransport {
    async fn publish(
        &self,
        subject: &async_nats::Subject,
        frame: Bytes,
    ) -> Result<(), TransportError> {
        let (size, max) = (frame.len(), self.max_frame());
        if size > max {
            return Err(TransportError::TooLarge { size, max });
        }
        self.client
            .publish(subject.clone(), frame)
            .await
            .map_err(|e| match e.kind() {
                async_nats::client::PublishErrorKind::MaxPayloadExceeded => {
                    TransportError::TooLarge { size, max }
                }
                _ => TransportError::Broker(Detail::from_error(e)),
            })
    }

    /// Publish `frames` to `subject` back to back, so the client's connection task writes them to
    /// the socket together.
    async fn publish_all(
        &self,
        subject: async_nats::Subject,
        frames: Vec<Bytes>,
    ) -> Result<(), TransportError> {
        self.connected()?;
        for f in frames {
            self.publish(&subject, f).await?;
        }
        Ok(())
    }

    fn connected(&self) -> Result<(), TransportError> {
        if is_connected(&self.client) {
            Ok(())
        } else {
            Err(TransportError::Unavailable(
                "not connected to NATS (reconnecting)".into(),
            ))
        }
    }
}

impl Transport for NatsTransport {
    fn send(&self, node: &str, frame: Bytes) -> BoxFuture<'_, Result<(), TransportError>> {
        let subject = async_nats::Subject::from(self.inbox_subject(node));
        Box::pin(async move {
            self.connected()?;
            self.publish(&subject, frame).await
        })
    }

    fn send_batch(
        &self,
        node: &str,
        frames: Vec<Bytes>,
    ) -> BoxFuture<'_, Result<(), TransportError>> {
        let subject = async_nats::Subject::from(self.inbox_subject(node));
        Box::pin(self.publish_all(subject, frames))
    }

    /// The subscription itself is the inbox: the bus reads the client's deliveries directly.
    /// Dropping it unsubscribes.
    fn serve(
        &self,
        node: &str,
        stop: CancellationToken,
    ) -> BoxFuture<'_, Result<InboxFrames, TransportError>> {
        let subject = self.inbox_subject(node);
        Box::pin(self.subscribe_confirmed(subject, None, stop))
    }

    fn has_groups(&self) -> bool {
        true
    }

    /// Publishes to the group's subject; the server gives each message to one member of the
    /// queue group subscribed to it.
    fn send_to_group(
        &self,
        group: &str,
        frames: Vec<Bytes>,
    ) -> BoxFuture<'_, Result<(), TransportError>> {
        let subject = async_nats::Subject::from(self.group_subject(group));
        Box::pin(self.publish_all(subject, frames))
    }

    fn serve_group(
        &self,
        group: &str,
        stop: CancellationToken,
    ) -> BoxFuture<'_, Result<InboxFrames, TransportError>> {
        let subject = self.group_subject(group);
        Box::pin(self.subscribe_confirmed(subject.clone(), Some(subject), stop))
    }

    fn max_frame(&self) -> usize {
        self.client.max_payload()
    }

    fn kind(&self) -> &'static str {
        "nats"
    }

    fn is_connected(&self) -> bool {
        super::is_connected(&self.client)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn node_ids_become_single_tokens() {
        let mut s = String::new();
        push_token(&mut s, "a.b*c>d e\tf");
        assert_eq!(s, "a_b_c_d_e_f");
        let mut s = String::new();
        push_token(&mut s, "");
        assert_eq!(s, "_");
        assert_eq!(subject_prefix("warren"), "warren");
        assert_eq!(subject_prefix(".acme..prod."), "acme.prod");
        assert_eq!(subject_prefix("a*>"), "a__");
        assert_eq!(subject_prefix(""), "warren");
    }
}

//! [`RedisTransport`]: warren's own bus over Redis. Each node's inbox is the list
//! `<prefix>:node:<id>`: senders `RPUSH` frames to it, the node `BLPOP`s it on a connection of its
//! own. One list per receiver and one connection per sender keep frames in the order sent.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use bytes::Bytes;
use futures_util::future::BoxFuture;
use redis::Client;
use redis::aio::{ConnectionManager, MultiplexedConnection};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use warren::remote::{InboxFrames, Transport, TransportError, inbox_channel};

use super::{BLOCK_S, Backoff, COMMAND_TIMEOUT, blocking_connection, bounded, client, manager};

/// Frames received but not yet taken by the bus; a full queue pauses the receiving loop.
const INBOX_QUEUE: usize = 1024;

/// Largest frame sent: 64 MiB. Redis itself takes strings up to 512 MiB (`proto-max-bulk-len`),
/// but a frame that size would hold the receiver's single `BLPOP` connection and the server's
/// memory for seconds; calls that large belong in a store, with a key in the call.
const MAX_FRAME: usize = 64 * 1024 * 1024;

/// Lifetime of an inbox list after the last push to it, in milliseconds (refreshed by every
/// push). A live node drains its inbox at once, so the expiry only matters for the inbox of a node
/// that died: its queued frames (calls already past their deadline, which the bus would drop on
/// arrival anyway) vanish a minute after the last sender gave up, instead of growing forever.
/// A minute is far longer than any call deadline and than the registry's 8 s liveness window,
/// after which no sender picks the dead node any more.
const INBOX_TTL_MS: i64 = 60_000;

/// The Redis bus: one list per node inbox, `RPUSH` to send, `BLPOP` to receive.
///
/// Sends share one `ConnectionManager` (reconnects by itself) and fail with
/// [`TransportError::Unavailable`] after at most one second while Redis is down; each served inbox
/// runs its own blocking connection and reconnects with backoff after a restart.
/// [`Transport::is_connected`] says whether the last exchange with Redis (a served inbox's
/// `BLPOP`, which returns at least every second, or a send) succeeded.
pub struct RedisTransport {
    client: Client,
    conn: ConnectionManager,
    prefix: String,
    /// Redis answered the last exchange; kept by the pop loops and the sends.
    up: Arc<AtomicBool>,
}

impl std::fmt::Debug for RedisTransport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisTransport")
            .field("prefix", &self.prefix)
            .finish_non_exhaustive()
    }
}

impl RedisTransport {
    /// Connect to `url` (`redis://host:port[/db]`); inbox lists are named `<prefix>:node:<id>`.
    /// Fails if Redis cannot be reached within a few seconds.
    pub async fn connect(url: &str, prefix: &str) -> Result<Arc<RedisTransport>, TransportError> {
        let client = client(url, None).map_err(TransportError::Broker)?;
        let conn = manager(&client)
            .await
            .map_err(TransportError::Unavailable)?;
        Ok(Arc::new(RedisTransport {
            client,
            conn,
            prefix: prefix.to_owned(),
            up: Arc::new(AtomicBool::new(true)),
        }))
    }

    /// The list holding node `node`'s inbox.
    pub fn inbox(&self, node: &str) -> String {
        format!("{}:node:{node}", self.prefix)
    }

    /// `RPUSH` all `frames` to the inbox in one command (one round trip, and the receiver's
    /// `BLPOP` + `LPOP n` takes them together), then refresh the list's expiry.
    async fn push(&self, node: &str, frames: &[Bytes]) -> Result<(), TransportError> {
        if let Some(f) = frames.iter().find(|f| f.len() > MAX_FRAME) {
            return Err(TransportError::TooLarge {
                size: f.len(),
                max: MAX_FRAME,
            });
        }
        let key = self.inbox(node);
        let mut pipe = redis::pipe();
        let push = pipe.cmd("RPUSH").arg(&key);
        for f in frames {
            push.arg(&f[..]);
        }
        push.ignore()
            .cmd("PEXPIRE")
            .arg(&key)
            .arg(INBOX_TTL_MS)
            .ignore();
        let mut conn = self.conn.clone();
        match bounded(COMMAND_TIMEOUT, pipe.exec_async(&mut conn)).await {
            Ok(()) => {
                mark(&self.up, true);
                Ok(())
            }
            Err(why) => {
                mark(&self.up, false);
                metrics::counter!("warren_redis_send_errors_total").increment(1);
                Err(TransportError::Unavailable(why))
            }
        }
    }

    async fn start_serving(
        &self,
        node: &str,
        inbox: mpsc::Sender<Bytes>,
        stop: CancellationToken,
    ) -> Result<(), TransportError> {
        let key = self.inbox(node);
        // confirm that the inbox can be read before the node says it is up
        let conn = blocking_connection(&self.client)
            .await
            .map_err(TransportError::Unavailable)?;
        mark(&self.up, true);
        let client = self.client.clone();
        tokio::spawn(pop_loop(client, conn, key, inbox, self.up.clone(), stop));
        Ok(())
    }
}

/// Record whether Redis answered; the flag is written only when it changes, so a busy sender
/// does not keep its cache line moving between cores.
fn mark(up: &AtomicBool, answered: bool) {
    if up.load(Ordering::Relaxed) != answered {
        up.store(answered, Ordering::Relaxed);
    }
}

/// Bytes of frames pushed in one `RPUSH` at most (a frame larger than this goes alone).
const PUSH_BYTES: usize = 1024 * 1024;

/// Frames taken from the inbox per round trip after a `BLPOP` returned one.
const DRAIN_BATCH: usize = 256;

/// `BLPOP` the inbox until `stop`, feeding `inbox` in order; reconnect with backoff after errors.
/// A pop is never cancelled half-way (that could lose a frame the server already removed): it
/// returns within [`BLOCK_S`] and the loop checks `stop` between pops. Each pop's outcome goes
/// to `up`, so a dead Redis shows within a pop or a reconnect attempt.
async fn pop_loop(
    client: Client,
    conn: MultiplexedConnection,
    key: String,
    inbox: mpsc::Sender<Bytes>,
    up: Arc<AtomicBool>,
    stop: CancellationToken,
) {
    let mut conn = Some(conn);
    let mut backoff = Backoff::new(Duration::from_secs(5));
    let mut down_since: Option<tokio::time::Instant> = None;
    while !stop.is_cancelled() {
        if conn.is_none() {
            match blocking_connection(&client).await {
                Ok(c) => {
                    mark(&up, true);
                    if let Some(t) = down_since.take() {
                        tracing::info!(inbox = %key, down_ms = t.elapsed().as_millis() as u64, "redis inbox reconnected");
                    }
                    backoff.reset();
                    conn = Some(c);
                }
                Err(why) => {
                    mark(&up, false);
                    let delay = backoff.step();
                    tracing::debug!(inbox = %key, %why, ?delay, "redis inbox reconnect failed");
                    tokio::select! {
                        _ = stop.cancelled() => break,
                        _ = tokio::time::sleep(delay) => continue,
                    }
                }
            }
        }
        let Some(c) = conn.as_mut() else { continue };
        let mut cmd = redis::cmd("BLPOP");
        cmd.arg(&key).arg(BLOCK_S);
        // a dead peer that never answers (no reset) must not hold the loop forever
        let pop = bounded(
            Duration::from_secs_f64(BLOCK_S) + Duration::from_secs(5),
            cmd.query_async::<Option<(Vec<u8>, Vec<u8>)>>(c),
        )
        .await;
        mark(&up, pop.is_ok());
        match pop {
            Ok(None) => {}
            Ok(Some((_, frame))) => {
                tokio::select! {
                    _ = stop.cancelled() => break,
                    r = inbox.send(Bytes::from(frame)) => if r.is_err() { break },
                }
                // under load more frames wait behind it: take them in one round trip
                // (`LPOP key count`, Redis 6.2+) instead of one BLPOP each
                let mut more = redis::cmd("LPOP");
                more.arg(&key).arg(DRAIN_BATCH);
                match bounded(
                    Duration::from_secs(5),
                    more.query_async::<Option<Vec<Vec<u8>>>>(c),
                )
                .await
                {
                    Ok(frames) => {
                        for f in frames.unwrap_or_default() {
                            tokio::select! {
                                _ = stop.cancelled() => break,
                                r = inbox.send(Bytes::from(f)) => if r.is_err() { break },
                            }
                        }
                    }
                    Err(why) => {
                        mark(&up, false);
                        tracing::warn!(inbox = %key, %why, "redis inbox read failed; reconnecting");
                        down_since.get_or_insert_with(tokio::time::Instant::now);
                        conn = None;
                    }
                }
            }
            Err(why) => {
                if down_since.is_none() {
                    tracing::warn!(inbox = %key, %why, "redis inbox read failed; reconnecting");
                    down_since = Some(tokio::time::Instant::now());
                }
                conn = None;
            }
        }
    }
    tracing::debug!(inbox = %key, "redis inbox no longer served");
}

impl Transport for RedisTransport {
    fn send(&self, node: &str, frame: Bytes) -> BoxFuture<'_, Result<(), TransportError>> {
        let node = node.to_owned();
        Box::pin(async move { self.push(&node, &[frame]).await })
    }

    fn send_batch(
        &self,
        node: &str,
        frames: Vec<Bytes>,
    ) -> BoxFuture<'_, Result<(), TransportError>> {
        let node = node.to_owned();
        Box::pin(async move {
            // large batches go in slices, so one command stays far below Redis's limits
            let mut rest = &frames[..];
            while !rest.is_empty() {
                let mut n = 0;
                let mut bytes = 0;
                while n < rest.len() && (n == 0 || bytes + rest[n].len() <= PUSH_BYTES) {
                    bytes += rest[n].len();
                    n += 1;
                }
                self.push(&node, &rest[..n]).await?;
                rest = &rest[n..];
            }
            Ok(())
        })
    }

    fn serve(
        &self,
        node: &str,
        stop: CancellationToken,
    ) -> BoxFuture<'_, Result<InboxFrames, TransportError>> {
        let node = node.to_owned();
        Box::pin(async move {
            let (inbox, frames) = inbox_channel(INBOX_QUEUE);
            self.start_serving(&node, inbox, stop).await?;
            Ok(frames)
        })
    }

    fn max_frame(&self) -> usize {
        MAX_FRAME
    }

    fn kind(&self) -> &'static str {
        "redis"
    }

    fn is_connected(&self) -> bool {
        self.up.load(Ordering::Relaxed)
    }
}

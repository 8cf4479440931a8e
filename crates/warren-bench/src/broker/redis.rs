//! `broker-echo` over Redis lists.
//!
//! Requests go to one list (`<base>:req`) with RPUSH; the responder pops them and RPUSHes each
//! one to the reply list of the client in its header (`<base>:reply:<n>`), which the client
//! pops. Every pop is a pipeline of `BLPOP key 0` and `LPOP key COUNT` on a connection of its
//! own (a blocked BLPOP holds its connection, and redis-rs would time its response out after
//! 500 ms on a connection with the default settings): one round trip waits for the first item
//! and takes what else is queued. Each client pushes its whole batch of requests in one RPUSH,
//! and the responder answers a batch with one RPUSH per client in one pipeline. Fewer round
//! trips than one command per message, so this is the broker's best case.

use bytes::Bytes;
use redis::AsyncConnectionConfig;
use redis::aio::MultiplexedConnection;
use tokio_util::sync::CancellationToken;

use super::{Bus, Names, Requester, Shared, body, broker_err, header};
use crate::BenchError;

/// Items one pop takes at most (one by BLPOP, the rest by LPOP).
const BATCH: usize = 1024;

/// The responder's connection and the reply list of every client.
pub(crate) struct Responder {
    url: String,
    conn: MultiplexedConnection,
    requests: String,
    replies: Vec<String>,
}

impl Responder {
    /// Connects; replies go to the lists of clients `0..clients`.
    pub(crate) async fn start(url: &str, names: &Names, clients: u32) -> Result<Self, BenchError> {
        let conn = connect(url).await?;
        Ok(Self {
            url: url.to_owned(),
            conn,
            requests: requests_key(names),
            replies: (0..clients).map(|i| reply_key(names, i)).collect(),
        })
    }

    /// Answers requests until `stop`, then deletes the run's lists.
    pub(crate) async fn run(mut self, sh: std::sync::Arc<Shared>, stop: CancellationToken) {
        let mut groups: Vec<Vec<Vec<u8>>> = vec![Vec::new(); self.replies.len()];
        loop {
            let popped = tokio::select! {
                biased;
                _ = stop.cancelled() => break,
                p = pop(&mut self.conn, &self.requests) => p,
            };
            let items = match popped {
                Ok(items) => items,
                Err(e) => {
                    sh.errors.record(format!("redis responder: {e}"));
                    break;
                }
            };
            for item in items {
                match header(&item).and_then(|(client, _)| groups.get_mut(client as usize)) {
                    Some(g) => g.push(item),
                    None => sh
                        .errors
                        .record("redis responder: a request with an unknown client"),
                }
            }
            let mut pipe = redis::pipe();
            for (key, group) in self.replies.iter().zip(groups.iter_mut()) {
                if group.is_empty() {
                    continue;
                }
                let cmd = pipe.cmd("RPUSH").arg(key);
                for item in group.drain(..) {
                    cmd.arg(item);
                }
                cmd.ignore();
            }
            if let Err(e) = pipe.query_async::<()>(&mut self.conn).await {
                sh.errors.record(format!("redis responder: RPUSH: {e}"));
                break;
            }
        }
        // A BLPOP may still block the responder's connection: clean up on another.
        drop(self.conn);
        let mut keys = self.replies;
        keys.push(self.requests);
        if let Ok(Ok(mut conn)) =
            tokio::time::timeout(std::time::Duration::from_secs(2), connect(&self.url)).await
        {
            let _ = redis::cmd("DEL")
                .arg(&keys)
                .query_async::<()>(&mut conn)
                .await;
        }
    }
}

/// A client: one connection to push requests, one to pop its reply list.
pub(crate) struct RedisRequester {
    push: MultiplexedConnection,
    pop: MultiplexedConnection,
    requests: String,
    replies: String,
    idx: u32,
    size: usize,
}

impl RedisRequester {
    /// Connects client `idx` (both connections).
    pub(crate) async fn connect(
        url: &str,
        names: &Names,
        idx: u32,
        size: usize,
    ) -> Result<Self, BenchError> {
        Ok(Self {
            push: connect(url).await?,
            pop: connect(url).await?,
            requests: requests_key(names),
            replies: reply_key(names, idx),
            idx,
            size,
        })
    }
}

impl Requester for RedisRequester {
    async fn send(&mut self, seqs: &[u32]) -> Result<(), BenchError> {
        let mut cmd = redis::cmd("RPUSH");
        cmd.arg(&self.requests);
        for &seq in seqs {
            cmd.arg(body(self.idx, seq, self.size));
        }
        cmd.query_async::<()>(&mut self.push)
            .await
            .map_err(|e| broker_err(Bus::Redis, "RPUSH")(&e))
    }

    async fn recv(&mut self, out: &mut Vec<Bytes>) -> Result<(), BenchError> {
        let items = pop(&mut self.pop, &self.replies)
            .await
            .map_err(|e| broker_err(Bus::Redis, "BLPOP")(&e))?;
        out.extend(items.into_iter().map(Bytes::from));
        Ok(())
    }
}

/// Waits for the first item of `key` and takes up to [`BATCH`] in all, in one round trip.
async fn pop(conn: &mut MultiplexedConnection, key: &str) -> redis::RedisResult<Vec<Vec<u8>>> {
    let mut pipe = redis::pipe();
    pipe.cmd("BLPOP").arg(key).arg(0);
    pipe.cmd("LPOP").arg(key).arg(BATCH - 1);
    type Popped = (Option<(Vec<u8>, Vec<u8>)>, Option<Vec<Vec<u8>>>);
    let (first, rest): Popped = pipe.query_async(conn).await?;
    let mut items = Vec::with_capacity(1 + rest.as_ref().map_or(0, Vec::len));
    items.extend(first.map(|(_, v)| v));
    items.extend(rest.into_iter().flatten());
    Ok(items)
}

/// The list requests go to.
fn requests_key(names: &Names) -> String {
    format!("{}:req", names.base)
}

/// The reply list of client `idx`.
fn reply_key(names: &Names, idx: u32) -> String {
    format!("{}:reply:{idx}", names.base)
}

/// A multiplexed connection whose responses never time out (BLPOP waits as long as it takes).
async fn connect(url: &str) -> Result<MultiplexedConnection, BenchError> {
    let client = redis::Client::open(url).map_err(|e| broker_err(Bus::Redis, "connect")(&e))?;
    client
        .get_multiplexed_async_connection_with_config(
            &AsyncConnectionConfig::new().set_response_timeout(None),
        )
        .await
        .map_err(|e| broker_err(Bus::Redis, "connect")(&e))
}

//! Redis for warren: a bus ([`RedisTransport`], one list per node), a registry in the gobase layouts
//! that Go services share ([`GobaseRegistry`], docs/cluster.md "Registries"), and the TianQinS RPC
//! bridge ([`RedisRpc`], docs/cluster.md "Compatibility bridges") so Go and Python peers call
//! warren modules and are called by them.
//!
//! Connection rules common to the three, kept here once:
//! - commands go through a redis-rs `ConnectionManager` (it reconnects by itself) and every
//!   command is bounded by a short deadline, so a call made while Redis is down fails with a typed
//!   error instead of waiting for the manager's reconnect attempts;
//! - blocking reads (`BLPOP`) and subscriptions get connections of their own, with the response
//!   timeout disabled (a blocked `BLPOP` holds its connection), and reconnect with [`Backoff`].

mod layout;
mod registry;
mod retained;
mod rpc;
mod transport;

pub use layout::{GobaseKeys, GobaseLayout};
pub use registry::{GobaseMember, GobaseRegistry, local_ip};
pub use retained::RedisRetained;
pub use rpc::{RedisRpc, RedisRpcError};
pub use transport::RedisTransport;

use std::future::Future;
use std::time::Duration;

use redis::aio::{ConnectionManager, ConnectionManagerConfig, MultiplexedConnection};
use redis::{AsyncConnectionConfig, Client, IntoConnectionInfo, RedisError};
use warren::error::Detail;

/// Deadline of one command (a push, a publish, a script): past it the broker counts as down.
const COMMAND_TIMEOUT: Duration = Duration::from_secs(1);

/// Deadline of the first connection made by a `connect`/`start`.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);

/// Seconds a blocking pop waits before it returns empty, so loops see their stop token.
const BLOCK_S: f64 = 1.0;

/// Open a client for `url`, on database `db` when given (it wins over the URL's path).
fn client(url: &str, db: Option<i64>) -> Result<Client, Detail> {
    let info = url
        .into_connection_info()
        .map_err(|e| Detail::caused(format!("invalid redis URL {url:?}"), e))?;
    let info = match db {
        Some(db) => {
            let settings = info.redis_settings().clone().set_db(db);
            info.set_redis_settings(settings)
        }
        None => info,
    };
    Client::open(info).map_err(|e| Detail::caused(format!("invalid redis URL {url:?}"), e))
}

/// A command connection that reconnects by itself. Its own retries are few and short: callers
/// bound each command with [`COMMAND_TIMEOUT`] anyway, and a later command starts a new attempt.
async fn manager(client: &Client) -> Result<ConnectionManager, Detail> {
    let cfg = ConnectionManagerConfig::new()
        .set_connection_timeout(Some(Duration::from_secs(1)))
        .set_response_timeout(Some(Duration::from_secs(2)))
        .set_number_of_retries(2)
        .set_min_delay(Duration::from_millis(50))
        .set_max_delay(Duration::from_millis(500));
    bounded(
        CONNECT_TIMEOUT,
        ConnectionManager::new_with_config(client.clone(), cfg),
    )
    .await
}

/// A connection for blocking commands only: no response timeout (a `BLPOP` is an answer that
/// takes its time), a bounded connect.
async fn blocking_connection(client: &Client) -> Result<MultiplexedConnection, Detail> {
    let cfg = AsyncConnectionConfig::new()
        .set_connection_timeout(Some(Duration::from_secs(1)))
        .set_response_timeout(None);
    bounded(
        CONNECT_TIMEOUT,
        client.get_multiplexed_async_connection_with_config(&cfg),
    )
    .await
}

/// Run a Redis future with a deadline: a failure keeps the `RedisError` as its source, a missed
/// deadline says so.
async fn bounded<T>(
    within: Duration,
    fut: impl Future<Output = Result<T, RedisError>>,
) -> Result<T, Detail> {
    match tokio::time::timeout(within, fut).await {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(e)) => Err(Detail::from_error(e)),
        Err(_) => Err(Detail::new(format!(
            "no answer from redis within {within:?}"
        ))),
    }
}

/// Exponential reconnect delay: 100 ms doubling to a cap, reset after a success.
#[derive(Debug)]
struct Backoff {
    next: Duration,
    max: Duration,
}

impl Backoff {
    const FIRST: Duration = Duration::from_millis(100);

    fn new(max: Duration) -> Backoff {
        Backoff {
            next: Self::FIRST,
            max,
        }
    }

    /// The delay to wait now; the following one doubles.
    fn step(&mut self) -> Duration {
        let d = self.next;
        self.next = (self.next * 2).min(self.max);
        d
    }

    fn reset(&mut self) {
        self.next = Self::FIRST;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_to_its_cap_and_resets() {
        let mut b = Backoff::new(Duration::from_millis(500));
        let steps: Vec<u128> = (0..5).map(|_| b.step().as_millis()).collect();
        assert_eq!(steps, [100, 200, 400, 500, 500]);
        b.reset();
        assert_eq!(b.step(), Duration::from_millis(100));
    }

    #[test]
    fn db_setting_wins_over_the_url() {
        let c = client("redis://127.0.0.1:1/3", Some(1)).expect("client");
        assert_eq!(c.get_connection_info().redis_settings().db(), 1);
        let c = client("redis://127.0.0.1:1/3", None).expect("client");
        assert_eq!(c.get_connection_info().redis_settings().db(), 3);
        assert!(client("http://x", None).is_err());
    }
}

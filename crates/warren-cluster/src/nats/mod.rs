//! NATS: the bus ([`NatsTransport`], one subject per node inbox) and the registry
//! ([`KvRegistry`], a JetStream key-value bucket with one record per node).
//!
//! Both hold an `async_nats::Client`, which owns its socket in a task of its own, reconnects
//! forever with backoff and resubscribes every live subscription after a reconnect. What this
//! module adds is policy: the first connect fails with a clear error when the server is down (no
//! `retry_on_initial_connect`), and while the connection is down nothing is queued for later —
//! sends fail fast and the registry keeps its last known list.

mod kv;
mod retained;
mod transport;

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

pub use kv::KvRegistry;
pub use retained::NatsRetained;
pub use transport::NatsTransport;

use warren::error::Detail;

/// Longest pause between two reconnect attempts.
const MAX_RECONNECT_DELAY: Duration = Duration::from_secs(2);

/// How long one connect attempt (TCP, INFO, CONNECT, PONG) may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);

/// Connect a client for `role` (`bus` or `registry`, for logs): no retry on the first attempt,
/// reconnects forever with a backoff capped at [`MAX_RECONNECT_DELAY`]. Each disconnection is
/// counted in the returned counter, so a user of the client can tell that the server may have
/// lost state even when the reconnect was too quick to be seen in `connection_state()`. A failure
/// keeps the client's `ConnectError` as its source.
async fn connect_client(
    url: &str,
    role: &'static str,
) -> Result<(async_nats::Client, Arc<AtomicU64>), Detail> {
    let disconnects = Arc::new(AtomicU64::new(0));
    let counter = disconnects.clone();
    let server = url.to_owned();
    let client = async_nats::ConnectOptions::new()
        .name(format!("warren-{role}"))
        .connection_timeout(CONNECT_TIMEOUT)
        .max_reconnects(None)
        .reconnect_delay_callback(reconnect_delay)
        .event_callback(move |event| {
            let counter = counter.clone();
            let server = server.clone();
            async move {
                match event {
                    async_nats::Event::Disconnected => {
                        counter.fetch_add(1, Ordering::Relaxed);
                        metrics::counter!("warren_nats_disconnects_total", "role" => role)
                            .increment(1);
                        tracing::warn!(role, %server, "lost the NATS connection; reconnecting");
                    }
                    async_nats::Event::Connected => {
                        tracing::info!(role, %server, "connected to NATS");
                    }
                    async_nats::Event::SlowConsumer(sid) => {
                        metrics::counter!("warren_nats_slow_consumer_total", "role" => role)
                            .increment(1);
                        tracing::warn!(role, sid, "NATS dropped messages for a slow subscriber");
                    }
                    async_nats::Event::ServerError(e) => {
                        tracing::warn!(role, %server, error = %e, "NATS server error");
                    }
                    // one per failed reconnect attempt: the disconnect was logged already
                    other => tracing::debug!(role, %server, event = %other, "NATS event"),
                }
            }
        })
        .connect(url)
        .await
        .map_err(|e| Detail::caused(format!("cannot connect to NATS at {url}"), e))?;
    Ok((client, disconnects))
}

/// Pause before reconnect attempt `attempts` (1-based): 0, 50, 100, 200 … ms, at most
/// [`MAX_RECONNECT_DELAY`].
fn reconnect_delay(attempts: usize) -> Duration {
    if attempts <= 1 {
        return Duration::ZERO;
    }
    let exp = u32::try_from(attempts - 2).unwrap_or(u32::MAX).min(16);
    Duration::from_millis(50u64 << exp).min(MAX_RECONNECT_DELAY)
}

/// The client is connected right now (sends would reach the server).
fn is_connected(client: &async_nats::Client) -> bool {
    client.connection_state() == async_nats::connection::State::Connected
}

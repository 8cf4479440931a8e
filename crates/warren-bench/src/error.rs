//! Why a benchmark could not run. Per-connection trouble during a run (a refused or dropped
//! connection) is counted in the report instead; these errors stop the whole scenario.

use std::io;
use std::net::SocketAddr;
use std::time::Duration;

use warren_proto::mqtt::DecodeError;

/// Everything that stops `warren bench` before it can print a report.
#[derive(Debug, thiserror::Error)]
pub enum BenchError {
    /// The `--target` (or `--listen`) address could not be resolved.
    #[error("cannot resolve {target:?}: {source}")]
    Resolve {
        /// The address as given.
        target: String,
        /// What the resolver said.
        source: io::Error,
    },
    /// The address resolved to nothing.
    #[error("{0:?} resolves to no address")]
    NoAddress(String),
    /// TCP connect failed.
    #[error("connect to {addr} failed: {source}")]
    Connect {
        /// Where we tried to connect.
        addr: SocketAddr,
        /// The socket error.
        source: io::Error,
    },
    /// A step that waits for the server took longer than its deadline.
    #[error("timed out after {after:?} waiting for {what}")]
    Timeout {
        /// What we were waiting for (`"CONNACK"`, `"SUBACK"`, …).
        what: &'static str,
        /// The deadline.
        after: Duration,
    },
    /// The server answered CONNECT with a non-zero return code.
    #[error("the server refused the connection: CONNACK return code {0}")]
    Refused(u8),
    /// The server refused a subscription (SUBACK 0x80).
    #[error("the server refused the subscription to {0:?}")]
    SubscribeRefused(String),
    /// The server closed the connection where the scenario needed it.
    #[error("the server closed the connection")]
    Closed,
    /// The server sent something that is not MQTT.
    #[error("malformed packet from the server: {0}")]
    Decode(#[from] DecodeError),
    /// The server sent a valid packet that makes no sense at this point.
    #[error("unexpected {0} from the server")]
    Unexpected(&'static str),
    /// The server sent something that is not pomelo (`pomelo-request`).
    #[error("malformed pomelo package from the server: {0}")]
    PomeloDecode(#[from] warren_proto::pomelo::PomeloError),
    /// The pomelo server refused the handshake (a code other than 200, or no JSON).
    #[error("the server refused the pomelo handshake: {0}")]
    HandshakeRefused(String),
    /// The pomelo server kicked the client, with this reason.
    #[error("the server kicked the client: {0}")]
    Kicked(String),
    /// The server did not upgrade the connection to WebSocket (`ws://` and `wss://` targets).
    #[error("WebSocket upgrade failed: {0}")]
    WsHandshake(String),
    /// The server sent WebSocket frames this client does not take.
    #[error("bad WebSocket frame from the server: {0}")]
    WsProtocol(String),
    /// The broker of `broker-echo` could not be reached, or refused or failed an operation.
    #[error("{bus}: {what} failed: {why}")]
    Broker {
        /// `nats`, `redis` or `amqp`.
        bus: &'static str,
        /// The operation (`connect`, `subscribe`, `publish`, …).
        what: &'static str,
        /// What the client library said.
        why: String,
    },
    /// A socket read or write failed.
    #[error("i/o error: {0}")]
    Io(#[from] io::Error),
    /// An option value that cannot work (zero subscribers, a payload too small, …).
    #[error("invalid option: {0}")]
    Invalid(String),
    /// A task of the generator failed (panicked or was cancelled).
    #[error("generator task failed: {0}")]
    Task(String),
    /// Ctrl-C or SIGTERM arrived before the load started.
    #[error("interrupted before the load started")]
    Interrupted,
    /// The async runtime could not be built.
    #[error("cannot start the runtime: {0}")]
    Runtime(io::Error),
}

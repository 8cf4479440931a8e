//! Command-line arguments of `warren bench`, shared by the library and the `warren` binary
//! (which embeds them as its `bench` subcommand).

use std::time::Duration;

use clap::{Args, Subcommand};

use crate::BenchError;

/// `warren bench <scenario> [--target ADDR] [options]`: which scenario to run and how.
#[derive(Debug, Clone, Args)]
pub struct BenchArgs {
    /// The scenario and its options.
    #[command(subcommand)]
    pub scenario: Scenario,
}

/// The load patterns the generator knows.
#[derive(Debug, Clone, Subcommand)]
pub enum Scenario {
    /// P publishers → S subscribers on one topic: saturation throughput (closed loop, the
    /// default) or latency at a fixed rate (--rate).
    Pubsub(PubsubArgs),
    /// C clients each keeping K requests in flight to a route with a msgid (warren's Echo
    /// module: run warren with --module Echo); reports requests/s and latency.
    Request(RequestArgs),
    /// The pomelo request/reply path: C pomelo clients (raw TCP, or WebSocket on a ws://
    /// target) each keeping K requests in flight to a route (warren with a pomelo:// listener
    /// and --module Echo); reports requests/s and latency like `request`.
    PomeloRequest(PomeloRequestArgs),
    /// Open N connections, hold them idle with keepalive; reports the connect rate, failures
    /// and, with --pid, the server's memory per idle connection.
    Connections(ConnectionsArgs),
    /// The raw broker round trip, no warren in the path: C clients each keeping K requests in
    /// flight to a responder through a NATS, Redis or RabbitMQ server (--bus URL); the
    /// reference for `request` against a module on another node.
    BrokerEcho(BrokerEchoArgs),
    /// Request/reply through a backend group (docs/backends.md) to a TCP echo speaking the
    /// gobase test codec, against this tool calling the same echo directly, in one run;
    /// reports both rates and their ratio.
    Backend(BackendArgs),
    /// Raw TCP echo server: the physical-limit reference for `request`.
    #[command(hide = true)]
    EchoServer(EchoServerArgs),
    /// WebSocket echo server (tokio-tungstenite): the physical-limit reference for `request`
    /// and `pomelo-request` over ws://.
    #[command(hide = true)]
    WsEchoServer(EchoServerArgs),
    /// One-topic QoS 0 MQTT relay that forwards each read batch of PUBLISH bytes, shared, to
    /// every subscriber: the physical-limit reference for `pubsub`.
    #[command(hide = true)]
    RelayServer(EchoServerArgs),
}

/// Options every client scenario has.
#[derive(Debug, Clone, Args)]
pub struct CommonArgs {
    /// Server address: HOST:PORT, mqtt://HOST:PORT, mqtts://HOST:PORT for TLS,
    /// ws://HOST:PORT[/PATH] for WebSocket (path /mqtt for MQTT, / for pomelo by default), or
    /// wss://HOST:PORT[/PATH] for WebSocket over TLS.
    #[arg(long, default_value = "127.0.0.1:1883", value_name = "ADDR")]
    pub target: String,
    /// MQTT user name sent in CONNECT (to measure a server with authentication on).
    #[arg(long)]
    pub username: Option<String>,
    /// MQTT password sent in CONNECT.
    #[arg(long)]
    pub password: Option<String>,
    /// PEM CA certificates that an mqtts:// or wss:// target's certificate must chain to;
    /// without it the certificate is not checked.
    #[arg(long, value_name = "FILE")]
    pub ca: Option<std::path::PathBuf>,
    /// ws:// and wss:// targets: one WebSocket frame per write, holding every packet queued,
    /// instead of one frame per packet (what browser clients send).
    #[arg(long)]
    pub ws_batch: bool,
    /// ws:// and wss:// targets: largest payload of one WebSocket frame; longer ones are split
    /// (a packet may span frames). 4096 fits every warren listener's default frame limit.
    #[arg(long, default_value_t = 4096, value_name = "BYTES")]
    pub ws_max_frame: usize,
    /// Seconds measured, after the warm-up (connections: seconds the idle connections are held).
    #[arg(long, default_value_t = 10.0, value_name = "SECONDS")]
    pub duration: f64,
    /// Seconds of load before measuring starts.
    #[arg(long, default_value_t = 1.0, value_name = "SECONDS")]
    pub warmup: f64,
    /// New connections per second while connecting; 0 means as fast as the server accepts.
    #[arg(long, default_value_t = 0.0, value_name = "PER_SECOND")]
    pub ramp: f64,
    /// MQTT keepalive sent in CONNECT; connections ping when idle this long.
    #[arg(long, default_value_t = 60, value_name = "SECONDS")]
    pub keepalive: u16,
    /// PID of the server: its resident memory is read from /proc before and after the load.
    #[arg(long)]
    pub pid: Option<u32>,
    /// A name for the server under test, copied into the JSON line.
    #[arg(long)]
    pub label: Option<String>,
    /// Runtime worker threads (default: the CPUs this process may run on).
    #[arg(long)]
    pub threads: Option<usize>,
    /// Print only the JSON line on stdout, no human summary.
    #[arg(long)]
    pub json: bool,
    /// No progress line on stderr.
    #[arg(long)]
    pub quiet: bool,
}

impl CommonArgs {
    /// The measured duration, checked.
    pub(crate) fn duration(&self) -> Result<Duration, BenchError> {
        seconds("--duration", self.duration)
    }

    /// The warm-up, checked.
    pub(crate) fn warmup(&self) -> Result<Duration, BenchError> {
        seconds("--warmup", self.warmup)
    }

    /// TLS, WebSocket and credentials for every MQTT connection of the run (over WebSocket:
    /// path `/mqtt` unless the target names one, subprotocol `mqtt`).
    pub(crate) fn login(&self) -> Result<std::sync::Arc<crate::login::Login>, BenchError> {
        self.login_for("/mqtt", Some("mqtt"))
    }

    /// The same for another protocol: its default WebSocket path and subprotocol.
    pub(crate) fn login_for(
        &self,
        default_path: &str,
        protocol: Option<&'static str>,
    ) -> Result<std::sync::Arc<crate::login::Login>, BenchError> {
        let ws = crate::ws::WsSettings::from_target(
            &self.target,
            default_path,
            protocol,
            self.ws_batch,
            self.ws_max_frame,
        );
        crate::login::Login::new(
            &self.target,
            self.username.clone(),
            self.password.clone(),
            self.ca.as_deref(),
            ws,
        )
        .map(std::sync::Arc::new)
    }
}

/// A non-negative, finite number of seconds as a `Duration`.
pub(crate) fn seconds(name: &str, s: f64) -> Result<Duration, BenchError> {
    Duration::try_from_secs_f64(s)
        .map_err(|_| BenchError::Invalid(format!("{name} must be a non-negative number, got {s}")))
}

/// Options of the `pubsub` scenario.
#[derive(Debug, Clone, Args)]
pub struct PubsubArgs {
    /// Target, duration and the other common options.
    #[command(flatten)]
    pub common: CommonArgs,
    /// Publishing connections.
    #[arg(long, default_value_t = 1)]
    pub publishers: usize,
    /// Subscribing connections, each subscribed to the topic.
    #[arg(long, default_value_t = 1)]
    pub subscribers: usize,
    /// Payload bytes per message (at least 20: publisher, sequence number and timestamp).
    #[arg(long, default_value_t = 64, value_name = "BYTES")]
    pub payload: usize,
    /// QoS of publishes and subscriptions: 0 or 1.
    #[arg(long, default_value_t = 0)]
    pub qos: u8,
    /// Subscribers keep persistent sessions (clean_session = 0) under stable client ids
    /// (`wb-persist-s<i>`): what a durable store (warren's `[mqtt] store`, mosquitto's
    /// `persistence`) must keep. Each id's earlier session is discarded first (one
    /// clean_session = 1 connect), so a run starts with nothing queued.
    #[arg(long)]
    pub persistent: bool,
    /// Closed loop: each publisher stays at most this many messages ahead of the slowest
    /// subscriber (and, at QoS 1, of its own PUBACKs). 0 picks 250 000 deliveries' worth,
    /// between 10 and 1000 messages (1000 up to 250 subscribers, 250 for 1000).
    #[arg(long, default_value_t = 0, value_name = "MESSAGES")]
    pub window: u64,
    /// Fixed rate: total messages per second over all publishers, instead of the closed loop.
    #[arg(long, value_name = "PER_SECOND")]
    pub rate: Option<f64>,
    /// Topic to publish on (default: bench/<pid>).
    #[arg(long)]
    pub topic: Option<String>,
    /// Seconds without progress of the slowest subscriber after which a publisher counts a
    /// stall and moves its window on anyway.
    #[arg(long, default_value_t = 5.0, value_name = "SECONDS")]
    pub stall_timeout: f64,
    /// After publishing stops, messages still on their way are awaited until none has arrived
    /// for this many seconds (at most 30 s in all); what is missing then is lost.
    #[arg(long, default_value_t = 2.0, value_name = "SECONDS")]
    pub drain: f64,
}

impl PubsubArgs {
    /// The window actually used: `--window`, or the automatic size when it is 0.
    pub fn window(&self) -> u64 {
        match self.window {
            0 => (250_000 / self.subscribers.max(1) as u64).clamp(10, 1000),
            w => w,
        }
    }
}

/// Options of the `request` scenario.
#[derive(Debug, Clone, Args)]
pub struct RequestArgs {
    /// Target, duration and the other common options.
    #[command(flatten)]
    pub common: CommonArgs,
    /// Client connections.
    #[arg(long, default_value_t = 10)]
    pub clients: usize,
    /// Requests each client keeps in flight.
    #[arg(long, default_value_t = 10)]
    pub inflight: usize,
    /// Route the requests go to; `/<n>` (the msgid) is appended per request.
    #[arg(long, default_value = "Echo/HD_Echo")]
    pub route: String,
    /// Request body bytes (a JSON object padded to this size).
    #[arg(long, default_value_t = 64, value_name = "BYTES")]
    pub payload: usize,
    /// QoS of the requests: 0 or 1.
    #[arg(long, default_value_t = 0)]
    pub qos: u8,
    /// Seconds to wait, after sending stops, for outstanding replies.
    #[arg(long, default_value_t = 2.0, value_name = "SECONDS")]
    pub drain: f64,
}

/// Options of the `pomelo-request` scenario.
#[derive(Debug, Clone, Args)]
pub struct PomeloRequestArgs {
    /// Target (HOST:PORT of a pomelo listener, or ws://HOST:PORT[/PATH] for its WebSocket
    /// side), duration and the other common options (`--keepalive` does not apply: heartbeats
    /// follow the server's handshake).
    #[command(flatten)]
    pub common: CommonArgs,
    /// Client connections.
    #[arg(long, default_value_t = 10)]
    pub clients: usize,
    /// Requests each client keeps in flight.
    #[arg(long, default_value_t = 10)]
    pub inflight: usize,
    /// pomelo route the requests go to (`Module.Handler`).
    #[arg(long, default_value = "Echo.HD_Echo")]
    pub route: String,
    /// Request body bytes (a JSON object `{"n":…,"pad":"xxx…"}` padded to this size).
    #[arg(long, default_value_t = 64, value_name = "BYTES")]
    pub payload: usize,
    /// Seconds to wait, after sending stops, for outstanding responses.
    #[arg(long, default_value_t = 2.0, value_name = "SECONDS")]
    pub drain: f64,
}

/// Options of the `connections` scenario.
#[derive(Debug, Clone, Args)]
pub struct ConnectionsArgs {
    /// Target, hold duration and the other common options.
    #[command(flatten)]
    pub common: CommonArgs,
    /// Connections to open.
    #[arg(long, default_value_t = 1000)]
    pub count: usize,
    /// On a loopback target, connections per source address (127.a.b.c, from a random start
    /// each run): one address has only ~28 k ephemeral ports, and warren lets one address hold
    /// 1000 connections by default (`[limits] max_conn_per_ip`).
    #[arg(long, default_value_t = 1000)]
    pub per_source: usize,
    /// Connection attempts in progress at once (many more overflow the accept queue of some
    /// servers, and the kernel then retries the SYN only after a second).
    #[arg(long, default_value_t = 64)]
    pub concurrency: usize,
    /// Seconds one connection may take to get its CONNACK.
    #[arg(long, default_value_t = 10.0, value_name = "SECONDS")]
    pub connect_timeout: f64,
    /// Seconds to let the server settle after the last connection before reading its memory.
    #[arg(long, default_value_t = 1.0, value_name = "SECONDS")]
    pub settle: f64,
}

/// Options of the `broker-echo` scenario. It talks to a broker, not to an MQTT server, so it
/// has its own options instead of [`CommonArgs`] (no target, ramp or keepalive).
#[derive(Debug, Clone, Args)]
pub struct BrokerEchoArgs {
    /// The broker: nats://HOST:PORT, redis://HOST:PORT[/DB] or amqp://USER:PASS@HOST:PORT/VHOST.
    #[arg(long, value_name = "URL")]
    pub bus: String,
    /// Client connections (each with its own reply inbox, list or queue).
    #[arg(long, default_value_t = 10)]
    pub clients: usize,
    /// Requests each client keeps in flight.
    #[arg(long, default_value_t = 10)]
    pub inflight: usize,
    /// Request body bytes (at least 8: the client and request numbers); the reply is the same
    /// bytes.
    #[arg(long, default_value_t = 64, value_name = "BYTES")]
    pub payload: usize,
    /// Seconds measured, after the warm-up.
    #[arg(long, default_value_t = 10.0, value_name = "SECONDS")]
    pub duration: f64,
    /// Seconds of load before measuring starts.
    #[arg(long, default_value_t = 1.0, value_name = "SECONDS")]
    pub warmup: f64,
    /// Seconds to wait, after sending stops, for outstanding replies.
    #[arg(long, default_value_t = 2.0, value_name = "SECONDS")]
    pub drain: f64,
    /// PID of the broker: its memory and CPU time are read from /proc like a server's.
    #[arg(long)]
    pub pid: Option<u32>,
    /// A name for the run, copied into the JSON line.
    #[arg(long)]
    pub label: Option<String>,
    /// Runtime worker threads (default: the CPUs this process may run on).
    #[arg(long)]
    pub threads: Option<usize>,
    /// Print only the JSON line on stdout, no human summary.
    #[arg(long)]
    pub json: bool,
    /// No progress line on stderr.
    #[arg(long)]
    pub quiet: bool,
}

impl BrokerEchoArgs {
    /// The measured duration, checked.
    pub(crate) fn duration(&self) -> Result<Duration, BenchError> {
        seconds("--duration", self.duration)
    }

    /// The warm-up, checked.
    pub(crate) fn warmup(&self) -> Result<Duration, BenchError> {
        seconds("--warmup", self.warmup)
    }
}

/// Options of the `backend` scenario.
#[derive(Debug, Clone, Args)]
pub struct BackendArgs {
    /// The echo service to call (HOST:PORT, for example `warren bench echo-server`'s); default:
    /// one started in this process.
    #[arg(long, value_name = "ADDR")]
    pub target: Option<String>,
    /// Requests outstanding at once on the one connection (raw), and callers (backend group).
    #[arg(long, default_value_t = 64)]
    pub inflight: usize,
    /// Request body bytes; the answer is the same frame.
    #[arg(long, default_value_t = 64, value_name = "BYTES")]
    pub payload: usize,
    /// Seconds measured per phase, after its warm-up.
    #[arg(long, default_value_t = 3.0, value_name = "SECONDS")]
    pub duration: f64,
    /// Seconds of load before measuring starts, per phase.
    #[arg(long, default_value_t = 0.5, value_name = "SECONDS")]
    pub warmup: f64,
    /// A name for the run, copied into the JSON line.
    #[arg(long)]
    pub label: Option<String>,
    /// Runtime worker threads (default: the CPUs this process may run on).
    #[arg(long)]
    pub threads: Option<usize>,
    /// Print only the JSON line on stdout, no human summary.
    #[arg(long)]
    pub json: bool,
}

/// Options of the hidden reference servers (`echo-server`, `ws-echo-server`, `relay-server`).
#[derive(Debug, Clone, Args)]
pub struct EchoServerArgs {
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1:0", value_name = "ADDR")]
    pub listen: String,
    /// Runtime worker threads (default: the CPUs this process may run on).
    #[arg(long)]
    pub threads: Option<usize>,
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        bench: BenchArgs,
    }

    #[test]
    fn parses_a_fixed_rate_fanout() {
        let cli = Cli::try_parse_from([
            "bench",
            "pubsub",
            "--target",
            "127.0.0.1:1",
            "--subscribers",
            "100",
            "--rate",
            "500",
        ])
        .unwrap();
        let Scenario::Pubsub(a) = cli.bench.scenario else {
            panic!("not pubsub")
        };
        assert_eq!(a.subscribers, 100);
        assert_eq!(a.rate, Some(500.0));
        assert_eq!(a.common.target, "127.0.0.1:1");
        assert_eq!(a.window(), 1000);
    }

    #[test]
    fn automatic_window_bounds_deliveries_in_flight() {
        let parse = |args: &[&str]| {
            let cli = Cli::try_parse_from([&["bench", "pubsub"], args].concat()).unwrap();
            match cli.bench.scenario {
                Scenario::Pubsub(a) => a.window(),
                _ => unreachable!(),
            }
        };
        assert_eq!(parse(&[]), 1000);
        assert_eq!(parse(&["--subscribers", "1000"]), 250);
        assert_eq!(parse(&["--subscribers", "100000"]), 10);
        assert_eq!(parse(&["--subscribers", "1000", "--window", "7"]), 7);
    }

    #[test]
    fn parses_a_broker_echo() {
        let cli = Cli::try_parse_from([
            "bench",
            "broker-echo",
            "--bus",
            "nats://127.0.0.1:4222",
            "--inflight",
            "50",
        ])
        .unwrap();
        let Scenario::BrokerEcho(a) = cli.bench.scenario else {
            panic!("not broker-echo")
        };
        assert_eq!(a.bus, "nats://127.0.0.1:4222");
        assert_eq!((a.clients, a.inflight, a.payload), (10, 50, 64));
        assert_eq!(a.duration().unwrap(), Duration::from_secs(10));
        // The bus is required.
        assert!(Cli::try_parse_from(["bench", "broker-echo"]).is_err());
    }

    #[test]
    fn rejects_negative_durations() {
        assert!(seconds("--duration", -1.0).is_err());
        assert!(seconds("--duration", f64::NAN).is_err());
        assert_eq!(
            seconds("--duration", 1.5).unwrap(),
            Duration::from_millis(1500)
        );
    }
}

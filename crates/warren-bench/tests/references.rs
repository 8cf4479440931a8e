//! The generator against its own reference servers, in one process: the fan-out relay relays
//! every message to every subscriber, and the WebSocket echo answers MQTT and pomelo requests
//! over ws:// (frames per packet and per write), so the WebSocket client paths, the relay and
//! the echo work end to end.

use std::time::Duration;

use clap::Parser;
use tokio_util::sync::CancellationToken;
use warren_bench::{BenchArgs, Report};

#[derive(Parser)]
struct Cli {
    #[command(flatten)]
    bench: BenchArgs,
}

fn parse(args: &[&str]) -> BenchArgs {
    Cli::try_parse_from([&["bench"], args].concat())
        .expect("arguments parse")
        .bench
}

/// A port free on 127.0.0.1 right now.
fn free_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    l.local_addr().expect("local address").port()
}

/// Starts a hidden reference server (`echo-server`, `ws-echo-server`, `relay-server`) on a free
/// port and returns the port once it accepts connections.
async fn start(kind: &str, stop: &CancellationToken) -> u16 {
    let port = free_port();
    let args = parse(&[kind, "--listen", &format!("127.0.0.1:{port}")]);
    let stop = stop.clone();
    tokio::spawn(async move { warren_bench::run(args, stop).await });
    for _ in 0..500 {
        if tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .is_ok()
        {
            return port;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("{kind} did not start on port {port}");
}

/// Runs one short client scenario and returns its report.
async fn bench(args: &[&str]) -> Report {
    let mut all = args.to_vec();
    all.extend([
        "--duration",
        "0.5",
        "--warmup",
        "0.2",
        "--quiet",
        "--threads",
        "1",
    ]);
    warren_bench::run(parse(&all), CancellationToken::new())
        .await
        .expect("the run completes")
        .expect("a client scenario reports")
}

fn assert_clean(r: &Report) {
    assert_eq!(r.errors, 0, "errors: first {:?}", r.first_error);
    assert_eq!(r.lost, 0, "lost messages: first error {:?}", r.first_error);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_relay_delivers_every_message_to_every_subscriber() {
    let stop = CancellationToken::new();
    let port = start("relay-server", &stop).await;
    let target = format!("127.0.0.1:{port}");
    let r = bench(&[
        "pubsub",
        "--target",
        &target,
        "--publishers",
        "2",
        "--subscribers",
        "5",
    ])
    .await;
    assert_clean(&r);
    assert!(r.published > 0);
    assert_eq!(
        r.delivered,
        r.published * 5,
        "every subscriber gets every message"
    );
    stop.cancel();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_over_websocket_against_the_echo() {
    let stop = CancellationToken::new();
    let port = start("ws-echo-server", &stop).await;
    for frames in [&[][..], &["--ws-batch", "--ws-max-frame", "100"][..]] {
        let target = format!("ws://127.0.0.1:{port}/mqtt");
        let mut args = vec![
            "request",
            "--target",
            &target,
            "--clients",
            "4",
            "--inflight",
            "16",
        ];
        args.extend_from_slice(frames);
        let r = bench(&args).await;
        assert_clean(&r);
        assert!(r.requests_per_s.unwrap_or_default() > 0.0, "{frames:?}");

        let target = format!("ws://127.0.0.1:{port}");
        let mut args = vec![
            "pomelo-request",
            "--target",
            &target,
            "--clients",
            "4",
            "--inflight",
            "16",
        ];
        args.extend_from_slice(frames);
        let r = bench(&args).await;
        assert_clean(&r);
        assert!(r.requests_per_s.unwrap_or_default() > 0.0, "{frames:?}");
    }
    stop.cancel();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_over_tcp_against_the_echo() {
    let stop = CancellationToken::new();
    let port = start("echo-server", &stop).await;
    let target = format!("127.0.0.1:{port}");
    for scenario in ["request", "pomelo-request"] {
        let r = bench(&[scenario, "--target", &target, "--clients", "4"]).await;
        assert_clean(&r);
        assert!(r.requests_per_s.unwrap_or_default() > 0.0, "{scenario}");
    }
    stop.cancel();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_upgrade_is_an_error() {
    let stop = CancellationToken::new();
    // the raw echo sends the upgrade request back: not a 101 answer
    let port = start("echo-server", &stop).await;
    let args = parse(&[
        "request",
        "--target",
        &format!("ws://127.0.0.1:{port}"),
        "--clients",
        "1",
        "--quiet",
    ]);
    let e = warren_bench::run(args, CancellationToken::new())
        .await
        .expect_err("no WebSocket there");
    assert!(e.to_string().contains("WebSocket upgrade failed"), "{e}");
    stop.cancel();
}

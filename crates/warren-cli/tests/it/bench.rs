//! `warren bench` against a warren started by the test: every scenario runs for about two
//! seconds and must exit 0 with a JSON line showing traffic. Figures are never asserted; this
//! proves the tool works, `bench/compare` measures.

use std::fs::File;
use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::thread::sleep;
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::{Server, free_port};

/// How long one bench run may take before the test kills it.
const RUN_TIMEOUT: Duration = Duration::from_secs(60);

/// A warren with a plain-MQTT listener (subscriptions work there) and the Echo module; returns
/// the server and that listener's port.
fn warren() -> (Server, u16) {
    let port = free_port();
    let url = format!("mqtt://127.0.0.1:{port}?max_conn=5000");
    let mut server = Server::start(&["--listen", &url, "--module", "Echo"]);
    server.wait_ready(&[port]);
    (server, port)
}

/// The output of a finished bench run.
struct Run {
    status: std::process::ExitStatus,
    stdout: String,
    stderr: String,
}

impl Run {
    /// The JSON line (the last stdout line that parses as an object).
    fn json(&self) -> Value {
        self.stdout
            .lines()
            .rev()
            .find_map(|l| {
                serde_json::from_str::<Value>(l)
                    .ok()
                    .filter(Value::is_object)
            })
            .unwrap_or_else(|| panic!("no JSON line in:\n{}\n{}", self.stdout, self.stderr))
    }

    fn assert_ok(&self) -> Value {
        assert!(
            self.status.success(),
            "bench failed ({}):\n{}\n{}",
            self.status,
            self.stdout,
            self.stderr
        );
        self.json()
    }
}

/// Starts `warren bench ARGS` with its output going to temporary files.
fn spawn_bench(args: &[&str]) -> (Child, std::path::PathBuf, std::path::PathBuf) {
    let n = free_port();
    let dir = std::env::temp_dir();
    let out = dir.join(format!("warren-bench-it-{}-{n}.out", std::process::id()));
    let err = dir.join(format!("warren-bench-it-{}-{n}.err", std::process::id()));
    let child = Command::new(env!("CARGO_BIN_EXE_warren"))
        .arg("bench")
        .args(args)
        .stdin(Stdio::null())
        .stdout(File::create(&out).expect("create the stdout file"))
        .stderr(File::create(&err).expect("create the stderr file"))
        .spawn()
        .expect("spawn warren bench");
    (child, out, err)
}

/// Waits for a bench child (killing it after [`RUN_TIMEOUT`]) and collects its output.
fn finish(mut child: Child, out: std::path::PathBuf, err: std::path::PathBuf) -> Run {
    let deadline = Instant::now() + RUN_TIMEOUT;
    let status = loop {
        if let Some(s) = child.try_wait().expect("wait for warren bench") {
            break s;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "warren bench still running after {RUN_TIMEOUT:?}\n{}",
                std::fs::read_to_string(&err).unwrap_or_default()
            );
        }
        sleep(Duration::from_millis(50));
    };
    let run = Run {
        status,
        stdout: std::fs::read_to_string(&out).unwrap_or_default(),
        stderr: std::fs::read_to_string(&err).unwrap_or_default(),
    };
    let _ = std::fs::remove_file(out);
    let _ = std::fs::remove_file(err);
    run
}

fn bench(args: &[&str]) -> Run {
    let (child, out, err) = spawn_bench(args);
    finish(child, out, err)
}

const SHORT: [&str; 4] = ["--duration", "2", "--warmup", "0.5"];

#[test]
fn pubsub_closed_loop_fans_out() {
    let (server, port) = warren();
    let target = format!("127.0.0.1:{port}");
    let pid = server.child.id().to_string();
    let mut args = vec![
        "pubsub",
        "--target",
        &target,
        "--subscribers",
        "10",
        "--pid",
        &pid,
    ];
    args.extend(SHORT);
    let j = bench(&args).assert_ok();
    assert_eq!(j["scenario"], "pubsub");
    assert_eq!(j["params"]["mode"], "closed-loop");
    assert!(j["delivered"].as_u64().unwrap() > 0, "{j}");
    assert!(j["rss_after_kib"].as_u64().is_some(), "{j}");
}

#[test]
fn pubsub_fixed_rate_measures_latency_at_qos1() {
    let (_server, port) = warren();
    let target = format!("127.0.0.1:{port}");
    let mut args = vec![
        "pubsub",
        "--target",
        &target,
        "--subscribers",
        "10",
        "--rate",
        "200",
        "--qos",
        "1",
    ];
    args.extend(SHORT);
    let j = bench(&args).assert_ok();
    assert_eq!(j["params"]["mode"], "fixed-rate");
    assert!(j["delivered"].as_u64().unwrap() > 0, "{j}");
    assert!(j["latency_us"]["p99"].as_f64().is_some(), "{j}");
}

#[test]
fn request_through_the_echo_module() {
    let (_server, port) = warren();
    let target = format!("127.0.0.1:{port}");
    let mut args = vec![
        "request",
        "--target",
        &target,
        "--clients",
        "4",
        "--inflight",
        "8",
    ];
    args.extend(SHORT);
    let j = bench(&args).assert_ok();
    assert_eq!(j["scenario"], "request");
    assert!(j["delivered"].as_u64().unwrap() > 0, "{j}");
    assert_eq!(j["error_replies"], 0, "{j}");
}

#[test]
fn pomelo_request_through_the_echo_module() {
    let port = free_port();
    let url = format!("pomelo://127.0.0.1:{port}?heartbeat_s=0");
    let mut server = Server::start(&["--listen", &url, "--module", "Echo"]);
    server.wait_ready(&[port]);
    let target = format!("127.0.0.1:{port}");
    let mut args = vec![
        "pomelo-request",
        "--target",
        &target,
        "--clients",
        "4",
        "--inflight",
        "8",
    ];
    args.extend(SHORT);
    let j = bench(&args).assert_ok();
    assert_eq!(j["scenario"], "pomelo-request");
    assert!(j["requests_per_s"].as_f64().unwrap() > 0.0, "{j}");
    assert!(j["delivered"].as_u64().unwrap() > 0, "{j}");
    assert_eq!(j["error_replies"], 0, "{j}");
}

#[test]
fn request_against_the_raw_echo_reference() {
    let port = free_port();
    let listen = format!("127.0.0.1:{port}");
    let mut echo = Command::new(env!("CARGO_BIN_EXE_warren"))
        .args(["bench", "echo-server", "--listen", &listen])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn the echo server");
    let mut line = String::new();
    BufReader::new(echo.stdout.take().expect("piped stdout"))
        .read_line(&mut line)
        .expect("read the echo server's banner");
    assert_eq!(line.trim(), format!("listening {listen}"));
    let mut args = vec!["request", "--target", &listen, "--clients", "2"];
    args.extend(SHORT);
    let run = bench(&args);
    let _ = echo.kill();
    let _ = echo.wait();
    let j = run.assert_ok();
    assert!(j["delivered"].as_u64().unwrap() > 0, "{j}");
}

#[test]
fn connections_are_opened_held_and_measured() {
    let (server, port) = warren();
    let target = format!("127.0.0.1:{port}");
    let pid = server.child.id().to_string();
    let j = bench(&[
        "connections",
        "--target",
        &target,
        "--count",
        "200",
        "--per-source",
        "100",
        "--duration",
        "1",
        "--settle",
        "0.5",
        "--pid",
        &pid,
    ])
    .assert_ok();
    assert_eq!(j["scenario"], "connections");
    assert!(j["opened"].as_u64().unwrap() > 0, "{j}");
    assert!(j["bytes_per_conn"].as_f64().is_some(), "{j}");
}

#[test]
fn sigterm_stops_cleanly_with_a_summary() {
    let (_server, port) = warren();
    let target = format!("127.0.0.1:{port}");
    let (child, out, err) = spawn_bench(&[
        "pubsub",
        "--target",
        &target,
        "--duration",
        "60",
        "--warmup",
        "0.2",
    ]);
    sleep(Duration::from_millis(1500));
    let killed = Command::new("kill")
        .arg(child.id().to_string())
        .status()
        .expect("run kill");
    assert!(killed.success());
    let started = Instant::now();
    let run = finish(child, out, err);
    assert!(started.elapsed() < Duration::from_secs(20));
    let j = run.assert_ok();
    assert_eq!(j["interrupted"], true, "{j}");
    assert!(j["delivered"].as_u64().unwrap() > 0, "{j}");
}

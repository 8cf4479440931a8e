//! End-to-end tests of the `warren` binary, driven by a real MQTT client (rumqttc).
//!
//! These tests start the binary that cargo just built on free ports, exactly as an operator
//! would, and talk to it over sockets. They are the only integration-test binary of this crate
//! (one binary per crate keeps link times down); add new areas as modules here.

mod bench;
mod chat;

use std::fs::File;
use std::net::{TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU16, Ordering};
use std::thread::sleep;
use std::time::{Duration, Instant};

/// How long a freshly started server may take before its listeners accept connections.
const READY_TIMEOUT: Duration = Duration::from_secs(20);

/// A `warren serve` child process on free ports, killed when dropped so no test leaks a server.
pub struct Server {
    /// The running binary.
    child: Child,
    /// Port of the mqant-mode MQTT/TCP listener.
    pub mqtt_port: u16,
    /// Where the server's stderr (its log) goes, for failure messages.
    log: PathBuf,
}

impl Server {
    /// Start `warren serve` with one `mqtt+mqant` listener (plus `extra` arguments) and wait
    /// until it accepts connections.
    pub fn start(extra: &[&str]) -> Server {
        let mqtt_port = free_port();
        let http_port = free_port();
        let log =
            std::env::temp_dir().join(format!("warren-it-{}-{mqtt_port}.log", std::process::id()));
        let stderr = File::create(&log).expect("create the server log file");
        let child = Command::new(env!("CARGO_BIN_EXE_warren"))
            .arg("serve")
            .arg("--no-demo-listeners")
            .arg("--listen")
            .arg(format!("mqtt+mqant://127.0.0.1:{mqtt_port}"))
            .arg("--http")
            .arg(format!("127.0.0.1:{http_port}"))
            .args(extra)
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(stderr)
            .spawn()
            .expect("spawn the warren binary");
        let mut server = Server {
            child,
            mqtt_port,
            log,
        };
        server.wait_ready(&[mqtt_port, http_port]);
        server
    }

    /// Poll until every port accepts TCP connections; panic with the log if the child exits
    /// or the deadline passes.
    fn wait_ready(&mut self, ports: &[u16]) {
        let deadline = Instant::now() + READY_TIMEOUT;
        for &port in ports {
            loop {
                if let Ok(Some(status)) = self.child.try_wait() {
                    panic!(
                        "warren exited before it was ready ({status})\n{}",
                        self.log_text()
                    );
                }
                if TcpStream::connect(("127.0.0.1", port)).is_ok() {
                    break;
                }
                assert!(
                    Instant::now() < deadline,
                    "warren not accepting on port {port} after {READY_TIMEOUT:?}\n{}",
                    self.log_text()
                );
                sleep(Duration::from_millis(50));
            }
        }
    }

    /// The server's log so far (for assertion messages).
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_file(&self.log);
    }
}

/// A TCP port on 127.0.0.1 that nothing listens on right now.
pub fn free_port() -> u16 {
    // below the kernel's ephemeral range (32768+), so outgoing connections cannot take the port
    // between now and the moment warren binds it
    static NEXT: AtomicU16 = AtomicU16::new(0);
    let seed = (std::process::id() % 12_000) as u16;
    loop {
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let port = 20_000 + (seed.wrapping_add(n.wrapping_mul(7))) % 12_000;
        if TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
}

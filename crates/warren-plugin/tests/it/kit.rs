//! What the tests share: a node on port 0 with a line listener or an MQTT listener, a line
//! client speaking raw bytes, an MQTT client (rumqttc), and the native example plugins built
//! into a temporary directory with the machine's C compiler and rustc.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use rumqttc::{AsyncClient, Event, EventLoop, MqttOptions, Packet, QoS};
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use warren::config::{Config, ListenerConfig, ModuleConfig};
use warren::gate::line::ChannelHandler;
use warren::{Module, Node};

/// The repository's root (for include/ and examples/).
pub fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// A fixture file of this crate.
pub fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name)
}

/// A node whose one line listener runs `handler`.
pub async fn line_node(handler: Arc<dyn ChannelHandler>) -> Node {
    line_node_with(handler, "line://127.0.0.1:0").await
}

/// [`line_node`] with a listener URL of the test's choosing (for `lazy_channels`).
pub async fn line_node_with(handler: Arc<dyn ChannelHandler>, url: &str) -> Node {
    let mut config = Config::default();
    config.http.enabled = false;
    config
        .listeners
        .push(ListenerConfig::from_url(url).expect("listener url"));
    Node::builder(config)
        .channel_handler(handler)
        .start()
        .await
        .expect("node starts")
}

/// A node running `modules`, with one MQTT listener at `url` (`mqtt://…` or `mqtt+mqant://…`).
pub async fn module_node(url: &str, modules: Vec<(Module, ModuleConfig)>) -> Node {
    let mut config = Config::default();
    config.http.enabled = false;
    config
        .listeners
        .push(ListenerConfig::from_url(url).expect("listener url"));
    let mut b = Node::builder(config);
    for (m, c) in modules {
        b = b.module(m, c);
    }
    b.start().await.expect("node starts")
}

/// A line-protocol client: raw bytes out, `<len> \r\n<body>` frames in.
pub struct LineClient {
    stream: TcpStream,
    buf: Vec<u8>,
}

impl LineClient {
    pub async fn connect(node: &Node) -> LineClient {
        let addr: SocketAddr = node.listeners()[0].local_addr;
        LineClient {
            stream: TcpStream::connect(addr).await.expect("connect"),
            buf: Vec::new(),
        }
    }

    pub async fn send(&mut self, bytes: &[u8]) {
        self.stream.write_all(bytes).await.expect("write");
    }

    /// Exactly `n` bytes from the server (within 10 s).
    pub async fn read_exact(&mut self, n: usize) -> Vec<u8> {
        tokio::time::timeout(Duration::from_secs(10), async {
            while self.buf.len() < n {
                let mut chunk = [0u8; 4096];
                let k = self.stream.read(&mut chunk).await.expect("read");
                assert!(k > 0, "connection closed after {:?}", self.buf);
                self.buf.extend_from_slice(&chunk[..k]);
            }
        })
        .await
        .expect("bytes within 10 s");
        self.buf.drain(..n).collect()
    }

    /// The next frame's body.
    pub async fn frame(&mut self) -> Vec<u8> {
        let head = tokio::time::timeout(Duration::from_secs(10), async {
            loop {
                if let Some(i) = self.buf.windows(2).position(|w| w == b"\r\n") {
                    let head: Vec<u8> = self.buf.drain(..i + 2).collect();
                    return head;
                }
                let mut chunk = [0u8; 4096];
                let k = self.stream.read(&mut chunk).await.expect("read");
                assert!(k > 0, "connection closed after {:?}", self.buf);
                self.buf.extend_from_slice(&chunk[..k]);
            }
        })
        .await
        .expect("a frame within 10 s");
        let text = std::str::from_utf8(&head).expect("ascii head");
        let len: usize = text.trim_end().parse().expect("length head");
        self.read_exact(len).await
    }

    /// The next frame's body as text.
    pub async fn text(&mut self) -> String {
        String::from_utf8(self.frame().await).expect("utf-8 frame")
    }

    /// Whether the server closes the connection (within 10 s) without sending more.
    pub async fn closed(&mut self) -> bool {
        let mut chunk = [0u8; 64];
        matches!(
            tokio::time::timeout(Duration::from_secs(10), self.stream.read(&mut chunk)).await,
            Ok(Ok(0)) | Ok(Err(_))
        )
    }
}

/// An MQTT client connected to the node's listener.
pub async fn mqtt(node: &Node, id: &str) -> (AsyncClient, EventLoop) {
    let addr = node.listeners()[0].local_addr;
    let mut opts = MqttOptions::new(id, addr.ip().to_string(), addr.port());
    opts.set_keep_alive(Duration::from_secs(30));
    let (client, mut events) = AsyncClient::new(opts, 64);
    tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            if let Event::Incoming(Packet::ConnAck(_)) = events.poll().await.expect("mqtt") {
                break;
            }
        }
    })
    .await
    .expect("CONNACK within 10 s");
    (client, events)
}

/// Publish a request (QoS 0).
pub async fn ask(client: &AsyncClient, topic: &str, body: impl Into<Vec<u8>>) {
    client
        .publish(topic, QoS::AtMostOnce, false, body)
        .await
        .expect("publish");
}

/// The next `n` PUBLISHes the client receives: (topic, payload as text).
pub async fn next_publishes(events: &mut EventLoop, n: usize) -> Vec<(String, String)> {
    let mut got = Vec::new();
    tokio::time::timeout(Duration::from_secs(20), async {
        while got.len() < n {
            if let Event::Incoming(Packet::Publish(p)) = events.poll().await.expect("mqtt") {
                got.push((
                    p.topic.clone(),
                    String::from_utf8_lossy(&p.payload).into_owned(),
                ));
            }
        }
    })
    .await
    .expect("publishes within 20 s");
    got
}

/// A reply envelope, parsed.
pub fn envelope(payload: &str) -> Value {
    serde_json::from_str(payload).expect("JSON reply")
}

/// Build `source` (C) into a shared library in `dir` with the machine's C compiler.
pub fn build_c(source: &Path, dir: &Path, name: &str) -> PathBuf {
    let out = dir.join(format!("lib{name}.so"));
    let cc = std::env::var("CC").unwrap_or_else(|_| "cc".into());
    let status = std::process::Command::new(cc)
        .args(["-shared", "-fPIC", "-Wall", "-Werror", "-I"])
        .arg(repo().join("include"))
        .arg("-o")
        .arg(&out)
        .arg(source)
        .status()
        .expect("a C compiler (cc)");
    assert!(status.success(), "cc failed for {}", source.display());
    out
}

/// Build examples/plugins/echo_rs into a shared library in `dir` with rustc.
pub fn build_echo_rs(dir: &Path) -> PathBuf {
    let out = dir.join("libecho_rs.so");
    let rustc = std::env::var("RUSTC").unwrap_or_else(|_| "rustc".into());
    let status = std::process::Command::new(rustc)
        .args([
            "--edition",
            "2024",
            "--crate-type",
            "cdylib",
            "--crate-name",
            "echo_rs",
            "-D",
            "warnings",
            "-o",
        ])
        .arg(&out)
        .arg(repo().join("examples/plugins/echo_rs/src/lib.rs"))
        .status()
        .expect("rustc");
    assert!(
        status.success(),
        "rustc failed for examples/plugins/echo_rs"
    );
    out
}

/// Write `text` to `dir/name` and return the path.
pub fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, text).expect("write plugin file");
    p
}

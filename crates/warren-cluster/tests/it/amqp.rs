//! Tests of `warren_cluster::amqp` against a real rabbitmq-server (one per test: the broker boots
//! in 10–20 s, so each test runs a group of scenarios on its own server) and real Python pika
//! peers playing mqant's client and server (`tests/peers/mqant_*.py`).

use std::process::Stdio;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use bytes::Bytes;
use futures_util::StreamExt as _;
use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use warren::config::{Config, ModuleBusConfig, ModuleConfig};
use warren::remote::{Transport, TransportError};
use warren::{CallError, Context, Json, Module, Node, Session};
use warren_cluster::amqp::{AmqpTransport, MAX_MESSAGE, MqantBridge};

use crate::kit;

/// The pid of the process listening on 127.0.0.1:`port` (from /proc/net/tcp and /proc/*/fd).
fn listener_pid(port: u16) -> Option<u32> {
    let tcp = std::fs::read_to_string("/proc/net/tcp").ok()?;
    let suffix = format!(":{port:04X}");
    let inode = tcp.lines().skip(1).find_map(|l| {
        let f: Vec<&str> = l.split_whitespace().collect();
        (f.len() > 9 && f[1].ends_with(&suffix) && f[3] == "0A").then(|| f[9].to_owned())
    })?;
    let target = format!("socket:[{inode}]");
    for p in std::fs::read_dir("/proc").ok()?.flatten() {
        let Some(pid) = p.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
            continue;
        };
        let Ok(fds) = std::fs::read_dir(p.path().join("fd")) else {
            continue;
        };
        for fd in fds.flatten() {
            if std::fs::read_link(fd.path()).is_ok_and(|l| l.to_string_lossy() == target) {
                return Some(pid);
            }
        }
    }
    None
}

/// A kit RabbitMQ server whose Erlang VM is also killed here, by pid. `rabbitmq-server` is a
/// script that forks the VM, and the VM's command line does not carry the node name the kit
/// matches when it kills, so without this every kill, restart and drop would leave the broker
/// running.
struct Rabbit {
    server: kit::Server,
    beam: Option<u32>,
}

impl Rabbit {
    fn start() -> Rabbit {
        kit::Server::require(kit::Kind::Rabbit);
        let server = kit::Server::start(kit::Kind::Rabbit);
        let beam = listener_pid(server.port);
        Rabbit { server, beam }
    }

    fn url(&self) -> String {
        self.server.url()
    }

    fn kill(&mut self) {
        if let Some(pid) = self.beam.take() {
            let _ = std::process::Command::new("kill")
                .args(["-9", &pid.to_string()])
                .status();
        }
        self.server.kill();
    }

    fn restart(&mut self) {
        self.kill();
        self.server.restart();
        self.beam = listener_pid(self.server.port);
    }
}

impl Drop for Rabbit {
    fn drop(&mut self) {
        self.kill();
    }
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime")
}

/// Poll `f` until it yields `Some`, for at most `within`.
async fn eventually<T, F, Fut>(within: Duration, what: &str, mut f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let end = Instant::now() + within;
    loop {
        if let Some(v) = f().await {
            return v;
        }
        assert!(Instant::now() < end, "gave up waiting: {what}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[test]
fn transport_orders_refuses_fails_fast_and_recovers() {
    let mut server = Rabbit::start();
    let url = server.url();
    runtime().block_on(async move {
        let a = AmqpTransport::connect(&url, "wt").await.expect("connect a");
        let b = AmqpTransport::connect(&url, "wt").await.expect("connect b");
        assert_eq!(a.kind(), "amqp");
        assert_eq!(a.max_frame(), MAX_MESSAGE);
        let stop = CancellationToken::new();
        let mut rx = b.serve("nb", stop.clone()).await.expect("serve nb");

        // 1000 frames arrive, in the order sent
        let receiver = tokio::spawn(async move {
            let mut got = Vec::with_capacity(1000);
            while got.len() < 1000 {
                got.push(rx.next().await.expect("inbox open"));
            }
            (got, rx)
        });
        let started = std::time::Instant::now();
        for i in 0..1000u32 {
            a.send("nb", Bytes::from(i.to_be_bytes().to_vec()))
                .await
                .expect("send");
        }
        let (got, mut rx) = receiver.await.expect("receiver");
        eprintln!(
            "amqp: 1000 confirmed, mandatory sends in {:?} (one sender awaiting each confirm)",
            started.elapsed()
        );
        for (i, f) in got.iter().enumerate() {
            assert_eq!(
                &f[..],
                &(i as u32).to_be_bytes()[..],
                "frame {i} out of order"
            );
        }

        // many senders at once share the confirm channel: each one's frames stay in order
        let started = std::time::Instant::now();
        let mut senders = Vec::new();
        for t in 0..20u8 {
            let a = a.clone();
            senders.push(tokio::spawn(async move {
                for i in 0..50u8 {
                    a.send("nb", Bytes::from(vec![t, i])).await.expect("send");
                }
            }));
        }
        let mut next = [0u8; 20];
        for _ in 0..1000 {
            let f = rx.next().await.expect("frame");
            let (t, i) = (usize::from(f[0]), f[1]);
            assert_eq!(i, next[t], "sender {t} out of order");
            next[t] += 1;
        }
        for s in senders {
            s.await.expect("sender");
        }
        eprintln!(
            "amqp: 1000 confirmed, mandatory sends from 20 concurrent senders in {:?}",
            started.elapsed()
        );

        // a frame nobody can receive fails its send instead of vanishing
        let e = a
            .send("nobody", Bytes::from_static(b"x"))
            .await
            .unwrap_err();
        assert!(matches!(e, TransportError::Broker(_)), "{e}");
        // too large for the documented bound: refused before sending
        let e = a
            .send("nb", Bytes::from(vec![0u8; MAX_MESSAGE + 1]))
            .await
            .unwrap_err();
        assert!(matches!(e, TransportError::TooLarge { .. }), "{e}");
        // a second inbox under the same node id is refused (the queue is exclusive)
        assert!(a.serve("nb", stop.clone()).await.is_err());
        // and the first one still works
        a.send("nb", Bytes::from_static(b"still"))
            .await
            .expect("send");
        assert_eq!(&rx.next().await.expect("frame")[..], b"still");

        // broker down: sends fail fast with Unavailable, and keep failing fast
        tokio::task::block_in_place(|| server.kill());
        eventually(
            Duration::from_secs(10),
            "send fails as unavailable",
            || async {
                match a.send("nb", Bytes::from_static(b"lost")).await {
                    Err(TransportError::Unavailable(_)) => Some(()),
                    _ => None,
                }
            },
        )
        .await;
        for _ in 0..3 {
            let r = tokio::time::timeout(
                Duration::from_secs(5),
                a.send("nb", Bytes::from_static(b"lost")),
            )
            .await
            .expect("a send while the broker is down does not hang");
            assert!(matches!(r, Err(TransportError::Unavailable(_))), "{r:?}");
        }
        eventually(Duration::from_secs(10), "link reports down", || async {
            (!a.is_connected()).then_some(())
        })
        .await;

        // broker back: both transports reconnect, the inbox is consumed again
        tokio::task::block_in_place(|| server.restart());
        eventually(Duration::from_secs(60), "send after restart", || async {
            a.send("nb", Bytes::from_static(b"after")).await.ok()
        })
        .await;
        let f = tokio::time::timeout(Duration::from_secs(10), rx.next())
            .await
            .expect("frame after restart")
            .expect("inbox open");
        assert_eq!(&f[..], b"after");
        // and the other direction, on b's reconnected publisher
        let mut rxa = a.serve("na", stop.clone()).await.expect("serve na");
        b.send("na", Bytes::from_static(b"back"))
            .await
            .expect("b sends");
        assert_eq!(&rxa.next().await.expect("frame")[..], b"back");
        stop.cancel();
    });
}

fn mqant_module(uri: &str, kind: &str, id: &str) -> ModuleConfig {
    let mut m = ModuleConfig::new(kind);
    m.id = Some(id.into());
    m.bus = Some(ModuleBusConfig {
        kind: "amqp".into(),
        mode: "mqant".into(),
        uri: uri.into(),
        exchange: "mqant".into(),
        exchange_type: "direct".into(),
        queue: id.into(),
        binding_key: id.into(),
        consumer_tag: id.into(),
    });
    m
}

/// The warren module mqant clients call: `Auth`, instance `Auth001`.
fn auth_module(count: Arc<AtomicUsize>) -> Module {
    Module::builder("Auth", count)
        .handler(
            "HD_Login",
            |_cx: Context<Arc<AtomicUsize>>, Json(v): Json<Value>| async move {
                Ok::<_, CallError>(format!(
                    "login success {}",
                    v["userName"].as_str().unwrap_or("?")
                ))
            },
        )
        .handler(
            "HD_Who",
            |cx: Context<Arc<AtomicUsize>>, Json(_v): Json<Value>| async move {
                let s = cx.session();
                Ok::<_, CallError>(json!({
                    "sid": s.map(|s| s.id.to_string()),
                    "uid": s.and_then(|s| s.uid.clone()),
                    "gate": s.map(|s| s.gate.to_string()),
                }))
            },
        )
        .handler(
            "HD_Count",
            |cx: Context<Arc<AtomicUsize>>, Json(v): Json<Value>| async move {
                let n = cx.state().fetch_add(1, Ordering::SeqCst) + 1;
                Ok::<_, CallError>(json!({"n": n, "args": v}))
            },
        )
        .build()
}

fn peer(name: &str) -> String {
    format!("{}/tests/peers/{name}", env!("CARGO_MANIFEST_DIR"))
}

/// Run the pika mqant client with `plan` against `Auth001`; returns the raw ResultInfo texts.
async fn mqant_client(url: &str, plan: Value) -> Vec<String> {
    let out = tokio::time::timeout(
        Duration::from_secs(90),
        tokio::process::Command::new("python3")
            .arg(peer("mqant_client.py"))
            .args([url, "mqant", "direct", "Auth001", &plan.to_string()])
            .kill_on_drop(true)
            .output(),
    )
    .await
    .expect("the mqant client finishes")
    .expect("python3 runs");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "mqant client failed: {stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: Value = serde_json::from_str(stdout.trim()).expect("client output is JSON");
    v["replies"]
        .as_array()
        .expect("replies")
        .iter()
        .map(|r| r.as_str().expect("raw reply").to_owned())
        .collect()
}

fn reply_for<'a>(replies: &'a [String], cid: &str) -> Option<&'a str> {
    replies
        .iter()
        .find(|r| serde_json::from_str::<Value>(r).is_ok_and(|v| v["Cid"] == cid))
        .map(String::as_str)
}

/// The pika mqant server serving `Login001`, with the lines it prints.
struct PeerServer {
    child: tokio::process::Child,
    lines: mpsc::Receiver<String>,
}

impl PeerServer {
    async fn start(url: &str) -> PeerServer {
        let mut child = tokio::process::Command::new("python3")
            .arg(peer("mqant_server.py"))
            .args([url, "mqant", "direct", "Login001", "Login001"])
            .stdout(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .expect("python3 runs");
        let stdout = child.stdout.take().expect("stdout");
        let (tx, mut lines) = mpsc::channel(256);
        tokio::spawn(async move {
            let mut r = BufReader::new(stdout).lines();
            while let Ok(Some(l)) = r.next_line().await {
                if tx.send(l).await.is_err() {
                    break;
                }
            }
        });
        let first = tokio::time::timeout(Duration::from_secs(30), lines.recv())
            .await
            .expect("the mqant server starts");
        assert_eq!(first.as_deref(), Some("READY"));
        PeerServer { child, lines }
    }

    /// The next message the peer received.
    async fn next_call(&mut self) -> Value {
        let l = tokio::time::timeout(Duration::from_secs(10), self.lines.recv())
            .await
            .expect("the peer reports a call")
            .expect("peer output open");
        serde_json::from_str(&l).expect("peer line is JSON")
    }

    async fn stop(mut self) {
        let _ = self.child.kill().await;
    }
}

fn session() -> Arc<Session> {
    Arc::new(
        Session::from_export_map(
            &json!({
                "IP": "127.0.0.1:53422", "Network": "tcp", "Serverid": "Gate001",
                "Sessionid": "8f3c0b6e-1d2a-4c3b-9e8f-0a1b2c3d4e5f", "Settings": {"room": "mqant"},
                "Userid": "bob"
            }),
            warren::session::Network::Tcp,
        )
        .expect("session"),
    )
}

#[test]
fn mqant_bridge_serves_and_calls_pika_peers_across_a_restart() {
    let mut server = Rabbit::start();
    let url = server.url();
    runtime().block_on(async move {
        let count = Arc::new(AtomicUsize::new(0));
        let mut cfg = Config::default();
        cfg.http.enabled = false;
        cfg.listeners.clear();
        let mut auth = ModuleConfig::new("Auth");
        auth.id = Some("Auth001".into());
        let node = Node::builder(cfg)
            .module(auth_module(count.clone()), auth)
            .start()
            .await
            .expect("node");
        let h = node.handle().clone();
        let stop = CancellationToken::new();
        let bridge = MqantBridge::start(
            h.clone(),
            vec![mqant_module(&url, "Auth", "Auth001")],
            vec![mqant_module(&url, "Login", "Login001")],
            stop.clone(),
        )
        .await
        .expect("bridge");
        assert_eq!(bridge.served(), ["Auth001".to_owned()]);
        assert_eq!(bridge.clients().len(), 1);

        // ---- warren serves, a pika mqant client calls ----
        let export = json!({"IP":"127.0.0.1:53422","Network":"tcp","Serverid":"Gate001",
            "Sessionid":"8f3c0b6e-1d2a-4c3b-9e8f-0a1b2c3d4e5f","Settings":{},"Userid":"bob"});
        let plan = json!([
            {"cid": "c-login", "fn": "HD_Login",
             "args": [export, {"userName": "alice", "passWord": "Hello,anyone!"}], "wait": true},
            {"cid": "c-nope", "fn": "HD_Nope", "wait": true},
            {"cid": "c-who", "fn": "HD_Who", "args": [export, {}], "wait": true},
            {"cid": "c-expired", "fn": "HD_Count", "expired_in_ms": -10000},
            {"raw": "this is not json {"},
            {"raw": "{\"Cid\":\"c-shape\",\"Fn\":7}"},
            {"raw": "[1,2,3]"},
            {"cid": "c-nr", "fn": "HD_Count", "reply": false},
            {"cid": "c-prop", "fn": "HD_Count", "args": [{}, {"k": 1}], "via_property": true, "wait": true},
            {"cid": "c-arity", "fn": "HD_Count", "args": [1, 2, 3], "wait": true},
            {"cid": "c-after", "fn": "HD_Login", "args": [{}, {"userName": "carol"}], "wait": true}
        ]);
        let replies = mqant_client(&url, plan).await;
        assert_eq!(
            reply_for(&replies, "c-login"),
            Some(r#"{"Cid":"c-login","Error":"","Result":"login success alice"}"#)
        );
        assert_eq!(
            reply_for(&replies, "c-nope"),
            Some(r#"{"Cid":"c-nope","Error":"Remote function(HD_Nope) not found","Result":null}"#)
        );
        let who: Value = serde_json::from_str(reply_for(&replies, "c-who").expect("who")).unwrap();
        assert_eq!(
            who["Result"],
            json!({"sid": "8f3c0b6e-1d2a-4c3b-9e8f-0a1b2c3d4e5f", "uid": "bob", "gate": "Gate001"})
        );
        let prop: Value = serde_json::from_str(reply_for(&replies, "c-prop").expect("prop")).unwrap();
        assert_eq!(prop["Error"], "");
        assert_eq!(prop["Result"]["args"], json!({"k": 1}));
        let arity: Value =
            serde_json::from_str(reply_for(&replies, "c-arity").expect("arity")).unwrap();
        // mqant's arity error, word for word, and the handler never ran
        assert_eq!(
            arity["Error"],
            "The number of params [%!s(float64=1) %!s(float64=2) %!s(float64=3)] is not \
             adapted.<func(map[string]interface {}, interface {}) (interface {}, string) Value>"
        );
        assert_eq!(arity["Result"], Value::Null);
        assert!(reply_for(&replies, "c-after").is_some(), "{replies:?}");
        // the expired call got no reply and never ran; the CallNR ran without a reply
        assert!(reply_for(&replies, "c-expired").is_none(), "{replies:?}");
        assert!(reply_for(&replies, "c-nr").is_none(), "{replies:?}");
        assert!(reply_for(&replies, "c-shape").is_none(), "{replies:?}");
        eventually(Duration::from_secs(5), "CallNR and calls ran", || async {
            (count.load(Ordering::SeqCst) == 2).then_some(())
        })
        .await;

        // ---- a pika mqant server serves Login001, warren calls it ----
        let mut peer = PeerServer::start(&url).await;
        let login = |body: Value| Bytes::from(body.to_string());
        let r = h
            .call(
                "Login",
                "HD_Login",
                None,
                login(json!({"userName": "alice", "passWord": "x"})),
                Some(Duration::from_secs(5)),
            )
            .await
            .expect("Login answers");
        assert_eq!(&r[..], br#""login success alice""#);
        // what went over the wire is mqant's CallInfo
        let seen = peer.next_call().await;
        let call: Value = serde_json::from_str(seen["body"].as_str().expect("body")).unwrap();
        let text = seen["body"].as_str().unwrap();
        assert!(text.starts_with(r#"{"Cid":""#), "{text}");
        let cid = uuid::Uuid::parse_str(call["Cid"].as_str().expect("cid")).expect("uuid");
        assert_eq!(cid.get_version_num(), 4);
        assert_eq!(call["Fn"], "HD_Login");
        assert_eq!(call["Args"], json!([{}, {"userName": "alice", "passWord": "x"}]));
        assert_eq!(call["Reply"], true);
        assert_eq!(call["Result"], json!({"Cid": "", "Error": "", "Result": null}));
        let expired = call["Expired"].as_i64().expect("Expired");
        let received = seen["received_ms"].as_i64().expect("received");
        assert!(expired > received && expired <= received + 5_000, "{expired} vs {received}");
        let queue = seen["headers"]["reply_to"].as_str().expect("reply_to header");
        assert!(queue.starts_with("amq.gen-"), "{queue}");
        assert_eq!(seen["reply_to_property"], queue);
        assert_eq!(seen["content_type"], "text/plain");
        assert_eq!(seen["delivery_mode"], 1);

        // a session travels as the export map
        let s = session();
        let r = h
            .call("Login", "HD_Who", Some(s.clone()), login(json!({})), None)
            .await
            .expect("HD_Who");
        assert_eq!(serde_json::from_slice::<Value>(&r).unwrap(), s.export_map());
        peer.next_call().await;
        // errors come back typed
        let e = h
            .call("Login", "HD_Nope", None, login(json!({})), None)
            .await
            .unwrap_err();
        assert_eq!(e, CallError::HandlerNotFound("HD_Nope".into()));
        peer.next_call().await;
        let e = h
            .call("Login", "HD_Fail", None, login(json!({})), None)
            .await
            .unwrap_err();
        assert_eq!(e, CallError::App("No room".into()));
        peer.next_call().await;
        // a body that is not JSON travels as a string
        let r = h
            .call("Login", "HD_Who", None, Bytes::from_static(b"plain"), None)
            .await
            .expect("HD_Who");
        assert_eq!(&r[..], b"{}");
        let seen = peer.next_call().await;
        let call: Value = serde_json::from_str(seen["body"].as_str().unwrap()).unwrap();
        assert_eq!(call["Args"][1], "plain");
        // a peer that never answers: Timeout at the deadline
        let e = h
            .call(
                "Login",
                "HD_Silent",
                None,
                login(json!({})),
                Some(Duration::from_millis(800)),
            )
            .await
            .unwrap_err();
        assert_eq!(e, CallError::Timeout);
        peer.next_call().await;
        // CallNR: sent with Reply false
        h.call_nr("Login", "HD_Login", None, login(json!({"userName": "x"})))
            .await
            .expect("call_nr");
        let seen = peer.next_call().await;
        let call: Value = serde_json::from_str(seen["body"].as_str().unwrap()).unwrap();
        assert_eq!(call["Reply"], false);

        // ---- broker restart: calls fail fast while it is down, both sides come back ----
        peer.stop().await;
        tokio::task::block_in_place(|| server.kill());
        eventually(Duration::from_secs(10), "calls fail as unavailable", || async {
            match h
                .call("Login", "HD_Login", None, login(json!({})), Some(Duration::from_secs(5)))
                .await
            {
                Err(CallError::Unavailable(_)) => Some(()),
                _ => None,
            }
        })
        .await;
        tokio::task::block_in_place(|| server.restart());
        eventually(Duration::from_secs(60), "bridge reconnected", || async {
            bridge.is_connected().then_some(())
        })
        .await;
        let _peer = PeerServer::start(&url).await;
        eventually(Duration::from_secs(30), "Login answers again", || async {
            h.call(
                "Login",
                "HD_Login",
                None,
                login(json!({"userName": "dave"})),
                Some(Duration::from_secs(2)),
            )
            .await
            .ok()
            .filter(|r| &r[..] == br#""login success dave""#)
        })
        .await;
        let plan = json!([{"cid": "c-back", "fn": "HD_Login", "args": [{}, {"userName": "erin"}], "wait": true}]);
        let replies = eventually(Duration::from_secs(30), "Auth001 served again", || async {
            let r = mqant_client(&url, plan.clone()).await;
            reply_for(&r, "c-back").is_some().then_some(r)
        })
        .await;
        assert_eq!(
            reply_for(&replies, "c-back"),
            Some(r#"{"Cid":"c-back","Error":"","Result":"login success erin"}"#)
        );
        bridge.stop();
        node.shutdown().await;
    });
}

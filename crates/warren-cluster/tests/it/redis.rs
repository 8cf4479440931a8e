//! Tests of `warren_cluster::redis` against a real redis-server (started by the kit) and real
//! Python peers written with redis-py (`tests/peers/`): the bus, the gobase-layout registry
//! (docs/cluster.md, "Registries") and the TianQinS RPC bridge (docs/cluster.md, "Compatibility
//! bridges").

use std::future::Future;
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use futures_util::StreamExt;
use redis::aio::MultiplexedConnection;
use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader, Lines};
use tokio::process::{Child, ChildStdin, ChildStdout, Command};
use tokio::sync::watch;
use tokio::time::{Instant, sleep, timeout};
use tokio_util::sync::CancellationToken;
use warren::config::{Config, ModuleConfig, RedisRpcConfig};
use warren::registry::{NodeRecord, Registry};
use warren::remote::{Transport, TransportError};
use warren::{CallError, Context, Json, Module, Node};
use warren_cluster::redis::{GobaseMember, GobaseRegistry, RedisRpc, RedisTransport};

use crate::kit::{Kind, Server};

/// Upper bound of every wait: a hang guard, not a timing assertion.
const PATIENCE: Duration = Duration::from_secs(30);

async fn eventually<F, Fut>(what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let end = Instant::now() + PATIENCE;
    while !check().await {
        assert!(Instant::now() < end, "timed out waiting until {what}");
        sleep(Duration::from_millis(50)).await;
    }
}

async fn wait_for<T: Clone>(
    what: &str,
    rx: &mut watch::Receiver<T>,
    pred: impl FnMut(&T) -> bool,
) -> T {
    match timeout(PATIENCE, rx.wait_for(pred)).await {
        Ok(Ok(v)) => v.clone(),
        _ => panic!("timed out waiting until {what}"),
    }
}

async fn raw(url: &str, db: i64) -> MultiplexedConnection {
    redis::Client::open(format!("{url}/{db}"))
        .expect("client")
        .get_multiplexed_async_connection()
        .await
        .expect("raw connection")
}

async fn subscribe(url: &str, channel: &str) -> redis::aio::PubSubStream {
    let mut ps = redis::Client::open(url)
        .expect("client")
        .get_async_pubsub()
        .await
        .expect("pubsub");
    ps.subscribe(channel).await.expect("subscribe");
    ps.into_on_message()
}

async fn next_payload(sub: &mut redis::aio::PubSubStream) -> String {
    let msg = timeout(PATIENCE, sub.next())
        .await
        .expect("a message in time")
        .expect("subscription open");
    String::from_utf8(msg.get_payload_bytes().to_vec()).expect("utf-8")
}

fn ids(nodes: &[NodeRecord]) -> Vec<&str> {
    nodes.iter().map(|n| n.id.as_str()).collect()
}

fn record(id: &str, address: Option<&str>) -> NodeRecord {
    NodeRecord {
        id: id.into(),
        version: "test".into(),
        address: address.map(str::to_owned),
        started_at_ms: 1,
        tags: vec![],
        instances: vec![warren::registry::InstanceRecord {
            module: "Chat".into(),
            id: format!("Chat-{id}"),
            ..Default::default()
        }],
    }
}

/// A Python peer from `tests/peers/`, spoken to by JSON lines.
struct Peer {
    _child: Child,
    stdin: ChildStdin,
    lines: Lines<BufReader<ChildStdout>>,
}

impl Peer {
    fn start(script: &str, args: &[String]) -> Peer {
        let path = format!("{}/tests/peers/{script}", env!("CARGO_MANIFEST_DIR"));
        let mut child = Command::new("python3")
            .arg("-u")
            .arg(&path)
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .expect("python3 runs the peer");
        let stdin = child.stdin.take().expect("stdin");
        let stdout = child.stdout.take().expect("stdout");
        Peer {
            _child: child,
            stdin,
            lines: BufReader::new(stdout).lines(),
        }
    }

    async fn send(&mut self, line: &str) {
        self.stdin
            .write_all(format!("{line}\n").as_bytes())
            .await
            .expect("peer stdin");
        self.stdin.flush().await.expect("peer stdin");
    }

    /// Read events until one satisfies `pred`.
    async fn expect(&mut self, what: &str, pred: impl Fn(&Value) -> bool) -> Value {
        let end = Instant::now() + PATIENCE;
        loop {
            let left = end.saturating_duration_since(Instant::now());
            let line = match timeout(left, self.lines.next_line()).await {
                Ok(Ok(Some(l))) => l,
                Ok(Ok(None)) => panic!("peer exited while waiting for {what}"),
                Ok(Err(e)) => panic!("peer output: {e}"),
                Err(_) => panic!("timed out waiting for {what}"),
            };
            let v: Value = serde_json::from_str(&line).expect("peer speaks JSON lines");
            if pred(&v) {
                return v;
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// the bus

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transport_keeps_order_fails_fast_while_down_and_resumes() {
    let mut server = Server::start(Kind::Redis);
    let url = server.url();
    let a = RedisTransport::connect(&url, "t").await.expect("connect a");
    let b = RedisTransport::connect(&url, "t").await.expect("connect b");
    assert_eq!(b.inbox("b"), "t:node:b");
    // more frames than the inbox queue holds: delivery waits for room rather than buffering
    let stop = CancellationToken::new();
    let mut rx = b.serve("b", stop.clone()).await.expect("serve");

    let sender = {
        let a = a.clone();
        tokio::spawn(async move {
            for i in 0..3000u32 {
                a.send("b", Bytes::from(i.to_be_bytes().to_vec()))
                    .await
                    .expect("send while up");
            }
        })
    };
    for i in 0..3000u32 {
        let f = timeout(PATIENCE, rx.next())
            .await
            .expect("frame in time")
            .expect("inbox open");
        assert_eq!(&f[..], &i.to_be_bytes()[..], "frame {i} out of order");
    }
    sender.await.expect("sender");

    let too_big = Bytes::from(vec![0u8; a.max_frame() + 1]);
    assert!(matches!(
        a.send("b", too_big).await,
        Err(TransportError::TooLarge { .. })
    ));

    // an inbox nobody serves expires instead of growing forever
    a.send("gone", Bytes::from_static(b"x"))
        .await
        .expect("send");
    let mut c = raw(&url, 0).await;
    let ttl: i64 = redis::cmd("PTTL")
        .arg("t:node:gone")
        .query_async(&mut c)
        .await
        .expect("pttl");
    assert!(ttl > 0 && ttl <= 60_000, "inbox ttl {ttl}");

    tokio::task::block_in_place(|| server.kill());
    let r = timeout(
        Duration::from_secs(10),
        a.send("b", Bytes::from_static(b"down")),
    )
    .await
    .expect("a send while redis is down must not hang");
    assert!(
        matches!(r, Err(TransportError::Unavailable(_))),
        "while down: {r:?}"
    );

    tokio::task::block_in_place(|| server.restart());
    eventually("sends succeed after the restart", || async {
        a.send("b", Bytes::from_static(b"after")).await.is_ok()
    })
    .await;
    let f = timeout(PATIENCE, rx.next())
        .await
        .expect("the served inbox reconnects")
        .expect("inbox open");
    assert_eq!(&f[..], b"after");
    stop.cancel();
}

/// `/readyz` asks the bus and the registry whether Redis is up: both say no soon after it dies
/// (the inbox's `BLPOP` connection and the registry's watcher fail), and yes once it is back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transport_and_registry_say_when_redis_is_down_and_back() {
    let mut server = Server::start(Kind::Redis);
    let url = server.url();
    let bus = RedisTransport::connect(&url, "up")
        .await
        .expect("transport");
    let stop = CancellationToken::new();
    let _inbox = bus.serve("n1", stop.clone()).await.expect("serve");
    let registry = GobaseRegistry::connect(&url, "cluster")
        .await
        .expect("registry");
    assert!(bus.is_connected() && registry.is_connected());

    tokio::task::block_in_place(|| server.kill());
    eventually("both say redis is down", || async {
        !bus.is_connected() && !registry.is_connected()
    })
    .await;

    tokio::task::block_in_place(|| server.restart());
    eventually("both say redis is back", || async {
        bus.is_connected() && registry.is_connected()
    })
    .await;
    stop.cancel();
}

// ---------------------------------------------------------------------------------------------
// the gobase registry

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gobase_layout_vectors_and_liveness_bound() {
    let server = Server::start(Kind::Redis);
    let url = server.url();
    let reg = GobaseRegistry::connect(&url, "test-service")
        .await
        .expect("connect");
    let k = reg.keys();
    assert_eq!(
        [&k.zset, &k.list, &k.channel, &k.locker],
        [
            "test-service",
            "_{test-service}_list_",
            "_{test-service}_channel_",
            "_{test-service}_locker_"
        ]
    );
    let mut c = raw(&url, 0).await;

    // the liveness example of docs/cluster.md: now = 1700000008000; 1700000000000 is live (bound
    // included), 1699999999999 not
    let _: i64 = redis::cmd("ZADD")
        .arg("test-service")
        .arg(1_700_000_000_000_i64)
        .arg("old&edge&10.0.0.1&1&tcp")
        .arg(1_699_999_999_999_i64)
        .arg("old&past&10.0.0.1&2&tcp")
        .query_async(&mut c)
        .await
        .expect("zadd");
    let live = reg
        .live_members_at(Some(1_700_000_008_000.0))
        .await
        .expect("read");
    assert_eq!(live, ["old&edge&10.0.0.1&1&tcp"]);

    // registration: member format, list key, channel message, record hash
    let mut sub = subscribe(&url, "_{test-service}_channel_").await;
    let n1 = record("n1", None);
    reg.register(n1.clone()).await.expect("register");
    assert_eq!(
        next_payload(&mut sub).await,
        "reg warren&n1&127.0.0.1&0&warren"
    );
    let list: String = redis::cmd("GET")
        .arg("_{test-service}_list_")
        .query_async(&mut c)
        .await
        .expect("list");
    assert_eq!(list, "warren&n1&127.0.0.1&0&warren");
    let json: String = redis::cmd("HGET")
        .arg("_{test-service}_warren_nodes_")
        .arg("n1")
        .query_async(&mut c)
        .await
        .expect("record");
    assert_eq!(
        serde_json::from_str::<NodeRecord>(&json).expect("record json"),
        n1
    );

    // liveness against server time: scores written by a script from TIME
    let _: () = redis::Script::new(
        r"local t = redis.call('TIME')
          local now = tonumber(t[1]) * 1000 + tonumber(t[2]) / 1000
          redis.call('ZADD', KEYS[1], now - 6000, 'go&fresh&10.0.0.2&7001&tcp')
          redis.call('ZADD', KEYS[1], now - 8100, 'go&stale&10.0.0.2&7002&tcp')",
    )
    .key("test-service")
    .invoke_async(&mut c)
    .await
    .expect("script");
    let live = reg.live_members_at(None).await.expect("read");
    assert!(
        live.iter().any(|m| m == "go&fresh&10.0.0.2&7001&tcp"),
        "{live:?}"
    );
    assert!(!live.iter().any(|m| m.starts_with("go&stale")), "{live:?}");
    assert!(!live.iter().any(|m| m.starts_with("old&")), "{live:?}");

    // watching starts the checker: it takes the lock, sees the list changed, announces `check`
    // and purges the stale members
    let mut services = reg.services();
    let mut nodes = reg.watch();
    eventually("the checker holds the lock", || {
        let mut c = c.clone();
        async move {
            redis::cmd("EXISTS")
                .arg("_{test-service}_locker_")
                .query_async::<bool>(&mut c)
                .await
                .unwrap_or(false)
        }
    })
    .await;
    let lock: String = redis::cmd("GET")
        .arg("_{test-service}_locker_")
        .query_async(&mut c)
        .await
        .expect("lock value");
    assert!(
        lock.contains(&format!(":{}:", std::process::id())),
        "lock value {lock}"
    );
    assert_eq!(lock.rsplit(':').next().map(str::len), Some(8), "{lock}");
    assert_eq!(next_payload(&mut sub).await, "check");
    eventually("stale members are purged", || {
        let mut c = c.clone();
        async move {
            let all: Vec<String> = redis::cmd("ZRANGE")
                .arg("test-service")
                .arg(0)
                .arg(-1)
                .query_async(&mut c)
                .await
                .expect("zrange");
            !all.iter()
                .any(|m| m.starts_with("old&") || m.starts_with("go&stale"))
        }
    })
    .await;

    // Go members are services, not nodes
    let s = wait_for("the fresh Go member is listed", &mut services, |s| {
        s.iter().any(|m| m.id == "fresh")
    })
    .await;
    assert!(s.iter().any(|m| m.id == "n1" && m.scheme == "warren"));
    assert_eq!(ids(&nodes.borrow_and_update()), ["n1"]);
    // it was scored 6 s in the past: it expires within seconds, through the checker
    wait_for("the fresh Go member expires", &mut services, |s| {
        !s.iter().any(|m| m.id == "fresh")
    })
    .await;
    assert_eq!(ids(&nodes.borrow()), ["n1"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gobase_nodes_see_each_other_change_and_deregister() {
    let server = Server::start(Kind::Redis);
    let url = server.url();
    let r1 = GobaseRegistry::connect(&url, "cluster").await.expect("r1");
    let r2 = GobaseRegistry::connect(&url, "cluster").await.expect("r2");
    let e = r1
        .register(record("bad&id", None))
        .await
        .expect_err("'&' is refused")
        .to_string();
    assert!(e.contains("'&'"), "{e}");

    let n1 = record("n1", Some("10.0.0.5:7001"));
    let n2 = record("n2", None);
    r1.register(n1.clone()).await.expect("n1");
    r2.register(n2.clone()).await.expect("n2");
    let mut w1 = r1.watch();
    let mut w2 = r2.watch();
    for w in [&mut w1, &mut w2] {
        let nodes = wait_for("both nodes are seen", w, |n| n.len() == 2).await;
        assert_eq!(*nodes, vec![n1.clone(), n2.clone()]);
    }
    let mut c = raw(&url, 0).await;
    let list: String = redis::cmd("GET")
        .arg("_{cluster}_list_")
        .query_async(&mut c)
        .await
        .expect("list");
    assert_eq!(
        list,
        "warren&n1&10.0.0.5&7001&warren,warren&n2&127.0.0.1&0&warren"
    );

    // a changed record reaches the other node (no waiting for a poll)
    let mut n1b = n1.clone();
    n1b.tags = vec!["blue".into()];
    r1.register(n1b.clone()).await.expect("n1 again");
    wait_for("the change is seen", &mut w2, |n| n.first() == Some(&n1b)).await;

    // deregistration announces `dereg <member>` and changes the list
    let mut sub = subscribe(&url, "_{cluster}_channel_").await;
    r2.deregister("n2").await.expect("deregister");
    assert_eq!(
        next_payload(&mut sub).await,
        "dereg warren&n2&127.0.0.1&0&warren"
    );
    let list: String = redis::cmd("GET")
        .arg("_{cluster}_list_")
        .query_async(&mut c)
        .await
        .expect("list");
    assert_eq!(list, "warren&n1&10.0.0.5&7001&warren");
    let has: bool = redis::cmd("HEXISTS")
        .arg("_{cluster}_warren_nodes_")
        .arg("n2")
        .query_async(&mut c)
        .await
        .expect("hexists");
    assert!(!has, "the record is deleted with the member");
    wait_for("n2 left", &mut w1, |n| ids(n) == ["n1"]).await;
    // and the keepalive stopped: n2 does not come back
    let before = r1.live_members_at(None).await.expect("read");
    assert_eq!(before, ["warren&n1&10.0.0.5&7001&warren"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gobase_node_without_keepalive_disappears() {
    let server = Server::start(Kind::Redis);
    let url = server.url();
    let r1 = GobaseRegistry::connect(&url, "cluster").await.expect("r1");
    let r2 = GobaseRegistry::connect(&url, "cluster").await.expect("r2");
    r1.register(record("n1", None)).await.expect("n1");
    r2.register(record("n2", None)).await.expect("n2");
    let mut w1 = r1.watch();
    wait_for("both nodes are seen", &mut w1, |n| n.len() == 2).await;

    // the process of n2 dies: no deregistration, its keepalive just stops
    let mut sub = subscribe(&url, "_{cluster}_channel_").await;
    drop(r2);
    wait_for("n2 expires", &mut w1, |n| ids(n) == ["n1"]).await;
    // found by the checker (not announced by n2)
    assert_eq!(next_payload(&mut sub).await, "check");
    let mut c = raw(&url, 0).await;
    eventually("n2's member and record are purged", || {
        let mut c = c.clone();
        async move {
            let score: Option<f64> = redis::cmd("ZSCORE")
                .arg("cluster")
                .arg("warren&n2&127.0.0.1&0&warren")
                .query_async(&mut c)
                .await
                .expect("zscore");
            let has: bool = redis::cmd("HEXISTS")
                .arg("_{cluster}_warren_nodes_")
                .arg("n2")
                .query_async(&mut c)
                .await
                .expect("hexists");
            score.is_none() && !has
        }
    })
    .await;
    let _ = &mut c;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gobase_go_service_is_listed_as_a_service_not_a_node() {
    let server = Server::start(Kind::Redis);
    let url = server.url();
    let reg = GobaseRegistry::connect(&url, "mixed")
        .await
        .expect("connect");
    reg.register(record("n1", None)).await.expect("n1");
    let mut services = reg.services();
    let mut nodes = reg.watch();

    let mut go = Peer::start(
        "gobase_service.py",
        &[
            server.port.to_string(),
            "mixed".into(),
            "gate&gate1&10.0.0.5&7001&tcp".into(),
        ],
    );
    go.expect("the Go service registered", |v| v["event"] == "registered")
        .await;
    let gate = GobaseMember {
        name: "gate".into(),
        id: "gate1".into(),
        addr: "10.0.0.5".into(),
        port: 7001,
        scheme: "tcp".into(),
    };
    let s = wait_for("the Go service is listed", &mut services, |s| {
        s.contains(&gate)
    })
    .await;
    // sorted by (id, name)
    let order: Vec<&str> = s.iter().map(|m| m.id.as_str()).collect();
    assert_eq!(order, ["gate1", "n1"]);
    assert_eq!(ids(&nodes.borrow_and_update()), ["n1"]);

    go.send("quit").await;
    wait_for("the Go service left", &mut services, |s| !s.contains(&gate)).await;
    assert_eq!(ids(&nodes.borrow()), ["n1"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gobase_records_come_back_after_a_redis_restart() {
    let mut server = Server::start(Kind::Redis);
    let url = server.url();
    let r1 = GobaseRegistry::connect(&url, "cluster").await.expect("r1");
    let r2 = GobaseRegistry::connect(&url, "cluster").await.expect("r2");
    r1.register(record("n1", None)).await.expect("n1");
    r2.register(record("n2", None)).await.expect("n2");
    let mut w1 = r1.watch();
    let mut w2 = r2.watch();
    for w in [&mut w1, &mut w2] {
        wait_for("both nodes are seen", w, |n| n.len() == 2).await;
    }

    tokio::task::block_in_place(|| server.kill());
    eventually("reads fail while redis is down", || async {
        r1.live_members_at(None).await.is_err()
    })
    .await;
    assert_eq!(ids(&w1.borrow()), ["n1", "n2"], "the last list is kept");

    // nothing is persisted: the restarted server is empty until the keepalives put the records
    // back; meanwhile the watchers keep both nodes
    tokio::task::block_in_place(|| server.restart());
    let mut c = raw(&url, 0).await;
    eventually("both records are back in redis", || {
        let mut c = c.clone();
        let w1 = w1.clone();
        async move {
            assert_eq!(ids(&w1.borrow()), ["n1", "n2"], "no flap during recovery");
            let live: Vec<String> = redis::cmd("ZRANGE")
                .arg("cluster")
                .arg(0)
                .arg(-1)
                .query_async(&mut c)
                .await
                .unwrap_or_default();
            let recs: i64 = redis::cmd("HLEN")
                .arg("_{cluster}_warren_nodes_")
                .query_async(&mut c)
                .await
                .unwrap_or_default();
            live.len() == 2 && recs == 2
        }
    })
    .await;
    let _ = &mut c;
    let live = r2.live_members_at(None).await.expect("read");
    assert_eq!(
        live.len(),
        2,
        "both members are live after the restart: {live:?}"
    );
    assert_eq!(ids(&w2.borrow()), ["n1", "n2"]);
    // what a newcomer reads comes from redis alone
    let r3 = GobaseRegistry::connect(&url, "cluster").await.expect("r3");
    assert_eq!(ids(&r3.watch().borrow()), ["n1", "n2"]);
}

/// Nodes on the Redis bus and the gobase registry: a call from one node reaches a module on
/// the other, and stops finding it once that node has left.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nodes_call_each_other_over_the_redis_bus_and_registry() {
    let server = Server::start(Kind::Redis);
    let url = server.url();
    let start = |id: &'static str, with_x: bool| {
        let url = url.clone();
        async move {
            let mut config = Config::default();
            config.http.enabled = false;
            config.node.id = id.into();
            config.node.gate_id = format!("Gate-{id}");
            let transport = RedisTransport::connect(&url, "warren").await.expect("bus");
            let registry = GobaseRegistry::connect(&url, "warren")
                .await
                .expect("registry");
            let mut b = Node::builder(config)
                .transport(transport)
                .registry(registry.clone());
            if with_x {
                let m = Module::builder("X", ())
                    .handler("echo", |_cx: Context, body: Bytes| async move {
                        Ok::<_, CallError>(body)
                    })
                    .build();
                b = b.module(m, ModuleConfig::new("X"));
            }
            (b.start().await.expect("node"), registry)
        }
    };
    let (a, _ra) = start("a", true).await;
    let (b, rb) = start("b", false).await;
    let mut nodes = rb.watch();
    wait_for("b sees a", &mut nodes, |n| ids(n) == ["a", "b"]).await;
    let body = Bytes::from_static(br#"{"hello":"over redis"}"#);
    let r = b
        .handle()
        .call("X", "echo", None, body.clone(), Some(PATIENCE))
        .await;
    assert_eq!(r, Ok(body.clone()));

    a.shutdown().await;
    wait_for("a left", &mut nodes, |n| ids(n) == ["b"]).await;
    // b's router follows its registry view: a call already routed to a fails with NodeLost,
    // then there is no instance left
    eventually("no instance of X is left", || {
        let h = b.handle().clone();
        let body = body.clone();
        async move {
            match h.call("X", "echo", None, body, Some(PATIENCE)).await {
                Err(CallError::ServiceNotFound(_)) => true,
                Err(CallError::NodeLost(n)) if n == "a" => false,
                r => panic!("after a left: {r:?}"),
            }
        }
    })
    .await;
    b.shutdown().await;
}

// ---------------------------------------------------------------------------------------------
// the TianQinS RPC bridge

/// Calls the test module saw: (handler, args).
type Seen = Arc<Mutex<Vec<(String, Vec<Value>)>>>;

/// Module `X`: `test` mirrors the Go demo function (`"args: a, b."`), `pair` returns an array,
/// `mark` records its call.
async fn node_with_module_x(id: &str) -> (Node, Seen) {
    let seen: Seen = Arc::default();
    let m = Module::builder("X", seen.clone())
        .handler(
            "test",
            |_cx: Context<Seen>, Json(args): Json<Vec<Value>>| async move {
                let s = |v: Option<&Value>| match v {
                    Some(Value::String(s)) => s.clone(),
                    Some(other) => other.to_string(),
                    None => String::new(),
                };
                Ok::<_, CallError>(json!(format!(
                    "args: {}, {}.",
                    s(args.first()),
                    s(args.get(1))
                )))
            },
        )
        .handler("pair", |_cx: Context<Seen>, _: ()| async move {
            Ok::<_, CallError>(json!([1, 2]))
        })
        .handler(
            "mark",
            |cx: Context<Seen>, Json(args): Json<Vec<Value>>| async move {
                cx.state().lock().expect("seen").push(("mark".into(), args));
                Ok::<_, CallError>(())
            },
        )
        .build();
    let mut config = Config::default();
    config.http.enabled = false;
    config.node.id = id.into();
    let node = Node::builder(config)
        .module(m, ModuleConfig::new("X"))
        .start()
        .await
        .expect("node");
    (node, seen)
}

fn rpc_config(url: &str, topic: &str, db: i64) -> RedisRpcConfig {
    RedisRpcConfig {
        url: url.into(),
        topic: topic.into(),
        db,
        pid: None,
        module: "X".into(),
        reply: "publish".into(),
        reply_via_list: vec![],
    }
}

fn marks(seen: &Seen) -> Vec<Value> {
    seen.lock()
        .expect("seen")
        .iter()
        .filter(|(h, _)| h == "mark")
        .flat_map(|(_, a)| a.clone())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_rpc_answers_go_callers_byte_for_byte() {
    let server = Server::start(Kind::Redis);
    let url = server.url();
    let (node, seen) = node_with_module_x("node-a").await;
    let stop = CancellationToken::new();
    let rpc = RedisRpc::start(
        &rpc_config(&url, "rpc", 1),
        node.handle().clone(),
        stop.clone(),
    )
    .await
    .expect("start");
    assert_eq!(rpc.pid(), "node-a");
    let mut db1 = raw(&url, 1).await;
    let mut replies = subscribe(&url, "test").await;

    // a caller on topic `test` calls rpc.test (docs/cluster.md): the reply is published on `test`
    let _: i64 = redis::cmd("RPUSH")
        .arg("rpc")
        .arg(r#"{"func":"test","args":["arg1","arg2"],"ct":"test","cb":"callback"}"#)
        .query_async(&mut db1)
        .await
        .expect("rpush");
    assert_eq!(
        next_payload(&mut replies).await,
        r#"{"func":"callback","args":["args: arg1, arg2."],"pid":"node-a"}"#
    );

    // an unknown function gets no reply; a handler's array is one return value
    for msg in [
        r#"{"func":"nope","args":[],"ct":"test","cb":"lost"}"#,
        r#"{"func":"pair","args":[],"ct":"test","cb":"cb2"}"#,
    ] {
        let _: i64 = redis::cmd("RPUSH")
            .arg("rpc")
            .arg(msg)
            .query_async(&mut db1)
            .await
            .expect("rpush");
    }
    assert_eq!(
        next_payload(&mut replies).await,
        r#"{"func":"cb2","args":[[1,2]],"pid":"node-a"}"#
    );

    // broadcasts: our own pid is skipped, another pid or none runs
    for msg in [
        r#"{"func":"mark","args":["own"],"pid":"node-a"}"#,
        r#"{"func":"mark","args":["other"],"pid":"node-b"}"#,
        r#"{"func":"mark","args":["nopid"]}"#,
    ] {
        let _: i64 = redis::cmd("PUBLISH")
            .arg("rpc")
            .arg(msg)
            .query_async(&mut db1)
            .await
            .expect("publish");
    }
    eventually("both foreign broadcasts ran", || async {
        marks(&seen).len() >= 2
    })
    .await;
    // one more call through the module's mailbox, then nothing else may have run
    let _: i64 = redis::cmd("RPUSH")
        .arg("rpc")
        .arg(r#"{"func":"test","args":["a","b"],"ct":"test","cb":"cb3"}"#)
        .query_async(&mut db1)
        .await
        .expect("rpush");
    assert_eq!(
        next_payload(&mut replies).await,
        r#"{"func":"cb3","args":["args: a, b."],"pid":"node-a"}"#
    );
    let mut m = marks(&seen);
    m.sort_by_key(|v| v.to_string());
    assert_eq!(m, [json!("nopid"), json!("other")]);

    // a call to our own topic: our own consumer runs it and the reply, published with our
    // pid, still completes the call (callbacks are matched before the pid filter)
    let r = rpc
        .call("rpc", "test", vec![json!("me"), json!("myself")], PATIENCE)
        .await;
    assert_eq!(r, Ok(vec![json!("args: me, myself.")]));

    // with reply_via_list = ["test"] the reply is pushed on the list `test`, as the pymodule
    // expects (database 2 here, so the two endpoints do not compete for the same list)
    let mut cfg = rpc_config(&url, "rpc", 2);
    cfg.reply_via_list = vec!["test".into()];
    let _rpc2 = RedisRpc::start(&cfg, node.handle().clone(), stop.clone())
        .await
        .expect("start");
    let mut db2 = raw(&url, 2).await;
    let _: i64 = redis::cmd("RPUSH")
        .arg("rpc")
        .arg(r#"{"func":"test","args":["arg1","arg2"],"ct":"test","cb":"callback"}"#)
        .query_async(&mut db2)
        .await
        .expect("rpush");
    let popped: Option<(String, String)> = redis::cmd("BLPOP")
        .arg("test")
        .arg(20)
        .query_async(&mut db2)
        .await
        .expect("blpop");
    assert_eq!(
        popped.map(|(_, v)| v).as_deref(),
        Some(r#"{"func":"callback","ct":"rpc","cb":"","args":["args: arg1, arg2."]}"#)
    );

    // warren's own calls: a callback name per call, a typed error at the deadline
    let r = rpc
        .call("nobody", "f", vec![], Duration::from_millis(300))
        .await;
    assert_eq!(r, Err(CallError::Timeout));
    let queued: Option<String> = redis::cmd("LPOP")
        .arg("nobody")
        .query_async(&mut db1)
        .await
        .expect("lpop");
    let queued: Value = serde_json::from_str(&queued.expect("the call was pushed")).expect("json");
    assert_eq!(queued["ct"], "rpc");
    assert!(
        queued["cb"]
            .as_str()
            .is_some_and(|cb| cb.starts_with("warren.cb.")),
        "{queued}"
    );
    stop.cancel();
    assert_eq!(
        rpc.call("nobody", "f", vec![], Duration::from_secs(1))
            .await,
        Err(CallError::Closed)
    );
    node.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_rpc_with_the_python_pymodule() {
    let server = Server::start(Kind::Redis);
    let url = server.url();
    let (node, seen) = node_with_module_x("warren-py").await;
    let stop = CancellationToken::new();
    let mut cfg = rpc_config(&url, "warren", 1);
    cfg.reply_via_list = vec!["pyRpc".into()];
    let rpc = RedisRpc::start(&cfg, node.handle().clone(), stop.clone())
        .await
        .expect("start");
    let mut py = Peer::start("pymodule.py", &[server.port.to_string(), "pypeer".into()]);
    py.expect("the peer is subscribed", |v| v["event"] == "ready")
        .await;

    // the peer's own traffic is the pymodule's, bytes and spacing included
    py.send(r#"{"call": ["probe", "test", "callback", "arg1", "arg2"]}"#)
        .await;
    let mut db1 = raw(&url, 1).await;
    let probe: Option<(String, String)> = redis::cmd("BLPOP")
        .arg("probe")
        .arg(20)
        .query_async(&mut db1)
        .await
        .expect("blpop");
    assert_eq!(
        probe.map(|(_, v)| v).as_deref(),
        Some(r#"{"func": "test", "ct": "pyRpc", "cb": "callback", "args": ["arg1", "arg2"]}"#)
    );

    // the peer calls a warren module function and gets the reply by list
    py.send(r#"{"call": ["warren", "test", "callback", "arg1", "arg2"]}"#)
        .await;
    let v = py
        .expect("the callback", |v| v["event"] == "callback")
        .await;
    assert_eq!(v["arg"], "args: arg1, arg2.");

    // warren calls a peer function and gets its return value
    let r = rpc
        .call(
            "pyRpc",
            "test",
            vec![json!("arg1"), json!("arg2")],
            PATIENCE,
        )
        .await
        .expect("python answers");
    assert_eq!(r, [json!("arg1arg2")]);

    // a call without callback runs there and sends nothing back
    rpc.notify("pyRpc", "callback", vec![json!("quiet")])
        .await
        .expect("notify");
    let v = py
        .expect("the notified function", |v| v["event"] == "callback")
        .await;
    assert_eq!(v["arg"], "quiet");

    // a broadcast from warren runs on the peer
    rpc.broadcast("pyRpc", "reload", vec![json!(1)])
        .await
        .expect("broadcast");
    let v = py
        .expect("the broadcast", |v| {
            v["event"] == "dispatch" && v["func"] == "reload"
        })
        .await;
    assert_eq!((&v["path"], &v["args"]), (&json!("channel"), &json!([1])));

    // a broadcast carrying warren's own pid is skipped by warren itself
    rpc.broadcast("warren", "mark", vec![json!("own")])
        .await
        .expect("broadcast");
    let _: i64 = redis::cmd("PUBLISH")
        .arg("warren")
        .arg(r#"{"func": "mark", "args": ["from python"]}"#)
        .query_async(&mut db1)
        .await
        .expect("publish");
    eventually("the foreign broadcast ran", || async {
        !marks(&seen).is_empty()
    })
    .await;

    // malformed JSON on the list is counted and dropped; the next call works
    let _: i64 = redis::cmd("RPUSH")
        .arg("warren")
        .arg("{not json")
        .query_async(&mut db1)
        .await
        .expect("rpush");
    py.send(r#"{"call": ["warren", "test", "callback", "x", "y"]}"#)
        .await;
    let v = py
        .expect("the callback", |v| v["event"] == "callback")
        .await;
    assert_eq!(v["arg"], "args: x, y.");
    assert_eq!(rpc.malformed(), 1);
    assert_eq!(marks(&seen), [json!("from python")]);

    py.send(r#"{"quit": true}"#).await;
    stop.cancel();
    node.shutdown().await;
}

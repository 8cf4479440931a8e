//! Tests of `warren_cluster::nats` against a real server: the transport (order, limits, outage,
//! restart, foreign messages, the remote bus on top) and the JetStream KV registry (discovery,
//! deregistration, expiry, restart without flapping).

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use futures_util::StreamExt as _;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use warren::bus::{Bus, Call};
use warren::error::{CallError, CallErrorKind};
use warren::module::LocalBus;
use warren::registry::{NodeRecord, Registry};
use warren::remote::{InboxFrames, RemoteBus, Transport, TransportError};
use warren_cluster::nats::{KvRegistry, NatsTransport};

use crate::kit::{self, Kind, Server};

/// Poll `cond` every 20 ms until it holds or `within` passes.
async fn eventually(within: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let end = Instant::now() + within;
    loop {
        if cond() {
            return true;
        }
        if Instant::now() >= end {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn start_nats() -> Server {
    Server::require(Kind::Nats);
    tokio::task::block_in_place(|| Server::start(Kind::Nats))
}

async fn transport(s: &Server) -> Arc<NatsTransport> {
    NatsTransport::connect(&s.url(), "warren")
        .await
        .expect("connect")
}

/// Serve node `node` on `t`: its inbox's frames.
async fn serve(t: &NatsTransport, node: &str, stop: &CancellationToken) -> InboxFrames {
    t.serve(node, stop.clone()).await.expect("serve")
}

async fn recv(rx: &mut InboxFrames) -> Bytes {
    tokio::time::timeout(Duration::from_secs(10), rx.next())
        .await
        .expect("a frame within 10 s")
        .expect("inbox open")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn frames_arrive_in_order_and_max_frame_is_the_server_limit() {
    let s = start_nats();
    let a = transport(&s).await;
    let b = transport(&s).await;
    let stop = CancellationToken::new();
    let mut inbox = serve(&b, "b", &stop).await;
    for i in 0..1000u32 {
        a.send("b", Bytes::from(i.to_be_bytes().to_vec()))
            .await
            .expect("send");
    }
    for i in 0..1000u32 {
        assert_eq!(&recv(&mut inbox).await[..], &i.to_be_bytes()[..]);
    }
    assert_eq!(a.max_frame(), a.client().server_info().max_payload);
    assert_eq!(
        a.max_frame(),
        1024 * 1024,
        "nats-server's default max_payload"
    );
    assert_eq!(a.kind(), "nats");
    stop.cancel();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversize_frames_are_refused_before_sending() {
    let s = start_nats();
    let a = transport(&s).await;
    let stop = CancellationToken::new();
    let mut inbox = serve(&a, "a", &stop).await;
    let max = a.max_frame();
    let err = a
        .send("a", Bytes::from(vec![7u8; max + 1]))
        .await
        .expect_err("too large");
    assert_eq!(err, TransportError::TooLarge { size: max + 1, max });
    a.send("a", Bytes::from(vec![1u8; max]))
        .await
        .expect("a frame of exactly max_frame bytes");
    a.send("a", Bytes::from_static(b"after"))
        .await
        .expect("send");
    // the refused frame never reached the server: the first frame in is the largest allowed one
    assert_eq!(recv(&mut inbox).await.len(), max);
    assert_eq!(&recv(&mut inbox).await[..], b"after");
    stop.cancel();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn outage_fails_sends_fast_and_serving_resumes_after_a_restart() {
    let mut s = start_nats();
    let a = transport(&s).await;
    let b = transport(&s).await;
    let stop = CancellationToken::new();
    let mut inbox = serve(&b, "b", &stop).await;
    a.send("b", Bytes::from_static(b"before"))
        .await
        .expect("send");
    assert_eq!(&recv(&mut inbox).await[..], b"before");

    tokio::task::block_in_place(|| s.kill());
    // every send resolves at once; once the client noticed the loss they are Unavailable
    let mut unavailable = false;
    for _ in 0..200 {
        let r = tokio::time::timeout(
            Duration::from_secs(1),
            a.send("b", Bytes::from_static(b"x")),
        )
        .await
        .expect("a send never hangs while the server is down");
        if let Err(e) = r {
            assert!(matches!(e, TransportError::Unavailable(_)), "{e:?}");
            unavailable = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(unavailable, "sends fail while the server is down");
    let Err(e) = a.serve("c", stop.clone()).await else {
        panic!("no serving while down");
    };
    assert!(matches!(e, TransportError::Unavailable(_)), "{e:?}");

    tokio::task::block_in_place(|| s.restart());
    // both clients reconnect by themselves and b's inbox is subscribed again: probe until a
    // frame gets through (frames sent before b resubscribed are lost, as core NATS does)
    let mut through = false;
    for n in 0..500u32 {
        let probe = Bytes::from(format!("probe-{n}"));
        if a.send("b", probe).await.is_ok() {
            if let Ok(Some(f)) = tokio::time::timeout(Duration::from_millis(50), inbox.next()).await
            {
                assert!(f.starts_with(b"probe-") || &f[..] == b"x", "{f:?}");
                through = true;
                break;
            }
        } else {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    assert!(through, "frames flow again after the restart");
    while let Ok(Some(_)) = tokio::time::timeout(Duration::from_millis(200), inbox.next()).await {}
    for i in 0..100u32 {
        a.send("b", Bytes::from(i.to_be_bytes().to_vec()))
            .await
            .expect("send");
    }
    for i in 0..100u32 {
        assert_eq!(&recv(&mut inbox).await[..], &i.to_be_bytes()[..]);
    }
    stop.cancel();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn foreign_messages_on_an_inbox_are_passed_through_and_stop_ends_serving() {
    let s = start_nats();
    let b = transport(&s).await;
    assert_eq!(b.inbox_subject("b"), "warren.node.b");
    assert_eq!(b.inbox_subject("gate.1 *>"), "warren.node.gate_1___");
    let stop = CancellationToken::new();
    let mut inbox = serve(&b, "gate.1 *>", &stop).await;
    let raw = async_nats::connect(s.url()).await.expect("raw client");
    raw.publish(
        "warren.node.gate_1___",
        Bytes::from_static(b"\x00garbage\xff"),
    )
    .await
    .expect("publish");
    raw.flush().await.expect("flush");
    assert_eq!(&recv(&mut inbox).await[..], b"\x00garbage\xff");
    stop.cancel();
    let closed = tokio::time::timeout(Duration::from_secs(5), async {
        while inbox.next().await.is_some() {}
    })
    .await;
    assert!(closed.is_ok(), "the inbox closes once serving stops");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn first_connect_fails_clearly_when_the_server_is_down() {
    let port = kit::free_port();
    let e = NatsTransport::connect(&format!("nats://127.0.0.1:{port}"), "warren")
        .await
        .expect_err("nothing listens there");
    // the kind says what happened; the chain keeps the client's own error, for programs
    let TransportError::Unavailable(detail) = &e else {
        panic!("not Unavailable: {e:?}");
    };
    let cause = std::error::Error::source(&e).expect("the client's error");
    assert!(cause.is::<async_nats::ConnectError>(), "{cause:?}");
    // as a call error it keeps kind and chain, and its wire text carries the client's words
    let c = CallError::from(e.clone());
    assert_eq!(c.kind(), CallErrorKind::Unavailable);
    let cause = std::error::Error::source(&c).expect("the same chain");
    assert!(cause.is::<async_nats::ConnectError>(), "{cause:?}");
    assert_eq!(
        c.wire_text(),
        format!("rpc service connection failed: {}", c.detail())
    );
    assert_eq!(c.detail(), format!("{}: {cause}", detail.message()));
    let e = KvRegistry::connect(
        &format!("nats://127.0.0.1:{port}"),
        "warren",
        Duration::from_secs(3),
    )
    .await
    .expect_err("nothing listens there");
    assert!(e.to_string().contains("cannot connect"), "{e}");
}

fn call(instance: &str, within: Duration) -> Call {
    Call {
        instance: instance.into(),
        handler: "HD_Ping".into(),
        session: None,
        body: Bytes::from_static(b"{}"),
        deadline: Instant::now() + within,
        trace: None,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn remote_bus_over_nats_times_out_fails_fast_on_node_loss_and_round_trips() {
    let s = start_nats();
    let stop = CancellationToken::new();
    let a = RemoteBus::new("a", transport(&s).await);
    let b = RemoteBus::new("b", transport(&s).await);
    a.serve(Arc::new(LocalBus::default()), stop.clone())
        .await
        .expect("serve a");
    b.serve(Arc::new(LocalBus::default()), stop.clone())
        .await
        .expect("serve b");

    // a round trip: b has no such instance and says so
    let pending = a
        .send("b", call("Nope001", Duration::from_secs(10)), true)
        .await
        .expect("sent")
        .expect("a reply is expected");
    let r = tokio::time::timeout(Duration::from_secs(10), pending)
        .await
        .expect("answered");
    assert_eq!(r, Err(CallError::ServiceNotFound("Nope001".into())));

    // nobody serves "ghost": the call ends at its deadline
    let started = Instant::now();
    let pending = a
        .send("ghost", call("Chat001", Duration::from_millis(300)), true)
        .await
        .expect("sent")
        .expect("a reply is expected");
    let r = tokio::time::timeout(Duration::from_secs(10), pending)
        .await
        .expect("ended");
    assert_eq!(r, Err(CallError::Timeout));
    assert!(started.elapsed() >= Duration::from_millis(300));

    // the registry dropped "ghost": its calls end at once with NodeLost
    let pending = a
        .send("ghost", call("Chat001", Duration::from_secs(60)), true)
        .await
        .expect("sent")
        .expect("a reply is expected");
    assert_eq!(a.in_flight(), 1);
    a.retain_nodes(&HashSet::from(["a", "b"]));
    let r = tokio::time::timeout(Duration::from_secs(5), pending)
        .await
        .expect("ended at once, not at the deadline");
    assert_eq!(r, Err(CallError::NodeLost("ghost".into())));
    assert_eq!(a.in_flight(), 0);
    stop.cancel();
}

fn node(id: &str) -> NodeRecord {
    NodeRecord {
        id: id.into(),
        version: "0.1.0".into(),
        address: None,
        started_at_ms: 1,
        tags: vec!["t".into()],
        instances: vec![warren::registry::InstanceRecord {
            module: "Chat".into(),
            id: format!("Chat@{id}"),
            ..Default::default()
        }],
    }
}

fn ids(r: &dyn Registry) -> Vec<String> {
    r.watch().borrow().iter().map(|n| n.id.clone()).collect()
}

const TTL: Duration = Duration::from_secs(2);

async fn registry(s: &Server, bucket: &str) -> Arc<KvRegistry> {
    KvRegistry::connect(&s.url(), bucket, TTL)
        .await
        .expect("registry")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kv_registries_see_each_other_and_deregistration_is_quick() {
    let s = start_nats();
    let r1 = registry(&s, "reg").await;
    let r2 = registry(&s, "reg").await;
    assert_eq!(r1.kind(), "nats");
    r1.register(node("n1")).await.expect("register n1");
    r2.register(node("n2")).await.expect("register n2");
    for r in [&r1, &r2] {
        assert!(
            eventually(Duration::from_secs(5), || ids(&**r) == ["n1", "n2"]).await,
            "{:?}",
            ids(&**r)
        );
    }
    assert_eq!(
        r2.watch().borrow()[0],
        node("n1"),
        "records cross unchanged"
    );
    // a registry that connects later reads the cluster before connect returns
    let r3 = registry(&s, "reg").await;
    assert_eq!(ids(&*r3), ["n1", "n2"]);

    // a changed record is seen by the others
    let mut n1 = node("n1");
    n1.tags = vec!["changed".into()];
    r1.register(n1.clone()).await.expect("register again");
    assert!(
        eventually(Duration::from_secs(2), || r2.watch().borrow().first()
            == Some(&n1))
        .await
    );

    r1.deregister("n1").await.expect("deregister");
    assert_eq!(ids(&*r1), ["n2"], "the deregistering node sees it at once");
    assert!(
        eventually(Duration::from_secs(1), || ids(&*r2) == ["n2"]).await,
        "gone within a second: {:?}",
        ids(&*r2)
    );
    // its keepalive stopped: it does not come back
    tokio::time::sleep(TTL).await;
    assert_eq!(ids(&*r2), ["n2"]);
    assert_eq!(ids(&*r3), ["n2"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_node_expires_after_the_ttl() {
    let s = start_nats();
    let r1 = registry(&s, "reg").await;
    let r2 = registry(&s, "reg").await;
    r1.register(node("n1")).await.expect("register n1");
    r2.register(node("n2")).await.expect("register n2");
    assert!(eventually(Duration::from_secs(5), || ids(&*r2) == ["n1", "n2"]).await);
    // dropping the handle stops its keepalive without deleting its record, as a crash would
    drop(r1);
    assert!(
        eventually(TTL + Duration::from_secs(2), || ids(&*r2) == ["n2"]).await,
        "gone after the TTL: {:?}",
        ids(&*r2)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn records_come_back_after_a_server_restart_without_flapping() {
    let mut s = start_nats();
    let r1 = registry(&s, "reg").await;
    let r2 = registry(&s, "reg").await;
    r1.register(node("n1")).await.expect("register n1");
    r2.register(node("n2")).await.expect("register n2");
    for r in [&r1, &r2] {
        assert!(eventually(Duration::from_secs(5), || ids(&**r) == ["n1", "n2"]).await);
    }
    // every list either registry publishes from now on
    let seen = Arc::new(Mutex::new(Vec::<Vec<String>>::new()));
    for r in [&r1, &r2] {
        let mut rx = r.watch();
        let seen = seen.clone();
        tokio::spawn(async move {
            while rx.changed().await.is_ok() {
                let v = rx
                    .borrow_and_update()
                    .iter()
                    .map(|n| n.id.clone())
                    .collect();
                seen.lock().expect("lock").push(v);
            }
        });
    }
    // the server loses the bucket (memory storage) and stays down longer than the TTL
    tokio::task::block_in_place(|| {
        s.kill();
        std::thread::sleep(TTL + Duration::from_millis(500));
    });
    assert_eq!(
        ids(&*r1),
        ["n1", "n2"],
        "the last known list stands during the outage"
    );
    tokio::task::block_in_place(|| s.restart());
    // the records are in the store again without a new register (the keepalives recreated the
    // bucket the server lost): a plain client finds them
    let raw = async_nats::connect(s.url()).await.expect("raw client");
    let js = async_nats::jetstream::new(raw);
    let mut fresh = Vec::new();
    let end = Instant::now() + Duration::from_secs(15);
    while Instant::now() < end {
        if let Ok(kv) = js.get_key_value("reg").await {
            fresh.clear();
            for id in ["n1", "n2"] {
                if let Ok(Some(v)) = kv.get(id).await {
                    let v: serde_json::Value = serde_json::from_slice(&v).expect("json record");
                    assert!(v["refreshed_ms"].as_u64().is_some(), "{v}");
                    fresh.push(v["id"].as_str().unwrap_or_default().to_owned());
                }
            }
            if fresh == ["n1", "n2"] {
                break;
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let back = fresh == ["n1", "n2"];
    assert!(back, "records back in the store: {fresh:?}");
    // and they stay: the keepalives run on
    tokio::time::sleep(TTL * 2).await;
    assert_eq!(ids(&*r1), ["n1", "n2"]);
    assert_eq!(ids(&*r2), ["n1", "n2"]);
    let seen = seen.lock().expect("lock").clone();
    assert!(
        seen.iter().all(|v| v == &["n1", "n2"]),
        "no flap during the outage: {seen:?}"
    );
}

/// A module type with `queue_group = true` on two nodes: calls without `@` are shared by the
/// NATS queue group (both instances take some), and when one node leaves, the other takes them
/// all. A call with `@` still reaches the named instance.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn queue_group_shares_calls_and_survives_a_member_leaving() {
    use warren::config::{Config, ModuleConfig};
    use warren::{Context, Module, Node};

    let s = start_nats();
    let start = |id: &'static str, with_work: bool| {
        let url = s.url();
        async move {
            let mut config = Config::default();
            config.http.enabled = false;
            config.node.id = id.into();
            config.node.gate_id = format!("Gate-{id}");
            let transport = NatsTransport::connect(&url, "warren").await.expect("bus");
            let registry = KvRegistry::connect(&url, "groups", TTL)
                .await
                .expect("registry");
            let mut b = Node::builder(config)
                .transport(transport)
                .registry(registry.clone());
            if with_work {
                let m = Module::builder("Work", ())
                    .handler("who", |cx: Context, _body: Bytes| async move {
                        Ok::<_, CallError>(Bytes::from(cx.instance().id.to_string()))
                    })
                    .build();
                let mut mc = ModuleConfig::new("Work");
                mc.id = Some(format!("Work-{id}"));
                mc.queue_group = true;
                b = b.module(m, mc);
            }
            (b.start().await.expect("node"), registry)
        }
    };
    let (w1, _r1) = start("w1", true).await;
    let (w2, _r2) = start("w2", true).await;
    let (caller, rc) = start("caller", false).await;
    assert!(
        eventually(Duration::from_secs(10), || {
            let n = rc.watch().borrow().len();
            n == 3
        })
        .await,
        "the caller sees both workers"
    );
    let h = caller.handle().clone();
    let who = |module: &'static str| {
        let h = h.clone();
        async move {
            let r = h
                .call(
                    module,
                    "who",
                    None,
                    Bytes::new(),
                    Some(Duration::from_secs(5)),
                )
                .await;
            String::from_utf8(r.expect("answered").to_vec()).expect("utf-8")
        }
    };
    let mut seen = HashSet::new();
    for _ in 0..200 {
        seen.insert(who("Work").await);
        if seen.len() == 2 {
            break;
        }
    }
    assert_eq!(
        seen,
        HashSet::from(["Work-w1".to_owned(), "Work-w2".to_owned()]),
        "both members of the group take calls"
    );
    assert_eq!(who("Work@Work-w1").await, "Work-w1", "@ still names one");

    w1.shutdown().await;
    for _ in 0..50 {
        assert_eq!(
            who("Work").await,
            "Work-w2",
            "the member left takes every call"
        );
    }
    w2.shutdown().await;
    caller.shutdown().await;
}

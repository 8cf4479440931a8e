//! Backend groups (docs/backends.md) against real TCP services started here: tokio listeners
//! speaking the gobase test codec.
//!
//! What a test service does with a frame, by msgid:
//! 1 → answers msgid 2 `heatrespmsg` (the sample heartbeat; the hooks map 2 to rpc id 1);
//! 3 → answers msgid 4 with its own name (rpc id 3); 5 → nothing; 6 → closes the connection;
//! 7 → pushes msgid 8 frames with bodies `0`, `1`, … (as many as the body's number says);
//! 9 → answers msgid 1000 + the body's number (rpc id = that number), for many calls at once.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use bytes::BytesMut;
use parking_lot::Mutex;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;
use warren_cluster::backend::{
    BackendError, BackendOptions, Backends, GobaseTestCodec, Hooks, RpcId, Service, ServiceConf,
    TestMsg,
};
use warren_proto::backend_frame::{self, DEFAULT_MAX_BODY};

use crate::kit::free_port;

/// A TCP service speaking the test codec, on 127.0.0.1; stopped (listener and connections) on
/// [`stop`](TestService::stop) or drop.
struct TestService {
    name: String,
    port: u16,
    accepted: Arc<AtomicUsize>,
    stop: CancellationToken,
}

impl TestService {
    async fn start(name: &str) -> TestService {
        TestService::start_on(name, 0).await
    }

    async fn start_on(name: &str, port: u16) -> TestService {
        let listener = TcpListener::bind(("127.0.0.1", port))
            .await
            .expect("a test service binds");
        let port = listener.local_addr().expect("bound").port();
        let stop = CancellationToken::new();
        let accepted = Arc::new(AtomicUsize::new(0));
        let (n, s, a) = (name.to_owned(), stop.clone(), accepted.clone());
        tokio::spawn(async move {
            loop {
                let sock = tokio::select! {
                    _ = s.cancelled() => return,
                    r = listener.accept() => match r { Ok((sock, _)) => sock, Err(_) => return },
                };
                a.fetch_add(1, Ordering::SeqCst);
                tokio::spawn(serve(sock, n.clone(), s.clone()));
            }
        });
        TestService {
            name: name.to_owned(),
            port,
            accepted,
            stop,
        }
    }

    fn conf(&self, group: &str) -> ServiceConf {
        ServiceConf::new(group, &self.name, "127.0.0.1", self.port)
    }

    fn stop(&self) {
        self.stop.cancel();
    }

    fn accepted(&self) -> usize {
        self.accepted.load(Ordering::SeqCst)
    }
}

impl Drop for TestService {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

fn frame(msgid: u32, body: impl Into<bytes::Bytes>) -> BytesMut {
    let mut out = BytesMut::new();
    backend_frame::encode(&TestMsg::new(msgid, body), DEFAULT_MAX_BODY, &mut out)
        .expect("test frames are small");
    out
}

async fn serve(mut sock: TcpStream, name: String, stop: CancellationToken) {
    let mut buf = BytesMut::new();
    loop {
        let n = tokio::select! {
            _ = stop.cancelled() => return,
            r = sock.read_buf(&mut buf) => match r { Ok(0) | Err(_) => return, Ok(n) => n },
        };
        let _ = n;
        while let Ok(Some((m, used))) = backend_frame::decode(&buf, DEFAULT_MAX_BODY) {
            let _ = buf.split_to(used);
            let number = || {
                std::str::from_utf8(&m.body)
                    .ok()
                    .and_then(|s| s.parse::<u32>().ok())
                    .unwrap_or(0)
            };
            let out = match m.msgid {
                1 => frame(2, &b"heatrespmsg"[..]),
                3 => frame(4, name.clone().into_bytes()),
                6 => return,
                7 => {
                    let mut out = BytesMut::new();
                    for i in 0..number() {
                        out.extend_from_slice(&frame(8, i.to_string().into_bytes()));
                    }
                    out
                }
                9 => frame(1000 + number(), m.body.clone()),
                _ => continue,
            };
            if sock.write_all(&out).await.is_err() {
                return;
            }
        }
    }
}

/// Hooks that write down what happened, as `event group/id` lines, and the bodies of the
/// messages they got.
#[derive(Default)]
struct Recorder {
    events: Mutex<Vec<String>>,
    msgs: Mutex<Vec<String>>,
    /// Services whose dials are stopped by `on_dial_fail`.
    stop_dialling: Mutex<Vec<String>>,
    /// Ids kept by `filter` (all when empty).
    keep: Mutex<Vec<String>>,
}

impl Recorder {
    fn note(&self, what: &str, s: &Service<GobaseTestCodec>) {
        self.events
            .lock()
            .push(format!("{what} {}/{}", s.name(), s.id()));
    }

    fn count(&self, line: &str) -> usize {
        self.events.lock().iter().filter(|e| *e == line).count()
    }

    fn msgs(&self) -> Vec<String> {
        self.msgs.lock().clone()
    }
}

impl Hooks<GobaseTestCodec> for Recorder {
    fn filter(&self, _group: &str, services: Vec<ServiceConf>) -> Vec<ServiceConf> {
        let keep = self.keep.lock();
        services
            .into_iter()
            .filter(|s| keep.is_empty() || keep.contains(&s.id))
            .collect()
    }
    fn on_add(&self, s: &Service<GobaseTestCodec>) {
        self.note("add", s);
    }
    fn on_remove(&self, s: &Service<GobaseTestCodec>) {
        self.note("remove", s);
    }
    fn on_connected(&self, s: &Service<GobaseTestCodec>) {
        self.note("connected", s);
    }
    fn on_disconnect(&self, s: &Service<GobaseTestCodec>) {
        self.note("disconnect", s);
    }
    fn on_dial_fail(
        &self,
        s: &Service<GobaseTestCodec>,
        _e: &std::io::Error,
    ) -> warren_cluster::backend::Redial {
        self.note("dialfail", s);
        if self.stop_dialling.lock().iter().any(|id| id == s.id()) {
            warren_cluster::backend::Redial::Stop
        } else {
            warren_cluster::backend::Redial::Retry
        }
    }
    fn check_rpc_resp(&self, msg: &TestMsg) -> Option<RpcId> {
        match msg.msgid {
            2 => Some(1),
            4 => Some(3),
            n if n >= 1000 => Some(RpcId::from(n - 1000)),
            _ => None,
        }
    }
    async fn on_msg(&self, _s: &Service<GobaseTestCodec>, msg: TestMsg) {
        // give the scheduler every chance to run a later message first
        tokio::task::yield_now().await;
        self.msgs
            .lock()
            .push(String::from_utf8_lossy(&msg.body).into_owned());
    }
    async fn on_tick(&self, s: &Service<GobaseTestCodec>) {
        self.note("tick", s);
    }
}

type Group = Backends<GobaseTestCodec, Recorder>;

fn backends(immediately: bool, msg_seq: bool) -> Group {
    Backends::new(
        GobaseTestCodec::default(),
        Recorder::default(),
        BackendOptions {
            immediately,
            msg_seq,
            dial_timeout: Duration::from_secs(5),
            ..BackendOptions::default()
        },
    )
}

/// Wait (up to 10 s) until `cond` holds.
async fn eventually(what: &str, cond: impl Fn() -> bool) {
    for _ in 0..500 {
        if cond() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("never happened: {what}");
}

fn connected(b: &Group, group: &str, id: &str) -> bool {
    b.service(group, id).is_some_and(|s| s.is_connected())
}

const T: Duration = Duration::from_secs(5);

#[tokio::test]
async fn dials_and_calls_with_the_sample_heartbeat() {
    let gate1 = TestService::start("gate1").await;
    let b = backends(false, true);
    b.update("Gate", vec![gate1.conf(" GATE ")]);
    assert_eq!(b.groups(), vec!["gate"]);
    eventually("gate1 connected", || connected(&b, "gate", "gate1")).await;
    assert_eq!(b.ring_members("gate"), vec!["gate1"]);
    let answer = b
        .call("gate", "GATE1", 1, &TestMsg::heartbeat_request(), T)
        .await
        .unwrap();
    assert_eq!(answer, TestMsg::heartbeat_response());
    assert_eq!(b.hooks().count("add gate/gate1"), 1);
    assert_eq!(b.hooks().count("connected gate/gate1"), 1);
    b.shutdown().await;
    assert_eq!(b.hooks().count("disconnect gate/gate1"), 1);
    assert_eq!(b.hooks().count("remove gate/gate1"), 1);
    assert!(b.groups().is_empty());
}

#[tokio::test]
async fn dials_again_until_a_late_service_starts() {
    let port = free_port();
    let b = backends(false, true);
    b.update(
        "game",
        vec![ServiceConf::new("game", "late", "127.0.0.1", port)],
    );
    eventually("two dial failures", || {
        b.hooks().count("dialfail game/late") >= 2
    })
    .await;
    assert!(!connected(&b, "game", "late"));
    assert!(b.ring_members("game").is_empty());
    assert_eq!(
        b.send("game", "late", &TestMsg::heartbeat_request()),
        Err(BackendError::NotConnected)
    );
    let late = TestService::start_on("late", port).await;
    eventually("late connected", || connected(&b, "game", "late")).await;
    assert_eq!(late.accepted(), 1);
    b.shutdown().await;
}

#[tokio::test]
async fn the_ring_holds_connected_services_only() {
    let games: Vec<TestService> =
        futures_util::future::join_all(["game1", "game2", "game3"].map(TestService::start)).await;
    let b = backends(false, true);
    let mut confs: Vec<ServiceConf> = games.iter().map(|g| g.conf("game")).collect();
    // listed, never reachable: in the group, never on the ring
    confs.push(ServiceConf::new("game", "game4", "127.0.0.1", free_port()));
    b.update("game", confs);
    eventually("three on the ring", || b.ring_members("game").len() == 3).await;
    assert_eq!(b.ring_members("game"), vec!["game1", "game2", "game3"]);
    assert_eq!(b.services("game").len(), 4);
    // the ring vectors of docs/cluster.md: {game1, game2, game3}
    for (key, want) in [("user1", "game2"), ("user2", "game3"), ("bob", "game1")] {
        assert_eq!(b.service_by_hash("game", key).unwrap().id(), want, "{key}");
        let who = b
            .call_by_hash("game", key, 3, &TestMsg::new(3, "whoami"), T)
            .await
            .unwrap();
        assert_eq!(who.body, want.as_bytes(), "{key} answered by its owner");
    }
    b.send_by_hash("game", "user1", &TestMsg::new(5, "x"))
        .unwrap();

    // game2 goes away: only its keys move
    games[1].stop();
    eventually("game2 off the ring", || b.ring_members("game").len() == 2).await;
    for (key, want) in [("user1", "game1"), ("user2", "game3"), ("bob", "game1")] {
        assert_eq!(b.service_by_hash("game", key).unwrap().id(), want, "{key}");
    }
    assert!(
        b.service("game", "game2").is_some(),
        "still listed, still dialled"
    );
    b.shutdown().await;
    assert_eq!(
        b.service_by_hash("game", "user1")
            .map(|s| s.id().to_owned()),
        None
    );
}

#[tokio::test]
async fn one_ring_per_routing_tag() {
    let s: Vec<TestService> =
        futures_util::future::join_all(["s1", "s2", "s3"].map(TestService::start)).await;
    let b = backends(false, true);
    b.update(
        "room",
        vec![
            s[0].conf("room").with_tag("Red"),
            s[1].conf("room").with_tag(" blue"),
            s[2].conf("room").with_tag("red"),
        ],
    );
    eventually("all connected", || b.ring_members("room").len() == 3).await;
    for key in ["a", "b", "c", "d", "e", "f"] {
        let red = b.service_by_tag_and_hash("room", " RED ", key).unwrap();
        assert!(["s1", "s3"].contains(&red.id()), "{key} → {}", red.id());
        assert_eq!(
            b.service_by_tag_and_hash("room", "blue", key).unwrap().id(),
            "s2"
        );
    }
    assert!(b.service_by_tag_and_hash("room", "green", "a").is_none());
    assert_eq!(
        b.send_by_tag_and_hash("room", "green", "a", &TestMsg::new(5, "")),
        Err(BackendError::NoService)
    );
    s[1].stop();
    eventually("blue ring gone", || {
        b.service_by_tag_and_hash("room", "blue", "a").is_none()
    })
    .await;
    assert!(b.service_by_tag_and_hash("room", "red", "a").is_some());
    b.shutdown().await;
}

#[tokio::test]
async fn calls_end_in_an_answer_or_a_typed_error() {
    let svc = TestService::start("rpc1").await;
    let b = backends(false, true);
    b.update("rpc", vec![svc.conf("rpc")]);
    eventually("connected", || connected(&b, "rpc", "rpc1")).await;

    // many calls at once, each answered by its own id
    let calls = (0..50u32).map(|i| {
        let b = b.clone();
        async move {
            let m = TestMsg::new(9, i.to_string());
            b.call("rpc", "rpc1", RpcId::from(i), &m, T).await
        }
    });
    for (i, r) in futures_util::future::join_all(calls)
        .await
        .into_iter()
        .enumerate()
    {
        assert_eq!(r.unwrap().msgid, 1000 + i as u32);
    }

    // nobody answers msgid 5
    let e = b
        .call(
            "rpc",
            "rpc1",
            77,
            &TestMsg::new(5, ""),
            Duration::from_millis(200),
        )
        .await
        .unwrap_err();
    assert_eq!(e, BackendError::Timeout);
    assert_eq!(e.to_string(), "timeout");

    // the id is taken while a call waits on it, and free again after
    let waiting = {
        let b = b.clone();
        tokio::spawn(async move {
            b.call(
                "rpc",
                "rpc1",
                5,
                &TestMsg::new(5, ""),
                Duration::from_millis(500),
            )
            .await
        })
    };
    eventually("first call waiting", || {
        // a second call with the same id is refused at once while the first waits
        let r = futures_util::FutureExt::now_or_never(b.call(
            "rpc",
            "rpc1",
            5,
            &TestMsg::new(5, ""),
            Duration::from_millis(1),
        ));
        matches!(r, Some(Err(BackendError::RpcIdExist)))
    })
    .await;
    assert_eq!(BackendError::RpcIdExist.to_string(), "rpcId exist");
    assert_eq!(waiting.await.unwrap(), Err(BackendError::Timeout));

    // msgid 6 makes the service close the connection: the waiter wakes with `close`
    let e = b
        .call("rpc", "rpc1", 6, &TestMsg::new(6, ""), T)
        .await
        .unwrap_err();
    assert_eq!(e, BackendError::Close);
    assert_eq!(e.to_string(), "close");
    // and it dials again
    eventually("second connection", || {
        svc.accepted() == 2 && connected(&b, "rpc", "rpc1")
    })
    .await;
    assert_eq!(
        b.call("rpc", "nobody", 1, &TestMsg::heartbeat_request(), T)
            .await,
        Err(BackendError::NoService)
    );
    b.shutdown().await;
}

#[tokio::test]
async fn lazy_removal_waits_for_the_disconnect() {
    let svc = TestService::start("g1").await;
    let b = backends(false, true);
    b.update("lazy", vec![svc.conf("lazy")]);
    eventually("connected", || connected(&b, "lazy", "g1")).await;

    b.update("lazy", vec![]);
    let s = b.service("lazy", "g1").expect("kept until its disconnect");
    assert!(s.is_marked() && s.is_connected());
    assert_eq!(b.ring_members("lazy"), vec!["g1"]);

    // listed again before it dropped: unmarked, kept
    b.update("lazy", vec![svc.conf("lazy")]);
    assert!(!s.is_marked());

    b.update("lazy", vec![]);
    svc.stop();
    eventually("removed at disconnect", || {
        b.hooks().count("remove lazy/g1") == 1
    })
    .await;
    assert!(b.service("lazy", "g1").is_none());
    assert!(b.groups().is_empty(), "an empty group is removed");
    assert_eq!(b.hooks().count("disconnect lazy/g1"), 1);
    assert_eq!(b.hooks().count("dialfail lazy/g1"), 0);
    b.shutdown().await;
}

#[tokio::test]
async fn lazy_removal_of_an_unreachable_service_at_its_next_dial_failure() {
    let b = backends(false, true);
    b.update(
        "lazy",
        vec![ServiceConf::new("lazy", "gone", "127.0.0.1", free_port())],
    );
    eventually("a dial failure", || {
        b.hooks().count("dialfail lazy/gone") >= 1
    })
    .await;
    b.update("lazy", vec![]);
    eventually("removed", || b.hooks().count("remove lazy/gone") == 1).await;
    assert!(b.groups().is_empty());
    b.shutdown().await;
}

#[tokio::test]
async fn immediate_removal_closes_at_once() {
    let svc = TestService::start("g1").await;
    let b = backends(true, true);
    b.update("now", vec![svc.conf("now")]);
    eventually("connected", || connected(&b, "now", "g1")).await;
    let s = b.service("now", "g1").unwrap();
    b.update("now", vec![]);
    assert!(b.service("now", "g1").is_none());
    assert!(b.groups().is_empty());
    assert!(b.ring_members("now").is_empty());
    eventually("disconnected and removed", || {
        b.hooks().count("remove now/g1") == 1 && !s.is_connected()
    })
    .await;
    let events = b.hooks().events.lock().clone();
    let at = |e: &str| events.iter().position(|x| x == e).unwrap();
    assert!(at("disconnect now/g1") < at("remove now/g1"), "{events:?}");
    assert_eq!(
        s.send(&TestMsg::new(5, "")),
        Err(BackendError::NotConnected)
    );
    b.shutdown().await;
}

#[tokio::test]
async fn a_changed_address_reconnects() {
    let a = TestService::start("a").await;
    let c = TestService::start("c").await;
    let b = backends(false, true);
    b.update(
        "mv",
        vec![ServiceConf::new("mv", "svc", "127.0.0.1", a.port)],
    );
    eventually("connected to a", || connected(&b, "mv", "svc")).await;
    let who = b
        .call("mv", "svc", 3, &TestMsg::new(3, ""), T)
        .await
        .unwrap();
    assert_eq!(who.body, &b"a"[..]);

    b.update(
        "mv",
        vec![ServiceConf::new("mv", "svc", "127.0.0.1", c.port)],
    );
    eventually("connected to c", || connected(&b, "mv", "svc")).await;
    let who = b
        .call("mv", "svc", 3, &TestMsg::new(3, ""), T)
        .await
        .unwrap();
    assert_eq!(who.body, &b"c"[..]);
    assert_eq!(b.ring_members("mv"), vec!["svc"]);
    eventually("the old one removed", || {
        b.hooks().count("remove mv/svc") == 1
    })
    .await;
    assert_eq!(b.hooks().count("add mv/svc"), 2);
    // the old connection's end did not take the new one off the ring
    assert_eq!(b.ring_members("mv"), vec!["svc"]);
    b.shutdown().await;
}

#[tokio::test]
async fn the_filter_hook_and_a_dial_hook_that_stops() {
    let keep = TestService::start("keep").await;
    let b = backends(false, true);
    b.hooks()
        .keep
        .lock()
        .extend(["keep".to_owned(), "dead".to_owned()]);
    b.hooks().stop_dialling.lock().push("dead".to_owned());
    b.update(
        "f",
        vec![
            keep.conf("f"),
            ServiceConf::new("f", "dropped", "127.0.0.1", keep.port),
            ServiceConf::new("f", "dead", "127.0.0.1", free_port()),
            ServiceConf::new("other", "x", "127.0.0.1", keep.port),
        ],
    );
    eventually("keep connected", || connected(&b, "f", "keep")).await;
    eventually("dead removed", || b.hooks().count("remove f/dead") == 1).await;
    assert_eq!(b.hooks().count("dialfail f/dead"), 1);
    let ids: Vec<String> = b.services("f").iter().map(|s| s.id().to_owned()).collect();
    assert_eq!(ids, vec!["keep"]);
    assert_eq!(b.groups(), vec!["f"]);
    b.shutdown().await;
}

#[tokio::test]
async fn on_tick_every_second_per_service() {
    let s1 = TestService::start("t1").await;
    let b = backends(false, true);
    b.update(
        "tick",
        vec![
            s1.conf("tick"),
            ServiceConf::new("tick", "t2", "127.0.0.1", free_port()),
        ],
    );
    eventually("two ticks each", || {
        b.hooks().count("tick tick/t1") >= 2 && b.hooks().count("tick tick/t2") >= 2
    })
    .await;
    b.shutdown().await;
}

#[tokio::test]
async fn messages_reach_on_msg_in_order() {
    let svc = TestService::start("p").await;
    let b = backends(false, true);
    b.update("push", vec![svc.conf("push")]);
    eventually("connected", || connected(&b, "push", "p")).await;
    b.send("push", "p", &TestMsg::new(7, "500")).unwrap();
    eventually("500 messages", || b.hooks().msgs().len() == 500).await;
    let want: Vec<String> = (0..500).map(|i| i.to_string()).collect();
    assert_eq!(b.hooks().msgs(), want);
    b.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn messages_reach_on_msg_concurrently_without_loss() {
    let svc = TestService::start("p").await;
    let b = backends(false, false);
    b.update("push", vec![svc.conf("push")]);
    eventually("connected", || connected(&b, "push", "p")).await;
    b.send("push", "p", &TestMsg::new(7, "500")).unwrap();
    eventually("500 messages", || b.hooks().msgs().len() == 500).await;
    let mut got: Vec<u32> = b
        .hooks()
        .msgs()
        .iter()
        .map(|m| m.parse().unwrap())
        .collect();
    got.sort_unstable();
    assert_eq!(got, (0..500).collect::<Vec<u32>>());
    b.shutdown().await;
}

#[tokio::test]
async fn broadcast_to_a_group_and_to_all() {
    let s: Vec<TestService> =
        futures_util::future::join_all(["b1", "b2", "b3"].map(TestService::start)).await;
    let b = backends(false, true);
    b.update("x", vec![s[0].conf("x"), s[1].conf("x")]);
    b.update("y", vec![s[2].conf("y")]);
    eventually("all connected", || {
        b.ring_members("x").len() == 2 && b.ring_members("y").len() == 1
    })
    .await;
    // each service pushes back one msgid 8 frame with body "0"
    assert_eq!(b.broadcast("x", &TestMsg::new(7, "1")), Ok(2));
    eventually("two pushes", || b.hooks().msgs().len() == 2).await;
    assert_eq!(b.broadcast_all(&TestMsg::new(7, "1")), Ok(3));
    eventually("five pushes", || b.hooks().msgs().len() == 5).await;
    assert_eq!(b.broadcast("nope", &TestMsg::new(7, "1")), Ok(0));
    b.shutdown().await;
}

#[tokio::test]
async fn bad_bytes_drop_the_connection_and_it_dials_again() {
    // a service that answers every connection with a frame announcing a 4 GiB body
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let accepted = Arc::new(AtomicUsize::new(0));
    let a = accepted.clone();
    let server = tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((mut sock, _)) = listener.accept().await {
            a.fetch_add(1, Ordering::SeqCst);
            let _ = sock.write_all(b"\x08\x00\x00\x00\xff\xff\xff\xff").await;
            held.push(sock);
        }
    });
    let b = backends(false, true);
    b.update("bad", vec![ServiceConf::new("bad", "b", "127.0.0.1", port)]);
    eventually("dialled again after the bad frame", || {
        accepted.load(Ordering::SeqCst) >= 2 && b.hooks().count("disconnect bad/b") >= 1
    })
    .await;
    b.shutdown().await;
    server.abort();
}

#[tokio::test]
async fn a_service_that_does_not_read_gets_queue_full() {
    // accepts and never reads
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let server = tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((sock, _)) = listener.accept().await {
            held.push(sock);
        }
    });
    let b = Backends::new(
        GobaseTestCodec::default(),
        Recorder::default(),
        BackendOptions {
            queue_bytes: 256 * 1024,
            ..BackendOptions::default()
        },
    );
    b.update(
        "slow",
        vec![ServiceConf::new("slow", "s", "127.0.0.1", port)],
    );
    eventually("connected", || connected(&b, "slow", "s")).await;
    let body = vec![0u8; 64 * 1024];
    let msg = TestMsg::new(5, body);
    let mut full = false;
    // the kernel's socket buffers take some megabytes first; the queue takes 256 KiB
    for _ in 0..100_000 {
        match b.send("slow", "s", &msg) {
            Ok(()) => tokio::task::yield_now().await,
            Err(BackendError::QueueFull) => {
                full = true;
                break;
            }
            Err(e) => panic!("{e}"),
        }
    }
    assert!(full, "the queue never filled");
    b.shutdown().await;
    server.abort();
}

/// The gobase sample: every second, each connected service is called with the heartbeat
/// request as rpc id 1, and the heartbeat response (msgid 2) answers it.
struct SampleHeartbeat {
    answered: AtomicUsize,
}

impl Hooks<GobaseTestCodec> for SampleHeartbeat {
    fn check_rpc_resp(&self, msg: &TestMsg) -> Option<RpcId> {
        (msg.msgid == 2).then_some(1)
    }
    async fn on_tick(&self, service: &Service<GobaseTestCodec>) {
        if service.is_connected() {
            let r = service
                .call(1, &TestMsg::heartbeat_request(), Duration::from_secs(5))
                .await;
            if r == Ok(TestMsg::heartbeat_response()) {
                self.answered.fetch_add(1, Ordering::SeqCst);
            }
        }
    }
}

#[tokio::test]
async fn the_gobase_sample_heartbeat_from_on_tick() {
    let gate = TestService::start("gate1").await;
    let b = Backends::new(
        GobaseTestCodec::default(),
        SampleHeartbeat {
            answered: AtomicUsize::new(0),
        },
        BackendOptions::default(),
    );
    b.update("gate", vec![gate.conf("gate")]);
    eventually("two heartbeats answered", || {
        b.hooks().answered.load(Ordering::SeqCst) >= 2
    })
    .await;
    b.shutdown().await;
}

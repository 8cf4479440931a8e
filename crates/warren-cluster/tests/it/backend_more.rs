//! Backend groups fed by a registry, and HTTP groups (docs/backends.md, "Registry discovery" and
//! "HTTP groups"), against a real redis-server and real HTTP servers started here (axum).

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use axum::Router;
use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::get;
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;
use warren_cluster::backend::discovery::{self, MemberFilter, RedisSource};
use warren_cluster::backend::{
    BackendOptions, Backends, GobaseTestCodec, HttpBackends, HttpOptions, NoHooks, ServiceConf,
};
use warren_cluster::redis::GobaseLayout;

use crate::kit::{Kind, Server};

async fn eventually(what: &str, cond: impl Fn() -> bool) {
    let end = tokio::time::Instant::now() + Duration::from_secs(15);
    while !cond() {
        assert!(tokio::time::Instant::now() < end, "{what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A TCP service that only accepts (and counts) connections, closing none.
struct Listener {
    port: u16,
    accepted: Arc<std::sync::atomic::AtomicUsize>,
    stop: CancellationToken,
}

impl Listener {
    async fn start() -> Listener {
        let l = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let port = l.local_addr().expect("addr").port();
        let accepted = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let stop = CancellationToken::new();
        let (a, s) = (accepted.clone(), stop.clone());
        tokio::spawn(async move {
            let mut held: Vec<TcpStream> = Vec::new();
            loop {
                tokio::select! {
                    _ = s.cancelled() => return,
                    r = l.accept() => if let Ok((sock, _)) = r {
                        a.fetch_add(1, Ordering::SeqCst);
                        held.push(sock);
                    },
                }
            }
        });
        Listener {
            port,
            accepted,
            stop,
        }
    }
}

impl Drop for Listener {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

/// `ZADD key <server time in ms> member`, as a gobase service registers (seed layout), and the
/// channel message that makes watchers read again.
async fn register(conn: &mut redis::aio::MultiplexedConnection, key: &str, member: &str) {
    let (s, us): (u64, u64) = redis::cmd("TIME").query_async(conn).await.expect("time");
    let ms = s as f64 * 1000.0 + us as f64 / 1000.0;
    let _: () = redis::cmd("ZADD")
        .arg(key)
        .arg(ms)
        .arg(member)
        .query_async(conn)
        .await
        .expect("zadd");
    let _: () = redis::cmd("PUBLISH")
        .arg(format!("_{{{key}}}_channel_"))
        .arg(format!("reg {member}"))
        .query_async(conn)
        .await
        .expect("publish");
}

async fn deregister(conn: &mut redis::aio::MultiplexedConnection, key: &str, member: &str) {
    let _: () = redis::cmd("ZREM")
        .arg(key)
        .arg(member)
        .query_async(conn)
        .await
        .expect("zrem");
    let _: () = redis::cmd("PUBLISH")
        .arg(format!("_{{{key}}}_channel_"))
        .arg(format!("dereg {member}"))
        .query_async(conn)
        .await
        .expect("publish");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_group_follows_its_registry_members() {
    Server::require(Kind::Redis);
    let redis_server = Server::start(Kind::Redis);
    let url = redis_server.url();
    let client = redis::Client::open(url.as_str()).expect("client");
    let mut conn = client
        .get_multiplexed_async_connection()
        .await
        .expect("conn");
    let (a, b, other) = (
        Listener::start().await,
        Listener::start().await,
        Listener::start().await,
    );
    let key = "backend-it";
    register(
        &mut conn,
        key,
        &format!("gate&gate1&127.0.0.1&{}&tcp", a.port),
    )
    .await;
    register(
        &mut conn,
        key,
        &format!("gate&gate9&127.0.0.1&{}&http", other.port),
    )
    .await;
    register(
        &mut conn,
        key,
        &format!("game&game1&127.0.0.1&{}&tcp", other.port),
    )
    .await;

    let group = immediate_group();
    let stop = CancellationToken::new();
    tokio::spawn(discovery::watch_redis(
        group.clone(),
        RedisSource {
            url: url.clone(),
            key: key.into(),
            layout: GobaseLayout::Gobase,
        },
        gate_tcp(),
        stop.clone(),
    ));
    eventually("gate1 is dialled", || {
        a.accepted.load(Ordering::SeqCst) == 1
    })
    .await;
    eventually("gate1 is on the ring", || {
        group.ring_members("gate") == ["gate1"]
    })
    .await;

    register(
        &mut conn,
        key,
        &format!("gate&gate2&127.0.0.1&{}&tcp", b.port),
    )
    .await;
    eventually("gate2 joins", || {
        group.ring_members("gate") == ["gate1", "gate2"]
    })
    .await;

    deregister(
        &mut conn,
        key,
        &format!("gate&gate1&127.0.0.1&{}&tcp", a.port),
    )
    .await;
    eventually("gate1 leaves", || group.ring_members("gate") == ["gate2"]).await;
    assert!(group.service("gate", "gate1").is_none());
    assert_eq!(
        other.accepted.load(Ordering::SeqCst),
        0,
        "another group or scheme"
    );

    stop.cancel();
    group.shutdown().await;
}

/// An HTTP service: `/health` answers 200 while `healthy`, 503 otherwise; `/who` its name.
async fn http_service(name: &'static str, healthy: Arc<AtomicBool>) -> (u16, CancellationToken) {
    let app = Router::new()
        .route(
            "/health",
            get(|State(h): State<Arc<AtomicBool>>| async move {
                if h.load(Ordering::SeqCst) {
                    StatusCode::OK
                } else {
                    StatusCode::SERVICE_UNAVAILABLE
                }
            }),
        )
        .route("/who", get(move || async move { name }))
        .with_state(healthy);
    let l = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let port = l.local_addr().expect("addr").port();
    let stop = CancellationToken::new();
    let s = stop.clone();
    tokio::spawn(async move {
        let _ = axum::serve(l, app)
            .with_graceful_shutdown(async move { s.cancelled().await })
            .await;
    });
    (port, stop)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_groups_follow_the_health_probe() {
    let (h1, h2) = (
        Arc::new(AtomicBool::new(true)),
        Arc::new(AtomicBool::new(true)),
    );
    let (p1, s1) = http_service("web1", h1.clone()).await;
    let (p2, s2) = http_service("web2", h2.clone()).await;
    let dead = crate::kit::free_port();
    let web = HttpBackends::new(HttpOptions {
        health_path: Some("/health".into()),
        ..HttpOptions::default()
    })
    .expect("client");
    web.update(
        "web",
        vec![
            ServiceConf::new("web", "web1", "127.0.0.1", p1).with_tag("red"),
            ServiceConf::new("web", "web2", "127.0.0.1", p2),
            ServiceConf::new("web", "web3", "127.0.0.1", dead),
        ],
    );
    eventually("both healthy services join the ring", || {
        web.ring_members("web") == ["web1", "web2"]
    })
    .await;
    assert!(
        !web.services("web")[2].is_healthy(),
        "nothing listens on web3's port"
    );

    // the service the ring picks answers
    let key = "user1";
    let picked = web.service_by_hash("web", key).expect("a service");
    let said = web
        .request_by_hash("web", key, reqwest::Method::GET, "/who")
        .expect("request")
        .send()
        .await
        .expect("answer")
        .text()
        .await
        .expect("body");
    assert_eq!(said, picked.id());
    // by tag: only web1 has one
    let tagged = web
        .request_by_tag_and_hash("web", "red", key, reqwest::Method::GET, "/who")
        .expect("request")
        .send()
        .await
        .expect("answer")
        .text()
        .await
        .expect("body");
    assert_eq!(tagged, "web1");

    // unhealthy: off the ring, every key goes to the other; healthy again: back
    h1.store(false, Ordering::SeqCst);
    eventually("web1 leaves the ring", || {
        web.ring_members("web") == ["web2"]
    })
    .await;
    assert!(web.service_by_tag_and_hash("web", "red", key).is_none());
    h1.store(true, Ordering::SeqCst);
    eventually("web1 is back", || {
        web.ring_members("web") == ["web1", "web2"]
    })
    .await;

    // a stopped server fails the port check
    s2.cancel();
    eventually("web2 leaves", || web.ring_members("web") == ["web1"]).await;

    // gone from discovery: gone at once
    web.update(
        "web",
        vec![ServiceConf::new("web", "web1", "127.0.0.1", p1)],
    );
    assert_eq!(web.services("web").len(), 1);
    assert!(matches!(
        web.request_by_hash("nope", key, reqwest::Method::GET, "/"),
        Err(warren_cluster::backend::BackendError::NoService)
    ));
    web.shutdown().await;
    s1.cancel();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_group_follows_a_nats_kv_bucket() {
    Server::require(Kind::Nats);
    let nats = Server::start(Kind::Nats);
    let url = nats.url();
    let client = async_nats::connect(&url).await.expect("nats");
    let js = async_nats::jetstream::new(client);
    // the KV stream made by hand: the client's create_key_value needs a newer server
    js.create_stream(async_nats::jetstream::stream::Config {
        name: "KV_backends".into(),
        subjects: vec!["$KV.backends.>".into()],
        max_messages_per_subject: 1,
        allow_rollup: true,
        deny_delete: true,
        allow_direct: true,
        ..Default::default()
    })
    .await
    .expect("bucket");
    let kv = js.get_key_value("backends").await.expect("kv");
    let (a, b) = (Listener::start().await, Listener::start().await);
    kv.put(
        "gate1",
        format!("gate&gate1&127.0.0.1&{}&tcp", a.port).into(),
    )
    .await
    .expect("put");
    kv.put("junk", "not a member".into()).await.expect("put");

    let group = immediate_group();
    let stop = CancellationToken::new();
    let feed = group.clone();
    tokio::spawn(discovery::watch_nats_kv(
        move |g: &str, s| feed.update(g, s),
        discovery::NatsKvSource {
            url: url.clone(),
            bucket: "backends".into(),
        },
        gate_tcp(),
        stop.clone(),
    ));
    eventually("gate1 is on the ring", || {
        group.ring_members("gate") == ["gate1"]
    })
    .await;
    kv.put(
        "gate2",
        format!("gate&gate2&127.0.0.1&{}&tcp", b.port).into(),
    )
    .await
    .expect("put");
    eventually("gate2 joins", || {
        group.ring_members("gate") == ["gate1", "gate2"]
    })
    .await;
    kv.delete("gate1").await.expect("delete");
    eventually("gate1 leaves", || group.ring_members("gate") == ["gate2"]).await;
    assert_eq!(a.accepted.load(Ordering::SeqCst), 1);
    stop.cancel();
    group.shutdown().await;
}

#[cfg(feature = "etcd")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_group_follows_an_etcd_prefix() {
    use warren_cluster::backend::discovery_etcd::{EtcdSource, watch_etcd};
    Server::require(Kind::Etcd);
    let etcd = tokio::task::block_in_place(|| Server::start(Kind::Etcd));
    let url = etcd.url();
    let endpoint = url.replace("etcd://", "http://");
    let mut client = etcd_client::Client::connect([endpoint.as_str()], None)
        .await
        .expect("etcd");
    let (a, b) = (Listener::start().await, Listener::start().await);
    client
        .put(
            "backend-demo/gate1",
            format!("gate&gate1&127.0.0.1&{}&tcp", a.port),
            None,
        )
        .await
        .expect("put");
    client
        .put("backend-demo/junk", "not a member", None)
        .await
        .expect("put");
    // a neighbour prefix is not the group's
    client
        .put(
            "backend-demo-other/gate9",
            format!("gate&gate9&127.0.0.1&{}&tcp", b.port),
            None,
        )
        .await
        .expect("put");

    let group = immediate_group();
    let stop = CancellationToken::new();
    let feed = group.clone();
    tokio::spawn(watch_etcd(
        move |g: &str, s| feed.update(g, s),
        EtcdSource {
            url: url.clone(),
            prefix: "backend-demo".into(),
        },
        gate_tcp(),
        stop.clone(),
    ));
    eventually("gate1 is on the ring", || {
        group.ring_members("gate") == ["gate1"]
    })
    .await;
    client
        .put(
            "backend-demo/gate2",
            format!("gate&gate2&127.0.0.1&{}&tcp", b.port),
            None,
        )
        .await
        .expect("put");
    eventually("gate2 joins", || {
        group.ring_members("gate") == ["gate1", "gate2"]
    })
    .await;
    client
        .delete("backend-demo/gate1", None)
        .await
        .expect("delete");
    eventually("gate1 leaves", || group.ring_members("gate") == ["gate2"]).await;
    assert_eq!(a.accepted.load(Ordering::SeqCst), 1);
    stop.cancel();
    group.shutdown().await;
}

/// A group that closes a service as soon as it leaves discovery, as the discovery tests want.
fn immediate_group() -> Backends<GobaseTestCodec, NoHooks> {
    Backends::new(
        GobaseTestCodec::default(),
        NoHooks,
        BackendOptions {
            immediately: true,
            ..BackendOptions::default()
        },
    )
}

/// The members the discovery tests' group keeps: service `gate`, scheme `tcp`.
fn gate_tcp() -> MemberFilter {
    MemberFilter {
        group: "gate".into(),
        scheme: "tcp".into(),
    }
}

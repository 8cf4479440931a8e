//! Tests of `warren_cluster::etcd` against a real server: discovery, deregistration, lease
//! expiry of a silent node, a restart of etcd without flapping, and what `/readyz` is told.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::time::Instant;
use warren::registry::{InstanceRecord, NodeRecord, Registry};
use warren_cluster::etcd::EtcdRegistry;

use crate::kit::{self, Kind, Server};

const TTL: Duration = Duration::from_secs(2);

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

fn start_etcd() -> Server {
    Server::require(Kind::Etcd);
    tokio::task::block_in_place(|| Server::start(Kind::Etcd))
}

async fn registry(s: &Server) -> Arc<EtcdRegistry> {
    EtcdRegistry::connect(&s.url(), "warren", TTL)
        .await
        .expect("registry")
}

fn node(id: &str) -> NodeRecord {
    NodeRecord {
        id: id.into(),
        version: "0.1.0".into(),
        address: Some("127.0.0.1:1".into()),
        started_at_ms: 1,
        tags: vec![],
        instances: vec![InstanceRecord {
            module: "Login".into(),
            id: format!("Login@{id}"),
            client_handlers: vec!["HD_Login".into()],
            ..Default::default()
        }],
    }
}

fn ids(r: &dyn Registry) -> Vec<String> {
    r.watch().borrow().iter().map(|n| n.id.clone()).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcd_registries_see_each_other_and_deregistration_is_quick() {
    let s = start_etcd();
    let r1 = registry(&s).await;
    let r2 = registry(&s).await;
    assert_eq!(r1.kind(), "etcd");
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
    let r3 = registry(&s).await;
    assert_eq!(
        ids(&*r3),
        ["n1", "n2"],
        "a new registry reads the cluster at connect"
    );

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
    tokio::time::sleep(TTL).await;
    assert_eq!(
        ids(&*r2),
        ["n2"],
        "its keepalive stopped: it does not come back"
    );
    assert_eq!(ids(&*r3), ["n2"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_node_expires_with_its_lease() {
    let s = start_etcd();
    let r1 = registry(&s).await;
    let r2 = registry(&s).await;
    r1.register(node("n1")).await.expect("register n1");
    r2.register(node("n2")).await.expect("register n2");
    assert!(eventually(Duration::from_secs(5), || ids(&*r2) == ["n1", "n2"]).await);
    // dropping the handle stops its keepalive without deleting its key, as a crash would
    drop(r1);
    assert!(
        eventually(TTL + Duration::from_secs(3), || ids(&*r2) == ["n2"]).await,
        "gone when the lease ran out: {:?}",
        ids(&*r2)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn records_survive_an_etcd_restart_without_flapping() {
    let mut s = start_etcd();
    let r1 = registry(&s).await;
    let r2 = registry(&s).await;
    r1.register(node("n1")).await.expect("register n1");
    r2.register(node("n2")).await.expect("register n2");
    for r in [&r1, &r2] {
        assert!(eventually(Duration::from_secs(5), || ids(&**r) == ["n1", "n2"]).await);
    }
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
    // down for longer than the TTL
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
    // the records are in etcd again (or still) without a new register, and stay there past
    // several TTLs: the keepalives renewed or re-granted their leases
    let mut fresh = Vec::new();
    let end = Instant::now() + Duration::from_secs(20);
    while Instant::now() < end {
        if let Ok(r) = EtcdRegistry::connect(&s.url(), "warren", TTL).await {
            fresh = ids(&*r);
            if fresh == ["n1", "n2"] {
                break;
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(fresh, ["n1", "n2"], "records in etcd after the restart");
    tokio::time::sleep(TTL * 2).await;
    let later = registry(&s).await;
    assert_eq!(ids(&*later), ["n1", "n2"]);
    assert_eq!(ids(&*r1), ["n1", "n2"]);
    assert_eq!(ids(&*r2), ["n1", "n2"]);
    let seen = seen.lock().expect("lock").clone();
    assert!(
        seen.iter().all(|v| v == &["n1", "n2"]),
        "no flap during the outage: {seen:?}"
    );
}

/// `/readyz` asks the registry whether etcd is reachable: no soon after etcd dies, yes once it is
/// back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_registry_says_when_etcd_is_down_and_back() {
    let patience = Duration::from_secs(30);
    let mut s = start_etcd();
    let r = registry(&s).await;
    r.register(node("n1")).await.expect("register n1");
    assert!(r.is_connected());
    tokio::task::block_in_place(|| s.kill());
    assert!(
        eventually(patience, || !r.is_connected()).await,
        "still connected after etcd died"
    );
    tokio::task::block_in_place(|| s.restart());
    assert!(
        eventually(patience, || r.is_connected()).await,
        "not connected after etcd came back"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn first_connect_fails_clearly_when_etcd_is_down() {
    let port = kit::free_port();
    let e = EtcdRegistry::connect(&format!("etcd://127.0.0.1:{port}"), "warren", TTL)
        .await
        .expect_err("nothing listens there");
    assert!(e.to_string().contains("cannot reach etcd"), "{e}");
    let e = EtcdRegistry::connect("redis://127.0.0.1:1", "warren", TTL)
        .await
        .expect_err("not an etcd URL");
    assert!(e.to_string().contains("etcd://"), "{e}");
}

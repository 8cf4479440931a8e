//! Module execution: ordering, deadlines, panics, lifecycle.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use bytes::Bytes;
use serde_json::{Value, json};
use tokio::sync::Mutex;
use warren::config::{Config, ModuleConfig};
use warren::session::{Network, Protocol, Session};
use warren::{CallError, CallErrorKind, Context, Execution, Json, Module, Node};

#[derive(Default)]
struct Log {
    seen: Mutex<Vec<(String, u64)>>,
    running: AtomicUsize,
    max_running: AtomicUsize,
}

async fn record(cx: Context<Log>, Json(v): Json<Value>) -> Result<Value, CallError> {
    let log = cx.state();
    let now = log.running.fetch_add(1, Ordering::SeqCst) + 1;
    log.max_running.fetch_max(now, Ordering::SeqCst);
    let sid = cx.session().map(|s| s.id.to_string()).unwrap_or_default();
    // later messages sleep less, so any reordering would show
    let n = v["n"].as_u64().unwrap();
    tokio::time::sleep(Duration::from_millis(20u64.saturating_sub(n))).await;
    log.seen.lock().await.push((sid, n));
    log.running.fetch_sub(1, Ordering::SeqCst);
    Ok(json!(n))
}

fn session(id: &str) -> Arc<Session> {
    Arc::new(Session {
        id: id.into(),
        uid: None,
        settings: Default::default(),
        remote: "127.0.0.1:1".parse().unwrap(),
        network: Network::Tcp,
        protocol: Protocol::Mqtt,
        gate: "Gate001".into(),
    })
}

async fn node_with(module: Module) -> Node {
    let name = module.name().to_owned();
    Node::builder(Config::default())
        .module(module, ModuleConfig::new(&name))
        .start()
        .await
        .unwrap()
}

/// Submit n calls for each session in turn, awaiting only the hand-off, like the gate does.
async fn fire(
    node: &Node,
    module: &str,
    sessions: &[Arc<Session>],
    n: u64,
) -> Vec<warren::bus::Pending> {
    let router = node.handle().router();
    let mut pending = Vec::new();
    for i in 0..n {
        for s in sessions {
            let target = router.resolve(module, None, &s.id).unwrap();
            let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
            let body = Bytes::from(json!({ "n": i }).to_string());
            let call = target
                .call("Record", deadline)
                .session(Some(s.clone()))
                .body(body);
            let p = router.call(&target, call).await.unwrap();
            pending.push(p);
        }
    }
    pending
}

#[tokio::test]
async fn sequential_modules_run_one_message_at_a_time_in_order() {
    let log = Arc::new(Log::default());
    let module = Module::builder("Seq", ())
        .execution(Execution::Sequential)
        .handler("Record", {
            let log = log.clone();
            move |_cx: Context<()>, body: Json<Value>| {
                let log = log.clone();
                async move {
                    // re-enter through a Context<Log>-free path: inline the recording
                    let now = log.running.fetch_add(1, Ordering::SeqCst) + 1;
                    log.max_running.fetch_max(now, Ordering::SeqCst);
                    let n = body.0["n"].as_u64().unwrap();
                    tokio::time::sleep(Duration::from_millis(5)).await;
                    log.seen.lock().await.push((String::new(), n));
                    log.running.fetch_sub(1, Ordering::SeqCst);
                    Ok::<_, CallError>(json!(n))
                }
            }
        })
        .build();
    let node = node_with(module).await;
    let pending = fire(&node, "Seq", &[session("a"), session("b")], 5).await;
    for p in pending {
        p.await.unwrap();
    }
    assert_eq!(log.max_running.load(Ordering::SeqCst), 1);
    let seen: Vec<u64> = log.seen.lock().await.iter().map(|x| x.1).collect();
    assert_eq!(seen, vec![0, 0, 1, 1, 2, 2, 3, 3, 4, 4]);
    node.shutdown().await;
}

async fn report(cx: Context<Log>, _b: ()) -> Result<Value, CallError> {
    let log = cx.state();
    let seen = log.seen.lock().await.clone();
    Ok(json!({ "seen": seen, "max_running": log.max_running.load(Ordering::SeqCst) }))
}

#[tokio::test]
async fn concurrent_modules_keep_each_sessions_order_and_overlap_sessions() {
    let module = Module::builder("Conc", Log::default())
        .handler("Record", record)
        .handler("Report", report)
        .build();
    let node = node_with(module).await;
    let sessions: Vec<_> = (0..8).map(|i| session(&format!("s{i}"))).collect();
    let pending = fire(&node, "Conc", &sessions, 10).await;
    for p in pending {
        p.await.unwrap();
    }
    let r: Value = serde_json::from_slice(
        &node
            .handle()
            .call("Conc", "Report", None, Bytes::new(), None)
            .await
            .unwrap(),
    )
    .unwrap();
    let seen: Vec<(String, u64)> = serde_json::from_value(r["seen"].clone()).unwrap();
    for s in &sessions {
        let order: Vec<u64> = seen.iter().filter(|x| *x.0 == *s.id).map(|x| x.1).collect();
        assert_eq!(order, (0..10).collect::<Vec<_>>(), "session {}", s.id);
    }
    assert!(
        r["max_running"].as_u64().unwrap() > 1,
        "different sessions should overlap"
    );
    node.shutdown().await;
}

#[tokio::test]
async fn deadlines_panics_and_unknown_handlers_end_in_typed_errors() {
    let module = Module::builder("Bad", ())
        .execution(Execution::Sequential)
        .handler("Hang", |_cx: Context<()>, _b: ()| async {
            std::future::pending::<()>().await;
            Ok::<_, CallError>(())
        })
        .handler("Panic", |_cx: Context<()>, _b: ()| async {
            if true {
                panic!("boom");
            }
            Ok::<_, CallError>(())
        })
        .handler("Ok", |_cx: Context<()>, _b: ()| async {
            Ok::<_, CallError>("fine")
        })
        .build();
    let node = node_with(module).await;
    let h = node.handle();
    let e = h
        .call(
            "Bad",
            "Hang",
            None,
            Bytes::new(),
            Some(Duration::from_millis(100)),
        )
        .await
        .unwrap_err();
    assert_eq!(e, CallError::Timeout);
    assert_eq!(e.to_string(), "timeout: This is Call");
    // the sequential worker is free again: the hung handler was cancelled at its deadline
    let ok = h.call("Bad", "Ok", None, Bytes::new(), None).await.unwrap();
    assert_eq!(&ok[..], b"\"fine\"");
    let e = h
        .call("Bad", "Panic", None, Bytes::new(), None)
        .await
        .unwrap_err();
    assert_eq!(e.kind(), CallErrorKind::Panicked);
    assert!(e.to_string().contains("boom"));
    let e = h
        .call("Bad", "Nope", None, Bytes::new(), None)
        .await
        .unwrap_err();
    assert_eq!(e.to_string(), "Remote function(Nope) not found");
    let e = h
        .call("Missing", "X", None, Bytes::new(), None)
        .await
        .unwrap_err();
    assert_eq!(e.to_string(), "Service(type:Missing) not found");
    let e = h
        .call("Bad@Nope001", "Ok", None, Bytes::new(), None)
        .await
        .unwrap_err();
    assert_eq!(e.to_string(), "Service(type:Bad) not found");
    let ok = h
        .call("Bad@Bad001", "Ok", None, Bytes::new(), None)
        .await
        .unwrap();
    assert_eq!(&ok[..], b"\"fine\"");
    node.shutdown().await;
}

#[tokio::test]
async fn lifecycle_hooks_run_and_modules_call_each_other() {
    let inits = Arc::new(AtomicUsize::new(0));
    let destroys = Arc::new(AtomicUsize::new(0));
    let (i2, d2) = (inits.clone(), destroys.clone());
    let a = Module::builder("A", ())
        .on_init(move |cx: Context<()>| {
            let i2 = i2.clone();
            async move {
                assert_eq!(cx.instance().settings["greeting"], "hi");
                i2.fetch_add(1, Ordering::SeqCst);
                Ok(())
            }
        })
        .on_destroy(move |_cx: Context<()>| {
            let d2 = d2.clone();
            async move {
                d2.fetch_add(1, Ordering::SeqCst);
                Ok(())
            }
        })
        .handler(
            "Greet",
            |cx: Context<()>, Json(name): Json<String>| async move {
                Ok::<_, CallError>(format!(
                    "{} {name}",
                    cx.instance().settings["greeting"].as_str().unwrap()
                ))
            },
        )
        .build();
    let b = Module::builder("B", ())
        .handler("Ask", |cx: Context<()>, _b: ()| async move {
            let r: String = cx.call_json("A", "Greet", &"bob").await?;
            Ok::<_, CallError>(r)
        })
        .build();
    let mut acfg = ModuleConfig::new("A");
    acfg.settings.insert("greeting".into(), "hi".into());
    let node = Node::builder(Config::default())
        .module(a, acfg)
        .module(b, ModuleConfig::new("B"))
        .start()
        .await
        .unwrap();
    assert_eq!(inits.load(Ordering::SeqCst), 1);
    let r = node
        .handle()
        .call("B", "Ask", None, Bytes::new(), None)
        .await
        .unwrap();
    assert_eq!(&r[..], b"\"hi bob\"");
    node.shutdown().await;
    assert_eq!(destroys.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn failing_init_stops_the_node_from_starting() {
    let m = Module::builder("Broken", ())
        .on_init(|_cx: Context<()>| async { Err(CallError::app("no database")) })
        .build();
    let err = Node::builder(Config::default())
        .module(m, ModuleConfig::new("Broken"))
        .start()
        .await
        .err()
        .unwrap();
    assert_eq!(
        err.to_string(),
        "module Broken001 failed to start: no database"
    );
}

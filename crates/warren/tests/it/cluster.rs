//! Two nodes in one process joined by an in-memory transport and a shared registry: what the
//! remote bus adds (envelopes, replies, errors, deadlines, ordering, node loss), without a broker.
//! The brokers themselves are tested in crate `warren-cluster` and end to end in tests/e2e.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use futures_util::future::BoxFuture;
use serde_json::{Value, json};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use warren::config::{Config, ModuleConfig};
use warren::node::NodeError;
use warren::registry::{MemoryRegistry, Registry};
use warren::remote::{InboxFrames, Transport, TransportError, inbox_channel};
use warren::{CallError, Context, Json, Module, Node};

/// Inboxes in a map: the least a broker does.
#[derive(Default)]
struct Hub {
    inboxes: Mutex<HashMap<String, mpsc::Sender<Bytes>>>,
}

impl Transport for Hub {
    fn send(&self, node: &str, frame: Bytes) -> BoxFuture<'_, Result<(), TransportError>> {
        let tx = self.inboxes.lock().unwrap().get(node).cloned();
        Box::pin(async move {
            let tx = tx.ok_or_else(|| TransportError::Unavailable("no such inbox".into()))?;
            tx.send(frame)
                .await
                .map_err(|_| TransportError::Unavailable("inbox closed".into()))
        })
    }

    fn serve(
        &self,
        node: &str,
        _stop: CancellationToken,
    ) -> BoxFuture<'_, Result<InboxFrames, TransportError>> {
        let (inbox, frames) = inbox_channel(1024);
        self.inboxes.lock().unwrap().insert(node.into(), inbox);
        Box::pin(std::future::ready(Ok(frames)))
    }

    fn max_frame(&self) -> usize {
        64 * 1024
    }

    fn kind(&self) -> &'static str {
        "hub"
    }
}

#[derive(Default)]
struct Seen(Mutex<Vec<u64>>);

fn service() -> Module {
    Module::builder("Svc", Seen::default())
        .handler(
            "echo",
            |_cx: Context<Seen>, Json(v): Json<Value>| async move { Ok::<_, CallError>(Json(v)) },
        )
        .handler(
            "record",
            |cx: Context<Seen>, Json(n): Json<u64>| async move {
                cx.state().0.lock().unwrap().push(n);
                Ok::<_, CallError>(())
            },
        )
        .handler("seen", |cx: Context<Seen>, _b: Bytes| async move {
            Ok::<_, CallError>(Json(cx.state().0.lock().unwrap().clone()))
        })
        .handler("slow", |_cx: Context<Seen>, _b: Bytes| async move {
            tokio::time::sleep(Duration::from_secs(30)).await;
            Ok::<_, CallError>(())
        })
        .build()
}

async fn node(
    id: &str,
    hub: &Arc<Hub>,
    reg: &Arc<MemoryRegistry>,
    modules: Vec<(Module, &str)>,
) -> Result<Node, NodeError> {
    let mut cfg = Config::default();
    cfg.node.id = id.into();
    cfg.node.gate_id = format!("Gate-{id}");
    cfg.http.enabled = false;
    let mut b = Node::builder(cfg)
        .transport(hub.clone())
        .registry(reg.clone());
    for (m, inst) in modules {
        let mut mc = ModuleConfig::new(m.name());
        mc.id = Some(inst.into());
        b = b.module(m, mc);
    }
    b.start().await
}

/// Wait until `node` has learnt of an instance of `module` (registry news is asynchronous).
async fn see(node: &Node, module: &str) {
    for _ in 0..200 {
        if node.handle().router().has_module(module) {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("{module} never appeared");
}

async fn wait_for(mut f: impl FnMut() -> bool) {
    for _ in 0..200 {
        if f() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("condition never held");
}

#[tokio::test]
async fn calls_cross_the_bus_with_replies_errors_order_and_deadlines() {
    let hub = Arc::new(Hub::default());
    let reg = Arc::new(MemoryRegistry::default());
    let a = node("a", &hub, &reg, vec![]).await.unwrap();
    let b = node("b", &hub, &reg, vec![(service(), "Svc001")])
        .await
        .unwrap();
    let h = a.handle();
    see(&a, "Svc").await;

    let r = h
        .call("Svc", "echo", None, Bytes::from(r#"{"x":[1,2]}"#), None)
        .await
        .unwrap();
    assert_eq!(
        serde_json::from_slice::<Value>(&r).unwrap(),
        json!({"x": [1, 2]})
    );

    let e = h.call("Svc", "nope", None, Bytes::from("1"), None).await;
    assert_eq!(e, Err(CallError::HandlerNotFound("nope".into())));

    // calls sent in turn are handled in turn
    for n in 0..300u64 {
        h.call_nr("Svc", "record", None, Bytes::from(n.to_string()))
            .await
            .unwrap();
    }
    let seen = h
        .call("Svc", "seen", None, Bytes::new(), None)
        .await
        .unwrap();
    let seen: Vec<u64> = serde_json::from_slice(&seen).unwrap();
    assert_eq!(seen, (0..300).collect::<Vec<_>>());

    // the caller's deadline travels with the call
    let e = h
        .call(
            "Svc",
            "slow",
            None,
            Bytes::new(),
            Some(Duration::from_millis(200)),
        )
        .await;
    assert_eq!(e, Err(CallError::Timeout));

    // too large for the transport: refused before sending
    let big = Bytes::from(vec![b'1'; 100 * 1024]);
    let e = h.call("Svc", "echo", None, big, None).await.unwrap_err();
    assert_eq!(e.kind(), warren::CallErrorKind::TooLarge);

    // garbage on a node's inbox is dropped; the node keeps serving
    hub.send("b", Bytes::from_static(b"\x00garbage"))
        .await
        .unwrap();
    hub.send("b", Bytes::from_static(b"W\x01\xc1\xc1"))
        .await
        .unwrap();
    // right magic, then a call cut short and a session with a bad address
    hub.send("b", Bytes::from_static(b"W\x02\x01\x07\x00"))
        .await
        .unwrap();
    hub.send(
        "b",
        Bytes::from_static(b"W\x02\x03\x01\x00\x00\x00\x00\x00\x00\x00\xff\xff"),
    )
    .await
    .unwrap();
    assert!(
        h.call("Svc", "echo", None, Bytes::from("2"), None)
            .await
            .is_ok()
    );

    // a broadcast reaches every instance of the type, on every node
    let a2 = node("a2", &hub, &reg, vec![(service(), "Svc002")])
        .await
        .unwrap();
    wait_for(|| h.router().instances("Svc").len() == 2).await;
    assert_eq!(h.broadcast("Svc", "record", Bytes::from("1000")).await, 2);
    for inst in ["Svc@Svc001", "Svc@Svc002"] {
        let last = async {
            let seen = h
                .call(inst, "seen", None, Bytes::new(), None)
                .await
                .unwrap();
            serde_json::from_slice::<Vec<u64>>(&seen)
                .unwrap()
                .last()
                .copied()
        };
        assert_eq!(last.await, Some(1000), "{inst}");
    }
    a2.shutdown().await;

    // a second copy of an instance id is refused
    let dup = node("c", &hub, &reg, vec![(service(), "Svc001")]).await;
    assert!(
        matches!(dup, Err(NodeError::DuplicateInstance { .. })),
        "{:?}",
        dup.err()
    );

    b.shutdown().await;
    a.shutdown().await;
}

#[tokio::test]
async fn a_call_to_a_node_that_leaves_ends_at_once() {
    let hub = Arc::new(Hub::default());
    let reg = Arc::new(MemoryRegistry::default());
    let a = node("a", &hub, &reg, vec![]).await.unwrap();
    let _b = node("b", &hub, &reg, vec![(service(), "Svc001")])
        .await
        .unwrap();
    see(&a, "Svc").await;
    let h = a.handle().clone();
    let call = tokio::spawn(async move {
        h.call(
            "Svc",
            "slow",
            None,
            Bytes::new(),
            Some(Duration::from_secs(60)),
        )
        .await
    });
    tokio::time::sleep(Duration::from_millis(100)).await;
    let started = std::time::Instant::now();
    reg.deregister("b").await.unwrap();
    let r = call.await.unwrap();
    assert_eq!(r, Err(CallError::NodeLost("b".into())));
    assert!(started.elapsed() < Duration::from_secs(5));
    // and new calls find no instance
    let e = a
        .handle()
        .call("Svc", "echo", None, Bytes::from("1"), None)
        .await;
    assert_eq!(e, Err(CallError::ServiceNotFound("Svc".into())));
}

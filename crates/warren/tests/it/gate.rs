//! The gate in process: a node on port 0 driven by a real MQTT client (rumqttc). What the
//! request path promises: a reply for every request, one session's requests answered in the
//! order sent (a handler that waits holds back the ones behind it, not the connection), pushes
//! made by a handler before its reply, and a panicking handler answered with an error.

use std::time::Duration;

use bytes::Bytes;
use rumqttc::{AsyncClient, Event, EventLoop, MqttOptions, Packet, QoS};
use serde_json::{Value, json};
use warren::config::{Config, ListenerConfig, ModuleConfig};
use warren::{CallError, Context, Json, Module, Node};

async fn hello(_cx: Context, Json(v): Json<Value>) -> Result<Value, CallError> {
    Ok(json!({ "n": v["n"] }))
}

async fn slow(_cx: Context, Json(v): Json<Value>) -> Result<Value, CallError> {
    tokio::time::sleep(Duration::from_millis(20)).await;
    Ok(json!({ "n": v["n"] }))
}

async fn push_then_reply(cx: Context, Json(v): Json<Value>) -> Result<Value, CallError> {
    cx.push("Test/OnPush", Bytes::from(v.to_string())).await?;
    Ok(json!({ "n": v["n"] }))
}

async fn boom(_cx: Context, _b: ()) -> Result<Value, CallError> {
    panic!("boom")
}

fn test_module() -> Module {
    Module::builder("Test", ())
        .login_handler("HD_Hello", hello)
        .login_handler("HD_Slow", slow)
        .login_handler("HD_Push", push_then_reply)
        .login_handler("HD_Boom", boom)
        .build()
}

async fn start() -> Node {
    let mut config = Config::default();
    config.http.enabled = false;
    config
        .listeners
        .push(ListenerConfig::from_url("mqtt+mqant://127.0.0.1:0").unwrap());
    Node::builder(config)
        .module(test_module(), ModuleConfig::new("Test"))
        .start()
        .await
        .unwrap()
}

async fn connect(node: &Node, id: &str) -> (AsyncClient, EventLoop) {
    let addr = node.listeners()[0].local_addr;
    let mut opts = MqttOptions::new(id, addr.ip().to_string(), addr.port());
    opts.set_keep_alive(Duration::from_secs(30));
    let (client, mut events) = AsyncClient::new(opts, 64);
    loop {
        if let Event::Incoming(Packet::ConnAck(_)) = events.poll().await.unwrap() {
            break;
        }
    }
    (client, events)
}

/// Publish a request (QoS 0) on `topic`.
async fn ask(client: &AsyncClient, topic: impl Into<String>, body: impl Into<Vec<u8>>) {
    client
        .publish(topic, QoS::AtMostOnce, false, body)
        .await
        .unwrap();
}

/// The next `n` PUBLISHes the client receives: (topic, JSON body).
async fn next_publishes(events: &mut EventLoop, n: usize) -> Vec<(String, Value)> {
    let mut got = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), async {
        while got.len() < n {
            if let Event::Incoming(Packet::Publish(p)) = events.poll().await.unwrap() {
                got.push((p.topic.clone(), serde_json::from_slice(&p.payload).unwrap()));
            }
        }
    })
    .await
    .expect("replies within 10 s");
    got
}

#[tokio::test]
async fn requests_are_answered_in_order_with_pushes_first_and_panics_as_errors() {
    let node = start().await;
    let (client, mut events) = connect(&node, "c1").await;

    // a handler that completes at once
    ask(&client, "Test/HD_Hello/1", json!({"n": 1}).to_string()).await;
    let got = next_publishes(&mut events, 1).await;
    assert_eq!(got[0].0, "Test/HD_Hello/1");
    assert_eq!(got[0].1, json!({"Error": "", "Result": {"n": 1}}));

    // one session's requests keep their order: the waiting one first, then those behind it
    ask(&client, "Test/HD_Slow/2", json!({"n": 2}).to_string()).await;
    for n in 3..6 {
        ask(
            &client,
            format!("Test/HD_Hello/{n}"),
            json!({"n": n}).to_string(),
        )
        .await;
    }
    let got = next_publishes(&mut events, 4).await;
    let order: Vec<_> = got.iter().map(|(t, _)| t.as_str()).collect();
    assert_eq!(
        order,
        [
            "Test/HD_Slow/2",
            "Test/HD_Hello/3",
            "Test/HD_Hello/4",
            "Test/HD_Hello/5"
        ]
    );

    // a push made by a handler reaches the client before the handler's reply
    ask(&client, "Test/HD_Push/6", json!({"n": 6}).to_string()).await;
    let got = next_publishes(&mut events, 2).await;
    assert_eq!(got[0].0, "Test/OnPush");
    assert_eq!(got[1].0, "Test/HD_Push/6");

    // a panic is the caller's typed error; the connection goes on
    ask(&client, "Test/HD_Boom/7", "{}").await;
    ask(&client, "Test/HD_Hello/8", json!({"n": 8}).to_string()).await;
    let got = next_publishes(&mut events, 2).await;
    assert_eq!(got[0].0, "Test/HD_Boom/7");
    assert!(
        got[0].1["Error"].as_str().unwrap().contains("boom"),
        "{:?}",
        got[0].1
    );
    assert_eq!(got[1].1["Result"], json!({"n": 8}));

    node.shutdown().await;
}

#[tokio::test]
async fn two_connections_interleave_and_each_gets_its_own_replies() {
    let node = start().await;
    let (a, mut ea) = connect(&node, "a").await;
    let (b, mut eb) = connect(&node, "b").await;
    for n in 0..50 {
        ask(
            &a,
            format!("Test/HD_Hello/{n}"),
            json!({"n": n}).to_string(),
        )
        .await;
        ask(&b, format!("Test/HD_Slow/{n}"), json!({"n": n}).to_string()).await;
    }
    let (ga, gb) = tokio::join!(next_publishes(&mut ea, 50), async {
        // drive b's event loop too (its requests were queued while a was read)
        next_publishes(&mut eb, 50).await
    });
    for (i, (t, v)) in ga.iter().enumerate() {
        assert_eq!(t, &format!("Test/HD_Hello/{i}"));
        assert_eq!(v["Result"]["n"], json!(i));
    }
    for (i, (t, _)) in gb.iter().enumerate() {
        assert_eq!(t, &format!("Test/HD_Slow/{i}"));
    }
    node.shutdown().await;
}

//! The chat demo (examples/chat/README.md) through rumqttc: two users log in, join a room, chat
//! and see each other's pushes; every request is a QoS 1 publish answered on its own topic.

use std::collections::VecDeque;
use std::time::Duration;

use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};
use serde_json::{Value, json};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio::time::timeout;

use crate::Server;

/// How long any single reply or push may take.
const WAIT: Duration = Duration::from_secs(10);

/// One chat user: a rumqttc client whose event loop runs in a task and forwards every PUBLISH
/// it receives (topic, parsed JSON payload) to the test.
struct Peer {
    client: AsyncClient,
    inbox: mpsc::Receiver<(String, Value)>,
    /// Messages received while waiting for something else, in arrival order.
    seen: VecDeque<(String, Value)>,
    events: JoinHandle<()>,
    next_msgid: u32,
}

impl Peer {
    /// Connect as `id` to the server's mqant listener.
    fn connect(server: &Server, id: &str) -> Peer {
        let mut options = MqttOptions::new(id, "127.0.0.1", server.mqtt_port);
        options.set_keep_alive(Duration::from_secs(30));
        let (client, mut eventloop) = AsyncClient::new(options, 32);
        let (tx, inbox) = mpsc::channel(256);
        let events = tokio::spawn(async move {
            loop {
                match eventloop.poll().await {
                    Ok(Event::Incoming(Packet::Publish(p))) => {
                        let body = serde_json::from_slice(&p.payload).unwrap_or(Value::Null);
                        if tx.send((p.topic, body)).await.is_err() {
                            break;
                        }
                    }
                    Ok(_) => {}
                    Err(_) => break,
                }
            }
        });
        Peer {
            client,
            inbox,
            seen: VecDeque::new(),
            events,
            next_msgid: 0,
        }
    }

    /// Publish `body` on `Module/Handler/<n>` with QoS 1 and return the reply from that topic.
    async fn request(&mut self, route: &str, body: Value) -> Value {
        self.next_msgid += 1;
        let topic = format!("{route}/{}", self.next_msgid);
        self.client
            .publish(topic.as_str(), QoS::AtLeastOnce, false, body.to_string())
            .await
            .expect("queue the publish");
        self.take(&topic).await
    }

    /// The next message on `topic`, keeping anything else that arrives first for later.
    async fn take(&mut self, topic: &str) -> Value {
        if let Some(i) = self.seen.iter().position(|(t, _)| t == topic) {
            return self
                .seen
                .remove(i)
                .map(|(_, v)| v)
                .expect("index is in range");
        }
        loop {
            let (t, v) = timeout(WAIT, self.inbox.recv())
                .await
                .unwrap_or_else(|_| {
                    panic!(
                        "nothing on {topic} within {WAIT:?}; other messages: {:?}",
                        self.seen
                    )
                })
                .expect("the event loop ended (connection lost)");
            if t == topic {
                return v;
            }
            self.seen.push_back((t, v));
        }
    }

    /// Whether a message on `topic` is among those kept while waiting for something else.
    fn saw_before(&self, topic: &str) -> bool {
        self.seen.iter().any(|(t, _)| t == topic)
    }
}

impl Drop for Peer {
    fn drop(&mut self) {
        self.events.abort();
    }
}

fn ok(result: Value) -> Value {
    json!({"Error": "", "Result": result})
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_users_chat_in_a_room() {
    let server = Server::start(&[]);
    let mut alice = Peer::connect(&server, "alice");
    let mut bob = Peer::connect(&server, "bob");

    // Not logged in yet.
    assert_eq!(
        alice
            .request("Chat/HD_JoinChat", json!({"roomName": "mqant"}))
            .await,
        json!({"Error": "Not Logined", "Result": null})
    );

    for (peer, name) in [(&mut alice, "alice"), (&mut bob, "bob")] {
        let reply = peer
            .request(
                "Login/HD_Login",
                json!({"userName": name, "passWord": "Hello,anyone!"}),
            )
            .await;
        assert_eq!(reply, ok(json!(format!("login success {name}"))));
    }

    assert_eq!(
        alice
            .request("Chat/HD_JoinChat", json!({"roomName": "mqant"}))
            .await,
        ok(json!({"users": ["alice"]}))
    );
    assert_eq!(
        bob.request("Chat/HD_JoinChat", json!({"roomName": "mqant"}))
            .await,
        ok(json!({"users": ["alice", "bob"]}))
    );
    assert_eq!(
        alice.take("Chat/OnJoin").await,
        json!({"roomName": "mqant", "user": "bob"})
    );

    // A broadcast reaches both, and the sender's push precedes its reply.
    let say = json!({"roomName": "mqant", "from": "alice", "target": "*", "content": "hi"});
    assert_eq!(
        alice.request("Chat/HD_Say", say).await,
        ok(json!("say success"))
    );
    assert!(
        alice.saw_before("Chat/OnChat"),
        "alice's OnChat must arrive before her reply"
    );
    let hi = json!({"from": "alice", "msg": "hi", "roomName": "mqant", "target": "*"});
    assert_eq!(alice.take("Chat/OnChat").await, hi);
    assert_eq!(bob.take("Chat/OnChat").await, hi);

    // A private message reaches only its target.
    let say = json!({"roomName": "mqant", "from": "bob", "target": "alice", "content": "yo"});
    assert_eq!(
        bob.request("Chat/HD_Say", say).await,
        ok(json!("say success"))
    );
    assert_eq!(
        alice.take("Chat/OnChat").await,
        json!({"from": "bob", "msg": "yo", "roomName": "mqant", "target": "alice"})
    );
    assert!(
        !bob.saw_before("Chat/OnChat"),
        "a message to alice must not reach bob"
    );

    // Departure is announced to who stays.
    bob.client.disconnect().await.expect("queue the disconnect");
    assert_eq!(
        alice.take("Chat/OnLeave").await,
        json!({"roomName": "mqant", "user": "bob"})
    );

    // Not client-visible.
    assert_eq!(
        alice.request("Login/getRand", json!({})).await,
        json!({"Error": "Method(getRand) must begin with 'HD_'", "Result": null})
    );
}

//! [`RedisRpc`]: the TianQinS Redis RPC (docs/cluster.md, "Compatibility bridges"), so the Go
//! processes and the Python pymodule of TianQinS/websocket call the handlers of a warren module and
//! warren code calls their functions.
//!
//! Wire format, keys in this order:
//! - call (one consumer runs it): `RPUSH <topic> {"func":f,"args":[…],"ct":<caller topic>,"cb":<callback>}`
//! - broadcast (every subscriber runs it): `PUBLISH <topic> {"func":f,"args":[…],"pid":<sender>}`
//! - reply by `PUBLISH <ct> {"func":<cb>,"args":[v],"pid":<own pid>}` (Go peers), or by
//!   `RPUSH <ct> {"func":<cb>,"ct":<own topic>,"cb":"","args":[v]}` (the pymodule, which only
//!   reads its list).
//!
//! Return values: a warren handler returns one JSON value `v`, and the reply's `args` is `[v]`,
//! whatever `v` is — a handler that returns an array `[a, b]` replies `args: [[a, b]]`, one
//! return value, as a Go function returning a slice does. A handler that returns nothing (`()`,
//! encoded `null`) replies `[null]`, as a Go function returning only an error does on success.

use parking_lot::Mutex;
use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Weak};
use std::time::Duration;

use bytes::Bytes;
use futures_util::StreamExt;
use redis::Client;
use redis::aio::{ConnectionManager, MultiplexedConnection, PubSubStream};
use serde::Serialize;
use serde_json::{Map, Value};
use tokio::sync::{Semaphore, oneshot};
use tokio_util::sync::CancellationToken;
use warren::CallError;
use warren::config::RedisRpcConfig;
use warren::error::Detail;
use warren::node::NodeHandle;

use super::{
    BLOCK_S, Backoff, COMMAND_TIMEOUT, CONNECT_TIMEOUT, blocking_connection, bounded, client,
    manager,
};

/// Callback names of calls made by warren start with this (then a tag of the endpoint and a
/// counter: `warren.cb.<tag>.<n>`); a reply to one that no longer waits (it timed out, or went
/// to another endpoint sharing the topic) is dropped quietly instead of being run as a function.
const CB_PREFIX: &str = "warren.cb.";

/// Handlers of incoming calls running at once, at most; the consumers wait for a free slot, so
/// a flood stays in Redis rather than in memory.
const MAX_RUNNING: usize = 256;

/// Why a [`RedisRpc`] did not start. The detail keeps the Redis client's error as the source.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RedisRpcError {
    /// The configuration is unusable (URL, reply mode, empty topic or module).
    Config(Detail),
    /// Redis could not be reached, or the list or subscription could not be set up.
    Unavailable(Detail),
}

impl std::fmt::Display for RedisRpcError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            RedisRpcError::Config(d) => write!(f, "redis rpc config: {}", d.summary()),
            RedisRpcError::Unavailable(d) => write!(f, "redis rpc: {}", d.summary()),
        }
    }
}

impl std::error::Error for RedisRpcError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            RedisRpcError::Config(d) | RedisRpcError::Unavailable(d) => {
                d.source().map(|s| s as &(dyn std::error::Error + 'static))
            }
        }
    }
}

/// `RPUSH` call payload.
#[derive(Serialize)]
struct CallMsg<'a> {
    func: &'a str,
    args: &'a [Value],
    ct: &'a str,
    cb: &'a str,
}

/// `PUBLISH` payload (broadcasts and Go-style replies).
#[derive(Serialize)]
struct PubMsg<'a> {
    func: &'a str,
    args: &'a [Value],
    pid: &'a str,
}

/// `RPUSH` reply payload, the pymodule's shape.
#[derive(Serialize)]
struct ListReply<'a> {
    func: &'a str,
    ct: &'a str,
    cb: &'a str,
    args: &'a [Value],
}

/// Which consumer a message came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Path {
    /// `BLPOP <topic>`: a call, answered when it names a callback.
    List,
    /// `SUBSCRIBE <topic>`: a broadcast, never answered, skipped when it carries our pid.
    Channel,
}

impl Path {
    fn as_str(self) -> &'static str {
        match self {
            Path::List => "list",
            Path::Channel => "channel",
        }
    }
}

/// A decoded message.
#[derive(Debug, Clone, PartialEq)]
struct Incoming {
    func: String,
    args: Vec<Value>,
    ct: String,
    cb: String,
    pid: String,
}

/// Decode a message of either shape; missing `args`/`ct`/`cb`/`pid` are empty, as upstream.
fn parse(bytes: &[u8]) -> Result<Incoming, String> {
    let v: Value = serde_json::from_slice(bytes).map_err(|e| format!("not JSON: {e}"))?;
    let Value::Object(mut o) = v else {
        return Err("not a JSON object".into());
    };
    fn text(o: &mut Map<String, Value>, k: &str) -> Result<String, String> {
        match o.remove(k) {
            None | Some(Value::Null) => Ok(String::new()),
            Some(Value::String(s)) => Ok(s),
            Some(_) => Err(format!("{k:?} is not a string")),
        }
    }
    let func = text(&mut o, "func")?;
    if func.is_empty() {
        return Err("no \"func\"".into());
    }
    let args = match o.remove("args") {
        None | Some(Value::Null) => Vec::new(),
        Some(Value::Array(a)) => a,
        Some(_) => return Err("\"args\" is not an array".into()),
    };
    Ok(Incoming {
        func,
        args,
        ct: text(&mut o, "ct")?,
        cb: text(&mut o, "cb")?,
        pid: text(&mut o, "pid")?,
    })
}

/// A handler's reply bytes as one JSON value (`null` for none; non-JSON bytes as a string).
fn reply_value(bytes: &[u8]) -> Value {
    if bytes.is_empty() {
        return Value::Null;
    }
    serde_json::from_slice(bytes)
        .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(bytes).into_owned()))
}

/// One TianQinS RPC endpoint: consumes `BLPOP <topic>` and `SUBSCRIBE <topic>`, runs the named
/// handlers of the configured module, answers callbacks, and calls peers.
pub struct RedisRpc {
    topic: String,
    pid: String,
    module: String,
    reply_by_list: bool,
    reply_via_list: HashSet<String>,
    conn: ConnectionManager,
    node: NodeHandle,
    /// Random per endpoint, so processes that share a topic never take each other's replies.
    cb_tag: String,
    next_cb: AtomicU64,
    waiting: Mutex<HashMap<String, oneshot::Sender<Vec<Value>>>>,
    malformed: AtomicU64,
    running: Arc<Semaphore>,
    stop: CancellationToken,
}

impl std::fmt::Debug for RedisRpc {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisRpc")
            .field("topic", &self.topic)
            .field("pid", &self.pid)
            .field("module", &self.module)
            .finish_non_exhaustive()
    }
}

impl RedisRpc {
    /// Connect, start consuming the list and the channel of `cfg.topic` (both confirmed before
    /// this returns), and serve until `stop`. Lists live in `cfg.db` (when nonzero; else the
    /// URL's database); the pid of broadcasts is `cfg.pid`, or the node id.
    pub async fn start(
        cfg: &RedisRpcConfig,
        node: NodeHandle,
        stop: CancellationToken,
    ) -> Result<Arc<RedisRpc>, RedisRpcError> {
        let reply_by_list = match cfg.reply.as_str() {
            "publish" => false,
            "list" => true,
            other => {
                return Err(RedisRpcError::Config(
                    format!("reply = {other:?} (expected \"publish\" or \"list\")").into(),
                ));
            }
        };
        if cfg.topic.is_empty() || cfg.module.is_empty() {
            return Err(RedisRpcError::Config(
                "topic and module must not be empty".into(),
            ));
        }
        let db = (cfg.db != 0).then_some(cfg.db);
        let client = client(&cfg.url, db).map_err(RedisRpcError::Config)?;
        let conn = manager(&client).await.map_err(RedisRpcError::Unavailable)?;
        let blocking = blocking_connection(&client)
            .await
            .map_err(RedisRpcError::Unavailable)?;
        let sub = subscribe(&client, &cfg.topic)
            .await
            .map_err(RedisRpcError::Unavailable)?;
        let rpc = Arc::new(RedisRpc {
            topic: cfg.topic.clone(),
            pid: cfg
                .pid
                .clone()
                .filter(|p| !p.is_empty())
                .unwrap_or_else(|| node.id().to_owned()),
            module: cfg.module.clone(),
            reply_by_list,
            reply_via_list: cfg.reply_via_list.iter().cloned().collect(),
            conn,
            node,
            cb_tag: uuid::Uuid::new_v4().simple().to_string()[..8].to_owned(),
            next_cb: AtomicU64::new(1),
            waiting: Mutex::new(HashMap::new()),
            malformed: AtomicU64::new(0),
            running: Arc::new(Semaphore::new(MAX_RUNNING)),
            stop: stop.clone(),
        });
        let weak = Arc::downgrade(&rpc);
        tokio::spawn(list_loop(
            weak.clone(),
            client.clone(),
            blocking,
            cfg.topic.clone(),
            stop.clone(),
        ));
        tokio::spawn(channel_loop(
            weak.clone(),
            client,
            sub,
            cfg.topic.clone(),
            stop.clone(),
        ));
        tokio::spawn(async move {
            stop.cancelled().await;
            if let Some(rpc) = weak.upgrade() {
                // calls still waiting will get no reply: fail them now
                rpc.waiting().clear();
            }
        });
        tracing::info!(topic = %rpc.topic, module = %rpc.module, pid = %rpc.pid, "redis rpc serving");
        Ok(rpc)
    }

    /// This endpoint's topic (its list and channel; the `ct` of its calls).
    pub fn topic(&self) -> &str {
        &self.topic
    }

    /// The pid stamped on its broadcasts and filtered out of those it receives.
    pub fn pid(&self) -> &str {
        &self.pid
    }

    /// Messages dropped because they were not valid RPC JSON, since start.
    pub fn malformed(&self) -> u64 {
        self.malformed.load(Ordering::Relaxed)
    }

    fn waiting(&self) -> parking_lot::MutexGuard<'_, HashMap<String, oneshot::Sender<Vec<Value>>>> {
        self.waiting.lock()
    }

    /// Call `func` on the process serving `topic` and wait up to `timeout` for its callback;
    /// returns the callback's `args` (the function's return values).
    pub async fn call(
        &self,
        topic: &str,
        func: &str,
        args: Vec<Value>,
        timeout: Duration,
    ) -> Result<Vec<Value>, CallError> {
        if self.stop.is_cancelled() {
            return Err(CallError::Closed);
        }
        let cb = format!(
            "{CB_PREFIX}{}.{}",
            self.cb_tag,
            self.next_cb.fetch_add(1, Ordering::Relaxed)
        );
        let (tx, rx) = oneshot::channel();
        self.waiting().insert(cb.clone(), tx);
        let msg = CallMsg {
            func,
            args: &args,
            ct: &self.topic,
            cb: &cb,
        };
        if let Err(e) = self.push(topic, &msg).await {
            self.waiting().remove(&cb);
            return Err(e);
        }
        match tokio::time::timeout(timeout, rx).await {
            Ok(Ok(args)) => Ok(args),
            Ok(Err(_)) => Err(CallError::Closed),
            Err(_) => {
                self.waiting().remove(&cb);
                Err(CallError::Timeout)
            }
        }
    }

    /// Call `func` on the process serving `topic` without a callback (`ct` and `cb` empty).
    pub async fn notify(&self, topic: &str, func: &str, args: Vec<Value>) -> Result<(), CallError> {
        let msg = CallMsg {
            func,
            args: &args,
            ct: "",
            cb: "",
        };
        self.push(topic, &msg).await
    }

    /// Run `func` on every process subscribed to `topic` (except those sharing our pid).
    pub async fn broadcast(
        &self,
        topic: &str,
        func: &str,
        args: Vec<Value>,
    ) -> Result<(), CallError> {
        let msg = PubMsg {
            func,
            args: &args,
            pid: &self.pid,
        };
        self.publish(topic, &msg).await
    }

    async fn push(&self, list: &str, msg: &impl Serialize) -> Result<(), CallError> {
        self.send("RPUSH", list, msg).await
    }

    async fn publish(&self, channel: &str, msg: &impl Serialize) -> Result<(), CallError> {
        self.send("PUBLISH", channel, msg).await
    }

    async fn send(&self, op: &str, target: &str, msg: &impl Serialize) -> Result<(), CallError> {
        let json = serde_json::to_vec(msg)
            .map_err(|e| CallError::bad_request(Detail::caused("cannot encode rpc message", e)))?;
        let mut cmd = redis::cmd(op);
        cmd.arg(target).arg(json);
        let mut conn = self.conn.clone();
        bounded(COMMAND_TIMEOUT, cmd.query_async::<i64>(&mut conn))
            .await
            .map(|_| ())
            .map_err(|why| {
                metrics::counter!("warren_redis_rpc_send_errors_total").increment(1);
                CallError::Unavailable(why)
            })
    }

    /// Take one message from a consumer: complete a waiting call, or run the function on a task
    /// of its own (waiting for a free slot first).
    async fn receive(self: &Arc<Self>, bytes: &[u8], path: Path) {
        let m = match parse(bytes) {
            Ok(m) => m,
            Err(why) => {
                self.malformed.fetch_add(1, Ordering::Relaxed);
                metrics::counter!("warren_redis_rpc_malformed_total", "path" => path.as_str())
                    .increment(1);
                tracing::warn!(topic = %self.topic, path = path.as_str(), len = bytes.len(), %why, "dropped a malformed rpc message");
                return;
            }
        };
        // a callback of ours completes its call by either path, even one we published to
        // ourselves (callback names are unique to this endpoint)
        let waiter = self.waiting().remove(&m.func);
        if let Some(tx) = waiter {
            let _ = tx.send(m.args);
            return;
        }
        if path == Path::Channel && !m.pid.is_empty() && m.pid == self.pid {
            tracing::trace!(topic = %self.topic, func = %m.func, "skipped our own broadcast");
            return;
        }
        if m.func.starts_with(CB_PREFIX) {
            tracing::debug!(topic = %self.topic, func = %m.func, "callback for a call that no longer waits");
            return;
        }
        let Ok(permit) = self.running.clone().acquire_owned().await else {
            return;
        };
        let rpc = self.clone();
        tokio::spawn(async move {
            rpc.run(m, path).await;
            drop(permit);
        });
    }

    async fn run(&self, m: Incoming, path: Path) {
        let body = match serde_json::to_vec(&m.args) {
            Ok(b) => Bytes::from(b),
            Err(e) => {
                tracing::warn!(func = %m.func, error = %e, "cannot encode rpc arguments");
                return;
            }
        };
        let v = match self
            .node
            .call(&self.module, &m.func, None, body, None)
            .await
        {
            Ok(bytes) => reply_value(&bytes),
            Err(CallError::HandlerNotFound(_)) => {
                metrics::counter!("warren_redis_rpc_unknown_total").increment(1);
                tracing::warn!(topic = %self.topic, module = %self.module, func = %m.func, "unknown rpc function; no reply");
                return;
            }
            Err(e) => {
                tracing::warn!(topic = %self.topic, module = %self.module, func = %m.func, error = %e, "rpc function failed; no reply");
                return;
            }
        };
        if path != Path::List || m.cb.is_empty() || m.ct.is_empty() {
            return;
        }
        let args = [v];
        let r = if self.reply_by_list || self.reply_via_list.contains(&m.ct) {
            let msg = ListReply {
                func: &m.cb,
                ct: &self.topic,
                cb: "",
                args: &args,
            };
            self.push(&m.ct, &msg).await
        } else {
            let msg = PubMsg {
                func: &m.cb,
                args: &args,
                pid: &self.pid,
            };
            self.publish(&m.ct, &msg).await
        };
        if let Err(e) = r {
            tracing::warn!(topic = %m.ct, func = %m.cb, error = %e, "could not send an rpc reply");
        }
    }
}

/// A confirmed subscription to `topic`.
async fn subscribe(client: &Client, topic: &str) -> Result<PubSubStream, Detail> {
    let mut ps = bounded(CONNECT_TIMEOUT, client.get_async_pubsub()).await?;
    bounded(CONNECT_TIMEOUT, ps.subscribe(topic)).await?;
    Ok(ps.into_on_message())
}

/// `BLPOP <topic>` until `stop` (checked between pops, which return within [`BLOCK_S`]);
/// reconnect with backoff.
async fn list_loop(
    rpc: Weak<RedisRpc>,
    client: Client,
    conn: MultiplexedConnection,
    topic: String,
    stop: CancellationToken,
) {
    let mut conn = Some(conn);
    let mut backoff = Backoff::new(Duration::from_secs(5));
    let mut down = false;
    while !stop.is_cancelled() {
        if conn.is_none() {
            match blocking_connection(&client).await {
                Ok(c) => {
                    if down {
                        tracing::info!(%topic, "redis rpc list consumer reconnected");
                    }
                    down = false;
                    backoff.reset();
                    conn = Some(c);
                }
                Err(_) => {
                    tokio::select! {
                        _ = stop.cancelled() => break,
                        _ = tokio::time::sleep(backoff.step()) => continue,
                    }
                }
            }
        }
        let Some(c) = conn.as_mut() else { continue };
        let mut cmd = redis::cmd("BLPOP");
        cmd.arg(&topic).arg(BLOCK_S);
        let pop = bounded(
            Duration::from_secs_f64(BLOCK_S) + Duration::from_secs(5),
            cmd.query_async::<Option<(Vec<u8>, Vec<u8>)>>(c),
        )
        .await;
        match pop {
            Ok(None) => {}
            Ok(Some((_, msg))) => {
                let Some(rpc) = rpc.upgrade() else { break };
                rpc.receive(&msg, Path::List).await;
            }
            Err(why) => {
                if !down {
                    tracing::warn!(%topic, %why, "redis rpc list read failed; reconnecting");
                    down = true;
                }
                conn = None;
            }
        }
    }
}

/// `SUBSCRIBE <topic>` until `stop`; resubscribe with backoff when the connection drops.
async fn channel_loop(
    rpc: Weak<RedisRpc>,
    client: Client,
    sub: PubSubStream,
    topic: String,
    stop: CancellationToken,
) {
    let mut sub = Some(sub);
    let mut backoff = Backoff::new(Duration::from_secs(5));
    loop {
        let Some(s) = sub.as_mut() else {
            match subscribe(&client, &topic).await {
                Ok(s) => {
                    tracing::info!(%topic, "redis rpc channel resubscribed");
                    backoff.reset();
                    sub = Some(s);
                }
                Err(_) => {
                    tokio::select! {
                        _ = stop.cancelled() => return,
                        _ = tokio::time::sleep(backoff.step()) => {}
                    }
                }
            }
            continue;
        };
        tokio::select! {
            _ = stop.cancelled() => return,
            m = s.next() => match m {
                Some(msg) => {
                    let Some(rpc) = rpc.upgrade() else { return };
                    rpc.receive(msg.get_payload_bytes(), Path::Channel).await;
                }
                None => {
                    tracing::warn!(%topic, "redis rpc subscription lost; resubscribing");
                    sub = None;
                }
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn emitted_keys_keep_the_wire_order() {
        let args = [json!("arg1"), json!("arg2")];
        let call = CallMsg {
            func: "test",
            args: &args,
            ct: "test",
            cb: "callback",
        };
        assert_eq!(
            serde_json::to_string(&call).expect("json"),
            r#"{"func":"test","args":["arg1","arg2"],"ct":"test","cb":"callback"}"#
        );
        let one = [json!("args: arg1, arg2.")];
        let publ = PubMsg {
            func: "callback",
            args: &one,
            pid: "p",
        };
        assert_eq!(
            serde_json::to_string(&publ).expect("json"),
            r#"{"func":"callback","args":["args: arg1, arg2."],"pid":"p"}"#
        );
        let list = ListReply {
            func: "callback",
            ct: "rpc",
            cb: "",
            args: &one,
        };
        assert_eq!(
            serde_json::to_string(&list).expect("json"),
            r#"{"func":"callback","ct":"rpc","cb":"","args":["args: arg1, arg2."]}"#
        );
    }

    #[test]
    fn both_shapes_and_python_spacing_parse() {
        let m = parse(
            br#"{"func": "test", "ct": "pyRpc", "cb": "callback", "args": ["arg1", "arg2"]}"#,
        )
        .expect("python call");
        assert_eq!(
            m,
            Incoming {
                func: "test".into(),
                args: vec![json!("arg1"), json!("arg2")],
                ct: "pyRpc".into(),
                cb: "callback".into(),
                pid: String::new(),
            }
        );
        let m = parse(br#"{"func":"reload","args":[],"pid":"node-a"}"#).expect("broadcast");
        assert_eq!((m.func.as_str(), m.pid.as_str()), ("reload", "node-a"));
        let m = parse(br#"{"func":"f"}"#).expect("bare");
        assert!(m.args.is_empty() && m.ct.is_empty() && m.cb.is_empty());
    }

    #[test]
    fn malformed_messages_are_refused_with_a_reason() {
        for (bytes, why) in [
            (&b"{not json"[..], "not JSON"),
            (b"[1,2]", "not a JSON object"),
            (b"{\"args\":[]}", "no \"func\""),
            (b"{\"func\":\"\"}", "no \"func\""),
            (b"{\"func\":1}", "\"func\" is not a string"),
            (
                b"{\"func\":\"f\",\"args\":\"x\"}",
                "\"args\" is not an array",
            ),
            (b"{\"func\":\"f\",\"cb\":[]}", "\"cb\" is not a string"),
        ] {
            let e = parse(bytes).expect_err("refused");
            assert!(e.contains(why), "{e} / {why}");
        }
    }

    #[test]
    fn reply_values_are_one_value() {
        assert_eq!(reply_value(b""), Value::Null);
        assert_eq!(reply_value(b"null"), Value::Null);
        assert_eq!(reply_value(b"[1,2]"), json!([1, 2]));
        assert_eq!(reply_value(b"\"x\""), json!("x"));
        assert_eq!(reply_value(b"plain"), json!("plain"));
    }
}

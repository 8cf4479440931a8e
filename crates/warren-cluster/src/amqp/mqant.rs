//! The mqant v1 RPC over RabbitMQ (docs/cluster.md, "Compatibility bridges"): mqant peers call
//! warren module instances, and warren calls instances that mqant peers serve.
//!
//! - Served instances (running on this node): each consumes its own durable queue, bound with its
//!   binding key to its exchange; a `CallInfo` runs the named handler on the local instance and,
//!   when `Reply` is set, a `ResultInfo` goes back to the queue named by the `reply_to` header.
//! - Reached instances (served by peers): a [`MqantClient`] per instance, a [`Bus`] the router
//!   uses like any other, publishes `CallInfo`s with that instance's exchange and binding key and
//!   correlates the `ResultInfo`s on one server-named callback queue by `Cid`.
//!
//! Bad input from the broker (not JSON, wrong shape, a reply for no waiting call) is logged,
//! counted and dropped; a call whose `Expired` has passed is dropped unanswered, as upstream
//! does.

use parking_lot::Mutex;
use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures_util::future::BoxFuture;
use lapin::message::Delivery;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicQosOptions, QueueBindOptions, QueueDeclareOptions,
};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{BasicProperties, Channel, Consumer};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use tokio::sync::oneshot;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use warren::bus::{Bus, Call, Pending};
use warren::config::{ModuleBusConfig, ModuleConfig};
use warren::error::{CallError, Detail};
use warren::node::NodeHandle;
use warren::registry::{InstanceRecord, NodeRecord};
use warren::session::{Network as Net, Session};

use super::link::{
    ExchangeSpec, Link, Live, PublishError, Subscriber, exchange_kind, failed, run_subscription,
    short, subscribe_now,
};
use super::{AmqpError, MAX_MESSAGE, now_ms, redact};

/// The module type of a gate: an instance of it served by an mqant peer is an mqant gate, whose
/// functions are the session operations (docs/cluster.md, "Compatibility bridges").
const GATE: &str = "Gate";

/// Deliveries a served instance or a callback queue may hold unacknowledged.
const PREFETCH: u16 = 256;
/// Longest deadline taken from a peer's `Expired` (a day): a clock far off cannot park a call
/// forever.
const MAX_LEFT_MS: i64 = 86_400_000;

/// A request (`CallInfo`) as warren sends it: Go's field order, for byte parity with mqant.
#[derive(Serialize)]
struct CallOut<'a> {
    #[serde(rename = "Cid")]
    cid: &'a str,
    #[serde(rename = "Fn")]
    func: &'a str,
    #[serde(rename = "Args")]
    args: Vec<Value>,
    #[serde(rename = "Expired")]
    expired: i64,
    #[serde(rename = "Reply")]
    reply: bool,
    /// The zero `ResultInfo` mqant sends inside every request.
    #[serde(rename = "Result")]
    result: ResultOut<'a>,
}

/// A request as a peer sends it.
#[derive(Deserialize)]
struct CallIn {
    #[serde(rename = "Cid", default)]
    cid: String,
    #[serde(rename = "Fn")]
    func: String,
    #[serde(rename = "Args", default)]
    args: Option<Vec<Value>>,
    /// Unix ms; a number of any JSON kind (Go sends an integer, scripts may send a float).
    #[serde(rename = "Expired")]
    expired: serde_json::Number,
    #[serde(rename = "Reply", default)]
    reply: bool,
}

/// A reply (`ResultInfo`) as warren sends it.
#[derive(Serialize)]
struct ResultOut<'a> {
    #[serde(rename = "Cid")]
    cid: &'a str,
    #[serde(rename = "Error")]
    error: &'a str,
    #[serde(rename = "Result")]
    result: Value,
}

/// A reply as a peer sends it.
#[derive(Deserialize)]
struct ResultIn {
    #[serde(rename = "Cid")]
    cid: String,
    #[serde(rename = "Error", default)]
    error: Option<String>,
    #[serde(rename = "Result", default)]
    result: Value,
}

fn expired_ms(n: &serde_json::Number) -> Option<i64> {
    n.as_i64().or_else(|| {
        n.as_f64()
            .filter(|f| f.is_finite() && f.abs() < 9.0e18)
            .map(|f| f as i64)
    })
}

/// The `Args` of a session operation sent to an mqant gate (`Bind`, `Push`, `Send`, …): the
/// call's body is the JSON array of the operation's arguments (how warren's session operations
/// address a gate). `Send`'s body is a Go `[]byte` on mqant's side, which its client marshals as
/// base64: it travels so here too.
fn gate_args(func: &str, body: &[u8]) -> Result<Vec<Value>, CallError> {
    let mut args = match serde_json::from_slice::<Value>(body) {
        Ok(Value::Array(a)) => a,
        _ => {
            return Err(CallError::bad_request(Detail::new(format!(
                "a call of the mqant gate's {func} takes a JSON array of its arguments"
            ))));
        }
    };
    if func == "Send"
        && let Some(Value::String(b)) = args.get_mut(2)
    {
        use base64::Engine as _;
        *b = base64::engine::general_purpose::STANDARD.encode(b.as_bytes());
    }
    Ok(args)
}

/// The JSON value of a handler's reply bytes, or the bytes as a string when they are not JSON.
fn json_or_string(b: &[u8]) -> Value {
    serde_json::from_slice(b).unwrap_or_else(|_| Value::String(String::from_utf8_lossy(b).into()))
}

/// How many `Args` a warren handler takes, as mqant counts a function's parameters: the session
/// export map and the body.
const ARITY: usize = 2;

/// A call's `Args` as warren hands them to a handler, `[export map, body]`: the session (if the
/// map is one) and the body. Any other count is refused as mqant refuses it ([`arity_error`]).
fn split_args(mut args: Vec<Value>) -> Result<(Option<Arc<Session>>, Bytes), CallError> {
    if args.len() != ARITY {
        return Err(arity_error(&args));
    }
    let body = args.pop().unwrap_or(Value::Null);
    let session = args
        .pop()
        .and_then(|m| Session::from_export_map(&m, Net::Tcp))
        .map(Arc::new);
    Ok((session, Bytes::from(body.to_string())))
}

/// How a warren handler looks to mqant's reflection, in Go's notation: what mqant's arity error
/// names after the arguments.
const HANDLER_SIGNATURE: &str =
    "<func(map[string]interface {}, interface {}) (interface {}, string) Value>";

/// mqant's error for a call whose `Args` do not match the function's parameters, word for word:
/// `The number of params <args> is not adapted.<function>`, the arguments printed as Go's `%s`
/// prints the `[]interface{}` they decode to (docs/cluster.md, "Compatibility bridges").
fn arity_error(args: &[Value]) -> CallError {
    let mut text = String::from("The number of params ");
    go_s(args, &mut text);
    text.push_str(" is not adapted.");
    text.push_str(HANDLER_SIGNATURE);
    CallError::BadRequest(Detail::new(text))
}

/// Append `args` as Go's `fmt` prints a `[]interface{}` decoded from JSON with the `%s` verb:
/// strings as they are, maps as `map[k:v …]` in key order, slices as `[a b]`, and other values
/// as `%!s(float64=1)`, `%!s(bool=true)`, `%!s(<nil>)`. Iterative: the depth of the input does
/// not reach the stack.
fn go_s(args: &[Value], out: &mut String) {
    enum Item<'a> {
        Value(&'a Value),
        Text(&'a str),
    }
    fn push_list<'a>(stack: &mut Vec<Item<'a>>, items: &'a [Value]) {
        stack.push(Item::Text("]"));
        for (i, v) in items.iter().enumerate().rev() {
            stack.push(Item::Value(v));
            if i > 0 {
                stack.push(Item::Text(" "));
            }
        }
    }
    out.push('[');
    let mut stack = Vec::new();
    push_list(&mut stack, args);
    while let Some(item) = stack.pop() {
        let v = match item {
            Item::Text(t) => {
                out.push_str(t);
                continue;
            }
            Item::Value(v) => v,
        };
        match v {
            Value::String(s) => out.push_str(s),
            Value::Null => out.push_str("%!s(<nil>)"),
            Value::Bool(b) => {
                out.push_str(if *b {
                    "%!s(bool=true)"
                } else {
                    "%!s(bool=false)"
                });
            }
            Value::Number(n) => {
                out.push_str("%!s(float64=");
                go_float(n.as_f64().unwrap_or(f64::NAN), out);
                out.push(')');
            }
            Value::Array(a) => {
                out.push('[');
                push_list(&mut stack, a);
            }
            Value::Object(o) => {
                out.push_str("map[");
                stack.push(Item::Text("]"));
                let mut keys: Vec<(&String, &Value)> = o.iter().collect();
                keys.sort_by(|a, b| a.0.cmp(b.0));
                for (i, (k, v)) in keys.into_iter().enumerate().rev() {
                    stack.push(Item::Value(v));
                    stack.push(Item::Text(":"));
                    stack.push(Item::Text(k));
                    if i > 0 {
                        stack.push(Item::Text(" "));
                    }
                }
            }
        }
    }
}

/// Append `f` as Go's `%v` prints a float64: the shortest digits that read back, in `%e` form
/// (`1e+06`, `1.5e-05`) when the decimal exponent is below -4 or at least 6, as strconv's
/// shortest `%g` decides, else in plain form (`123456`, `0.001`).
fn go_float(f: f64, out: &mut String) {
    if !f.is_finite() {
        out.push_str(if f.is_nan() {
            "NaN"
        } else if f > 0.0 {
            "+Inf"
        } else {
            "-Inf"
        });
        return;
    }
    // Rust's `{:e}` gives the same shortest round-trip digits: d[.ddd]e<exp>
    let sci = format!("{:e}", f.abs());
    let (mantissa, exp) = sci.split_once('e').unwrap_or((&sci, "0"));
    let exp: i32 = exp.parse().unwrap_or(0);
    let digits: String = mantissa.chars().filter(char::is_ascii_digit).collect();
    if f.is_sign_negative() {
        out.push('-');
    }
    if !(-4..6).contains(&exp) {
        out.push_str(&digits[..1]);
        if digits.len() > 1 {
            out.push('.');
            out.push_str(&digits[1..]);
        }
        out.push('e');
        out.push(if exp < 0 { '-' } else { '+' });
        out.push_str(&format!("{:02}", exp.unsigned_abs()));
        return;
    }
    // plain: the decimal point after exp + 1 digits
    let point = exp + 1;
    if point <= 0 {
        out.push_str("0.");
        for _ in 0..-point {
            out.push('0');
        }
        out.push_str(&digits);
    } else {
        let point = point as usize;
        if digits.len() <= point {
            out.push_str(&digits);
            for _ in digits.len()..point {
                out.push('0');
            }
        } else {
            out.push_str(&digits[..point]);
            out.push('.');
            out.push_str(&digits[point..]);
        }
    }
}

/// The error of a peer's `ResultInfo` as a typed error (the texts are listed in docs/cluster.md,
/// "Compatibility bridges"; the mapping is `CallError::from_wire_text`).
#[cfg(test)]
fn error_from_text(text: String) -> CallError {
    CallError::from_wire_text(&text)
}

/// The reply queue a request names: the `reply_to` header (mqant), else the property.
fn reply_to(props: &BasicProperties) -> Option<String> {
    let header = props
        .headers()
        .as_ref()
        .and_then(|h| h.inner().get("reply_to"))
        .and_then(|v| match v {
            AMQPValue::LongString(s) => Some(String::from_utf8_lossy(s.as_bytes()).into_owned()),
            AMQPValue::ShortString(s) => Some(s.as_str().to_owned()),
            AMQPValue::ByteArray(b) => Some(String::from_utf8_lossy(b.as_slice()).into_owned()),
            _ => None,
        });
    header
        .or_else(|| props.reply_to().as_ref().map(|s| s.as_str().to_owned()))
        .filter(|s| !s.is_empty())
}

fn text_props() -> BasicProperties {
    BasicProperties::default()
        .with_content_type("text/plain".into())
        .with_delivery_mode(1)
}

/// A served instance: consumes its queue and runs the calls on the local instance.
struct Server {
    what: String,
    link: Arc<Link>,
    node: NodeHandle,
    module: String,
    instance: String,
    bus: ModuleBusConfig,
}

impl Server {
    fn refuse(&self, reason: &'static str, why: &dyn std::fmt::Display) {
        metrics::counter!("warren_mqant_calls_dropped_total", "reason" => reason).increment(1);
        tracing::warn!(instance = %self.instance, queue = %self.bus.queue, reason, %why, "dropped an mqant call");
    }

    async fn handle(&self, data: &[u8], props: &BasicProperties) {
        let info: CallIn = match serde_json::from_slice(data) {
            Ok(i) => i,
            Err(e) => return self.refuse("malformed", &e),
        };
        let Some(expired) = expired_ms(&info.expired) else {
            return self.refuse("malformed", &"Expired is not a number of milliseconds");
        };
        let now = now_ms();
        if expired < now {
            metrics::counter!("warren_mqant_calls_dropped_total", "reason" => "expired")
                .increment(1);
            tracing::warn!(instance = %self.instance, cid = %info.cid, func = %info.func, late_ms = now - expired, "dropped an mqant call past its Expired");
            return;
        }
        let left =
            Duration::from_millis(u64::try_from((expired - now).min(MAX_LEFT_MS)).unwrap_or(0));
        let deadline = Instant::now() + left;
        let split = split_args(info.args.unwrap_or_default());
        if let Err(e) = &split {
            metrics::counter!("warren_mqant_calls_refused_total", "reason" => "arity").increment(1);
            tracing::warn!(instance = %self.instance, cid = %info.cid, func = %info.func, error = %e, "refused an mqant call: wrong number of Args");
        }
        let router = self.node.router();
        // resolved and handed to the instance here, in delivery order, so one peer's calls reach
        // the module in the order sent; only the wait for the result runs on its own task
        let accepted = match split.and_then(|(session, body)| {
            router
                .resolve_call(
                    &self.module,
                    Some(&self.instance),
                    &info.func,
                    session.as_deref(),
                    &body,
                )
                .map(|t| (t, session, body))
        }) {
            Ok((t, session, body)) => {
                let call = t.call(&info.func, deadline).session(session).body(body);
                if info.reply {
                    router.call(&t, call).await.map(Some)
                } else {
                    router.call_nr(&t, call).await.map(|()| None)
                }
            }
            Err(e) => Err(e),
        };
        if !info.reply {
            if let Err(e) = accepted {
                tracing::debug!(instance = %self.instance, func = %info.func, error = %e, "mqant call without reply failed");
            }
            return;
        }
        let Some(to) = reply_to(props) else {
            return self.refuse(
                "no_reply_to",
                &"Reply is set but no reply_to header or property",
            );
        };
        let link = self.link.clone();
        tokio::spawn(async move {
            let r = match accepted {
                Err(e) => Err(e),
                Ok(None) => Err(CallError::Closed),
                Ok(Some(pending)) => tokio::time::timeout_at(deadline, pending)
                    .await
                    .unwrap_or(Err(CallError::Timeout)),
            };
            answer(&link, &to, &info.cid, r).await;
        });
    }
}

/// Send a `ResultInfo` to a caller's reply queue (default exchange, empty headers).
async fn answer(link: &Link, to: &str, cid: &str, r: Result<Bytes, CallError>) {
    let encode = |r: &Result<Bytes, CallError>| {
        let (error, result) = match r {
            Ok(b) => (String::new(), json_or_string(b)),
            Err(e) => (e.wire_text(), Value::Null),
        };
        serde_json::to_vec(&ResultOut {
            cid,
            error: &error,
            result,
        })
    };
    let mut payload = match encode(&r) {
        Ok(p) => p,
        Err(e) => {
            tracing::warn!(%cid, error = %e, "cannot encode a ResultInfo");
            return;
        }
    };
    if payload.len() > MAX_MESSAGE {
        let e = CallError::TooLarge {
            size: payload.len(),
            max: MAX_MESSAGE,
        };
        let Ok(p) = encode(&Err(e)) else { return };
        payload = p;
    }
    let props = text_props().with_headers(FieldTable::default());
    if let Err(e) = link.publish("", to, &payload, props, false).await {
        tracing::warn!(%cid, reply_to = %to, error = ?e, "could not send an mqant reply");
    }
}

impl Subscriber for Server {
    fn what(&self) -> &str {
        &self.what
    }

    fn subscribe<'a>(
        &'a self,
        live: &'a Live,
    ) -> BoxFuture<'a, Result<(Channel, Consumer), Detail>> {
        Box::pin(async move {
            let b = &self.bus;
            let err = failed;
            let ch = live.conn.create_channel().await.map_err(err("channel"))?;
            ch.basic_qos(PREFETCH, BasicQosOptions::default())
                .await
                .map_err(err("qos"))?;
            // the peer-compatible declarations (docs/cluster.md, "Compatibility bridges"; the
            // exchange is declared by the link on every connect)
            let opts = QueueDeclareOptions {
                durable: true,
                auto_delete: false,
                exclusive: false,
                ..Default::default()
            };
            ch.queue_declare(short(&b.queue)?, opts, FieldTable::default())
                .await
                .map_err(err("queue.declare"))?;
            ch.queue_bind(
                short(&b.queue)?,
                short(&b.exchange)?,
                short(&b.binding_key)?,
                QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await
            .map_err(err("queue.bind"))?;
            let consumer = ch
                .basic_consume(
                    short(&b.queue)?,
                    short(&b.consumer_tag)?,
                    BasicConsumeOptions::default(),
                    FieldTable::default(),
                )
                .await
                .map_err(err("basic.consume"))?;
            Ok((ch, consumer))
        })
    }

    fn deliver(&self, d: Delivery) -> BoxFuture<'_, bool> {
        Box::pin(async move {
            // acknowledged on receipt, as mqant does: a call is never run twice
            if let Err(e) = d.acker.ack(BasicAckOptions::default()).await {
                tracing::debug!(instance = %self.instance, error = %e, "ack failed (connection lost?)");
            }
            self.handle(&d.data, &d.properties).await;
            true
        })
    }
}

type Waiting = HashMap<String, oneshot::Sender<Result<Bytes, CallError>>>;

/// The callback queue of one broker connection: replies to every [`MqantClient`] on it,
/// correlated by `Cid`.
struct Replies {
    what: String,
    queue: Mutex<Option<String>>,
    waiting: Mutex<Waiting>,
}

impl Replies {
    fn queue(&self) -> Option<String> {
        self.queue.lock().clone()
    }

    fn waiting(&self) -> parking_lot::MutexGuard<'_, Waiting> {
        self.waiting.lock()
    }
}

impl Subscriber for Replies {
    fn what(&self) -> &str {
        &self.what
    }

    fn subscribe<'a>(
        &'a self,
        live: &'a Live,
    ) -> BoxFuture<'a, Result<(Channel, Consumer), Detail>> {
        Box::pin(async move {
            let err = failed;
            let ch = live.conn.create_channel().await.map_err(err("channel"))?;
            ch.basic_qos(PREFETCH, BasicQosOptions::default())
                .await
                .map_err(err("qos"))?;
            // server-named, exclusive, auto-deleted: it dies with this connection, and the next
            // connection gets a new one
            let opts = QueueDeclareOptions {
                durable: false,
                auto_delete: true,
                exclusive: true,
                ..Default::default()
            };
            let q = ch
                .queue_declare(short("")?, opts, FieldTable::default())
                .await
                .map_err(err("callback queue.declare"))?;
            let name = q.name().clone();
            let consumer = ch
                .basic_consume(
                    name.clone(),
                    short("")?,
                    BasicConsumeOptions::default(),
                    FieldTable::default(),
                )
                .await
                .map_err(err("callback basic.consume"))?;
            *self.queue.lock() = Some(name.to_string());
            Ok((ch, consumer))
        })
    }

    fn deliver(&self, d: Delivery) -> BoxFuture<'_, bool> {
        Box::pin(async move {
            if let Err(e) = d.acker.ack(BasicAckOptions::default()).await {
                tracing::debug!(error = %e, "ack failed (connection lost?)");
            }
            let r: ResultIn = match serde_json::from_slice(&d.data) {
                Ok(r) => r,
                Err(e) => {
                    metrics::counter!("warren_mqant_replies_dropped_total", "reason" => "malformed")
                        .increment(1);
                    tracing::warn!(error = %e, len = d.data.len(), "dropped a malformed mqant ResultInfo");
                    return true;
                }
            };
            let Some(tx) = self.waiting().remove(&r.cid) else {
                metrics::counter!("warren_mqant_replies_dropped_total", "reason" => "unknown_cid")
                    .increment(1);
                tracing::debug!(cid = %r.cid, "mqant reply for a call that no longer waits");
                return true;
            };
            let out = match r.error.filter(|e| !e.is_empty()) {
                Some(e) => Err(CallError::from_wire_text(&e)),
                None => Ok(Bytes::from(r.result.to_string())),
            };
            let _ = tx.send(out);
            true
        })
    }

    fn lost(&self) {
        *self.queue.lock() = None;
        let lost: Vec<_> = self.waiting().drain().map(|(_, tx)| tx).collect();
        for tx in lost {
            let _ = tx.send(Err(CallError::Unavailable(
                "the connection to the broker was lost before the reply".into(),
            )));
        }
    }
}

/// Removes a call's waiter when its result future ends or is dropped.
struct Forget {
    replies: Arc<Replies>,
    cid: String,
}

impl Drop for Forget {
    fn drop(&mut self) {
        self.replies.waiting().remove(&self.cid);
    }
}

/// A module instance served by an mqant peer, reached over RabbitMQ: the [`Bus`] the router uses
/// for it (registered with [`Router::add_static`](warren::router::Router::add_static) by
/// [`MqantBridge::start`]).
pub struct MqantClient {
    link: Arc<Link>,
    replies: Arc<Replies>,
    module: String,
    instance: String,
    exchange: String,
    binding_key: String,
    /// The instance is an mqant gate: its functions are the session operations, called with
    /// their own arguments (the call's body is the `Args` array), not `[session, body]`.
    gate: bool,
}

impl std::fmt::Debug for MqantClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MqantClient")
            .field("module", &self.module)
            .field("instance", &self.instance)
            .field("exchange", &self.exchange)
            .field("binding_key", &self.binding_key)
            .finish_non_exhaustive()
    }
}

impl MqantClient {
    /// The instance id this client reaches.
    pub fn instance(&self) -> &str {
        &self.instance
    }

    async fn call(&self, call: Call, reply: bool) -> Result<Option<Pending>, CallError> {
        let queue = self.replies.queue().ok_or_else(|| {
            CallError::Unavailable("not connected to the broker (no callback queue)".into())
        })?;
        let cid = uuid::Uuid::new_v4().to_string();
        let left = call.deadline.saturating_duration_since(Instant::now());
        let expired = now_ms().saturating_add(i64::try_from(left.as_millis()).unwrap_or(i64::MAX));
        let args = if self.gate {
            gate_args(&call.handler, &call.body)?
        } else {
            let export = call
                .session
                .as_deref()
                .map_or_else(|| Value::Object(Map::new()), Session::export_map);
            vec![export, json_or_string(&call.body)]
        };
        let zero = ResultOut {
            cid: "",
            error: "",
            result: Value::Null,
        };
        let payload = serde_json::to_vec(&CallOut {
            cid: &cid,
            func: &call.handler,
            args,
            expired,
            reply,
            result: zero,
        })
        .map_err(|e| CallError::bad_request(Detail::caused("cannot encode CallInfo", e)))?;
        if payload.len() > MAX_MESSAGE {
            return Err(CallError::TooLarge {
                size: payload.len(),
                max: MAX_MESSAGE,
            });
        }
        let mut headers = FieldTable::default();
        headers.insert(
            short("reply_to").map_err(CallError::bad_request)?,
            AMQPValue::LongString(queue.as_str().into()),
        );
        let props = text_props()
            .with_headers(headers)
            .with_reply_to(short(&queue).map_err(CallError::bad_request)?);
        let wait = if reply {
            let (tx, rx) = oneshot::channel();
            self.replies.waiting().insert(cid.clone(), tx);
            let forget = Forget {
                replies: self.replies.clone(),
                cid: cid.clone(),
            };
            Some((rx, forget))
        } else {
            None
        };
        let sent = self
            .link
            .publish(&self.exchange, &self.binding_key, &payload, props, true)
            .await;
        if let Err(e) = sent {
            metrics::counter!("warren_mqant_send_errors_total").increment(1);
            return Err(match e {
                PublishError::Down(why) | PublishError::Refused(why) => CallError::Unavailable(why),
                PublishError::Unroutable => CallError::Unavailable(
                    format!(
                        "no queue bound to {} on exchange {} (is the mqant peer of {} running?)",
                        self.binding_key, self.exchange, self.instance
                    )
                    .into(),
                ),
            });
        }
        let Some((rx, forget)) = wait else {
            return Ok(None);
        };
        let deadline = call.deadline;
        Ok(Some(Pending::Remote(Box::pin(async move {
            let _forget = forget;
            match tokio::time::timeout_at(deadline, rx).await {
                Ok(Ok(r)) => r,
                Ok(Err(_)) => Err(CallError::Closed),
                Err(_) => Err(CallError::Timeout),
            }
        }))))
    }
}

impl Bus for MqantClient {
    fn send(
        &self,
        _node: &str,
        call: Call,
        reply: bool,
    ) -> BoxFuture<'_, Result<Option<Pending>, CallError>> {
        Box::pin(self.call(call, reply))
    }

    fn kind(&self) -> &'static str {
        "mqant"
    }
}

/// The running mqant bridge of a node: the instances it serves to mqant peers and the peers'
/// instances it reaches. It runs until the token given to [`MqantBridge::start`] fires (or
/// [`MqantBridge::stop`]); dropping it does not stop it.
pub struct MqantBridge {
    links: Vec<Arc<Link>>,
    clients: Vec<Arc<MqantClient>>,
    served: Vec<String>,
    stop: CancellationToken,
}

impl std::fmt::Debug for MqantBridge {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MqantBridge")
            .field("served", &self.served)
            .field("clients", &self.clients)
            .finish_non_exhaustive()
    }
}

/// A module entry's mqant bus settings, checked.
fn mqant_bus(m: &ModuleConfig, serving: bool) -> Result<ModuleBusConfig, AmqpError> {
    let bad = |why: Detail| AmqpError::Config {
        instance: m.instance_id(),
        why,
    };
    let b = m
        .bus
        .clone()
        .ok_or_else(|| bad("no [module.bus] settings".into()))?;
    if b.kind != "amqp" || b.mode != "mqant" {
        return Err(bad(format!(
            "bus kind {:?} mode {:?} is not the mqant AMQP bus",
            b.kind, b.mode
        )
        .into()));
    }
    if b.exchange.is_empty() {
        return Err(bad("exchange is empty".into()));
    }
    if serving && b.queue.is_empty() {
        return Err(bad("queue is empty".into()));
    }
    for s in [&b.exchange, &b.queue, &b.binding_key, &b.consumer_tag] {
        short(s).map_err(bad)?;
    }
    Ok(b)
}

type Group = (
    Vec<(ModuleConfig, ModuleBusConfig)>,
    Vec<(ModuleConfig, ModuleBusConfig)>,
);

impl MqantBridge {
    /// Serve the instances in `serve` (running on this node) to mqant peers, and make the
    /// instances in `reach` (served by peers) callable through `node` (registered on its router
    /// as node `amqp/<instance id>`). Every entry must carry `bus = {kind = "amqp", mode =
    /// "mqant", …}`. One connection per broker URI; each reconnects by itself. Fails if a broker
    /// cannot be reached or refuses a declaration now.
    pub async fn start(
        node: NodeHandle,
        serve: Vec<ModuleConfig>,
        reach: Vec<ModuleConfig>,
        stop: CancellationToken,
    ) -> Result<MqantBridge, AmqpError> {
        let own = stop.child_token();
        match Self::start_inner(&node, serve, reach, &own).await {
            Ok((links, clients, served)) => Ok(MqantBridge {
                links,
                clients,
                served,
                stop: own,
            }),
            Err(e) => {
                own.cancel();
                Err(e)
            }
        }
    }

    async fn start_inner(
        node: &NodeHandle,
        serve: Vec<ModuleConfig>,
        reach: Vec<ModuleConfig>,
        stop: &CancellationToken,
    ) -> Result<(Vec<Arc<Link>>, Vec<Arc<MqantClient>>, Vec<String>), AmqpError> {
        let mut by_uri: BTreeMap<String, Group> = BTreeMap::new();
        for m in serve {
            let b = mqant_bus(&m, true)?;
            by_uri.entry(b.uri.clone()).or_default().0.push((m, b));
        }
        for m in reach {
            let b = mqant_bus(&m, false)?;
            by_uri.entry(b.uri.clone()).or_default().1.push((m, b));
        }
        let (mut links, mut clients, mut served) = (Vec::new(), Vec::new(), Vec::new());
        for (uri, (to_serve, to_reach)) in by_uri {
            let mut exchanges: BTreeMap<String, String> = BTreeMap::new();
            for (m, b) in to_serve.iter().chain(&to_reach) {
                match exchanges.get(&b.exchange) {
                    Some(t) if *t != b.exchange_type => {
                        return Err(AmqpError::Config {
                            instance: m.instance_id(),
                            why: format!(
                                "exchange {} is declared both {t} and {}",
                                b.exchange, b.exchange_type
                            )
                            .into(),
                        });
                    }
                    _ => {
                        exchanges.insert(b.exchange.clone(), b.exchange_type.clone());
                    }
                }
            }
            let specs = exchanges
                .into_iter()
                .map(|(name, t)| ExchangeSpec {
                    kind: exchange_kind(&t),
                    name,
                })
                .collect();
            let link = Link::open(&uri, "mqant", specs, stop.child_token())
                .await
                .map_err(|why| AmqpError::Connect {
                    url: redact(&uri),
                    why,
                })?;
            links.push(link.clone());
            for (m, b) in to_serve {
                let instance = m.instance_id();
                let server = Arc::new(Server {
                    what: format!("mqant queue {} of {instance}", b.queue),
                    link: link.clone(),
                    node: node.clone(),
                    module: m.kind.clone(),
                    instance: instance.clone(),
                    bus: b,
                });
                let first =
                    subscribe_now(&link, &*server)
                        .await
                        .map_err(|why| AmqpError::Broker {
                            what: server.what.clone(),
                            why,
                        })?;
                tokio::spawn(run_subscription(
                    link.clone(),
                    server,
                    stop.child_token(),
                    first,
                ));
                tracing::info!(%instance, "serving an instance to mqant peers");
                served.push(instance);
            }
            if to_reach.is_empty() {
                continue;
            }
            let replies = Arc::new(Replies {
                what: format!("mqant callback queue on {}", redact(&uri)),
                queue: Mutex::new(None),
                waiting: Mutex::new(HashMap::new()),
            });
            let first = subscribe_now(&link, &*replies)
                .await
                .map_err(|why| AmqpError::Broker {
                    what: replies.what.clone(),
                    why,
                })?;
            tokio::spawn(run_subscription(
                link.clone(),
                replies.clone(),
                stop.child_token(),
                first,
            ));
            for (m, b) in to_reach {
                let instance = m.instance_id();
                let client = Arc::new(MqantClient {
                    link: link.clone(),
                    replies: replies.clone(),
                    module: m.kind.clone(),
                    instance: instance.clone(),
                    exchange: b.exchange,
                    binding_key: b.binding_key,
                    gate: m.kind == GATE,
                });
                let record = NodeRecord {
                    id: format!("amqp/{instance}"),
                    version: "mqant".into(),
                    address: None,
                    started_at_ms: u64::try_from(now_ms()).unwrap_or(0),
                    tags: Vec::new(),
                    instances: vec![InstanceRecord {
                        module: m.kind.clone(),
                        id: instance.clone(),
                        // a peer's handlers are unknown: mqant-mode gates admit by prefix
                        client_handlers: Vec::new(),
                        login_handlers: Vec::new(),
                        tags: m.tags.clone(),
                        sticky: m.sticky,
                        watches_sessions: false,
                        queue_group: false,
                    }],
                };
                node.router().add_static(record, client.clone());
                tracing::info!(%instance, module = %m.kind, "reaching an mqant peer's instance");
                clients.push(client);
            }
        }
        Ok((links, clients, served))
    }

    /// The clients of the peers' instances, in config order.
    pub fn clients(&self) -> &[Arc<MqantClient>] {
        &self.clients
    }

    /// Instance ids served to mqant peers.
    pub fn served(&self) -> &[String] {
        &self.served
    }

    /// Whether every broker connection is up now.
    pub fn is_connected(&self) -> bool {
        self.links.iter().all(|l| l.current().is_some())
    }

    /// Stop consuming and close the connections (calls through the clients then fail as
    /// unavailable).
    pub fn stop(&self) {
        self.stop.cancel();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn call_info_has_mqant_key_order() {
        let zero = ResultOut {
            cid: "",
            error: "",
            result: Value::Null,
        };
        let s = serde_json::to_string(&CallOut {
            cid: "c",
            func: "HD_Login",
            args: vec![Value::Object(Map::new()), serde_json::json!({"a":1})],
            expired: 5,
            reply: true,
            result: zero,
        })
        .expect("encode");
        assert_eq!(
            s,
            r#"{"Cid":"c","Fn":"HD_Login","Args":[{},{"a":1}],"Expired":5,"Reply":true,"Result":{"Cid":"","Error":"","Result":null}}"#
        );
        let r = serde_json::to_string(&ResultOut {
            cid: "c",
            error: "",
            result: Value::String("login success alice".into()),
        })
        .expect("encode");
        assert_eq!(
            r,
            r#"{"Cid":"c","Error":"","Result":"login success alice"}"#
        );
    }

    #[test]
    fn args_give_session_and_body() {
        let map = serde_json::json!({"IP":"127.0.0.1:5","Network":"tcp","Serverid":"Gate001","Sessionid":"s1","Settings":{},"Userid":"alice"});
        let (s, b) = split_args(vec![map, serde_json::json!({"x":1})]).expect("two args");
        let s = s.expect("session");
        assert_eq!((&*s.id, s.uid.as_deref()), ("s1", Some("alice")));
        assert_eq!(&b[..], br#"{"x":1}"#);
        let (s, b) =
            split_args(vec![serde_json::json!({}), serde_json::json!("hi")]).expect("two args");
        assert!(s.is_none());
        assert_eq!(&b[..], br#""hi""#);
        let sig = HANDLER_SIGNATURE;
        let e = split_args(vec![serde_json::json!(1)]).unwrap_err();
        assert_eq!(
            e.wire_text(),
            format!("The number of params [%!s(float64=1)] is not adapted.{sig}")
        );
        let e = split_args(vec![]).unwrap_err();
        assert_eq!(
            e.wire_text(),
            format!("The number of params [] is not adapted.{sig}")
        );
    }

    #[test]
    fn arguments_print_as_go_prints_them() {
        let text = |v: Value| {
            let mut out = String::new();
            go_s(v.as_array().expect("an array"), &mut out);
            out
        };
        assert_eq!(
            text(serde_json::json!([
                {"b": [1, "x", null], "a": true, "c": {}},
                "plain",
                false,
                [[]]
            ])),
            "[map[a:%!s(bool=true) b:[%!s(float64=1) x %!s(<nil>)] c:map[]] plain %!s(bool=false) [[]]]"
        );
        let float = |f: f64| {
            let mut out = String::new();
            go_float(f, &mut out);
            out
        };
        for (f, go) in [
            (0.0, "0"),
            (-0.0, "-0"),
            (1.0, "1"),
            (1.5, "1.5"),
            (123456.0, "123456"),
            (1_000_000.0, "1e+06"),
            (1_234_567.0, "1.234567e+06"),
            (0.0001, "0.0001"),
            (0.00001, "1e-05"),
            (-2.5e-7, "-2.5e-07"),
            (1e100, "1e+100"),
            (1488888888888.0, "1.488888888888e+12"),
        ] {
            assert_eq!(float(f), go, "{f}");
        }
        // deep input does not reach the stack
        let mut deep = Value::Null;
        for _ in 0..100_000 {
            deep = Value::Array(vec![deep]);
        }
        let mut out = String::new();
        go_s(std::slice::from_ref(&deep), &mut out);
        assert!(out.starts_with("[[[[") && out.ends_with("]]]]"));
        // taken apart level by level: serde_json's own drop is recursive
        while let Value::Array(mut a) = deep {
            deep = a.pop().unwrap_or(Value::Null);
        }
    }

    #[test]
    fn a_gate_takes_its_arguments_and_send_a_base64_body() {
        assert_eq!(
            gate_args("Bind", br#"["s1","alice"]"#).unwrap(),
            [serde_json::json!("s1"), serde_json::json!("alice")]
        );
        assert_eq!(
            gate_args("Send", br#"["s1","Chat/OnChat","{\"a\":1}"]"#).unwrap(),
            [
                serde_json::json!("s1"),
                serde_json::json!("Chat/OnChat"),
                serde_json::json!("eyJhIjoxfQ==")
            ]
        );
        assert!(gate_args("Bind", b"{}").is_err());
    }

    #[test]
    fn peer_errors_become_typed() {
        assert_eq!(
            error_from_text("timeout: This is Call".into()),
            CallError::Timeout
        );
        assert_eq!(
            error_from_text("Remote function(HD_X) not found".into()),
            CallError::HandlerNotFound("HD_X".into())
        );
        assert_eq!(error_from_text("client closed".into()), CallError::Closed);
        assert_eq!(
            error_from_text("No room".into()),
            CallError::App("No room".into())
        );
        assert_eq!(json_or_string(b"[1]"), serde_json::json!([1]));
        assert_eq!(json_or_string(b"x y"), Value::String("x y".into()));
    }

    #[test]
    fn expired_accepts_integers_and_floats() {
        let n = |s: &str| serde_json::from_str::<serde_json::Number>(s).expect("number");
        assert_eq!(expired_ms(&n("1488888888888")), Some(1_488_888_888_888));
        assert_eq!(expired_ms(&n("1488888888888.5")), Some(1_488_888_888_888));
        assert_eq!(expired_ms(&n("1e300")), None);
    }

    #[test]
    fn reply_queue_from_header_then_property() {
        let mut h = FieldTable::default();
        h.insert("reply_to".into(), AMQPValue::LongString("amq.gen-1".into()));
        let p = BasicProperties::default()
            .with_headers(h)
            .with_reply_to("amq.gen-2".into());
        assert_eq!(reply_to(&p).as_deref(), Some("amq.gen-1"));
        let p = BasicProperties::default().with_reply_to("amq.gen-2".into());
        assert_eq!(reply_to(&p).as_deref(), Some("amq.gen-2"));
        assert_eq!(reply_to(&BasicProperties::default()), None);
    }
}

//! `[[rpc_route]]` (docs/cluster.md, "Calling TianQinS functions from config"): a
//! client-callable handler served by a function of a TianQinS process (Go or the Python
//! pymodule) over the Redis RPC, with no module code.
//!
//! Each route's module is a module of its own, routed by the gate like any other; its handler
//! turns the client's body into the call's `args`, calls the function through the node's first
//! `[[redis_rpc]]` endpoint ([`RedisRpc::call`]) and replies with the callback's `args`.

use std::collections::BTreeMap;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use bytes::Bytes;
use serde_json::Value;
use warren::config::RpcRouteConfig;
use warren::error::Detail;
use warren::{CallError, Context, Module};

use crate::redis::RedisRpc;

/// The node's Redis-RPC endpoint, set once the bridges run ([`RpcRoutes::attach`]).
type Endpoint = Arc<OnceLock<Arc<RedisRpc>>>;

/// The modules of the config's `[[rpc_route]]` tables.
#[derive(Default)]
pub struct RpcRoutes {
    endpoint: Endpoint,
    modules: Vec<Module>,
}

/// One handler's call.
struct Target {
    topic: String,
    func: String,
    timeout: Duration,
}

impl RpcRoutes {
    /// One module per module name of the routes (the config was validated).
    pub fn build(routes: &[RpcRouteConfig]) -> Self {
        let endpoint = Endpoint::default();
        let mut by_module: BTreeMap<&str, Vec<&RpcRouteConfig>> = BTreeMap::new();
        for r in routes {
            if let Some((m, _)) = r.module_handler() {
                by_module.entry(m).or_default().push(r);
            }
        }
        let modules = by_module
            .into_iter()
            .map(|(m, rs)| {
                let mut b = Module::builder(m, endpoint.clone());
                for r in rs {
                    let Some((_, handler)) = r.module_handler() else {
                        continue;
                    };
                    let t = Arc::new(Target {
                        topic: r.topic.trim().to_owned(),
                        func: r.func_name().to_owned(),
                        timeout: Duration::from_secs(r.timeout_s.max(1)),
                    });
                    let h = move |cx: Context<Endpoint>, body: Bytes| call(cx, t.clone(), body);
                    b = if r.before_login {
                        b.login_handler(handler, h)
                    } else {
                        b.client_handler(handler, h)
                    };
                }
                b.build()
            })
            .collect();
        RpcRoutes { endpoint, modules }
    }

    /// The modules, to register with the node before it starts.
    pub fn modules(&self) -> &[Module] {
        &self.modules
    }

    /// The endpoint the calls go through, once the node's `[[redis_rpc]]` runs.
    pub fn attach(&self, rpc: &Arc<RedisRpc>) {
        let _ = self.endpoint.set(rpc.clone());
    }
}

/// The call's `args` from a client body: a JSON array is the list itself; an empty body is no
/// argument; another JSON value is the one argument; bytes that are not JSON are one string.
pub fn args_of(body: &[u8]) -> Vec<Value> {
    if body.iter().all(u8::is_ascii_whitespace) {
        return Vec::new();
    }
    match serde_json::from_slice::<Value>(body) {
        Ok(Value::Array(a)) => a,
        Ok(v) => vec![v],
        Err(_) => vec![Value::String(String::from_utf8_lossy(body).into_owned())],
    }
}

/// The reply from the callback's `args`: the one value when there is one, else the list.
pub fn reply_of(mut args: Vec<Value>) -> Value {
    if args.len() == 1 {
        args.pop().unwrap_or(Value::Null)
    } else {
        Value::Array(args)
    }
}

async fn call(cx: Context<Endpoint>, t: Arc<Target>, body: Bytes) -> Result<Value, CallError> {
    let rpc = cx.state().get().cloned().ok_or_else(|| {
        CallError::Unavailable(Detail::new("the [[redis_rpc]] endpoint is not running"))
    })?;
    let args = rpc
        .call(&t.topic, &t.func, args_of(&body), t.timeout)
        .await?;
    Ok(reply_of(args))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn args_from_bodies() {
        assert_eq!(args_of(b"[1, 2]"), vec![json!(1), json!(2)]);
        assert_eq!(args_of(b""), Vec::<Value>::new());
        assert_eq!(args_of(b" \n"), Vec::<Value>::new());
        assert_eq!(args_of(br#"{"a":1}"#), vec![json!({"a": 1})]);
        assert_eq!(args_of(b"hello"), vec![json!("hello")]);
    }

    #[test]
    fn replies_from_callback_args() {
        assert_eq!(reply_of(vec![json!(3)]), json!(3));
        assert_eq!(reply_of(vec![]), json!([]));
        assert_eq!(reply_of(vec![json!(1), json!("x")]), json!([1, "x"]));
    }
}

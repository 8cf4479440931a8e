//! The `global` module: the functions TianQinS/websocket's sample registers globally
//! (docs/protocols/json-ws.md), so its JSON-over-WebSocket sample client runs unmodified. JSON
//! calls whose `tpc` names no module land here.
//!
//! Also the `rpc` module: the functions TianQinS's RPC module exposes over Redis (docs/cluster.md),
//! for a `[[redis_rpc]]` entry with `module = "rpc"`. Upstream keeps the two tables apart, and
//! they disagree: the WebSocket `test` joins its arguments into a one-element array
//! (`["arg1arg2"]`), the Redis `test` returns one string (`"args: arg1, arg2."`), so each is a
//! module of its own here.

use serde_json::{Value, json};
use warren::{CallError, Context, Json, Module};

/// The `global` module: `test(a1, a2) → [a1 + a2]`, `phaserLogin() → [guid, "测试名称", 99]`.
pub fn module() -> Module {
    Module::builder("global", ())
        // the sample's public functions: callable before login (with `require_login = false`
        // a JSON-WS client calls them without a login message)
        .login_handler("test", test)
        .login_handler("phaserLogin", phaser_login)
        .build()
}

/// The `rpc` module: `test(a1, a2) → "args: a1, a2."`, the function upstream's Redis RPC module
/// registers for its test scripts. Not client-visible: only Redis RPC peers and other modules
/// call it.
pub fn rpc_module() -> Module {
    Module::builder("rpc", ()).handler("test", rpc_test).build()
}

async fn rpc_test(_cx: Context, Json(args): Json<Vec<Value>>) -> Result<Value, CallError> {
    let arg = |i: usize| args.get(i).map(text).unwrap_or_default();
    Ok(json!(format!("args: {}, {}.", arg(0), arg(1))))
}

fn text(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

async fn test(_cx: Context, Json(args): Json<Value>) -> Result<Value, CallError> {
    let args = match args {
        Value::Array(a) => a,
        other => vec![other],
    };
    let sum = match (args.first(), args.get(1)) {
        (Some(Value::Number(a)), Some(Value::Number(b))) => match (a.as_i64(), b.as_i64()) {
            (Some(a), Some(b)) => json!(a.saturating_add(b)),
            _ => json!(a.as_f64().unwrap_or_default() + b.as_f64().unwrap_or_default()),
        },
        (a, b) => json!(format!(
            "{}{}",
            a.map(text).unwrap_or_default(),
            b.map(text).unwrap_or_default()
        )),
    };
    Ok(json!([sum]))
}

async fn phaser_login(cx: Context, _args: ()) -> Result<Value, CallError> {
    let guid = cx.session().and_then(|s| s.uid.clone()).unwrap_or_default();
    Ok(json!([guid, "测试名称", 99]))
}

#[cfg(test)]
mod tests {
    use super::*;
    use warren::Node;
    use warren::config::{Config, ModuleConfig};

    #[tokio::test]
    async fn websocket_and_redis_tests_keep_their_own_shapes() {
        let mut config = Config::default();
        config.http.enabled = false;
        let node = Node::builder(config)
            .module(module(), ModuleConfig::new("global"))
            .module(rpc_module(), ModuleConfig::new("rpc"))
            .start()
            .await
            .expect("node");
        let h = node.handle();
        let args = bytes::Bytes::from_static(br#"["arg1","arg2"]"#);
        let ws = h.call("global", "test", None, args.clone(), None).await;
        assert_eq!(ws.as_deref(), Ok(&br#"["arg1arg2"]"#[..]));
        let rpc = h.call("rpc", "test", None, args, None).await;
        assert_eq!(rpc.as_deref(), Ok(&br#""args: arg1, arg2.""#[..]));
        node.shutdown().await;
    }
}

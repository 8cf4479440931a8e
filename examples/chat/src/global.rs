//! The `global` module: the functions TianQinS/websocket's sample registers globally (PROTOCOLS.md
//! §4), so its JSON-over-WebSocket sample client runs unmodified. JSON calls whose `tpc` names no
//! module land here.

use serde_json::{Value, json};
use warren::{CallError, Context, Json, Module};

/// The `global` module: `test(a1, a2) → [a1 + a2]`, `phaserLogin() → [guid, "测试名称", 99]`.
pub fn module() -> Module {
    Module::builder("global", ())
        .client_handler("test", test)
        .client_handler("phaserLogin", phaser_login)
        .build()
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

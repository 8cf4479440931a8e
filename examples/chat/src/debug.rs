//! The `Debug` module: handlers that misbehave on purpose (panic, hang, flood their caller), so
//! tests can prove the gate survives them. Enable with `--module Debug`; never in production.

use std::time::Duration;

use serde::Deserialize;
use serde_json::{Value, json};
use warren::{CallError, Context, Json, Module};

/// The Debug module.
pub fn module() -> Module {
    Module::builder("Debug", ())
        // callable before login: tests reach them from a bare connection (and the module is
        // never enabled in production)
        .login_handler("HD_Echo", echo)
        .login_handler("HD_Panic", panic)
        .login_handler("HD_Hang", hang)
        .login_handler("HD_Sleep", sleep)
        .login_handler("HD_PushSelf", push_self)
        .handler("CheckLogin", check_login)
        .build()
}

async fn echo(_cx: Context, Json(body): Json<Value>) -> Result<Value, CallError> {
    Ok(body)
}

#[allow(clippy::panic)]
async fn panic(_cx: Context, _body: ()) -> Result<(), CallError> {
    panic!("debug panic requested by the client")
}

async fn hang(_cx: Context, _body: ()) -> Result<(), CallError> {
    std::future::pending::<()>().await;
    Ok(())
}

/// A login checker for JSON listeners (`login_handler = "Debug/CheckLogin"`): accepts the
/// password `secret` only.
async fn check_login(_cx: Context, Json(args): Json<Vec<Value>>) -> Result<bool, CallError> {
    Ok(args.get(1).and_then(Value::as_str) == Some("secret"))
}

#[derive(Deserialize)]
struct Sleep {
    #[serde(default)]
    ms: u64,
}

async fn sleep(_cx: Context, Json(req): Json<Sleep>) -> Result<&'static str, CallError> {
    tokio::time::sleep(Duration::from_millis(req.ms.min(600_000))).await;
    Ok("slept")
}

#[derive(Deserialize)]
struct PushSelf {
    n: u64,
    #[serde(default = "default_topic")]
    topic: String,
    #[serde(default)]
    size: usize,
}

fn default_topic() -> String {
    "Debug/OnPush".into()
}

async fn push_self(cx: Context, Json(req): Json<PushSelf>) -> Result<&'static str, CallError> {
    let pad = "x".repeat(req.size.min(1 << 20).saturating_sub(20));
    for i in 0..req.n {
        let body = json!({"i": i, "pad": pad}).to_string();
        cx.push(&req.topic, body).await?;
        if i % 1024 == 1023 {
            tokio::task::yield_now().await;
        }
    }
    Ok("pushed")
}

//! The `Echo` module: replies with the request body unchanged. A request/reply target for
//! `warren bench request` and a smallest-possible example of a module.

use bytes::Bytes;
use serde_json::Value;
use warren::{CallError, Context, Json, Module};

/// The Echo module: `Echo/HD_Echo/<id>` answers with its body (which must be JSON); the RPC-only
/// `echo` answers with the first element of an argument list (pomelo-rpc's sample service:
/// `echo(msg, data, cb) → cb(null, msg)`).
pub fn module() -> Module {
    // concurrent (the default): a handler that never waits runs on the caller's connection task
    Module::builder("Echo", ())
        // public: callable before login, as a benchmark and health-check target
        .login_handler("HD_Echo", echo)
        .handler("echo", first_arg)
        .build()
}

async fn echo(_cx: Context, body: Bytes) -> Result<Bytes, CallError> {
    Ok(body)
}

async fn first_arg(_cx: Context, Json(args): Json<Value>) -> Result<Value, CallError> {
    Ok(match args {
        Value::Array(mut a) if !a.is_empty() => a.swap_remove(0),
        Value::Array(_) => Value::Null,
        other => other,
    })
}

//! The `Echo` module: replies with the request body unchanged. A request/reply target for
//! `warren bench request` and a smallest-possible example of a module.

use bytes::Bytes;
use warren::{CallError, Context, Module};

/// The Echo module: `Echo/HD_Echo/<id>` answers with its body (which must be JSON).
pub fn module() -> Module {
    Module::builder("Echo", ())
        .client_handler("HD_Echo", echo)
        .build()
}

async fn echo(_cx: Context, body: Bytes) -> Result<Bytes, CallError> {
    Ok(body)
}

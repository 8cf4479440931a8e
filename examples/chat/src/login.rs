//! The `Login` module (examples/chat/README.md, "Handlers"): binds the session to the user name it
//! is given. The password is not checked, as in the original demo; a real deployment replaces this
//! module or authenticates clients at connect (`[auth]`). Binding a name another live session holds
//! follows `[auth] uid_conflict`: refused by default (`user alice is already logged in`), or the
//! older session is closed (`kick_old`).

use serde_json::Value;
use warren::{CallError, Context, Json, Module};

use crate::Flavour;

/// The Login module for a demo flavour.
pub fn module(flavour: Flavour) -> Module {
    let login = match flavour {
        Flavour::V11 => "HD_Login",
        Flavour::V10 => "Handler_Login",
    };
    Module::builder("Login", ())
        // the one handler a client may call before it has a uid: it binds one
        .login_handler(login, login_handler)
        .handler("getRand", get_rand)
        .build()
}

async fn login_handler(cx: Context, Json(body): Json<Value>) -> Result<Value, CallError> {
    let field = |k: &str| body.get(k).and_then(Value::as_str);
    let (Some(user), Some(_password)) = (field("userName"), field("passWord")) else {
        // the demo answers bad input with a Result, not an Error
        return Ok(Value::String("userName or passWord cannot be nil".into()));
    };
    let session = cx.session().ok_or(CallError::NoSession)?;
    let sessions = cx.node().sessions();
    let s = sessions.bind(session, user).await?;
    let s = sessions.set(&s, "login", Value::Bool(true)).await?;
    sessions.push(&s, s.settings.clone()).await?;
    Ok(Value::String(format!("login success {user}")))
}

/// An RPC-only handler other modules call (the Chat module does on join).
async fn get_rand(_cx: Context, Json(room): Json<Value>) -> Result<String, CallError> {
    let room = match &room {
        Value::String(s) => s.clone(),
        other => other.to_string(),
    };
    Ok(format!("My is Login Module {room}"))
}

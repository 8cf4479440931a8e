//! The Greeter module: `Greeter/HD_Hello` with `{"name":"ann"}` pushes `Greeter/OnHello` to the
//! caller, then answers `"hello ann"`.

use serde::Deserialize;
use warren::config::ModuleConfig;
use warren::{CallError, Context, Json, Module};

/// The request of `HD_Hello`.
#[derive(Deserialize)]
struct Hello {
    name: String,
}

/// Push `Greeter/OnHello` (it reaches the client before the reply), then reply with the greeting.
async fn hello(cx: Context<String>, Json(req): Json<Hello>) -> Result<String, CallError> {
    let push = serde_json::json!({ "to": req.name });
    cx.push("Greeter/OnHello", push.to_string()).await?;
    Ok(format!("{} {}", cx.state(), req.name))
}

/// The factory `App::module` registers: a `[[module]] type = "Greeter"` entry's
/// `[module.settings] greeting = "…"` replaces the default "hello".
pub fn module(entry: &ModuleConfig) -> Result<Module, String> {
    let greeting = match entry.settings.get("greeting") {
        None => "hello".to_owned(),
        Some(v) => v
            .as_str()
            .ok_or("settings.greeting must be a string")?
            .to_owned(),
    };
    Ok(Module::builder("Greeter", greeting)
        .login_handler("HD_Hello", hello) // callable before login (docs/modules.md)
        .build())
}

//! The `warren` binary: the command line of warren-app (`serve`, `node`, `check-config`,
//! `config convert`, `print-default-config`, `bench`, `passwd`) over the chat demo's modules.
//! With no config `serve` runs the chat demo in one process, with nothing else to install;
//! `--bus` and `--registry` spread the same modules over many processes.

#![forbid(unsafe_code)]

mod web;

use std::process::ExitCode;
use std::sync::Arc;

use warren::config::{Config, ListenerConfig, ModuleConfig};
use warren_app::{App, Role};

fn main() -> ExitCode {
    App::new("warren")
        .version(env!("CARGO_PKG_VERSION"))
        .about("warren: a realtime server for long-connection applications.")
        .modules(warren_chat::MODULE_TYPES, warren_chat::catalog)
        .default_config(demo_config)
        .default_config_text(warren::config::DEFAULT_CONFIG)
        .web_page(web::router)
        .setup(|node| node.route_key("Chat", Arc::new(warren_chat::chat::route_key)))
        .run()
}

/// The built-in demo: mqant-mode MQTT on 3563 (TCP) and 3653 (WebSocket), Login and Chat, and
/// on `serve` the JSON-over-WebSocket sample's `global` functions.
fn demo_config(role: Role) -> Config {
    let mut c = Config::default();
    let l = |url: &str| ListenerConfig::from_url(url).expect("the demo listener URLs are valid");
    c.listeners = vec![
        l("mqtt+mqant://127.0.0.1:3563"),
        l("ws+mqant://127.0.0.1:3653"),
    ];
    c.modules = vec![ModuleConfig::new("Login"), ModuleConfig::new("Chat")];
    if role == Role::Serve {
        c.modules.push(ModuleConfig::new("global"));
    }
    c
}

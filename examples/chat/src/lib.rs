//! The chat demo that `warren serve` runs with no config: the mqant chat of examples/chat/README.md
//! (`Login` and `Chat` modules), its web page, the `global` functions of the JSON-over-WebSocket
//! sample, and two small built-in modules: `Echo` (a request/reply target for benchmarks and
//! pomelo-rpc) and `Debug` (misbehaving handlers for tests).
//!
//! [`catalog`] maps a module type named in the config to its definition; the binary builds every
//! `[[module]]` entry from it.

#![forbid(unsafe_code)]

pub mod chat;
pub mod debug;
pub mod echo;
pub mod global;
pub mod login;
pub mod web;

use warren::Module;
use warren::config::ModuleConfig;

/// Module types this crate provides.
pub const MODULE_TYPES: &[&str] = &["Login", "Chat", "Echo", "Debug", "global", "rpc"];

/// Which revision of the mqant chat demo to speak (examples/chat/README.md, "mqant v1.0 flavour").
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Flavour {
    /// mqant v1.1 (`HD_` handlers, OnJoin/OnChat/OnLeave): the default.
    V11,
    /// mqant v1.0 (`Handler_` handlers, OnJoin/OnSay, room `abc`).
    V10,
}

impl Flavour {
    /// Read `flavour` from module settings.
    pub fn from_settings(cfg: &ModuleConfig) -> Result<Flavour, String> {
        match cfg.settings.get("flavour").and_then(|v| v.as_str()) {
            None | Some("v1.1") => Ok(Flavour::V11),
            Some("v1.0") => Ok(Flavour::V10),
            Some(other) => Err(format!(
                "unknown flavour {other:?} (expected \"v1.1\" or \"v1.0\")"
            )),
        }
    }
}

/// Build the module a config entry names.
pub fn catalog(cfg: &ModuleConfig) -> Result<Module, String> {
    match cfg.kind.as_str() {
        "Login" => Ok(login::module(Flavour::from_settings(cfg)?)),
        "Chat" => Ok(chat::module(Flavour::from_settings(cfg)?)),
        "Echo" => Ok(echo::module()),
        "Debug" => Ok(debug::module()),
        "global" => Ok(global::module()),
        "rpc" => Ok(global::rpc_module()),
        other => Err(format!("unknown module type {other:?}")),
    }
}

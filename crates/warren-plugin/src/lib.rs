//! warren-plugin: channel handlers and modules written outside Rust — in Lua, in Python, or as a
//! native shared library — loaded from a file and reloaded while clients stay connected
//! (docs/plugins.md).
//!
//! Two things can be a plugin:
//! - a **channel handler** for a line listener (docs/protocols/line.md): [`load_channel_handler`]
//!   (or [`ChannelPlugin::load`], which keeps the reload handle) gives an
//!   `Arc<dyn ChannelHandler>` for `NodeBuilder::channel_handler`. The contract is ffown's:
//!   `handle_connect(channel)` (optional), `handle_msg(channel, msg)`, `handle_broken(channel)`,
//!   and `channel.send(id, msg)` returning 0 or −1. Every kind, native included.
//! - a **module** (Lua and Python): [`load_module`] (or [`ModulePlugin::load`]) gives a
//!   [`warren::Module`] that a node runs, routes, hashes and calls like a Rust one. Its handlers
//!   are the script's functions `(session, msg)`.
//!
//! Each load is a **version** in a slot. [`Plugin::reload`] loads the file again beside the
//! running version: new calls go to the new one, calls in flight finish on the old, channels
//! move at their next message; a reload that fails keeps the running version and returns the
//! error with file and line. [`PluginWatcher`] calls `reload` when a plugin's file changes; an
//! admin endpoint only has to call it too.
//!
//! Where code runs: Lua runs on the caller's task (a module handler waiting on `warren.call`
//! yields, it does not hold a thread) with an instruction budget and a time limit per call;
//! Python runs on threads of its own, never on the async workers, and releases the GIL while it
//! waits on the node; a channel handler of any kind runs on one thread of its own, which is what
//! serializes the calls into it.

// A build without every host (cargo features) leaves parts of the code they share unused.
#![cfg_attr(
    not(all(feature = "lua", feature = "python", feature = "native")),
    allow(dead_code, unused_imports, unused_variables)
)]

mod backend;
mod channel;
mod error;
mod module;
mod slot;
mod watch;

#[cfg(feature = "lua")]
mod lua;
#[cfg(feature = "native")]
mod native;
#[cfg(feature = "python")]
mod python;

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use futures_util::future::BoxFuture;
use warren::gate::line::ChannelHandler;
use warren::{CallError, Execution};

pub use backend::{
    BackendCaller, BackendRequest, BackendTarget, HttpAnswer, HttpRequest, MAX_HTTP_ANSWER,
};
pub use channel::ChannelPlugin;
pub use error::{PluginError, PluginErrorKind};
pub use module::{BackendMsg, ModulePlugin};
#[cfg(feature = "native")]
pub use native::ABI_VERSION;
pub use watch::{PluginWatcher, WatchError};

/// The language a plugin is written in, decided by the file's suffix (never by a substring:
/// `echo.solver.py` is Python).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum PluginKind {
    /// `.lua`: Lua 5.4.
    Lua,
    /// `.py`: CPython 3, embedded.
    Python,
    /// `.so`, `.dylib`, `.dll`: a shared library speaking warren's C ABI.
    Native,
}

impl PluginKind {
    /// The kind of the plugin at `path`, from its suffix.
    pub fn from_path(path: &Path) -> Result<PluginKind, PluginError> {
        let ext = path
            .extension()
            .and_then(|e| e.to_str())
            .map(str::to_ascii_lowercase);
        match ext.as_deref() {
            Some("lua") => Ok(PluginKind::Lua),
            Some("py") => Ok(PluginKind::Python),
            Some("so" | "dylib" | "dll") => Ok(PluginKind::Native),
            _ => Err(PluginError::UnknownKind {
                path: path.to_owned(),
            }),
        }
    }

    /// `lua`, `python` or `native`, for logs and listings.
    pub fn as_str(self) -> &'static str {
        match self {
            PluginKind::Lua => "lua",
            PluginKind::Python => "python",
            PluginKind::Native => "native",
        }
    }

    /// Refuse a kind whose host is not compiled in.
    pub(crate) fn require_built(self, path: &Path) -> Result<(), PluginError> {
        let built = match self {
            PluginKind::Lua => cfg!(feature = "lua"),
            PluginKind::Python => cfg!(feature = "python"),
            PluginKind::Native => cfg!(feature = "native"),
        };
        if built {
            Ok(())
        } else {
            Err(self.not_built(path))
        }
    }

    /// The error for a plugin of this kind when its host is not compiled in.
    pub(crate) fn not_built(self, path: &Path) -> PluginError {
        let (kind, feature) = match self {
            PluginKind::Lua => ("Lua", "lua"),
            PluginKind::Python => ("Python", "python"),
            PluginKind::Native => ("native", "native"),
        };
        PluginError::NotBuilt {
            path: path.to_owned(),
            kind,
            feature,
        }
    }
}

/// Count a first load (`warren_plugin_loads_total{kind}`), so an operator sees what runs.
pub(crate) fn count_load(kind: PluginKind) {
    metrics::counter!("warren_plugin_loads_total", "kind" => kind.as_str()).increment(1);
}

/// Count a reload and whether it took (`warren_plugin_reloads_total{kind, result}`): a failed
/// reload keeps the running version, and this is how an operator notices it without the log.
pub(crate) fn count_reload(kind: PluginKind, ok: bool) {
    metrics::counter!(
        "warren_plugin_reloads_total",
        "kind" => kind.as_str(),
        "result" => if ok { "ok" } else { "failed" }
    )
    .increment(1);
}

impl std::fmt::Display for PluginKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// How a message reaches a script: what ffown passed (text), raw bytes, or decoded JSON (what an
/// mqant handler receives: the body as an object).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum MsgType {
    /// Python: a `str`, decoded as UTF-8 with `surrogateescape`, so every byte round-trips.
    /// Lua: a string (Lua strings hold any bytes).
    #[default]
    Text,
    /// Python: `bytes`. Lua: a string, as for `Text`.
    Bytes,
    /// Modules only: the body decoded as JSON (a dict or table for an object); a body that is not
    /// JSON is answered with an error and the handler does not run.
    Json,
}

/// Settings of a channel-handler plugin (a line listener's `plugin = …`).
#[derive(Debug, Clone)]
pub struct ChannelPluginOptions {
    /// What `msg` is for a Python plugin (§5.5 `python_msg_type`): `Text` (default) or `Bytes`.
    pub python_msg_type: MsgType,
    /// Events (connects, messages, disconnects) that may wait for the plugin's thread. When it is
    /// full, a new connection or message is refused by closing its connection (logged), so a
    /// stuck plugin costs bounded memory.
    pub queue: usize,
    /// Lua: instructions one call may run before it is stopped.
    pub max_instructions: u64,
    /// Lua: wall time one call may run before it is stopped.
    pub time_limit: Duration,
}

impl Default for ChannelPluginOptions {
    fn default() -> Self {
        ChannelPluginOptions {
            python_msg_type: MsgType::Text,
            queue: 4096,
            max_instructions: DEFAULT_MAX_INSTRUCTIONS,
            time_limit: warren::module::DEFAULT_CALL_TIMEOUT,
        }
    }
}

/// Settings of a module plugin (a `[[module]]` with `plugin = …`).
#[derive(Debug, Clone)]
pub struct ModulePluginOptions {
    /// Handlers clients may call in every mode, once logged in (Rust's `client_handler`). When
    /// `None`, clients reach a handler only by name prefix in mqant mode (`HD_`, `Handler_`),
    /// as for a Rust module's plain `handler`.
    pub handlers: Option<Vec<String>>,
    /// Handlers clients may call before their session is bound to a uid (Rust's
    /// `login_handler`): the login itself, or a public one.
    pub login_handlers: Vec<String>,
    /// What a handler's `msg` is (default: text).
    pub msg_type: MsgType,
    /// Sequential (one call at a time, in order) or concurrent (default).
    pub execution: Execution,
    /// A concurrent module's workers: Lua states in the pool (each loads the script and keeps its
    /// own globals), or Python threads. A sequential module has one.
    pub workers: usize,
    /// Lua: instructions one call may run before it is stopped.
    pub max_instructions: u64,
    /// Lua: wall time one call may run before it is stopped (a Lua loop that never yields is
    /// beyond the reach of the caller's deadline, so it has one of its own).
    pub time_limit: Duration,
    /// Python: calls that may wait for a free thread before callers wait to hand theirs over.
    pub queue: usize,
}

impl Default for ModulePluginOptions {
    fn default() -> Self {
        ModulePluginOptions {
            handlers: None,
            login_handlers: Vec::new(),
            msg_type: MsgType::Text,
            execution: Execution::Concurrent,
            workers: 4,
            max_instructions: DEFAULT_MAX_INSTRUCTIONS,
            time_limit: warren::module::DEFAULT_CALL_TIMEOUT,
            queue: 1024,
        }
    }
}

/// Instructions a Lua call may run by default: a few tenths of a second of pure Lua, far beyond
/// what a handler needs, soon enough to stop a loop that never ends.
pub const DEFAULT_MAX_INSTRUCTIONS: u64 = 100_000_000;

/// A loaded plugin as a file watcher or an admin API sees it: which file, which version runs,
/// and a way to load the file again.
pub trait Plugin: Send + Sync {
    /// The module type, or the file's stem for a channel handler.
    fn name(&self) -> &str;
    /// The plugin file.
    fn path(&self) -> &Path;
    /// Its language.
    fn kind(&self) -> PluginKind;
    /// The running version: 1 for the first load, one more for each successful reload.
    fn version(&self) -> u64;
    /// Load the file again beside the running version and switch to it. On error the running
    /// version stays and the error says why (with file and line for a script error).
    fn reload(&self) -> BoxFuture<'_, Result<u64, PluginError>>;
}

/// How a module plugin's `warren.rpc_call(topic, func, args)` reaches TianQinS Redis-RPC peers
/// (docs/cluster.md, "Compatibility bridges"): the node's `[[redis_rpc]]` endpoint, handed to
/// the plugin with [`ModulePlugin::set_redis_rpc`] once it runs. This crate does not depend on
/// the cluster crate; the binary implements this over its `RedisRpc`.
pub trait RedisRpcCaller: Send + Sync {
    /// Call `func` on the process serving `topic` and wait up to `timeout` for its callback;
    /// the callback's `args` (a warren or Go peer's one return value is `[v]`).
    fn call(
        &self,
        topic: String,
        func: String,
        args: Vec<serde_json::Value>,
        timeout: Duration,
    ) -> BoxFuture<'static, Result<Vec<serde_json::Value>, CallError>>;
    /// Run `func` on the process serving `topic` without waiting for a reply.
    fn notify(
        &self,
        topic: String,
        func: String,
        args: Vec<serde_json::Value>,
    ) -> BoxFuture<'static, Result<(), CallError>>;
}

/// Load a channel-handler plugin for a line listener: the kind comes from the suffix. Keep the
/// [`ChannelPlugin`] from [`ChannelPlugin::load`] instead to reload it later.
pub fn load_channel_handler(
    path: impl AsRef<Path>,
    options: &ChannelPluginOptions,
) -> Result<Arc<dyn ChannelHandler>, PluginError> {
    let plugin: Arc<dyn ChannelHandler> = ChannelPlugin::load(path, options)?;
    Ok(plugin)
}

/// Load a module plugin (Lua or Python) as module type `type_name`. Keep the [`ModulePlugin`]
/// from [`ModulePlugin::load`] instead to reload it later.
pub fn load_module(
    type_name: &str,
    path: impl AsRef<Path>,
    options: &ModulePluginOptions,
) -> Result<warren::Module, PluginError> {
    Ok(ModulePlugin::load(type_name, path, options)?.module())
}

/// The plugin guide (docs/plugins.md), compiled and run as a doctest so that its Rust example
/// stays true.
#[cfg(doctest)]
#[doc = include_str!("../../../docs/plugins.md")]
pub struct PluginsGuide;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_kind_comes_from_the_suffix_alone() {
        let kind = |p: &str| PluginKind::from_path(Path::new(p)).map_err(|e| e.kind());
        assert_eq!(kind("echo.lua"), Ok(PluginKind::Lua));
        assert_eq!(kind("dir.so/echo.py"), Ok(PluginKind::Python));
        assert_eq!(kind("echo.solver.py"), Ok(PluginKind::Python));
        assert_eq!(kind("libecho.so"), Ok(PluginKind::Native));
        assert_eq!(kind("echo.DLL"), Ok(PluginKind::Native));
        assert_eq!(kind("libecho.dylib"), Ok(PluginKind::Native));
        assert_eq!(kind("echo.so.1"), Err(PluginErrorKind::UnknownKind));
        assert_eq!(kind("echo"), Err(PluginErrorKind::UnknownKind));
    }

    #[test]
    fn a_kind_left_out_of_the_build_is_refused_naming_its_feature() {
        let e = PluginKind::Python.not_built(Path::new("greeter.py"));
        assert_eq!(e.kind(), PluginErrorKind::NotBuilt);
        assert_eq!(
            e.to_string(),
            "greeter.py: Python plugins are not built into this binary (cargo feature `python`)"
        );
        let path = Path::new("x");
        for (kind, built) in [
            (PluginKind::Lua, cfg!(feature = "lua")),
            (PluginKind::Python, cfg!(feature = "python")),
            (PluginKind::Native, cfg!(feature = "native")),
        ] {
            assert_eq!(kind.require_built(path).is_ok(), built, "{kind}");
        }
    }
}

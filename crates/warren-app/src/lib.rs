//! A warren server is a ten-line `main`: register your module types with an [`App`] and call
//! [`App::run`], and your binary has the whole `warren` command line.
//!
//! ```no_run
//! use warren::config::ModuleConfig;
//! use warren::{CallError, Context, Module};
//!
//! async fn hello(cx: Context, _: ()) -> Result<String, CallError> {
//!     cx.push("Greeter/OnHello", "{}").await?;
//!     Ok("hello".to_owned())
//! }
//!
//! /// What `[[module]] type = "Greeter"` (or `--module Greeter`) runs.
//! fn greeter(_: &ModuleConfig) -> Result<Module, String> {
//!     Ok(Module::builder("Greeter", ()).login_handler("HD_Hello", hello).build())
//! }
//!
//! fn main() -> std::process::ExitCode {
//!     warren_app::App::new("my-game")
//!         .version(env!("CARGO_PKG_VERSION"))
//!         .module("Greeter", greeter)
//!         .run()
//! }
//! ```
//!
//! The binary then answers to the same commands as `warren` itself: `serve` (a node with a gate:
//! listeners, modules, the web page if the app has one), `node` (modules only, for a cluster),
//! `check-config FILE` (every mistake, `file:line:col: key: why`, module types checked against
//! the app's), `config convert` (mqant `server.conf` to TOML), `print-default-config`, `bench`
//! (the load generator) and `passwd` (the `[auth] password_file` tool). Each `[[module]]` entry
//! of the config, and each `--module TYPE`, is built by the factory registered for its type; a
//! type the app did not register is a config error naming the types it has.
//!
//! Beyond modules, an app may give the config used when no `--config` is given
//! ([`App::default_config`]) and the text `print-default-config` prints
//! ([`App::default_config_text`]), serve a web page ([`App::web_page`]), and adjust the node
//! before it starts ([`App::setup`]: route keys, an auth hook, a line channel handler). The
//! `warren` binary is such an app over the chat demo's modules (crates/warren-cli/src/main.rs);
//! examples/my-game is one outside this workspace.

#![forbid(unsafe_code)]

mod admin;
mod advertise;
mod backend_plugins;
mod cli;
mod ctl;
mod load;
mod logging;
mod metrics;
#[cfg(feature = "otel")]
mod otel;
mod passwd;
mod plugin_host;
mod plugins;
mod serve;
mod web;

use std::process::ExitCode;
use std::sync::Arc;

use warren::config::{Config, ModuleConfig};
use warren::node::BoundListener;
use warren::{Module, NodeBuilder};

/// The HTTP framework [`App::web_page`] routers are written with, re-exported so an app uses the
/// version warren serves them with.
pub use axum;

/// Which command runs the node; [`App::default_config`] sees it to choose what a node of that
/// kind runs when no `--config` is given.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// `serve`: a gate, its listeners, the modules and the web page.
    Serve,
    /// `node`: modules only, no listeners and no web page unless asked for.
    Node,
}

/// Builds the module a `[[module]]` entry names, from that entry (its `[module.settings]`
/// included); an error is reported as the entry's.
type Factory = Arc<dyn Fn(&ModuleConfig) -> Result<Module, String> + Send + Sync>;

/// The web page's router, made once the listeners are bound (a page may need to tell browsers
/// where the WebSocket listener is).
type WebPage = Box<dyn Fn(&[BoundListener]) -> axum::Router>;

/// Changes made to every node this app starts, before it starts.
type Setup = Box<dyn Fn(NodeBuilder) -> NodeBuilder>;

/// A warren server binary: its name, its module types and what it needs beyond them. Build it
/// with the methods below and end `main` with [`App::run`].
pub struct App {
    /// The binary's name, in `--help`, `--version` and the ready line.
    name: &'static str,
    /// The version `--version` and the ready line show.
    version: &'static str,
    /// The one-line description `--help` starts with.
    about: Option<&'static str>,
    /// Registered module types, in registration order (the order help lists them in).
    modules: Vec<(String, Factory)>,
    /// The config without `--config`.
    default_config: Option<Box<dyn Fn(Role) -> Config>>,
    /// What `print-default-config` prints.
    default_config_text: Option<&'static str>,
    /// The web page, if the app serves one.
    web_page: Option<WebPage>,
    /// Node builder adjustments, in the order given.
    setup: Vec<Setup>,
}

impl App {
    /// A new app called `name` (the binary's name, shown by `--help`, `--version` and the line
    /// it prints when ready) with no module types yet.
    pub fn new(name: &'static str) -> App {
        App {
            name,
            version: env!("CARGO_PKG_VERSION"),
            about: None,
            modules: Vec::new(),
            default_config: None,
            default_config_text: None,
            web_page: None,
            setup: Vec::new(),
        }
    }

    /// The version `--version` and the ready line show; pass `env!("CARGO_PKG_VERSION")`.
    /// Without it, warren's version.
    pub fn version(mut self, version: &'static str) -> App {
        self.version = version;
        self
    }

    /// The one line `--help` describes the binary with.
    pub fn about(mut self, about: &'static str) -> App {
        self.about = Some(about);
        self
    }

    /// Register module type `kind`: each `[[module]] type = "<kind>"` entry, and each
    /// `--module <kind>`, runs the module `factory` builds from that entry (its settings are in
    /// `entry.settings`). A factory's error stops the node before it starts and is reported by
    /// `check-config` at the entry. Registering a type again replaces its factory.
    pub fn module<F, E>(mut self, kind: &str, factory: F) -> App
    where
        F: Fn(&ModuleConfig) -> Result<Module, E> + Send + Sync + 'static,
        E: std::fmt::Display,
    {
        let f: Factory = Arc::new(move |entry| factory(entry).map_err(|e| e.to_string()));
        self.register(kind, f);
        self
    }

    /// Register several module types built by one catalog function, which looks at
    /// `entry.kind` (as the chat demo's `warren_chat::catalog` does).
    pub fn modules<F, E>(mut self, kinds: &[&str], catalog: F) -> App
    where
        F: Fn(&ModuleConfig) -> Result<Module, E> + Send + Sync + 'static,
        E: std::fmt::Display,
    {
        let f: Factory = Arc::new(move |entry| catalog(entry).map_err(|e| e.to_string()));
        for kind in kinds {
            self.register(kind, f.clone());
        }
        self
    }

    fn register(&mut self, kind: &str, factory: Factory) {
        match self.modules.iter_mut().find(|(k, _)| k == kind) {
            Some(slot) => slot.1 = factory,
            None => self.modules.push((kind.to_owned(), factory)),
        }
    }

    /// The config `serve` and `node` run when no `--config` is given, for each [`Role`] (the
    /// chat demo's listeners and modules, for the `warren` binary). Whatever it returns, a
    /// `node` opens no listeners and serves no page unless `--listen`/`--http` ask, and
    /// `--no-demo-listeners` and `--no-demo-modules` drop its listeners and modules. Without it:
    /// [`Config::default`] (no listeners) running one instance of every registered type.
    pub fn default_config(mut self, config: impl Fn(Role) -> Config + 'static) -> App {
        self.default_config = Some(Box::new(config));
        self
    }

    /// What `print-default-config` prints: a commented config file naming every key (the
    /// `warren` binary prints `warren::config::DEFAULT_CONFIG`). Without it, the config `serve`
    /// runs with no `--config`, as TOML.
    pub fn default_config_text(mut self, text: &'static str) -> App {
        self.default_config_text = Some(text);
        self
    }

    /// Serve a web page on `[http] addr` (default 127.0.0.1:8080; `--http ADDR` moves it,
    /// `--no-http` turns it off, and a `node` serves it only when its config file has an
    /// `[http]` section): `router` makes it once the listeners are bound. Without a page, the
    /// app serves no HTTP at all: `[http]` is ignored and `--http` is refused.
    pub fn web_page(mut self, router: impl Fn(&[BoundListener]) -> axum::Router + 'static) -> App {
        self.web_page = Some(Box::new(router));
        self
    }

    /// Adjust every node this app starts before it starts: route keys for custom routing, an
    /// auth hook, the line listeners' channel handler, cluster change hooks (see
    /// [`NodeBuilder`]). Several calls apply in order.
    pub fn setup(mut self, f: impl Fn(NodeBuilder) -> NodeBuilder + 'static) -> App {
        self.setup.push(Box::new(f));
        self
    }

    /// Parse the command line and run the command it names; the process's exit code.
    pub fn run(self) -> ExitCode {
        self.run_from(std::env::args_os())
    }

    /// [`App::run`] with these arguments (the first is the program name), as a test drives it.
    pub fn run_from<I, T>(self, args: I) -> ExitCode
    where
        I: IntoIterator<Item = T>,
        T: Into<std::ffi::OsString> + Clone,
    {
        cli::main(&self, args)
    }

    /// The registered module types, in registration order.
    fn kinds(&self) -> Vec<&str> {
        self.modules.iter().map(|(k, _)| k.as_str()).collect()
    }

    /// The factory registered for `kind`.
    fn factory(&self, kind: &str) -> Option<&Factory> {
        self.modules.iter().find(|(k, _)| k == kind).map(|(_, f)| f)
    }

    /// Build the module a config entry names.
    fn build_module(&self, entry: &ModuleConfig) -> Result<Module, String> {
        match self.factory(&entry.kind) {
            Some(f) => f(entry),
            None => Err(format!(
                "unknown module type {:?} (this binary has: {})",
                entry.kind,
                self.kinds().join(", ")
            )),
        }
    }

    /// The config without `--config`, before the command line's overrides.
    fn builtin_config(&self, role: Role) -> Config {
        match &self.default_config {
            Some(f) => f(role),
            None => Config {
                modules: self.kinds().into_iter().map(ModuleConfig::new).collect(),
                ..Config::default()
            },
        }
    }
}

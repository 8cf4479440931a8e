//! [`ModulePlugin`]: a module whose handlers are a script's functions (docs/plugins.md,
//! "Modules").
//!
//! The script's functions become the module's handlers when it is first loaded; each handler
//! looks up the running version when it is called, so a reload changes what the next call runs
//! while calls in flight finish on the version they started on. The handler set itself is fixed
//! at the first load (the router and the registry know it): a reload that adds a function logs
//! that it is not routable until the node restarts, and a function a reload removed answers
//! "handler not found".

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use bytes::Bytes;
use futures_util::future::BoxFuture;
use parking_lot::{Mutex, RwLock};
use serde_json::Value;
use warren::module::InstanceInfo;
use warren::node::NodeHandle;
use warren::{CallError, Context, Execution, Module, Services, Session};

use crate::slot::PluginSlot;
use crate::{ModulePluginOptions, Plugin, PluginError, PluginKind, RedisRpcCaller};

/// Names a script may define that are lifecycle hooks, not handlers.
pub(crate) const HOOKS: &[&str] = &[
    "on_init",
    "on_destroy",
    "on_session_closed",
    "export_state",
    "import_state",
    "on_backend_msg",
];

/// Whether a script-level name is a handler: not a hook, not private (`_name`). (The Python
/// host applies the same rule in Python.)
#[cfg_attr(not(feature = "lua"), allow(dead_code))]
pub(crate) fn is_handler_name(name: &str) -> bool {
    !name.starts_with('_') && !HOOKS.contains(&name)
}

/// What a script call runs with: the node's services, the caller's session, the instance, and
/// the Redis-RPC peers (`warren.rpc_call`) once the node has them.
#[derive(Clone)]
pub(crate) struct CallCx {
    pub(crate) services: Arc<dyn Services>,
    pub(crate) session: Option<Arc<Session>>,
    pub(crate) instance: Arc<InstanceInfo>,
    pub(crate) redis_rpc: Arc<RedisRpcSlot>,
    /// The node's `[[backend]]` groups (`warren.backend_*`) once they run.
    pub(crate) backends: Arc<crate::backend::BackendSlot>,
}

/// Where a module plugin's `warren.rpc_call` goes: empty until the node's `[[redis_rpc]]`
/// endpoint runs ([`ModulePlugin::set_redis_rpc`]), read at each call.
pub(crate) type RedisRpcSlot = RwLock<Option<Arc<dyn RedisRpcCaller>>>;

impl CallCx {
    fn of(cx: &Context<Arc<ModulePlugin>>) -> CallCx {
        // the instance `on_init` saw, shared, instead of a copy per call (the same instance
        // while its id is the same allocation)
        let info = cx.instance();
        let instance = match cx.state().instance.get() {
            Some(i) if Arc::ptr_eq(&i.id, &info.id) => i.clone(),
            _ => Arc::new(info.clone()),
        };
        CallCx {
            services: cx.services().clone(),
            session: cx.session().cloned(),
            instance,
            redis_rpc: cx.state().redis_rpc.clone(),
            backends: cx.state().backends.clone(),
        }
    }

    /// The Redis-RPC peers, or the error a script gets when the node has none.
    pub(crate) fn redis_rpc(&self) -> Result<Arc<dyn RedisRpcCaller>, CallError> {
        self.redis_rpc.read().clone().ok_or_else(|| {
            CallError::Unavailable(
                "no Redis RPC endpoint: rpc_call needs a [[redis_rpc]] entry in the config".into(),
            )
        })
    }

    /// The backend groups, or the error a script gets when the node has none.
    pub(crate) fn backends(&self) -> Result<Arc<dyn crate::BackendCaller>, CallError> {
        crate::backend::caller(&self.backends)
    }

    /// The node behind the services, for session operations and rooms.
    pub(crate) fn node(&self) -> Result<&NodeHandle, CallError> {
        self.services
            .as_any()
            .downcast_ref::<NodeHandle>()
            .ok_or_else(|| CallError::App("this operation needs a node".into()))
    }

    /// The same call without its session (hooks).
    pub(crate) fn without_session(&self) -> CallCx {
        CallCx {
            session: None,
            ..self.clone()
        }
    }
}

/// A script's Redis-RPC arguments as the message's `args`: a list is the arguments, `nil` (or
/// an empty table, which Lua cannot tell from an empty list) none, anything else one argument.
pub(crate) fn rpc_args(v: Value) -> Vec<Value> {
    match v {
        Value::Array(a) => a,
        Value::Null => Vec::new(),
        Value::Object(o) if o.is_empty() => Vec::new(),
        other => vec![other],
    }
}

/// How long `rpc_call` waits without a timeout of its own: the node's call timeout.
pub(crate) fn rpc_timeout(cx: &CallCx) -> Duration {
    cx.node()
        .map(|n| n.call_timeout())
        .unwrap_or(warren::module::DEFAULT_CALL_TIMEOUT)
}

/// The node of a set of services, for session operations from a script's session object.
pub(crate) fn node_of(services: &Arc<dyn Services>) -> Result<&NodeHandle, CallError> {
    services
        .as_any()
        .downcast_ref::<NodeHandle>()
        .ok_or_else(|| CallError::App("session operations need a node".into()))
}

/// One loaded version of a module plugin.
pub(crate) trait ModuleVersion: Send + Sync {
    /// The handlers the script defines, sorted.
    fn handlers(&self) -> &[String];
    /// Whether the script defines this hook (one of [`HOOKS`]).
    fn has_hook(&self, hook: &str) -> bool;
    /// Run handler `handler` on a request.
    fn call(
        self: Arc<Self>,
        handler: Arc<str>,
        cx: CallCx,
        body: Bytes,
    ) -> BoxFuture<'static, Result<Bytes, CallError>>;
    /// Start calls of one session, to run one after the other in the given order (the lane's
    /// in-order runner, `ModuleBuilder::in_order`); one future per call, in that order. The
    /// default runs them on a task of their own, one after the other.
    fn call_in_order(
        self: Arc<Self>,
        calls: Vec<(Arc<str>, CallCx, Bytes)>,
    ) -> Vec<BoxFuture<'static, Result<Bytes, CallError>>>
    where
        Self: 'static,
    {
        let mut futures: Vec<BoxFuture<'static, Result<Bytes, CallError>>> =
            Vec::with_capacity(calls.len());
        let mut work = Vec::with_capacity(calls.len());
        for (handler, cx, body) in calls {
            let (tx, rx) = tokio::sync::oneshot::channel();
            futures.push(Box::pin(async move {
                rx.await.unwrap_or(Err(CallError::Closed))
            }));
            work.push((handler, cx, body, tx));
        }
        tokio::spawn(async move {
            for (handler, cx, body, tx) in work {
                let _ = tx.send(self.clone().call(handler, cx, body).await);
            }
        });
        futures
    }
    /// Make the instance's settings visible (`warren.settings`) and run `on_init(settings)`.
    fn init(self: Arc<Self>, cx: CallCx) -> BoxFuture<'static, Result<(), PluginError>>;
    /// Run `on_destroy()`.
    fn destroy(self: Arc<Self>, cx: CallCx) -> BoxFuture<'static, Result<(), PluginError>>;
    /// Run `on_session_closed(session)`.
    fn session_closed(self: Arc<Self>, cx: CallCx) -> BoxFuture<'static, Result<(), CallError>>;
    /// Run `on_backend_msg(group, service, msgid, body)` if the script defines it.
    fn backend_msg(
        self: Arc<Self>,
        cx: CallCx,
        msg: BackendMsg,
    ) -> BoxFuture<'static, Result<(), CallError>> {
        let _ = (cx, msg);
        Box::pin(async { Ok(()) })
    }
    /// `export_state()`: the state to hand to the next version.
    fn export_state(self: Arc<Self>) -> BoxFuture<'static, Result<Option<Value>, PluginError>>;
    /// `import_state(state)`: take over the previous version's state.
    fn import_state(self: Arc<Self>, state: Value) -> BoxFuture<'static, Result<(), PluginError>>;
    /// Replace handler `handler` (one of [`ModuleVersion::handlers`]) with the function
    /// `source` defines: calls that start afterwards run it, calls in flight finish on the
    /// function they started with. A source that does not compile (or defines no function)
    /// changes nothing.
    fn patch(
        self: Arc<Self>,
        handler: Arc<str>,
        source: Arc<str>,
    ) -> BoxFuture<'static, Result<(), PluginError>>;
    /// The handlers patched on this version, sorted.
    fn patched(&self) -> Vec<String>;
}

/// The per-language host of one module plugin, shared by its versions (the Python host owns
/// the plugin's threads).
enum Host {
    #[cfg(feature = "lua")]
    Lua,
    #[cfg(feature = "python")]
    Python(Arc<crate::python::Pool>),
    /// Built without a module host: no value of this type exists.
    #[cfg(not(any(feature = "lua", feature = "python")))]
    None(std::convert::Infallible),
}

impl Host {
    fn new(
        kind: PluginKind,
        path: &Path,
        options: &ModulePluginOptions,
    ) -> Result<Host, PluginError> {
        match kind {
            #[cfg(feature = "lua")]
            PluginKind::Lua => Ok(Host::Lua),
            #[cfg(feature = "python")]
            PluginKind::Python => Ok(Host::Python(crate::python::Pool::start(
                path,
                workers(options),
                options.queue,
            )?)),
            PluginKind::Native => Err(PluginError::Options {
                path: path.to_owned(),
                message:
                    "native plugins are channel handlers; modules are written in Lua or Python"
                        .into(),
            }),
            #[allow(unreachable_patterns)]
            other => {
                let _ = options;
                Err(other.not_built(path))
            }
        }
    }

    fn load_blocking(
        &self,
        src: &Source,
        version: u64,
    ) -> Result<Arc<dyn ModuleVersion>, PluginError> {
        match self {
            #[cfg(feature = "lua")]
            Host::Lua => crate::lua::module::load(&src.name, &src.path, &src.options, version),
            #[cfg(feature = "python")]
            Host::Python(pool) => crate::python::module::load_blocking(
                pool,
                &src.name,
                &src.path,
                &src.options,
                version,
            ),
            #[cfg(not(any(feature = "lua", feature = "python")))]
            Host::None(never) => {
                let _ = (src, version);
                match *never {}
            }
        }
    }

    async fn load(
        &self,
        src: &Source,
        version: u64,
    ) -> Result<Arc<dyn ModuleVersion>, PluginError> {
        match self {
            #[cfg(feature = "lua")]
            Host::Lua => crate::lua::module::load(&src.name, &src.path, &src.options, version),
            #[cfg(feature = "python")]
            Host::Python(pool) => {
                crate::python::module::load(pool, &src.name, &src.path, &src.options, version).await
            }
            #[cfg(not(any(feature = "lua", feature = "python")))]
            Host::None(never) => {
                let _ = (src, version);
                match *never {}
            }
        }
    }
}

/// Workers of a module: one when sequential.
pub(crate) fn workers(options: &ModulePluginOptions) -> usize {
    match options.execution {
        Execution::Sequential => 1,
        Execution::Concurrent => options.workers.max(1),
    }
}

struct Source {
    name: String,
    path: PathBuf,
    options: ModulePluginOptions,
}

/// A module written as a plugin: [`ModulePlugin::module`] is what a node runs; keep the plugin
/// to [`Plugin::reload`] it.
pub struct ModulePlugin {
    kind: PluginKind,
    source: Source,
    host: Host,
    slot: PluginSlot<dyn ModuleVersion>,
    /// The handlers the module was built with (what the router knows).
    routed: Vec<String>,
    /// The instance's context from `on_init`, to initialize reloaded versions the same way.
    init: Mutex<Option<CallCx>>,
    /// The instance's identity and settings from `on_init`, for the calls' contexts.
    instance: OnceLock<Arc<InstanceInfo>>,
    /// Serializes reloads and handler patches: a patch applies to the version it was checked
    /// against.
    reloading: tokio::sync::Mutex<()>,
    /// The Redis-RPC peers scripts reach through `warren.rpc_call`.
    redis_rpc: Arc<RedisRpcSlot>,
    /// The backend groups scripts reach through `warren.backend_*`.
    backends: Arc<crate::backend::BackendSlot>,
}

/// A message a `[[backend]]` group received that answers no call, for `on_backend_msg`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BackendMsg {
    /// The group.
    pub group: String,
    /// The id of the service that sent it.
    pub service: String,
    /// Its msgid.
    pub msgid: u32,
    /// Its body.
    pub body: Bytes,
}

impl std::fmt::Debug for ModulePlugin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ModulePlugin")
            .field("type", &self.source.name)
            .field("path", &self.source.path)
            .field("version", &self.slot.version())
            .finish_non_exhaustive()
    }
}

impl ModulePlugin {
    /// Load the plugin at `path` as module type `type_name` (Lua or Python): runs the file,
    /// finds its handlers, checks the options' handler lists against them.
    pub fn load(
        type_name: &str,
        path: impl AsRef<Path>,
        options: &ModulePluginOptions,
    ) -> Result<Arc<ModulePlugin>, PluginError> {
        let path = path.as_ref().to_owned();
        let kind = PluginKind::from_path(&path)?;
        kind.require_built(&path)?;
        let source = Source {
            name: type_name.to_owned(),
            path: path.clone(),
            options: options.clone(),
        };
        let host = Host::new(kind, &path, options)?;
        let first = host.load_blocking(&source, 1)?;
        let routed = first.handlers().to_vec();
        let known: HashSet<&str> = routed.iter().map(String::as_str).collect();
        let listed = options
            .handlers
            .iter()
            .flatten()
            .chain(&options.login_handlers);
        if let Some(missing) = listed.into_iter().find(|h| !known.contains(h.as_str())) {
            return Err(PluginError::Options {
                path,
                message: format!("handler {missing:?} is listed but the plugin does not define it"),
            });
        }
        tracing::info!(module = type_name, plugin = %path.display(), kind = %kind, version = 1, handlers = ?routed, "module plugin loaded");
        crate::count_load(kind);
        Ok(Arc::new(ModulePlugin {
            kind,
            slot: PluginSlot::new(&path, first),
            source,
            host,
            routed,
            init: Mutex::new(None),
            instance: OnceLock::new(),
            reloading: tokio::sync::Mutex::new(()),
            redis_rpc: Arc::new(RwLock::new(None)),
            backends: Arc::new(RwLock::new(None)),
        }))
    }

    /// The module to give a node: handlers (client-visible as the options say), execution mode,
    /// and the script's lifecycle hooks. Run one instance of it per plugin (each load keeps one
    /// instance's settings).
    pub fn module(self: &Arc<Self>) -> Module {
        let opts = &self.source.options;
        let mut b = Module::builder(&self.source.name, self.clone()).execution(opts.execution);
        for name in &self.routed {
            let handler: Arc<str> = name.as_str().into();
            let f = move |cx: Context<Arc<ModulePlugin>>, body: Bytes| {
                let handler = handler.clone();
                async move { cx.state().call(handler, &cx, body).await }
            };
            b = if opts.login_handlers.iter().any(|h| h == name) {
                b.login_handler(name, f)
            } else if opts.handlers.iter().flatten().any(|h| h == name) {
                b.client_handler(name, f)
            } else {
                b.handler(name, f)
            };
        }
        if self.kind() == PluginKind::Python {
            // a crossing to the plugin's threads per call is the largest cost of a Python call:
            // a session's queued calls cross together (docs/plugins.md, "How Python calls cross")
            b = b.in_order(
                |calls: Vec<(Context<Arc<ModulePlugin>>, Box<str>, Bytes)>| match calls.first() {
                    Some((cx, _, _)) => cx.state().clone().call_in_order(calls),
                    None => Vec::new(),
                },
            );
        }
        if self.slot.current().value.has_hook("on_session_closed") {
            b = b.on_session_closed(|cx: Context<Arc<ModulePlugin>>, _: ()| async move {
                let v = cx.state().slot.current();
                v.value.clone().session_closed(CallCx::of(&cx)).await
            });
        }
        b.on_init(|cx: Context<Arc<ModulePlugin>>| async move {
            let this = cx.state();
            let call = CallCx::of(&cx).without_session();
            // the first instance's (one per plugin; the calls of another get a copy each)
            let _ = this.instance.set(call.instance.clone());
            *this.init.lock() = Some(call.clone());
            let v = this.slot.current();
            v.value
                .clone()
                .init(call)
                .await
                .map_err(|e| CallError::App(e.to_string()))
        })
        .on_destroy(|cx: Context<Arc<ModulePlugin>>| async move {
            let v = cx.state().slot.current();
            v.value
                .clone()
                .destroy(CallCx::of(&cx).without_session())
                .await
                .map_err(|e| CallError::App(e.to_string()))
        })
        .build()
    }

    async fn call(
        &self,
        handler: Arc<str>,
        cx: &Context<Arc<ModulePlugin>>,
        body: Bytes,
    ) -> Result<Bytes, CallError> {
        let v = self.slot.current();
        if !v.value.handlers().iter().any(|h| **h == *handler) {
            return Err(CallError::HandlerNotFound(handler.to_string()));
        }
        v.value.clone().call(handler, CallCx::of(cx), body).await
    }

    /// The lane's in-order runner: the calls of one session the running version has handlers
    /// for start together on it, in order; the others fail at once.
    fn call_in_order(
        &self,
        calls: Vec<(Context<Arc<ModulePlugin>>, Box<str>, Bytes)>,
    ) -> Vec<BoxFuture<'static, Result<Bytes, CallError>>> {
        let v = self.slot.current();
        let mut known = Vec::with_capacity(calls.len());
        let mut run = Vec::with_capacity(calls.len());
        for (cx, handler, body) in calls {
            if v.value.handlers().iter().any(|h| **h == *handler) {
                run.push((Arc::<str>::from(handler), CallCx::of(&cx), body));
                known.push(None);
            } else {
                known.push(Some(CallError::HandlerNotFound(handler.to_string())));
            }
        }
        let mut started = v.value.clone().call_in_order(run).into_iter();
        known
            .into_iter()
            .map(|refused| match refused {
                Some(e) => Box::pin(std::future::ready(Err(e))) as BoxFuture<'static, _>,
                None => started
                    .next()
                    .unwrap_or_else(|| Box::pin(std::future::ready(Err(CallError::Closed)))),
            })
            .collect()
    }

    /// Replace one handler of the running version with a script body: the hotfix of the admin
    /// API (`PUT /admin/modules/{type}/handlers/{handler}`), what TianQinS did with `exec`.
    ///
    /// Lua: `source` is a function expression, `function(session, msg) return "fixed" end`.
    /// Python: it defines one function, `def handler(session, msg): return "fixed"` (any name;
    /// the code runs in the module's namespace). Either way the function sees the module's
    /// globals and replaces the global of the handler's name, so the script's own calls to it
    /// get the new one too. Calls that start after this returns run the new function; calls in
    /// flight finish on the old one. The patch lasts until the next reload, which runs the file
    /// again: put the fix in the file as well.
    ///
    /// Refused, the running handler kept, for a handler the running version does not define
    /// ([`PluginError::NoHandler`]) or a body that does not compile, raises, or defines no
    /// function ([`PluginError::Patch`], with the line in the body).
    pub async fn replace_handler(&self, handler: &str, source: &str) -> Result<(), PluginError> {
        let _one_at_a_time = self.reloading.lock().await;
        let running = self.slot.current();
        if !running.value.handlers().iter().any(|h| h == handler) {
            return Err(PluginError::NoHandler {
                path: self.source.path.clone(),
                handler: handler.to_owned(),
            });
        }
        let r = running
            .value
            .clone()
            .patch(handler.into(), source.into())
            .await;
        match &r {
            Ok(()) => {
                tracing::info!(module = %self.source.name, plugin = %self.source.path.display(), version = running.version, handler, "handler replaced")
            }
            Err(e) => {
                tracing::warn!(module = %self.source.name, plugin = %self.source.path.display(), version = running.version, handler, error = %e, "handler not replaced; the running one stays")
            }
        }
        r
    }

    /// The handlers replaced by [`ModulePlugin::replace_handler`] on the running version
    /// (a reload starts afresh from the file), sorted.
    pub fn patched_handlers(&self) -> Vec<String> {
        self.slot.current().value.patched()
    }

    /// The handlers of the running version, sorted.
    pub fn handlers(&self) -> Vec<String> {
        self.slot.current().value.handlers().to_vec()
    }

    /// Give the module's scripts the node's TianQinS Redis-RPC peers, for `warren.rpc_call`
    /// and `warren.rpc_notify` (the endpoint starts after the node, so it is handed over
    /// then; until it is, those raise an `unavailable` error).
    pub fn set_redis_rpc(&self, peers: Arc<dyn RedisRpcCaller>) {
        *self.redis_rpc.write() = Some(peers);
    }

    /// Give the module's scripts the node's `[[backend]]` groups, for `warren.backend_send`,
    /// `warren.backend_send_to` and `warren.backend_call` (the groups start after the node;
    /// until then those raise an `unavailable` error).
    pub fn set_backends(&self, groups: Arc<dyn crate::BackendCaller>) {
        *self.backends.write() = Some(groups);
    }

    /// Whether the running version defines `on_backend_msg`.
    pub fn wants_backend_msgs(&self) -> bool {
        self.slot.current().value.has_hook("on_backend_msg")
    }

    /// Hand a message a backend group received (and no call waited for) to the running
    /// version's `on_backend_msg`, with the context `on_init` had (no session). Before the
    /// instance started, or when the script does not define it, nothing runs.
    pub async fn backend_msg(&self, msg: BackendMsg) -> Result<(), CallError> {
        let version = self.slot.current().value.clone();
        if !version.has_hook("on_backend_msg") {
            return Ok(());
        }
        let Some(cx) = self.init.lock().clone() else {
            return Ok(());
        };
        version.backend_msg(cx.without_session(), msg).await
    }

    async fn reload_now(&self) -> Result<u64, PluginError> {
        let _one_at_a_time = self.reloading.lock().await;
        let path = &self.source.path;
        let next = self.slot.next_version();
        let outcome = async {
            let new = self.host.load(&self.source, next).await?;
            let init = self.init.lock().clone();
            if let Some(cx) = init {
                new.clone().init(cx).await?;
            }
            let old = self.slot.current().value.clone();
            let carried = if new.has_hook("import_state") && old.has_hook("export_state") {
                match old.export_state().await? {
                    Some(state) => {
                        new.clone().import_state(state).await?;
                        true
                    }
                    None => false,
                }
            } else {
                false
            };
            Ok::<_, PluginError>((new, carried))
        }
        .await;
        let (new, carried) = match outcome {
            Ok(x) => x,
            Err(e) => {
                tracing::warn!(module = %self.source.name, plugin = %path.display(), version = next, error = %e, "reload failed; the running version stays");
                crate::count_reload(self.kind, false);
                return Err(e);
            }
        };
        for added in new.handlers().iter().filter(|h| !self.routed.contains(h)) {
            tracing::warn!(module = %self.source.name, handler = %added, "a reload added a handler: it is not routable until the node restarts");
        }
        let version = self.slot.install(new);
        tracing::info!(module = %self.source.name, plugin = %path.display(), kind = %self.kind, version, state = if carried { "carried over" } else { "reset" }, "module plugin reloaded");
        crate::count_reload(self.kind, true);
        Ok(version)
    }
}

impl Plugin for ModulePlugin {
    fn name(&self) -> &str {
        &self.source.name
    }

    fn path(&self) -> &Path {
        &self.source.path
    }

    fn kind(&self) -> PluginKind {
        self.kind
    }

    fn version(&self) -> u64 {
        self.slot.version()
    }

    fn reload(&self) -> BoxFuture<'_, Result<u64, PluginError>> {
        Box::pin(self.reload_now())
    }
}

/// A reply in the module convention (JSON): what a script's return value becomes.
pub(crate) fn json_reply(v: &Value) -> Result<Bytes, CallError> {
    serde_json::to_vec(v)
        .map(Bytes::from)
        .map_err(|e| CallError::App(format!("reply encoding failed: {e}")))
}

/// A reply body from another module, for a script: its JSON decoded, or its text when it is
/// not JSON.
pub(crate) fn decode_reply(body: &[u8]) -> Value {
    serde_json::from_slice(body)
        .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(body).into_owned()))
}

/// A request body a script receives as JSON ([`crate::MsgType::Json`]).
pub(crate) fn json_body(body: &[u8]) -> Result<Value, CallError> {
    serde_json::from_slice(body).map_err(|_| CallError::BodyNotJson)
}

/// What a script's `warren.log(level, ...)` writes.
pub(crate) fn log(module: &str, level: &str, text: &str) {
    match level {
        "error" => tracing::error!(target: "warren_plugin::script", module, "{text}"),
        "warn" | "warning" => tracing::warn!(target: "warren_plugin::script", module, "{text}"),
        "debug" => tracing::debug!(target: "warren_plugin::script", module, "{text}"),
        "trace" => tracing::trace!(target: "warren_plugin::script", module, "{text}"),
        _ => tracing::info!(target: "warren_plugin::script", module, "{text}"),
    }
}

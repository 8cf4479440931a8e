//! Modules: named services whose handlers answer client requests and each other's calls.
//!
//! A module is declared once with [`Module::builder`]: its type name, its state, its handlers
//! (plain async fns taking a [`Context`] and a body), whether they run **sequentially** (one task,
//! mailbox order — mqant `Register`) or **concurrently** (mqant `RegisterGO`: a handler that does
//! not wait runs on the caller's task, one that waits on a task of its own), and its lifecycle
//! hooks. Either way one session's messages reach the module in the order sent: in concurrent mode
//! each session has a lane that runs its messages one after another.
//!
//! ```
//! use warren::{Context, Json, Module, CallError};
//! #[derive(serde::Deserialize)]
//! struct Hello { name: String }
//! async fn hello(_cx: Context<()>, Json(req): Json<Hello>) -> Result<String, CallError> {
//!     Ok(format!("hello {}", req.name))
//! }
//! let m: Module = Module::builder("Greeter", ()).client_handler("Hello", hello).build();
//! assert_eq!(m.name(), "Greeter");
//! ```

use parking_lot::Mutex;
use std::collections::{HashMap, VecDeque};
use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures_util::FutureExt;
use futures_util::future::BoxFuture;
use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::Value;
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::bus::Pending;
use crate::error::{CallError, Detail};
use crate::session::{Session, SessionId};

pub use crate::config::Execution;

pub mod route_metrics;
mod runtime;

pub(crate) use runtime::Instance;
pub use runtime::Job;
pub use runtime::LocalBus;

/// What a handler sees: the module state, the caller's session snapshot (absent for calls between
/// modules that carry none), and the node's services (calls, session operations, groups).
pub struct Context<S = ()> {
    state: Arc<S>,
    session: Option<Arc<Session>>,
    services: Arc<dyn Services>,
    instance: Arc<InstanceInfo>,
}

/// What a handler asks of the node it runs in: calls to other modules, pushes to its caller.
/// The node implements it (`NodeHandle`); the module layer knows only this trait, so modules
/// sit below the router, the gate and the node, and a test or a plugin host can stand in for
/// a node. Everything else a node offers (sessions, groups, subscriptions) is reached through
/// `Context::node`.
pub trait Services: Send + Sync + 'static {
    /// Call `module`'s `handler` and wait for the reply (`timeout`: the node's call timeout
    /// when `None`).
    fn call<'a>(
        &'a self,
        module: &'a str,
        handler: &'a str,
        session: Option<Arc<Session>>,
        body: Bytes,
        timeout: Option<Duration>,
    ) -> BoxFuture<'a, Result<Bytes, CallError>>;

    /// Hand a call to `module`'s `handler` without waiting for a result.
    fn call_nr<'a>(
        &'a self,
        module: &'a str,
        handler: &'a str,
        session: Option<Arc<Session>>,
        body: Bytes,
    ) -> BoxFuture<'a, Result<(), CallError>>;

    /// Push `body` on `topic` to `session`, wherever its gate is.
    fn push<'a>(
        &'a self,
        session: &'a Session,
        topic: &'a str,
        body: Bytes,
    ) -> BoxFuture<'a, Result<(), CallError>>;

    /// The implementation itself, for the node's own accessors (`Context::node`).
    fn as_any(&self) -> &dyn std::any::Any;
}

impl<S> Clone for Context<S> {
    fn clone(&self) -> Self {
        Context {
            state: self.state.clone(),
            session: self.session.clone(),
            services: self.services.clone(),
            instance: self.instance.clone(),
        }
    }
}

/// Identity and settings of one running module instance.
#[derive(Debug, Clone)]
pub struct InstanceInfo {
    /// Module type name.
    pub module: Arc<str>,
    /// Instance id (unique in the cluster, e.g. `Chat001`).
    pub id: Arc<str>,
    /// Settings from the config file, passed verbatim.
    pub settings: Value,
}

impl<S> Context<S> {
    /// The module's state.
    pub fn state(&self) -> &S {
        &self.state
    }

    /// The caller's session snapshot, if the call carries one.
    pub fn session(&self) -> Option<&Arc<Session>> {
        self.session.as_ref()
    }

    /// What this handler may ask of its node (see [`Services`]).
    pub fn services(&self) -> &Arc<dyn Services> {
        &self.services
    }

    /// This instance's id and settings.
    pub fn instance(&self) -> &InstanceInfo {
        &self.instance
    }

    /// Call a handler of another module (or of this one) and wait for its reply, with the default
    /// deadline (10 s).
    pub async fn call(
        &self,
        module: &str,
        handler: &str,
        body: impl Into<Bytes>,
    ) -> Result<Bytes, CallError> {
        self.services
            .call(module, handler, self.session.clone(), body.into(), None)
            .await
    }

    /// [`Context::call`] with a JSON body and a JSON reply.
    pub async fn call_json<T: DeserializeOwned>(
        &self,
        module: &str,
        handler: &str,
        body: &impl Serialize,
    ) -> Result<T, CallError> {
        let body =
            serde_json::to_vec(body).map_err(|e| CallError::bad_request(Detail::from_error(e)))?;
        let reply = self.call(module, handler, body).await?;
        serde_json::from_slice(&reply).map_err(|e| CallError::bad_request(Detail::from_error(e)))
    }

    /// Call a handler without waiting for a result (mqant `CallNR`). Resolves once the call is
    /// handed to the target.
    pub async fn call_nr(
        &self,
        module: &str,
        handler: &str,
        body: impl Into<Bytes>,
    ) -> Result<(), CallError> {
        self.services
            .call_nr(module, handler, self.session.clone(), body.into())
            .await
    }

    /// Push a message to the caller's own session. Pushes made during a handler reach the client
    /// before that handler's reply.
    pub async fn push(&self, topic: &str, body: impl Into<Bytes>) -> Result<(), CallError> {
        let s = self.session.as_ref().ok_or(CallError::NoSession)?;
        self.services.push(s, topic, body.into()).await
    }
}

/// Decoding a request body into a handler argument.
pub trait FromBody: Sized + Send {
    /// Decode; the error goes back to the caller.
    fn from_body(body: Bytes) -> Result<Self, CallError>;
}

impl FromBody for Bytes {
    fn from_body(body: Bytes) -> Result<Self, CallError> {
        Ok(body)
    }
}

impl FromBody for () {
    fn from_body(_: Bytes) -> Result<Self, CallError> {
        Ok(())
    }
}

impl FromBody for Value {
    fn from_body(body: Bytes) -> Result<Self, CallError> {
        serde_json::from_slice(&body).map_err(|_| CallError::BodyNotJson)
    }
}

/// A JSON body or reply, decoded or encoded with serde.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Json<T>(pub T);

impl<T: DeserializeOwned + Send> FromBody for Json<T> {
    fn from_body(body: Bytes) -> Result<Self, CallError> {
        serde_json::from_slice(&body)
            .map(Json)
            .map_err(|e| CallError::bad_request(Detail::caused("invalid request body", e)))
    }
}

/// Turning a handler's result into reply bytes (JSON by convention).
pub trait IntoReply {
    /// Encode.
    fn into_reply(self) -> Result<Bytes, CallError>;
}

impl IntoReply for Bytes {
    fn into_reply(self) -> Result<Bytes, CallError> {
        Ok(self)
    }
}

impl IntoReply for () {
    fn into_reply(self) -> Result<Bytes, CallError> {
        Ok(Bytes::from_static(b"null"))
    }
}

impl IntoReply for Value {
    fn into_reply(self) -> Result<Bytes, CallError> {
        json_bytes(&self)
    }
}

impl IntoReply for String {
    fn into_reply(self) -> Result<Bytes, CallError> {
        json_bytes(&self)
    }
}

impl IntoReply for bool {
    fn into_reply(self) -> Result<Bytes, CallError> {
        Ok(Bytes::from_static(if self { b"true" } else { b"false" }))
    }
}

impl IntoReply for &'static str {
    fn into_reply(self) -> Result<Bytes, CallError> {
        json_bytes(&self)
    }
}

impl<T: Serialize> IntoReply for Json<T> {
    fn into_reply(self) -> Result<Bytes, CallError> {
        json_bytes(&self.0)
    }
}

fn json_bytes(v: &impl Serialize) -> Result<Bytes, CallError> {
    serde_json::to_vec(v)
        .map(Bytes::from)
        .map_err(|e| CallError::App(format!("reply encoding failed: {e}")))
}

/// A handler: an async fn of (`Context<S>`, body) returning a result or an error.
pub trait Handler<S, B>: Send + Sync + 'static {
    /// Run the handler on a raw body.
    fn call(&self, cx: Context<S>, body: Bytes) -> BoxFuture<'static, Result<Bytes, CallError>>;
}

impl<S, F, Fut, B, R, E> Handler<S, B> for F
where
    S: Send + Sync + 'static,
    F: Fn(Context<S>, B) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<R, E>> + Send + 'static,
    B: FromBody + 'static,
    R: IntoReply,
    E: Into<CallError>,
{
    fn call(&self, cx: Context<S>, body: Bytes) -> BoxFuture<'static, Result<Bytes, CallError>> {
        match B::from_body(body) {
            Err(e) => Box::pin(std::future::ready(Err(e))),
            Ok(b) => {
                let fut = self(cx, b);
                Box::pin(async move { fut.await.map_err(Into::into)?.into_reply() })
            }
        }
    }
}

type ErasedHandler = Arc<
    dyn Fn(Env, Option<Arc<Session>>, Bytes) -> BoxFuture<'static, Result<Bytes, CallError>>
        + Send
        + Sync,
>;
type Hook = Arc<dyn Fn(Env) -> BoxFuture<'static, Result<(), CallError>> + Send + Sync>;
/// A module's runner of a session's queued calls (see [`ModuleBuilder::in_order`]).
type InOrderRunner = Arc<
    dyn Fn(
            Env,
            Vec<(Box<str>, Option<Arc<Session>>, Bytes)>,
        ) -> Vec<BoxFuture<'static, Result<Bytes, CallError>>>
        + Send
        + Sync,
>;
type RunHook = Arc<dyn Fn(Env, CancellationToken) -> BoxFuture<'static, ()> + Send + Sync>;

/// What a running instance needs to build a [`Context`].
#[derive(Clone)]
pub(crate) struct Env {
    pub(crate) services: Arc<dyn Services>,
    pub(crate) instance: Arc<InstanceInfo>,
}

#[derive(Clone)]
struct HandlerEntry {
    f: ErasedHandler,
    client_visible: bool,
    /// Callable by a client whose session has no uid yet (see [`ModuleBuilder::login_handler`]).
    before_login: bool,
    /// Its route's counts (module/route_metrics.rs), set by [`ModuleBuilder::build`]; none for
    /// an internal handler (`$…`).
    route: Option<Arc<route_metrics::RouteStats>>,
}

/// Reserved handler name a module receives when a session it has seen closes (see
/// [`ModuleBuilder::on_session_closed`]).
pub const SESSION_CLOSED: &str = "$session_closed";

/// A module definition, ready to be instantiated by a node.
#[derive(Clone)]
pub struct Module {
    def: Arc<ModuleDef>,
}

#[derive(Clone)]
struct ModuleDef {
    name: Arc<str>,
    execution: Execution,
    handlers: HashMap<Box<str>, HandlerEntry, foldhash::fast::RandomState>,
    on_init: Option<Hook>,
    on_run: Option<RunHook>,
    on_destroy: Option<Hook>,
    in_order: Option<InOrderRunner>,
    /// The route metrics of its handlers, resolved by [`ModuleBuilder::build`]
    /// (module/route_metrics.rs): each handler's entry holds its own counts, and calls of a
    /// name the module does not have count under this one's `other`.
    routes: Option<Arc<route_metrics::RouteMetrics>>,
}

impl std::fmt::Debug for Module {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Module")
            .field("name", &self.def.name)
            .field("execution", &self.def.execution)
            .finish_non_exhaustive()
    }
}

/// Builds a [`Module`]: name, state, handlers, execution mode, lifecycle hooks.
pub struct ModuleBuilder<S> {
    state: Arc<S>,
    def: ModuleDef,
}

impl Module {
    /// Start declaring a module of type `name` whose handlers share `state`.
    pub fn builder<S: Send + Sync + 'static>(name: &str, state: S) -> ModuleBuilder<S> {
        ModuleBuilder {
            state: Arc::new(state),
            def: ModuleDef {
                name: name.into(),
                execution: Execution::default(),
                handlers: HashMap::default(),
                on_init: None,
                on_run: None,
                on_destroy: None,
                in_order: None,
                routes: None,
            },
        }
    }

    /// Module type name.
    pub fn name(&self) -> &str {
        &self.def.name
    }

    /// Execution mode.
    pub fn execution(&self) -> Execution {
        self.def.execution
    }

    /// Whether the module has a handler of this name.
    pub fn has_handler(&self, name: &str) -> bool {
        self.def.handlers.contains_key(name)
    }

    /// Names of the handlers registered as client-visible.
    pub fn client_handlers(&self) -> Vec<String> {
        let mut v: Vec<String> = self
            .def
            .handlers
            .iter()
            .filter(|(_, h)| h.client_visible)
            .map(|(n, _)| n.to_string())
            .collect();
        v.sort();
        v
    }

    /// Names of the handlers registered with [`ModuleBuilder::login_handler`]: the only ones a
    /// client may call before its session is bound to a uid.
    pub fn login_handlers(&self) -> Vec<String> {
        let mut v: Vec<String> = self
            .def
            .handlers
            .iter()
            .filter(|(_, h)| h.before_login)
            .map(|(n, _)| n.to_string())
            .collect();
        v.sort();
        v
    }

    /// The same module with another execution mode (a config override).
    pub fn with_execution(self, execution: Execution) -> Module {
        let mut def = ModuleDef::clone(&self.def);
        def.execution = execution;
        Module { def: Arc::new(def) }
    }

    /// Whether the module wants session-closed notifications.
    pub fn wants_session_closed(&self) -> bool {
        self.def.handlers.contains_key(SESSION_CLOSED)
    }
}

impl<S: Send + Sync + 'static> ModuleBuilder<S> {
    /// Run handlers sequentially or concurrently (default concurrent).
    pub fn execution(mut self, execution: Execution) -> Self {
        self.def.execution = execution;
        self
    }

    fn add<B: 'static>(
        mut self,
        name: &str,
        h: impl Handler<S, B>,
        client_visible: bool,
        before_login: bool,
    ) -> Self {
        let state = self.state.clone();
        let h = Arc::new(h);
        let f: ErasedHandler = Arc::new(move |env: Env, session, body| {
            let cx = Context {
                state: state.clone(),
                session,
                services: env.services,
                instance: env.instance,
            };
            h.call(cx, body)
        });
        self.def.handlers.insert(
            name.into(),
            HandlerEntry {
                f,
                client_visible,
                before_login,
                route: None,
            },
        );
        self
    }

    /// Register an RPC handler: callable by other modules; callable by clients only in mqant mode
    /// when its name starts with a client-visible prefix (`HD_`, `Handler_`).
    pub fn handler<B: 'static>(self, name: &str, h: impl Handler<S, B>) -> Self {
        self.add(name, h, false, false)
    }

    /// Register a handler that clients may call in every mode, once their session is bound to a
    /// uid (by authentication at connect, or by a login handler): calls from a session without
    /// one are refused with [`CallError::LoginRequired`].
    pub fn client_handler<B: 'static>(self, name: &str, h: impl Handler<S, B>) -> Self {
        self.add(name, h, true, false)
    }

    /// Register a client handler that may be called *before* login: the handler that logs a
    /// client in (and binds its uid), or a public one such as an echo. Every other client call
    /// from a session without a uid is refused, on every protocol.
    pub fn login_handler<B: 'static>(self, name: &str, h: impl Handler<S, B>) -> Self {
        self.add(name, h, true, true)
    }

    /// Run `h` when a session that has called this module closes (for presence: "user left").
    /// It receives that session's last snapshot and an empty body, in order after the session's
    /// own requests.
    pub fn on_session_closed<B: 'static>(self, h: impl Handler<S, B>) -> Self {
        self.add(SESSION_CLOSED, h, false, false)
    }

    /// Run once before the node starts serving; an error stops the node from starting.
    pub fn on_init<F, Fut>(mut self, f: F) -> Self
    where
        F: Fn(Context<S>) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<(), CallError>> + Send + 'static,
    {
        let state = self.state.clone();
        self.def.on_init = Some(Arc::new(move |env: Env| {
            Box::pin(f(Context {
                state: state.clone(),
                session: None,
                services: env.services,
                instance: env.instance,
            }))
        }));
        self
    }

    /// A background task that runs while the node runs; it should return when the token fires.
    pub fn on_run<F, Fut>(mut self, f: F) -> Self
    where
        F: Fn(Context<S>, CancellationToken) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = ()> + Send + 'static,
    {
        let state = self.state.clone();
        self.def.on_run = Some(Arc::new(move |env: Env, tok| {
            Box::pin(f(
                Context {
                    state: state.clone(),
                    session: None,
                    services: env.services,
                    instance: env.instance,
                },
                tok,
            ))
        }));
        self
    }

    /// Let the module start several of a session's queued calls at once, for a module whose
    /// handlers run somewhere that costs a crossing per start (a plugin's own threads).
    ///
    /// A concurrent instance runs one session's calls one after the other (the session's lane).
    /// When calls have queued behind a running one, the lane gives them all (up to
    /// [`IN_ORDER_RUN`], stopping before a session-closed notification) to `f` in one go, in the
    /// order the client sent them; `f` starts them and returns one future per call, in the same
    /// order, each resolving to that call's result. `f` promises to run them one after the
    /// other, in that order, as the lane would have. The lane still checks that each handler
    /// exists and that its deadline has not passed before giving it to `f`, waits for each
    /// result under its call's deadline, counts it and sends it back, so callers see no
    /// difference but the time.
    pub fn in_order<F>(mut self, f: F) -> Self
    where
        F: Fn(
                Vec<(Context<S>, Box<str>, Bytes)>,
            ) -> Vec<BoxFuture<'static, Result<Bytes, CallError>>>
            + Send
            + Sync
            + 'static,
    {
        let state = self.state.clone();
        self.def.in_order = Some(Arc::new(move |env: Env, calls| {
            f(calls
                .into_iter()
                .map(|(handler, session, body)| {
                    let cx = Context {
                        state: state.clone(),
                        session,
                        services: env.services.clone(),
                        instance: env.instance.clone(),
                    };
                    (cx, handler, body)
                })
                .collect())
        }));
        self
    }

    /// Run once at shutdown, after the gate has drained.
    pub fn on_destroy<F, Fut>(mut self, f: F) -> Self
    where
        F: Fn(Context<S>) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<(), CallError>> + Send + 'static,
    {
        let state = self.state.clone();
        self.def.on_destroy = Some(Arc::new(move |env: Env| {
            Box::pin(f(Context {
                state: state.clone(),
                session: None,
                services: env.services,
                instance: env.instance,
            }))
        }));
        self
    }

    /// Finish the definition.
    pub fn build(mut self) -> Module {
        let routes = route_metrics::RouteMetrics::new(
            &self.def.name,
            self.def.handlers.keys().map(|k| &**k),
        );
        for (name, entry) in &mut self.def.handlers {
            entry.route = routes.route(name);
        }
        self.def.routes = Some(Arc::new(routes));
        Module {
            def: Arc::new(self.def),
        }
    }
}

/// Most queued calls of one session a lane gives a module's in-order runner at once
/// ([`ModuleBuilder::in_order`]).
pub const IN_ORDER_RUN: usize = 32;

/// The default deadline of a call between modules (mqant `RpcExpired`, v1.0).
pub const DEFAULT_CALL_TIMEOUT: Duration = Duration::from_secs(10);

#[cfg(test)]
mod tests {
    use super::*;
    use std::error::Error as _;

    #[derive(Debug, serde::Deserialize)]
    struct Say {
        #[allow(dead_code)]
        room: String,
    }

    #[test]
    fn a_body_that_does_not_decode_keeps_the_decoder_error() {
        let e = Json::<Say>::from_body(Bytes::from_static(b"{\"room\": 7}"))
            .expect_err("room is not a string");
        assert_eq!(e.kind(), crate::error::CallErrorKind::BadRequest);
        // the chain ends at serde_json's own error, with its line and column
        let cause = e.source().expect("the decoder's error");
        let json = cause
            .downcast_ref::<serde_json::Error>()
            .expect("a serde_json error");
        assert!(json.is_data());
        assert_eq!((json.line(), json.column()), (1, 10));
        // the caller still reads the words the wire has always carried
        assert_eq!(e.wire_text(), format!("invalid request body: {json}"));
    }
}

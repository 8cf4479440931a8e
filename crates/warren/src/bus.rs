//! The bus: how a call reaches a module instance. [`Bus`] is the seam a remote transport (NATS,
//! Redis, RabbitMQ) plugs into; [`LocalBus`] delivers to instances in this process, so one node
//! needs no broker. The router never knows which one it talks to.

use std::sync::Arc;

use bytes::Bytes;
use futures_util::future::BoxFuture;
use tokio::sync::oneshot;
use tokio::time::Instant;

use crate::error::CallError;
use crate::session::Session;
use crate::trace::TraceContext;

/// One call on its way to an instance.
#[derive(Debug)]
pub struct Call {
    /// Target instance id.
    pub instance: Arc<str>,
    /// Handler name.
    pub handler: Box<str>,
    /// Caller's session snapshot.
    pub session: Option<Arc<Session>>,
    /// Request body (opaque bytes, JSON by convention).
    pub body: Bytes,
    /// When the caller stops waiting.
    pub deadline: Instant,
    /// The client request this call serves, when traced (crate::trace): the node that runs it
    /// logs it under the same trace id.
    pub trace: Option<TraceContext>,
}

impl Call {
    /// A call of `handler` on instance `instance`, which its caller stops waiting for at
    /// `deadline`; no session and an empty body until [`Call::session`] and [`Call::body`] say
    /// otherwise. (The router makes one for a resolved target: `Target::call`.)
    pub fn new(instance: Arc<str>, handler: &str, deadline: Instant) -> Call {
        Call {
            instance,
            handler: handler.into(),
            session: None,
            body: Bytes::new(),
            deadline,
            trace: None,
        }
    }

    /// The caller's session snapshot, which the handler sees.
    pub fn session(mut self, session: Option<Arc<Session>>) -> Call {
        self.session = session;
        self
    }

    /// The request body.
    pub fn body(mut self, body: impl Into<Bytes>) -> Call {
        self.body = body.into();
        self
    }

    /// The trace of the client request this call serves.
    pub fn trace(mut self, trace: Option<TraceContext>) -> Call {
        self.trace = trace;
        self
    }
}

/// A reply that will arrive: resolves to the handler's result, a typed error, or
/// [`CallError::Timeout`] at the deadline. A call to an instance in this process waits on a
/// oneshot channel directly; a remote bus supplies its own future.
pub enum Pending {
    /// A result already known: the handler ran to its end on the caller's task
    /// (`Instance::call_here`).
    Ready(Option<Result<Bytes, CallError>>),
    /// The result of a call to a local instance.
    Local(oneshot::Receiver<Result<Bytes, CallError>>),
    /// The result of a call carried by a remote bus.
    Remote(BoxFuture<'static, Result<Bytes, CallError>>),
}

impl std::fmt::Debug for Pending {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Pending::Ready(_) => "Pending::Ready",
            Pending::Local(_) => "Pending::Local",
            Pending::Remote(_) => "Pending::Remote",
        })
    }
}

impl std::future::Future for Pending {
    type Output = Result<Bytes, CallError>;
    fn poll(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Self::Output> {
        match &mut *self {
            Pending::Ready(r) => std::task::Poll::Ready(r.take().unwrap_or(Err(CallError::Closed))),
            Pending::Local(rx) => std::pin::Pin::new(rx)
                .poll(cx)
                .map(|r| r.unwrap_or(Err(CallError::Closed))),
            Pending::Remote(f) => f.as_mut().poll(cx),
        }
    }
}

/// Delivers calls to module instances, wherever they run.
pub trait Bus: Send + Sync + 'static {
    /// Hand `call` to an instance on `node`. Resolves once the call is accepted — a caller that
    /// awaits its sends in turn keeps their order — and, when `reply` is true, yields the
    /// [`Pending`] result.
    fn send(
        &self,
        node: &str,
        call: Call,
        reply: bool,
    ) -> BoxFuture<'_, Result<Option<Pending>, CallError>>;

    /// Hand `call` to whichever node of module type `module`'s queue group takes it from the
    /// broker (`ModuleConfig::queue_group`); the receiving node runs it on its instance of that
    /// type. Buses without queue groups refuse, and the router does not ask them
    /// ([`Bus::has_groups`]).
    fn send_to_group(
        &self,
        module: &str,
        call: Call,
        reply: bool,
    ) -> BoxFuture<'_, Result<Option<Pending>, CallError>> {
        let _ = (call, reply);
        let why = format!(
            "the {} bus has no queue groups (module {module})",
            self.kind()
        );
        Box::pin(std::future::ready(Err(CallError::Unavailable(why.into()))))
    }

    /// Whether [`Bus::send_to_group`] works on this bus.
    fn has_groups(&self) -> bool {
        false
    }

    /// Short name for logs (`local`, `nats`, …).
    fn kind(&self) -> &'static str;
}

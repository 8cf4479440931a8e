//! Request traces: one W3C trace id per client request, kept from the gate through the bus to
//! the module that answers it, so every log line of that request, on every node, carries the
//! same `trace_id` (docs/configuration.md, "Traces and logs").
//!
//! The gate starts a trace for each request ([`start`]: the client's own `traceparent` when its
//! protocol carries one, else a new id), and opens a [`request_span`]; a call that crosses the
//! bus carries the context in its node frame (`warren_proto::node_frame`), and the node that
//! runs the handler opens a [`call_span`] with the same trace id around it.
//!
//! Cost: ids come from a per-thread generator (no syscall, no lock), and the spans are at
//! `debug` level under the target `warren::trace`, so while the filter keeps `debug` off for
//! that target they are never built: a request pays for a few random numbers and 25 bytes in a
//! node frame. `[log] trace = false` ([`set_enabled`]) removes even that.

use std::cell::Cell;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicBool, Ordering};

pub use warren_proto::trace_context::{SAMPLED, SpanId, TraceContext, TraceId};

/// Whether requests are traced: `[log] trace`, on unless the config says otherwise.
static ENABLED: AtomicBool = AtomicBool::new(true);

/// What to do with each span a trace opens, besides logging it: an exporter (the `otel` feature
/// of the binary) sets the span's remote parent here, so the spans it sends keep the trace id.
static ON_SPAN: OnceLock<SpanHook> = OnceLock::new();

/// An exporter's hook on each span a trace opens ([`on_span`]): it gives the span the trace
/// context's trace id and answers the id it gave the span, if any.
pub type SpanHook = fn(&tracing::Span, &TraceContext) -> Option<SpanId>;

/// Turn request traces on or off for this process (`[log] trace`). Off, requests carry no trace
/// context and open no span: the figure of the tracing overhead is taken against this.
pub fn set_enabled(on: bool) {
    ENABLED.store(on, Ordering::Relaxed);
}

/// Whether requests are traced ([`set_enabled`]).
pub fn enabled() -> bool {
    ENABLED.load(Ordering::Relaxed)
}

/// Hand every span a trace opens to `hook` as well (once per process; a second hook is
/// ignored). The OTLP exporter uses it to give its spans the request's trace id.
pub fn on_span(hook: SpanHook) {
    let _ = ON_SPAN.set(hook);
}

thread_local! {
    /// The thread's generator state (wyrand): seeded once per thread from the standard
    /// library's per-process random keys, then pure arithmetic.
    static RNG: Cell<u64> = Cell::new(seed());
}

fn seed() -> u64 {
    use std::hash::BuildHasher as _;
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64);
    std::collections::hash_map::RandomState::new().hash_one((nanos, std::thread::current().id()))
}

/// The next 64 random bits of this thread (wyrand: not for secrets, enough for ids).
fn next_u64() -> u64 {
    RNG.with(|s| {
        let x = s.get().wrapping_add(0xa076_1d64_78bd_642f);
        s.set(x);
        let t = u128::from(x) * u128::from(x ^ 0xe703_7ed1_a0b4_28db);
        ((t >> 64) as u64) ^ (t as u64)
    })
}

/// A new span id, never all zero (W3C forbids it).
pub fn new_span_id() -> SpanId {
    SpanId(next_u64().max(1).to_le_bytes())
}

fn new_trace_id() -> TraceId {
    let (a, b) = (next_u64(), next_u64().max(1));
    let mut id = [0u8; 16];
    id[..8].copy_from_slice(&a.to_le_bytes());
    id[8..].copy_from_slice(&b.to_le_bytes());
    TraceId(id)
}

/// Whether this process opens request spans: an exporter is on, or the log filter lets `debug`
/// through for `warren::trace`. While it does not, a request handled in this process has no use
/// for a trace context (no span, no log line would show it), and the gate starts none: only a
/// request that crosses the bus carries one, for the node at the other end.
pub fn spans_on() -> bool {
    ON_SPAN.get().is_some() || tracing::enabled!(target: "warren::trace", tracing::Level::DEBUG)
}

tokio::task_local! {
    /// The trace of the call a handler runs for ([`in_trace`]): what the calls the handler makes
    /// in turn ([`current_child`]) continue.
    static CURRENT: TraceContext;
}

/// Run a handler's future in `trace`, so the calls it makes to other modules (`Context::call`,
/// a plugin's `warren.call`) carry the same trace id to the nodes that run them.
pub(crate) fn in_trace<F: std::future::Future + Send + 'static>(
    trace: TraceContext,
    fut: F,
) -> impl std::future::Future<Output = F::Output> + Send + 'static {
    CURRENT.scope(trace, fut)
}

/// The trace of a call a handler makes: the handler's own trace continued by a new span, or,
/// outside a traced handler, a new trace (`None` while traces are off).
pub fn current_child() -> Option<TraceContext> {
    if !enabled() {
        return None;
    }
    CURRENT
        .try_with(|t| t.child(new_span_id()))
        .ok()
        .or_else(|| start(None))
}

/// The trace of a new client request, or `None` while traces are off: the client's own context
/// (`given`, its `traceparent`) continued by a new span of the gate, else a new sampled trace.
pub fn start(given: Option<TraceContext>) -> Option<TraceContext> {
    if !enabled() {
        return None;
    }
    Some(match given {
        Some(t) => t.child(new_span_id()),
        None => TraceContext {
            trace_id: new_trace_id(),
            span_id: new_span_id(),
            flags: SAMPLED,
        },
    })
}

fn hooked(span: tracing::Span, trace: &TraceContext) -> (tracing::Span, Option<SpanId>) {
    if let Some(hook) = ON_SPAN.get()
        && !span.is_disabled()
    {
        let id = hook(&span, trace);
        return (span, id);
    }
    (span, None)
}

/// The gate's span for one client request: route, session and trace id. Disabled (free) unless
/// the filter lets `debug` through for `warren::trace` (or an exporter is on). When an exporter
/// gave the span an id of its own, `trace` takes it: the calls this request makes name this span
/// as their parent.
pub fn request_span(
    trace: &mut TraceContext,
    module: &str,
    handler: &str,
    session: &str,
) -> tracing::Span {
    let (span, id) = hooked(
        tracing::debug_span!(
            "request",
            trace_id = %trace.trace_id,
            span_id = %trace.span_id,
            module,
            handler,
            session,
        ),
        trace,
    );
    if let Some(id) = id {
        trace.span_id = id;
    }
    span
}

/// The span of a call a node runs for a traced request: the same trace id as the gate's
/// request, a span id of its own. Disabled (free) unless the filter lets `debug` through for
/// `warren::trace` (or an exporter is on). Also answers the trace the handler's own calls
/// continue: the exporter's id for this span when it gave one, else the caller's context.
pub fn call_span(
    trace: &TraceContext,
    module: &str,
    handler: &str,
) -> (tracing::Span, TraceContext) {
    let (span, id) = hooked(
        tracing::debug_span!(
            "call",
            trace_id = %trace.trace_id,
            parent_span_id = %trace.span_id,
            module,
            handler,
        ),
        trace,
    );
    let mut inner = *trace;
    if let Some(id) = id {
        inner.span_id = id;
    }
    (span, inner)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_differ_and_a_given_trace_is_kept() {
        let a = start(None).expect("on by default");
        let b = start(None).expect("on by default");
        assert_ne!(a.trace_id, b.trace_id);
        assert_ne!(a.span_id, SpanId([0; 8]));
        assert!(a.sampled());
        let given = TraceContext::parse("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-00")
            .expect("the W3C example");
        let c = start(Some(given)).expect("on");
        assert_eq!((c.trace_id, c.flags), (given.trace_id, 0));
        assert_ne!(c.span_id, given.span_id);
    }

    #[tokio::test]
    async fn a_handlers_calls_continue_its_trace() {
        let outer = start(None).expect("on");
        let child = in_trace(outer, async { current_child() })
            .await
            .expect("on");
        assert_eq!(child.trace_id, outer.trace_id);
        assert_ne!(child.span_id, outer.span_id);
        // outside a handler, a call starts a trace of its own
        let fresh = current_child().expect("on");
        assert_ne!(fresh.trace_id, outer.trace_id);
    }
}

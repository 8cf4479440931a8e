//! The OTLP exporter (feature `otel`, `[log] otlp_endpoint`): the request spans of
//! `warren::trace` go to an OpenTelemetry collector over HTTP/protobuf, with `service.name` the
//! node id, keeping the trace id the request carries from node to node, so a collector shows
//! one trace per client request across the cluster (docs/configuration.md, "Traces and logs").

use opentelemetry::trace::{
    SpanContext, SpanId, TraceContextExt as _, TraceFlags, TraceId, TraceState, TracerProvider as _,
};
use opentelemetry_otlp::WithExportConfig as _;
use opentelemetry_sdk::trace::SdkTracerProvider;
use tracing_opentelemetry::OpenTelemetrySpanExt as _;
use tracing_subscriber::Layer;
use tracing_subscriber::filter::{LevelFilter, Targets};
use warren::trace::TraceContext;

/// The running exporter: flushed and stopped when the node stops.
#[derive(Clone)]
pub(crate) struct Exporter {
    provider: SdkTracerProvider,
}

impl Exporter {
    /// Send what is still buffered and stop.
    pub(crate) fn shutdown(&self) {
        if let Err(e) = self.provider.shutdown() {
            eprintln!("warning: the OTLP exporter did not flush: {e}");
        }
    }
}

/// The layer that turns the `warren::trace` spans into OpenTelemetry spans for the collector
/// at `endpoint` (its base URL; `/v1/traces` is added), whatever the log filter says.
pub(crate) fn layer<S>(endpoint: &str, node: &str) -> Result<(impl Layer<S>, Exporter), String>
where
    S: tracing::Subscriber + for<'a> tracing_subscriber::registry::LookupSpan<'a> + Send + Sync,
{
    let base = endpoint.trim_end_matches('/');
    let url = if base.ends_with("/v1/traces") {
        base.to_owned()
    } else {
        format!("{base}/v1/traces")
    };
    let exporter = opentelemetry_otlp::SpanExporter::builder()
        .with_http()
        .with_endpoint(url)
        .build()
        .map_err(|e| format!("[log] otlp_endpoint {endpoint:?}: {e}"))?;
    let resource = opentelemetry_sdk::Resource::builder()
        .with_service_name(node.to_owned())
        .build();
    let provider = SdkTracerProvider::builder()
        .with_batch_exporter(exporter)
        .with_resource(resource)
        .build();
    let tracer = provider.tracer("warren");
    warren::trace::on_span(set_parent);
    let layer = tracing_opentelemetry::layer()
        .with_tracer(tracer)
        .with_filter(Targets::new().with_target("warren::trace", LevelFilter::DEBUG));
    Ok((layer, Exporter { provider }))
}

/// Give a `warren::trace` span the request's trace id: its parent is the span the trace
/// context names (the client's, or the calling node's); answer the span's own id.
fn set_parent(span: &tracing::Span, trace: &TraceContext) -> Option<warren::trace::SpanId> {
    let parent = SpanContext::new(
        TraceId::from_bytes(trace.trace_id.0),
        SpanId::from_bytes(trace.span_id.0),
        TraceFlags::new(trace.flags),
        true,
        TraceState::default(),
    );
    let _ = span.set_parent(opentelemetry::Context::new().with_remote_span_context(parent));
    let own = span.context().span().span_context().span_id();
    (own != SpanId::INVALID).then(|| warren::trace::SpanId(own.to_bytes()))
}

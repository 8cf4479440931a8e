//! The process's log: one `tracing` subscriber writing to stderr as text or JSON lines
//! (`[log] format`, `--log-format`), its filter taken from `RUST_LOG` or `[log] filter`
//! (default `info`) and changeable while the node runs through [`LogControl`] (the admin API's
//! `PUT /admin/log`), so an operator can turn on `debug` for one module without a restart; with
//! the `otel` feature and `[log] otlp_endpoint`, the request spans also go to an OTLP collector
//! (docs/configuration.md, "Traces and logs"). A panic is logged as an error.

use std::sync::{Arc, Mutex};

use tracing_subscriber::layer::SubscriberExt as _;
use tracing_subscriber::util::SubscriberInitExt as _;
use tracing_subscriber::{EnvFilter, Layer as _, Registry, reload};
use warren::config::{LogConfig, LogFormat};

/// The running log's filter: read it and replace it. Cheap to clone; every clone acts on the
/// one subscriber [`init`] installed.
#[derive(Clone)]
pub(crate) struct LogControl {
    handle: reload::Handle<EnvFilter, Registry>,
    /// The directives the filter was built from, as given (an `EnvFilter` prints its own
    /// normalized form, which need not match what the operator wrote).
    current: Arc<Mutex<String>>,
    /// The OTLP exporter, flushed when the node stops.
    #[cfg(feature = "otel")]
    otel: Option<crate::otel::Exporter>,
}

impl LogControl {
    /// The filter in force, as it was given (`info`, `warn,warren::gate=debug`, …).
    pub(crate) fn filter(&self) -> String {
        self.current
            .lock()
            .map(|s| s.clone())
            .unwrap_or_else(|p| p.into_inner().clone())
    }

    /// Replace the filter with `directives` (`RUST_LOG` syntax). A filter that does not parse
    /// is refused with the parser's reason, and the old one stays.
    pub(crate) fn set_filter(&self, directives: &str) -> Result<(), String> {
        let filter = EnvFilter::builder()
            .parse(directives)
            .map_err(|e| format!("{directives:?} is not a log filter: {e}"))?;
        self.handle
            .reload(filter)
            .map_err(|e| format!("cannot change the log filter: {e}"))?;
        let mut current = self.current.lock().unwrap_or_else(|p| p.into_inner());
        *current = directives.to_owned();
        Ok(())
    }

    /// Send the spans still buffered to the OTLP collector (the node is stopping).
    pub(crate) fn flush(&self) {
        #[cfg(feature = "otel")]
        if let Some(e) = &self.otel {
            e.shutdown();
        }
    }
}

/// Install the process's subscriber for `[log]` (`format` replaced by `--log-format` when
/// given): stderr, text with colour only on a terminal or JSON lines, filtered by `RUST_LOG`
/// when it is set, not empty and parses, else by `[log] filter`; request traces on or off (`[log] trace`);
/// a panic is logged as an error. `node` names the service in exported spans.
///
/// Refused: a filter that does not parse, an `otlp_endpoint` in a binary built without the
/// `otel` feature, an exporter that cannot be built.
pub(crate) fn init(
    cfg: &LogConfig,
    format: Option<LogFormat>,
    node: &str,
) -> Result<LogControl, String> {
    let given = match std::env::var("RUST_LOG") {
        Ok(s) if !s.trim().is_empty() && EnvFilter::builder().parse(&s).is_ok() => s,
        _ => cfg.filter.clone(),
    };
    let filter = EnvFilter::builder()
        .parse(&given)
        .map_err(|e| format!("[log] filter {given:?} is not a log filter: {e}"))?;
    let (filter, handle) = reload::Layer::new(filter);
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let fmt = match format.unwrap_or(cfg.format) {
        LogFormat::Text => tracing_subscriber::fmt::layer()
            .with_writer(std::io::stderr)
            .with_ansi(ansi)
            .boxed(),
        LogFormat::Json => tracing_subscriber::fmt::layer()
            .json()
            .with_current_span(true)
            .with_span_list(true)
            .with_writer(std::io::stderr)
            .boxed(),
    }
    .with_filter(filter);
    #[cfg(not(feature = "otel"))]
    if cfg.otlp_endpoint.is_some() {
        let _ = node;
        return Err(
            "[log] otlp_endpoint needs a warren built with the otel feature \
                    (cargo build --features otel)"
                .into(),
        );
    }
    #[cfg(feature = "otel")]
    let (otel_layer, otel) = match &cfg.otlp_endpoint {
        Some(url) => {
            let (layer, exporter) = crate::otel::layer(url, node)?;
            (Some(layer), Some(exporter))
        }
        None => (None, None),
    };
    let registry = tracing_subscriber::registry().with(fmt);
    #[cfg(feature = "otel")]
    let registry = registry.with(otel_layer);
    // a second init in one process (tests) keeps the first subscriber
    let _ = registry.try_init();
    warren::trace::set_enabled(cfg.trace || cfg.otlp_endpoint.is_some());
    std::panic::set_hook(Box::new(|info| {
        tracing::error!(panic = %info, "panic");
    }));
    Ok(LogControl {
        handle,
        current: Arc::new(Mutex::new(given)),
        #[cfg(feature = "otel")]
        otel,
    })
}

/// `--log-format`: `text` or `json`.
pub(crate) fn parse_format(s: &str) -> Result<LogFormat, String> {
    match s {
        "text" => Ok(LogFormat::Text),
        "json" => Ok(LogFormat::Json),
        _ => Err(format!("{s:?}: the log format is text or json")),
    }
}

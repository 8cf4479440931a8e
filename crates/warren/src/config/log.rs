//! `[log]`: how the process logs (text or JSON lines on stderr, the filter), whether client
//! requests are traced across nodes (crate::trace), and where spans are exported over OTLP
//! (docs/configuration.md, "Traces and logs"). Plain data: the binary installs the subscriber.

use serde::{Deserialize, Serialize};

use super::Problems;

/// The shape of a log line on stderr.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// One human-readable line per event, the span fields before the message.
    #[default]
    Text,
    /// One JSON object per line (timestamp, level, target, fields, the spans with their
    /// fields), for a log collector.
    Json,
}

/// `[log]`: the process's log and request traces.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LogConfig {
    /// `text` or `json` (`--log-format` overrides).
    pub format: LogFormat,
    /// Which lines are written, in `RUST_LOG` syntax (`info`, `info,warren::trace=debug`);
    /// the environment's `RUST_LOG` overrides it, the admin API changes it at run time.
    pub filter: String,
    /// Give each client request a W3C trace id that travels with its calls to other nodes, so
    /// its log lines on every node carry the same `trace_id`. false: no trace context at all
    /// (the request path without it, for measuring what tracing costs).
    pub trace: bool,
    /// Send the request spans to this OTLP/HTTP collector (`http://127.0.0.1:4318`), with
    /// `service.name` the node id. Needs a binary built with the `otel` feature.
    pub otlp_endpoint: Option<String>,
}

impl Default for LogConfig {
    fn default() -> Self {
        LogConfig {
            format: LogFormat::Text,
            filter: "info".to_owned(),
            trace: true,
            otlp_endpoint: None,
        }
    }
}

impl LogConfig {
    pub(super) fn check(&self, p: &mut Problems) {
        if self.filter.trim().is_empty() {
            p.add(
                "log.filter",
                "must not be empty (\"info\" is the default, \"off\" writes nothing)",
            );
        }
        if let Some(url) = &self.otlp_endpoint
            && !(url.starts_with("http://") || url.starts_with("https://"))
        {
            p.add(
                "log.otlp_endpoint",
                format!("{url:?} is not an http:// or https:// URL (http://127.0.0.1:4318)"),
            );
        }
    }
}

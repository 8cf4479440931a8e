//! The process's log: one `tracing` subscriber writing to stderr, its filter taken from
//! `RUST_LOG` (default `info`) and changeable while the node runs through [`LogControl`] (the
//! admin API's `PUT /admin/log`, docs/operations.md), so an operator can turn on `debug` for one
//! module without a restart. A panic is logged as an error.

use std::sync::{Arc, Mutex};

use tracing_subscriber::layer::SubscriberExt as _;
use tracing_subscriber::util::SubscriberInitExt as _;
use tracing_subscriber::{EnvFilter, Registry, reload};

/// The running log's filter: read it and replace it. Cheap to clone; every clone acts on the
/// one subscriber [`init`] installed.
#[derive(Clone)]
pub(crate) struct LogControl {
    handle: reload::Handle<EnvFilter, Registry>,
    /// The directives the filter was built from, as given (an `EnvFilter` prints its own
    /// normalized form, which need not match what the operator wrote).
    current: Arc<Mutex<String>>,
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
}

/// Install the process's subscriber: logs to stderr, filtered by `RUST_LOG` (default `info`),
/// with colour only on a terminal; a panic is logged as an error.
pub(crate) fn init() -> LogControl {
    let given = std::env::var("RUST_LOG")
        .ok()
        .filter(|s| EnvFilter::builder().parse(s).is_ok())
        .unwrap_or_else(|| "info".to_owned());
    let filter = EnvFilter::builder()
        .parse(&given)
        .unwrap_or_else(|_| EnvFilter::new("info"));
    let (filter, handle) = reload::Layer::new(filter);
    let fmt = tracing_subscriber::fmt::layer()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()));
    // a second init in one process (tests) keeps the first subscriber
    let _ = tracing_subscriber::registry()
        .with(filter)
        .with(fmt)
        .try_init();
    std::panic::set_hook(Box::new(|info| {
        tracing::error!(panic = %info, "panic");
    }));
    LogControl {
        handle,
        current: Arc::new(Mutex::new(given)),
    }
}

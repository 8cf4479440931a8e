//! Requests by route: `warren_requests_total{route,result}` and
//! `warren_request_duration_seconds{route}` for every call a module of this node handles
//! (docs/metrics.md).
//!
//! The label set is bounded by construction: a route is `Module/Handler` for a handler the module
//! registered, and every other name a caller sends (a typo, a probe) is counted under
//! `route="other"`. The handles are resolved once, when the module is built, so counting a call
//! is a map lookup and three atomic operations, never a new label set.

use std::collections::HashMap;

use metrics::{Counter, Histogram};

use crate::error::CallError;

/// The result label of a call: it ended with a reply, with an error, or at its deadline.
const OK: &str = "ok";
/// See [`OK`].
const ERROR: &str = "error";
/// See [`OK`].
const TIMEOUT: &str = "timeout";

/// The route label of a handler name the module does not have.
pub(crate) const OTHER: &str = "other";

/// One route's handles.
#[derive(Clone)]
struct RouteHandles {
    ok: Counter,
    error: Counter,
    timeout: Counter,
    duration: Histogram,
}

impl RouteHandles {
    fn new(route: String) -> RouteHandles {
        let counter = |result: &'static str| metrics::counter!("warren_requests_total", "route" => route.clone(), "result" => result);
        RouteHandles {
            ok: counter(OK),
            error: counter(ERROR),
            timeout: counter(TIMEOUT),
            duration: metrics::histogram!("warren_request_duration_seconds", "route" => route.clone()),
        }
    }
}

/// The handles of every route of one module type, and of its `other` route.
pub(crate) struct RouteMetrics {
    routes: HashMap<Box<str>, RouteHandles, foldhash::fast::RandomState>,
    other: RouteHandles,
}

impl RouteMetrics {
    /// Resolve the handles of module `module`'s `handlers` (internal names starting with `$`,
    /// like the session-closed notice, are not requests and are left out).
    pub(crate) fn new<'a>(module: &str, handlers: impl Iterator<Item = &'a str>) -> RouteMetrics {
        let routes = handlers
            .filter(|h| !h.starts_with('$'))
            .map(|h| (Box::from(h), RouteHandles::new(format!("{module}/{h}"))))
            .collect();
        RouteMetrics {
            routes,
            other: RouteHandles::new(OTHER.to_owned()),
        }
    }

    /// Count one finished call of `handler` that took `seconds`.
    pub(crate) fn record(
        &self,
        handler: &str,
        seconds: f64,
        result: &Result<bytes::Bytes, CallError>,
    ) {
        if handler.starts_with('$') {
            return;
        }
        let h = self.routes.get(handler).unwrap_or(&self.other);
        h.duration.record(seconds);
        match result {
            Ok(_) => h.ok.increment(1),
            Err(CallError::Timeout) => h.timeout.increment(1),
            Err(_) => h.error.increment(1),
        }
    }

    /// The route label a call of `handler` is counted under (for tests and docs).
    #[cfg(test)]
    pub(crate) fn route_of(&self, handler: &str) -> Option<bool> {
        (!handler.starts_with('$')).then(|| self.routes.contains_key(handler))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_registered_handlers_are_routes_of_their_own() {
        let m = RouteMetrics::new("Chat", ["HD_Say", "$session_closed"].into_iter());
        assert_eq!(m.route_of("HD_Say"), Some(true));
        assert_eq!(m.route_of("HD_Whatever"), Some(false));
        assert_eq!(m.route_of("$session_closed"), None);
        // without a recorder the handles are no-ops: recording never fails
        m.record("HD_Say", 0.001, &Ok(bytes::Bytes::new()));
        m.record("nope", 0.001, &Err(CallError::Timeout));
    }
}

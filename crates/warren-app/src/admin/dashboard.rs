//! The dashboard (docs/operations.md, "The dashboard"): one page the admin listener serves at
//! `/` and `/dashboard`, so an operator with a browser sees the cluster's nodes, the live
//! connections, messages per second and request latency, and can find a session by uid and kick
//! it — with nothing to install and no network beyond the node. The page is static: its
//! script reads the same admin API and `/metrics` everyone else does, with the token the
//! operator types in (the API answers 401 without it). So the page and its files are served
//! without the token: they hold no data, only code. Everything is embedded in the binary; the
//! one chart library (uPlot, MIT) is vendored next to the page with its licence
//! (`dashboard/vendor/`).

use axum::Router;
use axum::extract::Path;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use serde_json::json;

/// One embedded file and the type it is served as.
#[derive(Debug, Clone, Copy)]
struct Asset {
    body: &'static [u8],
    content_type: &'static str,
}

const HTML: &str = "text/html; charset=utf-8";
const JS: &str = "text/javascript; charset=utf-8";
const CSS: &str = "text/css; charset=utf-8";
const TEXT: &str = "text/plain; charset=utf-8";

/// The page itself.
const INDEX: Asset = Asset {
    body: include_bytes!("dashboard/index.html"),
    content_type: HTML,
};

/// The files the page loads, under `/dashboard/`.
const FILES: &[(&str, Asset)] = &[
    (
        "dashboard.js",
        Asset {
            body: include_bytes!("dashboard/dashboard.js"),
            content_type: JS,
        },
    ),
    (
        "dashboard.css",
        Asset {
            body: include_bytes!("dashboard/dashboard.css"),
            content_type: CSS,
        },
    ),
    (
        "vendor/uPlot.iife.min.js",
        Asset {
            body: include_bytes!("dashboard/vendor/uPlot.iife.min.js"),
            content_type: JS,
        },
    ),
    (
        "vendor/uPlot.min.css",
        Asset {
            body: include_bytes!("dashboard/vendor/uPlot.min.css"),
            content_type: CSS,
        },
    ),
    (
        "vendor/uPlot.LICENSE",
        Asset {
            body: include_bytes!("dashboard/vendor/uPlot.LICENSE"),
            content_type: TEXT,
        },
    ),
];

/// What the browser may do on the page: load its own files and talk to its own origin, nothing
/// else (no inline script, no other host, no framing by another site's page — a Kick button in
/// a hidden frame is a click-jacking target).
const CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; \
                   connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'";

/// The page's routes, served without the token (see the module header); merged into the admin
/// API's router beside the routes that need it.
pub(super) fn routes() -> Router {
    Router::new()
        .route("/", get(index))
        .route("/dashboard", get(index))
        .route("/dashboard/", get(index))
        .route("/dashboard/{*path}", get(file))
}

async fn index() -> Response {
    serve(INDEX)
}

async fn file(Path(path): Path<String>) -> Response {
    match asset(&path) {
        Some(a) => serve(a),
        None => (
            StatusCode::NOT_FOUND,
            axum::Json(json!({ "error": { "code": "not_found", "message": "no such file of the dashboard" } })),
        )
            .into_response(),
    }
}

/// The file served at `/dashboard/<path>`, if any.
fn asset(path: &str) -> Option<Asset> {
    FILES.iter().find(|(p, _)| *p == path).map(|(_, a)| *a)
}

fn serve(a: Asset) -> Response {
    let mut r = a.body.into_response();
    let h = r.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static(a.content_type),
    );
    // the files change with the binary: a browser asks again after an upgrade
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    h.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    if a.content_type == HTML {
        h.insert(
            header::CONTENT_SECURITY_POLICY,
            HeaderValue::from_static(CSP),
        );
        h.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    }
    r
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every `/dashboard/…` file the page names is one the router serves.
    #[test]
    fn the_page_loads_only_files_that_are_served() {
        let page = std::str::from_utf8(INDEX.body).expect("the page is UTF-8");
        let mut named = 0;
        for part in page.split('"').filter(|p| p.starts_with("/dashboard/")) {
            let path = part.trim_start_matches("/dashboard/");
            assert!(asset(path).is_some(), "{part} is not served");
            named += 1;
        }
        assert_eq!(
            named, 4,
            "the page loads its script, its style and uPlot's two files"
        );
        assert!(asset("vendor/uPlot.LICENSE").is_some());
        assert!(asset("../mod.rs").is_none());
        assert!(
            !page.contains("http://") && !page.contains("https://"),
            "no other host"
        );
    }
}

//! The chat page, embedded in the binary: `index.html` at `/` and `/mqant/index.html`, the rest
//! under `/static/`. The page learns the WebSocket address from `/config.json`, which the binary
//! serves from its listener list.

/// One embedded file.
#[derive(Debug, Clone, Copy)]
pub struct Asset {
    /// File contents.
    pub body: &'static [u8],
    /// `Content-Type` to serve it with.
    pub content_type: &'static str,
}

/// The page itself.
pub const INDEX: Asset = Asset {
    body: include_bytes!("../web/index.html"),
    content_type: "text/html; charset=utf-8",
};

const FILES: &[(&str, Asset)] = &[
    (
        "app.js",
        Asset {
            body: include_bytes!("../web/app.js"),
            content_type: "text/javascript; charset=utf-8",
        },
    ),
    (
        "style.css",
        Asset {
            body: include_bytes!("../web/style.css"),
            content_type: "text/css; charset=utf-8",
        },
    ),
    (
        "vendor/mqtt.min.js",
        Asset {
            body: include_bytes!("../web/vendor/mqtt.min.js"),
            content_type: "text/javascript; charset=utf-8",
        },
    ),
    (
        "vendor/mqtt.LICENSE",
        Asset {
            body: include_bytes!("../web/vendor/mqtt.LICENSE"),
            content_type: "text/plain; charset=utf-8",
        },
    ),
];

/// The asset served at `/static/<path>`, if any.
pub fn asset(path: &str) -> Option<Asset> {
    FILES.iter().find(|(p, _)| *p == path).map(|(_, a)| *a)
}

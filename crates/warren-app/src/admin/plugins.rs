//! `/admin/plugins` and `/admin/modules/{type}/handlers/{handler}`: list the plugins this node
//! loaded, reload one, replace one handler of a Lua or Python module (docs/plugins.md,
//! "Hotfix over the admin API"). This node only.

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::{Extension, Json};
use serde_json::{Value, json};
use warren::node::NodeHandle;
use warren_plugin::{Plugin, PluginErrorKind};

use super::{AdminError, AdminState, Caller, MAX_BODY, rfc3339};
use crate::plugins::{PluginEntry, PluginRole};

/// `GET /admin/plugins`: every plugin this node loaded.
pub(super) async fn list_plugins(State(s): State<AdminState>) -> Json<Value> {
    let plugins: Vec<Value> = s.plugins.list().iter().map(|e| describe(e)).collect();
    Json(json!({ "node": s.node.id(), "plugins": plugins }))
}

/// Where the instances of module type `module` run, as the registry last reported the cluster:
/// whether one runs on this node, and `{"node","instance"}` for each on another node.
fn placement(node: &NodeHandle, module: &str) -> (bool, Vec<Value>) {
    let me = node.id();
    let mut here = false;
    let mut elsewhere = Vec::new();
    for record in node.nodes().iter() {
        for i in record.instances.iter().filter(|i| i.module == module) {
            if record.id == me {
                here = true;
            } else {
                elsewhere.push(json!({ "node": record.id, "instance": i.id }));
            }
        }
    }
    (here, elsewhere)
}

/// A plugin as the API shows it.
fn describe(e: &PluginEntry) -> Value {
    let (module, listener) = match e.role() {
        PluginRole::Module(m) => (Some(m.as_str()), None),
        PluginRole::Listener(a) => (None, Some(a.as_str())),
    };
    json!({
        "name": e.name(),
        "role": e.role().as_str(),
        "module": module,
        "listener": listener,
        "kind": e.kind().as_str(),
        "path": e.path().display().to_string(),
        "version": e.version(),
        "loaded_at": rfc3339(e.loaded_at()),
        "patched": e.patched(),
        "last_error": e.last_error().map(|f| json!({
            "message": f.message,
            "line": f.line,
            "at": rfc3339(f.at),
        })),
    })
}

/// `POST /admin/plugins/{name}/reload`: load the file again; on error the running version
/// stays and the reply says why.
pub(super) async fn reload_plugin(
    State(s): State<AdminState>,
    Extension(caller): Extension<Caller>,
    Path(name): Path<String>,
) -> Result<Json<Value>, AdminError> {
    let entry = s.plugins.get(&name).ok_or_else(|| {
        AdminError::new(
            StatusCode::NOT_FOUND,
            "no_such_plugin",
            format!("no plugin {name:?} (GET /admin/plugins lists them)"),
        )
    })?;
    let before = entry.version();
    match entry.reload().await {
        Ok(version) => {
            tracing::info!(peer = %caller.peer, token = caller.token, plugin = %name, path = %entry.path().display(), from = before, version, "admin: plugin reloaded");
            Ok(Json(
                json!({ "name": name, "version": version, "previous": before, "node": s.node.id() }),
            ))
        }
        Err(e) => {
            tracing::warn!(peer = %caller.peer, token = caller.token, plugin = %name, path = %entry.path().display(), version = before, error = %e, "admin: plugin reload failed; the running version stays");
            Err(AdminError::plugin("reload_failed", &e).running(before))
        }
    }
}

/// `PUT /admin/modules/{module}/handlers/{handler}`: replace one handler of a Lua or Python
/// module, on every instance of it this node runs, with the request body (the function's
/// source). This node only: the answer names it and lists the instances on other nodes, which
/// keep their handler (an admin API never acts for another node: no bus topic may run code).
pub(super) async fn replace_handler(
    State(s): State<AdminState>,
    Extension(caller): Extension<Caller>,
    Path((module, handler)): Path<(String, String)>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Json<Value>, AdminError> {
    let body = body.map_err(|r| {
        if r.status() == StatusCode::PAYLOAD_TOO_LARGE {
            AdminError::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                "too_large",
                format!("a handler's source is at most {MAX_BODY} bytes"),
            )
        } else {
            AdminError::new(StatusCode::BAD_REQUEST, "bad_request", r.body_text())
        }
    })?;
    let source = std::str::from_utf8(&body)
        .ok()
        .filter(|s| !s.trim().is_empty())
        .ok_or_else(|| {
            AdminError::new(
                StatusCode::BAD_REQUEST,
                "bad_request",
                "the body is the handler's source: UTF-8 text, not empty",
            )
        })?;
    let entries = s.plugins.modules_of(&module);
    let (here, elsewhere) = placement(&s.node, &module);
    if entries.is_empty() {
        return Err(if !here && !elsewhere.is_empty() {
            let nodes: Vec<&str> = elsewhere
                .iter()
                .filter_map(|e| e["node"].as_str())
                .collect();
            AdminError::new(
                StatusCode::CONFLICT,
                "not_on_this_node",
                format!(
                    "module {module} does not run on this node ({}) but on {}: send the patch to \
                     the admin API of each node that runs it",
                    s.node.id(),
                    nodes.join(", ")
                ),
            )
        } else if s.node.router().has_module(&module) {
            AdminError::new(
                StatusCode::CONFLICT,
                "not_a_plugin",
                format!(
                    "module {module} is not a plugin module of this node (a Rust module): only Lua \
                     and Python modules can have a handler replaced"
                ),
            )
        } else {
            AdminError::new(
                StatusCode::NOT_FOUND,
                "no_such_module",
                format!("no module {module:?}"),
            )
        });
    }
    let mut instances = Vec::with_capacity(entries.len());
    for entry in &entries {
        let Some(plugin) = entry.module() else {
            continue;
        };
        if let Err(e) = plugin.replace_handler(&handler, source).await {
            tracing::warn!(peer = %caller.peer, token = caller.token, module = %module, plugin = %entry.name(), handler = %handler, bytes = source.len(), error = %e, "admin: handler not replaced; the running one stays");
            let code = if e.kind() == PluginErrorKind::NoHandler {
                "no_such_handler"
            } else {
                "patch_failed"
            };
            return Err(AdminError::plugin(code, &e));
        }
        tracing::info!(peer = %caller.peer, token = caller.token, module = %module, plugin = %entry.name(), path = %entry.path().display(), version = entry.version(), handler = %handler, bytes = source.len(), "admin: handler replaced");
        instances.push(json!({
            "name": entry.name(),
            "version": entry.version(),
            "patched": entry.patched(),
        }));
    }
    Ok(Json(json!({
        "module": module,
        "handler": handler,
        "instances": instances,
        "node": s.node.id(),
        "elsewhere": elsewhere,
    })))
}

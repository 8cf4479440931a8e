//! `GET /admin/nodes` (docs/admin-api.md): the nodes of the cluster as the registry lists them,
//! with their modules and version, and the live session count each gate node reports. A node
//! that runs no gate (module-only) is listed with `"sessions": null`; a gate node that does not
//! answer in time keeps `null` and is named in `"unreachable"`.

use axum::Json;
use axum::extract::State;
use serde_json::{Value, json};
use warren::node::admin::{self as gate, NodeInfo};

use super::AdminState;
use super::cluster;

/// `GET /admin/nodes`.
pub(super) async fn list(State(s): State<AdminState>) -> Json<Value> {
    let me = s.node.id().to_owned();
    let targets = cluster::gate_nodes(&s.node);
    let answers = cluster::ask(&s.node, &targets, "AdminInfo", &Value::Null, gate::info).await;
    let sessions = |id: &str| -> Option<usize> {
        answers
            .ok
            .iter()
            .find(|(n, _): &&(String, NodeInfo)| n == id)
            .map(|(_, i)| i.sessions)
    };
    let mut records: Vec<_> = s.node.nodes().iter().cloned().collect();
    records.sort_by(|a, b| a.id.cmp(&b.id));
    let mut nodes: Vec<Value> = records
        .iter()
        .map(|r| {
            json!({
                "id": r.id,
                "self": r.id == me,
                "addr": r.address,
                "version": Some(r.version.as_str()).filter(|v| !v.is_empty()),
                "modules": r.instances.iter().map(|i| json!({ "type": i.module, "id": i.id })).collect::<Vec<_>>(),
                "sessions": sessions(&r.id),
            })
        })
        .collect();
    if !records.iter().any(|r| r.id == me) {
        // the registry has not listed this node yet: its gate is all it can vouch for
        let modules = vec![json!({ "type": "Gate", "id": &**s.node.session_table().gate_id() })];
        nodes.push(json!({
            "id": me,
            "self": true,
            "addr": null,
            "version": env!("CARGO_PKG_VERSION"),
            "modules": modules,
            "sessions": sessions(&me),
        }));
    }
    Json(json!({ "node": me, "nodes": nodes, "unreachable": answers.unreachable }))
}

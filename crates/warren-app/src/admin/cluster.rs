//! Asking every node of the cluster: the admin API answers for the whole cluster by sending one
//! question to the `Gate` module of each node the registry lists (`NodeHandle::nodes()`), in
//! parallel with a deadline of [`DEADLINE`]; this node's own gate is answered directly. A node
//! that does not answer in time (or answers nonsense) is named in the answer's `"unreachable"`
//! instead of failing the whole request.

use std::time::Duration;

use axum::body::Bytes;
use serde::Serialize;
use serde::de::DeserializeOwned;
use tokio::task::JoinSet;
use warren::node::NodeHandle;

/// How long another node has to answer.
pub(super) const DEADLINE: Duration = Duration::from_secs(2);

/// The module type every gate node runs, whose `Admin…` handlers answer.
const GATE: &str = "Gate";

/// A node to ask: its id and its gate's instance id.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct GateNode {
    pub(super) node: String,
    pub(super) gate: String,
}

/// Every node that runs a gate, sorted by node id, this node included even before the registry
/// lists it.
pub(super) fn gate_nodes(node: &NodeHandle) -> Vec<GateNode> {
    let me = node.id();
    let mut out: Vec<GateNode> = node
        .nodes()
        .iter()
        .filter_map(|r| {
            let gate = r.instances.iter().find(|i| i.module == GATE)?;
            Some(GateNode {
                node: r.id.clone(),
                gate: gate.id.clone(),
            })
        })
        .collect();
    if !out.iter().any(|g| g.node == me) {
        out.push(GateNode {
            node: me.to_owned(),
            gate: node.session_table().gate_id().to_string(),
        });
    }
    out.sort_by(|a, b| a.node.cmp(&b.node));
    out.dedup_by(|a, b| a.node == b.node);
    out
}

/// What the nodes said: the answers by node id (sorted), and who did not answer.
#[derive(Debug)]
pub(super) struct Answers<T> {
    pub(super) ok: Vec<(String, T)>,
    pub(super) unreachable: Vec<String>,
}

/// Ask `handler` of every gate in `targets` with `question` (JSON): the local gate through
/// `local`, the others over the bus, all at once, each within [`DEADLINE`].
pub(super) async fn ask<Q, T>(
    node: &NodeHandle,
    targets: &[GateNode],
    handler: &'static str,
    question: &Q,
    local: impl FnOnce(&NodeHandle) -> T,
) -> Answers<T>
where
    Q: Serialize,
    T: DeserializeOwned + Send + 'static,
{
    let body = match serde_json::to_vec(question) {
        Ok(b) => Bytes::from(b),
        Err(e) => {
            // a question is a plain struct: this does not happen; say so rather than panic
            tracing::error!(error = %e, handler, "admin: question not encoded");
            return Answers {
                ok: Vec::new(),
                unreachable: targets.iter().map(|t| t.node.clone()).collect(),
            };
        }
    };
    let mut ok = Vec::with_capacity(targets.len());
    let mut unreachable = Vec::new();
    let mut calls = JoinSet::new();
    let mut local = Some(local);
    for t in targets {
        if t.node == node.id() {
            if let Some(f) = local.take() {
                ok.push((t.node.clone(), f(node)));
            }
            continue;
        }
        let (n, target, body) = (node.clone(), t.clone(), body.clone());
        calls.spawn(async move {
            let module = format!("{GATE}@{}", target.gate);
            let reply = tokio::time::timeout(
                DEADLINE + Duration::from_millis(100),
                n.call(&module, handler, None, body, Some(DEADLINE)),
            )
            .await;
            let answer = match reply {
                Ok(Ok(bytes)) => serde_json::from_slice::<T>(&bytes).map_err(|e| e.to_string()),
                Ok(Err(e)) => Err(e.to_string()),
                Err(_) => Err("no answer within the deadline".to_owned()),
            };
            (target.node, answer)
        });
    }
    while let Some(done) = calls.join_next().await {
        match done {
            Ok((id, Ok(answer))) => ok.push((id, answer)),
            Ok((id, Err(why))) => {
                tracing::warn!(node = %id, handler, reason = %why, "admin: a node did not answer");
                unreachable.push(id);
            }
            Err(e) => tracing::error!(error = %e, handler, "admin: a question to a node failed"),
        }
    }
    ok.sort_by(|a, b| a.0.cmp(&b.0));
    unreachable.sort();
    Answers { ok, unreachable }
}

//! Cluster changes as hooks see them: nodes and instances that came and went between two
//! registry views.

use super::*;

/// A change in the cluster, as hooks see it.
#[derive(Debug, Clone)]
pub enum ClusterEvent {
    /// A node appeared in the registry.
    Joined(NodeRecord),
    /// A node left (deregistered, or stopped refreshing its record).
    Left(NodeRecord),
    /// A live node's record changed (modules, tags, address).
    Changed(NodeRecord),
}

/// A function told about every [`ClusterEvent`].
pub type ClusterHook = Arc<dyn Fn(&ClusterEvent) + Send + Sync>;

pub(crate) fn cluster_events(old: &[NodeRecord], new: &[NodeRecord]) -> Vec<ClusterEvent> {
    let before: HashMap<&str, &NodeRecord> = old.iter().map(|n| (n.id.as_str(), n)).collect();
    let after: HashMap<&str, &NodeRecord> = new.iter().map(|n| (n.id.as_str(), n)).collect();
    let mut ev = Vec::new();
    for n in new {
        match before.get(n.id.as_str()) {
            None => ev.push(ClusterEvent::Joined(n.clone())),
            Some(o) if *o != n => ev.push(ClusterEvent::Changed(n.clone())),
            Some(_) => {}
        }
    }
    for o in old {
        if !after.contains_key(o.id.as_str()) {
            ev.push(ClusterEvent::Left(o.clone()));
        }
    }
    ev
}

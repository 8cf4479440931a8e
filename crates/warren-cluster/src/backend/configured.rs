//! The `[[backend]]` groups of a node's config, started as they are: each table a
//! [`Backends`] of its codec, fed its static service list through the same
//! [`Backends::update`] call that registry discovery uses.

use std::time::Duration;

use warren::config::{BackendCodec, BackendConfig, BackendServiceConfig};

use super::{BackendOptions, Backends, GobaseTestCodec, NoHooks, ServiceConf};

/// A config-built group: the gobase test codec, no hooks beyond the connection log.
pub type ConfiguredGroup = Backends<GobaseTestCodec, NoHooks>;

/// The running `[[backend]]` groups of a node.
#[derive(Default)]
pub struct ConfiguredBackends {
    groups: Vec<(String, ConfiguredGroup)>,
}

impl ConfiguredBackends {
    /// Start every `[[backend]]` table's group (the config was validated): services are dialled
    /// in the background, connects and disconnects logged. Must be called within a tokio
    /// runtime.
    pub fn start(configs: &[BackendConfig]) -> Self {
        let groups = configs
            .iter()
            .map(|c| {
                let codec = match c.codec {
                    BackendCodec::GobaseTest => GobaseTestCodec::new(c.max_body),
                };
                let b = Backends::new(codec, NoHooks, options(c));
                let group = c.group_name();
                b.update(&group, services(c));
                (group, b)
            })
            .collect();
        ConfiguredBackends { groups }
    }

    /// The group of this name (lowercased and trimmed), if a `[[backend]]` table made it.
    pub fn get(&self, group: &str) -> Option<&ConfiguredGroup> {
        let group = warren::ring::normalize(group);
        self.groups
            .iter()
            .find(|(g, _)| *g == group)
            .map(|(_, b)| b)
    }

    /// Whether the config has no `[[backend]]` table.
    pub fn is_empty(&self) -> bool {
        self.groups.is_empty()
    }

    /// Close every service of every group and wait for them.
    pub async fn shutdown(&self) {
        for (_, b) in &self.groups {
            b.shutdown().await;
        }
    }
}

/// A table's options.
pub fn options(c: &BackendConfig) -> BackendOptions {
    BackendOptions {
        dial_timeout: Duration::from_secs(c.dial_timeout_s),
        msg_seq: c.msg_seq,
        immediately: c.immediately,
        queue_bytes: c.queue_bytes,
        ..BackendOptions::default()
    }
}

/// A table's static service list, each record in its group (an empty `servicename` is the
/// table's `group`).
pub fn services(c: &BackendConfig) -> Vec<ServiceConf> {
    c.services.iter().map(|s| service(c, s)).collect()
}

fn service(c: &BackendConfig, s: &BackendServiceConfig) -> ServiceConf {
    let name = if s.servicename.trim().is_empty() {
        c.group.clone()
    } else {
        s.servicename.clone()
    };
    ServiceConf::new(name, &s.serviceid, &s.serviceaddr, s.serviceport).with_tag(&s.routertag)
}

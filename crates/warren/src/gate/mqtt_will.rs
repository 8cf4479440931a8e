//! Will messages of default-mode MQTT (MQTT 3.1.1 sections 3.1.2.5 to 3.1.2.7;
//! docs/protocols/mqtt.md, "MQTT 3.1.1 conformance").
//!
//! The CONNECT's will is checked when the client connects: a topic the client may not publish
//! to (the ACL file, its token's topics, `$SYS`, the `[limits]` on topics) refuses the
//! connection with CONNACK 5, so the client learns at once that its will would never be
//! published (mosquitto 2.0.11 accepts it and drops the will silently at the end). The accepted will stays in the connection's
//! MQTT state and is published, through the same path as a client's PUBLISH (subscribers,
//! retained when its retain flag is set), when the connection ends for any reason but a
//! DISCONNECT: keepalive timeout, socket error or EOF, protocol error, a close by the server,
//! takeover by the same client id. A DISCONNECT discards it.

use std::net::SocketAddr;

use bytes::Bytes;
use warren_proto::mqtt::LastWill;

use super::{Gate, Identity, mqtt_broker};
use crate::acl::ClientAcl;

/// A connection's will, published if it ends without DISCONNECT.
#[derive(Debug)]
pub(super) struct Will {
    topic: Bytes,
    payload: Bytes,
    qos: u8,
    retain: bool,
}

/// Accept the will of a CONNECT for `client_id` of `identity` (else the CONNECT's `username`),
/// or say why not as a refusal kind and reason (the caller answers CONNACK 5).
pub(super) fn accept(
    gate: &Gate,
    will: LastWill,
    identity: Option<&Identity>,
    username: Option<&str>,
    client_id: &str,
) -> Result<Box<Will>, (&'static str, String)> {
    let topic = will.topic.as_str();
    let user = identity.map(|i| i.uid.as_str()).or(username);
    let who = || {
        format!(
            "will topic {:?} of client {:?} user {:?}",
            mqtt_broker::preview(topic),
            mqtt_broker::preview(client_id),
            user.unwrap_or("")
        )
    };
    let limits = &gate.limits;
    if topic.len() > limits.max_topic_len
        || topic.bytes().filter(|b| *b == b'/').count() + 1 > limits.max_topic_levels
    {
        let why = format!(
            "{}: over limits.max_topic_len ({}) or limits.max_topic_levels ({})",
            who(),
            limits.max_topic_len,
            limits.max_topic_levels
        );
        return Err(("will_topic_limits", why));
    }
    if mqtt_broker::is_sys(topic) {
        return Err((
            "sys_topic",
            format!("{}: clients may not publish to $SYS", who()),
        ));
    }
    if let Some(acl) = gate.acl.load().as_ref()
        && !acl.for_client(user, client_id).may_publish(topic)
    {
        return Err(("acl", format!("{}: no ACL write rule covers it", who())));
    }
    if let Some(topics) = identity.and_then(|i| i.topics.as_deref())
        && !ClientAcl::only(topics).may_publish(topic)
    {
        return Err((
            "token_topics",
            format!("{}: not among the token's topics", who()),
        ));
    }
    Ok(Box::new(Will {
        topic: Bytes::from(will.topic),
        payload: will.message,
        qos: will.qos.as_u8(),
        retain: will.retain,
    }))
}

impl Will {
    /// Publish the will: to subscribers, and retained when its retain flag is set.
    pub(super) fn publish(self, gate: &Gate, peer: &SocketAddr) {
        let Will {
            topic,
            payload,
            qos,
            retain,
        } = self;
        let Ok(name) = std::str::from_utf8(&topic) else {
            return;
        };
        let n = gate
            .broker
            .publish(&*gate.node, peer, name, topic.clone(), qos, payload, retain);
        metrics::counter!("warren_mqtt_wills_published_total").increment(1);
        tracing::debug!(%peer, topic = name, subscribers = n, "will published");
    }
}

//! How a module plugin reaches the node's `[[backend]]` groups (docs/backends.md, docs/plugins.md
//! "Backend groups"): `warren.backend_send`, `warren.backend_send_to` and `warren.backend_call`
//! go through a [`BackendCaller`] the binary hands over with [`ModulePlugin::set_backends`]
//! once its groups run; the messages those groups receive that answer no call come back through
//! [`ModulePlugin::backend_msg`] to the script's `on_backend_msg(group, service, msgid, body)`.
//!
//! This crate does not depend on the cluster crate, where the groups live: the trait keeps them
//! apart, as [`RedisRpcCaller`](crate::RedisRpcCaller) does for the Redis-RPC peers.
//!
//! [`ModulePlugin::set_backends`]: crate::ModulePlugin::set_backends
//! [`ModulePlugin::backend_msg`]: crate::ModulePlugin::backend_msg

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures_util::future::BoxFuture;
use parking_lot::RwLock;
use warren::CallError;

/// Which service of a group a message goes to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BackendTarget {
    /// The connected service that owns this key on the group's ring (the key as given).
    Hash(String),
    /// The service of this id.
    Service(String),
}

impl BackendTarget {
    /// What a script's `key` argument names: a service id (`backend_send_to`,
    /// `backend_call_to`) or a key whose owner on the ring is meant.
    pub(crate) fn of(by_id: bool, key: String) -> BackendTarget {
        if by_id {
            BackendTarget::Service(key)
        } else {
            BackendTarget::Hash(key)
        }
    }
}

/// A call to a backend service: the request frame and the frame that answers it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BackendRequest {
    /// The group (a `[[backend]]` table's `group`).
    pub group: String,
    /// Which of its services.
    pub target: BackendTarget,
    /// The request frame's msgid.
    pub msgid: u32,
    /// The msgid of the frame that answers it: the call's rpc id, so two calls waiting for the
    /// same answer msgid on one service end the second with `rpcId exist`.
    pub answer_msgid: u32,
    /// The request frame's body.
    pub body: Bytes,
    /// How long to wait for the answer.
    pub timeout: Duration,
}

/// A request to an HTTP backend group (`kind = "http"`): the healthy service that owns `key` on
/// the group's ring (or on the ring of a routing tag) gets `method path` with `body`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HttpRequest {
    /// The group (a `[[backend]]` table's `group`, `kind = "http"`).
    pub group: String,
    /// The key whose owner on the ring answers.
    pub key: String,
    /// A routing tag: the key's owner among the services of this tag.
    pub tag: Option<String>,
    /// `GET`, `POST`, ...
    pub method: String,
    /// The path (and query) on the service, `/scores?top=10`.
    pub path: String,
    /// The request body; empty: none.
    pub body: Bytes,
    /// How long the whole exchange may take.
    pub timeout: Duration,
}

/// What an HTTP backend answered: any status is an answer (the script decides what a 404
/// means); a request that got no answer is an error instead.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HttpAnswer {
    /// The status code.
    pub status: u16,
    /// The body, at most [`MAX_HTTP_ANSWER`] bytes.
    pub body: Bytes,
}

/// The largest HTTP answer a script is handed; a longer one is an error, read no further.
pub const MAX_HTTP_ANSWER: usize = 8 * 1024 * 1024;

impl BackendRequest {
    /// A script's call as it gives it: the answer msgid defaults to the request's plus one,
    /// the timeout (seconds) to `fallback` (the node's call timeout).
    pub(crate) fn from_script(
        group: String,
        target: BackendTarget,
        msgid: u32,
        body: Bytes,
        timeout: Option<f64>,
        answer_msgid: Option<u32>,
        fallback: Duration,
    ) -> BackendRequest {
        BackendRequest {
            group,
            target,
            msgid,
            answer_msgid: answer_msgid.unwrap_or(default_answer(msgid)),
            body,
            timeout: timeout_of(timeout, fallback),
        }
    }
}

/// The node's `[[backend]]` groups as module plugins use them. The binary implements it over
/// its running groups; errors carry the words of the gobase backend package (`no service`,
/// `not connected`, `queue full`, `close`, `rpcId exist`) or are a [`CallError::Timeout`].
pub trait BackendCaller: Send + Sync {
    /// Queue a frame (`msgid`, `body`) for a service of `group`, without waiting for an answer.
    fn send(
        &self,
        group: &str,
        target: &BackendTarget,
        msgid: u32,
        body: Bytes,
    ) -> Result<(), CallError>;
    /// Send the request and wait for its answer; the answer frame's body.
    fn call(&self, request: BackendRequest) -> BoxFuture<'static, Result<Bytes, CallError>>;
    /// Send an HTTP request to a service of an HTTP group and wait for its answer. Without HTTP
    /// groups: `no service`.
    fn http(&self, request: HttpRequest) -> BoxFuture<'static, Result<HttpAnswer, CallError>> {
        let _ = request;
        Box::pin(async { Err(CallError::App("no service".into())) })
    }
}

/// Where a module plugin's `warren.backend_*` calls go: empty until the node's groups run.
pub(crate) type BackendSlot = RwLock<Option<Arc<dyn BackendCaller>>>;

/// The groups of a slot, or the error a script gets when the node has none.
pub(crate) fn caller(slot: &BackendSlot) -> Result<Arc<dyn BackendCaller>, CallError> {
    slot.read().clone().ok_or_else(|| {
        CallError::Unavailable(
            "no backend groups: backend_send and backend_call need a [[backend]] table in the config"
                .into(),
        )
    })
}

/// The answer msgid a call waits for when the script names none: the request's plus one (the
/// gobase sample's heartbeat, 1 → 2).
pub(crate) fn default_answer(msgid: u32) -> u32 {
    msgid.wrapping_add(1)
}

/// A script's timeout in seconds, or `fallback` when it gives none (or one that is not a
/// duration).
pub(crate) fn timeout_of(seconds: Option<f64>, fallback: Duration) -> Duration {
    seconds
        .and_then(|s| Duration::try_from_secs_f64(s).ok())
        .unwrap_or(fallback)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_call_waits_for_the_next_msgid_unless_told() {
        assert_eq!(default_answer(1), 2);
        assert_eq!(default_answer(u32::MAX), 0);
    }

    #[test]
    fn a_bad_timeout_falls_back() {
        let d = Duration::from_secs(5);
        assert_eq!(timeout_of(None, d), d);
        assert_eq!(timeout_of(Some(-1.0), d), d);
        assert_eq!(timeout_of(Some(0.5), d), Duration::from_millis(500));
    }

    #[test]
    fn no_groups_is_unavailable() {
        let slot: BackendSlot = RwLock::new(None);
        let e = caller(&slot)
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(e.contains("[[backend]]"), "{e}");
    }
}

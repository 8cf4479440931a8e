//! The gate proxy (`[[proxy]]`, docs/backends.md "The gate proxy"): a module route whose
//! handlers are served by a TCP backend group, so a game server that already exists sits behind
//! warren's gate without module code.
//!
//! A proxy is a module of its own: the gate routes `Game/HD_Move[/msgid]` to it as to any
//! module, with per-session order, deadlines and the login rule. Its handler wraps the client's
//! body in the envelope of `warren_proto::proxy_envelope` (request number, session id, uid),
//! sends it in a gobase test frame with the handler's msgid to the service that owns the
//! session's hash key (the uid once bound, the session id before) on the group's ring, and waits
//! for the frame answering that request number; the answer's payload is the reply. A frame with
//! request number 0 is a push: its payload goes to the named session on the named topic.
//!
//! One connection per service carries every session (the envelope names them), rather than a
//! connection per session: a backend already serves many players on one socket in the gobase
//! model, and a game with 100 000 players would otherwise hold 100 000 sockets to its servers.
//!
//! The proxied groups run here with hooks of their own (answers by request number, pushes to
//! sessions), not among the plain `[[backend]]` groups: [`Proxies::proxied_groups`] names them
//! so the node starts the others as usual.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use bytes::Bytes;
use tokio_util::sync::CancellationToken;
use warren::config::{BackendConfig, ProxyConfig};
use warren::error::Detail;
use warren::session::SessionTable;
use warren::{CallError, Context, Module, Session};
use warren_proto::backend_frame::{HEARTBEAT_RESP_BODY, HEARTBEAT_RESP_ID};
use warren_proto::proxy_envelope::Envelope;

use crate::backend::{
    BackendError, BackendOptions, Backends, GobaseTestCodec, Hooks, RpcId, Service, TestMsg,
};

/// A proxied group: its services and the hooks that route their frames.
pub type ProxyGroup = Backends<GobaseTestCodec, ProxyHooks>;

/// How a proxied group's frames reach sessions: answers complete the waiting request of their
/// number; pushes go to the session they name, on this node's gate.
#[derive(Default)]
pub struct ProxyHooks {
    /// This node's sessions, once the node runs ([`Proxies::attach`]).
    sessions: OnceLock<Arc<SessionTable>>,
    /// The last request number handed out (skips 0, which means a push).
    seq: AtomicU32,
}

impl ProxyHooks {
    fn next_seq(&self) -> u32 {
        loop {
            let s = self.seq.fetch_add(1, Ordering::Relaxed).wrapping_add(1);
            if s != 0 {
                return s;
            }
        }
    }
}

fn is_heartbeat_answer(msg: &TestMsg) -> bool {
    msg.msgid == HEARTBEAT_RESP_ID && msg.body == HEARTBEAT_RESP_BODY
}

fn bad_frame(svc: &Service<GobaseTestCodec>, msgid: u32, why: &dyn std::fmt::Display) {
    metrics::counter!("warren_proxy_bad_frames_total", "group" => svc.name().to_owned())
        .increment(1);
    tracing::warn!(group = %svc.name(), service = %svc.id(), peer = %svc.peer(), msgid, reason = %why, "proxy: frame from backend dropped");
}

impl Hooks<GobaseTestCodec> for ProxyHooks {
    fn check_rpc_resp(&self, msg: &TestMsg) -> Option<RpcId> {
        if is_heartbeat_answer(msg) {
            return None;
        }
        match Envelope::peek_seq(&msg.body) {
            Ok(0) | Err(_) => None,
            Ok(seq) => Some(RpcId::from(seq)),
        }
    }

    async fn on_msg(&self, svc: &Service<GobaseTestCodec>, msg: TestMsg) {
        if is_heartbeat_answer(&msg) {
            return;
        }
        let env = match Envelope::decode(&msg.body) {
            Ok(e) => e,
            Err(e) => return bad_frame(svc, msg.msgid, &e),
        };
        if env.seq != 0 {
            // its request ended already (timeout, or the session left)
            metrics::counter!("warren_proxy_late_answers_total", "group" => svc.name().to_owned())
                .increment(1);
            tracing::debug!(group = %svc.name(), service = %svc.id(), seq = env.seq, "proxy: answer after its request ended");
            return;
        }
        if env.name.is_empty() {
            return bad_frame(svc, msg.msgid, &"push without a topic");
        }
        let Some(sessions) = self.sessions.get() else {
            return;
        };
        if let Err(e) = sessions.send(&env.sid, &env.name, env.payload) {
            metrics::counter!("warren_proxy_push_failures_total", "group" => svc.name().to_owned())
                .increment(1);
            tracing::debug!(group = %svc.name(), service = %svc.id(), session = %env.sid, topic = %env.name, error = %e, "proxy: push not delivered");
        }
    }
}

/// The running proxies of a node: their groups, and the modules the node serves them with.
#[derive(Default)]
pub struct Proxies {
    groups: HashMap<String, ProxyGroup>,
    modules: Vec<Module>,
    /// Stops the registry watchers of the groups that discover their services.
    stop: CancellationToken,
}

/// What one proxy module's handlers share.
struct Route {
    group_name: String,
    group: ProxyGroup,
    timeout: Duration,
    closed_msgid: u32,
}

impl Proxies {
    /// Build every `[[proxy]]` table's module and start its group, fed by the table's static
    /// list or by its registry (a table without a `registry` of its own reads `node_registry`,
    /// the node's; docs/backends.md, "Registry discovery"). Fails, before starting anything, when
    /// a registry table has no registry to read. Must be called within a tokio runtime.
    pub fn start(
        proxies: &[ProxyConfig],
        backends: &[BackendConfig],
        node_registry: &str,
    ) -> Result<Self, String> {
        let mut out = Proxies::default();
        for p in proxies {
            let name = p.backend.trim().to_lowercase();
            let Some(table) = backends.iter().find(|b| b.group_name() == name) else {
                tracing::error!(route = %p.route, backend = %p.backend, "proxy: no such [[backend]] group");
                continue;
            };
            let group = match out.groups.get(&name) {
                Some(g) => g.clone(),
                None => {
                    let codec = GobaseTestCodec::new(table.max_body);
                    let g = Backends::new(codec, ProxyHooks::default(), options(table));
                    let feed = g.clone();
                    crate::backend::configured::feed_table(
                        table,
                        node_registry,
                        move |group, services| feed.update(group, services),
                        &out.stop,
                    )?;
                    out.groups.insert(name.clone(), g.clone());
                    g
                }
            };
            out.modules.push(module(
                p,
                Route {
                    group_name: name,
                    group,
                    timeout: Duration::from_secs(p.timeout_s.max(1)),
                    closed_msgid: p.closed_msgid,
                },
            ));
        }
        Ok(out)
    }

    /// The groups the proxies run (lowercased): the node starts the other `[[backend]]` tables.
    pub fn proxied_groups(proxies: &[ProxyConfig]) -> Vec<String> {
        proxies
            .iter()
            .map(|p| p.backend.trim().to_lowercase())
            .collect()
    }

    /// The proxy modules, to register with the node before it starts.
    pub fn modules(&self) -> &[Module] {
        &self.modules
    }

    /// The node runs: pushes from the backends can reach its sessions.
    pub fn attach(&self, sessions: &Arc<SessionTable>) {
        for g in self.groups.values() {
            let _ = g.hooks().sessions.set(sessions.clone());
        }
    }

    /// A proxied group by name, for tests and the admin API.
    pub fn group(&self, name: &str) -> Option<&ProxyGroup> {
        self.groups.get(&name.trim().to_lowercase())
    }

    /// Close every proxied service and wait for them.
    pub async fn shutdown(&self) {
        self.stop.cancel();
        for g in self.groups.values() {
            g.shutdown().await;
        }
    }
}

/// A table's options, as the plain `[[backend]]` groups read them.
fn options(c: &BackendConfig) -> BackendOptions {
    BackendOptions {
        dial_timeout: Duration::from_secs(c.dial_timeout_s),
        msg_seq: c.msg_seq,
        immediately: c.immediately,
        queue_bytes: c.queue_bytes,
        ..BackendOptions::default()
    }
}

fn unavailable(group: &str, e: BackendError) -> CallError {
    match e {
        BackendError::Timeout => CallError::Timeout,
        e => CallError::Unavailable(Detail::new(format!("backend group {group}: {e}"))),
    }
}

/// The module of one `[[proxy]]` table: one client handler per configured handler.
fn module(p: &ProxyConfig, route: Route) -> Module {
    let mut b = Module::builder(p.route.trim(), route);
    for (handler, &msgid) in &p.handlers {
        let h = move |cx: Context<Route>, body: Bytes| forward(cx, msgid, body);
        b = if p.before_login {
            b.login_handler(handler, h)
        } else {
            b.client_handler(handler, h)
        };
    }
    if p.closed_msgid != 0 {
        b = b.on_session_closed(closed);
    }
    b.build()
}

fn envelope(seq: u32, s: &Session, payload: Bytes) -> Result<Bytes, CallError> {
    Envelope {
        seq,
        sid: s.id.to_string(),
        name: s.uid.clone().unwrap_or_default(),
        payload,
    }
    .to_bytes()
    .map_err(|e| CallError::BadRequest(Detail::new(e.to_string())))
}

/// One client request: to the session's service, and its answer back.
async fn forward(cx: Context<Route>, msgid: u32, body: Bytes) -> Result<Bytes, CallError> {
    let r = cx.state();
    let session = cx.session().ok_or(CallError::NoSession)?;
    let svc = r
        .group
        .service_by_hash(&r.group_name, session.hash_key())
        .ok_or_else(|| unavailable(&r.group_name, BackendError::NoService))?;
    let seq = r.group.hooks().next_seq();
    let frame = TestMsg::new(msgid, envelope(seq, session, body)?);
    let answer = svc
        .call(RpcId::from(seq), &frame, r.timeout)
        .await
        .map_err(|e| unavailable(&r.group_name, e))?;
    match Envelope::decode(&answer.body) {
        Ok(env) => Ok(env.payload),
        Err(e) => {
            bad_frame(&svc, answer.msgid, &e);
            Err(CallError::Unavailable(Detail::new(format!(
                "backend group {}: bad answer: {e}",
                r.group_name
            ))))
        }
    }
}

/// A session that used the proxy closed: tell the service that owns it.
async fn closed(cx: Context<Route>, _body: Bytes) -> Result<(), CallError> {
    let r = cx.state();
    let session = cx.session().ok_or(CallError::NoSession)?;
    let frame = TestMsg::new(r.closed_msgid, envelope(0, session, Bytes::new())?);
    if let Err(e) = r
        .group
        .send_by_hash(&r.group_name, session.hash_key(), &frame)
    {
        tracing::debug!(group = %r.group_name, session = %session.id, error = %e, "proxy: session close not told");
    }
    Ok(())
}

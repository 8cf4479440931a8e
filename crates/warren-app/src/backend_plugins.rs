//! The node's `[[backend]]` groups as module plugins see them (docs/plugins.md, "Backend
//! groups"): `warren.backend_send`, `warren.backend_send_to` and `warren.backend_call` go
//! through [`Groups`], and the frames a group receives that answer no call go to every module
//! plugin's `on_backend_msg`, in arrival order per service.

use std::sync::Arc;

use axum::body::Bytes;
use warren::CallError;
use warren_cluster::backend::{
    BackendError, ConfiguredBackends, GobaseTestCodec, MsgSink, Service, TestMsg,
};
use warren_plugin::{
    BackendCaller, BackendMsg, BackendRequest, BackendTarget, HttpAnswer, HttpRequest,
    MAX_HTTP_ANSWER, ModulePlugin, Plugin,
};

use crate::plugins::Plugins;

type BoxFuture<'a, T> = std::pin::Pin<Box<dyn std::future::Future<Output = T> + Send + 'a>>;

/// Hand the running groups to every module plugin, and their frames that answer no call to the
/// plugins that define `on_backend_msg` (checked at each frame, so a reload that adds it counts).
pub fn connect(plugins: &Plugins, groups: &Arc<ConfiguredBackends>) {
    let modules = plugins.modules();
    if modules.is_empty() || groups.is_empty() {
        return;
    }
    let caller: Arc<dyn BackendCaller> = Arc::new(Groups(groups.clone()));
    for m in &modules {
        m.set_backends(caller.clone());
    }
    let modules: Arc<[Arc<ModulePlugin>]> = modules.into();
    let sink: MsgSink = Arc::new(move |svc: &Service<GobaseTestCodec>, msg: TestMsg| {
        let modules = modules.clone();
        let group = svc.name().to_owned();
        let service = svc.id().to_owned();
        Box::pin(async move {
            let mut taken = false;
            for m in modules.iter().filter(|m| m.wants_backend_msgs()) {
                taken = true;
                let delivered = m
                    .backend_msg(BackendMsg {
                        group: group.clone(),
                        service: service.clone(),
                        msgid: msg.msgid,
                        body: msg.body.clone(),
                    })
                    .await;
                if let Err(e) = delivered {
                    tracing::warn!(group = %group, service = %service, msgid = msg.msgid, plugin = %m.path().display(), error = %e, "on_backend_msg failed");
                }
            }
            taken
        }) as BoxFuture<'static, bool>
    });
    groups.set_sink(sink);
}

/// The configured TCP groups behind a plugin's `warren.backend_*` calls.
struct Groups(Arc<ConfiguredBackends>);

/// A backend's error as the script sees it: a timeout is the call's deadline, the others keep
/// the gobase words (`no service`, `close`, `rpcId exist`, ...).
fn script_error(e: BackendError) -> CallError {
    match e {
        BackendError::Timeout => CallError::Timeout,
        other => CallError::App(other.to_string()),
    }
}

impl BackendCaller for Groups {
    fn send(
        &self,
        group: &str,
        target: &BackendTarget,
        msgid: u32,
        body: Bytes,
    ) -> Result<(), CallError> {
        let g = self
            .0
            .get(group)
            .ok_or_else(|| script_error(BackendError::NoService))?;
        let msg = TestMsg::new(msgid, body);
        match target {
            BackendTarget::Hash(key) => g.send_by_hash(group, key, &msg),
            BackendTarget::Service(id) => g.send(group, id, &msg),
        }
        .map_err(script_error)
    }

    fn call(&self, r: BackendRequest) -> BoxFuture<'static, Result<Bytes, CallError>> {
        let g = self.0.get(&r.group).cloned();
        Box::pin(async move {
            let g = g.ok_or_else(|| script_error(BackendError::NoService))?;
            let msg = TestMsg::new(r.msgid, r.body);
            let rpc = u64::from(r.answer_msgid);
            let answer = match &r.target {
                BackendTarget::Hash(key) => {
                    g.call_by_hash(&r.group, key, rpc, &msg, r.timeout).await
                }
                BackendTarget::Service(id) => g.call(&r.group, id, rpc, &msg, r.timeout).await,
            }
            .map_err(script_error)?;
            Ok(answer.body)
        })
    }

    fn http(&self, r: HttpRequest) -> BoxFuture<'static, Result<HttpAnswer, CallError>> {
        let g = self.0.get_http(&r.group).cloned();
        Box::pin(async move {
            let g = g.ok_or_else(|| script_error(BackendError::NoService))?;
            let method = reqwest::Method::from_bytes(r.method.as_bytes())
                .map_err(|_| CallError::App(format!("{:?} is not an HTTP method", r.method)))?;
            let request = match &r.tag {
                Some(tag) => g.request_by_tag_and_hash(&r.group, tag, &r.key, method, &r.path),
                None => g.request_by_hash(&r.group, &r.key, method, &r.path),
            }
            .map_err(script_error)?;
            let request = if r.body.is_empty() {
                request
            } else {
                request.body(r.body)
            };
            let exchange = async {
                let mut resp = request.send().await.map_err(http_error)?;
                let status = resp.status().as_u16();
                if resp
                    .content_length()
                    .is_some_and(|n| n > MAX_HTTP_ANSWER as u64)
                {
                    return Err(too_long());
                }
                let mut body = Vec::new();
                while let Some(chunk) = resp.chunk().await.map_err(http_error)? {
                    if body.len() + chunk.len() > MAX_HTTP_ANSWER {
                        return Err(too_long());
                    }
                    body.extend_from_slice(&chunk);
                }
                Ok(HttpAnswer {
                    status,
                    body: body.into(),
                })
            };
            tokio::time::timeout(r.timeout, exchange)
                .await
                .map_err(|_| CallError::Timeout)?
        })
    }
}

/// A request that got no answer: the transport's reason, as the script sees it.
fn http_error(e: reqwest::Error) -> CallError {
    if e.is_timeout() {
        CallError::Timeout
    } else {
        CallError::App(format!("http: {e}"))
    }
}

fn too_long() -> CallError {
    CallError::App(format!(
        "http: the answer is longer than {MAX_HTTP_ANSWER} bytes"
    ))
}

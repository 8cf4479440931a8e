//! Python modules: the file's functions are handlers `(session, msg)`, run on the plugin's
//! threads. `session` is a [`PySession`]; the module `warren` (importable, and already in the
//! file's namespace) reaches the node. Whatever waits on the node releases the GIL.

use std::cell::RefCell;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use bytes::Bytes;
use futures_util::future::BoxFuture;
use parking_lot::Mutex;
use pyo3::prelude::*;
use pyo3::types::{PyCFunction, PyDict, PyModule, PyString, PyTuple};
use serde_json::Value;
use warren::{CallError, Services, Session};

use super::{Pool, PyFailure, arg};
use crate::module::{
    CallCx, ModuleVersion, decode_reply, json_body, json_reply, node_of, rpc_args, rpc_timeout,
};
use crate::{ModulePluginOptions, MsgType, PluginError};

/// The call a plugin thread is running, for the `warren` functions (a thread runs one call at a
/// time: while it waits on the node it holds neither the GIL nor another call).
struct Running {
    cx: CallCx,
    rt: tokio::runtime::Handle,
}

thread_local! {
    static RUNNING: RefCell<Option<Running>> = const { RefCell::new(None) };
}

/// Sets the thread's running call for the length of one job.
struct RunningGuard;

impl RunningGuard {
    fn set(cx: CallCx, rt: tokio::runtime::Handle) -> RunningGuard {
        RUNNING.with(|r| *r.borrow_mut() = Some(Running { cx, rt }));
        RunningGuard
    }
}

impl Drop for RunningGuard {
    fn drop(&mut self) {
        RUNNING.with(|r| r.borrow_mut().take());
    }
}

/// The running call's context and runtime, or the error a script sees outside one.
fn running() -> PyResult<(CallCx, tokio::runtime::Handle)> {
    RUNNING.with(|r| {
        r.borrow()
            .as_ref()
            .map(|r| (r.cx.clone(), r.rt.clone()))
            .ok_or_else(|| {
                pyo3::exceptions::PyRuntimeError::new_err(
                    "warren is not available while the plugin loads: use it in on_init or a handler",
                )
            })
    })
}

/// One loaded version of a Python module.
pub(crate) struct PyModuleVersion {
    path: PathBuf,
    module: String,
    msg_type: MsgType,
    pool: Arc<Pool>,
    handlers: Vec<String>,
    /// In `Arc`s, so that a call takes its function without taking the GIL; swapped whole
    /// when a handler is patched, so a call in flight keeps the function it started with.
    functions: ArcSwap<HashMap<String, Arc<Py<PyAny>>>>,
    hooks: Vec<&'static str>,
    warren: Arc<Py<PyModule>>,
    /// The loaded file's module, the namespace a patch runs in.
    namespace: Arc<Py<PyModule>>,
    /// Handlers replaced by patches, sorted.
    patched: Mutex<Vec<String>>,
}

/// Python side of a handler patch: run the source in the module's namespace (its globals) with
/// names defined into a dict of their own, take the one function it defines, and make it the
/// module's global of the handler's name.
const PATCH_HELPER: &std::ffi::CStr = c"
import inspect


def patch(module, handler, source, filename):
    code = compile(source, filename, 'exec')
    defined = {}
    exec(code, module.__dict__, defined)
    functions = [v for v in defined.values() if inspect.isfunction(v)]
    if len(functions) != 1:
        raise ValueError(
            'the body must define exactly one function (def handler(session, msg): ...); it defines %d'
            % len(functions))
    f = functions[0]
    setattr(module, handler, f)
    return f
";

static PATCH_MODULE: pyo3::sync::PyOnceLock<Py<PyModule>> = pyo3::sync::PyOnceLock::new();

/// The file name a patch of `handler` is compiled under (its tracebacks name it).
fn patch_file(handler: &str) -> String {
    format!("<patch of {handler}>")
}

/// Load from a plugin thread, blocking the caller (the first load, before the node runs).
pub(crate) fn load_blocking(
    pool: &Arc<Pool>,
    module: &str,
    path: &Path,
    options: &ModulePluginOptions,
    version: u64,
) -> Result<Arc<dyn ModuleVersion>, PluginError> {
    let (p, m, o, path_buf) = (
        pool.clone(),
        module.to_owned(),
        options.clone(),
        path.to_owned(),
    );
    pool.run_blocking(move || load_here(p, &m, &path_buf, &o, version))?
}

/// Load from a plugin thread, waiting without blocking (a reload).
pub(crate) async fn load(
    pool: &Arc<Pool>,
    module: &str,
    path: &Path,
    options: &ModulePluginOptions,
    version: u64,
) -> Result<Arc<dyn ModuleVersion>, PluginError> {
    let (p, m, o, path_buf) = (
        pool.clone(),
        module.to_owned(),
        options.clone(),
        path.to_owned(),
    );
    pool.run(move || load_here(p, &m, &path_buf, &o, version))
        .await
        .map_err(|_| PluginError::Stopped {
            path: path.to_owned(),
        })?
}

fn load_here(
    pool: Arc<Pool>,
    module: &str,
    path: &Path,
    options: &ModulePluginOptions,
    version: u64,
) -> Result<Arc<dyn ModuleVersion>, PluginError> {
    let mut warren_mod = None;
    let name = path
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_else(|| "plugin".into());
    let loaded = super::load_file(path, &name, |py| {
        let w = warren_module(py, module, version)?;
        warren_mod = Some(w.clone().unbind());
        Ok(vec![("warren", w.into_any())])
    })?;
    Python::attach(|py| {
        let m = loaded.bind(py);
        let handlers =
            super::handler_names(m).map_err(|e| PyFailure::of(py, &e, path).load_error(path))?;
        let mut functions = HashMap::new();
        for h in handlers
            .iter()
            .map(String::as_str)
            .chain(crate::module::HOOKS.iter().copied())
        {
            if let Some(f) = super::function(m, h) {
                functions.insert(h.to_owned(), Arc::new(f));
            }
        }
        let hooks = crate::module::HOOKS
            .iter()
            .copied()
            .filter(|h| functions.contains_key(*h))
            .collect();
        let warren = match warren_mod {
            Some(w) => Arc::new(w),
            None => Arc::new(
                warren_module(py, module, version)
                    .map_err(|e| PyFailure::of(py, &e, path).load_error(path))?
                    .unbind(),
            ),
        };
        Ok(Arc::new(PyModuleVersion {
            path: path.to_owned(),
            module: module.to_owned(),
            msg_type: options.msg_type,
            pool,
            handlers,
            functions: ArcSwap::from_pointee(functions),
            hooks,
            warren,
            namespace: Arc::new(loaded.clone_ref(py)),
            patched: Mutex::new(Vec::new()),
        }) as Arc<dyn ModuleVersion>)
    })
}

/// A closure given to Python as a function of the `warren` module.
fn func<'py, R>(
    py: Python<'py>,
    name: &'static std::ffi::CStr,
    doc: &'static std::ffi::CStr,
    f: impl Fn(&Bound<'_, PyTuple>) -> PyResult<R> + Send + Sync + 'static,
) -> PyResult<Bound<'py, PyCFunction>>
where
    R: for<'a> IntoPyObject<'a>,
{
    PyCFunction::new_closure(
        py,
        Some(name),
        Some(doc),
        move |args: &Bound<'_, PyTuple>, _: Option<&Bound<'_, PyDict>>| -> PyResult<Py<PyAny>> {
            pyo3::IntoPyObjectExt::into_py_any(f(args)?, args.py())
        },
    )
}

/// The session a room function is about: the one given, or the caller's.
fn session_arg(args: &Bound<'_, PyTuple>, i: usize, cx: &CallCx) -> PyResult<Arc<Session>> {
    match args.get_item(i).ok().filter(|a| !a.is_none()) {
        Some(s) => Ok(s.cast::<PySession>()?.get().snapshot()),
        None => cx
            .session
            .clone()
            .ok_or_else(|| super::raise(args.py(), CallError::NoSession)),
    }
}

/// The `warren` module of one version.
fn warren_module<'py>(
    py: Python<'py>,
    module: &str,
    version: u64,
) -> PyResult<Bound<'py, PyModule>> {
    let w = PyModule::new(py, "warren")?;
    w.setattr("module", module)?;
    w.setattr("version", version)?;
    w.setattr("settings", PyDict::new(py))?;
    w.setattr("instance", py.None())?;
    w.setattr("CallError", super::call_error_class(py)?)?;
    w.setattr("Session", py.get_type::<PySession>())?;
    w.setattr(
        "call",
        func(
            py,
            c"call",
            c"call(module, handler, body=None, timeout=None) -> the reply (JSON decoded)",
            |args| {
                let py = args.py();
                let (cx, rt) = running()?;
                let target: String = arg(args, 0)?.extract()?;
                let handler: String = arg(args, 1)?.extract()?;
                let body = match args.get_item(2) {
                    Ok(b) => super::body_bytes(&b)?,
                    Err(_) => Bytes::new(),
                };
                let timeout = args
                    .get_item(3)
                    .ok()
                    .filter(|t| !t.is_none())
                    .map(|t| t.extract::<f64>())
                    .transpose()?
                    .and_then(|s| Duration::try_from_secs_f64(s).ok());
                let reply = super::wait(py, &rt, async move {
                    cx.services
                        .call(&target, &handler, cx.session.clone(), body, timeout)
                        .await
                })?;
                super::from_json(py, &decode_reply(&reply)).map(Bound::unbind)
            },
        )?,
    )?;
    w.setattr(
        "call_nr",
        func(
            py,
            c"call_nr",
            c"call_nr(module, handler, body=None): hand a call over without waiting for a reply",
            |args| {
                let (cx, rt) = running()?;
                let target: String = arg(args, 0)?.extract()?;
                let handler: String = arg(args, 1)?.extract()?;
                let body = match args.get_item(2) {
                    Ok(b) => super::body_bytes(&b)?,
                    Err(_) => Bytes::new(),
                };
                super::wait(args.py(), &rt, async move {
                    cx.services
                        .call_nr(&target, &handler, cx.session.clone(), body)
                        .await
                })?;
                Ok(true)
            },
        )?,
    )?;
    w.setattr(
        "rpc_call",
        func(
            py,
            c"rpc_call",
            c"rpc_call(topic, func, args=None, timeout=None) -> the callback's args (a list): call a TianQinS Redis-RPC peer",
            |args| {
                let py = args.py();
                let (cx, rt) = running()?;
                let topic: String = arg(args, 0)?.extract()?;
                let func: String = arg(args, 1)?.extract()?;
                let rpc = match args.get_item(2).ok().filter(|a| !a.is_none()) {
                    Some(a) => rpc_args(super::to_json(&a)?),
                    None => Vec::new(),
                };
                let timeout = args
                    .get_item(3)
                    .ok()
                    .filter(|t| !t.is_none())
                    .map(|t| t.extract::<f64>())
                    .transpose()?
                    .and_then(|s| Duration::try_from_secs_f64(s).ok())
                    .unwrap_or_else(|| rpc_timeout(&cx));
                let reply = super::wait(py, &rt, async move {
                    cx.redis_rpc()?.call(topic, func, rpc, timeout).await
                })?;
                super::from_json(py, &Value::Array(reply)).map(Bound::unbind)
            },
        )?,
    )?;
    w.setattr(
        "rpc_notify",
        func(
            py,
            c"rpc_notify",
            c"rpc_notify(topic, func, args=None): run a function of a TianQinS Redis-RPC peer without waiting for a reply",
            |args| {
                let (cx, rt) = running()?;
                let topic: String = arg(args, 0)?.extract()?;
                let func: String = arg(args, 1)?.extract()?;
                let rpc = match args.get_item(2).ok().filter(|a| !a.is_none()) {
                    Some(a) => rpc_args(super::to_json(&a)?),
                    None => Vec::new(),
                };
                super::wait(args.py(), &rt, async move {
                    cx.redis_rpc()?.notify(topic, func, rpc).await
                })?;
                Ok(true)
            },
        )?,
    )?;
    // `[[backend]]` groups (docs/plugins.md, "Backend groups")
    for (name, cname, by_id, doc) in [
        (
            "backend_send",
            c"backend_send",
            false,
            c"backend_send(group, key, msgid, body): send a frame to the service that owns key on the backend group's ring",
        ),
        (
            "backend_send_to",
            c"backend_send_to",
            true,
            c"backend_send_to(group, service, msgid, body): send a frame to the backend service of this id",
        ),
    ] {
        w.setattr(
            name,
            func(py, cname, doc, move |args| {
                let py = args.py();
                let (cx, _) = running()?;
                let group: String = arg(args, 0)?.extract()?;
                let key: String = arg(args, 1)?.extract()?;
                let msgid: u32 = arg(args, 2)?.extract()?;
                let body = super::body_bytes(&arg(args, 3)?)?;
                let target = crate::BackendTarget::of(by_id, key);
                cx.backends()
                    .and_then(|b| b.send(&group, &target, msgid, body))
                    .map_err(|e| super::raise(py, e))?;
                Ok(true)
            })?,
        )?;
    }
    for (name, cname, by_id, doc) in [
        (
            "backend_call",
            c"backend_call",
            false,
            c"backend_call(group, key, msgid, body, timeout=None, answer_msgid=None) -> the answer's body (bytes): call the service that owns key on the backend group's ring",
        ),
        (
            "backend_call_to",
            c"backend_call_to",
            true,
            c"backend_call_to(group, service, msgid, body, timeout=None, answer_msgid=None) -> the answer's body (bytes): call the backend service of this id",
        ),
    ] {
        w.setattr(
            name,
            func(py, cname, doc, move |args| {
                let py = args.py();
                let (cx, rt) = running()?;
                let group: String = arg(args, 0)?.extract()?;
                let key: String = arg(args, 1)?.extract()?;
                let msgid: u32 = arg(args, 2)?.extract()?;
                let body = super::body_bytes(&arg(args, 3)?)?;
                let timeout = args
                    .get_item(4)
                    .ok()
                    .filter(|t| !t.is_none())
                    .map(|t| t.extract::<f64>())
                    .transpose()?;
                let answer = args
                    .get_item(5)
                    .ok()
                    .filter(|t| !t.is_none())
                    .map(|t| t.extract::<u32>())
                    .transpose()?;
                let target = crate::BackendTarget::of(by_id, key);
                let request = crate::BackendRequest::from_script(
 group, target, msgid, body, timeout, answer, rpc_timeout(&cx),
 );
                let reply = super::wait(py, &rt, async move {
                    cx.backends()?.call(request).await
                })?;
                Ok(pyo3::types::PyBytes::new(py, &reply).into_any().unbind())
            })?,
        )?;
    }
    w.setattr(
        "http_call",
        func(
            py,
            c"http_call",
            c"http_call(group, key, method, path, body=None, timeout=None, tag=None) -> (status, body bytes): an HTTP request to the healthy service of the HTTP backend group that owns key on its ring",
            |args| {
                let py = args.py();
                let (cx, rt) = running()?;
                let group: String = arg(args, 0)?.extract()?;
                let key: String = arg(args, 1)?.extract()?;
                let method: String = arg(args, 2)?.extract()?;
                let path: String = arg(args, 3)?.extract()?;
                let body = match args.get_item(4).ok().filter(|b| !b.is_none()) {
                    Some(b) => super::body_bytes(&b)?,
                    None => Bytes::new(),
                };
                let timeout = args
                    .get_item(5)
                    .ok()
                    .filter(|t| !t.is_none())
                    .map(|t| t.extract::<f64>())
                    .transpose()?;
                let tag = args
                    .get_item(6)
                    .ok()
                    .filter(|t| !t.is_none())
                    .map(|t| t.extract::<String>())
                    .transpose()?;
                let request = crate::HttpRequest {
                    group,
                    key,
                    tag,
                    method,
                    path,
                    body,
                    timeout: crate::backend::timeout_of(timeout, rpc_timeout(&cx)),
                };
                let answer = super::wait(py, &rt, async move {
                    cx.backends()?.http(request).await
                })?;
                let body = pyo3::types::PyBytes::new(py, &answer.body);
                Ok((answer.status, body).into_pyobject(py)?.into_any().unbind())
            },
        )?,
    )?;
    w.setattr(
        "room_add",
        func(
            py,
            c"room_add",
            c"room_add(room, session=None): add a session (default: the caller's) to a room",
            |args| {
                let (cx, rt) = running()?;
                let room: String = arg(args, 0)?.extract()?;
                let s = session_arg(args, 1, &cx)?;
                super::wait(args.py(), &rt, async move {
                    cx.node()?.group_add(&room, &s).await
                })?;
                Ok(true)
            },
        )?,
    )?;
    w.setattr(
        "room_remove",
        func(
            py,
            c"room_remove",
            c"room_remove(room, session=None): take a session (default: the caller's) out of a room",
            |args| {
                let (cx, rt) = running()?;
                let room: String = arg(args, 0)?.extract()?;
                let s = session_arg(args, 1, &cx)?;
                super::wait(args.py(), &rt, async move {
                    cx.node()?.group_remove(&room, &s).await
                })?;
                Ok(true)
            },
        )?,
    )?;
    w.setattr(
        "room_broadcast",
        func(
            py,
            c"room_broadcast",
            c"room_broadcast(room, topic, body, except_session=None) -> members reached here",
            |args| {
                let (cx, rt) = running()?;
                let room: String = arg(args, 0)?.extract()?;
                let topic: String = arg(args, 1)?.extract()?;
                let body = super::body_bytes(&arg(args, 2)?)?;
                let except = match args.get_item(3).ok().filter(|a| !a.is_none()) {
                    Some(s) => Some(s.cast::<PySession>()?.get().snapshot().id.to_string()),
                    None => None,
                };
                super::wait(args.py(), &rt, async move {
                    Ok(cx
                        .node()?
                        .group_broadcast(&room, &topic, body, except.as_deref())
                        .await)
                })
            },
        )?,
    )?;
    let name = module.to_owned();
    w.setattr(
        "log",
        func(
            py,
            c"log",
            c"log(level, *parts): write to warren's log",
            move |args| {
                let level: String = arg(args, 0)?.extract()?;
                let mut parts = Vec::new();
                for p in args.iter().skip(1) {
                    parts.push(p.str()?.to_string());
                }
                crate::module::log(&name, &level, &parts.join(" "));
                Ok(())
            },
        )?,
    )?;
    Ok(w)
}

/// The `session` argument of a handler: the caller's session and what can be done with it.
/// Operations go to the gate that owns the connection, wherever it runs; each refreshes the
/// object with the session as the gate then sees it.
#[pyclass(name = "Session", module = "warren", frozen)]
pub(crate) struct PySession {
    services: Arc<dyn Services>,
    session: Mutex<Arc<Session>>,
    rt: tokio::runtime::Handle,
}

impl PySession {
    fn snapshot(&self) -> Arc<Session> {
        self.session.lock().clone()
    }

    /// Run a session operation that returns the session as its gate now sees it.
    fn op<F>(&self, py: Python<'_>, f: F) -> PyResult<()>
    where
        F: for<'a> FnOnce(
                &'a warren::node::NodeHandle,
                Arc<Session>,
            ) -> BoxFuture<'a, Result<Arc<Session>, CallError>>
            + Send
            + 'static,
    {
        let services = self.services.clone();
        let s = self.snapshot();
        let updated = super::wait(py, &self.rt, async move {
            let node = node_of(&services)?;
            f(node, s).await
        })?;
        *self.session.lock() = updated;
        Ok(())
    }
}

#[pymethods]
impl PySession {
    /// The session id.
    #[getter]
    fn id(&self) -> String {
        self.snapshot().id.to_string()
    }

    /// The bound user id, or None before `bind`.
    #[getter]
    fn uid(&self) -> Option<String> {
        self.snapshot().uid.clone()
    }

    /// The client's address, `ip:port`.
    #[getter]
    fn ip(&self) -> String {
        self.snapshot().remote.to_string()
    }

    /// The gate instance that owns the connection.
    #[getter]
    fn gate(&self) -> String {
        self.snapshot().gate.to_string()
    }

    /// A copy of the session's settings.
    #[getter]
    fn settings<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyAny>> {
        super::from_json(py, &Value::Object(self.snapshot().settings.clone()))
    }

    /// One setting, or `default`.
    #[pyo3(signature = (key, default=None))]
    fn get(&self, py: Python<'_>, key: &str, default: Option<Py<PyAny>>) -> PyResult<Py<PyAny>> {
        match self.snapshot().settings.get(key) {
            Some(v) => super::from_json(py, v).map(Bound::unbind),
            None => Ok(default.unwrap_or_else(|| py.None())),
        }
    }

    /// The mqant session export map.
    fn export<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyAny>> {
        super::from_json(py, &self.snapshot().export_map())
    }

    /// Set one setting (any JSON value).
    fn set(&self, py: Python<'_>, key: String, value: &Bound<'_, PyAny>) -> PyResult<()> {
        let value = super::to_json(value)?;
        self.op(py, move |node, s| {
            Box::pin(async move { node.sessions().set(&s, &key, value).await })
        })
    }

    /// Remove one setting.
    fn remove(&self, py: Python<'_>, key: String) -> PyResult<()> {
        self.op(py, move |node, s| {
            Box::pin(async move { node.sessions().remove(&s, &key).await })
        })
    }

    /// Bind the session to a user id.
    fn bind(&self, py: Python<'_>, uid: String) -> PyResult<()> {
        self.op(py, move |node, s| {
            Box::pin(async move { node.sessions().bind(&s, &uid).await })
        })
    }

    /// Clear the session's user id.
    fn unbind(&self, py: Python<'_>) -> PyResult<()> {
        self.op(py, |node, s| {
            Box::pin(async move { node.sessions().unbind(&s).await })
        })
    }

    /// Read the session again from its gate.
    fn update(&self, py: Python<'_>) -> PyResult<()> {
        self.op(py, |node, s| {
            Box::pin(async move { node.sessions().update(&s).await })
        })
    }

    /// Send `body` on `topic` to the client (before this handler's reply).
    fn push(&self, py: Python<'_>, topic: String, body: &Bound<'_, PyAny>) -> PyResult<()> {
        let body = super::body_bytes(body)?;
        let services = self.services.clone();
        let s = self.snapshot();
        super::wait(py, &self.rt, async move {
            services.push(&s, &topic, body).await
        })
    }

    /// The same as `push` (mqant's name).
    fn send(&self, py: Python<'_>, topic: String, body: &Bound<'_, PyAny>) -> PyResult<()> {
        self.push(py, topic, body)
    }

    /// Close the client's connection.
    fn close(&self, py: Python<'_>) -> PyResult<()> {
        let services = self.services.clone();
        let s = self.snapshot();
        super::wait(py, &self.rt, async move {
            node_of(&services)?.sessions().close(&s).await
        })
    }

    fn __repr__(&self) -> String {
        let s = self.snapshot();
        format!("<warren.Session {} uid={:?}>", s.id, s.uid)
    }
}

impl PyModuleVersion {
    /// Run `f` on a plugin thread with `cx` as the running call.
    async fn on_thread<R: Send + 'static>(
        &self,
        cx: CallCx,
        f: impl FnOnce(Python<'_>) -> R + Send + 'static,
    ) -> Result<R, CallError> {
        let rt = tokio::runtime::Handle::current();
        self.pool
            .run(move || {
                let _running = RunningGuard::set(cx, rt);
                Python::attach(f)
            })
            .await
    }

    /// The handler's `session` argument (on a plugin thread, during a call).
    fn session_object(py: Python<'_>, cx: &CallCx) -> PyResult<Py<PyAny>> {
        let (_, rt) = running()?;
        Ok(match &cx.session {
            Some(s) => Py::new(
                py,
                PySession {
                    services: cx.services.clone(),
                    session: Mutex::new(s.clone()),
                    rt,
                },
            )?
            .into_any(),
            None => py.None(),
        })
    }

    /// Run handler `handler` on a request, here, on a plugin thread, with `cx` as the running
    /// call.
    fn run_handler(
        &self,
        handler: &str,
        cx: CallCx,
        body: Bytes,
        rt: &tokio::runtime::Handle,
    ) -> Result<Bytes, CallError> {
        let f = self
            .functions
            .load()
            .get(handler)
            .cloned()
            .ok_or_else(|| CallError::HandlerNotFound(handler.to_owned()))?;
        let json = match self.msg_type {
            MsgType::Json => Some(json_body(&body)?),
            _ => None,
        };
        let as_bytes = self.msg_type == MsgType::Bytes;
        let call_cx = cx.clone();
        let _running = RunningGuard::set(cx, rt.clone());
        Python::attach(|py| {
            let run = || -> PyResult<Bound<'_, PyAny>> {
                let session = PyModuleVersion::session_object(py, &call_cx)?;
                let msg = match &json {
                    Some(v) => super::from_json(py, v)?,
                    None => super::text_or_bytes(py, &body, as_bytes)?,
                };
                f.bind(py).call1((session, msg))
            };
            match run() {
                Ok(v) => reply(&v),
                Err(e) => {
                    let failure = PyFailure::of(py, &e, &self.path);
                    if failure.call_error.is_none() {
                        tracing::warn!(module = %self.module, plugin = %self.path.display(), handler = %handler, traceback = %failure.traceback, "Python handler failed");
                    }
                    Err(failure.call_error())
                }
            }
        })
    }

    /// Run a hook (if the file defines it) on a plugin thread.
    async fn hook(
        self: Arc<Self>,
        hook: &'static str,
        cx: Option<CallCx>,
        args: impl for<'py> FnOnce(Python<'py>) -> PyResult<Bound<'py, PyTuple>> + Send + 'static,
    ) -> Result<(), PluginError> {
        let Some(f) = self.functions.load().get(hook).cloned() else {
            return Ok(());
        };
        let path = self.path.clone();
        let stopped = |_| PluginError::Stopped {
            path: self.path.clone(),
        };
        let run = move |py: Python<'_>| {
            args(py)
                .and_then(|a| f.bind(py).call1(a))
                .map(|_| ())
                .map_err(|e| {
                    let failure = PyFailure::of(py, &e, &path);
                    tracing::warn!(plugin = %path.display(), hook, traceback = %failure.traceback, "Python hook failed");
                    failure.load_error(&path)
                })
        };
        match cx {
            Some(cx) => self.on_thread(cx, run).await.map_err(stopped)?,
            None => self
                .pool
                .run(move || Python::attach(run))
                .await
                .map_err(stopped)?,
        }
    }
}

impl ModuleVersion for PyModuleVersion {
    fn handlers(&self) -> &[String] {
        &self.handlers
    }

    fn has_hook(&self, hook: &str) -> bool {
        self.hooks.contains(&hook)
    }

    fn call(
        self: Arc<Self>,
        handler: Arc<str>,
        cx: CallCx,
        body: Bytes,
    ) -> BoxFuture<'static, Result<Bytes, CallError>> {
        Box::pin(async move {
            let rt = tokio::runtime::Handle::current();
            let this = self.clone();
            self.pool
                .run(move || this.run_handler(&handler, cx, body, &rt))
                .await?
        })
    }

    fn call_in_order(
        self: Arc<Self>,
        calls: Vec<(Arc<str>, CallCx, Bytes)>,
    ) -> Vec<BoxFuture<'static, Result<Bytes, CallError>>> {
        // one job on one plugin thread runs them all, in order; each result goes back as it is
        // ready (with the rest of the thread's batch)
        let rt = tokio::runtime::Handle::current();
        let mut receivers = Vec::with_capacity(calls.len());
        let mut work = Vec::with_capacity(calls.len());
        for (handler, cx, body) in calls {
            let (tx, rx) = tokio::sync::oneshot::channel();
            receivers.push(rx);
            work.push((handler, cx, body, tx));
        }
        let this = self.clone();
        let job = move || {
            for (handler, cx, body, tx) in work {
                let r = this.run_handler(&handler, cx, body, &rt);
                super::worker::deliver(
                    Some(rt.clone()),
                    Box::new(move || {
                        let _ = tx.send(r);
                    }),
                );
            }
        };
        let pool = self.pool.clone();
        let mut receivers = receivers.into_iter();
        let mut futures: Vec<BoxFuture<'static, Result<Bytes, CallError>>> =
            Vec::with_capacity(receivers.len());
        if let Some(first) = receivers.next() {
            futures.push(Box::pin(async move {
                pool.queue(job).await?;
                first.await.unwrap_or(Err(CallError::Closed))
            }));
        }
        futures.extend(receivers.map(|rx| {
            Box::pin(async move { rx.await.unwrap_or(Err(CallError::Closed)) })
                as BoxFuture<'static, _>
        }));
        futures
    }

    fn init(self: Arc<Self>, cx: CallCx) -> BoxFuture<'static, Result<(), PluginError>> {
        Box::pin(async move {
            let settings = cx.instance.settings.clone();
            let instance = cx.instance.id.to_string();
            let warren = self.warren.clone();
            let path = self.path.clone();
            let set = {
                let settings = settings.clone();
                move |py: Python<'_>| -> Result<(), PluginError> {
                    let w = warren.bind(py);
                    let r = super::from_json(py, &settings)
                        .and_then(|s| w.setattr("settings", s))
                        .and_then(|_| w.setattr("instance", PyString::new(py, &instance)));
                    r.map_err(|e| PyFailure::of(py, &e, &path).load_error(&path))
                }
            };
            self.pool
                .run(move || Python::attach(set))
                .await
                .map_err(|_| PluginError::Stopped {
                    path: self.path.clone(),
                })??;
            self.hook("on_init", Some(cx), move |py| {
                PyTuple::new(py, [super::from_json(py, &settings)?])
            })
            .await
        })
    }

    fn destroy(self: Arc<Self>, cx: CallCx) -> BoxFuture<'static, Result<(), PluginError>> {
        Box::pin(async move {
            self.hook("on_destroy", Some(cx), |py| Ok(PyTuple::empty(py)))
                .await
        })
    }

    fn session_closed(self: Arc<Self>, cx: CallCx) -> BoxFuture<'static, Result<(), CallError>> {
        Box::pin(async move {
            let call_cx = cx.clone();
            self.clone()
                .hook("on_session_closed", Some(cx), move |py| {
                    let s = PyModuleVersion::session_object(py, &call_cx)?;
                    PyTuple::new(py, [s])
                })
                .await
                .map_err(|e| CallError::App(e.to_string()))
        })
    }

    fn backend_msg(
        self: Arc<Self>,
        cx: CallCx,
        msg: crate::BackendMsg,
    ) -> BoxFuture<'static, Result<(), CallError>> {
        Box::pin(async move {
            self.hook("on_backend_msg", Some(cx), move |py| {
                (
                    msg.group,
                    msg.service,
                    msg.msgid,
                    pyo3::types::PyBytes::new(py, &msg.body),
                )
                    .into_pyobject(py)
            })
            .await
            .map_err(|e| CallError::App(e.to_string()))
        })
    }

    fn export_state(self: Arc<Self>) -> BoxFuture<'static, Result<Option<Value>, PluginError>> {
        Box::pin(async move {
            let Some(f) = self.functions.load().get("export_state").cloned() else {
                return Ok(None);
            };
            let path = self.path.clone();
            self.pool
                .run(move || {
                    Python::attach(|py| {
                        let v = f
                            .bind(py)
                            .call0()
                            .map_err(|e| PyFailure::of(py, &e, &path).load_error(&path))?;
                        super::to_json(&v).map(Some).map_err(|e| {
                            PluginError::script(&path, None, format!("export_state: {e}"))
                        })
                    })
                })
                .await
                .map_err(|_| PluginError::Stopped {
                    path: self.path.clone(),
                })?
        })
    }

    fn patch(
        self: Arc<Self>,
        handler: Arc<str>,
        source: Arc<str>,
    ) -> BoxFuture<'static, Result<(), PluginError>> {
        Box::pin(async move {
            let namespace = self.namespace.clone();
            let path = self.path.clone();
            let name = handler.clone();
            let compiled = self
                .pool
                .run(move || {
                    Python::attach(|py| {
                        let file = patch_file(&name);
                        let run = || -> PyResult<Py<PyAny>> {
                            let helper = PATCH_MODULE.get_or_try_init(py, || {
                                PyModule::from_code(
                                    py,
                                    PATCH_HELPER,
                                    c"warren_patch.py",
                                    c"_warren_patch",
                                )
                                .map(Bound::unbind)
                            })?;
                            let f = helper.bind(py).getattr("patch")?.call1((
                                namespace.bind(py),
                                &*name,
                                &*source,
                                &file,
                            ))?;
                            Ok(f.unbind())
                        };
                        run().map_err(|e| {
                            let failure = PyFailure::of(py, &e, Path::new(&file));
                            PluginError::patch(&path, &name, failure.line, failure.described)
                        })
                    })
                })
                .await
                .map_err(|_| PluginError::Stopped {
                    path: self.path.clone(),
                })??;
            let f = Arc::new(compiled);
            self.functions.rcu(|functions| {
                let mut next = HashMap::clone(functions);
                next.insert(handler.to_string(), f.clone());
                next
            });
            let mut patched = self.patched.lock();
            if !patched.iter().any(|h| **h == *handler) {
                patched.push(handler.to_string());
                patched.sort();
            }
            Ok(())
        })
    }

    fn patched(&self) -> Vec<String> {
        self.patched.lock().clone()
    }

    fn import_state(self: Arc<Self>, state: Value) -> BoxFuture<'static, Result<(), PluginError>> {
        Box::pin(async move {
            self.hook("import_state", None, move |py| {
                PyTuple::new(py, [super::from_json(py, &state)?])
            })
            .await
        })
    }
}

/// A handler's return value as its reply: `str` as a JSON string, `bytes` as they are, anything
/// else as JSON.
fn reply(v: &Bound<'_, PyAny>) -> Result<Bytes, CallError> {
    if let Ok(s) = v.cast::<PyString>() {
        let text = s.to_string_lossy();
        return json_reply(&Value::String(text.into_owned()));
    }
    if v.is_instance_of::<pyo3::types::PyBytes>() {
        return v
            .extract::<Vec<u8>>()
            .map(Bytes::from)
            .map_err(|e| CallError::App(e.to_string()));
    }
    let json =
        super::to_json(v).map_err(|e| CallError::App(format!("reply encoding failed: {e}")))?;
    json_reply(&json)
}

//! The Python host (CPython 3 through pyo3): what channel handlers and modules share — the
//! threads Python runs on (never an async worker), loading a file as a module with the host's
//! modules (`channel`, `warren`) in place, errors with the file's line and the traceback, and
//! values to and from JSON.
//!
//! One interpreter serves the process. A plugin's code runs on threads of its own that take the
//! GIL for each call and let go of it whenever the call waits on the node (`warren.call`,
//! `session.push`, …): the node's future runs on the async runtime meanwhile, and the thread
//! blocks without the GIL until it is done.

// pyo3's #[pyclass] and #[pymethods] expand to unsafe glue around the C API: this module allows
// what those macros generate and writes no unsafe code of its own.
#![allow(unsafe_code)]

pub(crate) mod channel;
pub(crate) mod module;

use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use pyo3::prelude::*;
use pyo3::sync::PyOnceLock;
use pyo3::types::{PyBytes, PyDict, PyModule, PyString, PyTuple};
use serde_json::Value;
use tokio::sync::oneshot;
use warren::CallError;

use crate::PluginError;

/// Python helpers the host calls: loading a file as a module, reading an exception, JSON.
const HELPER: &std::ffi::CStr = c"
import importlib.util, inspect, json, os, sys, traceback


class CallError(Exception):
    '''A call through warren failed; `kind` is warren's error kind, the text its message.'''

    def __init__(self, kind, text):
        super().__init__(text)
        self.kind = kind
        self.text = text


def load(path, name, injected):
    directory = os.path.dirname(os.path.abspath(path))
    if directory not in sys.path:
        sys.path.append(directory)
    previous = {k: sys.modules.get(k) for k in list(injected) + [name]}
    sys.modules.update(injected)
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    module.__dict__.update(injected)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        for k, v in previous.items():
            if v is None:
                sys.modules.pop(k, None)
            else:
                sys.modules[k] = v
        raise
    return module


def error_info(exc, tb, path):
    if tb is not None and exc.__traceback__ is None:
        exc = exc.with_traceback(tb)
    text = ''.join(traceback.format_exception(type(exc), exc, exc.__traceback__))
    target = os.path.abspath(path)
    line = None
    if isinstance(exc, SyntaxError) and exc.filename and os.path.abspath(exc.filename) == target:
        line = exc.lineno
        where = '%s: %s' % (type(exc).__name__, exc.msg)
    else:
        for frame in traceback.extract_tb(exc.__traceback__):
            if os.path.abspath(frame.filename) == target:
                line = frame.lineno
        where = '%s: %s' % (type(exc).__name__, exc) if str(exc) else type(exc).__name__
    reply = str(exc) or type(exc).__name__
    kind = exc.kind if isinstance(exc, CallError) else None
    return line, where, reply, kind, text


def handlers(module, reserved):
    return sorted(
        k for k, v in vars(module).items()
        if inspect.isfunction(v) and v.__module__ == module.__name__
        and not k.startswith('_') and k not in reserved
    )


def dumps(value):
    return json.dumps(value, ensure_ascii=False, separators=(',', ':'))


loads = json.loads
";

static HELPER_MODULE: PyOnceLock<Py<PyModule>> = PyOnceLock::new();

/// Serializes loads: a file is executed with `sys.modules['channel']` (or `warren`) set to its
/// own host module, so that its `import channel` binds the right one.
static LOADING: parking_lot::Mutex<()> = parking_lot::Mutex::new(());

fn helper(py: Python<'_>) -> PyResult<&Bound<'_, PyModule>> {
    HELPER_MODULE
        .get_or_try_init(py, || {
            PyModule::from_code(py, HELPER, c"warren_host.py", c"_warren_host").map(Bound::unbind)
        })
        .map(|m| m.bind(py))
}

/// What Python said about an exception.
pub(crate) struct PyFailure {
    /// The line in the plugin file the exception comes from, when it does.
    pub(crate) line: Option<u32>,
    /// `Type: message`, for load errors and logs.
    pub(crate) described: String,
    /// The exception's own message, for an error reply.
    pub(crate) reply: String,
    /// The traceback, for the log.
    pub(crate) traceback: String,
    /// For `warren.CallError`: the error the script let through, rebuilt from its text.
    pub(crate) call_error: Option<CallError>,
}

impl PyFailure {
    pub(crate) fn of(py: Python<'_>, e: &PyErr, path: &Path) -> PyFailure {
        let read = || -> PyResult<PyFailure> {
            let info =
                helper(py)?
                    .getattr("error_info")?
                    .call1((e.value(py), e.traceback(py), path))?;
            let (line, described, reply, kind, traceback): (
                Option<u32>,
                String,
                String,
                Option<String>,
                String,
            ) = info.extract()?;
            let call_error = kind.map(|_| CallError::from_wire_text(&reply));
            Ok(PyFailure {
                line,
                described,
                reply,
                traceback,
                call_error,
            })
        };
        read().unwrap_or_else(|_| PyFailure {
            line: None,
            described: e.to_string(),
            reply: e.to_string(),
            traceback: e.to_string(),
            call_error: None,
        })
    }

    pub(crate) fn load_error(self, path: &Path) -> PluginError {
        PluginError::script(path, self.line, self.described)
    }

    /// The error a caller gets: a `warren.CallError` keeps its kind, any other exception is the
    /// script's own error with its message.
    pub(crate) fn call_error(self) -> CallError {
        self.call_error.unwrap_or(CallError::App(self.reply))
    }
}

/// Load the file at `path` as Python module `name`, with the host modules `injected` installed
/// in `sys.modules` and in the module's namespace. Takes the GIL itself (call it without).
pub(crate) fn load_file(
    path: &Path,
    name: &str,
    injected: impl FnOnce(Python<'_>) -> PyResult<Vec<(&'static str, Bound<'_, PyAny>)>>,
) -> Result<Py<PyModule>, PluginError> {
    if !path.is_file() {
        return Err(PluginError::Io {
            path: path.to_owned(),
            source: std::io::Error::new(std::io::ErrorKind::NotFound, "no such file"),
        });
    }
    let _one_at_a_time = LOADING.lock();
    Python::attach(|py| {
        let injected = injected(py).map_err(|e| PyFailure::of(py, &e, path).load_error(path))?;
        let run = || -> PyResult<Py<PyModule>> {
            let dict = PyDict::new(py);
            for (k, v) in injected {
                dict.set_item(k, v)?;
            }
            let m = helper(py)?.getattr("load")?.call1((path, name, dict))?;
            Ok(m.cast_into::<PyModule>()?.unbind())
        };
        run().map_err(|e| PyFailure::of(py, &e, path).load_error(path))
    })
}

/// The functions of `module` that are handlers (defined in the file, public, not hooks).
pub(crate) fn handler_names(module: &Bound<'_, PyModule>) -> PyResult<Vec<String>> {
    helper(module.py())?
        .getattr("handlers")?
        .call1((module, crate::module::HOOKS.to_vec()))?
        .extract()
}

/// A module-level function, when the module defines one by that name.
pub(crate) fn function(module: &Bound<'_, PyModule>, name: &str) -> Option<Py<PyAny>> {
    module
        .getattr(name)
        .ok()
        .filter(|f| f.is_callable())
        .map(Bound::unbind)
}

/// `warren.CallError`, for the `warren` module.
pub(crate) fn call_error_class(py: Python<'_>) -> PyResult<Bound<'_, PyAny>> {
    helper(py)?.getattr("CallError")
}

/// A Python exception for a failed node operation: `warren.CallError(kind, text)`.
pub(crate) fn raise(py: Python<'_>, e: CallError) -> PyErr {
    match call_error_class(py).and_then(|c| c.call1((e.kind().as_str(), e.wire_text()))) {
        Ok(exc) => PyErr::from_value(exc),
        Err(other) => other,
    }
}

/// Bytes as a `str` (UTF-8 with `surrogateescape`, so that every byte round-trips), or as
/// `bytes`.
pub(crate) fn text_or_bytes<'py>(
    py: Python<'py>,
    data: &[u8],
    as_bytes: bool,
) -> PyResult<Bound<'py, PyAny>> {
    if as_bytes {
        return Ok(PyBytes::new(py, data).into_any());
    }
    match std::str::from_utf8(data) {
        Ok(s) => Ok(PyString::new(py, s).into_any()),
        Err(_) => PyBytes::new(py, data).call_method1("decode", ("utf-8", "surrogateescape")),
    }
}

/// A `str` (encoded as [`text_or_bytes`] decodes), `bytes` or `bytearray` as bytes; `None` when
/// the value is none of those.
pub(crate) fn raw_bytes(v: &Bound<'_, PyAny>) -> PyResult<Option<Vec<u8>>> {
    if let Ok(s) = v.cast::<PyString>() {
        if let Ok(text) = s.to_str() {
            return Ok(Some(text.as_bytes().to_vec()));
        }
        let b = s.call_method1("encode", ("utf-8", "surrogateescape"))?;
        return Ok(Some(b.extract()?));
    }
    if v.is_instance_of::<PyBytes>() || v.is_instance_of::<pyo3::types::PyByteArray>() {
        return Ok(Some(v.extract()?));
    }
    Ok(None)
}

/// A Python value as JSON.
pub(crate) fn to_json(v: &Bound<'_, PyAny>) -> PyResult<Value> {
    let text: String = helper(v.py())?.getattr("dumps")?.call1((v,))?.extract()?;
    serde_json::from_str(&text).map_err(|e| pyo3::exceptions::PyValueError::new_err(e.to_string()))
}

/// JSON as a Python value.
pub(crate) fn from_json<'py>(py: Python<'py>, v: &Value) -> PyResult<Bound<'py, PyAny>> {
    match v {
        Value::Null => Ok(py.None().into_bound(py)),
        Value::String(s) => Ok(PyString::new(py, s).into_any()),
        other => helper(py)?.getattr("loads")?.call1((other.to_string(),)),
    }
}

/// A body for the node from a Python value: `str` and `bytes` as they are, `None` empty,
/// anything else as JSON.
pub(crate) fn body_bytes(v: &Bound<'_, PyAny>) -> PyResult<bytes::Bytes> {
    if v.is_none() {
        return Ok(bytes::Bytes::new());
    }
    if let Some(raw) = raw_bytes(v)? {
        return Ok(raw.into());
    }
    let json = to_json(v)?;
    Ok(serde_json::to_vec(&json)
        .map_err(|e| pyo3::exceptions::PyValueError::new_err(e.to_string()))?
        .into())
}

/// Run a node operation from a Python thread: the GIL is released, the future runs on the
/// runtime, the thread waits for its result. Before it waits, the thread delivers the results
/// of the calls it has finished and hands the rest of its batch to the other threads
/// ([`Pool`]), so that one waiting handler holds up no other call.
pub(crate) fn wait<T: Send + 'static>(
    py: Python<'_>,
    rt: &tokio::runtime::Handle,
    fut: impl Future<Output = Result<T, CallError>> + Send + 'static,
) -> PyResult<T> {
    worker::before_blocking();
    let rt = rt.clone();
    let r = py.detach(move || {
        let (tx, rx) = std::sync::mpsc::sync_channel(1);
        rt.spawn(async move {
            let _ = tx.send(fut.await);
        });
        rx.recv().unwrap_or(Err(CallError::Closed))
    });
    r.map_err(|e| raise(py, e))
}

/// Arguments of a closure given to Python: the `i`th positional one.
pub(crate) fn arg<'py>(args: &Bound<'py, PyTuple>, i: usize) -> PyResult<Bound<'py, PyAny>> {
    args.get_item(i)
}

type Job = Box<dyn FnOnce() + Send>;

/// Most calls one thread takes from the queue at a time and runs under one hold of the GIL.
const MAX_BATCH: usize = 32;

/// The threads a plugin's Python code runs on, and the bounded queue of calls waiting for them.
///
/// Each crossing between an async worker and a Python thread costs a wake-up, and where both
/// share a core, two context switches; a crossing per call made Python handlers a tenth as
/// fast as Rust ones (docs/benchmarks.md, "Plugins"). So many calls share each crossing:
/// - a call queued from the runtime does not wake a thread at once: the wake-up is a task
///   that yields once, so it runs after the async worker has read what its connections have
///   ready, and the thread finds all of it queued (a full batch wakes a thread at once);
/// - a thread takes up to [`MAX_BATCH`] calls and runs them under one hold of the GIL (the
///   other threads stay parked rather than contend for it);
/// - it delivers their results together, with one task on the runtime.
///
/// A call never waits on another: a handler that waits on the node ([`wait`]) first delivers
/// the results it holds and puts the rest of its batch back at the head of the queue for the
/// other threads, and a long handler delivers what came before it after a millisecond.
pub(crate) struct Pool {
    path: PathBuf,
    shared: Arc<Shared>,
}

/// What the callers and the threads of a pool share.
struct Shared {
    queue: parking_lot::Mutex<Queue>,
    /// Signalled when jobs are queued for a parked thread, or when the pool ends.
    ready: parking_lot::Condvar,
    /// Room in the queue: a caller takes a permit per job, a thread gives them back.
    room: tokio::sync::Semaphore,
    threads: usize,
}

#[derive(Default)]
struct Queue {
    jobs: std::collections::VecDeque<Job>,
    /// Threads waiting on `ready`.
    parked: usize,
    /// A wake-up is on its way (a deferred task, or a signal not yet taken).
    waking: bool,
    closed: bool,
}

impl Shared {
    /// Queue `job`; `defer` lets the wake-up of a parked thread wait for the runtime's next
    /// turn (see [`Pool`]).
    fn push(self: &Arc<Self>, job: Job, defer: bool) {
        let mut q = self.queue.lock();
        q.jobs.push_back(job);
        if q.parked == 0 || q.waking {
            return;
        }
        q.waking = true;
        let full = q.jobs.len() >= MAX_BATCH;
        drop(q);
        match tokio::runtime::Handle::try_current() {
            Ok(rt) if defer && !full => {
                let shared = self.clone();
                rt.spawn(async move {
                    tokio::task::yield_now().await;
                    shared.ready.notify_one();
                });
            }
            _ => {
                self.ready.notify_one();
            }
        }
    }

    /// The next batch for a thread; `None` once the pool has ended and nothing is left.
    fn take(&self) -> Option<Vec<Job>> {
        let mut q = self.queue.lock();
        loop {
            if !q.jobs.is_empty() {
                break;
            }
            if q.closed {
                return None;
            }
            q.parked += 1;
            self.ready.wait(&mut q);
            q.parked -= 1;
            q.waking = false;
        }
        let n = q.jobs.len().min(MAX_BATCH);
        let batch: Vec<Job> = q.jobs.drain(..n).collect();
        // more than one batch waiting: pass the wake-up on
        if !q.jobs.is_empty() && q.parked > 0 && !q.waking {
            q.waking = true;
            self.ready.notify_one();
        }
        drop(q);
        self.room.add_permits(n);
        Some(batch)
    }

    /// Put jobs a thread had taken back at the head of the queue, for another thread.
    fn hand_back(&self, jobs: std::collections::VecDeque<Job>) {
        let n = jobs.len();
        if n == 0 {
            return;
        }
        // they had their room; take it again without waiting (the queue may go over its bound
        // by these few, which were in it a moment ago)
        let _ = self.room.try_acquire_many(n as u32).map(|p| p.forget());
        let mut q = self.queue.lock();
        for job in jobs.into_iter().rev() {
            q.jobs.push_front(job);
        }
        if q.parked > 0 && !q.waking {
            q.waking = true;
            self.ready.notify_one();
        }
    }
}

impl Pool {
    /// Start `threads` threads for the plugin at `path`, with room for `queue` waiting jobs.
    pub(crate) fn start(
        path: &Path,
        threads: usize,
        queue: usize,
    ) -> Result<Arc<Pool>, PluginError> {
        let threads = threads.max(1);
        let shared = Arc::new(Shared {
            queue: parking_lot::Mutex::new(Queue::default()),
            ready: parking_lot::Condvar::new(),
            room: tokio::sync::Semaphore::new(queue.clamp(1, tokio::sync::Semaphore::MAX_PERMITS)),
            threads,
        });
        let stem = path
            .file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_default();
        for i in 0..threads {
            let shared = shared.clone();
            std::thread::Builder::new()
                .name(format!("py-{stem}-{i}"))
                .spawn(move || worker::run(shared))
                .map_err(|source| PluginError::Io {
                    path: path.to_owned(),
                    source,
                })?;
        }
        Ok(Arc::new(Pool {
            path: path.to_owned(),
            shared,
        }))
    }

    /// Run `f` on one of the threads and wait for its result, without blocking the caller's
    /// thread.
    pub(crate) async fn run<R: Send + 'static>(
        &self,
        f: impl FnOnce() -> R + Send + 'static,
    ) -> Result<R, CallError> {
        self.shared
            .room
            .acquire()
            .await
            .map_err(|_| CallError::Closed)?
            .forget();
        let (tx, rx) = oneshot::channel();
        let rt = tokio::runtime::Handle::try_current().ok();
        self.shared.push(
            Box::new(move || {
                let r = f();
                worker::deliver(
                    rt,
                    Box::new(move || {
                        let _ = tx.send(r);
                    }),
                );
            }),
            true,
        );
        rx.await.map_err(|_| CallError::Closed)
    }

    /// Queue `f` for one of the threads, waiting only for room in the queue: for a job that
    /// hands its results back itself (a session's calls in order, [`worker::deliver`]).
    pub(crate) async fn queue(&self, f: impl FnOnce() + Send + 'static) -> Result<(), CallError> {
        self.shared
            .room
            .acquire()
            .await
            .map_err(|_| CallError::Closed)?
            .forget();
        self.shared.push(Box::new(f), true);
        Ok(())
    }

    /// Run `f` on one of the threads and block until it is done: for loading, outside any hot
    /// path.
    pub(crate) fn run_blocking<R: Send + 'static>(
        &self,
        f: impl FnOnce() -> R + Send + 'static,
    ) -> Result<R, PluginError> {
        let stopped = || PluginError::Stopped {
            path: self.path.clone(),
        };
        self.shared
            .room
            .try_acquire()
            .map_err(|_| stopped())?
            .forget();
        let (tx, rx) = std::sync::mpsc::sync_channel(1);
        self.shared.push(
            Box::new(move || {
                let _ = tx.send(f());
            }),
            false,
        );
        rx.recv().map_err(|_| stopped())
    }
}

impl Drop for Pool {
    /// The threads finish what is queued, then end.
    fn drop(&mut self) {
        self.shared.queue.lock().closed = true;
        self.shared.room.close();
        self.shared.ready.notify_all();
    }
}

/// A plugin thread's loop and the state of the batch it runs.
mod worker {
    use std::cell::RefCell;
    use std::collections::VecDeque;
    use std::sync::Arc;
    use std::time::{Duration, Instant};

    use pyo3::Python;

    use super::{Job, MAX_BATCH, Shared};

    /// A finished call's result on its way to the caller.
    pub(super) type Delivery = Box<dyn FnOnce() + Send>;

    /// How long results may wait for the rest of their batch.
    const HOLD: Duration = Duration::from_millis(1);

    struct State {
        shared: Arc<Shared>,
        batch: VecDeque<Job>,
        done: Vec<Delivery>,
        rt: Option<tokio::runtime::Handle>,
        since: Instant,
    }

    thread_local! {
        static STATE: RefCell<Option<State>> = const { RefCell::new(None) };
    }

    /// The thread's loop: take a batch, run it under one hold of the GIL, deliver its results.
    pub(super) fn run(shared: Arc<Shared>) {
        STATE.with_borrow_mut(|s| {
            *s = Some(State {
                shared: shared.clone(),
                batch: VecDeque::with_capacity(MAX_BATCH),
                done: Vec::with_capacity(MAX_BATCH),
                rt: None,
                since: Instant::now(),
            })
        });
        while let Some(batch) = shared.take() {
            STATE.with_borrow_mut(|s| {
                if let Some(s) = s {
                    s.batch.extend(batch);
                    s.since = Instant::now();
                }
            });
            Python::attach(|_py| {
                while let Some(job) = next() {
                    if std::panic::catch_unwind(std::panic::AssertUnwindSafe(job)).is_err() {
                        tracing::error!("a Python plugin job panicked");
                    }
                }
            });
            flush();
        }
        STATE.with_borrow_mut(|s| *s = None);
    }

    /// The batch's next job; first the results of the ones before, if they waited long enough.
    fn next() -> Option<Job> {
        let late = STATE.with_borrow(|s| s.as_ref().is_some_and(|s| s.since.elapsed() > HOLD));
        if late {
            flush();
        }
        STATE.with_borrow_mut(|s| s.as_mut().and_then(|s| s.batch.pop_front()))
    }

    /// Hand a finished call's result over: kept for the end of the batch on a plugin thread,
    /// delivered at once elsewhere.
    pub(super) fn deliver(rt: Option<tokio::runtime::Handle>, d: Delivery) {
        let d = STATE.with_borrow_mut(|s| match s {
            Some(s) => {
                if s.rt.is_none() {
                    s.rt = rt;
                }
                s.done.push(d);
                None
            }
            None => Some(d),
        });
        if let Some(d) = d {
            d();
        }
    }

    /// Deliver the results held: with one task on the runtime for the lot, so that the async
    /// side wakes once.
    fn flush() {
        let (done, rt) = STATE.with_borrow_mut(|s| match s {
            Some(s) => {
                s.since = Instant::now();
                (std::mem::take(&mut s.done), s.rt.clone())
            }
            None => (Vec::new(), None),
        });
        match (done.len(), rt) {
            (0, _) => {}
            (1, _) | (_, None) => done.into_iter().for_each(|d| d()),
            (_, Some(rt)) => {
                rt.spawn(async move { done.into_iter().for_each(|d| d()) });
            }
        }
    }

    /// Before a job blocks on the node: deliver what is done, and put the rest of the batch
    /// back at the head of the queue for the other threads (when there are any).
    pub(super) fn before_blocking() {
        flush();
        let rest = STATE.with_borrow_mut(|s| match s {
            Some(s) if s.shared.threads > 1 && !s.batch.is_empty() => {
                Some((std::mem::take(&mut s.batch), s.shared.clone()))
            }
            _ => None,
        });
        if let Some((rest, shared)) = rest {
            shared.hand_back(rest);
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    /// Two calls in one batch, the first waiting on the node for something only the second
    /// does: the first hands the second back, another thread runs it, neither waits forever.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_waiting_call_hands_the_rest_of_its_batch_to_another_thread() {
        let pool = Pool::start(Path::new("handback.py"), 2, 64).expect("pool");
        for _ in 0..20 {
            let (tx, rx) = oneshot::channel::<()>();
            let rt = tokio::runtime::Handle::current();
            let waits = pool.run(move || {
                Python::attach(|py| {
                    wait(
                        py,
                        &rt,
                        async move { rx.await.map_err(|_| CallError::Closed) },
                    )
                    .is_ok()
                })
            });
            let frees = pool.run(move || tx.send(()).is_ok());
            let both = tokio::time::timeout(Duration::from_secs(10), async {
                tokio::join!(waits, frees)
            })
            .await
            .expect("a call waited on a call queued behind it");
            assert!(matches!(both, (Ok(true), Ok(true))));
        }
    }

    /// Results come back to every caller of a burst, whichever batch ran it.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn every_call_of_a_burst_gets_its_result() {
        let pool = Pool::start(Path::new("burst.py"), 1, 1024).expect("pool");
        let calls: Vec<_> = (0..500).map(|i| pool.run(move || i * 2)).collect();
        let results = futures_util::future::join_all(calls).await;
        for (i, r) in results.into_iter().enumerate() {
            assert_eq!(r.expect("result"), i * 2);
        }
    }
}

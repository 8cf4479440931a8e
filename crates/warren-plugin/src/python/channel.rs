//! Python channel handlers (docs/protocols/line.md, "Python"): a module `channel` with
//! `send(id, msg)`, `close(id)`, `set_data(id, obj)`, `get_data(id)` and `peer(id)`, installed
//! before the file is imported (so ffown's `import channel` works unmodified); then the file's
//! `handle_connect(id)`, `handle_msg(id, msg)` and `handle_broken(id)` are called on the
//! plugin's thread, `msg` a `str` (surrogateescape) or `bytes`.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use bytes::Bytes;
use pyo3::prelude::*;
use pyo3::types::{PyCFunction, PyDict, PyModule, PyTuple};
use serde_json::Value;
use warren::gate::line::Channel;

use super::{PyFailure, arg};
use crate::channel::{ChannelShared, ChannelVersion};
use crate::{ChannelPluginOptions, MsgType, PluginError};

/// A Python object a plugin attached to a channel (the interpreter outlives every version, so a
/// reload's new version reads what the old one stored).
struct PyData(Py<PyAny>);

/// One loaded version: the module and its entry points.
pub(crate) struct PyChannel {
    path: PathBuf,
    as_bytes: bool,
    handle_connect: Option<Py<PyAny>>,
    handle_msg: Py<PyAny>,
    handle_broken: Option<Py<PyAny>>,
    export_state: Option<Py<PyAny>>,
    import_state: Option<Py<PyAny>>,
}

/// Import the file with this plugin's `channel` module in place.
pub(crate) fn load(
    path: &Path,
    options: &ChannelPluginOptions,
    shared: &Arc<ChannelShared>,
) -> Result<Arc<dyn ChannelVersion>, PluginError> {
    let name = path
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_else(|| "plugin".into());
    let module = super::load_file(path, &name, |py| {
        Ok(vec![("channel", channel_module(py, shared)?.into_any())])
    })?;
    Python::attach(|py| {
        let m = module.bind(py);
        let handle_msg =
            super::function(m, "handle_msg").ok_or_else(|| PluginError::MissingEntry {
                path: path.to_owned(),
                name: "handle_msg",
            })?;
        let handle_broken = super::function(m, "handle_broken");
        if handle_broken.is_none() {
            tracing::debug!(plugin = %path.display(), "no handle_broken: disconnects are not reported");
        }
        Ok(Arc::new(PyChannel {
            path: path.to_owned(),
            as_bytes: options.python_msg_type == MsgType::Bytes,
            handle_connect: super::function(m, "handle_connect"),
            handle_msg,
            handle_broken,
            export_state: super::function(m, "export_state"),
            import_state: super::function(m, "import_state"),
        }) as Arc<dyn ChannelVersion>)
    })
}

fn id_arg(args: &Bound<'_, PyTuple>) -> PyResult<u64> {
    // a negative or non-integer id names no channel
    Ok(arg(args, 0)?
        .extract::<i64>()
        .ok()
        .and_then(|i| u64::try_from(i).ok())
        .unwrap_or(0))
}

/// The `channel` module of one plugin, bound to its live channels.
fn channel_module<'py>(
    py: Python<'py>,
    shared: &Arc<ChannelShared>,
) -> PyResult<Bound<'py, PyModule>> {
    let m = PyModule::new(py, "channel")?;
    let s = shared.clone();
    m.setattr(
        "send",
        PyCFunction::new_closure(
            py,
            Some(c"send"),
            Some(c"send(id, msg) -> 0 when queued, -1 for an unknown or closed channel"),
            move |args: &Bound<'_, PyTuple>, _: Option<&Bound<'_, PyDict>>| -> PyResult<i32> {
                let id = id_arg(args)?;
                let msg = arg(args, 1)?;
                let Some(data) = super::raw_bytes(&msg)? else {
                    return Err(pyo3::exceptions::PyTypeError::new_err(
                        "channel.send takes a str or bytes message",
                    ));
                };
                Ok(s.send(id, Bytes::from(data)))
            },
        )?,
    )?;
    let s = shared.clone();
    m.setattr(
        "close",
        PyCFunction::new_closure(
            py,
            Some(c"close"),
            Some(c"close(id) -> 0, or -1 for an unknown channel"),
            move |args: &Bound<'_, PyTuple>, _: Option<&Bound<'_, PyDict>>| -> PyResult<i32> {
                Ok(s.close(id_arg(args)?))
            },
        )?,
    )?;
    let s = shared.clone();
    m.setattr(
        "peer",
        PyCFunction::new_closure(
            py,
            Some(c"peer"),
            Some(c"peer(id) -> 'ip:port' of the client, or None"),
            move |args: &Bound<'_, PyTuple>,
                  _: Option<&Bound<'_, PyDict>>|
                  -> PyResult<Option<String>> {
                Ok(s.get(id_arg(args)?).map(|c| c.peer().to_string()))
            },
        )?,
    )?;
    let s = shared.clone();
    m.setattr(
        "set_data",
        PyCFunction::new_closure(
            py,
            Some(c"set_data"),
            Some(c"set_data(id, obj): attach obj to the channel (None clears it)"),
            move |args: &Bound<'_, PyTuple>, _: Option<&Bound<'_, PyDict>>| -> PyResult<i32> {
                let Some(c) = s.get(id_arg(args)?) else {
                    return Ok(-1);
                };
                let v = arg(args, 1)?;
                if v.is_none() {
                    c.set_data(None);
                } else {
                    c.set_data(Some(Arc::new(PyData(v.unbind()))));
                }
                Ok(0)
            },
        )?,
    )?;
    let s = shared.clone();
    m.setattr(
        "get_data",
        PyCFunction::new_closure(
            py,
            Some(c"get_data"),
            Some(c"get_data(id) -> what set_data attached, or None"),
            move |args: &Bound<'_, PyTuple>,
                  _: Option<&Bound<'_, PyDict>>|
                  -> PyResult<Py<PyAny>> {
                let py = args.py();
                let data = s.get(id_arg(args)?).and_then(|c| c.get_data());
                Ok(
                    match data.as_deref().and_then(|d| d.downcast_ref::<PyData>()) {
                        Some(PyData(v)) => v.clone_ref(py),
                        None => py.None(),
                    },
                )
            },
        )?,
    )?;
    Ok(m)
}

impl PyChannel {
    fn call(
        &self,
        f: &Py<PyAny>,
        args: impl for<'py> FnOnce(Python<'py>) -> PyResult<Bound<'py, PyTuple>>,
    ) -> Result<(), String> {
        Python::attach(|py| {
            let r = args(py).and_then(|a| f.bind(py).call1(a));
            r.map(|_| ())
                .map_err(|e| PyFailure::of(py, &e, &self.path).traceback)
        })
    }
}

impl ChannelVersion for PyChannel {
    fn connect(&self, channel: &Channel) -> Result<(), String> {
        match &self.handle_connect {
            Some(f) => self.call(f, |py| PyTuple::new(py, [channel.id()])),
            None => Ok(()),
        }
    }

    fn msg(&self, channel: &Channel, msg: Bytes) -> Result<(), String> {
        let as_bytes = self.as_bytes;
        self.call(&self.handle_msg, |py| {
            let m = super::text_or_bytes(py, &msg, as_bytes)?;
            PyTuple::new(py, [channel.id().into_pyobject(py)?.into_any(), m])
        })
    }

    fn broken(&self, channel: &Channel) -> Result<(), String> {
        match &self.handle_broken {
            Some(f) => self.call(f, |py| PyTuple::new(py, [channel.id()])),
            None => Ok(()),
        }
    }

    fn export_state(&self) -> Result<Option<Value>, String> {
        let Some(f) = &self.export_state else {
            return Ok(None);
        };
        Python::attach(|py| {
            let v = f
                .bind(py)
                .call0()
                .map_err(|e| PyFailure::of(py, &e, &self.path).described)?;
            super::to_json(&v).map(Some).map_err(|e| e.to_string())
        })
    }

    fn imports_state(&self) -> bool {
        self.import_state.is_some()
    }

    fn import_state(&self, state: Value) -> Result<(), String> {
        let Some(f) = &self.import_state else {
            return Ok(());
        };
        Python::attach(|py| {
            let v = super::from_json(py, &state).map_err(|e| e.to_string())?;
            f.bind(py).call1((v,)).map(|_| ()).map_err(|e| {
                let failure = PyFailure::of(py, &e, &self.path);
                match failure.line {
                    Some(l) => format!("line {l}: {}", failure.described),
                    None => failure.described,
                }
            })
        })
    }
}

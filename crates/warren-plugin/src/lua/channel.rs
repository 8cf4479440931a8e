//! Lua channel handlers (docs/protocols/line.md, "Lua"): a global table `channel` with
//! `send(id, msg)`, `close(id)`, `set_data(id, v)`, `get_data(id)` and `peer(id)`; the file runs
//! once; then the globals `handle_connect(id)`, `handle_msg(id, msg)` and `handle_broken(id)` are
//! called, `msg` a string holding the message's bytes as they came.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use bytes::Bytes;
use mlua::{Function, Integer, Lua};
use serde_json::Value;
use warren::gate::line::Channel;

use super::Budget;
use crate::channel::{ChannelShared, ChannelVersion};
use crate::{ChannelPluginOptions, PluginError};

/// A value a Lua plugin attached to a channel: kept as JSON, so it outlives the Lua state (a
/// reload's new version reads what the old one stored).
struct LuaData(Value);

/// One loaded version: its own state and the entry points it defined.
pub(crate) struct LuaChannel {
    path: PathBuf,
    lua: Lua,
    budget: Arc<Budget>,
    handle_connect: Option<Function>,
    handle_msg: Function,
    handle_broken: Option<Function>,
    export_state: Option<Function>,
    import_state: Option<Function>,
}

/// Load the file into a new state.
pub(crate) fn load(
    path: &Path,
    options: &ChannelPluginOptions,
    shared: &Arc<ChannelShared>,
) -> Result<Arc<dyn ChannelVersion>, PluginError> {
    let budget = Budget::new(options.max_instructions, options.time_limit);
    let lua = super::new_state(path, &budget)?;
    install_channel_table(&lua, shared).map_err(|e| super::load_error(path, &e))?;
    super::exec_file(&lua, path, &budget)?;
    let globals = lua.globals();
    let get = |name: &str| globals.get::<Option<Function>>(name).ok().flatten();
    let handle_msg = get("handle_msg").ok_or_else(|| PluginError::MissingEntry {
        path: path.to_owned(),
        name: "handle_msg",
    })?;
    let handle_broken = get("handle_broken");
    if handle_broken.is_none() {
        tracing::debug!(plugin = %path.display(), "no handle_broken: disconnects are not reported");
    }
    Ok(Arc::new(LuaChannel {
        path: path.to_owned(),
        handle_connect: get("handle_connect"),
        handle_msg,
        handle_broken,
        export_state: get("export_state"),
        import_state: get("import_state"),
        lua,
        budget,
    }))
}

/// The global `channel` table, bound to this plugin's live channels.
fn install_channel_table(lua: &Lua, shared: &Arc<ChannelShared>) -> mlua::Result<()> {
    let t = lua.create_table()?;
    let s = shared.clone();
    t.set(
        "send",
        lua.create_function(move |_, (id, msg): (Integer, mlua::LuaString)| {
            let Ok(id) = u64::try_from(id) else {
                return Ok(-1);
            };
            Ok(s.send(id, Bytes::copy_from_slice(&msg.as_bytes())))
        })?,
    )?;
    let s = shared.clone();
    t.set(
        "close",
        lua.create_function(move |_, id: Integer| {
            Ok(u64::try_from(id).map_or(-1, |id| s.close(id)))
        })?,
    )?;
    let s = shared.clone();
    t.set(
        "peer",
        lua.create_function(move |_, id: Integer| {
            Ok(u64::try_from(id)
                .ok()
                .and_then(|id| s.get(id))
                .map(|c| c.peer().to_string()))
        })?,
    )?;
    let s = shared.clone();
    t.set(
        "set_data",
        lua.create_function(move |lua, (id, v): (Integer, mlua::Value)| {
            let Some(c) = u64::try_from(id).ok().and_then(|id| s.get(id)) else {
                return Ok(-1);
            };
            if v.is_nil() {
                c.set_data(None);
            } else {
                c.set_data(Some(Arc::new(LuaData(super::to_json(lua, v)?))));
            }
            Ok(0)
        })?,
    )?;
    let s = shared.clone();
    t.set(
        "get_data",
        lua.create_function(move |lua, id: Integer| {
            let data = u64::try_from(id)
                .ok()
                .and_then(|id| s.get(id))
                .and_then(|c| c.get_data());
            match data.as_deref().and_then(|d| d.downcast_ref::<LuaData>()) {
                Some(LuaData(v)) => super::from_json(lua, v),
                None => Ok(mlua::Value::Nil),
            }
        })?,
    )?;
    lua.globals().set("channel", t)
}

fn id_of(ch: &Channel) -> Integer {
    // ids stay below 2^53 (docs/protocols/line.md), well inside an i64
    Integer::try_from(ch.id()).unwrap_or(Integer::MAX)
}

impl LuaChannel {
    /// Call an entry point within the budget; the error text carries the traceback.
    fn call(&self, f: &Function, args: impl mlua::IntoLuaMulti) -> Result<(), String> {
        self.budget.arm();
        let r = f.call::<mlua::MultiValue>(args);
        let tripped = self.budget.disarm();
        match (r, tripped) {
            (Ok(_), _) => Ok(()),
            (Err(_), Some(why)) => Err(self.budget.describe(why)),
            (Err(e), None) => Err(e.to_string()),
        }
    }
}

impl ChannelVersion for LuaChannel {
    fn connect(&self, channel: &Channel) -> Result<(), String> {
        match &self.handle_connect {
            Some(f) => self.call(f, id_of(channel)),
            None => Ok(()),
        }
    }

    fn msg(&self, channel: &Channel, msg: Bytes) -> Result<(), String> {
        let msg = self.lua.create_string(&msg).map_err(|e| e.to_string())?;
        self.call(&self.handle_msg, (id_of(channel), msg))
    }

    fn broken(&self, channel: &Channel) -> Result<(), String> {
        match &self.handle_broken {
            Some(f) => self.call(f, id_of(channel)),
            None => Ok(()),
        }
    }

    fn export_state(&self) -> Result<Option<Value>, String> {
        let Some(f) = &self.export_state else {
            return Ok(None);
        };
        self.budget.arm();
        let r = f.call::<mlua::Value>(());
        let tripped = self.budget.disarm();
        if let Some(why) = tripped {
            return Err(self.budget.describe(why));
        }
        let v = r.map_err(|e| e.to_string())?;
        super::to_json(&self.lua, v)
            .map(Some)
            .map_err(|e| e.to_string())
    }

    fn imports_state(&self) -> bool {
        self.import_state.is_some()
    }

    fn import_state(&self, state: Value) -> Result<(), String> {
        let Some(f) = &self.import_state else {
            return Ok(());
        };
        let v = super::from_json(&self.lua, &state).map_err(|e| e.to_string())?;
        self.call(f, v).map_err(|e| {
            let (line, msg) = super::split_position(&e, &super::chunk_name(&self.path));
            match line {
                Some(l) => format!("line {l}: {msg}"),
                None => msg,
            }
        })
    }
}

impl std::fmt::Debug for LuaChannel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LuaChannel")
            .field("path", &self.path)
            .finish_non_exhaustive()
    }
}

//! The Lua host (Lua 5.4 through mlua): what channel handlers and modules share — a fresh state
//! with the plugin's directory on `package.path`, the budget that stops a runaway call, loading
//! the file with errors that name its line, and values to and from JSON.

pub(crate) mod channel;
pub(crate) mod module;

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU8, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use mlua::{HookTriggers, Lua, LuaSerdeExt, VmState};
use warren::CallError;

use crate::PluginError;

/// The hook runs every this many instructions: often enough to stop a loop within a few
/// microseconds of its budget, rarely enough to cost nothing measurable.
const HOOK_EVERY: u32 = 1000;

/// Why the budget stopped a call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Tripped {
    Instructions,
    Time,
}

/// The allowance of the call running on one Lua state: instructions left and a deadline,
/// checked by an instruction-count hook. A state runs one call at a time, so one budget each.
pub(crate) struct Budget {
    max_instructions: u64,
    limit: Duration,
    armed: AtomicBool,
    left: AtomicI64,
    /// When the budget was made: `deadline` counts from it.
    epoch: Instant,
    /// The running call's deadline, in nanoseconds after `epoch` (`u64::MAX`: none).
    deadline: AtomicU64,
    /// 0: running; 1: out of instructions; 2: out of time.
    tripped: AtomicU8,
}

impl Budget {
    pub(crate) fn new(max_instructions: u64, limit: Duration) -> Arc<Budget> {
        Arc::new(Budget {
            max_instructions,
            limit,
            armed: AtomicBool::new(false),
            left: AtomicI64::new(0),
            epoch: Instant::now(),
            deadline: AtomicU64::new(u64::MAX),
            tripped: AtomicU8::new(0),
        })
    }

    /// Start a call's allowance.
    pub(crate) fn arm(&self) {
        self.left.store(
            i64::try_from(self.max_instructions).unwrap_or(i64::MAX),
            Ordering::Relaxed,
        );
        let deadline = self.epoch.elapsed().saturating_add(self.limit);
        self.deadline.store(
            u64::try_from(deadline.as_nanos()).unwrap_or(u64::MAX),
            Ordering::Relaxed,
        );
        self.tripped.store(0, Ordering::Relaxed);
        self.armed.store(true, Ordering::Release);
    }

    /// End the call's allowance; says whether (and why) the budget stopped it.
    pub(crate) fn disarm(&self) -> Option<Tripped> {
        self.armed.store(false, Ordering::Release);
        match self.tripped.load(Ordering::Acquire) {
            1 => Some(Tripped::Instructions),
            2 => Some(Tripped::Time),
            _ => None,
        }
    }

    /// The hook: count, and stop the call once it is over either limit.
    fn check(&self) -> mlua::Result<VmState> {
        if !self.armed.load(Ordering::Acquire) {
            return Ok(VmState::Continue);
        }
        let left = self
            .left
            .fetch_sub(i64::from(HOOK_EVERY), Ordering::Relaxed)
            - i64::from(HOOK_EVERY);
        if left <= 0 {
            self.tripped.store(1, Ordering::Release);
            return Err(mlua::Error::runtime(format!(
                "stopped after {} instructions (the plugin's max_instructions)",
                self.max_instructions
            )));
        }
        let deadline = self.deadline.load(Ordering::Relaxed);
        if deadline != u64::MAX
            && u64::try_from(self.epoch.elapsed().as_nanos()).unwrap_or(u64::MAX) >= deadline
        {
            self.tripped.store(2, Ordering::Release);
            return Err(mlua::Error::runtime(format!(
                "stopped after {:?} (the plugin's time_limit)",
                self.limit
            )));
        }
        Ok(VmState::Continue)
    }

    /// What a caller is told about a call the budget stopped.
    pub(crate) fn describe(&self, why: Tripped) -> String {
        match why {
            Tripped::Instructions => format!(
                "stopped after {} instructions (max_instructions)",
                self.max_instructions
            ),
            Tripped::Time => format!("stopped after {:?} (time_limit)", self.limit),
        }
    }
}

/// A fresh state for the plugin at `path`: the standard libraries, `<dir>/?.lua` appended to
/// `package.path` (ffown did the same), the budget's hook on every coroutine, and the
/// generational collector: a handler's garbage (its `session` object, the body, the result)
/// dies young, and the incremental collector's steps were the largest single cost of a call
/// (docs/benchmarks.md, "Plugins").
pub(crate) fn new_state(path: &Path, budget: &Arc<Budget>) -> Result<Lua, PluginError> {
    let lua = Lua::new();
    lua.gc_set_mode(mlua::prelude::LuaGcMode::Generational(
        mlua::prelude::LuaGcGenParams::default(),
    ));
    let hook_budget = budget.clone();
    lua.set_global_hook(
        HookTriggers::new().every_nth_instruction(HOOK_EVERY),
        move |_lua, _debug| hook_budget.check(),
    )
    .map_err(|e| PluginError::script(path, None, e.to_string()))?;
    let dir = path
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let entry = format!(";{}/?.lua", dir.display());
    let set_path = || -> mlua::Result<()> {
        let package: mlua::Table = lua.globals().get("package")?;
        let current: String = package.get("path")?;
        package.set("path", current + &entry)
    };
    set_path().map_err(|e| PluginError::script(path, None, e.to_string()))?;
    Ok(lua)
}

/// The chunk name errors are reported under: the file name, short enough that Lua never
/// abbreviates it, so a message's position can be told apart from another file's.
pub(crate) fn chunk_name(path: &Path) -> String {
    path.file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| path.display().to_string())
}

/// Run the file's top level once (within the budget).
pub(crate) fn exec_file(lua: &Lua, path: &Path, budget: &Budget) -> Result<(), PluginError> {
    let source = std::fs::read(path).map_err(|source| PluginError::Io {
        path: path.to_owned(),
        source,
    })?;
    let chunk = chunk_name(path);
    budget.arm();
    let r = lua.load(source).set_name(format!("@{chunk}")).exec();
    let tripped = budget.disarm();
    match (r, tripped) {
        (Ok(()), _) => Ok(()),
        (Err(_), Some(why)) => Err(PluginError::script(path, None, budget.describe(why))),
        (Err(e), None) => Err(load_error(path, &e)),
    }
}

/// A load error (syntax, or raised by the top level, `on_init`, `import_state`) with the line
/// it points at in this file.
pub(crate) fn load_error(path: &Path, e: &mlua::Error) -> PluginError {
    let chunk = chunk_name(path);
    let text = match e {
        mlua::Error::SyntaxError { message, .. } => message.clone(),
        other => message_of(other),
    };
    let (line, message) = split_position(&text, &chunk);
    PluginError::script(path, line, message)
}

/// The message a script raised, without mlua's wrapping and without the traceback.
pub(crate) fn message_of(e: &mlua::Error) -> String {
    let text = match e {
        mlua::Error::RuntimeError(m) => m.clone(),
        mlua::Error::CallbackError { cause, .. } => return message_of(cause),
        mlua::Error::WithContext { cause, .. } => return message_of(cause),
        mlua::Error::ExternalError(x) => x.to_string(),
        other => other.to_string(),
    };
    match text.split_once("\nstack traceback:") {
        Some((msg, _)) => msg.to_owned(),
        None => text,
    }
}

/// `greeter.lua:3: boom` → (Some(3), "boom") when the position is in `chunk`; anything else is
/// returned whole.
pub(crate) fn split_position(text: &str, chunk: &str) -> (Option<u32>, String) {
    let parsed = text
        .strip_prefix(chunk)
        .and_then(|rest| rest.strip_prefix(':'))
        .and_then(|rest| rest.split_once(':'))
        .and_then(|(line, msg)| Some((line.parse::<u32>().ok()?, msg.trim_start())));
    match parsed {
        Some((line, msg)) => (Some(line), msg.to_owned()),
        None => (None, text.to_owned()),
    }
}

/// The error a caller gets for a failed Lua call: a `CallError` the script let through from
/// `warren.call` keeps its kind; anything else is the script's own error, its message without
/// this file's position (the log has the whole traceback).
pub(crate) fn call_error(e: &mlua::Error, chunk: &str) -> CallError {
    if let Some(ce) = e.downcast_ref::<CallError>() {
        return ce.clone();
    }
    let (_, message) = split_position(&message_of(e), chunk);
    CallError::App(message)
}

/// A Lua value as JSON (strings must be UTF-8; functions and userdata cannot be encoded). A
/// table's keys come out in sorted order: a Lua table has no order of its own, and a reply or
/// push must read the same every time (mqant's Go maps were sorted the same way).
pub(crate) fn to_json(lua: &Lua, v: mlua::Value) -> mlua::Result<serde_json::Value> {
    let mut json = lua.from_value(v)?;
    sort_keys(&mut json);
    Ok(json)
}

/// Sort the keys of every object in `v`.
fn sort_keys(v: &mut serde_json::Value) {
    match v {
        serde_json::Value::Object(map) => {
            map.sort_keys();
            map.values_mut().for_each(sort_keys);
        }
        serde_json::Value::Array(items) => items.iter_mut().for_each(sort_keys),
        _ => {}
    }
}

/// JSON as a Lua value (`null` is `nil`).
pub(crate) fn from_json(lua: &Lua, v: &serde_json::Value) -> mlua::Result<mlua::Value> {
    if v.is_null() {
        return Ok(mlua::Value::Nil);
    }
    lua.to_value(v)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tables_become_json_objects_with_sorted_keys() {
        let lua = Lua::new();
        let v: mlua::Value = lua
            .load("return { target = '*', from = 'a', msg = { z = 1, a = { 2, 3 } }, roomName = 'r' }")
            .eval()
            .expect("a table");
        let json = to_json(&lua, v).expect("JSON");
        assert_eq!(
            serde_json::to_string(&json).expect("text"),
            r#"{"from":"a","msg":{"a":[2,3],"z":1},"roomName":"r","target":"*"}"#
        );
    }

    #[test]
    fn positions_in_the_plugin_file_are_split_off() {
        assert_eq!(
            split_position("greeter.lua:3: boom", "greeter.lua"),
            (Some(3), "boom".to_owned())
        );
        assert_eq!(
            split_position("other.lua:3: boom", "greeter.lua"),
            (None, "other.lua:3: boom".to_owned())
        );
        assert_eq!(
            split_position("plain", "greeter.lua"),
            (None, "plain".to_owned())
        );
    }

    #[test]
    fn a_runaway_top_level_is_stopped_with_its_reason() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("loop.lua");
        std::fs::write(&path, "while true do end\n").expect("write");
        let budget = Budget::new(100_000, Duration::from_secs(5));
        let lua = new_state(&path, &budget).expect("state");
        let e = exec_file(&lua, &path, &budget).expect_err("stopped");
        assert!(e.to_string().contains("100000 instructions"), "{e}");
    }

    #[test]
    fn syntax_errors_name_the_line() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("bad.lua");
        std::fs::write(&path, "local a = 1\nfunction handle_msg(\n").expect("write");
        let budget = Budget::new(100_000, Duration::from_secs(5));
        let lua = new_state(&path, &budget).expect("state");
        let e = exec_file(&lua, &path, &budget).expect_err("syntax error");
        assert_eq!(e.line(), Some(3), "{e}");
    }
}

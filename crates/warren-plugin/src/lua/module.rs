//! Lua modules: a pool of states, each running the script once, each running one call at a time.
//! A handler is a global function `(session, msg)`; `session` is a userdata with the session
//! operations; the global table `warren` reaches the node. Calls that wait on the node
//! (`warren.call`, `session:bind`, …) are async functions: the handler's coroutine yields and
//! its task waits, no thread is held.

use std::collections::{HashMap, VecDeque};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use bytes::Bytes;
use futures_util::future::BoxFuture;
use mlua::{Function, Lua, UserData, UserDataFields, UserDataMethods, UserDataRef};
use parking_lot::Mutex;
use serde_json::Value;
use tokio::sync::oneshot;
use warren::error::Detail;
use warren::{CallError, Services, Session};

use super::{Budget, Tripped};
use crate::module::{
    CallCx, ModuleVersion, decode_reply, is_handler_name, json_body, json_reply, node_of, rpc_args,
    rpc_timeout,
};
use crate::{ModulePluginOptions, MsgType, PluginError};

/// One Lua state of the pool, with what its calls need.
struct State {
    lua: Lua,
    budget: Arc<Budget>,
    /// The call this state runs (for `warren.call` and the rooms), or the hook.
    current: Arc<Mutex<Option<CallCx>>>,
    functions: HashMap<String, Function>,
    /// The serial of the last handler patch applied to this state.
    patched: u64,
    /// The coroutine this state's calls run in, reset for each call: a handler may wait
    /// (`warren.call`, `session:bind`, …), so it runs in a coroutine, and one kept for the
    /// state costs a reset where a new one per call cost an allocation and the collector's
    /// work (docs/benchmarks.md, "Plugins").
    thread: mlua::Thread,
    /// What `thread` is reset to when a call is abandoned.
    idle: Function,
    /// Set while a call runs in `thread`; still set when the call's future was dropped while
    /// the handler waited (its deadline), which [`State::abandon`] cleans up.
    busy: AtomicBool,
    /// The `session` objects of recent calls, by session id: a session's next call on this
    /// state gets the same object with the new snapshot, instead of a new object (an allocation
    /// and garbage per call). Emptied when full; a closed session's entry is dropped.
    sessions: Mutex<HashMap<warren::SessionId, CachedSession>>,
}

/// A `session` object kept by a state ([`State::sessions`]), with its snapshot cell, so that the
/// next call updates the snapshot without going through Lua to reach the object's data.
struct CachedSession {
    object: mlua::AnyUserData,
    snapshot: Arc<Snapshot>,
}

/// Most `session` objects one Lua state keeps for reuse ([`State::sessions`]).
const CACHED_SESSIONS: usize = 1024;

impl State {
    /// Start `f` with `args` in the state's coroutine: a future that runs it until it returns,
    /// waiting where it waits.
    fn start(
        &self,
        f: &Function,
        args: impl mlua::IntoLuaMulti,
    ) -> mlua::Result<mlua::thread::AsyncThread<mlua::Value>> {
        self.reset_to(f)?;
        self.thread.clone().into_async(args)
    }

    /// Start handler `f` with the caller's `session` object (see [`State::sessions`]) and
    /// `msg`.
    fn start_handler(
        &self,
        f: &Function,
        services: &Arc<dyn Services>,
        session: Option<&Arc<Session>>,
        msg: impl mlua::IntoLua,
    ) -> mlua::Result<mlua::thread::AsyncThread<mlua::Value>> {
        self.reset_to(f)?;
        let Some(session) = session else {
            return self.thread.clone().into_async((mlua::Nil, msg));
        };
        // the object goes onto the coroutine's stack from the cache, under its lock
        let mut cached = self.sessions.lock();
        if let Some(c) = cached.get(&session.id) {
            *c.snapshot.lock() = session.clone();
            return self.thread.clone().into_async((&c.object, msg));
        }
        let c = self.new_session_object(services, session)?;
        let started = self.thread.clone().into_async((&c.object, msg));
        if cached.len() >= CACHED_SESSIONS {
            cached.clear();
        }
        cached.insert(session.id.clone(), c);
        started
    }

    /// Make `f` the function the coroutine runs next.
    fn reset_to(&self, f: &Function) -> mlua::Result<()> {
        if self.thread.reset(f.clone()).is_err() {
            // the previous call failed, and closing its coroutine gave its error back: the
            // coroutine is closed now
            self.thread.reset(f.clone())?;
        }
        Ok(())
    }

    /// Clean up after a call whose future was dropped while its handler waited: close the
    /// coroutine, and collect at once, so that what the handler waited on (a call to another
    /// module, a session operation) is dropped now, as when the coroutine was the call's own,
    /// and not at some later collection. Only calls cut off at their deadline come here.
    fn abandon(&self) {
        if let Err(e) = self.thread.reset(self.idle.clone()) {
            tracing::debug!(error = %e, "an abandoned Lua call closed with an error");
        }
        if let Err(e) = self.lua.gc_collect() {
            tracing::debug!(error = %e, "collection after an abandoned Lua call failed");
        }
    }

    /// A new `session` object for `session`.
    fn new_session_object(
        &self,
        services: &Arc<dyn Services>,
        session: &Arc<Session>,
    ) -> mlua::Result<CachedSession> {
        let snapshot = Arc::new(Mutex::new(session.clone()));
        let object = self.lua.create_userdata(LuaSession {
            services: services.clone(),
            session: snapshot.clone(),
        })?;
        Ok(CachedSession { object, snapshot })
    }

    /// The `session` object of a session that closed, no longer kept.
    fn closed_session_object(
        &self,
        services: &Arc<dyn Services>,
        session: &Arc<Session>,
    ) -> Result<mlua::AnyUserData, CallError> {
        let c = match self.sessions.lock().remove(&session.id) {
            Some(c) => {
                *c.snapshot.lock() = session.clone();
                c
            }
            None => self
                .new_session_object(services, session)
                .map_err(|e| CallError::App(e.to_string()))?,
        };
        Ok(c.object)
    }
}

/// A handler replaced at run time ([`ModuleVersion::patch`]), applied to each state of the pool
/// when it is next taken for a call, so a call in flight keeps the function it started with.
struct Patch {
    handler: String,
    source: Arc<str>,
    /// Increasing per version: a state applies the patches newer than its own `patched`.
    serial: u64,
}

/// The states of a module no call holds, and the calls waiting for one, first come first
/// served: a free state goes to the longest waiting call, so a state is idle only while
/// nobody waits. One lock to take a state and one to give it back.
struct Pool {
    /// Boxed: a state moves out and back on every call, as a pointer rather than a few hundred
    /// bytes.
    #[allow(clippy::vec_box)]
    idle: Vec<Box<State>>,
    waiting: VecDeque<oneshot::Sender<Box<State>>>,
}

/// One loaded version of a Lua module.
pub(crate) struct LuaModule {
    path: PathBuf,
    chunk: String,
    module: String,
    msg_type: MsgType,
    handlers: Vec<String>,
    hooks: Vec<&'static str>,
    pool: Mutex<Pool>,
    /// The budget a patch is checked with.
    max_instructions: u64,
    time_limit: Duration,
    /// The latest patch of each patched handler.
    patches: Mutex<Vec<Patch>>,
    /// The serial of the newest patch (0: none).
    patch_serial: AtomicU64,
}

/// Load version `version` of the module: one state per worker, each running the file.
pub(crate) fn load(
    module: &str,
    path: &Path,
    options: &ModulePluginOptions,
    version: u64,
) -> Result<Arc<dyn ModuleVersion>, PluginError> {
    let n = crate::module::workers(options);
    let mut states = Vec::with_capacity(n);
    let mut handlers: Option<Vec<String>> = None;
    let mut hooks = Vec::new();
    for _ in 0..n {
        let (state, names) = load_state(module, path, options, version)?;
        let state = Box::new(state);
        if handlers.is_none() {
            hooks = crate::module::HOOKS
                .iter()
                .copied()
                .filter(|h| state.functions.contains_key(*h))
                .collect();
        }
        handlers.get_or_insert(names);
        states.push(state);
    }
    Ok(Arc::new(LuaModule {
        path: path.to_owned(),
        chunk: super::chunk_name(path),
        module: module.to_owned(),
        msg_type: options.msg_type,
        handlers: handlers.unwrap_or_default(),
        hooks,
        pool: Mutex::new(Pool {
            idle: states,
            waiting: VecDeque::new(),
        }),
        max_instructions: options.max_instructions,
        time_limit: options.time_limit,
        patches: Mutex::new(Vec::new()),
        patch_serial: AtomicU64::new(0),
    }))
}

/// A state with the `warren` table, after running the file: the functions the file defined
/// (handlers and hooks), and the handler names.
fn load_state(
    module: &str,
    path: &Path,
    options: &ModulePluginOptions,
    version: u64,
) -> Result<(State, Vec<String>), PluginError> {
    let budget = Budget::new(options.max_instructions, options.time_limit);
    let lua = super::new_state(path, &budget)?;
    let current = Arc::new(Mutex::new(None));
    install_warren_table(&lua, module, version, &current)
        .map_err(|e| super::load_error(path, &e))?;
    let before: std::collections::HashSet<String> = lua
        .globals()
        .pairs::<String, mlua::Value>()
        .filter_map(Result::ok)
        .map(|(k, _)| k)
        .collect();
    super::exec_file(&lua, path, &budget)?;
    let mut functions = HashMap::new();
    for (name, v) in lua
        .globals()
        .pairs::<String, mlua::Value>()
        .filter_map(Result::ok)
    {
        if let mlua::Value::Function(f) = v
            && !before.contains(&name)
        {
            functions.insert(name, f);
        }
    }
    let mut names: Vec<String> = functions
        .keys()
        .filter(|n| is_handler_name(n))
        .cloned()
        .collect();
    names.sort();
    let coroutine = || -> mlua::Result<(mlua::Thread, Function)> {
        let idle = lua.create_function(|_, ()| Ok(()))?;
        Ok((lua.create_thread(idle.clone())?, idle))
    };
    let (thread, idle) = coroutine().map_err(|e| super::load_error(path, &e))?;
    Ok((
        State {
            lua,
            budget,
            current,
            functions,
            patched: 0,
            thread,
            idle,
            busy: AtomicBool::new(false),
            sessions: Mutex::new(HashMap::new()),
        },
        names,
    ))
}

/// The chunk name a patch of `handler` is compiled under (what its error positions start
/// with).
fn patch_chunk(handler: &str) -> String {
    format!("{handler} patch")
}

/// Evaluate a patch's source, a function expression, on `lua` within `budget`: the function.
fn eval_patch(
    lua: &Lua,
    budget: &Budget,
    path: &Path,
    handler: &str,
    source: &str,
) -> Result<Function, PluginError> {
    let chunk = patch_chunk(handler);
    let failed = |e: &mlua::Error| {
        let text = match e {
            mlua::Error::SyntaxError { message, .. } => message.clone(),
            other => super::message_of(other),
        };
        let (line, message) = super::split_position(&text, &chunk);
        PluginError::patch(path, handler, line, message)
    };
    // `return` and the body on one line: the body's line numbers are the chunk's
    let f = lua
        .load(format!("return {source}"))
        .set_name(format!("={chunk}"))
        .into_function()
        .map_err(|e| failed(&e))?;
    budget.arm();
    let r = f.call::<mlua::Value>(());
    let tripped = budget.disarm();
    match (r, tripped) {
        (Ok(mlua::Value::Function(f)), _) => Ok(f),
        (Ok(other), _) => Err(PluginError::patch(
            path,
            handler,
            None,
            format!(
                "the body is a {}, not a function: write `function(session, msg) ... end`",
                other.type_name()
            ),
        )),
        (Err(_), Some(why)) => Err(PluginError::patch(
            path,
            handler,
            None,
            budget.describe(why),
        )),
        (Err(e), None) => Err(failed(&e)),
    }
}

/// The global `warren` table: calls to other modules, rooms, logging; `settings` and `instance`
/// are filled in at `on_init`.
fn install_warren_table(
    lua: &Lua,
    module: &str,
    version: u64,
    current: &Arc<Mutex<Option<CallCx>>>,
) -> mlua::Result<()> {
    let t = lua.create_table()?;
    t.set("module", module)?;
    t.set("version", version)?;

    let cur = current.clone();
    t.set(
        "call",
        lua.create_async_function(
            move |lua, (target, handler, body, timeout): (String, String, mlua::Value, Option<f64>)| {
                let cx = running(&cur);
                async move {
                    let cx = cx?;
                    let body = body_bytes(&lua, body)?;
                    let timeout = timeout.and_then(|s| Duration::try_from_secs_f64(s).ok());
                    let reply = cx
                        .services
                        .call(&target, &handler, cx.session.clone(), body, timeout)
                        .await
                        .map_err(mlua::Error::external)?;
                    super::from_json(&lua, &decode_reply(&reply))
                }
            },
        )?,
    )?;

    let cur = current.clone();
    t.set(
        "call_nr",
        lua.create_async_function(
            move |lua, (target, handler, body): (String, String, mlua::Value)| {
                let cx = running(&cur);
                async move {
                    let cx = cx?;
                    let body = body_bytes(&lua, body)?;
                    cx.services
                        .call_nr(&target, &handler, cx.session.clone(), body)
                        .await
                        .map_err(mlua::Error::external)?;
                    Ok(true)
                }
            },
        )?,
    )?;

    let cur = current.clone();
    t.set(
        "rpc_call",
        lua.create_async_function(
            move |lua, (topic, func, args, timeout): (String, String, mlua::Value, Option<f64>)| {
                let cx = running(&cur);
                async move {
                    let cx = cx?;
                    let peers = cx.redis_rpc().map_err(external)?;
                    let args = rpc_args(super::to_json(&lua, args)?);
                    let timeout = timeout
                        .and_then(|s| Duration::try_from_secs_f64(s).ok())
                        .unwrap_or_else(|| rpc_timeout(&cx));
                    let reply = peers
                        .call(topic, func, args, timeout)
                        .await
                        .map_err(external)?;
                    super::from_json(&lua, &Value::Array(reply))
                }
            },
        )?,
    )?;

    let cur = current.clone();
    t.set(
        "rpc_notify",
        lua.create_async_function(
            move |lua, (topic, func, args): (String, String, mlua::Value)| {
                let cx = running(&cur);
                async move {
                    let cx = cx?;
                    let peers = cx.redis_rpc().map_err(external)?;
                    let args = rpc_args(super::to_json(&lua, args)?);
                    peers.notify(topic, func, args).await.map_err(external)?;
                    Ok(true)
                }
            },
        )?,
    )?;

    // `[[backend]]` groups (docs/plugins.md, "Backend groups")
    for (name, by_id) in [("backend_send", false), ("backend_send_to", true)] {
        let cur = current.clone();
        t.set(
            name,
            lua.create_function(
                move |lua, (group, key, msgid, body): (String, String, u32, mlua::Value)| {
                    let cx = running(&cur)?;
                    let target = crate::BackendTarget::of(by_id, key);
                    let body = body_bytes(lua, body)?;
                    cx.backends()
                        .and_then(|b| b.send(&group, &target, msgid, body))
                        .map_err(external)?;
                    Ok(true)
                },
            )?,
        )?;
    }

    for (name, by_id) in [("backend_call", false), ("backend_call_to", true)] {
        let cur = current.clone();
        t.set(
            name,
            lua.create_async_function(
                move |lua,
                      (group, key, msgid, body, timeout, answer): (
                    String,
                    String,
                    u32,
                    mlua::Value,
                    Option<f64>,
                    Option<u32>,
                )| {
                    let cx = running(&cur);
                    let body = body_bytes(&lua, body);
                    async move {
                        let cx = cx?;
                        let target = crate::BackendTarget::of(by_id, key);
                        let request = crate::BackendRequest::from_script(
                            group,
                            target,
                            msgid,
                            body?,
                            timeout,
                            answer,
                            rpc_timeout(&cx),
                        );
                        let answer = cx
                            .backends()
                            .map_err(external)?
                            .call(request)
                            .await
                            .map_err(external)?;
                        lua.create_string(&answer)
                    }
                },
            )?,
        )?;
    }

    // HTTP groups: (status, body) of `method path` on the healthy service that owns `key`
    let cur = current.clone();
    t.set(
        "http_call",
        lua.create_async_function(
            move |lua,
                  (group, key, method, path, body, timeout, tag): (
                String,
                String,
                String,
                String,
                Option<mlua::Value>,
                Option<f64>,
                Option<String>,
            )| {
                let cx = running(&cur);
                let body = match body {
                    None | Some(mlua::Value::Nil) => Ok(Bytes::new()),
                    Some(b) => body_bytes(&lua, b),
                };
                async move {
                    let cx = cx?;
                    let request = crate::HttpRequest {
                        group,
                        key,
                        tag,
                        method,
                        path,
                        body: body?,
                        timeout: crate::backend::timeout_of(timeout, rpc_timeout(&cx)),
                    };
                    let answer = cx
                        .backends()
                        .map_err(external)?
                        .http(request)
                        .await
                        .map_err(external)?;
                    Ok((answer.status, lua.create_string(&answer.body)?))
                }
            },
        )?,
    )?;

    let cur = current.clone();
    t.set(
        "room_add",
        lua.create_async_function(
            move |_, (room, session): (String, Option<UserDataRef<LuaSession>>)| {
                let target = room_target(&cur, session);
                async move {
                    let (cx, s) = target?;
                    let node = cx.node().map_err(mlua::Error::external)?;
                    node.group_add(&room, &s)
                        .await
                        .map_err(mlua::Error::external)?;
                    Ok(true)
                }
            },
        )?,
    )?;

    let cur = current.clone();
    t.set(
        "room_remove",
        lua.create_async_function(
            move |_, (room, session): (String, Option<UserDataRef<LuaSession>>)| {
                let target = room_target(&cur, session);
                async move {
                    let (cx, s) = target?;
                    let node = cx.node().map_err(mlua::Error::external)?;
                    node.group_remove(&room, &s)
                        .await
                        .map_err(mlua::Error::external)?;
                    Ok(true)
                }
            },
        )?,
    )?;

    let cur = current.clone();
    t.set(
        "room_broadcast",
        lua.create_async_function(
            move |lua,
                  (room, topic, body, except): (
                String,
                String,
                mlua::Value,
                Option<UserDataRef<LuaSession>>,
            )| {
                let cx = running(&cur);
                let except = except.map(|s| s.snapshot().id.to_string());
                async move {
                    let cx = cx?;
                    let body = body_bytes(&lua, body)?;
                    let node = cx.node().map_err(mlua::Error::external)?;
                    Ok(node
                        .group_broadcast(&room, &topic, body, except.as_deref())
                        .await)
                }
            },
        )?,
    )?;

    let name = module.to_owned();
    t.set(
        "log",
        lua.create_function(
            move |_, (level, parts): (String, mlua::Variadic<mlua::Value>)| {
                let text: Vec<String> = parts
                    .iter()
                    .map(|v| v.to_string().unwrap_or_else(|_| format!("{v:?}")))
                    .collect();
                crate::module::log(&name, &level, &text.join(" "));
                Ok(())
            },
        )?,
    )?;
    lua.globals().set("warren", t)
}

/// The call running on this state, for the `warren` functions.
fn running(current: &Arc<Mutex<Option<CallCx>>>) -> mlua::Result<CallCx> {
    current.lock().clone().ok_or_else(|| {
        mlua::Error::runtime(
            "warren is not available while the plugin loads: use it in on_init or a handler",
        )
    })
}

/// The call and the session a room operation is about: the one given, or the caller's.
fn room_target(
    current: &Arc<Mutex<Option<CallCx>>>,
    session: Option<UserDataRef<LuaSession>>,
) -> mlua::Result<(CallCx, Arc<Session>)> {
    let cx = running(current)?;
    let s = match session {
        Some(s) => s.snapshot(),
        None => cx
            .session
            .clone()
            .ok_or_else(|| mlua::Error::external(CallError::NoSession))?,
    };
    Ok((cx, s))
}

/// A string result as its JSON reply, written straight from the bytes (invalid UTF-8 replaced,
/// as for any string a script hands over) into a buffer of the exact size, the escapes as
/// `serde_json` writes them: no `serde_json::Value` in between, no growing, and `Bytes` takes
/// the buffer without another allocation.
fn json_string(bytes: &[u8]) -> Bytes {
    let text = match std::str::from_utf8(bytes) {
        Ok(text) => std::borrow::Cow::Borrowed(text),
        Err(_) => String::from_utf8_lossy(bytes),
    };
    let text = text.as_bytes();
    let extra: usize = text
        .iter()
        .map(|&b| usize::from(ESCAPE_EXTRA[usize::from(b)]))
        .sum();
    let mut out = Vec::with_capacity(text.len() + 2 + extra);
    out.push(b'"');
    if extra == 0 {
        out.extend_from_slice(text);
    } else {
        let mut plain = 0;
        for (i, &b) in text.iter().enumerate() {
            if ESCAPE_EXTRA[usize::from(b)] == 0 {
                continue;
            }
            out.extend_from_slice(&text[plain..i]);
            plain = i + 1;
            match b {
                b'"' => out.extend_from_slice(b"\\\""),
                b'\\' => out.extend_from_slice(b"\\\\"),
                b'\n' => out.extend_from_slice(b"\\n"),
                b'\r' => out.extend_from_slice(b"\\r"),
                b'\t' => out.extend_from_slice(b"\\t"),
                0x08 => out.extend_from_slice(b"\\b"),
                0x0c => out.extend_from_slice(b"\\f"),
                _ => {
                    const HEX: &[u8; 16] = b"0123456789abcdef";
                    out.extend_from_slice(b"\\u00");
                    out.push(HEX[usize::from(b >> 4)]);
                    out.push(HEX[usize::from(b & 0x0f)]);
                }
            }
        }
        out.extend_from_slice(&text[plain..]);
    }
    out.push(b'"');
    Bytes::from(out)
}

/// What JSON's escape of each byte adds to it: `\"`, `\\` and the short forms of `\n`, `\r`,
/// `\t`, `\b`, `\f` one byte, the other control characters (`\u00XX`) five, the rest none.
const ESCAPE_EXTRA: [u8; 256] = {
    let mut t = [0u8; 256];
    let mut b = 0;
    while b < 0x20 {
        t[b] = 5;
        b += 1;
    }
    t[b'"' as usize] = 1;
    t[b'\\' as usize] = 1;
    t[b'\n' as usize] = 1;
    t[b'\r' as usize] = 1;
    t[b'\t' as usize] = 1;
    t[0x08] = 1;
    t[0x0c] = 1;
    t
};

/// A body for the node from a script value: strings as their bytes, `nil` empty, anything else
/// as JSON.
fn body_bytes(lua: &Lua, v: mlua::Value) -> mlua::Result<Bytes> {
    match v {
        mlua::Value::Nil => Ok(Bytes::new()),
        mlua::Value::String(s) => Ok(Bytes::copy_from_slice(&s.as_bytes())),
        other => {
            let json = super::to_json(lua, other)?;
            serde_json::to_vec(&json)
                .map(Bytes::from)
                .map_err(mlua::Error::external)
        }
    }
}

/// The latest snapshot of a session a `session` object stands for: replaced by each call the
/// object is passed to, and by the object's own session operations.
type Snapshot = Mutex<Arc<Session>>;

/// The `session` argument of a handler: the caller's session and its operations.
pub(crate) struct LuaSession {
    services: Arc<dyn Services>,
    session: Arc<Snapshot>,
}

impl LuaSession {
    fn snapshot(&self) -> Arc<Session> {
        self.session.lock().clone()
    }

    fn refresh(&self, s: Arc<Session>) {
        *self.session.lock() = s;
    }
}

fn external(e: CallError) -> mlua::Error {
    mlua::Error::external(e)
}

impl UserData for LuaSession {
    fn add_fields<F: UserDataFields<Self>>(fields: &mut F) {
        fields.add_field_method_get("id", |_, this| Ok(this.snapshot().id.to_string()));
        fields.add_field_method_get("uid", |_, this| Ok(this.snapshot().uid.clone()));
        fields.add_field_method_get("ip", |_, this| Ok(this.snapshot().remote.to_string()));
        fields.add_field_method_get("gate", |_, this| Ok(this.snapshot().gate.to_string()));
    }

    fn add_methods<M: UserDataMethods<Self>>(methods: &mut M) {
        methods.add_method("get", |lua, this, key: String| {
            match this.snapshot().settings.get(&key) {
                Some(v) => super::from_json(lua, v),
                None => Ok(mlua::Value::Nil),
            }
        });
        methods.add_method("settings", |lua, this, ()| {
            super::from_json(lua, &Value::Object(this.snapshot().settings.clone()))
        });
        methods.add_method("export", |lua, this, ()| {
            super::from_json(lua, &this.snapshot().export_map())
        });
        methods.add_async_method(
            "set",
            |lua, this, (key, value): (String, mlua::Value)| async move {
                let value = super::to_json(&lua, value)?;
                let s = this.snapshot();
                let node = node_of(&this.services).map_err(external)?;
                let s = node
                    .sessions()
                    .set(&s, &key, value)
                    .await
                    .map_err(external)?;
                this.refresh(s);
                Ok(true)
            },
        );
        methods.add_async_method("remove", |_, this, key: String| async move {
            let s = this.snapshot();
            let node = node_of(&this.services).map_err(external)?;
            let s = node.sessions().remove(&s, &key).await.map_err(external)?;
            this.refresh(s);
            Ok(true)
        });
        methods.add_async_method("bind", |_, this, uid: String| async move {
            let s = this.snapshot();
            let node = node_of(&this.services).map_err(external)?;
            let s = node.sessions().bind(&s, &uid).await.map_err(external)?;
            this.refresh(s);
            Ok(true)
        });
        methods.add_async_method("unbind", |_, this, ()| async move {
            let s = this.snapshot();
            let node = node_of(&this.services).map_err(external)?;
            let s = node.sessions().unbind(&s).await.map_err(external)?;
            this.refresh(s);
            Ok(true)
        });
        methods.add_async_method("update", |_, this, ()| async move {
            let s = this.snapshot();
            let node = node_of(&this.services).map_err(external)?;
            let s = node.sessions().update(&s).await.map_err(external)?;
            this.refresh(s);
            Ok(true)
        });
        for name in ["push", "send"] {
            methods.add_async_method(
                name,
                |lua, this, (topic, body): (String, mlua::Value)| async move {
                    let body = body_bytes(&lua, body)?;
                    let s = this.snapshot();
                    this.services
                        .push(&s, &topic, body)
                        .await
                        .map_err(external)?;
                    Ok(true)
                },
            );
        }
        methods.add_async_method("close", |_, this, ()| async move {
            let s = this.snapshot();
            let node = node_of(&this.services).map_err(external)?;
            node.sessions().close(&s).await.map_err(external)?;
            Ok(true)
        });
    }
}

/// A state taken from the pool for one call; back in the pool when dropped, even when the call
/// is cancelled at its deadline.
struct Checkout<'a> {
    module: &'a LuaModule,
    state: Option<Box<State>>,
}

impl Checkout<'_> {
    fn state(&self) -> &State {
        self.state
            .as_ref()
            .expect("a checkout holds its state until it is dropped")
    }
}

impl Drop for Checkout<'_> {
    fn drop(&mut self) {
        if let Some(state) = self.state.take() {
            if state.busy.load(Ordering::Acquire) {
                state.busy.store(false, Ordering::Release);
                state.abandon();
            }
            state.budget.disarm();
            *state.current.lock() = None;
            self.module.release(state);
        }
    }
}

/// A call waiting for a state; a state handed to it after it gave up goes back to the pool.
struct Waiting<'a> {
    module: &'a LuaModule,
    rx: oneshot::Receiver<Box<State>>,
}

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        self.rx.close();
        if let Ok(state) = self.rx.try_recv() {
            self.module.release(state);
        }
    }
}

impl LuaModule {
    async fn checkout(&self) -> Result<Checkout<'_>, CallError> {
        // a free state, or a place in the queue, taken under one lock
        let free = {
            let mut pool = self.pool.lock();
            pool.idle.pop().ok_or_else(|| {
                let (tx, rx) = oneshot::channel();
                pool.waiting.push_back(tx);
                rx
            })
        };
        let mut state = match free {
            Ok(state) => state,
            Err(rx) => {
                let mut waiting = Waiting { module: self, rx };
                (&mut waiting.rx).await.map_err(|_| CallError::Closed)?
            }
        };
        if state.patched < self.patch_serial.load(Ordering::Acquire) {
            self.apply_patches(&mut state);
        }
        Ok(Checkout {
            module: self,
            state: Some(state),
        })
    }

    /// Give a state back: to the longest waiting call, or to the idle ones.
    fn release(&self, mut state: Box<State>) {
        let mut pool = self.pool.lock();
        while let Some(tx) = pool.waiting.pop_front() {
            match tx.send(state) {
                Ok(()) => return,
                // that call gave up: the next one
                Err(back) => state = back,
            }
        }
        pool.idle.push(state);
    }

    /// Bring a state up to the newest patches: each replaces the handler's function and global.
    fn apply_patches(&self, state: &mut State) {
        let pending: Vec<(String, Arc<str>, u64)> = self
            .patches
            .lock()
            .iter()
            .filter(|p| p.serial > state.patched)
            .map(|p| (p.handler.clone(), p.source.clone(), p.serial))
            .collect();
        for (handler, source, serial) in pending {
            match eval_patch(&state.lua, &state.budget, &self.path, &handler, &source) {
                Ok(f) => {
                    if let Err(e) = state.lua.globals().set(handler.as_str(), f.clone()) {
                        tracing::warn!(module = %self.module, handler = %handler, error = %e, "patched handler not set as a global");
                    }
                    state.functions.insert(handler, f);
                }
                // checked on a fresh state before it was accepted; a state of the pool can
                // still differ (its globals): it keeps its function, and says so
                Err(e) => {
                    tracing::warn!(module = %self.module, handler = %handler, error = %e, "patch not applied to one Lua state; it keeps the handler it had")
                }
            }
            state.patched = state.patched.max(serial);
        }
    }

    /// The message argument, as the options say.
    fn msg(&self, lua: &Lua, body: &Bytes) -> Result<mlua::Value, CallError> {
        match self.msg_type {
            MsgType::Text | MsgType::Bytes => lua
                .create_string(body)
                .map(mlua::Value::String)
                .map_err(|e| CallError::App(e.to_string())),
            MsgType::Json => {
                let v = json_body(body)?;
                super::from_json(lua, &v).map_err(|e| {
                    CallError::bad_request(Detail::caused("the body does not fit a Lua value", e))
                })
            }
        }
    }

    /// Run a call `started` on `state` ([`State::start`]) within the budget, for `what` (a
    /// handler or a hook).
    async fn run(
        &self,
        state: &State,
        what: &str,
        started: mlua::Result<mlua::thread::AsyncThread<mlua::Value>>,
    ) -> Result<mlua::Value, CallError> {
        state.budget.arm();
        let r = match started {
            Ok(call) => {
                state.busy.store(true, Ordering::Release);
                let r = call.await;
                state.busy.store(false, Ordering::Release);
                r
            }
            Err(e) => Err(e),
        };
        let tripped = state.budget.disarm();
        match (r, tripped) {
            (Ok(v), _) => Ok(v),
            (Err(_), Some(why)) => {
                let reason = state.budget.describe(why);
                metrics::counter!("warren_plugin_runaway_total").increment(1);
                tracing::warn!(module = %self.module, plugin = %self.path.display(), handler = what, %reason, "runaway Lua call stopped");
                Err(match why {
                    Tripped::Instructions | Tripped::Time => CallError::Timeout,
                })
            }
            (Err(e), None) => {
                let error = match super::call_error(&e, &self.chunk) {
                    // a patched handler's own error: without the patch's position either
                    CallError::App(m) => {
                        CallError::App(super::split_position(&m, &patch_chunk(what)).1)
                    }
                    other => other,
                };
                if matches!(error, CallError::App(_)) {
                    tracing::warn!(module = %self.module, plugin = %self.path.display(), handler = what, error = %e, "Lua handler failed");
                }
                Err(error)
            }
        }
    }

    /// Encode a handler's return value as its reply.
    fn reply(lua: &Lua, v: mlua::Value) -> Result<Bytes, CallError> {
        match v {
            mlua::Value::Nil => Ok(Bytes::from_static(b"null")),
            mlua::Value::String(s) => Ok(json_string(&s.as_bytes())),
            other => json_reply(
                &super::to_json(lua, other)
                    .map_err(|e| CallError::App(format!("reply encoding failed: {e}")))?,
            ),
        }
    }

    /// Run a hook on every state of the pool (each state has its own globals), with `cx` as the
    /// running call.
    async fn on_every_state(
        &self,
        hook: &str,
        cx: Option<CallCx>,
        args: impl Fn(&Lua) -> mlua::Result<mlua::MultiValue>,
    ) -> Result<(), PluginError> {
        let n = self.pool.lock().idle.len();
        let mut held = Vec::with_capacity(n);
        for _ in 0..n {
            held.push(
                self.checkout()
                    .await
                    .map_err(|e| PluginError::script(&self.path, None, e.to_string()))?,
            );
        }
        for c in &held {
            let st = c.state();
            if let Some(cx) = &cx {
                st.lua
                    .globals()
                    .get::<mlua::Table>("warren")
                    .and_then(|w| {
                        w.set(
                            "settings",
                            super::from_json(&st.lua, &cx.instance.settings)?,
                        )?;
                        w.set("instance", &*cx.instance.id)
                    })
                    .map_err(|e| super::load_error(&self.path, &e))?;
            }
            *st.current.lock() = cx.clone();
            let Some(f) = st.functions.get(hook) else {
                continue;
            };
            let a = args(&st.lua).map_err(|e| super::load_error(&self.path, &e))?;
            st.budget.arm();
            let r = f.call_async::<mlua::Value>(a).await;
            let tripped = st.budget.disarm();
            if let Some(why) = tripped {
                return Err(PluginError::script(
                    &self.path,
                    None,
                    format!("{hook}: {}", st.budget.describe(why)),
                ));
            }
            r.map_err(|e| super::load_error(&self.path, &e))?;
        }
        Ok(())
    }
}

impl ModuleVersion for LuaModule {
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
            let c = self.checkout().await?;
            let st = c.state();
            let f = st
                .functions
                .get(&*handler)
                .ok_or_else(|| CallError::HandlerNotFound(handler.to_string()))?;
            let session = cx.session.as_ref();
            let started = match self.msg_type {
                // text goes onto the coroutine's stack as it is: no Lua value to make and drop
                MsgType::Text | MsgType::Bytes if let Ok(text) = std::str::from_utf8(&body) => {
                    st.start_handler(f, &cx.services, session, text)
                }
                _ => {
                    let msg = self.msg(&st.lua, &body)?;
                    st.start_handler(f, &cx.services, session, msg)
                }
            };
            *st.current.lock() = Some(cx);
            let v = self.run(st, &handler, started).await?;
            LuaModule::reply(&st.lua, v)
        })
    }

    fn init(self: Arc<Self>, cx: CallCx) -> BoxFuture<'static, Result<(), PluginError>> {
        Box::pin(async move {
            let settings = cx.instance.settings.clone();
            self.on_every_state("on_init", Some(cx), move |lua| {
                let v = super::from_json(lua, &settings)?;
                Ok(mlua::MultiValue::from_iter([v]))
            })
            .await
        })
    }

    fn destroy(self: Arc<Self>, cx: CallCx) -> BoxFuture<'static, Result<(), PluginError>> {
        Box::pin(async move {
            self.on_every_state("on_destroy", Some(cx), |_| Ok(mlua::MultiValue::new()))
                .await
        })
    }

    fn session_closed(self: Arc<Self>, cx: CallCx) -> BoxFuture<'static, Result<(), CallError>> {
        Box::pin(async move {
            let c = self.checkout().await?;
            let st = c.state();
            let Some(f) = st.functions.get("on_session_closed") else {
                return Ok(());
            };
            let session = match &cx.session {
                Some(s) => Some(st.closed_session_object(&cx.services, s)?),
                None => None,
            };
            let started = st.start(f, session);
            *st.current.lock() = Some(cx);
            self.run(st, "on_session_closed", started).await.map(|_| ())
        })
    }

    fn backend_msg(
        self: Arc<Self>,
        cx: CallCx,
        msg: crate::BackendMsg,
    ) -> BoxFuture<'static, Result<(), CallError>> {
        Box::pin(async move {
            let c = self.checkout().await?;
            let st = c.state();
            let Some(f) = st.functions.get("on_backend_msg") else {
                return Ok(());
            };
            let body = st
                .lua
                .create_string(&msg.body)
                .map_err(|e| CallError::App(e.to_string()))?;
            let started = st.start(f, (msg.group, msg.service, msg.msgid, body));
            *st.current.lock() = Some(cx);
            self.run(st, "on_backend_msg", started).await.map(|_| ())
        })
    }

    fn export_state(self: Arc<Self>) -> BoxFuture<'static, Result<Option<Value>, PluginError>> {
        Box::pin(async move {
            let c = self
                .checkout()
                .await
                .map_err(|e| PluginError::script(&self.path, None, e.to_string()))?;
            let st = c.state();
            let Some(f) = st.functions.get("export_state") else {
                return Ok(None);
            };
            let v = self
                .run(st, "export_state", st.start(f, ()))
                .await
                .map_err(|e| PluginError::script(&self.path, None, format!("export_state: {e}")))?;
            super::to_json(&st.lua, v)
                .map(Some)
                .map_err(|e| PluginError::script(&self.path, None, format!("export_state: {e}")))
        })
    }

    fn patch(
        self: Arc<Self>,
        handler: Arc<str>,
        source: Arc<str>,
    ) -> BoxFuture<'static, Result<(), PluginError>> {
        Box::pin(async move {
            // checked on a fresh state, so that a body that does not compile or is not a
            // function changes nothing
            let budget = Budget::new(self.max_instructions, self.time_limit);
            let scratch = super::new_state(&self.path, &budget)?;
            eval_patch(&scratch, &budget, &self.path, &handler, &source)?;
            let mut patches = self.patches.lock();
            let serial = self.patch_serial.load(Ordering::Acquire) + 1;
            patches.retain(|p| *p.handler != *handler);
            patches.push(Patch {
                handler: handler.to_string(),
                source,
                serial,
            });
            self.patch_serial.store(serial, Ordering::Release);
            Ok(())
        })
    }

    fn patched(&self) -> Vec<String> {
        let mut names: Vec<String> = self
            .patches
            .lock()
            .iter()
            .map(|p| p.handler.clone())
            .collect();
        names.sort();
        names
    }

    fn import_state(self: Arc<Self>, state: Value) -> BoxFuture<'static, Result<(), PluginError>> {
        Box::pin(async move {
            self.on_every_state("import_state", None, move |lua| {
                Ok(mlua::MultiValue::from_iter([super::from_json(
                    lua, &state,
                )?]))
            })
            .await
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn string_replies_are_the_json_serde_writes() {
        let cases: [&[u8]; 7] = [
            b"",
            b"hello",
            br#"{"p":"xxxx"}"#,
            b"tab\there, line\nthere, \x01\x1f\x7f and \\",
            "caf\u{e9} \u{1f600}".as_bytes(),
            b"not \xff utf-8 \xc3",
            b"\x08\x0c\r",
        ];
        for bytes in cases {
            let want =
                serde_json::to_vec(&Value::String(String::from_utf8_lossy(bytes).into_owned()))
                    .expect("JSON");
            let got = json_string(bytes);
            assert_eq!(&got[..], &want[..], "{:?}", String::from_utf8_lossy(bytes));
        }
    }
}

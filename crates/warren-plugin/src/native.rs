//! Native channel handlers: shared libraries speaking warren's C ABI, version 1
//! (include/warren_plugin.h; docs/plugins.md, "Native plugins").
//!
//! The library exports `warren_plugin_abi_version`, `warren_plugin_init`, `warren_handle_msg`
//! and `warren_handle_broken` (required), `warren_handle_connect` and `warren_plugin_stop`
//! (optional). The host hands it a [`WarrenHost`] table of functions at init and one opaque
//! `WarrenChannel` handle per connection, stable from connect to disconnect and across reloads.
//!
//! This is the one place in warren that calls code it cannot check: a native plugin runs in the
//! process, and what it does with memory is its own. What the host does guarantee is written at
//! each `unsafe` block.

#![allow(unsafe_code)]

use std::collections::HashMap;
use std::ffi::c_void;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicPtr, AtomicU64, Ordering};

use bytes::Bytes;
use libloading::Library;
use parking_lot::Mutex;
use warren::gate::line::Channel;

use crate::PluginError;
use crate::channel::{ChannelShared, ChannelVersion};

/// The version of the C ABI this host speaks (`WARREN_PLUGIN_ABI_VERSION` in
/// include/warren_plugin.h). A plugin reporting another version is refused at load.
pub const ABI_VERSION: u32 = 1;

/// What a native plugin holds for one connection (`WarrenChannel` in C: opaque).
pub(crate) struct WarrenChannel {
    channel: Channel,
    data: AtomicPtr<c_void>,
}

/// The host's functions, handed to `warren_plugin_init` (`WarrenHost` in C; the field order is
/// the ABI).
#[repr(C)]
pub(crate) struct WarrenHost {
    abi_version: u32,
    send: extern "C" fn(*mut WarrenChannel, *const u8, usize) -> i32,
    close: extern "C" fn(*mut WarrenChannel),
    set_data: extern "C" fn(*mut WarrenChannel, *mut c_void),
    get_data: extern "C" fn(*mut WarrenChannel) -> *mut c_void,
    channel_id: extern "C" fn(*mut WarrenChannel) -> u64,
}

/// One table for every plugin, alive as long as the process.
static HOST: WarrenHost = WarrenHost {
    abi_version: ABI_VERSION,
    send: host_send,
    close: host_close,
    set_data: host_set_data,
    get_data: host_get_data,
    channel_id: host_channel_id,
};

/// The channel behind a handle, if the handle is not null.
fn channel_of<'a>(ch: *mut WarrenChannel) -> Option<&'a WarrenChannel> {
    // SAFETY: a non-null handle was made by `Handles::handle` from a boxed `WarrenChannel` that
    // stays in its map, unmoved, from the channel's first event until `handle_broken` has
    // returned; the ABI makes a plugin that uses it later responsible. The host only reads
    // through it (the data pointer is atomic).
    unsafe { ch.cast_const().as_ref() }
}

extern "C" fn host_send(ch: *mut WarrenChannel, data: *const u8, len: usize) -> i32 {
    let Some(ch) = channel_of(ch) else {
        return -1;
    };
    let msg = if len == 0 {
        Bytes::new()
    } else if data.is_null() {
        return -1;
    } else {
        // SAFETY: the ABI asks for `len` readable bytes at `data` for the length of the call;
        // they are copied before it returns.
        Bytes::copy_from_slice(unsafe { std::slice::from_raw_parts(data, len) })
    };
    ch.channel.send(msg)
}

extern "C" fn host_close(ch: *mut WarrenChannel) {
    if let Some(ch) = channel_of(ch) {
        ch.channel.close();
    }
}

extern "C" fn host_set_data(ch: *mut WarrenChannel, data: *mut c_void) {
    if let Some(ch) = channel_of(ch) {
        ch.data.store(data, Ordering::Release);
    }
}

extern "C" fn host_get_data(ch: *mut WarrenChannel) -> *mut c_void {
    channel_of(ch).map_or(std::ptr::null_mut(), |ch| ch.data.load(Ordering::Acquire))
}

extern "C" fn host_channel_id(ch: *mut WarrenChannel) -> u64 {
    channel_of(ch).map_or(0, |ch| ch.channel.id())
}

/// One plugin's channel handles, by channel id: made at a channel's first event, freed after
/// its `handle_broken`. Shared by the plugin's versions, so a handle (and its data pointer)
/// survives a reload.
#[derive(Default)]
pub(crate) struct Handles {
    by_id: Mutex<HashMap<u64, Box<WarrenChannel>>>,
}

impl Handles {
    /// The handle of `channel`, made if it has none yet.
    fn handle(&self, channel: &Channel) -> *mut WarrenChannel {
        let mut map = self.by_id.lock();
        let b = map.entry(channel.id()).or_insert_with(|| {
            Box::new(WarrenChannel {
                channel: channel.clone(),
                data: AtomicPtr::new(std::ptr::null_mut()),
            })
        });
        // the host never writes through the pointer; C sees it as an opaque `WarrenChannel *`
        std::ptr::from_ref::<WarrenChannel>(b).cast_mut()
    }

    /// Free the handle of a channel the plugin has seen close.
    pub(crate) fn forget(&self, id: u64) {
        self.by_id.lock().remove(&id);
    }
}

type AbiFn = unsafe extern "C" fn() -> u32;
type InitFn = unsafe extern "C" fn(*const WarrenHost) -> i32;
type HandleFn = unsafe extern "C" fn(*mut WarrenChannel) -> i32;
type MsgFn = unsafe extern "C" fn(*mut WarrenChannel, *const u8, usize) -> i32;
type StopFn = unsafe extern "C" fn();

/// The exported symbol `name` as a `T`, or `None` when the library does not export it (or
/// exports it as null).
///
/// # Safety
/// `T` must be the symbol's type, and the value must not be used after `library` is dropped.
unsafe fn symbol<T: Copy>(library: &Library, name: &str) -> Option<T> {
    // SAFETY: read as an address only, to tell a missing or null symbol from a present one.
    let addr = unsafe { library.get::<*const c_void>(name.as_bytes()) }
        .ok()
        .map(|s| *s)?;
    if addr.is_null() {
        return None;
    }
    // SAFETY: the caller vouches for `T`.
    unsafe { library.get::<T>(name.as_bytes()) }
        .ok()
        .map(|s| *s)
}

/// One loaded library.
pub(crate) struct NativeChannel {
    path: PathBuf,
    shared: Arc<ChannelShared>,
    handle_connect: Option<HandleFn>,
    handle_msg: MsgFn,
    handle_broken: HandleFn,
    stop: Option<StopFn>,
    /// Last, so that it is unloaded after `Drop` has called `warren_plugin_stop`.
    _library: Library,
}

static COPIES: AtomicU64 = AtomicU64::new(0);

/// Load the library at `path` and start it. A reload loads a fresh copy: the dynamic loader
/// would hand back the library already mapped under the same name, not the file now there.
pub(crate) fn load(
    path: &Path,
    shared: &Arc<ChannelShared>,
    reload: bool,
) -> Result<Arc<dyn ChannelVersion>, PluginError> {
    let native = |message: String| PluginError::Native {
        path: path.to_owned(),
        message,
    };
    let copy = if reload {
        let name = path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let n = COPIES.fetch_add(1, Ordering::Relaxed);
        let to = std::env::temp_dir().join(format!("warren-{}-{n}-{name}", std::process::id()));
        std::fs::copy(path, &to).map_err(|source| PluginError::Io {
            path: path.to_owned(),
            source,
        })?;
        Some(to)
    } else {
        None
    };
    let open = copy.as_deref().unwrap_or(path);
    // SAFETY: opening a library runs its initializers: a native plugin is code the operator
    // chose to run in this process (docs/plugins.md says what that means).
    let opened = unsafe { Library::new(open) };
    if let Some(c) = &copy {
        // the mapping stays valid once the file is gone
        let _ = std::fs::remove_file(c);
    }
    let library = opened.map_err(|e| native(format!("cannot load the library: {e}")))?;

    let required = |name: &'static str| PluginError::MissingEntry {
        path: path.to_owned(),
        name,
    };
    // SAFETY (each symbol): the C ABI v1 fixes every exported symbol's signature
    // (include/warren_plugin.h), which is the type each one is read as; `library` outlives the
    // function pointers (they are kept beside it in `NativeChannel`).
    let abi: AbiFn = unsafe { symbol(&library, "warren_plugin_abi_version") }
        .ok_or_else(|| required("warren_plugin_abi_version"))?;
    // SAFETY: a function of no arguments returning a number, by the ABI.
    let found = unsafe { abi() };
    if found != ABI_VERSION {
        return Err(PluginError::AbiVersion {
            path: path.to_owned(),
            found,
            expected: ABI_VERSION,
        });
    }
    let init: InitFn = unsafe { symbol(&library, "warren_plugin_init") }
        .ok_or_else(|| required("warren_plugin_init"))?;
    let handle_msg: MsgFn = unsafe { symbol(&library, "warren_handle_msg") }
        .ok_or_else(|| required("warren_handle_msg"))?;
    let handle_broken: HandleFn = unsafe { symbol(&library, "warren_handle_broken") }
        .ok_or_else(|| required("warren_handle_broken"))?;
    let handle_connect: Option<HandleFn> = unsafe { symbol(&library, "warren_handle_connect") };
    let stop: Option<StopFn> = unsafe { symbol(&library, "warren_plugin_stop") };

    // SAFETY: `HOST` is a static: valid for as long as the plugin may keep the pointer.
    let rc = unsafe { init(&HOST) };
    if rc != 0 {
        return Err(native(format!("warren_plugin_init returned {rc}")));
    }
    Ok(Arc::new(NativeChannel {
        path: path.to_owned(),
        shared: shared.clone(),
        handle_connect,
        handle_msg,
        handle_broken,
        stop,
        _library: library,
    }))
}

/// A plugin function's return code, for the worker's log.
fn code(what: &str, rc: i32) -> Result<(), String> {
    if rc == 0 {
        Ok(())
    } else {
        Err(format!("{what} returned {rc}"))
    }
}

impl ChannelVersion for NativeChannel {
    fn connect(&self, channel: &Channel) -> Result<(), String> {
        let ch = self.shared.native.handle(channel);
        match self.handle_connect {
            // SAFETY: `ch` is a live handle (see `channel_of`); calls into one plugin come from
            // its one thread, in order.
            Some(f) => code("warren_handle_connect", unsafe { f(ch) }),
            None => Ok(()),
        }
    }

    fn msg(&self, channel: &Channel, msg: Bytes) -> Result<(), String> {
        let ch = self.shared.native.handle(channel);
        // SAFETY: `ch` is a live handle; `msg` outlives the call, which is all the ABI promises
        // the plugin about `data`.
        let rc = unsafe { (self.handle_msg)(ch, msg.as_ptr(), msg.len()) };
        code("warren_handle_msg", rc)
    }

    fn broken(&self, channel: &Channel) -> Result<(), String> {
        let ch = self.shared.native.handle(channel);
        // SAFETY: `ch` is live until this call returns; the worker frees it afterwards.
        let rc = unsafe { (self.handle_broken)(ch) };
        code("warren_handle_broken", rc)
    }
}

impl Drop for NativeChannel {
    fn drop(&mut self) {
        if let Some(stop) = self.stop {
            // SAFETY: the library is still loaded (it is dropped after this), and no call into
            // this version can be running: the last reference to it is going away.
            unsafe { stop() };
        }
        tracing::debug!(plugin = %self.path.display(), "native plugin version unloaded");
    }
}

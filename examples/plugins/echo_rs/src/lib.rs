//! A native channel-handler plugin in Rust: sends every message back as it came (the line
//! protocol's echo, `5\r\nhello` → `5 \r\nhello`), through warren's C ABI version 1
//! (include/warren_plugin.h; docs/plugins.md, "Native plugins").
//!
//! The ABI is C: this crate declares its types itself and exports the functions warren looks up
//! by name. warren calls them from one thread per plugin, one at a time.

use std::ffi::c_void;
use std::sync::OnceLock;

/// The ABI version this plugin speaks (`WARREN_PLUGIN_ABI_VERSION`).
const ABI_VERSION: u32 = 1;

/// A connection, opaque: only its address is handed around.
#[repr(C)]
pub struct WarrenChannel {
    _opaque: [u8; 0],
}

/// The host's functions (`WarrenHost` in C; the field order is the ABI). This plugin only
/// sends; the rest of the table is declared for its layout.
#[repr(C)]
#[allow(dead_code)]
pub struct WarrenHost {
    abi_version: u32,
    send: extern "C" fn(*mut WarrenChannel, *const u8, usize) -> i32,
    close: extern "C" fn(*mut WarrenChannel),
    set_data: extern "C" fn(*mut WarrenChannel, *mut c_void),
    get_data: extern "C" fn(*mut WarrenChannel) -> *mut c_void,
    channel_id: extern "C" fn(*mut WarrenChannel) -> u64,
}

/// The table warren handed over at init (it lives as long as the process).
struct Host(&'static WarrenHost);

// SAFETY: the table is immutable and its functions may be called from any thread (the ABI).
unsafe impl Send for Host {}
// SAFETY: as above.
unsafe impl Sync for Host {}

static HOST: OnceLock<Host> = OnceLock::new();

/// Which ABI this library speaks.
#[unsafe(no_mangle)]
pub extern "C" fn warren_plugin_abi_version() -> u32 {
    ABI_VERSION
}

/// Keep the host's table; refuse a host of another ABI version.
///
/// # Safety
/// `host` is null or points at a `WarrenHost` that outlives the library (warren's is static).
#[unsafe(no_mangle)]
pub unsafe extern "C" fn warren_plugin_init(host: *const WarrenHost) -> i32 {
    // SAFETY: the caller's promise above.
    let Some(host) = (unsafe { host.as_ref() }) else {
        return -1;
    };
    if host.abi_version != ABI_VERSION {
        return -1;
    }
    let _ = HOST.set(Host(host));
    0
}

/// Send the message back.
///
/// # Safety
/// `data` points at `len` readable bytes for the length of the call (the ABI).
#[unsafe(no_mangle)]
pub unsafe extern "C" fn warren_handle_msg(
    ch: *mut WarrenChannel,
    data: *const u8,
    len: usize,
) -> i32 {
    match HOST.get() {
        // the host copies the bytes before it returns, so they need to live no longer
        Some(Host(host)) => (host.send)(ch, data, len),
        None => -1,
    }
}

/// Nothing to clean up: this plugin keeps no state per connection.
#[unsafe(no_mangle)]
pub extern "C" fn warren_handle_broken(_ch: *mut WarrenChannel) -> i32 {
    0
}

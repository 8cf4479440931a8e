//! [`PluginSlot`]: the running version of one plugin file, swapped whole on reload.
//!
//! A call takes the current version (an `Arc`) when it starts and keeps it to the end, so a
//! reload never changes the code under a call in flight: the old version lives until its last
//! call (or channel) lets go of it.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use arc_swap::ArcSwap;

/// One loaded version of a plugin: what the host built from the file, and its number.
pub(crate) struct Versioned<V: ?Sized> {
    /// 1 for the first load, one more for each successful reload.
    pub(crate) version: u64,
    pub(crate) value: Arc<V>,
}

/// The running version of a plugin file, and the counter that numbers the next.
pub(crate) struct PluginSlot<V: ?Sized> {
    path: PathBuf,
    current: ArcSwap<Versioned<V>>,
    last: AtomicU64,
}

impl<V: ?Sized> PluginSlot<V> {
    /// A slot running `first` as version 1.
    pub(crate) fn new(path: &Path, first: Arc<V>) -> Self {
        PluginSlot {
            path: path.to_owned(),
            current: ArcSwap::from_pointee(Versioned {
                version: 1,
                value: first,
            }),
            last: AtomicU64::new(1),
        }
    }

    pub(crate) fn path(&self) -> &Path {
        &self.path
    }

    /// The running version, for one call from start to end.
    pub(crate) fn current(&self) -> Arc<Versioned<V>> {
        self.current.load_full()
    }

    /// The running version's number.
    pub(crate) fn version(&self) -> u64 {
        self.current.load().version
    }

    /// The number the next successful load will have (reloads are serialized by their callers,
    /// so the number is used as soon as it is taken).
    pub(crate) fn next_version(&self) -> u64 {
        self.last.load(Ordering::Acquire) + 1
    }

    /// Make `value` the running version; returns its number.
    pub(crate) fn install(&self, value: Arc<V>) -> u64 {
        let version = self.last.fetch_add(1, Ordering::AcqRel) + 1;
        self.current.store(Arc::new(Versioned { version, value }));
        version
    }
}

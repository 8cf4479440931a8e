//! [`ChannelPlugin`]: a line listener's channel handler written as a plugin (docs/plugins.md,
//! "Channel handlers"; the contract of docs/protocols/line.md).
//!
//! The connection tasks never run plugin code: they queue each event (connect, message,
//! disconnect) for the plugin's own thread, which calls the script or the library one event at a
//! time. That thread is what serializes the calls into a plugin (as
//! ffown's single IO thread did), keeps Python's GIL off the async workers, and keeps a native
//! plugin's blocking off them too. Reloads run on the same thread, between two events.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use bytes::Bytes;
use futures_util::future::BoxFuture;
use parking_lot::RwLock;
use serde_json::Value;
use tokio::sync::{mpsc, oneshot};
use warren::gate::line::{Channel, ChannelHandler};

use crate::slot::{PluginSlot, Versioned};
use crate::{ChannelPluginOptions, MsgType, Plugin, PluginError, PluginKind};

/// One loaded version of a channel-handler plugin, called on the plugin's thread only. Errors
/// are the plugin's (a script exception with its traceback, a native return code): the worker
/// logs them and the connection stays.
pub(crate) trait ChannelVersion: Send + Sync {
    /// `handle_connect`, when the plugin defines it.
    fn connect(&self, channel: &Channel) -> Result<(), String>;
    /// `handle_msg`.
    fn msg(&self, channel: &Channel, msg: Bytes) -> Result<(), String>;
    /// `handle_broken`, when the plugin defines it.
    fn broken(&self, channel: &Channel) -> Result<(), String>;
    /// The plugin's `export_state()`, asked of the running version before a reload switches:
    /// `None` when it has none.
    fn export_state(&self) -> Result<Option<Value>, String> {
        Ok(None)
    }
    /// Whether the plugin defines `import_state(state)`.
    fn imports_state(&self) -> bool {
        false
    }
    /// The new version's `import_state(state)`; an error fails the reload.
    fn import_state(&self, _state: Value) -> Result<(), String> {
        Ok(())
    }
}

/// What every version of one channel plugin shares: the live channels by id (what
/// `channel.send(id, msg)` looks up), and for native plugins the handles they were given.
pub(crate) struct ChannelShared {
    /// Channels from their first event until the plugin has seen them close.
    pub(crate) channels: RwLock<HashMap<u64, Channel>>,
    /// Native plugins: one stable `WarrenChannel` per live channel, across reloads.
    #[cfg(feature = "native")]
    pub(crate) native: crate::native::Handles,
}

impl ChannelShared {
    /// The live channel with this id.
    pub(crate) fn get(&self, id: u64) -> Option<Channel> {
        self.channels.read().get(&id).cloned()
    }

    /// `channel.send(id, msg)`: 0 when queued, −1 for an unknown or closed channel.
    pub(crate) fn send(&self, id: u64, msg: Bytes) -> i32 {
        self.get(id).map_or(-1, |c| c.send(msg))
    }

    /// `channel.close(id)`: 0 when the channel was live, −1 otherwise.
    pub(crate) fn close(&self, id: u64) -> i32 {
        match self.get(id) {
            Some(c) => {
                c.close();
                0
            }
            None => -1,
        }
    }
}

enum Event {
    Connect(Channel),
    Msg(Channel, Bytes),
    Broken(Channel),
    Reload(oneshot::Sender<Result<u64, PluginError>>),
}

/// A channel-handler plugin: give it to `NodeBuilder::channel_handler` (it is a
/// [`ChannelHandler`]), keep it to [`Plugin::reload`] it.
pub struct ChannelPlugin {
    name: String,
    kind: PluginKind,
    slot: Arc<PluginSlot<dyn ChannelVersion>>,
    events: mpsc::Sender<Event>,
}

impl std::fmt::Debug for ChannelPlugin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChannelPlugin")
            .field("path", &self.slot.path())
            .field("kind", &self.kind)
            .field("version", &self.slot.version())
            .finish()
    }
}

/// What a version is loaded from, kept by the plugin's thread for reloads.
struct Source {
    kind: PluginKind,
    path: PathBuf,
    options: ChannelPluginOptions,
}

impl Source {
    /// Load a version (`reload`: not the first).
    fn load(
        &self,
        shared: &Arc<ChannelShared>,
        reload: bool,
    ) -> Result<Arc<dyn ChannelVersion>, PluginError> {
        let _ = reload;
        match self.kind {
            #[cfg(feature = "lua")]
            PluginKind::Lua => crate::lua::channel::load(&self.path, &self.options, shared),
            #[cfg(feature = "python")]
            PluginKind::Python => crate::python::channel::load(&self.path, &self.options, shared),
            #[cfg(feature = "native")]
            PluginKind::Native => crate::native::load(&self.path, shared, reload),
            #[allow(unreachable_patterns)]
            other => {
                let _ = shared;
                Err(other.not_built(&self.path))
            }
        }
    }
}

impl ChannelPlugin {
    /// Load the plugin at `path` on a thread of its own and start serving events there. Fails
    /// with the file's first error (with its line for a script), a missing `handle_msg`, or a
    /// native plugin of another ABI version.
    pub fn load(
        path: impl AsRef<Path>,
        options: &ChannelPluginOptions,
    ) -> Result<Arc<ChannelPlugin>, PluginError> {
        let path = path.as_ref().to_owned();
        let kind = PluginKind::from_path(&path)?;
        kind.require_built(&path)?;
        if options.python_msg_type == MsgType::Json {
            return Err(PluginError::Options {
                path,
                message: "a channel handler's msg is text or bytes, not json".into(),
            });
        }
        let name = path
            .file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_default();
        let shared = Arc::new(ChannelShared {
            channels: RwLock::new(HashMap::new()),
            #[cfg(feature = "native")]
            native: Default::default(),
        });
        let source = Source {
            kind,
            path: path.clone(),
            options: options.clone(),
        };
        let (events, rx) = mpsc::channel(options.queue.max(1));
        let (loaded_tx, loaded_rx) = std::sync::mpsc::sync_channel(1);
        let thread_shared = shared;
        std::thread::Builder::new()
            .name(format!("plugin-{name}"))
            .spawn(move || {
                let first = match source.load(&thread_shared, false) {
                    Ok(v) => v,
                    Err(e) => {
                        let _ = loaded_tx.send(Err(e));
                        return;
                    }
                };
                let slot = Arc::new(PluginSlot::new(&source.path, first));
                if loaded_tx.send(Ok(slot.clone())).is_err() {
                    return;
                }
                Worker {
                    source,
                    shared: thread_shared,
                    slot,
                    on: HashMap::new(),
                }
                .run(rx);
            })
            .map_err(|source| PluginError::Io {
                path: path.clone(),
                source,
            })?;
        let slot = loaded_rx
            .recv()
            .map_err(|_| PluginError::Stopped { path: path.clone() })??;
        tracing::info!(plugin = %path.display(), kind = %kind, version = 1, "channel plugin loaded");
        crate::count_load(kind);
        Ok(Arc::new(ChannelPlugin {
            name,
            kind,
            slot,
            events,
        }))
    }

    /// Queue an event for the plugin's thread. A connect or message that finds the queue full
    /// closes its connection (the plugin cannot keep up; nothing is dropped silently).
    fn enqueue(&self, channel: &Channel, event: Event) {
        match self.events.try_send(event) {
            Ok(()) => {}
            Err(mpsc::error::TrySendError::Full(_)) => {
                metrics::counter!("warren_plugin_queue_full_total").increment(1);
                tracing::warn!(plugin = %self.slot.path().display(), channel = channel.id(), peer = %channel.peer(), "plugin queue full: closing the connection");
                channel.close();
            }
            Err(mpsc::error::TrySendError::Closed(_)) => {
                tracing::warn!(plugin = %self.slot.path().display(), channel = channel.id(), "plugin stopped: closing the connection");
                channel.close();
            }
        }
    }
}

impl ChannelHandler for ChannelPlugin {
    fn on_connect(&self, channel: &Channel) {
        self.enqueue(channel, Event::Connect(channel.clone()));
    }

    fn handle_msg(&self, channel: &Channel, msg: Bytes) {
        self.enqueue(channel, Event::Msg(channel.clone(), msg));
    }

    fn handle_broken(&self, channel: &Channel) {
        // a disconnect is never dropped: when the queue is full it waits for room off this task
        match self.events.try_send(Event::Broken(channel.clone())) {
            Ok(()) => {}
            Err(mpsc::error::TrySendError::Full(event)) => {
                let events = self.events.clone();
                match tokio::runtime::Handle::try_current() {
                    Ok(rt) => {
                        rt.spawn(async move {
                            let _ = events.send(event).await;
                        });
                    }
                    Err(_) => {
                        let _ = events.blocking_send(event);
                    }
                }
            }
            Err(mpsc::error::TrySendError::Closed(_)) => {}
        }
    }
}

impl Plugin for ChannelPlugin {
    fn name(&self) -> &str {
        &self.name
    }

    fn path(&self) -> &Path {
        self.slot.path()
    }

    fn kind(&self) -> PluginKind {
        self.kind
    }

    fn version(&self) -> u64 {
        self.slot.version()
    }

    fn reload(&self) -> BoxFuture<'_, Result<u64, PluginError>> {
        Box::pin(async move {
            let stopped = || PluginError::Stopped {
                path: self.slot.path().to_owned(),
            };
            let (tx, rx) = oneshot::channel();
            self.events
                .send(Event::Reload(tx))
                .await
                .map_err(|_| stopped())?;
            rx.await.map_err(|_| stopped())?
        })
    }
}

/// The plugin's thread: calls the plugin for each event, in order.
struct Worker {
    source: Source,
    shared: Arc<ChannelShared>,
    slot: Arc<PluginSlot<dyn ChannelVersion>>,
    /// The version each live channel last used (a channel moves to a new version at its next
    /// message; until then its disconnect goes to the version that knows it).
    on: HashMap<u64, Arc<Versioned<dyn ChannelVersion>>>,
}

impl Worker {
    fn run(mut self, mut rx: mpsc::Receiver<Event>) {
        while let Some(event) = rx.blocking_recv() {
            match event {
                Event::Connect(ch) => {
                    self.seen(&ch);
                    let v = self.slot.current();
                    let r = v.value.connect(&ch);
                    self.report(&v, &ch, "handle_connect", r);
                    self.on.insert(ch.id(), v);
                }
                Event::Msg(ch, msg) => {
                    let v = self.slot.current();
                    match self.on.get(&ch.id()) {
                        // lazy channels come into existence with their first message
                        None => self.seen(&ch),
                        Some(old) if old.version != v.version => {
                            tracing::debug!(plugin = %self.slot.path().display(), channel = ch.id(), from = old.version, to = v.version, "channel moves to the new version");
                        }
                        Some(_) => {}
                    }
                    self.on.insert(ch.id(), v.clone());
                    let r = v.value.msg(&ch, msg);
                    self.report(&v, &ch, "handle_msg", r);
                }
                Event::Broken(ch) => {
                    // only a channel the plugin has seen is reported closed
                    if let Some(v) = self.on.remove(&ch.id()) {
                        let r = v.value.broken(&ch);
                        self.report(&v, &ch, "handle_broken", r);
                    }
                    self.shared.channels.write().remove(&ch.id());
                    #[cfg(feature = "native")]
                    self.shared.native.forget(ch.id());
                }
                Event::Reload(reply) => {
                    let _ = reply.send(self.reload());
                }
            }
        }
    }

    /// A channel's first event: from now on `channel.send(id, …)` finds it.
    fn seen(&self, ch: &Channel) {
        self.shared.channels.write().insert(ch.id(), ch.clone());
    }

    fn report(
        &self,
        v: &Versioned<dyn ChannelVersion>,
        ch: &Channel,
        entry: &str,
        r: Result<(), String>,
    ) {
        if let Err(error) = r {
            metrics::counter!("warren_plugin_errors_total").increment(1);
            tracing::warn!(plugin = %self.slot.path().display(), version = v.version, channel = ch.id(), peer = %ch.peer(), entry, %error, "plugin call failed");
        }
    }

    fn reload(&mut self) -> Result<u64, PluginError> {
        let path = self.slot.path().to_owned();
        let next = self.slot.next_version();
        let new = match self.source.load(&self.shared, true) {
            Ok(v) => v,
            Err(e) => {
                tracing::warn!(plugin = %path.display(), version = next, error = %e, "reload failed; the running version stays");
                crate::count_reload(self.source.kind, false);
                return Err(e);
            }
        };
        let old = self.slot.current();
        let carried = carry_state(&path, &*old.value, &*new);
        if let Err(e) = carried {
            tracing::warn!(plugin = %path.display(), version = next, error = %e, "reload failed; the running version stays");
            crate::count_reload(self.source.kind, false);
            return Err(e);
        }
        let version = self.slot.install(new);
        tracing::info!(plugin = %path.display(), kind = %self.source.kind, version, state = if carried.unwrap_or(false) { "carried over" } else { "reset" }, "channel plugin reloaded");
        crate::count_reload(self.source.kind, true);
        Ok(version)
    }
}

/// Hand the old version's state to the new one when both ask for it (`export_state` and
/// `import_state`); `Ok(true)` when state was carried over, `Ok(false)` when it starts afresh.
fn carry_state(
    path: &Path,
    old: &dyn ChannelVersion,
    new: &dyn ChannelVersion,
) -> Result<bool, PluginError> {
    if !new.imports_state() {
        return Ok(false);
    }
    let state = old
        .export_state()
        .map_err(|e| PluginError::script(path, None, format!("export_state failed: {e}")))?;
    match state {
        None => Ok(false),
        Some(state) => {
            new.import_state(state).map_err(|e| {
                PluginError::script(path, None, format!("import_state failed: {e}"))
            })?;
            Ok(true)
        }
    }
}

//! [`Plugins`]: the plugins this node loaded — module plugins and line listeners' channel
//! handlers — with what an operator asks about them: which file, which version runs since when,
//! and why the last reload failed. The file watcher and the admin API reload through it, so the
//! record stays true whoever reloads.

use std::path::Path;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime};

use serde_json::Value;
use warren::CallError;
use warren_cluster::redis::RedisRpc;
use warren_plugin::{ChannelPlugin, ModulePlugin, Plugin, PluginError, PluginKind, RedisRpcCaller};

/// A boxed future, as the plugin traits return them.
type BoxFuture<'a, T> = std::pin::Pin<Box<dyn std::future::Future<Output = T> + Send + 'a>>;

/// What a plugin is to the node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PluginRole {
    /// The module plugin of this module type.
    Module(String),
    /// The channel handler of the line listener at this address (as configured).
    Listener(String),
}

impl PluginRole {
    /// `module` or `listener`, for listings.
    pub fn as_str(&self) -> &'static str {
        match self {
            PluginRole::Module(_) => "module",
            PluginRole::Listener(_) => "listener",
        }
    }
}

/// Why the last reload of a plugin failed (cleared by the next one that succeeds).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReloadFailure {
    /// When it failed.
    pub at: SystemTime,
    /// The error, `file:line: message` for a script error.
    pub message: String,
    /// The line of the file, when the error names one.
    pub line: Option<u32>,
}

/// What changes over a plugin's life, under one lock.
#[derive(Debug)]
struct Status {
    /// When the running version was loaded.
    loaded_at: SystemTime,
    last_error: Option<ReloadFailure>,
}

/// One loaded plugin: its handle, its role, and its reload record. It is itself a [`Plugin`]
/// whose `reload` keeps the record, so a watcher given it needs nothing else.
pub struct PluginEntry {
    name: String,
    role: PluginRole,
    plugin: Arc<dyn Plugin>,
    module: Option<Arc<ModulePlugin>>,
    status: Mutex<Status>,
}

impl std::fmt::Debug for PluginEntry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PluginEntry")
            .field("name", &self.name)
            .field("role", &self.role)
            .field("path", &self.plugin.path())
            .field("version", &self.plugin.version())
            .finish_non_exhaustive()
    }
}

impl PluginEntry {
    fn status(&self) -> MutexGuard<'_, Status> {
        self.status.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The module type or the listener it serves.
    pub fn role(&self) -> &PluginRole {
        &self.role
    }

    /// The module plugin, for a module (to patch its handlers).
    pub fn module(&self) -> Option<&Arc<ModulePlugin>> {
        self.module.as_ref()
    }

    /// When the running version was loaded.
    pub fn loaded_at(&self) -> SystemTime {
        self.status().loaded_at
    }

    /// Why the last reload failed, unless one succeeded since.
    pub fn last_error(&self) -> Option<ReloadFailure> {
        self.status().last_error.clone()
    }

    /// Handlers replaced at run time on the running version (modules only).
    pub fn patched(&self) -> Vec<String> {
        self.module
            .as_ref()
            .map(|m| m.patched_handlers())
            .unwrap_or_default()
    }

    async fn reload_recorded(&self) -> Result<u64, PluginError> {
        let r = self.plugin.reload().await;
        let result = if r.is_ok() { "ok" } else { "failed" };
        metrics::counter!("warren_plugin_reloads_total", "result" => result).increment(1);
        let mut status = self.status();
        match &r {
            Ok(_) => {
                status.loaded_at = SystemTime::now();
                status.last_error = None;
            }
            Err(e) => {
                status.last_error = Some(ReloadFailure {
                    at: SystemTime::now(),
                    message: e.to_string(),
                    line: e.line(),
                });
            }
        }
        r
    }
}

impl Plugin for PluginEntry {
    fn name(&self) -> &str {
        &self.name
    }

    fn path(&self) -> &Path {
        self.plugin.path()
    }

    fn kind(&self) -> PluginKind {
        self.plugin.kind()
    }

    fn version(&self) -> u64 {
        self.plugin.version()
    }

    /// Reload the plugin, recording when the new version loaded or why it did not.
    fn reload(&self) -> BoxFuture<'_, Result<u64, PluginError>> {
        Box::pin(self.reload_recorded())
    }
}

/// The plugins of this node, in the order they were loaded. Cheap to share (`Arc`); built as
/// the node loads its plugins, read by the admin API and the file watcher.
#[derive(Debug, Default)]
pub struct Plugins {
    entries: Mutex<Vec<Arc<PluginEntry>>>,
}

impl Plugins {
    /// An empty list.
    pub fn new() -> Plugins {
        Plugins::default()
    }

    fn entries(&self) -> MutexGuard<'_, Vec<Arc<PluginEntry>>> {
        self.entries.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Add an entry under `name`, or under `name@<n>` when the name is taken (two instances of
    /// one plugin module type).
    fn add(
        &self,
        name: &str,
        role: PluginRole,
        plugin: Arc<dyn Plugin>,
        module: Option<Arc<ModulePlugin>>,
    ) -> Arc<PluginEntry> {
        let mut entries = self.entries();
        let taken = |n: &str| entries.iter().any(|e| e.name == n);
        let mut unique = name.to_owned();
        let mut n = 2;
        while taken(&unique) {
            unique = format!("{name}@{n}");
            n += 1;
        }
        let entry = Arc::new(PluginEntry {
            name: unique,
            role,
            plugin,
            module,
            status: Mutex::new(Status {
                loaded_at: SystemTime::now(),
                last_error: None,
            }),
        });
        entries.push(entry.clone());
        entry
    }

    /// Record a module plugin the node runs; its name is the module type.
    pub fn add_module(&self, plugin: Arc<ModulePlugin>) -> Arc<PluginEntry> {
        let kind = plugin.name().to_owned();
        self.add(
            &kind,
            PluginRole::Module(kind.clone()),
            plugin.clone(),
            Some(plugin),
        )
    }

    /// Record the channel-handler plugin of the line listener at `addr` (as configured); its
    /// name is `line@<addr>`.
    pub fn add_listener(&self, addr: &str, plugin: Arc<ChannelPlugin>) -> Arc<PluginEntry> {
        self.add(
            &format!("line@{addr}"),
            PluginRole::Listener(addr.to_owned()),
            plugin,
            None,
        )
    }

    /// Every plugin, in load order.
    pub fn list(&self) -> Vec<Arc<PluginEntry>> {
        self.entries().clone()
    }

    /// The plugin called `name`.
    pub fn get(&self, name: &str) -> Option<Arc<PluginEntry>> {
        self.entries().iter().find(|e| e.name == name).cloned()
    }

    /// The plugins of module type `kind` (one per instance on this node).
    pub fn modules_of(&self, kind: &str) -> Vec<Arc<PluginEntry>> {
        self.entries()
            .iter()
            .filter(|e| matches!(&e.role, PluginRole::Module(k) if k == kind))
            .cloned()
            .collect()
    }

    /// Every plugin as a [`Plugin`] whose reloads keep this record: what a file watcher is
    /// given.
    pub fn watched(&self) -> Vec<Arc<dyn Plugin>> {
        self.entries()
            .iter()
            .map(|e| e.clone() as Arc<dyn Plugin>)
            .collect()
    }

    /// Give every module plugin the node's TianQinS Redis-RPC endpoint, for the scripts'
    /// `warren.rpc_call` and `warren.rpc_notify` (the endpoint starts after the node).
    pub fn connect_redis_rpc(&self, rpc: &Arc<RedisRpc>) {
        let caller: Arc<dyn RedisRpcCaller> = Arc::new(RedisPeers(rpc.clone()));
        for e in self.entries().iter() {
            if let Some(m) = &e.module {
                m.set_redis_rpc(caller.clone());
            }
        }
    }

    /// The module plugins, for what the node hands them once it runs (backend groups).
    pub fn modules(&self) -> Vec<Arc<ModulePlugin>> {
        self.entries()
            .iter()
            .filter_map(|e| e.module.clone())
            .collect()
    }

    /// Whether no plugin is loaded.
    pub fn is_empty(&self) -> bool {
        self.entries().is_empty()
    }

    /// Reload every plugin, one after another, as the file watcher and the admin API reload one:
    /// what SIGHUP does for plugins, so an operator with watching off can pick up every edited
    /// file at once. Each result is logged with `cause` (what asked): the version that now runs,
    /// or why the file does not load while the running version goes on serving.
    pub async fn reload_all(&self, cause: &str) -> ReloadAll {
        let mut done = ReloadAll::default();
        for entry in self.list() {
            let before = entry.version();
            match entry.reload().await {
                Ok(version) => {
                    done.reloaded += 1;
                    tracing::info!(plugin = entry.name(), path = %entry.path().display(), from = before, version, "{cause}: plugin reloaded: version {version} runs");
                }
                Err(error) => {
                    done.failed += 1;
                    tracing::warn!(plugin = entry.name(), path = %entry.path().display(), running = before, %error, "{cause}: plugin does not load: version {before} keeps running");
                }
            }
        }
        done
    }
}

/// What [`Plugins::reload_all`] came to, for its summary line and for tests.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct ReloadAll {
    /// Plugins now running a new version.
    pub reloaded: usize,
    /// Plugins whose file did not load: their running version goes on serving.
    pub failed: usize,
}

/// The node's Redis-RPC endpoint as the plugins call it.
struct RedisPeers(Arc<RedisRpc>);

impl RedisRpcCaller for RedisPeers {
    fn call(
        &self,
        topic: String,
        func: String,
        args: Vec<Value>,
        timeout: Duration,
    ) -> BoxFuture<'static, Result<Vec<Value>, CallError>> {
        let rpc = self.0.clone();
        Box::pin(async move { rpc.call(&topic, &func, args, timeout).await })
    }

    fn notify(
        &self,
        topic: String,
        func: String,
        args: Vec<Value>,
    ) -> BoxFuture<'static, Result<(), CallError>> {
        let rpc = self.0.clone();
        Box::pin(async move { rpc.notify(&topic, &func, args).await })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use warren_plugin::ModulePluginOptions;

    /// A directory under the temporary one, removed when dropped.
    struct Dir(std::path::PathBuf);

    impl Drop for Dir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    #[tokio::test]
    async fn reload_all_reloads_every_plugin_and_keeps_one_that_does_not_load() {
        let dir =
            Dir(std::env::temp_dir().join(format!("warren-app-reload-all-{}", std::process::id())));
        std::fs::create_dir_all(&dir.0).expect("temp dir");
        let (a, b) = (dir.0.join("a.lua"), dir.0.join("b.lua"));
        std::fs::write(&a, "function HD_Hello(s, m) return 'a1' end\n").expect("write");
        std::fs::write(&b, "function HD_Hello(s, m) return 'b1' end\n").expect("write");
        let plugins = Plugins::new();
        let options = ModulePluginOptions::default();
        for (kind, path) in [("A", &a), ("B", &b)] {
            plugins.add_module(ModulePlugin::load(kind, path, &options).expect("loads"));
        }
        assert_eq!(
            plugins.reload_all("test").await,
            ReloadAll {
                reloaded: 2,
                failed: 0
            }
        );
        std::fs::write(&b, "function HD_Hello(s, m) return 'b3' \n").expect("write");
        assert_eq!(
            plugins.reload_all("test").await,
            ReloadAll {
                reloaded: 1,
                failed: 1
            }
        );
        let (ea, eb) = (plugins.get("A").expect("A"), plugins.get("B").expect("B"));
        assert_eq!((ea.version(), eb.version()), (3, 2));
        assert!(ea.last_error().is_none());
        let failure = eb.last_error().expect("B's failure is recorded");
        assert!(failure.message.contains("b.lua:"), "{}", failure.message);
        assert!(failure.line.is_some(), "{failure:?}");
    }
}

//! [`PluginWatcher`]: reload plugins when their files change (docs/plugins.md, "Reloading").
//!
//! Editors save in different ways: some write the file in place, others write a new file beside
//! it and rename it over the old one, which replaces the file (and its inode) altogether. A
//! watch on the file itself would lose track after the first such save, so the watcher watches
//! the **directory** holding each plugin and matches events by file name. Events are debounced
//! (`notify-debouncer-full`): a file must stay unchanged for the debounce time before it is
//! reloaded, so the several writes of one save make one reload.
//!
//! A reload runs [`Plugin::reload`]: the new version loads beside the running one, and a file
//! that does not load leaves the running version serving. Either way the outcome is logged, the
//! new version's number or the error with its file and line.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use notify::event::{AccessKind, AccessMode, EventKind};
use notify::{RecommendedWatcher, RecursiveMode};
use notify_debouncer_full::{DebounceEventResult, Debouncer, RecommendedCache, new_debouncer};
use tokio::sync::mpsc;

use crate::Plugin;

/// Why the watcher did not start.
#[derive(Debug, thiserror::Error)]
pub enum WatchError {
    /// The directory of a plugin file could not be resolved (it does not exist, or cannot be
    /// read).
    #[error("{}: cannot watch the plugin's directory: {source}", path.display())]
    Directory {
        /// The plugin file.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// The operating system's file watch could not be set up (inotify limits, for example).
    #[error("{}: cannot watch: {source}", dir.display())]
    Watch {
        /// The directory.
        dir: PathBuf,
        /// The cause.
        source: notify::Error,
    },
    /// [`PluginWatcher::start`] was called outside a tokio runtime, where reloads run.
    #[error("the plugin watcher needs a tokio runtime")]
    NoRuntime,
}

/// A plugin file as the watcher matches it: its directory (resolved) and its name.
struct Watched {
    plugin: Arc<dyn Plugin>,
    /// The file's full path under the resolved directory: what events name.
    file: PathBuf,
}

/// Watches the files of a set of plugins and reloads each one when its file changes. Dropping
/// it stops the watching.
pub struct PluginWatcher {
    /// The OS watch and the debouncing thread; dropped (stopped) with the watcher.
    _debouncer: Debouncer<RecommendedWatcher, RecommendedCache>,
    /// The task that runs the reloads.
    task: tokio::task::JoinHandle<()>,
    /// How many plugin files are watched.
    files: usize,
}

impl std::fmt::Debug for PluginWatcher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PluginWatcher")
            .field("files", &self.files)
            .finish_non_exhaustive()
    }
}

impl PluginWatcher {
    /// Watch the file of every plugin in `plugins` and reload a plugin when its file has changed
    /// and then stayed unchanged for `debounce`. Reloads run one at a time on a task of the
    /// current tokio runtime. Several plugins loaded from one file are all reloaded.
    pub fn start(
        plugins: Vec<Arc<dyn Plugin>>,
        debounce: Duration,
    ) -> Result<PluginWatcher, WatchError> {
        let runtime = tokio::runtime::Handle::try_current().map_err(|_| WatchError::NoRuntime)?;
        let mut watched = Vec::with_capacity(plugins.len());
        let mut dirs = BTreeSet::new();
        for plugin in plugins {
            let (dir, file) = resolve(plugin.path())?;
            dirs.insert(dir);
            watched.push(Watched { plugin, file });
        }
        let watched = Arc::new(watched);
        let (tx, rx) = mpsc::channel::<Vec<usize>>(16);
        let matcher = watched.clone();
        let debounce = debounce.max(Duration::from_millis(1));
        let mut debouncer = new_debouncer(debounce, None, move |result: DebounceEventResult| {
            match result {
                Ok(events) => {
                    let changed = changed_plugins(&matcher, &events);
                    if !changed.is_empty() {
                        // the reload task is gone only when the watcher is being dropped
                        let _ = tx.blocking_send(changed);
                    }
                }
                Err(errors) => {
                    for error in errors {
                        tracing::warn!(%error, "plugin file watch error");
                    }
                }
            }
        })
        .map_err(|source| WatchError::Watch {
            dir: dirs.first().cloned().unwrap_or_default(),
            source,
        })?;
        for dir in &dirs {
            debouncer
                .watch(dir, RecursiveMode::NonRecursive)
                .map_err(|source| WatchError::Watch {
                    dir: dir.clone(),
                    source,
                })?;
        }
        for w in watched.iter() {
            tracing::info!(plugin = w.plugin.name(), path = %w.plugin.path().display(), "watching the plugin file");
        }
        let files = watched.len();
        let task = runtime.spawn(reload_loop(watched, rx));
        Ok(PluginWatcher {
            _debouncer: debouncer,
            task,
            files,
        })
    }

    /// How many plugin files are watched.
    pub fn files(&self) -> usize {
        self.files
    }
}

impl Drop for PluginWatcher {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// A plugin file's directory, resolved (symbolic links and `..` followed, as the OS reports
/// event paths), and the file's path under it.
fn resolve(path: &Path) -> Result<(PathBuf, PathBuf), WatchError> {
    let err = |source| WatchError::Directory {
        path: path.to_owned(),
        source,
    };
    let name = path.file_name().ok_or_else(|| {
        err(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            "not a file name",
        ))
    })?;
    let parent = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    let dir = std::fs::canonicalize(parent).map_err(err)?;
    let file = dir.join(name);
    Ok((dir, file))
}

/// The plugins (indexes into `watched`) whose file one of `events` says was written, created
/// or renamed into place, and which exists now.
fn changed_plugins(
    watched: &[Watched],
    events: &[notify_debouncer_full::DebouncedEvent],
) -> Vec<usize> {
    let mut changed = BTreeSet::new();
    for event in events {
        let writes = match event.kind {
            EventKind::Create(_) | EventKind::Modify(_) | EventKind::Any | EventKind::Other => true,
            EventKind::Access(AccessKind::Close(AccessMode::Write)) => true,
            EventKind::Access(_) | EventKind::Remove(_) => false,
        };
        if !writes {
            continue;
        }
        for (i, w) in watched.iter().enumerate() {
            if event.paths.contains(&w.file) {
                changed.insert(i);
            }
        }
    }
    // a file renamed away or deleted is not reloaded: the version running stays until one is
    // written back
    changed.retain(|i| watched[*i].file.is_file());
    changed.into_iter().collect()
}

/// Reload the plugins the debouncer reports, one at a time, logging each outcome.
async fn reload_loop(watched: Arc<Vec<Watched>>, mut rx: mpsc::Receiver<Vec<usize>>) {
    while let Some(changed) = rx.recv().await {
        for i in changed {
            let Some(w) = watched.get(i) else { continue };
            let plugin = &w.plugin;
            let running = plugin.version();
            match plugin.reload().await {
                Ok(version) => {
                    tracing::info!(plugin = plugin.name(), path = %plugin.path().display(), version, "plugin file changed: version {version} runs");
                }
                Err(error) => {
                    tracing::warn!(plugin = plugin.name(), path = %plugin.path().display(), running, %error, "plugin file changed but does not load: version {running} keeps running");
                }
            }
        }
    }
}

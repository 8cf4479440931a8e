//! The file watcher: a plugin whose file is written in place, or replaced by a rename as many
//! editors save, is reloaded; a file that does not load keeps the running version; the
//! connection of a line client stays open throughout.

use std::future::Future;
use std::path::Path;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;
use warren_plugin::{ChannelPlugin, Plugin, PluginError, PluginKind, PluginWatcher};

use crate::kit::{self, LineClient};

/// A plugin as the watcher sees it, keeping the outcome of every reload the watcher asks for
/// (the real plugin does the reloading).
struct Recorded {
    plugin: Arc<ChannelPlugin>,
    outcomes: Mutex<Vec<Result<u64, String>>>,
}

impl Plugin for Recorded {
    fn name(&self) -> &str {
        self.plugin.name()
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
    fn reload(&self) -> Pin<Box<dyn Future<Output = Result<u64, PluginError>> + Send + '_>> {
        Box::pin(async move {
            let r = self.plugin.reload().await;
            self.outcomes
                .lock()
                .push(r.as_ref().map(|v| *v).map_err(ToString::to_string));
            r
        })
    }
}

impl Recorded {
    /// Wait until the watcher has asked for a reload that failed; its error.
    async fn failed(&self) -> String {
        loop {
            if let Some(Err(e)) = self.outcomes.lock().iter().find(|r| r.is_err()) {
                return e.clone();
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
}

/// Send messages on `c` until the answer starts with `want` (the watcher has reloaded the
/// version that says it); that answer.
async fn answered_by(c: &mut LineClient, want: &str) -> String {
    loop {
        c.send(b"1\r\nx").await;
        let got = c.text().await;
        if got.starts_with(want) {
            return got;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Replace `name` in `dir` the way editors that save by rename do: write a new file beside it,
/// then rename it over the old one.
fn save_by_rename(dir: &Path, name: &str, text: &str) {
    let tmp = dir.join(format!(".{name}.swp"));
    std::fs::write(&tmp, text).unwrap();
    std::fs::rename(&tmp, dir.join(name)).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_changed_file_is_reloaded_and_a_broken_one_keeps_the_running_version() {
    let dir = tempfile::tempdir().unwrap();
    let v = |n: u32| format!("function handle_msg(id, msg) channel.send(id, 'v{n} ' .. msg) end\n");
    let path = kit::write(dir.path(), "hot.lua", &v(1));
    kit::write(dir.path(), "other.lua", "-- a neighbour: not a plugin\n");
    let plugin = ChannelPlugin::load(&path, &Default::default()).unwrap();
    let recorded = Arc::new(Recorded {
        plugin: plugin.clone(),
        outcomes: Mutex::new(Vec::new()),
    });
    let watcher = PluginWatcher::start(
        vec![recorded.clone() as Arc<dyn Plugin>],
        Duration::from_millis(50),
    )
    .unwrap();
    assert_eq!(watcher.files(), 1);
    let node = kit::line_node(plugin.clone()).await;
    let mut c = LineClient::connect(&node).await;
    c.send(b"1\r\na").await;
    assert_eq!(c.text().await, "v1 a");

    // written in place
    std::fs::write(&path, v(2)).unwrap();
    assert_eq!(answered_by(&mut c, "v2 ").await, "v2 x");

    // replaced by a rename, twice: the watch follows the name, not the first file
    save_by_rename(dir.path(), "hot.lua", &v(3));
    answered_by(&mut c, "v3 ").await;
    save_by_rename(dir.path(), "hot.lua", &v(4));
    answered_by(&mut c, "v4 ").await;
    let running = plugin.version();
    assert!(running >= 4, "{running}");

    // beside a change of a neighbour, a broken save: the running version stays, and the error
    // says where
    std::fs::write(dir.path().join("other.lua"), "-- changed\n").unwrap();
    std::fs::write(
        &path,
        "function handle_msg(id, msg)\n  channel.send(id, msg\nend\n",
    )
    .unwrap();
    let e = recorded.failed().await;
    assert!(e.starts_with(&format!("{}:", path.display())), "{e}");
    assert!(
        e.contains(":3:") || e.contains(":2:"),
        "the line is named: {e}"
    );
    assert_eq!(plugin.version(), running);
    c.send(b"1\r\nd").await;
    assert_eq!(c.text().await, "v4 d");

    // fixed: the next version loads, and the connection never closed
    std::fs::write(&path, v(5)).unwrap();
    answered_by(&mut c, "v5 ").await;
    assert!(plugin.version() > running);
    drop(watcher);
    node.shutdown().await;
}

#[tokio::test]
async fn a_plugin_in_a_missing_directory_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let path = kit::write(dir.path(), "echo.lua", "function handle_msg(id, m) end\n");
    let plugin = ChannelPlugin::load(&path, &Default::default()).unwrap();
    drop(dir);
    let e = PluginWatcher::start(vec![plugin as Arc<dyn Plugin>], Duration::from_millis(50))
        .unwrap_err();
    assert!(e.to_string().contains("cannot watch"), "{e}");
}

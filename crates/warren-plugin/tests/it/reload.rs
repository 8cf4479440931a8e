//! Reloading: a new version loads beside the running one; connections stay and move at their
//! next message; calls in flight finish on the old version; a broken file keeps the running
//! version and says where it is broken; state carries over only when both versions ask.

use std::sync::Arc;

use bytes::Bytes;
use tokio::sync::Notify;
use warren::config::ModuleConfig;
use warren::{CallError, Context, Execution, Module};
use warren_plugin::{ChannelPlugin, ModulePlugin, ModulePluginOptions, Plugin, PluginErrorKind};

use crate::kit::{self, LineClient};

/// Lua and Python channel handlers: the connection stays open across reloads and is answered by
/// the new version at its next message; a syntax error keeps the running version.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn channel_handlers_reload_under_a_live_connection() {
    let dir = tempfile::tempdir().unwrap();
    for (name, v1, v2, broken) in [
        (
            "hot.lua",
            "function handle_msg(id, msg) channel.send(id, 'v1 ' .. msg) end\n",
            "function handle_msg(id, msg) channel.send(id, 'v2 ' .. msg) end\n",
            "function handle_msg(id, msg)\n  channel.send(id, 'v3 ' .. msg\nend\n",
        ),
        (
            "hot.py",
            "import channel\ndef handle_msg(id, msg):\n    channel.send(id, 'v1 ' + msg)\n",
            "import channel\ndef handle_msg(id, msg):\n    channel.send(id, 'v2 ' + msg)\n",
            "import channel\ndef handle_msg(id, msg):\n    channel.send(id, 'v3 ' + msg\n",
        ),
    ] {
        let path = kit::write(dir.path(), name, v1);
        let plugin = ChannelPlugin::load(&path, &Default::default()).unwrap();
        let node = kit::line_node(plugin.clone()).await;
        let mut c = LineClient::connect(&node).await;
        c.send(b"1\r\na").await;
        assert_eq!(c.text().await, "v1 a", "{name}");

        kit::write(dir.path(), name, v2);
        assert_eq!(plugin.reload().await.unwrap(), 2, "{name}");
        c.send(b"1\r\nb").await;
        assert_eq!(c.text().await, "v2 b", "{name}");

        kit::write(dir.path(), name, broken);
        let e = plugin.reload().await.unwrap_err();
        assert_eq!(e.kind(), PluginErrorKind::Script, "{name}: {e}");
        assert!(e.line().is_some(), "{name}: {e}");
        assert!(
            e.to_string().starts_with(&path.display().to_string()),
            "{e}"
        );
        assert_eq!(plugin.version(), 2, "{name}");
        c.send(b"1\r\nc").await;
        assert_eq!(c.text().await, "v2 c", "{name}");

        // a new connection gets the running version too
        let mut d = LineClient::connect(&node).await;
        d.send(b"1\r\nd").await;
        assert_eq!(d.text().await, "v2 d", "{name}");
        node.shutdown().await;
    }
}

/// A native plugin rebuilt at the same path is loaded afresh (not the library already mapped).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rebuilt_native_plugin_reloads() {
    let dir = tempfile::tempdir().unwrap();
    let source = |reply: &str| {
        format!(
            "#include \"warren_plugin.h\"\n\
             static const WarrenHost *host;\n\
             uint32_t warren_plugin_abi_version(void) {{ return WARREN_PLUGIN_ABI_VERSION; }}\n\
             int32_t warren_plugin_init(const WarrenHost *h) {{ host = h; return 0; }}\n\
             int32_t warren_handle_msg(WarrenChannel *ch, const uint8_t *d, size_t n) {{\n\
               (void)d; (void)n; return host->send(ch, (const uint8_t *)\"{reply}\", {});\n\
             }}\n\
             int32_t warren_handle_broken(WarrenChannel *ch) {{ (void)ch; return 0; }}\n",
            reply.len()
        )
    };
    let c_file = kit::write(dir.path(), "hot.c", &source("one"));
    let lib = kit::build_c(&c_file, dir.path(), "hot");
    let plugin = ChannelPlugin::load(&lib, &Default::default()).unwrap();
    let node = kit::line_node(plugin.clone()).await;
    let mut c = LineClient::connect(&node).await;
    c.send(b"1\r\na").await;
    assert_eq!(c.text().await, "one");

    kit::write(dir.path(), "hot.c", &source("two"));
    let rebuilt = kit::build_c(&c_file, dir.path(), "hot");
    assert_eq!(rebuilt, lib);
    assert_eq!(plugin.reload().await.unwrap(), 2);
    c.send(b"1\r\nb").await;
    assert_eq!(c.text().await, "two");
    node.shutdown().await;
}

/// A Rust module whose `Wait` handler returns only when the test says so.
struct Hold {
    entered: Notify,
    release: Notify,
}

fn hold_module(hold: Arc<Hold>) -> Module {
    Module::builder("Hold", hold)
        .handler("Wait", |cx: Context<Arc<Hold>>, _: ()| async move {
            cx.state().entered.notify_one();
            cx.state().release.notified().await;
            Ok::<_, CallError>("released")
        })
        .build()
}

/// A call in flight when the reload lands finishes on the old version; calls made after it run
/// the new one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn calls_in_flight_finish_on_the_old_version() {
    let dir = tempfile::tempdir().unwrap();
    for (name, v1, v2) in [
        (
            "slow.lua",
            "function Slow(session, msg) return 'v1 ' .. warren.call('Hold', 'Wait') end\n\
             function Version(session, msg) return 'v1' end\n",
            "function Slow(session, msg) return 'v2 ' .. warren.call('Hold', 'Wait') end\n\
             function Version(session, msg) return 'v2' end\n",
        ),
        (
            "slow.py",
            "import warren\n\
             def Slow(session, msg):\n    return 'v1 ' + warren.call('Hold', 'Wait')\n\n\
             def Version(session, msg):\n    return 'v1'\n",
            "import warren\n\
             def Slow(session, msg):\n    return 'v2 ' + warren.call('Hold', 'Wait')\n\n\
             def Version(session, msg):\n    return 'v2'\n",
        ),
    ] {
        let path = kit::write(dir.path(), name, v1);
        let plugin = ModulePlugin::load("Slow", &path, &ModulePluginOptions::default()).unwrap();
        let hold = Arc::new(Hold {
            entered: Notify::new(),
            release: Notify::new(),
        });
        let node = kit::module_node(
            "mqtt://127.0.0.1:0",
            vec![
                (plugin.module(), ModuleConfig::new("Slow")),
                (hold_module(hold.clone()), ModuleConfig::new("Hold")),
            ],
        )
        .await;
        let h = node.handle().clone();
        let in_flight =
            tokio::spawn(async move { h.call("Slow", "Slow", None, Bytes::new(), None).await });
        hold.entered.notified().await;

        kit::write(dir.path(), name, v2);
        assert_eq!(plugin.reload().await.unwrap(), 2, "{name}");
        let now = node
            .handle()
            .call("Slow", "Version", None, Bytes::new(), None)
            .await
            .unwrap();
        assert_eq!(&now[..], br#""v2""#, "{name}");

        hold.release.notify_one();
        let old = in_flight.await.unwrap().unwrap();
        assert_eq!(&old[..], br#""v1 released""#, "{name}");
        node.shutdown().await;
    }
}

/// State moves to the new version only when the old one exports it and the new one imports
/// it; otherwise the new version starts afresh. `on_init` runs on every new version, and one
/// that fails keeps the running version.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn state_carries_over_when_both_versions_ask() {
    let dir = tempfile::tempdir().unwrap();
    let lua = [
        "count = 0\n\
         function on_init(settings) count = settings.start end\n\
         function Hit(session, msg) count = count + 1 return 'v1 ' .. count end\n\
         function export_state() return { count = count } end\n",
        "count = 0\n\
         function on_init(settings) end\n\
         function Hit(session, msg) count = count + 1 return 'v2 ' .. count end\n\
         function import_state(state) count = state.count end\n",
        "count = 0\n\
         function Hit(session, msg) count = count + 1 return 'v3 ' .. count end\n",
        "function on_init(settings)\n  error('database unreachable')\nend\n\
         function Hit(session, msg) return 'v4' end\n",
    ];
    let py = [
        "count = 0\n\
         def on_init(settings):\n    global count\n    count = settings['start']\n\n\
         def Hit(session, msg):\n    global count\n    count += 1\n    return 'v1 %d' % count\n\n\
         def export_state():\n    return {'count': count}\n",
        "count = 0\n\
         def Hit(session, msg):\n    global count\n    count += 1\n    return 'v2 %d' % count\n\n\
         def import_state(state):\n    global count\n    count = state['count']\n",
        "count = 0\n\
         def Hit(session, msg):\n    global count\n    count += 1\n    return 'v3 %d' % count\n",
        "def on_init(settings):\n    raise RuntimeError('database unreachable')\n\n\
         def Hit(session, msg):\n    return 'v4'\n",
    ];
    for (name, versions) in [("count.lua", lua), ("count.py", py)] {
        let path = kit::write(dir.path(), name, versions[0]);
        let options = ModulePluginOptions {
            execution: Execution::Sequential,
            ..Default::default()
        };
        let plugin = ModulePlugin::load("Count", &path, &options).unwrap();
        let mut cfg = ModuleConfig::new("Count");
        cfg.settings
            .insert("start".into(), toml::Value::Integer(10));
        let node = kit::module_node("mqtt://127.0.0.1:0", vec![(plugin.module(), cfg)]).await;
        let hit = || async {
            let r = node
                .handle()
                .call("Count", "Hit", None, Bytes::new(), None)
                .await
                .unwrap();
            serde_json::from_slice::<String>(&r).unwrap()
        };
        assert_eq!(hit().await, "v1 11", "{name}");
        assert_eq!(hit().await, "v1 12", "{name}");

        kit::write(dir.path(), name, versions[1]);
        assert_eq!(plugin.reload().await.unwrap(), 2, "{name}");
        assert_eq!(hit().await, "v2 13", "{name}");

        kit::write(dir.path(), name, versions[2]);
        assert_eq!(plugin.reload().await.unwrap(), 3, "{name}");
        assert_eq!(hit().await, "v3 1", "{name}");

        kit::write(dir.path(), name, versions[3]);
        let e = plugin.reload().await.unwrap_err();
        assert!(
            e.to_string().contains("database unreachable"),
            "{name}: {e}"
        );
        assert_eq!(e.line(), Some(2), "{name}: {e}");
        assert_eq!(plugin.version(), 3, "{name}");
        assert_eq!(hit().await, "v3 2", "{name}");
        node.shutdown().await;
    }
}

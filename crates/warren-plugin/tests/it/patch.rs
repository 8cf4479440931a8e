//! Replacing one handler of a running module plugin with a script body (the admin API's hotfix):
//! new calls run the new function, calls in flight finish on the old one, the module's globals
//! stay, a body that does not compile changes nothing, and a reload starts afresh from the file.

use std::sync::Arc;

use bytes::Bytes;
use tokio::sync::Notify;
use warren::config::ModuleConfig;
use warren::{CallError, Context, Module, Node};
use warren_plugin::{ModulePlugin, ModulePluginOptions, Plugin, PluginErrorKind};

use crate::kit;

/// Call `handler` of module `module` with `body`; the reply decoded as a JSON string.
async fn call(node: &Node, module: &str, handler: &str, body: &str) -> Result<String, CallError> {
    let r = node
        .handle()
        .call(module, handler, None, Bytes::from(body.to_owned()), None)
        .await?;
    Ok(serde_json::from_slice::<String>(&r).unwrap())
}

const GREETER_LUA: &str = "greeting = 'hello'\n\
     function HD_Hello(session, msg) return greeting .. ' ' .. msg end\n\
     function Twice(session, msg) return HD_Hello(session, msg) .. '!' end\n";

const GREETER_PY: &str = "greeting = 'hello'\n\
     def HD_Hello(session, msg):\n    return greeting + ' ' + msg\n\n\
     def Twice(session, msg):\n    return HD_Hello(session, msg) + '!'\n";

/// The body replaces the handler for the next calls, sees the module's globals, and is what the
/// script's own calls to the handler's name reach; the plugin lists it as patched.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_patched_handler_answers_the_next_calls() {
    let dir = tempfile::tempdir().unwrap();
    for (name, text, body) in [
        (
            "greeter.lua",
            GREETER_LUA,
            "function(session, msg) return 'patched ' .. greeting .. ' ' .. msg end",
        ),
        (
            "greeter.py",
            GREETER_PY,
            "def handler(session, msg):\n    return 'patched ' + greeting + ' ' + msg\n",
        ),
    ] {
        let path = kit::write(dir.path(), name, text);
        let plugin = ModulePlugin::load("Greeter", &path, &ModulePluginOptions::default()).unwrap();
        let node = kit::module_node(
            "mqtt://127.0.0.1:0",
            vec![(plugin.module(), ModuleConfig::new("Greeter"))],
        )
        .await;
        // every Lua state of the pool has run a call before the patch
        for _ in 0..8 {
            assert_eq!(
                call(&node, "Greeter", "HD_Hello", "ann").await.unwrap(),
                "hello ann"
            );
        }
        assert!(plugin.patched_handlers().is_empty());

        plugin.replace_handler("HD_Hello", body).await.unwrap();
        for _ in 0..8 {
            assert_eq!(
                call(&node, "Greeter", "HD_Hello", "ann").await.unwrap(),
                "patched hello ann",
                "{name}"
            );
        }
        assert_eq!(
            call(&node, "Greeter", "Twice", "bob").await.unwrap(),
            "patched hello bob!",
            "{name}"
        );
        assert_eq!(plugin.patched_handlers(), ["HD_Hello"], "{name}");
        assert_eq!(
            plugin.version(),
            1,
            "a patch is not a new version of the file"
        );

        // a reload runs the file again: the patch is gone
        assert_eq!(plugin.reload().await.unwrap(), 2);
        assert_eq!(
            call(&node, "Greeter", "HD_Hello", "ann").await.unwrap(),
            "hello ann",
            "{name}"
        );
        assert!(plugin.patched_handlers().is_empty(), "{name}");
        node.shutdown().await;
    }
}

/// A body that does not compile, is not a function, or names a handler the module lacks is
/// refused with a typed error (the line in the body when there is one), and the running handler
/// goes on answering.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broken_patch_changes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    for (name, text, syntax_error, not_a_function) in [
        (
            "greeter.lua",
            GREETER_LUA,
            "function(session, msg)\n  return 'x' ..\nend",
            "42",
        ),
        (
            "greeter.py",
            GREETER_PY,
            "def handler(session, msg):\n    return (\n",
            "x = 1\n",
        ),
    ] {
        let path = kit::write(dir.path(), name, text);
        let plugin = ModulePlugin::load("Greeter", &path, &ModulePluginOptions::default()).unwrap();
        let node = kit::module_node(
            "mqtt://127.0.0.1:0",
            vec![(plugin.module(), ModuleConfig::new("Greeter"))],
        )
        .await;

        let e = plugin
            .replace_handler("HD_Hello", syntax_error)
            .await
            .unwrap_err();
        assert_eq!(e.kind(), PluginErrorKind::Patch, "{name}: {e}");
        assert!(e.line().is_some(), "{name}: {e}");
        assert!(e.to_string().contains("patch of HD_Hello"), "{name}: {e}");

        let e = plugin
            .replace_handler("HD_Hello", not_a_function)
            .await
            .unwrap_err();
        assert_eq!(e.kind(), PluginErrorKind::Patch, "{name}: {e}");

        let e = plugin
            .replace_handler("HD_Nope", "function(s, m) end")
            .await
            .unwrap_err();
        assert_eq!(e.kind(), PluginErrorKind::NoHandler, "{name}: {e}");

        assert_eq!(
            call(&node, "Greeter", "HD_Hello", "ann").await.unwrap(),
            "hello ann",
            "{name}"
        );
        assert!(plugin.patched_handlers().is_empty(), "{name}");
        node.shutdown().await;
    }
}

/// A patched handler's error is an error reply with its message only.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_patched_handler_fails_like_any_handler() {
    let dir = tempfile::tempdir().unwrap();
    for (name, text, body) in [
        (
            "greeter.lua",
            GREETER_LUA,
            "function(session, msg) error('closed for repairs') end",
        ),
        (
            "greeter.py",
            GREETER_PY,
            "def handler(session, msg):\n    raise RuntimeError('closed for repairs')\n",
        ),
    ] {
        let path = kit::write(dir.path(), name, text);
        let plugin = ModulePlugin::load("Greeter", &path, &ModulePluginOptions::default()).unwrap();
        let node = kit::module_node(
            "mqtt://127.0.0.1:0",
            vec![(plugin.module(), ModuleConfig::new("Greeter"))],
        )
        .await;
        plugin.replace_handler("HD_Hello", body).await.unwrap();
        assert_eq!(
            call(&node, "Greeter", "HD_Hello", "ann").await,
            Err(CallError::App("closed for repairs".into())),
            "{name}"
        );
        node.shutdown().await;
    }
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

/// A call in flight when the patch lands finishes on the function it started with.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn calls_in_flight_finish_on_the_old_function() {
    let dir = tempfile::tempdir().unwrap();
    for (name, text, body) in [
        (
            "slow.lua",
            "function Slow(session, msg) return 'old ' .. warren.call('Hold', 'Wait') end\n",
            "function(session, msg) return 'new ' .. msg end",
        ),
        (
            "slow.py",
            "import warren\n\
             def Slow(session, msg):\n    return 'old ' + warren.call('Hold', 'Wait')\n",
            "def handler(session, msg):\n    return 'new ' + msg\n",
        ),
    ] {
        let path = kit::write(dir.path(), name, text);
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

        plugin.replace_handler("Slow", body).await.unwrap();
        assert_eq!(
            call(&node, "Slow", "Slow", "x").await.unwrap(),
            "new x",
            "{name}"
        );

        hold.release.notify_one();
        let old = in_flight.await.unwrap().unwrap();
        assert_eq!(&old[..], br#""old released""#, "{name}");
        node.shutdown().await;
    }
}

/// Without a `[[redis_rpc]]` endpoint handed to the plugin, `warren.rpc_call` raises an
/// `unavailable` error the handler can catch.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rpc_call_without_an_endpoint_is_unavailable() {
    let dir = tempfile::tempdir().unwrap();
    for (name, text) in [
        (
            "peer.lua",
            "function Ask(session, msg)\n\
             local ok, e = pcall(warren.rpc_call, 'rpc', 'test', {'a', 'b'})\n\
             return tostring(ok) .. ' ' .. tostring(e)\n\
             end\n",
        ),
        (
            "peer.py",
            "import warren\n\
             def Ask(session, msg):\n\
             \x20   try:\n\
             \x20       warren.rpc_call('rpc', 'test', ['a', 'b'])\n\
             \x20   except warren.CallError as e:\n\
             \x20       return 'False ' + e.kind\n",
        ),
    ] {
        let path = kit::write(dir.path(), name, text);
        let plugin = ModulePlugin::load("Peer", &path, &ModulePluginOptions::default()).unwrap();
        let node = kit::module_node(
            "mqtt://127.0.0.1:0",
            vec![(plugin.module(), ModuleConfig::new("Peer"))],
        )
        .await;
        let r = call(&node, "Peer", "Ask", "").await.unwrap();
        eprintln!("RPC {name}: {r}");
        assert!(
            r.starts_with("false") || r == "False unavailable",
            "{name}: {r}"
        );
        assert!(
            r.contains("unavailable") || r.contains("redis_rpc"),
            "{name}: {r}"
        );
        node.shutdown().await;
    }
}

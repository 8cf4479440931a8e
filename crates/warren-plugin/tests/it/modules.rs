//! Module plugins in Lua and Python, run by a real node and called by rumqttc over an MQTT
//! listener: the issue's Greeter, mqant mode, error replies, a runaway loop, and what scripts do
//! with sessions, rooms and calls to other modules.

use std::time::Duration;

use serde_json::json;
use warren::config::ModuleConfig;
use warren::{CallError, Context, Json, Module};
use warren_plugin::{ModulePluginOptions, MsgType, load_module};

use crate::kit::{self, ask, envelope, next_publishes};

const GREETER_LUA: &str = r#"function HD_Hello(session, msg) session:push("Greeter/OnHello", msg) return "hello " .. msg end
"#;

const GREETER_PY: &str = r#"def HD_Hello(session, msg): session.push("Greeter/OnHello", msg); return "hello " + msg
"#;

/// Ask `first` (topic and body), then `second` with an empty body, as one client of `node`:
/// the first is cut off at the caller's deadline, the second still answers `answer`.
async fn first_times_out(node: &warren::Node, first: (&str, &str), second: &str, answer: &str) {
    let (client, mut events) = kit::mqtt(node, "c1").await;
    ask(&client, first.0, first.1).await;
    ask(&client, second, "").await;
    let got = next_publishes(&mut events, 2).await;
    assert_eq!(
        got[0],
        (
            first.0.to_owned(),
            r#"{"Error":"timeout: This is Call","Result":null}"#.to_owned()
        )
    );
    assert_eq!(got[1].1, format!(r#"{{"Error":"","Result":"{answer}"}}"#));
}

fn login(handlers: &[&str]) -> ModulePluginOptions {
    ModulePluginOptions {
        login_handlers: handlers.iter().map(|h| h.to_string()).collect(),
        ..Default::default()
    }
}

/// The issue's example, word for word, in both languages: `ann` published to
/// `Greeter/HD_Hello/1` gets the push, then the reply.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_greeter_pushes_then_replies() {
    let dir = tempfile::tempdir().unwrap();
    for (name, text) in [("greeter.lua", GREETER_LUA), ("greeter.py", GREETER_PY)] {
        let path = kit::write(dir.path(), name, text);
        let greeter = load_module("Greeter", &path, &login(&["HD_Hello"])).unwrap();
        let node = kit::module_node(
            "mqtt://127.0.0.1:0",
            vec![(greeter, ModuleConfig::new("Greeter"))],
        )
        .await;
        let (client, mut events) = kit::mqtt(&node, "c1").await;
        ask(&client, "Greeter/HD_Hello/1", "ann").await;
        let got = next_publishes(&mut events, 2).await;
        assert_eq!(got[0], ("Greeter/OnHello".into(), "ann".into()), "{name}");
        assert_eq!(
            got[1],
            (
                "Greeter/HD_Hello/1".into(),
                r#"{"Error":"","Result":"hello ann"}"#.into()
            ),
            "{name}"
        );
        node.shutdown().await;
    }
}

/// In mqant mode a request body must be a JSON object (docs/protocols/mqtt.md), handlers are
/// reached by their `HD_` prefix, and `msg_type = json` hands the script the object.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn in_mqant_mode_handlers_get_the_json_object() {
    let dir = tempfile::tempdir().unwrap();
    for (name, text) in [
        (
            "greeter.lua",
            "function HD_Hello(session, msg) session:push(\"Greeter/OnHello\", msg.name) return \"hello \" .. msg.name end\n\
             function Secret(session, msg) return \"no\" end\n",
        ),
        (
            "greeter.py",
            "def HD_Hello(session, msg):\n    session.push('Greeter/OnHello', msg['name'])\n    return 'hello ' + msg['name']\n\n\
             def Secret(session, msg):\n    return 'no'\n",
        ),
    ] {
        let path = kit::write(dir.path(), name, text);
        let options = ModulePluginOptions {
            msg_type: MsgType::Json,
            ..login(&["HD_Hello"])
        };
        let greeter = load_module("Greeter", &path, &options).unwrap();
        let node = kit::module_node(
            "mqtt+mqant://127.0.0.1:0",
            vec![(greeter, ModuleConfig::new("Greeter"))],
        )
        .await;
        let (client, mut events) = kit::mqtt(&node, "c1").await;
        ask(&client, "Greeter/HD_Hello/1", r#"{"name":"ann"}"#).await;
        let got = next_publishes(&mut events, 2).await;
        assert_eq!(got[0], ("Greeter/OnHello".into(), "ann".into()), "{name}");
        assert_eq!(got[1].1, r#"{"Error":"","Result":"hello ann"}"#, "{name}");
        ask(&client, "Greeter/HD_Hello/2", "ann").await;
        ask(&client, "Greeter/Secret/3", "{}").await;
        let got = next_publishes(&mut events, 2).await;
        assert_eq!(
            got[0].1, r#"{"Error":"body must be JSON format","Result":null}"#,
            "{name}"
        );
        assert_eq!(
            got[1].1, r#"{"Error":"Method(Secret) must begin with 'HD_'","Result":null}"#,
            "{name}"
        );
        node.shutdown().await;
    }
}

/// `error(...)` and exceptions are error replies; the traceback goes to the log only.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn script_errors_are_error_replies() {
    let dir = tempfile::tempdir().unwrap();
    for (name, text) in [
        (
            "fail.lua",
            "function HD_Fail(session, msg) error(\"bad input: \" .. msg) end\n\
             function HD_Table(session, msg) return { n = #msg, ok = true } end\n",
        ),
        (
            "fail.py",
            "def HD_Fail(session, msg):\n    raise ValueError('bad input: ' + msg)\n\n\
             def HD_Table(session, msg):\n    return {'n': len(msg), 'ok': True}\n",
        ),
    ] {
        let path = kit::write(dir.path(), name, text);
        let m = load_module("Fail", &path, &login(&["HD_Fail", "HD_Table"])).unwrap();
        let node =
            kit::module_node("mqtt://127.0.0.1:0", vec![(m, ModuleConfig::new("Fail"))]).await;
        let (client, mut events) = kit::mqtt(&node, "c1").await;
        ask(&client, "Fail/HD_Fail/1", "x").await;
        ask(&client, "Fail/HD_Table/2", "abc").await;
        let got = next_publishes(&mut events, 2).await;
        assert_eq!(
            got[0].1, r#"{"Error":"bad input: x","Result":null}"#,
            "{name}"
        );
        assert_eq!(
            envelope(&got[1].1),
            json!({"Error": "", "Result": {"n": 3, "ok": true}}),
            "{name}"
        );
        node.shutdown().await;
    }
}

/// A loop that never ends is stopped by the instruction budget (or the time limit), its caller
/// gets the deadline error, and the module goes on answering.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_runaway_lua_handler_is_stopped() {
    let dir = tempfile::tempdir().unwrap();
    let path = kit::write(
        dir.path(),
        "loop.lua",
        "function HD_Loop(session, msg) while true do end end\n\
         function HD_Ok(session, msg) return \"ok\" end\n",
    );
    for options in [
        ModulePluginOptions {
            max_instructions: 1_000_000,
            ..login(&["HD_Loop", "HD_Ok"])
        },
        ModulePluginOptions {
            max_instructions: u64::MAX,
            time_limit: Duration::from_millis(200),
            ..login(&["HD_Loop", "HD_Ok"])
        },
    ] {
        let m = load_module("Loop", &path, &options).unwrap();
        let node =
            kit::module_node("mqtt://127.0.0.1:0", vec![(m, ModuleConfig::new("Loop"))]).await;
        first_times_out(&node, ("Loop/HD_Loop/1", ""), "Loop/HD_Ok/2", "ok").await;
        node.shutdown().await;
    }
}

/// A handler cut off at the caller's deadline while it waits (here on a module that answers
/// after it) leaves its Lua state ready for the next call, its to-be-closed variables closed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lua_handler_cut_off_while_it_waits_leaves_its_state_ready() {
    let dir = tempfile::tempdir().unwrap();
    let path = kit::write(
        dir.path(),
        "wait.lua",
        r#"closed = "no"
function HD_Wait(session, msg)
  local mark <close> = setmetatable({}, { __close = function() closed = "yes" end })
  return warren.call("Late", "Answer", msg, 60)
end
function HD_Closed(session, msg) return closed end
"#,
    );
    let options = ModulePluginOptions {
        workers: 1,
        ..login(&["HD_Wait", "HD_Closed"])
    };
    let m = load_module("Wait", &path, &options).unwrap();
    let late = Module::builder("Late", ())
        .handler("Answer", |_cx: Context, body: bytes::Bytes| async move {
            tokio::time::sleep(Duration::from_secs(2)).await;
            Ok::<_, CallError>(body)
        })
        .build();
    let node = kit::module_node(
        "mqtt://127.0.0.1:0?rpc_expired_s=1",
        vec![
            (m, ModuleConfig::new("Wait")),
            (late, ModuleConfig::new("Late")),
        ],
    )
    .await;
    first_times_out(&node, ("Wait/HD_Wait/1", "x"), "Wait/HD_Closed/2", "yes").await;
    node.shutdown().await;
}

const LOBBY_LUA: &str = r#"
greeting = nil

function on_init(settings)
  greeting = settings.greeting
end

function HD_Login(session, msg)
  session:bind(msg)
  session:set("level", 3)
  return { uid = session.uid, level = session:get("level") }
end

function HD_Whoami(session, msg)
  return session.uid .. " " .. session:get("level")
end

function HD_Greeting(session, msg)
  return greeting .. " " .. warren.instance
end

function HD_Relay(session, msg)
  return warren.call("Echo", "Echo", msg)
end

function HD_Join(session, msg)
  warren.room_add("lobby")
  warren.room_broadcast("lobby", "Lobby/OnJoin", { user = session.uid })
  return "joined"
end

function Count(session, msg)
  return #msg
end
"#;

const ECHO_PY: &str = r#"
import warren

def Echo(session, msg):
    return {"echo": msg, "uid": session.uid if session else None}

def HD_Sum(session, msg):
    total = warren.call("Math", "Add", {"a": 2, "b": 3})
    length = warren.call("Lobby", "Count", msg)
    return {"sum": total, "length": length, "module": warren.module}

def HD_Py(session, msg):
    session.set("level", 4)
    warren.room_add("py")
    reached = warren.room_broadcast("py", "Echo/OnPy", {"uid": session.uid})
    return {"uid": session.uid, "level": session.get("level"), "reached": reached,
            "settings": session.settings}
"#;

async fn add(
    _cx: Context,
    Json(v): Json<serde_json::Value>,
) -> Result<serde_json::Value, CallError> {
    Ok(json!(
        v["a"].as_i64().unwrap_or(0) + v["b"].as_i64().unwrap_or(0)
    ))
}

/// Scripts bind sessions, keep settings, join rooms, read their instance's settings, and call
/// modules in the other language and in Rust.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scripts_use_sessions_rooms_and_calls() {
    let dir = tempfile::tempdir().unwrap();
    let lobby_path = kit::write(dir.path(), "lobby.lua", LOBBY_LUA);
    let echo_path = kit::write(dir.path(), "echo.py", ECHO_PY);
    let lobby = load_module(
        "Lobby",
        &lobby_path,
        &ModulePluginOptions {
            handlers: Some(vec![
                "HD_Whoami".into(),
                "HD_Greeting".into(),
                "HD_Relay".into(),
                "HD_Join".into(),
            ]),
            ..login(&["HD_Login"])
        },
    )
    .unwrap();
    let echo = load_module(
        "Echo",
        &echo_path,
        &ModulePluginOptions {
            handlers: Some(vec!["HD_Sum".into(), "HD_Py".into()]),
            ..Default::default()
        },
    )
    .unwrap();
    let math = Module::builder("Math", ()).handler("Add", add).build();
    let mut lobby_cfg = ModuleConfig::new("Lobby");
    lobby_cfg
        .settings
        .insert("greeting".into(), toml::Value::String("welcome".into()));
    let node = kit::module_node(
        "mqtt://127.0.0.1:0",
        vec![
            (lobby, lobby_cfg),
            (echo, ModuleConfig::new("Echo")),
            (math, ModuleConfig::new("Math")),
        ],
    )
    .await;
    let (client, mut events) = kit::mqtt(&node, "c1").await;

    ask(&client, "Lobby/HD_Whoami/1", "").await;
    let got = next_publishes(&mut events, 1).await;
    assert_eq!(got[0].1, r#"{"Error":"Not Logined","Result":null}"#);

    // one session's requests to one module are answered in order
    ask(&client, "Lobby/HD_Login/2", "ann").await;
    ask(&client, "Lobby/HD_Whoami/3", "").await;
    ask(&client, "Lobby/HD_Greeting/4", "").await;
    ask(&client, "Lobby/HD_Relay/5", "x").await;
    ask(&client, "Lobby/HD_Join/6", "").await;
    let got = next_publishes(&mut events, 6).await;
    let mut replies: Vec<(&str, serde_json::Value)> =
        got.iter().map(|(t, p)| (t.as_str(), envelope(p))).collect();
    // the room's push reaches the joiner before HD_Join's reply (it may pass HD_Relay's, which
    // the connection writes once it has it)
    let push = replies
        .iter()
        .position(|(t, _)| *t == "Lobby/OnJoin")
        .expect("the room broadcast");
    let join = replies
        .iter()
        .position(|(t, _)| *t == "Lobby/HD_Join/6")
        .expect("the join reply");
    assert!(push < join, "{replies:?}");
    assert_eq!(replies.remove(push).1, json!({"user": "ann"}));
    assert_eq!(
        replies,
        vec![
            (
                "Lobby/HD_Login/2",
                json!({"Error": "", "Result": {"uid": "ann", "level": 3}})
            ),
            ("Lobby/HD_Whoami/3", json!({"Error": "", "Result": "ann 3"})),
            (
                "Lobby/HD_Greeting/4",
                json!({"Error": "", "Result": "welcome Lobby001"})
            ),
            (
                "Lobby/HD_Relay/5",
                json!({"Error": "", "Result": {"echo": "x", "uid": "ann"}})
            ),
            ("Lobby/HD_Join/6", json!({"Error": "", "Result": "joined"})),
        ]
    );

    // Python calling Rust and Lua
    ask(&client, "Echo/HD_Sum/7", "abcd").await;
    let got = next_publishes(&mut events, 1).await;
    assert_eq!(
        envelope(&got[0].1),
        json!({"Error": "", "Result": {"sum": 5, "length": 4, "module": "Echo"}})
    );

    // Python's session object and rooms
    ask(&client, "Echo/HD_Py/8", "").await;
    let got = next_publishes(&mut events, 2).await;
    assert_eq!(got[0], ("Echo/OnPy".into(), r#"{"uid":"ann"}"#.into()));
    assert_eq!(
        envelope(&got[1].1),
        json!({"Error": "", "Result": {"uid": "ann", "level": 4, "reached": 1, "settings": {"level": 4}}})
    );
    node.shutdown().await;
}

#[tokio::test]
async fn listed_handlers_must_exist() {
    let dir = tempfile::tempdir().unwrap();
    let path = kit::write(dir.path(), "greeter.lua", GREETER_LUA);
    let e = load_module("Greeter", &path, &login(&["HD_Nope"])).unwrap_err();
    assert!(e.to_string().contains("HD_Nope"), "{e}");
}

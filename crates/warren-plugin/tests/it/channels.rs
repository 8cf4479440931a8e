//! Channel-handler plugins of every kind behind a real line listener, driven by a TCP client
//! with the line protocol's vectors (docs/protocols/line.md).

use std::sync::Arc;

use warren_plugin::{
    ChannelPlugin, ChannelPluginOptions, MsgType, PluginErrorKind, load_channel_handler,
};

use crate::kit::{self, LineClient};

/// The echo vectors of docs/protocols/line.md, on one connection.
async fn echo_vectors(c: &mut LineClient) {
    for (send, want) in [
        (&b"5\r\nhello"[..], &b"5 \r\nhello"[..]),
        (b"5\nhello", b"5 \r\nhello"),
        (b"11\r\nhello world", b"11 \r\nhello world"),
        (b"3 cmd key\r\nabc", b"3 \r\nabc"),
        (b"\r\n5\r\nhello", b"5 \r\nhello"),
        (b"2\r\nhi3\r\nabc", b"2 \r\nhi3 \r\nabc"),
        (b"0\r\n", b"0 \r\n"),
    ] {
        c.send(send).await;
        assert_eq!(
            c.read_exact(want.len()).await,
            want,
            "answer to {:?}",
            String::from_utf8_lossy(send)
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ffowns_lua_echo_answers_the_vectors() {
    let handler = load_channel_handler(kit::fixture("echo.lua"), &Default::default()).unwrap();
    let node = kit::line_node(handler).await;
    let mut c = LineClient::connect(&node).await;
    echo_vectors(&mut c).await;
    // Lua strings hold any bytes
    c.send(b"4\r\n\xff\x00\r\n").await;
    assert_eq!(c.read_exact(8).await, b"4 \r\n\xff\x00\r\n");
    node.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ffowns_python_echo_answers_the_vectors() {
    let handler = load_channel_handler(kit::fixture("echo.py"), &Default::default()).unwrap();
    let node = kit::line_node(handler).await;
    let mut c = LineClient::connect(&node).await;
    echo_vectors(&mut c).await;
    // a str with surrogateescape: bytes that are not UTF-8, and NUL, come back as they went
    c.send(b"4\r\n\xff\x00ab").await;
    assert_eq!(c.read_exact(8).await, b"4 \r\n\xff\x00ab");
    node.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_python_plugin_can_ask_for_bytes() {
    let dir = tempfile::tempdir().unwrap();
    let path = kit::write(
        dir.path(),
        "kind.py",
        "import channel\n\
         def handle_msg(id, msg):\n    channel.send(id, type(msg).__name__.encode() + b' ' + msg)\n",
    );
    let options = ChannelPluginOptions {
        python_msg_type: MsgType::Bytes,
        ..Default::default()
    };
    let node = kit::line_node(load_channel_handler(&path, &options).unwrap()).await;
    let mut c = LineClient::connect(&node).await;
    c.send(b"3\r\n\x00\xfe\xff").await;
    assert_eq!(c.frame().await, b"bytes \x00\xfe\xff");
    node.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_c_example_answers_oh_nice() {
    let dir = tempfile::tempdir().unwrap();
    let lib = kit::build_c(
        &kit::repo().join("examples/plugins/echo_c/echo.c"),
        dir.path(),
        "echo_c",
    );
    let node = kit::line_node(load_channel_handler(&lib, &Default::default()).unwrap()).await;
    let mut c = LineClient::connect(&node).await;
    c.send(b"5\r\nhello").await;
    assert_eq!(c.read_exact(11).await, b"7 \r\noh nice");
    c.send(b"3\r\nabc").await;
    assert_eq!(c.read_exact(11).await, b"7 \r\noh nice");
    node.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_rust_cdylib_example_echoes() {
    let dir = tempfile::tempdir().unwrap();
    let lib = kit::build_echo_rs(dir.path());
    let node = kit::line_node(load_channel_handler(&lib, &Default::default()).unwrap()).await;
    let mut c = LineClient::connect(&node).await;
    echo_vectors(&mut c).await;
    node.shutdown().await;
}

#[tokio::test]
async fn a_native_plugin_of_another_abi_version_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let source = kit::write(
        dir.path(),
        "v2.c",
        "#include <stdint.h>\n#include <stddef.h>\n\
         uint32_t warren_plugin_abi_version(void) { return 2; }\n\
         int32_t warren_plugin_init(const void *h) { (void)h; return 0; }\n\
         int32_t warren_handle_msg(void *c, const uint8_t *d, size_t n) { (void)c; (void)d; (void)n; return 0; }\n\
         int32_t warren_handle_broken(void *c) { (void)c; return 0; }\n",
    );
    let lib = kit::build_c(&source, dir.path(), "v2");
    let e = ChannelPlugin::load(&lib, &Default::default()).unwrap_err();
    assert_eq!(e.kind(), PluginErrorKind::AbiVersion);
    assert!(e.to_string().contains("ABI version 2"), "{e}");
    assert!(e.to_string().contains("version 1"), "{e}");
}

#[tokio::test]
async fn a_plugin_without_handle_msg_does_not_load() {
    let dir = tempfile::tempdir().unwrap();
    for (name, text) in [
        ("nomsg.lua", "function handle_broken(id) end\n"),
        ("nomsg.py", "def handle_broken(id):\n    pass\n"),
    ] {
        let path = kit::write(dir.path(), name, text);
        let e = ChannelPlugin::load(&path, &Default::default()).unwrap_err();
        assert_eq!(e.kind(), PluginErrorKind::MissingEntry, "{name}: {e}");
        assert!(e.to_string().contains("handle_msg"), "{e}");
    }
    let source = kit::write(
        dir.path(),
        "nomsg.c",
        "#include <stdint.h>\n\
         uint32_t warren_plugin_abi_version(void) { return 1; }\n\
         int32_t warren_plugin_init(const void *h) { (void)h; return 0; }\n\
         int32_t warren_handle_broken(void *c) { (void)c; return 0; }\n",
    );
    let lib = kit::build_c(&source, dir.path(), "nomsg");
    let e = ChannelPlugin::load(&lib, &Default::default()).unwrap_err();
    assert_eq!(e.kind(), PluginErrorKind::MissingEntry, "{e}");
    assert!(e.to_string().contains("warren_handle_msg"), "{e}");
}

#[tokio::test]
async fn load_errors_name_the_file_and_line() {
    let dir = tempfile::tempdir().unwrap();
    for (name, text, line) in [
        (
            "syntax.lua",
            "function handle_msg(id, msg)\n  channel.send(id msg)\nend\n",
            2,
        ),
        ("raise.lua", "local x = 1\nerror('no config')\n", 2),
        (
            "syntax.py",
            "import channel\ndef handle_msg(id, msg):\n    channel.send(id msg)\n",
            3,
        ),
        (
            "raise.py",
            "import channel\n\nraise RuntimeError('no config')\n",
            3,
        ),
    ] {
        let path = kit::write(dir.path(), name, text);
        let e = ChannelPlugin::load(&path, &Default::default()).unwrap_err();
        assert_eq!(e.kind(), PluginErrorKind::Script, "{name}: {e}");
        assert_eq!(e.line(), Some(line), "{name}: {e}");
        assert!(
            e.to_string()
                .starts_with(&format!("{}:{line}: ", path.display())),
            "{name}: {e}"
        );
    }
}

/// The channel API in Lua: handle_connect, per-channel data, the peer, close, −1 for unknown and
/// closed channels, and handle_broken with the channel already closed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_lua_channel_api() {
    let dir = tempfile::tempdir().unwrap();
    let path = kit::write(
        dir.path(),
        "api.lua",
        r#"
local members = {}
function handle_connect(id)
  members[id] = true
  channel.set_data(id, { count = 0 })
  channel.send(id, "hello " .. tostring(channel.peer(id) ~= nil))
end
function handle_msg(id, msg)
  local d = channel.get_data(id)
  d.count = d.count + 1
  channel.set_data(id, d)
  if msg == "quit" then channel.close(id) return end
  channel.send(id, msg .. " #" .. d.count .. " " .. channel.send(123456789, "x"))
end
function handle_broken(id)
  members[id] = nil
  local late = channel.send(id, "too late")
  for other in pairs(members) do channel.send(other, "left " .. late) end
end
"#,
    );
    api_session(load_channel_handler(&path, &Default::default()).unwrap()).await;
}

/// The same API in Python (objects as channel data), and an exception that leaves the
/// connection open.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_python_channel_api() {
    let dir = tempfile::tempdir().unwrap();
    let path = kit::write(
        dir.path(),
        "api.py",
        r#"
import channel
members = set()

def handle_connect(id):
    members.add(id)
    channel.set_data(id, {"count": 0})
    channel.send(id, "hello " + str(channel.peer(id) is not None).lower())

def handle_msg(id, msg):
    d = channel.get_data(id)
    d["count"] += 1
    if msg == "boom":
        raise ValueError("boom")
    if msg == "quit":
        channel.close(id)
        return
    channel.send(id, "%s #%d %d" % (msg, d["count"], channel.send(123456789, "x")))

def handle_broken(id):
    members.discard(id)
    late = channel.send(id, "too late")
    for other in members:
        channel.send(other, "left %d" % late)
"#,
    );
    api_session(load_channel_handler(&path, &Default::default()).unwrap()).await;
}

async fn api_session(handler: Arc<dyn warren::gate::line::ChannelHandler>) {
    let node = kit::line_node(handler).await;
    let mut a = LineClient::connect(&node).await;
    assert_eq!(a.text().await, "hello true");
    let mut b = LineClient::connect(&node).await;
    assert_eq!(b.text().await, "hello true");
    a.send(b"2\r\nhi").await;
    assert_eq!(a.text().await, "hi #1 -1");
    a.send(b"4\r\nboom").await; // Python raises here (logged); Lua answers
    a.send(b"2\r\nyo").await;
    let next = a.text().await;
    let next = if next.starts_with("boom") {
        a.text().await
    } else {
        next
    };
    assert_eq!(next, "yo #3 -1");
    a.send(b"4\r\nquit").await;
    assert!(a.closed().await);
    assert_eq!(b.text().await, "left -1");
    node.shutdown().await;
}

/// With `lazy_channels` a channel is born with its first message: no `handle_connect`, and a
/// connection that closes before sending anything is never reported.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lazy_channels_start_at_the_first_message() {
    let dir = tempfile::tempdir().unwrap();
    let path = kit::write(
        dir.path(),
        "lazy.lua",
        r#"
local seen = {}
function handle_connect(id) channel.send(id, "connected") end
function handle_msg(id, msg)
  seen[id] = true
  local n = 0
  for _ in pairs(seen) do n = n + 1 end
  channel.send(id, msg .. " " .. n)
end
function handle_broken(id) seen[id] = nil end
"#,
    );
    let plugin = load_channel_handler(&path, &Default::default()).unwrap();
    let node = kit::line_node_with(plugin, "line://127.0.0.1:0?lazy_channels=true").await;
    let silent = LineClient::connect(&node).await;
    drop(silent);
    let mut a = LineClient::connect(&node).await;
    a.send(b"1\r\na").await;
    assert_eq!(a.text().await, "a 1");
    let mut b = LineClient::connect(&node).await;
    b.send(b"1\r\nb").await;
    assert_eq!(b.text().await, "b 2");
    drop(b);
    // b's disconnect is reported before the next event of the plugin's thread
    let mut c = LineClient::connect(&node).await;
    a.send(b"1\r\nx").await;
    let after = a.text().await;
    assert!(after == "x 1" || after == "x 2", "{after}");
    c.send(b"1\r\nc").await;
    assert!(c.text().await.starts_with("c "));
    node.shutdown().await;
}

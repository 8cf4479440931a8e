//! `warren ctl`: the admin API (docs/admin-api.md) from the command line, so an operator can
//! see and steer a running cluster from a shell or a script without writing HTTP requests:
//! `warren ctl nodes`, `warren ctl sessions --uid alice`, `warren ctl kick --uid alice`.
//!
//! Every command is one or two requests to one node's admin API; that node answers for the
//! whole cluster. Lists print as aligned tables, one object as `key: value` lines, and `--json`
//! prints the API's own JSON. Nodes that did not answer (`"unreachable"`) are named in a warning
//! on stderr, so a partial answer is never mistaken for a whole one. The exit code tells a
//! script what happened (docs/ctl.md): 0 done, 1 the API refused (`error: <code>: <message>`
//! on stderr), 2 a usage error, 3 the admin API could not be reached.
//!
//! The client is plain HTTP on a current-thread runtime: the admin API serves no TLS of its own
//! (it listens on loopback, or on a private network with a token).

use std::io::Write;
use std::process::ExitCode;
use std::time::Duration;

use clap::{ArgGroup, Args, Subcommand};
use reqwest::header::CONTENT_TYPE;
use reqwest::{Method, StatusCode, Url};
use serde_json::{Map, Value, json};

/// The admin API asked when neither `--admin` nor `WARREN_ADMIN` says another.
const DEFAULT_ADMIN: &str = "http://127.0.0.1:9090";
/// The environment variable that names the admin API, so a shell session sets it once.
const ADMIN_ENV: &str = "WARREN_ADMIN";
/// The environment variable that holds the token, which keeps it out of `ps` listings.
const TOKEN_ENV: &str = "WARREN_ADMIN_TOKEN";
/// The longest error body (of something that is not the admin API) quoted in a message.
const MAX_QUOTED: usize = 200;

/// `warren ctl`'s options and command.
#[derive(Args, Debug)]
#[command(
    about = "Ask a running node's admin API (docs/ctl.md): nodes, sessions, kick, push, rooms…",
    long_about = "Ask a running node's admin API ([admin] addr; docs/ctl.md, docs/admin-api.md). \
                  The node answers for the whole cluster. Lists print as tables, one object as \
                  `key: value` lines, --json prints the API's JSON. Exit codes: 0 done, 1 the API \
                  refused (error: <code>: <message>), 2 usage error, 3 the admin API cannot be \
                  reached."
)]
pub(crate) struct CtlArgs {
    /// The admin API: a URL, HOST:PORT or a port on 127.0.0.1 [default: $WARREN_ADMIN, else
    /// http://127.0.0.1:9090].
    #[arg(long, global = true, value_name = "URL")]
    admin: Option<String>,
    /// The bearer token of `[admin] token` [default: $WARREN_ADMIN_TOKEN, which keeps it out of
    /// process listings].
    #[arg(long, global = true, value_name = "TOKEN")]
    token: Option<String>,
    /// Print the API's JSON answer instead of a table.
    #[arg(long, global = true)]
    json: bool,
    /// Seconds to wait for each answer.
    #[arg(long, global = true, value_name = "SECONDS", default_value = "10", value_parser = seconds)]
    timeout: Duration,
    #[command(subcommand)]
    command: CtlCommand,
}

/// What to ask: one variant per operation of the admin API.
#[derive(Subcommand, Debug, Clone, PartialEq, Eq)]
enum CtlCommand {
    /// The nodes of the cluster, with their modules and sessions.
    Nodes,
    /// Sessions of every node, sorted by node and id, a page at a time.
    Sessions {
        /// Only the sessions bound to this uid.
        #[arg(long)]
        uid: Option<String>,
        /// Only the sessions of this node.
        #[arg(long)]
        node: Option<String>,
        /// At most this many (the API's default 100, at most 1000).
        #[arg(long)]
        limit: Option<u32>,
        /// Skip this many first.
        #[arg(long)]
        offset: Option<u64>,
    },
    /// One session, with its settings.
    Session {
        /// The session's id (the ID column of `sessions`).
        id: String,
    },
    /// Close a session (by ID), or every session of a uid (--uid), on whichever node holds it.
    #[command(group(ArgGroup::new("whom").required(true).args(["id", "uid"])))]
    Kick {
        /// The session's id.
        id: Option<String>,
        /// Every session bound to this uid, on every node.
        #[arg(long)]
        uid: Option<String>,
        /// Why, logged and sent to clients whose protocol can carry it.
        #[arg(long)]
        reason: Option<String>,
    },
    /// Push a message to one session.
    Push {
        /// The session's id.
        id: String,
        /// The topic (route) the client receives it on, e.g. Chat/OnMsg.
        topic: String,
        /// The message body (text).
        body: String,
        /// BODY is base64 of bytes to send, for bodies that are not text.
        #[arg(long)]
        base64: bool,
    },
    /// Send a message to every session of the cluster, or of one room.
    Broadcast {
        /// Only to the members of this room.
        #[arg(long)]
        room: Option<String>,
        /// The topic (route) clients receive it on.
        topic: String,
        /// The message body (text).
        body: String,
        /// BODY is base64 of bytes to send, for bodies that are not text.
        #[arg(long)]
        base64: bool,
    },
    /// The rooms and their member counts, or the members of ROOM.
    Rooms {
        /// One room's members.
        room: Option<String>,
    },
    /// The plugins the asked node loaded.
    Plugins,
    /// Load a plugin's file again on the asked node (what ran before keeps running on error).
    Reload {
        /// The plugin's name (the NAME column of `plugins`).
        plugin: String,
    },
    /// Show the asked node's log filter, or set it (e.g. info,warren::gate=debug).
    Log {
        /// The new filter (RUST_LOG directives); without it, show the one in force.
        filter: Option<String>,
    },
    /// The asked node's effective config, secrets redacted.
    Config,
    /// Whether the asked node is up and ready (/healthz and /readyz); exit 1 when not ready.
    Health,
}

/// Why a command failed, and so the exit code.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
enum CtlError {
    /// The command line asks for something that cannot be asked (exit 2, like clap's own).
    #[error("{0}")]
    Usage(String),
    /// Nothing answered at the admin URL, or not in time (exit 3).
    #[error("cannot reach the admin API at {url}: {why}")]
    Unreachable { url: String, why: String },
    /// The admin API answered with an error (exit 1).
    #[error("{code}: {message}")]
    Api { code: String, message: String },
}

impl CtlError {
    /// The process exit code for this failure (docs/ctl.md, "Exit codes").
    fn exit_code(&self) -> u8 {
        match self {
            CtlError::Usage(_) => 2,
            CtlError::Unreachable { .. } => 3,
            CtlError::Api { .. } => 1,
        }
    }
}

/// Run `warren ctl`: the process's exit code.
pub(crate) fn main(args: CtlArgs) -> ExitCode {
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let env = |name: &str| std::env::var(name).ok();
    match runtime.block_on(run(&args, &env)) {
        Ok(done) => {
            write_out(&done.stdout);
            for line in &done.stderr {
                eprintln!("{line}");
            }
            ExitCode::from(done.code)
        }
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::from(e.exit_code())
        }
    }
}

/// Write to stdout, ignoring a closed pipe (`warren ctl sessions | head`).
fn write_out(text: &str) {
    let mut out = std::io::stdout().lock();
    let _ = out.write_all(text.as_bytes()).and_then(|()| out.flush());
}

/// What a command printed: stdout, stderr lines (warnings and the not-ready error), exit code.
#[derive(Debug, Default, PartialEq, Eq)]
struct Done {
    stdout: String,
    stderr: Vec<String>,
    code: u8,
}

/// Ask the admin API what `args` says and render the answer.
async fn run(args: &CtlArgs, env: &dyn Fn(&str) -> Option<String>) -> Result<Done, CtlError> {
    let base = admin_url(args.admin.as_deref(), env)?;
    let token = args
        .token
        .clone()
        .or_else(|| env(TOKEN_ENV))
        .filter(|t| !t.trim().is_empty());
    let calls = plan(&args.command)?;
    let client = Client::new(base, token, args.timeout)?;
    let mut answers = Vec::with_capacity(calls.len());
    for call in &calls {
        answers.push(client.send(call).await?);
    }
    if args.command == CtlCommand::Health {
        return Ok(health(&answers, args.json));
    }
    let body = answers.pop().map(|(_, body)| body).unwrap_or(Value::Null);
    let mut done = Done {
        stderr: warnings(&args.command, &body),
        ..Done::default()
    };
    done.stdout = if args.json {
        pretty(&body)
    } else {
        render(&args.command, &body)
    };
    Ok(done)
}

/// One request to the admin API.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Call {
    method: Method,
    /// The path's segments below the admin URL, each percent-encoded when the URL is built.
    path: Vec<String>,
    query: Vec<(&'static str, String)>,
    body: Option<Value>,
}

impl Call {
    fn new(method: Method, path: &[&str]) -> Call {
        Call {
            method,
            path: path.iter().map(|s| (*s).to_owned()).collect(),
            query: Vec::new(),
            body: None,
        }
    }

    fn get(path: &[&str]) -> Call {
        Call::new(Method::GET, path)
    }

    fn with_body(self, body: Value) -> Call {
        Call {
            body: Some(body),
            ..self
        }
    }
}

/// The requests a command makes, in order (the admin API contract, docs/admin-api.md).
fn plan(command: &CtlCommand) -> Result<Vec<Call>, CtlError> {
    let call = match command {
        CtlCommand::Nodes => Call::get(&["admin", "nodes"]),
        CtlCommand::Sessions {
            uid,
            node,
            limit,
            offset,
        } => {
            let mut c = Call::get(&["admin", "sessions"]);
            let pairs = [
                ("uid", uid.clone()),
                ("node", node.clone()),
                ("offset", offset.map(|n| n.to_string())),
                ("limit", limit.map(|n| n.to_string())),
            ];
            c.query = pairs
                .into_iter()
                .filter_map(|(k, v)| v.map(|v| (k, v)))
                .collect();
            c
        }
        CtlCommand::Session { id } => Call::get(&["admin", "sessions", segment("ID", id)?]),
        CtlCommand::Kick { id, uid, reason } => {
            let body = reason
                .as_ref()
                .map_or_else(|| json!({}), |r| json!({ "reason": r }));
            match (id, uid) {
                (Some(id), None) => Call::new(
                    Method::POST,
                    &["admin", "sessions", segment("ID", id)?, "kick"],
                )
                .with_body(body),
                (None, Some(uid)) => {
                    let mut c = Call::new(Method::POST, &["admin", "kick"]).with_body(body);
                    c.query.push(("uid", uid.clone()));
                    c
                }
                _ => {
                    return Err(CtlError::Usage(
                        "kick takes a session ID or --uid UID, not both".into(),
                    ));
                }
            }
        }
        CtlCommand::Push {
            id,
            topic,
            body,
            base64,
        } => Call::new(
            Method::POST,
            &["admin", "sessions", segment("ID", id)?, "push"],
        )
        .with_body(message(topic, body, *base64)),
        CtlCommand::Broadcast {
            room,
            topic,
            body,
            base64,
        } => {
            let path = match room {
                Some(room) => vec!["admin", "rooms", segment("ROOM", room)?, "broadcast"],
                None => vec!["admin", "broadcast"],
            };
            Call::new(Method::POST, &path).with_body(message(topic, body, *base64))
        }
        CtlCommand::Rooms { room: None } => Call::get(&["admin", "rooms"]),
        CtlCommand::Rooms { room: Some(room) } => {
            Call::get(&["admin", "rooms", segment("ROOM", room)?])
        }
        CtlCommand::Plugins => Call::get(&["admin", "plugins"]),
        CtlCommand::Reload { plugin } => Call::new(
            Method::POST,
            &["admin", "plugins", segment("PLUGIN", plugin)?, "reload"],
        ),
        CtlCommand::Log { filter: None } => Call::get(&["admin", "log"]),
        CtlCommand::Log {
            filter: Some(filter),
        } => Call::new(Method::PUT, &["admin", "log"]).with_body(json!({ "filter": filter })),
        CtlCommand::Config => Call::get(&["admin", "config"]),
        CtlCommand::Health => return Ok(vec![Call::get(&["healthz"]), Call::get(&["readyz"])]),
    };
    Ok(vec![call])
}

/// A name that goes into the URL's path as one segment: not empty, and not `.` or `..`, which
/// a URL would read as a move between segments.
fn segment<'a>(what: &str, value: &'a str) -> Result<&'a str, CtlError> {
    if value.is_empty() || value == "." || value == ".." {
        Err(CtlError::Usage(format!("{what} {value:?} names nothing")))
    } else {
        Ok(value)
    }
}

/// The body of a push or broadcast.
fn message(topic: &str, body: &str, base64: bool) -> Value {
    if base64 {
        json!({ "topic": topic, "body_base64": body })
    } else {
        json!({ "topic": topic, "body": body })
    }
}

/// `--timeout`: seconds, whole or not, more than zero.
fn seconds(text: &str) -> Result<Duration, String> {
    let s: f64 = text
        .trim()
        .parse()
        .map_err(|_| format!("{text:?} is not a number of seconds"))?;
    if s.is_finite() && s > 0.0 && s <= 86_400.0 {
        Ok(Duration::from_secs_f64(s))
    } else {
        Err(format!(
            "{text:?}: the timeout is more than 0 and at most a day"
        ))
    }
}

/// The admin API's base URL: `--admin`, else `WARREN_ADMIN`, else the default. `9090` and
/// `:9090` mean 127.0.0.1:9090 (as `[admin] addr` reads them), `HOST:PORT` means http://.
fn admin_url(given: Option<&str>, env: &dyn Fn(&str) -> Option<String>) -> Result<Url, CtlError> {
    let raw = given
        .map(str::to_owned)
        .or_else(|| env(ADMIN_ENV).filter(|v| !v.trim().is_empty()))
        .unwrap_or_else(|| DEFAULT_ADMIN.to_owned());
    let raw = raw.trim();
    let port = raw.strip_prefix(':').unwrap_or(raw);
    let text = if !port.is_empty() && port.bytes().all(|b| b.is_ascii_digit()) {
        format!("http://127.0.0.1:{port}")
    } else if raw.contains("://") {
        raw.to_owned()
    } else {
        format!("http://{raw}")
    };
    let bad = |why: String| CtlError::Usage(format!("--admin {raw:?}: {why}"));
    let url = Url::parse(&text).map_err(|e| bad(e.to_string()))?;
    match url.scheme() {
        "http" => {}
        "https" => {
            return Err(bad(
                "the admin API serves plain HTTP (keep it on loopback or a private network): use \
                 http://"
                    .into(),
            ));
        }
        other => return Err(bad(format!("{other}:// is not HTTP: use http://HOST:PORT"))),
    }
    if url.cannot_be_a_base() || url.host().is_none() {
        return Err(bad("not an http://HOST:PORT URL".into()));
    }
    Ok(url)
}

/// The URL of `call` below `base` (whose own path, if any, is kept as a prefix).
fn call_url(base: &Url, call: &Call) -> Url {
    let mut url = base.clone();
    url.set_query(None);
    url.set_fragment(None);
    if let Ok(mut segments) = url.path_segments_mut() {
        segments.pop_if_empty().extend(&call.path);
    }
    if !call.query.is_empty() {
        let mut q = url.query_pairs_mut();
        for (k, v) in &call.query {
            q.append_pair(k, v);
        }
    }
    url
}

/// The HTTP side: one client, one base URL, the token.
struct Client {
    http: reqwest::Client,
    base: Url,
    token: Option<String>,
    timeout: Duration,
}

impl Client {
    fn new(base: Url, token: Option<String>, timeout: Duration) -> Result<Client, CtlError> {
        let http = reqwest::Client::builder()
            .timeout(timeout)
            // the admin API is on the operator's own network: a proxy set for the web at large
            // must not see the token
            .no_proxy()
            .user_agent(concat!("warren-ctl/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|e| CtlError::Usage(format!("cannot make an HTTP client: {e}")))?;
        Ok(Client {
            http,
            base,
            token,
            timeout,
        })
    }

    /// Send `call`; its status and JSON answer when the API answered with success (or
    /// `/readyz`'s 503 "not ready", which is an answer too), a typed error otherwise.
    async fn send(&self, call: &Call) -> Result<(StatusCode, Value), CtlError> {
        let url = call_url(&self.base, call);
        let mut req = self.http.request(call.method.clone(), url.clone());
        if let Some(token) = &self.token {
            req = req.bearer_auth(token);
        }
        if let Some(body) = &call.body {
            req = req
                .header(CONTENT_TYPE, "application/json")
                .body(body.to_string());
        }
        let unreachable = |e: reqwest::Error| CtlError::Unreachable {
            url: self.base.as_str().trim_end_matches('/').to_owned(),
            why: if e.is_timeout() {
                format!("no answer within {} s", self.timeout.as_secs_f64())
            } else {
                cause(&e)
            },
        };
        let response = req.send().await.map_err(unreachable)?;
        let status = response.status();
        let bytes = response.bytes().await.map_err(unreachable)?;
        answer(status, &bytes)
    }
}

/// Turn an HTTP answer into the API's JSON, or into the error it reports.
fn answer(status: StatusCode, bytes: &[u8]) -> Result<(StatusCode, Value), CtlError> {
    let body: Option<Value> = serde_json::from_slice(bytes).ok();
    if let Some(Value::Object(o)) = &body
        && let Some(Value::Object(e)) = o.get("error")
    {
        let text = |k: &str| e.get(k).and_then(Value::as_str).map(str::to_owned);
        return Err(CtlError::Api {
            code: text("code").unwrap_or_else(|| format!("http_{}", status.as_u16())),
            message: text("message").unwrap_or_default(),
        });
    }
    match body {
        Some(body) if status.is_success() => Ok((status, body)),
        Some(body) if status == StatusCode::SERVICE_UNAVAILABLE && body.get("ready").is_some() => {
            Ok((status, body))
        }
        _ => Err(CtlError::Api {
            code: format!("http_{}", status.as_u16()),
            message: if status.is_success() {
                format!(
                    "the answer is not JSON, is this a warren admin API? {}",
                    quote(bytes)
                )
            } else {
                let reason = status.canonical_reason().unwrap_or("error");
                format!("{reason} {}", quote(bytes)).trim_end().to_owned()
            },
        }),
    }
}

/// The start of a body that is not the API's, safe to print.
fn quote(bytes: &[u8]) -> String {
    let text = String::from_utf8_lossy(bytes);
    let text = text.trim();
    if text.is_empty() {
        return String::new();
    }
    let short: String = text.chars().take(MAX_QUOTED).collect();
    let more = if short.len() < text.len() { "…" } else { "" };
    format!("({}{more})", clean(&short))
}

/// The innermost reason of a transport error (`Connection refused (os error 111)`), which the
/// outer layers only wrap.
fn cause(e: &reqwest::Error) -> String {
    let mut source: &dyn std::error::Error = e;
    while let Some(inner) = source.source() {
        source = inner;
    }
    source.to_string()
}

/// `health`: `/healthz` and `/readyz` together; exit 1 and say why when the node is not ready.
fn health(answers: &[(StatusCode, Value)], json_out: bool) -> Done {
    let get = |i: usize| {
        answers
            .get(i)
            .map(|(_, v)| v.clone())
            .unwrap_or(Value::Null)
    };
    let both = json!({ "healthz": get(0), "readyz": get(1) });
    let ready = both["readyz"]["ready"].as_bool() == Some(true);
    let mut done = Done {
        stdout: if json_out {
            pretty(&both)
        } else {
            key_values(&both)
        },
        ..Done::default()
    };
    if !ready {
        let reasons = cell(both["readyz"].get("reasons"));
        done.stderr.push(format!("error: not_ready: {reasons}"));
        done.code = 1;
    }
    done
}

/// The warnings an answer calls for, on stderr: nodes that did not answer, sessions beyond this
/// page, plugins whose last reload failed.
fn warnings(command: &CtlCommand, body: &Value) -> Vec<String> {
    let mut out = Vec::new();
    if let Some(nodes) = body.get("unreachable").and_then(Value::as_array)
        && !nodes.is_empty()
    {
        let names: Vec<String> = nodes.iter().map(|n| cell(Some(n))).collect();
        out.push(format!(
            "warning: unreachable: {} (no answer in time; left out of this answer)",
            names.join(", ")
        ));
    }
    if let CtlCommand::Sessions { .. } = command {
        let n = |k: &str| body.get(k).and_then(Value::as_u64);
        let shown = body
            .get("sessions")
            .and_then(Value::as_array)
            .map_or(0, |s| s.len() as u64);
        if let (Some(total), Some(offset)) = (n("total"), n("offset"))
            && offset + shown < total
        {
            out.push(format!(
                "note: sessions {}–{} of {total}; --offset {} for the next page",
                offset + 1,
                offset + shown,
                offset + shown
            ));
        }
    }
    if let CtlCommand::Plugins = command {
        for p in body
            .get("plugins")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
        {
            if let Some(e) = p.get("last_error").filter(|e| !e.is_null()) {
                out.push(format!(
                    "warning: plugin {}: the last load failed: {}",
                    cell(p.get("name")),
                    cell(e.get("message"))
                ));
            }
        }
    }
    out
}

/// The answer to `command` as people read it: a table for a list, `key: value` lines otherwise.
/// `"unreachable"` is left out: [`warnings`] names those nodes on stderr.
fn render(command: &CtlCommand, body: &Value) -> String {
    let mut body = body.clone();
    if let Some(o) = body.as_object_mut() {
        o.remove("unreachable");
    }
    let body = &body;
    let list = |key: &str| body.get(key).and_then(Value::as_array);
    match command {
        CtlCommand::Nodes => match list("nodes") {
            Some(nodes) => table(
                &["ID", "SELF", "ADDR", "MODULES", "SESSIONS"],
                nodes.iter().map(|n| {
                    vec![
                        cell(n.get("id")),
                        yes_no(n.get("self")),
                        cell(n.get("addr")),
                        modules(n.get("modules")),
                        cell(n.get("sessions")),
                    ]
                }),
            ),
            None => key_values(body),
        },
        CtlCommand::Sessions { .. } => match list("sessions") {
            Some(sessions) => table(
                &["ID", "NODE", "UID", "PROTOCOL", "PEER", "CONNECTED"],
                sessions.iter().map(|s| {
                    ["id", "node", "uid", "protocol", "peer", "connected_at"]
                        .iter()
                        .map(|k| cell(s.get(*k)))
                        .collect()
                }),
            ),
            None => key_values(body),
        },
        CtlCommand::Rooms { room: None } => match list("rooms") {
            Some(rooms) => table(
                &["NAME", "MEMBERS"],
                rooms
                    .iter()
                    .map(|r| vec![cell(r.get("name")), cell(r.get("members"))]),
            ),
            None => key_values(body),
        },
        CtlCommand::Rooms { room: Some(_) } => match list("members") {
            Some(members) => {
                let mut rest = body.clone();
                if let Some(o) = rest.as_object_mut() {
                    o.remove("members");
                }
                let mut out = key_values(&rest);
                out.push('\n');
                out.push_str(&table(
                    &["SESSION", "NODE", "UID"],
                    members.iter().map(|m| {
                        ["session", "node", "uid"]
                            .iter()
                            .map(|k| cell(m.get(*k)))
                            .collect()
                    }),
                ));
                out
            }
            None => key_values(body),
        },
        CtlCommand::Plugins => match list("plugins") {
            Some(plugins) => table(
                &["NAME", "KIND", "ROLE", "VERSION", "PATH"],
                plugins.iter().map(|p| {
                    ["name", "kind", "role", "version", "path"]
                        .iter()
                        .map(|k| cell(p.get(*k)))
                        .collect()
                }),
            ),
            None => key_values(body),
        },
        // `{"node","config":{…}}`: the node, then the config's keys without a `config.` prefix
        CtlCommand::Config => match body.get("config").filter(|c| c.is_object()) {
            Some(config) => {
                let mut rest = body.clone();
                if let Some(o) = rest.as_object_mut() {
                    o.remove("config");
                }
                let mut out = key_values(&rest);
                out.push('\n');
                out.push_str(&key_values(config));
                out
            }
            None => key_values(body),
        },
        _ => key_values(body),
    }
}

/// The API's JSON, indented, with a final newline.
fn pretty(body: &Value) -> String {
    let mut s = serde_json::to_string_pretty(body).unwrap_or_else(|_| body.to_string());
    s.push('\n');
    s
}

/// Rows under a header, each column as wide as its widest cell, two spaces apart; the last
/// column is not padded, so no line ends in spaces.
fn table(header: &[&str], rows: impl IntoIterator<Item = Vec<String>>) -> String {
    let rows: Vec<Vec<String>> = std::iter::once(header.iter().map(|h| (*h).to_owned()).collect())
        .chain(rows)
        .collect();
    let mut widths = vec![0; header.len()];
    for row in &rows {
        for (w, c) in widths.iter_mut().zip(row) {
            *w = (*w).max(c.chars().count());
        }
    }
    let mut out = String::new();
    for row in &rows {
        let mut line = String::new();
        for (i, (c, w)) in row.iter().zip(&widths).enumerate() {
            if i > 0 {
                line.push_str("  ");
            }
            line.push_str(c);
            if i + 1 < row.len() {
                line.extend(std::iter::repeat_n(' ', w - c.chars().count()));
            }
        }
        out.push_str(line.trim_end());
        out.push('\n');
    }
    out
}

/// One object as `key: value` lines, the values aligned; nested objects and arrays of objects
/// flattened into dotted keys (`settings.room`, `listeners[0].addr`).
fn key_values(body: &Value) -> String {
    let mut pairs = Vec::new();
    match body {
        Value::Object(o) => flatten("", o, &mut pairs),
        other => pairs.push(("value".to_owned(), cell(Some(other)))),
    }
    let width = pairs
        .iter()
        .map(|(k, _)| k.chars().count())
        .max()
        .unwrap_or(0);
    let mut out = String::new();
    for (k, v) in pairs {
        let pad = width - k.chars().count();
        let line = format!("{k}:{} {v}", " ".repeat(pad));
        out.push_str(line.trim_end());
        out.push('\n');
    }
    out
}

fn flatten(prefix: &str, object: &Map<String, Value>, out: &mut Vec<(String, String)>) {
    for (k, v) in object {
        let key = if prefix.is_empty() {
            clean(k)
        } else {
            format!("{prefix}.{}", clean(k))
        };
        flatten_value(key, v, out);
    }
}

fn flatten_value(key: String, v: &Value, out: &mut Vec<(String, String)>) {
    match v {
        Value::Object(o) if !o.is_empty() => flatten(&key, o, out),
        Value::Array(a) if a.iter().any(|x| x.is_object() || x.is_array()) => {
            for (i, x) in a.iter().enumerate() {
                flatten_value(format!("{key}[{i}]"), x, out);
            }
        }
        _ => out.push((key, cell(Some(v)))),
    }
}

/// One value as a table cell or after `key:`: `-` for nothing, strings without quotes (control
/// characters escaped, so a client-chosen uid cannot drive the terminal), lists comma-joined.
fn cell(v: Option<&Value>) -> String {
    match v {
        None | Some(Value::Null) => "-".to_owned(),
        Some(Value::String(s)) if s.is_empty() => "\"\"".to_owned(),
        Some(Value::String(s)) => clean(s),
        Some(Value::Array(a)) if a.is_empty() => "[]".to_owned(),
        Some(Value::Array(a)) => a
            .iter()
            .map(|x| cell(Some(x)))
            .collect::<Vec<_>>()
            .join(","),
        Some(Value::Object(o)) if o.is_empty() => "{}".to_owned(),
        Some(other) => clean(&other.to_string()),
    }
}

/// `s` with control characters escaped and blanks that would split a column made visible.
fn clean(s: &str) -> String {
    s.chars()
        .flat_map(|c| {
            if c.is_control() {
                c.escape_default().collect::<Vec<_>>()
            } else {
                vec![c]
            }
        })
        .collect()
}

fn yes_no(v: Option<&Value>) -> String {
    match v.and_then(Value::as_bool) {
        Some(true) => "yes".to_owned(),
        Some(false) => "no".to_owned(),
        None => "-".to_owned(),
    }
}

/// A node's modules as `Gate,Chat(2)`: each type once, in the order listed, with its count of
/// instances when more than one.
fn modules(v: Option<&Value>) -> String {
    let Some(list) = v.and_then(Value::as_array) else {
        return cell(v);
    };
    let mut counts: Vec<(String, usize)> = Vec::new();
    for m in list {
        let name = m
            .get("type")
            .and_then(Value::as_str)
            .map_or_else(|| cell(Some(m)), clean);
        match counts.iter_mut().find(|(n, _)| *n == name) {
            Some((_, c)) => *c += 1,
            None => counts.push((name, 1)),
        }
    }
    if counts.is_empty() {
        return "-".to_owned();
    }
    counts
        .into_iter()
        .map(|(n, c)| if c > 1 { format!("{n}({c})") } else { n })
        .collect::<Vec<_>>()
        .join(",")
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser, Debug)]
    struct Cli {
        #[command(flatten)]
        ctl: CtlArgs,
    }

    fn parse(args: &[&str]) -> Result<CtlArgs, clap::Error> {
        Cli::try_parse_from(std::iter::once("ctl").chain(args.iter().copied())).map(|c| c.ctl)
    }

    fn no_env(_: &str) -> Option<String> {
        None
    }

    #[test]
    fn the_command_line_is_well_formed() {
        use clap::CommandFactory;
        Cli::command().debug_assert();
    }

    #[test]
    fn options_go_before_or_after_the_command() {
        let a = parse(&["--json", "--admin", "9191", "sessions", "--uid", "alice"]).unwrap();
        let b = parse(&["sessions", "--uid", "alice", "--admin", "9191", "--json"]).unwrap();
        for a in [a, b] {
            assert!(a.json);
            assert_eq!(a.admin.as_deref(), Some("9191"));
            assert_eq!(a.timeout, Duration::from_secs(10));
            assert_eq!(
                a.command,
                CtlCommand::Sessions {
                    uid: Some("alice".into()),
                    node: None,
                    limit: None,
                    offset: None
                }
            );
        }
        let t = parse(&["--timeout", "0.5", "nodes"]).unwrap();
        assert_eq!(t.timeout, Duration::from_millis(500));
    }

    #[test]
    fn usage_errors_are_refused_by_the_parser() {
        use clap::error::ErrorKind;
        let kind = |args: &[&str]| parse(args).unwrap_err().kind();
        assert_eq!(kind(&["kick"]), ErrorKind::MissingRequiredArgument);
        assert_eq!(
            kind(&["kick", "7", "--uid", "bob"]),
            ErrorKind::ArgumentConflict
        );
        assert_eq!(
            kind(&["push", "7", "Chat/OnMsg"]),
            ErrorKind::MissingRequiredArgument
        );
        assert_eq!(
            kind(&["sessions", "--limit", "many"]),
            ErrorKind::ValueValidation
        );
        assert_eq!(
            kind(&["--timeout", "0", "nodes"]),
            ErrorKind::ValueValidation
        );
        assert_eq!(
            kind(&["--timeout", "nan", "nodes"]),
            ErrorKind::ValueValidation
        );
        assert_eq!(kind(&["frobnicate"]), ErrorKind::InvalidSubcommand);
        assert_eq!(
            kind(&[]),
            ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand
        );
        // clap's usage errors exit 2, as docs/ctl.md says
        assert_eq!(parse(&["kick"]).unwrap_err().exit_code(), 2);
    }

    #[test]
    fn commands_become_the_contracts_requests() {
        let one = |args: &[&str]| {
            let mut calls = plan(&parse(args).unwrap().command).unwrap();
            assert_eq!(calls.len(), 1);
            calls.remove(0)
        };
        let base = Url::parse("http://127.0.0.1:9090").unwrap();
        let url = |args: &[&str]| call_url(&base, &one(args)).to_string();
        assert_eq!(url(&["nodes"]), "http://127.0.0.1:9090/admin/nodes");
        assert_eq!(
            url(&[
                "sessions", "--uid", "a b&c", "--limit", "5", "--offset", "10"
            ]),
            "http://127.0.0.1:9090/admin/sessions?uid=a+b%26c&offset=10&limit=5"
        );
        assert_eq!(
            url(&["session", "a/b"]),
            "http://127.0.0.1:9090/admin/sessions/a%2Fb"
        );
        let kick = one(&["kick", "42", "--reason", "bye"]);
        assert_eq!(kick.method, Method::POST);
        assert_eq!(kick.body, Some(json!({"reason": "bye"})));
        assert_eq!(call_url(&base, &kick).path(), "/admin/sessions/42/kick");
        let kick = one(&["kick", "--uid", "alice"]);
        assert_eq!(kick.body, Some(json!({})));
        assert_eq!(
            call_url(&base, &kick).to_string(),
            "http://127.0.0.1:9090/admin/kick?uid=alice"
        );
        let push = one(&["push", "42", "Chat/OnMsg", "hi"]);
        assert_eq!(
            push.body,
            Some(json!({"topic": "Chat/OnMsg", "body": "hi"}))
        );
        let push = one(&["push", "42", "T", "aGk=", "--base64"]);
        assert_eq!(
            push.body,
            Some(json!({"topic": "T", "body_base64": "aGk="}))
        );
        assert_eq!(
            url(&["broadcast", "T", "x"]),
            "http://127.0.0.1:9090/admin/broadcast"
        );
        assert_eq!(
            url(&["broadcast", "--room", "lobby", "T", "x"]),
            "http://127.0.0.1:9090/admin/rooms/lobby/broadcast"
        );
        assert_eq!(url(&["rooms"]), "http://127.0.0.1:9090/admin/rooms");
        assert_eq!(
            url(&["rooms", "lobby"]),
            "http://127.0.0.1:9090/admin/rooms/lobby"
        );
        assert_eq!(url(&["plugins"]), "http://127.0.0.1:9090/admin/plugins");
        let reload = one(&["reload", "Greeter"]);
        assert_eq!(
            (reload.method.clone(), reload.body.clone()),
            (Method::POST, None)
        );
        assert_eq!(
            call_url(&base, &reload).path(),
            "/admin/plugins/Greeter/reload"
        );
        assert_eq!(one(&["log"]).method, Method::GET);
        let log = one(&["log", "info,warren=debug"]);
        assert_eq!(log.method, Method::PUT);
        assert_eq!(log.body, Some(json!({"filter": "info,warren=debug"})));
        assert_eq!(url(&["config"]), "http://127.0.0.1:9090/admin/config");
        let health = plan(&CtlCommand::Health).unwrap();
        let paths: Vec<String> = health
            .iter()
            .map(|c| call_url(&base, c).path().to_owned())
            .collect();
        assert_eq!(paths, ["/healthz", "/readyz"]);
        // a name that a URL would read as a move between segments is refused
        for bad in [&["session", ".."][..], &["kick", "."], &["rooms", ""]] {
            let e = plan(&parse(bad).unwrap().command).unwrap_err();
            assert_eq!(e.exit_code(), 2, "{e}");
        }
    }

    #[test]
    fn the_admin_url_comes_from_the_flag_the_environment_or_the_default() {
        let env = |name: &str| (name == ADMIN_ENV).then(|| "10.0.0.5:9999".to_owned());
        let url = |given: Option<&str>, env: &dyn Fn(&str) -> Option<String>| {
            admin_url(given, env).map(|u| u.to_string())
        };
        assert_eq!(url(None, &no_env).unwrap(), "http://127.0.0.1:9090/");
        assert_eq!(url(None, &env).unwrap(), "http://10.0.0.5:9999/");
        assert_eq!(url(Some("9191"), &env).unwrap(), "http://127.0.0.1:9191/");
        assert_eq!(url(Some(":9191"), &env).unwrap(), "http://127.0.0.1:9191/");
        assert_eq!(url(Some("[::1]:9191"), &env).unwrap(), "http://[::1]:9191/");
        assert_eq!(
            url(Some("http://ops.example:80/warren/"), &env).unwrap(),
            "http://ops.example/warren/"
        );
        for bad in ["https://127.0.0.1:9090", "ftp://x", "http://", "not a url"] {
            let e = admin_url(Some(bad), &no_env).unwrap_err();
            assert_eq!(e.exit_code(), 2, "{bad}: {e}");
        }
        // a path prefix (a reverse proxy's) stays in front of the API's paths
        let base = admin_url(Some("http://ops.example/warren"), &no_env).unwrap();
        let call = Call::get(&["admin", "nodes"]);
        assert_eq!(call_url(&base, &call).path(), "/warren/admin/nodes");
    }

    #[test]
    fn answers_and_errors_are_told_apart() {
        let ok = answer(StatusCode::OK, br#"{"kicked":1,"node":"n2"}"#).unwrap();
        assert_eq!(ok.1, json!({"kicked": 1, "node": "n2"}));
        let e = answer(
            StatusCode::UNAUTHORIZED,
            br#"{"error":{"code":"unauthorized","message":"no token"}}"#,
        )
        .unwrap_err();
        assert_eq!(e.to_string(), "unauthorized: no token");
        assert_eq!(e.exit_code(), 1);
        let e = answer(StatusCode::BAD_GATEWAY, b"<html>bad gateway</html>").unwrap_err();
        assert_eq!(
            e.to_string(),
            "http_502: Bad Gateway (<html>bad gateway</html>)"
        );
        let e = answer(StatusCode::OK, b"hello").unwrap_err();
        assert!(
            e.to_string()
                .starts_with("http_200: the answer is not JSON"),
            "{e}"
        );
        // /readyz's "not ready" is an answer, not an error
        let r = answer(
            StatusCode::SERVICE_UNAVAILABLE,
            br#"{"ready":false,"reasons":["draining"]}"#,
        )
        .unwrap();
        assert_eq!(r.1["ready"], json!(false));
        let e = CtlError::Unreachable {
            url: "http://127.0.0.1:1".into(),
            why: "Connection refused".into(),
        };
        assert_eq!(e.exit_code(), 3);
    }

    #[test]
    fn tables_are_aligned_without_trailing_blanks() {
        let t = table(
            &["ID", "NODE", "UID"],
            vec![
                vec!["1".into(), "node-long".into(), "alice".into()],
                vec!["12345".into(), "n2".into(), "-".into()],
            ],
        );
        assert_eq!(
            t,
            "ID     NODE       UID\n\
             1      node-long  alice\n\
             12345  n2         -\n"
        );
        assert_eq!(table(&["NAME", "MEMBERS"], Vec::new()), "NAME  MEMBERS\n");
    }

    #[test]
    fn lists_render_as_the_columns_of_their_kind() {
        let nodes = json!({"node":"n1","nodes":[
            {"id":"n1","self":true,"addr":"10.0.0.1:3563","version":"0.1.0",
             "modules":[{"type":"Gate","id":"g"},{"type":"Chat","id":"c1"},{"type":"Chat","id":"c2"}],"sessions":3},
            {"id":"n2","self":false,"addr":null,"version":null,"modules":[],"sessions":null}],
            "unreachable":["n3"]});
        assert_eq!(
            render(&CtlCommand::Nodes, &nodes),
            "ID  SELF  ADDR           MODULES       SESSIONS\n\
             n1  yes   10.0.0.1:3563  Gate,Chat(2)  3\n\
             n2  no    -              -             -\n"
        );
        assert_eq!(
            warnings(&CtlCommand::Nodes, &nodes),
            ["warning: unreachable: n3 (no answer in time; left out of this answer)"]
        );
        let sessions = json!({"sessions":[{"id":"7","node":"n2","uid":"al\u{1b}[2Jice","protocol":"mqtt",
            "listener":"127.0.0.1:1883","peer":"127.0.0.1:5000","connected_at":"2026-12-06T10:00:00.000Z",
            "settings":{}}],"total":3,"offset":0,"limit":1,"unreachable":[]});
        let cmd = CtlCommand::Sessions {
            uid: None,
            node: None,
            limit: Some(1),
            offset: None,
        };
        assert_eq!(
            render(&cmd, &sessions),
            "ID  NODE  UID             PROTOCOL  PEER            CONNECTED\n\
             7   n2    al\\u{1b}[2Jice  mqtt      127.0.0.1:5000  2026-12-06T10:00:00.000Z\n"
        );
        assert_eq!(
            warnings(&cmd, &sessions),
            ["note: sessions 1–1 of 3; --offset 1 for the next page"]
        );
        let rooms = json!({"rooms":[{"name":"lobby","members":12},{"name":"x","members":1}]});
        assert_eq!(
            render(&CtlCommand::Rooms { room: None }, &rooms),
            "NAME   MEMBERS\nlobby  12\nx      1\n"
        );
        let room = json!({"name":"lobby","members":[{"session":"7","node":"n2","uid":null}]});
        assert_eq!(
            render(
                &CtlCommand::Rooms {
                    room: Some("lobby".into())
                },
                &room
            ),
            "name: lobby\n\nSESSION  NODE  UID\n7        n2    -\n"
        );
        let plugins = json!({"node":"n1","plugins":[{"name":"Greeter","role":"module","module":"Greeter",
            "listener":null,"kind":"lua","path":"/srv/greeter.lua","version":2,
            "last_error":{"message":"greeter.lua:3: syntax error","line":3,"at":"x"}}]});
        assert_eq!(
            render(&CtlCommand::Plugins, &plugins),
            "NAME     KIND  ROLE    VERSION  PATH\nGreeter  lua   module  2        /srv/greeter.lua\n"
        );
        assert_eq!(
            warnings(&CtlCommand::Plugins, &plugins),
            ["warning: plugin Greeter: the last load failed: greeter.lua:3: syntax error"]
        );
    }

    #[test]
    fn one_object_renders_as_aligned_key_value_lines() {
        let session = json!({"id":"7","node":"n2","uid":"alice","settings":{"room":"lobby","n":1},
            "tags":["a","b"],"empty":[],"listeners":[{"addr":"x"}],"gone":null});
        let want: String = [
            ("id", "7"),
            ("node", "n2"),
            ("uid", "alice"),
            ("settings.room", "lobby"),
            ("settings.n", "1"),
            ("tags", "a,b"),
            ("empty", "[]"),
            ("listeners[0].addr", "x"),
            ("gone", "-"),
        ]
        .iter()
        // the widest key is `listeners[0].addr` (17): every value starts in column 20
        .map(|(k, v)| format!("{:<19}{v}\n", format!("{k}:")))
        .collect();
        assert_eq!(key_values(&session), want);
        assert_eq!(key_values(&json!({"kicked":1})), "kicked: 1\n");
        let config =
            json!({"node":"n1","config":{"admin":{"addr":"127.0.0.1:9090","token":"<redacted>"}}});
        assert_eq!(
            render(&CtlCommand::Config, &config),
            "node: n1\n\nadmin.addr:  127.0.0.1:9090\nadmin.token: <redacted>\n"
        );
        let kicked = json!({"kicked":2,"unreachable":["n3"]});
        let cmd = CtlCommand::Kick {
            id: None,
            uid: Some("bob".into()),
            reason: None,
        };
        assert_eq!(render(&cmd, &kicked), "kicked: 2\n");
        assert_eq!(warnings(&cmd, &kicked).len(), 1);
    }

    #[test]
    fn health_reports_readiness_and_fails_when_not_ready() {
        let up = [
            (StatusCode::OK, json!({"status":"ok"})),
            (StatusCode::OK, json!({"ready":true})),
        ];
        let done = health(&up, false);
        assert_eq!(done.code, 0);
        assert_eq!(done.stdout, "healthz.status: ok\nreadyz.ready:   true\n");
        let down = [
            (StatusCode::OK, json!({"status":"ok"})),
            (
                StatusCode::SERVICE_UNAVAILABLE,
                json!({"ready":false,"reasons":["draining","bus disconnected"]}),
            ),
        ];
        let done = health(&down, true);
        assert_eq!(done.code, 1);
        assert_eq!(done.stderr, ["error: not_ready: draining,bus disconnected"]);
        let v: Value = serde_json::from_str(&done.stdout).unwrap();
        assert_eq!(v["readyz"]["ready"], json!(false));
    }
}

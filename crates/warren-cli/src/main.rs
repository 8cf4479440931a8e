//! The `warren` binary: one command runs a node with a gate (`serve`) or a node of modules only
//! (`node`), checks a config (`check-config`) or prints the commented default
//! (`print-default-config`). With no config `serve` runs the chat demo in one process, with
//! nothing else to install; `--bus` and `--registry` spread the same modules over many processes.

#![forbid(unsafe_code)]

mod passwd;
mod web;

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context as _;
use clap::{Args, Parser, Subcommand};
use tokio_util::sync::CancellationToken;
use warren::Node;
use warren::config::{Config, ConfigError, ListenerConfig, ModuleConfig};

/// warren: a realtime server for long-connection applications.
#[derive(Parser)]
#[command(name = "warren", version, about, long_about = None)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run a node: gate listeners, modules, and the web page. With no flags, the chat demo on
    /// 127.0.0.1:3563 (MQTT), 127.0.0.1:3653 (MQTT over WebSocket) and http://127.0.0.1:8080/.
    Serve(ServeArgs),
    /// Run a node of modules without a gate of its own: by default the demo's Login and Chat,
    /// no listeners and no web page. Point it with --bus at the broker the gate uses. With
    /// --config, the file's modules and listeners; the web page only when the file has an
    /// [http] section or --http is given.
    Node(ServeArgs),
    /// Validate a config file and report every mistake, one line each (file:line:col: key:
    /// why); exit 1 if there is any. mqant's JSON `server.conf` is accepted too.
    CheckConfig {
        /// The TOML file (or mqant `server.conf`).
        file: PathBuf,
    },
    /// Config tools.
    #[command(subcommand)]
    Config(ConfigCommand),
    /// Print the commented default configuration.
    PrintDefaultConfig,
    /// Load generator: drive warren or any MQTT 3.1.1 server (pubsub, request, connections).
    Bench(warren_bench::BenchArgs),
    /// Add, change (-b for batch) or delete (-D) a user of an `[auth] password_file`, as
    /// mosquitto_passwd does: `warren passwd FILE USER`.
    Passwd(passwd::PasswdArgs),
}

#[derive(Subcommand)]
enum ConfigCommand {
    /// Print the warren TOML equivalent of an mqant `server.conf` (docs/protocols/mqtt.md).
    Convert {
        /// The mqant JSON config.
        file: PathBuf,
    },
}

#[derive(Args)]
struct ServeArgs {
    /// TOML config file; without it, the built-in chat demo config is used.
    #[arg(long, short)]
    config: Option<PathBuf>,
    /// Add a listener (repeatable). Schemes: mqtt, mqtt+mqant, ws, ws+mqant (MQTT over TCP or
    /// WebSocket, plain or mqant mode); pomelo (TCP and WebSocket on one port); json+ws; line;
    /// pomelo-rpc (MQTT transport), pomelo-rpc+tcp (stream-pkg). TLS forms: mqtts, mqtts+mqant,
    /// wss, wss+mqant, pomelo+tls, json+wss, line+tls, pomelo-rpc+tls, pomelo-rpc+tcp+tls, with
    /// ?tls_cert=FILE&tls_key=FILE. Any listener setting is a query parameter
    /// (mqtt://127.0.0.1:1883?max_packet=4096&rpc_expired_s=5); lists are comma-separated
    /// (allow=10.0.0.0/8,192.0.2.7), maps NAME:VALUE pairs (service_map=service:Echo,chat:Chat).
    #[arg(long, value_name = "URL")]
    listen: Vec<String>,
    /// Serve the web page on this address instead of the configured one.
    #[arg(long, value_name = "ADDR")]
    http: Option<String>,
    /// Do not serve the web page.
    #[arg(long)]
    no_http: bool,
    /// Without --config: do not open the demo listeners on 3563 and 3653.
    #[arg(long)]
    no_demo_listeners: bool,
    /// Without --config: run none of the demo's modules (a gate for module nodes, or a node
    /// running only the modules given with --module).
    #[arg(long)]
    no_demo_modules: bool,
    /// Also run a built-in module (repeatable): Login and Chat (the chat demo), Echo (replies
    /// with what it is sent), Debug (misbehaving handlers, for tests), global (the JSON-WS
    /// sample's functions), rpc (the TianQinS Redis RPC sample's functions).
    #[arg(long, value_name = "TYPE")]
    module: Vec<String>,
    /// Node id (default: the config's, or `<host>-<pid>` when the bus is not local).
    #[arg(long)]
    node_id: Option<String>,
    /// The bus between nodes: local, nats://HOST:4222, redis://HOST:6379/0 or
    /// amqp://USER:PASS@HOST:5672/%2f (overrides `[bus] url`).
    #[arg(long, value_name = "URL")]
    bus: Option<String>,
    /// Where nodes find each other: memory, nats://…, redis://… or etcd://… (overrides
    /// `[registry] url`; default: the bus's URL for NATS and Redis).
    #[arg(long, value_name = "URL")]
    registry: Option<String>,
    /// Runtime worker threads; 0 means one per CPU (overrides `[node] threads`).
    #[arg(long, value_name = "N")]
    threads: Option<usize>,
}

/// Which command runs the node.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Role {
    /// `warren serve`: a gate, its listeners and the web page.
    Serve,
    /// `warren node`: modules only.
    Node,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Bench(args) => warren_bench::main(args),
        Command::Passwd(args) => passwd::main(args),
        Command::Config(ConfigCommand::Convert { file }) => match convert(&file) {
            Ok(text) => {
                print!("{text}");
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("{e:#}");
                ExitCode::FAILURE
            }
        },
        Command::PrintDefaultConfig => {
            print!("{}", warren::config::DEFAULT_CONFIG);
            ExitCode::SUCCESS
        }
        Command::CheckConfig { file } => match load_config(&file) {
            Ok(_) => {
                println!("ok: {}", file.display());
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("{e:#}");
                ExitCode::FAILURE
            }
        },
        Command::Serve(args) => run(Role::Serve, args),
        Command::Node(args) => run(Role::Node, args),
    }
}

fn run(role: Role, args: ServeArgs) -> ExitCode {
    init_logging();
    let config = match resolve_config(role, &args) {
        Ok(c) => c,
        Err(e) => {
            // one line per mistake, each with the prefix
            for line in format!("{e:#}").lines() {
                eprintln!("error: {line}");
            }
            return ExitCode::FAILURE;
        }
    };
    // one thread: the current-thread scheduler, which runs woken tasks in the order they woke,
    // so a writer woken by the first of many queued frames runs after the rest were queued
    let mut builder = match config.node.threads {
        1 => tokio::runtime::Builder::new_current_thread(),
        0 => tokio::runtime::Builder::new_multi_thread(),
        n => {
            let mut b = tokio::runtime::Builder::new_multi_thread();
            b.worker_threads(n);
            b
        }
    };
    raise_nofile(&config);
    let rt = match builder.enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match rt.block_on(serve(config, move || resolve_config(role, &args))) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    std::panic::set_hook(Box::new(|info| {
        tracing::error!(panic = %info, "panic");
    }));
}

/// Everything wrong with a config file, one `FILE:LINE:COL: key: why` line each.
#[derive(Debug)]
struct FileErrors(Vec<String>);

impl std::fmt::Display for FileErrors {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0.join("\n"))
    }
}

impl std::error::Error for FileErrors {}

/// A loaded config file.
struct Loaded {
    config: Config,
    /// The file has an `[http]` section: a `warren node` serves the web page only then.
    has_http: bool,
}

/// A config file's text, or why it cannot be read, in words.
fn read_text(file: &std::path::Path) -> anyhow::Result<String> {
    std::fs::read_to_string(file).map_err(|e| {
        let why = match e.kind() {
            std::io::ErrorKind::NotFound => "no such file".to_owned(),
            std::io::ErrorKind::PermissionDenied => "permission denied".to_owned(),
            std::io::ErrorKind::IsADirectory => "it is a directory".to_owned(),
            std::io::ErrorKind::InvalidData => "it is not UTF-8 text".to_owned(),
            _ => e.to_string(),
        };
        anyhow::anyhow!("{}: cannot read: {why}", file.display())
    })
}

/// Read, parse and validate a config file, including each module's own settings and the files
/// the node reads at start; every mistake is reported, each at its line and column.
fn load_config(file: &std::path::Path) -> anyhow::Result<Loaded> {
    let text = read_text(file)?;
    let name = file.display();
    let at = |e: &ConfigError| match e.to_string() {
        // errors without a line get a space after the file name: `file: key: why`
        s if s.starts_with(|c: char| c.is_ascii_digit()) => format!("{name}:{s}"),
        s => format!("{name}: {s}"),
    };
    let report = |errors: Vec<ConfigError>| FileErrors(errors.iter().map(at).collect());
    if warren::mqant_conf::is_mqant_json(&text) {
        let (config, warnings) =
            warren::mqant_conf::from_mqant_json(&text).map_err(|e| anyhow::anyhow!(at(&e)))?;
        for w in warnings {
            eprintln!("{name}: warning: {w}");
        }
        let mut errors = config.problems(warren_chat::MODULE_TYPES);
        errors.extend(start_checks(&config));
        if !errors.is_empty() {
            return Err(report(errors).into());
        }
        return Ok(Loaded {
            config,
            has_http: false,
        });
    }
    let config =
        Config::load_all_with(&text, warren_chat::MODULE_TYPES, start_checks).map_err(report)?;
    let has_http = toml::from_str::<toml::Table>(&text).is_ok_and(|t| t.contains_key("http"));
    Ok(Loaded { config, has_http })
}

/// What the node checks as it starts, beyond the config's own rules: each module's settings
/// (as the catalog reads them) and the ACL file.
fn start_checks(config: &Config) -> Vec<ConfigError> {
    let mut errors = Vec::new();
    for (i, m) in config.modules.iter().enumerate() {
        if !warren_chat::MODULE_TYPES.contains(&m.kind.as_str()) {
            continue; // an unknown type is the config's own error
        }
        if let Err(why) = warren_chat::catalog(m) {
            errors.push(ConfigError::invalid(format!("module[{i}]"), why));
        }
    }
    if let Some(acl) = &config.auth.acl_file
        && let Err(e) = warren::acl::Acl::load(acl)
    {
        errors.push(ConfigError::invalid("auth.acl_file", format!("{e:#}")));
    }
    errors
}

/// `warren config convert`: mqant JSON in, warren TOML out.
fn convert(file: &std::path::Path) -> anyhow::Result<String> {
    let text = read_text(file)?;
    let (config, warnings) = warren::mqant_conf::from_mqant_json(&text)
        .map_err(|e| anyhow::anyhow!("{}:{e}", file.display()))?;
    let mut out = format!(
        "# converted from {} (mqant server.conf) by `warren config convert`\n",
        file.display()
    );
    for w in warnings {
        out.push_str(&format!("# warning: {w}\n"));
    }
    out.push('\n');
    out.push_str(&toml::to_string(&config).context("cannot write TOML")?);
    Ok(out)
}

/// The built-in demo: mqant-mode MQTT on 3563 (TCP) and 3653 (WebSocket), Login and Chat.
fn demo_config() -> Config {
    let mut c = Config::default();
    let l = |url: &str| ListenerConfig::from_url(url).expect("the demo listener URLs are valid");
    c.listeners = vec![
        l("mqtt+mqant://127.0.0.1:3563"),
        l("ws+mqant://127.0.0.1:3653"),
    ];
    c.modules = vec![
        ModuleConfig::new("Login"),
        ModuleConfig::new("Chat"),
        ModuleConfig::new("global"),
    ];
    c
}

/// The config this process runs: the file (or the demo's), then the command line's overrides,
/// validated. Read before the runtime starts, since `[node] threads` sizes it.
fn resolve_config(role: Role, args: &ServeArgs) -> anyhow::Result<Config> {
    let mut config = match &args.config {
        Some(file) => {
            let Loaded {
                mut config,
                has_http,
            } = load_config(file)?;
            // a module node serves no page unless its file asks for one: the page's default
            // address is the gate's
            if role == Role::Node && !has_http {
                config.http.enabled = false;
            }
            config
        }
        None => {
            let mut c = demo_config();
            if args.no_demo_listeners || role == Role::Node {
                c.listeners.clear();
            }
            if role == Role::Node {
                c.http.enabled = false;
                c.modules.retain(|m| m.kind != "global");
            }
            if args.no_demo_modules {
                c.modules.clear();
            }
            c
        }
    };
    if let Some(url) = &args.bus {
        config.bus.url = url.clone();
    }
    if let Some(url) = &args.registry {
        config.registry.url = url.clone();
    }
    for url in &args.listen {
        config
            .listeners
            .push(ListenerConfig::from_url(url).map_err(|e| anyhow::anyhow!("{e}"))?);
    }
    for m in &args.module {
        if !config.modules.iter().any(|x| &x.kind == m) {
            config.modules.push(ModuleConfig::new(m));
        }
    }
    if let Some(addr) = &args.http {
        config.http.addr = addr.clone();
        config.http.enabled = true;
    }
    if args.no_http {
        config.http.enabled = false;
    }
    if let Some(id) = &args.node_id {
        config.node.id = id.clone();
    }
    if let Some(n) = args.threads {
        config.node.threads = n;
    }
    let defaults = warren::config::NodeConfig::default();
    if !config.bus.is_local() {
        // many processes share one registry: the one-process defaults would collide
        if config.node.id == defaults.id {
            config.node.id = format!("{}-{}", hostname(), std::process::id());
        }
        if config.node.gate_id == defaults.gate_id {
            config.node.gate_id = format!("Gate-{}", config.node.id);
        }
        for m in config.modules.iter_mut().filter(|m| m.id.is_none()) {
            m.id = Some(format!("{}-{}", m.kind, config.node.id));
        }
    }
    config
        .validate(warren_chat::MODULE_TYPES)
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    Ok(config)
}

/// Descriptors kept for what is not a client connection (log, registry, bus, web page…) when
/// checking that the listeners' `max_conn` fit under the open file limit.
const NOFILE_MARGIN: u64 = 256;

/// Raise the soft open-file limit to the hard one (each connection is a descriptor; a soft
/// limit of 1024 would stop every listener after a thousand clients), and warn when the
/// listeners' `max_conn` together cannot fit under it.
fn raise_nofile(config: &Config) {
    let before = rlimit::getrlimit(rlimit::Resource::NOFILE).ok();
    let limit = match rlimit::increase_nofile_limit(u64::MAX) {
        Ok(n) => n,
        Err(e) => {
            tracing::warn!(error = %e, "cannot raise the open file limit");
            match before {
                Some((soft, _)) => soft,
                None => return,
            }
        }
    };
    tracing::info!(
        soft_before = before.map_or(0, |b| b.0),
        hard = before.map_or(limit, |b| b.1),
        nofile = limit,
        "open file limit"
    );
    let conns: u64 = config.listeners.iter().map(|l| l.max_conn as u64).sum();
    if conns + NOFILE_MARGIN > limit {
        tracing::warn!(
            nofile = limit,
            max_conn_total = conns,
            "the listeners' max_conn together ({conns}) plus {NOFILE_MARGIN} exceed the open file \
             limit ({limit}): past it, accepts fail; raise the hard limit (ulimit -Hn, LimitNOFILE=) \
             or lower max_conn"
        );
    }
}

/// Run the node `config` describes until SIGINT/SIGTERM; on SIGHUP, `reload` reads the config
/// again and the node takes its IP lists and TLS certificates.
async fn serve(config: Config, reload: impl Fn() -> anyhow::Result<Config>) -> anyhow::Result<()> {
    if config.listeners.is_empty() {
        tracing::warn!("no listeners configured: clients cannot connect");
    }

    let transport = warren_cluster::connect::transport(&config.bus).await?;
    let registry = warren_cluster::connect::registry(&config.registry, &config.bus).await?;
    let node_id = config.node.id.clone();
    // an instance runs here when it names this node or no node (and, for mqant AMQP instances
    // reached through RabbitMQ, only when it names this node)
    let runs_here = move |m: &ModuleConfig| match (&m.node, &m.bus) {
        (Some(n), _) => *n == node_id,
        (None, _) => true,
    };
    let mut builder = Node::builder(config.clone())
        .route_key("Chat", std::sync::Arc::new(warren_chat::chat::route_key));
    if let Some(t) = transport {
        builder = builder.transport(t);
    }
    if let Some(r) = registry {
        builder = builder.registry(r);
    }
    for m in config.modules.iter().filter(|m| runs_here(m)) {
        let module =
            warren_chat::catalog(m).map_err(|e| anyhow::anyhow!("module {}: {e}", m.kind))?;
        builder = builder.module(module, m.clone());
    }
    let node = builder.start().await?;
    let bridges = warren_cluster::connect::bridges(&config, node.handle(), &runs_here).await?;

    let stop_http = CancellationToken::new();
    let http = if config.http.enabled {
        let bound = web::serve(&config.http.addr, node.listeners(), stop_http.clone())
            .await
            .with_context(|| format!("cannot serve the web page on {}", config.http.addr))?;
        Some(bound)
    } else {
        None
    };

    println!(
        "warren {} node {:?} ready (bus {}, registry {})",
        env!("CARGO_PKG_VERSION"),
        config.node.id,
        if config.bus.is_local() {
            "local"
        } else {
            &config.bus.url
        },
        config.registry.effective_url(&config.bus),
    );
    for l in node.listeners() {
        println!("listening {}", l.describe());
    }
    if let Some((addr, _)) = &http {
        println!("web page http://{addr}/");
    }

    wait_for_signal(|| match reload() {
        Ok(new) => {
            let errors = node.reload(&new);
            if errors.is_empty() {
                tracing::info!(
                    "SIGHUP: reloaded the IP lists, TLS certificates, topic ACL and [auth] checks"
                );
            }
            for e in errors {
                tracing::error!(error = %e, "SIGHUP: not reloaded; the old setting stays");
            }
        }
        Err(e) => {
            tracing::error!(
                error = format!("{e:#}"),
                "SIGHUP: the config does not load; nothing reloaded"
            );
        }
    })
    .await;
    tracing::info!("shutdown requested");
    stop_http.cancel();
    bridges.stop();
    node.shutdown().await;
    if let Some((_, task)) = http {
        let _ = task.await;
    }
    Ok(())
}

/// Wait for SIGINT or SIGTERM, calling `on_hangup` for each SIGHUP meanwhile.
async fn wait_for_signal(on_hangup: impl Fn()) {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        match (
            signal(SignalKind::terminate()),
            signal(SignalKind::hangup()),
        ) {
            (Ok(mut term), Ok(mut hup)) => loop {
                tokio::select! {
                    _ = tokio::signal::ctrl_c() => break,
                    _ = term.recv() => break,
                    _ = hup.recv() => on_hangup(),
                }
            },
            _ => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = on_hangup;
        let _ = tokio::signal::ctrl_c().await;
    }
}

/// This host's name, for default node ids.
fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .map(|h| h.trim().to_owned())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "warren".into())
}

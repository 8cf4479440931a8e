//! The command line: `serve`, `node`, `check-config`, `config convert`, `print-default-config`,
//! `bench` and `passwd`, with the help texts that depend on the app (its name, its module types,
//! its built-in config) filled in before parsing.

use std::ffi::OsString;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, CommandFactory, FromArgMatches, Parser, Subcommand};

use crate::{App, Role, ctl, load, passwd, serve};

/// The parsed command line.
#[derive(Parser)]
#[command(version, long_about = None)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run a node: gate listeners, modules, and the web page.
    Serve(ServeArgs),
    /// Run a node of modules without a gate of its own.
    Node(ServeArgs),
    /// Validate a config file and report every mistake, one line each (file:line:col: key:
    /// why); exit 1 if there is any. mqant's JSON `server.conf` is accepted too.
    CheckConfig {
        /// The TOML file (or mqant `server.conf`).
        file: PathBuf,
        /// Check it as a node of this process group would run it (mqant's `ProcessID`).
        #[arg(long, value_name = "ID")]
        process_id: Option<String>,
    },
    /// Config tools.
    #[command(subcommand)]
    Config(ConfigCommand),
    /// Print the commented default configuration.
    PrintDefaultConfig,
    /// Load generator: drive warren or any MQTT 3.1.1 server (pubsub, request, connections).
    Bench(warren_bench::BenchArgs),
    /// Add, change (-b for batch) or delete (-D) a user of an `[auth] password_file`, as
    /// mosquitto_passwd does: `passwd FILE USER`.
    Passwd(passwd::PasswdArgs),
    /// Ask a running node's admin API: nodes, sessions, kick, push, rooms… (docs/ctl.md).
    Ctl(ctl::CtlArgs),
}

#[derive(Subcommand)]
enum ConfigCommand {
    /// Print the warren TOML equivalent of an mqant `server.conf` (docs/protocols/mqtt.md).
    Convert {
        /// The mqant JSON config.
        file: PathBuf,
    },
}

/// The options of `serve` and `node`.
#[derive(Args)]
pub(crate) struct ServeArgs {
    /// TOML config file; without it, the built-in config (see the command's description).
    #[arg(long, short)]
    pub config: Option<PathBuf>,
    /// Add a listener (repeatable). Schemes: mqtt, mqtt+mqant, ws, ws+mqant (MQTT over TCP or
    /// WebSocket, plain or mqant mode); pomelo (TCP and WebSocket on one port); json+ws; line;
    /// pomelo-rpc (MQTT framing), pomelo-rpc+tcp (stream-pkg). TLS forms: mqtts, mqtts+mqant,
    /// wss, wss+mqant, pomelo+tls, json+wss, line+tls, pomelo-rpc+tls, pomelo-rpc+tcp+tls, with
    /// ?tls_cert=FILE&tls_key=FILE. Any other setting of the scheme's protocol is a query
    /// parameter (mqtt://127.0.0.1:1883?max_packet=4096&rpc_expired_s=5); lists are comma-separated
    /// (allow=10.0.0.0/8,192.0.2.7), maps NAME:VALUE pairs (service_map=service:Echo,chat:Chat).
    #[arg(long, value_name = "URL")]
    pub listen: Vec<String>,
    /// Serve the web page on this address instead of the configured one.
    #[arg(long, value_name = "ADDR")]
    pub http: Option<String>,
    /// Do not serve the web page.
    #[arg(long)]
    pub no_http: bool,
    /// Without --config: do not open the built-in config's listeners.
    #[arg(long)]
    pub no_demo_listeners: bool,
    /// Without --config: run none of the built-in config's modules (a gate for module nodes,
    /// or a node running only the modules given with --module).
    #[arg(long)]
    pub no_demo_modules: bool,
    /// Also run a module of this type (repeatable); TYPE=PATH runs the plugin at PATH (a .lua
    /// or .py file) as module type TYPE, with the keys of a `[[module]]` as a query
    /// (Greeter=greeter.lua?login_handlers=HD_Hello&msg_type=json).
    #[arg(long, value_name = "TYPE[=PATH]")]
    pub module: Vec<String>,
    /// Node id (default: the config's, or `<host>-<pid>` when the bus is not local).
    #[arg(long)]
    pub node_id: Option<String>,
    /// Process group of this node, mqant's `-pid`: the modules whose `process_id` (a
    /// server.conf's `ProcessID`) names it run here, the others are peers' (overrides `[node]
    /// process_id`, default `development`).
    #[arg(long, value_name = "ID")]
    pub process_id: Option<String>,
    /// The bus between nodes: local, nats://HOST:4222, redis://HOST:6379/0 or
    /// amqp://USER:PASS@HOST:5672/%2f (overrides `[bus] url`).
    #[arg(long, value_name = "URL")]
    pub bus: Option<String>,
    /// Where nodes find each other: memory, nats://…, redis://… or etcd://… (overrides
    /// `[registry] url`; default: the bus's URL for NATS and Redis).
    #[arg(long, value_name = "URL")]
    pub registry: Option<String>,
    /// Runtime worker threads; 0 means one per CPU (overrides `[node] threads`).
    #[arg(long, value_name = "N")]
    pub threads: Option<usize>,
    /// Log lines as `text` or `json`, one object per line (overrides `[log] format`).
    #[arg(long, value_name = "FORMAT", value_parser = crate::logging::parse_format)]
    pub log_format: Option<warren::config::LogFormat>,
}

/// How `--module` names a plugin, in its help.
const PLUGIN_MODULE_HELP: &str = "TYPE=PATH runs the plugin at PATH (.lua or .py) as module type \
     TYPE, with a [[module]]'s keys as a query: Greeter=greeter.lua?login_handlers=HD_Hello";

/// Parse `args` for `app` and run the command.
pub(crate) fn main<I, T>(app: &App, args: I) -> ExitCode
where
    I: IntoIterator<Item = T>,
    T: Into<OsString> + Clone,
{
    let matches = command(app).get_matches_from(args);
    let cli = match Cli::from_arg_matches(&matches) {
        Ok(cli) => cli,
        Err(e) => e.exit(),
    };
    match cli.command {
        Command::Bench(args) => warren_bench::main(args),
        Command::Passwd(args) => passwd::main(app.name, args),
        Command::Ctl(args) => ctl::main(args),
        Command::Config(ConfigCommand::Convert { file }) => match load::convert(app, &file) {
            Ok(text) => {
                print!("{text}");
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("{e:#}");
                ExitCode::FAILURE
            }
        },
        Command::PrintDefaultConfig => match load::default_config_text(app) {
            Ok(text) => {
                print!("{text}");
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("error: {e:#}");
                ExitCode::FAILURE
            }
        },
        Command::CheckConfig { file, process_id } => {
            match load::load_config_as(app, &file, load::Checks::All, process_id.as_deref()) {
                Ok(_) => {
                    println!("ok: {}", file.display());
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("{e:#}");
                    ExitCode::FAILURE
                }
            }
        }
        Command::Serve(args) => serve::run(app, Role::Serve, args),
        Command::Node(args) => serve::run(app, Role::Node, args),
    }
}

/// The clap command with the app's name, version and description, and help texts naming the
/// app's module types and built-in config.
fn command(app: &App) -> clap::Command {
    let about = app
        .about
        .map(str::to_owned)
        .unwrap_or_else(|| format!("{}: a warren server", app.name));
    let types = app.kinds().join(", ");
    let module_help = if types.is_empty() {
        format!(
            "Also run a module of this type (repeatable); this binary has no module types of its own. {PLUGIN_MODULE_HELP}"
        )
    } else {
        format!("Also run a module of this type (repeatable): {types}. {PLUGIN_MODULE_HELP}")
    };
    let serving = describe(app, Role::Serve);
    let node_runs = describe(app, Role::Node);
    let serve_about = format!(
        "Run a node: gate listeners, modules{}. Without --config: {serving}.",
        if app.web_page.is_some() {
            ", and the web page"
        } else {
            ""
        }
    );
    let node_about = format!(
        "Run a node of modules without a gate of its own: without --config, {node_runs}, no \
         listeners{}. Point it with --bus at the broker the gate uses. With --config, the file's \
         modules and listeners{}.",
        if app.web_page.is_some() {
            " and no web page"
        } else {
            ""
        },
        if app.web_page.is_some() {
            "; the web page only when the file has an [http] section or --http is given"
        } else {
            ""
        }
    );
    let listeners = listener_urls(&app.builtin_config(Role::Serve));
    let no_listeners = if listeners.is_empty() {
        "Without --config: do not open the built-in config's listeners (it has none)".to_owned()
    } else {
        format!(
            "Without --config: do not open the built-in config's listeners ({})",
            listeners.join(", ")
        )
    };
    let tune = |c: clap::Command, about: String| {
        let short = about.split(". ").next().unwrap_or_default().to_owned();
        c.about(short)
            .long_about(about)
            .mut_arg("module", |a| a.help(module_help.clone()))
            .mut_arg("no_demo_listeners", |a| a.help(no_listeners.clone()))
    };
    Cli::command()
        .name(app.name)
        .version(app.version)
        .about(about)
        .mut_subcommand("serve", |c| tune(c, serve_about))
        .mut_subcommand("node", |c| tune(c, node_about))
        .mut_subcommand("passwd", |c| {
            let about = format!(
                "Add, change (-b for batch) or delete (-D) a user of an `[auth] password_file`, \
                 as mosquitto_passwd does: `{} passwd FILE USER`.",
                app.name
            );
            c.about(about.clone()).long_about(about)
        })
}

/// What a node of `role` runs without `--config`, in words: its listeners, modules and page.
fn describe(app: &App, role: Role) -> String {
    let config = app.builtin_config(role);
    let mut parts = Vec::new();
    let listeners = listener_urls(&config);
    if role == Role::Serve && !listeners.is_empty() {
        parts.push(format!("listeners {}", listeners.join(", ")));
    }
    let kinds: Vec<&str> = config.modules.iter().map(|m| m.kind.as_str()).collect();
    parts.push(match kinds.len() {
        0 => "no modules".to_owned(),
        1 => format!("the module {}", kinds[0]),
        _ => format!("the modules {}", kinds.join(", ")),
    });
    if role == Role::Serve && app.web_page.is_some() && config.http.enabled {
        parts.push(format!("the web page on http://{}/", config.http.addr));
    }
    if role == Role::Serve && listeners.is_empty() {
        parts.push("no listeners (add them with --listen)".to_owned());
    }
    parts.join("; ")
}

/// The listeners of `config` as URLs (`mqtt+mqant://127.0.0.1:3563`).
fn listener_urls(config: &warren::config::Config) -> Vec<String> {
    config
        .listeners
        .iter()
        .map(|l| format!("{}://{}", l.scheme(), l.addr))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_command_line_is_well_formed() {
        command(
            &App::new("t").module("A", |_: &warren::config::ModuleConfig| {
                Ok::<_, String>(warren::Module::builder("A", ()).build())
            }),
        )
        .debug_assert();
    }

    #[test]
    fn module_help_names_the_registered_types() {
        let app = App::new("t").modules(&["Alpha", "Beta"], |m: &warren::config::ModuleConfig| {
            Ok::<_, String>(warren::Module::builder(&m.kind, ()).build())
        });
        let mut c = command(&app);
        let serve = c.find_subcommand_mut("serve").expect("serve");
        let help = serve.render_long_help().to_string();
        assert!(help.contains("Alpha, Beta"), "{help}");
        assert!(help.contains("the modules Alpha, Beta"), "{help}");
    }
}

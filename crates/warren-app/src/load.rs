//! Reading, checking and resolving the config a command runs: the file (TOML or mqant's JSON) or
//! the app's built-in one, then the command line's overrides, checked against the app's module
//! types.

use std::path::Path;

use anyhow::Context as _;
use warren::config::{Config, ConfigError, ListenerConfig, ModuleConfig};

use crate::cli::ServeArgs;
use crate::{App, Role, plugin_host};

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
pub(crate) struct Loaded {
    /// The file's config.
    pub config: Config,
    /// The file has an `[http]` section: a `node` serves the web page only then.
    pub has_http: bool,
}

/// A config file's text, or why it cannot be read, in words.
fn read_text(file: &Path) -> anyhow::Result<String> {
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

/// How far [`load_config`] checks a file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Checks {
    /// The config and what the node reads at start, plugins included: each plugin is loaded
    /// once and dropped (`check-config`).
    All,
    /// The same without loading the plugins, which the node is about to load itself (`serve`
    /// and `node`: their errors stop it then).
    ButPlugins,
}

/// [`load_config_as`] for the file's own process group (the tests' shorthand).
#[cfg(test)]
pub(crate) fn load_config(app: &App, file: &Path, checks: Checks) -> anyhow::Result<Loaded> {
    load_config_as(app, file, checks, None)
}

/// Read, parse and validate a config file, including each module's own settings and the files
/// the node reads at start; every mistake is reported, each at its line and column. Relative
/// file paths are taken from the file's directory ([`Config::resolve_paths`]), before the
/// checks read them; a SIGHUP reads the file again through here, from the same directory.
/// Entries are checked as a node of process
/// group `process_id` (`--process-id`; `None`: the file's, else `development`) runs them: a
/// peer's entry needs no implementation here. An mqant `server.conf` is converted for that
/// group, and its module types this binary has no implementation of are made remote-only, with
/// a warning each.
pub(crate) fn load_config_as(
    app: &App,
    file: &Path,
    checks: Checks,
    process_id: Option<&str>,
) -> anyhow::Result<Loaded> {
    let text = read_text(file)?;
    // empty for a file in the working directory: its paths stay as written
    let base = file.parent().unwrap_or(Path::new(""));
    let start_checks = |c: &Config| {
        let mut c = c.clone();
        c.resolve_paths(base);
        let mut errors = start_checks(app, &c);
        if checks == Checks::All {
            errors.extend(plugin_host::check(&c));
        }
        errors
    };
    let name = file.display();
    let at = |e: &ConfigError| match e.to_string() {
        // errors without a line get a space after the file name: `file: key: why`
        s if s.starts_with(|c: char| c.is_ascii_digit()) => format!("{name}:{s}"),
        s => format!("{name}: {s}"),
    };
    let report = |errors: Vec<ConfigError>| FileErrors(errors.iter().map(at).collect());
    let kinds = app.kinds();
    if warren::mqant_conf::is_mqant_json(&text) {
        let group = process_id.unwrap_or(warren::config::DEFAULT_PROCESS_ID);
        let (mut config, mut warnings) = warren::mqant_conf::from_mqant_json_as(&text, group)
            .map_err(|e| anyhow::anyhow!(at(&e)))?;
        warnings.extend(warren::mqant_conf::remote_unimplemented(
            &mut config,
            &kinds,
        ));
        for w in warnings {
            eprintln!("{name}: warning: {w}");
        }
        let mut errors = config.problems(&kinds);
        errors.extend(start_checks(&config));
        if !errors.is_empty() {
            return Err(report(errors).into());
        }
        config.resolve_paths(base);
        return Ok(Loaded {
            config,
            has_http: false,
        });
    }
    let mut config = match process_id {
        // the group decides which entries need an implementation here: set it before checking
        Some(p) => {
            let mut c = Config::from_toml(&text).map_err(|e| report(vec![e]))?;
            c.node.process_id = p.to_owned();
            let mut errors = c.problems(&kinds);
            errors.extend(start_checks(&c));
            if !errors.is_empty() {
                let errors = errors.into_iter().map(|e| e.located_in(&text)).collect();
                return Err(report(errors).into());
            }
            c
        }
        None => Config::load_all_with(&text, &kinds, start_checks).map_err(report)?,
    };
    config.resolve_paths(base);
    let has_http = toml::from_str::<toml::Table>(&text).is_ok_and(|t| t.contains_key("http"));
    Ok(Loaded { config, has_http })
}

/// What the node checks as it starts, beyond the config's own rules: each module's settings (as
/// its factory reads them) and the ACL file.
fn start_checks(app: &App, config: &Config) -> Vec<ConfigError> {
    let mut errors = no_types(app, config);
    for (i, m) in config.modules.iter().enumerate() {
        if m.plugin.is_some() || app.factory(&m.kind).is_none() {
            continue; // a plugin is checked on its own; an unknown type is the config's error
        }
        if let Err(why) = app.build_module(m) {
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

/// An app with no module types at all: every `[[module]]` but a plugin is unknown (the
/// config's own check takes an empty list of known types as "any").
fn no_types(app: &App, config: &Config) -> Vec<ConfigError> {
    if !app.modules.is_empty() {
        return Vec::new();
    }
    config
        .modules
        .iter()
        .enumerate()
        .filter(|(_, m)| m.plugin.is_none())
        .map(|(i, m)| {
            ConfigError::invalid(
                format!("module[{i}].type"),
                format!(
                    "unknown module type {:?} (this binary has no module types)",
                    m.kind
                ),
            )
        })
        .collect()
}

/// `config convert`: mqant JSON in, warren TOML out.
pub(crate) fn convert(app: &App, file: &Path) -> anyhow::Result<String> {
    let text = read_text(file)?;
    let (mut config, mut warnings) = warren::mqant_conf::from_mqant_json(&text)
        .map_err(|e| anyhow::anyhow!("{}:{e}", file.display()))?;
    warnings.extend(warren::mqant_conf::remote_unimplemented(
        &mut config,
        &app.kinds(),
    ));
    let mut out = format!(
        "# converted from {} (mqant server.conf) by `{} config convert`\n",
        file.display(),
        app.name
    );
    for w in warnings {
        out.push_str(&format!("# warning: {w}\n"));
    }
    out.push('\n');
    out.push_str(&toml::to_string(&config).context("cannot write TOML")?);
    Ok(out)
}

/// What `print-default-config` prints: the app's text, or its built-in config as TOML.
pub(crate) fn default_config_text(app: &App) -> anyhow::Result<String> {
    if let Some(text) = app.default_config_text {
        return Ok(text.to_owned());
    }
    let config = app.builtin_config(Role::Serve);
    let mut out = format!(
        "# {} {}: the config `serve` runs without --config, every key with its value.\n\
         # Module types: {}.\n\n",
        app.name,
        app.version,
        app.kinds().join(", ")
    );
    out.push_str(&toml::to_string(&config).context("cannot write TOML")?);
    Ok(out)
}

/// The config this process runs: the file (or the app's built-in one), then the command line's
/// overrides, validated. Read before the runtime starts, since `[node] threads` sizes it.
pub(crate) fn resolve_config(app: &App, role: Role, args: &ServeArgs) -> anyhow::Result<Config> {
    let mut config = match &args.config {
        Some(file) => {
            let Loaded {
                mut config,
                has_http,
            } = load_config_as(app, file, Checks::ButPlugins, args.process_id.as_deref())?;
            // a module node serves no page unless its file asks for one: the page's default
            // address is the gate's
            if role == Role::Node && !has_http {
                config.http.enabled = false;
            }
            config
        }
        None => {
            let mut c = app.builtin_config(role);
            if args.no_demo_listeners || role == Role::Node {
                c.listeners.clear();
            }
            if role == Role::Node {
                c.http.enabled = false;
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
        match m.split_once('=') {
            // a plugin module: the command line's file replaces a file's for the same type
            Some((kind, spec)) => {
                let entry =
                    ModuleConfig::from_arg(kind, spec).map_err(|e| anyhow::anyhow!("{e}"))?;
                match config.modules.iter_mut().find(|x| x.kind == kind) {
                    Some(x) => *x = entry,
                    None => config.modules.push(entry),
                }
            }
            None => {
                if !config.modules.iter().any(|x| &x.kind == m) {
                    config.modules.push(ModuleConfig::new(m));
                }
            }
        }
    }
    if let Some(addr) = &args.http {
        if app.web_page.is_none() {
            anyhow::bail!("--http: {} serves no web page", app.name);
        }
        config.http.addr = addr.clone();
        config.http.enabled = true;
    }
    if args.no_http || app.web_page.is_none() {
        config.http.enabled = false;
    }
    if let Some(id) = &args.node_id {
        config.node.id = id.clone();
    }
    if let Some(n) = args.threads {
        config.node.threads = n;
    }
    if let Some(p) = &args.process_id {
        config.node.process_id = p.clone();
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
    if let Some(e) = no_types(app, &config).into_iter().next() {
        anyhow::bail!("{e}");
    }
    config
        .validate(&app.kinds())
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    Ok(config)
}

/// This host's name, for default node ids.
fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .map(|h| h.trim().to_owned())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "warren".into())
}

#[cfg(test)]
mod tests {
    use super::*;
    use warren::Module;

    fn greeter(_: &ModuleConfig) -> Result<Module, String> {
        Ok(Module::builder("Greeter", ()).build())
    }

    fn picky(entry: &ModuleConfig) -> Result<Module, String> {
        match entry.settings.get("colour").and_then(|v| v.as_str()) {
            Some("red") => Ok(Module::builder("Picky", ()).build()),
            other => Err(format!("colour must be \"red\", got {other:?}")),
        }
    }

    fn args(extra: &[&str]) -> ServeArgs {
        use clap::{Args as _, FromArgMatches as _};
        let cmd = ServeArgs::augment_args(clap::Command::new("t"));
        let m = cmd
            .try_get_matches_from(std::iter::once("t").chain(extra.iter().copied()))
            .expect("arguments parse");
        ServeArgs::from_arg_matches(&m).expect("arguments parse")
    }

    fn file(text: &str) -> tempfile_path::Path {
        tempfile_path::Path::new(text)
    }

    /// A file under the temporary directory, removed when dropped.
    mod tempfile_path {
        pub struct Path(pub std::path::PathBuf);
        impl Path {
            pub fn new(text: &str) -> Path {
                use std::sync::atomic::{AtomicU32, Ordering};
                static N: AtomicU32 = AtomicU32::new(0);
                let p = std::env::temp_dir().join(format!(
                    "warren-app-test-{}-{}.toml",
                    std::process::id(),
                    N.fetch_add(1, Ordering::Relaxed)
                ));
                std::fs::write(&p, text).expect("write the test config");
                Path(p)
            }
        }
        impl Drop for Path {
            fn drop(&mut self) {
                let _ = std::fs::remove_file(&self.0);
            }
        }
    }

    #[test]
    fn without_a_config_every_registered_type_runs_once_and_no_page() {
        let app = App::new("t").module("Greeter", greeter);
        let c = resolve_config(&app, Role::Serve, &args(&[])).expect("resolves");
        let kinds: Vec<&str> = c.modules.iter().map(|m| m.kind.as_str()).collect();
        assert_eq!(kinds, ["Greeter"]);
        assert!(c.listeners.is_empty());
        assert!(!c.http.enabled, "an app without a web page serves no HTTP");
    }

    #[test]
    fn http_is_refused_without_a_web_page() {
        let app = App::new("game").module("Greeter", greeter);
        let e = resolve_config(&app, Role::Serve, &args(&["--http", "127.0.0.1:1"]))
            .expect_err("refused");
        assert_eq!(e.to_string(), "--http: game serves no web page");
    }

    #[test]
    fn an_unknown_module_type_names_the_registered_ones() {
        let app = App::new("t").module("Greeter", greeter);
        let e =
            resolve_config(&app, Role::Serve, &args(&["--module", "Xyzzy"])).expect_err("refused");
        assert!(e.to_string().contains("Xyzzy"), "{e}");
        assert!(e.to_string().contains("this binary has: Greeter"), "{e}");
        let f = file("[[module]]\ntype = \"Xyzzy\"\n");
        let e = load_config(&app, &f.0, Checks::All)
            .err()
            .expect("refused")
            .to_string();
        assert!(e.contains(":2:"), "at the line of the type: {e}");
        assert!(e.contains("this binary has: Greeter"), "{e}");
    }

    #[test]
    fn an_app_without_module_types_refuses_every_module() {
        let app = App::new("t");
        let e =
            resolve_config(&app, Role::Serve, &args(&["--module", "Echo"])).expect_err("refused");
        assert!(e.to_string().contains("no module types"), "{e}");
    }

    #[test]
    fn check_config_reports_a_factory_error_at_its_entry() {
        let app = App::new("t").module("Picky", picky);
        let ok = file("[[module]]\ntype = \"Picky\"\n[module.settings]\ncolour = \"red\"\n");
        assert!(load_config(&app, &ok.0, Checks::All).is_ok());
        let bad = file("[[module]]\ntype = \"Picky\"\n[module.settings]\ncolour = \"blue\"\n");
        let e = load_config(&app, &bad.0, Checks::All)
            .err()
            .expect("refused")
            .to_string();
        assert!(e.contains("module[0]"), "{e}");
        assert!(e.contains("colour must be"), "{e}");
    }

    #[test]
    fn a_node_of_the_default_config_has_no_listeners_and_no_page() {
        let app = App::new("t")
            .module("Greeter", greeter)
            .default_config(|_| Config {
                listeners: vec![
                    ListenerConfig::from_url("mqtt://127.0.0.1:1").expect("a listener URL"),
                ],
                modules: vec![ModuleConfig::new("Greeter")],
                ..Config::default()
            })
            .web_page(|_| axum::Router::new());
        let serve = resolve_config(&app, Role::Serve, &args(&[])).expect("resolves");
        assert_eq!(serve.listeners.len(), 1);
        assert!(serve.http.enabled);
        let node = resolve_config(&app, Role::Node, &args(&[])).expect("resolves");
        assert!(node.listeners.is_empty());
        assert!(!node.http.enabled);
        assert_eq!(node.modules.len(), 1);
        let bare =
            resolve_config(&app, Role::Serve, &args(&["--no-demo-modules"])).expect("resolves");
        assert!(bare.modules.is_empty());
    }

    #[test]
    fn plugin_paths_are_relative_to_the_config_file_and_checked_by_loading_them() {
        let dir = std::env::temp_dir().join(format!("warren-app-plugins-{}", std::process::id()));
        let plugins = dir.join("plugins");
        std::fs::create_dir_all(&plugins).expect("a temporary directory");
        std::fs::write(
            plugins.join("greeter.lua"),
            "function HD_Hello(session, msg) return 'hello ' .. msg end\n",
        )
        .expect("write");
        std::fs::write(
            plugins.join("echo.lua"),
            "function handle_msg(id, msg) channel.send(id, msg) end\n",
        )
        .expect("write");
        std::fs::write(
            plugins.join("broken.lua"),
            "function handle_msg(id, msg)\n  x = \nend\n",
        )
        .expect("write");
        let config = dir.join("warren.toml");
        let write = |text: &str| std::fs::write(&config, text).expect("write the config");
        // an app without module types runs plugin modules all the same
        let app = App::new("t");

        write(
            "[[listener]]\nprotocol = \"line\"\naddr = \"127.0.0.1:0\"\nplugin = \"plugins/echo.lua\"\n\n[[module]]\ntype = \"Greeter\"\nplugin = \"plugins/greeter.lua\"\nlogin_handlers = [\"HD_Hello\"]\n",
        );
        let loaded = load_config(&app, &config, Checks::All).expect("loads");
        let line = loaded.config.listeners[0].protocol.line().expect("line");
        assert_eq!(
            line.plugin.as_deref(),
            Some(&*plugins.join("echo.lua").display().to_string())
        );
        assert_eq!(
            loaded.config.modules[0].plugin.as_deref(),
            Some(&*plugins.join("greeter.lua").display().to_string())
        );

        write(
            "[[listener]]\nprotocol = \"line\"\naddr = \"127.0.0.1:0\"\nplugin = \"plugins/broken.lua\"\n\n[[module]]\ntype = \"Greeter\"\nplugin = \"plugins/nope.lua\"\n\n[[module]]\ntype = \"Other\"\nplugin = \"plugins/greeter.txt\"\n\n[[module]]\ntype = \"Third\"\nplugin = \"plugins/greeter.lua\"\nhandlers = [\"HD_Missing\"]\n",
        );
        let e = load_config(&app, &config, Checks::All)
            .err()
            .expect("refused")
            .to_string();
        let (c, p) = (config.display(), plugins.display());
        assert_eq!(
            e.lines().collect::<Vec<_>>(),
            [
                format!(
                    "{c}:4:10: listener[0].plugin: {p}/broken.lua:3: unexpected symbol near 'end'"
                ),
                format!("{c}:8:10: module[0].plugin: {p}/nope.lua: no such file"),
                format!(
                    "{c}:12:10: module[1].plugin: {p}/greeter.txt: unknown plugin kind (the file name must end in .lua, .py, .so, .dylib or .dll)"
                ),
                format!(
                    "{c}:16:10: module[2].plugin: {p}/greeter.lua: handler \"HD_Missing\" is listed but the plugin does not define it"
                ),
            ],
        );
        // serve and node load the plugins themselves: the file's own checks only
        assert!(load_config(&app, &config, Checks::ButPlugins).is_ok());
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_files_paths_are_its_directorys_and_the_command_lines_the_working_directorys() {
        let dir = std::env::temp_dir().join(format!("warren-app-paths-{}", std::process::id()));
        let conf = dir.join("conf");
        std::fs::create_dir_all(&conf).expect("a temporary directory");
        std::fs::write(conf.join("acl"), "topic read #\n").expect("write");
        let file = conf.join("warren.toml");
        std::fs::write(
            &file,
            "[auth]\nacl_file = \"acl\"\npassword_file = \"/etc/warren/passwd\"\n\n\
             [[module]]\ntype = \"Greeter\"\nplugin = \"plugins/greeter.lua\"\n",
        )
        .expect("write the config");
        let app = App::new("t");
        let c = resolve_config(
            &app,
            Role::Serve,
            &args(&[
                "--config",
                &file.display().to_string(),
                "--listen",
                "line://127.0.0.1:0?plugin=cli.lua",
                "--module",
                "Other=cli/other.py",
            ]),
        )
        .expect("resolves: the ACL is found next to the file");
        let shown = |p: std::path::PathBuf| Some(p.display().to_string());
        assert_eq!(c.auth.acl_file, shown(conf.join("acl")));
        assert_eq!(c.auth.password_file.as_deref(), Some("/etc/warren/passwd"));
        assert_eq!(c.modules[0].plugin, shown(conf.join("plugins/greeter.lua")));
        // the command line's paths are the working directory's
        assert_eq!(
            c.listeners[0]
                .protocol
                .line()
                .and_then(|o| o.plugin.as_deref()),
            Some("cli.lua")
        );
        assert_eq!(c.modules[1].plugin.as_deref(), Some("cli/other.py"));
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_plugin_module_on_the_command_line_needs_no_registered_type() {
        let app = App::new("t");
        let c = resolve_config(
            &app,
            Role::Serve,
            &args(&["--module", "Greeter=greeter.lua?login_handlers=HD_Hello"]),
        )
        .expect("resolves");
        assert_eq!(c.modules[0].kind, "Greeter");
        assert_eq!(c.modules[0].plugin.as_deref(), Some("greeter.lua"));
        assert_eq!(c.modules[0].login_handlers, ["HD_Hello"]);
        let e = resolve_config(
            &app,
            Role::Serve,
            &args(&["--module", "Greeter=g.lua?bogus=1"]),
        )
        .expect_err("refused");
        assert!(
            e.to_string().starts_with("--module.bogus: unknown key"),
            "{e}"
        );
    }

    #[test]
    fn a_stock_mqant_server_conf_passes_and_its_process_id_picks_the_modules() {
        let stock =
            Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/e2e/data/mqantserver.conf");
        let app = App::new("t")
            .module("Login", greeter)
            .module("Chat", greeter);
        let loaded = load_config(&app, &stock, Checks::All).expect("a stock file loads");
        let c = &loaded.config;
        let here: Vec<&str> = c
            .modules
            .iter()
            .filter(|m| c.runs_here(m))
            .map(|m| m.kind.as_str())
            .collect();
        assert_eq!(here, ["Login", "Chat"]);
        assert!(c.node.remote_types.contains(&"Hitball".to_owned()));
        assert_eq!(c.listeners.len(), 2);
        // another process group runs none of them, and has no gate of its own
        let r = resolve_config(
            &app,
            Role::Serve,
            &args(&[
                "--config",
                &stock.display().to_string(),
                "--process-id",
                "other",
            ]),
        )
        .expect("resolves");
        assert_eq!(r.node.process_id, "other");
        assert!(r.listeners.is_empty());
        assert!(r.modules.iter().all(|m| !r.runs_here(m)));
    }

    #[test]
    fn the_generated_default_config_passes_the_check() {
        let app = App::new("t").module("Greeter", greeter);
        let text = default_config_text(&app).expect("prints");
        let f = file(&text);
        let loaded = load_config(&app, &f.0, Checks::All).expect("the printed default loads");
        assert_eq!(loaded.config.modules.len(), 1);
    }
}

//! The config's plugins in a running node (docs/plugins.md): each `[[module]]` with `plugin`
//! becomes a module loaded by warren-plugin, each line listener with `plugin` gets that
//! channel handler, every one is recorded in the node's [`Plugins`], and their files are
//! watched (`[plugins] watch`). `check-config` loads each plugin once to report the ones that do
//! not load, at their key in the config file and with the plugin's own file and line.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use warren::NodeBuilder;
use warren::config::{
    Config, ConfigError, LineOptions, ModuleConfig, PluginMsgType, PythonMsgType,
};
use warren_plugin::{
    ChannelPlugin, ChannelPluginOptions, ModulePlugin, ModulePluginOptions, MsgType, PluginError,
    PluginKind, PluginWatcher,
};

use crate::plugins::Plugins;

/// The options a `[[module]]` entry gives its plugin; a Lua call's time limit defaults to the
/// node's call timeout.
fn module_options(m: &ModuleConfig, config: &Config) -> ModulePluginOptions {
    let defaults = ModulePluginOptions::default();
    ModulePluginOptions {
        handlers: m.handlers.clone(),
        login_handlers: m.login_handlers.clone(),
        msg_type: match m.msg_type.unwrap_or_default() {
            PluginMsgType::Text => MsgType::Text,
            PluginMsgType::Bytes => MsgType::Bytes,
            PluginMsgType::Json => MsgType::Json,
        },
        execution: m.execution.unwrap_or_default(),
        workers: m.workers.unwrap_or(defaults.workers),
        max_instructions: m.max_instructions.unwrap_or(defaults.max_instructions),
        time_limit: m.time_limit_ms.map_or_else(
            || Duration::from_secs(config.node.call_timeout_s),
            Duration::from_millis,
        ),
        queue: defaults.queue,
    }
}

/// The options a line listener gives its plugin.
fn channel_options(o: &LineOptions) -> ChannelPluginOptions {
    ChannelPluginOptions {
        python_msg_type: match o.python_msg_type.unwrap_or_default() {
            PythonMsgType::Str => MsgType::Text,
            PythonMsgType::Bytes => MsgType::Bytes,
        },
        ..ChannelPluginOptions::default()
    }
}

/// Why a plugin file cannot be loaded before trying: it does not exist, or its suffix names no
/// kind of plugin. (Loading says the rest: a script error with its line, a host not built in.)
fn precheck(path: &Path) -> Result<(), String> {
    PluginKind::from_path(path).map_err(|e| e.to_string())?;
    match std::fs::metadata(path) {
        Ok(m) if m.is_file() => Ok(()),
        Ok(_) => Err(format!("{}: not a file", path.display())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            Err(format!("{}: no such file", path.display()))
        }
        Err(e) => Err(format!("{}: {e}", path.display())),
    }
}

/// Load the module plugin of entry `m`.
fn load_module(m: &ModuleConfig, path: &str, config: &Config) -> Result<Arc<ModulePlugin>, String> {
    let path = PathBuf::from(path);
    precheck(&path)?;
    ModulePlugin::load(&m.kind, &path, &module_options(m, config))
        .map_err(|e: PluginError| e.to_string())
}

/// Load the channel-handler plugin of a line listener.
fn load_channel(o: &LineOptions, path: &str) -> Result<Arc<ChannelPlugin>, String> {
    let path = PathBuf::from(path);
    precheck(&path)?;
    ChannelPlugin::load(&path, &channel_options(o)).map_err(|e: PluginError| e.to_string())
}

/// What `check-config` adds for plugins: every plugin of the config loaded once (and dropped),
/// each failure at its key: `module[0].plugin: greeter.lua:3: unexpected symbol near 'end'`.
pub(crate) fn check(config: &Config) -> Vec<ConfigError> {
    let mut errors = Vec::new();
    for (i, l) in config.listeners.iter().enumerate() {
        if let Some(o) = l.protocol.line()
            && let Some(path) = &o.plugin
            && let Err(why) = load_channel(o, path)
        {
            errors.push(ConfigError::invalid(format!("listener[{i}].plugin"), why));
        }
    }
    for (i, m) in config.modules.iter().enumerate() {
        if let Some(path) = &m.plugin
            && let Err(why) = load_module(m, path, config)
        {
            errors.push(ConfigError::invalid(format!("module[{i}].plugin"), why));
        }
    }
    errors
}

/// Load the plugin of module entry `m` for a node: the module to run, recorded in `plugins`.
pub(crate) fn module(
    m: &ModuleConfig,
    config: &Config,
    plugins: &Plugins,
) -> anyhow::Result<Option<warren::Module>> {
    let Some(path) = &m.plugin else {
        return Ok(None);
    };
    let plugin = load_module(m, path, config)
        .map_err(|why| anyhow::anyhow!("module {} ({}): {why}", m.kind, m.instance_id()))?;
    let module = plugin.module();
    plugins.add_module(plugin);
    Ok(Some(module))
}

/// Give every line listener of `config` that has a plugin its channel handler, recorded in
/// `plugins`.
pub(crate) fn listeners(
    config: &Config,
    mut builder: NodeBuilder,
    plugins: &Plugins,
) -> anyhow::Result<NodeBuilder> {
    for (i, l) in config.listeners.iter().enumerate() {
        if let Some(o) = l.protocol.line()
            && let Some(path) = &o.plugin
        {
            let plugin = load_channel(o, path)
                .map_err(|why| anyhow::anyhow!("listener {}: {why}", l.addr))?;
            plugins.add_listener(&l.addr, plugin.clone());
            builder = builder.listener_channel_handler(i, plugin);
        }
    }
    Ok(builder)
}

/// Watch the files of the node's plugins when `[plugins] watch` is on (and there is a plugin).
/// The node serves without it when the watch cannot be set up (logged).
pub(crate) fn watch(config: &Config, plugins: &Plugins) -> Option<PluginWatcher> {
    if !config.plugins.watch || plugins.is_empty() {
        return None;
    }
    let debounce = Duration::from_millis(config.plugins.debounce_ms);
    match PluginWatcher::start(plugins.watched(), debounce) {
        Ok(w) => Some(w),
        Err(error) => {
            tracing::error!(%error, "plugin files are not watched: reload them through the admin API or restart");
            None
        }
    }
}

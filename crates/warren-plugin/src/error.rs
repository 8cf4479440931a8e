//! Why a plugin did not load (or reload): one typed error for the three hosts, naming the file
//! and, when the script's runtime knows it, the line.

use std::fmt;
use std::path::{Path, PathBuf};

/// A plugin that could not be loaded or reloaded. The running version (if any) is kept; the
/// error names the file and, for script errors, the line, so that a log line or an admin reply
/// points at the mistake.
#[derive(Debug, thiserror::Error)]
pub enum PluginError {
    /// The file name has no suffix warren knows (`.lua`, `.py`, `.so`, `.dylib`, `.dll`).
    #[error("{}: unknown plugin kind (the file name must end in .lua, .py, .so, .dylib or .dll)", path.display())]
    UnknownKind {
        /// The file.
        path: PathBuf,
    },
    /// The plugin's kind is known but its host was not compiled in.
    #[error("{}: {kind} plugins are not built into this binary (cargo feature `{feature}`)", path.display())]
    NotBuilt {
        /// The file.
        path: PathBuf,
        /// `Lua`, `Python` or `native`.
        kind: &'static str,
        /// The cargo feature that builds the host.
        feature: &'static str,
    },
    /// The file could not be read.
    #[error("{}: {source}", path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// The script failed while it was loaded: a syntax error, or an error raised by its
    /// top-level code, its `on_init` or its `import_state`.
    #[error("{}", Located { path, line: *line, message })]
    Script {
        /// The file.
        path: PathBuf,
        /// The line the error points at, when the runtime reports one in this file.
        line: Option<u32>,
        /// What went wrong (the first line of the runtime's message).
        message: String,
    },
    /// A required entry point is missing (`handle_msg`; for native plugins the symbols of the C
    /// ABI marked required).
    #[error("{}: the plugin does not define `{name}`", path.display())]
    MissingEntry {
        /// The file.
        path: PathBuf,
        /// The missing function or symbol.
        name: &'static str,
    },
    /// A native plugin speaks another version of the C ABI.
    #[error("{}: the plugin speaks C ABI version {found}; this warren speaks version {expected} (include/warren_plugin.h)", path.display())]
    AbiVersion {
        /// The file.
        path: PathBuf,
        /// What `warren_plugin_abi_version` returned.
        found: u32,
        /// The version this host speaks.
        expected: u32,
    },
    /// A shared library could not be opened, or its `warren_plugin_init` refused to start.
    #[error("{}: {message}", path.display())]
    Native {
        /// The file.
        path: PathBuf,
        /// The loader's or the plugin's reason.
        message: String,
    },
    /// The options do not fit the plugin (for example `msg_type = "json"` for a channel handler).
    #[error("{}: {message}", path.display())]
    Options {
        /// The file.
        path: PathBuf,
        /// What does not fit.
        message: String,
    },
    /// The plugin's worker thread is gone (the process is stopping).
    #[error("{}: the plugin host has stopped", path.display())]
    Stopped {
        /// The file.
        path: PathBuf,
    },
    /// A handler patch names a handler the running version does not define.
    #[error("{}: the module has no handler {handler:?}", path.display())]
    NoHandler {
        /// The file.
        path: PathBuf,
        /// The handler asked for.
        handler: String,
    },
    /// A handler patch that does not compile, raises while it is evaluated, or defines no
    /// function; the running handler stays.
    #[error("{}: patch of {handler}{}: {message}", path.display(), line.map(|l| format!(", line {l}")).unwrap_or_default())]
    Patch {
        /// The module's file.
        path: PathBuf,
        /// The handler the patch was for.
        handler: String,
        /// The line of the patch's body the error points at, when the runtime reports one.
        line: Option<u32>,
        /// What went wrong.
        message: String,
    },
}

/// What kind of failure a [`PluginError`] is, for callers that branch on it (an admin API
/// answering 400 for a broken script and 500 for a stopped host, a watcher that retries).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum PluginErrorKind {
    /// See [`PluginError::UnknownKind`].
    UnknownKind,
    /// See [`PluginError::NotBuilt`].
    NotBuilt,
    /// See [`PluginError::Io`].
    Io,
    /// See [`PluginError::Script`].
    Script,
    /// See [`PluginError::MissingEntry`].
    MissingEntry,
    /// See [`PluginError::AbiVersion`].
    AbiVersion,
    /// See [`PluginError::Native`].
    Native,
    /// See [`PluginError::Options`].
    Options,
    /// See [`PluginError::Stopped`].
    Stopped,
    /// See [`PluginError::NoHandler`].
    NoHandler,
    /// See [`PluginError::Patch`].
    Patch,
}

impl PluginError {
    /// The kind of this error.
    pub fn kind(&self) -> PluginErrorKind {
        match self {
            PluginError::UnknownKind { .. } => PluginErrorKind::UnknownKind,
            PluginError::NotBuilt { .. } => PluginErrorKind::NotBuilt,
            PluginError::Io { .. } => PluginErrorKind::Io,
            PluginError::Script { .. } => PluginErrorKind::Script,
            PluginError::MissingEntry { .. } => PluginErrorKind::MissingEntry,
            PluginError::AbiVersion { .. } => PluginErrorKind::AbiVersion,
            PluginError::Native { .. } => PluginErrorKind::Native,
            PluginError::Options { .. } => PluginErrorKind::Options,
            PluginError::Stopped { .. } => PluginErrorKind::Stopped,
            PluginError::NoHandler { .. } => PluginErrorKind::NoHandler,
            PluginError::Patch { .. } => PluginErrorKind::Patch,
        }
    }

    /// The plugin file the error is about.
    pub fn path(&self) -> &Path {
        match self {
            PluginError::UnknownKind { path }
            | PluginError::NotBuilt { path, .. }
            | PluginError::Io { path, .. }
            | PluginError::Script { path, .. }
            | PluginError::MissingEntry { path, .. }
            | PluginError::AbiVersion { path, .. }
            | PluginError::Native { path, .. }
            | PluginError::Options { path, .. }
            | PluginError::Stopped { path }
            | PluginError::NoHandler { path, .. }
            | PluginError::Patch { path, .. } => path,
        }
    }

    /// The line the error points at, for script errors that report one: of the file, or of
    /// the body of a [`PluginError::Patch`].
    pub fn line(&self) -> Option<u32> {
        match self {
            PluginError::Script { line, .. } | PluginError::Patch { line, .. } => *line,
            _ => None,
        }
    }

    pub(crate) fn patch(
        path: &Path,
        handler: &str,
        line: Option<u32>,
        message: impl Into<String>,
    ) -> Self {
        PluginError::Patch {
            path: path.to_owned(),
            handler: handler.to_owned(),
            line,
            message: message.into(),
        }
    }

    pub(crate) fn script(path: &Path, line: Option<u32>, message: impl Into<String>) -> Self {
        PluginError::Script {
            path: path.to_owned(),
            line,
            message: message.into(),
        }
    }
}

/// `path:line: message`, the form compilers and editors understand.
struct Located<'a> {
    path: &'a Path,
    line: Option<u32>,
    message: &'a str,
}

impl fmt::Display for Located<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.line {
            Some(line) => write!(f, "{}:{line}: {}", self.path.display(), self.message),
            None => write!(f, "{}: {}", self.path.display(), self.message),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn script_errors_read_like_a_compiler_message() {
        let e = PluginError::script(Path::new("/srv/greeter.lua"), Some(3), "unexpected symbol");
        assert_eq!(e.to_string(), "/srv/greeter.lua:3: unexpected symbol");
        assert_eq!(e.kind(), PluginErrorKind::Script);
        assert_eq!(e.line(), Some(3));
        let e = PluginError::script(Path::new("x.py"), None, "boom");
        assert_eq!(e.to_string(), "x.py: boom");
    }
}

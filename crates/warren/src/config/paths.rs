//! The files a config names, and where a relative path among them is read from: the directory of
//! the config file that names it, as Prometheus reads the files its config names. A file then
//! means the same whatever the working directory: `warren check-config contrib/production.toml`
//! from the repository and `warren serve --config /etc/warren/warren.toml` from a systemd unit
//! find the same ACL. Paths given on the command line (`--config`, `--listen …?plugin=PATH`,
//! `--module TYPE=PATH`) are in no file and stay the working directory's: the loader adds them
//! after it has resolved the file's.
//!
//! The keys: each listener's `tls_cert`, `tls_key`, `tls_client_ca` and (line) `plugin`; each
//! module's `plugin`; `[auth]` `password_file`, `acl_file`, `http.ca_file` and
//! `jwt.public_key_file`; `[mqtt] store`. A module's own `settings` are read by the module and
//! taken as they are written.

use std::path::{Path, PathBuf};

use super::{Config, ProtocolOptions};

/// One value naming a file, as the config holds it.
enum FilePath<'a> {
    Text(&'a mut String),
    Path(&'a mut PathBuf),
}

impl FilePath<'_> {
    /// Join a relative, non-empty path to `base`; an empty one stays empty for the checks to
    /// refuse.
    fn resolve(self, base: &Path) {
        match self {
            FilePath::Text(p) => {
                if !p.is_empty() && Path::new(p.as_str()).is_relative() {
                    *p = base.join(p.as_str()).to_string_lossy().into_owned();
                }
            }
            FilePath::Path(p) => {
                if !p.as_os_str().is_empty() && p.is_relative() {
                    *p = base.join(&*p);
                }
            }
        }
    }

    fn shown(&self) -> String {
        match self {
            FilePath::Text(p) => (**p).clone(),
            FilePath::Path(p) => p.display().to_string(),
        }
    }
}

impl Config {
    /// Read every relative file path of this config from `base`, the directory of the file it
    /// was read from, instead of the working directory; absolute paths stay as they are. An
    /// empty `base` (a file in the working directory) changes nothing. The loader calls it on
    /// each read of a file, at start and on SIGHUP alike, before the command line's own
    /// paths are added.
    pub fn resolve_paths(&mut self, base: &Path) {
        if base.as_os_str().is_empty() {
            return;
        }
        for (_, p) in self.file_paths_mut() {
            p.resolve(base);
        }
    }

    /// Every key of this config that names a file and is set, with its dotted key
    /// (`listener[0].tls_cert`) and its value, in the file's order: the one list
    /// [`Config::resolve_paths`] walks.
    pub fn file_paths(&self) -> Vec<(String, String)> {
        self.clone()
            .file_paths_mut()
            .into_iter()
            .map(|(k, p)| (k, p.shown()))
            .collect()
    }

    fn file_paths_mut(&mut self) -> Vec<(String, FilePath<'_>)> {
        let mut out = Vec::new();
        for (i, l) in self.listeners.iter_mut().enumerate() {
            for (k, p) in [
                ("tls_cert", &mut l.tls_cert),
                ("tls_key", &mut l.tls_key),
                ("tls_client_ca", &mut l.tls_client_ca),
            ] {
                if let Some(p) = p {
                    out.push((format!("listener[{i}].{k}"), FilePath::Text(p)));
                }
            }
            if let ProtocolOptions::Line(o) = &mut l.protocol
                && let Some(p) = &mut o.plugin
            {
                out.push((format!("listener[{i}].plugin"), FilePath::Text(p)));
            }
        }
        for (i, m) in self.modules.iter_mut().enumerate() {
            if let Some(p) = &mut m.plugin {
                out.push((format!("module[{i}].plugin"), FilePath::Text(p)));
            }
        }
        let auth = &mut self.auth;
        if let Some(p) = &mut auth.password_file {
            out.push(("auth.password_file".into(), FilePath::Text(p)));
        }
        if let Some(p) = &mut auth.acl_file {
            out.push(("auth.acl_file".into(), FilePath::Text(p)));
        }
        if let Some(p) = auth.http.as_mut().and_then(|h| h.ca_file.as_mut()) {
            out.push(("auth.http.ca_file".into(), FilePath::Text(p)));
        }
        if let Some(p) = auth.jwt.as_mut().and_then(|j| j.public_key_file.as_mut()) {
            out.push(("auth.jwt.public_key_file".into(), FilePath::Text(p)));
        }
        if let Some(p) = &mut self.mqtt.store {
            out.push(("mqtt.store".into(), FilePath::Path(p)));
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every key that names a file, set to a relative path.
    const EVERY_FILE_KEY: &str = r#"
[[listener]]
protocol = "line"
addr = "127.0.0.1:0"
plugin = "plugins/echo.lua"
tls_cert = "tls/cert.pem"
tls_key = "tls/key.pem"
tls_client_ca = "tls/ca.pem"

[[module]]
type = "Greeter"
plugin = "plugins/greeter.lua"

[auth]
password_file = "passwd"
acl_file = "acl"

[auth.http]
url = "https://auth.internal/check"
ca_file = "tls/auth-ca.pem"

[auth.jwt]
algorithm = "RS256"
public_key_file = "jwt.pem"

[mqtt]
store = "data/mqtt.redb"
"#;

    fn every_file_key() -> Config {
        Config::from_toml(EVERY_FILE_KEY).expect("the test config parses")
    }

    #[test]
    fn relative_paths_are_read_from_the_config_files_directory() {
        let mut c = every_file_key();
        c.resolve_paths(Path::new("/etc/warren"));
        assert_eq!(
            c.file_paths(),
            [
                ("listener[0].tls_cert", "/etc/warren/tls/cert.pem"),
                ("listener[0].tls_key", "/etc/warren/tls/key.pem"),
                ("listener[0].tls_client_ca", "/etc/warren/tls/ca.pem"),
                ("listener[0].plugin", "/etc/warren/plugins/echo.lua"),
                ("module[0].plugin", "/etc/warren/plugins/greeter.lua"),
                ("auth.password_file", "/etc/warren/passwd"),
                ("auth.acl_file", "/etc/warren/acl"),
                ("auth.http.ca_file", "/etc/warren/tls/auth-ca.pem"),
                ("auth.jwt.public_key_file", "/etc/warren/jwt.pem"),
                ("mqtt.store", "/etc/warren/data/mqtt.redb"),
            ]
            .map(|(k, v)| (k.to_owned(), v.to_owned()))
        );
        // a relative directory (`--config contrib/production.toml`) stays relative
        let mut c = every_file_key();
        c.resolve_paths(Path::new("contrib"));
        assert_eq!(c.auth.acl_file.as_deref(), Some("contrib/acl"));
        assert_eq!(
            c.mqtt.store.as_deref(),
            Some(Path::new("contrib/data/mqtt.redb"))
        );
    }

    #[test]
    fn absolute_and_empty_paths_and_a_file_in_the_working_directory_stay_as_written() {
        let mut c = every_file_key();
        c.auth.acl_file = Some("/etc/mosquitto/acl".into());
        c.auth.password_file = Some(String::new());
        c.mqtt.store = Some(PathBuf::from("/var/lib/warren/mqtt.redb"));
        c.resolve_paths(Path::new("/srv/game"));
        assert_eq!(c.auth.acl_file.as_deref(), Some("/etc/mosquitto/acl"));
        assert_eq!(c.auth.password_file.as_deref(), Some(""));
        assert_eq!(
            c.mqtt.store.as_deref(),
            Some(Path::new("/var/lib/warren/mqtt.redb"))
        );
        assert_eq!(
            c.listeners[0].tls_key.as_deref(),
            Some("/srv/game/tls/key.pem")
        );

        let mut here = every_file_key();
        here.resolve_paths(Path::new(""));
        assert_eq!(here, every_file_key());
    }

    #[test]
    fn every_key_ending_in_file_is_resolved() {
        // a new `*_file` key added to the schema but not to file_paths_mut fails here, once
        // this test's config sets it
        let mut c = every_file_key();
        c.resolve_paths(Path::new("/base"));
        let mut unresolved = Vec::new();
        walk(
            &serde_json::to_value(&c).expect("serializes"),
            "",
            &mut |k, v| {
                let name = k.rsplit('.').next().unwrap_or(k);
                let names_a_file = name.ends_with("_file")
                    || name.starts_with("tls_")
                    || name == "plugin"
                    || name == "store";
                if names_a_file && !v.starts_with("/base/") {
                    unresolved.push(k.to_owned());
                }
            },
        );
        assert!(unresolved.is_empty(), "{unresolved:?}");
    }

    fn walk(v: &serde_json::Value, at: &str, f: &mut impl FnMut(&str, &str)) {
        match v {
            serde_json::Value::Object(m) => {
                for (k, v) in m {
                    walk(v, &format!("{at}.{k}"), f);
                }
            }
            serde_json::Value::Array(a) => {
                for (i, v) in a.iter().enumerate() {
                    walk(v, &format!("{at}[{i}]"), f);
                }
            }
            serde_json::Value::String(s) => f(at, s),
            _ => {}
        }
    }
}

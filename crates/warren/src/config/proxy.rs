//! Routes served from config alone, with no module code: `[[proxy]]` forwards a module route's
//! client requests to a `[[backend]]` group (docs/backends.md, "The gate proxy"), and
//! `[[rpc_route]]` forwards one handler's requests to a TianQinS Redis-RPC function
//! (docs/cluster.md, "Calling TianQinS functions from config").
//!
//! Plain data, checked here; the modules that serve them are built by warren-cluster
//! (`proxy.rs`, `rpc_route.rs`).

use std::collections::{BTreeMap, HashSet};

use serde::{Deserialize, Serialize};

use super::{BackendConfig, BackendKind, Problems};

/// `[[proxy]]`: a module route whose handlers are served by a backend group.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ProxyConfig {
    /// The module name clients address (`Game` serves `Game/<handler>[/msgid]`).
    pub route: String,
    /// The `[[backend]]` TCP group whose services answer (a static list or registry discovery).
    pub backend: String,
    /// Each handler clients may call, and the msgid of the frames that carry its requests to
    /// the backend.
    pub handlers: BTreeMap<String, u32>,
    /// Longest wait for a backend's answer, in seconds.
    pub timeout_s: u64,
    /// The handlers may be called before the session is bound to a uid (under `[auth]
    /// login_required`); the backend is then chosen by the session id.
    pub before_login: bool,
    /// When a session that used the proxy closes, tell its backend with a frame of this msgid
    /// (seq 0, the session's id and uid, no payload); 0: do not tell.
    pub closed_msgid: u32,
}

impl Default for ProxyConfig {
    fn default() -> Self {
        ProxyConfig {
            route: String::new(),
            backend: String::new(),
            handlers: BTreeMap::new(),
            timeout_s: 10,
            before_login: false,
            closed_msgid: 0,
        }
    }
}

/// `[[rpc_route]]`: one client-callable handler served by a TianQinS Redis-RPC function.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RpcRouteConfig {
    /// `Module/Handler`, as clients address it.
    pub route: String,
    /// The topic (list key) of the process that serves the function.
    pub topic: String,
    /// The function's name; empty: the handler's name.
    pub func: String,
    /// Longest wait for the function's callback, in seconds.
    pub timeout_s: u64,
    /// The handler may be called before the session is bound to a uid.
    pub before_login: bool,
}

impl Default for RpcRouteConfig {
    fn default() -> Self {
        RpcRouteConfig {
            route: String::new(),
            topic: String::new(),
            func: String::new(),
            timeout_s: 10,
            before_login: false,
        }
    }
}

impl RpcRouteConfig {
    /// The module and handler of `route`, when it is `Module/Handler`.
    pub fn module_handler(&self) -> Option<(&str, &str)> {
        let (m, h) = self.route.trim().split_once('/')?;
        (!m.is_empty() && !h.is_empty() && !h.contains('/')).then_some((m, h))
    }

    /// The function called: `func`, or the handler's name.
    pub fn func_name(&self) -> &str {
        match (self.func.trim(), self.module_handler()) {
            ("", Some((_, h))) => h,
            (f, _) => f,
        }
    }
}

/// Longest `timeout_s`: an hour.
const MAX_TIMEOUT_S: u64 = 3600;

fn valid_name(s: &str) -> bool {
    !s.is_empty()
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-' || c == '.')
}

/// Every `[[proxy]]` and `[[rpc_route]]` checked against the backends, the module types and
/// each other: a module name is served by one of them only.
pub(super) fn check_all(
    proxies: &[ProxyConfig],
    rpc_routes: &[RpcRouteConfig],
    backends: &[BackendConfig],
    module_types: &[&str],
    has_redis_rpc: bool,
    p: &mut Problems,
) {
    let mut proxied = HashSet::new();
    for (i, x) in proxies.iter().enumerate() {
        let key = format!("proxy[{i}]");
        let route = x.route.trim();
        if !valid_name(route) {
            p.add(
                format!("{key}.route"),
                format!(
                    "{:?} must be a module name (letters, digits, _ - .)",
                    x.route
                ),
            );
        } else if module_types.contains(&route) {
            p.add(
                format!("{key}.route"),
                format!("{route:?} is also a [[module]] type: a route has one server"),
            );
        } else if !proxied.insert(route.to_owned()) {
            p.add(
                format!("{key}.route"),
                format!("{route:?} has another [[proxy]] table"),
            );
        }
        let group = x.backend.trim().to_lowercase();
        match backends.iter().find(|b| b.group_name() == group) {
            None => p.add(
                format!("{key}.backend"),
                format!("{:?} is not the group of a [[backend]] table", x.backend),
            ),
            Some(b) if b.kind != BackendKind::Tcp => p.add(
                format!("{key}.backend"),
                format!(
                    "group {:?} is an HTTP group: a proxy forwards to a TCP group",
                    x.backend
                ),
            ),
            Some(_) => {}
        }
        if x.handlers.is_empty() {
            p.add(
                format!("{key}.handlers"),
                "must name at least one handler, e.g. { HD_Move = 101 }",
            );
        }
        for h in x.handlers.keys() {
            if !valid_name(h) {
                p.add(
                    format!("{key}.handlers"),
                    format!("{h:?} must be a handler name (letters, digits, _ - .)"),
                );
            }
        }
        if x.timeout_s == 0 || x.timeout_s > MAX_TIMEOUT_S {
            p.add(
                format!("{key}.timeout_s"),
                format!("must be 1 to {MAX_TIMEOUT_S}"),
            );
        }
    }
    let mut routes = HashSet::new();
    for (i, r) in rpc_routes.iter().enumerate() {
        let key = format!("rpc_route[{i}]");
        match r.module_handler() {
            None => p.add(
                format!("{key}.route"),
                format!("{:?} must be Module/Handler", r.route),
            ),
            Some((m, h)) => {
                if !valid_name(m) || !valid_name(h) {
                    p.add(
                        format!("{key}.route"),
                        format!("{:?}: letters, digits, _ - . in each part", r.route),
                    );
                } else if module_types.contains(&m) {
                    p.add(
                        format!("{key}.route"),
                        format!("{m:?} is also a [[module]] type: a route has one server"),
                    );
                } else if proxied.contains(m) {
                    p.add(
                        format!("{key}.route"),
                        format!("{m:?} is also a [[proxy]] route: a route has one server"),
                    );
                } else if !routes.insert((m.to_owned(), h.to_owned())) {
                    p.add(
                        format!("{key}.route"),
                        format!("{:?} has another [[rpc_route]] table", r.route),
                    );
                }
            }
        }
        if r.topic.trim().is_empty() {
            p.add(
                format!("{key}.topic"),
                "must name the topic of the process serving the function",
            );
        }
        if r.timeout_s == 0 || r.timeout_s > MAX_TIMEOUT_S {
            p.add(
                format!("{key}.timeout_s"),
                format!("must be 1 to {MAX_TIMEOUT_S}"),
            );
        }
    }
    if !rpc_routes.is_empty() && !has_redis_rpc {
        p.add(
            "rpc_route",
            "needs a [[redis_rpc]] entry: the endpoint its calls go through",
        );
    }
}

#[cfg(test)]
mod tests {
    use crate::config::Config;

    #[test]
    fn proxy_and_rpc_route_parse_and_check() {
        let c = Config::from_toml(
            r#"
            [[backend]]
            group = "game"
            services = [{ serviceid = "g1", serviceaddr = "127.0.0.1", serviceport = 7001 }]

            [[proxy]]
            route = "Game"
            backend = "Game"
            handlers = { HD_Move = 101, HD_Say = 102 }

            [[redis_rpc]]
            url = "redis://127.0.0.1:6379/0"
            topic = "warren"
            module = "Warren"

            [[rpc_route]]
            route = "Py/HD_Add"
            topic = "py"
            "#,
        )
        .expect("parses");
        assert_eq!(c.proxies[0].handlers["HD_Move"], 101);
        assert_eq!(c.proxies[0].timeout_s, 10);
        assert_eq!(c.rpc_routes[0].func_name(), "HD_Add");
        assert_eq!(c.rpc_routes[0].module_handler(), Some(("Py", "HD_Add")));
        let problems = c.problems(&[]);
        assert!(problems.is_empty(), "{problems:?}");
    }

    #[test]
    fn the_examples_of_the_docs_are_valid() {
        let block = |page: &str, heading: &str| {
            let at = page.find(heading).expect("the section");
            let start = at + page[at..].find("```toml\n").expect("a toml block") + 8;
            let len = page[start..].find("```").expect("its end");
            page[start..start + len].to_owned()
        };
        let backends = include_str!("../../../../docs/backends.md");
        let c = Config::from_toml(&block(backends, "## The gate proxy")).expect("parses");
        assert!(c.problems(&[]).is_empty(), "{:?}", c.problems(&[]));
        assert_eq!(
            c.proxies[0],
            {
                let mut d = super::ProxyConfig {
                    route: "Game".into(),
                    backend: "game".into(),
                    ..Default::default()
                };
                d.handlers.insert("HD_Move".into(), 101);
                d.handlers.insert("HD_Say".into(), 102);
                d
            },
            "the page shows the defaults"
        );
        let cluster = include_str!("../../../../docs/cluster.md");
        let c = Config::from_toml(&block(
            cluster,
            "### Calling TianQinS functions from config",
        ))
        .expect("parses");
        assert!(c.problems(&[]).is_empty(), "{:?}", c.problems(&[]));
        assert_eq!(c.rpc_routes[0].func_name(), "add");
        assert_eq!(
            c.rpc_routes[0].timeout_s,
            super::RpcRouteConfig::default().timeout_s
        );
    }

    #[test]
    fn mistakes_are_named() {
        let c = Config::from_toml(
            r#"
            [[module]]
            type = "Chat"

            [[proxy]]
            route = "Chat"
            backend = "nope"

            [[rpc_route]]
            route = "Py"
            "#,
        )
        .expect("parses");
        let text: Vec<String> = c.problems(&[]).iter().map(|e| e.to_string()).collect();
        let all = text.join("\n");
        for want in [
            "proxy[0].route",
            "proxy[0].backend",
            "proxy[0].handlers",
            "rpc_route[0].route",
            "rpc_route[0].topic",
            "needs a [[redis_rpc]] entry",
        ] {
            assert!(all.contains(want), "{want} missing from {all}");
        }
    }
}

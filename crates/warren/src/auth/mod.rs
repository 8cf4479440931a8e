//! Authentication: one check for every protocol, run before anything a client sends is routed.
//!
//! Each protocol turns what its client presented into [`Credentials`] (MQTT CONNECT's client id,
//! user name and password; pomelo's handshake `user` data; the JSON-WS login `[guid, md5]`; a
//! pomelo-rpc peer's CONNECT; a line listener's first line) and asks the node's
//! [`Authenticator`]. The answer is an [`Identity`] (the verified uid, bound to the session, and
//! the claims an ACL may use), `None` for an anonymous client the node lets in, or an
//! [`AuthRefusal`] that each protocol turns into its own refusal (CONNACK 4/5/3, pomelo handshake
//! code 500, `loginback [1]`, a refusal line) before closing.
//!
//! The authenticator is built from `[auth]` and asks its methods in this order, the first that
//! recognises the credentials deciding:
//! 1. the custom [`AuthHook`] given to `NodeBuilder::auth` (plugins implement the same trait),
//! 2. the password file (`password_file`, argon2 hashes, see [`password`]),
//! 3. JWT (`[auth.jwt]`, see [`jwt`]): a password or token shaped like a JWT,
//! 4. the HTTP callback (`[auth.http]`, see [`http`]).
//!
//! A method *abstains* when the credentials are not its kind (a user name not in the password
//! file, a password that is not a JWT, an HTTP answer `"ignore"`), and the next one is asked. When
//! every method abstains, a client that presented no credentials is let in when `anonymous`
//! allows it; a client whose credentials nobody recognised gets [`AuthRefusal::BadCredentials`].
//! With no method configured (and `anonymous` unset) everyone is let in, as the demo expects.
//!
//! The module also holds the *login rule* ([`admit_call`]): a client call from a session without
//! a bound uid may reach only handlers registered as login handlers.

#[cfg(feature = "http-auth")]
pub mod http;
pub mod jwt;
pub mod password;

use std::net::SocketAddr;
use std::sync::Arc;

use bytes::Bytes;
use futures_util::future::BoxFuture;

use crate::config::AuthConfig;
use crate::error::CallError;
use crate::router::Target;
use crate::session::{Protocol, Session};

/// What a client presented to prove who it is, in the same shape for every protocol.
#[derive(Debug, Clone)]
pub struct Credentials {
    /// Remote address.
    pub peer: SocketAddr,
    /// The protocol the client speaks.
    pub protocol: Protocol,
    /// MQTT client id, JSON-WS guid; empty where the protocol has none.
    pub client_id: String,
    /// User name, if given.
    pub username: Option<String>,
    /// Password or token bytes, if given.
    pub password: Option<Bytes>,
}

impl Credentials {
    /// Whether the client presented neither a user name nor a password (an anonymous client).
    pub fn is_empty(&self) -> bool {
        self.username.as_deref().is_none_or(str::is_empty)
            && self.password.as_deref().is_none_or(<[u8]>::is_empty)
    }

    /// The password as text (tokens and passwords are UTF-8 in every protocol warren speaks).
    pub fn password_text(&self) -> Option<&str> {
        self.password
            .as_deref()
            .and_then(|p| std::str::from_utf8(p).ok())
    }
}

/// Who a client turned out to be: the uid its session is bound to, and what its credentials say
/// it may use (JWT claims `topics` / `rooms`, an HTTP service's `acl`), for authorization.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Identity {
    /// The verified user id.
    pub uid: String,
    /// Topics the token names (JWT claim `topics`), if any.
    pub topics: Option<Vec<String>>,
    /// Rooms the token names (JWT claim `rooms`), if any.
    pub rooms: Option<Vec<String>>,
    /// The `acl` value an HTTP auth service answered with, as it sent it.
    pub acl: Option<serde_json::Value>,
}

impl Identity {
    /// An identity with just a uid.
    pub fn new(uid: impl Into<String>) -> Self {
        Identity {
            uid: uid.into(),
            ..Identity::default()
        }
    }

    /// The claims beyond the uid as one JSON object (`{"topics":[…],"rooms":[…],"acl":…}`,
    /// absent keys left out), or `None` when there are none. The gate stores it in the
    /// session's settings under `auth`, so modules can enforce it.
    pub fn claims(&self) -> Option<serde_json::Value> {
        let mut m = serde_json::Map::new();
        if let Some(t) = &self.topics {
            m.insert("topics".into(), serde_json::json!(t));
        }
        if let Some(r) = &self.rooms {
            m.insert("rooms".into(), serde_json::json!(r));
        }
        if let Some(a) = &self.acl {
            m.insert("acl".into(), a.clone());
        }
        (!m.is_empty()).then_some(serde_json::Value::Object(m))
    }
}

/// Why a client was refused. Each protocol answers with its own code (see [`Self::connack_code`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum AuthRefusal {
    /// The credentials are wrong (unknown user, wrong password, invalid or expired token).
    #[error("bad user name or password")]
    BadCredentials,
    /// The client is known but may not connect (anonymous when not allowed, a client id held by
    /// another user, a service's denial of this client).
    #[error("not authorized")]
    NotAuthorized,
    /// The check could not be made (the auth service did not answer in time, too many
    /// verifications at once); the client may retry.
    #[error("authentication unavailable")]
    Unavailable,
}

impl AuthRefusal {
    /// The MQTT 3.1.1 CONNACK return code: 4 bad user name or password, 5 not authorized,
    /// 3 server unavailable.
    pub fn connack_code(self) -> u8 {
        match self {
            AuthRefusal::BadCredentials => 4,
            AuthRefusal::NotAuthorized => 5,
            AuthRefusal::Unavailable => 3,
        }
    }

    /// The refusal kind for logs and the `warren_refusals_total` metric.
    pub fn kind(self) -> &'static str {
        match self {
            AuthRefusal::BadCredentials => "auth_bad_credentials",
            AuthRefusal::NotAuthorized => "auth_not_authorized",
            AuthRefusal::Unavailable => "auth_unavailable",
        }
    }
}

/// One method's answer: `Ok(Some(identity))` lets the client in, `Ok(None)` abstains (the
/// credentials are not this method's kind), `Err` refuses.
pub type Verdict = Result<Option<Identity>, AuthRefusal>;

/// A credential check. The password file, JWT and HTTP methods implement it, a custom check
/// given to `NodeBuilder::auth` implements it, and so does the whole [`Authenticator`], so a
/// plugin can ask the node's checks through the same trait.
pub trait AuthHook: Send + Sync + 'static {
    /// Check one client's credentials.
    fn check<'a>(&'a self, creds: &'a Credentials) -> BoxFuture<'a, Verdict>;
}

/// Why an authenticator could not be built from `[auth]` (the node does not start).
#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    /// The password file could not be read or has a bad line.
    #[error("auth.password_file {path}: {why}")]
    PasswordFile {
        /// The file.
        path: String,
        /// What is wrong.
        why: String,
    },
    /// The JWT settings are unusable (bad PEM key).
    #[error("auth.jwt: {0}")]
    Jwt(String),
    /// The HTTP callback settings are unusable.
    #[error("auth.http: {0}")]
    Http(String),
}

/// The node's credential checks, built from `[auth]` (and the custom hook, if any). Every
/// listener with `auth = true` asks it before routing anything.
pub struct Authenticator {
    methods: Vec<(&'static str, Arc<dyn AuthHook>)>,
    anonymous: bool,
    /// The builder's hook, kept for [`Authenticator::rebuild`].
    custom: Option<Arc<dyn AuthHook>>,
}

impl std::fmt::Debug for Authenticator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Authenticator")
            .field(
                "methods",
                &self.methods.iter().map(|(n, _)| *n).collect::<Vec<_>>(),
            )
            .field("anonymous", &self.anonymous)
            .finish()
    }
}

impl Authenticator {
    /// An authenticator that lets everyone in (no method, anonymous allowed).
    pub fn open() -> Self {
        Authenticator {
            methods: Vec::new(),
            anonymous: true,
            custom: None,
        }
    }

    /// Build the checks `[auth]` configures, after `custom` (the builder's hook) if given.
    /// Reads the password file and the JWT public key now, so a bad one stops the node at start.
    pub fn from_config(
        cfg: &AuthConfig,
        custom: Option<Arc<dyn AuthHook>>,
    ) -> Result<Self, AuthError> {
        let mut methods: Vec<(&'static str, Arc<dyn AuthHook>)> = Vec::new();
        if let Some(h) = &custom {
            methods.push(("custom", h.clone()));
        }
        if let Some(path) = &cfg.password_file {
            let file = password::PasswordFile::load(std::path::Path::new(path)).map_err(|why| {
                AuthError::PasswordFile {
                    path: path.clone(),
                    why,
                }
            })?;
            methods.push(("password_file", Arc::new(file)));
        }
        if let Some(j) = &cfg.jwt {
            methods.push(("jwt", Arc::new(jwt::JwtAuth::new(j)?)));
        }
        #[cfg(feature = "http-auth")]
        if let Some(h) = &cfg.http {
            methods.push(("http", Arc::new(http::HttpAuth::new(h)?)));
        }
        #[cfg(not(feature = "http-auth"))]
        if cfg.http.is_some() {
            return Err(AuthError::Http(
                "this build has no HTTP callback (warren's feature `http-auth`)".to_owned(),
            ));
        }
        let anonymous = cfg.anonymous.unwrap_or(methods.is_empty());
        Ok(Authenticator {
            methods,
            anonymous,
            custom,
        })
    }

    /// The checks a new `[auth]` configures, with the same custom hook (SIGHUP: the password
    /// file and the JWT key are read again, the HTTP cache starts empty).
    pub fn rebuild(&self, cfg: &AuthConfig) -> Result<Self, AuthError> {
        Self::from_config(cfg, self.custom.clone())
    }

    /// Whether any method is configured.
    pub fn has_method(&self) -> bool {
        !self.methods.is_empty()
    }

    /// Whether clients without credentials are let in.
    pub fn allows_anonymous(&self) -> bool {
        self.anonymous
    }

    /// Run the checks in order (see the module documentation).
    pub async fn authenticate(&self, creds: &Credentials) -> Verdict {
        for (name, m) in &self.methods {
            match m.check(creds).await {
                Ok(None) => continue,
                Ok(Some(id)) => {
                    tracing::debug!(peer = %creds.peer, method = name, uid = %id.uid, "authenticated");
                    return Ok(Some(id));
                }
                Err(e) => return Err(e),
            }
        }
        if creds.is_empty() || self.methods.is_empty() {
            // nobody to ask (no method configured), or nothing presented
            return if self.anonymous {
                Ok(None)
            } else {
                Err(AuthRefusal::NotAuthorized)
            };
        }
        Err(AuthRefusal::BadCredentials)
    }
}

impl AuthHook for Authenticator {
    fn check<'a>(&'a self, creds: &'a Credentials) -> BoxFuture<'a, Verdict> {
        Box::pin(self.authenticate(creds))
    }
}

/// The login rule and the client-visibility rule for one client call: RPC-only handlers are
/// refused (`NotClientVisible`-style errors are the caller's, see each protocol), and a session
/// without a bound uid may call only handlers registered with `ModuleBuilder::login_handler`.
pub fn admit_call(target: &Target, handler: &str, session: &Session) -> Result<(), CallError> {
    if session.uid.as_deref().is_some_and(|u| !u.is_empty()) || target.is_login_handler(handler) {
        Ok(())
    } else {
        Err(CallError::LoginRequired)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn creds(user: Option<&str>, pass: Option<&str>) -> Credentials {
        Credentials {
            peer: "127.0.0.1:1".parse().expect("addr"),
            protocol: Protocol::Mqtt,
            client_id: "c".into(),
            username: user.map(str::to_owned),
            password: pass.map(|p| Bytes::copy_from_slice(p.as_bytes())),
        }
    }

    struct Fixed(Verdict);
    impl AuthHook for Fixed {
        fn check<'a>(&'a self, _: &'a Credentials) -> BoxFuture<'a, Verdict> {
            Box::pin(std::future::ready(self.0.clone()))
        }
    }

    #[test]
    fn claims_are_an_object_of_what_is_present() {
        assert_eq!(Identity::new("a").claims(), None);
        let id = Identity {
            rooms: Some(vec!["lobby".into()]),
            acl: Some(serde_json::json!({"pub": ["x"]})),
            ..Identity::new("a")
        };
        assert_eq!(
            id.claims(),
            Some(serde_json::json!({"rooms": ["lobby"], "acl": {"pub": ["x"]}}))
        );
    }

    #[tokio::test]
    async fn no_method_lets_everyone_in() {
        let a = Authenticator::from_config(&AuthConfig::default(), None).expect("auth");
        assert_eq!(a.authenticate(&creds(None, None)).await, Ok(None));
        assert_eq!(a.authenticate(&creds(Some("u"), Some("p"))).await, Ok(None));
        let closed = AuthConfig {
            anonymous: Some(false),
            ..AuthConfig::default()
        };
        let a = Authenticator::from_config(&closed, None).expect("auth");
        assert_eq!(
            a.authenticate(&creds(None, None)).await,
            Err(AuthRefusal::NotAuthorized)
        );
    }

    #[tokio::test]
    async fn methods_are_asked_in_order_and_abstaining_ones_are_skipped() {
        let abstain: Arc<dyn AuthHook> = Arc::new(Fixed(Ok(None)));
        let a = Authenticator {
            methods: vec![
                ("a", abstain.clone()),
                ("b", Arc::new(Fixed(Ok(Some(Identity::new("bob")))))),
                ("c", Arc::new(Fixed(Err(AuthRefusal::NotAuthorized)))),
            ],
            anonymous: false,
            custom: None,
        };
        assert_eq!(
            a.authenticate(&creds(Some("x"), Some("y"))).await,
            Ok(Some(Identity::new("bob")))
        );
        let a = Authenticator {
            methods: vec![("a", abstain.clone())],
            anonymous: true,
            custom: None,
        };
        // presented credentials nobody recognises are refused, even with anonymous allowed
        assert_eq!(
            a.authenticate(&creds(Some("x"), Some("y"))).await,
            Err(AuthRefusal::BadCredentials)
        );
        // nothing presented: anonymous decides
        assert_eq!(a.authenticate(&creds(None, None)).await, Ok(None));
        let a = Authenticator {
            methods: vec![("a", abstain)],
            anonymous: false,
            custom: None,
        };
        assert_eq!(
            a.authenticate(&creds(None, None)).await,
            Err(AuthRefusal::NotAuthorized)
        );
    }
}

//! JWT tokens (`[auth.jwt]`), as centrifugo and nakama clients present them: HS256/384/512 with
//! a shared secret, RS256 or ES256 with a PEM public key. The token travels as the MQTT password,
//! the pomelo handshake's `user.token`, the JSON-WS login's second argument or a line listener's
//! first line. `exp` is required and honoured, `nbf` honoured, `iss` / `aud` checked when
//! configured, all with `leeway_s` of clock skew. The uid is `sub`; the optional claims `topics`
//! and `rooms` (lists of strings) are kept in the [`Identity`] for ACLs.
//!
//! A password that is not shaped like a JWT (three dot-separated base64url parts) is not this
//! method's: it abstains, and the next method is asked.

use futures_util::future::BoxFuture;
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde::Deserialize;

use super::{AuthError, AuthHook, AuthRefusal, Credentials, Identity, Verdict};
use crate::config::JwtConfig;

/// Longest token looked at (a longer password is not treated as a token).
pub const MAX_TOKEN_BYTES: usize = 8 * 1024;

/// Validates tokens with one key and algorithm.
pub struct JwtAuth {
    key: DecodingKey,
    validation: Validation,
}

impl std::fmt::Debug for JwtAuth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("JwtAuth")
            .field("algorithms", &self.validation.algorithms)
            .finish_non_exhaustive()
    }
}

#[derive(Deserialize)]
struct Claims {
    sub: String,
    #[serde(default)]
    topics: Option<Vec<String>>,
    #[serde(default)]
    rooms: Option<Vec<String>>,
}

/// Whether `s` looks like a compact JWS: three base64url parts separated by dots.
pub fn looks_like_jwt(s: &str) -> bool {
    s.len() <= MAX_TOKEN_BYTES
        && s.split('.').count() == 3
        && s.split('.').take(2).all(|p| !p.is_empty())
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'='))
}

impl JwtAuth {
    /// Build from `[auth.jwt]`; reads the PEM public key of RS256 / ES256.
    pub fn new(cfg: &JwtConfig) -> Result<Self, AuthError> {
        let (alg, key) = match cfg.algorithm.as_str() {
            a @ ("HS256" | "HS384" | "HS512") => {
                let secret = cfg
                    .secret
                    .as_deref()
                    .ok_or_else(|| AuthError::Jwt(format!("{a} needs a secret")))?;
                let alg = match a {
                    "HS256" => Algorithm::HS256,
                    "HS384" => Algorithm::HS384,
                    _ => Algorithm::HS512,
                };
                (alg, DecodingKey::from_secret(secret.as_bytes()))
            }
            a @ ("RS256" | "ES256") => {
                let path = cfg
                    .public_key_file
                    .as_deref()
                    .ok_or_else(|| AuthError::Jwt(format!("{a} needs public_key_file")))?;
                let pem =
                    std::fs::read(path).map_err(|e| AuthError::Jwt(format!("{path}: {e}")))?;
                let key = if a == "RS256" {
                    DecodingKey::from_rsa_pem(&pem)
                } else {
                    DecodingKey::from_ec_pem(&pem)
                }
                .map_err(|e| AuthError::Jwt(format!("{path}: not a {a} PEM public key: {e}")))?;
                let alg = if a == "RS256" {
                    Algorithm::RS256
                } else {
                    Algorithm::ES256
                };
                (alg, key)
            }
            other => return Err(AuthError::Jwt(format!("unknown algorithm {other:?}"))),
        };
        let mut validation = Validation::new(alg);
        validation.leeway = cfg.leeway_s;
        validation.validate_exp = true;
        validation.validate_nbf = true;
        validation.set_required_spec_claims(&["exp", "sub"]);
        if let Some(iss) = &cfg.issuer {
            validation.set_issuer(&[iss]);
        }
        match &cfg.audience {
            Some(aud) => validation.set_audience(&[aud]),
            None => validation.validate_aud = false,
        }
        Ok(JwtAuth { key, validation })
    }

    /// Validate one token: its identity, or why it is refused.
    pub fn validate(&self, token: &str) -> Result<Identity, AuthRefusal> {
        match jsonwebtoken::decode::<Claims>(token, &self.key, &self.validation) {
            Ok(data) if !data.claims.sub.is_empty() => Ok(Identity {
                uid: data.claims.sub,
                topics: data.claims.topics,
                rooms: data.claims.rooms,
                acl: None,
            }),
            Ok(_) => Err(AuthRefusal::BadCredentials),
            Err(e) => {
                tracing::debug!(reason = %e, "token refused");
                Err(AuthRefusal::BadCredentials)
            }
        }
    }
}

impl AuthHook for JwtAuth {
    fn check<'a>(&'a self, creds: &'a Credentials) -> BoxFuture<'a, Verdict> {
        // the token is the password; a client with no password may carry it as its user name
        let token = creds
            .password_text()
            .filter(|p| !p.is_empty())
            .or_else(|| {
                creds
                    .password
                    .as_deref()
                    .is_none_or(<[u8]>::is_empty)
                    .then_some(creds.username.as_deref())
                    .flatten()
            })
            .filter(|t| looks_like_jwt(t));
        let verdict = match token {
            None => Ok(None),
            Some(t) => self.validate(t).map(Some),
        };
        Box::pin(std::future::ready(verdict))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use jsonwebtoken::{EncodingKey, Header, encode};
    use serde_json::json;

    fn now() -> u64 {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .expect("clock")
            .as_secs()
    }

    fn cfg() -> JwtConfig {
        JwtConfig {
            secret: Some("s3cret".into()),
            leeway_s: 0,
            ..JwtConfig::default()
        }
    }

    fn token(claims: serde_json::Value, secret: &str) -> String {
        encode(
            &Header::new(Algorithm::HS256),
            &claims,
            &EncodingKey::from_secret(secret.as_bytes()),
        )
        .expect("encode")
    }

    #[test]
    fn valid_expired_wrong_key_and_claims() {
        let j = JwtAuth::new(&cfg()).expect("jwt");
        let t = token(
            json!({"sub": "ann", "exp": now() + 60, "topics": ["a/#"], "rooms": ["lobby"]}),
            "s3cret",
        );
        let id = j.validate(&t).expect("valid");
        assert_eq!(id.uid, "ann");
        assert_eq!(id.topics, Some(vec!["a/#".to_owned()]));
        assert_eq!(id.rooms, Some(vec!["lobby".to_owned()]));
        let expired = token(json!({"sub": "ann", "exp": now() - 10}), "s3cret");
        assert_eq!(j.validate(&expired), Err(AuthRefusal::BadCredentials));
        let forged = token(json!({"sub": "ann", "exp": now() + 60}), "other");
        assert_eq!(j.validate(&forged), Err(AuthRefusal::BadCredentials));
        let no_exp = token(json!({"sub": "ann"}), "s3cret");
        assert_eq!(j.validate(&no_exp), Err(AuthRefusal::BadCredentials));
        let early = token(
            json!({"sub": "ann", "exp": now() + 600, "nbf": now() + 300}),
            "s3cret",
        );
        assert_eq!(j.validate(&early), Err(AuthRefusal::BadCredentials));
    }

    #[test]
    fn issuer_and_audience_are_checked_when_set() {
        let j = JwtAuth::new(&JwtConfig {
            issuer: Some("me".into()),
            audience: Some("warren".into()),
            ..cfg()
        })
        .expect("jwt");
        let good = token(
            json!({"sub": "a", "exp": now() + 60, "iss": "me", "aud": "warren"}),
            "s3cret",
        );
        assert!(j.validate(&good).is_ok());
        let bad = token(
            json!({"sub": "a", "exp": now() + 60, "iss": "you", "aud": "warren"}),
            "s3cret",
        );
        assert!(j.validate(&bad).is_err());
    }

    #[tokio::test]
    async fn a_password_that_is_not_a_token_abstains() {
        let j = JwtAuth::new(&cfg()).expect("jwt");
        let c = |p: &str| Credentials {
            peer: "127.0.0.1:1".parse().expect("addr"),
            protocol: crate::session::Protocol::Mqtt,
            client_id: String::new(),
            username: Some("x".into()),
            password: Some(bytes::Bytes::copy_from_slice(p.as_bytes())),
        };
        assert_eq!(j.check(&c("hunter2")).await, Ok(None));
        assert_eq!(
            j.check(&c("aaa.bbb.ccc")).await,
            Err(AuthRefusal::BadCredentials)
        );
        let t = token(json!({"sub": "zed", "exp": now() + 60}), "s3cret");
        assert_eq!(
            j.check(&c(&t)).await.expect("ok").map(|i| i.uid),
            Some("zed".into())
        );
    }
}

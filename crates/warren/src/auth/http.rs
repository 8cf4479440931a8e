//! The HTTP callback (`[auth.http]`), as EMQX and centrifugo offer it: warren POSTs the
//! credentials as JSON
//!
//! ```json
//! {"protocol":"mqtt","clientid":"c1","username":"ann","password":"…","peer":"192.0.2.7:50122"}
//! ```
//!
//! and a `200` answer `{"result":"allow","uid":"ann","acl":…}` lets the client in (`uid`
//! defaults to the user name, then the client id; `acl` is kept in the [`Identity`] as sent).
//! `{"result":"ignore"}` abstains (the next method is asked); `{"result":"deny"}` refuses as bad
//! credentials. Any other status or body, a connection error or no answer within `timeout_ms`
//! refuses the client as unavailable; such a failure is counted in
//! `warren_auth_http_errors_total{reason}` (`unreachable`, `timeout`, `status`, `bad_answer`)
//! and logged at most once a second. Allow and deny answers are cached for `cache_s`, keyed by
//! a SHA-256 of the protocol, client id, user name, password and peer address (not its port),
//! so the cache holds no password.
//!
//! The URL may be `http://` or `https://`. Over HTTPS (rustls, `ring` provider, HTTP/1.1) the
//! service's certificate is checked against the system's root certificates, or, with
//! `ca_file`, against the PEM CA certificates in that file only (an internal service with a
//! private CA). The roots are read when the authenticator is built (at start and on SIGHUP), so
//! a missing or unreadable file stops the node with the key and the reason.

use parking_lot::Mutex;
use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures_util::future::BoxFuture;
use http_body_util::{BodyExt, Full, Limited};
use hyper::Request;
use hyper_rustls::{ConfigBuilderExt, HttpsConnector, HttpsConnectorBuilder};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use rustls::RootCertStore;
use rustls::pki_types::CertificateDer;
use rustls::pki_types::pem::PemObject;
use serde_json::{Value, json};

use super::{AuthError, AuthHook, AuthRefusal, Credentials, Identity, Verdict};
use crate::config::HttpAuthConfig;

/// Largest answer body read from the auth service.
pub const MAX_ANSWER_BYTES: usize = 64 * 1024;

/// Most answers kept in the cache; when it is full, expired ones are dropped and, if none was,
/// new answers are not cached until some expire.
pub const MAX_CACHED: usize = 65_536;

type Key = [u8; 32];
/// A cached answer: when it was received, and what it was.
type Cached = (Instant, Result<Identity, AuthRefusal>);

/// Asks an HTTP service.
pub struct HttpAuth {
    client: Client<HttpsConnector<HttpConnector>, Full<Bytes>>,
    uri: hyper::Uri,
    timeout: Duration,
    ttl: Duration,
    cache: Mutex<HashMap<Key, Cached>>,
    /// When a failed exchange was last logged, and how many were not logged since.
    log: Mutex<(Option<Instant>, u64)>,
}

impl std::fmt::Debug for HttpAuth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HttpAuth")
            .field("uri", &self.uri)
            .finish_non_exhaustive()
    }
}

impl HttpAuth {
    /// Build from `[auth.http]`: an `http://` or `https://` URL; for HTTPS the trusted roots
    /// (`ca_file`, or the system's) are read now.
    pub fn new(cfg: &HttpAuthConfig) -> Result<Self, AuthError> {
        let uri: hyper::Uri = cfg
            .url
            .parse()
            .map_err(|e| AuthError::Http(format!("url {:?}: {e}", cfg.url)))?;
        let https = match uri.scheme_str() {
            Some("http") => false,
            Some("https") => true,
            _ => {
                return Err(AuthError::Http(format!(
                    "url {:?}: only http:// and https:// URLs are supported",
                    cfg.url
                )));
            }
        };
        if uri.host().is_none_or(str::is_empty) {
            return Err(AuthError::Http(format!("url {:?}: no host", cfg.url)));
        }
        let tls = client_tls(cfg, https)?;
        let mut http = HttpConnector::new();
        http.set_connect_timeout(Some(Duration::from_millis(cfg.timeout_ms)));
        http.set_nodelay(true);
        // the TLS layer below needs the plain connector to accept https:// URIs too
        http.enforce_http(false);
        let connector = HttpsConnectorBuilder::new()
            .with_tls_config(tls)
            .https_or_http()
            .enable_http1()
            .wrap_connector(http);
        let client = Client::builder(TokioExecutor::new())
            .pool_idle_timeout(Duration::from_secs(30))
            .build(connector);
        Ok(HttpAuth {
            client,
            uri,
            timeout: Duration::from_millis(cfg.timeout_ms),
            ttl: Duration::from_secs(cfg.cache_s),
            cache: Mutex::new(HashMap::new()),
            log: Mutex::new((None, 0)),
        })
    }

    fn key(creds: &Credentials) -> Key {
        let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
        let proto = serde_json::to_string(&creds.protocol).unwrap_or_default();
        let peer_ip = creds.peer.ip().to_string();
        let user = creds.username.as_deref().unwrap_or_default();
        let pass = creds.password.as_deref().unwrap_or_default();
        for part in [
            proto.as_bytes(),
            creds.client_id.as_bytes(),
            user.as_bytes(),
            pass,
            peer_ip.as_bytes(),
        ] {
            ctx.update(&(part.len() as u64).to_be_bytes());
            ctx.update(part);
        }
        let mut key = [0u8; 32];
        key.copy_from_slice(ctx.finish().as_ref());
        key
    }

    fn cached(&self, key: &Key) -> Option<Result<Identity, AuthRefusal>> {
        if self.ttl.is_zero() {
            return None;
        }
        let cache = self.cache.lock();
        cache
            .get(key)
            .filter(|(at, _)| at.elapsed() < self.ttl)
            .map(|(_, r)| r.clone())
    }

    fn remember(&self, key: Key, answer: Result<Identity, AuthRefusal>) {
        if self.ttl.is_zero() {
            return;
        }
        let mut cache = self.cache.lock();
        if cache.len() >= MAX_CACHED {
            let ttl = self.ttl;
            cache.retain(|_, (at, _)| at.elapsed() < ttl);
            if cache.len() >= MAX_CACHED {
                return;
            }
        }
        cache.insert(key, (Instant::now(), answer));
    }

    /// Count a failed exchange (`warren_auth_http_errors_total{reason}`) and log it: one WARN
    /// line a second at most, as every client that connects meanwhile fails the same way; the
    /// next line says how many were left out.
    fn service_failed(&self, reason: &'static str, what: impl std::fmt::Display) {
        metrics::counter!("warren_auth_http_errors_total", "reason" => reason).increment(1);
        let mut log = self.log.lock();
        let now = Instant::now();
        if log
            .0
            .is_some_and(|at| now.duration_since(at) < Duration::from_secs(1))
        {
            log.1 += 1;
            return;
        }
        let suppressed = std::mem::take(&mut log.1);
        log.0 = Some(now);
        drop(log);
        tracing::warn!(url = %self.uri, reason, suppressed, "{what}");
    }

    /// Ask the service (no cache).
    async fn ask(&self, creds: &Credentials) -> Verdict {
        let body = json!({
            "protocol": creds.protocol,
            "clientid": creds.client_id,
            "username": creds.username.as_deref().unwrap_or_default(),
            "password": creds.password.as_deref().map(String::from_utf8_lossy).unwrap_or_default(),
            "peer": creds.peer.to_string(),
        });
        let req = Request::post(self.uri.clone())
            .header(hyper::header::CONTENT_TYPE, "application/json")
            .body(Full::new(Bytes::from(body.to_string())))
            .map_err(|_| AuthRefusal::Unavailable)?;
        let exchange = async {
            let res = self.client.request(req).await.map_err(|e| e.to_string())?;
            let status = res.status();
            let bytes = Limited::new(res.into_body(), MAX_ANSWER_BYTES)
                .collect()
                .await
                .map_err(|e| e.to_string())?
                .to_bytes();
            Ok::<_, String>((status, bytes))
        };
        let (status, bytes) = match tokio::time::timeout(self.timeout, exchange).await {
            Ok(Ok(r)) => r,
            Ok(Err(e)) => {
                self.service_failed("unreachable", format_args!("auth service unreachable: {e}"));
                return Err(AuthRefusal::Unavailable);
            }
            Err(_) => {
                let ms = self.timeout.as_millis();
                self.service_failed(
                    "timeout",
                    format_args!("auth service did not answer in {ms} ms"),
                );
                return Err(AuthRefusal::Unavailable);
            }
        };
        if status != hyper::StatusCode::OK {
            self.service_failed(
                "status",
                format_args!("auth service answered with status {status}"),
            );
            return Err(AuthRefusal::Unavailable);
        }
        let answer: Value = serde_json::from_slice(&bytes).map_err(|_| {
            self.service_failed("bad_answer", "auth service answer is not JSON");
            AuthRefusal::Unavailable
        })?;
        match answer.get("result").and_then(Value::as_str) {
            Some("allow") => {
                let uid = answer
                    .get("uid")
                    .and_then(Value::as_str)
                    .filter(|u| !u.is_empty())
                    .map(str::to_owned)
                    .or_else(|| creds.username.clone().filter(|u| !u.is_empty()))
                    .unwrap_or_else(|| creds.client_id.clone());
                if uid.is_empty() {
                    return Err(AuthRefusal::NotAuthorized);
                }
                Ok(Some(Identity {
                    uid,
                    topics: None,
                    rooms: None,
                    acl: answer.get("acl").filter(|v| !v.is_null()).cloned(),
                }))
            }
            Some("ignore") => Ok(None),
            Some("deny") => Err(AuthRefusal::BadCredentials),
            _ => {
                self.service_failed(
                    "bad_answer",
                    "auth service answer has no result allow|deny|ignore",
                );
                Err(AuthRefusal::Unavailable)
            }
        }
    }
}

/// The rustls client settings: the roots in `ca_file` when set, else the system's roots when
/// the URL is `https://` (none are needed for `http://`, so a node without a system CA store
/// still reaches a plain HTTP service).
fn client_tls(cfg: &HttpAuthConfig, https: bool) -> Result<rustls::ClientConfig, AuthError> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| AuthError::Http(format!("tls: {e}")))?;
    let builder = match (&cfg.ca_file, https) {
        (Some(path), _) => {
            let pem =
                std::fs::read(path).map_err(|e| AuthError::Http(format!("ca_file {path}: {e}")))?;
            let mut roots = RootCertStore::empty();
            for cert in CertificateDer::pem_slice_iter(&pem) {
                let cert = cert.map_err(|e| AuthError::Http(format!("ca_file {path}: {e}")))?;
                roots
                    .add(cert)
                    .map_err(|e| AuthError::Http(format!("ca_file {path}: {e}")))?;
            }
            if roots.is_empty() {
                return Err(AuthError::Http(format!(
                    "ca_file {path}: no PEM certificate in the file"
                )));
            }
            builder.with_root_certificates(roots)
        }
        (None, true) => builder.with_native_roots().map_err(|e| {
            AuthError::Http(format!(
                "url {:?}: the system's root certificates: {e} (set ca_file)",
                cfg.url
            ))
        })?,
        (None, false) => builder.with_root_certificates(RootCertStore::empty()),
    };
    Ok(builder.with_no_client_auth())
}

impl AuthHook for HttpAuth {
    fn check<'a>(&'a self, creds: &'a Credentials) -> BoxFuture<'a, Verdict> {
        Box::pin(async move {
            let key = Self::key(creds);
            if let Some(hit) = self.cached(&key) {
                metrics::counter!("warren_auth_http_cache_hits_total").increment(1);
                return hit.map(Some);
            }
            let verdict = self.ask(creds).await;
            match &verdict {
                Ok(Some(id)) => self.remember(key, Ok(id.clone())),
                Err(AuthRefusal::BadCredentials) => {
                    self.remember(key, Err(AuthRefusal::BadCredentials))
                }
                _ => {}
            }
            verdict
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// A one-route HTTP server: answers every POST with `answer(body)`; counts requests.
    async fn server(answer: fn(&Value) -> (u16, String), hang: bool) -> (String, Arc<AtomicUsize>) {
        serve(answer, hang, None).await
    }

    /// The same server, over TLS when `tls` is given (the URL is then `https://`).
    async fn serve(
        answer: fn(&Value) -> (u16, String),
        hang: bool,
        tls: Option<Arc<rustls::ServerConfig>>,
    ) -> (String, Arc<AtomicUsize>) {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = l.local_addr().expect("addr");
        let hits = Arc::new(AtomicUsize::new(0));
        let h = hits.clone();
        let scheme = if tls.is_some() { "https" } else { "http" };
        tokio::spawn(async move {
            loop {
                let Ok((s, _)) = l.accept().await else {
                    return;
                };
                let h = h.clone();
                let tls = tls.clone();
                tokio::spawn(async move {
                    match tls {
                        None => exchange(s, answer, hang, h).await,
                        Some(cfg) => {
                            let acceptor = tokio_rustls::TlsAcceptor::from(cfg);
                            if let Ok(s) = acceptor.accept(s).await {
                                exchange(s, answer, hang, h).await;
                            }
                        }
                    }
                });
            }
        });
        (format!("{scheme}://{addr}/auth"), hits)
    }

    /// Serve one connection's requests.
    async fn exchange<S>(
        mut s: S,
        answer: fn(&Value) -> (u16, String),
        hang: bool,
        h: Arc<AtomicUsize>,
    ) where
        S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
    {
        let mut buf = Vec::new();
        let mut chunk = [0u8; 4096];
        loop {
            let n = s.read(&mut chunk).await.unwrap_or(0);
            if n == 0 {
                return;
            }
            buf.extend_from_slice(&chunk[..n]);
            let text = String::from_utf8_lossy(&buf).into_owned();
            let Some((head, body)) = text.split_once("\r\n\r\n") else {
                continue;
            };
            let len = head
                .lines()
                .find_map(|l| {
                    l.to_ascii_lowercase()
                        .strip_prefix("content-length:")
                        .map(|v| v.trim().parse::<usize>().unwrap_or(0))
                })
                .unwrap_or(0);
            if body.len() < len {
                continue;
            }
            h.fetch_add(1, Ordering::SeqCst);
            if hang {
                tokio::time::sleep(Duration::from_secs(30)).await;
                return;
            }
            let v: Value = serde_json::from_str(&body[..len]).unwrap_or(Value::Null);
            let (status, out) = answer(&v);
            let resp = format!(
                "HTTP/1.1 {status} X\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{out}",
                out.len()
            );
            let _ = s.write_all(resp.as_bytes()).await;
            let _ = s.flush().await;
            buf.clear();
        }
    }

    /// A CA and a server certificate it signed for `127.0.0.1` / `localhost`: the server's
    /// rustls config and the CA's PEM.
    fn test_pki() -> (Arc<rustls::ServerConfig>, String) {
        use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair};
        let ca_key = KeyPair::generate().expect("ca key");
        let mut ca_params = CertificateParams::new(Vec::<String>::new()).expect("ca params");
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let ca = ca_params.self_signed(&ca_key).expect("ca cert");
        let issuer = Issuer::new(ca_params, ca_key);
        let key = KeyPair::generate().expect("key");
        let params = CertificateParams::new(vec!["127.0.0.1".to_string(), "localhost".into()])
            .expect("params");
        let cert = params.signed_by(&key, &issuer).expect("cert");
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let cfg = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .expect("versions")
            .with_no_client_auth()
            .with_single_cert(
                vec![cert.der().clone()],
                rustls::pki_types::PrivateKeyDer::try_from(key.serialize_der()).expect("key der"),
            )
            .expect("server config");
        (Arc::new(cfg), ca.pem())
    }

    /// A file in the temp dir holding `text`, removed when dropped.
    struct TempFile(std::path::PathBuf);

    impl TempFile {
        fn new(name: &str, text: &str) -> Self {
            let path = std::env::temp_dir()
                .join(format!("warren-http-auth-{}-{name}", std::process::id()));
            std::fs::write(&path, text).expect("write");
            TempFile(path)
        }

        fn path(&self) -> String {
            self.0.display().to_string()
        }
    }

    impl Drop for TempFile {
        fn drop(&mut self) {
            let _ = std::fs::remove_file(&self.0);
        }
    }

    fn creds(user: &str, pass: &str) -> Credentials {
        Credentials {
            peer: "127.0.0.1:5000".parse().expect("addr"),
            protocol: crate::session::Protocol::Mqtt,
            client_id: "dev1".into(),
            username: Some(user.into()),
            password: Some(Bytes::copy_from_slice(pass.as_bytes())),
        }
    }

    fn decide(v: &Value) -> (u16, String) {
        assert_eq!(v["protocol"], "mqtt");
        assert_eq!(v["clientid"], "dev1");
        assert_eq!(v["peer"], "127.0.0.1:5000");
        match (v["username"].as_str(), v["password"].as_str()) {
            (Some("ann"), Some("good")) => (
                200,
                r#"{"result":"allow","uid":"user-7","acl":{"pub":["a/#"]}}"#.into(),
            ),
            (Some("skip"), _) => (200, r#"{"result":"ignore"}"#.into()),
            (Some("boom"), _) => (500, "{}".into()),
            _ => (200, r#"{"result":"deny"}"#.into()),
        }
    }

    #[tokio::test]
    async fn allow_deny_ignore_error_and_cache() {
        let (url, hits) = server(decide, false).await;
        let h = HttpAuth::new(&HttpAuthConfig {
            url,
            timeout_ms: 2000,
            cache_s: 60,
            ca_file: None,
        })
        .expect("http");
        let id = h
            .check(&creds("ann", "good"))
            .await
            .expect("allow")
            .expect("id");
        assert_eq!(id.uid, "user-7");
        assert_eq!(id.acl, Some(json!({"pub": ["a/#"]})));
        assert_eq!(
            h.check(&creds("ann", "bad")).await,
            Err(AuthRefusal::BadCredentials)
        );
        assert_eq!(h.check(&creds("skip", "x")).await, Ok(None));
        assert_eq!(
            h.check(&creds("boom", "x")).await,
            Err(AuthRefusal::Unavailable)
        );
        let before = hits.load(Ordering::SeqCst);
        // answers are cached: the same credentials do not reach the service again
        assert!(
            h.check(&creds("ann", "good"))
                .await
                .expect("allow")
                .is_some()
        );
        assert_eq!(
            h.check(&creds("ann", "bad")).await,
            Err(AuthRefusal::BadCredentials)
        );
        assert_eq!(hits.load(Ordering::SeqCst), before);
    }

    #[tokio::test]
    async fn no_answer_in_time_refuses_as_unavailable() {
        let (url, _) = server(decide, true).await;
        let h = HttpAuth::new(&HttpAuthConfig {
            url,
            timeout_ms: 200,
            cache_s: 0,
            ca_file: None,
        })
        .expect("http");
        assert_eq!(
            h.check(&creds("ann", "good")).await,
            Err(AuthRefusal::Unavailable)
        );
    }

    #[tokio::test]
    async fn https_with_a_private_ca() {
        let (tls, ca_pem) = test_pki();
        let (url, hits) = serve(decide, false, Some(tls)).await;
        let ca = TempFile::new("ca.pem", &ca_pem);
        let h = HttpAuth::new(&HttpAuthConfig {
            url: url.clone(),
            timeout_ms: 5000,
            cache_s: 0,
            ca_file: Some(ca.path()),
        })
        .expect("https");
        let id = h
            .check(&creds("ann", "good"))
            .await
            .expect("allow")
            .expect("id");
        assert_eq!(id.uid, "user-7");
        assert_eq!(
            h.check(&creds("ann", "bad")).await,
            Err(AuthRefusal::BadCredentials)
        );
        assert_eq!(hits.load(Ordering::SeqCst), 2);

        // a certificate the trusted roots did not sign: the TLS handshake fails, nothing is
        // sent, the client is refused as unavailable
        let (_, other_ca) = test_pki();
        let other = TempFile::new("other-ca.pem", &other_ca);
        let h = HttpAuth::new(&HttpAuthConfig {
            url,
            timeout_ms: 5000,
            cache_s: 0,
            ca_file: Some(other.path()),
        })
        .expect("https");
        assert_eq!(
            h.check(&creds("ann", "good")).await,
            Err(AuthRefusal::Unavailable)
        );
        assert_eq!(hits.load(Ordering::SeqCst), 2);
    }

    #[test]
    fn bad_urls_and_ca_files_are_refused_at_start() {
        for url in ["ftp://example.invalid/auth", "https:///auth", "not a url"] {
            let e = HttpAuth::new(&HttpAuthConfig {
                url: url.into(),
                ..HttpAuthConfig::default()
            });
            assert!(e.is_err(), "{url}");
        }
        let e = HttpAuth::new(&HttpAuthConfig {
            url: "https://127.0.0.1:1/auth".into(),
            ca_file: Some("/nonexistent/ca.pem".into()),
            ..HttpAuthConfig::default()
        })
        .expect_err("missing ca_file");
        assert!(
            e.to_string()
                .starts_with("auth.http: ca_file /nonexistent/ca.pem:"),
            "{e}"
        );
        let junk = TempFile::new("junk.pem", "not a certificate\n");
        let e = HttpAuth::new(&HttpAuthConfig {
            url: "https://127.0.0.1:1/auth".into(),
            ca_file: Some(junk.path()),
            ..HttpAuthConfig::default()
        })
        .expect_err("no certificate");
        assert!(e.to_string().contains("no PEM certificate"), "{e}");
    }

    #[test]
    fn ca_file_needs_an_https_url() {
        let text = "[auth.http]\nurl = \"http://127.0.0.1:9000/auth\"\nca_file = \"ca.pem\"\n";
        let e = crate::config::Config::load(text, &[]).expect_err("ca_file with http://");
        assert!(e.to_string().contains("auth.http.ca_file"), "{e}");
    }
}

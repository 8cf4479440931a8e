//! TLS on any listener (`mqtts://`, `wss://`, `pomelo+tls://`, `json+wss://`, `line+tls://`,
//! `pomelo-rpc+tls://`…): rustls with the `ring` provider, a certificate chain and key from PEM
//! files (`tls_cert`, `tls_key`), and, with `tls_client_ca`, required client certificates.
//!
//! The files are read at start (a bad one stops the node with the key and the reason) and again
//! on SIGHUP: the new `ServerConfig` is swapped in for new handshakes, connections already
//! established keep theirs.

use std::sync::Arc;

use arc_swap::ArcSwap;
use rustls::RootCertStore;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::{ServerConfig, WebPkiClientVerifier};
use tokio_rustls::TlsAcceptor;

use crate::config::ListenerConfig;

/// A listener's TLS settings, swapped whole on reload.
pub(crate) struct TlsState {
    config: ArcSwap<ServerConfig>,
}

impl TlsState {
    /// Load the listener's files; `Ok(None)` when the listener does not serve TLS.
    pub(crate) fn load(cfg: &ListenerConfig) -> Result<Option<Self>, String> {
        if !cfg.tls() {
            return Ok(None);
        }
        Ok(Some(TlsState {
            config: ArcSwap::new(server_config(cfg)?),
        }))
    }

    /// An acceptor for one new connection, with the certificate in effect now.
    pub(crate) fn acceptor(&self) -> TlsAcceptor {
        TlsAcceptor::from(self.config.load_full())
    }

    /// Read the files again; on error the old certificate stays in use.
    pub(crate) fn reload(&self, cfg: &ListenerConfig) -> Result<(), String> {
        self.config.store(server_config(cfg)?);
        Ok(())
    }
}

fn read(key: &str, path: &str) -> Result<Vec<u8>, String> {
    std::fs::read(path).map_err(|e| format!("{key} {path}: {e}"))
}

/// Build the rustls server config from the listener's PEM files. Errors name the key, the file
/// and the reason.
pub(crate) fn server_config(cfg: &ListenerConfig) -> Result<Arc<ServerConfig>, String> {
    let (Some(cert), Some(key)) = (&cfg.tls_cert, &cfg.tls_key) else {
        return Err("tls_cert: TLS needs both tls_cert and tls_key".into());
    };
    let pem = read("tls_cert", cert)?;
    let chain = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("tls_cert {cert}: {e}"))?;
    if chain.is_empty() {
        return Err(format!("tls_cert {cert}: no PEM certificate in the file"));
    }
    let pem = read("tls_key", key)?;
    let private = PrivateKeyDer::from_pem_slice(&pem).map_err(|e| format!("tls_key {key}: {e}"))?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| format!("tls: {e}"))?;
    let builder = match &cfg.tls_client_ca {
        None => builder.with_no_client_auth(),
        Some(ca) => {
            let pem = read("tls_client_ca", ca)?;
            let mut roots = RootCertStore::empty();
            for c in CertificateDer::pem_slice_iter(&pem) {
                let c = c.map_err(|e| format!("tls_client_ca {ca}: {e}"))?;
                roots
                    .add(c)
                    .map_err(|e| format!("tls_client_ca {ca}: {e}"))?;
            }
            if roots.is_empty() {
                return Err(format!(
                    "tls_client_ca {ca}: no PEM certificate in the file"
                ));
            }
            let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
                .build()
                .map_err(|e| format!("tls_client_ca {ca}: {e}"))?;
            builder.with_client_cert_verifier(verifier)
        }
    };
    let mut config = builder
        .with_single_cert(chain, private)
        .map_err(|e| format!("tls_key {key}: does not fit tls_cert {cert}: {e}"))?;
    // WebSocket listeners speak HTTP/1.1; the others announce nothing
    if cfg.serves_websocket() {
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
    }
    Ok(Arc::new(config))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn missing_and_bad_files_name_the_key() {
        let dir = std::env::temp_dir().join(format!("warren-tls-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("temp dir");
        let junk = dir.join("junk.pem");
        std::fs::write(&junk, "not a certificate\n").expect("write");
        let junk = junk.to_string_lossy().into_owned();
        let cfg = |cert: &str, key: &str| ListenerConfig {
            tls_cert: Some(cert.into()),
            tls_key: Some(key.into()),
            ..ListenerConfig::default()
        };
        let e = server_config(&cfg("/nonexistent/cert.pem", &junk))
            .err()
            .unwrap_or_default();
        assert!(e.starts_with("tls_cert /nonexistent/cert.pem:"), "{e}");
        let e = server_config(&cfg(&junk, &junk)).err().unwrap_or_default();
        assert!(e.contains("no PEM certificate"), "{e}");
        let _ = std::fs::remove_dir_all(&dir);
    }
}

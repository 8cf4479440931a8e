//! How a benchmark client gets in: TLS for `mqtts://` and `wss://` targets, the WebSocket
//! upgrade for `ws://` and `wss://` ones, and MQTT credentials, so that the cost of a server's
//! TLS, WebSocket and authentication can be measured with the same scenarios.
//!
//! Certificates are checked against `--ca` when it is given; without it a TLS target's
//! certificate is accepted as it is (a load generator pointed at a test server, not a client
//! that needs to trust it).

use std::io;
use std::path::Path;
use std::sync::Arc;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio_rustls::TlsConnector;
use tokio_rustls::client::TlsStream;
use tokio_rustls::rustls::client::danger::{
    HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier,
};
use tokio_rustls::rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use tokio_rustls::rustls::{self, ClientConfig, DigitallySignedStruct, RootCertStore};

use crate::BenchError;
use crate::ws::WsSettings;

/// TLS, WebSocket and credentials shared by every connection of a run.
#[derive(Clone, Default)]
pub struct Login {
    /// TLS connector and the name to ask for, when the target is `mqtts://` or `wss://`.
    pub tls: Option<(TlsConnector, ServerName<'static>)>,
    /// The WebSocket upgrade and framing, when the target is `ws://` or `wss://`.
    pub ws: Option<WsSettings>,
    /// MQTT user name.
    pub username: Option<String>,
    /// MQTT password.
    pub password: Option<String>,
}

impl std::fmt::Debug for Login {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Login")
            .field("tls", &self.tls.is_some())
            .field("ws", &self.ws)
            .field("username", &self.username)
            .finish_non_exhaustive()
    }
}

impl Login {
    /// The login for `target` (`mqtts://` and `wss://` mean TLS) with optional credentials, CA
    /// file and WebSocket settings (given for `ws://` and `wss://` targets).
    pub fn new(
        target: &str,
        username: Option<String>,
        password: Option<String>,
        ca: Option<&Path>,
        ws: Option<WsSettings>,
    ) -> Result<Login, BenchError> {
        let tls = if target.starts_with("mqtts://")
            || target.starts_with("ssl://")
            || crate::ws::is_wss(target)
        {
            let host = target
                .split_once("://")
                .map_or(target, |(_, rest)| rest)
                .split(['/', '?'])
                .next()
                .unwrap_or_default()
                .rsplit_once(':')
                .map_or("localhost", |(h, _)| h)
                .trim_start_matches('[')
                .trim_end_matches(']')
                .to_owned();
            let name = ServerName::try_from(host)
                .map_err(|e| BenchError::Invalid(format!("TLS server name: {e}")))?;
            Some((TlsConnector::from(Arc::new(client_config(ca)?)), name))
        } else {
            if ca.is_some() {
                return Err(BenchError::Invalid(
                    "--ca needs an mqtts:// or wss:// target".to_owned(),
                ));
            }
            None
        };
        Ok(Login {
            tls,
            ws,
            username,
            password,
        })
    }
}

fn client_config(ca: Option<&Path>) -> Result<ClientConfig, BenchError> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| BenchError::Invalid(format!("TLS: {e}")))?;
    let config = match ca {
        Some(path) => {
            let pem = std::fs::read(path)
                .map_err(|e| BenchError::Invalid(format!("--ca {}: {e}", path.display())))?;
            let mut roots = RootCertStore::empty();
            for cert in rustls_pemfile_certs(&pem)? {
                roots
                    .add(cert)
                    .map_err(|e| BenchError::Invalid(format!("--ca {}: {e}", path.display())))?;
            }
            builder.with_root_certificates(roots).with_no_client_auth()
        }
        None => builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(AcceptAny(provider)))
            .with_no_client_auth(),
    };
    Ok(config)
}

fn rustls_pemfile_certs(pem: &[u8]) -> Result<Vec<CertificateDer<'static>>, BenchError> {
    use rustls::pki_types::pem::PemObject;
    CertificateDer::pem_slice_iter(pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| BenchError::Invalid(format!("--ca: {e}")))
}

/// Accepts the server's certificate as it is (see the module comment), still checking that the
/// handshake signatures are valid.
#[derive(Debug)]
struct AcceptAny(Arc<rustls::crypto::CryptoProvider>);

impl ServerCertVerifier for AcceptAny {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// The read side of a benchmark connection: a plain TCP half (the fast path, unchanged) or a
/// TLS stream's half.
#[derive(Debug)]
pub enum ReadIo {
    /// Plain TCP.
    Tcp(OwnedReadHalf),
    /// TLS over TCP.
    Tls(tokio::io::ReadHalf<TlsStream<TcpStream>>),
}

/// The write side of a benchmark connection.
#[derive(Debug)]
pub enum WriteIo {
    /// Plain TCP.
    Tcp(OwnedWriteHalf),
    /// TLS over TCP.
    Tls(tokio::io::WriteHalf<TlsStream<TcpStream>>),
}

/// Split a connected stream, doing the TLS handshake first when the login asks for it.
pub(crate) async fn split(stream: TcpStream, login: &Login) -> io::Result<(ReadIo, WriteIo)> {
    match &login.tls {
        None => {
            let (r, w) = stream.into_split();
            Ok((ReadIo::Tcp(r), WriteIo::Tcp(w)))
        }
        Some((connector, name)) => {
            let tls = connector.connect(name.clone(), stream).await?;
            let (r, w) = tokio::io::split(tls);
            Ok((ReadIo::Tls(r), WriteIo::Tls(w)))
        }
    }
}

impl AsyncRead for ReadIo {
    fn poll_read(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> std::task::Poll<io::Result<()>> {
        match self.get_mut() {
            ReadIo::Tcp(r) => std::pin::Pin::new(r).poll_read(cx, buf),
            ReadIo::Tls(r) => std::pin::Pin::new(r).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for WriteIo {
    fn poll_write(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<io::Result<usize>> {
        match self.get_mut() {
            WriteIo::Tcp(w) => std::pin::Pin::new(w).poll_write(cx, buf),
            WriteIo::Tls(w) => std::pin::Pin::new(w).poll_write(cx, buf),
        }
    }

    fn poll_flush(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<io::Result<()>> {
        match self.get_mut() {
            WriteIo::Tcp(w) => std::pin::Pin::new(w).poll_flush(cx),
            WriteIo::Tls(w) => std::pin::Pin::new(w).poll_flush(cx),
        }
    }

    fn poll_shutdown(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<io::Result<()>> {
        match self.get_mut() {
            WriteIo::Tcp(w) => std::pin::Pin::new(w).poll_shutdown(cx),
            WriteIo::Tls(w) => std::pin::Pin::new(w).poll_shutdown(cx),
        }
    }
}

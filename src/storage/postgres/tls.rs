//! TLS to PostgreSQL with rustls, honouring libpq's `sslmode` and `sslrootcert`.
//!
//! tokio-postgres knows `disable`, `prefer` and `require` only, and verifies nothing itself, so kubetoken takes both
//! options out of the connection string and decides here, as libpq does:
//! - `disable`: plain TCP.
//! - `prefer` (the default) and `require`: encrypted, the server's certificate not checked (libpq's meaning: these
//!   protect against eavesdropping, not against a server that impersonates another); `require` fails on a server
//!   without TLS, `prefer` falls back to plain TCP.
//! - `verify-ca`: encrypted, the certificate chain checked against `sslrootcert`, the host name not.
//! - `verify-full`: the chain and the host name both checked. The one to use across a network.
//!
//! `sslrootcert` is a PEM file of CA certificates (default `~/.postgresql/root.crt`, as libpq); with `require` it
//! makes the mode `verify-ca`, as libpq does. As with libpq, `PGSSLMODE` and `PGSSLROOTCERT` in the environment
//! apply when the connection string does not say: the way to verify a server whose URL an operator keeps in a Secret
//! (CloudNativePG's `uri`).

use std::future::Future;
use std::io;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use rustls::client::WebPkiServerVerifier;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio_postgres::config::SslMode;
use tokio_postgres::tls::{ChannelBinding, MakeTlsConnect, TlsConnect};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    Disable,
    Prefer,
    Require,
    VerifyCa,
    VerifyFull,
}

impl Mode {
    fn parse(value: &str) -> Result<Self, String> {
        Ok(match value {
            "disable" => Mode::Disable,
            "allow" | "prefer" => Mode::Prefer,
            "require" => Mode::Require,
            "verify-ca" => Mode::VerifyCa,
            "verify-full" => Mode::VerifyFull,
            other => {
                return Err(format!("sslmode={other} is not one of disable, prefer, require, verify-ca, verify-full"));
            }
        })
    }

    /// What tokio-postgres is told: whether TLS is tried, and whether it must be.
    pub fn wire(self) -> SslMode {
        match self {
            Mode::Disable => SslMode::Disable,
            Mode::Prefer => SslMode::Prefer,
            Mode::Require | Mode::VerifyCa | Mode::VerifyFull => SslMode::Require,
        }
    }
}

/// The TLS options taken out of a connection string.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsOptions {
    pub mode: Mode,
    pub root_cert: Option<PathBuf>,
}

/// Takes `sslmode` and `sslrootcert` out of `url` (a `postgres://` URL or a libpq `key=value` string): the rest, for
/// tokio-postgres, and the TLS options.
pub fn split_options(url: &str) -> Result<(String, TlsOptions), String> {
    let mut mode = None;
    let mut root_cert = None;
    let mut take = |key: &str, value: String| -> Result<bool, String> {
        match key {
            "sslmode" => mode = Some(Mode::parse(&value)?),
            "sslrootcert" => root_cert = Some(PathBuf::from(value)),
            _ => return Ok(false),
        }
        Ok(true)
    };
    let rest = if url.starts_with("postgres://") || url.starts_with("postgresql://") {
        match url.split_once('?') {
            Some((base, query)) => {
                let mut kept = Vec::new();
                for pair in query.split('&').filter(|p| !p.is_empty()) {
                    let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
                    let value = percent_decode(v)?;
                    if !take(k, value)? {
                        kept.push(pair);
                    }
                }
                if kept.is_empty() { base.to_string() } else { format!("{base}?{}", kept.join("&")) }
            }
            None => url.to_string(),
        }
    } else {
        let mut kept = Vec::new();
        for (raw, key, value) in key_values(url)? {
            if !take(&key, value)? {
                kept.push(raw);
            }
        }
        kept.join(" ")
    };
    // libpq's environment variables, for what the string does not say (a URL kept by an operator, such as
    // CloudNativePG's `uri`, cannot be edited; the pod's environment can).
    if mode.is_none()
        && let Ok(value) = std::env::var("PGSSLMODE")
    {
        mode = Some(Mode::parse(&value).map_err(|e| format!("PGSSLMODE: {e}"))?);
    }
    let root_cert = root_cert.or_else(|| std::env::var_os("PGSSLROOTCERT").map(PathBuf::from)).or_else(|| {
        let default = PathBuf::from(std::env::var_os("HOME")?).join(".postgresql/root.crt");
        default.is_file().then_some(default)
    });
    let mut mode = mode.unwrap_or(Mode::Prefer);
    if mode == Mode::Require && root_cert.is_some() {
        mode = Mode::VerifyCa;
    }
    Ok((rest, TlsOptions { mode, root_cert }))
}

/// libpq's URL decoding: `%XX` escapes only (a `+` stays a `+`).
fn percent_decode(s: &str) -> Result<String, String> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = s.get(i + 1..i + 3).and_then(|h| u8::from_str_radix(h, 16).ok());
            out.push(hex.ok_or_else(|| format!("the PostgreSQL URL: a broken escape in `{s}`"))?);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).map_err(|_| format!("the PostgreSQL URL: `{s}` is not UTF-8 once decoded"))
}

/// The `key=value` items of a libpq connection string: (the item as written, key, unquoted value).
fn key_values(s: &str) -> Result<Vec<(String, String, String)>, String> {
    let mut items = Vec::new();
    let mut chars = s.char_indices().peekable();
    loop {
        while chars.next_if(|(_, c)| c.is_whitespace()).is_some() {}
        let Some(&(start, _)) = chars.peek() else { break };
        let mut key = String::new();
        while let Some((_, c)) = chars.next_if(|(_, c)| *c != '=' && !c.is_whitespace()) {
            key.push(c);
        }
        while chars.next_if(|(_, c)| c.is_whitespace()).is_some() {}
        if chars.next().is_none_or(|(_, c)| c != '=') {
            return Err(format!("the PostgreSQL connection string: `{key}` has no value"));
        }
        while chars.next_if(|(_, c)| c.is_whitespace()).is_some() {}
        let mut value = String::new();
        if chars.next_if(|(_, c)| *c == '\'').is_some() {
            loop {
                match chars.next() {
                    Some((_, '\'')) => break,
                    Some((_, '\\')) => value.extend(chars.next().map(|(_, c)| c)),
                    Some((_, c)) => value.push(c),
                    None => return Err("the PostgreSQL connection string: an unterminated quote".into()),
                }
            }
        } else {
            while let Some((_, c)) = chars.next_if(|(_, c)| !c.is_whitespace()) {
                value.push(c);
            }
        }
        let end = chars.peek().map_or(s.len(), |(i, _)| *i);
        items.push((s[start..end].trim_end().to_string(), key, value));
    }
    Ok(items)
}

/// The connector for `options`: a rustls client configured for its mode.
pub fn connector(options: &TlsOptions) -> Result<RustlsConnect, String> {
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let verifier: Arc<dyn ServerCertVerifier> = match options.mode {
        Mode::Disable | Mode::Prefer | Mode::Require => Arc::new(Unverified(provider.clone())),
        Mode::VerifyCa | Mode::VerifyFull => {
            let path = options.root_cert.as_ref().ok_or_else(|| {
                format!(
                    "sslmode={} needs sslrootcert=PATH (a PEM file of the CA certificates that sign the server's)",
                    if options.mode == Mode::VerifyCa { "verify-ca" } else { "verify-full" }
                )
            })?;
            let pem = std::fs::read(path).map_err(|e| format!("sslrootcert {}: {e}", path.display()))?;
            let mut roots = RootCertStore::empty();
            for cert in CertificateDer::pem_slice_iter(&pem) {
                let cert = cert.map_err(|e| format!("sslrootcert {}: not PEM certificates: {e}", path.display()))?;
                roots.add(cert).map_err(|e| format!("sslrootcert {}: {e}", path.display()))?;
            }
            if roots.is_empty() {
                return Err(format!("sslrootcert {}: holds no certificate", path.display()));
            }
            let webpki = WebPkiServerVerifier::builder_with_provider(Arc::new(roots), provider.clone())
                .build()
                .map_err(|e| format!("sslrootcert {}: {e}", path.display()))?;
            if options.mode == Mode::VerifyCa { Arc::new(ChainOnly(webpki)) } else { webpki }
        }
    };
    let config = ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_no_client_auth();
    Ok(RustlsConnect(Arc::new(config)))
}

/// `prefer` and `require`: libpq checks nothing of the certificate in these modes, and neither does kubetoken; the
/// handshake's signatures are still checked, so the session is with the holder of the certificate's key.
#[derive(Debug)]
struct Unverified(Arc<rustls::crypto::CryptoProvider>);

impl ServerCertVerifier for Unverified {
    fn verify_server_cert(
        &self,
        _: &CertificateDer<'_>,
        _: &[CertificateDer<'_>],
        _: &ServerName<'_>,
        _: &[u8],
        _: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.0.signature_verification_algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.0.signature_verification_algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// `verify-ca`: the chain must lead to a trusted root; a certificate for another name is accepted.
#[derive(Debug)]
struct ChainOnly(Arc<WebPkiServerVerifier>);

impl ServerCertVerifier for ChainOnly {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        match self.0.verify_server_cert(end_entity, intermediates, server_name, ocsp, now) {
            Err(rustls::Error::InvalidCertificate(
                rustls::CertificateError::NotValidForName | rustls::CertificateError::NotValidForNameContext { .. },
            )) => Ok(ServerCertVerified::assertion()),
            other => other,
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.supported_verify_schemes()
    }
}

/// tokio-postgres' TLS hook, made of a rustls client configuration.
#[derive(Clone)]
pub struct RustlsConnect(Arc<ClientConfig>);

impl<S> MakeTlsConnect<S> for RustlsConnect
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    type Stream = RustlsStream<S>;
    type TlsConnect = RustlsConnectOne;
    type Error = std::convert::Infallible;

    /// Called for every connection, TLS or not (a Unix socket's host is empty): a name that cannot be a TLS server
    /// name fails only if a handshake is attempted.
    fn make_tls_connect(&mut self, host: &str) -> Result<RustlsConnectOne, Self::Error> {
        let name = ServerName::try_from(host.to_string())
            .map_err(|e| format!("the host `{host}` cannot be checked against a certificate: {e}"));
        Ok(RustlsConnectOne { config: self.0.clone(), name })
    }
}

/// One connection's handshake.
pub struct RustlsConnectOne {
    config: Arc<ClientConfig>,
    name: Result<ServerName<'static>, String>,
}

impl<S> TlsConnect<S> for RustlsConnectOne
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    type Stream = RustlsStream<S>;
    type Error = io::Error;
    type Future = Pin<Box<dyn Future<Output = io::Result<RustlsStream<S>>> + Send>>;

    fn connect(self, stream: S) -> Self::Future {
        let connector = tokio_rustls::TlsConnector::from(self.config);
        Box::pin(async move {
            let name = self.name.map_err(io::Error::other)?;
            connector.connect(name, stream).await.map(RustlsStream)
        })
    }
}

/// A TLS connection to the server.
pub struct RustlsStream<S>(tokio_rustls::client::TlsStream<S>);

impl<S: AsyncRead + AsyncWrite + Unpin> tokio_postgres::tls::TlsStream for RustlsStream<S> {
    /// No channel binding: SCRAM then runs without it, as with libpq's default `channel_binding=prefer` when the
    /// client offers none.
    fn channel_binding(&self) -> ChannelBinding {
        ChannelBinding::none()
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncRead for RustlsStream<S> {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_read(cx, buf)
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncWrite for RustlsStream<S> {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.0).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.0).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.0.is_write_vectored()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn url_options_are_taken_out_and_the_rest_kept() {
        let (rest, tls) =
            split_options("postgres://u@db:5432/app?sslmode=verify-full&sslrootcert=%2Fetc%2Fca.pem&connect_timeout=3")
                .expect("parsed");
        assert_eq!(rest, "postgres://u@db:5432/app?connect_timeout=3");
        assert_eq!(tls, TlsOptions { mode: Mode::VerifyFull, root_cert: Some("/etc/ca.pem".into()) });
        let (rest, tls) = split_options("postgresql://u@db/app?sslmode=disable").expect("parsed");
        assert_eq!((rest.as_str(), tls.mode), ("postgresql://u@db/app", Mode::Disable));
        // libpq decodes %XX only: a `+` in a path stays a `+`.
        let (_, tls) = split_options("postgres://db/app?sslmode=verify-ca&sslrootcert=/a+b%20c.pem").expect("parsed");
        assert_eq!(tls.root_cert, Some("/a+b c.pem".into()));
        assert!(split_options("postgres://db/app?sslrootcert=%zz").is_err(), "a broken escape is refused");
    }

    #[test]
    fn key_value_options_are_taken_out_and_quoted_values_kept_whole() {
        let (rest, tls) =
            split_options("host=db password='a b\\'c' sslmode = verify-ca sslrootcert='/ca dir/root.pem' dbname=app")
                .expect("parsed");
        assert_eq!(rest, "host=db password='a b\\'c' dbname=app");
        assert_eq!(tls, TlsOptions { mode: Mode::VerifyCa, root_cert: Some("/ca dir/root.pem".into()) });
    }

    #[test]
    fn require_with_a_root_certificate_verifies_the_chain_as_libpq_does() {
        let (_, tls) = split_options("postgres://db/app?sslmode=require&sslrootcert=/ca.pem").expect("parsed");
        assert_eq!(tls.mode, Mode::VerifyCa);
    }

    #[test]
    fn unknown_modes_and_broken_strings_are_refused_with_the_reason() {
        let e = split_options("postgres://db/app?sslmode=verify").expect_err("refused");
        assert!(e.contains("sslmode=verify is not one of"), "{e}");
        let e = split_options("host=db password='open").expect_err("refused");
        assert!(e.contains("unterminated quote"), "{e}");
        let e = split_options("host").expect_err("refused");
        assert!(e.contains("`host` has no value"), "{e}");
    }

    #[test]
    fn verification_needs_a_root_certificate_file() {
        let e = connector(&TlsOptions { mode: Mode::VerifyFull, root_cert: None }).err().expect("refused");
        assert!(e.contains("needs sslrootcert"), "{e}");
        let e = connector(&TlsOptions { mode: Mode::VerifyCa, root_cert: Some("/nonexistent/ca.pem".into()) })
            .err()
            .expect("refused");
        assert!(e.contains("/nonexistent/ca.pem"), "{e}");
    }
}

//! TLS for every port kubetoken serves: a certificate and key from PEM files, reloaded when the files change
//! (cert-manager rotates a mounted Secret by swapping a symlink), so new connections get the new certificate
//! without a restart and open connections are not cut.

use std::path::PathBuf;
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use rustls::ServerConfig;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;

/// The PEM files of a server certificate (the file may hold the chain after it) and its private key.
#[derive(Debug, Clone)]
pub struct TlsFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
}

/// How often the files are compared with what is loaded. Reading two small files a second costs nothing.
pub const RELOAD_CHECK_INTERVAL: Duration = Duration::from_secs(1);

/// The certificate the server presents, replaced when the files change to a valid new pair.
#[derive(Debug)]
pub struct ReloadingCert {
    files: TlsFiles,
    provider: Arc<CryptoProvider>,
    current: RwLock<Arc<CertifiedKey>>,
    /// The file contents last looked at (loaded or refused), so a broken pair is reported once, not every second.
    last_seen: Mutex<(Vec<u8>, Vec<u8>)>,
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::aws_lc_rs::default_provider())
}

fn read_pair(files: &TlsFiles) -> Result<(Vec<u8>, Vec<u8>), String> {
    let read = |p: &PathBuf| std::fs::read(p).map_err(|e| format!("cannot read {}: {e}", p.display()));
    Ok((read(&files.cert)?, read(&files.key)?))
}

fn parse_pair(
    files: &TlsFiles,
    cert_pem: &[u8],
    key_pem: &[u8],
    provider: &CryptoProvider,
) -> Result<CertifiedKey, String> {
    parse_pem(cert_pem, key_pem, provider).map_err(|e| match e {
        PemError::Chain(e) => format!("{}: {e}", files.cert.display()),
        PemError::Key(e) => format!("{}: {e}", files.key.display()),
        PemError::Pair(e) => {
            format!("{} and {} do not make a usable pair: {e}", files.cert.display(), files.key.display())
        }
    })
}

enum PemError {
    Chain(String),
    Key(String),
    Pair(String),
}

fn parse_pem(cert_pem: &[u8], key_pem: &[u8], provider: &CryptoProvider) -> Result<CertifiedKey, PemError> {
    let chain = CertificateDer::pem_slice_iter(cert_pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| PemError::Chain(format!("not a PEM certificate chain: {e}")))?;
    if chain.is_empty() {
        return Err(PemError::Chain("no CERTIFICATE in it".into()));
    }
    let key =
        PrivateKeyDer::from_pem_slice(key_pem).map_err(|e| PemError::Key(format!("not a PEM private key: {e}")))?;
    CertifiedKey::from_der(chain, key, provider).map_err(|e| PemError::Pair(e.to_string()))
}

/// A certificate chain and key in PEM (e.g. from a Secret), ready to serve.
pub fn certified_key(cert_pem: &[u8], key_pem: &[u8]) -> Result<CertifiedKey, String> {
    parse_pem(cert_pem, key_pem, &provider()).map_err(|e| match e {
        PemError::Chain(e) => format!("certificate: {e}"),
        PemError::Key(e) => format!("key: {e}"),
        PemError::Pair(e) => format!("the certificate and key do not make a usable pair: {e}"),
    })
}

/// A certificate set by its owner (e.g. read from a Secret) rather than read from files; none until the first set.
#[derive(Debug, Default)]
pub struct SwappableCert {
    current: RwLock<Option<Arc<CertifiedKey>>>,
}

impl SwappableCert {
    pub fn set(&self, key: CertifiedKey) {
        *self.current.write().unwrap_or_else(|p| p.into_inner()) = Some(Arc::new(key));
    }

    pub fn is_set(&self) -> bool {
        self.current.read().unwrap_or_else(|p| p.into_inner()).is_some()
    }
}

impl ResolvesServerCert for SwappableCert {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        self.current.read().unwrap_or_else(|p| p.into_inner()).clone()
    }
}

impl ReloadingCert {
    /// Loads the pair; at start a broken pair is an error (there is nothing older to fall back to).
    pub fn load(files: TlsFiles) -> Result<Arc<Self>, String> {
        let provider = provider();
        let (cert, key) = read_pair(&files)?;
        let certified = parse_pair(&files, &cert, &key, &provider)?;
        Ok(Arc::new(Self {
            files,
            provider,
            current: RwLock::new(Arc::new(certified)),
            last_seen: Mutex::new((cert, key)),
        }))
    }

    /// Loads the files again if they changed. `Ok(true)`: a new certificate is served from now on. An error keeps
    /// the certificate served so far.
    pub fn reload_if_changed(&self) -> Result<bool, String> {
        let (cert, key) = read_pair(&self.files)?;
        {
            let mut seen = self.last_seen.lock().unwrap_or_else(|p| p.into_inner());
            if seen.0 == cert && seen.1 == key {
                return Ok(false);
            }
            *seen = (cert.clone(), key.clone());
        }
        let certified = parse_pair(&self.files, &cert, &key, &self.provider)?;
        *self.current.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(certified);
        Ok(true)
    }

    /// Checks the files every `interval` for as long as the runtime runs.
    pub fn watch(self: &Arc<Self>, interval: Duration) {
        let this = self.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(interval);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            let mut unreadable_reported = false;
            loop {
                tick.tick().await;
                let files = this.clone();
                let outcome = tokio::task::spawn_blocking(move || files.reload_if_changed()).await;
                match outcome {
                    Ok(Ok(true)) => {
                        unreadable_reported = false;
                        tracing::info!(cert = %this.files.cert.display(), "TLS certificate reloaded");
                    }
                    Ok(Ok(false)) => unreadable_reported = false,
                    Ok(Err(e)) if e.starts_with("cannot read") => {
                        // A symlink swap can be caught half-way; report only if it stays that way.
                        if !unreadable_reported {
                            unreadable_reported = true;
                        } else {
                            tracing::error!(error = %e, "TLS files unreadable; still serving the previous certificate");
                        }
                    }
                    Ok(Err(e)) => {
                        tracing::error!(error = %e, "new TLS files refused; still serving the previous certificate")
                    }
                    Err(e) => tracing::error!(error = %e, "TLS reload task failed"),
                }
            }
        });
    }

    pub fn current(&self) -> Arc<CertifiedKey> {
        self.current.read().unwrap_or_else(|p| p.into_inner()).clone()
    }
}

impl ResolvesServerCert for ReloadingCert {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.current())
    }
}

/// TLS 1.2 and 1.3 (all rustls speaks), HTTP/1.1 by ALPN, the certificate from `cert`.
pub fn server_config(cert: Arc<ReloadingCert>) -> Result<Arc<ServerConfig>, String> {
    server_config_with(cert)
}

/// The same with any certificate source.
pub fn server_config_with(resolver: Arc<dyn ResolvesServerCert>) -> Result<Arc<ServerConfig>, String> {
    let mut config = ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .map_err(|e| format!("TLS configuration: {e}"))?
        .with_no_client_auth()
        .with_cert_resolver(resolver);
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn self_signed(name: &str) -> (String, String) {
        let key = rcgen::KeyPair::generate().expect("key");
        let cert =
            rcgen::CertificateParams::new(vec![name.to_string()]).expect("params").self_signed(&key).expect("cert");
        (cert.pem(), key.serialize_pem())
    }

    fn write(dir: &std::path::Path, cert: &str, key: &str) -> TlsFiles {
        let files = TlsFiles { cert: dir.join("tls.crt"), key: dir.join("tls.key") };
        std::fs::write(&files.cert, cert).expect("write");
        std::fs::write(&files.key, key).expect("write");
        files
    }

    fn served_cert(r: &ReloadingCert) -> Vec<u8> {
        r.current().cert[0].to_vec()
    }

    #[test]
    fn a_changed_pair_is_served_and_a_mismatched_one_is_refused() {
        let dir = tempfile::tempdir().expect("dir");
        let (c1, k1) = self_signed("one.test");
        let files = write(dir.path(), &c1, &k1);
        let reloading = ReloadingCert::load(files.clone()).expect("load");
        let first = served_cert(&reloading);
        assert_eq!(reloading.reload_if_changed(), Ok(false), "unchanged files are not reloaded");

        // A certificate with another certificate's key: refused, the first one stays.
        let (c2, k2) = self_signed("two.test");
        write(dir.path(), &c2, &k1);
        let err = reloading.reload_if_changed().expect_err("mismatched pair");
        assert!(err.contains("do not make a usable pair"), "{err}");
        assert_eq!(served_cert(&reloading), first);

        write(dir.path(), &c2, &k2);
        assert_eq!(reloading.reload_if_changed(), Ok(true));
        assert_ne!(served_cert(&reloading), first);
    }

    #[test]
    fn a_broken_pair_at_start_is_an_error_naming_the_file() {
        let dir = tempfile::tempdir().expect("dir");
        let (c1, _) = self_signed("one.test");
        let files = write(dir.path(), &c1, "not a key");
        let err = ReloadingCert::load(files).expect_err("no key");
        assert!(err.contains("tls.key"), "{err}");
        let files = write(dir.path(), "garbage", "not a key");
        let err = ReloadingCert::load(files).expect_err("no cert");
        assert!(err.contains("tls.crt") && err.contains("no CERTIFICATE"), "{err}");
    }
}

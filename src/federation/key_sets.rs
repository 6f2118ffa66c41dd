//! Trusted issuers' key sets (JWKS), fetched over HTTPS and cached: the adapter behind the assertion
//! checks of [`crate::core::assertion`].
//!
//! - Fetched over HTTPS, the server checked against the system's roots plus an optional CA bundle; plain HTTP only to
//!   a loopback address (a test issuer, a local proxy).
//! - Bounded: one request at most [`FETCH_TIMEOUT`] in all (connect, TLS, answer) and [`MAX_KEY_SET_BYTES`].
//! - Cached: a key set is fetched when first needed, and again only when an assertion names a key it lacks, at most
//!   once per [`REFETCH_INTERVAL`] per issuer (an attacker sending made-up `kid`s cannot make kubetoken hammer the
//!   identity provider). A failed fetch keeps the set already held and is reported by [`KeySets::last_error`].
//! - Aged: a set held for [`MAX_AGE`] is fetched again when next used, so a key the issuer withdrew stops verifying.
//! - Tolerant: a key of a kind kubetoken cannot use (another curve) is skipped, not the whole set.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use http_body_util::{BodyExt, Empty, Limited};
use hyper::body::Bytes;
use hyper_util::rt::TokioIo;
use jsonwebtoken::jwk::JwkSet;

use crate::core::assertion::{KeySetFuture, KeySetSource, parse_key_set};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};

pub const FETCH_TIMEOUT: Duration = Duration::from_secs(5);
pub const MAX_KEY_SET_BYTES: usize = 256 * 1024;
pub const REFETCH_INTERVAL: Duration = Duration::from_secs(30);
/// A key set held longer than this is fetched again when next used: a key the issuer withdrew (compromised) stops
/// being trusted even if no assertion ever names an unknown key.
pub const MAX_AGE: Duration = Duration::from_secs(3600);

/// Fetches key sets: the TLS roots and the bounds.
pub struct KeySetFetcher {
    tls: Arc<rustls::ClientConfig>,
    timeout: Duration,
    max_bytes: usize,
}

impl KeySetFetcher {
    /// Trusts the system's roots and, if given, the PEM certificates of `ca_bundle` (a private CA's identity
    /// provider).
    pub fn new(ca_bundle: Option<&[u8]>) -> Result<Self, String> {
        let mut roots = rustls::RootCertStore::empty();
        let native = rustls_native_certs::load_native_certs();
        for cert in native.certs {
            // A system certificate rustls cannot use is skipped, as every rustls client does.
            let _ = roots.add(cert);
        }
        if let Some(pem) = ca_bundle {
            for cert in CertificateDer::pem_slice_iter(pem) {
                let cert = cert.map_err(|e| format!("the CA bundle: not PEM certificates: {e}"))?;
                roots.add(cert).map_err(|e| format!("the CA bundle: {e}"))?;
            }
        }
        let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
        let tls = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| e.to_string())?
            .with_root_certificates(roots)
            .with_no_client_auth();
        Ok(Self { tls: Arc::new(tls), timeout: FETCH_TIMEOUT, max_bytes: MAX_KEY_SET_BYTES })
    }

    /// GETs the key set at `uri`.
    pub async fn fetch(&self, uri: &str) -> Result<JwkSet, String> {
        tokio::time::timeout(self.timeout, self.fetch_unbounded(uri))
            .await
            .map_err(|_| format!("no key set from {uri} within {} s", self.timeout.as_secs()))?
    }

    async fn fetch_unbounded(&self, uri: &str) -> Result<JwkSet, String> {
        let parsed: hyper::Uri = uri.parse().map_err(|e| format!("{uri} is not a URL: {e}"))?;
        let host = parsed.host().ok_or_else(|| format!("{uri} names no host"))?.to_string();
        let bare_host = host.trim_start_matches('[').trim_end_matches(']').to_string();
        let tls = match parsed.scheme_str() {
            Some("https") => true,
            Some("http") if bare_host.parse::<IpAddr>().is_ok_and(|ip| ip.is_loopback()) || host == "localhost" => {
                false
            }
            Some("http") => {
                return Err(format!("{uri}: a key set is fetched over HTTPS (plain HTTP only on the loopback)"));
            }
            _ => return Err(format!("{uri} is not an https URL")),
        };
        let port = parsed.port_u16().unwrap_or(if tls { 443 } else { 80 });
        let path = parsed.path_and_query().map_or("/", |p| p.as_str()).to_string();
        let tcp = tokio::net::TcpStream::connect((bare_host.as_str(), port))
            .await
            .map_err(|e| format!("{uri}: cannot connect: {e}"))?;
        let request = hyper::Request::get(path)
            .header(hyper::header::HOST, parsed.authority().map_or(host.as_str(), |a| a.as_str()))
            .header(hyper::header::ACCEPT, "application/json, application/jwk-set+json")
            .header(hyper::header::USER_AGENT, concat!("kubetoken/", env!("CARGO_PKG_VERSION")))
            .body(Empty::<Bytes>::new())
            .map_err(|e| e.to_string())?;
        let body = if tls {
            let name = ServerName::try_from(bare_host.clone()).map_err(|e| format!("{uri}: {e}"))?;
            let stream = tokio_rustls::TlsConnector::from(self.tls.clone())
                .connect(name, tcp)
                .await
                .map_err(|e| format!("{uri}: TLS: {e}"))?;
            self.exchange(uri, TokioIo::new(stream), request).await?
        } else {
            self.exchange(uri, TokioIo::new(tcp), request).await?
        };
        parse_key_set(&body).map_err(|e| format!("{uri}: {e}"))
    }

    async fn exchange<S>(&self, uri: &str, io: S, request: hyper::Request<Empty<Bytes>>) -> Result<Bytes, String>
    where
        S: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
    {
        let (mut sender, connection) =
            hyper::client::conn::http1::handshake(io).await.map_err(|e| format!("{uri}: {e}"))?;
        tokio::spawn(async move {
            let _ = connection.await;
        });
        let response = sender.send_request(request).await.map_err(|e| format!("{uri}: {e}"))?;
        if response.status() != hyper::StatusCode::OK {
            return Err(format!("{uri} answered {}", response.status()));
        }
        let limited = Limited::new(response.into_body(), self.max_bytes);
        limited
            .collect()
            .await
            .map(|c| c.to_bytes())
            .map_err(|e| format!("{uri}: the key set could not be read (at most {} bytes): {e}", self.max_bytes))
    }
}

struct Entry {
    set: Option<Arc<JwkSet>>,
    /// When `set` was fetched.
    fetched: Option<Instant>,
    last_attempt: Option<Instant>,
    last_error: Option<String>,
}

/// The key sets of the issuers in use, by URL.
pub struct KeySets {
    fetcher: KeySetFetcher,
    refetch_interval: Duration,
    max_age: Duration,
    entries: Mutex<HashMap<String, Arc<tokio::sync::Mutex<Entry>>>>,
}

impl KeySets {
    pub fn new(fetcher: KeySetFetcher) -> Self {
        Self::with_timings(fetcher, REFETCH_INTERVAL, MAX_AGE)
    }

    pub fn with_timings(fetcher: KeySetFetcher, refetch_interval: Duration, max_age: Duration) -> Self {
        Self { fetcher, refetch_interval, max_age, entries: Mutex::default() }
    }

    fn entry(&self, uri: &str) -> Arc<tokio::sync::Mutex<Entry>> {
        let mut entries = self.entries.lock().unwrap_or_else(|p| p.into_inner());
        entries
            .entry(uri.to_string())
            .or_insert_with(|| {
                Arc::new(tokio::sync::Mutex::new(Entry {
                    set: None,
                    fetched: None,
                    last_attempt: None,
                    last_error: None,
                }))
            })
            .clone()
    }

    /// The key set at `uri`: the one held, or fetched now if none is (at most once per interval).
    pub async fn current(&self, uri: &str) -> Result<Arc<JwkSet>, String> {
        self.get(uri, false).await
    }

    /// The key set at `uri` after an assertion named a key it lacks: fetched again unless it was fetched (or tried)
    /// within the interval, in which case the held one is returned.
    pub async fn after_unknown_key(&self, uri: &str) -> Result<Arc<JwkSet>, String> {
        self.get(uri, true).await
    }

    async fn get(&self, uri: &str, stale: bool) -> Result<Arc<JwkSet>, String> {
        let entry = self.entry(uri);
        // One fetch per issuer at a time: concurrent requests wait for it and share its result.
        let mut e = entry.lock().await;
        let recent = e.last_attempt.is_some_and(|at| at.elapsed() < self.refetch_interval);
        let aged = e.fetched.is_some_and(|at| at.elapsed() >= self.max_age);
        let fetch = !recent && (e.set.is_none() || stale || aged);
        if fetch {
            e.last_attempt = Some(Instant::now());
            match self.fetcher.fetch(uri).await {
                Ok(set) => {
                    e.set = Some(Arc::new(set));
                    e.fetched = Some(Instant::now());
                    e.last_error = None;
                }
                Err(why) => {
                    tracing::warn!(key_set = uri, error = %why, "fetching a trusted issuer's key set failed; keeping the one held");
                    e.last_error = Some(why);
                }
            }
        }
        match (&e.set, &e.last_error) {
            (Some(set), _) => Ok(set.clone()),
            (None, Some(why)) => Err(why.clone()),
            (None, None) => Err(format!("the key set at {uri} was not fetched yet")),
        }
    }

    /// Why the last fetch of `uri` failed, if it did (for the application's status).
    pub async fn last_error(&self, uri: &str) -> Option<String> {
        self.entry(uri).lock().await.last_error.clone()
    }
}

impl std::fmt::Debug for KeySets {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KeySets").finish_non_exhaustive()
    }
}

impl KeySetSource for KeySets {
    fn key_set<'a>(&'a self, uri: &'a str, after_unknown_key: bool) -> KeySetFuture<'a> {
        Box::pin(self.get(uri, after_unknown_key))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// A test issuer's JWKS endpoint over HTTPS: a CA made here, a certificate for `localhost`, a body that can be
    /// changed (rotation) or made too large, and a count of the requests it answered.
    struct TestIssuer {
        url: String,
        ca_pem: String,
        body: Arc<Mutex<String>>,
        requests: Arc<AtomicUsize>,
    }

    fn jwks(kids: &[&str]) -> String {
        let keys: Vec<serde_json::Value> = kids
            .iter()
            .map(|kid| {
                serde_json::json!({"kty": "OKP", "crv": "Ed25519", "kid": kid, "alg": "EdDSA",
                                   "x": "11qYAYKxCrfVS_7TyWQHOg7hcvPapiMlrwIaaPcHURo"})
            })
            .collect();
        serde_json::json!({ "keys": keys }).to_string()
    }

    async fn test_issuer(tls: bool) -> TestIssuer {
        use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair};
        let ca_key = KeyPair::generate().expect("key");
        let mut ca = CertificateParams::new(Vec::<String>::new()).expect("params");
        ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let ca_pem = ca.clone().self_signed(&ca_key).expect("ca").pem();
        let server_key = KeyPair::generate().expect("key");
        let cert = CertificateParams::new(vec!["localhost".to_string()])
            .expect("params")
            .signed_by(&server_key, &Issuer::new(ca, &ca_key))
            .expect("cert");
        let served = Arc::new(crate::http::tls::SwappableCert::default());
        served.set(
            crate::http::tls::certified_key(cert.pem().as_bytes(), server_key.serialize_pem().as_bytes())
                .expect("pair"),
        );
        let config = crate::http::tls::server_config_with(served).expect("server config");
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let port = listener.local_addr().expect("addr").port();
        let body = Arc::new(Mutex::new(jwks(&["k1"])));
        let requests = Arc::new(AtomicUsize::new(0));
        let (b, r) = (body.clone(), requests.clone());
        tokio::spawn(async move {
            let acceptor = tokio_rustls::TlsAcceptor::from(config);
            loop {
                let Ok((tcp, _)) = listener.accept().await else { return };
                let (b, r, acceptor) = (b.clone(), r.clone(), acceptor.clone());
                tokio::spawn(async move {
                    let answer = |mut s: Box<dyn Stream>| async move {
                        let mut buf = vec![0u8; 4096];
                        let mut read = 0;
                        while !buf[..read].windows(4).any(|w| w == b"\r\n\r\n") {
                            match s.read(&mut buf[read..]).await {
                                Ok(0) | Err(_) => return,
                                Ok(n) => read += n,
                            }
                        }
                        r.fetch_add(1, Ordering::SeqCst);
                        let body = b.lock().unwrap_or_else(|p| p.into_inner()).clone();
                        let head = format!(
                            "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n",
                            body.len()
                        );
                        let _ = s.write_all(head.as_bytes()).await;
                        let _ = s.write_all(body.as_bytes()).await;
                        let _ = s.shutdown().await;
                    };
                    if tls {
                        if let Ok(s) = acceptor.accept(tcp).await {
                            answer(Box::new(s)).await;
                        }
                    } else {
                        answer(Box::new(tcp)).await;
                    }
                });
            }
        });
        let scheme = if tls { "https" } else { "http" };
        TestIssuer { url: format!("{scheme}://localhost:{port}/jwks"), ca_pem, body, requests }
    }

    trait Stream: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send {}
    impl<T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send> Stream for T {}

    fn kids(set: &JwkSet) -> Vec<String> {
        set.keys.iter().filter_map(|k| k.common.key_id.clone()).collect()
    }

    #[tokio::test]
    async fn a_key_set_is_fetched_over_https_from_an_issuer_signed_by_the_ca_bundle() {
        let issuer = test_issuer(true).await;
        let fetcher = KeySetFetcher::new(Some(issuer.ca_pem.as_bytes())).expect("fetcher");
        assert_eq!(kids(&fetcher.fetch(&issuer.url).await.expect("fetched")), vec!["k1"]);
        let untrusted = KeySetFetcher::new(None).expect("fetcher");
        let e = untrusted.fetch(&issuer.url).await.expect_err("an issuer signed by an unknown CA");
        assert!(e.contains("TLS") && e.contains("invalid peer certificate"), "{e}");
    }

    #[tokio::test]
    async fn an_aged_set_is_fetched_again_so_a_withdrawn_key_stops_verifying_and_unusable_keys_are_skipped() {
        let issuer = test_issuer(true).await;
        let fetcher = KeySetFetcher::new(Some(issuer.ca_pem.as_bytes())).expect("fetcher");
        let sets = KeySets::with_timings(fetcher, Duration::from_millis(50), Duration::from_millis(200));
        *issuer.body.lock().expect("lock") = jwks(&["k1", "compromised"]);
        assert_eq!(kids(&sets.current(&issuer.url).await.expect("first")), vec!["k1", "compromised"]);
        // The issuer withdraws a key (and adds one of a curve kubetoken does not use: skipped, not fatal).
        let mut body: serde_json::Value = serde_json::from_str(&jwks(&["k1"])).expect("json");
        body["keys"]
            .as_array_mut()
            .expect("keys")
            .push(serde_json::json!({"kty": "EC", "crv": "secp256k1", "kid": "other", "x": "AA", "y": "AA"}));
        *issuer.body.lock().expect("lock") = body.to_string();
        assert_eq!(kids(&sets.current(&issuer.url).await.expect("held")), vec!["k1", "compromised"], "not aged yet");
        tokio::time::sleep(Duration::from_millis(250)).await;
        assert_eq!(kids(&sets.current(&issuer.url).await.expect("aged: fetched again")), vec!["k1"]);
    }

    #[tokio::test]
    async fn plain_http_only_on_the_loopback_and_size_is_bounded() {
        let issuer = test_issuer(false).await;
        let fetcher = KeySetFetcher::new(None).expect("fetcher");
        assert_eq!(kids(&fetcher.fetch(&issuer.url).await.expect("loopback http")), vec!["k1"]);
        let e = fetcher.fetch("http://idp.example/jwks").await.expect_err("plain http elsewhere");
        assert!(e.contains("over HTTPS"), "{e}");
        let e = fetcher.fetch("ftp://idp.example/jwks").await.expect_err("not https");
        assert!(e.contains("not an https URL"), "{e}");
        *issuer.body.lock().expect("lock") =
            format!("{{\"keys\": [], \"pad\": \"{}\"}}", "x".repeat(MAX_KEY_SET_BYTES));
        let e = fetcher.fetch(&issuer.url).await.expect_err("too large");
        assert!(e.contains("at most"), "{e}");
        *issuer.body.lock().expect("lock") = "<html>".into();
        let e = fetcher.fetch(&issuer.url).await.expect_err("not JSON");
        assert!(e.contains("not a JWK set"), "{e}");
    }

    #[tokio::test]
    async fn an_unknown_key_refetches_at_most_once_per_interval_and_a_failure_keeps_the_held_set() {
        let issuer = test_issuer(true).await;
        let fetcher = KeySetFetcher::new(Some(issuer.ca_pem.as_bytes())).expect("fetcher");
        let sets = KeySets::with_timings(fetcher, Duration::from_millis(300), Duration::from_secs(3600));
        assert_eq!(kids(&sets.current(&issuer.url).await.expect("first")), vec!["k1"]);
        assert_eq!(kids(&sets.current(&issuer.url).await.expect("cached")), vec!["k1"]);
        assert_eq!(issuer.requests.load(Ordering::SeqCst), 1, "cached");
        // The issuer rotates: an assertion names k2. Within the interval, no fetch; after it, one.
        *issuer.body.lock().expect("lock") = jwks(&["k1", "k2"]);
        assert_eq!(kids(&sets.after_unknown_key(&issuer.url).await.expect("held")), vec!["k1"]);
        assert_eq!(issuer.requests.load(Ordering::SeqCst), 1, "not within the interval");
        tokio::time::sleep(Duration::from_millis(350)).await;
        assert_eq!(kids(&sets.after_unknown_key(&issuer.url).await.expect("rotated")), vec!["k1", "k2"]);
        for _ in 0..5 {
            sets.after_unknown_key(&issuer.url).await.expect("held");
        }
        assert_eq!(issuer.requests.load(Ordering::SeqCst), 2, "made-up kids do not hammer the issuer");
        // The issuer breaks: the set held stays, and the failure is reported.
        *issuer.body.lock().expect("lock") = "broken".into();
        tokio::time::sleep(Duration::from_millis(350)).await;
        assert_eq!(kids(&sets.after_unknown_key(&issuer.url).await.expect("kept")), vec!["k1", "k2"]);
        assert!(sets.last_error(&issuer.url).await.is_some_and(|e| e.contains("not a JWK set")));
    }
}

//! A trusted identity provider for tests: its key set served over HTTPS by a CA made in the test, and JWTs it signs
//! (ID tokens, assertions) with claims a test chooses. The key set can be rotated, and its requests are counted.

use std::io::{Read, Write};
use std::net::TcpListener;
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use kubetoken::core::signing::{Algorithm, SigningKey};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use serde_json::{Value, json};

use super::tls::TestCa;

pub const JWT_BEARER: &str = "urn:ietf:params:oauth:grant-type:jwt-bearer";
pub const TOKEN_EXCHANGE: &str = "urn:ietf:params:oauth:grant-type:token-exchange";
pub const ID_TOKEN: &str = "urn:ietf:params:oauth:token-type:id_token";

/// The shop application trusting `issuer_block` (YAML lines under `trustedIssuers:`), with a local user too.
pub fn manifests(dir: &Path, format: &str, issuer_block: &str, extra_docs: &str) {
    let users = std::fs::read_to_string(super::examples_dir().join("shop.yaml")).expect("shop example");
    let users_secret = users.split("---").find(|d| d.contains("users.yaml:")).expect("users secret");
    let yaml = format!(
        "apiVersion: kubetoken.io/v1alpha1
kind: OAuthApplication
metadata: {{name: shop, namespace: default}}
spec:
  grantTypes: [{JWT_BEARER}, {TOKEN_EXCHANGE}, refresh_token, password]
  tokenFormat: {format}
  audience: [shop-api]
  maxTokenKeysPerUser: 10
  scopes:
    - {{name: \"orders:read\", roles: [customer, admin]}}
    - {{name: \"orders:admin\", roles: [admin]}}
  users: {{secretRef: {{name: shop-users}}}}
  credentials: {{secretName: shop-credentials}}
  trustedIssuers:
{issuer_block}
---
apiVersion: v1
kind: Secret
metadata: {{name: shop-credentials, namespace: default}}
stringData: {{client_id: shop-app, client_secret: shop-secret-change-me}}
---{users_secret}---
{extra_docs}"
    );
    std::fs::write(dir.join("shop.yaml"), yaml).expect("write manifests");
}

pub fn trusting(issuer: &TestIssuer) -> String {
    format!(
        "    - issuer: {}
      jwksUri: {}
      audiences: [shop]
      usernameClaim: preferred_username
      rolesClaim: realm_access.roles
      allowedAlgorithms: [ES256]
      maxAssertionAge: 10m",
        issuer.issuer, issuer.jwks_uri
    )
}

pub fn key(alg: Algorithm) -> SigningKey {
    SigningKey::from_pkcs8(alg, &SigningKey::generate_pkcs8(alg).expect("generate")).expect("parse")
}

pub fn now() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).expect("clock").as_secs()
}

pub struct TestIssuer {
    /// The issuer identifier (`iss`).
    pub issuer: String,
    pub jwks_uri: String,
    pub ca: TestCa,
    /// Signs the JWTs [`TestIssuer::jwt`] makes; its public key is in the served set.
    pub signer: Mutex<SigningKey>,
    body: Arc<Mutex<String>>,
    pub requests: Arc<AtomicUsize>,
    jti: AtomicUsize,
}

impl TestIssuer {
    /// Serves the key set of one ES256 key at `https://localhost:<port>/realms/shop/protocol/openid-connect/certs`.
    pub fn start() -> TestIssuer {
        let ca = TestCa::new("test identity provider CA");
        let (cert_pem, key_pem) = ca.server_pair("localhost");
        let certs: Vec<CertificateDer<'static>> =
            CertificateDer::pem_slice_iter(cert_pem.as_bytes()).collect::<Result<_, _>>().expect("certs");
        let key_der = PrivateKeyDer::from_pem_slice(key_pem.as_bytes()).expect("key");
        let config =
            rustls::ServerConfig::builder_with_provider(Arc::new(rustls::crypto::aws_lc_rs::default_provider()))
                .with_safe_default_protocol_versions()
                .expect("versions")
                .with_no_client_auth()
                .with_single_cert(certs, key_der)
                .expect("server config");
        let config = Arc::new(config);
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
        let port = listener.local_addr().expect("addr").port();
        let signer = key(Algorithm::ES256);
        let body = Arc::new(Mutex::new(key_set(&[&signer])));
        let requests = Arc::new(AtomicUsize::new(0));
        let (served, counted) = (body.clone(), requests.clone());
        std::thread::spawn(move || {
            for stream in listener.incoming() {
                let Ok(tcp) = stream else { continue };
                let (config, served, counted) = (config.clone(), served.clone(), counted.clone());
                std::thread::spawn(move || {
                    let Ok(conn) = rustls::ServerConnection::new(config) else { return };
                    let mut tls = rustls::StreamOwned::new(conn, tcp);
                    let mut request = Vec::new();
                    let mut buf = [0u8; 1024];
                    while !request.windows(4).any(|w| w == b"\r\n\r\n") {
                        match tls.read(&mut buf) {
                            Ok(0) | Err(_) => return,
                            Ok(n) => request.extend_from_slice(&buf[..n]),
                        }
                    }
                    counted.fetch_add(1, Ordering::SeqCst);
                    let body = served.lock().expect("body").clone();
                    let response = format!(
                        "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                        body.len()
                    );
                    let _ = tls.write_all(response.as_bytes());
                    let _ = tls.flush();
                    tls.conn.send_close_notify();
                    let _ = tls.flush();
                });
            }
        });
        let issuer = format!("https://localhost:{port}/realms/shop");
        TestIssuer {
            jwks_uri: format!("{issuer}/protocol/openid-connect/certs"),
            issuer,
            ca,
            signer: Mutex::new(signer),
            body,
            requests,
            jti: AtomicUsize::new(0),
        }
    }

    /// Writes the CA certificate (PEM) for `--issuer-ca-file`.
    pub fn write_ca(&self, path: &Path) {
        let pem = format!(
            "-----BEGIN CERTIFICATE-----\n{}\n-----END CERTIFICATE-----\n",
            base64::engine::general_purpose::STANDARD.encode(self.ca.cert_der().as_ref())
        );
        std::fs::write(path, pem).expect("write CA");
    }

    /// The issuer rotates: a new key signs from now on, and the served set holds only it.
    pub fn rotate(&self) {
        let next = key(Algorithm::ES256);
        *self.body.lock().expect("body") = key_set(&[&next]);
        *self.signer.lock().expect("signer") = next;
    }

    /// An ID token for `user` with Keycloak's claims (`preferred_username`, `realm_access.roles`), valid for 5
    /// minutes, a fresh `jti`; `extra` overrides claims (null removes one).
    pub fn jwt(&self, user: &str, roles: &[&str], extra: Value) -> String {
        let signer = self.signer.lock().expect("signer");
        self.jwt_by(&signer, user, roles, extra)
    }

    pub fn jwt_by(&self, key: &SigningKey, user: &str, roles: &[&str], extra: Value) -> String {
        let now = now();
        let mut claims = json!({
            "iss": self.issuer, "aud": "shop", "sub": format!("0b1c-{user}"), "preferred_username": user,
            "realm_access": {"roles": roles}, "iat": now, "exp": now + 300, "typ": "ID",
            "jti": format!("jti-{}-{}", std::process::id(), self.jti.fetch_add(1, Ordering::SeqCst)),
        });
        let (Some(c), Some(e)) = (claims.as_object_mut(), extra.as_object()) else { unreachable!() };
        for (k, v) in e {
            if v.is_null() {
                c.remove(k);
            } else {
                c.insert(k.clone(), v.clone());
            }
        }
        key.sign_jwt(&serde_json::to_vec(&claims).expect("json")).expect("sign")
    }

    /// A JWT with a header of the test's choosing and a garbage signature (`none`, HMAC).
    pub fn unsigned(&self, header: Value, user: &str) -> String {
        let now = now();
        let claims =
            json!({"iss": self.issuer, "aud": "shop", "preferred_username": user, "iat": now, "exp": now + 300});
        let enc = |v: &Value| URL_SAFE_NO_PAD.encode(serde_json::to_vec(v).expect("json"));
        format!("{}.{}.{}", enc(&header), enc(&claims), URL_SAFE_NO_PAD.encode(b"signature"))
    }
}

fn key_set(keys: &[&SigningKey]) -> String {
    json!({"keys": keys.iter().map(|k| serde_json::to_value(k.public_jwk()).expect("jwk")).collect::<Vec<_>>()})
        .to_string()
}

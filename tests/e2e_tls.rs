//! TLS on the token endpoint, end to end: the real binary, a CA made in the test, a client that trusts only it.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::time::{Duration, Instant};

use common::tls::{TestCa, TlsConnection};
use common::{SHOP, Server, examples_dir, get};

fn tls_server(ca: &TestCa, dir: &Path, state: &Path) -> Server {
    let (cert, key) = ca.write_server_pair(dir, "first");
    let (cert, key) = (cert.to_str().expect("utf8").to_string(), key.to_str().expect("utf8").to_string());
    Server::start(&examples_dir(), state, &["--tls-cert", &cert, "--tls-key", &key])
}

fn password(c: &mut TlsConnection, scope: &str) -> common::Response {
    c.post_form(
        "/oauth2/token",
        SHOP,
        &[("grant_type", "password"), ("username", "alice"), ("password", "alice-password"), ("scope", scope)],
    )
}

fn active(c: &mut TlsConnection, token: &str) -> serde_json::Value {
    let r = c.post_form("/oauth2/introspect", SHOP, &[("token", token)]);
    assert_eq!(r.status, 200, "{}", r.body);
    r.json()
}

#[test]
fn token_refresh_introspection_and_revocation_over_tls() {
    let (dir, state) = (tempfile::tempdir().expect("dir"), tempfile::tempdir().expect("dir"));
    let ca = TestCa::new("kubetoken test CA");
    let s = tls_server(&ca, dir.path(), state.path());
    assert!(s.base.starts_with("https://127.0.0.1:"), "{}", s.base);

    let mut c = TlsConnection::open(&ca.client_config(), &s.base).expect("a client trusting the test CA connects");
    let meta = c.get("/.well-known/oauth-authorization-server").json();
    assert_eq!(meta["issuer"], s.base.as_str(), "the default issuer follows the scheme served");
    assert_eq!(meta["token_endpoint"], format!("{}/oauth2/token", s.base));

    let first = password(&mut c, "device_ipad orders:read");
    assert_eq!(first.status, 200, "{}", first.body);
    let refreshed = c.post_form(
        "/oauth2/token",
        SHOP,
        &[("grant_type", "refresh_token"), ("refresh_token", &first.field("refresh_token"))],
    );
    assert_eq!(refreshed.status, 200, "{}", refreshed.body);
    let access = refreshed.field("access_token");
    let info = active(&mut c, &access);
    assert_eq!(info["active"], true);
    assert_eq!(info["iss"], s.base.as_str(), "iss agrees with the metadata");
    assert_eq!(active(&mut c, &first.field("access_token"))["active"], false, "refresh superseded the first");

    let revoked = c.post_form("/oauth2/revoke", SHOP, &[("token", &access)]);
    assert_eq!(revoked.status, 200);
    assert_eq!(active(&mut c, &access)["active"], false);

    // A client that trusts another CA does not get through the handshake.
    let stranger = TestCa::new("another CA");
    let err = TlsConnection::open(&stranger.client_config(), &s.base).err().expect("untrusted certificate refused");
    assert!(err.to_lowercase().contains("certificate"), "{err}");
}

/// A ClientHello built by hand, so that the version is the only thing wrong with it: no TLS library here will
/// still offer TLS 1.1. Suites and extensions are ones a TLS 1.2 server accepts.
fn client_hello(version: [u8; 2]) -> Vec<u8> {
    let mut body = version.to_vec();
    body.extend([7u8; 32]); // random
    body.push(0); // no session id
    let suites = [0xc0, 0x2b, 0xc0, 0x2f, 0xc0, 0x13, 0xc0, 0x09];
    body.extend((suites.len() as u16).to_be_bytes());
    body.extend(suites);
    body.extend([1, 0]); // compression: null
    let extension = |kind: u16, data: &[u8]| {
        let mut e = kind.to_be_bytes().to_vec();
        e.extend((data.len() as u16).to_be_bytes());
        e.extend(data);
        e
    };
    let mut extensions = Vec::new();
    extensions.extend(extension(0x000a, &[0, 4, 0x00, 0x1d, 0x00, 0x17])); // groups: x25519, secp256r1
    extensions.extend(extension(0x000b, &[1, 0])); // point formats: uncompressed
    extensions.extend(extension(0x000d, &[0, 6, 0x04, 0x03, 0x08, 0x04, 0x04, 0x01])); // signature algorithms
    body.extend((extensions.len() as u16).to_be_bytes());
    body.extend(extensions);
    let mut handshake = vec![0x01];
    handshake.extend(&(body.len() as u32).to_be_bytes()[1..]);
    handshake.extend(body);
    let mut record = vec![0x16, 0x03, 0x01];
    record.extend((handshake.len() as u16).to_be_bytes());
    record.extend(handshake);
    record
}

/// Sends `bytes` and reads the answer until the server closes, or until the first record header and a byte of
/// its body are in (a server that accepted a handshake waits for the client's next message).
fn exchange(base: &str, bytes: &[u8]) -> Vec<u8> {
    let mut tcp = TcpStream::connect(base.trim_start_matches("https://")).expect("connect");
    tcp.set_read_timeout(Some(Duration::from_secs(10))).expect("timeout");
    tcp.write_all(bytes).expect("write");
    let mut answer = Vec::new();
    let mut chunk = [0u8; 4096];
    while answer.len() < 6 {
        match tcp.read(&mut chunk) {
            Ok(0) | Err(_) => break,
            Ok(n) => answer.extend(&chunk[..n]),
        }
    }
    answer
}

#[test]
fn tls_1_1_and_plaintext_are_refused_on_the_tls_port() {
    let (dir, state) = (tempfile::tempdir().expect("dir"), tempfile::tempdir().expect("dir"));
    let ca = TestCa::new("kubetoken test CA");
    let s = tls_server(&ca, dir.path(), state.path());

    // The same hello as TLS 1.2 gets a ServerHello: the control that shows the hello itself is acceptable.
    let answer = exchange(&s.base, &client_hello([0x03, 0x03]));
    assert_eq!((answer.first(), answer.get(5)), (Some(&0x16), Some(&0x02)), "expected a ServerHello: {answer:02x?}");
    // As TLS 1.1: a fatal alert record (0x15, level 2), and no ServerHello.
    let answer = exchange(&s.base, &client_hello([0x03, 0x02]));
    assert_eq!((answer.first(), answer.get(5)), (Some(&0x15), Some(&2)), "expected a fatal alert: {answer:02x?}");

    let answer = exchange(&s.base, b"GET /healthz HTTP/1.1\r\nHost: localhost\r\n\r\n");
    assert!(
        !answer.starts_with(b"HTTP/"),
        "plain HTTP answered on the TLS port: {:?}",
        String::from_utf8_lossy(&answer)
    );

    // And the modern client still negotiates TLS 1.3.
    let c = TlsConnection::open(&ca.client_config(), &s.base).expect("connect");
    assert_eq!(c.protocol(), Some(rustls::ProtocolVersion::TLSv1_3));
}

/// The layout of a Secret mounted by the kubelet (and rotated by cert-manager): `tls.crt -> ..data/tls.crt`,
/// `..data -> ..<version>/`, and a rotation is a new version directory plus an atomic rename of `..data`.
struct MountedSecret {
    dir: std::path::PathBuf,
    version: u32,
}

impl MountedSecret {
    fn new(dir: &Path, cert: &str, key: &str) -> Self {
        let mut m = Self { dir: dir.to_path_buf(), version: 0 };
        m.swap(cert, key);
        for name in ["tls.crt", "tls.key"] {
            std::os::unix::fs::symlink(format!("..data/{name}"), dir.join(name)).expect("symlink");
        }
        m
    }

    fn swap(&mut self, cert: &str, key: &str) {
        self.version += 1;
        let version = format!("..v{}", self.version);
        std::fs::create_dir(self.dir.join(&version)).expect("mkdir");
        std::fs::write(self.dir.join(&version).join("tls.crt"), cert).expect("write");
        std::fs::write(self.dir.join(&version).join("tls.key"), key).expect("write");
        let tmp = self.dir.join("..data_tmp");
        std::os::unix::fs::symlink(&version, &tmp).expect("symlink");
        std::fs::rename(&tmp, self.dir.join("..data")).expect("atomic swap");
    }

    fn path(&self, name: &str) -> String {
        self.dir.join(name).to_str().expect("utf8").to_string()
    }

    /// The file the symlinks point at now, overwritten in place (no symlink swap).
    fn overwrite(&self, cert: &str, key: &str) {
        let data = self.dir.join(format!("..v{}", self.version));
        std::fs::write(data.join("tls.crt"), cert).expect("write");
        std::fs::write(data.join("tls.key"), key).expect("write");
    }
}

fn pem_cert_der(pem: &str) -> Vec<u8> {
    use rustls::pki_types::CertificateDer;
    use rustls::pki_types::pem::PemObject;
    CertificateDer::pem_slice_iter(pem.as_bytes()).next().expect("a certificate").expect("PEM").to_vec()
}

/// Opens new connections until one presents `want` (the server checks its files every second).
fn wait_for_cert(ca: &TestCa, base: &str, want: &[u8]) -> Duration {
    let started = Instant::now();
    loop {
        let c = TlsConnection::open(&ca.client_config(), base).expect("connect");
        if c.server_cert() == want {
            return started.elapsed();
        }
        assert!(started.elapsed() < Duration::from_secs(15), "the new certificate was not served within 15 s");
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn rotated_certificates_reach_new_connections_and_open_ones_keep_working() {
    let (dir, state) = (tempfile::tempdir().expect("dir"), tempfile::tempdir().expect("dir"));
    let ca = TestCa::new("kubetoken test CA");
    let (cert_a, key_a) = ca.server_pair("a");
    let mut secret = MountedSecret::new(dir.path(), &cert_a, &key_a);
    let mut s = Server::start(
        &examples_dir(),
        state.path(),
        &["--tls-cert", &secret.path("tls.crt"), "--tls-key", &secret.path("tls.key")],
    );
    let mut open = TlsConnection::open(&ca.client_config(), &s.base).expect("connect");
    assert_eq!(open.server_cert(), pem_cert_der(&cert_a));
    assert_eq!(open.get("/healthz").status, 200);

    // Overwritten in place.
    let (cert_b, key_b) = ca.server_pair("b");
    secret.overwrite(&cert_b, &key_b);
    let took_b = wait_for_cert(&ca, &s.base, &pem_cert_der(&cert_b));
    // Swapped by symlink, as the kubelet does.
    let (cert_c, key_c) = ca.server_pair("c");
    secret.swap(&cert_c, &key_c);
    let took_c = wait_for_cert(&ca, &s.base, &pem_cert_der(&cert_c));
    eprintln!("new certificate served after {took_b:?} (overwrite) and {took_c:?} (symlink swap)");

    // The connection opened before both rotations still serves requests, with the certificate it started with.
    let r = password(&mut open, "device_ipad");
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(open.server_cert(), pem_cert_der(&cert_a));

    // A broken pair (C's key with D's certificate) is refused: C stays, and the log says why.
    let (cert_d, _) = ca.server_pair("d");
    secret.swap(&cert_d, &key_c);
    std::thread::sleep(Duration::from_secs(3));
    for _ in 0..3 {
        let c = TlsConnection::open(&ca.client_config(), &s.base).expect("still serving");
        assert_eq!(c.server_cert(), pem_cert_der(&cert_c), "a broken pair replaced the working one");
    }
    let logs = s.stop();
    assert!(logs.contains("new TLS files refused"), "{logs}");
    assert!(logs.contains("TLS certificate reloaded"), "{logs}");
}

fn start_err(extra: &[&str]) -> String {
    let state = tempfile::tempdir().expect("dir");
    match Server::try_start(&examples_dir(), state.path(), extra) {
        Ok(_) => panic!("started with {extra:?}"),
        Err(stderr) => stderr,
    }
}

#[test]
fn plaintext_off_the_loopback_is_refused_unless_chosen() {
    let err = start_err(&["--listen", "0.0.0.0:0"]);
    for choice in ["not a loopback address", "--tls-cert", "--behind-tls-proxy", "--insecure-http"] {
        assert!(err.contains(choice), "{err}");
    }
    let err = start_err(&["--listen", "0.0.0.0:0", "--behind-tls-proxy", "proxy.local"]);
    assert!(err.contains("not an IP address"), "{err}");
    let err = start_err(&["--tls-cert", "/nonexistent/tls.crt", "--tls-key", "/nonexistent/tls.key"]);
    assert!(err.contains("/nonexistent/tls.crt"), "{err}");

    // Development: allowed, and said loudly.
    let state = tempfile::tempdir().expect("dir");
    let mut s = Server::start(&examples_dir(), state.path(), &["--listen", "0.0.0.0:0", "--insecure-http"]);
    let port = s.base.rsplit(':').next().expect("port").to_string();
    assert_eq!(get(&format!("http://127.0.0.1:{port}/healthz")).status, 200);
    assert!(s.stop().contains("INSECURE"));
}

fn jwt_iss(jwt: &str) -> String {
    use base64::Engine;
    let payload = jwt.split('.').nth(1).expect("JWT");
    let claims: serde_json::Value =
        serde_json::from_slice(&base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(payload).expect("base64url"))
            .expect("JSON");
    claims["iss"].as_str().expect("iss").to_string()
}

fn metadata_issuer(base: &str, headers: &[(&str, &str)]) -> String {
    let r = common::raw("GET", &format!("{base}/.well-known/oauth-authorization-server"), headers, "");
    r.field("issuer")
}

#[test]
fn forwarded_scheme_is_honoured_from_the_trusted_proxy_only() {
    let forwarded = [("X-Forwarded-Proto", "https"), ("X-Forwarded-Host", "auth.example.com")];
    let state = tempfile::tempdir().expect("dir");
    // This test's requests come from 127.0.0.1: the proxy.
    let s = Server::start(&examples_dir(), state.path(), &["--listen", "0.0.0.0:0", "--behind-tls-proxy", "127.0.0.1"]);
    let port = s.base.rsplit(':').next().expect("port").to_string();
    let base = format!("http://127.0.0.1:{port}");
    assert_eq!(metadata_issuer(&base, &forwarded), "https://auth.example.com");
    let rfc7239 = [("Forwarded", "for=192.0.2.60;proto=https;host=id.example.com")];
    assert_eq!(metadata_issuer(&base, &rfc7239), "https://id.example.com");
    let token = common::post_form(
        &format!("{base}/oauth2/token"),
        Some(SHOP),
        &[("grant_type", "password"), ("username", "alice"), ("password", "alice-password")],
    );
    // (The token request carried no forwarded headers: the JWT names the unforwarded issuer.)
    assert_eq!(jwt_iss(&token.field("access_token")), format!("http://0.0.0.0:{port}"));
    let token = common::raw(
        "POST",
        &format!("{base}/oauth2/token"),
        &[
            ("Authorization", &common::basic(SHOP)),
            ("Content-Type", "application/x-www-form-urlencoded"),
            forwarded[0],
            forwarded[1],
        ],
        "grant_type=password&username=alice&password=alice-password",
    );
    let jwt = token.field("access_token");
    assert_eq!(jwt_iss(&jwt), "https://auth.example.com", "a token requested through the proxy names its issuer");
    let r = common::raw(
        "POST",
        &format!("{base}/oauth2/introspect"),
        &[
            ("Authorization", &common::basic(SHOP)),
            ("Content-Type", "application/x-www-form-urlencoded"),
            forwarded[0],
            forwarded[1],
        ],
        &format!("token={jwt}"),
    );
    assert_eq!(r.json()["iss"], "https://auth.example.com", "introspection follows the forwarded issuer");
    drop(s);

    // The same headers from an address that is not the proxy change nothing.
    let state = tempfile::tempdir().expect("dir");
    let s = Server::start(&examples_dir(), state.path(), &["--listen", "0.0.0.0:0", "--behind-tls-proxy", "10.9.9.9"]);
    let port = s.base.rsplit(':').next().expect("port").to_string();
    let issuer = metadata_issuer(&format!("http://127.0.0.1:{port}"), &forwarded);
    assert_eq!(issuer, format!("http://0.0.0.0:{port}"));
}

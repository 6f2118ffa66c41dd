//! A test certificate authority, and an HTTP/1.1 client over TLS that trusts only it: enough to drive the token
//! endpoint over real TLS and to see which certificate a connection got.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use rustls::pki_types::{CertificateDer, ServerName};
use rustls::{ClientConfig, ClientConnection, RootCertStore, StreamOwned};

use super::{Response, basic};

/// A CA made for one test.
pub struct TestCa {
    cert: rcgen::Certificate,
    issuer: rcgen::Issuer<'static, rcgen::KeyPair>,
}

impl TestCa {
    pub fn new(name: &str) -> Self {
        let key = rcgen::KeyPair::generate().expect("CA key");
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).expect("params");
        params.distinguished_name.push(rcgen::DnType::CommonName, name);
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        params.key_usages = vec![rcgen::KeyUsagePurpose::KeyCertSign, rcgen::KeyUsagePurpose::CrlSign];
        let cert = params.self_signed(&key).expect("CA cert");
        let issuer = rcgen::Issuer::new(params, key);
        Self { cert, issuer }
    }

    pub fn cert_der(&self) -> CertificateDer<'static> {
        self.cert.der().clone()
    }

    /// A server certificate for `localhost` and 127.0.0.1, as PEM (certificate followed by this CA: a chain), and
    /// its key.
    pub fn server_pair(&self, common_name: &str) -> (String, String) {
        let key = rcgen::KeyPair::generate().expect("server key");
        let mut params =
            rcgen::CertificateParams::new(vec!["localhost".to_string(), "127.0.0.1".to_string()]).expect("params");
        params.distinguished_name.push(rcgen::DnType::CommonName, common_name);
        let cert = params.signed_by(&key, &self.issuer).expect("server cert");
        (format!("{}{}", cert.pem(), self.cert.pem()), key.serialize_pem())
    }

    /// Writes a server pair into `dir` as `tls.crt`/`tls.key`; returns their paths.
    pub fn write_server_pair(&self, dir: &Path, common_name: &str) -> (PathBuf, PathBuf) {
        let (cert, key) = self.server_pair(common_name);
        let (cert_path, key_path) = (dir.join("tls.crt"), dir.join("tls.key"));
        std::fs::write(&cert_path, cert).expect("write cert");
        std::fs::write(&key_path, key).expect("write key");
        (cert_path, key_path)
    }

    /// A client configuration that trusts this CA and nothing else.
    pub fn client_config(&self) -> Arc<ClientConfig> {
        let mut roots = RootCertStore::empty();
        roots.add(self.cert_der()).expect("root");
        let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
        Arc::new(
            ClientConfig::builder_with_provider(provider)
                .with_safe_default_protocol_versions()
                .expect("versions")
                .with_root_certificates(roots)
                .with_no_client_auth(),
        )
    }
}

/// One keep-alive HTTPS connection.
pub struct TlsConnection {
    stream: StreamOwned<ClientConnection, TcpStream>,
    host: String,
}

impl TlsConnection {
    /// Connects to `base` (`https://127.0.0.1:port`) and completes the handshake.
    pub fn open(config: &Arc<ClientConfig>, base: &str) -> Result<Self, String> {
        let host = base.strip_prefix("https://").ok_or_else(|| format!("not an https URL: {base}"))?.to_string();
        let tcp = TcpStream::connect(&host).map_err(|e| e.to_string())?;
        tcp.set_read_timeout(Some(Duration::from_secs(30))).map_err(|e| e.to_string())?;
        let name = ServerName::try_from("localhost").map_err(|e| e.to_string())?;
        let conn = ClientConnection::new(config.clone(), name).map_err(|e| e.to_string())?;
        let mut stream = StreamOwned::new(conn, tcp);
        while stream.conn.is_handshaking() {
            stream.conn.complete_io(&mut stream.sock).map_err(|e| format!("handshake: {e}"))?;
        }
        Ok(Self { stream, host })
    }

    /// The end-entity certificate the server presented on this connection.
    pub fn server_cert(&self) -> Vec<u8> {
        self.stream.conn.peer_certificates().and_then(|c| c.first()).map(|c| c.to_vec()).unwrap_or_default()
    }

    pub fn protocol(&self) -> Option<rustls::ProtocolVersion> {
        self.stream.conn.protocol_version()
    }

    pub fn request(&mut self, method: &str, path: &str, headers: &[(&str, &str)], body: &str) -> Response {
        let mut head = format!("{method} {path} HTTP/1.1\r\nHost: {}\r\nContent-Length: {}\r\n", self.host, body.len());
        for (k, v) in headers {
            head.push_str(&format!("{k}: {v}\r\n"));
        }
        head.push_str("\r\n");
        self.stream.write_all(head.as_bytes()).expect("write head");
        self.stream.write_all(body.as_bytes()).expect("write body");
        self.stream.flush().expect("flush");
        read_response(&mut self.stream)
    }

    pub fn get(&mut self, path: &str) -> Response {
        self.request("GET", path, &[], "")
    }

    pub fn post_form(&mut self, path: &str, client: (&str, &str), params: &[(&str, &str)]) -> Response {
        let body: String = form_urlencoded::Serializer::new(String::new()).extend_pairs(params).finish();
        let auth = basic(client);
        self.request(
            "POST",
            path,
            &[("Authorization", &auth), ("Content-Type", "application/x-www-form-urlencoded")],
            &body,
        )
    }
}

/// Reads one response with a Content-Length body (every kubetoken response has one).
fn read_response(stream: &mut impl Read) -> Response {
    let mut buf = Vec::new();
    let mut byte = [0u8; 1];
    while !buf.ends_with(b"\r\n\r\n") {
        let n = stream.read(&mut byte).expect("read head");
        assert_eq!(n, 1, "connection closed before the response head ended: {:?}", String::from_utf8_lossy(&buf));
        buf.push(byte[0]);
    }
    let head = String::from_utf8(buf).expect("UTF-8 head");
    let mut lines = head.split("\r\n");
    let status: u16 = lines.next().and_then(|l| l.split(' ').nth(1)).and_then(|s| s.parse().ok()).expect("status");
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_string()))
        .collect();
    let len: usize = headers
        .iter()
        .find(|(k, _)| k == "content-length")
        .map(|(_, v)| v.parse().expect("length"))
        .expect("Content-Length");
    let mut body = vec![0; len];
    stream.read_exact(&mut body).expect("read body");
    Response { status, headers, body: String::from_utf8(body).expect("UTF-8 body") }
}

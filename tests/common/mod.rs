//! Test support for end-to-end tests: the real `kubetoken` binary over real HTTP.
#![allow(dead_code)] // each test binary uses a different part of this module

pub mod cluster;
pub mod issuer;
pub mod postgres;
pub mod rbac;
pub mod strict;
pub mod tls;

use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use base64::Engine;
use serde_json::Value;

pub const BIN: &str = env!("CARGO_BIN_EXE_kubetoken");
pub const SHOP: (&str, &str) = ("shop-app", "shop-secret-change-me");
pub const KIOSK: (&str, &str) = ("kiosk-app", "kiosk-secret-change-me");

/// The repository's example manifests (the README's first command serves these).
pub fn examples_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/standalone")
}

/// A running `kubetoken standalone`.
pub struct Server {
    child: Child,
    pub base: String,
    /// Everything the process printed on stdout before it listened (generated credentials, the address).
    pub banner: Vec<String>,
    stderr: Option<std::thread::JoinHandle<String>>,
}

impl Server {
    /// Starts the binary on a random port and waits until it listens.
    pub fn start(manifests: &Path, state_dir: &Path, extra: &[&str]) -> Server {
        Self::try_start(manifests, state_dir, extra).unwrap_or_else(|e| panic!("server did not start: {e}"))
    }

    /// Starts the binary; on failure returns what it printed on stderr.
    pub fn try_start(manifests: &Path, state_dir: &Path, extra: &[&str]) -> Result<Server, String> {
        Self::try_start_with_env(manifests, state_dir, extra, &[])
    }

    /// The same with these environment variables set.
    pub fn try_start_with_env(
        manifests: &Path,
        state_dir: &Path,
        extra: &[&str],
        env: &[(&str, &str)],
    ) -> Result<Server, String> {
        let mut child = Command::new(BIN)
            .envs(env.iter().copied())
            .arg("standalone")
            .arg("--manifests")
            .arg(manifests)
            .arg("--state-dir")
            .arg(state_dir)
            .args(if extra.contains(&"--listen") { &[][..] } else { &["--listen", "127.0.0.1:0"][..] })
            .args(extra)
            .env("KUBETOKEN_LOG", "info")
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn kubetoken");
        let stdout = child.stdout.take().expect("stdout");
        let mut stderr = child.stderr.take().expect("stderr");
        let stderr = std::thread::spawn(move || {
            let mut s = String::new();
            let _ = stderr.read_to_string(&mut s);
            s
        });
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            let mut lines = Vec::new();
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                let done = line.starts_with("kubetoken listening on ");
                lines.push(line);
                if done {
                    let _ = tx.send(lines.clone());
                }
            }
        });
        match rx.recv_timeout(Duration::from_secs(60)) {
            Ok(banner) => {
                let addr = banner.last().expect("line").trim_start_matches("kubetoken listening on ").to_string();
                Ok(Server { child, base: addr, banner, stderr: Some(stderr) })
            }
            Err(_) => {
                let _ = child.kill();
                let _ = child.wait();
                Err(stderr.join().unwrap_or_default())
            }
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{}", self.base, path)
    }

    /// SIGKILL: no chance to flush anything.
    pub fn kill9(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// SIGTERM and wait; returns stderr.
    pub fn stop(&mut self) -> String {
        let _ = Command::new("kill").arg("-TERM").arg(self.child.id().to_string()).status();
        let _ = self.child.wait();
        self.stderr.take().and_then(|h| h.join().ok()).unwrap_or_default()
    }

    /// Token endpoint, Basic auth.
    pub fn token(&self, client: (&str, &str), params: &[(&str, &str)]) -> Response {
        post_form(&self.url("/oauth2/token"), Some(client), params)
    }

    pub fn password(&self, user: &str, password: &str, scope: &str) -> Response {
        self.token(SHOP, &[("grant_type", "password"), ("username", user), ("password", password), ("scope", scope)])
    }

    pub fn introspect(&self, client: (&str, &str), token: &str) -> Value {
        let r = post_form(&self.url("/oauth2/introspect"), Some(client), &[("token", token)]);
        assert_eq!(r.status, 200, "introspection failed: {:?}", r.body);
        r.json()
    }

    pub fn active(&self, client: (&str, &str), token: &str) -> bool {
        self.introspect(client, token)["active"] == Value::Bool(true)
    }

    pub fn revoke(&self, client: (&str, &str), token: &str) -> Response {
        post_form(&self.url("/oauth2/revoke"), Some(client), &[("token", token)])
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[derive(Debug)]
pub struct Response {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: String,
}

impl Response {
    pub fn json(&self) -> Value {
        serde_json::from_str(&self.body).unwrap_or_else(|e| panic!("not JSON ({e}): {}", self.body))
    }

    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(k, _)| k.eq_ignore_ascii_case(name)).map(|(_, v)| v.as_str())
    }

    pub fn field(&self, name: &str) -> String {
        self.json()[name].as_str().unwrap_or_else(|| panic!("no {name} in {}", self.body)).to_string()
    }

    /// `error` of an RFC 6749 error body.
    pub fn error(&self) -> String {
        self.field("error")
    }
}

fn agent() -> ureq::Agent {
    ureq::AgentBuilder::new().timeout(Duration::from_secs(30)).build()
}

fn into_response(result: Result<ureq::Response, ureq::Error>) -> Response {
    let resp = match result {
        Ok(r) => r,
        Err(ureq::Error::Status(_, r)) => r,
        Err(e) => panic!("transport error: {e}"),
    };
    let headers =
        resp.headers_names().into_iter().filter_map(|n| resp.header(&n).map(|v| (n.clone(), v.to_string()))).collect();
    let status = resp.status();
    let body = resp.into_string().unwrap_or_default();
    Response { status, headers, body }
}

pub fn basic(client: (&str, &str)) -> String {
    let raw = format!("{}:{}", client.0, client.1);
    format!("Basic {}", base64::engine::general_purpose::STANDARD.encode(raw))
}

pub fn post_form(url: &str, client: Option<(&str, &str)>, params: &[(&str, &str)]) -> Response {
    let mut req = agent().post(url);
    if let Some(c) = client {
        req = req.set("Authorization", &basic(c));
    }
    into_response(req.send_form(params))
}

/// A request with full control over headers and body.
pub fn raw(method: &str, url: &str, headers: &[(&str, &str)], body: &str) -> Response {
    let mut req = agent().request(method, url);
    for (k, v) in headers {
        req = req.set(k, v);
    }
    into_response(req.send_string(body))
}

pub fn get(url: &str) -> Response {
    into_response(agent().get(url).call())
}

/// Like `post_form`, but returns `None` when the server cannot be reached (it was killed).
pub fn try_post_form(url: &str, client: (&str, &str), params: &[(&str, &str)]) -> Option<Response> {
    let req = ureq::AgentBuilder::new()
        .timeout(Duration::from_secs(10))
        .build()
        .post(url)
        .set("Authorization", &basic(client));
    match req.send_form(params) {
        Ok(r) => Some(into_response(Ok(r))),
        Err(ureq::Error::Status(c, r)) => Some(into_response(Err(ureq::Error::Status(c, r)))),
        Err(_) => None,
    }
}

/// A POST over a plain TCP stream that keeps going when the server answers before reading the whole body (as it
/// does for an oversized body): HTTP clients report the resulting broken pipe as a failure.
pub fn post_oversized(url: &str, headers: &[(&str, &str)], body: &str) -> Response {
    use std::io::Write;
    let rest = url.strip_prefix("http://").expect("http URL");
    let (host, path) = rest.split_once('/').map_or((rest, "/".to_string()), |(h, p)| (h, format!("/{p}")));
    let mut stream = std::net::TcpStream::connect(host).expect("connect");
    stream.set_read_timeout(Some(Duration::from_secs(30))).expect("timeout");
    let mut head =
        format!("POST {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\nContent-Length: {}\r\n", body.len());
    for (k, v) in headers {
        head.push_str(&format!("{k}: {v}\r\n"));
    }
    head.push_str("\r\n");
    // Write errors are expected once the server has answered and closed; the answer is still readable.
    let _ = stream.write_all(head.as_bytes()).and_then(|()| stream.write_all(body.as_bytes()));
    let mut raw = Vec::new();
    let _ = stream.read_to_end(&mut raw);
    let text = String::from_utf8_lossy(&raw).to_string();
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or_else(|| panic!("no HTTP response: {text:?}"));
    let mut lines = head.lines();
    let status = lines.next().and_then(|l| l.split(' ').nth(1)).and_then(|c| c.parse().ok()).expect("status line");
    let headers = lines.filter_map(|l| l.split_once(": ")).map(|(k, v)| (k.to_string(), v.to_string())).collect();
    Response { status, headers, body: body.to_string() }
}

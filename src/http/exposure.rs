//! Who may reach the token endpoint in plaintext, and which issuer a request sees.
//!
//! RFC 6749 §1.6 requires TLS for the token endpoint. Plain HTTP is served only on the loopback, unless the
//! operator says a TLS-terminating proxy sits in front (`--behind-tls-proxy`) or asks for it explicitly for
//! development (`--insecure-http`). Behind a trusted proxy, `X-Forwarded-Proto`/`-Host` and `Forwarded` shape the
//! default issuer; from anyone else those headers are ignored.

use std::borrow::Cow;
use std::net::{IpAddr, SocketAddr};

use axum::http::HeaderMap;
use axum::http::header::HOST;

/// The addresses (IPs or CIDR blocks) whose forwarded headers are believed.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct TrustedProxies(Vec<(IpAddr, u8)>);

impl TrustedProxies {
    /// `10.0.0.0/8,192.168.1.7,fd00::/8`.
    pub fn parse(list: &str) -> Result<Self, String> {
        let mut nets = Vec::new();
        for item in list.split(',').map(str::trim).filter(|s| !s.is_empty()) {
            let (ip, len) = match item.split_once('/') {
                Some((ip, len)) => (ip, Some(len)),
                None => (item, None),
            };
            let ip: IpAddr = ip.parse().map_err(|_| format!("{item:?} is not an IP address or CIDR block"))?;
            let max = if ip.is_ipv4() { 32 } else { 128 };
            let len = match len {
                None => max,
                Some(l) => l
                    .parse::<u8>()
                    .ok()
                    .filter(|l| *l <= max)
                    .ok_or_else(|| format!("{item:?}: the prefix length must be a number from 0 to {max}"))?,
            };
            nets.push((ip, len));
        }
        if nets.is_empty() {
            return Err("--behind-tls-proxy needs the proxy addresses (IPs or CIDR blocks, comma-separated)".into());
        }
        Ok(Self(nets))
    }

    pub fn contains(&self, ip: IpAddr) -> bool {
        // An IPv4 peer on a dual-stack socket arrives as ::ffff:a.b.c.d.
        let ip = match ip {
            IpAddr::V6(v6) => v6.to_ipv4_mapped().map(IpAddr::V4).unwrap_or(ip),
            v4 => v4,
        };
        self.0.iter().any(|(net, len)| match (net, ip) {
            (IpAddr::V4(n), IpAddr::V4(a)) => {
                let mask = u32::MAX.checked_shl(32 - u32::from(*len)).unwrap_or(0);
                u32::from(*n) & mask == u32::from(a) & mask
            }
            (IpAddr::V6(n), IpAddr::V6(a)) => {
                let mask = u128::MAX.checked_shl(128 - u32::from(*len)).unwrap_or(0);
                u128::from(*n) & mask == u128::from(a) & mask
            }
            _ => false,
        })
    }
}

/// How a port without TLS may be exposed.
#[derive(Debug, Clone, PartialEq)]
pub enum Plaintext {
    /// Only on the loopback (the default).
    LoopbackOnly,
    /// A TLS-terminating proxy at these addresses sits in front.
    BehindTlsProxy(TrustedProxies),
    /// Development: plaintext anywhere, logged loudly at every start.
    Insecure,
}

/// Refuses plaintext off the loopback unless the operator chose it, with a message naming the choices.
pub fn check_listen(listen: SocketAddr, tls: bool, plaintext: &Plaintext) -> Result<(), String> {
    if tls || listen.ip().is_loopback() {
        return Ok(());
    }
    match plaintext {
        Plaintext::LoopbackOnly => Err(format!(
            "refusing to serve tokens in plain HTTP on {listen}, which is not a loopback address: give \
             --tls-cert and --tls-key, or --behind-tls-proxy <proxy addresses> if a TLS-terminating proxy sits in \
             front, or --insecure-http for development only"
        )),
        Plaintext::BehindTlsProxy(_) => Ok(()),
        Plaintext::Insecure => {
            tracing::warn!(
                %listen,
                "INSECURE: serving tokens and accepting client secrets in plain HTTP off the loopback \
                 (--insecure-http); never do this outside development"
            );
            Ok(())
        }
    }
}

/// The issuer a request sees.
#[derive(Debug, Clone)]
pub struct IssuerPolicy {
    /// `--issuer`: always this, whatever the request says.
    configured: Option<String>,
    /// Otherwise: the scheme served and the bound address.
    default: String,
    proxies: Option<TrustedProxies>,
}

impl IssuerPolicy {
    pub fn new(configured: Option<String>, scheme: &str, local: SocketAddr, plaintext: &Plaintext) -> Self {
        let proxies = match plaintext {
            Plaintext::BehindTlsProxy(p) => Some(p.clone()),
            _ => None,
        };
        Self { configured, default: format!("{scheme}://{local}"), proxies }
    }

    /// The issuer of tokens and metadata when nothing is forwarded.
    pub fn base(&self) -> &str {
        self.configured.as_deref().unwrap_or(&self.default)
    }

    /// The issuer for a request from `peer`: a trusted proxy's forwarded scheme and host replace the defaults.
    pub fn for_request(&self, peer: Option<SocketAddr>, headers: &HeaderMap) -> Cow<'_, str> {
        if self.configured.is_some() {
            return Cow::Borrowed(self.base());
        }
        let (Some(proxies), Some(peer)) = (&self.proxies, peer) else { return Cow::Borrowed(self.base()) };
        if !proxies.contains(peer.ip()) {
            return Cow::Borrowed(self.base());
        }
        let forwarded = Forwarded::from_headers(headers);
        let Some(proto) = forwarded.proto else { return Cow::Borrowed(self.base()) };
        let host = forwarded.host.or_else(|| header(headers, HOST).filter(|h| valid_host(h)));
        match host {
            Some(host) => Cow::Owned(format!("{proto}://{host}")),
            None => Cow::Owned(format!("{proto}://{}", self.default.split_once("://").map_or("", |(_, h)| h))),
        }
    }
}

fn header(headers: &HeaderMap, name: impl axum::http::header::AsHeaderName) -> Option<&str> {
    headers.get(name).and_then(|v| v.to_str().ok()).map(str::trim)
}

/// A host and optional port, nothing that could smuggle a path, a user or another URL into the issuer.
fn valid_host(host: &str) -> bool {
    !host.is_empty()
        && host.len() <= 255
        && host.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b':' | b'[' | b']'))
}

#[derive(Default)]
struct Forwarded<'a> {
    proto: Option<&'static str>,
    host: Option<&'a str>,
}

impl<'a> Forwarded<'a> {
    /// RFC 7239 `Forwarded` (its first element: the one the client's proxy added), else the `X-Forwarded-*` pair.
    fn from_headers(headers: &'a HeaderMap) -> Self {
        let scheme = |s: &str| match s.trim_matches('"').to_ascii_lowercase().as_str() {
            "https" => Some("https"),
            "http" => Some("http"),
            _ => None,
        };
        if let Some(value) = header(headers, "forwarded") {
            let first = value.split(',').next().unwrap_or("");
            let mut f = Forwarded::default();
            for pair in first.split(';') {
                let Some((k, v)) = pair.split_once('=') else { continue };
                match k.trim().to_ascii_lowercase().as_str() {
                    "proto" => f.proto = scheme(v.trim()),
                    "host" => f.host = Some(v.trim().trim_matches('"')).filter(|h| valid_host(h)),
                    _ => {}
                }
            }
            if f.proto.is_some() {
                return f;
            }
        }
        let first = |name: &str| header(headers, name).and_then(|v| v.split(',').next()).map(str::trim);
        Forwarded {
            proto: first("x-forwarded-proto").and_then(scheme),
            host: first("x-forwarded-host").filter(|h| valid_host(h)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&'static str, &'static str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.insert(*k, v.parse().expect("value"));
        }
        h
    }

    #[test]
    fn cidr_blocks_match_their_addresses_only() {
        let p = TrustedProxies::parse("10.1.0.0/16, 192.168.1.7,fd00::/8").expect("parse");
        let ip = |s: &str| s.parse::<IpAddr>().expect("ip");
        assert!(p.contains(ip("10.1.200.3")));
        assert!(!p.contains(ip("10.2.0.1")));
        assert!(p.contains(ip("192.168.1.7")));
        assert!(!p.contains(ip("192.168.1.8")));
        assert!(p.contains(ip("fd12::1")));
        assert!(!p.contains(ip("fe80::1")));
        assert!(p.contains(ip("::ffff:10.1.0.9")), "IPv4-mapped peers match IPv4 blocks");
        assert!(TrustedProxies::parse("0.0.0.0/0").expect("all").contains(ip("8.8.8.8")));
        for bad in ["", "10.0.0.0/33", "proxy.local", "10.0.0.0/x"] {
            assert!(TrustedProxies::parse(bad).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn plaintext_off_the_loopback_needs_a_choice() {
        let any: SocketAddr = "0.0.0.0:8080".parse().expect("addr");
        let lo: SocketAddr = "127.0.0.1:8080".parse().expect("addr");
        let lo6: SocketAddr = "[::1]:8080".parse().expect("addr");
        let err = check_listen(any, false, &Plaintext::LoopbackOnly).expect_err("refused");
        for choice in ["--tls-cert", "--behind-tls-proxy", "--insecure-http", "0.0.0.0:8080"] {
            assert!(err.contains(choice), "{err}");
        }
        assert!(check_listen(lo, false, &Plaintext::LoopbackOnly).is_ok());
        assert!(check_listen(lo6, false, &Plaintext::LoopbackOnly).is_ok());
        assert!(check_listen(any, true, &Plaintext::LoopbackOnly).is_ok());
        assert!(check_listen(any, false, &Plaintext::Insecure).is_ok());
        let proxies = TrustedProxies::parse("10.0.0.1").expect("parse");
        assert!(check_listen(any, false, &Plaintext::BehindTlsProxy(proxies)).is_ok());
    }

    #[test]
    fn forwarded_scheme_and_host_count_only_from_a_trusted_proxy() {
        let local: SocketAddr = "10.0.0.5:8080".parse().expect("addr");
        let proxies = TrustedProxies::parse("10.0.0.1").expect("parse");
        let policy = IssuerPolicy::new(None, "http", local, &Plaintext::BehindTlsProxy(proxies.clone()));
        let proxy = Some("10.0.0.1:40000".parse().expect("addr"));
        let stranger = Some("10.0.0.9:40000".parse().expect("addr"));
        let h = headers(&[("x-forwarded-proto", "https"), ("x-forwarded-host", "auth.example.com")]);
        assert_eq!(policy.for_request(proxy, &h), "https://auth.example.com");
        assert_eq!(policy.for_request(stranger, &h), "http://10.0.0.5:8080");
        assert_eq!(policy.for_request(None, &h), "http://10.0.0.5:8080");

        let h = headers(&[("forwarded", "for=1.2.3.4;proto=https;host=\"id.example.com:8443\", proto=http")]);
        assert_eq!(policy.for_request(proxy, &h), "https://id.example.com:8443");
        let h = headers(&[("x-forwarded-proto", "https"), ("host", "svc.example.com")]);
        assert_eq!(policy.for_request(proxy, &h), "https://svc.example.com");
        // A host that would smuggle a path or user into the issuer is not used.
        let h = headers(&[("x-forwarded-proto", "https"), ("x-forwarded-host", "evil.com/x@y")]);
        assert_eq!(policy.for_request(proxy, &h), "https://10.0.0.5:8080");
        let h = headers(&[("x-forwarded-proto", "gopher")]);
        assert_eq!(policy.for_request(proxy, &h), "http://10.0.0.5:8080");

        // --issuer wins over anything forwarded.
        let fixed = IssuerPolicy::new(
            Some("https://login.example.com".into()),
            "http",
            local,
            &Plaintext::BehindTlsProxy(proxies),
        );
        let h = headers(&[("x-forwarded-proto", "http"), ("x-forwarded-host", "other.example.com")]);
        assert_eq!(fixed.for_request(proxy, &h), "https://login.example.com");
    }
}

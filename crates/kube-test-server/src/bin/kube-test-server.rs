//! Starts a kube-test-server, writes its kubeconfig, prints the kubeconfig path and URL, and runs until killed.
//!
//! Usage: `kube-test-server [--port PORT] [--kubeconfig PATH] [--service-address NAMESPACE/NAME=HOST:PORT]...`
//!
//! `--service-address` routes the calls of admission webhooks whose `clientConfig.service` is NAMESPACE/NAME to
//! HOST:PORT (see `KubeTestServer::set_service_address`); it can be repeated.
#![forbid(unsafe_code)]

use std::net::{SocketAddr, ToSocketAddrs};
use std::path::PathBuf;

fn main() {
    let mut port = 0u16;
    let mut kubeconfig: Option<PathBuf> = None;
    let mut services: Vec<(String, String, SocketAddr)> = Vec::new();
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--port" => port = args.next().and_then(|p| p.parse().ok()).unwrap_or_else(|| usage()),
            "--kubeconfig" => kubeconfig = Some(args.next().unwrap_or_else(|| usage()).into()),
            "--service-address" => {
                let spec = args.next().unwrap_or_else(|| usage());
                services.push(parse_service_address(&spec).unwrap_or_else(|e| {
                    eprintln!("kube-test-server: --service-address {spec}: {e}");
                    std::process::exit(2);
                }));
            }
            _ => usage(),
        }
    }
    let server = match kube_test_server::KubeTestServer::start_on(SocketAddr::from(([127, 0, 0, 1], port))) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("kube-test-server: cannot start: {e}");
            std::process::exit(1);
        }
    };
    for (namespace, name, addr) in &services {
        server.set_service_address(namespace, name, *addr);
    }
    let path = match kubeconfig {
        Some(path) => {
            if let Err(e) = std::fs::write(&path, server.kubeconfig_yaml()) {
                eprintln!("kube-test-server: cannot write {}: {e}", path.display());
                std::process::exit(1);
            }
            path
        }
        None => server.kubeconfig_path().to_path_buf(),
    };
    println!("kubeconfig: {}", path.display());
    println!("url: {}", server.url());
    println!("try: kubectl --kubeconfig {} get namespaces", path.display());
    loop {
        std::thread::park();
    }
}

/// `NAMESPACE/NAME=HOST:PORT`
fn parse_service_address(spec: &str) -> Result<(String, String, SocketAddr), String> {
    let (service, addr) = spec.split_once('=').ok_or("expected NAMESPACE/NAME=HOST:PORT")?;
    let (namespace, name) = service.split_once('/').ok_or("expected NAMESPACE/NAME before '='")?;
    if namespace.is_empty() || name.is_empty() {
        return Err("expected NAMESPACE/NAME before '='".into());
    }
    let addr = addr
        .to_socket_addrs()
        .map_err(|e| format!("{addr}: {e}"))?
        .next()
        .ok_or_else(|| format!("{addr}: no address"))?;
    Ok((namespace.to_string(), name.to_string(), addr))
}

fn usage() -> ! {
    eprintln!(
        "usage: kube-test-server [--port PORT] [--kubeconfig PATH] [--service-address NAMESPACE/NAME=HOST:PORT]..."
    );
    std::process::exit(2);
}

//! Starts a kube-test-server, writes its kubeconfig, prints the kubeconfig path and URL, and runs until killed.
//!
//! Usage: `kube-test-server [--port PORT] [--kubeconfig PATH]`
#![forbid(unsafe_code)]

use std::net::SocketAddr;
use std::path::PathBuf;

fn main() {
    let mut port = 0u16;
    let mut kubeconfig: Option<PathBuf> = None;
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--port" => port = args.next().and_then(|p| p.parse().ok()).unwrap_or_else(|| usage()),
            "--kubeconfig" => kubeconfig = Some(args.next().unwrap_or_else(|| usage()).into()),
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

fn usage() -> ! {
    eprintln!("usage: kube-test-server [--port PORT] [--kubeconfig PATH]");
    std::process::exit(2);
}

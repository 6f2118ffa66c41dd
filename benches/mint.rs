//! Micro-benchmark of the mint path, without HTTP or disk: `cargo bench --bench mint`.
//!
//! Reports, per algorithm, the cost of one JWT signature (`sign`) and of a whole client_credentials grant through
//! the core with an in-memory store (`grant`: client authentication, scope granting, supersession, claims, signing).
//! A plain timing loop (median of 7 rounds) keeps the dependency list short.

mod support;

use std::hint::black_box;
use std::sync::Arc;
use std::time::{Duration, Instant};

use kubetoken::core::service::Grant;
use kubetoken::core::signing::Algorithm;
use kubetoken::core::signing::SigningKey;
use kubetoken::core::store::MemoryStore;

fn median_per_op(rounds: usize, ops: u32, mut f: impl FnMut()) -> Duration {
    let mut samples: Vec<Duration> = (0..rounds)
        .map(|_| {
            let start = Instant::now();
            for _ in 0..ops {
                f();
            }
            start.elapsed() / ops
        })
        .collect();
    samples.sort();
    samples[rounds / 2]
}

fn main() {
    let quick = std::env::args().any(|a| a == "--quick");
    let runtime = tokio::runtime::Builder::new_current_thread().build().expect("runtime");
    println!("| algorithm | sign µs | grant µs | grants/s (one core) |");
    println!("|---|---|---|---|");
    for alg in [Algorithm::ES256, Algorithm::EdDSA, Algorithm::RS256] {
        let ops = match (alg, quick) {
            (_, true) => 20,
            (Algorithm::RS256, false) => 300,
            _ => 5000,
        };
        let key = Arc::new(SigningKey::from_pkcs8(alg, &SigningKey::generate_pkcs8(alg).expect("key")).expect("parse"));
        let claims = br#"{"iss":"http://127.0.0.1:8080","sub":"bench","aud":["bench"],"exp":1800003600,"iat":1800000000,"jti":"AAAAAAAAAAAAAAAAAAAAAA","client_id":"bench","scope":"orders:read"}"#;
        let sign = median_per_op(7, ops, || {
            black_box(key.sign_jwt(black_box(claims)).expect("sign"));
        });
        let service = support::client_credentials_service(key, Arc::new(MemoryStore::default()));
        let creds = support::credentials();
        let grant = median_per_op(7, ops, || {
            let g = Grant::ClientCredentials { scope: Some("orders:read".into()) };
            black_box(runtime.block_on(service.token(&creds, g)).expect("token"));
        });
        println!(
            "| {} | {:.1} | {:.1} | {:.0} |",
            alg.as_str(),
            sign.as_secs_f64() * 1e6,
            grant.as_secs_f64() * 1e6,
            1.0 / grant.as_secs_f64()
        );
    }
}

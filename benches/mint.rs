//! Micro-benchmark of the mint path, without HTTP or disk: `cargo bench --bench mint`.
//!
//! Reports, per algorithm, the cost of one JWT signature (`sign`) and of a whole client_credentials grant through
//! the core with an in-memory store (`grant`: client authentication, scope granting, supersession, claims, signing).
//! Then, per identity-provider algorithm, the cost of checking a trusted issuer's JWT (`verify`: signature, claims)
//! and of a whole JWT-bearer grant through the core (`grant`: the check, replay memory, a per-device key, an ES256
//! token), each with an assertion of its own.
//! A plain timing loop (median of 7 rounds) keeps the dependency list short.

mod support;

use std::hint::black_box;
use std::sync::Arc;
use std::time::{Duration, Instant};

use kubetoken::core::assertion::{KeySource, TrustedIssuer, parse_key_set};
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
    federated(&runtime, quick);
}

/// JWT bearer: an identity provider signing with `idp_alg`, the application signing ES256.
fn federated(runtime: &tokio::runtime::Runtime, quick: bool) {
    println!();
    println!("| identity provider's algorithm | verify µs | jwt-bearer grant µs | grants/s (one core) |");
    println!("|---|---|---|---|");
    for idp_alg in [Algorithm::ES256, Algorithm::RS256] {
        let ops: u32 = if quick { 20 } else { 2000 };
        let idp = SigningKey::from_pkcs8(idp_alg, &SigningKey::generate_pkcs8(idp_alg).expect("key")).expect("parse");
        let set = serde_json::json!({"keys": [idp.public_jwk()]}).to_string();
        let issuer = TrustedIssuer {
            issuer: "https://idp.bench/realms/shop".into(),
            keys: KeySource::Fixed(Arc::new(parse_key_set(set.as_bytes()).expect("set"))),
            audiences: vec!["shop".into()],
            username_claim: "preferred_username".into(),
            roles_claim: Some("realm_access.roles".into()),
            allowed_algorithms: vec![jsonwebtoken::Algorithm::ES256, jsonwebtoken::Algorithm::RS256],
            max_assertion_age: 3600,
        };
        let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).expect("clock").as_secs();
        // One assertion per grant (each is one grant), for 1,000 users; signed before the clock starts.
        let mut assertions: Vec<String> = (0..ops * 8)
            .map(|n| {
                let claims = serde_json::json!({
                    "iss": issuer.issuer, "aud": "shop", "preferred_username": format!("user{}", n % 1000),
                    "realm_access": {"roles": ["customer"]}, "iat": now, "exp": now + 300, "jti": format!("j{n}"),
                });
                idp.sign_jwt(&serde_json::to_vec(&claims).expect("json")).expect("sign")
            })
            .collect();
        let KeySource::Fixed(keys) = &issuer.keys else { unreachable!() };
        let verify = median_per_op(7, ops / 2, || {
            let token = assertions.last().expect("assertion");
            black_box(kubetoken::core::assertion::verify(black_box(token), &issuer, keys, now).expect("verify"));
        });
        let signer = Arc::new(
            SigningKey::from_pkcs8(Algorithm::ES256, &SigningKey::generate_pkcs8(Algorithm::ES256).expect("key"))
                .expect("parse"),
        );
        let service = support::federated_service(signer, issuer.clone(), Arc::new(MemoryStore::default()));
        let creds = support::credentials();
        let grant = median_per_op(7, ops, || {
            let assertion = assertions.pop().expect("an assertion per grant");
            let g = Grant::JwtBearer { assertion, scope: Some("device_ipad orders:read".into()) };
            black_box(runtime.block_on(service.token(&creds, g)).expect("token"));
        });
        println!(
            "| {} | {:.1} | {:.1} | {:.0} |",
            idp_alg.as_str(),
            verify.as_secs_f64() * 1e6,
            grant.as_secs_f64() * 1e6,
            1.0 / grant.as_secs_f64()
        );
    }
}

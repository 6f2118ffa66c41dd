//! Which JWT code kubetoken uses, measured: `cargo bench --bench jwt` (`-- --smoke`: a few iterations, checks only).
//!
//! Signing: kubetoken's pre-parsed aws-lc-rs key (`SigningKey::sign_jwt`) against `jsonwebtoken::encode`, with the
//! `EncodingKey` built per token (as a naive use would) and built once. `encode` parses the PKCS#8 key on every call
//! whichever way the `EncodingKey` is held (`EncodingKey` holds the DER bytes; the signer is made per call), which
//! is why signing stays pre-parsed. Verifying: the hand-written aws-lc-rs check introspection used before (kept here
//! only for comparison) against `SigningKey::verify_jwt`, which is `jsonwebtoken::decode` with a `DecodingKey` built
//! once per key. Every path includes serializing or parsing the claims, as the service does. Both crates run on the
//! same aws-lc-rs, so the difference is the code around the signature. Re-run when `jsonwebtoken` changes.
//! A plain timing loop like `benches/mint.rs`: the median of 15 rounds, the compared cases interleaved in each.

use std::hint::black_box;
use std::time::{Duration, Instant};

use aws_lc_rs::signature::{self, EcdsaKeyPair, Ed25519KeyPair, KeyPair, RsaKeyPair};
use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use jsonwebtoken::{EncodingKey, Header};
use kubetoken::core::signing::{Algorithm, SigningKey};
use serde::Deserialize;
use serde_json::json;

/// Operations per round, and one operation.
type Case<'a> = (u32, Box<dyn FnMut() + 'a>);

/// The median time per operation of each case, over `rounds` rounds that run every case in turn: on a shared,
/// noisy machine a burst of load then falls on all the compared cases alike rather than on one of them.
fn interleaved_medians(rounds: usize, cases: &mut [Case<'_>]) -> Vec<Duration> {
    let mut samples = vec![Vec::with_capacity(rounds); cases.len()];
    for _ in 0..rounds {
        for ((ops, f), samples) in cases.iter_mut().zip(&mut samples) {
            let start = Instant::now();
            for _ in 0..*ops {
                f();
            }
            samples.push(start.elapsed() / *ops);
        }
    }
    samples
        .into_iter()
        .map(|mut s| {
            s.sort();
            s[rounds / 2]
        })
        .collect()
}

#[derive(Deserialize)]
struct Jti {
    jti: String,
}

/// The verification introspection did before `jsonwebtoken`: the exact header segment, then the signature.
struct HandWritten {
    header_b64: String,
    public_key: Vec<u8>,
    alg: &'static dyn signature::VerificationAlgorithm,
}

impl HandWritten {
    fn new(alg: Algorithm, der: &[u8], header_b64: &str) -> Self {
        let (public_key, alg): (Vec<u8>, &'static dyn signature::VerificationAlgorithm) = match alg {
            Algorithm::ES256 => (
                EcdsaKeyPair::from_pkcs8(&signature::ECDSA_P256_SHA256_FIXED_SIGNING, der)
                    .expect("es256")
                    .public_key()
                    .as_ref()
                    .to_vec(),
                &signature::ECDSA_P256_SHA256_FIXED,
            ),
            Algorithm::RS256 => (
                RsaKeyPair::from_pkcs8(der).expect("rs256").public_key().as_ref().to_vec(),
                &signature::RSA_PKCS1_2048_8192_SHA256,
            ),
            Algorithm::EdDSA => (
                Ed25519KeyPair::from_pkcs8_maybe_unchecked(der).expect("eddsa").public_key().as_ref().to_vec(),
                &signature::ED25519,
            ),
        };
        Self { header_b64: header_b64.to_string(), public_key, alg }
    }

    fn verify(&self, token: &str) -> Option<Jti> {
        let (signed, sig_b64) = token.rsplit_once('.')?;
        let (header, payload) = signed.split_once('.')?;
        if header != self.header_b64 {
            return None;
        }
        let sig = URL_SAFE_NO_PAD.decode(sig_b64).ok()?;
        signature::UnparsedPublicKey::new(self.alg, &self.public_key).verify(signed.as_bytes(), &sig).ok()?;
        serde_json::from_slice(&URL_SAFE_NO_PAD.decode(payload).ok()?).ok()
    }
}

/// One DER element at the start of `der`: (tag, contents, the rest).
fn der_element(der: &[u8]) -> (u8, &[u8], &[u8]) {
    let (tag, first) = (der[0], der[1]);
    let (len, header) = if first < 0x80 {
        (first as usize, 2)
    } else {
        let n = (first & 0x7f) as usize;
        (der[2..2 + n].iter().fold(0usize, |acc, b| acc << 8 | *b as usize), 2 + n)
    };
    (tag, &der[header..header + len], &der[header + len..])
}

/// The PKCS#1 `RSAPrivateKey` inside a PKCS#8 `PrivateKeyInfo`: jsonwebtoken's aws-lc RS256 signer takes only
/// PKCS#1 DER, kubetoken stores PKCS#8.
fn pkcs1_of(pkcs8: &[u8]) -> Vec<u8> {
    let (_, info, _) = der_element(pkcs8);
    let (_, _version, rest) = der_element(info);
    let (_, _algorithm, rest) = der_element(rest);
    let (tag, private_key, _) = der_element(rest);
    assert_eq!(tag, 0x04, "OCTET STRING");
    private_key.to_vec()
}

/// What a naive caller holding kubetoken's key bytes would build.
fn encoding_key(alg: Algorithm, der: &[u8]) -> EncodingKey {
    match alg {
        Algorithm::ES256 => EncodingKey::from_ec_der(der),
        Algorithm::RS256 => EncodingKey::from_rsa_der(der),
        Algorithm::EdDSA => EncodingKey::from_ed_der(der),
    }
}

fn jwt_alg(alg: Algorithm) -> jsonwebtoken::Algorithm {
    match alg {
        Algorithm::ES256 => jsonwebtoken::Algorithm::ES256,
        Algorithm::RS256 => jsonwebtoken::Algorithm::RS256,
        Algorithm::EdDSA => jsonwebtoken::Algorithm::EdDSA,
    }
}

fn main() {
    let smoke = std::env::args().any(|a| a == "--smoke");
    let claims = json!({
        "iss": "http://127.0.0.1:8080", "sub": "bench", "aud": ["bench"], "exp": 1800003600, "iat": 1800000000,
        "jti": "AAAAAAAAAAAAAAAAAAAAAA", "client_id": "bench", "scope": "orders:read",
    });
    if !smoke {
        println!(
            "| algorithm | sign, pre-parsed ns | encode, key per token ns | encode, key once ns | verify, hand-written ns | verify, jsonwebtoken ns |"
        );
        println!("|---|---|---|---|---|---|");
    }
    for alg in [Algorithm::ES256, Algorithm::RS256, Algorithm::EdDSA] {
        let ops = match (alg, smoke) {
            (_, true) => 3,
            (Algorithm::RS256, false) => 100,
            _ => 1000,
        };
        let rounds = if smoke { 1 } else { 15 };
        let der = SigningKey::generate_pkcs8(alg).expect("key");
        let key = SigningKey::from_pkcs8(alg, &der).expect("parse");
        let hand_written = HandWritten::new(alg, &der, key.header_b64());
        let mut header = Header::new(jwt_alg(alg));
        header.kid = Some(key.kid().to_string());
        header.typ = Some("at+jwt".into());
        let key_bytes = if alg == Algorithm::RS256 { pkcs1_of(&der) } else { der.clone() };
        let once = encoding_key(alg, &key_bytes);

        // Every signer's token verifies with jsonwebtoken, and kubetoken's also with the hand-written check (which
        // wants kubetoken's exact header bytes; jsonwebtoken orders the header's members differently). A tampered
        // token verifies with neither.
        let tokens = [
            key.sign_jwt(&serde_json::to_vec(&claims).expect("claims")).expect("sign"),
            jsonwebtoken::encode(&header, &claims, &encoding_key(alg, &key_bytes)).expect("encode"),
            jsonwebtoken::encode(&header, &claims, &once).expect("encode"),
        ];
        assert_eq!(hand_written.verify(&tokens[0]).expect("hand-written").jti, "AAAAAAAAAAAAAAAAAAAAAA", "{alg:?}");
        for token in &tokens {
            assert_eq!(key.verify_jwt::<Jti>(token).expect("jsonwebtoken").jti, "AAAAAAAAAAAAAAAAAAAAAA", "{alg:?}");
            let (signed, _) = token.rsplit_once('.').expect("signature");
            let tampered = format!("{signed}.{}", URL_SAFE_NO_PAD.encode([0u8; 64]));
            assert!(hand_written.verify(&tampered).is_none() && key.verify_jwt::<Jti>(&tampered).is_none());
        }

        let token = &tokens[0];
        let verify_ops = if smoke { 3 } else { 1000 };
        let medians = interleaved_medians(
            rounds,
            &mut [
                (
                    ops,
                    Box::new(|| {
                        let json = serde_json::to_vec(black_box(&claims)).expect("claims");
                        black_box(key.sign_jwt(&json).expect("sign"));
                    }),
                ),
                (
                    ops,
                    Box::new(|| {
                        let k = encoding_key(alg, black_box(&key_bytes));
                        black_box(jsonwebtoken::encode(&header, black_box(&claims), &k).expect("encode"));
                    }),
                ),
                (
                    ops,
                    Box::new(|| {
                        black_box(jsonwebtoken::encode(&header, black_box(&claims), &once).expect("encode"));
                    }),
                ),
                (
                    verify_ops,
                    Box::new(|| {
                        black_box(hand_written.verify(black_box(token)).expect("verify"));
                    }),
                ),
                (
                    verify_ops,
                    Box::new(|| {
                        black_box(key.verify_jwt::<Jti>(black_box(token)).expect("verify"));
                    }),
                ),
            ],
        );
        if !smoke {
            let ns: Vec<String> = medians.iter().map(|d| d.as_nanos().to_string()).collect();
            println!("| {} | {} |", alg.as_str(), ns.join(" | "));
        }
    }
    if smoke {
        println!("smoke: every token verified, every tampered one rejected (no timings)");
    }
}

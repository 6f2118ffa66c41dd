//! A trusted issuer's assertions (jwt-bearer `assertion`, token-exchange `subject_token`) as the token endpoint checks
//! them (`core::assertion::{peek_issuer, verify}`), on arbitrary input: no panic; text the fuzzer makes never verifies
//! (it has no private key); and arbitrary bytes signed by the issuer's key as claims verify only into what they say.
#![no_main]

use std::sync::{Arc, OnceLock};

use kubetoken::core::assertion::{KeySource, TrustedIssuer, parse_algorithm, parse_key_set, peek_issuer, verify};
use kubetoken::core::signing::{Algorithm, SigningKey};
use libfuzzer_sys::fuzz_target;
use serde_json::Value;

const NOW: u64 = 1_800_000_000;

fn setup() -> &'static (SigningKey, TrustedIssuer) {
    static SETUP: OnceLock<(SigningKey, TrustedIssuer)> = OnceLock::new();
    SETUP.get_or_init(|| {
        let der = SigningKey::generate_pkcs8(Algorithm::ES256).expect("generate");
        let key = SigningKey::from_pkcs8(Algorithm::ES256, &der).expect("parse");
        let set = serde_json::json!({"keys": [key.public_jwk()]}).to_string();
        let issuer = TrustedIssuer {
            issuer: "https://idp.test".into(),
            keys: KeySource::Fixed(Arc::new(parse_key_set(set.as_bytes()).expect("set"))),
            audiences: vec!["shop".into()],
            username_claim: "preferred_username".into(),
            roles_claim: Some("realm_access.roles".into()),
            allowed_algorithms: vec![parse_algorithm("ES256").expect("alg"), parse_algorithm("RS256").expect("alg")],
            max_assertion_age: 3600,
        };
        (key, issuer)
    })
}

fuzz_target!(|data: &[u8]| {
    let (key, issuer) = setup();
    let KeySource::Fixed(set) = &issuer.keys else { return };
    let Some((&first, rest)) = data.split_first() else { return };
    if let Ok(text) = std::str::from_utf8(rest) {
        let _ = peek_issuer(text);
        // The key's own header in front lets the fuzzer reach payload and signature decoding.
        let token = if first % 2 == 0 { format!("{}.{text}", key.header_b64()) } else { text.to_string() };
        assert!(verify(&token, issuer, set, NOW).is_err(), "a forged assertion verified: {token:?}");
    }
    // Whatever the issuer signs verifies only into what it says, or is refused.
    let signed = key.sign_jwt(rest).expect("sign");
    if let Ok(v) = verify(&signed, issuer, set, NOW) {
        let claims: Value = serde_json::from_slice(rest).expect("verified claims are JSON");
        assert_eq!(claims["preferred_username"].as_str(), Some(v.subject.as_str()));
        assert_eq!(claims["iss"].as_str(), Some("https://idp.test"));
        assert!(v.expires_at > NOW);
    }
});

//! JWT verification as introspection does it: the header segment picks the key (`header_b64`), `verify_jwt`
//! checks the signature and decodes the claims, the `jti` is parsed (`JtiOnly`, `TokenId::from_b64`). The key is
//! generated once per process. Inputs starting with an even byte get the key's own header segment in front, so the
//! fuzzer reaches the payload and signature decoding. The input is also signed as claims: whatever verifies must be
//! exactly the claims signed, and a `{"jti": ...}` object made from the input always verifies back.
#![no_main]

use std::sync::OnceLock;

use kubetoken::core::model::TokenId;
use kubetoken::core::signing::{Algorithm, SigningKey};
use kubetoken::core::tokens::JtiOnly;
use libfuzzer_sys::fuzz_target;
use serde_json::Value;

fn key() -> &'static SigningKey {
    static KEY: OnceLock<SigningKey> = OnceLock::new();
    KEY.get_or_init(|| {
        let der = SigningKey::generate_pkcs8(Algorithm::ES256).expect("generate");
        SigningKey::from_pkcs8(Algorithm::ES256, &der).expect("parse")
    })
}

/// What `TokenService::locate` does with a token containing a dot.
fn introspect(key: &SigningKey, token: &str) -> Option<TokenId> {
    let header = token.split('.').next()?;
    if header != key.header_b64() {
        return None;
    }
    let claims: JtiOnly = key.verify_jwt(token)?;
    TokenId::from_b64(&claims.jti)
}

fuzz_target!(|data: &[u8]| {
    let key = key();
    let Some((&first, rest)) = data.split_first() else { return };
    if let Ok(s) = std::str::from_utf8(rest) {
        let token = if first % 2 == 0 { format!("{}.{s}", key.header_b64()) } else { s.to_string() };
        // Without the private key the fuzzer cannot make a valid signature.
        assert_eq!(key.verify_jwt::<Value>(&token), None, "a forged token verified: {token:?}");
        assert_eq!(introspect(key, &token), None);
        // Claims kubetoken could have signed: a jti of any text verifies back to itself.
        let claims = serde_json::to_vec(&serde_json::json!({ "jti": s })).expect("json");
        let signed = key.sign_jwt(&claims).expect("sign");
        let back: Option<JtiOnly> = key.verify_jwt(&signed);
        assert_eq!(back.map(|c| c.jti).as_deref(), Some(s), "a signed jti verifies to itself");
        assert_eq!(introspect(key, &signed), TokenId::from_b64(s));
    }
    // Arbitrary bytes signed as claims: if they verify at all, they are exactly what was signed.
    let token = key.sign_jwt(rest).expect("sign");
    if let Some(claims) = key.verify_jwt::<Value>(&token) {
        assert_eq!(Some(claims), serde_json::from_slice::<Value>(rest).ok(), "verified claims differ from the signed");
    }
});

//! JWT signing keys (AWS-LC). A key is parsed once when loaded; signing a token never re-parses key material
//! (RSA key parsing alone costs more than a signature).

use aws_lc_rs::encoding::AsDer;
use aws_lc_rs::rand::SystemRandom;
use aws_lc_rs::signature::{self, EcdsaKeyPair, Ed25519KeyPair, KeyPair, RsaKeyPair};
use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use serde_json::{Value, json};

#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error("{alg} key rejected: {reason}")]
    Rejected { alg: &'static str, reason: String },
    #[error("could not generate a {0} key")]
    Generate(&'static str),
}

#[derive(Debug, thiserror::Error)]
#[error("signing failed")]
pub struct SignError;

/// The JWS algorithms kubetoken signs with.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Algorithm {
    ES256,
    RS256,
    EdDSA,
}

impl Algorithm {
    /// The JWS `alg` name.
    pub fn as_str(self) -> &'static str {
        match self {
            Algorithm::ES256 => "ES256",
            Algorithm::RS256 => "RS256",
            Algorithm::EdDSA => "EdDSA",
        }
    }
}

enum KeyPairKind {
    Es256(EcdsaKeyPair),
    Rs256(RsaKeyPair),
    EdDsa(Ed25519KeyPair),
}

/// A parsed private key, ready to sign, with its public half as a JWK.
pub struct SigningKey {
    alg: Algorithm,
    kid: String,
    /// base64url of this key's JWT header, which is the same for every token it signs.
    header_b64: String,
    pair: KeyPairKind,
    public_jwk: Value,
    rng: SystemRandom,
}

impl std::fmt::Debug for SigningKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SigningKey").field("alg", &self.alg).field("kid", &self.kid).finish_non_exhaustive()
    }
}

fn b64(bytes: &[u8]) -> String {
    URL_SAFE_NO_PAD.encode(bytes)
}

/// RFC 7638 JWK thumbprint of the required members, in lexicographic order.
fn thumbprint(required_members: &Value) -> String {
    let canonical = required_members.to_string(); // serde_json sorts object keys (no preserve_order feature)
    b64(aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, canonical.as_bytes()).as_ref())
}

impl SigningKey {
    /// Generates a new private key, as PKCS#8 DER.
    pub fn generate_pkcs8(alg: Algorithm) -> Result<Vec<u8>, KeyError> {
        let rng = SystemRandom::new();
        match alg {
            Algorithm::ES256 => EcdsaKeyPair::generate_pkcs8(&signature::ECDSA_P256_SHA256_FIXED_SIGNING, &rng)
                .map(|d| d.as_ref().to_vec())
                .map_err(|_| KeyError::Generate("ES256")),
            Algorithm::EdDSA => Ed25519KeyPair::generate_pkcs8(&rng)
                .map(|d| d.as_ref().to_vec())
                .map_err(|_| KeyError::Generate("EdDSA")),
            Algorithm::RS256 => {
                let key =
                    RsaKeyPair::generate(aws_lc_rs::rsa::KeySize::Rsa2048).map_err(|_| KeyError::Generate("RS256"))?;
                let der: aws_lc_rs::encoding::Pkcs8V1Der<'static> =
                    key.as_der().map_err(|_| KeyError::Generate("RS256"))?;
                Ok(der.as_ref().to_vec())
            }
        }
    }

    /// Parses a PKCS#8 DER private key for `alg`.
    pub fn from_pkcs8(alg: Algorithm, der: &[u8]) -> Result<Self, KeyError> {
        let rng = SystemRandom::new();
        let rejected =
            |e: aws_lc_rs::error::KeyRejected| KeyError::Rejected { alg: alg.as_str(), reason: e.to_string() };
        let (pair, required) = match alg {
            Algorithm::ES256 => {
                let pair =
                    EcdsaKeyPair::from_pkcs8(&signature::ECDSA_P256_SHA256_FIXED_SIGNING, der).map_err(rejected)?;
                // Uncompressed point: 0x04 || x (32 bytes) || y (32 bytes).
                let point = pair.public_key().as_ref();
                let required = json!({"crv": "P-256", "kty": "EC", "x": b64(&point[1..33]), "y": b64(&point[33..65])});
                (KeyPairKind::Es256(pair), required)
            }
            Algorithm::RS256 => {
                let pair = RsaKeyPair::from_pkcs8(der).map_err(rejected)?;
                let public = pair.public_key();
                let required = json!({
                    "e": b64(public.exponent().big_endian_without_leading_zero()),
                    "kty": "RSA",
                    "n": b64(public.modulus().big_endian_without_leading_zero()),
                });
                (KeyPairKind::Rs256(pair), required)
            }
            Algorithm::EdDSA => {
                let pair = Ed25519KeyPair::from_pkcs8_maybe_unchecked(der).map_err(rejected)?;
                let required = json!({"crv": "Ed25519", "kty": "OKP", "x": b64(pair.public_key().as_ref())});
                (KeyPairKind::EdDsa(pair), required)
            }
        };
        let kid = thumbprint(&required);
        let mut public_jwk = required;
        if let Value::Object(m) = &mut public_jwk {
            m.insert("kid".into(), Value::String(kid.clone()));
            m.insert("alg".into(), Value::String(alg.as_str().into()));
            m.insert("use".into(), Value::String("sig".into()));
        }
        let header = json!({"alg": alg.as_str(), "kid": kid, "typ": "at+jwt"});
        Ok(Self { alg, header_b64: b64(header.to_string().as_bytes()), kid, pair, public_jwk, rng })
    }

    pub fn kid(&self) -> &str {
        &self.kid
    }

    /// The public key as a JWK (`kty`, `kid`, `alg`, `use` and the public parameters only).
    pub fn public_jwk(&self) -> &Value {
        &self.public_jwk
    }

    /// Signs `claims` (a JSON object) into a compact JWS with header `{alg, kid, typ: at+jwt}`.
    pub fn sign_jwt(&self, claims_json: &[u8]) -> Result<String, SignError> {
        let mut out = String::with_capacity(self.header_b64.len() + claims_json.len() * 4 / 3 + 360);
        out.push_str(&self.header_b64);
        out.push('.');
        URL_SAFE_NO_PAD.encode_string(claims_json, &mut out);
        let sig = match &self.pair {
            KeyPairKind::Es256(k) => k.sign(&self.rng, out.as_bytes()).map_err(|_| SignError)?.as_ref().to_vec(),
            KeyPairKind::EdDsa(k) => k.sign(out.as_bytes()).as_ref().to_vec(),
            KeyPairKind::Rs256(k) => {
                let mut sig = vec![0u8; k.public_modulus_len()];
                k.sign(&signature::RSA_PKCS1_SHA256, &self.rng, out.as_bytes(), &mut sig).map_err(|_| SignError)?;
                sig
            }
        };
        out.push('.');
        URL_SAFE_NO_PAD.encode_string(sig, &mut out);
        Ok(out)
    }

    /// Verifies a compact JWS made by [`Self::sign_jwt`] with this key; returns the decoded claims bytes.
    pub fn verify_jwt(&self, token: &str) -> Option<Vec<u8>> {
        let (signed, sig_b64) = token.rsplit_once('.')?;
        let (header, payload) = signed.split_once('.')?;
        if header != self.header_b64 {
            return None;
        }
        let sig = URL_SAFE_NO_PAD.decode(sig_b64).ok()?;
        let verified = match &self.pair {
            KeyPairKind::Es256(k) => {
                signature::UnparsedPublicKey::new(&signature::ECDSA_P256_SHA256_FIXED, k.public_key().as_ref())
                    .verify(signed.as_bytes(), &sig)
            }
            KeyPairKind::EdDsa(k) => signature::UnparsedPublicKey::new(&signature::ED25519, k.public_key().as_ref())
                .verify(signed.as_bytes(), &sig),
            KeyPairKind::Rs256(k) => {
                signature::UnparsedPublicKey::new(&signature::RSA_PKCS1_2048_8192_SHA256, k.public_key().as_ref())
                    .verify(signed.as_bytes(), &sig)
            }
        };
        verified.ok()?;
        URL_SAFE_NO_PAD.decode(payload).ok()
    }

    /// The header segment, used to route a JWT to the key that signed it.
    pub fn header_b64(&self) -> &str {
        &self.header_b64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_algorithm_signs_and_verifies_and_rejects_tampering() {
        for alg in [Algorithm::ES256, Algorithm::EdDSA, Algorithm::RS256] {
            let der = SigningKey::generate_pkcs8(alg).expect("generate");
            let key = SigningKey::from_pkcs8(alg, &der).expect("parse");
            let token = key.sign_jwt(br#"{"sub":"alice"}"#).expect("sign");
            assert_eq!(key.verify_jwt(&token).as_deref(), Some(&br#"{"sub":"alice"}"#[..]));
            let tampered = token.replacen(
                &URL_SAFE_NO_PAD.encode(br#"{"sub":"alice"}"#),
                &URL_SAFE_NO_PAD.encode(br#"{"sub":"mallory"}"#),
                1,
            );
            assert_eq!(key.verify_jwt(&tampered), None, "{alg:?}");
            assert_eq!(key.public_jwk()["kid"], key.kid());
            assert!(key.public_jwk().get("d").is_none(), "public JWK must not carry private parts");
        }
    }

    #[test]
    fn kid_is_stable_for_the_same_key_and_differs_between_keys() {
        let der = SigningKey::generate_pkcs8(Algorithm::ES256).expect("generate");
        let a = SigningKey::from_pkcs8(Algorithm::ES256, &der).expect("parse");
        let b = SigningKey::from_pkcs8(Algorithm::ES256, &der).expect("parse");
        let other = SigningKey::generate_pkcs8(Algorithm::ES256).expect("generate");
        let c = SigningKey::from_pkcs8(Algorithm::ES256, &other).expect("parse");
        assert_eq!(a.kid(), b.kid());
        assert_ne!(a.kid(), c.kid());
    }

    #[test]
    fn key_of_the_wrong_algorithm_is_rejected() {
        let der = SigningKey::generate_pkcs8(Algorithm::EdDSA).expect("generate");
        assert!(SigningKey::from_pkcs8(Algorithm::ES256, &der).is_err());
        assert!(SigningKey::from_pkcs8(Algorithm::RS256, b"garbage").is_err());
    }
}

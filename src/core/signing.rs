//! JWT signing keys (AWS-LC). A key is parsed once when loaded; signing a token never re-parses key material
//! (RSA key parsing alone costs more than a signature, and `jsonwebtoken::encode` would parse it per token:
//! `benches/jwt.rs` measures both). Verification and the published JWKs are `jsonwebtoken`'s, on the same AWS-LC.

use aws_lc_rs::encoding::AsDer;
use aws_lc_rs::rand::SystemRandom;
use aws_lc_rs::signature::{self, EcdsaKeyPair, Ed25519KeyPair, KeyPair, RsaKeyPair};
use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use jsonwebtoken::jwk::{
    AlgorithmParameters, CommonParameters, EllipticCurve, EllipticCurveKeyParameters, EllipticCurveKeyType, Jwk,
    JwkSet, KeyAlgorithm, OctetKeyPairParameters, OctetKeyPairType, PublicKeyUse, RSAKeyParameters, RSAKeyType,
};
use jsonwebtoken::{DecodingKey, Validation};
use serde::de::DeserializeOwned;
use serde_json::json;

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

    fn jwt(self) -> jsonwebtoken::Algorithm {
        match self {
            Algorithm::ES256 => jsonwebtoken::Algorithm::ES256,
            Algorithm::RS256 => jsonwebtoken::Algorithm::RS256,
            Algorithm::EdDSA => jsonwebtoken::Algorithm::EdDSA,
        }
    }

    fn jwk(self) -> KeyAlgorithm {
        match self {
            Algorithm::ES256 => KeyAlgorithm::ES256,
            Algorithm::RS256 => KeyAlgorithm::RS256,
            Algorithm::EdDSA => KeyAlgorithm::EdDSA,
        }
    }
}

enum KeyPairKind {
    Es256(EcdsaKeyPair),
    Rs256(RsaKeyPair),
    EdDsa(Ed25519KeyPair),
}

/// A parsed private key, ready to sign, with its public half as a JWK and as a `jsonwebtoken` decoding key.
pub struct SigningKey {
    alg: Algorithm,
    kid: String,
    /// base64url of this key's JWT header, which is the same for every token it signs.
    header_b64: String,
    pair: KeyPairKind,
    public_jwk: Jwk,
    /// Built once from `public_jwk`: introspection verifies as a resource server holding the JWKS would.
    decoding_key: DecodingKey,
    validation: Validation,
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

/// RFC 7638 JWK thumbprint: SHA-256 of the required members (`kty` and the public parameters), in lexicographic
/// order. (`Jwk::thumbprint` is not used: in jsonwebtoken 10.3 it leaves `crv` unquoted for OKP keys.)
fn thumbprint(params: &AlgorithmParameters) -> Result<String, serde_json::Error> {
    // The parameters serialize to exactly the required members; serde_json's map sorts them (no preserve_order).
    let canonical = serde_json::to_value(params)?.to_string();
    Ok(b64(aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, canonical.as_bytes()).as_ref()))
}

/// What introspection checks besides the signature: nothing. Whether a token is active is decided from the state
/// (its pair is current and unexpired), so `exp`, `nbf`, `aud` and `iss` are not checked or required here, and the
/// core reads no wall clock. The algorithm is pinned to the key's: `alg: none`, HMAC or another family is rejected.
fn validation(alg: Algorithm) -> Validation {
    let mut v = Validation::new(alg.jwt());
    v.required_spec_claims.clear();
    v.validate_exp = false;
    v.validate_nbf = false;
    v.validate_aud = false;
    v
}

/// The published form of a JWK Set, `{"keys": [...]}`: every object's members in name order (serde_json's map sorts
/// them), byte for byte what kubetoken published before the typed JWKs, so no ConfigMap is rewritten on upgrade.
pub fn jwks_json(keys: Vec<Jwk>) -> Result<serde_json::Value, serde_json::Error> {
    serde_json::to_value(JwkSet { keys })
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
        let rejected = |reason: String| KeyError::Rejected { alg: alg.as_str(), reason };
        let (pair, params) = match alg {
            Algorithm::ES256 => {
                let pair = EcdsaKeyPair::from_pkcs8(&signature::ECDSA_P256_SHA256_FIXED_SIGNING, der)
                    .map_err(|e| rejected(e.to_string()))?;
                // Uncompressed point: 0x04 || x (32 bytes) || y (32 bytes).
                let point = pair.public_key().as_ref();
                let params = AlgorithmParameters::EllipticCurve(EllipticCurveKeyParameters {
                    key_type: EllipticCurveKeyType::EC,
                    curve: EllipticCurve::P256,
                    x: b64(&point[1..33]),
                    y: b64(&point[33..65]),
                });
                (KeyPairKind::Es256(pair), params)
            }
            Algorithm::RS256 => {
                let pair = RsaKeyPair::from_pkcs8(der).map_err(|e| rejected(e.to_string()))?;
                let public = pair.public_key();
                let params = AlgorithmParameters::RSA(RSAKeyParameters {
                    key_type: RSAKeyType::RSA,
                    n: b64(public.modulus().big_endian_without_leading_zero()),
                    e: b64(public.exponent().big_endian_without_leading_zero()),
                });
                (KeyPairKind::Rs256(pair), params)
            }
            Algorithm::EdDSA => {
                let pair = Ed25519KeyPair::from_pkcs8_maybe_unchecked(der).map_err(|e| rejected(e.to_string()))?;
                let params = AlgorithmParameters::OctetKeyPair(OctetKeyPairParameters {
                    key_type: OctetKeyPairType::OctetKeyPair,
                    curve: EllipticCurve::Ed25519,
                    x: b64(pair.public_key().as_ref()),
                });
                (KeyPairKind::EdDsa(pair), params)
            }
        };
        let kid = thumbprint(&params).map_err(|e| rejected(e.to_string()))?;
        let public_jwk = Jwk {
            common: CommonParameters {
                public_key_use: Some(PublicKeyUse::Signature),
                key_algorithm: Some(alg.jwk()),
                key_id: Some(kid.clone()),
                ..CommonParameters::default()
            },
            algorithm: params,
        };
        let decoding_key = DecodingKey::from_jwk(&public_jwk).map_err(|e| rejected(e.to_string()))?;
        let header = json!({"alg": alg.as_str(), "kid": kid, "typ": "at+jwt"});
        Ok(Self {
            alg,
            header_b64: b64(header.to_string().as_bytes()),
            kid,
            pair,
            public_jwk,
            decoding_key,
            validation: validation(alg),
            rng,
        })
    }

    pub fn kid(&self) -> &str {
        &self.kid
    }

    /// The public key as a JWK (`kty`, `kid`, `alg`, `use` and the public parameters only).
    pub fn public_jwk(&self) -> &Jwk {
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

    /// Verifies a compact JWS signed with this key (`jsonwebtoken::decode`, the algorithm pinned to this key's, no
    /// claim checks: see [`validation`]) and returns its claims; `None` for anything else.
    pub fn verify_jwt<T: DeserializeOwned>(&self, token: &str) -> Option<T> {
        jsonwebtoken::decode::<T>(token, &self.decoding_key, &self.validation).ok().map(|data| data.claims)
    }

    /// The header segment, used to route a JWT to the key that signed it.
    pub fn header_b64(&self) -> &str {
        &self.header_b64
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::Value;

    fn key(alg: Algorithm) -> SigningKey {
        SigningKey::from_pkcs8(alg, &SigningKey::generate_pkcs8(alg).expect("generate")).expect("parse")
    }

    #[test]
    fn every_algorithm_signs_and_verifies_and_rejects_tampering() {
        for alg in [Algorithm::ES256, Algorithm::EdDSA, Algorithm::RS256] {
            let key = key(alg);
            let token = key.sign_jwt(br#"{"sub":"alice"}"#).expect("sign");
            assert_eq!(key.verify_jwt::<Value>(&token), Some(json!({"sub": "alice"})));
            let tampered = token.replacen(
                &URL_SAFE_NO_PAD.encode(br#"{"sub":"alice"}"#),
                &URL_SAFE_NO_PAD.encode(br#"{"sub":"mallory"}"#),
                1,
            );
            assert_eq!(key.verify_jwt::<Value>(&tampered), None, "{alg:?}");
            let jwk = serde_json::to_value(key.public_jwk()).expect("jwk");
            assert_eq!(jwk["kid"], key.kid());
            assert!(jwk.get("d").is_none(), "public JWK must not carry private parts");
        }
    }

    #[test]
    fn claims_are_not_checked_here_introspection_decides_from_the_state() {
        // No exp, an exp long past, an aud and an iss: the signature is all this checks, as before jsonwebtoken.
        let key = key(Algorithm::ES256);
        for claims in [&br#"{"jti":"x"}"#[..], br#"{"jti":"x","exp":1,"nbf":4102444800,"aud":"a","iss":"i"}"#] {
            let token = key.sign_jwt(claims).expect("sign");
            assert!(key.verify_jwt::<Value>(&token).is_some(), "{}", String::from_utf8_lossy(claims));
        }
    }

    #[test]
    fn the_algorithm_is_pinned_to_the_keys() {
        let es = key(Algorithm::ES256);
        let token = es.sign_jwt(br#"{"jti":"x"}"#).expect("sign");
        let (_, rest) = token.split_once('.').expect("header");
        let (payload, _) = rest.split_once('.').expect("payload");
        let with_header = |header: Value, sig: &str| format!("{}.{payload}.{sig}", b64(header.to_string().as_bytes()));
        // alg none, without and with the signature.
        for sig in ["", &token[token.rfind('.').expect("sig") + 1..]] {
            let none = with_header(json!({"alg": "none", "kid": es.kid(), "typ": "at+jwt"}), sig);
            assert_eq!(es.verify_jwt::<Value>(&none), None);
        }
        // HS256 keyed with the public key's bytes (the classic confusion).
        let x = serde_json::to_value(es.public_jwk()).expect("jwk")["x"].as_str().expect("x").to_string();
        let header = b64(json!({"alg": "HS256", "kid": es.kid(), "typ": "at+jwt"}).to_string().as_bytes());
        let signing_input = format!("{header}.{payload}");
        let mac = aws_lc_rs::hmac::sign(
            &aws_lc_rs::hmac::Key::new(aws_lc_rs::hmac::HMAC_SHA256, x.as_bytes()),
            signing_input.as_bytes(),
        );
        assert_eq!(es.verify_jwt::<Value>(&format!("{signing_input}.{}", b64(mac.as_ref()))), None);
        // Another asymmetric algorithm, signed by a key of that algorithm.
        let ed = key(Algorithm::EdDSA);
        assert_eq!(es.verify_jwt::<Value>(&ed.sign_jwt(br#"{"jti":"x"}"#).expect("sign")), None);
        // The same algorithm, another key.
        assert_eq!(key(Algorithm::ES256).verify_jwt::<Value>(&token), None);
    }

    #[test]
    fn the_published_jwk_is_what_kubetoken_always_published() {
        for alg in [Algorithm::ES256, Algorithm::EdDSA, Algorithm::RS256] {
            let key = key(alg);
            let jwk = serde_json::to_value(key.public_jwk()).expect("jwk");
            let mut members: Vec<&str> = jwk.as_object().expect("object").keys().map(String::as_str).collect();
            members.sort_unstable();
            let expected: &[&str] = match alg {
                Algorithm::ES256 => &["alg", "crv", "kid", "kty", "use", "x", "y"],
                Algorithm::EdDSA => &["alg", "crv", "kid", "kty", "use", "x"],
                Algorithm::RS256 => &["alg", "e", "kid", "kty", "n", "use"],
            };
            assert_eq!(members, expected);
            assert_eq!((&jwk["alg"], &jwk["use"]), (&json!(alg.as_str()), &json!("sig")));
            let (kty, crv) = match alg {
                Algorithm::ES256 => ("EC", Some("P-256")),
                Algorithm::EdDSA => ("OKP", Some("Ed25519")),
                Algorithm::RS256 => ("RSA", None),
            };
            assert_eq!(jwk["kty"], kty);
            assert_eq!(jwk["crv"].as_str(), crv);
            // kid: the thumbprint of the required members, computed as before the typed JWKs.
            let required = match alg {
                Algorithm::ES256 => json!({"crv": jwk["crv"], "kty": jwk["kty"], "x": jwk["x"], "y": jwk["y"]}),
                Algorithm::EdDSA => json!({"crv": jwk["crv"], "kty": jwk["kty"], "x": jwk["x"]}),
                Algorithm::RS256 => json!({"e": jwk["e"], "kty": jwk["kty"], "n": jwk["n"]}),
            };
            let digest = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, required.to_string().as_bytes());
            assert_eq!(key.kid(), b64(digest.as_ref()));
            // The members in name order, as the JWKS endpoint and the ConfigMap publish them.
            let set = jwks_json(vec![key.public_jwk().clone()]).expect("jwks").to_string();
            let first = if alg == Algorithm::RS256 {
                r#"{"keys":[{"alg":"RS256","e":"AQAB","kid":"#.to_string()
            } else {
                format!(r#"{{"keys":[{{"alg":"{}","crv":"#, alg.as_str())
            };
            assert!(set.starts_with(&first), "{set}");
        }
    }

    #[test]
    fn kid_is_the_rfc_7638_thumbprint() {
        // RFC 7638, section 3.1.
        let params = AlgorithmParameters::RSA(RSAKeyParameters {
            key_type: RSAKeyType::RSA,
            n: "0vx7agoebGcQSuuPiLJXZptN9nndrQmbXEps2aiAFbWhM78LhWx4cbbfAAtVT86zwu1RK7aPFFxuhDR1L6tSoc_BJECPebWK\
                RXjBZCiFV4n3oknjhMstn64tZ_2W-5JsGY4Hc5n9yBXArwl93lqt7_RN5w6Cf0h4QyQ5v-65YGjQR0_FDW2QvzqY368QQMic\
                AtaSqzs8KJZgnYb9c7d0zgdAZHzu6qMQvRL5hajrn1n91CbOpbISD08qNLyrdkt-bFTWhAI4vMQFh6WeZu0fM4lFd2NcRwr3\
                XPksINHaQ-G_xBniIqbw0Ls1jF44-csFCur-kEgU8awapJzKnqDKgw"
                .into(),
            e: "AQAB".into(),
        });
        assert_eq!(thumbprint(&params).expect("thumbprint"), "NzbLsXh8uDCcd-6MNwXF4W_7noWXFZAfHkxZsRGC9Xs");
    }

    #[test]
    fn kid_is_stable_for_the_same_key_and_differs_between_keys() {
        let der = SigningKey::generate_pkcs8(Algorithm::ES256).expect("generate");
        let a = SigningKey::from_pkcs8(Algorithm::ES256, &der).expect("parse");
        let b = SigningKey::from_pkcs8(Algorithm::ES256, &der).expect("parse");
        let c = key(Algorithm::ES256);
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

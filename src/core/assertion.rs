//! Assertions from a trusted identity provider: the checks that make a JWT issued elsewhere (an RFC 7523 JWT bearer
//! assertion, an RFC 8693 subject token) a user here. Pure: the issuer's key set and the time are parameters; fetching
//! key sets is an adapter's, behind the [`KeySetSource`] port.
//!
//! Every refusal is `invalid_grant` on the wire, its description saying which check failed (never the token).

use std::collections::HashSet;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use jsonwebtoken::jwk::JwkSet;
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde_json::Value;

use super::clock::UnixTime;

/// The longest user name accepted from an issuer (e-mail addresses are at most 254).
pub const MAX_SUBJECT_BYTES: usize = 512;

/// How far `exp`, `nbf` and `iat` may be off: clocks of two machines disagree a little.
pub const LEEWAY: u64 = 60;

/// An identity provider whose JWTs are accepted as users (`spec.trustedIssuers[]`).
#[derive(Debug, Clone, PartialEq)]
pub struct TrustedIssuer {
    /// Must equal the assertion's `iss`, byte for byte.
    pub issuer: String,
    /// Where its key set comes from.
    pub keys: KeySource,
    /// The assertion's `aud` must contain one of them.
    pub audiences: Vec<String>,
    /// The claim naming the user (`sub` by default).
    pub username_claim: String,
    /// A dotted path to a string or a list of strings: the user's roles. None: no roles.
    pub roles_claim: Option<String>,
    /// The signature algorithms accepted from this issuer; asymmetric ones only.
    pub allowed_algorithms: Vec<Algorithm>,
    /// The oldest `iat` accepted, in seconds before now.
    pub max_assertion_age: u64,
}

/// Where a trusted issuer's key set comes from.
#[derive(Debug, Clone, PartialEq)]
pub enum KeySource {
    /// Fetched from this URL (and cached) through the [`KeySetSource`] port.
    Uri(String),
    /// Given offline (a ConfigMap): used as is.
    Fixed(Arc<JwkSet>),
    /// Given offline, but not readable now (a ConfigMap missing or not a key set): this issuer's grants answer 503
    /// until it is, while the application's other grants and issuers keep working.
    Unavailable(String),
}

pub type KeySetFuture<'a> = Pin<Box<dyn Future<Output = Result<Arc<JwkSet>, String>> + Send + 'a>>;

/// Port: issuers' key sets by URL, fetched and cached by an adapter.
pub trait KeySetSource: Send + Sync {
    /// The key set at `uri`. `after_unknown_key`: an assertion named a key the last answer lacked, so the adapter may
    /// fetch it again (how often is its business).
    fn key_set<'a>(&'a self, uri: &'a str, after_unknown_key: bool) -> KeySetFuture<'a>;
}

/// A JWK set, each key parsed on its own: one unusable key (another curve, a symmetric key) is skipped, not the set.
pub fn parse_key_set(body: &[u8]) -> Result<JwkSet, String> {
    #[derive(serde::Deserialize)]
    struct Raw {
        keys: Vec<Value>,
    }
    let raw: Raw = serde_json::from_slice(body).map_err(|e| format!("not a JWK set: {e}"))?;
    let keys = raw.keys.into_iter().filter_map(|k| serde_json::from_value(k).ok()).collect();
    Ok(JwkSet { keys })
}

/// A key set is fetched over HTTPS; plain HTTP only from a loopback address (a test issuer, a local proxy).
pub fn check_key_set_uri(uri: &str) -> Result<(), String> {
    let (tls, rest) = if let Some(rest) = uri.strip_prefix("https://") {
        (true, rest)
    } else if let Some(rest) = uri.strip_prefix("http://") {
        (false, rest)
    } else {
        return Err(format!("{uri:?} is not an https:// URL"));
    };
    let authority = rest.split(['/', '?', '#']).next().unwrap_or("");
    let host = match authority.rsplit_once('@') {
        Some(_) => return Err(format!("{uri:?}: a key set URL carries no credentials")),
        None if authority.starts_with('[') => authority.split(']').next().map(|h| &h[1..]).unwrap_or(""),
        None => authority.split(':').next().unwrap_or(""),
    };
    if host.is_empty() || uri.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err(format!("{uri:?} is not a URL with a host"));
    }
    let loopback = host == "localhost" || host.parse::<std::net::IpAddr>().is_ok_and(|ip| ip.is_loopback());
    if !tls && !loopback {
        return Err(format!("{uri:?}: a key set is fetched over HTTPS (plain HTTP only on the loopback)"));
    }
    Ok(())
}

/// Algorithms an issuer may be trusted with: public-key signatures only (`none` does not parse, HMAC would need a
/// shared secret, and a public key presented as one is the classic confusion attack).
pub fn parse_algorithm(name: &str) -> Result<Algorithm, String> {
    let alg: Algorithm = name.parse().map_err(|_| format!("{name} is not a JWS algorithm"))?;
    match alg {
        Algorithm::HS256 | Algorithm::HS384 | Algorithm::HS512 => {
            Err(format!("{name} is an HMAC algorithm: only public-key signatures are accepted from an issuer"))
        }
        _ => Ok(alg),
    }
}

/// What a verified assertion says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VerifiedAssertion {
    pub subject: String,
    pub roles: Vec<String>,
    /// Names this assertion for replay detection: its `jti`, or a digest of the whole assertion when it has none
    /// (Google's ID tokens carry no `jti`).
    pub replay_id: String,
    /// Until when a replay must be refused: the assertion's `exp` and the leeway.
    pub expires_at: UnixTime,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AssertionError {
    #[error("the assertion is not a signed JWT")]
    Malformed,
    #[error("the assertion's issuer is not trusted by this application")]
    UntrustedIssuer,
    #[error("the assertion's algorithm {0} is not allowed for its issuer")]
    Algorithm(String),
    /// The key is not in the set: the caller may fetch the issuer's key set again, and retry once.
    /// (The `kid` is not repeated: it is the client's text, not to be echoed into responses or logs.)
    #[error("the assertion's signing key is not in its issuer's key set")]
    UnknownKey,
    #[error("the assertion's signature does not verify")]
    Signature,
    #[error("the assertion has expired")]
    Expired,
    #[error("the assertion is not valid yet (nbf)")]
    NotYetValid,
    #[error("the assertion's audience names none of the application's accepted audiences")]
    Audience,
    #[error("the assertion has no {0} claim")]
    Missing(&'static str),
    #[error("the assertion was issued too long ago (iat older than the issuer's maxAssertionAge)")]
    TooOld,
    #[error("the assertion was issued in the future (iat)")]
    IssuedInFuture,
    #[error("the assertion's {0} claim, which names the user, is missing or not a string")]
    Subject(String),
    #[error("the assertion's {0} claim, which names the user, is longer than 512 bytes or holds control characters")]
    SubjectForm(String),
    #[error("the assertion's {0} claim, which holds the roles, is not a string or a list of strings")]
    Roles(String),
}

/// The `iss` of an assertion, unverified: which issuer's keys to check it with.
pub fn peek_issuer(token: &str) -> Result<String, AssertionError> {
    let payload = token.split('.').nth(1).ok_or(AssertionError::Malformed)?;
    let bytes = URL_SAFE_NO_PAD.decode(payload).map_err(|_| AssertionError::Malformed)?;
    let claims: Value = serde_json::from_slice(&bytes).map_err(|_| AssertionError::Malformed)?;
    claims["iss"].as_str().map(str::to_string).ok_or(AssertionError::Missing("iss"))
}

/// Checks `token` against `issuer` and its key set at `now`: the signature (the algorithm pinned to the issuer's
/// list and to the key's own `alg`), `iss`, `aud`, `exp` and `nbf` (with [`LEEWAY`]), `iat` within the issuer's
/// maximum age, and the user and roles claims.
pub fn verify(
    token: &str,
    issuer: &TrustedIssuer,
    keys: &JwkSet,
    now: UnixTime,
) -> Result<VerifiedAssertion, AssertionError> {
    let header = jsonwebtoken::decode_header(token).map_err(|_| AssertionError::Malformed)?;
    let hmac = matches!(header.alg, Algorithm::HS256 | Algorithm::HS384 | Algorithm::HS512);
    if hmac || !issuer.allowed_algorithms.contains(&header.alg) {
        return Err(AssertionError::Algorithm(format!("{:?}", header.alg)));
    }
    let jwk = match &header.kid {
        Some(kid) => keys.find(kid).ok_or(AssertionError::UnknownKey)?,
        // No kid: only a set of one key says which key it is.
        None => match keys.keys.as_slice() {
            [only] => only,
            _ => return Err(AssertionError::UnknownKey),
        },
    };
    if let Some(key_alg) = jwk.common.key_algorithm
        && key_alg.to_string() != format!("{:?}", header.alg)
    {
        return Err(AssertionError::Algorithm(format!("{:?} (its key is for {key_alg})", header.alg)));
    }
    let key = DecodingKey::from_jwk(jwk).map_err(|_| AssertionError::Signature)?;
    // The signature and the claims' shapes only; the times and names are checked below, against `now`.
    let mut validation = Validation::new(header.alg);
    validation.required_spec_claims = HashSet::new();
    validation.validate_exp = false;
    validation.validate_nbf = false;
    validation.validate_aud = false;
    let claims: Value = jsonwebtoken::decode(token, &key, &validation)
        .map_err(|e| match e.kind() {
            jsonwebtoken::errors::ErrorKind::InvalidSignature => AssertionError::Signature,
            jsonwebtoken::errors::ErrorKind::InvalidAlgorithm => AssertionError::Algorithm(format!("{:?}", header.alg)),
            _ => AssertionError::Malformed,
        })?
        .claims;

    if claims["iss"].as_str() != Some(issuer.issuer.as_str()) {
        return Err(AssertionError::UntrustedIssuer);
    }
    let audience_ok = match &claims["aud"] {
        Value::String(a) => issuer.audiences.contains(a),
        Value::Array(list) => list.iter().filter_map(Value::as_str).any(|a| issuer.audiences.iter().any(|x| x == a)),
        Value::Null => return Err(AssertionError::Missing("aud")),
        _ => false,
    };
    if !audience_ok {
        return Err(AssertionError::Audience);
    }
    let time = |name: &'static str| -> Result<Option<u64>, AssertionError> {
        match &claims[name] {
            Value::Null => Ok(None),
            v => v
                .as_u64()
                .or_else(|| v.as_f64().filter(|f| *f >= 0.0).map(|f| f as u64))
                .map(Some)
                .ok_or(AssertionError::Malformed),
        }
    };
    let exp = time("exp")?.ok_or(AssertionError::Missing("exp"))?;
    if now >= exp.saturating_add(LEEWAY) {
        return Err(AssertionError::Expired);
    }
    if let Some(nbf) = time("nbf")?
        && now.saturating_add(LEEWAY) < nbf
    {
        return Err(AssertionError::NotYetValid);
    }
    let iat = time("iat")?.ok_or(AssertionError::Missing("iat"))?;
    if now.saturating_add(LEEWAY) < iat {
        return Err(AssertionError::IssuedInFuture);
    }
    if now.saturating_sub(iat) > issuer.max_assertion_age.saturating_add(LEEWAY) {
        return Err(AssertionError::TooOld);
    }
    let subject = claim(&claims, &issuer.username_claim)
        .and_then(Value::as_str)
        .filter(|s| !s.is_empty())
        .ok_or_else(|| AssertionError::Subject(issuer.username_claim.clone()))?
        .to_string();
    // A user is a key in every store (a primary key column, a NUL-free text): bounded, and without control characters.
    if subject.len() > MAX_SUBJECT_BYTES || subject.chars().any(char::is_control) {
        return Err(AssertionError::SubjectForm(issuer.username_claim.clone()));
    }
    let roles = match &issuer.roles_claim {
        None => Vec::new(),
        Some(path) => match claim(&claims, path) {
            None | Some(Value::Null) => Vec::new(),
            Some(Value::String(role)) => vec![role.clone()],
            Some(Value::Array(list)) => list
                .iter()
                .map(|r| r.as_str().map(str::to_string))
                .collect::<Option<Vec<_>>>()
                .ok_or_else(|| AssertionError::Roles(path.clone()))?,
            Some(_) => return Err(AssertionError::Roles(path.clone())),
        },
    };
    // Scoped to the issuer (one issuer cannot use up another's ids). Without a jti, the signed part names the
    // assertion: not the signature, which an ECDSA signature's malleability would let a replay change.
    let replay_id = match claims["jti"].as_str() {
        Some(jti) => format!("{}\u{0}jti:{jti}", issuer.issuer),
        None => {
            let signed = token.rsplit_once('.').map_or(token, |(signed, _)| signed);
            let digest = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, signed.as_bytes());
            format!("{}\u{0}sha256:{}", issuer.issuer, URL_SAFE_NO_PAD.encode(digest))
        }
    };
    // Accepted until exp plus the leeway: a replay must be refused that long.
    let expires_at = exp.saturating_add(LEEWAY);
    Ok(VerifiedAssertion { subject, roles, replay_id, expires_at })
}

/// The claim at a dotted path (`realm_access.roles`); a top-level claim whose name holds a dot is found first.
fn claim<'a>(claims: &'a Value, path: &str) -> Option<&'a Value> {
    if let Some(v) = claims.get(path) {
        return Some(v);
    }
    path.split('.').try_fold(claims, |v, part| v.get(part))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::signing::{Algorithm as KeyAlg, SigningKey};
    use serde_json::json;

    const NOW: u64 = 1_800_000_000;

    fn key(alg: KeyAlg) -> SigningKey {
        SigningKey::from_pkcs8(alg, &SigningKey::generate_pkcs8(alg).expect("generate")).expect("parse")
    }

    fn set(keys: &[&SigningKey]) -> JwkSet {
        JwkSet { keys: keys.iter().map(|k| k.public_jwk().clone()).collect() }
    }

    fn issuer() -> TrustedIssuer {
        TrustedIssuer {
            issuer: "https://idp.example/realms/shop".into(),
            keys: KeySource::Uri("https://idp.example/realms/shop/certs".into()),
            audiences: vec!["shop".into()],
            username_claim: "preferred_username".into(),
            roles_claim: Some("realm_access.roles".into()),
            allowed_algorithms: vec![Algorithm::RS256, Algorithm::ES256, Algorithm::EdDSA],
            max_assertion_age: 3600,
        }
    }

    fn claims() -> Value {
        json!({
            "iss": "https://idp.example/realms/shop", "aud": ["account", "shop"], "sub": "f3a1",
            "preferred_username": "alice", "realm_access": {"roles": ["orders:read", "admin"]},
            "iat": NOW - 10, "exp": NOW + 300, "jti": "a-1",
        })
    }

    fn sign(k: &SigningKey, claims: &Value) -> String {
        k.sign_jwt(claims.to_string().as_bytes()).expect("sign")
    }

    #[test]
    fn a_valid_assertion_names_its_user_roles_and_replay_id_for_every_algorithm() {
        for alg in [KeyAlg::ES256, KeyAlg::RS256, KeyAlg::EdDSA] {
            let k = key(alg);
            let verified = verify(&sign(&k, &claims()), &issuer(), &set(&[&k]), NOW).expect("valid");
            assert_eq!(
                verified,
                VerifiedAssertion {
                    subject: "alice".into(),
                    roles: vec!["orders:read".into(), "admin".into()],
                    replay_id: "https://idp.example/realms/shop\u{0}jti:a-1".into(),
                    expires_at: NOW + 300 + LEEWAY,
                }
            );
        }
    }

    #[test]
    fn each_claim_check_refuses_with_its_own_reason() {
        let k = key(KeyAlg::ES256);
        let keys = set(&[&k]);
        let with = |patch: Value| {
            let mut c = claims();
            for (name, value) in patch.as_object().expect("object") {
                c[name] = value.clone();
            }
            verify(&sign(&k, &c), &issuer(), &keys, NOW)
        };
        assert_eq!(with(json!({"iss": "https://idp.example/realms/other"})), Err(AssertionError::UntrustedIssuer));
        assert_eq!(with(json!({"aud": "billing"})), Err(AssertionError::Audience));
        assert_eq!(with(json!({"aud": null})), Err(AssertionError::Missing("aud")));
        assert_eq!(with(json!({"exp": NOW - LEEWAY})), Err(AssertionError::Expired));
        assert!(with(json!({"exp": NOW - LEEWAY + 1})).is_ok(), "within the leeway");
        assert_eq!(with(json!({"exp": null})), Err(AssertionError::Missing("exp")));
        assert_eq!(with(json!({"nbf": NOW + LEEWAY + 1})), Err(AssertionError::NotYetValid));
        assert!(with(json!({"nbf": NOW + LEEWAY})).is_ok(), "within the leeway");
        assert_eq!(with(json!({"iat": null})), Err(AssertionError::Missing("iat")));
        assert_eq!(with(json!({"iat": NOW - 3600 - LEEWAY - 1})), Err(AssertionError::TooOld));
        assert_eq!(with(json!({"iat": NOW + LEEWAY + 1})), Err(AssertionError::IssuedInFuture));
        assert_eq!(with(json!({"preferred_username": 42})), Err(AssertionError::Subject("preferred_username".into())));
        assert_eq!(
            with(json!({"preferred_username": null})),
            Err(AssertionError::Subject("preferred_username".into()))
        );
        assert_eq!(
            with(json!({"realm_access": {"roles": ["a", 1]}})),
            Err(AssertionError::Roles("realm_access.roles".into()))
        );
        assert_eq!(with(json!({"realm_access": {"roles": "one"}})).expect("one role").roles, vec!["one"]);
        assert_eq!(with(json!({"realm_access": null})).expect("no roles").roles, Vec::<String>::new());
        let no_jti = with(json!({"jti": null})).expect("valid without jti");
        assert!(no_jti.replay_id.starts_with("https://idp.example/realms/shop\u{0}sha256:"), "{}", no_jti.replay_id);
    }

    #[test]
    fn signatures_keys_and_algorithms_are_checked() {
        let (k, other) = (key(KeyAlg::ES256), key(KeyAlg::ES256));
        let token = sign(&k, &claims());
        // Signed by a key the set does not hold (another kid).
        assert!(matches!(verify(&token, &issuer(), &set(&[&other]), NOW), Err(AssertionError::UnknownKey)));
        // Tampered claims.
        let mut parts: Vec<String> = token.split('.').map(str::to_string).collect();
        let mut c = claims();
        c["preferred_username"] = json!("mallory");
        parts[1] = URL_SAFE_NO_PAD.encode(c.to_string());
        assert_eq!(verify(&parts.join("."), &issuer(), &set(&[&k]), NOW), Err(AssertionError::Signature));
        // An algorithm the issuer is not trusted with.
        let only_rs = TrustedIssuer { allowed_algorithms: vec![Algorithm::RS256], ..issuer() };
        assert!(matches!(verify(&token, &only_rs, &set(&[&k]), NOW), Err(AssertionError::Algorithm(_))));
        // alg none and HMAC.
        let none = format!(
            "{}.{}.",
            URL_SAFE_NO_PAD.encode(r#"{"alg":"none"}"#),
            URL_SAFE_NO_PAD.encode(claims().to_string())
        );
        assert_eq!(verify(&none, &issuer(), &set(&[&k]), NOW), Err(AssertionError::Malformed));
        assert!(parse_algorithm("HS256").is_err() && parse_algorithm("none").is_err());
        assert_eq!(parse_algorithm("ES256"), Ok(Algorithm::ES256));
        assert_eq!(verify("not a jwt", &issuer(), &set(&[&k]), NOW), Err(AssertionError::Malformed));
    }

    #[test]
    fn the_issuer_is_read_before_verification_to_pick_its_keys() {
        let k = key(KeyAlg::EdDSA);
        assert_eq!(peek_issuer(&sign(&k, &claims())).as_deref(), Ok("https://idp.example/realms/shop"));
        assert_eq!(peek_issuer("a.b.c"), Err(AssertionError::Malformed));
        let no_iss = sign(&k, &json!({"sub": "x"}));
        assert_eq!(peek_issuer(&no_iss), Err(AssertionError::Missing("iss")));
    }
}

//! Token strings.
//!
//! - Opaque access tokens and all refresh tokens are `base64url(id || tag)`, where `tag` is a truncated
//!   HMAC-SHA256 of the id under a server key. The state stores only ids, never bearer strings, and the same
//!   token can still be handed out again (opaque mode) by recomputing it.
//! - A rotated refresh token also carries its generation: `base64url(id || generation(u32, big-endian) || tag)`, the tag
//!   over both. Generation 0 (the token issued at login, and every opaque application's) keeps the short form.
//! - JWT access tokens (RFC 9068) carry the id as `jti`.

use aws_lc_rs::hmac;
use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use serde::{Deserialize, Serialize};

use super::model::TokenId;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TokenKind {
    Access,
    Refresh,
}

impl TokenKind {
    fn domain(self) -> u8 {
        match self {
            TokenKind::Access => b'a',
            TokenKind::Refresh => b'r',
        }
    }
}

const TAG_LEN: usize = 16;
/// Length of an opaque token string: base64url of 32 bytes.
pub const OPAQUE_LEN: usize = 43;

/// Makes and checks opaque token strings.
pub struct OpaqueTokens {
    /// Newest first: new strings are tagged with the first key, any key is accepted.
    keys: Vec<hmac::Key>,
}

impl std::fmt::Debug for OpaqueTokens {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OpaqueTokens").field("keys", &self.keys.len()).finish()
    }
}

/// Length of a refresh token string of generation 1 or later: base64url of 36 bytes.
pub const ROTATED_REFRESH_LEN: usize = 48;

fn tag(key: &hmac::Key, kind: TokenKind, id: &TokenId, generation: Option<u32>) -> hmac::Tag {
    let mut ctx = hmac::Context::with_key(key);
    ctx.update(&[kind.domain()]);
    ctx.update(&id.0);
    if let Some(generation) = generation {
        ctx.update(&generation.to_be_bytes());
    }
    ctx.sign()
}

impl OpaqueTokens {
    /// `secrets`: the token-tagging secrets (at least 32 random bytes each), newest first. With none, no string
    /// is ever accepted and encoding uses an all-zero key (callers validate that there is one).
    pub fn new(secrets: &[impl AsRef<[u8]>]) -> Self {
        let mut keys: Vec<hmac::Key> = secrets.iter().map(|s| hmac::Key::new(hmac::HMAC_SHA256, s.as_ref())).collect();
        if keys.is_empty() {
            keys.push(hmac::Key::new(hmac::HMAC_SHA256, &[0u8; 32]));
        }
        Self { keys }
    }

    pub fn encode(&self, kind: TokenKind, id: &TokenId) -> String {
        let mut raw = [0u8; 16 + TAG_LEN];
        raw[..16].copy_from_slice(&id.0);
        raw[16..].copy_from_slice(&tag(&self.keys[0], kind, id, None).as_ref()[..TAG_LEN]);
        URL_SAFE_NO_PAD.encode(raw)
    }

    /// The id inside `token` if it is a genuine token of `kind` under any of the secrets (tags checked in
    /// constant time).
    pub fn decode(&self, kind: TokenKind, token: &str) -> Option<TokenId> {
        if token.len() != OPAQUE_LEN {
            return None;
        }
        let raw = URL_SAFE_NO_PAD.decode(token).ok()?;
        let id = TokenId(raw.get(..16)?.try_into().ok()?);
        self.genuine(kind, &id, None, raw.get(16..)?).then_some(id)
    }

    /// The string of a refresh token: its login's refresh id and its generation.
    pub fn encode_refresh(&self, id: &TokenId, generation: u32) -> String {
        if generation == 0 {
            return self.encode(TokenKind::Refresh, id);
        }
        let mut raw = [0u8; 20 + TAG_LEN];
        raw[..16].copy_from_slice(&id.0);
        raw[16..20].copy_from_slice(&generation.to_be_bytes());
        raw[20..].copy_from_slice(&tag(&self.keys[0], TokenKind::Refresh, id, Some(generation)).as_ref()[..TAG_LEN]);
        URL_SAFE_NO_PAD.encode(raw)
    }

    /// The refresh id and generation inside a genuine refresh token string.
    pub fn decode_refresh(&self, token: &str) -> Option<(TokenId, u32)> {
        if token.len() != ROTATED_REFRESH_LEN {
            return self.decode(TokenKind::Refresh, token).map(|id| (id, 0));
        }
        let raw = URL_SAFE_NO_PAD.decode(token).ok()?;
        let id = TokenId(raw.get(..16)?.try_into().ok()?);
        let generation = u32::from_be_bytes(raw.get(16..20)?.try_into().ok()?);
        // Generation 0 has one string only, the short one.
        (generation > 0 && self.genuine(TokenKind::Refresh, &id, Some(generation), raw.get(20..)?))
            .then_some((id, generation))
    }

    /// Whether `given` is the tag of (kind, id, generation) under any of the secrets, compared in constant time.
    fn genuine(&self, kind: TokenKind, id: &TokenId, generation: Option<u32>, given: &[u8]) -> bool {
        let mut ok = subtle::Choice::from(0);
        for key in &self.keys {
            ok |= subtle::ConstantTimeEq::ct_eq(&tag(key, kind, id, generation).as_ref()[..TAG_LEN], given);
        }
        bool::from(ok)
    }
}

/// RFC 9068 access token claims.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct AccessClaims<'a> {
    pub iss: &'a str,
    pub sub: &'a str,
    pub aud: &'a [String],
    pub exp: u64,
    pub iat: u64,
    pub jti: String,
    pub client_id: &'a str,
    pub scope: String,
    /// A federated user's identity provider (its `iss`): `sub` is that provider's name for the user, which a local
    /// user of the same name is not.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub idp: Option<&'a str>,
}

/// Just enough of a JWT's claims to find its state.
#[derive(Debug, Deserialize)]
pub struct JtiOnly {
    pub jti: String,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn opaque_tokens_round_trip_and_reject_forgeries() {
        let t = OpaqueTokens::new(&[[7u8; 32]]);
        let id = TokenId([9u8; 16]);
        let access = t.encode(TokenKind::Access, &id);
        assert_eq!(access.len(), OPAQUE_LEN);
        assert_eq!(t.decode(TokenKind::Access, &access), Some(id));
        // The same id as a refresh token is a different string, and kinds don't cross.
        assert_eq!(t.decode(TokenKind::Refresh, &access), None);
        // Another server key, a flipped character, or garbage: rejected.
        assert_eq!(OpaqueTokens::new(&[[8u8; 32]]).decode(TokenKind::Access, &access), None);
        // A newer secret in front: old strings still decode, new ones use the newer secret.
        let rotated = OpaqueTokens::new(&[[8u8; 32], [7u8; 32]]);
        assert_eq!(rotated.decode(TokenKind::Access, &access), Some(id));
        assert_ne!(rotated.encode(TokenKind::Access, &id), access);
        let mut flipped = access.clone().into_bytes();
        flipped[30] = if flipped[30] == b'A' { b'B' } else { b'A' };
        assert_eq!(t.decode(TokenKind::Access, &String::from_utf8(flipped).expect("ascii")), None);
        assert_eq!(t.decode(TokenKind::Access, "not a token"), None);
        assert_eq!(t.decode(TokenKind::Access, &"é".repeat(22)), None);
    }

    #[test]
    fn refresh_tokens_carry_their_generation_and_reject_forgeries() {
        let t = OpaqueTokens::new(&[[7u8; 32]]);
        let id = TokenId([9u8; 16]);
        // Generation 0 is the short form, the same string as before generations existed.
        assert_eq!(t.encode_refresh(&id, 0), t.encode(TokenKind::Refresh, &id));
        assert_eq!(t.decode_refresh(&t.encode_refresh(&id, 0)), Some((id, 0)));
        for generation in [1, 2, 50, u32::MAX] {
            let token = t.encode_refresh(&id, generation);
            assert_eq!(token.len(), ROTATED_REFRESH_LEN);
            assert_eq!(t.decode_refresh(&token), Some((id, generation)));
            // Another secret, or a generation changed in the string: rejected.
            assert_eq!(OpaqueTokens::new(&[[8u8; 32]]).decode_refresh(&token), None);
            let mut raw = URL_SAFE_NO_PAD.decode(&token).expect("b64");
            raw[19] ^= 1;
            assert_eq!(t.decode_refresh(&URL_SAFE_NO_PAD.encode(&raw)), None);
        }
        // Two generations of one login are different strings.
        assert_ne!(t.encode_refresh(&id, 1), t.encode_refresh(&id, 2));
        // A long-form string claiming generation 0 is not genuine, even with a tag over it.
        let mut raw = [0u8; 36];
        raw[..16].copy_from_slice(&id.0);
        raw[20..].copy_from_slice(&tag(&t.keys[0], TokenKind::Refresh, &id, Some(0)).as_ref()[..TAG_LEN]);
        assert_eq!(t.decode_refresh(&URL_SAFE_NO_PAD.encode(raw)), None);
        // An access token is not a refresh token in either form.
        assert_eq!(t.decode_refresh(&t.encode(TokenKind::Access, &id)), None);
        assert_eq!(t.decode_refresh("not a token"), None);
        assert_eq!(t.decode_refresh(&"é".repeat(24)), None);
    }
}

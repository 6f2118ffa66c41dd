//! Token string parsing: opaque access and refresh token strings (`OpaqueTokens::decode` and `decode_refresh`, the
//! latter with the refresh token's generation, with a fixed secret) and JWT ids (`TokenId::from_b64`). No panic; whatever decodes encodes back to the same string; and the fuzzer's
//! bytes, taken as an id, round-trip through both token kinds without crossing between them.
#![no_main]

use std::sync::OnceLock;

use kubetoken::core::model::TokenId;
use kubetoken::core::tokens::{OpaqueTokens, TokenKind};
use libfuzzer_sys::fuzz_target;

fn tokens() -> &'static OpaqueTokens {
    static TOKENS: OnceLock<OpaqueTokens> = OnceLock::new();
    // Two secrets, newest first, as after a rotation of the token secrets: either verifies.
    TOKENS.get_or_init(|| OpaqueTokens::new(&[[7u8; 32], [8u8; 32]]))
}

fuzz_target!(|data: &[u8]| {
    let t = tokens();
    if let Ok(s) = std::str::from_utf8(data) {
        for kind in [TokenKind::Access, TokenKind::Refresh] {
            if let Some(id) = t.decode(kind, s) {
                // Only strings tagged with the first secret can decode: the fuzzer cannot forge a tag, but a seed
                // made with it does.
                assert_eq!(t.decode(kind, &t.encode(kind, &id)), Some(id));
            }
        }
        if let Some((id, generation)) = t.decode_refresh(s) {
            assert_eq!(t.decode_refresh(&t.encode_refresh(&id, generation)), Some((id, generation)));
        }
        if let Some(id) = TokenId::from_b64(s) {
            assert_eq!(id.to_b64(), s, "a jti decodes from its one canonical form only");
        }
    }
    if let Some(bytes) = data.get(..16) {
        let id = TokenId(bytes.try_into().unwrap_or_default());
        assert_eq!(TokenId::from_b64(&id.to_b64()), Some(id));
        let access = t.encode(TokenKind::Access, &id);
        let refresh = t.encode(TokenKind::Refresh, &id);
        assert_eq!(t.decode(TokenKind::Access, &access), Some(id));
        assert_eq!(t.decode(TokenKind::Refresh, &refresh), Some(id));
        assert_eq!(t.decode(TokenKind::Refresh, &access), None, "an access token is no refresh token");
        assert_eq!(t.decode(TokenKind::Access, &refresh), None, "a refresh token is no access token");
        // The next four bytes as a generation: it round-trips, and no other generation's string decodes to it.
        if let Some(generation) = data.get(16..20).and_then(|b| b.try_into().ok()).map(u32::from_be_bytes) {
            let token = t.encode_refresh(&id, generation);
            assert_eq!(t.decode_refresh(&token), Some((id, generation)));
            assert_eq!(t.decode(TokenKind::Access, &token), None, "a refresh token is no access token");
            if generation > 0 {
                assert_ne!(t.decode_refresh(&t.encode_refresh(&id, generation - 1)), Some((id, generation)));
            }
        }
    }
});

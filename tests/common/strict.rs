//! A strict OAuth client's view of the token endpoint: every answer checked against what RFC 6749 (5.1, 5.2),
//! RFC 6750, RFC 7523 and RFC 8693 (2.2) require of it, field by field, as a conforming client library would before
//! using it. A lenient client would accept more; these checks fail where one of them would refuse.

use serde_json::Value;

use super::Response;

pub const TOKEN_EXCHANGE: &str = "urn:ietf:params:oauth:grant-type:token-exchange";
/// RFC 8693 section 3: the token type identifiers a response may name.
const TOKEN_TYPES: [&str; 4] = [
    "urn:ietf:params:oauth:token-type:access_token",
    "urn:ietf:params:oauth:token-type:refresh_token",
    "urn:ietf:params:oauth:token-type:id_token",
    "urn:ietf:params:oauth:token-type:jwt",
];
/// RFC 6749 section 5.2 and RFC 8693 section 2.2.2.
const ERROR_CODES: [&str; 8] = [
    "invalid_request",
    "invalid_client",
    "invalid_grant",
    "unauthorized_client",
    "unsupported_grant_type",
    "invalid_scope",
    "invalid_target",
    // RFC 6749 4.1.2.1 codes a token endpoint may also use for its own trouble.
    "temporarily_unavailable",
];

fn no_store(r: &Response) {
    let cache = r.header("cache-control").unwrap_or_default().to_ascii_lowercase();
    assert!(cache.contains("no-store"), "RFC 6749 5.1: Cache-Control: no-store, got {cache:?}");
    let media = r.header("content-type").unwrap_or_default().to_ascii_lowercase();
    assert!(media.starts_with("application/json"), "RFC 6749 5.1: application/json, got {media:?}");
}

/// RFC 6749 5.1 (and RFC 8693 2.2.1 for token exchange): the successful answer a strict client accepts. Returns it.
pub fn token_response(r: &Response, grant_type: &str) -> Value {
    assert_eq!(r.status, 200, "{grant_type}: {}", r.body);
    no_store(r);
    let v = r.json();
    let object = v.as_object().unwrap_or_else(|| panic!("not a JSON object: {}", r.body));
    let access = object.get("access_token").and_then(Value::as_str).unwrap_or_default();
    assert!(!access.is_empty(), "access_token REQUIRED: {}", r.body);
    assert!(access.bytes().all(|b| (0x20..0x7f).contains(&b)), "RFC 6750 2.1: b64token characters");
    let token_type = object.get("token_type").and_then(Value::as_str).unwrap_or_default();
    assert!(token_type.eq_ignore_ascii_case("bearer"), "token_type REQUIRED, Bearer: {}", r.body);
    if let Some(expires) = object.get("expires_in") {
        assert!(expires.as_u64().is_some_and(|s| s > 0), "expires_in: a positive number of seconds: {expires}");
    }
    if let Some(scope) = object.get("scope") {
        let scope = scope.as_str().unwrap_or_else(|| panic!("scope is a string: {scope}"));
        for token in scope.split(' ') {
            assert!(
                !token.is_empty()
                    && token.bytes().all(|b| b == 0x21 || (0x23..=0x5B).contains(&b) || (0x5D..=0x7E).contains(&b)),
                "RFC 6749 3.3 scope token {token:?} in {scope:?}"
            );
        }
    }
    if let Some(refresh) = object.get("refresh_token") {
        assert!(refresh.as_str().is_some_and(|t| !t.is_empty()), "refresh_token is a non-empty string");
    }
    let issued = object.get("issued_token_type");
    if grant_type == TOKEN_EXCHANGE {
        let issued = issued.and_then(Value::as_str).unwrap_or_default();
        assert!(TOKEN_TYPES.contains(&issued), "RFC 8693 2.2.1: issued_token_type REQUIRED: {}", r.body);
    } else {
        assert!(issued.is_none(), "issued_token_type outside a token exchange: {}", r.body);
    }
    v
}

/// RFC 6749 5.2: the error answer a strict client can read. Returns the error code.
pub fn error_response(r: &Response) -> String {
    assert!(r.status == 400 || r.status == 401 || r.status == 503, "an error status: {} {}", r.status, r.body);
    no_store(r);
    let v = r.json();
    let code = v["error"].as_str().unwrap_or_else(|| panic!("error REQUIRED: {}", r.body)).to_string();
    assert!(ERROR_CODES.contains(&code.as_str()), "a registered error code: {code}");
    if r.status == 401 {
        assert!(r.header("www-authenticate").is_some(), "RFC 6749 5.2: 401 with WWW-Authenticate");
    }
    if let Some(description) = v.get("error_description") {
        let d = description.as_str().unwrap_or_else(|| panic!("error_description is a string: {description}"));
        let allowed = |b: u8| b == 0x20 || b == 0x21 || (0x23..=0x5B).contains(&b) || (0x5D..=0x7E).contains(&b);
        assert!(d.bytes().all(allowed), "RFC 6749 5.2: error_description characters: {d:?}");
    }
    code
}

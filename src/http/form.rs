//! Request parsing: form bodies and client authentication (RFC 6749 §2.3.1, §3.2).

use std::collections::HashMap;

use axum::body::Body;
use axum::http::{HeaderMap, header};
use base64::Engine;
use base64::engine::general_purpose::STANDARD;

use super::error::{ApiError, AuthScheme};
use crate::core::error::OAuthError;
use crate::core::service::ClientCredentials;

/// Largest accepted request body. Token requests are a few hundred bytes.
pub const BODY_LIMIT: usize = 16 * 1024;

/// Form parameters, each present at most once. Empty values count as absent (RFC 6749 §3.1).
#[derive(Debug, Default)]
pub struct Form(HashMap<String, String>);

impl Form {
    pub fn parse(body: &[u8]) -> Result<Self, OAuthError> {
        let mut params = HashMap::new();
        for (name, value) in form_urlencoded::parse(body) {
            if value.is_empty() {
                continue;
            }
            if params.insert(name.to_string(), value.into_owned()).is_some() {
                return Err(OAuthError::InvalidRequest(format!("parameter {name} is repeated")));
            }
        }
        Ok(Self(params))
    }

    pub fn get(&self, name: &str) -> Option<&str> {
        self.0.get(name).map(String::as_str)
    }

    pub fn take(&mut self, name: &str) -> Option<String> {
        self.0.remove(name)
    }

    pub fn require(&mut self, name: &str) -> Result<String, OAuthError> {
        self.take(name).ok_or_else(|| OAuthError::InvalidRequest(format!("missing parameter {name}")))
    }
}

/// Reads a form body: 415 unless it is `application/x-www-form-urlencoded`, 413 past [`BODY_LIMIT`], 408 when it
/// has not all arrived within `timeout` (a client trickling its body holds nothing for longer).
pub async fn read_form(headers: &HeaderMap, body: Body, timeout: std::time::Duration) -> Result<Form, ApiError> {
    let content_type = headers.get(header::CONTENT_TYPE).and_then(|v| v.to_str().ok()).unwrap_or("");
    let mime = content_type.split(';').next().unwrap_or("").trim();
    if !mime.eq_ignore_ascii_case("application/x-www-form-urlencoded") {
        return Err(ApiError::UnsupportedMediaType);
    }
    let bytes = tokio::time::timeout(timeout, axum::body::to_bytes(body, BODY_LIMIT))
        .await
        .map_err(|_| ApiError::RequestTimeout(timeout.as_secs()))?
        .map_err(|_| ApiError::PayloadTooLarge(BODY_LIMIT))?;
    Form::parse(&bytes).map_err(ApiError::from)
}

/// Client credentials from HTTP Basic or the form (never both), with the scheme used.
pub fn client_credentials(headers: &HeaderMap, form: &mut Form) -> Result<(ClientCredentials, AuthScheme), ApiError> {
    let basic = headers.get(header::AUTHORIZATION);
    let form_id = form.take("client_id");
    let form_secret = form.take("client_secret");
    match basic {
        Some(value) => {
            let invalid = || {
                ApiError::OAuth(
                    OAuthError::InvalidClient("malformed Basic authorization header".into()),
                    AuthScheme::Basic,
                )
            };
            let value = value.to_str().map_err(|_| invalid())?;
            let (scheme, encoded) = value.split_once(' ').ok_or_else(invalid)?;
            if !scheme.eq_ignore_ascii_case("basic") {
                return Err(invalid());
            }
            let decoded = STANDARD.decode(encoded.trim()).map_err(|_| invalid())?;
            let decoded = String::from_utf8(decoded).map_err(|_| invalid())?;
            let (id, secret) = decoded.split_once(':').ok_or_else(invalid)?;
            // RFC 6749 §2.3.1: both parts are form-urlencoded before Basic encoding.
            let id = url_decode(id).ok_or_else(invalid)?;
            let secret = url_decode(secret).ok_or_else(invalid)?;
            if form_secret.is_some() {
                return Err(ApiError::OAuth(
                    OAuthError::InvalidRequest(
                        "use one client authentication method, not Basic and client_secret".into(),
                    ),
                    AuthScheme::Basic,
                ));
            }
            if form_id.as_deref().is_some_and(|f| f != id) {
                return Err(ApiError::OAuth(
                    OAuthError::InvalidRequest("client_id does not match the Basic credentials".into()),
                    AuthScheme::Basic,
                ));
            }
            Ok((ClientCredentials { client_id: id, client_secret: secret }, AuthScheme::Basic))
        }
        None => match (form_id, form_secret) {
            (Some(client_id), Some(client_secret)) => {
                Ok((ClientCredentials { client_id, client_secret }, AuthScheme::Post))
            }
            _ => Err(ApiError::OAuth(
                OAuthError::InvalidClient(
                    "client authentication required (HTTP Basic, or client_id and client_secret)".into(),
                ),
                AuthScheme::None,
            )),
        },
    }
}

/// `application/x-www-form-urlencoded` decoding of one value: `+` is a space, `%XX` a byte. A `%` not followed by
/// two hex digits is kept as is, since many clients send secrets unencoded.
fn url_decode(s: &str) -> Option<String> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = |b: u8| (b as char).to_digit(16);
        match bytes[i] {
            b'+' => out.push(b' '),
            b'%' if i + 2 < bytes.len() && hex(bytes[i + 1]).is_some() && hex(bytes[i + 2]).is_some() => {
                out.push((hex(bytes[i + 1])? * 16 + hex(bytes[i + 2])?) as u8);
                i += 2;
            }
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8(out).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn url_decoding_of_basic_credentials() {
        assert_eq!(url_decode("a+b%3Ac").as_deref(), Some("a b:c"));
        assert_eq!(url_decode("100%").as_deref(), Some("100%"));
        assert_eq!(url_decode("%zz%4").as_deref(), Some("%zz%4"));
        assert_eq!(url_decode("%ff"), None);
    }

    #[test]
    fn repeated_parameters_are_rejected_and_empty_ones_ignored() {
        assert!(Form::parse(b"a=1&a=2").is_err());
        let f = Form::parse(b"a=&a=2&b=x+y").expect("form");
        assert_eq!(f.get("a"), Some("2"));
        assert_eq!(f.get("b"), Some("x y"));
    }
}

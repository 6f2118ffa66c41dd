//! The one place where errors become HTTP responses (RFC 6749 §5.2 bodies).

use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};

use crate::core::error::OAuthError;

/// How the client tried to authenticate: decides the `invalid_client` response shape.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AuthScheme {
    Basic,
    Post,
    None,
}

#[derive(Debug)]
pub enum ApiError {
    OAuth(OAuthError, AuthScheme),
    UnsupportedMediaType,
    PayloadTooLarge(usize),
    /// The body did not arrive within the body read timeout (seconds).
    RequestTimeout(u64),
    MethodNotAllowed(&'static str),
}

impl From<OAuthError> for ApiError {
    fn from(e: OAuthError) -> Self {
        ApiError::OAuth(e, AuthScheme::None)
    }
}

impl ApiError {
    /// The `outcome` label for metrics.
    pub fn code(&self) -> &'static str {
        match self {
            ApiError::OAuth(e, _) => e.code(),
            ApiError::UnsupportedMediaType
            | ApiError::PayloadTooLarge(_)
            | ApiError::RequestTimeout(_)
            | ApiError::MethodNotAllowed(_) => "invalid_request",
        }
    }
}

/// Headers every OAuth endpoint response carries (RFC 6749 §5.1).
pub fn no_store(response: &mut Response) {
    let h = response.headers_mut();
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    h.insert(header::PRAGMA, HeaderValue::from_static("no-cache"));
}

/// RFC 6749 section 5.2: `error_description` holds only %x20-21 / %x23-5B / %x5D-7E (no `"`, no `\`, ASCII): a
/// strict client refuses anything else. Descriptions are ours, but some quote a value.
fn wire_description(description: &str) -> String {
    description
        .chars()
        .map(|c| match c {
            '"' => '\'',
            '\\' => '/',
            ' '..='~' => c,
            _ => '?',
        })
        .collect()
}

fn error_body(status: StatusCode, code: &str, description: &str) -> Response {
    let body = serde_json::json!({ "error": code, "error_description": wire_description(description) });
    let mut response = (status, axum::Json(body)).into_response();
    no_store(&mut response);
    response
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        match self {
            ApiError::OAuth(e, scheme) => {
                let status = match &e {
                    OAuthError::InvalidClient(_) => StatusCode::UNAUTHORIZED,
                    OAuthError::ServerError(_) => StatusCode::INTERNAL_SERVER_ERROR,
                    OAuthError::TemporarilyUnavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
                    _ => StatusCode::BAD_REQUEST,
                };
                let mut response = error_body(status, e.code(), e.description());
                if status == StatusCode::UNAUTHORIZED {
                    // RFC 6749 §5.2 requires it for Basic; HTTP (RFC 9110 §15.5.2) requires it on every 401.
                    let challenge = match scheme {
                        AuthScheme::Basic => "Basic realm=\"kubetoken\", error=\"invalid_client\"",
                        AuthScheme::Post | AuthScheme::None => "Basic realm=\"kubetoken\"",
                    };
                    response.headers_mut().insert(header::WWW_AUTHENTICATE, HeaderValue::from_static(challenge));
                }
                if status == StatusCode::SERVICE_UNAVAILABLE {
                    // Storage trouble is short-lived (a busy API server, a full batch): ask clients to come back.
                    response.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
                }
                response
            }
            ApiError::UnsupportedMediaType => error_body(
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                "invalid_request",
                "the request body must be application/x-www-form-urlencoded",
            ),
            ApiError::PayloadTooLarge(limit) => error_body(
                StatusCode::PAYLOAD_TOO_LARGE,
                "invalid_request",
                &format!("the request body is larger than {limit} bytes"),
            ),
            ApiError::RequestTimeout(secs) => {
                let mut r = error_body(
                    StatusCode::REQUEST_TIMEOUT,
                    "invalid_request",
                    &format!("the request body did not arrive within {secs} s"),
                );
                r.headers_mut().insert(header::CONNECTION, HeaderValue::from_static("close"));
                r
            }
            ApiError::MethodNotAllowed(allow) => {
                let mut r = error_body(StatusCode::METHOD_NOT_ALLOWED, "invalid_request", &format!("use {allow}"));
                r.headers_mut().insert(header::ALLOW, HeaderValue::from_static(allow));
                r
            }
        }
    }
}

#[cfg(test)]
mod wire_tests {
    use super::wire_description;

    #[test]
    fn error_descriptions_keep_to_the_characters_rfc_6749_allows() {
        assert_eq!(wire_description(r#""billing-api" is not \ an audience é"#), "'billing-api' is not / an audience ?");
        let all: String = (0u8..=127).map(char::from).chain(['é', '€']).collect();
        let allowed = |b: u8| b == 0x20 || b == 0x21 || (0x23..=0x5B).contains(&b) || (0x5D..=0x7E).contains(&b);
        assert!(wire_description(&all).bytes().all(allowed));
    }
}

//! Handler tests: the router driven in-process (`oneshot`), with the in-memory store.

use std::collections::HashMap;
use std::sync::Arc;

use axum::body::Body;
use axum::http::{Request, StatusCode, header};
use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use tower::ServiceExt;

use super::*;
use crate::core::app::{Application, ApplicationConfig, Registry};
use crate::core::app::{GrantType, TokenFormat};
use crate::core::clock::ManualClock;
use crate::core::model::Change;
use crate::core::scope::ScopePolicy;
use crate::core::signing::Algorithm;
use crate::core::signing::SigningKey;
use crate::core::store::{MemoryStore, StoreError, StoreFuture, StoreWrapper, TokenStore};

/// A client whose secret needs form-encoding inside Basic credentials (RFC 6749 §2.3.1).
const CLIENT_ID: &str = "app one";
const CLIENT_SECRET: &str = "p@ss:word+100%";

fn router_under_test() -> Router {
    router_with_store(Arc::new(MemoryStore::default()))
}

fn router_with_store(store: Arc<dyn TokenStore>) -> Router {
    let key = SigningKey::generate_pkcs8(Algorithm::EdDSA).expect("key");
    let app = Application::new(ApplicationConfig {
        trusted_issuers: Vec::new(),
        name: "default/one".into(),
        client_id: CLIENT_ID.into(),
        client_secrets: vec![CLIENT_SECRET.into()],
        grant_types: vec![GrantType::ClientCredentials],
        format: TokenFormat::Jwt,
        access_ttl: 60,
        refresh_ttl: 120,
        session_max: None,
        max_keys_per_user: 100,
        audience: vec![],
        client_roles: vec![],
        scopes: ScopePolicy::new([("read".to_string(), vec![])]),
        users: HashMap::new(),
        signer: Arc::new(SigningKey::from_pkcs8(Algorithm::EdDSA, &key).expect("parse")),
        verification_keys: vec![],
        token_secrets: vec![vec![7u8; 32]],
    });
    let service = TokenService::new(
        Registry::new(vec![app]).expect("registry"),
        store,
        Arc::new(ManualClock::new(1_000)),
        crate::passwords::service_config("https://tokens.example/", Default::default()),
    );
    router(Arc::new(AppState::new(Arc::new(service), Arc::new(Metrics::default()))))
}

fn encode(s: &str) -> String {
    form_urlencoded::byte_serialize(s.as_bytes()).collect()
}

fn basic() -> String {
    format!("Basic {}", STANDARD.encode(format!("{}:{}", encode(CLIENT_ID), encode(CLIENT_SECRET))))
}

async fn send(req: Request<Body>) -> (StatusCode, axum::http::HeaderMap, serde_json::Value) {
    let response = router_under_test().oneshot(req).await.expect("infallible");
    let status = response.status();
    let headers = response.headers().clone();
    let bytes = axum::body::to_bytes(response.into_body(), 1 << 20).await.expect("body");
    let json = serde_json::from_slice(&bytes).unwrap_or(serde_json::Value::Null);
    (status, headers, json)
}

fn post(path: &str, content_type: &str, auth: Option<&str>, body: &str) -> Request<Body> {
    let mut b = Request::post(path).header(header::CONTENT_TYPE, content_type);
    if let Some(a) = auth {
        b = b.header(header::AUTHORIZATION, a);
    }
    b.body(Body::from(body.to_string())).expect("request")
}

const FORM: &str = "application/x-www-form-urlencoded";

#[tokio::test]
async fn basic_credentials_are_form_decoded() {
    let (status, headers, json) =
        send(post("/oauth2/token", FORM, Some(&basic()), "grant_type=client_credentials&scope=read")).await;
    assert_eq!(status, StatusCode::OK, "{json}");
    assert_eq!(json["scope"], "read");
    assert_eq!(headers[header::CACHE_CONTROL], "no-store");
    assert_eq!(headers[header::PRAGMA], "no-cache");
}

#[tokio::test]
async fn client_secret_post_and_a_charset_parameter_are_accepted() {
    let body = format!(
        "grant_type=client_credentials&client_id={}&client_secret={}",
        encode(CLIENT_ID),
        encode(CLIENT_SECRET)
    );
    let (status, _, json) =
        send(post("/oauth2/token", "application/x-www-form-urlencoded; charset=UTF-8", None, &body)).await;
    assert_eq!(status, StatusCode::OK, "{json}");
}

#[tokio::test]
async fn a_body_client_id_that_contradicts_basic_is_invalid_request() {
    let (status, _, json) =
        send(post("/oauth2/token", FORM, Some(&basic()), "grant_type=client_credentials&client_id=other")).await;
    assert_eq!((status, json["error"].as_str()), (StatusCode::BAD_REQUEST, Some("invalid_request")));
    // The same client_id in the body is fine.
    let body = format!("grant_type=client_credentials&client_id={}", encode(CLIENT_ID));
    let (status, _, _) = send(post("/oauth2/token", FORM, Some(&basic()), &body)).await;
    assert_eq!(status, StatusCode::OK);
}

#[tokio::test]
async fn invalid_client_is_401_with_a_challenge_for_every_scheme() {
    for auth in [Some("Bearer abc"), Some("Basic bm9jb2xvbg=="), None] {
        let (status, headers, json) = send(post("/oauth2/token", FORM, auth, "grant_type=client_credentials")).await;
        assert_eq!(status, StatusCode::UNAUTHORIZED, "{auth:?}");
        assert_eq!(json["error"], "invalid_client");
        assert!(headers[header::WWW_AUTHENTICATE].to_str().expect("ascii").starts_with("Basic realm="));
    }
}

#[tokio::test]
async fn wrong_method_type_and_size_are_rejected_with_json_errors() {
    for path in ["/oauth2/token", "/oauth2/revoke", "/oauth2/introspect"] {
        let (status, headers, json) = send(Request::put(path).body(Body::empty()).expect("request")).await;
        assert_eq!(status, StatusCode::METHOD_NOT_ALLOWED, "{path}");
        assert_eq!(headers[header::ALLOW], "POST");
        assert_eq!(json["error"], "invalid_request");
        let (status, _, json) = send(post(path, "multipart/form-data", Some(&basic()), "token=x")).await;
        assert_eq!((status, json["error"].as_str()), (StatusCode::UNSUPPORTED_MEDIA_TYPE, Some("invalid_request")));
        let big = format!("token={}", "x".repeat(form::BODY_LIMIT));
        let (status, _, _) = send(post(path, FORM, Some(&basic()), &big)).await;
        assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE, "{path}");
    }
}

#[tokio::test]
async fn introspection_of_garbage_is_inactive_and_revocation_of_garbage_is_ok() {
    for token in ["x", "a.b.c", "eyJhbGciOiJub25lIn0.e30.", &"A".repeat(43)] {
        let body = format!("token={}", encode(token));
        let (status, _, json) = send(post("/oauth2/introspect", FORM, Some(&basic()), &body)).await;
        assert_eq!((status, json.clone()), (StatusCode::OK, serde_json::json!({"active": false})), "{token}");
        let (status, _, _) = send(post("/oauth2/revoke", FORM, Some(&basic()), &body)).await;
        assert_eq!(status, StatusCode::OK, "{token}");
    }
}

#[tokio::test]
async fn introspection_of_a_forged_variant_of_a_real_token_is_inactive() {
    use base64::engine::general_purpose::URL_SAFE_NO_PAD;
    let router = router_under_test();
    let introspect =
        |token: &str| post("/oauth2/introspect", FORM, Some(&basic()), &format!("token={}", encode(token)));
    let (_, _, body) =
        send_to(&router, post("/oauth2/token", FORM, Some(&basic()), "grant_type=client_credentials&scope=read")).await;
    let token = serde_json::from_slice::<serde_json::Value>(&body).expect("json")["access_token"]
        .as_str()
        .expect("token")
        .to_string();
    let (header, rest) = token.split_once('.').expect("header");
    let (payload, sig) = rest.split_once('.').expect("signature");
    let mut flipped = URL_SAFE_NO_PAD.decode(sig).expect("signature");
    flipped[0] ^= 1;
    let kid = jsonwebtoken::decode_header(&token).expect("header").kid.expect("kid");
    let none = URL_SAFE_NO_PAD.encode(serde_json::json!({"alg": "none", "kid": kid, "typ": "at+jwt"}).to_string());
    for forged in [
        format!("{header}.{payload}.{}", URL_SAFE_NO_PAD.encode(flipped)),
        format!("{none}.{payload}."),
        format!("{none}.{payload}.{sig}"),
        format!("{header}.{payload}.{sig}.{sig}"),
    ] {
        let (status, _, body) = send_to(&router, introspect(&forged)).await;
        assert_eq!(
            (status, String::from_utf8_lossy(&body).into_owned()),
            (StatusCode::OK, r#"{"active":false}"#.into()),
            "{forged}"
        );
    }
    let (status, _, body) = send_to(&router, introspect(&token)).await;
    let json: serde_json::Value = serde_json::from_slice(&body).expect("json");
    assert_eq!((status, &json["active"]), (StatusCode::OK, &serde_json::json!(true)));
}

#[tokio::test]
async fn metadata_and_jwks_describe_this_server() {
    let (status, _, m) =
        send(Request::get("/.well-known/oauth-authorization-server").body(Body::empty()).expect("req")).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(m["issuer"], "https://tokens.example/");
    assert_eq!(m["token_endpoint"], "https://tokens.example/oauth2/token");
    assert_eq!(m["grant_types_supported"], serde_json::json!(["client_credentials"]));
    assert_eq!(m["scopes_supported"], serde_json::json!(["default", "read"]));
    let (status, headers, jwks) = send(Request::get("/oauth2/jwks").body(Body::empty()).expect("req")).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(headers[header::CONTENT_TYPE], "application/jwk-set+json");
    assert_eq!(jwks["keys"][0]["kty"], "OKP");
    assert_eq!(jwks["keys"][0]["alg"], "EdDSA");
}

/// A store whose writes fail the way a FileStore's do after a failed fsync: every commit is refused as
/// unavailable, and from the first failure on the store reports itself unhealthy.
#[derive(Default)]
struct FailingStore {
    inner: MemoryStore,
    failed: std::sync::atomic::AtomicBool,
}

impl StoreWrapper for FailingStore {
    fn inner(&self) -> &dyn TokenStore {
        &self.inner
    }
    fn wrap_commit(&self, _change: Change) -> StoreFuture<'_, ()> {
        self.failed.store(true, std::sync::atomic::Ordering::SeqCst);
        Box::pin(async { Err(StoreError::Unavailable("disk full".into())) })
    }
    fn wrap_healthy(&self) -> bool {
        !self.failed.load(std::sync::atomic::Ordering::SeqCst)
    }
}

async fn send_to(router: &Router, req: Request<Body>) -> (StatusCode, axum::http::HeaderMap, Vec<u8>) {
    let response = router.clone().oneshot(req).await.expect("infallible");
    let status = response.status();
    let headers = response.headers().clone();
    let bytes = axum::body::to_bytes(response.into_body(), 1 << 20).await.expect("body");
    (status, headers, bytes.to_vec())
}

#[tokio::test]
async fn a_storage_write_failure_is_503_temporarily_unavailable_and_turns_readiness_off() {
    let router = router_with_store(Arc::new(FailingStore::default()));
    let readyz = || Request::get("/readyz").body(Body::empty()).expect("request");
    let (status, _, _) = send_to(&router, readyz()).await;
    assert_eq!(status, StatusCode::OK, "ready before anything failed");

    let (status, headers, body) =
        send_to(&router, post("/oauth2/token", FORM, Some(&basic()), "grant_type=client_credentials&scope=read")).await;
    let json: serde_json::Value = serde_json::from_slice(&body).expect("JSON error body");
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{json}");
    assert_eq!(json["error"], "temporarily_unavailable");
    assert!(json.get("access_token").is_none(), "no token that is not durable: {json}");
    assert_eq!(headers[header::RETRY_AFTER], "1");
    assert_eq!(headers[header::CACHE_CONTROL], "no-store");

    let (status, _, body) = send_to(&router, readyz()).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{}", String::from_utf8_lossy(&body));
}

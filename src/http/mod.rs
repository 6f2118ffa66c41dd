//! The HTTP server, the same for standalone mode and the in-cluster sidecar. Handlers only parse, call the core
//! and map errors ([`error`] is the one place that happens).

pub mod error;
pub mod exposure;
pub mod form;
pub mod serve;
pub mod tls;

use std::borrow::Cow;
use std::sync::Arc;
use std::time::Instant;

use axum::body::Body;
use axum::extract::{ConnectInfo, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Extension, Router};
use serde_json::{Value, json};

use self::error::{ApiError, AuthScheme, no_store};
use self::exposure::IssuerPolicy;
use self::form::{client_credentials, read_form};
use self::serve::Peer;
use crate::core::app::GrantType;
use crate::core::error::OAuthError;
use crate::core::service::{ClientCredentials, Grant, Introspection, IssuedTokens, TokenExchange, TokenService};
use crate::metrics::Metrics;

/// What besides the token storage decides readiness, and what else `/metrics` shows (the sidecar's caches and
/// Kubernetes storage).
pub trait ServerExtras: Send + Sync {
    /// Why the server cannot serve tokens yet, if it cannot.
    fn not_ready(&self) -> Option<String>;
    /// Appends Prometheus text exposition lines.
    fn render_metrics(&self, out: &mut String);
}

pub struct AppState {
    pub service: Arc<TokenService>,
    pub metrics: Arc<Metrics>,
    extras: Option<Arc<dyn ServerExtras>>,
    /// None: every request sees the service's issuer.
    issuer: Option<IssuerPolicy>,
    body_read_timeout: std::time::Duration,
}

impl AppState {
    pub fn new(service: Arc<TokenService>, metrics: Arc<Metrics>) -> Self {
        Self { service, metrics, extras: None, issuer: None, body_read_timeout: DEFAULT_BODY_READ_TIMEOUT }
    }

    pub fn with_extras(mut self, extras: Arc<dyn ServerExtras>) -> Self {
        self.extras = Some(extras);
        self
    }

    /// How long a request body may take to arrive.
    pub fn with_body_read_timeout(mut self, timeout: std::time::Duration) -> Self {
        self.body_read_timeout = timeout;
        self
    }

    /// Derive the issuer per request (forwarded headers from a trusted TLS-terminating proxy).
    pub fn with_issuer_policy(mut self, policy: IssuerPolicy) -> Self {
        self.issuer = Some(policy);
        self
    }

    fn issuer_for(&self, peer: Option<Extension<ConnectInfo<Peer>>>, headers: &HeaderMap) -> Cow<'_, str> {
        match &self.issuer {
            Some(policy) => policy.for_request(peer.map(|Extension(ConnectInfo(Peer(addr)))| addr), headers),
            None => Cow::Borrowed(self.service.issuer()),
        }
    }
}

pub const DEFAULT_BODY_READ_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// The peer address, when the server recorded it (not in `Router::oneshot` tests).
type PeerInfo = Option<Extension<ConnectInfo<Peer>>>;

pub fn router(state: Arc<AppState>) -> Router {
    let post_only = || async { ApiError::MethodNotAllowed("POST") };
    Router::new()
        .route("/oauth2/token", post(token).fallback(post_only))
        .route("/oauth2/revoke", post(revoke).fallback(post_only))
        .route("/oauth2/introspect", post(introspect).fallback(post_only))
        .route("/oauth2/jwks", get(jwks))
        .route("/.well-known/oauth-authorization-server", get(metadata))
        .route("/healthz", get(|| async { "ok" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .with_state(state)
}

/// Only `/healthz`, `/readyz` and `/metrics`: for a port the kubelet and Prometheus reach on the pod IP while the
/// token endpoint stays on the loopback.
pub fn health_router(state: Arc<AppState>) -> Router {
    Router::new()
        .route("/healthz", get(|| async { "ok" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .with_state(state)
}

/// RFC 8414 metadata, true to what this server does.
fn server_metadata(service: &TokenService, issuer_id: &str) -> Value {
    let issuer = issuer_id.trim_end_matches('/');
    let registry = service.registry();
    let mut grants: Vec<&str> = registry.apps().flat_map(|a| a.grant_types.iter().map(|g| g.as_str())).collect();
    grants.sort_unstable();
    grants.dedup();
    let mut scopes: Vec<&str> = registry.apps().flat_map(|a| a.scopes.declared_names()).collect();
    scopes.push(crate::core::scope::DEFAULT_SCOPE);
    scopes.sort_unstable();
    scopes.dedup();
    let auth_methods = ["client_secret_basic", "client_secret_post"];
    json!({
        "issuer": issuer_id,
        "token_endpoint": format!("{issuer}/oauth2/token"),
        "revocation_endpoint": format!("{issuer}/oauth2/revoke"),
        "introspection_endpoint": format!("{issuer}/oauth2/introspect"),
        "jwks_uri": format!("{issuer}/oauth2/jwks"),
        "grant_types_supported": grants,
        // No authorization endpoint: no response types.
        "response_types_supported": [],
        "scopes_supported": scopes,
        "token_endpoint_auth_methods_supported": auth_methods,
        "revocation_endpoint_auth_methods_supported": auth_methods,
        "introspection_endpoint_auth_methods_supported": auth_methods,
    })
}

fn token_response(t: IssuedTokens) -> Response {
    let mut body = json!({
        "access_token": t.access_token,
        "token_type": "Bearer",
        "expires_in": t.expires_in,
        "scope": t.scope,
    });
    if let Value::Object(map) = &mut body {
        if let Some(refresh) = t.refresh_token {
            map.insert("refresh_token".into(), Value::String(refresh));
        }
        if let Some(issued) = t.issued_token_type {
            map.insert("issued_token_type".into(), Value::String(issued.into()));
        }
    }
    let mut response = axum::Json(body).into_response();
    no_store(&mut response);
    response
}

fn log_rejection(endpoint: &str, e: &ApiError) {
    match e {
        ApiError::OAuth(OAuthError::ServerError(d) | OAuthError::TemporarilyUnavailable(d), _) => {
            tracing::error!(endpoint, description = %d, "request failed")
        }
        ApiError::OAuth(err, _) => {
            tracing::info!(endpoint, error = err.code(), description = err.description(), "request rejected")
        }
        other => tracing::info!(endpoint, error = ?other, "request rejected"),
    }
}

/// Every grant type this server knows: the `grant_type` metric label, and the supported list of errors.
const GRANT_TYPES: [GrantType; 5] = [
    GrantType::Password,
    GrantType::ClientCredentials,
    GrantType::RefreshToken,
    GrantType::JwtBearer,
    GrantType::TokenExchange,
];

async fn token(State(s): State<Arc<AppState>>, peer: PeerInfo, headers: HeaderMap, body: Body) -> Response {
    let started = Instant::now();
    let mut grant_label = "unknown";
    let result: Result<IssuedTokens, ApiError> = async {
        let mut form = read_form(&headers, body, s.body_read_timeout).await?;
        let grant_type = form.get("grant_type").map(str::to_string);
        grant_label =
            GRANT_TYPES.iter().map(|g| g.as_str()).find(|g| Some(*g) == grant_type.as_deref()).unwrap_or("unknown");
        let (creds, scheme) = client_credentials(&headers, &mut form)?;
        let with_scheme = |e: OAuthError| ApiError::OAuth(e, scheme);
        let grant = match grant_type.as_deref() {
            None => return Err(with_scheme(OAuthError::InvalidRequest("missing parameter grant_type".into()))),
            Some("password") => Grant::Password {
                username: form.require("username").map_err(with_scheme)?,
                password: form.require("password").map_err(with_scheme)?,
                scope: form.take("scope"),
            },
            Some("client_credentials") => Grant::ClientCredentials { scope: form.take("scope") },
            Some("refresh_token") => Grant::RefreshToken {
                refresh_token: form.require("refresh_token").map_err(with_scheme)?,
                scope: form.take("scope"),
            },
            Some("urn:ietf:params:oauth:grant-type:jwt-bearer") => Grant::JwtBearer {
                assertion: form.require("assertion").map_err(with_scheme)?,
                scope: form.take("scope"),
            },
            Some("urn:ietf:params:oauth:grant-type:token-exchange") => Grant::TokenExchange(TokenExchange {
                subject_token: form.require("subject_token").map_err(with_scheme)?,
                subject_token_type: form.require("subject_token_type").map_err(with_scheme)?,
                requested_token_type: form.take("requested_token_type"),
                scope: form.take("scope"),
                // One of each: the form refuses a repeated parameter, and an exchange names this application's
                // audience at most.
                audience: form.take("audience").into_iter().collect(),
                resource: form.take("resource").into_iter().collect(),
                actor_token: form.take("actor_token"),
            }),
            Some(_) => {
                let supported: Vec<&str> = GRANT_TYPES.iter().map(|g| g.as_str()).collect();
                return Err(with_scheme(OAuthError::UnsupportedGrantType(format!(
                    "supported grant types: {}",
                    supported.join(", ")
                ))));
            }
        };
        let issuer = s.issuer_for(peer, &headers);
        s.service.token_with_issuer(&issuer, &creds, grant).await.map_err(with_scheme)
    }
    .await;
    s.metrics.observe_latency("token", started.elapsed().as_secs_f64());
    match result {
        Ok(t) => {
            s.metrics.token_outcome(grant_label, if t.reused { "reused" } else { "issued" });
            token_response(t)
        }
        Err(e) => {
            s.metrics.token_outcome(grant_label, e.code());
            log_rejection("token", &e);
            e.into_response()
        }
    }
}

/// The form of the revocation and introspection endpoints: client authentication and a `token`.
/// (`token_type_hint` is only a hint (RFC 7009 §2.1): both token kinds are recognised without it.)
async fn token_form(
    s: &AppState,
    headers: &HeaderMap,
    body: Body,
) -> Result<(ClientCredentials, AuthScheme, String), ApiError> {
    let mut form = read_form(headers, body, s.body_read_timeout).await?;
    let (creds, scheme) = client_credentials(headers, &mut form)?;
    let token = form.require("token").map_err(|e| ApiError::OAuth(e, scheme))?;
    Ok((creds, scheme, token))
}

async fn revoke(State(s): State<Arc<AppState>>, headers: HeaderMap, body: Body) -> Response {
    let started = Instant::now();
    let result: Result<bool, ApiError> = async {
        let (creds, scheme, token) = token_form(&s, &headers, body).await?;
        s.service.revoke(&creds, &token).await.map_err(|e| ApiError::OAuth(e, scheme))
    }
    .await;
    s.metrics.observe_latency("revoke", started.elapsed().as_secs_f64());
    match result {
        Ok(revoked) => {
            if revoked {
                s.metrics.revoked();
            }
            let mut r = StatusCode::OK.into_response();
            no_store(&mut r);
            r
        }
        Err(e) => {
            log_rejection("revoke", &e);
            e.into_response()
        }
    }
}

async fn introspect(State(s): State<Arc<AppState>>, peer: PeerInfo, headers: HeaderMap, body: Body) -> Response {
    let started = Instant::now();
    let result: Result<Introspection, ApiError> = async {
        let (creds, scheme, token) = token_form(&s, &headers, body).await?;
        let issuer = s.issuer_for(peer, &headers);
        s.service.introspect_with_issuer(&issuer, &creds, &token).await.map_err(|e| ApiError::OAuth(e, scheme))
    }
    .await;
    s.metrics.observe_latency("introspect", started.elapsed().as_secs_f64());
    let mut response = match result {
        Ok(Introspection::Active(active)) => axum::Json(active).into_response(),
        Ok(Introspection::Inactive) => axum::Json(json!({"active": false})).into_response(),
        Err(e) => {
            log_rejection("introspect", &e);
            return e.into_response();
        }
    };
    no_store(&mut response);
    response
}

async fn jwks(State(s): State<Arc<AppState>>) -> Response {
    let jwks = match s.service.jwks() {
        Ok(jwks) => jwks,
        Err(e) => {
            tracing::error!(error = %e, "could not serialize the JWKS");
            return StatusCode::INTERNAL_SERVER_ERROR.into_response();
        }
    };
    let mut r = axum::Json(jwks).into_response();
    r.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("application/jwk-set+json"));
    r
}

async fn metadata(State(s): State<Arc<AppState>>, peer: PeerInfo, headers: HeaderMap) -> Response {
    let issuer = s.issuer_for(peer, &headers);
    axum::Json(server_metadata(&s.service, &issuer)).into_response()
}

async fn readyz(State(s): State<Arc<AppState>>) -> Response {
    if let Some(reason) = s.extras.as_ref().and_then(|e| e.not_ready()) {
        return (StatusCode::SERVICE_UNAVAILABLE, reason).into_response();
    }
    if s.service.store_healthy() {
        "ready".into_response()
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "token storage unavailable").into_response()
    }
}

async fn metrics(State(s): State<Arc<AppState>>) -> Response {
    let mut text = s.metrics.render();
    if let Some(extras) = &s.extras {
        extras.render_metrics(&mut text);
    }
    let mut r = text.into_response();
    r.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain; version=0.0.4"));
    r
}

#[cfg(test)]
mod tests;

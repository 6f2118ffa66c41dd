//! What the in-process benchmarks share: an application's configuration at the defaults, one client_credentials
//! application (`bench` / `bench-secret`, scope `orders:read`, JWT access tokens) and the token service serving it
//! from a given store.

use std::collections::HashMap;
use std::sync::Arc;

use kubetoken::core::app::{Application, ApplicationConfig, GrantType, Registry, TokenFormat};
use kubetoken::core::clock::SystemClock;
use kubetoken::core::scope::ScopePolicy;
use kubetoken::core::service::{ClientCredentials, TokenService};
use kubetoken::core::signing::SigningKey;
use kubetoken::core::store::TokenStore;

/// An application `client_id` (secret `client_secret`) with the default lifetimes (1 h access, 24 h refresh),
/// signing with `signer`, its token strings tagged with a fixed secret; no grant types, scopes or users yet.
pub fn app_config(client_id: &str, client_secret: &str, signer: Arc<SigningKey>) -> ApplicationConfig {
    ApplicationConfig {
        trusted_issuers: Vec::new(),
        name: format!("default/{client_id}"),
        client_id: client_id.into(),
        client_secrets: vec![client_secret.into()],
        grant_types: vec![],
        format: TokenFormat::Jwt,
        access_ttl: 3600,
        refresh_ttl: 86_400,
        session_max: None,
        max_keys_per_user: 100,
        audience: vec![],
        client_roles: vec![],
        scopes: ScopePolicy::new([]),
        users: HashMap::new(),
        signer,
        verification_keys: vec![],
        token_secrets: vec![TOKEN_SECRET.to_vec()],
    }
}

/// The secret that tags the benchmarks' opaque and refresh token strings.
pub const TOKEN_SECRET: [u8; 32] = [7; 32];

/// The token service of the `bench` application, signing with `key`, its state in `store`.
pub fn client_credentials_service(key: Arc<SigningKey>, store: Arc<dyn TokenStore>) -> TokenService {
    service(
        ApplicationConfig {
            grant_types: vec![GrantType::ClientCredentials],
            scopes: ScopePolicy::new([("orders:read".to_string(), vec![])]),
            ..app_config("bench", "bench-secret", key)
        },
        store,
    )
}

/// The token service of one application, its state in `store`.
fn service(config: ApplicationConfig, store: Arc<dyn TokenStore>) -> TokenService {
    TokenService::new(
        Registry::new(vec![Application::new(config)]).expect("registry"),
        store,
        Arc::new(SystemClock),
        kubetoken::passwords::service_config("http://127.0.0.1:8080", Default::default()),
    )
}

/// The `bench` application trusting `issuer` for the JWT-bearer grant (scope `orders:read` for role `customer`).
#[allow(dead_code)] // only the mint benchmark uses it
pub fn federated_service(
    key: Arc<SigningKey>,
    issuer: kubetoken::core::assertion::TrustedIssuer,
    store: Arc<dyn TokenStore>,
) -> TokenService {
    service(
        ApplicationConfig {
            grant_types: vec![GrantType::JwtBearer, GrantType::RefreshToken],
            scopes: ScopePolicy::new([("orders:read".to_string(), vec!["customer".to_string()])]),
            trusted_issuers: vec![issuer],
            ..app_config("bench", "bench-secret", key)
        },
        store,
    )
}

/// The `bench` application's credentials.
pub fn credentials() -> ClientCredentials {
    ClientCredentials { client_id: "bench".into(), client_secret: "bench-secret".into() }
}

//! What the in-process benchmarks share: one client_credentials application (`bench` / `bench-secret`, scope
//! `orders:read`, JWT access tokens) and the token service serving it from a given store.

use std::collections::HashMap;
use std::sync::Arc;

use kubetoken::core::app::{Application, ApplicationConfig, GrantType, Registry, TokenFormat};
use kubetoken::core::clock::SystemClock;
use kubetoken::core::scope::ScopePolicy;
use kubetoken::core::service::{ClientCredentials, TokenService};
use kubetoken::core::signing::SigningKey;
use kubetoken::core::store::TokenStore;

/// The token service of the `bench` application, signing with `key`, its state in `store`.
pub fn client_credentials_service(key: Arc<SigningKey>, store: Arc<dyn TokenStore>) -> TokenService {
    let app = Application::new(ApplicationConfig {
        name: "default/bench".into(),
        client_id: "bench".into(),
        client_secrets: vec!["bench-secret".into()],
        grant_types: vec![GrantType::ClientCredentials],
        format: TokenFormat::Jwt,
        access_ttl: 3600,
        refresh_ttl: 86_400,
        session_max: None,
        max_keys_per_user: 100,
        audience: vec![],
        client_roles: vec![],
        scopes: ScopePolicy::new([("orders:read".to_string(), vec![])]),
        users: HashMap::new(),
        signer: key,
        verification_keys: vec![],
        token_secrets: vec![vec![7u8; 32]],
    });
    TokenService::new(
        Registry::new(vec![app]).expect("registry"),
        store,
        Arc::new(SystemClock),
        kubetoken::passwords::service_config("http://127.0.0.1:8080", Default::default()),
    )
}

/// The `bench` application's credentials.
pub fn credentials() -> ClientCredentials {
    ClientCredentials { client_id: "bench".into(), client_secret: "bench-secret".into() }
}

//! Users of a trusted identity provider (jwt-bearer, token exchange) on the pure core: assertions signed here, key
//! sets given or served by a fake source, a manual clock.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use jsonwebtoken::jwk::JwkSet;
use serde_json::json;

use super::*;
use crate::core::assertion::{KeySetFuture, KeySource, TrustedIssuer};
use crate::core::clock::ManualClock;
use crate::core::scope::ScopePolicy;
use crate::core::signing::{Algorithm, SigningKey};
use crate::core::store::{MemoryStore, StoreFuture, StoreWrapper};

const T0: UnixTime = 1_800_000_000;
const IDP: &str = "https://idp.test/realms/shop";

fn key() -> SigningKey {
    SigningKey::from_pkcs8(Algorithm::ES256, &SigningKey::generate_pkcs8(Algorithm::ES256).expect("key")).expect("key")
}

fn set(keys: &[&SigningKey]) -> Arc<JwkSet> {
    Arc::new(JwkSet { keys: keys.iter().map(|k| k.public_jwk().clone()).collect() })
}

fn trusted(keys: KeySource) -> TrustedIssuer {
    TrustedIssuer {
        issuer: IDP.into(),
        keys,
        audiences: vec!["shop".into()],
        username_claim: "preferred_username".into(),
        roles_claim: Some("realm_access.roles".into()),
        allowed_algorithms: vec![jsonwebtoken::Algorithm::ES256],
        max_assertion_age: 3600,
    }
}

fn application(client_id: &str, format: TokenFormat, grants: &[GrantType], issuers: Vec<TrustedIssuer>) -> Application {
    let users = HashMap::from([("alice".to_string(), super::tests::user("alice-pw", &["customer"]))]);
    let scopes = ScopePolicy::new([
        ("orders:read".to_string(), vec!["customer".to_string()]),
        ("orders:admin".to_string(), vec!["admin".to_string()]),
    ]);
    let mut app = super::tests::application(client_id, format, grants, users, scopes);
    app.trusted_issuers = issuers;
    app.max_keys_per_user = 3;
    app
}

const FEDERATED: &[GrantType] =
    &[GrantType::JwtBearer, GrantType::TokenExchange, GrantType::RefreshToken, GrantType::Password];

struct Fed {
    service: TokenService,
    clock: Arc<ManualClock>,
    idp: SigningKey,
    jti: AtomicUsize,
}

fn fed(format: TokenFormat) -> Fed {
    let idp = key();
    let app = application("shop", format, FEDERATED, vec![trusted(KeySource::Fixed(set(&[&idp])))]);
    fed_with(app, idp, Arc::new(MemoryStore::default()), None)
}

fn fed_with(app: Application, idp: SigningKey, store: Arc<dyn TokenStore>, keys: Option<Arc<dyn KeySetSource>>) -> Fed {
    let clock = Arc::new(ManualClock::new(T0));
    let config = ServiceConfig {
        key_sets: keys,
        ..crate::passwords::service_config("https://kubetoken.test", ServicePolicies::default())
    };
    let service = TokenService::new(Registry::new(vec![app]).expect("registry"), store, clock.clone(), config);
    Fed { service, clock, idp, jti: AtomicUsize::new(0) }
}

fn client() -> ClientCredentials {
    ClientCredentials { client_id: "shop".into(), client_secret: "s3cret".into() }
}

impl Fed {
    /// An ID token of the issuer for `user` with `roles`, a fresh `jti` each time; `extra` overrides claims.
    fn assertion(&self, user: &str, roles: &[&str], extra: serde_json::Value) -> String {
        self.assertion_by(&self.idp, user, roles, extra)
    }

    fn assertion_by(&self, key: &SigningKey, user: &str, roles: &[&str], extra: serde_json::Value) -> String {
        let now = self.clock.now();
        let mut claims = json!({
            "iss": IDP, "aud": "shop", "sub": format!("id-{user}"), "preferred_username": user,
            "realm_access": {"roles": roles}, "iat": now, "exp": now + 300,
            "jti": format!("jti-{}", self.jti.fetch_add(1, Ordering::SeqCst)),
        });
        if let (Some(c), Some(e)) = (claims.as_object_mut(), extra.as_object()) {
            for (k, v) in e {
                if v.is_null() {
                    c.remove(k);
                } else {
                    c.insert(k.clone(), v.clone());
                }
            }
        }
        key.sign_jwt(&serde_json::to_vec(&claims).expect("json")).expect("sign")
    }

    async fn bearer(&self, assertion: &str, scope: &str) -> Result<IssuedTokens, OAuthError> {
        let grant = Grant::JwtBearer { assertion: assertion.into(), scope: Some(scope.into()) };
        self.service.token(&client(), grant).await
    }

    async fn exchange(&self, subject_token: &str, scope: &str) -> Result<IssuedTokens, OAuthError> {
        self.exchange_with(TokenExchange {
            subject_token: subject_token.into(),
            subject_token_type: TOKEN_TYPE_ID_TOKEN.into(),
            scope: Some(scope.into()),
            ..Default::default()
        })
        .await
    }

    async fn exchange_with(&self, exchange: TokenExchange) -> Result<IssuedTokens, OAuthError> {
        self.service.token(&client(), Grant::TokenExchange(exchange)).await
    }

    async fn introspect(&self, token: &str) -> Option<ActiveToken> {
        match self.service.introspect(&client(), token).await.expect("introspect") {
            Introspection::Active(a) => Some(*a),
            Introspection::Inactive => None,
        }
    }
}

#[tokio::test]
async fn a_jwt_bearer_assertion_gives_per_device_tokens_with_role_checked_scopes() {
    let f = fed(TokenFormat::Jwt);
    let ipad = f.bearer(&f.assertion("alice", &["customer"], json!({})), "device_ipad orders:read orders:admin").await;
    let ipad = ipad.expect("ipad");
    // orders:admin needs a role the assertion does not carry: dropped, not an error.
    assert_eq!(ipad.scope, "device_ipad orders:read");
    assert!(ipad.refresh_token.is_some(), "refresh_token is among the grant types");
    assert_eq!(ipad.issued_token_type, None, "issued_token_type belongs to token exchange");
    let iphone = f.bearer(&f.assertion("alice", &["customer"], json!({})), "device_iphone").await.expect("iphone");
    let claims = f.introspect(&ipad.access_token).await.expect("the iPad token is active");
    assert_eq!((claims.sub.as_str(), claims.username.as_deref()), ("alice", Some("alice")));
    assert_eq!(claims.idp.as_deref(), Some(IDP));
    assert!(f.introspect(&iphone.access_token).await.is_some(), "the iPhone token lives beside it");
    // A new assertion for the same (user, scope set) supersedes the iPad's token, not the iPhone's.
    let ipad2 = f.bearer(&f.assertion("alice", &["customer"], json!({})), "orders:read device_ipad").await;
    let ipad2 = ipad2.expect("ipad again");
    assert!(f.introspect(&ipad.access_token).await.is_none(), "superseded");
    assert!(f.introspect(&ipad2.access_token).await.is_some());
    assert!(f.introspect(&iphone.access_token).await.is_some());
    // Nothing granted: `default`.
    let none = f.bearer(&f.assertion("alice", &[], json!({})), "orders:admin").await.expect("default");
    assert_eq!(none.scope, "default");
}

#[tokio::test]
async fn a_federated_user_is_not_the_local_user_of_the_same_name() {
    let f = fed(TokenFormat::Jwt);
    let local =
        Grant::Password { username: "alice".into(), password: "alice-pw".into(), scope: Some("device_ipad".into()) };
    let local = f.service.token(&client(), local).await.expect("local alice");
    let federated = f.bearer(&f.assertion("alice", &[], json!({})), "device_ipad").await.expect("federated alice");
    assert!(f.introspect(&local.access_token).await.is_some(), "the local user's token is not superseded");
    assert!(f.introspect(&federated.access_token).await.is_some());
    let local_claims = f.introspect(&local.access_token).await.expect("active");
    assert_eq!(local_claims.idp, None);
}

#[tokio::test]
async fn an_assertion_is_one_grant_and_a_subject_token_one_exchange_per_token_key() {
    let f = fed(TokenFormat::Jwt);
    let assertion = f.assertion("alice", &["customer"], json!({}));
    f.bearer(&assertion, "device_ipad").await.expect("first use");
    let replay = f.bearer(&assertion, "device_iphone").await.expect_err("replay");
    assert_eq!((replay.code(), replay.description()), ("invalid_grant", "the assertion was already used"));

    // The backend holding the user's ID token exchanges it for the iPad's token and for the iPhone's...
    let id_token = f.assertion("alice", &["customer"], json!({}));
    let ipad = f.exchange(&id_token, "device_ipad orders:read").await.expect("ipad");
    assert_eq!(ipad.issued_token_type, Some(TOKEN_TYPE_ACCESS_TOKEN));
    assert_eq!(ipad.scope, "device_ipad orders:read");
    let iphone = f.exchange(&id_token, "device_iphone").await.expect("iphone");
    assert!(f.introspect(&ipad.access_token).await.is_some() && f.introspect(&iphone.access_token).await.is_some());
    // ...but the same exchange again is a replay.
    let again = f.exchange(&id_token, "orders:read device_ipad").await.expect_err("replayed exchange");
    assert_eq!(again.code(), "invalid_grant");
    // Without a jti the signed part names the assertion.
    let no_jti = f.assertion("alice", &[], json!({"jti": null}));
    f.bearer(&no_jti, "device_tv").await.expect("first");
    assert_eq!(f.bearer(&no_jti, "device_tv").await.expect_err("replay").code(), "invalid_grant");
}

#[tokio::test]
async fn opaque_tokens_are_handed_out_again_for_the_same_set_through_both_grants() {
    let f = fed(TokenFormat::Opaque);
    let first = f.bearer(&f.assertion("alice", &["customer"], json!({})), "device_ipad").await.expect("first");
    let second = f.exchange(&f.assertion("alice", &["customer"], json!({})), "device_ipad").await.expect("second");
    assert_eq!(first.access_token, second.access_token, "the same still-valid token for the same set");
    assert!(second.reused);
    let other = f.bearer(&f.assertion("alice", &[], json!({})), "device_iphone").await.expect("other");
    assert_ne!(other.access_token, first.access_token);
}

#[tokio::test]
async fn the_device_cap_holds_for_federated_users() {
    let f = fed(TokenFormat::Jwt);
    let mut tokens = Vec::new();
    for device in ["a", "b", "c", "d"] {
        let t = f.bearer(&f.assertion("carol", &[], json!({})), &format!("device_{device}")).await.expect("token");
        tokens.push(t.access_token);
        f.clock.advance(1);
    }
    // maxTokenKeysPerUser is 3: the least recently issued key's pair went.
    assert!(f.introspect(&tokens[0]).await.is_none());
    for t in &tokens[1..] {
        assert!(f.introspect(t).await.is_some());
    }
}

#[tokio::test]
async fn a_federated_refresh_keeps_the_login_roles_and_rechecks_what_it_can() {
    let idp = key();
    let fixed = KeySource::Fixed(set(&[&idp]));
    let f = fed_with(
        application("shop", TokenFormat::Jwt, FEDERATED, vec![trusted(fixed.clone())]),
        key(),
        Arc::new(MemoryStore::default()),
        None,
    );
    let f = Fed { idp, ..f };
    let login =
        f.bearer(&f.assertion("alice", &["customer"], json!({})), "device_ipad orders:read").await.expect("login");
    let refresh = |t: &str| Grant::RefreshToken { refresh_token: t.into(), scope: None };
    let next = f.service.token(&client(), refresh(login.refresh_token.as_deref().expect("rt"))).await.expect("refresh");
    // The roles checked at login stand: there is no assertion to read them again from.
    assert_eq!(next.scope, "device_ipad orders:read");
    let claims = f.introspect(&next.access_token).await.expect("active");
    assert_eq!(claims.idp.as_deref(), Some(IDP));

    // The application no longer trusts the issuer: its users' refresh tokens are refused.
    f.service
        .set_registry(Registry::new(vec![application("shop", TokenFormat::Jwt, FEDERATED, vec![])]).expect("registry"));
    let e = f.service.token(&client(), refresh(next.refresh_token.as_deref().expect("rt"))).await.expect_err("gone");
    assert_eq!(e.code(), "invalid_grant");
    assert!(e.description().contains("no longer trusted"), "{}", e.description());

    // Trusted again, but the federated grants disabled: refused too.
    let no_federation = &[GrantType::Password, GrantType::RefreshToken];
    f.service.set_registry(
        Registry::new(vec![application("shop", TokenFormat::Jwt, no_federation, vec![trusted(fixed)])])
            .expect("registry"),
    );
    let e = f.service.token(&client(), refresh(next.refresh_token.as_deref().expect("rt"))).await.expect_err("off");
    assert!(e.description().contains("no longer enabled"), "{}", e.description());
}

#[tokio::test]
async fn the_grants_refuse_what_they_cannot_accept_with_the_right_error() {
    let f = fed(TokenFormat::Jwt);
    let stranger = key();
    let cases: Vec<(String, &str, &str)> = vec![
        (f.assertion_by(&stranger, "alice", &[], json!({})), "invalid_grant", "signing key"),
        (f.assertion("alice", &[], json!({"iss": "https://evil.test"})), "invalid_grant", "issuer is not trusted"),
        (f.assertion("alice", &[], json!({"aud": "other"})), "invalid_grant", "audience"),
        (f.assertion("alice", &[], json!({"exp": T0 - 61})), "invalid_grant", "expired"),
        (f.assertion("alice", &[], json!({"nbf": T0 + 120})), "invalid_grant", "not valid yet"),
        (f.assertion("alice", &[], json!({"iat": T0 - 3700})), "invalid_grant", "too long ago"),
        (f.assertion("alice", &[], json!({"preferred_username": null})), "invalid_grant", "names the user"),
        (f.assertion("alice", &[], json!({"preferred_username": ["a"]})), "invalid_grant", "names the user"),
        (f.assertion("alice", &[], json!({"preferred_username": "a".repeat(513)})), "invalid_grant", "512 bytes"),
        (f.assertion("alice", &[], json!({"preferred_username": "a\u{0}b"})), "invalid_grant", "control characters"),
        ("not.a.jwt".into(), "invalid_grant", "not a signed JWT"),
        ("".into(), "invalid_grant", "not a signed JWT"),
    ];
    for (assertion, code, says) in &cases {
        for result in [f.bearer(assertion, "device_x").await, f.exchange(assertion, "device_x").await] {
            let e = result.expect_err(says);
            assert_eq!(e.code(), *code, "{says}: {}", e.description());
            assert!(e.description().contains(says), "{says}: {}", e.description());
        }
    }
    let id_token = f.assertion("alice", &[], json!({}));
    let bad = [
        (TokenExchange { subject_token_type: "urn:x".into(), ..Default::default() }, "invalid_request"),
        (TokenExchange { actor_token: Some("a".into()), ..Default::default() }, "invalid_request"),
        (
            TokenExchange { requested_token_type: Some(TOKEN_TYPE_ID_TOKEN.into()), ..Default::default() },
            "invalid_request",
        ),
        (TokenExchange { audience: vec!["someone-else".into()], ..Default::default() }, "invalid_target"),
        (TokenExchange { resource: vec!["https://other.test".into()], ..Default::default() }, "invalid_target"),
    ];
    for (exchange, code) in bad {
        let exchange = TokenExchange {
            subject_token: id_token.clone(),
            subject_token_type: if exchange.subject_token_type.is_empty() {
                TOKEN_TYPE_JWT.into()
            } else {
                exchange.subject_token_type
            },
            ..exchange
        };
        assert_eq!(f.exchange_with(exchange).await.expect_err(code).code(), code);
    }
    // None of those used the subject token up: it still exchanges, naming the application's own audience.
    let ok = TokenExchange {
        subject_token: id_token,
        subject_token_type: TOKEN_TYPE_ACCESS_TOKEN.into(),
        requested_token_type: Some(TOKEN_TYPE_JWT.into()),
        audience: vec!["shop-api".into()],
        ..Default::default()
    };
    f.exchange_with(ok).await.expect("a well-formed exchange");
}

#[tokio::test]
async fn a_client_without_the_grant_is_unauthorized() {
    let idp = key();
    let app =
        application("shop", TokenFormat::Jwt, &[GrantType::JwtBearer], vec![trusted(KeySource::Fixed(set(&[&idp])))]);
    let f = Fed { idp, ..fed_with(app, key(), Arc::new(MemoryStore::default()), None) };
    let e = f.exchange(&f.assertion("alice", &[], json!({})), "").await.expect_err("no token exchange");
    assert_eq!(e.code(), "unauthorized_client");
    let t = f.bearer(&f.assertion("alice", &[], json!({})), "").await.expect("jwt-bearer");
    assert_eq!(t.refresh_token, None, "no refresh_token grant, no refresh token");
}

/// A key set source that serves `sets` in turn: the first on the first fetch, the next on each refetch.
struct RotatingSource {
    sets: Vec<Arc<JwkSet>>,
    fetches: AtomicUsize,
    refetches: AtomicUsize,
}

impl KeySetSource for RotatingSource {
    fn key_set<'a>(&'a self, _uri: &'a str, after_unknown_key: bool) -> KeySetFuture<'a> {
        let n = if after_unknown_key {
            self.refetches.fetch_add(1, Ordering::SeqCst) + 1
        } else {
            self.fetches.fetch_add(1, Ordering::SeqCst);
            self.refetches.load(Ordering::SeqCst)
        };
        let set = self.sets.get(n).or(self.sets.last()).cloned();
        Box::pin(std::future::ready(set.ok_or_else(|| "the issuer is down".to_string())))
    }
}

#[tokio::test]
async fn a_key_the_held_set_lacks_is_looked_for_once_more_at_the_source() {
    let (old, new) = (key(), key());
    let source =
        Arc::new(RotatingSource { sets: vec![set(&[&old]), set(&[&new])], fetches: 0.into(), refetches: 0.into() });
    let app = application(
        "shop",
        TokenFormat::Jwt,
        FEDERATED,
        vec![trusted(KeySource::Uri("https://idp.test/certs".into()))],
    );
    let f = Fed { idp: old, ..fed_with(app, key(), Arc::new(MemoryStore::default()), Some(source.clone())) };
    f.bearer(&f.assertion("alice", &[], json!({})), "device_a").await.expect("the old key");
    assert_eq!(source.refetches.load(Ordering::SeqCst), 0);
    // The issuer rotated: its new key is unknown to the held set, found after one refetch.
    f.bearer(&f.assertion_by(&new, "alice", &[], json!({})), "device_b").await.expect("the new key");
    assert_eq!(source.refetches.load(Ordering::SeqCst), 1);
    // A key nobody published stays unknown: invalid_grant.
    let forged = f.bearer(&f.assertion_by(&key(), "alice", &[], json!({})), "device_c").await.expect_err("unknown");
    assert_eq!(forged.code(), "invalid_grant");
}

#[tokio::test]
async fn an_unreachable_key_set_is_temporarily_unavailable_not_the_clients_fault() {
    let source = Arc::new(RotatingSource { sets: vec![], fetches: 0.into(), refetches: 0.into() });
    let app = application(
        "shop",
        TokenFormat::Jwt,
        FEDERATED,
        vec![trusted(KeySource::Uri("https://idp.test/certs".into()))],
    );
    let f = fed_with(app, key(), Arc::new(MemoryStore::default()), Some(source));
    let e = f.bearer(&f.assertion("alice", &[], json!({})), "").await.expect_err("no key set");
    assert_eq!(e.code(), "temporarily_unavailable");
}

/// A store shared with other servers: it remembers assertions used anywhere, and may be unavailable.
struct SharedMemory {
    inner: MemoryStore,
    used_elsewhere: std::sync::Mutex<Vec<String>>,
    down: std::sync::atomic::AtomicBool,
}

impl StoreWrapper for SharedMemory {
    fn inner(&self) -> &dyn TokenStore {
        &self.inner
    }
    fn wrap_remember_assertion<'a>(&'a self, id: &'a str) -> StoreFuture<'a, bool> {
        if self.down.load(Ordering::SeqCst) {
            return Box::pin(std::future::ready(Err(StoreError::Unavailable("down".into()))));
        }
        let mut used = self.used_elsewhere.lock().expect("lock");
        let first = !used.iter().any(|u| u == id);
        used.push(id.to_string());
        Box::pin(std::future::ready(Ok(first)))
    }
}

#[tokio::test]
async fn a_shared_store_refuses_an_assertion_used_at_another_server_and_an_outage_uses_nothing_up() {
    let idp = key();
    let store = Arc::new(SharedMemory {
        inner: MemoryStore::default(),
        used_elsewhere: Default::default(),
        down: false.into(),
    });
    let app = application("shop", TokenFormat::Jwt, FEDERATED, vec![trusted(KeySource::Fixed(set(&[&idp])))]);
    let f = Fed { idp, ..fed_with(app, key(), store.clone(), None) };
    let assertion = f.assertion("alice", &[], json!({}));
    // Another server used it: the store says so.
    let verified =
        crate::core::assertion::verify(&assertion, &trusted(KeySource::Fixed(set(&[&f.idp]))), &set(&[&f.idp]), T0)
            .expect("valid");
    store.used_elsewhere.lock().expect("lock").push(verified.replay_id);
    assert_eq!(f.bearer(&assertion, "").await.expect_err("used elsewhere").code(), "invalid_grant");

    let fresh = f.assertion("alice", &[], json!({}));
    store.down.store(true, Ordering::SeqCst);
    assert_eq!(f.bearer(&fresh, "").await.expect_err("down").code(), "temporarily_unavailable");
    store.down.store(false, Ordering::SeqCst);
    f.bearer(&fresh, "").await.expect("the outage did not use the assertion up");
}

#[tokio::test]
async fn one_subject_token_is_exchanged_for_at_most_as_many_keys_as_a_user_may_hold() {
    let f = fed(TokenFormat::Jwt);
    let id_token = f.assertion("alice", &[], json!({}));
    for device in 0..3 {
        f.exchange(&id_token, &format!("device_{device}")).await.expect("within the cap");
    }
    // maxTokenKeysPerUser is 3: a fourth key from the same subject token is refused, not remembered.
    let e = f.exchange(&id_token, "device_3").await.expect_err("past the cap");
    assert_eq!(e.code(), "invalid_grant");
    assert!(e.description().contains("3 token keys"), "{}", e.description());
    // A new login's ID token is another family.
    f.exchange(&f.assertion("alice", &[], json!({})), "device_3").await.expect("a new subject token");
}

#[tokio::test]
async fn a_requested_jwt_is_answered_as_one() {
    let f = fed(TokenFormat::Jwt);
    let exchange = TokenExchange {
        subject_token: f.assertion("alice", &[], json!({})),
        subject_token_type: TOKEN_TYPE_ID_TOKEN.into(),
        requested_token_type: Some(TOKEN_TYPE_JWT.into()),
        ..Default::default()
    };
    assert_eq!(f.exchange_with(exchange).await.expect("jwt").issued_token_type, Some(TOKEN_TYPE_JWT));
}

#[tokio::test]
async fn an_offline_key_set_that_cannot_be_read_is_503_for_its_issuer_only() {
    let idp = key();
    let app = application(
        "shop",
        TokenFormat::Jwt,
        FEDERATED,
        vec![trusted(KeySource::Unavailable("the ConfigMap idp-keys is not there (yet)".into()))],
    );
    let f = Fed { idp, ..fed_with(app, key(), Arc::new(MemoryStore::default()), None) };
    let e = f.bearer(&f.assertion("alice", &[], json!({})), "").await.expect_err("no key set");
    assert_eq!(e.code(), "temporarily_unavailable");
    let local = Grant::Password { username: "alice".into(), password: "alice-pw".into(), scope: None };
    f.service.token(&client(), local).await.expect("the password grant keeps working");
}

/// A store whose next commits fail, as an unavailable database does.
struct FailingCommits {
    inner: MemoryStore,
    failures: AtomicUsize,
}

impl StoreWrapper for FailingCommits {
    fn inner(&self) -> &dyn TokenStore {
        &self.inner
    }
    fn wrap_commit(&self, change: Change) -> StoreFuture<'_, ()> {
        if self.failures.load(Ordering::SeqCst) > 0 {
            self.failures.fetch_sub(1, Ordering::SeqCst);
            return Box::pin(std::future::ready(Err(StoreError::Unavailable("down".into()))));
        }
        self.inner.commit(change)
    }
}

#[tokio::test]
async fn a_grant_that_failed_on_the_servers_side_does_not_use_its_assertion_up() {
    let idp = key();
    let store = Arc::new(FailingCommits { inner: MemoryStore::default(), failures: 1.into() });
    let app = application("shop", TokenFormat::Jwt, FEDERATED, vec![trusted(KeySource::Fixed(set(&[&idp])))]);
    let f = Fed { idp, ..fed_with(app, key(), store, None) };
    let assertion = f.assertion("alice", &[], json!({}));
    assert_eq!(f.bearer(&assertion, "device_ipad").await.expect_err("down").code(), "temporarily_unavailable");
    f.bearer(&assertion, "device_ipad").await.expect("the retry with the same assertion");
    assert_eq!(f.bearer(&assertion, "device_ipad").await.expect_err("now used").code(), "invalid_grant");
}

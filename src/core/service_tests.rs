//! Token semantics, tested on the pure core: in-memory store, manual clock, no HTTP.

use std::collections::HashMap;
use std::sync::Arc;

use super::*;
use crate::core::app::{ApplicationConfig, PasswordDigest, User};
use crate::core::clock::ManualClock;
use crate::core::scope::ScopePolicy;
use crate::core::signing::SigningKey;
use crate::core::store::{ColdStore, MemoryStore, StoreWrapper};

const T0: UnixTime = 1_800_000_000;

pub(super) fn user(password: &str, roles: &[&str]) -> User {
    User {
        // bcrypt cost 4 keeps the tests fast; the digest type is what matters here.
        digest: PasswordDigest::parse(&bcrypt::hash(password, 4).expect("hash")).expect("digest"),
        roles: roles.iter().map(|r| r.to_string()).collect(),
    }
}

fn app(client_id: &str, format: TokenFormat, grants: &[GrantType]) -> Application {
    app_with_users(
        client_id,
        format,
        grants,
        HashMap::from([
            ("alice".to_string(), user("alice-pw", &["customer"])),
            ("bob".to_string(), user("bob-pw", &["admin"])),
        ]),
    )
}

/// A JWT application whose declared scopes are `scopes` (name, roles).
fn app_with_users_and_scopes(
    client_id: &str,
    grants: &[GrantType],
    users: HashMap<String, User>,
    scopes: &[(&str, &[&str])],
) -> Application {
    let declared = scopes.iter().map(|(name, roles)| (name.to_string(), roles.iter().map(|r| r.to_string()).collect()));
    application(client_id, TokenFormat::Jwt, grants, users, ScopePolicy::new(declared))
}

fn app_with_users(
    client_id: &str,
    format: TokenFormat,
    grants: &[GrantType],
    users: HashMap<String, User>,
) -> Application {
    application(
        client_id,
        format,
        grants,
        users,
        ScopePolicy::new([
            ("orders:read".to_string(), vec!["customer".to_string(), "admin".to_string()]),
            ("orders:admin".to_string(), vec!["admin".to_string()]),
            ("catalog:read".to_string(), vec![]),
            ("inventory:sync".to_string(), vec!["service".to_string()]),
        ]),
    )
}

pub(super) fn application(
    client_id: &str,
    format: TokenFormat,
    grants: &[GrantType],
    users: HashMap<String, User>,
    scopes: ScopePolicy,
) -> Application {
    let signer = SigningKey::from_pkcs8(
        crate::core::signing::Algorithm::ES256,
        &SigningKey::generate_pkcs8(crate::core::signing::Algorithm::ES256).expect("key"),
    )
    .expect("parse");
    Application::new(ApplicationConfig {
        trusted_issuers: Vec::new(),
        name: format!("default/{client_id}"),
        client_id: client_id.into(),
        client_secrets: vec!["s3cret".into()],
        grant_types: grants.to_vec(),
        format,
        access_ttl: 3600,
        refresh_ttl: 86_400,
        session_max: None,
        max_keys_per_user: 100,
        audience: vec!["shop-api".into()],
        client_roles: vec!["service".into()],
        scopes,
        users,
        signer: Arc::new(signer),
        verification_keys: vec![],
        token_secrets: vec![vec![7u8; 32]],
    })
}

const ALL: &[GrantType] = &[GrantType::Password, GrantType::ClientCredentials, GrantType::RefreshToken];

struct Fixture {
    service: TokenService,
    clock: Arc<ManualClock>,
    /// Reads answer only what the service prepared first: every path of these tests prepares its reads, as a store
    /// with a bounded cache needs.
    store: Arc<ColdStore>,
}

fn fixture(format: TokenFormat) -> Fixture {
    fixture_with(format, ColdStore::forgetful())
}

fn fixture_with(format: TokenFormat, store: ColdStore) -> Fixture {
    let clock = Arc::new(ManualClock::new(T0));
    let registry = Registry::new(vec![
        app("shop", format, ALL),
        app("other", format, ALL),
        app("cc-only", format, &[GrantType::ClientCredentials]),
    ])
    .expect("registry");
    let store = Arc::new(store);
    let service = TokenService::new(
        registry,
        store.clone(),
        clock.clone(),
        crate::passwords::service_config(
            "https://issuer.test",
            ServicePolicies {
                user_lockout: LockoutPolicy { max_failures: 3, lock_secs: 60 },
                client_lockout: LockoutPolicy { max_failures: 3, lock_secs: 60 },
                request_bounds: Default::default(),
            },
        ),
    );
    Fixture { service, clock, store }
}

fn client(id: &str) -> ClientCredentials {
    ClientCredentials { client_id: id.into(), client_secret: "s3cret".into() }
}

impl Fixture {
    async fn password(&self, user: &str, pw: &str, scope: &str) -> Result<IssuedTokens, OAuthError> {
        let grant = Grant::Password { username: user.into(), password: pw.into(), scope: Some(scope.into()) };
        self.service.token(&client("shop"), grant).await
    }

    async fn active(&self, token: &str) -> bool {
        matches!(self.service.introspect(&client("shop"), token).await, Ok(Introspection::Active(_)))
    }
}

#[tokio::test]
async fn device_tokens_live_side_by_side_and_a_new_one_revokes_only_its_own_device() {
    let f = fixture(TokenFormat::Jwt);
    let ipad1 = f.password("alice", "alice-pw", "device_ipad").await.expect("ipad");
    let iphone = f.password("alice", "alice-pw", "device_iphone").await.expect("iphone");
    assert_ne!(ipad1.access_token, iphone.access_token);
    assert!(f.active(&ipad1.access_token).await && f.active(&iphone.access_token).await);

    let ipad2 = f.password("alice", "alice-pw", "device_ipad").await.expect("ipad again");
    assert!(!f.active(&ipad1.access_token).await, "the first iPad token is superseded");
    assert!(!f.active(ipad1.refresh_token.as_deref().expect("refresh")).await, "and so is its refresh token");
    assert!(f.active(&ipad2.access_token).await);
    assert!(f.active(&iphone.access_token).await, "the iPhone token is untouched");
}

#[tokio::test]
async fn device_scopes_combine_with_role_checked_scopes_and_unauthorized_ones_are_dropped() {
    let f = fixture(TokenFormat::Jwt);
    let t = f.password("alice", "alice-pw", "orders:admin device_ipad orders:read nonsense").await.expect("token");
    assert_eq!(t.scope, "device_ipad orders:read");
    // The scope set is part of the key: the same device without orders:read is another key.
    let plain = f.password("alice", "alice-pw", "device_ipad").await.expect("plain");
    assert!(f.active(&t.access_token).await && f.active(&plain.access_token).await);
    // Same granted set, requested differently (order, duplicates, a dropped extra): same key, so it supersedes.
    let again =
        f.password("alice", "alice-pw", "orders:read device_ipad orders:read orders:admin").await.expect("again");
    assert!(!f.active(&t.access_token).await);
    assert!(f.active(&again.access_token).await);
    let admin = f.password("bob", "bob-pw", "orders:admin device_ipad").await.expect("admin");
    assert_eq!(admin.scope, "device_ipad orders:admin");
}

#[tokio::test]
async fn nothing_granted_gives_the_default_scope() {
    let f = fixture(TokenFormat::Jwt);
    assert_eq!(f.password("alice", "alice-pw", "orders:admin").await.expect("t").scope, "default");
    assert_eq!(f.password("alice", "alice-pw", "").await.expect("t").scope, "default");
}

#[tokio::test]
async fn malformed_scope_is_invalid_scope() {
    let f = fixture(TokenFormat::Jwt);
    let err = f.password("alice", "alice-pw", "bad\"scope").await.expect_err("malformed");
    assert_eq!(err.code(), "invalid_scope");
}

#[tokio::test]
async fn opaque_mode_returns_the_same_token_until_it_expires_or_is_revoked() {
    let f = fixture(TokenFormat::Opaque);
    let first = f.password("alice", "alice-pw", "device_ipad").await.expect("first");
    f.clock.advance(600);
    let same = f.password("alice", "alice-pw", "device_ipad").await.expect("same");
    assert_eq!(same.access_token, first.access_token);
    assert_eq!(same.refresh_token, first.refresh_token);
    assert_eq!(same.expires_in, first.expires_in - 600);
    assert!(same.reused);
    // Another device gets its own token.
    let other = f.password("alice", "alice-pw", "device_iphone").await.expect("other");
    assert_ne!(other.access_token, first.access_token);
    // After expiry, a new token.
    f.clock.advance(3000);
    let renewed = f.password("alice", "alice-pw", "device_ipad").await.expect("renewed");
    assert_ne!(renewed.access_token, first.access_token);
    assert_eq!(renewed.expires_in, 3600);
    // After revocation, a new token.
    assert!(f.service.revoke(&client("shop"), &renewed.access_token).await.expect("revoke"));
    let after_revoke = f.password("alice", "alice-pw", "device_ipad").await.expect("after revoke");
    assert_ne!(after_revoke.access_token, renewed.access_token);
}

#[tokio::test]
async fn refresh_rotates_and_reuse_revokes_the_grant() {
    let f = fixture(TokenFormat::Jwt);
    let first = f.password("alice", "alice-pw", "device_ipad orders:read").await.expect("first");
    let r1 = first.refresh_token.clone().expect("refresh token");
    let refresh = |token: String, scope: Option<&str>| Grant::RefreshToken {
        refresh_token: token,
        scope: scope.map(str::to_string),
    };

    let second = f.service.token(&client("shop"), refresh(r1.clone(), None)).await.expect("rotate");
    let r2 = second.refresh_token.clone().expect("new refresh token");
    assert_ne!(r1, r2);
    assert_eq!(second.scope, "device_ipad orders:read");
    assert!(!f.active(&first.access_token).await, "the previous access token of the key is revoked");
    assert!(f.active(&second.access_token).await);

    // Reusing the rotated-out token: invalid_grant, and the grant's live tokens go.
    let err = f.service.token(&client("shop"), refresh(r1, None)).await.expect_err("reuse");
    assert_eq!(err.code(), "invalid_grant");
    assert!(!f.active(&second.access_token).await);
    let err = f.service.token(&client("shop"), refresh(r2, None)).await.expect_err("revoked");
    assert_eq!(err.code(), "invalid_grant");
}

#[tokio::test]
async fn refresh_may_narrow_but_not_widen_the_scope() {
    let f = fixture(TokenFormat::Jwt);
    let t = f.password("alice", "alice-pw", "device_ipad orders:read").await.expect("token");
    let refresh =
        |token: &str, scope: &str| Grant::RefreshToken { refresh_token: token.into(), scope: Some(scope.into()) };
    let err = f
        .service
        .token(&client("shop"), refresh(t.refresh_token.as_deref().expect("r"), "orders:read catalog:read"))
        .await
        .expect_err("wider");
    assert_eq!(err.code(), "invalid_scope");
    let narrow = f
        .service
        .token(&client("shop"), refresh(t.refresh_token.as_deref().expect("r"), "orders:read"))
        .await
        .expect("narrower");
    assert_eq!(narrow.scope, "orders:read");
    // The key is unchanged: a new device_ipad+orders:read login supersedes the narrowed token.
    let relogin = f.password("alice", "alice-pw", "orders:read device_ipad").await.expect("relogin");
    assert!(!f.active(&narrow.access_token).await);
    assert!(f.active(&relogin.access_token).await);
}

#[tokio::test]
async fn refresh_tokens_are_bound_to_their_client_and_expire() {
    let f = fixture(TokenFormat::Jwt);
    let t = f.password("alice", "alice-pw", "device_ipad").await.expect("token");
    let r = t.refresh_token.expect("refresh");
    let grant = || Grant::RefreshToken { refresh_token: r.clone(), scope: None };
    assert_eq!(f.service.token(&client("other"), grant()).await.expect_err("other client").code(), "invalid_grant");
    f.clock.advance(86_400);
    assert_eq!(f.service.token(&client("shop"), grant()).await.expect_err("expired").code(), "invalid_grant");
    let garbage = Grant::RefreshToken { refresh_token: "garbage".into(), scope: None };
    assert_eq!(f.service.token(&client("shop"), garbage).await.expect_err("garbage").code(), "invalid_grant");
}

#[tokio::test]
async fn access_tokens_expire() {
    let f = fixture(TokenFormat::Jwt);
    let t = f.password("alice", "alice-pw", "device_ipad").await.expect("token");
    f.clock.advance(3599);
    assert!(f.active(&t.access_token).await);
    f.clock.advance(1);
    assert!(!f.active(&t.access_token).await);
}

#[tokio::test]
async fn repeated_failed_passwords_lock_the_user_without_checking_the_password() {
    let f = fixture(TokenFormat::Jwt);
    for _ in 0..3 {
        assert_eq!(f.password("alice", "wrong", "").await.expect_err("wrong").code(), "invalid_grant");
    }
    let locked = f.password("alice", "alice-pw", "").await.expect_err("locked");
    assert_eq!(locked.code(), "invalid_grant");
    assert!(locked.description().contains("locked"), "{locked:?}");
    // Other users are unaffected.
    f.password("bob", "bob-pw", "").await.expect("bob");
    f.clock.advance(60);
    f.password("alice", "alice-pw", "").await.expect("unlocked");
    // Unknown users fail like wrong passwords.
    assert_eq!(
        f.password("mallory", "x", "").await.expect_err("unknown").description(),
        "invalid username or password"
    );
}

#[tokio::test]
async fn repeated_failed_client_authentication_is_throttled_but_cannot_lock_out_the_real_client() {
    let f = fixture(TokenFormat::Jwt);
    let bad = ClientCredentials { client_id: "shop".into(), client_secret: "nope".into() };
    for _ in 0..3 {
        let e = f.service.token(&bad, Grant::ClientCredentials { scope: None }).await.expect_err("bad");
        assert_eq!(e.code(), "invalid_client");
    }
    // Locked: wrong secrets are refused as such ("try again"), neither counted nor shared nor logged again ...
    let e = f.service.token(&bad, Grant::ClientCredentials { scope: None }).await.expect_err("locked");
    assert!(e.description().contains("try again"), "{e:?}");
    // ... but whoever merely knows the client ID cannot deny service to the client: its secret still works.
    f.service.token(&client("shop"), Grant::ClientCredentials { scope: None }).await.expect("the real client");
}

#[tokio::test]
async fn client_credentials_use_client_roles_and_get_no_refresh_token() {
    let f = fixture(TokenFormat::Jwt);
    let grant = Grant::ClientCredentials { scope: Some("inventory:sync orders:admin device_kiosk".into()) };
    let t = f.service.token(&client("shop"), grant).await.expect("token");
    assert_eq!(t.scope, "device_kiosk inventory:sync");
    assert!(t.refresh_token.is_none());
    let Ok(Introspection::Active(info)) = f.service.introspect(&client("shop"), &t.access_token).await else {
        panic!("token should be active")
    };
    assert_eq!(info.sub, "shop");
    assert_eq!(info.username, None);
}

#[tokio::test]
async fn grants_not_allowed_for_the_client_are_unauthorized_client() {
    let f = fixture(TokenFormat::Jwt);
    let grant = Grant::Password { username: "alice".into(), password: "alice-pw".into(), scope: None };
    let e = f.service.token(&client("cc-only"), grant).await.expect_err("not allowed");
    assert_eq!(e.code(), "unauthorized_client");
}

#[tokio::test]
async fn revocation_and_introspection_stay_within_the_client() {
    let f = fixture(TokenFormat::Jwt);
    let t = f.password("alice", "alice-pw", "device_ipad").await.expect("token");
    // Another client neither sees nor revokes it.
    assert_eq!(f.service.introspect(&client("other"), &t.access_token).await, Ok(Introspection::Inactive));
    assert_eq!(f.service.revoke(&client("other"), &t.access_token).await, Ok(false));
    assert!(f.active(&t.access_token).await);
    // Revoking the refresh token revokes the pair.
    assert_eq!(f.service.revoke(&client("shop"), t.refresh_token.as_deref().expect("r")).await, Ok(true));
    assert!(!f.active(&t.access_token).await);
    // Unknown tokens: success without effect.
    assert_eq!(f.service.revoke(&client("shop"), "not-a-token").await, Ok(false));
}

#[tokio::test]
async fn introspection_of_broken_jwts_is_inactive_and_never_an_error() {
    use base64::Engine;
    use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;
    use serde_json::{Value, json};

    let f = fixture(TokenFormat::Jwt);
    let t = f.password("alice", "alice-pw", "device_ipad").await.expect("token").access_token;
    assert!(f.active(&t).await);
    let registry = f.service.registry();
    let shop = &registry.get("shop").expect("shop").signer;
    let other = &registry.get("other").expect("other").signer;
    let mut parts = t.split('.');
    let (header, payload, sig) = (parts.next().expect("h"), parts.next().expect("p"), parts.next().expect("s"));
    let claims: Value = serde_json::from_slice(&B64.decode(payload).expect("b64")).expect("claims");
    let seg = |v: Value| B64.encode(v.to_string());
    let mut flipped = B64.decode(sig).expect("signature");
    flipped[10] ^= 1;
    let flipped = B64.encode(flipped);
    let mut mallory = claims.clone();
    mallory["sub"] = json!("mallory");
    let kid = shop.kid();
    // HS256 keyed with the published public key (`x`): the classic algorithm confusion.
    let hs_input = format!("{}.{payload}", seg(json!({"alg": "HS256", "kid": kid, "typ": "at+jwt"})));
    let x = serde_json::to_value(shop.public_jwk()).expect("jwk")["x"].as_str().expect("x").to_string();
    let mac = aws_lc_rs::hmac::sign(
        &aws_lc_rs::hmac::Key::new(aws_lc_rs::hmac::HMAC_SHA256, x.as_bytes()),
        hs_input.as_bytes(),
    );
    let signed = |claims: &[u8]| shop.sign_jwt(claims).expect("sign");
    let cases = [
        ("tampered signature", format!("{header}.{payload}.{flipped}")),
        ("tampered payload", format!("{header}.{}.{sig}", seg(mallory))),
        ("no signature", format!("{header}.{payload}.")),
        ("alg none", format!("{}.{payload}.", seg(json!({"alg": "none", "kid": kid, "typ": "at+jwt"})))),
        (
            "alg none, signature kept",
            format!("{}.{payload}.{sig}", seg(json!({"alg": "none", "kid": kid, "typ": "at+jwt"}))),
        ),
        ("HS256 with the public key", format!("{hs_input}.{}", B64.encode(mac.as_ref()))),
        (
            "another alg, same kid",
            format!("{}.{payload}.{sig}", seg(json!({"alg": "RS256", "kid": kid, "typ": "at+jwt"}))),
        ),
        ("unknown kid", format!("{}.{payload}.{sig}", seg(json!({"alg": "ES256", "kid": "nope", "typ": "at+jwt"})))),
        ("no kid", format!("{}.{payload}.{sig}", seg(json!({"alg": "ES256", "typ": "at+jwt"})))),
        ("another application's key", other.sign_jwt(claims.to_string().as_bytes()).expect("sign")),
        ("garbage header", format!("!!.{payload}.{sig}")),
        ("garbage payload", format!("{header}.!!.{sig}")),
        ("garbage signature", format!("{header}.{payload}.!!")),
        ("four segments", format!("{t}.{sig}")),
        ("two segments", format!("{header}.{payload}")),
        ("empty segments", "..".to_string()),
        ("signed, payload not JSON", signed(b"not json")),
        ("signed, payload not an object", signed(b"[1,2]")),
        ("signed, no jti", signed(br#"{"sub":"alice"}"#)),
        ("signed, jti not a token id", signed(br#"{"jti":"nope"}"#)),
        ("signed, jti of no token", signed(br#"{"jti":"AAAAAAAAAAAAAAAAAAAAAA"}"#)),
    ];
    for (what, token) in &cases {
        assert_eq!(f.service.introspect(&client("shop"), token).await, Ok(Introspection::Inactive), "{what}");
        assert_eq!(f.service.revoke(&client("shop"), token).await, Ok(false), "{what}");
    }
    assert!(f.active(&t).await, "none of it touched the real token");
}

#[tokio::test]
async fn introspection_reports_rfc7662_fields() {
    let f = fixture(TokenFormat::Jwt);
    let t = f.password("alice", "alice-pw", "device_ipad orders:read").await.expect("token");
    let Ok(Introspection::Active(info)) = f.service.introspect(&client("shop"), &t.access_token).await else {
        panic!("active")
    };
    assert_eq!(info.scope, "device_ipad orders:read");
    assert_eq!(info.client_id, "shop");
    assert_eq!(info.username.as_deref(), Some("alice"));
    assert_eq!(info.sub, "alice");
    assert_eq!(info.token_type, Some("Bearer"));
    assert_eq!(info.exp, T0 + 3600);
    assert_eq!(info.iat, T0);
    assert_eq!(info.aud, vec!["shop-api".to_string()]);
    assert_eq!(info.iss, "https://issuer.test");
    // A JWT whose signature does not verify is inactive even if its jti is live.
    let mut forged = t.access_token.clone();
    forged.pop();
    forged.push(if t.access_token.ends_with('A') { 'B' } else { 'A' });
    assert!(!f.active(&forged).await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_requests_for_one_key_all_succeed_and_leave_exactly_one_live_token() {
    let f = Arc::new(fixture_with(TokenFormat::Jwt, ColdStore::default()));
    let mut handles = Vec::new();
    for _ in 0..256 {
        let f = f.clone();
        handles.push(tokio::spawn(async move {
            f.service.token(&client("shop"), Grant::ClientCredentials { scope: Some("device_x".into()) }).await
        }));
    }
    let mut tokens = Vec::new();
    for h in handles {
        tokens.push(h.await.expect("join").expect("token").access_token);
    }
    let mut active = 0;
    for t in &tokens {
        if f.active(t).await {
            active += 1;
        }
    }
    assert_eq!(active, 1);
}

#[test]
fn decide_issue_follows_the_format_rule() {
    let pair = LivePair {
        access_id: TokenId([1; 16]),
        access_scopes: ScopeSet::default(),
        issued_at: 0,
        access_expires_at: 100,
        refresh: None,
    };
    let granted = ScopeSet::default();
    let replace = IssueDecision::Replace { expect: Some(pair.access_id) };
    assert_eq!(decide_issue(TokenFormat::Opaque, Some(&pair), &granted, 99), IssueDecision::Reuse(pair.clone()));
    assert_eq!(decide_issue(TokenFormat::Opaque, Some(&pair), &granted, 100), replace);
    let other = ScopeSet::parse("device_x").expect("scope");
    assert_eq!(decide_issue(TokenFormat::Opaque, Some(&pair), &other, 99), replace, "other scopes: no reuse");
    assert_eq!(decide_issue(TokenFormat::Jwt, Some(&pair), &granted, 0), replace);
    assert_eq!(decide_issue(TokenFormat::Jwt, None, &granted, 0), IssueDecision::Replace { expect: None });
}

/// A store whose changes are visible at once but durable only when the test opens the gate: the state a
/// FileStore is in while a group commit waits for its fsync.
struct GatedStore {
    inner: MemoryStore,
    open: tokio::sync::watch::Sender<bool>,
}

impl GatedStore {
    fn new() -> Self {
        Self { inner: MemoryStore::default(), open: tokio::sync::watch::channel(false).0 }
    }

    fn durable(&self) -> crate::core::store::StoreFuture<'_, ()> {
        let mut rx = self.open.subscribe();
        Box::pin(async move {
            let _ = rx.wait_for(|open| *open).await;
            Ok(())
        })
    }
}

impl StoreWrapper for GatedStore {
    fn inner(&self) -> &dyn TokenStore {
        &self.inner
    }
    fn wrap_commit(&self, change: Change) -> crate::core::store::StoreFuture<'_, ()> {
        let applied = self.inner.with_state(|s| s.commit(change));
        Box::pin(async move {
            applied.map_err(StoreError::from)?;
            self.durable().await
        })
    }
    fn wrap_sync(&self) -> crate::core::store::StoreFuture<'_, ()> {
        self.durable()
    }
}

#[tokio::test]
async fn a_revocation_is_answered_only_once_the_change_that_removed_the_token_is_durable() {
    let store = Arc::new(GatedStore::new());
    store.open.send_replace(true);
    let registry = Registry::new(vec![app("shop", TokenFormat::Jwt, ALL)]).expect("registry");
    let config = crate::passwords::service_config("https://issuer.test", ServicePolicies::default());
    let service = Arc::new(TokenService::new(registry, store.clone(), Arc::new(ManualClock::new(T0)), config));
    let grant = || Grant::ClientCredentials { scope: Some("device_x".into()) };
    let first = service.token(&client("shop"), grant()).await.expect("first");

    // A second token for the same key supersedes the first in memory, but is not durable yet.
    store.open.send_replace(false);
    let superseding = tokio::spawn({
        let service = service.clone();
        async move { service.token(&client("shop"), grant()).await }
    });
    tokio::task::yield_now().await;
    while store.find_access(&TokenId::from_b64(&jti(&first.access_token)).expect("jti")).is_some() {
        tokio::task::yield_now().await;
    }
    let shop = client("shop");
    let revoke = service.revoke(&shop, &first.access_token);
    tokio::pin!(revoke);
    // A crash now would bring the first token back, so the revocation must not be answered yet.
    assert!(tokio::time::timeout(std::time::Duration::from_millis(50), &mut revoke).await.is_err());
    store.open.send_replace(true);
    assert_eq!(revoke.await, Ok(false));
    superseding.await.expect("join").expect("second token");
}

fn jti(jwt: &str) -> String {
    use base64::Engine;
    let payload = jwt.split('.').nth(1).expect("payload");
    let claims: serde_json::Value =
        serde_json::from_slice(&base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(payload).expect("b64"))
            .expect("json");
    claims["jti"].as_str().expect("jti").to_string()
}

fn refresh_grant(token: &str) -> Grant {
    Grant::RefreshToken { refresh_token: token.into(), scope: None }
}

#[tokio::test]
async fn a_rotated_refresh_token_presented_by_another_client_does_not_revoke_the_owners_grant() {
    let f = fixture(TokenFormat::Jwt);
    let first = f.password("alice", "alice-pw", "device_ipad orders:read").await.expect("first");
    let r1 = first.refresh_token.expect("refresh token");
    let second = f.service.token(&client("shop"), refresh_grant(&r1)).await.expect("rotate");
    let r2 = second.refresh_token.clone().expect("rotated refresh token");

    // "other" authenticates with its own valid credentials and, sharing the fixture's token secret, can even
    // decode shop's token string: the lookup finds the rotated-out token, which is not other's to report as reused.
    let err = f.service.token(&client("other"), refresh_grant(&r1)).await.expect_err("another client");
    assert_eq!(err.code(), "invalid_grant");

    assert!(f.active(&second.access_token).await, "the owner's access token stays active");
    assert!(f.active(&r2).await, "the owner's refresh token stays active");
    let third = f.service.token(&client("shop"), refresh_grant(&r2)).await.expect("the owner can still refresh");
    assert!(f.active(&third.access_token).await);
}

#[tokio::test]
async fn refresh_for_a_user_removed_from_the_users_is_invalid_grant() {
    let f = fixture(TokenFormat::Jwt);
    let alice = f.password("alice", "alice-pw", "device_ipad").await.expect("alice");
    let bob = f.password("bob", "bob-pw", "device_ipad").await.expect("bob");

    // The users Secret changes: alice is gone, bob stays (same client, same token secret).
    let only_bob = HashMap::from([("bob".to_string(), user("bob-pw", &["admin"]))]);
    f.service
        .set_registry(Registry::new(vec![app_with_users("shop", TokenFormat::Jwt, ALL, only_bob)]).expect("registry"));

    let err = f
        .service
        .token(&client("shop"), refresh_grant(alice.refresh_token.as_deref().expect("r")))
        .await
        .expect_err("removed user");
    assert_eq!(err.code(), "invalid_grant");
    // The same refresh for a user still listed works: the refusal is about alice, not about the new registry.
    f.service
        .token(&client("shop"), refresh_grant(bob.refresh_token.as_deref().expect("r")))
        .await
        .expect("bob still refreshes");
}

#[tokio::test]
async fn introspection_of_a_refresh_token_reports_its_own_use_expiry_and_scope_until_it_expires() {
    let f = fixture(TokenFormat::Jwt);
    let t = f.password("alice", "alice-pw", "device_ipad orders:read").await.expect("token");
    let refresh = t.refresh_token.expect("refresh token");
    let shop = client("shop");
    let introspect = || f.service.introspect(&shop, &refresh);

    let Ok(Introspection::Active(info)) = introspect().await else { panic!("refresh token should be active") };
    assert_eq!(info.token_use, "refresh_token");
    assert_eq!(info.exp, T0 + 86_400, "the refresh token's expiry, not the access token's (T0 + 3600)");
    assert_eq!(info.scope, "device_ipad orders:read");
    assert_eq!(info.client_id, "shop");
    assert_eq!(info.username.as_deref(), Some("alice"));
    assert_eq!(info.token_type, None, "a refresh token is not a Bearer token");

    // Past the access token's lifetime the refresh token is still active.
    f.clock.advance(3600);
    assert!(!f.active(&t.access_token).await);
    assert!(matches!(introspect().await, Ok(Introspection::Active(_))));
    // At the refresh token's expiry it is inactive.
    f.clock.advance(86_400 - 3600);
    assert_eq!(introspect().await, Ok(Introspection::Inactive));
}

#[tokio::test]
async fn lockout_is_per_client_and_user() {
    let f = fixture(TokenFormat::Jwt);
    for _ in 0..3 {
        assert_eq!(f.password("alice", "wrong", "").await.expect_err("wrong").code(), "invalid_grant");
    }
    let locked = f.password("alice", "alice-pw", "").await.expect_err("locked in shop");
    assert!(locked.description().contains("locked"), "{locked:?}");

    // The same username in another application is another account: not locked.
    let grant = Grant::Password { username: "alice".into(), password: "alice-pw".into(), scope: None };
    f.service.token(&client("other"), grant).await.expect("alice is not locked in the other application");
    // And a success there does not unlock her in shop.
    let still = f.password("alice", "alice-pw", "").await.expect_err("still locked in shop");
    assert!(still.description().contains("locked"), "{still:?}");
}

/// The real file store, with a read of the current pair that takes a while (as under load) and a count of the
/// compare-and-set conflicts its commits answer.
struct SlowReadCountingStore {
    inner: crate::storage::file_store::FileStore,
    conflicts: std::sync::atomic::AtomicUsize,
}

impl StoreWrapper for SlowReadCountingStore {
    fn inner(&self) -> &dyn TokenStore {
        &self.inner
    }
    fn wrap_pair(&self, key: &TokenKey) -> Option<LivePair> {
        let pair = self.inner.pair(key);
        std::thread::sleep(std::time::Duration::from_micros(200));
        pair
    }
    fn wrap_commit(&self, change: Change) -> crate::core::store::StoreFuture<'_, ()> {
        let committed = self.inner.commit(change);
        Box::pin(async move {
            let result = committed.await;
            if matches!(result, Err(StoreError::Conflict)) {
                self.conflicts.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            }
            result
        })
    }
}

/// The regression test of the per-key locks, on the real file store and a multi-threaded runtime: requests for
/// one key are decided one at a time, so none meets a compare-and-set conflict (without the locks, every request
/// that read the pair while another was replacing it conflicts and retries, and some run out of retries).
#[tokio::test(flavor = "multi_thread", worker_threads = 8)]
async fn requests_for_one_key_never_conflict_in_the_file_store() {
    let dir = tempfile::tempdir().expect("state dir");
    let clock = Arc::new(ManualClock::new(T0));
    let (inner, _) = crate::storage::file_store::FileStore::open(
        dir.path(),
        clock.clone(),
        Arc::new(crate::metrics::Histogram::new(&[1.0])),
        crate::storage::file_store::FileStoreOptions::default(),
    )
    .expect("open");
    let store = Arc::new(SlowReadCountingStore { inner, conflicts: Default::default() });
    let registry = Registry::new(vec![app("shop", TokenFormat::Jwt, ALL)]).expect("registry");
    let config = crate::passwords::service_config("https://issuer.test", ServicePolicies::default());
    let service = Arc::new(TokenService::new(registry, store.clone(), clock, config));
    let tasks: Vec<_> = (0..128)
        .map(|_| {
            let service = service.clone();
            tokio::spawn(async move {
                service.token(&client("shop"), Grant::ClientCredentials { scope: Some("device_x".into()) }).await
            })
        })
        .collect();
    let mut tokens = Vec::new();
    for t in tasks {
        tokens.push(t.await.expect("join").expect("every request gets a token").access_token);
    }
    assert_eq!(store.conflicts.load(std::sync::atomic::Ordering::Relaxed), 0, "requests for one key conflicted");
    let creds = client("shop");
    let mut live = 0;
    for t in &tokens {
        if matches!(service.introspect(&creds, t).await, Ok(Introspection::Active(_))) {
            live += 1;
        }
    }
    assert_eq!(live, 1);
}

/// Opaque reuse hands out exactly what was asked for: after a refresh narrowed the key's live pair, a request
/// for the full set gets a new pair with the full set, not the narrowed one.
#[tokio::test]
async fn opaque_reuse_happens_only_when_the_live_pair_has_the_requested_scopes() {
    let f = fixture(TokenFormat::Opaque);
    let full = f.password("alice", "alice-pw", "device_ipad orders:read").await.expect("full");
    let narrow = f
        .service
        .token(
            &client("shop"),
            Grant::RefreshToken {
                refresh_token: full.refresh_token.clone().expect("refresh"),
                scope: Some("orders:read".into()),
            },
        )
        .await
        .expect("narrowing refresh");
    assert_eq!(narrow.scope, "orders:read");
    let again = f.password("alice", "alice-pw", "device_ipad orders:read").await.expect("full again");
    assert_eq!(again.scope, "device_ipad orders:read", "the full set was asked for");
    assert_ne!(again.access_token, narrow.access_token, "the narrowed token was handed out for the full set");
    assert!(!again.reused);
    assert!(!f.active(&narrow.access_token).await, "the narrowed pair was replaced");
    // And with the full set live again, the same request reuses it.
    let same = f.password("alice", "alice-pw", "device_ipad orders:read").await.expect("same");
    assert!(same.reused);
    assert_eq!(same.access_token, again.access_token);
}

/// Bounded input: past the configured number of scopes, or a scope parameter past the configured length, a
/// request is `invalid_scope` before anything else is done with it.
#[tokio::test]
async fn too_many_scopes_or_an_overlong_scope_parameter_is_invalid_scope() {
    let f = fixture(TokenFormat::Jwt);
    let bounds = RequestBounds::default();
    let scopes = |n: usize| (0..n).map(|i| format!("device_d{i}")).collect::<Vec<_>>().join(" ");
    let at_limit = f.password("alice", "alice-pw", &scopes(bounds.max_scopes)).await;
    assert!(at_limit.is_ok(), "{at_limit:?}");
    for scope in [scopes(bounds.max_scopes + 1), format!("device_{}", "x".repeat(bounds.max_scope_bytes))] {
        match f.password("alice", "alice-pw", &scope).await {
            Err(OAuthError::InvalidScope(d)) => assert!(d.contains("at most"), "{d}"),
            other => panic!("expected invalid_scope, got {other:?}"),
        }
    }
    // Refresh requests are bounded the same way.
    let r = at_limit.expect("token").refresh_token.expect("refresh");
    let grant = Grant::RefreshToken { refresh_token: r, scope: Some(scopes(bounds.max_scopes + 1)) };
    assert!(matches!(f.service.token(&client("shop"), grant).await, Err(OAuthError::InvalidScope(_))));
}

/// Counts the password verifications actually run (each takes a while, as argon2 does).
struct CountingVerifier {
    inner: crate::passwords::BlockingPoolVerifier,
    verified: Arc<std::sync::atomic::AtomicUsize>,
}

impl crate::core::app::PasswordVerifier for CountingVerifier {
    fn verify(&self, digest: crate::core::app::PasswordDigest, password: String) -> crate::core::app::PasswordCheck {
        let verified = self.verified.clone();
        let check = self.inner.verify(digest, password);
        Box::pin(async move {
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
            verified.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            check.await
        })
    }
}

/// The lockout cannot be raced: of 64 concurrent wrong guesses for one user, no more than the configured number
/// are ever checked; the rest are refused unchecked, and the account ends locked.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_wrong_guesses_get_no_more_checks_than_the_lockout_allows() {
    let verified = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let clock = Arc::new(ManualClock::new(T0));
    let registry = Registry::new(vec![app("shop", TokenFormat::Jwt, ALL)]).expect("registry");
    let service = Arc::new(TokenService::new(
        registry,
        Arc::new(MemoryStore::default()),
        clock,
        ServiceConfig {
            key_sets: None,
            issuer: "https://issuer.test".into(),
            policies: ServicePolicies {
                user_lockout: LockoutPolicy { max_failures: 3, lock_secs: 60 },
                ..ServicePolicies::default()
            },
            passwords: Arc::new(CountingVerifier { inner: Default::default(), verified: verified.clone() }),
        },
    ));
    let guesses: Vec<_> = (0..64)
        .map(|i| {
            let service = service.clone();
            tokio::spawn(async move {
                let grant = Grant::Password { username: "alice".into(), password: format!("guess-{i}"), scope: None };
                service.token(&client("shop"), grant).await
            })
        })
        .collect();
    for g in guesses {
        assert!(matches!(g.await.expect("join"), Err(OAuthError::InvalidGrant(_))));
    }
    let checked = verified.load(std::sync::atomic::Ordering::SeqCst);
    assert!(checked <= 3, "{checked} guesses were checked with a lockout after 3");
    // And the right password is now refused too: the account is locked.
    let grant = Grant::Password { username: "alice".into(), password: "alice-pw".into(), scope: None };
    match service.token(&client("shop"), grant).await {
        Err(OAuthError::InvalidGrant(d)) => assert!(d.contains("locked"), "{d}"),
        other => panic!("expected a locked account, got {other:?}"),
    }
}

/// The decoy checked for unknown usernames has the kind and cost of the application's users' hashes.
#[test]
fn the_decoy_costs_what_the_applications_users_cost() {
    let bcrypt_user = |cost| User {
        digest: PasswordDigest::parse(&bcrypt::hash("pw", cost).expect("hash")).expect("digest"),
        roles: vec![],
    };
    let users = HashMap::from([("a".to_string(), bcrypt_user(6)), ("b".to_string(), bcrypt_user(6))]);
    let decoy = app_with_users("shop", TokenFormat::Jwt, ALL, users).decoy;
    assert!(matches!(&decoy, PasswordDigest::Bcrypt(h) if h.starts_with("$2b$06$")), "{decoy:?}");
    let argon = crate::core::app::hash_password_with("pw", 64, 3, 1).expect("hash");
    let users = HashMap::from([(
        "c".to_string(),
        User { digest: PasswordDigest::parse(&argon).expect("digest"), roles: vec![] },
    )]);
    let PasswordDigest::Argon2(decoy) = app_with_users("shop", TokenFormat::Jwt, ALL, users).decoy else {
        panic!("an argon2 decoy for argon2 users");
    };
    assert!(decoy.starts_with("$argon2id$v=19$m=64,t=3,p=1$"), "{decoy}");
    assert_ne!(decoy, argon, "a random password, not a user's hash");
}

/// No username oracle: a wrong password for an existing user and any password for an unknown user take about the
/// same time, with expensive bcrypt users (the built-in argon2 decoy would answer unknown users several times
/// faster). Medians of several attempts, and a generous tolerance: this runs on busy machines.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_and_known_usernames_take_the_same_time_to_refuse() {
    let slow_user = User {
        digest: PasswordDigest::parse(&bcrypt::hash("right", 11).expect("hash")).expect("digest"),
        roles: vec![],
    };
    let registry = Registry::new(vec![app_with_users(
        "shop",
        TokenFormat::Jwt,
        ALL,
        HashMap::from([("alice".to_string(), slow_user)]),
    )])
    .expect("registry");
    let service = TokenService::new(
        registry,
        Arc::new(MemoryStore::default()),
        Arc::new(ManualClock::new(T0)),
        crate::passwords::service_config(
            "https://issuer.test",
            ServicePolicies {
                user_lockout: LockoutPolicy { max_failures: 1000, lock_secs: 60 },
                ..ServicePolicies::default()
            },
        ),
    );
    let time = |user: String| {
        let service = &service;
        async move {
            let started = std::time::Instant::now();
            let grant = Grant::Password { username: user, password: "wrong".into(), scope: None };
            assert!(service.token(&client("shop"), grant).await.is_err());
            started.elapsed()
        }
    };
    let (mut known, mut unknown) = (Vec::new(), Vec::new());
    for i in 0..7 {
        known.push(time("alice".into()).await);
        unknown.push(time(format!("nobody-{i}")).await);
    }
    known.sort();
    unknown.sort();
    let ratio = unknown[3].as_secs_f64() / known[3].as_secs_f64();
    assert!((0.5..2.0).contains(&ratio), "unknown {:?} vs known {:?} (ratio {ratio:.2})", unknown[3], known[3]);
}

/// The other side of the lockout race: concurrent logins with the right password all get through (a few
/// checks at a time), however many there are.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_logins_with_the_right_password_all_succeed() {
    let f = Arc::new(fixture(TokenFormat::Jwt)); // lockout after 3 failures
    let logins: Vec<_> = (0..24)
        .map(|i| {
            let f = f.clone();
            tokio::spawn(async move { f.password("alice", "alice-pw", &format!("device_d{i}")).await })
        })
        .collect();
    for l in logins {
        l.await.expect("join").expect("every login with the right password succeeds");
    }
}

#[tokio::test]
async fn a_refresh_grants_only_what_the_user_may_have_now() {
    let f = fixture(TokenFormat::Jwt);
    let t = f.password("bob", "bob-pw", "device_ipad orders:read orders:admin").await.expect("bob");
    assert_eq!(t.scope, "device_ipad orders:admin orders:read");
    // bob is demoted from admin to customer: orders:admin goes at the next refresh, the device scope stays.
    let demoted = HashMap::from([
        ("alice".to_string(), user("alice-pw", &["customer"])),
        ("bob".to_string(), user("bob-pw", &["customer"])),
    ]);
    f.service.set_registry(
        Registry::new(vec![app_with_users("shop", TokenFormat::Jwt, ALL, demoted.clone())]).expect("registry"),
    );
    let refreshed =
        f.service.token(&client("shop"), refresh_grant(t.refresh_token.as_deref().expect("r"))).await.expect("refresh");
    assert_eq!(refreshed.scope, "device_ipad orders:read");
    // Asking for the lost scope by name is no way back: it is dropped like at login, not an error.
    let asked = Grant::RefreshToken {
        refresh_token: refreshed.refresh_token.clone().expect("r"),
        scope: Some("orders:admin device_ipad".into()),
    };
    assert_eq!(f.service.token(&client("shop"), asked).await.expect("refresh").scope, "device_ipad");
}

#[tokio::test]
async fn a_refresh_after_the_scope_declaration_or_the_grant_type_was_removed() {
    let f = fixture(TokenFormat::Jwt);
    let t = f.password("alice", "alice-pw", "device_ipad orders:read").await.expect("alice");
    let other = f.password("bob", "bob-pw", "device_tv").await.expect("bob");
    // orders:read is no longer declared by the application.
    let users = app("shop", TokenFormat::Jwt, ALL).users.clone();
    let narrower = app_with_users_and_scopes("shop", ALL, users.clone(), &[("catalog:read", &[])]);
    f.service.set_registry(Registry::new(vec![narrower]).expect("registry"));
    let refreshed =
        f.service.token(&client("shop"), refresh_grant(t.refresh_token.as_deref().expect("r"))).await.expect("refresh");
    assert_eq!(refreshed.scope, "device_ipad");
    // The password grant the session came from is disabled: its refresh tokens end with invalid_grant.
    let no_password = &[GrantType::ClientCredentials, GrantType::RefreshToken];
    f.service.set_registry(
        Registry::new(vec![app_with_users_and_scopes("shop", no_password, users, &[("catalog:read", &[])])])
            .expect("registry"),
    );
    let err = f
        .service
        .token(&client("shop"), refresh_grant(other.refresh_token.as_deref().expect("r")))
        .await
        .expect_err("password grant disabled");
    assert_eq!(err.code(), "invalid_grant");
}

#[tokio::test]
async fn two_callers_sharing_an_opaque_pair_never_revoke_each_other_by_refreshing() {
    let f = fixture(TokenFormat::Opaque);
    // Two callers log in for the same (application, user, scope set): they share the pair, refresh token included.
    let a = f.password("alice", "alice-pw", "device_kiosk").await.expect("a");
    let b = f.password("alice", "alice-pw", "device_kiosk").await.expect("b");
    assert_eq!((&a.access_token, &a.refresh_token), (&b.access_token, &b.refresh_token));
    let refresh_token = a.refresh_token.clone().expect("r");
    // A refreshes while the access token is valid: the same still-valid token, and B's copy stays active.
    let a2 = f.service.token(&client("shop"), refresh_grant(&refresh_token)).await.expect("a refreshes");
    assert_eq!(a2.access_token, a.access_token);
    assert!(f.active(&b.access_token).await, "B's access token survives A's refresh");
    // Later B refreshes with the same refresh token: not reuse, no revocation.
    f.clock.advance(3600);
    let b2 = f.service.token(&client("shop"), refresh_grant(&refresh_token)).await.expect("b refreshes");
    assert_ne!(b2.access_token, b.access_token, "the expired access token is replaced");
    let a3 = f.service.token(&client("shop"), refresh_grant(&refresh_token)).await.expect("a refreshes again");
    assert_eq!(a3.access_token, b2.access_token, "both callers share the new access token");
    assert!(f.active(&a3.access_token).await);
}

#[tokio::test]
async fn jwt_mode_still_detects_refresh_token_reuse_between_two_callers() {
    let f = fixture(TokenFormat::Jwt);
    let t = f.password("alice", "alice-pw", "device_kiosk").await.expect("login");
    let r = t.refresh_token.clone().expect("r");
    let first = f.service.token(&client("shop"), refresh_grant(&r)).await.expect("first refresh");
    let err = f.service.token(&client("shop"), refresh_grant(&r)).await.expect_err("reuse");
    assert_eq!(err.code(), "invalid_grant");
    assert!(!f.active(&first.access_token).await, "reuse revokes the grant's live tokens");
}

/// Rotation keeps no state per retired token: a login refreshed 60 times holds one entry, and the token it rotated
/// out 50 generations ago is still recognised as reuse.
#[tokio::test]
async fn a_refresh_token_rotated_out_fifty_generations_ago_is_reuse_and_costs_no_state() {
    let f = fixture(TokenFormat::Jwt);
    let login = f.password("alice", "alice-pw", "device_ipad").await.expect("login");
    let mut tokens = vec![login.refresh_token.clone().expect("r0")];
    let mut latest = login;
    for _ in 0..60 {
        f.clock.advance(60);
        let r = tokens.last().expect("r").clone();
        latest = f.service.token(&client("shop"), refresh_grant(&r)).await.expect("refresh");
        tokens.push(latest.refresh_token.clone().expect("rotated"));
        assert_eq!(f.store.with_state(|s| s.entries()), 1, "one entry for the key, however often it rotates");
    }
    // Every rotated-out generation is inactive, the current one active.
    assert!(!f.active(&tokens[10]).await && !f.active(&tokens[59]).await);
    assert!(f.active(&tokens[60]).await);
    let err = f.service.token(&client("shop"), refresh_grant(&tokens[10])).await.expect_err("reuse");
    assert_eq!(err.code(), "invalid_grant");
    assert!(err.to_string().contains("already used"), "{err}");
    assert!(!f.active(&latest.access_token).await, "reuse revokes the login's live tokens");
    assert!(!f.active(&tokens[60]).await);
    assert_eq!(f.store.with_state(|s| s.entries()), 0);
}

#[tokio::test]
async fn reuse_of_an_old_logins_refresh_token_revokes_that_login_only() {
    let f = fixture(TokenFormat::Jwt);
    let first_login = f.password("alice", "alice-pw", "device_ipad").await.expect("first login");
    let r1 = first_login.refresh_token.clone().expect("r1");
    f.service.token(&client("shop"), refresh_grant(&r1)).await.expect("rotate r1 out");
    // A later, independent login for the same key replaces that chain's pair.
    let second_login = f.password("alice", "alice-pw", "device_ipad").await.expect("second login");
    // The first login's rotated-out token comes back: reuse, refused, but the second login is not its descendant.
    let err = f.service.token(&client("shop"), refresh_grant(&r1)).await.expect_err("reuse");
    assert_eq!(err.code(), "invalid_grant");
    assert!(f.active(&second_login.access_token).await, "the independent login's access token stays");
    let r = second_login.refresh_token.as_deref().expect("r");
    let next = f.service.token(&client("shop"), refresh_grant(r)).await.expect("the second login still refreshes");
    // And reuse within the second chain still revokes that chain.
    f.service.token(&client("shop"), refresh_grant(r)).await.expect_err("reuse in the second chain");
    assert!(!f.active(&next.access_token).await);
}

#[tokio::test]
async fn a_session_ends_at_its_absolute_lifetime_however_recently_it_was_refreshed() {
    let clock = Arc::new(ManualClock::new(T0));
    let mut shop = app("shop", TokenFormat::Jwt, ALL);
    shop.session_max = Some(3 * 86_400);
    let service = TokenService::new(
        Registry::new(vec![shop]).expect("registry"),
        Arc::new(MemoryStore::default()),
        clock.clone(),
        crate::passwords::service_config("https://issuer.test", ServicePolicies::default()),
    );
    let login = Grant::Password { username: "alice".into(), password: "alice-pw".into(), scope: None };
    let mut t = service.token(&client("shop"), login).await.expect("login");
    // Refreshed every 12 hours: each refresh token lives 24 h, but none beyond the session's 3 days.
    for _ in 0..5 {
        clock.advance(12 * 3600);
        t = service
            .token(&client("shop"), refresh_grant(t.refresh_token.as_deref().expect("r")))
            .await
            .expect("refresh");
    }
    let r = t.refresh_token.clone().expect("r");
    let Ok(Introspection::Active(info)) = service.introspect(&client("shop"), &r).await else { panic!("active") };
    assert_eq!(info.exp, T0 + 3 * 86_400, "the last refresh token expires with the session, not 24 h later");
    clock.advance(12 * 3600);
    let err = service.token(&client("shop"), refresh_grant(&r)).await.expect_err("session over");
    assert_eq!(err.code(), "invalid_grant");
}

#[tokio::test]
async fn a_new_device_past_the_cap_revokes_the_least_recently_issued_key_of_that_user_only() {
    let clock = Arc::new(ManualClock::new(T0));
    let mut shop = app("shop", TokenFormat::Jwt, ALL);
    shop.max_keys_per_user = 3;
    let service = TokenService::new(
        Registry::new(vec![shop]).expect("registry"),
        Arc::new(ColdStore::forgetful()),
        clock.clone(),
        crate::passwords::service_config("https://issuer.test", ServicePolicies::default()),
    );
    let login = |user: &str, pw: &str, device: &str| Grant::Password {
        username: user.into(),
        password: pw.into(),
        scope: Some(device.into()),
    };
    let active = |t: String| {
        let service = &service;
        async move { matches!(service.introspect(&client("shop"), &t).await, Ok(Introspection::Active(_))) }
    };
    let mut tokens = HashMap::new();
    for device in ["device_a", "device_b", "device_c"] {
        clock.advance(1);
        tokens.insert(device, service.token(&client("shop"), login("alice", "alice-pw", device)).await.expect("login"));
    }
    let bob = service.token(&client("shop"), login("bob", "bob-pw", "device_a")).await.expect("bob");
    // device_a is refreshed: now the most recently issued; device_b is the least.
    clock.advance(1);
    let a = service
        .token(&client("shop"), refresh_grant(tokens["device_a"].refresh_token.as_deref().expect("r")))
        .await
        .expect("refresh");
    clock.advance(1);
    let d = service.token(&client("shop"), login("alice", "alice-pw", "device_d")).await.expect("fourth device");
    assert!(!active(tokens["device_b"].access_token.clone()).await, "the least recently issued key is revoked");
    for t in [a.access_token, tokens["device_c"].access_token.clone(), d.access_token, bob.access_token] {
        assert!(active(t).await, "the others, and other users' keys, stay");
    }
    // The same device again is no new key: nothing is evicted.
    let d2 = service.token(&client("shop"), login("alice", "alice-pw", "device_d")).await.expect("again");
    assert!(active(d2.access_token).await && active(tokens["device_c"].access_token.clone()).await);
}

/// A store where another replica wins the key before each of this request's first `losses` commits: the change
/// is refused as a conflict after the rival's pair is in place, as a shared store would.
struct LosingStore {
    inner: MemoryStore,
    losses: std::sync::atomic::AtomicUsize,
    clock: Arc<ManualClock>,
}

impl StoreWrapper for LosingStore {
    fn inner(&self) -> &dyn TokenStore {
        &self.inner
    }
    fn wrap_commit(&self, change: Change) -> crate::core::store::StoreFuture<'_, ()> {
        use std::sync::atomic::Ordering;
        let lost = self.losses.fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1)).is_ok();
        let result = if lost {
            // The rival replaces the key's pair first; time passes too, one second per lost race.
            self.clock.advance(1);
            let rival =
                LivePair { access_id: TokenId([self.losses.load(Ordering::SeqCst) as u8; 16]), ..sample_pair() };
            let expect = self.inner.pair(&change.key).map(|p| p.access_id);
            self.inner
                .with_state(|s| s.commit(Change { key: change.key.clone(), expect, next: Some(rival) }))
                .map_err(StoreError::from)
                .and(Err(StoreError::Conflict))
        } else {
            self.inner.with_state(|s| s.commit(change)).map_err(StoreError::from)
        };
        Box::pin(async move { result })
    }
}

fn sample_pair() -> LivePair {
    LivePair {
        access_id: TokenId([0; 16]),
        access_scopes: ScopeSet::default(),
        issued_at: T0,
        access_expires_at: T0 + 3600,
        refresh: None,
    }
}

/// A service over a [`LosingStore`] that loses `losses` races; each costs a second of the service's clock if
/// `slow`.
fn losing_service(losses: usize, slow: bool) -> (TokenService, Arc<LosingStore>) {
    let clock = Arc::new(ManualClock::new(T0));
    let store_clock = if slow { clock.clone() } else { Arc::new(ManualClock::new(T0)) };
    let store = Arc::new(LosingStore {
        inner: MemoryStore::default(),
        losses: std::sync::atomic::AtomicUsize::new(losses),
        clock: store_clock,
    });
    let registry = Registry::new(vec![app("shop", TokenFormat::Jwt, ALL)]).expect("registry");
    let config = crate::passwords::service_config("https://issuer.test", ServicePolicies::default());
    (TokenService::new(registry, store.clone(), clock, config), store)
}

/// Conflicts are retried until the request's deadline, not a fixed number of times: a request that loses the race
/// for its key 40 times in a row still gets its token (16 attempts were the limit before); one that keeps losing
/// past the deadline gets 503 `temporarily_unavailable`.
#[tokio::test]
async fn a_request_that_keeps_losing_the_race_for_its_key_is_retried_until_its_deadline() {
    let grant = || Grant::ClientCredentials { scope: Some("device_x".into()) };
    let (service, store) = losing_service(40, false);
    let issued =
        service.token(&client("shop"), grant()).await.expect("40 lost races within the deadline, then the token");
    assert!(f_active(&service, &issued.access_token).await);
    assert_eq!(store.losses.load(std::sync::atomic::Ordering::SeqCst), 0);

    // Each lost race costs a second here: the deadline (10 s) passes first.
    let (service, store) = losing_service(40, true);
    let err = service.token(&client("shop"), grant()).await.expect_err("past the deadline");
    assert_eq!(err.code(), "temporarily_unavailable");
    let left = store.losses.load(std::sync::atomic::Ordering::SeqCst);
    assert!((25..=30).contains(&left), "it gave up once the deadline passed: {left} races left");
}

async fn f_active(service: &TokenService, token: &str) -> bool {
    matches!(service.introspect(&client("shop"), token).await, Ok(Introspection::Active(_)))
}

/// While applications are still loading (a sidecar starting), a client the service does not know yet gets 503
/// `temporarily_unavailable`, never 401 `invalid_client` (which clients take as wrong credentials), and those
/// requests do not count toward the client lockout. A known client with a wrong secret is still 401.
#[tokio::test]
async fn while_applications_load_an_unknown_client_is_told_to_retry_and_nothing_counts_toward_lockout() {
    let f = fixture(TokenFormat::Jwt);
    let loaded = f.service.registry();
    f.service.set_registry(Registry::default());
    f.service.set_loading(true);
    let grant = || Grant::ClientCredentials { scope: None };
    for _ in 0..10 {
        let err = f.service.token(&client("shop"), grant()).await.expect_err("still loading");
        assert_eq!(err.code(), "temporarily_unavailable", "{err}");
        let err = f.service.introspect(&client("shop"), "x").await.expect_err("still loading");
        assert_eq!(err.code(), "temporarily_unavailable");
    }
    // Loaded: the same client authenticates (ten 503s did not lock it: the lockout allows 3 failures).
    f.service.set_registry(Registry::from_shared(loaded.apps().cloned()).expect("registry"));
    f.service.set_loading(false);
    f.service.token(&client("shop"), grant()).await.expect("loaded: a token");
    let wrong = ClientCredentials { client_id: "shop".into(), client_secret: "wrong".into() };
    assert_eq!(f.service.token(&wrong, grant()).await.expect_err("wrong secret").code(), "invalid_client");
    // An unknown client once everything is loaded: 401.
    let unknown = ClientCredentials { client_id: "nobody".into(), client_secret: "s3cret".into() };
    assert_eq!(f.service.token(&unknown, grant()).await.expect_err("unknown").code(), "invalid_client");
}

/// A store at its capacity refuses a new key: the client gets `temporarily_unavailable` (503 on the wire) saying
/// the application's token state is full, at once; a refresh of an existing login still works.
#[tokio::test]
async fn a_full_store_refuses_new_logins_with_a_description_and_existing_sessions_refresh() {
    struct FullStore(MemoryStore);
    impl StoreWrapper for FullStore {
        fn inner(&self) -> &dyn TokenStore {
            &self.0
        }
        fn wrap_commit(&self, change: Change) -> crate::core::store::StoreFuture<'_, ()> {
            let adds_key = change.expect.is_none() && change.next.is_some();
            let full = adds_key && self.0.with_state(|s| s.entries()) >= 1;
            let result = if full {
                Err(StoreError::Full("1 live token keys, the capacity".into()))
            } else {
                self.0.with_state(|s| s.commit(change)).map_err(StoreError::from)
            };
            Box::pin(async move { result })
        }
    }
    let clock = Arc::new(ManualClock::new(T0));
    let registry = Registry::new(vec![app("shop", TokenFormat::Jwt, ALL)]).expect("registry");
    let config = crate::passwords::service_config("https://issuer.test", ServicePolicies::default());
    let service = TokenService::new(registry, Arc::new(FullStore(MemoryStore::default())), clock, config);
    let login = |device: &str| Grant::Password {
        username: "alice".into(),
        password: "alice-pw".into(),
        scope: Some(device.into()),
    };
    let first = service.token(&client("shop"), login("device_ipad")).await.expect("room for one key");
    let err = service.token(&client("shop"), login("device_iphone")).await.expect_err("full");
    assert_eq!(err.code(), "temporarily_unavailable");
    assert!(err.description().contains("token state is full"), "{err}");
    // The same key again (a new login on the iPad) replaces its pair in place, and a refresh rotates in place.
    let again = service.token(&client("shop"), login("device_ipad")).await.expect("same key");
    let r = again.refresh_token.expect("refresh token");
    service.token(&client("shop"), refresh_grant(&r)).await.expect("refresh while full");
    assert_ne!(first.access_token, again.access_token);
}

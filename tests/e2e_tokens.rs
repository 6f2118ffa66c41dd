//! End-to-end: the real binary over real HTTP, serving the repository's example manifests.

mod common;

use common::{KIOSK, SHOP, Server, examples_dir, get, post_form, post_oversized, raw};
use serde_json::Value;

fn server() -> (Server, tempfile::TempDir) {
    let state = tempfile::tempdir().expect("tempdir");
    (Server::start(&examples_dir(), state.path(), &[]), state)
}

#[test]
fn seed_scenario_one_live_token_per_device() {
    let (s, _state) = server();
    let ipad1 = s.password("alice", "alice-password", "device_ipad");
    assert_eq!(ipad1.status, 200, "{}", ipad1.body);
    let iphone = s.password("alice", "alice-password", "device_iphone");
    assert_eq!(iphone.status, 200, "{}", iphone.body);
    let (ipad1, iphone) = (ipad1.field("access_token"), iphone.field("access_token"));
    assert_ne!(ipad1, iphone);
    assert!(s.active(SHOP, &ipad1), "iPad token active");
    assert!(s.active(SHOP, &iphone), "iPhone token active");

    let ipad2 = s.password("alice", "alice-password", "device_ipad").field("access_token");
    assert!(!s.active(SHOP, &ipad1), "a second iPad request revokes the first iPad token");
    assert!(s.active(SHOP, &ipad2));
    assert!(s.active(SHOP, &iphone), "the iPhone token is untouched");
}

#[test]
fn device_scopes_combine_with_role_checked_scopes() {
    let (s, _state) = server();
    let t = s.password("alice", "alice-password", "device_ipad orders:read orders:admin");
    // alice is a customer: orders:admin is dropped, orders:read granted, the device scope always granted.
    assert_eq!(t.field("scope"), "device_ipad orders:read");
    let plain = s.password("alice", "alice-password", "device_ipad");
    assert_eq!(plain.field("scope"), "device_ipad");
    assert!(s.active(SHOP, &t.field("access_token")), "a different scope set is a different key");
    assert!(s.active(SHOP, &plain.field("access_token")));
    let admin = s.password("bob", "bob-password", "device_ipad orders:admin");
    assert_eq!(admin.field("scope"), "device_ipad orders:admin");
}

#[test]
fn dropped_scopes_and_the_default_scope() {
    let (s, _state) = server();
    assert_eq!(s.password("alice", "alice-password", "orders:admin unknown:scope").field("scope"), "default");
    assert_eq!(s.password("alice", "alice-password", "").field("scope"), "default");
    assert_eq!(s.password("alice", "alice-password", "catalog:read unknown:scope").field("scope"), "catalog:read");
}

#[test]
fn opaque_mode_returns_the_same_still_valid_token() {
    let (s, _state) = server();
    let params = [("grant_type", "client_credentials"), ("scope", "catalog:read device_kiosk1")];
    let first = s.token(KIOSK, &params);
    assert_eq!(first.status, 200, "{}", first.body);
    let second = s.token(KIOSK, &params);
    assert_eq!(first.field("access_token"), second.field("access_token"));
    // The same token, so what is left of its 15 minutes (a second or two may have passed).
    let left = second.json()["expires_in"].as_u64().expect("expires_in");
    assert!((890..=900).contains(&left), "expires_in {left}");
    // Another device: another token; both live.
    let other = s.token(KIOSK, &[("grant_type", "client_credentials"), ("scope", "catalog:read device_kiosk2")]);
    assert_ne!(other.field("access_token"), first.field("access_token"));
    // After revocation, a new token for the same set.
    assert_eq!(s.revoke(KIOSK, &first.field("access_token")).status, 200);
    let third = s.token(KIOSK, &params);
    assert_ne!(third.field("access_token"), first.field("access_token"));
    assert!(s.active(KIOSK, &third.field("access_token")));
    assert!(s.active(KIOSK, &other.field("access_token")));
}

#[test]
fn refresh_rotation_and_reuse_detection() {
    let (s, _state) = server();
    let first = s.password("alice", "alice-password", "device_ipad orders:read");
    let r1 = first.field("refresh_token");
    let second = s.token(SHOP, &[("grant_type", "refresh_token"), ("refresh_token", &r1)]);
    assert_eq!(second.status, 200, "{}", second.body);
    let r2 = second.field("refresh_token");
    assert_ne!(r1, r2, "the refresh token rotates");
    assert_eq!(second.field("scope"), "device_ipad orders:read");
    assert!(!s.active(SHOP, &first.field("access_token")), "the key's previous access token is revoked");
    assert!(s.active(SHOP, &second.field("access_token")));

    let narrower = s.token(SHOP, &[("grant_type", "refresh_token"), ("refresh_token", &r2), ("scope", "orders:read")]);
    assert_eq!(narrower.status, 200, "{}", narrower.body);
    assert_eq!(narrower.field("scope"), "orders:read");
    let r3 = narrower.field("refresh_token");
    let wider = s
        .token(SHOP, &[("grant_type", "refresh_token"), ("refresh_token", &r3), ("scope", "orders:read catalog:read")]);
    assert_eq!((wider.status, wider.error().as_str()), (400, "invalid_scope"));

    // Reuse of a rotated-out refresh token: invalid_grant, and the grant's live tokens are revoked.
    let reuse = s.token(SHOP, &[("grant_type", "refresh_token"), ("refresh_token", &r1)]);
    assert_eq!((reuse.status, reuse.error().as_str()), (400, "invalid_grant"));
    assert!(!s.active(SHOP, &narrower.field("access_token")));
    assert!(!s.active(SHOP, &r3));
    let after = s.token(SHOP, &[("grant_type", "refresh_token"), ("refresh_token", &r3)]);
    assert_eq!(after.error(), "invalid_grant");
}

#[test]
fn revocation_and_introspection() {
    let (s, _state) = server();
    let t = s.password("alice", "alice-password", "device_ipad orders:read");
    let access = t.field("access_token");
    let info = s.introspect(SHOP, &access);
    assert_eq!(info["active"], true);
    assert_eq!(info["scope"], "device_ipad orders:read");
    assert_eq!(info["client_id"], "shop-app");
    assert_eq!(info["username"], "alice");
    assert_eq!(info["sub"], "alice");
    assert_eq!(info["token_type"], "Bearer");
    assert_eq!(info["aud"], serde_json::json!(["shop-api"]));
    assert_eq!(info["iss"], Value::String(s.base.clone()));
    assert!(info["exp"].as_u64().expect("exp") > info["iat"].as_u64().expect("iat"));

    // Another application can neither see nor revoke it.
    assert_eq!(s.introspect(KIOSK, &access), serde_json::json!({"active": false}));
    assert_eq!(s.revoke(KIOSK, &access).status, 200);
    assert!(s.active(SHOP, &access));

    // RFC 7009: unknown tokens are a 200 too.
    assert_eq!(s.revoke(SHOP, "no-such-token").status, 200);
    let revoked = s.revoke(SHOP, &access);
    assert_eq!(revoked.status, 200);
    assert_eq!(revoked.header("cache-control"), Some("no-store"));
    // An inactive token gives exactly {"active":false}.
    let inactive = post_form(&s.url("/oauth2/introspect"), Some(SHOP), &[("token", &access)]);
    assert_eq!(inactive.body, r#"{"active":false}"#);
    assert!(!s.active(SHOP, &t.field("refresh_token")), "revoking the access token revokes its refresh token");
    // The token_type_hint is optional and may be wrong.
    let t2 = s.password("alice", "alice-password", "device_ipad");
    let r = post_form(
        &s.url("/oauth2/revoke"),
        Some(SHOP),
        &[("token", &t2.field("refresh_token")), ("token_type_hint", "access_token")],
    );
    assert_eq!(r.status, 200);
    assert!(!s.active(SHOP, &t2.field("access_token")));
}

#[test]
fn repeated_failed_passwords_lock_the_account() {
    let state = tempfile::tempdir().expect("tempdir");
    let s = Server::start(&examples_dir(), state.path(), &["--lockout-max-failures", "3", "--lockout-duration", "10m"]);
    for _ in 0..3 {
        let r = s.password("alice", "wrong", "");
        assert_eq!((r.status, r.error().as_str()), (400, "invalid_grant"));
    }
    let locked = s.password("alice", "alice-password", "");
    assert_eq!((locked.status, locked.error().as_str()), (400, "invalid_grant"));
    assert!(locked.field("error_description").contains("locked"), "{}", locked.body);
    assert_eq!(s.password("bob", "bob-password", "").status, 200, "other users are not locked");
}

#[test]
fn repeated_failed_client_authentication_is_throttled() {
    let state = tempfile::tempdir().expect("tempdir");
    let s = Server::start(&examples_dir(), state.path(), &["--client-lockout-max-failures", "3"]);
    for _ in 0..3 {
        let r = s.token(("shop-app", "wrong"), &[("grant_type", "client_credentials")]);
        assert_eq!((r.status, r.error().as_str()), (401, "invalid_client"));
    }
    let r = s.token(("shop-app", "wrong"), &[("grant_type", "client_credentials")]);
    assert_eq!((r.status, r.error().as_str()), (401, "invalid_client"));
    assert!(r.body.contains("try again"), "locked: {}", r.body);
    // Knowing the client ID is not enough to lock the client out: its real secret still works.
    assert_eq!(s.token(SHOP, &[("grant_type", "client_credentials")]).status, 200);
    assert_eq!(s.token(KIOSK, &[("grant_type", "client_credentials")]).status, 200);
}

#[test]
fn token_responses_follow_rfc6749_section_5() {
    let (s, _state) = server();
    let ok = s.token(SHOP, &[("grant_type", "client_credentials"), ("scope", "orders:read")]);
    assert_eq!(ok.status, 200);
    assert_eq!(ok.header("cache-control"), Some("no-store"));
    assert_eq!(ok.header("pragma"), Some("no-cache"));
    assert!(ok.header("content-type").expect("content type").starts_with("application/json"));
    let body = ok.json();
    assert_eq!(body["token_type"], "Bearer");
    assert_eq!(body["expires_in"], 3600);
    assert!(body.get("refresh_token").is_none(), "no refresh token for client_credentials");
    // client_secret_post works as well as Basic.
    let post = post_form(
        &s.url("/oauth2/token"),
        None,
        &[("grant_type", "client_credentials"), ("client_id", SHOP.0), ("client_secret", SHOP.1)],
    );
    assert_eq!(post.status, 200, "{}", post.body);
}

#[test]
fn rfc6749_error_cases_on_the_wire() {
    let (s, _state) = server();
    let url = s.url("/oauth2/token");
    let form = "application/x-www-form-urlencoded";
    let basic = common::basic(SHOP);
    let bad_basic = common::basic(("shop-app", "wrong"));

    // invalid_client with Basic: 401 and WWW-Authenticate.
    let r =
        raw("POST", &url, &[("Content-Type", form), ("Authorization", &bad_basic)], "grant_type=client_credentials");
    assert_eq!((r.status, r.error().as_str()), (401, "invalid_client"));
    assert!(r.header("www-authenticate").expect("challenge").starts_with("Basic"));
    assert_eq!(r.header("cache-control"), Some("no-store"));
    // Unknown client via the form, and no authentication at all.
    let r =
        raw("POST", &url, &[("Content-Type", form)], "grant_type=client_credentials&client_id=nobody&client_secret=x");
    assert_eq!((r.status, r.error().as_str()), (401, "invalid_client"));
    let r = raw("POST", &url, &[("Content-Type", form)], "grant_type=client_credentials");
    assert_eq!((r.status, r.error().as_str()), (401, "invalid_client"));
    // Malformed Basic header.
    let r =
        raw("POST", &url, &[("Content-Type", form), ("Authorization", "Basic !!!")], "grant_type=client_credentials");
    assert_eq!((r.status, r.error().as_str()), (401, "invalid_client"));
    // Two authentication methods at once.
    let r = raw(
        "POST",
        &url,
        &[("Content-Type", form), ("Authorization", &basic)],
        "grant_type=client_credentials&client_secret=x",
    );
    assert_eq!((r.status, r.error().as_str()), (400, "invalid_request"));

    let cases: &[(&str, u16, &str)] = &[
        ("grant_type=authorization_code&code=x", 400, "unsupported_grant_type"),
        ("grant_type=urn:ietf:params:oauth:grant-type:saml2-bearer&assertion=x", 400, "unsupported_grant_type"),
        // Supported since issue 21, but not without its assertion (tests/e2e_federation.rs has the rest).
        ("grant_type=urn:ietf:params:oauth:grant-type:jwt-bearer", 400, "invalid_request"),
        ("scope=a", 400, "invalid_request"),
        ("grant_type=client_credentials&grant_type=password", 400, "invalid_request"),
        ("grant_type=client_credentials&scope=a&scope=b", 400, "invalid_request"),
        ("grant_type=password&username=alice", 400, "invalid_request"),
        ("grant_type=password&password=x", 400, "invalid_request"),
        ("grant_type=refresh_token", 400, "invalid_request"),
        ("grant_type=refresh_token&refresh_token=garbage", 400, "invalid_grant"),
        ("grant_type=password&username=alice&password=nope", 400, "invalid_grant"),
        ("grant_type=client_credentials&scope=bad%22scope", 400, "invalid_scope"),
        ("grant_type=%ff%fe", 400, "unsupported_grant_type"),
        ("grant_type=client_credentials&scope=%ff", 400, "invalid_scope"),
    ];
    for (body, status, error) in cases {
        let r = raw("POST", &url, &[("Content-Type", form), ("Authorization", &basic)], body);
        assert_eq!((r.status, r.error().as_str()), (*status, *error), "body {body}: {}", r.body);
        assert!(r.json()["error_description"].is_string(), "{body}");
    }
    // unauthorized_client: kiosk may only use client_credentials.
    let r = s.token(KIOSK, &[("grant_type", "password"), ("username", "alice"), ("password", "alice-password")]);
    assert_eq!((r.status, r.error().as_str()), (400, "unauthorized_client"));

    // 405, 415, 413.
    let r = get(&url);
    assert_eq!(r.status, 405);
    assert_eq!(r.header("allow"), Some("POST"));
    let r = raw(
        "POST",
        &url,
        &[("Content-Type", "application/json"), ("Authorization", &basic)],
        r#"{"grant_type":"client_credentials"}"#,
    );
    assert_eq!((r.status, r.error().as_str()), (415, "invalid_request"));
    let r = raw("POST", &url, &[("Authorization", &basic)], "grant_type=client_credentials");
    assert_eq!(r.status, 415);
    let huge = format!("grant_type=client_credentials&scope={}", "a".repeat(64 * 1024));
    let r = post_oversized(&url, &[("Content-Type", form), ("Authorization", &basic)], &huge);
    assert_eq!((r.status, r.error().as_str()), (413, "invalid_request"));

    // The same for revocation and introspection.
    for path in ["/oauth2/revoke", "/oauth2/introspect"] {
        let u = s.url(path);
        assert_eq!(get(&u).status, 405, "{path}");
        let r = raw("POST", &u, &[("Content-Type", form), ("Authorization", &basic)], "");
        assert_eq!((r.status, r.error().as_str()), (400, "invalid_request"), "{path} without token");
        let r = raw("POST", &u, &[("Content-Type", form), ("Authorization", &basic)], "token=a&token=b");
        assert_eq!((r.status, r.error().as_str()), (400, "invalid_request"), "{path} repeated token");
        let r = raw("POST", &u, &[("Content-Type", form), ("Authorization", &bad_basic)], "token=a");
        assert_eq!((r.status, r.error().as_str()), (401, "invalid_client"), "{path} bad client");
        let r = raw("POST", &u, &[("Content-Type", "text/plain"), ("Authorization", &basic)], "token=a");
        assert_eq!(r.status, 415, "{path}");
        let r = post_oversized(&u, &[("Content-Type", form), ("Authorization", &basic)], &huge);
        assert_eq!(r.status, 413, "{path}");
    }
    // The server is still healthy after all of that.
    assert_eq!(get(&s.url("/healthz")).status, 200);
    assert_eq!(s.token(SHOP, &[("grant_type", "client_credentials")]).status, 200);
}

#[test]
fn jwt_verifies_with_the_jwks_using_an_independent_library() {
    use jsonwebtoken::{DecodingKey, Validation, decode, decode_header, jwk::JwkSet};
    let (s, _state) = server();
    let token = s.password("alice", "alice-password", "device_ipad orders:read").field("access_token");
    let jwks_response = get(&s.url("/oauth2/jwks"));
    assert_eq!(jwks_response.status, 200);
    let jwks: JwkSet = serde_json::from_str(&jwks_response.body).expect("JWKS parses");
    for key in jwks_response.json()["keys"].as_array().expect("keys") {
        for private in ["d", "p", "q", "dp", "dq", "qi"] {
            assert!(key.get(private).is_none(), "JWKS must not publish private key material");
        }
    }
    let header = decode_header(&token).expect("header");
    assert_eq!(header.typ.as_deref(), Some("at+jwt"));
    let kid = header.kid.expect("kid");
    let jwk = jwks.find(&kid).expect("the token's kid is in the JWKS");
    let mut validation = Validation::new(header.alg);
    validation.set_audience(&["shop-api"]);
    validation.set_issuer(&[s.base.as_str()]);
    validation.set_required_spec_claims(&["exp", "iss", "sub", "aud"]);
    let claims =
        decode::<Value>(&token, &DecodingKey::from_jwk(jwk).expect("key"), &validation).expect("verifies").claims;
    assert_eq!(claims["sub"], "alice");
    assert_eq!(claims["client_id"], "shop-app");
    assert_eq!(claims["scope"], "device_ipad orders:read");
    assert!(claims["jti"].is_string());
    assert!(claims["iat"].is_u64());
    // A tampered token does not verify.
    let mut parts: Vec<String> = token.split('.').map(str::to_string).collect();
    parts[1] = parts[1].chars().rev().collect();
    assert!(decode::<Value>(&parts.join("."), &DecodingKey::from_jwk(jwk).expect("key"), &validation).is_err());
}

#[test]
fn metadata_is_true_to_the_server() {
    let (s, _state) = server();
    let m = get(&s.url("/.well-known/oauth-authorization-server")).json();
    assert_eq!(m["issuer"], Value::String(s.base.clone()));
    for (field, path) in [
        ("token_endpoint", "/oauth2/token"),
        ("revocation_endpoint", "/oauth2/revoke"),
        ("introspection_endpoint", "/oauth2/introspect"),
        ("jwks_uri", "/oauth2/jwks"),
    ] {
        let url = m[field].as_str().expect(field);
        assert_eq!(url, s.url(path));
    }
    assert_eq!(m["grant_types_supported"], serde_json::json!(["client_credentials", "password", "refresh_token"]));
    assert_eq!(
        m["token_endpoint_auth_methods_supported"],
        serde_json::json!(["client_secret_basic", "client_secret_post"])
    );
    // Every advertised endpoint answers.
    assert_eq!(get(m["jwks_uri"].as_str().expect("jwks")).status, 200);
    let r = post_form(m["introspection_endpoint"].as_str().expect("introspect"), Some(SHOP), &[("token", "x")]);
    assert_eq!(r.body, r#"{"active":false}"#);
}

#[test]
fn health_readiness_and_metrics() {
    let (s, _state) = server();
    assert_eq!(get(&s.url("/healthz")).status, 200);
    assert_eq!(get(&s.url("/readyz")).status, 200);
    s.token(SHOP, &[("grant_type", "client_credentials")]);
    s.token(SHOP, &[("grant_type", "client_credentials"), ("scope", "bad\"")]);
    let t = s.token(SHOP, &[("grant_type", "client_credentials")]).field("access_token");
    s.revoke(SHOP, &t);
    let m = get(&s.url("/metrics"));
    assert!(m.header("content-type").expect("type").starts_with("text/plain"));
    let text = m.body;
    assert!(text.contains("kubetoken_tokens_total{grant_type=\"client_credentials\",outcome=\"issued\"} 2"), "{text}");
    assert!(
        text.contains("kubetoken_tokens_total{grant_type=\"client_credentials\",outcome=\"invalid_scope\"} 1"),
        "{text}"
    );
    assert!(text.contains("kubetoken_revocations_total 1"), "{text}");
    assert!(text.contains("kubetoken_request_duration_seconds_count{endpoint=\"token\"} 3"), "{text}");
    assert!(text.contains("kubetoken_storage_batch_records_sum 3"), "{text}");
}

#[test]
fn tokens_survive_a_graceful_restart_and_no_secret_is_logged() {
    let state = tempfile::tempdir().expect("tempdir");
    let mut s = Server::start(&examples_dir(), state.path(), &[]);
    let keep = s.password("alice", "alice-password", "device_ipad");
    let gone = s.password("alice", "alice-password", "device_iphone");
    let superseded = s.password("alice", "alice-password", "device_watch");
    let current = s.password("alice", "alice-password", "device_watch");
    assert_eq!(s.revoke(SHOP, &gone.field("access_token")).status, 200);
    // The failure paths log too: a wrong password (until the account locks), a wrong client secret, an unknown
    // client, a rotated-out refresh token presented again.
    for _ in 0..6 {
        assert_eq!(s.password("bob", "not-bobs-password-XYZ", "device_x").status, 400);
    }
    assert_eq!(s.token(("shop-app", "wrong-secret-QRS"), &[("grant_type", "client_credentials")]).status, 401);
    assert_eq!(s.token(("nobody-client", "nobody-secret-JKL"), &[("grant_type", "client_credentials")]).status, 401);
    let rotated = s.token(SHOP, &[("grant_type", "refresh_token"), ("refresh_token", &current.field("refresh_token"))]);
    assert_eq!(rotated.status, 200);
    let reuse = s.token(SHOP, &[("grant_type", "refresh_token"), ("refresh_token", &current.field("refresh_token"))]);
    assert_eq!(reuse.status, 400);
    let stderr = s.stop();
    assert!(stderr.contains("locked") && stderr.contains("reuse"), "the failure paths were logged: {stderr}");
    for secret in [
        keep.field("access_token"),
        keep.field("refresh_token"),
        current.field("refresh_token"),
        rotated.field("access_token"),
        SHOP.1.to_string(),
        "alice-password".into(),
        "not-bobs-password-XYZ".into(),
        "wrong-secret-QRS".into(),
        "nobody-secret-JKL".into(),
    ] {
        assert!(!stderr.contains(&secret), "a secret or token reached the logs: {secret}");
    }
    let s = Server::start(&examples_dir(), state.path(), &[]);
    assert!(s.active(SHOP, &keep.field("access_token")));
    assert!(s.active(SHOP, &keep.field("refresh_token")));
    assert!(!s.active(SHOP, &gone.field("access_token")));
    assert!(!s.active(SHOP, &superseded.field("access_token")));
    // `current` was refreshed and its grant then revoked by the reuse: inactive, and it stays so.
    assert!(!s.active(SHOP, &current.field("access_token")));
    assert!(!s.active(SHOP, &rotated.field("access_token")));
    // The refresh token still works after the restart.
    let r = s.token(SHOP, &[("grant_type", "refresh_token"), ("refresh_token", &keep.field("refresh_token"))]);
    assert_eq!(r.status, 200, "{}", r.body);
}

/// A manifest directory holding the given files and an empty state directory, for one server at a time.
struct Scratch {
    manifests: tempfile::TempDir,
    state: tempfile::TempDir,
}

impl Scratch {
    fn new(files: &[(&str, &str)]) -> Self {
        let manifests = tempfile::tempdir().expect("tempdir");
        for (name, text) in files {
            std::fs::write(manifests.path().join(name), text).expect("write manifest");
        }
        Self { manifests, state: tempfile::tempdir().expect("tempdir") }
    }

    fn start(&self) -> Server {
        Server::start(self.manifests.path(), self.state.path(), &[])
    }

    /// The error of a start that must fail.
    fn start_error(&self) -> String {
        Server::try_start(self.manifests.path(), self.state.path(), &[]).err().expect("start must fail")
    }
}

#[test]
fn generated_credentials_are_printed_and_kept_across_restarts() {
    let dirs = Scratch::new(&[(
        "app.yaml",
        "apiVersion: kubetoken.io/v1alpha1\nkind: OAuthApplication\nmetadata: {name: svc, namespace: team}\nspec:\n  grantTypes: [client_credentials]\n  signing: {algorithm: EdDSA}\n",
    )]);
    let creds = |s: &Server| -> (String, String) {
        let line = s.banner.iter().find(|l| l.starts_with("credentials for team/svc")).expect("credentials line");
        let id = line.split("client_id=").nth(1).expect("id").split(' ').next().expect("id").to_string();
        let secret = line.split("client_secret=").nth(1).expect("secret").trim().to_string();
        (id, secret)
    };
    let mut s = dirs.start();
    let (id, secret) = creds(&s);
    let t = s.token((&id, &secret), &[("grant_type", "client_credentials")]);
    assert_eq!(t.status, 200, "{}", t.body);
    let jwks = get(&s.url("/oauth2/jwks")).json();
    assert_eq!(jwks["keys"][0]["kty"], "OKP");
    s.stop();
    let s = dirs.start();
    assert_eq!(creds(&s), (id.clone(), secret.clone()), "the same credentials after a restart");
    assert!(s.active((&id, &secret), &t.field("access_token")));
    assert_eq!(get(&s.url("/oauth2/jwks")).json(), jwks, "the same signing key after a restart");
}

#[test]
fn rs256_applications_sign_with_rs256() {
    let dirs = Scratch::new(&[(
        "app.yaml",
        "apiVersion: kubetoken.io/v1alpha1\nkind: OAuthApplication\nmetadata: {name: legacy}\nspec:\n  grantTypes: [client_credentials]\n  signing: {algorithm: RS256}\n  credentials: {secretName: legacy-creds}\n---\napiVersion: v1\nkind: Secret\nmetadata: {name: legacy-creds}\ndata: {client_id: bGVnYWN5, client_secret: czNjcmV0}\n",
    )]);
    let s = dirs.start();
    let t = s.token(("legacy", "s3cret"), &[("grant_type", "client_credentials")]).field("access_token");
    let header = jsonwebtoken::decode_header(&t).expect("header");
    assert_eq!(header.alg, jsonwebtoken::Algorithm::RS256);
    let jwks: jsonwebtoken::jwk::JwkSet = serde_json::from_str(&get(&s.url("/oauth2/jwks")).body).expect("jwks");
    let key = jsonwebtoken::DecodingKey::from_jwk(jwks.find(&header.kid.expect("kid")).expect("jwk")).expect("key");
    let mut v = jsonwebtoken::Validation::new(jsonwebtoken::Algorithm::RS256);
    v.set_audience(&["legacy"]);
    jsonwebtoken::decode::<Value>(&t, &key, &v).expect("verifies");
}

#[test]
fn invalid_manifests_fail_at_start_naming_file_object_and_field() {
    let cases = [
        ("spec:\n  grantTypes: [client_credentials]\n  accessTokenLifetime: 1y\n", "spec.accessTokenLifetime"),
        ("spec:\n  grantTypes: [client_credentials]\n  tokenFormat: Paper\n", "spec.tokenFormat"),
        ("spec:\n  grantTypes: [client_credentials]\n  scopes: [{name: 'two words'}]\n", "spec.scopes[0].name"),
        ("spec:\n  grantTypes: [password]\n  users: {secretRef: {name: missing}}\n", "spec.users.secretRef.name"),
        ("spec:\n  grantTypes: [client_credentials]\n  signing: {algorithm: HS256}\n", "spec.signing.algorithm"),
    ];
    for (spec, field) in cases {
        let dirs = Scratch::new(&[(
            "broken.yaml",
            &format!("apiVersion: kubetoken.io/v1alpha1\nkind: OAuthApplication\nmetadata: {{name: shop}}\n{spec}"),
        )]);
        let err = dirs.start_error();
        assert!(err.contains("broken.yaml"), "file missing from: {err}");
        assert!(err.contains("OAuthApplication default/shop"), "object missing from: {err}");
        assert!(err.contains(field), "field {field} missing from: {err}");
    }
    // A bad password hash in the users Secret names the Secret and the entry.
    let dirs = Scratch::new(&[(
        "app.yaml",
        "apiVersion: kubetoken.io/v1alpha1\nkind: OAuthApplication\nmetadata: {name: shop}\nspec:\n  users: {secretRef: {name: users}}\n---\napiVersion: v1\nkind: Secret\nmetadata: {name: users}\nstringData:\n  users.yaml: |\n    - {username: a, passwordHash: plaintext}\n",
    )]);
    let err = dirs.start_error();
    assert!(err.contains("Secret default/users") && err.contains("[0].passwordHash"), "{err}");
}

#[test]
fn hash_password_prints_an_argon2id_hash_the_server_accepts() {
    use std::io::Write;
    let mut child = std::process::Command::new(common::BIN)
        .arg("hash-password")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("spawn");
    child.stdin.take().expect("stdin").write_all(b"correct horse\n").expect("write");
    let out = child.wait_with_output().expect("output");
    assert!(out.status.success());
    let hash = String::from_utf8(out.stdout).expect("utf8").trim().to_string();
    assert!(hash.starts_with("$argon2id$v=19$m=19456,t=2,p=1$"), "{hash}");

    let dirs = Scratch::new(&[(
        "app.yaml",
        &format!(
            "apiVersion: kubetoken.io/v1alpha1\nkind: OAuthApplication\nmetadata: {{name: shop}}\nspec:\n  users: {{secretRef: {{name: users}}}}\n  credentials: {{secretName: creds}}\n---\napiVersion: v1\nkind: Secret\nmetadata: {{name: creds}}\nstringData: {{client_id: c, client_secret: s}}\n---\napiVersion: v1\nkind: Secret\nmetadata: {{name: users}}\nstringData:\n  users.yaml: |\n    - {{username: carol, passwordHash: '{hash}'}}\n"
        ),
    )]);
    let s = dirs.start();
    let r = s.token(("c", "s"), &[("grant_type", "password"), ("username", "carol"), ("password", "correct horse")]);
    assert_eq!(r.status, 200, "{}", r.body);

    let empty = std::process::Command::new(common::BIN)
        .arg("hash-password")
        .stdin(std::process::Stdio::null())
        .output()
        .expect("run");
    assert!(!empty.status.success(), "an empty password is refused");
}

#[test]
fn version_names_the_release_and_the_git_commit_it_was_built_from() {
    let out = std::process::Command::new(common::BIN).arg("--version").output().expect("run --version");
    assert!(out.status.success());
    let text = String::from_utf8(out.stdout).expect("utf8");
    assert!(text.starts_with(&format!("kubetoken {} (commit ", env!("CARGO_PKG_VERSION"))), "{text}");
    let head = std::process::Command::new("git").args(["rev-parse", "--short=12", "HEAD"]).output();
    // A checkout without git (an exported tarball) builds as `unknown`; with git, the commit must be HEAD's.
    if let Some(head) = head.ok().filter(|h| h.status.success()) {
        let head = String::from_utf8_lossy(&head.stdout).trim().to_string();
        assert!(text.contains(&head), "built from {head}, says {text}");
    }
}

#[test]
fn a_second_process_cannot_open_the_same_state_directory() {
    let state = tempfile::tempdir().expect("tempdir");
    let _first = Server::start(&examples_dir(), state.path(), &[]);
    let second = Server::try_start(&examples_dir(), state.path(), &[]);
    let err = second.err().expect("a second process on the same state must not start");
    assert!(err.contains("in use by another kubetoken process"), "{err}");
}

/// An OAuthApplication and its credentials Secret, for manifests written by a test.
fn app_with_credentials(name: &str, client_id: &str, client_secret: &str) -> String {
    format!(
        "apiVersion: kubetoken.io/v1alpha1\nkind: OAuthApplication\nmetadata: {{name: {name}}}\nspec:\n  grantTypes: [client_credentials]\n  credentials: {{secretName: {name}-creds}}\n---\napiVersion: v1\nkind: Secret\nmetadata: {{name: {name}-creds}}\nstringData: {{client_id: {client_id}, client_secret: {client_secret}}}\n"
    )
}

#[test]
fn two_applications_with_the_same_client_id_fail_at_start_naming_both() {
    let dirs = Scratch::new(&[
        ("one.yaml", &app_with_credentials("one", "same-id", "secret-one")),
        ("two.yaml", &app_with_credentials("two", "same-id", "secret-two")),
    ]);
    let err = dirs.start_error();
    assert!(err.contains("default/one") && err.contains("default/two"), "both applications named: {err}");
    assert!(err.contains("same client_id"), "the problem named: {err}");
}

#[test]
fn a_username_listed_twice_in_the_users_secret_fails_at_start_naming_the_entry() {
    // A valid argon2id hash (alice's, from examples/standalone/shop.yaml): only the duplicate is wrong.
    let hash = "$argon2id$v=19$m=19456,t=2,p=1$Cpv8oe1VxGzgQ0wb3LuHZA$0Z7oSYhwahJ+nxkrzAxuG10y9WPz+aYezDGLO7o97zU";
    let dirs = Scratch::new(&[(
        "app.yaml",
        &format!(
            "apiVersion: kubetoken.io/v1alpha1\nkind: OAuthApplication\nmetadata: {{name: shop}}\nspec:\n  users: {{secretRef: {{name: users}}}}\n---\napiVersion: v1\nkind: Secret\nmetadata: {{name: users}}\nstringData:\n  users.yaml: |\n    - {{username: carol, passwordHash: '{hash}'}}\n    - {{username: carol, passwordHash: '{hash}', roles: [admin]}}\n"
        ),
    )]);
    let err = dirs.start_error();
    assert!(err.contains("app.yaml"), "file missing from: {err}");
    assert!(err.contains("Secret default/users"), "object missing from: {err}");
    assert!(err.contains("[1].username") && err.contains("listed twice"), "entry and problem missing: {err}");
}

#[test]
fn a_lockout_of_zero_failures_is_refused_at_start() {
    let state = tempfile::tempdir().expect("tempdir");
    let err = Server::try_start(&examples_dir(), state.path(), &["--lockout-max-failures", "0"])
        .err()
        .expect("start must fail");
    assert!(err.contains("lockout failure counts must be at least 1"), "{err}");
}

#[test]
fn the_issuer_option_sets_the_jwt_iss_and_the_metadata_urls() {
    use base64::Engine;
    let issuer = "https://login.example.com";
    let state = tempfile::tempdir().expect("tempdir");
    let s = Server::start(&examples_dir(), state.path(), &["--issuer", issuer]);
    let token = s.token(SHOP, &[("grant_type", "client_credentials")]).field("access_token");
    let payload = token.split('.').nth(1).expect("a JWT has a payload");
    let claims: Value = serde_json::from_slice(
        &base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(payload).expect("base64url payload"),
    )
    .expect("JSON claims");
    assert_eq!(claims["iss"], issuer, "{claims}");
    assert_eq!(s.introspect(SHOP, &token)["iss"], issuer);
    let m = get(&s.url("/.well-known/oauth-authorization-server")).json();
    assert_eq!(m["issuer"], issuer);
    assert_eq!(m["token_endpoint"], format!("{issuer}/oauth2/token"));
}

/// The value of one Prometheus series (`name{labels}`) in a text exposition.
fn metric(text: &str, series: &str) -> Option<f64> {
    text.lines().find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
}

#[test]
fn metrics_count_reused_password_and_refresh_tokens_and_time_revoke_and_introspect() {
    let (s, _state) = server();
    // kiosk is Opaque: the second request for the same set hands out the same token.
    let params = [("grant_type", "client_credentials"), ("scope", "catalog:read")];
    let first = s.token(KIOSK, &params);
    let second = s.token(KIOSK, &params);
    assert_eq!(first.field("access_token"), second.field("access_token"), "the kiosk token is reused");
    let login = s.password("alice", "alice-password", "device_ipad");
    assert_eq!(login.status, 200, "{}", login.body);
    let refreshed = s.token(SHOP, &[("grant_type", "refresh_token"), ("refresh_token", &login.field("refresh_token"))]);
    assert_eq!(refreshed.status, 200, "{}", refreshed.body);
    assert!(s.active(SHOP, &refreshed.field("access_token")));
    assert_eq!(s.revoke(SHOP, &refreshed.field("access_token")).status, 200);

    let text = get(&s.url("/metrics")).body;
    let value = |series: &str| metric(&text, series).unwrap_or_else(|| panic!("no {series} in:\n{text}"));
    assert_eq!(value(r#"kubetoken_tokens_total{grant_type="client_credentials",outcome="issued"}"#), 1.0);
    assert_eq!(value(r#"kubetoken_tokens_total{grant_type="client_credentials",outcome="reused"}"#), 1.0);
    assert_eq!(value(r#"kubetoken_tokens_total{grant_type="password",outcome="issued"}"#), 1.0);
    assert_eq!(value(r#"kubetoken_tokens_total{grant_type="refresh_token",outcome="issued"}"#), 1.0);
    assert_eq!(value(r#"kubetoken_request_duration_seconds_count{endpoint="token"}"#), 4.0);
    assert_eq!(value(r#"kubetoken_request_duration_seconds_count{endpoint="revoke"}"#), 1.0);
    assert_eq!(value(r#"kubetoken_request_duration_seconds_count{endpoint="introspect"}"#), 1.0);
    assert_eq!(value(r#"kubetoken_request_duration_seconds_bucket{endpoint="revoke",le="+Inf"}"#), 1.0);
    assert_eq!(value(r#"kubetoken_request_duration_seconds_bucket{endpoint="introspect",le="+Inf"}"#), 1.0);
    assert_eq!(value("kubetoken_revocations_total"), 1.0);
}

/// Concurrent requests for one key over HTTP, on the real file store: all succeed (none runs out of retries with a
/// 503), and exactly one of the tokens they received is live. (The per-key locks themselves have a sharper test,
/// `requests_for_one_key_never_conflict_in_the_file_store`, which counts conflicts.)
#[test]
fn concurrent_requests_for_one_key_on_the_file_store_all_succeed_and_leave_one_live_token() {
    // Many runtime threads, so that requests for the key really do run at the same time on this 2-core machine.
    let state = tempfile::tempdir().expect("state");
    let s = Server::start(&examples_dir(), state.path(), &["--worker-threads", "32"]);
    let base = std::sync::Arc::new(s.base.clone());
    let barrier = std::sync::Arc::new(std::sync::Barrier::new(64));
    let threads: Vec<_> = (0..64)
        .map(|_| {
            let (base, barrier) = (base.clone(), barrier.clone());
            std::thread::spawn(move || {
                barrier.wait();
                (0..8)
                    .map(|_| {
                        post_form(
                            &format!("{base}/oauth2/token"),
                            Some(SHOP),
                            &[("grant_type", "client_credentials"), ("scope", "device_kiosk1")],
                        )
                    })
                    .collect::<Vec<_>>()
            })
        })
        .collect();
    let responses: Vec<_> = threads.into_iter().flat_map(|t| t.join().expect("thread")).collect();
    for r in &responses {
        assert_eq!(r.status, 200, "{}", r.body);
    }
    let live = responses.iter().filter(|r| s.active(SHOP, &r.field("access_token"))).count();
    assert_eq!(live, 1, "exactly one token of the key is live");
}

/// Values a client sends reach the log escaped: a newline cannot start a forged log line, and terminal escape
/// sequences are not written raw.
#[test]
fn client_supplied_values_cannot_forge_log_lines() {
    let state = tempfile::tempdir().expect("state");
    let mut s = Server::start(&examples_dir(), state.path(), &["--client-lockout-max-failures", "2"]);
    let evil = "evil\n2026-01-01T00:00:00Z  WARN FORGED admin logged in\u{1b}[2J";
    for _ in 0..3 {
        let r = post_form(
            &s.url("/oauth2/token"),
            None,
            &[("grant_type", "client_credentials"), ("client_id", evil), ("client_secret", "x")],
        );
        assert_eq!(r.status, 401, "{}", r.body);
    }
    // The username and a scope with the same payload, through a real client.
    let r = s.password(evil, "wrong", "device_\nFORGED");
    assert!(r.status == 400, "{}", r.body);
    for _ in 0..6 {
        s.password(evil, "wrong", "device_ipad");
    }
    let logs = s.stop();
    assert!(logs.contains("client authentication failed"), "{logs}");
    assert!(!logs.contains('\u{1b}'), "a raw escape sequence reached the log");
    for line in logs.lines() {
        assert!(!line.trim_start().starts_with("2026-01-01T00:00:00Z"), "forged line: {line}");
        if line.contains("FORGED") {
            assert!(line.contains("\\n"), "the newline was not escaped: {line}");
        }
    }
}

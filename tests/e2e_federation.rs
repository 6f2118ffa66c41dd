//! Users from a trusted identity provider, end to end: the real binary (standalone), a test issuer serving its key set
//! over HTTPS from a CA made here, RFC 7523 JWT bearer and RFC 8693 token exchange over real HTTP.

mod common;

use std::time::{Duration, Instant};

use common::issuer::{TestIssuer, key, manifests, now, trusting};
use common::strict::{error_response, token_response};
use common::{SHOP, Server, get};
use kubetoken::core::signing::Algorithm;
use serde_json::json;

use common::issuer::{ID_TOKEN, JWT_BEARER, TOKEN_EXCHANGE};
const ACCESS_TOKEN: &str = "urn:ietf:params:oauth:token-type:access_token";

struct Setup {
    issuer: TestIssuer,
    server: Server,
    _dir: tempfile::TempDir,
}

fn start(format: &str) -> Setup {
    let issuer = TestIssuer::start();
    let dir = tempfile::tempdir().expect("tempdir");
    let manifests_dir = dir.path().join("manifests");
    std::fs::create_dir(&manifests_dir).expect("mkdir");
    manifests(&manifests_dir, format, &trusting(&issuer), "");
    let ca = dir.path().join("idp-ca.pem");
    issuer.write_ca(&ca);
    let server =
        Server::start(&manifests_dir, &dir.path().join("state"), &["--issuer-ca-file", ca.to_str().expect("path")]);
    Setup { issuer, server, _dir: dir }
}

impl Setup {
    fn bearer(&self, assertion: &str, scope: &str) -> common::Response {
        self.server.token(SHOP, &[("grant_type", JWT_BEARER), ("assertion", assertion), ("scope", scope)])
    }

    fn exchange(&self, subject_token: &str, scope: &str) -> common::Response {
        self.server.token(
            SHOP,
            &[
                ("grant_type", TOKEN_EXCHANGE),
                ("subject_token", subject_token),
                ("subject_token_type", ID_TOKEN),
                ("scope", scope),
            ],
        )
    }
}

#[test]
fn both_grants_give_per_device_tokens_for_the_identity_providers_users() {
    let s = start("JWT");
    // The app's backend holds the user's ID token and asks for the iPad's token (JWT bearer)...
    let ipad = s.bearer(&s.issuer.jwt("carol", &["customer"], json!({})), "device_ipad orders:read orders:admin");
    let ipad = token_response(&ipad, JWT_BEARER);
    assert_eq!(ipad["scope"], "device_ipad orders:read", "orders:admin needs a role carol lacks: dropped");
    assert_eq!(ipad["token_type"], "Bearer");
    assert!(ipad["refresh_token"].is_string());
    assert!(ipad.get("issued_token_type").is_none());
    // ...and for the iPhone's, by token exchange.
    let iphone = s.exchange(&s.issuer.jwt("carol", &["customer"], json!({})), "device_iphone");
    let iphone = token_response(&iphone, TOKEN_EXCHANGE);
    assert_eq!(iphone["issued_token_type"], ACCESS_TOKEN);
    assert_eq!(iphone["scope"], "device_iphone");
    let ipad_token = ipad["access_token"].as_str().expect("token");
    let iphone_token = iphone["access_token"].as_str().expect("token");
    let seen = s.server.introspect(SHOP, ipad_token);
    assert_eq!((seen["active"].as_bool(), seen["sub"].as_str()), (Some(true), Some("carol")));
    assert_eq!(seen["idp"], s.issuer.issuer.as_str());
    assert!(s.server.active(SHOP, iphone_token), "the devices' tokens live side by side");

    // A new iPad request (either grant) supersedes the iPad's token only.
    let ipad2 = s.exchange(&s.issuer.jwt("carol", &["customer"], json!({})), "orders:read device_ipad");
    assert_eq!(ipad2.status, 200, "{}", ipad2.body);
    assert!(!s.server.active(SHOP, ipad_token), "superseded");
    assert!(s.server.active(SHOP, iphone_token));

    // Refresh: rotated, the scope kept.
    let rt = ipad2.field("refresh_token");
    let refreshed = s.server.token(SHOP, &[("grant_type", "refresh_token"), ("refresh_token", &rt)]);
    token_response(&refreshed, "refresh_token");
    assert_eq!(refreshed.field("scope"), "device_ipad orders:read");

    // The local user alice and the identity provider's alice are two subjects.
    let local = s.server.password("alice", "alice-password", "device_ipad");
    assert_eq!(local.status, 200, "{}", local.body);
    let federated = s.bearer(&s.issuer.jwt("alice", &[], json!({})), "device_ipad");
    assert_eq!(federated.status, 200, "{}", federated.body);
    assert!(s.server.active(SHOP, &local.field("access_token")), "not superseded by the other alice");

    // RFC 8414 metadata lists the grants; the metrics count them by outcome.
    let meta = get(&s.server.url("/.well-known/oauth-authorization-server")).json();
    let grants: Vec<&str> =
        meta["grant_types_supported"].as_array().expect("list").iter().filter_map(|g| g.as_str()).collect();
    assert!(grants.contains(&JWT_BEARER) && grants.contains(&TOKEN_EXCHANGE), "{grants:?}");
    let replay = s.bearer(&s.issuer.jwt("carol", &[], json!({"jti": "once"})), "");
    assert_eq!(replay.status, 200);
    assert_eq!(s.bearer(&s.issuer.jwt("carol", &[], json!({"jti": "once"})), "").error(), "invalid_grant");
    let metrics = get(&s.server.url("/metrics")).body;
    for line in [
        format!("grant_type=\"{JWT_BEARER}\",outcome=\"issued\"}} 3"),
        format!("grant_type=\"{JWT_BEARER}\",outcome=\"invalid_grant\"}} 1"),
        format!("grant_type=\"{TOKEN_EXCHANGE}\",outcome=\"issued\"}} 2"),
    ] {
        assert!(metrics.contains(&line), "no {line} in:\n{metrics}");
    }
}

#[test]
fn every_validation_rule_refuses_with_invalid_grant_and_says_which() {
    let s = start("JWT");
    let i = &s.issuer;
    let t = now();
    let rs256 = key(Algorithm::RS256);
    let cases: Vec<(&str, String, &str)> = vec![
        (
            "a key the issuer never published",
            i.jwt_by(&key(Algorithm::ES256), "carol", &[], json!({})),
            "not in its issuer's key set",
        ),
        (
            "an algorithm the issuer is not trusted with",
            i.jwt_by(&rs256, "carol", &[], json!({})),
            "algorithm RS256 is not allowed",
        ),
        ("alg none", i.unsigned(json!({"alg": "none"}), "carol"), "not a signed JWT"),
        ("HMAC", i.unsigned(json!({"alg": "HS256", "kid": "x"}), "carol"), "algorithm HS256 is not allowed"),
        ("another issuer", i.jwt("carol", &[], json!({"iss": "https://other.example"})), "issuer is not trusted"),
        ("another audience", i.jwt("carol", &[], json!({"aud": ["account"]})), "audience"),
        ("no audience", i.jwt("carol", &[], json!({"aud": null})), "no aud claim"),
        ("expired beyond the leeway", i.jwt("carol", &[], json!({"exp": t - 61})), "expired"),
        ("not valid yet", i.jwt("carol", &[], json!({"nbf": t + 120})), "not valid yet"),
        ("issued too long ago", i.jwt("carol", &[], json!({"iat": t - 11 * 60 - 61})), "too long ago"),
        ("issued in the future", i.jwt("carol", &[], json!({"iat": t + 120})), "in the future"),
        ("no user claim", i.jwt("carol", &[], json!({"preferred_username": null})), "preferred_username claim"),
        (
            "a user claim that is no string",
            i.jwt("carol", &[], json!({"preferred_username": 7})),
            "preferred_username claim",
        ),
        ("roles that are no strings", i.jwt("carol", &[], json!({"realm_access": {"roles": [1]}})), "roles"),
        (
            "a tampered payload",
            {
                let good = i.jwt("carol", &[], json!({}));
                let mut parts: Vec<String> = good.split('.').map(str::to_string).collect();
                parts[1] = i.jwt("mallory", &[], json!({})).split('.').nth(1).expect("payload").to_string();
                parts.join(".")
            },
            "signature does not verify",
        ),
        ("not a JWT", "abc".to_string(), "not a signed JWT"),
        (
            "a kid with quotes and a newline",
            i.unsigned(json!({"alg": "ES256", "kid": "k\"\n\\"}), "carol"),
            "not in its issuer's key set",
        ),
    ];
    for (what, assertion, says) in &cases {
        for r in [s.bearer(assertion, "device_x"), s.exchange(assertion, "device_x")] {
            assert_eq!((r.status, error_response(&r)), (400, "invalid_grant".to_string()), "{what}: {}", r.body);
            let description = r.field("error_description");
            assert!(description.contains(says), "{what}: {description}");
            assert!(!description.contains(assertion.as_str()) || assertion.len() < 4, "{what}: the token is echoed");
        }
    }
    // Within the leeway, a just-expired assertion still works.
    let r = s.bearer(&i.jwt("carol", &[], json!({"exp": t - 30})), "");
    assert_eq!(r.status, 200, "{}", r.body);
}

#[test]
fn malformed_requests_of_both_grants_are_invalid_request_and_use_nothing_up() {
    let s = start("JWT");
    let id_token = s.issuer.jwt("carol", &[], json!({}));
    // (form parameters, error, what the description names)
    type Case<'a> = (Vec<(&'a str, &'a str)>, &'a str, &'a str);
    let cases: Vec<Case> = vec![
        (vec![("grant_type", JWT_BEARER)], "invalid_request", "assertion"),
        (vec![("grant_type", TOKEN_EXCHANGE), ("subject_token_type", ID_TOKEN)], "invalid_request", "subject_token"),
        (vec![("grant_type", TOKEN_EXCHANGE), ("subject_token", &id_token)], "invalid_request", "subject_token_type"),
        (
            vec![("grant_type", TOKEN_EXCHANGE), ("subject_token", &id_token), ("subject_token_type", "urn:x:saml")],
            "invalid_request",
            "subject_token_type",
        ),
        (
            vec![
                ("grant_type", TOKEN_EXCHANGE),
                ("subject_token", &id_token),
                ("subject_token_type", ID_TOKEN),
                ("actor_token", &id_token),
            ],
            "invalid_request",
            "actor_token",
        ),
        (
            vec![
                ("grant_type", TOKEN_EXCHANGE),
                ("subject_token", &id_token),
                ("subject_token_type", ID_TOKEN),
                ("audience", "billing-api"),
            ],
            "invalid_target",
            "billing-api",
        ),
        (
            vec![
                ("grant_type", TOKEN_EXCHANGE),
                ("subject_token", &id_token),
                ("subject_token_type", ID_TOKEN),
                ("requested_token_type", "urn:ietf:params:oauth:token-type:refresh_token"),
            ],
            "invalid_request",
            "requested_token_type",
        ),
        (vec![("grant_type", JWT_BEARER), ("assertion", &id_token), ("scope", "bad\"scope")], "invalid_scope", "scope"),
    ];
    for (params, code, says) in &cases {
        let r = s.server.token(SHOP, params);
        assert_eq!((r.status, error_response(&r)), (400, code.to_string()), "{params:?}: {}", r.body);
        assert!(r.field("error_description").contains(says), "{params:?}: {}", r.body);
    }
    // A repeated parameter is refused before anything is read.
    let body = format!("grant_type={JWT_BEARER}&assertion={id_token}&assertion={id_token}");
    let r = common::raw(
        "POST",
        &s.server.url("/oauth2/token"),
        &[("Content-Type", "application/x-www-form-urlencoded"), ("Authorization", &common::basic(SHOP))],
        &body,
    );
    assert_eq!((r.status, r.error()), (400, "invalid_request".to_string()), "{}", r.body);
    // None of them used the ID token up.
    assert_eq!(s.exchange(&id_token, "device_x").status, 200);
}

#[test]
fn opaque_tokens_are_handed_out_again_for_the_same_set() {
    let s = start("Opaque");
    let first = s.bearer(&s.issuer.jwt("carol", &[], json!({})), "device_ipad");
    let second = s.exchange(&s.issuer.jwt("carol", &[], json!({})), "device_ipad");
    assert_eq!((first.status, second.status), (200, 200), "{} {}", first.body, second.body);
    assert_eq!(first.field("access_token"), second.field("access_token"));
    let iphone = s.bearer(&s.issuer.jwt("carol", &[], json!({})), "device_iphone");
    assert_ne!(iphone.field("access_token"), first.field("access_token"));
}

/// The issuer rotates its key: an assertion signed by the new key names a `kid` the held set lacks. The set is
/// fetched again at most once per 30 s per issuer; after that, the new key is picked up.
#[test]
fn a_rotated_key_set_is_picked_up_on_the_next_unknown_kid_at_most_once_per_30_s() {
    let s = start("JWT");
    let first_fetch = Instant::now();
    assert_eq!(s.bearer(&s.issuer.jwt("carol", &[], json!({})), "").status, 200);
    assert_eq!(s.issuer.requests.load(std::sync::atomic::Ordering::SeqCst), 1, "fetched once, when first needed");
    assert_eq!(s.bearer(&s.issuer.jwt("carol", &[], json!({})), "").status, 200);
    assert_eq!(s.issuer.requests.load(std::sync::atomic::Ordering::SeqCst), 1, "then cached");
    s.issuer.rotate();
    // Within 30 s of the last fetch, an unknown kid does not make kubetoken hammer the issuer.
    let early = s.bearer(&s.issuer.jwt("carol", &[], json!({})), "");
    assert_eq!(early.error(), "invalid_grant", "{}", early.body);
    assert_eq!(s.issuer.requests.load(std::sync::atomic::Ordering::SeqCst), 1);
    // 30 s after the first fetch began (which this test sees only from outside: a request after `first_fetch`), the
    // next unknown kid fetches again. A second early by the server's clock is refused like the early one above.
    std::thread::sleep(Duration::from_secs(30).saturating_sub(first_fetch.elapsed()));
    let late = (0..10)
        .map(|_| {
            let r = s.bearer(&s.issuer.jwt("carol", &[], json!({})), "");
            if r.status != 200 {
                std::thread::sleep(Duration::from_millis(500));
            }
            r
        })
        .find(|r| r.status == 200)
        .expect("the new key is picked up within 5 s after the interval");
    assert_eq!(late.field("token_type"), "Bearer");
    assert_eq!(s.issuer.requests.load(std::sync::atomic::Ordering::SeqCst), 2, "one refetch");
}

#[test]
fn an_offline_key_set_from_a_config_map_needs_no_network() {
    let issuer = TestIssuer::start();
    let dir = tempfile::tempdir().expect("tempdir");
    let jwks = {
        let signer = issuer.signer.lock().expect("signer");
        json!({"keys": [serde_json::to_value(signer.public_jwk()).expect("jwk")]}).to_string()
    };
    let block = format!(
        "    - issuer: {}\n      jwks: {{configMapRef: {{name: idp-jwks}}}}\n      audiences: [shop]\n      usernameClaim: preferred_username",
        issuer.issuer
    );
    let config_map = format!(
        "apiVersion: v1\nkind: ConfigMap\nmetadata: {{name: idp-jwks, namespace: default}}\ndata:\n  jwks.json: '{jwks}'\n"
    );
    manifests(dir.path(), "JWT", &block, &config_map);
    let server = Server::start(dir.path(), &dir.path().join("state"), &[]);
    let r = server.token(
        SHOP,
        &[("grant_type", JWT_BEARER), ("assertion", &issuer.jwt("carol", &[], json!({}))), ("scope", "device_tv")],
    );
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(issuer.requests.load(std::sync::atomic::Ordering::SeqCst), 0, "the issuer was never asked");
}

#[test]
fn an_unreachable_key_set_is_503_and_a_plain_http_key_set_off_the_loopback_is_refused_at_start() {
    let issuer = TestIssuer::start();
    let dir = tempfile::tempdir().expect("tempdir");
    // Nothing listens on port 1: the key set cannot be fetched.
    let block =
        format!("    - issuer: {}\n      jwksUri: https://127.0.0.1:1/certs\n      audiences: [shop]", issuer.issuer);
    manifests(dir.path(), "JWT", &block, "");
    let server = Server::start(dir.path(), &dir.path().join("state"), &[]);
    let r = server.token(SHOP, &[("grant_type", JWT_BEARER), ("assertion", &issuer.jwt("carol", &[], json!({})))]);
    assert_eq!((r.status, error_response(&r)), (503, "temporarily_unavailable".to_string()), "{}", r.body);
    assert!(r.header("retry-after").is_some());
    drop(server);

    let block = format!(
        "    - issuer: {}\n      jwksUri: http://idp.example.com/certs\n      audiences: [shop]",
        issuer.issuer
    );
    manifests(dir.path(), "JWT", &block, "");
    let refused = Server::try_start(dir.path(), &dir.path().join("state2"), &[]).err().expect("refused at start");
    assert!(refused.contains("spec.trustedIssuers[0].jwksUri") && refused.contains("HTTPS"), "{refused}");
}

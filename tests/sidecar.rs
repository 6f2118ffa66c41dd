//! The real `kubetoken sidecar` binaries (two or more replicas) and the real controller against a Kubernetes API
//! (the in-repo test server; fault injection needs it): per-device tokens in a cluster, state shared by replicas
//! through ConfigMaps, faults, restarts, and configuration changes without restart.

mod common;

use std::time::{Duration, Instant};

use common::cluster::{Cluster, ControllerProcess, SidecarProcess, eventually};
use common::{Response, post_form};
use k8s_openapi::api::core::v1::Secret;
use kube::api::{ListParams, Patch, PatchParams, PostParams};
use serde_json::{Value, json};

/// bcrypt at cost 4: fast, and a format real users Secrets use.
fn users_yaml(users: &[(&str, &str, &[&str])]) -> String {
    users
        .iter()
        .map(|(name, password, roles)| {
            let hash = bcrypt::hash(password, 4).expect("hash");
            format!("- {{username: {name}, passwordHash: '{hash}', roles: [{}]}}\n", roles.join(", "))
        })
        .collect()
}

fn shop_spec(format: &str) -> Value {
    json!({
        "grantTypes": ["password", "client_credentials", "refresh_token"],
        "tokenFormat": format,
        "audience": ["shop-api"],
        "clientRoles": ["service"],
        "scopes": [
            {"name": "orders:read", "roles": ["customer", "admin", "service"]},
            {"name": "orders:admin", "roles": ["admin"]},
            {"name": "catalog:read"},
        ],
        "users": {"secretRef": {"name": "shop-users"}},
        "credentials": {"rotationGracePeriod": "6s"},
    })
}

/// A cluster with the controller and a Ready application `name`; returns its client credentials.
async fn application(c: &Cluster, name: &str, format: &str) -> (String, String) {
    if c.secrets().get_opt("shop-users").await.expect("get").is_none() {
        let users: Secret = serde_json::from_value(json!({
            "metadata": {"name": "shop-users"},
            "stringData": {"users.yaml": users_yaml(&[("alice", "alice-pw", &["customer"]), ("bob", "bob-pw", &["admin"])])},
        }))
        .expect("secret");
        c.secrets().create(&PostParams::default(), &users).await.expect("users");
    }
    c.create_app(name, shop_spec(format)).await;
    c.ready(name).await;
    credentials(c, name).await
}

/// A cluster with the controller and a Ready application `shop`: (cluster, controller, client ID, client secret).
async fn cluster(test: &str, format: &str) -> (Cluster, ControllerProcess, String, String) {
    // The sidecar tests inject faults and audit requests: always the in-repo test server.
    let c = Cluster::test_server(test).await;
    let controller = c.controller("c1");
    let (id, secret) = application(&c, "shop", format).await;
    (c, controller, id, secret)
}

/// A cluster with the controller and a Ready client_credentials application `shop` whose ES256 keys rotate every
/// `rotation` (and whose access tokens live `lifetime`, if given).
async fn rotating_keys(
    test: &str,
    rotation: &str,
    lifetime: Option<&str>,
) -> (Cluster, ControllerProcess, String, String) {
    let c = Cluster::test_server(test).await;
    let controller = c.controller("c1");
    let mut spec = shop_spec("JWT");
    spec["grantTypes"] = json!(["client_credentials"]);
    spec.as_object_mut().expect("spec").remove("users");
    if let Some(lifetime) = lifetime {
        spec["accessTokenLifetime"] = json!(lifetime);
    }
    spec["signing"] = json!({"algorithm": "ES256", "rotationPeriod": rotation});
    c.create_app("shop", spec).await;
    c.ready("shop").await;
    let (id, secret) = credentials(&c, "shop").await;
    (c, controller, id, secret)
}

/// A ready sidecar serving `shop`.
async fn replica(c: &Cluster, extra: &[&str]) -> SidecarProcess {
    let s = SidecarProcess::start(&c.kubeconfig, &c.namespace, &["shop"], extra);
    s.wait_ready().await;
    s
}

async fn credentials(c: &Cluster, name: &str) -> (String, String) {
    let data = c.secrets().get(&format!("{name}-credentials")).await.expect("credentials").data.expect("data");
    let get = |k: &str| String::from_utf8(data[k].0.clone()).expect("utf8");
    (get("client_id"), get("client_secret"))
}

struct Client<'a> {
    id: &'a str,
    secret: &'a str,
}

impl Client<'_> {
    fn creds(&self) -> (&str, &str) {
        (self.id, self.secret)
    }
    fn token(&self, s: &SidecarProcess, params: &[(&str, &str)]) -> Response {
        post_form(&s.url("/oauth2/token"), Some(self.creds()), params)
    }
    fn password(&self, s: &SidecarProcess, user: &str, password: &str, scope: &str) -> Response {
        self.token(s, &[("grant_type", "password"), ("username", user), ("password", password), ("scope", scope)])
    }
    fn ok_password(&self, s: &SidecarProcess, user: &str, password: &str, scope: &str) -> Value {
        let r = self.password(s, user, password, scope);
        assert_eq!(r.status, 200, "token request failed: {}", r.body);
        r.json()
    }
    fn active(&self, s: &SidecarProcess, token: &str) -> bool {
        let r = post_form(&s.url("/oauth2/introspect"), Some(self.creds()), &[("token", token)]);
        assert_eq!(r.status, 200, "introspection failed: {}", r.body);
        r.json()["active"] == Value::Bool(true)
    }
}

fn field(v: &Value, name: &str) -> String {
    v[name].as_str().unwrap_or_else(|| panic!("no {name} in {v}")).to_string()
}

/// Waits until `token` has the given activity at `s`; returns how long that took.
async fn until_active(client: &Client<'_>, s: &SidecarProcess, token: &str, active: bool) -> Duration {
    let start = Instant::now();
    loop {
        if client.active(s, token) == active {
            return start.elapsed();
        }
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "token did not become active={active} at {} in 10 s",
            s.base
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn per_device_tokens_refresh_and_revocation_work_across_two_sidecars() {
    let (c, _controller, id, secret) = cluster("sc-devices", "JWT").await;
    let client = Client { id: &id, secret: &secret };
    let (a, b) = (replica(&c, &[]).await, replica(&c, &[]).await);

    // Two devices of one user: two tokens, side by side.
    let ipad = client.ok_password(&a, "alice", "alice-pw", "device_ipad");
    let iphone = client.ok_password(&a, "alice", "alice-pw", "device_iphone");
    assert_eq!(field(&ipad, "scope"), "device_ipad");
    assert!(client.active(&a, &field(&ipad, "access_token")) && client.active(&a, &field(&iphone, "access_token")));
    let seen_at_b = until_active(&client, &b, &field(&ipad, "access_token"), true).await;

    // A new iPad login through the other replica supersedes the first iPad token everywhere, not the iPhone's.
    let ipad2 = client.ok_password(&b, "alice", "alice-pw", "device_ipad");
    let superseded_at_a = until_active(&client, &a, &field(&ipad, "access_token"), false).await;
    assert!(client.active(&a, &field(&iphone, "access_token")));
    assert!(client.active(&a, &field(&ipad2, "access_token")));
    eprintln!(
        "visibility: issued at A, active at B after {seen_at_b:?}; superseded at B, inactive at A after {superseded_at_a:?}"
    );

    // Device scopes combine with role-checked scopes; what alice may not have is dropped; nothing granted: default.
    let mixed = client.ok_password(&a, "alice", "alice-pw", "device_ipad orders:read orders:admin");
    assert_eq!(field(&mixed, "scope"), "device_ipad orders:read");
    let plain = client.ok_password(&b, "alice", "alice-pw", "orders:admin");
    assert_eq!(field(&plain, "scope"), "default");

    // Refresh through A rotates; reuse of the rotated-out refresh token through B revokes the grant.
    let refreshed =
        client.token(&a, &[("grant_type", "refresh_token"), ("refresh_token", &field(&ipad2, "refresh_token"))]);
    assert_eq!(refreshed.status, 200, "{}", refreshed.body);
    let refreshed = refreshed.json();
    until_active(&client, &b, &field(&refreshed, "access_token"), true).await;
    let reuse =
        client.token(&b, &[("grant_type", "refresh_token"), ("refresh_token", &field(&ipad2, "refresh_token"))]);
    assert_eq!((reuse.status, reuse.error()), (400, "invalid_grant".to_string()));
    until_active(&client, &a, &field(&refreshed, "access_token"), false).await;
    assert!(client.active(&a, &field(&iphone, "access_token")), "other devices keep their tokens");

    // Revocation through B; A reports the token inactive.
    let r = post_form(&b.url("/oauth2/revoke"), Some(client.creds()), &[("token", &field(&iphone, "refresh_token"))]);
    assert_eq!(r.status, 200);
    until_active(&client, &a, &field(&iphone, "access_token"), false).await;

    // The published JWKS ConfigMap verifies a sidecar's token with an independent JWT library.
    let token = field(&mixed, "access_token");
    let kid = jsonwebtoken::decode_header(&token).expect("header").kid.expect("kid");
    let jwks: jsonwebtoken::jwk::JwkSet = serde_json::from_value(c.jwks("shop").await).expect("jwks");
    let jwk = jwks.find(&kid).expect("the signing key is published in the ConfigMap");
    let mut validation = jsonwebtoken::Validation::new(jsonwebtoken::Algorithm::ES256);
    validation.set_audience(&["shop-api"]);
    let claims =
        jsonwebtoken::decode::<Value>(&token, &jsonwebtoken::DecodingKey::from_jwk(jwk).expect("key"), &validation)
            .expect("verifies")
            .claims;
    assert_eq!((claims["sub"].as_str(), claims["client_id"].as_str()), (Some("alice"), Some(id.as_str())));
    let served: Value = serde_json::from_str(&common::get(&a.url("/oauth2/jwks")).body).expect("json");
    assert!(served["keys"].as_array().expect("keys").iter().any(|k| k["kid"] == kid.as_str()));

    // Malformed and unauthenticated requests get RFC 6749 errors.
    let r = client.token(&a, &[("username", "alice")]);
    assert_eq!((r.status, r.error()), (400, "invalid_request".to_string()));
    let r = post_form(&a.url("/oauth2/token"), Some((&id, "wrong")), &[("grant_type", "client_credentials")]);
    assert_eq!((r.status, r.error()), (401, "invalid_client".to_string()));
    let r = client.password(&a, "alice", "wrong", "device_ipad");
    assert_eq!((r.status, r.error()), (400, "invalid_grant".to_string()));

    // Every API request both binaries made is allowed by deploy/ (checked again when the cluster is dropped).
    let (controller_requests, sidecar_requests) = common::rbac::assert_least_privilege(&c.server().requests());
    assert!(controller_requests > 0 && sidecar_requests > 0, "the audit saw both binaries' requests");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn opaque_tokens_are_reused_across_replicas() {
    // Named `shop` like every application here: deploy/sidecar-rbac.yaml is written for it (the RBAC audit).
    let (c, _controller, id, secret) = cluster("sc-opaque", "Opaque").await;
    let client = Client { id: &id, secret: &secret };
    let (a, b) = (replica(&c, &[]).await, replica(&c, &[]).await);
    let cc = [("grant_type", "client_credentials"), ("scope", "catalog:read")];
    let first = client.token(&a, &cc).json();
    until_active(&client, &b, &field(&first, "access_token"), true).await;
    let second = client.token(&b, &cc).json();
    assert_eq!(field(&first, "access_token"), field(&second, "access_token"), "the same still-valid token");
    let other = client.token(&b, &[("grant_type", "client_credentials"), ("scope", "device_tv")]).json();
    assert_ne!(field(&first, "access_token"), field(&other, "access_token"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_requests_for_one_key_over_two_replicas_end_with_one_live_token_a_client_received() {
    let (c, _controller, id, secret) = cluster("sc-race", "JWT").await;
    let (a, b) = (replica(&c, &[]).await, replica(&c, &[]).await);
    let urls = [a.url("/oauth2/token"), b.url("/oauth2/token")];
    // Whether the replicas' own writes collide depends on scheduling; three journal writes also meet an injected
    // 409, so the conflict path is always taken. (Every write of this test goes to the first journal segment.)
    let journal = format!("/api/v1/namespaces/{}/configmaps/shop-tokens-journal-00", c.namespace);
    c.server().conflict_next_writes(&journal, 3);
    let received: Vec<String> = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..20)
            .map(|t| {
                let (url, id, secret) = (urls[t % 2].clone(), id.clone(), secret.clone());
                scope.spawn(move || {
                    (0..10)
                        .filter_map(|_| {
                            let r = post_form(
                                &url,
                                Some((&id, &secret)),
                                &[("grant_type", "client_credentials"), ("scope", "device_kiosk")],
                            );
                            match r.status {
                                200 => Some(r.field("access_token")),
                                503 => {
                                    assert_eq!(r.header("retry-after"), Some("1"), "{}", r.body);
                                    None
                                }
                                s => panic!("unexpected {s}: {}", r.body),
                            }
                        })
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        handles.into_iter().flat_map(|h| h.join().expect("thread")).collect()
    });
    assert!(received.len() >= 100, "most of the 200 requests succeed: {}", received.len());
    let client = Client { id: &id, secret: &secret };
    // Once both replicas have caught up, exactly one received token is active, the same at both.
    tokio::time::sleep(Duration::from_secs(1)).await;
    for s in [&a, &b] {
        let active: Vec<&String> = received.iter().filter(|t| client.active(s, t)).collect();
        assert_eq!(active.len(), 1, "exactly one live token at {}", s.base);
    }
    let at_a: Vec<&String> = received.iter().filter(|t| client.active(&a, t)).collect();
    let at_b: Vec<&String> = received.iter().filter(|t| client.active(&b, t)).collect();
    assert_eq!(at_a, at_b);
    assert_eq!(c.server().pending_conflicts(), 0, "the replicas' writes met the injected 409s");
    assert!(
        a.metric("kubetoken_kube_conflicts_total").unwrap_or(0.0)
            + b.metric("kubetoken_kube_conflicts_total").unwrap_or(0.0)
            >= 3.0,
        "the replicas met the 409s (injected, and any of each other's) and resolved them"
    );
}

/// From the first request after its port binds, a starting sidecar answers 503 `temporarily_unavailable` with
/// `Retry-After` until it can issue tokens, then 200: never 401 `invalid_client`, which a client takes as wrong
/// credentials. Readiness means "can answer token requests": with the users Secret deleted the sidecar keeps
/// serving what it built, and `/readyz` stays 200 while it issues tokens.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_starting_sidecar_answers_503_never_401_and_stays_ready_while_it_serves() {
    let (c, _controller, id, secret) = cluster("sc-start", "JWT").await;
    let s = SidecarProcess::start(&c.kubeconfig, &c.namespace, &["shop"], &[]);
    let client = Client { id: &id, secret: &secret };
    let started = Instant::now();
    let mut seen = Vec::new();
    loop {
        let r = client.token(&s, &[("grant_type", "client_credentials"), ("scope", "device_kiosk")]);
        if r.status == 200 {
            break;
        }
        assert_eq!(r.status, 503, "while starting: {} {}", r.status, r.body);
        assert_eq!(r.header("retry-after"), Some("1"));
        assert_eq!(r.json()["error"], "temporarily_unavailable", "{}", r.body);
        seen.push(r.status);
        assert!(started.elapsed() < Duration::from_secs(30), "never served");
        std::thread::sleep(Duration::from_millis(5));
    }
    println!("{} answers of 503 before the first token, {:?} after the port bound", seen.len(), started.elapsed());
    // The same during start-up for introspection and revocation (a second sidecar, probed as it starts).
    let t = SidecarProcess::start(&c.kubeconfig, &c.namespace, &["shop"], &[]);
    loop {
        let r = post_form(&t.url("/oauth2/introspect"), Some(client.creds()), &[("token", "x")]);
        if r.status == 200 {
            break;
        }
        assert_eq!((r.status, r.header("retry-after")), (503, Some("1")), "{}", r.body);
        let r = post_form(&t.url("/oauth2/revoke"), Some(client.creds()), &[("token", "x")]);
        assert!(r.status == 503 || r.status == 200, "{} {}", r.status, r.body);
        std::thread::sleep(Duration::from_millis(5));
    }
    t.wait_ready().await;

    // The users Secret goes: the sidecar keeps serving the users it has, and stays ready.
    c.secrets().delete("shop-users", &Default::default()).await.expect("delete users");
    tokio::time::sleep(Duration::from_secs(2)).await;
    let ready = ureq::get(&s.url("/readyz")).call().map(|r| r.status()).unwrap_or_else(|e| match e {
        ureq::Error::Status(code, _) => code,
        other => panic!("{other}"),
    });
    assert_eq!(ready, 200, "ready while serving");
    assert_eq!(client.password(&s, "alice", "alice-pw", "device_ipad").status, 200, "still issuing tokens");

    // SIGTERM (the kubelet stopping a native sidecar once a Job's containers exited): exit 0.
    let mut s = s;
    let _ = std::process::Command::new("kill").arg("-TERM").arg(s.child.id().to_string()).status();
    let status = s.child.wait().expect("wait");
    assert!(status.success(), "the sidecar exits 0 on SIGTERM: {status:?}");
}

/// Write requests (PATCH, PUT, POST) the replicas made to the application's state ConfigMaps.
fn state_writes(c: &Cluster) -> usize {
    c.server()
        .requests()
        .iter()
        .filter(|r| {
            matches!(r.method.as_str(), "PATCH" | "PUT" | "POST") && r.path.contains("/configmaps/shop-tokens-")
        })
        .count()
}

/// Conflicting requests for one key are decided until their deadline, not a fixed number of attempts: with 30 ms
/// of API latency per request, 200 concurrent requests for one key over two replicas all get a token (16 attempts
/// left some with 503 before), and exactly one of them is live. Then 32 concurrent clients, each with a key of its
/// own, get at least 10 tokens per API write between them (group commit under latency).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn under_api_latency_every_request_for_one_key_succeeds_and_batches_stay_large() {
    let (c, _controller, id, secret) = cluster("sc-fair", "JWT").await;
    let (a, b) = (replica(&c, &[]).await, replica(&c, &[]).await);
    let urls = [a.url("/oauth2/token"), b.url("/oauth2/token")];
    c.server().set_latency(Duration::from_millis(30));
    let run = |threads: usize, per_thread: usize, scope_of: &(dyn Fn(usize) -> String + Sync)| -> Vec<String> {
        std::thread::scope(|scope| {
            let handles: Vec<_> = (0..threads)
                .map(|t| {
                    let (url, id, secret, scope_param) = (urls[t % 2].clone(), id.clone(), secret.clone(), scope_of(t));
                    scope.spawn(move || {
                        (0..per_thread)
                            .map(|_| {
                                let r = post_form(
                                    &url,
                                    Some((&id, &secret)),
                                    &[("grant_type", "client_credentials"), ("scope", &scope_param)],
                                );
                                assert_eq!(r.status, 200, "every request gets its token: {}", r.body);
                                r.field("access_token")
                            })
                            .collect::<Vec<_>>()
                    })
                })
                .collect();
            handles.into_iter().flat_map(|h| h.join().expect("thread")).collect()
        })
    };
    let received = run(40, 5, &|_| "device_kiosk".to_string());
    assert_eq!(received.len(), 200);
    c.server().set_latency(Duration::ZERO);
    let client = Client { id: &id, secret: &secret };
    tokio::time::sleep(Duration::from_secs(1)).await;
    for s in [&a, &b] {
        let active: Vec<&String> = received.iter().filter(|t| client.active(s, t)).collect();
        assert_eq!(active.len(), 1, "exactly one live token at {}", s.base);
    }

    c.server().set_latency(Duration::from_millis(30));
    let writes_before = state_writes(&c);
    let tokens = run(32, 20, &|t| format!("device_c{t}"));
    let writes = state_writes(&c) - writes_before;
    c.server().set_latency(Duration::ZERO);
    let per_write = tokens.len() as f64 / writes.max(1) as f64;
    println!("{} tokens, {writes} state writes: {per_write:.1} tokens per API write", tokens.len());
    assert!(per_write >= 10.0, "{} tokens in {writes} state writes ({per_write:.1} per write)", tokens.len());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn secret_rotation_users_and_spec_changes_take_effect_without_restart() {
    let (c, _controller, id, old_secret) = cluster("sc-changes", "JWT").await;
    let s = replica(&c, &[]).await;
    let cc = [("grant_type", "client_credentials"), ("scope", "orders:read")];
    let with = |secret: &str| post_form(&s.url("/oauth2/token"), Some((&id, secret)), &cc);
    assert_eq!(with(&old_secret).json()["expires_in"], 3600);

    // Rotation: both secrets work during the grace period (6 s here), only the new one after it.
    let patch = json!({"metadata": {"annotations": {"kubetoken.io/rotate-client-secret": "r1"}}});
    c.apps().patch("shop", &PatchParams::default(), &Patch::Merge(&patch)).await.expect("annotate");
    let new_secret = eventually("the secret is rotated", Duration::from_secs(20), || async {
        let (_, secret) = credentials(&c, "shop").await;
        (secret != old_secret).then_some(secret)
    })
    .await;
    let rotated_at = Instant::now();
    eventually("the sidecar accepts the new secret", Duration::from_secs(10), || async {
        (with(&new_secret).status == 200).then_some(())
    })
    .await;
    // Seen within moments of the rotation, far inside the 6 s grace on any machine that runs this suite at all.
    assert_eq!(with(&old_secret).status, 200, "the previous secret works during the grace period");
    eventually("the previous secret stops working after the grace period", Duration::from_secs(15), || async {
        (with(&old_secret).status == 401).then_some(())
    })
    .await;
    // A lower bound: the rotation was seen at most a moment after it happened, and a busy machine only adds time.
    assert!(rotated_at.elapsed() >= Duration::from_secs(4), "not before the grace period ended");
    assert_eq!(with(&new_secret).status, 200);

    // A new user in the users Secret can log in; a changed spec changes the lifetime.
    let users = json!({"stringData": {"users.yaml": users_yaml(&[("carol", "carol-pw", &["admin"])])}});
    c.secrets().patch("shop-users", &PatchParams::default(), &Patch::Merge(&users)).await.expect("users");
    let client = Client { id: &id, secret: &new_secret };
    eventually("carol can log in", Duration::from_secs(10), || async {
        (client.password(&s, "carol", "carol-pw", "orders:admin").status == 200).then_some(())
    })
    .await;
    assert_eq!(client.password(&s, "alice", "alice-pw", "").error(), "invalid_grant", "alice is gone");
    let spec = json!({"spec": {"accessTokenLifetime": "5m"}});
    c.apps().patch("shop", &PatchParams::default(), &Patch::Merge(&spec)).await.expect("spec");
    eventually("the new lifetime applies", Duration::from_secs(10), || async {
        (post_form(&s.url("/oauth2/token"), Some((&id, &new_secret)), &cc).json()["expires_in"] == 300).then_some(())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn api_faults_answer_503_and_lose_nothing() {
    let (c, _controller, id, secret) = cluster("sc-faults", "JWT").await;
    let server = c.server();
    let client = Client { id: &id, secret: &secret };
    let (a, b) = (replica(&c, &[]).await, replica(&c, &[]).await);
    let kept = client.ok_password(&a, "alice", "alice-pw", "device_ipad");

    // The API server fails every request for a while: token requests get 503 + Retry-After, never a token.
    server.fail_next(10_000, 500);
    let r = client.password(&a, "alice", "alice-pw", "device_ipad");
    assert_eq!((r.status, r.error()), (503, "temporarily_unavailable".to_string()), "{}", r.body);
    assert_eq!(r.header("retry-after"), Some("1"));
    // Introspection keeps answering from the cache.
    assert!(client.active(&a, &field(&kept, "access_token")));
    server.fail_next(0, 500);
    let after = client.ok_password(&a, "alice", "alice-pw", "device_ipad");
    assert!(!client.active(&a, &field(&kept, "access_token")));
    assert!(client.active(&a, &field(&after, "access_token")));

    // Slow API: still served, within the commit timeout.
    server.set_latency(Duration::from_millis(300));
    let slow = client.ok_password(&b, "alice", "alice-pw", "device_slow");
    server.set_latency(Duration::ZERO);

    // Dropped watches and a compacted history: the replicas relist and still see each other's changes.
    server.close_watches();
    server.compact_history();
    let revoked =
        post_form(&b.url("/oauth2/revoke"), Some(client.creds()), &[("token", &field(&after, "access_token"))]);
    assert_eq!(revoked.status, 200);
    until_active(&client, &a, &field(&after, "access_token"), false).await;
    until_active(&client, &a, &field(&slow, "access_token"), true).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill9_and_restart_keep_every_token_and_revive_none_and_state_holds_no_token_strings() {
    let (c, _controller, id, secret) = cluster("sc-restart", "JWT").await;
    let client = Client { id: &id, secret: &secret };
    // Tiny journal segments (and a write budget to match), so that the state goes round the ring of segments and
    // through snapshots: compaction, segment reuse and loading from a snapshot are all on the path.
    let small = ["--journal-segment-kib", "1", "--api-writes-per-second", "100"];
    let mut a = replica(&c, &small).await;
    for i in 0..300 {
        let r = post_form(
            &a.url("/oauth2/token"),
            Some((&id, &secret)),
            &[("grant_type", "client_credentials"), ("scope", &format!("device_filler{i}"))],
        );
        assert_eq!(r.status, 200, "{}", r.body);
    }
    let mut live = Vec::new();
    let mut dead = Vec::new();
    let mut refresh = Vec::new();
    for i in 0..40 {
        let device = format!("device_d{}", i % 20);
        let t = client.ok_password(
            &a,
            if i % 2 == 0 { "alice" } else { "bob" },
            if i % 2 == 0 { "alice-pw" } else { "bob-pw" },
            &device,
        );
        refresh.push(field(&t, "refresh_token"));
        // Request i + 20 is for the same user and device as request i, so it supersedes it.
        if i < 20 {
            dead.push(field(&t, "access_token"));
        } else {
            live.push(field(&t, "access_token"));
        }
    }
    let a_compactions_before = a.metric("kubetoken_kube_compactions_total").unwrap_or(0.0);
    a.kill9();
    let b = replica(&c, &small).await;
    let a_compactions = |r: &SidecarProcess| r.metric("kubetoken_kube_compactions_total").unwrap_or(0.0);
    for t in &live {
        assert!(client.active(&b, t), "a token whose successor was not issued stays active");
    }
    for t in &dead {
        assert!(!client.active(&b, t), "a superseded token stays inactive");
    }
    assert!(a_compactions(&b) + a_compactions_before > 0.0, "the ring was compacted");
    let state_objects = c
        .config_maps()
        .list(&ListParams::default().labels("kubetoken.io/token-state-of=shop"))
        .await
        .expect("list")
        .items;
    assert_eq!(state_objects.len(), 49, "16 journal segments, the snapshot pointer and 2 sets of 16 chunks");
    let pointer =
        state_objects.iter().find(|cm| cm.metadata.name.as_deref() == Some("shop-tokens-snapshot")).expect("pointer");
    let upto: u64 = pointer.data.as_ref().expect("data")["upto"].parse().expect("upto");
    assert!(upto >= 100, "a snapshot holds the state up to record {upto}");
    let first_segment =
        state_objects.iter().find(|cm| cm.metadata.name.as_deref() == Some("shop-tokens-journal-00")).expect("segment");
    let epoch: u64 = first_segment.data.as_ref().expect("data")["epoch"].parse().expect("epoch");
    assert!(epoch > 1, "the ring went round: the first segment was reused from record {epoch} on");
    // Every byte of the state, decoded from base64 too, holds no token string and no signature.
    let mut everything = serde_json::to_string(&state_objects).expect("json").into_bytes();
    for cm in &state_objects {
        for bytes in cm.binary_data.iter().flat_map(|d| d.values()) {
            everything.extend_from_slice(&bytes.0);
        }
    }
    let everything = String::from_utf8_lossy(&everything).into_owned();
    for t in live.iter().chain(&dead).chain(&refresh) {
        assert!(!everything.contains(t.as_str()), "no token string in the state objects");
        if let Some(sig) = t.rsplit('.').next() {
            assert!(!everything.contains(sig), "no JWT signature in the state objects");
        }
    }
    drop(b);
    a = replica(&c, &small).await;
    assert!(client.active(&a, &live[0]));
}

#[test]
fn the_audit_catches_a_request_outside_the_rules() {
    let record = |method: &str, path: &str, query: &str| kube_test_server::RequestRecord {
        status: 200,
        method: method.into(),
        path: path.into(),
        query: query.into(),
        user_agent: "kubetoken-sidecar/0".into(),
    };
    let rules = common::rbac::rules(&std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/sidecar-rbac.yaml"));
    let allowed = [
        record("GET", "/api/v1/namespaces/x/configmaps/shop-tokens-journal-00", ""),
        record("PATCH", "/api/v1/namespaces/x/configmaps/shop-tokens-snapshot-03", ""),
        record("GET", "/api/v1/namespaces/x/secrets", "fieldSelector=metadata.name%3Dshop-users&watch=true"),
    ];
    assert!(common::rbac::violations(&allowed, "kubetoken-sidecar/", &rules).is_empty());
    let denied = [
        record("GET", "/api/v1/namespaces/x/secrets", ""),
        record("GET", "/api/v1/namespaces/x/secrets/other", ""),
        record("POST", "/api/v1/namespaces/x/configmaps", ""),
        record("PATCH", "/api/v1/namespaces/x/secrets/shop-credentials", ""),
    ];
    assert_eq!(common::rbac::violations(&denied, "kubetoken-sidecar/", &rules).len(), 4);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_token_is_signed_with_a_key_the_jwks_configmap_already_listed() {
    // Keys rotate every 6 s and are published 2 s before they sign (the test harness's pre-publication).
    let (c, _controller, id, secret) = rotating_keys("sc-prepublish", "6s", None).await;
    let client = Client { id: &id, secret: &secret };
    let s = replica(&c, &[]).await;
    let mut kids_seen = std::collections::BTreeSet::new();
    let start = Instant::now();
    while start.elapsed() < Duration::from_secs(14) {
        let published = common::cluster::kids(&c.jwks("shop").await);
        let r = client.token(&s, &[("grant_type", "client_credentials"), ("scope", "device_x")]);
        assert_eq!(r.status, 200, "{}", r.body);
        let kid = jsonwebtoken::decode_header(r.field("access_token")).expect("header").kid.expect("kid");
        assert!(
            published.contains(&kid),
            "token signed with {kid}, which the JWKS ConfigMap did not list before: {published:?}"
        );
        kids_seen.insert(kid);
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(kids_seen.len() >= 2, "the sidecar followed at least one rotation: {kids_seen:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn password_guesses_spread_over_replicas_share_one_lockout() {
    let (c, _controller, id, secret) = cluster("sc-lockout", "JWT").await;
    let client = Client { id: &id, secret: &secret };
    let limit = ["--lockout-max-failures", "3", "--lockout-duration", "5m"];
    let (a, b) = (replica(&c, &limit).await, replica(&c, &limit).await);
    // Three wrong guesses, alternating replicas; each one reaches the other replica before the next.
    for (guess, (here, there)) in [(&a, &b), (&b, &a), (&a, &b)].into_iter().enumerate() {
        let seen_before = there.metric("kubetoken_kube_remote_records_total").unwrap_or(0.0);
        let r = client.password(here, "alice", &format!("wrong-{guess}"), "device_x");
        assert_eq!((r.status, r.error()), (400, "invalid_grant".to_string()));
        eventually("the other replica hears of the failure", Duration::from_secs(10), || async {
            (there.metric("kubetoken_kube_remote_records_total").unwrap_or(0.0) > seen_before).then_some(())
        })
        .await;
    }
    // Neither replica lets a fourth guess through, not even the right password.
    for s in [&a, &b] {
        let r = client.password(s, "alice", "alice-pw", "device_x");
        assert_eq!(r.status, 400, "{}", r.body);
        assert!(r.json()["error_description"].as_str().unwrap_or_default().contains("locked"), "{}", r.body);
    }
    // Other users are not affected.
    assert_eq!(client.password(&b, "bob", "bob-pw", "device_x").status, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill9_during_load_keeps_exactly_the_tokens_clients_hold_and_the_write_budget() {
    let (c, _controller, id, secret) = cluster("sc-kill-load", "JWT").await;
    let client = Client { id: &id, secret: &secret };
    let mut a = replica(&c, &["--api-writes-per-second", "5"]).await;
    let url = a.url("/oauth2/token");
    let stop = std::sync::atomic::AtomicBool::new(false);
    let started = Instant::now();
    // Each thread owns its devices, so per key the tokens a client received are in issue order.
    let per_key: Vec<(String, Vec<String>, bool)> = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..8)
            .map(|t| {
                let (url, id, secret, stop) = (url.clone(), id.clone(), secret.clone(), &stop);
                scope.spawn(move || {
                    let mut keys: Vec<(String, Vec<String>, bool)> =
                        (0..4).map(|d| (format!("device_t{t}k{d}"), Vec::new(), false)).collect();
                    let mut i = 0;
                    while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                        let k = i % keys.len();
                        let params = [("grant_type", "client_credentials"), ("scope", keys[k].0.as_str())];
                        match common::try_post_form(&url, (&id, &secret), &params) {
                            Some(r) if r.status == 200 => keys[k].1.push(r.field("access_token")),
                            Some(r) => assert_eq!(r.status, 503, "{}", r.body),
                            None => {
                                // Killed with this request in flight: its successor may or may not exist.
                                keys[k].2 = true;
                                break;
                            }
                        }
                        i += 1;
                    }
                    keys
                })
            })
            .collect();
        std::thread::sleep(Duration::from_millis(2500));
        a.kill9();
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        handles.into_iter().flat_map(|h| h.join().expect("thread")).collect()
    });
    let elapsed = started.elapsed().as_secs_f64();
    let received: usize = per_key.iter().map(|k| k.1.len()).sum();
    assert!(received > 50, "load ran: {received} tokens");
    let b = replica(&c, &[]).await;
    for (key, tokens, in_flight) in &per_key {
        let Some((last, earlier)) = tokens.split_last() else { continue };
        for t in earlier {
            assert!(!client.active(&b, t), "{key}: a superseded token came back after the restart");
        }
        if !in_flight {
            assert!(client.active(&b, last), "{key}: the last token a client received, with no successor, was lost");
        }
    }
    // The journal writes stayed within the budget (4.8/s, plus one for the first write). Segments are 64 KiB, so
    // none was reused and every batch is still there.
    let mut batches = 0;
    for i in 0..16 {
        let segment = c.config_maps().get(&format!("shop-tokens-journal-{i:02}")).await.expect("segment");
        batches += segment.binary_data.unwrap_or_default().keys().filter(|k| k.starts_with("b-")).count();
    }
    assert!(
        (batches as f64) <= elapsed * 5.0 + 2.0,
        "{batches} journal writes in {elapsed:.1} s exceed the budget of 5/s"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_application_deleted_and_created_again_is_served_from_fresh_state() {
    let (c, _controller, id, secret) = cluster("sc-recreate", "JWT").await;
    let s = replica(&c, &[]).await;
    let old = Client { id: &id, secret: &secret };
    let before = old.ok_password(&s, "alice", "alice-pw", "device_ipad");
    for _ in 0..3 {
        old.ok_password(&s, "bob", "bob-pw", "device_tv"); // a journal with a few batches
    }
    c.apps().delete("shop", &Default::default()).await.expect("delete");
    eventually("the state objects are gone", Duration::from_secs(20), || async {
        c.config_maps().get_opt("shop-tokens-snapshot").await.ok()?.is_none().then_some(())
    })
    .await;
    c.create_app("shop", shop_spec("JWT")).await;
    c.ready("shop").await;
    let (new_id, new_secret) = credentials(&c, "shop").await;
    let new = Client { id: &new_id, secret: &new_secret };
    // The sidecar follows: the new journal replaces the old one, and tokens are issued again.
    let token = eventually("the sidecar serves the new application", Duration::from_secs(20), || async {
        let r = new.password(&s, "alice", "alice-pw", "device_ipad");
        (r.status == 200).then(|| r.field("access_token"))
    })
    .await;
    assert!(new.active(&s, &token));
    assert!(!new.active(&s, &field(&before, "access_token")), "a token of the deleted application is not active");
    let conflicts = s.metric("kubetoken_kube_conflicts_total").unwrap_or(0.0);
    assert!(conflicts < 10.0, "no conflict storm against the replaced journal: {conflicts} conflicts");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_stays_published_while_a_token_it_signed_is_valid_and_leaves_after() {
    // Keys rotate every 5 s, tokens live 3 s; a retired key may go 3 s after it stopped signing (margin 0 here).
    let (c, _controller, id, secret) = rotating_keys("sc-retire", "5s", Some("3s")).await;
    let client = Client { id: &id, secret: &secret };
    let s = replica(&c, &[]).await;
    let r = client.token(&s, &[("grant_type", "client_credentials"), ("scope", "device_x")]);
    assert_eq!(r.status, 200, "{}", r.body);
    let token = r.field("access_token");
    let kid = jsonwebtoken::decode_header(&token).expect("header").kid.expect("kid");
    let claims: Value = {
        use base64::Engine;
        let payload = token.split('.').nth(1).expect("payload");
        serde_json::from_slice(&base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(payload).expect("b64"))
            .expect("json")
    };
    let exp = claims["exp"].as_u64().expect("exp");
    let now = || std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).expect("time").as_secs();
    // While the token is valid, every look at the JWKS ConfigMap finds its key.
    while now() < exp {
        let published = common::cluster::kids(&c.jwks("shop").await);
        assert!(published.contains(&kid), "key {kid} left the JWKS while a token it signed was valid");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Then it goes: retired at the next rotation, dropped once the longest token it could have signed expired.
    eventually("the retired key leaves the JWKS", Duration::from_secs(20), || async {
        (!common::cluster::kids(&c.jwks("shop").await).contains(&kid)).then_some(())
    })
    .await;
}

/// Polls `path` over TLS until it answers 200.
fn until_ok_over_tls(config: &std::sync::Arc<rustls::ClientConfig>, base: &str, path: &str) {
    let started = Instant::now();
    loop {
        let status = common::tls::TlsConnection::open(config, base).map(|mut c| c.get(path).status);
        if status == Ok(200) {
            return;
        }
        assert!(started.elapsed() < Duration::from_secs(60), "{base}{path} never answered 200: {status:?}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_sidecar_and_the_controller_health_port_serve_tls() {
    let dir = tempfile::tempdir().expect("dir");
    let ca = common::tls::TestCa::new("kubetoken test CA");
    let (cert, key) = ca.write_server_pair(dir.path(), "kubetoken");
    let client = ca.client_config();
    let c = Cluster::test_server("tls").await;
    let tls: [&std::ffi::OsStr; 4] = ["--tls-cert".as_ref(), cert.as_os_str(), "--tls-key".as_ref(), key.as_os_str()];
    let controller = ControllerProcess::start(&c.kubeconfig, &c.namespace, "c1", &tls);
    assert!(controller.health.starts_with("https://"), "{}", controller.health);
    until_ok_over_tls(&client, &controller.health, "/readyz");
    let (id, secret) = application(&c, "shop", "JWT").await;

    let tls: Vec<&str> = tls.iter().map(|s| s.to_str().expect("utf8")).collect();
    let sidecar = SidecarProcess::start(&c.kubeconfig, &c.namespace, &["shop"], &tls);
    assert!(sidecar.base.starts_with("https://127.0.0.1:"), "{}", sidecar.base);
    until_ok_over_tls(&client, &sidecar.base, "/readyz");
    let mut conn = common::tls::TlsConnection::open(&client, &sidecar.base).expect("connect");
    let r = conn.post_form(
        "/oauth2/token",
        (&id, &secret),
        &[("grant_type", "password"), ("username", "alice"), ("password", "alice-pw"), ("scope", "device_ipad")],
    );
    assert_eq!(r.status, 200, "{}", r.body);
    let info = conn.post_form("/oauth2/introspect", (&id, &secret), &[("token", &r.field("access_token"))]).json();
    assert_eq!(info["active"], true);
    assert_eq!(info["iss"], sidecar.base.as_str(), "the default issuer is https when TLS is served");
    drop(controller);
}

#[test]
fn a_sidecar_asked_for_plaintext_off_the_loopback_refuses_before_touching_the_cluster() {
    let out = std::process::Command::new(common::BIN)
        .args(["sidecar", "--application", "shop", "--namespace", "apps", "--listen", "0.0.0.0:0"])
        .env("KUBECONFIG", "/nonexistent/kubeconfig")
        .output()
        .expect("run");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(stderr.contains("not a loopback address") && stderr.contains("--behind-tls-proxy"), "{stderr}");
}

/// The Role the controller keeps for `spec.sidecar.serviceAccountName` allows everything a sidecar does: the RBAC
/// audit of a sidecar's requests (logins, a refresh, introspection, revocation) passes against it, as it does
/// against the chart's Role.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_role_the_controller_keeps_allows_everything_the_sidecar_does() {
    let (c, _controller, id, secret) = cluster("sc-role", "JWT").await;
    let patch = json!({"spec": {"sidecar": {"serviceAccountName": "shop"}}});
    c.apps().patch("shop", &PatchParams::default(), &Patch::Merge(&patch)).await.expect("patch");
    let roles: kube::Api<k8s_openapi::api::rbac::v1::Role> = kube::Api::namespaced(c.client.clone(), &c.namespace);
    let role = eventually("the sidecar Role", Duration::from_secs(20), || async {
        roles.get_opt("shop-kubetoken-sidecar").await.ok().flatten()
    })
    .await;
    let s = replica(&c, &[]).await;
    let client = Client { id: &id, secret: &secret };
    let login = client.ok_password(&s, "alice", "alice-pw", "device_ipad");
    let refreshed =
        client.token(&s, &[("grant_type", "refresh_token"), ("refresh_token", &field(&login, "refresh_token"))]);
    assert_eq!(refreshed.status, 200, "{}", refreshed.body);
    assert!(client.active(&s, &refreshed.field("access_token")));
    let revoked =
        post_form(&s.url("/oauth2/revoke"), Some(client.creds()), &[("token", &refreshed.field("access_token"))]);
    assert_eq!(revoked.status, 200);
    let file = tempfile::NamedTempFile::new().expect("temp file");
    let mut yaml = serde_json::to_value(&role).expect("role");
    yaml["kind"] = json!("Role");
    std::fs::write(file.path(), serde_yaml::to_string(&yaml).expect("yaml")).expect("write");
    let rules = common::rbac::rules(file.path());
    let requests = c.server().requests();
    let made = requests.iter().filter(|r| r.user_agent.starts_with("kubetoken-sidecar/")).count();
    assert!(made > 10, "the sidecar made its requests: {made}");
    let bad = common::rbac::violations(&requests, "kubetoken-sidecar/", &rules);
    assert!(bad.is_empty(), "the controller's Role does not allow: {bad:?}");
}

/// With `--postgres`, the replicas share the token state through the database instead of the ConfigMaps: a token
/// superseded at one is inactive at the other at once, a refresh token rotated at one is reuse at the other, and no
/// token-state ConfigMap is written.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_postgres_two_sidecars_share_the_token_state_and_write_no_configmap() {
    let (c, _controller, id, secret) = cluster("sc-postgres", "JWT").await;
    let pg = common::postgres::Postgres::start();
    let url = pg.database().await;
    let a = replica(&c, &["--postgres", &url]).await;
    let b = replica(&c, &["--postgres", &url]).await;
    let client = Client { id: &id, secret: &secret };
    let before = state_writes(&c);
    let first = client.ok_password(&a, "alice", "alice-pw", "device_ipad");
    let ipad = field(&first, "access_token");
    assert!(client.active(&b, &ipad), "issued at one replica, active at the other");
    let second = client.ok_password(&b, "alice", "alice-pw", "device_ipad");
    let ipad2 = field(&second, "access_token");
    assert!(!client.active(&a, &ipad) && client.active(&a, &ipad2), "superseded at the other replica at once");
    let iphone = field(&client.ok_password(&a, "alice", "alice-pw", "device_iphone"), "access_token");
    assert!(client.active(&b, &iphone) && client.active(&b, &ipad2), "devices side by side");
    // Refresh at one, reuse at the other: the login is revoked.
    let refresh = field(&second, "refresh_token");
    let r = client.token(&a, &[("grant_type", "refresh_token"), ("refresh_token", &refresh)]);
    assert_eq!(r.status, 200, "{}", r.body);
    let rotated = field(&r.json(), "access_token");
    let reuse = client.token(&b, &[("grant_type", "refresh_token"), ("refresh_token", &refresh)]);
    assert_eq!(reuse.json()["error"], "invalid_grant", "{}", reuse.body);
    assert!(!client.active(&a, &rotated), "the reused login's token is revoked");
    assert_eq!(state_writes(&c), before, "no token-state ConfigMap written");
}

/// Users of two trusted identity providers over two sidecars: one issuer's key set offline in a ConfigMap (watched),
/// the other's fetched over HTTPS from a private CA (`--issuer-ca-file`). Per-device tokens through both grants, a
/// token superseded at the other replica, and every API request the sidecars made within the chart's Role, which
/// names the key-set ConfigMap.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn federated_users_get_per_device_tokens_across_two_sidecars() {
    use common::issuer::{ID_TOKEN, JWT_BEARER, TOKEN_EXCHANGE, TestIssuer};
    let (offline, online) = (TestIssuer::start(), TestIssuer::start());
    let c = Cluster::test_server("sc-federated").await;
    let _controller = c.controller("c1");
    let jwks = {
        let signer = offline.signer.lock().expect("signer");
        json!({"keys": [serde_json::to_value(signer.public_jwk()).expect("jwk")]}).to_string()
    };
    let config_map = serde_json::from_value(json!({
        "metadata": {"name": "shop-issuer-keys"},
        "data": {"jwks.json": jwks},
    }))
    .expect("config map");
    c.config_maps().create(&PostParams::default(), &config_map).await.expect("key set ConfigMap");
    let mut spec = shop_spec("JWT");
    spec["grantTypes"] = json!([JWT_BEARER, TOKEN_EXCHANGE, "refresh_token"]);
    spec.as_object_mut().expect("spec").remove("users");
    let trusted = |issuer: &str| {
        json!({"issuer": issuer, "audiences": ["shop"], "usernameClaim": "preferred_username",
               "rolesClaim": "realm_access.roles", "allowedAlgorithms": ["ES256"]})
    };
    let mut first = trusted(&offline.issuer);
    first["jwks"] = json!({"configMapRef": {"name": "shop-issuer-keys"}});
    let mut second = trusted(&online.issuer);
    second["jwksUri"] = json!(online.jwks_uri);
    spec["trustedIssuers"] = json!([first, second]);
    c.create_app("shop", spec).await;
    c.ready("shop").await;
    let (id, secret) = credentials(&c, "shop").await;
    let ca = tempfile::NamedTempFile::new().expect("ca file");
    online.write_ca(ca.path());
    let args = ["--issuer-ca-file", ca.path().to_str().expect("path")];
    let (a, b) = (replica(&c, &args).await, replica(&c, &args).await);
    let client = Client { id: &id, secret: &secret };

    let assertion = offline.jwt("carol", &["customer"], json!({}));
    let ipad = client.token(
        &a,
        &[("grant_type", JWT_BEARER), ("assertion", &assertion), ("scope", "device_ipad orders:read orders:admin")],
    );
    assert_eq!(ipad.status, 200, "{}", ipad.body);
    assert_eq!(ipad.field("scope"), "device_ipad orders:read");
    // Once the iPad token is active at the other replica, so is the record of the assertion's use (the same journal
    // batch or an earlier one): a replay there is refused.
    until_active(&client, &b, &ipad.field("access_token"), true).await;
    let replay = client.token(&b, &[("grant_type", JWT_BEARER), ("assertion", &assertion), ("scope", "device_tv")]);
    assert_eq!((replay.status, replay.error()), (400, "invalid_grant".to_string()), "{}", replay.body);
    let exchange = |s: &SidecarProcess, token: &str, scope: &str| {
        client.token(
            s,
            &[
                ("grant_type", TOKEN_EXCHANGE),
                ("subject_token", token),
                ("subject_token_type", ID_TOKEN),
                ("scope", scope),
            ],
        )
    };
    let tv = exchange(&b, &online.jwt("dave", &[], json!({})), "device_tv");
    assert_eq!(tv.status, 200, "{}", tv.body);
    assert_eq!(tv.field("issued_token_type"), "urn:ietf:params:oauth:token-type:access_token");
    assert!(client.active(&a, &tv.field("access_token")), "a token of one replica is active at the other");

    // carol's next iPad token, asked for at the other replica by token exchange, supersedes the first.
    let ipad2 = exchange(&b, &offline.jwt("carol", &["customer"], json!({})), "orders:read device_ipad");
    assert_eq!(ipad2.status, 200, "{}", ipad2.body);
    until_active(&client, &a, &ipad.field("access_token"), false).await;
    assert!(client.active(&a, &ipad2.field("access_token")));

    let rules = common::rbac::rules(&std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/sidecar-rbac.yaml"));
    let bad = common::rbac::violations(&c.server().requests(), "kubetoken-sidecar/", &rules);
    assert!(bad.is_empty(), "outside the chart's sidecar Role: {bad:?}");
}

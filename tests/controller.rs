//! The real `kubetoken controller` binary against a Kubernetes API: the in-repo test server by default, or a real
//! cluster when KUBETOKEN_TEST_KUBECONFIG names a kubeconfig (tests that inject API faults then skip themselves).
//! Each test works in its own namespace.

mod common;

use std::path::Path;
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use common::cluster::{Cluster, ControllerProcess, b64, condition, eventually, kids};
use k8s_openapi::api::core::v1::{ConfigMap, Secret};
use kube::ResourceExt;
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams, PostParams};
use kubetoken::api::v1alpha1::OAuthApplication;
use serde_json::{Value, json};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_application_gets_its_children_and_ready_and_the_jwks_verifies_its_keys() {
    let c = Cluster::new("new").await;
    let _controller = c.controller("c1");
    let app = c.create_app("shop", json!({"grantTypes": ["client_credentials"], "audience": ["shop-api"]})).await;
    let app = c.ready(&app.name_any()).await;
    let uid = app.uid().expect("uid");
    let status = app.status.clone().expect("status");
    assert_eq!(status.observed_generation, app.metadata.generation);
    for (kind, name, owner) in [
        (
            "Secret",
            "shop-credentials",
            c.secrets().get("shop-credentials").await.map(|s| s.owner_references().to_vec()),
        ),
        (
            "Secret",
            "shop-signing-keys",
            c.secrets().get("shop-signing-keys").await.map(|s| s.owner_references().to_vec()),
        ),
        ("ConfigMap", "shop-jwks", c.config_maps().get("shop-jwks").await.map(|s| s.owner_references().to_vec())),
    ] {
        let owners = owner.unwrap_or_else(|e| panic!("{kind} {name}: {e}"));
        assert!(owners.iter().any(|o| o.uid == uid && o.controller == Some(true)), "{kind} {name} is owned by the app");
    }
    let creds = c.secrets().get("shop-credentials").await.expect("credentials").data.expect("data");
    let client_id = String::from_utf8(creds["client_id"].0.clone()).expect("utf8");
    assert_eq!(status.client_id.as_deref(), Some(client_id.as_str()));
    assert!(creds["client_secret"].0.len() >= 32);
    for type_ in ["CredentialsReady", "SigningKeysReady", "JwksReady", "UsersReady"] {
        assert_eq!(condition(&app, type_).map(|c| c.0), Some("True".into()), "{type_}");
    }

    // The JWKS in the ConfigMap verifies a token signed with the key in the Secret (independent verifier).
    let keys = c.stored_keys("shop").await;
    let current = keys.last().expect("a key");
    assert_eq!(status.current_key_id.as_deref(), Some(current.kid.as_str()));
    let signer = current.signing_key().expect("key parses");
    let token = signer.sign_jwt(br#"{"sub":"x","aud":"shop-api","exp":4102444800}"#).expect("sign");
    let jwks: jsonwebtoken::jwk::JwkSet = serde_json::from_value(c.jwks("shop").await).expect("jwks");
    let jwk = jwks.find(&current.kid).expect("kid published");
    let mut validation = jsonwebtoken::Validation::new(jsonwebtoken::Algorithm::ES256);
    validation.set_audience(&["shop-api"]);
    jsonwebtoken::decode::<Value>(&token, &jsonwebtoken::DecodingKey::from_jwk(jwk).expect("key"), &validation)
        .expect("the JWKS verifies the Secret's key");
    let jwks_text = serde_json::to_string(&c.jwks("shop").await).expect("text");
    assert!(!jwks_text.contains("\"d\""), "no private key material in the ConfigMap");

    // Kubernetes Events say what the controller did.
    let events: Api<k8s_openapi::api::events::v1::Event> = Api::namespaced(c.client.clone(), &c.namespace);
    let reasons = eventually("events are published", Duration::from_secs(20), || async {
        let list = events.list(&ListParams::default()).await.ok()?;
        let reasons: Vec<String> = list.items.iter().filter_map(|e| e.reason.clone()).collect();
        (reasons.iter().any(|r| r == "Ready")).then_some(reasons)
    })
    .await;
    for expected in ["CredentialsCreated", "SigningKeyRotated", "Ready"] {
        assert!(reasons.iter().any(|r| r == expected), "no {expected} event in {reasons:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deleted_child_is_recreated_and_a_changed_spec_is_reconciled() {
    let c = Cluster::new("heal").await;
    let _controller = c.controller("c1");
    c.create_app("shop", json!({"grantTypes": ["client_credentials"]})).await;
    let before = c.ready("shop").await;
    let first_kid = before.status.clone().and_then(|s| s.current_key_id).expect("kid");

    c.config_maps().delete("shop-jwks", &DeleteParams::default()).await.expect("delete jwks");
    let jwks = eventually("the JWKS ConfigMap is back", Duration::from_secs(20), || async {
        c.config_maps().get("shop-jwks").await.ok()
    })
    .await;
    assert!(jwks.data.expect("data")["jwks.json"].contains(&first_kid));

    // A new algorithm rotates at once; the old key stays published while its tokens may live.
    let patch = json!({"spec": {"signing": {"algorithm": "EdDSA"}}});
    c.apps().patch("shop", &PatchParams::default(), &Patch::Merge(&patch)).await.expect("patch");
    let after = eventually("the new spec is observed", Duration::from_secs(20), || async {
        let app = c.apps().get("shop").await.ok()?;
        let s = app.status.clone()?;
        (s.observed_generation == app.metadata.generation && s.current_key_id.as_deref() != Some(first_kid.as_str()))
            .then_some(app)
    })
    .await;
    let new_kid = after.status.and_then(|s| s.current_key_id).expect("kid");
    let jwks = eventually("the JWKS has both keys", Duration::from_secs(20), || async {
        let j = c.jwks("shop").await;
        (kids(&j).len() == 2).then_some(j)
    })
    .await;
    assert!(kids(&jwks).contains(&first_kid) && kids(&jwks).contains(&new_kid));
    let keys = c.stored_keys("shop").await;
    assert_eq!(keys.iter().filter(|k| k.retired_at.is_none()).count(), 1);
    assert_eq!(format!("{:?}", keys.last().expect("key").alg), "EdDSA");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unowned_credentials_secret_is_used_as_given_and_never_touched() {
    let c = Cluster::new("byo").await;
    let given: Secret = serde_json::from_value(json!({
        "metadata": {"name": "byo-creds"},
        "data": {"client_id": b64("my-client"), "client_secret": b64("my-secret")},
    }))
    .expect("secret");
    let given = c.secrets().create(&PostParams::default(), &given).await.expect("create");
    let lacking: Secret =
        serde_json::from_value(json!({"metadata": {"name": "lacking"}, "data": {"other": b64("x")}})).expect("secret");
    let lacking = c.secrets().create(&PostParams::default(), &lacking).await.expect("create");
    let _controller = c.controller("c1");
    c.create_app_raw(
        "byo",
        json!({"grantTypes": ["client_credentials"], "credentials": {"secretName": "byo-creds"}}),
        json!({"kubetoken.io/rotate-client-secret": "2026-11-26T00:00:00Z"}),
    )
    .await;
    c.create_app("broken", json!({"grantTypes": ["client_credentials"], "credentials": {"secretName": "lacking"}}))
        .await;
    let app = c.ready("byo").await;
    assert_eq!(app.status.and_then(|s| s.client_id).as_deref(), Some("my-client"));
    let broken = eventually("the missing keys are reported", Duration::from_secs(20), || async {
        let app = c.apps().get("broken").await.ok()?;
        condition(&app, "CredentialsReady").filter(|(s, _)| s == "False").map(|_| app)
    })
    .await;
    assert_eq!(condition(&broken, "CredentialsReady").map(|c| c.1), Some("MissingKeys".into()));
    assert_eq!(condition(&broken, "Ready").map(|c| c.0), Some("False".into()));
    // Neither Secret was modified (same resourceVersion), even with a rotation requested.
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(c.secrets().get("byo-creds").await.expect("get").resource_version(), given.resource_version());
    assert_eq!(c.secrets().get("lacking").await.expect("get").resource_version(), lacking.resource_version());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn signing_keys_rotate_and_a_retired_key_leaves_the_jwks_once_its_tokens_expired() {
    let c = Cluster::new("rotate").await;
    let _controller = c.controller("c1");
    c.create_app(
        "rot",
        json!({"grantTypes": ["client_credentials"], "accessTokenLifetime": "2s", "signing": {"rotationPeriod": "4s"}}),
    )
    .await;
    let first = c.ready("rot").await.status.and_then(|s| s.current_key_id).expect("kid");
    let both = eventually("a second key is published beside the first", Duration::from_secs(20), || async {
        let k = kids(&c.jwks("rot").await);
        (k.len() == 2 && k.contains(&first)).then_some(k)
    })
    .await;
    let second = both.into_iter().find(|k| *k != first).expect("second kid");
    eventually("the first key is retired from the JWKS", Duration::from_secs(20), || async {
        let k = kids(&c.jwks("rot").await);
        (!k.contains(&first)).then_some(())
    })
    .await;
    // Keys keep rotating every 4 s here: the key that signs now is a published one, and not the first.
    let app = c.apps().get("rot").await.expect("app");
    let current = app.status.and_then(|s| s.current_key_id).expect("a current key");
    assert_ne!(current, first);
    assert!(kids(&c.jwks("rot").await).contains(&current), "the signing key {current} is published");
    assert_ne!(second, first, "the second key is a new key");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_time_moved_forward_the_default_30_day_rotation_happens_and_the_old_key_retires_an_hour_later() {
    let c = Cluster::new("clock").await;
    let clock = tempfile::NamedTempFile::new().expect("clock file");
    let controller = ControllerProcess::start(
        &c.kubeconfig,
        &c.namespace,
        "c1",
        &["--clock-offset-file".as_ref(), clock.path().as_os_str()],
    );
    // "Nothing changed" is only worth asserting once the controller has looked again: count its reconciles.
    let reconciles = || controller.metric("kubetoken_controller_reconciles_total").unwrap_or(0.0);
    let looked_again = |before: f64| async move {
        eventually("the controller reconciled after the touch", Duration::from_secs(20), || async {
            (reconciles() > before).then_some(())
        })
        .await
    };
    c.create_app("app", json!({"grantTypes": ["client_credentials"], "accessTokenLifetime": "1h"})).await;
    let first = c.ready("app").await.status.and_then(|s| s.current_key_id).expect("kid");
    // Any change makes the controller look again; the annotation stands in for the requeue timer, which runs in real time.
    let advance = |secs: u64, touch: &'static str| {
        std::fs::write(clock.path(), secs.to_string()).expect("move the clock");
        let apps = c.apps();
        async move {
            let patch = json!({"metadata": {"annotations": {"test/touch": touch}}});
            apps.patch("app", &PatchParams::default(), &Patch::Merge(&patch)).await.expect("touch");
        }
    };
    let before = reconciles();
    advance(29 * 86_400, "29d").await;
    looked_again(before).await;
    assert_eq!(kids(&c.jwks("app").await), vec![first.clone()], "no rotation before 30 days");

    advance(30 * 86_400 + 1, "30d").await;
    let both = eventually("the 30-day rotation publishes a second key", Duration::from_secs(20), || async {
        let k = kids(&c.jwks("app").await);
        (k.len() == 2).then_some(k)
    })
    .await;
    assert!(both.contains(&first));
    // The new key signs once it has been published for the pre-publication period (2 s in these tests).
    let second = eventually("the new key becomes current", Duration::from_secs(20), || async {
        let kid = c.apps().get("app").await.ok()?.status?.current_key_id?;
        (kid != first).then_some(kid)
    })
    .await;

    let before = reconciles();
    advance(30 * 86_400 + 1800, "30d+30m").await;
    looked_again(before).await;
    assert_eq!(kids(&c.jwks("app").await).len(), 2, "still published while its tokens may live");

    // Retired when the new key took over (about 3 s after the rotation); gone an hour after that.
    advance(30 * 86_400 + 3601 + 30, "30d+1h").await;
    eventually("the old key leaves once its last token expired", Duration::from_secs(20), || async {
        (kids(&c.jwks("app").await) == vec![second.clone()]).then_some(())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_secret_rotation_keeps_the_previous_secret_for_the_grace_period() {
    let c = Cluster::new("secret").await;
    let _controller = c.controller("c1");
    c.create_app("app", json!({"grantTypes": ["client_credentials"], "credentials": {"rotationGracePeriod": "3s"}}))
        .await;
    c.ready("app").await;
    let old = c.secrets().get("app-credentials").await.expect("creds").data.expect("data")["client_secret"].clone();
    let patch = json!({"metadata": {"annotations": {"kubetoken.io/rotate-client-secret": "now"}}});
    let requested = std::time::Instant::now();
    c.apps().patch("app", &PatchParams::default(), &Patch::Merge(&patch)).await.expect("annotate");
    let data = eventually("the secret is rotated", Duration::from_secs(20), || async {
        let d = c.secrets().get("app-credentials").await.ok()?.data?;
        (d.get("client_secret") != Some(&old)).then_some(d)
    })
    .await;
    assert_eq!(data.get("previous_client_secret"), Some(&old), "the previous secret stays valid for a while");
    eventually("the previous secret expires", Duration::from_secs(30), || async {
        let d = c.secrets().get("app-credentials").await.ok()?.data?;
        (!d.contains_key("previous_client_secret")).then_some(())
    })
    .await;
    // It lasted the whole grace period (a lower bound: a busy machine only makes it later). That both secrets
    // authenticate meanwhile is tested where secrets are checked: tests/sidecar.rs.
    assert!(requested.elapsed() >= Duration::from_secs(3), "the previous secret went after {:?}", requested.elapsed());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn specs_that_cannot_work_get_a_clear_condition_without_stopping_the_controller() {
    // The test server, not a real cluster: it stores an algorithm the CRD's schema would refuse.
    let c = Cluster::test_server("invalid").await;
    let _controller = c.controller("c1");
    {
        // An algorithm an older CRD let through (the test server does not validate schemas).
        c.create_app("old", json!({"grantTypes": ["client_credentials"], "signing": {"algorithm": "HS256"}})).await;
        let app = eventually("the spec is reported invalid", Duration::from_secs(20), || async {
            let app = c.apps().get("old").await.ok()?;
            condition(&app, "SpecValid").map(|_| app)
        })
        .await;
        assert_eq!(condition(&app, "SpecValid"), Some(("False".into(), "InvalidSpec".into())));
        assert_eq!(condition(&app, "Ready").map(|c| c.0), Some("False".into()));
    }
    // A missing users Secret: a condition saying so, and Ready once it appears.
    c.create_app("users", json!({"grantTypes": ["password"], "users": {"secretRef": {"name": "later"}}})).await;
    let app = eventually("the missing users Secret is reported", Duration::from_secs(20), || async {
        let app = c.apps().get("users").await.ok()?;
        condition(&app, "UsersReady").filter(|(s, _)| s == "False").map(|_| app)
    })
    .await;
    assert_eq!(condition(&app, "UsersReady").map(|c| c.1), Some("UsersSecretNotFound".into()));
    let users: Secret = serde_json::from_value(json!({
        "metadata": {"name": "later"},
        "stringData": {"users.yaml": "- {username: a, passwordHash: '$2b$04$abcdefghijklmnopqrstuuQ3pUUIW3ZiBGpP0jkC0IQ3uzx7dPpaa', roles: []}\n"},
    }))
    .expect("secret");
    c.secrets().create(&PostParams::default(), &users).await.expect("create users");
    c.ready("users").await;

    // A users Secret without the key, then one whose users do not parse: each named in the condition.
    let users_app = |name: &str, secret: &str| json!({"grantTypes": ["password"], "users": {"secretRef": {"name": secret}}, "credentials": {"secretName": format!("{name}-creds")}});
    for (app, secret, data, reason) in [
        ("nokey", "nokey-users", json!({"other.yaml": "[]"}), "UsersKeyMissing"),
        ("bad", "bad-users", json!({"users.yaml": "- {username: a, roles: []}\n"}), "InvalidUsers"),
    ] {
        let s: Secret =
            serde_json::from_value(json!({"metadata": {"name": secret}, "stringData": data})).expect("secret");
        c.secrets().create(&PostParams::default(), &s).await.expect("create users");
        c.create_app(app, users_app(app, secret)).await;
        let found = eventually("the users problem is reported", Duration::from_secs(20), || async {
            let a = c.apps().get(app).await.ok()?;
            condition(&a, "UsersReady").filter(|(s, _)| s == "False")
        })
        .await;
        assert_eq!(found.1, reason, "{app}");
        let ready = c.apps().get(app).await.expect("app");
        assert_eq!(condition(&ready, "Ready").map(|c| c.0), Some("False".into()), "{app} is not Ready");
    }

    // A child's name taken by an object the application does not own: reported, and the object left as it was.
    let squatter = json!({"metadata": {"name": "taken-jwks"}, "data": {"mine": "yes"}});
    let squatter: k8s_openapi::api::core::v1::ConfigMap = serde_json::from_value(squatter).expect("configmap");
    c.config_maps().create(&PostParams::default(), &squatter).await.expect("create");
    c.create_app("taken", json!({"grantTypes": ["client_credentials"]})).await;
    let found = eventually("the name conflict is reported", Duration::from_secs(20), || async {
        let a = c.apps().get("taken").await.ok()?;
        condition(&a, "JwksReady").filter(|(s, _)| s == "False")
    })
    .await;
    assert_eq!(found.1, "NameConflict");
    let after = c.config_maps().get("taken-jwks").await.expect("still there");
    assert_eq!(after.data.expect("data").get("mine").map(String::as_str), Some("yes"), "never overwritten");
    assert!(after.metadata.owner_references.unwrap_or_default().is_empty(), "never adopted");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deleting_the_application_removes_its_children() {
    let c = Cluster::new("delete").await;
    let _controller = c.controller("c1");
    c.create_app("gone", json!({"grantTypes": ["client_credentials"]})).await;
    c.ready("gone").await;
    // The children exist, labelled, before the delete: otherwise "none left" would prove nothing.
    let labelled = ListParams::default().labels("kubetoken.io/application=gone");
    let secrets = c.secrets().list(&labelled).await.expect("list").items.len();
    let config_maps = c.config_maps().list(&labelled).await.expect("list").items.len();
    assert_eq!((secrets, config_maps), (3, 1), "credentials, signing keys, token secrets; the JWKS");
    let state =
        c.config_maps().list(&ListParams::default().labels("kubetoken.io/token-state-of=gone")).await.expect("list");
    assert_eq!(state.items.len(), 49, "the journal segments, the snapshot pointer and the snapshot chunks");
    c.apps().delete("gone", &DeleteParams::background()).await.expect("delete");
    let mut left = Vec::new();
    for _ in 0..300 {
        let secrets =
            c.secrets().list(&ListParams::default().labels("kubetoken.io/application=gone")).await.expect("list");
        let cms =
            c.config_maps().list(&ListParams::default().labels("kubetoken.io/application=gone")).await.expect("list");
        left = secrets.items.iter().map(|s| s.name_any()).chain(cms.items.iter().map(|s| s.name_any())).collect();
        if left.is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(left.is_empty(), "children left: {left:?}");
    let state =
        c.config_maps().list(&ListParams::default().labels("kubetoken.io/token-state-of=gone")).await.expect("list");
    assert!(state.items.is_empty(), "the token state goes with the application");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_the_leader_writes_and_a_standby_takes_over() {
    let c = Cluster::new("leader").await;
    // A short lease: the kill -9 take-over below waits for it to expire.
    let lease: [&std::ffi::OsStr; 2] = ["--lease-duration".as_ref(), "4s".as_ref()];
    let controller = |identity: &str| ControllerProcess::start(&c.kubeconfig, &c.namespace, identity, &lease);
    let mut a = controller("a");
    let mut b = controller("b");
    let (leader, standby) = eventually("one controller leads", Duration::from_secs(20), || async {
        match (a.metric("kubetoken_controller_leader")?, b.metric("kubetoken_controller_leader")?) {
            (1.0, 0.0) => Some(("a", "b")),
            (0.0, 1.0) => Some(("b", "a")),
            _ => None,
        }
    })
    .await;
    let (leader_proc, standby_proc) = if leader == "a" { (&mut a, &mut b) } else { (&mut b, &mut a) };
    c.create_app("app", json!({"grantTypes": ["client_credentials"]})).await;
    c.ready("app").await;
    assert_eq!(standby_proc.metric("kubetoken_controller_leader"), Some(0.0), "{standby} must not lead");
    assert_eq!(standby_proc.metric("kubetoken_controller_reconciles_total"), Some(0.0), "{standby} must not write");
    // The status is written inside the reconcile, the metric counted right after it returns.
    eventually("the leader counts its reconciles", Duration::from_secs(10), || async {
        (leader_proc.metric("kubetoken_controller_reconciles_total").unwrap_or(0.0) > 0.0).then_some(())
    })
    .await;

    // SIGTERM: the leader stops and releases the Lease, so the standby takes over without waiting for expiry.
    let _ = Command::new("kill").arg("-TERM").arg(leader_proc.child.id().to_string()).status();
    let status = leader_proc.child.wait().expect("wait");
    assert!(status.success(), "graceful shutdown exits 0: {status:?}");
    eventually("the standby takes over", Duration::from_secs(20), || async {
        (standby_proc.metric("kubetoken_controller_leader")? == 1.0).then_some(())
    })
    .await;
    c.config_maps().delete("app-jwks", &DeleteParams::default()).await.expect("delete");
    eventually("the new leader repairs", Duration::from_secs(20), || async {
        c.config_maps().get("app-jwks").await.ok()
    })
    .await;
    assert!(!standby_proc.exited());

    // kill -9: the Lease is not released; a fresh standby takes over once it expires (4 s after the last renewal,
    // which was at most a retry period, 0.8 s, before the kill), not before.
    let mut fresh = controller("c");
    standby_proc.kill9();
    let killed_at = std::time::Instant::now();
    eventually("the fresh standby takes over after the Lease expired", Duration::from_secs(30), || async {
        (fresh.metric("kubetoken_controller_leader")? == 1.0).then_some(())
    })
    .await;
    assert!(killed_at.elapsed() >= Duration::from_millis(3200), "took over before the Lease could expire");
    c.config_maps().delete("app-jwks", &DeleteParams::default()).await.expect("delete");
    eventually("the fresh leader repairs", Duration::from_secs(20), || async {
        c.config_maps().get("app-jwks").await.ok()
    })
    .await;
    assert!(!fresh.exited());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn api_faults_are_survived_without_duplicates_or_lost_updates() {
    let c = Cluster::test_server("faults").await;
    let server = c.server();
    let controller = c.controller("c1");
    c.create_app("warmup", json!({"grantTypes": ["client_credentials"]})).await;
    c.ready("warmup").await;

    // 500s, 503s and 429s while an application is created (created inside the server, past the faults).
    server.fail_next(6, 500);
    let app = json!({
        "apiVersion": "kubetoken.io/v1alpha1", "kind": "OAuthApplication",
        "metadata": {"name": "shop", "namespace": c.namespace}, "spec": {"grantTypes": ["client_credentials"]},
    });
    server
        .create_object(&format!("/apis/kubetoken.io/v1alpha1/namespaces/{}/oauthapplications", c.namespace), app)
        .expect("create in the server");
    // Each burst is used up by the controller (the test itself sends nothing meanwhile) before the next one, so
    // the controller met every injected failure: `fail_next` replaces a pending burst.
    let consumed = || async {
        eventually("the controller met the injected failures", Duration::from_secs(20), || async {
            (server.pending_failures() == 0).then_some(())
        })
        .await
    };
    consumed().await;
    server.fail_next(4, 503);
    consumed().await;
    server.fail_next(3, 429);
    consumed().await;
    c.ready("shop").await;
    // And the failures were met inside reconciles, which count them (then retry with backoff).
    let errors = controller.metric("kubetoken_controller_reconcile_errors_total").unwrap_or(0.0);
    assert!(errors > 0.0, "no reconcile met an injected failure");

    // Dropped watches: the controller re-watches and still sees changes.
    server.close_watches();
    tokio::time::sleep(Duration::from_millis(200)).await;
    c.config_maps().delete("shop-jwks", &DeleteParams::default()).await.expect("delete");
    eventually("the JWKS is recreated after the watches dropped", Duration::from_secs(30), || async {
        c.config_maps().get("shop-jwks").await.ok()
    })
    .await;

    // A conflicting writer: another client changes the credentials Secret, and the controller's next writes to it
    // meet 409 Conflict (injected: a real race is not reproducible on demand). The controller retries on fresh
    // state: the rotation is not lost, and neither is the other writer's change.
    let old = c.secrets().get("shop-credentials").await.expect("creds").data.expect("data")["client_secret"].clone();
    for i in 0..5 {
        let touch = json!({"metadata": {"annotations": {"touched": i.to_string()}}});
        c.secrets().patch("shop-credentials", &PatchParams::default(), &Patch::Merge(&touch)).await.expect("touch");
    }
    server.clear_requests();
    let credentials_path = format!("/api/v1/namespaces/{}/secrets/shop-credentials", c.namespace);
    server.conflict_next_writes(&credentials_path, 3);
    let rotate = json!({"metadata": {"annotations": {"kubetoken.io/rotate-client-secret": "r1"}}});
    c.apps().patch("shop", &PatchParams::default(), &Patch::Merge(&rotate)).await.expect("annotate");
    eventually("the rotation happened despite conflicts", Duration::from_secs(30), || async {
        let d = c.secrets().get("shop-credentials").await.ok()?.data?;
        (d.get("client_secret") != Some(&old) && d.get("previous_client_secret") == Some(&old)).then_some(())
    })
    .await;
    let conflicts = server
        .requests()
        .iter()
        .filter(|r| r.user_agent.starts_with("kubetoken-controller") && r.path == credentials_path && r.status == 409)
        .count();
    assert_eq!((server.pending_conflicts(), conflicts), (0, 3), "the controller met the three 409s");
    let annotations =
        c.secrets().get("shop-credentials").await.expect("creds").metadata.annotations.unwrap_or_default();
    assert_eq!(annotations.get("touched").map(String::as_str), Some("4"), "the other writer's change survived");

    // Exactly one of each child.
    let secrets = c.secrets().list(&ListParams::default().labels("kubetoken.io/application=shop")).await.expect("list");
    let mut names: Vec<String> = secrets.items.iter().map(|s| s.name_any()).collect();
    names.sort();
    assert_eq!(names, vec!["shop-credentials", "shop-signing-keys", "shop-token-secrets"]);
    let cms = c.config_maps().list(&ListParams::default().labels("kubetoken.io/application=shop")).await.expect("list");
    assert_eq!(cms.items.len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kubectl_apply_of_the_examples_gives_a_ready_application() {
    let c = Cluster::new("kubectl").await;
    let _controller = ControllerProcess::start(&c.kubeconfig, "default", "c1", &[]);
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    for dir in ["crds", "examples"] {
        let out = Command::new(std::env::var("KUBECTL").unwrap_or_else(|_| "kubectl".into()))
            .args(["apply", "--validate=false", "-f"])
            .arg(root.join(dir))
            .env("KUBECONFIG", &c.kubeconfig)
            .output()
            .expect("kubectl runs (scripts/test installs it: scripts/install-test-tools)");
        assert!(out.status.success(), "kubectl apply -f {dir}: {}", String::from_utf8_lossy(&out.stderr));
    }
    let apps: Api<OAuthApplication> = Api::namespaced(c.client.clone(), "default");
    eventually("shop is Ready", Duration::from_secs(30), || async {
        let app = apps.get("shop").await.ok()?;
        condition(&app, "Ready").filter(|(s, _)| s == "True").map(|_| ())
    })
    .await;
}

/// The sidecars write the live keys and the capacity into the snapshot pointer with each snapshot; the controller
/// reports them in `TokenStateReady`: a Warning event and reason `NearCapacity` from 80 %, False with reason `Full`
/// at 100 %, which leaves the application Ready (its existing sessions keep working).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_token_state_condition_warns_near_capacity_and_turns_false_when_full_without_un_readying() {
    let c = Cluster::new("capacity").await;
    let _controller = c.controller("c1");
    c.create_app("shop", json!({"grantTypes": ["client_credentials"]})).await;
    c.ready("shop").await;
    // What a sidecar's snapshot writes (the test plays the sidecar), then a change to the application so that it
    // is reconciled now rather than at its next periodic look.
    let report = |keys: u64, touch: &'static str| {
        let c = &c;
        async move {
            let pointer = json!({"data": {"keys": keys.to_string(), "capacity": "150000"}});
            c.config_maps()
                .patch("shop-tokens-snapshot", &PatchParams::default(), &Patch::Merge(&pointer))
                .await
                .expect("pointer");
            let touch = json!({"metadata": {"annotations": {"test/touch": touch}}});
            c.apps().patch("shop", &PatchParams::default(), &Patch::Merge(&touch)).await.expect("touch");
        }
    };
    let state_condition = |want: &'static str| {
        let c = &c;
        async move {
            eventually(&format!("TokenStateReady {want}"), Duration::from_secs(20), || async {
                let app = c.apps().get("shop").await.ok()?;
                (condition(&app, "TokenStateReady")?.1 == want).then_some(app)
            })
            .await
        }
    };
    report(120_000, "80").await;
    let near = state_condition("NearCapacity").await;
    assert_eq!(condition(&near, "TokenStateReady").map(|c| c.0), Some("True".into()));
    report(150_000, "100").await;
    let full = state_condition("Full").await;
    assert_eq!(condition(&full, "TokenStateReady").map(|c| c.0), Some("False".into()));
    assert_eq!(
        condition(&full, "Ready").map(|c| c.0),
        Some("True".into()),
        "a full state leaves the application Ready"
    );
    let message = full
        .status
        .as_ref()
        .and_then(|s| s.conditions.iter().find(|c| c.type_ == "TokenStateReady"))
        .map(|c| c.message.clone())
        .unwrap_or_default();
    assert!(message.contains("150000 live token keys"), "{message}");
    let events: Api<k8s_openapi::api::events::v1::Event> = Api::namespaced(c.client.clone(), &c.namespace);
    let reasons = eventually("capacity events", Duration::from_secs(20), || async {
        let list = events.list(&ListParams::default()).await.ok()?;
        let reasons: Vec<String> = list.items.iter().filter_map(|e| e.reason.clone()).collect();
        reasons.iter().any(|r| r == "TokenStateFull").then_some(reasons)
    })
    .await;
    assert!(reasons.iter().any(|r| r == "TokenStateNearCapacity"), "{reasons:?}");
}

/// With `spec.sidecar.serviceAccountName`, the controller keeps a Role and RoleBinding (owned by the application)
/// granting that ServiceAccount exactly the sidecar's access, by resource name: no Helm upgrade per application. A
/// hand edit of the Role is undone at the next reconcile; an unowned Role of the same name is reported, not touched.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_application_naming_its_sidecar_service_account_gets_a_role_and_binding_for_it() {
    use k8s_openapi::api::rbac::v1::{Role, RoleBinding};
    let c = Cluster::new("sidecar-rbac").await;
    let _controller = c.controller("c1");
    let spec = json!({"grantTypes": ["client_credentials"], "sidecar": {"serviceAccountName": "shop-app"}});
    let app = c.create_app("shop", spec).await;
    let app = c.ready(&app.name_any()).await;
    assert_eq!(condition(&app, "SidecarAccessReady").map(|c| c.0), Some("True".into()));
    let roles: Api<Role> = Api::namespaced(c.client.clone(), &c.namespace);
    let bindings: Api<RoleBinding> = Api::namespaced(c.client.clone(), &c.namespace);
    let role = roles.get("shop-kubetoken-sidecar").await.expect("role");
    let uid = app.uid().expect("uid");
    assert!(role.owner_references().iter().any(|o| o.uid == uid), "owned by the application");
    let expected = kubetoken::controller::sidecar_access::rules("shop", "shop-credentials", None, &[]);
    assert_eq!(role.rules.as_ref(), Some(&expected));
    let binding = bindings.get("shop-kubetoken-sidecar").await.expect("binding");
    assert_eq!(binding.role_ref.name, "shop-kubetoken-sidecar");
    let subject = &binding.subjects.as_ref().expect("subjects")[0];
    assert_eq!((subject.kind.as_str(), subject.name.as_str()), ("ServiceAccount", "shop-app"));
    assert_eq!(subject.namespace.as_deref(), Some(c.namespace.as_str()));

    // A hand edit (a rule dropped) is undone once the application is reconciled again.
    let mut edited = role.clone();
    edited.rules.as_mut().expect("rules").pop();
    roles.replace("shop-kubetoken-sidecar", &PostParams::default(), &edited).await.expect("edit");
    let touch = json!({"metadata": {"annotations": {"test/touch": "1"}}});
    c.apps().patch("shop", &PatchParams::default(), &Patch::Merge(&touch)).await.expect("touch");
    eventually("the Role is restored", Duration::from_secs(20), || async {
        (roles.get("shop-kubetoken-sidecar").await.ok()?.rules.as_ref() == Some(&expected)).then_some(())
    })
    .await;

    // Another application whose Role name is taken by an object it does not own: reported, the object untouched.
    let foreign = Role {
        metadata: kube::api::ObjectMeta { name: Some("kiosk-kubetoken-sidecar".into()), ..Default::default() },
        rules: Some(vec![]),
    };
    roles.create(&PostParams::default(), &foreign).await.expect("foreign role");
    let spec = json!({"grantTypes": ["client_credentials"], "sidecar": {"serviceAccountName": "kiosk"}});
    c.create_app("kiosk", spec).await;
    let kiosk = eventually("the conflict is reported", Duration::from_secs(20), || async {
        let app = c.apps().get("kiosk").await.ok()?;
        (condition(&app, "SidecarAccessReady")?.1 == "NameConflict").then_some(app)
    })
    .await;
    assert_eq!(condition(&kiosk, "SidecarAccessReady").map(|c| c.0), Some("False".into()));
    assert_eq!(roles.get("kiosk-kubetoken-sidecar").await.expect("role").rules, Some(vec![]), "not overwritten");
}

const JWT_BEARER: &str = "urn:ietf:params:oauth:grant-type:jwt-bearer";

/// The message of a condition.
fn message(app: &OAuthApplication, type_: &str) -> String {
    app.status
        .as_ref()
        .and_then(|s| s.conditions.iter().find(|c| c.type_ == type_))
        .map(|c| c.message.clone())
        .unwrap_or_default()
}

/// Waits until the application's `TrustedIssuersReady` has `status` while `Ready` is True.
async fn trusted_issuers_ready(c: &Cluster, app: &str, status: &str) -> OAuthApplication {
    eventually(&format!("{app}: TrustedIssuersReady {status} and Ready True"), Duration::from_secs(30), || async {
        let a = c.apps().get(app).await.ok()?;
        (condition(&a, "TrustedIssuersReady")?.0 == status && condition(&a, "Ready")?.0 == "True").then_some(a)
    })
    .await
}

/// A trusted issuer's key-set endpoint on the loopback (plain HTTP, which kubetoken allows there): one ES256 key, and
/// a count of the requests it answered.
async fn serve_key_set() -> (String, Arc<AtomicUsize>) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let url = format!("http://{}/realms/shop/certs", listener.local_addr().expect("addr"));
    let body = key_set_json();
    let requests = Arc::new(AtomicUsize::new(0));
    let counted = requests.clone();
    tokio::spawn(async move {
        while let Ok((mut tcp, _)) = listener.accept().await {
            let (body, counted) = (body.clone(), counted.clone());
            tokio::spawn(async move {
                let mut request = Vec::new();
                let mut buf = [0u8; 1024];
                while !request.windows(4).any(|w| w == b"\r\n\r\n") {
                    match tcp.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => request.extend_from_slice(&buf[..n]),
                    }
                }
                counted.fetch_add(1, Ordering::SeqCst);
                let response = format!(
                    "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                    body.len()
                );
                let _ = tcp.write_all(response.as_bytes()).await;
                let _ = tcp.shutdown().await;
            });
        }
    });
    (url, requests)
}

/// A JWK Set of one fresh ES256 public key.
fn key_set_json() -> String {
    use kubetoken::core::signing::{Algorithm, SigningKey};
    let pkcs8 = SigningKey::generate_pkcs8(Algorithm::ES256).expect("generate");
    let key = SigningKey::from_pkcs8(Algorithm::ES256, &pkcs8).expect("parse");
    json!({"keys": [serde_json::to_value(key.public_jwk()).expect("jwk")]}).to_string()
}

/// A trusted issuer's `jwksUri` that cannot be fetched makes `TrustedIssuersReady` False with reason
/// `KeySetUnavailable`, naming the issuer and why, and leaves the application Ready (the password and
/// client_credentials grants still work, and sidecars keep a set they hold). Once the key set can be fetched it is
/// True, and the issuer is asked once however often the application is reconciled: the controller goes through the
/// key-set cache. Without trusted issuers the condition goes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn trusted_issuers_ready_follows_whether_the_key_set_can_be_fetched_without_un_readying() {
    let c = Cluster::new("issuers").await;
    // A CA file that cannot be read stops the controller at once, naming it.
    let out = Command::new(common::cluster::BIN)
        .args(["controller", "--issuer-ca-file", "/nonexistent/ca.pem"])
        .env("KUBECONFIG", &c.kubeconfig)
        .output()
        .expect("run the controller");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && stderr.contains("--issuer-ca-file /nonexistent/ca.pem"), "{stderr}");

    let controller = c.controller("c1");
    let (jwks_uri, requests) = serve_key_set().await;
    let issuer = "https://idp.example/realms/shop";
    let trusting = |uri: &str| {
        json!({"grantTypes": ["client_credentials", JWT_BEARER],
            "trustedIssuers": [{"issuer": issuer, "jwksUri": uri, "audiences": ["shop"]}]})
    };
    // Nothing listens on port 1 of the loopback.
    c.create_app("fed", trusting("http://127.0.0.1:1/certs")).await;
    let down = trusted_issuers_ready(&c, "fed", "False").await;
    assert_eq!(condition(&down, "TrustedIssuersReady").map(|c| c.1), Some("KeySetUnavailable".into()));
    let why = message(&down, "TrustedIssuersReady");
    assert!(why.contains(issuer) && why.contains("http://127.0.0.1:1/certs"), "{why}");

    let patch = json!({"spec": trusting(&jwks_uri)});
    c.apps().patch("fed", &PatchParams::default(), &Patch::Merge(&patch)).await.expect("patch");
    let up = trusted_issuers_ready(&c, "fed", "True").await;
    assert_eq!(condition(&up, "TrustedIssuersReady").map(|c| c.1), Some("KeySetsAvailable".into()));

    // Three more reconciles (each awaited through the controller's count) ask the issuer nothing more.
    let reconciles = || controller.metric("kubetoken_controller_reconciles_total").unwrap_or(0.0);
    for i in 0..3 {
        let before = reconciles();
        let touch = json!({"metadata": {"annotations": {"test/touch": i.to_string()}}});
        c.apps().patch("fed", &PatchParams::default(), &Patch::Merge(&touch)).await.expect("touch");
        eventually("the controller reconciled after the touch", Duration::from_secs(20), || async {
            (reconciles() > before).then_some(())
        })
        .await;
    }
    assert_eq!(requests.load(Ordering::SeqCst), 1, "the key set was fetched once");

    let patch = json!({"spec": {"grantTypes": ["client_credentials"], "trustedIssuers": null}});
    c.apps().patch("fed", &PatchParams::default(), &Patch::Merge(&patch)).await.expect("patch");
    eventually("TrustedIssuersReady is removed", Duration::from_secs(20), || async {
        let a = c.apps().get("fed").await.ok()?;
        (a.status.as_ref()?.observed_generation == a.metadata.generation
            && condition(&a, "TrustedIssuersReady").is_none())
        .then_some(())
    })
    .await;
}

/// An offline key set (`jwks.configMapRef`): `TrustedIssuersReady` is False, naming the issuer and the ConfigMap,
/// while the ConfigMap is missing or lacks its key, and True once it holds a key set; Ready all along.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn trusted_issuers_ready_follows_the_offline_key_set_config_map() {
    let c = Cluster::new("offline-keys").await;
    let _controller = c.controller("c1");
    let spec = json!({"grantTypes": [JWT_BEARER], "trustedIssuers": [{"issuer": "https://idp.example/realms/shop",
        "jwks": {"configMapRef": {"name": "idp-keys"}}, "audiences": ["shop"]}]});
    c.create_app("offline", spec).await;
    let missing = trusted_issuers_ready(&c, "offline", "False").await;
    assert_eq!(condition(&missing, "TrustedIssuersReady").map(|c| c.1), Some("KeySetUnavailable".into()));
    let why = message(&missing, "TrustedIssuersReady");
    assert!(why.contains("https://idp.example/realms/shop") && why.contains("idp-keys"), "{why}");

    let keyless: ConfigMap =
        serde_json::from_value(json!({"metadata": {"name": "idp-keys"}, "data": {"other.json": "{}"}})).expect("cm");
    c.config_maps().create(&PostParams::default(), &keyless).await.expect("create");
    eventually("the missing key is reported", Duration::from_secs(20), || async {
        let a = c.apps().get("offline").await.ok()?;
        message(&a, "TrustedIssuersReady").contains("has no key jwks.json").then_some(())
    })
    .await;

    let patch = json!({"data": {"jwks.json": key_set_json()}});
    c.config_maps().patch("idp-keys", &PatchParams::default(), &Patch::Merge(&patch)).await.expect("patch");
    trusted_issuers_ready(&c, "offline", "True").await;
}

/// A users Secret holding 80 % or more of the 1 MiB the API server lets a Secret have: `UsersReady` stays True with
/// reason `NearSizeLimit`, the count and the size in its message, and a Warning event.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_users_secret_near_the_size_limit_is_reported_and_stays_ready() {
    let c = Cluster::new("big-users").await;
    let _controller = c.controller("c1");
    // One bcrypt (cost 4) hash for all: the parser checks its form, and only a sidecar ever verifies one.
    let hash = "$2b$04$abcdefghijklmnopqrstuuQ3pUUIW3ZiBGpP0jkC0IQ3uzx7dPpaa";
    let users: String =
        (0..7_200).map(|i| format!("- {{username: user-{i:05}, passwordHash: '{hash}', roles: [reader]}}\n")).collect();
    let size = users.len() + "users.yaml".len();
    assert!((838_861..1_048_576).contains(&size), "the Secret is 80-100 % of 1 MiB: {size} bytes");
    let secret: Secret =
        serde_json::from_value(json!({"metadata": {"name": "big-users"}, "stringData": {"users.yaml": users}}))
            .expect("secret");
    c.secrets().create(&PostParams::default(), &secret).await.expect("create users");
    c.create_app("big", json!({"grantTypes": ["password"], "users": {"secretRef": {"name": "big-users"}}})).await;
    let app = eventually("UsersReady NearSizeLimit", Duration::from_secs(30), || async {
        let a = c.apps().get("big").await.ok()?;
        (condition(&a, "UsersReady")?.1 == "NearSizeLimit").then_some(a)
    })
    .await;
    assert_eq!(condition(&app, "UsersReady").map(|c| c.0), Some("True".into()));
    let text = message(&app, "UsersReady");
    let percent = size * 100 / 1_048_576;
    assert!(text.contains("7,200 users in") && text.contains(&format!("{percent} % of the 1 MiB")), "{text}");
    assert!(text.contains("spec.trustedIssuers"), "{text}");
    c.ready("big").await;
    let events: Api<k8s_openapi::api::events::v1::Event> = Api::namespaced(c.client.clone(), &c.namespace);
    eventually("a UsersSecretNearSizeLimit event", Duration::from_secs(20), || async {
        let list = events.list(&ListParams::default()).await.ok()?;
        list.items.iter().any(|e| e.reason.as_deref() == Some("UsersSecretNearSizeLimit")).then_some(())
    })
    .await;
}

/// The sidecar Role the controller keeps grants reading and watching the ConfigMap of an offline key set, by
/// name only, besides the rest of the sidecar's access.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_controller_managed_sidecar_role_names_the_key_set_config_map() {
    use k8s_openapi::api::rbac::v1::Role;
    let c = Cluster::new("sidecar-keys").await;
    let _controller = c.controller("c1");
    let spec = json!({"grantTypes": [JWT_BEARER], "sidecar": {"serviceAccountName": "shop-app"},
        "trustedIssuers": [{"issuer": "https://idp.example", "jwks": {"configMapRef": {"name": "idp-keys", "key": "k.json"}},
            "audiences": ["shop"]}]});
    c.create_app("keys", spec).await;
    eventually("SidecarAccessReady", Duration::from_secs(20), || async {
        let a = c.apps().get("keys").await.ok()?;
        (condition(&a, "SidecarAccessReady")?.0 == "True").then_some(())
    })
    .await;
    let roles: Api<Role> = Api::namespaced(c.client.clone(), &c.namespace);
    let rules = roles.get("keys-kubetoken-sidecar").await.expect("role").rules.unwrap_or_default();
    let key_set = rules
        .iter()
        .find(|r| r.resource_names.as_deref() == Some(&["idp-keys".to_string()][..]))
        .unwrap_or_else(|| panic!("no rule names the key-set ConfigMap: {rules:#?}"));
    assert_eq!(key_set.resources.as_deref(), Some(&["configmaps".to_string()][..]));
    assert_eq!(key_set.verbs, vec!["get", "list", "watch"]);
    let expected = kubetoken::controller::sidecar_access::rules("keys", "keys-credentials", None, &["idp-keys".into()]);
    assert_eq!(rules, expected);
}

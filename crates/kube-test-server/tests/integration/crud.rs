//! Create, get, list, update, delete; conflicts; generateName; stringData; selectors; errors.

use std::collections::BTreeMap;

use k8s_openapi::ByteString;
use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::api::core::v1::{ConfigMap, Namespace, Secret};
use kube::api::{Api, DeleteParams, ListParams, PostParams};
use kube_test_server::KubeTestServer;
use serde_json::json;

use crate::{client, code, configmap, meta, raw, secret};

#[tokio::test]
async fn create_get_list_update_delete_with_conflicts() {
    let server = KubeTestServer::start();
    let client = client(&server).await;
    let secrets: Api<Secret> = Api::namespaced(client.clone(), "apps");
    let pp = PostParams::default();

    let mut s = secret("db");
    s.string_data = Some(BTreeMap::from([("password".to_string(), "hunter2".to_string())]));
    s.data = Some(BTreeMap::from([("user".to_string(), ByteString(b"admin".to_vec()))]));
    let created = secrets.create(&pp, &s).await.unwrap();
    assert_eq!(created.metadata.namespace.as_deref(), Some("apps"));
    assert_eq!(created.type_.as_deref(), Some("Opaque"));
    assert!(created.string_data.is_none(), "stringData is never stored");
    let data = created.data.clone().unwrap();
    assert_eq!(data["password"].0, b"hunter2");
    assert_eq!(data["user"].0, b"admin");
    let uid = created.metadata.uid.clone().unwrap();
    assert_eq!(uid.len(), 36);
    assert!(created.metadata.creation_timestamp.is_some());
    let rv1: u64 = created.metadata.resource_version.clone().unwrap().parse().unwrap();
    assert!(created.metadata.generation.is_none(), "secrets have no generation, as in Kubernetes");
    // The raw stored object has no stringData either.
    let stored = server.get_object("/api/v1/namespaces/apps/secrets/db").unwrap();
    assert!(stored.get("stringData").is_none());

    // AlreadyExists.
    assert_eq!(code(secrets.create(&pp, &secret("db")).await), (409, "AlreadyExists".into()));

    // Get and list.
    assert_eq!(secrets.get("db").await.unwrap().metadata.uid.as_deref(), Some(uid.as_str()));
    assert_eq!(code(secrets.get("nope").await), (404, "NotFound".into()));
    let list = secrets.list(&ListParams::default()).await.unwrap();
    assert_eq!(list.items.len(), 1);
    assert!(list.metadata.resource_version.unwrap().parse::<u64>().unwrap() >= rv1);

    // Update with the current resourceVersion works and bumps it; a stale one conflicts.
    let mut fresh = created.clone();
    fresh.metadata.labels = Some(BTreeMap::from([("tier".to_string(), "db".to_string())]));
    let updated = secrets.replace("db", &pp, &fresh).await.unwrap();
    let rv2: u64 = updated.metadata.resource_version.clone().unwrap().parse().unwrap();
    assert!(rv2 > rv1);
    assert_eq!(updated.metadata.uid.as_deref(), Some(uid.as_str()), "uid is immutable");
    let mut stale = created.clone();
    stale.metadata.annotations = Some(BTreeMap::from([("a".to_string(), "b".to_string())]));
    assert_eq!(code(secrets.replace("db", &pp, &stale).await), (409, "Conflict".into()));
    // Built-in types accept an unconditional update (no resourceVersion).
    let mut unconditional = updated.clone();
    unconditional.metadata.resource_version = None;
    unconditional.string_data = Some(BTreeMap::from([("password".to_string(), "changed".to_string())]));
    let replaced = secrets.replace("db", &pp, &unconditional).await.unwrap();
    assert_eq!(replaced.data.unwrap()["password"].0, b"changed");
    assert!(replaced.string_data.is_none());
    // A no-op update doesn't change the resourceVersion.
    let same = secrets.replace("db", &pp, &secrets.get("db").await.unwrap()).await.unwrap();
    assert_eq!(same.metadata.resource_version, secrets.get("db").await.unwrap().metadata.resource_version);
    // Update of a missing object.
    assert_eq!(code(secrets.replace("nope", &pp, &secret("nope")).await), (404, "NotFound".into()));

    // generateName.
    let mut g = secret("");
    g.metadata.name = None;
    g.metadata.generate_name = Some("token-".into());
    let a = secrets.create(&pp, &g).await.unwrap().metadata.name.unwrap();
    let b = secrets.create(&pp, &g).await.unwrap().metadata.name.unwrap();
    assert!(a.starts_with("token-") && a.len() == "token-".len() + 5, "{a}");
    assert_ne!(a, b);
    let mut nameless = secret("");
    nameless.metadata.name = None;
    assert_eq!(code(secrets.create(&pp, &nameless).await), (422, "Invalid".into()));
    assert_eq!(code(secrets.create(&pp, &secret("Not_A_Name")).await), (422, "Invalid".into()));

    // Delete answers the object; then it's gone.
    let deleted = secrets.delete("db", &DeleteParams::default()).await.unwrap();
    assert_eq!(deleted.left().unwrap().metadata.uid.as_deref(), Some(uid.as_str()));
    assert_eq!(code(secrets.get("db").await), (404, "NotFound".into()));
    assert_eq!(code(secrets.delete("db", &DeleteParams::default()).await), (404, "NotFound".into()));
    // A UID precondition that doesn't match conflicts.
    let dp = DeleteParams {
        preconditions: Some(kube::api::Preconditions { uid: Some("x".into()), resource_version: None }),
        ..Default::default()
    };
    assert_eq!(code(secrets.delete(&a, &dp).await), (409, "Conflict".into()));
}

#[tokio::test]
async fn resource_versions_come_from_one_global_counter() {
    let server = KubeTestServer::start();
    let client = client(&server).await;
    let cms: Api<ConfigMap> = Api::namespaced(client.clone(), "a");
    let secrets: Api<Secret> = Api::namespaced(client.clone(), "b");
    let pp = PostParams::default();
    let r1: u64 =
        cms.create(&pp, &configmap("x", &[])).await.unwrap().metadata.resource_version.unwrap().parse().unwrap();
    let r2: u64 = secrets.create(&pp, &secret("y")).await.unwrap().metadata.resource_version.unwrap().parse().unwrap();
    let r3: u64 =
        cms.create(&pp, &configmap("z", &[])).await.unwrap().metadata.resource_version.unwrap().parse().unwrap();
    // Creating in namespace "b" created that Namespace first, which took a resourceVersion too.
    assert!(r1 < r2 && r2 < r3, "{r1} {r2} {r3}");
    assert_eq!(server.resource_version(), r3);
}

#[tokio::test]
async fn label_and_field_selectors_and_cluster_wide_lists() {
    let server = KubeTestServer::start();
    let client = client(&server).await;
    let pp = PostParams::default();
    for (ns, name, labels) in [
        ("one", "a", vec![("app", "web"), ("tier", "front")]),
        ("one", "b", vec![("app", "web"), ("tier", "back")]),
        ("two", "c", vec![("app", "db")]),
        ("two", "d", vec![]),
    ] {
        let mut cm = configmap(name, &[]);
        cm.metadata.labels = Some(labels.into_iter().map(|(k, v)| (k.to_string(), v.to_string())).collect());
        Api::<ConfigMap>::namespaced(client.clone(), ns).create(&pp, &cm).await.unwrap();
    }
    let all: Api<ConfigMap> = Api::all(client.clone());
    let names = |lp: ListParams| {
        let all = all.clone();
        async move {
            let mut n: Vec<String> =
                all.list(&lp).await.unwrap().items.into_iter().map(|c| c.metadata.name.unwrap()).collect();
            n.sort();
            n.join(",")
        }
    };
    assert_eq!(names(ListParams::default()).await, "a,b,c,d");
    assert_eq!(names(ListParams::default().labels("app=web")).await, "a,b");
    assert_eq!(names(ListParams::default().labels("app==web,tier!=front")).await, "b");
    assert_eq!(names(ListParams::default().labels("app in (db, web),tier notin (back)")).await, "a,c");
    assert_eq!(names(ListParams::default().labels("app")).await, "a,b,c");
    assert_eq!(names(ListParams::default().labels("!app")).await, "d");
    assert_eq!(names(ListParams::default().labels("app!=web")).await, "c,d");
    assert_eq!(names(ListParams::default().fields("metadata.namespace=two")).await, "c,d");
    assert_eq!(names(ListParams::default().fields("metadata.name==a")).await, "a");
    assert_eq!(names(ListParams::default().fields("metadata.name!=a,metadata.namespace=one")).await, "b");
    let one: Api<ConfigMap> = Api::namespaced(client.clone(), "one");
    assert_eq!(one.list(&ListParams::default()).await.unwrap().items.len(), 2);
    // Unsupported field and malformed label selectors are 400s.
    assert_eq!(code(all.list(&ListParams::default().fields("data.x=1")).await).0, 400);
    assert_eq!(code(all.list(&ListParams::default().labels("app in (web")).await).0, 400);
    // The list carries kind/apiVersion on items (checked raw).
    let (status, _, body) = raw(&client, "GET", "/api/v1/namespaces/one/configmaps", None, "").await;
    assert_eq!(status, 200);
    assert_eq!(body["kind"], "ConfigMapList");
    assert_eq!(body["items"][0]["kind"], "ConfigMap");
    assert_eq!(body["items"][0]["apiVersion"], "v1");
}

#[tokio::test]
async fn namespaces_leases_and_malformed_requests() {
    let server = KubeTestServer::start();
    let client = client(&server).await;
    // Any namespace exists.
    let namespaces: Api<Namespace> = Api::all(client.clone());
    let ns = namespaces.get("whatever").await.unwrap();
    assert_eq!(ns.status.unwrap().phase.as_deref(), Some("Active"));
    assert!(namespaces.get("default").await.is_ok());

    // Leases: optimistic concurrency as leader election uses it.
    let leases: Api<Lease> = Api::namespaced(client.clone(), "kube-system");
    let lease = Lease {
        metadata: meta("leader"),
        spec: Some(LeaseSpec {
            holder_identity: Some("a".into()),
            lease_duration_seconds: Some(15),
            ..Default::default()
        }),
    };
    let created = leases.create(&PostParams::default(), &lease).await.unwrap();
    let mut take = created.clone();
    take.spec.as_mut().unwrap().holder_identity = Some("b".into());
    leases.replace("leader", &PostParams::default(), &take).await.unwrap();
    let mut late = created.clone();
    late.spec.as_mut().unwrap().holder_identity = Some("c".into());
    assert_eq!(code(leases.replace("leader", &PostParams::default(), &late).await).0, 409);
    assert_eq!(leases.get("leader").await.unwrap().spec.unwrap().holder_identity.as_deref(), Some("b"));

    // Malformed bodies: 400 with a Status, never a dropped connection.
    let path = "/api/v1/namespaces/default/configmaps";
    let (status, _, body) = raw(&client, "POST", path, Some("application/json"), "{not json").await;
    assert_eq!(status, 400);
    assert_eq!(
        (body["kind"].as_str(), body["status"].as_str(), body["code"].as_u64()),
        (Some("Status"), Some("Failure"), Some(400))
    );
    let (status, _, _) = raw(&client, "POST", path, Some("application/json"), "[1,2]").await;
    assert_eq!(status, 400);
    let (status, _, _) = raw(
        &client,
        "POST",
        path,
        Some("application/json"),
        r#"{"kind":"Secret","apiVersion":"v1","metadata":{"name":"x"}}"#,
    )
    .await;
    assert_eq!(status, 400, "kind must match the URL");
    let (status, _, _) = raw(
        &client,
        "POST",
        "/api/v1/namespaces/default/secrets",
        Some("application/json"),
        r#"{"kind":"Secret","apiVersion":"v1","metadata":{"name":"x"},"data":{"k":"not base64!"}}"#,
    )
    .await;
    assert_eq!(status, 400);
    let (status, _, _) =
        raw(&client, "PATCH", "/api/v1/namespaces/default/secrets/x", Some("application/merge-patch+json"), "{").await;
    assert_eq!(status, 404, "patching a missing object");
    server.create_object(path, json!({"kind": "ConfigMap", "apiVersion": "v1", "metadata": {"name": "c"}})).unwrap();
    let (status, _, _) = raw(&client, "PATCH", &format!("{path}/c"), Some("application/merge-patch+json"), "{").await;
    assert_eq!(status, 400);
    let (status, _, _) = raw(
        &client,
        "PATCH",
        &format!("{path}/c"),
        Some("application/json-patch+json"),
        r#"[{"op":"test","path":"/data/x","value":"1"}]"#,
    )
    .await;
    assert_eq!(status, 422);
    let (status, _, _) = raw(&client, "PATCH", &format!("{path}/c"), Some("text/plain"), "{}").await;
    assert_eq!(status, 415);
    let (status, _, _) = raw(
        &client,
        "PATCH",
        &format!("{path}/c"),
        Some("application/apply-patch+yaml"),
        "kind: ConfigMap\napiVersion: v1",
    )
    .await;
    assert_eq!(status, 400, "apply without fieldManager");
    let (status, _, body) = raw(&client, "GET", "/api/v1/nothings", None, "").await;
    assert_eq!((status, body["reason"].as_str()), (404, Some("NotFound")));
    let (status, _, body) = raw(&client, "POST", &format!("{path}/c"), Some("application/json"), "{}").await;
    assert_eq!((status, body["reason"].as_str()), (405, Some("MethodNotAllowed")));
    let (status, _, _) =
        raw(&client, "GET", "/api/v1/namespaces/default/configmaps?watch=true&resourceVersion=abc", None, "").await;
    assert_eq!(status, 400);
}

#[tokio::test]
async fn config_maps_and_secrets_over_one_mebibyte_are_refused_as_by_the_api_server() {
    let server = KubeTestServer::start();
    let client = client(&server).await;
    let cms: Api<ConfigMap> = Api::namespaced(client.clone(), "apps");
    let pp = PostParams::default();
    let mut cm = configmap("big", &[]);
    // Binary data counts decoded: 1 MiB of bytes, 1.33 MiB of base64, is just over with its key.
    cm.binary_data = Some(BTreeMap::from([("b".to_string(), ByteString(vec![7; 1024 * 1024]))]));
    let err = cms.create(&pp, &cm).await;
    let Err(kube::Error::Api(status)) = &err else { panic!("expected an API error, got {err:?}") };
    assert_eq!(status.code, 422);
    assert!(status.message.contains("must have at most 1048576 bytes"), "{}", status.message);
    cm.binary_data = Some(BTreeMap::from([("b".to_string(), ByteString(vec![7; 1024 * 1024 - 1]))]));
    let created = cms.create(&pp, &cm).await.expect("exactly 1 MiB with its key");
    // A patch that grows it past the limit is refused and changes nothing.
    let patch = json!({"data": {"more": "x"}});
    let err = cms.patch("big", &kube::api::PatchParams::default(), &kube::api::Patch::Merge(&patch)).await;
    assert_eq!(code(err).0, 422);
    let now = cms.get("big").await.expect("get");
    assert_eq!(now.metadata.resource_version, created.metadata.resource_version);
    let secrets: Api<Secret> = Api::namespaced(client, "apps");
    let mut s = secret("big");
    s.string_data = Some(BTreeMap::from([("v".to_string(), "x".repeat(1024 * 1024 + 1))]));
    assert_eq!(code(secrets.create(&pp, &s).await).0, 422);
}

//! Discovery, CRD registration, dynamic objects, events, Table output.

use k8s_openapi::api::core::v1::ConfigMap;
use k8s_openapi::api::events::v1::Event as EventV1;
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{Api, DeleteParams, DynamicObject, ListParams, PostParams};
use kube::core::GroupVersionKind;
use kube::discovery::{self, Discovery, Scope};
use kube::runtime::events::{Event, EventType, Recorder, Reporter};
use kube::{CustomResourceExt, Resource};
use kube_test_server::KubeTestServer;
use serde_json::json;

use crate::{Widget, client, code, configmap, install_widgets, raw, widget};

#[tokio::test]
async fn discovery_serves_builtins_and_crds_as_soon_as_they_are_created() {
    let server = KubeTestServer::start();
    let client = client(&server).await;
    let version = client.apiserver_version().await.unwrap();
    assert_eq!((version.major.as_str(), version.minor.as_str()), ("1", "33"));

    let before = Discovery::new(client.clone()).run().await.unwrap();
    for group in ["", "coordination.k8s.io", "events.k8s.io", "apiextensions.k8s.io"] {
        assert!(before.has_group(group), "group {group:?}");
    }
    assert!(!before.has_group("test.kts.io"));
    let (secrets, caps) = before.get("").unwrap().recommended_kind("Secret").unwrap();
    assert_eq!((secrets.plural.as_str(), caps.scope.clone()), ("secrets", Scope::Namespaced));
    assert!(caps.supports_operation("watch") && caps.supports_operation("patch"));

    let crds: Api<CustomResourceDefinition> = Api::all(client.clone());
    let crd = crds.create(&PostParams::default(), &Widget::crd()).await.unwrap();
    let status = crd.status.unwrap();
    let conditions = status.conditions.unwrap();
    for t in ["Established", "NamesAccepted"] {
        assert!(conditions.iter().any(|c| c.type_ == t && c.status == "True"), "{t}");
    }
    assert_eq!(status.accepted_names.unwrap().kind, "Widget");
    assert_eq!(crd.metadata.generation, Some(1));

    // Served right away, with its short name and the status subresource.
    let after = Discovery::new(client.clone()).run().await.unwrap();
    let (ar, caps) = after.get("test.kts.io").unwrap().recommended_kind("Widget").unwrap();
    assert_eq!((ar.plural.as_str(), caps.scope.clone()), ("widgets", Scope::Namespaced));
    assert!(caps.subresources.iter().any(|(sub, _)| sub.plural == "widgets/status" || sub.plural == "status"));
    let (_, _, list) = raw(&client, "GET", "/apis/test.kts.io/v1", None, "").await;
    let resources = list["resources"].as_array().unwrap();
    assert!(resources.iter().any(|r| r["name"] == "widgets" && r["shortNames"] == json!(["wd"])));
    assert!(resources.iter().any(|r| r["name"] == "widgets/status"));
    let (_, _, group) = raw(&client, "GET", "/apis/test.kts.io", None, "").await;
    assert_eq!(group["preferredVersion"]["version"], "v1");

    // A CR through the dynamic API, resolved by discovery.
    let gvk = GroupVersionKind::gvk("test.kts.io", "v1", "Widget");
    let (ar, _) = discovery::pinned_kind(&client, &gvk).await.unwrap();
    let dynamic: Api<DynamicObject> = Api::namespaced_with(client.clone(), "dyn", &ar);
    let obj = DynamicObject::new("d", &ar).data(json!({"spec": {"size": 5}}));
    let created = dynamic.create(&PostParams::default(), &obj).await.unwrap();
    assert_eq!(created.data["spec"]["size"], 5);
    assert_eq!(created.types.unwrap().kind, "Widget");
    let typed: Api<Widget> = Api::namespaced(client.clone(), "dyn");
    assert_eq!(typed.get("d").await.unwrap().spec.size, 5);
    // Unknown kinds/fields are not validated (no schema validation), but kind mismatches are.
    let (status, _, _) = raw(
        &client,
        "POST",
        "/apis/test.kts.io/v1/namespaces/dyn/widgets",
        Some("application/json"),
        r#"{"apiVersion":"test.kts.io/v1","kind":"Gizmo","metadata":{"name":"g"}}"#,
    )
    .await;
    assert_eq!(status, 400);

    // Deleting the CRD deletes its objects and stops serving it.
    crds.delete(&crd.metadata.name.unwrap(), &DeleteParams::default()).await.unwrap();
    assert!(server.list_objects("/apis/test.kts.io/v1/widgets").is_empty());
    let (status, _, _) = raw(&client, "GET", "/apis/test.kts.io/v1/namespaces/dyn/widgets/d", None, "").await;
    assert_eq!(status, 404);
    let gone = Discovery::new(client.clone()).run().await.unwrap();
    assert!(!gone.has_group("test.kts.io"));
    // A recreated CRD starts empty.
    let widgets = install_widgets(&client, "dyn").await;
    assert!(widgets.list(&ListParams::default()).await.unwrap().items.is_empty());
    widgets.create(&PostParams::default(), &widget("again", 1)).await.unwrap();
}

#[tokio::test]
async fn cluster_scoped_and_multi_version_crds() {
    let server = KubeTestServer::start();
    let client = client(&server).await;
    let crd = json!({
        "apiVersion": "apiextensions.k8s.io/v1", "kind": "CustomResourceDefinition",
        "metadata": {"name": "realms.test.kts.io"},
        "spec": {"group": "test.kts.io", "scope": "Cluster",
                 "names": {"plural": "realms", "kind": "Realm", "shortNames": ["rlm"]},
                 "versions": [
                     {"name": "v1beta1", "served": true, "storage": false},
                     {"name": "v1", "served": true, "storage": true, "subresources": {"status": {}}},
                     {"name": "v0", "served": false, "storage": false}]}
    });
    let (status, _, created) = raw(
        &client,
        "POST",
        "/apis/apiextensions.k8s.io/v1/customresourcedefinitions",
        Some("application/json"),
        &crd.to_string(),
    )
    .await;
    assert_eq!(status, 201, "{created}");
    assert_eq!(created["status"]["acceptedNames"]["singular"], "realm");
    assert_eq!(created["status"]["storedVersions"], json!(["v1"]));
    let (_, _, group) = raw(&client, "GET", "/apis/test.kts.io", None, "").await;
    assert_eq!(group["preferredVersion"]["version"], "v1");
    assert_eq!(group["versions"].as_array().unwrap().len(), 2, "v0 is not served");

    let v1 =
        kube::api::ApiResource::from_gvk_with_plural(&GroupVersionKind::gvk("test.kts.io", "v1", "Realm"), "realms");
    let beta = kube::api::ApiResource::from_gvk_with_plural(
        &GroupVersionKind::gvk("test.kts.io", "v1beta1", "Realm"),
        "realms",
    );
    let realms: Api<DynamicObject> = Api::all_with(client.clone(), &v1);
    let r = realms
        .create(&PostParams::default(), &DynamicObject::new("main", &v1).data(json!({"spec": {}})))
        .await
        .unwrap();
    assert!(r.metadata.namespace.is_none());
    // The same object through the other served version.
    let via_beta: Api<DynamicObject> = Api::all_with(client.clone(), &beta);
    let b = via_beta.get("main").await.unwrap();
    assert_eq!(b.types.unwrap().api_version, "test.kts.io/v1beta1");
    assert_eq!(b.metadata.uid, r.metadata.uid);
    // Cluster-scoped: no namespaced path.
    let (status, _, _) = raw(&client, "GET", "/apis/test.kts.io/v1/namespaces/x/realms", None, "").await;
    assert_eq!(status, 404);
    // Invalid CRDs are rejected.
    let mut bad = crd.clone();
    bad["metadata"]["name"] = json!("wrong.test.kts.io");
    let (status, _, body) = raw(
        &client,
        "POST",
        "/apis/apiextensions.k8s.io/v1/customresourcedefinitions",
        Some("application/json"),
        &bad.to_string(),
    )
    .await;
    assert_eq!((status, body["reason"].as_str()), (422, Some("Invalid")));
}

#[tokio::test]
async fn kube_event_recorder_publishes_events_k8s_io_events() {
    let server = KubeTestServer::start();
    let client = client(&server).await;
    let cms: Api<ConfigMap> = Api::namespaced(client.clone(), "ev");
    let cm = cms.create(&PostParams::default(), &configmap("subject", &[])).await.unwrap();
    let recorder =
        Recorder::new(client.clone(), Reporter { controller: "kts-test".into(), instance: Some("0".into()) });
    let ev = Event {
        type_: EventType::Normal,
        reason: "Synced".into(),
        note: Some("ok".into()),
        action: "Sync".into(),
        secondary: None,
    };
    recorder.publish(&ev, &cm.object_ref(&())).await.unwrap();
    recorder.publish(&ev, &cm.object_ref(&())).await.unwrap();
    let events: Api<EventV1> = Api::namespaced(client.clone(), "ev");
    let list = events.list(&ListParams::default()).await.unwrap().items;
    assert_eq!(list.len(), 1, "the second publish patched the series");
    let e = &list[0];
    assert_eq!(e.reason.as_deref(), Some("Synced"));
    assert_eq!(e.series.as_ref().map(|s| s.count), Some(2));
    assert_eq!(e.regarding.as_ref().and_then(|r| r.name.as_deref()), Some("subject"));
    // Core v1 events are served too (separately).
    let core: Api<k8s_openapi::api::core::v1::Event> = Api::namespaced(client.clone(), "ev");
    assert!(core.list(&ListParams::default()).await.unwrap().items.is_empty());
    assert_eq!(code(core.get("nope").await).0, 404);
}

#[tokio::test]
async fn table_output_for_kubectl() {
    let server = KubeTestServer::start();
    let client = client(&server).await;
    let cms: Api<ConfigMap> = Api::namespaced(client.clone(), "t");
    cms.create(&PostParams::default(), &configmap("c", &[("a", "1")])).await.unwrap();
    let req = http::Request::builder()
        .uri("/api/v1/namespaces/t/configmaps")
        .header("accept", "application/json;as=Table;v=v1;g=meta.k8s.io,application/json")
        .body(kube::client::Body::from(Vec::new()))
        .unwrap();
    let resp = client.send(req).await.unwrap();
    let table: serde_json::Value = serde_json::from_slice(&resp.into_body().collect_bytes().await.unwrap()).unwrap();
    assert_eq!(table["kind"], "Table");
    assert_eq!(table["columnDefinitions"][0]["name"], "Name");
    assert_eq!(table["rows"][0]["cells"][0], "c");
    assert_eq!(table["rows"][0]["cells"][1], 1);
    assert_eq!(table["rows"][0]["object"]["metadata"]["namespace"], "t");
    // Without the Table Accept header: the plain list.
    assert_eq!(raw(&client, "GET", "/api/v1/namespaces/t/configmaps", None, "").await.2["kind"], "ConfigMapList");
}

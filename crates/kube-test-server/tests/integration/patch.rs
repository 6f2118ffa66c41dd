//! Merge, strategic-merge, JSON and server-side-apply patches.

use k8s_openapi::api::core::v1::{ConfigMap, Secret};
use kube::api::{Api, Patch, PatchParams, PostParams};
use kube_test_server::KubeTestServer;
use serde_json::json;

use crate::{client, code, configmap, install_widgets, raw, widget};

#[tokio::test]
async fn merge_strategic_and_json_patches() {
    let server = KubeTestServer::start();
    let client = client(&server).await;
    let cms: Api<ConfigMap> = Api::namespaced(client.clone(), "default");
    let created = cms.create(&PostParams::default(), &configmap("c", &[("a", "1"), ("b", "2")])).await.unwrap();
    let pp = PatchParams::default();

    // RFC 7386: null deletes, maps merge.
    let p = cms
        .patch("c", &pp, &Patch::Merge(json!({"data": {"a": null, "c": "3"}, "metadata": {"labels": {"x": "y"}}})))
        .await
        .unwrap();
    assert_eq!(serde_json::to_value(&p.data).unwrap(), json!({"b": "2", "c": "3"}));
    assert_eq!(p.metadata.labels.unwrap()["x"], "y");
    assert_ne!(p.metadata.resource_version, created.metadata.resource_version);

    // A merge patch carrying a stale resourceVersion is a precondition that fails.
    let stale =
        Patch::Merge(json!({"metadata": {"resourceVersion": created.metadata.resource_version}, "data": {"d": "4"}}));
    assert_eq!(code(cms.patch("c", &pp, &stale).await), (409, "Conflict".into()));

    // Strategic merge (treated as a merge patch, directives dropped).
    let p = cms
        .patch("c", &pp, &Patch::Strategic(json!({"data": {"b": null, "e": "5"}, "$setElementOrder/x": [{"a": 1}]})))
        .await
        .unwrap();
    assert_eq!(serde_json::to_value(&p.data).unwrap(), json!({"c": "3", "e": "5"}));

    // RFC 6902.
    let ops: json_patch::Patch = serde_json::from_value(json!([
        {"op": "add", "path": "/data/f", "value": "6"},
        {"op": "remove", "path": "/data/c"},
        {"op": "test", "path": "/data/e", "value": "5"},
    ]))
    .unwrap();
    let p = cms.patch("c", &pp, &Patch::<()>::Json(ops)).await.unwrap();
    assert_eq!(serde_json::to_value(&p.data).unwrap(), json!({"e": "5", "f": "6"}));
    let failing: json_patch::Patch =
        serde_json::from_value(json!([{"op": "test", "path": "/data/e", "value": "nope"}])).unwrap();
    assert_eq!(code(cms.patch("c", &pp, &Patch::<()>::Json(failing)).await).0, 422);

    // Secrets: stringData in a patch is folded too.
    let secrets: Api<Secret> = Api::namespaced(client.clone(), "default");
    secrets.create(&PostParams::default(), &crate::secret("s")).await.unwrap();
    let s = secrets.patch("s", &pp, &Patch::Merge(json!({"stringData": {"k": "v"}}))).await.unwrap();
    assert_eq!(s.data.unwrap()["k"].0, b"v");
    assert!(server.get_object("/api/v1/namespaces/default/secrets/s").unwrap().get("stringData").is_none());
}

#[tokio::test]
async fn server_side_apply_creates_merges_and_drops_fields_a_manager_stopped_applying() {
    let server = KubeTestServer::start();
    let client = client(&server).await;
    let cms: Api<ConfigMap> = Api::namespaced(client.clone(), "default");
    let ssa = PatchParams::apply("ctrl").force();

    let first = json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "c", "labels": {"owner": "ctrl"}},
                       "data": {"a": "1", "b": "2"}});
    let created = cms.patch("c", &ssa, &Patch::Apply(&first)).await.unwrap();
    assert_eq!(serde_json::to_value(&created.data).unwrap(), json!({"a": "1", "b": "2"}));

    // Another writer adds a field; the manager re-applies without "b": "b" goes, "x" (not its field) stays.
    cms.patch("c", &PatchParams::default(), &Patch::Merge(json!({"data": {"x": "other"}}))).await.unwrap();
    let second = json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "c"}, "data": {"a": "10"}});
    let applied = cms.patch("c", &ssa, &Patch::Apply(&second)).await.unwrap();
    assert_eq!(serde_json::to_value(&applied.data).unwrap(), json!({"a": "10", "x": "other"}));
    assert!(applied.metadata.labels.unwrap_or_default().is_empty(), "the label the manager stopped applying is gone");
    assert_eq!(applied.metadata.uid, created.metadata.uid);

    // A second manager's fields survive the first manager's applies.
    let other = json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "c"}, "data": {"o": "1"}});
    cms.patch("c", &PatchParams::apply("other"), &Patch::Apply(&other)).await.unwrap();
    let again = cms.patch("c", &ssa, &Patch::Apply(&second)).await.unwrap();
    assert_eq!(serde_json::to_value(&again.data).unwrap(), json!({"a": "10", "o": "1", "x": "other"}));

    // The body may be YAML; kind/apiVersion are required.
    let (status, _, body) = raw(
        &client,
        "PATCH",
        "/api/v1/namespaces/default/configmaps/y?fieldManager=yaml",
        Some("application/apply-patch+yaml"),
        "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: y\ndata:\n  k: v\n",
    )
    .await;
    assert_eq!((status, body["data"]["k"].as_str()), (201, Some("v")));
    let (status, _, _) = raw(
        &client,
        "PATCH",
        "/api/v1/namespaces/default/configmaps/y?fieldManager=yaml",
        Some("application/apply-patch+yaml"),
        "metadata:\n  name: y\n",
    )
    .await;
    assert_eq!(status, 400);
}

#[tokio::test]
async fn server_side_apply_of_custom_resources_and_their_status() {
    let server = KubeTestServer::start();
    let client = client(&server).await;
    let widgets = install_widgets(&client, "default").await;
    let ssa = PatchParams::apply("widget-ctrl").force();
    let w = widgets.patch("w", &ssa, &Patch::Apply(widget("w", 3))).await.unwrap();
    assert_eq!((w.spec.size, w.metadata.generation), (3, Some(1)));
    let status = json!({"apiVersion": "test.kts.io/v1", "kind": "Widget", "status": {"ready": true}});
    let w = widgets.patch_status("w", &ssa, &Patch::Apply(&status)).await.unwrap();
    assert_eq!((w.status.unwrap().ready, w.metadata.generation), (true, Some(1)));
    // Applying the main resource with a status doesn't touch the status (it is a subresource).
    let mut with_status = widget("w", 4);
    with_status.status = Some(crate::WidgetStatus { ready: false });
    let w = widgets.patch("w", &ssa, &Patch::Apply(&with_status)).await.unwrap();
    assert_eq!((w.spec.size, w.status.unwrap().ready, w.metadata.generation), (4, true, Some(2)));
    // A status apply to a missing object is a 404.
    assert_eq!(code(widgets.patch_status("nope", &ssa, &Patch::Apply(&status)).await).0, 404);
}

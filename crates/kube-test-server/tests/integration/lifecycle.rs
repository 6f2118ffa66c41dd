//! generation, the status subresource, finalizers and deletionTimestamp, ownerReference garbage collection.

use k8s_openapi::api::core::v1::{ConfigMap, Secret};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference;
use kube::api::{Api, DeleteParams, Patch, PatchParams, PostParams, PropagationPolicy};
use kube_test_server::KubeTestServer;
use serde_json::json;

use crate::{WidgetStatus, client, code, configmap, install_widgets, secret, widget};

#[tokio::test]
async fn generation_moves_only_with_the_spec_and_status_is_a_subresource() {
    let server = KubeTestServer::start();
    let client = client(&server).await;
    let widgets = install_widgets(&client, "ns").await;
    let pp = PostParams::default();

    // Status in a create is dropped (status subresource).
    let mut w = widget("w", 1);
    w.status = Some(WidgetStatus { ready: true });
    let w = widgets.create(&pp, &w).await.unwrap();
    assert_eq!(w.metadata.generation, Some(1));
    assert!(w.status.is_none());

    // Status writes change only the status, and not the generation.
    let mut s = w.clone();
    s.status = Some(WidgetStatus { ready: true });
    s.spec.size = 99;
    let s = widgets.replace_status("w", &pp, &s).await.unwrap();
    assert_eq!((s.spec.size, s.status.clone().unwrap().ready, s.metadata.generation), (1, true, Some(1)));
    let s = widgets
        .patch_status("w", &PatchParams::default(), &Patch::Merge(json!({"status": {"ready": false}})))
        .await
        .unwrap();
    assert_eq!((s.status.clone().unwrap().ready, s.metadata.generation), (false, Some(1)));

    // Metadata changes don't bump the generation; main-resource writes ignore status changes.
    let m = widgets
        .patch(
            "w",
            &PatchParams::default(),
            &Patch::Merge(json!({"metadata": {"labels": {"a": "b"}}, "status": {"ready": true}})),
        )
        .await
        .unwrap();
    assert_eq!((m.metadata.generation, m.status.clone().unwrap().ready), (Some(1), false));
    let rv = |o: &crate::Widget| o.metadata.resource_version.clone().unwrap().parse::<u64>().unwrap();
    assert!(rv(&m) > rv(&s));

    // A spec change does.
    let mut u = m.clone();
    u.spec.size = 2;
    let u = widgets.replace("w", &pp, &u).await.unwrap();
    assert_eq!((u.spec.size, u.metadata.generation), (2, Some(2)));
    // Custom resources need a resourceVersion on update (unlike built-ins), and stale ones conflict.
    let mut no_rv = u.clone();
    no_rv.metadata.resource_version = None;
    assert_eq!(code(widgets.replace("w", &pp, &no_rv).await), (422, "Invalid".into()));
    assert_eq!(code(widgets.replace("w", &pp, &m).await), (409, "Conflict".into()));
    // A no-op write changes nothing.
    let again = widgets.replace("w", &pp, &u).await.unwrap();
    assert_eq!(again.metadata.resource_version, u.metadata.resource_version);
}

#[tokio::test]
async fn without_the_status_subresource_status_is_part_of_the_object() {
    let server = KubeTestServer::start();
    let client = client(&server).await;
    let crd = json!({
        "apiVersion": "apiextensions.k8s.io/v1", "kind": "CustomResourceDefinition",
        "metadata": {"name": "gadgets.test.kts.io"},
        "spec": {"group": "test.kts.io", "scope": "Namespaced",
                 "names": {"plural": "gadgets", "singular": "gadget", "kind": "Gadget"},
                 "versions": [{"name": "v1", "served": true, "storage": true,
                               "schema": {"openAPIV3Schema": {"type": "object", "x-kubernetes-preserve-unknown-fields": true}}}]}
    });
    server.create_object("/apis/apiextensions.k8s.io/v1/customresourcedefinitions", crd).unwrap();
    let ar = kube::api::ApiResource {
        group: "test.kts.io".into(),
        version: "v1".into(),
        api_version: "test.kts.io/v1".into(),
        kind: "Gadget".into(),
        plural: "gadgets".into(),
    };
    let gadgets: Api<kube::api::DynamicObject> = Api::namespaced_with(client.clone(), "ns", &ar);
    let g = kube::api::DynamicObject::new("g", &ar).data(json!({"spec": {"x": 1}, "status": {"phase": "new"}}));
    let g = gadgets.create(&PostParams::default(), &g).await.unwrap();
    assert_eq!(g.data["status"]["phase"], "new");
    assert_eq!(g.metadata.generation, Some(1));
    let g =
        gadgets.patch("g", &PatchParams::default(), &Patch::Merge(json!({"status": {"phase": "done"}}))).await.unwrap();
    assert_eq!(g.data["status"]["phase"], "done");
    // Like the real API server: without the subresource, any change outside metadata bumps the generation.
    assert_eq!(g.metadata.generation, Some(2));
    let (status, _, _) =
        crate::raw(&client, "GET", "/apis/test.kts.io/v1/namespaces/ns/gadgets/g/status", None, "").await;
    assert_eq!(status, 404, "no /status without the subresource");
}

#[tokio::test]
async fn finalizers_defer_deletion_until_the_last_one_is_removed() {
    let server = KubeTestServer::start();
    let client = client(&server).await;
    let widgets = install_widgets(&client, "ns").await;
    let mut w = widget("w", 1);
    w.metadata.finalizers = Some(vec!["test.kts.io/cleanup".into(), "test.kts.io/other".into()]);
    let w = widgets.create(&PostParams::default(), &w).await.unwrap();

    let deleting = widgets.delete("w", &DeleteParams::default()).await.unwrap().left().unwrap();
    assert!(deleting.metadata.deletion_timestamp.is_some());
    assert_eq!(deleting.metadata.deletion_grace_period_seconds, Some(0));
    assert_eq!(deleting.metadata.generation, Some(2), "marking for deletion bumps the generation, as in Kubernetes");
    let still = widgets.get("w").await.unwrap();
    assert_eq!(still.metadata.deletion_timestamp, deleting.metadata.deletion_timestamp);
    // Deleting again changes nothing.
    let again = widgets.delete("w", &DeleteParams::default()).await.unwrap().left().unwrap();
    assert_eq!(again.metadata.resource_version, still.metadata.resource_version);

    // No new finalizers on a deleting object.
    let add = Patch::Merge(json!({"metadata": {"finalizers": ["test.kts.io/cleanup", "test.kts.io/other", "new"]}}));
    assert_eq!(code(widgets.patch("w", &PatchParams::default(), &add).await), (422, "Invalid".into()));

    // Removing one finalizer keeps it; removing the last one deletes it.
    let one = Patch::Merge(json!({"metadata": {"finalizers": ["test.kts.io/other"]}}));
    widgets.patch("w", &PatchParams::default(), &one).await.unwrap();
    assert!(widgets.get("w").await.is_ok());
    let mut last = widgets.get("w").await.unwrap();
    last.metadata.finalizers = None;
    widgets.replace("w", &PostParams::default(), &last).await.unwrap();
    assert_eq!(code(widgets.get("w").await).0, 404);
    assert!(server.get_by_uid(w.metadata.uid.as_deref().unwrap()).is_none());
}

fn owned_by(name: &str, owners: &[&ConfigMap]) -> Secret {
    let mut s = secret(name);
    s.metadata.owner_references = Some(
        owners
            .iter()
            .map(|o| OwnerReference {
                api_version: "v1".into(),
                kind: "ConfigMap".into(),
                name: o.metadata.name.clone().unwrap(),
                uid: o.metadata.uid.clone().unwrap(),
                ..Default::default()
            })
            .collect(),
    );
    s
}

#[tokio::test]
async fn owner_references_cascade_on_delete_unless_orphaned() {
    let server = KubeTestServer::start();
    let client = client(&server).await;
    let pp = PostParams::default();
    let cms: Api<ConfigMap> = Api::namespaced(client.clone(), "ns");
    let secrets: Api<Secret> = Api::namespaced(client.clone(), "ns");
    let owner = cms.create(&pp, &configmap("owner", &[])).await.unwrap();
    let other = cms.create(&pp, &configmap("other", &[])).await.unwrap();
    secrets.create(&pp, &owned_by("only", &[&owner])).await.unwrap();
    secrets.create(&pp, &owned_by("shared", &[&owner, &other])).await.unwrap();
    // A grandchild: owned by "only".
    let only = secrets.get("only").await.unwrap();
    let mut grandchild = configmap("grandchild", &[]);
    grandchild.metadata.owner_references = Some(vec![OwnerReference {
        api_version: "v1".into(),
        kind: "Secret".into(),
        name: "only".into(),
        uid: only.metadata.uid.clone().unwrap(),
        ..Default::default()
    }]);
    cms.create(&pp, &grandchild).await.unwrap();
    // A dependent with finalizers is only marked.
    let mut sticky = owned_by("sticky", &[&owner]);
    sticky.metadata.finalizers = Some(vec!["keep".into()]);
    secrets.create(&pp, &sticky).await.unwrap();

    cms.delete("owner", &DeleteParams::background()).await.unwrap();
    // Synchronous cascade: visible right away.
    assert_eq!(code(secrets.get("only").await).0, 404);
    assert_eq!(code(cms.get("grandchild").await).0, 404);
    let shared = secrets.get("shared").await.unwrap();
    let refs = shared.metadata.owner_references.unwrap();
    assert_eq!(refs.len(), 1, "the dangling owner reference is dropped, the live owner kept");
    assert_eq!(refs[0].uid, other.metadata.uid.clone().unwrap());
    assert!(secrets.get("sticky").await.unwrap().metadata.deletion_timestamp.is_some());

    // Orphan keeps dependents (and drops their reference to the deleted owner).
    let keeper = cms.create(&pp, &configmap("keeper", &[])).await.unwrap();
    secrets.create(&pp, &owned_by("orphan", &[&keeper])).await.unwrap();
    cms.delete("keeper", &DeleteParams::orphan()).await.unwrap();
    let orphan = secrets.get("orphan").await.unwrap();
    assert!(orphan.metadata.owner_references.unwrap_or_default().is_empty());

    // Foreground deletes dependents too.
    let fg = cms.create(&pp, &configmap("fg", &[])).await.unwrap();
    secrets.create(&pp, &owned_by("fg-child", &[&fg])).await.unwrap();
    let dp = DeleteParams { propagation_policy: Some(PropagationPolicy::Foreground), ..Default::default() };
    cms.delete("fg", &dp).await.unwrap();
    assert_eq!(code(secrets.get("fg-child").await).0, 404);
    assert_eq!(code(cms.get("fg").await).0, 404);

    // Deleting the namespace deletes its content.
    let ns: Api<k8s_openapi::api::core::v1::Namespace> = Api::all(client.clone());
    ns.delete("ns", &DeleteParams::default()).await.unwrap();
    assert_eq!(code(secrets.get("orphan").await).0, 404);
}

#[tokio::test]
async fn an_object_created_for_an_owner_already_gone_is_collected() {
    let server = KubeTestServer::start();
    let client = client(&server).await;
    let cms: Api<ConfigMap> = Api::namespaced(client.clone(), "ns");
    let secrets: Api<Secret> = Api::namespaced(client, "ns");
    let owner = cms.create(&PostParams::default(), &configmap("owner", &[("a", "1")])).await.unwrap();
    let alive = secrets.create(&PostParams::default(), &owned_by("alive", &[&owner])).await.unwrap();
    assert!(alive.metadata.uid.is_some());
    cms.delete("owner", &DeleteParams::default()).await.unwrap();
    // A reconcile that read the owner before its deletion creates a child afterwards: the collector removes it.
    secrets.create(&PostParams::default(), &owned_by("late", &[&owner])).await.unwrap();
    assert!(secrets.get_opt("late").await.unwrap().is_none());
    assert!(secrets.get_opt("alive").await.unwrap().is_none());
}

//! kubectl against the server: get, apply (client-side and server-side), label, patch, delete.

use std::process::{Command, Output};

use kube_test_server::KubeTestServer;

/// kubectl from the PATH (the repository's `scripts/test` installs it), or $KUBECTL.
fn kubectl() -> String {
    std::env::var("KUBECTL").unwrap_or_else(|_| "kubectl".into())
}

struct Kubectl<'a> {
    server: &'a KubeTestServer,
    cache: tempfile::TempDir,
}

impl Kubectl<'_> {
    fn run(&self, args: &[&str]) -> Output {
        let mut cmd = Command::new(kubectl());
        cmd.arg("--kubeconfig")
            .arg(self.server.kubeconfig_path())
            .arg("--cache-dir")
            .arg(self.cache.path())
            .arg("--request-timeout=10s")
            .args(args)
            .env_remove("KUBECONFIG");
        cmd.output().expect("kubectl on the PATH (the repository's scripts/install-test-tools installs it)")
    }

    /// Runs kubectl, asserts success, returns stdout.
    fn ok(&self, args: &[&str]) -> String {
        let out = self.run(args);
        let (stdout, stderr) = (String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
        assert!(out.status.success(), "kubectl {args:?} failed\nstdout: {stdout}\nstderr: {stderr}");
        stdout.into_owned()
    }

    /// Runs kubectl, asserts failure, returns stderr.
    fn fails(&self, args: &[&str]) -> String {
        let out = self.run(args);
        assert!(!out.status.success(), "kubectl {args:?} should have failed");
        String::from_utf8_lossy(&out.stderr).into_owned()
    }
}

const CRD: &str = r#"
apiVersion: apiextensions.k8s.io/v1
kind: CustomResourceDefinition
metadata:
  name: oauthapplications.kubetoken.io
spec:
  group: kubetoken.io
  scope: Namespaced
  names: {plural: oauthapplications, singular: oauthapplication, kind: OAuthApplication, shortNames: [oapp]}
  versions:
  - name: v1alpha1
    served: true
    storage: true
    subresources: {status: {}}
    schema:
      openAPIV3Schema: {type: object, x-kubernetes-preserve-unknown-fields: true}
    additionalPrinterColumns:
    - {name: Client, type: string, jsonPath: .spec.clientId}
    - {name: Age, type: date, jsonPath: .metadata.creationTimestamp}
"#;

fn app(client_id: &str) -> String {
    format!(
        r#"
apiVersion: kubetoken.io/v1alpha1
kind: OAuthApplication
metadata:
  name: shop
  namespace: shop
  labels: {{app: shop}}
spec:
  clientId: {client_id}
---
apiVersion: v1
kind: Secret
metadata:
  name: shop-client
  namespace: shop
stringData:
  secret: hunter2
"#
    )
}

#[test]
fn kubectl_get_apply_label_patch_delete() {
    let server = KubeTestServer::start();
    let k = Kubectl { server: &server, cache: tempfile::tempdir().unwrap() };
    let dir = tempfile::tempdir().unwrap();
    let crd = dir.path().join("crd.yaml");
    std::fs::write(&crd, CRD).unwrap();
    let manifest = dir.path().join("app.yaml");

    assert!(k.ok(&["get", "namespaces"]).contains("default"));
    assert!(k.run(&["get", "secrets", "-n", "shop"]).status.success());
    // Imperative creates send protobuf bodies.
    k.ok(&["create", "secret", "generic", "imperative", "-n", "shop", "--from-literal=k=v"]);
    k.ok(&["create", "configmap", "settings", "-n", "shop", "--from-literal=a=b"]);
    k.ok(&["create", "namespace", "made-by-kubectl"]);
    assert_eq!(server.get_object("/api/v1/namespaces/shop/secrets/imperative").unwrap()["data"]["k"], "dg==");
    assert_eq!(server.get_object("/api/v1/namespaces/shop/configmaps/settings").unwrap()["data"]["a"], "b");
    assert!(k.ok(&["get", "secrets", "-n", "shop"]).contains("imperative"));
    assert!(k.ok(&["get", "ns"]).contains("made-by-kubectl"));
    // The CR type is unknown until the CRD exists.
    assert!(k.fails(&["get", "oauthapplications"]).contains("oauthapplications"));

    assert!(k.ok(&["apply", "--validate=false", "-f", crd.to_str().unwrap()]).contains("created"));
    std::fs::write(&manifest, app("shop-app")).unwrap();
    let out = k.ok(&["apply", "--validate=false", "-f", manifest.to_str().unwrap()]);
    assert!(out.contains("oauthapplication.kubetoken.io/shop created"), "{out}");
    assert!(out.contains("secret/shop-client created"), "{out}");

    let table = k.ok(&["get", "oauthapplications", "-n", "shop"]);
    assert!(table.contains("CLIENT") && table.contains("shop-app"), "{table}");
    assert!(k.ok(&["get", "oapp", "-A"]).contains("shop"));
    let secret = k.ok(&["get", "secret", "shop-client", "-n", "shop", "-o", "jsonpath={.data.secret}"]);
    assert_eq!(secret, "aHVudGVyMg==");
    assert!(server.get_object("/api/v1/namespaces/shop/secrets/shop-client").unwrap().get("stringData").is_none());

    // Re-apply with a change: client-side apply PATCHes with the last-applied annotation.
    std::fs::write(&manifest, app("shop-app-2")).unwrap();
    let out = k.ok(&["apply", "--validate=false", "-f", manifest.to_str().unwrap()]);
    assert!(out.contains("oauthapplication.kubetoken.io/shop configured"), "{out}");
    let stored = server.get_object("/apis/kubetoken.io/v1alpha1/namespaces/shop/oauthapplications/shop").unwrap();
    assert_eq!(stored["spec"]["clientId"], "shop-app-2");
    assert_eq!(stored["metadata"]["generation"], 2);
    assert!(stored["metadata"]["annotations"]["kubectl.kubernetes.io/last-applied-configuration"].is_string());
    let out = k.ok(&["apply", "--validate=false", "-f", manifest.to_str().unwrap()]);
    assert!(out.contains("oauthapplication.kubetoken.io/shop unchanged"), "{out}");

    // Server-side apply, label, patch (also the status subresource), selectors.
    let out = k.ok(&["apply", "--validate=false", "--server-side", "-f", manifest.to_str().unwrap()]);
    assert!(out.contains("serverside-applied"), "{out}");
    k.ok(&["label", "oapp", "shop", "-n", "shop", "tier=gold"]);
    assert!(k.ok(&["get", "oapp", "-n", "shop", "-l", "tier=gold", "-o", "name"]).contains("shop"));
    assert!(!k.ok(&["get", "oapp", "-n", "shop", "-l", "tier!=gold", "-o", "name"]).contains("shop"));
    k.ok(&[
        "patch",
        "oapp",
        "shop",
        "-n",
        "shop",
        "--type=json",
        "-p",
        r#"[{"op":"replace","path":"/spec/clientId","value":"x"}]"#,
    ]);
    k.ok(&[
        "patch",
        "oapp",
        "shop",
        "-n",
        "shop",
        "--type=merge",
        "--subresource=status",
        "-p",
        r#"{"status":{"ready":true}}"#,
    ]);
    let stored = server.get_object("/apis/kubetoken.io/v1alpha1/namespaces/shop/oauthapplications/shop").unwrap();
    assert_eq!((stored["spec"]["clientId"].as_str(), stored["status"]["ready"].as_bool()), (Some("x"), Some(true)));
    assert_eq!(stored["metadata"]["generation"], 3);

    // Delete (kubectl waits for the object to be gone).
    let out = k.ok(&["delete", "-f", manifest.to_str().unwrap()]);
    assert!(out.contains("deleted"), "{out}");
    assert!(server.get_object("/apis/kubetoken.io/v1alpha1/namespaces/shop/oauthapplications/shop").is_none());
    assert!(server.get_object("/api/v1/namespaces/shop/secrets/shop-client").is_none());
    assert!(k.ok(&["get", "oapp", "-n", "shop"]).is_empty());
    k.ok(&["delete", "-f", crd.to_str().unwrap()]);
    assert!(k.fails(&["get", "oauthapplications"]).contains("oauthapplications"));
}

fn webhook_configuration(timeout: u32, ca_bundle: &str) -> String {
    format!(
        r#"
apiVersion: admissionregistration.k8s.io/v1
kind: MutatingWebhookConfiguration
metadata:
  name: kubetoken
webhooks:
- name: inject.kubetoken.io
  admissionReviewVersions: [v1]
  sideEffects: None
  timeoutSeconds: {timeout}
  clientConfig:
    caBundle: {ca_bundle}
    service: {{namespace: kubetoken, name: kubetoken-webhook, path: /mutate}}
  rules:
  - {{operations: [CREATE], apiGroups: [""], apiVersions: [v1], resources: [pods]}}
  objectSelector:
    matchExpressions: [{{key: kubetoken.io/inject, operator: Exists}}]
- name: other.kubetoken.io
  admissionReviewVersions: [v1]
  sideEffects: None
  clientConfig:
    url: https://127.0.0.1:1/other
  rules:
  - {{operations: [CREATE], apiGroups: [apps], apiVersions: [v1], resources: [deployments]}}
"#
    )
}

#[test]
fn kubectl_applies_and_lists_webhook_configurations() {
    let server = KubeTestServer::start();
    let k = Kubectl { server: &server, cache: tempfile::tempdir().unwrap() };
    let dir = tempfile::tempdir().unwrap();
    let manifest = dir.path().join("webhook.yaml");
    let path = "/apis/admissionregistration.k8s.io/v1/mutatingwebhookconfigurations/kubetoken";

    let resources = k.ok(&["api-resources", "--api-group=admissionregistration.k8s.io"]);
    assert!(resources.contains("mutatingwebhookconfigurations"), "{resources}");
    assert!(resources.contains("validatingwebhookconfigurations"), "{resources}");

    std::fs::write(&manifest, webhook_configuration(5, "QUJD")).unwrap();
    let out = k.ok(&["apply", "--validate=false", "-f", manifest.to_str().unwrap()]);
    assert!(out.contains("created"), "{out}");
    // Client-side apply of a change: a strategic merge patch of one webhook (merged by name).
    std::fs::write(&manifest, webhook_configuration(7, "REVG")).unwrap();
    let out = k.ok(&["apply", "--validate=false", "-f", manifest.to_str().unwrap()]);
    assert!(out.contains("configured"), "{out}");
    let stored = server.get_object(path).unwrap();
    let hooks = stored["webhooks"].as_array().unwrap();
    assert_eq!(hooks.len(), 2);
    assert_eq!(
        (hooks[0]["timeoutSeconds"].as_i64(), hooks[0]["clientConfig"]["caBundle"].as_str()),
        (Some(7), Some("REVG"))
    );
    assert_eq!(hooks[0]["failurePolicy"], "Fail", "defaults survive the patch");
    assert_eq!(hooks[1]["name"], "other.kubetoken.io");
    assert_eq!(stored["metadata"]["generation"], 2);

    let table = k.ok(&["get", "mutatingwebhookconfigurations"]);
    assert!(table.contains("WEBHOOKS") && table.contains("kubetoken"), "{table}");
    // A merge patch, as `kubectl patch --type=merge` sends it, replaces the list.
    k.ok(&["patch", "mutatingwebhookconfiguration", "kubetoken", "--type=merge", "-p", r#"{"webhooks": []}"#]);
    assert_eq!(server.get_object(path).unwrap().get("webhooks").and_then(|w| w.as_array()).map_or(0, Vec::len), 0);
    k.ok(&["delete", "mutatingwebhookconfiguration", "kubetoken"]);
    assert!(server.get_object(path).is_none());
}

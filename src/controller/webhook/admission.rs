//! The admission webhook's decision for one AdmissionReview (admission.k8s.io/v1): pure. A Pod labelled
//! `kubetoken.io/inject: <application>` gets the mutation `kubetoken inject` makes (the same function), as a JSON
//! Patch; anything else is admitted unchanged. The HTTP handler looks the application up and calls these.

use serde::Deserialize;
use serde_json::{Value, json};

use crate::inject::{InjectOptions, inject_pod_spec};

/// The label that opts a pod in; its value names the OAuthApplication (in the pod's namespace).
pub const INJECT_LABEL: &str = "kubetoken.io/inject";
/// An annotation naming a Secret whose key `uri` is a PostgreSQL URL: the sidecar keeps the token state there
/// (`kubetoken inject --postgres-secret`).
pub const POSTGRES_SECRET_ANNOTATION: &str = "kubetoken.io/postgres-secret";
/// An annotation naming a Secret whose key `ca.crt` is that database server's CA: the sidecar verifies the server
/// (`kubetoken inject --postgres-ca-secret`).
pub const POSTGRES_CA_SECRET_ANNOTATION: &str = "kubetoken.io/postgres-ca-secret";
/// Annotation on a pod (template) naming a ConfigMap whose `ca.crt` the sidecar trusts for identity providers' key
/// sets (`kubetoken inject --issuer-ca-configmap`).
pub const ISSUER_CA_CONFIG_MAP_ANNOTATION: &str = "kubetoken.io/issuer-ca-configmap";

/// The pod spec fields the mutation may change: the patch replaces exactly these when they changed.
const MUTATED_FIELDS: [&str; 4] = ["automountServiceAccountToken", "volumes", "initContainers", "containers"];

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct AdmissionReview {
    pub api_version: String,
    pub kind: String,
    pub request: Option<AdmissionRequest>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct AdmissionRequest {
    pub uid: String,
    pub kind: GroupVersionKind,
    #[serde(default)]
    pub namespace: Option<String>,
    pub operation: String,
    #[serde(default)]
    pub object: Option<Value>,
}

#[derive(Debug, Deserialize)]
pub struct GroupVersionKind {
    #[serde(default)]
    pub group: String,
    pub version: String,
    pub kind: String,
}

/// Why a pod is refused: the API server shows the message to whoever created it (a ReplicaSet's events, kubectl).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    pub code: u16,
    pub message: String,
}

impl Refusal {
    pub fn new(code: u16, message: impl Into<String>) -> Self {
        Self { code, message: message.into() }
    }
}

/// What a review asks of kubetoken.
#[derive(Debug, PartialEq)]
pub enum Request<'a> {
    /// Not an opted-in Pod CREATE: admitted unchanged.
    NotOurs,
    /// An opted-in Pod: inject the sidecar of `application`.
    Inject { namespace: &'a str, application: &'a str, pod: &'a Value },
}

/// Parses a review body; an error is for the HTTP layer (400: the API server counts it as a failed call).
pub fn parse(body: &[u8]) -> Result<AdmissionReview, String> {
    let review: AdmissionReview = serde_json::from_slice(body).map_err(|e| format!("not an AdmissionReview: {e}"))?;
    if review.api_version != "admission.k8s.io/v1" || review.kind != "AdmissionReview" {
        return Err(format!(
            "an AdmissionReview of admission.k8s.io/v1 is expected, not {} {}",
            review.kind, review.api_version
        ));
    }
    if review.request.is_none() {
        return Err("the AdmissionReview has no request".into());
    }
    Ok(review)
}

/// Whether `name` can name an OAuthApplication (a DNS subdomain), so it is safe in Secret names and messages.
fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 253
        && name.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.')
        && name.starts_with(|c: char| c.is_ascii_alphanumeric())
        && name.ends_with(|c: char| c.is_ascii_alphanumeric())
}

/// Decides what a request is. Pods are injected on CREATE only (a pod's containers cannot change afterwards).
pub fn classify(request: &AdmissionRequest) -> Result<Request<'_>, Refusal> {
    let is_pod = request.kind.group.is_empty() && request.kind.version == "v1" && request.kind.kind == "Pod";
    if !is_pod || request.operation != "CREATE" {
        return Ok(Request::NotOurs);
    }
    let Some(pod) = request.object.as_ref() else { return Ok(Request::NotOurs) };
    let Some(label) = pod["metadata"]["labels"].get(INJECT_LABEL) else { return Ok(Request::NotOurs) };
    let application = label.as_str().unwrap_or_default();
    if !valid_name(application) {
        return Err(Refusal::new(
            400,
            format!("the label {INJECT_LABEL} must name an OAuthApplication in the pod's namespace, not {label}"),
        ));
    }
    let namespace = request.namespace.as_deref().or_else(|| pod["metadata"]["namespace"].as_str()).unwrap_or_default();
    if namespace.is_empty() {
        return Err(Refusal::new(400, "the pod's namespace is not known"));
    }
    Ok(Request::Inject { namespace, application, pod })
}

/// An object (a Secret, a ConfigMap) named by the pod's `annotation`, else by its namespace's default (e.g. the
/// PostgreSQL Secret of a pod's sidecar: `sidecar.namespaces[].postgresSecret` in the chart), else none.
pub fn named_object(
    pod: &Value,
    annotation: &str,
    namespace: &str,
    defaults: &std::collections::BTreeMap<String, String>,
) -> Option<String> {
    pod["metadata"]["annotations"][annotation]
        .as_str()
        .filter(|s| !s.is_empty())
        .or_else(|| defaults.get(namespace).map(String::as_str))
        .map(str::to_string)
}

/// The JSON Patch (RFC 6902) that injects the sidecar into `pod`: one `add` (which replaces) per changed field
/// of its spec. Empty when the pod has the sidecar already.
pub fn injection_patch(pod: &Value, opts: &InjectOptions) -> Result<Vec<Value>, Refusal> {
    let spec = pod.get("spec").filter(|s| s.is_object()).ok_or_else(|| Refusal::new(400, "the pod has no spec"))?;
    let mut yaml: serde_yaml::Value =
        serde_yaml::to_value(spec).map_err(|e| Refusal::new(400, format!("the pod spec: {e}")))?;
    let mapping = yaml.as_mapping_mut().ok_or_else(|| Refusal::new(400, "the pod spec is not an object"))?;
    inject_pod_spec(mapping, opts)
        .map_err(|e| Refusal::new(400, format!("cannot inject the kubetoken sidecar: {e}")))?;
    let injected: Value =
        serde_json::to_value(&yaml).map_err(|e| Refusal::new(500, format!("the injected pod spec: {e}")))?;
    Ok(MUTATED_FIELDS
        .iter()
        .filter(|f| injected.get(**f) != spec.get(**f))
        .map(|f| json!({"op": "add", "path": format!("/spec/{f}"), "value": injected[*f]}))
        .collect())
}

/// The AdmissionReview answered: allowed with the patch (if any), or refused.
pub fn response(uid: &str, outcome: Result<Vec<Value>, Refusal>) -> Value {
    use base64::Engine;
    let response = match outcome {
        Ok(patch) if patch.is_empty() => json!({"uid": uid, "allowed": true}),
        Ok(patch) => json!({
            "uid": uid,
            "allowed": true,
            "patchType": "JSONPatch",
            "patch": base64::engine::general_purpose::STANDARD.encode(Value::Array(patch).to_string()),
        }),
        Err(r) => json!({
            "uid": uid,
            "allowed": false,
            "status": {"code": r.code, "message": r.message, "reason": if r.code == 404 { "NotFound" } else { "BadRequest" }},
        }),
    };
    json!({"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview", "response": response})
}

#[cfg(test)]
mod tests {
    use base64::Engine;

    use super::*;

    fn review(object: Value) -> Vec<u8> {
        json!({
            "apiVersion": "admission.k8s.io/v1",
            "kind": "AdmissionReview",
            "request": {
                "uid": "705ab4f5-6393-11e8-b7cc-42010a800002",
                "kind": {"group": "", "version": "v1", "kind": "Pod"},
                "resource": {"group": "", "version": "v1", "resource": "pods"},
                "namespace": "shop",
                "operation": "CREATE",
                "object": object,
            }
        })
        .to_string()
        .into_bytes()
    }

    fn pod(labels: Value) -> Value {
        json!({
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {"generateName": "shop-app-", "labels": labels},
            "spec": {"containers": [{"name": "app", "image": "shop:1", "env": [{"name": "MODE", "value": "prod"}]}]},
        })
    }

    /// What the API server does with the answer: RFC 6902, applied.
    fn apply(pod: &Value, patch: &[Value]) -> Value {
        let mut out = pod.clone();
        let patch: json_patch::Patch = serde_json::from_value(Value::Array(patch.to_vec())).expect("patch");
        json_patch::patch(&mut out, &patch).expect("applies");
        out
    }

    #[test]
    fn a_labelled_pod_gets_exactly_the_mutation_kubetoken_inject_makes() {
        let body = review(pod(json!({"app": "shop", INJECT_LABEL: "shop"})));
        let review = parse(&body).expect("parse");
        let request = review.request.as_ref().expect("request");
        let Request::Inject { namespace, application, pod } = classify(request).expect("classify") else {
            panic!("not injected")
        };
        assert_eq!((namespace, application), ("shop", "shop"));
        let opts = InjectOptions::new("shop");
        let patch = injection_patch(pod, &opts).expect("patch");
        let patched = apply(pod, &patch);
        // The same as `kubetoken inject` on the same pod.
        let yaml = crate::inject::inject_yaml(&serde_yaml::to_string(pod).expect("yaml"), &opts).expect("inject");
        let expected: Value = serde_yaml::from_str(&yaml).expect("parse");
        assert_eq!(patched, expected);
        assert_eq!(patched["spec"]["initContainers"][0]["name"], "kubetoken");
        assert_eq!(patched["spec"]["automountServiceAccountToken"], false);
        assert_eq!(patched["spec"]["containers"][0]["env"][0]["name"], "MODE", "the app's own env stays first");
        // Injecting the injected pod changes nothing.
        assert_eq!(injection_patch(&patched, &opts).expect("patch"), Vec::<Value>::new());
        // The answer carries the patch, base64, as a JSONPatch.
        let answer = response(&request.uid, Ok(patch.clone()));
        assert_eq!(answer["response"]["uid"], request.uid.as_str());
        assert_eq!(answer["response"]["allowed"], true);
        assert_eq!(answer["response"]["patchType"], "JSONPatch");
        let sent = base64::engine::general_purpose::STANDARD
            .decode(answer["response"]["patch"].as_str().expect("patch"))
            .expect("b64");
        assert_eq!(serde_json::from_slice::<Value>(&sent).expect("json"), Value::Array(patch));
    }

    /// What the webhook receives in a real cluster: the ServiceAccount admission (which runs before mutating
    /// webhooks) has mounted the pod's token into every container. The app's containers must lose it.
    #[test]
    fn the_token_the_service_account_admission_mounted_leaves_the_apps_containers() {
        let mounts = json!([{"name": "kube-api-access-x7k2p", "mountPath": "/var/run/secrets/kubernetes.io/serviceaccount", "readOnly": true}]);
        let admitted = json!({
            "metadata": {"labels": {INJECT_LABEL: "shop"}},
            "spec": {
                "serviceAccountName": "shop",
                "initContainers": [{"name": "migrate", "image": "shop:1", "volumeMounts": mounts}],
                "containers": [{"name": "app", "image": "shop:1", "volumeMounts": [
                    mounts[0].clone(),
                    {"name": "data", "mountPath": "/data"},
                ]}],
                "volumes": [
                    {"name": "data", "emptyDir": {}},
                    {"name": "kube-api-access-x7k2p", "projected": {"sources": [
                        {"serviceAccountToken": {"path": "token", "expirationSeconds": 3607}},
                        {"configMap": {"name": "kube-root-ca.crt"}},
                    ]}},
                ],
            },
        });
        let patched = apply(&admitted, &injection_patch(&admitted, &InjectOptions::new("shop")).expect("patch"));
        let spec = &patched["spec"];
        let volumes: Vec<&str> =
            spec["volumes"].as_array().expect("volumes").iter().filter_map(|v| v["name"].as_str()).collect();
        assert_eq!(volumes, ["data", "kubetoken-api-access"], "the admitted token volume is gone, the sidecar's added");
        assert_eq!(spec["containers"][0]["volumeMounts"], json!([{"name": "data", "mountPath": "/data"}]));
        let migrate =
            spec["initContainers"].as_array().expect("init").iter().find(|c| c["name"] == "migrate").expect("migrate");
        assert_eq!(migrate["volumeMounts"], json!([]), "no container of the app keeps a token");
        let sidecar = &spec["initContainers"][0];
        assert_eq!(sidecar["name"], "kubetoken");
        assert_eq!(sidecar["volumeMounts"][0]["mountPath"], "/var/run/secrets/kubernetes.io/serviceaccount");
    }

    #[test]
    fn a_pod_with_the_hand_written_sidecar_container_is_refused_with_the_reason() {
        let pod = json!({"spec": {"containers": [{"name": "app"}, {"name": "kubetoken", "image": "old"}]}});
        let refusal = injection_patch(&pod, &InjectOptions::new("shop")).expect_err("refused");
        assert_eq!(refusal.code, 400);
        assert!(refusal.message.contains("regular container named kubetoken"), "{}", refusal.message);
    }

    #[test]
    fn other_objects_and_operations_and_unlabelled_pods_are_not_ours() {
        let unlabelled = review(pod(json!({"app": "shop"})));
        let r = parse(&unlabelled).expect("parse");
        assert_eq!(classify(r.request.as_ref().expect("request")), Ok(Request::NotOurs));
        for (kind, op) in [("Pod", "UPDATE"), ("Pod", "DELETE"), ("Deployment", "CREATE")] {
            let mut v: Value = serde_json::from_slice(&review(pod(json!({INJECT_LABEL: "shop"})))).expect("json");
            v["request"]["kind"]["kind"] = json!(kind);
            v["request"]["operation"] = json!(op);
            let r = parse(v.to_string().as_bytes()).expect("parse");
            assert_eq!(classify(r.request.as_ref().expect("request")), Ok(Request::NotOurs), "{kind} {op}");
        }
        assert_eq!(
            response("u1", Ok(vec![]))["response"],
            json!({"uid": "u1", "allowed": true}),
            "admitted without a patch"
        );
    }

    #[test]
    fn malformed_reviews_and_labels_are_clear_errors() {
        for (body, needle) in [
            (&b"{"[..], "not an AdmissionReview"),
            (&b"[]"[..], "not an AdmissionReview"),
            (&br#"{"apiVersion":"admission.k8s.io/v1beta1","kind":"AdmissionReview","request":null}"#[..], "v1beta1"),
            (&br#"{"apiVersion":"admission.k8s.io/v1","kind":"AdmissionReview"}"#[..], "no request"),
        ] {
            let err = parse(body).expect_err("refused");
            assert!(err.contains(needle), "{err}");
        }
        for bad in [json!("Shop"), json!(""), json!("shop_app"), json!(7), json!("-shop")] {
            let r = parse(&review(pod(json!({INJECT_LABEL: bad.clone()})))).expect("parse");
            let refusal = classify(r.request.as_ref().expect("request")).expect_err("refused");
            assert_eq!(refusal.code, 400);
            assert!(refusal.message.contains(INJECT_LABEL), "{}", refusal.message);
            let answer = response("u2", Err(refusal));
            assert_eq!(answer["response"]["allowed"], false);
            assert_eq!(answer["response"]["status"]["code"], 400);
        }
        let no_containers = json!({"metadata": {"labels": {INJECT_LABEL: "shop"}}, "spec": {}});
        let refusal = injection_patch(&no_containers, &InjectOptions::new("shop")).expect_err("refused");
        assert!(refusal.message.contains("no containers"), "{}", refusal.message);
        let no_spec = json!({"metadata": {"labels": {INJECT_LABEL: "shop"}}});
        assert_eq!(injection_patch(&no_spec, &InjectOptions::new("shop")).expect_err("refused").code, 400);
    }

    #[test]
    fn the_pod_annotation_names_the_postgres_secret_before_the_namespace_default() {
        let defaults = std::collections::BTreeMap::from([("shop".to_string(), "shop-db-app".to_string())]);
        let plain = json!({"metadata": {"name": "p"}});
        let annotated = json!({"metadata": {"annotations": {POSTGRES_SECRET_ANNOTATION: "other-db"}}});
        let postgres_secret =
            |pod: &Value, namespace: &str| named_object(pod, POSTGRES_SECRET_ANNOTATION, namespace, &defaults);
        assert_eq!(postgres_secret(&plain, "shop").as_deref(), Some("shop-db-app"));
        assert_eq!(postgres_secret(&annotated, "shop").as_deref(), Some("other-db"));
        assert_eq!(postgres_secret(&plain, "blog"), None, "no default: the ConfigMap store");
        let ca = json!({"metadata": {"annotations": {POSTGRES_CA_SECRET_ANNOTATION: "shop-db-ca"}}});
        let none = std::collections::BTreeMap::new();
        assert_eq!(named_object(&ca, POSTGRES_CA_SECRET_ANNOTATION, "shop", &none).as_deref(), Some("shop-db-ca"));
        assert_eq!(named_object(&plain, POSTGRES_CA_SECRET_ANNOTATION, "shop", &none), None);
        let bundle = json!({"metadata": {"annotations": {ISSUER_CA_CONFIG_MAP_ANNOTATION: "corp-ca-bundle"}}});
        assert_eq!(
            named_object(&bundle, ISSUER_CA_CONFIG_MAP_ANNOTATION, "shop", &none).as_deref(),
            Some("corp-ca-bundle")
        );
    }
}

//! `kubetoken inject`: adds the kubetoken sidecar to the pods of workload manifests, as `linkerd inject` and
//! `istioctl kube-inject` do for their proxies.
//!
//! The sidecar is a **native sidecar** (an init container with `restartPolicy: Always`): the kubelet starts it
//! first and starts the app's containers only once its startupProbe passes (the sidecar can issue tokens then), and
//! a Job's pod completes when the app's containers exit. The pod mounts no service-account token
//! (`automountServiceAccountToken: false`); only the sidecar mounts one, projected at the standard path, so the
//! app's containers hold no credential for the API server (and cannot read the signing keys). The app's containers
//! get `CLIENT_ID` and `CLIENT_SECRET` from the application's credentials Secret.
//!
//! Injecting is idempotent: the sidecar and its volume are replaced by name, environment variables the containers
//! already have are left as they are. Every other field of the input stays as it was, in its order (YAML values,
//! whose mappings keep their order).

use serde_json::json;
use serde_yaml::{Mapping, Value};

/// The injected init container's name.
pub const SIDECAR_NAME: &str = "kubetoken";
/// The projected service-account token volume only the sidecar mounts.
pub const TOKEN_VOLUME: &str = "kubetoken-api-access";
/// Where in-cluster clients look for the service-account token, CA and namespace.
const TOKEN_MOUNT_PATH: &str = "/var/run/secrets/kubernetes.io/serviceaccount";
/// The sidecar's health port on the pod IP (the kubelet's probes and Prometheus reach it there).
pub const HEALTH_PORT: u16 = 8081;
const HEALTH_PORT_NAME: &str = "kt-health";

#[derive(Debug, Clone)]
pub struct InjectOptions {
    /// The OAuthApplication the sidecar serves.
    pub application: String,
    /// The sidecar's image.
    pub image: String,
    /// The Secret holding `client_id` and `client_secret` (by default `<application>-credentials`, the one the
    /// controller creates).
    pub credentials_secret: String,
    /// A Secret whose key `uri` is a PostgreSQL URL (CloudNativePG's `<cluster>-app` Secret has one): the sidecar
    /// then keeps the token state there instead of in the application's ConfigMaps.
    pub postgres_secret: Option<String>,
    /// A Secret whose key `ca.crt` is the CA of the PostgreSQL server (CloudNativePG's `<cluster>-ca`): only that key
    /// is mounted into the sidecar, which then verifies the server's certificate and name (`PGSSLMODE=verify-full`).
    pub postgres_ca_secret: Option<String>,
    /// A ConfigMap whose key `ca.crt` holds the CA certificates (PEM) of trusted identity providers behind a private
    /// CA (a trust-manager bundle, say): mounted into the sidecar only, which then trusts them, besides the system's
    /// roots, when it fetches their key sets.
    pub issuer_ca_config_map: Option<String>,
}

impl InjectOptions {
    pub fn new(application: &str) -> Self {
        Self {
            application: application.to_string(),
            image: default_image(),
            credentials_secret: format!("{application}-credentials"),
            postgres_secret: None,
            postgres_ca_secret: None,
            issuer_ca_config_map: None,
        }
    }
}

/// The volume of the identity providers' CA bundle, and where the sidecar reads it.
const ISSUER_CA_VOLUME: &str = "kubetoken-issuer-ca";
const ISSUER_CA_DIR: &str = "/var/run/kubetoken/issuer-ca";

/// The volume of the PostgreSQL CA, and where the sidecar reads it.
const POSTGRES_CA_VOLUME: &str = "kubetoken-postgres-ca";
const POSTGRES_CA_DIR: &str = "/var/run/kubetoken/postgres-ca";

/// The image of this version.
pub fn default_image() -> String {
    format!("ghcr.io/kubetoken/kubetoken:{}", env!("CARGO_PKG_VERSION"))
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum InjectError {
    #[error("document {document}: not valid YAML: {reason}")]
    Yaml { document: usize, reason: String },
    #[error("document {document} ({kind} {name}): {reason}")]
    Shape { document: usize, kind: String, name: String, reason: String },
}

/// Injects the sidecar into every pod of a stream of YAML documents; other kinds pass through unchanged.
pub fn inject_yaml(input: &str, opts: &InjectOptions) -> Result<String, InjectError> {
    let mut out = Vec::new();
    for (i, doc) in serde_yaml::Deserializer::from_str(input).enumerate() {
        let document = i + 1;
        let mut value = <Value as serde::Deserialize>::deserialize(doc)
            .map_err(|e| InjectError::Yaml { document, reason: e.to_string() })?;
        if let Value::Tagged(_) = value {
            return Err(InjectError::Yaml { document, reason: "a tagged value is not a Kubernetes object".into() });
        }
        if value.is_null() {
            continue; // an empty document (a leading or trailing `---`)
        }
        inject_object(&mut value, opts).map_err(|reason| InjectError::Shape {
            document,
            kind: value["kind"].as_str().unwrap_or("?").to_string(),
            name: value["metadata"]["name"].as_str().unwrap_or("?").to_string(),
            reason,
        })?;
        let yaml = serde_yaml::to_string(&value).map_err(|e| InjectError::Yaml { document, reason: e.to_string() })?;
        out.push(yaml);
    }
    Ok(out.join("---\n"))
}

/// Injects into one object: a workload's pod template, a Pod, or each item of a List.
pub fn inject_object(object: &mut Value, opts: &InjectOptions) -> Result<(), String> {
    let kind = object["kind"].as_str().unwrap_or_default().to_string();
    let path: &[&str] = match kind.as_str() {
        "Pod" => &["spec"],
        "Deployment" | "StatefulSet" | "DaemonSet" | "ReplicaSet" | "Job" => &["spec", "template", "spec"],
        "CronJob" => &["spec", "jobTemplate", "spec", "template", "spec"],
        "List" => {
            for item in object.get_mut("items").and_then(Value::as_sequence_mut).into_iter().flatten() {
                inject_object(item, opts)?;
            }
            return Ok(());
        }
        _ => return Ok(()),
    };
    let mut spec = &mut *object;
    for field in path {
        spec = spec.get_mut(*field).ok_or_else(|| format!("no {} in a {kind}", path.join(".")))?;
    }
    let spec = spec.as_mapping_mut().ok_or_else(|| format!("{} is not an object", path.join(".")))?;
    inject_pod_spec(spec, opts)
}

/// The mutation of one pod spec (shared by `kubetoken inject` and the admission webhook).
pub fn inject_pod_spec(spec: &mut Mapping, opts: &InjectOptions) -> Result<(), String> {
    if !spec.get("containers").is_some_and(Value::is_sequence) {
        return Err("the pod has no containers".into());
    }
    let has_regular_sidecar =
        spec.get("containers").and_then(Value::as_sequence).into_iter().flatten().any(|c| c["name"] == SIDECAR_NAME);
    if has_regular_sidecar {
        return Err(format!(
            "the pod already runs a regular container named {SIDECAR_NAME} (the hand-written shape): remove it, the \
             injected native sidecar replaces it"
        ));
    }
    spec.insert("automountServiceAccountToken".into(), Value::Bool(false));
    remove_admitted_token(spec);
    replace_by_name(spec, "volumes", yaml(token_volume()), false)?;
    if let Some(ca) = &opts.postgres_ca_secret {
        if opts.postgres_secret.is_none() {
            return Err("a PostgreSQL CA needs the PostgreSQL Secret too (--postgres-secret)".into());
        }
        // The CA certificate only: CloudNativePG's CA Secret also holds the CA's private key.
        let volume = json!({"name": POSTGRES_CA_VOLUME, "secret": {"secretName": ca, "items": [{"key": "ca.crt", "path": "ca.crt"}]}});
        replace_by_name(spec, "volumes", yaml(volume), false)?;
    }
    if let Some(bundle) = &opts.issuer_ca_config_map {
        let volume = json!({"name": ISSUER_CA_VOLUME, "configMap": {"name": bundle, "items": [{"key": "ca.crt", "path": "ca.crt"}]}});
        replace_by_name(spec, "volumes", yaml(volume), false)?;
    }
    replace_by_name(spec, "initContainers", yaml(sidecar_container(opts)), true)?;
    let env = [("CLIENT_ID", "client_id"), ("CLIENT_SECRET", "client_secret")];
    for container in spec.get_mut("containers").and_then(Value::as_sequence_mut).into_iter().flatten() {
        let container = container.as_mapping_mut().ok_or("a container is not an object")?;
        let vars = list_field(container, "env")?;
        for (name, key) in env {
            if !vars.iter().any(|v| v["name"].as_str() == Some(name)) {
                vars.push(yaml(json!({
                    "name": name,
                    "valueFrom": {"secretKeyRef": {"name": opts.credentials_secret, "key": key}},
                })));
            }
        }
    }
    Ok(())
}

/// Takes out the service-account token the API server's ServiceAccount admission mounted into every container
/// before mutating webhooks run (a projected volume `kube-api-access-*`; setting `automountServiceAccountToken`
/// afterwards does not remove it): the app's containers keep no credential for the API server.
fn remove_admitted_token(spec: &mut Mapping) {
    let is_admitted_token = |v: &Value| {
        v["name"].as_str().is_some_and(|n| n.starts_with("kube-api-access-"))
            && v["projected"]["sources"]
                .as_sequence()
                .is_some_and(|s| s.iter().any(|source| source.get("serviceAccountToken").is_some()))
    };
    let mut removed: Vec<String> = Vec::new();
    if let Some(volumes) = spec.get_mut("volumes").and_then(Value::as_sequence_mut) {
        removed = volumes
            .iter()
            .filter(|v| is_admitted_token(v))
            .filter_map(|v| v["name"].as_str().map(str::to_string))
            .collect();
        volumes.retain(|v| !is_admitted_token(v));
    }
    for list in ["containers", "initContainers"] {
        for container in spec.get_mut(list).and_then(Value::as_sequence_mut).into_iter().flatten() {
            if container["name"] == SIDECAR_NAME {
                continue;
            }
            if let Some(mounts) = container.get_mut("volumeMounts").and_then(Value::as_sequence_mut) {
                mounts.retain(|m| {
                    let name = m["name"].as_str().unwrap_or_default();
                    !removed.iter().any(|r| r == name) && m["mountPath"].as_str() != Some(TOKEN_MOUNT_PATH)
                });
            }
        }
    }
}

/// A JSON value built here, as YAML.
fn yaml(value: serde_json::Value) -> Value {
    serde_yaml::to_value(value).unwrap_or(Value::Null)
}

/// The list `field` of `object`, made empty if missing or null.
fn list_field<'a>(object: &'a mut Mapping, field: &str) -> Result<&'a mut Vec<Value>, String> {
    let list = object.entry(field.into()).or_insert_with(|| Value::Sequence(Vec::new()));
    if list.is_null() {
        *list = Value::Sequence(Vec::new());
    }
    list.as_sequence_mut().ok_or_else(|| format!("{field} is not a list"))
}

/// Puts `item` into the list `field` of `spec` in place of the entry of the same name, or first / last.
fn replace_by_name(spec: &mut Mapping, field: &str, item: Value, first: bool) -> Result<(), String> {
    let list = list_field(spec, field)?;
    match list.iter().position(|v| v["name"] == item["name"]) {
        Some(i) => list[i] = item,
        None if first => list.insert(0, item),
        None => list.push(item),
    }
    Ok(())
}

/// The service-account token, cluster CA and namespace, as the kubelet would mount them, for the sidecar only.
fn token_volume() -> serde_json::Value {
    json!({
        "name": TOKEN_VOLUME,
        "projected": {
            "sources": [
                {"serviceAccountToken": {"path": "token", "expirationSeconds": 3607}},
                {"configMap": {"name": "kube-root-ca.crt", "items": [{"key": "ca.crt", "path": "ca.crt"}]}},
                {"downwardAPI": {"items": [
                    {"path": "namespace", "fieldRef": {"apiVersion": "v1", "fieldPath": "metadata.namespace"}},
                ]}},
            ],
        },
    })
}

/// The sidecar as a native sidecar. Resources from BENCHMARKS.md ("In a cluster"): about 30 MiB resident with
/// 100,000 live keys, 45 MiB at peak under load; a core serves about 600 tokens/s.
fn sidecar_container(opts: &InjectOptions) -> serde_json::Value {
    let mut env = vec![json!({"name": "KUBETOKEN_LOG", "value": "info"})];
    if let Some(secret) = &opts.postgres_secret {
        // From the Secret, never written into the manifest.
        env.push(json!({
            "name": "KUBETOKEN_POSTGRES_URL",
            "valueFrom": {"secretKeyRef": {"name": secret, "key": "uri"}},
        }));
    }
    let mut mounts = vec![json!({"name": TOKEN_VOLUME, "mountPath": TOKEN_MOUNT_PATH, "readOnly": true})];
    if opts.postgres_ca_secret.is_some() {
        // libpq's variables, honoured by kubetoken: they apply to the URL from the Secret, which its operator keeps.
        env.push(json!({"name": "PGSSLMODE", "value": "verify-full"}));
        env.push(json!({"name": "PGSSLROOTCERT", "value": format!("{POSTGRES_CA_DIR}/ca.crt")}));
        mounts.push(json!({"name": POSTGRES_CA_VOLUME, "mountPath": POSTGRES_CA_DIR, "readOnly": true}));
    }
    if opts.issuer_ca_config_map.is_some() {
        env.push(json!({"name": "KUBETOKEN_ISSUER_CA_FILE", "value": format!("{ISSUER_CA_DIR}/ca.crt")}));
        mounts.push(json!({"name": ISSUER_CA_VOLUME, "mountPath": ISSUER_CA_DIR, "readOnly": true}));
    }
    let probe =
        |path: &str, period: u32| json!({"httpGet": {"path": path, "port": HEALTH_PORT_NAME}, "periodSeconds": period});
    let mut startup = probe("/readyz", 1);
    startup["failureThreshold"] = json!(120);
    json!({
        "name": SIDECAR_NAME,
        "image": opts.image,
        // A native sidecar: started before the app's containers, stopped after them, not awaited by a Job.
        "restartPolicy": "Always",
        // The token endpoint stays on the pod's loopback (127.0.0.1:8080); the probes and metrics get a port on the
        // pod IP, where the kubelet reaches them.
        "args": ["sidecar", "--application", opts.application, "--health-listen", format!("0.0.0.0:{HEALTH_PORT}")],
        "env": env,
        "ports": [{"name": HEALTH_PORT_NAME, "containerPort": HEALTH_PORT}],
        // Passes once the sidecar can answer token requests; only then does the kubelet start the app.
        "startupProbe": startup,
        "readinessProbe": probe("/readyz", 5),
        "livenessProbe": probe("/healthz", 10),
        // From measurements: BENCHMARKS.md, "The injected sidecar's resources".
        "resources": {
            "requests": {"cpu": "50m", "memory": "48Mi"},
            "limits": {"cpu": "500m", "memory": "128Mi"},
        },
        "securityContext": {
            "runAsNonRoot": true,
            "runAsUser": 65532,
            "allowPrivilegeEscalation": false,
            "readOnlyRootFilesystem": true,
            "capabilities": {"drop": ["ALL"]},
            "seccompProfile": {"type": "RuntimeDefault"},
        },
        "volumeMounts": mounts,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn j(value: serde_json::Value) -> Value {
        yaml(value)
    }

    const DEPLOYMENT: &str = r#"
apiVersion: apps/v1
kind: Deployment
metadata: {name: shop-app, namespace: default}
spec:
  replicas: 2
  selector: {matchLabels: {app: shop-app}}
  template:
    metadata: {labels: {app: shop-app}}
    spec:
      serviceAccountName: shop
      initContainers:
        - {name: migrate, image: busybox:1.36}
      containers:
        - name: app
          image: busybox:1.36
          env:
            - {name: CLIENT_ID, value: given-by-the-user}
            - {name: OTHER, value: x}
        - {name: second, image: busybox:1.36}
"#;

    fn parsed(yaml: &str) -> Vec<Value> {
        serde_yaml::Deserializer::from_str(yaml)
            .map(|d| <Value as serde::Deserialize>::deserialize(d).expect("yaml"))
            .collect()
    }

    fn injected(input: &str) -> Vec<Value> {
        parsed(&inject_yaml(input, &InjectOptions::new("shop")).expect("inject"))
    }

    #[test]
    fn a_deployment_gets_a_native_sidecar_its_token_volume_and_the_credentials() {
        let docs = injected(DEPLOYMENT);
        let spec = &docs[0]["spec"]["template"]["spec"];
        assert_eq!(spec["automountServiceAccountToken"], Value::Bool(false));
        let init = spec["initContainers"].as_sequence().expect("init");
        assert_eq!(init[0]["name"], SIDECAR_NAME, "the sidecar starts first");
        assert_eq!(init[1]["name"], "migrate");
        assert_eq!(init[0]["restartPolicy"], "Always");
        assert_eq!(init[0]["startupProbe"]["httpGet"]["path"], "/readyz");
        assert_eq!(init[0]["args"][2], "shop");
        assert_eq!(init[0]["volumeMounts"][0]["mountPath"], TOKEN_MOUNT_PATH);
        let volume = &spec["volumes"][0];
        assert_eq!(volume["name"], TOKEN_VOLUME);
        assert_eq!(volume["projected"]["sources"][0]["serviceAccountToken"]["path"], "token");
        // The app's containers: credentials added where missing, the user's own CLIENT_ID kept; no token mount.
        let app = &spec["containers"][0];
        let env = app["env"].as_sequence().expect("env");
        assert_eq!(env.iter().filter(|v| v["name"] == "CLIENT_ID").count(), 1);
        assert_eq!(
            env.iter().find(|v| v["name"] == "CLIENT_ID").map(|v| v["value"].clone()),
            Some(j(json!("given-by-the-user")))
        );
        let secret = env.iter().find(|v| v["name"] == "CLIENT_SECRET").expect("secret");
        assert_eq!(secret["valueFrom"]["secretKeyRef"], j(json!({"name": "shop-credentials", "key": "client_secret"})));
        assert!(app.get("volumeMounts").is_none());
        assert_eq!(spec["containers"][1]["env"].as_sequence().map(Vec::len), Some(2));
        // Nothing else changed.
        assert_eq!(docs[0]["spec"]["replicas"], j(json!(2)));
        assert_eq!(spec["serviceAccountName"], "shop");
    }

    #[test]
    fn an_issuer_ca_config_map_is_mounted_into_the_sidecar_only_and_named_to_it() {
        let opts = InjectOptions { issuer_ca_config_map: Some("corp-ca-bundle".into()), ..InjectOptions::new("shop") };
        let mut spec: Mapping = serde_yaml::from_str("containers: [{name: app, image: app}]").expect("spec");
        inject_pod_spec(&mut spec, &opts).expect("injected");
        let spec = Value::Mapping(spec);
        let volume = spec["volumes"].as_sequence().expect("volumes").iter().find(|v| v["name"] == ISSUER_CA_VOLUME);
        let volume = volume.expect("the CA bundle volume");
        assert_eq!(volume["configMap"]["name"], "corp-ca-bundle");
        assert_eq!(volume["configMap"]["items"][0]["key"], "ca.crt");
        let sidecar = &spec["initContainers"][0];
        let env = sidecar["env"].as_sequence().expect("env");
        let file = env.iter().find(|e| e["name"] == "KUBETOKEN_ISSUER_CA_FILE").expect("the variable");
        assert_eq!(file["value"], "/var/run/kubetoken/issuer-ca/ca.crt");
        let mounts = sidecar["volumeMounts"].as_sequence().expect("mounts");
        assert!(mounts.iter().any(|m| m["name"] == ISSUER_CA_VOLUME && m["readOnly"] == true));
        let app_mounts = spec["containers"][0]["volumeMounts"].as_sequence().cloned().unwrap_or_default();
        assert!(!app_mounts.iter().any(|m| m["name"] == ISSUER_CA_VOLUME), "the app does not get it");
    }

    #[test]
    fn a_postgres_ca_secret_mounts_only_the_ca_certificate_and_makes_the_sidecar_verify_the_server() {
        let opts = InjectOptions {
            postgres_secret: Some("shop-db-app".into()),
            postgres_ca_secret: Some("shop-db-ca".into()),
            ..InjectOptions::new("shop")
        };
        let mut spec: Mapping = serde_yaml::from_str("containers: [{name: app, image: app}]").expect("spec");
        inject_pod_spec(&mut spec, &opts).expect("injected");
        let spec = Value::Mapping(spec);
        let volume = spec["volumes"].as_sequence().expect("volumes").iter().find(|v| v["name"] == POSTGRES_CA_VOLUME);
        let volume = volume.expect("the CA volume");
        assert_eq!(volume["secret"]["secretName"], "shop-db-ca");
        assert_eq!(volume["secret"]["items"], j(json!([{"key": "ca.crt", "path": "ca.crt"}])), "not the CA's key");
        let sidecar = &spec["initContainers"][0];
        let env = sidecar["env"].as_sequence().expect("env");
        let var = |name: &str| env.iter().find(|e| e["name"] == name).map(|e| e["value"].clone());
        assert_eq!(var("PGSSLMODE"), Some(j(json!("verify-full"))));
        assert_eq!(var("PGSSLROOTCERT"), Some(j(json!("/var/run/kubetoken/postgres-ca/ca.crt"))));
        let mounts = sidecar["volumeMounts"].as_sequence().expect("mounts");
        assert!(mounts.iter().any(|m| m["name"] == POSTGRES_CA_VOLUME && m["readOnly"] == true));
        let app_mounts = spec["containers"][0]["volumeMounts"].as_sequence().cloned().unwrap_or_default();
        assert!(!app_mounts.iter().any(|m| m["name"] == POSTGRES_CA_VOLUME), "the app does not get it");
        // Without the database's Secret a CA means nothing: refused with the reason.
        let alone = InjectOptions { postgres_ca_secret: Some("shop-db-ca".into()), ..InjectOptions::new("shop") };
        let mut spec: Mapping = serde_yaml::from_str("containers: [{name: app, image: app}]").expect("spec");
        assert!(inject_pod_spec(&mut spec, &alone).expect_err("refused").contains("--postgres-secret"));
    }

    #[test]
    fn a_postgres_secret_gives_the_sidecar_its_url_from_the_secret_only() {
        let opts = InjectOptions { postgres_secret: Some("shop-db-app".into()), ..InjectOptions::new("shop") };
        let out = inject_yaml(DEPLOYMENT, &opts).expect("inject");
        let docs = parsed(&out);
        let sidecar = &docs[0]["spec"]["template"]["spec"]["initContainers"][0];
        let env = sidecar["env"].as_sequence().expect("env");
        let url = env.iter().find(|e| e["name"] == "KUBETOKEN_POSTGRES_URL").expect("the URL");
        assert_eq!(url["valueFrom"]["secretKeyRef"]["name"], "shop-db-app");
        assert_eq!(url["valueFrom"]["secretKeyRef"]["key"], "uri");
        assert!(!out.contains("postgres://"), "no URL in the manifest");
        let plain = inject_yaml(DEPLOYMENT, &InjectOptions::new("shop")).expect("inject");
        assert!(!plain.contains("KUBETOKEN_POSTGRES_URL"), "only when asked");
    }

    #[test]
    fn the_input_keeps_its_order_and_its_fields() {
        let out = inject_yaml(DEPLOYMENT, &InjectOptions::new("shop")).expect("inject");
        assert!(out.starts_with("apiVersion: apps/v1\nkind: Deployment\nmetadata:\n  name: shop-app\n"), "{out}");
        let spec_at = |key: &str| out.find(&format!("\n      {key}:")).expect(key);
        assert!(spec_at("serviceAccountName") < spec_at("initContainers"));
        assert!(spec_at("initContainers") < spec_at("containers"));
    }

    #[test]
    fn injecting_twice_equals_injecting_once() {
        let once = inject_yaml(DEPLOYMENT, &InjectOptions::new("shop")).expect("once");
        let twice = inject_yaml(&once, &InjectOptions::new("shop")).expect("twice");
        assert_eq!(once, twice);
        // Another application's sidecar replaces the first, it is not added beside it.
        let other = parsed(&inject_yaml(&once, &InjectOptions::new("kiosk")).expect("other"));
        let init = other[0]["spec"]["template"]["spec"]["initContainers"].as_sequence().expect("init").clone();
        assert_eq!(init.iter().filter(|c| c["name"] == SIDECAR_NAME).count(), 1);
        assert_eq!(init[0]["args"][2], "kiosk");
    }

    #[test]
    fn every_pod_bearing_kind_is_injected_and_other_kinds_pass_through() {
        let pod = "kind: Pod\nmetadata: {name: p}\nspec: {containers: [{name: a, image: x}]}\n";
        let job = "kind: Job\nmetadata: {name: j}\nspec: {template: {spec: {restartPolicy: Never, containers: [{name: a, image: x}]}}}\n";
        let cron = "kind: CronJob\nmetadata: {name: c}\nspec: {schedule: '* * * * *', jobTemplate: {spec: {template: {spec: {containers: [{name: a, image: x}]}}}}}\n";
        let service = "kind: Service\nmetadata: {name: s}\nspec: {ports: [{port: 80}]}\n";
        let list = format!(
            "kind: List\nitems:\n  - {}",
            "{kind: Pod, metadata: {name: q}, spec: {containers: [{name: a, image: x}]}}\n"
        );
        let input = [pod, job, cron, service, &list].join("---\n");
        let docs = injected(&format!("---\n{input}---\n"));
        assert_eq!(docs.len(), 5, "empty documents are dropped, the others kept in order");
        let sidecar = |spec: &Value| spec["initContainers"][0]["name"] == SIDECAR_NAME;
        assert!(sidecar(&docs[0]["spec"]));
        assert!(sidecar(&docs[1]["spec"]["template"]["spec"]));
        assert_eq!(docs[1]["spec"]["template"]["spec"]["restartPolicy"], "Never");
        assert!(sidecar(&docs[2]["spec"]["jobTemplate"]["spec"]["template"]["spec"]));
        let service_in: Value = serde_yaml::from_str(service).expect("service");
        assert_eq!(docs[3], service_in, "a Service passes through unchanged");
        assert!(sidecar(&docs[4]["items"][0]["spec"]));
    }

    #[test]
    fn broken_input_is_a_clear_error() {
        let opts = InjectOptions::new("shop");
        let err = inject_yaml("kind: Pod\nspec: [unclosed\n", &opts).expect_err("broken yaml");
        assert!(matches!(err, InjectError::Yaml { document: 1, .. }), "{err}");
        let err = inject_yaml("kind: Pod\nmetadata: {name: p}\nspec: {containers: [{name: a}]}\n---\nkind: Deployment\nmetadata: {name: d}\nspec: {}\n", &opts)
            .expect_err("no template");
        assert_eq!(err.to_string(), "document 2 (Deployment d): no spec.template.spec in a Deployment");
        let err =
            inject_yaml("kind: Pod\nmetadata: {name: p}\nspec: {containers: 3}\n", &opts).expect_err("containers");
        assert!(err.to_string().contains("the pod has no containers"), "{err}");
    }
}

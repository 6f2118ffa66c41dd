//! Mutating admission webhooks, called on CREATE as kube-apiserver calls them, and the defaulting and validation of
//! the webhook configuration objects.
//!
//! For a create, every MutatingWebhookConfiguration (by name) and every webhook in it (in order) is matched against
//! the request (`rules`, `namespaceSelector`, `objectSelector`), called over HTTPS with an `admission.k8s.io/v1`
//! AdmissionReview, and its JSON patch applied: the next webhook sees the patched object. The calls are made without
//! the store's lock, so a webhook can call the API server meanwhile.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use base64::Engine as _;
use http_body_util::{BodyExt as _, Full, Limited};
use hyper::body::Bytes;
use hyper::header;
use rustls::pki_types::pem::PemObject as _;
use rustls::pki_types::{CertificateDer, ServerName};
use serde_json::{Map, Value, json};

use crate::error::ApiError;
use crate::http::Shared;
use crate::selector::LabelSelector;
use crate::store::{is_dns_subdomain, meta_str, prepare_create};
use crate::types::ResourceType;
use crate::util::new_uid;

/// The largest webhook response read.
const MAX_RESPONSE: usize = 16 * 1024 * 1024;
/// `timeoutSeconds` when the webhook doesn't say.
const DEFAULT_TIMEOUT_SECONDS: u64 = 10;

/// One call of a mutating webhook, as [`crate::KubeTestServer::webhook_calls`] lists them.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WebhookCall {
    /// The MutatingWebhookConfiguration's name.
    pub configuration: String,
    /// The webhook's name (`webhooks[].name`).
    pub webhook: String,
    /// The operation: `CREATE`.
    pub operation: String,
    /// The resource, as in messages: `pods`, `deployments.apps`.
    pub resource: String,
    /// The object's namespace (empty for a cluster-scoped object).
    pub namespace: String,
    /// The object's name (empty when it is created with `generateName`).
    pub name: String,
    /// How long the call took.
    pub duration: Duration,
    /// What came of it.
    pub outcome: WebhookOutcome,
}

/// What came of a webhook call.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum WebhookOutcome {
    /// `allowed: true`; `patched`: a non-empty JSON patch was applied to the object.
    Allowed {
        /// Whether the object was patched.
        patched: bool,
    },
    /// `allowed: false`: the create was refused with this code and message.
    Denied {
        /// The HTTP status answered.
        code: u16,
        /// The message answered (`admission webhook "NAME" denied the request: ...`).
        message: String,
    },
    /// The call failed (connection, TLS, timeout, HTTP status, malformed response), or its patch could not be
    /// applied. `ignored`: `failurePolicy: Ignore` let the create go on as if the webhook had not matched.
    Failed {
        /// The error, as in the refusal's message (`failed calling webhook "NAME": ...`).
        message: String,
        /// Whether the failure was ignored.
        ignored: bool,
    },
}

/// A create, as admission sees it.
pub(crate) struct CreateRequest<'a> {
    pub rt: &'a ResourceType,
    /// The URL's namespace.
    pub namespace: Option<&'a str>,
    pub dry_run: bool,
    /// The CreateOptions (PatchOptions for a server-side apply that creates) the AdmissionReview carries.
    pub options: Value,
}

/// One webhook of a configuration (as stored: defaulted and validated).
struct Webhook {
    configuration: String,
    name: String,
    spec: Value,
}

impl Webhook {
    fn str(&self, key: &str) -> Option<&str> {
        self.spec.get(key).and_then(Value::as_str)
    }

    fn ignores_failures(&self) -> bool {
        self.str("failurePolicy") == Some("Ignore")
    }

    fn timeout(&self) -> Duration {
        let secs = self.spec.get("timeoutSeconds").and_then(Value::as_u64).unwrap_or(DEFAULT_TIMEOUT_SECONDS);
        Duration::from_secs(secs.clamp(1, 30))
    }

    fn strings(&self, key: &str) -> Vec<&str> {
        self.spec
            .get(key)
            .and_then(Value::as_array)
            .map(|a| a.iter().filter_map(Value::as_str).collect())
            .unwrap_or_default()
    }
}

/// Why a webhook did not simply allow the create.
enum HookError {
    /// kube-apiserver's ErrCallingWebhook: subject to the failure policy.
    Call(String),
    /// `allowed: false`.
    Denied(ApiError),
    /// Refused whatever the failure policy (a patch that cannot be applied), as an InternalError.
    Internal(String),
}

/// Runs mutating admission for a create: returns the object to store (patched by the webhooks), or the refusal.
pub(crate) async fn admit_create(shared: &Shared, req: &CreateRequest<'_>, obj: Value) -> Result<Value, ApiError> {
    if req.rt.is_webhook_configuration() {
        // As in Kubernetes: webhook configurations never go through webhooks (a broken webhook can't lock itself in).
        return Ok(obj);
    }
    let namespace = req.namespace.filter(|_| req.rt.namespaced);
    let (configurations, namespace_labels) = {
        let state = shared.state();
        (state.mutating_webhook_configurations(), namespace.map(|ns| state.namespace_labels(ns)))
    };
    let hooks: Vec<Webhook> = configurations
        .iter()
        .flat_map(|c| {
            let configuration = meta_str(c, "name").unwrap_or_default().to_string();
            c.get("webhooks").and_then(Value::as_array).into_iter().flatten().map(move |spec| Webhook {
                configuration: configuration.clone(),
                name: spec.get("name").and_then(Value::as_str).unwrap_or_default().to_string(),
                spec: spec.clone(),
            })
        })
        .collect();
    if hooks.is_empty() {
        return Ok(obj);
    }
    let mut obj = prepare_create(req.rt, req.namespace, obj)?;
    for hook in &hooks {
        let matched = hook_matches(hook, req.rt, namespace_labels.as_ref(), &obj).map_err(|e| {
            ApiError::internal(format!("failed calling webhook {:?}: invalid webhook selector: {e}", hook.name))
        })?;
        if !matched {
            continue;
        }
        if req.dry_run && !matches!(hook.str("sideEffects"), Some("None" | "NoneOnDryRun")) {
            return Err(ApiError::bad_request(format!("admission webhook {:?} does not support dry run", hook.name)));
        }
        let started = Instant::now();
        let result = call_hook(shared, hook, req, namespace, &obj).await;
        let mut call = WebhookCall {
            configuration: hook.configuration.clone(),
            webhook: hook.name.clone(),
            operation: "CREATE".into(),
            resource: req.rt.qualified(),
            namespace: namespace.unwrap_or_default().to_string(),
            name: meta_str(&obj, "name").unwrap_or_default().to_string(),
            duration: started.elapsed(),
            outcome: WebhookOutcome::Allowed { patched: false },
        };
        let refusal = match result {
            Ok(patched) => {
                call.outcome = WebhookOutcome::Allowed { patched: patched.is_some() };
                if let Some(patched) = patched {
                    obj = patched;
                }
                None
            }
            Err(HookError::Denied(err)) => {
                call.outcome = WebhookOutcome::Denied { code: err.code, message: err.message.clone() };
                Some(err)
            }
            Err(HookError::Call(reason)) => {
                let message = format!("failed calling webhook {:?}: {reason}", hook.name);
                let ignored = hook.ignores_failures();
                tracing::debug!(ignored, "kube-test-server: {message}");
                call.outcome = WebhookOutcome::Failed { message: message.clone(), ignored };
                (!ignored).then(|| ApiError::internal(message))
            }
            Err(HookError::Internal(message)) => {
                call.outcome = WebhookOutcome::Failed { message: message.clone(), ignored: false };
                Some(ApiError::internal(message))
            }
        };
        shared.record_webhook_call(call);
        if let Some(err) = refusal {
            return Err(err);
        }
    }
    Ok(obj)
}

/// kube-apiserver's ShouldCallHook for a create: rules, then namespaceSelector, then objectSelector.
fn hook_matches(
    hook: &Webhook,
    rt: &ResourceType,
    namespace_labels: Option<&Map<String, Value>>,
    obj: &Value,
) -> Result<bool, String> {
    let rules = hook.spec.get("rules").and_then(Value::as_array).map(Vec::as_slice).unwrap_or_default();
    if !rules.iter().any(|r| rule_matches(r, rt)) {
        return Ok(false);
    }
    let namespace_selector = LabelSelector::from_json(hook.spec.get("namespaceSelector").unwrap_or(&Value::Null))?;
    if !namespace_selector.is_empty() {
        let labels = if rt.is_namespace() {
            // A Namespace is matched on its own labels.
            obj.pointer("/metadata/labels").and_then(Value::as_object)
        } else {
            namespace_labels
        };
        // Other cluster-scoped objects are never exempted by a namespaceSelector.
        if (rt.is_namespace() || rt.namespaced) && !namespace_selector.matches_labels(labels) {
            return Ok(false);
        }
    }
    let object_selector = LabelSelector::from_json(hook.spec.get("objectSelector").unwrap_or(&Value::Null))?;
    Ok(object_selector.matches(obj))
}

/// One `rules[]` entry against a create of `rt` (no subresource).
fn rule_matches(rule: &Value, rt: &ResourceType) -> bool {
    let strings = |key: &str| -> Vec<&str> {
        rule.get(key)
            .and_then(Value::as_array)
            .map(|a| a.iter().filter_map(Value::as_str).collect())
            .unwrap_or_default()
    };
    let exact_or_wildcard = |key: &str, want: &str| strings(key).iter().any(|x| *x == "*" || *x == want);
    let scope = match rule.get("scope").and_then(Value::as_str).unwrap_or("*") {
        "*" => true,
        "Namespaced" => rt.namespaced,
        "Cluster" => !rt.namespaced,
        _ => false,
    };
    let resource = strings("resources").iter().any(|r| {
        let (res, sub) = r.split_once('/').unwrap_or((r, ""));
        (res == "*" || res == rt.plural) && (sub == "*" || sub.is_empty())
    });
    scope
        && exact_or_wildcard("operations", "CREATE")
        && exact_or_wildcard("apiGroups", &rt.group)
        && exact_or_wildcard("apiVersions", &rt.version)
        && resource
}

/// The `admission.k8s.io/v1` AdmissionReview sent for a create.
fn review_request(uid: &str, req: &CreateRequest<'_>, namespace: Option<&str>, obj: &Value) -> Value {
    let rt = req.rt;
    let gvk = json!({"group": rt.group, "version": rt.version, "kind": rt.kind});
    let gvr = json!({"group": rt.group, "version": rt.version, "resource": rt.plural});
    let mut request = json!({
        "uid": uid,
        "kind": gvk,
        "resource": gvr,
        "requestKind": gvk,
        "requestResource": gvr,
        "operation": "CREATE",
        // No authentication here: what a cluster admin's kubeconfig (kind, kubeadm) would be seen as.
        "userInfo": {"username": "kubernetes-admin", "groups": ["kubeadm:cluster-admins", "system:authenticated"]},
        "object": obj,
        "oldObject": null,
        "dryRun": req.dry_run,
        "options": req.options,
    });
    // Go's omitempty: no name before generateName has made one.
    if let Some(name) = meta_str(obj, "name").filter(|n| !n.is_empty()) {
        request["name"] = json!(name);
    }
    if let Some(ns) = namespace {
        request["namespace"] = json!(ns);
    }
    json!({"kind": "AdmissionReview", "apiVersion": "admission.k8s.io/v1", "request": request})
}

/// Calls one webhook: the patched object if it sent a non-empty patch.
async fn call_hook(
    shared: &Shared,
    hook: &Webhook,
    req: &CreateRequest<'_>,
    namespace: Option<&str>,
    obj: &Value,
) -> Result<Option<Value>, HookError> {
    if !hook.strings("admissionReviewVersions").contains(&"v1") {
        return Err(HookError::Call(
            "could not create admission objects: webhook does not accept known AdmissionReview versions (v1; \
             kube-test-server does not send v1beta1)"
                .into(),
        ));
    }
    let timeout = hook.timeout();
    let target =
        target(shared, hook, timeout).map_err(|e| HookError::Call(format!("could not get REST client: {e}")))?;
    let tls = tls_config(hook.spec.pointer("/clientConfig/caBundle").and_then(Value::as_str))
        .map_err(|e| HookError::Call(format!("could not get REST client: {e}")))?;
    let uid = new_uid();
    let body = serde_json::to_vec(&review_request(&uid, req, namespace, obj)).unwrap_or_default();
    let (status, bytes) = match tokio::time::timeout(timeout, post(&target, tls, body)).await {
        Ok(Ok(answer)) => answer,
        Ok(Err(e)) => return Err(HookError::Call(format!("failed to call webhook: Post {:?}: {e}", target.url))),
        Err(_) => {
            return Err(HookError::Call(format!(
                "failed to call webhook: Post {:?}: context deadline exceeded",
                target.url
            )));
        }
    };
    if !(200..300).contains(&status) {
        return Err(HookError::Call(format!("failed to call webhook: {}", status_error(status, &bytes))));
    }
    let review: Value = serde_json::from_slice(&bytes)
        .map_err(|e| HookError::Call(format!("failed to call webhook: cannot decode the AdmissionReview: {e}")))?;
    let invalid = |msg: String| HookError::Call(format!("received invalid webhook response: {msg}"));
    let Some(response) = review.get("response").filter(|r| r.is_object()) else {
        return Err(invalid("webhook response was absent".into()));
    };
    let got_uid = response.get("uid").and_then(Value::as_str).unwrap_or_default();
    if got_uid != uid {
        return Err(invalid(format!("expected response.uid={uid:?}, got {got_uid:?}")));
    }
    let (api_version, kind) = (
        review.get("apiVersion").and_then(Value::as_str).unwrap_or_default(),
        review.get("kind").and_then(Value::as_str).unwrap_or_default(),
    );
    if (api_version, kind) != ("admission.k8s.io/v1", "AdmissionReview") {
        return Err(invalid(format!(
            "expected webhook response of admission.k8s.io/v1, Kind=AdmissionReview, got {api_version}, Kind={kind}"
        )));
    }
    let patch = match response.get("patch") {
        None | Some(Value::Null) => Vec::new(),
        Some(Value::String(b64)) => base64::engine::general_purpose::STANDARD.decode(b64).map_err(|e| {
            HookError::Call(format!("failed to call webhook: response.patch: illegal base64 data: {e}"))
        })?,
        Some(_) => return Err(HookError::Call("failed to call webhook: response.patch must be a string".into())),
    };
    let patch_type = response.get("patchType").and_then(Value::as_str);
    match (patch.is_empty(), patch_type) {
        (false, None) => return Err(invalid("webhook returned response.patch but not response.patchType".into())),
        (true, Some(_)) => return Err(invalid("webhook returned response.patchType but not response.patch".into())),
        (_, Some("")) => return Err(invalid("webhook returned invalid response.patchType of \"\"".into())),
        _ => {}
    }
    if response.get("allowed").and_then(Value::as_bool) != Some(true) {
        return Err(HookError::Denied(denied(&hook.name, response.get("status"))));
    }
    if patch.is_empty() {
        return Ok(None);
    }
    let ops: json_patch::Patch = serde_json::from_slice(&patch)
        .map_err(|e| HookError::Call(format!("received undecodable patch in webhook response: {e}")))?;
    if ops.0.is_empty() {
        return Ok(None);
    }
    if patch_type != Some("JSONPatch") {
        return Err(HookError::Call(format!("unsupported patch type {:?}", patch_type.unwrap_or_default())));
    }
    let mut patched = obj.clone();
    json_patch::patch(&mut patched, &ops.0).map_err(|e| HookError::Internal(e.to_string()))?;
    for (what, pointer) in [("apiVersion", "/apiVersion"), ("kind", "/kind"), ("namespace", "/metadata/namespace")] {
        if patched.pointer(pointer) != obj.pointer(pointer) {
            return Err(HookError::Internal(format!(
                "admission webhook {:?} changed the object's {what}, which kube-test-server refuses",
                hook.name
            )));
        }
    }
    Ok(Some(patched))
}

/// kube-apiserver's ToStatusErr: the refusal of `allowed: false`.
fn denied(webhook: &str, status: Option<&Value>) -> ApiError {
    let field = |k: &str| status.and_then(|s| s.get(k)).and_then(Value::as_str).unwrap_or_default();
    let code = status.and_then(|s| s.get("code")).and_then(Value::as_u64).unwrap_or(0).clamp(400, 599) as u16;
    let denied_by = format!("admission webhook {webhook:?} denied the request");
    let message = match (field("message"), field("reason")) {
        ("", "") => format!("{denied_by} without explanation"),
        ("", reason) => format!("{denied_by}: {reason}"),
        (message, _) => format!("{denied_by}: {message}"),
    };
    ApiError::new(code, field("reason"), message)
}

/// client-go's error for a non-2xx answer.
fn status_error(status: u16, body: &[u8]) -> String {
    let parsed: Option<Value> = serde_json::from_slice(body).ok();
    if let Some(message) = parsed
        .as_ref()
        .filter(|v| v.get("kind").and_then(Value::as_str) == Some("Status"))
        .and_then(|v| v.get("message"))
        .and_then(Value::as_str)
    {
        return message.to_string();
    }
    let text: String = String::from_utf8_lossy(body).chars().take(200).collect();
    if text.trim().is_empty() {
        format!("the server responded with the status code {status} but did not return more information")
    } else {
        format!("the server responded with the status code {status}: {:?}", text.trim())
    }
}

/// Where and how to call a webhook.
struct Target {
    /// The URL as messages show it (`https://NAME.NAMESPACE.svc:443/path?timeout=10s`).
    url: String,
    connect: Connect,
    /// The TLS server name: the URL's host, or `NAME.NAMESPACE.svc`.
    server_name: String,
    host_header: String,
    path_and_query: String,
}

enum Connect {
    Addr(SocketAddr),
    Host(String, u16),
    /// A Service without an address (see `KubeTestServer::set_service_address`).
    NoEndpoints(String),
}

fn target(shared: &Shared, hook: &Webhook, timeout: Duration) -> Result<Target, String> {
    // Like client-go, the webhook learns the deadline from the query.
    let timeout_query = format!("timeout={}s", timeout.as_secs());
    let client_config = hook.spec.get("clientConfig").cloned().unwrap_or_default();
    if let Some(url) = client_config.get("url").and_then(Value::as_str) {
        let uri: hyper::Uri = url.parse().map_err(|e| format!("invalid url {url:?}: {e}"))?;
        if uri.scheme_str() != Some("https") {
            return Err(format!("invalid url {url:?}: 'https' is the only allowed URL scheme"));
        }
        let authority = uri.authority().map(|a| a.as_str().to_string()).unwrap_or_default();
        let host = uri.host().unwrap_or_default().trim_start_matches('[').trim_end_matches(']').to_string();
        let path_and_query = format!("{}?{timeout_query}", uri.path());
        return Ok(Target {
            url: format!("https://{authority}{path_and_query}"),
            connect: Connect::Host(host.clone(), uri.port_u16().unwrap_or(443)),
            server_name: host,
            host_header: authority,
            path_and_query,
        });
    }
    let Some(service) = client_config.get("service").filter(|s| s.is_object()) else {
        return Err("the clientConfig has neither url nor service".into());
    };
    let field = |k: &str| service.get(k).and_then(Value::as_str).unwrap_or_default().to_string();
    let (namespace, name) = (field("namespace"), field("name"));
    let path = match field("path") {
        p if p.is_empty() => "/".to_string(),
        p => p,
    };
    let port = service.get("port").and_then(Value::as_u64).unwrap_or(443);
    let server_name = format!("{name}.{namespace}.svc");
    let host_header = format!("{server_name}:{port}");
    let path_and_query = format!("{path}?{timeout_query}");
    let connect = match shared.service_address(&namespace, &name) {
        Some(addr) => Connect::Addr(addr),
        None => Connect::NoEndpoints(name),
    };
    Ok(Target {
        url: format!("https://{host_header}{path_and_query}"),
        connect,
        server_name,
        host_header,
        path_and_query,
    })
}

/// A TLS client trusting exactly the certificates of `caBundle` (base64 of PEM): none when it is absent, so the
/// handshake fails (the test server has no system roots to fall back on).
fn tls_config(ca_bundle: Option<&str>) -> Result<Arc<rustls::ClientConfig>, String> {
    let mut roots = rustls::RootCertStore::empty();
    if let Some(bundle) = ca_bundle.filter(|b| !b.is_empty()) {
        let pem = base64::engine::general_purpose::STANDARD
            .decode(bundle)
            .map_err(|e| format!("unable to load root certificates: {e}"))?;
        for cert in CertificateDer::pem_slice_iter(&pem) {
            let cert = cert.map_err(|e| format!("unable to load root certificates: {e}"))?;
            roots.add(cert).map_err(|e| format!("unable to load root certificates: {e}"))?;
        }
        if roots.is_empty() {
            return Err("unable to load root certificates: unable to parse bytes as PEM block".into());
        }
    }
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(Arc::new(config))
}

/// Aborts the connection task when the call ends (also when it times out).
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// POSTs the review over HTTPS: (status, body).
async fn post(target: &Target, tls: Arc<rustls::ClientConfig>, body: Vec<u8>) -> Result<(u16, Bytes), String> {
    let tcp = match &target.connect {
        Connect::Addr(addr) => {
            tokio::net::TcpStream::connect(addr).await.map_err(|e| format!("dial tcp {addr}: connect: {e}"))?
        }
        Connect::Host(host, port) => tokio::net::TcpStream::connect((host.as_str(), *port))
            .await
            .map_err(|e| format!("dial tcp {host}:{port}: connect: {e}"))?,
        Connect::NoEndpoints(name) => return Err(format!("no endpoints available for service {name:?}")),
    };
    let server_name = ServerName::try_from(target.server_name.clone())
        .map_err(|e| format!("invalid TLS server name {:?}: {e}", target.server_name))?;
    let stream = tokio_rustls::TlsConnector::from(tls)
        .connect(server_name, tcp)
        .await
        .map_err(|e| format!("tls: failed to verify the webhook's certificate: {e}"))?;
    let (mut sender, connection) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream)).await.map_err(|e| e.to_string())?;
    let _connection = AbortOnDrop(tokio::spawn(async move {
        let _ = connection.await;
    }));
    let request = hyper::Request::post(target.path_and_query.as_str())
        .header(header::HOST, target.host_header.as_str())
        .header(header::CONTENT_TYPE, "application/json")
        .header(header::ACCEPT, "application/json, */*")
        .header(header::USER_AGENT, "kube-apiserver-admission")
        .body(Full::new(Bytes::from(body)))
        .map_err(|e| e.to_string())?;
    let response = sender.send_request(request).await.map_err(|e| e.to_string())?;
    let status = response.status().as_u16();
    let body = Limited::new(response.into_body(), MAX_RESPONSE).collect().await.map_err(|e| e.to_string())?.to_bytes();
    Ok((status, body))
}

/// Kubernetes' defaulting and validation of a MutatingWebhookConfiguration or ValidatingWebhookConfiguration.
pub(crate) fn default_and_validate_configuration(rt: &ResourceType, obj: &mut Value) -> Result<(), ApiError> {
    let mutating = rt.plural == "mutatingwebhookconfigurations";
    let name = meta_str(obj, "name").unwrap_or_default().to_string();
    let mut errors = Vec::new();
    match obj.get_mut("webhooks") {
        None | Some(Value::Null) => {}
        Some(Value::Array(hooks)) => {
            let mut names = Vec::new();
            for (i, hook) in hooks.iter_mut().enumerate() {
                let path = format!("webhooks[{i}]");
                match hook {
                    Value::Object(h) => validate_webhook(&path, h, mutating, &mut names, &mut errors)?,
                    _ => errors.push(format!("{path}: Invalid value: must be an object")),
                }
            }
        }
        Some(_) => return Err(ApiError::bad_request("webhooks: must be a list")),
    }
    if errors.is_empty() {
        return Ok(());
    }
    let list = if errors.len() == 1 { errors.remove(0) } else { format!("[{}]", errors.join(", ")) };
    Err(ApiError::invalid(format!("{}.{} {name:?} is invalid: {list}", rt.kind, rt.group)))
}

fn set_default(map: &mut Map<String, Value>, key: &str, value: Value) {
    if map.get(key).is_none_or(Value::is_null) {
        map.insert(key.into(), value);
    }
}

fn validate_webhook(
    path: &str,
    h: &mut Map<String, Value>,
    mutating: bool,
    names: &mut Vec<String>,
    errors: &mut Vec<String>,
) -> Result<(), ApiError> {
    set_default(h, "failurePolicy", json!("Fail"));
    set_default(h, "matchPolicy", json!("Equivalent"));
    set_default(h, "namespaceSelector", json!({}));
    set_default(h, "objectSelector", json!({}));
    set_default(h, "timeoutSeconds", json!(DEFAULT_TIMEOUT_SECONDS));
    if mutating {
        set_default(h, "reinvocationPolicy", json!("Never"));
    }
    if let Some(Value::Array(rules)) = h.get_mut("rules") {
        for rule in rules.iter_mut().filter_map(Value::as_object_mut) {
            set_default(rule, "scope", json!("*"));
        }
    }
    if let Some(Value::Object(service)) = h.get_mut("clientConfig").and_then(|c| c.get_mut("service")) {
        set_default(service, "port", json!(443));
    }

    let str_of = |h: &Map<String, Value>, k: &str| h.get(k).and_then(Value::as_str).map(String::from);
    let name = str_of(h, "name").unwrap_or_default();
    let trimmed = name.strip_suffix('.').unwrap_or(&name);
    if name.is_empty() {
        errors.push(format!("{path}.name: Required value"));
    } else if !is_dns_subdomain(trimmed) || trimmed.split('.').count() < 3 {
        errors.push(format!(
            "{path}.name: Invalid value: {name:?}: should be a domain with at least three segments separated by dots"
        ));
    } else if names.contains(&name) {
        errors.push(format!("{path}.name: Duplicate value: {name:?}"));
    }
    names.push(name);

    validate_client_config(path, h.get("clientConfig"), errors)?;

    let rules = match h.get("rules") {
        None | Some(Value::Null) => Vec::new(),
        Some(Value::Array(rules)) => rules.clone(),
        Some(_) => return Err(ApiError::bad_request(format!("{path}.rules: must be a list"))),
    };
    for (j, rule) in rules.iter().enumerate() {
        let rp = format!("{path}.rules[{j}]");
        for key in ["operations", "apiGroups", "apiVersions", "resources"] {
            let values = rule.get(key).and_then(Value::as_array).cloned().unwrap_or_default();
            if values.is_empty() {
                errors.push(format!("{rp}.{key}: Required value"));
            }
            if key == "operations" {
                for op in &values {
                    if !matches!(op.as_str(), Some("*" | "CREATE" | "UPDATE" | "DELETE" | "CONNECT")) {
                        errors.push(format!(
                            "{rp}.operations: Unsupported value: {op}: supported values: \"*\", \"CONNECT\", \
                             \"CREATE\", \"DELETE\", \"UPDATE\""
                        ));
                    }
                }
            }
        }
        match rule.get("scope").and_then(Value::as_str) {
            Some("*" | "Cluster" | "Namespaced") => {}
            other => errors.push(format!(
                "{rp}.scope: Unsupported value: {:?}: supported values: \"*\", \"Cluster\", \"Namespaced\"",
                other.unwrap_or_default()
            )),
        }
    }

    let mut one_of = |key: &str, allowed: &[&str]| match str_of(h, key) {
        Some(v) if allowed.contains(&v.as_str()) => {}
        v => {
            let supported: Vec<String> = allowed.iter().map(|a| format!("{a:?}")).collect();
            match v {
                None => {
                    errors.push(format!("{path}.{key}: Required value: must specify one of {}", allowed.join(", ")))
                }
                Some(v) => errors.push(format!(
                    "{path}.{key}: Unsupported value: {v:?}: supported values: {}",
                    supported.join(", ")
                )),
            }
        }
    };
    one_of("failurePolicy", &["Fail", "Ignore"]);
    one_of("matchPolicy", &["Equivalent", "Exact"]);
    one_of("sideEffects", &["None", "NoneOnDryRun"]);
    if mutating {
        one_of("reinvocationPolicy", &["IfNeeded", "Never"]);
    }

    let versions: Vec<&str> = h
        .get("admissionReviewVersions")
        .and_then(Value::as_array)
        .map(|a| a.iter().filter_map(Value::as_str).collect())
        .unwrap_or_default();
    if versions.is_empty() {
        errors.push(format!("{path}.admissionReviewVersions: Required value: must specify one of v1, v1beta1"));
    } else if !versions.iter().any(|v| matches!(*v, "v1" | "v1beta1")) {
        errors.push(format!(
            "{path}.admissionReviewVersions: Invalid value: {versions:?}: must include at least one of v1, v1beta1"
        ));
    }
    match h.get("timeoutSeconds").and_then(Value::as_i64) {
        Some(1..=30) => {}
        _ => errors.push(format!(
            "{path}.timeoutSeconds: Invalid value: {}: the timeout value must be between 1 and 30 seconds",
            h.get("timeoutSeconds").cloned().unwrap_or_default()
        )),
    }
    for key in ["namespaceSelector", "objectSelector"] {
        if let Err(e) = LabelSelector::from_json(h.get(key).unwrap_or(&Value::Null)) {
            errors.push(format!("{path}.{key}.{e}"));
        }
    }
    Ok(())
}

fn validate_client_config(path: &str, client_config: Option<&Value>, errors: &mut Vec<String>) -> Result<(), ApiError> {
    let cp = format!("{path}.clientConfig");
    let get = |k: &str| client_config.and_then(|c| c.get(k)).filter(|v| !v.is_null());
    if let Some(bundle) = get("caBundle") {
        let valid = bundle.as_str().is_some_and(|b| base64::engine::general_purpose::STANDARD.decode(b).is_ok());
        if !valid {
            return Err(ApiError::bad_request(format!("{cp}.caBundle: illegal base64 data")));
        }
    }
    match (get("url"), get("service")) {
        (Some(url), None) => {
            let url = url.as_str().unwrap_or_default();
            let problem = match url.parse::<hyper::Uri>() {
                Err(e) => Some(e.to_string()),
                Ok(uri) if uri.scheme_str() != Some("https") => Some("'https' is the only allowed URL scheme".into()),
                Ok(uri) if uri.host().is_none_or(str::is_empty) => Some("host must be specified".into()),
                Ok(uri) if uri.query().is_some() => Some("query parameters are not allowed".into()),
                Ok(uri) if uri.authority().is_some_and(|a| a.as_str().contains('@')) => {
                    Some("user information is not permitted in the URL".into())
                }
                Ok(_) => None,
            };
            if let Some(problem) = problem {
                errors.push(format!("{cp}.url: Invalid value: {url:?}: {problem}"));
            }
        }
        (None, Some(service)) => {
            let sp = format!("{cp}.service");
            for key in ["namespace", "name"] {
                if service.get(key).and_then(Value::as_str).is_none_or(str::is_empty) {
                    errors.push(format!("{sp}.{key}: Required value: service {key} is required"));
                }
            }
            if let Some(p) = service.get("path").filter(|p| !p.is_null())
                && !p.as_str().is_some_and(|p| p.starts_with('/'))
            {
                errors.push(format!("{sp}.path: Invalid value: {p}: must start with a '/'"));
            }
            if !service.get("port").and_then(Value::as_u64).is_some_and(|p| (1..=65535).contains(&p)) {
                errors.push(format!(
                    "{sp}.port: Invalid value: {}: port is not valid: must be between 1 and 65535, inclusive",
                    service.get("port").cloned().unwrap_or_default()
                ));
            }
        }
        _ => errors.push(format!("{cp}: Required value: exactly one of url or service is required")),
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::types::Registry;

    fn pods() -> Arc<ResourceType> {
        Registry::new().lookup("", "v1", "pods").unwrap()
    }

    fn webhook(spec: Value) -> Webhook {
        Webhook { configuration: "c".into(), name: "w.example.com".into(), spec }
    }

    #[test]
    fn rules() {
        let rt = pods();
        let rule = |r: Value| rule_matches(&r, &rt);
        let base = json!({"operations": ["CREATE"], "apiGroups": [""], "apiVersions": ["v1"], "resources": ["pods"]});
        assert!(rule(base.clone()));
        let with = |k: &str, v: Value| {
            let mut r = base.clone();
            r[k] = v;
            rule(r)
        };
        assert!(with("operations", json!(["*"])));
        assert!(!with("operations", json!(["UPDATE", "DELETE"])));
        assert!(!with("apiGroups", json!(["apps"])));
        assert!(with("apiGroups", json!(["apps", "*"])));
        assert!(!with("apiVersions", json!(["v2"])));
        assert!(with("resources", json!(["*"])));
        assert!(with("resources", json!(["*/*"])));
        assert!(!with("resources", json!(["pods/status"])));
        assert!(!with("resources", json!(["*/scale"])));
        assert!(!with("resources", json!(["secrets"])));
        assert!(with("scope", json!("Namespaced")));
        assert!(!with("scope", json!("Cluster")));
        let ns = Registry::new().lookup("", "v1", "namespaces").unwrap();
        let mut r = base.clone();
        r["resources"] = json!(["namespaces"]);
        r["scope"] = json!("Cluster");
        assert!(rule_matches(&r, &ns));
        r["scope"] = json!("Namespaced");
        assert!(!rule_matches(&r, &ns));
    }

    #[test]
    fn selectors() {
        let rt = pods();
        let rules =
            json!([{"operations": ["CREATE"], "apiGroups": [""], "apiVersions": ["v1"], "resources": ["pods"]}]);
        let pod = json!({"metadata": {"name": "p", "namespace": "a", "labels": {"inject": "yes"}}});
        let ns_labels: Map<String, Value> =
            serde_json::from_value(json!({"kubernetes.io/metadata.name": "a"})).unwrap();
        let m = |spec: Value| hook_matches(&webhook(spec), &rt, Some(&ns_labels), &pod).unwrap();
        assert!(m(json!({"rules": rules})));
        assert!(!m(json!({})), "no rules: nothing matches");
        assert!(m(json!({"rules": rules, "objectSelector": {"matchLabels": {"inject": "yes"}}})));
        assert!(!m(json!({"rules": rules, "objectSelector": {"matchLabels": {"inject": "no"}}})));
        assert!(m(json!({"rules": rules, "namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "a"}}})));
        assert!(!m(json!({"rules": rules, "namespaceSelector": {"matchExpressions": [
            {"key": "kubernetes.io/metadata.name", "operator": "In", "values": ["kube-system"]}]}})));
    }

    #[test]
    fn denial_status() {
        let e = denied("w", Some(&json!({"code": 403, "message": "no", "reason": "Forbidden"})));
        assert_eq!(
            (e.code, e.reason.as_str(), e.message.as_str()),
            (403, "Forbidden", "admission webhook \"w\" denied the request: no")
        );
        let e = denied("w", None);
        assert_eq!(
            (e.code, e.message.as_str()),
            (400, "admission webhook \"w\" denied the request without explanation")
        );
        let e = denied("w", Some(&json!({"code": 200, "reason": "because"})));
        assert_eq!((e.code, e.message.as_str()), (400, "admission webhook \"w\" denied the request: because"));
    }

    #[test]
    fn configuration_defaults_and_validation() {
        let rt = Registry::new().lookup("admissionregistration.k8s.io", "v1", "mutatingwebhookconfigurations").unwrap();
        let mut ok = json!({"metadata": {"name": "c"}, "webhooks": [{
            "name": "inject.kubetoken.io", "sideEffects": "None", "admissionReviewVersions": ["v1"],
            "clientConfig": {"service": {"namespace": "ns", "name": "svc", "path": "/mutate"}},
            "rules": [{"operations": ["CREATE"], "apiGroups": [""], "apiVersions": ["v1"], "resources": ["pods"]}],
        }]});
        default_and_validate_configuration(&rt, &mut ok).unwrap();
        let h = &ok["webhooks"][0];
        assert_eq!(h["failurePolicy"], "Fail");
        assert_eq!(h["timeoutSeconds"], 10);
        assert_eq!(h["reinvocationPolicy"], "Never");
        assert_eq!(h["matchPolicy"], "Equivalent");
        assert_eq!(h["namespaceSelector"], json!({}));
        assert_eq!(h["clientConfig"]["service"]["port"], 443);
        assert_eq!(h["rules"][0]["scope"], "*");
        let broken = |f: &dyn Fn(&mut Value)| {
            let mut o = ok.clone();
            f(&mut o);
            default_and_validate_configuration(&rt, &mut o).unwrap_err()
        };
        let e = broken(&|o| o["webhooks"][0]["sideEffects"] = json!("Some"));
        assert_eq!(e.code, 422, "{e}");
        assert!(e.message.contains("webhooks[0].sideEffects: Unsupported value"), "{e}");
        assert!(broken(&|o| o["webhooks"][0]["timeoutSeconds"] = json!(31)).message.contains("between 1 and 30"));
        assert!(broken(&|o| o["webhooks"][0]["name"] = json!("inject")).message.contains("three segments"));
        assert!(
            broken(&|o| o["webhooks"][0]["clientConfig"]["url"] = json!("https://x")).message.contains("exactly one")
        );
        let e = broken(&|o| o["webhooks"][0]["clientConfig"] = json!({"url": "http://127.0.0.1:1/x"}));
        assert!(e.message.contains("'https' is the only allowed URL scheme"), "{e}");
        assert!(broken(&|o| o["webhooks"][0]["admissionReviewVersions"] = json!([])).message.contains("v1, v1beta1"));
        let e = broken(&|o| o["webhooks"][0]["clientConfig"]["caBundle"] = json!("%%%"));
        assert_eq!(e.code, 400);
        let e = broken(&|o| {
            let w = o["webhooks"][0].clone();
            o["webhooks"] = json!([w.clone(), w]);
        });
        assert!(e.message.contains("webhooks[1].name: Duplicate value"), "{e}");
        let e = broken(&|o| {
            o["webhooks"][0]["objectSelector"] = json!({"matchExpressions": [{"key": "a", "operator": "In"}]})
        });
        assert!(e.message.contains("webhooks[0].objectSelector.matchExpressions[0].values: Required value"), "{e}");
    }
}

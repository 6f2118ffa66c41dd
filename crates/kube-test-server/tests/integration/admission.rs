//! Mutating admission webhooks: a webhook served over HTTPS by the test (its own CA, a serving certificate for
//! `NAME.NAMESPACE.svc`), registered with a MutatingWebhookConfiguration, called on CREATE.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use base64::Engine as _;
use http_body_util::{BodyExt as _, Full};
use hyper::body::Bytes;
use k8s_openapi::ByteString;
use k8s_openapi::api::admissionregistration::v1::{
    MutatingWebhook, MutatingWebhookConfiguration, RuleWithOperations, ServiceReference, WebhookClientConfig,
};
use k8s_openapi::api::core::v1::{ConfigMap, Container, Pod, PodSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, LabelSelectorRequirement};
use kube::Client;
use kube::api::{Api, Patch, PatchParams, PostParams};
use kube_test_server::{KubeTestServer, WebhookOutcome};
use serde_json::{Value, json};

use crate::{client, meta, raw, within};

const SERVICE_NS: &str = "kubetoken";
const SERVICE: &str = "kubetoken-webhook";
const SERVICE_DNS: &str = "kubetoken-webhook.kubetoken.svc";
const HOOK: &str = "inject.kubetoken.io";
const INJECT_LABEL: &str = "kubetoken.io/inject";

/// A certificate authority made for one test.
struct Ca {
    cert: rcgen::Certificate,
    issuer: rcgen::Issuer<'static, rcgen::KeyPair>,
}

impl Ca {
    fn new() -> Self {
        let key = rcgen::KeyPair::generate().unwrap();
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        params.distinguished_name.push(rcgen::DnType::CommonName, "webhook test CA");
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        params.key_usages = vec![rcgen::KeyUsagePurpose::KeyCertSign, rcgen::KeyUsagePurpose::CrlSign];
        let cert = params.self_signed(&key).unwrap();
        Self { cert, issuer: rcgen::Issuer::new(params, key) }
    }

    fn pem(&self) -> String {
        self.cert.pem()
    }

    /// A TLS server configuration with a certificate for `dns_name` signed by this CA.
    fn server_config(&self, dns_name: &str) -> Arc<rustls::ServerConfig> {
        let key = rcgen::KeyPair::generate().unwrap();
        let params = rcgen::CertificateParams::new(vec![dns_name.to_string()]).unwrap();
        let cert = params.signed_by(&key, &self.issuer).unwrap();
        let key = rustls::pki_types::PrivateKeyDer::Pkcs8(key.serialize_der().into());
        let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
        let config = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(vec![cert.der().clone()], key)
            .unwrap();
        Arc::new(config)
    }
}

/// What the test webhook answers.
#[derive(Clone)]
enum Reply {
    /// Adds a sidecar container and the label `kubetoken.io/injected: "true"`. With a client, the sidecar's image
    /// is read from the ConfigMap `default/sidecar` first: the webhook calls the API server during the create.
    Inject(Option<Client>),
    /// Adds the label `order-<tag>` whose value is how many `order-` labels the object already had.
    Label(&'static str),
    /// `allowed: false` with this status code and message.
    Deny(u16, &'static str),
    /// Waits, then allows.
    Sleep(Duration),
    /// Answers with another uid.
    WrongUid,
    /// A patch that cannot be applied (removes a missing field).
    BadPatch,
}

/// One request the webhook received.
#[derive(Clone, Debug)]
struct Seen {
    path: String,
    host: String,
    review: Value,
}

/// The test's webhook server on 127.0.0.1 (stops when dropped).
struct Webhook {
    addr: SocketAddr,
    seen: Arc<Mutex<Vec<Seen>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Webhook {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Webhook {
    async fn start(ca: &Ca, dns_name: &str, reply: Reply) -> Self {
        let acceptor = tokio_rustls::TlsAcceptor::from(ca.server_config(dns_name));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let seen = Arc::new(Mutex::new(Vec::new()));
        let task = tokio::spawn({
            let seen = seen.clone();
            async move {
                while let Ok((tcp, _)) = listener.accept().await {
                    let (acceptor, seen, reply) = (acceptor.clone(), seen.clone(), reply.clone());
                    tokio::spawn(async move {
                        let Ok(tls) = acceptor.accept(tcp).await else { return };
                        let service = hyper::service::service_fn(move |req| {
                            let (seen, reply) = (seen.clone(), reply.clone());
                            async move { Ok::<_, Infallible>(answer(req, &seen, &reply).await) }
                        });
                        let io = hyper_util::rt::TokioIo::new(tls);
                        let _ = hyper::server::conn::http1::Builder::new().serve_connection(io, service).await;
                    });
                }
            }
        });
        Self { addr, seen, task }
    }

    fn seen(&self) -> Vec<Seen> {
        self.seen.lock().unwrap().clone()
    }
}

fn review_response(uid: &str, allowed: bool, patch: Option<Value>, status: Option<Value>) -> Value {
    let mut response = json!({"uid": uid, "allowed": allowed});
    if let Some(patch) = patch {
        response["patchType"] = json!("JSONPatch");
        response["patch"] =
            json!(base64::engine::general_purpose::STANDARD.encode(serde_json::to_vec(&patch).unwrap()));
    }
    if let Some(status) = status {
        response["status"] = status;
    }
    json!({"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview", "response": response})
}

async fn answer(
    req: hyper::Request<hyper::body::Incoming>,
    seen: &Mutex<Vec<Seen>>,
    reply: &Reply,
) -> hyper::Response<Full<Bytes>> {
    let path = req.uri().to_string();
    let host = req.headers().get(hyper::header::HOST).and_then(|h| h.to_str().ok()).unwrap_or_default().to_string();
    let body = req.into_body().collect().await.unwrap().to_bytes();
    let review: Value = serde_json::from_slice(&body).unwrap();
    seen.lock().unwrap().push(Seen { path, host, review: review.clone() });
    let uid = review["request"]["uid"].as_str().unwrap_or_default().to_string();
    let object = &review["request"]["object"];
    let response = match reply {
        Reply::Inject(client) => {
            let image = match client {
                Some(client) => {
                    let cms: Api<ConfigMap> = Api::namespaced(client.clone(), "default");
                    let cm = cms.get("sidecar").await.unwrap();
                    cm.data.unwrap()["image"].clone()
                }
                None => "kubetoken:sidecar".to_string(),
            };
            let patch = json!([
                {"op": "add", "path": "/spec/containers/-", "value": {"name": "kubetoken-sidecar", "image": image}},
                {"op": "add", "path": "/metadata/labels/kubetoken.io~1injected", "value": "true"},
            ]);
            review_response(&uid, true, Some(patch), None)
        }
        Reply::Label(tag) => {
            let labels = object["metadata"]["labels"].as_object().cloned().unwrap_or_default();
            let before = labels.keys().filter(|k| k.starts_with("order-")).count();
            let patch =
                json!([{"op": "add", "path": format!("/metadata/labels/order-{tag}"), "value": before.to_string()}]);
            review_response(&uid, true, Some(patch), None)
        }
        Reply::Deny(code, message) => {
            review_response(&uid, false, None, Some(json!({"code": code, "message": message, "reason": "Forbidden"})))
        }
        Reply::Sleep(d) => {
            tokio::time::sleep(*d).await;
            review_response(&uid, true, None, None)
        }
        Reply::WrongUid => review_response("not-the-uid", true, None, None),
        Reply::BadPatch => {
            review_response(&uid, true, Some(json!([{"op": "remove", "path": "/spec/nothing/here"}])), None)
        }
    };
    hyper::Response::builder()
        .header(hyper::header::CONTENT_TYPE, "application/json")
        .body(Full::new(Bytes::from(serde_json::to_vec(&response).unwrap())))
        .unwrap()
}

/// The injection webhook as the product will register it: pods labelled `kubetoken.io/inject`, everywhere but
/// kube-system, through the Service kubetoken/kubetoken-webhook.
fn inject_hook(ca_pem: Option<&str>) -> MutatingWebhook {
    MutatingWebhook {
        name: HOOK.into(),
        admission_review_versions: vec!["v1".into()],
        side_effects: "None".into(),
        client_config: WebhookClientConfig {
            ca_bundle: ca_pem.map(|p| ByteString(p.as_bytes().to_vec())),
            service: Some(ServiceReference {
                namespace: SERVICE_NS.into(),
                name: SERVICE.into(),
                path: Some("/mutate".into()),
                port: Some(443),
            }),
            url: None,
        },
        rules: Some(vec![RuleWithOperations {
            operations: Some(vec!["CREATE".into()]),
            api_groups: Some(vec!["".into()]),
            api_versions: Some(vec!["v1".into()]),
            resources: Some(vec!["pods".into()]),
            scope: None,
        }]),
        object_selector: Some(LabelSelector {
            match_expressions: Some(vec![LabelSelectorRequirement {
                key: INJECT_LABEL.into(),
                operator: "Exists".into(),
                values: None,
            }]),
            match_labels: None,
        }),
        namespace_selector: Some(LabelSelector {
            match_expressions: Some(vec![LabelSelectorRequirement {
                key: "kubernetes.io/metadata.name".into(),
                operator: "NotIn".into(),
                values: Some(vec!["kube-system".into()]),
            }]),
            match_labels: None,
        }),
        timeout_seconds: Some(5),
        ..Default::default()
    }
}

fn configuration(name: &str, hooks: Vec<MutatingWebhook>) -> MutatingWebhookConfiguration {
    MutatingWebhookConfiguration { metadata: meta(name), webhooks: Some(hooks) }
}

async fn register(client: &Client, config: MutatingWebhookConfiguration) -> MutatingWebhookConfiguration {
    let api: Api<MutatingWebhookConfiguration> = Api::all(client.clone());
    api.create(&PostParams::default(), &config).await.unwrap()
}

fn pod(name: &str, labels: &[(&str, &str)]) -> Pod {
    let mut metadata = meta(name);
    if !labels.is_empty() {
        metadata.labels = Some(labels.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect());
    }
    Pod {
        metadata,
        spec: Some(PodSpec {
            containers: vec![Container { name: "app".into(), image: Some("shop:1".into()), ..Default::default() }],
            ..Default::default()
        }),
        ..Default::default()
    }
}

fn labelled(name: &str) -> Pod {
    pod(name, &[(INJECT_LABEL, "shop")])
}

fn containers(p: &Value) -> Vec<String> {
    p["spec"]["containers"].as_array().unwrap().iter().map(|c| c["name"].as_str().unwrap().to_string()).collect()
}

/// (code, reason, message) of a refused request.
fn refusal<T: std::fmt::Debug>(result: Result<T, kube::Error>) -> (u16, String, String) {
    match result {
        Err(kube::Error::Api(status)) => (status.code, status.reason.clone(), status.message.clone()),
        other => panic!("expected an API error, got {other:?}"),
    }
}

/// A server, its client, a webhook (`reply`) behind the mapped Service, and the injection configuration.
async fn setup(reply: Reply) -> (KubeTestServer, Client, Webhook, Ca) {
    let server = KubeTestServer::start();
    let client = client(&server).await;
    let ca = Ca::new();
    let webhook = Webhook::start(&ca, SERVICE_DNS, reply).await;
    server.set_service_address(SERVICE_NS, SERVICE, webhook.addr);
    register(&client, configuration("kubetoken", vec![inject_hook(Some(&ca.pem()))])).await;
    (server, client, webhook, ca)
}

#[tokio::test]
async fn labelled_pod_is_patched_by_the_webhook_before_it_is_stored() {
    let server = KubeTestServer::start();
    let client = client(&server).await;
    let ca = Ca::new();
    // The webhook reads this through the API server while the create waits for it.
    let cms: Api<ConfigMap> = Api::namespaced(client.clone(), "default");
    cms.create(&PostParams::default(), &crate::configmap("sidecar", &[("image", "kubetoken:1.2.3")])).await.unwrap();
    let webhook = Webhook::start(&ca, SERVICE_DNS, Reply::Inject(Some(client.clone()))).await;
    server.set_service_address(SERVICE_NS, SERVICE, webhook.addr);
    register(&client, configuration("kubetoken", vec![inject_hook(Some(&ca.pem()))])).await;

    let pods: Api<Pod> = Api::namespaced(client.clone(), "shop");
    let created = within("create through the webhook", pods.create(&PostParams::default(), &labelled("web"))).await;
    let created = created.unwrap();
    let names: Vec<&str> = created.spec.as_ref().unwrap().containers.iter().map(|c| c.name.as_str()).collect();
    assert_eq!(names, ["app", "kubetoken-sidecar"]);
    assert_eq!(created.spec.unwrap().containers[1].image.as_deref(), Some("kubetoken:1.2.3"));
    assert_eq!(created.metadata.labels.unwrap()["kubetoken.io/injected"], "true");
    let stored = server.get_object("/api/v1/namespaces/shop/pods/web").unwrap();
    assert_eq!(containers(&stored), ["app", "kubetoken-sidecar"]);
    assert_eq!(stored["metadata"]["labels"]["kubetoken.io/injected"], "true");
    assert!(stored["metadata"]["uid"].is_string());

    // What the webhook was sent.
    let seen = webhook.seen();
    assert_eq!(seen.len(), 1);
    assert_eq!(seen[0].path, "/mutate?timeout=5s");
    assert_eq!(seen[0].host, format!("{SERVICE_DNS}:443"));
    let review = &seen[0].review;
    assert_eq!(review["apiVersion"], "admission.k8s.io/v1");
    assert_eq!(review["kind"], "AdmissionReview");
    let request = &review["request"];
    assert_eq!(request["uid"].as_str().unwrap().len(), 36);
    assert_eq!(request["kind"], json!({"group": "", "version": "v1", "kind": "Pod"}));
    assert_eq!(request["resource"], json!({"group": "", "version": "v1", "resource": "pods"}));
    assert_eq!(request["requestKind"], request["kind"]);
    assert_eq!(request["requestResource"], request["resource"]);
    assert_eq!((request["name"].as_str(), request["namespace"].as_str()), (Some("web"), Some("shop")));
    assert_eq!(request["operation"], "CREATE");
    assert!(request["userInfo"]["username"].as_str().is_some_and(|u| !u.is_empty()));
    assert!(request["oldObject"].is_null() && request.get("oldObject").is_some());
    assert_eq!(request["dryRun"], false);
    assert_eq!(request["options"]["kind"], "CreateOptions");
    let object = &request["object"];
    assert_eq!((object["kind"].as_str(), object["apiVersion"].as_str()), (Some("Pod"), Some("v1")));
    assert_eq!(object["metadata"]["namespace"], "shop");
    assert!(object["metadata"].get("uid").is_none(), "no uid before the object is stored: {object}");
    assert!(object["metadata"].get("resourceVersion").is_none());

    let calls = server.webhook_calls();
    assert_eq!(calls.len(), 1);
    assert_eq!(
        (calls[0].configuration.as_str(), calls[0].webhook.as_str(), calls[0].operation.as_str()),
        ("kubetoken", HOOK, "CREATE")
    );
    assert_eq!(
        (calls[0].resource.as_str(), calls[0].namespace.as_str(), calls[0].name.as_str()),
        ("pods", "shop", "web")
    );
    assert_eq!(calls[0].outcome, WebhookOutcome::Allowed { patched: true });

    // generateName: no name in the review yet; the stored pod gets one and the patch.
    let mut generated = labelled("");
    generated.metadata.name = None;
    generated.metadata.generate_name = Some("web-".into());
    let created = pods.create(&PostParams::default(), &generated).await.unwrap();
    let name = created.metadata.name.unwrap();
    assert!(name.starts_with("web-"));
    assert_eq!(containers(&server.get_object(&format!("/api/v1/namespaces/shop/pods/{name}")).unwrap()).len(), 2);
    let request = &webhook.seen()[1].review["request"];
    assert!(request.get("name").is_none(), "{request}");
    assert_eq!(request["object"]["metadata"]["generateName"], "web-");

    // Only CREATE goes to webhooks: an update of the pod is not sent.
    let mut update = pods.get("web").await.unwrap();
    update.metadata.annotations = Some([("a".to_string(), "b".to_string())].into());
    pods.replace("web", &PostParams::default(), &update).await.unwrap();
    assert_eq!(webhook.seen().len(), 2);
}

#[tokio::test]
async fn unlabelled_pod_is_not_sent_to_the_webhook() {
    let (server, client, webhook, _ca) = setup(Reply::Inject(None)).await;
    let pods: Api<Pod> = Api::namespaced(client.clone(), "shop");
    pods.create(&PostParams::default(), &pod("plain", &[("app", "shop")])).await.unwrap();
    assert!(webhook.seen().is_empty());
    assert!(server.webhook_calls().is_empty());
    assert_eq!(containers(&server.get_object("/api/v1/namespaces/shop/pods/plain").unwrap()), ["app"]);
    // The same webhook does patch a labelled one (so the selector, not a broken webhook, left the first alone).
    pods.create(&PostParams::default(), &labelled("labelled")).await.unwrap();
    assert_eq!(webhook.seen().len(), 1);
    assert_eq!(containers(&server.get_object("/api/v1/namespaces/shop/pods/labelled").unwrap()).len(), 2);
}

#[tokio::test]
async fn namespace_selector_leaves_kube_system_alone() {
    let (server, client, webhook, ca) = setup(Reply::Inject(None)).await;
    let system: Api<Pod> = Api::namespaced(client.clone(), "kube-system");
    system.create(&PostParams::default(), &labelled("coredns")).await.unwrap();
    assert!(webhook.seen().is_empty());
    assert_eq!(containers(&server.get_object("/api/v1/namespaces/kube-system/pods/coredns").unwrap()), ["app"]);
    // A namespace that has no object yet still has its kubernetes.io/metadata.name label.
    assert!(server.get_object("/api/v1/namespaces/brand-new").is_none());
    let fresh: Api<Pod> = Api::namespaced(client.clone(), "brand-new");
    fresh.create(&PostParams::default(), &labelled("web")).await.unwrap();
    assert_eq!(webhook.seen().len(), 1);
    assert_eq!(containers(&server.get_object("/api/v1/namespaces/brand-new/pods/web").unwrap()).len(), 2);
    // Namespaces carry the label, as in Kubernetes.
    let ns = server.get_object("/api/v1/namespaces/brand-new").unwrap();
    assert_eq!(ns["metadata"]["labels"]["kubernetes.io/metadata.name"], "brand-new");

    // A selector on another namespace label.
    let api: Api<MutatingWebhookConfiguration> = Api::all(client.clone());
    let mut hook = inject_hook(Some(&ca.pem()));
    hook.namespace_selector = Some(LabelSelector {
        match_labels: Some([("inject".to_string(), "enabled".to_string())].into()),
        match_expressions: None,
    });
    let mut config = api.get("kubetoken").await.unwrap();
    config.webhooks = Some(vec![hook]);
    api.replace("kubetoken", &PostParams::default(), &config).await.unwrap();
    fresh.create(&PostParams::default(), &labelled("not-enabled")).await.unwrap();
    assert_eq!(webhook.seen().len(), 1);
    let (status, _, _) = raw(
        &client,
        "PATCH",
        "/api/v1/namespaces/brand-new",
        Some("application/merge-patch+json"),
        r#"{"metadata": {"labels": {"inject": "enabled"}}}"#,
    )
    .await;
    assert_eq!(status, 200);
    fresh.create(&PostParams::default(), &labelled("enabled")).await.unwrap();
    assert_eq!(webhook.seen().len(), 2);
}

#[tokio::test]
async fn webhook_outage_with_fail_policy_refuses_labelled_pods_only() {
    let (server, client, webhook, _ca) = setup(Reply::Inject(None)).await;
    let pods: Api<Pod> = Api::namespaced(client.clone(), "shop");

    // No endpoints for the Service.
    server.clear_service_address(SERVICE_NS, SERVICE);
    let (code, reason, message) = refusal(pods.create(&PostParams::default(), &labelled("down")).await);
    assert_eq!((code, reason.as_str()), (500, "InternalError"));
    let prefix = format!(
        "Internal error occurred: failed calling webhook \"{HOOK}\": failed to call webhook: \
         Post \"https://{SERVICE_DNS}:443/mutate?timeout=5s\": "
    );
    assert!(message.starts_with(&prefix), "{message}");
    assert!(server.get_object("/api/v1/namespaces/shop/pods/down").is_none());
    // Unlabelled pods are still admitted.
    pods.create(&PostParams::default(), &pod("plain", &[])).await.unwrap();
    assert!(server.get_object("/api/v1/namespaces/shop/pods/plain").is_some());

    // The Service's address refuses connections.
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap();
    server.set_service_address(SERVICE_NS, SERVICE, closed);
    let (code, _, message) = refusal(pods.create(&PostParams::default(), &labelled("refused")).await);
    assert_eq!(code, 500);
    assert!(message.starts_with(&prefix) && message.contains(&format!("dial tcp {closed}")), "{message}");
    assert!(webhook.seen().is_empty());
    let calls = server.webhook_calls();
    assert_eq!(calls.len(), 2);
    assert!(calls.iter().all(|c| matches!(&c.outcome, WebhookOutcome::Failed { ignored: false, .. })), "{calls:?}");

    // Back up: admitted and patched again.
    server.set_service_address(SERVICE_NS, SERVICE, webhook.addr);
    pods.create(&PostParams::default(), &labelled("up")).await.unwrap();
    assert_eq!(containers(&server.get_object("/api/v1/namespaces/shop/pods/up").unwrap()).len(), 2);
}

#[tokio::test]
async fn webhook_outage_with_ignore_policy_admits_unpatched() {
    let server = KubeTestServer::start();
    let client = client(&server).await;
    let mut hook = inject_hook(Some(&Ca::new().pem()));
    hook.failure_policy = Some("Ignore".into());
    register(&client, configuration("kubetoken", vec![hook])).await;
    let pods: Api<Pod> = Api::namespaced(client.clone(), "shop");
    let created = pods.create(&PostParams::default(), &labelled("web")).await.unwrap();
    assert_eq!(created.spec.unwrap().containers.len(), 1);
    assert!(server.get_object("/api/v1/namespaces/shop/pods/web").is_some());
    let calls = server.webhook_calls();
    assert_eq!(calls.len(), 1);
    match &calls[0].outcome {
        WebhookOutcome::Failed { message, ignored: true } => {
            assert!(message.contains("no endpoints available for service"), "{message}")
        }
        other => panic!("{other:?}"),
    }
}

#[tokio::test]
async fn slow_webhook_fails_after_timeout_seconds() {
    let server = KubeTestServer::start();
    let client = client(&server).await;
    let ca = Ca::new();
    let webhook = Webhook::start(&ca, SERVICE_DNS, Reply::Sleep(Duration::from_secs(10))).await;
    server.set_service_address(SERVICE_NS, SERVICE, webhook.addr);
    let mut hook = inject_hook(Some(&ca.pem()));
    hook.timeout_seconds = Some(1);
    register(&client, configuration("kubetoken", vec![hook])).await;
    let pods: Api<Pod> = Api::namespaced(client.clone(), "shop");
    let started = Instant::now();
    let (code, _, message) = refusal(pods.create(&PostParams::default(), &labelled("slow")).await);
    let took = started.elapsed();
    assert_eq!(code, 500);
    assert!(message.ends_with("context deadline exceeded"), "{message}");
    assert!(took >= Duration::from_secs(1) && took < Duration::from_secs(4), "{took:?}");
    assert_eq!(webhook.seen()[0].path, "/mutate?timeout=1s");
    assert!(server.get_object("/api/v1/namespaces/shop/pods/slow").is_none());
}

#[tokio::test]
async fn wrong_or_missing_ca_bundle_or_server_name_fails_the_call() {
    let server = KubeTestServer::start();
    let client = client(&server).await;
    let ca = Ca::new();
    let webhook = Webhook::start(&ca, SERVICE_DNS, Reply::Inject(None)).await;
    server.set_service_address(SERVICE_NS, SERVICE, webhook.addr);
    let api: Api<MutatingWebhookConfiguration> = Api::all(client.clone());
    let pods: Api<Pod> = Api::namespaced(client.clone(), "shop");

    let other_ca = Ca::new();
    register(&client, configuration("kubetoken", vec![inject_hook(Some(&other_ca.pem()))])).await;
    let (code, _, message) = refusal(pods.create(&PostParams::default(), &labelled("a")).await);
    assert_eq!(code, 500);
    assert!(message.contains("failed to call webhook") && message.contains("tls"), "{message}");

    api.replace("kubetoken", &PostParams::default(), &{
        let mut c = api.get("kubetoken").await.unwrap();
        c.webhooks = Some(vec![inject_hook(None)]);
        c
    })
    .await
    .unwrap();
    let (code, _, message) = refusal(pods.create(&PostParams::default(), &labelled("b")).await);
    assert_eq!(code, 500);
    assert!(message.contains("tls"), "{message}");

    // The right CA, but the certificate is for another Service's name.
    let mut hook = inject_hook(Some(&ca.pem()));
    hook.client_config.service.as_mut().unwrap().name = "other".into();
    server.set_service_address(SERVICE_NS, "other", webhook.addr);
    api.replace("kubetoken", &PostParams::default(), &{
        let mut c = api.get("kubetoken").await.unwrap();
        c.webhooks = Some(vec![hook]);
        c
    })
    .await
    .unwrap();
    let (code, _, message) = refusal(pods.create(&PostParams::default(), &labelled("c")).await);
    assert_eq!(code, 500);
    assert!(message.contains("tls"), "{message}");
    assert!(webhook.seen().is_empty(), "no handshake succeeded");

    // A caBundle that is not PEM.
    let hook = inject_hook(Some("not a certificate"));
    api.replace("kubetoken", &PostParams::default(), &{
        let mut c = api.get("kubetoken").await.unwrap();
        c.webhooks = Some(vec![hook]);
        c
    })
    .await
    .unwrap();
    let (code, _, message) = refusal(pods.create(&PostParams::default(), &labelled("d")).await);
    assert_eq!(code, 500);
    assert!(message.contains("unable to load root certificates"), "{message}");

    // The controller merge-patches the right caBundle in: admitted and patched.
    let patch = json!({"webhooks": [{"name": HOOK, "clientConfig": {
        "caBundle": base64::engine::general_purpose::STANDARD.encode(ca.pem()),
        "service": {"namespace": SERVICE_NS, "name": SERVICE, "path": "/mutate", "port": 443}}}]});
    let patched = api.patch("kubetoken", &PatchParams::default(), &Patch::Strategic(&patch)).await.unwrap();
    let hooks = patched.webhooks.unwrap();
    assert_eq!(hooks.len(), 1);
    assert_eq!(hooks[0].side_effects, "None", "a strategic merge patch merges webhooks by name");
    pods.create(&PostParams::default(), &labelled("e")).await.unwrap();
    assert_eq!(containers(&server.get_object("/api/v1/namespaces/shop/pods/e").unwrap()).len(), 2);
}

#[tokio::test]
async fn denying_webhook_refuses_with_its_status() {
    let (server, client, webhook, _ca) = setup(Reply::Deny(403, "pods of shop need an app label")).await;
    let pods: Api<Pod> = Api::namespaced(client.clone(), "shop");
    let (code, reason, message) = refusal(pods.create(&PostParams::default(), &labelled("web")).await);
    assert_eq!((code, reason.as_str()), (403, "Forbidden"));
    assert_eq!(message, format!("admission webhook \"{HOOK}\" denied the request: pods of shop need an app label"));
    assert!(server.get_object("/api/v1/namespaces/shop/pods/web").is_none());
    assert_eq!(webhook.seen().len(), 1);
    assert!(matches!(server.webhook_calls()[0].outcome, WebhookOutcome::Denied { code: 403, .. }));
}

#[tokio::test]
async fn malformed_answers_are_call_failures_and_bad_patches_refuse_even_when_ignored() {
    let server = KubeTestServer::start();
    let client = client(&server).await;
    let ca = Ca::new();
    let pods: Api<Pod> = Api::namespaced(client.clone(), "shop");
    let api: Api<MutatingWebhookConfiguration> = Api::all(client.clone());

    let wrong_uid = Webhook::start(&ca, SERVICE_DNS, Reply::WrongUid).await;
    server.set_service_address(SERVICE_NS, SERVICE, wrong_uid.addr);
    register(&client, configuration("kubetoken", vec![inject_hook(Some(&ca.pem()))])).await;
    let (code, _, message) = refusal(pods.create(&PostParams::default(), &labelled("a")).await);
    assert_eq!(code, 500);
    assert!(message.contains("received invalid webhook response: expected response.uid="), "{message}");

    // As in kube-apiserver, a patch that cannot be applied refuses the create whatever the failure policy.
    let bad_patch = Webhook::start(&ca, SERVICE_DNS, Reply::BadPatch).await;
    server.set_service_address(SERVICE_NS, SERVICE, bad_patch.addr);
    let mut hook = inject_hook(Some(&ca.pem()));
    hook.failure_policy = Some("Ignore".into());
    let mut config = api.get("kubetoken").await.unwrap();
    config.webhooks = Some(vec![hook]);
    api.replace("kubetoken", &PostParams::default(), &config).await.unwrap();
    let (code, reason, _) = refusal(pods.create(&PostParams::default(), &labelled("b")).await);
    assert_eq!((code, reason.as_str()), (500, "InternalError"));
    assert!(server.get_object("/api/v1/namespaces/shop/pods/b").is_none());
    // While a failed call is ignored.
    server.set_service_address(SERVICE_NS, SERVICE, wrong_uid.addr);
    pods.create(&PostParams::default(), &labelled("c")).await.unwrap();
}

#[tokio::test]
async fn webhooks_run_in_configuration_name_order_and_see_earlier_patches() {
    let server = KubeTestServer::start();
    let client = client(&server).await;
    let ca = Ca::new();
    let (first, second) = (
        Webhook::start(&ca, "first.hooks.svc", Reply::Label("a")).await,
        Webhook::start(&ca, "second.hooks.svc", Reply::Label("z")).await,
    );
    server.set_service_address("hooks", "first", first.addr);
    server.set_service_address("hooks", "second", second.addr);
    let hook = |name: &str, service: &str| {
        let mut h = inject_hook(Some(&ca.pem()));
        h.name = name.into();
        let svc = h.client_config.service.as_mut().unwrap();
        (svc.namespace, svc.name) = ("hooks".into(), service.into());
        h
    };
    // Created in the opposite order of their names.
    register(&client, configuration("z-config", vec![hook("z.hooks.example.com", "second")])).await;
    register(&client, configuration("a-config", vec![hook("a.hooks.example.com", "first")])).await;
    let pods: Api<Pod> = Api::namespaced(client.clone(), "shop");
    let created = pods.create(&PostParams::default(), &labelled("web")).await.unwrap();
    let labels = created.metadata.labels.unwrap();
    assert_eq!((labels["order-a"].as_str(), labels["order-z"].as_str()), ("0", "1"));
    assert_eq!(second.seen()[0].review["request"]["object"]["metadata"]["labels"]["order-a"], "0");
    let order: Vec<String> = server.webhook_calls().into_iter().map(|c| c.configuration).collect();
    assert_eq!(order, ["a-config", "z-config"]);
}

#[tokio::test]
async fn dry_run_and_server_side_apply_creates_are_admitted_too() {
    let (server, client, webhook, _ca) = setup(Reply::Inject(None)).await;
    let pods: Api<Pod> = Api::namespaced(client.clone(), "shop");
    let dry = pods.create(&PostParams { dry_run: true, ..Default::default() }, &labelled("dry")).await.unwrap();
    assert_eq!(dry.spec.unwrap().containers.len(), 2);
    assert!(server.get_object("/api/v1/namespaces/shop/pods/dry").is_none());
    let request = &webhook.seen()[0].review["request"];
    assert_eq!(request["dryRun"], true);
    assert_eq!(request["options"]["dryRun"], json!(["All"]));

    let applied =
        pods.patch("applied", &PatchParams::apply("test"), &Patch::Apply(&labelled("applied"))).await.unwrap();
    assert_eq!(applied.spec.unwrap().containers.len(), 2);
    let request = &webhook.seen()[1].review["request"];
    assert_eq!(
        (request["operation"].as_str(), request["options"]["kind"].as_str()),
        (Some("CREATE"), Some("PatchOptions"))
    );
    assert_eq!(request["options"]["fieldManager"], "test");
    // Applying again updates: no webhook call.
    pods.patch("applied", &PatchParams::apply("test"), &Patch::Apply(&labelled("applied"))).await.unwrap();
    assert_eq!(webhook.seen().len(), 2);
}

#[tokio::test]
async fn webhook_configurations_are_served_defaulted_and_validated() {
    let server = KubeTestServer::start();
    let client = client(&server).await;
    let (status, _, discovery) = raw(&client, "GET", "/apis/admissionregistration.k8s.io/v1", None, "").await;
    assert_eq!(status, 200);
    let resources: Vec<(&str, bool, &str)> = discovery["resources"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| (r["name"].as_str().unwrap(), r["namespaced"].as_bool().unwrap(), r["kind"].as_str().unwrap()))
        .collect();
    assert!(resources.contains(&("mutatingwebhookconfigurations", false, "MutatingWebhookConfiguration")));
    assert!(resources.contains(&("validatingwebhookconfigurations", false, "ValidatingWebhookConfiguration")));
    let (_, _, groups) = raw(&client, "GET", "/apis", None, "").await;
    assert!(groups["groups"].as_array().unwrap().iter().any(|g| g["name"] == "admissionregistration.k8s.io"));

    let created = register(&client, configuration("kubetoken", vec![inject_hook(None)])).await;
    assert_eq!(created.metadata.generation, Some(1));
    let hook = &created.webhooks.as_ref().unwrap()[0];
    assert_eq!(hook.failure_policy.as_deref(), Some("Fail"));
    assert_eq!(hook.match_policy.as_deref(), Some("Equivalent"));
    assert_eq!(hook.reinvocation_policy.as_deref(), Some("Never"));
    assert_eq!(hook.rules.as_ref().unwrap()[0].scope.as_deref(), Some("*"));

    // Merge patch of the whole list (what a JSON merge patch must send).
    let api: Api<MutatingWebhookConfiguration> = Api::all(client.clone());
    let mut hooks = serde_json::to_value(created.webhooks.unwrap()).unwrap();
    hooks[0]["clientConfig"]["caBundle"] = json!(base64::engine::general_purpose::STANDARD.encode("PEM"));
    let patched =
        api.patch("kubetoken", &PatchParams::default(), &Patch::Merge(&json!({"webhooks": hooks}))).await.unwrap();
    assert_eq!(patched.webhooks.unwrap()[0].client_config.ca_bundle, Some(ByteString(b"PEM".to_vec())));
    assert_eq!(patched.metadata.generation, Some(2));

    // Invalid: sideEffects is required, timeoutSeconds is 1..=30.
    let mut bad = inject_hook(None);
    bad.side_effects = String::new();
    bad.timeout_seconds = Some(31);
    let (code, reason, message) = refusal(api.create(&PostParams::default(), &configuration("bad", vec![bad])).await);
    assert_eq!((code, reason.as_str()), (422, "Invalid"));
    assert!(message.contains("webhooks[0].sideEffects") && message.contains("webhooks[0].timeoutSeconds"), "{message}");

    // Validating webhook configurations are stored.
    let (status, _, _) = raw(
        &client,
        "POST",
        "/apis/admissionregistration.k8s.io/v1/validatingwebhookconfigurations",
        Some("application/json"),
        r#"{"apiVersion": "admissionregistration.k8s.io/v1", "kind": "ValidatingWebhookConfiguration",
            "metadata": {"name": "v"}, "webhooks": []}"#,
    )
    .await;
    assert_eq!(status, 201);
    assert!(server.get_object("/apis/admissionregistration.k8s.io/v1/validatingwebhookconfigurations/v").is_some());
}

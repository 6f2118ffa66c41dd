//! The mutating admission webhook: every controller replica (leader or not) serves it, so that pods can be created
//! while any replica runs. A Pod labelled `kubetoken.io/inject: <application>` gets the sidecar `kubetoken inject`
//! adds; the MutatingWebhookConfiguration (rendered by the chart) selects only such pods, so its
//! `failurePolicy: Fail` never concerns anyone else's.
//!
//! - [`admission`]: the decision for one review, pure.
//! - [`certs`]: the controller-managed CA and serving certificate, pure.
//! - [`cert_sync`]: keeping that Secret, the configuration's `caBundle` and the served certificate in step.

pub mod admission;
pub mod cert_sync;
pub mod certs;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use kube::api::Api;
use rustls::server::ResolvesServerCert;
use tokio::sync::watch;

use self::admission::{Refusal, Request};
use self::cert_sync::CertSync;
use super::metrics::ControllerMetrics;
use crate::api::v1alpha1::OAuthApplication;
use crate::core::clock::Clock;
use crate::http::tls::{ReloadingCert, SwappableCert, TlsFiles};
use crate::inject::InjectOptions;

/// The path the configuration calls.
pub const MUTATE_PODS_PATH: &str = "/mutate-pods";
/// Looking the application up must leave the API server's call time to spare: at most this, and never past the
/// `timeout` the API server sends, less a margin.
const LOOKUP_TIMEOUT: Duration = Duration::from_secs(3);
const LOOKUP_MARGIN: Duration = Duration::from_millis(500);

/// Where the webhook's certificate comes from.
#[derive(Clone, Debug)]
pub enum WebhookCertSource {
    /// Files another party keeps (cert-manager's Secret, mounted), which also sets the configuration's `caBundle`
    /// (cert-manager's CA injector).
    Files(TlsFiles),
    /// The controller keeps a CA and the serving certificate in a Secret of its namespace, and the `caBundle` of
    /// the configuration.
    Managed {
        namespace: String,
        secret: String,
        configuration: String,
        /// The webhook Service's name (in `namespace`): the certificate's DNS names.
        service: String,
    },
}

#[derive(Clone, Debug)]
pub struct WebhookOptions {
    pub listen: SocketAddr,
    pub certs: WebhookCertSource,
    /// The image of the injected sidecar.
    pub sidecar_image: String,
    /// Namespace → the PostgreSQL Secret of the sidecars injected there (the pod's annotation wins).
    pub postgres_secrets: std::collections::BTreeMap<String, String>,
    /// Namespace → the Secret with the CA of that PostgreSQL server (the pod's annotation wins).
    pub postgres_ca_secrets: std::collections::BTreeMap<String, String>,
}

struct WebhookState {
    client: kube::Client,
    sidecar_image: String,
    postgres_secrets: std::collections::BTreeMap<String, String>,
    postgres_ca_secrets: std::collections::BTreeMap<String, String>,
    metrics: Arc<ControllerMetrics>,
}

/// Serves the webhook; returns its URL and whether it serves a certificate yet (managed certificates come from the
/// API server, so a replica is ready only once it has one).
pub async fn start(
    client: kube::Client,
    opts: WebhookOptions,
    clock: Arc<dyn Clock>,
    metrics: Arc<ControllerMetrics>,
) -> Result<(String, watch::Receiver<bool>), String> {
    let (ready_tx, ready_rx) = watch::channel(false);
    let resolver: Arc<dyn ResolvesServerCert> = match &opts.certs {
        WebhookCertSource::Files(files) => {
            let cert = ReloadingCert::load(files.clone())?;
            cert.watch(crate::http::tls::RELOAD_CHECK_INTERVAL);
            let _ = ready_tx.send(true);
            cert
        }
        WebhookCertSource::Managed { namespace, secret, configuration, service } => {
            let served = Arc::new(SwappableCert::default());
            let sync = CertSync {
                secrets: Api::namespaced(client.clone(), namespace),
                configurations: Api::all(client.clone()),
                secret_name: secret.clone(),
                configuration_name: configuration.clone(),
                dns_names: vec![
                    format!("{service}.{namespace}.svc"),
                    format!("{service}.{namespace}.svc.cluster.local"),
                ],
                clock,
                served: served.clone(),
            };
            tokio::spawn(sync.run(ready_tx));
            served
        }
    };
    let tls = crate::http::tls::server_config_with(resolver)?;
    let listener = crate::http::serve::ServeListener::bind(opts.listen, Some(tls)).await?;
    let url = listener.url();
    let state = Arc::new(WebhookState {
        client,
        sidecar_image: opts.sidecar_image,
        postgres_secrets: opts.postgres_secrets,
        postgres_ca_secrets: opts.postgres_ca_secrets,
        metrics,
    });
    let router = Router::new().route(MUTATE_PODS_PATH, post(mutate_pods)).with_state(state);
    tokio::spawn(async move {
        let limits = crate::http::serve::ConnectionLimits::default();
        if let Err(e) = crate::http::serve::serve(listener, router, limits, std::future::pending()).await {
            tracing::error!(error = %e, "admission webhook server stopped");
        }
    });
    Ok((url, ready_rx))
}

/// The API server's `?timeout=5s` (whole seconds, as it sends it).
fn call_timeout(query: Option<&str>) -> Option<Duration> {
    let value = form_urlencoded::parse(query?.as_bytes()).find(|(k, _)| k == "timeout")?.1;
    value.strip_suffix('s')?.parse().ok().map(Duration::from_secs)
}

/// A failure of this webhook rather than a decision about the pod: answered with 500, so that the configuration's
/// failure policy decides (Fail refuses the pod, Ignore admits it without the sidecar).
struct CallFailure(String);

async fn mutate_pods(State(state): State<Arc<WebhookState>>, uri: axum::http::Uri, body: Bytes) -> Response {
    let review = match admission::parse(&body) {
        Ok(review) => review,
        Err(e) => {
            tracing::warn!(error = %e, "admission webhook: malformed review");
            return (StatusCode::BAD_REQUEST, e).into_response();
        }
    };
    let Some(request) = review.request.as_ref() else {
        return (StatusCode::BAD_REQUEST, "the AdmissionReview has no request").into_response();
    };
    let lookup_timeout = call_timeout(uri.query())
        .map_or(LOOKUP_TIMEOUT, |t| t.saturating_sub(LOOKUP_MARGIN).clamp(Duration::from_millis(200), LOOKUP_TIMEOUT));
    let outcome = match admission::classify(request) {
        Ok(Request::NotOurs) => Ok(Vec::new()),
        Ok(Request::Inject { namespace, application, pod }) => {
            match inject(&state, namespace, application, pod, lookup_timeout).await {
                Ok(outcome) => outcome,
                Err(CallFailure(reason)) => {
                    tracing::warn!(%namespace, %application, %reason, "admission webhook: cannot decide; the failure policy will");
                    return (StatusCode::INTERNAL_SERVER_ERROR, reason).into_response();
                }
            }
        }
        Err(refusal) => Err(refusal),
    };
    match &outcome {
        Ok(patch) if patch.is_empty() => {}
        Ok(_) => state.metrics.count_admission("injected"),
        Err(refusal) => {
            state.metrics.count_admission("refused");
            tracing::info!(namespace = ?request.namespace, code = refusal.code, reason = %refusal.message, "pod refused");
        }
    }
    axum::Json(admission::response(&request.uid, outcome)).into_response()
}

async fn inject(
    state: &WebhookState,
    namespace: &str,
    application: &str,
    pod: &serde_json::Value,
    lookup_timeout: Duration,
) -> Result<Result<Vec<serde_json::Value>, Refusal>, CallFailure> {
    let apps: Api<OAuthApplication> = Api::namespaced(state.client.clone(), namespace);
    let app = match tokio::time::timeout(lookup_timeout, apps.get_opt(application)).await {
        Ok(Ok(Some(app))) => app,
        Ok(Ok(None)) => {
            return Ok(Err(Refusal::new(
                404,
                format!(
                    "the pod's label {} names the OAuthApplication {application}, which does not exist in namespace \
                     {namespace}: create it first",
                    admission::INJECT_LABEL
                ),
            )));
        }
        Ok(Err(e)) => return Err(CallFailure(format!("cannot read the OAuthApplication {application}: {e}"))),
        Err(_) => return Err(CallFailure(format!("reading the OAuthApplication {application} timed out"))),
    };
    // The sidecar reads its application with the pod's ServiceAccount: with another one it could never start.
    if let Some(expected) = app.spec.sidecar.as_ref().map(|s| s.service_account_name.as_str()) {
        let actual = pod["spec"]["serviceAccountName"].as_str().filter(|s| !s.is_empty()).unwrap_or("default");
        if actual != expected {
            return Ok(Err(Refusal::new(
                400,
                format!(
                    "the OAuthApplication {application} grants its sidecar access to the ServiceAccount {expected} \
                     (spec.sidecar.serviceAccountName), but the pod runs as {actual}: the sidecar could not read \
                     its application"
                ),
            )));
        }
    }
    let opts = InjectOptions {
        application: application.to_string(),
        image: state.sidecar_image.clone(),
        credentials_secret: app.spec.credentials_secret_name(application),
        postgres_secret: admission::named_object(
            pod,
            admission::POSTGRES_SECRET_ANNOTATION,
            namespace,
            &state.postgres_secrets,
        ),
        postgres_ca_secret: admission::named_object(
            pod,
            admission::POSTGRES_CA_SECRET_ANNOTATION,
            namespace,
            &state.postgres_ca_secrets,
        ),
        issuer_ca_config_map: admission::named_object(
            pod,
            admission::ISSUER_CA_CONFIG_MAP_ANNOTATION,
            namespace,
            &Default::default(),
        ),
    };
    Ok(admission::injection_patch(pod, &opts))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_api_servers_timeout_parameter_is_read() {
        assert_eq!(call_timeout(Some("timeout=5s")), Some(Duration::from_secs(5)));
        assert_eq!(call_timeout(Some("a=b&timeout=2s")), Some(Duration::from_secs(2)));
        assert_eq!(call_timeout(Some("timeout=soon")), None);
        assert_eq!(call_timeout(None), None);
    }
}

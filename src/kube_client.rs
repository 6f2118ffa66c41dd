//! The Kubernetes client every in-cluster role uses: KUBECONFIG or the in-cluster service account, with a
//! `User-Agent` naming the role, so that API server audit logs (and the RBAC audit in the tests) can tell the
//! controller's requests from the sidecars'.

use axum::http::{HeaderName, HeaderValue};

/// A client for `component` (`controller` or `sidecar`).
pub async fn client(component: &str) -> Result<kube::Client, String> {
    let mut config = kube::Config::infer()
        .await
        .map_err(|e| format!("cannot find a Kubernetes API (KUBECONFIG or in-cluster): {e}"))?;
    let agent = format!("kubetoken-{component}/{}", env!("CARGO_PKG_VERSION"));
    let value = HeaderValue::from_str(&agent).map_err(|e| format!("user agent: {e}"))?;
    config.headers.push((HeaderName::from_static("user-agent"), value));
    kube::Client::try_from(config).map_err(|e| format!("cannot reach the Kubernetes API: {e}"))
}

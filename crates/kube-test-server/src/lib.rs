//! An in-memory Kubernetes API server for tests.
//!
//! [`KubeTestServer::start`] serves a useful subset of the Kubernetes API on `127.0.0.1` (random port) from its own
//! thread and tokio runtime, so sync and async tests can use it alike, and writes a kubeconfig that `kube::Client`
//! and `kubectl` can use. Secrets, configmaps, events, namespaces, leases, CustomResourceDefinitions and the custom
//! resources they define are served with the semantics controllers depend on: resourceVersion conflicts,
//! generation, the status subresource, finalizers, owner-reference garbage collection, selectors, watches with
//! bookmarks and `410 Gone`, server-side apply. Mutating admission webhooks (MutatingWebhookConfigurations) are
//! called over HTTPS on CREATE; [`KubeTestServer::set_service_address`] says where a webhook's Service is. Faults
//! can be injected: failing requests, latency, closed watches.
//!
//! See the crate's README for what is deliberately left out.
#![forbid(unsafe_code)]

mod admission;
mod error;
mod http;
mod protobuf;
mod selector;
mod store;
mod types;
mod util;

use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use serde_json::Value;

pub use crate::admission::{WebhookCall, WebhookOutcome};
pub use crate::error::ApiError;
use crate::http::{Faults, Route, Shared, parse_path};
use crate::store::{DeleteOptions, State};

/// One request the server received (recorded before fault injection and latency).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RequestRecord {
    /// `GET`, `POST`...
    pub method: String,
    /// The URL path, e.g. `/api/v1/namespaces/default/secrets`.
    pub path: String,
    /// The raw query string (may be empty).
    pub query: String,
    /// The `User-Agent` header (empty when absent): tells which client made the request.
    pub user_agent: String,
    /// The status answered (0 until the answer is made; a watch records its 200 when the stream starts).
    pub status: u16,
}

impl RequestRecord {
    /// Whether this was a watch request (`watch=true`/`watch=1` or a `/watch/` path).
    pub fn is_watch(&self) -> bool {
        self.path.contains("/watch/")
            || form_urlencoded::parse(self.query.as_bytes()).any(|(k, v)| k == "watch" && (v == "true" || v == "1"))
    }
}

/// A running test API server. Dropping it stops the server (open watches end, connections are closed).
pub struct KubeTestServer {
    shared: Arc<Shared>,
    kubeconfig_path: PathBuf,
    _dir: tempfile::TempDir,
    shutdown: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<JoinHandle<()>>,
}

impl KubeTestServer {
    /// Starts a server on `127.0.0.1` with a random port. Panics if it cannot (see [`KubeTestServer::try_start`]).
    pub fn start() -> Self {
        Self::try_start().expect("start kube-test-server")
    }

    /// Starts a server on `127.0.0.1` with a random port.
    pub fn try_start() -> std::io::Result<Self> {
        Self::start_on(SocketAddr::from(([127, 0, 0, 1], 0)))
    }

    /// Starts a server on the given address (port 0: a random port).
    pub fn start_on(addr: SocketAddr) -> std::io::Result<Self> {
        let listener = TcpListener::bind(addr)?;
        listener.set_nonblocking(true)?;
        let addr = listener.local_addr()?;
        let shared = Arc::new(Shared {
            state: Mutex::new(State::new()),
            faults: Mutex::new(Faults::default()),
            requests: Mutex::new(Vec::new()),
            addr,
            service_addresses: Mutex::new(Default::default()),
            webhook_calls: Mutex::new(Vec::new()),
        });
        let dir = tempfile::Builder::new().prefix("kube-test-server-").tempdir()?;
        let kubeconfig_path = dir.path().join("kubeconfig");
        std::fs::write(&kubeconfig_path, kubeconfig_yaml(addr))?;
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("kube-test-server")
            .enable_all()
            .build()?;
        let (shutdown_tx, shutdown_rx) = tokio::sync::oneshot::channel::<()>();
        let app = http::router(shared.clone());
        let thread = std::thread::Builder::new().name("kube-test-server".into()).spawn(move || {
            runtime.block_on(async move {
                let listener = match tokio::net::TcpListener::from_std(listener) {
                    Ok(l) => l,
                    Err(e) => {
                        tracing::error!("kube-test-server: cannot listen: {e}");
                        return;
                    }
                };
                tokio::select! {
                    result = async { axum::serve(listener, app).await } => {
                        if let Err(e) = result {
                            tracing::error!("kube-test-server stopped: {e}");
                        }
                    }
                    _ = shutdown_rx => {}
                }
            });
            // Drops every connection task, including open watch streams.
            runtime.shutdown_background();
        })?;
        Ok(Self { shared, kubeconfig_path, _dir: dir, shutdown: Some(shutdown_tx), thread: Some(thread) })
    }

    /// `http://127.0.0.1:PORT`
    pub fn url(&self) -> String {
        format!("http://{}", self.shared.addr)
    }

    /// The address the server listens on.
    pub fn addr(&self) -> SocketAddr {
        self.shared.addr
    }

    /// A kubeconfig file (in a temporary directory that lives as long as the server): one cluster with
    /// `server: http://127.0.0.1:PORT`, a user without credentials, a context (namespace `default`) that is the
    /// current context.
    pub fn kubeconfig_path(&self) -> &Path {
        &self.kubeconfig_path
    }

    /// The kubeconfig's text.
    pub fn kubeconfig_yaml(&self) -> String {
        kubeconfig_yaml(self.shared.addr)
    }

    /// The next `n` requests (any request, discovery included) are answered with `status` (e.g. 500, 503, 429)
    /// and a `Status` body; a 429 carries `Retry-After: 1`. Replaces any pending injected failures.
    pub fn fail_next(&self, n: u32, status: u16) {
        let mut f = self.shared.faults();
        f.fail_remaining = n;
        f.fail_status = status;
    }

    /// The next `n` writes (PUT or PATCH) to `api_path` (e.g. `/api/v1/namespaces/ns/secrets/name`) answer
    /// 409 Conflict, as when another writer changed the object first; other requests are unaffected.
    pub fn conflict_next_writes(&self, api_path: &str, n: u32) {
        let mut f = self.shared.faults();
        f.conflict_path = api_path.to_string();
        f.conflict_remaining = n;
    }

    /// The next `n` writes (PUT or PATCH) to a path starting with `api_path_prefix` are applied at once and answered
    /// only after `delay`: a client whose timeout is shorter gives up on a write that landed.
    pub fn answer_late(&self, api_path_prefix: &str, n: u32, delay: Duration) {
        let mut f = self.shared.faults();
        f.late_prefix = api_path_prefix.to_string();
        f.late_remaining = n;
        f.late_delay = delay;
        f.late_status = None;
    }

    /// The next `n` writes (PUT or PATCH) to a path starting with `api_path_prefix` are applied, and answered with
    /// `status` (e.g. 504 Gateway Timeout) instead of their result: the client cannot tell that its write landed.
    pub fn fail_after_applying(&self, api_path_prefix: &str, n: u32, status: u16) {
        let mut f = self.shared.faults();
        f.late_prefix = api_path_prefix.to_string();
        f.late_remaining = n;
        f.late_delay = Duration::ZERO;
        f.late_status = Some(status);
    }

    /// How many injected conflicts are still pending.
    pub fn pending_conflicts(&self) -> u32 {
        self.shared.faults().conflict_remaining
    }

    /// How many injected failures are still pending.
    pub fn pending_failures(&self) -> u32 {
        self.shared.faults().fail_remaining
    }

    /// Delays every request (before it is handled) by `latency`. `Duration::ZERO` turns it off.
    pub fn set_latency(&self, latency: Duration) {
        self.shared.faults().latency = latency;
    }

    /// Ends every open watch stream now (clients see a normal end of stream and re-watch).
    pub fn close_watches(&self) {
        self.shared.state().close_watches();
    }

    /// Open watch streams.
    pub fn open_watches(&self) -> usize {
        self.shared.state().open_watches()
    }

    /// Forgets the watch history: a watch from any resourceVersion older than the current one then gets an
    /// `ERROR` event with a `410 Expired` Status (clients relist).
    pub fn compact_history(&self) {
        self.shared.state().compact_history();
    }

    /// The current (global) resourceVersion.
    pub fn resource_version(&self) -> u64 {
        self.shared.state().resource_version()
    }

    /// Every request received so far (at most 100,000 are kept).
    pub fn requests(&self) -> Vec<RequestRecord> {
        self.shared.requests().clone()
    }

    /// How many requests were received so far.
    pub fn request_count(&self) -> usize {
        self.shared.requests().len()
    }

    /// Forgets the recorded requests.
    pub fn clear_requests(&self) {
        self.shared.requests().clear();
    }

    /// The object at an API path such as `/api/v1/namespaces/ns/secrets/name` or
    /// `/apis/kubetoken.io/v1alpha1/namespaces/ns/oauthapplications/shop`, as a GET would return it.
    pub fn get_object(&self, api_path: &str) -> Option<Value> {
        let Route::Resource(rp) = parse_path(api_path) else { return None };
        let state = self.shared.state();
        let rt = state.lookup_type(&rp.group, &rp.version, &rp.plural)?;
        state.peek(&rt, rp.namespace.as_deref(), rp.name.as_deref()?)
    }

    /// The objects of a collection path such as `/api/v1/namespaces/ns/secrets` or `/api/v1/secrets` (all
    /// namespaces). Empty if the path serves nothing.
    pub fn list_objects(&self, collection_path: &str) -> Vec<Value> {
        let Route::Resource(rp) = parse_path(collection_path) else { return Vec::new() };
        let state = self.shared.state();
        let Some(rt) = state.lookup_type(&rp.group, &rp.version, &rp.plural) else { return Vec::new() };
        state.list(&rt, rp.namespace.as_deref(), &Default::default(), &Default::default())
    }

    /// Routes calls of admission webhooks whose `clientConfig.service` is `namespace/name` to `addr` (whatever the
    /// service port). The TLS server name stays `NAME.NAMESPACE.svc`. Without an address, calls to that service
    /// fail as when it has no endpoints (then the webhook's `failurePolicy` decides).
    pub fn set_service_address(&self, namespace: &str, name: &str, addr: SocketAddr) {
        self.shared.service_addresses().insert((namespace.to_string(), name.to_string()), addr);
    }

    /// Forgets the address of `namespace/name`: webhook calls to that service fail again (a webhook outage).
    pub fn clear_service_address(&self, namespace: &str, name: &str) {
        self.shared.service_addresses().remove(&(namespace.to_string(), name.to_string()));
    }

    /// Every mutating webhook call made so far (at most 100,000 are kept), in order.
    pub fn webhook_calls(&self) -> Vec<WebhookCall> {
        self.shared.webhook_calls().clone()
    }

    /// Forgets the recorded webhook calls.
    pub fn clear_webhook_calls(&self) {
        self.shared.webhook_calls().clear();
    }

    /// Creates an object as a POST to `collection_path` would (e.g. to seed a test), but without admission: no
    /// webhook is called (as if it were written to etcd directly).
    pub fn create_object(&self, collection_path: &str, object: Value) -> Result<Value, ApiError> {
        let Route::Resource(rp) = parse_path(collection_path) else { return Err(ApiError::no_route()) };
        let mut state = self.shared.state();
        let rt = state.lookup_type(&rp.group, &rp.version, &rp.plural).ok_or_else(ApiError::no_route)?;
        if rt.namespaced != rp.namespace.is_some() || rp.name.is_some() {
            return Err(ApiError::no_route());
        }
        state.create(&rt, rp.namespace.as_deref(), object, false)
    }

    /// Deletes an object as a DELETE (background propagation) to `api_path` would.
    pub fn delete_object(&self, api_path: &str) -> Result<Value, ApiError> {
        let Route::Resource(rp) = parse_path(api_path) else { return Err(ApiError::no_route()) };
        let mut state = self.shared.state();
        let rt = state.lookup_type(&rp.group, &rp.version, &rp.plural).ok_or_else(ApiError::no_route)?;
        let name = rp.name.as_deref().ok_or_else(ApiError::no_route)?;
        state.delete(&rt, rp.namespace.as_deref(), name, &DeleteOptions::default())
    }

    /// The object with this `metadata.uid`, wherever it is.
    pub fn get_by_uid(&self, uid: &str) -> Option<Value> {
        self.shared.state().by_uid(uid)
    }
}

impl Drop for KubeTestServer {
    fn drop(&mut self) {
        self.shared.state().close_watches();
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

impl std::fmt::Debug for KubeTestServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KubeTestServer").field("url", &self.url()).field("kubeconfig", &self.kubeconfig_path).finish()
    }
}

fn kubeconfig_yaml(addr: SocketAddr) -> String {
    format!(
        "apiVersion: v1
kind: Config
clusters:
- name: kube-test-server
  cluster:
    server: http://{addr}
contexts:
- name: kube-test-server
  context:
    cluster: kube-test-server
    user: kube-test-server
    namespace: default
current-context: kube-test-server
users:
- name: kube-test-server
  user: {{}}
preferences: {{}}
"
    )
}

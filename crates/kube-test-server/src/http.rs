//! The HTTP surface: routing, discovery, the REST verbs, watch streams, Table output, fault injection.

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::{Request, State as AxumState};
use axum::http::{HeaderMap, Method, StatusCode, header};
use axum::response::Response;
use serde_json::{Value, json};
use tokio::sync::mpsc;

use crate::RequestRecord;
use crate::admission::{CreateRequest, WebhookCall, admit_create};
use crate::error::ApiError;
use crate::selector::{FieldSelector, LabelSelector};
use crate::store::{
    DeleteOptions, PatchKind, Propagation, State, Sub, WatchFilter, WatchStart, apply_config, meta_mut, meta_str,
};
use crate::types::ResourceType;
use crate::util::{human_age, parse_rfc3339, unix_now};

const MAX_BODY: usize = 16 * 1024 * 1024;
const MAX_RECORDED_REQUESTS: usize = 100_000;
pub(crate) const BOOKMARK_INTERVAL: Duration = Duration::from_secs(1);

#[derive(Default)]
pub(crate) struct Faults {
    pub fail_remaining: u32,
    pub fail_status: u16,
    pub latency: Duration,
    /// The next writes (PUT, PATCH) to this path answer 409 Conflict, as if another writer got there first.
    pub conflict_path: String,
    pub conflict_remaining: u32,
    /// The next writes to paths with this prefix are applied, then answered only after `late_delay`: a client that
    /// gives up first does not know its write landed.
    pub late_prefix: String,
    pub late_remaining: u32,
    pub late_delay: Duration,
    /// Instead of the write's own answer, this status (e.g. 504, as an API server whose etcd call timed out).
    pub late_status: Option<u16>,
}

/// Everything the server and the test handle share.
pub(crate) struct Shared {
    pub state: Mutex<State>,
    pub faults: Mutex<Faults>,
    pub requests: Mutex<Vec<RequestRecord>>,
    pub addr: SocketAddr,
    /// Where webhooks' `clientConfig.service` (namespace, name) are reached.
    pub service_addresses: Mutex<HashMap<(String, String), SocketAddr>>,
    pub webhook_calls: Mutex<Vec<WebhookCall>>,
}

impl Shared {
    pub(crate) fn state(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub(crate) fn faults(&self) -> MutexGuard<'_, Faults> {
        self.faults.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub(crate) fn requests(&self) -> MutexGuard<'_, Vec<RequestRecord>> {
        self.requests.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub(crate) fn service_addresses(&self) -> MutexGuard<'_, HashMap<(String, String), SocketAddr>> {
        self.service_addresses.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub(crate) fn service_address(&self, namespace: &str, name: &str) -> Option<SocketAddr> {
        self.service_addresses().get(&(namespace.to_string(), name.to_string())).copied()
    }

    pub(crate) fn webhook_calls(&self) -> MutexGuard<'_, Vec<WebhookCall>> {
        self.webhook_calls.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub(crate) fn record_webhook_call(&self, call: WebhookCall) {
        let mut calls = self.webhook_calls();
        if calls.len() < MAX_RECORDED_REQUESTS {
            calls.push(call);
        }
    }
}

pub(crate) fn router(shared: Arc<Shared>) -> Router {
    Router::new().fallback(handle).with_state(shared)
}

/// A parsed request path.
#[derive(Debug, PartialEq)]
pub(crate) enum Route {
    Version,
    /// `/openapi/v2`: an empty schema document (clients that validate, like Helm, then skip what it lacks).
    OpenApiV2,
    Health,
    Api,
    Apis,
    Group(String),
    GroupVersion {
        group: String,
        version: String,
    },
    Resource(ResourcePath),
    NotFound,
}

#[derive(Debug, PartialEq)]
pub(crate) struct ResourcePath {
    pub group: String,
    pub version: String,
    pub namespace: Option<String>,
    pub plural: String,
    pub name: Option<String>,
    pub sub: Option<String>,
    pub watch_prefix: bool,
}

pub(crate) fn parse_path(path: &str) -> Route {
    let segs: Vec<&str> = path.split('/').filter(|s| !s.is_empty()).collect();
    match segs.as_slice() {
        ["version"] => Route::Version,
        ["openapi", "v2"] => Route::OpenApiV2,
        ["healthz" | "livez" | "readyz", ..] => Route::Health,
        ["api"] => Route::Api,
        ["api", v] => Route::GroupVersion { group: String::new(), version: v.to_string() },
        ["api", v, rest @ ..] => resource_route("", v, rest),
        ["apis"] => Route::Apis,
        ["apis", g] => Route::Group(g.to_string()),
        ["apis", g, v] => Route::GroupVersion { group: g.to_string(), version: v.to_string() },
        ["apis", g, v, rest @ ..] => resource_route(g, v, rest),
        _ => Route::NotFound,
    }
}

fn resource_route(group: &str, version: &str, rest: &[&str]) -> Route {
    let (watch_prefix, rest) = match rest {
        ["watch", rest @ ..] => (true, rest),
        _ => (false, rest),
    };
    let make = |namespace: Option<&str>, plural: &str, tail: &[&str]| {
        Route::Resource(ResourcePath {
            group: group.into(),
            version: version.into(),
            namespace: namespace.map(String::from),
            plural: plural.into(),
            name: tail.first().map(|s| s.to_string()),
            sub: tail.get(1).map(|s| s.to_string()),
            watch_prefix,
        })
    };
    match rest {
        // namespaces/{name}/status is the Namespace's own subresource.
        ["namespaces", ns, plural, tail @ ..] if !(tail.is_empty() && matches!(*plural, "status" | "finalize")) => {
            if tail.len() <= 2 {
                make(Some(ns), plural, tail)
            } else {
                Route::NotFound
            }
        }
        [plural, tail @ ..] if tail.len() <= 2 => make(None, plural, tail),
        _ => Route::NotFound,
    }
}

struct Query(Vec<(String, String)>);

impl Query {
    fn parse(q: Option<&str>) -> Self {
        Self(form_urlencoded::parse(q.unwrap_or_default().as_bytes()).into_owned().collect())
    }

    fn get(&self, name: &str) -> Option<&str> {
        self.0.iter().rev().find(|(k, _)| k == name).map(|(_, v)| v.as_str())
    }

    fn flag(&self, name: &str) -> bool {
        matches!(self.get(name), Some("true" | "1" | "True"))
    }

    fn dry_run(&self) -> bool {
        self.0.iter().any(|(k, v)| k == "dryRun" && v == "All")
    }
}

fn json_response(code: u16, body: &Value) -> Response {
    let mut bytes = serde_json::to_vec(body).unwrap_or_default();
    bytes.push(b'\n');
    Response::builder()
        .status(StatusCode::from_u16(code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR))
        .header(header::CONTENT_TYPE, "application/json")
        .body(Body::from(bytes))
        .unwrap_or_default()
}

fn error_response(err: &ApiError) -> Response {
    let mut resp = json_response(err.code, &err.to_status());
    if err.code == 429 {
        resp.headers_mut().insert(header::RETRY_AFTER, header::HeaderValue::from_static("1"));
    }
    resp
}

async fn handle(AxumState(shared): AxumState<Arc<Shared>>, req: Request) -> Response {
    let recorded = {
        let mut requests = shared.requests();
        (requests.len() < MAX_RECORDED_REQUESTS).then(|| {
            requests.push(RequestRecord {
                method: req.method().to_string(),
                path: req.uri().path().to_string(),
                query: req.uri().query().unwrap_or_default().to_string(),
                user_agent: req
                    .headers()
                    .get(header::USER_AGENT)
                    .and_then(|v| v.to_str().ok())
                    .unwrap_or_default()
                    .to_string(),
                status: 0,
            });
            requests.len() - 1
        })
    };
    let response = respond(shared.clone(), req).await;
    // (A `clear_requests` meanwhile moves the indexes: then this request is simply not found.)
    if let Some(i) = recorded
        && let Some(r) = shared.requests().get_mut(i).filter(|r| r.status == 0)
    {
        r.status = response.status().as_u16();
    }
    response
}

async fn respond(shared: Arc<Shared>, req: Request) -> Response {
    let late = {
        let mut f = shared.faults();
        let write = req.method() == axum::http::Method::PUT || req.method() == axum::http::Method::PATCH;
        if write && f.late_remaining > 0 && !f.late_prefix.is_empty() && req.uri().path().starts_with(&f.late_prefix) {
            f.late_remaining -= 1;
            Some((f.late_delay, f.late_status))
        } else {
            None
        }
    };
    let response = respond_now(shared, req).await;
    match late {
        Some((delay, status)) => {
            tokio::time::sleep(delay).await;
            match status {
                Some(code) => error_response(&ApiError::for_status(code)),
                None => response,
            }
        }
        None => response,
    }
}

async fn respond_now(shared: Arc<Shared>, req: Request) -> Response {
    let (parts, body) = req.into_parts();
    let (method, uri, headers) = (parts.method, parts.uri, parts.headers);
    tracing::debug!(%method, %uri, "kube-test-server request");
    let (latency, fault) = {
        let mut f = shared.faults();
        let write = method == axum::http::Method::PUT || method == axum::http::Method::PATCH;
        let fault = if f.fail_remaining > 0 {
            f.fail_remaining -= 1;
            Some(f.fail_status)
        } else if f.conflict_remaining > 0 && write && uri.path() == f.conflict_path {
            f.conflict_remaining -= 1;
            Some(409)
        } else {
            None
        };
        (f.latency, fault)
    };
    if !latency.is_zero() {
        tokio::time::sleep(latency).await;
    }
    if let Some(code) = fault {
        return error_response(&ApiError::for_status(code));
    }
    let body = match axum::body::to_bytes(body, MAX_BODY).await {
        Ok(b) => b,
        Err(e) => return error_response(&ApiError::bad_request(format!("cannot read the request body: {e}"))),
    };
    let query = Query::parse(uri.query());
    match parse_path(uri.path()) {
        Route::Version => json_response(200, &version()),
        Route::OpenApiV2 => {
            // An empty protobuf message is a valid, empty openapi_v2 Document.
            let protobuf =
                headers.get(header::ACCEPT).and_then(|v| v.to_str().ok()).is_some_and(|a| a.contains("protobuf"));
            if protobuf {
                Response::builder()
                    .header(header::CONTENT_TYPE, "application/com.github.proto-openapi.spec.v2.v1.0+protobuf")
                    .body(Body::empty())
                    .unwrap_or_default()
            } else {
                json_response(
                    200,
                    &json!({"swagger": "2.0", "info": {"title": "kube-test-server", "version": "v1.33.0"}, "paths": {}, "definitions": {}}),
                )
            }
        }
        Route::Health => {
            Response::builder().header(header::CONTENT_TYPE, "text/plain").body(Body::from("ok")).unwrap_or_default()
        }
        Route::Api => json_response(
            200,
            &json!({"kind": "APIVersions", "versions": ["v1"], "serverAddressByClientCIDRs": [
                {"clientCIDR": "0.0.0.0/0", "serverAddress": shared.addr.to_string()}]}),
        ),
        Route::Apis => json_response(200, &api_group_list(&shared.state())),
        Route::Group(g) => match api_group_list(&shared.state())["groups"]
            .as_array()
            .and_then(|gs| gs.iter().find(|x| x["name"] == json!(g)))
        {
            Some(group) => {
                let mut group = group.clone();
                group["kind"] = json!("APIGroup");
                group["apiVersion"] = json!("v1");
                json_response(200, &group)
            }
            None => error_response(&ApiError::no_route()),
        },
        Route::GroupVersion { group, version } => {
            let types = shared.state().registry.resources(&group, &version);
            if types.is_empty() {
                return error_response(&ApiError::no_route());
            }
            let gv = if group.is_empty() { version.clone() } else { format!("{group}/{version}") };
            let resources: Vec<Value> = types.iter().flat_map(|t| t.discovery_entries()).collect();
            json_response(
                200,
                &json!({"kind": "APIResourceList", "apiVersion": "v1", "groupVersion": gv, "resources": resources}),
            )
        }
        Route::Resource(rp) => match handle_resource(&shared, &method, &rp, &query, &headers, &body).await {
            Ok(resp) => resp,
            Err(e) => error_response(&e),
        },
        Route::NotFound => error_response(&ApiError::no_route()),
    }
}

fn version() -> Value {
    json!({
        "major": "1", "minor": "33", "gitVersion": "v1.33.0", "gitCommit": "kube-test-server",
        "gitTreeState": "clean", "buildDate": "2025-04-23T00:00:00Z", "goVersion": "go1.24.2",
        "compiler": "gc", "platform": "linux/amd64",
    })
}

fn api_group_list(state: &State) -> Value {
    let groups: Vec<Value> = state
        .registry
        .groups()
        .into_iter()
        .map(|(name, versions)| {
            let vs: Vec<Value> =
                versions.iter().map(|v| json!({"groupVersion": format!("{name}/{v}"), "version": v})).collect();
            let preferred = vs[0].clone();
            json!({"name": name, "versions": vs, "preferredVersion": preferred})
        })
        .collect();
    json!({"kind": "APIGroupList", "apiVersion": "v1", "groups": groups})
}

fn content_type(headers: &HeaderMap) -> String {
    headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .map(|s| s.split(';').next().unwrap_or_default().trim().to_ascii_lowercase())
        .unwrap_or_default()
}

fn parse_body(headers: &HeaderMap, body: &[u8]) -> Result<Value, ApiError> {
    let ct = content_type(headers);
    if ct == "application/vnd.kubernetes.protobuf" {
        return crate::protobuf::decode(body);
    }
    if ct.contains("protobuf") || ct.contains("cbor") {
        return Err(ApiError::new(
            415,
            "UnsupportedMediaType",
            format!(
                "the body of the request was in an unknown format - accepted media types include: application/json, application/yaml (got {ct})"
            ),
        ));
    }
    if ct.contains("yaml") {
        serde_yaml::from_slice(body).map_err(|e| ApiError::bad_request(format!("invalid YAML body: {e}")))
    } else {
        serde_json::from_slice(body).map_err(|e| ApiError::bad_request(format!("invalid JSON body: {e}")))
    }
}

fn delete_options(query: &Query, headers: &HeaderMap, body: &[u8]) -> Result<DeleteOptions, ApiError> {
    let mut opts = DeleteOptions { dry_run: query.dry_run(), ..Default::default() };
    let mut policy = query.get("propagationPolicy").map(String::from);
    // A protobuf DeleteOptions (client-go's typed clients, e.g. Helm's release storage) is taken as the defaults:
    // the query parameters still apply.
    let protobuf = content_type(headers).contains("protobuf");
    if !protobuf && !body.iter().all(u8::is_ascii_whitespace) {
        let b: Value = serde_json::from_slice(body)
            .map_err(|e| ApiError::bad_request(format!("invalid DeleteOptions body: {e}")))?;
        if let Some(p) = b.get("propagationPolicy").and_then(Value::as_str) {
            policy = Some(p.to_string());
        }
        if b.get("orphanDependents").and_then(Value::as_bool) == Some(true) {
            policy = Some("Orphan".into());
        }
        opts.uid = b.pointer("/preconditions/uid").and_then(Value::as_str).map(String::from);
        opts.resource_version = b.pointer("/preconditions/resourceVersion").and_then(Value::as_str).map(String::from);
        if b.get("dryRun").and_then(Value::as_array).is_some_and(|a| a.contains(&json!("All"))) {
            opts.dry_run = true;
        }
    }
    opts.propagation = match policy.as_deref() {
        None | Some("" | "Background") => Propagation::Background,
        Some("Foreground") => Propagation::Foreground,
        Some("Orphan") => Propagation::Orphan,
        Some(other) => {
            return Err(ApiError::invalid(format!("propagationPolicy: Unsupported value: {other:?}")));
        }
    };
    Ok(opts)
}

fn selectors(rt: &ResourceType, query: &Query) -> Result<(LabelSelector, FieldSelector), ApiError> {
    let labels = LabelSelector::parse(query.get("labelSelector").unwrap_or_default())
        .map_err(|e| ApiError::bad_request(format!("unable to parse requirement: {e}")))?;
    let fields = FieldSelector::parse(query.get("fieldSelector").unwrap_or_default(), rt.extra_fields)
        .map_err(|e| ApiError::bad_request(format!("{e} for {}", rt.qualified())))?;
    Ok((labels, fields))
}

async fn handle_resource(
    shared: &Arc<Shared>,
    method: &Method,
    rp: &ResourcePath,
    query: &Query,
    headers: &HeaderMap,
    body: &Bytes,
) -> Result<Response, ApiError> {
    let rt = shared.state().lookup_type(&rp.group, &rp.version, &rp.plural).ok_or_else(ApiError::no_route)?;
    if rp.namespace.is_some() && !rt.namespaced {
        return Err(ApiError::no_route());
    }
    let sub = match rp.sub.as_deref() {
        None => Sub::Main,
        Some("status") if rt.status_subresource => Sub::Status,
        Some(_) => return Err(ApiError::no_route()),
    };
    let ns = rp.namespace.as_deref();
    // Single-object operations and create need the namespace of a namespaced type.
    let needs_ns = rt.namespaced && (rp.name.is_some() || *method == Method::POST);
    if needs_ns && ns.is_none() {
        return Err(ApiError::no_route());
    }
    let watch = rp.watch_prefix || query.flag("watch");
    let table = wants_table(headers);
    match (method.clone(), rp.name.as_deref()) {
        (Method::GET, _) if watch => start_watch(shared, &rt, ns, rp.name.as_deref(), query, headers),
        (Method::GET, None) => {
            let (labels, fields) = selectors(&rt, query)?;
            let state = shared.state();
            let items = state.list(&rt, ns, &labels, &fields);
            let rv = state.resource_version();
            drop(state);
            if table {
                return Ok(json_response(200, &to_table(&rt, &items, Some(rv), query)));
            }
            Ok(json_response(
                200,
                &json!({"kind": rt.list_kind, "apiVersion": rt.api_version(),
                        "metadata": {"resourceVersion": rv.to_string()}, "items": items}),
            ))
        }
        (Method::GET, Some(name)) => {
            let obj = shared.state().get(&rt, ns, name)?;
            if table && sub == Sub::Main {
                return Ok(json_response(200, &to_table(&rt, &[obj], None, query)));
            }
            Ok(json_response(200, &obj))
        }
        (Method::POST, None) => {
            let obj = parse_body(headers, body)?;
            let mut options = json!({"kind": "CreateOptions", "apiVersion": "meta.k8s.io/v1"});
            if let Some(manager) = query.get("fieldManager") {
                options["fieldManager"] = json!(manager);
            }
            if query.dry_run() {
                options["dryRun"] = json!(["All"]);
            }
            let request = CreateRequest { rt: &rt, namespace: ns, dry_run: query.dry_run(), options };
            let obj = admit_create(shared, &request, obj).await?;
            let created = shared.state().create(&rt, ns, obj, query.dry_run())?;
            Ok(json_response(201, &created))
        }
        (Method::PUT, Some(name)) => {
            let obj = parse_body(headers, body)?;
            Ok(json_response(200, &shared.state().update(&rt, ns, name, obj, sub, query.dry_run())?))
        }
        (Method::PATCH, Some(name)) => {
            let kind = match content_type(headers).as_str() {
                "application/merge-patch+json" => PatchKind::Merge,
                "application/strategic-merge-patch+json" => PatchKind::Strategic,
                "application/json-patch+json" => PatchKind::Json,
                "application/apply-patch+yaml" | "application/apply-patch+json" => {
                    let manager = query.get("fieldManager").unwrap_or_default();
                    if manager.is_empty() {
                        return Err(ApiError::bad_request(
                            "PatchOptions.meta.k8s.io \"\" is invalid: fieldManager: Required value: is required \
                             for apply patch",
                        ));
                    }
                    PatchKind::Apply { manager: manager.to_string() }
                }
                other => {
                    return Err(ApiError::new(
                        415,
                        "UnsupportedMediaType",
                        format!(
                            "the body of the request was in an unknown format - accepted media types include: \
                             application/json-patch+json, application/merge-patch+json, \
                             application/apply-patch+yaml (got {other:?})"
                        ),
                    ));
                }
            };
            // A server-side apply that creates the object is a CREATE for admission.
            let admitted = match &kind {
                PatchKind::Apply { manager } if sub == Sub::Main && shared.state().peek(&rt, ns, name).is_none() => {
                    let mut config = apply_config(&rt, name, body)?;
                    meta_mut(&mut config).insert("name".into(), json!(name));
                    let mut options =
                        json!({"kind": "PatchOptions", "apiVersion": "meta.k8s.io/v1", "fieldManager": manager});
                    if query.flag("force") {
                        options["force"] = json!(true);
                    }
                    if query.dry_run() {
                        options["dryRun"] = json!(["All"]);
                    }
                    let request = CreateRequest { rt: &rt, namespace: ns, dry_run: query.dry_run(), options };
                    Some(admit_create(shared, &request, config).await?)
                }
                _ => None,
            };
            let (obj, created) = shared.state().patch(&rt, ns, name, &kind, body, sub, query.dry_run(), admitted)?;
            Ok(json_response(if created { 201 } else { 200 }, &obj))
        }
        (Method::DELETE, Some(name)) if sub == Sub::Main => {
            let opts = delete_options(query, headers, body)?;
            Ok(json_response(200, &shared.state().delete(&rt, ns, name, &opts)?))
        }
        (Method::DELETE, None) => {
            let opts = delete_options(query, headers, body)?;
            let (labels, fields) = selectors(&rt, query)?;
            let mut state = shared.state();
            let items = state.delete_collection(&rt, ns, &labels, &fields, &opts);
            let rv = state.resource_version();
            Ok(json_response(
                200,
                &json!({"kind": rt.list_kind, "apiVersion": rt.api_version(),
                        "metadata": {"resourceVersion": rv.to_string()}, "items": items}),
            ))
        }
        (m, _) => Err(ApiError::method_not_allowed(m.as_str())),
    }
}

fn start_watch(
    shared: &Arc<Shared>,
    rt: &Arc<ResourceType>,
    ns: Option<&str>,
    name: Option<&str>,
    query: &Query,
    headers: &HeaderMap,
) -> Result<Response, ApiError> {
    let (labels, mut fields) = selectors(rt, query)?;
    if let Some(name) = name {
        fields = fields.with_name(name);
    }
    let from = match query.get("resourceVersion") {
        None | Some("") => None,
        Some(rv) => Some(rv.parse::<u64>().map_err(|_| {
            ApiError::bad_request(format!("invalid resourceVersion {rv:?}: resource versions are integers here"))
        })?),
    };
    let timeout = match query.get("timeoutSeconds") {
        None | Some("") => None,
        Some(t) => Some(Duration::from_secs(
            t.parse::<u64>().map_err(|_| ApiError::bad_request(format!("invalid timeoutSeconds {t:?}")))?,
        )),
    };
    let bookmarks = query.flag("allowWatchBookmarks");
    let filter = WatchFilter {
        gr: rt.group_resource(),
        api_version: rt.api_version(),
        namespace: ns.map(String::from),
        labels,
        fields,
    };
    let start = shared.state().start_watch(rt, filter, from, query.flag("sendInitialEvents"), bookmarks);
    let (out_tx, out_rx) = mpsc::channel::<Result<Bytes, Infallible>>(64);
    let shared = shared.clone();
    let (kind, api_version) = (rt.kind.clone(), rt.api_version());
    // kubectl get -w asks for Table events: each object becomes a one-row Table (column definitions once).
    let table = wants_table(headers).then(|| (rt.clone(), Query(query.0.clone())));
    let mut columns_sent = false;
    let mut line = move |ev: &Value| -> Bytes {
        let Some((rt, query)) = &table else { return line(ev) };
        if !matches!(ev["type"].as_str(), Some("ADDED" | "MODIFIED" | "DELETED")) {
            return line(ev);
        }
        let mut t = to_table(rt, std::slice::from_ref(&ev["object"]), None, query);
        if columns_sent {
            t["columnDefinitions"] = json!([]);
        }
        columns_sent = true;
        line(&json!({"type": ev["type"], "object": t}))
    };
    tokio::spawn(async move {
        let (id, initial, mut rx) = match start {
            WatchStart::Expired(ev) => {
                let _ = out_tx.send(Ok(line(&ev))).await;
                return;
            }
            WatchStart::Started { id, initial, rx } => (id, initial, rx),
        };
        for ev in &initial {
            if out_tx.send(Ok(line(ev))).await.is_err() {
                shared.state().remove_watcher(id);
                return;
            }
        }
        let deadline = timeout.map(|t| tokio::time::Instant::now() + t);
        let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + BOOKMARK_INTERVAL, BOOKMARK_INTERVAL);
        loop {
            tokio::select! {
                biased;
                _ = out_tx.closed() => break,
                ev = rx.recv() => match ev {
                    Some(ev) => if out_tx.send(Ok(line(&ev))).await.is_err() { break },
                    None => break,
                },
                _ = async { tokio::time::sleep_until(deadline.unwrap_or_else(tokio::time::Instant::now)).await },
                    if deadline.is_some() => break,
                _ = tick.tick(), if bookmarks => {
                    // Drain under the lock: everything up to `rv` is in the channel, nothing after it.
                    let (rv, pending) = {
                        let state = shared.state();
                        let mut pending = Vec::new();
                        while let Ok(ev) = rx.try_recv() {
                            pending.push(ev);
                        }
                        (state.resource_version(), pending)
                    };
                    let bookmark = json!({"type": "BOOKMARK", "object": {
                        "kind": kind, "apiVersion": api_version,
                        "metadata": {"resourceVersion": rv.to_string()}}});
                    let mut failed = false;
                    for ev in pending.iter().chain(std::iter::once(&bookmark)) {
                        failed = failed || out_tx.send(Ok(line(ev))).await.is_err();
                    }
                    if failed { break }
                }
            }
        }
        shared.state().remove_watcher(id);
    });
    let stream = futures_util::stream::unfold(out_rx, |mut rx| async move { rx.recv().await.map(|item| (item, rx)) });
    Ok(Response::builder()
        .status(200)
        .header(header::CONTENT_TYPE, "application/json")
        .header(header::CACHE_CONTROL, "no-cache, private")
        .body(Body::from_stream(stream))
        .unwrap_or_default())
}

fn line(v: &Value) -> Bytes {
    let mut bytes = serde_json::to_vec(v).unwrap_or_default();
    bytes.push(b'\n');
    Bytes::from(bytes)
}

fn wants_table(headers: &HeaderMap) -> bool {
    headers
        .get_all(header::ACCEPT)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .any(|v| v.split(',').next().is_some_and(|first| first.contains("as=Table")))
}

type CellFn = Box<dyn Fn(&Value) -> Vec<Value>>;

/// `meta.k8s.io/v1` Table output, as kubectl asks for it.
fn to_table(rt: &ResourceType, items: &[Value], rv: Option<u64>, query: &Query) -> Value {
    let col = |name: &str, ty: &str, format: &str| json!({"name": name, "type": ty, "format": format, "description": name, "priority": 0});
    let age = |o: &Value| {
        meta_str(o, "creationTimestamp")
            .and_then(parse_rfc3339)
            .map(|t| human_age(unix_now() - t))
            .unwrap_or_else(|| "<unknown>".into())
    };
    let count = |o: &Value, key: &str| o.get(key).and_then(Value::as_object).map(|m| m.len()).unwrap_or(0);
    let name_col = col("Name", "string", "name");
    let (columns, cells): (Vec<Value>, CellFn) = match (rt.group.as_str(), rt.plural.as_str()) {
        ("", "secrets") => (
            vec![name_col, col("Type", "string", ""), col("Data", "string", ""), col("Age", "string", "")],
            Box::new(move |o| {
                vec![json!(meta_str(o, "name")), o["type"].clone(), json!(count(o, "data")), json!(age(o))]
            }),
        ),
        ("", "configmaps") => (
            vec![name_col, col("Data", "string", ""), col("Age", "string", "")],
            Box::new(move |o| {
                vec![json!(meta_str(o, "name")), json!(count(o, "data") + count(o, "binaryData")), json!(age(o))]
            }),
        ),
        ("", "namespaces") => (
            vec![name_col, col("Status", "string", ""), col("Age", "string", "")],
            Box::new(move |o| {
                vec![
                    json!(meta_str(o, "name")),
                    o.pointer("/status/phase").cloned().unwrap_or(Value::Null),
                    json!(age(o)),
                ]
            }),
        ),
        ("admissionregistration.k8s.io", "mutatingwebhookconfigurations" | "validatingwebhookconfigurations") => (
            vec![name_col, col("Webhooks", "integer", ""), col("Age", "string", "")],
            Box::new(move |o| {
                let webhooks = o.get("webhooks").and_then(Value::as_array).map_or(0, Vec::len);
                vec![json!(meta_str(o, "name")), json!(webhooks), json!(age(o))]
            }),
        ),
        ("coordination.k8s.io", "leases") => (
            vec![name_col, col("Holder", "string", ""), col("Age", "string", "")],
            Box::new(move |o| {
                vec![
                    json!(meta_str(o, "name")),
                    o.pointer("/spec/holderIdentity").cloned().unwrap_or(json!("")),
                    json!(age(o)),
                ]
            }),
        ),
        _ if rt.crd.is_some() && !rt.printer_columns.is_empty() => {
            let mut columns = vec![name_col];
            columns.extend(rt.printer_columns.iter().map(|c| {
                json!({"name": c.name, "type": c.type_, "format": "", "description": c.description, "priority": c.priority})
            }));
            let paths: Vec<(String, bool)> =
                rt.printer_columns.iter().map(|c| (c.json_path.clone(), c.type_ == "date")).collect();
            (
                columns,
                Box::new(move |o| {
                    let mut cells = vec![json!(meta_str(o, "name"))];
                    cells.extend(paths.iter().map(|(p, date)| {
                        let v = simple_json_path(o, p);
                        match v.as_str().and_then(parse_rfc3339) {
                            Some(t) if *date => json!(human_age(unix_now() - t)),
                            _ => v,
                        }
                    }));
                    cells
                }),
            )
        }
        _ => (
            vec![name_col, col("Age", "string", "")],
            Box::new(move |o| vec![json!(meta_str(o, "name")), json!(age(o))]),
        ),
    };
    let include = query.get("includeObject").unwrap_or("Metadata");
    let rows: Vec<Value> = items
        .iter()
        .map(|o| {
            let mut row = json!({"cells": cells(o)});
            match include {
                "None" => {}
                "Object" => row["object"] = o.clone(),
                _ => {
                    row["object"] = json!({"kind": "PartialObjectMetadata", "apiVersion": "meta.k8s.io/v1",
                                           "metadata": o.get("metadata").cloned().unwrap_or_default()})
                }
            }
            row
        })
        .collect();
    let mut table = json!({"kind": "Table", "apiVersion": "meta.k8s.io/v1", "metadata": {},
                           "columnDefinitions": columns, "rows": rows});
    if let Some(rv) = rv {
        table["metadata"]["resourceVersion"] = json!(rv.to_string());
    }
    table
}

/// Evaluates the `.a.b[0].c` subset of JSONPath; anything fancier gives null (kubectl prints `<none>`).
fn simple_json_path(obj: &Value, path: &str) -> Value {
    let mut cur = obj;
    for part in path.trim_start_matches('.').split('.').filter(|p| !p.is_empty()) {
        let (field, index) = match part.split_once('[') {
            Some((f, rest)) => match rest.strip_suffix(']').and_then(|i| i.parse::<usize>().ok()) {
                Some(i) => (f, Some(i)),
                None => return Value::Null,
            },
            None => (part, None),
        };
        cur = match cur.get(field) {
            Some(v) => v,
            None => return Value::Null,
        };
        if let Some(i) = index {
            cur = match cur.get(i) {
                Some(v) => v,
                None => return Value::Null,
            };
        }
    }
    cur.clone()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routes() {
        let r = |p: &str| parse_path(p);
        assert_eq!(r("/version"), Route::Version);
        assert_eq!(r("/apis/kubetoken.io"), Route::Group("kubetoken.io".into()));
        let Route::Resource(rp) = r("/api/v1/namespaces/ns/secrets/s") else { panic!() };
        assert_eq!(
            (rp.namespace.as_deref(), rp.plural.as_str(), rp.name.as_deref()),
            (Some("ns"), "secrets", Some("s"))
        );
        let Route::Resource(rp) = r("/api/v1/namespaces/ns") else { panic!() };
        assert_eq!((rp.namespace, rp.plural.as_str(), rp.name.as_deref()), (None, "namespaces", Some("ns")));
        let Route::Resource(rp) = r("/api/v1/namespaces/ns/status") else { panic!() };
        assert_eq!(
            (rp.plural.as_str(), rp.name.as_deref(), rp.sub.as_deref()),
            ("namespaces", Some("ns"), Some("status"))
        );
        let Route::Resource(rp) = r("/apis/a.io/v1/namespaces/ns/things/t/status") else { panic!() };
        assert_eq!((rp.group.as_str(), rp.sub.as_deref()), ("a.io", Some("status")));
        let Route::Resource(rp) = r("/api/v1/watch/namespaces/ns/secrets") else { panic!() };
        assert!(rp.watch_prefix);
        assert_eq!(r("/apis/a.io/v1/namespaces/ns/things/t/status/x"), Route::NotFound);
    }

    #[test]
    fn json_path() {
        let o = json!({"spec": {"a": [{"b": 1}]}});
        assert_eq!(simple_json_path(&o, ".spec.a[0].b"), json!(1));
        assert_eq!(simple_json_path(&o, ".spec.x"), Value::Null);
    }
}

//! The in-memory object store: the API semantics (create, update, patch, delete, finalizers, garbage collection),
//! the global resourceVersion counter, the bounded event history and the watchers.

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::sync::Arc;

use base64::Engine as _;
use serde_json::{Map, Value, json};
use tokio::sync::mpsc::{UnboundedReceiver, UnboundedSender, unbounded_channel};

use crate::error::ApiError;
use crate::selector::{FieldSelector, LabelSelector};
use crate::types::{ADMISSION_GROUP, GroupResource, Registry, ResourceType, crd_status, types_from_crd};
use crate::util::{leaf_paths, new_uid, now_rfc3339, prune_empty, random_suffix, remove_path, strategic_merge};

/// How many watch events are retained for watches that resume from a resourceVersion.
pub(crate) const HISTORY_LIMIT: usize = 1000;

/// The label every Namespace carries, its name.
pub(crate) const NAMESPACE_NAME_LABEL: &str = "kubernetes.io/metadata.name";

/// (namespace or "" for cluster-scoped, name)
pub(crate) type ObjKey = (String, String);

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum EventType {
    Added,
    Modified,
    Deleted,
}

impl EventType {
    fn as_str(self) -> &'static str {
        match self {
            Self::Added => "ADDED",
            Self::Modified => "MODIFIED",
            Self::Deleted => "DELETED",
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Sub {
    Main,
    Status,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub(crate) enum Propagation {
    #[default]
    Background,
    Foreground,
    Orphan,
}

#[derive(Clone, Debug, Default)]
pub(crate) struct DeleteOptions {
    pub propagation: Propagation,
    pub uid: Option<String>,
    pub resource_version: Option<String>,
    pub dry_run: bool,
}

pub(crate) enum PatchKind {
    Merge,
    Strategic,
    Json,
    Apply { manager: String },
}

/// What a watcher wants to see.
#[derive(Clone, Debug)]
pub(crate) struct WatchFilter {
    pub gr: GroupResource,
    pub api_version: String,
    pub namespace: Option<String>,
    pub labels: LabelSelector,
    pub fields: FieldSelector,
}

impl WatchFilter {
    pub(crate) fn matches(&self, obj: &Value) -> bool {
        if let Some(ns) = &self.namespace
            && meta_str(obj, "namespace") != Some(ns.as_str())
        {
            return false;
        }
        self.labels.matches(obj) && self.fields.matches(obj)
    }

    /// The watch event this watcher gets for a change, if any. Like the real server, an object that stops
    /// (starts) matching the selectors is seen as DELETED (ADDED).
    fn render(&self, kind: EventType, obj: &Value, old: Option<&Value>) -> Option<Value> {
        let now = self.matches(obj);
        let kind = match kind {
            EventType::Modified => match (old.is_none_or(|o| self.matches(o)), now) {
                (true, true) => EventType::Modified,
                (false, true) => EventType::Added,
                (true, false) => EventType::Deleted,
                (false, false) => return None,
            },
            _ if now => kind,
            _ => return None,
        };
        Some(self.event(kind.as_str(), obj))
    }

    pub(crate) fn event(&self, kind: &str, obj: &Value) -> Value {
        let mut obj = obj.clone();
        obj["apiVersion"] = json!(self.api_version);
        json!({"type": kind, "object": obj})
    }
}

struct HistEvent {
    rv: u64,
    gr: GroupResource,
    kind: EventType,
    object: Value,
    old: Option<Value>,
}

struct Watcher {
    id: u64,
    filter: WatchFilter,
    tx: UnboundedSender<Value>,
}

pub(crate) enum WatchStart {
    /// The requested resourceVersion is older than the retained history: one ERROR event (410 Expired).
    Expired(Value),
    Started {
        id: u64,
        initial: Vec<Value>,
        rx: UnboundedReceiver<Value>,
    },
}

/// Per (field manager, is the status subresource): the leaf paths it applied last.
type AppliedFields = BTreeMap<(String, bool), BTreeSet<Vec<String>>>;

/// The whole server state, behind one mutex.
pub(crate) struct State {
    rv: u64,
    pub(crate) registry: Registry,
    objects: HashMap<GroupResource, BTreeMap<ObjKey, Value>>,
    uids: HashMap<String, (GroupResource, ObjKey)>,
    history: VecDeque<HistEvent>,
    /// Watches from a resourceVersion >= this can be served from the history.
    history_floor: u64,
    watchers: Vec<Watcher>,
    next_watcher_id: u64,
    /// Server-side apply: the leaf paths each (manager, is_status) applied last, per object uid.
    applied: HashMap<String, AppliedFields>,
}

pub(crate) fn meta_str<'a>(obj: &'a Value, key: &str) -> Option<&'a str> {
    obj.get("metadata").and_then(|m| m.get(key)).and_then(Value::as_str)
}

pub(crate) fn meta_mut(obj: &mut Value) -> &mut Map<String, Value> {
    if !obj.get("metadata").is_some_and(Value::is_object) {
        obj["metadata"] = json!({});
    }
    obj["metadata"].as_object_mut().expect("metadata is an object")
}

fn rv_of(obj: &Value) -> u64 {
    meta_str(obj, "resourceVersion").and_then(|s| s.parse().ok()).unwrap_or(0)
}

fn finalizers(obj: &Value) -> Vec<Value> {
    obj.pointer("/metadata/finalizers").and_then(Value::as_array).cloned().unwrap_or_default()
}

fn owner_uids(obj: &Value) -> Vec<String> {
    obj.pointer("/metadata/ownerReferences")
        .and_then(Value::as_array)
        .map(|refs| refs.iter().filter_map(|r| r.get("uid").and_then(Value::as_str).map(String::from)).collect())
        .unwrap_or_default()
}

/// What `generation` tracks: everything outside `metadata`, and outside `status` when it is a subresource (then
/// only `/status` writes change it, and those never bump the generation).
fn generation_content(obj: &Value, status_subresource: bool) -> Value {
    let mut o = obj.clone();
    if let Value::Object(m) = &mut o {
        m.remove("metadata");
        m.remove("apiVersion");
        m.remove("kind");
        if status_subresource {
            m.remove("status");
        }
    }
    o
}

fn present(rt: &ResourceType, obj: &Value) -> Value {
    let mut o = obj.clone();
    o["apiVersion"] = json!(rt.api_version());
    o["kind"] = json!(rt.kind);
    o
}

fn is_dns_label(s: &str) -> bool {
    let b = s.as_bytes();
    !b.is_empty()
        && b.len() <= 63
        && b.iter().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == b'-')
        && b[0].is_ascii_alphanumeric()
        && b[b.len() - 1].is_ascii_alphanumeric()
}

pub(crate) fn is_dns_subdomain(s: &str) -> bool {
    s.len() <= 253 && s.split('.').all(is_dns_label)
}

fn validate_name(rt: &ResourceType, name: &str) -> Result<(), ApiError> {
    let (ok, what) = if rt.is_namespace() {
        (is_dns_label(name), "a lowercase RFC 1123 label must consist of lower case alphanumeric characters or '-'")
    } else {
        (
            is_dns_subdomain(name),
            "a lowercase RFC 1123 subdomain must consist of lower case alphanumeric characters, '-' or '.', \
             and must start and end with an alphanumeric character",
        )
    };
    if ok {
        Ok(())
    } else {
        Err(ApiError::invalid(format!(
            "{} {name:?} is invalid: metadata.name: Invalid value: {name:?}: {what}",
            rt.kind
        )))
    }
}

/// Like the API server, refuses a Secret or ConfigMap whose data is over 1 MiB (keys and values; base64 values
/// counted decoded).
fn check_data_size(rt: &ResourceType, obj: &Value) -> Result<(), ApiError> {
    const MAX: usize = 1024 * 1024;
    let mut total = 0;
    for (field, base64_values) in [("data", rt.is_secret()), ("binaryData", true)] {
        for (k, v) in obj.get(field).and_then(Value::as_object).into_iter().flatten() {
            let len = v.as_str().map_or(0, str::len);
            total += k.len() + if base64_values { len / 4 * 3 } else { len };
        }
    }
    if total > MAX {
        let name = obj.pointer("/metadata/name").and_then(Value::as_str).unwrap_or_default();
        return Err(ApiError::invalid(format!(
            "{} {name:?} is invalid: []: Too long: must have at most {MAX} bytes",
            rt.kind
        )));
    }
    Ok(())
}

/// Checks the body's kind/apiVersion against the URL's type and normalizes them.
fn check_type(rt: &ResourceType, obj: &mut Value) -> Result<(), ApiError> {
    if !obj.is_object() {
        return Err(ApiError::bad_request("the request body must be a JSON object"));
    }
    let kind = obj.get("kind").and_then(Value::as_str).unwrap_or_default();
    if kind.is_empty() {
        return Err(ApiError::bad_request("Object 'Kind' is missing in the request body"));
    }
    if kind != rt.kind {
        return Err(ApiError::bad_request(format!(
            "the kind in the body ({kind}) does not match the URL ({})",
            rt.kind
        )));
    }
    let api_version = obj.get("apiVersion").and_then(Value::as_str).unwrap_or_default();
    let group = api_version.rsplit_once('/').map(|(g, _)| g).unwrap_or("");
    if api_version.is_empty() || group != rt.group {
        return Err(ApiError::bad_request(format!(
            "the API version in the data ({api_version}) does not match the expected API version ({})",
            rt.api_version()
        )));
    }
    obj["apiVersion"] = json!(rt.api_version());
    Ok(())
}

/// Strategic merge of a list whose patchMergeKey is `name` (a webhook configuration's `webhooks`, which kubectl
/// apply and controllers patch entry by entry): entries are merged into the entry of the same name or appended;
/// `$patch: delete` removes one. Takes the list (and its `$setElementOrder`) out of `patch`.
fn merge_list_by_name(target: &mut Value, patch: &mut Value, field: &str) {
    let Some(p) = patch.as_object_mut() else { return };
    p.remove(&format!("$setElementOrder/{field}"));
    if !p.get(field).is_some_and(Value::is_array) {
        return;
    }
    let Some(Value::Array(items)) = p.remove(field) else { return };
    let mut list = target.get(field).and_then(Value::as_array).cloned().unwrap_or_default();
    for item in items {
        let name = item.get("name").and_then(Value::as_str);
        let pos = name.and_then(|n| list.iter().position(|x| x.get("name").and_then(Value::as_str) == Some(n)));
        match (item.get("$patch").and_then(Value::as_str), pos) {
            (Some("delete"), Some(i)) => {
                list.remove(i);
            }
            (Some("delete"), None) => {}
            (_, Some(i)) => strategic_merge(&mut list[i], &item),
            (_, None) => {
                let mut new = Value::Null;
                strategic_merge(&mut new, &item);
                list.push(new);
            }
        }
    }
    if target.is_object() {
        target[field] = Value::Array(list);
    }
}

/// A server-side apply body: parsed (YAML or JSON), its kind checked, its name (if any) the URL's.
pub(crate) fn apply_config(rt: &ResourceType, name: &str, body: &[u8]) -> Result<Value, ApiError> {
    let mut config: Value =
        serde_yaml::from_slice(body).map_err(|e| ApiError::bad_request(format!("invalid apply configuration: {e}")))?;
    check_type(rt, &mut config)?;
    match meta_str(&config, "name") {
        Some(n) if n != name => Err(ApiError::bad_request(format!(
            "the name of the object ({n}) does not match the name on the URL ({name})"
        ))),
        _ => Ok(config),
    }
}

/// The namespace a created object goes to: the URL's, which the body may repeat but not contradict.
fn create_namespace(rt: &ResourceType, ns: Option<&str>, obj: &Value) -> Result<String, ApiError> {
    if !rt.namespaced {
        return Ok(String::new());
    }
    let url_ns = ns.unwrap_or_default();
    match meta_str(obj, "namespace") {
        Some(body_ns) if !body_ns.is_empty() && body_ns != url_ns => Err(ApiError::bad_request(
            "the namespace of the provided object does not match the namespace sent on the request",
        )),
        _ => Ok(url_ns.to_string()),
    }
}

/// A created object as mutating admission sees it, like kube-apiserver's: decoded and defaulted (kind and
/// apiVersion checked, the URL's namespace set), but not yet named from `generateName`, without uid,
/// creationTimestamp or resourceVersion (those come when it is stored).
pub(crate) fn prepare_create(rt: &ResourceType, ns: Option<&str>, mut obj: Value) -> Result<Value, ApiError> {
    check_type(rt, &mut obj)?;
    let namespace = create_namespace(rt, ns, &obj)?;
    if rt.namespaced {
        meta_mut(&mut obj).insert("namespace".into(), json!(namespace));
    }
    if rt.is_namespace() {
        namespace_name_label(&mut obj);
    }
    Ok(obj)
}

/// Every Namespace carries `kubernetes.io/metadata.name: <name>` (Kubernetes' defaulting; it can't be changed).
fn namespace_name_label(obj: &mut Value) {
    let Some(name) = meta_str(obj, "name").filter(|n| !n.is_empty()).map(String::from) else { return };
    let meta = meta_mut(obj);
    if !meta.get("labels").is_some_and(Value::is_object) {
        meta.insert("labels".into(), json!({}));
    }
    if let Some(Value::Object(labels)) = meta.get_mut("labels") {
        labels.insert(NAMESPACE_NAME_LABEL.into(), json!(name));
    }
}

/// Drops what the server never stores and empty metadata collections (Go's `omitempty`).
fn normalize(obj: &mut Value) {
    let meta = meta_mut(obj);
    meta.remove("managedFields");
    meta.remove("selfLink");
    prune_empty(meta, &["labels", "annotations", "finalizers", "ownerReferences", "generateName"]);
}

impl State {
    pub(crate) fn new() -> Self {
        let mut s = Self {
            rv: 0,
            registry: Registry::new(),
            objects: HashMap::new(),
            uids: HashMap::new(),
            history: VecDeque::new(),
            history_floor: 0,
            watchers: Vec::new(),
            next_watcher_id: 0,
            applied: HashMap::new(),
        };
        for ns in ["default", "kube-system", "kube-public", "kube-node-lease"] {
            s.ensure_namespace(ns).expect("built-in namespaces are valid");
        }
        s
    }

    pub(crate) fn resource_version(&self) -> u64 {
        self.rv
    }

    fn next_rv(&mut self) -> u64 {
        self.rv += 1;
        self.rv
    }

    fn stored(&self, gr: &GroupResource, key: &ObjKey) -> Option<&Value> {
        self.objects.get(gr).and_then(|c| c.get(key))
    }

    fn insert(&mut self, gr: &GroupResource, key: ObjKey, obj: Value) {
        if let Some(uid) = meta_str(&obj, "uid") {
            self.uids.insert(uid.to_string(), (gr.clone(), key.clone()));
        }
        self.objects.entry(gr.clone()).or_default().insert(key, obj);
    }

    fn remove(&mut self, gr: &GroupResource, key: &ObjKey) -> Option<Value> {
        let obj = self.objects.get_mut(gr)?.remove(key)?;
        if let Some(uid) = meta_str(&obj, "uid") {
            self.uids.remove(uid);
            self.applied.remove(uid);
        }
        Some(obj)
    }

    fn emit(&mut self, gr: &GroupResource, kind: EventType, object: &Value, old: Option<&Value>) {
        self.watchers.retain(|w| !w.tx.is_closed());
        for w in self.watchers.iter().filter(|w| w.filter.gr == *gr) {
            if let Some(ev) = w.filter.render(kind, object, old) {
                let _ = w.tx.send(ev);
            }
        }
        self.history.push_back(HistEvent {
            rv: rv_of(object),
            gr: gr.clone(),
            kind,
            object: object.clone(),
            old: old.cloned(),
        });
        while self.history.len() > HISTORY_LIMIT {
            if let Some(e) = self.history.pop_front() {
                self.history_floor = e.rv;
            }
        }
    }

    fn key_for(rt: &ResourceType, ns: Option<&str>, name: &str) -> ObjKey {
        (if rt.namespaced { ns.unwrap_or_default().to_string() } else { String::new() }, name.to_string())
    }

    /// Objects are created in any namespace: a missing Namespace object is created on the fly.
    fn ensure_namespace(&mut self, ns: &str) -> Result<(), ApiError> {
        let gr = GroupResource::new("", "namespaces");
        if self.stored(&gr, &(String::new(), ns.to_string())).is_some() {
            return Ok(());
        }
        let rt = self.registry.lookup("", "v1", "namespaces").expect("namespaces are built in");
        self.create(&rt, None, json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": ns}}), false)?;
        Ok(())
    }

    /// Server-managed content per type: secrets' stringData, namespaces' phase, CRDs' status.
    fn type_hooks(rt: &ResourceType, obj: &mut Value, old: Option<&Value>) -> Result<(), ApiError> {
        if rt.is_secret() {
            let string_data = obj.as_object_mut().and_then(|o| o.remove("stringData"));
            match string_data {
                None | Some(Value::Null) => {}
                Some(Value::Object(sd)) => {
                    if !obj.get("data").is_some_and(Value::is_object) {
                        obj["data"] = json!({});
                    }
                    for (k, v) in sd {
                        let Value::String(v) = v else {
                            return Err(ApiError::bad_request(format!("stringData.{k} must be a string")));
                        };
                        obj["data"][k] = json!(base64::engine::general_purpose::STANDARD.encode(v));
                    }
                }
                Some(_) => return Err(ApiError::bad_request("stringData must be a map of strings")),
            }
            if obj.get("data").is_some_and(Value::is_null) {
                obj.as_object_mut().map(|o| o.remove("data"));
            }
            if let Some(data) = obj.get("data") {
                let Some(data) = data.as_object() else {
                    return Err(ApiError::bad_request("data must be a map of base64 strings"));
                };
                for (k, v) in data {
                    let valid = v.as_str().is_some_and(|s| base64::engine::general_purpose::STANDARD.decode(s).is_ok());
                    if !valid {
                        return Err(ApiError::bad_request(format!("data.{k}: illegal base64 data")));
                    }
                }
                if data.is_empty() {
                    obj.as_object_mut().map(|o| o.remove("data"));
                }
            }
            if obj.get("type").and_then(Value::as_str).is_none_or(str::is_empty) {
                obj["type"] = json!("Opaque");
            }
        }
        if rt.is_secret() || (rt.group.is_empty() && rt.plural == "configmaps") {
            check_data_size(rt, obj)?;
        }
        if rt.is_namespace() {
            if obj.pointer("/status/phase").is_none() {
                obj["status"] = json!({"phase": "Active"});
            }
            namespace_name_label(obj);
        }
        if rt.is_webhook_configuration() {
            crate::admission::default_and_validate_configuration(rt, obj)?;
        }
        if rt.is_crd() {
            types_from_crd(obj)?;
            obj["status"] = crd_status(obj, old);
        }
        Ok(())
    }

    pub(crate) fn get(&mut self, rt: &ResourceType, ns: Option<&str>, name: &str) -> Result<Value, ApiError> {
        if rt.is_namespace() {
            // Every namespace exists.
            if validate_name(rt, name).is_err() {
                return Err(ApiError::not_found(&rt.qualified(), name));
            }
            self.ensure_namespace(name)?;
        }
        self.peek(rt, ns, name).ok_or_else(|| ApiError::not_found(&rt.qualified(), name))
    }

    pub(crate) fn peek(&self, rt: &ResourceType, ns: Option<&str>, name: &str) -> Option<Value> {
        self.stored(&rt.group_resource(), &Self::key_for(rt, ns, name)).map(|o| present(rt, o))
    }

    pub(crate) fn list(
        &self,
        rt: &ResourceType,
        ns: Option<&str>,
        labels: &LabelSelector,
        fields: &FieldSelector,
    ) -> Vec<Value> {
        let Some(coll) = self.objects.get(&rt.group_resource()) else { return Vec::new() };
        coll.iter()
            .filter(|((ons, _), _)| ns.is_none_or(|n| !rt.namespaced || n == ons))
            .filter(|(_, o)| labels.matches(o) && fields.matches(o))
            .map(|(_, o)| present(rt, o))
            .collect()
    }

    pub(crate) fn create(
        &mut self,
        rt: &ResourceType,
        ns: Option<&str>,
        mut obj: Value,
        dry_run: bool,
    ) -> Result<Value, ApiError> {
        check_type(rt, &mut obj)?;
        let gr = rt.group_resource();
        let namespace = create_namespace(rt, ns, &obj)?;
        let mut name = meta_str(&obj, "name").unwrap_or_default().to_string();
        if name.is_empty() {
            let prefix = meta_str(&obj, "generateName").unwrap_or_default().to_string();
            if prefix.is_empty() {
                return Err(ApiError::invalid(format!(
                    "{} is invalid: metadata.name: Required value: name or generateName is required",
                    rt.kind
                )));
            }
            for _ in 0..16 {
                name = format!("{prefix}{}", random_suffix());
                if self.stored(&gr, &(namespace.clone(), name.clone())).is_none() {
                    break;
                }
            }
        }
        validate_name(rt, &name)?;
        let key = (namespace.clone(), name.clone());
        if self.stored(&gr, &key).is_some() {
            return Err(ApiError::already_exists(&rt.qualified(), &name));
        }
        let meta = meta_mut(&mut obj);
        meta.insert("name".into(), json!(name));
        if rt.namespaced {
            meta.insert("namespace".into(), json!(namespace));
        } else {
            meta.remove("namespace");
        }
        meta.insert("uid".into(), json!(new_uid()));
        meta.insert("creationTimestamp".into(), json!(now_rfc3339()));
        for k in ["deletionTimestamp", "deletionGracePeriodSeconds", "resourceVersion"] {
            meta.remove(k);
        }
        if rt.has_generation {
            meta.insert("generation".into(), json!(1));
        } else {
            meta.remove("generation");
        }
        if rt.status_subresource
            && let Value::Object(o) = &mut obj
        {
            o.remove("status");
        }
        Self::type_hooks(rt, &mut obj, None)?;
        normalize(&mut obj);
        if dry_run {
            return Ok(present(rt, &obj));
        }
        if rt.namespaced {
            self.ensure_namespace(&namespace)?;
        }
        let rv = self.next_rv();
        meta_mut(&mut obj).insert("resourceVersion".into(), json!(rv.to_string()));
        self.insert(&gr, key.clone(), obj.clone());
        self.emit(&gr, EventType::Added, &obj, None);
        if rt.is_crd() {
            self.register_crd(&obj);
        }
        // Kubernetes' garbage collector deletes an object created with owners that are all gone (a controller
        // finishing a reconcile of an object deleted meanwhile); here that happens at once.
        let owners = owner_uids(&obj);
        if !owners.is_empty() && owners.iter().all(|u| !self.uids.contains_key(u)) {
            self.delete_internal(&gr, &key, Propagation::Background);
        }
        Ok(present(rt, &obj))
    }

    /// PUT.
    pub(crate) fn update(
        &mut self,
        rt: &ResourceType,
        ns: Option<&str>,
        name: &str,
        mut obj: Value,
        sub: Sub,
        dry_run: bool,
    ) -> Result<Value, ApiError> {
        check_type(rt, &mut obj)?;
        match meta_str(&obj, "name") {
            Some(n) if !n.is_empty() && n != name => {
                return Err(ApiError::bad_request(format!(
                    "the name of the object ({n}) does not match the name on the URL ({name})"
                )));
            }
            _ => {}
        }
        if rt.namespaced
            && let Some(body_ns) = meta_str(&obj, "namespace")
            && !body_ns.is_empty()
            && Some(body_ns) != ns
        {
            return Err(ApiError::bad_request(
                "the namespace of the provided object does not match the namespace sent on the request",
            ));
        }
        let key = Self::key_for(rt, ns, name);
        let Some(old) = self.stored(&rt.group_resource(), &key).cloned() else {
            return Err(ApiError::not_found(&rt.qualified(), name));
        };
        if !rt.allow_unconditional_update && meta_str(&obj, "resourceVersion").is_none_or(str::is_empty) {
            return Err(ApiError::invalid(format!(
                "{} {name:?} is invalid: metadata.resourceVersion: Invalid value: 0x0: must be specified for an update",
                rt.kind
            )));
        }
        self.write_existing(rt, key, old, obj, sub, dry_run)
    }

    /// The common tail of update and patch: `candidate` is the desired object (whole, also for status writes).
    fn write_existing(
        &mut self,
        rt: &ResourceType,
        key: ObjKey,
        old: Value,
        candidate: Value,
        sub: Sub,
        dry_run: bool,
    ) -> Result<Value, ApiError> {
        let gr = rt.group_resource();
        let old_rv = meta_str(&old, "resourceVersion").unwrap_or_default().to_string();
        match meta_str(&candidate, "resourceVersion") {
            Some(rv) if !rv.is_empty() && rv != old_rv => return Err(ApiError::conflict(&rt.qualified(), &key.1)),
            _ => {}
        }
        let mut new = match sub {
            Sub::Status => {
                let mut n = old.clone();
                match candidate.get("status") {
                    Some(s) if !s.is_null() => n["status"] = s.clone(),
                    _ => {
                        n.as_object_mut().map(|o| o.remove("status"));
                    }
                }
                n
            }
            Sub::Main => {
                let mut n = candidate;
                if rt.status_subresource {
                    match old.get("status") {
                        Some(s) => n["status"] = s.clone(),
                        None => {
                            n.as_object_mut().map(|o| o.remove("status"));
                        }
                    }
                }
                n
            }
        };
        new["apiVersion"] = old["apiVersion"].clone();
        new["kind"] = old["kind"].clone();
        {
            let old_meta = old.get("metadata").and_then(Value::as_object).cloned().unwrap_or_default();
            let meta = meta_mut(&mut new);
            for k in [
                "name",
                "namespace",
                "uid",
                "creationTimestamp",
                "deletionTimestamp",
                "deletionGracePeriodSeconds",
                "generation",
                "resourceVersion",
            ] {
                match old_meta.get(k) {
                    Some(v) => meta.insert(k.into(), v.clone()),
                    None => meta.remove(k),
                };
            }
        }
        Self::type_hooks(rt, &mut new, Some(&old))?;
        normalize(&mut new);
        let deleting = meta_str(&old, "deletionTimestamp").is_some();
        if deleting {
            let before = finalizers(&old);
            if finalizers(&new).iter().any(|f| !before.contains(f)) {
                return Err(ApiError::invalid(format!(
                    "{} {:?} is invalid: metadata.finalizers: Forbidden: no new finalizers can be added if the \
                     object is being deleted",
                    rt.kind, key.1
                )));
            }
        }
        if rt.has_generation
            && generation_content(&old, rt.status_subresource) != generation_content(&new, rt.status_subresource)
        {
            let generation = old.pointer("/metadata/generation").and_then(Value::as_i64).unwrap_or(0);
            meta_mut(&mut new).insert("generation".into(), json!(generation + 1));
        }
        if new == old {
            // A no-op write: no new resourceVersion, no watch event.
            return Ok(present(rt, &old));
        }
        if dry_run {
            return Ok(present(rt, &new));
        }
        let rv = self.next_rv();
        meta_mut(&mut new).insert("resourceVersion".into(), json!(rv.to_string()));
        if deleting && finalizers(&new).is_empty() {
            // The last finalizer is gone: the object is deleted now.
            self.insert(&gr, key.clone(), new.clone());
            self.remove_now(&gr, &key);
            return Ok(present(rt, &new));
        }
        self.insert(&gr, key, new.clone());
        self.emit(&gr, EventType::Modified, &new, Some(&old));
        if rt.is_crd() {
            self.register_crd(&new);
        }
        Ok(present(rt, &new))
    }

    /// PATCH. Returns the object and whether it was created (server-side apply of a new object).
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn patch(
        &mut self,
        rt: &ResourceType,
        ns: Option<&str>,
        name: &str,
        kind: &PatchKind,
        body: &[u8],
        sub: Sub,
        dry_run: bool,
        admitted: Option<Value>,
    ) -> Result<(Value, bool), ApiError> {
        let gr = rt.group_resource();
        let key = Self::key_for(rt, ns, name);
        let existing = self.stored(&gr, &key).cloned();
        let parse_json = |body: &[u8]| -> Result<Value, ApiError> {
            serde_json::from_slice(body).map_err(|e| ApiError::bad_request(format!("invalid patch body: {e}")))
        };
        match kind {
            PatchKind::Apply { manager } => {
                let mut config = apply_config(rt, name, body)?;
                let is_status = sub == Sub::Status;
                let paths = Self::applied_paths(rt, &config, sub);
                let Some(existing) = existing else {
                    if is_status {
                        return Err(ApiError::not_found(&rt.qualified(), name));
                    }
                    meta_mut(&mut config).insert("name".into(), json!(name));
                    // What mutating admission made of the configuration, when the caller ran it.
                    let created = self.create(rt, ns, admitted.unwrap_or(config), dry_run)?;
                    if !dry_run && let Some(uid) = meta_str(&created, "uid") {
                        self.applied.entry(uid.to_string()).or_default().insert((manager.clone(), false), paths);
                    }
                    return Ok((created, true));
                };
                let uid = meta_str(&existing, "uid").unwrap_or_default().to_string();
                let managers = self.applied.get(&uid).cloned().unwrap_or_default();
                let mut candidate = existing.clone();
                if let Some(previous) = managers.get(&(manager.clone(), is_status)) {
                    for path in previous.difference(&paths) {
                        let owned_by_other =
                            managers.iter().any(|(m, p)| *m != (manager.clone(), is_status) && p.contains(path));
                        if !owned_by_other {
                            remove_path(&mut candidate, path);
                        }
                    }
                }
                if let Value::Object(c) = &mut config {
                    // The apply configuration doesn't carry a resourceVersion precondition unless it says so.
                    c.remove("apiVersion");
                    c.remove("kind");
                }
                json_patch::merge(&mut candidate, &config);
                let result = self.write_existing(rt, key, existing, candidate, sub, dry_run)?;
                if !dry_run && self.uids.contains_key(&uid) {
                    self.applied.entry(uid).or_default().insert((manager.clone(), is_status), paths);
                }
                Ok((result, false))
            }
            _ => {
                let Some(existing) = existing else {
                    return Err(ApiError::not_found(&rt.qualified(), name));
                };
                let mut candidate = existing.clone();
                match kind {
                    PatchKind::Merge => json_patch::merge(&mut candidate, &parse_json(body)?),
                    PatchKind::Strategic => {
                        let mut patch = parse_json(body)?;
                        if rt.is_webhook_configuration() {
                            merge_list_by_name(&mut candidate, &mut patch, "webhooks");
                        }
                        strategic_merge(&mut candidate, &patch)
                    }
                    PatchKind::Json => {
                        let ops: json_patch::Patch = serde_json::from_slice(body)
                            .map_err(|e| ApiError::bad_request(format!("invalid JSON patch: {e}")))?;
                        json_patch::patch(&mut candidate, &ops)
                            .map_err(|e| ApiError::invalid(format!("the JSON patch could not be applied: {e}")))?;
                    }
                    PatchKind::Apply { .. } => unreachable!("handled above"),
                }
                if !candidate.is_object() {
                    return Err(ApiError::bad_request("the patched object is not a JSON object"));
                }
                Ok((self.write_existing(rt, key, existing, candidate, sub, dry_run)?, false))
            }
        }
    }

    /// The stored MutatingWebhookConfigurations, by name.
    pub(crate) fn mutating_webhook_configurations(&self) -> Vec<Value> {
        self.objects
            .get(&GroupResource::new(ADMISSION_GROUP, "mutatingwebhookconfigurations"))
            .map(|c| c.values().cloned().collect())
            .unwrap_or_default()
    }

    /// A namespace's labels, as webhooks' namespaceSelectors see them: a namespace that has no object (yet) still
    /// has `kubernetes.io/metadata.name`.
    pub(crate) fn namespace_labels(&self, ns: &str) -> Map<String, Value> {
        let mut labels = self
            .stored(&GroupResource::new("", "namespaces"), &(String::new(), ns.to_string()))
            .and_then(|o| o.pointer("/metadata/labels"))
            .and_then(Value::as_object)
            .cloned()
            .unwrap_or_default();
        labels.insert(NAMESPACE_NAME_LABEL.into(), json!(ns));
        labels
    }

    /// The fields an apply configuration owns (lists are atomic); identity fields are never owned.
    fn applied_paths(rt: &ResourceType, config: &Value, sub: Sub) -> BTreeSet<Vec<String>> {
        let mut all = Vec::new();
        leaf_paths(config, &mut Vec::new(), &mut all);
        all.into_iter()
            .filter(|p| match p.first().map(String::as_str) {
                Some("apiVersion" | "kind") | None => false,
                Some("metadata") => {
                    sub == Sub::Main
                        && matches!(
                            p.get(1).map(String::as_str),
                            Some("labels" | "annotations" | "finalizers" | "ownerReferences")
                        )
                }
                Some("status") => sub == Sub::Status || !rt.status_subresource,
                Some(_) => sub == Sub::Main,
            })
            .collect()
    }

    pub(crate) fn delete(
        &mut self,
        rt: &ResourceType,
        ns: Option<&str>,
        name: &str,
        opts: &DeleteOptions,
    ) -> Result<Value, ApiError> {
        let gr = rt.group_resource();
        let key = Self::key_for(rt, ns, name);
        let Some(obj) = self.stored(&gr, &key) else {
            return Err(ApiError::not_found(&rt.qualified(), name));
        };
        if let Some(uid) = &opts.uid
            && meta_str(obj, "uid") != Some(uid.as_str())
        {
            return Err(ApiError::new(
                409,
                "Conflict",
                format!(
                    "Operation cannot be fulfilled on {} \"{name}\": Precondition failed: UID in precondition: {uid}, \
                     UID in object meta: {}",
                    rt.qualified(),
                    meta_str(obj, "uid").unwrap_or_default()
                ),
            ));
        }
        if let Some(rv) = &opts.resource_version
            && meta_str(obj, "resourceVersion") != Some(rv.as_str())
        {
            return Err(ApiError::conflict(&rt.qualified(), name));
        }
        if opts.dry_run {
            return Ok(present(rt, obj));
        }
        let result = self.delete_internal(&gr, &key, opts.propagation).unwrap_or_default();
        Ok(present(rt, &result))
    }

    pub(crate) fn delete_collection(
        &mut self,
        rt: &ResourceType,
        ns: Option<&str>,
        labels: &LabelSelector,
        fields: &FieldSelector,
        opts: &DeleteOptions,
    ) -> Vec<Value> {
        let gr = rt.group_resource();
        let keys: Vec<ObjKey> = self
            .list(rt, ns, labels, fields)
            .iter()
            .map(|o| Self::key_for(rt, meta_str(o, "namespace"), meta_str(o, "name").unwrap_or_default()))
            .collect();
        let mut out = Vec::new();
        for key in keys {
            let obj = if opts.dry_run {
                self.stored(&gr, &key).cloned()
            } else {
                self.delete_internal(&gr, &key, opts.propagation)
            };
            out.extend(obj.map(|o| present(rt, &o)));
        }
        out
    }

    /// Deletes now, or marks for deletion when finalizers are present. Returns the object's last state.
    fn delete_internal(&mut self, gr: &GroupResource, key: &ObjKey, propagation: Propagation) -> Option<Value> {
        let obj = self.stored(gr, key)?.clone();
        let uid = meta_str(&obj, "uid").unwrap_or_default().to_string();
        match propagation {
            Propagation::Orphan => self.orphan_dependents(&uid),
            Propagation::Foreground => self.collect_garbage(&uid),
            Propagation::Background => {}
        }
        if finalizers(&obj).is_empty() {
            return self.remove_now(gr, key);
        }
        if meta_str(&obj, "deletionTimestamp").is_some() {
            return Some(obj);
        }
        let mut new = obj.clone();
        let meta = meta_mut(&mut new);
        meta.insert("deletionTimestamp".into(), json!(now_rfc3339()));
        meta.insert("deletionGracePeriodSeconds".into(), json!(0));
        if let Some(g) = meta.get("generation").and_then(Value::as_i64) {
            meta.insert("generation".into(), json!(g + 1));
        }
        let rv = self.next_rv();
        meta_mut(&mut new).insert("resourceVersion".into(), json!(rv.to_string()));
        self.insert(gr, key.clone(), new.clone());
        self.emit(gr, EventType::Modified, &new, Some(&obj));
        Some(new)
    }

    /// Removes an object from the store now, with its cascade: dependents, a CRD's objects, a namespace's content.
    fn remove_now(&mut self, gr: &GroupResource, key: &ObjKey) -> Option<Value> {
        let mut obj = self.remove(gr, key)?;
        let rv = self.next_rv();
        meta_mut(&mut obj).insert("resourceVersion".into(), json!(rv.to_string()));
        self.emit(gr, EventType::Deleted, &obj, None);
        if gr.group == "apiextensions.k8s.io" && gr.resource == "customresourcedefinitions" {
            self.registry.remove_crd(&key.1);
            if let Some(served) = obj.pointer("/spec/group").and_then(Value::as_str).map(|g| {
                GroupResource::new(g, obj.pointer("/spec/names/plural").and_then(Value::as_str).unwrap_or_default())
            }) {
                let keys: Vec<ObjKey> =
                    self.objects.get(&served).map(|c| c.keys().cloned().collect()).unwrap_or_default();
                for k in keys {
                    self.remove_now(&served, &k);
                }
                // Like the real server, watches of a type that is no longer served end.
                self.watchers.retain(|w| w.filter.gr != served);
            }
        }
        if gr.group.is_empty() && gr.resource == "namespaces" {
            let contents: Vec<(GroupResource, ObjKey)> = self
                .objects
                .iter()
                .flat_map(|(g, c)| c.keys().filter(|(ns, _)| *ns == key.1).map(|k| (g.clone(), k.clone())))
                .collect();
            for (g, k) in contents {
                self.delete_internal(&g, &k, Propagation::Background);
            }
        }
        let uid = meta_str(&obj, "uid").unwrap_or_default().to_string();
        self.collect_garbage(&uid);
        Some(obj)
    }

    fn dependents_of(&self, uid: &str) -> Vec<(GroupResource, ObjKey)> {
        if uid.is_empty() {
            return Vec::new();
        }
        self.objects
            .iter()
            .flat_map(|(g, c)| {
                c.iter().filter(|(_, o)| owner_uids(o).iter().any(|u| u == uid)).map(|(k, _)| (g.clone(), k.clone()))
            })
            .collect()
    }

    /// Garbage collection for a deleted (or foreground-deleting) owner: dependents without another live owner
    /// are deleted; once the owner is gone, the others lose the dangling owner reference.
    fn collect_garbage(&mut self, owner_uid: &str) {
        for (gr, key) in self.dependents_of(owner_uid) {
            let Some(dep) = self.stored(&gr, &key) else { continue };
            let other_live = owner_uids(dep).iter().any(|u| u != owner_uid && self.uids.contains_key(u));
            if !other_live {
                self.delete_internal(&gr, &key, Propagation::Background);
            } else if !self.uids.contains_key(owner_uid) {
                self.drop_owner_ref(&gr, &key, owner_uid);
            }
        }
    }

    fn orphan_dependents(&mut self, owner_uid: &str) {
        for (gr, key) in self.dependents_of(owner_uid) {
            self.drop_owner_ref(&gr, &key, owner_uid);
        }
    }

    fn drop_owner_ref(&mut self, gr: &GroupResource, key: &ObjKey, owner_uid: &str) {
        let Some(old) = self.stored(gr, key).cloned() else { return };
        let mut new = old.clone();
        let meta = meta_mut(&mut new);
        if let Some(Value::Array(refs)) = meta.get_mut("ownerReferences") {
            refs.retain(|r| r.get("uid").and_then(Value::as_str) != Some(owner_uid));
        }
        prune_empty(meta, &["ownerReferences"]);
        let rv = self.next_rv();
        meta_mut(&mut new).insert("resourceVersion".into(), json!(rv.to_string()));
        self.insert(gr, key.clone(), new.clone());
        self.emit(gr, EventType::Modified, &new, Some(&old));
    }

    fn register_crd(&mut self, crd: &Value) {
        if let (Some(name), Ok(types)) = (meta_str(crd, "name"), types_from_crd(crd)) {
            self.registry.set_crd(name, types);
        }
    }

    /// Registers a watcher and computes its first events, atomically with respect to writes.
    pub(crate) fn start_watch(
        &mut self,
        rt: &ResourceType,
        filter: WatchFilter,
        from: Option<u64>,
        send_initial_events: bool,
        bookmarks: bool,
    ) -> WatchStart {
        let mut initial = Vec::new();
        match from {
            Some(rv) if !send_initial_events && rv > 0 => {
                if rv < self.history_floor {
                    let status = ApiError::new(
                        410,
                        "Expired",
                        format!("too old resource version: {rv} ({})", self.history_floor),
                    )
                    .to_status();
                    return WatchStart::Expired(json!({"type": "ERROR", "object": status}));
                }
                for e in self.history.iter().filter(|e| e.rv > rv && e.gr == filter.gr) {
                    initial.extend(filter.render(e.kind, &e.object, e.old.as_ref()));
                }
            }
            _ => {
                if let Some(coll) = self.objects.get(&filter.gr) {
                    for obj in coll.values().filter(|o| filter.matches(o)) {
                        initial.push(filter.event("ADDED", obj));
                    }
                }
                if send_initial_events && bookmarks {
                    initial.push(json!({"type": "BOOKMARK", "object": {
                        "kind": rt.kind, "apiVersion": rt.api_version(),
                        "metadata": {"resourceVersion": self.rv.to_string(),
                                     "annotations": {"k8s.io/initial-events-end": "true"}},
                    }}));
                }
            }
        }
        let (tx, rx) = unbounded_channel();
        self.next_watcher_id += 1;
        let id = self.next_watcher_id;
        self.watchers.push(Watcher { id, filter, tx });
        WatchStart::Started { id, initial, rx }
    }

    pub(crate) fn remove_watcher(&mut self, id: u64) {
        self.watchers.retain(|w| w.id != id);
    }

    pub(crate) fn close_watches(&mut self) {
        self.watchers.clear();
    }

    pub(crate) fn open_watches(&self) -> usize {
        self.watchers.iter().filter(|w| !w.tx.is_closed()).count()
    }

    pub(crate) fn compact_history(&mut self) {
        self.history.clear();
        self.history_floor = self.rv;
    }

    /// Finds an object by uid (for tests).
    pub(crate) fn by_uid(&self, uid: &str) -> Option<Value> {
        let (gr, key) = self.uids.get(uid)?;
        self.stored(gr, key).cloned()
    }

    pub(crate) fn lookup_type(&self, group: &str, version: &str, plural: &str) -> Option<Arc<ResourceType>> {
        self.registry.lookup(group, version, plural)
    }
}

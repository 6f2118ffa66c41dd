//! Served resource types: the built-in ones and those registered by CustomResourceDefinitions.

use std::collections::BTreeMap;
use std::sync::Arc;

use serde_json::{Value, json};

use crate::error::ApiError;

/// Storage identity of a resource: objects are shared by every served version of it.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub(crate) struct GroupResource {
    pub group: String,
    pub resource: String,
}

impl GroupResource {
    pub(crate) fn new(group: &str, resource: &str) -> Self {
        Self { group: group.into(), resource: resource.into() }
    }
}

#[derive(Clone, Debug)]
pub(crate) struct PrinterColumn {
    pub name: String,
    pub type_: String,
    pub json_path: String,
    pub description: String,
    pub priority: i64,
}

#[derive(Clone, Debug)]
pub(crate) struct ResourceType {
    pub group: String,
    pub version: String,
    pub plural: String,
    pub singular: String,
    pub kind: String,
    pub list_kind: String,
    pub short_names: Vec<String>,
    pub categories: Vec<String>,
    pub namespaced: bool,
    pub status_subresource: bool,
    /// Whether objects carry `metadata.generation` (custom resources and CRDs do; secrets, configmaps... don't).
    pub has_generation: bool,
    /// Whether PUT without `metadata.resourceVersion` is allowed (built-ins: yes; custom resources and CRDs: no).
    pub allow_unconditional_update: bool,
    /// Field selectors supported besides `metadata.name` and `metadata.namespace`.
    pub extra_fields: &'static [&'static str],
    pub printer_columns: Vec<PrinterColumn>,
    /// The CRD that defines this type (None for built-ins).
    pub crd: Option<String>,
}

impl ResourceType {
    pub(crate) fn api_version(&self) -> String {
        if self.group.is_empty() { self.version.clone() } else { format!("{}/{}", self.group, self.version) }
    }

    pub(crate) fn group_resource(&self) -> GroupResource {
        GroupResource::new(&self.group, &self.plural)
    }

    /// `secrets` or `oauthapplications.kubetoken.io`, as in the real server's messages.
    pub(crate) fn qualified(&self) -> String {
        if self.group.is_empty() { self.plural.clone() } else { format!("{}.{}", self.plural, self.group) }
    }

    pub(crate) fn is_crd(&self) -> bool {
        self.group == "apiextensions.k8s.io" && self.plural == "customresourcedefinitions"
    }

    pub(crate) fn is_namespace(&self) -> bool {
        self.group.is_empty() && self.plural == "namespaces"
    }

    pub(crate) fn is_secret(&self) -> bool {
        self.group.is_empty() && self.plural == "secrets"
    }

    /// MutatingWebhookConfiguration or ValidatingWebhookConfiguration.
    pub(crate) fn is_webhook_configuration(&self) -> bool {
        self.group == ADMISSION_GROUP
            && matches!(self.plural.as_str(), "mutatingwebhookconfigurations" | "validatingwebhookconfigurations")
    }

    /// The discovery entries (`APIResource`) for this type and its status subresource.
    pub(crate) fn discovery_entries(&self) -> Vec<Value> {
        let verbs = if self.is_namespace() {
            json!(["create", "delete", "get", "list", "patch", "update", "watch"])
        } else {
            json!(["create", "delete", "deletecollection", "get", "list", "patch", "update", "watch"])
        };
        let mut main = json!({
            "name": self.plural,
            "singularName": self.singular,
            "namespaced": self.namespaced,
            "kind": self.kind,
            "verbs": verbs,
        });
        if !self.short_names.is_empty() {
            main["shortNames"] = json!(self.short_names);
        }
        if !self.categories.is_empty() {
            main["categories"] = json!(self.categories);
        }
        let mut out = vec![main];
        if self.status_subresource {
            out.push(json!({
                "name": format!("{}/status", self.plural),
                "singularName": "",
                "namespaced": self.namespaced,
                "kind": self.kind,
                "verbs": ["get", "patch", "update"],
            }));
        }
        out
    }
}

#[allow(clippy::too_many_arguments)]
fn builtin(
    group: &str,
    plural: &str,
    singular: &str,
    kind: &str,
    short: &[&str],
    namespaced: bool,
    extra_fields: &'static [&'static str],
    is_crd: bool,
) -> Arc<ResourceType> {
    Arc::new(ResourceType {
        group: group.into(),
        version: "v1".into(),
        plural: plural.into(),
        singular: singular.into(),
        kind: kind.into(),
        list_kind: format!("{kind}List"),
        short_names: short.iter().map(|s| s.to_string()).collect(),
        categories: Vec::new(),
        namespaced,
        status_subresource: is_crd || plural == "namespaces",
        has_generation: is_crd,
        allow_unconditional_update: !is_crd,
        extra_fields,
        printer_columns: Vec::new(),
        crd: None,
    })
}

fn with_generation(t: Arc<ResourceType>) -> Arc<ResourceType> {
    let mut t = Arc::unwrap_or_clone(t);
    t.has_generation = true;
    Arc::new(t)
}

/// The group of the webhook configurations.
pub(crate) const ADMISSION_GROUP: &str = "admissionregistration.k8s.io";

const CORE_EVENT_FIELDS: &[&str] = &[
    "involvedObject.kind",
    "involvedObject.namespace",
    "involvedObject.name",
    "involvedObject.uid",
    "involvedObject.apiVersion",
    "involvedObject.resourceVersion",
    "involvedObject.fieldPath",
    "reason",
    "reportingComponent",
    "source",
    "type",
];

const EVENTS_V1_FIELDS: &[&str] = &[
    "regarding.kind",
    "regarding.namespace",
    "regarding.name",
    "regarding.uid",
    "regarding.apiVersion",
    "regarding.resourceVersion",
    "regarding.fieldPath",
    "reason",
    "reportingController",
    "type",
];

/// The set of served types.
pub(crate) struct Registry {
    builtin: Vec<Arc<ResourceType>>,
    crds: BTreeMap<String, Vec<Arc<ResourceType>>>,
}

impl Registry {
    pub(crate) fn new() -> Self {
        let builtin = vec![
            builtin("", "namespaces", "namespace", "Namespace", &["ns"], false, &["status.phase"], false),
            builtin("", "secrets", "secret", "Secret", &[], true, &["type"], false),
            builtin("", "configmaps", "configmap", "ConfigMap", &["cm"], true, &[], false),
            builtin("", "events", "event", "Event", &["ev"], true, CORE_EVENT_FIELDS, false),
            builtin("coordination.k8s.io", "leases", "lease", "Lease", &[], true, &[], false),
            builtin("events.k8s.io", "events", "event", "Event", &["ev"], true, EVENTS_V1_FIELDS, false),
            // What a Helm chart and an app's manifests install: stored and served like any object (no
            // controllers behind them: a Deployment starts no pods).
            builtin("", "serviceaccounts", "serviceaccount", "ServiceAccount", &["sa"], true, &[], false),
            builtin("", "services", "service", "Service", &["svc"], true, &[], false),
            builtin("", "pods", "pod", "Pod", &["po"], true, &[], false),
            builtin("apps", "deployments", "deployment", "Deployment", &["deploy"], true, &[], false),
            builtin(
                "policy",
                "poddisruptionbudgets",
                "poddisruptionbudget",
                "PodDisruptionBudget",
                &["pdb"],
                true,
                &[],
                false,
            ),
            builtin("rbac.authorization.k8s.io", "roles", "role", "Role", &[], true, &[], false),
            builtin("rbac.authorization.k8s.io", "rolebindings", "rolebinding", "RoleBinding", &[], true, &[], false),
            builtin("rbac.authorization.k8s.io", "clusterroles", "clusterrole", "ClusterRole", &[], false, &[], false),
            builtin(
                "rbac.authorization.k8s.io",
                "clusterrolebindings",
                "clusterrolebinding",
                "ClusterRoleBinding",
                &[],
                false,
                &[],
                false,
            ),
            // Mutating webhooks are called on CREATE (admission.rs); validating ones are only stored. Like
            // Kubernetes, both carry a generation.
            with_generation(builtin(
                ADMISSION_GROUP,
                "mutatingwebhookconfigurations",
                "mutatingwebhookconfiguration",
                "MutatingWebhookConfiguration",
                &[],
                false,
                &[],
                false,
            )),
            with_generation(builtin(
                ADMISSION_GROUP,
                "validatingwebhookconfigurations",
                "validatingwebhookconfiguration",
                "ValidatingWebhookConfiguration",
                &[],
                false,
                &[],
                false,
            )),
            builtin(
                "apiextensions.k8s.io",
                "customresourcedefinitions",
                "customresourcedefinition",
                "CustomResourceDefinition",
                &["crd", "crds"],
                false,
                &[],
                true,
            ),
        ];
        Self { builtin, crds: BTreeMap::new() }
    }

    pub(crate) fn all(&self) -> impl Iterator<Item = &Arc<ResourceType>> {
        self.builtin.iter().chain(self.crds.values().flatten())
    }

    pub(crate) fn lookup(&self, group: &str, version: &str, plural: &str) -> Option<Arc<ResourceType>> {
        self.all().find(|t| t.group == group && t.version == version && t.plural == plural).cloned()
    }

    pub(crate) fn set_crd(&mut self, name: &str, types: Vec<Arc<ResourceType>>) {
        self.crds.insert(name.to_string(), types);
    }

    pub(crate) fn remove_crd(&mut self, name: &str) {
        self.crds.remove(name);
    }

    /// Served API groups (not the core group) with their versions, highest priority first.
    pub(crate) fn groups(&self) -> Vec<(String, Vec<String>)> {
        let mut groups: Vec<(String, Vec<String>)> = Vec::new();
        for t in self.all().filter(|t| !t.group.is_empty()) {
            match groups.iter_mut().find(|(g, _)| *g == t.group) {
                Some((_, versions)) if !versions.contains(&t.version) => versions.push(t.version.clone()),
                Some(_) => {}
                None => groups.push((t.group.clone(), vec![t.version.clone()])),
            }
        }
        for (_, versions) in &mut groups {
            versions.sort_by_key(|v| std::cmp::Reverse(version_priority(v)));
        }
        groups
    }

    pub(crate) fn resources(&self, group: &str, version: &str) -> Vec<Arc<ResourceType>> {
        self.all().filter(|t| t.group == group && t.version == version).cloned().collect()
    }
}

/// Kubernetes version priority: GA > beta > alpha, then by number; anything else last.
fn version_priority(v: &str) -> (u8, u64, u64) {
    let Some(rest) = v.strip_prefix('v') else { return (0, 0, 0) };
    let digits = rest.bytes().take_while(u8::is_ascii_digit).count();
    let Ok(major) = rest[..digits].parse::<u64>() else { return (0, 0, 0) };
    let tail = &rest[digits..];
    let minor = |s: &str| s.parse::<u64>().ok();
    match tail {
        "" => (3, major, 0),
        _ => match (tail.strip_prefix("beta"), tail.strip_prefix("alpha")) {
            (Some(n), _) if minor(n).is_some() => (2, major, minor(n).unwrap_or(0)),
            (_, Some(n)) if minor(n).is_some() => (1, major, minor(n).unwrap_or(0)),
            _ => (0, 0, 0),
        },
    }
}

fn invalid_crd(name: &str, msg: impl std::fmt::Display) -> ApiError {
    ApiError::invalid(format!("CustomResourceDefinition.apiextensions.k8s.io \"{name}\" is invalid: {msg}"))
}

/// Validates a CRD object and derives the types it serves.
pub(crate) fn types_from_crd(crd: &Value) -> Result<Vec<Arc<ResourceType>>, ApiError> {
    let name = crd.pointer("/metadata/name").and_then(Value::as_str).unwrap_or_default();
    let s = |p: &str| crd.pointer(p).and_then(Value::as_str).unwrap_or_default().to_string();
    let group = s("/spec/group");
    let plural = s("/spec/names/plural");
    let kind = s("/spec/names/kind");
    if group.is_empty() || !group.contains('.') {
        return Err(invalid_crd(name, "spec.group: Invalid value: should be a domain with at least one dot"));
    }
    if plural.is_empty() || plural != plural.to_lowercase() {
        return Err(invalid_crd(name, "spec.names.plural: Required value (lowercase)"));
    }
    if kind.is_empty() {
        return Err(invalid_crd(name, "spec.names.kind: Required value"));
    }
    if name != format!("{plural}.{group}") {
        return Err(invalid_crd(
            name,
            format!("metadata.name: Invalid value: {name:?}: must be spec.names.plural+\".\"+spec.group"),
        ));
    }
    let namespaced = match s("/spec/scope").as_str() {
        "Namespaced" => true,
        "Cluster" => false,
        other => {
            return Err(invalid_crd(
                name,
                format!("spec.scope: Unsupported value: {other:?}: supported values: \"Cluster\", \"Namespaced\""),
            ));
        }
    };
    let versions = crd.pointer("/spec/versions").and_then(Value::as_array).cloned().unwrap_or_default();
    if versions.is_empty() {
        return Err(invalid_crd(name, "spec.versions: Invalid value: must have exactly one version marked as storage"));
    }
    if versions.iter().filter(|v| v.get("storage").and_then(Value::as_bool) == Some(true)).count() != 1 {
        return Err(invalid_crd(name, "spec.versions: Invalid value: must have exactly one version marked as storage"));
    }
    let singular = match s("/spec/names/singular") {
        x if x.is_empty() => kind.to_lowercase(),
        x => x,
    };
    let list_kind = match s("/spec/names/listKind") {
        x if x.is_empty() => format!("{kind}List"),
        x => x,
    };
    let strings = |p: &str| -> Vec<String> {
        crd.pointer(p)
            .and_then(Value::as_array)
            .map(|a| a.iter().filter_map(|x| x.as_str().map(String::from)).collect())
            .unwrap_or_default()
    };
    let mut out = Vec::new();
    for v in &versions {
        let vname = v.get("name").and_then(Value::as_str).unwrap_or_default();
        if vname.is_empty() {
            return Err(invalid_crd(name, "spec.versions[].name: Required value"));
        }
        if v.get("served").and_then(Value::as_bool) != Some(true) {
            continue;
        }
        let printer_columns = v
            .get("additionalPrinterColumns")
            .and_then(Value::as_array)
            .map(|cols| {
                cols.iter()
                    .map(|c| {
                        let f = |k: &str| c.get(k).and_then(Value::as_str).unwrap_or_default().to_string();
                        PrinterColumn {
                            name: f("name"),
                            type_: f("type"),
                            json_path: f("jsonPath"),
                            description: f("description"),
                            priority: c.get("priority").and_then(Value::as_i64).unwrap_or(0),
                        }
                    })
                    .collect()
            })
            .unwrap_or_default();
        out.push(Arc::new(ResourceType {
            group: group.clone(),
            version: vname.to_string(),
            plural: plural.clone(),
            singular: singular.clone(),
            kind: kind.clone(),
            list_kind: list_kind.clone(),
            short_names: strings("/spec/names/shortNames"),
            categories: strings("/spec/names/categories"),
            namespaced,
            status_subresource: v.pointer("/subresources/status").is_some(),
            has_generation: true,
            allow_unconditional_update: false,
            extra_fields: &[],
            printer_columns,
            crd: Some(name.to_string()),
        }));
    }
    Ok(out)
}

/// The status the real API server gives an established CRD; `old` keeps the condition transition times stable.
pub(crate) fn crd_status(crd: &Value, old: Option<&Value>) -> Value {
    let names = crd.pointer("/spec/names").cloned().unwrap_or_else(|| json!({}));
    let mut accepted = names.clone();
    let kind = names.get("kind").and_then(Value::as_str).unwrap_or_default().to_string();
    if accepted.get("singular").is_none() {
        accepted["singular"] = json!(kind.to_lowercase());
    }
    if accepted.get("listKind").is_none() {
        accepted["listKind"] = json!(format!("{kind}List"));
    }
    let stored: Vec<Value> = crd
        .pointer("/spec/versions")
        .and_then(Value::as_array)
        .map(|vs| {
            vs.iter()
                .filter(|v| v.get("storage").and_then(Value::as_bool) == Some(true))
                .filter_map(|v| v.get("name").cloned())
                .collect()
        })
        .unwrap_or_default();
    let mut stored_versions: Vec<Value> =
        old.and_then(|o| o.pointer("/status/storedVersions")).and_then(Value::as_array).cloned().unwrap_or_default();
    for v in stored {
        if !stored_versions.contains(&v) {
            stored_versions.push(v);
        }
    }
    let since = old
        .and_then(|o| o.pointer("/status/conditions/0/lastTransitionTime"))
        .and_then(Value::as_str)
        .map(String::from)
        .unwrap_or_else(crate::util::now_rfc3339);
    json!({
        "conditions": [
            {"type": "NamesAccepted", "status": "True", "reason": "NoConflicts",
             "message": "no conflicts found", "lastTransitionTime": since},
            {"type": "Established", "status": "True", "reason": "InitialNamesAccepted",
             "message": "the initial names have been accepted", "lastTransitionTime": since},
        ],
        "acceptedNames": accepted,
        "storedVersions": stored_versions,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn version_order() {
        let mut v = vec!["v1alpha1", "v2beta1", "v1", "v1beta2", "foo", "v2"];
        v.sort_by_key(|v| std::cmp::Reverse(version_priority(v)));
        assert_eq!(v, ["v2", "v1", "v2beta1", "v1beta2", "v1alpha1", "foo"]);
    }
}

//! RBAC audit: every request the test server recorded from a kubetoken binary (told apart by its User-Agent)
//! must be allowed by the rules in `deploy/`. This proves least privilege against the calls actually made.

use std::path::Path;

use kube_test_server::RequestRecord;
use serde_yaml::Value;

#[derive(Debug)]
pub struct Rule {
    groups: Vec<String>,
    resources: Vec<String>,
    verbs: Vec<String>,
    names: Vec<String>,
}

fn strings(v: &Value, key: &str) -> Vec<String> {
    v.get(key)
        .and_then(Value::as_sequence)
        .map_or_else(Vec::new, |s| s.iter().filter_map(Value::as_str).map(str::to_string).collect())
}

/// The rules of every Role and ClusterRole in a manifest file.
pub fn rules(file: &Path) -> Vec<Rule> {
    let text = std::fs::read_to_string(file).unwrap_or_else(|e| panic!("{}: {e}", file.display()));
    let mut out = Vec::new();
    for doc in serde_yaml::Deserializer::from_str(&text) {
        let v: Value = serde::Deserialize::deserialize(doc).expect("yaml");
        if !matches!(v.get("kind").and_then(Value::as_str), Some("Role" | "ClusterRole")) {
            continue;
        }
        for r in v.get("rules").and_then(Value::as_sequence).into_iter().flatten() {
            out.push(Rule {
                groups: strings(r, "apiGroups"),
                resources: strings(r, "resources"),
                verbs: strings(r, "verbs"),
                names: strings(r, "resourceNames"),
            });
        }
    }
    out
}

/// (verb, group, resource incl. subresource, name) of a resource request; `None` for discovery and health.
pub fn access(r: &RequestRecord) -> Option<(String, String, String, Option<String>)> {
    let parts: Vec<&str> = r.path.trim_matches('/').split('/').collect();
    let (group, rest) = match parts.as_slice() {
        ["api", "v1", rest @ ..] => (String::new(), rest),
        ["apis", group, _version, rest @ ..] => (group.to_string(), rest),
        _ => return None,
    };
    let rest: Vec<&str> = match rest {
        ["namespaces", _ns, more @ ..] if !more.is_empty() => more.to_vec(),
        other => other.to_vec(),
    };
    let (resource, name, sub) = match rest.as_slice() {
        [] => return None,
        [resource] => (resource.to_string(), None, None),
        [resource, name] => (resource.to_string(), Some(name.to_string()), None),
        [resource, name, sub, ..] => (resource.to_string(), Some(name.to_string()), Some(sub.to_string())),
    };
    let query: Vec<(String, String)> =
        form_urlencoded::parse(r.query.as_bytes()).map(|(k, v)| (k.to_string(), v.to_string())).collect();
    let selected = query
        .iter()
        .find(|(k, _)| k == "fieldSelector")
        .and_then(|(_, v)| v.strip_prefix("metadata.name=").map(str::to_string));
    let verb = match (r.method.as_str(), &name) {
        ("GET", Some(_)) => "get",
        ("GET", None) if r.is_watch() => "watch",
        ("GET", None) => "list",
        ("POST", _) => "create",
        ("PUT", _) => "update",
        ("PATCH", _) => "patch",
        ("DELETE", Some(_)) => "delete",
        ("DELETE", None) => "deletecollection",
        (m, _) => panic!("unexpected method {m}"),
    };
    let resource = match sub {
        Some(s) => format!("{resource}/{s}"),
        None => resource,
    };
    Some((verb.to_string(), group, resource, name.or(selected)))
}

fn allows(rule: &Rule, verb: &str, group: &str, resource: &str, name: Option<&str>) -> bool {
    let any = |list: &[String], x: &str| list.iter().any(|v| v == "*" || v == x);
    any(&rule.verbs, verb)
        && any(&rule.groups, group)
        && any(&rule.resources, resource)
        && (rule.names.is_empty() || name.is_some_and(|n| rule.names.iter().any(|r| r == n)))
}

/// The requests by clients whose User-Agent starts with `agent` that `rules` do not allow.
pub fn violations(records: &[RequestRecord], agent: &str, rules: &[Rule]) -> Vec<String> {
    records
        .iter()
        .filter(|r| r.user_agent.starts_with(agent))
        .filter_map(|r| {
            let (verb, group, resource, name) = access(r)?;
            (!rules.iter().any(|rule| allows(rule, &verb, &group, &resource, name.as_deref())))
                .then(|| format!("{verb} {group}/{resource} {name:?} ({} {}?{})", r.method, r.path, r.query))
        })
        .collect()
}

/// Fails when a kubetoken binary made a request its RBAC in `deploy/` does not allow. Returns how many requests
/// of each component were checked.
pub fn assert_least_privilege(records: &[RequestRecord]) -> (usize, usize) {
    let deploy = Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy");
    let mut counts = (0, 0);
    for (agent, file, count) in [
        ("kubetoken-controller/", "kubetoken.yaml", &mut counts.0),
        ("kubetoken-sidecar/", "sidecar-rbac.yaml", &mut counts.1),
    ] {
        let bad = violations(records, agent, &rules(&deploy.join(file)));
        assert!(bad.is_empty(), "deploy/{file} does not allow requests {agent} made:\n{}", bad.join("\n"));
        *count = records.iter().filter(|r| r.user_agent.starts_with(agent) && access(r).is_some()).count();
    }
    counts
}

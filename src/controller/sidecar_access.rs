//! The sidecar's access to one application: the rules of the Role the controller keeps when the application names
//! its sidecar's ServiceAccount (`spec.sidecar.serviceAccountName`). Pure; the same rules the chart's
//! `sidecar-rbac.yaml` renders for an application listed in its values (a test compares them).

use k8s_openapi::api::rbac::v1::PolicyRule;

use crate::storage::kube_store::layout;

/// The Role's and the RoleBinding's name.
pub fn role_name(app: &str) -> String {
    format!("{app}-kubetoken-sidecar")
}

/// Only named objects: the application (read, watched), its credentials, signing-keys, token-secrets and users
/// Secrets (read, watched), its token-state ConfigMaps (read, watched, patched) and the ConfigMaps of its offline key
/// sets, `spec.trustedIssuers[].jwks.configMapRef` (read, watched; a rule of their own, without patch, and none when
/// there are none). Nothing created or deleted.
pub fn rules(
    app: &str,
    credentials_secret: &str,
    users_secret: Option<&str>,
    key_set_config_maps: &[String],
) -> Vec<PolicyRule> {
    let read = || vec!["get".to_string(), "list".to_string(), "watch".to_string()];
    let mut secrets =
        vec![credentials_secret.to_string(), format!("{app}-signing-keys"), format!("{app}-token-secrets")];
    secrets.extend(users_secret.map(str::to_string));
    let mut state_verbs = read();
    state_verbs.push("patch".into());
    let mut rules = vec![
        PolicyRule {
            api_groups: Some(vec!["kubetoken.io".into()]),
            resources: Some(vec!["oauthapplications".into()]),
            resource_names: Some(vec![app.to_string()]),
            verbs: read(),
            ..PolicyRule::default()
        },
        PolicyRule {
            api_groups: Some(vec![String::new()]),
            resources: Some(vec!["secrets".into()]),
            resource_names: Some(secrets),
            verbs: read(),
            ..PolicyRule::default()
        },
        PolicyRule {
            api_groups: Some(vec![String::new()]),
            resources: Some(vec!["configmaps".into()]),
            resource_names: Some(layout::object_names(app).collect()),
            verbs: state_verbs,
            ..PolicyRule::default()
        },
    ];
    // Two issuers may share a ConfigMap: each name once, in the spec's order (the Role is compared as a whole).
    let mut key_sets: Vec<String> = Vec::new();
    for name in key_set_config_maps {
        if !key_sets.contains(name) {
            key_sets.push(name.clone());
        }
    }
    if !key_sets.is_empty() {
        rules.push(PolicyRule {
            api_groups: Some(vec![String::new()]),
            resources: Some(vec!["configmaps".into()]),
            resource_names: Some(key_sets),
            verbs: read(),
            ..PolicyRule::default()
        });
    }
    rules
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The rules the chart renders for `shop` (deploy/sidecar-rbac.yaml, a file the chart tests keep current) are
    /// exactly these: the chart's route and the controller's route grant the same.
    #[test]
    fn the_rules_are_the_charts_for_the_same_application() {
        let rendered = include_str!("../../deploy/sidecar-rbac.yaml");
        let role = serde_yaml::Deserializer::from_str(rendered)
            .map(|d| <serde_yaml::Value as serde::Deserialize>::deserialize(d).expect("yaml"))
            .find(|d| d["kind"].as_str() == Some("Role"))
            .expect("a Role");
        let charted: Vec<PolicyRule> = serde_yaml::from_value(role["rules"].clone()).expect("rules");
        assert_eq!(rules("shop", "shop-credentials", Some("shop-users"), &["shop-issuer-keys".into()]), charted);
    }

    #[test]
    fn key_set_config_maps_are_granted_read_only_once_each_and_only_when_named() {
        let without = rules("a", "a-credentials", None, &[]);
        assert_eq!(without.len(), 3, "no key-set rule without key sets");
        let with = rules("a", "a-credentials", None, &["k1".into(), "k2".into(), "k1".into()]);
        let last = with.last().expect("a rule");
        assert_eq!(last.resource_names, Some(vec!["k1".to_string(), "k2".to_string()]));
        assert_eq!(last.verbs, vec!["get", "list", "watch"]);
        assert_eq!(last.resources, Some(vec!["configmaps".to_string()]));
    }
}

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
/// Secrets (read, watched), and its token-state ConfigMaps (read, watched, patched). Nothing created or deleted.
pub fn rules(app: &str, credentials_secret: &str, users_secret: Option<&str>) -> Vec<PolicyRule> {
    let read = || vec!["get".to_string(), "list".to_string(), "watch".to_string()];
    let mut secrets =
        vec![credentials_secret.to_string(), format!("{app}-signing-keys"), format!("{app}-token-secrets")];
    secrets.extend(users_secret.map(str::to_string));
    let mut state_verbs = read();
    state_verbs.push("patch".into());
    vec![
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
    ]
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
        assert_eq!(rules("shop", "shop-credentials", Some("shop-users")), charted);
    }
}

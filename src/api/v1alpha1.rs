//! `OAuthApplication` (`kubetoken.io/v1alpha1`): the resource users `kubectl apply`, read as-is by standalone mode
//! and (later) reconciled by the controller. Field names follow Kubernetes conventions (camelCase).

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::duration::parse_duration;
use crate::core::scope::{is_device_scope, is_scope_token};

pub const GROUP: &str = "kubetoken.io";
pub const VERSION: &str = "v1alpha1";
pub const API_VERSION: &str = "kubetoken.io/v1alpha1";
pub const KIND: &str = "OAuthApplication";
/// Key of the users Secret that holds the user list when `spec.users.secretRef.key` is not set.
pub const DEFAULT_USERS_KEY: &str = "users.yaml";

#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct OAuthApplication {
    pub api_version: String,
    pub kind: String,
    pub metadata: ObjectMeta,
    pub spec: OAuthApplicationSpec,
}

#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema, PartialEq)]
pub struct ObjectMeta {
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct OAuthApplicationSpec {
    /// Grants this application may use.
    #[serde(default = "default_grant_types")]
    pub grant_types: Vec<GrantType>,
    /// `JWT` (default): a new request for the same (client, user, scope set) revokes the previous token.
    /// `Opaque`: the same still-valid token is returned for the same set.
    #[serde(default)]
    pub token_format: TokenFormat,
    /// Access token lifetime, e.g. `1h`.
    #[serde(default = "default_access_lifetime")]
    pub access_token_lifetime: String,
    /// Refresh token lifetime, e.g. `24h`; each rotation starts a new lifetime.
    #[serde(default = "default_refresh_lifetime")]
    pub refresh_token_lifetime: String,
    /// `aud` of access tokens; the client ID when empty.
    #[serde(default)]
    pub audience: Vec<String>,
    #[serde(default)]
    pub signing: SigningSpec,
    /// Roles of the client itself, used to validate scopes in the `client_credentials` grant.
    #[serde(default)]
    pub client_roles: Vec<String>,
    /// Scopes the application declares. `device_<id>` scopes need no declaration.
    #[serde(default)]
    pub scopes: Vec<ScopeSpec>,
    /// Where the users of the `password` grant live.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub users: Option<UsersSpec>,
    /// Where the client credentials live (keys `client_id`, `client_secret`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub credentials: Option<CredentialsSpec>,
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, JsonSchema, PartialEq, Eq, Hash)]
#[serde(rename_all = "snake_case")]
pub enum GrantType {
    Password,
    ClientCredentials,
    RefreshToken,
}

impl GrantType {
    pub fn as_str(self) -> &'static str {
        match self {
            GrantType::Password => "password",
            GrantType::ClientCredentials => "client_credentials",
            GrantType::RefreshToken => "refresh_token",
        }
    }
}

#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, JsonSchema, PartialEq, Eq)]
pub enum TokenFormat {
    #[default]
    #[serde(rename = "JWT")]
    Jwt,
    Opaque,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, JsonSchema, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct SigningSpec {
    #[serde(default)]
    pub algorithm: SigningAlgorithm,
    /// How often the controller rotates the signing key (default 30d).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rotation_period: Option<String>,
}

#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, JsonSchema, PartialEq, Eq, Hash)]
pub enum SigningAlgorithm {
    #[default]
    ES256,
    RS256,
    EdDSA,
}

impl SigningAlgorithm {
    pub fn as_str(self) -> &'static str {
        match self {
            SigningAlgorithm::ES256 => "ES256",
            SigningAlgorithm::RS256 => "RS256",
            SigningAlgorithm::EdDSA => "EdDSA",
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ScopeSpec {
    pub name: String,
    /// Roles that may have this scope; anyone may when empty.
    #[serde(default)]
    pub roles: Vec<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct UsersSpec {
    pub secret_ref: SecretKeyRef,
}

#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct SecretKeyRef {
    pub name: String,
    /// Key in the Secret; `users.yaml` when unset.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct CredentialsSpec {
    /// Defaults to `<name>-credentials`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secret_name: Option<String>,
}

/// One entry of the users Secret (`users.yaml`).
#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct UserEntry {
    pub username: String,
    /// argon2id PHC string (`kubetoken hash-password`) or a bcrypt hash.
    pub password_hash: String,
    #[serde(default)]
    pub roles: Vec<String>,
}

fn default_grant_types() -> Vec<GrantType> {
    vec![GrantType::Password, GrantType::ClientCredentials, GrantType::RefreshToken]
}
fn default_access_lifetime() -> String {
    "1h".into()
}
fn default_refresh_lifetime() -> String {
    "24h".into()
}

/// A spec value that cannot work, with the path of the offending field.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{path}: {message}")]
pub struct FieldError {
    pub path: String,
    pub message: String,
}

impl OAuthApplicationSpec {
    pub fn access_lifetime_secs(&self) -> Result<u64, FieldError> {
        parse_duration(&self.access_token_lifetime).map_err(|e| field("spec.accessTokenLifetime", e))
    }

    pub fn refresh_lifetime_secs(&self) -> Result<u64, FieldError> {
        parse_duration(&self.refresh_token_lifetime).map_err(|e| field("spec.refreshTokenLifetime", e))
    }

    /// Checks what the type system cannot: durations, scope names, duplicates.
    pub fn validate(&self) -> Result<(), FieldError> {
        self.access_lifetime_secs()?;
        self.refresh_lifetime_secs()?;
        if let Some(period) = &self.signing.rotation_period {
            parse_duration(period).map_err(|e| field("spec.signing.rotationPeriod", e))?;
        }
        if self.grant_types.is_empty() {
            return Err(field("spec.grantTypes", "must list at least one grant type"));
        }
        for (i, g) in self.grant_types.iter().enumerate() {
            if self.grant_types[..i].contains(g) {
                return Err(field(format!("spec.grantTypes[{i}]"), format!("{} is listed twice", g.as_str())));
            }
        }
        for (i, aud) in self.audience.iter().enumerate() {
            if aud.is_empty() {
                return Err(field(format!("spec.audience[{i}]"), "must not be empty"));
            }
        }
        for (i, scope) in self.scopes.iter().enumerate() {
            let path = format!("spec.scopes[{i}].name");
            if !is_scope_token(&scope.name) {
                return Err(field(
                    path,
                    format!("{:?} is not a valid scope name (RFC 6749 scope characters, no spaces)", scope.name),
                ));
            }
            if is_device_scope(&scope.name) {
                return Err(field(
                    path,
                    format!("{:?}: device_ scopes are always granted and must not be declared", scope.name),
                ));
            }
            if self.scopes[..i].iter().any(|s| s.name == scope.name) {
                return Err(field(path, format!("scope {:?} is declared twice", scope.name)));
            }
        }
        if self.grant_types.contains(&GrantType::Password) && self.users.is_none() {
            return Err(field("spec.users", "the password grant needs a users Secret (spec.users.secretRef)"));
        }
        Ok(())
    }
}

fn field(path: impl Into<String>, message: impl ToString) -> FieldError {
    FieldError { path: path.into(), message: message.to_string() }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(yaml: &str) -> OAuthApplicationSpec {
        serde_yaml::from_str(yaml).expect("test spec parses")
    }

    #[test]
    fn defaults_match_the_documented_ones() {
        let s = spec("users: {secretRef: {name: u}}");
        assert_eq!(s.token_format, TokenFormat::Jwt);
        assert_eq!(s.signing.algorithm, SigningAlgorithm::ES256);
        assert_eq!(s.access_lifetime_secs(), Ok(3600));
        assert_eq!(s.refresh_lifetime_secs(), Ok(86_400));
        assert_eq!(s.grant_types.len(), 3);
        assert_eq!(s.validate(), Ok(()));
    }

    #[test]
    fn validation_names_the_field() {
        let cases = [
            ("accessTokenLifetime: 1x\ngrantTypes: [client_credentials]", "spec.accessTokenLifetime"),
            ("grantTypes: []", "spec.grantTypes"),
            ("grantTypes: [client_credentials]\nscopes: [{name: 'a b'}]", "spec.scopes[0].name"),
            ("grantTypes: [client_credentials]\nscopes: [{name: device_x}]", "spec.scopes[0].name"),
            ("grantTypes: [client_credentials]\nscopes: [{name: a}, {name: a}]", "spec.scopes[1].name"),
            ("grantTypes: [password]", "spec.users"),
        ];
        for (yaml, path) in cases {
            let err = spec(yaml).validate().expect_err(yaml);
            assert_eq!(err.path, path, "{yaml}");
        }
    }

    #[test]
    fn unknown_enum_values_and_fields_are_rejected() {
        assert!(serde_yaml::from_str::<OAuthApplicationSpec>("tokenFormat: jwt").is_err());
        assert!(serde_yaml::from_str::<OAuthApplicationSpec>("signing: {algorithm: HS256}").is_err());
        assert!(serde_yaml::from_str::<OAuthApplicationSpec>("grantType: [password]").is_err());
    }
}

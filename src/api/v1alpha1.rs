//! `OAuthApplication` (`kubetoken.io/v1alpha1`): the resource users `kubectl apply`, read as-is by standalone mode
//! and (later) reconciled by the controller. Field names follow Kubernetes conventions (camelCase).

use crate::core::signing::{Algorithm, KeyError};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use kube::CustomResource;
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

/// Annotation on an OAuthApplication asking for a new client secret: set it to a new value (e.g. a timestamp).
pub const ROTATE_CLIENT_SECRET_ANNOTATION: &str = "kubetoken.io/rotate-client-secret";

/// Durations: one or more `<number><unit>` with unit s, m, h or d.
const DURATION_PATTERN: &str = "^([0-9]+[smhd])+$";

/// An OAuth2 application: the clients of one app, its users, scopes and token settings.
#[derive(CustomResource, Debug, Clone, Serialize, Deserialize, JsonSchema, PartialEq)]
#[kube(
    group = "kubetoken.io",
    version = "v1alpha1",
    kind = "OAuthApplication",
    plural = "oauthapplications",
    shortname = "oauthapp",
    namespaced,
    status = "OAuthApplicationStatus",
    printcolumn = r#"{"name":"Client ID","type":"string","jsonPath":".status.clientId"}"#,
    printcolumn = r#"{"name":"Ready","type":"string","jsonPath":".status.conditions[?(@.type==\"Ready\")].status"}"#,
    printcolumn = r#"{"name":"Key","type":"string","priority":1,"jsonPath":".status.currentKeyId"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[serde(rename_all = "camelCase")]
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
    #[schemars(regex(pattern = DURATION_PATTERN))]
    pub access_token_lifetime: String,
    /// Refresh token lifetime, e.g. `24h`; each rotation starts a new lifetime.
    #[serde(default = "default_refresh_lifetime")]
    #[schemars(regex(pattern = DURATION_PATTERN))]
    pub refresh_token_lifetime: String,
    /// The absolute lifetime of a login session, e.g. `30d`: past it, its refresh tokens are refused however
    /// recently they were rotated (Keycloak's "client session max"). Unset: no limit.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = DURATION_PATTERN))]
    pub session_max_lifetime: Option<String>,
    /// Live token keys (device and scope-set combinations) one user may hold at once. A login for a new key past
    /// it revokes the pair of the user's least recently issued key (a device cap).
    #[serde(default = "default_max_token_keys_per_user")]
    #[schemars(range(min = 1, max = 10000))]
    pub max_token_keys_per_user: u32,
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
    #[schemars(length(max = 256))]
    pub scopes: Vec<ScopeSpec>,
    /// Where the users of the `password` grant live.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub users: Option<UsersSpec>,
    /// Identity providers whose JWTs are accepted as users: the `jwt-bearer` (RFC 7523) and `token-exchange`
    /// (RFC 8693) grants turn a trusted issuer's assertion into this application's per-device tokens.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 16))]
    pub trusted_issuers: Vec<TrustedIssuerSpec>,
    /// Where the client credentials live (keys `client_id`, `client_secret`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub credentials: Option<CredentialsSpec>,
    /// The sidecar's access: with `serviceAccountName`, the controller keeps a Role and RoleBinding granting that
    /// ServiceAccount exactly what the sidecar needs for this application (unless its installation turned that off).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sidecar: Option<SidecarSpec>,
}

#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct SidecarSpec {
    /// The ServiceAccount of the pods that run this application's sidecar.
    #[schemars(regex(pattern = r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$"), length(max = 253))]
    pub service_account_name: String,
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, JsonSchema, PartialEq, Eq, Hash)]
#[serde(rename_all = "snake_case")]
pub enum GrantType {
    Password,
    ClientCredentials,
    RefreshToken,
    /// RFC 7523 section 2.1: a trusted issuer's JWT as the grant.
    #[serde(rename = "urn:ietf:params:oauth:grant-type:jwt-bearer")]
    JwtBearer,
    /// RFC 8693: a trusted issuer's token exchanged for this application's.
    #[serde(rename = "urn:ietf:params:oauth:grant-type:token-exchange")]
    TokenExchange,
}

impl GrantType {
    pub fn as_str(self) -> &'static str {
        crate::core::app::GrantType::from(self).as_str()
    }
}

impl From<GrantType> for crate::core::app::GrantType {
    fn from(g: GrantType) -> Self {
        match g {
            GrantType::Password => Self::Password,
            GrantType::ClientCredentials => Self::ClientCredentials,
            GrantType::RefreshToken => Self::RefreshToken,
            GrantType::JwtBearer => Self::JwtBearer,
            GrantType::TokenExchange => Self::TokenExchange,
        }
    }
}

impl From<TokenFormat> for crate::core::app::TokenFormat {
    fn from(f: TokenFormat) -> Self {
        match f {
            TokenFormat::Jwt => Self::Jwt,
            TokenFormat::Opaque => Self::Opaque,
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
#[serde(rename_all = "camelCase")]
pub struct SigningSpec {
    #[serde(default)]
    pub algorithm: SigningAlgorithm,
    /// How often the controller rotates the signing key (default 30d).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = DURATION_PATTERN))]
    pub rotation_period: Option<String>,
}

#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, JsonSchema, PartialEq, Eq, Hash)]
pub enum SigningAlgorithm {
    #[default]
    ES256,
    RS256,
    EdDSA,
    /// Any other value: one an older CRD (or none) let through. Read, so that one bad object cannot stop the
    /// controller's watch; rejected by validation with a clear message. Not in the CRD's enum.
    #[serde(other)]
    #[schemars(skip)]
    Unsupported,
}

impl SigningAlgorithm {
    pub fn as_str(self) -> &'static str {
        Algorithm::try_from(self).map_or("unsupported", Algorithm::as_str)
    }
}

impl TryFrom<SigningAlgorithm> for Algorithm {
    type Error = KeyError;
    fn try_from(a: SigningAlgorithm) -> Result<Self, KeyError> {
        match a {
            SigningAlgorithm::ES256 => Ok(Algorithm::ES256),
            SigningAlgorithm::RS256 => Ok(Algorithm::RS256),
            SigningAlgorithm::EdDSA => Ok(Algorithm::EdDSA),
            SigningAlgorithm::Unsupported => {
                Err(KeyError::Rejected { alg: "unsupported", reason: "no such signing algorithm".into() })
            }
        }
    }
}

/// Bounds the CRD states too (they also keep the API server's CEL cost estimate of the scope rule small).
pub const MAX_DECLARED_SCOPES: usize = 256;
pub const MAX_SCOPE_NAME_BYTES: usize = 128;

#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct ScopeSpec {
    /// RFC 6749 scope token; `device_` scopes are implicit and `default` is what an empty grant gets: neither may
    /// be declared.
    #[schemars(regex(pattern = r"^[\x21\x23-\x5B\x5D-\x7E]+$"), length(max = 128))]
    #[schemars(extend("x-kubernetes-validations" = [{
        "rule": "self != 'default' && !self.startsWith('device_')",
        "message": "'default' and device_ scopes are implicit and must not be declared"
    }]))]
    pub name: String,
    /// Roles that may have this scope; anyone may when empty.
    #[serde(default)]
    pub roles: Vec<String>,
}

/// An identity provider whose JWTs (ID tokens, access tokens, assertions) are accepted as users of this application.
#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema, PartialEq)]
#[serde(rename_all = "camelCase")]
#[schemars(extend("x-kubernetes-validations" = [{
    "rule": "has(self.jwksUri) != has(self.jwks)",
    "message": "set exactly one of jwksUri and jwks"
}]))]
pub struct TrustedIssuerSpec {
    /// Must equal the assertion's `iss`, byte for byte.
    #[schemars(length(min = 1, max = 1024))]
    pub issuer: String,
    /// Where the issuer publishes its key set: `https://` (plain `http://` only to a loopback address). Set this or
    /// `jwks`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 2048))]
    pub jwks_uri: Option<String>,
    /// An offline key set, in a ConfigMap of the application's namespace. Set this or `jwksUri`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub jwks: Option<JwksSource>,
    /// The assertion's `aud` must contain one of them.
    #[schemars(length(min = 1, max = 16))]
    pub audiences: Vec<String>,
    /// The claim naming the user (default `sub`; e.g. `preferred_username`, `email`).
    #[serde(default = "default_username_claim")]
    #[schemars(length(min = 1, max = 256))]
    pub username_claim: String,
    /// A dotted path to a string or a list of strings holding the user's roles (e.g. `realm_access.roles`). Unset:
    /// federated users have no roles, and get only scopes that need none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 256))]
    pub roles_claim: Option<String>,
    /// Signature algorithms accepted from this issuer (default RS256 and ES256). Public-key algorithms only.
    #[serde(default = "default_allowed_algorithms")]
    #[schemars(length(min = 1, max = 12))]
    pub allowed_algorithms: Vec<String>,
    /// The oldest `iat` accepted (default `1h`).
    #[serde(default = "default_max_assertion_age")]
    #[schemars(regex(pattern = DURATION_PATTERN))]
    pub max_assertion_age: String,
}

#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct JwksSource {
    pub config_map_ref: ConfigMapKeyRef,
}

#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct ConfigMapKeyRef {
    pub name: String,
    /// Key in the ConfigMap; `jwks.json` when unset.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key: Option<String>,
}

/// Key of a key-set ConfigMap that holds the JWK Set when `configMapRef.key` is not set.
pub const DEFAULT_JWKS_KEY: &str = "jwks.json";

impl ConfigMapKeyRef {
    pub fn key(&self) -> &str {
        self.key.as_deref().unwrap_or(DEFAULT_JWKS_KEY)
    }
}

fn default_username_claim() -> String {
    "sub".into()
}
fn default_allowed_algorithms() -> Vec<String> {
    vec!["RS256".into(), "ES256".into()]
}
fn default_max_assertion_age() -> String {
    "1h".into()
}

#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct UsersSpec {
    pub secret_ref: SecretKeyRef,
}

#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct SecretKeyRef {
    pub name: String,
    /// Key in the Secret; `users.yaml` when unset.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct CredentialsSpec {
    /// Defaults to `<name>-credentials`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secret_name: Option<String>,
    /// How long the previous client secret stays valid after a rotation (default 1h).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = DURATION_PATTERN))]
    pub rotation_grace_period: Option<String>,
}

/// What the controller made of an OAuthApplication.
#[derive(Debug, Clone, Default, Serialize, Deserialize, JsonSchema, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct OAuthApplicationStatus {
    /// The `metadata.generation` this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub credentials_secret: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub signing_keys_secret: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub jwks_config_map: Option<String>,
    /// `kid` of the key that signs new tokens.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub current_key_id: Option<String>,
    /// `Ready` and one condition per child: `CredentialsReady`, `SigningKeysReady`, `JwksReady`, `UsersReady`.
    #[serde(default)]
    pub conditions: Vec<Condition>,
}

/// One entry of the users Secret (`users.yaml`).
#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema, PartialEq)]
// Strict on purpose: the users file is ours, not a versioned API, and a typo (`rolse:`) would silently drop roles.
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

fn default_max_token_keys_per_user() -> u32 {
    100
}

/// A spec value that cannot work, with the path of the offending field.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{path}: {message}")]
pub struct FieldError {
    pub path: String,
    pub message: String,
}

impl OAuthApplicationSpec {
    /// The Secret with the client credentials of the application `app`: `spec.credentials.secretName`, else
    /// `<app>-credentials`.
    pub fn credentials_secret_name(&self, app: &str) -> String {
        self.credentials.as_ref().and_then(|c| c.secret_name.clone()).unwrap_or_else(|| format!("{app}-credentials"))
    }

    pub fn access_lifetime_secs(&self) -> Result<u64, FieldError> {
        parse_duration(&self.access_token_lifetime).map_err(|e| field("spec.accessTokenLifetime", e))
    }

    pub fn refresh_lifetime_secs(&self) -> Result<u64, FieldError> {
        parse_duration(&self.refresh_token_lifetime).map_err(|e| field("spec.refreshTokenLifetime", e))
    }

    pub fn session_max_secs(&self) -> Result<Option<u64>, FieldError> {
        self.session_max_lifetime
            .as_deref()
            .map(|d| parse_duration(d).map_err(|e| field("spec.sessionMaxLifetime", e)))
            .transpose()
    }

    /// Checks what the type system cannot: durations, scope names, duplicates.
    pub fn validate(&self) -> Result<(), FieldError> {
        self.access_lifetime_secs()?;
        if self.signing.algorithm == SigningAlgorithm::Unsupported {
            return Err(field("spec.signing.algorithm", "unsupported algorithm: use ES256, RS256 or EdDSA"));
        }
        self.refresh_lifetime_secs()?;
        self.session_max_secs()?;
        if !(1..=10_000).contains(&self.max_token_keys_per_user) {
            return Err(field("spec.maxTokenKeysPerUser", "must be between 1 and 10000"));
        }
        if let Some(period) = &self.signing.rotation_period {
            parse_duration(period).map_err(|e| field("spec.signing.rotationPeriod", e))?;
        }
        if let Some(grace) = self.credentials.as_ref().and_then(|c| c.rotation_grace_period.as_ref()) {
            parse_duration(grace).map_err(|e| field("spec.credentials.rotationGracePeriod", e))?;
        }
        if self.grant_types.is_empty() {
            return Err(field("spec.grantTypes", "must list at least one grant type"));
        }
        if let Some(sidecar) = &self.sidecar {
            let name = &sidecar.service_account_name;
            let ok = !name.is_empty()
                && name.len() <= 253
                && name.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.')
                && name.starts_with(|c: char| c.is_ascii_alphanumeric())
                && name.ends_with(|c: char| c.is_ascii_alphanumeric());
            if !ok {
                return Err(field(
                    "spec.sidecar.serviceAccountName",
                    "must be a ServiceAccount name: lowercase letters, digits, '-' and '.', at most 253",
                ));
            }
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
        if self.scopes.len() > MAX_DECLARED_SCOPES {
            return Err(field("spec.scopes", format!("at most {MAX_DECLARED_SCOPES} scopes may be declared")));
        }
        for (i, scope) in self.scopes.iter().enumerate() {
            let path = format!("spec.scopes[{i}].name");
            if scope.name.len() > MAX_SCOPE_NAME_BYTES {
                return Err(field(path, format!("longer than {MAX_SCOPE_NAME_BYTES} characters")));
            }
            if !is_scope_token(&scope.name) {
                return Err(field(
                    path,
                    format!("{:?} is not a valid scope name (RFC 6749 scope characters, no spaces)", scope.name),
                ));
            }
            if scope.name == crate::core::scope::DEFAULT_SCOPE {
                return Err(field(
                    path,
                    "\"default\" is the scope a grant gets when nothing else is granted and must not be declared",
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
        self.validate_trusted_issuers()?;
        Ok(())
    }

    /// The trusted issuers, checked and in the core's terms; the offline key sets come from `key_sets` (by
    /// ConfigMap name), which the caller read.
    fn validate_trusted_issuers(&self) -> Result<(), FieldError> {
        let federated = self.grant_types.iter().find(|g| matches!(g, GrantType::JwtBearer | GrantType::TokenExchange));
        if let Some(g) = federated
            && self.trusted_issuers.is_empty()
        {
            return Err(field(
                "spec.trustedIssuers",
                format!("the {} grant needs at least one trusted issuer", g.as_str()),
            ));
        }
        for (i, t) in self.trusted_issuers.iter().enumerate() {
            let path = |f: &str| format!("spec.trustedIssuers[{i}].{f}");
            if t.issuer.is_empty() || t.issuer.chars().any(|c| c.is_control() || c.is_whitespace()) {
                return Err(field(path("issuer"), "must be non-empty, without spaces or control characters"));
            }
            if self.trusted_issuers[..i].iter().any(|o| o.issuer == t.issuer) {
                return Err(field(path("issuer"), format!("{:?} is listed twice", t.issuer)));
            }
            match (&t.jwks_uri, &t.jwks) {
                (Some(uri), None) => {
                    crate::core::assertion::check_key_set_uri(uri).map_err(|e| field(path("jwksUri"), e))?
                }
                (None, Some(source)) => {
                    if source.config_map_ref.name.is_empty() {
                        return Err(field(path("jwks.configMapRef.name"), "must not be empty"));
                    }
                }
                _ => return Err(field(path("jwksUri"), "set exactly one of jwksUri and jwks")),
            }
            if t.audiences.is_empty() || t.audiences.iter().any(String::is_empty) {
                return Err(field(path("audiences"), "must list at least one audience, none empty"));
            }
            if t.username_claim.is_empty() {
                return Err(field(path("usernameClaim"), "must not be empty"));
            }
            if t.allowed_algorithms.is_empty() {
                return Err(field(path("allowedAlgorithms"), "must list at least one algorithm"));
            }
            for (j, alg) in t.allowed_algorithms.iter().enumerate() {
                crate::core::assertion::parse_algorithm(alg)
                    .map_err(|e| field(format!("spec.trustedIssuers[{i}].allowedAlgorithms[{j}]"), e))?;
            }
            parse_duration(&t.max_assertion_age).map_err(|e| field(path("maxAssertionAge"), e))?;
        }
        Ok(())
    }

    /// The trusted issuers in the core's terms. `key_sets` holds the offline key sets read from ConfigMaps, by
    /// (ConfigMap name, key). One missing or unreadable is an error naming the field when `required` (standalone:
    /// the manifests are wrong), else that issuer's grants answer 503 until it is there (a cluster: it may come).
    pub fn trusted_issuers(&self, key_sets: &KeySets, required: bool) -> Result<Vec<TrustedIssuer>, FieldError> {
        use crate::core::assertion::{KeySource, parse_algorithm};
        self.validate_trusted_issuers()?;
        self.trusted_issuers
            .iter()
            .enumerate()
            .map(|(i, t)| {
                let keys = match (&t.jwks_uri, &t.jwks) {
                    (Some(uri), _) => KeySource::Uri(uri.clone()),
                    (None, Some(source)) => {
                        let r = &source.config_map_ref;
                        let read = key_sets
                            .get(&(r.name.clone(), r.key().to_string()))
                            .cloned()
                            .unwrap_or_else(|| Err(format!("the ConfigMap {} is not there (yet)", r.name)));
                        match read {
                            Ok(set) => KeySource::Fixed(set),
                            Err(e) if required => {
                                return Err(field(format!("spec.trustedIssuers[{i}].jwks.configMapRef"), e));
                            }
                            Err(e) => KeySource::Unavailable(e),
                        }
                    }
                    (None, None) => return Err(field(format!("spec.trustedIssuers[{i}].jwksUri"), "missing")),
                };
                Ok(TrustedIssuer {
                    issuer: t.issuer.clone(),
                    keys,
                    audiences: t.audiences.clone(),
                    username_claim: t.username_claim.clone(),
                    roles_claim: t.roles_claim.clone(),
                    allowed_algorithms: t
                        .allowed_algorithms
                        .iter()
                        .map(|a| parse_algorithm(a))
                        .collect::<Result<_, _>>()
                        .map_err(|e| field(format!("spec.trustedIssuers[{i}].allowedAlgorithms"), e))?,
                    max_assertion_age: parse_duration(&t.max_assertion_age)
                        .map_err(|e| field(format!("spec.trustedIssuers[{i}].maxAssertionAge"), e))?,
                })
            })
            .collect()
    }

    /// The ConfigMaps holding offline key sets: (name, key).
    pub fn key_set_config_maps(&self) -> impl Iterator<Item = &ConfigMapKeyRef> {
        self.trusted_issuers.iter().filter_map(|t| t.jwks.as_ref().map(|j| &j.config_map_ref))
    }
}

/// Offline key sets as read from their ConfigMaps, by (ConfigMap name, key): the set, or why it could not be read.
pub type KeySets =
    std::collections::HashMap<(String, String), Result<std::sync::Arc<jsonwebtoken::jwk::JwkSet>, String>>;

use crate::core::assertion::TrustedIssuer;

/// Reads a JWK Set document (an offline key set's ConfigMap value).
pub fn parse_key_set(json: &str) -> Result<std::sync::Arc<jsonwebtoken::jwk::JwkSet>, String> {
    crate::core::assertion::parse_key_set(json.as_bytes()).map(std::sync::Arc::new)
}

/// What an application needs besides its spec: the parts that live in Secrets.
pub struct ApplicationParts {
    /// `namespace/name`, for logs.
    pub name: String,
    pub client_id: String,
    /// Accepted client secrets: the current one first, then one in its rotation grace period.
    pub client_secrets: Vec<String>,
    pub users: std::collections::HashMap<String, crate::core::app::User>,
    pub signer: std::sync::Arc<crate::core::signing::SigningKey>,
    pub verification_keys: Vec<std::sync::Arc<crate::core::signing::SigningKey>>,
    pub token_secrets: Vec<Vec<u8>>,
    /// The offline key sets of `spec.trustedIssuers[].jwks.configMapRef`, by (ConfigMap name, key): read, or why not.
    pub key_sets: KeySets,
    /// Whether an offline key set that could not be read stops the application (standalone) or only its issuer
    /// (a cluster, where the ConfigMap may come later).
    pub key_sets_required: bool,
}

impl OAuthApplicationSpec {
    /// The core's application for this spec (validated) and its parts. Standalone mode and the sidecar both
    /// build applications here, so they behave the same.
    pub fn application(&self, parts: ApplicationParts) -> Result<crate::core::app::Application, FieldError> {
        self.validate()?;
        Ok(crate::core::app::Application::new(crate::core::app::ApplicationConfig {
            name: parts.name,
            client_id: parts.client_id,
            client_secrets: parts.client_secrets,
            grant_types: self.grant_types.iter().map(|g| (*g).into()).collect(),
            format: self.token_format.into(),
            access_ttl: self.access_lifetime_secs()?,
            refresh_ttl: self.refresh_lifetime_secs()?,
            session_max: self.session_max_secs()?,
            max_keys_per_user: self.max_token_keys_per_user as usize,
            audience: self.audience.clone(),
            client_roles: self.client_roles.clone(),
            scopes: crate::core::scope::ScopePolicy::new(self.scopes.iter().map(|s| (s.name.clone(), s.roles.clone()))),
            users: parts.users,
            signer: parts.signer,
            verification_keys: parts.verification_keys,
            token_secrets: parts.token_secrets,
            trusted_issuers: self.trusted_issuers(&parts.key_sets, parts.key_sets_required)?,
        }))
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
    fn scope_declarations_that_cannot_mean_anything_are_refused_naming_the_field() {
        for (name, why) in [("default", "default"), ("device_ipad", "device_")] {
            let s = spec(&format!("grantTypes: [client_credentials]\nscopes: [{{name: ok}}, {{name: {name}}}]"));
            let e = s.validate().expect_err(name);
            assert_eq!(e.path, "spec.scopes[1].name", "{name}");
            assert!(e.message.contains(why), "{name}: {}", e.message);
        }
    }

    /// The API server refuses them too: the CRD carries a CEL rule on the scope name.
    #[test]
    fn the_crd_refuses_default_and_device_scope_declarations() {
        use kube::CustomResourceExt;
        let crd = serde_json::to_value(OAuthApplication::crd()).expect("crd");
        let name = &crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]["properties"]["scopes"]
            ["items"]["properties"]["name"];
        let rules = name["x-kubernetes-validations"].as_array().expect("validation rules on scopes[].name");
        let rule = rules.iter().filter_map(|r| r["rule"].as_str()).collect::<Vec<_>>().join(" && ");
        assert!(rule.contains("self != 'default'") && rule.contains("!self.startsWith('device_')"), "{rule}");
    }

    /// A newer CRD version may add fields: an older controller still reads the object (and ignores them).
    #[test]
    fn objects_with_fields_from_a_newer_crd_are_read() {
        let app: OAuthApplication = serde_json::from_value(serde_json::json!({
            "apiVersion": "kubetoken.io/v1alpha1", "kind": "OAuthApplication",
            "metadata": {"name": "shop", "namespace": "default"},
            "spec": {
                "grantTypes": ["client_credentials"], "futureField": true,
                "signing": {"algorithm": "ES256", "futureKeyOption": 1},
                "scopes": [{"name": "a", "futureScopeOption": "x"}],
                "credentials": {"secretName": "c", "future": {}},
            },
        }))
        .expect("read despite unknown fields");
        assert_eq!(app.spec.scopes[0].name, "a");
    }

    /// Two issuers may keep their key sets under two keys of one ConfigMap: each gets its own.
    #[test]
    fn offline_key_sets_are_told_apart_by_config_map_and_key() {
        use crate::core::assertion::KeySource;
        let s = spec(
            "grantTypes: [urn:ietf:params:oauth:grant-type:jwt-bearer]
trustedIssuers:
  - {issuer: https://corp.example, jwks: {configMapRef: {name: idp-keys, key: corp.json}}, audiences: [shop]}
  - {issuer: https://partner.example, jwks: {configMapRef: {name: idp-keys, key: partner.json}}, audiences: [shop]}
",
        );
        let set = |kid: &str| {
            std::sync::Arc::new(jsonwebtoken::jwk::JwkSet {
                keys: vec![serde_json::from_value(serde_json::json!({"kty": "EC", "crv": "P-256", "kid": kid,
                    "x": "f83OJ3D2xF1Bg8vub9tLe1gHMzV76e8Tus9uPHvRVEU", "y": "x_FEzRu9m36HLN_tue659LNpXW6pCyStikYjKIWI5a0"}))
                .expect("jwk")],
            })
        };
        let mut sets = KeySets::new();
        sets.insert(("idp-keys".into(), "corp.json".into()), Ok(set("corp")));
        sets.insert(("idp-keys".into(), "partner.json".into()), Ok(set("partner")));
        let issuers = s.trusted_issuers(&sets, true).expect("issuers");
        let kid = |i: usize| match &issuers[i].keys {
            KeySource::Fixed(set) => set.keys[0].common.key_id.clone(),
            other => panic!("{other:?}"),
        };
        assert_eq!((kid(0), kid(1)), (Some("corp".into()), Some("partner".into())));
        // One unreadable: an error naming the field where required (standalone), that issuer unavailable otherwise.
        sets.insert(("idp-keys".into(), "partner.json".into()), Err("not a JWK set".into()));
        let e = s.trusted_issuers(&sets, true).expect_err("required");
        assert_eq!(e.path, "spec.trustedIssuers[1].jwks.configMapRef");
        let lenient = s.trusted_issuers(&sets, false).expect("lenient");
        assert!(matches!(&lenient[1].keys, KeySource::Unavailable(why) if why.contains("not a JWK set")));
        assert!(matches!(&lenient[0].keys, KeySource::Fixed(_)));
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
    fn unknown_enum_values_are_rejected() {
        assert!(serde_yaml::from_str::<OAuthApplicationSpec>("tokenFormat: jwt").is_err());
        let hs256: OAuthApplicationSpec =
            serde_yaml::from_str("grantTypes: [client_credentials]\nsigning: {algorithm: HS256}").expect("readable");
        assert_eq!(hs256.validate().expect_err("unsupported").path, "spec.signing.algorithm");
        // Unknown fields are read (a newer CRD may add some); standalone manifests reject them, naming the field
        // (standalone::manifests::tests::an_unknown_field_in_a_manifest_is_an_error_naming_it).
        assert!(serde_yaml::from_str::<OAuthApplicationSpec>("grantType: [password]").is_ok());
    }
}

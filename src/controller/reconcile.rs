//! One reconciliation of an OAuthApplication: credentials Secret, signing-keys Secret, JWKS ConfigMap, status.
//!
//! Children carry an ownerReference to the application, so deleting it deletes them. A child that exists but is
//! not owned by the application is never overwritten: the credentials Secret is then used as given
//! (bring-your-own credentials), any other child is reported as a name conflict.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::{ConfigMap, Secret};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, OwnerReference, Time};
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, Patch, PatchParams, PostParams};
use kube::runtime::controller::Action;
use kube::runtime::events::{Event, EventType, Recorder};
use kube::{Resource, ResourceExt};
use serde_json::json;

use super::keys::{self, KEYS_FIELD, KeyPolicy, StoredKey};
use super::metrics::ControllerMetrics;
use super::status::{self, Finding};
use crate::api::duration::parse_duration;
use crate::api::v1alpha1::{
    DEFAULT_USERS_KEY, OAuthApplication, OAuthApplicationStatus, ROTATE_CLIENT_SECRET_ANNOTATION,
};
use crate::core::clock::{Clock, UnixTime};
use crate::federation::key_sets::{KeySets, REFETCH_INTERVAL};

pub const MANAGER: &str = "kubetoken-controller";
pub const MANAGED_BY_LABEL: &str = "app.kubernetes.io/managed-by";
pub const APPLICATION_LABEL: &str = "kubetoken.io/application";
/// On an owned credentials Secret: the rotation request it last carried out.
pub const ROTATED_FOR_ANNOTATION: &str = "kubetoken.io/rotated-for";
pub const PREVIOUS_SECRET_KEY: &str = "previous_client_secret";
pub const PREVIOUS_SECRET_EXPIRES_KEY: &str = "previous_client_secret_expires_at";
/// Label of the token-state ConfigMaps: the application they belong to.
pub const TOKEN_STATE_LABEL: &str = "kubetoken.io/token-state-of";
/// Key of the token-tagging Secret.
pub const TOKEN_SECRETS_FIELD: &str = "secrets";

/// The token-tagging Secret of an application.
pub fn token_secrets_name(app: &str) -> String {
    format!("{app}-token-secrets")
}

const DEFAULT_ROTATION_PERIOD: u64 = 30 * 86_400;
const DEFAULT_GRACE_PERIOD: u64 = 3600;
/// Unowned inputs (a bring-your-own credentials Secret, the users Secret) are not watched: look again this often.
const RECHECK: u64 = 300;
const RECHECK_MISSING_INPUT: u64 = 5;
/// An issuer whose key set could not be fetched: looked at again just after the key-set cache lets it be fetched
/// again (a second sooner would only read the cached error).
const RECHECK_KEY_SET: u64 = REFETCH_INTERVAL.as_secs() + 1;

#[derive(Debug, thiserror::Error)]
pub enum ReconcileError {
    #[error("Kubernetes API: {0}")]
    Kube(#[from] kube::Error),
    #[error("{0}")]
    Internal(String),
}

/// Signing-key timing the controller applies to every application.
#[derive(Debug, Clone, Copy)]
pub struct KeyTiming {
    /// How long a new key is published before it signs.
    pub prepublication: u64,
    /// How long a retired key stays published after its last token expired.
    pub retirement_margin: u64,
}

pub struct Context {
    pub client: kube::Client,
    pub clock: Arc<dyn Clock>,
    pub key_timing: KeyTiming,
    pub recorder: Recorder,
    pub metrics: Arc<ControllerMetrics>,
    /// Consecutive failures per application, for exponential backoff.
    pub failures: Backoff,
    /// See [`super::ControllerOptions::manage_sidecar_rbac`].
    pub manage_sidecar_rbac: bool,
    /// The trusted issuers' key sets (`jwksUri`), shared by every application: its cache bounds how often an issuer
    /// is asked, however often applications are reconciled.
    pub key_sets: Arc<KeySets>,
}

fn now_time(now: UnixTime) -> Time {
    Time(Timestamp::from_second(now as i64).unwrap_or(Timestamp::UNIX_EPOCH))
}

fn random_token(bytes: usize) -> Result<String, ReconcileError> {
    let mut b = vec![0u8; bytes];
    aws_lc_rs::rand::SecureRandom::fill(&aws_lc_rs::rand::SystemRandom::new(), &mut b)
        .map_err(|_| ReconcileError::Internal("the OS random number generator failed".into()))?;
    Ok(URL_SAFE_NO_PAD.encode(b))
}

fn owned_by(meta: &ObjectMeta, uid: &str) -> bool {
    meta.owner_references.iter().flatten().any(|o| o.uid == uid)
}

fn child_meta(app: &OAuthApplication, name: &str, owner: &OwnerReference) -> ObjectMeta {
    ObjectMeta {
        name: Some(name.to_string()),
        namespace: app.namespace(),
        labels: Some(BTreeMap::from([
            (MANAGED_BY_LABEL.to_string(), "kubetoken".to_string()),
            (APPLICATION_LABEL.to_string(), app.name_any()),
        ])),
        owner_references: Some(vec![owner.clone()]),
        ..ObjectMeta::default()
    }
}

fn text(data: &Option<BTreeMap<String, ByteString>>, key: &str) -> Option<String> {
    data.as_ref()?.get(key).and_then(|v| String::from_utf8(v.0.clone()).ok()).filter(|s| !s.is_empty())
}

fn bytes(s: &str) -> ByteString {
    ByteString(s.as_bytes().to_vec())
}

/// What the reconciler did, for events.
struct Actions<'a> {
    recorder: &'a Recorder,
    reference: k8s_openapi::api::core::v1::ObjectReference,
}

impl Actions<'_> {
    async fn publish(&self, type_: EventType, reason: &str, action: &str, note: String) {
        let event = Event { type_, reason: reason.into(), note: Some(note), action: action.into(), secondary: None };
        if let Err(e) = self.recorder.publish(&event, &self.reference).await {
            tracing::warn!(error = %e, reason, "could not publish an event");
        }
    }
}

struct Outcome {
    finding: Finding,
    /// Seconds until this child needs another look, if it does.
    recheck_in: Option<u64>,
}

/// A child's name is taken by an object the application does not own: reported, never overwritten.
fn name_conflict(type_: &'static str, kind: &str, name: &str) -> Outcome {
    Outcome {
        finding: Finding::failed(
            type_,
            "NameConflict",
            format!(
                "{kind} {name} exists and is not owned by this application; kubetoken will not overwrite it: rename or delete it"
            ),
        ),
        recheck_in: Some(RECHECK_MISSING_INPUT),
    }
}

async fn reconcile_credentials(
    app: &OAuthApplication,
    secrets: &Api<Secret>,
    owner: &OwnerReference,
    now: UnixTime,
    events: &Actions<'_>,
    status: &mut OAuthApplicationStatus,
) -> Result<Outcome, ReconcileError> {
    const TYPE: &str = "CredentialsReady";
    let spec = app.spec.credentials.as_ref();
    let name = app.spec.credentials_secret_name(&app.name_any());
    let grace = spec
        .and_then(|c| c.rotation_grace_period.as_deref())
        .and_then(|g| parse_duration(g).ok())
        .unwrap_or(DEFAULT_GRACE_PERIOD);
    let rotation_request = app.annotations().get(ROTATE_CLIENT_SECRET_ANNOTATION).cloned();
    status.credentials_secret = Some(name.clone());
    let uid = owner.uid.as_str();

    let Some(mut secret) = secrets.get_opt(&name).await? else {
        let client_id = format!("{}-{}", app.name_any(), random_token(6)?);
        let mut meta = child_meta(app, &name, owner);
        if let Some(request) = &rotation_request {
            // A rotation asked for before the Secret existed is satisfied by the fresh secret.
            meta.annotations = Some(BTreeMap::from([(ROTATED_FOR_ANNOTATION.to_string(), request.clone())]));
        }
        let secret = Secret {
            metadata: meta,
            data: Some(BTreeMap::from([
                ("client_id".to_string(), bytes(&client_id)),
                ("client_secret".to_string(), bytes(&random_token(32)?)),
            ])),
            type_: Some("Opaque".into()),
            ..Secret::default()
        };
        secrets.create(&PostParams { field_manager: Some(MANAGER.into()), ..PostParams::default() }, &secret).await?;
        events
            .publish(
                EventType::Normal,
                "CredentialsCreated",
                "CreateCredentials",
                format!("created Secret {name} with client ID {client_id}"),
            )
            .await;
        status.client_id = Some(client_id);
        return Ok(Outcome {
            finding: Finding::ok(TYPE, "Created", format!("Secret {name} holds the client credentials")),
            recheck_in: None,
        });
    };

    if !owned_by(&secret.metadata, uid) {
        // Bring-your-own credentials: used as given, never modified.
        if rotation_request.is_some() && secret.annotations().get(ROTATED_FOR_ANNOTATION) != rotation_request.as_ref() {
            tracing::info!(secret = %name, "client secret rotation requested for a Secret kubetoken does not own; not rotating");
        }
        return Ok(match (text(&secret.data, "client_id"), text(&secret.data, "client_secret")) {
            (Some(id), Some(_)) => {
                status.client_id = Some(id);
                Outcome {
                    finding: Finding::ok(
                        TYPE,
                        "ProvidedSecret",
                        format!("using the client credentials in Secret {name}, which kubetoken does not manage"),
                    ),
                    recheck_in: Some(RECHECK),
                }
            }
            _ => {
                events
                    .publish(
                        EventType::Warning,
                        "CredentialsMissingKeys",
                        "ReadCredentials",
                        format!("Secret {name} has no client_id or client_secret"),
                    )
                    .await;
                status.client_id = None;
                Outcome {
                    finding: Finding::failed(
                        TYPE,
                        "MissingKeys",
                        format!(
                            "Secret {name} exists but lacks client_id and/or client_secret; it is not owned by this application, so kubetoken will not change it: add the keys, or delete the Secret to have credentials generated"
                        ),
                    ),
                    recheck_in: Some(RECHECK_MISSING_INPUT),
                }
            }
        });
    }

    // Owned: kubetoken manages it.
    let mut changed = false;
    let mut recheck_in = None;
    let data = secret.data.get_or_insert_with(BTreeMap::new);
    let client_id =
        match data.get("client_id").and_then(|v| String::from_utf8(v.0.clone()).ok()).filter(|s| !s.is_empty()) {
            Some(id) => id,
            None => {
                let id = format!("{}-{}", app.name_any(), random_token(6)?);
                data.insert("client_id".into(), bytes(&id));
                changed = true;
                id
            }
        };
    if data.get("client_secret").is_none_or(|v| v.0.is_empty()) {
        data.insert("client_secret".into(), bytes(&random_token(32)?));
        changed = true;
    }
    // An expired previous secret goes first, so that a rotation waiting for it can happen in this pass.
    let data = secret.data.get_or_insert_with(BTreeMap::new);
    let previous_expires =
        data.get(PREVIOUS_SECRET_EXPIRES_KEY).and_then(|v| std::str::from_utf8(&v.0).ok()?.parse::<u64>().ok());
    if previous_expires.is_some_and(|e| e <= now) {
        data.remove(PREVIOUS_SECRET_KEY);
        data.remove(PREVIOUS_SECRET_EXPIRES_KEY);
        changed = true;
    }
    let in_grace = previous_expires.filter(|e| *e > now);
    let mut rotated = false;
    let mut deferred = None;
    if let Some(request) = &rotation_request
        && secret.metadata.annotations.as_ref().and_then(|a| a.get(ROTATED_FOR_ANNOTATION)) != Some(request)
        && let Some(expires) = in_grace
    {
        // A second rotation inside the grace period would drop the previous secret, which clients may still
        // use: it waits until that grace period ends.
        deferred = Some(expires);
    } else if let Some(request) = &rotation_request
        && secret.metadata.annotations.as_ref().and_then(|a| a.get(ROTATED_FOR_ANNOTATION)) != Some(request)
    {
        let data = secret.data.get_or_insert_with(BTreeMap::new);
        if let Some(old) = data.insert("client_secret".into(), bytes(&random_token(32)?)) {
            data.insert(PREVIOUS_SECRET_KEY.into(), old);
            data.insert(PREVIOUS_SECRET_EXPIRES_KEY.into(), bytes(&(now + grace).to_string()));
        }
        secret
            .metadata
            .annotations
            .get_or_insert_with(BTreeMap::new)
            .insert(ROTATED_FOR_ANNOTATION.into(), request.clone());
        changed = true;
        rotated = true;
    }
    let data = secret.data.get_or_insert_with(BTreeMap::new);
    if let Some(expires) =
        data.get(PREVIOUS_SECRET_EXPIRES_KEY).and_then(|v| std::str::from_utf8(&v.0).ok()?.parse::<u64>().ok())
    {
        recheck_in = Some(expires.saturating_sub(now).max(1));
    }
    if changed {
        secret.metadata.managed_fields = None;
        // resourceVersion is kept: a concurrent change makes this a 409 and the reconcile is retried.
        secrets
            .replace(&name, &PostParams { field_manager: Some(MANAGER.into()), ..PostParams::default() }, &secret)
            .await?;
    }
    if rotated {
        events
            .publish(
                EventType::Normal,
                "ClientSecretRotated",
                "RotateClientSecret",
                format!("rotated the client secret in Secret {name}; the previous one stays valid for {grace}s"),
            )
            .await;
    }
    status.client_id = Some(client_id);
    if let Some(expires) = deferred {
        let message = format!(
            "a client secret rotation is requested while the previous secret is still in its grace period; it happens in {}s, when that period ends",
            expires.saturating_sub(now)
        );
        events.publish(EventType::Normal, "ClientSecretRotationDeferred", "RotateClientSecret", message.clone()).await;
        return Ok(Outcome { finding: Finding::ok(TYPE, "RotationDeferred", message), recheck_in });
    }
    Ok(Outcome {
        finding: Finding::ok(TYPE, "Managed", format!("Secret {name} holds the client credentials")),
        recheck_in,
    })
}

/// The signing keys (and the JWKS derived from them). Returns the JWKS to publish, if the keys are usable.
async fn reconcile_signing_keys(
    app: &OAuthApplication,
    secrets: &Api<Secret>,
    owner: &OwnerReference,
    now: UnixTime,
    key_timing: &KeyTiming,
    events: &Actions<'_>,
    status: &mut OAuthApplicationStatus,
) -> Result<(Outcome, Option<serde_json::Value>), ReconcileError> {
    const TYPE: &str = "SigningKeysReady";
    let name = format!("{}-signing-keys", app.name_any());
    status.signing_keys_secret = Some(name.clone());
    let existing = secrets.get_opt(&name).await?;
    if let Some(s) = &existing
        && !owned_by(&s.metadata, &owner.uid)
    {
        return Ok((name_conflict(TYPE, "Secret", &name), None));
    }
    let unreadable = |reason: String| {
        Ok((
            Outcome {
                finding: Finding::failed(TYPE, "UnreadableKeys", reason),
                recheck_in: Some(RECHECK_MISSING_INPUT),
            },
            None,
        ))
    };
    let stored: Vec<StoredKey> = match &existing {
        None => Vec::new(),
        Some(secret) => {
            // Replacing an unreadable set would make every issued token unverifiable: report it, touch nothing.
            let parsed = text(&secret.data, KEYS_FIELD)
                .ok_or_else(|| format!("Secret {name} has no {KEYS_FIELD}"))
                .and_then(|json| {
                    serde_json::from_str::<Vec<StoredKey>>(&json)
                        .map_err(|e| format!("Secret {name}: {KEYS_FIELD}: {e}"))
                })
                .and_then(|keys| keys.iter().try_for_each(|k| k.signing_key().map(drop)).map(|()| keys));
            match parsed {
                Ok(keys) => keys,
                Err(reason) => {
                    let message = format!(
                        "{reason}; kubetoken leaves the Secret alone: restore it, or delete it to start a new key set (tokens signed by the old keys then fail verification)"
                    );
                    events
                        .publish(EventType::Warning, "UnreadableSigningKeys", "ReadSigningKeys", message.clone())
                        .await;
                    return unreadable(message);
                }
            }
        }
    };
    let policy = KeyPolicy {
        algorithm: app.spec.signing.algorithm,
        rotation_period: app
            .spec
            .signing
            .rotation_period
            .as_deref()
            .and_then(|p| parse_duration(p).ok())
            .unwrap_or(DEFAULT_ROTATION_PERIOD),
        access_token_lifetime: app.spec.access_lifetime_secs().map_err(|e| ReconcileError::Internal(e.to_string()))?,
        prepublication: key_timing.prepublication,
        retirement_margin: key_timing.retirement_margin,
    };
    let plan = keys::plan_keys(&stored, &policy, now, StoredKey::generate)
        .map_err(|e| ReconcileError::Internal(e.to_string()))?;
    let jwks = keys::jwks(&plan.keys).map_err(ReconcileError::Internal)?;
    if plan.changed {
        let encoded = serde_json::to_string(&plan.keys).map_err(|e| ReconcileError::Internal(e.to_string()))?;
        let params = PostParams { field_manager: Some(MANAGER.into()), ..PostParams::default() };
        match existing {
            None => {
                let secret = Secret {
                    metadata: child_meta(app, &name, owner),
                    data: Some(BTreeMap::from([(KEYS_FIELD.to_string(), bytes(&encoded))])),
                    type_: Some("Opaque".into()),
                    ..Secret::default()
                };
                secrets.create(&params, &secret).await?;
            }
            Some(mut secret) => {
                secret.data.get_or_insert_with(BTreeMap::new).insert(KEYS_FIELD.into(), bytes(&encoded));
                secret.metadata.managed_fields = None;
                secrets.replace(&name, &params, &secret).await?;
            }
        }
        if let Some(kid) = &plan.generated {
            events
                .publish(
                    EventType::Normal,
                    "SigningKeyRotated",
                    "RotateSigningKey",
                    format!("new {} signing key {kid}", policy.algorithm.as_str()),
                )
                .await;
        }
        for kid in &plan.dropped {
            events
                .publish(
                    EventType::Normal,
                    "SigningKeyRetired",
                    "RetireSigningKey",
                    format!("removed signing key {kid}: every token it signed has expired"),
                )
                .await;
        }
    }
    let current = keys::current_key(&plan.keys);
    status.current_key_id = current.map(|k| k.kid.clone());
    let finding = Finding::ok(
        TYPE,
        "KeysReady",
        format!(
            "{} key(s) in Secret {name}; {} signs new tokens",
            plan.keys.len(),
            current.map_or("none", |k| k.kid.as_str())
        ),
    );
    Ok((Outcome { finding, recheck_in: Some(plan.next_change_at.saturating_sub(now).max(1)) }, Some(jwks)))
}

async fn reconcile_jwks(
    app: &OAuthApplication,
    config_maps: &Api<ConfigMap>,
    owner: &OwnerReference,
    jwks: Option<serde_json::Value>,
    status: &mut OAuthApplicationStatus,
) -> Result<Outcome, ReconcileError> {
    const TYPE: &str = "JwksReady";
    let name = format!("{}-jwks", app.name_any());
    status.jwks_config_map = Some(name.clone());
    let Some(jwks) = jwks else {
        return Ok(Outcome {
            finding: Finding::failed(TYPE, "NoSigningKeys", "waiting for usable signing keys"),
            recheck_in: None,
        });
    };
    let body = serde_json::to_string_pretty(&jwks).map_err(|e| ReconcileError::Internal(e.to_string()))?;
    let params = PostParams { field_manager: Some(MANAGER.into()), ..PostParams::default() };
    match config_maps.get_opt(&name).await? {
        Some(cm) if !owned_by(&cm.metadata, &owner.uid) => {
            return Ok(name_conflict(TYPE, "ConfigMap", &name));
        }
        Some(mut cm) => {
            if cm.data.as_ref().and_then(|d| d.get("jwks.json")) != Some(&body) {
                cm.data.get_or_insert_with(BTreeMap::new).insert("jwks.json".into(), body);
                cm.metadata.managed_fields = None;
                config_maps.replace(&name, &params, &cm).await?;
            }
        }
        None => {
            let cm = ConfigMap {
                metadata: child_meta(app, &name, owner),
                data: Some(BTreeMap::from([("jwks.json".to_string(), body)])),
                ..ConfigMap::default()
            };
            config_maps.create(&params, &cm).await?;
        }
    }
    Ok(Outcome {
        finding: Finding::ok(TYPE, "Published", format!("ConfigMap {name} publishes the public keys")),
        recheck_in: None,
    })
}

/// The token-tagging Secret: the HMAC secrets of opaque and refresh token strings, shared by every sidecar of the
/// application. One line per secret (base64url of 32 random bytes), newest first, so that a later rotation can
/// put a new secret in front while the old ones still verify.
async fn reconcile_token_secrets(
    app: &OAuthApplication,
    secrets: &Api<Secret>,
    owner: &OwnerReference,
) -> Result<Outcome, ReconcileError> {
    const TYPE: &str = "TokenSecretsReady";
    let name = token_secrets_name(&app.name_any());
    match secrets.get_opt(&name).await? {
        Some(s) if !owned_by(&s.metadata, &owner.uid) => Ok(name_conflict(TYPE, "Secret", &name)),
        Some(s) if text(&s.data, TOKEN_SECRETS_FIELD).is_some() => Ok(Outcome {
            finding: Finding::ok(TYPE, "Managed", format!("Secret {name} holds the token-tagging secrets")),
            recheck_in: None,
        }),
        Some(_) => Ok(Outcome {
            // Never replaced: a new secret would invalidate every opaque and refresh token.
            finding: Finding::failed(
                TYPE,
                "UnreadableSecrets",
                format!(
                    "Secret {name} has no {TOKEN_SECRETS_FIELD}; restore it or delete it (which logs every client out)"
                ),
            ),
            recheck_in: Some(RECHECK_MISSING_INPUT),
        }),
        None => {
            let secret = Secret {
                metadata: child_meta(app, &name, owner),
                data: Some(BTreeMap::from([(TOKEN_SECRETS_FIELD.to_string(), bytes(&random_token(32)?))])),
                type_: Some("Opaque".into()),
                ..Secret::default()
            };
            secrets
                .create(&PostParams { field_manager: Some(MANAGER.into()), ..PostParams::default() }, &secret)
                .await?;
            Ok(Outcome {
                finding: Finding::ok(TYPE, "Created", format!("Secret {name} holds the token-tagging secrets")),
                recheck_in: None,
            })
        }
    }
}

/// The ConfigMaps that hold the sidecars' token state: created empty, then written only by the sidecars (so they
/// carry no managed-by label: their frequent changes must not wake the controller).
async fn reconcile_token_state(
    app: &OAuthApplication,
    config_maps: &Api<ConfigMap>,
    owner: &OwnerReference,
) -> Result<Outcome, ReconcileError> {
    const TYPE: &str = status::TOKEN_STATE_READY;
    let app_name = app.name_any();
    let existing =
        config_maps.list(&kube::api::ListParams::default().labels(&format!("{TOKEN_STATE_LABEL}={app_name}"))).await?;
    let mut created = 0;
    for name in crate::storage::kube_store::layout::object_names(&app_name) {
        if let Some(cm) = existing.items.iter().find(|c| c.metadata.name.as_deref() == Some(name.as_str())) {
            if !owned_by(&cm.metadata, &owner.uid) {
                return Ok(name_conflict(TYPE, "ConfigMap", &name));
            }
            continue;
        }
        let mut meta = child_meta(app, &name, owner);
        meta.labels = Some(BTreeMap::from([(TOKEN_STATE_LABEL.to_string(), app_name.clone())]));
        let cm = ConfigMap {
            metadata: meta,
            data: Some(crate::storage::kube_store::layout::empty_object(&app_name, &name)),
            ..ConfigMap::default()
        };
        match config_maps
            .create(&PostParams { field_manager: Some(MANAGER.into()), ..PostParams::default() }, &cm)
            .await
        {
            Ok(_) => created += 1,
            Err(kube::Error::Api(e)) if e.code == 409 => {
                return Ok(Outcome {
                    finding: Finding::failed(
                        TYPE,
                        "NameConflict",
                        format!("ConfigMap {name} exists without the {TOKEN_STATE_LABEL} label"),
                    ),
                    recheck_in: Some(RECHECK_MISSING_INPUT),
                });
            }
            Err(e) => return Err(e.into()),
        }
    }
    let count = crate::storage::kube_store::layout::object_names(&app_name).count();
    // The sidecars write the live keys and the capacity into the snapshot pointer with each snapshot. These objects
    // do not wake the controller (see above), so a state near its capacity is looked at again sooner.
    let pointer = crate::storage::kube_store::layout::pointer_name(&app_name);
    let usage = existing.items.iter().find(|c| c.metadata.name.as_deref() == Some(pointer.as_str())).and_then(|cm| {
        let field = |f: &str| cm.data.as_ref()?.get(f)?.trim().parse::<u64>().ok();
        Some(status::TokenStateUsage {
            keys: field(crate::storage::kube_store::layout::KEYS_FIELD)?,
            capacity: field(crate::storage::kube_store::layout::CAPACITY_FIELD)?,
        })
    });
    let finding = status::token_state(if created > 0 { "Created" } else { "Present" }, count, usage);
    let recheck_in = (finding.reason == status::NEAR_CAPACITY || finding.reason == status::FULL).then_some(60);
    Ok(Outcome { finding, recheck_in })
}

/// With `spec.sidecar.serviceAccountName`: a Role granting that ServiceAccount exactly what the sidecar needs for
/// this application, and its RoleBinding, both owned by the application (gone with it). Replaced when they drift
/// (a spec change renaming a Secret, a hand edit); never written when another owner has the name.
async fn reconcile_sidecar_access(
    app: &OAuthApplication,
    ctx: &Context,
    ns: &str,
    owner: &OwnerReference,
) -> Result<Option<Outcome>, ReconcileError> {
    const TYPE: &str = "SidecarAccessReady";
    let Some(sidecar) = &app.spec.sidecar else { return Ok(None) };
    if !ctx.manage_sidecar_rbac {
        return Ok(Some(Outcome {
            finding: Finding {
                gates_ready: false,
                ..Finding::failed(
                    TYPE,
                    "NotManaged",
                    "this installation does not let the controller grant the sidecar's access: grant it through the \
                     chart's sidecar.namespaces values",
                )
            },
            recheck_in: None,
        }));
    }
    use k8s_openapi::api::rbac::v1::{Role, RoleBinding, RoleRef, Subject};
    let app_name = app.name_any();
    let name = super::sidecar_access::role_name(&app_name);
    let credentials = app.spec.credentials_secret_name(&app_name);
    let users = app.spec.users.as_ref().map(|u| u.secret_ref.name.as_str());
    let key_sets: Vec<String> = app.spec.key_set_config_maps().map(|r| r.name.clone()).collect();
    let rules = super::sidecar_access::rules(&app_name, &credentials, users, &key_sets);
    let role_ref = RoleRef { api_group: "rbac.authorization.k8s.io".into(), kind: "Role".into(), name: name.clone() };
    let subjects = vec![Subject {
        kind: "ServiceAccount".into(),
        name: sidecar.service_account_name.clone(),
        namespace: Some(ns.to_string()),
        ..Subject::default()
    }];
    let params = PostParams { field_manager: Some(MANAGER.into()), ..PostParams::default() };
    let roles: Api<Role> = Api::namespaced(ctx.client.clone(), ns);
    // A sidecar lacking access is reported, but does not make the application un-Ready: its RBAC may come from
    // elsewhere (the chart's values).
    let conflict = |kind: &str| {
        let mut outcome = name_conflict(TYPE, kind, &name);
        outcome.finding.gates_ready = false;
        Some(outcome)
    };
    match roles.get_opt(&name).await? {
        Some(existing) if !owned_by(&existing.metadata, &owner.uid) => return Ok(conflict("Role")),
        Some(existing) if existing.rules.as_ref() == Some(&rules) => {}
        Some(existing) => {
            let role = Role { metadata: existing.metadata, rules: Some(rules) };
            roles.replace(&name, &params, &role).await?;
        }
        None => {
            let role = Role { metadata: child_meta(app, &name, owner), rules: Some(rules) };
            roles.create(&params, &role).await?;
        }
    }
    let bindings: Api<RoleBinding> = Api::namespaced(ctx.client.clone(), ns);
    match bindings.get_opt(&name).await? {
        Some(existing) if !owned_by(&existing.metadata, &owner.uid) => return Ok(conflict("RoleBinding")),
        // The role reference cannot change in place; the subject can.
        Some(existing) if existing.role_ref == role_ref && existing.subjects.as_ref() == Some(&subjects) => {}
        Some(existing) => {
            let binding = RoleBinding { metadata: existing.metadata, role_ref, subjects: Some(subjects) };
            bindings.replace(&name, &params, &binding).await?;
        }
        None => {
            let binding = RoleBinding { metadata: child_meta(app, &name, owner), role_ref, subjects: Some(subjects) };
            bindings.create(&params, &binding).await?;
        }
    }
    Ok(Some(Outcome {
        finding: Finding::ok(
            TYPE,
            "Granted",
            format!(
                "Role and RoleBinding {name} grant ServiceAccount {} what the sidecar needs",
                sidecar.service_account_name
            ),
        ),
        recheck_in: None,
    }))
}

async fn check_users(app: &OAuthApplication, secrets: &Api<Secret>) -> Result<Outcome, ReconcileError> {
    const TYPE: &str = status::USERS_READY;
    let Some(users) = &app.spec.users else {
        return Ok(Outcome {
            finding: Finding::ok(TYPE, "NoUsers", "no users Secret is referenced"),
            recheck_in: None,
        });
    };
    let name = &users.secret_ref.name;
    let key = users.secret_ref.key.as_deref().unwrap_or(DEFAULT_USERS_KEY);
    let missing = |reason: &str, message: String| Outcome {
        finding: Finding::failed(TYPE, reason, message),
        recheck_in: Some(RECHECK_MISSING_INPUT),
    };
    let Some(secret) = secrets.get_opt(name).await? else {
        return Ok(missing(
            "UsersSecretNotFound",
            format!("Secret {name} (spec.users.secretRef) does not exist; the password grant fails until it does"),
        ));
    };
    let Some(yaml) = text(&secret.data, key) else {
        return Ok(missing("UsersKeyMissing", format!("Secret {name} has no key {key}")));
    };
    let users = match crate::api::users::parse_users(&yaml) {
        Ok(u) => u,
        Err(e) => return Ok(missing("InvalidUsers", format!("Secret {name}, key {key}: {e}"))),
    };
    // Keys and values, as the API server's limit counts them (the test server too); decoded, not base64.
    let size: usize = secret.data.iter().flatten().map(|(k, v)| k.len() + v.0.len()).sum();
    Ok(Outcome { finding: status::users(name, users.len(), size), recheck_in: Some(RECHECK) })
}

/// `TrustedIssuersReady`, for an application with `spec.trustedIssuers` only: whether each issuer's key set can be
/// had, as a sidecar would get it. A `jwksUri` through the shared [`KeySets`], which fetches an issuer at most once
/// per [`REFETCH_INTERVAL`] and keeps a set it holds for an hour, so reconciles never ask an issuer more often than
/// the sidecars' own cache would (a fetch, bounded at 5 s, delays this application's status, nothing else); a
/// `jwks.configMapRef` read from the application's namespace. The finding does not gate `Ready` (see
/// [`status::trusted_issuers`]).
async fn check_trusted_issuers(
    app: &OAuthApplication,
    config_maps: &Api<ConfigMap>,
    key_sets: &KeySets,
) -> Result<Option<Outcome>, ReconcileError> {
    let issuers = &app.spec.trusted_issuers;
    if issuers.is_empty() {
        return Ok(None);
    }
    let mut problems = Vec::new();
    let mut recheck_in = None;
    for issuer in issuers {
        let problem = match (&issuer.jwks_uri, &issuer.jwks) {
            (Some(uri), _) => {
                let set = match key_sets.current(uri).await {
                    // A set without a usable key verifies nothing: ask again, as a sidecar meeting an unknown key
                    // would (no more often than the cache allows).
                    Ok(set) if set.keys.is_empty() => key_sets.after_unknown_key(uri).await,
                    other => other,
                };
                let problem = match set {
                    Ok(set) if !set.keys.is_empty() => None,
                    Ok(_) => Some(format!("the key set at {uri} holds no key kubetoken can use")),
                    Err(why) => Some(why),
                };
                // Looked at again once the cache would fetch again, not sooner (that would only repeat the error).
                if problem.is_some() {
                    recheck_in = Some(recheck_in.map_or(RECHECK_KEY_SET, |r: u64| r.min(RECHECK_KEY_SET)));
                }
                problem
            }
            (None, Some(source)) => {
                let r = &source.config_map_ref;
                let problem = match config_maps.get_opt(&r.name).await? {
                    None => Some(format!("ConfigMap {} (jwks.configMapRef) does not exist", r.name)),
                    Some(cm) => match cm.data.as_ref().and_then(|d| d.get(r.key())) {
                        None => Some(format!("ConfigMap {} has no key {}", r.name, r.key())),
                        Some(json) => match crate::api::v1alpha1::parse_key_set(json) {
                            Err(e) => Some(format!("ConfigMap {}, key {}: {e}", r.name, r.key())),
                            Ok(set) if set.keys.is_empty() => {
                                Some(format!("ConfigMap {}, key {}: no key kubetoken can use", r.name, r.key()))
                            }
                            Ok(_) => None,
                        },
                    },
                };
                // The ConfigMap is not watched (the controller does not own it): a fix is seen at the next look.
                if problem.is_some() {
                    recheck_in = Some(RECHECK_MISSING_INPUT);
                }
                problem
            }
            // Refused by validation before this runs.
            (None, None) => Some("neither jwksUri nor jwks is set".to_string()),
        };
        if let Some(why) = problem {
            problems.push(format!("issuer {:?}: {why}", issuer.issuer));
        }
    }
    Ok(Some(Outcome { finding: status::trusted_issuers(issuers.len(), &problems), recheck_in }))
}

pub async fn reconcile(app: Arc<OAuthApplication>, ctx: Arc<Context>) -> Result<Action, ReconcileError> {
    let started = Instant::now();
    let result = reconcile_inner(&app, &ctx).await;
    ctx.metrics.observe(result.is_ok(), started.elapsed());
    let key = format!("{}/{}", app.namespace().unwrap_or_default(), app.name_any());
    match &result {
        Ok(_) => {
            ctx.failures.succeeded(&key);
        }
        Err(e) => {
            // Best effort: when the API itself is failing, this fails too (and is logged).
            let events = Actions { recorder: &ctx.recorder, reference: app.object_ref(&()) };
            events
                .publish(EventType::Warning, "ReconcileFailed", "Reconcile", format!("{e}; retrying with backoff"))
                .await;
        }
    }
    result
}

async fn reconcile_inner(app: &OAuthApplication, ctx: &Context) -> Result<Action, ReconcileError> {
    let ns = app.namespace().ok_or_else(|| ReconcileError::Internal("OAuthApplication without namespace".into()))?;
    let name = app.name_any();
    let now = ctx.clock.now();
    let apps: Api<OAuthApplication> = Api::namespaced(ctx.client.clone(), &ns);
    let secrets: Api<Secret> = Api::namespaced(ctx.client.clone(), &ns);
    let config_maps: Api<ConfigMap> = Api::namespaced(ctx.client.clone(), &ns);
    let owner = app.controller_owner_ref(&()).ok_or_else(|| ReconcileError::Internal("object has no uid".into()))?;
    let events = Actions { recorder: &ctx.recorder, reference: app.object_ref(&()) };
    let old = app.status.clone().unwrap_or_default();
    let mut status =
        OAuthApplicationStatus { observed_generation: app.meta().generation, ..OAuthApplicationStatus::default() };

    let findings_and_recheck: Vec<Outcome> = if let Err(e) = app.spec.validate() {
        // A spec that cannot work (e.g. let through by an older CRD): say so, touch nothing, wait for a new spec.
        events.publish(EventType::Warning, "InvalidSpec", "Validate", e.to_string()).await;
        status.client_id = old.client_id.clone();
        vec![Outcome { finding: Finding::failed("SpecValid", "InvalidSpec", e.to_string()), recheck_in: None }]
    } else {
        let credentials = reconcile_credentials(app, &secrets, &owner, now, &events, &mut status).await?;
        let (signing, jwks) =
            reconcile_signing_keys(app, &secrets, &owner, now, &ctx.key_timing, &events, &mut status).await?;
        let published = reconcile_jwks(app, &config_maps, &owner, jwks, &mut status).await?;
        let users = check_users(app, &secrets).await?;
        let trusted_issuers = check_trusted_issuers(app, &config_maps, &ctx.key_sets).await?;
        let token_secrets = reconcile_token_secrets(app, &secrets, &owner).await?;
        let token_state = reconcile_token_state(app, &config_maps, &owner).await?;
        let mut outcomes = vec![credentials, signing, published, users, token_secrets, token_state];
        outcomes.extend(trusted_issuers);
        outcomes.extend(reconcile_sidecar_access(app, ctx, &ns, &owner).await?);
        outcomes
    };
    let findings: Vec<Finding> = findings_and_recheck.iter().map(|o| o.finding.clone()).collect();
    let ready = status::ready(&findings);
    let mut all = vec![ready.clone()];
    all.extend(findings);
    status.conditions = status::conditions(&old.conditions, &all, app.meta().generation, &now_time(now));
    if status != old {
        let patch = status_patch(&old, &status);
        apps.patch_status(
            &name,
            &PatchParams { field_manager: Some(MANAGER.into()), ..PatchParams::default() },
            &Patch::Merge(&patch),
        )
        .await?;
        // A token state reaching 80 % or its capacity is worth a Warning event, once per change of reason.
        if let Some(state) = all.iter().find(|f| f.type_ == status::TOKEN_STATE_READY)
            && (state.reason == status::NEAR_CAPACITY || state.reason == status::FULL)
            && !old.conditions.iter().any(|c| c.type_ == status::TOKEN_STATE_READY && c.reason == state.reason)
        {
            let reason = if state.reason == status::FULL { "TokenStateFull" } else { "TokenStateNearCapacity" };
            events.publish(EventType::Warning, reason, "CheckTokenState", state.message.clone()).await;
        }
        // So is a users Secret nearing the size the API server lets it have.
        if let Some(users) = all.iter().find(|f| f.type_ == status::USERS_READY)
            && users.reason == status::NEAR_SIZE_LIMIT
            && !old.conditions.iter().any(|c| c.type_ == status::USERS_READY && c.reason == users.reason)
        {
            events.publish(EventType::Warning, "UsersSecretNearSizeLimit", "CheckUsers", users.message.clone()).await;
        }
        let was_ready = old.conditions.iter().any(|c| c.type_ == status::READY && c.status == "True");
        if ready.ok && !was_ready {
            events
                .publish(
                    EventType::Normal,
                    "Ready",
                    "Reconcile",
                    "the application's credentials, keys and JWKS are ready".into(),
                )
                .await;
        }
    }
    let recheck = findings_and_recheck.iter().filter_map(|o| o.recheck_in).min().unwrap_or(RECHECK).min(RECHECK);
    tracing::info!(namespace = %ns, name = %name, ready = ready.ok, recheck_in = recheck, "reconciled");
    Ok(Action::requeue(Duration::from_secs(recheck)))
}

/// A merge patch that makes the stored status exactly `new`: a field `new` no longer has is sent as `null`, so
/// that nothing cleared (a client ID, a key ID) lingers from an older status.
fn status_patch(old: &OAuthApplicationStatus, new: &OAuthApplicationStatus) -> serde_json::Value {
    let mut fields = match serde_json::to_value(new) {
        Ok(serde_json::Value::Object(map)) => map,
        _ => serde_json::Map::new(),
    };
    if let Ok(serde_json::Value::Object(before)) = serde_json::to_value(old) {
        for name in before.keys() {
            fields.entry(name.clone()).or_insert(serde_json::Value::Null);
        }
    }
    json!({ "status": fields })
}

/// The longest backoff. An application that keeps failing is retried, so records its failure, at least this often.
const MAX_BACKOFF: Duration = Duration::from_secs(300);

fn backoff_delay(attempt: u32) -> Duration {
    Duration::from_secs(1u64 << attempt.min(10).saturating_sub(1)).min(MAX_BACKOFF)
}

/// Consecutive reconcile failures per application. An application deleted while failing is never reconciled
/// again, so its entry is dropped once it has not failed for twice the longest backoff: the map holds only
/// applications that are failing now.
#[derive(Default)]
pub struct Backoff(Mutex<HashMap<String, (u32, Instant)>>);

impl Backoff {
    /// Records a failure at `now`; returns how many in a row.
    pub fn failed(&self, key: &str, now: Instant) -> u32 {
        let mut map = self.0.lock().unwrap_or_else(|p| p.into_inner());
        map.retain(|_, (_, at)| now.saturating_duration_since(*at) < 2 * MAX_BACKOFF);
        let entry = map.entry(key.to_string()).or_insert((0, now));
        *entry = (entry.0.saturating_add(1), now);
        entry.0
    }

    pub fn succeeded(&self, key: &str) {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).remove(key);
    }

    pub fn len(&self) -> usize {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Requeue with exponential backoff per application: 1 s, 2 s, 4 s … up to 5 minutes.
pub fn error_policy(app: Arc<OAuthApplication>, error: &ReconcileError, ctx: Arc<Context>) -> Action {
    let key = format!("{}/{}", app.namespace().unwrap_or_default(), app.name_any());
    let attempt = ctx.failures.failed(&key, Instant::now());
    let delay = backoff_delay(attempt);
    tracing::warn!(application = %key, %error, attempt, retry_in = ?delay, "reconcile failed");
    Action::requeue(delay)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_resets_on_success_and_forgets_applications_that_stopped_failing() {
        let b = Backoff::default();
        let t0 = Instant::now();
        assert_eq!((b.failed("ns/a", t0), b.failed("ns/a", t0), b.failed("ns/a", t0)), (1, 2, 3));
        assert_eq!(
            (backoff_delay(1), backoff_delay(3), backoff_delay(30)),
            (Duration::from_secs(1), Duration::from_secs(4), MAX_BACKOFF)
        );
        b.succeeded("ns/a");
        assert_eq!(b.failed("ns/a", t0), 1, "a success starts over");
        // "ns/a" is deleted while failing: it never fails (or succeeds) again. Another application's failure
        // after two longest backoffs drops it.
        assert_eq!(b.failed("ns/b", t0 + 2 * MAX_BACKOFF), 1);
        assert_eq!(b.len(), 1, "only the application failing now is remembered");
    }

    #[test]
    fn the_status_is_written_whole_and_cleared_fields_are_removed() {
        let old = OAuthApplicationStatus {
            client_id: Some("app-1".into()),
            current_key_id: Some("k1".into()),
            jwks_config_map: Some("app-jwks".into()),
            ..OAuthApplicationStatus::default()
        };
        let new =
            OAuthApplicationStatus { jwks_config_map: Some("app-jwks".into()), ..OAuthApplicationStatus::default() };
        let patch = status_patch(&old, &new);
        assert_eq!(patch["status"]["clientId"], serde_json::Value::Null, "{patch}");
        assert!(
            patch["status"].as_object().is_some_and(|s| s.contains_key("clientId") && s.contains_key("currentKeyId"))
        );
        assert_eq!(patch["status"]["jwksConfigMap"], "app-jwks");
        // Applied as a JSON merge patch, the stored status is exactly `new`.
        let mut stored = json!({ "status": serde_json::to_value(&old).expect("json") });
        merge(&mut stored, &patch);
        let stored: OAuthApplicationStatus = serde_json::from_value(stored["status"].clone()).expect("status");
        assert_eq!(stored, new);
    }

    /// RFC 7386.
    fn merge(target: &mut serde_json::Value, patch: &serde_json::Value) {
        match patch {
            serde_json::Value::Object(p) => {
                if !target.is_object() {
                    *target = json!({});
                }
                if let serde_json::Value::Object(t) = target {
                    for (k, v) in p {
                        if v.is_null() {
                            t.remove(k);
                        } else {
                            merge(t.entry(k.clone()).or_insert(serde_json::Value::Null), v);
                        }
                    }
                }
            }
            other => *target = other.clone(),
        }
    }
}

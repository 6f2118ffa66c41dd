//! `kubetoken standalone`: the token service with no cluster. Applications come from manifest files, state
//! (signing keys, generated credentials, the token log) lives in a local directory.

pub mod manifests;
pub mod state_dir;

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;

use self::manifests::{AppManifest, Manifests};
use self::state_dir::{SecretSource, StateDir, StoredCredentials};
use crate::api::v1alpha1::{ApplicationParts, DEFAULT_USERS_KEY};
use crate::core::app::{Application, Registry};
use crate::core::clock::{Clock, SystemClock};
use crate::core::service::TokenService;
use crate::core::signing::SigningKey;
use crate::http::serve::{Endpoint, serve};
use crate::http::{AppState, router};
use crate::metrics::Metrics;
use crate::storage::file_store::{FileStore, FileStoreOptions};

#[derive(Debug, Clone)]
pub struct StandaloneOptions {
    pub manifests: PathBuf,
    pub state_dir: PathBuf,
    pub endpoint: Endpoint,
    /// Lockout and request limits.
    pub policies: crate::core::service::ServicePolicies,
    /// The token state in PostgreSQL rather than in the state directory's log.
    pub postgres: Option<crate::storage::postgres::PgOptions>,
    /// Fetches trusted issuers' key sets (`jwksUri`); None: only offline key sets work.
    pub key_sets: Option<std::sync::Arc<crate::federation::key_sets::KeySets>>,
}

/// The secrets of the applications in the manifests, fetched from (or made once in) PostgreSQL, so that every
/// instance on one database uses the same ones.
struct SharedSecrets(HashMap<String, (Vec<u8>, bool)>);

const MAC_KEY_SECRET: &str = "token-mac-key";

fn signing_key_secret(ns: &str, name: &str, alg: crate::api::v1alpha1::SigningAlgorithm) -> String {
    format!("signing-key/{ns}/{name}/{}", alg.as_str())
}

fn credentials_secret(ns: &str, name: &str) -> String {
    format!("credentials/{ns}/{name}")
}

impl SharedSecrets {
    async fn fetch(store: &crate::storage::postgres::PgStore, manifests: &Manifests) -> Result<Self, String> {
        let io = |e: std::io::Error| e.to_string();
        let mut map = HashMap::new();
        let mac = || self::state_dir::generate_token_mac_key().map_err(io);
        map.insert(MAC_KEY_SECRET.to_string(), store.shared_secret(MAC_KEY_SECRET, mac).await?);
        for m in &manifests.apps {
            let (ns, name) = (m.namespace(), m.name());
            let alg = m.app.spec.signing.algorithm;
            let generate_key = || {
                crate::core::signing::Algorithm::try_from(alg)
                    .and_then(SigningKey::generate_pkcs8)
                    .map_err(|e| format!("{}: signing key: {e}", m.object()))
            };
            let secret = signing_key_secret(ns, name, alg);
            map.insert(secret.clone(), store.shared_secret(&secret, generate_key).await?);
            let secret_name = m.app.spec.credentials_secret_name(name);
            if manifests.secret(ns, &secret_name).is_none() {
                let generate_credentials = || {
                    let creds = StoredCredentials::generate(name).map_err(io)?;
                    serde_json::to_vec(&creds).map_err(|e| e.to_string())
                };
                let secret = credentials_secret(ns, name);
                map.insert(secret.clone(), store.shared_secret(&secret, generate_credentials).await?);
            }
        }
        Ok(Self(map))
    }

    fn get(&self, name: &str) -> std::io::Result<&(Vec<u8>, bool)> {
        self.0.get(name).ok_or_else(|| std::io::Error::other(format!("shared secret {name} was not fetched")))
    }
}

impl SecretSource for SharedSecrets {
    fn token_mac_key(&self) -> std::io::Result<Vec<u8>> {
        Ok(self.get(MAC_KEY_SECRET)?.0.clone())
    }
    fn signing_key(
        &self,
        ns: &str,
        name: &str,
        alg: crate::api::v1alpha1::SigningAlgorithm,
    ) -> std::io::Result<Vec<u8>> {
        Ok(self.get(&signing_key_secret(ns, name, alg))?.0.clone())
    }
    fn credentials(&self, ns: &str, name: &str) -> std::io::Result<(StoredCredentials, bool)> {
        let (json, fresh) = self.get(&credentials_secret(ns, name))?;
        let creds = serde_json::from_slice(json).map_err(std::io::Error::other)?;
        Ok((creds, *fresh))
    }
}

/// Where the token state lives.
pub enum StateStore {
    File(Arc<FileStore>),
    Postgres(Arc<crate::storage::postgres::PgStore>),
}

impl StateStore {
    fn token_store(&self) -> Arc<dyn crate::core::store::TokenStore> {
        match self {
            StateStore::File(s) => s.clone(),
            StateStore::Postgres(s) => s.clone(),
        }
    }

    /// Flushes what is pending (the log; PostgreSQL has committed every change already).
    pub fn close(&self) {
        if let StateStore::File(s) = self {
            s.close();
        }
    }
}

/// `/metrics` of the PostgreSQL store (its readiness is the store's `healthy`, which the server reads already).
struct PostgresExtras(Arc<crate::storage::postgres::PgStore>);

impl crate::http::ServerExtras for PostgresExtras {
    fn not_ready(&self) -> Option<String> {
        None
    }

    fn render_metrics(&self, out: &mut String) {
        self.0.render_metrics(out);
    }
}

/// Credentials generated at start, to be shown to the operator once per start.
pub struct GeneratedCredentials {
    pub application: String,
    pub client_id: String,
    pub client_secret: String,
}

fn utf8(bytes: &[u8]) -> Option<String> {
    String::from_utf8(bytes.to_vec()).ok().map(|s| s.trim_end_matches(['\n', '\r']).to_string())
}

/// Builds the application for one manifest, reading or creating what it needs in the state dir.
fn build_application(
    m: &AppManifest,
    manifests: &Manifests,
    state: &dyn SecretSource,
    token_secret: &[u8],
    generated: &mut Vec<GeneratedCredentials>,
) -> Result<Application, String> {
    let spec = &m.app.spec;
    let ns = m.namespace();
    let name = m.name();
    spec.validate().map_err(|e| m.error(e.path, e.message).to_string())?;

    // Credentials: the Secret from the manifests if there is one, else generated once and kept in the state dir.
    let secret_name =
        spec.credentials.as_ref().and_then(|c| c.secret_name.clone()).unwrap_or_else(|| format!("{name}-credentials"));
    let (client_id, client_secret) = match manifests.secret(ns, &secret_name) {
        Some(secret) => {
            let get = |key: &str| {
                secret.data.get(key).and_then(|v| utf8(v)).filter(|v| !v.is_empty()).ok_or_else(|| {
                    format!(
                        "{}: Secret {ns}/{secret_name}: data.{key}: missing or empty (referenced by {})",
                        secret.file.display(),
                        m.object()
                    )
                })
            };
            (get("client_id")?, get("client_secret")?)
        }
        None => {
            let (creds, fresh) = state.credentials(ns, name).map_err(|e| format!("{}: {e}", m.object()))?;
            generated.push(GeneratedCredentials {
                application: format!("{ns}/{name}{}", if fresh { " (new)" } else { "" }),
                client_id: creds.client_id.clone(),
                client_secret: creds.client_secret.clone(),
            });
            (creds.client_id, creds.client_secret)
        }
    };

    let mut users = HashMap::new();
    if let Some(u) = &spec.users {
        let key = u.secret_ref.key.as_deref().unwrap_or(DEFAULT_USERS_KEY);
        let secret = manifests.secret(ns, &u.secret_ref.name).ok_or_else(|| {
            m.error("spec.users.secretRef.name", format!("Secret {ns}/{} is not in the manifests", u.secret_ref.name))
                .to_string()
        })?;
        let where_ = format!("{}: Secret {ns}/{}: data.{key}", secret.file.display(), u.secret_ref.name);
        let text = secret.data.get(key).and_then(|v| utf8(v)).ok_or_else(|| format!("{where_}: missing"))?;
        users = crate::api::users::parse_users(&text).map_err(|e| format!("{where_}: {e}"))?;
    }

    let alg = spec.signing.algorithm;
    let der = state.signing_key(ns, name, alg).map_err(|e| format!("{}: signing key: {e}", m.object()))?;
    let signer = crate::core::signing::Algorithm::try_from(alg)
        .and_then(|alg| SigningKey::from_pkcs8(alg, &der))
        .map_err(|e| format!("{}: signing key: {e}", m.object()))?;

    // Offline key sets of trusted issuers: a ConfigMap of the manifests.
    let mut key_sets = HashMap::new();
    for r in spec.key_set_config_maps() {
        let read = match manifests.config_map(ns, &r.name) {
            None => Err(format!("ConfigMap {ns}/{} is not in the manifests", r.name)),
            Some(cm) => cm
                .data
                .get(r.key())
                .and_then(|v| utf8(v))
                .ok_or_else(|| format!("{}: ConfigMap {ns}/{}: data.{}: missing", cm.file.display(), r.name, r.key()))
                .and_then(|json| crate::api::v1alpha1::parse_key_set(&json)),
        };
        key_sets.insert((r.name.clone(), r.key().to_string()), read);
    }

    spec.application(ApplicationParts {
        key_sets,
        key_sets_required: true,
        name: format!("{ns}/{name}"),
        client_id,
        client_secrets: vec![client_secret],
        users,
        signer: Arc::new(signer),
        verification_keys: vec![],
        token_secrets: vec![token_secret.to_vec()],
    })
    .map_err(|e| m.error(e.path, e.message).to_string())
}

/// Everything `standalone` needs before it listens. Fails with a message naming the file, object and field.
pub struct Prepared {
    pub service: Arc<TokenService>,
    pub store: StateStore,
    pub metrics: Arc<Metrics>,
    pub generated: Vec<GeneratedCredentials>,
}

pub async fn prepare(opts: &StandaloneOptions, issuer: String) -> Result<Prepared, String> {
    let manifests = Manifests::load_dir(&opts.manifests).map_err(|e| e.to_string())?;
    if manifests.apps.is_empty() {
        return Err(format!("{}: no OAuthApplication found", opts.manifests.display()));
    }
    let state = StateDir::open(&opts.state_dir).map_err(|e| format!("{}: {e}", opts.state_dir.display()))?;
    let metrics = Arc::new(Metrics::default());
    let clock: Arc<dyn Clock> = Arc::new(SystemClock);
    let (store, shared) = match &opts.postgres {
        Some(pg) => {
            let mut pg = pg.clone();
            pg.batch_sizes = metrics.storage_batch.clone();
            let store = crate::storage::postgres::PgStore::connect(pg, clock.clone()).await?;
            tracing::info!("token state in PostgreSQL");
            // Every instance on the database uses the same generated secrets, whatever its state directory.
            let shared = SharedSecrets::fetch(&store, &manifests).await?;
            (StateStore::Postgres(store), Some(shared))
        }
        None => {
            let (store, report) = FileStore::open(
                &state.tokens_dir(),
                clock.clone(),
                metrics.storage_batch.clone(),
                FileStoreOptions::default(),
            )
            .map_err(|e| format!("{}: {e}", state.tokens_dir().display()))?;
            tracing::info!(
                records = report.records,
                truncated_bytes = report.truncated_bytes,
                live_entries = report.live_entries,
                "token state loaded"
            );
            (StateStore::File(Arc::new(store)), None)
        }
    };
    let secrets: &dyn SecretSource = match &shared {
        Some(shared) => shared,
        None => &state,
    };
    let mac_key = secrets.token_mac_key().map_err(|e| format!("{}: {e}", opts.state_dir.display()))?;
    let mut generated = Vec::new();
    let apps = manifests
        .apps
        .iter()
        .map(|m| build_application(m, &manifests, secrets, &mac_key, &mut generated))
        .collect::<Result<Vec<_>, _>>()?;
    let registry = Registry::new(apps)?;
    let service = TokenService::new(
        registry,
        store.token_store(),
        clock,
        crate::core::service::ServiceConfig {
            key_sets: opts.key_sets.clone().map(|k| k as std::sync::Arc<dyn crate::core::assertion::KeySetSource>),
            ..crate::passwords::service_config(issuer, opts.policies)
        },
    );
    Ok(Prepared { service: Arc::new(service), store, metrics, generated })
}

/// Binds, prints the address, serves until SIGTERM or Ctrl-C, then flushes the state.
pub async fn run(opts: StandaloneOptions) -> Result<(), String> {
    let (listener, issuer) = opts.endpoint.bind().await?;
    let local = listener.local_addr();
    let prepared = prepare(&opts, issuer.base().to_string()).await?;
    for g in &prepared.generated {
        // Printed on stdout for the operator, never into the logs.
        println!("credentials for {}: client_id={} client_secret={}", g.application, g.client_id, g.client_secret);
    }
    println!("kubetoken listening on {}", listener.url());
    let mut state = AppState::new(prepared.service.clone(), prepared.metrics.clone())
        .with_issuer_policy(issuer)
        .with_body_read_timeout(opts.endpoint.body_read_timeout);
    if let StateStore::Postgres(pg) = &prepared.store {
        state = state.with_extras(Arc::new(PostgresExtras(pg.clone())));
    }
    let state = Arc::new(state);
    tracing::info!(%local, scheme = listener.scheme(), "serving");
    serve(listener, router(state), opts.endpoint.limits, crate::signal::shutdown()).await?;
    prepared.store.close();
    tracing::info!("stopped; token state flushed");
    Ok(())
}

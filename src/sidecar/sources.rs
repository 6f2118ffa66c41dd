//! What one application is made of, followed through watches of named objects, and rebuilt into the core's
//! [`Application`] whenever any of them changes.

use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use futures::StreamExt;
use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::{ConfigMap, Secret};
use kube::api::Api;
use kube::runtime::watcher;
use kube::{Resource, ResourceExt};
use tokio::sync::Notify;

use crate::api::v1alpha1::{ApplicationParts, DEFAULT_USERS_KEY, OAuthApplication};
use crate::controller::keys::{KEYS_FIELD, StoredKey};
use crate::controller::reconcile::{
    PREVIOUS_SECRET_EXPIRES_KEY, PREVIOUS_SECRET_KEY, TOKEN_SECRETS_FIELD, token_secrets_name,
};
use crate::core::app::Application;
use crate::core::clock::{Clock, UnixTime};

/// A built application, ready to serve.
pub struct AppSnapshot {
    pub app: Arc<Application>,
}

/// One watched object: whether its first list arrived, and what it is now.
struct Named<K> {
    synced: bool,
    object: Option<K>,
}

struct Watched<K> {
    name: String,
    slot: Arc<Mutex<Named<K>>>,
    task: tokio::task::JoinHandle<()>,
}

impl<K> Drop for Watched<K> {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // Slots are replaced whole; a panic cannot leave one half-written.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl<K> Watched<K>
where
    K: Resource + Clone + serde::de::DeserializeOwned + std::fmt::Debug + Send + Sync + 'static,
{
    fn start(api: Api<K>, name: String, notify: Arc<Notify>) -> Self {
        let slot = Arc::new(Mutex::new(Named { synced: false, object: None }));
        let task = tokio::spawn(watch_named(api, name.clone(), slot.clone(), notify));
        Self { name, slot, task }
    }

    fn get(&self) -> (bool, Option<K>) {
        let g = lock(&self.slot);
        (g.synced, g.object.clone())
    }
}

/// Follows one object by name (a field selector, which RBAC `resourceNames` can allow).
async fn watch_named<K>(api: Api<K>, name: String, slot: Arc<Mutex<Named<K>>>, notify: Arc<Notify>)
where
    K: Resource + Clone + serde::de::DeserializeOwned + std::fmt::Debug + Send + 'static,
{
    let stream = watcher::watcher(api, watcher::Config::default().fields(&format!("metadata.name={name}")));
    futures::pin_mut!(stream);
    let mut initial: Option<K> = None;
    while let Some(event) = stream.next().await {
        match event {
            Ok(watcher::Event::Init) => initial = None,
            Ok(watcher::Event::InitApply(o)) => initial = Some(o),
            Ok(watcher::Event::InitDone) => {
                *lock(&slot) = Named { synced: true, object: initial.take() };
                notify.notify_one();
            }
            Ok(watcher::Event::Apply(o)) => {
                lock(&slot).object = Some(o);
                notify.notify_one();
            }
            Ok(watcher::Event::Delete(_)) => {
                lock(&slot).object = None;
                notify.notify_one();
            }
            Err(e) => {
                tracing::warn!(object = %name, error = %e, "watch failed; it restarts");
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
        }
    }
}

#[derive(Default)]
struct Watches {
    credentials: Option<Watched<Secret>>,
    signing_keys: Option<Watched<Secret>>,
    users: Option<Watched<Secret>>,
    token_secrets: Option<Watched<Secret>>,
    /// The ConfigMaps of offline key sets (`spec.trustedIssuers[].jwks.configMapRef`), by name.
    key_sets: Vec<Watched<ConfigMap>>,
}

/// The sources of one application.
pub struct AppSources {
    client: kube::Client,
    namespace: String,
    name: String,
    notify: Arc<Notify>,
    /// Why the application cannot be served now; `None` once it is built and Ready.
    status: Mutex<Option<String>>,
    /// The application is being served (built and handed out at least once, and not gone since).
    serving: std::sync::atomic::AtomicBool,
}

fn text(data: Option<&std::collections::BTreeMap<String, ByteString>>, key: &str) -> Option<String> {
    data?
        .get(key)
        .and_then(|v| String::from_utf8(v.0.clone()).ok())
        .map(|s| s.trim_end_matches(['\n', '\r']).to_string())
        .filter(|s| !s.is_empty())
}

impl AppSources {
    pub fn new(client: kube::Client, namespace: &str, name: &str) -> Self {
        Self {
            client,
            namespace: namespace.to_string(),
            name: name.to_string(),
            notify: Arc::new(Notify::new()),
            status: Mutex::new(Some("waiting for the first watch results".into())),
            serving: std::sync::atomic::AtomicBool::new(false),
        }
    }

    pub fn not_ready(&self) -> Option<String> {
        lock(&self.status).clone()
    }

    /// Whether the application is being served: requests for it are answered, whatever [`Self::not_ready`] says.
    pub fn serving(&self) -> bool {
        self.serving.load(std::sync::atomic::Ordering::Acquire)
    }

    fn set_status(&self, status: Option<String>) {
        let mut g = lock(&self.status);
        if *g != status {
            match &status {
                Some(why) => tracing::warn!(application = %self.name, reason = %why, "application not servable"),
                None => tracing::info!(application = %self.name, "application ready to serve"),
            }
            *g = status;
        }
    }

    /// Watches until dropped; calls `on_change` with each rebuilt application (`None`: no longer servable).
    pub async fn run(&self, clock: Arc<dyn Clock>, on_change: impl Fn(Option<AppSnapshot>)) {
        let apps: Api<OAuthApplication> = Api::namespaced(self.client.clone(), &self.namespace);
        let secrets: Api<Secret> = Api::namespaced(self.client.clone(), &self.namespace);
        let app_watch = Watched::start(apps, self.name.clone(), self.notify.clone());
        let mut watches = Watches::default();
        let mut served = false;
        loop {
            let (app_synced, app) = app_watch.get();
            if let Some(app) = &app {
                let name = app.name_any();
                let credentials = app.spec.credentials_secret_name(&name);
                let users = app.spec.users.as_ref().map(|u| u.secret_ref.name.clone());
                let ensure = |slot: &mut Option<Watched<Secret>>, wanted: Option<String>| match wanted {
                    Some(w) if slot.as_ref().map(|s| s.name.as_str()) != Some(w.as_str()) => {
                        *slot = Some(Watched::start(secrets.clone(), w, self.notify.clone()));
                    }
                    None => *slot = None,
                    _ => {}
                };
                ensure(&mut watches.credentials, Some(credentials));
                ensure(&mut watches.signing_keys, Some(format!("{name}-signing-keys")));
                ensure(&mut watches.users, users);
                ensure(&mut watches.token_secrets, Some(token_secrets_name(&name)));
                let mut wanted: Vec<String> = app.spec.key_set_config_maps().map(|r| r.name.clone()).collect();
                wanted.sort();
                wanted.dedup();
                if watches.key_sets.iter().map(|w| &w.name).ne(wanted.iter()) {
                    let config_maps: Api<ConfigMap> = Api::namespaced(self.client.clone(), &self.namespace);
                    watches.key_sets = wanted
                        .into_iter()
                        .map(|w| Watched::start(config_maps.clone(), w, self.notify.clone()))
                        .collect();
                }
            }
            let outcome = if !app_synced {
                Err("waiting for the first watch results".to_string())
            } else if let Some(app) = app {
                self.build(&app, &watches, clock.now())
            } else {
                Err(format!("OAuthApplication {}/{} not found", self.namespace, self.name))
            };
            let next_expiry = match outcome {
                // Not served before the controller first reports it Ready: only then is its signing key
                // published in the JWKS ConfigMap. Later, a transient not-Ready does not stop serving.
                Ok((built, ready, expiry)) if ready || served => {
                    on_change(Some(AppSnapshot { app: Arc::new(built) }));
                    served = true;
                    self.serving.store(true, std::sync::atomic::Ordering::Release);
                    self.set_status(
                        (!ready).then(|| "the OAuthApplication is not Ready (see its conditions)".to_string()),
                    );
                    expiry
                }
                Ok((_, _, expiry)) => {
                    self.set_status(Some("the OAuthApplication is not Ready yet (see its conditions)".to_string()));
                    expiry
                }
                Err(why) => {
                    // Keep serving what was built unless the application is gone: a Secret that is briefly
                    // unreadable should not take the token endpoint down.
                    if served && why.contains("not found") && why.starts_with("OAuthApplication") {
                        on_change(None);
                        served = false;
                        self.serving.store(false, std::sync::atomic::Ordering::Release);
                    }
                    self.set_status(Some(why));
                    None
                }
            };
            // Wake for any watched change, or when a previous client secret's grace period ends.
            let wait = next_expiry.map_or(Duration::from_secs(300), |at| {
                Duration::from_secs(at.saturating_sub(clock.now()).clamp(1, 300))
            });
            tokio::select! {
                () = self.notify.notified() => {}
                () = tokio::time::sleep(wait) => {}
            }
        }
    }

    /// Builds the application; returns it, whether the controller reports it Ready, and when the previous client
    /// secret expires (the next rebuild).
    fn build(
        &self,
        app: &OAuthApplication,
        watches: &Watches,
        now: UnixTime,
    ) -> Result<(Application, bool, Option<UnixTime>), String> {
        let get = |w: &Option<Watched<Secret>>, what: &str| -> Result<Secret, String> {
            let w = w.as_ref().ok_or_else(|| format!("no {what} Secret is referenced"))?;
            match w.get() {
                (false, _) => Err(format!("waiting for Secret {} ({what})", w.name)),
                (true, None) => Err(format!("Secret {} ({what}) not found", w.name)),
                (true, Some(s)) => Ok(s),
            }
        };
        let credentials = get(&watches.credentials, "credentials")?;
        let client_id =
            text(credentials.data.as_ref(), "client_id").ok_or("the credentials Secret has no client_id")?;
        let mut client_secrets = vec![
            text(credentials.data.as_ref(), "client_secret").ok_or("the credentials Secret has no client_secret")?,
        ];
        let previous_expires =
            text(credentials.data.as_ref(), PREVIOUS_SECRET_EXPIRES_KEY).and_then(|v| v.parse::<u64>().ok());
        if let (Some(previous), Some(expires)) =
            (text(credentials.data.as_ref(), PREVIOUS_SECRET_KEY), previous_expires)
            && now < expires
        {
            client_secrets.push(previous);
        }

        let keys_secret = get(&watches.signing_keys, "signing keys")?;
        let keys_json =
            text(keys_secret.data.as_ref(), KEYS_FIELD).ok_or("the signing-keys Secret has no keys.json")?;
        let stored: Vec<StoredKey> = serde_json::from_str(&keys_json).map_err(|e| format!("signing keys: {e}"))?;
        let current = stored
            .iter()
            .find(|k| k.current)
            .or_else(|| stored.iter().rev().find(|k| k.retired_at.is_none()))
            .ok_or("the signing-keys Secret has no current key")?;
        let signer = Arc::new(current.signing_key()?);
        let verification_keys =
            stored.iter().map(|k| k.signing_key().map(Arc::new)).collect::<Result<Vec<_>, String>>()?;

        let users = match &app.spec.users {
            None => Default::default(),
            Some(u) => {
                let secret = get(&watches.users, "users")?;
                let key = u.secret_ref.key.as_deref().unwrap_or(DEFAULT_USERS_KEY);
                let yaml =
                    text(secret.data.as_ref(), key).ok_or_else(|| format!("the users Secret has no key {key}"))?;
                crate::api::users::parse_users(&yaml).map_err(|e| format!("users Secret, key {key}: {e}"))?
            }
        };

        let token_secret = get(&watches.token_secrets, "token secrets")?;
        let lines =
            text(token_secret.data.as_ref(), TOKEN_SECRETS_FIELD).ok_or("the token-secrets Secret has no secrets")?;
        let token_secrets = lines
            .lines()
            .filter(|l| !l.trim().is_empty())
            .map(|l| URL_SAFE_NO_PAD.decode(l.trim()).ok().filter(|b| b.len() >= 32))
            .collect::<Option<Vec<Vec<u8>>>>()
            .filter(|v| !v.is_empty())
            .ok_or("the token-secrets Secret holds a secret that is not 32+ bytes of base64url")?;

        let mut key_sets = std::collections::HashMap::new();
        for r in app.spec.key_set_config_maps() {
            let read = match watches.key_sets.iter().find(|w| w.name == r.name).map(Watched::get) {
                None | Some((false, _)) => {
                    return Err(format!("waiting for ConfigMap {} (a trusted issuer's key set)", r.name));
                }
                Some((true, None)) => Err(format!("ConfigMap {} (a trusted issuer's key set) not found", r.name)),
                Some((true, Some(cm))) => cm
                    .data
                    .as_ref()
                    .and_then(|d| d.get(r.key()))
                    .ok_or_else(|| format!("ConfigMap {} has no key {}", r.name, r.key()))
                    .and_then(|json| crate::api::v1alpha1::parse_key_set(json)),
            };
            key_sets.insert((r.name.clone(), r.key().to_string()), read);
        }

        let built = app
            .spec
            .application(ApplicationParts {
                key_sets,
                key_sets_required: false,
                name: format!("{}/{}", self.namespace, self.name),
                client_id,
                client_secrets,
                users,
                signer,
                verification_keys,
                token_secrets,
            })
            .map_err(|e| e.to_string())?;
        let ready =
            app.status.as_ref().is_some_and(|s| s.conditions.iter().any(|c| c.type_ == "Ready" && c.status == "True"));
        Ok((built, ready, previous_expires.filter(|e| *e > now)))
    }
}

//! `kubetoken sidecar`: the token endpoint next to an app, for the OAuthApplications it is told to serve.
//!
//! Everything comes from the Kubernetes API through watches of named objects (least privilege: RBAC can name
//! them): the OAuthApplication, its credentials Secret, signing-keys Secret, users Secret and token-tagging
//! Secret. Any change rebuilds the application and takes effect at once. Token state lives in the application's
//! ConfigMaps ([`crate::storage::kube_store`]), shared by every replica.

pub mod sources;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use k8s_openapi::api::core::v1::ConfigMap;
use kube::api::Api;

use self::sources::{AppSnapshot, AppSources};
use crate::core::clock::{Clock, SystemClock, UnixTime};
use crate::core::lockout::SharedFailure;
use crate::core::model::{Change, LivePair, SharedKey, TokenId, TokenKey};
use crate::core::service::TokenService;
use crate::core::store::{Lookup, StoreError, StoreFuture, TokenStore};
use crate::http::serve::{Endpoint, serve};
use crate::http::{AppState, ServerExtras, router};
use crate::metrics::Metrics;
use crate::storage::kube_store::{KubeStore, KubeStoreMetrics, KubeStoreOptions};
use crate::storage::postgres::PgStore;

#[derive(Debug, Clone)]
pub struct SidecarOptions {
    pub applications: Vec<String>,
    pub namespace: Option<String>,
    pub endpoint: Endpoint,
    /// A second port with only /healthz, /readyz and /metrics (plain HTTP: nothing secret crosses it), for kubelet
    /// probes and Prometheus, which reach the pod IP but not the pod's loopback.
    pub health_listen: Option<std::net::SocketAddr>,
    /// Lockout and request limits.
    pub policies: crate::core::service::ServicePolicies,
    pub store: KubeStoreOptions,
    /// The token state of every application in PostgreSQL rather than in its ConfigMaps.
    pub postgres: Option<crate::storage::postgres::PgOptions>,
    /// Fetches trusted issuers' key sets (`jwksUri`); None: only offline key sets work.
    pub key_sets: Option<std::sync::Arc<crate::federation::key_sets::KeySets>>,
}

/// An application's token state: its ConfigMaps, or the PostgreSQL database every application shares.
#[derive(Clone)]
pub enum AppStore {
    Kube(KubeStore),
    Postgres(Arc<PgStore>),
}

impl AppStore {
    fn store(&self) -> &dyn TokenStore {
        match self {
            AppStore::Kube(s) => s,
            AppStore::Postgres(s) => s.as_ref(),
        }
    }

    /// Loaded: the ConfigMaps' state read; a database is read per request.
    fn loaded(&self) -> bool {
        match self {
            AppStore::Kube(s) => s.loaded(),
            AppStore::Postgres(_) => true,
        }
    }
}

/// Routes each change to the store of the application whose client it belongs to; lookups ask every store
/// (a sidecar serves a handful of applications; with PostgreSQL there is one store).
#[derive(Default)]
pub struct RoutingStore {
    by_client: Mutex<HashMap<String, AppStore>>,
    all: Vec<AppStore>,
}

impl RoutingStore {
    fn store_for(&self, client_id: &str) -> Option<AppStore> {
        self.by_client.lock().unwrap_or_else(|p| p.into_inner()).get(client_id).cloned()
    }

    async fn prepare_at(&self, client_id: &str, lookup: Lookup<'_>) -> Result<(), StoreError> {
        match self.store_for(client_id) {
            Some(store) => store.store().prepare(lookup).await,
            None => Ok(()),
        }
    }

    fn set_client(&self, client_id: String, store: AppStore) {
        self.by_client.lock().unwrap_or_else(|p| p.into_inner()).insert(client_id, store);
    }
}

impl TokenStore for RoutingStore {
    fn prepare<'a>(&'a self, lookup: Lookup<'a>) -> StoreFuture<'a, ()> {
        Box::pin(async move {
            match lookup {
                Lookup::Key(TokenKey { client_id, .. }) => self.prepare_at(client_id, lookup).await,
                Lookup::User { client_id, .. } => self.prepare_at(client_id, lookup).await,
                // Which application an id belongs to is not known before it is found: every store looks.
                Lookup::Access(_) | Lookup::Refresh(_) => {
                    for store in &self.all {
                        store.store().prepare(lookup).await?;
                    }
                    Ok(())
                }
            }
        })
    }

    fn pair(&self, key: &TokenKey) -> Option<LivePair> {
        self.store_for(&key.client_id)?.store().pair(key)
    }

    fn find_access(&self, id: &TokenId) -> Option<(SharedKey, LivePair)> {
        self.all.iter().find_map(|s| s.store().find_access(id))
    }

    fn find_refresh(&self, id: &TokenId) -> Option<(SharedKey, LivePair)> {
        self.all.iter().find_map(|s| s.store().find_refresh(id))
    }

    fn user_pairs(&self, client_id: &str, username: &str) -> Vec<(TokenKey, LivePair)> {
        self.store_for(client_id).map(|s| s.store().user_pairs(client_id, username)).unwrap_or_default()
    }

    fn commit(&self, change: Change) -> StoreFuture<'_, ()> {
        match self.store_for(&change.key.client_id) {
            Some(store) => Box::pin(async move { store.store().commit(change).await }),
            None => Box::pin(async { Err(StoreError::Unavailable("no token state for this client".into())) }),
        }
    }

    fn sync(&self) -> StoreFuture<'_, ()> {
        Box::pin(async move {
            for s in &self.all {
                s.store().sync().await?;
            }
            Ok(())
        })
    }

    fn healthy(&self) -> bool {
        self.all.iter().all(|s| s.store().healthy())
    }

    fn visible_when_committed(&self) -> bool {
        self.all.iter().any(|s| s.store().visible_when_committed())
    }

    fn remember_assertion<'a>(&'a self, client_id: &'a str, id: &'a str, until: UnixTime) -> StoreFuture<'a, bool> {
        match self.store_for(client_id) {
            Some(store) => Box::pin(async move { store.store().remember_assertion(client_id, id, until).await }),
            None => Box::pin(std::future::ready(Ok(true))),
        }
    }

    fn forget_assertion<'a>(&'a self, client_id: &'a str, id: &'a str) -> StoreFuture<'a, ()> {
        match self.store_for(client_id) {
            Some(store) => Box::pin(async move { store.store().forget_assertion(client_id, id).await }),
            None => Box::pin(std::future::ready(Ok(()))),
        }
    }

    fn share_failure(&self, failure: SharedFailure) {
        // The lockout key starts with the client ID (users: `client\0user`).
        let client = failure.who.split('\u{0}').next().unwrap_or_default().to_string();
        if let Some(store) = self.store_for(&client) {
            store.store().share_failure(failure);
        }
    }

    fn take_shared_failures(&self) -> Vec<SharedFailure> {
        self.all.iter().flat_map(|s| s.store().take_shared_failures()).collect()
    }
}

struct Extras {
    apps: Vec<(String, Arc<AppSources>, AppStore)>,
}

impl ServerExtras for Extras {
    /// Not ready only while the sidecar cannot answer token requests: an application not served yet, or its token
    /// state not loaded. A problem the controller reports while the application is served (a Secret briefly
    /// unreadable, the application not Ready for a moment) leaves it ready: it keeps issuing tokens, and taking the
    /// pod out of its Service would take the app with it.
    fn not_ready(&self) -> Option<String> {
        let reasons: Vec<String> = self
            .apps
            .iter()
            .filter_map(|(name, sources, store)| {
                let why = if !store.loaded() {
                    "token state not loaded".to_string()
                } else if !sources.serving() {
                    sources.not_ready().unwrap_or_else(|| "not loaded yet".into())
                } else {
                    return None;
                };
                Some(format!("{name}: {why}"))
            })
            .collect();
        (!reasons.is_empty()).then(|| reasons.join("; "))
    }

    fn render_metrics(&self, out: &mut String) {
        use std::fmt::Write;
        out.push_str("# HELP kubetoken_sidecar_cache_synced Whether the application's watches are synced and it is Ready.\n# TYPE kubetoken_sidecar_cache_synced gauge\n");
        for (name, sources, store) in &self.apps {
            let synced = sources.not_ready().is_none() && store.loaded();
            let _ = writeln!(out, "kubetoken_sidecar_cache_synced{{application=\"{name}\"}} {}", u8::from(synced));
        }
        out.push_str("# HELP kubetoken_sidecar_live_entries Live token pairs (one per live token key).\n# TYPE kubetoken_sidecar_live_entries gauge\n");
        for (name, _, store) in &self.apps {
            if let AppStore::Kube(store) = store {
                let _ = writeln!(out, "kubetoken_sidecar_live_entries{{application=\"{name}\"}} {}", store.entries());
            }
        }
        for (name, _, store) in &self.apps {
            if let AppStore::Kube(store) = store {
                store.metrics().render(out, name);
            }
        }
        // One database for every application: its metrics once.
        if let Some((_, _, AppStore::Postgres(store))) = self.apps.first() {
            store.render_metrics(out);
        }
    }
}

/// Serves until SIGTERM or Ctrl-C.
pub async fn run(opts: SidecarOptions) -> Result<(), String> {
    if opts.applications.is_empty() {
        return Err("name at least one application with --application".into());
    }
    // Bound first: a refused listen address or a broken certificate is reported before any cluster access.
    let (listener, issuer_policy) = opts.endpoint.bind().await?;
    let health_listener = match opts.health_listen {
        Some(addr) => Some(crate::http::serve::ServeListener::bind(addr, None).await?),
        None => None,
    };
    let client = crate::kube_client::client("sidecar").await?;
    let namespace = opts.namespace.clone().unwrap_or_else(|| client.default_namespace().to_string());
    let local = listener.local_addr();
    let issuer = issuer_policy.base().to_string();
    let clock: Arc<dyn Clock> = Arc::new(SystemClock);
    let metrics = Arc::new(Metrics::default());
    let config_maps: Api<ConfigMap> = Api::namespaced(client.clone(), &namespace);

    let postgres = match &opts.postgres {
        Some(pg) => {
            let mut pg = pg.clone();
            pg.batch_sizes = metrics.storage_batch.clone();
            Some(PgStore::connect(pg, clock.clone()).await?)
        }
        None => None,
    };
    let mut apps = Vec::new();
    for name in &opts.applications {
        let store = match &postgres {
            Some(pg) => AppStore::Postgres(pg.clone()),
            None => {
                let store_metrics = Arc::new(KubeStoreMetrics::new(metrics.storage_batch.clone()));
                let store = KubeStore::new(config_maps.clone(), name, clock.clone(), opts.store.clone(), store_metrics);
                AppStore::Kube(store)
            }
        };
        let sources = Arc::new(AppSources::new(client.clone(), &namespace, name));
        apps.push((name.clone(), sources, store));
    }
    let all = match &postgres {
        Some(pg) => vec![AppStore::Postgres(pg.clone())],
        None => apps.iter().map(|a| a.2.clone()).collect(),
    };
    let routing = Arc::new(RoutingStore { by_client: Mutex::default(), all });
    let service = Arc::new(TokenService::new(
        crate::core::app::Registry::default(),
        routing.clone(),
        clock.clone(),
        crate::core::service::ServiceConfig {
            key_sets: opts.key_sets.clone().map(|k| k as std::sync::Arc<dyn crate::core::assertion::KeySetSource>),
            ..crate::passwords::service_config(issuer, opts.policies)
        },
    ));
    // Until every application is loaded, an unknown client may be one of theirs: 503, not 401.
    service.set_loading(true);
    let expected = apps.len();

    let mut tasks = Vec::new();
    let snapshots: Arc<Mutex<HashMap<String, AppSnapshot>>> = Arc::default();
    for (name, sources, store) in &apps {
        if let AppStore::Kube(store) = store {
            tasks.push(tokio::spawn(store.clone().run()));
        }
        let (sources, service, routing, store, snapshots, name, clock) = (
            sources.clone(),
            service.clone(),
            routing.clone(),
            store.clone(),
            snapshots.clone(),
            name.clone(),
            clock.clone(),
        );
        tasks.push(tokio::spawn(async move {
            // An application is served only with its token state loaded, so that no request is answered from an
            // empty state (introspection: inactive; refresh: unknown) while it loads.
            while !store.loaded() {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            sources
                .run(clock, move |snapshot| {
                    let mut all = snapshots.lock().unwrap_or_else(|p| p.into_inner());
                    match snapshot {
                        Some(s) => {
                            routing.set_client(s.app.client_id.clone(), store.clone());
                            all.insert(name.clone(), s);
                        }
                        None => {
                            all.remove(&name);
                        }
                    }
                    match crate::core::app::Registry::from_shared(all.values().map(|s| s.app.clone())) {
                        Ok(registry) => service.set_registry(registry),
                        Err(e) => tracing::error!(error = %e, "applications conflict; keeping the previous set"),
                    }
                    service.set_loading(all.len() < expected);
                })
                .await;
        }));
    }

    if let Some(health) = &health_listener {
        println!("kubetoken sidecar health on {}", health.url());
    }
    println!("kubetoken sidecar listening on {}", listener.url());
    tracing::info!(%local, %namespace, applications = ?opts.applications, "serving");
    let extras = Arc::new(Extras { apps });
    let state = Arc::new(
        AppState::new(service, metrics)
            .with_extras(extras)
            .with_issuer_policy(issuer_policy)
            .with_body_read_timeout(opts.endpoint.body_read_timeout),
    );
    if let Some(health) = health_listener {
        let router = crate::http::health_router(state.clone());
        tasks.push(tokio::spawn(async move {
            let limits = crate::http::serve::ConnectionLimits::default();
            if let Err(e) = serve(health, router, limits, std::future::pending()).await {
                tracing::error!(error = %e, "health server stopped");
            }
        }));
    }
    let served = serve(listener, router(state), opts.endpoint.limits, crate::signal::shutdown()).await;
    for t in tasks {
        t.abort();
    }
    // Give in-flight journal writes a moment; a change not written is a token nobody received.
    tokio::time::sleep(Duration::from_millis(50)).await;
    served
}

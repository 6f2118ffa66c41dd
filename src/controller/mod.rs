//! `kubetoken controller`: reconciles OAuthApplications into credentials, signing keys, a JWKS and a status.
//!
//! - [`reconcile`]: one reconciliation (Kubernetes I/O) and the error policy (backoff).
//! - [`keys`]: signing-key rotation, pure.
//! - [`status`]: conditions, pure.
//! - [`leader`]: Lease-based leader election.
//! - [`metrics`]: reconcile counters, durations and the leader gauge.
//! - [`webhook`]: the mutating admission webhook that injects the sidecar (every replica serves it).
//! - [`injection_audit`]: labelled pods running without the sidecar (the leader reports them).

pub mod injection_audit;
pub mod keys;
pub mod leader;
pub mod metrics;
pub mod offset_clock;
pub mod reconcile;
pub mod sidecar_access;
pub mod status;
pub mod webhook;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::State;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use futures::StreamExt;
use k8s_openapi::api::core::v1::{ConfigMap, Secret};
use kube::api::Api;
use kube::runtime::controller::Controller;
use kube::runtime::events::{Recorder, Reporter};
use kube::runtime::watcher;
use tokio::sync::watch;

use self::leader::{LeaseConfig, LeaseLock};
use self::metrics::ControllerMetrics;
use self::reconcile::{Context, MANAGED_BY_LABEL, MANAGER, error_policy, reconcile};
use crate::api::v1alpha1::OAuthApplication;

#[derive(Clone)]
pub struct ControllerOptions {
    /// Watch only these namespaces; all when empty.
    pub namespaces: Vec<String>,
    /// Compete for the Lease (several replicas); when false, this process leads at once (one replica only).
    pub leader_election: bool,
    pub listen: SocketAddr,
    /// TLS for the health and metrics port (it carries nothing secret, so plaintext is allowed anywhere).
    pub tls: Option<crate::http::tls::TlsFiles>,
    pub lease: LeaseConfig,
    /// The reconciler's clock (key rotation, secret grace periods). Leader election always uses the wall clock.
    pub clock: Arc<dyn crate::core::clock::Clock>,
    pub key_timing: self::reconcile::KeyTiming,
    /// Keep a Role and RoleBinding for the sidecar of each application that names its ServiceAccount
    /// (`spec.sidecar.serviceAccountName`); off where the cluster forbids the controller to grant access.
    pub manage_sidecar_rbac: bool,
    /// Serve the admission webhook (every replica).
    pub webhook: Option<self::webhook::WebhookOptions>,
    /// Fetches the trusted issuers' key sets (`jwksUri`) for the `TrustedIssuersReady` condition: made once, so
    /// that its cache spans every reconcile.
    pub key_sets: Arc<crate::federation::key_sets::KeySets>,
}

struct Health {
    metrics: Arc<ControllerMetrics>,
    /// Set once the first list of OAuthApplications succeeded (leader) or the Lease was read (standby).
    ready: watch::Receiver<bool>,
    /// Set once the webhook serves a certificate (always set without a webhook): the webhook Service routes only
    /// to replicas that can answer it.
    webhook_ready: watch::Receiver<bool>,
}

fn health_router(health: Arc<Health>) -> Router {
    Router::new()
        .route("/healthz", get(|| async { "ok" }))
        .route(
            "/readyz",
            get(|State(h): State<Arc<Health>>| async move {
                if *h.ready.borrow() && *h.webhook_ready.borrow() {
                    (StatusCode::OK, "ready")
                } else {
                    (StatusCode::SERVICE_UNAVAILABLE, "not ready")
                }
            }),
        )
        .route(
            "/metrics",
            get(|State(h): State<Arc<Health>>| async move {
                let mut r: Response = h.metrics.render().into_response();
                r.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain; version=0.0.4"));
                r
            }),
        )
        .with_state(health)
}

/// Runs until SIGTERM/Ctrl-C (exit 0, Lease released) or lost leadership (error: a fresh process competes again).
/// How long a stopping replica keeps answering the webhook after it turned unready: its endpoint leaves the
/// webhook Service meanwhile, so the API server's calls go to the other replicas rather than to a closed port.
const WEBHOOK_DRAIN: Duration = Duration::from_secs(5);

async fn drain_webhook(ready: &watch::Sender<bool>, serving: bool) {
    if serving {
        let _ = ready.send(false);
        tracing::info!(seconds = WEBHOOK_DRAIN.as_secs(), "stopping: unready, still answering the webhook meanwhile");
        tokio::time::sleep(WEBHOOK_DRAIN).await;
    }
}

pub async fn run(opts: ControllerOptions) -> Result<(), String> {
    let client = crate::kube_client::client("controller").await?;
    let metrics = Arc::new(ControllerMetrics::default());
    let (ready_tx, ready_rx) = watch::channel(false);
    let tls = crate::http::serve::tls_config(opts.tls.as_ref())?;
    let listener = crate::http::serve::ServeListener::bind(opts.listen, tls).await?;
    let url = listener.url();
    let webhook_ready = match opts.webhook.clone() {
        Some(webhook) => {
            let (url, ready) =
                self::webhook::start(client.clone(), webhook, opts.clock.clone(), metrics.clone()).await?;
            println!("kubetoken controller webhook on {url}");
            ready
        }
        None => watch::channel(true).1,
    };
    let health = Arc::new(Health { metrics: metrics.clone(), ready: ready_rx, webhook_ready });
    tokio::spawn(async move {
        let limits = crate::http::serve::ConnectionLimits::default();
        if let Err(e) = crate::http::serve::serve(listener, health_router(health), limits, std::future::pending()).await
        {
            tracing::error!(error = %e, "health server stopped");
        }
    });
    println!("kubetoken controller health on {url}");

    let lock = Arc::new(LeaseLock::new(client.clone(), opts.lease.clone()));
    let (leader_tx, mut leader_rx) = watch::channel(false);
    let elector = if opts.leader_election {
        let lock = lock.clone();
        tokio::spawn(async move { lock.run(leader_tx).await })
    } else {
        // A single replica: lead at once, never touch a Lease.
        let _ = leader_tx.send(true);
        tokio::spawn(async move {
            leader_tx.closed().await;
        })
    };
    let shutdown = crate::signal::shutdown();
    tokio::pin!(shutdown);

    // Standby until we lead.
    tracing::info!(identity = %opts.lease.identity, lease = %opts.lease.name, "waiting for leadership");
    let _ = ready_tx.send(true);
    loop {
        if *leader_rx.borrow_and_update() {
            break;
        }
        tokio::select! {
            () = &mut shutdown => {
                drain_webhook(&ready_tx, opts.webhook.is_some()).await;
                elector.abort();
                return Ok(());
            }
            changed = leader_rx.changed() => {
                if changed.is_err() {
                    return Err("leader election stopped".into());
                }
            }
        }
    }
    metrics.set_leader(true);
    tracing::info!(identity = %opts.lease.identity, "leading: starting the controller");

    let ctx = Arc::new(Context {
        client: client.clone(),
        clock: opts.clock.clone(),
        key_timing: opts.key_timing,
        recorder: Recorder::new(
            client.clone(),
            Reporter { controller: MANAGER.into(), instance: Some(opts.lease.identity.clone()) },
        ),
        metrics: metrics.clone(),
        failures: self::reconcile::Backoff::default(),
        manage_sidecar_rbac: opts.manage_sidecar_rbac,
        key_sets: opts.key_sets.clone(),
    });
    // One controller per watched namespace (RBAC then needs only Roles there), or one over all namespaces.
    type Apis = (Api<OAuthApplication>, Api<Secret>, Api<ConfigMap>);
    let scopes: Vec<Apis> = if opts.namespaces.is_empty() {
        vec![(Api::all(client.clone()), Api::all(client.clone()), Api::all(client.clone()))]
    } else {
        opts.namespaces
            .iter()
            .map(|ns| {
                (
                    Api::namespaced(client.clone(), ns),
                    Api::namespaced(client.clone(), ns),
                    Api::namespaced(client.clone(), ns),
                )
            })
            .collect()
    };
    // Labelled pods without the sidecar: reported by the leader only (one event per pod, not one per replica), and
    // only where the webhook is on (the chart grants the pod watch with it).
    let audit = opts.webhook.is_some().then(|| {
        let pod_scopes: Vec<Api<k8s_openapi::api::core::v1::Pod>> = if opts.namespaces.is_empty() {
            vec![Api::all(client.clone())]
        } else {
            opts.namespaces.iter().map(|ns| Api::namespaced(client.clone(), ns)).collect()
        };
        tokio::spawn(self::injection_audit::run(pod_scopes, client.clone(), ctx.recorder.clone(), metrics.clone()))
    });
    let children = watcher::Config::default().labels(&format!("{MANAGED_BY_LABEL}=kubetoken"));
    let (stop_tx, stop_rx) = watch::channel(false);
    let lost_leadership = async move {
        while *leader_rx.borrow_and_update() {
            if leader_rx.changed().await.is_err() {
                break;
            }
        }
    };
    let controllers = scopes.into_iter().map(|(apps, secrets, config_maps)| {
        let mut stop_rx = stop_rx.clone();
        Controller::new(apps, watcher::Config::default())
            .owns(secrets, children.clone())
            .owns(config_maps, children.clone())
            .graceful_shutdown_on(async move {
                let _ = stop_rx.wait_for(|stop| *stop).await;
            })
            .run(reconcile, error_policy, ctx.clone())
            .for_each(|result| async move {
                if let Err(e) = result {
                    tracing::debug!(error = %e, "controller event");
                }
            })
    });
    let controller = futures::future::join_all(controllers);
    tokio::pin!(controller);
    let mut lost = false;
    tokio::select! {
        _ = &mut controller => {}
        () = &mut shutdown => drain_webhook(&ready_tx, opts.webhook.is_some()).await,
        () = lost_leadership => { lost = true; }
    }
    // Let in-flight reconciles finish, then stop writing before anyone else may lead.
    let _ = stop_tx.send(true);
    let _ = tokio::time::timeout(Duration::from_secs(10), controller).await;
    if let Some(audit) = audit {
        audit.abort();
    }
    elector.abort();
    metrics.set_leader(false);
    if lost {
        return Err("lost leadership; exiting so that a fresh process competes again".into());
    }
    if opts.leader_election {
        lock.release().await;
    }
    tracing::info!("stopped; leader Lease released");
    Ok(())
}

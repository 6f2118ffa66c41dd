//! Controller-managed webhook TLS, the Kubernetes side: every replica keeps the Secret (created once, renewed per
//! [`super::certs`]), the MutatingWebhookConfiguration's `caBundle` and its own served certificate in step. All
//! replicas may do it at once: creation is decided by the API server (409 AlreadyExists), updates carry the
//! resourceVersion they were decided on (409 Conflict: decided again at the next pass).

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::ByteString;
use k8s_openapi::api::admissionregistration::v1::MutatingWebhookConfiguration;
use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, OwnerReference};
use kube::api::{Api, PostParams};
use tokio::sync::watch;

use super::certs::{CertError, RetiredCa, WebhookCerts};
use crate::controller::reconcile::MANAGED_BY_LABEL;
use crate::core::clock::Clock;
use crate::http::tls::SwappableCert;

/// How often a replica looks at the Secret and the configuration (renewals happen weeks ahead; another replica's
/// renewal reaches this one within this).
pub const SYNC_INTERVAL: Duration = Duration::from_secs(30);
const RETRY_INTERVAL: Duration = Duration::from_secs(2);

#[derive(Debug, thiserror::Error)]
pub enum SyncError {
    #[error("{0}")]
    Cert(#[from] CertError),
    #[error("the Kubernetes API: {0}")]
    Api(#[from] kube::Error),
    #[error(
        "the Secret {0} exists and is not kubetoken's (no {MANAGED_BY_LABEL}=kubetoken label): not overwritten; \
         delete it or choose another name"
    )]
    NotOurs(String),
    #[error("the Secret {0} changed meanwhile; decided again at the next pass")]
    Conflict(String),
    #[error("the MutatingWebhookConfiguration {0} does not exist: nothing calls the webhook (the chart creates it)")]
    NoConfiguration(String),
}

pub struct CertSync {
    pub secrets: Api<Secret>,
    pub configurations: Api<MutatingWebhookConfiguration>,
    pub secret_name: String,
    pub configuration_name: String,
    pub dns_names: Vec<String>,
    pub clock: Arc<dyn Clock>,
    pub served: Arc<SwappableCert>,
}

fn is_ours(secret: &Secret) -> bool {
    secret.metadata.labels.as_ref().and_then(|l| l.get(MANAGED_BY_LABEL)).is_some_and(|v| v == "kubetoken")
}

fn owned_by(secret: &Secret, owner: &OwnerReference) -> bool {
    secret.metadata.owner_references.iter().flatten().any(|o| o.uid == owner.uid)
}

fn data_bytes(secret: &Secret) -> BTreeMap<String, Vec<u8>> {
    secret.data.iter().flatten().map(|(k, v)| (k.clone(), v.0.clone())).collect()
}

impl CertSync {
    /// The Secret, owned by the configuration: uninstalling the chart (which deletes the configuration) deletes it.
    fn secret(&self, certs: &WebhookCerts, resource_version: Option<String>, owner: &OwnerReference) -> Secret {
        Secret {
            metadata: ObjectMeta {
                name: Some(self.secret_name.clone()),
                labels: Some(BTreeMap::from([(MANAGED_BY_LABEL.to_string(), "kubetoken".to_string())])),
                owner_references: Some(vec![owner.clone()]),
                resource_version,
                ..ObjectMeta::default()
            },
            type_: Some("Opaque".into()),
            data: Some(certs.to_data().into_iter().map(|(k, v)| (k, ByteString(v.into_bytes()))).collect()),
            ..Secret::default()
        }
    }

    /// The certificates as stored (created if there are none), and the Secret's resourceVersion.
    /// A new CA and serving certificate; the CAs the configuration trusts now stay in the bundle for a day, so that
    /// a replica still serving the old certificate (until its next pass) is not refused meanwhile.
    fn fresh(&self, now: u64, trusted_now: Option<&str>) -> Result<WebhookCerts, SyncError> {
        let mut certs = WebhookCerts::generate(&self.dns_names, now)?;
        certs.previous_ca = trusted_now
            .filter(|b| b.contains("BEGIN CERTIFICATE"))
            .map(|b| RetiredCa { cert_pem: b.to_string(), not_after: now + 86_400 });
        Ok(certs)
    }

    async fn stored(
        &self,
        owner: &OwnerReference,
        trusted_now: Option<&str>,
    ) -> Result<(WebhookCerts, Option<String>), SyncError> {
        let now = self.clock.now();
        match self.secrets.get_opt(&self.secret_name).await? {
            Some(secret) if !is_ours(&secret) => Err(SyncError::NotOurs(self.secret_name.clone())),
            Some(secret) => {
                let certs = match WebhookCerts::from_data(&data_bytes(&secret)) {
                    Ok(certs) if owned_by(&secret, owner) => return Ok((certs, secret.metadata.resource_version)),
                    // The configuration was made again (a reinstall): the Secret follows its new owner.
                    Ok(certs) => certs,
                    Err(e) => {
                        // Ours but unusable (edited by hand, truncated): made again; the bundle follows.
                        tracing::warn!(secret = %self.secret_name, error = %e, "webhook certificates unusable; making new ones");
                        self.fresh(now, trusted_now)?
                    }
                };
                let written = self
                    .secrets
                    .replace(
                        &self.secret_name,
                        &PostParams::default(),
                        &self.secret(&certs, secret.metadata.resource_version, owner),
                    )
                    .await
                    .map_err(|e| self.conflict_or(e))?;
                Ok((certs, written.metadata.resource_version))
            }
            None => {
                let certs = self.fresh(now, trusted_now)?;
                match self.secrets.create(&PostParams::default(), &self.secret(&certs, None, owner)).await {
                    Ok(written) => {
                        tracing::info!(secret = %self.secret_name, "webhook CA and serving certificate created");
                        Ok((certs, written.metadata.resource_version))
                    }
                    // Another replica created it first: use theirs.
                    Err(kube::Error::Api(e)) if e.code == 409 => Err(SyncError::Conflict(self.secret_name.clone())),
                    Err(e) => Err(e.into()),
                }
            }
        }
    }

    fn conflict_or(&self, e: kube::Error) -> SyncError {
        match e {
            kube::Error::Api(ref r) if r.code == 409 => SyncError::Conflict(self.secret_name.clone()),
            e => SyncError::Api(e),
        }
    }

    /// Whether every webhook of the configuration trusts `ca_pem`.
    fn trusts(configuration: &MutatingWebhookConfiguration, ca_pem: &str) -> bool {
        let webhooks = configuration.webhooks.as_deref().unwrap_or_default();
        !webhooks.is_empty()
            && webhooks.iter().all(|w| {
                w.client_config.ca_bundle.as_ref().is_some_and(|b| String::from_utf8_lossy(&b.0).contains(ca_pem))
            })
    }

    /// One pass: the Secret renewed if due, the configuration's bundle brought up to date, the served
    /// certificate replaced if it changed.
    pub async fn sync_once(&self) -> Result<(), SyncError> {
        let Some(configuration) = self.configurations.get_opt(&self.configuration_name).await? else {
            return Err(SyncError::NoConfiguration(self.configuration_name.clone()));
        };
        let owner = OwnerReference {
            api_version: "admissionregistration.k8s.io/v1".into(),
            kind: "MutatingWebhookConfiguration".into(),
            name: self.configuration_name.clone(),
            uid: configuration.metadata.uid.clone().unwrap_or_default(),
            ..OwnerReference::default()
        };
        let trusted_now = configuration
            .webhooks
            .iter()
            .flatten()
            .find_map(|w| w.client_config.ca_bundle.as_ref())
            .map(|b| String::from_utf8_lossy(&b.0).into_owned());
        let (mut certs, resource_version) = self.stored(&owner, trusted_now.as_deref()).await?;
        let now = self.clock.now();
        let ca_published = Self::trusts(&configuration, &certs.ca.cert_pem);
        if let Some(next) = certs.plan(&self.dns_names, now, ca_published)? {
            self.secrets
                .replace(&self.secret_name, &PostParams::default(), &self.secret(&next, resource_version, &owner))
                .await
                .map_err(|e| self.conflict_or(e))?;
            tracing::info!(secret = %self.secret_name, "webhook certificates renewed");
            certs = next;
        }
        let bundle = certs.ca_bundle(now);
        let mut configuration = configuration;
        let mut changed = false;
        for webhook in configuration.webhooks.iter_mut().flatten() {
            let current = webhook.client_config.ca_bundle.as_ref().map(|b| b.0.as_slice());
            if current != Some(bundle.as_bytes()) {
                webhook.client_config.ca_bundle = Some(ByteString(bundle.clone().into_bytes()));
                changed = true;
            }
        }
        if changed {
            // Carries the resourceVersion read: a concurrent edit makes this a 409, retried at the next pass.
            self.configurations.replace(&self.configuration_name, &PostParams::default(), &configuration).await?;
            tracing::info!(configuration = %self.configuration_name, "webhook caBundle updated");
        }
        let key = crate::http::tls::certified_key(certs.serving.cert_pem.as_bytes(), certs.serving.key_pem.as_bytes())
            .map_err(|e| SyncError::Cert(CertError::Stored(e)))?;
        self.served.set(key);
        Ok(())
    }

    /// Syncs every [`SYNC_INTERVAL`] (sooner after a failure); `ready` turns true once a certificate is served.
    pub async fn run(self, ready: watch::Sender<bool>) {
        loop {
            let wait = match self.sync_once().await {
                Ok(()) => {
                    ready.send_if_modified(|r| !std::mem::replace(r, true));
                    SYNC_INTERVAL
                }
                Err(SyncError::Conflict(_)) => Duration::from_millis(100),
                // Not ready without a certificate: the chart creates the configuration with the Deployment, so this
                // lasts seconds (and tells, in the log and readiness, if someone deleted it).
                Err(e @ SyncError::NoConfiguration(_)) => {
                    tracing::warn!(error = %e, "webhook certificate not made");
                    RETRY_INTERVAL
                }
                Err(e) => {
                    tracing::warn!(error = %e, "webhook certificate sync failed");
                    RETRY_INTERVAL
                }
            };
            tokio::time::sleep(wait).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use kube_test_server::KubeTestServer;
    use serde_json::json;

    use super::*;
    use crate::controller::webhook::certs::{
        CA_PUBLISH_GRACE, CA_RENEW_BEFORE, SERVING_LIFETIME, SERVING_RENEW_BEFORE,
    };
    use crate::core::clock::ManualClock;

    const NS: &str = "kubetoken-system";

    async fn client(server: &KubeTestServer) -> kube::Client {
        let kc = kube::config::Kubeconfig::read_from(server.kubeconfig_path()).expect("kubeconfig");
        let config = kube::Config::from_custom_kubeconfig(kc, &Default::default()).await.expect("config");
        kube::Client::try_from(config).expect("client")
    }

    fn configuration() -> MutatingWebhookConfiguration {
        serde_json::from_value(json!({
            "apiVersion": "admissionregistration.k8s.io/v1",
            "kind": "MutatingWebhookConfiguration",
            "metadata": {"name": "kubetoken"},
            "webhooks": [{
                "name": "inject.kubetoken.io",
                "admissionReviewVersions": ["v1"],
                "sideEffects": "None",
                "clientConfig": {"service": {"name": "kubetoken-webhook", "namespace": NS, "path": "/mutate-pods"}},
                "rules": [{"operations": ["CREATE"], "apiGroups": [""], "apiVersions": ["v1"], "resources": ["pods"]}],
            }],
        }))
        .expect("configuration")
    }

    fn sync(client: &kube::Client, clock: Arc<ManualClock>) -> (CertSync, Arc<SwappableCert>) {
        let served = Arc::new(SwappableCert::default());
        let sync = CertSync {
            secrets: Api::namespaced(client.clone(), NS),
            configurations: Api::all(client.clone()),
            secret_name: "kubetoken-webhook-certs".into(),
            configuration_name: "kubetoken".into(),
            dns_names: vec![format!("kubetoken-webhook.{NS}.svc")],
            clock,
            served: served.clone(),
        };
        (sync, served)
    }

    async fn stored(client: &kube::Client) -> (WebhookCerts, String) {
        let secrets: Api<Secret> = Api::namespaced(client.clone(), NS);
        let secret = secrets.get("kubetoken-webhook-certs").await.expect("secret");
        let configurations: Api<MutatingWebhookConfiguration> = Api::all(client.clone());
        let configuration = configurations.get("kubetoken").await.expect("configuration");
        let bundle = configuration.webhooks.expect("webhooks")[0].client_config.ca_bundle.clone().expect("caBundle");
        (WebhookCerts::from_data(&data_bytes(&secret)).expect("certs"), String::from_utf8(bundle.0).expect("pem"))
    }

    /// Two replicas over five years of passes: one Secret made once, owned by the configuration; the serving
    /// certificate renewed ahead of expiry; a new CA published before it signs; both replicas serving throughout.
    #[tokio::test]
    async fn replicas_share_one_secret_and_renew_it_ahead_of_expiry() {
        let server = KubeTestServer::start();
        let client = client(&server).await;
        let configurations: Api<MutatingWebhookConfiguration> = Api::all(client.clone());
        let made = configurations.create(&PostParams::default(), &configuration()).await.expect("create");
        let start = 1_800_000_000;
        let clock = Arc::new(ManualClock::new(start));
        let (a, served_a) = sync(&client, clock.clone());
        let (b, served_b) = sync(&client, clock.clone());
        assert!(!served_a.is_set());
        a.sync_once().await.expect("first pass");
        // The second replica finds the first one's Secret (or loses the creation race and reads it next pass).
        if let Err(e) = b.sync_once().await {
            assert!(matches!(e, SyncError::Conflict(_)), "{e}");
            b.sync_once().await.expect("second pass");
        }
        assert!(served_a.is_set() && served_b.is_set(), "both replicas serve");
        let (first, bundle) = stored(&client).await;
        assert_eq!(bundle, first.ca_bundle(start), "the configuration trusts the CA");
        let secrets: Api<Secret> = Api::namespaced(client.clone(), NS);
        let secret = secrets.get("kubetoken-webhook-certs").await.expect("secret");
        assert_eq!(secret.metadata.owner_references.expect("owner")[0].uid, made.metadata.uid.expect("uid"));

        // Nothing to do until the serving certificate is due.
        clock.advance(SERVING_LIFETIME - SERVING_RENEW_BEFORE - 60);
        a.sync_once().await.expect("pass");
        assert_eq!(stored(&client).await.0, first, "not due yet: unchanged");
        clock.advance(120);
        a.sync_once().await.expect("pass");
        let (renewed, bundle) = stored(&client).await;
        assert_ne!(renewed.serving, first.serving, "renewed ahead of expiry");
        assert_eq!(renewed.ca, first.ca);
        assert_eq!(bundle, first.ca_bundle(start), "the bundle did not need to change");
        b.sync_once().await.expect("the other replica picks it up");

        // A year before the CA expires: the new CA joins the bundle, then signs.
        let to_ca_renewal = first.ca.not_after - CA_RENEW_BEFORE + 60 - clock.now();
        clock.advance(to_ca_renewal);
        a.sync_once().await.expect("pass");
        let (rotated, bundle) = stored(&client).await;
        assert_ne!(rotated.ca, first.ca);
        assert!(bundle.contains(&first.ca.cert_pem) && bundle.contains(&rotated.ca.cert_pem), "both trusted");
        assert_eq!(rotated.serving.issuer_created, first.ca.created, "the new CA does not sign before it is published");
        b.sync_once().await.expect("the other replica's pass");
        assert_eq!(stored(&client).await.0.serving, rotated.serving, "published too recently to sign");
        clock.advance(CA_PUBLISH_GRACE + 1);
        b.sync_once().await.expect("pass");
        let (moved, _) = stored(&client).await;
        assert_eq!(moved.serving.issuer_created, moved.ca.created, "the serving certificate moved to the new CA");
    }

    #[tokio::test]
    async fn a_secret_that_is_not_kubetokens_is_never_overwritten() {
        let server = KubeTestServer::start();
        let client = client(&server).await;
        let configurations: Api<MutatingWebhookConfiguration> = Api::all(client.clone());
        let (a, served) = sync(&client, Arc::new(ManualClock::new(1_800_000_000)));
        // No configuration yet: nothing is made.
        assert!(matches!(a.sync_once().await, Err(SyncError::NoConfiguration(_))));
        configurations.create(&PostParams::default(), &configuration()).await.expect("create");
        let secrets: Api<Secret> = Api::namespaced(client.clone(), NS);
        let theirs: Secret = serde_json::from_value(json!({
            "metadata": {"name": "kubetoken-webhook-certs"},
            "stringData": {"tls.crt": "someone else's"},
        }))
        .expect("secret");
        secrets.create(&PostParams::default(), &theirs).await.expect("create");
        let err = a.sync_once().await.expect_err("refused");
        assert!(matches!(err, SyncError::NotOurs(_)), "{err}");
        assert!(err.to_string().contains("not overwritten"), "{err}");
        let after = secrets.get("kubetoken-webhook-certs").await.expect("secret");
        assert_eq!(after.data.expect("data")["tls.crt"].0, b"someone else's", "left as it was");
        assert!(!served.is_set());
    }
}

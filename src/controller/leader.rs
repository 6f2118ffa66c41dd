//! Leader election with a coordination.k8s.io Lease, so that two replicas never both write.
//!
//! The holder renews the Lease every `retry_period`; another replica takes it over only once it has seen the
//! Lease unchanged (same holder, same `renewTime`) for `leaseDurationSeconds` of its own monotonic time, as
//! client-go does: the holder's timestamps are never compared with the local clock, so clock skew between nodes
//! cannot hand the Lease to a second leader. Every write goes through `resourceVersion`, so two candidates racing
//! for an expired Lease cannot both win. A leader that could not renew for `renew_deadline` (shorter than the
//! lease duration) steps down before anyone else may take over.

use std::sync::Mutex;
use std::time::{Duration, Instant};

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, PostParams};
use tokio::sync::watch;

#[derive(Debug, Clone)]
pub struct LeaseConfig {
    pub namespace: String,
    pub name: String,
    pub identity: String,
    pub lease_duration: Duration,
    pub renew_deadline: Duration,
    pub retry_period: Duration,
}

pub struct LeaseLock {
    api: Api<Lease>,
    config: LeaseConfig,
    /// Another holder's Lease as last seen, and when this process first saw it so.
    observed: Mutex<Option<(HolderRenewal, Instant)>>,
}

/// Who holds a Lease and the renewTime it last wrote.
type HolderRenewal = (String, Option<MicroTime>);

fn is_conflict(e: &kube::Error) -> bool {
    matches!(e, kube::Error::Api(s) if s.code == 409)
}

impl LeaseLock {
    pub fn new(client: kube::Client, config: LeaseConfig) -> Self {
        Self { api: Api::namespaced(client, &config.namespace), config, observed: Mutex::new(None) }
    }

    fn spec(&self, now: Timestamp, acquire: Option<MicroTime>, transitions: i32) -> LeaseSpec {
        LeaseSpec {
            holder_identity: Some(self.config.identity.clone()),
            lease_duration_seconds: Some(self.config.lease_duration.as_secs().max(1) as i32),
            acquire_time: Some(acquire.unwrap_or(MicroTime(now))),
            renew_time: Some(MicroTime(now)),
            lease_transitions: Some(transitions),
            ..LeaseSpec::default()
        }
    }

    /// One attempt to acquire or renew. `Ok(true)`: we hold the Lease now.
    pub async fn try_acquire_or_renew(&self) -> Result<bool, kube::Error> {
        let now = Timestamp::now();
        let params = PostParams::default();
        let Some(mut lease) = self.api.get_opt(&self.config.name).await? else {
            let lease = Lease {
                metadata: ObjectMeta { name: Some(self.config.name.clone()), ..ObjectMeta::default() },
                spec: Some(self.spec(now, None, 0)),
            };
            return match self.api.create(&params, &lease).await {
                Ok(_) => Ok(true),
                Err(e) if is_conflict(&e) => Ok(false),
                Err(e) => Err(e),
            };
        };
        let spec = lease.spec.clone().unwrap_or_default();
        let holder = spec.holder_identity.clone().unwrap_or_default();
        let transitions = spec.lease_transitions.unwrap_or(0);
        let next = if holder == self.config.identity {
            self.spec(now, spec.acquire_time.clone(), transitions)
        } else {
            let duration = Duration::from_secs(u64::try_from(spec.lease_duration_seconds.unwrap_or(15)).unwrap_or(15));
            if !holder.is_empty() && !self.observed_expired((holder.clone(), spec.renew_time.clone()), duration) {
                return Ok(false);
            }
            self.spec(now, None, transitions + 1)
        };
        lease.spec = Some(next);
        // The resourceVersion read above makes this a compare-and-swap.
        match self.api.replace(&self.config.name, &params, &lease).await {
            Ok(_) => Ok(true),
            Err(e) if is_conflict(&e) => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// Whether `seen` (another holder's Lease) has stayed unchanged for `duration` of this process's time.
    fn observed_expired(&self, seen: HolderRenewal, duration: Duration) -> bool {
        let mut observed = self.observed.lock().unwrap_or_else(|p| p.into_inner());
        match observed.as_ref() {
            Some((last, since)) if *last == seen => since.elapsed() >= duration,
            _ => {
                *observed = Some((seen, Instant::now()));
                false
            }
        }
    }

    /// Gives the Lease up (on graceful shutdown), so a standby takes over at once.
    pub async fn release(&self) {
        let Ok(Some(mut lease)) = self.api.get_opt(&self.config.name).await else { return };
        let Some(spec) = lease.spec.as_mut() else { return };
        if spec.holder_identity.as_deref() != Some(self.config.identity.as_str()) {
            return;
        }
        spec.holder_identity = None;
        spec.renew_time = None;
        if let Err(e) = self.api.replace(&self.config.name, &PostParams::default(), &lease).await {
            tracing::warn!(error = %e, "could not release the leader Lease");
        }
    }

    /// Keeps trying to lead; publishes whether we lead on `tx`. Runs until the receiver is gone.
    pub async fn run(&self, tx: watch::Sender<bool>) {
        let mut last_renewed: Option<Instant> = None;
        loop {
            // An attempt may not outlast the renew deadline: the client retries 503s and 429s with backoff for
            // minutes, and a leader blocked in such a call must still step down in time.
            let limit = match last_renewed {
                Some(t) => self.config.renew_deadline.saturating_sub(t.elapsed()),
                None => self.config.lease_duration,
            };
            let attempt = tokio::time::timeout(limit, self.try_acquire_or_renew()).await;
            let leading = match attempt {
                Ok(Ok(true)) => {
                    last_renewed = Some(Instant::now());
                    true
                }
                Ok(Ok(false)) => false,
                failed => {
                    match failed {
                        Ok(Err(e)) => tracing::warn!(error = %e, "leader Lease check failed"),
                        _ => tracing::warn!(after = ?limit, "leader Lease check timed out"),
                    }
                    // Keep leading only while the last renewal is recent enough that nobody else can have taken over.
                    last_renewed.is_some_and(|t| t.elapsed() < self.config.renew_deadline)
                }
            };
            if !leading {
                last_renewed = None;
            }
            if *tx.borrow() != leading {
                tracing::info!(identity = %self.config.identity, leading, "leadership changed");
            }
            if tx.send(leading).is_err() {
                return;
            }
            tokio::time::sleep(self.config.retry_period).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn client(server: &kube_test_server::KubeTestServer) -> kube::Client {
        let kc = kube::config::Kubeconfig::from_yaml(&server.kubeconfig_yaml()).expect("kubeconfig");
        let config = kube::Config::from_custom_kubeconfig(kc, &Default::default()).await.expect("config");
        kube::Client::try_from(config).expect("client")
    }

    fn lock(client: kube::Client, identity: &str) -> Arc<LeaseLock> {
        Arc::new(LeaseLock::new(
            client,
            LeaseConfig {
                namespace: "default".into(),
                name: "kubetoken-controller".into(),
                identity: identity.into(),
                lease_duration: Duration::from_secs(3),
                renew_deadline: Duration::from_secs(2),
                retry_period: Duration::from_millis(200),
            },
        ))
    }

    use std::sync::Arc;

    /// Waits until `rx` says `leading`; returns how long that took.
    async fn until(rx: &mut watch::Receiver<bool>, leading: bool) -> Duration {
        let started = Instant::now();
        tokio::time::timeout(Duration::from_secs(30), rx.wait_for(|l| *l == leading))
            .await
            .expect("in time")
            .expect("running");
        started.elapsed()
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_leader_that_cannot_renew_steps_down_at_the_renew_deadline() {
        let server = kube_test_server::KubeTestServer::start();
        let leader = lock(client(&server).await, "a");
        let (tx, mut rx) = watch::channel(false);
        let task = tokio::spawn({
            let leader = leader.clone();
            async move { leader.run(tx).await }
        });
        until(&mut rx, true).await;
        // Every request fails from now on: the leader keeps leading while its last renewal is recent, then steps
        // down at the renew deadline (2 s), before the lease (3 s) could let anyone else in.
        server.fail_next(u32::MAX, 503);
        let stepped_down = until(&mut rx, false).await;
        assert!(stepped_down >= Duration::from_millis(1500), "stepped down after {stepped_down:?}: too early");
        assert!(stepped_down < Duration::from_secs(3), "stepped down after {stepped_down:?}: past the lease");
        task.abort();
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_standby_takes_over_only_after_seeing_the_lease_unrenewed_for_its_duration() {
        let server = kube_test_server::KubeTestServer::start();
        let client = client(&server).await;
        let (a, b) = (lock(client.clone(), "a"), lock(client.clone(), "b"));
        assert!(a.try_acquire_or_renew().await.expect("a"), "a acquires a free Lease");
        // While a renews, b never gets in, however long it watches.
        let watching = Instant::now();
        let mut stopped = Instant::now();
        while watching.elapsed() < Duration::from_secs(4) {
            assert!(a.try_acquire_or_renew().await.expect("renew"));
            stopped = Instant::now();
            assert!(!b.try_acquire_or_renew().await.expect("b"), "b took a Lease that was being renewed");
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
        // a stops renewing (killed) after its last renewal at `stopped`: b takes over once it has seen that
        // renewTime unchanged for the lease duration, and not before.
        while !b.try_acquire_or_renew().await.expect("b") {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let took = stopped.elapsed();
        assert!(took >= Duration::from_secs(3), "took over after {took:?}, before the lease could expire");
        assert!(!a.try_acquire_or_renew().await.expect("a"), "a lost the Lease to b");
    }

    /// The holder's clock is far behind (its renewTime looks ancient): what counts is that the renewTime keeps
    /// changing, so a standby never takes over a Lease that is being renewed.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_holder_with_a_skewed_clock_keeps_its_lease_while_it_renews() {
        let server = kube_test_server::KubeTestServer::start();
        let client = client(&server).await;
        let api: Api<Lease> = Api::namespaced(client.clone(), "default");
        let b = lock(client, "b");
        let skewed = |n: i64| {
            let t = Timestamp::now() - k8s_openapi::jiff::SignedDuration::from_hours(24 * 365)
                + k8s_openapi::jiff::SignedDuration::from_secs(n);
            serde_json::json!({
                "metadata": {"name": "kubetoken-controller"},
                "spec": {"holderIdentity": "skewed", "leaseDurationSeconds": 3, "renewTime": MicroTime(t)},
            })
        };
        let lease: Lease = serde_json::from_value(skewed(0)).expect("lease");
        api.create(&PostParams::default(), &lease).await.expect("create");
        for n in 1..=20 {
            assert!(!b.try_acquire_or_renew().await.expect("b"), "b took over a renewed Lease (round {n})");
            let patch = kube::api::Patch::Merge(skewed(n));
            api.patch("kubetoken-controller", &kube::api::PatchParams::default(), &patch).await.expect("renew");
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }
}

//! The adapter against the Kubernetes test server, in process: several stores of one application, the ring of
//! segments going round, snapshots, and compactions that race or are abandoned.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::ConfigMap;
use kube::api::{Api, ObjectMeta, Patch, PatchParams, PostParams};
use kube_test_server::KubeTestServer;
use serde_json::json;

use super::{KubeStore, KubeStoreMetrics, KubeStoreOptions, layout};
use crate::core::clock::SystemClock;
use crate::core::model::{Change, LivePair, RefreshGrant, Subject, TokenId, TokenKey};
use crate::core::scope::ScopeSet;
use crate::core::store::{StoreError, TokenStore};
use crate::metrics::Histogram;

const NS: &str = "apps";

async fn state_objects(server: &KubeTestServer) -> Api<ConfigMap> {
    let kc = kube::config::Kubeconfig::read_from(server.kubeconfig_path()).expect("kubeconfig");
    let config = kube::Config::from_custom_kubeconfig(kc, &Default::default()).await.expect("config");
    let api: Api<ConfigMap> = Api::namespaced(kube::Client::try_from(config).expect("client"), NS);
    for name in layout::object_names("shop") {
        let cm = ConfigMap {
            metadata: ObjectMeta { name: Some(name.clone()), ..ObjectMeta::default() },
            data: Some(layout::empty_object("shop", &name)),
            ..ConfigMap::default()
        };
        api.create(&PostParams::default(), &cm).await.expect("create");
    }
    api
}

fn tiny() -> KubeStoreOptions {
    KubeStoreOptions {
        writes_per_second: 500.0,
        segment_bytes: 600,
        commit_timeout: Duration::from_secs(5),
        claim_timeout: Duration::from_secs(1),
        ..KubeStoreOptions::default()
    }
}

async fn started(api: &Api<ConfigMap>, options: KubeStoreOptions) -> (KubeStore, tokio::task::JoinHandle<()>) {
    let metrics = Arc::new(KubeStoreMetrics::new(Arc::new(Histogram::new(&[1.0]))));
    let store = KubeStore::new(api.clone(), "shop", Arc::new(SystemClock), options, metrics);
    let task = tokio::spawn(store.clone().run());
    let start = Instant::now();
    while !store.loaded() {
        assert!(start.elapsed() < Duration::from_secs(10), "the store did not load");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    (store, task)
}

fn key(n: usize) -> TokenKey {
    TokenKey {
        client_id: "shop-client".into(),
        subject: Subject::User(format!("user{}", n % 40)),
        scopes: ScopeSet::parse(&format!("device_d{} orders:read", n % 3)).expect("scopes"),
    }
}

fn pair(n: usize) -> LivePair {
    let mut id = [0u8; 16];
    id[..8].copy_from_slice(&(n as u64 + 1).to_le_bytes());
    let mut refresh = id;
    refresh[15] = 0xff;
    LivePair {
        access_id: TokenId(id),
        access_scopes: key(n).scopes,
        issued_at: 1,
        access_expires_at: u64::MAX / 4,
        refresh: Some(RefreshGrant { id: TokenId(refresh), expires_at: u64::MAX / 4, ..Default::default() }),
    }
}

/// Sets key(n)'s pair to pair(n) through `store`, deciding again on conflicts as the core does.
async fn issue(store: &KubeStore, n: usize) {
    for _ in 0..200 {
        let change = Change { key: key(n), expect: store.pair(&key(n)).map(|p| p.access_id), next: Some(pair(n)) };
        match store.commit(change).await {
            Ok(()) => return,
            Err(StoreError::Conflict) => tokio::time::sleep(Duration::from_millis(2)).await,
            Err(e) => panic!("commit {n}: {e}"),
        }
    }
    panic!("commit {n} kept conflicting");
}

async fn pointer(api: &Api<ConfigMap>) -> std::collections::BTreeMap<String, String> {
    api.get(&layout::pointer_name("shop")).await.expect("pointer").data.unwrap_or_default()
}

/// Every key's pair at `store` is the last one issued, once the watch has delivered the other replicas' writes.
async fn assert_holds(store: &KubeStore, last: &HashMap<TokenKey, usize>, who: &str) {
    let start = Instant::now();
    while last.iter().any(|(k, n)| store.pair(k) != Some(pair(*n))) && start.elapsed() < Duration::from_secs(5) {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    for (k, n) in last {
        assert_eq!(store.pair(k), Some(pair(*n)), "{who}: {k:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_replicas_go_round_the_ring_through_snapshots_and_a_fresh_one_loads_the_same_state() {
    let server = KubeTestServer::start();
    let api = state_objects(&server).await;
    let (a, _ta) = started(&api, tiny()).await;
    let (b, _tb) = started(&api, tiny()).await;
    let mut last = HashMap::new();
    // 120 keys, 600 issues alternating between the replicas: each key is superseded several times, at both.
    for n in 0..600 {
        issue(if n % 2 == 0 { &a } else { &b }, n % 120).await;
        last.insert(key(n % 120), n % 120);
    }
    for s in [&a, &b] {
        s.sync().await.expect("sync");
    }
    let snapshots = a.metrics().compactions.load(std::sync::atomic::Ordering::Relaxed)
        + b.metrics().compactions.load(std::sync::atomic::Ordering::Relaxed);
    assert!(snapshots >= 2, "the ring was compacted repeatedly: {snapshots} snapshots");
    let first = api.get(&layout::segment_name("shop", 0)).await.expect("segment").data.unwrap_or_default();
    assert!(first["epoch"].parse::<u64>().expect("epoch") > 1, "the first segment was reused");
    let p = pointer(&api).await;
    assert!(!p.contains_key("claim"), "no claim left behind: {p:?}");
    let (fresh, _tf) = started(&api, tiny()).await;
    assert_holds(&fresh, &last, "a fresh replica").await;
    assert_holds(&a, &last, "replica a").await;
    assert_holds(&b, &last, "replica b").await;
}

/// Puts another replica's claim on the snapshot pointer, as a replica does when it starts writing a snapshot.
async fn put_claim(api: &Api<ConfigMap>, claim: &str) {
    let body = json!({"data": {"claim": claim}});
    api.patch(&layout::pointer_name("shop"), &PatchParams::default(), &Patch::Merge(&body)).await.expect("claim");
}

/// While another replica's snapshot claim stands, this replica does not read the pointer after every append: at
/// most about once per `CLAIM_RECHECK_INTERVAL`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_standing_claim_is_rechecked_about_once_a_second_not_after_every_append() {
    let server = KubeTestServer::start();
    let api = state_objects(&server).await;
    put_claim(&api, "busy-replica").await;
    let options = KubeStoreOptions { claim_timeout: Duration::from_secs(600), ..tiny() };
    let (a, _ta) = started(&api, options).await;
    server.clear_requests();
    let pointer_path = format!("/api/v1/namespaces/{NS}/configmaps/{}", layout::pointer_name("shop"));
    let pointer_reads = || server.requests().iter().filter(|r| r.method == "GET" && r.path == pointer_path).count();
    // Appends until the compaction threshold (12 of 16 tiny segments) is passed and a compaction finds the claim.
    let mut n = 0;
    while pointer_reads() == 0 {
        issue(&a, n % 60).await;
        n += 1;
        assert!(n < 300, "the compaction threshold was never reached");
    }
    // Ten more appends (the ring's last four segments hold more), each of which used to read the pointer again.
    let (before, start) = (pointer_reads(), Instant::now());
    for _ in 0..10 {
        issue(&a, n % 60).await;
        n += 1;
    }
    let (reads, elapsed) = (pointer_reads() - before, start.elapsed());
    assert_eq!(a.metrics().journal_full.load(std::sync::atomic::Ordering::Relaxed), 0, "the ring filled up");
    let allowed = 1 + elapsed.as_secs() as usize;
    assert!(reads <= allowed, "{reads} reads of the pointer in {elapsed:?} of 10 appends (at most {allowed} expected)");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_abandoned_claim_is_taken_over_and_a_compaction_that_meets_a_rival_write_gives_up_cleanly() {
    let server = KubeTestServer::start();
    let api = state_objects(&server).await;
    // A replica claimed the pointer and died.
    put_claim(&api, "dead-replica").await;
    // And the first chunk write of the next compaction meets a rival write (a 409), so that one gives up.
    let chunk = format!("/api/v1/namespaces/{NS}/configmaps/{}", layout::chunk_name("shop", 1, 0));
    server.conflict_next_writes(&chunk, 1);
    let (a, _ta) = started(&api, tiny()).await;
    let mut last = HashMap::new();
    let start = Instant::now();
    for n in 0..400 {
        issue(&a, n % 60).await;
        last.insert(key(n % 60), n % 60);
    }
    a.sync().await.expect("sync");
    assert!(start.elapsed() > Duration::from_secs(1), "the abandoned claim held compaction for its timeout");
    assert_eq!(server.pending_conflicts(), 0, "the compaction met the rival chunk write");
    assert!(a.metrics().compactions.load(std::sync::atomic::Ordering::Relaxed) >= 1, "a later compaction completed");
    let p = pointer(&api).await;
    assert!(!p.contains_key("claim"), "the abandoned claim was taken over and released: {p:?}");
    assert_ne!(p["gen"], "", "a snapshot was switched in");
    let (fresh, _tf) = started(&api, tiny()).await;
    assert_holds(&fresh, &last, "a fresh replica").await;
}

/// A change whose request gave up while it waited for room in the journal is withdrawn: it is not in the view, it
/// is never written later, and the same decision made again once the journal has room succeeds. (Before, it stayed
/// queued and in the overlay: a client retrying a refresh that got 503 met its own rotation, as reuse.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_change_whose_commit_timed_out_is_withdrawn_and_the_retry_is_decided_on_the_confirmed_state() {
    let server = KubeTestServer::start();
    let api = state_objects(&server).await;
    // Another replica holds the snapshot claim, so no compaction frees the ring: it fills up.
    put_claim(&api, "busy-replica").await;
    let options = KubeStoreOptions {
        commit_timeout: Duration::from_millis(300),
        claim_timeout: Duration::from_secs(600),
        ..tiny()
    };
    let (a, _ta) = started(&api, options).await;
    let commit = |n: usize, next: LivePair| {
        let change = Change { key: key(n), expect: a.pair(&key(n)).map(|p| p.access_id), next: Some(next) };
        a.commit(change)
    };
    let mut n = 0;
    loop {
        match commit(n % 60, pair(n)).await {
            Ok(()) => n += 1,
            Err(StoreError::Unavailable(_)) => break,
            Err(e) => panic!("commit {n}: {e}"),
        }
        assert!(n < 1000, "the journal never filled");
    }
    // The change that timed out is not in the view: the confirmed pair is.
    let k = n % 60;
    let confirmed = a.pair(&key(k));
    assert_ne!(confirmed.as_ref(), Some(&pair(n)), "the refused change is withdrawn from the overlay");
    assert!(a.find_access(&pair(n).access_id).is_none());
    // Room again: the claim goes, compaction frees segments. The same decision, made again on the confirmed pair,
    // succeeds; the withdrawn one was never written.
    put_claim(&api, "").await;
    let retry = LivePair { access_id: TokenId([0xEE; 16]), ..pair(n) };
    let start = Instant::now();
    loop {
        let change = Change { key: key(k), expect: confirmed.as_ref().map(|p| p.access_id), next: Some(retry.clone()) };
        match a.commit(change).await {
            Ok(()) => break,
            Err(StoreError::Unavailable(_)) if start.elapsed() < Duration::from_secs(20) => {
                tokio::time::sleep(Duration::from_millis(100)).await
            }
            Err(e) => panic!("the retry on the confirmed pair: {e}"),
        }
    }
    a.sync().await.expect("sync");
    let (fresh, _tf) = started(&api, tiny()).await;
    assert_eq!(fresh.pair(&key(k)), Some(retry));
    assert!(fresh.find_access(&pair(n).access_id).is_none(), "the withdrawn change never reached the journal");
}

/// At its capacity the state refuses a change that adds a key, at once and saying why; replacing a key's pair and
/// revoking go on, and a revocation makes room again. The capacity and live keys are in the metrics.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_state_refuses_new_keys_at_once_and_existing_keys_keep_working() {
    let server = KubeTestServer::start();
    let api = state_objects(&server).await;
    // 3,000 bytes at the assumed 72 bytes per key: room for 40 keys.
    let (a, _ta) = started(&api, KubeStoreOptions { snapshot_capacity_bytes: 3000, ..tiny() }).await;
    let add = |n: usize| a.commit(Change { key: key(n), expect: None, next: Some(pair(n)) });
    for n in 0..40 {
        add(n).await.expect("room for 40 keys");
    }
    let start = Instant::now();
    let refused = add(40).await;
    assert!(matches!(&refused, Err(StoreError::Full(why)) if why.contains("40 live token keys")), "{refused:?}");
    assert!(start.elapsed() < Duration::from_millis(500), "refused at once, not after a timeout");
    assert!(a.pair(&key(40)).is_none());
    let m = a.metrics();
    assert_eq!(m.live_keys.load(std::sync::atomic::Ordering::Relaxed), 40);
    assert_eq!(m.capacity_keys.load(std::sync::atomic::Ordering::Relaxed), 40);
    assert_eq!(m.full_refusals.load(std::sync::atomic::Ordering::Relaxed), 1);
    // A refresh replaces a key's pair in place: still fine.
    let replaced = LivePair { access_id: TokenId([0xAB; 16]), ..pair(3) };
    a.commit(Change { key: key(3), expect: Some(pair(3).access_id), next: Some(replaced.clone()) })
        .await
        .expect("replacing a pair at capacity");
    // A revocation too, and it makes room for one new key.
    a.commit(Change { key: key(5), expect: Some(pair(5).access_id), next: None }).await.expect("revoking at capacity");
    add(40).await.expect("room again after a revocation");
    assert_eq!(a.pair(&key(3)), Some(replaced));
}

/// Through the token service: a refresh whose commit timed out (the journal full) answers 503, and the same refresh
/// token presented again once the store has room succeeds. Before, the timed-out rotation stayed queued, was written
/// later, and the retry met it as reuse: `invalid_grant` and the login revoked.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refresh_that_timed_out_succeeds_when_retried_once_the_store_recovers() {
    use crate::core::app::{Application, ApplicationConfig, GrantType, PasswordDigest, Registry, TokenFormat, User};
    use crate::core::scope::ScopePolicy;
    use crate::core::service::{ClientCredentials, Grant, TokenService};
    use crate::core::signing::{Algorithm, SigningKey};

    let server = KubeTestServer::start();
    let api = state_objects(&server).await;
    let options = KubeStoreOptions {
        commit_timeout: Duration::from_millis(300),
        claim_timeout: Duration::from_secs(600),
        ..tiny()
    };
    let (store, _task) = started(&api, options).await;
    let signer = Arc::new(
        SigningKey::from_pkcs8(Algorithm::EdDSA, &SigningKey::generate_pkcs8(Algorithm::EdDSA).expect("key"))
            .expect("parse"),
    );
    let digest = PasswordDigest::parse(&bcrypt::hash("pw", 4).expect("hash")).expect("digest");
    let app = Application::new(ApplicationConfig {
        trusted_issuers: Vec::new(),
        name: "apps/shop".into(),
        client_id: "shop-client".into(),
        client_secrets: vec!["s3cret".into()],
        grant_types: vec![GrantType::Password, GrantType::RefreshToken],
        format: TokenFormat::Jwt,
        access_ttl: 3600,
        refresh_ttl: 86_400,
        session_max: None,
        max_keys_per_user: 100,
        audience: vec![],
        client_roles: vec![],
        scopes: ScopePolicy::new([]),
        users: HashMap::from([("alice".to_string(), User { digest, roles: vec![] })]),
        signer,
        verification_keys: vec![],
        token_secrets: vec![vec![7; 32]],
    });
    let service = TokenService::new(
        Registry::new(vec![app]).expect("registry"),
        Arc::new(store.clone()),
        Arc::new(SystemClock),
        crate::passwords::service_config("https://issuer.test", Default::default()),
    );
    let creds = ClientCredentials { client_id: "shop-client".into(), client_secret: "s3cret".into() };
    let login = Grant::Password { username: "alice".into(), password: "pw".into(), scope: Some("device_ipad".into()) };
    let refresh_token = service.token(&creds, login).await.expect("login").refresh_token.expect("refresh token");
    let refresh = || Grant::RefreshToken { refresh_token: refresh_token.clone(), scope: None };

    // Another replica holds the snapshot claim: the ring fills up, and the refresh's commit times out.
    put_claim(&api, "busy-replica").await;
    let mut n = 0;
    loop {
        let change =
            Change { key: key(n % 60), expect: store.pair(&key(n % 60)).map(|p| p.access_id), next: Some(pair(n)) };
        match store.commit(change).await {
            Ok(()) => n += 1,
            Err(StoreError::Unavailable(_)) => break,
            Err(e) => panic!("commit {n}: {e}"),
        }
        assert!(n < 1000, "the journal never filled");
    }
    let err = service.token(&creds, refresh()).await.expect_err("the journal is full");
    assert_eq!(err.code(), "temporarily_unavailable", "{err}");

    // Room again: the client retries the same refresh token, and gets its tokens.
    put_claim(&api, "").await;
    let start = Instant::now();
    let refreshed = loop {
        match service.token(&creds, refresh()).await {
            Ok(t) => break t,
            Err(e) if e.code() == "temporarily_unavailable" && start.elapsed() < Duration::from_secs(20) => {
                tokio::time::sleep(Duration::from_millis(100)).await
            }
            Err(e) => panic!("the retried refresh: {e}"),
        }
    };
    assert!(refreshed.refresh_token.is_some_and(|r| r != refresh_token), "rotated once");
}

/// A journal write whose answer does not come in time may still have landed. The store finds out (it fences the
/// segment's version, then reads it back) and answers the change as committed when it landed. Before, the
/// request got 503 while its change was in the journal: a client retrying a refresh met its own rotation as reuse.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_journal_write_that_timed_out_but_landed_is_answered_as_committed() {
    let server = KubeTestServer::start();
    let api = state_objects(&server).await;
    let options = KubeStoreOptions { commit_timeout: Duration::from_millis(300), ..tiny() };
    let (a, _ta) = started(&api, options).await;
    a.commit(Change { key: key(1), expect: None, next: Some(pair(1)) }).await.expect("first");
    server.answer_late(&format!("/api/v1/namespaces/{NS}/configmaps/shop-tokens-journal"), 1, Duration::from_secs(2));
    let next = LivePair { access_id: TokenId([0xAA; 16]), ..pair(2) };
    let landed = a.commit(Change { key: key(1), expect: Some(pair(1).access_id), next: Some(next.clone()) }).await;
    assert_eq!(landed, Ok(()), "the write landed: its request is answered as committed");
    assert_eq!(a.pair(&key(1)), Some(next.clone()));
    // The store goes on: the next change on the key expects the landed pair.
    let after = LivePair { access_id: TokenId([0xAB; 16]), ..pair(3) };
    a.commit(Change { key: key(1), expect: Some(next.access_id), next: Some(after.clone()) }).await.expect("after");
    let (fresh, _tf) = started(&api, tiny()).await;
    assert_eq!(fresh.pair(&key(1)), Some(after.clone()));
    // The same when the API server applied the write but answered 504 (its etcd call timed out).
    server.fail_after_applying(&format!("/api/v1/namespaces/{NS}/configmaps/shop-tokens-journal"), 1, 504);
    let last = LivePair { access_id: TokenId([0xAC; 16]), ..pair(4) };
    let landed = a.commit(Change { key: key(1), expect: Some(after.access_id), next: Some(last.clone()) }).await;
    assert_eq!(landed, Ok(()), "a 504 for a write that landed is answered as committed");
    assert_eq!(a.pair(&key(1)), Some(last));
}

/// A trusted issuer's assertion used at one replica is refused at the other once the first use's journal batch has
/// reached it; the memory is per assertion, and an expired use no longer refuses.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_assertion_used_at_one_replica_is_refused_at_the_other_once_its_batch_arrived() {
    let server = KubeTestServer::start();
    let api = state_objects(&server).await;
    let (a, _ta) = started(&api, tiny()).await;
    let (b, _tb) = started(&api, tiny()).await;
    let far = crate::core::clock::Clock::now(&SystemClock) + 300;
    assert!(a.remember_assertion("shop", "https://idp\0jti:1", far).await.expect("first use"));
    assert!(!a.remember_assertion("shop", "https://idp\0jti:1", far).await.expect("at the same replica"));
    // A token change made at a after the use: once b holds it, b has read the batch the use went with (or an
    // earlier one). Until then b is not asked, so that its own memory does not answer for it.
    issue(&a, 7).await;
    let start = Instant::now();
    while b.pair(&key(7)).is_none() {
        assert!(start.elapsed() < Duration::from_secs(10), "a's batch never reached b");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(!b.remember_assertion("shop", "https://idp\0jti:1", far).await.expect("refused at b"));
    assert!(b.remember_assertion("shop", "https://idp\0jti:2", far).await.expect("another assertion"));
    let past = crate::core::clock::Clock::now(&SystemClock) - 1;
    assert!(a.remember_assertion("shop", "https://idp\0jti:old", past).await.expect("expired"));
    assert!(a.remember_assertion("shop", "https://idp\0jti:old", past + 600).await.expect("expired: no replay"));
}

/// A use that no token change follows (an opaque application handing out a live pair again writes nothing) still
/// reaches the other replica; a use forgotten before its batch went out is not shared, and is accepted again here.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_use_alone_is_shared_and_a_forgotten_one_is_not() {
    let server = KubeTestServer::start();
    let api = state_objects(&server).await;
    let (a, _ta) = started(&api, tiny()).await;
    let (b, _tb) = started(&api, tiny()).await;
    let now = crate::core::clock::Clock::now(&SystemClock);
    assert!(a.remember_assertion("shop", "https://idp\0jti:alone", now + 300).await.expect("use"));
    let start = Instant::now();
    while !b.shared.lock().used_seen.live(&super::used_digest("https://idp\0jti:alone"), now) {
        assert!(start.elapsed() < Duration::from_secs(10), "a use with no token change was never shared");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(!b.remember_assertion("shop", "https://idp\0jti:alone", now + 300).await.expect("replay at b"));
    // Forgotten (its grant failed on the server's side): the retry is accepted.
    assert!(a.remember_assertion("shop", "https://idp\0jti:retry", now + 300).await.expect("use"));
    a.forget_assertion("shop", "https://idp\0jti:retry").await.expect("forget");
    assert!(a.remember_assertion("shop", "https://idp\0jti:retry", now + 300).await.expect("the retry"));
}

#[test]
fn the_used_assertion_memory_stays_bounded_and_sweeps_when_full() {
    let mut m = super::UsedAssertions { now: 10, ..Default::default() };
    let digest = |i: usize| {
        let mut d = [0u8; 32];
        d[..8].copy_from_slice(&(i as u64).to_le_bytes());
        d
    };
    for i in 0..super::UsedAssertions::MAX + 10 {
        m.insert(digest(i), 20);
    }
    assert_eq!(m.until.len(), super::UsedAssertions::MAX, "bounded");
    assert!(!m.live(&digest(super::UsedAssertions::MAX + 5), 10), "past the bound a use is not remembered");
    // Once they expired, the full memory is swept and takes new uses again.
    m.now = 30;
    m.insert(digest(usize::MAX), 100);
    assert!(m.live(&digest(usize::MAX), 30));
    assert_eq!(m.until.len(), 1);
}

//! What token state costs per live key at the default lifetimes, and how many keys the ConfigMap store holds:
//! `cargo bench --bench capacity` (150,000 keys; `--keys N` for another count, `--per-hour N` for N refreshes of
//! every key per hour instead of one, 0 for none).
//!
//! Seeds the keys as password logins leave them (one per user and device: 30,000 users with five devices each, an
//! access and a refresh token), then simulates a day in which every key refreshes hourly through the token service
//! (JWT, rotating refresh tokens; a manual clock, no sleeping). After seeding and after each simulated hour it
//! reports the state's entries, its snapshot in the ConfigMap store's binary form (bytes per key, and the keys the
//! 16 snapshot chunks hold at that size) and the process's RSS per key. The signing algorithm is EdDSA (the fastest
//! to sign; what is stored does not depend on it).
//!
//! `cargo test --bench capacity -- --smoke` (CI): 2,000 keys, three hours; asserts that refreshing leaves the state
//! as large as it was.

// The shared benchmark code; this benchmark uses its application configuration only.
#[allow(dead_code)]
mod support;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Instant;

use kubetoken::core::app::{Application, ApplicationConfig, GrantType, PasswordDigest, Registry, User};
use kubetoken::core::clock::{ManualClock, UnixTime};
use kubetoken::core::model::{LivePair, RefreshGrant, Subject, TokenId, TokenKey};
use kubetoken::core::scope::{ScopePolicy, ScopeSet};
use kubetoken::core::service::{ClientCredentials, Grant, TokenService};
use kubetoken::core::signing::{Algorithm, SigningKey};
use kubetoken::core::state::Record;
use kubetoken::core::store::MemoryStore;
use kubetoken::core::tokens::OpaqueTokens;
use kubetoken::storage::kube_store::{codec, layout};

const T0: UnixTime = 1_800_000_000;
const DEVICES: usize = 5;

fn rss_bytes() -> usize {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:")?.trim().trim_end_matches(" kB").trim().parse::<usize>().ok())
        .unwrap_or(0)
        * 1024
}

fn username(user: usize) -> String {
    format!("customer{user:06}@example.com")
}

fn key(n: usize) -> TokenKey {
    TokenKey {
        client_id: "shop".into(),
        subject: Subject::User(username(n / DEVICES)),
        scopes: ScopeSet::parse(&format!("device_d{} orders:read", n % DEVICES)).expect("scopes"),
    }
}

fn id(n: usize, kind: u8) -> TokenId {
    let mut raw = [kind; 16];
    raw[..8].copy_from_slice(&(n as u64).to_le_bytes());
    TokenId(raw)
}

/// Snapshot bytes of the state, encoded as the ConfigMap store writes its snapshot chunks.
fn snapshot_bytes(store: &MemoryStore) -> (usize, usize) {
    store.with_state(|s| {
        let mut encoder = codec::Encoder::in_pieces(layout::CHUNK_BYTES);
        for r in s.snapshot() {
            encoder.push(&r);
        }
        (s.entries(), encoder.total_len())
    })
}

struct Row {
    entries: usize,
    bytes: usize,
    rss: usize,
}

fn report(label: &str, keys: usize, row: &Row) {
    let per_key = row.bytes as f64 / keys as f64;
    let capacity = (layout::CHUNK_BYTES * layout::CHUNKS_PER_SET) as f64 / per_key;
    println!("| {label} | {} | {:.1} | {:.0} | {:.0} |", row.entries, per_key, capacity, row.rss as f64 / keys as f64);
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let smoke = args.iter().any(|a| a == "--smoke");
    let keys: usize = args
        .iter()
        .position(|a| a == "--keys")
        .and_then(|i| args.get(i + 1)?.parse().ok())
        .unwrap_or(if smoke { 2_000 } else { 150_000 });
    let hours = if smoke { 3 } else { 24 };
    let per_hour: u64 =
        args.iter().position(|a| a == "--per-hour").and_then(|i| args.get(i + 1)?.parse().ok()).unwrap_or(1);
    let users = keys.div_ceil(DEVICES);

    // The application: users with a (cheap) bcrypt hash each, refresh allowed, the default lifetimes.
    let digest = PasswordDigest::parse(&bcrypt::hash("pw", 4).expect("hash")).expect("digest");
    let user_table: HashMap<String, User> =
        (0..users).map(|u| (username(u), User { digest: digest.clone(), roles: vec!["customer".into()] })).collect();
    let signer = Arc::new(
        SigningKey::from_pkcs8(Algorithm::EdDSA, &SigningKey::generate_pkcs8(Algorithm::EdDSA).expect("key"))
            .expect("parse"),
    );
    let app = Application::new(ApplicationConfig {
        grant_types: vec![GrantType::Password, GrantType::RefreshToken],
        scopes: ScopePolicy::new([("orders:read".to_string(), vec!["customer".to_string()])]),
        users: user_table,
        ..support::app_config("shop", "shop-secret", signer)
    });
    let clock = Arc::new(ManualClock::new(T0));
    let store = Arc::new(MemoryStore::default());
    let service = TokenService::new(
        Registry::new(vec![app]).expect("registry"),
        store.clone(),
        clock.clone(),
        kubetoken::passwords::service_config("http://127.0.0.1:8080", Default::default()),
    );
    let creds = ClientCredentials { client_id: "shop".into(), client_secret: "shop-secret".into() };
    let strings = OpaqueTokens::new(&[support::TOKEN_SECRET]);
    // Every key's current refresh token, in memory allocated before the baseline so that it is not counted.
    let mut tokens: Vec<String> = (0..keys).map(|_| String::with_capacity(64)).collect();
    let runtime = tokio::runtime::Builder::new_current_thread().build().expect("runtime");

    let baseline = rss_bytes();
    // Seed: what a login leaves for each key.
    store.with_state(|s| {
        for n in 0..keys {
            let pair = LivePair {
                access_id: id(n, 0),
                access_scopes: key(n).scopes,
                issued_at: T0,
                access_expires_at: T0 + 3600,
                refresh: Some(RefreshGrant {
                    id: id(n, 1),
                    expires_at: T0 + 86_400,
                    generation: 0,
                    session_started_at: T0,
                }),
            };
            s.apply(Record::Set { k: key(n), p: Some(pair) });
        }
    });
    for (n, t) in tokens.iter_mut().enumerate() {
        t.push_str(&strings.encode_refresh(&id(n, 1), 0));
    }
    println!("{keys} keys ({users} users, {DEVICES} devices each), default lifetimes (1 h access, 24 h refresh)\n");
    println!("| after | entries | snapshot bytes per key | keys in 16 chunks at that size | RSS bytes per key |");
    println!("|---|---|---|---|---|");
    let measure = || {
        let (entries, bytes) = snapshot_bytes(&store);
        Row { entries, bytes, rss: rss_bytes().saturating_sub(baseline) }
    };
    let seeded = measure();
    report("seeding", keys, &seeded);
    let seeded_bytes = seeded.bytes;
    let start = Instant::now();
    let mut last = seeded;
    let rounds = hours * per_hour as usize;
    for round in 1..=rounds {
        clock.advance(3600 / per_hour);
        for t in tokens.iter_mut() {
            let grant = Grant::RefreshToken { refresh_token: std::mem::take(t), scope: None };
            let issued = runtime.block_on(service.token(&creds, grant)).expect("refresh");
            *t = issued.refresh_token.expect("a rotated refresh token");
        }
        let hour = round as u64 / per_hour;
        if (round as u64).is_multiple_of(per_hour) && (hour.is_multiple_of(6) || hour == hours as u64) {
            last = measure();
            report(&format!("{hour} h of refreshes, {per_hour} per hour"), keys, &last);
        }
    }
    let refreshes = keys * rounds;
    println!(
        "\n{refreshes} refreshes in {:.1} s ({:.0}/s on one core)",
        start.elapsed().as_secs_f64(),
        refreshes as f64 / start.elapsed().as_secs_f64()
    );
    assert_eq!(last.entries, keys, "one entry per key, however often it refreshed");
    // A generation takes a second byte only from the 128th rotation on, a third from the 16,384th; times keep their
    // size.
    assert!(last.bytes <= seeded_bytes + keys, "the state grew: {seeded_bytes} bytes seeded, {} after", last.bytes);
}

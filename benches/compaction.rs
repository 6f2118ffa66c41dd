//! Standalone compaction under load: `cargo bench --bench compaction`.
//!
//! The token service with its durable file store (fsync per batch, in `CARGO_TARGET_TMPDIR`, so on the build's
//! disk) holds a ballast of live keys (100,000 by default), then serves client_credentials grants from 64
//! concurrent tasks on a two-worker runtime, each request superseding its key's last token. Two phases:
//! - `no compaction`: the store never compacts;
//! - `compaction`: it compacts whenever the log holds twice the live entries (the default is four times, and at least
//!   200,000 records), so that several compactions run during the phase.
//!
//! For each phase it prints throughput and latency percentiles, and for the second also the latency of the requests
//! that overlapped a compaction (a compaction had started before the request ended and had not completed before it
//! began). Issue 9 point 16 asks that this p99 stay within 2x of the p99 without compaction.
//!
//! `BALLAST=20000 DURATION=10 cargo bench --bench compaction` changes the sizes; `-- --smoke` (CI) runs each phase
//! for a second on a small ballast and checks only that every request succeeded and a compaction completed.

mod support;

use std::sync::Arc;
use std::time::{Duration, Instant};

use kubetoken::core::clock::SystemClock;
use kubetoken::core::service::{Grant, TokenService};
use kubetoken::core::signing::{Algorithm, SigningKey};
use kubetoken::metrics::Histogram;
use kubetoken::storage::file_store::{FileStore, FileStoreOptions};

const TASKS: usize = 64;
const KEYS_PER_TASK: usize = 8;

fn env_or(name: &str, default: usize) -> usize {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

fn service(store: Arc<FileStore>) -> TokenService {
    let alg = Algorithm::ES256;
    let key = Arc::new(SigningKey::from_pkcs8(alg, &SigningKey::generate_pkcs8(alg).expect("key")).expect("parse"));
    support::client_credentials_service(key, store)
}

async fn grant(service: &TokenService, scope: String) {
    let g = Grant::ClientCredentials { scope: Some(scope) };
    service.token(&support::credentials(), g).await.expect("token");
}

struct Phase {
    name: &'static str,
    latencies: Vec<Duration>,
    overlapped: Vec<Duration>,
    elapsed: Duration,
    compactions: u64,
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

fn ms(d: Duration) -> String {
    format!("{:.1}", d.as_secs_f64() * 1e3)
}

async fn run_phase(name: &'static str, options: FileStoreOptions, ballast: usize, duration: Duration) -> Phase {
    let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).expect("tempdir");
    let (store, _) = FileStore::open(dir.path(), Arc::new(SystemClock), Arc::new(Histogram::new(&[1.0])), options)
        .expect("open the store");
    let store = Arc::new(store);
    let service = Arc::new(service(store.clone()));

    // The ballast: one live key each, issued concurrently (group commit).
    let mut tasks = Vec::new();
    for t in 0..TASKS {
        let service = service.clone();
        tasks.push(tokio::spawn(async move {
            for i in (t..ballast).step_by(TASKS) {
                grant(&service, format!("device_b{i}")).await;
            }
        }));
    }
    for t in tasks {
        t.await.expect("ballast task");
    }

    let before = store.compactions();
    let start = Instant::now();
    let mut tasks = Vec::new();
    for t in 0..TASKS {
        let service = service.clone();
        let store = store.clone();
        tasks.push(tokio::spawn(async move {
            let mut all = Vec::new();
            let mut overlapped = Vec::new();
            let mut j = 0usize;
            while start.elapsed() < duration {
                let before = store.compactions();
                let ended_before = before.completed + before.failed;
                let began = Instant::now();
                grant(&service, format!("device_t{t}_{}", j % KEYS_PER_TASK)).await;
                let took = began.elapsed();
                let now = store.compactions();
                if now.started > ended_before {
                    overlapped.push(took);
                }
                all.push(took);
                j += 1;
            }
            (all, overlapped)
        }));
    }
    let mut latencies = Vec::new();
    let mut overlapped = Vec::new();
    for t in tasks {
        let (a, o) = t.await.expect("load task");
        latencies.extend(a);
        overlapped.extend(o);
    }
    let elapsed = start.elapsed();
    let compactions = store.compactions().completed - before.completed;
    latencies.sort();
    overlapped.sort();
    Phase { name, latencies, overlapped, elapsed, compactions }
}

fn main() {
    let smoke = std::env::args().any(|a| a == "--smoke");
    let ballast = env_or("BALLAST", if smoke { 2_000 } else { 100_000 });
    let duration = Duration::from_secs(env_or("DURATION", if smoke { 1 } else { 30 }) as u64);
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().expect("runtime");
    let never = FileStoreOptions { compact_min_records: usize::MAX, ..Default::default() };
    let often = FileStoreOptions { compact_min_records: 0, compact_live_ratio: 2 };
    let phases = runtime.block_on(async {
        vec![
            run_phase("no compaction", never, ballast, duration).await,
            run_phase("compaction", often, ballast, duration).await,
        ]
    });

    println!("ballast {ballast} live keys, {TASKS} concurrent requests, {} s per phase", duration.as_secs());
    println!("| phase | requests | tokens/s | compactions | p50 ms | p99 ms | max ms |");
    println!("|---|---|---|---|---|---|---|");
    for p in &phases {
        let rows = std::iter::once((p.name.to_string(), &p.latencies))
            .chain((p.compactions > 0).then(|| (format!("{}: requests overlapping one", p.name), &p.overlapped)));
        for (label, l) in rows {
            println!(
                "| {label} | {} | {:.0} | {} | {} | {} | {} |",
                l.len(),
                l.len() as f64 / p.elapsed.as_secs_f64(),
                p.compactions,
                ms(percentile(l, 0.5)),
                ms(percentile(l, 0.99)),
                ms(l.last().copied().unwrap_or_default()),
            );
        }
    }
    let base = percentile(&phases[0].latencies, 0.99);
    let during = percentile(&phases[1].overlapped, 0.99);
    println!(
        "p99 while compacting / p99 without compaction: {:.2} ({} / {} ms)",
        during.as_secs_f64() / base.as_secs_f64().max(1e-9),
        ms(during),
        ms(base)
    );
    if smoke {
        assert!(phases.iter().all(|p| !p.latencies.is_empty()), "a phase served no request");
        assert!(phases[1].compactions > 0, "no compaction completed in the compaction phase");
    }
}

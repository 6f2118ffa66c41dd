//! The in-cluster benchmark: two `kubetoken sidecar` replicas of one application against the in-repo Kubernetes
//! API test server, with the real controller, their token state in ConfigMaps and then in PostgreSQL (a durable
//! server started by the benchmark: fsync and synchronous commit on), in the same run on the same machine.
//!
//!   cargo bench --bench sidecar                 # full run (release build), about five minutes
//!   cargo test --bench sidecar -- --smoke       # CI: seconds on the debug build, asserts no errors only
//!
//! Reports, for each store: tokens/s and p50/p99 latency under load at 32 and 128 connections (client_credentials,
//! one device scope per client and round, so every request supersedes its key's previous token), what the store
//! wrote per token, and how long a token issued (or superseded) through one replica takes to be active (or
//! inactive) at the other. Then, for ConfigMaps, with 100,000 live token keys, the time a fresh sidecar needs to be
//! ready and its memory; for PostgreSQL the same at 10,000 and at 1,000,000 live keys, and the table's bytes per key.

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use base64::Engine;
use k8s_openapi::api::core::v1::{ConfigMap, Secret};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{Api, Patch, PatchParams, PostParams};
use kube_test_server::KubeTestServer;
use kubetoken::core::model::{LivePair, RefreshGrant, Subject, TokenId, TokenKey};
use kubetoken::core::scope::ScopeSet;
use kubetoken::core::state::Record;
use kubetoken::storage::kube_store::{codec, layout};
use serde_json::{Value, json};

#[allow(dead_code)]
#[path = "../tests/common/postgres.rs"]
mod postgres;

const BIN: &str = env!("CARGO_BIN_EXE_kubetoken");
const NS: &str = "bench";

struct Proc {
    child: Child,
    base: String,
    /// When the process was started.
    started: Instant,
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn spawn(kubeconfig: &std::path::Path, args: &[&str], banner: &str) -> Proc {
    let mut command = Command::new(BIN);
    command.args(args).env("KUBECONFIG", kubeconfig).env("KUBETOKEN_LOG", "warn");
    // As the image sets it (Dockerfile): glibc then returns the megabyte buffers of snapshot writes to the OS
    // instead of keeping them. KUBETOKEN_BENCH_GLIBC_DEFAULTS=1 leaves it unset, to compare.
    if std::env::var_os("KUBETOKEN_BENCH_GLIBC_DEFAULTS").is_none() {
        command.env("MALLOC_MMAP_THRESHOLD_", "131072");
    }
    let started = Instant::now();
    let mut child = command.stdout(Stdio::piped()).stderr(Stdio::inherit()).spawn().expect("spawn kubetoken");
    let mut lines = BufReader::new(child.stdout.take().expect("stdout")).lines();
    let base = loop {
        let line = lines.next().expect("kubetoken exited").expect("stdout");
        if let Some(url) = line.strip_prefix(banner) {
            break url.to_string();
        }
    };
    std::thread::spawn(move || lines.for_each(drop));
    Proc { child, base, started }
}

/// A sidecar of `shop`: its token state in ConfigMaps, or in the PostgreSQL database at `postgres`.
fn sidecar(kubeconfig: &std::path::Path, postgres: Option<&str>) -> Proc {
    let mut args = vec![
        "sidecar",
        "--application",
        "shop",
        "--namespace",
        NS,
        "--listen",
        "127.0.0.1:0",
        "--api-writes-per-second",
        "4.8",
    ];
    if let Some(url) = postgres {
        args.extend(["--postgres", url]);
    }
    spawn(kubeconfig, &args, "kubetoken sidecar listening on ")
}

/// What a load run measured.
struct Run {
    latencies: Vec<Duration>,
    errors: usize,
    elapsed: f64,
}

impl Run {
    fn tokens_per_second(&self) -> f64 {
        self.latencies.len() as f64 / self.elapsed
    }

    fn percentile_ms(&self, p: f64) -> f64 {
        percentile(&self.latencies, p).as_secs_f64() * 1e3
    }
}

/// `connections` clients over the replicas for `seconds`: each asks for its own 20 devices in turn, so every
/// request after the first 20 supersedes its key's last token. `tag` keeps runs' keys apart.
fn load(replicas: &[Proc], auth: &str, connections: usize, seconds: u64, tag: &str) -> Run {
    let started = Instant::now();
    let deadline = started + Duration::from_secs(seconds);
    let results: Vec<(Vec<Duration>, usize)> = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..connections)
            .map(|c| {
                let base = replicas[c % replicas.len()].base.clone();
                scope.spawn(move || {
                    let agent = ureq::AgentBuilder::new().timeout(Duration::from_secs(10)).build();
                    let (mut latencies, mut errors, mut i) = (Vec::new(), 0, 0);
                    while Instant::now() < deadline {
                        let t = Instant::now();
                        match token(&agent, &base, auth, &format!("device_{tag}c{c}d{}", i % 20)) {
                            Ok(v) if v["access_token"].is_string() => latencies.push(t.elapsed()),
                            _ => errors += 1,
                        }
                        i += 1;
                    }
                    (latencies, errors)
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().expect("client")).collect()
    });
    let elapsed = started.elapsed().as_secs_f64();
    let errors = results.iter().map(|r| r.1).sum();
    let mut latencies: Vec<Duration> = results.into_iter().flat_map(|r| r.0).collect();
    latencies.sort();
    assert!(!latencies.is_empty(), "no token issued ({errors} errors)");
    Run { latencies, errors, elapsed }
}

/// Issued through A, active at B; superseded through B, inactive at A: how long each takes to be seen, over
/// `samples` devices.
fn visibility(replicas: &[Proc; 2], auth: &str, samples: usize, tag: &str) {
    let (a, b) = (&replicas[0], &replicas[1]);
    let agent = ureq::agent();
    let mut issued = Vec::new();
    let mut superseded = Vec::new();
    for i in 0..samples {
        let scope = format!("device_{tag}visibility{i}");
        let first =
            token(&agent, &a.base, auth, &scope).expect("token")["access_token"].as_str().expect("t").to_string();
        issued.push(until("active at B", || active(&b.base, auth, &first)));
        token(&agent, &b.base, auth, &scope).expect("token");
        superseded.push(until("inactive at A", || !active(&a.base, auth, &first)));
    }
    issued.sort();
    superseded.sort();
    println!(
        "\n| visibility at the other replica ({samples} tokens) | median ms | p99 ms | max ms |\n|---|---|---|---|"
    );
    for (what, v) in [("a new token is active", &issued), ("a superseded token is inactive", &superseded)] {
        println!(
            "| {what} | {:.1} | {:.1} | {:.1} |",
            percentile(v, 0.5).as_secs_f64() * 1e3,
            percentile(v, 0.99).as_secs_f64() * 1e3,
            v[v.len() - 1].as_secs_f64() * 1e3
        );
    }
}

/// Waits until the process answers `/readyz` with 200; returns how long after its start that was.
fn wait_ready(p: &Proc) -> Duration {
    while ureq::get(&format!("{}/readyz", p.base)).call().is_err() {
        assert!(p.started.elapsed() < Duration::from_secs(120), "sidecar not ready");
        std::thread::sleep(Duration::from_millis(5));
    }
    p.started.elapsed()
}

fn metric(p: &Proc, name: &str) -> f64 {
    let text = ureq::get(&format!("{}/metrics", p.base)).call().expect("metrics").into_string().expect("text");
    text.lines().filter(|l| l.starts_with(name)).filter_map(|l| l.rsplit_once(' ')?.1.parse::<f64>().ok()).sum()
}

fn rss_kib(p: &Proc, field: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{}/status", p.child.id())).unwrap_or_default();
    status.lines().find_map(|l| l.strip_prefix(field)?.trim().trim_end_matches(" kB").trim().parse().ok()).unwrap_or(0)
}

fn basic(id: &str, secret: &str) -> String {
    format!("Basic {}", base64::engine::general_purpose::STANDARD.encode(format!("{id}:{secret}")))
}

fn token(agent: &ureq::Agent, base: &str, auth: &str, scope: &str) -> Result<Value, String> {
    agent
        .post(&format!("{base}/oauth2/token"))
        .set("Authorization", auth)
        .send_form(&[("grant_type", "client_credentials"), ("scope", scope)])
        .map_err(|e| e.to_string())?
        .into_json()
        .map_err(|e| e.to_string())
}

fn active(base: &str, auth: &str, token: &str) -> bool {
    let r: Value = ureq::post(&format!("{base}/oauth2/introspect"))
        .set("Authorization", auth)
        .send_form(&[("token", token)])
        .expect("introspect")
        .into_json()
        .expect("json");
    r["active"] == true
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() as f64 * p) as usize).min(sorted.len() - 1)]
}

/// Waits until `cond` holds; returns how long that took.
fn until(what: &str, mut cond: impl FnMut() -> bool) -> Duration {
    let start = Instant::now();
    while !cond() {
        assert!(start.elapsed() < Duration::from_secs(30), "timed out: {what}");
        std::thread::sleep(Duration::from_millis(1));
    }
    start.elapsed()
}

fn main() {
    let smoke = std::env::args().any(|a| a == "--smoke");
    let seconds = if smoke { 2 } else { 15 };
    let loads: &[usize] = if smoke { &[4] } else { &[32, 128] };
    let samples = if smoke { 3 } else { 200 };
    let live_keys = if smoke { 2_000 } else { 100_000 };
    let postgres_keys: &[i64] = if smoke { &[2_000] } else { &[10_000, 1_000_000] };
    let runtime = tokio::runtime::Runtime::new().expect("runtime");
    let server = KubeTestServer::start();
    let kubeconfig = server.kubeconfig_path().to_path_buf();
    let client = runtime.block_on(async {
        let kc = kube::config::Kubeconfig::read_from(&kubeconfig).expect("kubeconfig");
        kube::Client::try_from(kube::Config::from_custom_kubeconfig(kc, &Default::default()).await.expect("config"))
            .expect("client")
    });
    runtime.block_on(async {
        let crd: CustomResourceDefinition =
            serde_yaml::from_str(include_str!("../crds/oauthapplications.kubetoken.io.yaml")).expect("crd");
        Api::<CustomResourceDefinition>::all(client.clone()).create(&PostParams::default(), &crd).await.expect("crd");
        let app = json!({
            "apiVersion": "kubetoken.io/v1alpha1", "kind": "OAuthApplication",
            "metadata": {"name": "shop", "namespace": NS},
            "spec": {"grantTypes": ["client_credentials"], "signing": {"algorithm": "ES256"}, "scopes": [{"name": "orders:read"}]},
        });
        server.create_object(&format!("/apis/kubetoken.io/v1alpha1/namespaces/{NS}/oauthapplications"), app).expect("app");
    });
    let _controller = spawn(
        &kubeconfig,
        &["controller", "--namespace", NS, "--lease-namespace", NS, "--listen", "127.0.0.1:0"],
        "kubetoken controller health on ",
    );
    let secrets: Api<Secret> = Api::namespaced(client.clone(), NS);
    let (id, secret) = {
        let start = Instant::now();
        loop {
            if let Ok(s) = runtime.block_on(secrets.get("shop-credentials")) {
                let d = s.data.expect("data");
                let get = |k: &str| String::from_utf8(d[k].0.clone()).expect("utf8");
                break (get("client_id"), get("client_secret"));
            }
            assert!(start.elapsed() < Duration::from_secs(60), "no credentials");
            std::thread::sleep(Duration::from_millis(50));
        }
    };
    let auth = basic(&id, &secret);
    let replicas = [sidecar(&kubeconfig, None), sidecar(&kubeconfig, None)];
    for r in &replicas {
        wait_ready(r);
    }
    println!("## Two sidecars of one application against the test server: ConfigMap store ({seconds} s per load)\n");
    println!(
        "| connections | tokens/s | p50 ms | p99 ms | errors | API writes/s (both: journal + snapshots) | snapshots | 409s | request bytes per token | stored object bytes per token |"
    );
    println!("|---|---|---|---|---|---|---|---|---|---|");
    for &connections in loads {
        let counters = [
            "kubetoken_kube_journal_writes_total",
            "kubetoken_kube_compaction_writes_total",
            "kubetoken_kube_compactions_total",
            "kubetoken_kube_bytes_written_total",
            "kubetoken_kube_object_bytes_written_total",
            "kubetoken_kube_conflicts_total",
        ];
        let before = counters.map(|c| replicas.iter().map(|r| metric(r, c)).sum::<f64>());
        let run = load(&replicas, &auth, connections, seconds, &format!("cm{connections}"));
        let after = counters.map(|c| replicas.iter().map(|r| metric(r, c)).sum::<f64>());
        let [writes, compaction_writes, snapshots, bytes, object_bytes, conflicts] =
            std::array::from_fn(|i| after[i] - before[i]);
        let tokens = run.latencies.len().max(1) as f64;
        println!(
            "| {connections} | {:.0} | {:.1} | {:.1} | {} | {:.2} ({:.2} + {:.2}) | {snapshots} | {conflicts} | {:.0} | {:.0} |",
            run.tokens_per_second(),
            run.percentile_ms(0.5),
            run.percentile_ms(0.99),
            run.errors,
            (writes + compaction_writes) / run.elapsed,
            writes / run.elapsed,
            compaction_writes / run.elapsed,
            bytes / tokens,
            object_bytes / tokens,
        );
        assert!(run.errors == 0, "{} requests failed", run.errors);
    }
    visibility(&replicas, &auth, samples, "cm");
    drop(replicas);

    // Restart with many live keys: the state is written as a snapshot as compaction would (chunks of set 0 and
    // the pointer), then a fresh sidecar loads it.
    let config_maps: Api<ConfigMap> = Api::namespaced(client, NS);
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).expect("time").as_secs();
    let mut records = Vec::with_capacity(live_keys);
    for n in 0..live_keys as u32 {
        let key = TokenKey {
            client_id: id.clone(),
            subject: Subject::User(format!("user{}", n / 5)),
            scopes: ScopeSet::parse(&format!("device_d{} orders:read", n % 5)).expect("scope"),
        };
        let mut raw = [0u8; 16];
        raw[..4].copy_from_slice(&n.to_le_bytes());
        let mut refresh = raw;
        refresh[15] = 1;
        let pair = LivePair {
            access_id: TokenId(raw),
            access_scopes: key.scopes.clone(),
            issued_at: now,
            access_expires_at: now + 3600,
            refresh: Some(RefreshGrant { id: TokenId(refresh), expires_at: now + 86_400, ..Default::default() }),
        };
        records.push(Record::Set { k: key, p: Some(pair) });
    }
    // The journal's last sequence number: the seeded snapshot says it holds everything up to it.
    let mut last = 0;
    for i in 0..layout::SEGMENTS {
        let segment = runtime.block_on(config_maps.get(&layout::segment_name("shop", i))).expect("segment");
        for field in segment.binary_data.unwrap_or_default().keys() {
            if let Some((first, n)) = layout::batch_of(field) {
                last = last.max(first + n as u64 - 1);
            }
        }
    }
    let mut encoder = codec::Encoder::in_pieces(layout::CHUNK_BYTES);
    for r in &records {
        encoder.push(r);
    }
    let pieces = encoder.finish_pieces();
    let snapshot_bytes: usize = pieces.iter().map(Vec::len).sum();
    assert!(pieces.len() <= layout::CHUNKS_PER_SET, "the snapshot fits its chunks");
    let largest = pieces.iter().map(|p| p.len()).max().unwrap_or(0);
    for (part, piece) in pieces.iter().enumerate() {
        let patch = json!({"data": {layout::GEN_FIELD: "seeded"}, "binaryData": {layout::STATE_FIELD: base64::engine::general_purpose::STANDARD.encode(piece)}});
        runtime
            .block_on(config_maps.patch(
                &layout::chunk_name("shop", 0, part),
                &PatchParams::default(),
                &Patch::Merge(&patch),
            ))
            .expect("seed chunk");
    }
    let patch = json!({"data": {
        layout::SET_FIELD: "0", layout::CHUNKS_FIELD: pieces.len().to_string(), layout::UPTO_FIELD: last.to_string(),
        layout::GEN_FIELD: "seeded",
    }});
    runtime
        .block_on(config_maps.patch(&layout::pointer_name("shop"), &PatchParams::default(), &Patch::Merge(&patch)))
        .expect("seed pointer");
    let fresh = sidecar(&kubeconfig, None);
    let ready = wait_ready(&fresh);
    let entries = metric(&fresh, "kubetoken_sidecar_live_entries");
    println!(
        "\n| live token keys | snapshot KiB | chunks | largest chunk KiB | ready after restart ms (from process start) | RSS MiB | peak RSS MiB |\n|---|---|---|---|---|---|---|"
    );
    println!(
        "| {entries} | {} | {} | {} | {} | {:.1} | {:.1} |",
        snapshot_bytes / 1024,
        pieces.len(),
        largest / 1024,
        ready.as_millis(),
        rss_kib(&fresh, "VmRSS:") as f64 / 1024.0,
        rss_kib(&fresh, "VmHWM:") as f64 / 1024.0
    );
    assert!(entries >= live_keys as f64, "the fresh sidecar loaded {entries} of {live_keys} keys");
    if !smoke {
        // Under traffic, the replica holding 100,000 keys writes snapshots of them: load until it has written one,
        // then read its memory again (a snapshot is encoded in chunk-sized pieces, never as one buffer).
        let before = metric(&fresh, "kubetoken_kube_compactions_total");
        let done = std::sync::atomic::AtomicBool::new(false);
        let started = Instant::now();
        std::thread::scope(|scope| {
            for c in 0..128 {
                let (base, auth, done) = (fresh.base.clone(), auth.clone(), &done);
                scope.spawn(move || {
                    let agent = ureq::AgentBuilder::new().timeout(Duration::from_secs(10)).build();
                    let mut i = 0;
                    while !done.load(std::sync::atomic::Ordering::Relaxed) {
                        let _ = token(&agent, &base, &auth, &format!("device_r{c}d{}", i % 20));
                        i += 1;
                    }
                });
            }
            while metric(&fresh, "kubetoken_kube_compactions_total") <= before {
                assert!(started.elapsed() < Duration::from_secs(120), "no snapshot under load");
                std::thread::sleep(Duration::from_millis(100));
            }
            done.store(true, std::sync::atomic::Ordering::Relaxed);
        });
        println!(
            "\n| the same replica, after writing a snapshot of that state under load | s | RSS MiB | peak RSS MiB |\n|---|---|---|---|"
        );
        println!(
            "| {} keys | {:.1} | {:.1} | {:.1} |",
            metric(&fresh, "kubetoken_sidecar_live_entries"),
            started.elapsed().as_secs_f64(),
            rss_kib(&fresh, "VmRSS:") as f64 / 1024.0,
            rss_kib(&fresh, "VmHWM:") as f64 / 1024.0
        );
    }
    drop(fresh);
    postgres_store(&runtime, &kubeconfig, &auth, &id, seconds, loads, samples, postgres_keys);
    if smoke {
        println!("smoke: 1 passed, 0 failed");
    }
}

/// The same two sidecars with their token state in PostgreSQL, at each number of live keys in the table: started
/// fresh on it (ready time), the loads, memory after them; at the largest, the visibility at the other replica.
#[allow(clippy::too_many_arguments)]
fn postgres_store(
    runtime: &tokio::runtime::Runtime,
    kubeconfig: &std::path::Path,
    auth: &str,
    client_id: &str,
    seconds: u64,
    loads: &[usize],
    samples: usize,
    live_keys: &[i64],
) {
    let pg = postgres::Postgres::start_durable();
    let url = runtime.block_on(pg.database());
    let mut db = runtime.block_on(postgres::connect(&url));
    // The schema the sidecars would create at start, so the table can be seeded first.
    runtime.block_on(kubetoken::storage::postgres::schema::migrate(&mut db)).expect("migrate");
    let db = db;
    let transactions = || {
        // The statistics a backend reports reach the view within a second of its transactions.
        std::thread::sleep(Duration::from_millis(1500));
        let row = runtime
            .block_on(db.query_one("SELECT xact_commit FROM pg_stat_database WHERE datname = current_database()", &[]))
            .expect("pg_stat_database");
        row.get::<_, i64>(0) as f64
    };
    println!(
        "\n## The same two sidecars with their token state in PostgreSQL 15 (durable: fsync, synchronous commit; {seconds} s per load)\n"
    );
    println!(
        "| live keys in the table | table bytes per key (with indexes) | ready after restart ms (from process start) | connections | tokens/s | p50 ms | p99 ms | errors | statements (round trips) per token | PostgreSQL transactions per token | changes per group commit | RSS MiB after the load (each replica) | peak RSS MiB |"
    );
    println!("|---|---|---|---|---|---|---|---|---|---|---|---|---|");
    let mut replicas = None;
    for &target in live_keys {
        // The sidecars are not running while the table is seeded: they start on the table as it is.
        drop(replicas.take());
        seed(runtime, &db, client_id, target);
        let row = runtime
            .block_on(db.query_one(
                "SELECT count(*), pg_total_relation_size('kubetoken_token_pairs') FROM kubetoken_token_pairs",
                &[],
            ))
            .expect("table size");
        let (keys, bytes): (i64, i64) = (row.get(0), row.get(1));
        let pair = [sidecar(kubeconfig, Some(&url)), sidecar(kubeconfig, Some(&url))];
        let ready = wait_ready(&pair[0]);
        wait_ready(&pair[1]);
        for &connections in loads {
            let counters = ["kubetoken_postgres_statements_total", "kubetoken_postgres_group_commits_total"];
            let before = counters.map(|c| pair.iter().map(|r| metric(r, c)).sum::<f64>());
            let xacts = transactions();
            let run = load(&pair, auth, connections, seconds, &format!("pg{target}c{connections}"));
            let xacts = transactions() - xacts;
            let after = counters.map(|c| pair.iter().map(|r| metric(r, c)).sum::<f64>());
            let tokens = run.latencies.len() as f64;
            println!(
                "| {keys} | {:.0} | {} | {connections} | {:.0} | {:.1} | {:.1} | {} | {:.2} | {:.2} | {:.1} | {:.1}, {:.1} | {:.1}, {:.1} |",
                bytes as f64 / keys as f64,
                ready.as_millis(),
                run.tokens_per_second(),
                run.percentile_ms(0.5),
                run.percentile_ms(0.99),
                run.errors,
                (after[0] - before[0]) / tokens,
                xacts / tokens,
                tokens / (after[1] - before[1]).max(1.0),
                rss_kib(&pair[0], "VmRSS:") as f64 / 1024.0,
                rss_kib(&pair[1], "VmRSS:") as f64 / 1024.0,
                rss_kib(&pair[0], "VmHWM:") as f64 / 1024.0,
                rss_kib(&pair[1], "VmHWM:") as f64 / 1024.0,
            );
            assert!(run.errors == 0, "{} requests failed", run.errors);
        }
        replicas = Some(pair);
    }
    if let Some(pair) = &replicas {
        visibility(pair, auth, samples, "pg");
    }
}

/// Fills the table up to `target` live keys (users' device keys, tokens valid for the default lifetimes), in
/// statements of 10,000 rows.
fn seed(runtime: &tokio::runtime::Runtime, db: &tokio_postgres::Client, client_id: &str, target: i64) {
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).expect("time").as_secs();
    let have: i64 =
        runtime.block_on(db.query_one("SELECT count(*) FROM kubetoken_token_pairs", &[])).expect("count").get(0);
    let mut n = have;
    while n < target {
        let rows = (target - n).min(10_000);
        let (mut subjects, mut scopes, mut access, mut refresh, mut pairs) =
            (Vec::new(), Vec::new(), Vec::new(), Vec::new(), Vec::new());
        for i in n..n + rows {
            let scope = ScopeSet::parse(&format!("device_d{} orders:read", i % 5)).expect("scope");
            let mut raw = [0xeeu8; 16];
            raw[..8].copy_from_slice(&i.to_le_bytes());
            let mut refresh_raw = raw;
            refresh_raw[15] = 0xef;
            let pair = LivePair {
                access_id: TokenId(raw),
                access_scopes: scope.clone(),
                issued_at: now,
                access_expires_at: now + 3600,
                refresh: Some(RefreshGrant {
                    id: TokenId(refresh_raw),
                    expires_at: now + 86_400,
                    session_started_at: now,
                    ..Default::default()
                }),
            };
            subjects.push(format!("u:seed{}", i / 5));
            scopes.push(scope.to_string());
            access.push(raw.to_vec());
            refresh.push(refresh_raw.to_vec());
            pairs.push(serde_json::to_string(&pair).expect("pair"));
        }
        let expires = now as i64 + 86_400;
        runtime
            .block_on(db.execute(
                "INSERT INTO kubetoken_token_pairs
                   (client_id, subject, scopes, access_id, refresh_id, pair, expires_at, change_seq)
                 SELECT $1, s, sc, a, r, p::jsonb, $7, nextval('kubetoken_change_seq')
                 FROM unnest($2::text[], $3::text[], $4::bytea[], $5::bytea[], $6::text[]) AS t(s, sc, a, r, p)",
                &[&client_id, &subjects, &scopes, &access, &refresh, &pairs, &expires],
            ))
            .expect("seed rows");
        n += rows;
    }
    runtime.block_on(db.batch_execute("VACUUM ANALYZE kubetoken_token_pairs")).expect("vacuum");
}

//! The in-cluster benchmark: two `kubetoken sidecar` replicas of one application against the in-repo Kubernetes
//! API test server, with the real controller.
//!
//!   cargo bench --bench sidecar                 # full run (release build), about a minute
//!   cargo test --bench sidecar -- --smoke       # CI: a few seconds on the debug build, asserts no errors only
//!
//! Reports: tokens/s and p50/p99 latency under load (client_credentials, one device scope per client and round,
//! so every request supersedes its key's previous token), API writes/s of both replicas together, bytes written
//! per token, how long a token issued (or revoked) through one replica takes to be active (or inactive) at the
//! other, and, with 100,000 live token keys in the application's state, the time a fresh sidecar needs to be ready
//! and its memory.

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

const BIN: &str = env!("CARGO_BIN_EXE_kubetoken");
const NS: &str = "bench";

struct Proc {
    child: Child,
    base: String,
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
    let mut child = command.stdout(Stdio::piped()).stderr(Stdio::inherit()).spawn().expect("spawn kubetoken");
    let mut lines = BufReader::new(child.stdout.take().expect("stdout")).lines();
    let base = loop {
        let line = lines.next().expect("kubetoken exited").expect("stdout");
        if let Some(url) = line.strip_prefix(banner) {
            break url.to_string();
        }
    };
    std::thread::spawn(move || lines.for_each(drop));
    Proc { child, base }
}

fn sidecar(kubeconfig: &std::path::Path) -> Proc {
    spawn(
        kubeconfig,
        &[
            "sidecar",
            "--application",
            "shop",
            "--namespace",
            NS,
            "--listen",
            "127.0.0.1:0",
            "--api-writes-per-second",
            "4.8",
        ],
        "kubetoken sidecar listening on ",
    )
}

fn wait_ready(p: &Proc) -> Duration {
    let start = Instant::now();
    while ureq::get(&format!("{}/readyz", p.base)).call().is_err() {
        assert!(start.elapsed() < Duration::from_secs(120), "sidecar not ready");
        std::thread::sleep(Duration::from_millis(5));
    }
    start.elapsed()
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
    let connections = if smoke { 4 } else { 256 };
    let live_keys = if smoke { 2_000 } else { 100_000 };
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
    let replicas = [sidecar(&kubeconfig), sidecar(&kubeconfig)];
    for r in &replicas {
        wait_ready(r);
    }

    // Load: every connection asks for its own devices in turn, each request superseding its key's last token.
    let started = Instant::now();
    let deadline = started + Duration::from_secs(seconds);
    let results: Vec<(Vec<Duration>, usize)> = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..connections)
            .map(|c| {
                let (base, auth) = (replicas[c % 2].base.clone(), auth.clone());
                scope.spawn(move || {
                    let agent = ureq::AgentBuilder::new().timeout(Duration::from_secs(10)).build();
                    let (mut latencies, mut errors, mut i) = (Vec::new(), 0, 0);
                    while Instant::now() < deadline {
                        let t = Instant::now();
                        match token(&agent, &base, &auth, &format!("device_c{c}d{}", i % 20)) {
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
    let errors: usize = results.iter().map(|r| r.1).sum();
    let mut latencies: Vec<Duration> = results.into_iter().flat_map(|r| r.0).collect();
    latencies.sort();
    let tokens = latencies.len();
    let writes: f64 = replicas.iter().map(|r| metric(r, "kubetoken_kube_journal_writes_total")).sum();
    let compaction_writes: f64 = replicas.iter().map(|r| metric(r, "kubetoken_kube_compaction_writes_total")).sum();
    let snapshots: f64 = replicas.iter().map(|r| metric(r, "kubetoken_kube_compactions_total")).sum();
    let bytes: f64 = replicas.iter().map(|r| metric(r, "kubetoken_kube_bytes_written_total")).sum();
    let object_bytes: f64 = replicas.iter().map(|r| metric(r, "kubetoken_kube_object_bytes_written_total")).sum();
    let conflicts: f64 = replicas.iter().map(|r| metric(r, "kubetoken_kube_conflicts_total")).sum();
    println!("## Two sidecars of one application against the test server ({connections} connections, {seconds} s)\n");
    println!(
        "| tokens/s | p50 ms | p99 ms | errors | API writes/s (both: journal + snapshots) | snapshots | 409s | request bytes per token | stored object bytes per token |"
    );
    println!("|---|---|---|---|---|---|---|---|---|");
    println!(
        "| {:.0} | {:.1} | {:.1} | {errors} | {:.2} ({:.2} + {:.2}) | {snapshots} | {conflicts} | {:.0} | {:.0} |",
        tokens as f64 / elapsed,
        percentile(&latencies, 0.5).as_secs_f64() * 1e3,
        percentile(&latencies, 0.99).as_secs_f64() * 1e3,
        (writes + compaction_writes) / elapsed,
        writes / elapsed,
        compaction_writes / elapsed,
        bytes / tokens.max(1) as f64,
        object_bytes / tokens.max(1) as f64,
    );
    assert!(tokens > 0 && errors == 0, "{errors} requests failed");

    // Visibility: issued through A, active at B; superseded through B, inactive at A.
    let (a, b) = (&replicas[0], &replicas[1]);
    let agent = ureq::agent();
    let mut issued = Vec::new();
    let mut superseded = Vec::new();
    for i in 0..if smoke { 3 } else { 20 } {
        let scope = format!("device_visibility{i}");
        let first =
            token(&agent, &a.base, &auth, &scope).expect("token")["access_token"].as_str().expect("t").to_string();
        issued.push(until("active at B", || active(&b.base, &auth, &first)));
        token(&agent, &b.base, &auth, &scope).expect("token");
        superseded.push(until("inactive at A", || !active(&a.base, &auth, &first)));
    }
    issued.sort();
    superseded.sort();
    println!("\n| visibility at the other replica | median ms | max ms |\n|---|---|---|");
    for (what, v) in [("a new token is active", &issued), ("a superseded token is inactive", &superseded)] {
        println!(
            "| {what} | {:.1} | {:.1} |",
            percentile(v, 0.5).as_secs_f64() * 1e3,
            v[v.len() - 1].as_secs_f64() * 1e3
        );
    }
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
    let fresh = sidecar(&kubeconfig);
    let ready = wait_ready(&fresh);
    let entries = metric(&fresh, "kubetoken_sidecar_live_entries");
    println!(
        "\n| live token keys | snapshot KiB | chunks | largest chunk KiB | ready after restart ms | RSS MiB | peak RSS MiB |\n|---|---|---|---|---|---|---|"
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
    if smoke {
        println!("smoke: 1 passed, 0 failed");
    }
}

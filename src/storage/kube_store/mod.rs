//! The in-cluster storage adapter: token state in ConfigMaps shared by every sidecar replica of an application.
//!
//! Design (see ARCHITECTURE.md and [`layout`]):
//! - One **journal** ConfigMap per application is the single order of all changes. A replica appends a batch
//!   (group commit) with a JSON merge patch that adds one `b-<seq>` field and carries the `resourceVersion` it
//!   last saw: the API server's optimistic concurrency makes the append a compare-and-set over the whole log, so
//!   a replica can only append on top of every change it has applied. On 409 it reads the journal, applies the
//!   other replicas' records, re-checks its pending changes (those now deciding on a stale pair fail with
//!   `Conflict`, and the core decides them again) and appends the rest.
//! - **Snapshot shards** (32 ConfigMaps) hold the state up to a sequence number; when the journal grows past a
//!   threshold, a replica writes the changed shards and then removes the compacted batches from the journal.
//! - Every replica watches the journal, so a change made through one replica is visible at the others after
//!   the watch delivers it.
//!
//! Promise, as for the local store: `commit` resolves only once the API server accepted the journal write that
//! contains the change; a failed or timed-out write fails the request (503), never answers with a token whose
//! predecessor's revocation was not stored.

pub mod layout;

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use futures::StreamExt;
use k8s_openapi::api::core::v1::ConfigMap;
use kube::api::{Api, Patch, PatchParams};
use kube::runtime::watcher;
use serde_json::json;
use tokio::sync::{Notify, oneshot, watch};

use self::layout::{
    BASE_FIELD, ENTRIES_FIELD, SHARDS, UPTO_FIELD, batch_field, batch_first_seq, decode_lines, encode_lines,
    journal_name, record_key, shard_name, shard_of,
};
use crate::core::clock::Clock;
use crate::core::lockout::SharedFailure;
use crate::core::model::{Change, LivePair, RefreshLookup, SharedKey, TokenId, TokenKey};
use crate::core::state::{Record, TokenState};
use crate::core::store::{StoreError, StoreFuture, TokenStore};
use crate::metrics::Histogram;

const FIELD_MANAGER: &str = "kubetoken-sidecar";
/// Snapshots close to the 1 MiB object limit are refused rather than written.
const MAX_OBJECT_BYTES: usize = 900 * 1024;

#[derive(Debug, Clone)]
pub struct KubeStoreOptions {
    /// Journal writes per second this replica may make (the API write budget; compaction writes excepted).
    pub writes_per_second: f64,
    /// Compact once the journal holds this many bytes of records.
    pub compact_bytes: usize,
    /// How long a commit may wait for the API server before the request fails with 503.
    pub commit_timeout: Duration,
}

impl Default for KubeStoreOptions {
    fn default() -> Self {
        Self { writes_per_second: 5.0, compact_bytes: 128 * 1024, commit_timeout: Duration::from_secs(5) }
    }
}

/// Counters for `/metrics`.
#[derive(Debug)]
pub struct KubeStoreMetrics {
    pub journal_writes: AtomicU64,
    pub compaction_writes: AtomicU64,
    pub bytes_written: AtomicU64,
    pub conflicts: AtomicU64,
    pub write_failures: AtomicU64,
    pub remote_records: AtomicU64,
    pub reloads: AtomicU64,
    pub journal_bytes: AtomicU64,
    pub largest_shard_bytes: AtomicU64,
    /// Milliseconds from a remote journal write's arrival in the watch to its records being applied.
    pub watch_apply: Histogram,
    pub batches: Arc<Histogram>,
}

impl KubeStoreMetrics {
    pub fn new(batches: Arc<Histogram>) -> Self {
        Self {
            journal_writes: AtomicU64::new(0),
            compaction_writes: AtomicU64::new(0),
            bytes_written: AtomicU64::new(0),
            conflicts: AtomicU64::new(0),
            write_failures: AtomicU64::new(0),
            remote_records: AtomicU64::new(0),
            reloads: AtomicU64::new(0),
            journal_bytes: AtomicU64::new(0),
            largest_shard_bytes: AtomicU64::new(0),
            watch_apply: Histogram::new(&[0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0]),
            batches,
        }
    }

    pub fn render(&self, out: &mut String, app: &str) {
        use std::fmt::Write;
        let l = format!("application=\"{app}\"");
        let counters = [
            (
                "kubetoken_kube_journal_writes_total",
                &self.journal_writes,
                "Journal appends accepted by the API server.",
            ),
            ("kubetoken_kube_compaction_writes_total", &self.compaction_writes, "Snapshot and journal-trim writes."),
            ("kubetoken_kube_bytes_written_total", &self.bytes_written, "Request body bytes of state writes."),
            ("kubetoken_kube_conflicts_total", &self.conflicts, "409 Conflict answers to state writes."),
            ("kubetoken_kube_write_failures_total", &self.write_failures, "State writes that failed otherwise."),
            ("kubetoken_kube_remote_records_total", &self.remote_records, "Records applied from other replicas."),
            ("kubetoken_kube_reloads_total", &self.reloads, "Full state loads (start, gaps)."),
        ];
        for (name, v, help) in counters {
            let _ = writeln!(
                out,
                "# HELP {name} {help}\n# TYPE {name} counter\n{name}{{{l}}} {}",
                v.load(Ordering::Relaxed)
            );
        }
        let gauges = [
            ("kubetoken_kube_journal_bytes", &self.journal_bytes, "Bytes of records in the journal ConfigMap."),
            ("kubetoken_kube_largest_shard_bytes", &self.largest_shard_bytes, "Bytes of the largest snapshot shard."),
        ];
        for (name, v, help) in gauges {
            let _ =
                writeln!(out, "# HELP {name} {help}\n# TYPE {name} gauge\n{name}{{{l}}} {}", v.load(Ordering::Relaxed));
        }
        out.push_str("# HELP kubetoken_kube_watch_apply_seconds Delay from a remote journal write arriving to it being applied.\n# TYPE kubetoken_kube_watch_apply_seconds histogram\n");
        self.watch_apply.render(out, "kubetoken_kube_watch_apply_seconds", &l);
    }
}

struct Pending {
    id: u64,
    change: Change,
    done: Option<oneshot::Sender<Result<(), StoreError>>>,
}

/// The view of keys with changes not yet accepted by the API server.
#[derive(Default)]
struct Overlay {
    pairs: HashMap<SharedKey, OverlayEntry>,
    access: HashMap<TokenId, SharedKey>,
    refresh: HashMap<TokenId, (SharedKey, bool)>,
}

struct OverlayEntry {
    pair: Option<LivePair>,
    ids: Vec<TokenId>,
}

/// The journal as last seen.
#[derive(Default, Clone)]
struct JournalView {
    rv: String,
    base: u64,
    /// first seq → (records, bytes)
    batches: BTreeMap<u64, (usize, usize)>,
}

impl JournalView {
    fn last_seq(&self) -> u64 {
        self.batches.iter().next_back().map_or(self.base, |(first, (n, _))| first + *n as u64 - 1)
    }
    fn bytes(&self) -> usize {
        self.batches.values().map(|(_, b)| b).sum()
    }
}

struct Inner {
    confirmed: TokenState,
    overlay: Overlay,
    /// Accepted by `commit`, not yet sent.
    pending: VecDeque<Pending>,
    /// Being written now.
    inflight: Vec<Pending>,
    /// Failed credential checks to share with the other replicas (with the next batch; best effort).
    failures_out: Vec<SharedFailure>,
    /// In the batch being written now.
    failures_inflight: Vec<SharedFailure>,
    /// Shared by the other replicas, for the lockout.
    failures_in: Vec<SharedFailure>,
    next_id: u64,
    /// Ids below this are resolved.
    resolved_below: u64,
    /// Ids of recently failed changes (for `sync`).
    recent_failures: VecDeque<u64>,
    applied_seq: u64,
    shard_upto: [u64; SHARDS],
    shard_dirty: [bool; SHARDS],
    journal: JournalView,
    loaded: bool,
}

struct Shared {
    api: Api<ConfigMap>,
    app: String,
    journal_name: String,
    inner: Mutex<Inner>,
    wake: Notify,
    /// The journal as the watch last delivered it, for the writer.
    watched: watch::Sender<Option<(Arc<ConfigMap>, Instant)>>,
    resolved: watch::Sender<u64>,
    clock: Arc<dyn Clock>,
    options: KubeStoreOptions,
    pub metrics: Arc<KubeStoreMetrics>,
}

/// Token state of one application in its ConfigMaps. Cheap to clone.
#[derive(Clone)]
pub struct KubeStore {
    shared: Arc<Shared>,
}

fn unavailable(e: impl std::fmt::Display) -> StoreError {
    StoreError::Unavailable(e.to_string())
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Inner> {
        // Every update to Inner completes before its guard drops.
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl Inner {
    fn view_pair(&self, key: &TokenKey) -> Option<LivePair> {
        match self.overlay.pairs.get(key) {
            Some(e) => e.pair.clone(),
            None => self.confirmed.pair(key),
        }
    }

    /// Rebuilds the overlay of `key` from the confirmed state and its unresolved changes, in order. Changes that
    /// no longer apply fail with `Conflict`; returns their ids.
    fn recompute(&mut self, key: &TokenKey, failed: &mut Vec<u64>) {
        if let Some(old) = self.overlay.pairs.remove(key) {
            for id in old.ids {
                self.overlay.access.remove(&id);
                self.overlay.refresh.remove(&id);
            }
        }
        let mut current = self.confirmed.pair(key);
        let mut any = false;
        let mut rotated = Vec::new();
        // In-flight changes cannot fail here (the writer resolves them), but later ones may depend on them.
        for p in &self.inflight {
            if p.change.key == *key {
                current = p.change.next.clone();
                rotated.extend(p.change.rotated_out.map(|r| r.id));
                any = true;
            }
        }
        self.pending.retain_mut(|p| {
            if p.change.key != *key {
                return true;
            }
            if current.as_ref().map(|c| c.access_id) != p.change.expect {
                if let Some(tx) = p.done.take() {
                    let _ = tx.send(Err(StoreError::Conflict));
                }
                failed.push(p.id);
                return false;
            }
            current = p.change.next.clone();
            rotated.extend(p.change.rotated_out.map(|r| r.id));
            any = true;
            true
        });
        if !any {
            return;
        }
        let shared: SharedKey = Arc::new(key.clone());
        let mut ids = Vec::new();
        if let Some(pair) = &current {
            self.overlay.access.insert(pair.access_id, shared.clone());
            ids.push(pair.access_id);
            if let Some(r) = pair.refresh {
                self.overlay.refresh.insert(r.id, (shared.clone(), false));
                ids.push(r.id);
            }
        }
        for id in rotated {
            self.overlay.refresh.insert(id, (shared.clone(), true));
            ids.push(id);
        }
        self.overlay.pairs.insert(shared, OverlayEntry { pair: current, ids });
    }

    /// Applies journal records after `applied_seq`; returns the keys they touched. Failures shared by other
    /// replicas (`remote`) are kept for the lockout.
    fn apply_records(&mut self, first_seq: u64, records: Vec<Record>, remote: bool) -> Vec<TokenKey> {
        let mut touched = Vec::new();
        for (i, record) in records.into_iter().enumerate() {
            let seq = first_seq + i as u64;
            if seq <= self.applied_seq {
                continue;
            }
            self.applied_seq = seq;
            let Some(key) = record_key(&record) else {
                if let (Record::Failed { f }, true) = (record, remote)
                    && self.failures_in.len() < 10_000
                {
                    self.failures_in.push(f);
                }
                continue;
            };
            let shard = shard_of(key);
            if seq > self.shard_upto[shard] {
                touched.push(key.clone());
                self.confirmed.apply(record);
                self.shard_dirty[shard] = true;
            }
        }
        touched
    }

    fn publish_resolved(&mut self, resolved: &watch::Sender<u64>) {
        let lowest = self.inflight.iter().chain(self.pending.iter()).map(|p| p.id).min().unwrap_or(self.next_id);
        self.resolved_below = lowest;
        resolved.send_replace(lowest);
    }

    fn record_failures(&mut self, failed: &[u64]) {
        for id in failed {
            self.recent_failures.push_back(*id);
        }
        while self.recent_failures.len() > 4096 {
            self.recent_failures.pop_front();
        }
    }
}

/// The data fields of a ConfigMap.
fn data(cm: &ConfigMap) -> &BTreeMap<String, String> {
    static EMPTY: BTreeMap<String, String> = BTreeMap::new();
    cm.data.as_ref().unwrap_or(&EMPTY)
}

fn parse_u64(cm: &ConfigMap, field: &str) -> u64 {
    data(cm).get(field).and_then(|v| v.trim().parse().ok()).unwrap_or(0)
}

fn journal_view(cm: &ConfigMap) -> JournalView {
    let mut batches = BTreeMap::new();
    for (field, text) in data(cm) {
        if let Some(first) = batch_first_seq(field) {
            batches.insert(first, (text.lines().filter(|l| !l.is_empty()).count(), text.len()));
        }
    }
    JournalView {
        rv: cm.metadata.resource_version.clone().unwrap_or_default(),
        base: parse_u64(cm, BASE_FIELD),
        batches,
    }
}

impl KubeStore {
    /// A store for application `app` in the namespace of `api`. Nothing is read until [`KubeStore::run`].
    pub fn new(
        api: Api<ConfigMap>,
        app: &str,
        clock: Arc<dyn Clock>,
        options: KubeStoreOptions,
        metrics: Arc<KubeStoreMetrics>,
    ) -> Self {
        let inner = Inner {
            confirmed: TokenState::default(),
            overlay: Overlay::default(),
            pending: VecDeque::new(),
            inflight: Vec::new(),
            failures_out: Vec::new(),
            failures_inflight: Vec::new(),
            failures_in: Vec::new(),
            next_id: 1,
            resolved_below: 1,
            recent_failures: VecDeque::new(),
            applied_seq: 0,
            shard_upto: [0; SHARDS],
            shard_dirty: [false; SHARDS],
            journal: JournalView::default(),
            loaded: false,
        };
        Self {
            shared: Arc::new(Shared {
                api,
                app: app.to_string(),
                journal_name: journal_name(app),
                inner: Mutex::new(inner),
                wake: Notify::new(),
                watched: watch::channel(None).0,
                resolved: watch::channel(1).0,
                clock,
                options,
                metrics,
            }),
        }
    }

    pub fn metrics(&self) -> &Arc<KubeStoreMetrics> {
        &self.shared.metrics
    }

    /// Whether the state has been loaded (the store then serves).
    pub fn loaded(&self) -> bool {
        self.shared.lock().loaded
    }

    /// Live entries in memory (pairs and remembered rotated refresh tokens).
    pub fn entries(&self) -> usize {
        self.shared.lock().confirmed.entries()
    }

    /// Loads the state, then watches the journal and writes batches until the task is dropped.
    pub async fn run(self) {
        let watcher_task = tokio::spawn(self.clone().watch_journal());
        let _guard = AbortOnDrop(watcher_task);
        let mut backoff = Duration::from_millis(200);
        loop {
            match self.load().await {
                Ok(()) => break,
                Err(e) => {
                    tracing::warn!(application = %self.shared.app, error = %e, "cannot load the token state yet; retrying");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(5));
                }
            }
        }
        self.writer_loop().await;
    }

    async fn watch_journal(self) {
        let config = watcher::Config::default().fields(&format!("metadata.name={}", self.shared.journal_name));
        let stream = watcher::watcher(self.shared.api.clone(), config);
        futures::pin_mut!(stream);
        while let Some(event) = stream.next().await {
            match event {
                Ok(watcher::Event::Apply(cm) | watcher::Event::InitApply(cm)) => {
                    tracing::debug!(application = %self.shared.app, rv = ?cm.metadata.resource_version, "journal event");
                    self.shared.watched.send_replace(Some((Arc::new(cm), Instant::now())));
                    self.shared.wake.notify_one();
                }
                Ok(_) => {}
                Err(e) => {
                    tracing::warn!(application = %self.shared.app, error = %e, "journal watch failed; it restarts");
                    tokio::time::sleep(Duration::from_millis(500)).await;
                }
            }
        }
    }

    /// Reads the journal and every shard, and rebuilds the confirmed state from them.
    async fn load(&self) -> Result<(), String> {
        let started = Instant::now();
        let s = &self.shared;
        // The journal first: a shard read later can only be ahead of it, never behind (shards are written before
        // the journal is trimmed), and a shard ahead is handled by skipping records it already holds.
        let journal = s.api.get(&s.journal_name).await.map_err(|e| format!("ConfigMap {}: {e}", s.journal_name))?;
        let mut state = TokenState::default();
        let mut upto = [0u64; SHARDS];
        let mut largest = 0usize;
        for (i, slot) in upto.iter_mut().enumerate() {
            let name = shard_name(&s.app, i);
            let cm = s.api.get(&name).await.map_err(|e| format!("ConfigMap {name}: {e}"))?;
            *slot = parse_u64(&cm, UPTO_FIELD);
            let text = data(&cm).get(ENTRIES_FIELD).map_or("", String::as_str);
            largest = largest.max(text.len());
            for r in decode_lines(text).map_err(|e| format!("ConfigMap {name}: {ENTRIES_FIELD}: {e}"))? {
                state.apply(r);
            }
        }
        let view = journal_view(&journal);
        let mut batches = Vec::new();
        for (field, text) in data(&journal) {
            if let Some(first) = batch_first_seq(field) {
                let records = decode_lines(text).map_err(|e| format!("ConfigMap {}: {field}: {e}", s.journal_name))?;
                batches.push((first, records));
            }
        }
        let live = {
            let mut g = s.lock();
            g.confirmed = state;
            g.shard_upto = upto;
            g.shard_dirty = [false; SHARDS];
            g.applied_seq = view.base;
            for (first, records) in batches {
                g.apply_records(first, records, false);
            }
            g.applied_seq = g.applied_seq.max(view.last_seq());
            g.confirmed.prune(s.clock.now());
            s.metrics.journal_bytes.store(view.bytes() as u64, Ordering::Relaxed);
            g.journal = view;
            // Pending changes were decided on the old view: re-check them all.
            let keys: HashSet<TokenKey> = g.pending.iter().map(|p| p.change.key.clone()).collect();
            let mut failed = Vec::new();
            for k in keys {
                g.recompute(&k, &mut failed);
            }
            g.record_failures(&failed);
            g.loaded = true;
            g.publish_resolved(&s.resolved);
            g.confirmed.entries()
        };
        s.metrics.largest_shard_bytes.store(largest as u64, Ordering::Relaxed);
        s.metrics.reloads.fetch_add(1, Ordering::Relaxed);
        tracing::info!(application = %s.app, live_entries = live, elapsed_ms = started.elapsed().as_millis() as u64, "token state loaded");
        Ok(())
    }

    /// Applies a journal newer than what was applied. Returns false when a reload is needed (a gap).
    fn absorb_journal(&self, cm: &ConfigMap) -> Result<bool, String> {
        let s = &self.shared;
        let view = journal_view(cm);
        let mut g = s.lock();
        // Every journal write moves (last seq, base) forward; anything else is an old or repeated delivery.
        if (view.last_seq(), view.base) <= (g.journal.last_seq(), g.journal.base) {
            tracing::debug!(application = %s.app, seen = view.last_seq(), applied = g.applied_seq, "journal already applied");
            return Ok(true);
        }
        tracing::debug!(application = %s.app, seen = view.last_seq(), base = view.base, applied = g.applied_seq, "applying the journal");
        if view.base > g.applied_seq {
            return Ok(false); // records we never saw were compacted away
        }
        let mut touched = Vec::new();
        for (field, text) in data(cm) {
            let Some(first) = batch_first_seq(field) else { continue };
            let n = view.batches.get(&first).map_or(0, |(n, _)| *n) as u64;
            if first + n <= g.applied_seq + 1 {
                continue;
            }
            let records = decode_lines(text).map_err(|e| format!("ConfigMap {}: {field}: {e}", s.journal_name))?;
            s.metrics.remote_records.fetch_add(records.len() as u64, Ordering::Relaxed);
            touched.extend(g.apply_records(first, records, true));
        }
        s.metrics.journal_bytes.store(view.bytes() as u64, Ordering::Relaxed);
        g.journal = view;
        let mut failed = Vec::new();
        let keys: HashSet<TokenKey> = touched.into_iter().collect();
        for k in keys {
            g.recompute(&k, &mut failed);
        }
        g.record_failures(&failed);
        g.publish_resolved(&s.resolved);
        Ok(true)
    }

    /// Takes in the journal the watch delivered, if it is news.
    async fn absorb_watched(&self) {
        let latest = self.shared.watched.borrow().clone();
        let Some((cm, arrived)) = latest else { return };
        match self.absorb_journal(&cm) {
            Ok(true) => {}
            Ok(false) | Err(_) => {
                if let Err(e) = self.load().await {
                    tracing::warn!(application = %self.shared.app, error = %e, "reloading the token state failed");
                }
            }
        }
        self.shared.metrics.watch_apply.observe(arrived.elapsed().as_secs_f64());
    }

    async fn writer_loop(&self) {
        let s = &self.shared;
        let interval = Duration::from_secs_f64(1.0 / s.options.writes_per_second.max(0.01));
        let mut last_write = Instant::now() - interval;
        let mut watched_rx = s.watched.subscribe();
        // Whatever the watch delivered while the state was loading may be news too.
        let mut watch_news = true;
        let mut retried_conflict = false;
        loop {
            if watch_news || watched_rx.has_changed().unwrap_or(false) {
                watched_rx.borrow_and_update();
                watch_news = false;
                self.absorb_watched().await;
            }
            let has_pending = {
                let g = s.lock();
                !g.pending.is_empty() || !g.failures_out.is_empty()
            };
            if !has_pending {
                tokio::select! {
                    () = s.wake.notified() => {}
                    // `changed` marks the value seen: remember to absorb it.
                    _ = watched_rx.changed() => watch_news = true,
                    () = tokio::time::sleep(Duration::from_secs(30)) => {
                        let now = s.clock.now();
                        s.lock().confirmed.prune(now);
                    }
                }
                continue;
            }
            // The write budget: one journal write per interval. Changes arriving meanwhile join the batch, and
            // another replica's write arriving meanwhile is applied first, so that this write is not a sure 409.
            let wait = interval.saturating_sub(last_write.elapsed());
            if !wait.is_zero() {
                tokio::select! {
                    () = tokio::time::sleep(wait) => {}
                    _ = watched_rx.changed() => watch_news = true,
                }
                continue;
            }
            last_write = Instant::now();
            let written = self.write_batch().await;
            if written == Written::Conflict && !retried_conflict {
                // The journal was just read: retry once at once rather than a whole interval later. Further
                // conflicts in a row wait for their write slot, so that a conflict storm stays within the budget.
                last_write -= interval;
                retried_conflict = true;
            } else {
                retried_conflict = false;
            }
            self.maybe_compact().await;
        }
    }

    /// Sends the pending changes as one journal batch.
    async fn write_batch(&self) -> Written {
        let s = &self.shared;
        let (body, first_seq, records, rv) = {
            let mut g = s.lock();
            if g.pending.is_empty() && g.failures_out.is_empty() {
                return Written::Nothing;
            }
            let batch: Vec<Pending> = g.pending.drain(..).collect();
            g.inflight = batch;
            g.failures_inflight = std::mem::take(&mut g.failures_out);
            let records: Vec<Record> = g
                .failures_inflight
                .iter()
                .map(|f| Record::Failed { f: f.clone() })
                .chain(g.inflight.iter().map(|p| Record::from(p.change.clone())))
                .collect();
            let first_seq = g.journal.last_seq() + 1;
            let text = match encode_lines(&records) {
                Ok(t) => t,
                Err(e) => {
                    drop(g);
                    self.fail_inflight(&format!("encoding records failed: {e}"));
                    return Written::Failed;
                }
            };
            let body = json!({
                "metadata": {"resourceVersion": g.journal.rv},
                "data": {batch_field(first_seq): text},
            });
            (body, first_seq, records, g.journal.rv.clone())
        };
        let bytes = body.to_string().len() as u64;
        let result = tokio::time::timeout(
            s.options.commit_timeout,
            s.api.patch(
                &s.journal_name,
                &PatchParams { field_manager: Some(FIELD_MANAGER.into()), ..PatchParams::default() },
                &Patch::Merge(&body),
            ),
        )
        .await;
        s.metrics.bytes_written.fetch_add(bytes, Ordering::Relaxed);
        match result {
            Ok(Ok(cm)) => {
                s.metrics.journal_writes.fetch_add(1, Ordering::Relaxed);
                s.metrics.batches.observe(records.len() as f64);
                let mut g = s.lock();
                let n = records.len();
                g.apply_records(first_seq, records, false);
                g.failures_inflight.clear();
                let new_rv = cm.metadata.resource_version.clone().unwrap_or_default();
                g.journal.rv = new_rv;
                g.journal.batches.insert(first_seq, (n, bytes as usize));
                s.metrics.journal_bytes.store(g.journal.bytes() as u64, Ordering::Relaxed);
                let done: Vec<Pending> = std::mem::take(&mut g.inflight);
                let keys: HashSet<TokenKey> = done.iter().map(|p| p.change.key.clone()).collect();
                for mut p in done {
                    if let Some(tx) = p.done.take() {
                        let _ = tx.send(Ok(()));
                    }
                }
                let mut failed = Vec::new();
                for k in keys {
                    g.recompute(&k, &mut failed);
                }
                g.record_failures(&failed);
                g.publish_resolved(&s.resolved);
                Written::Accepted
            }
            Ok(Err(kube::Error::Api(e))) if e.code == 409 => {
                s.metrics.conflicts.fetch_add(1, Ordering::Relaxed);
                tracing::debug!(application = %s.app, %rv, "journal append conflicted; catching up");
                // Put the batch back in front, read what the other replicas wrote, and re-check.
                {
                    let mut g = s.lock();
                    let batch = std::mem::take(&mut g.inflight);
                    for p in batch.into_iter().rev() {
                        g.pending.push_front(p);
                    }
                    let failures = std::mem::take(&mut g.failures_inflight);
                    g.failures_out.extend(failures);
                }
                match s.api.get(&s.journal_name).await {
                    Ok(cm) => {
                        // The journal just read is the newest there is: if it is not ahead of what was applied, it
                        // was replaced (the application deleted and created again), so start over from it.
                        let replaced = {
                            let view = journal_view(&cm);
                            let g = s.lock();
                            view.rv != g.journal.rv
                                && (view.last_seq(), view.base) <= (g.journal.last_seq(), g.journal.base)
                        };
                        if (replaced || !matches!(self.absorb_journal(&cm), Ok(true)))
                            && let Err(e) = self.load().await
                        {
                            tracing::warn!(application = %s.app, error = %e, "reloading the token state failed");
                        }
                    }
                    Err(e) => self.fail_pending(&format!("reading the journal failed: {e}")),
                }
                Written::Conflict
            }
            Ok(Err(e)) => {
                s.metrics.write_failures.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(application = %s.app, error = %e, "journal write failed");
                self.fail_inflight(&format!("the Kubernetes API refused the token state write: {e}"));
                Written::Failed
            }
            Err(_) => {
                s.metrics.write_failures.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(application = %s.app, "journal write timed out");
                // It may still land: the watch then brings it back as a remote change nobody holds a token for.
                self.fail_inflight("the Kubernetes API did not answer in time");
                Written::Failed
            }
        }
    }

    fn fail_inflight(&self, reason: &str) {
        let s = &self.shared;
        let mut g = s.lock();
        // Shared failures are best effort: a lost one costs the attacker nothing extra beyond one batch.
        g.failures_inflight.clear();
        let batch = std::mem::take(&mut g.inflight);
        self.fail(&mut g, batch, reason);
    }

    fn fail_pending(&self, reason: &str) {
        let s = &self.shared;
        let mut g = s.lock();
        let batch: Vec<Pending> = g.pending.drain(..).collect();
        self.fail(&mut g, batch, reason);
    }

    fn fail(&self, g: &mut Inner, batch: Vec<Pending>, reason: &str) {
        let keys: HashSet<TokenKey> = batch.iter().map(|p| p.change.key.clone()).collect();
        let mut failed: Vec<u64> = batch.iter().map(|p| p.id).collect();
        for mut p in batch {
            if let Some(tx) = p.done.take() {
                let _ = tx.send(Err(StoreError::Unavailable(reason.to_string())));
            }
        }
        for k in keys {
            g.recompute(&k, &mut failed);
        }
        g.record_failures(&failed);
        g.publish_resolved(&self.shared.resolved);
    }

    /// Writes the changed shards and trims the journal once it is large.
    async fn maybe_compact(&self) {
        let s = &self.shared;
        let (upto, shards) = {
            let mut g = s.lock();
            if g.journal.bytes() < s.options.compact_bytes || !g.inflight.is_empty() {
                return;
            }
            let now = s.clock.now();
            g.confirmed.prune(now);
            let mut buckets: Vec<Vec<Record>> = (0..SHARDS).map(|_| Vec::new()).collect();
            for r in g.confirmed.snapshot() {
                if let Some(key) = record_key(&r) {
                    buckets[shard_of(key)].push(r);
                }
            }
            let dirty = g.shard_dirty;
            let shards: Vec<(usize, String)> = buckets
                .into_iter()
                .enumerate()
                .filter(|(i, _)| dirty[*i])
                .filter_map(|(i, records)| encode_lines(&records).ok().map(|t| (i, t)))
                .collect();
            (g.applied_seq, shards)
        };
        let params = PatchParams { field_manager: Some(FIELD_MANAGER.into()), ..PatchParams::default() };
        for (i, text) in shards {
            let name = shard_name(&s.app, i);
            if text.len() > MAX_OBJECT_BYTES {
                tracing::error!(application = %s.app, shard = %name, bytes = text.len(), "a token-state shard would exceed the object size limit; not compacting");
                return;
            }
            s.metrics.largest_shard_bytes.fetch_max(text.len() as u64, Ordering::Relaxed);
            // Shards are written without a precondition: a concurrent compaction writes the same content for an
            // equal `upto`, and a shard is never written with a smaller `upto` than the one it holds.
            let current = match s.api.get(&name).await {
                Ok(cm) => cm,
                Err(e) => {
                    tracing::warn!(application = %s.app, error = %e, "compaction: reading a shard failed");
                    return;
                }
            };
            if parse_u64(&current, UPTO_FIELD) >= upto {
                continue;
            }
            let body = json!({
                "metadata": {"resourceVersion": current.metadata.resource_version},
                "data": {UPTO_FIELD: upto.to_string(), ENTRIES_FIELD: text},
            });
            s.metrics.bytes_written.fetch_add(body.to_string().len() as u64, Ordering::Relaxed);
            if let Err(e) = s.api.patch(&name, &params, &Patch::Merge(&body)).await {
                tracing::warn!(application = %s.app, error = %e, "compaction: writing a shard failed");
                return;
            }
            s.metrics.compaction_writes.fetch_add(1, Ordering::Relaxed);
            let mut g = s.lock();
            g.shard_upto[i] = upto;
            g.shard_dirty[i] = false;
        }
        // Every shard now holds its keys' state up to `upto`: the batches up to there can go.
        for _ in 0..5 {
            let body = {
                let g = s.lock();
                let mut fields = serde_json::Map::new();
                fields.insert(BASE_FIELD.into(), json!(upto.max(g.journal.base).to_string()));
                for (first, (n, _)) in &g.journal.batches {
                    if first + *n as u64 - 1 <= upto {
                        fields.insert(batch_field(*first), serde_json::Value::Null);
                    }
                }
                json!({"metadata": {"resourceVersion": g.journal.rv}, "data": fields})
            };
            s.metrics.bytes_written.fetch_add(body.to_string().len() as u64, Ordering::Relaxed);
            match s.api.patch(&s.journal_name, &params, &Patch::Merge(&body)).await {
                Ok(cm) => {
                    s.metrics.compaction_writes.fetch_add(1, Ordering::Relaxed);
                    let view = journal_view(&cm);
                    s.metrics.journal_bytes.store(view.bytes() as u64, Ordering::Relaxed);
                    let mut g = s.lock();
                    if view.last_seq() <= g.applied_seq {
                        g.journal = view;
                    }
                    return;
                }
                Err(kube::Error::Api(e)) if e.code == 409 => {
                    s.metrics.conflicts.fetch_add(1, Ordering::Relaxed);
                    match s.api.get(&s.journal_name).await {
                        Ok(cm) => {
                            if !matches!(self.absorb_journal(&cm), Ok(true)) {
                                return; // a gap: someone else compacted further; the next load sorts it out
                            }
                        }
                        Err(_) => return,
                    }
                }
                Err(e) => {
                    tracing::warn!(application = %s.app, error = %e, "compaction: trimming the journal failed");
                    return;
                }
            }
        }
    }
}

/// What a journal write came to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Written {
    Nothing,
    Accepted,
    Conflict,
    Failed,
}

struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

impl TokenStore for KubeStore {
    fn pair(&self, key: &TokenKey) -> Option<LivePair> {
        self.shared.lock().view_pair(key)
    }

    fn find_access(&self, id: &TokenId) -> Option<(SharedKey, LivePair)> {
        let g = self.shared.lock();
        if let Some(key) = g.overlay.access.get(id) {
            let pair = g.overlay.pairs.get(key)?.pair.clone()?;
            return (pair.access_id == *id).then(|| (key.clone(), pair));
        }
        g.confirmed.find_access(id).filter(|(k, _)| !g.overlay.pairs.contains_key(k))
    }

    fn find_refresh(&self, id: &TokenId) -> RefreshLookup {
        let g = self.shared.lock();
        if let Some((key, rotated)) = g.overlay.refresh.get(id) {
            if *rotated {
                return RefreshLookup::Rotated { key: key.clone() };
            }
            return match g.overlay.pairs.get(key).and_then(|e| e.pair.clone()) {
                Some(pair) if pair.refresh.is_some_and(|r| r.id == *id) => {
                    RefreshLookup::Live { key: key.clone(), pair }
                }
                _ => RefreshLookup::Unknown,
            };
        }
        match g.confirmed.find_refresh(id) {
            RefreshLookup::Live { key, .. } if g.overlay.pairs.contains_key(&key) => RefreshLookup::Unknown,
            other => other,
        }
    }

    fn commit(&self, change: Change) -> StoreFuture<'_, ()> {
        let s = &self.shared;
        let accepted = (|| {
            let mut g = s.lock();
            if !g.loaded {
                return Err(unavailable("the token state is not loaded yet"));
            }
            if g.view_pair(&change.key).map(|p| p.access_id) != change.expect {
                return Err(StoreError::Conflict);
            }
            let (tx, rx) = oneshot::channel();
            let id = g.next_id;
            g.next_id += 1;
            let key = change.key.clone();
            g.pending.push_back(Pending { id, change, done: Some(tx) });
            let mut failed = Vec::new();
            g.recompute(&key, &mut failed);
            Ok(rx)
        })();
        if accepted.is_ok() {
            s.wake.notify_one();
        }
        let timeout = s.options.commit_timeout + s.options.commit_timeout;
        Box::pin(async move {
            let rx = accepted?;
            match tokio::time::timeout(timeout, rx).await {
                Ok(Ok(result)) => result,
                Ok(Err(_)) => Err(unavailable("the token state writer stopped")),
                Err(_) => Err(unavailable("the Kubernetes API did not accept the change in time")),
            }
        })
    }

    fn sync(&self) -> StoreFuture<'_, ()> {
        let s = &self.shared;
        let (upto, floor) = {
            let g = s.lock();
            (g.next_id, g.resolved_below)
        };
        let mut rx = s.resolved.subscribe();
        let timeout = s.options.commit_timeout + s.options.commit_timeout;
        Box::pin(async move {
            match tokio::time::timeout(timeout, rx.wait_for(|r| *r >= upto)).await {
                Ok(Ok(_)) => {}
                _ => return Err(unavailable("the Kubernetes API did not accept earlier changes in time")),
            }
            // A change seen by the caller failed: what it read may never have been stored.
            let failed = s.lock().recent_failures.iter().any(|id| *id >= floor && *id < upto);
            if failed { Err(StoreError::Conflict) } else { Ok(()) }
        })
    }

    fn healthy(&self) -> bool {
        self.loaded()
    }

    fn share_failure(&self, failure: SharedFailure) {
        let mut g = self.shared.lock();
        // Bounded: under a flood, the counts that matter are the first ones.
        if g.failures_out.len() < 1_000 {
            g.failures_out.push(failure);
            drop(g);
            self.shared.wake.notify_one();
        }
    }

    fn take_shared_failures(&self) -> Vec<SharedFailure> {
        let mut g = self.shared.lock();
        if g.failures_in.is_empty() { Vec::new() } else { std::mem::take(&mut g.failures_in) }
    }
}

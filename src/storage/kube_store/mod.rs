//! The in-cluster storage adapter: token state in ConfigMaps shared by every sidecar replica of an application.
//!
//! Design (see ARCHITECTURE.md and [`layout`]):
//! - The **journal** is a ring of small segment ConfigMaps and the single order of all changes. A replica appends
//!   a batch (group commit) to the open segment with a JSON merge patch that carries the `resourceVersion` it last
//!   saw: the API server's optimistic concurrency makes the append a compare-and-set over the whole log, so a
//!   replica can only append on top of every change it has applied. On 409 it reads the segment, applies the
//!   other replicas' records, re-checks its pending changes (those now deciding on a stale pair fail with
//!   `Conflict`, and the core decides them again) and appends the rest.
//! - The append that fills a segment **seals** it in the same write, so no replica can append to it afterwards;
//!   the next append opens the following segment of the ring. Segments stay small, so an append rewrites (and
//!   every replica's watch receives) a small object, whatever the number of live tokens.
//! - When most of the ring holds records newer than the snapshot, one replica **compacts**: it claims the
//!   snapshot pointer (a compare-and-set), writes the whole state into the inactive set of snapshot chunks (each
//!   write conditional on the chunk's version read after the claim), then switches the pointer (conditional on its
//!   claim). A replica that was overtaken fails one of those conditions and gives up; a crash leaves the previous
//!   snapshot in place. Segments whose records the snapshot holds are then free for reuse.
//! - Every replica watches the open segment, so a change made through one replica is visible at the others after
//!   the watch delivers it.
//!
//! Promise, as for the local store: `commit` resolves only once the API server accepted the journal write that
//! contains the change; a failed or timed-out write fails the request (503), never answers with a token whose
//! predecessor's revocation was not stored.

pub mod codec;
pub mod layout;
#[cfg(test)]
mod tests;

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use base64::Engine;
use base64::engine::general_purpose::STANDARD as BASE64;
use futures::StreamExt;
use k8s_openapi::api::core::v1::ConfigMap;
use kube::api::{Api, Patch, PatchParams};
use kube::runtime::watcher;
use serde_json::json;
use tokio::sync::{Notify, oneshot, watch};

use self::layout::{
    CAPACITY_FIELD, CHUNKS_FIELD, CHUNKS_PER_SET, CLAIM_FIELD, EPOCH_FIELD, GEN_FIELD, KEYS_FIELD, SEALED_FIELD,
    SEGMENTS, SET_FIELD, STATE_FIELD, UPTO_FIELD, batch_field, chunk_name, pointer_name, segment_name,
};
use crate::core::clock::{Clock, UnixTime};
use crate::core::lockout::SharedFailure;
use crate::core::model::{Change, LivePair, SharedKey, TokenId, TokenKey};
use crate::core::state::{Record, TokenState};
use crate::core::store::{StoreError, StoreFuture, TokenStore};
use crate::metrics::Histogram;

const FIELD_MANAGER: &str = "kubetoken-sidecar";
/// Compact once this many segments hold records the snapshot does not (leaving a quarter of the ring as slack
/// for the appends made while the snapshot is written).
const COMPACT_AT_SEGMENTS: usize = SEGMENTS * 3 / 4;
/// While another replica's snapshot claim stands, how often this replica reads the pointer again to see whether
/// the snapshot was switched or the claim abandoned (rather than after every journal append).
const CLAIM_RECHECK_INTERVAL: Duration = Duration::from_secs(1);
/// Records in one journal batch at most, so that one append stays far below the object size limit.
const MAX_BATCH_RECORDS: usize = 2048;
/// Loads retried at once when a compaction moved the state underneath the reads.
const LOAD_ATTEMPTS: usize = 5;
/// Snapshot bytes per live key assumed until a snapshot of at least [`MEASURED_KEYS`] keys was read or written (a
/// user's device key with access and refresh token takes 69 to 71; BENCHMARKS.md, "Capacity").
const DEFAULT_BYTES_PER_KEY: f64 = 72.0;
const MEASURED_KEYS: usize = 1000;
/// Room kept free below the snapshot's capacity: keys differ in size, and the estimate is the last snapshot's.
const CAPACITY_MARGIN: f64 = 0.98;
/// While the state is full, expired pairs are pruned (to make room) at most this often.
const FULL_PRUNE_INTERVAL: Duration = Duration::from_secs(10);
/// A compaction that failed is tried again after 1, 2, 4 ... seconds, at most this long.
const MAX_COMPACTION_BACKOFF: Duration = Duration::from_secs(60);

#[derive(Debug, Clone)]
pub struct KubeStoreOptions {
    /// Journal writes per second this replica may make (the API write budget; compaction writes excepted).
    pub writes_per_second: f64,
    /// A journal segment is sealed once it holds this many bytes of records.
    pub segment_bytes: usize,
    /// How long a commit may wait for the API server before the request fails with 503.
    pub commit_timeout: Duration,
    /// A claim on the snapshot pointer left unchanged this long is taken to be abandoned (its holder crashed).
    pub claim_timeout: Duration,
    /// The most snapshot bytes there is room for ([`layout::SNAPSHOT_CAPACITY_BYTES`]; smaller in tests).
    pub snapshot_capacity_bytes: usize,
}

impl Default for KubeStoreOptions {
    fn default() -> Self {
        Self {
            writes_per_second: 4.8,
            segment_bytes: 64 * 1024,
            commit_timeout: Duration::from_secs(5),
            claim_timeout: Duration::from_secs(30),
            snapshot_capacity_bytes: layout::SNAPSHOT_CAPACITY_BYTES,
        }
    }
}

/// Counters for `/metrics`.
#[derive(Debug)]
pub struct KubeStoreMetrics {
    pub journal_writes: AtomicU64,
    pub compaction_writes: AtomicU64,
    pub compactions: AtomicU64,
    pub bytes_written: AtomicU64,
    pub object_bytes_written: AtomicU64,
    pub conflicts: AtomicU64,
    pub write_failures: AtomicU64,
    pub journal_full: AtomicU64,
    pub remote_records: AtomicU64,
    pub reloads: AtomicU64,
    pub journal_bytes: AtomicU64,
    pub snapshot_bytes: AtomicU64,
    /// Live token keys in the confirmed state.
    pub live_keys: AtomicU64,
    /// The live keys the snapshot has room for, at the last snapshot's bytes per key.
    pub capacity_keys: AtomicU64,
    /// Requests refused because the state was full.
    pub full_refusals: AtomicU64,
    /// Seconds from a remote journal write's arrival in the watch to its records being applied.
    pub watch_apply: Histogram,
    pub batches: Arc<Histogram>,
}

impl KubeStoreMetrics {
    pub fn new(batches: Arc<Histogram>) -> Self {
        Self {
            journal_writes: AtomicU64::new(0),
            compaction_writes: AtomicU64::new(0),
            compactions: AtomicU64::new(0),
            bytes_written: AtomicU64::new(0),
            object_bytes_written: AtomicU64::new(0),
            conflicts: AtomicU64::new(0),
            write_failures: AtomicU64::new(0),
            journal_full: AtomicU64::new(0),
            remote_records: AtomicU64::new(0),
            reloads: AtomicU64::new(0),
            journal_bytes: AtomicU64::new(0),
            snapshot_bytes: AtomicU64::new(0),
            live_keys: AtomicU64::new(0),
            capacity_keys: AtomicU64::new(0),
            full_refusals: AtomicU64::new(0),
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
            (
                "kubetoken_kube_compaction_writes_total",
                &self.compaction_writes,
                "Snapshot claim, chunk and pointer writes.",
            ),
            ("kubetoken_kube_compactions_total", &self.compactions, "Snapshots written by this replica."),
            ("kubetoken_kube_bytes_written_total", &self.bytes_written, "Request body bytes of state writes."),
            (
                "kubetoken_kube_object_bytes_written_total",
                &self.object_bytes_written,
                "Bytes of the state objects as stored after each accepted write (what the API server writes and sends to every watcher).",
            ),
            ("kubetoken_kube_conflicts_total", &self.conflicts, "409 Conflict answers to state writes."),
            ("kubetoken_kube_write_failures_total", &self.write_failures, "State writes that failed otherwise."),
            (
                "kubetoken_kube_journal_full_total",
                &self.journal_full,
                "Batches held back because every journal segment awaited compaction.",
            ),
            ("kubetoken_kube_remote_records_total", &self.remote_records, "Records applied from other replicas."),
            ("kubetoken_kube_reloads_total", &self.reloads, "Full state loads (start, gaps)."),
            (
                "kubetoken_kube_full_refusals_total",
                &self.full_refusals,
                "Requests for a new token key refused because the token state was at its capacity.",
            ),
        ];
        for (name, v, help) in counters {
            let _ = writeln!(
                out,
                "# HELP {name} {help}\n# TYPE {name} counter\n{name}{{{l}}} {}",
                v.load(Ordering::Relaxed)
            );
        }
        let gauges = [
            ("kubetoken_kube_journal_bytes", &self.journal_bytes, "Bytes of journal records not yet in the snapshot."),
            ("kubetoken_kube_snapshot_bytes", &self.snapshot_bytes, "Bytes of the last snapshot read or written."),
            ("kubetoken_kube_live_keys", &self.live_keys, "Live token keys in the application's state."),
            (
                "kubetoken_kube_capacity_keys",
                &self.capacity_keys,
                "Live token keys the state has room for, at the last snapshot's bytes per key.",
            ),
        ];
        for (name, v, help) in gauges {
            let _ =
                writeln!(out, "# HELP {name} {help}\n# TYPE {name} gauge\n{name}{{{l}}} {}", v.load(Ordering::Relaxed));
        }
        let used =
            self.live_keys.load(Ordering::Relaxed) as f64 / self.capacity_keys.load(Ordering::Relaxed).max(1) as f64;
        let _ = writeln!(
            out,
            "# HELP kubetoken_kube_capacity_used_ratio Live token keys over capacity (1: new keys are refused).\n# TYPE kubetoken_kube_capacity_used_ratio gauge\nkubetoken_kube_capacity_used_ratio{{{l}}} {used:.4}"
        );
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
    /// Refresh id → its key.
    refresh: HashMap<TokenId, SharedKey>,
}

struct OverlayEntry {
    pair: Option<LivePair>,
    ids: Vec<TokenId>,
}

/// A journal segment as last seen.
#[derive(Default, Clone, Debug)]
struct SegmentView {
    rv: String,
    /// The sequence number of its first record; 0 for a segment never used.
    epoch: u64,
    /// first seq → (records, bytes)
    batches: BTreeMap<u64, (usize, usize)>,
    sealed: Option<u64>,
}

impl SegmentView {
    fn last_seq(&self) -> u64 {
        self.batches.iter().next_back().map_or(self.epoch.saturating_sub(1), |(first, (n, _))| first + *n as u64 - 1)
    }
    fn bytes(&self) -> usize {
        self.batches.values().map(|(_, b)| b).sum()
    }
    /// Orders the versions of one segment: a later version is never smaller.
    fn progress(&self) -> (u64, u64, bool) {
        (self.epoch, self.last_seq(), self.sealed.is_some())
    }
    fn from_object(cm: &ConfigMap) -> Result<Self, String> {
        let mut batches = BTreeMap::new();
        for (field, bytes) in cm.binary_data.iter().flatten() {
            if let Some((first, n)) = layout::batch_of(field) {
                batches.insert(first, (n, bytes.0.len()));
            }
        }
        let view = Self {
            rv: cm.metadata.resource_version.clone().unwrap_or_default(),
            epoch: parse_u64(cm, EPOCH_FIELD)?,
            batches,
            sealed: data(cm)
                .get(SEALED_FIELD)
                .map(|v| v.trim().parse::<u64>())
                .transpose()
                .map_err(|e| format!("{SEALED_FIELD}: {e}"))?,
        };
        // The batches of one segment follow each other without gaps, from its epoch on.
        let mut next = view.epoch;
        for (first, (n, _)) in &view.batches {
            if *first != next {
                return Err(format!("batch {first} does not follow record {}", next.saturating_sub(1)));
            }
            next = first + *n as u64;
        }
        Ok(view)
    }
}

/// The snapshot pointer as last seen.
#[derive(Default, Clone, Debug)]
struct PointerView {
    rv: String,
    set: usize,
    chunks: usize,
    upto: u64,
    generation: String,
    claim: Option<String>,
}

impl PointerView {
    fn from_object(cm: &ConfigMap) -> Result<Self, String> {
        let set = parse_u64(cm, SET_FIELD)? as usize;
        let chunks = parse_u64(cm, CHUNKS_FIELD)? as usize;
        if set > 1 || chunks > CHUNKS_PER_SET {
            return Err(format!("{SET_FIELD} {set} or {CHUNKS_FIELD} {chunks} out of range"));
        }
        Ok(Self {
            rv: cm.metadata.resource_version.clone().unwrap_or_default(),
            set,
            chunks,
            upto: parse_u64(cm, UPTO_FIELD)?,
            generation: data(cm).get(GEN_FIELD).cloned().unwrap_or_default(),
            claim: data(cm).get(CLAIM_FIELD).cloned().filter(|c| !c.is_empty()),
        })
    }
}

/// What became of a change whose request gave up waiting.
enum Withdrawal {
    Withdrawn,
    BeingWritten,
    Resolved,
}

/// Shared failed checks or used assertions queued for the journal, at most: under a flood the first ones are shared.
const MAX_SHARED_RECORDS: usize = 1_000;

/// An assertion's replay id as the journal names it: a digest (fixed size, nothing of the token in the state).
fn used_digest(id: &str) -> [u8; 32] {
    let digest = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, id.as_bytes());
    let mut d = [0u8; 32];
    d.copy_from_slice(digest.as_ref());
    d
}

/// Assertions known used (here or at another replica), until when; bounded, expired ones swept.
#[derive(Default)]
struct UsedAssertions {
    until: HashMap<[u8; 32], UnixTime>,
    sweep_at: usize,
    /// When the last sweep ran: a full memory is swept again at most once per second.
    swept_at: UnixTime,
    /// The time of the last use asked about here: what records read from the journal are swept against.
    now: UnixTime,
}

impl UsedAssertions {
    /// Live entries beyond which a new use is not remembered (a replay of it then passes here, as without sharing).
    const MAX: usize = 200_000;

    fn live(&self, d: &[u8; 32], now: UnixTime) -> bool {
        self.until.get(d).is_some_and(|u| *u > now)
    }

    fn insert(&mut self, d: [u8; 32], until: UnixTime) {
        self.sweep(self.now);
        if self.until.len() < Self::MAX || self.until.contains_key(&d) {
            let at = self.until.entry(d).or_insert(until);
            *at = (*at).max(until);
        }
    }

    fn remove(&mut self, d: &[u8; 32]) {
        self.until.remove(d);
    }

    /// Drops expired entries once the map has doubled since the last sweep (never waiting past [`Self::MAX`]), and
    /// when full at most once per second: amortised O(1).
    fn sweep(&mut self, now: UnixTime) {
        let full = self.until.len() >= Self::MAX;
        if (!full && self.until.len() >= self.sweep_at.clamp(1024, Self::MAX)) || (full && self.swept_at < now) {
            self.until.retain(|_, u| *u > now);
            self.sweep_at = self.until.len() * 2;
            self.swept_at = now;
        }
    }
}

struct Inner {
    confirmed: TokenState,
    overlay: Overlay,
    /// Accepted by `commit`, not yet sent.
    pending: VecDeque<Pending>,
    /// Being written now.
    inflight: Vec<Pending>,
    /// Ids in `inflight` whose requests gave up: if the write hands them back to the queue, they are dropped.
    withdrawn_inflight: HashSet<u64>,
    /// Failed credential checks to share with the other replicas (with the next batch; best effort).
    failures_out: Vec<SharedFailure>,
    /// In the batch being written now.
    failures_inflight: Vec<SharedFailure>,
    /// Shared by the other replicas, for the lockout.
    failures_in: Vec<SharedFailure>,
    /// Assertions used at this replica, to share with the others (with the next batch; best effort).
    used_out: Vec<([u8; 32], UnixTime)>,
    /// In the batch being written now.
    used_inflight: Vec<([u8; 32], UnixTime)>,
    /// Assertions used at any replica, as far as this one has read the journal: digest → until when.
    used_seen: UsedAssertions,
    next_id: u64,
    /// Ids below this are resolved.
    resolved_below: u64,
    /// Ids of recently failed changes (for `sync`).
    recent_failures: VecDeque<u64>,
    /// The last journal record applied to `confirmed`.
    applied_seq: u64,
    segments: Vec<SegmentView>,
    /// The segment with the newest records: appends go there, or to the next one once it is sealed.
    head: usize,
    pointer: PointerView,
    /// A claim on the pointer held by another replica, and when this replica first saw it.
    claim_seen: Option<(String, Instant)>,
    /// When this replica last found another replica's claim standing: it looks again only after
    /// [`CLAIM_RECHECK_INTERVAL`], not after every append.
    claim_checked: Option<Instant>,
    loaded: bool,
    /// Snapshot bytes per live key, as the last snapshot of a measurable size read or written had them.
    bytes_per_key: f64,
    /// When expired pairs were last pruned to make room in a full state.
    full_pruned: Option<Instant>,
    /// No compaction before this (after failed ones), and how many failed in a row.
    compact_after: Option<Instant>,
    compaction_failures: u32,
}

struct Shared {
    api: Api<ConfigMap>,
    app: String,
    inner: Mutex<Inner>,
    wake: Notify,
    /// The segment the watch follows: the head, or the next one once the head is sealed and applied.
    follow: watch::Sender<usize>,
    /// The segment as the watch last delivered it, for the writer.
    watched: watch::Sender<Option<(usize, Arc<ConfigMap>, Instant)>>,
    /// A compaction task of this replica is running.
    compacting: AtomicBool,
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

    /// After records were applied to the confirmed state: re-decides the pending changes of `keys` on the new view,
    /// tells waiting readers what is resolved, and moves the watch on if the head was sealed.
    fn settle(&self, g: &mut Inner, keys: HashSet<TokenKey>) {
        let mut failed = Vec::new();
        for k in keys {
            g.recompute(&k, &mut failed);
        }
        g.record_failures(&failed);
        g.publish_resolved(&self.resolved);
        self.publish_journal_bytes(g);
        self.publish_capacity(g);
        let target = g.follow_target();
        self.follow.send_if_modified(|f| std::mem::replace(f, target) != *f);
    }

    /// Takes a change whose request gave up out of the queue and the overlay, if it was not sent yet; later
    /// changes of its key that were decided on it fail with `Conflict` and are decided again. A change being
    /// written is marked instead: the write's outcome decides it, and if the write hands it back to the queue
    /// (a conflict, a full journal) it is dropped there, never sent later.
    fn withdraw(&self, id: u64) -> Withdrawal {
        let mut g = self.lock();
        if let Some(p) = g.pending.iter().position(|p| p.id == id).and_then(|at| g.pending.remove(at)) {
            let mut failed = vec![id];
            g.recompute(&p.change.key, &mut failed);
            g.record_failures(&failed);
            g.publish_resolved(&self.resolved);
            return Withdrawal::Withdrawn;
        }
        if g.inflight.iter().any(|p| p.id == id) {
            g.withdrawn_inflight.insert(id);
            return Withdrawal::BeingWritten;
        }
        Withdrawal::Resolved
    }

    fn publish_capacity(&self, g: &Inner) {
        self.metrics.live_keys.store(g.confirmed.entries() as u64, Ordering::Relaxed);
        self.metrics.capacity_keys.store(g.capacity_keys(&self.options) as u64, Ordering::Relaxed);
    }

    /// Whether a change that adds a key must be refused because the state is at its capacity. Expired pairs are
    /// pruned first (at most every [`FULL_PRUNE_INTERVAL`]), as a snapshot would.
    fn full(&self, g: &mut Inner) -> Option<String> {
        let capacity = g.capacity_keys(&self.options);
        if g.confirmed.entries() < capacity {
            return None;
        }
        if g.full_pruned.is_none_or(|t| t.elapsed() >= FULL_PRUNE_INTERVAL) {
            g.full_pruned = Some(Instant::now());
            let pruned = g.confirmed.prune(self.clock.now());
            self.publish_capacity(g);
            if pruned > 0 && g.confirmed.entries() < capacity {
                return None;
            }
        }
        Some(format!(
            "{} live token keys, the capacity of its {} KiB snapshot at {:.0} bytes per key",
            g.confirmed.entries(),
            self.options.snapshot_capacity_bytes / 1024,
            g.bytes_per_key
        ))
    }

    fn publish_journal_bytes(&self, g: &Inner) {
        self.metrics.journal_bytes.store(g.uncompacted_bytes() as u64, Ordering::Relaxed);
    }
}

impl Inner {
    /// The live keys a snapshot has room for at the measured bytes per key, less a margin.
    fn capacity_keys(&self, options: &KubeStoreOptions) -> usize {
        (options.snapshot_capacity_bytes as f64 * CAPACITY_MARGIN / self.bytes_per_key) as usize
    }

    /// Takes the bytes per key of a snapshot read or written, once it holds enough keys to say.
    fn measured(&mut self, keys: usize, bytes: usize) {
        if keys >= MEASURED_KEYS && bytes > 0 {
            self.bytes_per_key = bytes as f64 / keys as f64;
        }
    }

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
        // In-flight changes cannot fail here (the writer resolves them), but later ones may depend on them.
        for p in &self.inflight {
            if p.change.key == *key {
                current = p.change.next.clone();
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
                self.overlay.refresh.insert(r.id, shared.clone());
                ids.push(r.id);
            }
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
            match record {
                Record::Failed { f } => {
                    if remote && self.failures_in.len() < 10_000 {
                        self.failures_in.push(f);
                    }
                }
                Record::Used { d, u } => self.used_seen.insert(d, u),
                Record::Set { ref k, .. } => {
                    touched.push(k.clone());
                    self.confirmed.apply(record);
                }
                Record::LegacyRotated {} => {}
            }
        }
        touched
    }

    /// Where the next batch goes: the head, or the segment after it once the head is sealed.
    fn append_target(&self) -> usize {
        if self.segments[self.head].sealed.is_some() { (self.head + 1) % SEGMENTS } else { self.head }
    }

    /// Segments holding records the snapshot does not.
    fn uncompacted_segments(&self) -> usize {
        self.segments.iter().filter(|s| s.epoch > 0 && s.last_seq() > self.pointer.upto).count()
    }

    fn uncompacted_bytes(&self) -> usize {
        self.segments.iter().filter(|s| s.epoch > 0 && s.last_seq() > self.pointer.upto).map(SegmentView::bytes).sum()
    }

    /// Takes in a version of segment `index`, applying its records after `applied_seq`. `Ok(false)`: records
    /// before it were never seen here (a gap), so the state must be loaded again.
    fn absorb_segment(
        &mut self,
        index: usize,
        cm: &ConfigMap,
        remote: &AtomicU64,
    ) -> Result<(bool, Vec<TokenKey>), String> {
        let view = SegmentView::from_object(cm)?;
        if view.progress() < self.segments[index].progress() {
            return Ok((true, Vec::new())); // an older delivery
        }
        let mut touched = Vec::new();
        for (field, bytes) in cm.binary_data.iter().flatten() {
            let Some((first, n)) = layout::batch_of(field) else { continue };
            if first + n as u64 - 1 <= self.applied_seq {
                continue;
            }
            if first > self.applied_seq + 1 {
                return Ok((false, touched));
            }
            let records = codec::decode(&bytes.0).map_err(|e| format!("{field}: {e}"))?;
            if records.len() != n {
                return Err(format!("{field}: {} records", records.len()));
            }
            remote.fetch_add(n as u64, Ordering::Relaxed);
            touched.extend(self.apply_records(first, records, true));
        }
        if view.epoch > 0 && view.epoch >= self.segments[self.head].epoch {
            self.head = index;
        }
        self.segments[index] = view;
        Ok((true, touched))
    }

    /// The segment the watch should follow.
    fn follow_target(&self) -> usize {
        let head = &self.segments[self.head];
        if head.sealed.is_some_and(|s| s <= self.applied_seq) { (self.head + 1) % SEGMENTS } else { self.head }
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

/// A number field; a missing one is 0.
fn parse_u64(cm: &ConfigMap, field: &str) -> Result<u64, String> {
    data(cm).get(field).map_or(Ok(0), |v| v.trim().parse().map_err(|e| format!("{field}: {e}")))
}

/// The length of a value's JSON, counted without building it (a snapshot chunk's is close to 1 MiB). Of a stored
/// object: its size as the API server stores it, what every watcher of it receives.
fn json_bytes(value: &impl serde::Serialize) -> u64 {
    struct Count(u64);
    impl std::io::Write for Count {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0 += buf.len() as u64;
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    let mut count = Count(0);
    serde_json::to_writer(&mut count, value).map_or(0, |()| count.0)
}

/// Whether the segment holds `plan`'s batch, byte for byte (its records carry random token ids: nobody else's).
fn has_batch(cm: &ConfigMap, plan: &Append) -> bool {
    let field = batch_field(plan.first_seq, plan.records.len());
    let written = cm.binary_data.as_ref().and_then(|b| b.get(&field)).map(|b| BASE64.encode(&b.0));
    written.is_some_and(|w| plan.body["binaryData"][&field] == w.as_str())
}

/// An annotation a replica writes on a journal segment whose write went unanswered, to move its version on.
const FENCE_ANNOTATION: &str = "kubetoken.io/fence";

/// What became of a journal write that went unanswered.
enum TimedOut {
    /// It is in the segment (as read back).
    Landed(ConfigMap),
    /// It is not, and can no longer land (the segment as it now is).
    NotLanded(ConfigMap),
    /// The API server did not say.
    Unknown(String),
}

fn patch_params() -> PatchParams {
    PatchParams { field_manager: Some(FIELD_MANAGER.into()), ..PatchParams::default() }
}

/// A fresh claim on the snapshot pointer.
fn new_claim() -> String {
    let mut bytes = [0u8; 8];
    // Only uniqueness matters; a failing RNG still gives a claim distinct by time.
    if aws_lc_rs::rand::SecureRandom::fill(&aws_lc_rs::rand::SystemRandom::new(), &mut bytes).is_err() {
        bytes = (std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos()) as u64)
            .to_le_bytes();
    }
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// What a journal write came to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Written {
    Nothing,
    Accepted,
    Conflict,
    /// Every segment holds records the snapshot does not: wait for compaction.
    JournalFull,
    Failed,
}

/// Where a batch goes.
struct Append {
    index: usize,
    first_seq: u64,
    records: Vec<Record>,
    body: serde_json::Value,
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
            withdrawn_inflight: HashSet::new(),
            failures_out: Vec::new(),
            failures_inflight: Vec::new(),
            failures_in: Vec::new(),
            used_out: Vec::new(),
            used_inflight: Vec::new(),
            used_seen: UsedAssertions::default(),
            next_id: 1,
            resolved_below: 1,
            recent_failures: VecDeque::new(),
            applied_seq: 0,
            segments: vec![SegmentView::default(); SEGMENTS],
            head: 0,
            pointer: PointerView::default(),
            claim_seen: None,
            claim_checked: None,
            loaded: false,
            bytes_per_key: DEFAULT_BYTES_PER_KEY,
            full_pruned: None,
            compact_after: None,
            compaction_failures: 0,
        };
        Self {
            shared: Arc::new(Shared {
                api,
                app: app.to_string(),
                inner: Mutex::new(inner),
                wake: Notify::new(),
                follow: watch::channel(0).0,
                watched: watch::channel(None).0,
                compacting: AtomicBool::new(false),
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

    /// Loads the state, then follows the journal and writes batches until the task is dropped.
    pub async fn run(self) {
        let watcher_task = tokio::spawn(self.clone().follow_journal());
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

    /// Watches the segment the writer asks for, one at a time.
    async fn follow_journal(self) {
        let s = &self.shared;
        let mut target = s.follow.subscribe();
        loop {
            let index = *target.borrow_and_update();
            let name = segment_name(&s.app, index);
            let config = watcher::Config::default().fields(&format!("metadata.name={name}"));
            let stream = watcher::watcher(s.api.clone(), config);
            futures::pin_mut!(stream);
            loop {
                tokio::select! {
                    changed = target.changed() => {
                        if changed.is_err() {
                            return;
                        }
                        break;
                    }
                    event = stream.next() => match event {
                        Some(Ok(watcher::Event::Apply(cm) | watcher::Event::InitApply(cm))) => {
                            tracing::debug!(application = %s.app, segment = index, rv = ?cm.metadata.resource_version, "journal event");
                            s.watched.send_replace(Some((index, Arc::new(cm), Instant::now())));
                            s.wake.notify_one();
                        }
                        Some(Ok(_)) => {}
                        Some(Err(e)) => {
                            tracing::warn!(application = %s.app, error = %e, "journal watch failed; it restarts");
                            tokio::time::sleep(Duration::from_millis(500)).await;
                        }
                        None => return,
                    },
                }
            }
        }
    }

    /// Reads the snapshot and every segment, and rebuilds the confirmed state from them.
    async fn load(&self) -> Result<(), String> {
        let mut last_error = String::new();
        for _ in 0..LOAD_ATTEMPTS {
            match self.load_once().await {
                Ok(true) => return Ok(()),
                Ok(false) => last_error = "the state moved while it was read (a compaction); read it again".into(),
                Err(e) => return Err(e),
            }
        }
        Err(last_error)
    }

    /// `Ok(false)`: a compaction made what was read inconsistent; read again.
    async fn load_once(&self) -> Result<bool, String> {
        let started = Instant::now();
        let s = &self.shared;
        let get = |name: String| async move { s.api.get(&name).await.map_err(|e| format!("ConfigMap {name}: {e}")) };
        // The pointer first: segments read later hold every record after its snapshot, unless a later compaction
        // freed and reused one, which shows as a gap.
        let pointer_cm = get(pointer_name(&s.app)).await?;
        let pointer = PointerView::from_object(&pointer_cm).map_err(|e| format!("{}: {e}", pointer_name(&s.app)))?;
        // Chunk by chunk: the snapshot is never held whole, only the state it builds.
        let mut state = TokenState::default();
        let mut decoder = codec::ChunkDecoder::default();
        let mut snapshot_bytes = 0;
        for part in 0..pointer.chunks {
            let name = chunk_name(&s.app, pointer.set, part);
            let cm = get(name.clone()).await?;
            if data(&cm).get(GEN_FIELD) != Some(&pointer.generation) {
                return Ok(false);
            }
            let bytes = cm.binary_data.as_ref().and_then(|d| d.get(STATE_FIELD)).map(|b| b.0.as_slice());
            let bytes = bytes.ok_or_else(|| format!("ConfigMap {name}: no {STATE_FIELD}"))?;
            snapshot_bytes += bytes.len();
            decoder.feed(bytes, |r| state.apply(r)).map_err(|e| format!("snapshot {}: {e}", pointer.generation))?;
        }
        if pointer.chunks > 0 {
            decoder.finish().map_err(|e| format!("snapshot {}: {e}", pointer.generation))?;
        }
        let mut segments = Vec::with_capacity(SEGMENTS);
        let mut batches: Vec<(u64, usize, Vec<u8>)> = Vec::new();
        for i in 0..SEGMENTS {
            let name = segment_name(&s.app, i);
            let mut cm = get(name.clone()).await?;
            let view = SegmentView::from_object(&cm).map_err(|e| format!("ConfigMap {name}: {e}"))?;
            for (field, bytes) in std::mem::take(&mut cm.binary_data).into_iter().flatten() {
                if let Some((first, n)) = layout::batch_of(&field)
                    && first + n as u64 - 1 > pointer.upto
                {
                    batches.push((first, n, bytes.0));
                }
            }
            segments.push(view);
        }
        batches.sort_by_key(|(first, _, _)| *first);
        let mut applied = pointer.upto;
        let mut records_by_batch = Vec::with_capacity(batches.len());
        for (first, n, bytes) in batches {
            if first > applied + 1 {
                return Ok(false);
            }
            let records = codec::decode(&bytes).map_err(|e| format!("journal batch {first}: {e}"))?;
            if records.len() != n {
                return Err(format!("journal batch {first}: {} records, {n} expected", records.len()));
            }
            applied = applied.max(first + n as u64 - 1);
            records_by_batch.push((first, records));
        }
        let head = (0..SEGMENTS).filter(|i| segments[*i].epoch > 0).max_by_key(|i| segments[*i].epoch).unwrap_or(0);
        let live = {
            let mut g = s.lock();
            g.confirmed = state;
            g.applied_seq = pointer.upto;
            for (first, records) in records_by_batch {
                g.apply_records(first, records, false);
            }
            g.segments = segments;
            g.head = head;
            g.pointer = pointer;
            g.confirmed.prune(s.clock.now());
            let keys = g.confirmed.entries();
            g.measured(keys, snapshot_bytes);
            // Pending changes were decided on the old view: re-check them all.
            let keys: HashSet<TokenKey> = g.pending.iter().map(|p| p.change.key.clone()).collect();
            g.loaded = true;
            s.settle(&mut g, keys);
            g.confirmed.entries()
        };
        s.metrics.snapshot_bytes.store(snapshot_bytes as u64, Ordering::Relaxed);
        s.metrics.reloads.fetch_add(1, Ordering::Relaxed);
        tracing::info!(application = %s.app, live_entries = live, elapsed_ms = started.elapsed().as_millis() as u64, "token state loaded");
        Ok(true)
    }

    /// Applies a version of segment `index`. Returns false when the state must be loaded again (a gap).
    fn absorb(&self, index: usize, cm: &ConfigMap) -> Result<bool, String> {
        let s = &self.shared;
        let mut g = s.lock();
        let (ok, touched) = g.absorb_segment(index, cm, &s.metrics.remote_records)?;
        s.settle(&mut g, touched.into_iter().collect());
        Ok(ok)
    }

    /// Applies a segment version, loading the whole state again on a gap or a corrupt segment.
    async fn absorb_or_reload(&self, index: usize, cm: &ConfigMap) {
        let reload = match self.absorb(index, cm) {
            Ok(true) => false,
            Ok(false) => true,
            Err(e) => {
                tracing::warn!(application = %self.shared.app, segment = index, error = %e, "a journal segment could not be applied");
                true
            }
        };
        if reload && let Err(e) = self.load().await {
            tracing::warn!(application = %self.shared.app, error = %e, "reloading the token state failed");
        }
    }

    /// Takes in the segment the watch delivered, if it is news.
    async fn absorb_watched(&self) {
        let latest = self.shared.watched.borrow().clone();
        let Some((index, cm, arrived)) = latest else { return };
        self.absorb_or_reload(index, &cm).await;
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
                !g.pending.is_empty() || !g.failures_out.is_empty() || !g.used_out.is_empty()
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
                // The segment was just read: retry once at once rather than a whole interval later. Further
                // conflicts in a row wait for their write slot, so that a conflict storm stays within the budget.
                last_write -= interval;
                retried_conflict = true;
            } else {
                retried_conflict = false;
            }
            self.maybe_compact();
        }
    }

    /// Moves the pending changes into flight and plans their append.
    fn plan_append(&self, g: &mut Inner) -> Option<Append> {
        if g.pending.is_empty() && g.failures_out.is_empty() && g.used_out.is_empty() {
            return None;
        }
        let take = g.pending.len().min(MAX_BATCH_RECORDS);
        let batch: Vec<Pending> = g.pending.drain(..take).collect();
        g.inflight = batch;
        g.failures_inflight = std::mem::take(&mut g.failures_out);
        g.used_inflight = std::mem::take(&mut g.used_out);
        let records: Vec<Record> = g
            .failures_inflight
            .iter()
            .map(|f| Record::Failed { f: f.clone() })
            .chain(g.used_inflight.iter().map(|(d, u)| Record::Used { d: *d, u: *u }))
            .chain(g.inflight.iter().map(|p| Record::from(p.change.clone())))
            .collect();
        let blob = codec::encode(&records);
        let index = g.append_target();
        let segment = &g.segments[index];
        let opening = index != g.head;
        let first_seq = if opening { g.segments[g.head].last_seq() + 1 } else { segment.last_seq() + 1 };
        let last_seq = first_seq + records.len() as u64 - 1;
        let mut data = serde_json::Map::new();
        let mut binary = serde_json::Map::new();
        if opening {
            // Reusing a segment: its old batches (all in the snapshot) go, and it starts at `first_seq`.
            data.insert(EPOCH_FIELD.into(), json!(first_seq.to_string()));
            if segment.sealed.is_some() {
                data.insert(SEALED_FIELD.into(), serde_json::Value::Null);
            }
            for (first, (n, _)) in &segment.batches {
                binary.insert(batch_field(*first, *n), serde_json::Value::Null);
            }
        }
        let filled = if opening { 0 } else { segment.bytes() } + blob.len();
        if filled >= self.shared.options.segment_bytes {
            data.insert(SEALED_FIELD.into(), json!(last_seq.to_string()));
        }
        binary.insert(batch_field(first_seq, records.len()), json!(BASE64.encode(&blob)));
        let body = json!({
            "metadata": {"resourceVersion": segment.rv},
            "data": data,
            "binaryData": binary,
        });
        Some(Append { index, first_seq, records, body })
    }

    /// Puts the batch in flight back in front of the pending changes.
    fn requeue_inflight(&self) {
        let mut g = self.shared.lock();
        let batch = std::mem::take(&mut g.inflight);
        let withdrawn = std::mem::take(&mut g.withdrawn_inflight);
        let (gave_up, batch): (Vec<Pending>, Vec<Pending>) = batch.into_iter().partition(|p| withdrawn.contains(&p.id));
        for p in batch.into_iter().rev() {
            g.pending.push_front(p);
        }
        if !gave_up.is_empty() {
            self.fail(&mut g, gave_up, "the Kubernetes API did not accept the change in time");
        }
        // In front of what queued meanwhile, and bounded as when queued: a batch requeued again and again must not
        // grow past what one journal write may hold.
        let mut failures = std::mem::take(&mut g.failures_inflight);
        failures.append(&mut g.failures_out);
        failures.truncate(MAX_SHARED_RECORDS);
        g.failures_out = failures;
        let mut used = std::mem::take(&mut g.used_inflight);
        used.append(&mut g.used_out);
        used.truncate(MAX_SHARED_RECORDS);
        g.used_out = used;
    }

    /// Sends the pending changes as one journal batch.
    async fn write_batch(&self) -> Written {
        let s = &self.shared;
        let plan = {
            let mut g = s.lock();
            let Some(plan) = self.plan_append(&mut g) else { return Written::Nothing };
            let target = &g.segments[plan.index];
            let reusable = plan.index == g.head || target.epoch == 0 || target.last_seq() <= g.pointer.upto;
            (plan, reusable)
        };
        let (plan, reusable) = plan;
        if !reusable {
            // The segment to open still holds records the snapshot lacks, as far as this replica knows.
            self.requeue_inflight();
            if self.refresh_pointer().await {
                return Written::Conflict;
            }
            s.metrics.journal_full.fetch_add(1, Ordering::Relaxed);
            self.maybe_compact();
            return Written::JournalFull;
        }
        let name = segment_name(&s.app, plan.index);
        let bytes = json_bytes(&plan.body);
        let result = tokio::time::timeout(
            s.options.commit_timeout,
            s.api.patch(&name, &patch_params(), &Patch::Merge(&plan.body)),
        )
        .await;
        s.metrics.bytes_written.fetch_add(bytes, Ordering::Relaxed);
        match result {
            Ok(Ok(cm)) => self.accepted(plan, &cm, &name).await,
            Ok(Err(kube::Error::Api(e))) if e.code == 409 => {
                s.metrics.conflicts.fetch_add(1, Ordering::Relaxed);
                tracing::debug!(application = %s.app, segment = %name, "journal append conflicted; catching up");
                let read = s.api.get(&name).await;
                // The client retries a write that got 5xx or no answer: its first attempt may have landed, and the
                // retry then meets it as a conflict. The batch in the segment is this write's: it is committed.
                if let Ok(cm) = &read
                    && has_batch(cm, &plan)
                {
                    tracing::info!(application = %s.app, segment = %name, "journal append conflicted with itself: it had landed");
                    return self.landed(plan, cm, &name).await;
                }
                // Read what the other replicas wrote, and re-check the batch against it.
                self.requeue_inflight();
                match read {
                    Ok(cm) => {
                        // The segment just read is the newest there is: if it is not ahead of what was seen, it was
                        // replaced (the application deleted and created again), so start over from the API.
                        let replaced = SegmentView::from_object(&cm).is_ok_and(|view| {
                            let g = s.lock();
                            let known = &g.segments[plan.index];
                            view.rv != known.rv && view.progress() <= known.progress()
                        });
                        if replaced {
                            if let Err(e) = self.load().await {
                                tracing::warn!(application = %s.app, error = %e, "reloading the token state failed");
                            }
                        } else {
                            self.absorb_or_reload(plan.index, &cm).await;
                        }
                    }
                    Err(e) => self.fail_pending(&format!("reading the journal failed: {e}")),
                }
                Written::Conflict
            }
            // A refusal the API server decided (4xx): nothing was written.
            Ok(Err(kube::Error::Api(e))) if e.code < 500 => {
                s.metrics.write_failures.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(application = %s.app, error = %e, "journal write failed");
                self.fail_inflight(&format!("the Kubernetes API refused the token state write: {e}"));
                Written::Failed
            }
            // No answer in time, a 5xx (an etcd timeout behind the API server) or a transport error after the
            // request went out: the write may have landed.
            outcome => {
                s.metrics.write_failures.fetch_add(1, Ordering::Relaxed);
                if let Ok(Err(e)) = &outcome {
                    tracing::warn!(application = %s.app, error = %e, "journal write failed; finding out whether it landed");
                }
                match self.resolve_timed_out(&name, &plan).await {
                    TimedOut::Landed(cm) => {
                        tracing::info!(application = %s.app, segment = %name, "journal write timed out, and had landed");
                        self.landed(plan, &cm, &name).await
                    }
                    TimedOut::NotLanded(cm) => {
                        tracing::warn!(application = %s.app, segment = %name, "journal write timed out; it did not land");
                        self.fail_inflight("the Kubernetes API did not answer in time");
                        self.absorb_or_reload(plan.index, &cm).await;
                        Written::Failed
                    }
                    TimedOut::Unknown(why) => {
                        tracing::warn!(application = %s.app, segment = %name, reason = %why, "journal write timed out");
                        // It may still land: the watch then brings it back as a remote change nobody holds a token
                        // for.
                        self.fail_inflight("the Kubernetes API did not answer in time");
                        Written::Failed
                    }
                }
            }
        }
    }

    /// A batch's write went unanswered (or failed in a way that does not say): whether it landed. The segment's version is moved on (a fence: an
    /// annotation written with the version the batch expected), so the batch cannot land later; if the version had
    /// moved already, the segment read back shows whether the batch is in it.
    async fn resolve_timed_out(&self, name: &str, plan: &Append) -> TimedOut {
        let s = &self.shared;
        let fence = json!({
            "metadata": {
                "resourceVersion": plan.body["metadata"]["resourceVersion"],
                "annotations": {FENCE_ANNOTATION: new_claim()},
            },
        });
        let fenced =
            tokio::time::timeout(s.options.commit_timeout, s.api.patch(name, &patch_params(), &Patch::Merge(&fence)))
                .await;
        match fenced {
            Ok(Ok(cm)) => return TimedOut::NotLanded(cm),
            Ok(Err(kube::Error::Api(e))) if e.code == 409 => {}
            Ok(Err(e)) => return TimedOut::Unknown(format!("fencing the segment: {e}")),
            Err(_) => return TimedOut::Unknown("fencing the segment timed out too".into()),
        }
        let cm = match tokio::time::timeout(s.options.commit_timeout, s.api.get(name)).await {
            Ok(Ok(cm)) => cm,
            Ok(Err(e)) => return TimedOut::Unknown(format!("reading the segment back: {e}")),
            Err(_) => return TimedOut::Unknown("reading the segment back timed out".into()),
        };
        if has_batch(&cm, plan) {
            TimedOut::Landed(cm)
        } else {
            // Another replica's write moved the version first: this batch's precondition can never hold now.
            TimedOut::NotLanded(cm)
        }
    }

    /// The batch was found in the segment read back after its write's outcome was unclear: committed, and the
    /// batches other replicas appended after it, if any, are taken in too.
    async fn landed(&self, plan: Append, cm: &ConfigMap, name: &str) -> Written {
        let index = plan.index;
        let written = self.accepted(plan, cm, name).await;
        self.absorb_or_reload(index, cm).await;
        written
    }

    /// The batch is in the journal (`cm`, the segment as written or read back): its changes are committed.
    async fn accepted(&self, plan: Append, cm: &ConfigMap, name: &str) -> Written {
        let s = &self.shared;
        s.metrics.journal_writes.fetch_add(1, Ordering::Relaxed);
        s.metrics.object_bytes_written.fetch_add(json_bytes(cm), Ordering::Relaxed);
        s.metrics.batches.observe(plan.records.len() as f64);
        let view = match SegmentView::from_object(cm) {
            Ok(v) => v,
            Err(e) => {
                // Accepted, but not readable back: treat as unknown and start over from the API.
                self.fail_inflight(&format!("the journal segment {name} reads back wrong: {e}"));
                if let Err(e) = self.load().await {
                    tracing::warn!(application = %s.app, error = %e, "reloading the token state failed");
                }
                return Written::Failed;
            }
        };
        let mut g = s.lock();
        g.apply_records(plan.first_seq, plan.records, false);
        g.failures_inflight.clear();
        g.used_inflight.clear();
        g.segments[plan.index] = view;
        g.head = plan.index;
        let done: Vec<Pending> = std::mem::take(&mut g.inflight);
        g.withdrawn_inflight.clear();
        let keys: HashSet<TokenKey> = done.iter().map(|p| p.change.key.clone()).collect();
        for mut p in done {
            if let Some(tx) = p.done.take() {
                let _ = tx.send(Ok(()));
            }
        }
        s.settle(&mut g, keys);
        Written::Accepted
    }

    /// Reads the snapshot pointer; true when it moved forward.
    async fn refresh_pointer(&self) -> bool {
        let s = &self.shared;
        let Ok(cm) = s.api.get(&pointer_name(&s.app)).await else { return false };
        let Ok(view) = PointerView::from_object(&cm) else { return false };
        let mut g = s.lock();
        let moved = view.upto > g.pointer.upto;
        if view.upto >= g.pointer.upto {
            g.pointer = view;
        }
        s.publish_journal_bytes(&g);
        moved
    }

    fn fail_inflight(&self, reason: &str) {
        let s = &self.shared;
        let mut g = s.lock();
        // Shared failures are best effort: a lost one costs the attacker nothing extra beyond one batch. So is the
        // sharing of used assertions (this replica still remembers them).
        g.failures_inflight.clear();
        g.used_inflight.clear();
        let batch = std::mem::take(&mut g.inflight);
        g.withdrawn_inflight.clear();
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

    /// Starts a compaction in the background once most of the ring awaits one (at most one per replica).
    fn maybe_compact(&self) {
        let s = &self.shared;
        {
            let g = s.lock();
            let rechecked_lately = g.claim_checked.is_some_and(|t| t.elapsed() < CLAIM_RECHECK_INTERVAL);
            let backing_off = g.compact_after.is_some_and(|t| Instant::now() < t);
            if g.uncompacted_segments() < COMPACT_AT_SEGMENTS || rechecked_lately || backing_off {
                return;
            }
        }
        if s.compacting.swap(true, Ordering::AcqRel) {
            return;
        }
        let this = self.clone();
        tokio::spawn(async move {
            let result = this.compact().await;
            {
                let mut g = this.shared.lock();
                match &result {
                    Ok(()) => {
                        g.compaction_failures = 0;
                        g.compact_after = None;
                    }
                    Err(e) => {
                        // Backs off: a compaction that cannot succeed (a state past its capacity, an API server
                        // refusing writes) is not repeated after every append.
                        g.compaction_failures = g.compaction_failures.saturating_add(1);
                        let wait =
                            Duration::from_secs(1u64 << (g.compaction_failures - 1).min(6)).min(MAX_COMPACTION_BACKOFF);
                        g.compact_after = Some(Instant::now() + wait);
                        tracing::warn!(application = %this.shared.app, error = %e, retry_in_s = wait.as_secs(), "compaction did not complete; it is retried");
                    }
                }
            }
            this.shared.compacting.store(false, Ordering::Release);
        });
    }

    /// Writes the whole state into the inactive snapshot set and points the pointer at it.
    async fn compact(&self) -> Result<(), String> {
        let s = &self.shared;
        let pointer_name = pointer_name(&s.app);
        let cm = s.api.get(&pointer_name).await.map_err(|e| format!("reading {pointer_name}: {e}"))?;
        let pointer = PointerView::from_object(&cm)?;
        {
            let mut g = s.lock();
            if pointer.upto >= g.pointer.upto {
                g.pointer = pointer.clone();
            }
            if g.uncompacted_segments() < COMPACT_AT_SEGMENTS {
                return Ok(()); // another replica compacted
            }
            g.claim_checked = None;
            if let Some(claim) = &pointer.claim {
                let seen_since = match &g.claim_seen {
                    Some((c, since)) if c == claim => *since,
                    _ => {
                        g.claim_seen = Some((claim.clone(), Instant::now()));
                        g.claim_checked = Some(Instant::now());
                        return Ok(()); // another replica is at it
                    }
                };
                if seen_since.elapsed() < s.options.claim_timeout {
                    g.claim_checked = Some(Instant::now());
                    return Ok(());
                }
                tracing::warn!(application = %s.app, "a snapshot claim was left unfinished; taking it over");
            }
        }
        // Claim the pointer: from here on, a replica still writing an older claim's snapshot fails its writes.
        let claim = new_claim();
        let params = patch_params();
        let body = json!({"metadata": {"resourceVersion": pointer.rv}, "data": {CLAIM_FIELD: claim}});
        let claimed = match s.api.patch(&pointer_name, &params, &Patch::Merge(&body)).await {
            Ok(cm) => cm,
            Err(kube::Error::Api(e)) if e.code == 409 => return Ok(()), // another replica claimed it first
            Err(e) => return Err(format!("claiming {pointer_name}: {e}")),
        };
        self.count_compaction_write(&body, &claimed);
        let claimed_rv = claimed.metadata.resource_version.clone().unwrap_or_default();
        let result = self.write_snapshot(&pointer, &claim, &claimed_rv).await;
        if result.is_err() {
            // Release the claim if it is still ours, so that the next compaction need not wait for it to expire.
            let body = json!({"metadata": {"resourceVersion": claimed_rv}, "data": {CLAIM_FIELD: null}});
            let _ = s.api.patch(&pointer_name, &params, &Patch::Merge(&body)).await;
        }
        result
    }

    async fn write_snapshot(&self, pointer: &PointerView, claim: &str, claimed_rv: &str) -> Result<(), String> {
        let s = &self.shared;
        let capacity = s.options.snapshot_capacity_bytes.min(layout::SNAPSHOT_CAPACITY_BYTES);
        let (upto, pieces, keys) = {
            let mut g = s.lock();
            let now = s.clock.now();
            g.confirmed.prune(now);
            let mut encoder = codec::Encoder::in_pieces(layout::CHUNK_BYTES);
            for r in g.confirmed.snapshot() {
                encoder.push(&r);
                if encoder.total_len() > capacity {
                    break;
                }
            }
            (g.applied_seq, encoder.finish_pieces(), g.confirmed.entries())
        };
        if upto <= pointer.upto {
            return Err("this replica is behind the snapshot".into());
        }
        let snapshot_bytes: usize = pieces.iter().map(Vec::len).sum();
        if snapshot_bytes > capacity || pieces.len() > CHUNKS_PER_SET {
            return Err(format!(
                "the token state ({keys} live keys, over {} KiB) exceeds its snapshot's {} KiB; not compacting",
                snapshot_bytes / 1024,
                capacity / 1024
            ));
        }
        let capacity_keys = {
            let mut g = s.lock();
            g.measured(keys, snapshot_bytes);
            s.publish_capacity(&g);
            g.capacity_keys(&s.options)
        };
        let set = 1 - pointer.set;
        let params = patch_params();
        // Versions read after the claim: a chunk another replica writes from now on makes one of the two fail.
        let mut versions = Vec::with_capacity(pieces.len());
        for part in 0..pieces.len() {
            let name = chunk_name(&s.app, set, part);
            let cm = s.api.get(&name).await.map_err(|e| format!("reading {name}: {e}"))?;
            versions.push(cm.metadata.resource_version.unwrap_or_default());
        }
        for (part, (piece, rv)) in pieces.iter().zip(versions).enumerate() {
            let name = chunk_name(&s.app, set, part);
            let body = json!({
                "metadata": {"resourceVersion": rv},
                "data": {GEN_FIELD: claim},
                "binaryData": {STATE_FIELD: BASE64.encode(piece)},
            });
            let cm =
                s.api.patch(&name, &params, &Patch::Merge(&body)).await.map_err(|e| format!("writing {name}: {e}"))?;
            self.count_compaction_write(&body, &cm);
        }
        let pointer_name = pointer_name(&s.app);
        let body = json!({
            "metadata": {"resourceVersion": claimed_rv},
            "data": {
                SET_FIELD: set.to_string(), CHUNKS_FIELD: pieces.len().to_string(), UPTO_FIELD: upto.to_string(),
                GEN_FIELD: claim, CLAIM_FIELD: null,
                KEYS_FIELD: keys.to_string(), CAPACITY_FIELD: capacity_keys.to_string(),
            },
        });
        let cm = s
            .api
            .patch(&pointer_name, &params, &Patch::Merge(&body))
            .await
            .map_err(|e| format!("switching {pointer_name}: {e}"))?;
        self.count_compaction_write(&body, &cm);
        s.metrics.compactions.fetch_add(1, Ordering::Relaxed);
        s.metrics.snapshot_bytes.store(snapshot_bytes as u64, Ordering::Relaxed);
        let view = PointerView::from_object(&cm)?;
        let mut g = s.lock();
        if view.upto >= g.pointer.upto {
            g.pointer = view;
        }
        g.claim_seen = None;
        s.publish_journal_bytes(&g);
        tracing::debug!(application = %s.app, upto, chunks = pieces.len(), bytes = snapshot_bytes, "snapshot written");
        Ok(())
    }

    fn count_compaction_write(&self, body: &serde_json::Value, stored: &ConfigMap) {
        let m = &self.shared.metrics;
        m.compaction_writes.fetch_add(1, Ordering::Relaxed);
        m.bytes_written.fetch_add(json_bytes(body), Ordering::Relaxed);
        m.object_bytes_written.fetch_add(json_bytes(stored), Ordering::Relaxed);
    }
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

    fn find_refresh(&self, id: &TokenId) -> Option<(SharedKey, LivePair)> {
        let g = self.shared.lock();
        if let Some(key) = g.overlay.refresh.get(id) {
            let pair = g.overlay.pairs.get(key)?.pair.clone()?;
            return pair.refresh.is_some_and(|r| r.id == *id).then(|| (key.clone(), pair));
        }
        g.confirmed.find_refresh(id).filter(|(k, _)| !g.overlay.pairs.contains_key(k))
    }

    fn user_pairs(&self, client_id: &str, username: &str) -> Vec<(TokenKey, LivePair)> {
        let g = self.shared.lock();
        // The confirmed pairs, with the pending changes of this replica over them.
        let mut pairs: Vec<(TokenKey, LivePair)> = g
            .confirmed
            .user_pairs(client_id, username)
            .into_iter()
            .filter(|(k, _)| !g.overlay.pairs.contains_key(k))
            .collect();
        for (k, e) in &g.overlay.pairs {
            if let (Some(pair), true) = (&e.pair, k.client_id == client_id && k.username() == Some(username)) {
                pairs.push(((**k).clone(), pair.clone()));
            }
        }
        pairs
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
            // At capacity, nothing adds a key; replacing a key's pair, and revoking, go on.
            if change.expect.is_none()
                && change.next.is_some()
                && let Some(why) = s.full(&mut g)
            {
                s.metrics.full_refusals.fetch_add(1, Ordering::Relaxed);
                return Err(StoreError::Full(why));
            }
            let (tx, rx) = oneshot::channel();
            let id = g.next_id;
            g.next_id += 1;
            let key = change.key.clone();
            g.pending.push_back(Pending { id, change, done: Some(tx) });
            let mut failed = Vec::new();
            g.recompute(&key, &mut failed);
            Ok((id, rx))
        })();
        if accepted.is_ok() {
            s.wake.notify_one();
        }
        let timeout = s.options.commit_timeout + s.options.commit_timeout;
        Box::pin(async move {
            let (id, mut rx) = accepted?;
            let late = || unavailable("the Kubernetes API did not accept the change in time");
            match tokio::time::timeout(timeout, &mut rx).await {
                Ok(Ok(result)) => result,
                Ok(Err(_)) => Err(unavailable("the token state writer stopped")),
                Err(_) => match s.withdraw(id) {
                    // Still queued: withdrawn, so that nothing the client was refused is written later (a retried
                    // refresh would otherwise meet its own rotation as reuse).
                    Withdrawal::Withdrawn => Err(late()),
                    // Being written (the write is bounded by the commit timeout) or just resolved: the write's
                    // outcome decides, and a write that hands the change back drops it. The bound is a backstop.
                    Withdrawal::BeingWritten | Withdrawal::Resolved => {
                        match tokio::time::timeout(timeout + timeout, rx).await {
                            Ok(Ok(result)) => result,
                            _ => Err(late()),
                        }
                    }
                },
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

    /// Refused when any replica's use of the assertion has reached this one through the journal; else recorded and
    /// shared with the next batch. Two uses at two replicas before either's batch is read can both pass: the journal
    /// orders token changes, not this (PostgreSQL decides it in one statement).
    fn remember_assertion<'a>(&'a self, _client_id: &'a str, id: &'a str, until: UnixTime) -> StoreFuture<'a, bool> {
        let d = used_digest(id);
        let now = self.shared.clock.now();
        let mut g = self.shared.lock();
        g.used_seen.now = now;
        if g.used_seen.live(&d, now) {
            return Box::pin(std::future::ready(Ok(false)));
        }
        g.used_seen.insert(d, until);
        // Bounded like the shared failures: under a flood, the first ones are shared.
        if g.used_out.len() < MAX_SHARED_RECORDS {
            g.used_out.push((d, until));
            drop(g);
            self.shared.wake.notify_one();
        }
        Box::pin(std::future::ready(Ok(true)))
    }

    /// Forgets a use here, and unshares it if its batch has not gone out yet; a use already in the journal stays known
    /// to the replicas that read it.
    fn forget_assertion<'a>(&'a self, _client_id: &'a str, id: &'a str) -> StoreFuture<'a, ()> {
        let d = used_digest(id);
        let mut g = self.shared.lock();
        g.used_seen.remove(&d);
        g.used_out.retain(|(queued, _)| *queued != d);
        Box::pin(std::future::ready(Ok(())))
    }

    fn share_failure(&self, failure: SharedFailure) {
        let mut g = self.shared.lock();
        // Bounded: under a flood, the counts that matter are the first ones.
        if g.failures_out.len() < MAX_SHARED_RECORDS {
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

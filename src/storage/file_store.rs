//! The standalone storage adapter: token state in memory, made durable by an append-only log.
//!
//! Durability promise: `commit` resolves only after the record is fsynced, so a token is handed out only once
//! the revocation of its predecessor would survive `kill -9` or power loss. Concurrent commits are batched
//! (group commit): one writer thread writes and fsyncs everything queued while the previous fsync ran.
//!
//! Log format: one record per line, `<crc32 as 8 hex digits> <JSON record>\n`. On start the log is replayed; a
//! torn or corrupt tail (a write that was never acknowledged: bad records with no valid record after them) is cut
//! off. A bad record followed by a valid one is damage to records that may have been acknowledged: the store
//! refuses to open, naming the file and the byte offset, and cuts nothing. When the log holds many more records
//! than live entries, it is replaced by a snapshot of the live state, dropping expired entries: the writer copies
//! the entries (not the indexes) under the lock, a thread of its own encodes and fsyncs them into a compaction
//! file while the writer keeps appending batches to the log, and the writer then copies the log's new records after
//! the snapshot, fsyncs, renames the file over the log and fsyncs the directory. Requests wait for none of it but the
//! copy; a compaction that fails keeps the log whole.
//!
//! The directory is mode 0700 and every file in it 0600 (log, lock, compaction file): created so, and tightened
//! at open if an earlier version or an operator left them wider.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Seek, SeekFrom, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;

use tokio::sync::watch;

use crate::core::clock::Clock;
use crate::core::model::{Change, LivePair, SharedKey, TokenId, TokenKey};
use crate::core::state::{Record, SnapshotCopy, TokenState};
use crate::core::store::{StoreError, StoreFuture, TokenStore};
use crate::metrics::Histogram;

const LOG_FILE: &str = "tokens.log";
const COMPACT_FILE: &str = "tokens.log.compact";
const LOCK_FILE: &str = "lock";

/// The mode of every file of the token state (and of the standalone state directory): the owner's only.
pub const PRIVATE_FILE_MODE: u32 = 0o600;
/// The mode of the directories holding them.
pub const PRIVATE_DIR_MODE: u32 = 0o700;

/// Takes away every permission bit of `mode` that `want` does not allow (it never adds any); `Some(mode)` when it
/// did.
fn tighten(
    path: &Path,
    mode: u32,
    want: u32,
    set: impl FnOnce(fs::Permissions) -> io::Result<()>,
) -> io::Result<Option<u32>> {
    if mode & !want == 0 {
        return Ok(None);
    }
    set(fs::Permissions::from_mode(mode & want)).map_err(|e| {
        io::Error::new(e.kind(), format!("cannot restrict {} from mode {mode:04o} to {want:04o}: {e}", path.display()))
    })?;
    Ok(Some(mode))
}

/// Restricts the file or directory at `path` (symbolic links followed) to at most `want`; returns its previous
/// mode if that was wider.
pub fn restrict_path(path: &Path, want: u32) -> io::Result<Option<u32>> {
    let mode = fs::metadata(path)?.permissions().mode() & 0o7777;
    tighten(path, mode, want, |p| fs::set_permissions(path, p))
}

/// Restricts the open `file` (at `path`) to at most `want`; returns its previous mode if that was wider.
pub fn restrict_file(file: &File, path: &Path, want: u32) -> io::Result<Option<u32>> {
    let mode = file.metadata()?.permissions().mode() & 0o7777;
    tighten(path, mode, want, |p| file.set_permissions(p))
}

/// Creates the directory `dir` with mode 0700 (missing parents with the default mode), or restricts an existing
/// one to 0700; returns its previous mode if that was wider.
pub fn create_private_dir(dir: &Path) -> io::Result<Option<u32>> {
    if let Some(parent) = dir.parent().filter(|p| !p.as_os_str().is_empty()) {
        fs::create_dir_all(parent)?;
    }
    match fs::DirBuilder::new().mode(PRIVATE_DIR_MODE).create(dir) {
        Ok(()) => Ok(None),
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists && dir.is_dir() => restrict_path(dir, PRIVATE_DIR_MODE),
        Err(e) => Err(e),
    }
}

/// Opens (creating it with mode 0600 if missing) the file at `path`, restricted to 0600.
fn open_private(options: &mut OpenOptions, path: &Path) -> io::Result<File> {
    let file = options.mode(PRIVATE_FILE_MODE).open(path)?;
    if let Some(mode) = restrict_file(&file, path, PRIVATE_FILE_MODE)? {
        tracing::warn!(
            path = %path.display(),
            mode = %format!("{mode:04o}"),
            "the file was accessible by group or others; restricted it to the owner"
        );
    }
    Ok(file)
}

#[derive(Debug, Clone)]
pub struct FileStoreOptions {
    /// Compact once the log holds at least this many records and `compact_live_ratio` times the live entries.
    pub compact_min_records: usize,
    /// See `compact_min_records`: a log this many times the live state is mostly superseded records.
    pub compact_live_ratio: usize,
}

impl Default for FileStoreOptions {
    fn default() -> Self {
        Self { compact_min_records: 200_000, compact_live_ratio: 4 }
    }
}

/// How many compactions have started, completed (replaced the log) and failed (kept the log) since the store
/// opened; one is running while `started` exceeds the other two.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CompactionCounts {
    pub started: u64,
    pub completed: u64,
    pub failed: u64,
}

#[derive(Debug, Clone, Copy, Default)]
struct Durable {
    seq: u64,
    failed: bool,
}

struct Inner {
    state: TokenState,
    /// Encoded records applied in memory but not yet written.
    pending: Vec<u8>,
    /// For every change applied in memory and not yet durable, in order: its sequence number, key and the pair it
    /// replaced. A failed write undoes them, so that memory is never ahead of disk.
    undo: std::collections::VecDeque<(u64, TokenKey, Option<LivePair>)>,
    pending_records: usize,
    /// Set by the compaction thread when its snapshot is written (or failed): the writer finishes it.
    snapshot_written: bool,
    /// After a failed compaction, the log records the next attempt waits for.
    compact_not_before: usize,
    /// Sequence number of the last record applied in memory.
    applied: u64,
    /// Records in the log file (after the last snapshot).
    log_records: usize,
    failed: Option<String>,
    stopping: bool,
    /// The writer is blocked waiting for records; only then does a commit need to wake it.
    writer_idle: bool,
}

struct Shared {
    inner: Mutex<Inner>,
    wake: Condvar,
    durable: watch::Sender<Durable>,
    clock: Arc<dyn Clock>,
    batches: Arc<Histogram>,
    dir: PathBuf,
    options: FileStoreOptions,
    compactions_started: AtomicU64,
    compactions_completed: AtomicU64,
    compactions_failed: AtomicU64,
    #[cfg(test)]
    fault: Mutex<Option<Fault>>,
    /// A test holds the next compaction until it drops the sender (or sends).
    #[cfg(test)]
    hold_compaction: Mutex<Option<std::sync::mpsc::Receiver<()>>>,
    /// A test makes the next compaction fail.
    #[cfg(test)]
    fail_compaction: std::sync::atomic::AtomicBool,
}

/// A writer failure a test asks for.
#[cfg(test)]
#[derive(Debug, Clone, Copy)]
pub(crate) enum Fault {
    FailWrite,
    Panic,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Inner> {
        // Every update to Inner completes before the guard drops; a panic cannot leave it half-done.
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// How many records in the log make a compaction due (see [`FileStoreOptions`]).
    fn compaction_threshold(&self, g: &Inner) -> usize {
        self.options.compact_min_records.max(g.state.entries() * self.options.compact_live_ratio)
    }

    /// The writer cannot go on: undo every change not yet durable (newest first), fail the waiting commits and
    /// every later one.
    fn fail(&self, reason: String) {
        let mut g = self.lock();
        while let Some((_, key, previous)) = g.undo.pop_back() {
            // Setting the previous pair back also restores its refresh token, which a rotation had retired.
            g.state.apply(Record::Set { k: key, p: previous });
        }
        g.pending.clear();
        g.pending_records = 0;
        g.failed = Some(reason);
        drop(g);
        self.durable.send_modify(|d| d.failed = true);
    }
}

/// Fails the store if the writer thread unwinds, so that no commit waits for it forever.
struct FailOnPanic<'a>(&'a Shared);

impl Drop for FailOnPanic<'_> {
    fn drop(&mut self) {
        if std::thread::panicking() {
            tracing::error!(dir = %self.0.dir.display(), "the token log writer panicked; the store is now unavailable");
            self.0.fail("the token log writer stopped unexpectedly".into());
        }
    }
}

pub struct FileStore {
    shared: Arc<Shared>,
    writer: Mutex<Option<JoinHandle<()>>>,
    /// Held for the store's life: one process per state directory.
    _lock: File,
}

/// What a replay found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReplayReport {
    pub records: usize,
    /// Bytes cut from the end of the log (an unacknowledged, torn write).
    pub truncated_bytes: u64,
    pub live_entries: usize,
}

const fn crc32_table() -> [u32; 256] {
    let mut table = [0u32; 256];
    let mut i = 0;
    while i < 256 {
        let mut c = i as u32;
        let mut k = 0;
        while k < 8 {
            c = if c & 1 != 0 { 0xEDB8_8320 ^ (c >> 1) } else { c >> 1 };
            k += 1;
        }
        table[i] = c;
        i += 1;
    }
    table
}

static CRC32: [u32; 256] = crc32_table();

fn crc32(data: &[u8]) -> u32 {
    !data.iter().fold(!0u32, |c, b| CRC32[((c ^ *b as u32) & 0xFF) as usize] ^ (c >> 8))
}

fn encode_line(record: &Record, out: &mut Vec<u8>) -> io::Result<()> {
    let start = out.len();
    out.extend_from_slice(b"00000000 ");
    serde_json::to_writer(&mut *out, record)?;
    let crc = crc32(&out[start + 9..]);
    out[start..start + 8].copy_from_slice(format!("{crc:08x}").as_bytes());
    out.push(b'\n');
    Ok(())
}

fn decode_line(line: &[u8]) -> Option<Record> {
    let (crc_hex, json) = (line.get(..8)?, line.get(9..)?);
    if line.get(8) != Some(&b' ') {
        return None;
    }
    let crc = u32::from_str_radix(std::str::from_utf8(crc_hex).ok()?, 16).ok()?;
    if crc != crc32(json) {
        return None;
    }
    serde_json::from_slice(json).ok()
}

fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

/// Quotes `s` for a POSIX shell if it needs it.
fn shell_quote(s: &str) -> String {
    if !s.is_empty() && s.bytes().all(|b| b.is_ascii_alphanumeric() || b"/._-+,:@%=".contains(&b)) {
        s.to_string()
    } else {
        format!("'{}'", s.replace('\'', r"'\''"))
    }
}

/// Checks that what follows the first bad record (at byte `bad`, line `line`) is a torn tail: no complete, valid
/// record after it. Otherwise the records after it may have been acknowledged, and cutting would lose them
/// silently: the error names the file, the offset and how to recover.
fn check_torn_tail(path: &Path, data: &[u8], bad: usize, line: usize) -> io::Result<()> {
    let mut valid = 0usize;
    let mut first_valid = None;
    let mut offset = bad;
    for (i, chunk) in data[bad..].split_inclusive(|b| *b == b'\n').enumerate() {
        let start = offset;
        offset += chunk.len();
        // The bad line itself, and a last line without its newline (never written whole), do not count.
        let Some(body) = chunk.strip_suffix(b"\n").filter(|_| i > 0) else { continue };
        if decode_line(body).is_some() {
            valid += 1;
            first_valid.get_or_insert(start);
        }
    }
    let Some(first_valid) = first_valid else { return Ok(()) };
    let file = shell_quote(&path.to_string_lossy());
    Err(io::Error::new(
        io::ErrorKind::InvalidData,
        format!(
            "{}: the record at byte offset {bad} (line {line}) is corrupt, but {valid} valid record(s) follow it (the \
             first at byte offset {first_valid}): this is not a torn tail, the records after it may have been \
             acknowledged, so nothing was cut and the log was not loaded. To recover (with kubetoken stopped), keep \
             a copy of the log (cp -p {file} {file}.damaged), then either truncate it at the bad \
             record (truncate -s {bad} {file}), which drops every change recorded after it (tokens revoked or \
             superseded since then are active again until they expire, tokens issued since then are inactive), or \
             restore the state directory from a backup, or remove the log (every token becomes inactive). See \
             ARCHITECTURE.md, \"The durability promise (standalone)\".",
            path.display()
        ),
    ))
}

/// Replays `path` into `state`, cutting off a torn tail; refuses a log with a bad record before a valid one.
/// Returns the report.
fn replay(path: &Path, state: &mut TokenState) -> io::Result<ReplayReport> {
    let data = match fs::read(path) {
        Ok(d) => d,
        Err(e) if e.kind() == io::ErrorKind::NotFound => Vec::new(),
        Err(e) => return Err(e),
    };
    let mut good_len = 0usize;
    let mut records = 0usize;
    while good_len < data.len() {
        let Some(end) = data[good_len..].iter().position(|b| *b == b'\n') else { break };
        let Some(record) = decode_line(&data[good_len..good_len + end]) else { break };
        state.apply(record);
        records += 1;
        good_len += end + 1;
    }
    // An fsynced batch is intact, so bad records with no valid record after them belong to writes that were never
    // fsynced (acknowledged): no acknowledged change is lost by cutting there. A valid record after a bad one is
    // refused instead.
    let truncated = (data.len() - good_len) as u64;
    if truncated > 0 {
        check_torn_tail(path, &data, good_len, records + 1)?;
        let f = OpenOptions::new().write(true).open(path)?;
        f.set_len(good_len as u64)?;
        f.sync_all()?;
    }
    Ok(ReplayReport { records, truncated_bytes: truncated, live_entries: state.entries() })
}

impl FileStore {
    /// Opens (or creates) the state in `dir` and starts the writer thread.
    pub fn open(
        dir: &Path,
        clock: Arc<dyn Clock>,
        batches: Arc<Histogram>,
        options: FileStoreOptions,
    ) -> io::Result<(Self, ReplayReport)> {
        if let Some(mode) = create_private_dir(dir)? {
            tracing::warn!(
                path = %dir.display(),
                mode = %format!("{mode:04o}"),
                "the token log directory was accessible by group or others; restricted it to the owner"
            );
        }
        let lock = open_private(OpenOptions::new().create(true).truncate(false).write(true), &dir.join(LOCK_FILE))?;
        lock.try_lock().map_err(|_| {
            io::Error::new(
                io::ErrorKind::WouldBlock,
                format!("{} is in use by another kubetoken process", dir.display()),
            )
        })?;
        let _ = fs::remove_file(dir.join(COMPACT_FILE)); // a compaction interrupted before its rename
        let log_path = dir.join(LOG_FILE);
        let mut state = TokenState::default();
        let report = replay(&log_path, &mut state)?;
        state.prune(clock.now());
        let file = open_private(OpenOptions::new().create(true).append(true), &log_path)?;
        sync_dir(dir)?;
        let (durable, _) = watch::channel(Durable::default());
        let shared = Arc::new(Shared {
            inner: Mutex::new(Inner {
                state,
                pending: Vec::new(),
                undo: std::collections::VecDeque::new(),
                pending_records: 0,
                snapshot_written: false,
                compact_not_before: 0,
                applied: 0,
                log_records: report.records,
                failed: None,
                stopping: false,
                writer_idle: false,
            }),
            wake: Condvar::new(),
            durable,
            clock,
            batches,
            dir: dir.to_path_buf(),
            options,
            compactions_started: AtomicU64::new(0),
            compactions_completed: AtomicU64::new(0),
            compactions_failed: AtomicU64::new(0),
            #[cfg(test)]
            fault: Mutex::new(None),
            #[cfg(test)]
            hold_compaction: Mutex::new(None),
            #[cfg(test)]
            fail_compaction: std::sync::atomic::AtomicBool::new(false),
        });
        let writer_shared = shared.clone();
        let writer = std::thread::Builder::new()
            .name("kubetoken-log-writer".into())
            .spawn(move || writer_loop(writer_shared, file))?;
        Ok((Self { shared, writer: Mutex::new(Some(writer)), _lock: lock }, report))
    }

    async fn wait_durable(&self, seq: u64) -> Result<(), StoreError> {
        let mut rx = self.shared.durable.subscribe();
        let reached = rx.wait_for(|d| d.seq >= seq || d.failed).await.map(|d| d.seq >= seq);
        match reached {
            Ok(true) => Ok(()),
            _ => Err(StoreError::Unavailable(
                self.shared.lock().failed.clone().unwrap_or_else(|| "the log writer stopped".into()),
            )),
        }
    }

    /// Compactions started, completed and failed so far.
    pub fn compactions(&self) -> CompactionCounts {
        // Ended before started: a compaction that ends between the loads is not counted as ended but not started.
        let completed = self.shared.compactions_completed.load(Ordering::Acquire);
        let failed = self.shared.compactions_failed.load(Ordering::Acquire);
        CompactionCounts { started: self.shared.compactions_started.load(Ordering::Acquire), completed, failed }
    }

    /// Writes what is queued and stops the writer. Later commits fail.
    pub fn close(&self) {
        self.shared.lock().stopping = true;
        self.shared.wake.notify_all();
        let handle = self.writer.lock().unwrap_or_else(|p| p.into_inner()).take();
        if let Some(h) = handle {
            let _ = h.join();
        }
    }
}

impl Drop for FileStore {
    fn drop(&mut self) {
        self.close();
    }
}

/// A compaction in flight. Its thread writes a snapshot of the state (as it was when the compaction started) into
/// the compaction file, while the writer goes on appending batches to the log. When the snapshot is written, the
/// writer copies what the log got since (from byte `tail_from`) after it, makes that durable and renames the file
/// over the log: nothing waits for the snapshot but the compaction itself.
struct Compaction {
    thread: Option<JoinHandle<io::Result<File>>>,
    tail_from: u64,
    /// `Inner::log_records` when it started: the records after that are in the tail.
    log_records_at_start: usize,
    entries: usize,
}

impl Drop for Compaction {
    /// A writer that stops (or fails) with a compaction in flight waits for its thread; the file it leaves is
    /// removed at the next start, and the log is whole.
    fn drop(&mut self) {
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

fn writer_loop(shared: Arc<Shared>, mut file: File) {
    let _fail_on_panic = FailOnPanic(&shared);
    let mut compaction: Option<Compaction> = None;
    loop {
        let mut woken = false;
        let snapshot_written = {
            let mut g = shared.lock();
            while g.pending.is_empty() && !g.stopping && !g.snapshot_written {
                g.writer_idle = true;
                g = shared.wake.wait(g).unwrap_or_else(|p| p.into_inner());
                g.writer_idle = false;
                woken = true;
            }
            std::mem::take(&mut g.snapshot_written)
        };
        if woken {
            // Let the request threads run first: records they commit meanwhile join this batch, so one fsync
            // serves many tokens even when everything shares one core.
            std::thread::yield_now();
        }
        let (batch, stopping) = {
            let mut g = shared.lock();
            let batch = (!g.pending.is_empty()).then(|| {
                let records = std::mem::take(&mut g.pending_records);
                let due = compaction.is_none()
                    && g.log_records + records >= shared.compaction_threshold(&g).max(g.compact_not_before)
                    && !g.stopping;
                g.log_records += records;
                // The copy includes every pending record: it is taken in the same critical section as the batch.
                let copy = due.then(|| {
                    g.state.prune(shared.clock.now());
                    g.state.snapshot_copy()
                });
                (std::mem::take(&mut g.pending), g.applied, records, copy)
            });
            (batch, g.stopping)
        };
        if let Some((buf, seq, records, copy)) = batch {
            #[cfg(test)]
            let fault = shared.fault.lock().unwrap_or_else(|p| p.into_inner()).take();
            #[cfg(test)]
            if let Some(Fault::Panic) = fault {
                panic!("injected writer panic");
            }
            let written = file.write_all(&buf).and_then(|()| file.sync_data());
            #[cfg(test)]
            let written = if let Some(Fault::FailWrite) = fault {
                Err(io::Error::other("injected write failure"))
            } else {
                written
            };
            if let Err(e) = written {
                tracing::error!(error = %e, dir = %shared.dir.display(), "writing the token log failed; the store is now unavailable");
                shared.fail(format!("writing the token log failed: {e}"));
                return;
            }
            shared.batches.observe(records as f64);
            {
                let mut g = shared.lock();
                while g.undo.front().is_some_and(|(s, _, _)| *s <= seq) {
                    g.undo.pop_front();
                }
            }
            shared.durable.send_modify(|d| d.seq = seq);
            if let Some(copy) = copy {
                compaction = start_compaction(&shared, &file, copy);
            }
        }
        // A written snapshot is finished at once; when stopping, the writer waits for one in flight.
        let idle = stopping && shared.lock().pending.is_empty();
        if (snapshot_written || idle)
            && let Some(mut c) = compaction.take()
            && let Err(e) = finish_compaction(&shared, &mut c, &mut file)
        {
            tracing::error!(error = %e, dir = %shared.dir.display(), "replacing the token log failed; the store is now unavailable");
            shared.fail(format!("replacing the token log failed: {e}"));
            return;
        }
        if idle && compaction.is_none() {
            return; // stopping, and everything is written
        }
    }
}

/// Starts writing a snapshot of `copy` on a thread of its own; the log's records after its current end will be
/// the tail. `None` (and the log kept as it is) if that cannot start.
fn start_compaction(shared: &Arc<Shared>, log: &File, copy: SnapshotCopy) -> Option<Compaction> {
    // Counted before anything can end it: a running compaction is one started and not yet completed or failed.
    shared.compactions_started.fetch_add(1, Ordering::Release);
    let tail_from = match log.metadata() {
        Ok(m) => m.len(),
        Err(e) => {
            abandon_compaction(shared, &e.to_string());
            return None;
        }
    };
    let log_records_at_start = shared.lock().log_records;
    let entries = copy.entries();
    let thread_shared = shared.clone();
    let thread = std::thread::Builder::new().name("kubetoken-log-compaction".into()).spawn(move || {
        let written = write_snapshot(&thread_shared, copy);
        thread_shared.lock().snapshot_written = true;
        thread_shared.wake.notify_all();
        written
    });
    match thread {
        Ok(thread) => Some(Compaction { thread: Some(thread), tail_from, log_records_at_start, entries }),
        Err(e) => {
            abandon_compaction(shared, &e.to_string());
            None
        }
    }
}

/// The compaction thread: the snapshot, written and made durable in the compaction file.
fn write_snapshot(shared: &Shared, copy: SnapshotCopy) -> io::Result<File> {
    #[cfg(test)]
    if let Some(hold) = shared.hold_compaction.lock().unwrap_or_else(|p| p.into_inner()).take() {
        let _ = hold.recv();
    }
    #[cfg(test)]
    if shared.fail_compaction.swap(false, Ordering::AcqRel) {
        return Err(io::Error::other("injected compaction failure"));
    }
    // After every 256 KiB (a few milliseconds of encoding) the thread sleeps as long as it worked: it takes at most
    // half a core from the requests (BENCHMARKS.md, "Compaction under load").
    const FLUSH_BYTES: usize = 256 << 10;
    let mut file =
        open_private(OpenOptions::new().write(true).create(true).truncate(true), &shared.dir.join(COMPACT_FILE))?;
    let mut buf = Vec::with_capacity(FLUSH_BYTES + 4096);
    let mut slice = std::time::Instant::now();
    for record in copy.records() {
        encode_line(&record, &mut buf)?;
        if buf.len() >= FLUSH_BYTES {
            file.write_all(&buf)?;
            buf.clear();
            std::thread::sleep(slice.elapsed());
            slice = std::time::Instant::now();
        }
    }
    file.write_all(&buf)?;
    file.sync_data()?;
    Ok(file)
}

/// Copies the tail after the written snapshot and renames the result over the log. A failure before the rename
/// leaves the log as the truth and only abandons the compaction; an `Err` (the rename's durability unknown) is
/// fatal.
fn finish_compaction(shared: &Shared, c: &mut Compaction, log: &mut File) -> io::Result<()> {
    let written = match c.thread.take().map(JoinHandle::join) {
        Some(Ok(written)) => written,
        Some(Err(_)) => Err(io::Error::other("the compaction thread panicked")),
        None => Err(io::Error::other("no compaction thread")),
    };
    let dir = &shared.dir;
    let replaced = written.and_then(|mut snapshot| {
        let mut old = File::open(dir.join(LOG_FILE))?;
        old.seek(SeekFrom::Start(c.tail_from))?;
        let tail = io::copy(&mut old, &mut snapshot)?;
        snapshot.sync_data()?;
        fs::rename(dir.join(COMPACT_FILE), dir.join(LOG_FILE))?;
        Ok((snapshot, tail))
    });
    let (snapshot, tail_bytes) = match replaced {
        Ok(done) => done,
        Err(e) => {
            let _ = fs::remove_file(dir.join(COMPACT_FILE));
            abandon_compaction(shared, &e.to_string());
            return Ok(());
        }
    };
    sync_dir(dir)?;
    let old = std::mem::replace(log, snapshot);
    // Closing the replaced log frees its blocks (tens of milliseconds for a large one): not on the writer.
    if let Err(e) = std::thread::Builder::new().name("kubetoken-log-close".into()).spawn(move || drop(old)) {
        tracing::debug!(error = %e, "closing the replaced log on the writer");
    }
    {
        let mut g = shared.lock();
        g.log_records = c.entries + (g.log_records - c.log_records_at_start);
    }
    shared.compactions_completed.fetch_add(1, Ordering::Release);
    tracing::debug!(entries = c.entries, tail_bytes, "compacted the token log");
    Ok(())
}

/// The log stays as it is (complete); the next attempt waits until it has grown by another threshold's worth.
fn abandon_compaction(shared: &Shared, error: &str) {
    tracing::warn!(error, dir = %shared.dir.display(), "compacting the token log failed; the log is kept whole and grows on");
    let mut g = shared.lock();
    g.compact_not_before = g.log_records.saturating_add(shared.compaction_threshold(&g).max(1));
    drop(g);
    shared.compactions_failed.fetch_add(1, Ordering::Release);
}

impl TokenStore for FileStore {
    fn pair(&self, key: &TokenKey) -> Option<LivePair> {
        self.shared.lock().state.pair(key)
    }

    fn find_access(&self, id: &TokenId) -> Option<(SharedKey, LivePair)> {
        self.shared.lock().state.find_access(id)
    }

    fn find_refresh(&self, id: &TokenId) -> Option<(SharedKey, LivePair)> {
        self.shared.lock().state.find_refresh(id)
    }

    fn user_pairs(&self, client_id: &str, username: &str) -> Vec<(TokenKey, LivePair)> {
        self.shared.lock().state.user_pairs(client_id, username)
    }

    fn commit(&self, change: Change) -> StoreFuture<'_, ()> {
        let seq = (|| {
            let mut g = self.shared.lock();
            if let Some(reason) = &g.failed {
                return Err(StoreError::Unavailable(reason.clone()));
            }
            if g.stopping {
                return Err(StoreError::Unavailable("the store is shutting down".into()));
            }
            g.state.check(&change)?;
            let key = change.key.clone();
            let previous = g.state.pair(&key);
            let record = Record::from(change);
            let mut pending = std::mem::take(&mut g.pending);
            let encoded = encode_line(&record, &mut pending);
            g.pending = pending;
            encoded.map_err(|e| StoreError::Unavailable(format!("encoding a record failed: {e}")))?;
            g.state.apply(record);
            g.applied += 1;
            let seq = g.applied;
            g.undo.push_back((seq, key, previous));
            g.pending_records += 1;
            Ok((g.applied, g.writer_idle))
        })();
        // Wake the writer now, not when the future is first polled: the caller signs the token meanwhile.
        if let Ok((_, true)) = seq {
            self.shared.wake.notify_one();
        }
        Box::pin(async move {
            let (seq, _) = seq?;
            self.wait_durable(seq).await
        })
    }

    fn sync(&self) -> StoreFuture<'_, ()> {
        let seq = self.shared.lock().applied;
        Box::pin(self.wait_durable(seq))
    }

    fn healthy(&self) -> bool {
        let g = self.shared.lock();
        g.failed.is_none() && !g.stopping
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::clock::ManualClock;
    use crate::core::model::{RefreshGrant, Subject};
    use crate::core::scope::ScopeSet;
    use std::time::{Duration, Instant};

    /// Commits `key(k)`'s next pair (`None` revokes it), expecting its live access token to be `expect`.
    fn set(store: &FileStore, k: u32, expect: Option<TokenId>, next: Option<LivePair>) -> StoreFuture<'_, ()> {
        store.commit(Change { key: key(k), expect, next })
    }

    fn key(n: u32) -> TokenKey {
        TokenKey { client_id: "c".into(), subject: Subject::User(format!("u{n}")), scopes: ScopeSet::default() }
    }

    fn pair(n: u8, exp: u64) -> LivePair {
        LivePair {
            access_id: TokenId([n; 16]),
            access_scopes: ScopeSet::default(),
            issued_at: 0,
            access_expires_at: exp,
            refresh: Some(RefreshGrant {
                id: TokenId([n.wrapping_add(100); 16]),
                expires_at: exp,
                ..Default::default()
            }),
        }
    }

    /// A log of `n` committed records (keys 1..=n), the store closed again.
    async fn log_with_records(dir: &Path, clock: &Arc<ManualClock>, n: u8) {
        let store = open(dir, clock.clone(), 1000);
        for n in 1..=n {
            set(&store, n.into(), None, Some(pair(n, 100))).await.expect("commit");
        }
    }

    fn open(dir: &Path, clock: Arc<ManualClock>, compact: usize) -> FileStore {
        FileStore::open(
            dir,
            clock,
            Arc::new(Histogram::new(&[1.0])),
            FileStoreOptions { compact_min_records: compact, ..Default::default() },
        )
        .expect("open")
        .0
    }

    fn inject(store: &FileStore, fault: Fault) {
        *store.shared.fault.lock().expect("fault") = Some(fault);
    }

    #[tokio::test]
    async fn a_failed_write_leaves_memory_as_durable_as_disk_and_later_commits_fail() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = open(dir.path(), Arc::new(ManualClock::new(10)), 1000);
        set(&store, 1, None, Some(pair(1, 100))).await.expect("c1");
        inject(&store, Fault::FailWrite);
        // A refresh: the new pair replaces pair 1 and retires its refresh token. The write fails.
        let failed =
            store.commit(Change { key: key(1), expect: Some(TokenId([1; 16])), next: Some(pair(2, 100)) }).await;
        assert!(
            matches!(failed, Err(StoreError::Unavailable(ref m)) if m.contains("injected write failure")),
            "{failed:?}"
        );
        // Nothing of the failed change is visible: the durable pair is the live one, its refresh token still live.
        assert_eq!(store.pair(&key(1)), Some(pair(1, 100)));
        assert!(store.find_access(&TokenId([2; 16])).is_none());
        assert!(store.find_access(&TokenId([1; 16])).is_some());
        assert!(store.find_refresh(&TokenId([101; 16])).is_some());
        assert!(!store.healthy());
        let later = set(&store, 2, None, Some(pair(3, 100))).await;
        assert!(matches!(later, Err(StoreError::Unavailable(_))), "{later:?}");
        assert!(store.find_access(&TokenId([3; 16])).is_none());
    }

    #[tokio::test]
    async fn a_panicking_writer_fails_the_waiting_commits_instead_of_hanging_them() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = open(dir.path(), Arc::new(ManualClock::new(10)), 1000);
        inject(&store, Fault::Panic);
        let commit = set(&store, 1, None, Some(pair(1, 100)));
        let result = tokio::time::timeout(std::time::Duration::from_secs(5), commit).await.expect("no hang");
        assert!(
            matches!(result, Err(StoreError::Unavailable(ref m)) if m.contains("stopped unexpectedly")),
            "{result:?}"
        );
        assert_eq!(store.pair(&key(1)), None);
        assert!(!store.healthy());
    }

    #[test]
    fn crc32_matches_the_ieee_check_value() {
        assert_eq!(crc32(b"123456789"), 0xCBF4_3926);
    }

    #[tokio::test]
    async fn committed_changes_survive_reopen_and_superseded_tokens_stay_revoked() {
        let dir = tempfile::tempdir().expect("tempdir");
        let clock = Arc::new(ManualClock::new(10));
        {
            let store = open(dir.path(), clock.clone(), 1000);
            set(&store, 1, None, Some(pair(1, 100))).await.expect("c1");
            set(&store, 1, Some(TokenId([1; 16])), Some(pair(2, 100))).await.expect("c2");
            set(&store, 2, None, Some(pair(3, 100))).await.expect("c3");
            set(&store, 2, Some(TokenId([3; 16])), None).await.expect("revoke");
        }
        let store = open(dir.path(), clock, 1000);
        assert!(store.find_access(&TokenId([1; 16])).is_none());
        assert!(store.find_access(&TokenId([2; 16])).is_some());
        assert!(store.find_access(&TokenId([3; 16])).is_none());
    }

    #[tokio::test]
    async fn a_torn_tail_is_cut_and_earlier_records_kept() {
        let dir = tempfile::tempdir().expect("tempdir");
        let clock = Arc::new(ManualClock::new(10));
        {
            let store = open(dir.path(), clock.clone(), 1000);
            set(&store, 1, None, Some(pair(1, 100))).await.expect("c1");
        }
        let log = dir.path().join(LOG_FILE);
        let mut f = OpenOptions::new().append(true).open(&log).expect("log");
        f.write_all(b"deadbeef {\"op\":\"set\",\"k\":").expect("torn write");
        drop(f);
        let mut state = TokenState::default();
        let report = replay(&log, &mut state).expect("replay");
        assert_eq!(report.records, 1);
        assert!(report.truncated_bytes > 0);
        assert!(state.find_access(&TokenId([1; 16])).is_some());
        // The cut is persistent: a second replay finds a clean log.
        let mut again = TokenState::default();
        assert_eq!(replay(&log, &mut again).expect("replay").truncated_bytes, 0);
    }

    #[tokio::test]
    async fn compaction_drops_expired_and_superseded_records() {
        let dir = tempfile::tempdir().expect("tempdir");
        let clock = Arc::new(ManualClock::new(10));
        let store = open(dir.path(), clock.clone(), 50);
        let mut expect = None;
        for i in 0..200u32 {
            let n = (i % 200) as u8;
            set(&store, 1, expect, Some(pair(n, 100))).await.expect("commit");
            expect = Some(TokenId([n; 16]));
        }
        for i in 0..10u32 {
            set(&store, 100 + i, None, Some(pair(250, 20))).await.expect("short");
        }
        clock.advance(50); // the ten short-lived pairs are now dead
        for i in 0..60u32 {
            let n = (i % 50) as u8;
            set(&store, 1, expect, Some(pair(n, 1000))).await.expect("commit");
            expect = Some(TokenId([n; 16]));
        }
        let lines = fs::read_to_string(dir.path().join(LOG_FILE)).expect("log").lines().count();
        assert!(lines < 60, "log was not compacted: {lines} lines");
        drop(store);
        let store = open(dir.path(), clock, 50);
        assert!(store.find_access(&expect.expect("last")).is_some());
        assert_eq!(store.shared.lock().state.entries(), 1);
    }

    /// Refresh rotation keeps no state in the file store either: a login rotated 120 times is one entry in memory,
    /// one record after compaction, and reopened it still knows the current generation of its refresh id.
    #[tokio::test]
    async fn rotations_keep_one_entry_in_memory_and_one_record_after_compaction() {
        let dir = tempfile::tempdir().expect("tempdir");
        let clock = Arc::new(ManualClock::new(10));
        let store = open(dir.path(), clock.clone(), 50);
        let mut current = pair(1, 1000);
        set(&store, 1, None, Some(current.clone())).await.expect("login");
        for generation in 1..=120u32 {
            let refresh = current.refresh.map(|r| RefreshGrant { generation, ..r });
            let next = LivePair { access_id: TokenId([(generation % 200) as u8 + 2; 16]), refresh, ..current.clone() };
            set(&store, 1, Some(current.access_id), Some(next.clone())).await.expect("rotate");
            current = next;
            assert_eq!(store.shared.lock().state.entries(), 1);
        }
        drop(store);
        let lines = fs::read_to_string(dir.path().join(LOG_FILE)).expect("log").lines().count();
        assert!(lines < 50, "the log was compacted to the live state: {lines} lines");
        let store = open(dir.path(), clock, 50);
        assert_eq!(store.shared.lock().state.entries(), 1);
        let (_, found) = store.find_refresh(&TokenId([101; 16])).expect("the login's refresh id");
        assert_eq!(found.refresh.map(|r| r.generation), Some(120));
    }

    /// Compaction runs on the writer thread while other commits keep arriving: none is lost or reordered.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn compaction_while_commits_keep_arriving_loses_nothing() {
        let dir = tempfile::tempdir().expect("tempdir");
        let clock = Arc::new(ManualClock::new(10));
        let store = Arc::new(open(dir.path(), clock.clone(), 40));
        let mut tasks = Vec::new();
        for k in 0..8u32 {
            let store = store.clone();
            tasks.push(tokio::spawn(async move {
                let mut expect = None;
                for i in 0..100u32 {
                    // Ids unique per (key, round): byte 0 the key, byte 1 the round.
                    let mut id = [k as u8; 16];
                    id[1] = i as u8;
                    let next = LivePair { access_id: TokenId(id), refresh: None, ..pair(0, 1000) };
                    set(&store, k, expect, Some(next)).await.expect("commit");
                    expect = Some(TokenId(id));
                }
                expect.expect("last")
            }));
        }
        let mut last = Vec::new();
        for t in tasks {
            last.push(t.await.expect("join"));
        }
        let lines = fs::read_to_string(dir.path().join(LOG_FILE)).expect("log").lines().count();
        assert!(lines < 800, "the log was never compacted: {lines} lines for 800 commits");
        drop(store);
        let store = open(dir.path(), clock, 40);
        for (k, id) in last.iter().enumerate() {
            let (found_key, _) = store.find_access(id).expect("the last pair of every key survives");
            assert_eq!(*found_key, key(k as u32));
            let mut older = id.0;
            older[1] -= 1;
            assert!(store.find_access(&TokenId(older)).is_none(), "a superseded pair came back");
        }
        assert_eq!(store.shared.lock().state.entries(), 8);
    }

    /// Eight keys superseded round by round; ids: byte 0 the key, byte 1 the round.
    fn round_id(k: u32, round: u32) -> TokenId {
        let mut id = [k as u8; 16];
        id[1] = round as u8;
        TokenId(id)
    }

    /// Supersedes the pair of each of the eight keys with the round's; a commit that waits 5 s fails the test.
    async fn commit_round(store: &FileStore, round: u32) {
        for k in 0..8u32 {
            let next = LivePair { access_id: round_id(k, round), refresh: None, ..pair(0, 1000) };
            let expect = round.checked_sub(1).map(|r| round_id(k, r));
            let commit = set(store, k, expect, Some(next));
            tokio::time::timeout(Duration::from_secs(5), commit)
                .await
                .unwrap_or_else(|_| panic!("round {round}: a commit waited 5 s"))
                .expect("commit");
        }
    }

    async fn wait_until(what: &str, mut done: impl FnMut() -> bool) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while !done() {
            assert!(Instant::now() < deadline, "waited 10 s for: {what}");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    /// Reopens the store in `dir` and checks that each key's pair is the one of `round` and none older.
    fn assert_reopened_at_round(dir: &Path, clock: Arc<ManualClock>, round: u32) {
        let store = open(dir, clock, 40);
        for k in 0..8u32 {
            assert!(store.find_access(&round_id(k, round)).is_some(), "key {k}: the last pair is lost");
            for older in 0..round {
                assert!(store.find_access(&round_id(k, older)).is_none(), "key {k}: round {older} came back");
            }
        }
        assert_eq!(store.shared.lock().state.entries(), 8);
    }

    /// Requests are not held up by a compaction: while one is held (its snapshot not yet written), commits keep
    /// being made durable; once it completes, the new log holds the snapshot and every commit made meanwhile.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn commits_are_made_durable_while_a_compaction_runs() {
        let dir = tempfile::tempdir().expect("tempdir");
        let clock = Arc::new(ManualClock::new(10));
        let store = open(dir.path(), clock.clone(), 40);
        let (release, hold) = std::sync::mpsc::channel::<()>();
        *store.shared.hold_compaction.lock().expect("hold") = Some(hold);
        let mut round = 0u32;
        while store.compactions().started == 0 {
            commit_round(&store, round).await;
            round += 1;
        }
        for _ in 0..20 {
            commit_round(&store, round).await;
            round += 1;
        }
        assert_eq!(store.compactions().completed, 0, "the held compaction completed");
        drop(release);
        wait_until("the released compaction to complete", || store.compactions().completed == 1).await;
        commit_round(&store, round).await;
        store.close();
        drop(store);
        let lines = fs::read_to_string(dir.path().join(LOG_FILE)).expect("log").lines().count();
        assert!(lines < (round as usize + 1) * 8, "the log was not compacted: {lines} lines");
        assert_reopened_at_round(dir.path(), clock, round);
    }

    /// A compaction that fails (here: its snapshot cannot be written) keeps the log whole: nothing is lost, commits
    /// go on, and a later compaction replaces the log.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_failed_compaction_keeps_the_log_and_a_later_one_succeeds() {
        let dir = tempfile::tempdir().expect("tempdir");
        let clock = Arc::new(ManualClock::new(10));
        let store = open(dir.path(), clock.clone(), 40);
        store.shared.fail_compaction.store(true, Ordering::Release);
        let mut round = 0u32;
        while store.compactions().started == 0 {
            commit_round(&store, round).await;
            round += 1;
        }
        wait_until("the compaction to fail", || store.compactions().failed == 1).await;
        assert!(store.healthy(), "a failed compaction made the store unavailable");
        assert!(!dir.path().join(COMPACT_FILE).exists(), "the failed compaction's file is left behind");
        let lines = fs::read_to_string(dir.path().join(LOG_FILE)).expect("log").lines().count();
        assert_eq!(lines, round as usize * 8, "the log lost or gained records");
        while store.compactions().completed == 0 {
            commit_round(&store, round).await;
            round += 1;
            assert!(round < 100, "no compaction after the failed one");
        }
        store.close();
        drop(store);
        let lines = fs::read_to_string(dir.path().join(LOG_FILE)).expect("log").lines().count();
        assert!(lines < round as usize * 8, "the log was not compacted: {lines} lines");
        assert_reopened_at_round(dir.path(), clock, round - 1);
    }

    /// A crash between writing the compacted file and renaming it over the log leaves both; the log is the truth,
    /// the leftover is removed at start, and nothing is lost.
    #[tokio::test]
    async fn a_compaction_interrupted_before_its_rename_is_discarded_and_the_log_kept() {
        let dir = tempfile::tempdir().expect("tempdir");
        let clock = Arc::new(ManualClock::new(10));
        {
            let store = open(dir.path(), clock.clone(), 1000);
            for n in 1..=3u8 {
                let expect = (n > 1).then(|| TokenId([n - 1; 16]));
                set(&store, 1, expect, Some(pair(n, 100))).await.expect("commit");
            }
        }
        // What an interrupted compaction leaves: a half-written snapshot, and one that is complete but stale.
        for leftover in [&b"0badc0de {\"op\":\"set\""[..], &fs::read(dir.path().join(LOG_FILE)).expect("log")[..40]] {
            fs::write(dir.path().join(COMPACT_FILE), leftover).expect("leftover");
            let store = open(dir.path(), clock.clone(), 1000);
            assert!(!dir.path().join(COMPACT_FILE).exists(), "the leftover compaction file is removed");
            assert!(store.find_access(&TokenId([3; 16])).is_some(), "the newest pair is kept");
            assert!(store.find_access(&TokenId([1; 16])).is_none(), "superseded pairs stay superseded");
        }
    }

    fn mode(path: &Path) -> u32 {
        use std::os::unix::fs::PermissionsExt;
        fs::symlink_metadata(path).expect("metadata").permissions().mode() & 0o7777
    }

    /// Every entry of `dir` (not recursive) with its mode.
    fn modes(dir: &Path) -> Vec<(String, u32)> {
        let mut entries: Vec<(String, u32)> = fs::read_dir(dir)
            .expect("read_dir")
            .map(|e| {
                let e = e.expect("entry");
                (e.file_name().to_string_lossy().into_owned(), mode(&e.path()))
            })
            .collect();
        entries.sort();
        entries
    }

    #[tokio::test]
    async fn the_log_directory_is_0700_and_every_file_in_it_0600_also_after_compaction() {
        let parent = tempfile::tempdir().expect("tempdir");
        let dir = parent.path().join("tokens");
        let clock = Arc::new(ManualClock::new(10));
        let store = open(&dir, clock.clone(), 20);
        let mut expect = None;
        for n in 1..=60u8 {
            set(&store, 1, expect, Some(pair(n, 100))).await.expect("commit");
            expect = Some(TokenId([n; 16]));
        }
        // The log is now the renamed compaction file: its mode is the one it was created with.
        let lines = fs::read_to_string(dir.join(LOG_FILE)).expect("log").lines().count();
        assert!(lines < 60, "the log was never compacted: {lines} lines");
        assert_eq!(mode(&dir), 0o700, "the log directory");
        let entries = modes(&dir);
        assert!(entries.iter().any(|(n, _)| n == LOG_FILE) && entries.iter().any(|(n, _)| n == LOCK_FILE));
        for (name, m) in &entries {
            assert_eq!(*m, 0o600, "{name} has mode {m:04o}; entries: {entries:?}");
        }
    }

    #[test]
    fn an_existing_directory_and_files_with_wider_modes_are_tightened() {
        use std::os::unix::fs::PermissionsExt;
        let parent = tempfile::tempdir().expect("tempdir");
        let dir = parent.path().join("tokens");
        fs::create_dir(&dir).expect("dir");
        fs::set_permissions(&dir, fs::Permissions::from_mode(0o755)).expect("chmod dir");
        for (name, m) in [(LOG_FILE, 0o644), (LOCK_FILE, 0o666)] {
            fs::write(dir.join(name), b"").expect("file");
            fs::set_permissions(dir.join(name), fs::Permissions::from_mode(m)).expect("chmod file");
        }
        let _store = open(&dir, Arc::new(ManualClock::new(10)), 1000);
        assert_eq!(mode(&dir), 0o700);
        assert_eq!(modes(&dir), vec![(LOCK_FILE.to_string(), 0o600), (LOG_FILE.to_string(), 0o600)]);
    }

    /// Bit rot in the middle of the log is not a torn write: the records after it were acknowledged, so the store
    /// refuses to open (and cuts nothing) rather than silently drop them.
    #[tokio::test]
    async fn a_corrupt_record_followed_by_valid_ones_refuses_to_open_naming_the_offset() {
        let dir = tempfile::tempdir().expect("tempdir");
        let clock = Arc::new(ManualClock::new(10));
        log_with_records(dir.path(), &clock, 4).await;
        let log = dir.path().join(LOG_FILE);
        let mut data = fs::read(&log).expect("log");
        let second_line = data.iter().position(|b| *b == b'\n').expect("a first line") + 1;
        data[second_line + 12] ^= 0x01; // one bit inside the JSON of the second record
        fs::write(&log, &data).expect("corrupt");

        let Err(err) =
            FileStore::open(dir.path(), clock.clone(), Arc::new(Histogram::new(&[1.0])), FileStoreOptions::default())
        else {
            panic!("a log with a corrupt record followed by valid ones was opened");
        };
        let message = err.to_string();
        assert_eq!(err.kind(), io::ErrorKind::InvalidData, "{message}");
        for part in [
            log.display().to_string(),
            format!("byte offset {second_line}"),
            "line 2".to_string(),
            format!("truncate -s {second_line} {}", log.display()),
        ] {
            assert!(message.contains(&part), "{part:?} missing from: {message}");
        }
        assert_eq!(fs::read(&log).expect("log"), data, "nothing is cut from a log that is refused");

        // The documented recovery: truncate at that offset, accepting the loss of the records after it.
        OpenOptions::new().write(true).open(&log).expect("log").set_len(second_line as u64).expect("truncate");
        let (store, report) =
            FileStore::open(dir.path(), clock, Arc::new(Histogram::new(&[1.0])), FileStoreOptions::default())
                .expect("opens after the truncation");
        assert_eq!((report.records, report.truncated_bytes), (1, 0));
        assert!(store.find_access(&TokenId([1; 16])).is_some());
        assert!(store.find_access(&TokenId([2; 16])).is_none());
    }

    /// A complete last line that fails its checksum is indistinguishable from a torn write: it is cut.
    #[tokio::test]
    async fn a_corrupt_last_record_is_cut_like_a_torn_tail() {
        let dir = tempfile::tempdir().expect("tempdir");
        let clock = Arc::new(ManualClock::new(10));
        log_with_records(dir.path(), &clock, 3).await;
        let log = dir.path().join(LOG_FILE);
        let mut data = fs::read(&log).expect("log");
        let last_line = data[..data.len() - 1].iter().rposition(|b| *b == b'\n').expect("earlier lines") + 1;
        data[last_line + 12] ^= 0x01;
        // Garbage after it that is not a valid record either (a torn batch) is cut with it.
        data.extend_from_slice(b"\n00000000 {}\n\0\0\0");
        fs::write(&log, &data).expect("corrupt");
        let mut state = TokenState::default();
        let report = replay(&log, &mut state).expect("replay");
        assert_eq!(report.records, 2);
        assert_eq!(report.truncated_bytes, (data.len() - last_line) as u64);
        assert_eq!(fs::read(&log).expect("log").len(), last_line);
    }

    #[test]
    fn a_second_process_cannot_open_the_same_state() {
        let dir = tempfile::tempdir().expect("tempdir");
        let clock = Arc::new(ManualClock::new(10));
        let _first = open(dir.path(), clock.clone(), 1000);
        let second = FileStore::open(dir.path(), clock, Arc::new(Histogram::new(&[1.0])), FileStoreOptions::default());
        assert!(second.is_err());
    }
}

//! The token state in PostgreSQL, behind the core's storage port.
//!
//! - **Writes** are compare-and-set statements on the key's row (`INSERT .. ON CONFLICT DO NOTHING`, `UPDATE` or
//!   `DELETE .. WHERE access_id = expected`): the database decides between replicas; no row changed is a conflict,
//!   which the core decides again. A change's future resolves once its statement committed.
//! - **Reads** come from what [`TokenStore::prepare`] fetched for the request: every decision reads the row as the
//!   database has it now, so a token superseded or revoked at another replica is inactive here at once. The fetched
//!   rows are kept in a bounded cache: when the database cannot be reached, a token read before still introspects.
//! - **Expiry**: a background task deletes expired rows in small batches through the expiry index.
//! - **Group commit**: changes queue for one writer task; while a statement is in flight the next batch gathers, and
//!   a batch is one statement (one round trip, one transaction, one WAL flush) that reports which changes held.

use std::collections::HashMap;
use std::str::FromStr;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod, Runtime};
use tokio::sync::{mpsc, oneshot};

use super::{schema, tls};
use crate::core::clock::{Clock, UnixTime};
use crate::core::lockout::SharedFailure;
use crate::core::model::{Change, FederatedUser, LivePair, SharedKey, Subject, TokenId, TokenKey};
use crate::core::scope::ScopeSet;
use crate::core::store::{Lookup, StoreError, StoreFuture, TokenStore};
use crate::metrics::Histogram;

#[derive(Debug, Clone)]
pub struct PgOptions {
    /// `postgres://user@host:port/database` (libpq URL or key=value form).
    pub url: String,
    /// The password, when it is kept out of the URL (a mounted Secret file).
    pub password: Option<String>,
    pub pool_size: usize,
    /// How long a request waits for a connection, and a statement for its answer.
    pub timeout: Duration,
    /// Rows kept for reads after a request (at least; rows a request is using are never dropped).
    pub cache_rows: usize,
    /// This replica's name in the shared lockout failures.
    pub origin: String,
    /// Changes per group commit.
    pub batch_sizes: Arc<Histogram>,
}

impl PgOptions {
    pub fn new(url: impl Into<String>) -> Self {
        Self {
            url: url.into(),
            password: None,
            pool_size: 16,
            timeout: Duration::from_secs(5),
            cache_rows: 10_000,
            origin: format!("{}-{}", std::process::id(), rand_suffix()),
            batch_sizes: Arc::new(Histogram::new(&[1.0, 4.0, 16.0, 64.0, 256.0])),
        }
    }
}

fn rand_suffix() -> u64 {
    let mut b = [0u8; 8];
    let _ = aws_lc_rs::rand::fill(&mut b);
    u64::from_le_bytes(b)
}

/// A cached read stays this long at least: a request reads what it prepared within this.
const PIN: Duration = Duration::from_secs(10);
const EXPIRY_INTERVAL: Duration = Duration::from_secs(10);
const EXPIRY_BATCH: i64 = 1000;
const FAILURES_POLL: Duration = Duration::from_millis(500);

/// One user's keys and pairs, as read, and when.
type UserPairs = (Vec<(TokenKey, LivePair)>, Instant);

#[derive(Default)]
struct Cache {
    keys: HashMap<TokenKey, (Option<LivePair>, Instant)>,
    access: HashMap<TokenId, (SharedKey, LivePair, Instant)>,
    refresh: HashMap<TokenId, (SharedKey, LivePair, Instant)>,
    users: HashMap<(String, String), UserPairs>,
    trimmed: Option<Instant>,
}

impl Cache {
    fn len(&self) -> usize {
        self.keys.len() + self.access.len() + self.refresh.len() + self.users.len()
    }

    /// Keeps the cache near `cap` entries: past it, entries older than [`PIN`] go (at most once a second).
    fn trim(&mut self, cap: usize) {
        if self.len() <= cap || self.trimmed.is_some_and(|t| t.elapsed() < Duration::from_secs(1)) {
            return;
        }
        self.trimmed = Some(Instant::now());
        self.keys.retain(|_, (_, at)| at.elapsed() < PIN);
        self.access.retain(|_, (_, _, at)| at.elapsed() < PIN);
        self.refresh.retain(|_, (_, _, at)| at.elapsed() < PIN);
        self.users.retain(|_, (_, at)| at.elapsed() < PIN);
    }

    /// What a committed change means for the cached reads. Entries read by id stay: a read checks them against
    /// the key's newer state (see [`Cache::current`]), so a token revoked here reads inactive, not unknown, while the
    /// database is unreachable.
    fn apply(&mut self, change: &Change) {
        let now = Instant::now();
        self.keys.insert(change.key.clone(), (change.next.clone(), now));
        if let Some(next) = &change.next {
            let key: SharedKey = Arc::new(change.key.clone());
            self.access.insert(next.access_id, (key.clone(), next.clone(), now));
            if let Some(r) = next.refresh {
                self.refresh.insert(r.id, (key, next.clone(), now));
            }
        }
        if let Some(user) = change.key.username() {
            self.users.remove(&(change.key.client_id.clone(), user.to_string()));
        }
    }

    /// A pair read by id at `at`, as it is now: when the key's pair was read or changed since, that pair decides
    /// (`same` tells whether it is still the one the id names).
    fn current(
        &self,
        key: &SharedKey,
        pair: &LivePair,
        at: Instant,
        same: impl Fn(&LivePair) -> bool,
    ) -> Option<(SharedKey, LivePair)> {
        match self.keys.get(&**key) {
            Some((now, when)) if *when >= at => now.as_ref().filter(|p| same(p)).map(|p| (key.clone(), p.clone())),
            _ => Some((key.clone(), pair.clone())),
        }
    }
}

pub struct PgStore {
    pool: Pool,
    cache: Mutex<Cache>,
    healthy: AtomicBool,
    options: PgOptions,
    clock: Arc<dyn Clock>,
    failures_in: Mutex<Vec<SharedFailure>>,
    failures_cursor: AtomicI64,
    writes: mpsc::UnboundedSender<Pending>,
    /// Statements run for requests (reads and group commits), each one round trip.
    statements: AtomicU64,
    group_commits: AtomicU64,
}

fn unavailable(e: impl std::fmt::Display) -> StoreError {
    StoreError::Unavailable(e.to_string())
}

/// An error and its causes ("error performing TLS handshake: invalid peer certificate: UnknownIssuer"): the pool's
/// and the driver's messages name only the step that failed.
fn with_causes(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut cause = e.source();
    while let Some(c) = cause {
        let next = c.to_string();
        if !text.contains(&next) {
            text = format!("{text}: {next}");
        }
        cause = c.source();
    }
    text
}

fn db(e: &tokio_postgres::Error) -> StoreError {
    StoreError::Unavailable(format!("PostgreSQL: {}", schema::describe(e)))
}

fn subject_text(s: &Subject) -> String {
    match s {
        Subject::User(u) => format!("u:{u}"),
        Subject::Federated(f) => format!("f:{}", f.stored()),
        Subject::Client => "c".into(),
    }
}

fn subject_of(text: &str) -> Option<Subject> {
    match text {
        "c" => Some(Subject::Client),
        other => match other.split_at_checked(2) {
            Some(("u:", u)) => Some(Subject::User(u.to_string())),
            Some(("f:", f)) => FederatedUser::from_stored(f).map(Subject::Federated),
            _ => None,
        },
    }
}

const COLUMNS: &str = "client_id, subject, scopes, pair::text";

fn row_pair(row: &tokio_postgres::Row) -> Result<(TokenKey, LivePair), StoreError> {
    let subject: String = row.get(1);
    let scopes: String = row.get(2);
    let pair: String = row.get(3);
    let bad = |what: &str| unavailable(format!("a token row's {what} is not readable"));
    let key = TokenKey {
        client_id: row.get(0),
        subject: subject_of(&subject).ok_or_else(|| bad("subject"))?,
        scopes: ScopeSet::parse(&scopes).map_err(|_| bad("scopes"))?,
    };
    let pair: LivePair = serde_json::from_str(&pair).map_err(|_| bad("pair"))?;
    Ok((key, pair))
}

impl PgStore {
    /// Connects, migrates the schema, and starts the expiry and shared-failure tasks.
    pub async fn connect(options: PgOptions, clock: Arc<dyn Clock>) -> Result<Arc<Self>, String> {
        let (url, tls_options) = tls::split_options(&options.url)?;
        let mut config = tokio_postgres::Config::from_str(&url).map_err(|e| format!("the PostgreSQL URL: {e}"))?;
        config.ssl_mode(tls_options.mode.wire());
        if let Some(password) = &options.password {
            config.password(password.as_bytes());
        }
        config.connect_timeout(options.timeout);
        // A half-open connection (a failover, a partition) is dropped by the kernel instead of stalling its requests.
        config.tcp_user_timeout(options.timeout);
        config.keepalives_idle(Duration::from_secs(30));
        config.options(format!("-c statement_timeout={}", options.timeout.as_millis()));
        config.application_name("kubetoken");
        let manager = Manager::from_config(
            config,
            tls::connector(&tls_options)?,
            ManagerConfig { recycling_method: RecyclingMethod::Fast },
        );
        let pool = Pool::builder(manager)
            .max_size(options.pool_size)
            .wait_timeout(Some(options.timeout))
            .create_timeout(Some(options.timeout))
            .recycle_timeout(Some(options.timeout))
            .runtime(Runtime::Tokio1)
            .build()
            .map_err(|e| format!("the PostgreSQL pool: {e}"))?;
        {
            let mut client = pool.get().await.map_err(|e| format!("cannot reach PostgreSQL: {}", with_causes(&e)))?;
            let applied = schema::migrate(&mut client).await.map_err(|e| e.to_string())?;
            if !applied.is_empty() {
                tracing::info!(?applied, "PostgreSQL schema migrated");
            }
        }
        let cursor = {
            let client = pool.get().await.map_err(|e| format!("cannot reach PostgreSQL: {}", with_causes(&e)))?;
            let row = client
                .query_one("SELECT coalesce(max(id), 0) FROM kubetoken_lockout_failures", &[])
                .await
                .map_err(|e| schema::describe(&e))?;
            row.get::<_, i64>(0)
        };
        let (writes, queue) = mpsc::unbounded_channel();
        let store = Arc::new(Self {
            pool,
            cache: Mutex::new(Cache::default()),
            healthy: AtomicBool::new(true),
            options,
            clock,
            failures_in: Mutex::new(Vec::new()),
            failures_cursor: AtomicI64::new(cursor),
            writes,
            statements: AtomicU64::new(0),
            group_commits: AtomicU64::new(0),
        });
        tokio::spawn(group_commit(Arc::downgrade(&store), queue));
        tokio::spawn(expire(Arc::downgrade(&store)));
        tokio::spawn(poll_failures(Arc::downgrade(&store)));
        Ok(store)
    }

    /// The secret `name` every instance shares: the stored one, or one made by `generate` and stored now if there is
    /// none (then `true`). `generate` runs only when the secret is missing (an RSA key takes a while); two instances
    /// racing both get the one stored first: made once, never twice.
    pub async fn shared_secret(
        &self,
        name: &str,
        generate: impl FnOnce() -> Result<Vec<u8>, String>,
    ) -> Result<(Vec<u8>, bool), String> {
        let client = self.pool.get().await.map_err(|e| format!("cannot reach PostgreSQL: {}", with_causes(&e)))?;
        let select = "SELECT value FROM kubetoken_shared_secrets WHERE name = $1";
        if let Some(row) = client.query_opt(select, &[&name]).await.map_err(|e| schema::describe(&e))? {
            return Ok((row.get(0), false));
        }
        let inserted = client
            .execute(
                "INSERT INTO kubetoken_shared_secrets (name, value) VALUES ($1, $2) ON CONFLICT (name) DO NOTHING",
                &[&name, &generate()?],
            )
            .await
            .map_err(|e| schema::describe(&e))?;
        let row = client.query_one(select, &[&name]).await.map_err(|e| schema::describe(&e))?;
        Ok((row.get(0), inserted == 1))
    }

    /// The store's own metrics (the batch sizes are the shared `kubetoken_storage_batch_records`).
    pub fn render_metrics(&self, out: &mut String) {
        use std::fmt::Write;
        out.push_str("# HELP kubetoken_postgres_statements_total Statements run for requests (reads and group commits), one round trip each.\n# TYPE kubetoken_postgres_statements_total counter\n");
        let _ = writeln!(out, "kubetoken_postgres_statements_total {}", self.statements.load(Ordering::Relaxed));
        out.push_str("# HELP kubetoken_postgres_group_commits_total Group commits: statements that applied a batch of changes.\n# TYPE kubetoken_postgres_group_commits_total counter\n");
        let _ = writeln!(out, "kubetoken_postgres_group_commits_total {}", self.group_commits.load(Ordering::Relaxed));
        out.push_str("# HELP kubetoken_postgres_cached_entries Entries of the bounded read cache.\n# TYPE kubetoken_postgres_cached_entries gauge\n");
        let _ = writeln!(out, "kubetoken_postgres_cached_entries {}", self.cache().len());
    }

    fn cache(&self) -> std::sync::MutexGuard<'_, Cache> {
        self.cache.lock().unwrap_or_else(|p| p.into_inner())
    }

    async fn client(&self) -> Result<deadpool_postgres::Object, StoreError> {
        let got = self.pool.get().await;
        self.healthy.store(got.is_ok(), Ordering::Relaxed);
        got.map_err(|e| unavailable(format!("PostgreSQL: {}", with_causes(&e))))
    }

    async fn query(
        &self,
        sql: &str,
        params: &[&(dyn tokio_postgres::types::ToSql + Sync)],
    ) -> Result<Vec<tokio_postgres::Row>, StoreError> {
        self.run(sql, params, true).await
    }

    /// One statement on a pooled connection ([`Self::timed`]); a connection that gave no answer is dropped.
    async fn run(
        &self,
        sql: &str,
        params: &[&(dyn tokio_postgres::types::ToSql + Sync)],
        counted: bool,
    ) -> Result<Vec<tokio_postgres::Row>, StoreError> {
        let client = self.client().await?;
        let Ok(rows) = self.timed(&client, sql, params, counted).await else {
            // No answer: the connection may be half-open; it is not handed out again.
            drop(deadpool_postgres::Object::take(client));
            self.healthy.store(false, Ordering::Relaxed);
            return Err(unavailable("PostgreSQL did not answer in time"));
        };
        self.healthy.store(rows.is_ok(), Ordering::Relaxed);
        rows.map_err(|e| db(&e))
    }

    async fn fetch(&self, lookup: Lookup<'_>) -> Result<(), StoreError> {
        let now = Instant::now();
        match lookup {
            Lookup::Key(key) => {
                let sql = format!(
                    "SELECT {COLUMNS} FROM kubetoken_token_pairs WHERE client_id = $1 AND subject = $2 AND scopes = $3"
                );
                let rows =
                    self.query(&sql, &[&key.client_id, &subject_text(&key.subject), &key.scopes.to_string()]).await?;
                let pair = rows.first().map(row_pair).transpose()?.map(|(_, p)| p);
                self.cache().keys.insert(key.clone(), (pair, now));
            }
            Lookup::Access(id) | Lookup::Refresh(id) => {
                let column = if matches!(lookup, Lookup::Access(_)) { "access_id" } else { "refresh_id" };
                let sql = format!("SELECT {COLUMNS} FROM kubetoken_token_pairs WHERE {column} = $1");
                let rows = self.query(&sql, &[&&id.0[..]]).await?;
                let found = rows.first().map(row_pair).transpose()?;
                let mut cache = self.cache();
                let map = if matches!(lookup, Lookup::Access(_)) { &mut cache.access } else { &mut cache.refresh };
                match found {
                    Some((key, pair)) => {
                        map.insert(*id, (Arc::new(key), pair, now));
                    }
                    None => {
                        map.remove(id);
                    }
                }
            }
            Lookup::User { client_id, username } => {
                let sql = format!("SELECT {COLUMNS} FROM kubetoken_token_pairs WHERE client_id = $1 AND subject = $2");
                let subject = subject_text(&Subject::user_from_stored(username));
                let rows = self.query(&sql, &[&client_id, &subject]).await?;
                let pairs = rows.iter().map(row_pair).collect::<Result<Vec<_>, _>>()?;
                self.cache().users.insert((client_id.to_string(), username.to_string()), (pairs, now));
            }
        }
        let cap = self.options.cache_rows;
        self.cache().trim(cap);
        Ok(())
    }

    fn cached(&self, lookup: Lookup<'_>) -> bool {
        let cache = self.cache();
        match lookup {
            Lookup::Key(k) => cache.keys.contains_key(k),
            Lookup::Access(id) => cache.access.contains_key(id),
            Lookup::Refresh(id) => cache.refresh.contains_key(id),
            Lookup::User { client_id, username } => {
                cache.users.contains_key(&(client_id.to_string(), username.to_string()))
            }
        }
    }

    /// Queues `change` for the next group commit and waits for its outcome.
    async fn write(&self, change: Change) -> Result<(), StoreError> {
        let (done, outcome) = oneshot::channel();
        self.writes.send(Pending { change, done }).map_err(|_| unavailable("the PostgreSQL writer stopped"))?;
        outcome.await.map_err(|_| unavailable("the PostgreSQL writer stopped"))?
    }

    /// Applies `batch` in one statement (one round trip, one transaction): each change is a compare-and-set on its
    /// own row; the rows it changed say which changes held. Keys are distinct within a batch.
    async fn apply_batch(&self, batch: &[Pending]) -> Result<Vec<bool>, StoreError> {
        let mut columns = BatchColumns::default();
        for (n, p) in batch.iter().enumerate() {
            columns.push(n, &p.change)?;
        }
        let mut attempt = 0;
        loop {
            attempt += 1;
            let client = self.client().await?;
            let lost = match self.timed(&client, GROUP_COMMIT, &columns.params(), true).await {
                Ok(Ok(rows)) => {
                    self.healthy.store(true, Ordering::Relaxed);
                    let mut held = vec![false; batch.len()];
                    for row in rows {
                        if let Some(h) = usize::try_from(row.get::<_, i32>(0)).ok().and_then(|n| held.get_mut(n)) {
                            *h = true;
                        }
                    }
                    return Ok(held);
                }
                // Another replica's batch locked the same rows in the other order: nothing of this batch was
                // applied, so it runs again.
                Ok(Err(e)) if attempt < 4 && e.code().is_some_and(|c| RETRYABLE.contains(&c)) => {
                    tracing::debug!(error = %schema::describe(&e), "group commit retried");
                    // A few random milliseconds, so the two batches do not meet again in the same order.
                    drop(client);
                    let jitter = rand_suffix() % (5 * u64::try_from(attempt).unwrap_or(1));
                    tokio::time::sleep(Duration::from_millis(1 + jitter)).await;
                    continue;
                }
                // The server refused the statement: nothing of it was applied.
                Ok(Err(e)) if e.code().is_some() => return Err(db(&e)),
                Ok(Err(e)) => schema::describe(&e),
                Err(_) => "PostgreSQL did not answer in time".to_string(),
            };
            // The connection went away, or no answer came, after the statement was sent: it may have committed.
            // The connection is not handed out again, and what the rows now hold decides each change, so a client
            // is never told 503 for a change that landed (its retry would meet its own refresh rotation as reuse).
            drop(deadpool_postgres::Object::take(client));
            self.healthy.store(false, Ordering::Relaxed);
            tracing::warn!(error = %lost, changes = batch.len(), "group commit unanswered; reading its rows back");
            return self.read_back(batch, &columns).await.map_err(|e| {
                tracing::warn!(error = %e, "reading a group commit's rows back failed; its outcome is unknown");
                unavailable(format!("PostgreSQL: {lost}"))
            });
        }
    }

    /// After a group commit went unanswered: which of its changes the rows show. A change that set a pair held if
    /// its key's row has the pair's access id (random: nobody else wrote it); a revocation held if the expected pair
    /// is gone. Anything else is reported as a conflict, which the core decides again on the rows as they are.
    async fn read_back(&self, batch: &[Pending], columns: &BatchColumns) -> Result<Vec<bool>, StoreError> {
        let rows = self
            .query(
                "SELECT i.n, p.access_id
                 FROM unnest($1::int4[], $2::text[], $3::text[], $4::text[]) AS i(n, client_id, subject, scopes)
                 LEFT JOIN kubetoken_token_pairs p USING (client_id, subject, scopes)",
                &[&columns.n, &columns.client_id, &columns.subject, &columns.scopes],
            )
            .await?;
        let mut held = vec![false; batch.len()];
        for row in rows {
            let Some(n) = usize::try_from(row.get::<_, i32>(0)).ok().filter(|n| *n < batch.len()) else { continue };
            let now: Option<Vec<u8>> = row.get(1);
            let change = &batch[n].change;
            held[n] = match (&change.next, change.expect) {
                (Some(next), _) => now.as_deref() == Some(&next.access_id.0[..]),
                (None, Some(expected)) => now.as_deref() != Some(&expected.0[..]),
                (None, None) => false,
            };
        }
        Ok(held)
    }

    /// One statement (prepared once per connection) and its answer, waited for at most [`Self::answer_timeout`]:
    /// `Err` when no answer came in time. `counted`: a request's statement (the round trips per token), not a
    /// background task's.
    async fn timed(
        &self,
        client: &deadpool_postgres::Object,
        sql: &str,
        params: &[&(dyn tokio_postgres::types::ToSql + Sync)],
        counted: bool,
    ) -> Result<Result<Vec<tokio_postgres::Row>, tokio_postgres::Error>, tokio::time::error::Elapsed> {
        tokio::time::timeout(self.answer_timeout(), async {
            let statement = client.prepare_cached(sql).await?;
            if counted {
                self.statements.fetch_add(1, Ordering::Relaxed);
            }
            client.query(&statement, params).await
        })
        .await
    }

    /// How long a statement's answer is waited for: the server's statement timeout, and a little for the network.
    fn answer_timeout(&self) -> Duration {
        self.options.timeout + Duration::from_secs(1)
    }
}

/// One change waiting for the group commit, and who waits for it.
struct Pending {
    change: Change,
    done: oneshot::Sender<Result<(), StoreError>>,
}

const RETRYABLE: [&tokio_postgres::error::SqlState; 2] = [
    &tokio_postgres::error::SqlState::T_R_DEADLOCK_DETECTED,
    &tokio_postgres::error::SqlState::T_R_SERIALIZATION_FAILURE,
];

/// At most this many changes per statement.
const MAX_BATCH: usize = 256;

/// The group commit: each change's row is inserted when it expects no pair, updated or deleted when its row still has
/// the expected access id, and for "no pair expected, none wanted" checked to be absent. It returns the numbers of the
/// changes that held; the others met a concurrent change (a conflict, decided again by the core).
const GROUP_COMMIT: &str = "
WITH input AS (
    SELECT * FROM unnest($1::int4[], $2::text[], $3::text[], $4::text[], $5::bytea[], $6::bytea[], $7::text[],
                         $8::int8[], $9::bytea[])
        AS i(n, client_id, subject, scopes, access_id, refresh_id, pair, expires_at, expect)
),
inserted AS (
    INSERT INTO kubetoken_token_pairs AS p
        (client_id, subject, scopes, access_id, refresh_id, pair, expires_at, change_seq)
    SELECT client_id, subject, scopes, access_id, refresh_id, pair::jsonb, expires_at, nextval('kubetoken_change_seq')
    FROM input WHERE expect IS NULL AND access_id IS NOT NULL
    ON CONFLICT (client_id, subject, scopes) DO NOTHING
    RETURNING p.client_id, p.subject, p.scopes
),
updated AS (
    UPDATE kubetoken_token_pairs p
    SET access_id = i.access_id, refresh_id = i.refresh_id, pair = i.pair::jsonb, expires_at = i.expires_at,
        change_seq = nextval('kubetoken_change_seq')
    FROM input i
    WHERE i.expect IS NOT NULL AND i.access_id IS NOT NULL
      AND p.client_id = i.client_id AND p.subject = i.subject AND p.scopes = i.scopes AND p.access_id = i.expect
    RETURNING i.n
),
deleted AS (
    DELETE FROM kubetoken_token_pairs p USING input i
    WHERE i.expect IS NOT NULL AND i.access_id IS NULL
      AND p.client_id = i.client_id AND p.subject = i.subject AND p.scopes = i.scopes AND p.access_id = i.expect
    RETURNING i.n
)
SELECT i.n FROM input i JOIN inserted USING (client_id, subject, scopes)
UNION ALL SELECT n FROM updated
UNION ALL SELECT n FROM deleted
UNION ALL SELECT i.n FROM input i WHERE i.expect IS NULL AND i.access_id IS NULL AND NOT EXISTS (
    SELECT 1 FROM kubetoken_token_pairs p
    WHERE p.client_id = i.client_id AND p.subject = i.subject AND p.scopes = i.scopes)
";

/// A batch's changes as the statement's array parameters.
#[derive(Default)]
struct BatchColumns {
    n: Vec<i32>,
    client_id: Vec<String>,
    subject: Vec<String>,
    scopes: Vec<String>,
    access_id: Vec<Option<Vec<u8>>>,
    refresh_id: Vec<Option<Vec<u8>>>,
    pair: Vec<Option<String>>,
    expires_at: Vec<Option<i64>>,
    expect: Vec<Option<Vec<u8>>>,
}

impl BatchColumns {
    fn push(&mut self, n: usize, change: &Change) -> Result<(), StoreError> {
        let key = &change.key;
        self.n.push(i32::try_from(n).map_err(unavailable)?);
        self.client_id.push(key.client_id.clone());
        self.subject.push(subject_text(&key.subject));
        self.scopes.push(key.scopes.to_string());
        self.expect.push(change.expect.map(|id| id.0.to_vec()));
        match &change.next {
            Some(next) => {
                self.access_id.push(Some(next.access_id.0.to_vec()));
                self.refresh_id.push(next.refresh.map(|r| r.id.0.to_vec()));
                self.pair.push(Some(serde_json::to_string(next).map_err(unavailable)?));
                self.expires_at.push(Some(i64::try_from(next.dead_after()).unwrap_or(i64::MAX)));
            }
            None => {
                self.access_id.push(None);
                self.refresh_id.push(None);
                self.pair.push(None);
                self.expires_at.push(None);
            }
        }
        Ok(())
    }

    fn params(&self) -> [&(dyn tokio_postgres::types::ToSql + Sync); 9] {
        [
            &self.n,
            &self.client_id,
            &self.subject,
            &self.scopes,
            &self.access_id,
            &self.refresh_id,
            &self.pair,
            &self.expires_at,
            &self.expect,
        ]
    }
}

/// The group commit's writer: while one batch is in flight the next gathers, so under load a statement carries many
/// changes and at rest a change goes alone at once. A change for a key already in the batch waits for the next one
/// (the statement changes each row once).
async fn group_commit(store: std::sync::Weak<PgStore>, mut queue: mpsc::UnboundedReceiver<Pending>) {
    let mut deferred: std::collections::VecDeque<Pending> = std::collections::VecDeque::new();
    loop {
        if deferred.is_empty() {
            match queue.recv().await {
                Some(p) => deferred.push_back(p),
                None => return,
            }
        }
        while let Ok(p) = queue.try_recv() {
            deferred.push_back(p);
        }
        let mut batch = Vec::new();
        let mut keys = std::collections::HashSet::new();
        let mut later = std::collections::VecDeque::new();
        while let Some(p) = deferred.pop_front() {
            if p.done.is_closed() {
                // Its request gave up before the change was written: it is not written.
                continue;
            }
            if batch.len() < MAX_BATCH && keys.insert(p.change.key.clone()) {
                batch.push(p);
            } else {
                later.push_back(p);
            }
        }
        deferred = later;
        if batch.is_empty() {
            continue;
        }
        let Some(store) = store.upgrade() else { return };
        store.options.batch_sizes.observe(batch.len() as f64);
        store.group_commits.fetch_add(1, Ordering::Relaxed);
        let outcome = store.apply_batch(&batch).await;
        for (i, p) in batch.into_iter().enumerate() {
            let result = match &outcome {
                Ok(held) if held.get(i).copied().unwrap_or(false) => {
                    store.cache().apply(&p.change);
                    Ok(())
                }
                Ok(_) => Err(StoreError::Conflict),
                Err(e) => Err(e.clone()),
            };
            let _ = p.done.send(result);
        }
    }
}

impl TokenStore for PgStore {
    fn prepare<'a>(&'a self, lookup: Lookup<'a>) -> StoreFuture<'a, ()> {
        Box::pin(async move {
            match self.fetch(lookup).await {
                Ok(()) => Ok(()),
                // Unreachable: what was read before still answers (introspection keeps working); a decision made on
                // it cannot be written anyway.
                Err(e) if self.cached(lookup) => {
                    tracing::debug!(error = %e, "PostgreSQL unreachable: answering from the cache");
                    Ok(())
                }
                Err(e) => Err(e),
            }
        })
    }

    fn pair(&self, key: &TokenKey) -> Option<LivePair> {
        self.cache().keys.get(key).and_then(|(p, _)| p.clone())
    }

    fn find_access(&self, id: &TokenId) -> Option<(SharedKey, LivePair)> {
        let cache = self.cache();
        let (key, pair, at) = cache.access.get(id)?;
        cache.current(key, pair, *at, |p| p.access_id == *id)
    }

    fn find_refresh(&self, id: &TokenId) -> Option<(SharedKey, LivePair)> {
        let cache = self.cache();
        let (key, pair, at) = cache.refresh.get(id)?;
        cache.current(key, pair, *at, |p| p.refresh.is_some_and(|r| r.id == *id))
    }

    fn user_pairs(&self, client_id: &str, username: &str) -> Vec<(TokenKey, LivePair)> {
        self.cache()
            .users
            .get(&(client_id.to_string(), username.to_string()))
            .map(|(v, _)| v.clone())
            .unwrap_or_default()
    }

    fn commit(&self, change: Change) -> StoreFuture<'_, ()> {
        Box::pin(self.write(change))
    }

    /// Reads come from committed rows only: everything visible is durable.
    fn sync(&self) -> StoreFuture<'_, ()> {
        Box::pin(std::future::ready(Ok(())))
    }

    fn healthy(&self) -> bool {
        self.healthy.load(Ordering::Relaxed)
    }

    /// The cache learns a change once its group commit is answered.
    fn visible_when_committed(&self) -> bool {
        true
    }

    /// One row per used assertion, its primary key deciding between replicas: the insert that finds the row there
    /// (and not expired) is the replay.
    fn remember_assertion<'a>(&'a self, _client_id: &'a str, id: &'a str, until: UnixTime) -> StoreFuture<'a, bool> {
        Box::pin(async move {
            // A digest: fixed size, and free of the NUL bytes a replay id holds (text cannot).
            let digest = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, id.as_bytes()).as_ref().to_vec();
            let until = i64::try_from(until).unwrap_or(i64::MAX);
            let now = i64::try_from(self.clock.now()).unwrap_or(i64::MAX);
            // An expired row (not yet deleted by expiry) is taken over: that assertion is refused as expired anyway.
            let rows = self
                .run(
                    "INSERT INTO kubetoken_used_assertions (id, expires_at) VALUES ($1, $2)
                     ON CONFLICT (id) DO UPDATE SET expires_at = EXCLUDED.expires_at
                         WHERE kubetoken_used_assertions.expires_at <= $3
                     RETURNING 1",
                    &[&digest, &until, &now],
                    true,
                )
                .await?;
            Ok(!rows.is_empty())
        })
    }

    fn forget_assertion<'a>(&'a self, _client_id: &'a str, id: &'a str) -> StoreFuture<'a, ()> {
        Box::pin(async move {
            let digest = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, id.as_bytes()).as_ref().to_vec();
            self.run("DELETE FROM kubetoken_used_assertions WHERE id = $1 RETURNING 1", &[&digest], true).await?;
            Ok(())
        })
    }

    fn share_failure(&self, failure: SharedFailure) {
        let pool = self.pool.clone();
        let origin = self.options.origin.clone();
        let bound = self.answer_timeout();
        // Best effort, off the request path: a lost one costs an attacker nothing beyond one more guess.
        tokio::spawn(tokio::time::timeout(bound, async move {
            let Ok(client) = pool.get().await else { return };
            let at = i64::try_from(failure.at).unwrap_or(i64::MAX);
            let _ = client
                .execute(
                    "INSERT INTO kubetoken_lockout_failures (origin, user_scope, who, at) VALUES ($1, $2, $3, $4)",
                    &[&origin, &failure.user, &failure.who, &at],
                )
                .await;
        }));
    }

    fn take_shared_failures(&self) -> Vec<SharedFailure> {
        std::mem::take(&mut *self.failures_in.lock().unwrap_or_else(|p| p.into_inner()))
    }
}

/// Deletes expired rows, a batch at a time, through the expiry index: never a scan or a delete of the table.
async fn expire(store: std::sync::Weak<PgStore>) {
    loop {
        tokio::time::sleep(EXPIRY_INTERVAL).await;
        let Some(store) = store.upgrade() else { return };
        let now = i64::try_from(store.clock.now()).unwrap_or(i64::MAX);
        loop {
            let deleted = store
                .run(
                    "DELETE FROM kubetoken_token_pairs WHERE ctid IN (
                         SELECT ctid FROM kubetoken_token_pairs WHERE expires_at < $1 LIMIT $2) RETURNING 1",
                    &[&now, &EXPIRY_BATCH],
                    false,
                )
                .await;
            match deleted {
                Ok(rows) if rows.len() == EXPIRY_BATCH as usize => tokio::task::yield_now().await,
                Ok(_) => break,
                Err(e) => {
                    tracing::warn!(error = %e, "deleting expired token rows failed");
                    break;
                }
            }
        }
        // Used assertions past their expiry, and shared failures older than any lockout: one batch each per round.
        let hour_ago = now.saturating_sub(3600);
        for (sql, before) in [
            (
                "DELETE FROM kubetoken_used_assertions WHERE id IN (
                     SELECT id FROM kubetoken_used_assertions WHERE expires_at < $1 LIMIT $2) RETURNING 1",
                now,
            ),
            (
                "DELETE FROM kubetoken_lockout_failures WHERE id IN (
                     SELECT id FROM kubetoken_lockout_failures WHERE at < $1 LIMIT $2) RETURNING 1",
                hour_ago,
            ),
        ] {
            let _ = store.run(sql, &[&before, &EXPIRY_BATCH], false).await;
        }
    }
}

/// Brings the other replicas' failed credential checks in, for the lockout, and keeps `healthy` current while no
/// request comes.
async fn poll_failures(store: std::sync::Weak<PgStore>) {
    loop {
        tokio::time::sleep(FAILURES_POLL).await;
        let Some(store) = store.upgrade() else { return };
        // Also the readiness probe's view of the database: it answers, or it does not (`run` keeps `healthy`).
        let cursor = store.failures_cursor.load(Ordering::Relaxed);
        let rows = store
            .run(
                "SELECT id, origin, user_scope, who, at FROM kubetoken_lockout_failures WHERE id > $1 ORDER BY id
                 LIMIT 1000",
                &[&cursor],
                false,
            )
            .await;
        let Ok(rows) = rows else { continue };
        let mut incoming = Vec::new();
        for row in &rows {
            store.failures_cursor.fetch_max(row.get::<_, i64>(0), Ordering::Relaxed);
            if row.get::<_, String>(1) != store.options.origin {
                let at: i64 = row.get(4);
                incoming.push(SharedFailure { user: row.get(2), who: row.get(3), at: u64::try_from(at).unwrap_or(0) });
            }
        }
        store.failures_in.lock().unwrap_or_else(|p| p.into_inner()).extend(incoming);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn subjects_are_stored_as_text_and_read_back() {
        for subject in [
            Subject::Client,
            Subject::User("alice".into()),
            Subject::User("f:alice".into()),
            Subject::Federated(FederatedUser::new("https://idp.test/realms/shop", "alice")),
        ] {
            assert_eq!(subject_of(&subject_text(&subject)), Some(subject.clone()), "{subject:?}");
        }
        // A federated subject's text holds no NUL (PostgreSQL text cannot), and a user named like one stays a user.
        assert!(!subject_text(&Subject::Federated(FederatedUser::new("https://i", "u"))).contains('\0'));
        assert_eq!(subject_of("f:no-issuer"), None);
        assert_eq!(subject_of("x"), None);
    }
}

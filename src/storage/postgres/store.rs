//! The token state in PostgreSQL, behind the core's storage port.
//!
//! - **Writes** are compare-and-set statements on the key's row (`INSERT .. ON CONFLICT DO NOTHING`, `UPDATE` or
//!   `DELETE .. WHERE access_id = expected`): the database decides between replicas; no row changed is a conflict,
//!   which the core decides again. A change's future resolves once its statement committed.
//! - **Reads** come from what [`TokenStore::prepare`] fetched for the request: every decision reads the row as the
//!   database has it now, so a token superseded or revoked at another replica is inactive here at once. The fetched
//!   rows are kept in a bounded cache: when the database cannot be reached, a token read before still introspects.
//! - **Expiry**: a background task deletes expired rows in small batches through the expiry index.
//!
//! Not yet (issue 20): group commit, LISTEN/NOTIFY-driven caching, TLS to the server, the sidecar's use of it.

use std::collections::HashMap;
use std::str::FromStr;
use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod, Runtime};
use tokio_postgres::NoTls;

use super::schema;
use crate::core::clock::Clock;
use crate::core::lockout::SharedFailure;
use crate::core::model::{Change, LivePair, SharedKey, Subject, TokenId, TokenKey};
use crate::core::scope::ScopeSet;
use crate::core::store::{Lookup, StoreError, StoreFuture, TokenStore};

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

    /// What a committed change means for the cached reads.
    fn apply(&mut self, change: &Change) {
        let now = Instant::now();
        if let Some((old, _)) = self.keys.get(&change.key)
            && let Some(old) = old.clone()
        {
            self.access.remove(&old.access_id);
            if let Some(r) = old.refresh {
                self.refresh.remove(&r.id);
            }
        }
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
}

pub struct PgStore {
    pool: Pool,
    cache: Mutex<Cache>,
    healthy: AtomicBool,
    options: PgOptions,
    clock: Arc<dyn Clock>,
    failures_in: Mutex<Vec<SharedFailure>>,
    failures_cursor: AtomicI64,
}

fn unavailable(e: impl std::fmt::Display) -> StoreError {
    StoreError::Unavailable(e.to_string())
}

fn db(e: &tokio_postgres::Error) -> StoreError {
    StoreError::Unavailable(format!("PostgreSQL: {}", schema::describe(e)))
}

fn subject_text(s: &Subject) -> String {
    match s {
        Subject::User(u) => format!("u:{u}"),
        Subject::Client => "c".into(),
    }
}

fn subject_of(text: &str) -> Option<Subject> {
    match text {
        "c" => Some(Subject::Client),
        other => other.strip_prefix("u:").map(|u| Subject::User(u.to_string())),
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
        let mut config =
            tokio_postgres::Config::from_str(&options.url).map_err(|e| format!("the PostgreSQL URL: {e}"))?;
        if let Some(password) = &options.password {
            config.password(password.as_bytes());
        }
        config.connect_timeout(options.timeout);
        config.options(format!("-c statement_timeout={}", options.timeout.as_millis()));
        config.application_name("kubetoken");
        let manager = Manager::from_config(config, NoTls, ManagerConfig { recycling_method: RecyclingMethod::Fast });
        let pool = Pool::builder(manager)
            .max_size(options.pool_size)
            .wait_timeout(Some(options.timeout))
            .create_timeout(Some(options.timeout))
            .recycle_timeout(Some(options.timeout))
            .runtime(Runtime::Tokio1)
            .build()
            .map_err(|e| format!("the PostgreSQL pool: {e}"))?;
        {
            let mut client = pool.get().await.map_err(|e| format!("cannot reach PostgreSQL: {e}"))?;
            let applied = schema::migrate(&mut client).await.map_err(|e| e.to_string())?;
            if !applied.is_empty() {
                tracing::info!(?applied, "PostgreSQL schema migrated");
            }
        }
        let cursor = {
            let client = pool.get().await.map_err(|e| format!("cannot reach PostgreSQL: {e}"))?;
            let row = client
                .query_one("SELECT coalesce(max(id), 0) FROM kubetoken_lockout_failures", &[])
                .await
                .map_err(|e| schema::describe(&e))?;
            row.get::<_, i64>(0)
        };
        let store = Arc::new(Self {
            pool,
            cache: Mutex::new(Cache::default()),
            healthy: AtomicBool::new(true),
            options,
            clock,
            failures_in: Mutex::new(Vec::new()),
            failures_cursor: AtomicI64::new(cursor),
        });
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
        let client = self.pool.get().await.map_err(|e| format!("cannot reach PostgreSQL: {e}"))?;
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

    fn cache(&self) -> std::sync::MutexGuard<'_, Cache> {
        self.cache.lock().unwrap_or_else(|p| p.into_inner())
    }

    async fn client(&self) -> Result<deadpool_postgres::Object, StoreError> {
        let got = self.pool.get().await;
        self.healthy.store(got.is_ok(), Ordering::Relaxed);
        got.map_err(|e| unavailable(format!("PostgreSQL: {e}")))
    }

    async fn query(
        &self,
        sql: &str,
        params: &[&(dyn tokio_postgres::types::ToSql + Sync)],
    ) -> Result<Vec<tokio_postgres::Row>, StoreError> {
        let client = self.client().await?;
        let rows = client.query(sql, params).await;
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
                let rows = self.query(&sql, &[&client_id, &format!("u:{username}")]).await?;
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

    async fn write(&self, change: &Change) -> Result<(), StoreError> {
        let client = self.client().await?;
        let key = &change.key;
        let (client_id, subject, scopes) = (&key.client_id, subject_text(&key.subject), key.scopes.to_string());
        let expect = change.expect.map(|id| id.0.to_vec());
        let written = match &change.next {
            Some(next) => {
                let pair = serde_json::to_string(next).map_err(unavailable)?;
                let access = next.access_id.0.to_vec();
                let refresh = next.refresh.map(|r| r.id.0.to_vec());
                let expires = i64::try_from(next.dead_after()).unwrap_or(i64::MAX);
                let params: [&(dyn tokio_postgres::types::ToSql + Sync); 7] =
                    [client_id, &subject, &scopes, &access, &refresh, &pair, &expires];
                match &expect {
                    None => {
                        client
                            .execute(
                                "INSERT INTO kubetoken_token_pairs
                                   (client_id, subject, scopes, access_id, refresh_id, pair, expires_at, change_seq)
                                 VALUES ($1, $2, $3, $4, $5, $6::text::jsonb, $7, nextval('kubetoken_change_seq'))
                                 ON CONFLICT (client_id, subject, scopes) DO NOTHING",
                                &params,
                            )
                            .await
                    }
                    Some(expected) => {
                        let mut with_expect = params.to_vec();
                        with_expect.push(expected);
                        client
                            .execute(
                                "UPDATE kubetoken_token_pairs
                                 SET access_id = $4, refresh_id = $5, pair = $6::text::jsonb, expires_at = $7,
                                     change_seq = nextval('kubetoken_change_seq')
                                 WHERE client_id = $1 AND subject = $2 AND scopes = $3 AND access_id = $8",
                                &with_expect,
                            )
                            .await
                    }
                }
            }
            None => match &expect {
                Some(expected) => {
                    client
                        .execute(
                            "DELETE FROM kubetoken_token_pairs
                             WHERE client_id = $1 AND subject = $2 AND scopes = $3 AND access_id = $4",
                            &[client_id, &subject, &scopes, expected],
                        )
                        .await
                }
                // Nothing expected, nothing wanted: a conflict only if the key has a pair.
                None => client
                    .query(
                        "SELECT 1 FROM kubetoken_token_pairs WHERE client_id = $1 AND subject = $2 AND scopes = $3",
                        &[client_id, &subject, &scopes],
                    )
                    .await
                    .map(|rows| u64::from(rows.is_empty())),
            },
        };
        self.healthy.store(written.is_ok(), Ordering::Relaxed);
        match written.map_err(|e| db(&e))? {
            0 => Err(StoreError::Conflict),
            _ => {
                self.cache().apply(change);
                Ok(())
            }
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
        self.cache().access.get(id).map(|(k, p, _)| (k.clone(), p.clone()))
    }

    fn find_refresh(&self, id: &TokenId) -> Option<(SharedKey, LivePair)> {
        self.cache().refresh.get(id).map(|(k, p, _)| (k.clone(), p.clone()))
    }

    fn user_pairs(&self, client_id: &str, username: &str) -> Vec<(TokenKey, LivePair)> {
        self.cache()
            .users
            .get(&(client_id.to_string(), username.to_string()))
            .map(|(v, _)| v.clone())
            .unwrap_or_default()
    }

    fn commit(&self, change: Change) -> StoreFuture<'_, ()> {
        Box::pin(async move { self.write(&change).await })
    }

    /// Reads come from committed rows only: everything visible is durable.
    fn sync(&self) -> StoreFuture<'_, ()> {
        Box::pin(std::future::ready(Ok(())))
    }

    fn healthy(&self) -> bool {
        self.healthy.load(Ordering::Relaxed)
    }

    fn share_failure(&self, failure: SharedFailure) {
        let pool = self.pool.clone();
        let origin = self.options.origin.clone();
        // Best effort, off the request path: a lost one costs an attacker nothing beyond one more guess.
        tokio::spawn(async move {
            let Ok(client) = pool.get().await else { return };
            let at = i64::try_from(failure.at).unwrap_or(i64::MAX);
            let _ = client
                .execute(
                    "INSERT INTO kubetoken_lockout_failures (origin, user_scope, who, at) VALUES ($1, $2, $3, $4)",
                    &[&origin, &failure.user, &failure.who, &at],
                )
                .await;
        });
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
        let Ok(client) = store.pool.get().await else { continue };
        loop {
            let deleted = client
                .execute(
                    "DELETE FROM kubetoken_token_pairs WHERE ctid IN (
                         SELECT ctid FROM kubetoken_token_pairs WHERE expires_at < $1 LIMIT $2)",
                    &[&now, &EXPIRY_BATCH],
                )
                .await;
            match deleted {
                Ok(n) if n == EXPIRY_BATCH as u64 => tokio::task::yield_now().await,
                Ok(_) => break,
                Err(e) => {
                    tracing::warn!(error = %schema::describe(&e), "deleting expired token rows failed");
                    break;
                }
            }
        }
        let hour_ago = now.saturating_sub(3600);
        let _ = client
            .execute(
                "DELETE FROM kubetoken_lockout_failures WHERE id IN (
                     SELECT id FROM kubetoken_lockout_failures WHERE at < $1 LIMIT $2)",
                &[&hour_ago, &EXPIRY_BATCH],
            )
            .await;
    }
}

/// Brings the other replicas' failed credential checks in, for the lockout, and keeps `healthy` current while no
/// request comes.
async fn poll_failures(store: std::sync::Weak<PgStore>) {
    loop {
        tokio::time::sleep(FAILURES_POLL).await;
        let Some(store) = store.upgrade() else { return };
        // Also the readiness probe's view of the database: it answers, or it does not.
        let Ok(client) = store.pool.get().await else {
            store.healthy.store(false, Ordering::Relaxed);
            continue;
        };
        let cursor = store.failures_cursor.load(Ordering::Relaxed);
        let rows = client
            .query(
                "SELECT id, origin, user_scope, who, at FROM kubetoken_lockout_failures WHERE id > $1 ORDER BY id
                 LIMIT 1000",
                &[&cursor],
            )
            .await;
        store.healthy.store(rows.is_ok(), Ordering::Relaxed);
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

//! The PostgreSQL schema and its migrations.
//!
//! Migrations are numbered and applied in order, each in its own transaction together with its row in
//! `kubetoken_schema_migrations`. The whole run holds a transaction-scoped advisory lock, so replicas starting at once
//! apply each migration once and the others wait and find nothing to do. A database with a migration this binary
//! does not know (written by a newer kubetoken) is refused: an older binary must not write a newer schema's state.

use tokio_postgres::Client;

/// The advisory lock key of migrations ("kubetokn" as 8 ASCII bytes): any constant, the same in every version.
const MIGRATION_LOCK: i64 = 0x6b75_6265_746f_6b6e;

/// The migrations, in order. Never edit one that was released: add the next.
pub const MIGRATIONS: &[(i32, &str)] = &[
    (
        1,
        "
    -- One row per token key: the per-device key (client, subject, scope set) is the primary key, as WSO2 keeps it
    -- unique; its prefix (client, subject) serves the device cap's lookup of one user's keys.
    CREATE TABLE kubetoken_token_pairs (
        client_id  text   NOT NULL,
        subject    text   NOT NULL,
        scopes     text   NOT NULL,
        access_id  bytea  NOT NULL,
        refresh_id bytea,
        pair       jsonb  NOT NULL,
        -- When the row stops mattering (the later of the access and refresh expiries): expiry deletes by it.
        expires_at bigint NOT NULL,
        -- The change that wrote the row, for the other replicas' caches.
        change_seq bigint NOT NULL,
        PRIMARY KEY (client_id, subject, scopes)
    );
    CREATE UNIQUE INDEX kubetoken_token_pairs_access ON kubetoken_token_pairs (access_id);
    CREATE UNIQUE INDEX kubetoken_token_pairs_refresh ON kubetoken_token_pairs (refresh_id)
        WHERE refresh_id IS NOT NULL;
    CREATE INDEX kubetoken_token_pairs_expiry ON kubetoken_token_pairs (expires_at);
    CREATE SEQUENCE kubetoken_change_seq;
    -- Failed credential checks shared by every replica, for the lockout.
    CREATE TABLE kubetoken_lockout_failures (
        id         bigserial PRIMARY KEY,
        -- The replica that saw it (it counted it already).
        origin     text    NOT NULL,
        user_scope boolean NOT NULL,
        who        text    NOT NULL,
        at         bigint  NOT NULL
    );
    CREATE INDEX kubetoken_lockout_failures_at ON kubetoken_lockout_failures (at);
    -- Secrets every instance must share (the opaque-token key, signing keys and credentials standalone mode makes
    -- when the manifests do not give them): made once, by whichever instance needs one first.
    CREATE TABLE kubetoken_shared_secrets (
        name  text  PRIMARY KEY,
        value bytea NOT NULL
    );
    ",
    ),
    (
        2,
        "
    -- Assertions of trusted issuers already used (jwt-bearer, token exchange), by a digest of their replay id, until
    -- they expire: every replica refuses a replay.
    CREATE TABLE kubetoken_used_assertions (
        id         bytea  PRIMARY KEY,
        expires_at bigint NOT NULL
    );
    CREATE INDEX kubetoken_used_assertions_expiry ON kubetoken_used_assertions (expires_at);
    ",
    ),
];

/// The newest schema this binary knows.
pub fn latest() -> i32 {
    MIGRATIONS.last().map_or(0, |(v, _)| *v)
}

#[derive(Debug, thiserror::Error)]
pub enum SchemaError {
    #[error(
        "the database's kubetoken schema is at version {found}, newer than this kubetoken knows ({known}): \
         run a kubetoken at least as new as the one that migrated it"
    )]
    Newer { found: i32, known: i32 },
    #[error("migrating the kubetoken schema to version {version}: {reason}")]
    Migration { version: i32, reason: String },
    #[error("reading the kubetoken schema version: {0}")]
    Postgres(String),
}

impl From<tokio_postgres::Error> for SchemaError {
    fn from(e: tokio_postgres::Error) -> Self {
        SchemaError::Postgres(describe(&e))
    }
}

/// The server's message when there is one (the error's Display is only "db error").
pub fn describe(e: &tokio_postgres::Error) -> String {
    match e.as_db_error() {
        Some(db) => format!("{} ({})", db.message(), db.code().code()),
        None => e.to_string(),
    }
}

/// Brings the database to [`latest`]; returns the migrations applied by this call (none when another replica did).
pub async fn migrate(client: &mut Client) -> Result<Vec<i32>, SchemaError> {
    let tx = client.transaction().await?;
    // Held until this transaction ends: one replica migrates, the others wait here and then find nothing to do.
    tx.execute("SELECT pg_advisory_xact_lock($1)", &[&MIGRATION_LOCK]).await?;
    tx.batch_execute(
        "CREATE TABLE IF NOT EXISTS kubetoken_schema_migrations (
            version    integer PRIMARY KEY,
            applied_at timestamptz NOT NULL DEFAULT now()
        )",
    )
    .await?;
    let found: i32 =
        tx.query_one("SELECT coalesce(max(version), 0) FROM kubetoken_schema_migrations", &[]).await?.get(0);
    let known = latest();
    if found > known {
        return Err(SchemaError::Newer { found, known });
    }
    let mut applied = Vec::new();
    for (version, sql) in MIGRATIONS.iter().filter(|(v, _)| *v > found) {
        let step = async {
            tx.batch_execute(sql).await?;
            tx.execute("INSERT INTO kubetoken_schema_migrations (version) VALUES ($1)", &[version]).await
        };
        step.await.map_err(|e| SchemaError::Migration { version: *version, reason: describe(&e) })?;
        applied.push(*version);
    }
    tx.commit().await?;
    Ok(applied)
}

/// The schema version of the database (0: none).
pub async fn version(client: &Client) -> Result<i32, SchemaError> {
    let exists: bool =
        client.query_one("SELECT to_regclass('kubetoken_schema_migrations') IS NOT NULL", &[]).await?.get(0);
    if !exists {
        return Ok(0);
    }
    Ok(client.query_one("SELECT coalesce(max(version), 0) FROM kubetoken_schema_migrations", &[]).await?.get(0))
}

//! The PostgreSQL token store against a real PostgreSQL (started by the test, on the loopback, one database per
//! test). So far: the schema's migrations.

mod common;

use common::postgres::{Postgres, connect};
use kubetoken::storage::postgres::schema::{self, SchemaError};

#[tokio::test]
async fn a_fresh_database_is_migrated_to_the_latest_schema_once() {
    let pg = Postgres::start();
    let url = pg.database().await;
    let mut client = connect(&url).await;
    assert_eq!(schema::version(&client).await.expect("version"), 0);
    let applied = schema::migrate(&mut client).await.expect("migrate");
    assert_eq!(applied, (1..=schema::latest()).collect::<Vec<_>>());
    assert_eq!(schema::version(&client).await.expect("version"), schema::latest());
    // The per-device key is the primary key: a second row for the same key is refused by the database itself.
    let insert = "INSERT INTO kubetoken_token_pairs
        (client_id, subject, scopes, access_id, pair, expires_at, change_seq)
        VALUES ('shop', 'user:alice', 'device_ipad', $1, '{}', 0, nextval('kubetoken_change_seq'))";
    client.execute(insert, &[&vec![1u8; 16]]).await.expect("first row");
    let err = client.execute(insert, &[&vec![2u8; 16]]).await.expect_err("a second row for the key");
    assert_eq!(err.code(), Some(&tokio_postgres::error::SqlState::UNIQUE_VIOLATION), "{err:?}");
    // Starting again applies nothing.
    assert_eq!(schema::migrate(&mut client).await.expect("again"), Vec::<i32>::new());
}

/// Replicas starting at once: the advisory lock makes one of them migrate and the others find nothing to do.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicas_migrating_at_once_apply_each_migration_once() {
    let pg = Postgres::start();
    let url = pg.database().await;
    let mut runs = Vec::new();
    for _ in 0..4 {
        let url = url.clone();
        runs.push(tokio::spawn(async move {
            let mut client = connect(&url).await;
            schema::migrate(&mut client).await.expect("migrate")
        }));
    }
    let mut applied = Vec::new();
    for run in runs {
        applied.extend(run.await.expect("join"));
    }
    applied.sort();
    assert_eq!(applied, (1..=schema::latest()).collect::<Vec<_>>(), "each migration applied exactly once");
    let client = connect(&url).await;
    let rows: i64 =
        client.query_one("SELECT count(*) FROM kubetoken_schema_migrations", &[]).await.expect("count").get(0);
    assert_eq!(rows, i64::from(schema::latest()));
}

#[tokio::test]
async fn a_schema_newer_than_this_binary_is_refused_and_left_alone() {
    let pg = Postgres::start();
    let url = pg.database().await;
    let mut client = connect(&url).await;
    schema::migrate(&mut client).await.expect("migrate");
    let newer = schema::latest() + 1;
    client.execute("INSERT INTO kubetoken_schema_migrations (version) VALUES ($1)", &[&newer]).await.expect("insert");
    let err = schema::migrate(&mut client).await.expect_err("refused");
    assert!(matches!(err, SchemaError::Newer { found, known } if found == newer && known == schema::latest()), "{err}");
    assert!(err.to_string().contains("newer than this kubetoken knows"), "{err}");
    assert_eq!(schema::version(&client).await.expect("version"), newer, "nothing was changed");
}

//! The PostgreSQL token store against a real PostgreSQL (started by the test, on the loopback, one database per
//! test): the schema's migrations, and two `kubetoken standalone` instances sharing one database.

mod common;

use std::sync::Arc;

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

/// Two standalone instances (sharing their state directory's secrets, as instances on several machines share
/// them through their manifests) and one database: one service.
struct Fleet {
    _pg: Postgres,
    _state: tempfile::TempDir,
    a: common::Server,
    b: common::Server,
}

async fn fleet() -> Fleet {
    let pg = Postgres::start();
    let url = pg.database().await;
    let state = tempfile::tempdir().expect("state dir");
    let manifests = common::examples_dir();
    let a = common::Server::start(&manifests, state.path(), &["--postgres", &url]);
    let b = common::Server::start(&manifests, state.path(), &["--postgres", &url]);
    Fleet { _pg: pg, _state: state, a, b }
}

fn cc(server: &common::Server, scope: &str) -> common::Response {
    server.token(common::SHOP, &[("grant_type", "client_credentials"), ("scope", scope)])
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_superseded_at_one_instance_is_inactive_at_the_other_and_devices_live_side_by_side() {
    let f = fleet().await;
    let ipad_a = f.a.password("alice", "alice-password", "device_ipad");
    assert_eq!(ipad_a.status, 200, "{}", ipad_a.body);
    let ipad_a = ipad_a.json()["access_token"].as_str().expect("token").to_string();
    let iphone_b = f.b.password("alice", "alice-password", "device_iphone").json()["access_token"]
        .as_str()
        .expect("token")
        .to_string();
    assert!(f.a.active(common::SHOP, &iphone_b) && f.b.active(common::SHOP, &ipad_a), "both devices, both instances");
    // A new iPad token at the other instance revokes the first, everywhere at once.
    let ipad_b = f.b.password("alice", "alice-password", "device_ipad").json()["access_token"]
        .as_str()
        .expect("token")
        .to_string();
    for server in [&f.a, &f.b] {
        assert!(!server.active(common::SHOP, &ipad_a), "the superseded iPad token is inactive");
        assert!(server.active(common::SHOP, &ipad_b) && server.active(common::SHOP, &iphone_b));
    }
    // Revoked at one, inactive at the other.
    assert_eq!(f.a.revoke(common::SHOP, &iphone_b).status, 200);
    assert!(!f.b.active(common::SHOP, &iphone_b));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refresh_token_rotated_at_one_instance_and_reused_at_the_other_revokes_the_login() {
    let f = fleet().await;
    let login = f.a.password("alice", "alice-password", "device_ipad").json();
    let first = login["refresh_token"].as_str().expect("refresh token").to_string();
    let refreshed = f.a.token(common::SHOP, &[("grant_type", "refresh_token"), ("refresh_token", &first)]);
    assert_eq!(refreshed.status, 200, "{}", refreshed.body);
    let access = refreshed.json()["access_token"].as_str().expect("token").to_string();
    let reuse = f.b.token(common::SHOP, &[("grant_type", "refresh_token"), ("refresh_token", &first)]);
    assert_eq!(reuse.status, 400, "{}", reuse.body);
    assert_eq!(reuse.json()["error"], "invalid_grant");
    assert!(!f.a.active(common::SHOP, &access), "the login's live token is revoked");
}

/// 200 requests for one key at once, split over both instances: all succeed, and exactly one token stays live.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_race_for_one_key_over_both_instances_leaves_exactly_one_live_token() {
    let f = Arc::new(fleet().await);
    let mut handles = Vec::new();
    for i in 0..200 {
        let f = f.clone();
        handles.push(std::thread::spawn(move || {
            let server = if i % 2 == 0 { &f.a } else { &f.b };
            cc(server, "device_kiosk-7")
        }));
    }
    let mut tokens = Vec::new();
    for h in handles {
        let r = h.join().expect("join");
        assert_eq!(r.status, 200, "{}", r.body);
        tokens.push(r.json()["access_token"].as_str().expect("token").to_string());
    }
    let live = tokens.iter().filter(|t| f.a.active(common::SHOP, t)).count();
    assert_eq!(live, 1, "exactly one live token for the key");
}

/// kill -9 of an instance loses nothing: what it answered is in the database, and the other instance (or it,
/// restarted) serves it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_instance_killed_loses_nothing() {
    let mut f = fleet().await;
    let token = cc(&f.a, "device_x").json()["access_token"].as_str().expect("token").to_string();
    f.a.kill9();
    assert!(f.b.active(common::SHOP, &token), "the other instance serves what the killed one issued");
    let next = cc(&f.b, "device_x").json()["access_token"].as_str().expect("token").to_string();
    assert!(!f.b.active(common::SHOP, &token) && f.b.active(common::SHOP, &next));
}

/// Expired rows are deleted by the instances, in batches, without anyone asking.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expired_rows_are_deleted() {
    let pg = Postgres::start();
    let url = pg.database().await;
    let state = tempfile::tempdir().expect("state dir");
    let server = common::Server::start(&common::examples_dir(), state.path(), &["--postgres", &url]);
    assert_eq!(cc(&server, "device_x").status, 200);
    let client = connect(&url).await;
    let count = || async {
        let row = client.query_one("SELECT count(*) FROM kubetoken_token_pairs", &[]).await.expect("count");
        row.get::<_, i64>(0)
    };
    assert_eq!(count().await, 1);
    // 2,500 rows long expired (more than one batch), written as another replica would have.
    client
        .execute(
            "INSERT INTO kubetoken_token_pairs (client_id, subject, scopes, access_id, pair, expires_at, change_seq)
             SELECT 'shop-app', 'c', 'device_old-' || n, decode(lpad(to_hex(n), 32, '0'), 'hex'), '{}', 1000,
                    nextval('kubetoken_change_seq')
             FROM generate_series(1, 2500) AS n",
            &[],
        )
        .await
        .expect("insert expired rows");
    common::cluster::eventually("expired rows deleted", std::time::Duration::from_secs(30), || async {
        (count().await == 1).then_some(())
    })
    .await;
}

/// The database stopped: token requests answer 503 temporarily_unavailable with Retry-After, a token read before
/// still introspects, /readyz is 503; started again: everything works, without a restart of kubetoken.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_database_stopped_and_started_again_is_survived_without_a_restart() {
    let mut pg = Postgres::start();
    let url = pg.database().await;
    let state = tempfile::tempdir().expect("state dir");
    let server = common::Server::start(&common::examples_dir(), state.path(), &["--postgres", &url]);
    let token = cc(&server, "device_x").json()["access_token"].as_str().expect("token").to_string();
    assert!(server.active(common::SHOP, &token));

    pg.stop();
    let down = cc(&server, "device_y");
    assert_eq!(down.status, 503, "{}", down.body);
    assert_eq!(down.json()["error"], "temporarily_unavailable");
    assert!(down.headers.iter().any(|(k, _)| k.eq_ignore_ascii_case("retry-after")), "{:?}", down.headers);
    assert!(server.active(common::SHOP, &token), "a token read before still introspects");
    common::cluster::eventually("/readyz is 503", std::time::Duration::from_secs(10), || async {
        (common::get(&server.url("/readyz")).status == 503).then_some(())
    })
    .await;

    pg.restart();
    common::cluster::eventually("token requests work again", std::time::Duration::from_secs(30), || async {
        (cc(&server, "device_y").status == 200).then_some(())
    })
    .await;
    assert_eq!(common::get(&server.url("/readyz")).status, 200);
    let next = cc(&server, "device_x").json()["access_token"].as_str().expect("token").to_string();
    assert!(!server.active(common::SHOP, &token) && server.active(common::SHOP, &next), "nothing was lost");
}

/// Instances on several machines (each with its own state directory) and one database: the secrets standalone
/// mode makes (credentials, signing key, opaque-token key) are made once, by the first, and used by all.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn instances_with_their_own_state_directories_share_generated_credentials_and_keys() {
    let pg = Postgres::start();
    let url = pg.database().await;
    let manifests = tempfile::tempdir().expect("manifests");
    std::fs::write(
        manifests.path().join("fleet.yaml"),
        "apiVersion: kubetoken.io/v1alpha1
kind: OAuthApplication
metadata: {name: fleet, namespace: default}
spec:
  grantTypes: [client_credentials]
",
    )
    .expect("write");
    let (state_a, state_b) = (tempfile::tempdir().expect("a"), tempfile::tempdir().expect("b"));
    let a = common::Server::start(manifests.path(), state_a.path(), &["--postgres", &url]);
    let b = common::Server::start(manifests.path(), state_b.path(), &["--postgres", &url]);
    let credentials = |s: &common::Server| -> String {
        let line = s.banner.iter().find(|l| l.starts_with("credentials for default/fleet")).expect("credentials line");
        line.split_once(": ").expect("credentials").1.to_string()
    };
    assert!(a.banner.iter().any(|l| l.contains("default/fleet (new)")), "made by the first: {:?}", a.banner);
    assert_eq!(credentials(&a), credentials(&b), "one client, whichever instance it asks");
    let creds = credentials(&a);
    let id = creds.split_once("client_id=").expect("id").1.split(' ').next().expect("id").to_string();
    let secret = creds.split_once("client_secret=").expect("secret").1.to_string();
    let client = (id.as_str(), secret.as_str());
    assert_eq!(common::get(&a.url("/oauth2/jwks")).body, common::get(&b.url("/oauth2/jwks")).body, "one key set");
    let r = a.token(client, &[("grant_type", "client_credentials"), ("scope", "device_x")]);
    assert_eq!(r.status, 200, "{}", r.body);
    let token = r.json()["access_token"].as_str().expect("token").to_string();
    assert!(b.active(client, &token), "a token of one instance is valid at the other");
}

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
    // Issued by another instance, read here, then revoked here: while the database is down, what this instance
    // read before must not bring it back to life.
    let other = common::Server::start(&common::examples_dir(), state.path(), &["--postgres", &url]);
    let revoked = cc(&other, "device_revoked").json()["access_token"].as_str().expect("token").to_string();
    assert!(server.active(common::SHOP, &revoked));
    assert_eq!(server.revoke(common::SHOP, &revoked).status, 200);
    drop(other);

    pg.stop();
    let down = cc(&server, "device_y");
    assert_eq!(down.status, 503, "{}", down.body);
    assert_eq!(down.json()["error"], "temporarily_unavailable");
    assert!(down.headers.iter().any(|(k, _)| k.eq_ignore_ascii_case("retry-after")), "{:?}", down.headers);
    assert!(server.active(common::SHOP, &token), "a token read before still introspects");
    assert!(!server.active(common::SHOP, &revoked), "a token revoked before stays inactive");
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

/// A CA, and a server certificate it signed for `localhost` only; also the PEM of an unrelated CA.
fn test_certificates() -> (String, String, String, String) {
    use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair};
    let ca_key = KeyPair::generate().expect("CA key");
    let mut ca = CertificateParams::new(Vec::<String>::new()).expect("CA params");
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca_cert = ca.clone().self_signed(&ca_key).expect("CA");
    let issuer = Issuer::new(ca, &ca_key);
    let server_key = KeyPair::generate().expect("server key");
    let server = CertificateParams::new(vec!["localhost".to_string()])
        .expect("server params")
        .signed_by(&server_key, &issuer)
        .expect("server certificate");
    let other_key = KeyPair::generate().expect("other key");
    let mut other = CertificateParams::new(Vec::<String>::new()).expect("params");
    other.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let other = other.self_signed(&other_key).expect("other CA");
    (ca_cert.pem(), server.pem(), server_key.serialize_pem(), other.pem())
}

/// `sslmode=verify-full` checks the server's chain and name (rustls); `verify-ca` the chain only; a start that
/// cannot verify the server is refused with the reason, and the connections made are encrypted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_to_postgres_honours_sslmode_and_verifies_the_server() {
    let (ca, cert, key, other_ca) = test_certificates();
    let pg = Postgres::start_with_tls(&cert, &key);
    let database = pg.database().await.rsplit('/').next().expect("database").to_string();
    let files = tempfile::tempdir().expect("tempdir");
    let (ca_file, other_file) = (files.path().join("ca.pem"), files.path().join("other.pem"));
    std::fs::write(&ca_file, ca).expect("write");
    std::fs::write(&other_file, other_ca).expect("write");
    let url = |host: &str, mode: &str, root: &std::path::Path| {
        format!("postgres://kubetoken@{host}:{}/{database}?sslmode={mode}&sslrootcert={}", pg.port, root.display())
    };
    let manifests = common::examples_dir();
    let state = tempfile::tempdir().expect("state dir");

    let server =
        common::Server::start(&manifests, state.path(), &["--postgres", &url("localhost", "verify-full", &ca_file)]);
    assert_eq!(cc(&server, "device_tls").status, 200);
    let client = pg.connect(&database).await;
    let row = client
        .query_one(
            "SELECT count(*) FILTER (WHERE s.ssl), count(*) FROM pg_stat_ssl s JOIN pg_stat_activity a USING (pid)
             WHERE a.application_name = 'kubetoken'",
            &[],
        )
        .await
        .expect("pg_stat_ssl");
    let (encrypted, all): (i64, i64) = (row.get(0), row.get(1));
    assert!(all > 0 && encrypted == all, "{encrypted} of {all} kubetoken connections use TLS");
    drop(server);

    let refused = common::Server::try_start(
        &manifests,
        state.path(),
        &["--postgres", &url("localhost", "verify-full", &other_file)],
    )
    .err()
    .expect("a server signed by another CA is refused");
    assert!(refused.contains("invalid peer certificate"), "{refused}");
    let refused = common::Server::try_start(
        &manifests,
        state.path(),
        &["--postgres", &url("127.0.0.1", "verify-full", &ca_file)],
    )
    .err()
    .expect("a certificate for another name is refused under verify-full");
    assert!(refused.contains("certificate not valid for name \"127.0.0.1\""), "{refused}");
    let server =
        common::Server::start(&manifests, state.path(), &["--postgres", &url("127.0.0.1", "verify-ca", &ca_file)]);
    assert_eq!(cc(&server, "device_tls").status, 200, "verify-ca checks the chain, not the name");
    let refused = common::Server::try_start(
        &manifests,
        state.path(),
        &["--postgres", &format!("postgres://kubetoken@localhost:{}/{database}?sslmode=verify-full", pg.port)],
    )
    .err()
    .expect("verify-full without a CA file is refused");
    assert!(refused.contains("needs sslrootcert"), "{refused}");
    // libpq's environment: a URL kept by an operator (no sslmode in it) is verified through PGSSLMODE and
    // PGSSLROOTCERT.
    let plain_url = format!("postgres://kubetoken@127.0.0.1:{}/{database}", pg.port);
    let ca_path = ca_file.display().to_string();
    let refused = common::Server::try_start_with_env(
        &manifests,
        state.path(),
        &["--postgres", &plain_url],
        &[("PGSSLMODE", "verify-full"), ("PGSSLROOTCERT", &ca_path)],
    )
    .err()
    .expect("PGSSLMODE=verify-full applies: 127.0.0.1 is not the certificate's name");
    assert!(refused.contains("certificate not valid for name"), "{refused}");
    let server = common::Server::try_start_with_env(
        &manifests,
        state.path(),
        &["--postgres", &plain_url],
        &[("PGSSLMODE", "verify-ca"), ("PGSSLROOTCERT", &ca_path)],
    )
    .expect("PGSSLMODE=verify-ca with the CA");
    assert_eq!(cc(&server, "device_tls").status, 200);
    drop(server);
    // A Unix socket: no host name to check, and TLS is not tried there.
    let socket = format!("host={} port={} user=kubetoken dbname={database}", pg.socket_dir().display(), pg.port);
    let server = common::Server::start(&manifests, state.path(), &["--postgres", &socket]);
    assert_eq!(cc(&server, "device_tls").status, 200, "over the Unix socket");
}

/// One group commit holds changes of every kind, each decided on its own: an insert, an update and a delete that
/// expect what the row has hold; an update that expects a superseded pair and an insert over an existing row are
/// conflicts; the batch is one statement.
#[tokio::test]
async fn a_group_commit_decides_each_change_of_the_batch_on_its_own() {
    use kubetoken::core::clock::{Clock, SystemClock};
    use kubetoken::core::model::{Change, LivePair, Subject, TokenId, TokenKey};
    use kubetoken::core::scope::ScopeSet;
    use kubetoken::core::store::{Lookup, StoreError, TokenStore};
    use kubetoken::storage::postgres::{PgOptions, PgStore};

    let pg = Postgres::start();
    let url = pg.database().await;
    let clock: Arc<dyn Clock> = Arc::new(SystemClock);
    let now = clock.now();
    let store = PgStore::connect(PgOptions::new(url.clone()), clock).await.expect("connect");
    let key = |device: &str| TokenKey {
        client_id: "shop".into(),
        subject: Subject::User("alice".into()),
        scopes: ScopeSet::parse(&format!("device_{device}")).expect("scope"),
    };
    let pair = |n: u8| LivePair {
        access_id: TokenId([n; 16]),
        access_scopes: ScopeSet::parse("device_x").expect("scope"),
        issued_at: now,
        access_expires_at: now + 3600,
        refresh: None,
    };
    let set = |device: &str, expect: Option<u8>, next: Option<u8>| Change {
        key: key(device),
        expect: expect.map(|n| TokenId([n; 16])),
        next: next.map(pair),
    };
    // Rows to change, one statement each.
    for (device, n) in [("update", 1), ("stale", 2), ("delete", 3), ("taken", 4)] {
        store.commit(set(device, None, Some(n))).await.expect("seed");
    }
    let batches_before = store_batches(&store);
    let outcomes = futures::future::join_all([
        store.commit(set("new", None, Some(10))),
        store.commit(set("update", Some(1), Some(11))),
        store.commit(set("stale", Some(99), Some(12))),
        store.commit(set("delete", Some(3), None)),
        store.commit(set("taken", None, Some(14))),
        store.commit(set("absent", None, None)),
    ])
    .await;
    assert_eq!(
        outcomes,
        vec![Ok(()), Ok(()), Err(StoreError::Conflict), Ok(()), Err(StoreError::Conflict), Ok(())],
        "each change decided on its own"
    );
    assert_eq!(store_batches(&store) - batches_before, 1, "one statement for the six changes");
    let other = PgStore::connect(PgOptions::new(url), Arc::new(SystemClock)).await.expect("connect");
    for (device, expected) in
        [("new", Some(10)), ("update", Some(11)), ("stale", Some(2)), ("delete", None), ("taken", Some(4))]
    {
        let k = key(device);
        other.prepare(Lookup::Key(&k)).await.expect("read");
        assert_eq!(other.pair(&k).map(|p| p.access_id), expected.map(|n| TokenId([n; 16])), "{device}");
    }
}

/// Group commits run so far, from the store's own metrics.
fn store_batches(store: &kubetoken::storage::postgres::PgStore) -> u64 {
    let mut out = String::new();
    store.render_metrics(&mut out);
    out.lines()
        .find_map(|l| l.strip_prefix("kubetoken_postgres_group_commits_total "))
        .and_then(|v| v.parse().ok())
        .expect("kubetoken_postgres_group_commits_total")
}

/// A TCP proxy to PostgreSQL that can stop passing the server's answers on the connections open at the time, as a
/// half-open connection after a failover or a partition does, while new connections pass.
struct MutingProxy {
    port: u16,
    next: Arc<std::sync::atomic::AtomicU64>,
    mute_below: Arc<std::sync::atomic::AtomicU64>,
}

impl MutingProxy {
    async fn start(target: u16) -> Self {
        use std::sync::atomic::{AtomicU64, Ordering};
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let port = listener.local_addr().expect("addr").port();
        let (next, mute_below) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
        let (n, m) = (next.clone(), mute_below.clone());
        tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let id = n.fetch_add(1, Ordering::SeqCst);
                let Ok(server) = tokio::net::TcpStream::connect(("127.0.0.1", target)).await else { continue };
                let (mut client_read, mut client_write) = client.into_split();
                let (mut server_read, mut server_write) = server.into_split();
                tokio::spawn(async move {
                    let _ = tokio::io::copy(&mut client_read, &mut server_write).await;
                });
                let m = m.clone();
                tokio::spawn(async move {
                    let mut buf = vec![0u8; 16384];
                    loop {
                        let Ok(read) = server_read.read(&mut buf).await else { return };
                        if read == 0 {
                            return;
                        }
                        if id >= m.load(Ordering::SeqCst) && client_write.write_all(&buf[..read]).await.is_err() {
                            return;
                        }
                    }
                });
            }
        });
        Self { port, next, mute_below }
    }

    /// From now on the server's answers on the connections already open are lost.
    fn mute_open_connections(&self) {
        use std::sync::atomic::Ordering;
        self.mute_below.store(self.next.load(Ordering::SeqCst), Ordering::SeqCst);
    }
}

/// A group commit whose answer never comes (the connection went half-open after the statement was sent): the store
/// gives up on that connection within its timeout, reads the rows back on a new one, and answers the change that
/// landed as committed. Before, the writer waited for TCP to give up (many minutes, every write of the replica
/// queued behind it), and a change that landed would have been answered 503.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_group_commit_whose_answer_never_comes_is_decided_by_reading_its_rows_back() {
    use kubetoken::core::clock::{Clock, SystemClock};
    use kubetoken::core::model::{Change, LivePair, Subject, TokenId, TokenKey};
    use kubetoken::core::scope::ScopeSet;
    use kubetoken::core::store::TokenStore;
    use kubetoken::storage::postgres::{PgOptions, PgStore};

    let pg = Postgres::start();
    let url = pg.database().await;
    let proxy = MutingProxy::start(pg.port).await;
    let proxied = url.replace(&format!(":{}/", pg.port), &format!(":{}/", proxy.port));
    let clock: Arc<dyn Clock> = Arc::new(SystemClock);
    let now = clock.now();
    // One connection: the one that goes half-open is the only one, until the store replaces it.
    let options = PgOptions { pool_size: 1, timeout: std::time::Duration::from_secs(1), ..PgOptions::new(proxied) };
    let store = PgStore::connect(options, clock).await.expect("connect");
    let key = TokenKey {
        client_id: "shop".into(),
        subject: Subject::User("alice".into()),
        scopes: ScopeSet::parse("device_ipad").expect("scope"),
    };
    let pair = |n: u8| LivePair {
        access_id: TokenId([n; 16]),
        access_scopes: key.scopes.clone(),
        issued_at: now,
        access_expires_at: now + 3600,
        refresh: None,
    };
    let change =
        |expect: u8, next: u8| Change { key: key.clone(), expect: Some(TokenId([expect; 16])), next: Some(pair(next)) };
    store.commit(Change { key: key.clone(), expect: None, next: Some(pair(1)) }).await.expect("seed");

    proxy.mute_open_connections();
    let started = std::time::Instant::now();
    let outcome = tokio::time::timeout(std::time::Duration::from_secs(10), store.commit(change(1, 2))).await;
    assert_eq!(outcome, Ok(Ok(())), "the change landed though its answer never came: committed");
    assert!(started.elapsed() < std::time::Duration::from_secs(5), "decided within the store's timeout");
    // The replica goes on, on a new connection.
    store.commit(change(2, 3)).await.expect("the next change");
    let direct = connect(&url).await;
    let row = direct
        .query_one("SELECT access_id FROM kubetoken_token_pairs WHERE subject = 'u:alice'", &[])
        .await
        .expect("row");
    assert_eq!(row.get::<_, Vec<u8>>(0), vec![3u8; 16]);
}

/// Federated users over two instances sharing one database: an assertion is one grant across the fleet, and a
/// subject token one exchange per token key, whichever instance sees it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_trusted_issuers_assertion_used_at_one_instance_is_refused_at_the_other() {
    use common::issuer::{ID_TOKEN, JWT_BEARER, TOKEN_EXCHANGE, TestIssuer, manifests, trusting};
    use serde_json::json;
    let pg = Postgres::start();
    let url = pg.database().await;
    let issuer = TestIssuer::start();
    let dir = tempfile::tempdir().expect("dir");
    let manifests_dir = dir.path().join("manifests");
    std::fs::create_dir(&manifests_dir).expect("mkdir");
    manifests(&manifests_dir, "JWT", &trusting(&issuer), "");
    let ca = dir.path().join("ca.pem");
    issuer.write_ca(&ca);
    let args = ["--postgres", &url, "--issuer-ca-file", ca.to_str().expect("path")];
    let a = common::Server::start(&manifests_dir, &dir.path().join("a"), &args);
    let b = common::Server::start(&manifests_dir, &dir.path().join("b"), &args);
    let bearer = |s: &common::Server, assertion: &str, scope: &str| {
        s.token(common::SHOP, &[("grant_type", JWT_BEARER), ("assertion", assertion), ("scope", scope)])
    };
    let exchange = |s: &common::Server, token: &str, scope: &str| {
        s.token(
            common::SHOP,
            &[
                ("grant_type", TOKEN_EXCHANGE),
                ("subject_token", token),
                ("subject_token_type", ID_TOKEN),
                ("scope", scope),
            ],
        )
    };
    let assertion = issuer.jwt("carol", &[], json!({}));
    let first = bearer(&a, &assertion, "device_ipad");
    assert_eq!(first.status, 200, "{}", first.body);
    let replay = bearer(&b, &assertion, "device_iphone");
    assert_eq!((replay.status, replay.error()), (400, "invalid_grant".to_string()), "{}", replay.body);

    let id_token = issuer.jwt("carol", &[], json!({}));
    assert_eq!(exchange(&a, &id_token, "device_tv").status, 200);
    let other_device = exchange(&b, &id_token, "device_watch");
    assert_eq!(other_device.status, 200, "another token key: {}", other_device.body);
    assert_eq!(exchange(&b, &id_token, "device_tv").error(), "invalid_grant", "the same exchange at the other");

    // A row of an expired use (not yet deleted by expiry) does not stand in the way of an assertion with that jti:
    // it is taken over. A live row does.
    let client = connect(&url).await;
    let digest = |jti: &str| {
        let id = format!("{}\u{0}jti:{jti}", issuer.issuer);
        aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, id.as_bytes()).as_ref().to_vec()
    };
    let insert = "INSERT INTO kubetoken_used_assertions (id, expires_at) VALUES ($1, $2)";
    client.execute(insert, &[&digest("old"), &1_i64]).await.expect("an expired row");
    client.execute(insert, &[&digest("live"), &i64::MAX]).await.expect("a live row");
    let reused = bearer(&b, &issuer.jwt("carol", &[], json!({"jti": "old"})), "device_old");
    assert_eq!(reused.status, 200, "{}", reused.body);
    assert_eq!(bearer(&a, &issuer.jwt("carol", &[], json!({"jti": "live"})), "device_live").error(), "invalid_grant");

    // The federated user's iPad token issued at one instance is superseded by the one issued at the other.
    let ipad = first.field("access_token");
    let again = bearer(&b, &issuer.jwt("carol", &[], json!({})), "device_ipad");
    assert_eq!(again.status, 200, "{}", again.body);
    assert!(!a.active(common::SHOP, &ipad) && !b.active(common::SHOP, &ipad));
    assert!(a.active(common::SHOP, &again.field("access_token")));
}

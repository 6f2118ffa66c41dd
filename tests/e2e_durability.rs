//! Durability end to end: the real binary under concurrent load, killed with SIGKILL (or stopped gracefully),
//! restarted on the same state directory. Every token a client received must still be active unless it was
//! superseded or revoked, and no superseded or revoked token may come back.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use common::{KIOSK, SHOP, Server, examples_dir, post_form, try_post_form};
use serde_json::Value;

const THREADS: usize = 8;
const KEYS_PER_THREAD: usize = 4;
/// The last threads drive password + refresh_token rotation instead of client_credentials.
const REFRESH_THREADS: usize = 2;
/// Every fifth round of a key revokes its latest token instead of requesting a new one. The keys of a thread
/// revoke in different rounds, so that whenever the server dies most keys hold an active token.
const REVOKE_EVERY: usize = 5;
const MIN_LOAD: Duration = Duration::from_millis(1500);
/// Normally the load stops after MIN_LOAD; this bound only matters on a machine too busy to issue MIN_ISSUED
/// tokens in that time.
const MAX_LOAD: Duration = Duration::from_secs(30);
const MIN_ISSUED: usize = 300;
/// Safety bounds for a client thread that never sees the kill.
const MAX_OPS_PER_THREAD: usize = 20_000;
const THREAD_DEADLINE: Duration = Duration::from_secs(60);
/// After restart, each key's tokens are checked: all of the most recent ones, and a sample of the older ones.
const CHECK_RECENT: usize = 24;
const CHECK_OLDER: usize = 16;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Flow {
    /// `client_credentials` with the key's device scope: access tokens only.
    ClientCredentials,
    /// alice's password grant with the key's device scope, then `refresh_token` grants on the latest refresh token.
    Refresh,
}

#[derive(Debug, Clone)]
struct Issued {
    access: String,
    refresh: Option<String>,
    /// Obtained by the refresh grant with the previous token's refresh token (which it rotated out).
    via_refresh: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Op {
    Issue,
    Revoke,
}

/// What one client observed for one token key, in order.
#[derive(Debug)]
struct KeyLog {
    scope: String,
    flow: Flow,
    received: Vec<Issued>,
    /// Indexes in `received` of tokens whose revocation was answered 200.
    revoked: Vec<usize>,
    /// The request that was unanswered when the server died.
    in_flight: Option<Op>,
}

impl KeyLog {
    fn last_revoked(&self) -> bool {
        !self.received.is_empty() && self.revoked.last() == Some(&(self.received.len() - 1))
    }
}

struct Load {
    base: String,
    killed: AtomicBool,
    issued: AtomicUsize,
    revoked: AtomicUsize,
}

fn url(base: &str, path: &str) -> String {
    format!("{base}{path}")
}

fn parse_issued(body: &str, flow: Flow, via_refresh: bool) -> Option<Issued> {
    let json: Value = serde_json::from_str(body).ok()?;
    let access = json["access_token"].as_str()?.to_string();
    let refresh = json["refresh_token"].as_str().map(str::to_string);
    if (flow == Flow::Refresh) != refresh.is_some() {
        return None;
    }
    Some(Issued { access, refresh, via_refresh })
}

/// One client thread: loops over its own keys until the server becomes unreachable.
fn client(thread_no: usize, flow: Flow, load: &Load) -> Result<Vec<KeyLog>, String> {
    let prefix = if flow == Flow::Refresh { "r" } else { "t" };
    let mut keys: Vec<KeyLog> = (0..KEYS_PER_THREAD)
        .map(|k| KeyLog {
            scope: format!("device_{prefix}{thread_no}_{k}"),
            flow,
            received: Vec::new(),
            revoked: Vec::new(),
            in_flight: None,
        })
        .collect();
    let started = Instant::now();
    for i in 0..MAX_OPS_PER_THREAD {
        if started.elapsed() > THREAD_DEADLINE {
            break;
        }
        let k = i % KEYS_PER_THREAD;
        let round = i / KEYS_PER_THREAD + k;
        let key = &mut keys[k];
        let live = key.received.last().filter(|_| !key.last_revoked()).cloned();
        let op = if round % REVOKE_EVERY == REVOKE_EVERY - 1 && live.is_some() { Op::Revoke } else { Op::Issue };
        let response = match (op, &live) {
            (Op::Revoke, Some(last)) => {
                // Revoking either token of a pair revokes the pair: alternate between them for refresh keys.
                let token = match &last.refresh {
                    Some(r) if round % (2 * REVOKE_EVERY) == REVOKE_EVERY - 1 => r.as_str(),
                    _ => last.access.as_str(),
                };
                try_post_form(&url(&load.base, "/oauth2/revoke"), SHOP, &[("token", token)])
            }
            _ => {
                let token_url = url(&load.base, "/oauth2/token");
                match (flow, &live) {
                    (Flow::ClientCredentials, _) => {
                        try_post_form(&token_url, SHOP, &[("grant_type", "client_credentials"), ("scope", &key.scope)])
                    }
                    (Flow::Refresh, Some(Issued { refresh: Some(r), .. })) => {
                        try_post_form(&token_url, SHOP, &[("grant_type", "refresh_token"), ("refresh_token", r)])
                    }
                    (Flow::Refresh, _) => try_post_form(
                        &token_url,
                        SHOP,
                        &[
                            ("grant_type", "password"),
                            ("username", "alice"),
                            ("password", "alice-password"),
                            ("scope", &key.scope),
                        ],
                    ),
                }
            }
        };
        let via_refresh = flow == Flow::Refresh && live.is_some();
        let outcome = match (op, response) {
            (_, None) => Err("no response".to_string()),
            // A 200 whose body is unusable (it did not arrive whole) counts as unanswered.
            (Op::Issue, Some(r)) if r.status == 200 => parse_issued(&r.body, flow, via_refresh)
                .ok_or_else(|| format!("unusable token response: {}", r.body))
                .map(Some),
            (Op::Revoke, Some(r)) if r.status == 200 => Ok(None),
            (_, Some(r)) => Err(format!("answered {}: {}", r.status, r.body)),
        };
        match outcome {
            Ok(Some(issued)) => {
                key.received.push(issued);
                load.issued.fetch_add(1, Ordering::Relaxed);
            }
            Ok(None) => {
                key.revoked.push(key.received.len() - 1);
                load.revoked.fetch_add(1, Ordering::Relaxed);
            }
            Err(e) => {
                if !load.killed.load(Ordering::SeqCst) {
                    return Err(format!("{}: {op:?} failed before the server was killed: {e}", key.scope));
                }
                key.in_flight = Some(op);
                break;
            }
        }
    }
    Ok(keys)
}

fn active(base: &str, token: &str) -> bool {
    let r = post_form(&url(base, "/oauth2/introspect"), Some(SHOP), &[("token", token)]);
    assert_eq!(r.status, 200, "introspection failed: {}", r.body);
    let json = r.json();
    match json["active"] {
        Value::Bool(true) => true,
        _ => {
            assert_eq!(json, serde_json::json!({"active": false}), "an inactive token must reveal nothing");
            false
        }
    }
}

/// Which of `n` received tokens to check: the most recent ones, and older ones spread evenly.
fn indexes_to_check(n: usize) -> Vec<usize> {
    let recent_from = n.saturating_sub(CHECK_RECENT);
    let step = recent_from.div_ceil(CHECK_OLDER).max(1);
    (0..recent_from).step_by(step).chain(recent_from..n).collect()
}

/// Checks one key after the restart; returns whether its last received token is active.
fn check_key(base: &str, key: &KeyLog) -> bool {
    let n = key.received.len();
    let mut active_access = Vec::new();
    let mut active_refresh = Vec::new();
    let mut last_active = false;
    for i in indexes_to_check(n) {
        let t = &key.received[i];
        let a = active(base, &t.access);
        let r = t.refresh.as_deref().map(|r| active(base, r));
        if a {
            active_access.push(i);
        }
        if r == Some(true) {
            active_refresh.push(i);
        }
        let what = format!("{}: token {i} of {n} (in flight at kill: {:?})", key.scope, key.in_flight);
        if key.revoked.contains(&i) {
            assert!(!a && r != Some(true), "{what}: revoked with a 200, but active after restart");
        }
        if i + 1 < n {
            assert!(!a, "{what}: superseded access token is active after restart");
            assert!(r != Some(true), "{what}: superseded refresh token is active after restart");
        } else if key.in_flight.is_some() {
            // A request committed but unanswered may have superseded or revoked it: either outcome is fine.
            if let Some(r) = r {
                assert_eq!(a, r, "{what}: the access and refresh token of one pair disagree");
            }
            last_active = a;
        } else if key.last_revoked() {
            assert!(!a && r != Some(true), "{what}: revoked last token is active after restart");
        } else {
            assert!(a, "{what}: the last token the client received is not active after restart");
            assert!(r != Some(false), "{what}: the last refresh token the client received is not active after restart");
            last_active = true;
        }
    }
    assert!(active_access.len() <= 1, "{}: several access tokens active: {active_access:?}", key.scope);
    assert!(active_refresh.len() <= 1, "{}: several refresh tokens active: {active_refresh:?}", key.scope);
    last_active
}

#[test]
fn kill_9_during_load_then_restart_keeps_exactly_the_right_tokens_active() {
    let test_started = Instant::now();
    let dir = tempfile::tempdir().expect("tempdir");
    let mut server = Server::start(&examples_dir(), dir.path(), &[]);
    let load = Arc::new(Load {
        base: server.base.clone(),
        killed: AtomicBool::new(false),
        issued: AtomicUsize::new(0),
        revoked: AtomicUsize::new(0),
    });
    let clients: Vec<_> = (0..THREADS)
        .map(|t| {
            let load = load.clone();
            let flow = if t >= THREADS - REFRESH_THREADS { Flow::Refresh } else { Flow::ClientCredentials };
            thread::spawn(move || client(t, flow, &load))
        })
        .collect();

    let load_started = Instant::now();
    while load_started.elapsed() < MAX_LOAD
        && (load_started.elapsed() < MIN_LOAD || load.issued.load(Ordering::Relaxed) < MIN_ISSUED)
    {
        if clients.iter().any(|c| c.is_finished()) {
            break; // a client failed before the kill: its error is reported below
        }
        thread::sleep(Duration::from_millis(20));
    }
    load.killed.store(true, Ordering::SeqCst);
    server.kill9();
    let load_time = load_started.elapsed();

    let mut keys = Vec::new();
    for c in clients {
        keys.extend(c.join().expect("client thread panicked").unwrap_or_else(|e| panic!("client failed: {e}")));
    }
    let issued = load.issued.load(Ordering::Relaxed);
    let revoked = load.revoked.load(Ordering::Relaxed);
    let in_flight: Vec<(&str, Op)> = keys.iter().filter_map(|k| k.in_flight.map(|op| (k.scope.as_str(), op))).collect();
    eprintln!("load ran {load_time:?}: {issued} tokens issued, {revoked} revoked; in flight at kill: {in_flight:?}");
    assert!(issued >= MIN_ISSUED, "only {issued} tokens issued in {load_time:?}: too little load to test anything");
    assert!(revoked > 0, "no revocation happened during the load");
    assert!(keys.iter().all(|k| !k.received.is_empty()), "every key got at least one token");
    assert!(
        keys.iter().any(|k| k.flow == Flow::Refresh && k.received.iter().any(|t| t.via_refresh)),
        "no refresh token was rotated during the load"
    );

    let server = Server::start(&examples_dir(), dir.path(), &[]);
    let base = server.base.as_str();
    // One checking thread per client thread's keys; results keep the order of `keys`.
    let last_active: Vec<bool> = thread::scope(|s| {
        let handles: Vec<_> = keys
            .chunks(KEYS_PER_THREAD)
            .map(|chunk| s.spawn(move || chunk.iter().map(|k| check_key(base, k)).collect::<Vec<_>>()))
            .collect();
        handles.into_iter().flat_map(|h| h.join().expect("check thread panicked")).collect()
    });

    // An in-flight request whose change was committed but never answered leaves the last received token inactive.
    let unanswered_commits =
        keys.iter().zip(&last_active).filter(|(k, a)| k.in_flight.is_some() && !k.last_revoked() && !**a).count();
    eprintln!("after restart: {unanswered_commits} of {} in-flight requests had been committed", in_flight.len());

    // The restarted server still enforces one live pair per key: a new token supersedes the restored one.
    let (cc, _) = keys
        .iter()
        .zip(&last_active)
        .find(|(k, a)| k.flow == Flow::ClientCredentials && **a)
        .expect("a client_credentials key with an active token");
    let old = &cc.received.last().expect("token").access;
    let r = server.token(SHOP, &[("grant_type", "client_credentials"), ("scope", &cc.scope)]);
    assert_eq!(r.status, 200, "{}", r.body);
    let new = r.field("access_token");
    assert!(!server.active(SHOP, old), "{}: the restored token was not superseded by a new one", cc.scope);
    assert!(server.active(SHOP, &new), "{}: the new token is not active", cc.scope);

    // Refresh tokens rotated out before the kill are still remembered: reusing one revokes the live pair of its own
    // login (a key whose last token came from a refresh, so that the token it rotated out is of the same chain).
    let refresh_keys: Vec<(&str, usize, Option<Op>)> = keys
        .iter()
        .filter(|k| k.flow == Flow::Refresh)
        .map(|k| (k.scope.as_str(), k.received.len(), k.in_flight))
        .collect();
    let (rk, rotated) = keys
        .iter()
        .zip(&last_active)
        .filter(|(k, a)| k.flow == Flow::Refresh && **a)
        .find_map(|(k, _)| {
            let n = k.received.len();
            let last = k.received.last()?;
            (last.via_refresh && n >= 2).then(|| (k, k.received[n - 2].refresh.clone().expect("refresh")))
        })
        .unwrap_or_else(|| panic!("no refresh key with an active token and a rotated refresh token: {refresh_keys:?}"));
    let live = rk.received.last().expect("token");
    let r = server.token(SHOP, &[("grant_type", "refresh_token"), ("refresh_token", &rotated)]);
    assert_eq!((r.status, r.error()), (400, "invalid_grant".to_string()), "{}", r.body);
    assert!(
        !server.active(SHOP, &live.access),
        "{}: reuse of a rotated refresh token did not revoke the pair",
        rk.scope
    );
    assert!(
        !server.active(SHOP, live.refresh.as_deref().expect("refresh")),
        "{}: refresh token survived reuse detection",
        rk.scope
    );

    eprintln!("test took {:?}", test_started.elapsed());
}

#[test]
fn graceful_restart_keeps_tokens() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut server = Server::start(&examples_dir(), dir.path(), &[]);
    let cc = |s: &Server, client, scope: &str| {
        let r = s.token(client, &[("grant_type", "client_credentials"), ("scope", scope)]);
        assert_eq!(r.status, 200, "{}", r.body);
        r.field("access_token")
    };

    // alice on her phone: a pair, then a refresh that rotates it.
    let first = server.password("alice", "alice-password", "orders:read device_phone");
    assert_eq!(first.status, 200, "{}", first.body);
    let refreshed =
        server.token(SHOP, &[("grant_type", "refresh_token"), ("refresh_token", &first.field("refresh_token"))]);
    assert_eq!(refreshed.status, 200, "{}", refreshed.body);
    // bob: a pair that is then revoked through its refresh token.
    let bob = server.password("bob", "bob-password", "orders:admin device_desk");
    assert_eq!(bob.status, 200, "{}", bob.body);
    assert_eq!(server.revoke(SHOP, &bob.field("refresh_token")).status, 200);
    // A service key superseded once, and one on another device left alone.
    let svc_old = cc(&server, SHOP, "catalog:read device_svc");
    let svc = cc(&server, SHOP, "catalog:read device_svc");
    let other = cc(&server, SHOP, "catalog:read device_other");
    // Opaque tokens are reused while valid.
    let kiosk = cc(&server, KIOSK, "catalog:read");

    let stderr = server.stop();
    assert!(stderr.contains("token state flushed"), "no clean shutdown:\n{stderr}");

    let server = Server::start(&examples_dir(), dir.path(), &[]);
    for (what, token, want) in [
        ("alice's first access token", first.field("access_token"), false),
        ("alice's rotated refresh token", first.field("refresh_token"), false),
        ("alice's refreshed access token", refreshed.field("access_token"), true),
        ("alice's refreshed refresh token", refreshed.field("refresh_token"), true),
        ("bob's revoked access token", bob.field("access_token"), false),
        ("bob's revoked refresh token", bob.field("refresh_token"), false),
        ("the superseded service token", svc_old, false),
        ("the service token", svc.clone(), true),
        ("the other device's token", other.clone(), true),
    ] {
        assert_eq!(server.active(SHOP, &token), want, "{what} after a graceful restart");
    }
    assert!(server.active(KIOSK, &kiosk), "the kiosk's opaque token after a graceful restart");
    assert_eq!(cc(&server, KIOSK, "catalog:read"), kiosk, "a still-valid opaque token is reused after restart");

    // The restored state keeps working: superseding, and reuse detection of the refresh token rotated before.
    let svc_new = cc(&server, SHOP, "catalog:read device_svc");
    assert!(!server.active(SHOP, &svc));
    assert!(server.active(SHOP, &svc_new));
    assert!(server.active(SHOP, &other), "another device's token is untouched");
    let reuse =
        server.token(SHOP, &[("grant_type", "refresh_token"), ("refresh_token", &first.field("refresh_token"))]);
    assert_eq!((reuse.status, reuse.error()), (400, "invalid_grant".to_string()), "{}", reuse.body);
    assert!(!server.active(SHOP, &refreshed.field("access_token")), "reuse detection revokes the live pair");
}

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;

/// `path` and everything under it, each with its permission bits, directories first.
fn modes_under(path: &Path) -> Vec<(PathBuf, u32)> {
    let meta = fs::symlink_metadata(path).expect("metadata");
    let mut out = vec![(path.to_path_buf(), meta.permissions().mode() & 0o7777)];
    if meta.is_dir() {
        let mut children: Vec<PathBuf> =
            fs::read_dir(path).expect("read_dir").map(|e| e.expect("entry").path()).collect();
        children.sort();
        for child in children {
            out.extend(modes_under(&child));
        }
    }
    out
}

#[test]
fn the_state_directory_is_private_and_a_key_readable_by_others_is_reported_and_fixed() {
    let parent = tempfile::tempdir().expect("tempdir");
    let state = parent.path().join("state");
    fs::create_dir(&state).expect("state dir");
    fs::set_permissions(&state, fs::Permissions::from_mode(0o755)).expect("chmod");
    // A token key copied in with a careless mode.
    let mac_key = state.join("token-mac.key");
    fs::write(&mac_key, [7u8; 32]).expect("key");
    fs::set_permissions(&mac_key, fs::Permissions::from_mode(0o644)).expect("chmod");

    let mut server = Server::start(&examples_dir(), &state, &[]);
    let r = server.token(SHOP, &[("grant_type", "client_credentials"), ("scope", "device_private")]);
    assert_eq!(r.status, 200, "{}", r.body);
    let stderr = server.stop();
    assert!(
        stderr.lines().any(|l| l.contains("WARN") && l.contains(&mac_key.display().to_string()) && l.contains("0644")),
        "the key readable by others is not reported with its mode:\n{stderr}"
    );

    // Keys, generated credentials, the token log and its lock: every file 0600, every directory 0700.
    let entries = modes_under(&state);
    assert!(entries.iter().any(|(p, _)| p.ends_with("tokens/tokens.log")), "{entries:?}");
    assert!(entries.iter().any(|(p, _)| p.extension().is_some_and(|e| e == "pk8")), "{entries:?}");
    for (path, mode) in &entries {
        let want = if path.is_dir() { 0o700 } else { 0o600 };
        assert_eq!(*mode, want, "{} has mode {mode:04o}, want {want:04o}", path.display());
    }
    assert_eq!(fs::read(&mac_key).expect("key"), [7u8; 32], "the key itself is kept");
}

/// Bit rot in the middle of the token log: the binary refuses to start, naming the file and the offset of the bad
/// record, rather than silently dropping the acknowledged records after it. The documented recovery (truncate at
/// that offset) starts it again, without the records that followed.
#[test]
fn a_corrupt_record_in_the_middle_of_the_log_refuses_the_start_until_truncated_at_its_offset() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut server = Server::start(&examples_dir(), dir.path(), &[]);
    let tokens: Vec<String> = (0..6)
        .map(|i| {
            let scope = format!("device_rot{i}");
            let r = server.token(SHOP, &[("grant_type", "client_credentials"), ("scope", &scope)]);
            assert_eq!(r.status, 200, "{}", r.body);
            r.field("access_token")
        })
        .collect();
    let stderr = server.stop();
    assert!(stderr.contains("token state flushed"), "no clean shutdown:\n{stderr}");

    let log = dir.path().join("tokens").join("tokens.log");
    let mut data = fs::read(&log).expect("log");
    let starts: Vec<usize> =
        std::iter::once(0).chain(data.iter().enumerate().filter(|(_, b)| **b == b'\n').map(|(i, _)| i + 1)).collect();
    assert_eq!(starts.len(), tokens.len() + 1, "one record per token, then the end: {starts:?}");
    let bad = 2; // the third record, for device_rot2
    let offset = starts[bad];
    data[offset + 20] ^= 0x01; // one bit inside its JSON
    fs::write(&log, &data).expect("corrupt the log");

    let stderr = match Server::try_start(&examples_dir(), dir.path(), &[]) {
        Ok(_) => panic!("the server started with a corrupt record in the middle of its log"),
        Err(stderr) => stderr,
    };
    let truncate = format!("truncate -s {offset} {}", log.display());
    for part in [log.display().to_string(), format!("byte offset {offset}"), format!("line {}", bad + 1), truncate] {
        assert!(stderr.contains(&part), "{part:?} missing from:\n{stderr}");
    }
    assert_eq!(fs::read(&log).expect("log"), data, "a refused log is left as it was");

    // The recovery in ARCHITECTURE.md: keep a copy, truncate at the offset.
    fs::copy(&log, dir.path().join("tokens.log.damaged")).expect("copy aside");
    let status = Command::new("truncate").arg("-s").arg(offset.to_string()).arg(&log).status().expect("truncate");
    assert!(status.success());
    let server = Server::start(&examples_dir(), dir.path(), &[]);
    for (i, token) in tokens.iter().enumerate() {
        assert_eq!(server.active(SHOP, token), i < bad, "token {i}: only the records before the cut are kept");
    }
}

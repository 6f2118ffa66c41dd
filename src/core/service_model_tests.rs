//! A property-based model test of the token service: random sequences of issue, refresh, revoke, introspect and
//! clock steps, over both token formats, against a small reference model of the documented rules (README.md,
//! ARCHITECTURE.md). After every step every token ever issued is introspected and compared with the model.
//!
//! The model follows the service over the in-memory store, which never prunes: a rotated-out refresh token is
//! remembered for good there (durable stores forget it once expired, at compaction), so its reuse is detected even
//! after its expiry.
//!
//! `PROPTEST_CASES=1000 cargo test --lib core::service::model_tests` runs more cases than the default 64.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::sync::{Arc, OnceLock};

use proptest::prelude::*;
use proptest::test_runner::TestCaseError;

use super::*;
use crate::core::app::{ApplicationConfig, PasswordCheck, PasswordDigest, PasswordVerifier, User};
use crate::core::clock::ManualClock;
use crate::core::model::TokenId;
use crate::core::scope::ScopePolicy;
use crate::core::signing::{Algorithm, SigningKey};
use crate::core::store::MemoryStore;
use crate::core::tokens::OpaqueTokens;

const T0: UnixTime = 1_800_000_000;
const ACCESS_TTL: u64 = 60;
const REFRESH_TTL: u64 = 150;
const SECRET: &str = "s3cret";
/// Both applications tag opaque and refresh tokens with the same secret, so that one's token strings decode for
/// the other and the client checks (not the tags) are what keeps them apart.
const TOKEN_SECRET: [u8; 32] = [7; 32];
const APPS: [&str; 2] = ["shop", "kiosk"];
const PASSWORD: &str = "pw";
/// (username, roles).
const USERS: [(&str, &[&str]); 3] = [("alice", &["customer"]), ("bob", &["admin"]), ("carol", &[])];
const CLIENT_ROLES: &[&str] = &["service"];
const DEVICES: [&str; 3] = ["device_ipad", "device_iphone", "device_tv"];
/// (declared scope, roles that may have it; none: anyone). `undeclared:thing` is requested but never granted.
const DECLARED: [(&str, &[&str]); 4] = [
    ("orders:read", &["customer", "admin"]),
    ("orders:admin", &["admin"]),
    ("catalog:read", &[]),
    ("inventory:sync", &["service"]),
];
const EXTRAS: [&str; 5] = ["orders:read", "orders:admin", "catalog:read", "inventory:sync", "undeclared:thing"];

/// Which token of the pairs issued so far (an index taken modulo their number), or one the service never issued.
#[derive(Debug, Clone, Copy)]
enum Pick {
    Access(usize),
    Refresh(usize),
    Unknown,
}

/// Which refresh token a refresh presents.
#[derive(Debug, Clone, Copy)]
enum RefreshPick {
    /// The refresh token of a pair the model holds live.
    Live(usize),
    /// A refresh token retired by rotation (reuse).
    Rotated(usize),
    /// Any refresh token issued so far (live, rotated or superseded).
    Any(usize),
    /// Well-formed and correctly tagged, but never issued.
    Forged,
    Garbage,
}

/// The `scope` parameter of a refresh.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum RefreshScope {
    Omitted,
    /// The key's first scope only (the whole set when it has one).
    Narrowed,
    /// The key's set plus a scope outside it: invalid_scope.
    Widened,
}

#[derive(Debug, Clone)]
enum Op {
    Password {
        app: usize,
        user: usize,
        device: Option<usize>,
        extra: Option<usize>,
    },
    ClientCredentials {
        app: usize,
        device: Option<usize>,
        extra: Option<usize>,
    },
    Refresh {
        pick: RefreshPick,
        scope: RefreshScope,
        other_client: bool,
    },
    Revoke {
        pick: Pick,
        other_client: bool,
    },
    Introspect {
        pick: Pick,
        other_client: bool,
    },
    Advance(u64),
    /// To the picked token's expiry, or one second before it, if that is still ahead.
    AdvanceToExpiry {
        pick: Pick,
        before: bool,
    },
}

fn pick() -> impl Strategy<Value = Pick> {
    prop_oneof![
        4 => any::<usize>().prop_map(Pick::Access),
        3 => any::<usize>().prop_map(Pick::Refresh),
        1 => Just(Pick::Unknown),
    ]
}

fn op() -> impl Strategy<Value = Op> {
    let device = proptest::option::weighted(0.85, 0..DEVICES.len());
    let extra = proptest::option::weighted(0.4, 0..EXTRAS.len());
    let refresh_pick = prop_oneof![
        4 => any::<usize>().prop_map(RefreshPick::Live),
        2 => any::<usize>().prop_map(RefreshPick::Rotated),
        2 => any::<usize>().prop_map(RefreshPick::Any),
        1 => Just(RefreshPick::Forged),
        1 => Just(RefreshPick::Garbage),
    ];
    let refresh_scope = prop_oneof![
        4 => Just(RefreshScope::Omitted),
        1 => Just(RefreshScope::Narrowed),
        1 => Just(RefreshScope::Widened),
    ];
    prop_oneof![
        6 => (0..APPS.len(), 0..USERS.len(), device.clone(), extra.clone())
            .prop_map(|(app, user, device, extra)| Op::Password { app, user, device, extra }),
        2 => (0..APPS.len(), device, extra).prop_map(|(app, device, extra)| Op::ClientCredentials { app, device, extra }),
        5 => (refresh_pick, refresh_scope, proptest::bool::weighted(0.1))
            .prop_map(|(pick, scope, other_client)| Op::Refresh { pick, scope, other_client }),
        2 => (pick(), proptest::bool::weighted(0.15)).prop_map(|(pick, other_client)| Op::Revoke { pick, other_client }),
        1 => (pick(), any::<bool>()).prop_map(|(pick, other_client)| Op::Introspect { pick, other_client }),
        2 => prop_oneof![Just(1u64), 0..=2 * REFRESH_TTL].prop_map(Op::Advance),
        2 => (pick(), any::<bool>()).prop_map(|(pick, before)| Op::AdvanceToExpiry { pick, before }),
    ]
}

/// (application, user or `None` for the client itself, granted scope set).
type Key = (usize, Option<usize>, BTreeSet<String>);

/// Every pair the service handed out, in issue order.
#[derive(Debug, Clone)]
struct Pair {
    key: Key,
    access: String,
    refresh: Option<String>,
    access_scopes: BTreeSet<String>,
    iat: UnixTime,
    access_exp: UnixTime,
    refresh_exp: Option<UnixTime>,
    /// The login this pair descends from (the index of the pair that login issued).
    chain: usize,
}

#[derive(Debug, Default)]
struct Model {
    now: UnixTime,
    pairs: Vec<Pair>,
    /// The key's live pair (an index into `pairs`); the store keeps a pair until it is replaced or revoked, even
    /// once expired.
    live: BTreeMap<Key, usize>,
    /// Refresh tokens retired by rotation (JWT mode), their key and the login they descend from.
    rotated: HashMap<String, (Key, usize)>,
    rotated_order: Vec<String>,
    /// Pairs superseded or revoked: none of their tokens may ever be active again.
    dead: HashSet<usize>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Access,
    Refresh,
}

impl Model {
    fn is_live(&self, i: usize) -> bool {
        self.live.get(&self.pairs[i].key) == Some(&i)
    }

    /// The expiry of a token if it is active now.
    fn active(&self, i: usize, kind: Kind) -> Option<UnixTime> {
        if !self.is_live(i) {
            return None;
        }
        let exp = match kind {
            Kind::Access => Some(self.pairs[i].access_exp),
            Kind::Refresh => self.pairs[i].refresh_exp,
        }?;
        (self.now < exp).then_some(exp)
    }

    /// Marks `key`'s live pair dead, if it has one.
    fn kill(&mut self, key: &Key) {
        if let Some(i) = self.live.remove(key) {
            self.dead.insert(i);
        }
    }

    fn token(&self, pick: Pick) -> Option<(usize, Kind)> {
        let n = self.pairs.len();
        match pick {
            Pick::Access(i) if n > 0 => Some((i % n, Kind::Access)),
            Pick::Refresh(i) if n > 0 => {
                let i = i % n;
                Some((i, if self.pairs[i].refresh.is_some() { Kind::Refresh } else { Kind::Access }))
            }
            _ => None,
        }
    }

    fn string(&self, i: usize, kind: Kind) -> &str {
        match kind {
            Kind::Access => &self.pairs[i].access,
            Kind::Refresh => self.pairs[i].refresh.as_deref().unwrap_or_default(),
        }
    }
}

/// The scopes the service grants: device scopes always, declared scopes to the roles they name (or to anyone),
/// nothing else; `default` when nothing is granted.
fn granted(roles: &[&str], device: Option<usize>, extra: Option<usize>) -> BTreeSet<String> {
    let mut set = BTreeSet::new();
    if let Some(d) = device {
        set.insert(DEVICES[d].to_string());
    }
    if let Some(e) = extra {
        let name = EXTRAS[e];
        if DECLARED
            .iter()
            .any(|(n, needed)| *n == name && (needed.is_empty() || needed.iter().any(|r| roles.contains(r))))
        {
            set.insert(name.to_string());
        }
    }
    if set.is_empty() {
        set.insert("default".to_string());
    }
    set
}

fn requested(device: Option<usize>, extra: Option<usize>) -> String {
    device.map(|d| DEVICES[d]).into_iter().chain(extra.map(|e| EXTRAS[e])).collect::<Vec<_>>().join(" ")
}

fn scope_set(s: &str) -> BTreeSet<String> {
    s.split(' ').filter(|t| !t.is_empty()).map(str::to_string).collect()
}

fn join(set: &BTreeSet<String>) -> String {
    set.iter().map(String::as_str).collect::<Vec<_>>().join(" ")
}

/// Verifies on the calling thread: the test hashes are bcrypt at cost 4.
struct InlineVerifier;

impl PasswordVerifier for InlineVerifier {
    fn verify(&self, digest: PasswordDigest, password: String) -> PasswordCheck {
        Box::pin(async move { Ok(digest.verify(&password, &mut Vec::new())) })
    }
}

fn user_digest() -> PasswordDigest {
    static DIGEST: OnceLock<PasswordDigest> = OnceLock::new();
    DIGEST.get_or_init(|| PasswordDigest::parse(&bcrypt::hash(PASSWORD, 4).expect("hash")).expect("digest")).clone()
}

fn signing_key(app: usize) -> Arc<SigningKey> {
    static KEYS: OnceLock<Vec<Arc<SigningKey>>> = OnceLock::new();
    KEYS.get_or_init(|| {
        (0..APPS.len())
            .map(|_| {
                let der = SigningKey::generate_pkcs8(Algorithm::ES256).expect("key");
                Arc::new(SigningKey::from_pkcs8(Algorithm::ES256, &der).expect("parse"))
            })
            .collect()
    })[app]
        .clone()
}

fn application(app: usize, format: TokenFormat) -> Application {
    let users = USERS
        .iter()
        .map(|(name, roles)| {
            (name.to_string(), User { digest: user_digest(), roles: roles.iter().map(|r| r.to_string()).collect() })
        })
        .collect();
    Application::new(ApplicationConfig {
        trusted_issuers: Vec::new(),
        name: format!("default/{}", APPS[app]),
        client_id: APPS[app].into(),
        client_secrets: vec![SECRET.into()],
        grant_types: vec![GrantType::Password, GrantType::ClientCredentials, GrantType::RefreshToken],
        format,
        access_ttl: ACCESS_TTL,
        refresh_ttl: REFRESH_TTL,
        session_max: None,
        max_keys_per_user: 100,
        audience: vec![],
        client_roles: CLIENT_ROLES.iter().map(|r| r.to_string()).collect(),
        scopes: ScopePolicy::new(
            DECLARED.iter().map(|(n, roles)| (n.to_string(), roles.iter().map(|r| r.to_string()).collect())),
        ),
        users,
        signer: signing_key(app),
        verification_keys: vec![],
        token_secrets: vec![TOKEN_SECRET.to_vec()],
    })
}

fn client(app: usize) -> ClientCredentials {
    ClientCredentials { client_id: APPS[app].into(), client_secret: SECRET.into() }
}

struct Harness {
    format: TokenFormat,
    service: TokenService,
    clock: Arc<ManualClock>,
    model: Model,
}

fn fail(message: String) -> TestCaseError {
    TestCaseError::fail(message)
}

impl Harness {
    fn new(format: TokenFormat) -> Self {
        let clock = Arc::new(ManualClock::new(T0));
        let registry = Registry::new((0..APPS.len()).map(|a| application(a, format)).collect()).expect("registry");
        let service = TokenService::new(
            registry,
            Arc::new(MemoryStore::default()),
            clock.clone(),
            ServiceConfig {
                key_sets: None,
                issuer: "https://issuer.test".into(),
                policies: ServicePolicies::default(),
                passwords: Arc::new(InlineVerifier),
            },
        );
        Self { format, service, clock, model: Model { now: T0, ..Model::default() } }
    }

    fn forged(&self, kind: crate::core::tokens::TokenKind) -> String {
        OpaqueTokens::new(&[TOKEN_SECRET]).encode(kind, &TokenId([0xab; 16]))
    }

    async fn step(&mut self, op: &Op) -> Result<(), TestCaseError> {
        match *op {
            Op::Password { app, user, device, extra } => {
                let (name, roles) = USERS[user];
                let grant = Grant::Password {
                    username: name.into(),
                    password: PASSWORD.into(),
                    scope: Some(requested(device, extra)),
                };
                let key = (app, Some(user), granted(roles, device, extra));
                let issued = self.service.token(&client(app), grant).await.map_err(|e| fail(format!("{e:?}")))?;
                self.issued(key, issued, true)
            }
            Op::ClientCredentials { app, device, extra } => {
                let grant = Grant::ClientCredentials { scope: Some(requested(device, extra)) };
                let key = (app, None, granted(CLIENT_ROLES, device, extra));
                let issued = self.service.token(&client(app), grant).await.map_err(|e| fail(format!("{e:?}")))?;
                self.issued(key, issued, false)
            }
            Op::Refresh { pick, scope, other_client } => self.refresh(pick, scope, other_client).await,
            Op::Revoke { pick, other_client } => {
                let m = &self.model;
                let (token, target) = match m.token(pick) {
                    Some((i, kind)) => (m.string(i, kind).to_string(), Some(i)),
                    None => (self.forged(crate::core::tokens::TokenKind::Access), None),
                };
                let owner = target.map_or(0, |i| m.pairs[i].key.0);
                let app = if other_client { 1 - owner } else { owner };
                // Either token of a live pair revokes the pair, expired or not (RFC 7009 answers success anyway);
                // tokens of dead pairs, other clients' tokens and unknown strings change nothing.
                let expect = target.filter(|&i| m.is_live(i) && app == owner);
                let revoked =
                    self.service.revoke(&client(app), &token).await.map_err(|e| fail(format!("revoke: {e:?}")))?;
                prop_assert_eq!(revoked, expect.is_some(), "revoke's outcome");
                if let Some(i) = expect {
                    let key = self.model.pairs[i].key.clone();
                    self.model.kill(&key);
                }
                Ok(())
            }
            Op::Introspect { pick, other_client } => {
                // Every token is introspected by its own client after each step; here also by the other client.
                if let Some((i, kind)) = self.model.token(pick) {
                    let owner = self.model.pairs[i].key.0;
                    let app = if other_client { 1 - owner } else { owner };
                    let token = self.model.string(i, kind).to_string();
                    let answer = self.service.introspect(&client(app), &token).await;
                    let expect = if app == owner { self.model.active(i, kind) } else { None };
                    prop_assert_eq!(
                        matches!(answer, Ok(Introspection::Active(_))),
                        expect.is_some(),
                        "introspection of pair {}'s {:?} token by {}",
                        i,
                        kind,
                        APPS[app]
                    );
                } else {
                    let answer =
                        self.service.introspect(&client(0), &self.forged(crate::core::tokens::TokenKind::Access)).await;
                    prop_assert_eq!(answer, Ok(Introspection::Inactive));
                }
                Ok(())
            }
            Op::Advance(secs) => {
                self.advance(secs);
                Ok(())
            }
            Op::AdvanceToExpiry { pick, before } => {
                if let Some((i, kind)) = self.model.token(pick) {
                    let p = &self.model.pairs[i];
                    let exp = match kind {
                        Kind::Access => p.access_exp,
                        Kind::Refresh => p.refresh_exp.unwrap_or(p.access_exp),
                    };
                    let target = exp - u64::from(before);
                    if target > self.model.now {
                        self.advance(target - self.model.now);
                    }
                }
                Ok(())
            }
        }
    }

    fn advance(&mut self, secs: u64) {
        self.clock.advance(secs);
        self.model.now += secs;
    }

    /// Checks an issue response against the model and records it.
    fn issued(&mut self, key: Key, issued: IssuedTokens, password: bool) -> Result<(), TestCaseError> {
        let now = self.model.now;
        let current = self.model.live.get(&key).copied();
        prop_assert_eq!(scope_set(&issued.scope), key.2.clone(), "granted scopes");
        prop_assert_eq!(issued.refresh_token.is_some(), password, "a refresh token with the password grant only");
        // Opaque: the same still-valid token for the same key, if it carries exactly the granted scopes.
        let reuse = current.filter(|&i| {
            let p = &self.model.pairs[i];
            self.format == TokenFormat::Opaque && now < p.access_exp && p.access_scopes == key.2
        });
        prop_assert_eq!(issued.reused, reuse.is_some(), "reuse (current pair: {:?})", current);
        if let Some(i) = reuse {
            let p = &self.model.pairs[i];
            prop_assert_eq!(&issued.access_token, &p.access, "opaque mode hands out the same access token");
            prop_assert_eq!(&issued.refresh_token, &p.refresh, "and the same refresh token");
            prop_assert_eq!(issued.expires_in, p.access_exp - now);
            return Ok(());
        }
        prop_assert_eq!(issued.expires_in, ACCESS_TTL);
        for p in &self.model.pairs {
            prop_assert!(p.access != issued.access_token, "a new access token is new");
        }
        // A new pair replaces (and so revokes) the key's previous one.
        self.model.kill(&key);
        self.model.pairs.push(Pair {
            access_scopes: key.2.clone(),
            key: key.clone(),
            access: issued.access_token,
            refresh: issued.refresh_token,
            iat: now,
            access_exp: now + ACCESS_TTL,
            refresh_exp: password.then_some(now + REFRESH_TTL),
            chain: self.model.pairs.len(),
        });
        self.model.live.insert(key, self.model.pairs.len() - 1);
        Ok(())
    }

    async fn refresh(
        &mut self,
        pick: RefreshPick,
        scope: RefreshScope,
        other_client: bool,
    ) -> Result<(), TestCaseError> {
        let m = &self.model;
        let with_refresh: Vec<usize> = (0..m.pairs.len()).filter(|&i| m.pairs[i].refresh.is_some()).collect();
        let live_refresh: Vec<usize> = with_refresh.iter().copied().filter(|&i| m.is_live(i)).collect();
        let from = |v: &[usize], i: usize| (!v.is_empty()).then(|| v[i % v.len()]);
        let pair = match pick {
            RefreshPick::Live(i) => from(&live_refresh, i).or_else(|| from(&with_refresh, i)),
            RefreshPick::Any(i) => from(&with_refresh, i),
            RefreshPick::Rotated(_) | RefreshPick::Forged | RefreshPick::Garbage => None,
        };
        let token = match (pick, pair) {
            (_, Some(i)) => m.pairs[i].refresh.clone().unwrap_or_default(),
            (RefreshPick::Rotated(i), None) if !m.rotated_order.is_empty() => {
                m.rotated_order[i % m.rotated_order.len()].clone()
            }
            (RefreshPick::Garbage, _) => "not-a-refresh-token".to_string(),
            _ => self.forged(crate::core::tokens::TokenKind::Refresh),
        };
        // The key the token belongs to, as far as the model knows.
        let rotated_key = m.rotated.get(&token).cloned();
        let owner = pair.map(|i| m.pairs[i].key.0).or(rotated_key.as_ref().map(|(k, _)| k.0)).unwrap_or(0);
        let app = if other_client { 1 - owner } else { owner };
        let live = pair.filter(|&i| m.is_live(i));
        let key_scopes = live.map(|i| m.pairs[i].key.2.clone()).unwrap_or_default();
        let scope_param = match scope {
            RefreshScope::Omitted => None,
            RefreshScope::Narrowed => Some(key_scopes.iter().next().cloned().unwrap_or_default()),
            RefreshScope::Widened => Some(format!("{} catalog:write", join(&key_scopes))),
        };
        let grant = Grant::RefreshToken { refresh_token: token.clone(), scope: scope_param.clone() };
        let result = self.service.token(&client(app), grant).await;
        let now = self.model.now;

        if let Some((key, chain)) = rotated_key {
            // Reuse of a rotated-out refresh token: invalid_grant, and the key's live tokens are revoked if they
            // descend from the same login (and only when the owning client presents it).
            prop_assert_eq!(result.as_ref().map_err(|e| e.code()), Err("invalid_grant"), "reuse");
            let same_login = self.model.live.get(&key).is_some_and(|&i| self.model.pairs[i].chain == chain);
            if app == key.0 && same_login {
                self.model.kill(&key);
            }
            return Ok(());
        }
        let Some(i) = live else {
            prop_assert_eq!(result.as_ref().map_err(|e| e.code()), Err("invalid_grant"), "unknown or superseded");
            return Ok(());
        };
        let p = self.model.pairs[i].clone();
        if app != owner || p.refresh_exp.is_none_or(|exp| now >= exp) {
            prop_assert_eq!(result.as_ref().map_err(|e| e.code()), Err("invalid_grant"), "other client or expired");
            return Ok(());
        }
        let access_scopes = match scope {
            RefreshScope::Omitted => p.key.2.clone(),
            RefreshScope::Narrowed => scope_set(scope_param.as_deref().unwrap_or_default()),
            RefreshScope::Widened => {
                prop_assert_eq!(result.as_ref().map_err(|e| e.code()), Err("invalid_scope"), "widened");
                return Ok(());
            }
        };
        let issued = result.map_err(|e| fail(format!("refresh of a live token: {e:?}")))?;
        prop_assert_eq!(scope_set(&issued.scope), access_scopes.clone());
        if self.format == TokenFormat::Opaque {
            // Opaque pairs are shared, so refresh tokens are not rotated: the same refresh token, and the same
            // access token while it is valid with the same scopes; otherwise a new access token in a new pair.
            prop_assert_eq!(issued.refresh_token.as_ref(), Some(&token), "opaque refresh tokens are not rotated");
            if now < p.access_exp && p.access_scopes == access_scopes {
                prop_assert!(issued.reused);
                prop_assert_eq!(&issued.access_token, &p.access);
                return Ok(());
            }
            prop_assert!(!issued.reused);
            prop_assert_eq!(issued.expires_in, ACCESS_TTL);
            self.model.kill(&p.key);
            // The refresh token moves to the new pair: the old entry no longer holds it.
            self.model.pairs[i].refresh = None;
            self.model.pairs.push(Pair {
                key: p.key.clone(),
                access: issued.access_token,
                refresh: Some(token),
                access_scopes,
                iat: now,
                access_exp: now + ACCESS_TTL,
                refresh_exp: p.refresh_exp,
                chain: p.chain,
            });
            self.model.live.insert(p.key, self.model.pairs.len() - 1);
            return Ok(());
        }
        prop_assert_eq!(issued.expires_in, ACCESS_TTL);
        prop_assert!(!issued.reused);
        let new_refresh = issued.refresh_token.clone().ok_or_else(|| fail("no rotated refresh token".into()))?;
        prop_assert!(new_refresh != token, "the refresh token rotates");
        // The pair is replaced; the presented refresh token is remembered as rotated out.
        self.model.kill(&p.key);
        self.model.rotated.insert(token.clone(), (p.key.clone(), p.chain));
        self.model.rotated_order.push(token);
        self.model.pairs.push(Pair {
            key: p.key.clone(),
            access: issued.access_token,
            refresh: Some(new_refresh),
            access_scopes,
            iat: now,
            access_exp: now + ACCESS_TTL,
            refresh_exp: Some(now + REFRESH_TTL),
            chain: p.chain,
        });
        self.model.live.insert(p.key, self.model.pairs.len() - 1);
        Ok(())
    }

    /// Introspects every token ever issued with its own client and compares with the model.
    async fn check(&self) -> Result<(), TestCaseError> {
        let m = &self.model;
        let mut active_per_key: BTreeMap<&Key, usize> = BTreeMap::new();
        for (i, p) in m.pairs.iter().enumerate() {
            for kind in [Kind::Access, Kind::Refresh] {
                if kind == Kind::Refresh && p.refresh.is_none() {
                    continue;
                }
                let answer = self
                    .service
                    .introspect(&client(p.key.0), m.string(i, kind))
                    .await
                    .map_err(|e| fail(format!("introspect: {e:?}")))?;
                let expect = m.active(i, kind);
                let Introspection::Active(t) = answer else {
                    prop_assert!(
                        expect.is_none(),
                        "pair {}'s {:?} token is inactive at {}, expected active",
                        i,
                        kind,
                        m.now - T0
                    );
                    continue;
                };
                prop_assert!(
                    !m.dead.contains(&i),
                    "pair {}'s {:?} token is active, but its pair was superseded or revoked",
                    i,
                    kind
                );
                prop_assert_eq!(Some(t.exp), expect, "pair {}'s {:?} token is active at {}", i, kind, m.now - T0);
                prop_assert_eq!(t.iat, p.iat);
                prop_assert_eq!(&t.client_id, APPS[p.key.0]);
                prop_assert_eq!(t.username.as_deref(), p.key.1.map(|u| USERS[u].0));
                match kind {
                    Kind::Access => {
                        *active_per_key.entry(&p.key).or_default() += 1;
                        prop_assert_eq!(scope_set(&t.scope), p.access_scopes.clone());
                        prop_assert_eq!(t.token_use, "access_token");
                        prop_assert_eq!(t.jti.is_some(), self.format == TokenFormat::Jwt);
                    }
                    Kind::Refresh => {
                        prop_assert_eq!(scope_set(&t.scope), p.key.2.clone());
                        prop_assert_eq!(t.token_use, "refresh_token");
                    }
                }
            }
        }
        for (key, n) in active_per_key {
            prop_assert!(n <= 1, "{} active access tokens for key {:?}", n, key);
        }
        for token in &m.rotated_order {
            let answer = self.service.introspect(&client(m.rotated[token].0.0), token).await;
            prop_assert_eq!(answer, Ok(Introspection::Inactive), "a rotated-out refresh token is inactive");
        }
        Ok(())
    }
}

fn run(format: TokenFormat, ops: &[Op]) -> Result<(), TestCaseError> {
    let runtime = tokio::runtime::Builder::new_current_thread().build().map_err(|e| fail(e.to_string()))?;
    runtime.block_on(async {
        let mut h = Harness::new(format);
        for (n, op) in ops.iter().enumerate() {
            h.step(op).await.map_err(|e| fail(format!("step {n} ({op:?}): {e}")))?;
            h.check().await.map_err(|e| fail(format!("after step {n} ({op:?}): {e}")))?;
        }
        Ok(())
    })
}

/// 64 cases unless `PROPTEST_CASES` says otherwise.
fn config() -> ProptestConfig {
    let mut config = ProptestConfig::default();
    if std::env::var_os("PROPTEST_CASES").is_none() {
        config.cases = 64;
    }
    config
}

proptest! {
    #![proptest_config(config())]

    #[test]
    fn jwt_service_follows_the_model(ops in proptest::collection::vec(op(), 1..40)) {
        run(TokenFormat::Jwt, &ops)?;
    }

    #[test]
    fn opaque_service_follows_the_model(ops in proptest::collection::vec(op(), 1..40)) {
        run(TokenFormat::Opaque, &ops)?;
    }
}

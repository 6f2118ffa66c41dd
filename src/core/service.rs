//! The grant flows, revocation and introspection. Everything here is about token semantics; storage, time and
//! the wire are ports and callers.

use std::sync::{Arc, RwLock};

use aws_lc_rs::rand::SystemRandom;
use serde::Serialize;

use super::app::{Application, GrantType, PasswordVerifier, Registry, TokenFormat};
use super::assertion::{self, AssertionError, KeySetSource, KeySource, VerifiedAssertion};
use super::clock::{Clock, UnixTime};
use super::error::OAuthError;
use super::lockout::{Lockout, LockoutPolicy, SharedFailure};
use super::model::{Change, FederatedUser, LivePair, RefreshGrant, SharedKey, Subject, TokenId, TokenKey};
use super::replay::{FirstUse, ReplayMemory};
use super::scope::ScopeSet;
use super::signing::{self, SigningKey};
use super::store::{Lookup, StoreError, TokenStore};
use super::tokens::{AccessClaims, JtiOnly, TokenKind};

/// How long a request keeps deciding again while other requests change its key first (the order the store accepted
/// them in wins): until this deadline, the same as the in-cluster store's commit deadline, rather than a fixed number
/// of attempts, so that a request is never refused only because many others for the same key came with it.
const CONFLICT_DEADLINE_SECS: u64 = 10;
/// A backstop for a store that conflicts forever while no time passes (a test clock).
const MAX_ATTEMPTS: usize = 10_000;

/// How one attempt of a compare-and-set loop ended.
enum Attempt<T> {
    Done(T),
    /// Run it again on the store's new state: its commit met a change made since it read (or, for the device cap,
    /// there is more to do).
    Again,
}

impl<T> Attempt<T> {
    /// A commit's failure: a conflict runs the attempt again, anything else ends the request.
    fn after(e: StoreError) -> Result<Self, OAuthError> {
        match e {
            StoreError::Conflict => Ok(Attempt::Again),
            e => Err(store_error(e)),
        }
    }
}

/// The compare-and-set loop of every change: read, decide, commit; on a conflict decide again on what the store
/// holds now, until [`CONFLICT_DEADLINE_SECS`] have passed.
/// Each attempt is a future of its own that borrows only what the request does (not the closure), so that request
/// futures stay `Send`.
async fn retry_conflicts<T, F: Future<Output = Result<Attempt<T>, OAuthError>>>(
    clock: &dyn Clock,
    mut attempt: impl FnMut() -> F,
) -> Result<T, OAuthError> {
    let deadline = clock.now().saturating_add(CONFLICT_DEADLINE_SECS);
    for _ in 0..MAX_ATTEMPTS {
        if let Attempt::Done(done) = attempt().await? {
            return Ok(done);
        }
        if clock.now() > deadline {
            break;
        }
    }
    Err(store_error(StoreError::Conflict))
}
/// Which of `shards` locks guards `key`.
fn shard_of(key: &TokenKey, shards: usize) -> usize {
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    key.hash(&mut h);
    (h.finish() % shards as u64) as usize
}

const INVALID_REFRESH: &str = "the refresh token is invalid, expired or revoked";

#[derive(Clone)]
pub struct ClientCredentials {
    pub client_id: String,
    pub client_secret: String,
}

impl std::fmt::Debug for ClientCredentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClientCredentials").field("client_id", &self.client_id).finish_non_exhaustive()
    }
}

pub enum Grant {
    Password {
        username: String,
        password: String,
        scope: Option<String>,
    },
    ClientCredentials {
        scope: Option<String>,
    },
    RefreshToken {
        refresh_token: String,
        scope: Option<String>,
    },
    /// RFC 7523 section 2.1.
    JwtBearer {
        assertion: String,
        scope: Option<String>,
    },
    /// RFC 8693 section 2.1.
    TokenExchange(TokenExchange),
}

/// The parameters of an RFC 8693 token exchange.
#[derive(Default)]
pub struct TokenExchange {
    pub subject_token: String,
    pub subject_token_type: String,
    pub requested_token_type: Option<String>,
    pub scope: Option<String>,
    pub audience: Vec<String>,
    pub resource: Vec<String>,
    pub actor_token: Option<String>,
}

/// RFC 8693 section 3 token type identifiers.
pub const TOKEN_TYPE_JWT: &str = "urn:ietf:params:oauth:token-type:jwt";
pub const TOKEN_TYPE_ID_TOKEN: &str = "urn:ietf:params:oauth:token-type:id_token";
pub const TOKEN_TYPE_ACCESS_TOKEN: &str = "urn:ietf:params:oauth:token-type:access_token";
/// Subject tokens a trusted issuer's JWT may be presented as.
pub const SUBJECT_TOKEN_TYPES: [&str; 3] = [TOKEN_TYPE_JWT, TOKEN_TYPE_ID_TOKEN, TOKEN_TYPE_ACCESS_TOKEN];

impl Grant {
    pub fn grant_type(&self) -> GrantType {
        match self {
            Grant::Password { .. } => GrantType::Password,
            Grant::ClientCredentials { .. } => GrantType::ClientCredentials,
            Grant::RefreshToken { .. } => GrantType::RefreshToken,
            Grant::JwtBearer { .. } => GrantType::JwtBearer,
            Grant::TokenExchange(_) => GrantType::TokenExchange,
        }
    }
}

/// A successful token response (RFC 6749 §5.1).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IssuedTokens {
    pub access_token: String,
    pub expires_in: u64,
    pub refresh_token: Option<String>,
    pub scope: String,
    /// Opaque mode handed out the key's still-valid token instead of a new one.
    pub reused: bool,
    /// RFC 8693: what a token exchange issued (`urn:ietf:params:oauth:token-type:access_token`).
    pub issued_token_type: Option<&'static str>,
}

/// RFC 7662 response for an active token.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ActiveToken {
    pub active: bool,
    pub scope: String,
    pub client_id: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub username: Option<String>,
    /// A federated user's identity provider.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub idp: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub token_type: Option<&'static str>,
    /// `access_token` or `refresh_token`.
    pub token_use: &'static str,
    pub exp: UnixTime,
    pub iat: UnixTime,
    pub sub: String,
    pub aud: Vec<String>,
    pub iss: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub jti: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Introspection {
    Inactive,
    Active(Box<ActiveToken>),
}

/// What to do for an issue request, given the key's current pair.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum IssueDecision {
    /// Opaque mode: hand out the still-valid pair again.
    Reuse(LivePair),
    /// Mint a new pair, replacing (and so revoking) the pair whose access token is `expect`.
    Replace { expect: Option<TokenId> },
}

/// The per-device rule: JWT always replaces; Opaque reuses while the access token is valid and carries exactly
/// the `granted` scopes (a refresh may have narrowed the live pair: that one is not what was asked for).
pub fn decide_issue(
    format: TokenFormat,
    current: Option<&LivePair>,
    granted: &ScopeSet,
    now: UnixTime,
) -> IssueDecision {
    match current {
        Some(pair) if format == TokenFormat::Opaque && pair.access_active(now) && pair.access_scopes == *granted => {
            IssueDecision::Reuse(pair.clone())
        }
        _ => IssueDecision::Replace { expect: current.map(|p| p.access_id) },
    }
}

/// A login session: the refresh id drawn at login (kept by every rotation), the generation of the refresh token to
/// issue next, and when the login happened.
#[derive(Debug, Clone, Copy)]
struct Session {
    refresh_id: TokenId,
    generation: u32,
    started_at: UnixTime,
}

/// Decides the access scopes of a refreshed token: the grant's own set, or the subset asked for (more is
/// `invalid_scope`, RFC 6749 §6), less whatever the subject may no longer have (`allowed_now`: the grant's set
/// granted again against the present roles and declarations), which is dropped as at login.
pub fn refreshed_scopes(
    key_scopes: &ScopeSet,
    allowed_now: &ScopeSet,
    requested: Option<ScopeSet>,
) -> Result<ScopeSet, OAuthError> {
    let asked = match requested {
        None => key_scopes.clone(),
        Some(r) if r.is_empty() => key_scopes.clone(),
        Some(r) if r.is_subset_of(key_scopes) => r,
        Some(_) => {
            return Err(OAuthError::InvalidScope("the requested scope exceeds the scope originally granted".into()));
        }
    };
    let kept: ScopeSet = asked.iter().filter(|s| allowed_now.contains(s)).map(str::to_string).collect();
    Ok(if kept.is_empty() { ScopeSet::default_scope() } else { kept })
}

pub struct ServiceConfig {
    pub issuer: String,
    pub policies: ServicePolicies,
    /// Where password hashes are verified (off the async executor, in practice).
    pub passwords: Arc<dyn PasswordVerifier>,
    /// Where trusted issuers' key sets are fetched (`jwksUri`). None: only offline key sets (`jwks`) can be used.
    pub key_sets: Option<Arc<dyn KeySetSource>>,
}

/// The operator's limits, the same for every way of running the service (standalone, sidecar).
#[derive(Debug, Clone, Copy, Default)]
pub struct ServicePolicies {
    pub user_lockout: LockoutPolicy,
    pub client_lockout: LockoutPolicy,
    pub request_bounds: RequestBounds,
}

/// How much a single request may ask for: memory and work per request stay bounded whatever a client sends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RequestBounds {
    /// Scopes in one request.
    pub max_scopes: usize,
    /// Bytes of the `scope` parameter.
    pub max_scope_bytes: usize,
}

impl Default for RequestBounds {
    fn default() -> Self {
        Self { max_scopes: 32, max_scope_bytes: 1024 }
    }
}

pub struct TokenService {
    /// Replaced whole when an application changes (the sidecar follows the cluster); requests keep the
    /// version they started with.
    registry: RwLock<Arc<Registry>>,
    store: Arc<dyn TokenStore>,
    clock: Arc<dyn Clock>,
    issuer: String,
    user_lockout: Lockout,
    client_lockout: Lockout,
    request_bounds: RequestBounds,
    rng: SystemRandom,
    passwords: Arc<dyn PasswordVerifier>,
    key_sets: Option<Arc<dyn KeySetSource>>,
    /// Assertions used at this server, until they expire.
    replays: ReplayMemory,
    key_locks: Box<[std::sync::Mutex<()>]>,
    /// For a store whose changes become visible only once committed: one request per key at a time, from read to
    /// commit ([`TokenStore::visible_when_committed`]). Sharded: requests for keys of one shard take turns too.
    key_turns: Box<[futures::lock::Mutex<()>]>,
    /// Some application this service will serve is not loaded yet (a sidecar starting): a client it does not know
    /// may be one of that application's, so it is told to come back (503), not that its credentials are wrong.
    loading: std::sync::atomic::AtomicBool,
}

/// The pair a presented token names, before any store is read.
enum Located {
    Access(TokenId),
    Refresh(TokenId, u32),
}

/// Which pair `token` would belong to: a JWT of this application (signature checked), or a tagged opaque access or
/// refresh token. `None`: not this application's token.
fn locate_id(app: &Application, token: &str) -> Option<Located> {
    if token.contains('.') {
        let header = token.split('.').next()?;
        let key = app.verification_key(header)?;
        let claims: JtiOnly = key.verify_jwt(token)?;
        return Some(Located::Access(TokenId::from_b64(&claims.jti)?));
    }
    if let Some(id) = app.tokens.decode(TokenKind::Access, token) {
        return Some(Located::Access(id));
    }
    let (id, generation) = app.tokens.decode_refresh(token)?;
    Some(Located::Refresh(id, generation))
}

fn store_error(e: StoreError) -> OAuthError {
    match e {
        StoreError::Conflict => OAuthError::TemporarilyUnavailable("too many concurrent requests for one token".into()),
        StoreError::Unavailable(reason) => {
            tracing::error!(%reason, "token storage unavailable");
            OAuthError::TemporarilyUnavailable("token storage is unavailable".into())
        }
        StoreError::Full(reason) => {
            tracing::warn!(%reason, "token state full: a new token key was refused");
            OAuthError::TemporarilyUnavailable(
                "the application's token state is full: new logins are refused until tokens expire or are revoked; \
                 existing sessions keep refreshing"
                    .into(),
            )
        }
    }
}

fn parse_scope(scope: Option<&str>, bounds: &RequestBounds) -> Result<ScopeSet, OAuthError> {
    let scope = scope.unwrap_or("");
    if scope.len() > bounds.max_scope_bytes {
        return Err(OAuthError::InvalidScope(format!(
            "the scope parameter may be at most {} bytes long",
            bounds.max_scope_bytes
        )));
    }
    let set = ScopeSet::parse(scope)
        .map_err(|_| OAuthError::InvalidScope("scope contains characters outside RFC 6749 section 3.3".into()))?;
    if set.iter().count() > bounds.max_scopes {
        return Err(OAuthError::InvalidScope(format!("a request may ask for at most {} scopes", bounds.max_scopes)));
    }
    Ok(set)
}

/// An assertion's use, to be remembered until `until`; `family`: (the name its family shares, the most members).
struct Used {
    id: String,
    family: Option<(String, usize)>,
    until: UnixTime,
}

/// The token key of a trusted issuer's user: its own subject (a local user of the same name is another), the
/// scopes granted against the roles its assertion carries, `device_` scopes as always.
fn federated_key(app: &Application, iss: &str, verified: &VerifiedAssertion, requested: &ScopeSet) -> TokenKey {
    TokenKey {
        client_id: app.client_id.clone(),
        subject: Subject::Federated(FederatedUser::new(iss, &verified.subject)),
        scopes: app.scopes.grant(requested, &verified.roles),
    }
}

/// What RFC 8693 lets a client ask for that this server does not do, refused before the subject token is looked at.
fn check_exchange(app: &Application, exchange: &TokenExchange) -> Result<(), OAuthError> {
    if !SUBJECT_TOKEN_TYPES.contains(&exchange.subject_token_type.as_str()) {
        return Err(OAuthError::InvalidRequest(format!(
            "unsupported subject_token_type: use one of {}",
            SUBJECT_TOKEN_TYPES.join(", ")
        )));
    }
    if let Some(requested) = &exchange.requested_token_type {
        let jwt = app.format == TokenFormat::Jwt && requested == TOKEN_TYPE_JWT;
        if requested != TOKEN_TYPE_ACCESS_TOKEN && !jwt {
            return Err(OAuthError::InvalidRequest(format!(
                "unsupported requested_token_type: this client's tokens are {TOKEN_TYPE_ACCESS_TOKEN}"
            )));
        }
    }
    if exchange.actor_token.is_some() {
        return Err(OAuthError::InvalidRequest("delegation (actor_token) is not supported".into()));
    }
    // The issued token's audience is the application's: a client may name it, not another.
    if let Some(other) = exchange.audience.iter().chain(&exchange.resource).find(|t| !app.audience.contains(t)) {
        return Err(OAuthError::InvalidTarget(format!(
            "{other:?} is not an audience of this client's tokens ({})",
            app.audience.join(", ")
        )));
    }
    Ok(())
}

impl TokenService {
    pub fn new(registry: Registry, store: Arc<dyn TokenStore>, clock: Arc<dyn Clock>, config: ServiceConfig) -> Self {
        Self {
            registry: RwLock::new(Arc::new(registry)),
            store,
            clock,
            issuer: config.issuer,
            user_lockout: Lockout::new(config.policies.user_lockout),
            client_lockout: Lockout::new(config.policies.client_lockout),
            request_bounds: config.policies.request_bounds,
            rng: SystemRandom::new(),
            passwords: config.passwords,
            key_sets: config.key_sets,
            replays: ReplayMemory::default(),
            key_locks: (0..64).map(|_| std::sync::Mutex::new(())).collect(),
            key_turns: (0..1024).map(|_| futures::lock::Mutex::new(())).collect(),
            loading: std::sync::atomic::AtomicBool::new(false),
        }
    }

    /// Whether applications are still to be loaded (see `loading`); false by default.
    pub fn set_loading(&self, loading: bool) {
        self.loading.store(loading, std::sync::atomic::Ordering::Release);
    }

    /// The applications as they are now.
    pub fn registry(&self) -> Arc<Registry> {
        // A panic while replacing an Arc cannot leave it half-written.
        self.registry.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Serves `registry` from now on (applications added, removed or changed).
    pub fn set_registry(&self, registry: Registry) {
        *self.registry.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(registry);
    }

    pub fn issuer(&self) -> &str {
        &self.issuer
    }

    pub fn store_healthy(&self) -> bool {
        self.store.healthy()
    }

    /// Every public signing key in use, as a JWK Set (in its published form, see [`signing::jwks_json`]).
    pub fn jwks(&self) -> Result<serde_json::Value, serde_json::Error> {
        let registry = self.registry();
        let mut keys: Vec<&SigningKey> =
            registry.apps().flat_map(|a| a.verification_keys.iter()).map(|k| &**k).collect();
        keys.sort_by(|a, b| a.kid().cmp(b.kid()));
        keys.dedup_by(|a, b| a.kid() == b.kid());
        signing::jwks_json(keys.into_iter().map(|k| k.public_jwk().clone()).collect())
    }

    /// Counts the failed checks other servers of the same state shared, so that lockout holds across replicas.
    fn absorb_shared_failures(&self) {
        for f in self.store.take_shared_failures() {
            let lockout = if f.user { &self.user_lockout } else { &self.client_lockout };
            lockout.fail(&f.who, f.at);
        }
    }

    fn fail_check(&self, user: bool, who: &str, now: UnixTime) -> bool {
        self.store.share_failure(SharedFailure { user, who: who.to_string(), at: now });
        let lockout = if user { &self.user_lockout } else { &self.client_lockout };
        lockout.fail(who, now)
    }

    /// Client authentication, throttled per client ID. Client secrets are long and random, and checking one is a
    /// constant-time hash comparison, so a locked client ID is still checked: the real client keeps working (a
    /// client ID is no secret, and knowing one must not let anyone deny service to that client), while wrong
    /// secrets during the lock are refused without being counted, shared with other replicas or logged again.
    pub fn authenticate_client(&self, creds: &ClientCredentials) -> Result<Arc<Application>, OAuthError> {
        self.absorb_shared_failures();
        let now = self.clock.now();
        let registry = self.registry();
        if self.loading.load(std::sync::atomic::Ordering::Acquire) && registry.get(&creds.client_id).is_none() {
            // Not counted toward the lockout: nothing was checked.
            return Err(OAuthError::TemporarilyUnavailable("the application is still loading; retry shortly".into()));
        }
        let app = registry.get(&creds.client_id).filter(|app| app.secret_matches(&creds.client_secret)).cloned();
        if let Some(secs) = self.client_lockout.locked(&creds.client_id, now)
            && app.is_none()
        {
            return Err(OAuthError::InvalidClient(format!(
                "too many failed client authentications; try again in {secs}s"
            )));
        }
        match app {
            Some(app) => {
                self.client_lockout.succeed(&creds.client_id);
                Ok(app)
            }
            None => {
                if self.fail_check(false, &creds.client_id, now) {
                    tracing::warn!(client_id = ?creds.client_id, "client locked after repeated failed authentication");
                } else {
                    tracing::info!(client_id = ?creds.client_id, "client authentication failed");
                }
                Err(OAuthError::InvalidClient("client authentication failed".into()))
            }
        }
    }

    /// The token endpoint, for tokens naming the configured issuer.
    pub async fn token(&self, creds: &ClientCredentials, grant: Grant) -> Result<IssuedTokens, OAuthError> {
        self.token_with_issuer(&self.issuer, creds, grant).await
    }

    /// The token endpoint, for tokens naming `issuer` (the HTTP layer derives it per request behind a trusted
    /// TLS-terminating proxy).
    pub async fn token_with_issuer(
        &self,
        issuer: &str,
        creds: &ClientCredentials,
        grant: Grant,
    ) -> Result<IssuedTokens, OAuthError> {
        let app = self.authenticate_client(creds)?;
        let grant_type = grant.grant_type();
        if !app.allows(grant_type) {
            return Err(OAuthError::UnauthorizedClient(format!(
                "this client may not use the {} grant",
                grant_type.as_str()
            )));
        }
        match grant {
            Grant::ClientCredentials { scope } => {
                let requested = parse_scope(scope.as_deref(), &self.request_bounds)?;
                let granted = app.scopes.grant(&requested, &app.client_roles);
                let key = TokenKey { client_id: app.client_id.clone(), subject: Subject::Client, scopes: granted };
                // RFC 6749 §4.4.3: no refresh token for client_credentials.
                self.issue(issuer, &app, key, false).await
            }
            Grant::Password { username, password, scope } => {
                let requested = parse_scope(scope.as_deref(), &self.request_bounds)?;
                let roles = self.check_password(&app, &username, password).await?;
                let granted = app.scopes.grant(&requested, &roles);
                let key =
                    TokenKey { client_id: app.client_id.clone(), subject: Subject::User(username), scopes: granted };
                self.issue(issuer, &app, key, app.issues_refresh_tokens()).await
            }
            Grant::RefreshToken { refresh_token, scope } => {
                let requested = scope.as_deref().map(|s| parse_scope(Some(s), &self.request_bounds)).transpose()?;
                self.refresh(issuer, &app, &refresh_token, requested).await
            }
            Grant::JwtBearer { assertion, scope } => {
                let requested = parse_scope(scope.as_deref(), &self.request_bounds)?;
                let (iss, verified) = self.verify_assertion(&app, &assertion).await?;
                let key = federated_key(&app, &iss, &verified, &requested);
                // One assertion, one grant (RFC 7523 section 3, item 7).
                let used = Used { id: verified.replay_id, family: None, until: verified.expires_at };
                self.issue_for_assertion(issuer, &app, key, used).await
            }
            Grant::TokenExchange(exchange) => {
                check_exchange(&app, &exchange)?;
                let requested = parse_scope(exchange.scope.as_deref(), &self.request_bounds)?;
                let (iss, verified) = self.verify_assertion(&app, &exchange.subject_token).await?;
                let key = federated_key(&app, &iss, &verified, &requested);
                // One subject token, one exchange per token key: a backend holding a user's ID token may exchange it
                // for the iPad's token and for the iPhone's, but the same exchange twice is a replay. At most as
                // many keys as the user may hold (more would only evict each other), so that invented device scopes
                // cannot fill the replay memory.
                let used = Used {
                    id: format!("{}\u{0}{}", verified.replay_id, key.scopes),
                    family: Some((verified.replay_id, app.max_keys_per_user)),
                    until: verified.expires_at,
                };
                let mut issued = self.issue_for_assertion(issuer, &app, key, used).await?;
                issued.issued_token_type = Some(match exchange.requested_token_type.as_deref() {
                    Some(TOKEN_TYPE_JWT) => TOKEN_TYPE_JWT,
                    _ => TOKEN_TYPE_ACCESS_TOKEN,
                });
                Ok(issued)
            }
        }
    }

    /// Checks a trusted issuer's JWT: the issuer it names must be trusted by `app`, and its key set (fetched again
    /// once if the JWT names a key the held set lacks) must verify it. Returns the issuer and what the JWT says.
    async fn verify_assertion(
        &self,
        app: &Application,
        token: &str,
    ) -> Result<(String, VerifiedAssertion), OAuthError> {
        let refused = |e: AssertionError| OAuthError::InvalidGrant(e.to_string());
        let iss = assertion::peek_issuer(token).map_err(refused)?;
        let trusted = app.trusted_issuer(&iss).ok_or(AssertionError::UntrustedIssuer).map_err(refused)?;
        let now = self.clock.now();
        let verified = match &trusted.keys {
            KeySource::Fixed(set) => assertion::verify(token, trusted, set, now),
            KeySource::Unavailable(why) => {
                tracing::warn!(issuer = %trusted.issuer, reason = %why, "a trusted issuer's offline key set is unavailable");
                return Err(OAuthError::TemporarilyUnavailable(
                    "the trusted issuer's key set is unavailable; retry later".into(),
                ));
            }
            KeySource::Uri(uri) => {
                let Some(source) = &self.key_sets else {
                    return Err(OAuthError::ServerError("this server cannot fetch key sets".into()));
                };
                let unavailable = |why: String| {
                    tracing::warn!(issuer = %trusted.issuer, key_set = %uri, error = %why, "a trusted issuer's key set is unavailable");
                    OAuthError::TemporarilyUnavailable(
                        "the trusted issuer's key set cannot be fetched; retry later".into(),
                    )
                };
                let set = source.key_set(uri, false).await.map_err(unavailable)?;
                match assertion::verify(token, trusted, &set, now) {
                    // The issuer may have rotated its keys: fetch again (the adapter bounds how often), and retry once.
                    Err(AssertionError::UnknownKey) => {
                        let set = source.key_set(uri, true).await.map_err(unavailable)?;
                        assertion::verify(token, trusted, &set, now)
                    }
                    other => other,
                }
            }
        };
        let verified = verified.map_err(|e| {
            tracing::info!(client_id = %app.client_id, issuer = %trusted.issuer, reason = %e, "assertion refused");
            refused(e)
        })?;
        Ok((trusted.issuer.clone(), verified))
    }

    /// Issues for a federated `key` once its assertion's use is recorded, here and in a store shared with other
    /// servers (a replay is `invalid_grant`). A failure that is not the client's (storage unavailable) forgets the
    /// use again, so that the client's retry with the same assertion is not taken for a replay.
    async fn issue_for_assertion(
        &self,
        issuer: &str,
        app: &Application,
        key: TokenKey,
        used: Used,
    ) -> Result<IssuedTokens, OAuthError> {
        let replayed = || OAuthError::InvalidGrant("the assertion was already used".into());
        let now = self.clock.now();
        let family = used.family.as_ref().map(|(name, max)| (name.as_str(), *max));
        match self.replays.first_use(&used.id, family, used.until, now) {
            FirstUse::Yes => {}
            FirstUse::Replayed => return Err(replayed()),
            FirstUse::FamilyFull => {
                return Err(OAuthError::InvalidGrant(format!(
                    "the subject token was already exchanged for {} token keys, as many as one user may hold",
                    app.max_keys_per_user
                )));
            }
            FirstUse::Full => {
                tracing::error!("too many unexpired assertions to remember; refusing new ones until some expire");
                return Err(OAuthError::TemporarilyUnavailable("too many assertions in use; retry later".into()));
            }
        }
        let forget = || async {
            self.replays.forget(&used.id, used.family.as_ref().map(|(name, _)| name.as_str()));
            if let Err(e) = self.store.forget_assertion(&app.client_id, &used.id).await {
                tracing::warn!(error = %e, "an assertion whose grant failed stays recorded as used");
            }
        };
        match self.store.remember_assertion(&app.client_id, &used.id, used.until).await {
            Ok(true) => {}
            Ok(false) => {
                // Another server used it: this one's memory keeps it too.
                return Err(replayed());
            }
            Err(e) => {
                self.replays.forget(&used.id, used.family.as_ref().map(|(name, _)| name.as_str()));
                return Err(store_error(e));
            }
        }
        let issued = self.issue(issuer, app, key, app.issues_refresh_tokens()).await;
        if let Err(OAuthError::TemporarilyUnavailable(_) | OAuthError::ServerError(_)) = &issued {
            forget().await;
        }
        issued
    }

    /// Checks a resource owner's password (off the executor), with lockout. Returns the user's roles.
    async fn check_password(
        &self,
        app: &Application,
        username: &str,
        password: String,
    ) -> Result<Vec<String>, OAuthError> {
        let lock_key = format!("{}\u{0}{}", app.client_id, username);
        let now = self.clock.now();
        let admission = match self.user_lockout.admit(&lock_key, now).await {
            Ok(admission) => admission,
            Err(secs) => {
                return Err(OAuthError::InvalidGrant(format!(
                    "the account is temporarily locked; try again in {secs}s"
                )));
            }
        };
        let user = app.users.get(username);
        // Unknown users are checked against a decoy hash so that timing does not reveal which usernames exist.
        let digest = user.map_or_else(|| app.decoy.clone(), |u| u.digest.clone());
        let verified = self.passwords.verify(digest, password).await.map_err(|reason| {
            tracing::error!(%reason, "password verification failed");
            OAuthError::ServerError("password verification failed".into())
        })?;
        match user {
            Some(u) if verified => {
                admission.succeeded();
                Ok(u.roles.clone())
            }
            _ => {
                self.store.share_failure(SharedFailure { user: true, who: lock_key.clone(), at: now });
                if admission.failed(now) {
                    tracing::warn!(client_id = %app.client_id, username, "user locked after repeated failed passwords");
                }
                Err(OAuthError::InvalidGrant("invalid username or password".into()))
            }
        }
    }

    /// A new login session: a random refresh id, generation 0, and its start.
    fn new_session(&self, now: UnixTime) -> Result<Session, OAuthError> {
        let refresh_id = TokenId::random(&self.rng).map_err(|_| OAuthError::ServerError("no randomness".into()))?;
        Ok(Session { refresh_id, generation: 0, started_at: now })
    }

    /// A new pair; with a refresh token of `session` if given, which expires after the refresh lifetime or at the
    /// session's end, whichever comes first.
    fn new_pair(
        &self,
        app: &Application,
        access_scopes: ScopeSet,
        now: UnixTime,
        session: Option<Session>,
    ) -> Result<LivePair, OAuthError> {
        let refresh = session.map(|s| RefreshGrant {
            id: s.refresh_id,
            expires_at: app
                .session_max
                .map_or(now + app.refresh_ttl, |max| (now + app.refresh_ttl).min(s.started_at + max)),
            generation: s.generation,
            session_started_at: s.started_at,
        });
        Ok(LivePair {
            access_id: TokenId::random(&self.rng).map_err(|_| OAuthError::ServerError("no randomness".into()))?,
            access_scopes,
            issued_at: now,
            access_expires_at: now + app.access_ttl,
            refresh,
        })
    }

    /// The access token string of `pair`. JWTs are signed here, before the pair is committed, so that a signing
    /// failure leaves the state untouched.
    fn access_token(
        &self,
        issuer: &str,
        app: &Application,
        key: &TokenKey,
        pair: &LivePair,
    ) -> Result<String, OAuthError> {
        match app.format {
            TokenFormat::Opaque => Ok(app.tokens.encode(TokenKind::Access, &pair.access_id)),
            TokenFormat::Jwt => {
                let claims = AccessClaims {
                    iss: issuer,
                    sub: key.sub(),
                    aud: &app.audience,
                    exp: pair.access_expires_at,
                    iat: pair.issued_at,
                    jti: pair.access_id.to_b64(),
                    client_id: &app.client_id,
                    scope: pair.access_scopes.to_string(),
                    idp: key.federated_issuer(),
                };
                let json =
                    serde_json::to_vec(&claims).map_err(|_| OAuthError::ServerError("claims encoding".into()))?;
                app.signer.sign_jwt(&json).map_err(|_| OAuthError::ServerError("token signing failed".into()))
            }
        }
    }

    fn response(
        &self,
        app: &Application,
        access_token: String,
        pair: &LivePair,
        now: UnixTime,
        reused: bool,
    ) -> IssuedTokens {
        IssuedTokens {
            access_token,
            expires_in: pair.access_expires_at.saturating_sub(now),
            refresh_token: pair.refresh.map(|r| app.tokens.encode_refresh(&r.id, r.generation)),
            scope: pair.access_scopes.to_string(),
            reused,
            issued_token_type: None,
        }
    }

    /// The lock of `key`'s shard. Requests for one key are decided and applied one at a time in this process, so
    /// they do not fight over the store's compare-and-set; signing and the durability wait happen outside it.
    fn key_lock(&self, key: &TokenKey) -> std::sync::MutexGuard<'_, ()> {
        // The guarded data is `()`: a panic elsewhere cannot leave anything inconsistent.
        self.key_locks[shard_of(key, self.key_locks.len())].lock().unwrap_or_else(|p| p.into_inner())
    }

    /// This request's turn for `key`, where the store needs one ([`TokenStore::visible_when_committed`]).
    async fn key_turn(&self, key: &TokenKey) -> Option<futures::lock::MutexGuard<'_, ()>> {
        if !self.store.visible_when_committed() {
            return None;
        }
        Some(self.key_turns[shard_of(key, self.key_turns.len())].lock().await)
    }

    /// Issues for `key`: at most one live pair per key.
    async fn issue(
        &self,
        issuer: &str,
        app: &Application,
        key: TokenKey,
        with_refresh: bool,
    ) -> Result<IssuedTokens, OAuthError> {
        let key = &key;
        let _turn = self.key_turn(key).await;
        retry_conflicts(&*self.clock, || async move {
            if let Err(e) = self.store.prepare(Lookup::Key(key)).await {
                return Attempt::after(e);
            }
            let now = self.clock.now();
            let (pair, durable, reused) = {
                let _key_lock = self.key_lock(key);
                let current = self.store.pair(key);
                match decide_issue(app.format, current.as_ref(), &key.scopes, now) {
                    // The pair may have been written by a request still waiting for its fsync: wait for that too.
                    IssueDecision::Reuse(pair) => (pair, self.store.sync(), true),
                    IssueDecision::Replace { expect } => {
                        let session = if with_refresh { Some(self.new_session(now)?) } else { None };
                        let pair = self.new_pair(app, key.scopes.clone(), now, session)?;
                        let change = Change { key: key.clone(), expect, next: Some(pair.clone()) };
                        (pair, self.store.commit(change), false)
                    }
                }
            };
            // Signing overlaps the fsync. It cannot fail with a key that parsed, short of the OS RNG failing; then
            // the client gets server_error and the key's new pair simply has no holder.
            let token = self.access_token(issuer, app, key, &pair)?;
            match durable.await {
                Ok(()) => {
                    if !reused {
                        self.enforce_device_cap(app, key).await;
                    }
                    Ok(Attempt::Done(self.response(app, token, &pair, now, reused)))
                }
                Err(e) => Attempt::after(e),
            }
        })
        .await
    }

    async fn refresh(
        &self,
        issuer: &str,
        app: &Application,
        token: &str,
        requested: Option<ScopeSet>,
    ) -> Result<IssuedTokens, OAuthError> {
        let (id, generation) =
            app.tokens.decode_refresh(token).ok_or_else(|| OAuthError::InvalidGrant(INVALID_REFRESH.into()))?;
        let requested = &requested;
        retry_conflicts(&*self.clock, || async move {
            if let Err(e) = self.store.prepare(Lookup::Refresh(&id)).await {
                return Attempt::after(e);
            }
            let now = self.clock.now();
            let Some((key, pair)) = self.store.find_refresh(&id) else {
                return Err(OAuthError::InvalidGrant(INVALID_REFRESH.into()));
            };
            let current_gen = pair.refresh.map_or(0, |r| r.generation);
            if key.client_id != app.client_id || generation > current_gen {
                // A later generation than the state holds was never issued from this state (a restored backup).
                return Err(OAuthError::InvalidGrant(INVALID_REFRESH.into()));
            }
            if generation < current_gen {
                tracing::warn!(client_id = %app.client_id, sub = key.sub(), "refresh token reuse detected; revoking the grant's live tokens");
                self.revoke_login(&key, id).await?;
                return Err(OAuthError::InvalidGrant(
                    "the refresh token was already used; the tokens of this grant are revoked".into(),
                ));
            }
            let next_and_durable = {
                let _key_lock = self.key_lock(&key);
                // Decided again under the lock: a concurrent refresh may have rotated this token meanwhile.
                let Some((key, pair)) =
                    self.store.find_refresh(&id).filter(|(_, p)| p.refresh.is_some_and(|r| r.generation == generation))
                else {
                    return Ok(Attempt::Again);
                };
                if !pair.refresh_active(now) {
                    return Err(OAuthError::InvalidGrant(INVALID_REFRESH.into()));
                }
                // The present decides, not the login: the user's roles, the declared scopes and the
                // grant types as they are now.
                let allowed_now = match &key.subject {
                    Subject::Client => app.scopes.grant(&key.scopes, &app.client_roles),
                    Subject::User(user) => {
                        let Some(u) = app.users.get(user) else {
                            return Err(OAuthError::InvalidGrant("the user no longer exists".into()));
                        };
                        if !app.allows(GrantType::Password) {
                            return Err(OAuthError::InvalidGrant(
                                "the password grant this refresh token came from is no longer enabled for this client"
                                    .into(),
                            ));
                        }
                        app.scopes.grant(&key.scopes, &u.roles)
                    }
                    // No assertion to read roles from: the roles checked at login stand, and what can be checked
                    // is: the issuer is still trusted, a federated grant still enabled, the scopes still declared.
                    Subject::Federated(f) => {
                        if app.trusted_issuer(f.issuer()).is_none() {
                            return Err(OAuthError::InvalidGrant(
                                "the identity provider this refresh token came from is no longer trusted by this client"
                                    .into(),
                            ));
                        }
                        if !app.allows_federated() {
                            return Err(OAuthError::InvalidGrant(
                                "the grant this refresh token came from is no longer enabled for this client".into(),
                            ));
                        }
                        app.scopes.still_declared(&key.scopes)
                    }
                };
                let session = pair.refresh.map(|r| Session {
                    refresh_id: r.id,
                    generation: r.generation,
                    // State written before sessions were recorded: the session starts with this pair.
                    started_at: if r.session_started_at == 0 { pair.issued_at } else { r.session_started_at },
                });
                if let (Some(max), Some(s)) = (app.session_max, session)
                    && now >= s.started_at.saturating_add(max)
                {
                    return Err(OAuthError::InvalidGrant(
                        "the session has reached its maximum lifetime; log in again".into(),
                    ));
                }
                let scopes = refreshed_scopes(&key.scopes, &allowed_now, requested.clone())?;
                match app.format {
                    // Opaque pairs are shared by every caller of the same key, refresh token included, so
                    // refresh tokens are not rotated (a second caller's refresh is not reuse), and a
                    // refresh while the access token is valid returns it (it does not revoke the other
                    // caller's copy).
                    TokenFormat::Opaque if pair.access_active(now) && pair.access_scopes == scopes => {
                        (pair, self.store.sync(), true)
                    }
                    TokenFormat::Opaque => {
                        let next = LivePair { refresh: pair.refresh, ..self.new_pair(app, scopes, now, None)? };
                        let change =
                            Change { key: (*key).clone(), expect: Some(pair.access_id), next: Some(next.clone()) };
                        (next, self.store.commit(change), false)
                    }
                    TokenFormat::Jwt => {
                        // Rotation: the same refresh id, the next generation; the presented one, and every
                        // earlier one, is then reuse.
                        let rotated = match session {
                            Some(s) => Some(Session {
                                generation: s.generation.checked_add(1).ok_or_else(|| {
                                    OAuthError::InvalidGrant("the session was refreshed too often; log in again".into())
                                })?,
                                ..s
                            }),
                            None => None,
                        };
                        let next = self.new_pair(app, scopes, now, rotated)?;
                        let change =
                            Change { key: (*key).clone(), expect: Some(pair.access_id), next: Some(next.clone()) };
                        (next, self.store.commit(change), false)
                    }
                }
            };
            let (next, durable, reused) = next_and_durable;
            let access = self.access_token(issuer, app, &key, &next)?;
            match durable.await {
                Ok(()) => Ok(Attempt::Done(self.response(app, access, &next, now, reused))),
                Err(e) => Attempt::after(e),
            }
        })
        .await
    }

    /// Keeps a user within `max_keys_per_user` live keys: past it, the pairs of the least recently issued keys
    /// (other than `issued`, just issued) are revoked. Best effort: the token just issued stands whatever happens
    /// here, and a cap exceeded by a failed or racing eviction is restored at the user's next login.
    async fn enforce_device_cap(&self, app: &Application, issued: &TokenKey) {
        let Some(user) = issued.username() else { return };
        // One eviction per attempt, until the user is within the cap; a failure ends it (logged), and so does
        // running out of attempts (the cap is restored at the next login).
        let _ = retry_conflicts(&*self.clock, || async move {
            let lookup = Lookup::User { client_id: &app.client_id, username: user };
            if let Err(e) = self.store.prepare(lookup).await {
                return Attempt::after(e);
            }
            let mut pairs = self.store.user_pairs(&app.client_id, user);
            if pairs.len() <= app.max_keys_per_user {
                return Ok(Attempt::Done(()));
            }
            pairs.retain(|(k, _)| k != issued);
            let Some((victim, pair)) = pairs.into_iter().min_by_key(|(_, p)| p.issued_at) else {
                return Ok(Attempt::Done(()));
            };
            let change = Change { key: victim.clone(), expect: Some(pair.access_id), next: None };
            match self.store.commit(change).await {
                Ok(()) => {
                    tracing::info!(client_id = %app.client_id, username = ?user, scope = %victim.scopes, "device cap reached: the least recently issued token key was revoked");
                    Ok(Attempt::Again)
                }
                Err(e) => {
                    if !matches!(e, StoreError::Conflict) {
                        tracing::warn!(client_id = %app.client_id, error = %e, "device cap: revoking the oldest token key failed");
                    }
                    Attempt::after(e)
                }
            }
        })
        .await;
    }

    /// Removes `key`'s live pair if it belongs to the login whose refresh id is `refresh_id`: a later, independent
    /// login's pair for the same key is not the reused token's business.
    async fn revoke_login(&self, key: &TokenKey, refresh_id: TokenId) -> Result<(), OAuthError> {
        retry_conflicts(&*self.clock, || async move {
            if let Err(e) = self.store.prepare(Lookup::Key(key)).await {
                return Attempt::after(e);
            }
            let Some(current) = self.store.pair(key) else { return Ok(Attempt::Done(())) };
            if current.refresh.map(|r| r.id) != Some(refresh_id) {
                return Ok(Attempt::Done(()));
            }
            let change = Change { key: key.clone(), expect: Some(current.access_id), next: None };
            match self.store.commit(change).await {
                Ok(()) => Ok(Attempt::Done(())),
                Err(e) => Attempt::after(e),
            }
        })
        .await
    }

    /// Finds the live pair `token` belongs to, if it is a current token of that pair.
    async fn locate(
        &self,
        app: &Application,
        token: &str,
    ) -> Result<Option<(SharedKey, LivePair, TokenKind)>, StoreError> {
        match locate_id(app, token) {
            None => Ok(None),
            Some(Located::Access(id)) => {
                self.store.prepare(Lookup::Access(&id)).await?;
                Ok(self.store.find_access(&id).map(|(k, p)| (k, p, TokenKind::Access)))
            }
            // Only the current generation of a login's refresh token is active; earlier ones were rotated out.
            Some(Located::Refresh(id, generation)) => {
                self.store.prepare(Lookup::Refresh(&id)).await?;
                Ok(self
                    .store
                    .find_refresh(&id)
                    .filter(|(_, p)| p.refresh.is_some_and(|r| r.generation == generation))
                    .map(|(k, p)| (k, p, TokenKind::Refresh)))
            }
        }
    }

    /// RFC 7009. Revoking either token of a pair revokes both. Unknown tokens and other clients' tokens are
    /// answered like success, without effect. Returns whether anything was revoked.
    pub async fn revoke(&self, creds: &ClientCredentials, token: &str) -> Result<bool, OAuthError> {
        let app = &self.authenticate_client(creds)?;
        retry_conflicts(&*self.clock, || async move {
            let located = match self.locate(app, token).await {
                Ok(located) => located,
                Err(e) => return Attempt::after(e),
            };
            let Some((key, pair, _)) = located else {
                // The token may be gone only in memory: superseded or revoked by a change still waiting for its
                // fsync. Answer once that change is durable, or a crash could bring back a token answered revoked.
                // (A conflict: a change this lookup saw was not stored after all; look again.)
                return match self.store.sync().await {
                    Ok(()) => Ok(Attempt::Done(false)),
                    Err(e) => Attempt::after(e),
                };
            };
            if key.client_id != app.client_id {
                tracing::info!(client_id = %app.client_id, "revocation of another client's token ignored");
                return Ok(Attempt::Done(false));
            }
            let change = Change { key: (*key).clone(), expect: Some(pair.access_id), next: None };
            match self.store.commit(change).await {
                Ok(()) => Ok(Attempt::Done(true)),
                Err(e) => Attempt::after(e),
            }
        })
        .await
    }

    /// RFC 7662. Only the application's own tokens are reported active.
    pub async fn introspect(&self, creds: &ClientCredentials, token: &str) -> Result<Introspection, OAuthError> {
        self.introspect_with_issuer(&self.issuer, creds, token).await
    }

    /// [`Self::introspect`], reporting `issuer` as `iss`.
    pub async fn introspect_with_issuer(
        &self,
        issuer: &str,
        creds: &ClientCredentials,
        token: &str,
    ) -> Result<Introspection, OAuthError> {
        let app = self.authenticate_client(creds)?;
        let now = self.clock.now();
        let Some((key, pair, kind)) = self.locate(&app, token).await.map_err(store_error)? else {
            return Ok(Introspection::Inactive);
        };
        if key.client_id != app.client_id {
            return Ok(Introspection::Inactive);
        }
        let active = ActiveToken {
            active: true,
            scope: match kind {
                TokenKind::Access => pair.access_scopes.to_string(),
                TokenKind::Refresh => key.scopes.to_string(),
            },
            client_id: key.client_id.clone(),
            username: match &key.subject {
                Subject::User(u) => Some(u.clone()),
                Subject::Federated(f) => Some(f.user().to_string()),
                Subject::Client => None,
            },
            idp: key.federated_issuer().map(str::to_string),
            token_type: (kind == TokenKind::Access).then_some("Bearer"),
            token_use: match kind {
                TokenKind::Access => "access_token",
                TokenKind::Refresh => "refresh_token",
            },
            exp: match (kind, pair.refresh) {
                (TokenKind::Refresh, Some(r)) => r.expires_at,
                _ => pair.access_expires_at,
            },
            iat: pair.issued_at,
            sub: key.sub().to_string(),
            aud: app.audience.clone(),
            iss: issuer.to_string(),
            jti: (kind == TokenKind::Access && app.format == TokenFormat::Jwt).then(|| pair.access_id.to_b64()),
        };
        if now >= active.exp {
            return Ok(Introspection::Inactive);
        }
        Ok(Introspection::Active(Box::new(active)))
    }
}

#[cfg(test)]
#[path = "service_tests.rs"]
mod tests;

#[cfg(test)]
#[path = "service_model_tests.rs"]
mod model_tests;

#[cfg(test)]
#[path = "service_federation_tests.rs"]
mod federation_tests;

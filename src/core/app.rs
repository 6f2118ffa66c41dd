//! Applications as the core sees them: validated, with secrets reduced to digests and keys parsed.

use std::collections::HashMap;
use std::sync::{Arc, OnceLock};

use argon2::password_hash::{PasswordHash, PasswordHasher, SaltString};
use subtle::ConstantTimeEq;

use super::assertion::TrustedIssuer;
use super::scope::ScopePolicy;
use super::signing::SigningKey;
use super::tokens::OpaqueTokens;

/// The grants an application may use.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum GrantType {
    Password,
    ClientCredentials,
    RefreshToken,
    /// RFC 7523 section 2.1: a trusted issuer's JWT as the grant.
    JwtBearer,
    /// RFC 8693: a trusted issuer's token exchanged for this application's.
    TokenExchange,
}

impl GrantType {
    /// The `grant_type` value on the wire (RFC 6749, RFC 7523, RFC 8693).
    pub fn as_str(self) -> &'static str {
        match self {
            GrantType::Password => "password",
            GrantType::ClientCredentials => "client_credentials",
            GrantType::RefreshToken => "refresh_token",
            GrantType::JwtBearer => "urn:ietf:params:oauth:grant-type:jwt-bearer",
            GrantType::TokenExchange => "urn:ietf:params:oauth:grant-type:token-exchange",
        }
    }

    /// The grants that make a trusted issuer's user a user here.
    pub fn is_federated(self) -> bool {
        matches!(self, GrantType::JwtBearer | GrantType::TokenExchange)
    }
}

/// What an access token is: a signed JWT (a new one replaces the key's previous token) or an opaque handle (the
/// same one is handed out again while it is valid).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum TokenFormat {
    #[default]
    Jwt,
    Opaque,
}

/// A password hash from the user store, checked for shape when loaded.
#[derive(Clone)]
pub enum PasswordDigest {
    Argon2(String),
    Bcrypt(String),
}

impl std::fmt::Debug for PasswordDigest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            PasswordDigest::Argon2(_) => "Argon2(..)",
            PasswordDigest::Bcrypt(_) => "Bcrypt(..)",
        })
    }
}

impl PasswordDigest {
    /// Accepts argon2 PHC strings (`$argon2id$...`) and bcrypt hashes (`$2b$...`).
    pub fn parse(hash: &str) -> Result<Self, String> {
        if hash.starts_with("$argon2") {
            let parsed = PasswordHash::new(hash).map_err(|e| format!("not a valid argon2 PHC string: {e}"))?;
            if parsed.hash.is_none() || parsed.salt.is_none() {
                return Err("not a valid argon2 PHC string: salt or hash missing".into());
            }
            Ok(Self::Argon2(hash.to_string()))
        } else if ["$2a$", "$2b$", "$2y$", "$2x$"].iter().any(|p| hash.starts_with(p)) {
            if hash.len() != 60 {
                return Err("not a valid bcrypt hash (expected 60 characters)".into());
            }
            Ok(Self::Bcrypt(hash.to_string()))
        } else {
            Err("unsupported password hash: use an argon2id PHC string (kubetoken hash-password) or bcrypt".into())
        }
    }

    /// CPU-heavy by design: call off the async executor. `memory` is argon2's working memory, reused between
    /// calls so that a busy server does not allocate (and the allocator keep) 19 MiB per verification.
    pub fn verify(&self, password: &str, memory: &mut Vec<argon2::Block>) -> bool {
        match self {
            PasswordDigest::Argon2(h) => verify_argon2(h, password, memory).unwrap_or(false),
            PasswordDigest::Bcrypt(h) => bcrypt::verify(password, h).unwrap_or(false),
        }
    }

    /// A digest of a random password with default parameters: verified against for unknown users, so that
    /// response time does not reveal whether a username exists.
    pub fn decoy() -> &'static PasswordDigest {
        static DECOY: OnceLock<PasswordDigest> = OnceLock::new();
        DECOY.get_or_init(|| {
            let random_password = random_salt().map(|s| s.as_str().to_string()).unwrap_or_default();
            PasswordDigest::Argon2(hash_password(&random_password).unwrap_or_default())
        })
    }

    /// The hash kind and cost parameters: `$argon2id$v=19$m=19456,t=2,p=1` or `$2b$12`.
    fn cost_class(&self) -> String {
        match self {
            // `$argon2id$v=19$m=…,t=…,p=…$salt$hash`: everything before the salt.
            PasswordDigest::Argon2(h) => h.split('$').take(4).collect::<Vec<_>>().join("$"),
            PasswordDigest::Bcrypt(h) => h.chars().take(6).collect(),
        }
    }

    /// A digest of a random password that costs what checking `like` costs (same kind and parameters): the
    /// decoy for unknown users of an application whose users have `like`'s parameters. Made once per cost class.
    pub fn decoy_like(like: &PasswordDigest) -> PasswordDigest {
        static DECOYS: OnceLock<std::sync::Mutex<HashMap<String, PasswordDigest>>> = OnceLock::new();
        let class = like.cost_class();
        let decoys = DECOYS.get_or_init(Default::default);
        if let Some(d) = decoys.lock().unwrap_or_else(|p| p.into_inner()).get(&class) {
            return d.clone();
        }
        let random_password = random_salt().map(|s| s.as_str().to_string()).unwrap_or_default();
        let made = match like {
            PasswordDigest::Argon2(h) => PasswordHash::new(h).ok().and_then(|parsed| {
                let params = argon2::Params::try_from(&parsed).ok()?;
                let algorithm = argon2::Algorithm::try_from(parsed.algorithm).ok()?;
                let version = parsed.version.map(argon2::Version::try_from).transpose().ok()?.unwrap_or_default();
                let salt = random_salt().ok()?;
                argon2::Argon2::new(algorithm, version, params)
                    .hash_password(random_password.as_bytes(), &salt)
                    .ok()
                    .map(|h| PasswordDigest::Argon2(h.to_string()))
            }),
            PasswordDigest::Bcrypt(h) => h
                .get(4..6)
                .and_then(|cost| cost.parse::<u32>().ok())
                .and_then(|cost| bcrypt::hash(&random_password, cost).ok())
                .map(PasswordDigest::Bcrypt),
        };
        let made = made.unwrap_or_else(|| PasswordDigest::decoy().clone());
        decoys.lock().unwrap_or_else(|p| p.into_inner()).insert(class, made.clone());
        made
    }
}

fn verify_argon2(phc: &str, password: &str, memory: &mut Vec<argon2::Block>) -> Option<bool> {
    let parsed = PasswordHash::new(phc).ok()?;
    let params = argon2::Params::try_from(&parsed).ok()?;
    let algorithm = argon2::Algorithm::try_from(parsed.algorithm).ok()?;
    let version = parsed.version.map(argon2::Version::try_from).transpose().ok()?.unwrap_or_default();
    let mut salt = [0u8; 64];
    let salt = parsed.salt?.decode_b64(&mut salt).ok()?;
    let expected = parsed.hash?;
    let mut out = vec![0u8; expected.len()];
    memory.resize(params.block_count(), argon2::Block::default());
    argon2::Argon2::new(algorithm, version, params)
        .hash_password_into_with_memory(password.as_bytes(), salt, &mut out, &mut memory[..])
        .ok()?;
    Some(out.ct_eq(expected.as_bytes()).into())
}

/// A password verification under way: `Ok(matches)`, or why it could not be done.
pub type PasswordCheck = std::pin::Pin<Box<dyn std::future::Future<Output = Result<bool, String>> + Send>>;

/// Port: where password hashes are verified. Verification costs milliseconds of CPU and megabytes of memory
/// (argon2), so the adapter decides where it runs and how many run at once; the core only awaits the answer.
pub trait PasswordVerifier: Send + Sync {
    fn verify(&self, digest: PasswordDigest, password: String) -> PasswordCheck;
}

/// 16 random bytes from the OS, as a PHC salt.
fn random_salt() -> Result<SaltString, String> {
    let mut bytes = [0u8; 16];
    aws_lc_rs::rand::SecureRandom::fill(&aws_lc_rs::rand::SystemRandom::new(), &mut bytes)
        .map_err(|_| "the OS random number generator failed".to_string())?;
    SaltString::encode_b64(&bytes).map_err(|e| format!("salt encoding failed: {e}"))
}

/// Hashes a password with argon2id and the OWASP-recommended defaults (m=19 MiB, t=2, p=1).
pub fn hash_password(password: &str) -> Result<String, String> {
    hash_password_with(password, argon2::Params::DEFAULT_M_COST, argon2::Params::DEFAULT_T_COST, 1)
}

/// Hashes a password with argon2id and explicit costs: memory in KiB, iterations, parallelism.
pub fn hash_password_with(password: &str, m_cost: u32, t_cost: u32, p_cost: u32) -> Result<String, String> {
    let params = argon2::Params::new(m_cost, t_cost, p_cost, None).map_err(|e| format!("invalid argon2 cost: {e}"))?;
    let salt = random_salt()?;
    argon2::Argon2::new(argon2::Algorithm::Argon2id, argon2::Version::V0x13, params)
        .hash_password(password.as_bytes(), &salt)
        .map(|h| h.to_string())
        .map_err(|e| format!("hashing failed: {e}"))
}

#[derive(Debug, Clone)]
pub struct User {
    pub digest: PasswordDigest,
    pub roles: Vec<String>,
}

#[derive(Debug)]
pub struct Application {
    /// `namespace/name` of the OAuthApplication, for logs.
    pub name: String,
    pub client_id: String,
    /// SHA-256 of each accepted client secret: compared in constant time whatever the secret's length.
    secret_digests: Vec<[u8; 32]>,
    pub grant_types: Vec<GrantType>,
    pub format: TokenFormat,
    pub access_ttl: u64,
    pub refresh_ttl: u64,
    /// The absolute lifetime of a login session (its chain of refresh tokens), however often it is refreshed.
    pub session_max: Option<u64>,
    /// Live token keys one user may hold; a new key past it evicts the least recently issued one.
    pub max_keys_per_user: usize,
    pub audience: Vec<String>,
    pub client_roles: Vec<String>,
    pub scopes: ScopePolicy,
    pub users: HashMap<String, User>,
    /// Signs new JWT access tokens.
    pub signer: Arc<SigningKey>,
    /// Every key whose tokens are still accepted (the signer, keys published ahead of use, retired keys).
    pub verification_keys: Vec<Arc<SigningKey>>,
    /// Makes and checks this application's opaque and refresh token strings.
    pub tokens: OpaqueTokens,
    /// Checked for unknown usernames: costs what checking the application's users costs (their most common
    /// hash kind and parameters), so response time does not tell which usernames exist.
    pub decoy: PasswordDigest,
    /// Identity providers whose JWTs are accepted as users (jwt-bearer and token-exchange grants).
    pub trusted_issuers: Vec<TrustedIssuer>,
}

fn sha256(data: &[u8]) -> [u8; 32] {
    let d = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, data);
    let mut out = [0u8; 32];
    out.copy_from_slice(d.as_ref());
    out
}

/// What an application is made of, before secrets are reduced to digests.
pub struct ApplicationConfig {
    pub name: String,
    pub client_id: String,
    pub client_secrets: Vec<String>,
    pub grant_types: Vec<GrantType>,
    pub format: TokenFormat,
    pub access_ttl: u64,
    pub refresh_ttl: u64,
    /// See [`Application::session_max`].
    pub session_max: Option<u64>,
    /// See [`Application::max_keys_per_user`].
    pub max_keys_per_user: usize,
    pub audience: Vec<String>,
    pub client_roles: Vec<String>,
    pub scopes: ScopePolicy,
    pub users: HashMap<String, User>,
    pub signer: Arc<SigningKey>,
    /// Keys besides `signer` whose tokens introspection still accepts.
    pub verification_keys: Vec<Arc<SigningKey>>,
    /// Secrets that tag opaque and refresh tokens, newest first (at least one): new tokens use the first,
    /// any of them is accepted, so adding a secret in front does not log anyone out.
    pub token_secrets: Vec<Vec<u8>>,
    /// See [`Application::trusted_issuers`].
    pub trusted_issuers: Vec<TrustedIssuer>,
}

impl Application {
    pub fn new(c: ApplicationConfig) -> Self {
        let audience = if c.audience.is_empty() { vec![c.client_id.clone()] } else { c.audience };
        let mut classes: HashMap<String, (usize, &PasswordDigest)> = HashMap::new();
        for u in c.users.values() {
            classes.entry(u.digest.cost_class()).or_insert((0, &u.digest)).0 += 1;
        }
        let decoy = classes
            .into_iter()
            // The most common class; ties broken by name, so every replica picks the same.
            .max_by(|a, b| a.1.0.cmp(&b.1.0).then_with(|| b.0.cmp(&a.0)))
            .map_or_else(|| PasswordDigest::decoy().clone(), |(_, (_, like))| PasswordDigest::decoy_like(like));
        Self {
            decoy,
            name: c.name,
            secret_digests: c.client_secrets.iter().map(|s| sha256(s.as_bytes())).collect(),
            client_id: c.client_id,
            grant_types: c.grant_types,
            format: c.format,
            access_ttl: c.access_ttl,
            refresh_ttl: c.refresh_ttl,
            session_max: c.session_max,
            max_keys_per_user: c.max_keys_per_user.max(1),
            audience,
            client_roles: c.client_roles,
            scopes: c.scopes,
            users: c.users,
            verification_keys: std::iter::once(c.signer.clone())
                .chain(c.verification_keys.into_iter().filter(|k| k.kid() != c.signer.kid()))
                .collect(),
            signer: c.signer,
            tokens: OpaqueTokens::new(&c.token_secrets),
            trusted_issuers: c.trusted_issuers,
        }
    }

    /// The key that signed a JWT with this header segment, if it is one of this application's keys.
    pub fn verification_key(&self, header_b64: &str) -> Option<&Arc<SigningKey>> {
        self.verification_keys.iter().find(|k| k.header_b64() == header_b64)
    }

    /// Constant-time: every accepted secret is compared, whatever matches.
    pub fn secret_matches(&self, secret: &str) -> bool {
        let candidate = sha256(secret.as_bytes());
        let mut ok = subtle::Choice::from(0);
        for d in &self.secret_digests {
            ok |= d.ct_eq(&candidate);
        }
        ok.into()
    }

    pub fn allows(&self, grant: GrantType) -> bool {
        self.grant_types.contains(&grant)
    }

    /// The trusted issuer named `iss`, if this application trusts it.
    pub fn trusted_issuer(&self, iss: &str) -> Option<&TrustedIssuer> {
        self.trusted_issuers.iter().find(|t| t.issuer == iss)
    }

    /// Whether a federated grant is enabled: a federated user's refresh needs one.
    pub fn allows_federated(&self) -> bool {
        self.grant_types.iter().any(|g| g.is_federated())
    }

    /// Refresh tokens are issued only to applications that may use them.
    pub fn issues_refresh_tokens(&self) -> bool {
        self.allows(GrantType::RefreshToken)
    }
}

/// All applications a server knows, by client ID.
#[derive(Debug, Default)]
pub struct Registry {
    by_client_id: HashMap<String, Arc<Application>>,
}

impl Registry {
    /// Fails when two applications share a client ID.
    pub fn new(apps: Vec<Application>) -> Result<Self, String> {
        Self::from_shared(apps.into_iter().map(Arc::new))
    }

    /// Like [`Registry::new`], for applications already shared (the sidecar rebuilds its registry from them).
    pub fn from_shared(apps: impl IntoIterator<Item = Arc<Application>>) -> Result<Self, String> {
        let mut by_client_id: HashMap<String, Arc<Application>> = HashMap::new();
        for app in apps {
            if let Some(other) = by_client_id.get(&app.client_id) {
                return Err(format!("applications {} and {} have the same client_id", other.name, app.name));
            }
            by_client_id.insert(app.client_id.clone(), app);
        }
        Ok(Self { by_client_id })
    }

    pub fn get(&self, client_id: &str) -> Option<&Arc<Application>> {
        self.by_client_id.get(client_id)
    }

    pub fn apps(&self) -> impl Iterator<Item = &Arc<Application>> {
        self.by_client_id.values()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn argon2_and_bcrypt_hashes_verify() {
        let mut memory = Vec::new();
        let argon = PasswordDigest::parse(&hash_password("s3cret").expect("hash")).expect("parse");
        assert!(argon.verify("s3cret", &mut memory));
        assert!(!argon.verify("wrong", &mut memory));
        // A hash made by another implementation's parameters (argon2i, small memory) verifies too.
        let other = argon2::Argon2::new(
            argon2::Algorithm::Argon2i,
            argon2::Version::V0x13,
            argon2::Params::new(64, 3, 1, Some(24)).expect("params"),
        )
        .hash_password(b"s3cret", &random_salt().expect("salt"))
        .expect("hash")
        .to_string();
        let other = PasswordDigest::parse(&other).expect("parse");
        assert!(other.verify("s3cret", &mut memory));
        assert!(!other.verify("s3cre", &mut memory));
        let bc = PasswordDigest::parse(&bcrypt::hash("s3cret", 4).expect("bcrypt")).expect("parse");
        assert!(bc.verify("s3cret", &mut memory));
        assert!(!bc.verify("wrong", &mut memory));
    }

    #[test]
    fn unsupported_or_malformed_hashes_are_rejected() {
        for bad in ["plaintext", "$argon2id$garbage", "$2b$04$short", "{SHA}abc"] {
            assert!(PasswordDigest::parse(bad).is_err(), "{bad}");
        }
    }
}

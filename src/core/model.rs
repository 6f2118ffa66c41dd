//! The token-state model.
//!
//! A **token key** is (client_id, subject, granted scope set). Each key has at most one **live pair**: an access
//! token and, when the application allows refresh, a refresh token. Issuing for a key replaces its pair (the
//! previous tokens are revoked); revoking either token of a pair removes the pair. A refresh token retired by
//! rotation is recognised by its generation ([`RefreshGrant::generation`]), so nothing is kept for it.
//!
//! Storage sees only [`Change`]s: compare-and-set of one key's pair, which is what both a local log and a
//! Kubernetes object with a `resourceVersion` can do atomically.

use std::fmt;
use std::sync::Arc;

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use serde::{Deserialize, Deserializer, Serialize, Serializer};

use super::clock::UnixTime;
use super::scope::ScopeSet;

/// 128 random bits naming one token. Opaque token strings and JWT `jti`s are derived from it.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub struct TokenId(pub [u8; 16]);

impl TokenId {
    /// A fresh id from the OS CSPRNG, which fails only if the OS has no randomness at all.
    pub fn random(rng: &dyn aws_lc_rs::rand::SecureRandom) -> Result<Self, aws_lc_rs::error::Unspecified> {
        let mut bytes = [0u8; 16];
        rng.fill(&mut bytes)?;
        Ok(Self(bytes))
    }

    pub fn to_b64(self) -> String {
        URL_SAFE_NO_PAD.encode(self.0)
    }

    pub fn from_b64(s: &str) -> Option<Self> {
        if s.len() != 22 {
            return None;
        }
        let bytes = URL_SAFE_NO_PAD.decode(s).ok()?;
        Some(Self(bytes.try_into().ok()?))
    }
}

// Token ids are credentials-adjacent: never print them in full.
impl fmt::Debug for TokenId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "TokenId({:02x}{:02x}…)", self.0[0], self.0[1])
    }
}

impl Serialize for TokenId {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.to_b64())
    }
}

impl<'de> Deserialize<'de> for TokenId {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = <std::borrow::Cow<'de, str>>::deserialize(d)?;
        Self::from_b64(&s).ok_or_else(|| serde::de::Error::custom("invalid token id"))
    }
}

/// Who a token is about.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub enum Subject {
    /// A resource owner (password grant).
    #[serde(rename = "u")]
    User(String),
    /// The client itself (client_credentials grant).
    #[serde(rename = "c")]
    Client,
    /// A user of a trusted identity provider (jwt-bearer and token-exchange grants): see [`FederatedUser`].
    #[serde(rename = "f")]
    Federated(FederatedUser),
}

/// A trusted issuer's user, held as `issuer` U+0001 `user`: one string, so that stores index it as they index a
/// username (the device cap), while a local user of the same name stays another subject. An issuer holds no control
/// character (the spec refuses one), so the first U+0001 separates the two.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(transparent)]
pub struct FederatedUser(String);

pub const FEDERATED_SEPARATOR: char = '\u{1}';

impl FederatedUser {
    pub fn new(issuer: &str, user: &str) -> Self {
        Self(format!("{issuer}{FEDERATED_SEPARATOR}{user}"))
    }

    /// Reads the stored form back; `None` if it is not one.
    pub fn from_stored(stored: &str) -> Option<Self> {
        stored.contains(FEDERATED_SEPARATOR).then(|| Self(stored.to_string()))
    }

    /// The stored form: what stores index the user by.
    pub fn stored(&self) -> &str {
        &self.0
    }

    pub fn issuer(&self) -> &str {
        self.0.split_once(FEDERATED_SEPARATOR).map_or("", |(issuer, _)| issuer)
    }

    /// The issuer's name for the user (its `usernameClaim`).
    pub fn user(&self) -> &str {
        self.0.split_once(FEDERATED_SEPARATOR).map_or(&self.0, |(_, user)| user)
    }
}

impl Subject {
    /// A user subject from its stored form (a store's user index): a federated user's holds U+0001, which no local
    /// username does (the users Secret refuses control characters).
    pub fn user_from_stored(stored: &str) -> Subject {
        match FederatedUser::from_stored(stored) {
            Some(f) => Subject::Federated(f),
            None => Subject::User(stored.to_string()),
        }
    }
}

/// (client_id, subject, granted scope set): the unit of "one live token".
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct TokenKey {
    #[serde(rename = "c")]
    pub client_id: String,
    #[serde(rename = "s")]
    pub subject: Subject,
    #[serde(rename = "sc")]
    pub scopes: ScopeSet,
}

impl TokenKey {
    /// The `sub` claim: the username (a federated user's name at its issuer), or the client ID for
    /// client_credentials.
    pub fn sub(&self) -> &str {
        match &self.subject {
            Subject::User(u) => u,
            Subject::Federated(f) => f.user(),
            Subject::Client => &self.client_id,
        }
    }

    /// The user as stores index users (for the device cap): a local username, or a federated user's stored form.
    pub fn username(&self) -> Option<&str> {
        match &self.subject {
            Subject::User(u) => Some(u),
            Subject::Federated(f) => Some(f.stored()),
            Subject::Client => None,
        }
    }

    /// The identity provider of a federated user's key.
    pub fn federated_issuer(&self) -> Option<&str> {
        match &self.subject {
            Subject::Federated(f) => Some(f.issuer()),
            _ => None,
        }
    }
}

pub type SharedKey = Arc<TokenKey>;

/// A login's refresh token: its id, generation, expiry and session start.
///
/// The id is drawn at login and kept by every rotation, which only counts `generation` up; the token string carries both
/// (tagged, so neither can be forged). A presented token of the key's current id but an older generation is one
/// rotated out of this login: reuse. So rotation keeps no state per retired token, however often a login refreshes,
/// and a later, independent login (a new id) is never revoked by its predecessor's tokens.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct RefreshGrant {
    pub id: TokenId,
    #[serde(rename = "exp")]
    pub expires_at: UnixTime,
    /// How many times this login's refresh token was rotated (0: the one issued at login).
    #[serde(rename = "g", default, skip_serializing_if = "is_zero")]
    pub generation: u32,
    /// When the login happened: the start of the session, for its absolute lifetime.
    #[serde(rename = "ss", default)]
    pub session_started_at: UnixTime,
}

fn is_zero(n: &u32) -> bool {
    *n == 0
}

/// The live tokens of one key.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LivePair {
    #[serde(rename = "a")]
    pub access_id: TokenId,
    /// The access token's scopes: the key's set, or a narrower one asked for at refresh.
    #[serde(rename = "sc")]
    pub access_scopes: ScopeSet,
    #[serde(rename = "iat")]
    pub issued_at: UnixTime,
    #[serde(rename = "exp")]
    pub access_expires_at: UnixTime,
    #[serde(rename = "r", default, skip_serializing_if = "Option::is_none")]
    pub refresh: Option<RefreshGrant>,
}

impl LivePair {
    pub fn access_active(&self, now: UnixTime) -> bool {
        now < self.access_expires_at
    }

    pub fn refresh_active(&self, now: UnixTime) -> bool {
        self.refresh.is_some_and(|r| now < r.expires_at)
    }

    /// After this instant nothing in the pair is usable and it can be forgotten.
    pub fn dead_after(&self) -> UnixTime {
        self.refresh.map_or(self.access_expires_at, |r| r.expires_at.max(self.access_expires_at))
    }
}

/// One atomic state change: set `key`'s pair to `next` if its current access token is `expect`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Change {
    pub key: TokenKey,
    /// The access token id of the pair this decision was based on; `None` when the key had no pair.
    pub expect: Option<TokenId>,
    /// The new pair, or `None` to revoke the key's tokens.
    pub next: Option<LivePair>,
}

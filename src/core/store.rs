//! The storage port. The core decides; a store makes one key's change atomic, durable and visible.
//!
//! Reads come from the store's current view, synchronously. A store whose view is not all in memory (a database
//! behind a bounded cache) fetches what a request will read in [`TokenStore::prepare`], which the core calls before
//! every read; stores that hold their whole view in memory (file log, ConfigMaps) need not do anything there. A
//! change is a compare-and-set on one key ([`Change::expect`]); `commit` resolves only once the change is durable, so
//! no token reaches a client before the revocation of its predecessor would survive a crash.

use std::future::Future;
use std::pin::Pin;
use std::sync::Mutex;

use super::clock::UnixTime;
use super::lockout::SharedFailure;
use super::model::{Change, LivePair, SharedKey, TokenId, TokenKey};
use super::state::{Conflict, TokenState};

pub type StoreFuture<'a, T> = Pin<Box<dyn Future<Output = Result<T, StoreError>> + Send + 'a>>;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StoreError {
    /// The key changed since the decision was made: decide again.
    #[error("concurrent change to the same token key")]
    Conflict,
    /// The change could not be made durable; nothing should be returned to the client.
    #[error("token storage unavailable: {0}")]
    Unavailable(String),
    /// The change would add a token key to a state at its capacity. Changes to existing keys still work.
    #[error("token state full: {0}")]
    Full(String),
}

impl From<Conflict> for StoreError {
    fn from(_: Conflict) -> Self {
        StoreError::Conflict
    }
}

/// What a request is about to read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Lookup<'a> {
    /// [`TokenStore::pair`] of this key.
    Key(&'a TokenKey),
    /// [`TokenStore::find_access`] of this id.
    Access(&'a TokenId),
    /// [`TokenStore::find_refresh`] of this id.
    Refresh(&'a TokenId),
    /// [`TokenStore::user_pairs`] of this user of this client.
    User { client_id: &'a str, username: &'a str },
}

pub trait TokenStore: Send + Sync {
    /// Makes what `lookup` names current in the view the read methods answer from (the core calls it before each
    /// read of a decision). Nothing to do for a store whose whole view is in memory.
    fn prepare<'a>(&'a self, lookup: Lookup<'a>) -> StoreFuture<'a, ()> {
        let _ = lookup;
        Box::pin(std::future::ready(Ok(())))
    }
    fn pair(&self, key: &TokenKey) -> Option<LivePair>;
    fn find_access(&self, id: &TokenId) -> Option<(SharedKey, LivePair)>;
    /// The key and pair whose refresh token has the id `id`, whatever its generation (the core compares them).
    fn find_refresh(&self, id: &TokenId) -> Option<(SharedKey, LivePair)>;
    /// The live keys and pairs of one user of one client (for the device cap).
    fn user_pairs(&self, client_id: &str, username: &str) -> Vec<(TokenKey, LivePair)>;
    /// Checks `change`'s expectation and applies it, visibly to reads, before returning; the future resolves when
    /// the change is durable (or reports the conflict or failure).
    fn commit(&self, change: Change) -> StoreFuture<'_, ()>;
    /// Resolves when everything visible to reads so far is durable (before handing out a token read, not written).
    fn sync(&self) -> StoreFuture<'_, ()>;
    /// Whether the store can currently accept changes.
    fn healthy(&self) -> bool {
        true
    }
    /// Whether a change becomes visible to reads only once it is committed (a database), rather than at once (the
    /// stores that hold their view in memory). Such a store gets this server's requests for one key one at a time,
    /// from read to commit: concurrent ones would all read the same pair and all but one meet a conflict.
    fn visible_when_committed(&self) -> bool {
        false
    }
    /// Records that `client_id` used the assertion `id` (a trusted issuer's JWT), remembered until `until`:
    /// `Ok(false)` when it was recorded already, a replay. A store that several servers share answers for all of them;
    /// by default a store records nothing (`Ok(true)`), and the core's own memory of this process decides.
    fn remember_assertion<'a>(&'a self, client_id: &'a str, id: &'a str, until: UnixTime) -> StoreFuture<'a, bool> {
        let _ = (client_id, id, until);
        Box::pin(std::future::ready(Ok(true)))
    }
    /// Forgets a use [`Self::remember_assertion`] recorded, whose grant then failed for a reason that is not the
    /// client's.
    fn forget_assertion<'a>(&'a self, client_id: &'a str, id: &'a str) -> StoreFuture<'a, ()> {
        let _ = (client_id, id);
        Box::pin(std::future::ready(Ok(())))
    }
    /// Shares a failed credential check with the other servers of this state (none by default).
    fn share_failure(&self, _failure: SharedFailure) {}
    /// Failed credential checks the other servers shared since the last call.
    fn take_shared_failures(&self) -> Vec<SharedFailure> {
        Vec::new()
    }
}

/// For tests: a store that changes part of another store's behaviour (failures, delays, counts) and passes the
/// rest through. Implement `inner` and override what differs; the blanket impl below makes it a [`TokenStore`].
#[cfg(test)]
pub(crate) trait StoreWrapper: Send + Sync {
    fn inner(&self) -> &dyn TokenStore;
    fn wrap_pair(&self, key: &TokenKey) -> Option<LivePair> {
        self.inner().pair(key)
    }
    fn wrap_commit(&self, change: Change) -> StoreFuture<'_, ()> {
        self.inner().commit(change)
    }
    fn wrap_sync(&self) -> StoreFuture<'_, ()> {
        self.inner().sync()
    }
    fn wrap_healthy(&self) -> bool {
        self.inner().healthy()
    }
    fn wrap_remember_assertion<'a>(&'a self, id: &'a str) -> StoreFuture<'a, bool> {
        self.inner().remember_assertion("", id, 0)
    }
}

#[cfg(test)]
impl<W: StoreWrapper> TokenStore for W {
    fn prepare<'a>(&'a self, lookup: Lookup<'a>) -> StoreFuture<'a, ()> {
        self.inner().prepare(lookup)
    }
    fn pair(&self, key: &TokenKey) -> Option<LivePair> {
        self.wrap_pair(key)
    }
    fn find_access(&self, id: &TokenId) -> Option<(SharedKey, LivePair)> {
        self.inner().find_access(id)
    }
    fn find_refresh(&self, id: &TokenId) -> Option<(SharedKey, LivePair)> {
        self.inner().find_refresh(id)
    }
    fn user_pairs(&self, client_id: &str, username: &str) -> Vec<(TokenKey, LivePair)> {
        self.inner().user_pairs(client_id, username)
    }
    fn commit(&self, change: Change) -> StoreFuture<'_, ()> {
        self.wrap_commit(change)
    }
    fn sync(&self) -> StoreFuture<'_, ()> {
        self.wrap_sync()
    }
    fn healthy(&self) -> bool {
        self.wrap_healthy()
    }
    fn visible_when_committed(&self) -> bool {
        self.inner().visible_when_committed()
    }
    fn remember_assertion<'a>(&'a self, _client_id: &'a str, id: &'a str, _until: UnixTime) -> StoreFuture<'a, bool> {
        self.wrap_remember_assertion(id)
    }
    fn forget_assertion<'a>(&'a self, client_id: &'a str, id: &'a str) -> StoreFuture<'a, ()> {
        self.inner().forget_assertion(client_id, id)
    }
    fn share_failure(&self, failure: SharedFailure) {
        self.inner().share_failure(failure)
    }
    fn take_shared_failures(&self) -> Vec<SharedFailure> {
        self.inner().take_shared_failures()
    }
}

/// A store with no durability: core tests and handler tests.
#[derive(Debug, Default)]
pub struct MemoryStore {
    state: Mutex<TokenState>,
}

impl MemoryStore {
    /// Runs `f` on the state under the lock (for stores that wrap this one in tests).
    pub fn with_state<T>(&self, f: impl FnOnce(&mut TokenState) -> T) -> T {
        self.with(f)
    }

    fn with<T>(&self, f: impl FnOnce(&mut TokenState) -> T) -> T {
        // A poisoned lock means a panic mid-update in a test; the state itself stays consistent per call.
        let mut guard = self.state.lock().unwrap_or_else(|p| p.into_inner());
        f(&mut guard)
    }
}

impl TokenStore for MemoryStore {
    fn pair(&self, key: &TokenKey) -> Option<LivePair> {
        self.with(|s| s.pair(key))
    }
    fn find_access(&self, id: &TokenId) -> Option<(SharedKey, LivePair)> {
        self.with(|s| s.find_access(id))
    }
    fn find_refresh(&self, id: &TokenId) -> Option<(SharedKey, LivePair)> {
        self.with(|s| s.find_refresh(id))
    }
    fn user_pairs(&self, client_id: &str, username: &str) -> Vec<(TokenKey, LivePair)> {
        self.with(|s| s.user_pairs(client_id, username))
    }
    fn commit(&self, change: Change) -> StoreFuture<'_, ()> {
        let result = self.with(|s| s.commit(change)).map_err(StoreError::from);
        Box::pin(async move { result })
    }
    fn sync(&self) -> StoreFuture<'_, ()> {
        Box::pin(async { Ok(()) })
    }
}

/// For tests: a store whose reads answer only what was prepared, as a store with a cold cache would, so that a
/// path of the core that reads without preparing finds nothing (and its test fails). A forgetful one also forgets
/// everything prepared at each commit and sync (strictest for sequential tests: a read after a write must prepare
/// again); the default one remembers (for concurrent tests, where another request's write must not unprepare).
#[cfg(test)]
#[derive(Debug, Default)]
pub struct ColdStore {
    pub inner: MemoryStore,
    prepared: Mutex<PreparedLookups>,
    forgetful: bool,
}

#[cfg(test)]
#[derive(Debug, Default)]
struct PreparedLookups {
    keys: std::collections::HashSet<TokenKey>,
    access: std::collections::HashSet<TokenId>,
    refresh: std::collections::HashSet<TokenId>,
    users: std::collections::HashSet<(String, String)>,
}

#[cfg(test)]
impl ColdStore {
    fn prepared<T>(&self, f: impl FnOnce(&PreparedLookups) -> T) -> T {
        f(&self.prepared.lock().unwrap_or_else(|p| p.into_inner()))
    }

    pub fn forgetful() -> Self {
        Self { forgetful: true, ..Self::default() }
    }

    pub fn with_state<T>(&self, f: impl FnOnce(&mut TokenState) -> T) -> T {
        self.inner.with_state(f)
    }

    fn forget(&self) {
        if self.forgetful {
            *self.prepared.lock().unwrap_or_else(|p| p.into_inner()) = PreparedLookups::default();
        }
    }
}

#[cfg(test)]
impl TokenStore for ColdStore {
    fn prepare<'a>(&'a self, lookup: Lookup<'a>) -> StoreFuture<'a, ()> {
        let mut p = self.prepared.lock().unwrap_or_else(|p| p.into_inner());
        match lookup {
            Lookup::Key(k) => p.keys.insert(k.clone()),
            Lookup::Access(id) => p.access.insert(*id),
            Lookup::Refresh(id) => p.refresh.insert(*id),
            Lookup::User { client_id, username } => p.users.insert((client_id.into(), username.into())),
        };
        Box::pin(std::future::ready(Ok(())))
    }
    fn pair(&self, key: &TokenKey) -> Option<LivePair> {
        self.prepared(|p| p.keys.contains(key)).then(|| self.inner.pair(key)).flatten()
    }
    fn find_access(&self, id: &TokenId) -> Option<(SharedKey, LivePair)> {
        self.prepared(|p| p.access.contains(id)).then(|| self.inner.find_access(id)).flatten()
    }
    fn find_refresh(&self, id: &TokenId) -> Option<(SharedKey, LivePair)> {
        self.prepared(|p| p.refresh.contains(id)).then(|| self.inner.find_refresh(id)).flatten()
    }
    fn user_pairs(&self, client_id: &str, username: &str) -> Vec<(TokenKey, LivePair)> {
        let prepared = self.prepared(|p| p.users.contains(&(client_id.to_string(), username.to_string())));
        if prepared { self.inner.user_pairs(client_id, username) } else { Vec::new() }
    }
    fn commit(&self, change: Change) -> StoreFuture<'_, ()> {
        self.forget();
        self.inner.commit(change)
    }
    fn sync(&self) -> StoreFuture<'_, ()> {
        self.forget();
        self.inner.sync()
    }
}

//! The token state in memory, with the compare-and-set rule every storage adapter enforces.
//!
//! Adapters differ in how they make changes durable and shared; they all keep one of these as their view.
//!
//! A sidecar may hold 100,000s of live keys, so the state is compact: about 150 bytes per key with an access and a
//! refresh token, where owned `TokenKey`s and `LivePair`s would take over 500.

use std::collections::HashMap;
use std::hash::{BuildHasher, Hash, RandomState};
use std::sync::Arc;

use hashbrown::HashTable;
use hashbrown::hash_table::Entry;
use serde::{Deserialize, Serialize};

use super::clock::UnixTime;
use super::lockout::SharedFailure;
use super::model::{Change, LivePair, RefreshGrant, SharedKey, Subject, TokenId, TokenKey};
use super::scope::ScopeSet;

/// A change was decided on a pair that is no longer current: decide again.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("the token key changed concurrently")]
pub struct Conflict;

/// One durable record. A log of these, replayed in order, rebuilds the state.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op")]
pub enum Record {
    /// Set a key's pair (or remove it). Records of earlier versions may carry `rot`, a refresh token retired by
    /// rotation that was remembered then; it is ignored (generations detect reuse now).
    #[serde(rename = "set")]
    Set {
        k: TokenKey,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        p: Option<LivePair>,
    },
    /// A retired refresh token that earlier versions remembered (in their snapshots): read and ignored.
    #[serde(rename = "rot")]
    LegacyRotated {},
    /// A failed credential check, shared with the other servers of the same state for brute-force lockout. Not
    /// token state: applying it changes nothing here.
    #[serde(rename = "fail")]
    Failed { f: SharedFailure },
    /// A trusted issuer's assertion used at one server (a digest of its replay id, and until when it must be refused),
    /// shared with the other servers of the same state. Not token state either.
    #[serde(rename = "used")]
    Used { d: [u8; 32], u: UnixTime },
}

impl From<Change> for Record {
    fn from(c: Change) -> Self {
        Record::Set { k: c.key, p: c.next }
    }
}

/// An interned value: a client ID, a username or a scope set.
type Id = u32;

/// The subject id of [`Subject::Client`] keys (usernames are interned from 0 up).
const CLIENT_SUBJECT: Id = Id::MAX;

/// Values shared by many keys, stored once under a small id. Ids are reference counted: once nothing holds one,
/// the value is forgotten and the id reused, so churn does not grow the interner.
#[derive(Debug)]
struct Interner<T: ?Sized> {
    ids: HashMap<Arc<T>, Id>,
    /// By id: the value and how many holders it has; `None` for free ids.
    values: Vec<Option<(Arc<T>, u32)>>,
    free: Vec<Id>,
}

impl<T: ?Sized> Default for Interner<T> {
    fn default() -> Self {
        Self { ids: HashMap::new(), values: Vec::new(), free: Vec::new() }
    }
}

impl<T: ?Sized + Hash + Eq> Interner<T> {
    fn get(&self, value: &T) -> Option<Id> {
        self.ids.get(value).copied()
    }

    fn resolve(&self, id: Id) -> Option<&T> {
        self.values.get(id as usize)?.as_ref().map(|(v, _)| &**v)
    }

    /// The id of `value`, with one more holder. `make` copies the value when it is new.
    fn acquire(&mut self, value: &T, make: impl FnOnce(&T) -> Arc<T>) -> Id {
        if let Some(id) = self.get(value) {
            self.retain(id);
            return id;
        }
        let shared = make(value);
        let id = match self.free.pop() {
            Some(id) => {
                if let Some(slot) = self.values.get_mut(id as usize) {
                    *slot = Some((shared.clone(), 1));
                }
                id
            }
            None => {
                self.values.push(Some((shared.clone(), 1)));
                (self.values.len() - 1) as Id
            }
        };
        self.ids.insert(shared, id);
        id
    }

    /// One more holder of `id`.
    fn retain(&mut self, id: Id) {
        if let Some(Some((_, holders))) = self.values.get_mut(id as usize) {
            *holders += 1;
        }
    }

    /// One holder fewer of `id`; the last one frees it.
    fn release(&mut self, id: Id) {
        let Some(slot) = self.values.get_mut(id as usize) else { return };
        match slot {
            Some((_, holders)) if *holders > 1 => *holders -= 1,
            Some(_) => {
                if let Some((value, _)) = slot.take() {
                    self.ids.remove(&*value);
                    self.free.push(id);
                }
            }
            None => {}
        }
    }

    /// A copy that can resolve ids but not look values up (all a snapshot needs): no hashing to copy it.
    fn resolver(&self) -> Self {
        Self { ids: HashMap::new(), values: self.values.clone(), free: Vec::new() }
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.ids.len()
    }
}

/// A [`TokenKey`] as interned ids.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
struct Key {
    client: Id,
    /// A username's id, or [`CLIENT_SUBJECT`].
    subject: Id,
    scopes: Id,
}

/// A key's live pair (80 bytes). `Copy`, so that a snapshot copy of the slab is one memory copy.
#[derive(Debug, Clone, Copy)]
struct Live {
    key: Key,
    /// Usually the key's own scope set; a narrower one after a refresh that asked for less.
    access_scopes: Id,
    access_id: TokenId,
    issued_at: UnixTime,
    access_expires_at: UnixTime,
    refresh: Option<RefreshGrant>,
}

impl Live {
    /// As [`LivePair::dead_after`].
    fn dead_after(&self) -> UnixTime {
        self.refresh.map_or(self.access_expires_at, |r| r.expires_at.max(self.access_expires_at))
    }
}

/// Values in a `Vec`, addressed by index; freed indexes are reused.
#[derive(Debug, Clone)]
struct Slab<T> {
    slots: Vec<Option<T>>,
    free: Vec<u32>,
}

impl<T> Default for Slab<T> {
    fn default() -> Self {
        Self { slots: Vec::new(), free: Vec::new() }
    }
}

impl<T> Slab<T> {
    fn insert(&mut self, value: T) -> u32 {
        if let Some(i) = self.free.pop()
            && let Some(slot) = self.slots.get_mut(i as usize)
        {
            *slot = Some(value);
            return i;
        }
        self.slots.push(Some(value));
        (self.slots.len() - 1) as u32
    }

    fn remove(&mut self, i: u32) -> Option<T> {
        let value = self.slots.get_mut(i as usize)?.take()?;
        self.free.push(i);
        Some(value)
    }

    fn get(&self, i: u32) -> Option<&T> {
        self.slots.get(i as usize)?.as_ref()
    }

    fn len(&self) -> usize {
        self.slots.len() - self.free.len()
    }

    fn iter(&self) -> impl Iterator<Item = (u32, &T)> {
        self.slots.iter().enumerate().filter_map(|(i, v)| Some((i as u32, v.as_ref()?)))
    }
}

/// A hash index of slab slots (4 bytes each, where a map would also hold a copy of the key). An entry's key is
/// read from the slabs by `name`; each key has at most one entry.
#[derive(Debug)]
struct Index<V>(HashTable<V>);

impl<V> Default for Index<V> {
    fn default() -> Self {
        Self(HashTable::new())
    }
}

impl<V: Copy> Index<V> {
    fn get<K: Hash + Eq>(&self, hasher: &RandomState, key: &K, name: impl Fn(V) -> Option<K>) -> Option<V> {
        self.0.find(hasher.hash_one(key), |&v| name(v).as_ref() == Some(key)).copied()
    }

    /// Points `key` at `value`; returns what it pointed at before.
    fn insert<K: Hash + Eq>(
        &mut self,
        hasher: &RandomState,
        key: &K,
        value: V,
        name: impl Fn(V) -> Option<K>,
    ) -> Option<V> {
        let eq = |&v: &V| name(v).as_ref() == Some(key);
        // Every entry names a used slot (entries go before their slot does), so the fallback hash is never used.
        let rehash = |&v: &V| name(v).map_or(0, |k| hasher.hash_one(&k));
        match self.0.entry(hasher.hash_one(key), eq, rehash) {
            Entry::Occupied(mut e) => Some(std::mem::replace(e.get_mut(), value)),
            Entry::Vacant(e) => {
                e.insert(value);
                None
            }
        }
    }

    fn remove<K: Hash + Eq>(&mut self, hasher: &RandomState, key: &K, name: impl Fn(V) -> Option<K>) -> Option<V> {
        let found = self.0.find_entry(hasher.hash_one(key), |&v| name(v).as_ref() == Some(key)).ok()?;
        Some(found.remove().0)
    }

    #[cfg(test)]
    fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

/// The token state. Compact: a sidecar may hold 100,000s of keys. Client IDs, usernames and scope sets are interned;
/// live pairs sit in a slab, indexed by key, access token id and refresh token id; the keys and pairs handed out are
/// rebuilt from these.
#[derive(Debug, Default)]
pub struct TokenState {
    clients: Interner<str>,
    users: Interner<str>,
    scope_sets: Interner<ScopeSet>,
    live: Slab<Live>,
    hasher: RandomState,
    /// Live slots by key.
    by_key: Index<u32>,
    /// Live slots by access token id.
    access: Index<u32>,
    /// Live slots by refresh token id.
    refresh: Index<u32>,
    /// Live slots of each (client, user): the device cap counts and evicts from these.
    by_user: std::collections::HashMap<(Id, Id), Vec<u32>>,
}

/// The entries of a [`TokenState`] at one moment, without its indexes: only good for encoding a snapshot.
#[derive(Debug)]
pub struct SnapshotCopy(TokenState);

impl SnapshotCopy {
    /// The same records as [`TokenState::snapshot`] of the state copied.
    pub fn records(&self) -> impl Iterator<Item = Record> + '_ {
        self.0.snapshot()
    }

    pub fn entries(&self) -> usize {
        self.0.entries()
    }
}

/// The names of the indexes' entries.
fn key_of(live: &Slab<Live>) -> impl Fn(u32) -> Option<Key> + '_ {
    |slot| live.get(slot).map(|l| l.key)
}

fn access_of(live: &Slab<Live>) -> impl Fn(u32) -> Option<TokenId> + '_ {
    |slot| live.get(slot).map(|l| l.access_id)
}

fn refresh_of(live: &Slab<Live>) -> impl Fn(u32) -> Option<TokenId> + '_ {
    |slot| live.get(slot)?.refresh.map(|r| r.id)
}

impl TokenState {
    pub fn pair(&self, key: &TokenKey) -> Option<LivePair> {
        self.live_pair(self.live.get(self.slot_of(key)?)?)
    }

    /// The key and pair whose current access token is `id`.
    pub fn find_access(&self, id: &TokenId) -> Option<(SharedKey, LivePair)> {
        let live = self.live.get(self.access.get(&self.hasher, id, access_of(&self.live))?)?;
        if live.access_id != *id {
            return None;
        }
        Some((Arc::new(self.token_key(live.key)?), self.live_pair(live)?))
    }

    /// The key and pair whose refresh token has the id `id` (of whatever generation: the caller compares).
    pub fn find_refresh(&self, id: &TokenId) -> Option<(SharedKey, LivePair)> {
        let live = self.live.get(self.refresh.get(&self.hasher, id, refresh_of(&self.live))?)?;
        if live.refresh.map(|r| r.id) != Some(*id) {
            return None;
        }
        Some((Arc::new(self.token_key(live.key)?), self.live_pair(live)?))
    }

    /// Whether `change` was decided on the current pair of its key.
    pub fn check(&self, change: &Change) -> Result<(), Conflict> {
        let current = self.slot_of(&change.key).and_then(|s| self.live.get(s)).map(|l| l.access_id);
        if current == change.expect { Ok(()) } else { Err(Conflict) }
    }

    /// Applies a checked change (or a replayed record).
    pub fn apply(&mut self, record: Record) {
        match record {
            Record::Set { k, p } => {
                // The new holders first, so that ids shared with the old pair are kept rather than freed and
                // interned again.
                let next = p.map(|p| {
                    let key = self.acquire_key(&k);
                    let access_scopes = if p.access_scopes == k.scopes {
                        self.scope_sets.retain(key.scopes);
                        key.scopes
                    } else {
                        self.scope_sets.acquire(&p.access_scopes, |s| Arc::new(s.clone()))
                    };
                    Live {
                        key,
                        access_scopes,
                        access_id: p.access_id,
                        issued_at: p.issued_at,
                        access_expires_at: p.access_expires_at,
                        refresh: p.refresh,
                    }
                });
                if let Some(old) = self.slot_of(&k) {
                    self.remove_live(old);
                }
                if let Some(live) = next {
                    self.insert_live(live);
                }
            }
            Record::LegacyRotated {} | Record::Failed { .. } | Record::Used { .. } => {}
        }
    }

    /// Checks and applies in one step.
    pub fn commit(&mut self, change: Change) -> Result<(), Conflict> {
        self.check(&change)?;
        self.apply(change.into());
        Ok(())
    }

    /// Forgets everything that can no longer be used at `now`. Returns how many entries went.
    pub fn prune(&mut self, now: UnixTime) -> usize {
        let before = self.entries();
        let dead: Vec<u32> = self.live.iter().filter(|(_, l)| l.dead_after() <= now).map(|(i, _)| i).collect();
        for slot in dead {
            self.remove_live(slot);
        }
        before - self.entries()
    }

    /// A copy of what [`Self::snapshot`] reads (the entries and the interned values, not the indexes), so that a
    /// store can take it under its lock and encode it after letting go: a memory copy of the entries, where
    /// encoding them costs far more.
    pub fn snapshot_copy(&self) -> SnapshotCopy {
        SnapshotCopy(TokenState {
            clients: self.clients.resolver(),
            users: self.users.resolver(),
            scope_sets: self.scope_sets.resolver(),
            live: self.live.clone(),
            ..TokenState::default()
        })
    }

    /// Records that rebuild this state: one per live pair.
    pub fn snapshot(&self) -> impl Iterator<Item = Record> + '_ {
        self.live
            .iter()
            .filter_map(|(_, live)| Some(Record::Set { k: self.token_key(live.key)?, p: Some(self.live_pair(live)?) }))
    }

    /// The live keys and pairs of one user of one client.
    pub fn user_pairs(&self, client_id: &str, username: &str) -> Vec<(TokenKey, LivePair)> {
        let (Some(client), Some(user)) = (self.clients.get(client_id), self.users.get(username)) else {
            return Vec::new();
        };
        let slots = self.by_user.get(&(client, user)).map_or(&[][..], Vec::as_slice);
        slots
            .iter()
            .filter_map(|slot| {
                let live = self.live.get(*slot)?;
                Some((self.token_key(live.key)?, self.live_pair(live)?))
            })
            .collect()
    }

    /// Live pairs: one per live key (rotation adds none).
    pub fn entries(&self) -> usize {
        self.live.len()
    }

    /// The live slot of `key`, if it has a pair.
    fn slot_of(&self, key: &TokenKey) -> Option<u32> {
        let subject = match key.username() {
            Some(u) => self.users.get(u)?,
            None => CLIENT_SUBJECT,
        };
        let key = Key { client: self.clients.get(&key.client_id)?, subject, scopes: self.scope_sets.get(&key.scopes)? };
        self.by_key.get(&self.hasher, &key, key_of(&self.live))
    }

    fn token_key(&self, key: Key) -> Option<TokenKey> {
        let subject = match key.subject {
            CLIENT_SUBJECT => Subject::Client,
            user => Subject::user_from_stored(self.users.resolve(user)?),
        };
        Some(TokenKey {
            client_id: self.clients.resolve(key.client)?.to_owned(),
            subject,
            scopes: self.scope_sets.resolve(key.scopes)?.clone(),
        })
    }

    fn live_pair(&self, live: &Live) -> Option<LivePair> {
        Some(LivePair {
            access_id: live.access_id,
            access_scopes: self.scope_sets.resolve(live.access_scopes)?.clone(),
            issued_at: live.issued_at,
            access_expires_at: live.access_expires_at,
            refresh: live.refresh,
        })
    }

    /// Interns `key`, with one more holder of each of its ids.
    fn acquire_key(&mut self, key: &TokenKey) -> Key {
        let subject = match key.username() {
            Some(u) => self.users.acquire(u, |s| Arc::from(s)),
            None => CLIENT_SUBJECT,
        };
        Key {
            client: self.clients.acquire(&key.client_id, |s| Arc::from(s)),
            subject,
            scopes: self.scope_sets.acquire(&key.scopes, |s| Arc::new(s.clone())),
        }
    }

    fn release_key(&mut self, key: Key) {
        self.clients.release(key.client);
        if key.subject != CLIENT_SUBJECT {
            self.users.release(key.subject);
        }
        self.scope_sets.release(key.scopes);
    }

    fn insert_live(&mut self, live: Live) {
        let (key, access_id, refresh) = (live.key, live.access_id, live.refresh);
        let slot = self.live.insert(live);
        if key.subject != CLIENT_SUBJECT {
            self.by_user.entry((key.client, key.subject)).or_default().push(slot);
        }
        self.by_key.insert(&self.hasher, &key, slot, key_of(&self.live));
        self.access.insert(&self.hasher, &access_id, slot, access_of(&self.live));
        if let Some(r) = refresh {
            self.refresh.insert(&self.hasher, &r.id, slot, refresh_of(&self.live));
        }
    }

    /// Removes a live pair: its key no longer has one and its tokens are unknown.
    fn remove_live(&mut self, slot: u32) {
        // Out of the indexes first: they read their keys from the slot.
        let Some(live) = self.live.get(slot).cloned() else { return };
        if let std::collections::hash_map::Entry::Occupied(mut e) =
            self.by_user.entry((live.key.client, live.key.subject))
        {
            e.get_mut().retain(|s| *s != slot);
            if e.get().is_empty() {
                e.remove();
            }
        }
        self.by_key.remove(&self.hasher, &live.key, key_of(&self.live));
        self.access.remove(&self.hasher, &live.access_id, access_of(&self.live));
        if let Some(r) = live.refresh {
            self.refresh.remove(&self.hasher, &r.id, refresh_of(&self.live));
        }
        self.live.remove(slot);
        self.release_key(live.key);
        self.scope_sets.release(live.access_scopes);
    }

    /// How many client IDs, usernames and scope sets are interned.
    #[cfg(test)]
    fn interned(&self) -> [usize; 3] {
        [self.clients.len(), self.users.len(), self.scope_sets.len()]
    }

    /// Slots of the slab, used or free: it grows only to the most ever held at once.
    #[cfg(test)]
    fn slots(&self) -> usize {
        self.live.slots.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(device: &str) -> TokenKey {
        TokenKey {
            client_id: "shop".into(),
            subject: Subject::User("alice".into()),
            scopes: ScopeSet::parse(device).expect("scope"),
        }
    }

    fn pair(n: u8, exp: UnixTime) -> LivePair {
        LivePair {
            access_id: TokenId([n; 16]),
            access_scopes: ScopeSet::default(),
            issued_at: 0,
            access_expires_at: exp,
            refresh: Some(RefreshGrant { id: TokenId([n + 100; 16]), expires_at: exp * 2, ..Default::default() }),
        }
    }

    fn set(k: TokenKey, expect: Option<u8>, next: Option<LivePair>) -> Change {
        Change { key: k, expect: expect.map(|n| TokenId([n; 16])), next }
    }

    #[test]
    fn replacing_a_pair_revokes_its_tokens_and_other_keys_are_untouched() {
        let mut s = TokenState::default();
        s.commit(set(key("device_ipad"), None, Some(pair(1, 10)))).expect("first");
        s.commit(set(key("device_iphone"), None, Some(pair(2, 10)))).expect("other device");
        s.commit(set(key("device_ipad"), Some(1), Some(pair(3, 10)))).expect("supersede");
        assert!(s.find_access(&TokenId([1; 16])).is_none());
        assert_eq!(s.find_refresh(&TokenId([101; 16])), None);
        assert!(s.find_access(&TokenId([2; 16])).is_some());
        assert!(s.find_access(&TokenId([3; 16])).is_some());
    }

    #[test]
    fn stale_expectations_conflict_and_change_nothing() {
        let mut s = TokenState::default();
        s.commit(set(key("device_ipad"), None, Some(pair(1, 10)))).expect("first");
        assert_eq!(s.commit(set(key("device_ipad"), None, Some(pair(2, 10)))), Err(Conflict));
        assert_eq!(s.commit(set(key("device_ipad"), Some(9), None)), Err(Conflict));
        assert!(s.find_access(&TokenId([1; 16])).is_some());
        assert!(s.find_access(&TokenId([2; 16])).is_none());
    }

    /// A pair rotated with the same refresh id and the next generation.
    fn rotated(p: &LivePair, access: u8) -> LivePair {
        let r = p.refresh.expect("refresh");
        LivePair {
            access_id: TokenId([access; 16]),
            refresh: Some(RefreshGrant { generation: r.generation + 1, ..r }),
            ..p.clone()
        }
    }

    #[test]
    fn rotation_keeps_one_entry_per_key_and_the_refresh_id_names_the_current_generation() {
        let mut s = TokenState::default();
        let mut current = pair(1, 10);
        s.commit(set(key("a"), None, Some(current.clone()))).expect("first");
        for n in 2..52u8 {
            let next = rotated(&current, n);
            s.commit(set(key("a"), Some(current.access_id.0[0]), Some(next.clone()))).expect("rotate");
            current = next;
        }
        assert_eq!(s.entries(), 1, "fifty rotations leave one entry");
        let (_, found) = s.find_refresh(&TokenId([101; 16])).expect("the login's refresh id");
        assert_eq!(found.refresh.map(|r| r.generation), Some(50));
        assert_eq!(s.prune(19), 0);
        assert_eq!(s.prune(20), 1);
        assert_eq!(s.entries(), 0);
        assert_eq!(s.find_refresh(&TokenId([101; 16])), None);
    }

    #[test]
    fn snapshot_replay_rebuilds_the_same_state() {
        let mut s = TokenState::default();
        s.commit(set(key("a"), None, Some(pair(1, 10)))).expect("a");
        s.commit(set(key("a"), Some(1), Some(rotated(&pair(1, 10), 2)))).expect("rotate");
        s.commit(set(key("b"), None, Some(pair(3, 10)))).expect("b");
        let mut copy = TokenState::default();
        for r in s.snapshot() {
            let line = serde_json::to_string(&r).expect("encode");
            copy.apply(serde_json::from_str(&line).expect("decode"));
        }
        for id in [2u8, 3] {
            assert_eq!(copy.find_access(&TokenId([id; 16])), s.find_access(&TokenId([id; 16])));
        }
        assert_eq!(copy.find_refresh(&TokenId([101; 16])), s.find_refresh(&TokenId([101; 16])));
        assert_eq!(copy.find_refresh(&TokenId([101; 16])).and_then(|(_, p)| p.refresh).map(|r| r.generation), Some(1));
        assert_eq!(copy.entries(), s.entries());
    }

    /// Logs and snapshots written before generations replaced remembered rotated tokens still load: their `rot`
    /// parts are read and ignored.
    #[test]
    fn records_of_earlier_versions_load_without_their_rotated_tokens() {
        let mut s = TokenState::default();
        let lines = [
            r#"{"op":"set","k":{"c":"shop","s":{"u":"alice"},"sc":["device_a"]},"p":{"a":"AQEBAQEBAQEBAQEBAQEBAQ","sc":["device_a"],"iat":0,"exp":10,"r":{"id":"ZWVlZWVlZWVlZWVlZWVlZQ","exp":20,"ch":7,"ss":0}},"rot":{"id":"ZGRkZGRkZGRkZGRkZGRkZA","exp":20,"ch":7,"ss":0}}"#,
            r#"{"op":"rot","k":{"c":"shop","s":{"u":"bob"},"sc":[]},"rot":{"id":"Y2NjY2NjY2NjY2NjY2NjYw","exp":20,"ch":1,"ss":0}}"#,
        ];
        for line in lines {
            s.apply(serde_json::from_str(line).expect(line));
        }
        assert_eq!(s.entries(), 1);
        let (_, p) = s.find_refresh(&TokenId([0x65; 16])).expect("the live refresh token");
        assert_eq!(p.refresh.map(|r| r.generation), Some(0));
        assert_eq!(s.interned(), [1, 1, 1], "nothing kept for the ignored rotated tokens");
    }

    fn user_key(client: &str, user: &str, scopes: &str) -> TokenKey {
        TokenKey {
            client_id: client.into(),
            subject: Subject::User(user.into()),
            scopes: ScopeSet::parse(scopes).expect("scope"),
        }
    }

    fn id(n: u32, tag: u8) -> TokenId {
        let mut raw = [tag; 16];
        raw[..4].copy_from_slice(&n.to_le_bytes());
        TokenId(raw)
    }

    fn numbered_pair(n: u32, scopes: &ScopeSet) -> LivePair {
        LivePair {
            access_id: id(n, 0),
            access_scopes: scopes.clone(),
            issued_at: 1,
            access_expires_at: 10,
            refresh: Some(RefreshGrant { id: id(n, 1), expires_at: 100, ..Default::default() }),
        }
    }

    /// Every record of a snapshot, in a fixed order.
    fn sorted_snapshot(s: &TokenState) -> Vec<String> {
        let mut lines: Vec<String> = s.snapshot().map(|r| serde_json::to_string(&r).expect("encode")).collect();
        lines.sort();
        lines
    }

    #[test]
    fn a_users_pairs_are_listed_and_the_list_goes_with_the_last_of_them() {
        let mut s = TokenState::default();
        s.commit(set(key("device_ipad"), None, Some(pair(1, 10)))).expect("ipad");
        s.commit(set(key("device_iphone"), None, Some(pair(2, 10)))).expect("iphone");
        let client_key =
            TokenKey { client_id: "shop".into(), subject: Subject::Client, scopes: ScopeSet::parse("x").expect("s") };
        s.commit(set(client_key, None, Some(pair(3, 10)))).expect("client");
        let mut listed: Vec<String> =
            s.user_pairs("shop", "alice").into_iter().map(|(k, _)| k.scopes.to_string()).collect();
        listed.sort();
        assert_eq!(listed, ["device_ipad", "device_iphone"]);
        assert!(s.user_pairs("shop", "bob").is_empty() && s.user_pairs("other", "alice").is_empty());
        s.commit(set(key("device_ipad"), Some(1), None)).expect("revoke");
        assert_eq!(s.user_pairs("shop", "alice").len(), 1);
        assert_eq!(s.prune(100), 2);
        assert!(s.user_pairs("shop", "alice").is_empty());
        assert!(s.by_user.is_empty(), "no empty lists are kept");
    }

    #[test]
    fn a_live_pair_takes_96_bytes() {
        assert!(std::mem::size_of::<Option<Live>>() <= 96, "{}", std::mem::size_of::<Option<Live>>());
        assert_eq!(std::mem::size_of::<Key>(), 12);
    }

    #[test]
    fn interned_ids_are_freed_when_keys_are_revoked_or_pruned() {
        const USERS: u32 = 10_000;
        let mut s = TokenState::default();
        for round in 0..3 {
            for n in 0..USERS {
                let k = user_key("shop", &format!("user{n}"), "device_a orders:read");
                let first = numbered_pair(n, &k.scopes);
                s.commit(set(k.clone(), None, Some(first.clone()))).expect("issue");
                // Rotate once: the same refresh id, the next generation.
                let next = LivePair {
                    access_id: id(n, 2),
                    refresh: first.refresh.map(|r| RefreshGrant { generation: 1, ..r }),
                    ..first.clone()
                };
                s.commit(Change { key: k, expect: Some(first.access_id), next: Some(next) }).expect("rotate");
            }
            assert_eq!(s.entries(), USERS as usize);
            assert_eq!(s.interned(), [1, USERS as usize, 1]);
            if round == 1 {
                // Expired: the pairs all go at once.
                assert_eq!(s.prune(100), USERS as usize);
            } else {
                for n in 0..USERS {
                    let k = user_key("shop", &format!("user{n}"), "device_a orders:read");
                    s.commit(Change { key: k, expect: Some(id(n, 2)), next: None }).expect("revoke");
                }
                assert_eq!(s.find_refresh(&id(7, 1)), None);
            }
            assert_eq!(s.entries(), 0);
            assert_eq!(s.interned(), [0, 0, 0], "round {round}");
            assert!(s.by_key.is_empty() && s.access.is_empty() && s.refresh.is_empty());
            // Slots are reused: the slab never holds more than the most live at once.
            assert_eq!(s.slots(), USERS as usize);
        }
    }

    #[test]
    fn a_narrowed_access_scope_set_round_trips() {
        let mut s = TokenState::default();
        let k = user_key("shop", "alice", "device_a orders:read orders:write");
        let narrow = ScopeSet::parse("orders:read").expect("scope");
        let p = LivePair { access_scopes: narrow.clone(), ..numbered_pair(1, &k.scopes) };
        s.commit(set(k.clone(), None, Some(p.clone()))).expect("issue");
        assert_eq!(s.pair(&k), Some(p.clone()));
        assert_eq!(s.find_access(&id(1, 0)), Some((Arc::new(k.clone()), p.clone())));
        assert_eq!(s.find_refresh(&id(1, 1)), Some((Arc::new(k.clone()), p.clone())));
        assert_eq!(s.interned(), [1, 1, 2]);
        // The narrowed set is also another key's own set: shared, and kept while either holds it.
        let other = user_key("shop", "alice", "orders:read");
        s.commit(set(other.clone(), None, Some(numbered_pair(2, &other.scopes)))).expect("other");
        assert_eq!(s.interned(), [1, 1, 2]);
        let mut copy = TokenState::default();
        for r in s.snapshot() {
            let line = serde_json::to_string(&r).expect("encode");
            copy.apply(serde_json::from_str(&line).expect("decode"));
        }
        assert_eq!(copy.pair(&k), Some(p));
        assert_eq!(copy.find_access(&id(1, 0)), s.find_access(&id(1, 0)));
        s.commit(Change { key: k, expect: Some(id(1, 0)), next: None }).expect("revoke");
        assert_eq!(s.interned(), [1, 1, 1]);
        assert_eq!(s.pair(&other).map(|p| p.access_scopes), Some(narrow));
        s.commit(Change { key: other, expect: Some(id(2, 0)), next: None }).expect("revoke other");
        assert_eq!(s.interned(), [0, 0, 0]);
    }

    #[test]
    fn client_keys_are_not_user_keys_named_like_the_client() {
        let mut s = TokenState::default();
        let client = TokenKey { client_id: "shop".into(), subject: Subject::Client, scopes: ScopeSet::default() };
        let user = user_key("shop", "shop", "");
        s.commit(set(client.clone(), None, Some(numbered_pair(1, &client.scopes)))).expect("client");
        assert_eq!(s.pair(&user), None);
        s.commit(set(user.clone(), None, Some(numbered_pair(2, &user.scopes)))).expect("user");
        assert_eq!(s.find_access(&id(1, 0)).map(|(k, _)| k), Some(Arc::new(client.clone())));
        assert_eq!(s.find_access(&id(2, 0)).map(|(k, _)| k), Some(Arc::new(user.clone())));
        assert_eq!(s.interned(), [1, 1, 1]);
        s.commit(Change { key: user, expect: Some(id(2, 0)), next: None }).expect("revoke user");
        assert_eq!(s.interned(), [1, 0, 1]);
        assert_eq!(s.pair(&client), Some(numbered_pair(1, &client.scopes)));
        s.commit(Change { key: client, expect: Some(id(1, 0)), next: None }).expect("revoke");
        assert_eq!(s.interned(), [0, 0, 0]);
    }

    /// A store encodes the copy while the state moves on: later changes (ids freed and reused, slots reused)
    /// must not show through.
    #[test]
    fn a_snapshot_copy_keeps_the_moment_it_was_taken() {
        let mut s = TokenState::default();
        let issue = |s: &mut TokenState, key: TokenKey, n: u32| {
            let next = Some(numbered_pair(n, &ScopeSet::default()));
            s.commit(Change { key, expect: None, next }).expect("commit");
        };
        for n in 0..20u32 {
            issue(&mut s, user_key("app", &format!("u{n}"), &format!("device_d{n}")), n);
        }
        let before = sorted_snapshot(&s);
        let copy = s.snapshot_copy();
        for n in 0..20u32 {
            let k = user_key("app", &format!("u{n}"), &format!("device_d{n}"));
            s.commit(Change { key: k, expect: Some(id(n, 0)), next: None }).expect("revoke");
        }
        for n in 100..120u32 {
            issue(&mut s, user_key("other", &format!("v{n}"), "read"), n);
        }
        let mut copied: Vec<String> = copy.records().map(|r| serde_json::to_string(&r).expect("encode")).collect();
        copied.sort();
        assert_eq!(copied, before);
        assert_eq!(copy.entries(), 20);
        assert_ne!(sorted_snapshot(&s), before, "the state itself moved on");
    }

    #[test]
    fn snapshot_replay_rebuilds_a_mixed_state() {
        let mut s = TokenState::default();
        let mut ids = Vec::new();
        for n in 0..40u32 {
            let client = format!("app{}", n % 3);
            let k = match n % 4 {
                0 => TokenKey { client_id: client, subject: Subject::Client, scopes: ScopeSet::default() },
                _ => user_key(&client, &format!("u{}", n % 7), &format!("d{} read", n % 5)),
            };
            let current = s.pair(&k);
            let mut p = numbered_pair(n, &k.scopes);
            if n % 5 == 0 {
                p.refresh = None;
            }
            if n % 6 == 1 {
                p.access_scopes = ScopeSet::parse("read").expect("scope");
            }
            // Every other change a rotation: the current refresh id, one generation on.
            if n % 2 == 0
                && let (Some(old), Some(r)) = (current.as_ref().and_then(|p| p.refresh), p.refresh.as_mut())
            {
                *r = RefreshGrant { generation: old.generation + 1, ..old };
            }
            let expect = current.map(|p| p.access_id);
            s.commit(Change { key: k, expect, next: Some(p) }).expect("commit");
            ids.extend([id(n, 0), id(n, 1)]);
        }
        assert!(
            s.snapshot().any(
                |r| matches!(r, Record::Set { p: Some(LivePair { refresh: Some(r), .. }), .. } if r.generation > 0)
            )
        );
        let mut copy = TokenState::default();
        for r in s.snapshot() {
            let line = serde_json::to_string(&r).expect("encode");
            copy.apply(serde_json::from_str(&line).expect("decode"));
        }
        assert_eq!(sorted_snapshot(&copy), sorted_snapshot(&s));
        assert_eq!(copy.entries(), s.entries());
        assert_eq!(copy.interned(), s.interned());
        for id in &ids {
            assert_eq!(copy.find_access(id), s.find_access(id));
            assert_eq!(copy.find_refresh(id), s.find_refresh(id));
        }
    }

    fn rss_bytes() -> usize {
        let status = std::fs::read_to_string("/proc/self/status").expect("status");
        let line = status.lines().find(|l| l.starts_with("VmRSS:")).expect("VmRSS");
        line.split_whitespace().nth(1).and_then(|kb| kb.parse::<usize>().ok()).expect("kB") * 1024
    }

    /// Memory per live key, shaped like the sidecar benchmark's restart (one client, five devices per user, access +
    /// refresh token). Run in release: `cargo test --release --lib core::state::tests::memory_per_key -- --ignored
    /// --nocapture`.
    #[test]
    #[ignore = "measures process RSS: run alone"]
    #[cfg(target_os = "linux")]
    fn memory_per_key() {
        const KEYS: u32 = 100_000;
        let before = rss_bytes();
        let mut s = TokenState::default();
        for n in 0..KEYS {
            let k = TokenKey {
                client_id: "shop-0123456789abcdef".into(),
                subject: Subject::User(format!("user{}", n / 5)),
                scopes: ScopeSet::parse(&format!("device_d{} orders:read", n % 5)).expect("scope"),
            };
            let mut raw = [0u8; 16];
            raw[..4].copy_from_slice(&n.to_le_bytes());
            let mut refresh = raw;
            refresh[15] = 1;
            let p = LivePair {
                access_id: TokenId(raw),
                access_scopes: k.scopes.clone(),
                issued_at: 1_000,
                access_expires_at: 4_600,
                refresh: Some(RefreshGrant { id: TokenId(refresh), expires_at: 87_400, ..Default::default() }),
            };
            s.apply(Record::Set { k, p: Some(p) });
        }
        let after = rss_bytes();
        assert_eq!(s.entries(), KEYS as usize);
        println!("RSS growth {} bytes: {} bytes per key", after - before, (after - before) / KEYS as usize);
    }
}
